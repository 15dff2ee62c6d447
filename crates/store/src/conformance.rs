//! The behaviour every backend must have, written once as generic test
//! bodies (`async fn name<S: Store>(store: S)`) and stamped out for each
//! backend by `store_suite!`. A store change starts with a test here.
//!
//! Time is passed explicitly (`now`), so lease expiry is tested without
//! sleeping.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use keel_core::breaker::Phase;
use keel_core::event::ParentLink;
use keel_core::message::Usage;
use keel_core::run::Status;
use keel_core::spec::Spec;
use keel_core::{Event, Millis, Priority, Recorded, RunId, Seq, TaskId};
use serde_json::{Value, json};

use crate::{
    Append, BreakerRecord, Committed, Delta, DeltaAttempt, DeltaBatch, DeltaPos, Error,
    ExportStatus, Grant, Lease, LeaseTo, NewTask, OutboxEntry, Projection, Purge, Purged,
    QueuedCall, Rate, Registered, RelayHolder, Result, RunFilter, RunRef, RunTask, Store,
    Submission, Submitted, Task, TaskKind, TaskUpdate, ToolCallDelta, UsageTotals,
};

/// Stamps out a `#[tokio::test]` per conformance test for one backend.
/// `$open` is an `async` block giving `Result<Option<(store, guard)>>`; the
/// guard lives until the test ends (e.g. it deletes a temporary database),
/// and `None` skips the test (its database server is not there).
macro_rules! store_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            store_suite!(@tests $open;
                submit_and_read,
                racing_submits_share_a_key,
                stale_append_is_refused,
                events_keep_any_text,
                run_rows_take_any_text,
                racing_appends_have_one_winner,
                claim_is_exclusive,
                expired_lease_is_taken_over_and_fenced,
                heartbeat_extends_only_live_leases,
                retry_later_hides_the_task,
                defer_does_not_count_an_attempt,
                claims_follow_priority_without_starving,
                priority_survives_retry_defer_release_and_redrive,
                dead_letter_and_redrive,
                stats_count_tasks_runs_and_dead_letters,
                release_all_gives_leases_back,
                tasks_leased_on_creation,
                terminal_append_clears_tasks,
                purge_deletes_ended_runs_with_all_they_left,
                purge_keeps_what_is_still_needed,
                list_runs_filters_and_pages,
                parked_runs_page_by_cursor,
                agent_versions,
                subscribers_hear_commits,
                outbox_exports_commits_once_enabled,
                outbox_keeps_each_runs_order,
                relay_lease_is_exclusive,
                disable_export_drops_the_backlog,
                export_enabled_again_exports_new_commits_only,
                export_status_counts_the_backlog_and_shows_the_relay,
                pending_runs_count_unfinished_runs,
                usage_sums_runs_by_agent_and_time,
                limits_space_grants_after_a_burst,
                limits_reserve_within_max_wait,
                limits_adjust_to_real_costs,
                limits_hold_closes_a_key,
                limits_count_the_active_keys_under_a_prefix,
                deltas_are_fenced_ordered_and_announced,
                deltas_are_compacted_by_the_journal,
                breakers_keep_each_endpoints_latest_transition,
                appends_spawn_child_runs_and_wake_other_runs,
                queued_tasks_are_leased_from_their_queue_only,
            );

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "throughput check: cargo test -p keel-store -- --ignored --nocapture"]
            async fn write_throughput() -> Result<()> {
                let Some((store, _guard)) = $open.await? else {
                    return Ok(());
                };
                super::write_throughput(store).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "throughput check: cargo test -p keel-store -- --ignored --nocapture"]
            async fn purge_throughput() -> Result<()> {
                let Some((store, _guard)) = $open.await? else {
                    return Ok(());
                };
                super::purge_throughput(store).await
            }
        }
    };
    (@tests $open:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> Result<()> {
                let Some((store, _guard)) = $open.await? else {
                    return Ok(());
                };
                super::$name(store).await
            }
        )+
    };
}

/// A time to start tests at.
const T0: Millis = 1_700_000_000_000;
/// A lease long enough not to expire during a test.
const LEASE: Duration = Duration::from_secs(60);
const LEASE_MS: Millis = LEASE.as_millis() as Millis;

fn submission(tenant: &str, agent: &str, input: Value, key: Option<&str>) -> Submission {
    Submission {
        run_id: RunId::new(),
        tenant: tenant.to_string(),
        agent: agent.to_string(),
        version: "1".to_string(),
        input: input.clone(),
        idempotency_key: key.map(str::to_string),
        priority: Priority::DEFAULT,
        event: Event::RunSubmitted {
            tenant: tenant.to_string(),
            agent: agent.to_string(),
            version: "1".to_string(),
            input,
            priority: Priority::DEFAULT,
            parent: None,
            callback_url: None,
        },
        task: new_task(TaskKind::Llm, T0),
        now: T0,
    }
}

fn new_task(kind: TaskKind, run_at: Millis) -> NewTask {
    NewTask {
        kind,
        step: 1,
        priority: Priority::DEFAULT,
        max_attempts: 3,
        run_at,
        lease_to: None,
        queue: None,
    }
}

/// Submits a run of agent `a` in tenant `t` with `priority`, due at `run_at`.
async fn submit_prioritized<S: Store>(store: &S, run_at: Millis, priority: u8) -> Result<RunId> {
    let priority = Priority::new(i64::from(priority)).expect("a priority in 0..=9");
    let mut sub = submission("t", "a", json!("hello"), None);
    sub.priority = priority;
    sub.task.priority = priority;
    sub.task.run_at = run_at;
    let run_id = sub.run_id;
    store.submit(sub).await?;
    assert_eq!(
        store.get_run(run_id).await?.map(|r| r.priority),
        Some(priority)
    );
    Ok(run_id)
}

/// The runs of claimed tasks.
fn runs_of(tasks: &[Task]) -> HashSet<RunId> {
    tasks.iter().map(|t| t.run_id).collect()
}

/// Submits a run of agent `a` in tenant `t`, due at `run_at`.
async fn submit_run<S: Store>(store: &S, run_at: Millis) -> Result<RunId> {
    let mut sub = submission("t", "a", json!("hello"), None);
    sub.task.run_at = run_at;
    let run_id = sub.run_id;
    store.submit(sub).await?;
    Ok(run_id)
}

fn projection(status: Status) -> Projection {
    Projection {
        status,
        steps: 0,
        output: None,
        error: None,
        usage: Usage::default(),
        cost_usd: 0.0,
    }
}

fn rejected(step: u32, error: &str) -> Event {
    Event::LlmRejected {
        step,
        error: error.to_string(),
    }
}

/// An append of `events` that changes nothing else.
fn append(run_id: RunId, expected_seq: Seq, lease: Option<Lease>, events: Vec<Event>) -> Append {
    Append {
        run_id,
        expected_seq,
        events,
        lease,
        task: TaskUpdate::Keep,
        new_tasks: Vec::new(),
        clear_tasks: false,
        redrive: None,
        projection: projection(Status::AwaitingLlm),
        now: T0 + 1,
        spawn: Vec::new(),
        wake: Vec::new(),
    }
}

/// An append dead-lettering a leased task of `run_id` (its attempt gave up).
fn give_up(run_id: RunId, expected_seq: Seq, lease: Lease) -> Append {
    let mut park = append(
        run_id,
        expected_seq,
        Some(lease),
        vec![Event::TaskDeadLettered {
            task_id: lease.task_id,
            kind: "llm".to_string(),
            step: 1,
            attempts: 1,
            error: "gave up".to_string(),
        }],
    );
    park.task = TaskUpdate::DeadLetter {
        error: "gave up".to_string(),
    };
    park
}

/// An append completing `run_id` with `output` (and its leased task, if
/// any); the run's other tasks are cleared.
fn completion(run_id: RunId, expected_seq: Seq, lease: Option<Lease>, output: &str) -> Append {
    let mut end = append(
        run_id,
        expected_seq,
        lease,
        vec![Event::RunCompleted {
            output: output.into(),
        }],
    );
    if lease.is_some() {
        end.task = TaskUpdate::Complete;
    }
    end.clear_tasks = true;
    end.projection = projection(Status::Completed);
    end
}

/// Claims exactly one task.
async fn claim_one<S: Store>(store: &S, owner: &str, lease: Duration, now: Millis) -> Result<Task> {
    let mut tasks = store.claim(owner, 1, lease, now).await?;
    assert_eq!(tasks.len(), 1, "{owner} expected one task at {now}");
    Ok(tasks.remove(0))
}

async fn event_count<S: Store>(store: &S, run_id: RunId) -> Result<usize> {
    Ok(store.events(run_id, 0, 1000).await?.len())
}

