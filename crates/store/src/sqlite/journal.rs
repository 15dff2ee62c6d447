//! Writing runs and their journals: submissions, and appends in bulk.
//!
//! Appends are the hot path, so they are not written one by one. The appends
//! of a batch that touch distinct runs form a wave, and each step of a wave is
//! one [`Bulk`] statement over all of its rows: one conditional update of
//! every run row (the seq check and the fence folded in, returning the runs
//! that passed), one insert of every event, one delete of every finished
//! task, one insert of every new task. A wave costs a handful of round trips
//! however many appends it holds. Appends to the same run go to later waves,
//! in arrival order.
//!
//! When event export is switched on (`export`), each wave also inserts one
//! outbox row per accepted submission or append that journals events. The
//! switch is read in the wave's first statement (its `RETURNING`), in the
//! batch's transaction, which holds the database's write lock: so it cannot
//! change before the commit, and with export off the outbox costs no
//! statement. Waves run one after another and each touches a run once, so a
//! run's outbox ids follow its seqs.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use keel_core::run::Status;
use keel_core::{Millis, Priority, RunId, Seq, TaskId};
use serde_json::Value;
use sqlx::SqliteConnection;

use super::bulk::{self, Binding, Bulk, BulkRow};
use super::writer::Call;
use super::{backend, parse_id, parse_json, tokens};
use crate::{
    Appended, Committed, Error, Lease, NewTask, Projection, Result, Submitted, Task, TaskUpdate,
};

/// An event ready to store.
pub(super) struct Encoded {
    /// Its tag.
    pub(super) kind: &'static str,
    /// Its JSON.
    pub(super) data: String,
}

/// A task to create, with its id (and lease token) chosen by the caller.
pub(super) struct Insert {
    /// The new task's id.
    pub(super) id: TaskId,
    /// The token, if it is leased on creation.
    pub(super) token: i64,
    /// The task.
    pub(super) task: NewTask,
}

impl Insert {
    /// Its row; a task leased on creation counts its first attempt.
    fn row(&self, run: RunId, now: Millis) -> TaskRow<'_> {
        TaskRow {
            run,
            insert: self,
            now,
        }
    }

    /// The task as leased, if it is leased on creation.
    fn leased(&self, run_id: RunId) -> Option<Task> {
        let to = self.task.lease_to.as_ref()?;
        Some(Task {
            lease: Lease {
                task_id: self.id,
                token: self.token,
            },
            run_id,
            kind: self.task.kind,
            step: self.task.step,
            attempts: 1,
            max_attempts: self.task.max_attempts,
            lease_until: to.until,
        })
    }
}

/// [`super::writer::Op::Submit`].
pub(super) struct Submit {
    pub(super) run_id: RunId,
    pub(super) tenant: String,
    pub(super) agent: String,
    pub(super) version: String,
    /// The input, to compare with an earlier submission's.
    pub(super) input: Value,
    /// The input as stored.
    pub(super) input_json: String,
    pub(super) idempotency_key: Option<String>,
    pub(super) priority: Priority,
    pub(super) event: Encoded,
    pub(super) task: Insert,
    pub(super) now: Millis,
}

/// [`super::writer::Op::Append`].
pub(super) struct AppendEvents {
    pub(super) run_id: RunId,
    pub(super) expected_seq: Seq,
    pub(super) events: Vec<Encoded>,
    pub(super) lease: Option<Lease>,
    pub(super) task: TaskUpdate,
    pub(super) new_tasks: Vec<Insert>,
    pub(super) clear_tasks: bool,
    /// Deltas to delete: of these steps, or all of the run's (`None`).
    pub(super) purge: Vec<Option<u32>>,
    pub(super) redrive: Option<TaskId>,
    pub(super) projection: Projection,
    pub(super) now: Millis,
    /// Child runs to create (the idempotency key is not used).
    pub(super) spawn: Vec<Submit>,
    /// Tasks for other runs.
    pub(super) wake: Vec<(RunId, Insert)>,
}

impl AppendEvents {
    /// The run's last seq once this is written.
    fn last_seq(&self) -> Seq {
        self.expected_seq + self.events.len() as Seq
    }
}

