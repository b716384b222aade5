//! `cargo xtask guest`: the microVM guest the end-to-end tests boot on a slot's TAP.
//!
//! Everything comes from Debian packages, downloaded (not installed) with
//! `apt-get download` and unpacked with `dpkg -x` under `target/guest/`:
//! - the kernel of the `linux-image-<ver>-cloud-amd64` package that
//!   `linux-image-cloud-amd64` depends on, copied to `target/guest/vmlinuz`;
//! - its `virtio_net` and `virtio_pci` modules and their dependencies (read from each
//!   module's `.modinfo` `depends=`), in load order;
//! - `busybox` from `busybox-static`.
//!
//! They go into `target/guest/initramfs.cpio` (cpio `newc`, written here) with
//! `tests/guest/init` as `/init`. Downloads are cached per package version; the
//! initramfs is rebuilt in memory on every run and written only when it changed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{run_cmd, workspace_root};

/// Meta package whose dependency names the versioned cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";
/// The statically linked busybox (the initramfs has no libc).
const BUSYBOX_PKG: &str = "busybox-static";
/// Modules the guest needs for its NIC; their dependencies are added.
const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_net"];

#[derive(clap::Args)]
pub struct Options {}

/// What a successful run leaves in `target/guest/`.
pub struct GuestFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

pub fn run(_opts: &Options) -> Result<()> {
    let files = prepare()?;
    eprintln!(
        "xtask: guest ready: kernel {}, initramfs {}",
        files.kernel.display(),
        files.initramfs.display()
    );
    Ok(())
}

/// Prepares the guest kernel and initramfs (cached; prints what it does).
pub fn prepare() -> Result<GuestFiles> {
    let out = workspace_root().join("target/guest");
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;

    let kernel_pkg = kernel_package()?;
    let kernel_root = unpacked(&out, &kernel_pkg)?;
    let busybox_root = unpacked(&out, BUSYBOX_PKG)?;

    let (kver, vmlinuz) = find_vmlinuz(&kernel_root)?;
    let kernel = out.join("vmlinuz");
    write_if_changed(
        &kernel,
        &std::fs::read(&vmlinuz).with_context(|| format!("read {}", vmlinuz.display()))?,
    )?;

    let modules = resolve_modules(&kernel_root.join("lib/modules").join(&kver).join("kernel"))?;
    eprintln!(
        "xtask: guest kernel {kver}, modules in load order: {}",
        modules
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );

    let init_path = workspace_root().join("tests/guest/init");
    let init =
        std::fs::read(&init_path).with_context(|| format!("read {}", init_path.display()))?;
    let busybox = busybox_root.join("bin/busybox");
    let busybox = std::fs::read(&busybox).with_context(|| format!("read {}", busybox.display()))?;

    let mut cpio = CpioWriter::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "root",
        "etc",
        "www",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.file("init", 0o755, &init);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.symlink("bin/sh", "busybox");
    let mut order = String::new();
    for (name, path) in &modules {
        let file_name = format!("{name}.ko");
        cpio.file(
            &format!("lib/modules/{file_name}"),
            0o644,
            &module_bytes(path)?,
        );
        order.push_str(&file_name);
        order.push('\n');
    }
    cpio.file("lib/modules/load-order", 0o644, order.as_bytes());
    cpio.file("etc/guest-kernel", 0o644, format!("{kver}\n").as_bytes());
    let initramfs = out.join("initramfs.cpio");
    write_if_changed(&initramfs, &cpio.finish())?;

    Ok(GuestFiles { kernel, initramfs })
}

/// The versioned kernel package `linux-image-cloud-amd64` depends on, refreshing
/// the apt lists once if they do not know it.
fn kernel_package() -> Result<String> {
    if let Some(pkg) = kernel_dependency()? {
        return Ok(pkg);
    }
    eprintln!("xtask: apt does not know {KERNEL_META} yet; refreshing the package lists");
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    kernel_dependency()?.with_context(|| {
        format!("apt-cache depends {KERNEL_META} names no linux-image-*-cloud-amd64 package even after apt-get update")
    })
}

fn kernel_dependency() -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["depends", KERNEL_META])
        .output()
        .context("run apt-cache (is this a Debian machine?)")?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        (dep.starts_with("linux-image-") && dep.ends_with("-cloud-amd64")).then(|| dep.to_string())
    }))
}

/// The candidate version apt would download for `pkg`.
fn candidate_version(pkg: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", pkg])
        .output()
        .context("run apt-cache show")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(v) = text.lines().find_map(|l| l.strip_prefix("Version: ")) {
        return Ok(v.trim().to_string());
    }
    eprintln!("xtask: apt does not know {pkg}; refreshing the package lists");
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", pkg])
        .output()
        .context("run apt-cache show")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: ").map(|v| v.trim().to_string()))
        .with_context(|| {
            format!("apt-cache show {pkg} reports no version even after apt-get update")
        })
}

