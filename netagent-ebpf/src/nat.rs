//! Masquerade (source NAT to the uplink address): lookup and allocation of the
//! paired `NAT_EGRESS` (original direction) / `NAT_INGRESS` (reply direction)
//! entries.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_get_prandom_u32};
use netagent_common::{DropReason, FlowKey, GlobalConfig, NAT_COLLISION_RETRIES, NatEntry};

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
            Err(e) if e == -EEXIST => continue,
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
