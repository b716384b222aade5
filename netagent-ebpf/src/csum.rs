//! Address and port rewrites with incremental checksum updates through
//! `bpf_l3_csum_replace` / `bpf_l4_csum_replace`. The helpers know the skb's
//! checksum state (none, partial for offload, complete) and keep it consistent,
//! which a hand-rolled update could not.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use netagent_common::DropReason;

use crate::parse::{ICMP_ID_OFF, IP_CSUM_OFF, L4, L4_DPORT_OFF, L4_SPORT_OFF, L4Kind};

/// Offset of the TCP checksum inside the TCP header.
const TCP_CSUM_OFF: usize = 16;
/// Offset of the UDP checksum inside the UDP header.
const UDP_CSUM_OFF: usize = 6;
/// Offset of the ICMP checksum inside the ICMP header.
const ICMP_CSUM_OFF: usize = 2;

/// Where the L4 checksum of this packet sits and the helper flags that go with it.
/// `pseudo` says whether the checksum covers the IPv4 pseudo-header.
#[inline(always)]
fn l4_csum(l4: &L4, l4_off: usize, pseudo: bool) -> Option<(usize, u64)> {
    let pseudo_flag = if pseudo {
        u64::from(BPF_F_PSEUDO_HDR)
    } else {
        0
    };
    match l4.kind {
        L4Kind::Tcp => Some((l4_off + TCP_CSUM_OFF, pseudo_flag)),
        // UDP checksum 0 means "no checksum": MARK_MANGLED_0 leaves it 0, and writes
        // 0xffff where a real checksum would come out as 0.
        L4Kind::Udp => Some((
            l4_off + UDP_CSUM_OFF,
            pseudo_flag | u64::from(BPF_F_MARK_MANGLED_0),
        )),
        // ICMP has no pseudo-header: an address change leaves its checksum alone.
        L4Kind::IcmpEchoRequest | L4Kind::IcmpEchoReply | L4Kind::IcmpOther if !pseudo => {
            Some((l4_off + ICMP_CSUM_OFF, 0))
        }
        _ => None,
    }
}

/// Rewrites the IPv4 address at `addr_off` (source or destination) from `old` to
/// `new` (both network order), fixing the IPv4 header checksum and, for TCP and
/// UDP, the L4 checksum's pseudo-header part.
#[inline(always)]
pub fn ipv4_addr_rewrite(
    ctx: &TcContext,
    l4: &L4,
    l4_off: usize,
    addr_off: usize,
    old: u32,
    new: u32,
) -> Result<(), DropReason> {
    if let Some((off, flags)) = l4_csum(l4, l4_off, true) {
        ctx.l4_csum_replace(off, u64::from(old), u64::from(new), flags | 4)
            .map_err(|_| DropReason::RewriteFailed)?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(|_| DropReason::RewriteFailed)?;
    ctx.store(addr_off, &new, 0)
        .map_err(|_| DropReason::RewriteFailed)
}

/// Which port a rewrite targets.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PortField {
    /// TCP/UDP source port or ICMP echo request identifier.
    Source,
    /// TCP/UDP destination port or ICMP echo reply identifier.
    Destination,
}

/// Rewrites a port (or the ICMP echo identifier) from `old` to `new` (network
/// order), fixing the L4 checksum.
#[inline(always)]
pub fn l4_port_rewrite(
    ctx: &TcContext,
    l4: &L4,
    l4_off: usize,
    field: PortField,
    old: u16,
    new: u16,
) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    let field_off = match (l4.kind, field) {
        (L4Kind::Tcp | L4Kind::Udp, PortField::Source) => L4_SPORT_OFF,
        (L4Kind::Tcp | L4Kind::Udp, PortField::Destination) => L4_DPORT_OFF,
        (L4Kind::IcmpEchoRequest | L4Kind::IcmpEchoReply, _) => ICMP_ID_OFF,
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    if let Some((off, flags)) = l4_csum(l4, l4_off, false) {
        ctx.l4_csum_replace(off, u64::from(old), u64::from(new), flags | 2)
            .map_err(|_| DropReason::RewriteFailed)?;
    }
    ctx.store(l4_off + field_off, &new, 0)
        .map_err(|_| DropReason::RewriteFailed)
}
