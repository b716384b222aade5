//! Named network namespaces, made the way `ip netns add` makes them, and running
//! code inside a namespace.
//!
//! A named namespace is a bind mount of a namespace file onto `/run/netns/NAME`;
//! `/run/netns` itself is made a shared mount point first so the mounts propagate to
//! other mount namespaces (as iproute2 does). A namespace is created by a throwaway
//! thread that `unshare(CLONE_NEWNET)`s and bind-mounts its own
//! `/proc/thread-self/ns/net`; the calling thread never changes namespace.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::sys::{Socket, protocols::NETLINK_ROUTE};

use super::{NetlinkError, Result};

/// Where named namespaces live.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Serializes the one-time setup of `/run/netns` as a shared mount.
static RUN_DIR_SETUP: Mutex<bool> = Mutex::new(false);

/// Path of the named namespace `name`.
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Makes `/run/netns` exist and be a shared mount point, like `ip netns add`.
fn prepare_run_dir() -> Result<()> {
    let mut done = RUN_DIR_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    fs::create_dir_all(NETNS_RUN_DIR)
        .map_err(|e| NetlinkError::io(format!("create {NETNS_RUN_DIR}"), e))?;
    let make_shared = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => {}
        // Not a mount point yet: bind it onto itself, then make that shared.
        Err(Errno::EINVAL) => {
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| NetlinkError::io(format!("bind-mount {NETNS_RUN_DIR} onto itself"), e))?;
            make_shared()
                .map_err(|e| NetlinkError::io(format!("make {NETNS_RUN_DIR} a shared mount"), e))?;
        }
        Err(e) => {
            return Err(NetlinkError::io(
                format!("make {NETNS_RUN_DIR} a shared mount"),
                e,
            ));
        }
    }
    *done = true;
    Ok(())
}

/// Creates the named namespace `name` and returns an fd of it. Fails with EEXIST
/// if the name is taken. On failure nothing is left behind.
pub fn create(name: &str) -> Result<OwnedFd> {
    let op = || format!("create netns {name}");
    check_name(name).map_err(|e| NetlinkError::io(op(), e))?;
    prepare_run_dir()?;
    let path = path_of(name);
    // The mount point: an empty file, created exclusively so two creators of the
    // same name cannot both succeed.
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| NetlinkError::io(op(), e))?;
    let mounted = std::thread::scope(|s| {
        s.spawn(|| -> nix::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
        })
        .join()
    });
    let result = match mounted {
        Ok(Ok(())) => open(name),
        Ok(Err(e)) => Err(NetlinkError::io(op(), e)),
        Err(_) => Err(NetlinkError::ThreadPanicked(op())),
    };
    if result.is_err() {
        let _ = umount2(&path, MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&path);
    }
    result
}

/// A fresh, unnamed network namespace made ready for a slot by one thread:
/// IPv6 off (`disable_ipv6` for `all` and `default`: no link-local addresses,
/// router solicitations or DAD on the slot's links), `lo` up, two netlink
/// sockets and an open `/dev/net/tun` inside it (both keep working from any thread: a socket
/// and a TUN file belong to the namespace they were opened in). It lives as
/// long as `ns` (or a name given to it with [`name`]).
#[derive(Debug)]
pub struct Prepared {
    /// The namespace.
    pub ns: OwnedFd,
    /// A route netlink socket inside it.
    pub netlink: Socket,
    /// A second one, for tc requests (blocking, see `tc`).
    pub tc: Socket,
    /// `/dev/net/tun`, opened inside it: a TAP made through it is made there.
    pub tun: fs::File,
}

/// Makes a [`Prepared`] namespace: one throwaway thread `unshare`s, sets the
/// sysctls, sets `lo` up and opens the files; the calling thread never changes namespace.
pub fn prepare() -> Result<Prepared> {
    let op = "prepare a network namespace";
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Prepared> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetlinkError::io(op, e))?;
            super::sysctl::write("net.ipv6.conf.default.disable_ipv6", "1")?;
            super::sysctl::write("net.ipv6.conf.all.disable_ipv6", "1")?;
            loopback_up()?;
            let netlink = Socket::new(NETLINK_ROUTE)
                .map_err(|e| NetlinkError::io("open a netlink socket", e))?;
            let tc = Socket::new(NETLINK_ROUTE)
                .map_err(|e| NetlinkError::io("open a netlink socket for tc", e))?;
            let tun = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .map_err(|e| NetlinkError::io("open /dev/net/tun", e))?;
            let ns = open_path(Path::new("/proc/thread-self/ns/net"))?;
            Ok(Prepared {
                ns,
                netlink,
                tc,
                tun,
            })
        })
        .join()
        .unwrap_or_else(|_| Err(NetlinkError::ThreadPanicked(op.into())))
    })
}

