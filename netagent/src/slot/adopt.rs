//! Adopting the slots a previous run of the prefix left (after `kill -9`, a
//! crash or an upgrade), so their traffic never stops.
//!
//! At start, after the datapath is loaded (maps reused when their layout
//! matches, see `bpf::layout`), every slot index the kernel or the run
//! directory shows for the prefix — named namespaces, host veths, slot
//! records, active SLOTS entries — is inspected. A slot is **adopted** when
//! all of it is intact: its record (below), the namespace, the host veth (up,
//! /31 address), `eth0` (ifindex `SLOT_ETH0_IFINDEX`, up, /31), `lo` up, `tap0`
//! (ifindex `SLOT_TAP_IFINDEX_BASE + N`, the kind its guest link needs, MAC,
//! up, /30), the slot's default route and the host's HostIP/32 route, its
//! SLOTS / ADDR_SLOTS / VETH_SLOTS entries and its three filters (whose
//! programs `Datapath::adopt_slot` then replaces in place). The manager then
//! knows it exactly as if this run had made it: the guest link from the
//! record, the guest MAC, egress lists and rate limit read back from the maps.
//! Anything else is **removed** (as delete does, from names alone) and
//! reported with the reason; map entries and flows of indices nobody adopted
//! are cleared.
//!
//! **Slot records.** The kernel does not say what a slot's guest link is (a
//! veth guest link's guest namespace), nor whether its create finished. So a
//! create that finished writes `/run/netagent/{prefix}.slots/{N}` (JSON of the
//! guest link; written to a temporary file and renamed, so it is there whole
//! or not at all) as its last act, and delete removes it as its first: a slot
//! without a record is an interrupted create or delete, never adopted.

use std::collections::BTreeSet;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;

use netagent_common::{SLOT_ETH0_IFINDEX, SLOT_F_ACTIVE};

use crate::bpf::SlotDatapath;
use crate::netlink::link::{KIND_TUN, KIND_VETH, Link};
use crate::netlink::{Netlink, netns};

use super::addressing::{TAP_IP, TAP_MAC, TAP_PREFIX, VETH_PREFIX, VPEER_NAME};
use super::create::tap_ifindex;
use super::manager::SlotManager;
use super::policy::{GuestMac, RateLimitSpec, SlotPolicy};
use super::{GuestLink, Slot, SlotAddr};

/// Directory of the slot records of `prefix`.
pub fn records_dir(prefix: &str) -> PathBuf {
    PathBuf::from(crate::daemon::LOCK_DIR).join(format!("{prefix}.slots"))
}

fn record_path(prefix: &str, index: u32) -> PathBuf {
    records_dir(prefix).join(index.to_string())
}

/// Records that slot `index`'s create finished, with its guest link (temporary
/// file + rename: a crash leaves the old state or the new, never half).
pub fn write_record(prefix: &str, index: u32, guest: &GuestLink) -> io::Result<()> {
    let dir = records_dir(prefix);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{index}.tmp"));
    let text = serde_json::to_vec(guest).map_err(io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, record_path(prefix, index))
}