pub(crate) async fn submit_and_read<S: Store>(store: S) -> Result<()> {
    let sub = submission("acme", "a", json!({"q": 1}), Some("k1"));
    let run_id = sub.run_id;
    let got = store.submit(sub.clone()).await?;
    assert_eq!(
        got,
        Submitted {
            run_id,
            created: true
        }
    );

    let run = store.get_run(run_id).await?.expect("the run is stored");
    assert_eq!(run.id, run_id);
    assert_eq!(
        (
            run.tenant.as_str(),
            run.agent.as_str(),
            run.version.as_str()
        ),
        ("acme", "a", "1")
    );
    assert_eq!(run.input, json!({"q": 1}));
    assert_eq!(run.priority, Priority::DEFAULT);
    assert_eq!(run.projection, projection(Status::Pending));
    assert_eq!((run.last_seq, run.created_at, run.updated_at), (1, T0, T0));
    let events = store.events(run_id, 0, 100).await?;
    let first = Recorded {
        seq: 1,
        at: T0,
        event: sub.event.clone(),
    };
    assert_eq!(events, vec![first]);
    assert!(store.events(run_id, 1, 100).await?.is_empty());

    // The same key and request: the earlier run, nothing new.
    let again = Submission {
        run_id: RunId::new(),
        ..sub.clone()
    };
    let got = store.submit(again.clone()).await?;
    assert_eq!(
        got,
        Submitted {
            run_id,
            created: false
        }
    );
    assert!(store.get_run(again.run_id).await?.is_none());

    // The same key with another input is refused.
    let different = Submission {
        run_id: RunId::new(),
        input: json!({"q": 2}),
        ..sub.clone()
    };
    match store.submit(different.clone()).await {
        Err(Error::Conflict(message)) => assert!(message.contains("`k1`"), "{message}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(store.get_run(different.run_id).await?.is_none());

    // Keys are per tenant.
    let other_tenant = Submission {
        run_id: RunId::new(),
        tenant: "other".to_string(),
        ..sub.clone()
    };
    assert!(store.submit(other_tenant.clone()).await?.created);

    // Each created run queued its first task.
    let tasks = store.claim("w", 10, LEASE, T0).await?;
    let runs: HashSet<RunId> = tasks.iter().map(|t| t.run_id).collect();
    assert_eq!(runs, HashSet::from([run_id, other_tenant.run_id]));
    for task in &tasks {
        assert_eq!((task.kind, task.step, task.attempts), (TaskKind::Llm, 1, 1));
        assert_eq!((task.max_attempts, task.lease_until), (3, T0 + LEASE_MS));
    }

    assert!(store.get_run(RunId::new()).await?.is_none());
    assert!(store.events(RunId::new(), 0, 100).await?.is_empty());
    Ok(())
}

pub(crate) async fn racing_submits_share_a_key<S: Store>(store: S) -> Result<()> {
    let mut racers = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        // Half repeat one request, half send another one under the same key.
        let input = if i % 2 == 0 { json!("same") } else { json!(i) };
        let sub = submission("t", "a", input, Some("shared"));
        racers.push(tokio::spawn(async move { store.submit(sub).await }));
    }
    let mut created = Vec::new();
    let mut repeated = Vec::new();
    let mut conflicts = 0;
    for racer in racers {
        match racer.await.expect("racer panicked") {
            Ok(Submitted {
                run_id,
                created: true,
            }) => created.push(run_id),
            Ok(Submitted { run_id, .. }) => repeated.push(run_id),
            Err(Error::Conflict(_)) => conflicts += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(created.len(), 1, "one run per key");
    assert!(repeated.iter().all(|id| *id == created[0]));
    assert_eq!(created.len() + repeated.len() + conflicts, 20);
    let runs = store
        .list_runs(RunFilter {
            tenant: "t".to_string(),
            limit: 100,
            ..RunFilter::default()
        })
        .await?;
    assert_eq!(runs.len(), 1);

    // A run id that exists is refused, not overwritten.
    let first = submission("t", "a", json!(1), None);
    store.submit(first.clone()).await?;
    let again = Submission {
        input: json!(2),
        ..first.clone()
    };
    assert!(matches!(store.submit(again).await, Err(Error::Conflict(_))));
    let run = store.get_run(first.run_id).await?.expect("run");
    assert_eq!(run.input, json!(1));
    Ok(())
}

pub(crate) async fn stale_append_is_refused<S: Store>(store: S) -> Result<()> {
    let run_id = submit_run(&store, T0).await?;
    let task = claim_one(&store, "w", LEASE, T0).await?;

    let stale = append(run_id, 0, Some(task.lease), vec![rejected(1, "x")]);
    match store.append(stale).await {
        Err(Error::SeqConflict {
            run_id: id,
            expected: 0,
            actual: 1,
        }) if id == run_id => {}
        other => panic!("expected a seq conflict, got {other:?}"),
    }
    let run = store.get_run(run_id).await?.expect("run");
    assert_eq!((run.last_seq, run.projection.status), (1, Status::Pending));
    assert_eq!(event_count(&store, run_id).await?, 1);

    let unknown = append(RunId::new(), 1, None, vec![rejected(1, "x")]);
    assert!(matches!(
        store.append(unknown).await,
        Err(Error::NotFound(_))
    ));

    let mut good = append(
        run_id,
        1,
        Some(task.lease),
        vec![rejected(1, "a"), rejected(1, "b")],
    );
    good.projection = Projection {
        status: Status::AwaitingTool,
        steps: 1,
        output: None,
        error: Some("e".to_string()),
        usage: Usage {
            input_tokens: 10,
            output_tokens: 20,
        },
        cost_usd: 0.125,
    };
    let appended = store.append(good.clone()).await?;
    assert_eq!(appended.last_seq, 3);
    assert!(appended.leased.is_empty());
    let events = store.events(run_id, 1, 100).await?;
    let seqs: Vec<Seq> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![2, 3]);
    assert_eq!(events[1].event, rejected(1, "b"));
    assert_eq!(events[1].at, T0 + 1);
    assert_eq!(store.events(run_id, 0, 2).await?.len(), 2, "limit");
    let run = store.get_run(run_id).await?.expect("run");
    assert_eq!(run.projection, good.projection);
    assert_eq!((run.last_seq, run.updated_at), (3, T0 + 1));

    // The same append again is stale now.
    assert!(matches!(
        store.append(good).await,
        Err(Error::SeqConflict { actual: 3, .. })
    ));

    // No events: only the projection changes.
    let mut finish = append(run_id, 3, None, Vec::new());
    finish.projection = Projection {
        status: Status::Completed,
        output: Some("done".to_string()),
        ..projection(Status::Completed)
    };
    assert_eq!(store.append(finish).await?.last_seq, 3);
    let run = store.get_run(run_id).await?.expect("run");
    assert_eq!(run.projection.status, Status::Completed);
    assert_eq!(run.projection.output.as_deref(), Some("done"));
    assert_eq!(event_count(&store, run_id).await?, 3);
    Ok(())
}

pub(crate) async fn events_keep_any_text<S: Store>(store: S) -> Result<()> {
    let run_id = submit_run(&store, T0).await?;
    // What a model or a tool may answer: NUL and other control characters,
    // quotes, backslashes, escapes, non-ASCII, text that looks like JSON.
    let texts = [
        "nul \u{0} inside",
        "\u{1}\u{1f}\t\r\n\\ \" ' \\u0000",
        "héllo wörld ✓ 🦀 \u{fffd}",
        "{\"a\": 1, \"a\": 2}",
        "",
    ];
    let events: Vec<Event> = texts.iter().map(|text| rejected(1, text)).collect();
    store
        .append(append(run_id, 1, None, events.clone()))
        .await?;
    let stored: Vec<Event> = store
        .events(run_id, 1, 100)
        .await?
        .into_iter()
        .map(|recorded| recorded.event)
        .collect();
    assert_eq!(stored, events);
    Ok(())
}

pub(crate) async fn run_rows_take_any_text<S: Store>(store: S) -> Result<()> {
    // What a client or a model may send: U+0000 in an input (a string and a
    // key), in a run's output and error, a retry's reason, a dead letter's
    // error. The journal keeps it; a row copy may hold U+FFFD instead
    // (PostgreSQL's text and jsonb refuse U+0000), but every write goes in.
    let nul = "nul \u{0} inside";
    let same = |stored: &str| stored == nul || stored == nul.replace('\u{0}', "\u{fffd}");
    let input = json!({"text": nul, nul: [nul]});
    let sub = submission("t", "a", input.clone(), Some("nul-key"));
    let run_id = sub.run_id;
    store.submit(sub).await?;
    // The same request again is the same run, whatever the row holds.
    let again = store
        .submit(submission("t", "a", input.clone(), Some("nul-key")))
        .await?;
    assert_eq!((again.run_id, again.created), (run_id, false));
    let events = store.events(run_id, 0, 10).await?;
    assert!(
        matches!(&events[0].event, Event::RunSubmitted { input: journaled, .. } if *journaled == input)
    );
    let run = store.get_run(run_id).await?.expect("run");
    assert!(
        same(run.input["text"].as_str().unwrap_or("")),
        "{}",
        run.input
    );

    let task = claim_one(&store, "a", LEASE, T0).await?;
    store.retry_later(task.lease, nul, T0 + 1, T0).await?;
    let task = claim_one(&store, "a", LEASE, T0 + 1).await?;
    let mut step = append(run_id, 1, Some(task.lease), vec![rejected(1, nul)]);
    step.projection.output = Some(nul.to_string());
    step.projection.error = Some(nul.to_string());
    step.task = TaskUpdate::DeadLetter {
        error: nul.to_string(),
    };
    store.append(step).await?;
    let run = store.get_run(run_id).await?.expect("run");
    assert!(same(run.projection.output.as_deref().unwrap_or("")));
    assert!(same(run.projection.error.as_deref().unwrap_or("")));
    let letters = store.dead_letters("t", 10).await?;
    assert!(same(&letters[0].error), "{}", letters[0].error);
    assert_eq!(
        store.events(run_id, 1, 10).await?[0].event,
        rejected(1, nul)
    );
    Ok(())
}

pub(crate) async fn racing_appends_have_one_winner<S: Store>(store: S) -> Result<()> {
    let mut runs = Vec::new();
    for _ in 0..8 {
        runs.push(submit_run(&store, T0).await?);
    }
    let mut racers = Vec::new();
    for &run_id in &runs {
        for i in 0..16 {
            let store = store.clone();
            racers.push(tokio::spawn(async move {
                let event = rejected(1, &format!("racer {i}"));
                store.append(append(run_id, 1, None, vec![event])).await
            }));
        }
    }
    let mut won = 0;
    for racer in racers {
        match racer.await.expect("racer panicked") {
            Ok(appended) => {
                assert_eq!(appended.last_seq, 2);
                won += 1;
            }
            Err(Error::SeqConflict { actual: 2, .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(won, runs.len(), "exactly one winner per run");
    for run_id in runs {
        assert_eq!(event_count(&store, run_id).await?, 2);
        assert_eq!(store.get_run(run_id).await?.expect("run").last_seq, 2);
    }
    Ok(())
}

pub(crate) async fn claim_is_exclusive<S: Store>(store: S) -> Result<()> {
    const RUNS: usize = 60;
    for _ in 0..RUNS {
        submit_run(&store, T0).await?;
    }
    let mut owners = Vec::new();
    for owner in ["a", "b", "c"] {
        let store = store.clone();
        owners.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let tasks = store.claim(owner, 7, LEASE, T0).await?;
                if tasks.is_empty() {
                    return Ok::<_, Error>(ids);
                }
                ids.extend(tasks.iter().map(|t| t.lease.task_id));
            }
        }));
    }
    let mut seen = HashSet::new();
    for owner in owners {
        for id in owner.await.expect("owner panicked")? {
            assert!(seen.insert(id), "task {id} claimed twice");
        }
    }
    assert_eq!(seen.len(), RUNS);
    assert!(store.claim("d", 10, LEASE, T0).await?.is_empty());
    Ok(())
}

pub(crate) async fn expired_lease_is_taken_over_and_fenced<S: Store>(store: S) -> Result<()> {
    let run_id = submit_run(&store, T0).await?;
    let first = claim_one(&store, "a", Duration::from_secs(1), T0).await?;
    assert_eq!((first.attempts, first.lease_until), (1, T0 + 1000));
    assert!(store.claim("b", 1, LEASE, T0 + 999).await?.is_empty());
    assert_eq!(store.next_due(T0).await?, Some(T0 + 1000));

    let second = claim_one(&store, "b", LEASE, T0 + 1000).await?;
    assert_eq!(second.lease.task_id, first.lease.task_id);
    assert_ne!(second.lease.token, first.lease.token);
    assert_eq!(second.attempts, 2);

    // The first owner is fenced off.
    let mut stale = append(run_id, 1, Some(first.lease), vec![rejected(1, "a")]);
    stale.now = T0 + 1001;
    match store.append(stale).await {
        Err(Error::LeaseLost(id)) => assert_eq!(id, first.lease.task_id),
        other => panic!("expected a lost lease, got {other:?}"),
    }
    assert!(matches!(
        store
            .retry_later(first.lease, "x", T0 + 5000, T0 + 1001)
            .await,
        Err(Error::LeaseLost(_))
    ));
    assert_eq!(
        store
            .heartbeat(&[first.lease], T0 + 9000, T0 + 1001)
            .await?,
        0
    );
    assert_eq!(event_count(&store, run_id).await?, 1);

    // The new owner goes on.
    let mut step = append(run_id, 1, Some(second.lease), vec![rejected(1, "b")]);
    step.now = T0 + 1001;
    step.task = TaskUpdate::Complete;
    step.new_tasks = vec![new_task(TaskKind::Tools, T0 + 1001)];
    assert_eq!(store.append(step).await?.last_seq, 2);
    let next = claim_one(&store, "c", LEASE, T0 + 1001).await?;
    assert_eq!((next.kind, next.run_id), (TaskKind::Tools, run_id));
    assert!(store.claim("c", 10, LEASE, T0 + 1001).await?.is_empty());

    // A lease on a completed task is lost too.
    let mut late = append(run_id, 2, Some(second.lease), vec![rejected(1, "late")]);
    late.now = T0 + 1002;
    assert!(matches!(store.append(late).await, Err(Error::LeaseLost(_))));
    Ok(())
}

pub(crate) async fn heartbeat_extends_only_live_leases<S: Store>(store: S) -> Result<()> {
    let run1 = submit_run(&store, T0).await?;
    let run2 = submit_run(&store, T0 + 100).await?;
    let task1 = claim_one(&store, "a", Duration::from_secs(1), T0).await?;
    assert_eq!(task1.run_id, run1);
    let task2 = claim_one(&store, "a", Duration::from_secs(1), T0 + 900).await?;
    assert_eq!(task2.run_id, run2);
    // a holds task3 too, but does not name it (it lost the claim's answer).
    let run3 = submit_run(&store, T0 + 200).await?;
    let task3 = claim_one(&store, "a", Duration::from_secs(1), T0 + 900).await?;
    assert_eq!(task3.run_id, run3);

    // task1's lease expired at T0+1000; task2's lives until T0+1900.
    let named = [task1.lease, task2.lease];
    assert_eq!(store.heartbeat(&named, T0 + 5000, T0 + 1500).await?, 1);
    let taken = store.claim("b", 10, LEASE, T0 + 1500).await?;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].lease.task_id, task1.lease.task_id);
    // task3's lease was not extended: it expires as claimed.
    let taken = store.claim("b", 10, LEASE, T0 + 1900).await?;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].lease.task_id, task3.lease.task_id);

    // task2 is still a's, and a can still write under it.
    assert!(store.claim("b", 10, LEASE, T0 + 4999).await?.is_empty());
    let mut step = append(run2, 1, Some(task2.lease), vec![rejected(1, "x")]);
    step.now = T0 + 4000;
    assert_eq!(store.append(step).await?.last_seq, 2);
    assert_eq!(store.next_due(T0 + 4000).await?, Some(T0 + 5000));
    let again = claim_one(&store, "b", LEASE, T0 + 5000).await?;
    assert_eq!(again.lease.task_id, task2.lease.task_id);
    Ok(())
}

pub(crate) async fn retry_later_hides_the_task<S: Store>(store: S) -> Result<()> {
    submit_run(&store, T0).await?;
    let task = claim_one(&store, "a", LEASE, T0).await?;
    store
        .retry_later(task.lease, "boom", T0 + 10_000, T0 + 10)
        .await?;
    assert!(store.claim("a", 10, LEASE, T0 + 9_999).await?.is_empty());
    assert_eq!(store.next_due(T0 + 10).await?, Some(T0 + 10_000));
    let again = claim_one(&store, "b", LEASE, T0 + 10_000).await?;
    assert_eq!(again.lease.task_id, task.lease.task_id);
    assert_eq!(again.attempts, 2);
    // The old lease was given back: it fences nothing any more.
    assert!(matches!(
        store
            .retry_later(task.lease, "x", T0 + 20_000, T0 + 10_001)
            .await,
        Err(Error::LeaseLost(_))
    ));
    Ok(())
}

pub(crate) async fn defer_does_not_count_an_attempt<S: Store>(store: S) -> Result<()> {
    let run_id = submit_run(&store, T0).await?;
    let mut task = claim_one(&store, "a", LEASE, T0).await?;
    let mut now = T0;
    for deferred in 1..=5 {
        now += 1_000;
        let until = now + 500;
        let given_back = task.lease;
        store.defer(given_back, until, "throttled", now).await?;
        // The lease was given back: it fences nothing any more.
        assert!(matches!(
            store.defer(given_back, until, "again", now).await,
            Err(Error::LeaseLost(id)) if id == given_back.task_id
        ));
        assert!(store.claim("b", 10, LEASE, until - 1).await?.is_empty());
        assert_eq!(store.next_due(now).await?, Some(until));
        task = claim_one(&store, "b", LEASE, until).await?;
        assert_eq!(
            (task.lease.task_id, task.attempts),
            (given_back.task_id, 1),
            "after {deferred} deferrals"
        );
    }

    // A failure still counts; an expired lease cannot defer.
    now += 1_000;
    store.retry_later(task.lease, "boom", now, now).await?;
    let task = claim_one(&store, "c", Duration::from_secs(1), now).await?;
    assert_eq!(task.attempts, 2);
    assert!(matches!(
        store
            .defer(task.lease, now + 5_000, "late", now + 1_000)
            .await,
        Err(Error::LeaseLost(_))
    ));
    now += 1_000;
    let task = claim_one(&store, "d", LEASE, now).await?;
    assert_eq!(task.attempts, 3);

    // A task leased on creation counted its first attempt: deferring it
    // takes that back too.
    let mut step = append(run_id, 1, Some(task.lease), vec![rejected(1, "x")]);
    step.now = now + 1;
    step.task = TaskUpdate::Complete;
    step.new_tasks = vec![NewTask {
        lease_to: Some(LeaseTo::new("d", now + LEASE_MS)),
        ..new_task(TaskKind::Tools, now + 1)
    }];
    let leased = store.append(step).await?.leased.remove(0);
    assert_eq!(leased.attempts, 1);
    store
        .defer(leased.lease, now + 1_000, "throttled", now + 2)
        .await?;
    let again = claim_one(&store, "e", LEASE, now + 1_000).await?;
    assert_eq!(
        (again.lease.task_id, again.attempts),
        (leased.lease.task_id, 1)
    );
    Ok(())
}

/// [`crate::PRIORITY_CREDIT`] in millis.
const CREDIT: Millis = crate::PRIORITY_CREDIT.as_millis() as Millis;

