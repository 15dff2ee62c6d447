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
//! Capacity free within [`MAX_WAIT`] is reserved and the worker waits for
//! it, holding its task; later than that, the task is deferred to when it
//! frees ([`Admission::Later`]: the worker gives the task back with
//! `Store::defer`, which counts no attempt). A 429 from the provider holds
//! the model's buckets until its `Retry-After`, so no process sends more
//! until then.
//!
//! Circuit breakers are per process, per endpoint (provider and base URL),
//! for providers whose configuration has a `breaker` section. A failure is
//! a transient error other than a 429 (timeouts, refused connections, 5xx).
//! While the spec's model's breaker is open, its fallbacks are tried in
//! order; when every breaker of the chain is open, the task is deferred
//! until the first one half-opens (the run is parked, holding no worker).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keel_core::breaker::{Breaker, Permit, View};
use keel_core::config::{Config, KeySource, Kind};
use keel_core::message::Usage;
use keel_core::run::State;
use keel_core::spec::{ModelSpec, Provider};
use keel_core::{Agent, Millis};
use keel_store::{Error as StoreError, Grant, Rate, Store};
use serde::Serialize;
use tracing::{debug, warn};

use crate::llm;

/// Longest a worker waits, holding its task, for capacity reserved for it.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// How long a 429 without `Retry-After` holds the model's buckets.
const DEFAULT_HOLD: Duration = Duration::from_secs(1);

/// The circuit breakers of this process, by endpoint. Cheap to clone; the
/// API shows them.
#[derive(Clone, Debug, Default)]
pub struct Breakers(Arc<Mutex<HashMap<String, Breaker>>>);

/// One breaker as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointView {
    /// `provider@base_url`.
    pub endpoint: String,
    /// Its state.
    #[serde(flatten)]
    pub breaker: View,
}

impl Breakers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Breaker>> {
        // A panic while holding the lock leaves consistent data: each
        // operation on a breaker is one small step.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every breaker this process has used, by endpoint.
    pub fn views(&self, now: Millis) -> Vec<EndpointView> {
        let mut views: Vec<EndpointView> = self
            .lock()
            .iter()
            .map(|(endpoint, breaker)| EndpointView {
                endpoint: endpoint.clone(),
                breaker: breaker.view(now),
            })
            .collect();
        views.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        views
    }
}

/// The rate limiter and the breakers, for the worker pool.
#[derive(Clone)]
pub struct Gateway<S> {
    store: S,
    config: Arc<Config>,
    breakers: Breakers,
    /// Token estimates' calibration, by token bucket.
    calibration: Arc<Mutex<HashMap<String, Calibration>>>,
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
    requests: Option<Bucket>,
    tokens: Option<Charge>,
}

/// Tokens taken from a bucket for one call: what was charged, and the raw
/// input estimate it came from (to calibrate the next estimates).
struct Charge {
    bucket: Bucket,
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

/// What taking a model's capacity gave.
enum Taken {
    /// Taken, free at once or at the time reserved.
    Now {
        requests: Option<Bucket>,
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
            calibration: Arc::default(),
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
            let breaker = match self.admit_breaker(&provider, &model, now) {
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
                    Admission::Later { until, reason }
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
        if let Some(held) = &ticket.breaker
            && let Some(breaker) = self.breakers.lock().get_mut(&held.endpoint)
        {
            breaker.record(held.permit, !endpoint_failed, now);
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
                && let Err(e) = self
                    .store
                    .adjust_capacity(&bucket.key, bucket.rate, delta, now)
                    .await
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

    /// Admits a call through the model's breaker, if its provider has one;
    /// when it refuses, the time it may let calls through.
    fn admit_breaker(
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
        let mut breakers = self.breakers.lock();
        let breaker = breakers
            .entry(endpoint.clone())
            .or_insert_with(|| Breaker::new(config.clone()));
        match breaker.admit(now) {
            Ok(permit) => Ok(Some(Held { endpoint, permit })),
            Err(refused) => {
                debug!(
                    endpoint,
                    retry_at = refused.retry_at,
                    "circuit breaker refused a call"
                );
                Err(refused.retry_at)
            }
        }
    }

    /// Gives back a breaker permit whose call is not made.
    fn release(&self, held: Option<Held>) {
        let Some(held) = held else { return };
        if let Some(breaker) = self.breakers.lock().get_mut(&held.endpoint) {
            breaker.release(held.permit);
        }
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
        let mut at: Option<Millis> = None;
        let mut requests = None;
        if let Some(rpm) = limits.rpm {
            let bucket = Bucket {
                key: format!("{prefix}:requests"),
                rate: Rate {
                    per_window: rpm,
                    window: limits.window,
                    burst: 1,
                },
            };
            match self
                .store
                .take_capacity(&bucket.key, bucket.rate, 1, MAX_WAIT, now)
                .await?
            {
                Grant::Granted => {}
                Grant::Reserved(t) => at = Some(t),
                Grant::RetryAt(t) => return Ok(Taken::Later(t)),
            }
            requests = Some(bucket);
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
                    window: limits.window,
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
            match self
                .store
                .take_capacity(&bucket.key, bucket.rate, estimate, max_wait, now)
                .await?
            {
                Grant::Granted => {}
                Grant::Reserved(t) => at = Some(at.map_or(t, |a| a.max(t))),
                Grant::RetryAt(t) => {
                    if let Some(taken) = &requests {
                        // The request slot goes back: this call waits.
                        self.store
                            .adjust_capacity(&taken.key, taken.rate, -1, now)
                            .await?;
                    }
                    return Ok(Taken::Later(t));
                }
            }
            tokens = Some(Charge {
                bucket,
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
/// (so an agent can name only `provider` and `model`), and a configured
/// provider's protocol in place of its name. A name the configuration does
/// not have stays as it is (the call fails, naming it).
pub fn resolve<'a>(config: &Config, model: &'a ModelSpec) -> Cow<'a, ModelSpec> {
    let Some(provider) = config.provider(model.provider.name()) else {
        return Cow::Borrowed(model);
    };
    let named = matches!(model.provider, Provider::Named(_));
    let fill_url = model.base_url.is_none() && provider.base_url.is_some();
    let fill_key = model.api_key_env.is_none()
        && model.api_key_file.is_none()
        && provider.key_source().is_some();
    if !named && !fill_url && !fill_key {
        return Cow::Borrowed(model);
    }
    let mut resolved = model.clone();
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
/// provider's name in the spec).
fn endpoint(provider: &str, model: &ModelSpec) -> String {
    let base = model.base_url.as_deref().unwrap_or(match model.provider {
        Provider::Openai => llm::DEFAULT_BASE_URL,
        Provider::Anthropic => llm::ANTHROPIC_BASE_URL,
        Provider::Scripted | Provider::Named(_) => "",
    });
    format!("{provider}@{base}")
}

/// Input tokens of the next call, roughly: 4 bytes a token over the system
/// prompt, the conversation and the tools' schemas.
pub fn estimate_input_tokens(agent: &Agent, state: &State) -> u64 {
    let mut bytes = agent.spec.system.len();
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
