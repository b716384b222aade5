//! A throwaway world of network namespaces for root integration tests.
//!
//! ```text
//!   {p}-wan                       {p}-host (the agent runs here)
//!   eth0 198.18.0.2/24  <--veth-->  up0 198.18.0.1/24, default via 198.18.0.2
//!   TCP/UDP echo servers            slot veths {p}-veth-N, HostIP routes
//!   (ping answered by the kernel)   slot namespaces {p}-ns-N, guests {p}-gN
//! ```
//!
//! [`World::new`] builds it with netagent's own netlink layer (no subprocesses);
//! [`World::start_agent`] runs a `SlotManager` in-process inside the host
//! namespace: a thread that `setns`es into it builds a multi-threaded tokio
//! runtime, whose worker threads inherit the namespace, and every call is spawned
//! onto those workers. Dropping the world removes every namespace whose name starts
//! with `{p}-` (host, wan, slot and guest namespaces), and with them all links.
//!
//! ```ignore
//! let Some(world) = World::new()? else { return Ok(()) };  // None: not root, skipped
//! let agent = world.start_agent(|_| {})?;
//! let (slot, _) = agent.run(|m| async move { m.create(1, GuestLink::Tap).await })??;
//! ```

use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use netagent::config::Config;
use netagent::netlink::{Netlink, netns};
use netagent::slot::SlotManager;

/// Host side of the uplink (in the host namespace).
pub const UPLINK: &str = "up0";
/// Uplink address (the masquerade source).
pub const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The wan namespace's address, where the test servers listen.
pub const WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// TCP echo server port in the wan namespace.
pub const TCP_ECHO_PORT: u16 = 7007;
/// UDP echo server port in the wan namespace.
pub const UDP_ECHO_PORT: u16 = 7008;

/// True when this process can build namespaces and load BPF; otherwise prints why
/// the calling test is skipped.
pub fn privileged_or_skip(test: &str) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0);
    // CAP_NET_ADMIN (12), CAP_SYS_ADMIN (21), CAP_BPF (39).
    let ok = [12, 21, 39].iter().all(|bit| eff & (1u64 << bit) != 0);
    if !ok {
        eprintln!("SKIPPED {test}: needs CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_BPF (run as root)");
    }
    ok
}

/// A prefix unique to this process and call: `w` + 4 hex digits.
pub fn unique_prefix() -> String {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503))
        .wrapping_add(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0),
        );
    let p = format!("w{:04x}", seed & 0xffff);
    // Another run may hold this prefix (tests in parallel): pick again.
    if netns::list()
        .unwrap_or_default()
        .iter()
        .any(|n| n.starts_with(&format!("{p}-")))
    {
        return unique_prefix();
    }
    p
}

/// What a wan server saw: the peer address of each connection or datagram.
#[derive(Debug, Default)]
pub struct Seen {
    /// TCP peers, in order of accept.
    pub tcp: Vec<SocketAddr>,
    /// UDP peers, in order of arrival.
    pub udp: Vec<SocketAddr>,
}

/// The throwaway namespaces and the wan servers.
pub struct World {
    prefix: String,
    host_ns: OwnedFd,
    wan_ns: OwnedFd,
    rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    seen: Arc<Mutex<Seen>>,
}

impl World {
    /// Builds the world with a fresh prefix; `Ok(None)` (and a printed reason) when
    /// not privileged.
    pub fn new() -> Result<Option<World>> {
        if !privileged_or_skip("world") {
            return Ok(None);
        }
        World::with_prefix(&unique_prefix()).map(Some)
    }

