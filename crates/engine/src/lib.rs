//! Keel's engine: the worker pool that leases tasks from the store and drives
//! runs through their steps, with the LLM providers and tools those steps call.
//!
//! # Layout
//!
//! * [`worker`]: the [`Engine`]: a dispatcher that claims tasks for free worker
//!   slots, a heartbeat that keeps this process's leases alive, and the
//!   per-task driver that turns LLM answers and tool results into commands for
//!   the pure state machine and commits the resulting events and tasks.
//! * [`deltas`]: streaming an answer's text into the store in small batches
//!   while the call runs (agents with `model.stream`).
//! * [`external`]: external workers: `worker:` tools' calls leased over
//!   HTTP from their queue, completed or failed under the lease.
//! * [`callback`]: a run's `callback_url` told of its end and its parks,
//!   durably (`callback` tasks, signed like the webhooks).
//! * [`agents`]: a cache of compiled agent versions (immutable once registered).
//! * [`llm`]: LLM providers: OpenAI-compatible chat completions, the
//!   Anthropic Messages API (both plain and streamed as deltas, with call and
//!   idle timeouts) and the `scripted` stand-in for offline demos and tests.
//! * [`tools`]: tool execution: HTTP tools (idempotency key, traceparent,
//!   retries), the built-in file tools, and MCP tools through [`mcp`].
//! * [`mcp`]: MCP servers (stdio processes Keel supervises, streamable
//!   HTTP): tool discovery and cache, agents resolved with the tools their
//!   allow lists let through, `tools/call` with the idempotency key and
//!   traceparent in `_meta`.
//! * [`metrics`]: Prometheus metrics: every metric's name and meaning,
//!   this process's counters and histograms, the text exposition format.
//! * [`trace`]: OpenTelemetry spans of runs, LLM and tool calls, queued
//!   and exported over OTLP/HTTP JSON when `--otlp-endpoint` is set.
//! * [`failpoint`]: crash points that let durability tests SIGKILL the
//!   process between two commits (debug builds, `KEEL_FAILPOINTS`).
//! * [`webhook`]: signed webhook notifications (pending approvals), delivered
//!   by `notify` tasks.

pub mod agents;
pub mod callback;
pub mod deltas;
pub mod external;
pub mod failpoint;
pub mod gateway;
pub mod llm;
pub mod mcp;
pub mod metrics;
pub mod net;
pub mod tools;
pub mod trace;
pub mod webhook;
pub mod worker;

pub use gateway::Breakers;
pub use worker::{Engine, Options, linked_tasks, projection};

use keel_core::Millis;

/// The wall clock in epoch milliseconds (the only clock the engine reads).
pub fn now() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}
