//! The outbox relay: publishes every journal event to JetStream.
//!
//! The store writes an outbox entry in the same transaction as the events
//! (once [`Store::enable_export`] was called), so nothing committed is
//! missed. The relay reads the oldest entries, publishes each event with
//! `Nats-Msg-Id: <run_id>:<seq>` and waits for JetStream's ack before it
//! deletes the entry: delivery is at least once, and JetStream drops repeats
//! within its duplicate window. A run's events are published one after the
//! other, each only once the previous one is acked, so a failed publish can
//! never let a later event of that run overtake it; different runs go out
//! concurrently. After a crash the entries not yet deleted are published
//! again.
//!
//! One relay publishes at a time: the holder of the store's relay lease.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures_util::future::join_all;
use keel_core::event::SCHEMA_VERSION;
use keel_core::{Millis, Recorded, RunId, Seq};
use keel_engine::now;
use keel_store::{Committed, OutboxEntry, RunRef, Store};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Backoff, Error, Names, Servers};
use crate::events::RELAY_LEASE;

/// Relay settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// NATS servers (`nats://127.0.0.1:4222`).
    pub url: Servers,
    /// Subject and stream names.
    pub names: Names,
    /// This relay's id in the lease. A process that is sure to be the store's
    /// only user (the embedded store) passes a fixed id, so after a crash it
    /// takes its lease back at once instead of waiting for it to expire.
    pub owner: String,
    /// How long the lease lasts without renewal (renewed every third of it).
    pub lease: Duration,
    /// Events read from the outbox per batch.
    pub batch: u32,
    /// How often the outbox is read when no commit was announced (commit
    /// notifications are hints and may be missed).
    pub poll: Duration,
}

impl Options {
    /// Defaults for publishing to `url` under `names`.
    pub fn new(url: Servers, names: Names, owner: String) -> Options {
        Options {
            url,
            names,
            owner,
            lease: Duration::from_secs(15),
            batch: 512,
            poll: Duration::from_secs(1),
        }
    }
}

/// The schema name of an exported event (`keel.event/v1`).
pub fn schema() -> String {
    format!("keel.event/v{SCHEMA_VERSION}")
}

/// An exported event as consumers read it (see `docs/EVENTS.md`).
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    /// `keel.event/v1`.
    pub schema: String,
    /// `<run_id>:<seq>`, also the `Nats-Msg-Id`: unique per event.
    pub id: String,
    /// The run.
    pub run_id: RunId,
    /// Its tenant.
    pub tenant: &'a str,
    /// Its agent.
    pub agent: &'a str,
    /// The agent version the run is pinned to.
    pub version: &'a str,
    /// Position in the run's journal (1-based, contiguous).
    pub seq: Seq,
    /// Commit time, epoch milliseconds.
    pub at: Millis,
    /// The event type (`run_submitted`, `llm_completed`, ...).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The event's fields, as in the journal without the `type` tag (`{}`
    /// when `truncated`).
    pub data: Value,
    /// Set when the event was too large for a NATS message: `data` is left
    /// out and the event is read from `GET /v1/runs/{run_id}/events`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl<'a> Envelope<'a> {
    /// The envelope of one journaled event.
    pub fn new(run: &'a RunRef, recorded: &Recorded) -> Result<Envelope<'a>, serde_json::Error> {
        let mut data = serde_json::to_value(&recorded.event)?;
        if let Value::Object(fields) = &mut data {
            fields.remove("type");
        }
        Ok(Envelope {
            schema: schema(),
            id: event_id(run.id, recorded.seq),
            run_id: run.id,
            tenant: &run.tenant,
            agent: &run.agent,
            version: &run.version,
            seq: recorded.seq,
            at: recorded.at,
            kind: recorded.event.kind(),
            data,
            truncated: false,
        })
    }
}

/// Room left for headers and the protocol when sizing a message.
const HEADER_ROOM: usize = 1024;

/// The JSON payload of one event, with `data` left out when the whole would
/// not fit in `max_payload` (so one huge event never blocks its run's export).
pub fn encode(
    run: &RunRef,
    recorded: &Recorded,
    max_payload: usize,
) -> Result<(Vec<u8>, bool), serde_json::Error> {
    let mut envelope = Envelope::new(run, recorded)?;
    let payload = serde_json::to_vec(&envelope)?;
    if payload.len() + HEADER_ROOM <= max_payload {
        return Ok((payload, false));
    }
    envelope.data = Value::Object(serde_json::Map::new());
    envelope.truncated = true;
    Ok((serde_json::to_vec(&envelope)?, true))
}

/// An event's id: `<run_id>:<seq>`.
pub fn event_id(run_id: RunId, seq: Seq) -> String {
    format!("{run_id}:{seq}")
}

