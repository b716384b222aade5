//! `netagent verify` / `GET /v1/verify`: compares the kernel's state with the
//! agent's and lists every difference.
//!
//! For every slot the agent knows: the namespace; the host veth (up, kind, its
//! /31 address); `lo`, `eth0` and `tap0` in the namespace (up, kind, addresses,
//! the TAP's MAC and txqueuelen); the slot's default route and the host's
//! HostIP/32 route; the programs attached (`tap_ingress` on tap0, `slot_ingress`
//! on eth0, `veth_ingress` on the host veth); `eth0`'s ifindex
//! (`SLOT_ETH0_IFINDEX`, which the shared `tap_ingress` redirects to); and its
//! SLOTS, VETH_SLOTS and ADDR_SLOTS entries (ifindices, MACs and addresses must
//! match the links and the address plan, the guest-veth flag `tap0`'s kind); its
//! policy in the maps (guest MAC, POLICY rules, RATE) against the agent's; and
//! its slot record (`slot::adopt`). Then the uplink (`uplink_ingress`
//! attached, CONFIG pointing at it) and everything of the prefix the agent does not know: namespaces, host veths,
//! routes through them or into the HostIP /16, active SLOTS entries, lookup
//! entries and flows of unknown slots.
//!
//! Reads only: nothing is changed. Creates and deletes running at the same time
//! are not reported: slots that appeared or vanished while a pass ran are left
//! out, and a pass that finds differences is repeated after [`CONFIRM_DELAY`],
//! reporting only what both passes saw.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use futures::TryStreamExt;
use netagent_common::{
    CONFIG_F_UPLINK, SLOT_ETH0_IFINDEX, SLOT_F_ACTIVE, SLOT_F_GUEST_VETH, SlotInfo,
};
use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
use serde::{Deserialize, Serialize};

use crate::bpf::{Datapath, FlowTable};
use crate::netlink::addr::Addr;
use crate::netlink::link::{KIND_TUN, KIND_VETH, Link};
use crate::netlink::route::Route;
use crate::netlink::{Netlink, NetlinkError, netns};
use crate::slot::addressing::{
    TAP_IP, TAP_MAC, TAP_NAME, TAP_PREFIX, TAP_TXQUEUELEN, VETH_PREFIX, VPEER_NAME, format_mac,
};
use crate::slot::{AddressPlan, GuestLink, Slot, SlotManager};

/// Program names as the kernel reports them.
const PROG_TAP: &str = "tap_ingress";
const PROG_SLOT: &str = "slot_ingress";
const PROG_VETH: &str = "veth_ingress";
const PROG_UPLINK: &str = "uplink_ingress";

/// What kind of difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffKind {
    /// Something the agent made is not in the kernel.
    Missing,
    /// It is there but not as the agent made it.
    Mismatch,
    /// The kernel has something of the prefix the agent does not know.
    Orphan,
}

impl DiffKind {
    fn as_str(self) -> &'static str {
        match self {
            DiffKind::Missing => "missing",
            DiffKind::Mismatch => "mismatch",
            DiffKind::Orphan => "orphan",
        }
    }
}

/// One difference between the kernel and the agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Difference {
    /// The slot it concerns (`None`: the uplink or agent-wide state).
    pub slot: Option<u32>,
    /// Missing, mismatch or orphan.
    pub kind: DiffKind,
    /// The kernel object, e.g. `route 10.11.0.1/32 (host namespace)`.
    pub object: String,
    /// What the agent expects (empty for an orphan).
    pub expected: String,
    /// What the kernel has (empty when missing).
    pub found: String,
}

impl Difference {
    /// One human line.
    pub fn line(&self) -> String {
        let slot = match self.slot {
            Some(n) => format!("slot {n}"),
            None => "agent".into(),
        };
        let mut s = format!("{slot}: {} {}", self.kind.as_str(), self.object);
        if !self.expected.is_empty() {
            s += &format!("; expected {}", self.expected);
        }
        if !self.found.is_empty() {
            s += &format!("; found {}", self.found);
        }
        s
    }
}

