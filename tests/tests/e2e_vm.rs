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
