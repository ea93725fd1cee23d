//! A container's identity as Docker gives it.

use std::{borrow::Borrow, fmt};

/// A container's full ID (64 hex digits as Docker gives it; any string in tests). Keyed by
/// this, what the agent knows of one container is one record ([`super::Container`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerId(String);

impl ContainerId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 12-digit form Docker's CLI shows (logs use it).
    pub fn short(&self) -> &str {
        self.0.get(..12).unwrap_or(&self.0)
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for ContainerId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ContainerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for ContainerId {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<String> for ContainerId {
    fn from(s: String) -> Self {
        Self(s)
    }
}

#[cfg(test)]
mod tests {
    use super::ContainerId;

    #[test]
    fn short_form_and_lookup_by_str() {
        let id =
            ContainerId::new("07ed91b021f427542fc6f3854295a6e968635423cdc941c1bacdd1de19010604");
        assert_eq!(id.short(), "07ed91b021f4");
        assert_eq!(ContainerId::from("abc").short(), "abc");
        let m: std::collections::BTreeMap<ContainerId, u8> = [(id.clone(), 1)].into();
        assert_eq!(m.get(id.as_str()), Some(&1));
    }
}
