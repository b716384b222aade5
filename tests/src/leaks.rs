//! Everything a netagent instance could leak, seen from outside the agent, and a
//! diff of two such snapshots that names each leak.
//!
//! A [`Snapshot`] of a [`Target`] (one agent: its prefix, host namespace, bpffs
//! directory, pid and socket) holds:
//! - the named namespaces of the prefix in `/run/netns`;
//! - links (names), addresses and routes (all tables) of the host namespace, and
//!   links of extra watched namespaces (guest namespaces of veth slots);
//! - TCX program attachments of every device of the host namespace
//!   (`BPF_PROG_QUERY`, ingress and egress);
//! - system-wide BPF program, link and map ids (`BPF_*_GET_NEXT_ID`);
//! - every file under the instance's bpffs mount;
//! - entries of the pinned maps, read through the pins (an independent view of the
//!   kernel): active `SLOTS` indices, `ADDR_SLOTS`, `VETH_SLOTS`, `NAT_EGRESS`,
//!   `NAT_INGRESS`, `HOST_FLOWS`, learned `GUEST_L2` rows, non-zero `STATS` rows;
//! - the agent's own gauges from `/metrics` (slots, table entries, programs,
//!   attachments, per-slot series);
//! - the agent process: open fds (by kind: BPF programs, maps, links, sockets),
//!   threads and RSS.
//!
//! [`Snapshot::leaks`] compares a later snapshot with a baseline and returns one
//! [`Leak`] per thing that grew. System-wide BPF ids are shared with every other
//! process on the machine (other tests load the same programs), so their growth is
//! a leak only in [`Strictness::Global`]; otherwise it is a note.
//! [`settled_leaks`] re-takes the snapshot for a while so transient state (an API
//! connection being closed, a reaper run) is not reported as a leak.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use netagent::api::client::Client;
use netagent_common::{FlowKey, GuestL2, NatEntry, SlotInfo, SlotStats};

use crate::daemon::Daemon;

/// One agent instance, as seen from outside.
#[derive(Debug, Clone)]
pub struct Target {
    /// The instance's prefix.
    pub prefix: String,
    /// The namespace the agent runs in.
    pub host_ns: String,
    /// The bpffs mount of the instance (every file under it is a pin).
    pub bpffs_root: PathBuf,
    /// Where the maps are pinned.
    pub pin_dir: PathBuf,
    /// The agent's pid.
    pub pid: Option<u32>,
    /// The agent's API socket.
    pub socket: PathBuf,
    /// More namespaces whose links are watched (guest namespaces of veth slots).
    pub watch_ns: Vec<String>,
}

impl Target {
    /// The agent of a [`Daemon`] fixture.
    pub fn of(d: &Daemon) -> Target {
        let pin_dir = d.world.bpffs();
        Target {
            prefix: d.world.prefix.clone(),
            host_ns: d.world.host_ns.clone(),
            bpffs_root: pin_dir.parent().unwrap_or(&pin_dir).to_path_buf(),
            pin_dir,
            pid: d.pid(),
            socket: d.world.socket(),
            watch_ns: Vec::new(),
        }
    }

    /// Also watch the links of namespace `ns`.
    pub fn watch(mut self, ns: &str) -> Target {
        self.watch_ns.push(ns.to_string());
        self
    }
}

/// The agent process's resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcUsage {
    /// Open file descriptors.
    pub fds: usize,
    /// Fds by kind (`bpf-prog`, `bpf-map`, `bpf_link`, `socket`, `netns`, `file`, ...).
    pub fd_kinds: BTreeMap<String, usize>,
    /// Resident set size, kB (`VmRSS`).
    pub rss_kb: u64,
    /// Threads.
    pub threads: u64,
}

