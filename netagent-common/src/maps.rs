//! Map names and the `#[repr(C)]` keys and values stored in them.

/// Global datapath configuration, `Array<GlobalConfig>` with one entry (index 0).
pub const MAP_CONFIG: &str = "CONFIG";
/// Per-slot configuration, `Array<SlotInfo>` indexed by slot index (entry 0 unused).
pub const MAP_SLOTS: &str = "SLOTS";
/// Slot address → slot index, `HashMap<u32, u32>` (network-order vpeer_ip and
/// host_ip of every slot): `slot_ingress`, one instance on every slot's `eth0`,
/// finds its slot by the packet's destination.
pub const MAP_ADDR_SLOTS: &str = "ADDR_SLOTS";
/// Host-side veth ifindex → slot index, `HashMap<u32, u32>`: consulted only
/// for a veth whose ifindex does not name its slot (`HOST_VETH_INDEX_BASE`).
pub const MAP_VETH_SLOTS: &str = "VETH_SLOTS";
/// Masquerade, original direction: `HashMap<FlowKey, NatEntry>`, keyed by the flow
/// as it leaves the slot (source = vpeer IP); the value holds the uplink address
/// and allocated port.
pub const MAP_NAT_EGRESS: &str = "NAT_EGRESS";
/// Masquerade, reply direction: `HashMap<FlowKey, NatEntry>`, keyed by the reply as
/// it arrives on the uplink (destination = uplink address and allocated port); the
/// value holds the vpeer address and original port.
pub const MAP_NAT_INGRESS: &str = "NAT_INGRESS";
/// Host → guest flows (DNAT of HostIP): `HashMap<FlowKey, NatEntry>` keyed by the
/// flow as it arrives on the slot's `eth0` (destination = HostIP).
pub const MAP_HOST_FLOWS: &str = "HOST_FLOWS";
/// Addresses of the agent's own (host) namespace, `HashMap<u32, u32>` (network-order
/// address → 1). Slot traffic to them goes to the host stack instead of the uplink.
pub const MAP_LOCAL_ADDRS: &str = "LOCAL_ADDRS";
/// Per-slot counters, `PerCpuArray<SlotStats>` indexed by slot index. Entry 0 holds
/// what cannot be attributed to a slot.
pub const MAP_STATS: &str = "STATS";
/// The guest's Ethernet addresses as its own frames show them, `Array<GuestL2>`
/// indexed by slot index, written by `veth_ingress` from the guest's frames. With them `slot_ingress` writes
/// the Ethernet header itself and hands the packet to the TAP with `bpf_redirect`,
/// skipping the route and neighbour lookups of `bpf_redirect_neigh`.
pub const MAP_GUEST_L2: &str = "GUEST_L2";
/// Egress policy of guest-initiated traffic, `LpmTrie<PolicyKey, PolicyRule>`
/// (in aya's terms `LpmTrie<[u32; 2], PolicyRule>`: `PolicyKey::data`): one
/// entry per CIDR of a slot's allow and deny lists, slot 0 holding the default
/// rules every slot falls back to. See `PolicyKey` for the evaluation.
pub const MAP_POLICY: &str = "POLICY";
/// Per-slot bandwidth limit of the guest's frames, `Array<RateLimit>` indexed by
/// slot index, enforced by `tap_ingress`.
pub const MAP_RATE: &str = "RATE";
/// The masquerade port allocator's state, `Array<u64>` of `NAT_PORT_CURSOR_COUNT + 1`
/// entries, all written by the datapath alone: entries `0..NAT_PORT_CURSOR_COUNT` are
/// per-destination cursors (RFC 6056 algorithm 4, "double hash"), entry
/// `NAT_PORT_SECRET_INDEX` the key of [`nat_port_hash`]. Zero means unset: the
/// datapath seeds either from `bpf_get_prandom_u32` on first use.
pub const MAP_NAT_PORT_CURSORS: &str = "NAT_PORT_CURSORS";
/// Next hops of masqueraded packets on a veth uplink (`CONFIG_F_UPLINK_PEER`),
/// `PerCpuArray<NextHop>` of `NEXT_HOP_CACHE_SIZE` entries per CPU indexed by
/// `next_hop_index` of the destination: what `bpf_fib_lookup` answered for it,
/// reused for `NEXT_HOP_CACHE_NS`. Written and read by the datapath alone.
pub const MAP_NEXT_HOPS: &str = "NEXT_HOPS";

