//! What the agent's own nftables tables have in common: each is written from a spec (a
//! [`TableSpec`]) as one transaction per change, remembered as applied, read back to see
//! whether it drifted, and restored when it did ([`Table`]).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use nftables::{batch::Batch, schema::NfListObject, types::NfFamily};

use super::{
    listing::{Listing, family_name},
    nft::{self, NftError},
};

/// One nftables table: its family and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableId {
    pub family: NfFamily,
    pub name: String,
}

impl TableId {
    pub fn new(family: NfFamily, name: &str) -> Self {
        Self {
            family,
            name: name.to_string(),
        }
    }
}

impl Ord for TableId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (family_name(self.family), &self.name).cmp(&(family_name(other.family), &other.name))
    }
}

impl PartialOrd for TableId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A chain, set or map of one of a spec's tables: its table and its name.
pub type ObjectId = (TableId, String);

/// What a read-back of a spec's tables must find for the spec to be in place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// The tables.
    pub tables: BTreeSet<TableId>,
    /// Every chain of those tables, with the number of rules it holds (`None`: any number,
    /// for a chain whose rules are not the agent's, or a table whose check is by chain).
    pub chains: BTreeMap<ObjectId, Option<usize>>,
    /// Prefixes of the names of chains written per item (a container's chains): such a
    /// chain found that is not in `chains` is drift (a whole write removes it). Other
    /// chains that are not in `chains` are not the agent's.
    pub owned_prefixes: BTreeSet<String>,
    /// The sets and maps the agent fills, with their number of elements (those the packet
    /// path fills are not here).
    pub sets: BTreeMap<ObjectId, usize>,
}

impl Shape {
    /// What `found` (the listing of the tables of `self`) holds of what `self` looks at.
    #[must_use]
    pub fn found(&self, found: &Listing) -> Self {
        let mut shape = Self {
            owned_prefixes: self.owned_prefixes.clone(),
            ..Self::default()
        };
        let id = |family: NfFamily, table: &str| TableId::new(family, table);
        for o in &found.objects {
            match o {
                NfListObject::Table(t) => {
                    let t = id(t.family, &t.name);
                    if self.tables.contains(&t) {
                        shape.tables.insert(t);
                    }
                }
                NfListObject::Chain(c) => {
                    let key = (id(c.family, &c.table), c.name.to_string());
                    let rules = match self.chains.get(&key) {
                        Some(None) => None,
                        Some(Some(_)) => Some(0),
                        None if self
                            .owned_prefixes
                            .iter()
                            .any(|p| c.name.starts_with(p.as_str())) =>
                        {
                            Some(0)
                        }
                        None => continue,
                    };
                    shape.chains.insert(key, rules);
                }
                NfListObject::Set(s) => {
                    let key = (id(s.family, &s.table), s.name.to_string());
                    if self.sets.contains_key(&key) {
                        shape
                            .sets
                            .insert(key, s.elem.as_ref().map_or(0, |e| e.len()));
                    }
                }
                NfListObject::Map(m) => {
                    let key = (id(m.family, &m.table), m.name.to_string());
                    if self.sets.contains_key(&key) {
                        shape
                            .sets
                            .insert(key, m.elem.as_ref().map_or(0, |e| e.len()));
                    }
                }
                _ => {}
            }
        }
        for r in &found.rules {
            let key = (id(r.rule.family, &r.rule.table), r.rule.chain.to_string());
            if let Some(Some(n)) = shape.chains.get_mut(&key) {
                *n += 1;
            }
        }
        shape
    }
}

