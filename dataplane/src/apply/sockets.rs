//! Sockets the programs translated to a backend that went away are destroyed, so their
//! owners get an error at once instead of waiting for TCP to time out: when a container
//! stops, its network namespace vanishes and nothing ever answers those sockets again.
//!
//! Only translated sockets are touched: the kernel's `sock_diag` dumps each socket with the
//! translation the programs recorded for it (`INET_DIAG_REQ_SK_BPF_STORAGES` with the
//! `DP_SKREV` socket-storage map), and `SOCK_DESTROY` (`CONFIG_INET_DIAG_DESTROY`) ends those
//! whose recorded backend is gone and that are still connected to it. A container's own
//! connection to the same address (never translated) has no such record and stays. One dump
//! per family and protocol per network namespace per batch, in-process: no `ss`, no exec.

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
};

use anyhow::{Context, Result};
use dataplane_common::{Addr, PROTO_TCP, PROTO_UDP, is_zero, v4_mapped};
use nix::{
    sched::{CloneFlags, setns},
    sys::{
        socket::{
            AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, setsockopt,
            socket, sockopt,
        },
        time::TimeVal,
    },
};

use crate::addr::{Service, ip_to_addr};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;
/// `struct inet_diag_sockid`.
const ID_LEN: usize = 48;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// `struct inet_diag_sockid` as the kernel sent it (ports and addresses in network order,
/// the socket cookie in its two native-endian words): enough to name the socket back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockId([u8; ID_LEN]);

impl SockId {
    fn dport_be(&self) -> u16 {
        u16::from_ne_bytes([self.0[2], self.0[3]])
    }

    /// The remote address, as an [`Addr`] (IPv4 ones v4-mapped).
    fn dst(&self, family: u8) -> Addr {
        let d = &self.0[20..36];
        if family == AF_INET {
            v4_mapped([d[0], d[1], d[2], d[3]])
        } else {
            let mut a = [0; 16];
            a.copy_from_slice(d);
            a
        }
    }
}

/// A socket of a dump with the translation recorded for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translated {
    pub family: u8,
    pub id: SockId,
    /// The backend the programs sent it to (`SockRev::backend_addr`, `backend_port_be`).
    pub backend: Addr,
    pub backend_port_be: u16,
    /// Whether the programs' record was there. The kernel reports BPF socket storage for
    /// TCP sockets only; a UDP socket comes without it, its backend taken as its peer.
    pub recorded: bool,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).expect("small attribute");
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

/// One `sock_diag` request: a dump of every socket of `family`/`proto` with the storage of
/// the map `map_fd`, or the destruction of socket `id`.
fn request(seq: u32, family: u8, proto: u8, op: Op) -> Vec<u8> {
    let (ty, flags, id, map_fd) = match op {
        Op::Dump { map_fd } => (
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            [0; ID_LEN],
            Some(map_fd),
        ),
        Op::Destroy(id) => (SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, id.0, None),
    };
    let mut b = vec![0u8; NLMSG_HDR];
    b.extend_from_slice(&[family, proto, 0, 0]);
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    b.extend_from_slice(&id);
    debug_assert_eq!(b.len(), NLMSG_HDR + REQ_LEN);
    if let Some(fd) = map_fd {
        let mut inner = Vec::new();
        push_attr(
            &mut inner,
            SK_DIAG_BPF_STORAGE_REQ_MAP_FD,
            &fd.to_ne_bytes(),
        );
        push_attr(&mut b, INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED, &inner);
    }
    let len = u32::try_from(b.len()).expect("small request");
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b[4..6].copy_from_slice(&ty.to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    b
}

#[derive(Clone, Copy)]
enum Op {
    Dump { map_fd: u32 },
    Destroy(SockId),
}

/// The attributes in `buf`: (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, payload))
    })
}

/// The recorded translation in one `inet_diag_msg` payload (with its attributes), if any.
fn parse_msg(payload: &[u8]) -> Option<Translated> {
    if payload.len() < MSG_LEN {
        return None;
    }
    let family = payload[0];
    let mut id = [0; ID_LEN];
    id.copy_from_slice(&payload[4..4 + ID_LEN]);
    let id = SockId(id);
    let value = attrs(&payload[MSG_LEN..])
        .find(|(t, _)| *t == INET_DIAG_SK_BPF_STORAGES)
        .and_then(|(_, storages)| attrs(storages).find(|(t, _)| *t == SK_DIAG_BPF_STORAGE))
        .and_then(|(_, storage)| attrs(storage).find(|(t, _)| *t == SK_DIAG_BPF_STORAGE_MAP_VALUE))
        .map(|(_, value)| value);
    // `SockRev`: orig_addr[16], backend_addr[16], orig_port_be, backend_port_be, pad.
    match value {
        Some(value) if value.len() >= 36 => {
            let mut backend = [0; 16];
            backend.copy_from_slice(&value[16..32]);
            Some(Translated {
                family,
                id,
                backend,
                backend_port_be: u16::from_ne_bytes([value[34], value[35]]),
                recorded: true,
            })
        }
        Some(_) => None,
        None => Some(Translated {
            family,
            id,
            backend: id.dst(family),
            backend_port_be: id.dport_be(),
            recorded: false,
        }),
    }
}

