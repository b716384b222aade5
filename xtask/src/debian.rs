//! Debian packages the tests and benchmarks need, installed with apt-get.

use std::process::Command;

use anyhow::Result;

use crate::run_cmd;

/// (package, a file it installs that proves it is present).
pub const TEST_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "/usr/bin/ip"),
    ("iptables", "/usr/sbin/iptables"),
    ("iperf3", "/usr/bin/iperf3"),
    ("sockperf", "/usr/bin/sockperf"),
    ("socat", "/usr/bin/socat"),
    ("tcpdump", "/usr/bin/tcpdump"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
    ("curl", "/usr/bin/curl"),
    ("util-linux", "/usr/bin/nsenter"),
];

/// Installs whichever of `packages` is missing.
pub fn install(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, probe)| !std::path::Path::new(probe).exists())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").arg("update").arg("-q"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
