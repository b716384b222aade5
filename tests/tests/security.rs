//! Security rules end to end through a real `netagent up` (see
//! `netagent_tests::daemon`) and real namespaces. A guest stands behind a veth
//! guest link in its own namespace (and once behind a TAP with a frame pump):
//! it spoofs sources, MACs and ARP, sends IPv6, tries the host's services,
//! other slots, the metadata address and private ranges, and floods; each case
//! checks what arrives (or not) at real sockets and the exact drop counters.
//!
//! ```text
//!   {p}-gN (guest)           {p}-ns-N          {p}-host (agent)               {p}-wan
//!   eth0 169.254.0.21 ⇄ tap0 ... eth0 ⇄ {p}-veth-N   up0 198.18.0.1 ⇄ wan0 198.18.0.2
//!                                                 (+ 203.0.113.1 added   + lo: 169.254.169.254,
//!                                                  later on lo)             10.200.0.1, 198.18.5.1
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use netagent::bpf::EgressRules;
use netagent::controller::SlotView;
use netagent::slot::addressing::{GUEST_IP, TAP_MAC};
use netagent::slot::{GuestLink, PolicyRequest, RateLimitSpec};
use netagent_common::SLOT_TAP_IFINDEX_BASE;
use netagent_tests::daemon::{Daemon, Netns, spawn_in_netns};
use netagent_tests::packet::{PacketBuilder, arp_request, ipv6_udp_frame};
use netagent_tests::pump::{Offload, Pump};

/// The wan address the tests' servers listen on (the wan namespace's own).
const WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The uplink address: an address of the host namespace.
const UPLINK: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The cloud metadata address, served in the wan namespace.
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// A private (10/8) server in the wan namespace.
const PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// A server in 198.18.0.0/15 outside the wan /24 (denied per slot in a test).
const WAN_OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 1);
/// An address added to the host namespace after the agent started.
const LATE_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The MAC the guests are given.
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x21];

