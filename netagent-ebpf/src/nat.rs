//! Masquerade (source NAT to the uplink address): lookup and allocation of the
//! paired `NAT_EGRESS` (original direction) / `NAT_INGRESS` (reply direction)
//! entries.
//!
//! Ports are handed out per destination in FIFO order, the way Linux picks its
//! own ephemeral ports (RFC 6056 algorithm 4, "double hash"): the destination
//! (remote address, remote port, protocol: the fixed part of the reply key)
//! hashes with a random key (`nat_port_hash`) to one of
//! `NAT_PORT_CURSOR_COUNT` cursors in `NAT_PORT_CURSORS`; a try takes the
//! cursor's next value (an atomic add) and its port is
//! `port_min + (cursor + hash) % range`. So one destination's new flows get
//! consecutive ports, and a port comes round again only after the whole range
//! has: the port tried first is the one used longest ago, the best choice for
//! the remote's TIME_WAIT, and under a stream of short connections it is
//! usually free, or closed and idle long enough to be reclaimed, at the first
//! try. The key and every cursor start at a random value
//! (`bpf_get_prandom_u32`, when found zero), and the hash is added to the
//! cursor, so ports are neither predictable from zero nor from another
//! destination's. After `NAT_SEQUENTIAL_PROBES` taken ports in a row the
//! remaining tries jump across the range, so a run of live ports (say a
//! connection pool opened at once) does not exhaust the destination.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_get_prandom_u32};
use netagent_common::{
    DropReason, FLOW_SCOPE_SLOT_NS, FlowKey, GlobalConfig, IPPROTO_TCP, NAT_COLLISION_RETRIES,
    NAT_PORT_CURSOR_COUNT, NAT_PORT_SECRET_INDEX, NAT_REUSE_CLOSED_AFTER_NS, NAT_SEQUENTIAL_PROBES,
    NatEntry, STATE_FIN_ORIG, STATE_FIN_REPLY, STATE_RST, STATE_SLOT_NS, flow_scope, nat_port_hash,
};

use crate::maps::{NAT_EGRESS, NAT_INGRESS, NAT_PORT_CURSORS};

/// `EEXIST`, as map helpers return it (negated).
const EEXIST: i32 = 17;

/// The masquerade entry of an outgoing flow (`key` as it leaves the slot).
#[inline(always)]
pub fn snat_v4_lookup(key: &FlowKey) -> Option<*mut NatEntry> {
    NAT_EGRESS.get_ptr_mut(key)
}

/// What the caller knows of a flow's masquerade entry: nothing yet, or that
/// there was none a moment ago (the guest's fast path looked), so the slow
/// path does not repeat the lookup before allocating. (An entry inserted by
/// another CPU meanwhile is met by `snat_v4_alloc`'s `BPF_NOEXIST` insert.)
#[derive(Clone, Copy)]
pub enum Known {
    NotLookedUp,
    Absent,
}

impl Known {
    /// The entry of `key`, looked up unless it is known to be absent.
    #[inline(always)]
    pub fn entry(self, key: &FlowKey) -> Option<*mut NatEntry> {
        match self {
            Known::NotLookedUp => snat_v4_lookup(key),
            Known::Absent => None,
        }
    }
}

/// The reverse entry of a reply arriving on the uplink (`key` as it arrives).
#[inline(always)]
pub fn rev_snat_v4_lookup(key: &FlowKey) -> Option<*mut NatEntry> {
    NAT_INGRESS.get_ptr_mut(key)
}

/// A `NAT_PORT_CURSORS` entry, as the pointer of its lookup.
///
/// The object is built for `--cpu generic`, whose atomic add (`BPF_XADD`)
/// returns nothing: the fetching add and compare-and-swap are v3 instructions
/// (and the target has no `AtomicU64` read-modify-write methods at all, hence
/// the intrinsic). So a cursor is read, then advanced atomically: CPUs
/// allocating for one destination at the same moment may read the same value,
/// and then all but one find that port taken and go on to the next. Seeding is
/// a plain store for the same reason; CPUs seeding at once each store their
/// value, the last one stays.
#[derive(Clone, Copy)]
struct PortCursor(*mut u64);

