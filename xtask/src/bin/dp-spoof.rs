//! What an attacker in a container sends (it has `CAP_NET_RAW`, as Docker gives by
//! default), for the end-to-end tests of the egress policy: one UDP datagram with a source
//! address or MAC that is not its own.
//!
//! `dp-spoof ip SRC DST PORT TEXT`: an IPv4 datagram from `SRC` (any address) to
//! `DST:PORT`, through a raw socket (`IP_HDRINCL`): the kernel routes it and frames it
//! with the interface's own MAC.
//! `dp-spoof frame IFACE SRC_MAC DST_MAC SRC DST PORT TEXT`: the whole Ethernet frame,
//! through a packet socket on `IFACE`.
//! `dp-spoof qinq ...` (the same arguments): that frame double-tagged (802.1ad, then
//! 802.1Q, both VLAN 0), which a host strips and routes.
//! Exits 0 once sent; says why otherwise (exit 1).

use std::net::Ipv4Addr;

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// IPv4 and UDP headers and `payload`.
fn datagram(src: Ipv4Addr, dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = u16::try_from(8 + payload.len()).expect("a small payload");
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    // Identification, don't fragment, TTL 64, UDP, checksum (below).
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&40_000u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    // No UDP checksum (allowed over IPv4).
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

fn mac(s: &str) -> Result<[u8; 6], String> {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).map_err(|e| format!("{s}: {e}")))
        .collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("{s}: not a MAC"))
}

fn ip(s: &str) -> Result<Ipv4Addr, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

fn last_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn send_ip(src: Ipv4Addr, dst: Ipv4Addr, port: u16, text: &str) -> Result<(), String> {
    let pkt = datagram(src, dst, port, text.as_bytes());
    // SAFETY: plain socket calls on a descriptor this function owns; the address and the
    // buffer outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            return Err(last_error("raw socket"));
        }
        let mut to: libc::sockaddr_in = std::mem::zeroed();
        to.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2);
        to.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        let n = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const to).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap_or(16),
        );
        libc::close(fd);
        if n < 0 {
            return Err(last_error("sendto"));
        }
    }
    Ok(())
}

fn send_frame(args: &[String], tagged: bool) -> Result<(), String> {
    let [iface, smac, dmac, src, dst, port, text] = args else {
        return Err("frame IFACE SRC_MAC DST_MAC SRC DST PORT TEXT".into());
    };
    let port: u16 = port.parse().map_err(|e| format!("{port}: {e}"))?;
    let mut frame = Vec::new();
    frame.extend_from_slice(&mac(dmac)?);
    frame.extend_from_slice(&mac(smac)?);
    if tagged {
        frame.extend_from_slice(&[0x88, 0xa8, 0, 0, 0x81, 0x00, 0, 0]);
    }
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&datagram(ip(src)?, ip(dst)?, port, text.as_bytes()));
    let name = std::ffi::CString::new(iface.as_str()).map_err(|e| e.to_string())?;
    // SAFETY: as above.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(last_error(iface));
        }
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(last_error("packet socket"));
        }
        let mut to: libc::sockaddr_ll = std::mem::zeroed();
        to.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
        to.sll_ifindex = i32::try_from(index).unwrap_or(0);
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&mac(dmac)?);
        let n = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const to).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20),
        );
        libc::close(fd);
        if n < 0 {
            return Err(last_error("sendto"));
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("ip") if args.len() == 5 => (|| {
            let port: u16 = args[3].parse().map_err(|e| format!("{}: {e}", args[3]))?;
            send_ip(ip(&args[1])?, ip(&args[2])?, port, &args[4])
        })(),
        Some("frame") => send_frame(&args[1..], false),
        Some("qinq") => send_frame(&args[1..], true),
        _ => Err(
            "usage: dp-spoof ip SRC DST PORT TEXT | frame IFACE SRC_MAC DST_MAC SRC DST PORT TEXT"
                .into(),
        ),
    };
    if let Err(e) = r {
        eprintln!("dp-spoof: {e}");
        std::process::exit(1);
    }
}
