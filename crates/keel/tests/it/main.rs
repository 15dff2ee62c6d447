//! Keel's integration tests: real `keel serve` processes, real HTTP, real
//! SQLite files, an OpenAI-compatible mock LLM and a counting tool server.

mod support;

mod api;
mod approvals;
mod auth;
mod backpressure;
mod chaos;
mod children;
mod cli;
mod console;
mod crash;
mod events;
mod failures;
mod gateway;
mod hostile;
mod journal;
mod mcp;
mod metrics;
#[cfg(feature = "nats")]
mod nats;
mod outage;
mod postgres;
mod priority;
mod providers;
mod retention;
mod sagas;
mod secrets;
mod streaming;
mod tenants;
mod traces;
mod workers;
