//! The netagent daemon under test: started as `target/release/netagent up` inside
//! the bench's host namespace (nsenter, network namespace only) with a bench
//! prefix, socket and bpffs, and driven through its HTTP API on the Unix socket
//! with a minimal HTTP/1.1 client (no curl process per request, so the measured
//! latency is the agent's).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path as FsPath, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::RUN_DIR;
use super::proc::{self, Server, ns_cmd};
use super::topology::{Run, UPLINK};

/// Concurrent API clients used to create many slots.
pub const BULK_CONCURRENCY: usize = 32;

pub struct Agent {
    pub bin: PathBuf,
    pub host_ns: String,
    pub prefix: String,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    daemon: Option<Server>,
    /// Slots 1..=n exist (slot 1 has the guest veth).
    pub n: u32,
}

/// An HTTP answer.
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Agent {
    pub fn start(run: &Run, bin: &FsPath, host_ns: &str) -> Result<Agent> {
        let prefix = format!("{}n", run.prefix);
        let socket = run.dir.join("agent.sock");
        let mount = run.dir.join("bpffs");
        std::fs::create_dir_all(&mount)?;
        // A private bpffs for this run's pins (umounted by the run's cleanup); the
        // agent pins into a directory on it.
        proc::run_bounded(
            Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&mount),
            Duration::from_secs(10),
        )?;
        let bpffs = mount.join("netagent");
        let log = run.dir.join("netagent.log");
        let daemon = Server::spawn(
            "netagent up",
            ns_cmd(host_ns, &bin.to_string_lossy())
                .args(["up", "--uplink", UPLINK, "--prefix", &prefix, "--socket"])
                .arg(&socket)
                .arg("--bpffs")
                .arg(&bpffs)
                .env("RUST_LOG", "warn"),
            &log,
        )?;
        std::fs::write(
            FsPath::new(RUN_DIR).join(format!("{}.daemon.pid", run.prefix)),
            daemon.pid().to_string(),
        )?;
        let mut agent = Agent {
            bin: bin.to_path_buf(),
            host_ns: host_ns.to_string(),
            prefix,
            socket,
            bpffs,
            daemon: Some(daemon),
            n: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            proc::check_interrupted()?;
            if let Some(d) = agent.daemon.as_mut() {
                d.check_alive()?;
            }
            if agent
                .request("GET", "/healthz", None)
                .map(|a| a.status == 200)
                .unwrap_or(false)
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("netagent did not answer /healthz within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().map(|d| d.pid()).unwrap_or(0)
    }

    /// Namespace of slot `k`.
    pub fn slot_ns(&self, k: u32) -> String {
        format!("{}-ns-{k}", self.prefix)
    }

    /// One HTTP/1.1 request on the API socket.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<Answer> {
        http(&self.socket, method, path, body)
    }

    /// Slot `k` with its guest side a veth into `guest_ns`.
    pub fn create_guest_slot(&mut self, k: u32, guest_ns: &str) -> Result<()> {
        let body = format!(r#"{{"guest_link":"veth","guest_netns":"{guest_ns}"}}"#);
        let a = self.request("PUT", &format!("/v1/slots/{k}"), Some(&body))?;
        if a.status != 201 && a.status != 200 {
            bail!(
                "PUT /v1/slots/{k} (veth into {guest_ns}): {} {}",
                a.status,
                a.body
            );
        }
        self.n = self.n.max(k);
        Ok(())
    }

    /// Creates slots `n+1..=target` (TAP guest side) with [`BULK_CONCURRENCY`]
    /// concurrent clients, stopping early when `budget` has passed or the machine
    /// runs low on memory. Returns the slot count reached and how long it took.
    pub fn scale_to(&mut self, target: u32, budget: Duration) -> Result<(u32, Duration)> {
        if target <= self.n {
            return Ok((self.n, Duration::ZERO));
        }
        let from = self.n + 1;
        let t0 = Instant::now();
        let deadline = t0 + budget;
        let stop = || Instant::now() > deadline || mem_available_kib() < LOW_MEMORY_KIB;
        let (ok, _lat, errs) = parallel_all(
            &self.socket,
            from,
            target,
            BULK_CONCURRENCY,
            "PUT",
            &[201, 200],
            &stop,
        );
        let took = t0.elapsed();
        self.n = from - 1 + ok;
        eprintln!(
            "bench: netagent created {ok} slots ({from}..={}) in {:.2}s{}",
            self.n,
            took.as_secs_f64(),
            if self.n < target {
                " (stopped: time budget or memory)"
            } else {
                ""
            }
        );
        if let Some(d) = self.daemon.as_mut() {
            d.check_alive()?;
        }
        if !errs.is_empty() {
            bail!(
                "{} of {} creates failed ({ok} slots were made, {} present), first: {}",
                errs.len(),
                target - from + 1,
                self.n,
                errs[0]
            );
        }
        Ok((self.n, took))
    }

    /// Resident memory of the daemon, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// Memory charged to the BPF maps the daemon holds open (fdinfo `memlock`),
    /// bytes, and how many maps.
    pub fn bpf_map_memory(&self) -> (u64, usize) {
        let mut total = 0;
        let mut maps = 0;
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fdinfo", self.pid())) else {
            return (0, 0);
        };
        let mut seen = std::collections::HashSet::new();
        for e in dir.flatten() {
            let Ok(info) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            if !info.contains("map_type:") {
                continue;
            }
            let id = info
                .lines()
                .find(|l| l.starts_with("map_id:"))
                .map(str::to_string);
            if let Some(id) = id
                && !seen.insert(id)
            {
                continue;
            }
            if let Some(m) = info
                .lines()
                .find(|l| l.starts_with("memlock:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                total += m;
                maps += 1;
            }
        }
        (total, maps)
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Memory of the BPF programs the daemon holds (`bpftool prog show` memlock of
    /// the ids in its fdinfo), bytes.
    pub fn bpf_prog_memory(&self) -> u64 {
        let ids = self.bpf_prog_ids();
        let Ok(out) = proc::run_bounded(
            Command::new("bpftool").args(["prog", "show"]),
            Duration::from_secs(60),
        ) else {
            return 0;
        };
        let mut total = 0;
        let mut current: Option<String> = None;
        for line in out.stdout.lines() {
            if !line.starts_with(char::is_whitespace) {
                current = line.split(':').next().map(|v| v.trim().to_string());
            }
            if let Some(id) = &current
                && ids.contains(id)
                && let Some(m) = line
                    .split_whitespace()
                    .skip_while(|w| *w != "memlock")
                    .nth(1)
                    .and_then(|v| v.trim_end_matches('B').parse::<u64>().ok())
            {
                total += m;
            }
        }
        total
    }

    fn bpf_prog_ids(&self) -> std::collections::HashSet<String> {
        let mut ids = std::collections::HashSet::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fdinfo", self.pid())) {
            for e in dir.flatten() {
                if let Ok(info) = std::fs::read_to_string(e.path())
                    && let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:"))
                {
                    ids.insert(id.trim().to_string());
                }
            }
        }
        ids
    }

    /// Distinct BPF programs the daemon holds open (prog and link fds).
    pub fn bpf_prog_count(&self) -> usize {
        self.bpf_prog_ids().len()
    }

    /// Stops the daemon (it deletes its slots on SIGTERM), then `netagent
    /// cleanup` for anything left.
    pub fn shutdown(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(60));
        }
        let _ = proc::run_cleanup(
            ns_cmd(&self.host_ns, &self.bin.to_string_lossy())
                .args(["cleanup", "--prefix", &self.prefix, "--bpffs"])
                .arg(&self.bpffs),
            Duration::from_secs(300),
        );
        // The agent's per-prefix lock file, should a killed agent have left it.
        let _ = std::fs::remove_file(format!("/run/netagent/{}.lock", self.prefix));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates slots `from..=to` with `conc` clients; returns how many were created and
/// each request's latency. Fails if any request failed.
pub fn create_range(
    socket: &FsPath,
    from: u32,
    to: u32,
    conc: usize,
) -> Result<(u32, Vec<Duration>)> {
    parallel(socket, from, to, conc, "PUT", &[201, 200], &|| false)
}

/// Deletes slots `from..=to` with `conc` clients.
pub fn delete_range(
    socket: &FsPath,
    from: u32,
    to: u32,
    conc: usize,
) -> Result<(u32, Vec<Duration>)> {
    parallel(socket, from, to, conc, "DELETE", &[204, 200], &|| false)
}

/// Below this much available memory the bench stops creating slots.
const LOW_MEMORY_KIB: u64 = 3 * 1024 * 1024;

/// MemAvailable from /proc/meminfo, KiB.
pub fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u64::MAX)
}

