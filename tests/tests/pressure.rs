//! Pressure on a real `netagent up` in a throwaway world (host and wan
//! namespaces, a veth guest): a full NAT table drops new flows and keeps the
//! established ones, the occupancy metrics and the warning follow it; port
//! exhaustion toward one destination is counted and never yields a duplicate
//! tuple (read from the pinned maps); flows expire by protocol and TCP state with
//! short configured timeouts; the API answers hundreds of requests per second
//! while a guest's echo traffic flows without loss. Also what counting a flow
//! table costs at 65,536 entries (printed, not asserted).
//!
//! The agent is started here rather than with `netagent_tests::daemon::Daemon`,
//! whose fixed table sizes cannot be overridden (clap refuses a repeated flag).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{HashMap, Map, MapData};
use netagent::api::client::Client;
use netagent::controller::SlotView;
use netagent::slot::GuestLink;
use netagent::stats::SlotCounters;
use netagent_common::{
    FlowKey, IPPROTO_TCP, IPPROTO_UDP, MAP_HOST_FLOWS, MAP_NAT_EGRESS, MAP_NAT_INGRESS, NatEntry,
};
use netagent_tests::daemon::{Netns, World, netagent_bin, privileged_or_skip, spawn_in_netns};

const WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// HostIP of slot 1.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 11, 0, 1);
const WAIT: Duration = Duration::from_secs(3);

// ------------------------------------------------------------------ the agent

/// `netagent up` in its own world, with the table sizes and timeouts of the test.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
    world: World,
}

impl Agent {
    /// Starts the agent with `extra` flags; `None` when not privileged (skipped).
    fn start(test: &str, extra: &[&str]) -> Result<Option<Agent>> {
        if !privileged_or_skip(test) {
            return Ok(None);
        }
        let world = World::build()?;
        let log = world.dir.join("netagent.log");
        let mut args: Vec<String> = [
            "up",
            "--prefix",
            &world.prefix,
            "--socket",
            &world.socket().display().to_string(),
            "--bpffs",
            &world.bpffs().display().to_string(),
            "--uplink",
            "up0",
            "--log-format",
            "json",
            "--max-slots",
            "1024",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", world.host_ns))
            .arg("--")
            .arg(netagent_bin()?)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawning netagent up")?;
        let mut agent = Agent {
            child: Some(child),
            log,
            world,
        };
        agent.wait_ready()?;
        Ok(Some(agent))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let rt = rt();
        let client = self.client().with_timeout(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!("netagent up exited with {status}:\n{}", self.logs());
            }
            if rt
                .block_on(client.request("GET", "/healthz", None))
                .is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "netagent up not ready:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self) -> Client {
        Client::new(self.world.socket()).with_timeout(Duration::from_secs(10))
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn prefix(&self) -> &str {
        &self.world.prefix
    }

    /// A veth guest namespace `{prefix}-g1` and slot 1 with its `eth0` in it.
    fn guest_slot(&self, rt: &tokio::runtime::Runtime) -> Result<Netns> {
        let guest = Netns::add(&format!("{}-g1", self.prefix()))?;
        rt.block_on(self.client().create_slot(
            1,
            &GuestLink::Veth {
                guest_netns: guest.name.clone(),
            },
        ))?;
        Ok(guest)
    }

    fn stats(&self, rt: &tokio::runtime::Runtime) -> Result<SlotCounters> {
        Ok(rt.block_on(self.client().stats(1))?)
    }

    /// `metric{table="..."}` → value, for the table gauges.
    fn table_metrics(&self, rt: &tokio::runtime::Runtime) -> Result<BTreeMap<String, f64>> {
        let text = rt.block_on(self.client().metrics())?;
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with("netagent_table_")) {
            let (series, value) = line.rsplit_once(' ').context("metric line")?;
            out.insert(series.replace('"', ""), value.parse::<f64>()?);
        }
        Ok(out)
    }

    /// Polls the table metrics until `done` holds (scrapes reuse one table walk
    /// for a second, the reaper runs every second here).
    fn wait_tables(
        &self,
        rt: &tokio::runtime::Runtime,
        what: &str,
        done: impl Fn(&BTreeMap<String, f64>) -> bool,
    ) -> Result<BTreeMap<String, f64>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let m = self.table_metrics(rt)?;
            if done(&m) {
                return Ok(m);
            }
            ensure!(Instant::now() < deadline, "{what}: table metrics {m:#?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the log has a line containing every one of `needles`.
    fn wait_log(&self, needles: &[&str]) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let logs = self.logs();
            if let Some(line) = logs.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return Ok(line.to_string());
            }
            ensure!(
                Instant::now() < deadline,
                "no log line with {needles:?}; log:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The pinned flow tables: (NAT_EGRESS, NAT_INGRESS, HOST_FLOWS).
    fn flows(&self) -> Result<[Vec<(FlowKey, NatEntry)>; 3]> {
        let read = |name: &str| -> Result<Vec<(FlowKey, NatEntry)>> {
            let path = self.world.bpffs().join(name);
            let map = HashMap::<_, FlowKey, NatEntry>::try_from(Map::HashMap(
                MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?,
            ))?;
            Ok(map.iter().filter_map(|r| r.ok()).collect())
        };
        Ok([
            read(MAP_NAT_EGRESS)?,
            read(MAP_NAT_INGRESS)?,
            read(MAP_HOST_FLOWS)?,
        ])
    }
}

impl Agent {
    /// Inserts `n` established, fresh NAT_EGRESS entries of slot 999 (which does
    /// not exist) through the pin; returns `n`.
    fn fill_nat_egress(&self, n: u32) -> Result<u32> {
        let path = self.world.bpffs().join(MAP_NAT_EGRESS);
        let mut map = HashMap::<_, FlowKey, NatEntry>::try_from(Map::HashMap(
            MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?,
        ))?;
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
        let now = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        for i in 0..n {
            let key = FlowKey::new(
                map_ip(Ipv4Addr::new(10, 99, (i >> 8) as u8, i as u8)),
                map_ip(Ipv4Addr::new(198, 19, 0, 1)),
                1000u16.to_be(),
                443u16.to_be(),
                IPPROTO_TCP,
            );
            let entry = NatEntry {
                last_seen_ns: now,
                addr: map_ip(UPLINK_IP),
                port: (20000 + (i % 12_000) as u16).to_be(),
                slot: 999,
                state: netagent_common::STATE_SYN | netagent_common::STATE_REPLIED,
                ..NatEntry::default()
            };
            map.insert(key, entry, 0)?;
        }
        Ok(n)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs `f` on a thread inside namespace `ns` and waits for it.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    spawn_in_netns(ns, f)
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

fn map_ip(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

// ------------------------------------------------------------ echo servers

/// Echo servers in the wan namespace; stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Servers {
    fn new() -> Servers {
        Servers {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// A UDP echo server on `WAN:port` in `ns`.
    fn udp(&mut self, ns: &str, port: u16) -> Result<()> {
        let sock = in_ns(ns, move || Ok(UdpSocket::bind((WAN, port))?))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    sock.send_to(&buf[..n], from)?;
                }
            }
            Ok(())
        }));
        Ok(())
    }

    /// A TCP echo server on `WAN:port` in `ns` (a thread per connection; a
    /// connection closes when its peer does).
    fn tcp(&mut self, ns: &str, port: u16) -> Result<()> {
        let listener = in_ns(ns, move || Ok(TcpListener::bind((WAN, port))?))?;
        listener.set_nonblocking(true)?;
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false)?;
                        conn.set_read_timeout(Some(Duration::from_millis(100)))?;
                        let stop = stop.clone();
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 65536];
                            while !stop.load(Ordering::Relaxed) {
                                match conn.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        if conn.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => break,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            Ok(())
        }));
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------ guest clients