impl PortCursor {
    /// `NAT_PORT_CURSORS[index]`, first set to a random value if it is zero
    /// (never used).
    #[inline(always)]
    fn seeded(index: u32) -> Option<PortCursor> {
        let entry = PortCursor(NAT_PORT_CURSORS.get_ptr_mut(index)?);
        if entry.load() == 0 {
            // SAFETY: a helper call without arguments.
            let seed = u64::from(unsafe { bpf_get_prandom_u32() });
            // SAFETY: as in `load`.
            unsafe { core::ptr::write_volatile(entry.0, seed) };
        }
        Some(entry)
    }

    /// The value (a load of an aligned u64 is single-copy atomic).
    #[inline(always)]
    fn load(self) -> u64 {
        // SAFETY: a pointer to an array map value: non-null, 8-byte aligned,
        // valid as long as the map (which the program holds); the agent
        // never writes this map.
        unsafe { core::ptr::read_volatile(self.0) }
    }

    /// The value, which is then advanced by one (`BPF_XADD`).
    #[inline(always)]
    fn next(self) -> u64 {
        let value = self.load();
        // SAFETY: as in `load`; the result is unused, so this compiles to the
        // non-fetching `BPF_XADD`.
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(self.0, 1) };
        value
    }
}

/// The port cursor of the destination of the reply key `reverse` (its remote
/// address and port, and protocol), and the hash added to its values.
#[inline(always)]
fn snat_v4_port_cursor(reverse: &FlowKey) -> Option<(PortCursor, u64)> {
    // The key is a `bpf_get_prandom_u32` value: its low half is all of it.
    let secret = PortCursor::seeded(NAT_PORT_SECRET_INDEX)?.load() as u32;
    let hash = nat_port_hash(secret, reverse.saddr, reverse.sport, reverse.proto);
    Some((
        PortCursor::seeded(hash & (NAT_PORT_CURSOR_COUNT - 1))?,
        u64::from(hash),
    ))
}

/// Allocates a masquerade port for the new flow `key` of `slot`: tries up to
/// `NAT_COLLISION_RETRIES` ports of the configured range in the destination's
/// order (see the module doc), claims the first free one in `NAT_INGRESS`
/// (`BPF_NOEXIST`; a closed idle TCP flow's port is reclaimed first), then
/// inserts `NAT_EGRESS`; if that second insert fails the first is undone.
/// A flow of the slot namespace's own stack (`FLOW_SCOPE_SLOT_NS`) gets
/// `STATE_SLOT_NS` in both entries. Returns the egress entry.
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
    let owner = if key.scope == FLOW_SCOPE_SLOT_NS {
        STATE_SLOT_NS
    } else {
        0
    };
    let reverse_value = NatEntry {
        last_seen_ns: now,
        addr: key.saddr,
        port: key.sport,
        _pad: 0,
        slot,
        state: owner,
    };
    let mut reverse = FlowKey::new(key.daddr, cfg.uplink_ip, key.dport, 0, key.proto);
    // Every index of the array exists: no lookup fails.
    let Some((cursor, hash)) = snat_v4_port_cursor(&reverse) else {
        return Err(DropReason::NatPortsExhausted);
    };
    // The jumps after the sequential tries spread over the whole range.
    let stride = u64::from(range / (NAT_COLLISION_RETRIES - NAT_SEQUENTIAL_PROBES) + 1);
    let mut at = 0u64;
    for i in 0..NAT_COLLISION_RETRIES {
        at = if i < NAT_SEQUENTIAL_PROBES {
            cursor.next()
        } else {
            at.wrapping_add(stride)
        };
        let port = (u64::from(cfg.port_min) + at.wrapping_add(hash) % u64::from(range)) as u16;
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
            state: state | owner,
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
    let forward_key = FlowKey::new(
        rev.addr,
        reverse.saddr,
        rev.port,
        reverse.sport,
        reverse.proto,
    )
    .in_scope(flow_scope(rev.state));
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