/// The answer of `GET /v1/verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// True when the kernel matches the agent exactly.
    pub clean: bool,
    /// The agent's prefix.
    pub prefix: String,
    /// Slots the agent knows (and checked).
    pub slots: usize,
    /// Every difference, sorted by slot.
    pub differences: Vec<Difference>,
}

impl VerifyReport {
    /// A report over `differences` (sorted here).
    pub fn new(prefix: &str, slots: usize, mut differences: Vec<Difference>) -> VerifyReport {
        differences.sort();
        differences.dedup();
        VerifyReport {
            clean: differences.is_empty(),
            prefix: prefix.to_string(),
            slots,
            differences,
        }
    }

    /// The human form: a summary line, then one line per difference.
    pub fn render(&self) -> String {
        let mut out = if self.clean {
            format!(
                "prefix {}: {} slot(s), the kernel matches the agent\n",
                self.prefix, self.slots
            )
        } else {
            format!(
                "prefix {}: {} slot(s), {} difference(s) between the kernel and the agent\n",
                self.prefix,
                self.slots,
                self.differences.len()
            )
        };
        for d in &self.differences {
            out += &d.line();
            out.push('\n');
        }
        out
    }
}

/// Why the check itself could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading the host namespace failed.
    #[error("cannot read the kernel state: {0}")]
    Netlink(#[from] NetlinkError),
    /// The datapath is gone (the agent is shutting down).
    #[error("cannot read the datapath: {0}")]
    Datapath(String),
}

#[derive(Default)]
struct Diffs(Vec<Difference>);

impl Diffs {
    fn push(
        &mut self,
        slot: Option<u32>,
        kind: DiffKind,
        object: String,
        expected: String,
        found: String,
    ) {
        self.0.push(Difference {
            slot,
            kind,
            object,
            expected,
            found,
        });
    }

    fn missing(
        &mut self,
        slot: Option<u32>,
        object: impl Into<String>,
        expected: impl Into<String>,
    ) {
        self.push(
            slot,
            DiffKind::Missing,
            object.into(),
            expected.into(),
            String::new(),
        );
    }

    fn mismatch(
        &mut self,
        slot: Option<u32>,
        object: impl Into<String>,
        expected: impl ToString,
        found: impl ToString,
    ) {
        self.push(
            slot,
            DiffKind::Mismatch,
            object.into(),
            expected.to_string(),
            found.to_string(),
        );
    }

    fn orphan(&mut self, slot: Option<u32>, object: impl Into<String>, found: impl Into<String>) {
        self.push(
            slot,
            DiffKind::Orphan,
            object.into(),
            String::new(),
            found.into(),
        );
    }
}

/// The kernel objects of one namespace, read once.
struct NsState {
    links: Vec<Link>,
    addrs: Vec<Addr>,
    routes: Vec<Route>,
}

impl NsState {
    async fn read(nl: &Netlink) -> Result<NsState, NetlinkError> {
        Ok(NsState {
            links: nl.link_list().await?,
            addrs: nl.addr_list().await?,
            routes: nl.route_list().await?,
        })
    }

    fn link(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    fn addrs_of(&self, index: u32) -> Vec<String> {
        self.addrs
            .iter()
            .filter(|a| a.index == index)
            .map(|a| format!("{}/{}", a.ip, a.prefix))
            .collect()
    }

    fn has_addr(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> bool {
        self.addrs
            .iter()
            .any(|a| a.index == index && a.ip == ip && a.prefix == prefix)
    }
}

fn list_or_none(v: Vec<String>) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Checks one link: present, up, of `kind`, with `ip/prefix`. Returns it when present.
#[allow(clippy::too_many_arguments)]
fn check_link<'a>(
    d: &mut Diffs,
    slot: u32,
    ns: &'a NsState,
    where_: &str,
    name: &str,
    kind: &str,
    addr: Option<(Ipv4Addr, u8)>,
) -> Option<&'a Link> {
    let object = format!("link {name} ({where_})");
    let Some(link) = ns.link(name) else {
        let want = match addr {
            Some((ip, p)) => format!("{kind} {ip}/{p}, up"),
            None => format!("{kind}, up"),
        };
        d.missing(Some(slot), object, want);
        return None;
    };
    if !link.up {
        d.mismatch(Some(slot), format!("state of {object}"), "up", "down");
    }
    if link.kind.as_deref() != Some(kind) && !(kind.is_empty() && link.kind.is_none()) {
        d.mismatch(
            Some(slot),
            format!("kind of {object}"),
            kind,
            link.kind.as_deref().unwrap_or("none"),
        );
    }
    if let Some((ip, prefix)) = addr
        && !ns.has_addr(link.index, ip, prefix)
    {
        d.mismatch(
            Some(slot),
            format!("address of {object}"),
            format!("{ip}/{prefix}"),
            list_or_none(ns.addrs_of(link.index)),
        );
    }
    Some(link)
}

