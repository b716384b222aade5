//! The per-slot policer of the guest's frames (`RATE`), in the
//! earliest-departure-time style of Cilium's `edt_sched_departure`, but dropping
//! instead of delaying: every frame that passes books `len / rate` of
//! transmit time after the frames before it (`next_ns`), and a frame passes
//! only while the booked time does not reach past now. After an idle period
//! the booking starts `burst_ns` in the past, so that much passes at once.
//! The last frame of a burst may overshoot it by its own length: so a frame
//! larger than the burst (a GSO frame from a TAP with TSO, up to 64 KiB)
//! still passes once the budget is whole, and the average rate holds either
//! way. Two CPUs may race on `next_ns` and both pass a frame: accepted (the
//! error is one frame).

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use netagent_common::RateLimit;

use crate::maps::RATE;

const NS_PER_SEC: u64 = 1_000_000_000;

/// Whether a frame of `len` bytes of `slot`'s guest is within its limit (and,
/// if so, books it). A slot without a limit always passes.
#[inline(always)]
pub fn within_limit(slot: u32, len: u32) -> bool {
    let Some(limit) = RATE.get_ptr_mut(slot) else {
        return true;
    };
    // SAFETY: pointer from a successful array lookup, valid for this run;
    // concurrent writers only race on plain integers (see the module doc).
    let limit: &mut RateLimit = unsafe { &mut *limit };
    let rate = limit.rate_bytes_per_sec;
    if rate == 0 {
        return true;
    }
    // The policer needs a precise clock (`CLOCK_MONOTONIC`): at a jiffy's
    // resolution a whole tick's budget would pass at once.
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if limit.next_ns > now {
        return false;
    }
    let start = core::cmp::max(limit.next_ns, now.saturating_sub(limit.burst_ns));
    limit.next_ns = start.saturating_add(u64::from(len) * NS_PER_SEC / rate);
    true
}
