//! `netagent up`: start-up checks, the per-prefix lock, the bpffs mount, the API
//! socket, the reaper, and shutdown.
//!
//! Start-up order: check privileges and kernel features; check the configuration
//! against the host (the uplink exists and is neither a loopback interface nor a
//! slot veth; `socket_group` exists); take an exclusive `flock`
//! on `/run/netagent/{prefix}.lock` (a second instance of the prefix refuses to
//! start); check the socket path (a live instance there → refuse; a stale socket
//! from a crash → replaced); mount a bpffs at the parent of `--bpffs` if none is
//! there; start the slot manager (loads and attaches the datapath, removes
//! leftovers of a crashed run of the prefix); bind the socket (mode 0600, or 0660
//! owned by `socket_group`) and, only if `api_tcp` is set, its loopback TCP
//! address — from then on the agent is ready; reap expired flows every
//! `timeouts.reap_interval` seconds.
//!
//! **Shutdown** (SIGINT or SIGTERM): stop accepting connections, let in-flight
//! requests finish (at most `api::server::DRAIN_TIMEOUT`), stop the reaper,
//! remove the socket, then **delete every slot** (namespaces, veths, routes, map
//! entries and flows), detach the datapath and release the lock (exit status 0
//! if all of it worked): the host is left as it was before the agent ran.
//!
//! **Exit keeping the slots** (SIGUSR1, for an upgrade or a restart): the same
//! until the socket is removed, then the lock is released and the process exits
//! (status 0) without deleting or detaching anything: slots keep forwarding,
//! the maps, the layout descriptor and the uplink's link stay pinned. After
//! `kill -9` or a crash it is the same. The next `netagent up` of the prefix
//! reuses the maps (if their layout matches), adopts every intact slot,
//! replaces the program on every hook in place and removes what is broken
//! (see `slot::adopt`); `netagent cleanup` removes everything instead.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MsFlags, mount};
use nix::sys::stat::{Mode, umask};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use nix::unistd::{Gid, Group};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::api;
use crate::config::{Config, ConfigError};
use crate::controller::{Controller, SlotBackend};
use crate::error::DaemonError;
use crate::netlink::Netlink;

/// Directory of the per-prefix lock files.
pub const LOCK_DIR: &str = "/run/netagent";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Installs the global `tracing` subscriber (stderr; level from `RUST_LOG`,
/// default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal());
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Capabilities `netagent up` needs, as (bit, name).
const REQUIRED_CAPS: [(u32, &str); 3] = [
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
    (39, "CAP_BPF"),
];

/// Fails with the names of the missing capabilities (effective set).
pub fn check_privileges() -> Result<(), DaemonError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = REQUIRED_CAPS
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DaemonError::MissingPrivileges {
            missing: missing.join(", "),
        })
    }
}

/// Fails when the kernel lacks the BPF syscall; warns about what degrades.
pub fn check_kernel() -> Result<(), DaemonError> {
    if !Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists() {
        return Err(DaemonError::MissingKernelFeature {
            feature: "the bpf() system call".into(),
            hint: "the kernel was built without CONFIG_BPF_SYSCALL; netagent needs Linux >= 5.10 with BPF".into(),
        });
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        tracing::warn!(
            "kernel BTF (/sys/kernel/btf/vmlinux) is missing; BPF diagnostics will be less precise"
        );
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some((major, minor)) = kernel_version(&release)
        && (major, minor) < (6, 6)
    {
        tracing::warn!(
            kernel = %release,
            "kernel older than 6.6 has no TCX; programs attach through clsact instead"
        );
    }
    Ok(())
}

fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Path of the lock file of `prefix`.
pub fn lock_path(prefix: &str) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("{prefix}.lock"))
}

/// Holds the per-prefix lock; dropping it removes the lock file and releases
/// the lock.
#[derive(Debug)]
pub struct PrefixLock {
    lock: Option<Flock<File>>,
    path: PathBuf,
}

