//! A real `netagent up` process in a throwaway "host" namespace, and a client for
//! its API socket.
//!
//! [`Daemon::start`] builds a minimal world — a host namespace `{prefix}-host` whose
//! uplink `up0` (198.18.0.1/24, default route via 198.18.0.2) is a veth to a wan
//! namespace `{prefix}-wan` (198.18.0.2/24) — then runs the netagent binary inside
//! the host namespace with `nsenter --net=/run/netns/...` (which, unlike `ip netns
//! exec`, keeps the real `/sys`), with a per-test prefix, socket and bpffs
//! directory under `/run/netagent-test/{prefix}/`, and waits until `/healthz`
//! answers. Dropping it stops the agent (SIGTERM, then SIGKILL of its own pid) and
//! removes everything: the agent's lock file, the bpffs it mounted, the slot
//! namespaces of the prefix, the host and wan namespaces.
//!
//! ```ignore
//! let Some(d) = Daemon::start()? else { return Ok(()) };   // None: no root, skipped
//! let (slot, created) = d.client().create_slot(1, &GuestLink::Tap).await?;
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netagent::api::client::Client;

/// How long `netagent up` may take to answer on its socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGTERMed agent may take to delete its slots and exit.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Host side of the uplink (in the host namespace).
pub const UPLINK: &str = "up0";
/// Uplink address.
pub const UPLINK_IP: &str = "198.18.0.1";
/// The wan namespace's address (a test server can listen here).
pub const WAN_IP: &str = "198.18.0.2";

/// The same capability check as the namespace world's.
pub use crate::world::privileged_or_skip;

/// A prefix unique to this test process and call: `t` + 4 hex digits.
pub fn unique_prefix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
        .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503));
    let mut n = mix;
    loop {
        let prefix = format!("t{:04x}", n & 0xffff);
        // Not taken by a namespace or lock of another test.
        if !Path::new(&format!("/run/netns/{prefix}-host")).exists()
            && !Path::new(&format!("/run/netagent-test/{prefix}")).exists()
        {
            return prefix;
        }
        n = n.wrapping_add(0x9e37);
    }
}

/// Runs `ip` with `args`; fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `program args` in network namespace `netns` (nsenter, real /sys).
pub fn in_netns(netns: &str, program: &str, args: &[&str]) -> Result<Output> {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .with_context(|| format!("nsenter {netns} {program}"))
}

/// The `netagent` binary of this workspace (built once per test process if it
/// is missing).
pub fn netagent_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn locate_or_build() -> Result<PathBuf> {
    // The test executable is target/<profile>/deps/<name>-<hash>: the binary is
    // target/<profile>/netagent, built by `cargo test --workspace`.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target directory")?;
    let bin = profile_dir.join("netagent");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Build (or confirm up to date) so the test never runs a stale agent.
    let mut build = Command::new(&cargo);
    // With the test hooks (`NETAGENT_CRASH_AT`), as the test crates link it.
    build.args([
        "build",
        "--quiet",
        "-p",
        "netagent",
        "--bin",
        "netagent",
        "--features",
        "fault-injection",
    ]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build
        .current_dir(workspace)
        .env(
            "CARGO_TARGET_DIR",
            profile_dir.parent().context("target dir")?,
        )
        .status();
    match status {
        Ok(s) if s.success() => {}
        other if bin.exists() => {
            eprintln!(
                "note: `cargo build -p netagent` failed ({other:?}); using the existing {}",
                bin.display()
            );
        }
        other => bail!(
            "cannot build the netagent binary ({other:?}): run `cargo build -p netagent` first"
        ),
    }
    if !bin.exists() {
        bail!(
            "{} does not exist after building: run `cargo build -p netagent`",
            bin.display()
        );
    }
    Ok(bin)
}

/// Options of [`Daemon::start_with`].
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Extra arguments for `netagent up`.
    pub args: Vec<String>,
    /// Leave out `--uplink` so the agent picks the default route's interface.
    pub default_uplink: bool,
}

