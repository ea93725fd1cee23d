//! Connection churn for `cargo xtask bench`: N short TCP connections (connect, one HTTP
//! request, read to the end, close) over C threads; prints one JSON line.
//!
//! `dp-churn HOST PORT N C`
//! `dp-churn --wait-usable HOST PORT TIMEOUT_MS`: tries until a request gets an answer,
//! prints the Unix time (ns) when it did.
//! `dp-churn --for SECS HOST PORT C`: as many connections as C threads make in SECS
//! seconds (each waits up to 5 s for its answer).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

fn request(addr: &SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut buf = [0u8; 4096];
    let mut got = 0;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n => got += n,
        }
    }
    if got == 0 {
        return Err(std::io::Error::other("empty answer"));
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--wait-usable") {
        let addr = (args[1].as_str(), args[2].parse::<u16>().expect("port"))
            .to_socket_addrs()
            .expect("address")
            .next()
            .expect("an address");
        let limit = Duration::from_millis(args[3].parse().expect("timeout ms"));
        let began = Instant::now();
        while began.elapsed() < limit {
            if request(&addr, Duration::from_millis(5)).is_ok() {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
                println!("{}", now.as_nanos());
                return;
            }
        }
        std::process::exit(1);
    }
    let (deadline, args) = if args.first().map(String::as_str) == Some("--for") {
        let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).expect("SECS");
        let mut rest = args[2..].to_vec();
        // N: unbounded; the deadline ends the run.
        rest.insert(2, usize::MAX.to_string());
        (Some(Instant::now() + Duration::from_secs(secs)), rest)
    } else {
        (None, args)
    };
    let [host, port, total, threads] = &args[..] else {
        eprintln!(
            "usage: dp-churn HOST PORT N C | dp-churn --for SECS HOST PORT C | \
             dp-churn --wait-usable HOST PORT TIMEOUT_MS"
        );
        std::process::exit(2);
    };
    let addr = (host.as_str(), port.parse::<u16>().expect("port"))
        .to_socket_addrs()
        .expect("address")
        .next()
        .expect("an address");
    let total: usize = total.parse().expect("N");
    let threads: usize = threads.parse::<usize>().expect("C").max(1);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let per = total / threads + usize::from(i < total % threads);
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(per.min(1 << 20));
                let mut errors = 0u64;
                for _ in 0..per {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    let began = Instant::now();
                    match request(&addr, Duration::from_secs(5)) {
                        Ok(()) => {
                            lat.push(
                                u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX),
                            );
                        }
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (worker_lat, worker_errors) = h.join().expect("worker");
        lat.extend(worker_lat);
        errors += worker_errors;
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| testkit::percentile(&lat, p).unwrap_or(0);
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let rate = lat.len() as f64 / secs;
    let report = testkit::ChurnReport {
        ok: u64::try_from(lat.len()).unwrap_or(u64::MAX),
        errors,
        conn_per_s: (rate * 10.0).round() / 10.0,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    };
    println!("{}", serde_json::to_string(&report).expect("a report"));
}
