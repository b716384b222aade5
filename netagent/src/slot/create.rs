//! Creating a slot, all-or-nothing: each step records how to undo what it made,
//! and any failure undoes everything in reverse order.

use std::fmt;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use netagent_common::{HOST_VETH_INDEX_BASE, SLOT_ETH0_IFINDEX, SLOT_TAP_IFINDEX_BASE};

use crate::bpf::SlotDatapath;
use crate::netlink::{Netlink, NetlinkError, link::VethEnd, netns, tap, tc::TcSocket};

use super::addressing::{
    GUEST_IP, TAP_IP, TAP_MAC, TAP_PREFIX, TAP_TXQUEUELEN, VETH_PREFIX, VPEER_NAME, eth0_mac,
    host_veth_mac,
};
use super::error::{SlotError, StepError};
use super::manager::SlotManager;
use super::policy::SlotPolicy;
use super::{GuestLink, SlotAddr};

/// Name of the guest end of a veth guest link inside the guest namespace.
pub const GUEST_VETH_NAME: &str = "eth0";

/// How many host ifindexes a create tries for slot N's veth.
const HOST_VETH_INDEX_TRIES: u32 = 8;

/// Where the host veths go whose natural index would share the uplink's chain in
/// the kernel's ifindex hash (see [`host_veth_indexes`]).
const HOST_VETH_ALT_INDEX_BASE: u32 = 1 << 23;

/// Buckets of the kernel's per-namespace ifindex hash (`NETDEV_HASHENTRIES`): a
/// device is found by index by walking the chain of `ifindex & 255`.
const IFINDEX_HASH_BUCKETS: u32 = 256;

/// The host ifindexes slot `index`'s veth asks for, in order:
/// `HOST_VETH_INDEX_BASE + index`, then the same plus multiples of 32768 (a
/// retired veth of the slot keeps its index until the kernel frees its
/// namespace; see `delete::retire_host_veth`).
///
/// An index in the uplink's chain of the kernel's ifindex hash is moved to
/// another chain (`HOST_VETH_ALT_INDEX_BASE + … + index + 128`): the datapath
/// looks the uplink up by index for every masqueraded packet, and the uplink,
/// older than every veth, sits at the end of its chain, behind every veth in it
/// (about 40 at 10,000 slots). Such a veth's slot is found through VETH_SLOTS
/// rather than from its index.
pub(super) fn host_veth_indexes(index: u32, uplink_ifindex: u32) -> impl Iterator<Item = u32> {
    let uplink_bucket = uplink_ifindex % IFINDEX_HASH_BUCKETS;
    (0..HOST_VETH_INDEX_TRIES).map(move |k| {
        let natural = HOST_VETH_INDEX_BASE + (k << 15) + index;
        if natural % IFINDEX_HASH_BUCKETS == uplink_bucket {
            HOST_VETH_ALT_INDEX_BASE + (k << 15) + index + IFINDEX_HASH_BUCKETS / 2
        } else {
            natural
        }
    })
}

/// The ifindex of slot `index`'s `tap0` in its namespace
/// (`SLOT_TAP_IFINDEX_BASE + index`): `tap_ingress` finds the slot from it.
pub const fn tap_ifindex(index: u32) -> u32 {
    SLOT_TAP_IFINDEX_BASE + index
}

/// The steps of create, in order. With the `fault-injection` feature a test can
/// make create fail right after any of them has done its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CreateStep {
    /// The named namespace `{prefix}-ns-N` (IPv4 only, `lo` up).
    Namespace,
    /// The veth pair, both ends up: host end `{prefix}-veth-N`, slot end `eth0`
    /// with ifindex `SLOT_ETH0_IFINDEX`.
    Veth,
    /// Host veth address (veth_ip/31).
    HostVeth,
    /// `eth0` address (vpeer_ip/31).
    SlotVeth,
    /// The persistent TAP `tap0` with ifindex `SLOT_TAP_IFINDEX_BASE + N`, its MAC,
    /// txqueuelen, up, address (`GuestLink::Tap`), or the veth `tap0` (same
    /// ifindex) whose peer is the guest's `eth0` (`GuestLink::Veth`).
    GuestLink,
    /// The guest end of a veth guest link: the slot's guest MAC (if it has
    /// one), address, up, default route (`GuestLink::Veth` only).
    GuestConfig,
    /// Default route in the slot namespace via the host veth.
    SlotRoute,
    /// Host route `HostIP/32 via vpeer`.
    HostRoute,
    /// The datapath programs and map entries, then the slot's guest MAC, egress
    /// lists and rate limit.
    Datapath,
}

