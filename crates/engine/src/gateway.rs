//! The LLM gateway: what stands between a run's LLM step and the provider.
//!
//! Before a call, [`Gateway::admit`] picks the model (the spec's own, or
//! the first of `model.fallbacks` whose circuit breaker lets calls through)
//! and takes its capacity from the shared rate limiter (the store's GCRA
//! buckets, so every process on the store shares one budget):
//!
//! * `rpm`: one request, bucket `llm:<provider>/<model>:requests`, burst 1,
//!   so no window ever sees more than `rpm` requests;
//! * `tpm`: the call's tokens, estimated from the conversation's length (4
//!   bytes a token) calibrated by the real counts of earlier calls (moving
//!   averages of input per estimated token and of output per call), bucket
//!   `…:tokens`, burst a sixth of the window's tokens, reserved at most a
//!   quarter window ahead; [`Gateway::settle`] charges the difference once
//!   the provider reports the real usage (input and output).
//!
//! Both buckets count over the configured window plus its `margin`: the
//! provider counts arrivals, not grants, and a call delayed on its way
//! more than the one granted a window after it would otherwise make the
//! provider see one call too many (`ModelConfig::margin`).
//!
//! **Fair share.** Each take first takes from the run's *flow share*, a
//! bucket per tenant and agent (`<bucket>:flow:<tenant>/<agent>`) whose
//! rate is the bucket's divided by the flows contending for it (those
//! whose share was taken from within the last [`ACTIVE_FOR`], counted by
//! the store at most once a second per process, plus this one), reserving
//! at most [`SHARE_AHEAD`] of it; then from the bucket. A flow past its
//! share is deferred until its share frees (back in the queue, behind the
//! calls of flows that came since), unless the bucket is free at once, so
//! it cannot fill the bucket's reservations ahead of the others (a call of
//! another flow waits behind at most that span of each flow's share):
//! under contention each agent gets at least an equal part of the limit,
//! whatever the number of its runs, and a flow that asks less leaves the
//! rest to the others (work-conserving: a free bucket is never refused).
//! The share only counts; the time granted is the bucket's. Token shares
//! are charged the real usage like the bucket.
//!
//! **Priority.** Within a flow, how far ahead a call may reserve its share
//! grows with its run's priority ([`share_ahead`]: [`SHARE_AHEAD`] at the
//! default priority, a sixth of it at 0, 1.67 times it at 9). A limit is
//! always taken in the order of the takes, so a high-priority call that
//! comes while a backlog of low-priority ones keeps the limit busy waits
//! behind the few the backlog could reserve, and reserves the slots after
//! them: the low-priority calls that come back later find the share taken
//! further ahead than they may reserve, and go after it. (The queue's
//! order, priority then due time, only decides which task a worker takes
//! next; under a rate limit the workers are free, and the limit decides.)
//!
//! Capacity free within [`MAX_WAIT`] is reserved and the worker waits for
//! it, holding its task; later than that, the task is deferred to when it
//! frees ([`Admission::Later`]: the worker gives the task back with
//! `Store::defer`, which counts no attempt), plus a random part of up to
//! half the span the take could reserve ahead (`spread`): the limiter
//! would grant the callers refused at one moment at one same time, and
//! only one of them, so without it every waiting task would come back for
//! each freed slot; spread, each comes back about once every quarter of
//! that span, and can still reserve the capacity freed meanwhile. A 429 from the provider holds
//! the model's buckets until its `Retry-After`, so no process sends more
//! until then.
//!
//! Circuit breakers are per process, per endpoint (provider and base URL),
//! for providers whose configuration has a `breaker` section. A failure is
//! a transient error other than a 429 (timeouts, refused connections, 5xx).
//! While the spec's model's breaker is open, its fallbacks are tried in
//! order; when every breaker of the chain is open, the task is deferred
//! until the first one half-opens (the run is parked, holding no worker).
//!
//! Each transition of a breaker (closed → open, open → half-open, → closed)
//! is written to the store ([`Store::put_breaker`]), so the processes
//! sharing it see one another's: a process whose own breaker of an
//! endpoint is closed refuses calls to it while another process has it
//! open (until that open period ends), or half-open (its trial calls decide;
//! for at most `open_for` after it half-opened, so a process that died
//! mid-trial blocks no one). The store's view is read at most once every
//! [`SHARED_REFRESH`] per process and cached, not per call: a process
//! learns of another's opening up to that late (and meanwhile its calls
//! fail and count on its own breaker as before). When the period ends, the
//! process that opened the breaker makes the trial calls; the others let
//! calls through again only once it closed it (or its half-open period is
//! over). A failing write is logged; the breakers work on per process.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keel_core::breaker::{Breaker, Permit, Phase, View};
use keel_core::config::{Config, KeySource, Kind};
use keel_core::message::Usage;
use keel_core::priority::Priority;
use keel_core::run::State;
use keel_core::spec::{ModelSpec, Provider, redact_url};
use keel_core::{Agent, Millis};
use keel_store::{BreakerRecord, Error as StoreError, Grant, Rate, Store};
use serde::Serialize;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::{llm, now};