/// Version of the map layout (the `#[repr(C)]` keys and values below and what
/// their fields mean). A restarted agent reuses pinned maps only when their
/// stored layout matches its own (see `netagent::bpf::layout`): bump this with
/// any change to a key or value struct, even one that keeps its size, unless
/// what an earlier version wrote still reads the same. (`FlowKey::scope` and
/// `STATE_SLOT_NS` are such a change: they were zero padding and an unused bit,
/// and zero means what every earlier flow was, the guest's.)
pub const LAYOUT_VERSION: u32 = 1;

/// Bounded tries when a masquerade port is taken (Cilium's
/// `SNAT_COLLISION_RETRIES`).
pub const NAT_COLLISION_RETRIES: u32 = 32;
/// The first this many of the `NAT_COLLISION_RETRIES` tries take the next ports
/// of the destination's cursor (oldest first); the rest jump across the range,
/// so a run of live ports longer than this does not exhaust the destination.
pub const NAT_SEQUENTIAL_PROBES: u32 = 16;
/// Number of per-destination cursors in `MAP_NAT_PORT_CURSORS` (a power of two:
/// a destination's cursor is `nat_port_hash(..) & (NAT_PORT_CURSOR_COUNT - 1)`).
pub const NAT_PORT_CURSOR_COUNT: u32 = 4096;
/// The entry of `MAP_NAT_PORT_CURSORS` holding the key of [`nat_port_hash`].
pub const NAT_PORT_SECRET_INDEX: u32 = NAT_PORT_CURSOR_COUNT;
/// Entries per CPU of `MAP_NEXT_HOPS` (a power of two).
pub const NEXT_HOP_CACHE_SIZE: u32 = 64;
/// How long a next hop from `bpf_fib_lookup` is reused (coarse clock): the
/// longest a route, neighbour or MTU change on the uplink goes unseen by the
/// masquerade's fast path. One lookup per destination, CPU and period.
pub const NEXT_HOP_CACHE_NS: u64 = 20_000_000;

/// The `MAP_NEXT_HOPS` entry of destination `daddr`, `dport` (network order)
/// and protocol `proto`: a multiplicative hash's top bits.
#[inline(always)]
pub const fn next_hop_index(daddr: u32, dport: u16, proto: u8) -> u32 {
    let x = daddr ^ ((dport as u32) << 16) ^ ((proto as u32) << 8);
    x.wrapping_mul(0x9e37_79b1) >> (32 - NEXT_HOP_CACHE_SIZE.trailing_zeros())
}

/// A flow entry's `last_seen_ns` is refreshed at most this often, so established
/// flows do not write to shared map memory on every packet.
pub const FLOW_TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// The ifindex of `eth0` in every slot namespace. With it the one shared
/// `tap_ingress` hands the guest's frames to the host veth
/// (`bpf_redirect_peer(SLOT_ETH0_IFINDEX)`) without knowing which slot it runs in;
/// the slot is found on the host side by the veth's ifindex. Slot create makes the
/// veth pair with this index for `eth0` and checks it.
pub const SLOT_ETH0_IFINDEX: u32 = 4096;

/// `tap0` of slot N has ifindex `SLOT_TAP_IFINDEX_BASE + N` in its namespace, so
/// the one shared `tap_ingress` finds its slot from its ifindex (and checks it
/// against `SlotInfo::tap_ifindex`). A TAP of no live slot drops everything.
pub const SLOT_TAP_IFINDEX_BASE: u32 = 1 << 20;

/// The host veth of slot N asks for ifindex `HOST_VETH_INDEX_BASE + (k << 15) + N`
/// (k = 0, then 1, 2, … while a retired veth of the slot still holds the
/// index), above what the kernel hands out by itself on a host with fewer
/// devices. `veth_ingress` finds its slot from that without a hash lookup:
/// `(ifindex - HOST_VETH_INDEX_BASE) & 0x7fff`, accepted when that slot is live
/// and its `SlotInfo::veth_ifindex` is this ifindex; a veth that got another
/// index (one kept out of the uplink's chain of the kernel's ifindex hash, or
/// any index when these are taken) is found in `MAP_VETH_SLOTS`.
pub const HOST_VETH_INDEX_BASE: u32 = 1 << 20;

