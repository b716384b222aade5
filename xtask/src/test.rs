//! `cargo xtask test`: the whole suite, as CI runs it.

use std::process::Command;

use anyhow::Result;

use crate::{build_ebpf, debian, run_cmd, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    debian::install(debian::TEST_PACKAGES)?;
    build_ebpf::run(&build_ebpf::Options {})?;
    crate::guest::run(&crate::guest::Options {})?;
    let root = workspace_root();
    if opts.args.is_empty() {
        lint(&root)?;
    }
    // --no-fail-fast: one failing suite must not hide the others' results.
    run_cmd(
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
    )
}

/// `cargo fmt --check` and clippy with warnings denied, as the project keeps them.
fn lint(root: &std::path::Path) -> Result<()> {
    run_cmd(
        Command::new("cargo")
            .args(["fmt", "--all", "--check"])
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