/// Longest a worker waits, holding its task, for capacity reserved for it.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// How long a flow (a tenant's agent) counts as contending for a limit
/// after it last took from its share.
const ACTIVE_FOR: Duration = MAX_WAIT;

/// How far ahead a call of the default priority may reserve its flow's
/// share of a contended limit: what a flow holds of the bucket's
/// reservations, and so how long another flow's call waits behind them, is
/// at most [`share_ahead`] of the highest priority (1.67 times this) of
/// its share.
const SHARE_AHEAD: Duration = Duration::from_millis(2_500);

/// How far ahead a call of a run of `priority` may reserve its flow's
/// share: [`SHARE_AHEAD`] × (priority + 1) / (default + 1), from 0.42 s at
/// priority 0 to 4.17 s at 9.
fn share_ahead(priority: Priority) -> Duration {
    SHARE_AHEAD * (u32::from(priority.get()) + 1) / (u32::from(Priority::DEFAULT.get()) + 1)
}

/// How long a process uses its count of a limit's contending flows.
const CONTENDERS_FOR: Duration = Duration::from_secs(1);

/// How long a 429 without `Retry-After` holds the model's buckets.
const DEFAULT_HOLD: Duration = Duration::from_secs(1);

/// Longest the store's view of the breakers is used before it is read
/// again (how late a process learns of another's transition).
pub const SHARED_REFRESH: Duration = Duration::from_secs(1);

/// How long a call refused because another process's breaker is half-open
/// waits (its trial calls are running).
const SHARED_TRIAL_WAIT_MS: Millis = 1_000;

/// The circuit breakers of this process, by endpoint, and the name it
/// writes their transitions under. Cheap to clone; the API shows them.
#[derive(Clone, Debug)]
pub struct Breakers {
    local: Arc<Mutex<HashMap<String, Breaker>>>,
    process: Arc<str>,
}

impl Default for Breakers {
    /// No breakers yet, under a name unique to this process:
    /// `<host>:<pid>:<random>` (`$HOSTNAME`, else the kernel's host name,
    /// else `local`).
    fn default() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "local".to_string());
        let process = format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..));
        Breakers {
            local: Arc::default(),
            process: process.into(),
        }
    }
}

/// One endpoint's breaker as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointView {
    /// `provider@base_url`.
    pub endpoint: String,
    /// How this process treats calls to it now: its own breaker's state,
    /// or, while that is closed, another process's open or half-open one
    /// (`opened` is this process's own count).
    #[serde(flatten)]
    pub breaker: View,
    /// The store's view: the latest transition, by any process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedView>,
}

/// A breaker's latest transition as the store holds it.
#[derive(Clone, Debug, Serialize)]
pub struct SharedView {
    /// The phase it moved to.
    pub state: Phase,
    /// Open: the end of the period; half-open: until when the other
    /// processes leave the trials to `process`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<Millis>,
    /// When the opening behind it happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opened_at: Option<Millis>,
    /// Consecutive failures behind it.
    pub failures: u32,
    /// The process that made it.
    pub process: String,
    /// When.
    pub updated_at: Millis,
}

impl From<&BreakerRecord> for SharedView {
    fn from(record: &BreakerRecord) -> Self {
        SharedView {
            state: record.phase,
            until: record.until,
            opened_at: record.opened_at,
            failures: record.failures,
            process: record.process.clone(),
            updated_at: record.updated_at,
        }
    }
}

impl Breakers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Breaker>> {
        // A panic while holding the lock leaves consistent data: each
        // operation on a breaker is one small step.
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The name this process writes its transitions under.
    pub fn process(&self) -> &str {
        &self.process
    }

    /// Every endpoint this process has a breaker of or the store has a
    /// transition of (`shared`), by endpoint.
    pub fn views(&self, shared: &[BreakerRecord], now: Millis) -> Vec<EndpointView> {
        let mut views: std::collections::BTreeMap<String, EndpointView> = self
            .lock()
            .iter()
            .map(|(endpoint, breaker)| {
                let view = EndpointView {
                    endpoint: endpoint.clone(),
                    breaker: breaker.view(now),
                    shared: None,
                };
                (endpoint.clone(), view)
            })
            .collect();
        for record in shared {
            let view = views
                .entry(record.endpoint.clone())
                .or_insert_with(|| EndpointView {
                    endpoint: record.endpoint.clone(),
                    breaker: View {
                        state: Phase::Closed.as_str(),
                        failures: 0,
                        open_until: None,
                        opened: 0,
                    },
                    shared: None,
                });
            if view.breaker.state == Phase::Closed.as_str()
                && let Some(retry_at) = refusal(record, &self.process, now)
            {
                view.breaker.state = record.phase.as_str();
                view.breaker.open_until = (record.phase == Phase::Open).then_some(retry_at);
            }
            view.shared = Some(SharedView::from(record));
        }
        views.into_values().collect()
    }
}

/// Whether another process's transition of an endpoint (`record`) refuses
/// a call this process's closed breaker would let through, and until when:
/// open, until its period ends; half-open, shortly (its trials run), for at
/// most until `record.until`. A process's own records refuse nothing (its
/// own breaker decides).
fn refusal(record: &BreakerRecord, process: &str, now: Millis) -> Option<Millis> {
    if record.process == process {
        return None;
    }
    let until = record.until.filter(|until| now < *until)?;
    match record.phase {
        Phase::Open => Some(until),
        Phase::HalfOpen => Some(now.saturating_add(SHARED_TRIAL_WAIT_MS).min(until)),
        Phase::Closed => None,
    }
}