/// `skb->mark` of a reply `uplink_ingress` translated for the guest itself
/// (destination 169.254.0.21 and original port, the guest's MACs) before
/// handing it to the slot's `eth0` with `bpf_redirect_peer`, which keeps the
/// mark (the kernel scrubs the skb without clearing it: same host). The low
/// 16 bits are the slot index. `slot_ingress` sends such a packet on to `tap0`
/// as it is and clears the mark: one translation on the reply path, no lookup
/// by address in the slot namespace. Frames that reach `eth0` any other way
/// come through the veth's transmit, which clears the mark between namespaces.
pub const TO_GUEST_MARK: u32 = 0x6e61_0000;
/// The bits of `skb->mark` that say `TO_GUEST_MARK`; the others are the slot.
pub const TO_GUEST_MARK_MASK: u32 = 0xffff_0000;
/// With `TO_GUEST_MARK`: the guest's MACs are not known yet, so `slot_ingress`
/// hands the (translated) packet to `tap0` with `bpf_redirect_neigh`. Slot
/// indexes fit in the 15 bits below it.
pub const TO_GUEST_MARK_NEIGH: u32 = 0x8000;
/// The slot index in a `TO_GUEST_MARK` mark.
pub const TO_GUEST_MARK_SLOT: u32 = 0x7fff;

/// A masquerade port whose TCP flow is closed (RST, or FIN both ways) and idle this
/// long may be taken by a new flow to the same destination before the reaper frees
/// it, so a burst of short connections does not exhaust the ports (the role
/// TIME_WAIT reuse plays for conntrack).
pub const NAT_REUSE_CLOSED_AFTER_NS: u64 = 1_000_000_000;

