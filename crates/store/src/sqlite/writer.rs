//! The single writer: one task owns the one connection that writes, and
//! group-commits the ops of many callers.
//!
//! Callers send an [`Op`] with a oneshot for the reply. The writer takes the
//! first op, drains whatever else is queued (up to [`MAX_BATCH`]), runs them
//! all in one `BEGIN IMMEDIATE` … `COMMIT` (one fsync for the batch), then
//! replies to each and tells subscribers which runs moved.
//!
//! The ops of a batch are concurrent (each caller is still waiting for its
//! reply), so any order is a valid one: the writer runs the other ops one
//! after another, then the submissions and the appends, the hot path,
//! together in bulk (`journal`).
//!
//! An op checks its preconditions (fence, expected seq, idempotency) before
//! it writes anything, so a refused op ([`is_refusal`]) leaves the batch
//! intact. Any other failure (a statement failing, corrupt data) rolls the
//! batch back, and the writer runs its ops again one transaction each, so
//! only the broken op fails.

use std::collections::HashMap;
use std::slice;

use keel_core::RunId;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, warn};

use super::agents::{self, PutAgent};
use super::deltas;
use super::export::{self, RelayLease};
use super::journal::{self, AppendEvents, Submit};
use super::purge;
use super::queue::{self, Claim, Heartbeat, ReleaseAll, RetryLater};
use crate::purge::Scope;
use crate::{
    Appended, Committed, DeltaBatch, DeltaPos, Error, Purged, Registered, Result, Submitted, Task,
};

/// Most ops committed in one transaction.
pub(super) const MAX_BATCH: usize = 512;

/// Where an op's result goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T>>;

/// A write waiting for the writer: the request, where to answer, and the
/// result once it ran (sent only after the commit).
pub(super) struct Call<R, T> {
    /// What to do.
    pub(super) request: R,
    reply: Reply<T>,
    result: Option<Result<T>>,
}

impl<R, T> Call<R, T> {
    /// A call not run yet.
    pub(super) fn new(request: R, reply: Reply<T>) -> Self {
        Call {
            request,
            reply,
            result: None,
        }
    }

    /// Keeps the op's result. A failure other than a refusal is returned:
    /// the transaction must be rolled back.
    pub(super) fn settle(&mut self, result: Result<T>) -> Result<()> {
        let abort = match &result {
            Err(e) if !is_refusal(e) => Some(copy(e)),
            _ => None,
        };
        self.result = Some(result);
        abort.map_or(Ok(()), Err)
    }

    /// Forgets the result of a transaction that was rolled back.
    fn clear(&mut self) {
        self.result = None;
    }

    /// Records that the transaction failed, unless the op already failed in it.
    fn fail(&mut self, message: &str) {
        if !matches!(self.result, Some(Err(_))) {
            self.result = Some(Err(Error::Backend(message.to_string())));
        }
    }

    /// Sends the result to the caller (who may have gone away).
    fn finish(self) {
        let result = self
            .result
            .unwrap_or_else(|| Err(Error::Backend("the write was not run".into())));
        let _ = self.reply.send(result);
    }
}

/// Whether a failed op was refused by a precondition, before it wrote anything.
fn is_refusal(error: &Error) -> bool {
    matches!(
        error,
        Error::SeqConflict { .. } | Error::LeaseLost(_) | Error::NotFound(_) | Error::Conflict(_)
    )
}

/// The same failure, to abort the transaction with (the op keeps its own).
fn copy(error: &Error) -> Error {
    match error {
        Error::Corrupt(message) => Error::Corrupt(message.clone()),
        Error::Backend(message) => Error::Backend(message.clone()),
        other => Error::Backend(other.to_string()),
    }
}