    /// Builds the world with `prefix` (at most 5 characters so `{prefix}-wan`
    /// and slot names fit).
    pub fn with_prefix(prefix: &str) -> Result<World> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let host_name = format!("{prefix}-host");
        let wan_name = format!("{prefix}-wan");
        let host_ns = netns::create(&host_name).with_context(|| format!("create {host_name}"))?;
        let wan_ns = match netns::create(&wan_name) {
            Ok(ns) => ns,
            Err(e) => {
                let _ = netns::delete(&host_name);
                return Err(e).context(format!("create {wan_name}"));
            }
        };
        let mut world = World {
            prefix: prefix.to_string(),
            host_ns,
            wan_ns,
            rt,
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            seen: Arc::new(Mutex::new(Seen::default())),
        };
        // From here Drop cleans up whatever fails.
        world.build_links()?;
        world.start_servers()?;
        Ok(world)
    }

    fn build_links(&self) -> Result<()> {
        self.rt.block_on(async {
            let host = Netlink::connect_in(self.host_ns.as_fd())?;
            let wan = Netlink::connect_in(self.wan_ns.as_fd())?;
            host.veth_add(UPLINK, "eth0", self.wan_ns.as_fd()).await?;
            let up = host.link_get(UPLINK).await?;
            host.addr_add(up.index, UPLINK_IP, 24).await?;
            host.link_up(up.index).await?;
            let lo = host.link_get("lo").await?;
            host.link_up(lo.index).await?;
            let eth0 = wan.link_get("eth0").await?;
            wan.addr_add(eth0.index, WAN_IP, 24).await?;
            wan.link_up(eth0.index).await?;
            let lo = wan.link_get("lo").await?;
            wan.link_up(lo.index).await?;
            host.route_add_default(WAN_IP).await?;
            anyhow::Ok(())
        })
    }

    fn start_servers(&mut self) -> Result<()> {
        let tcp = netns::run_in(self.wan_ns.as_fd(), || {
            TcpListener::bind(SocketAddrV4::new(WAN_IP, TCP_ECHO_PORT))
        })??;
        let udp = netns::run_in(self.wan_ns.as_fd(), || {
            UdpSocket::bind(SocketAddrV4::new(WAN_IP, UDP_ECHO_PORT))
        })??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (stop, seen) = (self.stop.clone(), self.seen.clone());
        self.servers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut conn, peer)) => {
                        seen.lock().unwrap().tcp.push(peer);
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                            let mut buf = [0u8; 65536];
                            while let Ok(n) = conn.read(&mut buf) {
                                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }));
        let (stop, seen) = (self.stop.clone(), self.seen.clone());
        self.servers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    seen.lock().unwrap().udp.push(peer);
                    let _ = udp.send_to(&buf[..n], peer);
                }
            }
        }));
        Ok(())
    }

    /// The world's prefix (also the agent's).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Name of the host (agent) namespace.
    pub fn host_name(&self) -> String {
        format!("{}-host", self.prefix)
    }

    /// Name of the wan namespace.
    pub fn wan_name(&self) -> String {
        format!("{}-wan", self.prefix)
    }

    /// The host namespace.
    pub fn host_ns(&self) -> &OwnedFd {
        &self.host_ns
    }

    /// The wan namespace.
    pub fn wan_ns(&self) -> &OwnedFd {
        &self.wan_ns
    }

    /// What the wan servers saw so far.
    pub fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    /// Runs `f` on a thread inside the named namespace.
    pub fn in_ns<T: Send>(&self, name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        let ns = netns::open(name)?;
        Ok(netns::run_in(ns.as_fd(), f)?)
    }

    /// Runs `f` on a thread inside the host namespace.
    pub fn in_host<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        Ok(netns::run_in(self.host_ns.as_fd(), f)?)
    }

    /// Runs an async netlink job against the named namespace on the world's runtime.
    pub fn netlink<T>(
        &self,
        ns_name: &str,
        f: impl AsyncFnOnce(Netlink) -> Result<T>,
    ) -> Result<T> {
        self.rt.block_on(async {
            let ns = netns::open(ns_name)?;
            let nl = Netlink::connect_in(ns.as_fd())?;
            f(nl).await
        })
    }

    /// An agent configuration for this world: its prefix, small tables, the uplink
    /// found from the default route.
    pub fn config(&self) -> Config {
        let mut cfg = Config {
            prefix: self.prefix.clone(),
            max_slots: 512,
            ..Config::default()
        };
        cfg.nat.table_size = 4096;
        cfg.nat.host_flow_table_size = 1024;
        cfg.bpffs = format!("/run/netagent-test/{}/bpffs", self.prefix).into();
        cfg.socket = format!("/run/netagent-test/{}/sock", self.prefix).into();
        cfg
    }

    /// Starts a `SlotManager` in-process inside the host namespace with
    /// [`World::config`] changed by `edit`.
    pub fn start_agent(&self, edit: impl FnOnce(&mut Config)) -> Result<Agent> {
        let mut cfg = self.config();
        edit(&mut cfg);
        let rt = netns::run_in(self.host_ns.as_fd(), || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        })??;
        let agent_rt = AgentRuntime { rt };
        // Every worker must be in the host namespace before anything runs there.
        let host_ino = netns::inode(self.host_ns.as_fd())?;
        for _ in 0..8 {
            let ino = agent_rt.spawn(async {
                let ns = netns::current()?;
                anyhow::Ok(netns::inode(ns.as_fd())?)
            })??;
            if ino != host_ino {
                bail!("an agent worker thread is not in the host namespace");
            }
        }
        let manager = agent_rt.spawn(async move { SlotManager::start(&cfg).await })??;
        Ok(Agent {
            manager: Some(manager),
            rt: agent_rt,
        })
    }

    /// `ip -j -n NS ARGS...` parsed as JSON (an independent view of the kernel).
    pub fn ip_json(&self, ns: Option<&str>, args: &[&str]) -> Result<serde_json::Value> {
        let mut cmd = Command::new("ip");
        cmd.arg("-j");
        if let Some(ns) = ns {
            cmd.args(["-n", ns]);
        }
        let out = cmd.args(args).output().context("run ip")?;
        if !out.status.success() {
            bail!(
                "ip {:?} in {:?} failed: {}",
                args,
                ns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Array(Vec::new()));
        }
        serde_json::from_str(&text).with_context(|| format!("parse ip -j {args:?}: {text}"))
    }

    /// Names in `/run/netns` that start with this world's prefix.
    pub fn namespaces(&self) -> Vec<String> {
        let p = format!("{}-", self.prefix);
        netns::list()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(&p))
            .collect()
    }

    /// Creates a plain guest namespace `{p}-gN` with `lo` up (for veth guest links
    /// and pumps). Dropping the world removes it.
    pub fn guest_namespace(&self, n: u32) -> Result<String> {
        let name = format!("{}-g{n}", self.prefix);
        let ns = netns::create(&name)?;
        self.rt.block_on(async {
            let nl = Netlink::connect_in(ns.as_fd())?;
            let lo = nl.link_get("lo").await?;
            nl.link_up(lo.index).await?;
            anyhow::Ok(())
        })?;
        // The guest stays quiet: no IPv6 autoconfiguration noise in the counters.
        let _ =
            netagent::netlink::sysctl::write_in(ns.as_fd(), "net.ipv6.conf.all.disable_ipv6", "1");
        let _ = netagent::netlink::sysctl::write_in(
            ns.as_fd(),
            "net.ipv6.conf.default.disable_ipv6",
            "1",
        );
        Ok(name)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
        let p = format!("{}-", self.prefix);
        for name in netns::list().unwrap_or_default() {
            if name.starts_with(&p) {
                let _ = netns::delete(&name);
            }
        }
        let _ = std::fs::remove_dir_all(format!("/run/netagent-test/{}", self.prefix));
        // Slot records of an agent dropped without shutdown (see `slot::adopt`).
        let _ = std::fs::remove_dir_all(netagent::slot::adopt::records_dir(&self.prefix));
    }
}

