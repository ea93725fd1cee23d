//! The packet layer in the agent (`--packet-layer`): which interfaces carry its programs
//! (the host's uplinks: the forward program; the host-side veths of containers that serve
//! published ports: the reply program), where each container is delivered to, the client
//! allow-list, and the flows' aging. The programs themselves are in `dataplane-ebpf`'s
//! `tc.rs`; [`crate::bpf::pkt`] loads them.
//!
//! With a pin directory every TCX link is pinned (`link_tc_<ifindex>_<program>`), so the
//! programs keep carrying the flows they carry while the agent is down or restarting; on
//! kernels before 6.6 (a `clsact` qdisc's filters) the filters stay in the kernel by
//! themselves and a restart replaces them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::FdLink,
    tc::{SchedClassifierLink, TcAttachOptions},
};
use dataplane_common::{Addr, pkt::PktEndpoint};
use tracing::{debug, info, warn};

use crate::{
    apply::reconcile::reconcile,
    bpf::{
        Loaded,
        pkt::{FORWARD, LINK_PREFIX, REPLY, Timeouts},
        sys,
    },
    model::desired::ip_to_addr,
    netlink::HostAddr,
};

pub use crate::addr::Prefix;

/// Flows the flow map holds by default (about 100 bytes each, preallocated).
pub const DEFAULT_FLOWS: u32 = 65_536;

/// What the packet layer is asked to do (the config file's `[packet_layer]` and the flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Clients the programs translate; every other client keeps Docker's DNAT.
    pub allow: Vec<Prefix>,
    /// The uplinks by name; `None`: every interface with an address that is not Docker's.
    pub interfaces: Option<Vec<String>>,
    /// Room in the flow map.
    pub flows: u32,
}

/// The packet layer's command-line flags (`--packet-layer`, `--packet-allow`,
/// `--packet-flows`), taken with the config file's `[packet_layer]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub on: bool,
    pub allow: Vec<String>,
    pub flows: Option<u32>,
}

/// The settings the config file's `[packet_layer]` and the flags make; `None`: the layer is
/// off. On, it must allow some client: nothing is translated for everyone by default.
pub fn settings(
    config: &crate::config::PacketConfig,
    flags: &Flags,
) -> Result<Option<Settings>, String> {
    if !(config.enabled || flags.on) {
        return Ok(None);
    }
    let mut allow = Vec::new();
    for a in config.allow.iter().chain(&flags.allow) {
        let p: Prefix = a.parse().map_err(|e| format!("packet layer allow: {e}"))?;
        if !allow.contains(&p) {
            allow.push(p);
        }
    }
    if allow.is_empty() {
        return Err("the packet layer is on but allows no client: name the client prefixes it                     translates with --packet-allow or [packet_layer] allow (0.0.0.0/0 and ::/0                     for every client; the host's firewall rules do not apply to them)"
            .to_string());
    }
    let flows = flags.flows.or(config.flows).unwrap_or(DEFAULT_FLOWS);
    if flows == 0 {
        return Err("packet layer flows: must be at least 1".to_string());
    }
    Ok(Some(Settings {
        allow,
        interfaces: config.interfaces.clone(),
        flows,
    }))
}

/// The interfaces whose ingress carries the forward program: those named in the settings,
/// or every interface with an address that is neither loopback nor one of Docker's
/// `bridges` (a bridge's own ports have no address).
pub fn uplinks(
    addrs: &[HostAddr],
    bridges: &BTreeSet<String>,
    named: Option<&[String]>,
) -> BTreeSet<String> {
    match named {
        Some(n) => n.iter().cloned().collect(),
        None => addrs
            .iter()
            .filter(|a| !a.ifname.is_empty() && a.ifname != "lo" && routable(a.ip))
            .filter(|a| !bridges.contains(&a.ifname))
            .map(|a| a.ifname.clone())
            .collect(),
    }
}

/// An address clients elsewhere can reach the host on: not loopback, not link-local (the
/// IPv6 link-local address every interface has, a bridge's ports included, makes no
/// uplink).
fn routable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

/// A container address the forward program delivers to, and what it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    container: String,
    netns: PathBuf,
    ep: PktEndpoint,
}

/// A container address to deliver to: its container and network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub container: String,
    pub netns: PathBuf,
}