/// One write, as the writer receives it.
pub(super) enum Op {
    /// Register an agent version.
    PutAgent(Call<PutAgent, Registered>),
    /// Create a run.
    Submit(Call<Submit, Submitted>),
    /// Journal events and apply their task changes.
    Append(Call<AppendEvents, Appended>),
    /// Lease due tasks.
    Claim(Call<Claim, Vec<Task>>),
    /// Extend an owner's leases.
    Heartbeat(Call<Heartbeat, u64>),
    /// Give a task back until later.
    RetryLater(Call<RetryLater, ()>),
    /// Give back every lease of an owner.
    ReleaseAll(Call<ReleaseAll, u64>),
    /// Switch event export on.
    EnableExport(Call<(), ()>),
    /// Switch event export off and drop the outbox.
    DisableExport(Call<(), u64>),
    /// Delete published outbox entries.
    AckOutbox(Call<Vec<i64>, ()>),
    /// Take or extend a relay lease.
    RelayLease(Call<RelayLease, bool>),
    /// Persist a batch of streamed LLM output.
    Deltas(Call<DeltaBatch, DeltaPos>),
    /// Delete ended runs.
    Purge(Call<Scope, Purged>),
}

impl Op {
    /// Forgets the result of a transaction that was rolled back.
    fn clear(&mut self) {
        match self {
            Op::PutAgent(call) => call.clear(),
            Op::Submit(call) => call.clear(),
            Op::Append(call) => call.clear(),
            Op::Claim(call) => call.clear(),
            Op::Heartbeat(call) => call.clear(),
            Op::RetryLater(call) => call.clear(),
            Op::ReleaseAll(call) => call.clear(),
            Op::EnableExport(call) => call.clear(),
            Op::DisableExport(call) => call.clear(),
            Op::AckOutbox(call) => call.clear(),
            Op::RelayLease(call) => call.clear(),
            Op::Deltas(call) => call.clear(),
            Op::Purge(call) => call.clear(),
        }
    }

    /// Records that the op's own transaction failed to begin or commit.
    fn fail(&mut self, message: &str) {
        match self {
            Op::PutAgent(call) => call.fail(message),
            Op::Submit(call) => call.fail(message),
            Op::Append(call) => call.fail(message),
            Op::Claim(call) => call.fail(message),
            Op::Heartbeat(call) => call.fail(message),
            Op::RetryLater(call) => call.fail(message),
            Op::ReleaseAll(call) => call.fail(message),
            Op::EnableExport(call) => call.fail(message),
            Op::DisableExport(call) => call.fail(message),
            Op::AckOutbox(call) => call.fail(message),
            Op::RelayLease(call) => call.fail(message),
            Op::Deltas(call) => call.fail(message),
            Op::Purge(call) => call.fail(message),
        }
    }

    /// Replies to the caller.
    fn finish(self) {
        match self {
            Op::PutAgent(call) => call.finish(),
            Op::Submit(call) => call.finish(),
            Op::Append(call) => call.finish(),
            Op::Claim(call) => call.finish(),
            Op::Heartbeat(call) => call.finish(),
            Op::RetryLater(call) => call.finish(),
            Op::ReleaseAll(call) => call.finish(),
            Op::EnableExport(call) => call.finish(),
            Op::DisableExport(call) => call.finish(),
            Op::AckOutbox(call) => call.finish(),
            Op::RelayLease(call) => call.finish(),
            Op::Deltas(call) => call.finish(),
            Op::Purge(call) => call.finish(),
        }
    }
}

/// Runs a batch's ops in the open transaction, keeping each op's result.
/// An error means the transaction must be rolled back.
async fn run(
    conn: &mut SqliteConnection,
    ops: &mut [Op],
    commits: &mut Vec<Committed>,
) -> Result<()> {
    let mut submits = Vec::new();
    let mut appends = Vec::new();
    for op in ops.iter_mut() {
        match op {
            Op::Submit(call) => submits.push(call),
            Op::Append(call) => appends.push(call),
            Op::PutAgent(call) => {
                let result = agents::put(conn, &call.request).await;
                call.settle(result)?;
            }
            Op::Claim(call) => {
                let result = queue::claim(conn, &call.request).await;
                call.settle(result)?;
            }
            Op::Heartbeat(call) => {
                let result = queue::heartbeat(conn, &call.request).await;
                call.settle(result)?;
            }
            Op::RetryLater(call) => {
                let result = queue::retry_later(conn, &call.request, commits).await;
                call.settle(result)?;
            }
            Op::ReleaseAll(call) => {
                let result = queue::release_all(conn, &call.request, commits).await;
                call.settle(result)?;
            }
            Op::EnableExport(call) => {
                let result = export::enable(conn).await;
                call.settle(result)?;
            }
            Op::DisableExport(call) => {
                let result = export::disable(conn).await;
                call.settle(result)?;
            }
            Op::AckOutbox(call) => {
                let result = export::ack(conn, &call.request).await;
                call.settle(result)?;
            }
            Op::RelayLease(call) => {
                let result = export::lease(conn, &call.request).await;
                call.settle(result)?;
            }
            Op::Deltas(call) => {
                let result = deltas::append(conn, &call.request, commits).await;
                call.settle(result)?;
            }
            Op::Purge(call) => {
                let result = purge::purge(conn, &call.request).await;
                call.settle(result)?;
            }
        }
    }
    journal::submit(conn, submits, commits).await?;
    journal::append(conn, appends, commits).await
}

