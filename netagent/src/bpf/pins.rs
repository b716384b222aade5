//! The bpffs directory the maps are pinned in (one directory per agent
//! instance), so the maps outlive a look from outside (`bpftool`, tests) and are
//! there for a restarted agent: the maps, the layout descriptor `LAYOUT` (see
//! `layout`) and the uplink's TCX link (`UPLINK_LINK_PIN`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::BpfError;

/// `statfs` magic of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
const SYS_FS_BPF: &str = "/sys/fs/bpf";

/// Pin of the uplink's TCX link: it keeps the hook attached while no agent
/// runs, and a restarted agent replaces its program through it.
pub const UPLINK_LINK_PIN: &str = "LINK_uplink_ingress";

/// Counter making private pin directories of one process unique.
static PRIVATE_DIRS: AtomicU32 = AtomicU32::new(0);

/// A directory on a bpffs holding this datapath's map pins.
#[derive(Debug)]
pub(super) struct PinDir {
    dir: PathBuf,
    /// An exclusive `flock` on the directory while this datapath lives: pins
    /// are reused by a restarted agent, so two live datapaths must never share
    /// a directory (the second would take over the first's maps).
    lock: Option<nix::fcntl::Flock<std::fs::File>>,
    /// A bpffs this instance mounted itself (unmounted and removed on drop).
    own_mount: Option<PathBuf>,
    /// Kernel id of the CONFIG map this instance pinned: tells our pins from those
    /// of another instance pointed at the same directory.
    config_id: Option<u32>,
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

fn mount_bpffs(at: &Path) -> Result<(), BpfError> {
    mount(Some("bpf"), at, Some("bpf"), MsFlags::empty(), None::<&str>)
        .map_err(|e| BpfError::syscall(format!("mount -t bpf bpf {}", at.display()), e.into()))
}

fn create_dir(dir: &Path) -> Result<(), BpfError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| BpfError::syscall(format!("mkdir -p {}", dir.display()), e))
}

impl PinDir {
    /// A private bpffs mounted on a fresh temporary directory (tests, or an agent
    /// without a configured directory).
    pub(super) fn private() -> Result<PinDir, BpfError> {
        let n = PRIVATE_DIRS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("netagent-bpf-{}-{n}", std::process::id()));
        create_dir(&dir)?;
        if let Err(e) = mount_bpffs(&dir) {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
        let mut pins = PinDir {
            own_mount: Some(dir.clone()),
            dir,
            lock: None,
            config_id: None,
        };
        pins.lock()?;
        Ok(pins)
    }

    /// `dir`, made to be on a bpffs: used as is when it already is; under
    /// `/sys/fs/bpf` a bpffs is mounted there first when none is; elsewhere one is
    /// mounted on `dir` itself.
    pub(super) fn at(dir: &Path) -> Result<PinDir, BpfError> {
        if dir.is_dir() && is_bpffs(dir) {
            return PinDir::locked(dir, None);
        }
        let sys = Path::new(SYS_FS_BPF);
        if dir.starts_with(sys) && dir != sys {
            if !is_bpffs(sys) {
                mount_bpffs(sys)?;
            }
            create_dir(dir)?;
            return PinDir::locked(dir, None);
        }
        if let Some(parent) = dir.parent()
            && parent.is_dir()
            && is_bpffs(parent)
        {
            create_dir(dir)?;
            return PinDir::locked(dir, None);
        }
        create_dir(dir)?;
        mount_bpffs(dir)?;
        PinDir::locked(dir, Some(dir.to_owned()))
    }

    fn locked(dir: &Path, own_mount: Option<PathBuf>) -> Result<PinDir, BpfError> {
        let mut pins = PinDir {
            dir: dir.to_owned(),
            own_mount,
            lock: None,
            config_id: None,
        };
        pins.lock()?;
        Ok(pins)
    }

    /// Takes the exclusive lock of the directory; fails when another live
    /// datapath holds it.
    fn lock(&mut self) -> Result<(), BpfError> {
        use nix::fcntl::{Flock, FlockArg};
        let file = std::fs::File::open(&self.dir)
            .map_err(|e| BpfError::syscall(format!("open {}", self.dir.display()), e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                self.lock = Some(lock);
                Ok(())
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(BpfError::Config(format!(
                "the pin directory {} is in use by another running netagent datapath; give each \
                 instance its own bpffs directory",
                self.dir.display()
            ))),
            Err((_, e)) => Err(BpfError::syscall(
                format!("flock {}", self.dir.display()),
                e.into(),
            )),
        }
    }

    /// The directory.
    pub(super) fn path(&self) -> &Path {
        &self.dir
    }

    /// Where map `name` is pinned.
    pub(super) fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn pinned_config_id(&self) -> Option<u32> {
        aya::maps::MapInfo::from_pin(self.map_path(netagent_common::MAP_CONFIG))
            .ok()
            .map(|i| i.id())
    }

    /// Records that the maps now pinned here are this instance's.
    pub(super) fn claim(&mut self) -> Result<(), BpfError> {
        self.config_id = Some(self.pinned_config_id().ok_or_else(|| {
            BpfError::Config(format!(
                "the maps were not pinned in {}",
                self.dir.display()
            ))
        })?);
        Ok(())
    }

    /// Fails if the pins no longer are this instance's maps (another datapath was
    /// started on the same directory): its pins must then be left alone.
    pub(super) fn check_ours(&self) -> Result<(), BpfError> {
        if self.config_id.is_some() && self.pinned_config_id() == self.config_id {
            return Ok(());
        }
        Err(BpfError::Config(format!(
            "the map pins in {} belong to another netagent datapath; give each instance \
             its own bpffs directory",
            self.dir.display()
        )))
    }

    /// Removes the pin of map `name` (absent is fine).
    pub(super) fn unpin(&self, name: &str) -> Result<(), BpfError> {
        match std::fs::remove_file(self.map_path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BpfError::syscall(
                format!("unlink {}", self.map_path(name).display()),
                e,
            )),
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.check_ours().is_ok() {
            for name in super::load::MAP_NAMES {
                let _ = self.unpin(name);
            }
            let _ = self.unpin(super::layout::LAYOUT_PIN);
            let _ = self.unpin(UPLINK_LINK_PIN);
        }
        if let Some(mnt) = &self.own_mount {
            let _ = umount2(mnt, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(mnt);
        }
    }
}
