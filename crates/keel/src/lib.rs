//! Keel, the binary: the HTTP API, the CLI, and what wires the store, the
//! engine and the API into one process.
//!
//! # Layout
//!
//! * [`cli`]: the `keel` commands (`serve`, `migrate`, `events`, `run`,
//!   `status`, `watch`, `runs`, `dlq`, `agents`, `bench`).
//! * [`embedded`]: opening the embedded SQLite store for one process.
//! * [`events`]: `keel events status|off`, event export as the store holds
//!   it (switch, outbox backlog, relay lease), and the relay lease's name.
//! * [`service`]: what the API and the in-process CLI do to runs and agents
//!   (submit, cancel, re-drive, the run view, following a journal).
//! * [`api`]: the axum router and its handlers; errors map to status codes.
//! * [`client`]: the CLI's HTTP client for a running server.
//! * [`progress`]: one human-readable line per journal event.
//! * [`mock`]: an OpenAI-compatible mock LLM and a counting tool server, for
//!   tests and the benchmark.
//! * [`bench`]: `keel bench`, the throughput and latency benchmark.
//! * [`retention`]: the sweep deleting runs that ended longer ago than
//!   `keel serve --retention`.
//! * `nats` (feature `nats`, on by default): the relay exporting journal
//!   events to NATS JetStream and the consumer ingesting run submissions
//!   from it (`docs/EVENTS.md`).

/// `println!` for what a command prints. When stdout is closed (a pipe into
/// `head` that has read enough), the process ends quietly with the status a
/// Unix tool killed by SIGPIPE has (141) instead of panicking; Rust ignores
/// SIGPIPE, and `keel serve` must keep doing so (MCP servers' stdin is a pipe).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_line(format_args!($($arg)*))
    };
}

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod embedded;
pub mod events;
pub mod mock;
#[cfg(feature = "nats")]
pub mod nats;
pub mod progress;
pub mod retention;
pub mod service;

/// Writes one line of a command's output to stdout (see `outln!`).
fn write_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
        std::process::exit(141);
    }
}