/// A UDP socket of the guest connected to `WAN:port` (its own source port, so
/// its own masquerade flow).
fn guest_udp(guest: &str, port: u16) -> Result<UdpSocket> {
    let sock = in_ns(guest, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect((WAN, port))?;
        Ok(s)
    })?;
    sock.set_read_timeout(Some(WAIT))?;
    Ok(sock)
}

/// Sends `payload` on `sock` and checks the echo.
fn udp_roundtrip(sock: &UdpSocket, payload: &[u8]) -> Result<()> {
    sock.send(payload)?;
    let mut buf = vec![0u8; 65536];
    let n = sock.recv(&mut buf).context("no UDP echo")?;
    ensure!(buf[..n] == *payload, "the UDP echo differs");
    Ok(())
}

/// A TCP connection of the guest to `dst:port`.
fn guest_tcp(guest: &str, dst: Ipv4Addr, port: u16) -> Result<TcpStream> {
    let s = in_ns(guest, move || {
        Ok(TcpStream::connect_timeout(
            &SocketAddrV4::new(dst, port).into(),
            WAIT,
        )?)
    })?;
    s.set_read_timeout(Some(WAIT))?;
    Ok(s)
}

/// Writes `len` bytes of a pattern seeded by `seed` and reads them back.
fn tcp_roundtrip(s: &mut TcpStream, seed: u8, len: usize) -> Result<()> {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    s.write_all(&data)?;
    let mut back = vec![0u8; len];
    s.read_exact(&mut back).context("TCP echo")?;
    ensure!(back == data, "the TCP echo differs");
    Ok(())
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let word = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP echo (identifier `id`) from the guest to `dst` over a raw socket.
fn guest_ping(guest: &str, dst: Ipv4Addr, id: u16) -> Result<()> {
    in_ns(guest, move || {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and nothing else owns it; raw sockets
        // support sendto/recvfrom as a UdpSocket uses them.
        let sock = unsafe { UdpSocket::from_raw_fd(fd) };
        sock.set_read_timeout(Some(WAIT))?;
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&1u16.to_be_bytes());
        pkt.extend_from_slice(b"netagent pressure");
        let c = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        sock.send_to(&pkt, SocketAddrV4::new(dst, 0))?;
        let deadline = Instant::now() + WAIT;
        loop {
            ensure!(Instant::now() < deadline, "no echo reply from {dst}");
            let mut buf = [0u8; 2048];
            let (n, _) = sock.recv_from(&mut buf).context("echo reply")?;
            let icmp = &buf[usize::from(buf[0] & 0x0f) * 4..n];
            if icmp.len() >= 8 && icmp[0] == 0 && u16::from_be_bytes([icmp[4], icmp[5]]) == id {
                ensure!(icmp[8..] == pkt[8..], "echo payload differs");
                return Ok(());
            }
        }
    })
}

