//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().expect("netagent sits in the workspace");
    let object = std::env::var_os("NETAGENT_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bpfel-unknown-none/release/netagent-ebpf"));
    println!("cargo:rerun-if-env-changed=NETAGENT_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        anyhow::bail!(
            "the eBPF object {} is missing: run `cargo xtask build-ebpf` first \
             (it installs the pinned nightly and bpf-linker if needed)",
            object.display()
        );
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("netagent-ebpf.o");
    std::fs::copy(&object, &out)?;
    Ok(())
}
