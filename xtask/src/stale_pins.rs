//! Private bpffs mounts that test processes left behind.
//!
//! A `Datapath` without a configured pin directory mounts a bpffs of its own
//! on `{temp}/netagent-bpf-{pid}-{n}` and unmounts it when dropped. A test
//! process killed before that (a timeout, ^C) leaves the mount, and its pins
//! keep programs and maps loaded, an uplink's TCX link among them. `cargo
//! xtask test` removes such mounts of processes that are gone before it runs
//! the suites; the mounts of live processes are left alone.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::run_cmd;

/// The bpffs mount points under the temporary directory whose creating
/// process no longer exists.
fn stale_mounts(mountinfo: &str, temp: &Path, alive: impl Fn(u32) -> bool) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <options> ... - <fstype> ..."
            let mut fields = line.split(' ');
            let point = PathBuf::from(fields.nth(4)?);
            let fstype = line.split(" - ").nth(1)?.split(' ').next()?;
            let name = point.strip_prefix(temp).ok()?.to_str()?.to_owned();
            let pid: u32 = name
                .strip_prefix("netagent-bpf-")?
                .split('-')
                .next()?
                .parse()
                .ok()?;
            (fstype == "bpf" && !name.contains('/') && !alive(pid)).then_some(point)
        })
        .collect()
}

/// Unmounts and removes the stale mounts (`stale_mounts`), saying which.
pub fn sweep() -> Result<()> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    let temp = std::env::temp_dir();
    for point in stale_mounts(&mountinfo, &temp, |pid| {
        Path::new(&format!("/proc/{pid}")).exists()
    }) {
        println!(
            "xtask: removing {}, a test bpffs whose process is gone",
            point.display()
        );
        run_cmd(Command::new("umount").arg(&point))?;
        std::fs::remove_dir(&point).with_context(|| format!("rmdir {}", point.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bpffs_of_dead_processes_under_the_temp_dir() {
        let info = "\
36 25 0:32 / /tmp/netagent-bpf-935-0 rw,relatime shared:1 - bpf bpf rw
37 25 0:33 / /tmp/netagent-bpf-1119-2 rw,relatime shared:2 - bpf bpf rw
38 25 0:34 / /tmp/netagent-bpf-77-0 rw,relatime shared:3 - bpf bpf rw
39 25 0:35 / /tmp/netagent-bpf-935-1 rw,relatime shared:4 - tmpfs tmpfs rw
40 25 0:36 / /sys/fs/bpf rw,relatime shared:5 - bpf bpf rw
41 25 0:37 / /tmp/other-bpf-935-0 rw,relatime shared:6 - bpf bpf rw
42 25 0:38 / /tmp/netagent-bpf-x-0 rw,relatime shared:7 - bpf bpf rw";
        let stale = stale_mounts(info, Path::new("/tmp"), |pid| pid == 77);
        assert_eq!(
            stale,
            vec![
                PathBuf::from("/tmp/netagent-bpf-935-0"),
                PathBuf::from("/tmp/netagent-bpf-1119-2"),
            ]
        );
    }
}
