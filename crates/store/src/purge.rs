//! Deleting ended runs ([`Store::purge`](crate::Store::purge) and
//! [`Store::delete_run`](crate::Store::delete_run)), as both backends do.
//!
//! A backend reads the runs in question as [`Row`]s (in the transaction
//! that deletes them, the runs' rows locked where other processes write),
//! asks [`Runs::parents`] which parents to look up, and [`Runs::keep`]
//! which of its rows must stay and why; it then deletes the others, with
//! their journal, deltas, dead letters and tasks, rows of runs last.
//!
//! The scan for [`Purge`]d runs goes in id order up to the id a run
//! created at `ended_before` would have: a run's id carries its creation
//! time (UUID v7; a child keeps its parent's), which is never later than
//! its end, so the scan stops there instead of reading every run kept.

use std::collections::HashMap;

use keel_core::run::Status;
use keel_core::{Event, Millis, RunId};
use uuid::Uuid;

use crate::{Error, Purge, Result};

/// What to delete.
pub(crate) enum Scope {
    /// Runs that ended long enough ago ([`crate::Store::purge`]).
    Ended(Purge),
    /// One run ([`crate::Store::delete_run`]).
    One(RunId),
}

/// A run considered for deletion: its row, its first event (which names
/// its parent, if it is a child run), and whether anything still needs it.
#[derive(sqlx::FromRow)]
pub(crate) struct Row {
    /// The run's id.
    pub(crate) id: String,
    status: String,
    /// The data of its `RunSubmitted` event (seq 1).
    first: Option<String>,
    /// Whether a task of its own is queued or leased.
    tasks: bool,
    /// Whether the outbox holds events of it not exported yet.
    unexported: bool,
}

/// The lowest id a run created at `at` can have: every run id below it
/// was created earlier.
pub(crate) fn id_cutoff(at: Millis) -> Uuid {
    let millis = u64::try_from(at).unwrap_or(0).min((1 << 48) - 1);
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    Uuid::from_bytes(bytes)
}

/// Rows read for deletion, parsed, with where a sweep goes on.
pub(crate) struct Runs {
    /// Each run, its status, its parent, and what still needs it.
    runs: Vec<(RunId, Status, Option<RunId>, Option<&'static str>)>,
    /// [`crate::Purged::next`].
    next: Option<RunId>,
}

impl Runs {
    /// Parses the rows read for `scope`; a row that cannot be read is
    /// corrupt data, and no row for [`Scope::One`] is an unknown run.
    pub(crate) fn new(rows: Vec<Row>, scope: &Scope) -> Result<Runs> {
        let full = match scope {
            Scope::Ended(p) => rows.len() >= p.limit as usize,
            Scope::One(id) if rows.is_empty() => {
                return Err(Error::NotFound(format!("run {id}")));
            }
            Scope::One(_) => false,
        };
        let mut runs = Vec::with_capacity(rows.len());
        for row in rows {
            let id = run_id(&row.id)?;
            let status = status(id, &row.status)?;
            let parent = match row.first.as_deref() {
                Some(data) => parent(id, data)?,
                None => None,
            };
            let busy = if row.tasks {
                Some(
                    "it still has work queued (a callback being delivered, a timer); \
                     try again once it is done",
                )
            } else if row.unexported {
                Some("its events have not been exported yet (the event relay is behind)")
            } else {
                None
            };
            runs.push((id, status, parent, busy));
        }
        let next = if full { runs.last().map(|r| r.0) } else { None };
        Ok(Runs { runs, next })
    }

    /// The parents to look up: a child run stays while its parent runs.
    pub(crate) fn parents(&self) -> Vec<RunId> {
        let mut parents: Vec<RunId> = self.runs.iter().filter_map(|r| r.2).collect();
        parents.sort_unstable();
        parents.dedup();
        parents
    }

    /// The runs to delete, given the status of each parent still stored,
    /// and where a sweep goes on; for [`Scope::One`], a run that must stay
    /// is a [`Error::Conflict`] saying why.
    pub(crate) fn decide(
        self,
        scope: &Scope,
        parents: &HashMap<RunId, Status>,
    ) -> Result<(Vec<RunId>, Option<RunId>)> {
        let mut delete = Vec::with_capacity(self.runs.len());
        for (id, status, parent, busy) in self.runs {
            let parent_runs = parent.and_then(|p| {
                let status = parents.get(&p)?;
                (!status.is_terminal()).then_some((p, *status))
            });
            let kept = if !status.is_terminal() {
                format!(
                    "run {id} is {} and has not ended: cancel it first \
                     (only COMPLETED, FAILED or CANCELLED runs can be deleted)",
                    status.as_str()
                )
            } else if let Some(busy) = busy {
                format!("run {id} cannot be deleted yet: {busy}")
            } else if let Some((parent, status)) = parent_runs {
                format!(
                    "run {id} is a child of run {parent}, which is {} and may still \
                     read it: delete it once the parent has ended",
                    status.as_str()
                )
            } else {
                delete.push(id);
                continue;
            };
            if matches!(scope, Scope::One(_)) {
                return Err(Error::Conflict(kept));
            }
        }
        Ok((delete, self.next))
    }
}

/// Parses `(id, status)` rows of parents.
pub(crate) fn statuses(rows: Vec<(String, String)>) -> Result<HashMap<RunId, Status>> {
    rows.into_iter()
        .map(|(id, text)| {
            let id = run_id(&id)?;
            Ok((id, status(id, &text)?))
        })
        .collect()
}

fn run_id(text: &str) -> Result<RunId> {
    text.parse()
        .map_err(|_| Error::Corrupt(format!("run id `{text}` is not a UUID")))
}

fn status(id: RunId, text: &str) -> Result<Status> {
    Status::parse(text)
        .ok_or_else(|| Error::Corrupt(format!("run {id} has unknown status `{text}`")))
}

/// The parent a run's first event names.
fn parent(id: RunId, data: &str) -> Result<Option<RunId>> {
    let event: Event = serde_json::from_str(data)
        .map_err(|e| Error::Corrupt(format!("event 1 of run {id} is not valid: {e}")))?;
    match event {
        Event::RunSubmitted { parent, .. } => Ok(parent.map(|p| p.run_id)),
        other => Err(Error::Corrupt(format!(
            "event 1 of run {id} is {}, not RunSubmitted",
            other.kind()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_cutoff_orders_ids_by_creation_time() {
        let at: Millis = 1_764_950_400_123;
        let cutoff = id_cutoff(at);
        let before = Uuid::new_v7(uuid::Timestamp::from_unix_time(
            1_764_950_400,
            122_000_000,
            0,
            0,
        ));
        let after = Uuid::new_v7(uuid::Timestamp::from_unix_time(
            1_764_950_400,
            123_000_000,
            0,
            0,
        ));
        assert!(before < cutoff);
        assert!(after >= cutoff);
        // SQLite stores ids as hyphenated lowercase text: the same order.
        assert!(before.to_string() < cutoff.to_string());
        assert!(after.to_string() >= cutoff.to_string());
        assert_eq!(id_cutoff(-5), Uuid::nil());
    }
}
