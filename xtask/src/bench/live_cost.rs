//! Program time in the live runs: one extra netagent run per data-path workload at
//! N = 1 with the kernel's per-program run-time statistics on, which gives each
//! program's time per run (`run_time_ns / run_cnt`, as `bpftool prog show`
//! reports them) under real traffic — cache misses, unclones of cloned skbs and
//! helper calls included, the redirect's delivery not. The statistics are turned
//! on with `BPF_ENABLE_STATS` (they stay on while its fd is open, and go off when
//! it closes, also if the bench dies), not with the machine-wide sysctl. They add
//! two clock reads to every program run, so these runs are not among the samples.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::topology::Worlds;
use super::workloads::{self, Workload};
use super::{Plan, stats::Path};

/// The programs of the agent, in path order.
pub const PROGRAMS: [&str; 4] = [
    "tap_ingress",
    "veth_ingress",
    "uplink_ingress",
    "slot_ingress",
];

/// One program's runs during one workload's run.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveCost {
    pub workload: Workload,
    pub program: &'static str,
    pub runs: u64,
    pub ns_per_run: f64,
}

/// The extra runs (see the module doc), for every workload of the plan.
pub fn measure(plan: &Plan, worlds: &Worlds) -> Result<Vec<LiveCost>> {
    let Some(world) = worlds.worlds.iter().find(|w| w.path == Path::Netagent) else {
        return Ok(Vec::new());
    };
    let _stats = enable_run_time_stats()?;
    let mut out = Vec::new();
    for &load in &plan.workloads {
        let before = snapshot()?;
        workloads::run_one(plan, world, load)
            .with_context(|| format!("{} with run-time statistics", load.name()))?;
        let after = snapshot()?;
        out.extend(deltas(load, &before, &after));
    }
    Ok(out)
}

/// Each program's (runs, ns) growth between two snapshots.
fn deltas(
    workload: Workload,
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) -> Vec<LiveCost> {
    PROGRAMS
        .iter()
        .filter_map(|&program| {
            let (n1, t1) = *after.get(program)?;
            let (n0, t0) = before.get(program).copied().unwrap_or((0, 0));
            let runs = n1.checked_sub(n0)?;
            (runs > 0).then(|| LiveCost {
                workload,
                program,
                runs,
                ns_per_run: t1.saturating_sub(t0) as f64 / runs as f64,
            })
        })
        .collect()
}

/// `bpf(BPF_ENABLE_STATS, { .type = BPF_STATS_RUN_TIME })`: the statistics
/// are on while the returned fd is open.
fn enable_run_time_stats() -> Result<OwnedFd> {
    #[cfg(target_arch = "x86_64")]
    const SYS_BPF: std::ffi::c_long = 321;
    #[cfg(target_arch = "aarch64")]
    const SYS_BPF: std::ffi::c_long = 280;
    const BPF_ENABLE_STATS: std::ffi::c_long = 32;
    unsafe extern "C" {
        fn syscall(number: std::ffi::c_long, ...) -> std::ffi::c_long;
    }
    // `union bpf_attr`'s `enable_stats` member: one u32, type 0
    // (BPF_STATS_RUN_TIME); the rest of the attr the kernel reads must be zero.
    let attr = [0u64; 16];
    // SAFETY: bpf(2) with a zeroed attr of the size passed, which it only reads.
    let fd = unsafe {
        syscall(
            SYS_BPF,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr) as std::ffi::c_uint,
        )
    };
    if fd < 0 {
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `run_cnt` and `run_time_ns` of the agent's programs (summed by name), from
/// `bpftool prog show`.
fn snapshot() -> Result<BTreeMap<String, (u64, u64)>> {
    // Programs are not per namespace: any namespace sees them all.
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .context("bpftool prog show")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(parse_prog_show(&String::from_utf8_lossy(&out.stdout)))
}

/// The programs named in `PROGRAMS` in `bpftool prog show`'s plain output
/// ("ID: TYPE  name NAME  tag … run_time_ns T run_cnt N" on the first line of
/// each program): name → (runs, ns).
fn parse_prog_show(text: &str) -> BTreeMap<String, (u64, u64)> {
    let mut seen = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .copied()
        };
        let Some(name) = after("name").filter(|n| PROGRAMS.contains(n)) else {
            continue;
        };
        let number = |key: &str| after(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let e = seen.entry(name.to_string()).or_insert((0, 0));
        e.0 += number("run_cnt");
        e.1 += number("run_time_ns");
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prog_show_lines_are_summed_by_name_and_differenced() {
        let before = parse_prog_show(
            "12: sched_cls  name veth_ingress  tag 0123456789abcdef  gpl run_time_ns 1000 run_cnt 10\n\
             \tloaded_at 2026-11-29T00:00:00+0000  uid 0\n\
             13: sched_cls  name tap_ingress  tag 0123456789abcdef  gpl\n\
             14: sched_cls  name other_prog  tag 0123456789abcdef  gpl run_time_ns 5 run_cnt 5\n",
        );
        assert_eq!(before.get("veth_ingress"), Some(&(10, 1000)));
        assert_eq!(before.get("tap_ingress"), Some(&(0, 0)));
        assert!(!before.contains_key("other_prog"));
        let after = parse_prog_show(
            "12: sched_cls  name veth_ingress  tag 0123456789abcdef  gpl run_time_ns 31000 run_cnt 110\n\
             13: sched_cls  name tap_ingress  tag 0123456789abcdef  gpl run_time_ns 50 run_cnt 1\n\
             20: sched_cls  name tap_ingress  tag 0123456789abcdef  gpl run_time_ns 150 run_cnt 1\n",
        );
        assert_eq!(
            deltas(Workload::Udp, &before, &after),
            vec![
                LiveCost {
                    workload: Workload::Udp,
                    program: "tap_ingress",
                    runs: 2,
                    ns_per_run: 100.0
                },
                LiveCost {
                    workload: Workload::Udp,
                    program: "veth_ingress",
                    runs: 100,
                    ns_per_run: 300.0
                },
            ]
        );
    }
}