/// Removes slot `index`'s record (absent is fine).
pub fn remove_record(prefix: &str, index: u32) -> io::Result<()> {
    match std::fs::remove_file(record_path(prefix, index)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the records directory of `prefix` with everything in it.
pub fn remove_records(prefix: &str) -> io::Result<usize> {
    let dir = records_dir(prefix);
    let n = match std::fs::read_dir(&dir) {
        Ok(d) => d.count(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    std::fs::remove_dir_all(&dir)?;
    Ok(n)
}

/// Slot `index`'s record: `None` if there is none, `Some(Err)` if unreadable.
fn read_record(prefix: &str, index: u32) -> Option<Result<GuestLink, String>> {
    match std::fs::read(record_path(prefix, index)) {
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes).map_err(|e| format!("its record is unreadable ({e})")),
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(format!("its record is unreadable ({e})"))),
    }
}

/// Indices with a record.
fn recorded(prefix: &str) -> BTreeSet<u32> {
    std::fs::read_dir(records_dir(prefix))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What start-up did with a previous run's slots.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AdoptReport {
    /// Slots adopted, by index.
    pub adopted: Vec<u32>,
    /// Slots removed, with the reason each could not be adopted.
    pub removed: Vec<(u32, String)>,
    /// What could not be removed.
    pub failures: Vec<String>,
}

/// The links of one slot, as found.
struct Found {
    veth: Link,
    eth0: Link,
    tap: Link,
}

fn has_addr(addrs: &[crate::netlink::addr::Addr], index: u32, ip: Ipv4Addr, prefix: u8) -> bool {
    addrs
        .iter()
        .any(|a| a.index == index && a.ip == ip && a.prefix == prefix)
}

/// Checks the kernel side of slot `addr` with guest link `guest`; `Err` says
/// the first thing that is not as create made it.
async fn inspect(
    host: &Netlink,
    addr: &SlotAddr,
    guest: &GuestLink,
) -> Result<(std::os::fd::OwnedFd, Found), String> {
    let ns =
        netns::open(&addr.namespace).map_err(|e| format!("namespace {}: {e}", addr.namespace))?;
    let veth = host
        .link_by_name(&addr.veth)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("host veth {} is missing", addr.veth))?;
    if veth.kind.as_deref() != Some(KIND_VETH) || !veth.up {
        return Err(format!("host veth {} is not an up veth", addr.veth));
    }
    let host_addrs = host
        .addr_list_link(veth.index)
        .await
        .map_err(|e| e.to_string())?;
    if !has_addr(&host_addrs, veth.index, addr.veth_ip, VETH_PREFIX) {
        return Err(format!(
            "host veth {} lacks {}/{VETH_PREFIX}",
            addr.veth, addr.veth_ip
        ));
    }
    let host_route = host
        .route_list_oif(veth.index)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .any(|r| r.dst == addr.host_ip && r.prefix == 32 && r.gateway == Some(addr.vpeer_ip));
    if !host_route {
        return Err(format!(
            "host route {}/32 via {} is missing",
            addr.host_ip, addr.vpeer_ip
        ));
    }

    let slot = Netlink::connect_in(ns.as_fd()).map_err(|e| e.to_string())?;
    let links = slot.link_list().await.map_err(|e| e.to_string())?;
    let addrs = slot.addr_list().await.map_err(|e| e.to_string())?;
    let find = |name: &str| links.iter().find(|l| l.name == name).cloned();
    let eth0 = find(VPEER_NAME).ok_or("eth0 is missing")?;
    if eth0.index != SLOT_ETH0_IFINDEX || eth0.kind.as_deref() != Some(KIND_VETH) || !eth0.up {
        return Err(format!(
            "eth0 is not an up veth with ifindex {SLOT_ETH0_IFINDEX} (ifindex {})",
            eth0.index
        ));
    }
    if !has_addr(&addrs, eth0.index, addr.vpeer_ip, VETH_PREFIX) {
        return Err(format!("eth0 lacks {}/{VETH_PREFIX}", addr.vpeer_ip));
    }
    if !find("lo").is_some_and(|l| l.up) {
        return Err("lo is down".into());
    }
    let tap = find(&addr.tap).ok_or_else(|| format!("{} is missing", addr.tap))?;
    let kind = match guest {
        GuestLink::Tap => KIND_TUN,
        GuestLink::Veth { .. } => KIND_VETH,
    };
    if tap.index != tap_ifindex(addr.index) || tap.kind.as_deref() != Some(kind) || !tap.up {
        return Err(format!(
            "{} is not an up {kind} with ifindex {} (found ifindex {}, kind {:?}, up {})",
            addr.tap,
            tap_ifindex(addr.index),
            tap.index,
            tap.kind,
            tap.up
        ));
    }
    if tap.mac6() != TAP_MAC || !has_addr(&addrs, tap.index, TAP_IP, TAP_PREFIX) {
        return Err(format!(
            "{} lacks its MAC or {TAP_IP}/{TAP_PREFIX}",
            addr.tap
        ));
    }
    let default = slot
        .route_list()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .any(|r| r.is_default() && r.gateway == Some(addr.veth_ip));
    if !default {
        return Err(format!(
            "the slot's default route via {} is missing",
            addr.veth_ip
        ));
    }
    Ok((ns, Found { veth, eth0, tap }))
}

/// The slot's security settings as the maps hold them.
fn read_policy(mgr: &SlotManager, index: u32) -> Result<SlotPolicy, String> {
    mgr.with_datapath(|dp| -> Result<SlotPolicy, String> {
        let guest_mac = dp
            .guest_mac(index)
            .map_err(|e| e.to_string())?
            .map(GuestMac);
        let egress = dp.slot_egress(index).map_err(|e| e.to_string())?;
        let rate_limit = dp
            .rate_limit(index)
            .map_err(|e| e.to_string())?
            .map(|r| RateLimitSpec {
                bits_per_second: r.rate_bytes_per_sec.saturating_mul(8),
                burst_bytes: r.burst_bytes,
            });
        Ok(SlotPolicy {
            guest_mac,
            egress,
            rate_limit,
        })
    })
    .map_err(|e| e.to_string())?
}

/// Tries to adopt slot `index`; `Err` is why it cannot be.
async fn adopt_one(mgr: &SlotManager, index: u32) -> Result<Slot, String> {
    let prefix = mgr.plan().prefix().to_string();
    let addr = mgr
        .plan()
        .slot(i64::from(index))
        .map_err(|e| e.to_string())?;
    if index >= mgr.config().max_slots {
        return Err(format!(
            "index is not below max_slots {}",
            mgr.config().max_slots
        ));
    }
    let guest = match read_record(&prefix, index) {
        Some(Ok(g)) => g,
        Some(Err(e)) => return Err(e),
        None => return Err("no record of a finished create (interrupted create or delete)".into()),
    };
    let (ns, found) = inspect(mgr.host(), &addr, &guest).await?;
    let sd = SlotDatapath {
        index,
        netns: ns.as_fd(),
        veth_ifindex: found.veth.index,
        veth_mac: found.veth.mac6(),
        eth0_ifindex: found.eth0.index,
        eth0_mac: found.eth0.mac6(),
        tap_ifindex: found.tap.index,
        tap_is_veth: found.tap.kind.as_deref() == Some(KIND_VETH),
        vpeer_ip: addr.vpeer_ip,
        host_ip: addr.host_ip,
    };
    mgr.adopt_slot(&sd).map_err(|e| e.to_string())?;
    let policy = read_policy(mgr, index)?;
    Ok(Slot {
        addr,
        guest,
        policy,
    })
}

/// The guest link to delete a slot that is not adopted with: its record's, or
/// a veth when its `tap0` is one (delete then removes it explicitly).
async fn guest_for_delete(mgr: &SlotManager, addr: &SlotAddr) -> GuestLink {
    if let Some(Ok(g)) = read_record(mgr.plan().prefix(), addr.index) {
        return g;
    }
    if let Ok(ns) = netns::open(&addr.namespace)
        && let Ok(nl) = Netlink::connect_in(ns.as_fd())
        && let Ok(Some(tap)) = nl.link_by_name(&addr.tap).await
        && tap.kind.as_deref() == Some(KIND_VETH)
    {
        return GuestLink::Veth {
            guest_netns: String::new(),
        };
    }
    GuestLink::Tap
}

/// Every slot index of the prefix the kernel, the maps or the records show.
async fn candidates(mgr: &SlotManager) -> Result<BTreeSet<u32>, String> {
    let plan = mgr.plan();
    let mut out = recorded(plan.prefix());
    for name in netns::list().map_err(|e| e.to_string())? {
        if let Some(i) = plan.index_of_namespace(&name) {
            out.insert(i);
        }
    }
    for link in mgr.host().link_list().await.map_err(|e| e.to_string())? {
        if let Some(i) = plan.index_of_veth(&link.name) {
            out.insert(i);
        }
    }
    let in_maps = mgr
        .with_datapath(|dp| map_indices(dp))
        .map_err(|e| e.to_string())??;
    out.extend(in_maps);
    Ok(out)
}

/// Slot indices anything in the maps refers to.
fn map_indices(dp: &crate::bpf::Datapath) -> Result<BTreeSet<u32>, String> {
    let mut out = BTreeSet::new();
    if !dp.reused_pins() {
        return Ok(out);
    }
    let maps = dp.maps();
    for i in 1..dp.config().max_slots {
        if maps.slot(i).is_ok_and(|s| s.flags & SLOT_F_ACTIVE != 0) {
            out.insert(i);
        }
    }
    out.extend(
        maps.addr_slots()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(_, i)| i),
    );
    out.extend(
        maps.veth_slots()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(_, i)| i),
    );
    for t in crate::bpf::FlowTable::ALL {
        out.extend(
            maps.flows(t)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|(_, e)| e.slot),
        );
    }
    out.remove(&0);
    Ok(out)
}