impl CreateStep {
    /// Every step, in order (`GuestConfig` runs for veth guest links only).
    pub const ALL: [CreateStep; 9] = [
        CreateStep::Namespace,
        CreateStep::Veth,
        CreateStep::HostVeth,
        CreateStep::SlotVeth,
        CreateStep::GuestLink,
        CreateStep::GuestConfig,
        CreateStep::SlotRoute,
        CreateStep::HostRoute,
        CreateStep::Datapath,
    ];

    /// Stable snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            CreateStep::Namespace => "namespace",
            CreateStep::Veth => "veth",
            CreateStep::HostVeth => "host_veth",
            CreateStep::SlotVeth => "slot_veth",
            CreateStep::GuestLink => "guest_link",
            CreateStep::GuestConfig => "guest_config",
            CreateStep::SlotRoute => "slot_route",
            CreateStep::HostRoute => "host_route",
            CreateStep::Datapath => "datapath",
        }
    }
}

impl fmt::Display for CreateStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to undo one thing create made.
enum Undo {
    Namespace(String),
    HostLink(String),
    SlotLink(String),
    HostRoute(Ipv4Addr),
    Datapath(u32),
}

/// A failed step: which, and why.
struct Failed(CreateStep, StepError);

fn at<E: Into<StepError>>(step: CreateStep) -> impl FnOnce(E) -> Failed {
    move |e| Failed(step, e.into())
}

/// Creates slot `addr` with guest link `guest` and security settings `policy`.
/// On failure everything made so far is removed before the error is returned.
pub(super) async fn create(
    mgr: &SlotManager,
    addr: &SlotAddr,
    guest: &GuestLink,
    policy: &SlotPolicy,
) -> Result<(), SlotError> {
    // Resolve the guest namespace before making anything.
    let guest_ns = match guest {
        GuestLink::Tap => None,
        GuestLink::Veth { guest_netns } => Some(netns::open(guest_netns).map_err(|e| match e {
            NetlinkError::NotFound(_) => SlotError::GuestNamespaceMissing(guest_netns.clone()),
            e => SlotError::Create {
                index: addr.index,
                step: CreateStep::GuestLink,
                source: e.into(),
                rollback: Vec::new(),
            },
        })?),
    };
    let mut undo = Vec::new();
    match build(mgr, addr, guest_ns.as_ref(), policy, &mut undo).await {
        Ok(()) => Ok(()),
        Err(Failed(step, source)) => {
            let rollback = rollback(mgr, addr, undo).await;
            if rollback.is_empty() {
                tracing::warn!(slot = addr.index, %step, error = %source, "create failed; rolled back");
            } else {
                tracing::error!(slot = addr.index, %step, error = %source, ?rollback, "create failed; rollback incomplete");
            }
            // A name that is taken by something we did not make is the caller's
            // conflict, not a host failure.
            if let StepError::Netlink(e) = &source
                && e.is_exists()
                && matches!(
                    step,
                    CreateStep::Namespace
                        | CreateStep::Veth
                        | CreateStep::GuestLink
                        | CreateStep::HostRoute
                )
                && rollback.is_empty()
            {
                return Err(SlotError::Conflict(format!(
                    "creating slot {} failed at step {step}: {e}; something outside this agent uses the name or \
                     address (remove it, or run `netagent cleanup` if it is a leftover)",
                    addr.index
                )));
            }
            Err(SlotError::Create {
                index: addr.index,
                step,
                source,
                rollback,
            })
        }
    }
}

