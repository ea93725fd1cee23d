//! A BPF hash map as a [`KvStore`], for the reconciler to keep in sync.

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData, MapError};

use crate::apply::reconcile::KvStore;

/// A BPF hash map as a [`KvStore`].
pub struct BpfHash<'a, K, V>(pub(super) HashMap<&'a mut MapData, K, V>);

impl<K: aya::Pod + Ord + Clone, V: aya::Pod> KvStore<K, V> for BpfHash<'_, K, V> {
    type Error = MapError;

    fn entries(&self) -> Result<BTreeMap<K, V>, MapError> {
        self.0.iter().collect()
    }

    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.0.insert(key, value, 0)
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        self.0.remove(key)
    }
}
