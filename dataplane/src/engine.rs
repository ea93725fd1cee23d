//! What the Docker engine in use does that decides what the agent may translate, kept in
//! one place (what each version does, from which version):
//! - All: published ports are mapped through the container's gateway endpoint (see
//!   `netns::default_routes`); a network with inter-container communication off or
//!   `--internal` never connects containers straight to each other.
//! - 27.0+: `com.docker.network.bridge.gateway_mode_ipv4` / `_ipv6`: `nat` (the default)
//!   and `nat-unprotected` publish ports through NAT; `routed` publishes none (the
//!   container's port is reached at its own address, never at a host port) and `isolated`
//!   (28.0+) has no gateway at all. Only NAT-published families are translated.
//! - 28.0+: raw-table drops of direct access to container addresses from other interfaces,
//!   `DOCKER-FORWARD` chains: Docker's own path decides what reaches a container from
//!   elsewhere; the agent translates only host clients and containers on the backend's
//!   network, which those rules allow.
//! - 29.0+: an nftables firewall backend (`FirewallBackend` in `/info`): no `DOCKER-USER`
//!   chain; Docker's tables (`ip docker-bridges`, `ip6 docker-bridges`) are Docker's, not
//!   the operator's (see `hostfw`). Reported in `bridge-ctl status`; designed, not tested
//!   here (no 29 engine runs on this machine kind).

use std::collections::HashMap;

/// The network option that sets how a bridge network's IPv4 (IPv6) ports are published.
pub const GATEWAY_MODE_V4: &str = "com.docker.network.bridge.gateway_mode_ipv4";
pub const GATEWAY_MODE_V6: &str = "com.docker.network.bridge.gateway_mode_ipv6";

/// Whether Docker publishes ports through NAT on a network in gateway `mode` (absent: the
/// default, `nat`). An unknown mode is not assumed to publish.
pub fn publishes_nat(mode: Option<&str>) -> bool {
    matches!(mode.unwrap_or("nat"), "" | "nat" | "nat-unprotected")
}

/// The IPv4 and IPv6 publishing of a network, from its options.
pub fn nat_families<S: std::hash::BuildHasher>(
    options: &HashMap<String, String, S>,
) -> (bool, bool) {
    (
        publishes_nat(options.get(GATEWAY_MODE_V4).map(String::as_str)),
        publishes_nat(options.get(GATEWAY_MODE_V6).map(String::as_str)),
    )
}

/// The engine's firewall backend as `/info` reports it (29.0+); older engines do not say,
/// and use iptables.
pub fn firewall_backend(info: &bollard::models::SystemInfo) -> String {
    info.firewall_backend
        .as_ref()
        .and_then(|f| f.driver.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "iptables".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_modes() {
        assert!(publishes_nat(None));
        assert!(publishes_nat(Some("nat")));
        assert!(publishes_nat(Some("nat-unprotected")));
        assert!(!publishes_nat(Some("routed")));
        assert!(!publishes_nat(Some("isolated")));
        assert!(!publishes_nat(Some("something-new")));
        let opts: HashMap<String, String> =
            [(GATEWAY_MODE_V4.to_string(), "routed".to_string())].into();
        assert_eq!(nat_families(&opts), (false, true));
    }

    #[test]
    fn firewall_backend_from_info() {
        let mut info = bollard::models::SystemInfo::default();
        assert_eq!(firewall_backend(&info), "iptables");
        info.firewall_backend = Some(bollard::models::FirewallInfo {
            driver: Some("nftables".into()),
            info: None,
        });
        assert_eq!(firewall_backend(&info), "nftables");
    }
}