/// What a reply buffer holds: translated sockets, whether the dump is done, an error.
fn parse_replies(mut buf: &[u8], out: &mut Vec<Translated>) -> io::Result<bool> {
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDR || len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a truncated sock_diag reply",
            ));
        }
        let payload = &buf[NLMSG_HDR..len];
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = payload
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                return Ok(true);
            }
            SOCK_DIAG_BY_FAMILY => out.extend(parse_msg(payload)),
            _ => {}
        }
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(false)
}

/// Whether `t` is still connected to a backend in `gone` (over `proto`): a TCP socket the
/// programs translated, or a UDP socket connected to it (the kernel reports no socket
/// storage for UDP, so a UDP client that dialled the container's own address counts too).
fn is_gone(t: &Translated, proto: u8, gone: &BTreeSet<(Addr, u8, u16)>) -> bool {
    (t.recorded || proto == PROTO_UDP)
        && !is_zero(&t.backend)
        && t.id.dst(t.family) == t.backend
        && t.id.dport_be() == t.backend_port_be
        && gone.contains(&(t.backend, proto, u16::from_be(t.backend_port_be)))
}

/// A `NETLINK_SOCK_DIAG` socket of the calling thread's network namespace.
struct Diag {
    fd: OwnedFd,
    seq: u32,
}

impl Diag {
    fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        // A reply never takes long; never hang the batch on one.
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(2, 0))?;
        Ok(Self { fd, seq: 0 })
    }

    fn send(&mut self, family: u8, proto: u8, op: Op) -> io::Result<()> {
        self.seq += 1;
        let req = request(self.seq, family, proto, op);
        send(self.fd.as_raw_fd(), &req, MsgFlags::empty())?;
        Ok(())
    }

    /// Reads replies until the dump or the acknowledgement is complete.
    fn replies(&mut self, out: &mut Vec<Translated>) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            if n == 0 || parse_replies(&buf[..n], out)? {
                return Ok(());
            }
        }
    }

    /// Destroys the sockets of this namespace translated to a backend in `gone`.
    fn destroy(&mut self, gone: &BTreeSet<(Addr, u8, u16)>, map_fd: RawFd) -> Result<usize> {
        let protos: BTreeSet<u8> = gone.iter().map(|(_, p, _)| *p).collect();
        let map_fd = u32::try_from(map_fd).context("map descriptor")?;
        let mut destroyed = 0;
        for proto in protos
            .into_iter()
            .filter(|p| [PROTO_TCP, PROTO_UDP].contains(p))
        {
            for family in [AF_INET, AF_INET6] {
                let mut found = Vec::new();
                self.send(family, proto, Op::Dump { map_fd })
                    .and_then(|()| self.replies(&mut found))
                    .with_context(|| {
                        format!("dumping sockets (family {family}, protocol {proto})")
                    })?;
                tracing::debug!(family, proto, translated = found.len(), "sockets dumped");
                for t in found.iter().filter(|t| is_gone(t, proto, gone)) {
                    let r = self
                        .send(family, proto, Op::Destroy(t.id))
                        .and_then(|()| self.replies(&mut Vec::new()));
                    match r {
                        Ok(()) => destroyed += 1,
                        // Closed meanwhile.
                        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) => {}
                        Err(e) => {
                            return Err(e)
                                .context("SOCK_DESTROY (is CONFIG_INET_DIAG_DESTROY on?)");
                        }
                    }
                }
            }
        }
        Ok(destroyed)
    }
}

/// Whether the kernel destroys sockets on request (`CONFIG_INET_DIAG_DESTROY`): asked to
/// destroy a TCP socket that cannot exist (every address and port zero), it answers
/// `ENOENT` when it can, `EOPNOTSUPP` when it was built without.
pub fn destroy_supported() -> io::Result<bool> {
    let mut d = Diag::open()?;
    d.send(AF_INET, PROTO_TCP, Op::Destroy(SockId([0; ID_LEN])))?;
    match d.replies(&mut Vec::new()) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(e),
        // Nothing matched yet nothing failed: it would have destroyed one.
        Ok(()) => Ok(true),
    }
}

