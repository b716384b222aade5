//! Deleting a slot: every step is tried, "already gone" counts as done, and all
//! failures are reported together. Works from names and addresses alone, so it
//! also removes what a crashed run left behind.

use std::fmt;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netlink::{Netlink, NetlinkError, netns};

use super::manager::SlotManager;
use super::{GuestLink, SlotAddr};

/// The steps of delete, in order. With the `fault-injection` feature a test can
/// make any of them fail (the step is then skipped, as if the kernel refused it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeleteStep {
    /// Detach the programs, clear the map entries, flows and counters.
    Datapath,
    /// The host route `HostIP/32`.
    HostRoute,
    /// The host veth: set down and renamed out of the slot's way
    /// (`{prefix}-xNNNNN`); it goes with the namespace (see `retire_host_veth`).
    HostVeth,
    /// `tap0` of a veth guest link (and with it the guest's `eth0`).
    GuestLink,
    /// The named namespace.
    Namespace,
}

impl DeleteStep {
    /// Every step, in order.
    pub const ALL: [DeleteStep; 5] = [
        DeleteStep::Datapath,
        DeleteStep::HostRoute,
        DeleteStep::HostVeth,
        DeleteStep::GuestLink,
        DeleteStep::Namespace,
    ];

    /// Stable snake_case name (`NETAGENT_CRASH_AT=delete:<name>`).
    pub const fn name(self) -> &'static str {
        match self {
            DeleteStep::Datapath => "datapath",
            DeleteStep::HostRoute => "host_route",
            DeleteStep::HostVeth => "host_veth",
            DeleteStep::GuestLink => "guest_link",
            DeleteStep::Namespace => "namespace",
        }
    }

    /// What the step does, for messages.
    pub const fn description(self) -> &'static str {
        match self {
            DeleteStep::Datapath => "detach the datapath",
            DeleteStep::HostRoute => "delete the host route",
            DeleteStep::HostVeth => "retire the host veth",
            DeleteStep::GuestLink => "delete tap0 (veth guest link)",
            DeleteStep::Namespace => "delete the namespace",
        }
    }
}

impl fmt::Display for DeleteStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// Removes slot `addr`'s datapath entries, host route, `tap0` of a veth guest
/// link (and with it the far end in the guest's namespace) and the namespace,
/// which takes the veth pair (retired first) and a TAP with it once the kernel
/// frees it. Returns one message per step that
/// failed.
pub(super) async fn delete(mgr: &SlotManager, addr: &SlotAddr, guest: &GuestLink) -> Vec<String> {
    let mut failures = Vec::new();
    for step in DeleteStep::ALL {
        let result = match mgr.inject_delete(step) {
            Err(e) => Err(e),
            Ok(()) => run(mgr, addr, guest, step).await,
        };
        if let Err(e) = result {
            failures.push(format!("{step}: {e}"));
        }
        super::manager::crash_point("delete", step.name());
    }
    failures
}

async fn run(
    mgr: &SlotManager,
    addr: &SlotAddr,
    guest: &GuestLink,
    step: DeleteStep,
) -> Result<(), String> {
    let host = mgr.host();
    match step {
        // Datapath first: from here the programs pass the slot's packets and it
        // gets no new flows; its counters go too, its NAT and host-flow entries
        // once the delete has answered (`SlotManager::delete`).
        DeleteStep::Datapath => mgr
            .detach_slot_keeping_flows(addr.index)
            .map_err(|e| e.to_string()),
        DeleteStep::HostRoute => host
            .route_del_dst(addr.host_ip, 32)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        DeleteStep::HostVeth => retire_host_veth(mgr, addr).await.map_err(|e| e.to_string()),
        // A veth guest link's far end sits in the guest's namespace: delete `tap0`
        // explicitly so it goes now, not whenever the kernel gets to freeing the
        // slot namespace (a re-create would find the guest's `eth0` still there).
        // A TAP goes with the namespace; deleting it here would only add a second
        // synchronize_net to every delete.
        DeleteStep::GuestLink if matches!(guest, GuestLink::Tap) => Ok(()),
        DeleteStep::GuestLink => match netns::open(&addr.namespace) {
            Ok(ns) => match Netlink::connect_in(ns.as_fd()) {
                Ok(slot) => slot
                    .link_del_by_name(&addr.tap)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) if e.is_gone() => Ok(()),
            Err(e) => Err(e.to_string()),
        },
        DeleteStep::Namespace => netns::delete(&addr.namespace)
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}

/// Takes the host veth out of the slot's way without deleting it: down (which
/// also drops its routes) and renamed to `{prefix}-xNNNNN`. Deleting a veth
/// makes the caller wait for an RCU grace period and a barrier (~20 ms here);
/// instead the pair goes when the kernel frees the slot namespace (its `eth0`
/// takes the peer along), after `delete` has returned. The name is free for the
/// slot's next create at once; its ifindex is not, so create tries others
/// (`create::host_veth_indexes`).
async fn retire_host_veth(mgr: &SlotManager, addr: &SlotAddr) -> Result<(), NetlinkError> {
    let host = mgr.host();
    let Some(link) = host.link_by_name(&addr.veth).await? else {
        return Ok(());
    };
    host.link_down(link.index).await?;
    // A name still held by a link retired earlier (e.g. by a previous run of
    // the agent) is skipped.
    let mut last = None;
    for _ in 0..8 {
        let n = RETIRED.fetch_add(1, Ordering::Relaxed) & 0xf_ffff;
        let name = format!("{}-x{n:05x}", mgr.plan().prefix());
        match host.link_set_name(link.index, &name).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_exists() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    // Every try collided: delete it the slow way.
    match host.link_del(link.index).await {
        Ok(_) => Ok(()),
        Err(e) => Err(last.unwrap_or(e)),
    }
}

/// Names of retired host veths, unique within a run.
static RETIRED: AtomicU32 = AtomicU32::new(0);
