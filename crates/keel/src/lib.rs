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
//! * `nats` (feature `nats`, on by default): the relay exporting journal
//!   events to NATS JetStream and the consumer ingesting run submissions
//!   from it (`docs/EVENTS.md`).

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
pub mod service;