/// Destroys the translated sockets connected to a backend in `gone`: in this (the host's)
/// network namespace, then in each of `namespaces` (containers' that may hold translated
/// sockets), entered by one short-lived thread so no thread of the agent's runtime ever
/// leaves the host namespace. `map_fd`: the socket-storage map of the translations.
/// Returns how many were destroyed, and the namespaces that could not be searched.
pub fn destroy_translated(
    gone: &[Service],
    map_fd: OwnedFd,
    namespaces: Vec<PathBuf>,
) -> (usize, Vec<String>) {
    let gone: BTreeSet<(Addr, u8, u16)> = gone
        .iter()
        .map(|s| (ip_to_addr(s.addr), s.proto, s.port))
        .collect();
    let run = move || {
        let mut n = 0;
        let mut errors = Vec::new();
        let mut one = |what: &str| match Diag::open()
            .context("opening a sock_diag socket")
            .and_then(|mut d| d.destroy(&gone, map_fd.as_raw_fd()))
        {
            Ok(k) => n += k,
            Err(e) => errors.push(format!("{what}: {e:#}")),
        };
        one("host");
        for path in namespaces {
            let entered = File::open(&path)
                .map_err(anyhow::Error::from)
                .and_then(|f| setns(&f, CloneFlags::CLONE_NEWNET).map_err(anyhow::Error::from));
            // One that is gone meanwhile took its sockets with it.
            if entered.is_ok() {
                one(&path.display().to_string());
            }
        }
        (n, errors)
    };
    std::thread::Builder::new()
        .name("sock-destroy".into())
        .spawn(run)
        .map_err(anyhow::Error::from)
        .and_then(|h| h.join().map_err(|_| anyhow::anyhow!("the thread panicked")))
        .unwrap_or_else(|e| (0, vec![format!("{e:#}")]))
}

/// Destroys translated sockets off the caller's thread ([`crate::apply::Sockets`]).
pub struct Destroyer {
    /// The translations' socket-storage map.
    map_fd: OwnedFd,
    /// Whether the kernel destroys sockets (`CONFIG_INET_DIAG_DESTROY`); without, nothing
    /// is searched (the start said so: a degraded feature).
    enabled: bool,
}

impl Destroyer {
    pub const fn new(map_fd: OwnedFd, enabled: bool) -> Self {
        Self { map_fd, enabled }
    }

    /// Destroys the translated sockets connected to `backends` now (in the host and in
    /// `namespaces`), returning how many, and what could not be searched.
    pub fn destroy_now(
        &self,
        backends: &[Service],
        namespaces: Vec<PathBuf>,
    ) -> (usize, Vec<String>) {
        if !self.enabled {
            return (0, Vec::new());
        }
        match self.map_fd.try_clone() {
            Ok(fd) => destroy_translated(backends, fd, namespaces),
            Err(e) => (0, vec![e.to_string()]),
        }
    }
}

