//! `cargo xtask bench`: f0, floor, legacy (the seed's iptables rules) and netagent
//! (the eBPF datapath) measured in one run, in alternating rounds, each on its own
//! throwaway namespace chain (DESIGN §6, issue 4).
//!
//! Every namespace the bench makes carries a per-run prefix (`xb` + 4 hex digits)
//! and is removed at the end, also on error and on Ctrl-C; a run killed hard is
//! cleaned up by the next one (pid files under [`RUN_DIR`]). Servers listen only on
//! 198.18.0.0/15 inside the wan namespaces. The machine's real network is never
//! touched.
//!
//! One concern per file: `topology` (namespaces and veth chains), `proc` (bounded
//! child processes, Ctrl-C), `legacy` (the seed's rules and command sequence),
//! `agent` (the netagent daemon and its API), `workloads` (sockperf, iperf3 and the
//! in-tree tools), `tools` (the connection-rate and UDP tools themselves),
//! `control_plane`, `prog_cost`, `stats`, `report`, `chart`.

mod agent;
mod chart;
mod control_plane;
mod legacy;
mod live_cost;
mod proc;
mod prog_cost;
mod report;
mod stats;
mod tools;
mod topology;
mod workloads;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{debian, workspace_root};
use stats::{Path, Sample};
use workloads::Workload;

/// Where pid files and sockets of running benches live.
pub const RUN_DIR: &str = "/run/netagent-bench";

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Smoke run: short workloads, two rounds, N = 1 only, small control-plane
    /// sample; writes its report under target/bench/ unless --out is given.
    #[arg(long)]
    pub quick: bool,
    /// Workloads to run (comma separated): rr, stream, stream-mss, udp, crr.
    #[arg(long, value_delimiter = ',')]
    pub workloads: Option<Vec<Workload>>,
    /// Paths to compare (comma separated): f0, floor, legacy, netagent.
    #[arg(long, value_delimiter = ',')]
    pub paths: Option<Vec<Path>>,
    /// Slot counts for the scaling runs (comma separated), e.g. 1,1000,10000.
    #[arg(long, value_delimiter = ',')]
    pub slots: Option<Vec<u32>>,
    /// Workloads measured at N > 1 (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub scale_workloads: Option<Vec<Workload>>,
    /// Alternating rounds at the first (smallest) N, where every target ratio is
    /// judged: more rounds make the medians steadier on a noisy machine.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Alternating rounds at the larger N of the scaling runs.
    #[arg(long)]
    pub scale_rounds: Option<u32>,
    /// Seconds per workload run.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Seconds allowed for creating the agent's slots of one N (it stops there and
    /// the report says how many were real).
    #[arg(long)]
    pub scale_budget: Option<u64>,
    /// Skip the control-plane measurements.
    #[arg(long)]
    pub no_control_plane: bool,
    /// Skip the program costs: BPF_PROG_TEST_RUN, and the extra netagent runs
    /// with the kernel's run-time statistics (program time in the live runs).
    #[arg(long)]
    pub no_prog_cost: bool,
    /// Report path (Markdown); the chart goes next to it as bench.svg.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Profile every data-path run: `perf record -a -g` for the run's length, one
    /// file per run in this directory (`N-path-workload-rROUND.data`). The profiler
    /// costs every path alike; use it to find where time goes, not for the figures.
    #[arg(long)]
    pub perf: Option<PathBuf>,
    /// Internal: the in-tree benchmark tools, run inside namespaces.
    #[command(subcommand)]
    pub tool: Option<tools::Tool>,
}

/// The resolved plan of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub workloads: Vec<Workload>,
    pub scale_workloads: Vec<Workload>,
    pub paths: Vec<Path>,
    pub slots: Vec<u32>,
    pub rounds: u32,
    pub scale_rounds: u32,
    pub duration: Duration,
    pub control_plane: bool,
    pub prog_cost: bool,
    pub scale_budget: Duration,
    pub out: PathBuf,
    pub perf: Option<PathBuf>,
}