pub(crate) async fn claims_follow_priority_without_starving<S: Store>(store: S) -> Result<()> {
    // Ranks (due - priority x credit), lowest first: high_new T0-3c,
    // mid T0-2c, low_old T0, high_late T0+c, low_a T0+2c, low_b T0+2.1c.
    let low_old = submit_prioritized(&store, T0, 0).await?;
    let mid = submit_prioritized(&store, T0 + 3 * CREDIT, 5).await?;
    let high_new = submit_prioritized(&store, T0 + 6 * CREDIT, 9).await?;
    let high_late = submit_prioritized(&store, T0 + 10 * CREDIT, 9).await?;
    let low_b = submit_prioritized(&store, T0 + 2 * CREDIT + CREDIT / 10, 0).await?;
    let low_a = submit_prioritized(&store, T0 + 2 * CREDIT, 0).await?;
    // Not due yet, though its rank (T0+11c) is before `now`.
    let future = submit_prioritized(&store, T0 + 20 * CREDIT, 9).await?;
    let now = T0 + 12 * CREDIT;
    // Leases that outlast the test, but for the last one.
    let hour = Duration::from_secs(3600);

    // A claim of N takes the N due tasks of lowest rank.
    let first = store.claim("w", 2, hour, now).await?;
    assert_eq!(runs_of(&first), HashSet::from([high_new, mid]));
    // A low priority that waited longer than its gap in credit beats a
    // newer high priority: it does not starve.
    let second = store.claim("w", 2, hour, now).await?;
    assert_eq!(runs_of(&second), HashSet::from([low_old, high_late]));
    // Equal priorities go in the order they became due.
    assert_eq!(claim_one(&store, "w", hour, now).await?.run_id, low_a);
    assert_eq!(claim_one(&store, "w", hour, now).await?.run_id, low_b);
    assert!(store.claim("w", 10, hour, now).await?.is_empty());
    assert_eq!(store.next_due(now).await?, Some(T0 + 20 * CREDIT));
    let last = claim_one(&store, "w", LEASE, T0 + 20 * CREDIT).await?;
    assert_eq!(last.run_id, future);

    // An expired lease keeps its task's priority: a high-priority task
    // whose worker died goes before a low one that became due a little
    // before the lease expired.
    let expired = T0 + 20 * CREDIT + LEASE_MS;
    let low = submit_prioritized(&store, expired - CREDIT, 0).await?;
    let tasks = store.claim("x", 1, LEASE, expired).await?;
    assert_eq!(runs_of(&tasks), HashSet::from([future]));
    assert_eq!(claim_one(&store, "x", LEASE, expired).await?.run_id, low);
    Ok(())
}

pub(crate) async fn priority_survives_retry_defer_release_and_redrive<S: Store>(
    store: S,
) -> Result<()> {
    let low = submit_prioritized(&store, T0, 0).await?;
    let high = submit_prioritized(&store, T0, 9).await?;
    let task = claim_one(&store, "a", LEASE, T0).await?;
    assert_eq!(task.run_id, high);

    // Retried after the low one became due, it still goes first.
    let mut now = T0 + 5 * CREDIT;
    store.retry_later(task.lease, "boom", now, T0 + 1).await?;
    let task = claim_one(&store, "a", LEASE, now).await?;
    assert_eq!((task.run_id, task.attempts), (high, 2));

    // Deferred: the same.
    store
        .defer(task.lease, now + CREDIT, "throttled", now)
        .await?;
    now += CREDIT;
    let task = claim_one(&store, "a", LEASE, now).await?;
    assert_eq!((task.run_id, task.attempts), (high, 2));

    // Given back at shutdown: the same.
    store.release_all("a", now + 1).await?;
    let task = claim_one(&store, "b", LEASE, now + 1).await?;
    assert_eq!(task.run_id, high);

    // A follow-up task carries the priority it is given.
    now += 2;
    let mut step = append(high, 1, Some(task.lease), vec![rejected(1, "x")]);
    step.now = now;
    step.task = TaskUpdate::Complete;
    step.new_tasks = vec![NewTask {
        priority: Priority::HIGHEST,
        ..new_task(TaskKind::Llm, now)
    }];
    store.append(step).await?;
    let task = claim_one(&store, "b", LEASE, now).await?;
    assert_eq!((task.run_id, task.attempts), (high, 1));

    // Dead-lettered and redriven: the redriven task has the run's priority.
    now += 1;
    let id = task.lease.task_id;
    let mut park = give_up(high, 2, task.lease);
    park.now = now;
    store.append(park).await?;
    now += CREDIT;
    let mut redrive = append(high, 3, None, vec![Event::TaskRedriven { task_id: id }]);
    redrive.redrive = Some(id);
    redrive.now = now;
    store.append(redrive).await?;
    let task = claim_one(&store, "c", LEASE, now).await?;
    assert_eq!((task.lease.task_id, task.run_id), (id, high));

    // And the low one, due all along, is not starved.
    assert_eq!(claim_one(&store, "c", LEASE, now).await?.run_id, low);
    Ok(())
}

pub(crate) async fn dead_letter_and_redrive<S: Store>(store: S) -> Result<()> {
    let run_id = submit_run(&store, T0).await?;
    let task = claim_one(&store, "a", LEASE, T0).await?;
    let id = task.lease.task_id;

    let park = give_up(run_id, 1, task.lease);
    store.append(park).await?;

    let letters = store.dead_letters("t", 10).await?;
    assert_eq!(letters.len(), 1);
    // Another tenant's runs have none.
    assert!(store.dead_letters("other", 10).await?.is_empty());
    let letter = &letters[0];
    assert_eq!((letter.id, letter.run_id), (id, run_id));
    assert_eq!(
        (letter.kind, letter.step, letter.attempts),
        (TaskKind::Llm, 1, 1)
    );
    assert_eq!(
        (letter.error.as_str(), letter.created_at),
        ("gave up", T0 + 1)
    );
    assert_eq!(store.dead_letter(id).await?.as_ref(), Some(letter));
    assert!(store.dead_letter(TaskId::new()).await?.is_none());
    assert!(store.claim("b", 10, LEASE, T0 + LEASE_MS).await?.is_empty());
    assert_eq!(store.next_due(T0).await?, None);

    // Redriving something that is not a dead letter of the run writes nothing.
    let mut wrong = append(run_id, 2, None, vec![Event::TaskRedriven { task_id: id }]);
    wrong.redrive = Some(TaskId::new());
    assert!(matches!(store.append(wrong).await, Err(Error::NotFound(_))));
    assert_eq!(event_count(&store, run_id).await?, 2);

    let mut redrive = append(run_id, 2, None, vec![Event::TaskRedriven { task_id: id }]);
    redrive.redrive = Some(id);
    redrive.now = T0 + 2;
    assert_eq!(store.append(redrive).await?.last_seq, 3);
    assert!(store.dead_letter(id).await?.is_none());
    assert!(store.dead_letters("t", 10).await?.is_empty());
    let again = claim_one(&store, "b", LEASE, T0 + 2).await?;
    assert_eq!((again.lease.task_id, again.run_id), (id, run_id));
    assert_eq!((again.attempts, again.max_attempts), (1, 3));
    Ok(())
}

/// A task's count in `stats` (0 when absent).
fn task_count(
    stats: &crate::Stats,
    queue: Option<&str>,
    kind: TaskKind,
    state: crate::TaskState,
) -> u64 {
    stats
        .tasks
        .iter()
        .filter(|t| t.queue.as_deref() == queue && t.kind == kind && t.state == state)
        .map(|t| t.count)
        .sum()
}

pub(crate) async fn stats_count_tasks_runs_and_dead_letters<S: Store>(store: S) -> Result<()> {
    assert_eq!(store.stats(T0).await?, crate::Stats::default());

    // A run on a leased LLM task that queues a call for external workers.
    let working = submit_run(&store, T0).await?;
    let llm = claim_one(&store, "a", LEASE, T0).await?;
    let mut step = append(working, 1, Some(llm.lease), vec![rejected(1, "x")]);
    step.new_tasks = vec![queued_task("images", 0, T0)];
    step.projection = projection(Status::AwaitingTool);
    store.append(step).await?;
    // A run whose task is ready, one whose task is due later.
    submit_run(&store, T0).await?;
    submit_run(&store, T0 + 60_000).await?;
    // A run whose task is dead-lettered (the run stays unfinished).
    let parked = submit_run(&store, T0).await?;
    let mut tasks = store.claim("b", 10, LEASE, T0).await?;
    let task = tasks
        .iter()
        .position(|t| t.run_id == parked)
        .map(|i| tasks.swap_remove(i))
        .expect("the parked run's task");
    let park = give_up(parked, 1, task.lease);
    store.append(park).await?;
    // The other task claimed with it is given back, due now.
    for other in tasks {
        store.retry_later(other.lease, "not now", T0, T0).await?;
    }
    // A finished run counts nowhere.
    let done = submit_run(&store, T0 + 120_000).await?;
    let mut end = append(
        done,
        1,
        None,
        vec![Event::RunCancelled {
            reason: "stop".into(),
        }],
    );
    end.clear_tasks = true;
    end.projection = projection(Status::Cancelled);
    store.append(end).await?;

    let stats = store.stats(T0 + 1).await?;
    assert_eq!(
        task_count(&stats, None, TaskKind::Llm, crate::TaskState::Leased),
        1,
        "{stats:#?}"
    );
    assert_eq!(
        task_count(&stats, None, TaskKind::Llm, crate::TaskState::Ready),
        1
    );
    assert_eq!(
        task_count(&stats, None, TaskKind::Llm, crate::TaskState::Scheduled),
        1
    );
    assert_eq!(
        task_count(
            &stats,
            Some("images"),
            TaskKind::External,
            crate::TaskState::Ready
        ),
        1
    );
    assert_eq!(stats.tasks.iter().map(|t| t.count).sum::<u64>(), 4);
    // Since when the ready ones are due, when the next falls due, when the
    // first lease expires.
    let earliest = |state| {
        stats
            .tasks
            .iter()
            .find(|t| t.queue.is_none() && t.kind == TaskKind::Llm && t.state == state)
            .map(|t| t.earliest)
    };
    assert_eq!(earliest(crate::TaskState::Ready), Some(T0));
    assert_eq!(earliest(crate::TaskState::Scheduled), Some(T0 + 60_000));
    assert_eq!(earliest(crate::TaskState::Leased), Some(T0 + LEASE_MS));
    assert_eq!(
        stats.runs,
        vec![
            crate::RunCount {
                status: Status::Pending,
                count: 2
            },
            crate::RunCount {
                status: Status::AwaitingLlm,
                count: 1
            },
            crate::RunCount {
                status: Status::AwaitingTool,
                count: 1
            },
        ]
    );
    assert_eq!(stats.dead_letters, 1);

    // Once the lease expired its task is ready again; the later one is due.
    let later = store.stats(T0 + 60_000).await?;
    assert_eq!(
        task_count(&later, None, TaskKind::Llm, crate::TaskState::Leased),
        0
    );
    assert_eq!(
        task_count(&later, None, TaskKind::Llm, crate::TaskState::Ready),
        3
    );
    Ok(())
}

pub(crate) async fn release_all_gives_leases_back<S: Store>(store: S) -> Result<()> {
    submit_run(&store, T0).await?;
    submit_run(&store, T0).await?;
    let claimed = store.claim("a", 10, LEASE, T0).await?;
    assert_eq!(claimed.len(), 2);
    assert_eq!(store.release_all("b", T0 + 1).await?, 0);
    assert_eq!(store.release_all("a", T0 + 1).await?, 2);
    let leases: Vec<Lease> = claimed.iter().map(|t| t.lease).collect();
    assert_eq!(store.heartbeat(&leases, T0 + LEASE_MS, T0 + 1).await?, 0);
    let taken = store.claim("b", 10, LEASE, T0 + 1).await?;
    assert_eq!(taken.len(), 2);
    // A graceful release is not a failed attempt.
    assert!(taken.iter().all(|t| t.attempts == 1));
    Ok(())
}

pub(crate) async fn tasks_leased_on_creation<S: Store>(store: S) -> Result<()> {
    let run_id = submit_run(&store, T0).await?;
    let task = claim_one(&store, "a", LEASE, T0).await?;

    let mut step = append(run_id, 1, Some(task.lease), vec![rejected(1, "x")]);
    step.task = TaskUpdate::Complete;
    let lease_to = LeaseTo::new("a", T0 + 1000);
    step.new_tasks = vec![
        NewTask {
            lease_to: Some(lease_to.clone()),
            ..new_task(TaskKind::Tools, T0 + 1)
        },
        new_task(TaskKind::Llm, T0 + 50_000),
    ];
    let appended = store.append(step).await?;
    assert_eq!(appended.leased.len(), 1, "only the task leased on creation");
    let leased = appended.leased[0].clone();
    assert_eq!(
        (leased.run_id, leased.kind, leased.step),
        (run_id, TaskKind::Tools, 1)
    );
    assert_eq!((leased.attempts, leased.lease_until), (1, T0 + 1000));
    // Its id and token are the caller's: one that lost the append's answer
    // can still give it back.
    assert_eq!(leased.lease, lease_to.lease);

    // Nobody else gets it while the lease lives, and it fences writes.
    assert!(store.claim("b", 10, LEASE, T0 + 999).await?.is_empty());
    assert_eq!(store.next_due(T0 + 1).await?, Some(T0 + 1000));
    let mut next = append(run_id, 2, Some(leased.lease), vec![rejected(1, "y")]);
    next.now = T0 + 2;
    assert_eq!(store.append(next).await?.last_seq, 3);

    // After expiry it is anyone's.
    let taken = claim_one(&store, "b", LEASE, T0 + 1000).await?;
    assert_eq!(taken.lease.task_id, leased.lease.task_id);
    assert_eq!(taken.attempts, 2);
    Ok(())
}

pub(crate) async fn terminal_append_clears_tasks<S: Store>(store: S) -> Result<()> {
    let run_id = submit_run(&store, T0).await?;
    let other = submit_run(&store, T0).await?;
    let mut tasks = store.claim("a", 10, LEASE, T0).await?;
    tasks.retain(|t| t.run_id == run_id);
    let task = tasks.pop().expect("the run's task");

    let mut fan_out = append(run_id, 1, Some(task.lease), vec![rejected(1, "x")]);
    fan_out.new_tasks = vec![
        new_task(TaskKind::Tools, T0 + 10),
        new_task(TaskKind::Tools, T0 + 20),
    ];
    store.append(fan_out).await?;

    let mut cancel = append(
        run_id,
        2,
        Some(task.lease),
        vec![Event::RunCancelled {
            reason: "stop".to_string(),
        }],
    );
    cancel.task = TaskUpdate::Complete;
    cancel.clear_tasks = true;
    cancel.projection = projection(Status::Cancelled);
    store.append(cancel).await?;

    // Every task of the run is gone; the other run's task is untouched.
    assert!(store.claim("b", 10, LEASE, T0 + 100).await?.is_empty());
    let later = store.claim("b", 10, LEASE, T0 + LEASE_MS).await?;
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].run_id, other);
    Ok(())
}

/// A run id drawn at `at`, as the run's creation time (ids carry it).
fn run_id_at(at: Millis) -> RunId {
    let at = u64::try_from(at).expect("a time after the epoch");
    let time = uuid::Timestamp::from_unix_time(at / 1000, (at % 1000) as u32 * 1_000_000, 0, 0);
    RunId(uuid::Uuid::new_v7(time))
}

