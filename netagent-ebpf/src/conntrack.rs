//! Flow bookkeeping shared by the masquerade and the flows between the host and
//! the guest: TCP state bits, the rate-limited `last_seen` refresh, and the
//! `HOST_FLOWS` table.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_ktime_get_coarse_ns};
use netagent_common::{
    DropReason, FLOW_TOUCH_INTERVAL_NS, FlowKey, NatEntry, STATE_FIN_ORIG, STATE_FIN_REPLY,
    STATE_GUEST, STATE_REPLIED, STATE_RST, STATE_SLOT_NS, STATE_SYN,
};

use crate::{
    maps::HOST_FLOWS,
    parse::{L4, L4Kind},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// `EEXIST`, as map helpers return it (negated).
const EEXIST: i32 = 17;

/// Now, for flow timestamps: `CLOCK_MONOTONIC_COARSE` (the jiffy of the last
/// tick; userspace compares it with `CLOCK_MONOTONIC`). Flow lifetimes are
/// seconds, and the coarse clock costs no clock-source read per packet.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper call without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Which side of a flow a packet travels.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the side that opened the flow.
    Original,
    /// From the other side.
    Reply,
}

/// The `STATE_*` bits a packet adds to its flow.
#[inline(always)]
pub fn state_bits(l4: &L4, dir: Dir) -> u32 {
    let mut bits = if dir == Dir::Reply { STATE_REPLIED } else { 0 };
    if l4.kind == L4Kind::Tcp {
        let f = l4.tcp_flags;
        if f & TCP_SYN != 0 && dir == Dir::Original {
            bits |= STATE_SYN;
        }
        if f & TCP_FIN != 0 {
            bits |= if dir == Dir::Original {
                STATE_FIN_ORIG
            } else {
                STATE_FIN_REPLY
            };
        }
        if f & TCP_RST != 0 {
            bits |= STATE_RST;
        }
    }
    bits
}

/// The opening packet of a connection on this side: a bare SYN from the
/// original side, a SYN-ACK from the other. On an entry still marked closing
/// (FIN/RST of a previous connection on the same tuple) it starts the state over,
/// so the new connection does not get the short closing timeout.
#[inline(always)]
fn opens_connection(l4: &L4, dir: Dir) -> bool {
    if l4.kind != L4Kind::Tcp || l4.tcp_flags & TCP_SYN == 0 {
        return false;
    }
    match dir {
        Dir::Original => l4.tcp_flags & TCP_ACK == 0,
        Dir::Reply => l4.tcp_flags & TCP_ACK != 0,
    }
}

/// State bits of a previous connection's end.
const CLOSING_BITS: u32 = STATE_FIN_ORIG | STATE_FIN_REPLY | STATE_RST;

/// Adds a packet's state bits to an entry and refreshes `last_seen_ns` at most every
/// `FLOW_TOUCH_INTERVAL_NS`. Writes only what changes, so an established flow
/// does not dirty the shared cache line on every packet. (Two CPUs racing here may
/// lose a bit; the next packet of the flow sets it again.)
#[inline(always)]
pub fn touch(entry: *mut NatEntry, l4: &L4, dir: Dir, now: u64) {
    // SAFETY: `entry` comes from a successful map lookup and stays valid for the
    // rest of this program run (RCU); concurrent writers only race on plain
    // integers.
    let e = unsafe { &mut *entry };
    let bits = state_bits(l4, dir);
    let state = if opens_connection(l4, dir) && e.state & CLOSING_BITS != 0 {
        // A new connection: the TCP state starts over, who opened the flow stays.
        bits | (e.state & (STATE_GUEST | STATE_SLOT_NS))
    } else {
        e.state | bits
    };
    // A state change refreshes `last_seen_ns` too, so the closing packet's time is
    // exact (the masquerade's port reuse counts from it).
    if state != e.state {
        e.state = state;
        e.last_seen_ns = now;
    } else if now.saturating_sub(e.last_seen_ns) >= FLOW_TOUCH_INTERVAL_NS {
        e.last_seen_ns = now;
    }
}

/// The tracked flow between the host and the guest that `key` (a packet as it
/// arrives on `eth0`, or as it would) belongs to, if any: a host → guest flow
/// to HostIP, or the host's side of a guest → host flow to the vpeer address.
#[inline(always)]
pub fn host_flow_lookup(key: &FlowKey) -> Option<*mut NatEntry> {
    HOST_FLOWS.get_ptr_mut(key)
}

/// Creates or refreshes a flow between the host and the guest in `HOST_FLOWS`,
/// keyed as the host's packets arrive on `eth0` (`key`: to HostIP for a flow
/// the host opened, to the vpeer address for one the guest opened) and
/// translated to `guest` (network order) and the key's destination port. `l4`
/// and `dir`: the packet at hand and its direction in the flow.
#[inline(always)]
pub fn host_flow_track(
    key: &FlowKey,
    l4: &L4,
    dir: Dir,
    slot: u32,
    guest: u32,
    now: u64,
) -> Result<(), DropReason> {
    if let Some(entry) = HOST_FLOWS.get_ptr_mut(key) {
        touch(entry, l4, dir, now);
        return Ok(());
    }
    let entry = NatEntry {
        last_seen_ns: now,
        addr: guest,
        port: key.dport,
        _pad: 0,
        slot,
        state: state_bits(l4, dir),
    };
    match HOST_FLOWS.insert(key, &entry, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(()),
        // Another CPU created it first: that entry serves as well.
        Err(e) if e == -EEXIST => Ok(()),
        Err(_) => Err(DropReason::NatTableFull),
    }
}