/// A journal row.
struct EventRow<'a> {
    run: RunId,
    seq: Seq,
    event: &'a Encoded,
    at: Millis,
}

impl BulkRow for EventRow<'_> {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        query
            .bind(self.run.to_string())
            .bind(self.seq)
            .bind(self.event.kind)
            .bind(self.event.data.as_str())
            .bind(self.at)
    }
}

static INSERT_EVENTS: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        5,
        "WITH v (run, seq, kind, data, at) AS (VALUES {values}) \
         INSERT INTO events (run_id, seq, kind, data, at) \
         SELECT run, seq, kind, data, at FROM v WHERE run IS NOT NULL",
    )
});

/// An outbox row: the seqs one commit journaled for a run.
struct OutboxRow {
    run: RunId,
    first_seq: Seq,
    last_seq: Seq,
}

impl BulkRow for OutboxRow {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        query
            .bind(self.run.to_string())
            .bind(self.first_seq)
            .bind(self.last_seq)
    }
}

/// Records commits in the outbox; run only when [`EXPORTING`] said so.
static INSERT_OUTBOX: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        3,
        "WITH v (run, first_seq, last_seq) AS (VALUES {values}) \
         INSERT INTO outbox (run_id, first_seq, last_seq) \
         SELECT run, first_seq, last_seq FROM v WHERE run IS NOT NULL",
    )
});

/// Whether a wave's first statement said that export is on: each row it
/// returns carries `EXISTS (SELECT 1 FROM settings WHERE name = 'export'
/// AND value = 'on')`, which SQLite evaluates once per statement.
fn exporting(rows: &[(String, bool)]) -> bool {
    rows.iter().any(|(_, on)| *on)
}

/// A new task's row.
struct TaskRow<'a> {
    run: RunId,
    insert: &'a Insert,
    now: Millis,
}

impl BulkRow for TaskRow<'_> {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        let task = &self.insert.task;
        let (attempts, visible_at, owner, token) = match &task.lease_to {
            Some(to) => (
                1,
                to.until,
                Some(to.owner.as_str()),
                Some(self.insert.token),
            ),
            None => (0_u32, task.run_at, None, None),
        };
        query
            .bind(self.insert.id.to_string())
            .bind(self.run.to_string())
            .bind(task.kind.as_str())
            .bind(task.step)
            .bind(attempts)
            .bind(task.max_attempts)
            .bind(visible_at)
            .bind(owner)
            .bind(token)
            .bind(self.now)
            .bind(task.priority.get())
            .bind(task.queue.as_ref().map(|q| q.queue.as_str()))
            .bind(task.queue.as_ref().map(|q| q.call_index))
    }
}

/// Inserts tasks.
const TASK_ROWS: &str = "WITH v (id, run, kind, step, attempts, max_attempts, visible_at, owner, \
         token, now, priority, queue, call_index) AS (VALUES {values}) \
     INSERT INTO tasks (id, run_id, kind, step, attempts, max_attempts, visible_at, \
         lease_owner, lease_token, created_at, priority, queue, call_index) \
     SELECT id, run, kind, step, attempts, max_attempts, visible_at, owner, token, now, \
         priority, queue, call_index \
     FROM v WHERE id IS NOT NULL";

static INSERT_TASKS: LazyLock<Bulk> = LazyLock::new(|| Bulk::new(13, TASK_ROWS));

/// Tasks for other runs than the one appended to: a run deleted since
/// (an ended parent past its retention) gets none.
static INSERT_WAKES: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        13,
        &format!("{TASK_ROWS} AND EXISTS (SELECT 1 FROM runs WHERE runs.id = v.run)"),
    )
});

type SubmitCall = Call<Submit, Submitted>;

