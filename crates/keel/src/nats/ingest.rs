//! The ingest consumer: run submissions published to JetStream.
//!
//! A message on `<prefix>.ingest.<agent>` with the body
//! `{"input": ..., "version"?: ..., "priority"?: 0..9}` becomes a run of
//! that agent (priority as in `POST /v1/runs`, 5 when absent). Its
//! `Nats-Msg-Id` is the run's idempotency key (a message without one uses
//! `nats:<stream>:<stream sequence>`), so a message delivered again, or
//! published again, returns the run the first one created. A message is
//! acknowledged only after the run is committed: at-least-once delivery
//! plus an idempotent submit is effectively once.
//!
//! * Poison (a body that is not the JSON above, an unknown agent or
//!   version, a message id reused for another request) is published to
//!   `<prefix>.dead.ingest` with the reason in headers, then acknowledged:
//!   it is never redelivered.
//! * Backpressure: a fetch asks for no more messages than the global
//!   ceiling of pending runs (`--max-pending`) has room for, and nothing is
//!   fetched while there is none: messages beyond the ceiling wait in the
//!   stream, not in Keel's memory. No new batch is fetched until the
//!   current one is done.
//! * Busy (a ceiling reached after the fetch: another caller took the
//!   room, or a per-agent ceiling) holds the message and retries after the
//!   delay the service asks for, telling JetStream the work is in progress;
//!   the fetches after it take one message at a time until one goes
//!   through without waiting, so at most one message waits in hand.
//! * A failing store holds the message and retries with backoff: it is
//!   never dead-lettered for a transient error.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::StreamExt;
use keel_core::ids::DEFAULT_TENANT;
use keel_store::Store;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Backoff, Error, Names, Servers};
use crate::api;
use crate::service::{Service, Submit, parse_callback_url, parse_priority};

/// The durable consumer's name on the ingest stream.
pub const CONSUMER: &str = "keel-ingest";

/// Header of a dead letter: why the message was refused.
pub const DEAD_REASON: &str = "Keel-Dead-Reason";
/// Header of a dead letter: the subject the message was published to.
pub const DEAD_SUBJECT: &str = "Keel-Original-Subject";
/// Header of a dead letter: the message's idempotency key (its `Nats-Msg-Id`).
pub const DEAD_MSG_ID: &str = "Keel-Original-Msg-Id";
/// Header of a dead letter: the message's sequence in the ingest stream.
pub const DEAD_SEQUENCE: &str = "Keel-Original-Sequence";

/// Longest idempotency key accepted (as on the HTTP API).
const MAX_KEY_LEN: usize = 255;
/// Longest reason written in a dead letter's header.
const MAX_REASON_LEN: usize = 1024;

/// Ingest settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// NATS servers.
    pub url: Servers,
    /// Subject and stream names.
    pub names: Names,
    /// Most messages fetched (and submitted concurrently) per batch; fewer
    /// when the ceiling of pending runs has less room.
    pub batch: usize,
    /// How long JetStream waits for an ack before delivering a message again
    /// (after a crash); a message held while Keel is busy is kept alive with
    /// progress acks.
    pub ack_wait: Duration,
    /// Deliveries of one message before JetStream stops trying. Keel never
    /// naks, so only crashes and shutdowns with a message in hand count.
    pub max_deliver: i64,
}

impl Options {
    /// Defaults for consuming from `url` under `names`.
    pub fn new(url: Servers, names: Names) -> Options {
        Options {
            url,
            names,
            batch: 64,
            ack_wait: Duration::from_secs(30),
            max_deliver: 50,
        }
    }
}

/// The body of an ingest message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// The run's input: a string or any JSON but `null`.
    pub input: Value,
    /// Agent version (a string or a number); the newest when absent.
    #[serde(default)]
    pub version: Option<Value>,
    /// Priority, 0 (lowest) to 9 (highest); 5 when absent.
    #[serde(default)]
    pub priority: Option<Value>,
    /// Where the run's result and parks are POSTed (an http(s) URL).
    #[serde(default)]
    pub callback_url: Option<Value>,
}

/// The ingest consumer.
pub struct Ingest<S> {
    service: Service<S>,
    options: Options,
}

