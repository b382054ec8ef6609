//! The served models, keyed by name and version, changeable while the server runs.
//!
//! Each entry is an `Arc<Model>`: a request takes its own `Arc` when it looks the model up and
//! holds it for its life, so replacing or removing an entry never pulls a model out from under a
//! request. The owners (what stops a model's batcher and joins its device threads) are kept by
//! the same key. [`Registry::load_one`] and [`Registry::unload_one`] are the primitives model
//! lifecycle builds on; startup publishes every configured model through `load_one`.
//!
//! Locks are held only to read or change the maps, never across an `.await`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::app::Model;
use crate::batching::ModelOwner;

/// A version as it sorts: whole numbers by value, above any other text (which sorts as text).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum VersionKey {
    Text(String),
    Number(u64),
}

impl std::fmt::Display for VersionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VersionKey::Text(t) => f.write_str(t),
            VersionKey::Number(n) => write!(f, "{n}"),
        }
    }
}

impl VersionKey {
    pub(crate) fn of(version: &str) -> VersionKey {
        match version.parse::<u64>() {
            Ok(n) => VersionKey::Number(n),
            Err(_) => VersionKey::Text(version.to_string()),
        }
    }
}

type Versions = BTreeMap<VersionKey, Arc<Model>>;

/// The served models and their owners.
#[derive(Default)]
pub struct Registry {
    models: RwLock<BTreeMap<String, Versions>>,
    owners: Mutex<BTreeMap<(String, String), ModelOwner>>,
}

/// A model taken out of the registry (replaced or unloaded): stop it once its requests are
/// done with it.
pub struct Retired {
    model: Arc<Model>,
    owner: Option<ModelOwner>,
}

impl Retired {
    /// Waits up to `grace` for the requests that still hold the model to finish with it, then
    /// stops it: what its batcher admitted is answered, its threads are joined. A request that
    /// still holds it after `grace` gets 503 (the model is shutting down), never a hang.
    pub async fn stop(self, grace: Duration) {
        let until = tokio::time::Instant::now() + grace;
        while Arc::strong_count(&self.model) > 1 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(owner) = self.owner {
            owner.shutdown().await;
        }
        // The model's sessions are dropped once the last holder lets go; the memory they freed
        // goes back to the system only when asked.
        drop(self.model);
        crate::memory::trim_c_heap();
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }
}

impl Registry {
    /// Publishes `model` under its name and version; from now on lookups get it. `owner` is
    /// what stops it (`None` when the caller keeps it). A model already there under the same
    /// name and version is replaced and returned, for the caller to [`Retired::stop`].
    pub fn load_one(&self, model: Model, owner: Option<ModelOwner>) -> Option<Retired> {
        let name = model.name().to_string();
        let version = model.version().to_string();
        let old_owner = {
            let mut owners = lock(&self.owners);
            let old = owners.remove(&(name.clone(), version.clone()));
            if let Some(o) = owner {
                owners.insert((name.clone(), version.clone()), o);
            }
            old
        };
        let old_model = write(&self.models)
            .entry(name)
            .or_default()
            .insert(VersionKey::of(&version), Arc::new(model));
        old_model.map(|model| Retired {
            model,
            owner: old_owner,
        })
    }

    /// Takes model `name` at `version` out: new lookups no longer find it. `None` when it is
    /// not there. Stop what is returned ([`Retired::stop`]).
    pub fn unload_one(&self, name: &str, version: &str) -> Option<Retired> {
        let model = {
            let mut models = write(&self.models);
            let versions = models.get_mut(name)?;
            let model = versions.remove(&VersionKey::of(version))?;
            if versions.is_empty() {
                models.remove(name);
            }
            model
        };
        let owner = lock(&self.owners).remove(&(name.to_string(), version.to_string()));
        Some(Retired { model, owner })
    }

    /// Model `name` at `version`, or its highest version when `version` is `None`.
    pub fn get(&self, name: &str, version: Option<&str>) -> Option<Arc<Model>> {
        let models = read(&self.models);
        let versions = models.get(name)?;
        match version {
            Some(v) => versions.get(&VersionKey::of(v)).cloned(),
            None => versions.values().next_back().cloned(),
        }
    }

    /// The versions of `name` served now, lowest first.
    pub fn versions(&self, name: &str) -> Vec<String> {
        read(&self.models).get(name).map_or(Vec::new(), |v| {
            v.values().map(|m| m.version().to_string()).collect()
        })
    }

    /// Every served model, by name then version.
    pub fn all(&self) -> Vec<Arc<Model>> {
        read(&self.models)
            .values()
            .flat_map(|v| v.values().cloned())
            .collect()
    }

    /// Stops every model it owns (on shutdown): each answers what it admitted, then its
    /// threads are joined. The models stay listed; their requests get 503 from then on.
    pub async fn stop_all(&self) {
        let owners = std::mem::take(&mut *lock(&self.owners));
        for owner in owners.into_values() {
            owner.shutdown().await;
        }
    }
}

// A panic while a lock is held cannot leave these maps half-changed (each change is one
// insert or remove), so a poisoned lock is used as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_sort_by_value_and_above_other_text() {
        let mut v = ["10", "9", "beta", "2", "alpha"]
            .map(VersionKey::of)
            .to_vec();
        v.sort();
        assert_eq!(
            v,
            vec![
                VersionKey::Text("alpha".into()),
                VersionKey::Text("beta".into()),
                VersionKey::Number(2),
                VersionKey::Number(9),
                VersionKey::Number(10),
            ]
        );
    }
}