/// The store's view of the breakers, read at most once per
/// [`SHARED_REFRESH`].
#[derive(Default)]
struct Shared {
    cache: Mutex<Cached>,
    /// Held while reading the store, so one caller reads and the others
    /// wait for its result.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Cached {
    read_at: Option<Instant>,
    records: HashMap<String, BreakerRecord>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Cached> {
        // Replaced whole: a panic cannot leave it half-written.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_fresh(&self) -> bool {
        self.lock()
            .read_at
            .is_some_and(|at| at.elapsed() < SHARED_REFRESH)
    }

    /// The store's latest transition of `endpoint`, read again when the
    /// cache is older than [`SHARED_REFRESH`]. A failed read keeps the old
    /// view (and waits a period before the next try).
    async fn get<S: Store>(&self, store: &S, endpoint: &str) -> Option<BreakerRecord> {
        if !self.is_fresh() {
            let _reading = self.reading.lock().await;
            if !self.is_fresh() {
                let read = store.breakers().await;
                let mut cache = self.lock();
                cache.read_at = Some(Instant::now());
                match read {
                    Ok(records) => {
                        cache.records = records
                            .into_iter()
                            .map(|r| (r.endpoint.clone(), r))
                            .collect();
                    }
                    Err(e) => warn!(error = %e, "could not read the shared circuit breakers"),
                }
            }
        }
        self.lock().records.get(endpoint).cloned()
    }
}

/// The rate limiter and the breakers, for the worker pool.
#[derive(Clone)]
pub struct Gateway<S> {
    store: S,
    config: Arc<Config>,
    breakers: Breakers,
    /// The store's view of every process's breakers.
    shared: Arc<Shared>,
    /// Token estimates' calibration, by token bucket.
    calibration: Arc<Mutex<HashMap<String, Calibration>>>,
    /// The contending flows of each flow share, as last counted, and when.
    contenders: Arc<Mutex<HashMap<String, (Millis, u64)>>>,
}

/// What [`Gateway::admit`] decided.
pub enum Admission<'a> {
    /// Call this model (after waiting until `Ticket::wait_until`).
    Go(Box<Ticket<'a>>),
    /// Nothing may be called before `until`: give the task back until then.
    Later {
        /// When to try again.
        until: Millis,
        /// Why, for the task's record.
        reason: String,
        /// Whether it is because every breaker of the chain is open (not a
        /// rate limit): the run is stuck until one half-opens.
        breakers_open: bool,
    },
}

/// Leave to call one model, with what it took; hand it to [`Gateway::settle`].
pub struct Ticket<'a> {
    /// The model to call, with the endpoint and key source the
    /// configuration gives its provider where the spec names none.
    pub model: Cow<'a, ModelSpec>,
    /// The provider's name in the spec and the configuration (a configured
    /// provider's model is called with its protocol as `model.provider`).
    pub provider: String,
    /// When the capacity reserved for the call is there.
    pub wait_until: Option<Millis>,
    breaker: Option<Held>,
    requests: Option<Fair>,
    tokens: Option<Charge>,
}

/// Tokens taken from a bucket for one call: what was charged, and the raw
/// input estimate it came from (to calibrate the next estimates).
struct Charge {
    bucket: Fair,
    charged: u64,
    raw_input: u64,
}

/// What the calls of one model really used, against the raw estimates:
/// moving averages, so estimates follow the provider's way of counting.
#[derive(Clone, Copy)]
struct Calibration {
    /// Real input tokens per estimated one.
    input_ratio: f64,
    /// Output tokens per call.
    output: f64,
}

/// Weight of the latest call in the moving averages.
const LEARNING: f64 = 0.2;

impl Default for Calibration {
    fn default() -> Self {
        // Cautious until calls tell: providers count more than the text
        // (roles, tool schemas, formatting), and a call answers something.
        Calibration {
            input_ratio: 1.5,
            output: 64.0,
        }
    }
}

/// A breaker before an operation, to tell whether it moved.
struct Before {
    phase: (Phase, Option<Millis>),
    failures: u32,
    open_for: Millis,
}

impl Before {
    fn of(breaker: &Breaker, now: Millis) -> Before {
        Before {
            phase: breaker.phase(),
            failures: breaker.view(now).failures,
            open_for: breaker.open_for_ms(),
        }
    }
}

/// A call let through a breaker: which one, and its permit.
struct Held {
    endpoint: String,
    permit: Permit,
}

/// A limiter bucket: its key and rate.
#[derive(Clone)]
struct Bucket {
    key: String,
    rate: Rate,
}

/// What [`Gateway::take_fair`] took: from the bucket (its key and rate are
/// this one's), and from the run's share of it when the bucket is
/// contended.
struct Fair {
    key: String,
    rate: Rate,
    grant: Grant,
    share: Option<Bucket>,
}