// ------------------------------------------------------------------- tests

#[test]
fn full_nat_table_drops_new_flows_keeps_established_and_warns() -> Result<()> {
    // 8 entries per NAT table, a warning at 75 %, UDP flows idle for 8 s expire.
    let Some(agent) = Agent::start(
        "full_nat_table_drops_new_flows_keeps_established_and_warns",
        &[
            "--nat-table-size",
            "8",
            "--nat-host-flow-table-size",
            "64",
            "--table-warn-percent",
            "75",
            "--timeouts-udp",
            "8",
            "--timeouts-reap-interval",
            "1",
        ],
    )?
    else {
        return Ok(());
    };
    let rt = rt();
    let guest = agent.guest_slot(&rt)?;
    let mut servers = Servers::new();
    servers.udp(&agent.world.wan_ns, 9100)?;
    servers.tcp(&agent.world.wan_ns, 9101)?;

    // One TCP connection and 7 UDP flows fill the 8 entries.
    let mut tcp = guest_tcp(&guest.name, WAN, 9101)?;
    tcp_roundtrip(&mut tcp, 1, 4000)?;
    let mut udp = Vec::new();
    for i in 0..7u8 {
        let s = guest_udp(&guest.name, 9100)?;
        udp_roundtrip(&s, &[i; 100])
            .with_context(|| format!("flow {i} before the table is full"))?;
        udp.push(s);
    }
    let full = agent.wait_tables(&rt, "NAT tables full", |m| {
        m.get("netagent_table_entries{table=nat_egress}") == Some(&8.0)
    })?;
    for table in ["nat_egress", "nat_ingress"] {
        let get = |name: &str| full.get(&format!("{name}{{table={table}}}")).copied();
        ensure!(
            get("netagent_table_entries") == Some(8.0)
                && get("netagent_table_capacity") == Some(8.0)
                && get("netagent_table_usage_ratio") == Some(1.0)
                && get("netagent_table_pressure") == Some(1.0),
            "{table}: {full:#?}"
        );
    }
    ensure!(full.get("netagent_table_pressure{table=host_flows}") == Some(&0.0));
    ensure!(full.get("netagent_table_warn_ratio") == Some(&0.75));
    let warn = agent.wait_log(&[
        "\"level\":\"WARN\"",
        "above the warning threshold",
        "\"table\":\"nat_egress\"",
    ])?;
    println!("pressure: warning logged: {warn}");

    // New flows are dropped and counted, one drop per datagram.
    let before = agent.stats(&rt)?;
    ensure!(before.nat.allocations == 8, "{before:?}");
    let new: Vec<UdpSocket> = (0..4)
        .map(|_| guest_udp(&guest.name, 9100))
        .collect::<Result<_>>()?;
    for s in &new {
        s.send(b"no room")?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
    }
    for s in &new {
        let mut buf = [0u8; 64];
        ensure!(s.recv(&mut buf).is_err(), "a flow got through a full table");
    }
    let after = agent.stats(&rt)?;
    ensure!(
        after.drops["nat_table_full"] == before.drops["nat_table_full"] + 4
            && after.nat.failures == before.nat.failures + 4
            && after.nat.allocations == 8,
        "before {before:?}\nafter {after:?}"
    );
    println!(
        "pressure: full table: 4 new flows dropped (nat_table_full {}, nat failures {})",
        after.drops["nat_table_full"], after.nat.failures
    );

    // Established flows keep passing, on their own entries (no new allocation).
    tcp_roundtrip(&mut tcp, 2, 64 * 1024)?;
    for (i, s) in udp.iter().enumerate() {
        udp_roundtrip(s, &[0xa0 + i as u8; 1200])
            .with_context(|| format!("established flow {i} with the table full"))?;
    }
    let kept = agent.stats(&rt)?;
    ensure!(
        kept.nat.allocations == 8
            && kept.nat.failures == after.nat.failures
            && kept.drops["nat_table_full"] == after.drops["nat_table_full"],
        "{kept:?}"
    );

    // The UDP flows go idle and expire: the table falls back below the
    // threshold, the agent says so, and new flows fit again.
    drop(udp);
    agent.wait_tables(&rt, "UDP flows expired", |m| {
        m.get("netagent_table_entries{table=nat_egress}") == Some(&1.0)
            && m.get("netagent_table_pressure{table=nat_egress}") == Some(&0.0)
    })?;
    agent.wait_log(&[
        "\"level\":\"INFO\"",
        "back below the warning threshold",
        "\"table\":\"nat_egress\"",
    ])?;
    udp_roundtrip(&guest_udp(&guest.name, 9100)?, b"room again")?;
    tcp_roundtrip(&mut tcp, 3, 4000)?;
    ensure!(agent.stats(&rt)?.nat.allocations == 9);
    Ok(())
}