/// Everything a netagent instance could leak, at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `/run/netns` entries starting with `{prefix}-`.
    pub namespaces: BTreeSet<String>,
    /// Link names of the host namespace.
    pub host_links: BTreeSet<String>,
    /// Addresses of the host namespace (`dev family addr/len`).
    pub host_addrs: BTreeSet<String>,
    /// Routes of the host namespace, all tables (`table type dst dev`).
    pub host_routes: BTreeSet<String>,
    /// Links of each watched namespace.
    pub watched_links: BTreeMap<String, BTreeSet<String>>,
    /// Program attachments (TCX links and tc filters) per host-namespace device
    /// and direction (`dev/ingress` → program ids).
    pub attachments: BTreeMap<String, Vec<u32>>,
    /// System-wide BPF program ids.
    pub bpf_progs: BTreeSet<u32>,
    /// System-wide BPF link ids.
    pub bpf_links: BTreeSet<u32>,
    /// System-wide BPF map ids.
    pub bpf_maps: BTreeSet<u32>,
    /// Files under the instance's bpffs (relative paths).
    pub pins: BTreeSet<String>,
    /// Entries per pinned map (see the module doc for what counts).
    pub map_entries: BTreeMap<&'static str, usize>,
    /// Slot indices whose `SLOTS` entry is active.
    pub active_slots: BTreeSet<u32>,
    /// The agent's gauges from `/metrics` (series → value).
    pub metrics: BTreeMap<String, f64>,
    /// The agent process.
    pub agent: Option<ProcUsage>,
    /// What could not be read (a snapshot with errors is not trusted for a diff).
    pub errors: Vec<String>,
}

/// One leaked thing.
#[derive(Debug, Clone, PartialEq)]
pub struct Leak {
    /// What kind of resource.
    pub kind: &'static str,
    /// What exactly (names, counts before → after).
    pub detail: String,
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// How system-wide BPF ids count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// New system-wide program/link/map ids are notes (other processes load BPF too).
    Instance,
    /// New system-wide ids are leaks (a quiet machine).
    Global,
}

/// Takes a snapshot of `t`. Reads the agent's /proc before its `/metrics` so the
/// request's own connection is not counted.
pub fn snapshot(t: &Target) -> Snapshot {
    let mut s = Snapshot::default();
    // A deleted slot's veth pair goes when the kernel frees its namespace,
    // after the delete returned: count what is left once that is done.
    if let Err(e) = wait_for_retired_links(&t.host_ns, &t.prefix, RETIRED_LINKS_TIMEOUT) {
        s.errors.push(format!("{e:#}"));
    }
    if let Some(pid) = t.pid {
        match settled_proc_usage(pid) {
            Ok(u) => s.agent = Some(u),
            Err(e) => s.errors.push(format!("agent /proc: {e:#}")),
        }
    }
    s.namespaces = namespaces(&t.prefix);
    match ip_lines(&t.host_ns, &["link", "show"], link_name) {
        Ok(v) => s.host_links = v,
        Err(e) => s.errors.push(format!("host links: {e:#}")),
    }
    match ip_lines(&t.host_ns, &["addr", "show"], addr_lines) {
        Ok(v) => s.host_addrs = v,
        Err(e) => s.errors.push(format!("host addrs: {e:#}")),
    }
    match ip_lines(&t.host_ns, &["route", "show", "table", "all"], route_line) {
        Ok(v) => s.host_routes = v,
        Err(e) => s.errors.push(format!("host routes: {e:#}")),
    }
    for ns in &t.watch_ns {
        match ip_lines(ns, &["link", "show"], link_name) {
            Ok(v) => {
                s.watched_links.insert(ns.clone(), v);
            }
            Err(e) => s.errors.push(format!("links of {ns}: {e:#}")),
        }
    }
    match attachments(&t.host_ns) {
        Ok(v) => s.attachments = v,
        Err(e) => s.errors.push(format!("program attachments: {e:#}")),
    }
    s.bpf_progs = bpf_ids(BPF_PROG_GET_NEXT_ID);
    s.bpf_links = bpf_ids(BPF_LINK_GET_NEXT_ID);
    s.bpf_maps = bpf_ids(BPF_MAP_GET_NEXT_ID);
    s.pins = files_under(&t.bpffs_root);
    match pinned_map_entries(&t.pin_dir) {
        Ok((entries, active)) => {
            s.map_entries = entries;
            s.active_slots = active;
        }
        Err(e) => s.errors.push(format!("pinned maps: {e:#}")),
    }
    match agent_metrics(&t.socket) {
        Ok(m) => s.metrics = m,
        Err(e) => s.errors.push(format!("/metrics: {e:#}")),
    }
    s
}