/// The masquerade port allocator's keyed hash of a destination: the remote
/// `addr`, remote `port` (both network order, as in the reply key) and `proto`.
/// Its low bits pick the destination's cursor (`& (NAT_PORT_CURSOR_COUNT - 1)`), and
/// the whole value is added to the cursor, so destinations sharing a cursor still
/// get unrelated ports; `secret` (random, never leaves the datapath) keeps both
/// unknown to whoever sees the ports. Two rounds of MurmurHash3's finalizer: not
/// cryptographic, only unpredictable without the key.
#[inline(always)]
pub const fn nat_port_hash(secret: u32, addr: u32, port: u16, proto: u8) -> u32 {
    const fn fmix32(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
    let h = fmix32(addr ^ secret);
    fmix32(h ^ ((port as u32) << 8 | proto as u32) ^ secret.rotate_left(16))
}

/// Highest slot index (DESIGN §1).
pub const MAX_SLOT_INDEX: u32 = 32767;

/// `GlobalConfig::flags`: the uplink is configured and masquerade may run.
pub const CONFIG_F_UPLINK: u32 = 1;
/// `GlobalConfig::flags`: the uplink is a veth whose peer lives in another
/// namespace, so masqueraded packets with a resolved next hop may be handed
/// straight to the peer's ingress (`bpf_redirect_peer`).
pub const CONFIG_F_UPLINK_PEER: u32 = 2;
/// `GlobalConfig::flags`: every slot's `eth0` runs a `slot_ingress` that knows
/// `TO_GUEST_MARK`. Then `uplink_ingress` translates every reply (and ICMP
/// error) of a guest flow for the guest and marks it, and `slot_ingress` hands
/// an unmarked packet for the vpeer address to the slot namespace's stack
/// unless it answers a guest → host flow (`MAP_HOST_FLOWS`): no packet of a
/// flow the guest did not open reaches the guest by that address. Set at load
/// on fresh maps; on maps reused from a previous run it is cleared at load and
/// set once every slot is adopted (its hooks replaced by this build's
/// programs): until then an older `slot_ingress` may be on a slot's `eth0`, so
/// replies go to the vpeer address and every `slot_ingress` translates all
/// vpeer traffic for the guest, as before.
pub const CONFIG_F_TO_GUEST_MARK: u32 = 4;
/// `SlotInfo::flags`: the slot is live; anything else makes programs pass packets.
pub const SLOT_F_ACTIVE: u32 = 1;
/// `SlotInfo::flags`: `SlotInfo::guest_mac` is set, and the guest's frames must
/// come from it.
pub const SLOT_F_GUEST_MAC: u32 = 2;
/// `SlotInfo::flags`: `tap0` is a veth whose peer is the guest's `eth0` in
/// another namespace (`guest_link: veth`), so frames for the guest go straight
/// to the peer's ingress (`bpf_redirect_peer`) instead of through `tap0`'s
/// transmit and the guest namespace's backlog.
pub const SLOT_F_GUEST_VETH: u32 = 4;
/// `GuestL2::flags`: the addresses were learned and may be used.
pub const GUEST_L2_F_VALID: u32 = 1;

/// `NatEntry::state` bits (TCP, and `STATE_GUEST`), used by the userspace
/// reaper for timeouts.
pub const STATE_SYN: u32 = 1 << 0;
/// A packet travelled in the reply direction.
pub const STATE_REPLIED: u32 = 1 << 1;
/// FIN seen from the side that opened the flow.
pub const STATE_FIN_ORIG: u32 = 1 << 2;
/// FIN seen from the other side.
pub const STATE_FIN_REPLY: u32 = 1 << 3;
/// RST seen in either direction.
pub const STATE_RST: u32 = 1 << 4;
/// Not a TCP state: a masquerade flow the guest opened (not the slot
/// namespace's own stack), to a destination that passed the egress policy and
/// is not a host address. Only such an entry serves the guest's fast path
/// (`NAT_EGRESS` looked up first, no policy lookups), and the agent removes it
/// when a change of the policy or of `MAP_LOCAL_ADDRS` denies its destination.
pub const STATE_GUEST: u32 = 1 << 5;
/// Not a TCP state: a masquerade flow of the slot namespace's own stack
/// (`FLOW_SCOPE_SLOT_NS`), set in both of its entries, so `uplink_ingress`
/// hands its replies to that stack (vpeer address, unmarked) and the
/// allocator rebuilds its `NAT_EGRESS` key from the reverse entry. Entries
/// without it are the guest's (so are those of versions before it).
pub const STATE_SLOT_NS: u32 = 1 << 6;

/// `FlowKey::scope` of a guest's flow (and of every key outside
/// `MAP_NAT_EGRESS`). Earlier versions wrote 0 here, so their flows read as
/// the guest's, as they were.
pub const FLOW_SCOPE_GUEST: u8 = 0;
/// `FlowKey::scope` of a masquerade flow of the slot namespace's own stack.
pub const FLOW_SCOPE_SLOT_NS: u8 = 1;

/// The `FlowKey::scope` of the `MAP_NAT_EGRESS` key of a masquerade flow whose
/// entry (either one) has the `STATE_*` bits `state`.
#[inline(always)]
pub const fn flow_scope(state: u32) -> u8 {
    if state & STATE_SLOT_NS != 0 {
        FLOW_SCOPE_SLOT_NS
    } else {
        FLOW_SCOPE_GUEST
    }
}

/// IP protocol numbers the datapath translates.
pub const IPPROTO_ICMP: u8 = 1;
/// TCP.
pub const IPPROTO_TCP: u8 = 6;
/// UDP.
pub const IPPROTO_UDP: u8 = 17;

/// The guest's address in every slot, 169.254.0.21, as a network-order `u32`
/// (i.e. `u32::from_ne_bytes([169, 254, 0, 21])`).
pub const GUEST_IP_BYTES: [u8; 4] = [169, 254, 0, 21];
/// The slot-side TAP address, 169.254.0.22.
pub const TAP_IP_BYTES: [u8; 4] = [169, 254, 0, 22];

/// `PolicyRule::action`: let the traffic pass.
pub const POLICY_ALLOW: u32 = 1;
/// `PolicyRule::action`: drop the traffic (counted as `PolicyDenied`).
pub const POLICY_DENY: u32 = 2;

/// Global datapath configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Uplink IPv4 address, network order: the masquerade source.
    pub uplink_ip: u32,
    /// Uplink ifindex in the agent's (host) namespace.
    pub uplink_ifindex: u32,
    /// First masquerade port, host order (inclusive).
    pub port_min: u16,
    /// Last masquerade port, host order (inclusive).
    pub port_max: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// Base of the HostIP /16, network order: slot traffic to it stays on the host.
    pub host_base: u32,
    /// Base of the veth /16, network order: slot traffic to it stays on the host.
    pub vrt_base: u32,
}

/// Per-slot configuration, written by the agent when a slot is created.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotInfo {
    /// Slot-side veth address (`eth0`, "vpeer"), network order.
    pub vpeer_ip: u32,
    /// Host-reachable address, network order.
    pub host_ip: u32,
    /// Host-side veth ifindex (agent namespace).
    pub veth_ifindex: u32,
    /// `eth0` ifindex inside the slot namespace (always `SLOT_ETH0_IFINDEX`).
    pub eth0_ifindex: u32,
    /// `tap0` ifindex inside the slot namespace.
    pub tap_ifindex: u32,
    /// `SLOT_F_*` bits; 0 means the entry is free.
    pub flags: u32,
    /// MAC of the host-side veth.
    pub veth_mac: [u8; 6],
    /// MAC of `eth0` in the slot namespace.
    pub eth0_mac: [u8; 6],
    /// The MAC the guest must send from, when `SLOT_F_GUEST_MAC` is set.
    pub guest_mac: [u8; 6],
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

