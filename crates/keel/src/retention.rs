//! Retention: `keel serve --retention 30d` deletes runs that ended longer
//! ago than that, with their journal, deltas, dead letters and idempotency
//! keys ([`Store::purge`]), so the store stops growing with every run ever
//! made.
//!
//! A sweep runs every `interval` (the first one shortly after start): it
//! scans the ended runs in id order, [`BATCH`] at a time, each batch one
//! short transaction, with a pause between batches at least as long as the
//! batch took, so a sweep through a large backlog takes at most half of
//! the store's writer (SQLite has one) and the workers' commits go on
//! meanwhile. With several processes on PostgreSQL each sweeps; they skip
//! each other's rows.

use std::time::Duration;

use keel_engine::now;
use keel_store::{Purge, Store};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Runs looked at per transaction.
pub const BATCH: u32 = 500;

/// Shortest pause between two batches of a sweep.
const PAUSE: Duration = Duration::from_millis(20);

/// First sweep after start: soon, but not in the middle of a restart's
/// recovery work.
const FIRST: Duration = Duration::from_secs(5);

/// How long ended runs are kept, and how often the sweep looks.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Runs that ended longer ago than this are deleted.
    pub keep: Duration,
    /// Time between sweeps.
    pub interval: Duration,
}

/// Sweeps until `cancel`.
pub async fn run<S: Store>(store: S, retention: Retention, cancel: CancellationToken) {
    info!(
        keep = %keel_core::spec::human_duration::format(retention.keep),
        every = %keel_core::spec::human_duration::format(retention.interval),
        "retention: deleting runs that ended longer ago than `keep`"
    );
    let mut wait = FIRST.min(retention.interval);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = retention.interval;
        let keep = i64::try_from(retention.keep.as_millis()).unwrap_or(i64::MAX);
        let ended_before = now().saturating_sub(keep);
        match sweep(&store, ended_before, &cancel).await {
            Ok(0) => {}
            Ok(deleted) => info!(
                deleted,
                "retention: deleted runs that ended before the cutoff"
            ),
            // The next sweep tries again; nothing is lost by waiting.
            Err(e) => warn!(error = %e, "retention: a sweep failed"),
        }
    }
}

/// One sweep over the runs that ended before `ended_before`: how many it
/// deleted.
pub async fn sweep<S: Store>(
    store: &S,
    ended_before: i64,
    cancel: &CancellationToken,
) -> Result<usize, keel_store::Error> {
    let mut deleted = 0;
    let mut after = None;
    loop {
        let started = tokio::time::Instant::now();
        let purged = store
            .purge(Purge {
                ended_before,
                limit: BATCH,
                after,
            })
            .await?;
        let pause = started.elapsed().max(PAUSE);
        deleted += purged.deleted.len();
        let Some(next) = purged.next else {
            return Ok(deleted);
        };
        after = Some(next);
        tokio::select! {
            () = cancel.cancelled() => return Ok(deleted),
            () = tokio::time::sleep(pause) => {}
        }
    }
}