/// How a program is attached to an interface.
enum Attachment {
    /// A TCX link an earlier agent pinned at this path (its program is swapped for this
    /// agent's at the first sync).
    Pinned(PathBuf),
    /// A TCX link pinned at this path, carrying this agent's program.
    Own(PathBuf),
    /// A TCX link that detaches when dropped (no pin directory).
    Fd(FdLink),
    /// A `clsact` filter: with a pin directory it stays in the kernel (found again by its
    /// name), without it detaches when dropped.
    Filter(String, Option<SchedClassifierLink>),
}

pub struct Layer {
    pub settings: Settings,
    pin_dir: Option<PathBuf>,
    tcx: bool,
    /// `(ifindex, program)` to how it is attached.
    attached: BTreeMap<(u32, &'static str), Attachment>,
    endpoints: BTreeMap<IpAddr, Endpoint>,
    /// The endpoint map as last written (`None`: to be read back and diffed).
    written: Option<BTreeMap<Addr, PktEndpoint>>,
    /// Addresses whose endpoint could not be read, and when to try again.
    retry: BTreeMap<IpAddr, Instant>,
    /// Interfaces that could not be attached (name: why), as last tried.
    pub errors: BTreeMap<String, String>,
    timeouts: Timeouts,
    /// Pins of `clsact` filters' interfaces are swept once (an earlier agent's filters).
    swept: bool,
    /// Why no client is translated now (operator rules the packets would skip).
    standing_back: Option<String>,
}

/// The name of interface `index`, if it exists.
fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has room for IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The index of interface `name`, if it exists.
fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

fn link_pin(dir: &Path, index: u32, prog: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{index}_{prog}"))
}

/// `(ifindex, program)` of a link pin's file name.
fn parse_link_pin(name: &str) -> Option<(u32, &'static str)> {
    let rest = name.strip_prefix(LINK_PREFIX)?;
    let (index, prog) = rest.split_once('_')?;
    let prog = [FORWARD, REPLY].into_iter().find(|p| *p == prog)?;
    Some((index.parse().ok()?, prog))
}

impl Layer {
    /// The packet layer as an earlier agent may have left it under `pin_dir`: its pinned
    /// links are taken as attached (each gets this agent's program at the first sync, or
    /// goes).
    pub fn new(settings: Settings, pin_dir: Option<PathBuf>) -> Self {
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        let mut attached = BTreeMap::new();
        if let Some(dir) = &pin_dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(k) = parse_link_pin(&name) {
                    attached.insert(k, Attachment::Pinned(e.path()));
                }
            }
        }
        Self {
            settings,
            pin_dir,
            tcx,
            attached,
            endpoints: BTreeMap::new(),
            written: None,
            retry: BTreeMap::new(),
            errors: BTreeMap::new(),
            timeouts: Timeouts::default(),
            swept: false,
            standing_back: None,
        }
    }

    /// While the host's firewall has rules that external clients' traffic to containers
    /// may meet (`why`: where), the programs translate no client: their packets would skip
    /// those rules. Flows under way continue on Docker's path, where the rules apply.
    pub fn stand_back(&mut self, why: Option<String>) {
        if why != self.standing_back {
            match &why {
                Some(w) => {
                    warn!(where_ = %w, "the host's firewall has rules for forwarded traffic: the packet layer stands back, external clients take Docker's DNAT");
                }
                None => {
                    info!("no operator rules for forwarded traffic: the packet layer translates");
                }
            }
        }
        self.standing_back = why;
    }

    /// The allow-list into its map: added, removed, diffed (empty while the layer stands
    /// back).
    pub fn sync_allow(&self, loaded: &mut Loaded) -> Result<()> {
        let want: BTreeSet<(Addr, u32)> = if self.standing_back.is_some() {
            BTreeSet::new()
        } else {
            self.settings.allow.iter().map(Prefix::key).collect()
        };
        let mut trie = loaded.pkt_allow()?;
        let have: BTreeSet<(Addr, u32)> = trie
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.data(), k.prefix_len()))
            .collect();
        for (a, l) in have.difference(&want) {
            trie.remove(&aya::maps::lpm_trie::Key::new(*l, *a))
                .context("removing a client prefix")?;
        }
        for (a, l) in want.difference(&have) {
            trie.insert(&aya::maps::lpm_trie::Key::new(*l, *a), 1, 0)
                .context("adding a client prefix")?;
        }
        Ok(())
    }

    /// Reads where to deliver each wanted container address (a new one, or one whose
    /// container or namespace changed) and writes the endpoint map; addresses no longer
    /// wanted go.
    pub async fn sync_endpoints(
        &mut self,
        loaded: &mut Loaded,
        want: &BTreeMap<IpAddr, Wanted>,
    ) -> Result<()> {
        self.endpoints.retain(|ip, e| {
            want.get(ip)
                .is_some_and(|w| w.container == e.container && w.netns == e.netns)
        });
        self.retry.retain(|ip, _| want.contains_key(ip));
        let now = Instant::now();
        for (ip, w) in want {
            if self.endpoints.contains_key(ip) || self.retry.get(ip).is_some_and(|t| *t > now) {
                continue;
            }
            match crate::endpoint::of(&w.netns, *ip).await {
                Ok(ep) => {
                    self.retry.remove(ip);
                    self.endpoints.insert(
                        *ip,
                        Endpoint {
                            container: w.container.clone(),
                            netns: w.netns.clone(),
                            ep,
                        },
                    );
                }
                Err(e) => {
                    // Not on a bridge (macvlan, host network), or gone meanwhile: Docker's
                    // path serves it; asked again later.
                    debug!(addr = %ip, error = %format!("{e:#}"), "no packet endpoint");
                    self.retry.insert(*ip, now + Duration::from_secs(30));
                }
            }
        }
        let map: BTreeMap<Addr, PktEndpoint> = self
            .endpoints
            .iter()
            .map(|(ip, e)| (ip_to_addr(*ip), e.ep))
            .collect();
        // Read back and diffed only when it changed (an apply comes with every event).
        if self.written.as_ref() != Some(&map) {
            self.written = None;
            reconcile(&mut loaded.pkt_endpoints()?, &map).context("updating the endpoint map")?;
            self.written = Some(map);
        }
        Ok(())
    }

    /// When an address whose endpoint could not be read is to be tried again.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retry.values().min().copied()
    }

    /// Attaches the forward program to `uplinks` and the reply program to the veths of the
    /// endpoints; detaches both from interfaces no longer wanted.
    pub fn sync_links(&mut self, loaded: &mut Loaded, uplinks: &BTreeSet<String>) {
        let mut want: BTreeMap<(u32, &'static str), String> = BTreeMap::new();
        self.errors.clear();
        for name in uplinks {
            match ifindex(name) {
                Some(i) => {
                    want.insert((i, FORWARD), name.clone());
                }
                None => {
                    self.errors
                        .insert(name.clone(), "no such interface".to_string());
                }
            }
        }
        for e in self.endpoints.values() {
            if let Some(name) = ifname(e.ep.ifindex) {
                want.insert((e.ep.ifindex, REPLY), name);
            }
        }
        if !self.tcx && !self.swept {
            Self::sweep_filters(&want);
            self.swept = true;
        }
        let gone: Vec<(u32, &'static str)> = self
            .attached
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(a) = self.attached.remove(&k) {
                detach(a, k);
            }
        }
        for ((index, prog), name) in want {
            let adopt = match self.attached.get(&(index, prog)) {
                Some(Attachment::Pinned(p)) => Some(p.clone()),
                Some(_) => continue,
                None => None,
            };
            let r = match adopt {
                Some(pin) => self.adopt(loaded, &pin, index, prog, &name),
                None => self.attach(loaded, index, prog, &name),
            };
            match r {
                Ok(a) => {
                    info!(interface = %name, program = prog, "packet program attached");
                    self.attached.insert((index, prog), a);
                }
                Err(e) => {
                    warn!(interface = %name, program = prog, error = %format!("{e:#}"), "attaching a packet program failed");
                    self.errors.insert(name, format!("{e:#}"));
                }
            }
        }
    }

    /// Swaps this agent's program into a link an earlier agent pinned; a link whose
    /// interface went is replaced.
    fn adopt(
        &self,
        loaded: &mut Loaded,
        pin: &Path,
        index: u32,
        prog: &'static str,
        name: &str,
    ) -> Result<Attachment> {
        let fd = loaded
            .tc_program(prog)?
            .fd()?
            .as_fd()
            .try_clone_to_owned()?;
        let swapped = sys::obj_get(pin).and_then(|link| sys::link_update(link.as_fd(), fd.as_fd()));
        match swapped {
            Ok(()) => Ok(Attachment::Own(pin.to_path_buf())),
            Err(e) => {
                debug!(pin = %pin.display(), error = %e, "a pinned packet link is defunct: attaching anew");
                let _ = std::fs::remove_file(pin);
                self.attach(loaded, index, prog, name)
            }
        }
    }

    fn attach(
        &self,
        loaded: &mut Loaded,
        index: u32,
        prog: &'static str,
        name: &str,
    ) -> Result<Attachment> {
        let p: &mut SchedClassifier = loaded.tc_program(prog)?;
        if self.tcx {
            let id = p
                .attach_with_options(
                    name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching {prog} to {name} (TCX)"))?;
            let link: FdLink = p.take_link(id)?.try_into()?;
            return Ok(match &self.pin_dir {
                Some(dir) => {
                    let pin = link_pin(dir, index, prog);
                    let _ = std::fs::remove_file(&pin);
                    link.pin(&pin)
                        .with_context(|| format!("pinning {}", pin.display()))?;
                    Attachment::Own(pin)
                }
                None => Attachment::Fd(link),
            });
        }
        // Already there is fine.
        let _ = aya::programs::tc::qdisc_add_clsact(name);
        // An earlier agent's filter goes (a restart), so one filter carries the program.
        let _ = aya::programs::tc::qdisc_detach_program(name, TcAttachType::Ingress, prog);
        let id = p
            .attach(name, TcAttachType::Ingress)
            .with_context(|| format!("attaching {prog} to {name} (clsact filter)"))?;
        let link = p.take_link(id)?;
        Ok(if self.pin_dir.is_some() {
            // Stays in the kernel after the agent: found again by name.
            std::mem::forget(link);
            Attachment::Filter(name.to_string(), None)
        } else {
            Attachment::Filter(name.to_string(), Some(link))
        })
    }

    /// Kernels before 6.6: filters of ours that an earlier agent left on interfaces no
    /// longer wanted go.
    fn sweep_filters(want: &BTreeMap<(u32, &'static str), String>) {
        let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(index) = ifindex(&name) else {
                continue;
            };
            for prog in [FORWARD, REPLY] {
                if !want.contains_key(&(index, prog)) {
                    let _ =
                        aya::programs::tc::qdisc_detach_program(&name, TcAttachType::Ingress, prog);
                }
            }
        }
    }

    /// Removes the flows idle past their timeouts; returns how many flows remain.
    pub fn age_flows(&self, loaded: &mut Loaded) -> Result<usize> {
        let now = crate::bpf::pkt::monotonic_ns();
        let mut map = loaded.pkt_flows()?;
        let mut old = Vec::new();
        let mut n = 0;
        for (k, f) in map.iter().filter_map(Result::ok) {
            if crate::bpf::pkt::expired(&k, &f, now, &self.timeouts) {
                old.push(k);
            } else {
                n += 1;
            }
        }
        for k in &old {
            let _ = map.remove(k);
        }
        if !old.is_empty() {
            debug!(removed = old.len(), remaining = n, "flows aged");
        }
        Ok(n)
    }

    /// What `status` shows.
    pub fn status(&self, flows: usize) -> dataplane_api::PacketStatus {
        let mut uplinks = Vec::new();
        let mut veths = 0;
        for (index, prog) in self.attached.keys() {
            if *prog == FORWARD {
                uplinks.push(ifname(*index).unwrap_or_else(|| index.to_string()));
            } else {
                veths += 1;
            }
        }
        dataplane_api::PacketStatus {
            uplinks,
            container_veths: veths,
            endpoints: self.endpoints.len(),
            flows,
            flows_counted_unix_ms: 0,
            flow_capacity: self.settings.flows,
            allow: self
                .settings
                .allow
                .iter()
                .map(ToString::to_string)
                .collect(),
            attach: if self.tcx { "tcx" } else { "clsact" }.to_string(),
            standing_back: self.standing_back.clone(),
            errors: self
                .errors
                .iter()
                .map(|(i, e)| format!("{i}: {e}"))
                .collect(),
        }
    }
}

/// Removes the packet layer's `clsact` filters from every interface (kernels before 6.6,
/// where they stay in the kernel without a pin): for `uninstall`. Returns where it did.
pub fn remove_filters() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        for prog in [FORWARD, REPLY] {
            if aya::programs::tc::qdisc_detach_program(&name, TcAttachType::Ingress, prog).is_ok() {
                out.push(format!("{prog}@{name}"));
            }
        }
    }
    out
}

