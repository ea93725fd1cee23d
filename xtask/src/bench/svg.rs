//! The chart of the report, as SVG.

use std::fmt::Write as _;

/// A horizontal grouped bar chart of the ratios to direct (1.0 marked).
pub(super) fn svg(rows: &[(String, [f64; 3])]) -> String {
    let colors = ["#d62728", "#ff7f0e", "#2ca02c"];
    let names = ["docker-proxy", "iptables NAT", "dataplane"];
    let (left, bar, gap, width) = (330.0, 9.0, 10.0, 420.0);
    let row_h = bar * 3.0 + gap;
    #[expect(clippy::cast_precision_loss, reason = "a few rows")]
    let height = 40.0 + row_h * rows.len() as f64 + 30.0;
    let scale = width / 1.2;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        left + width + 60.0
    );
    for (i, n) in names.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "three legend entries")]
        let x = left + i as f64 * 130.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"8\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"17\">{n}</text>",
            colors[i],
            x + 14.0
        );
    }
    for (r, (label, ratios)) in rows.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "a few rows")]
        let y = 30.0 + row_h * r as f64;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            y + bar * 2.0,
            label.replace('>', "&gt;")
        );
        for (i, v) in ratios.iter().enumerate() {
            if v.is_nan() {
                continue;
            }
            #[expect(clippy::cast_precision_loss, reason = "three bars")]
            let by = y + bar * i as f64;
            let w = (v.min(1.2) * scale).max(1.0);
            let _ = writeln!(
                s,
                "<rect x=\"{left}\" y=\"{by}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{v:.2}</text>",
                bar - 1.0,
                colors[i],
                left + w + 3.0,
                by + bar - 1.5
            );
        }
    }
    let x1 = left + scale;
    let _ = writeln!(
        s,
        "<line x1=\"{x1}\" y1=\"25\" x2=\"{x1}\" y2=\"{}\" stroke=\"black\" stroke-dasharray=\"3,3\"/><text x=\"{x1}\" y=\"{}\" text-anchor=\"middle\">1.0 = direct</text>",
        height - 25.0,
        height - 10.0
    );
    s.push_str("</svg>\n");
    s
}
