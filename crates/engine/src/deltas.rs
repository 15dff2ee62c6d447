//! Streaming a model's answer into the store while the call runs, so the
//! run's event stream can show the text and the tool calls as they arrive
//! and a client that reconnects gets exactly what it missed.
//!
//! The LLM client hands each delta (text, a tool call starting, a fragment
//! of its arguments) to a callback, which cannot wait; it queues it for a
//! [`Batcher`] running beside the call. The batcher writes what gathered
//! once [`FLUSH_AFTER`] passed since the first unwritten piece, or as soon
//! as [`FLUSH_BYTES`] gathered, whichever comes first (one store write per
//! batch, never one per token), and once more when the call ends, before
//! the step is committed. A batch holds the text and, per tool call it
//! touches, the call's start (id and name) and its next argument fragments
//! joined ([`ToolCallDelta`]), so each call's arguments stay in order. The
//! append journaling the step's `LlmCompleted` deletes the step's deltas
//! (the store's compaction): the final message is what counts.
//!
//! A delta write never fails the step: a failed write is logged and its
//! pieces dropped; a lost lease stops the writes (the step's commit will be
//! refused for the same reason).

use std::time::Duration;

use keel_core::Agent;
use keel_core::run::State;
use keel_core::spec::ModelSpec;
use keel_store::{DeltaAttempt, DeltaBatch, Error as StoreError, Store, Task, ToolCallDelta};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::llm::{self, Delta};
use crate::now;

/// Longest a piece of text waits before it is written.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// Output (text, tool names and arguments, in bytes) that is written at
/// once, without waiting for [`FLUSH_AFTER`].
pub const FLUSH_BYTES: usize = 2 * 1024;

/// Calls `model` (the spec's own or a fallback) for `task`'s step with
/// streaming, persisting the deltas (text and tool calls) in batches while
/// the call runs; returns when the call ended and the last batch was
/// written (or dropped).
pub async fn stream<S: Store>(
    llm: &llm::Client,
    store: &S,
    model: &ModelSpec,
    agent: &Agent,
    state: &State,
    task: &Task,
) -> Result<llm::Response, llm::Error> {
    let (sender, deltas) = mpsc::unbounded_channel();
    let call = async {
        let result = llm
            .stream_with(model, agent, state, task.step, |delta| {
                // The batcher only stops once the sender is dropped.
                let _ = sender.send(delta);
            })
            .await;
        // Ends the batcher, which writes what is left.
        drop(sender);
        result
    };
    let batcher = Batcher::new(store, task);
    let (result, ()) = tokio::join!(call, batcher.run(deltas));
    result
}

/// Writes one LLM call's deltas to the store in batches.
pub struct Batcher<'a, S> {
    store: &'a S,
    task: &'a Task,
    /// The attempt the first write opened, and the next batch's index.
    at: Option<(u32, u32)>,
    /// Set once the lease is lost: nothing more is written.
    stopped: bool,
}

impl<'a, S: Store> Batcher<'a, S> {
    /// A batcher for `task`'s LLM call; nothing written yet.
    pub fn new(store: &'a S, task: &'a Task) -> Self {
        Batcher {
            store,
            task,
            at: None,
            stopped: false,
        }
    }

    /// Gathers the deltas and writes them in batches until the sender is
    /// dropped, then writes the rest.
    pub async fn run(mut self, mut deltas: mpsc::UnboundedReceiver<Delta>) {
        let mut buffer = Pending::default();
        let mut due: Option<Instant> = None;
        loop {
            let received = match due {
                None => deltas.recv().await,
                Some(at) => tokio::select! {
                    delta = deltas.recv() => delta,
                    () = tokio::time::sleep_until(at) => {
                        self.flush(&mut buffer).await;
                        due = None;
                        continue;
                    }
                },
            };
            let Some(delta) = received else {
                self.flush(&mut buffer).await;
                return;
            };
            if buffer.is_empty() {
                due = Some(Instant::now() + FLUSH_AFTER);
            }
            buffer.push(delta);
            if buffer.bytes >= FLUSH_BYTES {
                self.flush(&mut buffer).await;
                due = None;
            }
        }
    }

