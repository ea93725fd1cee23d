//! cgroup `sock_addr` hooks. Every hook returns 1 (let the syscall proceed): a miss, a full
//! map or a failed helper degrades to "not translated" for that socket, never to an error.
//! Two refusals only: a bind in the host namespace of a published port (`EADDRINUSE`), and
//! a `connect()` to the frontend of a paused container that asked for it by its own label
//! (`ECONNREFUSED`).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_current_comm, bpf_get_current_uid_gid,
        generated::{bpf_get_netns_cookie, bpf_set_retval, bpf_sk_storage_get},
    },
    macros::{cgroup_sock_addr, cgroup_sockopt},
    programs::{SockAddrContext, SockoptContext},
};
use dataplane_common::{
    Addr, Backend, CFG_F_BINDV6ONLY, CFG_F_PEERS, CFG_F_RESERVE_PORTS, FrontendKey, PROTO_TCP,
    PROTO_UDP, PeerNetKey, PortKey, Reason, SOCKOPT_F_V6ONLY, SOCKOPT_F_V6ONLY_OFF,
    STAT_BIND_REFUSED, STAT_CONNECT, STAT_GETPEERNAME, STAT_RECVMSG, STAT_REFUSED_PAUSED,
    STAT_SENDMSG, STAT_SKSTORE_FULL, SockOpt, SockRev, WILDCARD4, is_loopback, is_v4_mapped,
    is_zero, v4_mapped, v4_part,
    xlate::{Target, bind_conflicts, frontend_for, refuses, target_v4, target_v6},
};

use crate::maps::{
    CONFIG, FRONTENDS, LOCAL_ADDRS, PEER_NETS, PORTS, SOCK_OPT, SOCK_REV, agent_running, count,
    count_frontend,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const EADDRINUSE: i32 = 98;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(bind4)]
pub fn dp_bind4(ctx: SockAddrContext) -> i32 {
    let s = sa(&ctx);
    let dst = v4_mapped(s.user_ip4.to_ne_bytes());
    bind_verdict(&ctx, &dst)
}

#[cgroup_sock_addr(bind6)]
pub fn dp_bind6(ctx: SockAddrContext) -> i32 {
    let dst = ip6(sa(&ctx));
    bind_verdict(&ctx, &dst)
}

/// Docker itself binds published ports (docker-proxy, or dockerd's port reservation when
/// the userland proxy is off): never stand in its way. A name is anyone's to choose
/// (`prctl(PR_SET_NAME)`), so the process must also run as root (its real uid, as the
/// initial user namespace sees it): what an unprivileged process cannot forge; root can
/// detach the programs anyway.
#[inline(always)]
fn is_docker() -> bool {
    if bpf_get_current_uid_gid() & 0xffff_ffff != 0 {
        return false;
    }
    let Ok(comm) = bpf_get_current_comm() else {
        return false;
    };
    comm.starts_with(b"dockerd\0") || comm.starts_with(b"docker-proxy\0")
}

/// Refuses, with `EADDRINUSE`, a bind in the host network namespace that would take a
/// published port, so no other listener silently steals or loses its traffic.
#[inline(always)]
fn bind_verdict(ctx: &SockAddrContext, dst: &Addr) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    if cfg.flags & CFG_F_RESERVE_PORTS == 0 {
        return ALLOW;
    }
    let s = sa(ctx);
    let Some(proto) = proto(s) else {
        return ALLOW;
    };
    let port_be = port_be(s);
    if port_be == 0 || !client_netns(ctx).1 {
        return ALLOW;
    }
    // An IPv6 wildcard bind is taken as dual-stack (the Linux default, bindv6only=0).
    let conflict = bind_conflicts(
        dst,
        port_be,
        proto,
        true,
        |port_be, proto| {
            let k = PortKey {
                port_be,
                proto,
                pad: 0,
            };
            // SAFETY: entries are written whole by the agent.
            unsafe { PORTS.get(k) }.copied()
        },
        // SAFETY: as in `lookup`.
        |k: &FrontendKey| unsafe { FRONTENDS.get(k) }.copied(),
        |a: &Addr| LOCAL_ADDRS.get_ptr(a).is_some(),
    );
    if !conflict || is_docker() {
        return ALLOW;
    }
    if !agent_running() {
        skipped(Reason::NoAgent);
        return ALLOW;
    }
    count(STAT_BIND_REFUSED);
    // SAFETY: sets the syscall's error for a refused bind; no memory is touched.
    unsafe { bpf_set_retval(-EADDRINUSE) };
    REFUSE
}

