//! Removing every resource of a prefix: slot namespaces (`{prefix}-ns-N` in
//! `/run/netns`), host veths (`{prefix}-veth-N` / `{prefix}-v{N}`) and the routes
//! through them, the slot records (`slot::adopt`), and the pins under the
//! instance's bpffs directory — the maps, the layout descriptor and the
//! uplink's pinned TCX link, whose removal detaches it.
//!
//! `netagent cleanup` runs this with no daemon; `SlotManager::start` runs the
//! same removal (without the pins, which the datapath owns, and sparing the
//! slots it adopted) after adopting, so a crashed run's leftovers never collide
//! with new slots.

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::Path;

use crate::netlink::{Netlink, NetlinkError, link::KIND_VETH, netns};
use crate::slot::{AddressPlan, AddressingError, addressing::TAP_NAME};

/// How long cleanup waits for the kernel to free unmounted slot namespaces
/// (and with them the host veths) before deleting the veths itself (a
/// namespace a process still runs in lives on after it is unmounted).
const VETHS_GONE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `statfs` magic of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What a cleanup removed and what it could not.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CleanupReport {
    /// Namespaces removed.
    pub namespaces: Vec<String>,
    /// Host links removed.
    pub links: Vec<String>,
    /// Host routes removed.
    pub routes: usize,
    /// Pinned objects removed from the bpffs directory.
    pub pins: usize,
    /// One message per thing that could not be removed.
    pub failures: Vec<String>,
}

impl CleanupReport {
    /// True if anything was removed.
    pub fn removed_anything(&self) -> bool {
        !self.namespaces.is_empty() || !self.links.is_empty() || self.routes > 0 || self.pins > 0
    }
}

