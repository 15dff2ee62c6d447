//! Circuit breakers of the embedded store: the latest transition of each
//! endpoint, in memory.
//!
//! The embedded store has one process, whose own breakers already are the
//! whole truth; the map only lets the store answer [`crate::Store::breakers`]
//! like the shared backend does (the API shows it). A restart forgets it,
//! as it forgets the process's breakers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::BreakerRecord;

/// The latest transition of each endpoint, shared by the store's clones.
#[derive(Clone, Debug, Default)]
pub(super) struct Breakers(Arc<Mutex<BTreeMap<String, BreakerRecord>>>);

impl Breakers {
    /// Keeps `record` unless the endpoint has a newer one.
    pub(super) fn put(&self, record: BreakerRecord) {
        // Whole records are swapped: a panic elsewhere cannot leave one half-written.
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(&record.endpoint) {
            Some(stored) if stored.updated_at > record.updated_at => {}
            _ => {
                map.insert(record.endpoint.clone(), record);
            }
        }
    }

    /// Every endpoint's record, by endpoint.
    pub(super) fn all(&self) -> Vec<BreakerRecord> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.values().cloned().collect()
    }
}
