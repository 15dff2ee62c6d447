//! A circuit breaker for one provider endpoint: closed, open, half-open.
//!
//! * **Closed**: every call goes through. `failures` consecutive failed
//!   calls open it.
//! * **Open** until `open_for` has passed: calls are refused at once (the
//!   caller falls back to another model or parks the run until
//!   [`Refused::retry_at`]).
//! * **Half-open**: up to `trials` trial calls go through at a time; as many
//!   successes close it, one failure opens it again for `open_for`.
//!
//! A failure is an endpoint that does not work: a timeout, a refused or
//! broken connection, a 5xx. Not a 429 (the rate limiter's business) nor a
//! 4xx that blames the request. The caller decides which is which.
//!
//! Pure state and time passed in: no clock, no lock. Each call asks
//! [`Breaker::admit`] for a [`Permit`] and reports its outcome with it, so a
//! result that arrives after the state moved on (a slow call admitted while
//! closed, failing after the breaker opened) cannot count twice or close a
//! breaker it was not a trial of.

use serde::Serialize;

use crate::config::BreakerConfig;
use crate::ids::Millis;

/// Where a breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Calls go through; this many failed in a row.
    Closed { failures: u32 },
    /// Calls are refused until then.
    Open { until: Millis },
    /// Trial calls: this many running, this many succeeded.
    HalfOpen { running: u32, passed: u32 },
}

/// One endpoint's breaker.
#[derive(Clone, Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
    /// Times it opened, for the API.
    opened: u64,
    /// When it last opened.
    opened_at: Millis,
}

/// Where a breaker is, without its counters: what a transition changes,
/// and what other processes sharing the endpoint learn of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Calls go through.
    Closed,
    /// Calls are refused.
    Open,
    /// Trial calls decide.
    HalfOpen,
}

impl Phase {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen => "half_open",
        }
    }

    /// Reads [`Phase::as_str`] back.
    pub fn parse(name: &str) -> Option<Phase> {
        match name {
            "closed" => Some(Phase::Closed),
            "open" => Some(Phase::Open),
            "half_open" => Some(Phase::HalfOpen),
            _ => None,
        }
    }
}

/// Leave to make one call; give it back to [`Breaker::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "report the call's outcome with Breaker::record"]
pub struct Permit {
    /// A trial call of the half-open period after the breaker's n-th
    /// opening; a trial of an earlier period counts as an ordinary call.
    trial: Option<u64>,
}

/// A call the breaker does not let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// When a call may be let through again (the end of the open period, or
    /// shortly when the trials of a half-open breaker are all running).
    pub retry_at: Millis,
}

/// How long a call refused because every trial slot is taken waits.
const TRIAL_WAIT_MS: Millis = 1_000;

