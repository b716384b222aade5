//! The per-slot policer of the guest's frames (`RATE`), earliest-departure-time
//! style as Cilium's `edt_sched_departure`, but dropping instead of delaying:
//! each frame "departs" `len / rate` after the previous one, and at most
//! `burst_ns` of departures may be owed at once. Two CPUs may race on
//! `next_ns` and both pass a frame: accepted (the error is one frame).

use netagent_common::RateLimit;

use crate::{conntrack::now_ns, maps::RATE};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Whether a frame of `len` bytes of `slot`'s guest is within its limit (and,
/// if so, charges it). A slot without a limit always passes.
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
    let now = now_ns();
    let cost = u64::from(len) * NS_PER_SEC / rate;
    let start = core::cmp::max(limit.next_ns, now.saturating_sub(limit.burst_ns));
    let departure = start.saturating_add(cost);
    if departure > now {
        return false;
    }
    limit.next_ns = departure;
    true
}
