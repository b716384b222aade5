//! End to end with a real microVM guest (QEMU/TCG, `tests/src/vm.rs`) on a TAP.
//!
//! Needs root and the guest prepared by `cargo xtask guest` (`cargo xtask test` does
//! it); a missing guest or QEMU fails with what to run, it is never skipped.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use netagent_tests::vm::{GUEST_IP, GuestVm, guest_cmd};

/// Wait for a guest command's marker (the guest is already up).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Proves the VM fixture without netagent: a persistent TAP in a throwaway
/// namespace, the guest pinged from the namespace, the guest fetching from a server
/// in the namespace, and the namespace reaching a server in the guest.
#[test]
fn vm_boots_and_talks_on_tap() -> Result<()> {
    if !is_root() {
        eprintln!(
            "SKIP vm_boots_and_talks_on_tap: needs root (CAP_NET_ADMIN) to make namespaces and TAPs"
        );
        return Ok(());
    }
    let ns = Netns::add(&format!("{}-vm", unique_prefix()))?;
    let gw = Ipv4Addr::new(169, 254, 0, 22);
    ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", &ns.name, "tuntap", "add", "dev", "tap0", "mode", "tap",
    ])?;
    ip(&[
        "-n",
        &ns.name,
        "link",
        "set",
        "tap0",
        "address",
        "02:fc:00:00:00:05",
        "txqueuelen",
        "5000",
        "up",
    ])?;
    ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        "169.254.0.22/30",
        "dev",
        "tap0",
    ])?;

    let nonce = format!("tap-fixture-{:08x}", std::process::id() ^ 0x5eed);
    let listener =
        in_netns(&ns.name, || TcpListener::bind((gw, 8080)))?.context("bind 169.254.0.22:8080")?;
    let server = serve_once(listener, nonce.clone());

    let cmd = format!(
        "{}; {}; sleep 600",
        guest_cmd::http_server(80, "hello-from-guest"),
        guest_cmd::http_get("http://169.254.0.22:8080/hello")
    );
    let vm = GuestVm::boot(&ns.name, "tap0", &cmd)?;
    eprintln!("guest up in {:.2?}", vm.boot_time());

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
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    ensure!(
        peer.ip() == std::net::IpAddr::V4(GUEST_IP),
        "server saw peer {peer}, expected the guest {GUEST_IP}"
    );
    ensure!(request.starts_with("GET /hello "), "server got {request:?}");

    // Namespace -> guest: ICMP.
    let ping = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .args([
            "--",
            "busybox",
            "ping",
            "-c",
            "3",
            "-W",
            "5",
            &GUEST_IP.to_string(),
        ])
        .output()
        .context("run busybox ping (install busybox-static: cargo xtask deps)")?;
    let ping_out = String::from_utf8_lossy(&ping.stdout);
    ensure!(
        ping.status.success() && ping_out.contains("3 packets received"),
        "ping to the guest: {ping_out}{}",
        String::from_utf8_lossy(&ping.stderr)
    );

    // Namespace -> guest: TCP to the guest's httpd, which reports our address.
    vm.wait_for("NETAGENT-TEST: HTTPD 80", STEP_TIMEOUT)?;
    let peer_page = in_netns(&ns.name, || {
        http_get(SocketAddr::from((GUEST_IP, 80)), "/cgi-bin/peer")
    })??;
    ensure!(
        peer_page.contains(&format!("peer={gw}")),
        "guest httpd answered {peer_page:?}"
    );
    let index = in_netns(&ns.name, || http_get(SocketAddr::from((GUEST_IP, 80)), "/"))??;
    ensure!(
        index.contains("hello-from-guest"),
        "guest httpd answered {index:?}"
    );
    eprintln!(
        "boot {:.2?}; fetch, ping and guest httpd all fine",
        vm.boot_time()
    );
    Ok(())
}

// ---- helpers (local to this suite) ----

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `t` + 4 hex digits, unique enough per test run.
fn unique_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("t{:04x}", (std::process::id() ^ nanos) & 0xffff)
}

/// A throwaway named network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn add(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        Ok(Netns {
            name: name.to_string(),
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a thread that has entered the network namespace `name`; sockets it
/// creates stay in that namespace wherever they are used afterwards.
fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = std::fs::File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("open netns {name}"))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
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

// ---- with netagent ----

/// Uplink address of the test "host" namespace, on the veth to the "wan" namespace.
const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The wan namespace's address (the test servers).
const WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Masquerade range the daemon is started with (its defaults).
const PORT_MIN: u16 = 20000;
const PORT_MAX: u16 = 32767;