/// One direction of a flow, exactly as it appears in the packet (network order).
/// ICMP echo uses the identifier as `sport` for requests and `dport` for replies;
/// the other port is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
    /// Source port (ICMP echo request: identifier).
    pub sport: u16,
    /// Destination port (ICMP echo reply: identifier).
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Whose flow a `MAP_NAT_EGRESS` key names: `FLOW_SCOPE_GUEST` (0, and in
    /// every other map) or `FLOW_SCOPE_SLOT_NS`. Both are keyed by the slot's
    /// vpeer address, so this keeps a flow of the slot namespace's own stack
    /// apart from a guest flow with the same ports, as conntrack would: each
    /// gets its own masquerade port and its replies go back to its own side.
    pub scope: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The key of these fields (network order) in `FLOW_SCOPE_GUEST`, padding zero.
    #[inline(always)]
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> FlowKey {
        FlowKey {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            scope: FLOW_SCOPE_GUEST,
            _pad: [0; 2],
        }
    }

    /// The same key in `scope` (`FLOW_SCOPE_*`).
    #[inline(always)]
    pub const fn in_scope(self, scope: u8) -> FlowKey {
        FlowKey { scope, ..self }
    }
}

/// A NAT or tracked-flow entry: the address/port a packet of this direction is
/// translated to, and the bookkeeping the reaper needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// `bpf_ktime_get_coarse_ns` (`CLOCK_MONOTONIC_COARSE`, jiffy resolution)
    /// of the last packet (refreshed at most every `FLOW_TOUCH_INTERVAL_NS`);
    /// userspace compares it with `CLOCK_MONOTONIC`.
    pub last_seen_ns: u64,
    /// Translated address, network order.
    pub addr: u32,
    /// Translated port (or ICMP identifier), network order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
    /// Owning slot index.
    pub slot: u32,
    /// `STATE_*` bits.
    pub state: u32,
}

/// The guest's Ethernet addresses (value of `MAP_GUEST_L2`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestL2 {
    /// The guest's MAC (source of its frames).
    pub guest_mac: [u8; 6],
    /// The MAC the guest sends to: the TAP's, its gateway (destination of its frames).
    pub gateway_mac: [u8; 6],
    /// `GUEST_L2_F_*` bits; 0 means nothing learned.
    pub flags: u32,
}

/// Key of `MAP_POLICY`, exactly as the LPM trie stores it: the number of leading
/// bits of (`slot`, `addr`) that a rule covers, then those bits. A rule for the
/// CIDR `a.b.c.d/n` of slot S is `prefixlen = 32 + n`, so the slot always
/// matches in full and a lookup (`prefixlen = 64`) only finds that slot's rules,
/// the longest prefix first.
///
/// Guest-initiated traffic (not a reply of a host-opened flow) to `daddr` is
/// evaluated as: `r` = the slot's longest match; if `daddr` is a host address
/// (`LOCAL_ADDRS`, the HostIP /16, the veth /16) it passes only if `r` allows it
/// as a /32 (`prefix_len == 32`), else `HostDenied`; otherwise `r` decides if
/// there is one; otherwise the longest match of slot 0 (the defaults): deny →
/// `PolicyDenied`; otherwise it passes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    /// `32 + CIDR length`; 64 for a lookup.
    pub prefixlen: u32,
    /// Slot index, **big-endian** (`slot.to_be()`): the trie matches bits in
    /// memory order, most significant first.
    pub slot: u32,
    /// Address, network order.
    pub addr: u32,
}

impl PolicyKey {
    /// The key of the CIDR `addr/len` (`addr` network order, `len <= 32`) in the
    /// rules of `slot` (0: the defaults).
    pub const fn new(slot: u32, addr: u32, len: u32) -> Self {
        PolicyKey {
            prefixlen: 32 + len,
            slot: slot.to_be(),
            addr,
        }
    }

    /// The key that looks `addr` up in `slot`'s rules.
    pub const fn lookup(slot: u32, addr: u32) -> Self {
        PolicyKey::new(slot, addr, 32)
    }

    /// The bits after `prefixlen`, as aya's `lpm_trie::Key::data` holds them.
    pub const fn data(&self) -> [u32; 2] {
        [self.slot, self.addr]
    }