impl crate::apply::Sockets for Destroyer {
    fn destroy(&self, gone: Vec<Service>, namespaces: Vec<PathBuf>) {
        if !self.enabled {
            tracing::debug!(
                backends = gone.len(),
                "sockets of removed backends stay: the kernel cannot destroy sockets"
            );
            return;
        }
        let map_fd = match self.map_fd.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "cannot end the sockets of removed backends");
                return;
            }
        };
        std::thread::spawn(move || {
            let (n, errors) = destroy_translated(&gone, map_fd, namespaces);
            for e in &errors {
                tracing::warn!(error = %e, "ending the sockets of removed backends");
            }
            tracing::info!(
                backends = gone.len(),
                sockets = n,
                "destroyed sockets of removed backends"
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(family: u8, dst: &[u8], dport: u16, rev: Option<(Addr, u16)>) -> Vec<u8> {
        let mut m = vec![0u8; MSG_LEN];
        m[0] = family;
        m[1] = 1; // ESTABLISHED
        m[4 + 2..4 + 4].copy_from_slice(&dport.to_be().to_ne_bytes());
        m[4 + 20..4 + 20 + dst.len()].copy_from_slice(dst);
        if let Some((addr, port)) = rev {
            let mut value = vec![0u8; 40];
            value[16..32].copy_from_slice(&addr);
            value[34..36].copy_from_slice(&port.to_be().to_ne_bytes());
            let mut storage = Vec::new();
            push_attr(&mut storage, 2, &7u32.to_ne_bytes()); // map id
            push_attr(&mut storage, SK_DIAG_BPF_STORAGE_MAP_VALUE, &value);
            let mut storages = Vec::new();
            push_attr(&mut storages, SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &storage);
            push_attr(&mut m, 1, &[0; 20]); // another attribute first
            push_attr(&mut m, INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED, &storages);
        }
        let mut out = vec![0u8; NLMSG_HDR];
        out.extend_from_slice(&m);
        let len = u32::try_from(out.len()).unwrap();
        out[0..4].copy_from_slice(&len.to_ne_bytes());
        out[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        out
    }

    #[test]
    fn a_dump_request_asks_for_the_storage_of_one_map() {
        let r = request(9, AF_INET6, PROTO_TCP, Op::Dump { map_fd: 5 });
        assert_eq!(r.len(), NLMSG_HDR + REQ_LEN + 12);
        assert_eq!(
            u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize,
            r.len()
        );
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), SOCK_DIAG_BY_FAMILY);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(&r[16..18], &[AF_INET6, PROTO_TCP]);
        let (ty, inner) = attrs(&r[NLMSG_HDR + REQ_LEN..]).next().unwrap();
        assert_eq!(ty, INET_DIAG_REQ_SK_BPF_STORAGES);
        assert_eq!(
            attrs(inner).next(),
            Some((SK_DIAG_BPF_STORAGE_REQ_MAP_FD, &5u32.to_ne_bytes()[..]))
        );
        let id = SockId([7; ID_LEN]);
        let d = request(10, AF_INET, PROTO_UDP, Op::Destroy(id));
        assert_eq!(d.len(), NLMSG_HDR + REQ_LEN);
        assert_eq!(u16::from_ne_bytes([d[4], d[5]]), SOCK_DESTROY);
        assert_eq!(&d[NLMSG_HDR + 8..], &[7; ID_LEN]);
    }

    #[test]
    fn only_sockets_translated_to_a_gone_backend_and_still_connected_to_it() {
        let b = v4_mapped([172, 17, 0, 2]);
        let gone: BTreeSet<(Addr, u8, u16)> = [(b, PROTO_TCP, 80)].into();
        let mut buf = msg(AF_INET, &[172, 17, 0, 2], 80, Some((b, 80)));
        // Never translated (a container's own connection to the same backend).
        buf.extend(msg(AF_INET, &[172, 17, 0, 2], 80, None));
        // A dual-stack socket translated to the same backend.
        buf.extend(msg(AF_INET6, &b, 80, Some((b, 80))));
        // Translated once, then connected elsewhere (UDP reconnects).
        buf.extend(msg(AF_INET, &[172, 17, 0, 9], 53, Some((b, 80))));
        // Translated to a backend that stays.
        let other = v4_mapped([172, 17, 0, 3]);
        buf.extend(msg(AF_INET, &[172, 17, 0, 3], 80, Some((other, 80))));
        let mut done = vec![0u8; NLMSG_HDR + 4];
        done[0] = u8::try_from(done.len()).unwrap();
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        buf.extend(done);
        let mut found = Vec::new();
        assert!(parse_replies(&buf, &mut found).unwrap());
        assert_eq!(found.len(), 5);
        assert_eq!(found.iter().filter(|t| !t.recorded).count(), 1);
        let hit: Vec<u8> = found
            .iter()
            .filter(|t| is_gone(t, PROTO_TCP, &gone))
            .map(|t| t.family)
            .collect();
        assert_eq!(hit, vec![AF_INET, AF_INET6], "TCP: translated ones only");
        // The same sockets over UDP: not gone (the protocol is part of the backend).
        assert!(!found.iter().any(|t| is_gone(t, PROTO_UDP, &gone)));
        // A backend gone over UDP: the kernel reports no storage for UDP sockets, so every
        // one connected to it counts (the translated ones and the one that dialled it).
        let gone_udp: BTreeSet<(Addr, u8, u16)> = [(b, PROTO_UDP, 80)].into();
        let hit = found
            .iter()
            .filter(|t| is_gone(t, PROTO_UDP, &gone_udp))
            .count();
        assert_eq!(hit, 3);
    }

    #[test]
    fn an_error_reply_is_an_error() {
        let mut e = vec![0u8; NLMSG_HDR + 4];
        e[0] = u8::try_from(e.len()).unwrap();
        e[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        e[NLMSG_HDR..].copy_from_slice(&(-(nix::errno::Errno::EPERM as i32)).to_ne_bytes());
        let err = parse_replies(&e, &mut Vec::new()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::EPERM as i32));
        // An acknowledgement (error 0) completes a request.
        e[NLMSG_HDR..].copy_from_slice(&0i32.to_ne_bytes());
        assert!(parse_replies(&e, &mut Vec::new()).unwrap());
    }
}
