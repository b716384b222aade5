//! The Markdown report (docs/BENCHMARKS.md) and the console summary.

use std::fmt::Write as _;
use std::process::Command;

use super::control_plane::ControlPlane;
use super::live_cost;
use super::stats::{
    Metric, Path, Summary, paired_difference, paired_ratio, paired_ratio_values, percentile,
    summarize,
};
use super::workloads::{SMALL_MSS, UDP_PAYLOAD, Workload};
use super::{Plan, Results};

/// Where and on what the run happened.
pub struct Conditions {
    pub date: String,
    pub commit: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory: String,
    pub iptables: String,
    pub sockperf: String,
    pub iperf3: String,
    pub load: String,
    pub nofile: String,
}

fn cmd_out(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            if s.trim().is_empty() {
                s = String::from_utf8_lossy(&o.stderr).into_owned();
            }
            s.trim().to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

impl Conditions {
    pub fn collect(_plan: &Plan) -> Conditions {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .next()
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
            })
            .and_then(|kib| kib.parse::<f64>().ok())
            .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            .unwrap_or_else(|| "?".into());
        let root = crate::workspace_root();
        let commit = cmd_out(
            "git",
            &[
                "-C",
                &root.to_string_lossy(),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        );
        let dirty = !cmd_out(
            "git",
            &[
                "-C",
                &root.to_string_lossy(),
                "status",
                "--porcelain",
                "--untracked-files=no",
            ],
        )
        .is_empty();
        Conditions {
            date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit: if dirty {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            },
            kernel: cmd_out("uname", &["-r"]),
            cpu,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory,
            iptables: cmd_out("iptables", &["--version"]),
            sockperf: cmd_out("sockperf", &["--version"])
                .lines()
                .next()
                .unwrap_or("?")
                .replace("sockperf: ", ""),
            nofile: std::fs::read_to_string("/proc/self/limits")
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    let v: Vec<&str> = l.split_whitespace().collect();
                    format!(
                        "{} soft / {} hard",
                        v.get(3).unwrap_or(&"?"),
                        v.get(4).unwrap_or(&"?")
                    )
                })
                .unwrap_or_else(|| "?".into()),
            load: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            iperf3: cmd_out("iperf3", &["--version"])
                .lines()
                .next()
                .unwrap_or("?")
                .to_string(),
        }
    }
}

/// A number with a precision that suits its size.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(s: Option<Summary>) -> String {
    match s {
        Some(s) if s.count > 1 => format!("{} ({}–{})", num(s.median), num(s.min), num(s.max)),
        Some(s) => num(s.median),
        None => "–".into(),
    }
}

fn med(r: &Results, path: Path, n: u32, m: Metric) -> Option<f64> {
    summarize(&r.samples, path, n, m).map(|s| s.median)
}

