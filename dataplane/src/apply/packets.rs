//! The packet layer's part of an apply: stand back (or not) for the operator's forwarding
//! rules, then the allow-list, where each served backend is delivered, and the programs on
//! the uplinks. Each step is tried whatever the one before did; what failed is returned.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::Result;

use crate::{
    bpf::Loaded,
    packet::{Layer, Wanted},
};

/// The packet layer as the apply step drives it: the kernel's ([`Kernel`]), or a fake.
pub trait PacketLayer {
    /// Stops translating new flows while `why` names an operator's rule (or resumes).
    fn stand_back(&mut self, why: Option<String>);
    /// Writes the client allow-list (empty while standing back).
    fn sync_allow(&mut self) -> Result<()>;
    /// Writes where each backend is delivered.
    fn sync_endpoints(
        &mut self,
        want: &BTreeMap<IpAddr, Wanted>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Attaches the programs to `uplinks` (and the served containers' veths), detaching the
    /// rest.
    fn sync_links(&mut self, uplinks: &BTreeSet<String>);
}

/// The layer in the kernel, through the loaded programs' maps.
pub struct Kernel<'a> {
    pub layer: &'a mut Layer,
    pub loaded: &'a mut Loaded,
}

impl PacketLayer for Kernel<'_> {
    fn stand_back(&mut self, why: Option<String>) {
        self.layer.stand_back(why);
    }

    fn sync_allow(&mut self) -> Result<()> {
        self.layer.sync_allow(self.loaded)
    }

    async fn sync_endpoints(&mut self, want: &BTreeMap<IpAddr, Wanted>) -> Result<()> {
        self.layer.sync_endpoints(self.loaded, want).await
    }

    fn sync_links(&mut self, uplinks: &BTreeSet<String>) {
        self.layer.sync_links(self.loaded, uplinks);
    }
}

/// Applies the packet layer's part of a plan: standing back first (an operator's rule
/// empties the allow-list before anything else changes), then the allow-list, the
/// endpoints and the links. Returns the steps that failed.
pub async fn apply(
    layer: &mut impl PacketLayer,
    stand_back: Option<String>,
    want: &BTreeMap<IpAddr, Wanted>,
    uplinks: &BTreeSet<String>,
) -> Vec<String> {
    let mut errors = Vec::new();
    layer.stand_back(stand_back);
    if let Err(e) = layer.sync_allow() {
        errors.push(format!("writing the packet layer's allow-list: {e:#}"));
    }
    if let Err(e) = layer.sync_endpoints(want).await {
        errors.push(format!("writing the packet layer's endpoints: {e:#}"));
    }
    layer.sync_links(uplinks);
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        journal: Vec<String>,
        fail_allow: bool,
    }

    impl PacketLayer for Fake {
        fn stand_back(&mut self, why: Option<String>) {
            self.journal.push(format!("stand back {why:?}"));
        }

        fn sync_allow(&mut self) -> Result<()> {
            self.journal.push("allow".into());
            if self.fail_allow {
                anyhow::bail!("map full");
            }
            Ok(())
        }

        async fn sync_endpoints(&mut self, want: &BTreeMap<IpAddr, Wanted>) -> Result<()> {
            self.journal.push(format!("endpoints {}", want.len()));
            Ok(())
        }

        fn sync_links(&mut self, uplinks: &BTreeSet<String>) {
            self.journal.push(format!("links {}", uplinks.len()));
        }
    }

    #[tokio::test]
    async fn standing_back_comes_first_and_a_failed_step_stops_none_after_it() {
        let want: BTreeMap<IpAddr, Wanted> = [(
            "172.17.0.2".parse().unwrap(),
            Wanted {
                container: "a".into(),
                netns: "/proc/1/ns/net".into(),
            },
        )]
        .into();
        let uplinks: BTreeSet<String> = ["eth0".to_string()].into();
        let mut f = Fake {
            fail_allow: true,
            ..Fake::default()
        };
        let errors = apply(&mut f, Some("DOCKER-USER drop".into()), &want, &uplinks).await;
        assert_eq!(
            f.journal,
            [
                "stand back Some(\"DOCKER-USER drop\")",
                "allow",
                "endpoints 1",
                "links 1"
            ]
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("allow-list") && errors[0].contains("map full"));
        let mut f = Fake::default();
        assert!(apply(&mut f, None, &want, &uplinks).await.is_empty());
        assert_eq!(f.journal[0], "stand back None");
    }
}