fn parallel(
    socket: &FsPath,
    from: u32,
    to: u32,
    conc: usize,
    method: &str,
    ok: &[u16],
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<(u32, Vec<Duration>)> {
    let (n, lat, errs) = parallel_all(socket, from, to, conc, method, ok, stop);
    proc::check_interrupted()?;
    if !errs.is_empty() {
        bail!(
            "{} of {} requests failed, first: {}",
            errs.len(),
            to - from + 1,
            errs[0]
        );
    }
    Ok((n, lat))
}

/// Requests `method /v1/slots/{from..=to}` with `conc` clients until done, `stop`
/// or 20 failures; returns the successes, their latencies and the failures.
fn parallel_all(
    socket: &FsPath,
    from: u32,
    to: u32,
    conc: usize,
    method: &str,
    ok: &[u16],
    stop: &(dyn Fn() -> bool + Sync),
) -> (u32, Vec<Duration>, Vec<String>) {
    let next = AtomicU32::new(from);
    let results = std::sync::Mutex::new((0u32, Vec::new(), Vec::<String>::new()));
    std::thread::scope(|s| {
        for _ in 0..conc.max(1) {
            s.spawn(|| {
                loop {
                    if proc::check_interrupted().is_err() || stop() {
                        return;
                    }
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    if k > to {
                        return;
                    }
                    let t = Instant::now();
                    let r = http(socket, method, &format!("/v1/slots/{k}"), None);
                    let lat = t.elapsed();
                    let mut g = results.lock().expect("not poisoned");
                    match r {
                        Ok(a) if ok.contains(&a.status) => {
                            g.0 += 1;
                            g.1.push(lat);
                        }
                        Ok(a) => {
                            g.2.push(format!("{method} slot {k}: {} {}", a.status, a.body.trim()))
                        }
                        Err(e) => g.2.push(format!("{method} slot {k}: {e:#}")),
                    }
                    if g.2.len() > 20 {
                        // Stop early: something is systematically wrong.
                        next.store(to + 1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    results.into_inner().expect("not poisoned")
}

/// A minimal HTTP/1.1 client over a Unix socket (`Connection: close`).
pub fn http(socket: &FsPath, method: &str, path: &str, body: Option<&str>) -> Result<Answer> {
    let mut s =
        UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // Read the head, then Content-Length bytes (or to EOF).
    loop {
        let n = s.read(&mut chunk).context("read the answer")?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if let Some(len) = len
                && buf.len() >= end + 4 + len
            {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(Answer { status, body })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
