//! Streaming a model's answer into the store while the call runs, so the
//! run's event stream can show the text as it arrives and a client that
//! reconnects gets exactly what it missed.
//!
//! The LLM client hands each text delta to a callback, which cannot wait;
//! it queues the text for a [`Batcher`] running beside the call. The
//! batcher writes what gathered once [`FLUSH_AFTER`] passed since the first
//! unwritten piece, or as soon as [`FLUSH_BYTES`] gathered, whichever comes
//! first (one store write per batch, never one per token), and once more
//! when the call ends, before the step is committed. The append journaling
//! the step's `LlmCompleted` deletes the step's deltas (the store's
//! compaction): the final message is what counts.
//!
//! A delta write never fails the step: a failed write is logged and its text
//! dropped; a lost lease stops the writes (the step's commit will be
//! refused for the same reason).

use std::time::Duration;

use keel_core::Agent;
use keel_core::run::State;
use keel_core::spec::ModelSpec;
use keel_store::{DeltaAttempt, DeltaBatch, Error as StoreError, Store, Task};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::llm::{self, Delta};
use crate::now;

/// Longest a piece of text waits before it is written.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// Text that is written at once, without waiting for [`FLUSH_AFTER`].
pub const FLUSH_BYTES: usize = 2 * 1024;

/// Calls `model` (the spec's own or a fallback) for `task`'s step with streaming, persisting the text
/// deltas in batches while the call runs; returns when the call ended and
/// the last batch was written (or dropped).
pub async fn stream<S: Store>(
    llm: &llm::Client,
    store: &S,
    model: &ModelSpec,
    agent: &Agent,
    state: &State,
    task: &Task,
) -> Result<llm::Response, llm::Error> {
    let (sender, texts) = mpsc::unbounded_channel();
    let call = async {
        let result = llm
            .stream_with(model, agent, state, task.step, |delta| {
                if let Delta::Text(text) = delta {
                    // The batcher only stops once the sender is dropped.
                    let _ = sender.send(text);
                }
            })
            .await;
        // Ends the batcher, which writes what is left.
        drop(sender);
        result
    };
    let batcher = Batcher::new(store, task);
    let (result, ()) = tokio::join!(call, batcher.run(texts));
    result
}

/// Writes one LLM call's text to the store in batches.
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

    /// Gathers the texts and writes them in batches until the sender is
    /// dropped, then writes the rest.
    pub async fn run(mut self, mut texts: mpsc::UnboundedReceiver<String>) {
        let mut buffer = String::new();
        let mut due: Option<Instant> = None;
        loop {
            let received = match due {
                None => texts.recv().await,
                Some(at) => tokio::select! {
                    text = texts.recv() => text,
                    () = tokio::time::sleep_until(at) => {
                        self.flush(&mut buffer).await;
                        due = None;
                        continue;
                    }
                },
            };
            let Some(text) = received else {
                self.flush(&mut buffer).await;
                return;
            };
            if buffer.is_empty() {
                due = Some(Instant::now() + FLUSH_AFTER);
            }
            buffer.push_str(&text);
            if buffer.len() >= FLUSH_BYTES {
                self.flush(&mut buffer).await;
                due = None;
            }
        }
    }

    /// Writes the gathered text as one batch; on failure it is dropped.
    async fn flush(&mut self, buffer: &mut String) {
        if buffer.is_empty() || self.stopped {
            buffer.clear();
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
            text: std::mem::take(buffer),
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