/// A run created at `T0` by `sub`, whose task is claimed and which ends
/// (completed) at `at`, with `later` tasks queued by its last append.
async fn ended_run<S: Store>(
    store: &S,
    mut sub: Submission,
    at: Millis,
    later: Vec<NewTask>,
) -> Result<RunId> {
    let run_id = sub.run_id;
    sub.now = T0;
    store.submit(sub).await?;
    let task = claim_one(store, "w", LEASE, T0).await?;
    assert_eq!(task.run_id, run_id);
    let mut end = completion(run_id, 1, Some(task.lease), "done");
    end.now = at;
    end.new_tasks = later;
    store.append(end).await?;
    Ok(run_id)
}

/// Every purge from the start, as a sweep goes: the runs deleted.
async fn sweep<S: Store>(store: &S, ended_before: Millis, limit: u32) -> Result<Vec<RunId>> {
    let mut deleted = Vec::new();
    let mut after = None;
    loop {
        let Purged {
            deleted: some,
            next,
        } = store
            .purge(Purge {
                ended_before,
                limit,
                after,
            })
            .await?;
        deleted.extend(some);
        match next {
            Some(next) => after = Some(next),
            None => return Ok(deleted),
        }
    }
}

pub(crate) async fn purge_deletes_ended_runs_with_all_they_left<S: Store>(store: S) -> Result<()> {
    // Ended at T0 + 10: with an idempotency key, and a dead letter left by
    // a task that gave up before it was cancelled.
    let mut sub = submission("t", "a", json!("old"), Some("key-old"));
    sub.run_id = run_id_at(T0);
    let old = sub.run_id;
    store.submit(sub).await?;
    let task = claim_one(&store, "w", LEASE, T0).await?;
    let park = give_up(old, 1, task.lease);
    store.append(park).await?;
    let mut cancel = append(
        old,
        2,
        None,
        vec![Event::RunCancelled {
            reason: "stop".to_string(),
        }],
    );
    cancel.clear_tasks = true;
    cancel.projection = projection(Status::Cancelled);
    cancel.now = T0 + 10;
    store.append(cancel).await?;
    assert_eq!(store.dead_letters("t", 10).await?.len(), 1);

    // Ended at T0 + 1000, and one still running.
    let mut sub = submission("t", "a", json!("newer"), None);
    sub.run_id = run_id_at(T0 + 1);
    let newer = ended_run(&store, sub, T0 + 1000, Vec::new()).await?;
    let mut sub = submission("t", "a", json!("running"), None);
    sub.run_id = run_id_at(T0 + 2);
    let running = sub.run_id;
    store.submit(sub).await?;

    // Only what ended before the cutoff goes, with everything about it.
    assert_eq!(sweep(&store, T0 + 500, 10).await?, vec![old]);
    assert!(store.get_run(old).await?.is_none());
    assert!(store.events(old, 0, 100).await?.is_empty());
    assert!(store.dead_letters("t", 10).await?.is_empty());
    assert!(store.get_run(newer).await?.is_some());
    assert_eq!(event_count(&store, newer).await?, 2);
    let listed = store
        .list_runs(RunFilter {
            tenant: "t".to_string(),
            limit: 10,
            ..RunFilter::default()
        })
        .await?;
    assert_eq!(
        listed.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![running, newer]
    );
    // Its idempotency key went with it: the key names a new run now.
    let again = submission("t", "a", json!("old"), Some("key-old"));
    let again_id = again.run_id;
    let submitted = store.submit(again).await?;
    assert!(submitted.created);
    assert_eq!(submitted.run_id, again_id);

    // Later, the newer one goes too; the running one never does.
    assert_eq!(sweep(&store, T0 + 2000, 10).await?, vec![newer]);
    assert!(store.get_run(newer).await?.is_none());
    assert!(store.get_run(running).await?.is_some());
    assert!(sweep(&store, T0 + 2000, 10).await?.is_empty());

    // Deleting one run by id: an ended one goes, an unknown one is not
    // found, a running one is refused, saying so.
    let mut sub = submission("t", "a", json!("one"), None);
    sub.run_id = run_id_at(T0 + 3);
    let claimed = store.claim("w", 10, LEASE, T0).await?;
    assert_eq!(runs_of(&claimed), HashSet::from([running, again_id]));
    let one = ended_run(&store, sub, T0 + 3000, Vec::new()).await?;
    store.delete_run(one).await?;
    assert!(store.get_run(one).await?.is_none());
    assert!(matches!(
        store.delete_run(one).await,
        Err(Error::NotFound(_))
    ));
    match store.delete_run(running).await {
        Err(Error::Conflict(why)) => assert!(why.contains("has not ended"), "{why}"),
        other => panic!("deleting a running run: {other:?}"),
    }
    assert!(store.get_run(running).await?.is_some());
    Ok(())
}

pub(crate) async fn purge_keeps_what_is_still_needed<S: Store>(store: S) -> Result<()> {
    // An ended run with a callback still to deliver stays until it is done.
    let mut sub = submission("t", "a", json!("calling back"), None);
    sub.run_id = run_id_at(T0);
    let calling = ended_run(
        &store,
        sub,
        T0 + 10,
        vec![new_task(TaskKind::Callback, T0 + LEASE_MS * 100)],
    )
    .await?;
    assert!(sweep(&store, T0 + 500, 10).await?.is_empty());
    match store.delete_run(calling).await {
        Err(Error::Conflict(why)) => assert!(why.contains("work queued"), "{why}"),
        other => panic!("deleting a run with a task: {other:?}"),
    }
    let callback = claim_one(&store, "w", LEASE, T0 + LEASE_MS * 100).await?;
    let mut done = append(calling, 2, Some(callback.lease), Vec::new());
    done.task = TaskUpdate::Complete;
    done.projection = projection(Status::Completed);
    done.now = T0 + 10;
    store.append(done).await?;

    // A child run that ended stays while its parent runs (the parent's
    // fan-in reads it), and a scan that sees only kept runs goes on past
    // them.
    let parent = run_id_at(T0 + 1);
    let mut sub = submission("t", "a", json!("parent"), None);
    sub.run_id = parent;
    store.submit(sub).await?;
    let task = claim_one(&store, "w", LEASE, T0).await?;
    let children: Vec<Submission> = (0..2)
        .map(|i| {
            let mut child = submission("t", "kid", json!({"part": i}), None);
            child.run_id = parent.child(1, 0, i);
            if let Event::RunSubmitted { parent: link, .. } = &mut child.event {
                *link = Some(ParentLink {
                    run_id: parent,
                    step: 1,
                    call_index: 0,
                    index: i,
                    depth: 1,
                    on_dead_letter: Default::default(),
                });
            }
            child.now = T0;
            child
        })
        .collect();
    let mut spawn = append(parent, 1, Some(task.lease), vec![rejected(1, "spawned")]);
    spawn.task = TaskUpdate::Complete;
    spawn.spawn = children.clone();
    store.append(spawn).await?;
    for child in &children {
        let task = claim_one(&store, "w", LEASE, T0).await?;
        assert_eq!(task.run_id, child.run_id);
        let mut end = completion(child.run_id, 1, Some(task.lease), "part");
        end.now = T0 + 20;
        store.append(end).await?;
    }
    // One run a call: the callback's run goes, then the scan passes the
    // two children it keeps (their parent runs), then it has seen them all.
    let mut calls = Vec::new();
    let mut after = None;
    loop {
        let purged = store
            .purge(Purge {
                ended_before: T0 + 500,
                limit: 1,
                after,
            })
            .await?;
        calls.push(purged.deleted);
        match purged.next {
            Some(next) => after = Some(next),
            None => break,
        }
        assert!(calls.len() <= 4, "the scan does not end: {calls:?}");
    }
    assert_eq!(calls, vec![vec![calling], vec![], vec![], vec![]]);
    assert!(store.get_run(calling).await?.is_none());
    for child in &children {
        assert!(store.get_run(child.run_id).await?.is_some());
        match store.delete_run(child.run_id).await {
            Err(Error::Conflict(why)) => assert!(why.contains("child of run"), "{why}"),
            other => panic!("deleting a child of a running parent: {other:?}"),
        }
    }

    // The parent ends: both go with it. A child still running when its
    // parent was deleted can still end (its wake-up of the parent is
    // dropped).
    let mut end = completion(parent, 2, None, "all");
    end.now = T0 + 30;
    store.append(end).await?;
    let mut gone = sweep(&store, T0 + 500, 2).await?;
    gone.sort_unstable();
    let mut expected = vec![parent, children[0].run_id, children[1].run_id];
    expected.sort_unstable();
    assert_eq!(gone, expected);

    let orphan = run_id_at(T0 + 2);
    let mut sub = submission("t", "a", json!("orphan"), None);
    sub.run_id = orphan;
    store.submit(sub).await?;
    let task = claim_one(&store, "w", LEASE, T0).await?;
    let mut end = completion(orphan, 1, Some(task.lease), "late");
    end.wake = vec![RunTask {
        run_id: parent,
        task: new_task(TaskKind::Children, T0),
    }];
    store.append(end).await?;
    assert!(store.claim("w", 10, LEASE, T0 + LEASE_MS).await?.is_empty());

    // Events not exported yet keep their run until the relay has them.
    store.enable_export().await?;
    let mut sub = submission("t", "a", json!("exported"), None);
    sub.run_id = run_id_at(T0 + 3);
    let exported = ended_run(&store, sub, T0 + 40, Vec::new()).await?;
    assert_eq!(sweep(&store, T0 + 500, 10).await?, vec![orphan]);
    match store.delete_run(exported).await {
        Err(Error::Conflict(why)) => assert!(why.contains("exported"), "{why}"),
        other => panic!("deleting a run with events to export: {other:?}"),
    }
    let entries = store.outbox(100).await?;
    let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
    store.ack_outbox(&ids).await?;
    assert_eq!(sweep(&store, T0 + 500, 10).await?, vec![exported]);
    Ok(())
}

pub(crate) async fn list_runs_filters_and_pages<S: Store>(store: S) -> Result<()> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for i in 0..5 {
        let sub = submission("t1", "a", json!(i), None);
        a.push(sub.run_id);
        store.submit(sub).await?;
    }
    for i in 0..3 {
        let sub = submission("t1", "b", json!(i), None);
        b.push(sub.run_id);
        store.submit(sub).await?;
    }
    store
        .submit(submission("t2", "a", json!("other"), None))
        .await?;
    for &run_id in &a[..2] {
        let mut done = append(run_id, 1, None, Vec::new());
        done.projection = projection(Status::Completed);
        store.append(done).await?;
    }
    let ids = |runs: Vec<crate::RunRecord>| runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let newest_first = |mut runs: Vec<RunId>| {
        runs.sort_by_key(|id| std::cmp::Reverse(id.to_string()));
        runs
    };
    let filter = |status: Option<Status>, agent: Option<&str>| RunFilter {
        tenant: "t1".to_string(),
        status,
        agent: agent.map(str::to_string),
        before: None,
        limit: 100,
    };

    let all = newest_first(a.iter().chain(&b).copied().collect());
    assert_eq!(ids(store.list_runs(filter(None, None)).await?), all);
    assert_eq!(
        ids(store
            .list_runs(filter(Some(Status::Completed), None))
            .await?),
        newest_first(a[..2].to_vec())
    );
    assert_eq!(
        ids(store.list_runs(filter(None, Some("b"))).await?),
        newest_first(b.clone())
    );
    assert_eq!(
        ids(store
            .list_runs(filter(Some(Status::Pending), Some("a")))
            .await?),
        newest_first(a[2..].to_vec())
    );
    assert!(
        store
            .list_runs(filter(Some(Status::Failed), None))
            .await?
            .is_empty()
    );
    let other_tenant = RunFilter {
        tenant: "t2".to_string(),
        ..filter(None, None)
    };
    assert_eq!(store.list_runs(other_tenant).await?.len(), 1);

    // Pages of 3 with the last id as the cursor.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = RunFilter {
            before,
            limit: 3,
            ..filter(None, None)
        };
        let page = ids(store.list_runs(page).await?);
        assert!(page.len() <= 3);
        let Some(&last) = page.last() else { break };
        paged.extend(page);
        before = Some(last);
    }
    assert_eq!(paged, all);
    Ok(())
}

/// The approvals inbox pages runs `AWAITING_APPROVAL` by id: newest first,
/// the last id of a page as the next one's cursor. Runs leaving or
/// entering the status between pages shift no other run.
pub(crate) async fn parked_runs_page_by_cursor<S: Store>(store: S) -> Result<()> {
    let mut parked = Vec::new();
    let mut others = Vec::new();
    for i in 0..11 {
        let agent = if i % 2 == 0 { "a" } else { "b" };
        let sub = submission("t1", agent, json!(i), None);
        let run_id = sub.run_id;
        store.submit(sub).await?;
        let status = match i {
            3 => Status::AwaitingTool,
            6 => Status::Completed,
            9 => Status::Pending,
            _ => Status::AwaitingApproval,
        };
        if status != Status::Pending {
            let mut park = append(run_id, 1, None, Vec::new());
            park.projection = projection(status);
            store.append(park).await?;
        }
        if status == Status::AwaitingApproval {
            parked.push((run_id, agent));
        } else {
            others.push(run_id);
        }
    }
    let elsewhere = submission("t2", "a", json!("other"), None);
    let elsewhere_id = elsewhere.run_id;
    store.submit(elsewhere).await?;
    let mut park = append(elsewhere_id, 1, None, Vec::new());
    park.projection = projection(Status::AwaitingApproval);
    store.append(park).await?;
    assert_eq!(parked.len(), 8);
    let newest_first = |mut runs: Vec<RunId>| {
        runs.sort_by_key(|id| std::cmp::Reverse(id.to_string()));
        runs
    };
    let page = |agent: Option<&str>, before: Option<RunId>, limit: u32| RunFilter {
        tenant: "t1".to_string(),
        status: Some(Status::AwaitingApproval),
        agent: agent.map(str::to_string),
        before,
        limit,
    };

    // Pages of 3; between the first and the second, one listed run and one
    // not listed yet are decided (AWAITING_TOOL), and another run parks.
    let all = newest_first(parked.iter().map(|(id, _)| *id).collect());
    let first: Vec<RunId> = store
        .list_runs(page(None, None, 3))
        .await?
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(first, all[..3]);
    let cursor = all[2];
    for (run_id, status) in [
        (all[1], Status::AwaitingTool),
        (all[5], Status::AwaitingTool),
        (others[0], Status::AwaitingApproval),
    ] {
        let mut change = append(run_id, 1, None, Vec::new());
        change.projection = projection(status);
        store.append(change).await?;
    }
    let mut parked_now: Vec<(RunId, &str)> = parked
        .iter()
        .copied()
        .filter(|(id, _)| *id != all[1] && *id != all[5])
        .collect();
    // The run parked between pages: the 4th submitted, agent "b".
    parked_now.push((others[0], "b"));
    let mut paged = first.clone();
    let mut before = Some(cursor);
    loop {
        let records = store.list_runs(page(None, before, 3)).await?;
        assert!(records.len() <= 3);
        for record in &records {
            assert_eq!(record.projection.status, Status::AwaitingApproval);
            assert_eq!(record.tenant, "t1");
        }
        let Some(last) = records.last() else { break };
        before = Some(last.id);
        paged.extend(records.iter().map(|r| r.id));
    }
    let rest = parked_now
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| id.to_string() < cursor.to_string())
        .collect();
    let expected: Vec<RunId> = first.iter().copied().chain(newest_first(rest)).collect();
    assert_eq!(paged, expected, "each parked run once, newest first");

    // One agent's, in pages of 2.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let records = store.list_runs(page(Some("a"), before, 2)).await?;
        assert!(records.len() <= 2);
        assert!(records.iter().all(|r| r.agent == "a"));
        let Some(last) = records.last() else { break };
        before = Some(last.id);
        paged.extend(records.iter().map(|r| r.id));
    }
    let of_a = parked_now
        .iter()
        .filter(|(_, agent)| *agent == "a")
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(paged, newest_first(of_a));
    Ok(())
}

