//! Compiled agent versions, cached: a version never changes once registered,
//! so a run pinned to it always sees the same spec.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keel_core::Agent;
use keel_store::{Error, Result, Store};

type Key = (String, String, String);

/// Cache of compiled agents keyed by (tenant, name, version).
#[derive(Clone)]
pub struct Agents<S> {
    store: S,
    cache: Arc<Mutex<HashMap<Key, Arc<Agent>>>>,
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
            return Ok(agent.clone());
        }
        let record = self
            .store
            .get_agent(tenant, name, Some(version))
            .await?
            .ok_or_else(|| Error::NotFound(format!("agent {name} version {version}")))?;
        let agent = Agent::new(record.spec)
            .map_err(|e| Error::Corrupt(format!("stored agent {name} {version}: {e}")))?;
        let agent = Arc::new(agent);
        self.lock().insert(key, agent.clone());
        Ok(agent)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Agent>>> {
        // A poisoned cache only means another thread panicked mid-insert; the map is still valid.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}
