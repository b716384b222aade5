//! `cargo xtask soak`: the churn of `tests/tests/churn.rs` at full scale against a
//! real `netagent up` in a throwaway world (its ignored `soak` test): `--cycles`
//! create/delete cycles in all, half of them of one slot serially, the other half
//! spread over `--concurrency` workers (each on its own slot), traffic through a veth guest in
//! every tenth cycle of the serial loop and of the first four workers. It prints
//! the cycles run, every leak found (namespaces, links, addresses, routes, TCX
//! attachments, pins, map entries, the agent's fds and threads), the agent's RSS
//! and fd count at start and end, and create/delete p50/p99; it fails on any leak
//! or when the RSS is not flat.

use std::process::Command;

use anyhow::Result;

use crate::{build_ebpf, run_cmd, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// Create/delete cycles in all (half serial, half concurrent).
    #[arg(long, default_value_t = 10_000)]
    pub cycles: usize,
    /// Concurrent workers of the concurrent phase.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Count new system-wide BPF programs, links and maps as leaks too (only
    /// meaningful on a machine where nothing else loads BPF meanwhile).
    #[arg(long)]
    pub strict_global: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    anyhow::ensure!(opts.cycles > 0 && opts.concurrency > 0, "nothing to do");
    build_ebpf::run(&build_ebpf::Options {})?;
    let root = workspace_root();
    let mut cmd = Command::new("cargo");
    cmd.args([
        "test",
        "--release",
        "-p",
        "netagent-tests",
        "--test",
        "churn",
        "--",
        "--ignored",
        "--exact",
        "soak",
        "--nocapture",
    ])
    .env("NETAGENT_SOAK_CYCLES", opts.cycles.to_string())
    .env("NETAGENT_SOAK_CONCURRENCY", opts.concurrency.to_string())
    .current_dir(&root);
    if opts.strict_global {
        cmd.env("NETAGENT_SOAK_STRICT_GLOBAL", "1");
    }
    run_cmd(&mut cmd)
}