impl Snapshot {
    /// What grew from `base` to `self`, each named. With [`Strictness::Instance`]
    /// new system-wide BPF ids are left out (see [`Snapshot::notes`]).
    pub fn leaks(&self, base: &Snapshot, strict: Strictness) -> Vec<Leak> {
        let mut out = Vec::new();
        for e in &self.errors {
            out.push(Leak {
                kind: "unreadable",
                detail: e.clone(),
            });
        }
        set_growth(&mut out, "namespace", &base.namespaces, &self.namespaces);
        set_growth(&mut out, "host link", &base.host_links, &self.host_links);
        set_growth(&mut out, "host address", &base.host_addrs, &self.host_addrs);
        set_growth(&mut out, "host route", &base.host_routes, &self.host_routes);
        for (ns, links) in &self.watched_links {
            let empty = BTreeSet::new();
            let before = base.watched_links.get(ns).unwrap_or(&empty);
            for l in links.difference(before) {
                out.push(Leak {
                    kind: "watched link",
                    detail: format!("{l} in {ns}"),
                });
            }
        }
        for (dev, ids) in &self.attachments {
            let before = base.attachments.get(dev).map_or(0, Vec::len);
            if ids.len() > before {
                out.push(Leak {
                    kind: "program attachment",
                    detail: format!("{dev}: {before} -> {} programs {ids:?}", ids.len()),
                });
            }
        }
        set_growth(&mut out, "pin", &base.pins, &self.pins);
        for (map, &n) in &self.map_entries {
            let before = base.map_entries.get(map).copied().unwrap_or(0);
            if n > before {
                out.push(Leak {
                    kind: "map entries",
                    detail: format!("{map}: {before} -> {n}"),
                });
            }
        }
        for i in self.active_slots.difference(&base.active_slots) {
            out.push(Leak {
                kind: "SLOTS entry",
                detail: format!("slot {i} still active"),
            });
        }
        for (series, &v) in &self.metrics {
            let before = base.metrics.get(series).copied().unwrap_or(0.0);
            if v > before {
                out.push(Leak {
                    kind: "metric",
                    detail: format!("{series}: {before} -> {v}"),
                });
            }
        }
        if let (Some(a), Some(b)) = (&self.agent, &base.agent) {
            for (kind, &n) in &a.fd_kinds {
                let before = b.fd_kinds.get(kind).copied().unwrap_or(0);
                if n > before {
                    out.push(Leak {
                        kind: "agent fd",
                        detail: format!("{kind}: {before} -> {n}"),
                    });
                }
            }
            if a.threads > b.threads + 4 {
                out.push(Leak {
                    kind: "agent threads",
                    detail: format!("{} -> {}", b.threads, a.threads),
                });
            }
        }
        if strict == Strictness::Global {
            out.extend(self.global_growth(base));
        }
        out
    }

    /// System-wide BPF objects that appeared since `base` (leaks in
    /// [`Strictness::Global`], otherwise only worth printing).
    pub fn global_growth(&self, base: &Snapshot) -> Vec<Leak> {
        let mut out = Vec::new();
        for (kind, before, after) in [
            (
                "bpf program (system-wide)",
                &base.bpf_progs,
                &self.bpf_progs,
            ),
            ("bpf link (system-wide)", &base.bpf_links, &self.bpf_links),
            ("bpf map (system-wide)", &base.bpf_maps, &self.bpf_maps),
        ] {
            let new: Vec<_> = after.difference(before).collect();
            if !new.is_empty() {
                let shown = &new[..new.len().min(16)];
                let more = if new.len() > shown.len() { " ..." } else { "" };
                out.push(Leak {
                    kind,
                    detail: format!(
                        "{} new ids ({} -> {} total): {shown:?}{more}",
                        new.len(),
                        before.len(),
                        after.len()
                    ),
                });
            }
        }
        out
    }

    /// Resident set size of the agent, kB.
    pub fn rss_kb(&self) -> Option<u64> {
        self.agent.as_ref().map(|a| a.rss_kb)
    }

    /// Open fds of the agent.
    pub fn fds(&self) -> Option<usize> {
        self.agent.as_ref().map(|a| a.fds)
    }