const PORT: u16 = 7100;
const DENIED_WAIT: Duration = Duration::from_millis(1500);
const TIMEOUT: Duration = Duration::from_secs(5);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A quiet guest namespace `{p}-gN`: lo up, IPv6 off (nothing counted that the
/// test did not send).
fn guest_ns(d: &Daemon, n: u32) -> Result<Netns> {
    let ns = Netns::add(&format!("{}-g{n}", d.world.prefix))?;
    let fd = netagent::netlink::netns::open(&ns.name)?;
    for key in [
        "net.ipv6.conf.all.disable_ipv6",
        "net.ipv6.conf.default.disable_ipv6",
    ] {
        netagent::netlink::sysctl::write_in(fd.as_fd(), key, "1")?;
    }
    Ok(ns)
}

/// Creates slot `n` as a veth guest link into `guest` with `policy`; the guest's
/// eth0 has `policy`'s guest MAC (the agent sets it) or gets [`GUEST_MAC`].
fn veth_slot(
    d: &Daemon,
    rt: &tokio::runtime::Runtime,
    n: i64,
    guest: &Netns,
    policy: PolicyRequest,
) -> Result<SlotView> {
    let link = GuestLink::Veth {
        guest_netns: guest.name.clone(),
    };
    let (slot, created) = rt.block_on(d.client().create_slot_with(n, &link, &policy))?;
    ensure!(created);
    match policy.guest_mac {
        Some(mac) => ensure!(
            eth0_mac(&guest.name)? == mac_text(mac.0),
            "the agent did not give the guest's eth0 its MAC"
        ),
        None => ip(&[
            "-n",
            &guest.name,
            "link",
            "set",
            "eth0",
            "address",
            &mac_text(GUEST_MAC),
        ])?,
    }
    Ok(slot)
}

/// The MAC of `eth0` in namespace `ns`, as `ip` prints it.
fn eth0_mac(ns: &str) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-n", ns, "link", "show", "eth0"])
        .output()?;
    ensure!(out.status.success(), "ip link show eth0 in {ns}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["address"]
        .as_str()
        .map(str::to_string)
        .context("no address")
}

fn drops(d: &Daemon, rt: &tokio::runtime::Runtime, n: i64) -> Result<BTreeMap<String, u64>> {
    Ok(rt.block_on(d.client().stats(n))?.drops)
}

fn drop_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Sends raw Ethernet frames out of `dev` in namespace `ns` (AF_PACKET).
fn send_frames(ns: &str, dev: &str, frames: Vec<Vec<u8>>) -> Result<()> {
    let dev = dev.to_string();
    spawn_in_netns(ns, move || {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        ensure!(
            fd >= 0,
            "socket(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just created and is owned by nothing else.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let name = std::ffi::CString::new(dev.clone())?;
        // SAFETY: `name` is a valid NUL-terminated string for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no interface {dev}");
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        for frame in frames {
            // SAFETY: `frame` and `sll` are valid for the call and their lengths
            // are passed alongside; `sock` is open.
            let rc = unsafe {
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            ensure!(
                rc == frame.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender panicked"))?
}

/// A UDP socket on `addr` in `ns` that records every datagram's payload until
/// dropped.
struct UdpSink {
    stop: Arc<AtomicBool>,
    got: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    bytes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl UdpSink {
    fn start(ns: &str, addr: SocketAddrV4) -> Result<UdpSink> {
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let bytes = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, g, b) = (stop.clone(), got.clone(), bytes.clone());
        let thread = spawn_in_netns(ns, move || {
            let sock = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            // Room for a flood's bursts while this thread records.
            let size: libc::c_int = 8 << 20;
            // SAFETY: `sock` is open; `size` is a valid c_int whose size is passed.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const size).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let _ = ready_tx.send(());
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    b.fetch_add(n as u64, Ordering::Relaxed);
                    // The tags are short: keep the start of each datagram.
                    g.lock().unwrap().push(buf[..n.min(64)].to_vec());
                }
            }
            Ok(())
        });
        ready_rx
            .recv_timeout(TIMEOUT)
            .context("udp sink did not start")?;
        Ok(UdpSink {
            stop,
            got,
            bytes,
            thread: Some(thread),
        })
    }

    fn payloads(&self) -> Vec<Vec<u8>> {
        self.got.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP echo server on `addr` in `ns` until dropped.
struct TcpEcho {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl TcpEcho {
    fn start(ns: &str, addr: SocketAddrV4) -> Result<TcpEcho> {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = spawn_in_netns(ns, move || {
            let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            l.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        std::thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 || c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            Ok(())
        });
        ready_rx
            .recv_timeout(TIMEOUT)
            .context("tcp echo server did not start")?;
        Ok(TcpEcho {
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// From `ns`: connects to `dst` and echoes `len` bytes. `Ok(false)` when the
/// connection is not made within `wait`.
fn tcp_echo_from(ns: &str, dst: SocketAddrV4, len: usize, wait: Duration) -> Result<bool> {
    spawn_in_netns(ns, move || {
        let mut s = match TcpStream::connect_timeout(&dst.into(), wait) {
            Ok(s) => s,
            Err(_) => return Ok(false),
        };
        s.set_read_timeout(Some(TIMEOUT))?;
        let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
        let mut w = s.try_clone()?;
        let sent = data.clone();
        let writer = std::thread::spawn(move || w.write_all(&sent));
        let mut back = vec![0u8; len];
        s.read_exact(&mut back).context("read the echo")?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        ensure!(back == data, "echoed bytes differ");
        Ok(true)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client panicked"))?
}

/// From `ns`: `count` UDP datagrams to `dst`, each carrying `tag` and its number.
fn udp_from(ns: &str, dst: SocketAddrV4, tag: &'static str, count: usize) -> Result<()> {
    spawn_in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        for i in 0..count {
            s.send_to(format!("{tag} {i}").as_bytes(), dst)?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender panicked"))?
}

/// Adds `addr`/32 to `lo` of namespace `ns`.
fn add_lo_addr(ns: &str, addr: Ipv4Addr) -> Result<()> {
    ip(&["-n", ns, "addr", "add", &format!("{addr}/32"), "dev", "lo"])
}

fn ifindex(ns: &str, dev: &str) -> Result<u32> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-n", ns, "link", "show", dev])
        .output()?;
    ensure!(out.status.success(), "ip link show {dev} in {ns}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["ifindex"]
        .as_u64()
        .map(|i| i as u32)
        .context("no ifindex")
}

/// Spoofed IPv4 sources, a foreign Ethernet source, foreign ARP and IPv6 from
/// the guest never reach the wan and are counted by reason, exactly; the
/// guest's real traffic passes. `tap0` has its slot's fixed ifindex.
#[test]
fn spoofing_guests_are_dropped_and_counted() -> Result<()> {
    let Some(d) = Daemon::start("spoofing_guests_are_dropped_and_counted")? else {
        return Ok(());
    };
    let rt = rt();
    let g1 = guest_ns(&d, 1)?;
    let policy = PolicyRequest {
        guest_mac: Some(netagent::slot::GuestMac(GUEST_MAC)),
        ..PolicyRequest::default()
    };
    let slot = veth_slot(&d, &rt, 1, &g1, policy)?;
    assert_eq!(slot.policy.guest_mac.map(|m| m.0), Some(GUEST_MAC));
    assert_eq!(
        ifindex(&slot.addr.namespace, "tap0")?,
        SLOT_TAP_IFINDEX_BASE + 1
    );

    let sink = UdpSink::start(&d.world.wan_ns, SocketAddrV4::new(WAN, PORT))?;
    let dst = SocketAddrV4::new(WAN, PORT);
    // The real guest first (also resolves the gateway over ARP).
    udp_from(&g1.name, dst, "real", 3)?;
    wait_for(
        || sink.count() >= 3,
        "the guest's real datagrams at the wan",
    )?;
    let before = drops(&d, &rt, 1)?;

    let frame = |src: Ipv4Addr, mac: [u8; 6], tag: &str| {
        let mut b = PacketBuilder::udp(SocketAddrV4::new(src, 40000), dst, tag.as_bytes());
        b.src_mac = mac;
        b.dst_mac = TAP_MAC;
        b.build()
    };
    let other_ip = Ipv4Addr::new(169, 254, 0, 99);
    let other_mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
    let mut frames = Vec::new();
    for i in 0..4 {
        frames.push(frame(other_ip, GUEST_MAC, &format!("spoof-ip {i}")));
        frames.push(frame(WAN_OTHER, GUEST_MAC, &format!("spoof-wan {i}")));
        frames.push(frame(GUEST_IP, other_mac, &format!("spoof-mac {i}")));
    }
    // ARP claiming another address, and ARP naming another sender MAC (from
    // the guest's own Ethernet source).
    let gateway = Ipv4Addr::new(169, 254, 0, 22);
    for _ in 0..3 {
        frames.push(arp_request(GUEST_MAC, other_ip, gateway));
        let mut arp = arp_request(GUEST_MAC, GUEST_IP, gateway);
        // Ethernet header (14) + htype, ptype, hlen, plen, oper (8): sender MAC.
        arp[22..28].copy_from_slice(&other_mac);
        frames.push(arp);
    }
    for _ in 0..2 {
        frames.push(ipv6_udp_frame(GUEST_MAC, TAP_MAC));
    }
    // And a well-formed frame of the real guest, built the same way: it passes.
    frames.push(frame(GUEST_IP, GUEST_MAC, "forged-but-true"));
    send_frames(&g1.name, "eth0", frames)?;
    wait_for(
        || sink.payloads().iter().any(|p| p == b"forged-but-true"),
        "the true raw frame at the wan",
    )?;
    std::thread::sleep(Duration::from_millis(300));

    let got = drop_delta(&before, &drops(&d, &rt, 1)?);
    let want: BTreeMap<String, u64> = [("spoofed_source", 12), ("spoofed_arp", 6), ("ipv6", 2)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(got, want, "drops by reason");
    let spoofed: Vec<String> = sink
        .payloads()
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .filter(|p| p.starts_with("spoof"))
        .collect();
    assert!(
        spoofed.is_empty(),
        "spoofed datagrams reached the wan: {spoofed:?}"
    );
    Ok(())
}

/// The same rules behind a real TAP (a frame pump stands in for the VMM): a
/// spoofed source is dropped and counted, the guest's own traffic passes, and
/// `tap0` (a TUN device) has its slot's fixed ifindex.
#[test]
fn spoofing_behind_a_tap_is_dropped_and_counted() -> Result<()> {
    let Some(d) = Daemon::start("spoofing_behind_a_tap_is_dropped_and_counted")? else {
        return Ok(());
    };
    let rt = rt();
    let (slot, _) = rt.block_on(d.client().create_slot(3, &GuestLink::Tap))?;
    assert_eq!(
        ifindex(&slot.addr.namespace, "tap0")?,
        SLOT_TAP_IFINDEX_BASE + 3
    );
    let g3 = guest_ns(&d, 3)?;
    let _pump = Pump::start(&slot.addr.namespace, &g3.name, Offload::Off)?;
    let sink = UdpSink::start(&d.world.wan_ns, SocketAddrV4::new(WAN, PORT))?;
    let dst = SocketAddrV4::new(WAN, PORT);
    udp_from(&g3.name, dst, "real", 2)?;
    wait_for(
        || sink.count() >= 2,
        "the guest's datagrams through the TAP",
    )?;
    let before = drops(&d, &rt, 3)?;
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| {
            let mut b = PacketBuilder::udp(
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 77), 40000),
                dst,
                format!("spoof {i}").as_bytes(),
            );
            b.dst_mac = TAP_MAC;
            b.build()
        })
        .collect();
    send_frames(&g3.name, "eth0", frames)?;
    udp_from(&g3.name, dst, "after", 1)?;
    wait_for(
        || sink.payloads().iter().any(|p| p == b"after 0"),
        "the guest's datagram after the spoofed ones",
    )?;
    let got = drop_delta(&before, &drops(&d, &rt, 3)?);
    assert_eq!(got.get("spoofed_source"), Some(&5), "{got:?}");
    assert!(
        !sink.payloads().iter().any(|p| p.starts_with(b"spoof")),
        "a spoofed datagram reached the wan"
    );
    Ok(())
}

/// Runs `netagent ARGS` and parses its stdout as JSON.
fn cli_json<T: serde::de::DeserializeOwned>(d: &Daemon, args: &[&str]) -> Result<T> {
    let out = d.cli(args)?;
    ensure!(
        out.status.success(),
        "netagent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "netagent {args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Polls `f` until true (at most 10 s).
fn wait_for(f: impl Fn() -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The guest cannot open connections to the host's own addresses (the uplink
/// address, an address added after start, its own veth address) nor to another
/// slot's HostIP or vpeer (`host_denied`), unless its rules allow that exact
/// /32; the host reaches the guest at HostIP and data flows both ways.
#[test]
fn guests_cannot_reach_the_host_or_other_slots() -> Result<()> {
    let Some(d) = Daemon::start("guests_cannot_reach_the_host_or_other_slots")? else {
        return Ok(());
    };
    let rt = rt();
    let host = d.world.host_ns.clone();
    let (g1, g2) = (guest_ns(&d, 1)?, guest_ns(&d, 2)?);
    let s1 = veth_slot(&d, &rt, 1, &g1, PolicyRequest::default())?;
    let s2 = veth_slot(&d, &rt, 2, &g2, PolicyRequest::default())?;

    let _uplink_service = TcpEcho::start(&host, SocketAddrV4::new(UPLINK, PORT))?;
    let guest2_service = TcpEcho::start(&g2.name, SocketAddrV4::new(GUEST_IP, PORT))?;
    let guest1_service = TcpEcho::start(&g1.name, SocketAddrV4::new(GUEST_IP, PORT))?;

    // The host reaches both guests at their HostIPs, both ways.
    for (slot, service) in [(&s1, &guest1_service), (&s2, &guest2_service)] {
        let to = SocketAddrV4::new(slot.addr.host_ip, PORT);
        ensure!(
            tcp_echo_from(&host, to, 100_000, TIMEOUT)?,
            "the host cannot reach {to}"
        );
        assert_eq!(service.accepted(), 1);
    }

    let denied = |dst: Ipv4Addr| -> Result<()> {
        let before = drops(&d, &rt, 1)?;
        let made = tcp_echo_from(&g1.name, SocketAddrV4::new(dst, PORT), 10, DENIED_WAIT)?;
        let got = drop_delta(&before, &drops(&d, &rt, 1)?);
        ensure!(!made, "the guest connected to {dst}");
        ensure!(
            got.keys().collect::<Vec<_>>() == ["host_denied"],
            "to {dst}: drops {got:?}, want only host_denied"
        );
        Ok(())
    };
    denied(UPLINK)?;
    denied(s2.addr.host_ip)?;
    denied(s2.addr.vpeer_ip)?;
    denied(s1.addr.veth_ip)?;
    assert_eq!(guest2_service.accepted(), 1, "guest 1 reached guest 2");

    // An address the host namespace gets later is protected as well.
    add_lo_addr(&host, LATE_HOST)?;
    let _late_service = TcpEcho::start(&host, SocketAddrV4::new(LATE_HOST, PORT))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let before = drops(&d, &rt, 1)?;
        let made = tcp_echo_from(
            &g1.name,
            SocketAddrV4::new(LATE_HOST, PORT),
            10,
            DENIED_WAIT,
        )?;
        ensure!(
            !made,
            "the guest connected to {LATE_HOST}, added after start"
        );
        let got = drop_delta(&before, &drops(&d, &rt, 1)?);
        if got.contains_key("host_denied") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "traffic to {LATE_HOST} (added after start) is not host_denied: {got:?}"
        );
    }

    // An exact /32 allow opens one host address, and only that one.
    let allow = EgressRules {
        allow: vec![format!("{UPLINK}/32").parse()?],
        deny: vec![],
    };
    rt.block_on(d.client().set_egress(1, &allow))?;
    ensure!(
        tcp_echo_from(&g1.name, SocketAddrV4::new(UPLINK, PORT), 10_000, TIMEOUT)?,
        "an allowed /32 host address is not reachable"
    );
    denied(s2.addr.host_ip)?;
    // A wider allow does not open host addresses.
    let wide = EgressRules {
        allow: vec!["198.18.0.0/24".parse()?],
        deny: vec![],
    };
    rt.block_on(d.client().set_egress(1, &wide))?;
    denied(UPLINK)?;
    Ok(())
}

/// Metadata, private and other default-denied ranges are refused
/// (`policy_denied`, exactly one per datagram); a slot's allow opens a private
/// range and its removal closes it again; a slot's deny closes a public range
/// for that slot only.
#[test]
fn egress_defaults_and_per_slot_rules() -> Result<()> {
    let Some(d) = Daemon::start("egress_defaults_and_per_slot_rules")? else {
        return Ok(());
    };
    let rt = rt();
    let wan = d.world.wan_ns.clone();
    for addr in [METADATA, PRIVATE, WAN_OTHER] {
        add_lo_addr(&wan, addr)?;
    }
    let (g1, g2) = (guest_ns(&d, 1)?, guest_ns(&d, 2)?);
    veth_slot(&d, &rt, 1, &g1, PolicyRequest::default())?;
    veth_slot(&d, &rt, 2, &g2, PolicyRequest::default())?;
    let _services: Vec<TcpEcho> = [METADATA, PRIVATE, WAN_OTHER]
        .iter()
        .map(|a| TcpEcho::start(&wan, SocketAddrV4::new(*a, PORT)))
        .collect::<Result<_>>()?;
    let sinks: Vec<UdpSink> = [METADATA, PRIVATE]
        .iter()
        .map(|a| UdpSink::start(&wan, SocketAddrV4::new(*a, PORT + 1)))
        .collect::<Result<_>>()?;

    // Control: a public address passes.
    ensure!(tcp_echo_from(
        &g1.name,
        SocketAddrV4::new(WAN_OTHER, PORT),
        1000,
        TIMEOUT
    )?);

    // Denied by default, one policy_denied per datagram.
    let before = drops(&d, &rt, 1)?;
    for dst in [METADATA, PRIVATE] {
        udp_from(&g1.name, SocketAddrV4::new(dst, PORT + 1), "denied", 5)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let got = drop_delta(&before, &drops(&d, &rt, 1)?);
    assert_eq!(
        got,
        BTreeMap::from([("policy_denied".to_string(), 10)]),
        "drops of 10 datagrams to default-denied ranges"
    );
    assert_eq!(sinks.iter().map(UdpSink::count).sum::<usize>(), 0);
    for dst in [METADATA, PRIVATE] {
        ensure!(
            !tcp_echo_from(&g1.name, SocketAddrV4::new(dst, PORT), 10, DENIED_WAIT)?,
            "the guest connected to {dst}"
        );
    }

    // Allowed by the slot's rule, denied again when the rule goes.
    let allow = EgressRules {
        allow: vec!["10.200.0.0/16".parse()?],
        deny: vec![],
    };
    // Through the CLI, which prints the slot as the API returns it.
    let socket = d.world.socket().display().to_string();
    let view: SlotView = cli_json(
        &d,
        &[
            "slot",
            "egress",
            "1",
            "--allow",
            "10.200.0.0/16",
            "--json",
            "--socket",
            &socket,
        ],
    )?;
    assert_eq!(view.policy.egress, allow);
    assert_eq!(rt.block_on(d.client().slot(1))?.policy.egress, allow);
    ensure!(
        tcp_echo_from(&g1.name, SocketAddrV4::new(PRIVATE, PORT), 10_000, TIMEOUT)?,
        "an allowed private server is not reachable"
    );
    ensure!(
        !tcp_echo_from(&g2.name, SocketAddrV4::new(PRIVATE, PORT), 10, DENIED_WAIT)?,
        "slot 1's allow opened the range for slot 2"
    );
    ensure!(
        !tcp_echo_from(&g1.name, SocketAddrV4::new(METADATA, PORT), 10, DENIED_WAIT)?,
        "the allow opened the metadata address"
    );
    rt.block_on(d.client().set_egress(1, &EgressRules::default()))?;
    let before = drops(&d, &rt, 1)?;
    udp_from(&g1.name, SocketAddrV4::new(PRIVATE, PORT + 1), "again", 3)?;
    std::thread::sleep(Duration::from_millis(300));
    let got = drop_delta(&before, &drops(&d, &rt, 1)?);
    assert_eq!(got, BTreeMap::from([("policy_denied".to_string(), 3)]));
    assert_eq!(sinks[1].count(), 0);

    // A slot's own deny of a public range: that slot only.
    let deny = EgressRules {
        allow: vec![],
        deny: vec!["198.18.5.0/24".parse()?],
    };
    rt.block_on(d.client().set_egress(1, &deny))?;
    ensure!(
        !tcp_echo_from(
            &g1.name,
            SocketAddrV4::new(WAN_OTHER, PORT),
            10,
            DENIED_WAIT
        )?,
        "a denied public server is reachable"
    );
    ensure!(
        tcp_echo_from(&g2.name, SocketAddrV4::new(WAN_OTHER, PORT), 1000, TIMEOUT)?,
        "slot 1's deny closed the range for slot 2"
    );
    // Slot 2's only drops: its attempt at the private server.
    let d2: Vec<String> = drops(&d, &rt, 2)?
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(d2, ["policy_denied"], "slot 2's drops");
    Ok(())
}

/// A UDP socket bound to `addr` inside namespace `ns` (it stays there when
/// used from this thread).
fn udp_socket_in(ns: &str, addr: SocketAddrV4) -> Result<UdpSocket> {
    spawn_in_netns(ns, move || -> Result<UdpSocket> {
        let s = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("bind panicked"))?
}

/// The next datagram on `s` within `wait`: its text and source.
fn recv_within(s: &UdpSocket, wait: Duration) -> Option<(String, std::net::SocketAddr)> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            return Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
        }
    }
    None
}

/// A guest's established flows skip the egress policy in the datapath, so a
/// change cuts the ones it denies: after PUT egress denies 198.18.5.0/24 the
/// guest's live flow there is gone (its next datagrams are dropped and counted
/// `policy_denied`), while its live flow from the same socket to a still
/// allowed address keeps its masquerade port.
#[test]
fn a_policy_change_cuts_the_live_flows_it_denies() -> Result<()> {
    let Some(d) = Daemon::start("a_policy_change_cuts_the_live_flows_it_denies")? else {
        return Ok(());
    };
    let rt = rt();
    let wan = d.world.wan_ns.clone();
    add_lo_addr(&wan, WAN_OTHER)?;
    let g1 = guest_ns(&d, 1)?;
    veth_slot(&d, &rt, 1, &g1, PolicyRequest::default())?;
    let denied_dst = SocketAddrV4::new(WAN_OTHER, PORT);
    let kept_dst = SocketAddrV4::new(WAN, PORT);
    let denied_srv = udp_socket_in(&wan, denied_dst)?;
    let kept_srv = udp_socket_in(&wan, kept_dst)?;
    // One guest socket, two flows, each established (two datagrams through).
    let guest = udp_socket_in(&g1.name, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    let mut sources = Vec::new();
    for (srv, dst) in [(&denied_srv, denied_dst), (&kept_srv, kept_dst)] {
        let mut seen = Vec::new();
        for i in 0..2 {
            let tag = format!("before {i}");
            guest.send_to(tag.as_bytes(), dst)?;
            let (got, from) = recv_within(srv, TIMEOUT)
                .with_context(|| format!("{tag} to {dst} did not arrive"))?;
            assert_eq!(got, tag);
            assert_eq!(from.ip(), std::net::IpAddr::V4(UPLINK), "masqueraded");
            seen.push(from);
        }
        assert_eq!(seen[0], seen[1], "one flow, one masquerade port");
        sources.push(seen[0]);
    }

    let before = drops(&d, &rt, 1)?;
    let deny = EgressRules {
        allow: vec![],
        deny: vec!["198.18.5.0/24".parse()?],
    };
    rt.block_on(d.client().set_egress(1, &deny))?;
    for i in 0..3 {
        guest.send_to(format!("after {i}").as_bytes(), denied_dst)?;
    }
    guest.send_to(b"kept", kept_dst)?;
    let (got, from) =
        recv_within(&kept_srv, TIMEOUT).context("the allowed flow after the change")?;
    assert_eq!(got, "kept");
    assert_eq!(
        from, sources[1],
        "the allowed flow keeps its masquerade port"
    );
    assert_eq!(
        recv_within(&denied_srv, DENIED_WAIT),
        None,
        "a datagram of the cut flow arrived"
    );
    let got = drop_delta(&before, &drops(&d, &rt, 1)?);
    assert_eq!(got, BTreeMap::from([("policy_denied".to_string(), 3)]));
    Ok(())
}

/// From `ns`, UDP datagrams of `payload` bytes to `dst` at about `bits_per_sec`
/// (L2) for `secs`; returns (datagrams sent, seconds taken).
fn udp_flood(
    ns: &str,
    dst: SocketAddrV4,
    payload: usize,
    bits_per_sec: u64,
    secs: f64,
) -> Result<(u64, f64)> {
    spawn_in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        let frame_bits = ((payload + 8 + 20 + 14) * 8) as f64;
        let per_sec = bits_per_sec as f64 / frame_bits;
        let msg = vec![0x5au8; payload];
        let start = Instant::now();
        let mut sent = 0u64;
        loop {
            let elapsed = start.elapsed().as_secs_f64();
            if elapsed >= secs {
                break;
            }
            // At most a small batch per tick: a sender that was descheduled
            // does not catch up with a burst that overflows the veth backlog
            // (a drop there would be neither received nor counted).
            let due = ((elapsed * per_sec) as u64).min(sent + 64);
            while sent < due {
                match s.send_to(&msg, dst) {
                    Ok(_) => sent += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((sent, start.elapsed().as_secs_f64()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("flood panicked"))?
}

/// A guest flooding at 4× its 20 Mbit/s limit gets its limit through (measured
/// at the wan server), the rest is dropped and counted as `rate_limited`
/// (sent = received + rate_limited); an unlimited slot's transfer at the same
/// time is untouched; without the limit the same flood passes whole.
#[test]
fn rate_limit_holds_a_flood_to_its_rate() -> Result<()> {
    let Some(d) = Daemon::start("rate_limit_holds_a_flood_to_its_rate")? else {
        return Ok(());
    };
    let rt = rt();
    const LIMIT: u64 = 20_000_000;
    const BURST: u64 = 65_536;
    const PAYLOAD: usize = 1200;
    const SECS: f64 = 3.0;
    let l2 = (PAYLOAD + 8 + 20 + 14) as u64;
    let (g1, g2) = (guest_ns(&d, 1)?, guest_ns(&d, 2)?);
    let limited = PolicyRequest {
        rate_limit: Some(RateLimitSpec {
            bits_per_second: LIMIT,
            burst_bytes: BURST,
        }),
        ..PolicyRequest::default()
    };
    let s1 = veth_slot(&d, &rt, 1, &g1, limited)?;
    assert_eq!(s1.policy.rate_limit.map(|r| r.bits_per_second), Some(LIMIT));
    veth_slot(&d, &rt, 2, &g2, PolicyRequest::default())?;
    let wan = d.world.wan_ns.clone();
    let sink = UdpSink::start(&wan, SocketAddrV4::new(WAN, PORT + 1))?;
    let _echo = TcpEcho::start(&wan, SocketAddrV4::new(WAN, PORT))?;
    // Resolve the gateway first (ARP passes outside the limit anyway).
    udp_from(&g1.name, SocketAddrV4::new(WAN, PORT + 2), "warm-up", 1)?;
    let before = drops(&d, &rt, 1)?;
    let before2 = drops(&d, &rt, 2)?;

    // Slot 2 moves 8 MB while slot 1 floods.
    let g2_name = g2.name.clone();
    let other = std::thread::spawn(move || {
        tcp_echo_from(&g2_name, SocketAddrV4::new(WAN, PORT), 8 << 20, TIMEOUT * 6)
    });
    let (sent, secs) = udp_flood(
        &g1.name,
        SocketAddrV4::new(WAN, PORT + 1),
        PAYLOAD,
        4 * LIMIT,
        SECS,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let received = sink.bytes() / PAYLOAD as u64;
    let limited_drops = drop_delta(&before, &drops(&d, &rt, 1)?)
        .get("rate_limited")
        .copied()
        .unwrap_or(0);
    let measured = (received * l2 * 8) as f64 / secs;
    let expected = LIMIT as f64 + (BURST * 8) as f64 / secs;
    eprintln!(
        "rate limit {LIMIT} bit/s, burst {BURST} B: sent {sent} frames ({:.1} Mbit/s) in {secs:.2} s, \
         received {received} ({:.2} Mbit/s, expected {:.2}), rate_limited {limited_drops}",
        (sent * l2 * 8) as f64 / secs / 1e6,
        measured / 1e6,
        expected / 1e6
    );
    ensure!(
        other
            .join()
            .map_err(|_| anyhow::anyhow!("slot 2 panicked"))??,
        "the unlimited slot's transfer did not go through during the flood"
    );
    let d2 = drop_delta(&before2, &drops(&d, &rt, 2)?);
    assert!(d2.is_empty(), "the unlimited slot had drops: {d2:?}");
    ensure!(
        (0.75 * expected..=1.1 * expected).contains(&measured),
        "received {:.2} Mbit/s at the wan, want about {:.2}",
        measured / 1e6,
        expected / 1e6
    );
    // Every frame sent was either received or counted as rate_limited.
    assert_eq!(
        received + limited_drops,
        sent,
        "received + rate_limited vs sent"
    );

    // Without the limit the same flood passes whole.
    let socket = d.world.socket().display().to_string();
    let view: SlotView = cli_json(
        &d,
        &["slot", "rate", "1", "--off", "--json", "--socket", &socket],
    )?;
    assert_eq!(view.policy.rate_limit, None);
    assert_eq!(rt.block_on(d.client().slot(1))?.policy.rate_limit, None);
    let before = drops(&d, &rt, 1)?;
    let got_before = sink.bytes() / PAYLOAD as u64;
    let (sent, _) = udp_flood(
        &g1.name,
        SocketAddrV4::new(WAN, PORT + 1),
        PAYLOAD,
        4 * LIMIT,
        1.0,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let received = sink.bytes() / PAYLOAD as u64 - got_before;
    let got = drop_delta(&before, &drops(&d, &rt, 1)?);
    assert!(got.is_empty(), "drops without a limit: {got:?}");
    assert_eq!(received, sent, "without a limit every datagram arrives");
    Ok(())
}

/// `egress_default_deny` from the command line replaces the default list: with
/// only 198.18.5.0/24 denied, the private server is reachable and that range is
/// not (`policy_denied`).
#[test]
fn the_configured_default_deny_list_is_the_one_applied() -> Result<()> {
    let opts = netagent_tests::daemon::DaemonOptions {
        args: vec!["--egress-default-deny".into(), "198.18.5.0/24".into()],
        ..Default::default()
    };
    let Some(d) = Daemon::start_with("the_configured_default_deny_list_is_the_one_applied", opts)?
    else {
        return Ok(());
    };
    let rt = rt();
    let wan = d.world.wan_ns.clone();
    for addr in [PRIVATE, WAN_OTHER] {
        add_lo_addr(&wan, addr)?;
    }
    let _services: Vec<TcpEcho> = [PRIVATE, WAN_OTHER]
        .iter()
        .map(|a| TcpEcho::start(&wan, SocketAddrV4::new(*a, PORT)))
        .collect::<Result<_>>()?;
    let g1 = guest_ns(&d, 1)?;
    veth_slot(&d, &rt, 1, &g1, PolicyRequest::default())?;
    ensure!(
        tcp_echo_from(&g1.name, SocketAddrV4::new(PRIVATE, PORT), 1000, TIMEOUT)?,
        "10/8 is denied although the configured list leaves it out"
    );
    let before = drops(&d, &rt, 1)?;
    ensure!(
        !tcp_echo_from(
            &g1.name,
            SocketAddrV4::new(WAN_OTHER, PORT),
            10,
            DENIED_WAIT
        )?,
        "the configured deny list is not applied"
    );
    let got = drop_delta(&before, &drops(&d, &rt, 1)?);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["policy_denied"], "{got:?}");
    Ok(())
}

/// Through the real daemon: bad settings are a 400 that creates nothing; a
/// repeated create answers 200 when what it names matches and 409 (naming the
/// sub-route) when not; the sub-routes answer 404 for an unknown slot; GET
/// shows what was set.
#[test]
fn policy_requests_are_validated_and_idempotent() -> Result<()> {
    let Some(d) = Daemon::start("policy_requests_are_validated_and_idempotent")? else {
        return Ok(());
    };
    let rt = rt();
    let c = d.client();
    rt.block_on(async {
        for (body, needle) in [
            (r#"{"egress":{"allow":["10.0.0.1/8"]}}"#, "host bits set"),
            (r#"{"guest_mac":"01:00:5e:00:00:01"}"#, "unicast"),
            (
                r#"{"rate_limit":{"bits_per_second":0,"burst_bytes":65536}}"#,
                "bits_per_second 0",
            ),
            (r#"{"egress":{"deny":[]},"colour":1}"#, "unknown field"),
        ] {
            let r = c.request("PUT", "/v1/slots/5", Some(body.as_bytes())).await?;
            ensure!(r.status == 400, "{body}: {} {}", r.status, r.text());
            ensure!(r.text().contains(needle), "{body}: {}", r.text());
        }
        ensure!(d.world.slot_namespaces().is_empty(), "a bad request made a slot");

        let body = r#"{"guest_mac":"02:00:00:00:00:05","egress":{"allow":["10.1.0.0/16"]},"rate_limit":{"bits_per_second":50000000,"burst_bytes":65536}}"#;
        let r = c.request("PUT", "/v1/slots/5", Some(body.as_bytes())).await?;
        ensure!(r.status == 201, "{} {}", r.status, r.text());
        let created: SlotView = r.json("slot")?;
        for again in [Some(body), None] {
            let r = c.request("PUT", "/v1/slots/5", again.map(str::as_bytes)).await?;
            ensure!(r.status == 200, "{again:?}: {} {}", r.status, r.text());
            ensure!(r.json::<SlotView>("slot")? == created);
        }
        let r = c
            .request("PUT", "/v1/slots/5", Some(br#"{"egress":{}}"#))
            .await?;
        ensure!(
            r.status == 409 && r.text().contains("PUT /v1/slots/5/egress"),
            "{} {}",
            r.status,
            r.text()
        );
        for (method, path) in [
            ("PUT", "/v1/slots/6/egress"),
            ("PUT", "/v1/slots/6/rate_limit"),
            ("DELETE", "/v1/slots/6/rate_limit"),
        ] {
            let body: Option<&[u8]> = match (method, path.ends_with("egress")) {
                ("PUT", true) => Some(b"{}"),
                ("PUT", false) => Some(br#"{"bits_per_second":1000000,"burst_bytes":4000}"#),
                _ => None,
            };
            let r = c.request(method, path, body).await?;
            ensure!(r.status == 404, "{method} {path}: {} {}", r.status, r.text());
        }
        let shown = c.slot(5).await?;
        ensure!(shown == created, "GET shows {shown:?}");
        let limit = shown.policy.rate_limit.context("no rate limit")?;
        ensure!(limit.bits_per_second == 50_000_000 && limit.burst_bytes == 65_536);
        Ok(())
    })
}

/// A TCP stream from a guest limited to 20 Mbit/s never gets more than the
/// limit plus its burst through (the limiter drops, TCP backs off, every byte
/// still arrives), and the drops are counted as `rate_limited`.
#[test]
fn rate_limit_paces_a_tcp_stream() -> Result<()> {
    let Some(d) = Daemon::start("rate_limit_paces_a_tcp_stream")? else {
        return Ok(());
    };
    let rt = rt();
    const LIMIT: u64 = 20_000_000;
    const BURST: u64 = 256 << 10;
    const LEN: usize = 8 << 20;
    let g1 = guest_ns(&d, 1)?;
    let limited = PolicyRequest {
        rate_limit: Some(RateLimitSpec {
            bits_per_second: LIMIT,
            burst_bytes: BURST,
        }),
        ..PolicyRequest::default()
    };
    veth_slot(&d, &rt, 1, &g1, limited)?;
    let _echo = TcpEcho::start(&d.world.wan_ns, SocketAddrV4::new(WAN, PORT))?;
    let before = drops(&d, &rt, 1)?;
    let start = Instant::now();
    ensure!(
        tcp_echo_from(&g1.name, SocketAddrV4::new(WAN, PORT), LEN, TIMEOUT)?,
        "the limited guest cannot connect"
    );
    let secs = start.elapsed().as_secs_f64();
    let goodput = (LEN * 8) as f64 / secs;
    let ceiling = LIMIT as f64 + (BURST * 8) as f64 / secs;
    let got = drop_delta(&before, &drops(&d, &rt, 1)?);
    eprintln!(
        "tcp through a {LIMIT} bit/s limit: {LEN} bytes in {secs:.2} s = {:.2} Mbit/s goodput (ceiling {:.2}); drops {got:?}",
        goodput / 1e6,
        ceiling / 1e6
    );
    ensure!(
        goodput <= 1.05 * ceiling,
        "{:.2} Mbit/s of goodput through a {:.2} Mbit/s limit",
        goodput / 1e6,
        ceiling / 1e6
    );
    ensure!(
        got.keys().collect::<Vec<_>>() == ["rate_limited"],
        "drops {got:?}, want rate_limited only"
    );
    Ok(())
}
