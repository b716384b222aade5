//! Project automation: `cargo xtask <command>`.
//!
//! Everything a fresh machine needs is installed from here: the pinned nightly with
//! `rust-src`, `bpf-linker` built against that nightly's LLVM, and the Debian
//! packages the tests and benchmarks use.

mod bench;
mod build_ebpf;
mod debian;
mod fuzz;
mod guest;
mod soak;
mod stale_pins;
mod test;
mod toolchain;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "netagent project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object (installs the pinned nightly and bpf-linker if missing).
    BuildEbpf(build_ebpf::Options),
    /// Install everything, build, and run the whole test suite (unit, BPF, root
    /// integration, end to end). This is what CI runs.
    Test(test::Options),
    /// Install the Debian packages used by tests and benchmarks.
    Deps,
    /// Benchmark f0, floor, legacy (iptables) and netagent paths (docs/BENCHMARKS.md).
    Bench(Box<bench::Options>),
    /// Prepare the end-to-end tests' microVM guest (kernel + initramfs) in target/guest.
    Guest(guest::Options),
    /// Create/delete churn at full scale against a real agent; fails on any leak.
    Soak(soak::Options),
    /// Run the cargo-fuzz targets of the shared packet code (netagent-common/fuzz).
    Fuzz(fuzz::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf(opts) => build_ebpf::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::Deps => debian::install(debian::TEST_PACKAGES),
        Command::Bench(opts) => bench::run(&opts),
        Command::Guest(opts) => guest::run(&opts),
        Command::Soak(opts) => soak::run(&opts),
        Command::Fuzz(opts) => fuzz::run(&opts),
    }
}

/// The workspace root (xtask sits one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Runs a command, echoing it first, and fails with its status.
pub fn run_cmd(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("cannot start `{}`: {e}", describe(cmd)))?;
    anyhow::ensure!(status.success(), "`{}` failed: {status}", describe(cmd));
    Ok(())
}

/// A command as a shell-like line, for messages.
pub fn describe(cmd: &std::process::Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}
