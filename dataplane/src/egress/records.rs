//! The egress part of the model's container records, seen as the policies' own map: each
//! container with a known policy (from its `create`), by ID.

use std::collections::BTreeMap;

use crate::model::{self, ContainerId, EgressRecord};

/// The model's containers, by ID.
pub type Records = BTreeMap<ContainerId, model::Container>;

/// The containers with a known policy, read.
#[derive(Clone, Copy)]
pub struct Policies<'a>(pub &'a Records);

impl<'a> Policies<'a> {
    /// Itself (as [`PoliciesMut::read`] is for the mutable one).
    #[must_use]
    pub fn read(self) -> Self {
        self
    }

    pub fn get(&self, id: &str) -> Option<&'a EgressRecord> {
        self.0.get(id)?.egress.as_ref()
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a EgressRecord)> + use<'a> {
        self.0
            .iter()
            .filter_map(|(id, c)| Some((id.as_str(), c.egress.as_ref()?)))
    }

    pub fn values(&self) -> impl Iterator<Item = &'a EgressRecord> + use<'a> {
        self.iter().map(|(_, c)| c)
    }

    pub fn keys(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.iter().map(|(id, _)| id)
    }
}

/// The containers with a known policy, to change.
pub struct PoliciesMut<'a>(pub &'a mut Records);

impl PoliciesMut<'_> {
    pub fn read(&self) -> Policies<'_> {
        Policies(self.0)
    }

    pub fn get(&self, id: &str) -> Option<&EgressRecord> {
        self.0.get(id)?.egress.as_ref()
    }

    pub fn values(&self) -> impl Iterator<Item = &EgressRecord> {
        self.0.values().filter_map(|c| c.egress.as_ref())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &EgressRecord)> {
        self.0
            .iter()
            .filter_map(|(id, c)| Some((id.as_str(), c.egress.as_ref()?)))
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut EgressRecord> {
        self.0.get_mut(id)?.egress.as_mut()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut EgressRecord)> {
        self.0
            .iter_mut()
            .filter_map(|(id, c)| Some((id.as_str(), c.egress.as_mut()?)))
    }

    /// Forgets the container's policy (the rest of its record is the model's).
    pub fn remove(&mut self, id: &str) {
        if let Some(c) = self.0.get_mut(id) {
            c.egress = None;
        }
    }

    /// The container's policy record, made when there is none.
    pub fn entry(&mut self, id: &str) -> &mut EgressRecord {
        self.0
            .entry(ContainerId::from(id))
            .or_default()
            .egress
            .get_or_insert_with(EgressRecord::default)
    }
}
