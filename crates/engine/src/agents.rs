//! Compiled agent versions, cached: a version never changes once registered,
//! so a run pinned to it always sees the same spec.
//!
//! The cache keeps the [`CAPACITY`] versions used last: a server running for
//! weeks meets every version ever registered (one per deploy, or per
//! customer), and a compiled one holds its tools' schema validators (tens to
//! hundreds of KB each). One not cached is read and compiled again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keel_core::Agent;
use keel_store::{Error, Result, Store};

type Key = (String, String, String);

/// Compiled versions kept per cache.
const CAPACITY: usize = 256;

/// Cache of compiled agents keyed by (tenant, name, version).
#[derive(Clone)]
pub struct Agents<S> {
    store: S,
    cache: Arc<Mutex<Cache>>,
}

/// The cached versions, each with when it was last used.
#[derive(Default)]
struct Cache {
    agents: HashMap<Key, (Arc<Agent>, u64)>,
    /// Bumped at every use: the entry with the lowest stamp is the least
    /// recently used.
    clock: u64,
}

impl Cache {
    fn get(&mut self, key: &Key) -> Option<Arc<Agent>> {
        self.clock += 1;
        let (agent, used) = self.agents.get_mut(key)?;
        *used = self.clock;
        Some(agent.clone())
    }

    /// Adds a version, dropping the least recently used one when full.
    fn insert(&mut self, key: Key, agent: Arc<Agent>, capacity: usize) {
        if self.agents.len() >= capacity && !self.agents.contains_key(&key) {
            let oldest = self
                .agents
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.agents.remove(&oldest);
            }
        }
        self.clock += 1;
        self.agents.insert(key, (agent, self.clock));
    }
}

impl<S: Store> Agents<S> {
    /// An empty cache over `store`.
    pub fn new(store: S) -> Self {
        Self {
            store,
            cache: Arc::default(),
        }
    }

    /// The compiled agent version, loaded from the store on first use.
    pub async fn get(&self, tenant: &str, name: &str, version: &str) -> Result<Arc<Agent>> {
        let key = (tenant.to_string(), name.to_string(), version.to_string());
        if let Some(agent) = self.lock().get(&key) {
            return Ok(agent);
        }
        let record = self
            .store
            .get_agent(tenant, name, Some(version))
            .await?
            .ok_or_else(|| Error::NotFound(format!("agent {name} version {version}")))?;
        let agent = Agent::new(record.spec)
            .map_err(|e| Error::Corrupt(format!("stored agent {name} {version}: {e}")))?;
        let agent = Arc::new(agent);
        self.lock().insert(key, agent.clone(), CAPACITY);
        Ok(agent)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A poisoned cache only means another thread panicked mid-insert; the map is still valid.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str) -> Arc<Agent> {
        let spec = serde_json::json!({
            "name": name,
            "version": "1",
            "model": {"provider": "scripted", "model": "s", "script": [{"content": "done"}]}
        });
        Arc::new(Agent::from_value(spec).expect("a valid spec"))
    }

    fn key(name: &str) -> Key {
        ("t".to_string(), name.to_string(), "1".to_string())
    }

    #[test]
    fn the_least_recently_used_version_goes_first() {
        let mut cache = Cache::default();
        for name in ["a", "b", "c"] {
            cache.insert(key(name), agent(name), 3);
        }
        // `a` is used again: `b` is now the oldest.
        assert!(cache.get(&key("a")).is_some());
        cache.insert(key("d"), agent("d"), 3);
        assert_eq!(cache.agents.len(), 3);
        assert!(cache.get(&key("b")).is_none());
        for name in ["a", "c", "d"] {
            assert!(cache.get(&key(name)).is_some(), "{name}");
        }
        // Many more versions: the cache stays at its capacity.
        for i in 0..100 {
            let name = format!("n{i}");
            cache.insert(key(&name), agent(&name), 3);
        }
        assert_eq!(cache.agents.len(), 3);
        assert!(cache.get(&key("n99")).is_some());
    }
}