/// Why a cleanup could not run or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The prefix is not valid.
    #[error(transparent)]
    Prefix(#[from] AddressingError),
    /// The host namespace could not be read.
    #[error("{0}")]
    Netlink(#[from] NetlinkError),
    /// Some resources could not be removed.
    #[error("cleanup left resources behind (retry, or remove them by hand): {}", .0.failures.join("; "))]
    Incomplete(CleanupReport),
}

/// Removes every resource of `prefix` from the calling thread's network namespace
/// and `/run/netns`, and the pins under `bpffs`. Needs a tokio runtime. Run it with
/// the daemon stopped.
pub async fn cleanup(prefix: &str, bpffs: &Path) -> Result<CleanupReport, CleanupError> {
    let host_ns = netns::current()?;
    let host = Netlink::connect_in(host_ns.as_fd())?;
    let mut report = remove_leftovers(prefix, &host).await?;
    if let Err(e) = crate::slot::adopt::remove_records(prefix) {
        report.failures.push(format!(
            "remove the slot records in {}: {e}",
            crate::slot::adopt::records_dir(prefix).display()
        ));
    }
    match remove_uplink_filters(&host).await {
        Ok(0) => {}
        Ok(n) => report
            .links
            .push(format!("uplink_ingress filter on {n} interface(s)")),
        Err(e) => report.failures.push(e),
    }
    match remove_pins(bpffs) {
        Ok(n) => report.pins = n,
        Err(e) => report
            .failures
            .push(format!("remove pins under {}: {e}", bpffs.display())),
    }
    if report.failures.is_empty() {
        Ok(report)
    } else {
        Err(CleanupError::Incomplete(report))
    }
}

/// Removes `prefix`'s namespaces, host veths and their routes, using the host
/// connection `host`. Failures are listed in the report, not returned.
pub async fn remove_leftovers(prefix: &str, host: &Netlink) -> Result<CleanupReport, CleanupError> {
    remove_leftovers_except(prefix, host, &BTreeSet::new()).await
}

/// Like [`remove_leftovers`], sparing the slots in `keep` (adopted by a
/// starting agent).
pub async fn remove_leftovers_except(
    prefix: &str,
    host: &Netlink,
    keep: &BTreeSet<u32>,
) -> Result<CleanupReport, CleanupError> {
    // Names depend only on the prefix; the bases are irrelevant here.
    let plan = AddressPlan::new(
        prefix,
        Ipv4Addr::new(10, 11, 0, 0),
        Ipv4Addr::new(10, 12, 0, 0),
    )?;
    let mut report = CleanupReport::default();

    let veths: Vec<_> = host
        .link_list()
        .await?
        .into_iter()
        .filter(|l| {
            plan.index_of_veth(&l.name)
                .is_some_and(|i| !keep.contains(&i))
        })
        .collect();
    let veth_indexes: HashSet<u32> = veths.iter().map(|v| v.index).collect();
    for route in host.route_list().await? {
        if route.oif.is_some_and(|oif| veth_indexes.contains(&oif)) {
            match host.route_del(&route).await {
                Ok(true) => report.routes += 1,
                Ok(false) => {}
                Err(e) => report.failures.push(e.to_string()),
            }
        }
    }

    // Namespaces first: the kernel frees them in batches after they are
    // unmounted, and each takes its `eth0` and with it the host veth, where
    // deleting the veths one by one waits for an RCU grace period each.
    for name in netns::list()? {
        if plan
            .index_of_namespace(&name)
            .is_none_or(|i| keep.contains(&i))
        {
            continue;
        }
        // A veth guest link's far end sits in another namespace and must go
        // now, not whenever the kernel frees this one (a TAP goes with it).
        if let Ok(ns) = netns::open(&name)
            && let Ok(slot) = Netlink::connect_in(ns.as_fd())
            && let Ok(Some(tap)) = slot.link_by_name(TAP_NAME).await
            && tap.kind.as_deref() == Some(KIND_VETH)
            && let Err(e) = slot.link_del(tap.index).await
        {
            report
                .failures
                .push(format!("delete {TAP_NAME} in {name}: {e}"));
        }
        match netns::delete(&name) {
            Ok(_) => report.namespaces.push(name),
            Err(e) => report.failures.push(e.to_string()),
        }
    }

    // The host veths (and veths retired by a delete) go with their namespaces;
    // wait for that, then delete what is left (a veth whose namespace is
    // held open elsewhere).
    let retired = format!("{prefix}-x");
    let ours = |l: &crate::netlink::link::Link| {
        veth_indexes.contains(&l.index) || l.name.starts_with(&retired)
    };
    let deadline = std::time::Instant::now() + VETHS_GONE_TIMEOUT;
    let left = loop {
        let left: Vec<_> = host.link_list().await?.into_iter().filter(ours).collect();
        if left.is_empty() || std::time::Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for veth in &veths {
        if !left.iter().any(|l| l.index == veth.index) {
            report.links.push(veth.name.clone());
        }
    }
    for link in &left {
        match host.link_del(link.index).await {
            Ok(true) => report.links.push(link.name.clone()),
            Ok(false) => {}
            Err(e) => report.failures.push(format!("delete {}: {e}", link.name)),
        }
    }
    Ok(report)
}

/// Removes netagent's uplink filter (the clsact fallback on kernels without
/// TCX: priority `FILTER_PRIORITY`, handle `UPLINK_FILTER_HANDLE`, program
/// `uplink_ingress`) from every interface of the host namespace; it outlives
/// the agent like the slots' filters. (A TCX uplink link goes with its pin.)
/// Returns on how many interfaces one was removed.
async fn remove_uplink_filters(host: &Netlink) -> Result<usize, String> {
    use aya::programs::{
        TcAttachType,
        links::Link as _,
        tc::{SchedClassifierLink, TcHandle},
    };
    use futures::TryStreamExt;
    use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};

    let mut removed = 0;
    for link in host.link_list().await.map_err(|e| e.to_string())? {
        let filters: Vec<_> = host
            .handle()
            .traffic_filter(link.index as i32)
            .get()
            .ingress()
            .execute()
            .try_collect()
            .await
            .unwrap_or_default();
        let ours = filters.iter().any(|m| {
            let handle = u32::from(m.header.handle.major) << 16 | u32::from(m.header.handle.minor);
            let uplink_prog = m.attributes.iter().any(|a| {
                matches!(a, TcAttribute::Options(opts) if opts.iter().any(|o| matches!(
                    o, TcOption::Bpf(TcFilterBpfOption::ProgName(n)) if n == "uplink_ingress"
                )))
            });
            (m.header.info >> 16) as u16 == crate::bpf::FILTER_PRIORITY
                && handle == crate::bpf::UPLINK_FILTER_HANDLE
                && uplink_prog
        });
        if !ours {
            continue;
        }
        SchedClassifierLink::attached(
            &link.name,
            TcAttachType::Ingress,
            crate::bpf::FILTER_PRIORITY,
            TcHandle::from(crate::bpf::UPLINK_FILTER_HANDLE),
            None,
        )
        .map_err(|e| format!("find the uplink_ingress filter on {}: {e}", link.name))?
        .detach()
        .map_err(|e| format!("remove the uplink_ingress filter from {}: {e}", link.name))?;
        removed += 1;
    }
    Ok(removed)
}

/// Removes everything under `dir` if it is on a bpf filesystem; returns how many
/// pins were removed. A missing directory is nothing to do.
pub fn remove_pins(dir: &Path) -> io::Result<usize> {
    let st = match nix::sys::statfs::statfs(dir) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        // Not a bpffs (e.g. /sys/fs/bpf unmounted): nothing of ours can be pinned here.
        return Ok(0);
    }
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            removed += remove_pins(&path)?;
            std::fs::remove_dir(&path)?;
        } else {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}
