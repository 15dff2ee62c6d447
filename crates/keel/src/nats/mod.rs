//! NATS JetStream: journal events out, run submissions in.
//!
//! # Layout
//!
//! * this file: [`Names`] (every subject and stream name derives from one
//!   prefix), connecting, and creating the streams Keel needs when they are
//!   missing.
//! * [`relay`]: the outbox relay. Publishes every journal event to
//!   `<prefix>.events.<tenant>.<agent>.<run_id>`, in order per run, at least
//!   once, with `Nats-Msg-Id = <run_id>:<seq>` so JetStream drops repeats.
//! * [`ingest`]: the ingest consumer. Each message on `<prefix>.ingest.<agent>`
//!   becomes a run submission whose idempotency key is the message id; it is
//!   acknowledged only once the run is committed. Poison goes to
//!   `<prefix>.dead.ingest`.
//!
//! `docs/EVENTS.md` is the consumer-facing description of all of this.

pub mod ingest;
pub mod relay;

use std::fmt;
use std::time::Duration;

use async_nats::ServerAddr;
use async_nats::jetstream::{self, stream};
use keel_core::spec::redact_url;
use keel_store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::service::Service;

/// The subject prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "keel";

/// How long JetStream remembers a message id, so a repeated publish of the
/// same id within it is dropped (on the events and dead-letter streams).
/// Long enough to cover a relay crash, restart and lease takeover; consumers
/// dedupe by `id` for anything older.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(5 * 60);

/// How long the events stream keeps an event when Keel creates it.
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why talking to NATS failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configured subject prefix cannot be used in a subject.
    #[error(
        "invalid NATS subject prefix `{0}`: use dot-separated tokens of letters, digits, `_` and `-`"
    )]
    Prefix(String),
    /// The server URL cannot be read: reconnecting would never help.
    #[error("invalid NATS URL `{url}`: {message}")]
    Url {
        /// Server URLs, without credentials.
        url: Servers,
        /// Why.
        message: String,
    },
    /// The server could not be reached.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// Server URLs, without credentials.
        url: Servers,
        /// Cause.
        message: String,
    },
    /// A JetStream request (stream or consumer setup, publish, fetch) failed.
    #[error("{0}")]
    JetStream(String),
    /// The store refused to switch event export on.
    #[error("cannot enable event export: {0}")]
    Store(#[from] keel_store::Error),
}

/// NATS servers as configured: one URL or several separated by commas,
/// with their credentials (`nats://user:password@host:4222`,
/// `nats://token@host`). Shown (`Display`, `Debug`) without them: they
/// reach the server in the connect options ([`connect`]), never in an
/// address.
#[derive(Clone, PartialEq, Eq)]
pub struct Servers(String);

impl Servers {
    /// The servers of a list as written.
    pub fn new(list: impl Into<String>) -> Servers {
        Servers(list.into())
    }

    /// Each server's URL, as written.
    fn each(&self) -> impl Iterator<Item = &str> {
        self.0.split(',').map(str::trim)
    }
}

impl fmt::Display for Servers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.each().map(redact_url).collect();
        f.write_str(&shown.join(","))
    }
}

impl fmt::Debug for Servers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Servers({self})")
    }
}

/// What `keel serve` asks of NATS.
#[derive(Clone, Debug)]
pub struct Serve {
    /// Export events to these servers.
    pub events: Option<Servers>,
    /// Ingest submissions from these servers.
    pub ingest: Option<Servers>,
    /// Subject and stream prefix.
    pub prefix: String,
    /// Ack wait of the ingest consumer.
    pub ingest_ack_wait: Duration,
    /// This process is the store's only user (the embedded store), so the
    /// relay lease it held before a crash is its own to take back at once.
    pub sole_process: bool,
}

/// This process's name in the relay lease: where it runs (the host name,
/// which is the pod name on Kubernetes), its pid, and a unique part (a
/// restarted process is a new owner), so `keel events status` tells an
/// operator which process publishes.
fn relay_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string());
    let unique = uuid::Uuid::now_v7().simple().to_string();
    format!(
        "relay-{host}-{}-{}",
        std::process::id(),
        &unique[unique.len() - 8..]
    )
}