/// A real slot from a daemon in a throwaway host namespace; a VM on its `tap0`
/// fetches from a wan server (which sees the uplink address and a masquerade port),
/// and the host reaches the guest's HTTP server at HostIP (the reply must come back
/// from HostIP for the connection to work). Once with virtio offloads on (partial
/// checksums, TSO, as a VMM runs it) and once off.
#[test]
fn guest_vm_reaches_wan_and_host_reaches_guest() -> Result<()> {
    if !is_root() {
        eprintln!("SKIP guest_vm_reaches_wan_and_host_reaches_guest: needs root");
        return Ok(());
    }
    let world = World::new()?;
    let daemon = Daemon::up(&world)?;
    let slot = daemon
        .request("PUT", "/v1/slots/1")?
        .expect_status(201)?
        .json()?;
    let netns = slot["namespace"]
        .as_str()
        .context("slot.namespace")?
        .to_string();
    let host_ip: Ipv4Addr = slot["host_ip"].as_str().context("slot.host_ip")?.parse()?;
    let veth_ip: Ipv4Addr = slot["veth_ip"].as_str().context("slot.veth_ip")?.parse()?;

    for offload in [true, false] {
        // A body larger than one segment, so TSO/GRO paths are exercised.
        let body = format!("wan-{offload}-{}", "x".repeat(20_000));
        let listener = in_netns(&world.wan.name, || TcpListener::bind((WAN_IP, 8080)))??;
        let server = serve_once(listener, body.clone());
        let mut cfg = netagent_tests::vm::GuestConfig::new(
            &netns,
            "tap0",
            &format!(
                "{}; {} | tail -c 64; sleep 600",
                guest_cmd::http_server(8080, "hello-from-guest"),
                guest_cmd::http_get(&format!("http://{WAN_IP}:8080/big"))
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
            body.ends_with(&got) && !got.is_empty(),
            "offload {offload}: guest got the tail {got:?}"
        );
        let (peer, request) = server
            .join()
            .map_err(|_| anyhow::anyhow!("wan server panicked"))??;
        ensure!(
            request.starts_with("GET /big "),
            "wan server got {request:?}"
        );
        ensure!(
            peer.ip() == std::net::IpAddr::V4(UPLINK_IP)
                && (PORT_MIN..=PORT_MAX).contains(&peer.port()),
            "offload {offload}: wan server saw {peer}, expected {UPLINK_IP} with a port in {PORT_MIN}-{PORT_MAX}"
        );

        // Host -> guest at HostIP; the guest sees the host's veth address.
        vm.wait_for("NETAGENT-TEST: HTTPD 8080", STEP_TIMEOUT)?;
        let peer_page = in_netns(&world.host.name, || {
            http_get(SocketAddr::from((host_ip, 8080)), "/cgi-bin/peer")
        })??;
        ensure!(
            peer_page.contains(&format!("peer={veth_ip}")),
            "offload {offload}: guest httpd via HostIP answered {peer_page:?}"
        );
        let index = in_netns(&world.host.name, || {
            http_get(SocketAddr::from((host_ip, 8080)), "/")
        })??;
        ensure!(
            index.contains("hello-from-guest"),
            "guest httpd via HostIP answered {index:?}"
        );
        eprintln!(
            "offload {offload}: boot {:.2?}, wan saw {peer}, host reached {host_ip}",
            vm.boot_time()
        );
    }
    daemon
        .request("DELETE", "/v1/slots/1")?
        .expect_status(204)?;
    daemon.stop()
}

/// Issue 3 end to end: daemon up, slot created through the API, the VM fetches a
/// known amount from a wan server, the slot's stats and /metrics show that traffic
/// consistently, the slot is deleted and nothing of it is left.
#[test]
fn daemon_api_vm_stats_and_cleanup() -> Result<()> {
    if !is_root() {
        eprintln!("SKIP daemon_api_vm_stats_and_cleanup: needs root");
        return Ok(());
    }
    const INDEX: u32 = 7;
    const BODY_LEN: usize = 50_000;
    let world = World::new()?;
    let daemon = Daemon::up(&world)?;
    let slot = daemon
        .request("PUT", &format!("/v1/slots/{INDEX}"))?
        .expect_status(201)?
        .json()?;
    let netns = slot["namespace"]
        .as_str()
        .context("slot.namespace")?
        .to_string();
    let veth = slot["veth"].as_str().context("slot.veth")?.to_string();
    let host_ip = slot["host_ip"]
        .as_str()
        .context("slot.host_ip")?
        .to_string();
    ensure!(
        slot["guest_ip"] == "169.254.0.21" && slot["tap"] == "tap0",
        "slot JSON {slot}"
    );
    ensure!(
        netns == format!("{}-ns-{INDEX}", world.prefix),
        "namespace {netns}"
    );
    let fresh = daemon
        .request("GET", &format!("/v1/slots/{INDEX}/stats"))?
        .expect_status(200)?
        .json()?;
    ensure!(
        fresh["from_guest"]["packets"] == 0 && fresh["to_guest"]["packets"] == 0,
        "new slot stats {fresh}"
    );

    let body = "s".repeat(BODY_LEN);
    let listener = in_netns(&world.wan.name, || TcpListener::bind((WAN_IP, 8081)))??;
    let server = serve_once(listener, body);
    let vm = GuestVm::boot(
        &netns,
        "tap0",
        &format!(
            "timeout 20 wget -q -O /tmp/body http://{WAN_IP}:8081/stats; echo \"NETAGENT-TEST: GOT $? $(wc -c < /tmp/body)\"; \
             ping -c 2 -W 5 {WAN_IP} >/dev/null; echo \"NETAGENT-TEST: PING $?\""
        ),
    )?;
    let got = vm.wait_for("NETAGENT-TEST: GOT", STEP_TIMEOUT)?;
    ensure!(
        got.ends_with(&format!("GOT 0 {BODY_LEN}")),
        "guest fetch: {got}\n{}",
        vm.console()
    );
    let ping = vm.wait_for("NETAGENT-TEST: PING", STEP_TIMEOUT)?;
    ensure!(ping.ends_with("PING 0"), "guest ping to the wan: {ping}");
    vm.wait_exit(STEP_TIMEOUT)?;
    let (peer, _) = server
        .join()
        .map_err(|_| anyhow::anyhow!("wan server panicked"))??;
    ensure!(
        peer.ip() == std::net::IpAddr::V4(UPLINK_IP),
        "wan server saw {peer}"
    );
    drop(vm);

    // Traffic has stopped: the API and /metrics must agree exactly.
    let stats = daemon
        .request("GET", &format!("/v1/slots/{INDEX}/stats"))?
        .expect_status(200)?
        .json()?;
    let count = |dir: &str, what: &str| stats[dir][what].as_u64().unwrap_or(0);
    ensure!(
        count("from_guest", "packets") > 0 && count("to_guest", "packets") > 0,
        "stats {stats}"
    );
    ensure!(
        count("to_guest", "bytes") > BODY_LEN as u64,
        "to_guest bytes below the body size: {stats}"
    );
    ensure!(
        count("from_guest", "bytes") >= 60 * count("from_guest", "packets")
            && count("to_guest", "bytes") >= 60 * count("to_guest", "packets"),
        "bytes inconsistent with packets: {stats}"
    );
    ensure!(
        stats["nat"]["allocations"].as_u64().unwrap_or(0) >= 2,
        "a TCP flow and a ping flow: {stats}"
    );
    ensure!(stats["nat"]["failures"] == 0, "nat failures: {stats}");
    let metrics = daemon.request("GET", "/metrics")?.expect_status(200)?.body;
    for (dir, what, family) in [
        ("from_guest", "packets", "netagent_slot_packets_total"),
        ("to_guest", "packets", "netagent_slot_packets_total"),
        ("from_guest", "bytes", "netagent_slot_bytes_total"),
        ("to_guest", "bytes", "netagent_slot_bytes_total"),
    ] {
        let series = format!("{family}{{slot=\"{INDEX}\",direction=\"{dir}\"}}");
        let value = metric(&metrics, &series)
            .with_context(|| format!("no {series} in /metrics:\n{metrics}"))?;
        ensure!(
            value == count(dir, what),
            "{series} = {value}, stats say {}",
            count(dir, what)
        );
    }
    let allocations = metric(
        &metrics,
        &format!("netagent_slot_nat_allocations_total{{slot=\"{INDEX}\"}}"),
    )
    .context("no nat allocations series")?;
    ensure!(
        allocations == stats["nat"]["allocations"].as_u64().unwrap_or(u64::MAX),
        "nat allocations differ"
    );
    eprintln!("stats after the fetch: {stats}");

    daemon
        .request("DELETE", &format!("/v1/slots/{INDEX}"))?
        .expect_status(204)?;
    daemon
        .request("GET", &format!("/v1/slots/{INDEX}"))?
        .expect_status(404)?;
    ensure!(
        !std::path::Path::new(&format!("/run/netns/{netns}")).exists(),
        "namespace {netns} left behind"
    );
    let links = ip_output(&["-n", &world.host.name, "-o", "link", "show"])?;
    ensure!(
        !links.contains(&format!("{veth}@")) && !links.contains(&format!(" {veth}:")),
        "veth {veth} left behind:\n{links}"
    );
    let routes = ip_output(&["-n", &world.host.name, "route", "show"])?;
    ensure!(
        !routes.contains(&host_ip),
        "route to {host_ip} left behind:\n{routes}"
    );
    let metrics = daemon.request("GET", "/metrics")?.expect_status(200)?.body;
    ensure!(
        !metrics.contains(&format!("slot=\"{INDEX}\"")),
        "metrics still list slot {INDEX}"
    );
    daemon.stop()
}

/// The value of one series (exact name with labels) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespace world: `{p}-host` (where the agent runs; uplink `up0`
/// 198.18.0.2/24, default route via the wan) and `{p}-wan` (the test servers,
/// 198.18.0.1/24).
struct World {
    prefix: String,
    // Field order = drop order: host before wan (the veth goes with either).
    host: Netns,
    wan: Netns,
}

impl World {
    fn new() -> Result<World> {
        let prefix = unique_prefix();
        let host = Netns::add(&format!("{prefix}-host"))?;
        let wan = Netns::add(&format!("{prefix}-wan"))?;
        let (h, w) = (host.name.as_str(), wan.name.as_str());
        ip(&["-n", h, "link", "set", "lo", "up"])?;
        ip(&["-n", w, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", h, "link", "add", "up0", "type", "veth", "peer", "name", "wan0", "netns", w,
        ])?;
        ip(&[
            "-n",
            h,
            "addr",
            "add",
            &format!("{UPLINK_IP}/24"),
            "dev",
            "up0",
        ])?;
        ip(&[
            "-n",
            w,
            "addr",
            "add",
            &format!("{WAN_IP}/24"),
            "dev",
            "wan0",
        ])?;
        ip(&["-n", h, "link", "set", "up0", "up"])?;
        ip(&["-n", w, "link", "set", "wan0", "up"])?;
        ip(&[
            "-n",
            h,
            "route",
            "add",
            "default",
            "via",
            &WAN_IP.to_string(),
        ])?;
        Ok(World { prefix, host, wan })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Whatever a failed test left of the agent's slots.
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{}-ns-", self.prefix)) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
    }
}

/// `netagent up` in the world's host namespace, with its own socket and bpffs.
struct Daemon {
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
}

/// An API answer.
struct Answer {
    status: u16,
    body: String,
    what: String,
}

impl Answer {
    fn expect_status(self, want: u16) -> Result<Answer> {
        ensure!(
            self.status == want,
            "{}: status {} (want {want}): {}",
            self.what,
            self.status,
            self.body
        );
        Ok(self)
    }

    fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("{}: not JSON: {}", self.what, self.body))
    }
}