#[cgroup_sock_addr(connect4)]
pub fn dp_connect4(ctx: SockAddrContext) -> i32 {
    xlate4(&ctx, STAT_CONNECT, true)
}

#[cgroup_sock_addr(connect6)]
pub fn dp_connect6(ctx: SockAddrContext) -> i32 {
    xlate6(&ctx, STAT_CONNECT, true)
}

/// `dp_connect4` for kernels without `bpf_set_retval` (before 5.18): a refused `connect()`
/// fails with the hooks' own `EPERM`.
#[cgroup_sock_addr(connect4)]
pub fn dp_connect4_eperm(ctx: SockAddrContext) -> i32 {
    xlate4(&ctx, STAT_CONNECT, false)
}

/// `dp_connect6` for kernels without `bpf_set_retval`, as `dp_connect4_eperm`.
#[cgroup_sock_addr(connect6)]
pub fn dp_connect6_eperm(ctx: SockAddrContext) -> i32 {
    xlate6(&ctx, STAT_CONNECT, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn dp_sendmsg4(ctx: SockAddrContext) -> i32 {
    xlate4(&ctx, STAT_SENDMSG, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dp_sendmsg6(ctx: SockAddrContext) -> i32 {
    xlate6(&ctx, STAT_SENDMSG, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn dp_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx, STAT_RECVMSG);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn dp_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx, STAT_RECVMSG);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn dp_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx, STAT_GETPEERNAME);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn dp_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx, STAT_GETPEERNAME);
    ALLOW
}

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> &bpf_sock_addr {
    // SAFETY: the kernel hands every sock_addr program a valid context for its whole run.
    unsafe { &*ctx.sock_addr }
}

/// The port of the context, network byte order (the low 16 bits of `user_port`).
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "user_port is a __be16 widened to 32 bits"
)]
fn port_be(s: &bpf_sock_addr) -> u16 {
    s.user_port as u16
}

/// Rewrites the context's IPv4 address and port (both network byte order).
#[inline(always)]
fn set4(ctx: &SockAddrContext, ip: [u8; 4], port_be: u16) {
    // SAFETY: as in `sa`; these fields are writable in every hook that calls this.
    let s = unsafe { &mut *ctx.sock_addr };
    s.user_ip4 = u32::from_ne_bytes(ip);
    s.user_port = u32::from(port_be);
}

/// Rewrites the context's IPv6 address and port, one 32-bit word at a time (the only
/// store width the verifier accepts for `user_ip6`).
#[inline(always)]
fn set6(ctx: &SockAddrContext, a: &Addr, port_be: u16) {
    // SAFETY: as in `set4`.
    let s = unsafe { &mut *ctx.sock_addr };
    s.user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
    s.user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
    s.user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
    s.user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    s.user_port = u32::from(port_be);
}

#[inline(always)]
fn proto(sa: &bpf_sock_addr) -> Option<u8> {
    match u8::try_from(sa.protocol) {
        Ok(PROTO_TCP) => Some(PROTO_TCP),
        Ok(PROTO_UDP) => Some(PROTO_UDP),
        _ => None,
    }
}

/// The client's network namespace cookie, and whether it is the host's (one helper call
/// serves both).
#[inline(always)]
fn client_netns(ctx: &SockAddrContext) -> (u64, bool) {
    let cookie = netns_cookie(ctx);
    let host = CONFIG
        .get(0)
        .is_some_and(|cfg| cfg.host_netns_cookie != 0 && cookie == cfg.host_netns_cookie);
    (cookie, host)
}

