//! Per-slot counters (`STATS`, a per-CPU array: no atomics, no sharing).

use aya_ebpf::bindings::TC_ACT_SHOT;
use netagent_common::DropReason;

use crate::maps::STATS;

/// Adds one packet of `bytes` to the pair of counters starting at `packets_idx`
/// (`FROM_GUEST_*` or `TO_GUEST_*`).
#[inline(always)]
pub fn count_packet(slot: u32, packets_idx: usize, bytes: u32) {
    if let Some(stats) = STATS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it
        // is valid for this CPU and no other program writes to it concurrently.
        let stats = unsafe { &mut *stats };
        // `get_mut` instead of indexing: a bounds-check panic would be an infinite
        // loop in the panic handler, which the verifier rejects.
        if let Some(c) = stats.counters.get_mut(packets_idx) {
            *c += 1;
        }
        if let Some(c) = stats.counters.get_mut(packets_idx + 1) {
            *c += u64::from(bytes);
        }
    }
}

/// Adds one to a single counter.
#[inline(always)]
pub fn count(slot: u32, counter: usize) {
    if let Some(stats) = STATS.get_ptr_mut(slot) {
        // SAFETY: as in `count_packet`.
        let stats = unsafe { &mut *stats };
        if let Some(c) = stats.counters.get_mut(counter) {
            *c += 1;
        }
    }
}

/// Counts a drop under `reason` for `slot` (0 when no slot is known) and returns
/// the verdict that drops the packet.
#[inline(always)]
pub fn drop_packet(slot: u32, reason: DropReason) -> i32 {
    count(slot, reason.counter());
    TC_ACT_SHOT as i32
}

/// Why a program dropped a packet, and whose counter it goes to.
#[derive(Clone, Copy)]
pub struct Drop {
    /// Slot index, 0 when the packet could not be attributed.
    pub slot: u32,
    /// The reason counted.
    pub reason: DropReason,
}

impl Drop {
    /// A drop attributed to `slot`.
    #[inline(always)]
    pub const fn new(slot: u32, reason: DropReason) -> Self {
        Drop { slot, reason }
    }
}
