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

/// Where a table's batches go and its listings come from: `nft` ([`System`]), or a fake
/// in tests.
pub trait Nft {
    /// Applies `batch` as one transaction.
    fn run(&self, batch: Batch<'static>) -> Result<(), NftError>;
    /// Lists one table ([`NftError::NoTable`] when it is missing).
    fn list_table(&self, family: NfFamily, name: &str) -> Result<Listing, NftError>;
}

/// The host's nftables, through the `nft` binary.
#[derive(Clone, Copy, Debug, Default)]
pub struct System;

impl Nft for System {
    fn run(&self, batch: Batch<'static>) -> Result<(), NftError> {
        nft::run(batch)
    }

    fn list_table(&self, family: NfFamily, name: &str) -> Result<Listing, NftError> {
        nft::list_table(family, name)
    }
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
pub struct Table<S, N = System> {
    name: String,
    applied: Option<S>,
    /// The kernel holds `applied` as it was written (after a failed write, the next one
    /// writes the tables whole).
    in_place: bool,
    nft: N,
}

impl<S: TableSpec> Table<S> {
    pub fn new(name: &str) -> Self {
        Self::with(name, System)
    }
}

impl<S: TableSpec, N: Nft> Table<S, N> {
    /// Tables `name` written through `nft`.
    pub fn with(name: &str, nft: N) -> Self {
        Self {
            name: name.to_string(),
            applied: None,
            in_place: false,
            nft,
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
            Some(old) => self
                .nft
                .run(spec.batch(&self.name, Start::Applied(old)))
                .map_err(Into::into),
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
                self.nft.run(b).map_err(Into::into)
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
        self.nft.run(spec.batch(&self.name, Start::Found(&found)))?;
        Ok(())
    }

    /// The tables as the kernel has them; those that are missing are left out.
    pub fn read_back(&self) -> Result<Listing, NftError> {
        let mut all = Listing::default();
        for t in S::tables(&self.name) {
            match self.nft.list_table(t.family, &t.name) {
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
        self.nft
            .run(self.delete_batch())
            .with_context(|| format!("removing the {} table {}", S::ROLE, self.name))
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use nftables::schema::{Set, SetType, SetTypeValue};

    use super::*;

    /// A table holding one set of `elems` elements, written whole or as a change.
    #[derive(Clone, Debug, PartialEq)]
    struct Spec {
        elems: usize,
    }

    const T: &str = "t";

    fn set(elems: usize, name: &str) -> NfListObject<'static> {
        NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: T.into(),
            name: name.to_string().into(),
            handle: None,
            set_type: SetTypeValue::Single(SetType::Ipv4Addr),
            policy: None,
            flags: None,
            elem: Some(
                (0..elems)
                    .map(|i| nftables::expr::Expression::String(format!("10.0.0.{i}").into()))
                    .collect(),
            ),
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        }))
    }

    fn table() -> NfListObject<'static> {
        NfListObject::Table(nftables::schema::Table {
            family: NfFamily::INet,
            name: T.into(),
            handle: None,
        })
    }

    impl TableSpec for Spec {
        const ROLE: &'static str = "test";
        const DISPOSABLE: bool = false;

        fn tables(name: &str) -> Vec<TableId> {
            vec![TableId::new(NfFamily::INet, name)]
        }

        fn batch(&self, _: &str, start: Start<'_, Self>) -> Batch<'static> {
            let mut b = Batch::new();
            // The set's name says how it was written, for the tests to read.
            let how = match start {
                Start::Applied(_) => "changed",
                Start::Found(_) => "whole",
            };
            b.add(table());
            b.add(set(self.elems, how));
            b
        }

        fn expected_shape(&self, name: &str) -> Shape {
            let t = TableId::new(NfFamily::INet, name);
            Shape {
                tables: [t.clone()].into(),
                sets: [((t, "s".to_string()), self.elems)].into(),
                ..Shape::default()
            }
        }
    }

    /// What the fake kernel holds, what it was asked, and the refusals to come.
    #[derive(Default)]
    struct Kernel {
        listing: Option<Listing>,
        runs: Vec<String>,
        lists: usize,
        refuse: usize,
    }

    #[derive(Clone, Default)]
    struct Fake(Rc<RefCell<Kernel>>);

    impl Nft for Fake {
        fn run(&self, batch: Batch<'static>) -> Result<(), NftError> {
            let mut k = self.0.borrow_mut();
            let json = nft::encode(batch).json.to_string();
            let how = ["changed", "whole"]
                .into_iter()
                .find(|h| json.contains(&format!("\"name\":\"{h}\"")));
            let how = match (json.contains("\"delete\""), how) {
                (true, Some(h)) => format!("delete+{h}"),
                (true, None) => "delete".to_string(),
                (false, Some(h)) => h.to_string(),
                (false, None) => "other".to_string(),
            };
            k.runs.push(how);
            if k.refuse > 0 {
                k.refuse -= 1;
                return Err(NftError::Refused("refused by the test".into()));
            }
            Ok(())
        }

