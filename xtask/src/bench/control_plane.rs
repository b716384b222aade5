//! Control plane: slot create/delete latency through the API (serial and 32
//! concurrent clients), time to create 1,000 slots, memory per slot, and the
//! seed's command sequence for one slot.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::Plan;
use super::agent::{self, Agent};
use super::legacy::{self, SeedTiming};
use super::proc;
use super::topology::Run;

/// First slot index used for control-plane probes (far above the scaling slots).
const PROBE_BASE: u32 = 20000;

/// What the control-plane measurements found. Latencies in ms.
#[derive(Debug, Default, Clone)]
pub struct ControlPlane {
    pub serial_create: Vec<f64>,
    pub serial_delete: Vec<f64>,
    pub conc_create: Vec<f64>,
    pub conc_delete: Vec<f64>,
    /// Slots created for the 1,000-slot run and its wall time (create, delete).
    pub bulk: Option<(u32, f64, f64)>,
    /// Memory around the bulk run.
    pub memory: Option<Memory>,
}

#[derive(Debug, Default, Clone)]
pub struct Memory {
    pub slots: u32,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// Drop of MemAvailable while the slots were created (kernel + agent), KiB.
    pub mem_available_drop_kib: i64,
    pub bpf_map_bytes_before: u64,
    pub bpf_map_bytes_after: u64,
    pub bpf_maps: usize,
}

fn ms(d: &[Duration]) -> Vec<f64> {
    d.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

fn meminfo_kib(key: &str) -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The agent's control plane (slots beyond the data-path slots, then removed).
pub fn measure_agent(plan: &Plan, agent: &Agent) -> Result<ControlPlane> {
    let mut cp = ControlPlane::default();
    let socket = agent.socket.clone();
    let serial = if plan.quick { 20 } else { 200 };
    let conc = if plan.quick { 64 } else { 512 };
    let bulk = if plan.quick { 200 } else { 1000 };

    // Serial: one request at a time.
    let base = PROBE_BASE;
    let (_, lat) = agent::create_range(&socket, base, base + serial - 1, 1)?;
    cp.serial_create = ms(&lat);
    let (_, lat) = agent::delete_range(&socket, base, base + serial - 1, 1)?;
    cp.serial_delete = ms(&lat);
    proc::check_interrupted()?;

    // 32 concurrent clients.
    let (_, lat) = agent::create_range(&socket, base, base + conc - 1, agent::BULK_CONCURRENCY)?;
    cp.conc_create = ms(&lat);
    let (_, lat) = agent::delete_range(&socket, base, base + conc - 1, agent::BULK_CONCURRENCY)?;
    cp.conc_delete = ms(&lat);
    proc::check_interrupted()?;

    // 1,000 slots at once, with memory around it.
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = agent.rss_kib().unwrap_or(0);
    let (maps_before, _) = agent.bpf_map_memory();
    let avail_before = meminfo_kib("MemAvailable:");
    let t0 = Instant::now();
    agent::create_range(&socket, base, base + bulk - 1, agent::BULK_CONCURRENCY)?;
    let create_s = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = agent.rss_kib().unwrap_or(0);
    let (maps_after, nmaps) = agent.bpf_map_memory();
    let avail_after = meminfo_kib("MemAvailable:");
    let t1 = Instant::now();
    agent::delete_range(&socket, base, base + bulk - 1, agent::BULK_CONCURRENCY)?;
    let delete_s = t1.elapsed().as_secs_f64();
    cp.bulk = Some((bulk, create_s, delete_s));
    cp.memory = Some(Memory {
        slots: bulk,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        mem_available_drop_kib: avail_before - avail_after,
        bpf_map_bytes_before: maps_before,
        bpf_map_bytes_after: maps_after,
        bpf_maps: nmaps,
    });
    Ok(cp)
}

/// The seed's create + delete sequence for one slot, `samples` times, in the
/// legacy host namespace (with whatever rules it holds at the moment).
pub fn measure_seed(run: &Run, host_ns: &str, samples: u32) -> Result<Vec<SeedTiming>> {
    let mut out = Vec::new();
    for i in 0..samples {
        proc::check_interrupted()?;
        out.push(legacy::seed_sequence(
            &run.prefix,
            host_ns,
            PROBE_BASE + 5000 + i,
        )?);
    }
    Ok(out)
}