/// The test world (host and wan namespaces) of one prefix; removed on drop.
#[derive(Debug)]
pub struct World {
    /// Per-test prefix.
    pub prefix: String,
    /// The namespace the agent runs in.
    pub host_ns: String,
    /// The namespace holding test servers (198.18.0.2).
    pub wan_ns: String,
    /// Runtime directory of the test: socket, bpffs, logs.
    pub dir: PathBuf,
}

impl World {
    /// Builds the host and wan namespaces with the uplink between them.
    pub fn build() -> Result<World> {
        let prefix = unique_prefix();
        let world = World {
            host_ns: format!("{prefix}-host"),
            wan_ns: format!("{prefix}-wan"),
            dir: PathBuf::from(format!("/run/netagent-test/{prefix}")),
            prefix,
        };
        std::fs::create_dir_all(&world.dir)?;
        ip(&["netns", "add", &world.host_ns])?;
        ip(&["netns", "add", &world.wan_ns])?;
        ip(&[
            "link",
            "add",
            UPLINK,
            "netns",
            &world.host_ns,
            "type",
            "veth",
            "peer",
            "name",
            "wan0",
            "netns",
            &world.wan_ns,
        ])?;
        let h = ["-n", world.host_ns.as_str()];
        let w = ["-n", world.wan_ns.as_str()];
        for (ns, cmd) in [
            (h, vec!["addr", "add", "198.18.0.1/24", "dev", UPLINK]),
            (h, vec!["link", "set", UPLINK, "up"]),
            (h, vec!["link", "set", "lo", "up"]),
            (h, vec!["route", "add", "default", "via", WAN_IP]),
            (w, vec!["addr", "add", "198.18.0.2/24", "dev", "wan0"]),
            (w, vec!["link", "set", "wan0", "up"]),
            (w, vec!["link", "set", "lo", "up"]),
        ] {
            let args: Vec<&str> = ns.iter().copied().chain(cmd).collect();
            ip(&args)?;
        }
        Ok(world)
    }

    /// The per-test socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/netagent.sock")
    }

    /// The per-test bpffs directory (the agent mounts a bpffs at its parent).
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpf/pins")
    }

    /// Names of the namespaces of this prefix's slots that exist now.
    pub fn slot_namespaces(&self) -> Vec<String> {
        let lead = format!("{}-ns-", self.prefix);
        let mut names: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&lead))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Interfaces of the host namespace whose name starts with the prefix.
    pub fn host_links(&self) -> Vec<String> {
        // A deleted slot's veth pair goes when the kernel frees its namespace,
        // after the delete returned.
        let _ = crate::leaks::wait_for_retired_links(
            &self.host_ns,
            &self.prefix,
            crate::leaks::RETIRED_LINKS_TIMEOUT,
        );
        let out = in_netns(&self.host_ns, "ip", &["-o", "link", "show"])
            .map(|o| o.stdout)
            .unwrap_or_default();
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with(&self.prefix))
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for ns in self.slot_namespaces() {
            let _ = ip(&["netns", "del", &ns]);
        }
        let _ = ip(&["netns", "del", &self.host_ns]);
        let _ = ip(&["netns", "del", &self.wan_ns]);
        let bpf_mount = self.dir.join("bpf");
        let _ = nix::mount::umount2(&bpf_mount, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(format!("/run/netagent/{}.lock", self.prefix));
        let _ = std::fs::remove_dir_all(format!("/run/netagent/{}.slots", self.prefix));
    }
}

/// A running `netagent up` in its own world.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    opts: DaemonOptions,
    /// A private copy of the binary (see [`Daemon::use_crash_points`]).
    bin: Option<PathBuf>,
    /// The world it runs in (dropped after the agent stops).
    pub world: World,
}