/// A breaker as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct View {
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// Consecutive failures while closed.
    pub failures: u32,
    /// Until when it is open (epoch ms), if open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_until: Option<Millis>,
    /// How many times it opened since the process started.
    pub opened: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            state: State::Closed { failures: 0 },
            opened: 0,
            opened_at: 0,
        }
    }

    /// Its phase as last moved, with the end of the open period while
    /// open. (An open breaker whose period ended turns half-open when the
    /// next call asks: [`Breaker::admit`] makes that transition.)
    pub fn phase(&self) -> (Phase, Option<Millis>) {
        match self.state {
            State::Closed { .. } => (Phase::Closed, None),
            State::Open { until } => (Phase::Open, Some(until)),
            State::HalfOpen { .. } => (Phase::HalfOpen, None),
        }
    }

    /// When the breaker last opened, unless it is closed.
    pub fn opened_at(&self) -> Option<Millis> {
        match self.state {
            State::Closed { .. } => None,
            State::Open { .. } | State::HalfOpen { .. } => Some(self.opened_at),
        }
    }

    /// How long it stays open, in milliseconds.
    pub fn open_for_ms(&self) -> Millis {
        Millis::try_from(self.config.open_for.as_millis()).unwrap_or(Millis::MAX / 4)
    }

    /// Whether a call may go now.
    pub fn admit(&mut self, now: Millis) -> Result<Permit, Refused> {
        let (running, passed) = match self.state {
            State::Closed { .. } => return Ok(Permit { trial: None }),
            State::Open { until } if now < until => return Err(Refused { retry_at: until }),
            State::Open { .. } => (0, 0),
            State::HalfOpen { running, passed } => (running, passed),
        };
        if running + passed >= self.config.trials {
            // Also the open state for callers that come by now.
            self.state = State::HalfOpen { running, passed };
            return Err(Refused {
                retry_at: now.saturating_add(TRIAL_WAIT_MS.min(self.open_for_ms())),
            });
        }
        self.state = State::HalfOpen {
            running: running + 1,
            passed,
        };
        Ok(Permit {
            trial: Some(self.opened),
        })
    }

    /// Reports how an admitted call went: `ok` false for an endpoint
    /// failure (see the module docs), true otherwise.
    pub fn record(&mut self, permit: Permit, ok: bool, now: Millis) {
        let trial = permit.trial == Some(self.opened);
        match (&mut self.state, trial) {
            (State::Closed { failures }, _) => {
                if ok {
                    *failures = 0;
                } else {
                    *failures += 1;
                    if *failures >= self.config.failures {
                        self.open(now);
                    }
                }
            }
            (State::HalfOpen { running, passed }, true) => {
                *running = running.saturating_sub(1);
                if !ok {
                    self.open(now);
                } else {
                    *passed += 1;
                    if *passed >= self.config.trials {
                        self.state = State::Closed { failures: 0 };
                    }
                }
            }
            // A call admitted before the breaker opened (or before this
            // half-open period): its outcome says nothing about the trial.
            (State::HalfOpen { .. }, false) | (State::Open { .. }, _) => {}
        }
    }

    /// Gives back a permit whose call was not made (the rate limiter said
    /// later): a trial slot is free again, and nothing is recorded.
    pub fn release(&mut self, permit: Permit) {
        if permit.trial == Some(self.opened)
            && let State::HalfOpen { running, .. } = &mut self.state
        {
            *running = running.saturating_sub(1);
        }
    }

    fn open(&mut self, now: Millis) {
        self.state = State::Open {
            until: now.saturating_add(self.open_for_ms()),
        };
        self.opened += 1;
        self.opened_at = now;
    }

    /// What the API shows.
    pub fn view(&self, now: Millis) -> View {
        let (state, failures, open_until) = match self.state {
            State::Closed { failures } => ("closed", failures, None),
            State::Open { until } if now < until => ("open", 0, Some(until)),
            State::Open { .. } | State::HalfOpen { .. } => ("half_open", 0, None),
        };
        View {
            state,
            failures,
            open_until,
            opened: self.opened,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn breaker(failures: u32, trials: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            failures,
            open_for: Duration::from_secs(10),
            trials,
        })
    }

    fn call(b: &mut Breaker, ok: bool, now: Millis) -> Result<(), Refused> {
        let permit = b.admit(now)?;
        b.record(permit, ok, now);
        Ok(())
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let mut b = breaker(3, 1);
        call(&mut b, false, 0).expect("closed");
        call(&mut b, false, 1).expect("closed");
        call(&mut b, true, 2).expect("closed");
        assert_eq!(b.view(2).state, "closed");
        call(&mut b, false, 3).expect("closed");
        call(&mut b, false, 4).expect("closed");
        assert_eq!(b.view(4).failures, 2);
        call(&mut b, false, 5).expect("closed");
        let view = b.view(5);
        assert_eq!(
            (view.state, view.open_until, view.opened),
            ("open", Some(10_005), 1)
        );
        assert_eq!(b.admit(6), Err(Refused { retry_at: 10_005 }));
        assert_eq!(b.admit(10_004), Err(Refused { retry_at: 10_005 }));
    }

    #[test]
    fn half_open_lets_trials_through_and_closes_on_their_success() {
        let mut b = breaker(1, 2);
        assert_eq!((b.phase(), b.opened_at()), ((Phase::Closed, None), None));
        call(&mut b, false, 7).expect("closed");
        assert_eq!(b.phase(), (Phase::Open, Some(10_007)));
        assert_eq!(b.view(10_007).state, "half_open");
        // The phase moves when a call asks.
        assert_eq!(b.phase().0, Phase::Open);
        let first = b.admit(10_007).expect("trial 1");
        assert_eq!(
            (b.phase(), b.opened_at()),
            ((Phase::HalfOpen, None), Some(7))
        );
        assert_eq!(
            Phase::parse(Phase::HalfOpen.as_str()),
            Some(Phase::HalfOpen)
        );
        let second = b.admit(10_001).expect("trial 2");
        assert_eq!(b.admit(10_002), Err(Refused { retry_at: 11_002 }));
        b.record(first, true, 10_003);
        // One trial passed, one running: still no room for a third.
        assert!(b.admit(10_004).is_err());
        b.record(second, true, 10_005);
        assert_eq!(b.view(10_005).state, "closed");
        assert_eq!((b.phase(), b.opened_at()), ((Phase::Closed, None), None));
        assert!(b.admit(10_006).is_ok());
    }

    #[test]
    fn a_failed_trial_opens_it_again() {
        let mut b = breaker(1, 1);
        call(&mut b, false, 0).expect("closed");
        let trial = b.admit(10_000).expect("trial");
        b.record(trial, false, 10_500);
        assert_eq!(b.admit(10_501), Err(Refused { retry_at: 20_500 }));
        assert_eq!(b.view(10_501).opened, 2);
    }

    #[test]
    fn late_results_of_calls_admitted_before_do_not_count() {
        let mut b = breaker(2, 1);
        let slow = b.admit(0).expect("closed");
        call(&mut b, false, 1).expect("closed");
        call(&mut b, false, 2).expect("closed");
        assert_eq!(b.view(3).state, "open");
        // The slow call fails after the breaker opened: no second opening.
        b.record(slow, false, 3);
        assert_eq!(b.view(3).opened, 1);
        let trial = b.admit(10_002).expect("trial");
        let late = Permit { trial: None };
        b.record(late, true, 10_003);
        assert_eq!(b.view(10_003).state, "half_open", "only the trial decides");
        b.record(trial, true, 10_004);
        assert_eq!(b.view(10_004).state, "closed");
    }

    #[test]
    fn a_released_trial_frees_its_slot() {
        let mut b = breaker(1, 1);
        call(&mut b, false, 0).expect("closed");
        let trial = b.admit(10_000).expect("trial");
        assert!(b.admit(10_001).is_err());
        b.release(trial);
        let again = b.admit(10_002).expect("the slot is free again");
        b.record(again, true, 10_003);
        assert_eq!(b.view(10_003).state, "closed");
    }

    proptest! {
        /// Whatever the calls and outcomes: an open breaker admits nothing
        /// before its end, a half-open one never has more than `trials`
        /// trials running, and the breaker opens exactly when `failures`
        /// calls in a row failed while it was closed.
        #[test]
        fn it_never_admits_what_it_should_not(
            failures in 1u32..5,
            trials in 1u32..4,
            ops in proptest::collection::vec((0u8..3, any::<bool>(), 0i64..3_000), 1..200),
        ) {
            let mut b = breaker(failures, trials);
            let mut now: Millis = 0;
            let mut running: Vec<Permit> = Vec::new();
            let mut closed_run = 0u32;
            for (op, ok, step) in ops {
                now += step;
                match op {
                    0 | 1 => {
                        let before = b.state;
                        match b.admit(now) {
                            Ok(permit) => {
                                if let State::Open { until } = before {
                                    prop_assert!(now >= until);
                                }
                                if permit.trial.is_some() {
                                    let trials_running = running
                                        .iter()
                                        .filter(|p| p.trial == Some(b.opened))
                                        .count() as u32;
                                    prop_assert!(trials_running < trials);
                                }
                                running.push(permit);
                            }
                            Err(refused) => prop_assert!(refused.retry_at > now),
                        }
                    }
                    _ => {
                        if let Some(permit) = running.pop() {
                            let was_closed = matches!(b.state, State::Closed { .. });
                            let opened = b.opened;
                            b.record(permit, ok, now);
                            if was_closed {
                                closed_run = if ok { 0 } else { closed_run + 1 };
                                prop_assert_eq!(b.opened > opened, closed_run >= failures);
                                if b.opened > opened {
                                    closed_run = 0;
                                }
                            }
                        }
                    }
                }
                if !matches!(b.state, State::Closed { .. }) {
                    closed_run = 0;
                }
            }
        }
    }
}
