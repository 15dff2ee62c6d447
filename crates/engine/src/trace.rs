//! OpenTelemetry traces, exported over OTLP/HTTP with the JSON encoding.
//!
//! Every span of a run is in the run's trace: the trace id is the run id
//! ([`RunId::trace_id`]), so one run is one trace across processes and
//! restarts. The run's root span `run <agent>` has a span id derived from
//! the run id ([`root_span_id`]), so every process names the same parent;
//! the process that commits the run's terminal event sends it. Its
//! children: one `llm <provider>/<model>` span per LLM request, one
//! `tool <name>` span per tool call (whose span id is the parent id of the
//! `traceparent` the tool receives) and the API's `POST /v1/runs`.
//!
//! Off unless [`Exporter::install`] was called (`keel serve
//! --otlp-endpoint`): then [`enabled`] is false and [`record`] does
//! nothing. On, spans wait in a bounded queue ([`Options::capacity`]);
//! when it is full they are dropped and counted
//! (`keel_trace_spans_dropped_total`), so a slow or broken collector never
//! blocks or slows a worker: recording is a push under a short lock. The
//! [`Exporter`]'s task sends them every [`Options::interval`] or every
//! [`Options::batch`] spans, each POST under [`Options::timeout`]; a batch
//! the collector refuses is dropped and counted, its error logged at most
//! once a minute.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use keel_core::RunId;
use keel_core::run::{State, Status};
use serde_json::{Value as Json, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics;

/// The exporter's settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// The collector's base URL (`http://collector:4318`); spans are POSTed
    /// to `{endpoint}/v1/traces`.
    pub endpoint: String,
    /// `service.instance.id` of the resource (the process name the
    /// breakers use).
    pub instance: String,
    /// Most spans waiting to be sent; beyond it they are dropped.
    pub capacity: usize,
    /// Spans per POST; a full batch is sent at once.
    pub batch: usize,
    /// Longest a span waits for a batch to fill.
    pub interval: Duration,
    /// Longest one POST may take.
    pub timeout: Duration,
    /// Longest the final flush at shutdown may take.
    pub shutdown: Duration,
}

impl Options {
    /// The defaults for a collector at `endpoint`.
    pub fn new(endpoint: impl Into<String>, instance: impl Into<String>) -> Options {
        Options {
            endpoint: endpoint.into(),
            instance: instance.into(),
            capacity: 8_192,
            batch: 512,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            shutdown: Duration::from_secs(5),
        }
    }
}

/// What a span is to its trace (OTLP `SpanKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Work inside the process (the run).
    Internal = 1,
    /// A request this process answered (the submit).
    Server = 2,
    /// A request this process made (LLM and tool calls).
    Client = 3,
}

/// An attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `stringValue`.
    Str(String),
    /// `intValue` (an int64, written as a string).
    Int(i64),
    /// `doubleValue`.
    Double(f64),
    /// `boolValue`.
    Bool(bool),
}

