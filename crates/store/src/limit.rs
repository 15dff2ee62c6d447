//! The rate limiter's arithmetic: GCRA (the generic cell rate algorithm),
//! the same for both backends. The SQLite store applies it to buckets in
//! memory, the PostgreSQL store in one statement per take, with the terms
//! computed here.
//!
//! # The algorithm
//!
//! A rate of `P` units per window `W` with a burst of `B` has the emission
//! interval `T = W / P`: the time one unit "costs". A key's whole state is
//! one number, its theoretical arrival time `TAT`: the time at which its
//! bucket would be full again if nothing more were taken (a `TAT` in the
//! past means a full bucket). A take of cost `c` at time `t` is granted iff
//!
//! ```text
//! max(TAT, t) + c·T − B·T <= t        ⇔        TAT <= t + (B − c)·T
//! ```
//!
//! and then `TAT' = max(TAT, t) + c·T`. A refused take changes nothing;
//! it is granted from `t = TAT − (B − c)·T` on. This is a token bucket of
//! `B` units refilling one unit per `T`, kept as one number that needs no
//! refill step. A cost over `B` can never be granted ([`Error::OverBurst`]):
//! a provider refuses a request larger than its whole bucket too.
//!
//! **The bound.** Each grant moves `TAT` up by at least its `c·T`. Take
//! the grants whose times lie in a span `[s, s + W)`, `j` the first of them
//! to be made and `n` the last. After `j`, `TAT ≥ t_j + c_j·T ≥ s + c_j·T`;
//! the ones after it add their costs, so just before `n`,
//! `TAT ≥ s + (Σc − c_n)·T`; and `n` was granted, so
//! `TAT <= t_n + (B − c_n)·T < s + W + (B − c_n)·T`. Hence `Σc < P + B`:
//! at most `P + B − 1` units in any window, in whatever order the takes
//! were made (their times need not increase). With `B = 1`, never more
//! than `P`. Over a long run the rate is exactly `P` per `W`. A charge
//! ([`Adjust`]) only raises `TAT`; a give-back lowers it as if its units
//! had never been taken. That keeps the bound for units granted at once,
//! but not for a reservation: `TAT` is one number, so giving back a
//! reservation that is not the latest frees the latest one's time, not
//! its own, and the next take is reserved that time a second time. Give
//! back only what is free to go now, or counts alone (the gateway's flow
//! shares).
//!
//! **Reservations.** A take may wait up to `max_wait`: it is granted at the
//! first time `t* = max(now, hold, TAT − (B − c)·T)` if `t* <= now + max_wait`,
//! and `TAT' = max(TAT, t*) + c·T`, exactly what a take made at `t*` would
//! have done. A later take can never be granted for a time before `t*`, so
//! the bound holds for the reserved times. Callers that queue for a limit
//! then each get their own time instead of all retrying at the same
//! instant.
//!
//! **Holds** (`Bucket::held_until`) close a key until a time (a
//! provider's `Retry-After`): no take is granted for a time before it.
//! They are kept apart from `TAT`, so a give-back cannot reopen a held key
//! early.
//!
//! **Choosing a burst.** To keep a provider's limit of `L` per window in
//! every window, `per_window + burst − 1 <= L`. A burst of 1 spaces every
//! grant by `T`: a caller that comes back later than its `RetryAt` loses
//! the difference (the bucket cannot save it up), so callers of a burst-1
//! limit should reserve (`max_wait`) rather than retry. A burst above the
//! usual cost absorbs late callers, at the price of `burst − 1` more units
//! in a window.
//!
//! **Precision.** Times are integer nanoseconds since the epoch (an `i64`
//! lasts until 2262). `c·T` is computed as `⌈c·W/P⌉` per take (so a rate
//! such as 90 000 tokens per minute, `T` = 666 666.67 ns, does not drift:
//! each grant rounds by less than 1 ns, up), and the allowance
//! `(B − c)·T` as `⌊(B − c)·W/P⌋` (down): the limiter is never more
//! generous than the exact rate, and stricter than it by less than 1 ns per
//! grant. Times handed back are rounded up to the millisecond.

