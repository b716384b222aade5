//! The namespace worlds the paths run on, and their removal.
//!
//! Every path gets its own identical chain so the rules of one never sit on the
//! packets of another; a veth into a guest namespace stands in for the TAP in all
//! of them (the VMM's cost would be the same for every path):
//!
//! ```text
//! f0:       guest[eth0 169.254.0.21] ── wan[eth0 198.18.0.2]           (one veth pair)
//! floor:    guest[eth0] ─ slot[tap0 169.254.0.22 | eth0 10.12.0.3/31]
//!                        ─ host[wr-veth-1 10.12.0.2/31 | up0 198.18.0.1/24] ─ wan[eth0 198.18.0.2]
//! legacy:   same chain, ip_forward=1, the seed's iptables rules (slot and host)
//! netagent: guest, host and wan made here (forwarding on the host's uplink only,
//!           ip_forward=0); the slot namespace, its veth and the guest link are
//!           made by `netagent up` running in the host namespace
//! ```
//!
//! Namespace names: `{prefix}{f|k|l|n}{g|s|h|w}`; the agent's slots
//! `{prefix}n-ns-N`. All start with the run prefix, which is how they are removed.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use super::agent::Agent;
use super::legacy::Legacy;
use super::proc::{self, Server, Side, ns_cmd, ns_cmd_on, run_bounded};
use super::stats::Path;
use super::{Bins, Plan, RUN_DIR, Results};

/// The wan server's address (198.18.0.0/15, DESIGN §5).
pub const SERVER_IP: &str = "198.18.0.2";
/// The host namespace's uplink address.
pub const UPLINK_IP: &str = "198.18.0.1";
/// The guest stand-in's address.
pub const GUEST_IP: &str = "169.254.0.21";
/// Slot 1's addresses (DESIGN §1).
pub const VETH_IP: &str = "10.12.0.2";
pub const VPEER_IP: &str = "10.12.0.3";
pub const HOST_IP: &str = "10.11.0.1";
/// Host-side veth name pattern for the chain worlds (short so index 32767 fits).
pub fn chain_veth(index: u32) -> String {
    format!("wr-veth-{index}")
}
/// Uplink name in every host namespace.
pub const UPLINK: &str = "up0";

/// Server ports in the wan namespaces.
pub const SOCKPERF_PORT: u16 = 11111;
pub const IPERF_PORT: u16 = 5201;
pub const CRR_PORT: u16 = 7000;
pub const UDP_PORT: u16 = 7001;

const STEP: Duration = Duration::from_secs(30);

/// One bench run: its prefix and pid file; dropping it removes every namespace of
/// the prefix.
pub struct Run {
    pub prefix: String,
    pub dir: std::path::PathBuf,
}

impl Run {
    pub fn new() -> Result<Run> {
        let mut seed = [0u8; 2];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .context("read /dev/urandom")?;
        let prefix = format!("xb{:02x}{:02x}", seed[0], seed[1]);
        let dir = std::path::Path::new(RUN_DIR).join(&prefix);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            std::path::Path::new(RUN_DIR).join(format!("{prefix}.pid")),
            std::process::id().to_string(),
        )?;
        Ok(Run { prefix, dir })
    }

    /// Namespace name for a path letter and role letter.
    pub fn ns(&self, path: char, role: char) -> String {
        format!("{}{path}{role}", self.prefix)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        remove_prefix(&self.prefix);
        let _ = std::fs::remove_file(
            std::path::Path::new(RUN_DIR).join(format!("{}.pid", self.prefix)),
        );
    }
}

