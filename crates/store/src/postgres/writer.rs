//! The writer: one task per store owns the connection that writes, and
//! group-commits the ops of many callers.
//!
//! Callers send an [`Op`] with a oneshot for the reply. The writer takes the
//! first op, drains whatever else is queued (up to [`MAX_BATCH`]), runs them
//! all in one transaction (one WAL flush for the batch), then replies to each
//! and tells subscribers which runs moved: those of this process directly,
//! those of other processes through `pg_notify` in the transaction.
//!
//! The ops of a batch are concurrent (each caller is still waiting for its
//! reply), so any order is a valid one: the writer runs the submissions and
//! the appends, the hot path, together in bulk (`journal`), then the other
//! ops one after another.
//!
//! An op checks its preconditions (fence, expected seq, idempotency) before
//! it writes anything, so a refused op ([`is_refusal`]) leaves the batch
//! intact. Any other failure rolls the batch back. Its likely cause is a
//! deadlock with another process's transaction (PostgreSQL aborts one of
//! the two), or the connection was lost, so the batch is tried once more
//! (on a new connection if the old one is broken); if it fails again, its
//! ops run one transaction each, so only the broken op fails. A batch whose
//! kept connection turns out broken at `BEGIN` (the server, a pooler or the
//! network closed it since the last batch) ran nothing and is tried again
//! on a new one. A failed commit is not retried: whether it took effect is
//! unknown, and its ops fail.
//!
//! The network may also lose the connection without a word (no reset
//! comes; TCP would wait ~15 minutes). So a transaction, from getting a
//! connection to its `COMMIT`'s answer, has a deadline (the store's
//! [`Options::timeout`](super::Options::timeout)); past it, the connection
//! is dropped (not given back to the pool, which would ping it, and wait as
//! long again) and the batch counts as one whose connection was lost: tried
//! again on a new connection if its `COMMIT` was not sent, failed as a
//! cut-off commit if it was. Its transaction told the server to end the
//! session if left waiting as long (`idle_in_transaction_session_timeout`),
//! so the locks it took do not block the retry for long.

use std::collections::HashMap;
use std::slice;
use std::time::Duration;

use keel_core::RunId;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres, SqlSafeStr, SqlStr};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, warn};

use super::agents::{self, PutAgent};
use super::journal::{self, AppendEvents, Submit};
use super::queue::{self, Claim, Heartbeat, ReleaseAll, RetryLater};
use super::{Losses, backend, begin, listen, silent};
use crate::{Appended, Committed, Error, Registered, Result, Submitted, Task};

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
    fn fail(&mut self, error: &Error) {
        if !matches!(self.result, Some(Err(_))) {
            self.result = Some(Err(copy(error)));
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
        Error::Unavailable(message) => Error::Unavailable(message.clone()),
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
        }
    }

    /// Records that the op's transaction failed to begin or commit.
    fn fail(&mut self, error: &Error) {
        match self {
            Op::PutAgent(call) => call.fail(error),
            Op::Submit(call) => call.fail(error),
            Op::Append(call) => call.fail(error),
            Op::Claim(call) => call.fail(error),
            Op::Heartbeat(call) => call.fail(error),
            Op::RetryLater(call) => call.fail(error),
            Op::ReleaseAll(call) => call.fail(error),
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
        }
    }
}

/// Runs a batch's ops in the open transaction, keeping each op's result.
/// An error means the transaction must be rolled back.
///
/// Submissions and appends go first: they lock run rows before task rows,
/// and the other ops lock only task rows, so a batch locks runs before
/// tasks as every other batch does.
async fn run(conn: &mut PgConnection, ops: &mut [Op], commits: &mut Vec<Committed>) -> Result<()> {
    let mut submits = Vec::new();
    let mut appends = Vec::new();
    let mut others = Vec::new();
    for op in ops.iter_mut() {
        match op {
            Op::Submit(call) => submits.push(call),
            Op::Append(call) => appends.push(call),
            other => others.push(other),
        }
    }
    journal::submit(conn, submits, commits).await?;
    journal::append(conn, appends, commits).await?;
    for op in others {
        match op {
            Op::Submit(_) | Op::Append(_) => {}
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
        }
    }
    Ok(())
}