/// The frontend `dst:port_be/proto` hits for a client in the namespace with `netns_cookie`
/// (`host_ns`: the host's), while an agent vouches for the maps.
#[inline(always)]
pub fn lookup(
    dst: &Addr,
    port_be: u16,
    proto: u8,
    host_ns: bool,
    netns_cookie: u64,
) -> Result<Backend, Reason> {
    let peers = CONFIG.get(0).is_some_and(|c| c.flags & CFG_F_PEERS != 0);
    let b = frontend_for(
        dst,
        port_be,
        proto,
        host_ns,
        // SAFETY: entries are written whole by the agent; a torn read is at worst a stale
        // backend for this one socket.
        |k: &FrontendKey| unsafe { FRONTENDS.get(k) }.copied(),
        |a: &Addr| LOCAL_ADDRS.get_ptr(a).is_some(),
        |net| {
            let k = PeerNetKey {
                netns_cookie,
                net,
                pad: 0,
            };
            peers && net != 0 && PEER_NETS.get_ptr(k).is_some()
        },
    )?;
    if !agent_running() {
        return Err(Reason::NoAgent);
    }
    Ok(b)
}

/// Counts why a socket was left alone, when it is a reason worth counting.
#[inline(always)]
pub fn skipped(r: Reason) {
    if let Some(i) = r.stat() {
        count(i);
    }
}

/// The socket the hook runs for.
#[inline(always)]
fn sock(ctx: &SockAddrContext) -> &bpf_sock {
    // SAFETY: `sk` of a sock_addr context is always a valid, non-null socket.
    unsafe { &*sa(ctx).__bindgen_anon_1.sk }
}

/// Whether a source address the socket (or, for `sendmsg`, this one message) has chosen
/// keeps it from being moved to the backend, so that it is left to Docker's path: in the
/// host namespace any chosen source (a loopback one cannot reach a container at all, and
/// Docker's NAT path masquerades the others); in a container only a loopback one (its own
/// address reaches a backend on its network as it is, and Docker's path would not help).
#[inline(always)]
fn source_blocks(src: &Addr, host_ns: bool) -> bool {
    if is_zero(src) || *src == WILDCARD4 {
        return false;
    }
    host_ns || is_loopback(src)
}

#[inline(always)]
fn bound_source4(ctx: &SockAddrContext, stat: u32, host_ns: bool) -> bool {
    let msg_src = if stat == STAT_SENDMSG {
        sa(ctx).msg_src_ip4
    } else {
        0
    };
    source_blocks(&v4_mapped(sock(ctx).src_ip4.to_ne_bytes()), host_ns)
        || source_blocks(&v4_mapped(msg_src.to_ne_bytes()), host_ns)
}

#[inline(always)]
fn words6(w: [u32; 4]) -> Addr {
    let mut a = [0u8; 16];
    for i in 0..4 {
        let b = w[i].to_ne_bytes();
        a[i * 4] = b[0];
        a[i * 4 + 1] = b[1];
        a[i * 4 + 2] = b[2];
        a[i * 4 + 3] = b[3];
    }
    a
}

#[inline(always)]
fn bound_source6(ctx: &SockAddrContext, stat: u32, host_ns: bool) -> bool {
    let sk = sock(ctx);
    let bound = words6([sk.src_ip6[0], sk.src_ip6[1], sk.src_ip6[2], sk.src_ip6[3]]);
    if source_blocks(&bound, host_ns) {
        return true;
    }
    if stat != STAT_SENDMSG {
        return false;
    }
    let m = sa(ctx).msg_src_ip6;
    source_blocks(&words6([m[0], m[1], m[2], m[3]]), host_ns)
}

#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper only reads the context's socket.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// Whether an IPv6 socket is IPv6-only (`IPV6_V6ONLY`, or the host's `bindv6only=1` default
/// unless the socket cleared it), as the `setsockopt` hook recorded it.
#[inline(always)]
fn v6only(ctx: &SockAddrContext, host_ns: bool) -> bool {
    // SAFETY: `sk` is valid for the program's run; without the create flag nothing is
    // allocated.
    let opt = unsafe {
        bpf_sk_storage_get(
            sock_opt_map(),
            sa(ctx).__bindgen_anon_1.sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockOpt>();
    let flags = if opt.is_null() {
        0
    } else {
        // SAFETY: non-null pointers from bpf_sk_storage_get point at a whole value.
        unsafe { (*opt).flags }
    };
    if flags & SOCKOPT_F_V6ONLY != 0 {
        return true;
    }
    let default_v6only = host_ns
        && CONFIG
            .get(0)
            .is_some_and(|c| c.flags & CFG_F_BINDV6ONLY != 0);
    default_v6only && flags & SOCKOPT_F_V6ONLY_OFF == 0
}

/// The socket-options map as the helpers take it. `SkStorage` only offers its accessors for
/// `sock_addr` contexts, and the `setsockopt` hook needs the same storage, so both go
/// through the raw helper with the map definition's address (what aya's accessors pass).
#[inline(always)]
fn sock_opt_map() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&SOCK_OPT).cast_mut().cast()
}