async fn build(
    mgr: &SlotManager,
    addr: &SlotAddr,
    guest_ns: Option<&OwnedFd>,
    policy: &SlotPolicy,
    undo: &mut Vec<Undo>,
) -> Result<(), Failed> {
    use CreateStep::*;
    let host = mgr.host();
    let mut times = StepTimes::start();

    // Namespace: one the pool made ready in the background, else one made
    // here. Either way it carries IPv4 only (no IPv6 link-local addresses,
    // router solicitations or DAD on eth0 and tap0: nothing the guest did not
    // ask for) and comes with a netlink socket and `/dev/net/tun` opened inside.
    let prepared = match mgr.take_prepared_ns() {
        Some(p) => p,
        None => netns::prepare().map_err(at(Namespace))?,
    };
    netns::name(prepared.ns.as_fd(), &addr.namespace).map_err(at(Namespace))?;
    undo.push(Undo::Namespace(addr.namespace.clone()));
    let netns::Prepared {
        ns,
        netlink,
        tc,
        tun,
    } = prepared;
    let mut slot_tc = TcSocket::from_socket(tc).map_err(at(Namespace))?;
    let slot = Netlink::from_socket(netlink).map_err(at(Namespace))?;
    mgr.inject(Namespace).map_err(at(Namespace))?;
    times.lap(Namespace);

    // Veth pair with both ifindexes explicit (the kernel honours the peer's only
    // then, and fails rather than pick another): `eth0` gets SLOT_ETH0_IFINDEX,
    // which the shared `tap_ingress` redirects to. Both ends get their MACs in
    // the same request and come up once their qdiscs are on (below). The host
    // end asks for an index derived
    // from the slot index; if that one is taken in the agent namespace (another
    // agent), the pair is made inside the slot namespace instead (any host
    // index there) and the host end moved over, which costs a netns move (an RCU
    // grace period). Until the move succeeded the pair goes away with the
    // namespace.
    let veth_mac = host_veth_mac(addr.index);
    let eth0 = VethEnd {
        name: VPEER_NAME,
        index: SLOT_ETH0_IFINDEX,
        mac: eth0_mac(addr.index),
    };
    let mut direct = Err(NetlinkError::NotFound("no host veth index to try".into()));
    let mut veth_index = 0;
    for index in host_veth_indexes(addr.index, mgr.uplink().ifindex) {
        veth_index = index;
        let this = VethEnd {
            name: &addr.veth,
            index,
            mac: veth_mac,
        };
        direct = host.veth_add_pair(&this, &eth0, ns.as_fd()).await;
        match &direct {
            // The index is held by this slot's veth retired by a delete a
            // moment ago (or another agent's link): try the next one.
            Err(e)
                if e.is_exists()
                    && host.link_by_name(&addr.veth).await.ok().flatten().is_none() => {}
            _ => break,
        }
    }
    if let Err(e) = direct {
        if !e.is_exists() || host.link_by_name(&addr.veth).await.ok().flatten().is_some() {
            // A failure, or the name is taken: a conflict, reported as such.
            return Err(Failed(Veth, e.into()));
        }
        slot.veth_add_indexed(&addr.veth, veth_index, VPEER_NAME, SLOT_ETH0_IFINDEX)
            .await
            .map_err(at(Veth))?;
        slot.link_move(veth_index, mgr.host_ns(), &addr.veth)
            .await
            .map_err(at(Veth))?;
        undo.push(Undo::HostLink(addr.veth.clone()));
        // The move keeps the index only where it is free.
        veth_index = host.link_get(&addr.veth).await.map_err(at(Veth))?.index;
        host.link_set_mac(veth_index, veth_mac)
            .await
            .map_err(at(Veth))?;
        slot.link_set_mac(eth0.index, eth0.mac)
            .await
            .map_err(at(Veth))?;
    } else {
        undo.push(Undo::HostLink(addr.veth.clone()));
    }
    // The ingress qdiscs the datapath's filters go on, added while the links
    // are down: on a link that is up the kernel waits for an RCU grace period
    // first (`dev_deactivate`), once per qdisc.
    mgr.add_host_ingress_qdisc(veth_index).map_err(at(Veth))?;
    slot_tc.add_ingress_qdisc(eth0.index).map_err(at(Veth))?;
    host.link_up(veth_index).await.map_err(at(Veth))?;
    slot.link_up(eth0.index).await.map_err(at(Veth))?;
    mgr.inject(Veth).map_err(at(Veth))?;
    times.lap(Veth);

    // Host end.
    host.addr_add(veth_index, addr.veth_ip, VETH_PREFIX)
        .await
        .map_err(at(HostVeth))?;
    mgr.inject(HostVeth).map_err(at(HostVeth))?;
    times.lap(HostVeth);

    // Slot end (`lo` came up with the namespace).
    slot.addr_add(eth0.index, addr.vpeer_ip, VETH_PREFIX)
        .await
        .map_err(at(SlotVeth))?;
    mgr.inject(SlotVeth).map_err(at(SlotVeth))?;
    times.lap(SlotVeth);

    // Guest side: TAP, or a veth into the guest namespace; either way `tap0` has
    // the slot's fixed ifindex (the kernel fails rather than pick another; the
    // peer in the guest namespace: any index).
    let tap_index = tap_ifindex(addr.index);
    match guest_ns {
        None => {
            tap::create_persistent_on(tun, &addr.tap, Some(tap_index)).map_err(at(GuestLink))?;
        }
        Some(guest_ns) => {
            slot.veth_add_indexed_peer_ns(
                &addr.tap,
                tap_index,
                GUEST_VETH_NAME,
                0,
                guest_ns.as_fd(),
            )
            .await
            .map_err(at(GuestLink))?;
        }
    }
    undo.push(Undo::SlotLink(addr.tap.clone()));
    slot_tc
        .add_ingress_qdisc(tap_index)
        .map_err(at(GuestLink))?;
    configure_tap(&slot, tap_index)
        .await
        .map_err(at(GuestLink))?;
    mgr.inject(GuestLink).map_err(at(GuestLink))?;
    times.lap(GuestLink);

    if let Some(guest_ns) = guest_ns {
        let guest = Netlink::connect_in(guest_ns.as_fd()).map_err(at(GuestConfig))?;
        let geth = guest
            .link_get(GUEST_VETH_NAME)
            .await
            .map_err(at(GuestConfig))?;
        // The guest's MAC, when the slot has one: the only source the datapath
        // lets through.
        if let Some(mac) = policy.guest_mac {
            guest
                .link_set_mac(geth.index, mac.0)
                .await
                .map_err(at(GuestConfig))?;
        }
        guest
            .addr_add(geth.index, GUEST_IP, TAP_PREFIX)
            .await
            .map_err(at(GuestConfig))?;
        guest.link_up(geth.index).await.map_err(at(GuestConfig))?;
        if let Some(lo) = guest.link_by_name("lo").await.map_err(at(GuestConfig))? {
            guest.link_up(lo.index).await.map_err(at(GuestConfig))?;
        }
        guest
            .route_add_default(TAP_IP)
            .await
            .map_err(at(GuestConfig))?;
        mgr.inject(GuestConfig).map_err(at(GuestConfig))?;
        times.lap(GuestConfig);
    }

    // Routes.
    slot.route_add_default(addr.veth_ip)
        .await
        .map_err(at(SlotRoute))?;
    mgr.inject(SlotRoute).map_err(at(SlotRoute))?;
    times.lap(SlotRoute);
    host.route_add_host(addr.host_ip, addr.vpeer_ip)
        .await
        .map_err(at(HostRoute))?;
    undo.push(Undo::HostRoute(addr.host_ip));
    mgr.inject(HostRoute).map_err(at(HostRoute))?;
    times.lap(HostRoute);

    // Datapath.
    let sd = SlotDatapath {
        index: addr.index,
        netns: ns.as_fd(),
        veth_ifindex: veth_index,
        veth_mac,
        eth0_ifindex: eth0.index,
        eth0_mac: eth0.mac,
        tap_ifindex: tap_index,
        tap_is_veth: guest_ns.is_some(),
        vpeer_ip: addr.vpeer_ip,
        host_ip: addr.host_ip,
    };
    // The slot's egress rules and rate limit first (keyed by the index; no
    // program sees the slot yet), so that the guest's first frame meets them;
    // the undo (detach_slot, idempotent) clears them. The guest MAC lives in
    // the slot's entry, so it is written after the attach.
    undo.push(Undo::Datapath(addr.index));
    mgr.with_datapath(|dp| {
        dp.set_slot_egress(addr.index, &policy.egress)?;
        dp.set_rate_limit(addr.index, policy.rate_limit.map(|r| r.limit()))
    })
    .map_err(|e| Failed(Datapath, StepError::Other(e.to_string())))?
    .map_err(at(Datapath))?;
    mgr.attach_slot(&sd, &mut slot_tc).map_err(at(Datapath))?;
    mgr.write_policy(addr.index, policy).map_err(at(Datapath))?;
    mgr.inject(Datapath).map_err(at(Datapath))?;
    times.lap(Datapath);
    times.log(addr.index);
    Ok(())
}

