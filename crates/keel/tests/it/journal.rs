//! Journal growth: a 200-step run journals only what is new at each step.

use std::time::{Duration, Instant};

use keel::embedded;
use keel::mock::Mock;
use keel::service::{Service, Submit};
use keel_core::{Agent, Event};
use keel_engine::{Engine, Options};
use keel_store::Store;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::TempDir;

#[tokio::test]
async fn journal_grows_linearly_over_200_steps() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let db = embedded::open(&dir.db()).await.expect("open");
    let store = db.store.clone();
    let svc = Service::new(store.clone());
    let agent = Agent::from_value(json!({
        "name": "long", "version": "1",
        "model": {"provider": "openai", "model": "tools:200", "base_url": mock.llm_url()},
        "tools": [{"name": "echo", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
                   "http": {"url": mock.tool_url("echo")}}],
        "limits": {"max_steps": 201}
    }))
    .expect("spec");
    svc.register("default", &agent).await.expect("register");
    let cancel = CancellationToken::new();
    let pool = tokio::spawn(Engine::new(store.clone(), Options::default()).run(cancel.clone()));
    let run = svc
        .submit(Submit {
            tenant: "default".into(),
            agent: "long".into(),
            version: None,
            input: json!("go"),
            idempotency_key: None,
            priority: Default::default(),
            callback_url: None,
        })
        .await
        .expect("submit");

    let deadline = Instant::now() + Duration::from_secs(120);
    let events = loop {
        let events = store.events(run.run_id, 0, u32::MAX).await.expect("events");
        if events.last().is_some_and(|r| r.event.is_terminal()) {
            break events;
        }
        assert!(Instant::now() < deadline, "the 200-step run did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cancel.cancel();
    let _ = pool.await;
    assert!(matches!(
        events.last().map(|r| &r.event),
        Some(Event::RunCompleted { .. })
    ));

    // Bytes journaled per step, as stored (the JSON of each event).
    let mut per_step = vec![0usize; 202];
    for r in &events {
        let step = match &r.event {
            Event::LlmCompleted { step, .. }
            | Event::ToolCallStarted { step, .. }
            | Event::ToolCallCompleted { step, .. } => *step as usize,
            _ => 0,
        };
        per_step[step] += serde_json::to_string(&r.event).expect("json").len();
    }
    let avg = |range: std::ops::RangeInclusive<usize>| {
        let n = range.clone().count();
        range.map(|s| per_step[s]).sum::<usize>() as f64 / n as f64
    };
    let early = avg(11..=20);
    let late = avg(191..=200);
    assert!(early > 0.0);
    // Flat: step 200 costs what step 20 cost (digits of bigger numbers aside).
    assert!(
        late / early < 1.15,
        "bytes per step grew from {early:.0} to {late:.0}"
    );
    let total_20: usize = per_step[..=20].iter().sum();
    let total_200: usize = per_step[..=200].iter().sum();
    assert!(
        (total_200 as f64) / (total_20 as f64) < 11.0,
        "journal grew faster than linearly: {total_20} -> {total_200}"
    );
}