    /// A one-line summary (counts of everything).
    pub fn summary(&self) -> String {
        let attachments: usize = self.attachments.values().map(Vec::len).sum();
        let agent = self.agent.as_ref().map_or("no agent".to_string(), |a| {
            format!(
                "agent fds {} {:?} rss {} kB threads {}",
                a.fds, a.fd_kinds, a.rss_kb, a.threads
            )
        });
        format!(
            "namespaces {} host links {} addrs {} routes {} attachments {} pins {} maps {:?} active slots {} \
             bpf progs/links/maps system-wide {}/{}/{}; {agent}",
            self.namespaces.len(),
            self.host_links.len(),
            self.host_addrs.len(),
            self.host_routes.len(),
            attachments,
            self.pins.len(),
            self.map_entries,
            self.active_slots.len(),
            self.bpf_progs.len(),
            self.bpf_links.len(),
            self.bpf_maps.len(),
        )
    }
}

fn set_growth(
    out: &mut Vec<Leak>,
    kind: &'static str,
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
) {
    for x in after.difference(before) {
        out.push(Leak {
            kind,
            detail: format!("{x} (count {} -> {})", before.len(), after.len()),
        });
    }
}

/// Snapshots `t` until it shows no leak against `base` or `wait` has passed;
/// returns the last snapshot and its leaks (transient state settles, real leaks
/// stay).
pub fn settled_leaks(
    t: &Target,
    base: &Snapshot,
    strict: Strictness,
    wait: Duration,
) -> (Snapshot, Vec<Leak>) {
    let deadline = Instant::now() + wait;
    loop {
        let s = snapshot(t);
        let leaks = s.leaks(base, strict);
        if leaks.is_empty() || Instant::now() >= deadline {
            return (s, leaks);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `Err` naming every leak, or `Ok`.
pub fn ensure_no_leaks(leaks: &[Leak]) -> Result<()> {
    if leaks.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = leaks.iter().map(|l| format!("  {l}")).collect();
    bail!("{} leak(s):\n{}", leaks.len(), lines.join("\n"))
}

// ---- the agent process ----

/// The agent's /proc figures once its fds stopped changing (two reads 50 ms
/// apart agree, for at most 2 s): its namespace pool refills in the background
/// right after a create took one, and that is not a leak.
fn settled_proc_usage(pid: u32) -> Result<ProcUsage> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = proc_usage(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = proc_usage(pid)?;
        if now.fd_kinds == last.fd_kinds || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// Fds, their kinds, RSS and threads of process `pid`.
pub fn proc_usage(pid: u32) -> Result<ProcUsage> {
    let mut u = ProcUsage::default();
    let dir = format!("/proc/{pid}/fd");
    for e in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        let Ok(e) = e else { continue };
        u.fds += 1;
        let kind = std::fs::read_link(e.path())
            .map(|p| fd_kind(&p.to_string_lossy()))
            .unwrap_or_else(|_| "gone".to_string());
        *u.fd_kinds.entry(kind).or_default() += 1;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        let num = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("VmRSS:") {
            u.rss_kb = num(line);
        } else if line.starts_with("Threads:") {
            u.threads = num(line);
        }
    }
    Ok(u)
}

/// `anon_inode:bpf-prog` → `bpf-prog`, `socket:[123]` → `socket`, `net:[...]` →
/// `net`, a path → `file`.
fn fd_kind(target: &str) -> String {
    if let Some(rest) = target.strip_prefix("anon_inode:") {
        return rest.trim_matches(|c| c == '[' || c == ']').to_string();
    }
    if let Some((kind, _)) = target.split_once(":[") {
        return kind.to_string();
    }
    "file".to_string()
}

// ---- namespaces, links, routes ----

fn namespaces(prefix: &str) -> BTreeSet<String> {
    let lead = format!("{prefix}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&lead))
                .collect()
        })
        .unwrap_or_default()
}

/// `ip -j -n NS ARGS` parsed, each element mapped to zero or more strings.
fn ip_lines(
    ns: &str,
    args: &[&str],
    each: fn(&serde_json::Value) -> Vec<String>,
) -> Result<BTreeSet<String>> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-n", ns])
        .args(args)
        .output()
        .context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(BTreeSet::new());
    }
    let v: serde_json::Value = serde_json::from_str(&text).context("parse ip -j")?;
    Ok(v.as_array()
        .map(|a| a.iter().flat_map(each).collect())
        .unwrap_or_default())
}

