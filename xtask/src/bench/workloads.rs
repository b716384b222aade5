//! The data-path workloads, run in alternating rounds over the paths.
//!
//! Each round runs every workload once on every path, the path order rotating from
//! round to round so that drift (thermal, noisy neighbours) spreads evenly.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::Plan;
use super::Results;
use super::proc::{self, Side, ns_cmd, ns_cmd_on, run_bounded};
use super::stats::{Metric, Sample};
use super::tools::field;
use super::topology::{CRR_PORT, IPERF_PORT, SERVER_IP, SOCKPERF_PORT, UDP_PORT, World, Worlds};

/// TCP MSS of the small-MSS stream (per-packet cost shows).
pub const SMALL_MSS: u32 = 536;
/// UDP payload of the small-packet test (a 60-byte frame).
pub const UDP_PAYLOAD: usize = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// sockperf TCP ping-pong: RTT p50/p99/min.
    Rr,
    /// iperf3 one TCP stream.
    Stream,
    /// iperf3 one TCP stream with a small MSS.
    StreamMss,
    /// Small UDP datagrams per second (in-tree blaster and sink).
    Udp,
    /// New TCP connections per second: connect, 1 request, close.
    Crr,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Rr,
        Workload::Stream,
        Workload::StreamMss,
        Workload::Udp,
        Workload::Crr,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Rr => "rr",
            Workload::Stream => "stream",
            Workload::StreamMss => "stream-mss",
            Workload::Udp => "udp",
            Workload::Crr => "crr",
        }
    }

    /// What the workload is, for the report.
    pub fn label(self) -> &'static str {
        match self {
            Workload::Rr => "TCP ping-pong",
            Workload::Stream => "TCP stream",
            Workload::StreamMss => "TCP stream, small MSS",
            Workload::Udp => "UDP small packets",
            Workload::Crr => "new TCP connections",
        }
    }
}