impl PrefixLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrefixLock {
    fn drop(&mut self) {
        // Unlink while still holding the lock: a waiter that opened the old file
        // finds it unlinked after locking it and retries on a fresh one
        // (see `lock_prefix`), so two holders can never coexist.
        let _ = std::fs::remove_file(&self.path);
        drop(self.lock.take());
    }
}

/// Attempts at taking a lock whose file is being replaced under us.
const LOCK_ATTEMPTS: usize = 8;

/// Takes the exclusive lock of `prefix`, writing our pid into the file; fails
/// with the holder's pid when another process has it.
pub fn lock_prefix(prefix: &str) -> Result<PrefixLock, DaemonError> {
    let path = lock_path(prefix);
    create_dir(Path::new(LOCK_DIR), 0o755)?;
    for _ in 0..LOCK_ATTEMPTS {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| DaemonError::Io {
                what: "open lock file",
                path: path.clone(),
                source,
            })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                // The previous holder may have unlinked the file between our
                // open and our lock: then the lock protects nothing; retry.
                let same = match (lock.metadata(), std::fs::metadata(&path)) {
                    (Ok(held), Ok(named)) => held.ino() == named.ino() && held.dev() == named.dev(),
                    _ => false,
                };
                if !same {
                    continue;
                }
                let pid = std::process::id().to_string();
                let written = lock
                    .set_len(0)
                    .and_then(|()| lock.rewind())
                    .and_then(|()| lock.write_all(pid.as_bytes()));
                if let Err(source) = written {
                    return Err(DaemonError::Io {
                        what: "write lock file",
                        path,
                        source,
                    });
                }
                return Ok(PrefixLock {
                    lock: Some(lock),
                    path,
                });
            }
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(DaemonError::PrefixLocked {
                    prefix: prefix.to_string(),
                    lock: path,
                    holder: if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" by pid {holder}")
                    },
                });
            }
            Err((_, errno)) => {
                return Err(DaemonError::Io {
                    what: "lock",
                    path,
                    source: io::Error::from(errno),
                });
            }
        }
    }
    Err(DaemonError::Io {
        what: "lock (the lock file keeps being replaced)",
        path,
        source: io::Error::from(io::ErrorKind::WouldBlock),
    })
}

fn create_dir(path: &Path, mode: u32) -> Result<(), DaemonError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| DaemonError::Io {
            what: "create directory",
            path: path.to_path_buf(),
            source,
        })
}

