//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `netagent-common/fuzz`
//! (the shared packet parser and rewrites, see its fuzz_targets/) for a fixed
//! time each. Installs cargo-fuzz (cached like bpf-linker) and uses the pinned
//! nightly of the eBPF crate, which has the sanitizer support libFuzzer needs.
//! The working corpus grows in `target/fuzz-corpus/<target>` across runs; the
//! committed seeds (`netagent-common/fuzz/seeds/<target>`) are read each time.
//! A failing input is saved under `netagent-common/fuzz/artifacts/<target>/`.

use std::process::Command;

use anyhow::{Result, ensure};

use crate::{debian, run_cmd, toolchain, workspace_root};

/// Every fuzz target, as named in `netagent-common/fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["parse", "rewrite"];

#[derive(clap::Args)]
pub struct Options {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Run only this target (default: every one).
    #[arg(long)]
    pub target: Option<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    let targets: Vec<&str> = match &opts.target {
        Some(t) => {
            ensure!(
                TARGETS.contains(&t.as_str()),
                "unknown fuzz target `{t}`; the targets are: {}",
                TARGETS.join(", ")
            );
            vec![t.as_str()]
        }
        None => TARGETS.to_vec(),
    };
    ensure!(opts.seconds > 0, "--seconds must be at least 1");
    let nightly = toolchain::pinned_nightly()?;
    toolchain::ensure_nightly(&nightly)?;
    // libfuzzer-sys compiles libFuzzer's C++ sources.
    debian::install(&[("g++", "/usr/bin/g++")])?;
    let fuzz_bin = toolchain::ensure_cargo_fuzz()?;
    let root = workspace_root();
    let fuzz_dir = root.join("netagent-common/fuzz");
    let path = std::env::join_paths(std::iter::once(fuzz_bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    for target in targets {
        let corpus = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        eprintln!("xtask: fuzzing `{target}` for {} s", opts.seconds);
        run_cmd(
            Command::new("cargo")
                .arg(format!("+{nightly}"))
                .args(["fuzz", "run", "--target-dir"])
                .arg(root.join("target/fuzz"))
                .arg(target)
                .arg(&corpus)
                .arg(fuzz_dir.join("seeds").join(target))
                .arg("--")
                .arg(format!("-max_total_time={}", opts.seconds))
                .arg("-print_final_stats=1")
                .current_dir(&fuzz_dir)
                .env("PATH", &path)
                // The outer cargo's settings would leak into the nightly build.
                .env_remove("RUSTC")
                .env_remove("RUSTC_WRAPPER")
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO_TARGET_DIR"),
        )?;
    }
    Ok(())
}