impl Plan {
    fn from_options(o: &Options) -> Plan {
        let root = workspace_root();
        let default_out = if o.quick {
            root.join("target/bench/BENCHMARKS.md")
        } else {
            root.join("docs/BENCHMARKS.md")
        };
        let mut slots = o.slots.clone().unwrap_or_else(|| {
            if o.quick {
                vec![1]
            } else {
                vec![1, 1000, 10000]
            }
        });
        slots.sort_unstable();
        slots.dedup();
        Plan {
            quick: o.quick,
            workloads: o
                .workloads
                .clone()
                .unwrap_or_else(|| Workload::ALL.to_vec()),
            scale_workloads: o
                .scale_workloads
                .clone()
                .unwrap_or_else(|| vec![Workload::Rr, Workload::Stream, Workload::Crr]),
            paths: o.paths.clone().unwrap_or_else(|| Path::ALL.to_vec()),
            slots,
            rounds: o.rounds.unwrap_or(if o.quick { 2 } else { 9 }).max(1),
            scale_rounds: o
                .scale_rounds
                .or(o.rounds)
                .unwrap_or(if o.quick { 2 } else { 5 })
                .max(1),
            duration: Duration::from_secs(o.duration.unwrap_or(if o.quick { 2 } else { 3 }).max(1)),
            control_plane: !o.no_control_plane,
            prog_cost: !o.no_prog_cost,
            scale_budget: Duration::from_secs(o.scale_budget.unwrap_or(if o.quick {
                60
            } else {
                300
            })),
            out: o.out.clone().unwrap_or(default_out),
            perf: o.perf.clone(),
        }
    }
}

/// Everything one run measured, handed to the report.
#[derive(Debug, Default)]
pub struct Results {
    pub samples: Vec<Sample>,
    /// For each N, how many real netagent slots existed (created through the API).
    pub real_slots: Vec<(u32, u32)>,
    pub control: Option<control_plane::ControlPlane>,
    pub prog_cost: Vec<prog_cost::ProgCost>,
    /// The agent's programs' time per run under each workload (N = 1).
    pub live_cost: Vec<live_cost::LiveCost>,
    /// The seed's command sequence for one slot, timed with N slots' rules present.
    pub seed: Vec<(u32, Vec<legacy::SeedTiming>)>,
    /// The agent's slot creations for the scaling runs: (N, slots reached, wall time).
    pub scale_steps: Vec<(u32, u32, Duration)>,
    pub notes: Vec<String>,
    pub elapsed: Duration,
    /// netagent's slot 1 counters (JSON) at the end of the data-path runs.
    pub agent_counters: Option<String>,
    /// /proc/loadavg (1, 5, 15 min) when the run started.
    pub load_start: String,
}

pub fn run(opts: &Options) -> Result<()> {
    if let Some(tool) = &opts.tool {
        return tools::run(tool);
    }
    let plan = Plan::from_options(opts);
    anyhow::ensure!(
        nix_is_root(),
        "cargo xtask bench needs root (it builds network namespaces)"
    );
    debian::install(debian::TEST_PACKAGES)?;
    proc::install_signal_handlers();
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("create {RUN_DIR}"))?;
    topology::clean_stale_runs();
    let bins = build(&plan)?;

    let started = Instant::now();
    let run = topology::Run::new()?;
    eprintln!("bench: run prefix {} plan {plan:?}", run.prefix);
    let mut results = Results {
        load_start: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        ..Results::default()
    };
    // The worlds outlive `measure` so the report is written before the (slow, with
    // thousands of slots) teardown.
    let mut worlds = None;
    let outcome = measure(&plan, &bins, &run, &mut results, &mut worlds);
    results.elapsed = started.elapsed();
    if let Err(e) = &outcome {
        results.notes.push(format!("run aborted early: {e:#}"));
    }
    if !results.samples.is_empty() {
        let mut plan = plan.clone();
        if outcome.is_err() && opts.out.is_none() {
            // Never overwrite the committed report with a partial run.
            plan.out = workspace_root().join("target/bench/BENCHMARKS-partial.md");
        }
        let plan = &plan;
        let conditions = report::Conditions::collect(plan);
        let md = report::render(plan, &conditions, &results);
        if let Some(dir) = plan.out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&plan.out, md).with_context(|| format!("write {}", plan.out.display()))?;
        let svg_path = plan.out.with_file_name("bench.svg");
        std::fs::write(&svg_path, chart::render(plan, &results))?;
        eprintln!(
            "bench: report {} chart {}",
            plan.out.display(),
            svg_path.display()
        );
        let csv_path = workspace_root().join("target/bench/samples.csv");
        std::fs::create_dir_all(csv_path.parent().expect("has a parent"))?;
        std::fs::write(&csv_path, stats::csv(&results.samples))?;
        print!("{}", report::summary(plan, &results));
    }
    eprintln!("bench: tearing down (stops the daemon, removes every namespace of the run)");
    drop(worlds); // servers, then the daemon (which deletes its slots)
    drop(run); // every namespace of the prefix
    outcome
}