/// Runs submissions, wave by wave; a wave has each run id and each
/// idempotency key at most once, so a repeated key sees the first run.
pub(super) async fn submit(
    conn: &mut SqliteConnection,
    calls: Vec<&mut SubmitCall>,
    commits: &mut Vec<Committed>,
) -> Result<()> {
    let mut pending = calls;
    while !pending.is_empty() {
        let mut ids = HashSet::with_capacity(pending.len());
        let mut keys = HashSet::new();
        let mut wave = Vec::with_capacity(pending.len());
        let mut later = Vec::new();
        for call in pending {
            let r = &call.request;
            let key = r
                .idempotency_key
                .as_ref()
                .map(|k| (r.tenant.clone(), k.clone()));
            let repeated =
                ids.contains(&r.run_id) || key.as_ref().is_some_and(|k| keys.contains(k));
            if repeated {
                later.push(call);
                continue;
            }
            ids.insert(r.run_id);
            keys.extend(key);
            wave.push(call);
        }
        submit_wave(conn, wave, commits).await?;
        pending = later;
    }
    Ok(())
}

/// The idempotency key of a submission, to look up.
struct KeyRow<'a>(&'a Submit);

impl BulkRow for KeyRow<'_> {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        query
            .bind(self.0.tenant.as_str())
            .bind(self.0.idempotency_key.as_deref())
    }
}

static RUNS_BY_KEY: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        2,
        "WITH v (tenant, key) AS (VALUES {values}) \
         SELECT runs.tenant, runs.idempotency_key, runs.id, runs.agent, runs.input \
         FROM v CROSS JOIN runs ON runs.tenant = v.tenant AND runs.idempotency_key = v.key",
    )
});

/// A run an earlier submission created with the same idempotency key.
#[derive(sqlx::FromRow)]
struct Earlier {
    tenant: String,
    idempotency_key: String,
    id: String,
    agent: String,
    input: String,
}

/// A new run's row.
struct RunRow<'a>(&'a Submit);

impl BulkRow for RunRow<'_> {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        let r = self.0;
        query
            .bind(r.run_id.to_string())
            .bind(r.tenant.as_str())
            .bind(r.agent.as_str())
            .bind(r.version.as_str())
            .bind(Status::Pending.as_str())
            .bind(r.input_json.as_str())
            .bind(r.idempotency_key.as_deref())
            .bind(r.now)
            .bind(r.priority.get())
    }
}

/// Inserts runs whose id is new, returning those ids and whether export is
/// on ([`exporting`]).
static INSERT_RUNS: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        9,
        "WITH v (id, tenant, agent, version, status, input, key, now, priority) \
             AS (VALUES {values}) \
         INSERT INTO runs (id, tenant, agent, version, status, steps, input, input_tokens, \
             output_tokens, last_seq, idempotency_key, created_at, updated_at, priority) \
         SELECT id, tenant, agent, version, status, 0, input, 0, 0, 1, key, now, now, priority \
         FROM v WHERE id IS NOT NULL \
         ON CONFLICT (id) DO NOTHING \
         RETURNING id, EXISTS (SELECT 1 FROM settings WHERE name = 'export' AND value = 'on')",
    )
});

