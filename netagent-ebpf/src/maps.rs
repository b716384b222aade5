//! Map definitions. The sizes written here are only placeholders: userspace sets
//! the real ones from its configuration at load time
//! (`EbpfLoader::map_max_entries`), so nothing below is a tuning knob.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use netagent_common::{
    FlowKey, GlobalConfig, GuestL2, NatEntry, SLOT_BEACON_PORT, SlotInfo, SlotStats,
};

/// Placeholder size of the per-slot tables (`max_slots`).
const DEFAULT_SLOTS: u32 = 32768;
/// Placeholder size of each masquerade table.
const DEFAULT_NAT_ENTRIES: u32 = 65536;
/// Placeholder size of the host-flow table.
const DEFAULT_HOST_FLOWS: u32 = 16384;
/// Placeholder size of the local-address set.
const DEFAULT_LOCAL_ADDRS: u32 = 256;

/// `MAP_CONFIG`: one `GlobalConfig` at index 0.
#[map]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// `MAP_SLOTS`: slot index → `SlotInfo`.
#[map]
pub static SLOTS: Array<SlotInfo> = Array::with_max_entries(DEFAULT_SLOTS, 0);

/// `MAP_NETNS_SLOTS`: netns cookie → slot index.
#[map]
pub static NETNS_SLOTS: HashMap<u64, u32> = HashMap::with_max_entries(DEFAULT_SLOTS, 0);

/// `MAP_VETH_SLOTS`: host veth ifindex → slot index.
#[map]
pub static VETH_SLOTS: HashMap<u32, u32> = HashMap::with_max_entries(DEFAULT_SLOTS, 0);

/// `MAP_NAT_EGRESS`: masquerade, original direction.
#[map]
pub static NAT_EGRESS: HashMap<FlowKey, NatEntry> =
    HashMap::with_max_entries(DEFAULT_NAT_ENTRIES, 0);

/// `MAP_NAT_INGRESS`: masquerade, reply direction.
#[map]
pub static NAT_INGRESS: HashMap<FlowKey, NatEntry> =
    HashMap::with_max_entries(DEFAULT_NAT_ENTRIES, 0);

/// `MAP_HOST_FLOWS`: host → guest flows, keyed as they arrive on `eth0`.
#[map]
pub static HOST_FLOWS: HashMap<FlowKey, NatEntry> =
    HashMap::with_max_entries(DEFAULT_HOST_FLOWS, 0);

/// `MAP_LOCAL_ADDRS`: addresses of the agent's namespace.
#[map]
pub static LOCAL_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(DEFAULT_LOCAL_ADDRS, 0);

/// `MAP_STATS`: per-slot, per-CPU counters.
#[map]
pub static STATS: PerCpuArray<SlotStats> = PerCpuArray::with_max_entries(DEFAULT_SLOTS, 0);

/// `MAP_GUEST_L2`: the guest's Ethernet addresses, learned by `tap_ingress`.
#[map]
pub static GUEST_L2: Array<GuestL2> = Array::with_max_entries(DEFAULT_SLOTS, 0);

/// The global configuration, if userspace wrote one with the uplink flag set.
#[inline(always)]
pub fn global_config() -> Option<&'static GlobalConfig> {
    let cfg = CONFIG.get(0)?;
    if cfg.flags & netagent_common::CONFIG_F_UPLINK == 0 {
        return None;
    }
    Some(cfg)
}

/// A live slot's configuration.
#[inline(always)]
pub fn slot_info(index: u32) -> Option<&'static SlotInfo> {
    let info = SLOTS.get(index)?;
    if info.flags & netagent_common::SLOT_F_ACTIVE == 0 {
        return None;
    }
    Some(info)
}

/// The 4-tuple `bpf_sk_lookup_udp` takes for IPv4 (`struct bpf_sock_tuple`).
#[repr(C)]
struct SockTupleV4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

/// The slot whose namespace the packet's device is in, from the namespace's
/// beacon socket (see `SLOT_BEACON_PORT`): its `SO_MARK` is the slot index.
#[inline(always)]
fn slot_by_beacon(ctx: &aya_ebpf::programs::TcContext) -> Option<u32> {
    use aya_ebpf::EbpfContext as _;
    use aya_ebpf::bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple};
    use aya_ebpf::helpers::generated::{bpf_sk_lookup_udp, bpf_sk_release};
    let loopback = u32::from_ne_bytes([127, 0, 0, 1]);
    let mut tuple = SockTupleV4 {
        saddr: loopback,
        daddr: loopback,
        sport: SLOT_BEACON_PORT.to_be(),
        dport: SLOT_BEACON_PORT.to_be(),
    };
    // SAFETY: `tuple` is a valid IPv4 `bpf_sock_tuple` of the size given; the
    // returned socket is released below on the only path that holds it.
    let sk = unsafe {
        bpf_sk_lookup_udp(
            ctx.as_ptr(),
            (&raw mut tuple).cast::<bpf_sock_tuple>(),
            core::mem::size_of::<SockTupleV4>() as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a referenced socket from the lookup; read, then released.
    let mark = unsafe { (*sk).mark };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    Some(mark)
}

/// The slot whose namespace this program runs in, with its configuration.
///
/// Found by the namespace's beacon socket. Without one (as in
/// `BPF_PROG_TEST_RUN`, whose skbs carry a socket of the caller's namespace),
/// `NETNS_SLOTS` by the netns cookie is tried.
#[inline(always)]
pub fn slot_by_netns(ctx: &aya_ebpf::programs::TcContext) -> Option<(u32, &'static SlotInfo)> {
    if let Some(index) = slot_by_beacon(ctx) {
        return Some((index, slot_info(index)?));
    }
    use aya_ebpf::EbpfContext as _;
    // SAFETY: the helper only reads the skb that the context points to.
    let cookie = unsafe { aya_ebpf::helpers::generated::bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is a plain u32 copied out right away.
    let index = unsafe { *NETNS_SLOTS.get(&cookie)? };
    Some((index, slot_info(index)?))
}