/// Why a transaction did not commit.
enum Failed {
    /// It could not start (e.g. another process held the lock too long).
    Begin(Error),
    /// An op or the commit failed; it was rolled back.
    Write(Error),
}

/// The task that owns the write connection.
pub(super) struct Writer {
    /// The one connection that writes.
    pub(super) conn: SqliteConnection,
    /// Ops from every handle; the writer ends when all handles are gone.
    pub(super) ops: mpsc::Receiver<Op>,
    /// Where commits are announced.
    pub(super) commits: broadcast::Sender<Committed>,
}

impl Writer {
    /// Commits batches of ops until every handle is dropped.
    pub(super) async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while self.ops.recv_many(&mut batch, MAX_BATCH).await > 0 {
            self.write(&mut batch).await;
        }
        if let Err(e) = self.conn.close().await {
            warn!(error = %e, "closing the store's write connection failed");
        }
        debug!("store writer stopped");
    }

    /// Commits a batch in one transaction (or, if that fails, each op in its
    /// own), then replies and notifies.
    async fn write(&mut self, batch: &mut Vec<Op>) {
        let mut commits = Vec::new();
        match self.transaction(batch, &mut commits).await {
            Ok(()) => self.notify(&commits),
            // Nothing ran: running the ops one by one would fail the same way.
            Err(Failed::Begin(e)) => {
                warn!(error = %e, ops = batch.len(), "could not start a write transaction");
                for op in batch.iter_mut() {
                    op.fail(&e.to_string());
                }
            }
            Err(Failed::Write(e)) if batch.len() == 1 => batch[0].fail(&e.to_string()),
            Err(Failed::Write(e)) => {
                warn!(error = %e, ops = batch.len(), "batch failed, writing its ops one by one");
                for op in batch.iter_mut() {
                    op.clear();
                    let mut commits = Vec::new();
                    match self.transaction(slice::from_mut(op), &mut commits).await {
                        Ok(()) => self.notify(&commits),
                        Err(Failed::Begin(e) | Failed::Write(e)) => op.fail(&e.to_string()),
                    }
                }
            }
        }
        for op in batch.drain(..) {
            op.finish();
        }
    }

    /// Runs ops in one transaction and commits it, or rolls it back if one
    /// of them failed other than by a refusal.
    async fn transaction(
        &mut self,
        ops: &mut [Op],
        commits: &mut Vec<Committed>,
    ) -> Result<(), Failed> {
        let mut tx = self
            .conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| Failed::Begin(super::backend(e)))?;
        if let Err(e) = run(&mut tx, ops, commits).await {
            if let Err(e) = tx.rollback().await {
                warn!(error = %e, "rollback failed");
            }
            commits.clear();
            return Err(Failed::Write(e));
        }
        tx.commit()
            .await
            .map_err(|e| Failed::Write(super::backend(e)))
    }

    /// Announces committed runs: one notification per run, its latest seq.
    fn notify(&self, commits: &[Committed]) {
        let mut latest: HashMap<RunId, Committed> = HashMap::with_capacity(commits.len());
        for commit in commits {
            latest
                .entry(commit.run_id)
                .and_modify(|seen| {
                    seen.last_seq = seen.last_seq.max(commit.last_seq);
                    seen.new_work |= commit.new_work;
                })
                .or_insert(*commit);
        }
        for commit in latest.into_values() {
            // No subscriber is fine.
            let _ = self.commits.send(commit);
        }
    }
}
