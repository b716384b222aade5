//! The eBPF toolchain: a pinned nightly with `rust-src`, and `bpf-linker` built
//! against that nightly's own libLLVM (no prebuilt binary can be downloaded, and
//! Debian's LLVM is too old); and `cargo-fuzz` for the fuzz targets. All are
//! installed on first use and cached.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{run_cmd, workspace_root};

/// bpf-linker release line known to work with the pinned nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13";
/// cargo-fuzz release line (builds with the stable toolchain).
const CARGO_FUZZ_VERSION: &str = "0.13";

/// The nightly named in `netagent-ebpf/rust-toolchain.toml`.
pub fn pinned_nightly() -> Result<String> {
    let path = workspace_root().join("netagent-ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .find_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("channel")?.trim_start().strip_prefix('=')?;
            Some(rest.trim().trim_matches('"').to_string())
        })
        .with_context(|| format!("no `channel = ...` in {}", path.display()))
}

/// Installs the pinned nightly with `rust-src` unless it is there already.
pub fn ensure_nightly(nightly: &str) -> Result<()> {
    let has_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", nightly])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if has_src {
        return Ok(());
    }
    eprintln!("xtask: installing toolchain {nightly} with rust-src (about a minute, once)");
    run_cmd(Command::new("rustup").args([
        "toolchain",
        "install",
        nightly,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

/// Where tools built for this project are cached across clones.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NETAGENT_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| workspace_root().join("target"));
    base.join("netagent-tools")
}

/// Returns the directory holding a `bpf-linker` built against `nightly`'s LLVM,
/// building it first if needed.
pub fn ensure_bpf_linker(nightly: &str) -> Result<PathBuf> {
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{nightly}"))
            .arg("--print")
            .arg("sysroot"),
    )?;
    let version = output(Command::new("rustc").arg(format!("+{nightly}")).arg("-vV"))?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV does not report an LLVM version")?
        .to_string();
    let root = cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-{nightly}"));
    let bin = root.join("bin");
    if bin.join("bpf-linker").exists() {
        return Ok(bin);
    }
    let libdir = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("read {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {} (the nightly ships its LLVM there)",
                libdir.display()
            )
        })?;
    // bpf-linker's build looks for `libLLVM.so` under LLVM_PREFIX/lib.
    let prefix = root.join("llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&libllvm), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {nightly}'s LLVM {llvm_major} (about a minute, once)"
    );
    run_cmd(
        Command::new("cargo")
            .arg(format!("+{nightly}"))
            .args(["install", "bpf-linker", "--locked", "--version"])
            .arg(format!("^{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}"))
            .arg("--root")
            .arg(&root)
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bin.join("bpf-linker").exists() {
        bail!("bpf-linker was built but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Returns the directory holding `cargo-fuzz`, installing it first if needed
/// (about a minute, once; cached across clones like bpf-linker).
pub fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let root = cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin");
    if bin.join("cargo-fuzz").exists() {
        return Ok(bin);
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute, once)");
    run_cmd(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked", "--version"])
            .arg(format!("^{CARGO_FUZZ_VERSION}"))
            .arg("--root")
            .arg(&root),
    )?;
    if !bin.join("cargo-fuzz").exists() {
        bail!("cargo-fuzz was installed but {} is missing", bin.display());
    }
    Ok(bin)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("run {}", crate::describe(cmd)))?;
    anyhow::ensure!(
        out.status.success(),
        "`{}` failed: {}",
        crate::describe(cmd),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
