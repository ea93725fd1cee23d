//! What the bench (`cargo xtask bench`) and the end-to-end tests share: the reports of the
//! clients they run (`iperf3 -J`, `dp-churn`), typed, and percentiles.

use serde::{Deserialize, Serialize};

/// What is read of `iperf3 -J` output.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct IperfReport {
    #[serde(default)]
    pub intervals: Vec<IperfInterval>,
    #[serde(default)]
    pub end: IperfEnd,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct IperfInterval {
    #[serde(default)]
    pub sum: IperfSum,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct IperfEnd {
    /// TCP: what the receiver got.
    #[serde(default)]
    pub sum_received: Option<IperfSum>,
    /// UDP: the test's totals, with the loss.
    #[serde(default)]
    pub sum: Option<IperfSum>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct IperfSum {
    #[serde(default)]
    pub bits_per_second: f64,
    #[serde(default)]
    pub lost_percent: f64,
}

impl IperfReport {
    /// The report in `json`.
    pub fn parse(json: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(json)
    }

    /// Bits per second the receiver got over the whole test (TCP), or the test's rate (UDP).
    pub fn received_bps(&self) -> Option<f64> {
        self.end
            .sum_received
            .as_ref()
            .or(self.end.sum.as_ref())
            .map(|s| s.bits_per_second)
    }

    /// Datagrams lost, in percent (UDP; 0 for TCP).
    pub fn lost_percent(&self) -> f64 {
        self.end.sum.as_ref().map_or(0.0, |s| s.lost_percent)
    }
}

/// What `dp-churn` prints: one line of JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChurnReport {
    /// Connections that completed a request.
    pub ok: u64,
    pub errors: u64,
    pub conn_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// The value at fraction `p` (0 to 1) of `sorted`, nearest rank; `None` when empty.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a vector far shorter than 2^52"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize;
    sorted.get(i).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(clippy::float_cmp, reason = "values parsed from exact decimal text")]
    fn iperf_tcp_and_udp_reports() {
        let tcp = br#"{"intervals":[{"sum":{"bits_per_second":2.5e9}}],"end":{"sum":{"bits_per_second":3e9},"sum_received":{"bits_per_second":12345.5}}}"#;
        let r = IperfReport::parse(tcp).unwrap();
        assert_eq!(r.received_bps(), Some(12345.5));
        assert_eq!(r.intervals[0].sum.bits_per_second, 2.5e9);
        let udp = br#"{"end":{"sum":{"bits_per_second":1.5e9,"lost_percent":0.25}}}"#;
        let r = IperfReport::parse(udp).unwrap();
        assert_eq!(r.received_bps(), Some(1.5e9));
        assert_eq!(r.lost_percent(), 0.25);
        assert_eq!(IperfReport::parse(b"{}").unwrap().received_bps(), None);
        assert!(IperfReport::parse(b"iperf3: error").is_err());
    }

    #[test]
    fn churn_report_round_trips() {
        let c = ChurnReport {
            ok: 10,
            errors: 0,
            conn_per_s: 1234.5,
            p50_us: 80,
            p99_us: 400,
        };
        let back: ChurnReport = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(percentile(&v, 0.5), Some(6));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&v, 0.99), Some(10));
        assert_eq!(percentile::<u64>(&[], 0.5), None);
    }
}