/// Downloads and unpacks `pkg` (its candidate version) once; returns the directory
/// it was unpacked into.
fn unpacked(out: &Path, pkg: &str) -> Result<PathBuf> {
    let version = candidate_version(pkg)?;
    let dir = out
        .join("pkgs")
        .join(format!("{pkg}_{}", version.replace(':', "%3a")));
    let done = dir.join(".unpacked");
    if done.exists() {
        eprintln!("xtask: {pkg} {version}: cached in {}", dir.display());
        return Ok(dir);
    }
    let download = out.join("download");
    let _ = std::fs::remove_dir_all(&download);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&download)?;
    eprintln!("xtask: downloading {pkg} {version}");
    let fetch = || {
        run_cmd(
            Command::new("apt-get")
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .arg(format!("{pkg}={version}"))
                .current_dir(&download),
        )
    };
    if fetch().is_err() {
        // Stale lists name a version the mirror no longer has.
        eprintln!("xtask: download failed; refreshing the package lists and retrying once");
        run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
        let version_now = candidate_version(pkg)?;
        if version_now != version {
            return unpacked(out, pkg);
        }
        fetch()?;
    }
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| {
            format!(
                "apt-get download {pkg} left no .deb in {}",
                download.display()
            )
        })?;
    std::fs::create_dir_all(&dir)?;
    run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
    std::fs::write(&done, format!("{}\n", deb.display()))?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(dir)
}

/// The kernel release and `boot/vmlinuz-*` of an unpacked kernel package.
fn find_vmlinuz(root: &Path) -> Result<(String, PathBuf)> {
    let boot = root.join("boot");
    for entry in std::fs::read_dir(&boot).with_context(|| format!("read {}", boot.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if let Some(kver) = name.strip_prefix("vmlinuz-") {
            return Ok((kver.to_string(), path));
        }
    }
    bail!("no vmlinuz-* in {}", boot.display())
}

/// `ROOT_MODULES` and everything they depend on, dependencies first.
fn resolve_modules(kernel_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut index = HashMap::new();
    index_modules(kernel_dir, &mut index)?;
    let mut order = Vec::new();
    let mut state = BTreeMap::new();
    for root in ROOT_MODULES {
        visit(root, &index, &mut state, &mut order)?;
    }
    Ok(order)
}

fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, index)?;
            continue;
        }
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if let Some(stem) = [".ko", ".ko.xz", ".ko.zst"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
        {
            index.insert(stem.replace('-', "_"), path);
        }
    }
    Ok(())
}

fn visit(
    name: &str,
    index: &HashMap<String, PathBuf>,
    state: &mut BTreeMap<String, bool>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    match state.get(name) {
        Some(true) => return Ok(()),
        Some(false) => bail!("module dependency cycle through {name}"),
        None => {}
    }
    state.insert(name.to_string(), false);
    let path = index
        .get(name)
        .with_context(|| format!("module {name} is not in the kernel package (is it built in?)"))?;
    for dep in module_depends(&module_bytes(path)?) {
        visit(&dep, index, state, order)?;
    }
    state.insert(name.to_string(), true);
    order.push((name.to_string(), path.clone()));
    Ok(())
}

/// A module's uncompressed bytes (Debian 12 ships plain `.ko`; later releases
/// compress them, which busybox `insmod` may not read).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return std::fs::read(path).with_context(|| format!("read {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("run {tool} -dc {}", path.display()))?;
    anyhow::ensure!(out.status.success(), "{tool} -dc {} failed", path.display());
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-separated strings).
fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[start + KEY.len()..];
    let value = &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())];
    String::from_utf8_lossy(value)
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// Writes `bytes` to `path` (via a temporary file) unless it already holds them.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        eprintln!("xtask: {} is up to date", path.display());
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    eprintln!("xtask: wrote {} ({} bytes)", path.display(), bytes.len());
    Ok(())
}

/// A cpio archive in the `newc` format the kernel unpacks as an initramfs.
#[derive(Default)]
struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
}

impl CpioWriter {
    const S_IFDIR: u32 = 0o040000;
    const S_IFREG: u32 = 0o100000;
    const S_IFLNK: u32 = 0o120000;
    const S_IFCHR: u32 = 0o020000;

    fn dir(&mut self, name: &str) {
        self.entry(name, Self::S_IFDIR | 0o755, 2, (0, 0), b"");
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, Self::S_IFREG | perm, 1, (0, 0), data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, Self::S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, Self::S_IFCHR | perm, 1, (major, minor), b"");
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the archive is reproducible
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), b"");
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_modinfo() {
        let ko =
            b"\x7fELF junk\0license=GPL\0depends=virtio,virtio_ring,net-failover\0retpoline=Y\0";
        assert_eq!(
            module_depends(ko),
            ["virtio", "virtio_ring", "net_failover"]
        );
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut w = CpioWriter::default();
        w.file("init", 0o755, b"#!/bin/sh\n");
        let out = w.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        assert!(out.windows(10).any(|x| x == b"TRAILER!!!"));
    }
}