/// A connection with the ingest streams and consumer set up.
#[derive(Clone)]
struct Link {
    js: jetstream::Context,
    consumer: consumer::PullConsumer,
}

impl<S: Store> Ingest<S> {
    /// An ingest consumer submitting through `service`.
    pub fn new(service: Service<S>, options: Options) -> Ingest<S> {
        Ingest { service, options }
    }

    /// Consumes until `cancel`; reconnects and retries on every failure.
    pub async fn run(self, cancel: CancellationToken) {
        let mut link: Option<Link> = None;
        let mut backoff = Backoff::new();
        // Whether the last batch met a ceiling: the next takes one message.
        let mut narrow = false;
        info!(url = %self.options.url, subjects = %self.options.names.ingest_subjects(), "ingest started");
        while !cancel.is_cancelled() {
            let result = match &link {
                Some(l) => self.batch(l, narrow, &cancel).await.map(|busy| {
                    narrow = busy;
                }),
                None => self.connect().await.map(|l| {
                    link = Some(l);
                }),
            };
            let Err(e) = result else {
                backoff.reset();
                continue;
            };
            link = None;
            let delay = backoff.next();
            warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "ingest failed");
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        info!("ingest stopped");
    }

    async fn connect(&self) -> Result<Link, Error> {
        let js = super::connect(&self.options.url, "keel ingest").await?;
        let names = &self.options.names;
        let stream = super::ensure_stream(
            &js,
            super::stream_config(
                names.ingest_stream(),
                names.ingest_subjects(),
                stream::RetentionPolicy::WorkQueue,
                Duration::ZERO,
            ),
        )
        .await?;
        super::ensure_stream(
            &js,
            super::stream_config(
                names.dead_stream(),
                names.dead_subjects(),
                stream::RetentionPolicy::Limits,
                Duration::ZERO,
            ),
        )
        .await?;
        // Keel owns its consumer: created, or updated to these settings.
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(CONSUMER.to_string()),
                description: Some("Keel: ingest messages become runs".to_string()),
                filter_subject: names.ingest_subjects(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: self.options.ack_wait,
                max_deliver: self.options.max_deliver,
                max_ack_pending: (self.options.batch * 16) as i64,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                Error::JetStream(format!(
                    "cannot create consumer {CONSUMER} on stream {}: {e}",
                    names.ingest_stream()
                ))
            })?;
        info!(url = %self.options.url, stream = %names.ingest_stream(), consumer = CONSUMER, "ingest connected");
        Ok(Link { js, consumer })
    }

    /// How many messages the next fetch may take: the room under the
    /// global ceiling, at most a batch, one when `narrow` (the last batch
    /// met a ceiling) or when the room cannot be read (the store is away:
    /// the message will wait for it in hand).
    async fn fetch_size(&self, narrow: bool) -> usize {
        let most = if narrow { 1 } else { self.options.batch.max(1) };
        match self.service.room().await {
            Ok(None) => most,
            Ok(Some(room)) => most.min(usize::try_from(room).unwrap_or(usize::MAX)),
            Err(e) => {
                warn!(error = %e, "cannot read the pending runs: fetching one message");
                1
            }
        }
    }

    /// Fetches one batch, no bigger than the ceiling of pending runs has
    /// room for, and handles its messages concurrently, as they arrive;
    /// returns once each is acknowledged (or handed back on cancel), with
    /// whether one of them met a ceiling and had to wait. With no room,
    /// fetches nothing and waits the service's retry delay.
    async fn batch(
        &self,
        link: &Link,
        narrow: bool,
        cancel: &CancellationToken,
    ) -> Result<bool, Error> {
        let size = self.fetch_size(narrow).await;
        if size == 0 {
            debug!("at the ceiling of pending runs: not pulling");
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(self.service.retry_after()) => {}
            }
            return Ok(narrow);
        }
        let messages = link
            .consumer
            .fetch()
            .max_messages(size)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| Error::JetStream(format!("cannot fetch ingest messages: {e}")))?;
        let failure: Mutex<Option<String>> = Mutex::new(None);
        let busy = AtomicBool::new(false);
        messages
            .take_until(cancel.cancelled())
            .for_each_concurrent(None, |item| async {
                match item {
                    Ok(message) => self.handle(&link.js, message, &busy, cancel).await,
                    Err(e) => {
                        if let Ok(mut failure) = failure.lock() {
                            failure.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
            })
            .await;
        match failure.into_inner().ok().flatten() {
            Some(e) => Err(Error::JetStream(format!("fetching ingest messages: {e}"))),
            None => Ok(busy.into_inner()),
        }
    }

    /// Submits one message and acknowledges it, or dead-letters it; sets
    /// `busy` when it met a ceiling and had to wait.
    async fn handle(
        &self,
        js: &jetstream::Context,
        message: jetstream::Message,
        busy: &AtomicBool,
        cancel: &CancellationToken,
    ) {
        let Ok(sequence) = message.info().map(|i| i.stream_sequence) else {
            // Without JetStream's reply subject it can be neither acked nor keyed.
            warn!(subject = %message.subject, "ignoring a message that is not from JetStream");
            return;
        };
        let key = match message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        {
            Some(id) => id.as_str().to_string(),
            None => format!("nats:{}:{sequence}", self.options.names.ingest_stream()),
        };
        let submit = match parse(
            &self.options.names,
            &message.subject,
            &message.payload,
            &key,
        ) {
            Ok(submit) => submit,
            Err(reason) => {
                return self
                    .dead_letter(js, &message, &key, sequence, &reason, cancel)
                    .await;
            }
        };
        let mut backoff = Backoff::new();
        loop {
            let delay = match self.service.submit(submit.clone()).await {
                Ok(submitted) => {
                    debug!(key = %key, run_id = %submitted.run_id, created = submitted.created, "ingested");
                    if let Err(e) = message.ack().await {
                        // It will be delivered again and find its run.
                        debug!(key = %key, error = %e, "ack failed");
                    }
                    return;
                }
                Err(api::Error::Busy { retry_after, .. }) => {
                    busy.store(true, Ordering::Relaxed);
                    debug!(key = %key, retry_in_ms = retry_after.as_millis() as u64, "busy: holding the message");
                    retry_after
                }
                Err(api::Error::Internal(cause) | api::Error::Unavailable(cause)) => {
                    let delay = backoff.next();
                    warn!(key = %key, error = %cause, retry_in_ms = delay.as_millis() as u64, "ingest submit failed");
                    delay
                }
                Err(refused) => {
                    let reason = refused.to_string();
                    return self
                        .dead_letter(js, &message, &key, sequence, &reason, cancel)
                        .await;
                }
            };
            if !self.hold(&message, delay, cancel).await {
                return;
            }
        }
    }

    /// Publishes a poison message to the dead-letter subject and, once
    /// JetStream has it, acknowledges the original.
    async fn dead_letter(
        &self,
        js: &jetstream::Context,
        message: &jetstream::Message,
        key: &str,
        sequence: u64,
        reason: &str,
        cancel: &CancellationToken,
    ) {
        let names = &self.options.names;
        warn!(key = %key, subject = %message.subject, reason = %reason, "dead-lettering ingest message");
        let mut headers = HeaderMap::new();
        // Redelivered after a crash, it is dead-lettered again: same id.
        headers.insert(async_nats::header::NATS_MESSAGE_ID, header_value(key));
        headers.insert(DEAD_REASON, header_value(reason));
        headers.insert(DEAD_SUBJECT, header_value(message.subject.as_str()));
        headers.insert(DEAD_MSG_ID, header_value(key));
        headers.insert(DEAD_SEQUENCE, sequence.to_string().as_str());
        let mut backoff = Backoff::new();
        loop {
            let published = match js
                .publish_with_headers(
                    names.dead_ingest_subject(),
                    headers.clone(),
                    message.payload.clone(),
                )
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match published {
                Ok(()) => break,
                Err(e) => {
                    let delay = backoff.next();
                    warn!(key = %key, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot publish dead letter");
                    if !self.hold(message, delay, cancel).await {
                        return;
                    }
                }
            }
        }
        if let Err(e) = message.ack().await {
            debug!(key = %key, error = %e, "ack of a dead-lettered message failed");
        }
    }

    /// Keeps `message` unacknowledged for `delay`, telling JetStream the
    /// work is in progress so it is not delivered again meanwhile. On
    /// cancel, hands it back for immediate redelivery and returns false.
    async fn hold(
        &self,
        message: &jetstream::Message,
        delay: Duration,
        cancel: &CancellationToken,
    ) -> bool {
        let deadline = Instant::now() + delay;
        let slice = (self.options.ack_wait / 3).max(Duration::from_millis(100));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            tokio::select! {
                _ = cancel.cancelled() => {
                    if let Err(e) = message.ack_with(AckKind::Nak(None)).await {
                        debug!(error = %e, "nak on shutdown failed");
                    }
                    return false;
                }
                _ = tokio::time::sleep(left.min(slice)) => {}
            }
            if Instant::now() < deadline
                && let Err(e) = message.ack_with(AckKind::Progress).await
            {
                debug!(error = %e, "progress ack failed");
            }
        }
    }
}

/// The submission an ingest message asks for, or why it is poison.
pub fn parse(names: &Names, subject: &str, payload: &[u8], key: &str) -> Result<Submit, String> {
    let Some(agent) = names.ingest_agent(subject) else {
        return Err(format!(
            "subject `{subject}` does not name an agent (`{}`)",
            names.ingest_subject("<agent>")
        ));
    };
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "the message id (idempotency key) must be 1-{MAX_KEY_LEN} bytes"
        ));
    }
    let body: Body = serde_json::from_slice(payload).map_err(|e| {
        format!(
            r#"the body is not valid JSON of the form {{"input": ..., "version"?: ..., "priority"?: 0..9}}: {e}"#
        )
    })?;
    if body.input.is_null() {
        return Err("`input` must be a string or JSON value, not null".into());
    }
    let version = match body.version {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => return Err(format!("`version` must be a string, got {other}")),
    };
    let priority = parse_priority(body.priority.as_ref())?;
    Ok(Submit {
        tenant: DEFAULT_TENANT.into(),
        agent: agent.to_string(),
        version,
        input: body.input,
        idempotency_key: Some(key.to_string()),
        priority,
        callback_url: parse_callback_url(body.callback_url.as_ref())?,
    })
}

