//! Desired state against actual state: only the difference is applied.

use std::collections::BTreeMap;

/// A key/value store the agent owns: a BPF hash map in production, a `BTreeMap` in tests.
pub trait KvStore<K, V> {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Everything in the store now.
    fn entries(&self) -> Result<BTreeMap<K, V>, Self::Error>;
    fn put(&mut self, key: &K, value: &V) -> Result<(), Self::Error>;
    fn remove(&mut self, key: &K) -> Result<(), Self::Error>;
}

/// What one reconcile changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
}

impl Applied {
    pub fn changed(&self) -> bool {
        self.added + self.updated + self.removed > 0
    }
}

/// Makes `store` hold exactly `desired`. Changed entries are rewritten in place first, then
/// stale ones are removed, then new ones added: the store never holds more than the larger
/// of what it held and what is desired, so a map at capacity makes room before it fills
/// (a key that stays never stops answering; one that goes was going anyway). Running it
/// twice changes nothing the second time.
pub fn reconcile<K: Ord + Clone, V: PartialEq, S: KvStore<K, V>>(
    store: &mut S,
    desired: &BTreeMap<K, V>,
) -> Result<Applied, S::Error> {
    let actual = store.entries()?;
    let mut applied = Applied::default();
    for (k, v) in desired {
        match actual.get(k) {
            Some(cur) if cur == v => applied.unchanged += 1,
            Some(_) => {
                store.put(k, v)?;
                applied.updated += 1;
            }
            None => {}
        }
    }
    for k in actual.keys() {
        if !desired.contains_key(k) {
            store.remove(k)?;
            applied.removed += 1;
        }
    }
    for (k, v) in desired {
        if !actual.contains_key(k) {
            store.put(k, v)?;
            applied.added += 1;
        }
    }
    Ok(applied)
}

/// An in-memory store that records every write, for tests.
#[cfg(test)]
pub struct FakeStore<K, V> {
    pub map: BTreeMap<K, V>,
    pub writes: Vec<String>,
    /// Fail the n-th write (1-based) with this message.
    pub fail_at: Option<(usize, &'static str)>,
    /// Refuse to hold more entries than this, as a full BPF map does (`E2BIG`).
    pub capacity: Option<usize>,
}

#[cfg(test)]
impl<K, V> Default for FakeStore<K, V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            writes: Vec::new(),
            fail_at: None,
            capacity: None,
        }
    }
}

#[cfg(test)]
#[derive(Debug, thiserror::Error)]
#[error("fake store: {0}")]
pub struct FakeError(&'static str);

#[cfg(test)]
impl<K: Ord + Clone + std::fmt::Debug, V: Clone> KvStore<K, V> for FakeStore<K, V> {
    type Error = FakeError;
    fn entries(&self) -> Result<BTreeMap<K, V>, FakeError> {
        Ok(self.map.clone())
    }
    fn put(&mut self, key: &K, value: &V) -> Result<(), FakeError> {
        self.writes.push(format!("put {key:?}"));
        if let Some((n, msg)) = self.fail_at
            && self.writes.len() == n
        {
            return Err(FakeError(msg));
        }
        if self
            .capacity
            .is_some_and(|c| !self.map.contains_key(key) && self.map.len() >= c)
        {
            return Err(FakeError("full"));
        }
        self.map.insert(key.clone(), value.clone());
        Ok(())
    }
    fn remove(&mut self, key: &K) -> Result<(), FakeError> {
        self.writes.push(format!("remove {key:?}"));
        if let Some((n, msg)) = self.fail_at
            && self.writes.len() == n
        {
            return Err(FakeError(msg));
        }
        self.map.remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(items: &[(u16, u8)]) -> BTreeMap<u16, u8> {
        items.iter().copied().collect()
    }

    #[test]
    fn applies_only_the_difference_and_is_idempotent() {
        let mut s = FakeStore::<u16, u8> {
            map: desired(&[(1, 1), (2, 2), (3, 3)]),
            ..Default::default()
        };
        let want = desired(&[(2, 2), (3, 30), (4, 4)]);
        let a = reconcile(&mut s, &want).unwrap();
        assert_eq!(
            a,
            Applied {
                added: 1,
                updated: 1,
                removed: 1,
                unchanged: 1
            }
        );
        assert_eq!(s.map, want);
        // Updates in place, then removals, then additions.
        assert_eq!(s.writes, vec!["put 3", "remove 1", "put 4"]);
        s.writes.clear();
        let again = reconcile(&mut s, &want).unwrap();
        assert!(!again.changed());
        assert!(s.writes.is_empty());
    }

    #[test]
    fn a_full_store_makes_room_before_it_adds() {
        // Capacity 3, full; the desired content replaces two entries by two others.
        let mut s = FakeStore::<u16, u8> {
            map: desired(&[(1, 1), (2, 2), (3, 3)]),
            capacity: Some(3),
            ..Default::default()
        };
        let want = desired(&[(3, 3), (4, 4), (5, 5)]);
        reconcile(&mut s, &want).unwrap();
        assert_eq!(s.map, want);
    }

    #[test]
    fn empty_desired_clears_everything() {
        let mut s = FakeStore::<u16, u8> {
            map: desired(&[(1, 1), (2, 2)]),
            ..Default::default()
        };
        let a = reconcile(&mut s, &BTreeMap::new()).unwrap();
        assert_eq!(a.removed, 2);
        assert!(s.map.is_empty());
    }

    #[test]
    fn a_failed_write_is_reported_and_the_next_run_repairs() {
        let mut s = FakeStore::<u16, u8> {
            fail_at: Some((2, "map full")),
            ..Default::default()
        };
        let want = desired(&[(1, 1), (2, 2), (3, 3)]);
        let err = reconcile(&mut s, &want).unwrap_err();
        assert_eq!(err.to_string(), "fake store: map full");
        s.fail_at = None;
        let a = reconcile(&mut s, &want).unwrap();
        assert_eq!(a.added, 2);
        assert_eq!(s.map, want);
    }
}
