//! Masquerade (source NAT to the uplink address): lookup and allocation of the
//! paired `NAT_EGRESS` (original direction) / `NAT_INGRESS` (reply direction)
//! entries.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_get_prandom_u32};
use netagent_common::{
    DropReason, FlowKey, GlobalConfig, IPPROTO_TCP, NAT_COLLISION_RETRIES,
    NAT_REUSE_CLOSED_AFTER_NS, NatEntry, STATE_FIN_ORIG, STATE_FIN_REPLY, STATE_RST,
};

use crate::maps::{NAT_EGRESS, NAT_INGRESS};

/// `EEXIST`, as map helpers return it (negated).
const EEXIST: i32 = 17;

/// The masquerade entry of an outgoing flow (`key` as it leaves the slot).
#[inline(always)]
pub fn snat_v4_lookup(key: &FlowKey) -> Option<*mut NatEntry> {
    NAT_EGRESS.get_ptr_mut(key)
}

/// The reverse entry of a reply arriving on the uplink (`key` as it arrives).
#[inline(always)]
pub fn rev_snat_v4_lookup(key: &FlowKey) -> Option<*mut NatEntry> {
    NAT_INGRESS.get_ptr_mut(key)
}

/// Allocates a masquerade port for the new flow `key` of `slot`: tries up to
/// `NAT_COLLISION_RETRIES` random ports of the configured range, claims the first
/// free one in `NAT_INGRESS` (`BPF_NOEXIST`), then inserts `NAT_EGRESS`; if that
/// second insert fails the first is undone. Returns the egress entry.
#[inline(always)]
pub fn snat_v4_alloc(
    key: &FlowKey,
    slot: u32,
    cfg: &GlobalConfig,
    state: u32,
    now: u64,
) -> Result<NatEntry, DropReason> {
    if cfg.port_max < cfg.port_min {
        return Err(DropReason::NatPortsExhausted);
    }
    let range = u32::from(cfg.port_max - cfg.port_min) + 1;
    let reverse_value = NatEntry {
        last_seen_ns: now,
        addr: key.saddr,
        port: key.sport,
        _pad: 0,
        slot,
        state: 0,
    };
    let mut reverse = FlowKey {
        saddr: key.daddr,
        daddr: cfg.uplink_ip,
        sport: key.dport,
        dport: 0,
        proto: key.proto,
        _pad: [0; 3],
    };
    for _ in 0..NAT_COLLISION_RETRIES {
        // SAFETY: a helper call without arguments.
        let rnd = unsafe { bpf_get_prandom_u32() };
        let port = (u32::from(cfg.port_min) + rnd % range) as u16;
        reverse.dport = port.to_be();
        match NAT_INGRESS.insert(&reverse, &reverse_value, u64::from(BPF_NOEXIST)) {
            Ok(()) => {}
            Err(e) if e == -EEXIST => {
                // Taken: free it if its flow is closed and idle, then claim it again
                // (another CPU may win that race; then this try is spent).
                if !snat_v4_reclaim_closed(&reverse, now)
                    || NAT_INGRESS
                        .insert(&reverse, &reverse_value, u64::from(BPF_NOEXIST))
                        .is_err()
                {
                    continue;
                }
            }
            Err(_) => return Err(DropReason::NatTableFull),
        }
        let forward = NatEntry {
            last_seen_ns: now,
            addr: cfg.uplink_ip,
            port: port.to_be(),
            _pad: 0,
            slot,
            state,
        };
        return match NAT_EGRESS.insert(key, &forward, u64::from(BPF_NOEXIST)) {
            Ok(()) => Ok(forward),
            Err(e) => {
                let _ = NAT_INGRESS.remove(&reverse);
                if e == -EEXIST {
                    // Another CPU allocated this flow meanwhile: use its entry.
                    match NAT_EGRESS.get_ptr(key) {
                        // SAFETY: pointer from a successful lookup, valid for this run.
                        Some(existing) => Ok(unsafe { *existing }),
                        None => Err(DropReason::NatTableFull),
                    }
                } else {
                    Err(DropReason::NatTableFull)
                }
            }
        };
    }
    Err(DropReason::NatPortsExhausted)
}

/// Removes the masquerade flow holding the reply tuple `reverse` if it is a TCP
/// flow that closed (RST, or FIN from both sides) and has been idle for
/// `NAT_REUSE_CLOSED_AFTER_NS`. Returns whether the tuple is free now.
#[inline(always)]
fn snat_v4_reclaim_closed(reverse: &FlowKey, now: u64) -> bool {
    if reverse.proto != IPPROTO_TCP {
        return false;
    }
    let Some(rev) = NAT_INGRESS.get_ptr(reverse) else {
        return true; // freed meanwhile
    };
    // SAFETY: pointer from a successful lookup, valid for this run; copied at once.
    let rev = unsafe { *rev };
    let forward_key = FlowKey {
        saddr: rev.addr,
        daddr: reverse.saddr,
        sport: rev.port,
        dport: reverse.sport,
        proto: reverse.proto,
        _pad: [0; 3],
    };
    let (state, last_seen) = match NAT_EGRESS.get_ptr(&forward_key) {
        // SAFETY: as above.
        Some(fwd) => unsafe {
            (
                (*fwd).state | rev.state,
                (*fwd).last_seen_ns.max(rev.last_seen_ns),
            )
        },
        // No forward half: an allocation in progress on another CPU. Leave it.
        None => return false,
    };
    let closed = state & STATE_RST != 0
        || state & (STATE_FIN_ORIG | STATE_FIN_REPLY) == (STATE_FIN_ORIG | STATE_FIN_REPLY);
    // Saturating: a stamp userspace wrote from `CLOCK_MONOTONIC` may be up to a
    // tick ahead of the coarse clock, and counts as just seen.
    if !closed || now.saturating_sub(last_seen) < NAT_REUSE_CLOSED_AFTER_NS {
        return false;
    }
    let _ = NAT_EGRESS.remove(&forward_key);
    let _ = NAT_INGRESS.remove(reverse);
    true
}