/// How long each step of one create took, logged at debug level once it
/// succeeded (`RUST_LOG=netagent=debug`): where a slow create spends its time.
struct StepTimes {
    last: Instant,
    laps: Vec<(CreateStep, Duration)>,
}

impl StepTimes {
    fn start() -> StepTimes {
        StepTimes {
            last: Instant::now(),
            laps: Vec::with_capacity(CreateStep::ALL.len()),
        }
    }

    /// `step` is done: the time since the previous one.
    fn lap(&mut self, step: CreateStep) {
        let now = Instant::now();
        self.laps.push((step, now - self.last));
        self.last = now;
    }

    fn log(&self, index: u32) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let total: Duration = self.laps.iter().map(|(_, d)| *d).sum();
        let steps = self
            .laps
            .iter()
            .map(|(step, d)| format!("{} {} µs", step.name(), d.as_micros()))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::debug!(slot = index, total_us = total.as_micros() as u64, %steps, "slot created");
    }
}

/// MAC, txqueuelen and up (one request), then the address, on the slot's
/// `tap0` (TAP or veth).
async fn configure_tap(slot: &Netlink, index: u32) -> Result<(), NetlinkError> {
    slot.link_set_mac_txqueuelen_up(index, TAP_MAC, TAP_TXQUEUELEN)
        .await?;
    slot.addr_add(index, TAP_IP, TAP_PREFIX).await
}