const SOL_IPV6: i32 = 41;
const IPV6_V6ONLY: i32 = 26;

/// Records `IPV6_V6ONLY` per socket (the `sock_addr` context does not show it). Never
/// changes or refuses the call.
#[cgroup_sockopt(setsockopt)]
pub fn dp_setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands every sockopt program a valid context for its whole run.
    let so = unsafe { &*ctx.sockopt };
    if so.level != SOL_IPV6 || so.optname != IPV6_V6ONLY {
        return 1;
    }
    // SAFETY: reading the union members the kernel filled in.
    let (start, end) = unsafe { (so.__bindgen_anon_2.optval, so.__bindgen_anon_3.optval_end) };
    if (start as usize) + 4 > end as usize {
        return 1;
    }
    // SAFETY: the bounds check above is what the verifier asks for.
    let on = unsafe { core::ptr::read_unaligned(start.cast::<i32>()) } != 0;
    // SAFETY: `sk` is valid for the program's run.
    let opt = unsafe {
        bpf_sk_storage_get(
            sock_opt_map(),
            so.__bindgen_anon_1.sk.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<SockOpt>();
    if !opt.is_null() {
        // SAFETY: non-null pointers from bpf_sk_storage_get point at a whole value.
        unsafe {
            (*opt).flags = if on {
                SOCKOPT_F_V6ONLY
            } else {
                SOCKOPT_F_V6ONLY_OFF
            };
        }
    }
    1
}

/// Records what the socket dialled, so getpeername/recvmsg can undo the translation.
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &Addr, orig_port_be: u16, t: &Target) {
    // SAFETY: the storage belongs to the context's socket, which outlives this program run.
    let rev = unsafe { SOCK_REV.get_or_insert_ptr_mut(ctx, None) };
    if rev.is_null() {
        // Socket storage could not be allocated: the socket still gets translated, only
        // getpeername() will show the backend. Counted so it is visible.
        count(STAT_SKSTORE_FULL);
        return;
    }
    // SAFETY: non-null pointers from bpf_sk_storage_get point at a whole value.
    unsafe {
        *rev = SockRev {
            orig_addr: *orig,
            backend_addr: t.addr,
            orig_port_be,
            backend_port_be: t.port_be,
            pad: 0,
        };
    }
}

/// What an IPv4 socket dialled, and where it goes instead.
#[inline(always)]
fn try_xlate4(ctx: &SockAddrContext, stat: u32) -> Result<(Addr, u16, Target), Reason> {
    let s = sa(ctx);
    let proto = proto(s).ok_or(Reason::NotTcpOrUdp)?;
    let dst = v4_mapped(s.user_ip4.to_ne_bytes());
    let port_be = port_be(s);
    let (cookie, host_ns) = client_netns(ctx);
    let b = lookup(&dst, port_be, proto, host_ns, cookie)?;
    let t = target_v4(&b).ok_or(Reason::NoTarget)?;
    if bound_source4(ctx, stat, host_ns) {
        return Err(Reason::BoundSource);
    }
    Ok((dst, port_be, t))
}