/// Starts the relay and/or the ingest consumer `serve` asks for; they stop
/// on `cancel`. Export is switched on in the store before this returns, so
/// call it before the engine and the API start committing.
pub async fn start<S: Store>(
    service: Service<S>,
    serve: Serve,
    cancel: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, Error> {
    let names = Names::new(&serve.prefix)?;
    for servers in serve.events.iter().chain(&serve.ingest) {
        addresses(servers)?;
    }
    let mut tasks = Vec::new();
    if let Some(url) = serve.events {
        let owner = if serve.sole_process {
            "embedded".to_string()
        } else {
            relay_owner()
        };
        let relay = relay::Relay::new(
            service.store.clone(),
            relay::Options::new(url, names.clone(), owner),
        );
        relay.enable().await?;
        tasks.push(tokio::spawn(relay.run(cancel.clone())));
    }
    if let Some(url) = serve.ingest {
        let mut options = ingest::Options::new(url, names);
        options.ack_wait = serve.ingest_ack_wait;
        let ingest = ingest::Ingest::new(service, options);
        tasks.push(tokio::spawn(ingest.run(cancel)));
    }
    Ok(tasks)
}

/// The addresses of `servers` without their credentials, and the first
/// credentials found: (user, password), or a token (a user name alone).
/// Refuses a server list that can never connect (a typo, another scheme);
/// a server that is down is not checked: Keel starts and reconnects.
fn addresses(servers: &Servers) -> Result<(Vec<ServerAddr>, Option<Credentials>), Error> {
    let invalid = |message: String| Error::Url {
        url: servers.clone(),
        message,
    };
    let mut addresses = Vec::new();
    let mut credentials = None;
    for server in servers.each() {
        let mut url = server
            .parse::<ServerAddr>()
            .map_err(|e| invalid(e.to_string()))?
            .into_inner();
        if credentials.is_none() && !url.username().is_empty() {
            let user = percent_decode(url.username());
            credentials = Some(match url.password() {
                Some(password) => Credentials::User(user, percent_decode(password)),
                None => Credentials::Token(user),
            });
        }
        // The client logs addresses (their passwords too) at debug level.
        if url.set_username("").is_err() || url.set_password(None).is_err() {
            return Err(invalid("the URL cannot hold credentials".to_string()));
        }
        addresses.push(ServerAddr::from_url(url).map_err(|e| invalid(e.to_string()))?);
    }
    Ok((addresses, credentials))
}

/// How Keel authenticates to NATS, from a server URL's user info.
enum Credentials {
    /// `nats://user:password@host`.
    User(String, String),
    /// `nats://token@host`.
    Token(String),
}

/// Percent-decodes the user info of a URL (an invalid escape stays as written).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |i: usize| bytes.get(i).and_then(|b| char::from(*b).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The subjects and stream names derived from one prefix, so several Keel
/// installations (or tests) can share a NATS server without colliding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    prefix: String,
    stream_base: String,
}

impl Names {
    /// Names under `prefix` (e.g. `keel`, or `acme.keel`).
    pub fn new(prefix: &str) -> Result<Names, Error> {
        let valid = !prefix.is_empty()
            && prefix.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
        if !valid {
            return Err(Error::Prefix(prefix.to_string()));
        }
        let stream_base = prefix
            .chars()
            .map(|c| match c {
                '.' | '-' => '_',
                c => c.to_ascii_uppercase(),
            })
            .collect();
        Ok(Names {
            prefix: prefix.to_string(),
            stream_base,
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The stream holding exported events: `<PREFIX>_EVENTS`.
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.stream_base)
    }

    /// Every event subject: `<prefix>.events.>`.
    pub fn events_subjects(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// The subject of one run's events:
    /// `<prefix>.events.<tenant>.<agent>.<run_id>`, tenant and agent escaped
    /// with [`escape_token`].
    pub fn event_subject(&self, tenant: &str, agent: &str, run_id: &str) -> String {
        format!(
            "{}.events.{}.{}.{}",
            self.prefix,
            escape_token(tenant),
            escape_token(agent),
            escape_token(run_id)
        )
    }

    /// The stream ingested submissions are published to: `<PREFIX>_INGEST`.
    pub fn ingest_stream(&self) -> String {
        format!("{}_INGEST", self.stream_base)
    }

    /// Every ingest subject: `<prefix>.ingest.>`.
    pub fn ingest_subjects(&self) -> String {
        format!("{}.ingest.>", self.prefix)
    }

    /// The subject that submits runs of `agent`: `<prefix>.ingest.<agent>`.
    /// Agent names may contain dots; they are taken verbatim.
    pub fn ingest_subject(&self, agent: &str) -> String {
        format!("{}.ingest.{agent}", self.prefix)
    }

    /// The agent an ingest subject names: everything after `<prefix>.ingest.`.
    pub fn ingest_agent<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".ingest.")
            .filter(|agent| !agent.is_empty())
    }