impl From<&str> for Value {
    fn from(value: &str) -> Value {
        Value::Str(value.to_string())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Value {
        Value::Str(value)
    }
}

impl From<u32> for Value {
    fn from(value: u32) -> Value {
        Value::Int(i64::from(value))
    }
}

impl From<u64> for Value {
    fn from(value: u64) -> Value {
        Value::Int(i64::try_from(value).unwrap_or(i64::MAX))
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Value {
        Value::Double(value)
    }
}

impl From<bool> for Value {
    fn from(value: bool) -> Value {
        Value::Bool(value)
    }
}

/// A span of another trace this one relates to (the caller of a submit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
}

impl Link {
    /// The caller's span in a W3C `traceparent` header
    /// (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero); `None` when malformed.
    pub fn from_traceparent(header: &str) -> Option<Link> {
        let mut parts = header.trim().split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let span_id = parts.next()?;
        let flags = parts.next()?;
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
        let valid = hex(version, 2)
            && version != "ff"
            && hex(trace_id, 32)
            && nonzero(trace_id)
            && hex(span_id, 16)
            && nonzero(span_id)
            && hex(flags, 2)
            && (version != "00" || parts.next().is_none());
        valid.then(|| Link {
            trace_id: trace_id.to_ascii_lowercase(),
            span_id: span_id.to_ascii_lowercase(),
        })
    }
}

/// One finished span.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    /// The run whose trace it is in.
    pub run_id: RunId,
    /// Its id (not 0).
    pub span_id: u64,
    /// Its parent's id; `None` for the root.
    pub parent: Option<u64>,
    /// What it is (`llm openai/gpt-4o`).
    pub name: String,
    /// Internal, server or client.
    pub kind: Kind,
    /// Start, in nanoseconds since the Unix epoch.
    pub start_ns: u64,
    /// End, in nanoseconds since the Unix epoch.
    pub end_ns: u64,
    /// `Some(message)` when it failed (status ERROR).
    pub error: Option<String>,
    /// Its attributes.
    pub attributes: Vec<(&'static str, Value)>,
    /// Spans of other traces it relates to.
    pub links: Vec<Link>,
}

impl Span {
    /// A span of `run_id`'s trace, a child of the run's root span, with no
    /// attributes yet.
    pub fn child(run_id: RunId, span_id: u64, name: String, kind: Kind, start_ns: u64) -> Span {
        Span {
            run_id,
            span_id,
            parent: Some(root_span_id(run_id)),
            name,
            kind,
            start_ns,
            end_ns: start_ns,
            error: None,
            attributes: Vec::new(),
            links: Vec::new(),
        }
    }

    /// Adds an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        self.attributes.push((key, value.into()));
    }

    /// The span in the OTLP protobuf-JSON mapping.
    pub fn to_json(&self) -> Json {
        let mut span = json!({
            "traceId": self.run_id.trace_id(),
            "spanId": hex16(self.span_id),
            "name": self.name,
            "kind": self.kind as i32,
            "startTimeUnixNano": self.start_ns.to_string(),
            "endTimeUnixNano": self.end_ns.max(self.start_ns).to_string(),
            "attributes": attributes(&self.attributes),
            "status": match &self.error {
                None => json!({ "code": 0 }),
                Some(message) => json!({ "code": 2, "message": message }),
            },
        });
        if let Some(parent) = self.parent {
            span["parentSpanId"] = Json::String(hex16(parent));
        }
        if !self.links.is_empty() {
            span["links"] = self
                .links
                .iter()
                .map(|link| json!({ "traceId": link.trace_id, "spanId": link.span_id }))
                .collect();
        }
        span
    }
}

fn hex16(id: u64) -> String {
    let mut out = String::with_capacity(16);
    let _ = write!(out, "{id:016x}");
    out
}