/// Tells other processes, at commit, which runs moved.
const NOTIFY: &str = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload";

/// Why a transaction did not commit.
enum Failed {
    /// It could not start (no connection): nothing ran.
    Begin(Error),
    /// The connection kept from an earlier batch was broken, or the
    /// database stopped answering before the `COMMIT` was sent: nothing
    /// was committed, and a new connection may do.
    Stale(Error),
    /// An op failed; the transaction was rolled back.
    Write(Error),
    /// The commit failed, or got no answer in time: it may or may not have
    /// taken effect.
    Commit(Error),
}

/// The task that owns the write connection.
pub(super) struct Writer {
    /// Where the connection comes from, and a new one if it breaks.
    pool: PgPool,
    /// The connection, kept between batches.
    conn: Option<PoolConnection<Postgres>>,
    /// Longest a transaction may take, getting a connection included.
    timeout: Duration,
    /// The statement opening a transaction ([`begin`]).
    begin: SqlStr,
    /// Whether the transaction under way has sent its `COMMIT`: if it runs
    /// out of time, its outcome is unknown.
    committing: bool,
    /// Ops from every handle; the writer ends when all handles are gone.
    ops: mpsc::Receiver<Op>,
    /// Where commits are announced in this process.
    commits: broadcast::Sender<Committed>,
    /// This store's id in notifications.
    origin: u64,
    /// Told when the connection is found broken.
    losses: Losses,
}

impl Writer {
    /// A writer on `conn`, taken from `pool`.
    pub(super) fn new(
        pool: PgPool,
        conn: PoolConnection<Postgres>,
        timeout: Duration,
        ops: mpsc::Receiver<Op>,
        commits: broadcast::Sender<Committed>,
        origin: u64,
        losses: Losses,
    ) -> Writer {
        Writer {
            pool,
            conn: Some(conn),
            timeout,
            begin: begin(timeout).into_sql_str(),
            committing: false,
            ops,
            commits,
            origin,
            losses,
        }
    }