/// Refuses a `connect()` to a paused backend that asked for it: `ECONNREFUSED` at once
/// (`EPERM` without `set_errno`: the kernel lacks `bpf_set_retval`, and the programs of
/// that kind must not call it).
#[inline(always)]
fn refuse_paused(t: &Target, stat: u32, set_errno: bool) -> bool {
    if !refuses(t, stat == STAT_CONNECT) {
        return false;
    }
    count(STAT_REFUSED_PAUSED);
    if set_errno {
        // SAFETY: sets the syscall's error for a refused connect; no memory is touched.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    true
}

/// Translates an IPv4 socket's destination; the hook's verdict.
#[inline(always)]
fn xlate4(ctx: &SockAddrContext, stat: u32, set_errno: bool) -> i32 {
    match try_xlate4(ctx, stat) {
        Ok((_, _, t)) if refuse_paused(&t, stat, set_errno) => REFUSE,
        Ok((dst, port_be, t)) => {
            remember(ctx, &dst, port_be, &t);
            set4(ctx, v4_part(&t.addr), t.port_be);
            count(stat);
            count_frontend(t.id);
            ALLOW
        }
        Err(r) => {
            skipped(r);
            ALLOW
        }
    }
}

#[inline(always)]
fn ip6(s: &bpf_sock_addr) -> Addr {
    // The verifier allows only 4-byte loads of user_ip6, one word at a time.
    words6([s.user_ip6[0], s.user_ip6[1], s.user_ip6[2], s.user_ip6[3]])
}

/// What an IPv6 socket dialled, and where it goes instead.
#[inline(always)]
fn try_xlate6(ctx: &SockAddrContext, stat: u32) -> Result<(Addr, u16, Target), Reason> {
    let s = sa(ctx);
    let proto = proto(s).ok_or(Reason::NotTcpOrUdp)?;
    let dst = ip6(s);
    let port_be = port_be(s);
    let (cookie, host_ns) = client_netns(ctx);
    let b = lookup(&dst, port_be, proto, host_ns, cookie)?;
    let t = target_v6(&dst, &b).ok_or(Reason::NoTarget)?;
    // udpv6_sendmsg refuses (ENOTSUPP) a destination that a program rewrote to an
    // IPv4-mapped address: unconnected IPv6 UDP reaches IPv6 backends only.
    if stat == STAT_SENDMSG && is_v4_mapped(&t.addr) {
        return Err(Reason::MappedSendmsg);
    }
    if bound_source6(ctx, stat, host_ns) {
        return Err(Reason::BoundSource);
    }
    // An IPv6 destination that only an IPv4 backend serves: a v4-mapped target, which an
    // IPv6-only socket cannot reach.
    if is_v4_mapped(&t.addr) && !is_v4_mapped(&dst) && v6only(ctx, host_ns) {
        return Err(Reason::V6Only);
    }
    Ok((dst, port_be, t))
}

/// Translates an IPv6 socket's destination; the hook's verdict.
#[inline(always)]
fn xlate6(ctx: &SockAddrContext, stat: u32, set_errno: bool) -> i32 {
    match try_xlate6(ctx, stat) {
        Ok((_, _, t)) if refuse_paused(&t, stat, set_errno) => REFUSE,
        Ok((dst, port_be, t)) => {
            remember(ctx, &dst, port_be, &t);
            set6(ctx, &t.addr, t.port_be);
            count(stat);
            count_frontend(t.id);
            ALLOW
        }
        Err(r) => {
            skipped(r);
            ALLOW
        }
    }
}

/// The socket's recorded translation, if `peer:port_be` is its backend.
#[inline(always)]
fn recorded(ctx: &SockAddrContext, peer: &Addr, port_be: u16) -> Option<(Addr, u16)> {
    // SAFETY: as in `remember`; without the create flag nothing is allocated.
    let rev = unsafe { SOCK_REV.get_ptr_mut(ctx) };
    if rev.is_null() {
        return None;
    }
    // SAFETY: non-null pointers from bpf_sk_storage_get point at a whole value.
    let rev = unsafe { &*rev };
    if rev.backend_port_be != port_be || rev.backend_addr != *peer {
        return None;
    }
    Some((rev.orig_addr, rev.orig_port_be))
}

#[inline(always)]
fn reverse4(ctx: &SockAddrContext, stat: u32) {
    let s = sa(ctx);
    let peer = v4_mapped(s.user_ip4.to_ne_bytes());
    let port_be = port_be(s);
    let Some((orig, orig_port)) = recorded(ctx, &peer, port_be) else {
        return;
    };
    if !is_v4_mapped(&orig) {
        return;
    }
    set4(ctx, v4_part(&orig), orig_port);
    count(stat);
}

#[inline(always)]
fn reverse6(ctx: &SockAddrContext, stat: u32) {
    let s = sa(ctx);
    let peer = ip6(s);
    let port_be = port_be(s);
    let Some((orig, orig_port)) = recorded(ctx, &peer, port_be) else {
        return;
    };
    set6(ctx, &orig, orig_port);
    count(stat);
}