/// Paths of the binaries the bench runs.
pub struct Bins {
    /// This xtask binary (for the in-tree tools).
    pub xtask: PathBuf,
    /// `target/release/netagent`, when it builds and the netagent path is wanted.
    pub netagent: Option<PathBuf>,
}

fn build(plan: &Plan) -> Result<Bins> {
    let xtask = std::env::current_exe().context("locate the xtask binary")?;
    let mut netagent = None;
    if plan.paths.contains(&Path::Netagent) {
        let root = workspace_root();
        let built = crate::build_ebpf::run(&crate::build_ebpf::Options {}).and_then(|()| {
            crate::run_cmd(
                std::process::Command::new("cargo")
                    .args(["build", "--release", "-p", "netagent"])
                    .current_dir(&root),
            )
        });
        match built {
            Ok(()) => netagent = Some(root.join("target/release/netagent")),
            Err(e) => eprintln!("bench: netagent does not build, its path is skipped: {e:#}"),
        }
    }
    Ok(Bins { xtask, netagent })
}

fn measure(
    plan: &Plan,
    bins: &Bins,
    run: &topology::Run,
    results: &mut Results,
    keep: &mut Option<topology::Worlds>,
) -> Result<()> {
    let worlds = keep.insert(topology::Worlds::build(run, plan, bins, results)?);
    if plan.prog_cost
        && let Some(agent) = worlds.agent.as_ref()
    {
        match prog_cost::measure(run, agent, plan) {
            Ok(costs) => results.prog_cost = costs,
            Err(e) => results
                .notes
                .push(format!("program cost not measured: {e:#}")),
        }
    }
    for (i, &n) in plan.slots.iter().enumerate() {
        proc::check_interrupted()?;
        worlds.scale_to(n, plan.scale_budget, results)?;
        if plan.control_plane
            && let Some(legacy) = worlds.legacy.as_ref()
        {
            let samples = match (i, plan.quick) {
                (0, true) => 3,
                (0, false) => 20,
                (_, true) => 1,
                (_, false) => 3,
            };
            match control_plane::measure_seed(run, legacy.host_ns(), samples) {
                Ok(t) => results.seed.push((n, t)),
                Err(e) => results
                    .notes
                    .push(format!("seed sequence at N={n} failed: {e:#}")),
            }
        }
        let (loads, rounds) = if i == 0 {
            (&plan.workloads, plan.rounds)
        } else {
            (&plan.scale_workloads, plan.scale_rounds)
        };
        workloads::alternate(plan, worlds, n, loads, rounds, results)?;
        if i == 0 && plan.prog_cost {
            proc::check_interrupted()?;
            match live_cost::measure(plan, worlds) {
                Ok(costs) => results.live_cost = costs,
                Err(e) => results
                    .notes
                    .push(format!("program time in the live runs not measured: {e:#}")),
            }
        }
        // The agent's control plane with few slots present; it ends by creating
        // the next N's slots at once (timed, memory measured around it).
        if i == 0
            && plan.control_plane
            && let Some(agent) = worlds.agent.as_mut()
        {
            proc::check_interrupted()?;
            let bulk_to = plan
                .slots
                .get(1)
                .copied()
                .unwrap_or(if plan.quick { 100 } else { 1000 });
            match control_plane::measure_agent(plan, agent, bulk_to, plan.scale_budget) {
                Ok(cp) => results.control = Some(cp),
                Err(e) => results
                    .notes
                    .push(format!("agent control plane not measured: {e:#}")),
            }
        }
    }
    if let Some(agent) = worlds.agent.as_ref()
        && let Ok(a) = agent.request("GET", "/v1/slots/1/stats", None)
    {
        results.agent_counters = Some(a.body.trim().to_string());
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
