//! The shared vocabulary of addresses: the maps' 16-byte [`Addr`] and `std`'s `IpAddr`, and
//! a [`Service`] (address, protocol, port): what a backend is, to the notrack rules and to
//! socket destruction.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use dataplane_common::{Addr, PROTO_TCP, PROTO_UDP, v4_mapped};

/// A map address (IPv4 as v4-mapped) as an `IpAddr`.
pub fn addr_to_ip(a: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// An `IpAddr` as a map address (IPv4 as v4-mapped).
pub fn ip_to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// An address, a protocol number and a port: a backend as the network sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Service {
    pub addr: IpAddr,
    pub proto: u8,
    pub port: u16,
}

impl Service {
    pub const fn new(addr: IpAddr, proto: u8, port: u16) -> Self {
        Self { addr, proto, port }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = proto_name(self.proto);
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{proto}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{proto}", self.port),
        }
    }
}

/// A client prefix the packet layer may translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Prefix {
    type Err = String;

    /// `address/length`, or an address alone (a single host).
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("not an address or address/length: {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("prefix length of {s:?} is not 0 to {max}"))?,
        };
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Prefix {
    /// The allow-list trie's key: the address as the programs hold it (IPv4 v4-mapped, so
    /// 96 is added to its length).
    pub fn key(&self) -> (Addr, u32) {
        let extra = if self.addr.is_ipv4() { 96 } else { 0 };
        (ip_to_addr(self.addr), u32::from(self.len) + extra)
    }
}

/// The name of an IP protocol number the agent publishes.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_both_ways_and_services_shown() {
        for ip in ["172.17.0.2", "fd00::2", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(addr_to_ip(&ip_to_addr(ip)), ip);
        }
        assert_eq!(
            ip_to_addr("10.0.0.1".parse().unwrap())[10..12],
            [0xff, 0xff]
        );
        let s = Service::new("fd00::2".parse().unwrap(), 17, 53);
        assert_eq!(s.to_string(), "[fd00::2]:53/udp");
        assert_eq!(
            Service::new("172.17.0.2".parse().unwrap(), 6, 80).to_string(),
            "172.17.0.2:80/tcp"
        );
    }
}