    /// Commits batches of ops until every handle is dropped.
    pub(super) async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while self.ops.recv_many(&mut batch, MAX_BATCH).await > 0 {
            self.write(&mut batch).await;
        }
        drop(self.conn.take());
        self.pool.close().await;
        debug!("store writer stopped");
    }

    /// Commits a batch in one transaction (or, if that fails twice, each op
    /// in its own), then replies and notifies.
    async fn write(&mut self, batch: &mut Vec<Op>) {
        let mut failed = match self.commit(batch).await {
            Ok(()) => None,
            Err(Failed::Write(e) | Failed::Stale(e)) => {
                debug!(error = %e, ops = batch.len(), "batch failed, trying it again");
                for op in batch.iter_mut() {
                    op.clear();
                }
                self.commit(batch).await.err()
            }
            Err(other) => Some(other),
        };
        match failed.take() {
            None => {}
            // Nothing ran, or the outcome is unknown: running the ops again
            // could not help, or could apply them twice.
            Some(Failed::Begin(e) | Failed::Stale(e)) => {
                warn!(error = %e, ops = batch.len(), "write transaction failed");
                for op in batch.iter_mut() {
                    op.fail(&e);
                }
            }
            Some(Failed::Commit(e)) => {
                warn!(error = %e, ops = batch.len(), "commit failed, its outcome is unknown");
                for op in batch.iter_mut() {
                    op.fail(&e);
                }
            }
            Some(Failed::Write(e)) if batch.len() == 1 => batch[0].fail(&e),
            Some(Failed::Write(e)) => {
                warn!(error = %e, ops = batch.len(), "batch failed, writing its ops one by one");
                // Once no transaction can begin, the others would wait for
                // a connection in turn: they fail at once.
                let mut down: Option<Error> = None;
                for op in batch.iter_mut() {
                    op.clear();
                    if let Some(e) = &down {
                        op.fail(e);
                        continue;
                    }
                    match self.commit(slice::from_mut(op)).await {
                        Ok(()) => {}
                        Err(Failed::Begin(e) | Failed::Stale(e)) => {
                            op.fail(&e);
                            down = Some(e);
                        }
                        Err(Failed::Write(e) | Failed::Commit(e)) => op.fail(&e),
                    }
                }
            }
        }
        for op in batch.drain(..) {
            op.finish();
        }
    }

    /// Runs ops in one transaction and commits it, then announces the runs
    /// it moved in this process.
    async fn commit(&mut self, ops: &mut [Op]) -> Result<(), Failed> {
        let mut commits = Vec::new();
        self.committing = false;
        let result = tokio::time::timeout(self.timeout, self.transaction(ops, &mut commits))
            .await
            .unwrap_or_else(|_| Err(self.timed_out()));
        if result.is_ok() {
            for commit in commits {
                // No subscriber is fine.
                let _ = self.commits.send(commit);
            }
        } else {
            self.check_connection().await;
        }
        result
    }

    /// Runs ops in one transaction and commits it, or rolls it back if one
    /// of them failed other than by a refusal. `commits` ends up with one
    /// notification per run moved, its latest seq.
    async fn transaction(
        &mut self,
        ops: &mut [Op],
        commits: &mut Vec<Committed>,
    ) -> Result<(), Failed> {
        let (conn, kept) = match &mut self.conn {
            Some(conn) => (conn, true),
            None => {
                let conn = self
                    .pool
                    .acquire()
                    .await
                    .map_err(|e| Failed::Begin(backend(e)))?;
                (self.conn.insert(conn), false)
            }
        };
        let mut tx = conn.begin_with(self.begin.clone()).await.map_err(|e| {
            if kept {
                Failed::Stale(backend(e))
            } else {
                Failed::Begin(backend(e))
            }
        })?;
        let written = match run(&mut tx, ops, commits).await {
            Ok(()) => {
                latest(commits);
                notify(&mut tx, self.origin, commits).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            if let Err(e) = tx.rollback().await {
                warn!(error = %e, "rollback failed");
            }
            commits.clear();
            return Err(Failed::Write(e));
        }
        self.committing = true;
        tx.commit().await.map_err(|e| Failed::Commit(backend(e)))
    }

    /// After a transaction ran out of time: drops its connection, and says
    /// how the batch failed.
    fn timed_out(&mut self) -> Failed {
        let error = silent(self.timeout);
        let Some(conn) = self.conn.take() else {
            // Still waiting for a connection: nothing ran.
            return Failed::Begin(error);
        };
        warn!(
            timeout = ?self.timeout,
            committing = self.committing,
            "no answer from the database, dropping the write connection"
        );
        self.abandon(conn);
        if self.committing {
            Failed::Commit(error)
        } else {
            Failed::Stale(error)
        }
    }

    /// Drops a connection deemed lost without a word to the server, and
    /// frees its place in the pool for a new one.
    fn abandon(&self, conn: PoolConnection<Postgres>) {
        self.losses.record();
        drop(conn.detach());
    }

    /// After a failed transaction: gives up the connection if it is broken,
    /// so the next batch gets a new one.
    async fn check_connection(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        let error = match tokio::time::timeout(self.timeout, conn.ping()).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => backend(e),
            Err(_) => silent(self.timeout),
        };
        warn!(%error, "store write connection is broken, replacing it");
        if let Some(conn) = self.conn.take() {
            self.abandon(conn);
        }
    }
}

/// Keeps one notification per run: its latest seq, with new work if any
/// commit of the run made some.
fn latest(commits: &mut Vec<Committed>) {
    let mut latest: HashMap<RunId, Committed> = HashMap::with_capacity(commits.len());
    for commit in commits.drain(..) {
        latest
            .entry(commit.run_id)
            .and_modify(|seen| {
                seen.last_seq = seen.last_seq.max(commit.last_seq);
                seen.new_work |= commit.new_work;
            })
            .or_insert(commit);
    }
    commits.extend(latest.into_values());
}

/// Queues the notifications, sent by PostgreSQL when the transaction commits.
async fn notify(conn: &mut PgConnection, origin: u64, commits: &[Committed]) -> Result<()> {
    if commits.is_empty() {
        return Ok(());
    }
    let payloads: Vec<String> = commits
        .iter()
        .map(|commit| listen::payload(origin, commit))
        .collect();
    sqlx::query(NOTIFY)
        .bind(listen::CHANNEL)
        .bind(payloads)
        .execute(conn)
        .await
        .map_err(backend)?;
    Ok(())
}