/// Whether `path` is on a bpffs (statfs magic `BPF_FS_MAGIC`).
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Makes `dir` a directory on a bpffs: if its parent is not a bpffs, mounts one
/// there first (as Cilium does when `/sys/fs/bpf` is not mounted). Returns whether
/// this call mounted it.
pub fn ensure_bpffs(dir: &Path) -> Result<bool, DaemonError> {
    let parent = dir.parent().ok_or_else(|| DaemonError::Io {
        what: "find the parent of the bpffs directory",
        path: dir.to_path_buf(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    let mut mounted = false;
    if !is_bpffs(parent) {
        create_dir(parent, 0o700)?;
        mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            MsFlags::empty(),
            Some("mode=0700"),
        )
        .map_err(|source| DaemonError::MountBpffs {
            path: parent.to_path_buf(),
            source,
        })?;
        tracing::info!(path = %parent.display(), "mounted a bpffs");
        mounted = true;
    }
    create_dir(dir, 0o700)?;
    Ok(mounted)
}

/// Checks the socket path before start: missing is fine; a socket nobody answers
/// on (left by a crash) is removed; a socket that answers means another instance
/// serves there; anything else at the path is refused.
pub fn check_socket(path: &Path) -> Result<(), DaemonError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(DaemonError::Io {
                what: "inspect socket",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(DaemonError::SocketPathOccupied {
            socket: path.to_path_buf(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(DaemonError::SocketInUse {
            socket: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::warn!(socket = %path.display(), "replacing a stale API socket (left by a crashed run)");
            std::fs::remove_file(path).map_err(|source| DaemonError::Io {
                what: "remove stale socket",
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(DaemonError::Io {
            what: "probe socket",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Binds the API socket with mode 0600, or 0660 owned by `group` when one is
/// given (the umask is narrowed around `bind`, so the socket is never reachable
/// with wider permissions), creating its directory.
pub fn bind_socket(path: &Path, group: Option<Gid>) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        create_dir(dir, 0o755)?;
    }
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    umask(old);
    let io_err = |what, source| DaemonError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let listener = bound.map_err(|e| io_err("bind socket", e))?;
    let mode = match group {
        Some(gid) => {
            // Group first, then the group bit: never 0660 with the wrong group.
            std::os::unix::fs::chown(path, None, Some(gid.as_raw())).map_err(|e| {
                let _ = std::fs::remove_file(path);
                io_err("chown socket to socket_group (needs CAP_CHOWN)", e)
            })?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err("chmod socket", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err("configure socket", e))?;
    UnixListener::from_std(listener).map_err(|e| io_err("register socket", e))
}

/// The gid of `socket_group` (a group name or a numeric gid that exists).
pub fn resolve_group(group: &str) -> Result<Gid, DaemonError> {
    let found = if let Ok(gid) = group.parse::<u32>() {
        Group::from_gid(Gid::from_raw(gid))
    } else {
        Group::from_name(group)
    };
    match found {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(invalid(format!(
            "socket_group {group:?} does not exist on this host: create it (groupadd {group}) or name an existing group"
        ))),
        Err(e) => Err(invalid(format!(
            "socket_group {group:?} cannot be looked up: {e}"
        ))),
    }
}

fn invalid(message: String) -> DaemonError {
    DaemonError::Config(ConfigError::Invalid(vec![message]))
}

/// Refuses an uplink the agent must not use, with one line: a configured uplink
/// that does not exist in the agent's namespace, and (configured or the default
/// route's interface) a loopback interface or one of this prefix's slot veths.
/// A missing default route is left to the slot manager, which names it.
pub async fn check_uplink(config: &Config) -> Result<(), DaemonError> {
    let plan = config.validate()?;
    let host = Netlink::connect_current()
        .map_err(|e| DaemonError::Start(format!("cannot read the agent's interfaces: {e}")))?;
    let read_err = |e: crate::netlink::NetlinkError| {
        DaemonError::Start(format!("cannot read the agent's interfaces: {e}"))
    };
    let links = host.link_list().await.map_err(read_err)?;
    let (link, how) = match &config.uplink {
        Some(name) => match links.iter().find(|l| &l.name == name) {
            Some(l) => (l, "uplink"),
            None => {
                let mut names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
                names.sort_unstable();
                return Err(invalid(format!(
                    "uplink {name} does not exist in the agent's network namespace (interfaces: {}): check --uplink",
                    names.join(", ")
                )));
            }
        },
        None => {
            let routes = host.route_list().await.map_err(read_err)?;
            let Some(oif) = routes.iter().find(|r| r.is_default()).and_then(|r| r.oif) else {
                return Ok(());
            };
            match links.iter().find(|l| l.index == oif) {
                Some(l) => (
                    l,
                    "the default route's interface (the uplink when --uplink is not given)",
                ),
                None => return Ok(()),
            }
        }
    };
    if is_loopback(&host, link.index).await.map_err(read_err)? {
        return Err(invalid(format!(
            "{how} {} is a loopback interface: name the interface slot traffic leaves through with --uplink",
            link.name
        )));
    }
    if let Some(index) = plan.index_of_veth(&link.name) {
        return Err(invalid(format!(
            "{how} {} is the host veth of slot {index} of prefix {}: name the host's own uplink with --uplink",
            link.name, config.prefix
        )));
    }
    Ok(())
}

async fn is_loopback(host: &Netlink, index: u32) -> Result<bool, crate::netlink::NetlinkError> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::link::LinkFlags;
    let msg = host
        .handle()
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(|e| crate::netlink::NetlinkError::netlink(format!("look up link #{index}"), e))?;
    Ok(msg.is_some_and(|m| m.header.flags.contains(LinkFlags::Loopback)))
}

/// Binds the loopback TCP address of `api_tcp` (validated to be loopback).
pub async fn bind_tcp(addr: std::net::SocketAddr) -> Result<TcpListener, DaemonError> {
    if !addr.ip().is_loopback() {
        return Err(invalid(format!("api_tcp {addr} is not a loopback address")));
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::BindTcp { addr, source })
}

/// Resolves on the first SIGINT, SIGTERM or SIGUSR1 with the signal's name.
fn shutdown_signal() -> Result<impl Future<Output = &'static str>, DaemonError> {
    let mut term = signal(SignalKind::terminate()).map_err(|source| DaemonError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Signal {
        signal: "SIGINT",
        source,
    })?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(|source| DaemonError::Signal {
        signal: "SIGUSR1",
        source,
    })?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = usr1.recv() => KEEP_SLOTS_SIGNAL,
        }
    })
}

/// The signal that makes the agent exit without deleting its slots.
const KEEP_SLOTS_SIGNAL: &str = "SIGUSR1";

/// Raises the soft open-files limit to the hard limit: every slot holds a few
/// descriptors (namespace, TCX links), so the usual soft limit of 1024 would cap
/// an agent at a few hundred slots. A failure only costs headroom, so it is logged.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// Runs the agent until SIGINT/SIGTERM. `config` must be validated.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let plan = config.validate()?;
    check_privileges()?;
    check_kernel()?;
    raise_fd_limit();
    check_uplink(&config).await?;
    let group = config
        .socket_group
        .as_deref()
        .map(resolve_group)
        .transpose()?;
    let lock = lock_prefix(&config.prefix)?;
    check_socket(&config.socket)?;
    ensure_bpffs(&config.bpffs)?;
    let signal = shutdown_signal()?;

    tracing::info!(prefix = %config.prefix, bpffs = %config.bpffs.display(), "starting the datapath");
    let backend: Arc<dyn SlotBackend> = crate::controller::start_backend(&config).await?;
    let controller = Arc::new(
        Controller::new(backend, plan, config.max_slots)
            .with_table_warn_percent(config.table_warn_percent),
    );

    let bound = match bind_socket(&config.socket, group) {
        Ok(unix) => match config.api_tcp {
            Some(addr) => match bind_tcp(addr).await {
                Ok(tcp) => Ok(api::server::Listeners {
                    unix,
                    tcp: Some(tcp),
                }),
                Err(e) => {
                    let _ = std::fs::remove_file(&config.socket);
                    Err(e)
                }
            },
            None => Ok(api::server::Listeners::from(unix)),
        },
        Err(e) => Err(e),
    };
    let listeners = match bound {
        Ok(l) => l,
        Err(e) => {
            if let Err(err) = controller.shutdown().await {
                tracing::error!(error = %err, "stopping the datapath failed");
            }
            return Err(e);
        }
    };
    let tcp = config
        .api_tcp
        .map(|a| a.to_string())
        .unwrap_or_else(|| "off".into());
    tracing::info!(socket = %config.socket.display(), socket_group = config.socket_group.as_deref().unwrap_or("root only"), api_tcp = %tcp, lock = %lock.path().display(), "netagent is ready");

    let (stop_reaper, reaper_stopped) = watch::channel(false);
    let reaper = tokio::spawn(reap_loop(
        controller.clone(),
        Duration::from_secs(config.timeouts.reap_interval),
        reaper_stopped,
    ));

    let signal_name = Arc::new(std::sync::Mutex::new(""));
    let recorded = signal_name.clone();
    let router = api::router_with(controller.clone(), &config.api);
    api::server::serve(listeners, router, config.api.header_timeout(), async move {
        let name = signal.await;
        *recorded.lock().unwrap_or_else(|p| p.into_inner()) = name;
        tracing::info!(signal = name, "shutting down: no new requests");
    })
    .await;

    let _ = stop_reaper.send(true);
    let _ = reaper.await;
    // Nothing serves any more: remove the socket first, so clients see "not
    // running" at once instead of hanging while slots are deleted.
    if let Err(e) = std::fs::remove_file(&config.socket)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %config.socket.display(), error = %e, "cannot remove the API socket");
    }
    let slots = controller.metrics().map(|m| m.slots.len()).unwrap_or(0);
    if *signal_name.lock().unwrap_or_else(|p| p.into_inner()) == KEEP_SLOTS_SIGNAL {
        tracing::info!(
            slots,
            "exiting without deleting the slots ({KEEP_SLOTS_SIGNAL}): they keep forwarding, \
             and the next `netagent up` adopts them"
        );
        drop(lock);
        // Now, before any destructor runs: dropping the datapath would unpin
        // the maps and detach the uplink.
        std::process::exit(0);
    }
    tracing::info!(slots, "deleting every slot and detaching the datapath");
    let result = controller.shutdown().await;
    drop(lock);
    match result {
        Ok(()) => {
            tracing::info!("netagent stopped cleanly");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "shutdown left resources behind; `netagent cleanup` removes them");
            Err(DaemonError::Shutdown(e.to_string()))
        }
    }
}

async fn reap_loop(controller: Arc<Controller>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => controller.reap_once().await,
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.0-1-cloud-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.10.0"), Some((5, 10)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn sockets_stale_live_and_occupied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        check_socket(&path).unwrap();

        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = check_socket(&path).unwrap_err();
        assert!(matches!(err, DaemonError::SocketInUse { .. }), "{err}");
        drop(live);
        // The file stays behind with nobody listening: stale, replaced.
        assert!(path.exists());
        check_socket(&path).unwrap();
        assert!(!path.exists());

        std::fs::write(&path, b"not a socket").unwrap();
        let err = check_socket(&path).unwrap_err();
        assert!(
            matches!(err, DaemonError::SocketPathOccupied { .. }),
            "{err}"
        );
    }

    #[test]
    fn prefix_lock_excludes_and_cleans_up() {
        let prefix = format!("ut{}", std::process::id() % 100_000);
        let first = lock_prefix(&prefix).unwrap();
        let text = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(text, std::process::id().to_string());
        // flock is per open file description: a second open in this process conflicts too.
        let err = lock_prefix(&prefix).unwrap_err().to_string();
        assert!(
            err.contains(&format!("prefix {prefix:?}")) && err.contains("pid"),
            "{err}"
        );
        let path = first.path().to_path_buf();
        drop(first);
        assert!(!path.exists());
        let again = lock_prefix(&prefix).unwrap();
        drop(again);
    }

    #[tokio::test]
    async fn bound_socket_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/api.sock");
        let _listener = bind_socket(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn a_socket_group_makes_it_0660_owned_by_the_group() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED a_socket_group_makes_it_0660_owned_by_the_group: chown needs root");
            return;
        }
        // Group 1 ("daemon" on Debian) exists on every system with /etc/group.
        let gid = resolve_group("1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _listener = bind_socket(&path, Some(gid)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!((meta.uid(), meta.gid()), (0, gid.as_raw()));
    }

    #[test]
    fn unknown_groups_are_one_clear_line() {
        let err = resolve_group("no-such-group-x").unwrap_err().to_string();
        assert!(
            err.starts_with(
                "invalid configuration: socket_group \"no-such-group-x\" does not exist"
            ),
            "{err}"
        );
        assert!(!err.contains('\n'));
        let name = Group::from_gid(Gid::from_raw(0)).unwrap().unwrap().name;
        assert_eq!(resolve_group(&name).unwrap(), Gid::from_raw(0));
    }
}
