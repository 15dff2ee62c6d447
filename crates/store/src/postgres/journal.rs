//! Writing runs and their journals: submissions, and appends in bulk.
//!
//! Appends are the hot path, so they are not written one by one. The appends
//! of a batch that touch distinct runs form a wave, and each step of a wave is
//! one statement over all of its rows, bound as arrays and read back with
//! `unnest`: one lock of every leased task (the fence), one conditional
//! update of every run row (the seq check), one insert of every event, one
//! delete of every finished task, one insert of every new task. A wave costs
//! a handful of round trips however many appends it holds. Appends to the
//! same run go to later waves, in arrival order.
//!
//! The insert of a wave's events also inserts, in the same statement, one
//! outbox row per accepted submission or append that journals events; it
//! writes none unless export is switched on (`export`). So the outbox costs
//! no round trip. A run's outbox ids follow its seqs: waves run one after
//! another, each touching a run once, and another process's append to the
//! run waits for this transaction (the run row's lock).
//!
//! Other processes write at the same time, so rows are visited in id order
//! where an order can be chosen, making lock cycles between two batches
//! (deadlocks, which PostgreSQL breaks by failing one) unlikely.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use keel_core::run::Status;
use keel_core::{Millis, Priority, RunId, Seq, TaskId};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::writer::Call;
use super::{backend, parse_json, storable, tokens};
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

/// Journal rows, by column, and the outbox rows of the commits that write
/// them: one per run, naming its first and last seq written.
#[derive(Default)]
struct Events<'a> {
    run: Vec<Uuid>,
    seq: Vec<Seq>,
    kind: Vec<&'static str>,
    data: Vec<&'a str>,
    at: Vec<Millis>,
    outbox: (Vec<Uuid>, Vec<Seq>, Vec<Seq>),
    /// Deltas compacted by these commits: a run's, of a step or (`None`) all.
    purge: (Vec<Uuid>, Vec<Option<i64>>),
}

impl<'a> Events<'a> {
    /// Adds the events one commit journals for a run, from `first_seq` on.
    fn push<I>(&mut self, run: RunId, first_seq: Seq, events: I, at: Millis)
    where
        I: IntoIterator<Item = &'a Encoded>,
    {
        let mut last_seq = first_seq - 1;
        for (seq, event) in (first_seq..).zip(events) {
            self.run.push(run.0);
            self.seq.push(seq);
            self.kind.push(event.kind);
            self.data.push(&event.data);
            self.at.push(at);
            last_seq = seq;
        }
        if last_seq >= first_seq {
            self.outbox.0.push(run.0);
            self.outbox.1.push(first_seq);
            self.outbox.2.push(last_seq);
        }
    }

    async fn write(self, conn: &mut PgConnection) -> Result<()> {
        if self.run.is_empty() {
            return Ok(());
        }
        let (runs, firsts, lasts) = self.outbox;
        let (purge_runs, purge_steps) = self.purge;
        sqlx::query(INSERT_EVENTS)
            .bind(self.run)
            .bind(self.seq)
            .bind(self.kind)
            .bind(self.data)
            .bind(self.at)
            .bind(runs)
            .bind(firsts)
            .bind(lasts)
            .bind(purge_runs)
            .bind(purge_steps)
            .execute(conn)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// Inserts the events and, when export is on, their outbox rows, and
/// deletes the deltas the events compact (a data-modifying `WITH` runs
/// whether referenced or not). The switch is read by this statement, after
/// the run rows were locked: a commit of the run that follows an exported
/// one sees it too.
const INSERT_EVENTS: &str = "WITH journal AS ( \
         INSERT INTO events (run_id, seq, kind, data, at) \
         SELECT run, seq, kind, data::json, at \
         FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::bigint[]) \
             AS v (run, seq, kind, data, at)), \
     compacted AS ( \
         DELETE FROM deltas USING unnest($9::uuid[], $10::bigint[]) AS p (run, step) \
         WHERE deltas.run_id = p.run AND (p.step IS NULL OR deltas.step = p.step)) \
     INSERT INTO outbox (run_id, first_seq, last_seq) \
     SELECT run, first_seq, last_seq \
     FROM unnest($6::uuid[], $7::bigint[], $8::bigint[]) AS o (run, first_seq, last_seq) \
     WHERE EXISTS (SELECT 1 FROM settings WHERE name = 'export' AND value = 'on')";

/// New task rows, by column; a task leased on creation counts its first
/// attempt and is visible when its lease expires.
#[derive(Default)]
struct Tasks<'a> {
    id: Vec<Uuid>,
    run: Vec<Uuid>,
    kind: Vec<&'static str>,
    step: Vec<i64>,
    attempts: Vec<i64>,
    max_attempts: Vec<i64>,
    visible_at: Vec<Millis>,
    owner: Vec<Option<&'a str>>,
    token: Vec<Option<i64>>,
    created_at: Vec<Millis>,
    priority: Vec<i16>,
    queue: Vec<Option<&'a str>>,
    call_index: Vec<Option<i64>>,
}

impl<'a> Tasks<'a> {
    fn push(&mut self, run: RunId, insert: &'a Insert, now: Millis) {
        let task = &insert.task;
        let (attempts, visible_at, owner, token) = match &task.lease_to {
            Some(to) => (1, to.until, Some(to.owner.as_str()), Some(insert.token)),
            None => (0, task.run_at, None, None),
        };
        self.id.push(insert.id.0);
        self.run.push(run.0);
        self.kind.push(task.kind.as_str());
        self.step.push(i64::from(task.step));
        self.attempts.push(attempts);
        self.max_attempts.push(i64::from(task.max_attempts));
        self.visible_at.push(visible_at);
        self.owner.push(owner);
        self.token.push(token);
        self.created_at.push(now);
        self.priority.push(i16::from(task.priority.get()));
        self.queue
            .push(task.queue.as_ref().map(|q| q.queue.as_str()));
        self.call_index
            .push(task.queue.as_ref().map(|q| i64::from(q.call_index)));
    }