/// What taking a model's capacity gave.
#[expect(
    clippy::large_enum_variant,
    reason = "a short-lived return value, moved once into a boxed Ticket"
)]
enum Taken {
    /// Taken, free at once or at the time reserved.
    Now {
        requests: Option<Fair>,
        tokens: Option<Charge>,
        at: Option<Millis>,
    },
    /// Not before then (nothing taken).
    Later(Millis),
}

impl<S: Store> Gateway<S> {
    /// A gateway on `store` with the limits and breakers of `config`.
    pub fn new(store: S, config: Arc<Config>, breakers: Breakers) -> Self {
        Gateway {
            store,
            config,
            breakers,
            shared: Arc::default(),
            calibration: Arc::default(),
            contenders: Arc::default(),
        }
    }

    /// The model to call for the next step of `state`, with its capacity
    /// taken, or when to try again.
    pub async fn admit<'a>(
        &self,
        agent: &'a Agent,
        state: &State,
        now: Millis,
    ) -> Result<Admission<'a>, StoreError> {
        let primary = &agent.spec.model;
        let chain = std::iter::once(primary).chain(primary.fallbacks.iter());
        let mut reopens: Option<Millis> = None;
        for model in chain {
            // Limits, prices and the breaker are the configured provider's,
            // by the name the spec gives it.
            let provider = model.provider.name().to_string();
            let model = resolve(&self.config, model);
            let breaker = match self.admit_breaker(&provider, &model, now).await {
                Ok(breaker) => breaker,
                Err(retry_at) => {
                    reopens = Some(reopens.map_or(retry_at, |r| r.min(retry_at)));
                    continue;
                }
            };
            let taken = match self.take(agent, &provider, &model, state, now).await {
                Ok(taken) => taken,
                Err(e) => {
                    self.release(breaker);
                    return Err(e);
                }
            };
            return Ok(match taken {
                Taken::Now {
                    requests,
                    tokens,
                    at,
                } => Admission::Go(Box::new(Ticket {
                    model,
                    provider,
                    wait_until: at,
                    breaker,
                    requests,
                    tokens,
                })),
                Taken::Later(until) => {
                    self.release(breaker);
                    let reason = format!(
                        "rate limit of {provider}/{}: no capacity before {until}",
                        model.model
                    );
                    Admission::Later {
                        until,
                        reason,
                        breakers_open: false,
                    }
                }
            });
        }
        let until = reopens.unwrap_or(now + 1_000);
        Ok(Admission::Later {
            until,
            reason: format!(
                "circuit breaker open for {} and every fallback",
                endpoint(primary.provider.name(), &resolve(&self.config, primary))
            ),
            breakers_open: true,
        })
    }

    /// Reports how the call went: the breaker learns of endpoint failures,
    /// the token bucket is charged the real usage, a 429 holds the buckets.
    pub async fn settle(
        &self,
        ticket: &Ticket<'_>,
        result: &Result<llm::Response, llm::Error>,
        now: Millis,
    ) {
        let endpoint_failed = matches!(result, Err(e) if e.is_transient() && !e.is_throttled());
        if let Some(held) = &ticket.breaker {
            let moved = self.breakers.lock().get_mut(&held.endpoint).and_then(|b| {
                let before = Before::of(b, now);
                b.record(held.permit, !endpoint_failed, now);
                self.transition(&held.endpoint, before, b, now)
            });
            if let Some(record) = moved {
                self.publish(record).await;
            }
        }
        if let Some(Charge {
            bucket,
            charged,
            raw_input,
        }) = &ticket.tokens
        {
            if let Ok(response) = result {
                self.calibrate(&bucket.key, *raw_input, response.usage);
            }
            let used = match result {
                Ok(response) => total(response.usage),
                // A failed call is not billed (a stream cut mid-way may be,
                // partly: the provider does not say).
                Err(_) => 0,
            };
            let delta =
                i64::try_from(used).unwrap_or(i64::MAX) - i64::try_from(*charged).unwrap_or(0);
            if delta != 0
                && let Err(e) = self.adjust(bucket, delta, now).await
            {
                warn!(key = %bucket.key, error = %e, "could not correct the token count");
            }
        }
        if let Err(e) = result
            && e.is_throttled()
        {
            let wait = e.retry_after().unwrap_or(DEFAULT_HOLD);
            let until = now.saturating_add(millis(wait));
            let buckets = ticket
                .requests
                .iter()
                .chain(ticket.tokens.iter().map(|charge| &charge.bucket));
            for bucket in buckets {
                if let Err(e) = self.store.hold_capacity(&bucket.key, until).await {
                    warn!(key = %bucket.key, error = %e, "could not hold a rate limit after a 429");
                }
            }
        }
    }

    /// How the calls of a token bucket's model really count, so far.
    fn calibration(&self, key: &str) -> Calibration {
        let calibration = self
            .calibration
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        calibration.get(key).copied().unwrap_or_default()
    }

    /// Moves the calibration of a bucket toward a call's real usage.
    fn calibrate(&self, key: &str, raw_input: u64, usage: Usage) {
        let mut calibration = self
            .calibration
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = calibration.entry(key.to_string()).or_default();
        let ratio = usage.input_tokens as f64 / raw_input.max(1) as f64;
        entry.input_ratio += LEARNING * (ratio - entry.input_ratio);
        entry.output += LEARNING * (usage.output_tokens as f64 - entry.output);
    }

    /// The breakers of this gateway.
    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }

    /// Admits a call through the model's breaker, if its provider has one
    /// (and, while it is closed, through the other processes' view of the
    /// endpoint); when it refuses, the time it may let calls through.
    async fn admit_breaker(
        &self,
        provider: &str,
        model: &ModelSpec,
        now: Millis,
    ) -> Result<Option<Held>, Millis> {
        let Some(config) = self
            .config
            .provider(provider)
            .and_then(|p| p.breaker.as_ref())
        else {
            return Ok(None);
        };
        let endpoint = endpoint(provider, model);
        let shared = self.shared.get(&self.store, &endpoint).await;
        let (admitted, moved) = {
            let mut breakers = self.breakers.lock();
            let breaker = breakers
                .entry(endpoint.clone())
                .or_insert_with(|| Breaker::new(config.clone()));
            let refused = shared
                .as_ref()
                .filter(|_| breaker.phase().0 == Phase::Closed)
                .and_then(|record| refusal(record, &self.breakers.process, now));
            match refused {
                Some(retry_at) => {
                    debug!(
                        endpoint,
                        retry_at, "another process's circuit breaker refused a call"
                    );
                    (Err(retry_at), None)
                }
                None => {
                    let before = Before::of(breaker, now);
                    let admitted = breaker.admit(now).map_err(|refused| {
                        debug!(
                            endpoint,
                            retry_at = refused.retry_at,
                            "circuit breaker refused a call"
                        );
                        refused.retry_at
                    });
                    (admitted, self.transition(&endpoint, before, breaker, now))
                }
            }
        };
        if let Some(record) = moved {
            self.publish(record).await;
        }
        admitted.map(|permit| Some(Held { endpoint, permit }))
    }

    /// The record of a breaker's transition, if the operation since
    /// `before` moved it to another phase (or opened it again).
    fn transition(
        &self,
        endpoint: &str,
        before: Before,
        breaker: &Breaker,
        now: Millis,
    ) -> Option<BreakerRecord> {
        let (phase, open_until) = breaker.phase();
        if (phase, open_until) == before.phase {
            return None;
        }
        let (until, failures) = match phase {
            Phase::Open => {
                let failures = match before.phase.0 {
                    Phase::Closed => before.failures + 1,
                    Phase::Open | Phase::HalfOpen => 1,
                };
                (open_until, failures)
            }
            // The others leave the trials to this process for one open period.
            Phase::HalfOpen => (Some(now.saturating_add(before.open_for)), 0),
            Phase::Closed => (None, 0),
        };
        Some(BreakerRecord {
            endpoint: endpoint.to_string(),
            phase,
            until,
            opened_at: breaker.opened_at(),
            failures,
            process: self.breakers.process.to_string(),
            updated_at: now,
        })
    }

    /// Writes a transition to the store, for the other processes.
    async fn publish(&self, record: BreakerRecord) {
        info!(
            endpoint = %record.endpoint,
            state = record.phase.as_str(),
            until = record.until,
            "circuit breaker moved"
        );
        let endpoint = record.endpoint.clone();
        if let Err(e) = self.store.put_breaker(record).await {
            warn!(%endpoint, error = %e, "could not share a circuit breaker's transition");
        }
    }

    /// Gives back a breaker permit whose call is not made.
    fn release(&self, held: Option<Held>) {
        let Some(held) = held else { return };
        if let Some(breaker) = self.breakers.lock().get_mut(&held.endpoint) {
            breaker.release(held.permit);
        }
    }

    /// Takes `cost` from `bucket` for `flow` (the run's tenant and agent),
    /// reserving up to `max_wait` ahead, so that no flow starves while
    /// others keep the bucket busy (fair share: module docs). The flow
    /// first takes from its share of the bucket, the rate divided by the
    /// flows contending for it; within its share, it takes from the
    /// bucket; past it, it waits for its share, unless the bucket is free
    /// at once.
    ///
    /// The share goes first because only it is ever given back: giving
    /// back a reservation of the bucket would let a later take reserve the
    /// time of the bucket's *last* reservation a second time.
    async fn take_fair(
        &self,
        bucket: Bucket,
        flow: &str,
        cost: u64,
        max_wait: Duration,
        priority: Priority,
    ) -> Result<Fair, StoreError> {
        let prefix = format!("{}:flow:", bucket.key);
        let key = format!("{prefix}{flow}");
        let others = self.contenders(&prefix, &key).await?;
        let share = Bucket {
            key,
            rate: Rate {
                per_window: (bucket.rate.per_window / others.saturating_add(1)).max(1),
                ..bucket.rate
            },
        };
        // A flow reserves no further ahead than share_ahead of its share,
        // even alone: its other calls go back to the queue, behind the calls
        // of flows that come later, which then take their share. Each take
        // reads the clock: a grant's time is when the call may go, and the
        // takes before it took time.
        let ahead = max_wait.min(share_ahead(priority));
        let counted = self
            .store
            .take_capacity(&share.key, share.rate, cost, ahead, now())
            .await?;
        let mut fair = Fair {
            key: bucket.key,
            rate: bucket.rate,
            grant: Grant::Granted,
            share: None,
        };
        if let Grant::RetryAt(t) = counted {
            // Past its share: only capacity nobody else waits for.
            fair.grant = match self
                .store
                .take_capacity(&fair.key, fair.rate, cost, Duration::ZERO, now())
                .await?
            {
                Grant::Granted => Grant::Granted,
                _ => {
                    debug!(flow, key = %fair.key, others, retry_at = t, "past its fair share of a contended limit");
                    Grant::RetryAt(spread(t, ahead))
                }
            };
            return Ok(fair);
        }
        fair.grant = self
            .store
            .take_capacity(&fair.key, fair.rate, cost, max_wait, now())
            .await?;
        if let Grant::RetryAt(t) = fair.grant {
            // The share taken for nothing goes back (it stays active: the
            // flow is waiting).
            let units = i64::try_from(cost).unwrap_or(i64::MAX);
            self.store
                .adjust_capacity(&share.key, share.rate, -units, now())
                .await?;
            fair.grant = Grant::RetryAt(spread(t, max_wait));
        } else {
            fair.share = Some(share);
        }
        Ok(fair)
    }

    /// How many flows other than the share `key` contend for the bucket of
    /// `prefix` (`Store::active_limits`), read at most once per
    /// [`CONTENDERS_FOR`] per share: a flow that starts contending is
    /// counted by the others within that time.
    async fn contenders(&self, prefix: &str, key: &str) -> Result<u64, StoreError> {
        let at = now();
        {
            let cache = self
                .contenders
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((read_at, count)) = cache.get(key)
                && at.saturating_sub(*read_at) < millis(CONTENDERS_FOR)
            {
                return Ok(*count);
            }
        }
        let count = self
            .store
            .active_limits(prefix, key, at.saturating_sub(millis(ACTIVE_FOR)))
            .await?;
        let mut cache = self
            .contenders
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(key.to_string(), (at, count));
        Ok(count)
    }

    /// Corrects what [`Gateway::take_fair`] took by `delta` units (a
    /// negative one gives back), in the bucket and the flow's share.
    async fn adjust(&self, taken: &Fair, delta: i64, now: Millis) -> Result<(), StoreError> {
        self.store
            .adjust_capacity(&taken.key, taken.rate, delta, now)
            .await?;
        if let Some(share) = &taken.share {
            self.store
                .adjust_capacity(&share.key, share.rate, delta, now)
                .await?;
        }
        Ok(())
    }

    /// Takes a request and the estimated input tokens from the model's
    /// buckets, if its configuration limits it.
    async fn take(
        &self,
        agent: &Agent,
        provider: &str,
        model: &ModelSpec,
        state: &State,
        now: Millis,
    ) -> Result<Taken, StoreError> {
        let Some(limits) = self.config.model(provider, &model.model) else {
            return Ok(Taken::Now {
                requests: None,
                tokens: None,
                at: None,
            });
        };
        let prefix = format!("llm:{provider}/{}", model.model);
        let flow = format!("{}/{}", state.tenant, state.agent);
        let mut at: Option<Millis> = None;
        let mut requests = None;
        if let Some(rpm) = limits.rpm {
            let bucket = Bucket {
                key: format!("{prefix}:requests"),
                rate: Rate {
                    per_window: rpm,
                    window: limits.window + limits.margin,
                    burst: 1,
                },
            };
            let taken = self
                .take_fair(bucket, &flow, 1, MAX_WAIT, state.priority)
                .await?;
            match taken.grant {
                Grant::Granted => {}
                Grant::Reserved(t) => at = Some(t),
                Grant::RetryAt(t) => return Ok(Taken::Later(t)),
            }
            requests = Some(taken);
        }
        let mut tokens = None;
        if let Some(tpm) = limits.tpm {
            // The burst bounds one call's charge; the window never sees more
            // than per_window + burst - 1 = tpm tokens.
            let burst = (tpm / 6).max(1);
            let bucket = Bucket {
                key: format!("{prefix}:tokens"),
                rate: Rate {
                    per_window: (tpm - burst + 1).max(1),
                    window: limits.window + limits.margin,
                    burst,
                },
            };
            let raw_input = estimate_input_tokens(agent, state);
            let calibration = self.calibration(&bucket.key);
            let expected = raw_input as f64 * calibration.input_ratio + calibration.output.max(0.0);
            let max_output = model.max_tokens.map_or(f64::MAX, f64::from);
            let expected = expected.min(raw_input as f64 * calibration.input_ratio + max_output);
            let estimate = (expected.ceil() as u64).clamp(1, burst);
            // Reserve tokens a quarter of a window ahead at most: a reservation
            // is made on an estimate, and a call waiting for a slot reserved
            // on too high an estimate would wait for capacity given back.
            let max_wait = MAX_WAIT.min(limits.window / 4);
            let taken = self
                .take_fair(bucket, &flow, estimate, max_wait, state.priority)
                .await?;
            match taken.grant {
                Grant::Granted => {}
                Grant::Reserved(t) => at = Some(at.map_or(t, |a| a.max(t))),
                Grant::RetryAt(t) => {
                    // This call waits. Its request slot stays taken (the
                    // limit is one call stricter): giving back a slot that
                    // may not be the latest would let the next call reserve
                    // the latest one's time twice (`limit` module docs).
                    // Its flow share only counts, and goes back.
                    if let Some(share) = requests.as_ref().and_then(|r| r.share.as_ref()) {
                        self.store
                            .adjust_capacity(&share.key, share.rate, -1, now)
                            .await?;
                    }
                    return Ok(Taken::Later(t));
                }
            }
            tokens = Some(Charge {
                bucket: taken,
                charged: estimate,
                raw_input,
            });
        }
        Ok(Taken::Now {
            requests,
            tokens,
            at,
        })
    }
}

