//! `cargo xtask build-ebpf`: the TC programs, for `bpfel-unknown-none`.

use std::process::Command;

use anyhow::Result;

use crate::{run_cmd, toolchain, workspace_root};

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> Result<()> {
    let nightly = toolchain::pinned_nightly()?;
    toolchain::ensure_nightly(&nightly)?;
    let linker_dir = toolchain::ensure_bpf_linker(&nightly)?;
    let root = workspace_root();
    let path = std::env::join_paths(std::iter::once(linker_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    eprintln!("xtask: building the eBPF object with {nightly}");
    run_cmd(
        Command::new("cargo")
            .arg(format!("+{nightly}"))
            .args(["build", "--release", "--target-dir"])
            .arg(root.join("target"))
            .current_dir(root.join("netagent-ebpf"))
            .env("PATH", path)
            // The outer cargo's settings would leak into the nightly build.
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    eprintln!(
        "xtask: eBPF object at {}",
        root.join("target/bpfel-unknown-none/release/netagent-ebpf")
            .display()
    );
    Ok(())
}
