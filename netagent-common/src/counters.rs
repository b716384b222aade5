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
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 6] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::UnsupportedProtocol,
        DropReason::NatPortsExhausted,
        DropReason::NatTableFull,
        DropReason::RewriteFailed,
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
