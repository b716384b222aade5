//! A hand-written SVG chart: one panel per headline metric, a group of bars per N,
//! one bar per path (median, with a min–max whisker).

use std::fmt::Write as _;

use super::report::num;
use super::stats::{Metric, Path, summarize};
use super::{Plan, Results};

const PANEL_W: f64 = 310.0;
const PANEL_H: f64 = 300.0;
const TOP: f64 = 70.0;
const LEFT: f64 = 50.0;
const PLOT_H: f64 = 200.0;

fn color(p: Path) -> &'static str {
    match p {
        Path::F0 => "#9d9d9d",
        Path::Floor => "#4c78a8",
        Path::Legacy => "#e45756",
        Path::Netagent => "#54a24b",
    }
}

pub fn render(plan: &Plan, r: &Results) -> String {
    let panels = [
        (Metric::RttP50, true),
        (Metric::StreamGbps, false),
        (Metric::CrrPerSec, false),
    ];
    let width = PANEL_W * panels.len() as f64 + 20.0;
    let height = TOP + PANEL_H;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">netagent vs floor vs legacy (iptables), by slot count N — median, whisker min–max</text>"#
    );
    let paths: Vec<Path> = Path::ALL
        .into_iter()
        .filter(|p| r.samples.iter().any(|s| s.path == *p))
        .collect();
    for (i, p) in paths.iter().enumerate() {
        let x = 10.0 + i as f64 * 110.0;
        let _ = writeln!(
            o,
            r#"<rect x="{x}" y="32" width="12" height="12" fill="{}"/><text x="{}" y="42">{}</text>"#,
            color(*p),
            x + 16.0,
            p.name()
        );
    }
    for (pi, (metric, log)) in panels.iter().enumerate() {
        panel(
            &mut o,
            plan,
            r,
            &paths,
            *metric,
            *log,
            10.0 + pi as f64 * PANEL_W,
        );
    }
    o.push_str("</svg>\n");
    o
}

fn panel(
    o: &mut String,
    plan: &Plan,
    r: &Results,
    paths: &[Path],
    metric: Metric,
    log: bool,
    x0: f64,
) {
    let ns: Vec<u32> = plan
        .slots
        .iter()
        .copied()
        .filter(|&n| {
            paths
                .iter()
                .any(|&p| summarize(&r.samples, p, n, metric).is_some())
        })
        .collect();
    let title = format!("{}{}", metric.label(), if log { ", log scale" } else { "" });
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" font-weight="bold">{title}</text>"#,
        x0 + LEFT - 40.0,
        TOP
    );
    if ns.is_empty() {
        return;
    }
    let values: Vec<f64> = ns
        .iter()
        .flat_map(|&n| {
            paths
                .iter()
                .filter_map(move |&p| summarize(&r.samples, p, n, metric))
        })
        .map(|s| s.max)
        .collect();
    let vmax = values.iter().copied().fold(0.0f64, f64::max).max(1e-9);
    let vmin_pos = values
        .iter()
        .copied()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let (lo, hi) = if log {
        let lo = 10f64.powf(vmin_pos.log10().floor());
        let hi = 10f64.powf(vmax.log10().ceil());
        (lo, if hi <= lo { lo * 10.0 } else { hi })
    } else {
        (0.0, vmax * 1.1)
    };
    let base_y = TOP + 20.0 + PLOT_H;
    let y_of = |v: f64| -> f64 {
        let f = if log {
            (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10())
        } else {
            v / hi
        };
        base_y - f.clamp(0.0, 1.0) * PLOT_H
    };
    // Axis and grid.
    let plot_w = PANEL_W - LEFT - 20.0;
    let ticks: Vec<f64> = if log {
        let mut t = Vec::new();
        let mut v = lo;
        while v <= hi * 1.0001 {
            t.push(v);
            v *= 10.0;
        }
        t
    } else {
        (0..=4).map(|i| hi * i as f64 / 4.0).collect()
    };
    for t in ticks {
        let y = y_of(t);
        let _ = writeln!(
            o,
            r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            x0 + LEFT,
            x0 + LEFT + plot_w,
            x0 + LEFT - 4.0,
            y + 4.0,
            num(t)
        );
    }
    let _ = writeln!(
        o,
        r##"<line x1="{}" y1="{base_y}" x2="{}" y2="{base_y}" stroke="#333"/>"##,
        x0 + LEFT,
        x0 + LEFT + plot_w
    );
    let group_w = plot_w / ns.len() as f64;
    let bar_w = (group_w - 14.0) / paths.len() as f64;
    for (gi, &n) in ns.iter().enumerate() {
        let gx = x0 + LEFT + gi as f64 * group_w + 7.0;
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">N = {n}</text>"#,
            gx + (group_w - 14.0) / 2.0,
            base_y + 16.0
        );
        for (bi, &p) in paths.iter().enumerate() {
            let Some(s) = summarize(&r.samples, p, n, metric) else {
                continue;
            };
            let x = gx + bi as f64 * bar_w;
            let y = y_of(s.median);
            let _ = writeln!(
                o,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} N={n}: {}</title></rect>"#,
                (bar_w - 2.0).max(1.0),
                (base_y - y).max(0.5),
                color(p),
                p.name(),
                num(s.median)
            );
            let cx = x + (bar_w - 2.0) / 2.0;
            let _ = writeln!(
                o,
                r##"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="#222"/>"##,
                y_of(s.min),
                y_of(s.max)
            );
            let _ = writeln!(
                o,
                r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="8">{}</text>"#,
                y_of(s.max) - 3.0,
                num(s.median)
            );
        }
    }
}
