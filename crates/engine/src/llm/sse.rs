//! An incremental Server-Sent Events parser (the `text/event-stream` format of
//! the WHATWG HTML standard) over bytes that arrive in pieces of any size.
//!
//! Bytes go in with [`Parser::feed`]; complete events come out of
//! [`Parser::next_event`]. A line is decoded only once its end has arrived, so
//! a piece may end anywhere, even inside a UTF-8 character or between the `\r`
//! and `\n` of a line end. Lines end with `\n`, `\r\n` or `\r`; `:` lines are
//! comments; `data` fields of one event are joined with `\n`; `id` and `retry`
//! are read and ignored (a model answer is never resumed).

/// The most bytes one event (its pending line included) may hold. Provider
/// chunks are a few hundred bytes; this only stops a stream without line ends
/// from growing without bound.
pub(crate) const MAX_EVENT_BYTES: usize = 4 << 20;

/// The UTF-8 byte order mark, skipped at the start of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Event {
    /// The `event` field; empty when the event had none (a `message`).
    pub event: String,
    /// The `data` fields joined with `\n`.
    pub data: String,
}

/// Why a stream cannot be read as Server-Sent Events.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A line is not UTF-8 text.
    #[error("line {line} of the event stream is not valid UTF-8 ({source})")]
    NotUtf8 {
        /// 1-based line number in the stream.
        line: u64,
        /// Where the decoding failed.
        source: std::str::Utf8Error,
    },
    /// An event grew past [`MAX_EVENT_BYTES`] before it was dispatched.
    #[error("an event of the stream is larger than {limit} bytes")]
    TooLarge {
        /// The limit that applied.
        limit: usize,
    },
}

/// The parser's state between pieces.
#[derive(Debug)]
pub(crate) struct Parser {
    /// Bytes received and not yet consumed start at `start`.
    buf: Vec<u8>,
    start: usize,
    /// `buf[start..scanned]` holds no line end (no need to search it again).
    scanned: usize,
    /// The last line ended with `\r`: a `\n` right after belongs to it.
    after_cr: bool,
    /// Whether the byte order mark question is settled.
    bom_checked: bool,
    /// Lines read so far, for error messages.
    lines: u64,
    /// The event being built.
    event: String,
    data: String,
    has_data: bool,
    limit: usize,
}

impl Default for Parser {
    fn default() -> Self {
        Parser::with_limit(MAX_EVENT_BYTES)
    }
}

impl Parser {
    /// A parser refusing events larger than `limit` bytes.
    pub(crate) fn with_limit(limit: usize) -> Parser {
        Parser {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            after_cr: false,
            bom_checked: false,
            lines: 0,
            event: String::new(),
            data: String::new(),
            has_data: false,
            limit,
        }
    }

