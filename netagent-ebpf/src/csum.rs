//! Address and port rewrites with incremental checksum updates through
//! `bpf_l3_csum_replace` / `bpf_l4_csum_replace`. The helpers know the skb's
//! checksum state (none, partial for offload, complete) and keep it consistent,
//! which a hand-rolled update could not.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use netagent_common::DropReason;

use crate::parse::{ICMP_ID_OFF, IP_CSUM_OFF, L4, L4_DPORT_OFF, L4_SPORT_OFF, L4Kind, Quoted};

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
        L4Kind::IcmpEchoRequest | L4Kind::IcmpEchoReply | L4Kind::IcmpError | L4Kind::IcmpOther
            if !pseudo =>
        {
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

/// Where the port `field` of an L4 header of `kind` sits. The echo identifier
/// is the source "port" of a request and the destination "port" of a reply (as
/// in `parse::L4`), and nothing else: asking for the other one is an error, so a
/// rewrite can never patch the identifier with a checksum update computed for
/// a different value.
#[inline(always)]
fn port_field_off(kind: L4Kind, field: PortField) -> Result<usize, DropReason> {
    match (kind, field) {
        (L4Kind::Tcp | L4Kind::Udp, PortField::Source) => Ok(L4_SPORT_OFF),
        (L4Kind::Tcp | L4Kind::Udp, PortField::Destination) => Ok(L4_DPORT_OFF),
        (L4Kind::IcmpEchoRequest, PortField::Source)
        | (L4Kind::IcmpEchoReply, PortField::Destination) => Ok(ICMP_ID_OFF),
        _ => Err(DropReason::UnsupportedProtocol),
    }
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
    let field_off = port_field_off(l4.kind, field)?;
    if let Some((off, flags)) = l4_csum(l4, l4_off, false) {
        ctx.l4_csum_replace(off, u64::from(old), u64::from(new), flags | 2)
            .map_err(|_| DropReason::RewriteFailed)?;
    }
    ctx.store(l4_off + field_off, &new, 0)
        .map_err(|_| DropReason::RewriteFailed)
}

/// Folds a 32-bit one's complement sum to 16 bits. Two rounds suffice for the
/// sums below (at most five 16-bit terms).
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 incremental update `HC' = ~(~HC + ~m + m')` of checksum `check` for a
/// 32-bit field changing from `from` to `to`. All values as they sit in memory:
/// one's complement sums do not depend on byte order.
#[inline(always)]
pub fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(from as u16))
        + u32::from(!((from >> 16) as u16))
        + u32::from(to as u16)
        + u32::from((to >> 16) as u16);
    !fold(sum)
}

/// Offset of the source address inside an IPv4 header.
pub const QUOTED_SRC: usize = 12;
/// Offset of the destination address inside an IPv4 header.
pub const QUOTED_DST: usize = 16;
/// Offset of the header checksum inside an IPv4 header.
const QUOTED_CSUM: usize = 10;
/// Offset of the ICMP checksum inside the (outer) ICMP header.
const OUTER_ICMP_CSUM: usize = 2;

/// Rewrites an address of the datagram quoted by an ICMP error (`field` is the
/// offset of the address in the quoted header, e.g. `QUOTED_SRC`) and its header
/// checksum with it. The outer ICMP
/// checksum stays valid as it is: the quoted header's words still add up to the
/// same sum. Returns the quoted header's new checksum.
#[inline(always)]
pub fn quoted_addr_rewrite(
    ctx: &TcContext,
    q: &Quoted,
    check: u16,
    field: usize,
    old: u32,
    new: u32,
) -> Result<u16, DropReason> {
    let check = csum_replace4(check, old, new);
    ctx.store(q.ip_off() + field, &new, 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    ctx.store(q.ip_off() + QUOTED_CSUM, &check, 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    Ok(check)
}

/// Rewrites a port (or echo identifier) of the datagram quoted by an ICMP error,
/// fixing the outer ICMP checksum at `outer_l4_off + 2`. The quoted L4 checksum
/// is left alone: the quote is usually cut short, so nobody can verify it.
#[inline(always)]
pub fn quoted_port_rewrite(
    ctx: &TcContext,
    q: &Quoted,
    outer_l4_off: usize,
    field: PortField,
    old: u16,
    new: u16,
) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    let field_off = port_field_off(q.kind, field)?;
    ctx.l4_csum_replace(
        outer_l4_off + OUTER_ICMP_CSUM,
        u64::from(old),
        u64::from(new),
        2,
    )
    .map_err(|_| DropReason::RewriteFailed)?;
    ctx.store(q.l4_off() + field_off, &new, 0)
        .map_err(|_| DropReason::RewriteFailed)
}