/// A runtime whose worker threads live in the host namespace.
pub struct AgentRuntime {
    rt: tokio::runtime::Runtime,
}

impl AgentRuntime {
    /// Runs `fut` on a worker thread (in the host namespace) and waits for it.
    pub fn spawn<F>(&self, fut: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = self.rt.spawn(fut);
        self.rt
            .block_on(handle)
            .map_err(|e| anyhow!("agent task failed: {e}"))
    }
}

/// A `SlotManager` running inside the world's host namespace. Dropping it without
/// [`Agent::shutdown`] is what a killed agent leaves: slots stay in the kernel,
/// only the in-process datapath (its program links) goes away.
pub struct Agent {
    manager: Option<Arc<SlotManager>>,
    rt: AgentRuntime,
}

impl Agent {
    /// The manager.
    pub fn manager(&self) -> Arc<SlotManager> {
        self.manager.clone().expect("agent is running")
    }

    /// Runs `f(manager)` on the agent's runtime (inside the host namespace).
    pub fn run<F, Fut>(&self, f: F) -> Result<Fut::Output>
    where
        F: FnOnce(Arc<SlotManager>) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        let fut = f(self.manager());
        self.rt.spawn(fut)
    }

    /// Shuts the manager down (deletes its slots, detaches the datapath).
    pub fn shutdown(mut self) -> Result<()> {
        let m = self.manager.take().expect("agent is running");
        self.rt.spawn(async move { m.shutdown().await })??;
        Ok(())
    }
}

/// Turns TX and RX checksum offload of link `ifname` on or off, in the calling
/// thread's namespace (the legacy `ETHTOOL_S{TX,RX}CSUM` ioctls; TSO/GSO follow TX
/// checksumming off).
pub fn set_checksum_offload(ifname: &str, on: bool) -> Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SRXCSUM: u32 = 0x15;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReqData {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("127.0.0.1:0"))
        .context("socket for ethtool ioctl")?;
    for cmd in [ETHTOOL_STXCSUM, ETHTOOL_SRXCSUM] {
        let mut value = EthtoolValue {
            cmd,
            data: u32::from(on),
        };
        let mut req = IfReqData {
            name: [0; libc::IFNAMSIZ],
            data: &mut value,
            _pad: [0; 16],
        };
        req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        // SAFETY: SIOCETHTOOL reads an ifreq whose data pointer points at a valid
        // ethtool_value for the duration of the call; the socket is open.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req as *mut IfReqData) };
        if rc < 0 {
            bail!(
                "ethtool cmd {cmd:#x} on {ifname}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}
