//! What the store holds right now, counted for monitoring
//! ([`Store::stats`](crate::Store::stats)): the queue's tasks by queue,
//! kind and state, the unfinished runs by status, and the dead letters.
//!
//! Both backends answer with one statement (one snapshot) of the same
//! shape, decoded here: rows of `(what, queue, name, state, count,
//! earliest)`, where `what` is `task` (`name` is the task kind, `state` 0
//! ready, 1 scheduled, 2 leased, `earliest` the least `visible_at`), `run`
//! (`name` is the status) or `dead` (the dead letters).
//! Tasks are few (only live ones are kept); runs are counted from the
//! index of unfinished runs only, never the finished ones, however many.

use keel_core::Millis;
use keel_core::run::Status;

use crate::{Error, Result, TaskKind};

/// Counts of what the store holds at one moment ([`Store::stats`](crate::Store::stats)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Tasks by queue, kind and state; combinations with no task are left out.
    pub tasks: Vec<TaskCount>,
    /// Unfinished runs by status; statuses with no run are left out.
    pub runs: Vec<RunCount>,
    /// Tasks in the dead-letter queue.
    pub dead_letters: u64,
}

/// Where a task stands in its queue at the time asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskState {
    /// Due and not under a live lease: a claim would take it now (an
    /// expired lease counts: its task is anyone's).
    Ready,
    /// Not due yet and not leased: a retry waiting for its backoff, a
    /// deferred task, a timer.
    Scheduled,
    /// Under a live lease: a worker is on it.
    Leased,
}

impl TaskState {
    /// Every state.
    pub const ALL: [TaskState; 3] = [TaskState::Ready, TaskState::Scheduled, TaskState::Leased];

    /// The name as shown (`ready`, `scheduled`, `leased`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Ready => "ready",
            TaskState::Scheduled => "scheduled",
            TaskState::Leased => "leased",
        }
    }

    /// The code both backends' statements give it.
    fn from_code(code: i64) -> Option<TaskState> {
        match code {
            0 => Some(TaskState::Ready),
            1 => Some(TaskState::Scheduled),
            2 => Some(TaskState::Leased),
            _ => None,
        }
    }
}

/// How many tasks of one queue and kind are in one state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskCount {
    /// The external workers' queue ([`crate::NewTask::queue`]); `None` for
    /// the engine's own tasks.
    pub queue: Option<String>,
    /// What the tasks do.
    pub kind: TaskKind,
    /// Where they stand.
    pub state: TaskState,
    /// How many.
    pub count: u64,
    /// The earliest time among theirs (`visible_at`): ready, since when
    /// the one waiting longest has been due (or its lease expired);
    /// scheduled, when the next one falls due; leased, when the first
    /// lease expires unless extended.
    pub earliest: Millis,
}

/// How many runs are in one unfinished status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunCount {
    /// The status (never a terminal one).
    pub status: Status,
    /// How many.
    pub count: u64,
}

/// A row of the statement both backends run: what is counted (`task`,
/// `run` or `dead`), the task's queue, the task's kind or the run's
/// status, the task's state code, the count, the tasks' least `visible_at`
/// (0 for the others).
pub(crate) type Row = (String, Option<String>, Option<String>, i64, i64, i64);

/// Decodes the rows of the stats statement, in a stable order (tasks by
/// queue, kind name and state; runs by status in life order).
pub(crate) fn from_rows(rows: Vec<Row>) -> Result<Stats> {
    let mut stats = Stats::default();
    for (what, queue, name, state, count, earliest) in rows {
        let count = u64::try_from(count)
            .map_err(|_| Error::Corrupt(format!("a {what} count is {count}")))?;
        let name = name.unwrap_or_default();
        match what.as_str() {
            "task" => {
                let kind = TaskKind::parse(&name)
                    .ok_or_else(|| Error::Corrupt(format!("unknown task kind `{name}`")))?;
                let state = TaskState::from_code(state)
                    .ok_or_else(|| Error::Corrupt(format!("unknown task state {state}")))?;
                stats.tasks.push(TaskCount {
                    queue,
                    kind,
                    state,
                    count,
                    earliest,
                });
            }
            "run" => {
                let status = Status::parse(&name)
                    .ok_or_else(|| Error::Corrupt(format!("unknown run status `{name}`")))?;
                stats.runs.push(RunCount { status, count });
            }
            "dead" => stats.dead_letters = count,
            other => return Err(Error::Corrupt(format!("unknown stats row `{other}`"))),
        }
    }
    stats.tasks.sort_by(|a, b| {
        (&a.queue, a.kind.as_str(), a.state).cmp(&(&b.queue, b.kind.as_str(), b.state))
    });
    stats
        .runs
        .sort_by_key(|r| Status::ALL.iter().position(|s| *s == r.status));
    Ok(stats)
}