/// A header value: one line, at most [`MAX_REASON_LEN`] bytes.
fn header_value(text: &str) -> async_nats::HeaderValue {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line.as_str().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_submissions_and_names_the_poison() {
        let names = Names::new("keel").expect("names");
        let ok = parse(
            &names,
            "keel.ingest.billing.triage",
            br#"{"input": {"q": 1}, "version": 2}"#,
            "k1",
        )
        .expect("valid");
        assert_eq!(ok.agent, "billing.triage");
        assert_eq!(ok.version.as_deref(), Some("2"));
        assert_eq!(ok.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(ok.priority, keel_core::Priority::DEFAULT);
        let urgent = parse(
            &names,
            "keel.ingest.a",
            br#"{"input": 1, "priority": 9}"#,
            "k2",
        )
        .expect("valid");
        assert_eq!(urgent.priority, keel_core::Priority::HIGHEST);

        let cases: [(&str, &[u8], &str, &str); 8] = [
            ("keel.ingest.a", b"not json", "k", "not valid JSON"),
            ("keel.ingest.a", br#"{"inputs": 1}"#, "k", "unknown field"),
            ("keel.ingest.a", br#"{}"#, "k", "missing field `input`"),
            ("keel.ingest.a", br#"{"input": null}"#, "k", "not null"),
            (
                "keel.ingest.a",
                br#"{"input": 1, "version": []}"#,
                "k",
                "`version`",
            ),
            ("keel.ingest.a", br#"{"input": 1}"#, "", "message id"),
            (
                "keel.ingest.a",
                br#"{"input": 1, "priority": 10}"#,
                "k",
                "`priority` must be an integer from 0",
            ),
            (
                "keel.ingest.a",
                br#"{"input": 1, "priority": "high"}"#,
                "k",
                "`priority`",
            ),
        ];
        for (subject, body, key, reason) in cases {
            let err = parse(&names, subject, body, key).expect_err("poison");
            assert!(err.contains(reason), "{err:?} lacks {reason:?}");
        }
    }

    #[test]
    fn header_values_are_one_bounded_line() {
        let long = format!("a\r\nb{}", "é".repeat(2000));
        let value = header_value(&long);
        assert!(value.as_str().starts_with("a  b"));
        assert!(value.as_str().len() <= MAX_REASON_LEN);
    }
}