impl Daemon {
    fn up(world: &World) -> Result<Daemon> {
        let bin = netagent_bin()?;
        let dir = std::env::temp_dir().join(format!("netagent-e2e-{}", world.prefix));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("api.sock");
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", world.host.name))
            .arg("--")
            .arg(&bin)
            .args(["up", "--uplink", "up0", "--prefix", &world.prefix])
            .arg("--socket")
            .arg(&socket)
            .arg("--bpffs")
            // The agent mounts a bpffs at the parent of its pin directory.
            .arg(dir.join("bpffs/netagent"))
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut daemon = Daemon {
            child: Some(child),
            dir,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = daemon.request("GET", "/healthz")
                && a.status == 200
            {
                return Ok(daemon);
            }
            if let Some(child) = daemon.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("netagent up exited with {status}:\n{}", daemon.log());
            }
            ensure!(
                Instant::now() < deadline,
                "netagent up not ready within 30 s:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// One request over the Unix socket with curl.
    fn request(&self, method: &str, path: &str) -> Result<Answer> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "60",
                "-X",
                method,
                "-w",
                "\n%{http_code}",
                "--unix-socket",
            ])
            .arg(&self.socket)
            .arg(format!("http://localhost{path}"))
            .output()
            .context("run curl (install it: cargo xtask deps)")?;
        let what = format!("{method} {path}");
        ensure!(
            out.status.success(),
            "{what}: curl failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, status) = text.rsplit_once('\n').context("curl printed no status")?;
        Ok(Answer {
            status: status.trim().parse().context("curl status")?,
            body: body.to_string(),
            what,
        })
    }

    /// SIGTERM and a clean exit (the daemon deletes its slots and detaches).
    fn stop(mut self) -> Result<()> {
        let mut child = self.child.take().context("daemon already stopped")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(
                    status.success(),
                    "netagent up exited with {status}:\n{}",
                    self.log()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "netagent up did not stop within 30 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The agent mounted a bpffs at the parent of its pin directory.
        let _ = nix::mount::umount2(&self.dir.join("bpffs"), nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `netagent` binary next to this test binary (target/debug/), or
/// `$NETAGENT_BIN`.
fn netagent_bin() -> Result<std::path::PathBuf> {
    if let Some(bin) = std::env::var_os("NETAGENT_BIN") {
        return Ok(bin.into());
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("netagent"))
        .context("locate the target directory")?;
    ensure!(
        bin.is_file(),
        "{} is missing: run `cargo build -p netagent` first",
        bin.display()
    );
    Ok(bin)
}