/// The model as called: the spec's, with the base URL and the key source of
/// the configuration's entry for its provider where the spec names none
/// (so an agent can name only `provider` and `model`; the key only when the
/// call goes to the provider's own base URL), a configured
/// provider's protocol in place of its name, and the provider's `timeout`
/// where it is shorter than the spec's (the operator's ceiling). A name the
/// configuration does not have stays as it is (the call fails, naming it).
pub fn resolve<'a>(config: &Config, model: &'a ModelSpec) -> Cow<'a, ModelSpec> {
    let Some(provider) = config.provider(model.provider.name()) else {
        return Cow::Borrowed(model);
    };
    let named = matches!(model.provider, Provider::Named(_));
    let fill_url = model.base_url.is_none() && provider.base_url.is_some();
    // A configured key goes only to the provider's own endpoint: a spec
    // that points the provider elsewhere brings its own key, or none.
    let own_endpoint = model
        .base_url
        .as_deref()
        .is_none_or(|url| url == provider.base_url());
    let fill_key = own_endpoint
        && model.api_key_env.is_none()
        && model.api_key_file.is_none()
        && provider.key_source().is_some();
    let ceiling = provider.timeout.filter(|t| *t < model.timeout);
    if !named && !fill_url && !fill_key && ceiling.is_none() {
        return Cow::Borrowed(model);
    }
    let mut resolved = model.clone();
    if let Some(timeout) = ceiling {
        resolved.timeout = timeout;
    }
    if named {
        resolved.provider = match provider.kind {
            Kind::Openai => Provider::Openai,
            Kind::Anthropic => Provider::Anthropic,
        };
    }
    if fill_url {
        resolved.base_url = provider.base_url.clone();
    }
    if fill_key {
        match provider.key_source() {
            Some(KeySource::Env(var)) => resolved.api_key_env = Some(var.to_string()),
            Some(KeySource::File(path)) => resolved.api_key_file = Some(path.to_string()),
            None => {}
        }
    }
    Cow::Owned(resolved)
}

