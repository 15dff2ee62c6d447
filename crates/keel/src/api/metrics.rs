//! `GET /metrics`: Prometheus text exposition (0.0.4) of this process's
//! counters and histograms (`keel_engine::metrics`) and of gauges read
//! from the store at scrape time: the queue by queue, kind and state, the
//! unfinished runs by status, the dead letters, the outbox backlog, the
//! circuit breakers. Served by every role.
//!
//! The store's reads are bounded by [`STORE_BUDGET`]: a store that fails or
//! does not answer in time leaves its gauges out, with `keel_store_up 0`,
//! and the process's own metrics are still served (a scrape never waits
//! for a database that is away, and never loses the counters).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use keel_engine::metrics::{self as m, Exposition};
use keel_store::{ExportStatus, Stats, Store, TaskState};

use super::{Api, Tenant};
use crate::events::RELAY_LEASE;

/// Longest the store's reads may take in one scrape (Prometheus's default
/// scrape timeout is 10 s).
pub const STORE_BUDGET: Duration = Duration::from_secs(3);

/// The label value of the engine's own queue (tasks without an external
/// workers' queue).
const INTERNAL_QUEUE: &str = "internal";

/// What a scrape read from the store.
struct Read {
    stats: Stats,
    export: ExportStatus,
    breakers: Vec<keel_store::BreakerRecord>,
}

pub(super) async fn metrics<S: Store>(State(svc): Api<S>, tenant: Tenant) -> Response {
    if let Err(e) = tenant.operator("/metrics") {
        return e.into_response();
    }
    let at = keel_engine::now();
    let started = Instant::now();
    let read = tokio::time::timeout(STORE_BUDGET, async {
        Ok::<_, keel_store::Error>(Read {
            stats: svc.store.stats(at).await?,
            export: svc.store.export_status(RELAY_LEASE, at).await?,
            breakers: svc.store.breakers().await?,
        })
    })
    .await;
    let elapsed = started.elapsed();
    let read = match read {
        Ok(Ok(read)) => Some(read),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: could not read the store");
            None
        }
        Err(_) => {
            tracing::warn!(
                budget = ?STORE_BUDGET,
                "metrics: the store did not answer in time"
            );
            None
        }
    };

    let mut out = Exposition::new();
    out.family(&m::BUILD_INFO);
    out.sample(&m::BUILD_INFO, &[env!("CARGO_PKG_VERSION")], 1.0);
    out.family(&m::STORE_UP);
    out.sample(&m::STORE_UP, &[], if read.is_some() { 1.0 } else { 0.0 });
    out.family(&m::STORE_SCRAPE_DURATION);
    out.sample(&m::STORE_SCRAPE_DURATION, &[], elapsed.as_secs_f64());
    // This process's breakers, with the store's view when it answered.
    let shared = read.as_ref().map_or(&[][..], |r| &r.breakers[..]);
    write_breakers(&mut out, &svc.providers.breakers.views(shared, at));
    if let Some(read) = &read {
        write_store(&mut out, read, at);
    }
    m::registry().write(&mut out);
    ([(header::CONTENT_TYPE, m::CONTENT_TYPE)], out.into_text()).into_response()
}

fn write_breakers(out: &mut Exposition, views: &[keel_engine::gateway::EndpointView]) {
    out.family(&m::BREAKER_STATE);
    for view in views {
        for state in ["closed", "open", "half_open"] {
            let on = if view.breaker.state == state {
                1.0
            } else {
                0.0
            };
            out.sample(&m::BREAKER_STATE, &[&view.endpoint, state], on);
        }
    }
    out.family(&m::BREAKER_OPENED);
    for view in views {
        out.sample(
            &m::BREAKER_OPENED,
            &[&view.endpoint],
            view.breaker.opened as f64,
        );
    }
}

fn write_store(out: &mut Exposition, read: &Read, at: keel_core::Millis) {
    // Summed by label set: an external queue named like the engine's
    // differs by kind (`external`), but a label set must never repeat.
    let mut tasks: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
    let mut waited: BTreeMap<(&str, &str), keel_core::Millis> = BTreeMap::new();
    for count in &read.stats.tasks {
        let queue = count.queue.as_deref().unwrap_or(INTERNAL_QUEUE);
        let key = (queue, count.kind.as_str(), count.state.as_str());
        *tasks.entry(key).or_default() += count.count;
        if count.state == TaskState::Ready {
            let since = waited.entry((queue, count.kind.as_str())).or_insert(at);
            *since = count.earliest.min(*since);
        }
    }
    out.family(&m::STORE_TASKS);
    for ((queue, kind, state), count) in tasks {
        out.sample(&m::STORE_TASKS, &[queue, kind, state], count as f64);
    }
    out.family(&m::STORE_READY_AGE);
    for ((queue, kind), since) in waited {
        let age = at.saturating_sub(since).max(0) as f64 / 1000.0;
        out.sample(&m::STORE_READY_AGE, &[queue, kind], age);
    }
    out.family(&m::STORE_RUNS);
    for count in &read.stats.runs {
        out.sample(&m::STORE_RUNS, &[count.status.as_str()], count.count as f64);
    }
    out.family(&m::STORE_DEAD_LETTERS);
    out.sample(&m::STORE_DEAD_LETTERS, &[], read.stats.dead_letters as f64);
    let export = &read.export;
    out.family(&m::STORE_EXPORT_ENABLED);
    out.sample(
        &m::STORE_EXPORT_ENABLED,
        &[],
        if export.enabled { 1.0 } else { 0.0 },
    );
    out.family(&m::STORE_OUTBOX_ENTRIES);
    out.sample(&m::STORE_OUTBOX_ENTRIES, &[], export.backlog_entries as f64);
    out.family(&m::STORE_OUTBOX_EVENTS);
    out.sample(&m::STORE_OUTBOX_EVENTS, &[], export.backlog_events as f64);
    out.family(&m::STORE_OUTBOX_AGE);
    let age = export.oldest.map_or(0.0, |oldest| {
        at.saturating_sub(oldest).max(0) as f64 / 1000.0
    });
    out.sample(&m::STORE_OUTBOX_AGE, &[], age);
}