fn field(v: &serde_json::Value, key: &str) -> String {
    match v.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn link_name(v: &serde_json::Value) -> Vec<String> {
    vec![field(v, "ifname")]
}

/// IPv6 link-local and multicast entries come and go with a link's
/// autoconfiguration (the uplink's appear some time after it is up); a leaked link
/// is reported as a link, so they are left out.
fn autoconf(addr: &str) -> bool {
    addr.starts_with("fe80:") || addr.starts_with("ff00::")
}

fn addr_lines(v: &serde_json::Value) -> Vec<String> {
    let dev = field(v, "ifname");
    v.get("addr_info")
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .filter(|i| !autoconf(&field(i, "local")))
                .map(|i| {
                    format!(
                        "{dev} {} {}/{}",
                        field(i, "family"),
                        field(i, "local"),
                        field(i, "prefixlen")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn route_line(v: &serde_json::Value) -> Vec<String> {
    if autoconf(&field(v, "dst")) {
        return Vec::new();
    }
    let table = field(v, "table");
    vec![format!(
        "table {} {} {} dev {}",
        if table.is_empty() { "main" } else { &table },
        field(v, "type"),
        field(v, "dst"),
        field(v, "dev")
    )]
}

// ---- bpf syscalls ----

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_MAP_GET_NEXT_ID: libc::c_long = 12;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// `union bpf_attr` as the commands used here read it, padded to the size the
/// kernel accepts (it checks that bytes past what it knows are zero).
#[repr(C)]
#[derive(Default)]
struct GetNextIdAttr {
    start_id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: [u32; 13],
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad0: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Every id the `*_GET_NEXT_ID` command `cmd` walks, system-wide.
fn bpf_ids(cmd: libc::c_long) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    let mut attr = GetNextIdAttr::default();
    loop {
        // SAFETY: bpf(2) reads and writes `attr`, a live, zero-padded repr(C) value
        // of the size passed alongside.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &mut attr as *mut GetNextIdAttr,
                std::mem::size_of::<GetNextIdAttr>() as u32,
            )
        };
        if rc != 0 {
            return ids;
        }
        ids.insert(attr.next_id);
        attr.start_id = attr.next_id;
    }
}

/// Program ids attached by TCX to `ifindex` in direction `attach_type`, in the
/// calling thread's namespace.
fn tcx_query(ifindex: u32, attach_type: u32) -> std::io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..QueryAttr::default()
    };
    // SAFETY: bpf(2) reads `attr` and writes up to `prog_cnt` u32 into `ids`, which
    // outlives the call; both are valid for the sizes given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}

/// Program ids of the tc (cls_bpf) filters on `dev`'s `ingress` or `egress`
/// hook, in the calling thread's namespace (`tc` runs there: a child gets the
/// forking thread's namespace).
fn tc_filter_progs(dev: &str, dir: &str) -> Result<Vec<u32>> {
    let out = std::process::Command::new("tc")
        .args(["-j", "filter", "show", "dev", dev, dir])
        .output()
        .context("running tc")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // No clsact qdisc, or the device went away: no filters.
        if err.contains("Cannot find device") || err.contains("Invalid argument") {
            return Ok(Vec::new());
        }
        bail!("tc filter show dev {dev} {dir}: {err}");
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let filters: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("tc -j output")?;
    Ok(filters
        .iter()
        .filter_map(|f| f.pointer("/options/prog/id")?.as_u64())
        .map(|id| id as u32)
        .collect())
}

/// Program attachments (TCX links and tc filters) of every device of namespace
/// `ns` (`dev/ingress` → program ids; only devices with attachments are listed).
fn attachments(ns: &str) -> Result<BTreeMap<String, Vec<u32>>> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {path}"))?;
            let mut out = BTreeMap::new();
            for iface in nix::net::if_::if_nameindex()?.iter() {
                let name = iface.name().to_string_lossy().into_owned();
                for (dir, ty) in [("ingress", BPF_TCX_INGRESS), ("egress", BPF_TCX_EGRESS)] {
                    let mut ids = match tcx_query(iface.index(), ty) {
                        Ok(ids) => ids,
                        // The device went away between the listing and the query.
                        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => continue,
                        Err(e) => bail!("BPF_PROG_QUERY {name}/{dir}: {e}"),
                    };
                    ids.extend(tc_filter_progs(&name, dir)?);
                    if !ids.is_empty() {
                        out.insert(format!("{name}/{dir}"), ids);
                    }
                }
            }
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("attachment query thread panicked"))?
    })
}

