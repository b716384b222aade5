//! `cargo xtask test`: the whole suite, as CI runs it.

use std::process::Command;

use anyhow::Result;

use crate::{build_ebpf, debian, fuzz, run_cmd, stale_pins, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// Seconds each fuzz target runs after the suites (a smoke run proving the
    /// targets build and run); 0 skips it. Skipped with a test name filter.
    #[arg(long, default_value_t = 20)]
    pub fuzz_seconds: u64,
    /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    debian::install(debian::TEST_PACKAGES)?;
    stale_pins::sweep()?;
    build_ebpf::run(&build_ebpf::Options {})?;
    crate::guest::run(&crate::guest::Options {})?;
    let root = workspace_root();
    if opts.args.is_empty() {
        lint(&root)?;
    }
    // --no-fail-fast: one failing suite must not hide the others' results.
    let suites = run_cmd(
        Command::new("cargo")
            .args([
                "test",
                "--workspace",
                "--all-targets",
                "--no-fail-fast",
                "--",
            ])
            .args(&opts.args)
            .current_dir(&root),
    );
    // The fuzz smoke run even when a suite failed: it reports separately.
    let smoke = if opts.args.is_empty() && opts.fuzz_seconds > 0 {
        fuzz::run(&fuzz::Options {
            seconds: opts.fuzz_seconds,
            target: None,
        })
    } else {
        Ok(())
    };
    suites.and(smoke)
}

/// `cargo fmt --check` and clippy with warnings denied, as the project keeps them;
/// the eBPF crate (outside the workspace, on a toolchain without rustfmt) is
/// checked with the workspace's `rustfmt` and `rustfmt.toml`.
fn lint(root: &std::path::Path) -> Result<()> {
    run_cmd(
        Command::new("cargo")
            .args(["fmt", "--all", "--check"])
            .current_dir(root),
    )?;
    let mut ebpf_sources: Vec<_> = std::fs::read_dir(root.join("netagent-ebpf/src"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    ebpf_sources.sort();
    run_cmd(
        Command::new("rustfmt")
            .args(["--check", "--edition", "2024"])
            .args(&ebpf_sources)
            .current_dir(root),
    )?;
    run_cmd(
        Command::new("cargo")
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(root),
    )
}
