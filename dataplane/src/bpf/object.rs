//! The embedded eBPF object: its programs and maps by name, the programs chosen for a
//! kernel's features, and the ids of this build and of its map layout.

use dataplane_common::{
    MAP_AGENT, MAP_CONFIG, MAP_FE_STATS, MAP_FRONTENDS, MAP_LOCAL_ADDRS, MAP_PEER_NETS, MAP_PORTS,
    MAP_SOCK_OPT, MAP_SOCK_REV, MAP_STATS,
};

use crate::features::{Feature, Features};

/// The compiled eBPF object, embedded at build time (see `build.rs`). Empty when the agent
/// was built without the BPF toolchain.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane.bpf.o"));

/// The socket hooks, by program name, in attach order. Reverse translation
/// (getpeername, recvmsg) goes first so no translated socket is ever seen without it.
pub const SOCK_HOOKS: &[&str] = &[
    "dp_getpeername4",
    "dp_getpeername6",
    "dp_recvmsg4",
    "dp_recvmsg6",
    "dp_connect4",
    "dp_connect6",
    "dp_sendmsg4",
    "dp_sendmsg6",
    "dp_bind4",
    "dp_bind6",
];

/// The `setsockopt` hook (records `IPV6_V6ONLY`); attached before the socket hooks, so
/// every socket they see has its options recorded from then on.
pub const SOCKOPT_HOOK: &str = "dp_setsockopt";

/// Every map, pinned under the pin directory by its kernel name when pinning is on (the
/// agent map too, so a restart of the same build can take everything as it is pinned).
pub const MAPS: &[&str] = &[
    MAP_AGENT,
    MAP_FRONTENDS,
    MAP_LOCAL_ADDRS,
    MAP_CONFIG,
    MAP_STATS,
    MAP_SOCK_REV,
    MAP_PORTS,
    MAP_FE_STATS,
    MAP_PEER_NETS,
    MAP_SOCK_OPT,
    dataplane_common::pkt::MAP_PKT_EP,
    dataplane_common::pkt::MAP_FLOWS,
    dataplane_common::pkt::MAP_PKT_ALLOW,
];

/// Every hook, by program name.
pub(super) fn hooks() -> impl Iterator<Item = &'static str> {
    std::iter::once(SOCKOPT_HOOK).chain(SOCK_HOOKS.iter().copied())
}

/// The socket hooks attached on a kernel with `features`, as `(hook, program)` in attach
/// order: a hook's link is pinned by the hook's name, whichever program it carries. Without
/// `bpf_set_retval` the programs that call it cannot load: no `bind` hooks (no port
/// reservation), and `connect` programs that refuse with the hooks' own `EPERM`.
pub fn sock_programs(features: &Features) -> Vec<(&'static str, &'static str)> {
    let retval = features.has(Feature::SetRetval);
    SOCK_HOOKS
        .iter()
        .filter_map(|&h| match h {
            "dp_bind4" | "dp_bind6" if !retval => None,
            "dp_connect4" if !retval => Some((h, "dp_connect4_eperm")),
            "dp_connect6" if !retval => Some((h, "dp_connect6_eperm")),
            _ => Some((h, h)),
        })
        .collect()
}

/// Every hook attached on a kernel with `features`.
pub(super) fn attached_hooks(features: &Features) -> Vec<&'static str> {
    std::iter::once(SOCKOPT_HOOK)
        .chain(sock_programs(features).into_iter().map(|(h, _)| h))
        .collect()
}

/// This build's programs, named: a hash (64-bit FNV-1a) of the embedded object.
pub fn build_id() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A short name of this build's map layout (the maps' names and sizes of their keys and
/// values): two builds with the same id can share pinned maps.
pub fn layout_id() -> String {
    let names = MAPS.join(",");
    format!("{:08x}", dataplane_common::net_id(&names))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether program `name` of the embedded object calls helper `id` (itself, or any
    /// function it may call).
    fn calls_helper(obj: &aya_obj::Object, name: &str, id: i32) -> bool {
        let prog = &obj.programs[name];
        let own = &obj.functions[&prog.function_key()];
        let calls = |f: &aya_obj::Function| {
            f.instructions
                .iter()
                .any(|i| i.code == 0x85 && i.src_reg() == 0 && i.imm == id)
        };
        let bpf_to_bpf = own
            .instructions
            .iter()
            .any(|i| i.code == 0x85 && i.src_reg() == 1);
        // A called function is no program's entry; which one is called is not followed.
        let entries: Vec<_> = obj
            .programs
            .values()
            .map(aya_obj::Program::function_key)
            .collect();
        calls(own)
            || (bpf_to_bpf
                && obj
                    .functions
                    .iter()
                    .any(|(k, f)| !entries.contains(k) && calls(f)))
    }

    #[test]
    #[cfg_attr(
        no_ebpf_object,
        ignore = "built without the eBPF object: `cargo xtask build` makes it"
    )]
    fn the_programs_for_kernels_without_set_retval_never_call_it() {
        const SET_RETVAL: i32 = 187;
        assert!(!OBJECT.is_empty(), "built without the eBPF object");
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
        let old = Features::all("5.15").without(&[Feature::SetRetval]);
        let programs = sock_programs(&old);
        assert!(!programs.iter().any(|(h, _)| h.starts_with("dp_bind")));
        assert!(programs.contains(&("dp_connect4", "dp_connect4_eperm")));
        for (_, p) in &programs {
            assert!(
                !calls_helper(&obj, p, SET_RETVAL),
                "{p} calls bpf_set_retval"
            );
        }
        assert!(!calls_helper(&obj, SOCKOPT_HOOK, SET_RETVAL));
        // The full set does (so the check above can tell).
        for p in ["dp_bind4", "dp_bind6", "dp_connect4", "dp_connect6"] {
            assert!(calls_helper(&obj, p, SET_RETVAL), "{p}");
        }
        assert_eq!(
            sock_programs(&Features::all("6.18")).len(),
            SOCK_HOOKS.len()
        );
    }
}