/// Removes every namespace of `prefix` (one `ip -batch` process), the daemon a
/// killed run left behind, and the run directory.
fn remove_prefix(prefix: &str) {
    let pidfile = std::path::Path::new(RUN_DIR).join(format!("{prefix}.daemon.pid"));
    if let Ok(pid) = std::fs::read_to_string(&pidfile) {
        let pid = pid.trim();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("netagent") {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = std::fs::remove_file(&pidfile);
    }
    let names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    if !names.is_empty() {
        eprintln!("bench: removing {} namespaces of {prefix}", names.len());
        let batch: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
        let file = std::path::Path::new(RUN_DIR).join(format!("{prefix}.del"));
        if std::fs::write(&file, batch).is_ok() {
            let _ = proc::run_cleanup(
                Command::new("ip").args(["-force", "-batch"]).arg(&file),
                Duration::from_secs(600),
            );
            let _ = std::fs::remove_file(&file);
        }
    }
    let dir = std::path::Path::new(RUN_DIR).join(prefix);
    let bpffs = dir.join("bpffs");
    if bpffs.exists() {
        let _ = Command::new("umount")
            .arg(&bpffs)
            .stderr(std::process::Stdio::null())
            .status();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Cleans up after bench runs that were killed hard (their pid is gone).
pub fn clean_stale_runs() {
    let Ok(entries) = std::fs::read_dir(RUN_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(prefix) = name.strip_suffix(".pid") else {
            continue;
        };
        if prefix.contains('.') {
            continue;
        }
        let pid = std::fs::read_to_string(e.path()).unwrap_or_default();
        let alive = std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
            && !pid.trim().is_empty();
        if !alive {
            eprintln!("bench: cleaning up after killed run {prefix}");
            remove_prefix(prefix);
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// `ip args…` (in the bench's own namespace, which only makes and names netns and
/// links placed inside them).
pub fn ip(args: &[&str]) -> Result<()> {
    run_bounded(Command::new("ip").args(args), STEP)?;
    Ok(())
}

/// `ip -n ns args…`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    run_bounded(Command::new("ip").arg("-n").arg(ns).args(args), STEP)?;
    Ok(())
}

/// Sets a sysctl inside a namespace (via /proc/sys of a process in it).
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> Result<()> {
    run_bounded(
        ns_cmd(ns, "sysctl").args(["-q", "-w", &format!("{key}={value}")]),
        STEP,
    )?;
    Ok(())
}

/// Creates a namespace with `lo` up.
pub fn netns_add(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip_in(ns, &["link", "set", "lo", "up"])
}

/// A veth pair `a` (in `ns_a`) ⇄ `b` (in `ns_b`), both up, made inside `ns_a`.
pub fn veth(ns_a: &str, a: &str, ns_b: &str, b: &str) -> Result<()> {
    ip_in(
        ns_a,
        &[
            "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns_b,
        ],
    )?;
    ip_in(ns_a, &["link", "set", a, "up"])?;
    ip_in(ns_b, &["link", "set", b, "up"])
}

/// A guest namespace holding `eth0` = guest address, default route via the TAP ip.
fn guest_side(guest: &str) -> Result<()> {
    ip_in(
        guest,
        &["addr", "add", &format!("{GUEST_IP}/30"), "dev", "eth0"],
    )?;
    ip_in(guest, &["route", "add", "default", "via", "169.254.0.22"])
}

/// One path's namespaces and servers.
pub struct World {
    pub path: Path,
    pub guest: String,
    pub wan: String,
    pub host: Option<String>,
    pub slot: Option<String>,
    pub servers: Vec<Server>,
}

/// All worlds of the run, plus the legacy rule state and the agent.
pub struct Worlds {
    pub worlds: Vec<World>,
    pub legacy: Option<Legacy>,
    pub agent: Option<Agent>,
}

impl Worlds {
    pub fn build(run: &Run, plan: &Plan, bins: &Bins, results: &mut Results) -> Result<Worlds> {
        let mut worlds = Vec::new();
        let mut legacy = None;
        let mut agent = None;
        for &path in &plan.paths {
            proc::check_interrupted()?;
            let world = match path {
                Path::F0 => build_f0(run)?,
                Path::Floor => build_chain(run, 'k', Path::Floor)?,
                Path::Legacy => {
                    let w = build_chain(run, 'l', Path::Legacy)?;
                    legacy = Some(Legacy::install(
                        w.slot.as_deref().expect("chain"),
                        w.host.as_deref().expect("chain"),
                    )?);
                    w
                }
                Path::Netagent => {
                    let Some(bin) = bins.netagent.as_ref() else {
                        results
                            .notes
                            .push("netagent path skipped: the daemon does not build".into());
                        continue;
                    };
                    match build_agent_world(run, bin) {
                        Ok((w, a)) => {
                            agent = Some(a);
                            w
                        }
                        Err(e) => {
                            eprintln!("bench: netagent path skipped: {e:#}");
                            results.notes.push(format!("netagent path skipped: {e:#}"));
                            continue;
                        }
                    }
                }
            };
            worlds.push(world);
        }
        for w in &mut worlds {
            start_servers(run, bins, w)?;
        }
        let mut usable = Vec::new();
        for w in worlds {
            match check_reachable(&w) {
                Ok(()) => usable.push(w),
                Err(e) if w.path == Path::Netagent => {
                    // The datapath under test may be broken; measure the rest.
                    let stats = agent
                        .as_ref()
                        .and_then(|a| a.request("GET", "/v1/slots/1/stats", None).ok())
                        .map(|a| a.body)
                        .unwrap_or_default();
                    eprintln!("bench: netagent path skipped: {e:#}; slot 1 stats: {stats}");
                    results.notes.push(format!(
                        "netagent data path skipped: {e:#} (slot 1 counters: {stats}); \
                         its control plane is still measured"
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Worlds {
            worlds: usable,
            legacy,
            agent,
        })
    }

    /// Brings the legacy rules and the agent's slots to `n` slots (the agent's as
    /// far as `budget` allows).
    pub fn scale_to(&mut self, n: u32, budget: Duration, results: &mut Results) -> Result<()> {
        if let Some(legacy) = self.legacy.as_mut() {
            legacy.scale_to(n)?;
            let (filter, nat) = legacy.rule_counts()?;
            anyhow::ensure!(
                filter == 2 * n as usize && nat == n as usize,
                "legacy host holds {filter} FORWARD and {nat} nat rules, expected {} and {n}",
                2 * n
            );
        }
        if let Some(agent) = self.agent.as_mut() {
            match agent.scale_to(n, budget) {
                Ok((reached, took)) => {
                    if !took.is_zero() {
                        results.scale_steps.push((n, reached, took));
                    }
                    results.real_slots.push((n, reached));
                }
                Err(e) => {
                    results.real_slots.push((n, agent.n));
                    results
                        .notes
                        .push(format!("netagent: could not create {n} real slots: {e:#}"));
                }
            }
        }
        // Every path must still carry traffic at this N.
        for w in &self.worlds {
            check_reachable(w)?;
        }
        Ok(())
    }
}

impl Drop for Worlds {
    fn drop(&mut self) {
        for w in &mut self.worlds {
            w.servers.clear();
        }
        if let Some(agent) = self.agent.as_mut() {
            agent.shutdown();
        }
    }
}

fn build_f0(run: &Run) -> Result<World> {
    let (g, w) = (run.ns('f', 'g'), run.ns('f', 'w'));
    netns_add(&g)?;
    netns_add(&w)?;
    veth(&g, "eth0", &w, "eth0")?;
    ip_in(
        &g,
        &["addr", "add", &format!("{GUEST_IP}/32"), "dev", "eth0"],
    )?;
    ip_in(
        &g,
        &["route", "add", &format!("{SERVER_IP}/32"), "dev", "eth0"],
    )?;
    ip_in(
        &w,
        &["addr", "add", &format!("{SERVER_IP}/32"), "dev", "eth0"],
    )?;
    ip_in(
        &w,
        &["route", "add", &format!("{GUEST_IP}/32"), "dev", "eth0"],
    )?;
    Ok(World {
        path: Path::F0,
        guest: g,
        wan: w,
        host: None,
        slot: None,
        servers: Vec::new(),
    })
}

/// The slot chain with plain kernel forwarding (floor) or for the seed's rules
/// (legacy: the same, the rules are added by [`Legacy::install`]).
fn build_chain(run: &Run, letter: char, path: Path) -> Result<World> {
    let (g, s, h, w) = (
        run.ns(letter, 'g'),
        run.ns(letter, 's'),
        run.ns(letter, 'h'),
        run.ns(letter, 'w'),
    );
    for ns in [&g, &s, &h, &w] {
        netns_add(ns)?;
    }
    // guest ⇄ slot (the TAP stand-in)
    veth(&s, "tap0", &g, "eth0")?;
    ip_in(&s, &["link", "set", "tap0", "address", "02:fc:00:00:00:05"])?;
    ip_in(&s, &["addr", "add", "169.254.0.22/30", "dev", "tap0"])?;
    guest_side(&g)?;
    // slot ⇄ host, as the seed: eth0 = vpeer /31, default via veth
    let vethname = chain_veth(1);
    veth(&h, &vethname, &s, "eth0")?;
    ip_in(
        &s,
        &["addr", "add", &format!("{VPEER_IP}/31"), "dev", "eth0"],
    )?;
    ip_in(&s, &["route", "add", "default", "via", VETH_IP])?;
    ip_in(
        &h,
        &["addr", "add", &format!("{VETH_IP}/31"), "dev", &vethname],
    )?;
    ip_in(
        &h,
        &["route", "add", &format!("{HOST_IP}/32"), "via", VPEER_IP],
    )?;
    // host ⇄ wan
    veth(&h, UPLINK, &w, "eth0")?;
    ip_in(
        &h,
        &["addr", "add", &format!("{UPLINK_IP}/24"), "dev", UPLINK],
    )?;
    ip_in(
        &w,
        &["addr", "add", &format!("{SERVER_IP}/24"), "dev", "eth0"],
    )?;
    sysctl_in(&s, "net.ipv4.ip_forward", "1")?;
    sysctl_in(&h, "net.ipv4.ip_forward", "1")?;
    if path == Path::Floor {
        // No NAT: the wan and host route the guest's /30 back.
        ip_in(&h, &["route", "add", "169.254.0.20/30", "via", VPEER_IP])?;
        ip_in(&w, &["route", "add", "169.254.0.20/30", "via", UPLINK_IP])?;
    }
    Ok(World {
        path,
        guest: g,
        wan: w,
        host: Some(h),
        slot: Some(s),
        servers: Vec::new(),
    })
}

/// Host and wan namespaces for the agent, the agent itself, and slot 1 with its
/// guest side as a veth into the guest namespace.
fn build_agent_world(run: &Run, bin: &std::path::Path) -> Result<(World, Agent)> {
    let (g, h, w) = (run.ns('n', 'g'), run.ns('n', 'h'), run.ns('n', 'w'));
    for ns in [&g, &h, &w] {
        netns_add(ns)?;
    }
    veth(&h, UPLINK, &w, "eth0")?;
    ip_in(
        &h,
        &["addr", "add", &format!("{UPLINK_IP}/24"), "dev", UPLINK],
    )?;
    ip_in(
        &w,
        &["addr", "add", &format!("{SERVER_IP}/24"), "dev", "eth0"],
    )?;
    // Forwarding on the uplink, as on a host that forwards (one that ran the
    // seed must): `bpf_fib_lookup` needs it to give the datapath the next hop, so
    // masqueraded packets go straight into the wan namespace
    // (`bpf_redirect_peer`, the uplink being a veth) instead of through the
    // uplink's transmit path (`bpf_redirect_neigh`). ip_forward stays 0.
    sysctl_in(&h, &format!("net.ipv4.conf.{UPLINK}.forwarding"), "1")?;
    let mut agent = Agent::start(run, bin, &h)?;
    agent.create_guest_slot(1, &g)?;
    let slot = agent.slot_ns(1);
    Ok((
        World {
            path: Path::Netagent,
            guest: g,
            wan: w,
            host: Some(h),
            slot: Some(slot),
            servers: Vec::new(),
        },
        agent,
    ))
}

fn start_servers(run: &Run, bins: &Bins, w: &mut World) -> Result<()> {
    // The servers close first; without TIME_WAIT on their side a NAT's reuse of a
    // source port from an earlier round cannot collide with an old connection, so
    // rounds do not interfere (same for every path).
    sysctl_in(&w.wan, "net.ipv4.tcp_max_tw_buckets", "0")?;
    let log = |name: &str| run.dir.join(format!("{}-{name}.log", w.path.name()));
    let port = SOCKPERF_PORT.to_string();
    w.servers.push(Server::spawn(
        "sockperf server",
        ns_cmd_on(&w.wan, Side::Server, "sockperf")
            .args(["server", "--tcp", "-i", SERVER_IP, "-p", &port]),
        &log("sockperf"),
    )?);
    w.servers.push(Server::spawn(
        "iperf3 server",
        ns_cmd_on(&w.wan, Side::Server, "iperf3").args([
            "-s",
            "-B",
            SERVER_IP,
            "-p",
            &IPERF_PORT.to_string(),
        ]),
        &log("iperf3"),
    )?);
    let xtask = bins.xtask.to_string_lossy().into_owned();
    w.servers.push(Server::spawn(
        "crr server",
        ns_cmd_on(&w.wan, Side::Server, &xtask).args([
            "bench",
            "crr-server",
            "--listen",
            &format!("{SERVER_IP}:{CRR_PORT}"),
        ]),
        &log("crr"),
    )?);
    // Servers are ready once they listen.
    let wan = w.wan.clone();
    proc::wait_until("wan servers", Duration::from_secs(10), || {
        let out = proc::run_bounded_any(ns_cmd(&wan, "ss").args(["-Htln"]), Duration::from_secs(5));
        out.map(|o| {
            [SOCKPERF_PORT, IPERF_PORT, CRR_PORT]
                .iter()
                .all(|p| o.stdout.contains(&format!("{SERVER_IP}:{p}")))
        })
        .unwrap_or(false)
    })
}

/// One TCP request/response through the path, so a broken world fails early.
pub fn check_reachable(w: &World) -> Result<()> {
    super::tools::probe(&w.guest, SERVER_IP, CRR_PORT)
        .with_context(|| format!("{}: the guest cannot reach the wan server", w.path.name()))
}