/// The value at N, or at N = the smallest measured for paths that do not depend
/// on N (f0 and floor) when they were not measured at N.
fn med_at(r: &Results, plan: &Plan, path: Path, n: u32, m: Metric) -> Option<f64> {
    med(r, path, n, m).or_else(|| match path {
        Path::F0 | Path::Floor => plan.slots.first().and_then(|&n0| med(r, path, n0, m)),
        _ => None,
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

/// Overhead over f0: extra µs for latencies, fraction of f0 lost for rates.
fn overhead(m: Metric, v: Option<f64>, f0: Option<f64>) -> String {
    match (v, f0) {
        (Some(v), Some(f)) if m.lower_is_better() => {
            let d = v - f;
            format!("{}{} µs", if d >= 0.0 { "+" } else { "" }, num(d))
        }
        (Some(v), Some(f)) if f != 0.0 => format!("{:+.0} %", (v / f - 1.0) * 100.0),
        _ => "–".into(),
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**not met**" }
}

fn paths_present(r: &Results) -> Vec<Path> {
    Path::ALL
        .into_iter()
        .filter(|p| r.samples.iter().any(|s| s.path == *p))
        .collect()
}

pub fn render(plan: &Plan, c: &Conditions, r: &Results) -> String {
    let mut o = String::new();
    let paths = paths_present(r);
    let _ = writeln!(
        o,
        "# Benchmarks: netagent against the seed's iptables datapath\n"
    );
    let _ = writeln!(
        o,
        "Generated by `cargo xtask bench{}` on {} at commit `{}` in {:.0} s. Rerun it to \
         refresh this file; `cargo xtask bench --quick` is a smoke run (N = 1, short).\n",
        if plan.quick { " --quick" } else { "" },
        c.date,
        c.commit,
        r.elapsed.as_secs_f64()
    );
    let _ = writeln!(o, "## Conditions\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| kernel | {} |", c.kernel);
    let _ = writeln!(o, "| CPU | {} × {} |", c.cpus, c.cpu);
    let _ = writeln!(o, "| memory | {} |", c.memory);
    let _ = writeln!(
        o,
        "| machine load | load average {} at the start, {} at the end (other work shared the machine; the alternating rounds spread it over all paths) |",
        r.load_start, c.load
    );
    let _ = writeln!(o, "| iptables | {} |", c.iptables);
    let _ = writeln!(
        o,
        "| tools | {}; {}; in-tree UDP blaster/sink and connect/request/close client+server |",
        c.sockperf, c.iperf3
    );
    let _ = writeln!(
        o,
        "| rounds | {} alternating rounds at N = {} and {} at larger N, of {} s per workload and path (path order rotates each round; a target's ratio is the median of the per-round ratios) |",
        plan.rounds,
        plan.slots.first().copied().unwrap_or(1),
        plan.scale_rounds,
        plan.duration.as_secs()
    );
    let _ = writeln!(
        o,
        "| CPU placement | clients on CPU 0, servers on CPU 1 (`taskset`); the daemon unpinned |"
    );
    let _ = writeln!(
        o,
        "| netagent daemon | `target/release/netagent up` with RUST_LOG=warn, default configuration, open-files limit {} (inherited; this container cannot raise it) |",
        c.nofile
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "## What is compared\n");
    let _ = writeln!(
        o,
        "Each path runs on its own chain of throwaway network namespaces, built identically; the \
         server always sits in a *wan* namespace at 198.18.0.2.\n\n\
         - **f0**: the guest stand-in and the server on one bare veth pair: the cost of the tools and the TCP stacks.\n\
         - **floor**: guest → slot namespace → host namespace → wan, plain kernel forwarding \
         (`ip_forward=1` in slot and host), no NAT rules; the wan routes the guest's /30 back.\n\
         - **legacy**: the same chain with the seed's exact rules: in the slot namespace `SNAT \
         169.254.0.21→vpeer` (nat POSTROUTING `-o eth0`) and `DNAT HostIP→guest` (nat PREROUTING \
         `-i eth0`); in the host namespace per slot `FORWARD -i veth -o uplink ACCEPT`, `FORWARD -i uplink \
         -o veth ACCEPT` and `POSTROUTING -s vpeer/32 -o uplink MASQUERADE`, with the rules of N−1 other \
         slots inserted *ahead* of the measured slot's (a host that created them first).\n\
         - **netagent**: `target/release/netagent up` running in the host namespace (bench prefix, socket, \
         bpffs), slot 1 created through its API with `{{\"guest_link\":\"veth\",\"guest_netns\":…}}`, \
         N−1 other slots created through the API as real slots (TAP guest side). The host namespace \
         has `ip_forward=0` and forwarding on the uplink only (`net.ipv4.conf.up0.forwarding=1`, as on a \
         host that forwards), which lets `bpf_fib_lookup` give the datapath the next hop so masqueraded \
         packets enter the wan namespace directly (`bpf_redirect_peer`, the uplink being a veth, the \
         next hop kept per CPU and destination address, port and protocol for 20 ms); without it they take the uplink's transmit \
         path (`bpf_redirect_neigh`). Replies are translated for the guest once, on the uplink's \
         ingress, and marked for the slot; the program on the slot's `eth0` only passes them on. Slot \
         1's guest link being a veth, frames for the guest go from `eth0`'s ingress straight to the \
         guest end (`bpf_redirect_peer`, as a TAP's would go to the VMM) rather than out of the \
         slot's end and through a backlog pass.\n\n\
         **A veth into a guest namespace stands in for the TAP in every path** (the VMM's cost would be \
         the same for all of them). Workloads: sockperf TCP ping-pong (p50/p99/min round trip); \
         iperf3 one TCP stream, and with MSS {SMALL_MSS}; UDP datagrams of {UDP_PAYLOAD} bytes payload \
         (60-byte frames) blasted from the guest, rate counted at the receiver; new TCP connections per \
         second (connect, 32-byte request, answer, close; one client; the server closes first and \
         keeps no TIME_WAIT — `tcp_max_tw_buckets=0` in the wan namespaces — so that a NAT reusing a \
         source port from an earlier round never meets an old connection).\n"
    );
    // Results per N.
    let ns: Vec<u32> = plan
        .slots
        .iter()
        .copied()
        .filter(|&n| r.samples.iter().any(|s| s.n == n))
        .collect();
    for &n in &ns {
        let real = r
            .real_slots
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, real)| *real);
        let _ = writeln!(
            o,
            "## Data path, N = {n}{}\n",
            match (n, real) {
                (1, _) => String::new(),
                (_, Some(real)) if real >= n =>
                    format!(" (legacy: rules of {n} slots; netagent: {n} real slots)"),
                (_, Some(real)) => format!(
                    " (legacy: rules of {n} slots; netagent: only {real} real slots — creation stopped at its time budget, see control plane)"
                ),
                _ => format!(" (legacy: rules of {n} slots)"),
            }
        );
        let _ = writeln!(
            o,
            "Median (min–max) over the rounds; overhead relative to f0 (µs added, or % of f0's rate).\n"
        );
        let mut head = String::from("| metric |");
        let mut sep = String::from("|---|");
        for p in &paths {
            let _ = write!(head, " {} |", p.name());
            sep.push_str("---|");
        }
        for p in paths.iter().filter(|p| **p != Path::F0) {
            let _ = write!(head, " {} over f0 |", p.name());
            sep.push_str("---|");
        }
        if paths.contains(&Path::Netagent) {
            head.push_str(" netagent / floor | netagent / legacy |");
            sep.push_str("---|---|");
        }
        let _ = writeln!(o, "{head}\n{sep}");
        for m in Metric::ALL {
            if !paths
                .iter()
                .any(|&p| summarize(&r.samples, p, n, m).is_some())
            {
                continue;
            }
            let mut row = format!("| {} |", m.label());
            for &p in &paths {
                let _ = write!(row, " {} |", cell(summarize(&r.samples, p, n, m)));
            }
            let f0 = med_at(r, plan, Path::F0, n, m);
            for &p in paths.iter().filter(|p| **p != Path::F0) {
                let _ = write!(row, " {} |", overhead(m, med(r, p, n, m), f0));
            }
            if paths.contains(&Path::Netagent) {
                let na = med(r, Path::Netagent, n, m);
                let _ = write!(
                    row,
                    " {} | {} |",
                    ratio(na, med_at(r, plan, Path::Floor, n, m)),
                    ratio(na, med(r, Path::Legacy, n, m))
                );
            }
            let _ = writeln!(o, "{row}");
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(o, "![chart](bench.svg)\n");
    render_targets(&mut o, plan, r);
    render_limits(&mut o, plan, r);
    render_control(&mut o, r);
    render_prog_cost(&mut o, r);
    render_live_cost(&mut o, r);
    if let Some(c) = &r.agent_counters {
        let _ = writeln!(
            o,
            "netagent's slot 1 counters at the end of the data-path runs: `{c}`\n"
        );
    }
    if !r.notes.is_empty() {
        let _ = writeln!(o, "## Notes from this run\n");
        for n in &r.notes {
            let _ = writeln!(o, "- {}", n.replace('\n', " "));
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(
        o,
        "## Rerun\n\n```\ncargo xtask bench                       # everything (this one: {:.0} minutes before teardown)\n\
         cargo xtask bench --quick               # smoke run, N = 1, report under target/bench/\n\
         cargo xtask bench --paths floor,netagent --workloads rr,stream --slots 1,1000 --rounds 3\n```\n\n\
         Needs root; it builds its own namespaces (prefix `xb` + 4 hex digits), never touches the \
         machine's real interfaces, routes or iptables, and removes everything at the end, also on \
         Ctrl-C (a run killed with SIGKILL is cleaned up by the next run).",
        r.elapsed.as_secs_f64() / 60.0
    );
    o
}

fn render_targets(o: &mut String, plan: &Plan, r: &Results) {
    let _ = writeln!(o, "## Targets (issue 4)\n");
    let _ = writeln!(o, "| target | measured | verdict |\n|---|---|---|");
    let n0 = plan.slots.first().copied().unwrap_or(1);
    let g = |p, n, m| med_at(r, plan, p, n, m);
    // Round trip overhead.
    if let (Some(f0), Some(fl), Some(na)) = (
        g(Path::F0, n0, Metric::RttP50),
        g(Path::Floor, n0, Metric::RttP50),
        g(Path::Netagent, n0, Metric::RttP50),
    ) {
        let (oh_na, oh_fl, per_round) = judged_overheads(r, n0, na - f0, fl - f0);
        let ok = oh_na <= 0.5 * oh_fl;
        let verdict = if oh_fl <= 0.0 {
            "inconclusive: floor's overhead is within the noise of this run".to_string()
        } else if ok {
            met(true).to_string()
        } else {
            format!("{}, {} µs too slow", met(false), num(oh_na - 0.5 * oh_fl))
        };
        let _ = writeln!(
            o,
            "| RTT p50 overhead over f0 ≤ 0.5 × floor's (N = {n0}) | netagent {} µs, floor {} µs{per_round}: {} × floor's | {verdict} |",
            signed(oh_na),
            signed(oh_fl),
            if oh_fl > 0.0 {
                format!("{:.2}", oh_na / oh_fl)
            } else {
                "–".into()
            },
        );
        scale_row(o, plan, r, Metric::RttP50, "RTT p50");
    } else {
        let _ = writeln!(o, "| RTT p50 overhead ≤ 0.5 × floor's | not measured | – |");
    }
    ratio_row(
        o,
        r,
        n0,
        g,
        Metric::StreamGbps,
        Path::Floor,
        1.1,
        "TCP stream",
    );
    scale_row(o, plan, r, Metric::StreamGbps, "TCP stream");
    for (m, what) in [
        (Metric::UdpKpps, "small-packet rate"),
        (Metric::CrrPerSec, "new-connection rate"),
    ] {
        ratio_row(o, r, n0, g, m, Path::Legacy, 1.5, what);
    }
    match &r.control {
        Some(cp) => {
            let row = |o: &mut String, what: &str, v: &[f64], p: f64, limit: f64| {
                if v.is_empty() {
                    return;
                }
                let x = percentile(v, p);
                let _ = writeln!(
                    o,
                    "| {what} ≤ {limit} ms | {} ms ({} requests) | {}{} |",
                    num(x),
                    v.len(),
                    met(x <= limit),
                    if x <= limit {
                        String::new()
                    } else {
                        format!(", {:.1}× the limit", x / limit)
                    }
                );
            };
            row(o, "slot create p50, serial", &cp.serial_create, 50.0, 3.0);
            row(o, "slot create p99, serial", &cp.serial_create, 99.0, 10.0);
            row(o, "slot delete p50, serial", &cp.serial_delete, 50.0, 3.0);
            if let Some((k, create_s)) = cp.bulk {
                let per_1000 = create_s * 1000.0 / k as f64;
                let _ = writeln!(
                    o,
                    "| 1,000 slots created in ≤ 5 s (32 concurrent clients) | {k} slots in {create_s:.2} s: {} s per 1,000 | {}{} |",
                    num(per_1000),
                    met(per_1000 <= 5.0),
                    if per_1000 <= 5.0 {
                        String::new()
                    } else {
                        format!(", {:.1}× the limit", per_1000 / 5.0)
                    }
                );
            }
            if let Some(m) = &cp.memory {
                let (rss, maps, progs) = m.per_slot_kib();
                let per_slot = rss.max(0.0) + maps + progs;
                let _ = writeln!(
                    o,
                    "| agent memory per slot ≤ 4 KiB beyond the kernel's netns/veth/TAP (over {} slots) | RSS {rss:+.1} + BPF maps {maps:+.2} + BPF programs {progs:+.1} = {per_slot:.1} KiB | {} |",
                    m.slots,
                    if rss < 0.0 {
                        format!(
                            "inconclusive: RSS fell during the step; {}",
                            met(per_slot <= 4.0)
                        )
                    } else if per_slot <= 4.0 {
                        met(true).to_string()
                    } else {
                        format!("{}, {:.1}× the limit", met(false), per_slot / 4.0)
                    }
                );
            }
        }
        None => {
            let _ = writeln!(
                o,
                "| slot create/delete latency, 1,000 slots, memory per slot | not measured | – |"
            );
        }
    }
    let _ = writeln!(o);
}

/// A ratio target: netagent ≥ `target` × `base` at N = `n0`, judged on the
/// per-round ratios (`judged_ratio`), with f0's own ratio where even f0 is below
/// the target (no datapath beats the bare veth pair).
#[allow(clippy::too_many_arguments)]
fn ratio_row(
    o: &mut String,
    r: &Results,
    n0: u32,
    g: impl Fn(Path, u32, Metric) -> Option<f64>,
    m: Metric,
    base: Path,
    target: f64,
    what: &str,
) {
    let (Some(b), Some(na)) = (g(base, n0, m), g(Path::Netagent, n0, m)) else {
        let _ = writeln!(
            o,
            "| {what} ≥ {target} × {} | not measured | – |",
            base.name()
        );
        return;
    };
    let (x, per_round) = judged_ratio(r, Path::Netagent, base, n0, m, na / b);
    let bound = match paired_ratio(&r.samples, Path::F0, base, n0, m) {
        Some(f0) if f0.median < target => format!(
            "; f0 itself (no forwarding at all) is {:.2} × {} here",
            f0.median,
            base.name()
        ),
        _ => String::new(),
    };
    let unit = m.unit();
    let _ = writeln!(
        o,
        "| {what} ≥ {target} × {} (N = {n0}) | {} vs {}{unit}: {:.2} × the median{per_round}{bound} | {}{} |",
        base.name(),
        num(na),
        num(b),
        na / b,
        met(x >= target),
        if x >= target {
            String::new()
        } else {
            format!(", {:.0} % short", (target - x) / target * 100.0)
        }
    );
}

/// netagent at the largest N against the smallest, each relative to f0 of the
/// same N.
struct ScaleChange {
    n0: u32,
    nmax: u32,
    /// netagent and f0 at `nmax`, then at `n0` (medians).
    nx: f64,
    f0x: f64,
    na: f64,
    f0: f64,
    /// Per cent, from `relative_change`.
    change: f64,
}

fn scale_change(plan: &Plan, r: &Results, m: Metric) -> Option<ScaleChange> {
    let n0 = plan.slots.first().copied()?;
    let nmax = plan.slots.last().copied()?;
    if nmax <= n0 {
        return None;
    }
    let (nx, f0x) = (med(r, Path::Netagent, nmax, m)?, med(r, Path::F0, nmax, m)?);
    let (na, f0) = (med(r, Path::Netagent, n0, m)?, med(r, Path::F0, n0, m)?);
    let change = relative_change(r, n0, nmax, m, (nx / f0x) / (na / f0));
    Some(ScaleChange {
        n0,
        nmax,
        nx,
        f0x,
        na,
        f0,
        change,
    })
}

/// Whether netagent at the largest N is within 5 % of itself at the smallest
/// (relative to f0): no more than 5 % slower for a latency, no more than 5 %
/// less for a rate.
fn scale_ok(m: Metric, change: f64) -> bool {
    if m.lower_is_better() {
        change <= 5.0
    } else {
        change >= -5.0
    }
}

/// The "unchanged at the largest N" target of `m` (round trip, stream).
fn scale_row(o: &mut String, plan: &Plan, r: &Results, m: Metric, what: &str) {
    let Some(c) = scale_change(plan, r, m) else {
        return;
    };
    let unit = m.unit();
    let _ = writeln!(
        o,
        "| {what} within 5 % at N = {} ({}) | {}{unit} (f0 {}{unit}) vs {}{unit} (f0 {}{unit}) at N = {}: {:+.1} % relative to f0 of the same N and round, {:+.1} % raw | {} |",
        c.nmax,
        if m.lower_is_better() {
            "no more than 5 % slower"
        } else {
            "no more than 5 % less"
        },
        num(c.nx),
        num(c.f0x),
        num(c.na),
        num(c.f0),
        c.n0,
        c.change,
        (c.nx / c.na - 1.0) * 100.0,
        met(scale_ok(m, c.change))
    );
}

/// How much netagent's figure relative to f0 changed from N = `n0` to `nmax`, in
/// per cent: from the per-round ratios netagent / f0 (each round's f0 ran beside
/// it) when both N have three rounds or more, else from `of_medians`
/// ((netagent / f0 at nmax) / (netagent / f0 at n0), medians).
fn relative_change(r: &Results, n0: u32, nmax: u32, m: Metric, of_medians: f64) -> f64 {
    let at = |n| paired_ratio(&r.samples, Path::Netagent, Path::F0, n, m).filter(|p| p.count >= 3);
    match (at(nmax), at(n0)) {
        (Some(x), Some(one)) => (x.median / one.median - 1.0) * 100.0,
        _ => (of_medians - 1.0) * 100.0,
    }
}

/// The ratio a target is judged by: the median of the per-round ratios (paths of
/// one round ran back to back) when there are at least three rounds, else the
/// ratio of the medians. With the text that reports the per-round ratios.
fn judged_ratio(
    r: &Results,
    a: Path,
    b: Path,
    n: u32,
    m: Metric,
    of_medians: f64,
) -> (f64, String) {
    match paired_ratio(&r.samples, a, b, n, m) {
        Some(p) if p.count >= 3 => (
            p.median,
            format!(
                "; per round {:.2} × ({:.2}–{:.2}), median of {} — the verdict's figure",
                p.median, p.min, p.max, p.count
            ),
        ),
        _ => (of_medians, String::new()),
    }
}

/// `v` with its sign, as an overhead is written (`+1.29`, `-0.40`).
fn signed(v: f64) -> String {
    format!("{}{}", if v >= 0.0 { "+" } else { "" }, num(v))
}

/// The round-trip overheads over f0 (netagent's, floor's) a target is judged
/// by: the medians of the per-round differences (each path against f0 of the
/// same round) when there are at least three rounds, else the differences of
/// the medians (`of_medians`). With the text that says which.
fn judged_overheads(
    r: &Results,
    n: u32,
    na_of_medians: f64,
    fl_of_medians: f64,
) -> (f64, f64, String) {
    let at =
        |p| paired_difference(&r.samples, p, Path::F0, n, Metric::RttP50).filter(|d| d.count >= 3);
    match (at(Path::Netagent), at(Path::Floor)) {
        (Some(na), Some(fl)) => (
            na.median,
            fl.median,
            format!(
                " (medians of {} per-round overheads, each over f0 of its round — the verdict's figures; of the medians {} and {} µs)",
                na.count,
                signed(na_of_medians),
                signed(fl_of_medians)
            ),
        ),
        _ => (na_of_medians, fl_of_medians, String::new()),
    }
}

/// Facts from this run that explain the missed targets.
fn render_limits(o: &mut String, plan: &Plan, r: &Results) {
    let mut items: Vec<String> = Vec::new();
    let n0 = plan.slots.first().copied().unwrap_or(1);
    if let Some(cp) = &r.control
        && !cp.serial_create.is_empty()
    {
        let p50 = percentile(&cp.serial_create, 50.0);
        if p50 > 3.0 {
            let serial_rate = 1000.0 / p50;
            let mut item = format!(
                "**Slot create/delete.** One create takes {} ms (p50, serial), one delete {} ms.",
                num(p50),
                num(percentile(&cp.serial_delete, 50.0))
            );
            if let Some((k, secs)) = cp.bulk {
                let conc_rate = k as f64 / secs;
                let _ = write!(
                    item,
                    " 32 concurrent clients got {conc_rate:.0} slots/s against {serial_rate:.0}/s for one client{}.",
                    if conc_rate < 1.5 * serial_rate {
                        ": concurrent requests are effectively serialized inside the agent"
                    } else {
                        ""
                    }
                );
            }
            if let Some(m) = &cp.memory {
                let per = (m.bpf_progs_after as f64 - m.bpf_progs_before as f64) / m.slots as f64;
                if per >= 0.5 {
                    let _ = write!(
                        item,
                        " Each slot adds {per:.1} BPF programs to the agent: per-slot program \
                         instances are verified, JIT-compiled and attached on every create, the \
                         likely bulk of the time (a shared instance per hook would make a create a \
                         handful of netlink messages and map updates)."
                    );
                }
            }
            items.push(item);
        }
        if let Some(m) = &cp.memory {
            let rss = (m.rss_after_kib as f64 - m.rss_before_kib as f64) / m.slots as f64;
            if rss > 4.0 {
                items.push(format!(
                    "**Agent memory.** RSS grows {rss:.1} KiB per slot while map memory grows {:.2} KiB \
                     per slot and the BPF programs the agent holds go from {} to {}{}.",
                    (m.bpf_map_bytes_after as f64 - m.bpf_map_bytes_before as f64) / 1024.0 / m.slots as f64,
                    m.bpf_progs_before,
                    m.bpf_progs_after,
                    if m.bpf_progs_after > m.bpf_progs_before + m.slots as usize / 2 {
                        ": per-slot program instances (loader state, programs, links) dominate"
                    } else {
                        ": it is the agent's own heap per slot (slot records, netlink and namespace handles, task state)"
                    }
                ));
            }
        }
    }
    // RTT at the largest N, relative to f0 of the same N and round.
    if let Some(c) = scale_change(plan, r, Metric::RttP50)
        && !scale_ok(Metric::RttP50, c.change)
    {
        let nmax = c.nmax;
        let real = r
            .real_slots
            .iter()
            .find(|(n, _)| *n == nmax)
            .map_or(nmax, |&(_, reached)| reached);
        items.push(format!(
            "**RTT at N = {nmax}.** The datapath's maps are O(1), but the kernel finds a \
             device by index in a hash of 256 chains per namespace (`dev_get_by_index_rcu`), \
             and every redirect does so: with {real} host veths in the agent's namespace a \
             chain holds about {:.0} of them, newest first, and the measured slot's veth — \
             slot 1, the oldest — is the last of its chain, walked by every reply to it \
             (the uplink's chain is kept free of veths).",
            f64::from(real) / 256.0
        ));
    }
    if let Some(item) = stream_limit(r, n0) {
        items.push(item);
    }
    if let Some(item) = crr_limit(r, n0) {
        items.push(item);
    }
    if let Some(m) = r.control.as_ref().and_then(|cp| cp.memory.as_ref())
        && let Some(&(n, reached)) = r.real_slots.iter().find(|(n, reached)| reached < n)
    {
        let per = (m.fds_after as f64 - m.fds_before as f64) / f64::from(m.slots);
        let soft: f64 = std::fs::read_to_string("/proc/self/limits")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
            .unwrap_or(f64::NAN);
        let failed = r.notes.iter().any(|n| n.contains("could not create"));
        items.push(format!(
            "**Slot count.** {reached} of {n} slots were created ({}). The agent holds {per:.1} \
             more open fds per slot and its open-files limit here is {soft:.0}: about {:.0} slots \
             at most unless it raises its soft limit or holds fewer fds per slot.",
            if failed {
                "creation failed, see the notes"
            } else {
                "creation stopped at the bench's time budget for one N"
            },
            if per > 0.0 { soft / per } else { f64::NAN }
        ));
    }
    if let Some(c) = &r.agent_counters {
        let count = |key: &str| -> u64 {
            c.find(&format!("\"{key}\":"))
                .map(|at| &c[at + key.len() + 3..])
                .map(|rest| {
                    rest.chars()
                        .take_while(|ch| ch.is_ascii_digit())
                        .collect::<String>()
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let exhausted = count("nat_ports_exhausted");
        if exhausted > 0 {
            items.push(format!(
                "**New connections.** netagent dropped {exhausted} packets for lack of a free \
                 masquerade port (`nat_ports_exhausted`, slot 1, {} allocations in the run). Every \
                 new guest flow takes a port of the masquerade range and a closed TCP flow's port \
                 can be taken again after 1 s idle, so more new connections per second to one \
                 destination than the range has ports exhaust it; each dropped SYN costs the \
                 one-client loop a 1 s retransmission, which pulls whole rounds down. Conntrack's \
                 MASQUERADE keeps the guest's own source port instead.",
                count("allocations")
            ));
        }
    }
    if items.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "### What limits the missed targets (facts from this run)\n"
    );
    for i in items {
        let _ = writeln!(o, "- {i}");
    }
    let _ = writeln!(o);
}

/// The stream target's limit, when it is missed: how far f0 itself (the two
/// TCP stacks on one veth pair, no forwarding) is ahead of floor per round —
/// the rate no forwarding path can pass — so what share of f0's rate 1.1 ×
/// floor asks for, the share netagent reached, and where the datapath's cost
/// of a stream lands.
fn stream_limit(r: &Results, n0: u32) -> Option<String> {
    let m = Metric::StreamGbps;
    let per_round = |a, b| paired_ratio(&r.samples, a, b, n0, m).filter(|p| p.count >= 3);
    let vs_floor = per_round(Path::Netagent, Path::Floor)?;
    if vs_floor.median >= 1.1 {
        return None;
    }
    let f0_vs_floor = per_round(Path::F0, Path::Floor)?;
    let vs_f0 = per_round(Path::Netagent, Path::F0)?;
    let at_least = |a, b| {
        paired_ratio_values(&r.samples, a, b, n0, m)
            .iter()
            .filter(|&&x| x >= 1.1)
            .count()
    };
    // The reply direction's programs, once per ACK, in the live stream runs.
    let acks: f64 = r
        .live_cost
        .iter()
        .filter(|c| {
            c.workload == Workload::Stream
                && (c.program == "uplink_ingress" || c.program == "slot_ingress")
        })
        .map(|c| c.ns_per_run)
        .sum();
    let ack_cost = if acks > 0.0 {
        format!(" ({} ns per ACK in this run's live stream)", num(acks))
    } else {
        String::new()
    };
    Some(format!(
        "**Stream.** f0 itself, the two TCP stacks on one veth pair with no forwarding at all, \
         reached {:.2} × floor per round (1.1 × or more in {} of {} rounds), so 1.1 × floor asks \
         netagent for {:.0} % of f0's rate; it reached {:.0} % (per round), and 1.1 × floor in \
         {} of {} rounds. One stream saturates the receiving CPU (the server's copy to user \
         space; `cargo xtask bench --perf DIR` shows it busy with f0 and netagent alike). The \
         datapath's share of that CPU is the reply direction: `uplink_ingress` and \
         `slot_ingress` run once per ACK{ack_cost}, with two namespace crossings, while the data \
         direction's programs run once per GSO batch of up to 64 KiB on the sending CPU.",
        f0_vs_floor.median,
        at_least(Path::F0, Path::Floor),
        f0_vs_floor.count,
        110.0 / f0_vs_floor.median,
        vs_f0.median * 100.0,
        at_least(Path::Netagent, Path::Floor),
        vs_floor.count,
    ))
}

/// The new-connection target's limit, when it is missed: how far f0 itself is
/// ahead of legacy (so what share of f0's rate 1.5 × legacy asks for), the share
/// netagent reached, and the time per connection that makes the difference.
fn crr_limit(r: &Results, n0: u32) -> Option<String> {
    let m = Metric::CrrPerSec;
    let per_round = |a, b| paired_ratio(&r.samples, a, b, n0, m).filter(|p| p.count >= 3);
    let vs_legacy = per_round(Path::Netagent, Path::Legacy)?;
    if vs_legacy.median >= 1.5 {
        return None;
    }
    let f0_vs_legacy = per_round(Path::F0, Path::Legacy)?;
    let vs_f0 = per_round(Path::Netagent, Path::F0)?;
    let (na, f0) = (med(r, Path::Netagent, n0, m)?, med(r, Path::F0, n0, m)?);
    // Rounds in which netagent reached 1.5 × that round's legacy (the medians
    // above come from different rounds and need not agree with the verdict).
    let rounds_met = paired_ratio_values(&r.samples, Path::Netagent, Path::Legacy, n0, m)
        .iter()
        .filter(|&&x| x >= 1.5)
        .count();
    Some(format!(
        "**New connections.** f0 itself, with no forwarding at all, reached {:.2} × legacy per \
         round, so 1.5 × legacy asks netagent for {:.0} % of f0's rate; it reached {:.0} % (per \
         round; each a median over the rounds), and 1.5 × legacy in {rounds_met} of {} rounds; \
         {} µs per connection against f0's {} µs (medians). A connection here is about \
         ten packets through the datapath, each a program run on either side of two namespace \
         crossings, and its first packet allocates a masquerade port (the FIFO reuse of the \
         destination's oldest closed port: a failed insert, two lookups, two deletes and two \
         inserts in the default 262,144-entry tables, which miss the CPU caches); \
         `cargo xtask bench --perf DIR` shows where each run's time goes.",
        f0_vs_legacy.median,
        150.0 / f0_vs_legacy.median,
        vs_f0.median * 100.0,
        vs_legacy.count,
        num(1e6 / na),
        num(1e6 / f0),
    ))
}

fn render_control(o: &mut String, r: &Results) {
    let _ = writeln!(o, "## Control plane\n");
    if let Some(cp) = &r.control {
        let _ = writeln!(
            o,
            "Through the API socket with an in-process HTTP/1.1 client (one connection per request), \
             measured right after the bulk creation below (so with that many slots present); slots \
             use the TAP guest side. Latency in ms.\n"
        );
        let _ = writeln!(
            o,
            "| operation | requests | p50 | p99 | max |\n|---|---|---|---|---|"
        );
        for (what, v) in [
            ("create, serial", &cp.serial_create),
            ("delete, serial", &cp.serial_delete),
            ("create, 32 concurrent", &cp.conc_create),
            ("delete, 32 concurrent", &cp.conc_delete),
        ] {
            if v.is_empty() {
                continue;
            }
            let _ = writeln!(
                o,
                "| {what} | {} | {} | {} | {} |",
                v.len(),
                num(percentile(v, 50.0)),
                num(percentile(v, 99.0)),
                num(percentile(v, 100.0))
            );
        }
        if let Some((k, c)) = cp.bulk {
            let _ = writeln!(
                o,
                "\n{k} slots with 32 concurrent clients: created in {c:.2} s ({:.0} slots/s).",
                k as f64 / c
            );
        }
        for (n, reached, took) in &r.scale_steps {
            let _ = writeln!(
                o,
                "Scaling to N = {n}: {reached} slots present after {:.1} s{}.",
                took.as_secs_f64(),
                if reached < n {
                    " (time budget reached)"
                } else {
                    ""
                }
            );
        }
        if let Some(m) = &cp.memory {
            let _ = writeln!(
                o,
                "\n**Memory** around creating {} slots: agent RSS {} → {} KiB ({:+.2} KiB per slot); \
                 memory charged to the BPF maps the agent holds {} → {} KiB ({:+.2} KiB per slot; {} maps \
                 at the end); BPF programs the agent holds {} → {} ({:+.2} per slot, {} → {} KiB); its open fds {} → {} \
                 ({:+.1} per slot); MemAvailable \
                 dropped by {} KiB, {:.1} KiB per slot — the kernel's cost of a namespace, a veth pair \
                 and a TAP (and of per-slot programs, if any) plus the agent's, the baseline the 4 KiB \
                 target is counted beyond.\n",
                m.slots,
                m.rss_before_kib,
                m.rss_after_kib,
                (m.rss_after_kib as f64 - m.rss_before_kib as f64) / m.slots as f64,
                m.bpf_map_bytes_before / 1024,
                m.bpf_map_bytes_after / 1024,
                (m.bpf_map_bytes_after as f64 - m.bpf_map_bytes_before as f64)
                    / 1024.0
                    / m.slots as f64,
                m.bpf_maps,
                m.bpf_progs_before,
                m.bpf_progs_after,
                (m.bpf_progs_after as f64 - m.bpf_progs_before as f64) / m.slots as f64,
                m.bpf_prog_bytes_before / 1024,
                m.bpf_prog_bytes_after / 1024,
                m.fds_before,
                m.fds_after,
                (m.fds_after as f64 - m.fds_before as f64) / m.slots as f64,
                m.mem_available_drop_kib,
                m.mem_available_drop_kib as f64 / m.slots as f64
            );
        }
    } else {
        let _ = writeln!(
            o,
            "The agent's control plane was not measured in this run.\n"
        );
    }
    if !r.seed.is_empty() {
        let _ = writeln!(
            o,
            "**The seed's sequence for one slot** (its `CreateNetwork` then `RemoveNetwork`, run against \
             the legacy host namespace while it holds N slots' rules). The seed does the link, address \
             and route steps with in-process netlink; here they are `ip` commands (one process each), so \
             \"subprocess part\" — its `ip netns exec … sysctl`, two `ip netns exec … iptables` and three \
             host `iptables` calls, which are subprocesses in the seed as well — is the seed's lower \
             bound. Median (min–max), ms.\n"
        );
        let _ = writeln!(
            o,
            "| N (rules present) | samples | create, whole sequence | create, subprocess part | delete |\n|---|---|---|---|---|"
        );
        for (n, t) in &r.seed {
            let s = |f: fn(&super::legacy::SeedTiming) -> f64| {
                cell(Summary::of(&t.iter().map(f).collect::<Vec<_>>()))
            };
            let _ = writeln!(
                o,
                "| {n} | {} | {} | {} | {} |",
                t.len(),
                s(|t| t.create_ms),
                s(|t| t.create_subprocess_ms),
                s(|t| t.delete_ms)
            );
        }
        let _ = writeln!(o);
    }
}

fn render_live_cost(o: &mut String, r: &Results) {
    if r.live_cost.is_empty() {
        return;
    }
    let _ = writeln!(o, "## Program time in the live runs (N = 1)\n");
    let _ = writeln!(
        o,
        "One extra netagent run of each workload after the rounds above, with the kernel's \
         per-program run-time statistics on (`BPF_ENABLE_STATS`; `run_time_ns / run_cnt` as \
         `bpftool prog show` reports them): each program's time per run under real traffic, cache \
         misses, unclones of cloned skbs and helper calls included, the redirect's delivery not. \
         The statistics add two clock reads to every run, so these runs are not among the samples.\n"
    );
    let mut header = String::from("| workload |");
    let mut rule = String::from("|---|");
    for p in live_cost::PROGRAMS {
        let _ = write!(header, " `{p}` ns per run (runs) |");
        rule.push_str("---|");
    }
    let _ = writeln!(o, "{header}\n{rule}");
    let mut loads: Vec<_> = r.live_cost.iter().map(|c| c.workload).collect();
    loads.dedup();
    for load in loads {
        let mut line = format!("| {} |", load.label());
        for p in live_cost::PROGRAMS {
            match r
                .live_cost
                .iter()
                .find(|c| c.workload == load && c.program == p)
            {
                Some(c) => {
                    let _ = write!(line, " {} ({}) |", num(c.ns_per_run), c.runs);
                }
                None => line.push_str(" – |"),
            }
        }
        let _ = writeln!(o, "{line}");
    }
    let _ = writeln!(o);
}

fn render_prog_cost(o: &mut String, r: &Results) {
    let _ = writeln!(o, "## Program cost (BPF_PROG_TEST_RUN)\n");
    if r.prog_cost.is_empty() {
        let _ = writeln!(o, "Not measured in this run (see notes).\n");
        return;
    }
    let _ = writeln!(
        o,
        "`bpftool prog run` on the programs the running agent loaded, each fed a frame that takes \
         its main path, run inside the namespace (and with the `__sk_buff` ifindex) the program \
         serves. A test run repeats a program on the same skb, so only cases that leave the frame \
         as it is are timed with `repeat N`; translating cases are the median of single runs on \
         fresh frames (which includes a timer read). \"path taken\" checks every run's return value \
         and output frame (the rewrite, or an unchanged frame). A test run reports a redirect's \
         verdict (7, `TC_ACT_REDIRECT`) without performing it, so the cost of delivering the \
         packet is not included.\n"
    );
    let _ = writeln!(
        o,
        "| program | packet | ns per packet | path taken | test-run return value |\n|---|---|---|---|---|"
    );
    for p in &r.prog_cost {
        let _ = writeln!(
            o,
            "| `{}` | {} | {} | {} | {} |",
            p.program,
            p.case,
            num(p.ns_per_packet),
            if p.took_path { "yes" } else { "**no**" },
            p.verdict
        );
    }
    let _ = writeln!(o);
}

/// A few lines for the terminal.
pub fn summary(plan: &Plan, r: &Results) -> String {
    let mut o = String::new();
    for &n in &plan.slots {
        for m in [
            Metric::RttP50,
            Metric::StreamGbps,
            Metric::UdpKpps,
            Metric::CrrPerSec,
        ] {
            let mut line = format!("N={n:<6} {:<34}", m.label());
            let mut any = false;
            for p in Path::ALL {
                if let Some(v) = med(r, p, n, m) {
                    any = true;
                    let _ = write!(line, " {}={}", p.name(), num(v));
                }
            }
            if any {
                let _ = writeln!(o, "{line}");
            }
        }
    }
    let _ = cp_line(&mut o, r.control.as_ref());
    o
}

fn cp_line(o: &mut String, cp: Option<&ControlPlane>) -> std::fmt::Result {
    if let Some(cp) = cp
        && !cp.serial_create.is_empty()
    {
        writeln!(
            o,
            "slot create serial p50={} ms p99={} ms",
            num(percentile(&cp.serial_create, 50.0)),
            num(percentile(&cp.serial_create, 99.0))
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::stats::Sample;
    use crate::bench::workloads::Workload;

    fn plan() -> Plan {
        Plan {
            quick: false,
            workloads: Vec::new(),
            scale_workloads: Vec::new(),
            paths: Path::ALL.to_vec(),
            slots: vec![1, 10000],
            rounds: 3,
            scale_rounds: 3,
            duration: Duration::from_secs(1),
            control_plane: false,
            prog_cost: false,
            scale_budget: Duration::from_secs(1),
            out: std::path::PathBuf::new(),
            perf: None,
        }
    }

    /// Three rounds of `values` (f0, floor, legacy, netagent) for `m` at `n`; the
    /// machine runs twice as fast in round 1, which per-round ratios cancel.
    fn rounds(samples: &mut Vec<Sample>, n: u32, m: Metric, values: [f64; 4]) {
        for round in 0..3 {
            let speed = if round == 1 { 2.0 } else { 1.0 };
            for (path, v) in Path::ALL.iter().zip(values) {
                let value = if m.lower_is_better() {
                    v / speed
                } else {
                    v * speed
                };
                samples.push(Sample {
                    path: *path,
                    n,
                    metric: m,
                    round,
                    value,
                });
            }
        }
    }

    fn targets(r: &Results) -> String {
        let mut o = String::new();
        render_targets(&mut o, &plan(), r);
        o
    }

    fn row<'a>(report: &'a str, starts: &str) -> &'a str {
        report
            .lines()
            .find(|l| l.starts_with(starts))
            .unwrap_or_else(|| panic!("no row {starts:?} in\n{report}"))
    }

    #[test]
    fn ratio_and_scale_targets_are_judged_per_round_with_fs_bound() {
        let mut r = Results::default();
        // Stream: netagent 1.2 × floor; small packets 1.4 × legacy, f0 only
        // 1.3 × legacy; connections 1.6 × legacy.
        rounds(
            &mut r.samples,
            1,
            Metric::StreamGbps,
            [30.0, 20.0, 18.0, 24.0],
        );
        rounds(
            &mut r.samples,
            1,
            Metric::UdpKpps,
            [130.0, 120.0, 100.0, 140.0],
        );
        rounds(
            &mut r.samples,
            1,
            Metric::CrrPerSec,
            [200.0, 150.0, 100.0, 160.0],
        );
        // Round trip: 10 % slower relative to f0 at N = 10000; stream 3 % less.
        rounds(&mut r.samples, 1, Metric::RttP50, [10.0, 12.0, 13.0, 10.0]);
        rounds(
            &mut r.samples,
            10000,
            Metric::RttP50,
            [10.0, 12.0, 900.0, 11.0],
        );
        rounds(
            &mut r.samples,
            10000,
            Metric::StreamGbps,
            [30.0, 20.0, 1.0, 23.28],
        );
        let report = targets(&r);

        let stream = row(&report, "| TCP stream ≥ 1.1 × floor");
        assert!(stream.contains("per round 1.20 ×"), "{stream}");
        assert!(stream.ends_with("| **met** |"), "{stream}");
        let udp = row(&report, "| small-packet rate ≥ 1.5 × legacy");
        assert!(
            udp.contains("f0 itself (no forwarding at all) is 1.30 × legacy"),
            "{udp}"
        );
        assert!(udp.contains("**not met**, 7 % short"), "{udp}");
        let crr = row(&report, "| new-connection rate ≥ 1.5 × legacy");
        assert!(
            crr.ends_with("| **met** |") && !crr.contains("f0 itself"),
            "{crr}"
        );

        let rtt = row(
            &report,
            "| RTT p50 within 5 % at N = 10000 (no more than 5 % slower)",
        );
        assert!(rtt.contains("+10.0 % relative to f0"), "{rtt}");
        assert!(rtt.ends_with("| **not met** |"), "{rtt}");
        let stream_n = row(
            &report,
            "| TCP stream within 5 % at N = 10000 (no more than 5 % less)",
        );
        assert!(stream_n.contains("-3.0 % relative to f0"), "{stream_n}");
        assert!(stream_n.ends_with("| **met** |"), "{stream_n}");
    }

    #[test]
    fn the_round_trip_overhead_is_judged_round_by_round() {
        let mut r = Results::default();
        // f0 drifts between rounds; netagent's overhead is +2.0, +0.5, +0.4
        // (median +0.5), floor's +1.5 every round. The medians of the paths
        // (f0 10, netagent 11, floor 11.5) would say +1.0 against +1.5.
        let per_path = [
            (Path::F0, [9.0, 12.0, 10.0]),
            (Path::Floor, [10.5, 13.5, 11.5]),
            (Path::Netagent, [11.0, 12.5, 10.4]),
        ];
        for (path, values) in per_path {
            for (round, value) in values.into_iter().enumerate() {
                r.samples.push(Sample {
                    path,
                    n: 1,
                    metric: Metric::RttP50,
                    round: round as u32,
                    value,
                });
            }
        }
        let report = targets(&r);
        let rtt = row(
            &report,
            "| RTT p50 overhead over f0 ≤ 0.5 × floor's (N = 1)",
        );
        assert!(
            rtt.contains("netagent +0.50 µs, floor +1.50 µs (medians of 3 per-round overheads"),
            "{rtt}"
        );
        assert!(rtt.contains("of the medians +1.00 and +1.50 µs"), "{rtt}");
        assert!(rtt.ends_with("| **met** |"), "{rtt}");
    }

    #[test]
    fn a_missed_connection_target_says_what_share_of_f0_it_asks_for() {
        let mut r = Results::default();
        rounds(
            &mut r.samples,
            1,
            Metric::CrrPerSec,
            [200.0, 150.0, 100.0, 140.0],
        );
        let item = crr_limit(&r, 1).expect("missed: an item");
        assert!(
            item.contains("reached 2.00 × legacy per round")
                && item.contains("asks netagent for 75 % of f0's rate; it reached 70 %")
                && item.contains("and 1.5 × legacy in 0 of 3 rounds"),
            "{item}"
        );
        // Medians: 140 and 200 conn/s (round 1 runs twice as fast).
        assert!(
            item.contains("7143 µs per connection against f0's 5000 µs"),
            "{item}"
        );

        let mut met = Results::default();
        rounds(
            &mut met.samples,
            1,
            Metric::CrrPerSec,
            [200.0, 150.0, 100.0, 160.0],
        );
        assert!(crr_limit(&met, 1).is_none());
    }

    #[test]
    fn a_missed_stream_target_says_what_share_of_f0_it_asks_for() {
        let mut r = Results::default();
        rounds(
            &mut r.samples,
            1,
            Metric::StreamGbps,
            [26.0, 25.0, 20.0, 24.0],
        );
        let live = |program, ns_per_run| live_cost::LiveCost {
            workload: Workload::Stream,
            program,
            runs: 1000,
            ns_per_run,
        };
        r.live_cost = vec![
            live("tap_ingress", 100.0),
            live("uplink_ingress", 200.0),
            live("slot_ingress", 80.0),
        ];
        let item = stream_limit(&r, 1).expect("missed: an item");
        assert!(
            item.contains("reached 1.04 × floor per round (1.1 × or more in 0 of 3 rounds)")
                && item.contains("asks netagent for 106 % of f0's rate; it reached 92 %")
                && item.contains("and 1.1 × floor in 0 of 3 rounds")
                && item.contains("(280 ns per ACK in this run's live stream)"),
            "{item}"
        );

        let mut met = Results::default();
        rounds(
            &mut met.samples,
            1,
            Metric::StreamGbps,
            [30.0, 25.0, 20.0, 28.0],
        );
        assert!(stream_limit(&met, 1).is_none());
    }

    #[test]
    fn live_program_time_is_one_row_per_workload() {
        let cost = |workload, program, runs, ns_per_run| live_cost::LiveCost {
            workload,
            program,
            runs,
            ns_per_run,
        };
        let r = Results {
            live_cost: vec![
                cost(Workload::Udp, "tap_ingress", 1000, 59.2),
                cost(Workload::Udp, "veth_ingress", 1000, 187.0),
                cost(Workload::Crr, "uplink_ingress", 50, 452.0),
            ],
            ..Results::default()
        };
        let mut o = String::new();
        render_live_cost(&mut o, &r);
        assert_eq!(
            row(&o, "| UDP small packets |"),
            "| UDP small packets | 59.2 (1000) | 187 (1000) | – | – |"
        );
        assert_eq!(
            row(&o, "| new TCP connections |"),
            "| new TCP connections | – | – | 452 (50) | – |"
        );
        let mut none = String::new();
        render_live_cost(&mut none, &Results::default());
        assert!(none.is_empty());
    }
}
