//! Keel's pure domain. No I/O, no clock, no async runtime: everything here is
//! data and functions of data, tested without a database.
//!
//! # Layout
//!
//! * [`approval`]: approval policies: which tool calls wait for a human
//!   (tool flags, name patterns, conditions on arguments), timeouts, and
//!   what recovery does with an uncertain call (`on_uncertain`).
//! * [`breaker`]: the circuit breaker of one provider endpoint (pure state).
//! * [`config`]: the server's configuration file: LLM providers, their keys'
//!   sources, rate limits, circuit breakers and prices.
//! * [`ids`]: run and task ids (UUID v7), sequence numbers, epoch-millis time.
//! * [`message`]: the conversation: messages, tool calls, token usage.
//! * [`priority`]: a run's priority (0..=9) under contention for workers.
//! * [`saga`]: `compensate` of a tool: the tool that undoes a call and its
//!   argument template, checked at registration and filled from the call.
//! * [`spec`]: agent specs (YAML/JSON), validated with errors naming the field,
//!   compiled into an [`spec::Agent`] with its tools' JSON Schema validators.
//! * [`event`]: the journal's events, each carrying only what is new.
//! * [`run`]: the run state machine: [`run::State`] is the fold of the events,
//!   [`run::handle`] turns a command into events and effects.
//! * [`yaml`]: YAML text to a JSON value, its size bounded by the text's
//!   (alias bombs are refused).

pub mod approval;
pub mod breaker;
pub mod config;
pub mod event;
pub mod ids;
pub mod message;
pub mod priority;
pub mod run;
pub mod saga;
pub mod spec;
pub mod yaml;

pub use event::{Event, Recorded};
pub use ids::{Millis, RunId, Seq, TaskId};
pub use priority::Priority;
pub use spec::Agent;