/// Where a batch starts from.
pub enum Start<'a, S> {
    /// What was applied last, in place: the batch need change only what differs.
    Applied(&'a S),
    /// What the tables hold now, read back (empty where a table is missing): the batch
    /// writes the tables whole.
    Found(&'a Listing),
}

/// What one of the agent's tables holds, as something it can write and check.
pub trait TableSpec: Clone + PartialEq {
    /// What the tables are for, in logs and errors.
    const ROLE: &'static str;
    /// Whether tables that refuse a write may be deleted and written anew: they hold
    /// nothing that must outlive a write (learnt counters, the operator's rules).
    const DISPOSABLE: bool;

    /// The tables written, for the name the agent gives them.
    fn tables(name: &str) -> Vec<TableId>;

    /// The batch that makes tables `name` hold `self`, from `start`.
    fn batch(&self, name: &str, start: Start<'_, Self>) -> Batch<'static>;

    /// What a read-back of tables `name` must find when `self` is in place.
    fn expected_shape(&self, name: &str) -> Shape;
}

/// Whether an apply wrote anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The spec was the one in place: nothing was written.
    Unchanged,
    Written,
}

/// A spec's tables as the agent keeps them: what was applied last, and whether the
/// kernel holds it.
#[derive(Debug)]
pub struct Table<S> {
    name: String,
    applied: Option<S>,
    /// The kernel holds `applied` as it was written (after a failed write, the next one
    /// writes the tables whole).
    in_place: bool,
}

impl<S: TableSpec> Table<S> {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            applied: None,
            in_place: false,
        }
    }

    /// The name the tables are written under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What was applied last.
    pub fn applied(&self) -> Option<&S> {
        self.applied.as_ref()
    }

    /// Whether `spec` is in place: an apply of it writes nothing.
    pub fn holds(&self, spec: &S) -> bool {
        self.in_place && self.applied.as_ref() == Some(spec)
    }

    /// Takes `spec` as written, without writing it (tests of what reads the table).
    #[cfg(test)]
    pub fn assume_applied(&mut self, spec: S) {
        self.applied = Some(spec);
        self.in_place = true;
    }

    /// The next apply writes the tables whole, even with a spec that is in place.
    pub fn forget(&mut self) {
        self.in_place = false;
    }

    /// Applies `spec`: nothing when it is in place (unless `force`); what differs from the
    /// spec in place; else the tables whole, in place. A change the kernel refuses is
    /// written whole instead; tables that refuse that too are replaced whole where they
    /// may be ([`TableSpec::DISPOSABLE`]).
    pub fn apply(&mut self, spec: &S, force: bool) -> Result<Applied> {
        if !force && self.holds(spec) {
            return Ok(Applied::Unchanged);
        }
        let in_place = self.in_place && !force;
        self.in_place = false;
        let delta = self.applied.as_ref().filter(|_| in_place);
        let r = match delta {
            Some(old) => nft::run(spec.batch(&self.name, Start::Applied(old))).map_err(Into::into),
            None => self.write_whole(spec),
        };
        let r = match r {
            Err(e) if S::DISPOSABLE => {
                tracing::info!(error = %format!("{e:#}"), table = %self.name, role = S::ROLE, "replacing the table whole");
                let mut b = self.delete_batch();
                b.add_all(
                    spec.batch(&self.name, Start::Found(&Listing::default()))
                        .to_nftables()
                        .objects
                        .into_owned(),
                );
                nft::run(b).map_err(Into::into)
            }
            Err(e) if delta.is_some() => {
                tracing::info!(error = %format!("{e:#}"), table = %self.name, role = S::ROLE, "a change was refused: writing the table whole");
                self.write_whole(spec)
            }
            r => r,
        };
        r.with_context(|| format!("writing the {} table {}", S::ROLE, self.name))?;
        self.applied = Some(spec.clone());
        self.in_place = true;
        Ok(Applied::Written)
    }

    /// Writes `spec` whole over what the tables hold now.
    fn write_whole(&self, spec: &S) -> Result<()> {
        let found = self.read_back()?;
        nft::run(spec.batch(&self.name, Start::Found(&found)))?;
        Ok(())
    }

    /// The tables as the kernel has them; those that are missing are left out.
    pub fn read_back(&self) -> Result<Listing, NftError> {
        let mut all = Listing::default();
        for t in S::tables(&self.name) {
            match nft::list_table(t.family, &t.name) {
                Ok(l) => all.extend(l),
                Err(NftError::NoTable { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(all)
    }

    /// Reads the tables back and, if they drifted from what was applied last (a rule, an
    /// element or a table deleted by hand), writes it whole again. Whether they had
    /// drifted.
    pub fn repair(&mut self) -> Result<bool> {
        let Some(spec) = self.applied.clone() else {
            return Ok(false);
        };
        let want = spec.expected_shape(&self.name);
        let found = self
            .read_back()
            .with_context(|| format!("reading back the {} table {}", S::ROLE, self.name))?;
        if self.in_place && want.found(&found) == want {
            return Ok(false);
        }
        self.apply(&spec, true)?;
        Ok(true)
    }

    fn delete_batch(&self) -> Batch<'static> {
        let mut b = Batch::new();
        for t in S::tables(&self.name) {
            let table = nftables::schema::Table {
                family: t.family,
                name: t.name.into(),
                handle: None,
            };
            // Declared first, so a missing table is no error.
            b.add(NfListObject::Table(table.clone()));
            b.delete(NfListObject::Table(table));
        }
        b
    }

    /// Removes the tables.
    pub fn remove(&mut self) -> Result<()> {
        self.applied = None;
        self.in_place = false;
        nft::run(self.delete_batch())
            .with_context(|| format!("removing the {} table {}", S::ROLE, self.name))
    }
}