    /// The stream keeping dead letters: `<PREFIX>_DEAD`.
    pub fn dead_stream(&self) -> String {
        format!("{}_DEAD", self.stream_base)
    }

    /// Every dead-letter subject: `<prefix>.dead.>`.
    pub fn dead_subjects(&self) -> String {
        format!("{}.dead.>", self.prefix)
    }

    /// Where poison ingest messages go: `<prefix>.dead.ingest`.
    pub fn dead_ingest_subject(&self) -> String {
        format!("{}.dead.ingest", self.prefix)
    }
}

/// Makes any text one subject token: ASCII letters, digits, `_` and `-`
/// stay; every other byte (`.`, `*`, `>`, whitespace, `%`, ...) becomes
/// `%XX`. The mapping is reversible, so distinct names never share a subject.
pub fn escape_token(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Connects to `servers` (with the first credentials in their URLs) and
/// returns a JetStream context whose publishes wait for an ack slot instead
/// of failing when many are in flight.
pub async fn connect(servers: &Servers, name: &str) -> Result<jetstream::Context, Error> {
    let (addresses, credentials) = addresses(servers)?;
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5));
    options = match credentials {
        Some(Credentials::User(user, password)) => options.user_and_password(user, password),
        Some(Credentials::Token(token)) => options.token(token),
        None => options,
    };
    let client = options
        .connect(addresses)
        .await
        .map_err(|e| Error::Connect {
            url: servers.clone(),
            message: e.to_string(),
        })?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .backpressure_on_inflight(true)
        .build(client))
}

/// Creates the stream `config` describes unless a stream of that name
/// exists; an existing stream is used as its operator configured it.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, Error> {
    let name = config.name.clone();
    js.get_or_create_stream(config)
        .await
        .map_err(|e| Error::JetStream(format!("cannot create or open stream {name}: {e}")))
}

/// The configuration Keel creates a stream with.
fn stream_config(
    name: String,
    subjects: String,
    retention: stream::RetentionPolicy,
    max_age: Duration,
) -> stream::Config {
    stream::Config {
        name,
        subjects: vec![subjects],
        retention,
        storage: stream::StorageType::File,
        max_age,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

/// Exponential backoff between retries of a failing loop, with jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// The delay before the next attempt (grows until [`Backoff::MAX`]).
    fn next(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_prefix() {
        let names = Names::new("acme.keel-2").expect("valid");
        assert_eq!(names.events_stream(), "ACME_KEEL_2_EVENTS");
        assert_eq!(names.ingest_stream(), "ACME_KEEL_2_INGEST");
        assert_eq!(names.dead_stream(), "ACME_KEEL_2_DEAD");
        assert_eq!(names.events_subjects(), "acme.keel-2.events.>");
        assert_eq!(
            names.event_subject("default", "billing.triage", "0193"),
            "acme.keel-2.events.default.billing%2Etriage.0193"
        );
        assert_eq!(names.dead_ingest_subject(), "acme.keel-2.dead.ingest");
        assert_eq!(
            names.ingest_agent("acme.keel-2.ingest.billing.triage"),
            Some("billing.triage")
        );
        assert_eq!(names.ingest_agent("acme.keel-2.ingest."), None);
        assert_eq!(names.ingest_agent("acme.keel-2.events.x"), None);
        assert_eq!(names.ingest_agent("acme.keel-22.ingest.x"), None);
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a", "a."] {
            assert!(Names::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn escaping_is_a_subject_token_and_reversible() {
        assert_eq!(escape_token("a-b_C9"), "a-b_C9");
        assert_eq!(escape_token("a.b*c>d e%"), "a%2Eb%2Ac%3Ed%20e%25");
        assert_ne!(escape_token("a.b"), escape_token("a%2Eb"));
    }
}
