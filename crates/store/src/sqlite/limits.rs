//! Rate limits of the embedded store: buckets in memory.
//!
//! The embedded store has one process (the binary holds a lock on the
//! file), so the workers that share a limit all share this map, and a take
//! is a lock, a few additions and an unlock: no write, no fsync, nothing
//! queued behind the writer's batches. A table written through the writer
//! would give each LLM call the latency of a batch commit (`synchronous =
//! FULL`) for no gain in sharing.
//!
//! What that costs: a restart forgets the buckets and holds. Every key then
//! starts full, so at most one extra burst goes out after a restart (and a
//! provider's `Retry-After` is forgotten: its next `429` sets it again).
//! Limits are kept per [`super::SqliteStore`] and its clones: two stores
//! opened on one file do not share them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::Grant;
use crate::limit::{Adjust, Bucket, Take};

/// Keys past which idle buckets are dropped (a dropped bucket was full and
/// not held, which is what a missing one is).
const PRUNE_ABOVE: usize = 1024;

/// The buckets of every key, shared by the store's clones.
#[derive(Clone, Debug, Default)]
pub(super) struct Limits {
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

impl Limits {
    /// Decides a take ([`crate::Store::take_capacity`]).
    pub(super) fn take(&self, key: &str, take: &Take) -> Grant {
        self.with(key, take.now, |bucket| take.apply(bucket))
    }

    /// Applies a correction ([`crate::Store::adjust_capacity`]).
    pub(super) fn adjust(&self, key: &str, adjust: &Adjust, now: i64) {
        self.with(key, now, |bucket| adjust.apply(bucket));
    }

    /// Closes a key until `until` ([`crate::Store::hold_capacity`]).
    pub(super) fn hold(&self, key: &str, until: i64) {
        // With no time to tell idle buckets by, none is dropped.
        self.with(key, i64::MIN, |bucket| {
            bucket.held_until = bucket.held_until.max(until);
        });
    }

    /// [`crate::Store::active_limits`]: the keys under `prefix` but
    /// `except` whose TAT is after `since`.
    pub(super) fn active(&self, prefix: &str, except: &str, since: i64) -> u64 {
        let buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let active = buckets
            .iter()
            .filter(|(key, bucket)| {
                key.starts_with(prefix) && key.as_str() != except && bucket.tat > since
            })
            .count();
        u64::try_from(active).unwrap_or(u64::MAX)
    }

    /// Runs `f` on the bucket of `key` (a new, full one if there is none).
    /// Before adding a key to a big map, drops the buckets that are idle
    /// at `now`.
    fn with<T>(&self, key: &str, now: i64, f: impl FnOnce(&mut Bucket) -> T) -> T {
        // The buckets are plain numbers: a panic elsewhere cannot have left
        // one half-written.
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = buckets.get_mut(key) {
            return f(bucket);
        }
        if buckets.len() >= PRUNE_ABOVE {
            buckets.retain(|_, b| b.tat > now || b.held_until > now);
        }
        f(buckets.entry(key.to_string()).or_default())
    }
}