/// Where a resolved model's requests go, as breakers name it (by the
/// provider's name in the spec; the URL shown without credentials or
/// query values, as it is logged, stored and shown).
fn endpoint(provider: &str, model: &ModelSpec) -> String {
    let base = model.base_url.as_deref().unwrap_or(match model.provider {
        Provider::Openai => llm::DEFAULT_BASE_URL,
        Provider::Anthropic => llm::ANTHROPIC_BASE_URL,
        Provider::Scripted | Provider::Named(_) => "",
    });
    format!("{provider}@{}", redact_url(base))
}

/// Input tokens of the next call, roughly: 4 bytes a token over the system
/// prompt, the conversation and the tools' schemas.
pub fn estimate_input_tokens(agent: &Agent, state: &State) -> u64 {
    let mut bytes = agent.system_prompt().len();
    for message in &state.messages {
        bytes += message.content.as_deref().map_or(0, str::len);
        for call in &message.tool_calls {
            bytes += call.name.len() + call.arguments.len();
        }
    }
    for tool in agent.tools() {
        bytes += tool.name.len() + tool.description.len();
        bytes += tool.parameters.to_string().len();
    }
    (bytes / 4 + 1) as u64
}

fn total(usage: Usage) -> u64 {
    usage.input_tokens + usage.output_tokens
}