fn route_text(r: &Route, ns: &NsState) -> String {
    let dev = r
        .oif
        .and_then(|i| ns.links.iter().find(|l| l.index == i))
        .map(|l| l.name.clone())
        .unwrap_or_else(|| "?".into());
    match r.gateway {
        Some(gw) => format!("{}/{} via {gw} dev {dev}", r.dst, r.prefix),
        None => format!("{}/{} dev {dev}", r.dst, r.prefix),
    }
}

fn check_route(
    d: &mut Diffs,
    slot: u32,
    ns: &NsState,
    where_: &str,
    (dst, prefix): (Ipv4Addr, u8),
    gateway: Ipv4Addr,
    dev: Option<&Link>,
) {
    let object = format!("route {dst}/{prefix} ({where_})");
    let dev_name = dev.map(|l| l.name.as_str()).unwrap_or("?");
    let want = format!("{dst}/{prefix} via {gateway} dev {dev_name}");
    match ns
        .routes
        .iter()
        .find(|r| r.dst == dst && r.prefix == prefix)
    {
        None => d.missing(Some(slot), object, want),
        Some(r) => {
            let dev_ok = dev.is_none_or(|l| r.oif == Some(l.index));
            if r.gateway != Some(gateway) || !dev_ok {
                d.mismatch(Some(slot), object, want, route_text(r, ns));
            }
        }
    }
}