    /// Inserts the tasks with `sql` ([`INSERT_TASKS`] or [`INSERT_WAKES`]).
    async fn write(self, conn: &mut PgConnection, sql: &'static str) -> Result<()> {
        if self.id.is_empty() {
            return Ok(());
        }
        sqlx::query(sql)
            .bind(self.id)
            .bind(self.run)
            .bind(self.kind)
            .bind(self.step)
            .bind(self.attempts)
            .bind(self.max_attempts)
            .bind(self.visible_at)
            .bind(self.owner)
            .bind(self.token)
            .bind(self.created_at)
            .bind(self.priority)
            .bind(self.queue)
            .bind(self.call_index)
            .execute(conn)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// Inserts tasks from one array per column (a macro, so that
/// [`INSERT_WAKES`] can extend the literal).
macro_rules! insert_tasks {
    () => {
        "INSERT INTO tasks (id, run_id, kind, step, attempts, max_attempts, visible_at, \
             lease_owner, lease_token, created_at, priority, queue, call_index) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::bigint[], \
             $6::bigint[], $7::bigint[], $8::text[], $9::bigint[], $10::bigint[], \
             $11::smallint[], $12::text[], $13::bigint[])"
    };
}

const INSERT_TASKS: &str = insert_tasks!();

/// Tasks for other runs than the one appended to: a run deleted since
/// (an ended parent past its retention) gets none.
const INSERT_WAKES: &str = concat!(
    insert_tasks!(),
    " AS t (id, run_id, kind, step, attempts, max_attempts, visible_at, lease_owner, \
         lease_token, created_at, priority, queue, call_index) \
     WHERE EXISTS (SELECT 1 FROM runs WHERE runs.id = t.run_id)"
);

type SubmitCall = Call<Submit, Submitted>;

/// Runs submissions, wave by wave; a wave has each run id and each
/// idempotency key at most once, so a repeated key sees the first run.
pub(super) async fn submit(
    conn: &mut PgConnection,
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

/// Runs with these idempotency keys.
const RUNS_BY_KEY: &str = "SELECT runs.tenant, runs.idempotency_key, runs.id, runs.agent, \
         runs.input::text AS input \
     FROM unnest($1::text[], $2::text[]) AS v (tenant, key) \
     JOIN runs ON runs.tenant = v.tenant AND runs.idempotency_key = v.key";

/// A run an earlier submission created with the same idempotency key.
#[derive(sqlx::FromRow)]
struct Earlier {
    tenant: String,
    idempotency_key: String,
    id: Uuid,
    agent: String,
    input: String,
}

/// The runs already created under the keys of these submissions.
async fn runs_by_key(
    conn: &mut PgConnection,
    calls: &[&mut SubmitCall],
) -> Result<HashMap<(String, String), Earlier>> {
    let mut tenants = Vec::new();
    let mut keys = Vec::new();
    for call in calls {
        if let Some(key) = &call.request.idempotency_key {
            tenants.push(call.request.tenant.as_str());
            keys.push(key.as_str());
        }
    }
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let found: Vec<Earlier> = sqlx::query_as(RUNS_BY_KEY)
        .bind(tenants)
        .bind(keys)
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    let mut earlier = HashMap::with_capacity(found.len());
    for run in found {
        earlier.insert((run.tenant.clone(), run.idempotency_key.clone()), run);
    }
    Ok(earlier)
}

/// The earlier run a submission's key names, if any.
fn earlier_of<'e>(
    earlier: &'e HashMap<(String, String), Earlier>,
    r: &Submit,
) -> Option<&'e Earlier> {
    let key = r.idempotency_key.as_ref()?;
    earlier.get(&(r.tenant.clone(), key.clone()))
}

/// Inserts the runs whose id and key are both new, returning their ids. A
/// run another process is inserting with the same id or key makes this wait
/// for its commit, and is then skipped.
const INSERT_RUNS: &str = "INSERT INTO runs (id, tenant, agent, version, status, steps, input, \
         input_tokens, output_tokens, last_seq, idempotency_key, created_at, updated_at, \
         priority) \
     SELECT id, tenant, agent, version, status, 0, input::jsonb, 0, 0, 1, key, now, now, \
         priority \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::bigint[], $9::smallint[]) \
         AS v (id, tenant, agent, version, status, input, key, now, priority) \
     ON CONFLICT DO NOTHING \
     RETURNING id";

/// Inserts the run rows of `new` whose id and key are both new; returns
/// their ids.
async fn insert_runs(conn: &mut PgConnection, new: &[&Submit]) -> Result<Vec<Uuid>> {
    let status = Status::Pending.as_str();
    let inserted: Vec<Uuid> = sqlx::query_scalar(INSERT_RUNS)
        .bind(new.iter().map(|r| r.run_id.0).collect::<Vec<_>>())
        .bind(new.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|r| r.agent.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|r| r.version.as_str()).collect::<Vec<_>>())
        .bind(vec![status; new.len()])
        .bind(
            new.iter()
                .map(|r| r.input_json.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            new.iter()
                .map(|r| r.idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(new.iter().map(|r| r.now).collect::<Vec<_>>())
        .bind(
            new.iter()
                .map(|r| i16::from(r.priority.get()))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(inserted)
}

/// Writes a wave of submissions: each creates its run with its first event
/// and task, unless its idempotency key names an earlier run.
async fn submit_wave(
    conn: &mut PgConnection,
    mut wave: Vec<&mut SubmitCall>,
    commits: &mut Vec<Committed>,
) -> Result<()> {
    // Another process inserting the same keys takes their index locks in the
    // same order.
    wave.sort_by(|a, b| {
        let (a, b) = (&a.request, &b.request);
        (&a.tenant, &a.idempotency_key, a.run_id).cmp(&(&b.tenant, &b.idempotency_key, b.run_id))
    });
    let earlier = runs_by_key(conn, &wave).await?;
    let mut new = Vec::with_capacity(wave.len());
    for call in wave {
        match earlier_of(&earlier, &call.request) {
            None => new.push(call),
            Some(run) => {
                let result = same_request(run, &call.request);
                call.settle(result)?;
            }
        }
    }
    if new.is_empty() {
        return Ok(());
    }

    let requests: Vec<&Submit> = new.iter().map(|c| &c.request).collect();
    let inserted = insert_runs(conn, &requests).await?;
    drop(requests);
    let created: HashSet<Uuid> = inserted.into_iter().collect();

    // Skipped: the id exists, or another process committed the key since
    // it was looked up.
    let (accepted, skipped): (Vec<_>, Vec<_>) = new
        .into_iter()
        .partition(|call| created.contains(&call.request.run_id.0));
    let raced = runs_by_key(conn, &skipped).await?;
    for call in skipped {
        let result = match earlier_of(&raced, &call.request) {
            Some(run) => same_request(run, &call.request),
            None => Err(Error::Conflict(format!(
                "run {} already exists",
                call.request.run_id
            ))),
        };
        call.settle(result)?;
    }
    if accepted.is_empty() {
        return Ok(());
    }

    let mut events = Events::default();
    let mut tasks = Tasks::default();
    for call in &accepted {
        let r = &call.request;
        events.push(r.run_id, 1, [&r.event], r.now);
        tasks.push(r.run_id, &r.task, r.now);
    }
    events.write(conn).await?;
    tasks.write(conn, INSERT_TASKS).await?;

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
    let run_id = RunId(run.id);
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
    conn: &mut PgConnection,
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

/// Locks the run rows of a wave, in id order, before any task row: every
/// transaction that locks both locks the run first (appends here, claims
/// and heartbeats lock no run), so two cannot wait for each other.
const LOCK_RUNS: &str =
    "SELECT id FROM runs WHERE id = ANY($1::uuid[]) ORDER BY id FOR NO KEY UPDATE";

/// Locks the leased tasks whose lease is live, on a task of the run, and
/// returns their ids. A takeover committed meanwhile by another process is
/// seen (the lock re-reads the row), and one not yet made waits for this
/// transaction.
const FENCE: &str = "SELECT tasks.id FROM tasks \
     JOIN unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[]) AS v (id, run, token, now) \
         ON tasks.id = v.id \
     WHERE tasks.run_id = v.run AND tasks.lease_token = v.token AND tasks.visible_at > v.now \
     ORDER BY tasks.id \
     FOR UPDATE OF tasks";

/// The leases of a wave that hold. Without leases, the run update is the
/// wave's first lock.
async fn fence(conn: &mut PgConnection, wave: &[&mut AppendCall]) -> Result<HashSet<Uuid>> {
    let mut ids = Vec::new();
    let mut runs = Vec::new();
    let mut tokens = Vec::new();
    let mut nows = Vec::new();
    for call in wave {
        let r = &call.request;
        if let Some(lease) = r.lease {
            ids.push(lease.task_id.0);
            runs.push(r.run_id.0);
            tokens.push(lease.token);
            nows.push(r.now);
        }
    }
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let wave_runs: Vec<Uuid> = wave.iter().map(|call| call.request.run_id.0).collect();
    sqlx::query(LOCK_RUNS)
        .bind(wave_runs)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    let held: Vec<Uuid> = sqlx::query_scalar(FENCE)
        .bind(ids)
        .bind(runs)
        .bind(tokens)
        .bind(nows)
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(held.into_iter().collect())
}

/// Every other check of an append folded into the update of its run row: the
/// journal is at the expected seq, the dead letter to redrive (if any) is
/// this run's. A concurrent appender in another process holds the row lock
/// until it commits; then the seq it wrote is the one compared.
const UPDATE_RUNS: &str = "UPDATE runs SET status = v.status, outcome = v.outcome, \
         steps = v.steps, output = v.output, error = v.error, input_tokens = v.input_tokens, \
         output_tokens = v.output_tokens, cost_usd = v.cost_usd, last_seq = v.last_seq, \
         updated_at = v.now \
     FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::text[], \
         $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::uuid[], $12::text[], \
         $13::float8[]) \
         AS v (run, expected, last_seq, status, steps, output, error, input_tokens, \
             output_tokens, now, redrive, outcome, cost_usd) \
     WHERE runs.id = v.run AND runs.last_seq = v.expected \
       AND (v.redrive IS NULL OR EXISTS (SELECT 1 FROM dead_letters \
             WHERE dead_letters.id = v.redrive AND dead_letters.run_id = runs.id)) \
     RETURNING runs.id";

/// Updates the run rows of appends whose checks pass; returns their runs.
async fn update_runs(conn: &mut PgConnection, calls: &[&mut AppendCall]) -> Result<HashSet<Uuid>> {
    if calls.is_empty() {
        return Ok(HashSet::new());
    }
    let requests: Vec<&AppendEvents> = calls.iter().map(|c| &c.request).collect();
    let projections = requests.iter().map(|r| &r.projection);
    let updated: Vec<Uuid> = sqlx::query_scalar(UPDATE_RUNS)
        .bind(requests.iter().map(|r| r.run_id.0).collect::<Vec<_>>())
        .bind(requests.iter().map(|r| r.expected_seq).collect::<Vec<_>>())
        .bind(requests.iter().map(|r| r.last_seq()).collect::<Vec<_>>())
        .bind(
            projections
                .clone()
                .map(|p| p.status.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            projections
                .clone()
                .map(|p| i64::from(p.steps))
                .collect::<Vec<_>>(),
        )
        .bind(
            projections
                .clone()
                .map(|p| p.output.as_deref().map(storable))
                .collect::<Vec<_>>(),
        )
        .bind(
            projections
                .clone()
                .map(|p| p.error.as_deref().map(storable))
                .collect::<Vec<_>>(),
        )
        .bind(
            projections
                .clone()
                .map(|p| tokens(p.usage.input_tokens))
                .collect::<Vec<_>>(),
        )
        .bind(
            projections
                .map(|p| tokens(p.usage.output_tokens))
                .collect::<Vec<_>>(),
        )
        .bind(requests.iter().map(|r| r.now).collect::<Vec<_>>())
        .bind(
            requests
                .iter()
                .map(|r| r.redrive.map(|id| id.0))
                .collect::<Vec<_>>(),
        )
        .bind(
            requests
                .iter()
                .map(|r| {
                    let status = r.projection.status;
                    status.is_terminal().then(|| status.as_str())
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            requests
                .iter()
                .map(|r| r.projection.cost_usd)
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(updated.into_iter().collect())
}

/// Writes a wave of appends to distinct runs.
async fn append_wave(
    conn: &mut PgConnection,
    mut wave: Vec<&mut AppendCall>,
    commits: &mut Vec<Committed>,
) -> Result<()> {
    wave.sort_by_key(|call| call.request.run_id);
    let held = fence(conn, &wave).await?;
    let mut fenced = Vec::with_capacity(wave.len());
    for call in wave {
        match call.request.lease {
            Some(lease) if !held.contains(&lease.task_id.0) => {
                call.settle(Err(Error::LeaseLost(lease.task_id)))?;
            }
            _ => fenced.push(call),
        }
    }

    let updated = update_runs(conn, &fenced).await?;
    let mut accepted = Vec::with_capacity(fenced.len());
    for call in fenced {
        if updated.contains(&call.request.run_id.0) {
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
    rows.write(conn).await?;

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

const LAST_SEQ: &str = "SELECT last_seq FROM runs WHERE id = $1";
const DEAD_LETTER_OF_RUN: &str = "SELECT 1 FROM dead_letters WHERE id = $1 AND run_id = $2";

/// Why a fenced append's run update matched no row.
async fn refusal(conn: &mut PgConnection, r: &AppendEvents) -> Result<Error> {
    let run = r.run_id;
    let actual: Option<Seq> = sqlx::query_scalar(LAST_SEQ)
        .bind(run.0)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?;
    match actual {
        None => return Ok(Error::NotFound(format!("run {run}"))),
        Some(actual) if actual != r.expected_seq => {
            return Ok(Error::SeqConflict {
                run_id: run,
                expected: r.expected_seq,
                actual,
            });
        }
        Some(_) => {}
    }
    if let Some(id) = r.redrive {
        let found: Option<i32> = sqlx::query_scalar(DEAD_LETTER_OF_RUN)
            .bind(id.0)
            .bind(run.0)
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

/// Copies leased tasks to the dead-letter queue, with their last error.
const DEAD_LETTER_TASKS: &str = "INSERT INTO dead_letters \
         (id, run_id, kind, step, attempts, max_attempts, error, created_at, queue, call_index) \
     SELECT tasks.id, tasks.run_id, tasks.kind, tasks.step, tasks.attempts, \
         tasks.max_attempts, v.error, v.at, tasks.queue, tasks.call_index \
     FROM unnest($1::uuid[], $2::text[], $3::bigint[]) AS v (task, error, at) \
     JOIN tasks ON tasks.id = v.task";

const DELETE_TASKS: &str = "DELETE FROM tasks WHERE id = ANY($1::uuid[])";

/// Deletes every task of the runs but the one to keep.
const CLEAR_TASKS: &str = "DELETE FROM tasks \
     USING unnest($1::uuid[], $2::uuid[]) AS v (run, keep) \
     WHERE tasks.run_id = v.run AND tasks.id IS DISTINCT FROM v.keep";

/// Puts dead letters back in the queue with fresh attempts, due now, with
/// their run's priority.
const REDRIVE: &str = "INSERT INTO tasks (id, run_id, kind, step, attempts, max_attempts, \
         visible_at, created_at, priority, queue, call_index) \
     SELECT d.id, d.run_id, d.kind, d.step, 0, d.max_attempts, v.now, v.now, runs.priority, \
         d.queue, d.call_index \
     FROM unnest($1::uuid[], $2::bigint[]) AS v (id, now) \
     JOIN dead_letters AS d ON d.id = v.id \
     JOIN runs ON runs.id = d.run_id";

const DELETE_DEAD_LETTERS: &str = "DELETE FROM dead_letters WHERE id = ANY($1::uuid[])";

/// Everything a wave of accepted appends writes, by statement and column.
#[derive(Default)]
struct Rows<'a> {
    events: Events<'a>,
    /// Leased tasks moving to the dead-letter queue, their errors and times.
    dead_letters: (Vec<Uuid>, Vec<Cow<'a, str>>, Vec<Millis>),
    /// Leased tasks that are done (completed or dead-lettered).
    done: Vec<Uuid>,
    /// Runs whose tasks are cleared, and the task each keeps.
    clears: (Vec<Uuid>, Vec<Option<Uuid>>),
    /// Dead letters going back to the queue, and when.
    redrives: (Vec<Uuid>, Vec<Millis>),
    tasks: Tasks<'a>,
    /// Tasks for other runs (wake-ups), for those still stored.
    wakes: Tasks<'a>,
    /// Child runs the appends start.
    runs: Vec<&'a Submit>,
}

impl<'a> Rows<'a> {
    fn add(&mut self, r: &'a AppendEvents) {
        self.events
            .push(r.run_id, r.expected_seq + 1, &r.events, r.now);
        for step in &r.purge {
            self.events.purge.0.push(r.run_id.0);
            self.events.purge.1.push(step.map(i64::from));
        }
        if let Some(lease) = r.lease {
            match &r.task {
                TaskUpdate::Keep => {}
                TaskUpdate::Complete => self.done.push(lease.task_id.0),
                TaskUpdate::DeadLetter { error } => {
                    self.dead_letters.0.push(lease.task_id.0);
                    self.dead_letters.1.push(storable(error));
                    self.dead_letters.2.push(r.now);
                    self.done.push(lease.task_id.0);
                }
            }
        }
        if r.clear_tasks {
            self.clears.0.push(r.run_id.0);
            self.clears.1.push(r.lease.map(|l| l.task_id.0));
        }
        if let Some(id) = r.redrive {
            self.redrives.0.push(id.0);
            self.redrives.1.push(r.now);
        }
        for insert in &r.new_tasks {
            self.tasks.push(r.run_id, insert, r.now);
        }
        for child in &r.spawn {
            self.runs.push(child);
            self.events.push(child.run_id, 1, [&child.event], r.now);
            self.tasks.push(child.run_id, &child.task, r.now);
        }
        for (run, insert) in &r.wake {
            self.wakes.push(*run, insert, r.now);
        }
    }

    /// In the order one append would write them: a dead letter copies its
    /// task before the task is deleted, and the tasks cleared are the ones
    /// that were there before.
    async fn write(self, conn: &mut PgConnection) -> Result<()> {
        if !self.runs.is_empty() {
            let inserted = insert_runs(conn, &self.runs).await?;
            if inserted.len() != self.runs.len() {
                return Err(Error::Conflict(format!(
                    "{} of {} child runs exist already",
                    self.runs.len() - inserted.len(),
                    self.runs.len()
                )));
            }
        }
        self.events.write(conn).await?;
        if !self.dead_letters.0.is_empty() {
            let (ids, errors, ats) = self.dead_letters;
            sqlx::query(DEAD_LETTER_TASKS)
                .bind(ids)
                .bind(errors)
                .bind(ats)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
        }
        if !self.done.is_empty() {
            sqlx::query(DELETE_TASKS)
                .bind(self.done)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
        }
        if !self.clears.0.is_empty() {
            let (runs, keeps) = self.clears;
            sqlx::query(CLEAR_TASKS)
                .bind(runs)
                .bind(keeps)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
        }
        if !self.redrives.0.is_empty() {
            let (ids, nows) = self.redrives;
            sqlx::query(REDRIVE)
                .bind(&ids)
                .bind(nows)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
            sqlx::query(DELETE_DEAD_LETTERS)
                .bind(ids)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
        }
        self.tasks.write(conn, INSERT_TASKS).await?;
        self.wakes.write(conn, INSERT_WAKES).await
    }
}
