//! End to end with a real microVM guest (QEMU/TCG, `tests/src/vm.rs`) on a TAP.
//!
//! Needs root and the guest prepared by `cargo xtask guest` (`cargo xtask test` does
//! it); a missing guest or QEMU fails with what to run, it is never skipped.
//!
//! - `vm_boots_and_talks_on_tap`: the fixture alone, on a TAP made with `ip`.
//! - `guest_vm_reaches_wan_and_host_reaches_guest`: a `SlotManager` in the world's
//!   host namespace (`tests/src/world.rs`), a real slot, the VM on its `tap0`.
//! - `daemon_api_vm_stats_and_cleanup`: `netagent up` (`tests/src/daemon.rs`), the
//!   slot made and removed through the API, its counters read back.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use netagent::netlink::netns;
use netagent::slot::GuestLink;
use netagent_tests::daemon::{self, Daemon, Netns};
use netagent_tests::vm::{GUEST_GATEWAY, GUEST_IP, GuestConfig, GuestVm, guest_cmd};
use netagent_tests::world::{self, World};

/// Wait for a guest command's marker (the guest is already up).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Port of the test HTTP servers (wan side) and of the guest's httpd.
const HTTP_PORT: u16 = 8080;

/// Proves the VM fixture without netagent: a persistent TAP in a throwaway
/// namespace, the guest pinged from the namespace, the guest fetching from a server
/// in the namespace, and the namespace reaching a server in the guest.
#[test]
fn vm_boots_and_talks_on_tap() -> Result<()> {
    if !daemon::privileged_or_skip("vm_boots_and_talks_on_tap") {
        return Ok(());
    }
    let ns = Netns::add(&format!("{}-vm", daemon::unique_prefix()))?;
    let n = ns.name.as_str();
    daemon::ip(&["-n", n, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
    daemon::ip(&[
        "-n",
        n,
        "link",
        "set",
        "tap0",
        "address",
        "02:fc:00:00:00:05",
        "txqueuelen",
        "5000",
        "up",
    ])?;
    daemon::ip(&["-n", n, "addr", "add", "169.254.0.22/30", "dev", "tap0"])?;

    let nonce = format!("tap-fixture-{:08x}", std::process::id() ^ 0x5eed);
    let listener = in_netns(n, || TcpListener::bind((GUEST_GATEWAY, HTTP_PORT)))?
        .with_context(|| format!("bind {GUEST_GATEWAY}:{HTTP_PORT}"))?;
    let server = serve_once(listener, nonce.clone());

    let cmd = format!(
        "{}; {}; sleep 600",
        guest_cmd::http_server(80, "hello-from-guest"),
        guest_cmd::http_get(&format!("http://{GUEST_GATEWAY}:{HTTP_PORT}/hello"))
    );
    let vm = GuestVm::boot(n, "tap0", &cmd)?;

    // Guest -> namespace: the fetch and what the server saw.
    let status = vm.wait_for("NETAGENT-TEST: FETCH", STEP_TIMEOUT)?;
    ensure!(
        status.ends_with("FETCH 0"),
        "guest wget failed: {status}\n{}",
        vm.console()
    );
    let body = between(
        &vm.console(),
        "NETAGENT-TEST: BODY-BEGIN",
        "NETAGENT-TEST: BODY-END",
    );
    ensure!(
        body.contains(&nonce),
        "guest fetched {body:?}, expected {nonce:?}"
    );
    let (peer, request) = server
        .join()
        .map_err(|_| anyhow!("server thread panicked"))??;
    ensure!(
        peer.ip() == IpAddr::V4(GUEST_IP),
        "server saw peer {peer}, expected the guest {GUEST_IP}"
    );
    ensure!(request.starts_with("GET /hello "), "server got {request:?}");

    // Namespace -> guest: ICMP.
    let ping = daemon::in_netns(
        n,
        "busybox",
        &["ping", "-c", "3", "-W", "5", &GUEST_IP.to_string()],
    )
    .context("run busybox ping (install busybox-static: cargo xtask deps)")?;
    let ping_out = String::from_utf8_lossy(&ping.stdout);
    ensure!(
        ping.status.success() && ping_out.contains("3 packets received"),
        "ping to the guest: {ping_out}{}",
        String::from_utf8_lossy(&ping.stderr)
    );

    // Namespace -> guest: TCP to the guest's httpd, which reports our address.
    vm.wait_for("NETAGENT-TEST: HTTPD 80", STEP_TIMEOUT)?;
    let peer_page = in_netns(n, || {
        http_get(SocketAddr::from((GUEST_IP, 80)), "/cgi-bin/peer")
    })??;
    ensure!(
        peer_page.contains(&format!("peer={GUEST_GATEWAY}")),
        "guest httpd answered {peer_page:?}"
    );
    let index = in_netns(n, || http_get(SocketAddr::from((GUEST_IP, 80)), "/"))??;
    ensure!(
        index.contains("hello-from-guest"),
        "guest httpd answered {index:?}"
    );
    eprintln!(
        "guest up in {:.2?}; fetch, ping and the guest's httpd all fine",
        vm.boot_time()
    );
    Ok(())
}

/// A real slot made by a `SlotManager` in the world's host namespace; a VM on its
/// `tap0` fetches from a wan server (which sees the uplink address and a port of
/// the masquerade range), and the host reaches the guest's HTTP server at HostIP
/// (the guest sees the host's veth address; the connection only works if the
/// replies come back from HostIP). Once with virtio offloads on (partial
/// checksums and TSO from the guest, as a VMM runs it) and once off.
#[test]
fn guest_vm_reaches_wan_and_host_reaches_guest() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let (slot, _) = agent.run(|m| async move { m.create(1, GuestLink::Tap).await })??;
    let nat = world.config().nat;
    let wan = world.wan_name();

    for offload in [true, false] {
        // Larger than one segment, so segmentation and checksum offload matter.
        let body = format!("wan-{offload}-{}", "x".repeat(20_000));
        let listener = in_netns(&wan, || TcpListener::bind((world::WAN_IP, HTTP_PORT)))??;
        let server = serve_once(listener, body.clone());
        let mut cfg = GuestConfig::new(
            &slot.namespace,
            &slot.tap,
            &format!(
                "{}; {} | tail -c 64; sleep 600",
                guest_cmd::http_server(HTTP_PORT, "hello-from-guest"),
                guest_cmd::http_get(&format!("http://{}:{HTTP_PORT}/big", world::WAN_IP))
            ),
        );
        cfg.offload = offload;
        let vm = GuestVm::boot_with(&cfg)?;
        let status = vm.wait_for("NETAGENT-TEST: FETCH", STEP_TIMEOUT)?;
        ensure!(
            status.ends_with("FETCH 0"),
            "offload {offload}: guest wget failed: {status}\n{}",
            vm.console()
        );
        let got = between(
            &vm.console(),
            "NETAGENT-TEST: BODY-BEGIN",
            "NETAGENT-TEST: BODY-END",
        );
        ensure!(
            !got.is_empty() && body.ends_with(&got),
            "offload {offload}: guest got the tail {got:?}"
        );
        let (peer, request) = server
            .join()
            .map_err(|_| anyhow!("wan server panicked"))??;
        ensure!(
            request.starts_with("GET /big "),
            "wan server got {request:?}"
        );
        ensure!(
            peer.ip() == IpAddr::V4(world::UPLINK_IP)
                && (nat.port_min..=nat.port_max).contains(&peer.port()),
            "offload {offload}: wan server saw {peer}, expected {} with a port in {}-{}",
            world::UPLINK_IP,
            nat.port_min,
            nat.port_max
        );

        vm.wait_for(&format!("NETAGENT-TEST: HTTPD {HTTP_PORT}"), STEP_TIMEOUT)?;
        let guest_at_host_ip = SocketAddr::from((slot.host_ip, HTTP_PORT));
        let peer_page = world.in_host(|| http_get(guest_at_host_ip, "/cgi-bin/peer"))??;
        ensure!(
            peer_page.contains(&format!("peer={}", slot.veth_ip)),
            "offload {offload}: guest httpd via HostIP answered {peer_page:?}"
        );
        let index = world.in_host(|| http_get(guest_at_host_ip, "/"))??;
        ensure!(
            index.contains("hello-from-guest"),
            "guest httpd via HostIP answered {index:?}"
        );
        // ICMP echo to HostIP: the echo id is tracked like a port.
        let ping = daemon::in_netns(
            &world.host_name(),
            "busybox",
            &["ping", "-c", "2", "-W", "5", &slot.host_ip.to_string()],
        )?;
        let ping_out = String::from_utf8_lossy(&ping.stdout);
        ensure!(
            ping.status.success() && ping_out.contains("2 packets received"),
            "offload {offload}: ping {} from the host: {ping_out}",
            slot.host_ip
        );
        eprintln!(
            "offload {offload}: guest up in {:.2?}, the wan saw {peer}, the host reached {}",
            vm.boot_time(),
            slot.host_ip
        );
    }
    agent.run(|m| async move { m.delete(1).await })??;
    agent.shutdown()
}

/// Issue 3 end to end: daemon up, slot created through the API, the VM fetches a
/// known amount from a wan server and pings it, the slot's stats and /metrics show
/// that traffic consistently, the slot is deleted and nothing of it is left.
#[test]
fn daemon_api_vm_stats_and_cleanup() -> Result<()> {
    const INDEX: i64 = 7;
    const BODY_LEN: usize = 50_000;
    let Some(mut d) = Daemon::start("daemon_api_vm_stats_and_cleanup")? else {
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = d.client();
    let (slot, created) = rt.block_on(client.create_slot(INDEX, &GuestLink::Tap))?;
    ensure!(created, "PUT /v1/slots/{INDEX} did not answer 201");
    let addr = slot.addr;
    ensure!(
        addr.namespace == format!("{}-ns-{INDEX}", d.world.prefix),
        "namespace {}",
        addr.namespace
    );
    ensure!(
        addr.guest_ip == GUEST_IP && addr.tap == "tap0",
        "slot {addr:?}"
    );
    let fresh = rt.block_on(client.stats(INDEX))?;
    ensure!(
        fresh.from_guest.packets == 0 && fresh.to_guest.packets == 0,
        "a new slot has traffic: {fresh:?}"
    );

    let wan_ip: Ipv4Addr = daemon::WAN_IP.parse()?;
    let uplink_ip: Ipv4Addr = daemon::UPLINK_IP.parse()?;
    let listener = in_netns(&d.world.wan_ns, || TcpListener::bind((wan_ip, HTTP_PORT)))??;
    let server = serve_once(listener, "s".repeat(BODY_LEN));
    let vm = GuestVm::boot(
        &addr.namespace,
        &addr.tap,
        &format!(
            "timeout 20 wget -q -O /tmp/body http://{wan_ip}:{HTTP_PORT}/stats; \
             echo \"NETAGENT-TEST: GOT $? $(wc -c < /tmp/body)\"; \
             ping -c 2 -W 5 {wan_ip} >/dev/null; echo \"NETAGENT-TEST: PING $?\""
        ),
    )?;
    let got = vm.wait_for("NETAGENT-TEST: GOT", STEP_TIMEOUT)?;
    ensure!(
        got.ends_with(&format!("GOT 0 {BODY_LEN}")),
        "guest fetch: {got}\n{}",
        vm.console()
    );
    let ping = vm.wait_for("NETAGENT-TEST: PING", STEP_TIMEOUT)?;
    ensure!(
        ping.ends_with("PING 0"),
        "guest ping to the wan: {ping}\n{}",
        vm.console()
    );
    vm.wait_exit(STEP_TIMEOUT)?;
    let (peer, _) = server
        .join()
        .map_err(|_| anyhow!("wan server panicked"))??;
    ensure!(
        peer.ip() == IpAddr::V4(uplink_ip),
        "wan server saw {peer}, expected {uplink_ip}"
    );
    drop(vm);

    // The guest is gone, so the counters are still: the API and /metrics must agree.
    let stats = rt.block_on(client.stats(INDEX))?;
    ensure!(
        stats.from_guest.packets > 0 && stats.to_guest.packets > 0,
        "no traffic counted: {stats:?}"
    );
    ensure!(
        stats.to_guest.bytes > BODY_LEN as u64,
        "to_guest bytes below the body size: {stats:?}"
    );
    for t in [&stats.from_guest, &stats.to_guest] {
        // Every counted frame is at least an Ethernet + IPv4 header and at most a
        // 64 KiB GSO packet.
        ensure!(
            t.bytes >= 34 * t.packets && t.bytes <= 65_550 * t.packets,
            "bytes inconsistent with packets: {stats:?}"
        );
    }
    ensure!(
        stats.nat.allocations >= 2,
        "a TCP and an ICMP flow need two allocations: {stats:?}"
    );
    // The guest kernel's own IPv6 (router solicitations, MLD reports) is the
    // only thing dropped: at the TAP, counted as such (IPv6 is not carried).
    let ipv6 = stats.drops.get("ipv6").copied().unwrap_or(0);
    ensure!(
        stats.nat.failures == 0 && stats.drops_total() == ipv6,
        "failures or drops other than ipv6: {stats:?}"
    );
    let metrics = rt.block_on(client.metrics())?;
    for (family, dir, want) in [
        (
            "netagent_slot_packets_total",
            "from_guest",
            stats.from_guest.packets,
        ),
        (
            "netagent_slot_packets_total",
            "to_guest",
            stats.to_guest.packets,
        ),
        (
            "netagent_slot_bytes_total",
            "from_guest",
            stats.from_guest.bytes,
        ),
        (
            "netagent_slot_bytes_total",
            "to_guest",
            stats.to_guest.bytes,
        ),
    ] {
        let series = format!("{family}{{slot=\"{INDEX}\",direction=\"{dir}\"}}");
        let value = metric(&metrics, &series)
            .with_context(|| format!("no {series} in /metrics:\n{metrics}"))?;
        ensure!(value == want, "{series} = {value}, the stats say {want}");
    }
    let series = format!("netagent_slot_nat_allocations_total{{slot=\"{INDEX}\"}}");
    ensure!(
        metric(&metrics, &series) == Some(stats.nat.allocations),
        "{series} differs from the stats"
    );
    eprintln!("after the fetch and ping: {stats:?}");

    rt.block_on(client.delete_slot(INDEX))?;
    let gone = rt.block_on(client.request("GET", &format!("/v1/slots/{INDEX}"), None))?;
    ensure!(
        gone.status == 404,
        "GET a deleted slot answered {}",
        gone.status
    );
    ensure!(
        d.world.slot_namespaces().is_empty(),
        "namespaces left: {:?}",
        d.world.slot_namespaces()
    );
    ensure!(
        d.world.host_links().is_empty(),
        "host links left: {:?}",
        d.world.host_links()
    );
    let routes = daemon::in_netns(
        &d.world.host_ns,
        "ip",
        &["-o", "route", "show", "table", "all"],
    )?;
    let routes = String::from_utf8_lossy(&routes.stdout);
    ensure!(
        !routes.contains(&addr.host_ip.to_string()),
        "a route to {} is left:\n{routes}",
        addr.host_ip
    );
    let metrics = rt.block_on(client.metrics())?;
    ensure!(
        !metrics.contains(&format!("slot=\"{INDEX}\"")),
        "/metrics still lists slot {INDEX}"
    );
    let status = d.stop()?;
    ensure!(
        status.success(),
        "netagent up exited with {status}:\n{}",
        d.logs()
    );
    Ok(())
}

// ---- helpers ----

/// Runs `f` on a thread inside the named namespace; sockets it makes stay there.
fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = netns::open(name)?;
    Ok(netns::run_in(ns.as_fd(), f)?)
}

/// Accepts one HTTP request, answers `body`, returns the peer and request line.
fn serve_once(
    listener: TcpListener,
    body: String,
) -> std::thread::JoinHandle<Result<(SocketAddr, String)>> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut stream, peer) = loop {
            match listener.accept() {
                Ok(conn) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ensure!(Instant::now() < deadline, "no connection within 120 s");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf)?;
            ensure!(n > 0, "client closed before the request ended");
            request.extend_from_slice(&buf[..n]);
        }
        write!(
            stream,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let request = String::from_utf8_lossy(&request);
        Ok((peer, request.lines().next().unwrap_or_default().to_string()))
    })
}

/// A plain HTTP/1.0 GET; returns the whole response.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("read the answer of {addr}"))?;
    Ok(response)
}

/// The text between two marker lines of the console.
fn between(console: &str, begin: &str, end: &str) -> String {
    let Some(start) = console.find(begin) else {
        return String::new();
    };
    let rest = &console[start + begin.len()..];
    rest[..rest.find(end).unwrap_or(rest.len())]
        .trim()
        .to_string()
}

/// The value of one series (exact name with labels) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}