/// Runs `loads` on every world for `rounds` rounds at slot count `n`.
pub fn alternate(
    plan: &Plan,
    worlds: &Worlds,
    n: u32,
    loads: &[Workload],
    rounds: u32,
    results: &mut Results,
) -> Result<()> {
    let paths: Vec<&World> = worlds.worlds.iter().collect();
    for round in 0..rounds {
        for &load in loads {
            for i in 0..paths.len() {
                let w = paths[(i + round as usize) % paths.len()];
                proc::check_interrupted()?;
                let t0 = std::time::Instant::now();
                let profiler = match &plan.perf {
                    Some(dir) => Some(profile(dir, plan, n, w, load, round)?),
                    None => None,
                };
                let outcome = run_one(plan, w, load);
                if let Some(mut p) = profiler {
                    p.wait().context("waiting for perf record")?;
                }
                match outcome {
                    Ok((values, notes)) => {
                        for note in notes {
                            let msg = format!(
                                "N={n} round {} {} on {}: {note}",
                                round + 1,
                                load.name(),
                                w.path.name()
                            );
                            eprintln!("bench: {msg}");
                            results.notes.push(msg);
                        }
                        eprintln!(
                            "bench: N={n} round {} {:<10} {:<8} {} ({:.1}s)",
                            round + 1,
                            load.name(),
                            w.path.name(),
                            values
                                .iter()
                                .map(|(m, v)| format!("{m:?}={v:.2}"))
                                .collect::<Vec<_>>()
                                .join(" "),
                            t0.elapsed().as_secs_f64()
                        );
                        for (metric, value) in values {
                            results.samples.push(Sample {
                                path: w.path,
                                n,
                                metric,
                                round,
                                value,
                            });
                        }
                    }
                    Err(e) => {
                        proc::check_interrupted()?;
                        let msg = format!(
                            "N={n} round {} {} on {}: {e:#}",
                            round + 1,
                            load.name(),
                            w.path.name()
                        );
                        eprintln!("bench: FAILED {msg}");
                        results.notes.push(format!("failed: {msg}"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Starts `perf record -a -g` for the length of one run (`--perf`).
fn profile(
    dir: &std::path::Path,
    plan: &Plan,
    n: u32,
    w: &World,
    load: Workload,
    round: u32,
) -> Result<std::process::Child> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(format!(
        "{n}-{}-{}-r{}.data",
        w.path.name(),
        load.name(),
        round + 1
    ));
    std::process::Command::new("perf")
        .args(["record", "-q", "-a", "-g", "-o"])
        .arg(&file)
        .args(["--", "sleep", &plan.duration.as_secs().to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting perf record (is perf installed?)")
}

/// What one run measured, and anything worth a note.
pub(super) type RunOutcome = (Vec<(Metric, f64)>, Vec<String>);

/// Runs one workload on one path.
pub(super) fn run_one(plan: &Plan, w: &World, load: Workload) -> Result<RunOutcome> {
    let secs = plan.duration.as_secs();
    let limit = plan.duration + Duration::from_secs(30);
    match load {
        Workload::Rr => {
            let out = run_bounded(
                ns_cmd_on(&w.guest, Side::Client, "sockperf").args([
                    "ping-pong",
                    "--tcp",
                    "-i",
                    SERVER_IP,
                    "-p",
                    &SOCKPERF_PORT.to_string(),
                    "-t",
                    &secs.to_string(),
                ]),
                limit,
            )?;
            Ok((
                parse_sockperf(&out.stdout).or_else(|_| parse_sockperf(&out.stderr))?,
                Vec::new(),
            ))
        }
        Workload::Stream | Workload::StreamMss => {
            let mut cmd = ns_cmd_on(&w.guest, Side::Client, "iperf3");
            cmd.args([
                "-c",
                SERVER_IP,
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &secs.to_string(),
                "-J",
            ]);
            let metric = if load == Workload::StreamMss {
                cmd.args(["-M", &SMALL_MSS.to_string()]);
                Metric::StreamMssGbps
            } else {
                Metric::StreamGbps
            };
            let out = run_bounded(&mut cmd, limit)?;
            Ok((
                vec![(metric, parse_iperf_received(&out.stdout)? / 1e9)],
                Vec::new(),
            ))
        }
        Workload::Udp => udp(plan, w).map(|kpps| (vec![(Metric::UdpKpps, kpps)], Vec::new())),
        Workload::Crr => {
            let xtask = std::env::current_exe()?;
            let out = run_bounded(
                ns_cmd_on(&w.guest, Side::Client, &xtask.to_string_lossy()).args([
                    "bench",
                    "crr-client",
                    "--connect",
                    &format!("{SERVER_IP}:{CRR_PORT}"),
                    "--seconds",
                    &secs.to_string(),
                ]),
                limit,
            )?;
            let rate = field(&out.stdout, "rate").context("crr-client printed no rate")?;
            let failed = field(&out.stdout, "failed").unwrap_or(0.0);
            let mut notes = Vec::new();
            if failed > 0.0 {
                // Each failure cost a 2 s connect timeout; the rate includes that.
                notes.push(format!(
                    "{failed} of {} connections failed (connect or answer timed out)",
                    failed + field(&out.stdout, "conns").unwrap_or(0.0)
                ));
            }
            Ok((vec![(Metric::CrrPerSec, rate)], notes))
        }
    }
}

/// Small UDP datagrams: a sink in the wan counts what arrives while the guest
/// blasts; the rate is what was received.
fn udp(plan: &Plan, w: &World) -> Result<f64> {
    let xtask = std::env::current_exe()?.to_string_lossy().into_owned();
    let secs = plan.duration.as_secs_f64();
    let wan = w.wan.clone();
    let sink_xtask = xtask.clone();
    let sink = std::thread::spawn(move || {
        run_bounded(
            ns_cmd_on(&wan, Side::Server, &sink_xtask).args([
                "bench",
                "udp-sink",
                "--listen",
                &format!("{SERVER_IP}:{UDP_PORT}"),
                "--seconds",
                &format!("{}", secs + 15.0),
            ]),
            Duration::from_secs_f64(secs + 30.0),
        )
    });
    let wan = w.wan.clone();
    proc::wait_until("udp sink", Duration::from_secs(10), || {
        proc::run_bounded_any(ns_cmd(&wan, "ss").args(["-Huln"]), Duration::from_secs(5))
            .map(|o| o.stdout.contains(&format!("{SERVER_IP}:{UDP_PORT}")))
            .unwrap_or(false)
    })?;
    let blast = run_bounded(
        ns_cmd_on(&w.guest, Side::Client, &xtask).args([
            "bench",
            "udp-blast",
            "--connect",
            &format!("{SERVER_IP}:{UDP_PORT}"),
            "--seconds",
            &format!("{secs}"),
            "--size",
            &UDP_PAYLOAD.to_string(),
        ]),
        Duration::from_secs_f64(secs + 30.0),
    );
    let sink = sink
        .join()
        .map_err(|_| anyhow::anyhow!("udp sink thread panicked"))??;
    blast?;
    let rate = field(&sink.stdout, "rate").context("udp-sink printed no rate")?;
    if rate <= 0.0 {
        bail!("no datagram arrived");
    }
    Ok(rate / 1000.0)
}

/// p50, p99 and min from sockperf's ping-pong summary.
pub fn parse_sockperf(text: &str) -> Result<Vec<(Metric, f64)>> {
    let value = |marker: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.contains(marker))
            .and_then(|l| l.rsplit('=').next())
            .map(|v| strip_ansi(v).trim().to_string())
            .and_then(|v| v.parse().ok())
    };
    match (
        value("percentile 50.000"),
        value("percentile 99.000"),
        value("<MIN> observation"),
    ) {
        (Some(p50), Some(p99), Some(min)) => Ok(vec![
            (Metric::RttP50, p50),
            (Metric::RttP99, p99),
            (Metric::RttMin, min),
        ]),
        _ => bail!("no percentiles in sockperf output"),
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The receiver's bits per second from `iperf3 -J`.
pub fn parse_iperf_received(json: &str) -> Result<f64> {
    let at = json
        .find("\"sum_received\"")
        .context("iperf3 output has no sum_received")?;
    let rest = &json[at..];
    let key = "\"bits_per_second\":";
    let v = rest
        .find(key)
        .context("iperf3 output has no bits_per_second")?;
    let num: String = rest[v + key.len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        .collect();
    num.parse()
        .with_context(|| format!("bad bits_per_second {num:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockperf_summary() {
        let text = "sockperf: ---> <MAX> observation = 2147.197\n\
                    sockperf: ---> percentile 99.000 =   28.109\n\
                    sockperf: ---> percentile 50.000 =   17.517\n\
                    sockperf: ---> <MIN> observation =    6.296\n";
        let v = parse_sockperf(text).unwrap();
        assert_eq!(v[0], (Metric::RttP50, 17.517));
        assert_eq!(v[1], (Metric::RttP99, 28.109));
        assert_eq!(v[2], (Metric::RttMin, 6.296));
    }

    #[test]
    fn iperf_received() {
        let json = r#"{"end":{"sum_sent":{"bits_per_second":	9.0},"sum_received":{"seconds":2,"bits_per_second":	34255725563.6}}}"#;
        assert_eq!(parse_iperf_received(json).unwrap(), 34255725563.6);
    }
}