/// Writes a wave of submissions: each creates its run with its first event
/// and task, unless its idempotency key names an earlier run.
async fn submit_wave(
    conn: &mut SqliteConnection,
    wave: Vec<&mut SubmitCall>,
    commits: &mut Vec<Committed>,
) -> Result<()> {
    let keyed: Vec<KeyRow> = wave
        .iter()
        .filter(|c| c.request.idempotency_key.is_some())
        .map(|c| KeyRow(&c.request))
        .collect();
    let found: Vec<Earlier> = bulk::fetch(conn, &RUNS_BY_KEY, &keyed).await?;
    drop(keyed);
    let mut earlier = HashMap::with_capacity(found.len());
    for run in found {
        earlier.insert((run.tenant.clone(), run.idempotency_key.clone()), run);
    }

    let mut new = Vec::with_capacity(wave.len());
    for call in wave {
        let r = &call.request;
        let found = r
            .idempotency_key
            .as_ref()
            .and_then(|key| earlier.get(&(r.tenant.clone(), key.clone())));
        match found {
            None => new.push(call),
            Some(run) => {
                let result = same_request(run, r);
                call.settle(result)?;
            }
        }
    }
    if new.is_empty() {
        return Ok(());
    }

    let rows: Vec<RunRow> = new.iter().map(|c| RunRow(&c.request)).collect();
    let inserted: Vec<(String, bool)> = bulk::fetch(conn, &INSERT_RUNS, &rows).await?;
    drop(rows);
    let mut created = HashSet::with_capacity(inserted.len());
    for (id, _) in &inserted {
        created.insert(parse_id::<RunId>(id, "run id")?);
    }
    let mut accepted = Vec::with_capacity(new.len());
    for call in new {
        if created.contains(&call.request.run_id) {
            accepted.push(call);
        } else {
            let exists = Error::Conflict(format!("run {} already exists", call.request.run_id));
            call.settle(Err(exists))?;
        }
    }

    let mut events = Vec::with_capacity(accepted.len());
    let mut outbox = Vec::with_capacity(accepted.len());
    let mut tasks = Vec::with_capacity(accepted.len());
    for call in &accepted {
        let r = &call.request;
        events.push(EventRow {
            run: r.run_id,
            seq: 1,
            event: &r.event,
            at: r.now,
        });
        outbox.push(OutboxRow {
            run: r.run_id,
            first_seq: 1,
            last_seq: 1,
        });
        tasks.push(r.task.row(r.run_id, r.now));
    }
    bulk::execute(conn, &INSERT_EVENTS, &events).await?;
    if exporting(&inserted) {
        bulk::execute(conn, &INSERT_OUTBOX, &outbox).await?;
    }
    bulk::execute(conn, &INSERT_TASKS, &tasks).await?;
    drop((events, tasks));

    for call in accepted {
        let run_id = call.request.run_id;
        commits.push(Committed {
            run_id,
            last_seq: 1,
            new_work: true,
        });
        call.settle(Ok(Submitted {
            run_id,
            created: true,
        }))?;
    }
    Ok(())
}

/// The earlier run, if this submission repeats its request (same agent and
/// input); a conflict otherwise.
fn same_request(run: &Earlier, r: &Submit) -> Result<Submitted> {
    let run_id: RunId = parse_id(&run.id, "run id")?;
    let input: Value = parse_json(&run.input, &format!("input of run {run_id}"))?;
    if run.agent == r.agent && input == r.input {
        return Ok(Submitted {
            run_id,
            created: false,
        });
    }
    Err(Error::Conflict(format!(
        "idempotency key `{}` was already used for a different request",
        run.idempotency_key
    )))
}

type AppendCall = Call<AppendEvents, Appended>;

/// Runs appends, wave by wave; each wave touches distinct runs.
pub(super) async fn append(
    conn: &mut SqliteConnection,
    calls: Vec<&mut AppendCall>,
    commits: &mut Vec<Committed>,
) -> Result<()> {
    let mut pending = calls;
    while !pending.is_empty() {
        let mut runs = HashSet::with_capacity(pending.len());
        let (wave, later): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|call| runs.insert(call.request.run_id));
        append_wave(conn, wave, commits).await?;
        pending = later;
    }
    Ok(())
}

/// The run row update of one append, with its checks.
struct RunUpdate<'a>(&'a AppendEvents);

impl BulkRow for RunUpdate<'_> {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        let r = self.0;
        let p = &r.projection;
        query
            .bind(r.run_id.to_string())
            .bind(r.expected_seq)
            .bind(r.last_seq())
            .bind(p.status.as_str())
            .bind(p.steps)
            .bind(p.output.as_deref())
            .bind(p.error.as_deref())
            .bind(tokens(p.usage.input_tokens))
            .bind(tokens(p.usage.output_tokens))
            .bind(p.cost_usd)
            .bind(r.now)
            .bind(r.lease.map(|l| l.task_id.to_string()))
            .bind(r.lease.map(|l| l.token))
            .bind(r.redrive.map(|id| id.to_string()))
    }
}