    /// Writes the gathered pieces as one batch; on failure they are dropped.
    async fn flush(&mut self, buffer: &mut Pending) {
        let pending = std::mem::take(buffer);
        if pending.is_empty() || self.stopped {
            return;
        }
        let attempt = match self.at {
            None => DeltaAttempt::Open(self.task.attempts),
            Some((attempt, idx)) => DeltaAttempt::Continue { attempt, idx },
        };
        let batch = DeltaBatch {
            run_id: self.task.run_id,
            lease: self.task.lease,
            step: self.task.step,
            attempt,
            text: pending.text,
            tool_calls: pending.tool_calls,
            now: now(),
        };
        let run_id = self.task.run_id;
        let step = self.task.step;
        match self.store.append_deltas(batch).await {
            Ok(pos) => self.at = Some((pos.attempt, pos.idx + 1)),
            Err(StoreError::LeaseLost(_)) => {
                debug!(%run_id, step, "lease lost, no more deltas written");
                self.stopped = true;
            }
            Err(e) => warn!(%run_id, step, error = %e, "could not write llm deltas, dropping them"),
        }
    }
}

/// The pieces gathered for the next batch.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pending {
    text: String,
    /// One entry per tool call touched, in the order they first came.
    tool_calls: Vec<ToolCallDelta>,
    /// Bytes gathered (text, names, arguments).
    bytes: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.text.is_empty() && self.tool_calls.is_empty()
    }

    /// Adds a delta: text is appended, a call's start opens its entry, an
    /// argument fragment goes to its call's entry (opened if the call
    /// started in an earlier batch).
    fn push(&mut self, delta: Delta) {
        match delta {
            Delta::Text(text) => {
                self.bytes += text.len();
                self.text.push_str(&text);
            }
            Delta::ToolCall { index, id, name } => {
                self.bytes += id.len() + name.len();
                let call = self.call(index);
                call.id = Some(id);
                call.name = Some(name);
            }
            Delta::ToolArguments { index, fragment } => {
                self.bytes += fragment.len();
                self.call(index).arguments.push_str(&fragment);
            }
        }
    }

    /// The entry of the call at `index`, opened if the batch has none.
    fn call(&mut self, index: usize) -> &mut ToolCallDelta {
        // No answer has 4 billion tool calls; a decoder bug must not panic.
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let at = match self.tool_calls.iter().position(|c| c.index == index) {
            Some(at) => at,
            None => {
                self.tool_calls.push(ToolCallDelta {
                    index,
                    id: None,
                    name: None,
                    arguments: String::new(),
                });
                self.tool_calls.len() - 1
            }
        };
        &mut self.tool_calls[at]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_keeps_each_calls_arguments_in_order() {
        let mut pending = Pending::default();
        for delta in [
            Delta::Text("Let me ".into()),
            Delta::Text("look.".into()),
            Delta::ToolArguments {
                index: 0,
                fragment: "1}".into(),
            },
            Delta::ToolCall {
                index: 1,
                id: "call_b".into(),
                name: "echo".into(),
            },
            Delta::ToolArguments {
                index: 1,
                fragment: "{\"n\":".into(),
            },
            Delta::ToolArguments {
                index: 0,
                fragment: " ".into(),
            },
            Delta::ToolArguments {
                index: 1,
                fragment: "2}".into(),
            },
        ] {
            pending.push(delta);
        }
        let call = |index, id: Option<&str>, name: Option<&str>, arguments: &str| ToolCallDelta {
            index,
            id: id.map(str::to_string),
            name: name.map(str::to_string),
            arguments: arguments.to_string(),
        };
        assert_eq!(pending.text, "Let me look.");
        // Call 0 started in an earlier batch: only its arguments here.
        assert_eq!(
            pending.tool_calls,
            [
                call(0, None, None, "1} "),
                call(1, Some("call_b"), Some("echo"), "{\"n\":2}"),
            ]
        );
        assert_eq!(pending.bytes, 12 + 3 + 10 + 7);
        assert!(!pending.is_empty() && Pending::default().is_empty());
    }
}