impl Daemon {
    /// Builds a world and starts the agent with default options; `Ok(None)` when
    /// the process is not privileged (the test is skipped with a printed reason).
    pub fn start(test: &str) -> Result<Option<Daemon>> {
        Daemon::start_with(test, DaemonOptions::default())
    }

    /// Like [`Daemon::start`] with extra `up` arguments.
    pub fn start_with(test: &str, opts: DaemonOptions) -> Result<Option<Daemon>> {
        if !privileged_or_skip(test) {
            return Ok(None);
        }
        let world = World::build()?;
        let extra = opts.args.clone();
        let mut daemon = Daemon {
            child: None,
            log: world.dir.join("netagent.log"),
            opts,
            bin: None,
            world,
        };
        daemon.launch(&extra)?;
        Ok(Some(daemon))
    }

    /// The `netagent up` arguments of this world.
    pub fn up_args(&self) -> Vec<String> {
        let w = &self.world;
        let mut args: Vec<String> = vec![
            "up".into(),
            "--prefix".into(),
            w.prefix.clone(),
            "--socket".into(),
            w.socket().display().to_string(),
            "--bpffs".into(),
            w.bpffs().display().to_string(),
        ];
        if !self.opts.default_uplink {
            args.extend(["--uplink".into(), UPLINK.into()]);
        }
        args.extend([
            "--log-format".into(),
            "json".into(),
            // Small tables keep 64 slots' worth of maps cheap.
            "--nat-table-size".into(),
            "4096".into(),
            "--nat-host-flow-table-size".into(),
            "1024".into(),
            "--max-slots".into(),
            "1024".into(),
        ]);
        args
    }

    /// Spawns `netagent ARGS` inside the host namespace, stderr to `log`.
    pub fn spawn_in_host(&self, args: &[String], log: &Path) -> Result<Child> {
        self.spawn_in_host_env(args, log, &[])
    }

    /// [`Daemon::spawn_in_host`] with extra environment variables.
    pub fn spawn_in_host_env(
        &self,
        args: &[String],
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<Child> {
        let bin = match &self.bin {
            Some(bin) => bin.clone(),
            None => netagent_bin()?,
        };
        let stderr = File::create(log)?;
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.world.host_ns))
            .arg("--")
            .arg(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("spawning netagent up")
    }

    /// (Re)starts the agent and waits until it is ready.
    pub fn launch(&mut self, extra: &[String]) -> Result<()> {
        self.launch_env(extra, &[])
    }

    /// [`Daemon::launch`] with extra environment variables for the agent (e.g.
    /// `NETAGENT_CRASH_AT`). The log of the previous run is kept as
    /// `netagent.log.N`.
    pub fn launch_env(&mut self, extra: &[String], env: &[(&str, &str)]) -> Result<()> {
        if self.log.exists() {
            for n in 1.. {
                let old = self.log.with_extension(format!("log.{n}"));
                if !old.exists() {
                    let _ = std::fs::rename(&self.log, old);
                    break;
                }
            }
        }
        let mut args = self.up_args();
        args.extend(extra.iter().cloned());
        self.child = Some(self.spawn_in_host_env(&args, &self.log.clone(), env)?);
        self.wait_ready()
    }