fn spec(name: &str, version: &str, system: &str) -> Spec {
    serde_json::from_value(json!({
        "name": name,
        "version": version,
        "model": {"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:1"},
        "system": system,
    }))
    .expect("test spec parses")
}

pub(crate) async fn agent_versions<S: Store>(store: S) -> Result<()> {
    assert_eq!(
        store.put_agent("t", &spec("b", "1", "x"), T0).await?,
        Registered::Created
    );
    let v1 = spec("a", "1", "first");
    let v2 = spec("a", "2", "second");
    assert_eq!(
        store.put_agent("t", &v1, T0 + 1).await?,
        Registered::Created
    );
    assert_eq!(
        store.put_agent("t", &v2, T0 + 2).await?,
        Registered::Created
    );
    assert_eq!(
        store.put_agent("t", &v1, T0 + 3).await?,
        Registered::Unchanged
    );
    match store
        .put_agent("t", &spec("a", "1", "changed"), T0 + 4)
        .await
    {
        Err(Error::Conflict(message)) => {
            assert!(
                message.contains("`a`") && message.contains("`1`"),
                "{message}"
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }

    let latest = store.get_agent("t", "a", None).await?.expect("latest");
    assert_eq!((latest.spec, latest.created_at), (v2.clone(), T0 + 2));
    assert_eq!(latest.tenant, "t");
    let exact = store.get_agent("t", "a", Some("1")).await?.expect("v1");
    assert_eq!((exact.spec, exact.created_at), (v1.clone(), T0 + 1));
    assert!(store.get_agent("t", "a", Some("3")).await?.is_none());
    assert!(store.get_agent("t", "c", None).await?.is_none());
    assert!(store.get_agent("other", "a", None).await?.is_none());

    let listed: Vec<(String, String)> = store
        .list_agents("t")
        .await?
        .into_iter()
        .map(|r| (r.spec.name, r.spec.version))
        .collect();
    let expected =
        [("a", "1"), ("a", "2"), ("b", "1")].map(|(n, v)| (n.to_string(), v.to_string()));
    assert_eq!(listed, expected);
    assert!(store.list_agents("other").await?.is_empty());
    Ok(())
}

pub(crate) async fn subscribers_hear_commits<S: Store>(store: S) -> Result<()> {
    async fn next(commits: &mut tokio::sync::broadcast::Receiver<Committed>) -> Committed {
        tokio::time::timeout(Duration::from_secs(5), commits.recv())
            .await
            .expect("a notification in time")
            .expect("the channel is open")
    }

    let mut commits = store.subscribe();
    let run_id = submit_run(&store, T0).await?;
    let heard = next(&mut commits).await;
    assert_eq!(
        heard,
        Committed {
            run_id,
            last_seq: 1,
            new_work: true
        }
    );

    let task = claim_one(&store, "a", LEASE, T0).await?;
    store
        .append(append(run_id, 1, Some(task.lease), vec![rejected(1, "x")]))
        .await?;
    let heard = next(&mut commits).await;
    assert_eq!(
        heard,
        Committed {
            run_id,
            last_seq: 2,
            new_work: false
        }
    );

    // A refused write is not announced; the next commit is.
    let stale = append(run_id, 1, Some(task.lease), vec![rejected(1, "y")]);
    assert!(store.append(stale).await.is_err());
    store
        .retry_later(task.lease, "later", T0 + 100, T0 + 2)
        .await?;
    let heard = next(&mut commits).await;
    assert_eq!(
        heard,
        Committed {
            run_id,
            last_seq: 2,
            new_work: true
        }
    );
    Ok(())
}

/// What an outbox batch holds: each entry's run and seqs.
fn entry_seqs(entries: &[OutboxEntry]) -> Vec<(RunId, Vec<Seq>)> {
    entries
        .iter()
        .map(|e| (e.run.id, e.events.iter().map(|r| r.seq).collect()))
        .collect()
}

fn ids(entries: &[OutboxEntry]) -> Vec<i64> {
    entries.iter().map(|e| e.id).collect()
}

pub(crate) async fn outbox_exports_commits_once_enabled<S: Store>(store: S) -> Result<()> {
    // Export off: commits leave nothing in the outbox.
    let before = submit_run(&store, T0).await?;
    store
        .append(append(before, 1, None, vec![rejected(1, "early")]))
        .await?;
    assert!(store.outbox(100).await?.is_empty());

    store.enable_export().await?;
    store.enable_export().await?;
    assert!(
        store.outbox(100).await?.is_empty(),
        "earlier commits stay out"
    );

    // Export on: each commit that journals events is one entry.
    let sub = submission("acme", "bot", json!("hi"), Some("k"));
    let run = sub.run_id;
    store.submit(sub.clone()).await?;
    let repeat = Submission {
        run_id: RunId::new(),
        ..sub.clone()
    };
    assert!(
        !store.submit(repeat).await?.created,
        "no entry: nothing new"
    );
    store
        .append(append(
            before,
            2,
            None,
            vec![rejected(1, "a"), rejected(1, "b")],
        ))
        .await?;
    let stale = append(before, 2, None, vec![rejected(1, "stale")]);
    assert!(matches!(
        store.append(stale).await,
        Err(Error::SeqConflict { .. })
    ));
    store
        .append(append(run, 1, None, vec![rejected(1, "c")]))
        .await?;
    // An append without events journals nothing to export.
    store.append(append(run, 2, None, Vec::new())).await?;

    let entries = store.outbox(100).await?;
    assert_eq!(
        entry_seqs(&entries),
        vec![(run, vec![1]), (before, vec![3, 4]), (run, vec![2])]
    );
    assert!(entries.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(
        entries[0].run,
        RunRef {
            id: run,
            tenant: "acme".to_string(),
            agent: "bot".to_string(),
            version: "1".to_string(),
        }
    );
    assert_eq!(entries[1].run.tenant, "t");
    // Exactly the events committed, as the journal holds them.
    assert_eq!(entries[0].events, store.events(run, 0, 1).await?);
    assert_eq!(entries[1].events, store.events(before, 2, 2).await?);
    assert_eq!(entries[2].events[0].event, rejected(1, "c"));

    // Whole entries, until `max_events` events are gathered.
    assert_eq!(store.outbox(1).await?, entries[..1]);
    assert_eq!(store.outbox(2).await?, entries[..2], "1 event, then 2 more");
    assert_eq!(store.outbox(3).await?, entries[..2]);
    assert_eq!(store.outbox(4).await?, entries);
    assert_eq!(store.outbox(0).await?, entries[..1], "at least one entry");

    // Acknowledged entries are gone for good; unknown ids are ignored.
    store.ack_outbox(&ids(&entries[..2])).await?;
    assert_eq!(store.outbox(100).await?, entries[2..]);
    store.ack_outbox(&[entries[0].id, -1, i64::MAX]).await?;
    store.ack_outbox(&[]).await?;
    assert_eq!(store.outbox(100).await?, entries[2..]);

    // Later commits come after what is left.
    store
        .append(append(before, 4, None, vec![rejected(1, "d")]))
        .await?;
    let left = store.outbox(100).await?;
    assert_eq!(entry_seqs(&left), vec![(run, vec![2]), (before, vec![5])]);
    store.ack_outbox(&ids(&left)).await?;
    assert!(store.outbox(100).await?.is_empty());
    Ok(())
}

pub(crate) async fn outbox_keeps_each_runs_order<S: Store>(store: S) -> Result<()> {
    const APPENDS: Seq = 30;
    store.enable_export().await?;
    let a = submit_run(&store, T0).await?;
    let b = submit_run(&store, T0).await?;

    // Commits of two runs, one after another: commit order.
    for seq in 1..=2 {
        for run in [a, b] {
            store
                .append(append(run, seq, None, vec![rejected(1, "x")]))
                .await?;
        }
    }
    let entries = store.outbox(100).await?;
    assert_eq!(
        entry_seqs(&entries),
        vec![
            (a, vec![1]),
            (b, vec![1]),
            (a, vec![2]),
            (b, vec![2]),
            (a, vec![3]),
            (b, vec![3]),
        ]
    );
    store.ack_outbox(&ids(&entries)).await?;

    // Concurrent appenders: whatever the interleaving, each run's entries
    // come in seq order, within a batch and from batch to batch.
    let mut appenders = Vec::new();
    for run in [a, b] {
        let store = store.clone();
        appenders.push(tokio::spawn(async move {
            let mut seq = 3;
            for i in 0..APPENDS {
                let events = vec![rejected(1, "y"); 1 + (i % 3) as usize];
                seq = store.append(append(run, seq, None, events)).await?.last_seq;
            }
            Ok::<_, Error>(())
        }));
    }
    // The seq each run's next entry must start at.
    let mut next = HashMap::from([(a, 4), (b, 4)]);
    loop {
        let done = appenders.iter().all(|appender| appender.is_finished());
        let batch = store.outbox(7).await?;
        if done && batch.is_empty() {
            break;
        }
        for entry in &batch {
            let expected = next.get_mut(&entry.run.id).expect("a run of this test");
            let seqs: Vec<Seq> = entry.events.iter().map(|e| e.seq).collect();
            let len = seqs.len() as Seq;
            assert_eq!(seqs, (*expected..*expected + len).collect::<Vec<_>>());
            *expected += len;
        }
        store.ack_outbox(&ids(&batch)).await?;
    }
    for appender in appenders {
        appender.await.expect("appender panicked")?;
    }
    for run in [a, b] {
        let last = store.get_run(run).await?.expect("run").last_seq;
        assert_eq!(
            next[&run],
            last + 1,
            "every event of run {run} exported once"
        );
    }
    Ok(())
}

pub(crate) async fn relay_lease_is_exclusive<S: Store>(store: S) -> Result<()> {
    // Free: taken.
    assert!(store.relay_lease("relay", "a", T0 + 100, T0).await?);
    // Held and unexpired: refused to another owner, extended by its own.
    assert!(!store.relay_lease("relay", "b", T0 + 200, T0 + 50).await?);
    assert!(store.relay_lease("relay", "a", T0 + 300, T0 + 60).await?);
    assert!(!store.relay_lease("relay", "b", T0 + 400, T0 + 299).await?);
    // Expired: taken over, and the old owner is refused.
    assert!(store.relay_lease("relay", "b", T0 + 500, T0 + 300).await?);
    assert!(!store.relay_lease("relay", "a", T0 + 600, T0 + 301).await?);
    assert!(store.relay_lease("relay", "b", T0 + 700, T0 + 400).await?);
    // Leases are per name.
    assert!(store.relay_lease("other", "a", T0 + 100, T0 + 400).await?);

    // Racing owners of a free lease: one wins.
    let mut racers = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        racers.push(tokio::spawn(async move {
            store
                .relay_lease("race", &format!("r{i}"), T0 + 100, T0)
                .await
        }));
    }
    let mut won = 0;
    for racer in racers {
        won += usize::from(racer.await.expect("racer panicked")?);
    }
    assert_eq!(won, 1);
    Ok(())
}

pub(crate) async fn disable_export_drops_the_backlog<S: Store>(store: S) -> Result<()> {
    // Never enabled: nothing to drop, and it stays off.
    assert_eq!(store.disable_export().await?, 0);
    let run = submit_run(&store, T0).await?;
    assert!(store.outbox(100).await?.is_empty());

    // A backlog of three entries (an append, a submit, an append) is
    // dropped whole.
    store.enable_export().await?;
    store
        .append(append(run, 1, None, vec![rejected(1, "a")]))
        .await?;
    let other = submit_run(&store, T0).await?;
    store
        .append(append(other, 1, None, vec![rejected(1, "b")]))
        .await?;
    assert_eq!(store.outbox(100).await?.len(), 3);
    assert_eq!(store.disable_export().await?, 3);
    assert!(store.outbox(100).await?.is_empty());
    let status = store.export_status("relay", T0).await?;
    assert!(!status.enabled);
    assert_eq!((status.backlog_entries, status.backlog_events), (0, 0));
    assert_eq!(status.oldest, None);
    // The journal keeps the events.
    assert_eq!(event_count(&store, run).await?, 2);

    // Off: later commits leave nothing, and switching off again is a no-op.
    store
        .append(append(run, 2, None, vec![rejected(1, "c")]))
        .await?;
    submit_run(&store, T0).await?;
    assert!(store.outbox(100).await?.is_empty());
    assert_eq!(store.disable_export().await?, 0);

    // Commits racing the switch: whichever side of it each lands on, none
    // leaves an entry behind once it returns.
    store.enable_export().await?;
    let mut appenders = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        appenders.push(tokio::spawn(async move {
            let run = submit_run(&store, T0).await?;
            let mut seq = 1;
            for _ in 0..10 {
                seq = store
                    .append(append(run, seq, None, vec![rejected(1, "r")]))
                    .await?
                    .last_seq;
            }
            Ok::<_, Error>(())
        }));
    }
    tokio::task::yield_now().await;
    store.disable_export().await?;
    for appender in appenders {
        appender.await.expect("appender panicked")?;
    }
    assert!(store.outbox(100).await?.is_empty(), "no entry outlives it");
    Ok(())
}

pub(crate) async fn export_enabled_again_exports_new_commits_only<S: Store>(
    store: S,
) -> Result<()> {
    store.enable_export().await?;
    let run = submit_run(&store, T0).await?;
    let dropped = ids(&store.outbox(100).await?);
    assert_eq!(dropped.len(), 1);
    assert_eq!(store.disable_export().await?, 1);
    // Committed while off: never exported.
    store
        .append(append(run, 1, None, vec![rejected(1, "off")]))
        .await?;

    store.enable_export().await?;
    assert!(
        store.outbox(100).await?.is_empty(),
        "commits before it stay out"
    );
    store
        .append(append(run, 2, None, vec![rejected(1, "on")]))
        .await?;
    let later = submit_run(&store, T0).await?;
    let entries = store.outbox(100).await?;
    assert_eq!(entry_seqs(&entries), vec![(run, vec![3]), (later, vec![1])]);
    assert_eq!(entries[0].events[0].event, rejected(1, "on"));
    // Ids are not reused: a late ack of a dropped entry deletes nothing new.
    assert!(entries.iter().all(|e| e.id > dropped[0]));
    store.ack_outbox(&dropped).await?;
    assert_eq!(store.outbox(100).await?, entries);
    Ok(())
}

pub(crate) async fn export_status_counts_the_backlog_and_shows_the_relay<S: Store>(
    store: S,
) -> Result<()> {
    let empty = ExportStatus {
        enabled: false,
        backlog_entries: 0,
        backlog_events: 0,
        oldest: None,
        relay: None,
    };
    assert_eq!(store.export_status("relay", T0).await?, empty);

    store.enable_export().await?;
    // Submitted at T0, then two events appended at T0 + 1.
    let run = submit_run(&store, T0).await?;
    store
        .append(append(
            run,
            1,
            None,
            vec![rejected(1, "a"), rejected(1, "b")],
        ))
        .await?;
    let status = store.export_status("relay", T0).await?;
    assert_eq!(
        status,
        ExportStatus {
            enabled: true,
            backlog_entries: 2,
            backlog_events: 3,
            oldest: Some(T0),
            ..empty.clone()
        }
    );
    // Publishing the oldest entry moves the oldest time on.
    let entries = store.outbox(1).await?;
    store.ack_outbox(&ids(&entries)).await?;
    let status = store.export_status("relay", T0).await?;
    assert_eq!(
        (status.backlog_entries, status.backlog_events, status.oldest),
        (1, 2, Some(T0 + 1))
    );

    // The lease asked for, live until it expires (as `relay_lease` sees it).
    assert!(store.relay_lease("relay", "r1", T0 + 100, T0).await?);
    let holder = |live| {
        Some(RelayHolder {
            owner: "r1".to_string(),
            until: T0 + 100,
            live,
        })
    };
    assert_eq!(
        store.export_status("relay", T0 + 99).await?.relay,
        holder(true)
    );
    assert_eq!(
        store.export_status("relay", T0 + 100).await?.relay,
        holder(false)
    );
    assert_eq!(store.export_status("other", T0).await?.relay, None);

    // Off: the backlog is gone, the lease row stays.
    store.disable_export().await?;
    let status = store.export_status("relay", T0 + 100).await?;
    assert_eq!(
        status,
        ExportStatus {
            relay: holder(false),
            ..empty
        }
    );
    Ok(())
}

pub(crate) async fn pending_runs_count_unfinished_runs<S: Store>(store: S) -> Result<()> {
    let mut of_a = Vec::new();
    let mut of_b = Vec::new();
    for i in 0..3 {
        let sub = submission("t1", "a", json!(i), None);
        of_a.push(sub.run_id);
        store.submit(sub).await?;
    }
    for i in 0..2 {
        let sub = submission("t1", "b", json!(i), None);
        of_b.push(sub.run_id);
        store.submit(sub).await?;
    }
    store.submit(submission("t2", "a", json!(0), None)).await?;
    let counts = async |store: &S| -> Result<[u64; 5]> {
        Ok([
            store.pending_runs("t1", None).await?,
            store.pending_runs("t1", Some("a")).await?,
            store.pending_runs("t1", Some("b")).await?,
            store.pending_runs("t2", None).await?,
            store.pending_runs("t1", Some("c")).await?,
        ])
    };
    assert_eq!(counts(&store).await?, [5, 3, 2, 1, 0]);
    assert_eq!(store.pending_runs("nobody", None).await?, 0);

    // Waiting for the model, tools or a human decision is still pending.
    let mut waiting = append(of_a[0], 1, None, vec![rejected(1, "x")]);
    waiting.projection = projection(Status::AwaitingTool);
    store.append(waiting).await?;
    store.append(append(of_b[0], 1, None, Vec::new())).await?;
    let mut parked = append(of_a[2], 1, None, vec![rejected(1, "x")]);
    parked.projection = projection(Status::AwaitingApproval);
    store.append(parked).await?;
    // So is undoing calls before the end (sagas).
    let mut compensating = append(of_b[1], 1, None, vec![rejected(1, "x")]);
    compensating.projection = projection(Status::Compensating);
    store.append(compensating).await?;
    assert_eq!(counts(&store).await?, [5, 3, 2, 1, 0]);

    // Completed, failed and cancelled runs are not.
    for (run, seq, status) in [
        (of_a[0], 2, Status::Completed),
        (of_a[1], 1, Status::Cancelled),
        (of_b[0], 1, Status::Failed),
    ] {
        let mut end = append(run, seq, None, Vec::new());
        end.projection = projection(status);
        store.append(end).await?;
    }
    assert_eq!(counts(&store).await?, [2, 1, 1, 1, 0]);
    Ok(())
}

pub(crate) async fn usage_sums_runs_by_agent_and_time<S: Store>(store: S) -> Result<()> {
    let totals = |runs, input_tokens, output_tokens, cost_usd| UsageTotals {
        runs,
        input_tokens,
        output_tokens,
        cost_usd,
    };
    // Submits a run created at `at` and records its usage so far (costs
    // are exact in binary, so any order of summing gives the same total).
    let run = async |tenant: &str, agent: &str, at: Millis, tokens: (u64, u64), cost: f64| {
        let mut sub = submission(tenant, agent, json!("usage"), None);
        sub.now = at;
        let run_id = sub.run_id;
        store.submit(sub).await?;
        let mut step = append(run_id, 1, None, vec![rejected(1, "x")]);
        step.projection.usage = Usage {
            input_tokens: tokens.0,
            output_tokens: tokens.1,
        };
        step.projection.cost_usd = cost;
        store.append(step).await?;
        Result::Ok(run_id)
    };
    let first = run("t1", "a", T0, (10, 20), 0.25).await?;
    run("t1", "a", T0 + 10, (20, 40), 0.5).await?;
    run("t1", "a", T0 + 20, (30, 60), 1.0).await?;
    run("t1", "b", T0 + 30, (5, 7), 2.0).await?;
    // A run with no LLM call yet counts, with nothing used.
    store.submit(submission("t1", "b", json!(0), None)).await?;
    run("t2", "a", T0, (1000, 1000), 100.0).await?;

    assert_eq!(
        store.usage("t1", Some("a"), None).await?,
        totals(3, 60, 120, 1.75)
    );
    assert_eq!(
        store.usage("t1", None, None).await?,
        totals(5, 65, 127, 3.75)
    );
    assert_eq!(
        store.usage("t1", Some("a"), Some(T0 + 10)).await?,
        totals(2, 50, 100, 1.5)
    );
    assert_eq!(
        store.usage("t1", None, Some(T0 + 25)).await?,
        totals(1, 5, 7, 2.0)
    );
    assert_eq!(
        store.usage("t1", Some("c"), None).await?,
        UsageTotals::default()
    );
    assert_eq!(
        store.usage("nobody", None, None).await?,
        UsageTotals::default()
    );
    let by_agent = |usage: Vec<crate::AgentUsage>| {
        usage
            .into_iter()
            .map(|u| (u.agent, u.totals))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        by_agent(store.usage_by_agent("t1", None).await?),
        vec![
            ("a".to_string(), totals(3, 60, 120, 1.75)),
            ("b".to_string(), totals(2, 5, 7, 2.0)),
        ]
    );
    assert_eq!(
        by_agent(store.usage_by_agent("t1", Some(T0 + 20)).await?),
        vec![
            ("a".to_string(), totals(1, 30, 60, 1.0)),
            ("b".to_string(), totals(1, 5, 7, 2.0)),
        ]
    );
    assert!(store.usage_by_agent("nobody", None).await?.is_empty());

    // A run counts as of its last append: the projection holds its totals.
    let mut later = append(first, 2, None, vec![rejected(2, "y")]);
    later.projection.usage = Usage {
        input_tokens: 110,
        output_tokens: 120,
    };
    later.projection.cost_usd = 4.25;
    store.append(later).await?;
    let run = store.get_run(first).await?.expect("run");
    assert_eq!(run.projection.cost_usd, 4.25);
    assert_eq!(
        store.usage("t1", Some("a"), None).await?,
        totals(3, 160, 220, 5.75)
    );
    Ok(())
}

/// `per_window` units per `window_ms`, `burst` at once.
fn rate(per_window: u64, window_ms: u64, burst: u64) -> Rate {
    Rate {
        per_window,
        window: Duration::from_millis(window_ms),
        burst,
    }
}

/// Takes `cost` of `key` at `now` without waiting.
async fn take<S: Store>(store: &S, key: &str, rate: Rate, cost: u64, now: Millis) -> Result<Grant> {
    store
        .take_capacity(key, rate, cost, Duration::ZERO, now)
        .await
}

pub(crate) async fn limits_space_grants_after_a_burst<S: Store>(store: S) -> Result<()> {
    // 600 per minute: one per 100 ms, 3 at once.
    let rpm = rate(600, 60_000, 3);
    let key = "openai/gpt-4o:rpm";

    // Racing takes of a new key: exactly the burst is granted.
    let mut takers = Vec::new();
    for _ in 0..12 {
        let store = store.clone();
        takers.push(tokio::spawn(
            async move { take(&store, key, rpm, 1, T0).await },
        ));
    }
    let mut granted = 0;
    for taker in takers {
        match taker.await.expect("taker panicked")? {
            Grant::Granted => granted += 1,
            Grant::RetryAt(at) => assert_eq!(at, T0 + 100),
            other => panic!("no wait was allowed: {other:?}"),
        }
    }
    assert_eq!(granted, 3);

    // Refused takes take nothing: asking again changes no answer.
    for now in [T0 + 1, T0 + 50, T0 + 99, T0 + 99] {
        assert_eq!(
            take(&store, key, rpm, 1, now).await?,
            Grant::RetryAt(T0 + 100)
        );
    }
    // RetryAt is exact, and then grants are spaced by the interval.
    assert_eq!(take(&store, key, rpm, 1, T0 + 100).await?, Grant::Granted);
    assert_eq!(
        take(&store, key, rpm, 1, T0 + 100).await?,
        Grant::RetryAt(T0 + 200)
    );
    assert_eq!(take(&store, key, rpm, 1, T0 + 200).await?, Grant::Granted);
    assert_eq!(
        take(&store, key, rpm, 1, T0 + 250).await?,
        Grant::RetryAt(T0 + 300)
    );

    // A quiet spell fills the bucket to its burst, no more.
    let later = T0 + 10_000;
    for _ in 0..3 {
        assert_eq!(take(&store, key, rpm, 1, later).await?, Grant::Granted);
    }
    assert_eq!(
        take(&store, key, rpm, 1, later).await?,
        Grant::RetryAt(later + 100)
    );

    // Keys are independent.
    for _ in 0..3 {
        assert_eq!(
            take(&store, "other:rpm", rpm, 1, later).await?,
            Grant::Granted
        );
    }
    assert_eq!(
        take(&store, "other:rpm", rpm, 1, later).await?,
        Grant::RetryAt(later + 100)
    );

    // An interval that is not a whole number of milliseconds (7 per
    // second): RetryAt is rounded up to the millisecond (142.857… ms is
    // 143), and a take then is granted (the next one 285.857… ms in).
    let odd = rate(7, 1_000, 1);
    assert_eq!(take(&store, "odd", odd, 1, T0).await?, Grant::Granted);
    assert_eq!(
        take(&store, "odd", odd, 1, T0).await?,
        Grant::RetryAt(T0 + 143)
    );
    assert_eq!(take(&store, "odd", odd, 1, T0 + 143).await?, Grant::Granted);
    assert_eq!(
        take(&store, "odd", odd, 1, T0 + 143).await?,
        Grant::RetryAt(T0 + 286)
    );
    Ok(())
}

pub(crate) async fn limits_reserve_within_max_wait<S: Store>(store: S) -> Result<()> {
    // One per 100 ms, one at a time.
    let rpm = rate(600, 60_000, 1);
    let wait = Duration::from_millis(250);
    let reserve = |now| store.take_capacity("k", rpm, 1, wait, now);

    // Each waiting caller gets its own time, as long as it is within the wait.
    assert_eq!(reserve(T0).await?, Grant::Granted);
    assert_eq!(reserve(T0).await?, Grant::Reserved(T0 + 100));
    assert_eq!(reserve(T0).await?, Grant::Reserved(T0 + 200));
    // T0 + 300 is too far: nothing is taken, and from T0 + 50 it is near enough.
    assert_eq!(reserve(T0).await?, Grant::RetryAt(T0 + 50));
    assert_eq!(reserve(T0 + 49).await?, Grant::RetryAt(T0 + 50));
    // Nobody jumps the queue of reservations.
    assert_eq!(
        take(&store, "k", rpm, 1, T0 + 150).await?,
        Grant::RetryAt(T0 + 300)
    );
    assert_eq!(reserve(T0 + 50).await?, Grant::Reserved(T0 + 300));
    assert_eq!(take(&store, "k", rpm, 1, T0 + 400).await?, Grant::Granted);

    // Reserved times are rounded up to the millisecond, never down.
    let odd = rate(7, 1_000, 1);
    let wait = Duration::from_secs(1);
    for expected in [None, Some(T0 + 143), Some(T0 + 286)] {
        let grant = store.take_capacity("odd", odd, 1, wait, T0).await?;
        assert_eq!(grant, expected.map_or(Grant::Granted, Grant::Reserved));
    }
    Ok(())
}

pub(crate) async fn limits_adjust_to_real_costs<S: Store>(store: S) -> Result<()> {
    // 6 000 tokens per minute: 10 ms per token, 1 000 (10 s) at once.
    let tpm = rate(6_000, 60_000, 1_000);
    let key = "openai/gpt-4o:tpm";
    assert_eq!(take(&store, key, tpm, 800, T0).await?, Grant::Granted);
    // 300 more fit once 100 have come back: in 1 s.
    assert_eq!(
        take(&store, key, tpm, 300, T0).await?,
        Grant::RetryAt(T0 + 1_000)
    );

    // The call used 300 tokens, not 800: 500 come back at once.
    store.adjust_capacity(key, tpm, -500, T0).await?;
    assert_eq!(take(&store, key, tpm, 300, T0).await?, Grant::Granted);
    // This one used 2 300, not 300: 2 000 more are charged, granted or not.
    store.adjust_capacity(key, tpm, 2_000, T0).await?;
    assert_eq!(
        take(&store, key, tpm, 1, T0).await?,
        Grant::RetryAt(T0 + 16_010)
    );
    // A charge leaves the key owing at most one window past an empty bucket.
    store.adjust_capacity(key, tpm, 1_000_000, T0).await?;
    assert_eq!(
        take(&store, key, tpm, 1, T0).await?,
        Grant::RetryAt(T0 + 60_010)
    );
    // A give-back fills the bucket to its burst, no more.
    store
        .adjust_capacity(key, tpm, -1_000_000_000, T0 + 100)
        .await?;
    assert_eq!(take(&store, key, tpm, 0, T0 + 100).await?, Grant::Granted);
    assert_eq!(
        take(&store, key, tpm, 1_000, T0 + 100).await?,
        Grant::Granted
    );
    assert_eq!(
        take(&store, key, tpm, 1, T0 + 100).await?,
        Grant::RetryAt(T0 + 110)
    );

    // Giving back to a key never taken from changes nothing; zero is nothing.
    store.adjust_capacity("new", tpm, -400, T0).await?;
    store.adjust_capacity("new", tpm, 0, T0).await?;
    assert_eq!(take(&store, "new", tpm, 1_000, T0).await?, Grant::Granted);

    // A cost over the burst could never be granted; a rate that grants
    // nothing is refused.
    match take(&store, key, tpm, 1_001, T0 + 100_000).await {
        Err(Error::OverBurst {
            key: k,
            cost,
            burst,
        }) => {
            assert_eq!((k.as_str(), cost, burst), (key, 1_001, 1_000));
        }
        other => panic!("expected OverBurst, got {other:?}"),
    }
    for bad in [rate(0, 60_000, 1), rate(1, 0, 1), rate(1, 60_000, 0)] {
        assert!(matches!(
            take(&store, key, bad, 0, T0).await,
            Err(Error::InvalidRate { .. })
        ));
        assert!(matches!(
            store.adjust_capacity(key, bad, 1, T0).await,
            Err(Error::InvalidRate { .. })
        ));
    }
    Ok(())
}

pub(crate) async fn limits_hold_closes_a_key<S: Store>(store: S) -> Result<()> {
    // One per 100 ms, 3 at once.
    let rpm = rate(600, 60_000, 3);
    let key = "openai/gpt-4o:rpm";
    assert_eq!(take(&store, key, rpm, 1, T0).await?, Grant::Granted);

    // A 429 with Retry-After: 5 s. Nothing is granted before then, not
    // even for a time within a take's wait, ...
    store.hold_capacity(key, T0 + 5_000).await?;
    assert_eq!(
        take(&store, key, rpm, 1, T0 + 1).await?,
        Grant::RetryAt(T0 + 5_000)
    );
    let waiting = store
        .take_capacity(key, rpm, 1, Duration::from_secs(1), T0 + 1)
        .await?;
    assert_eq!(waiting, Grant::RetryAt(T0 + 4_000));
    // ... a shorter hold does not shorten it, a give-back does not reopen it ...
    store.hold_capacity(key, T0 + 2_000).await?;
    store.adjust_capacity(key, rpm, -10, T0 + 2_000).await?;
    assert_eq!(
        take(&store, key, rpm, 1, T0 + 4_999).await?,
        Grant::RetryAt(T0 + 5_000)
    );
    // ... and other keys go on.
    assert_eq!(take(&store, "other", rpm, 1, T0 + 1).await?, Grant::Granted);

    // From then on the limit goes on as before: the refused takes took
    // nothing, so the bucket is full.
    for _ in 0..3 {
        assert_eq!(take(&store, key, rpm, 1, T0 + 5_000).await?, Grant::Granted);
    }
    assert_eq!(
        take(&store, key, rpm, 1, T0 + 5_000).await?,
        Grant::RetryAt(T0 + 5_100)
    );

    // A key held before it was ever taken from; a wait reaching past the
    // hold reserves its end.
    store.hold_capacity("fresh", T0 + 7_000).await?;
    let reserved = store
        .take_capacity("fresh", rpm, 1, Duration::from_secs(3), T0 + 5_000)
        .await?;
    assert_eq!(reserved, Grant::Reserved(T0 + 7_000));
    assert_eq!(
        take(&store, "fresh", rpm, 1, T0 + 6_999).await?,
        Grant::RetryAt(T0 + 7_000)
    );
    assert_eq!(
        take(&store, "fresh", rpm, 1, T0 + 7_000).await?,
        Grant::Granted
    );
    Ok(())
}

/// Submits, then appends, from many concurrent "workers" (each append under
/// its own lease), and prints the rates. Not an assertion: run it with
/// `--ignored --nocapture`. (Release builds are about twice as fast.)
pub(crate) async fn write_throughput<S: Store>(store: S) -> Result<()> {
    const WORKERS: usize = 200;
    const SUBMITS: usize = 25;
    const STEPS: Seq = 100;

    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let store = store.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..SUBMITS {
                submit_run(&store, T0).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for worker in workers {
        worker.await.expect("worker panicked")?;
    }
    report("submits", WORKERS * SUBMITS, started.elapsed());

    let tasks = store
        .claim("bench", WORKERS as u32, Duration::from_secs(3600), T0)
        .await?;
    assert_eq!(tasks.len(), WORKERS);

    // Plain appends: one event each, the task kept.
    let started = Instant::now();
    let mut workers = Vec::new();
    for task in tasks.clone() {
        let store = store.clone();
        workers.push(tokio::spawn(async move {
            for seq in 1..=STEPS {
                let mut step = append(task.run_id, seq, Some(task.lease), vec![output(200)]);
                step.projection.steps = seq as u32;
                store.append(step).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for worker in workers {
        worker.await.expect("worker panicked")?;
    }
    report("appends", WORKERS * STEPS as usize, started.elapsed());

    // Appends the way the engine makes a step: the task is completed and
    // the next one created leased to the same worker, which goes on with it.
    let started = Instant::now();
    let mut workers = Vec::new();
    for task in tasks {
        let store = store.clone();
        workers.push(tokio::spawn(async move {
            let mut lease = task.lease;
            for seq in STEPS + 1..=2 * STEPS {
                let mut step = append(task.run_id, seq, Some(lease), vec![output(200)]);
                step.task = TaskUpdate::Complete;
                step.new_tasks = vec![NewTask {
                    lease_to: Some(LeaseTo::new("bench", T0 + 3_600_000)),
                    ..new_task(TaskKind::Tools, T0)
                }];
                let appended = store.append(step).await?;
                lease = appended.leased[0].lease;
            }
            Ok::<_, Error>(())
        }));
    }
    for worker in workers {
        worker.await.expect("worker panicked")?;
    }
    report("step appends", WORKERS * STEPS as usize, started.elapsed());
    Ok(())
}

/// How fast retention deletes: 10,000 ended runs of 10 events (~2.5 KB of
/// journal each) are made, then swept 500 a transaction.
pub(crate) async fn purge_throughput<S: Store>(store: S) -> Result<()> {
    const WORKERS: usize = 200;
    const RUNS: usize = 50;

    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let store = store.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..RUNS {
                let run_id = submit_run(&store, T0).await?;
                let mut events: Vec<Event> = (0..8).map(|_| output(200)).collect();
                events.push(Event::RunCompleted {
                    output: "done".into(),
                });
                let mut end = append(run_id, 1, None, events);
                end.clear_tasks = true;
                end.projection = projection(Status::Completed);
                store.append(end).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for worker in workers {
        worker.await.expect("worker panicked")?;
    }
    let runs = WORKERS * RUNS;
    // Every run ended at T0 + 1; ids carry the wall clock, so the cutoff
    // is later than both.
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
        + 3_600_000;
    let started = Instant::now();
    let deleted = sweep(&store, later, 500).await?;
    let elapsed = started.elapsed();
    assert_eq!(deleted.len(), runs);
    let rate = runs as f64 / elapsed.as_secs_f64();
    println!(
        "{runs} ended runs of 10 events purged 500 a transaction in {elapsed:.2?}: {rate:.0} runs/s"
    );
    Ok(())
}

fn output(size: usize) -> Event {
    Event::ToolCallCompleted {
        step: 1,
        call_index: 0,
        call_id: "call_1".to_string(),
        output: "x".repeat(size),
        is_error: false,
    }
}

fn report(what: &str, count: usize, elapsed: Duration) {
    let rate = count as f64 / elapsed.as_secs_f64();
    println!("{count} {what} from 200 tasks in {elapsed:.2?}: {rate:.0} {what}/s");
}

/// A database file in the temp dir, deleted (with its WAL) when dropped.
struct TempDb {
    path: std::path::PathBuf,
}

impl TempDb {
    fn new() -> TempDb {
        let name = format!("keel-store-test-{}.db", uuid::Uuid::now_v7());
        TempDb {
            path: std::env::temp_dir().join(name),
        }
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

store_suite!(sqlite, async {
    let db = TempDb::new();
    let store = crate::sqlite::SqliteStore::open(&db.path).await?;
    Ok::<_, Error>(Some((store, db)))
});

store_suite!(postgres, crate::postgres::tests::open());

/// A batch of streamed text for `task`'s step.
fn delta_batch(task: &Task, attempt: DeltaAttempt, text: &str, now: Millis) -> DeltaBatch {
    DeltaBatch {
        run_id: task.run_id,
        lease: task.lease,
        step: task.step,
        attempt,
        text: text.to_string(),
        tool_calls: Vec::new(),
        now,
    }
}

fn pos(step: u32, attempt: u32, idx: u32) -> DeltaPos {
    DeltaPos { step, attempt, idx }
}

/// The positions and texts of a run's deltas after `after`.
async fn delta_texts<S: Store>(
    store: &S,
    run_id: RunId,
    after: Option<DeltaPos>,
) -> Result<Vec<(DeltaPos, String)>> {
    let page = store.deltas(run_id, after, 100).await?;
    Ok(page
        .deltas
        .into_iter()
        .map(|Delta { pos, text, .. }| (pos, text))
        .collect())
}

pub(crate) async fn deltas_are_fenced_ordered_and_announced<S: Store>(store: S) -> Result<()> {
    let run_id = submit_run(&store, T0).await?;
    let mut commits = store.subscribe();
    let task = claim_one(&store, "a", Duration::from_millis(100), T0).await?;
    assert_eq!((task.step, task.attempts), (1, 1));

    // The first batch opens the task's attempt; later ones go on with it.
    let first = delta_batch(&task, DeltaAttempt::Open(task.attempts), "Hel", T0 + 1);
    assert_eq!(store.append_deltas(first).await?, pos(1, 1, 0));
    let heard = tokio::time::timeout(Duration::from_secs(5), commits.recv())
        .await
        .expect("a notification in time")
        .expect("the channel is open");
    assert_eq!(
        heard,
        Committed {
            run_id,
            last_seq: 1,
            new_work: false
        }
    );
    for (idx, text) in [(1, "lo, "), (2, "wor")] {
        let next = DeltaAttempt::Continue { attempt: 1, idx };
        assert_eq!(
            store
                .append_deltas(delta_batch(&task, next, text, T0 + 2))
                .await?,
            pos(1, 1, idx)
        );
    }
    // A position written twice is refused and changes nothing.
    let again = delta_batch(
        &task,
        DeltaAttempt::Continue { attempt: 1, idx: 2 },
        "x",
        T0 + 3,
    );
    assert!(matches!(
        store.append_deltas(again).await,
        Err(Error::Conflict(_))
    ));

    // A batch of tool calls (one starting, one going on) with no text.
    let calls = vec![
        ToolCallDelta {
            index: 0,
            id: None,
            name: None,
            arguments: "\"x\"}".to_string(),
        },
        ToolCallDelta {
            index: 1,
            id: Some("call_2".to_string()),
            name: Some("lookup".to_string()),
            arguments: "{\"q\": ".to_string(),
        },
    ];
    let mut tools = delta_batch(
        &task,
        DeltaAttempt::Continue { attempt: 1, idx: 3 },
        "",
        T0 + 4,
    );
    tools.tool_calls = calls.clone();
    assert_eq!(store.append_deltas(tools).await?, pos(1, 1, 3));

    let page = store.deltas(run_id, None, 100).await?;
    assert_eq!(page.last_seq, 1);
    assert_eq!(page.deltas[0].at, T0 + 1);
    assert!(page.deltas[..3].iter().all(|d| d.tool_calls.is_empty()));
    assert_eq!(
        (page.deltas[3].text.as_str(), &page.deltas[3].tool_calls),
        ("", &calls)
    );
    let page = store.deltas(run_id, Some(pos(1, 1, 2)), 100).await?;
    assert_eq!(page.deltas.len(), 1);
    assert_eq!(page.deltas[0].tool_calls, calls);
    assert_eq!(
        delta_texts(&store, run_id, None).await?,
        vec![
            (pos(1, 1, 0), "Hel".to_string()),
            (pos(1, 1, 1), "lo, ".to_string()),
            (pos(1, 1, 2), "wor".to_string()),
            (pos(1, 1, 3), String::new()),
        ]
    );
    // From a position on; a page stops at its limit.
    let after = delta_texts(&store, run_id, Some(pos(1, 1, 0))).await?;
    assert_eq!(after.len(), 3);
    assert_eq!(after[0].0, pos(1, 1, 1));
    let page = store.deltas(run_id, None, 1).await?;
    assert_eq!(page.deltas.len(), 1);

    // The lease expires and another worker takes the task over: the first
    // worker's writes are refused, the new one opens attempt 2, read after
    // attempt 1's deltas.
    let takeover = claim_one(&store, "b", LEASE, T0 + 200).await?;
    let stale = delta_batch(
        &task,
        DeltaAttempt::Continue { attempt: 1, idx: 4 },
        "ld",
        T0 + 201,
    );
    assert!(matches!(
        store.append_deltas(stale).await,
        Err(Error::LeaseLost(id)) if id == task.lease.task_id
    ));
    let opened = delta_batch(
        &takeover,
        DeltaAttempt::Open(takeover.attempts),
        "Hi",
        T0 + 202,
    );
    assert_eq!(store.append_deltas(opened).await?, pos(1, 2, 0));
    // An attempt opened again with an old count (a task given back without
    // counting its attempt) still gets a new number.
    let reopened = delta_batch(&takeover, DeltaAttempt::Open(1), "Hey", T0 + 203);
    assert_eq!(store.append_deltas(reopened).await?, pos(1, 3, 0));
    let texts = delta_texts(&store, run_id, Some(pos(1, 1, 3))).await?;
    assert_eq!(
        texts,
        vec![
            (pos(1, 2, 0), "Hi".to_string()),
            (pos(1, 3, 0), "Hey".to_string())
        ]
    );

    // A lease of another run does not fence this one.
    let other = submit_run(&store, T0).await?;
    let mut foreign = delta_batch(&takeover, DeltaAttempt::Open(1), "no", T0 + 204);
    foreign.run_id = other;
    assert!(matches!(
        store.append_deltas(foreign).await,
        Err(Error::LeaseLost(_))
    ));
    assert!(delta_texts(&store, other, None).await?.is_empty());

    assert!(matches!(
        store.deltas(RunId::new(), None, 10).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

pub(crate) async fn deltas_are_compacted_by_the_journal<S: Store>(store: S) -> Result<()> {
    let run_id = submit_run(&store, T0).await?;
    let other = submit_run(&store, T0).await?;
    let mut tasks = store.claim("a", 10, LEASE, T0).await?;
    tasks.sort_by_key(|t| t.run_id != run_id);
    let (task, other_task) = (tasks[0].clone(), tasks[1].clone());
    for t in [&task, &other_task] {
        let mut batch = delta_batch(t, DeltaAttempt::Open(1), "partial", T0 + 1);
        batch.tool_calls = vec![ToolCallDelta {
            index: 0,
            id: Some("call_1".to_string()),
            name: Some("lookup".to_string()),
            arguments: "{}".to_string(),
        }];
        store.append_deltas(batch).await?;
    }

    // The append journaling step 1's answer deletes step 1's deltas, in the
    // same commit, and leaves the step's final message in the journal.
    let answer = Event::LlmCompleted {
        step: 1,
        message: keel_core::message::Message::assistant(Some("partial answer".into()), vec![]),
        usage: Usage::default(),
        model: "m".to_string(),
        cost_usd: None,
    };
    let mut next = append(run_id, 1, Some(task.lease), vec![answer]);
    next.task = TaskUpdate::Complete;
    next.new_tasks = vec![NewTask {
        step: 2,
        lease_to: Some(LeaseTo::new("a", T0 + LEASE_MS)),
        ..new_task(TaskKind::Llm, T0)
    }];
    let appended = store.append(next).await?;
    let page = store.deltas(run_id, None, 100).await?;
    assert_eq!((page.last_seq, page.deltas.len()), (2, 0));
    // Another run's deltas stay.
    assert_eq!(delta_texts(&store, other, None).await?.len(), 1);

    // Step 2 streams, then the run ends: every delta of the run goes.
    let step2 = appended.leased[0].clone();
    for attempt in [
        DeltaAttempt::Open(1),
        DeltaAttempt::Continue { attempt: 1, idx: 1 },
    ] {
        store
            .append_deltas(delta_batch(&step2, attempt, "more", T0 + 2))
            .await?;
    }
    assert_eq!(
        delta_texts(&store, run_id, None)
            .await?
            .first()
            .map(|d| d.0),
        Some(pos(2, 1, 0))
    );
    let mut cancel = append(
        run_id,
        2,
        Some(step2.lease),
        vec![Event::RunCancelled {
            reason: "stop".to_string(),
        }],
    );
    cancel.task = TaskUpdate::Complete;
    cancel.clear_tasks = true;
    cancel.projection = projection(Status::Cancelled);
    store.append(cancel).await?;
    assert!(delta_texts(&store, run_id, None).await?.is_empty());
    assert_eq!(delta_texts(&store, other, None).await?.len(), 1);
    Ok(())
}

pub(crate) async fn limits_count_the_active_keys_under_a_prefix<S: Store>(store: S) -> Result<()> {
    // One per second.
    let share = rate(60, 60_000, 1);
    let prefix = "llm:openai/gpt-4o:requests:flow:";
    let a = format!("{prefix}default/a");
    let b = format!("{prefix}default/b");
    assert_eq!(store.active_limits(prefix, &a, T0).await?, 0);
    assert_eq!(take(&store, &a, share, 1, T0).await?, Grant::Granted);
    assert_eq!(take(&store, &b, share, 1, T0).await?, Grant::Granted);
    // Keys outside the prefix do not count.
    assert_eq!(
        take(&store, "llm:other", share, 1, T0).await?,
        Grant::Granted
    );
    // Each owes a second from T0: both are active until T0 + 1 s, and the
    // one asking is left out.
    assert_eq!(store.active_limits(prefix, &a, T0).await?, 1);
    assert_eq!(store.active_limits(prefix, "", T0 + 999).await?, 2);
    assert_eq!(store.active_limits(prefix, "", T0 + 1_000).await?, 0);
    // A give-back leaves a key owing nothing beyond `now`: active up to it.
    assert_eq!(
        take(&store, &b, share, 1, T0 + 5_000).await?,
        Grant::Granted
    );
    store.adjust_capacity(&b, share, -1, T0 + 5_000).await?;
    assert_eq!(store.active_limits(prefix, &a, T0 + 4_999).await?, 1);
    assert_eq!(store.active_limits(prefix, &a, T0 + 5_000).await?, 0);
    Ok(())
}

fn breaker_record(endpoint: &str, phase: Phase, process: &str, at: Millis) -> BreakerRecord {
    let open = phase != Phase::Closed;
    BreakerRecord {
        endpoint: endpoint.to_string(),
        phase,
        until: open.then_some(at + 30_000),
        opened_at: open.then_some(at),
        failures: if phase == Phase::Open { 5 } else { 0 },
        process: process.to_string(),
        updated_at: at,
    }
}

pub(crate) async fn breakers_keep_each_endpoints_latest_transition<S: Store>(
    store: S,
) -> Result<()> {
    assert!(store.breakers().await?.is_empty());
    let a = "openai@http://a/v1";
    let b = "anthropic@http://b/v1";
    let opened = breaker_record(a, Phase::Open, "p1", T0);
    store.put_breaker(opened.clone()).await?;
    assert_eq!(store.breakers().await?, vec![opened]);

    // A later transition replaces it, whichever process made it; an older
    // one (a slow writer) does not.
    let trial = breaker_record(a, Phase::HalfOpen, "p2", T0 + 30_000);
    store.put_breaker(trial.clone()).await?;
    store
        .put_breaker(breaker_record(a, Phase::Closed, "p1", T0 + 10))
        .await?;
    let other = breaker_record(b, Phase::Closed, "p1", T0 + 5);
    store.put_breaker(other.clone()).await?;
    // By endpoint.
    assert_eq!(store.breakers().await?, vec![other, trial]);
    let closed = breaker_record(a, Phase::Closed, "p1", T0 + 30_001);
    store.put_breaker(closed.clone()).await?;
    assert_eq!(store.breakers().await?[1], closed);
    Ok(())
}

/// An append creates child runs (run row, first event, queued first task)
/// in its commit, and queues tasks for other runs; a child id that exists
/// fails the whole append.
async fn appends_spawn_child_runs_and_wake_other_runs<S: Store>(store: S) -> Result<()> {
    let parent = submit_run(&store, T0).await?;
    let task = claim_one(&store, "w", LEASE, T0).await?;
    let children: Vec<Submission> = (0..3)
        .map(|i| {
            let mut child = submission("t", "kid", json!({"part": i}), Some("ignored"));
            child.run_id = parent.child(1, 0, i);
            child.idempotency_key = None;
            child.now = T0 + 1;
            child
        })
        .collect();
    let mut spawn = append(parent, 1, Some(task.lease), vec![rejected(1, "spawned")]);
    spawn.task = TaskUpdate::Complete;
    spawn.spawn = children.clone();
    let mut heard = store.subscribe();
    store.append(spawn).await?;
    let mut announced = HashSet::new();
    while let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(500), heard.recv()).await {
        if c.new_work {
            announced.insert(c.run_id);
        }
        if announced.len() == 3 {
            break;
        }
    }
    for child in &children {
        let row = store.get_run(child.run_id).await?.expect("child run row");
        assert_eq!(row.agent, "kid");
        assert_eq!(row.projection.status, Status::Pending);
        assert_eq!(row.last_seq, 1);
        let events = store.events(child.run_id, 0, 10).await?;
        assert_eq!(events.len(), 1);
        assert!(matches!(events[0].event, Event::RunSubmitted { .. }));
        assert!(announced.contains(&child.run_id), "{announced:?}");
    }
    let claimed = store.claim("w", 10, LEASE, T0 + 2).await?;
    assert_eq!(
        runs_of(&claimed),
        children.iter().map(|c| c.run_id).collect::<HashSet<_>>()
    );

    // A child wakes its parent: a queued task of the other run.
    let child = &claimed[0];
    let mut wake = append(
        child.run_id,
        1,
        Some(child.lease),
        vec![Event::RunCompleted {
            output: "done".into(),
        }],
    );
    wake.task = TaskUpdate::Complete;
    wake.clear_tasks = true;
    wake.projection = projection(Status::Completed);
    wake.wake = vec![RunTask {
        run_id: parent,
        task: NewTask {
            lease_to: Some(LeaseTo::new("ignored", T0 + LEASE_MS)),
            ..new_task(TaskKind::Children, T0 + 1)
        },
    }];
    let appended = store.append(wake).await?;
    assert!(appended.leased.is_empty(), "a wake task is never leased");
    let woken = claim_one(&store, "w2", LEASE, T0 + 3).await?;
    assert_eq!(woken.run_id, parent);
    assert_eq!(woken.kind, TaskKind::Children);

    // Spawning the same child again fails the append and writes nothing.
    let mut again = append(parent, 2, None, vec![rejected(2, "again")]);
    again.spawn = vec![children[0].clone()];
    assert!(store.append(again).await.is_err());
    assert_eq!(event_count(&store, parent).await?, 2);
    Ok(())
}

/// An external worker's task on `queue` for call `call_index` of step 1.
fn queued_task(queue: &str, call_index: u32, run_at: Millis) -> NewTask {
    NewTask {
        queue: Some(QueuedCall {
            queue: queue.to_string(),
            call_index,
        }),
        ..new_task(TaskKind::External, run_at)
    }
}

pub(crate) async fn queued_tasks_are_leased_from_their_queue_only<S: Store>(
    store: S,
) -> Result<()> {
    let run_id = submit_run(&store, T0).await?;
    let llm = claim_one(&store, "engine", LEASE, T0).await?;
    let mut step = append(run_id, 1, Some(llm.lease), vec![rejected(1, "x")]);
    step.task = TaskUpdate::Complete;
    step.new_tasks = vec![
        queued_task("q", 0, T0),
        queued_task("q", 1, T0),
        queued_task("other", 2, T0),
    ];
    store.append(step).await?;

    // The engine never sees them, nor sleeps until they are due.
    assert!(store.claim("engine", 10, LEASE, T0 + 5).await?.is_empty());
    assert_eq!(store.next_due(T0).await?, None);

    let first = store.claim_queued("q", "w1", LEASE, T0 + 5).await?;
    let first = first.expect("a task of queue q");
    let second = store.claim_queued("q", "w2", LEASE, T0 + 5).await?;
    let second = second.expect("the other task of queue q");
    assert!(
        store
            .claim_queued("q", "w3", LEASE, T0 + 5)
            .await?
            .is_none()
    );
    assert!(
        store
            .claim_queued("nope", "w3", LEASE, T0 + 5)
            .await?
            .is_none()
    );
    assert_eq!(
        (first.kind, first.run_id, first.step),
        (TaskKind::External, run_id, 1)
    );
    assert_eq!((first.attempts, first.lease_until), (1, T0 + 5 + LEASE_MS));

    let seen = store.queued(first.lease.task_id, T0 + 6).await?;
    let seen = seen.expect("the leased task");
    assert_eq!(seen.run_id, run_id);
    assert_eq!(seen.lease_token, Some(first.lease.token));
    let mut calls = vec![seen.call.call_index];
    let other = store.queued(second.lease.task_id, T0 + 6).await?;
    calls.push(other.expect("the other leased task").call.call_index);
    calls.sort_unstable();
    assert_eq!(calls, vec![0, 1]);
    assert!(store.queued(llm.lease.task_id, T0 + 6).await?.is_none());

    // One lease is extended, fenced by its token.
    let stale = Lease {
        token: first.lease.token.wrapping_add(1),
        ..first.lease
    };
    let until = T0 + 10 + 2 * LEASE_MS;
    assert!(matches!(
        store.extend_lease(stale, until, T0 + 10).await,
        Err(Error::LeaseLost(_))
    ));
    store.extend_lease(first.lease, until, T0 + 10).await?;

    // The second worker dies: its task is leased again, and it is fenced.
    let later = T0 + 5 + LEASE_MS + 1;
    let again = store.claim_queued("q", "w3", LEASE, later).await?;
    let again = again.expect("the expired task");
    assert_eq!(
        (again.lease.task_id, again.attempts),
        (second.lease.task_id, 2)
    );
    assert!(matches!(
        store
            .extend_lease(second.lease, later + LEASE_MS, later)
            .await,
        Err(Error::LeaseLost(_))
    ));
    let mut late = append(run_id, 2, Some(second.lease), Vec::new());
    late.task = TaskUpdate::Complete;
    late.now = later;
    assert!(matches!(store.append(late).await, Err(Error::LeaseLost(_))));

    // The first is done; the retaken one goes to the dead-letter queue and
    // a re-drive puts it back in its queue, with its call.
    let mut done = append(run_id, 2, Some(first.lease), vec![rejected(1, "y")]);
    done.task = TaskUpdate::Complete;
    done.now = later;
    store.append(done).await?;
    assert!(store.queued(first.lease.task_id, later).await?.is_none());
    let mut park = append(run_id, 3, Some(again.lease), vec![rejected(1, "z")]);
    park.task = TaskUpdate::DeadLetter {
        error: "gave up".to_string(),
    };
    park.now = later;
    store.append(park).await?;
    assert!(store.claim_queued("q", "w4", LEASE, later).await?.is_none());
    let id = again.lease.task_id;
    let mut redrive = append(run_id, 4, None, vec![Event::TaskRedriven { task_id: id }]);
    redrive.redrive = Some(id);
    redrive.now = later + 1;
    store.append(redrive).await?;
    assert!(
        store
            .claim("engine", 10, LEASE, later + 2)
            .await?
            .is_empty()
    );
    let back = store.claim_queued("q", "w4", LEASE, later + 2).await?;
    assert_eq!(back.map(|t| (t.lease.task_id, t.attempts)), Some((id, 1)));
    let back = store
        .queued(id, later + 2)
        .await?
        .expect("the re-driven task");
    assert_eq!(
        back.call,
        calls_of("q", other_call(&calls, seen.call.call_index))
    );
    Ok(())
}

fn calls_of(queue: &str, call_index: u32) -> QueuedCall {
    QueuedCall {
        queue: queue.to_string(),
        call_index,
    }
}

/// The call of `calls` that is not `one`.
fn other_call(calls: &[u32], one: u32) -> u32 {
    calls.iter().copied().find(|c| *c != one).unwrap_or(one)
}