fn detach(a: Attachment, (index, prog): (u32, &'static str)) {
    match a {
        Attachment::Pinned(pin) | Attachment::Own(pin) => {
            // The link goes with its last reference: the pin.
            let _ = std::fs::remove_file(&pin);
        }
        Attachment::Fd(link) => drop(link),
        Attachment::Filter(name, link) => match link {
            Some(l) => drop(l),
            None => {
                let _ = aya::programs::tc::qdisc_detach_program(&name, TcAttachType::Ingress, prog);
            }
        },
    }
    debug!(ifindex = index, program = prog, "packet program detached");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_with_clear_errors() {
        let p: Prefix = "10.0.0.0/8".parse().unwrap();
        assert_eq!(p.key().1, 8 + 96);
        assert_eq!(p.to_string(), "10.0.0.0/8");
        let h: Prefix = "2001:db8::1".parse().unwrap();
        assert_eq!(h.len, 128);
        assert_eq!(h.key().1, 128);
        assert!(
            "10.0.0.0/33"
                .parse::<Prefix>()
                .unwrap_err()
                .contains("0 to 32")
        );
        assert!(
            "ten/8"
                .parse::<Prefix>()
                .unwrap_err()
                .contains("not an address")
        );
        assert!("::/129".parse::<Prefix>().is_err());
    }

    #[test]
    fn on_it_must_allow_someone_and_flags_add_to_the_file() {
        let mut c = crate::config::PacketConfig::default();
        assert_eq!(settings(&c, &Flags::default()), Ok(None));
        c.enabled = true;
        assert!(
            settings(&c, &Flags::default())
                .unwrap_err()
                .contains("allows no client")
        );
        c.allow = vec!["10.0.0.0/8".into()];
        let flags = Flags {
            on: false,
            allow: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            flows: Some(1000),
        };
        let s = settings(&c, &flags).unwrap().unwrap();
        assert_eq!(s.allow.len(), 2);
        assert_eq!(s.flows, 1000);
        let bad = Flags {
            on: true,
            allow: vec!["10.0.0.0/40".into()],
            flows: None,
        };
        assert!(settings(&c, &bad).unwrap_err().contains("0 to 32"));
    }

    #[test]
    fn uplinks_are_the_hosts_interfaces_with_addresses_not_dockers() {
        let a = |ip: &str, ifname: &str| HostAddr {
            ip: ip.parse().unwrap(),
            prefix_len: 24,
            ifname: ifname.into(),
        };
        let addrs = [
            a("127.0.0.1", "lo"),
            a("192.0.2.10", "eth0"),
            a("2001:db8::10", "eth0"),
            a("172.17.0.1", "docker0"),
            a("198.51.100.1", "wg0"),
            a("fe80::1", "veth1234"),
        ];
        let bridges = BTreeSet::from(["docker0".to_string()]);
        let got = uplinks(&addrs, &bridges, None);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec!["eth0".to_string(), "wg0".to_string()]
        );
        let named = ["eth1".to_string()];
        assert_eq!(
            uplinks(&addrs, &bridges, Some(&named)),
            BTreeSet::from(["eth1".to_string()])
        );
    }

    #[test]
    fn link_pins_name_their_interface_and_program() {
        assert_eq!(
            parse_link_pin("link_tc_12_dp_tc_veth_in"),
            Some((12, REPLY))
        );
        assert_eq!(
            parse_link_pin("link_tc_3_dp_tc_uplink_in"),
            Some((3, FORWARD))
        );
        assert_eq!(parse_link_pin("link_tc_x_dp_tc_veth_in"), None);
        assert_eq!(parse_link_pin("link_dp_connect4"), None);
    }
}