        fn list_table(&self, family: NfFamily, name: &str) -> Result<Listing, NftError> {
            let mut k = self.0.borrow_mut();
            k.lists += 1;
            k.listing.clone().ok_or(NftError::NoTable {
                family: family_name(family),
                name: name.to_string(),
            })
        }
    }

    /// A listing of the table with set `s` holding `elems` elements.
    fn holding(elems: usize) -> Listing {
        Listing {
            objects: vec![table(), set(elems, "s")],
            ..Listing::default()
        }
    }

    fn runs(f: &Fake) -> Vec<String> {
        std::mem::take(&mut f.0.borrow_mut().runs)
    }

    #[test]
    fn written_whole_first_then_only_changes_and_nothing_when_unchanged() {
        let f = Fake::default();
        let mut t = Table::with(T, f.clone());
        assert_eq!(
            t.apply(&Spec { elems: 2 }, false).unwrap(),
            Applied::Written
        );
        assert_eq!(runs(&f), ["whole"]);
        assert_eq!(f.0.borrow().lists, 1, "read back before a whole write");
        assert_eq!(
            t.apply(&Spec { elems: 2 }, false).unwrap(),
            Applied::Unchanged
        );
        assert!(runs(&f).is_empty(), "the spec in place costs no nft run");
        assert_eq!(
            t.apply(&Spec { elems: 3 }, false).unwrap(),
            Applied::Written
        );
        assert_eq!(runs(&f), ["changed"]);
        // Forced: written whole even though unchanged.
        t.apply(&Spec { elems: 3 }, true).unwrap();
        assert_eq!(runs(&f), ["whole"]);
    }

    #[test]
    fn a_refused_change_is_written_whole_and_a_refused_write_is_tried_whole_next_time() {
        let f = Fake::default();
        let mut t = Table::with(T, f.clone());
        t.apply(&Spec { elems: 1 }, false).unwrap();
        runs(&f);
        f.0.borrow_mut().refuse = 1;
        assert_eq!(
            t.apply(&Spec { elems: 2 }, false).unwrap(),
            Applied::Written
        );
        assert_eq!(runs(&f), ["changed", "whole"]);
        // Both refused: an error, and the next apply (even of the same spec) writes whole.
        f.0.borrow_mut().refuse = 2;
        assert!(t.apply(&Spec { elems: 3 }, false).is_err());
        assert_eq!(runs(&f), ["changed", "whole"]);
        assert!(!t.holds(&Spec { elems: 3 }));
        assert_eq!(
            t.apply(&Spec { elems: 3 }, false).unwrap(),
            Applied::Written
        );
        assert_eq!(runs(&f), ["whole"]);
    }

    #[test]
    fn a_table_that_drifted_is_restored_and_one_in_place_is_left_alone() {
        let f = Fake::default();
        let mut t = Table::with(T, f.clone());
        assert!(!t.repair().unwrap(), "nothing applied: nothing to repair");
        t.apply(&Spec { elems: 2 }, false).unwrap();
        runs(&f);
        f.0.borrow_mut().listing = Some(holding(2));
        assert!(!t.repair().unwrap());
        assert!(runs(&f).is_empty());
        // An element deleted by hand.
        f.0.borrow_mut().listing = Some(holding(1));
        assert!(t.repair().unwrap());
        assert_eq!(runs(&f), ["whole"]);
        // The table deleted by hand.
        f.0.borrow_mut().listing = None;
        assert!(t.repair().unwrap());
        assert_eq!(runs(&f), ["whole"]);
        // Unreadable (here: refused on the write back): an error, written whole next time.
        f.0.borrow_mut().listing = Some(holding(0));
        f.0.borrow_mut().refuse = 1;
        assert!(t.repair().is_err());
        runs(&f);
        assert_eq!(
            t.apply(&Spec { elems: 2 }, false).unwrap(),
            Applied::Written
        );
        assert_eq!(runs(&f), ["whole"]);
    }

    #[test]
    fn removing_deletes_the_tables_and_the_next_apply_writes_whole() {
        let f = Fake::default();
        let mut t = Table::with(T, f.clone());
        t.apply(&Spec { elems: 2 }, false).unwrap();
        runs(&f);
        t.remove().unwrap();
        assert_eq!(runs(&f), ["delete"]);
        assert!(t.applied().is_none());
        t.apply(&Spec { elems: 2 }, false).unwrap();
        assert_eq!(runs(&f), ["whole"]);
    }
}