/// How long the kernel may take to free the namespaces of deleted slots.
pub const RETIRED_LINKS_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits until namespace `ns` holds no host veth retired by a slot delete
/// (`{prefix}-xNNNNN`, down, waiting for the kernel to free the slot namespace
/// that takes it along).
pub fn wait_for_retired_links(ns: &str, prefix: &str, timeout: Duration) -> Result<()> {
    let retired = format!("{prefix}-x");
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left: Vec<String> = ip_lines(ns, &["link", "show"], link_name)?
            .into_iter()
            .filter(|l| l.starts_with(&retired))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("retired links still there after {timeout:?}: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- pins and pinned maps ----

fn files_under(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap_or(&p);
                out.insert(rel.display().to_string());
            }
        }
    }
    out
}

fn open_pin(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("open pin {}", path.display()))
}

fn hash_len<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> Result<usize> {
    let map = HashMap::<_, K, V>::try_from(Map::HashMap(open_pin(dir, name)?))?;
    Ok(map.keys().filter(|k| k.is_ok()).count())
}

type Entries = (BTreeMap<&'static str, usize>, BTreeSet<u32>);

/// Entry counts of the pinned maps in `dir` and the active `SLOTS` indices. A
/// missing pin directory (the agent is not running) reads as empty.
fn pinned_map_entries(dir: &Path) -> Result<Entries> {
    let mut entries = BTreeMap::new();
    let mut active = BTreeSet::new();
    if !dir.join(netagent_common::MAP_SLOTS).exists() {
        return Ok((entries, active));
    }
    let slots =
        Array::<_, SlotInfo>::try_from(Map::Array(open_pin(dir, netagent_common::MAP_SLOTS)?))?;
    for i in 1..slots.len() {
        if slots.get(&i, 0).is_ok_and(|s| s.flags != 0) {
            active.insert(i);
        }
    }
    entries.insert("SLOTS", active.len());
    entries.insert(
        "ADDR_SLOTS",
        hash_len::<u32, u32>(dir, netagent_common::MAP_ADDR_SLOTS)?,
    );
    entries.insert(
        "VETH_SLOTS",
        hash_len::<u32, u32>(dir, netagent_common::MAP_VETH_SLOTS)?,
    );
    for (label, name) in [
        ("NAT_EGRESS", netagent_common::MAP_NAT_EGRESS),
        ("NAT_INGRESS", netagent_common::MAP_NAT_INGRESS),
        ("HOST_FLOWS", netagent_common::MAP_HOST_FLOWS),
    ] {
        entries.insert(label, hash_len::<FlowKey, NatEntry>(dir, name)?);
    }
    let l2 =
        Array::<_, GuestL2>::try_from(Map::Array(open_pin(dir, netagent_common::MAP_GUEST_L2)?))?;
    let learned = (1..l2.len())
        .filter(|i| l2.get(i, 0).is_ok_and(|g| g.flags != 0))
        .count();
    entries.insert("GUEST_L2", learned);
    let stats = PerCpuArray::<_, SlotStats>::try_from(Map::PerCpuArray(open_pin(
        dir,
        netagent_common::MAP_STATS,
    )?))?;
    let zero = SlotStats::default();
    let dirty = (1..stats.len())
        .filter(|i| {
            stats
                .get(i, 0)
                .is_ok_and(|per_cpu| per_cpu.iter().any(|s| *s != zero))
        })
        .count();
    entries.insert("STATS (non-zero rows)", dirty);
    Ok((entries, active))
}

// ---- /metrics ----

/// The gauges that must return to their baseline: slots, table entries, programs,
/// attachments, and the number of per-slot series.
fn agent_metrics(socket: &Path) -> Result<BTreeMap<String, f64>> {
    if !socket.exists() {
        return Ok(BTreeMap::new());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let text = rt.block_on(
        Client::new(socket)
            .with_timeout(Duration::from_secs(10))
            .metrics(),
    )?;
    Ok(parse_gauges(&text))
}

/// The leak-relevant series of a Prometheus text exposition.
pub fn parse_gauges(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut slot_series = 0usize;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        if series.starts_with("netagent_slot_") {
            slot_series += 1;
        } else if series == "netagent_slots"
            || series.starts_with("netagent_table_entries")
            || series == "netagent_programs_loaded"
            || series == "netagent_program_attachments"
        {
            out.insert(series.to_string(), v);
        }
    }
    out.insert("per-slot series".to_string(), slot_series as f64);
    out
}