/// When a caller refused until `at` comes back: `at` plus a random part of
/// up to half the span its take could reserve ahead. The limiter would
/// grant every caller it refused at one moment at the same time, and only
/// one of them; spread, they come back one by one, and each can still
/// reserve the capacity freed meanwhile.
fn spread(at: Millis, reserve_ahead: Duration) -> Millis {
    at.saturating_add(fastrand::i64(0..=millis(reserve_ahead) / 2))
}

fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(json: &str) -> ModelSpec {
        match serde_json::from_str(json) {
            Ok(m) => m,
            Err(e) => panic!("test model: {e}"),
        }
    }

    fn config(yaml: &str) -> Config {
        match Config::parse(yaml) {
            Ok(c) => c,
            Err(e) => panic!("test config: {e}"),
        }
    }

    fn record(phase: Phase, until: Option<Millis>, process: &str) -> BreakerRecord {
        BreakerRecord {
            endpoint: "openai@http://a/v1".to_string(),
            phase,
            until,
            opened_at: Some(100),
            failures: 3,
            process: process.to_string(),
            updated_at: 100,
        }
    }

    #[test]
    fn another_processs_open_breaker_refuses_until_its_period_ends() {
        let open = record(Phase::Open, Some(1_000), "other");
        assert_eq!(refusal(&open, "me", 500), Some(1_000));
        assert_eq!(refusal(&open, "me", 1_000), None);
        // Our own records: our own breaker decides.
        assert_eq!(refusal(&open, "other", 500), None);
        // Half-open elsewhere: its trials decide, we wait a little, and at
        // most until its half-open period ends.
        let trial = record(Phase::HalfOpen, Some(1_500), "other");
        assert_eq!(refusal(&trial, "me", 200), Some(1_200));
        assert_eq!(refusal(&trial, "me", 1_400), Some(1_500));
        assert_eq!(refusal(&trial, "me", 1_500), None);
        assert_eq!(
            refusal(&record(Phase::Closed, None, "other"), "me", 0),
            None
        );

        // The API's view: this process's closed breaker shows the shared
        // open one, with this process's own count.
        let breakers = Breakers::default();
        breakers.lock().insert(
            open.endpoint.clone(),
            Breaker::new(keel_core::config::BreakerConfig {
                failures: 3,
                open_for: Duration::from_secs(10),
                trials: 1,
            }),
        );
        let other = BreakerRecord {
            endpoint: "anthropic@http://b/v1".to_string(),
            ..record(Phase::Closed, None, "other")
        };
        let views = breakers.views(&[open.clone(), other], 500);
        let shown: Vec<(&str, &str, Option<Millis>, bool)> = views
            .iter()
            .map(|v| {
                let shared = v.shared.as_ref().is_some_and(|s| s.process == "other");
                (
                    v.endpoint.as_str(),
                    v.breaker.state,
                    v.breaker.open_until,
                    shared,
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("anthropic@http://b/v1", "closed", None, true),
                ("openai@http://a/v1", "open", Some(1_000), true),
            ]
        );
        assert_eq!(views[1].breaker.opened, 0);
        assert_eq!(breakers.views(&[], 500)[0].breaker.state, "closed");
    }

    #[test]
    fn a_provider_timeout_caps_the_agents_timeout() {
        let capped = config("providers:\n  openai: {kind: openai, timeout: 5s}\n");
        // The spec's default (120 s) is cut to the provider's ceiling.
        let bare = model(r#"{"provider": "openai", "model": "m"}"#);
        assert_eq!(resolve(&capped, &bare).timeout, Duration::from_secs(5));
        // A shorter timeout of the agent's own stays.
        let short = model(r#"{"provider": "openai", "model": "m", "timeout": "2s"}"#);
        let resolved = resolve(&capped, &short);
        assert!(matches!(resolved, Cow::Borrowed(_)));
        assert_eq!(resolved.timeout, Duration::from_secs(2));
        // No ceiling configured: the agent's timeout.
        let open = config("providers:\n  openai: {kind: openai}\n");
        assert_eq!(resolve(&open, &bare).timeout, Duration::from_secs(120));
    }

    #[test]
    fn the_configuration_fills_what_the_spec_leaves_out() {
        let config = config(
            "providers:\n  openai: {kind: openai, base_url: 'http://llm.internal/v1', api_key_file: /run/k}\n",
        );
        let bare = model(r#"{"provider": "openai", "model": "m"}"#);
        let resolved = resolve(&config, &bare);
        assert_eq!(resolved.base_url.as_deref(), Some("http://llm.internal/v1"));
        assert_eq!(resolved.api_key_file.as_deref(), Some("/run/k"));
        assert_eq!(resolved.api_key_env, None);
        assert_eq!(
            endpoint("openai", &resolved),
            "openai@http://llm.internal/v1"
        );

        // The configured key never goes to an endpoint the spec chose.
        let elsewhere = model(
            r#"{"provider": "openai", "model": "m", "base_url": "http://elsewhere.example/v1"}"#,
        );
        let resolved = resolve(&config, &elsewhere);
        assert_eq!(
            resolved.base_url.as_deref(),
            Some("http://elsewhere.example/v1")
        );
        assert_eq!(
            (
                resolved.api_key_file.as_deref(),
                resolved.api_key_env.as_deref()
            ),
            (None, None)
        );
        let same =
            model(r#"{"provider": "openai", "model": "m", "base_url": "http://llm.internal/v1"}"#);
        assert_eq!(
            resolve(&config, &same).api_key_file.as_deref(),
            Some("/run/k")
        );

        // What the spec says wins.
        let own = model(
            r#"{"provider": "openai", "model": "m", "base_url": "http://own/v1", "api_key_env": "OWN"}"#,
        );
        let resolved = resolve(&config, &own);
        assert!(matches!(resolved, Cow::Borrowed(_)));
        assert_eq!(resolved.base_url.as_deref(), Some("http://own/v1"));

        // Another provider's entry does not apply.
        let other = model(r#"{"provider": "anthropic", "model": "m"}"#);
        assert!(matches!(resolve(&config, &other), Cow::Borrowed(_)));
        assert_eq!(
            endpoint("anthropic", &other),
            format!("anthropic@{}", llm::ANTHROPIC_BASE_URL)
        );
    }
}