/// Every check of an append folded into the update of its run row: the
/// journal is at the expected seq, the lease (if any) is live on a task of
/// this run, the dead letter to redrive (if any) is this run's. Also returns
/// whether export is on ([`exporting`]).
static UPDATE_RUNS: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        14,
        "WITH v (run, expected, last_seq, status, steps, output, error, input_tokens, \
             output_tokens, cost_usd, now, lease, token, redrive) AS (VALUES {values}) \
         UPDATE runs SET status = v.status, steps = v.steps, output = v.output, \
             error = v.error, input_tokens = v.input_tokens, output_tokens = v.output_tokens, \
             cost_usd = v.cost_usd, last_seq = v.last_seq, updated_at = v.now \
         FROM v \
         WHERE runs.id = v.run AND runs.last_seq = v.expected \
           AND (v.lease IS NULL OR EXISTS (SELECT 1 FROM tasks \
                 WHERE tasks.id = v.lease AND tasks.run_id = runs.id \
                   AND tasks.lease_token = v.token AND tasks.visible_at > v.now)) \
           AND (v.redrive IS NULL OR EXISTS (SELECT 1 FROM dead_letters \
                 WHERE dead_letters.id = v.redrive AND dead_letters.run_id = runs.id)) \
         RETURNING runs.id, \
             EXISTS (SELECT 1 FROM settings WHERE name = 'export' AND value = 'on')",
    )
});

/// Writes a wave of appends to distinct runs.
async fn append_wave(
    conn: &mut SqliteConnection,
    wave: Vec<&mut AppendCall>,
    commits: &mut Vec<Committed>,
) -> Result<()> {
    let updates: Vec<RunUpdate> = wave.iter().map(|c| RunUpdate(&c.request)).collect();
    let passed: Vec<(String, bool)> = bulk::fetch(conn, &UPDATE_RUNS, &updates).await?;
    drop(updates);
    let mut updated = HashSet::with_capacity(passed.len());
    for (id, _) in &passed {
        updated.insert(parse_id::<RunId>(id, "run id")?);
    }

    let mut accepted = Vec::with_capacity(wave.len());
    for call in wave {
        if updated.contains(&call.request.run_id) {
            accepted.push(call);
        } else {
            let refused = refusal(conn, &call.request).await?;
            call.settle(Err(refused))?;
        }
    }
    if accepted.is_empty() {
        return Ok(());
    }

    let mut rows = Rows::default();
    for call in &accepted {
        rows.add(&call.request);
    }
    rows.write(conn, exporting(&passed)).await?;
    drop(rows);

    for call in accepted {
        let r = &call.request;
        let new_work = r.redrive.is_some()
            || !r.wake.is_empty()
            || r.new_tasks.iter().any(|t| t.task.lease_to.is_none());
        for child in &r.spawn {
            commits.push(Committed {
                run_id: child.run_id,
                last_seq: 1,
                new_work: true,
            });
        }
        commits.push(Committed {
            run_id: r.run_id,
            last_seq: r.last_seq(),
            new_work,
        });
        let appended = Appended {
            last_seq: r.last_seq(),
            leased: r
                .new_tasks
                .iter()
                .filter_map(|t| t.leased(r.run_id))
                .collect(),
        };
        call.settle(Ok(appended))?;
    }
    Ok(())
}

const LEASE_HELD: &str = "SELECT 1 FROM tasks \
     WHERE id = ?1 AND run_id = ?2 AND lease_token = ?3 AND visible_at > ?4";
const LAST_SEQ: &str = "SELECT last_seq FROM runs WHERE id = ?1";
const DEAD_LETTER_OF_RUN: &str = "SELECT 1 FROM dead_letters WHERE id = ?1 AND run_id = ?2";

/// Why an append's run update matched no row.
async fn refusal(conn: &mut SqliteConnection, r: &AppendEvents) -> Result<Error> {
    let run = r.run_id.to_string();
    if let Some(lease) = r.lease {
        let held: Option<i64> = sqlx::query_scalar(LEASE_HELD)
            .bind(lease.task_id.to_string())
            .bind(&run)
            .bind(lease.token)
            .bind(r.now)
            .fetch_optional(&mut *conn)
            .await
            .map_err(backend)?;
        if held.is_none() {
            return Ok(Error::LeaseLost(lease.task_id));
        }
    }
    let actual: Option<Seq> = sqlx::query_scalar(LAST_SEQ)
        .bind(&run)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?;
    match actual {
        None => return Ok(Error::NotFound(format!("run {run}"))),
        Some(actual) if actual != r.expected_seq => {
            return Ok(Error::SeqConflict {
                run_id: r.run_id,
                expected: r.expected_seq,
                actual,
            });
        }
        Some(_) => {}
    }
    if let Some(id) = r.redrive {
        let found: Option<i64> = sqlx::query_scalar(DEAD_LETTER_OF_RUN)
            .bind(id.to_string())
            .bind(&run)
            .fetch_optional(&mut *conn)
            .await
            .map_err(backend)?;
        if found.is_none() {
            return Ok(Error::NotFound(format!("dead letter {id} of run {run}")));
        }
    }
    Err(Error::Backend(format!(
        "append to run {run} matched no row although its checks pass"
    )))
}