#[test]
fn full_host_flow_table_drops_new_host_flows_keeps_established() -> Result<()> {
    // 4 host → guest flows fit; the warning is at 100 %, i.e. only when full.
    let Some(agent) = Agent::start(
        "full_host_flow_table_drops_new_host_flows_keeps_established",
        &[
            "--nat-table-size",
            "64",
            "--nat-host-flow-table-size",
            "4",
            "--table-warn-percent",
            "100",
            "--timeouts-reap-interval",
            "1",
        ],
    )?
    else {
        return Ok(());
    };
    let rt = rt();
    let guest = agent.guest_slot(&rt)?;
    // A UDP echo service of the guest, reached from the host at HostIP.
    let service = in_ns(&guest.name, || Ok(UdpSocket::bind((GUEST_IP, 8081))?))?;
    service.set_read_timeout(Some(Duration::from_millis(100)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<()> {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = service.recv_from(&mut buf) {
                    service.send_to(&buf[..n], from)?;
                }
            }
            Ok(())
        })
    };
    let host_udp = || -> Result<UdpSocket> {
        let s = in_ns(&agent.world.host_ns, || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect((HOST_IP, 8081))?;
            Ok(s)
        })?;
        s.set_read_timeout(Some(WAIT))?;
        Ok(s)
    };
    let result = (|| -> Result<()> {
        let flows: Vec<UdpSocket> = (0..4).map(|_| host_udp()).collect::<Result<_>>()?;
        for (i, s) in flows.iter().enumerate() {
            udp_roundtrip(s, &[i as u8; 200]).with_context(|| format!("host flow {i}"))?;
        }
        let full = agent.wait_tables(&rt, "host flow table full", |m| {
            m.get("netagent_table_entries{table=host_flows}") == Some(&4.0)
        })?;
        ensure!(
            full.get("netagent_table_capacity{table=host_flows}") == Some(&4.0)
                && full.get("netagent_table_pressure{table=host_flows}") == Some(&1.0)
                && full.get("netagent_table_pressure{table=nat_egress}") == Some(&0.0),
            "{full:#?}"
        );
        agent.wait_log(&[
            "\"level\":\"WARN\"",
            "above the warning threshold",
            "\"table\":\"host_flows\"",
        ])?;
        // New host flows are dropped at eth0 and counted against the slot.
        let before = agent.stats(&rt)?;
        let new: Vec<UdpSocket> = (0..3).map(|_| host_udp()).collect::<Result<_>>()?;
        for s in &new {
            s.send(b"no room")?;
            s.set_read_timeout(Some(Duration::from_millis(300)))?;
        }
        for s in &new {
            let mut buf = [0u8; 64];
            ensure!(
                s.recv(&mut buf).is_err(),
                "a host flow got through a full table"
            );
        }
        let after = agent.stats(&rt)?;
        ensure!(
            after.drops["nat_table_full"] == before.drops["nat_table_full"] + 3,
            "before {before:?}\nafter {after:?}"
        );
        // The established host flows keep passing.
        for (i, s) in flows.iter().enumerate() {
            udp_roundtrip(s, &[0xb0 + i as u8; 1000])
                .with_context(|| format!("established host flow {i} with the table full"))?;
        }
        let kept = agent.stats(&rt)?;
        ensure!(
            kept.drops["nat_table_full"] == after.drops["nat_table_full"],
            "{kept:?}"
        );
        println!(
            "pressure: full host-flow table (4): 3 new host → HostIP flows dropped as nat_table_full, \
             the 4 established ones kept echoing"
        );
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    result
}

#[test]
fn port_exhaustion_toward_one_destination_never_duplicates_a_tuple() -> Result<()> {
    const PORTS: u16 = 8;
    let (min, max) = (40000u16, 40000 + PORTS - 1);
    let Some(agent) = Agent::start(
        "port_exhaustion_toward_one_destination_never_duplicates_a_tuple",
        &[
            "--nat-port-min",
            &min.to_string(),
            "--nat-port-max",
            &max.to_string(),
            "--nat-table-size",
            "1024",
            "--nat-host-flow-table-size",
            "64",
        ],
    )?
    else {
        return Ok(());
    };
    let rt = rt();
    let guest = agent.guest_slot(&rt)?;
    let mut servers = Servers::new();
    servers.udp(&agent.world.wan_ns, 9200)?;
    servers.udp(&agent.world.wan_ns, 9201)?;

    // 24 new flows toward one destination at once, from 4 threads: exactly 8
    // get a port. (Each allocation's 32 tries go round the 8 ports in order
    // twice — the jumps after the 16 sequential tries step by one in a range this
    // small — and two CPUs on one free port leave it to one and go on, so no free
    // port is missed.)
    let attempt = |port: u16, threads: usize, per_thread: usize| -> Result<usize> {
        let sockets: Vec<UdpSocket> = (0..threads * per_thread)
            .map(|_| guest_udp(&guest.name, port))
            .collect::<Result<_>>()?;
        let barrier = Arc::new(std::sync::Barrier::new(threads));
        let echoed = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for chunk in sockets.chunks(per_thread) {
                let barrier = barrier.clone();
                let echoed = &echoed;
                scope.spawn(move || {
                    barrier.wait();
                    for s in chunk {
                        let _ = s.send(b"one port please");
                    }
                    for s in chunk {
                        let mut buf = [0u8; 64];
                        if s.recv(&mut buf)
                            .is_ok_and(|n| &buf[..n] == b"one port please")
                        {
                            echoed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        Ok(echoed.load(Ordering::Relaxed) as usize)
    };
    let first = attempt(9200, 4, 6)?;
    let s1 = agent.stats(&rt)?;
    ensure!(
        first == usize::from(PORTS),
        "{first} of 24 flows got a port; {s1:?}"
    );
    ensure!(
        s1.nat.allocations == first as u64
            && s1.nat.failures == (24 - first) as u64
            && s1.drops["nat_ports_exhausted"] == (24 - first) as u64
            && s1.drops["nat_table_full"] == 0,
        "{first} echoed; {s1:?}"
    );
    // Another destination port is another tuple space: the same 8 ports serve it.
    let second = attempt(9201, 2, 4)?;
    let s2 = agent.stats(&rt)?;
    ensure!(
        second == usize::from(PORTS) && s2.nat.allocations == (first + second) as u64,
        "{second} of 8 flows to a second destination got a port; {s2:?}"
    );
    println!(
        "pressure: {PORTS} ports: {first} of 24 concurrent flows to one destination got a port, \
         {} counted as nat_ports_exhausted; {second} of 8 to a second destination",
        s2.drops["nat_ports_exhausted"]
    );

    // The tables: every egress entry has its ingress twin, the translated tuples
    // are unique and inside the range.
    let [egress, ingress, _] = agent.flows()?;
    ensure!(
        egress.len() == first + second && ingress.len() == egress.len(),
        "{} egress, {} ingress entries for {} flows",
        egress.len(),
        ingress.len(),
        first + second
    );
    let ingress: BTreeMap<(u32, u32, u16, u16, u8), NatEntry> = ingress
        .into_iter()
        .map(|(k, v)| ((k.saddr, k.daddr, k.sport, k.dport, k.proto), v))
        .collect();
    let mut tuples = BTreeSet::new();
    for (k, e) in &egress {
        let port = u16::from_be(e.port);
        ensure!(
            e.addr == map_ip(UPLINK_IP) && (min..=max).contains(&port) && e.slot == 1,
            "egress {k:?} → {e:?}"
        );
        let tuple = (e.addr, e.port, k.daddr, k.dport, k.proto);
        ensure!(tuples.insert(tuple), "duplicate translated tuple {tuple:?}");
        let twin = ingress
            .get(&(k.daddr, e.addr, k.dport, e.port, k.proto))
            .with_context(|| format!("no ingress entry for egress {k:?} → {e:?}"))?;
        ensure!(
            twin.addr == k.saddr && twin.port == k.sport && twin.slot == 1,
            "ingress of {k:?} points at {twin:?}"
        );
    }
    Ok(())
}

/// The (proto, remote port) of each egress flow.
fn egress_flows(flows: &[(FlowKey, NatEntry)]) -> BTreeSet<(u8, u16)> {
    flows
        .iter()
        .map(|(k, _)| (k.proto, u16::from_be(k.dport)))
        .collect()
}

#[test]
fn flows_expire_by_protocol_and_tcp_state() -> Result<()> {
    // Established TCP keeps its long default; everything else is short.
    let Some(agent) = Agent::start(
        "flows_expire_by_protocol_and_tcp_state",
        &[
            "--nat-table-size",
            "1024",
            "--nat-host-flow-table-size",
            "64",
            "--timeouts-tcp-closing",
            "1",
            "--timeouts-tcp-opening",
            "2",
            "--timeouts-udp",
            "2",
            "--timeouts-icmp",
            "2",
            "--timeouts-reap-interval",
            "1",
        ],
    )?
    else {
        return Ok(());
    };
    let rt = rt();
    let guest = agent.guest_slot(&rt)?;
    let wan = agent.world.wan_ns.clone();
    let mut servers = Servers::new();
    servers.udp(&wan, 9300)?;
    for port in [9301, 9302, 9303] {
        servers.tcp(&wan, port)?;
    }
    // A guest service the host reaches at HostIP.
    let guest_listener = in_ns(&guest.name, || Ok(TcpListener::bind((GUEST_IP, 8080))?))?;

    // Guest → wan: established (kept open), closed with FINs both ways, reset,
    // still opening (a SYN nobody answers), UDP and ICMP.
    let mut established = guest_tcp(&guest.name, WAN, 9301)?;
    tcp_roundtrip(&mut established, 1, 1000)?;
    let mut fin = guest_tcp(&guest.name, WAN, 9302)?;
    tcp_roundtrip(&mut fin, 2, 1000)?;
    fin.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    fin.read_to_end(&mut rest).context("the server's FIN")?;
    drop(fin);
    let mut rst = guest_tcp(&guest.name, WAN, 9303)?;
    tcp_roundtrip(&mut rst, 3, 1000)?;
    // SO_LINGER 0: close sends an RST.
    nix::sys::socket::setsockopt(
        &rst,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    drop(rst);
    // 198.18.1.1 is routed to the wan namespace, which does not forward: no answer.
    let opening = spawn_in_netns(&guest.name, || {
        let _ = TcpStream::connect_timeout(
            &SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 1), 9304).into(),
            Duration::from_secs(1),
        );
        Ok(())
    });
    udp_roundtrip(&guest_udp(&guest.name, 9300)?, b"udp")?;
    guest_ping(&guest.name, WAN, 0x5151)?;
    let _ = opening.join();

    // Host → guest at HostIP: one connection stays open, one closes.
    let host = agent.world.host_ns.clone();
    let accept = std::thread::spawn(move || -> Result<Vec<TcpStream>> {
        guest_listener.set_nonblocking(false)?;
        let mut conns = Vec::new();
        for _ in 0..2 {
            let (mut c, _) = guest_listener.accept()?;
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf)?;
            c.write_all(&buf)?;
            conns.push(c);
        }
        Ok(conns)
    });
    let host_conn = |h: &str| -> Result<TcpStream> {
        let h = h.to_string();
        let mut s = in_ns(&h, || {
            Ok(TcpStream::connect_timeout(
                &SocketAddrV4::new(HOST_IP, 8080).into(),
                WAIT,
            )?)
        })?;
        s.set_read_timeout(Some(WAIT))?;
        s.write_all(b"hello")?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        ensure!(&buf == b"hello");
        Ok(s)
    };
    let host_kept = host_conn(&host)?;
    let mut host_closed = host_conn(&host)?;
    let mut guest_side = accept
        .join()
        .map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
    let guest_closed = guest_side.pop().context("second connection")?;
    host_closed.shutdown(Shutdown::Write)?;
    drop(guest_closed);
    let _ = host_closed.read_to_end(&mut Vec::new());
    drop(host_closed);

    // Every exchange above went through its flow's entries (a masquerade or a
    // host flow needs one). Their presence is not checked here: the short
    // timeouts may already have taken some on a slow machine.

    // After the short timeouts and a reaper pass or two, only the established
    // connections are left, and they still carry traffic.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    let (egress, ingress, host_flows) = loop {
        std::thread::sleep(Duration::from_millis(500));
        let [egress, ingress, host_flows] = agent.flows()?;
        let left = egress_flows(&egress);
        if left == BTreeSet::from([(IPPROTO_TCP, 9301)])
            && ingress.len() == 1
            && host_flows.len() == 1
        {
            break (egress, ingress, host_flows);
        }
        ensure!(
            Instant::now() < deadline,
            "flows left after {:?}: egress {left:?}, {} ingress, {} host flows; log:\n{}",
            started.elapsed(),
            ingress.len(),
            host_flows.len(),
            agent.logs()
        );
    };
    println!(
        "pressure: closed, reset, opening, UDP and ICMP flows (and the closed host flow) gone within {:.1?} of the end of the traffic; established TCP (masquerade and host → HostIP) kept",
        started.elapsed()
    );
    // The kept flow is the established one (replied, no FIN or RST).
    let state = egress[0].1.state | ingress[0].1.state;
    ensure!(
        state & netagent_common::STATE_REPLIED != 0
            && state
                & (netagent_common::STATE_FIN_ORIG
                    | netagent_common::STATE_FIN_REPLY
                    | netagent_common::STATE_RST)
                == 0,
        "state {state:#x}"
    );
    ensure!(
        u16::from_be(host_flows[0].0.dport) == 8080 || u16::from_be(host_flows[0].0.sport) == 8080,
        "{:?}",
        host_flows[0]
    );
    tcp_roundtrip(&mut established, 4, 1000)?;
    let mut host_kept = host_kept;
    let mut guest_kept = guest_side.pop().context("first connection")?;
    host_kept.write_all(b"again")?;
    let mut buf = [0u8; 5];
    guest_kept.read_exact(&mut buf)?;
    guest_kept.write_all(&buf)?;
    host_kept.read_exact(&mut buf)?;
    ensure!(&buf == b"again");
    let stats = agent.stats(&rt)?;
    ensure!(
        stats.nat.failures == 0 && stats.drops["malformed"] == 0,
        "{stats:?}"
    );
    Ok(())
}

/// Other flows in the masquerade table in the later load phases.
const FILLER_FLOWS: u32 = 60_000;

/// Requests of one load phase; failures go to `errors`.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    churn_cycles: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
    /// Latencies of the churners' PUT and DELETE.
    latencies: std::sync::Mutex<BTreeMap<&'static str, Vec<Duration>>>,
}

impl Tally {
    fn error(&self, e: String) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    /// "DELETE p50 …, PUT p50 …" of the churners.
    fn latency_medians(&self) -> String {
        let mut l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        l.iter_mut()
            .map(|(method, v)| {
                v.sort();
                format!("{method} p50 {:.1?}", v[v.len() / 2])
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `seconds` of API load: 4 readers cycling through every GET route (bodies
/// checked) and `churners` tasks creating, reading and deleting their own slot.
/// Returns the tally and the elapsed time.
fn api_load(
    agent: &Agent,
    rt: &tokio::runtime::Runtime,
    seconds: u64,
    churners: i64,
) -> Result<(Arc<Tally>, Duration)> {
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for reader in 0..4 {
            let c = agent.client();
            let tally = tally.clone();
            tasks.push(tokio::spawn(async move {
                let routes = [
                    "/v1/slots",
                    "/v1/slots/1/stats",
                    "/metrics",
                    "/healthz",
                    "/v1/slots/1",
                ];
                let mut i = reader;
                while Instant::now() < end {
                    let path = routes[i % routes.len()];
                    i += 1;
                    match c.request("GET", path, None).await {
                        Ok(r) if r.status == 200 => {
                            let ok = match path {
                                "/metrics" => {
                                    r.text().contains("netagent_slot_packets_total{slot=\"1\"")
                                }
                                "/v1/slots/1/stats" => {
                                    r.json::<SlotCounters>("stats").is_ok_and(|s| s.index == 1)
                                }
                                "/v1/slots" => r
                                    .json::<Vec<SlotView>>("slots")
                                    .is_ok_and(|v| v.iter().any(|s| s.addr.index == 1)),
                                _ => true,
                            };
                            if !ok {
                                tally.error(format!("GET {path}: wrong body {}", r.text()));
                            }
                        }
                        Ok(r) => tally.error(format!("GET {path}: {} {}", r.status, r.text())),
                        Err(e) => tally.error(format!("GET {path}: {e}")),
                    }
                    tally.requests.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for churner in 0..churners {
            let c = agent.client();
            let tally = tally.clone();
            tasks.push(tokio::spawn(async move {
                let path = format!("/v1/slots/{}", 10 + churner);
                while Instant::now() < end {
                    for (method, want) in [("PUT", 201), ("GET", 200), ("DELETE", 204)] {
                        let t = Instant::now();
                        match c.request(method, &path, None).await {
                            Ok(r) if r.status == want => {
                                if method != "GET" {
                                    tally
                                        .latencies
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .entry(method)
                                        .or_default()
                                        .push(t.elapsed());
                                }
                            }
                            Ok(r) => {
                                tally.error(format!("{method} {path}: {} {}", r.status, r.text()))
                            }
                            Err(e) => tally.error(format!("{method} {path}: {e}")),
                        }
                        tally.requests.fetch_add(1, Ordering::Relaxed);
                    }
                    tally.churn_cycles.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        anyhow::Ok(())
    })?;
    Ok((tally, started.elapsed()))
}

#[test]
fn api_under_load_keeps_answering_and_traffic_flows() -> Result<()> {
    let Some(agent) = Agent::start(
        "api_under_load_keeps_answering_and_traffic_flows",
        &[
            "--nat-table-size",
            "65536",
            "--nat-host-flow-table-size",
            "1024",
        ],
    )?
    else {
        return Ok(());
    };
    let rt = rt();
    let guest = agent.guest_slot(&rt)?;
    let mut servers = Servers::new();
    servers.udp(&agent.world.wan_ns, 9400)?;
    servers.tcp(&agent.world.wan_ns, 9401)?;
    let udp = guest_udp(&guest.name, 9400)?;
    let mut tcp = guest_tcp(&guest.name, WAN, 9401)?;

    // Traffic all along: a UDP and a TCP echo through masquerade, each exchange
    // checked (a lost or late echo fails it).
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(u64, u64, u64)> {
            let (mut udp_n, mut tcp_n, mut bytes) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let payload: Vec<u8> = (0..512).map(|i| (i as u64 + udp_n) as u8).collect();
                udp_roundtrip(&udp, &payload).with_context(|| format!("UDP exchange {udp_n}"))?;
                udp_n += 1;
                tcp_roundtrip(&mut tcp, tcp_n as u8, 1400)
                    .with_context(|| format!("TCP exchange {tcp_n}"))?;
                tcp_n += 1;
                bytes += 512 + 1400;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok((udp_n, tcp_n, bytes))
        })
    };

    // Three phases: readers and 2 slot churners on an idle table; the same with
    // 60,000 other established flows in the masquerade table (of a slot that
    // does not exist, fresh, so the reaper keeps them), which scrapes, reaper
    // passes and slot deletes walk; and readers alone with those flows.
    let mut phases = Vec::new();
    phases.push((
        "idle table, readers + churners",
        api_load(&agent, &rt, 5, 2),
    ));
    let filled = (|| -> Result<()> {
        agent.fill_nat_egress(FILLER_FLOWS)?;
        let tables = agent.wait_tables(&rt, "filler flows counted", |m| {
            m.get("netagent_table_entries{table=nat_egress}") >= Some(&(FILLER_FLOWS as f64 + 2.0))
        })?;
        ensure!(
            tables.get("netagent_table_pressure{table=nat_egress}") == Some(&1.0),
            "60,000 of 65,536 is above the default 80 %: {tables:#?}"
        );
        Ok(())
    })();
    if filled.is_ok() {
        phases.push((
            "60,000 flows, readers + churners",
            api_load(&agent, &rt, 5, 2),
        ));
        phases.push(("60,000 flows, readers only", api_load(&agent, &rt, 5, 0)));
    }
    stop.store(true, Ordering::Relaxed);
    let (udp_n, tcp_n, bytes) = traffic
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))??;
    filled?;
    for (name, phase) in phases {
        let (tally, elapsed) = phase?;
        let requests = tally.requests.load(Ordering::Relaxed);
        println!(
            "pressure: API under load ({name}): {requests} requests in {elapsed:.1?} = {:.0} requests/s, \
             {} slot create/get/delete cycles ({})",
            requests as f64 / elapsed.as_secs_f64(),
            tally.churn_cycles.load(Ordering::Relaxed),
            tally.latency_medians()
        );
        let errors = tally.errors.lock().unwrap_or_else(|p| p.into_inner());
        ensure!(
            errors.is_empty(),
            "{name}: {} failed requests, first: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
    }
    println!(
        "pressure: guest traffic meanwhile: {udp_n} UDP and {tcp_n} TCP echoes, {bytes} bytes, none lost"
    );
    ensure!(udp_n > 0 && tcp_n > 0);
    let stats = agent.stats(&rt)?;
    ensure!(
        stats.nat.failures == 0 && stats.drops["malformed"] == 0,
        "{stats:?}"
    );
    // Only slot 1 is left.
    let slots = rt.block_on(agent.client().slots())?;
    ensure!(slots.len() == 1 && slots[0].addr.index == 1, "{slots:?}");
    Ok(())
}

/// What counting a flow table costs: NAT_EGRESS filled to 65,536 entries, then
/// the exact walk of `table_usage` and a reaper pass (which counts on the way);
/// the times are printed, the counts checked.
#[test]
fn table_counts_at_65536_entries() -> Result<()> {
    use netagent::bpf::{Datapath, DatapathConfig, FlowTable};
    use netagent::config::Timeouts;
    if !privileged_or_skip("table_counts_at_65536_entries") {
        return Ok(());
    }
    const N: u32 = 65_536;
    let mut config = netagent::config::Config {
        max_slots: 64,
        ..Default::default()
    };
    config.nat.table_size = N;
    config.nat.host_flow_table_size = 1024;
    let mut dp = Datapath::load(&DatapathConfig::from_config(&config).with_private_pins())?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    let now = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    let t = Instant::now();
    for i in 0..N {
        let key = FlowKey::new(
            map_ip(Ipv4Addr::new(10, 12, (i >> 8) as u8, i as u8)),
            map_ip(WAN),
            (1000 + (i % 50_000) as u16).to_be(),
            80u16.to_be(),
            IPPROTO_UDP,
        );
        // Half the flows idle for an hour, half fresh.
        let entry = NatEntry {
            last_seen_ns: if i % 2 == 0 {
                now - 3_600_000_000_000
            } else {
                now
            },
            addr: map_ip(UPLINK_IP),
            port: (20000 + (i % 12_000) as u16).to_be(),
            slot: 1,
            ..NatEntry::default()
        };
        dp.maps_mut()
            .insert_flow(FlowTable::NatEgress, &key, &entry)?;
    }
    let fill = t.elapsed();
    let t = Instant::now();
    let usage = dp.table_usage()?;
    let walk = t.elapsed();
    ensure!(
        usage.nat_egress == N as usize && usage.nat_capacity == N,
        "{usage:?}"
    );
    let timeouts = Timeouts {
        udp: 60,
        ..Timeouts::default()
    };
    let t = Instant::now();
    let long = Timeouts {
        udp: 7200,
        ..Timeouts::default()
    };
    let report = dp.reap_at(&long, now)?;
    let reap_none = t.elapsed();
    ensure!(
        report.total() == 0 && report.usage.nat_egress == N as usize,
        "{report:?}"
    );
    let t = Instant::now();
    let report = dp.reap_at(&timeouts, now + 1_000_000_000)?;
    let reap_half = t.elapsed();
    // The idle half has no ingress twin: orphans.
    ensure!(
        report.nat_orphans == (N / 2) as usize
            && report.usage.nat_egress == (N / 2) as usize
            && report.usage == dp.table_usage()?,
        "{report:?}"
    );
    println!(
        "pressure: {N} NAT_EGRESS entries: filling {fill:.1?}; table_usage walk (all three tables) {walk:.1?}; \
         reaper pass removing nothing {reap_none:.1?}, removing half {reap_half:.1?}"
    );
    Ok(())
}