    /// Appends the next piece of the stream.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, or `None` until more bytes arrive.
    pub(crate) fn next_event(&mut self) -> Result<Option<Event>, Error> {
        while let Some((from, to)) = self.next_line() {
            self.lines += 1;
            let line =
                std::str::from_utf8(&self.buf[from..to]).map_err(|source| Error::NotUtf8 {
                    line: self.lines,
                    source,
                })?;
            if line.is_empty() {
                if let Some(event) = self.dispatch() {
                    return Ok(Some(event));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (name, value) = match line.split_once(':') {
                Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match name {
                "data" => {
                    self.data.push_str(value);
                    self.data.push('\n');
                    self.has_data = true;
                }
                "event" => {
                    self.event.clear();
                    self.event.push_str(value);
                }
                // `id`, `retry` and unknown fields: nothing to do for one answer.
                _ => {}
            }
            if self.data.len() + self.event.len() > self.limit {
                return Err(Error::TooLarge { limit: self.limit });
            }
        }
        let pending = self.buf.len() - self.start;
        if self.data.len() + self.event.len() + pending > self.limit {
            return Err(Error::TooLarge { limit: self.limit });
        }
        Ok(None)
    }

    /// Call once the stream has ended (after [`Parser::next_event`] returned
    /// `None`): the last event when its `data` lines arrived whole but the blank
    /// line closing it did not. A line cut off by the end is dropped.
    pub(crate) fn finish(&mut self) -> Option<Event> {
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
        self.dispatch()
    }

    /// Takes the event built so far, if it has data (an event without data is
    /// dropped, as the standard says).
    fn dispatch(&mut self) -> Option<Event> {
        let event = std::mem::take(&mut self.event);
        if !self.has_data {
            return None;
        }
        self.has_data = false;
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the `\n` after the last data line
        Some(Event { event, data })
    }

    /// The byte range of the next complete line, without its line end.
    fn next_line(&mut self) -> Option<(usize, usize)> {
        if !self.bom_checked {
            let head = &self.buf[self.start..];
            if head.len() < BOM.len() && BOM.starts_with(head) {
                return None; // could still become a byte order mark
            }
            if head.starts_with(BOM) {
                self.start += BOM.len();
            }
            self.scanned = self.scanned.max(self.start);
            self.bom_checked = true;
        }
        if self.after_cr && self.start < self.buf.len() {
            if self.buf[self.start] == b'\n' {
                self.start += 1;
            }
            self.after_cr = false;
        }
        let from = self.scanned.max(self.start);
        let Some(at) = self.buf[from..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        else {
            self.scanned = self.buf.len();
            return None;
        };
        let end = from + at;
        let line = (self.start, end);
        self.after_cr = self.buf[end] == b'\r';
        self.start = end + 1;
        self.scanned = self.start;
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All events of `stream` fed in pieces of `size` bytes, then the last one
    /// `finish` gives.
    fn parse_in(stream: &[u8], size: usize) -> Result<Vec<Event>, Error> {
        let mut parser = Parser::default();
        let mut events = Vec::new();
        for piece in stream.chunks(size.max(1)) {
            parser.feed(piece);
            while let Some(event) = parser.next_event()? {
                events.push(event);
            }
        }
        events.extend(parser.finish());
        Ok(events)
    }

    /// Parses `stream` whole and in every piece size up to its length, checks
    /// that all agree, and returns the events.
    fn parse(stream: &[u8]) -> Vec<Event> {
        let whole = parse_in(stream, stream.len()).unwrap();
        for size in 1..stream.len() {
            assert_eq!(parse_in(stream, size).unwrap(), whole, "pieces of {size}");
        }
        whole
    }

    fn event(event: &str, data: &str) -> Event {
        Event {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn fields_line_ends_and_comments() {
        let stream = b"\xEF\xBB\xBF: a comment\nevent: start\ndata: {\"a\":1}\n\n\
            data:no space\r\ndata:  two spaces\r\n\r\n\
            id: 7\rretry: 10\revent\rdata\r\r\
            : keep-alive\n\n\n\
            event: only a name\n\n\
            data: last, no blank line\n";
        assert_eq!(
            parse(stream),
            vec![
                event("start", "{\"a\":1}"),
                event("", "no space\n two spaces"),
                event("", ""),
                event("", "last, no blank line"),
            ]
        );
    }

    #[test]
    fn a_cr_lf_split_across_pieces_is_one_line_end() {
        let mut parser = Parser::default();
        parser.feed(b"data: a\r");
        assert_eq!(parser.next_event().unwrap(), None);
        parser.feed(b"\ndata: b\r");
        assert_eq!(parser.next_event().unwrap(), None);
        parser.feed(b"\n\r");
        assert_eq!(parser.next_event().unwrap(), Some(event("", "a\nb")));
        parser.feed(b"\ndata: c\n\n");
        assert_eq!(parser.next_event().unwrap(), Some(event("", "c")));
        assert_eq!(parser.next_event().unwrap(), None);
    }

    #[test]
    fn utf8_split_anywhere() {
        let stream = "event: ünïcode\ndata: héllo 日本 🦀\ndata: ✓\n\n".as_bytes();
        assert_eq!(parse(stream), vec![event("ünïcode", "héllo 日本 🦀\n✓")]);
    }

    #[test]
    fn a_cut_line_at_the_end_is_dropped() {
        assert_eq!(parse(b"data: a\n\ndata: [DO"), vec![event("", "a")]);
        assert_eq!(parse(b"data: a\ndata: b"), vec![event("", "a")]);
        assert_eq!(parse(b""), vec![]);
        assert_eq!(parse(b"\xEF\xBB"), vec![]);
    }

    #[test]
    fn bad_streams_are_named() {
        let error = parse_in(b"data: ok\n\ndata: \xFF\xFE\n\n", 3).unwrap_err();
        assert!(matches!(error, Error::NotUtf8 { line: 3, .. }), "{error:?}");
        assert!(error.to_string().contains("line 3"), "{error}");

        let mut parser = Parser::with_limit(16);
        parser.feed(b"data: 0123456789abcdef");
        let error = parser.next_event().unwrap_err();
        assert!(matches!(error, Error::TooLarge { limit: 16 }), "{error:?}");

        let mut parser = Parser::with_limit(16);
        parser.feed(b"data: 0123456789\ndata: 0123456789\n");
        assert!(parser.next_event().is_err(), "many lines add up");
    }
}
