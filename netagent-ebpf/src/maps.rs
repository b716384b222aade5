//! Map definitions. The sizes written here are only placeholders: userspace sets
//! the real ones from its configuration at load time
//! (`EbpfLoader::map_max_entries`), so nothing below is a tuning knob.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use netagent_common::{FlowKey, GlobalConfig, GuestL2, NatEntry, SlotInfo, SlotStats};

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

/// The slot this program instance serves, set by the loader
/// (`EbpfLoader::override_global`) when it loads `tap_ingress` and `slot_ingress`
/// for one slot. 0 in the shared instance.
///
/// Per-slot instances exist because a program inside a slot namespace cannot
/// find its namespace from the packet: `bpf_get_netns_cookie` on a tc program
/// reports the namespace of the skb's socket, and frames from a TAP or veth have
/// none (it then returns the initial namespace's cookie).
// SAFETY: `no_mangle` keeps the symbol name the loader patches by
// (`override_global("SLOT_INDEX", ..)`); nothing else in the object uses it.
#[unsafe(no_mangle)]
static SLOT_INDEX: Global<u32> = Global::new(0);

/// The slot whose namespace this program runs in, with its configuration.
///
/// A per-slot instance knows it from `SLOT_INDEX` (a constant the verifier sees
/// through). The shared instance falls back to `NETNS_SLOTS` by the netns cookie,
/// which only works for skbs that carry a socket of that namespace, as in
/// `BPF_PROG_TEST_RUN`.
#[inline(always)]
pub fn slot_by_netns(ctx: &aya_ebpf::programs::TcContext) -> Option<(u32, &'static SlotInfo)> {
    let index = SLOT_INDEX.load();
    if index != 0 {
        return Some((index, slot_info(index)?));
    }
    use aya_ebpf::EbpfContext as _;
    // SAFETY: the helper only reads the skb that the context points to.
    let cookie = unsafe { aya_ebpf::helpers::generated::bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is a plain u32 copied out right away.
    let index = unsafe { *NETNS_SLOTS.get(&cookie)? };
    Some((index, slot_info(index)?))
}
