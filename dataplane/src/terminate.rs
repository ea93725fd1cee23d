//! Sockets still connected to a backend that went away are destroyed, so their owners get
//! an error at once instead of waiting for TCP to time out: when a container stops, its
//! network namespace vanishes and nothing ever answers those sockets again.
//!
//! The kernel's `SOCK_DESTROY` (`sock_diag`, `CONFIG_INET_DIAG_DESTROY`) does the work, through
//! `ss -K`, in the host network namespace and in each running container's.

use std::{
    net::IpAddr,
    process::{Command, Stdio},
};

/// A backend that went away: address, protocol number, port.
pub type Gone = (IpAddr, u8, u16);

/// The `ss` filter for sockets connected to `gone` (IPv4 backends also as v4-mapped peers
/// of dual-stack sockets).
pub fn filter(gone: &Gone) -> String {
    let (ip, _, port) = gone;
    match ip {
        IpAddr::V4(v4) => format!("( dst {v4} or dst [::ffff:{v4}] ) and dport = :{port}"),
        IpAddr::V6(v6) => format!("dst [{v6}] and dport = :{port}"),
    }
}

fn ss_args(gone: &Gone) -> Vec<String> {
    let proto = if gone.1 == dataplane_common::PROTO_UDP {
        "-u"
    } else {
        "-t"
    };
    vec![
        "-K".into(),
        "-H".into(),
        "-n".into(),
        proto.into(),
        filter(gone),
    ]
}

/// Destroys the sockets connected to each of `gone`, in this network namespace and in the
/// namespaces of `pids` (running containers). Returns how many were destroyed.
pub fn terminate(gone: &[Gone], pids: &[i64]) -> usize {
    let mut killed = 0;
    for g in gone {
        let args = ss_args(g);
        let mut runs = vec![Command::new("ss")];
        for pid in pids {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/proc/{pid}/ns/net")).arg("ss");
            runs.push(c);
        }
        for mut c in runs {
            if let Ok(out) = c
                .args(&args)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
            {
                killed += String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .count();
            }
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let v4: Gone = ("172.17.0.2".parse().unwrap(), 6, 80);
        assert_eq!(
            filter(&v4),
            "( dst 172.17.0.2 or dst [::ffff:172.17.0.2] ) and dport = :80"
        );
        let v6: Gone = ("fd00::2".parse().unwrap(), 17, 53);
        assert_eq!(filter(&v6), "dst [fd00::2] and dport = :53");
        assert_eq!(ss_args(&v6)[3], "-u");
        assert_eq!(ss_args(&v4)[3], "-t");
    }
}