    /// The slot index (host order).
    pub const fn slot_index(&self) -> u32 {
        u32::from_be(self.slot)
    }
}

/// Value of `MAP_POLICY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyRule {
    /// `POLICY_ALLOW` or `POLICY_DENY`.
    pub action: u32,
    /// The CIDR length of the rule (`PolicyKey::prefixlen - 32`): a host address
    /// passes only through an allow rule of length 32.
    pub prefix_len: u32,
}

/// The egress verdict of `PolicyKey`'s doc, shared by the datapath and the
/// agent (which re-judges live flows after a change): `own` is the slot's
/// longest match, `host` whether the destination is a host address, `defaults`
/// looks up the longest match of slot 0 (only called when it decides).
#[inline(always)]
pub fn egress_verdict(
    own: Option<&PolicyRule>,
    host: bool,
    defaults: impl FnOnce() -> Option<PolicyRule>,
) -> Result<(), crate::DropReason> {
    use crate::DropReason;
    if host {
        // Only an allow rule naming the address itself opens the host.
        return match own {
            Some(r) if r.action == POLICY_ALLOW && r.prefix_len == 32 => Ok(()),
            _ => Err(DropReason::HostDenied),
        };
    }
    if let Some(r) = own {
        // Anything but an explicit allow denies (fail closed).
        return if r.action == POLICY_ALLOW {
            Ok(())
        } else {
            Err(DropReason::PolicyDenied)
        };
    }
    match defaults() {
        Some(r) if r.action != POLICY_ALLOW => Err(DropReason::PolicyDenied),
        _ => Ok(()),
    }
}

/// Value of `MAP_RATE`: a per-slot policer of the guest's frames, in the
/// earliest-departure-time style of Cilium's, dropping instead of delaying: a
/// frame passes only if `next_ns <= now`, and then books its transmit time,
/// `next_ns = max(next_ns, now - burst_ns) + len * 1e9 / rate_bytes_per_sec`.
/// So after an idle period `burst_ns` worth of frames (plus the one that
/// overshoots) pass at once, a frame longer than the burst (a GSO frame) is
/// never dropped for its size alone, and the average rate holds. (The update
/// is not atomic: CPUs racing may each pass a frame; accepted.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes (L2 frame length) per second; 0 = no limit.
    pub rate_bytes_per_sec: u64,
    /// The burst, as the time it takes to send it at the rate (ns).
    pub burst_ns: u64,
    /// Datapath state: when the frames passed so far are "sent"
    /// (`bpf_ktime_get_ns`); userspace writes 0.
    pub next_ns: u64,
}

const _: () = assert!(NAT_PORT_CURSOR_COUNT.is_power_of_two());
const _: () = assert!(NAT_SEQUENTIAL_PROBES < NAT_COLLISION_RETRIES);
const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 24);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(core::mem::size_of::<PolicyRule>() == 8);
const _: () = assert!(core::mem::size_of::<RateLimit>() == 24);
const _: () = assert!(core::mem::size_of::<GuestL2>() == 16);
const _: () = assert!(core::mem::size_of::<SlotInfo>() == 44);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<NatEntry>() == 24);
const _: () = assert!(MAX_SLOT_INDEX <= TO_GUEST_MARK_SLOT);
const _: () = assert!(TO_GUEST_MARK_NEIGH & (TO_GUEST_MARK_SLOT | TO_GUEST_MARK_MASK) == 0);
const _: () = assert!(core::mem::size_of::<NextHop>() == 40);

/// A `MAP_NEXT_HOPS` entry: the next hop `bpf_fib_lookup` gave for packets
/// from `saddr` to `daddr`:`dport` over `proto` (network order) on the uplink
/// (the destination port and protocol are part of the key because routing rules
/// may select by them), and the sizes it confirmed fit the route's MTU. Unused
/// while `expires_ns` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub daddr: u32,
    pub saddr: u32,
    /// Coarse-clock time after which the entry is looked up again.
    pub expires_ns: u64,
    /// The next hop's MAC.
    pub dmac: [u8; 6],
    /// The uplink's MAC.
    pub smac: [u8; 6],
    /// The largest IP datagram (a packet without GSO) a lookup let through.
    pub max_len: u16,
    /// The largest GSO segment size a lookup let through.
    pub max_gso: u16,
    pub dport: u16,
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 5],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers and byte
    // arrays, with every padding byte an explicit field: any bit pattern is valid.
    unsafe impl aya::Pod for super::GlobalConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::counters::SlotStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GuestL2 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RateLimit {}
}