use std::time::Duration;

use keel_core::Millis;

use crate::{Error, Grant, Rate, Result};

/// Nanoseconds in a millisecond.
const NS_PER_MS: i64 = 1_000_000;

/// The longest span the arithmetic uses (about 31 years): longer windows,
/// waits and allowances are cut to it, so no sum of times overflows.
const MAX_SPAN: i64 = 1_000_000_000_000_000_000;

/// A key's state, in nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bucket {
    /// Theoretical arrival time: when the bucket is full again.
    pub(crate) tat: i64,
    /// No grant for a time before this (a provider asked us to wait).
    pub(crate) held_until: i64,
}

/// A time in milliseconds, in nanoseconds.
pub(crate) fn ns(ms: Millis) -> i64 {
    ms.saturating_mul(NS_PER_MS)
}

/// A time in nanoseconds, rounded up to the millisecond.
fn ceil_ms(ns: i64) -> Millis {
    let ms = ns.div_euclid(NS_PER_MS);
    if ns.rem_euclid(NS_PER_MS) == 0 {
        ms
    } else {
        ms + 1
    }
}

/// Refuses a rate that grants nothing.
fn check(key: &str, rate: Rate) -> Result<()> {
    let reason = if rate.per_window == 0 {
        "it grants no units per window"
    } else if rate.window.is_zero() {
        "its window is empty"
    } else if rate.burst == 0 {
        "its burst is zero"
    } else {
        return Ok(());
    };
    Err(Error::InvalidRate {
        key: key.to_string(),
        reason,
    })
}

/// The time `units` cost under `rate` (`units · W / P`) in nanoseconds,
/// rounded up or down, at most [`MAX_SPAN`].
fn span(units: u64, rate: Rate, round_up: bool) -> i64 {
    let window = rate.window.as_nanos().min(MAX_SPAN as u128);
    // At most 2^64 · 10^18 < 2^128.
    let product = u128::from(units) * window;
    let per_window = u128::from(rate.per_window);
    let mut span = product / per_window;
    if round_up && !product.is_multiple_of(per_window) {
        span += 1;
    }
    span.min(MAX_SPAN as u128) as i64
}

/// A take, ready to be decided against a key's state. The PostgreSQL
/// statement is written with these numbers: it grants iff
/// `tat <= tat_limit` and `held_until <= held_limit`, then sets
/// `tat = max(tat, now, held_until) + increment`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Take {
    /// The time of the take.
    pub(crate) now: i64,
    /// How far a grant moves `TAT`: `⌈c·T⌉`.
    pub(crate) increment: i64,
    /// How far `TAT` may be ahead of the grant time: `⌊(B − c)·T⌋`.
    allowance: i64,
    /// How far ahead of `now` the grant may be (whole milliseconds).
    wait: i64,
}

impl Take {
    /// Checks the rate and the cost.
    pub(crate) fn new(
        key: &str,
        rate: Rate,
        cost: u64,
        max_wait: Duration,
        now: Millis,
    ) -> Result<Take> {
        check(key, rate)?;
        if cost > rate.burst {
            return Err(Error::OverBurst {
                key: key.to_string(),
                cost,
                burst: rate.burst,
            });
        }
        let wait_ms = Millis::try_from(max_wait.as_millis()).unwrap_or(Millis::MAX);
        Ok(Take {
            now: ns(now),
            increment: span(cost, rate, true),
            allowance: span(rate.burst - cost, rate, false),
            wait: ns(wait_ms).min(MAX_SPAN),
        })
    }

    /// The latest `TAT` a grant allows.
    pub(crate) fn tat_limit(&self) -> i64 {
        self.now + self.wait + self.allowance
    }

    /// The latest hold a grant allows.
    pub(crate) fn held_limit(&self) -> i64 {
        self.now + self.wait
    }