    /// From the next launch on, runs a private copy of the binary that honours
    /// `NETAGENT_CRASH_AT` (built with the `fault-injection` feature; the
    /// shared `target/.../netagent` may be rebuilt without it by a concurrent
    /// `cargo build` at any time, so it is checked and copied once).
    pub fn use_crash_points(&mut self) -> Result<()> {
        let copy = self.world.dir.join("netagent-crash-points");
        for _ in 0..5 {
            let bin = locate_or_build()?;
            std::fs::copy(&bin, &copy)?;
            let text = std::fs::read(&copy)?;
            if text.windows(17).any(|w| w == b"NETAGENT_CRASH_AT") {
                self.bin = Some(copy);
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        bail!("the netagent binary keeps being built without the fault-injection feature")
    }

    /// Waits up to `timeout` for the agent to exit by itself (e.g. an injected
    /// crash); returns its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(child) = self.child.as_mut() else {
                bail!("the agent is not running");
            };
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = self.client().with_timeout(Duration::from_secs(5));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "netagent up exited with {status} before it was ready:\n{}",
                    self.logs()
                );
            }
            if let Ok(reply) = rt.block_on(client.request("GET", "/healthz", None))
                && reply.status == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "netagent up not ready after {READY_TIMEOUT:?}:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client of this agent's socket.
    pub fn client(&self) -> Client {
        Client::new(self.world.socket())
    }

    /// The agent's pid (nsenter execs it, so this is the agent itself).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the agent logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` to the agent and waits for it to exit.
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent is not running");
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "netagent did not exit within {STOP_TIMEOUT:?} of {signal}:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.stop_with(nix::sys::signal::Signal::SIGTERM)
    }

    /// Runs the netagent CLI (`netagent ARGS`) in the host namespace and returns
    /// its output.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let bin = netagent_bin()?;
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.world.host_ns))
            .arg("--")
            .arg(bin)
            .args(args)
            .env_remove("NETAGENT_SOCKET")
            .output()
            .context("running the netagent CLI")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// A named namespace made by a test (e.g. a guest namespace for a veth slot);
/// deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name in /run/netns.
    pub name: String,
}

impl Netns {
    /// `ip netns add NAME` with `lo` up.
    pub fn add(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Runs `f` on a new thread that first joins network namespace `netns`
/// (`setns`, so only that thread moves).
pub fn spawn_in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {path}"))?;
        f()
    })
}

/// Sends `count` UDP datagrams of `size` bytes from namespace `client_ns` to a
/// one-shot echo server at `server_ip:port` in `server_ns`; returns how many
/// echoes came back (each within 2 s).
pub fn udp_echo(
    client_ns: &str,
    server_ns: &str,
    server_ip: &str,
    port: u16,
    count: usize,
    size: usize,
) -> Result<usize> {
    use std::net::UdpSocket;
    let addr = format!("{server_ip}:{port}");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let bind = addr.clone();
    let server = spawn_in_netns(server_ns, move || {
        let sock = UdpSocket::bind(&bind).with_context(|| format!("bind {bind}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = ready_tx.send(());
        let mut buf = vec![0u8; 65536];
        let mut echoed = 0;
        while echoed < count {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            sock.send_to(&buf[..n], from)?;
            echoed += 1;
        }
        Ok(echoed)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("echo server did not start")?;
    let client = spawn_in_netns(client_ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(&addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let payload = vec![0x5au8; size];
        let mut buf = vec![0u8; 65536];
        let mut back = 0;
        for _ in 0..count {
            sock.send(&payload)?;
            if let Ok(n) = sock.recv(&mut buf)
                && buf[..n] == payload[..]
            {
                back += 1;
            }
        }
        Ok(back)
    });
    let back = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let _ = server.join();
    Ok(back)
}

/// Sends one UDP datagram of `size` bytes from namespace `ns` to `dst` with
/// path-MTU discovery off, so the kernel fragments it (DF clear) instead of
/// refusing it: with `size` above the MTU, the wire carries IPv4 fragments.
pub fn udp_send_fragmented(ns: &str, dst: &str, size: usize) -> Result<()> {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    let dst = dst.to_string();
    spawn_in_netns(ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        let value: libc::c_int = libc::IP_PMTUDISC_DONT;
        // SAFETY: `sock` is an open socket for the whole call; `value` is a valid
        // c_int and its size is passed alongside.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!(
                "setsockopt(IP_MTU_DISCOVER): {}",
                std::io::Error::last_os_error()
            );
        }
        sock.send_to(&vec![0x42u8; size], &dst)?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
}