/// The relay: reads the outbox, publishes, deletes what JetStream acked.
pub struct Relay<S> {
    store: S,
    options: Options,
}

/// What one pass over the outbox found.
enum Pass {
    /// A batch went out; there may be more.
    Published,
    /// The outbox is empty.
    Idle,
    /// Another relay holds the lease.
    Standby,
}

impl<S: Store> Relay<S> {
    /// A relay of `store`'s outbox.
    pub fn new(store: S, options: Options) -> Relay<S> {
        Relay { store, options }
    }

    /// Turns export on in the store: from now on every commit also writes
    /// outbox entries. Call it before the API accepts work, so no event
    /// committed after start-up is missed.
    pub async fn enable(&self) -> keel_store::Result<()> {
        self.store.enable_export().await
    }

    /// Publishes until `cancel`; reconnects and retries on every failure.
    pub async fn run(self, cancel: CancellationToken) {
        // Commit notifications wake the relay; `None` once they stop coming.
        let mut commits = Some(self.store.subscribe());
        let mut js: Option<jetstream::Context> = None;
        let mut lease = Lease::default();
        let mut backoff = Backoff::new();
        info!(url = %self.options.url, subjects = %self.options.names.events_subjects(), owner = %self.options.owner, "event relay started");
        while !cancel.is_cancelled() {
            // Hints that arrived until now are answered by this pass.
            while let Some(rx) = &mut commits {
                match rx.try_recv() {
                    Ok(_) | Err(TryRecvError::Lagged(_)) => continue,
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            let wait = match self.pass(&mut js, &mut lease).await {
                Ok(Pass::Published) => {
                    backoff.reset();
                    continue;
                }
                Ok(Pass::Idle) => {
                    backoff.reset();
                    self.options.poll
                }
                Ok(Pass::Standby) => self.options.lease / 3,
                Err(e) => {
                    let delay = backoff.next();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "event relay pass failed");
                    if matches!(e, PassError::Nats(_)) {
                        // Set up again: the stream may have been removed.
                        js = None;
                    }
                    delay
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                hint = next_commit(&mut commits) => {
                    if matches!(hint, Err(RecvError::Closed)) {
                        // No more hints: polling alone from here on.
                        commits = None;
                    }
                }
            }
        }
        if lease.held {
            // Hand the lease over at once rather than when it expires.
            let at = now();
            if let Err(e) = self
                .store
                .relay_lease(RELAY_LEASE, &self.options.owner, at, at)
                .await
            {
                debug!(error = %e, "could not release the relay lease");
            }
        }
        info!("event relay stopped");
    }

    /// Connects if needed, holds the lease, publishes one batch.
    async fn pass(
        &self,
        js: &mut Option<jetstream::Context>,
        lease: &mut Lease,
    ) -> Result<Pass, PassError> {
        let at = now();
        if lease.due(at, self.options.lease) {
            let until = at + self.options.lease.as_millis() as Millis;
            lease.held = self
                .store
                .relay_lease(RELAY_LEASE, &self.options.owner, until, at)
                .await?;
            lease.renewed_at = at;
            if !lease.held {
                debug!("another relay holds the lease");
            }
        }
        if !lease.held {
            return Ok(Pass::Standby);
        }
        let context = match js {
            Some(context) => context.clone(),
            None => {
                let context = self.connect().await?;
                *js = Some(context.clone());
                context
            }
        };
        let entries = self.store.outbox(self.options.batch).await?;
        if entries.is_empty() {
            return Ok(Pass::Idle);
        }
        let (acked, failure) = self.publish(&context, &entries).await;
        if !acked.is_empty() {
            self.store.ack_outbox(&acked).await?;
        }
        match failure {
            Some(e) => Err(PassError::Nats(e)),
            None => Ok(Pass::Published),
        }
    }

    async fn connect(&self) -> Result<jetstream::Context, Error> {
        let js = super::connect(&self.options.url, "keel event relay").await?;
        let names = &self.options.names;
        super::ensure_stream(
            &js,
            super::stream_config(
                names.events_stream(),
                names.events_subjects(),
                stream::RetentionPolicy::Limits,
                super::EVENTS_MAX_AGE,
            ),
        )
        .await?;
        info!(url = %self.options.url, stream = %names.events_stream(), "event relay connected");
        Ok(js)
    }

    /// Publishes a batch: each run's events in order, the runs concurrently.
    /// Returns the entries fully acked by JetStream, and the first error.
    async fn publish(
        &self,
        js: &jetstream::Context,
        entries: &[OutboxEntry],
    ) -> (Vec<i64>, Option<Error>) {
        let mut runs: Vec<Vec<&OutboxEntry>> = Vec::new();
        let mut index: HashMap<RunId, usize> = HashMap::new();
        for entry in entries {
            let i = *index.entry(entry.run.id).or_insert_with(|| {
                runs.push(Vec::new());
                runs.len() - 1
            });
            runs[i].push(entry);
        }
        let names = &self.options.names;
        let max_payload = js.client().max_payload();
        let results = join_all(
            runs.into_iter()
                .map(|run| publish_run(js, names, max_payload, run)),
        )
        .await;
        let mut acked = Vec::new();
        let mut failure = None;
        for (ids, error) in results {
            acked.extend(ids);
            if failure.is_none() {
                failure = error;
            }
        }
        (acked, failure)
    }
}

/// The next commit notification; never, once there are none.
async fn next_commit(
    commits: &mut Option<broadcast::Receiver<Committed>>,
) -> Result<Committed, RecvError> {
    match commits {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Publishes one run's entries in order, each event only after the previous
/// one was acked; stops at the first failure. Returns the entries published.
async fn publish_run(
    js: &jetstream::Context,
    names: &Names,
    max_payload: usize,
    entries: Vec<&OutboxEntry>,
) -> (Vec<i64>, Option<Error>) {
    let mut acked = Vec::new();
    for entry in entries {
        let run = &entry.run;
        let subject = names.event_subject(&run.tenant, &run.agent, &run.id.to_string());
        for recorded in &entry.events {
            if let Err(e) = publish_event(js, &subject, max_payload, run, recorded).await {
                return (acked, Some(e));
            }
        }
        acked.push(entry.id);
    }
    (acked, None)
}

async fn publish_event(
    js: &jetstream::Context,
    subject: &str,
    max_payload: usize,
    run: &RunRef,
    recorded: &Recorded,
) -> Result<(), Error> {
    let id = event_id(run.id, recorded.seq);
    let (payload, truncated) = encode(run, recorded, max_payload)
        .map_err(|e| Error::JetStream(format!("cannot encode event {id}: {e}")))?;
    if truncated {
        warn!(id = %id, max_payload, "event too large for NATS: exported without its data");
    }
    let publish = PublishMessage::build()
        .message_id(&id)
        .header("Keel-Event-Type", recorded.event.kind())
        .payload(payload.into());
    let ack = js
        .send_publish(subject.to_string(), publish)
        .await
        .map_err(|e| Error::JetStream(format!("cannot publish event {id}: {e}")))?
        .await
        .map_err(|e| Error::JetStream(format!("event {id} was not acknowledged: {e}")))?;
    if ack.duplicate {
        debug!(id = %id, "event was already published");
    }
    Ok(())
}

/// The relay lease as this relay knows it.
#[derive(Debug, Default)]
struct Lease {
    held: bool,
    renewed_at: Millis,
}

impl Lease {
    /// Whether to renew (or try to take) the lease now: every third of it.
    fn due(&self, at: Millis, lease: Duration) -> bool {
        at - self.renewed_at >= (lease / 3).as_millis() as Millis
    }
}

/// Why a relay pass failed.
#[derive(Debug, thiserror::Error)]
enum PassError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] keel_store::Error),
    /// NATS failed.
    #[error("{0}")]
    Nats(#[from] Error),
}

#[cfg(test)]
mod tests {
    use keel_core::Event;
    use serde_json::json;

    use super::*;

    #[test]
    fn envelope_is_versioned_and_oversized_data_is_left_out() {
        let run = RunRef {
            id: RunId::new(),
            tenant: "default".into(),
            agent: "triage".into(),
            version: "3".into(),
        };
        let recorded = Recorded {
            seq: 7,
            at: 1_700_000_000_000,
            event: Event::RunCompleted {
                output: "x".repeat(4000),
            },
        };
        let (payload, truncated) = encode(&run, &recorded, 1 << 20).expect("encode");
        assert!(!truncated);
        let value: Value = serde_json::from_slice(&payload).expect("json");
        assert_eq!(
            value,
            json!({
                "schema": "keel.event/v1",
                "id": format!("{}:7", run.id),
                "run_id": run.id.to_string(),
                "tenant": "default",
                "agent": "triage",
                "version": "3",
                "seq": 7,
                "at": 1_700_000_000_000_i64,
                "type": "run_completed",
                "data": {"output": "x".repeat(4000)},
            })
        );

        let (payload, truncated) = encode(&run, &recorded, 4096).expect("encode");
        assert!(truncated);
        let value: Value = serde_json::from_slice(&payload).expect("json");
        assert_eq!(value["truncated"], true);
        assert_eq!(value["data"], json!({}));
        assert_eq!(value["type"], "run_completed");
        assert!(payload.len() < 4096);
    }
}