    /// Whether the take is granted against `state`.
    fn grants(&self, state: Bucket) -> bool {
        state.tat <= self.tat_limit() && state.held_until <= self.held_limit()
    }

    /// The grant's answer, from the state the grant left: the time granted
    /// is `max(now, hold, TAT' − c·T − (B − c)·T)` (module docs).
    pub(crate) fn granted(&self, after: Bucket) -> Grant {
        let at = self
            .now
            .max(after.held_until)
            .max(after.tat - self.increment - self.allowance);
        if at <= self.now {
            Grant::Granted
        } else {
            Grant::Reserved(ceil_ms(at))
        }
    }

    /// The refusal's answer: the first time the same take is granted.
    pub(crate) fn refused(&self, state: Bucket) -> Grant {
        let at = (state.held_until - self.wait).max(state.tat - self.wait - self.allowance);
        Grant::RetryAt(ceil_ms(at))
    }

    /// Decides the take against a bucket kept in memory, updating it.
    pub(crate) fn apply(&self, bucket: &mut Bucket) -> Grant {
        if !self.grants(*bucket) {
            return self.refused(*bucket);
        }
        bucket.tat = bucket.tat.max(self.now).max(bucket.held_until) + self.increment;
        self.granted(*bucket)
    }
}

/// A correction of what was taken ([`crate::Store::adjust_capacity`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Adjust {
    /// Take `increment` more, granted or not:
    /// `TAT' = max(TAT, min(max(TAT, now) + increment, cap))`, so a key owes
    /// at most one window beyond an empty bucket (`cap = now + B·T + W`),
    /// and a charge never lowers `TAT`.
    Charge {
        /// The time of the charge.
        now: i64,
        /// `⌈delta·T⌉`.
        increment: i64,
        /// The highest `TAT` a charge leaves.
        cap: i64,
    },
    /// Give `amount` back: `TAT' = max(TAT − amount, min(TAT, now))`, so
    /// the bucket fills at most to its burst.
    GiveBack {
        /// The time of the give-back.
        now: i64,
        /// `⌊|delta|·T⌋`.
        amount: i64,
    },
    /// A delta of zero.
    Nothing,
}

impl Adjust {
    /// Checks the rate.
    pub(crate) fn new(key: &str, rate: Rate, delta: i64, now: Millis) -> Result<Adjust> {
        check(key, rate)?;
        let now = ns(now);
        let units = delta.unsigned_abs();
        Ok(match delta {
            0 => Adjust::Nothing,
            1.. => Adjust::Charge {
                now,
                increment: span(units, rate, true),
                cap: now + span(rate.burst, rate, false) + span(rate.per_window, rate, false),
            },
            _ => Adjust::GiveBack {
                now,
                amount: span(units, rate, false),
            },
        })
    }