/// Adopts every intact slot of a previous run and removes the rest (see the
/// module doc). Failures to remove are listed in the report.
pub(super) async fn adopt_previous(mgr: &SlotManager) -> AdoptReport {
    let mut report = AdoptReport::default();
    let indices = match candidates(mgr).await {
        Ok(c) => c,
        Err(e) => {
            report
                .failures
                .push(format!("listing the previous run's slots: {e}"));
            return report;
        }
    };
    for index in indices {
        if index >= mgr.config().max_slots {
            // Beyond this agent's maps: removed by name with the other leftovers.
            let why = format!("index not below max_slots {}", mgr.config().max_slots);
            tracing::warn!(slot = index, reason = %why, "removing a previous run's slot that cannot be adopted");
            let _ = remove_record(mgr.plan().prefix(), index);
            report.removed.push((index, why));
            continue;
        }
        match adopt_one(mgr, index).await {
            Ok(slot) => {
                tracing::info!(slot = index, guest = ?slot.guest, "adopted the previous run's slot");
                mgr.insert_adopted(slot);
                report.adopted.push(index);
            }
            Err(why) => {
                tracing::warn!(slot = index, reason = %why, "removing a previous run's slot that cannot be adopted");
                match mgr.plan().slot(i64::from(index)) {
                    Ok(addr) => {
                        let guest = guest_for_delete(mgr, &addr).await;
                        for f in super::delete::delete(mgr, &addr, &guest).await {
                            report.failures.push(format!("slot {index}: {f}"));
                        }
                    }
                    Err(_) => {
                        if let Err(e) = mgr.detach_slot(index) {
                            report.failures.push(format!("slot {index}: {e}"));
                        }
                    }
                }
                if let Err(e) = remove_record(mgr.plan().prefix(), index) {
                    report
                        .failures
                        .push(format!("slot {index}: remove its record: {e}"));
                }
                report.removed.push((index, why));
            }
        }
    }
    report
}
