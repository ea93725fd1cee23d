//! Every map of the programs, named with its layout version (see `dataplane_common::MAP_*`).

use aya_ebpf::{
    btf_maps::SkStorage,
    helpers::generated::{bpf_map_lookup_elem, bpf_sk_release},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, SockMap},
};
use dataplane_common::{
    BPF_F_NO_PREALLOC, Backend, Config, FRONTENDS_MAX, FrontendKey, LOCAL_ADDRS_MAX, LocalAddr,
    PEER_NETS_MAX, PeerNet, PeerNetKey, PortFamilies, PortKey, STATS_LEN, SockOpt, SockRev,
    pkt::{Flow, FlowKey, PKT_ALLOW_MAX, PKT_EP_MAX, PktEndpoint},
};

/// Published address:port/proto -> container. Written only by the agent.
#[map(name = "DP_FE_V3")]
pub static FRONTENDS: HashMap<FrontendKey, Backend> =
    HashMap::with_max_entries(FRONTENDS_MAX, BPF_F_NO_PREALLOC);

/// Addresses that count as this host: host interface addresses and bridge gateways.
#[map(name = "DP_LOCAL_V2")]
pub static LOCAL_ADDRS: HashMap<[u8; 16], LocalAddr> =
    HashMap::with_max_entries(LOCAL_ADDRS_MAX, BPF_F_NO_PREALLOC);

/// Published port/proto -> the families it is published on; `bind()` leaves them to Docker.
#[map(name = "DP_PORTS_V2")]
pub static PORTS: HashMap<PortKey, PortFamilies> =
    HashMap::with_max_entries(FRONTENDS_MAX, BPF_F_NO_PREALLOC);

/// Frontend id -> sockets translated through it, per CPU. The agent creates and removes
/// the entries with the frontends; the programs only count into existing ones.
#[map(name = "DP_FESTATS_V2")]
pub static FE_STATS: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(FRONTENDS_MAX, BPF_F_NO_PREALLOC);

/// (container network namespace, Docker network) pairs: which container clients may be
/// translated to backends on which network. Written only by the agent.
#[map(name = "DP_PEERNET_V2")]
pub static PEER_NETS: HashMap<PeerNetKey, PeerNet> =
    HashMap::with_max_entries(PEER_NETS_MAX, BPF_F_NO_PREALLOC);

/// Options the `setsockopt` hook recorded per socket; lives and dies with the socket.
#[btf_map(name = "DP_SKOPT_V1")]
pub static SOCK_OPT: SkStorage<SockOpt> = SkStorage::new();

/// One entry: the host network namespace cookie and feature flags.
#[map(name = "DP_CFG_V1")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Per-CPU event counters, indexed by `dataplane_common::STAT_*`.
#[map(name = "DP_STATS_V2")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// What each translated socket dialled; lives and dies with the socket.
#[btf_map(name = "DP_SKREV_V1")]
pub static SOCK_REV: SkStorage<SockRev> = SkStorage::new();

/// The running agent's socket at index 0. The kernel removes it when the socket closes, and
/// it closes when the agent's process ends, however it ends (`kill -9` included). While the
/// slot is empty nobody vouches for the frontends (a container may have stopped and its
/// address gone to another), so nothing is translated and no port reserved.
#[map(name = "DP_AGENT_V1")]
pub static AGENT: SockMap = SockMap::with_max_entries(1, 0);

/// Whether an agent is running (its socket is in [`AGENT`]).
#[inline(always)]
pub fn agent_running() -> bool {
    let key: u32 = 0;
    // SAFETY: a lookup in a map this program owns; a socket map hands back a referenced
    // socket (or null), released right away.
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::from_ref(&AGENT).cast_mut().cast(),
            core::ptr::from_ref(&key).cast(),
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the referenced socket the lookup returned.
    unsafe { bpf_sk_release(sk) };
    true
}

#[inline(always)]
pub fn count_frontend(id: u32) {
    if let Some(p) = FE_STATS.get_ptr_mut(id) {
        // SAFETY: a per-CPU slot; only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

/// Packet layer: container address -> its host-side veth and MACs. Written only by the
/// agent.
#[map(name = "DP_PKTEP_V1")]
pub static PKT_EP: HashMap<[u8; 16], PktEndpoint> =
    HashMap::with_max_entries(PKT_EP_MAX, BPF_F_NO_PREALLOC);

/// Packet layer: translated flows by their reply tuple. The forward program creates them
/// (at a TCP SYN or a UDP datagram), both programs refresh them, the agent ages them out.
/// Sized at load.
#[map(name = "DP_FLOWS_V1")]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(1, 0);

/// Packet layer: client prefixes that may be translated. Written only by the agent.
#[map(name = "DP_PKTALLOW_V1")]
pub static PKT_ALLOW: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(PKT_ALLOW_MAX, BPF_F_NO_PREALLOC);
