//! The uplink's next hop per destination, cached per CPU (`NEXT_HOPS`) for
//! `NEXT_HOP_CACHE_NS`: `bpf_fib_lookup` (a route lookup, the neighbour's MAC,
//! the MTU check) is the largest part of a masqueraded packet's fast path, and
//! a flow's packets, like most of a host's, go to few destinations.
//!
//! An entry is used only for the same source, destination, destination port
//! and protocol (what routing rules may select by, besides the source port,
//! which is the masquerade's own choice), before it expires, and for a packet
//! no larger than the lookups let through (the datagram's length, or the GSO
//! segment size): anything else is looked up again, and a lookup that fails leaves the entry alone (the packet takes
//! `bpf_redirect_neigh`). A route, neighbour or MTU change on the uplink is
//! therefore seen within `NEXT_HOP_CACHE_NS`. The map is per CPU and TC
//! programs do not nest on one CPU, so an entry is never written concurrently.

use aya_ebpf::bindings::bpf_fib_lookup;
use netagent_common::{NEXT_HOP_CACHE_NS, NextHop, next_hop_index};

use crate::{fwd::Egress, maps::NEXT_HOPS};

/// A packet's claim on the cache: its destination's entry and the sizes that
/// must fit.
pub struct Lookup {
    entry: Option<*mut NextHop>,
    saddr: u32,
    daddr: u32,
    dport: u16,
    proto: u8,
    /// The datagram's length, or 0 for a GSO packet.
    tot_len: u16,
    /// The GSO segment size, or 0.
    gso_size: u16,
    now: u64,
}

impl Lookup {
    /// The cache entry of packet `e`'s destination (`gso_size` from its skb).
    #[inline(always)]
    pub fn new(e: &Egress, gso_size: u32) -> Self {
        let gso_size = gso_size.min(u32::from(u16::MAX)) as u16;
        Lookup {
            entry: NEXT_HOPS.get_ptr_mut(next_hop_index(e.daddr, e.dport, e.proto)),
            saddr: e.saddr,
            daddr: e.daddr,
            dport: e.dport,
            proto: e.proto,
            tot_len: if gso_size == 0 { e.tot_len } else { 0 },
            gso_size,
            now: e.now,
        }
    }

    /// Source and destination MAC, if the entry answers for this packet.
    #[inline(always)]
    pub fn cached(&self) -> Option<([u8; 6], [u8; 6])> {
        // SAFETY: a per-CPU array value, valid for this run; only this CPU
        // writes it.
        let hop = unsafe { &*self.entry? };
        let fits = if self.gso_size == 0 {
            self.tot_len <= hop.max_len
        } else {
            self.gso_size <= hop.max_gso
        };
        (self.same_key(hop) && self.now < hop.expires_ns && fits).then_some((hop.smac, hop.dmac))
    }

    /// Whether `hop` is this packet's destination's entry.
    #[inline(always)]
    fn same_key(&self, hop: &NextHop) -> bool {
        hop.daddr == self.daddr
            && hop.saddr == self.saddr
            && hop.dport == self.dport
            && hop.proto == self.proto
    }

    /// Records a successful lookup's answer (`p`) for this packet: widens the
    /// sizes of a live entry for the same addresses, else starts a new one.
    #[inline(always)]
    pub fn remember(&self, p: &bpf_fib_lookup) {
        let Some(entry) = self.entry else {
            return;
        };
        // SAFETY: as in `cached`.
        let hop = unsafe { &mut *entry };
        if self.same_key(hop)
            && self.now < hop.expires_ns
            && hop.dmac == p.dmac
            && hop.smac == p.smac
        {
            hop.max_len = hop.max_len.max(self.tot_len);
            hop.max_gso = hop.max_gso.max(self.gso_size);
            return;
        }
        *hop = NextHop {
            daddr: self.daddr,
            saddr: self.saddr,
            expires_ns: self.now + NEXT_HOP_CACHE_NS,
            dmac: p.dmac,
            smac: p.smac,
            max_len: self.tot_len,
            max_gso: self.gso_size,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 5],
        };
    }
}