/// A leased task moving to the dead-letter queue.
struct DeadLetterRow<'a> {
    task: TaskId,
    error: &'a str,
    at: Millis,
}

impl BulkRow for DeadLetterRow<'_> {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        query
            .bind(self.task.to_string())
            .bind(self.error)
            .bind(self.at)
    }
}

static DEAD_LETTER_TASKS: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        3,
        "WITH v (task, error, at) AS (VALUES {values}) \
         INSERT INTO dead_letters \
             (id, run_id, kind, step, attempts, max_attempts, error, created_at, queue, \
             call_index) \
         SELECT tasks.id, tasks.run_id, tasks.kind, tasks.step, tasks.attempts, \
             tasks.max_attempts, v.error, v.at, tasks.queue, tasks.call_index \
         FROM v CROSS JOIN tasks ON tasks.id = v.task",
    )
});

/// A task to delete.
struct TaskIdRow(TaskId);

impl BulkRow for TaskIdRow {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        query.bind(self.0.to_string())
    }
}

static DELETE_TASKS: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        1,
        "WITH v (id) AS (VALUES {values}) DELETE FROM tasks WHERE id IN (SELECT id FROM v)",
    )
});

/// A run whose tasks are all deleted but `keep`.
struct ClearRow {
    run: RunId,
    keep: Option<TaskId>,
}

impl BulkRow for ClearRow {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        query
            .bind(self.run.to_string())
            .bind(self.keep.map(|id| id.to_string()))
    }
}

static CLEAR_TASKS: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        2,
        "WITH v (run, keep) AS (VALUES {values}) \
         DELETE FROM tasks WHERE rowid IN (SELECT tasks.rowid \
             FROM v CROSS JOIN tasks ON tasks.run_id = v.run WHERE tasks.id IS NOT v.keep)",
    )
});

/// Deltas to delete: a run's, of one step or (`None`) of all.
struct PurgeRow {
    run: RunId,
    step: Option<u32>,
}

impl BulkRow for PurgeRow {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        query.bind(self.run.to_string()).bind(self.step)
    }
}

/// Compacts streamed output: the final message is in the journal now.
static PURGE_DELTAS: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        2,
        "WITH v (run, step) AS (VALUES {values}) \
         DELETE FROM deltas WHERE run_id IN (SELECT run FROM v) AND EXISTS (SELECT 1 FROM v \
             WHERE v.run = deltas.run_id AND (v.step IS NULL OR v.step = deltas.step))",
    )
});

/// A dead letter going back to the queue, fresh.
struct RedriveRow {
    id: TaskId,
    now: Millis,
}

impl BulkRow for RedriveRow {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        query.bind(self.id.to_string()).bind(self.now)
    }
}

static REDRIVE: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        2,
        "WITH v (id, now) AS (VALUES {values}) \
         INSERT INTO tasks (id, run_id, kind, step, attempts, max_attempts, visible_at, \
             created_at, priority, queue, call_index) \
         SELECT d.id, d.run_id, d.kind, d.step, 0, d.max_attempts, v.now, v.now, runs.priority, \
             d.queue, d.call_index \
         FROM v CROSS JOIN dead_letters AS d ON d.id = v.id \
         CROSS JOIN runs ON runs.id = d.run_id",
    )
});

static DELETE_DEAD_LETTERS: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        2,
        "WITH v (id, now) AS (VALUES {values}) \
         DELETE FROM dead_letters WHERE id IN (SELECT id FROM v)",
    )
});