/// Names of the programs on the ingress of `link` in the calling thread's
/// namespace: TCX links, or else clsact filters (through `nl`, a connection to
/// the same namespace).
async fn ingress_programs(
    ns: Option<BorrowedFd<'_>>,
    nl: &Netlink,
    link: &Link,
) -> Result<Vec<String>, String> {
    let name = link.name.clone();
    let query = move || -> Result<Vec<String>, String> {
        SchedClassifier::query_tcx(&name, TcAttachType::Ingress)
            .map(|(_, infos)| {
                infos
                    .iter()
                    .map(|i| i.name_as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .map_err(|e| format!("query tcx programs on {name}: {e}"))
    };
    let tcx = match ns {
        Some(fd) => netns::run_in(fd, query).map_err(|e| e.to_string())??,
        None => query()?,
    };
    if !tcx.is_empty() {
        return Ok(tcx);
    }
    // No clsact qdisc (or nothing readable) means no filters.
    let filters: Vec<_> = nl
        .handle()
        .traffic_filter(link.index as i32)
        .get()
        .ingress()
        .execute()
        .try_collect()
        .await
        .unwrap_or_default();
    let mut names = Vec::new();
    for msg in filters {
        for attr in &msg.attributes {
            if let TcAttribute::Options(opts) = attr {
                for opt in opts {
                    if let TcOption::Bpf(TcFilterBpfOption::ProgName(n)) = opt {
                        names.push(n.clone());
                    }
                }
            }
        }
    }
    Ok(names)
}

async fn check_programs(
    d: &mut Diffs,
    slot: Option<u32>,
    ns: Option<BorrowedFd<'_>>,
    nl: &Netlink,
    link: &Link,
    where_: &str,
    want: &str,
) {
    let object = format!("program {want} on {} ({where_})", link.name);
    match ingress_programs(ns, nl, link).await {
        Ok(progs) if progs.iter().any(|p| p.contains(want)) => {}
        Ok(progs) => d.mismatch(
            slot,
            object,
            "attached",
            format!("programs: {}", list_or_none(progs)),
        ),
        Err(e) => d.mismatch(slot, object, "attached", e),
    }
}

/// What was found of one slot, for the map checks.
#[derive(Default)]
struct Observed {
    veth: Option<Link>,
    eth0: Option<Link>,
    tap: Option<Link>,
}

async fn check_slot(
    d: &mut Diffs,
    prefix: &str,
    host: &NsState,
    host_nl: &Netlink,
    slot: &Slot,
) -> Observed {
    let a = &slot.addr;
    let n = a.index;
    let mut seen = Observed::default();
    let hostw = "host namespace";

    let veth = check_link(
        d,
        n,
        host,
        hostw,
        &a.veth,
        KIND_VETH,
        Some((a.veth_ip, VETH_PREFIX)),
    );
    if let Some(veth) = veth {
        check_programs(d, Some(n), None, host_nl, veth, hostw, PROG_VETH).await;
    }
    seen.veth = veth.cloned();

    // The record a restart adopts the slot by (see `slot::adopt`).
    let record = crate::slot::adopt::records_dir(prefix).join(n.to_string());
    if !record.exists() {
        d.missing(
            Some(n),
            format!("slot record {}", record.display()),
            "present (written when the create finished)",
        );
    }

    let ns = match netns::open(&a.namespace) {
        Ok(ns) => ns,
        Err(e) => {
            if e.is_gone() {
                d.missing(Some(n), format!("namespace {}", a.namespace), "present");
            } else {
                d.mismatch(Some(n), format!("namespace {}", a.namespace), "readable", e);
            }
            // The host route cannot be right without the slot's eth0; check anyway.
            check_route(d, n, host, hostw, (a.host_ip, 32), a.vpeer_ip, veth);
            return seen;
        }
    };
    let nsw = format!("namespace {}", a.namespace);
    let state = match Netlink::connect_in(ns.as_fd()) {
        Ok(nl) => match NsState::read(&nl).await {
            Ok(s) => Some((nl, s)),
            Err(e) => {
                d.mismatch(Some(n), nsw.clone(), "readable", e);
                None
            }
        },
        Err(e) => {
            d.mismatch(Some(n), nsw.clone(), "readable", e);
            None
        }
    };
    if let Some((nl, st)) = &state {
        if let Some(lo) = st.link("lo")
            && !lo.up
        {
            d.mismatch(Some(n), format!("state of link lo ({nsw})"), "up", "down");
        }
        let eth0 = check_link(
            d,
            n,
            st,
            &nsw,
            VPEER_NAME,
            KIND_VETH,
            Some((a.vpeer_ip, VETH_PREFIX)),
        );
        let tap_kind = match slot.guest {
            GuestLink::Tap => KIND_TUN,
            GuestLink::Veth { .. } => KIND_VETH,
        };
        let tap = check_link(
            d,
            n,
            st,
            &nsw,
            TAP_NAME,
            tap_kind,
            Some((TAP_IP, TAP_PREFIX)),
        );
        if let Some(tap) = tap {
            if tap.mac6() != TAP_MAC {
                d.mismatch(
                    Some(n),
                    format!("MAC of link {TAP_NAME} ({nsw})"),
                    format_mac(&TAP_MAC),
                    format_mac(&tap.mac6()),
                );
            }
            if tap.txqueuelen != TAP_TXQUEUELEN {
                d.mismatch(
                    Some(n),
                    format!("txqueuelen of link {TAP_NAME} ({nsw})"),
                    TAP_TXQUEUELEN,
                    tap.txqueuelen,
                );
            }
            check_programs(d, Some(n), Some(ns.as_fd()), nl, tap, &nsw, PROG_TAP).await;
        }
        if let Some(eth0) = eth0 {
            check_programs(d, Some(n), Some(ns.as_fd()), nl, eth0, &nsw, PROG_SLOT).await;
        }
        check_route(d, n, st, &nsw, (Ipv4Addr::UNSPECIFIED, 0), a.veth_ip, eth0);
        seen.eth0 = eth0.cloned();
        seen.tap = tap.cloned();
    }
    check_route(d, n, host, hostw, (a.host_ip, 32), a.vpeer_ip, veth);
    if let Some(eth0) = &seen.eth0
        && eth0.index != SLOT_ETH0_IFINDEX
    {
        d.mismatch(
            Some(n),
            format!("ifindex of link {VPEER_NAME} ({nsw})"),
            SLOT_ETH0_IFINDEX,
            eth0.index,
        );
    }
    seen
}

fn ip_of(map: u32) -> Ipv4Addr {
    Ipv4Addr::from(map.to_ne_bytes())
}

fn check_slot_maps(d: &mut Diffs, dp: &Datapath, slot: &Slot, seen: &Observed) {
    let a = &slot.addr;
    let n = a.index;
    let maps = dp.maps();
    let object = format!("map SLOTS[{n}]");
    let info = match maps.slot(n) {
        Ok(i) => i,
        Err(e) => {
            d.mismatch(Some(n), object, "readable", e);
            return;
        }
    };
    if info.flags & SLOT_F_ACTIVE == 0 {
        d.missing(Some(n), object.clone(), "an active entry");
    } else {
        let mut field = |name: &str, want: String, got: String| {
            if want != got {
                d.mismatch(Some(n), format!("{object}.{name}"), want, got);
            }
        };
        field(
            "vpeer_ip",
            a.vpeer_ip.to_string(),
            ip_of(info.vpeer_ip).to_string(),
        );
        field(
            "host_ip",
            a.host_ip.to_string(),
            ip_of(info.host_ip).to_string(),
        );
        if let Some(v) = &seen.veth {
            field(
                "veth_ifindex",
                v.index.to_string(),
                info.veth_ifindex.to_string(),
            );
            field(
                "veth_mac",
                format_mac(&v.mac6()),
                format_mac(&info.veth_mac),
            );
        }
        if let Some(e) = &seen.eth0 {
            field(
                "eth0_ifindex",
                e.index.to_string(),
                info.eth0_ifindex.to_string(),
            );
            field(
                "eth0_mac",
                format_mac(&e.mac6()),
                format_mac(&info.eth0_mac),
            );
        }
        if let Some(t) = &seen.tap {
            field(
                "tap_ifindex",
                t.index.to_string(),
                info.tap_ifindex.to_string(),
            );
            // A veth guest link gets its frames by bpf_redirect_peer, a TAP's
            // by bpf_redirect: the flag must follow tap0's kind.
            let flag = |veth: bool| if veth { "set" } else { "clear" }.to_string();
            field(
                "flags.GUEST_VETH",
                flag(t.kind.as_deref() == Some("veth")),
                flag(info.flags & SLOT_F_GUEST_VETH != 0),
            );
        }
    }
    let policy = &slot.policy;
    match dp.policy_differences(
        n,
        policy.guest_mac.map(|m| m.0),
        &policy.egress,
        policy.rate_limit.map(|r| r.limit()),
    ) {
        Ok(differences) => {
            for p in differences {
                d.mismatch(Some(n), p.object, p.expected, p.found);
            }
        }
        Err(e) => d.mismatch(Some(n), "the slot's policy maps", "readable", e),
    }
    if let Some(v) = &seen.veth {
        match maps.veth_slots() {
            Ok(entries) => match entries.iter().find(|(ifindex, _)| *ifindex == v.index) {
                Some((_, i)) if *i == n => {}
                Some((_, i)) => d.mismatch(
                    Some(n),
                    format!("map VETH_SLOTS[{}] ({})", v.index, v.name),
                    format!("slot {n}"),
                    format!("slot {i}"),
                ),
                None => d.missing(
                    Some(n),
                    format!("map VETH_SLOTS[{}] ({})", v.index, v.name),
                    format!("slot {n}"),
                ),
            },
            Err(e) => d.mismatch(Some(n), "map VETH_SLOTS", "readable", e),
        }
    }
    match maps.addr_slots() {
        Ok(entries) => {
            for addr in [a.vpeer_ip, a.host_ip] {
                match entries.iter().find(|(x, _)| *x == addr) {
                    Some((_, i)) if *i == n => {}
                    Some((_, i)) => d.mismatch(
                        Some(n),
                        format!("map ADDR_SLOTS[{addr}]"),
                        format!("slot {n}"),
                        format!("slot {i}"),
                    ),
                    None => d.missing(
                        Some(n),
                        format!("map ADDR_SLOTS[{addr}]"),
                        format!("slot {n}"),
                    ),
                }
            }
        }
        Err(e) => d.mismatch(Some(n), "map ADDR_SLOTS", "readable", e),
    }
    if !dp.attached_slots().contains(&n) {
        d.missing(
            Some(n),
            "datapath attachment",
            "programs attached by this agent",
        );
    }
}

/// Map entries of slots the agent does not know, and stale lookup entries.
fn check_orphan_maps(d: &mut Diffs, dp: &Datapath, known: &BTreeMap<u32, &Observed>) {
    let maps = dp.maps();
    let max = dp.config().max_slots;
    for i in 1..max {
        if known.contains_key(&i) {
            continue;
        }
        match maps.slot(i) {
            Ok(info) if info != SlotInfo::default() => d.orphan(
                Some(i),
                format!("map SLOTS[{i}]"),
                format!(
                    "flags {} host_ip {} vpeer_ip {} veth_ifindex {}",
                    info.flags,
                    ip_of(info.host_ip),
                    ip_of(info.vpeer_ip),
                    info.veth_ifindex
                ),
            ),
            Ok(_) => {}
            Err(e) => {
                d.mismatch(None, "map SLOTS", "readable", e);
                break;
            }
        }
    }
    match maps.veth_slots() {
        Ok(entries) => {
            for (ifindex, i) in entries {
                let ours = known
                    .get(&i)
                    .and_then(|o| o.veth.as_ref())
                    .is_some_and(|v| v.index == ifindex);
                // A known slot whose veth is missing is reported as missing already.
                let reported = known.get(&i).is_some_and(|o| o.veth.is_none());
                if !ours && !reported {
                    d.orphan(
                        Some(i),
                        format!("map VETH_SLOTS[{ifindex}]"),
                        format!("slot {i} (no such veth of the slot)"),
                    );
                }
            }
        }
        Err(e) => d.mismatch(None, "map VETH_SLOTS", "readable", e),
    }
    match maps.addr_slots() {
        Ok(entries) => {
            for (addr, i) in entries {
                // A known slot's own addresses (checked against the plan above).
                let ours = known.contains_key(&i)
                    && maps
                        .slot(i)
                        .is_ok_and(|s| ip_of(s.vpeer_ip) == addr || ip_of(s.host_ip) == addr);
                if !ours {
                    d.orphan(
                        Some(i),
                        format!("map ADDR_SLOTS[{addr}]"),
                        format!("slot {i} (not an address of the slot)"),
                    );
                }
            }
        }
        Err(e) => d.mismatch(None, "map ADDR_SLOTS", "readable", e),
    }
    for t in FlowTable::ALL {
        match maps.flows(t) {
            Ok(flows) => {
                let mut by_slot: BTreeMap<u32, usize> = BTreeMap::new();
                for (_, entry) in flows {
                    if !known.contains_key(&entry.slot) {
                        *by_slot.entry(entry.slot).or_default() += 1;
                    }
                }
                for (slot, count) in by_slot {
                    d.orphan(
                        Some(slot),
                        format!("map {} entries of slot {slot}", t.map_name()),
                        format!("{count} entr{}", if count == 1 { "y" } else { "ies" }),
                    );
                }
            }
            Err(e) => d.mismatch(None, format!("map {}", t.map_name()), "readable", e),
        }
    }
    for i in dp.attached_slots() {
        if !known.contains_key(&i) {
            d.orphan(
                Some(i),
                "datapath attachment",
                format!("programs of slot {i} attached"),
            );
        }
    }
}

/// The uplink: present with its address, `uplink_ingress` attached, CONFIG set.
async fn check_uplink(
    d: &mut Diffs,
    host: &NsState,
    host_nl: &Netlink,
    dp_uplink: Option<(u32, String, Ipv4Addr, netagent_common::GlobalConfig)>,
) {
    let Some((ifindex, name, ip, global)) = dp_uplink else {
        d.missing(None, "uplink", "uplink_ingress attached to the uplink");
        return;
    };
    let object = format!("uplink {name}");
    let Some(link) = host.links.iter().find(|l| l.index == ifindex) else {
        d.missing(None, object, format!("interface #{ifindex}"));
        return;
    };
    if link.name != name {
        d.mismatch(
            None,
            format!("name of {object} (#{ifindex})"),
            &name,
            &link.name,
        );
    }
    if !host.addrs.iter().any(|a| a.index == ifindex && a.ip == ip) {
        d.mismatch(
            None,
            format!("address of {object}"),
            ip,
            list_or_none(host.addrs_of(ifindex)),
        );
    }
    check_programs(d, None, None, host_nl, link, "host namespace", PROG_UPLINK).await;
    if global.flags & CONFIG_F_UPLINK == 0
        || global.uplink_ifindex != ifindex
        || ip_of(global.uplink_ip) != ip
    {
        d.mismatch(
            None,
            "map CONFIG[0] uplink",
            format!("{name} (#{ifindex}) {ip}"),
            format!(
                "#{} {} flags {}",
                global.uplink_ifindex,
                ip_of(global.uplink_ip),
                global.flags
            ),
        );
    }
}

/// Namespaces, host veths and routes of the prefix that belong to no known slot.
fn check_orphan_topology(
    d: &mut Diffs,
    plan: &AddressPlan,
    host_base: Ipv4Addr,
    host: &NsState,
    known: &BTreeMap<u32, &Observed>,
    namespaces: &[String],
) {
    for name in namespaces {
        if let Some(i) = plan.index_of_namespace(name)
            && !known.contains_key(&i)
        {
            d.orphan(Some(i), format!("namespace {name}"), "present");
        }
    }
    let mut orphan_veths = BTreeMap::new();
    for link in &host.links {
        if let Some(i) = plan.index_of_veth(&link.name)
            && !known.contains_key(&i)
        {
            orphan_veths.insert(link.index, i);
            d.orphan(
                Some(i),
                format!("link {} (host namespace)", link.name),
                format!(
                    "{} {}",
                    link.kind.as_deref().unwrap_or("link"),
                    list_or_none(host.addrs_of(link.index))
                ),
            );
        }
    }
    let [a, b, ..] = host_base.octets();
    for r in &host.routes {
        let via_orphan = r.oif.and_then(|oif| orphan_veths.get(&oif).copied());
        let [c0, c1, c2, c3] = r.dst.octets();
        let in_host_range = r.prefix == 32 && c0 == a && c1 == b;
        let index = u32::from(c2) << 8 | u32::from(c3);
        let unknown_host_ip = in_host_range && !known.contains_key(&index);
        if let Some(i) = via_orphan.or(unknown_host_ip.then_some(index)) {
            // The kernel's own connected route of an orphan veth is part of it.
            if via_orphan.is_some() && r.gateway.is_none() && r.prefix != 32 {
                continue;
            }
            d.orphan(
                Some(i),
                format!("route {}/{} (host namespace)", r.dst, r.prefix),
                route_text(r, host),
            );
        }
    }
}

/// Time between the two passes of a check that found differences.
pub const CONFIRM_DELAY: Duration = Duration::from_millis(250);

/// Compares the kernel with `mgr`'s slots and datapath. A check that finds
/// differences runs again after [`CONFIRM_DELAY`] and reports only those seen
/// both times, so a create or delete in progress is not reported.
pub async fn verify(mgr: &SlotManager) -> Result<VerifyReport, VerifyError> {
    let first = verify_once(mgr).await?;
    if first.clean {
        return Ok(first);
    }
    tokio::time::sleep(CONFIRM_DELAY).await;
    let second = verify_once(mgr).await?;
    let seen: BTreeSet<(Option<u32>, DiffKind, &str)> = first
        .differences
        .iter()
        .map(|d| (d.slot, d.kind, d.object.as_str()))
        .collect();
    let confirmed = second
        .differences
        .into_iter()
        .filter(|d| seen.contains(&(d.slot, d.kind, d.object.as_str())))
        .collect();
    Ok(VerifyReport::new(&second.prefix, second.slots, confirmed))
}

/// One pass of [`verify`].
async fn verify_once(mgr: &SlotManager) -> Result<VerifyReport, VerifyError> {
    let plan = mgr.plan().clone();
    let slots = mgr.list();
    let host_nl = Netlink::connect_current()?;
    let host = NsState::read(&host_nl).await?;
    let namespaces = netns::list()?;
    let mut d = Diffs::default();

    let mut observed = Vec::with_capacity(slots.len());
    for slot in &slots {
        observed.push(check_slot(&mut d, plan.prefix(), &host, &host_nl, slot).await);
    }
    let known: BTreeMap<u32, &Observed> = slots
        .iter()
        .zip(&observed)
        .map(|(s, o)| (s.addr.index, o))
        .collect();
    check_orphan_topology(
        &mut d,
        &plan,
        mgr.config().host_base,
        &host,
        &known,
        &namespaces,
    );

    let mut map_diffs = Diffs::default();
    let uplink = mgr
        .with_datapath(|dp| {
            for (slot, seen) in slots.iter().zip(&observed) {
                check_slot_maps(&mut map_diffs, dp, slot, seen);
            }
            check_orphan_maps(&mut map_diffs, dp, &known);
            let global = dp.maps().global();
            dp.uplink()
                .map(|u| (u.ifindex, u.name.clone(), u.ipv4, global))
        })
        .map_err(|e| VerifyError::Datapath(e.to_string()))?;
    d.0.extend(map_diffs.0);
    match uplink {
        Some((ifindex, name, ip, Ok(global))) => {
            check_uplink(&mut d, &host, &host_nl, Some((ifindex, name, ip, global))).await
        }
        Some((_, _, _, Err(e))) => d.mismatch(None, "map CONFIG", "readable", e),
        None => check_uplink(&mut d, &host, &host_nl, None).await,
    }

    // Slots created or deleted while this ran are in flux: leave them out.
    let before: BTreeSet<u32> = known.keys().copied().collect();
    let after: BTreeSet<u32> = mgr.list().iter().map(|s| s.addr.index).collect();
    let changed: BTreeSet<u32> = before.symmetric_difference(&after).copied().collect();
    let differences =
        d.0.into_iter()
            .filter(|x| x.slot.is_none_or(|s| !changed.contains(&s)))
            .collect();
    Ok(VerifyReport::new(plan.prefix(), slots.len(), differences))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_and_json() {
        let r = VerifyReport::new(
            "t1",
            2,
            vec![
                Difference {
                    slot: Some(2),
                    kind: DiffKind::Missing,
                    object: "route 10.11.0.2/32 (host namespace)".into(),
                    expected: "10.11.0.2/32 via 10.12.0.5 dev t1-veth-2".into(),
                    found: String::new(),
                },
                Difference {
                    slot: Some(999),
                    kind: DiffKind::Orphan,
                    object: "namespace t1-ns-999".into(),
                    expected: String::new(),
                    found: "present".into(),
                },
            ],
        );
        assert!(!r.clean);
        let text = r.render();
        assert!(
            text.starts_with("prefix t1: 2 slot(s), 2 difference(s)"),
            "{text}"
        );
        assert!(text.contains("slot 2: missing route 10.11.0.2/32 (host namespace); expected 10.11.0.2/32 via 10.12.0.5 dev t1-veth-2\n"), "{text}");
        assert!(
            text.contains("slot 999: orphan namespace t1-ns-999; found present\n"),
            "{text}"
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["clean"], false);
        assert_eq!(v["differences"][1]["kind"], "orphan");
        assert_eq!(v["differences"][1]["slot"], 999);
        let back: VerifyReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        let clean = VerifyReport::new("t1", 0, vec![]);
        assert!(clean.clean && clean.render().contains("matches"));
    }
}
