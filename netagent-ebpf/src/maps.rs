//! Map definitions. The sizes written here are only placeholders: userspace sets
//! the real ones from its configuration at load time
//! (`EbpfLoader::map_max_entries`), so nothing below is a tuning knob.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
};
use netagent_common::{
    FlowKey, GlobalConfig, GuestL2, HOST_VETH_INDEX_BASE, MAX_SLOT_INDEX, NAT_PORT_CURSOR_COUNT,
    NEXT_HOP_CACHE_SIZE, NatEntry, NextHop, PolicyRule, RateLimit, SlotInfo, SlotStats,
};

/// Placeholder size of the per-slot tables (`max_slots`).
const DEFAULT_SLOTS: u32 = 32768;
/// Placeholder size of each masquerade table.
const DEFAULT_NAT_ENTRIES: u32 = 65536;
/// Placeholder size of the host-flow table.
const DEFAULT_HOST_FLOWS: u32 = 16384;
/// Placeholder size of the local-address set.
const DEFAULT_LOCAL_ADDRS: u32 = 256;
/// Placeholder size of the egress policy trie.
const DEFAULT_POLICY_RULES: u32 = 65536;

/// `MAP_CONFIG`: one `GlobalConfig` at index 0.
#[map]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// `MAP_SLOTS`: slot index → `SlotInfo`.
#[map]
pub static SLOTS: Array<SlotInfo> = Array::with_max_entries(DEFAULT_SLOTS, 0);

/// `MAP_ADDR_SLOTS`: slot address (vpeer_ip, host_ip) → slot index.
#[map]
pub static ADDR_SLOTS: HashMap<u32, u32> = HashMap::with_max_entries(2 * DEFAULT_SLOTS, 0);

/// `MAP_VETH_SLOTS`: host veth ifindex → slot index (only for a veth whose
/// ifindex does not name its slot; see `slot_by_veth`).
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

/// `MAP_GUEST_L2`: the guest's Ethernet addresses, learned by `veth_ingress`.
#[map]
pub static GUEST_L2: Array<GuestL2> = Array::with_max_entries(DEFAULT_SLOTS, 0);

/// `MAP_POLICY`: egress rules per slot (slot 0: the defaults); the key data is
/// `PolicyKey::data` (big-endian slot, address).
#[map]
pub static POLICY: LpmTrie<[u32; 2], PolicyRule> =
    LpmTrie::with_max_entries(DEFAULT_POLICY_RULES, 0);

/// `MAP_RATE`: per-slot bandwidth limit of the guest's frames.
#[map]
pub static RATE: Array<RateLimit> = Array::with_max_entries(DEFAULT_SLOTS, 0);

/// `MAP_NAT_PORT_CURSORS`: the masquerade port allocator's per-destination
/// cursors and hash key (a fixed size: `NAT_PORT_CURSOR_COUNT + 1`).
#[map]
pub static NAT_PORT_CURSORS: Array<u64> = Array::with_max_entries(NAT_PORT_CURSOR_COUNT + 1, 0);

/// `MAP_NEXT_HOPS`: per CPU, the uplink's next hop of recent destinations
/// (`next_hop`; a fixed size: `NEXT_HOP_CACHE_SIZE`).
#[map]
pub static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(NEXT_HOP_CACHE_SIZE, 0);

/// The global configuration, if userspace wrote one with the uplink flag set.
#[inline(always)]
pub fn global_config() -> Option<&'static GlobalConfig> {
    let cfg = CONFIG.get(0)?;
    if !has_uplink(cfg) {
        return None;
    }
    Some(cfg)
}

/// Whether the uplink is configured, so masquerade may run.
#[inline(always)]
pub fn has_uplink(cfg: &GlobalConfig) -> bool {
    cfg.flags & netagent_common::CONFIG_F_UPLINK != 0
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

/// The slot whose host veth has `ifindex`, with its configuration: from the
/// index itself when the veth got the one it asked for
/// (`HOST_VETH_INDEX_BASE + (k << 15) + slot`, checked against
/// `SlotInfo::veth_ifindex`), else from `VETH_SLOTS`.
#[inline(always)]
pub fn slot_by_veth(ifindex: u32) -> Option<(u32, &'static SlotInfo)> {
    if ifindex >= HOST_VETH_INDEX_BASE {
        let index = (ifindex - HOST_VETH_INDEX_BASE) & MAX_SLOT_INDEX;
        if let Some(info) = slot_info(index)
            && info.veth_ifindex == ifindex
        {
            return Some((index, info));
        }
    }
    // SAFETY: the value is a plain u32 copied out right away.
    let index = unsafe { *VETH_SLOTS.get(&ifindex)? };
    Some((index, slot_info(index)?))
}

/// The slot whose address (vpeer_ip or host_ip) is `daddr` (network order), with
/// its configuration.
#[inline(always)]
pub fn slot_by_addr(daddr: u32) -> Option<(u32, &'static SlotInfo)> {
    // SAFETY: the value is a plain u32 copied out right away.
    let index = unsafe { *ADDR_SLOTS.get(&daddr)? };
    Some((index, slot_info(index)?))
}

/// The global configuration as userspace wrote it, uplink or not (the address
/// ranges that stay on the host are set at load time).
#[inline(always)]
pub fn config() -> Option<&'static GlobalConfig> {
    CONFIG.get(0)
}