/// Everything a wave of accepted appends writes, by statement.
#[derive(Default)]
struct Rows<'a> {
    events: Vec<EventRow<'a>>,
    outbox: Vec<OutboxRow>,
    dead_letters: Vec<DeadLetterRow<'a>>,
    /// Leased tasks that are done (completed or dead-lettered).
    done: Vec<TaskIdRow>,
    clears: Vec<ClearRow>,
    purges: Vec<PurgeRow>,
    redrives: Vec<RedriveRow>,
    tasks: Vec<TaskRow<'a>>,
    /// Tasks for other runs (wake-ups), for those still stored.
    wakes: Vec<TaskRow<'a>>,
    /// Child runs the appends start.
    runs: Vec<RunRow<'a>>,
}

impl<'a> Rows<'a> {
    fn add(&mut self, r: &'a AppendEvents) {
        for (seq, event) in (r.expected_seq + 1..).zip(&r.events) {
            self.events.push(EventRow {
                run: r.run_id,
                seq,
                event,
                at: r.now,
            });
        }
        if !r.events.is_empty() {
            self.outbox.push(OutboxRow {
                run: r.run_id,
                first_seq: r.expected_seq + 1,
                last_seq: r.last_seq(),
            });
        }
        if let Some(lease) = r.lease {
            match &r.task {
                TaskUpdate::Keep => {}
                TaskUpdate::Complete => self.done.push(TaskIdRow(lease.task_id)),
                TaskUpdate::DeadLetter { error } => {
                    self.dead_letters.push(DeadLetterRow {
                        task: lease.task_id,
                        error,
                        at: r.now,
                    });
                    self.done.push(TaskIdRow(lease.task_id));
                }
            }
        }
        if r.clear_tasks {
            self.clears.push(ClearRow {
                run: r.run_id,
                keep: r.lease.map(|l| l.task_id),
            });
        }
        for step in &r.purge {
            self.purges.push(PurgeRow {
                run: r.run_id,
                step: *step,
            });
        }
        if let Some(id) = r.redrive {
            self.redrives.push(RedriveRow { id, now: r.now });
        }
        for insert in &r.new_tasks {
            self.tasks.push(insert.row(r.run_id, r.now));
        }
        for child in &r.spawn {
            self.runs.push(RunRow(child));
            self.events.push(EventRow {
                run: child.run_id,
                seq: 1,
                event: &child.event,
                at: r.now,
            });
            self.outbox.push(OutboxRow {
                run: child.run_id,
                first_seq: 1,
                last_seq: 1,
            });
            self.tasks.push(child.task.row(child.run_id, r.now));
        }
        for (run, insert) in &r.wake {
            self.wakes.push(insert.row(*run, r.now));
        }
    }

    /// In the order one append would write them: a dead letter copies its
    /// task before the task is deleted, and the tasks cleared are the ones
    /// that were there before. Outbox rows only when `export` is on.
    async fn write(&self, conn: &mut SqliteConnection, export: bool) -> Result<()> {
        if !self.runs.is_empty() {
            let inserted: Vec<(String, bool)> = bulk::fetch(conn, &INSERT_RUNS, &self.runs).await?;
            if inserted.len() != self.runs.len() {
                return Err(Error::Conflict(format!(
                    "{} of {} child runs exist already",
                    self.runs.len() - inserted.len(),
                    self.runs.len()
                )));
            }
        }
        bulk::execute(conn, &INSERT_EVENTS, &self.events).await?;
        if export {
            bulk::execute(conn, &INSERT_OUTBOX, &self.outbox).await?;
        }
        bulk::execute(conn, &DEAD_LETTER_TASKS, &self.dead_letters).await?;
        bulk::execute(conn, &DELETE_TASKS, &self.done).await?;
        bulk::execute(conn, &CLEAR_TASKS, &self.clears).await?;
        bulk::execute(conn, &PURGE_DELTAS, &self.purges).await?;
        bulk::execute(conn, &REDRIVE, &self.redrives).await?;
        bulk::execute(conn, &DELETE_DEAD_LETTERS, &self.redrives).await?;
        bulk::execute(conn, &INSERT_TASKS, &self.tasks).await?;
        bulk::execute(conn, &INSERT_WAKES, &self.wakes).await?;
        Ok(())
    }
}