/// Sets `lo` of the calling thread's namespace up (`SIOCSIFFLAGS`).
fn loopback_up() -> Result<()> {
    let op = "set lo up";
    // SAFETY: plain socket(2); the result is checked and owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetlinkError::io(op, io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a socket we just opened and nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero `ifreq` is a valid value (name empty, flags 0).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes `ifru_flags` of the
    // `ifreq` we own, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(NetlinkError::io(op, io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled `ifru_flags` above; both are plain integers.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the `ifreq` we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(NetlinkError::io(op, io::Error::last_os_error()));
    }
    Ok(())
}

/// Gives the namespace `ns` the name `name` (a bind mount on
/// `/run/netns/NAME`, as `ip netns attach` does). Fails with EEXIST if the name
/// is taken; on failure nothing is left behind.
pub fn name(ns: BorrowedFd<'_>, name: &str) -> Result<()> {
    let op = || format!("name netns {name}");
    check_name(name).map_err(|e| NetlinkError::io(op(), e))?;
    prepare_run_dir()?;
    let path = path_of(name);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| NetlinkError::io(op(), e))?;
    let source = format!("/proc/self/fd/{}", ns.as_raw_fd());
    if let Err(e) = mount(
        Some(source.as_str()),
        &path,
        Some("none"),
        MsFlags::MS_BIND,
        None::<&str>,
    ) {
        let _ = fs::remove_file(&path);
        return Err(NetlinkError::io(op(), e));
    }
    Ok(())
}

/// A namespace name must be a plain file name.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// Deletes the named namespace: unmounts and removes `/run/netns/NAME`. The kernel
/// frees the namespace (and its remaining devices) once nothing else holds it.
/// Returns `Ok(false)` if it did not exist.
pub fn delete(name: &str) -> Result<bool> {
    let path = path_of(name);
    let op = || format!("delete netns {name}");
    let unmounted = match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) => true,
        // Not mounted (a half-made leftover) or missing.
        Err(Errno::EINVAL | Errno::ENOENT) => false,
        Err(e) => return Err(NetlinkError::io(op(), e)),
    };
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(unmounted),
        Err(e) => Err(NetlinkError::io(op(), e)),
    }
}

/// True if `/run/netns/NAME` exists.
pub fn exists(name: &str) -> bool {
    path_of(name).exists()
}

/// Opens the named namespace.
pub fn open(name: &str) -> Result<OwnedFd> {
    open_path(&path_of(name)).map_err(|e| match e {
        NetlinkError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            NetlinkError::NotFound(format!("netns {name}"))
        }
        e => e,
    })
}

/// Opens a namespace file (e.g. `/proc/PID/ns/net`).
pub fn open_path(path: &Path) -> Result<OwnedFd> {
    let file = fs::File::open(path)
        .map_err(|e| NetlinkError::io(format!("open {}", path.display()), e))?;
    Ok(file.into())
}

/// An fd of the calling thread's network namespace.
pub fn current() -> Result<OwnedFd> {
    open_path(Path::new("/proc/thread-self/ns/net"))
}

/// Names in `/run/netns`, sorted. A missing directory is an empty list.
pub fn list() -> Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_RUN_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetlinkError::io(format!("list {NETNS_RUN_DIR}"), e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Runs `f` on a fresh thread that has joined the namespace `ns`, and returns its
/// result. The calling thread's namespace is untouched; threads `f` spawns inherit
/// the namespace.
pub fn run_in<T: Send>(ns: BorrowedFd<'_>, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetlinkError::io("enter a network namespace", e))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetlinkError::ThreadPanicked(
                "run in a network namespace".into(),
            ))
        })
    })
}

/// The inode number of a namespace fd: equal inodes mean the same namespace.
pub fn inode(ns: BorrowedFd<'_>) -> Result<u64> {
    let st = nix::sys::stat::fstat(ns).map_err(|e| NetlinkError::io("stat a netns fd", e))?;
    Ok(st.st_ino)
}