fn attributes(attributes: &[(&'static str, Value)]) -> Json {
    attributes
        .iter()
        .map(|(key, value)| {
            let value = match value {
                Value::Str(s) => json!({ "stringValue": s }),
                Value::Int(i) => json!({ "intValue": i.to_string() }),
                // JSON has no NaN or infinity.
                Value::Double(d) if d.is_finite() => json!({ "doubleValue": d }),
                Value::Double(d) => json!({ "stringValue": d.to_string() }),
                Value::Bool(b) => json!({ "boolValue": b }),
            };
            json!({ "key": key, "value": value })
        })
        .collect()
}

/// The body of one OTLP/HTTP export (`ExportTraceServiceRequest`) of
/// `spans` from the process `instance`.
pub fn export_request(instance: &str, spans: &[Span]) -> Json {
    let resource = [
        ("service.name", Value::from("keel")),
        ("service.instance.id", Value::from(instance)),
        ("service.version", Value::from(env!("CARGO_PKG_VERSION"))),
    ];
    json!({
        "resourceSpans": [{
            "resource": { "attributes": attributes(&resource) },
            "scopeSpans": [{
                "scope": { "name": "keel", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans.iter().map(Span::to_json).collect::<Vec<_>>(),
            }],
        }],
    })
}

/// Records the root span of a run that just ended (its terminal event
/// committed by this process): from the run's creation to now; a child
/// run's links to its parent run's root span.
pub fn run_ended(state: &State) {
    if !enabled() {
        return;
    }
    let mut span = Span {
        run_id: state.run_id,
        span_id: root_span_id(state.run_id),
        parent: None,
        name: format!("run {}", state.agent),
        kind: Kind::Internal,
        start_ns: ms_to_ns(state.created_at),
        end_ns: now_ns(),
        error: None,
        attributes: Vec::new(),
        links: Vec::new(),
    };
    if state.status != Status::Completed {
        span.error = Some(
            state
                .error
                .clone()
                .unwrap_or_else(|| state.status.as_str().to_string()),
        );
    }
    span.set("keel.run_id", state.run_id.to_string());
    span.set("keel.agent", state.agent.as_str());
    span.set("keel.version", state.version.as_str());
    span.set("keel.status", state.status.as_str());
    span.set("keel.steps", state.steps);
    span.set("gen_ai.usage.input_tokens", state.usage.input_tokens);
    span.set("gen_ai.usage.output_tokens", state.usage.output_tokens);
    span.set("keel.cost_usd", state.cost_usd);
    // A child run is its own trace, linked to its parent run's.
    if let Some(parent) = &state.parent {
        span.set("keel.parent_run_id", parent.run_id.to_string());
        span.links.push(Link {
            trace_id: parent.run_id.trace_id(),
            span_id: hex16(root_span_id(parent.run_id)),
        });
    }
    record(span);
}

/// The span id of `run_id`'s root span: the same in every process.
pub fn root_span_id(run_id: RunId) -> u64 {
    let bits = run_id.0.as_u128();
    let mut x = (bits as u64) ^ ((bits >> 64) as u64) ^ 0x6b65_656c_726f_6f74;
    // splitmix64's finalizer spreads the bits; 0 is not a valid span id.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    if x == 0 { 1 } else { x }
}

/// The span id of an external worker's call (step `step`, position
/// `call_index` of `run_id`): the same for each of its leases and for the
/// process that journals its result.
pub fn call_span_id(run_id: RunId, step: u32, call_index: u32) -> u64 {
    let position = (u64::from(step) << 32) | u64::from(call_index);
    let mut x = root_span_id(run_id) ^ position.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    if x == 0 { 1 } else { x }
}

/// A new random span id (not 0).
pub fn span_id() -> u64 {
    fastrand::u64(1..)
}

/// The W3C `traceparent` of a call made within span `span_id` of
/// `run_id`'s trace.
pub fn traceparent(run_id: RunId, span_id: u64) -> String {
    format!("00-{}-{span_id:016x}-01", run_id.trace_id())
}

tokio::task_local! {
    /// The span of the call being made by the task (see [`within`]).
    static CALL_SPAN: u64;
}

/// Runs `call` as span `span_id`: the `traceparent` of the LLM request it
/// makes names that span ([`current_span`]).
pub async fn within<F: Future>(span_id: u64, call: F) -> F::Output {
    CALL_SPAN.scope(span_id, call).await
}

/// The span of the call the current task makes, inside [`within`].
pub fn current_span() -> Option<u64> {
    CALL_SPAN.try_with(|id| *id).ok()
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Epoch milliseconds in nanoseconds.
pub fn ms_to_ns(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0).saturating_mul(1_000_000)
}

/// Spans waiting to be sent, at most `capacity`.
#[derive(Debug)]
pub struct Queue {
    spans: Mutex<VecDeque<Span>>,
    capacity: usize,
    batch: usize,
    full: Notify,
}

impl Queue {
    /// An empty queue of at most `capacity` spans that wakes its reader
    /// every `batch` spans.
    pub fn new(capacity: usize, batch: usize) -> Queue {
        Queue {
            spans: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            batch: batch.max(1),
            full: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Span>> {
        // A push or a drain is one step: a panic cannot leave it half done.
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a span; `false` (and the span dropped) when the queue is full.
    pub fn push(&self, span: Span) -> bool {
        let mut spans = self.lock();
        if spans.len() >= self.capacity {
            return false;
        }
        spans.push_back(span);
        let wake = spans.len().is_multiple_of(self.batch);
        drop(spans);
        if wake {
            self.full.notify_one();
        }
        true
    }

    /// Takes up to one batch of spans, oldest first.
    pub fn take(&self) -> Vec<Span> {
        let mut spans = self.lock();
        let n = spans.len().min(self.batch);
        spans.drain(..n).collect()
    }

    /// Spans waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// This process's queue, once an exporter is installed.
static QUEUE: OnceLock<Arc<Queue>> = OnceLock::new();

/// Whether spans are exported (build them only then).
pub fn enabled() -> bool {
    QUEUE.get().is_some()
}

/// Queues a finished span for export (nothing when export is off; dropped
/// and counted when the queue is full).
pub fn record(span: Span) {
    if let Some(queue) = QUEUE.get()
        && !queue.push(span)
    {
        metrics::trace_spans_dropped("queue_full", 1);
    }
}

/// A problem starting the exporter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint is not an http(s) URL.
    #[error("the OTLP endpoint `{0}` is not an http:// or https:// URL")]
    Endpoint(String),
    /// An exporter was already installed in this process.
    #[error("an OTLP exporter is already installed in this process")]
    Installed,
    /// The HTTP client could not be built.
    #[error("cannot build the OTLP HTTP client: {0}")]
    Client(String),
}

/// Sends the queued spans to the collector; [`Exporter::run`] until cancelled.
pub struct Exporter {
    queue: Arc<Queue>,
    http: reqwest::Client,
    url: reqwest::Url,
    options: Options,
    last_warned: Option<Instant>,
}

impl Exporter {
    /// Installs this process's span queue: from now on [`record`] queues
    /// spans, which [`Exporter::run`] sends.
    pub fn install(options: Options) -> Result<Exporter, Error> {
        let base = options.endpoint.trim_end_matches('/');
        let url = reqwest::Url::parse(&format!("{base}/v1/traces"))
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| Error::Endpoint(options.endpoint.clone()))?;
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .build()
            .map_err(|e| Error::Client(e.to_string()))?;
        let queue = Arc::new(Queue::new(options.capacity, options.batch));
        QUEUE.set(queue.clone()).map_err(|_| Error::Installed)?;
        Ok(Exporter {
            queue,
            http,
            url,
            options,
            last_warned: None,
        })
    }

    /// Sends batches until `cancel`, then what is queued, within
    /// [`Options::shutdown`].
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.options.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let queue = self.queue.clone();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {}
                () = queue.full.notified() => {}
            }
            // Everything queued, one batch at a time (the next spans wait
            // for the next tick).
            let mut batches = queue.len().div_ceil(queue.batch);
            while batches > 0 && !cancel.is_cancelled() {
                batches -= 1;
                self.send(queue.take()).await;
            }
        }
        let deadline = tokio::time::Instant::now() + self.options.shutdown;
        let flushed = tokio::time::timeout_at(deadline, async {
            while !queue.is_empty() {
                self.send(queue.take()).await;
            }
        })
        .await;
        if flushed.is_err() {
            let left = queue.take().len() + queue.len();
            warn!(
                spans = left,
                "spans not exported at shutdown: the collector is too slow"
            );
            metrics::trace_spans_dropped("export_failed", left as u64);
        }
    }

    /// POSTs one batch; a failure drops it (counted, logged at most once a minute).
    async fn send(&mut self, spans: Vec<Span>) {
        if spans.is_empty() {
            return;
        }
        let count = spans.len() as u64;
        let body = export_request(&self.options.instance, &spans);
        let sent = self
            .http
            .post(self.url.clone())
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())
            .and_then(|response| {
                let status = response.status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("the collector answered {status}"))
                }
            });
        match sent {
            Ok(()) => metrics::trace_spans_exported(count),
            Err(error) => {
                metrics::trace_spans_dropped("export_failed", count);
                let quiet = self
                    .last_warned
                    .is_some_and(|at| at.elapsed() < Duration::from_secs(60));
                if quiet {
                    debug!(spans = count, %error, "span export failed");
                } else {
                    self.last_warned = Some(Instant::now());
                    warn!(url = %self.url, spans = count, %error, "span export failed, dropping the batch (logged at most once a minute)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(run_id: RunId) -> Span {
        let mut span = Span::child(
            run_id,
            0xab,
            "tool get".into(),
            Kind::Client,
            1_700_000_000_123_456_789,
        );
        span.end_ns = 1_700_000_001_000_000_000;
        span.set("keel.step", 2u32);
        span.set("keel.tool.kind", "http");
        span.set("keel.cost_usd", 0.25);
        span.set("keel.retried", false);
        span
    }

    #[test]
    fn spans_follow_the_otlp_json_mapping() {
        let run_id = RunId::new();
        let mut failed = span(run_id);
        failed.error = Some("boom".into());
        failed.links.push(
            Link::from_traceparent("00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01")
                .unwrap(),
        );
        let body = export_request("host:1:abc", &[span(run_id), failed]);
        let resource = &body["resourceSpans"][0]["resource"]["attributes"];
        assert_eq!(resource[0]["key"], "service.name");
        assert_eq!(resource[0]["value"]["stringValue"], "keel");
        assert_eq!(resource[1]["key"], "service.instance.id");
        assert_eq!(resource[1]["value"]["stringValue"], "host:1:abc");
        let scope = &body["resourceSpans"][0]["scopeSpans"][0];
        assert_eq!(scope["scope"]["name"], "keel");
        let ok = &scope["spans"][0];
        let trace_id = ok["traceId"].as_str().unwrap();
        assert_eq!(trace_id.len(), 32);
        assert_eq!(trace_id, run_id.0.simple().to_string());
        assert!(
            trace_id
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        );
        assert_eq!(ok["spanId"], "00000000000000ab");
        assert_eq!(ok["parentSpanId"], hex16(root_span_id(run_id)));
        assert_eq!(ok["kind"], 3);
        assert_eq!(ok["startTimeUnixNano"], "1700000000123456789");
        assert_eq!(ok["endTimeUnixNano"], "1700000001000000000");
        assert_eq!(ok["status"]["code"], 0);
        assert!(ok.get("links").is_none());
        let attrs = &ok["attributes"];
        assert_eq!(
            attrs[0],
            json!({"key": "keel.step", "value": {"intValue": "2"}})
        );
        assert_eq!(
            attrs[1],
            json!({"key": "keel.tool.kind", "value": {"stringValue": "http"}})
        );
        assert_eq!(
            attrs[2],
            json!({"key": "keel.cost_usd", "value": {"doubleValue": 0.25}})
        );
        assert_eq!(
            attrs[3],
            json!({"key": "keel.retried", "value": {"boolValue": false}})
        );
        let failed = &scope["spans"][1];
        assert_eq!(failed["status"], json!({"code": 2, "message": "boom"}));
        assert_eq!(
            failed["links"],
            json!([{"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331"}])
        );
    }

    #[test]
    fn ids_and_traceparents() {
        let run_id = RunId::new();
        assert_eq!(root_span_id(run_id), root_span_id(run_id));
        assert_ne!(root_span_id(run_id), root_span_id(RunId::new()));
        let call = call_span_id(run_id, 2, 1);
        assert_eq!(call, call_span_id(run_id, 2, 1));
        assert_ne!(call, call_span_id(run_id, 1, 2));
        assert_ne!(call, root_span_id(run_id));
        let header = traceparent(run_id, 0x1f);
        assert_eq!(
            header,
            format!("00-{}-000000000000001f-01", run_id.trace_id())
        );
        let link = Link::from_traceparent(&header).unwrap();
        assert_eq!(link.trace_id, run_id.trace_id());
        assert_eq!(link.span_id, "000000000000001f");
        for bad in [
            "",
            "00-abc-def-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-xx",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        ] {
            assert_eq!(Link::from_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        for bad in ["collector:4318", "ftp://collector", "not a url", ""] {
            let refused = Exporter::install(Options::new(bad, "test"));
            assert!(matches!(refused, Err(Error::Endpoint(_))), "{bad}");
        }
        assert!(!enabled(), "a refused endpoint installs nothing");
    }

    #[test]
    fn a_full_queue_drops_spans_and_batches_are_bounded() {
        let run_id = RunId::new();
        let queue = Queue::new(3, 2);
        assert!(queue.push(span(run_id)));
        assert!(queue.push(span(run_id)));
        assert!(queue.push(span(run_id)));
        assert!(!queue.push(span(run_id)), "a full queue refuses");
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.take().len(), 2, "one batch at a time");
        assert!(queue.push(span(run_id)));
        assert_eq!(queue.take().len(), 2);
        assert!(queue.is_empty());
        assert!(queue.take().is_empty());
    }
}
