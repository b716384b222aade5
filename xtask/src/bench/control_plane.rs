//! Control plane: slot create/delete latency through the API (serial and 32
//! concurrent clients), time to create 1,000 slots, memory per slot, and the
//! seed's command sequence for one slot.

use std::time::Duration;

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
    /// Slots created at once with 32 concurrent clients, and the wall time (s).
    pub bulk: Option<(u32, f64)>,
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
    pub bpf_progs_before: usize,
    pub bpf_progs_after: usize,
    pub fds_before: usize,
    pub fds_after: usize,
    pub bpf_prog_bytes_before: u64,
    pub bpf_prog_bytes_after: u64,
}

impl Memory {
    /// Growth per slot, KiB: (agent RSS, BPF maps, BPF programs).
    pub fn per_slot_kib(&self) -> (f64, f64, f64) {
        let per =
            |a: u64, b: u64, scale: f64| (b as f64 - a as f64) / scale / f64::from(self.slots);
        (
            per(self.rss_before_kib, self.rss_after_kib, 1.0),
            per(self.bpf_map_bytes_before, self.bpf_map_bytes_after, 1024.0),
            per(
                self.bpf_prog_bytes_before,
                self.bpf_prog_bytes_after,
                1024.0,
            ),
        )
    }
}

fn ms(d: &[Duration]) -> Vec<f64> {
    d.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

/// The agent's control plane (slots beyond the data-path slots, then removed).
/// Then creates slots up to `bulk_to` (kept for the scaling runs), timed, with the
/// memory before and after.
pub fn measure_agent(
    plan: &Plan,
    agent: &mut Agent,
    bulk_to: u32,
    budget: Duration,
) -> Result<ControlPlane> {
    let mut cp = ControlPlane::default();
    let socket = agent.socket.clone();
    let serial = if plan.quick { 20 } else { 100 };
    let conc = if plan.quick { 64 } else { 256 };

    // Many slots at once (the slots the scaling runs use next), first, so the
    // agent's memory is measured from a state with only slot 1.
    std::thread::sleep(Duration::from_millis(500));
    let from = agent.n;
    let rss_before = agent.rss_kib().unwrap_or(0);
    let fds_before = agent.fd_count();
    let (maps_before, _) = agent.bpf_map_memory();
    let progs_before = agent.bpf_prog_count();
    let prog_bytes_before = agent.bpf_prog_memory();
    let avail_before = agent::mem_available_kib() as i64;
    let scaled = agent.scale_to(bulk_to, budget);
    let took = scaled.as_ref().map(|(_, t)| *t).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(500));
    let made = agent.n - from;
    if made > 0 {
        let rss_after = agent.rss_kib().unwrap_or(0);
        let (maps_after, nmaps) = agent.bpf_map_memory();
        let avail_after = agent::mem_available_kib() as i64;
        cp.bulk = Some((made, took.as_secs_f64()));
        cp.memory = Some(Memory {
            slots: made,
            rss_before_kib: rss_before,
            rss_after_kib: rss_after,
            mem_available_drop_kib: avail_before - avail_after,
            bpf_map_bytes_before: maps_before,
            bpf_map_bytes_after: maps_after,
            bpf_maps: nmaps,
            bpf_progs_before: progs_before,
            bpf_progs_after: agent.bpf_prog_count(),
            fds_before,
            fds_after: agent.fd_count(),
            bpf_prog_bytes_before: prog_bytes_before,
            bpf_prog_bytes_after: agent.bpf_prog_memory(),
        });
    }
    scaled?;
    proc::check_interrupted()?;

    // Serial: one request at a time (with the bulk slots present).
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