/// Undoes in reverse order; returns what could not be undone.
async fn rollback(mgr: &SlotManager, addr: &SlotAddr, undo: Vec<Undo>) -> Vec<String> {
    let host = mgr.host();
    let mut failures = Vec::new();
    for step in undo.into_iter().rev() {
        let result: Result<(), String> = match step {
            Undo::Datapath(index) => mgr.detach_slot(index).map_err(|e| e.to_string()),
            Undo::HostRoute(dst) => host
                .route_del_dst(dst, 32)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Undo::SlotLink(name) => match netns::open(&addr.namespace) {
                Ok(ns) => match Netlink::connect_in(ns.as_fd()) {
                    Ok(slot) => slot
                        .link_del_by_name(&name)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) if e.is_gone() => Ok(()),
                Err(e) => Err(e.to_string()),
            },
            Undo::HostLink(name) => host
                .link_del_by_name(&name)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Undo::Namespace(name) => netns::delete(&name).map(drop).map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            failures.push(e);
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn host_veth_indexes_stay_out_of_the_uplinks_hash_chain_and_never_repeat() {
        for uplink in [2u32, 7, 255, 256, 4097] {
            let mut seen = HashSet::new();
            for slot in 1..=32767u32 {
                let natural_in_chain =
                    (HOST_VETH_INDEX_BASE + slot) % IFINDEX_HASH_BUCKETS == uplink % 256;
                for (k, index) in host_veth_indexes(slot, uplink).enumerate() {
                    assert_ne!(index % 256, uplink % 256, "slot {slot} try {k}: {index}");
                    if !natural_in_chain {
                        assert_eq!(index, HOST_VETH_INDEX_BASE + ((k as u32) << 15) + slot);
                    }
                    assert!(index <= i32::MAX as u32);
                    assert!(seen.insert(index), "index {index} given twice");
                }
            }
        }
    }
}