    /// Applies the correction to a bucket kept in memory.
    pub(crate) fn apply(&self, bucket: &mut Bucket) {
        match *self {
            Adjust::Charge {
                now,
                increment,
                cap,
            } => bucket.tat = bucket.tat.max((bucket.tat.max(now) + increment).min(cap)),
            Adjust::GiveBack { now, amount } => {
                bucket.tat = (bucket.tat - amount).max(bucket.tat.min(now));
            }
            Adjust::Nothing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_700_000_000_000;
    const MINUTE: Duration = Duration::from_secs(60);

    fn rate(per_window: u64, window: Duration, burst: u64) -> Rate {
        Rate {
            per_window,
            window,
            burst,
        }
    }

    /// Takes `cost` at `now` against `bucket`, without waiting.
    fn take(bucket: &mut Bucket, rate: Rate, cost: u64, now: Millis) -> Grant {
        Take::new("k", rate, cost, Duration::ZERO, now)
            .expect("a valid take")
            .apply(bucket)
    }

    /// A caller that always comes back at the time it is told, for ten
    /// minutes, gets the rate to within one request: a rate whose interval
    /// is not a whole number of nanoseconds does not drift.
    #[test]
    fn a_fractional_rate_does_not_drift() {
        // 90 000 tokens per minute: T = 666 666.67 ns per token.
        let tpm = rate(90_000, MINUTE, 4_000);
        let mut bucket = Bucket::default();
        let (mut now, mut tokens) = (T0, 0u64);
        let end = T0 + 10 * 60_000;
        while now < end {
            match take(&mut bucket, tpm, 1_000, now) {
                Grant::Granted => tokens += 1_000,
                Grant::RetryAt(at) => now = at,
                Grant::Reserved(_) => unreachable!("no wait was allowed"),
            }
        }
        // The burst at the start, then 90 000 per minute: never more, and
        // less by at most the request that would have fallen on `end`.
        let expected = 4_000 + 10 * 90_000;
        assert!(
            tokens <= expected && expected - tokens <= 1_000,
            "{tokens} tokens granted, {expected} expected"
        );
    }

    /// Random takes (costs, times, waits), more than the rate allows, put
    /// at most `per_window + burst − 1` units in any window, and at least
    /// `per_window` in some; a refusal's `RetryAt` is exact: the same take
    /// then is granted.
    #[test]
    fn grants_stay_within_the_bound() {
        const TAKES: i64 = 20_000;
        let mut rng = fastrand::Rng::with_seed(7);
        for (per_window, window_ms, burst) in [
            (7u64, 1_000i64, 1u64),
            (120, 60_000, 3),
            (90_000, 60_000, 900),
        ] {
            let limit = rate(per_window, Duration::from_millis(window_ms as u64), burst);
            let mut bucket = Bucket::default();
            let mut grants: Vec<(Millis, u64)> = Vec::new();
            let mut now = T0;
            for _ in 0..TAKES {
                // Over three windows in all, far more than the rate asks.
                now += rng.i64(0..=(6 * window_ms / TAKES).max(1));
                let cost = rng.u64(0..=burst);
                let wait = Duration::from_millis(rng.u64(0..=window_ms as u64 / 4));
                let t = Take::new("k", limit, cost, wait, now).expect("a valid take");
                match t.apply(&mut bucket) {
                    Grant::Granted => grants.push((now, cost)),
                    Grant::Reserved(at) => {
                        assert!(at > now && at <= now + wait.as_millis() as Millis);
                        grants.push((at, cost));
                    }
                    Grant::RetryAt(at) => {
                        assert!(at > now);
                        let again = Take::new("k", limit, cost, wait, at).expect("valid");
                        let mut copy = bucket;
                        let granted = again.apply(&mut copy);
                        assert!(
                            !matches!(granted, Grant::RetryAt(_)),
                            "at {at}: {granted:?}"
                        );
                    }
                }
            }
            grants.sort_unstable();
            let (mut start, mut units, mut most) = (0, 0, 0);
            for end in 0..grants.len() {
                units += grants[end].1;
                while grants[start].0 + window_ms <= grants[end].0 {
                    units -= grants[start].1;
                    start += 1;
                }
                most = most.max(units);
            }
            assert!(
                (per_window..per_window + burst).contains(&most),
                "at most {most} units in a window of {window_ms} ms at {per_window}/{burst}"
            );
        }
    }

    #[test]
    fn adjustments_are_clamped() {
        // T = 10 ms per token, burst 1 000 tokens (10 s), window 60 s.
        let tpm = rate(6_000, MINUTE, 1_000);
        let mut bucket = Bucket::default();
        Adjust::new("k", tpm, 1_000_000, T0)
            .expect("valid")
            .apply(&mut bucket);
        assert_eq!(
            bucket.tat,
            ns(T0 + 10_000 + 60_000),
            "owes one window at most"
        );
        Adjust::new("k", tpm, -1_000_000, T0 + 1)
            .expect("valid")
            .apply(&mut bucket);
        assert_eq!(bucket.tat, ns(T0 + 1), "full, not fuller");
        let before = bucket;
        Adjust::new("k", tpm, -5, T0 + 2)
            .expect("valid")
            .apply(&mut bucket);
        assert_eq!(bucket, before, "a full bucket stays as it is");
    }
}
