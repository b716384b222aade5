//! Per-slot counters and the one table of drop reasons shared by the datapath,
//! the metrics and the CLI.

/// A drop reason. The datapath counts each drop under exactly one of these.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A header was truncated or inconsistent (IHL, total length, L4 header).
    Malformed = 0,
    /// An IPv4 fragment: the NAT cannot translate fragments.
    Fragment = 1,
    /// A protocol the masquerade cannot translate (not TCP, UDP or ICMP echo).
    UnsupportedProtocol = 2,
    /// No free masquerade port after `NAT_COLLISION_RETRIES` tries.
    NatPortsExhausted = 3,
    /// A NAT or flow table is full.
    NatTableFull = 4,
    /// Rewriting the packet failed (a helper returned an error).
    RewriteFailed = 5,
    /// A frame from the guest whose IPv4 source is not 169.254.0.21, or whose
    /// Ethernet source is not the slot's guest MAC when one is set; also a frame
    /// on a TAP that belongs to no live slot (counted for slot 0).
    SpoofedSource = 6,
    /// ARP from the guest whose sender IP is not 169.254.0.21, whose sender MAC
    /// is not the frame's Ethernet source, or not the slot's guest MAC when one
    /// is set; or ARP that is not Ethernet/IPv4.
    SpoofedArp = 7,
    /// IPv6 from the guest (not supported yet).
    Ipv6 = 8,
    /// A frame from the guest that is neither IPv4 nor ARP (VLAN tags included).
    UnsupportedEthertype = 9,
    /// Guest-initiated traffic to an address of the host: the agent namespace's
    /// own (`LOCAL_ADDRS`) and the HostIP and veth ranges (every slot's HostIP,
    /// veth and vpeer address), unless the slot allows that address as a /32.
    HostDenied = 10,
    /// Guest-initiated traffic denied by the slot's egress policy or the default
    /// deny list.
    PolicyDenied = 11,
    /// Over the slot's bandwidth limit (`MAP_RATE`).
    RateLimited = 12,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 13] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::UnsupportedProtocol,
        DropReason::NatPortsExhausted,
        DropReason::NatTableFull,
        DropReason::RewriteFailed,
        DropReason::SpoofedSource,
        DropReason::SpoofedArp,
        DropReason::Ipv6,
        DropReason::UnsupportedEthertype,
        DropReason::HostDenied,
        DropReason::PolicyDenied,
        DropReason::RateLimited,
    ];

    /// Stable snake_case name, used by the API, the CLI and the metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::NatPortsExhausted => "nat_ports_exhausted",
            DropReason::NatTableFull => "nat_table_full",
            DropReason::RewriteFailed => "rewrite_failed",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::SpoofedArp => "spoofed_arp",
            DropReason::Ipv6 => "ipv6",
            DropReason::UnsupportedEthertype => "unsupported_ethertype",
            DropReason::HostDenied => "host_denied",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::RateLimited => "rate_limited",
        }
    }

    /// Index of this reason's counter in `SlotStats::counters`.
    pub const fn counter(self) -> usize {
        Counter::DROP_BASE + self as usize
    }
}

/// Counter indices in `SlotStats::counters`.
pub struct Counter;

impl Counter {
    /// Packets that came from the guest and were forwarded.
    pub const FROM_GUEST_PACKETS: usize = 0;
    /// Bytes (L2 frame length) that came from the guest and were forwarded.
    pub const FROM_GUEST_BYTES: usize = 1;
    /// Packets delivered to the guest.
    pub const TO_GUEST_PACKETS: usize = 2;
    /// Bytes delivered to the guest.
    pub const TO_GUEST_BYTES: usize = 3;
    /// Masquerade ports allocated (new outbound flows).
    pub const NAT_ALLOCATIONS: usize = 4;
    /// Masquerade allocations that failed (ports exhausted or table full).
    pub const NAT_FAILURES: usize = 5;
    /// First drop-reason counter; `DropReason::counter` adds the reason.
    pub const DROP_BASE: usize = 6;
}

/// Number of `u64` counters per slot.
pub const COUNTER_COUNT: usize = Counter::DROP_BASE + DropReason::ALL.len();

/// The per-CPU value of `MAP_STATS`: one slot's counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotStats {
    /// Indexed by `Counter::*` and `DropReason::counter`.
    pub counters: [u64; COUNTER_COUNT],
}

impl Default for SlotStats {
    fn default() -> Self {
        SlotStats {
            counters: [0; COUNTER_COUNT],
        }
    }
}

const _: () = assert!(core::mem::size_of::<SlotStats>() == COUNTER_COUNT * 8);
