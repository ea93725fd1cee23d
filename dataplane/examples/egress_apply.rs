//! What one egress change costs with many policed containers in the table: the agent's own
//! table code (`dataplane::egress::nft`) against the kernel, in a table of its own that is
//! removed at the end. Prints one JSON line; run by `cargo xtask bench`.
//!
//! `egress_apply [containers] [changes]`

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::Result;
use dataplane::{
    egress::{
        nft::{self, Allowed, Chains, Spec},
        policy::{Net, PROTO_TCP},
    },
    netfilter::{nft::run as run_batch, table::Table},
};

const TABLE: &str = "dataplane_bench_egress";

fn chains(i: usize, port: u16) -> Chains {
    let i = u32::try_from(i).expect("small");
    let addr = IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 1)) + i));
    Chains {
        addrs: [addr].into(),
        internet: false,
        host: true,
        dns: ["192.0.2.53".parse().expect("address")].into(),
        allow: vec![Allowed {
            nets: [Net::new("198.51.100.0".parse().expect("address"), 24).expect("net")].into(),
            port: Some(port),
            proto: Some(PROTO_TCP),
        }],
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn run(n: usize, changes: usize) -> Result<String> {
    let mut spec = Spec {
        bridges: ["docker0".to_string()].into(),
        ..Spec::default()
    };
    for i in 0..n {
        spec.containers.insert(format!("{i:016x}"), chains(i, 443));
    }
    let t = Instant::now();
    run_batch(nft::full_batch(TABLE, &spec, &BTreeSet::new()))?;
    let full = ms(t);
    let (mut change, mut add, mut remove) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..changes {
        // One container's allow-list changes.
        let mut next = spec.clone();
        next.containers.insert(
            format!("{:016x}", k % n),
            chains(k % n, 8000 + u16::try_from(k % 1000)?),
        );
        let t = Instant::now();
        run_batch(nft::delta_batch(TABLE, &spec, &next).expect("a change"))?;
        change.push(ms(t));
        spec = next;
        // One container starts, then stops.
        let mut next = spec.clone();
        next.containers
            .insert(format!("{:016x}", n + k), chains(n + k, 443));
        let t = Instant::now();
        run_batch(nft::delta_batch(TABLE, &spec, &next).expect("a change"))?;
        add.push(ms(t));
        let t = Instant::now();
        run_batch(nft::delta_batch(TABLE, &next, &spec).expect("a change"))?;
        remove.push(ms(t));
    }
    Ok(format!(
        "{{\"containers\":{n},\"full_ms\":{full:.1},\"change_p50_ms\":{:.2},\"change_p99_ms\":{:.2},\
         \"start_p50_ms\":{:.2},\"start_p99_ms\":{:.2},\"stop_p50_ms\":{:.2},\"stop_p99_ms\":{:.2}}}",
        pct(&mut change, 0.5),
        pct(&mut change, 0.99),
        pct(&mut add, 0.5),
        pct(&mut add, 0.99),
        pct(&mut remove, 0.5),
        pct(&mut remove, 0.99),
    ))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let changes: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let r = run(n.max(1), changes.max(1));
    let _ = Table::<Spec>::new(TABLE).remove();
    println!("{}", r?);
    Ok(())
}
