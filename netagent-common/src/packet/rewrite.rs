//! Address and port rewrites with incremental checksum updates: which fields a
//! rewrite touches, which checksums follow, and with which flags. The writes go
//! through `PacketWrite`, i.e. the kernel's `bpf_l3_csum_replace` /
//! `bpf_l4_csum_replace` on an skb (they know its checksum state: none, partial
//! for offload, complete) and their software equivalent on a `[u8]`.
//!
//! What follows an address change: the IPv4 header checksum, and the TCP/UDP
//! checksum (its pseudo-header holds the addresses; a UDP checksum 0 means
//! "none" and stays 0). ICMP has no pseudo-header. A port (or ICMP echo
//! identifier) change fixes the L4 checksum; an ICMP checksum that comes out
//! as 0 is written as 0xffff (`access::CsumZero`). In the datagram quoted by an ICMP
//! error, an address change fixes the quoted header checksum, which keeps the
//! outer ICMP checksum valid as it is; a quoted port change fixes the outer ICMP
//! checksum (the quoted L4 checksum is left alone: the quote is usually cut
//! short, so nobody can verify it).

use super::access::{CsumZero, FieldSize, L4Csum, PacketWrite};
use super::csum::csum_replace4;
use super::header::{
    ICMP_CSUM_OFF, ICMP_ID_OFF, IP_CSUM_OFF, L4_DPORT_OFF, L4_SPORT_OFF, QUOTED_CSUM, TCP_CSUM_OFF,
    UDP_CSUM_OFF,
};
use super::icmp_error::Quoted;
use super::l4::{L4, L4Kind};
use crate::DropReason;

/// Which port a rewrite targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortField {
    /// TCP/UDP source port or ICMP echo request identifier.
    Source,
    /// TCP/UDP destination port or ICMP echo reply identifier.
    Destination,
}

/// Where the L4 checksum of this packet sits and how it is updated. `pseudo`
/// says whether the changed field is part of the IPv4 pseudo-header (an
/// address). `None`: nothing to update (ICMP for an address change, other
/// protocols).
#[inline(always)]
pub fn l4_csum(l4: &L4, l4_off: usize, pseudo: bool) -> Option<L4Csum> {
    match l4.kind {
        L4Kind::Tcp => Some(L4Csum {
            off: l4_off + TCP_CSUM_OFF,
            pseudo,
            zero: CsumZero::AsComputed,
        }),
        // UDP checksum 0 means "no checksum": it stays 0, and 0xffff is written
        // where a real checksum would come out as 0.
        L4Kind::Udp => Some(L4Csum {
            off: l4_off + UDP_CSUM_OFF,
            pseudo,
            zero: CsumZero::UdpNone,
        }),
        // ICMP has no pseudo-header: an address change leaves its checksum alone.
        L4Kind::IcmpEchoRequest | L4Kind::IcmpEchoReply | L4Kind::IcmpError | L4Kind::IcmpOther
            if !pseudo =>
        {
            Some(L4Csum {
                off: l4_off + ICMP_CSUM_OFF,
                pseudo: false,
                zero: CsumZero::NeverZero,
            })
        }
        _ => None,
    }
}

/// Where the port `field` of an L4 header of `kind` sits. The echo identifier
/// is the source "port" of a request and the destination "port" of a reply (as
/// in `L4`), and nothing else: asking for the other one is an error, so a
/// rewrite can never patch the identifier with a checksum update computed for
/// a different value.
#[inline(always)]
pub fn port_field_off(kind: L4Kind, field: PortField) -> Result<usize, DropReason> {
    match (kind, field) {
        (L4Kind::Tcp | L4Kind::Udp, PortField::Source) => Ok(L4_SPORT_OFF),
        (L4Kind::Tcp | L4Kind::Udp, PortField::Destination) => Ok(L4_DPORT_OFF),
        (L4Kind::IcmpEchoRequest, PortField::Source)
        | (L4Kind::IcmpEchoReply, PortField::Destination) => Ok(ICMP_ID_OFF),
        _ => Err(DropReason::UnsupportedProtocol),
    }
}

/// Rewrites the IPv4 address at `addr_off` (source or destination) from `old` to
/// `new` (both network order), fixing the IPv4 header checksum and, for TCP and
/// UDP, the L4 checksum's pseudo-header part.
#[inline(always)]
pub fn ipv4_addr_rewrite<W: PacketWrite + ?Sized>(
    w: &mut W,
    l4: &L4,
    l4_off: usize,
    addr_off: usize,
    old: u32,
    new: u32,
) -> Result<(), DropReason> {
    if let Some(csum) = l4_csum(l4, l4_off, true) {
        w.l4_csum_replace(&csum, old, new, FieldSize::Four)?;
    }
    w.l3_csum_replace4(IP_CSUM_OFF, old, new)?;
    w.store(addr_off, &new)
}

/// Rewrites a port (or the ICMP echo identifier) from `old` to `new` (network
/// order), fixing the L4 checksum.
#[inline(always)]
pub fn l4_port_rewrite<W: PacketWrite + ?Sized>(
    w: &mut W,
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
    if let Some(csum) = l4_csum(l4, l4_off, false) {
        w.l4_csum_replace(&csum, u32::from(old), u32::from(new), FieldSize::Two)?;
    }
    w.store(l4_off + field_off, &new)
}

/// Rewrites an address of the datagram quoted by an ICMP error (`field` is the
/// offset of the address in the quoted header, `header::QUOTED_SRC` or
/// `QUOTED_DST`) and its header checksum `check` with it. The outer ICMP
/// checksum stays valid as it is: the quoted header's words still add up to the
/// same sum. Returns the quoted header's new checksum.
#[inline(always)]
pub fn quoted_addr_rewrite<W: PacketWrite + ?Sized>(
    w: &mut W,
    q: &Quoted,
    check: u16,
    field: usize,
    old: u32,
    new: u32,
) -> Result<u16, DropReason> {
    let check = csum_replace4(check, old, new);
    w.store(q.ip_off() + field, &new)?;
    w.store(q.ip_off() + QUOTED_CSUM, &check)?;
    Ok(check)
}

/// Rewrites a port (or echo identifier) of the datagram quoted by an ICMP error,
/// fixing the outer ICMP checksum (the ICMP header at `outer_l4_off`). The
/// quoted L4 checksum is left alone.
#[inline(always)]
pub fn quoted_port_rewrite<W: PacketWrite + ?Sized>(
    w: &mut W,
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
    let outer = L4Csum {
        off: outer_l4_off + ICMP_CSUM_OFF,
        pseudo: false,
        zero: CsumZero::NeverZero,
    };
    w.l4_csum_replace(&outer, u32::from(old), u32::from(new), FieldSize::Two)?;
    w.store(q.l4_off() + field_off, &new)
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::super::access::CsumZero;
    use super::super::frames::{Datagram, frag_needed, icmp_echo, tcp, udp};
    use super::super::full_csum::{L4Check, ipv4_header_valid, l4_check, quoted_header_valid};
    use super::super::header::{IP_DST_OFF, IP_SRC_OFF, QUOTED_SRC};
    use super::super::icmp_error::icmp_error_quote;
    use super::super::ipv4::ipv4;
    use super::super::l4::l4;
    use super::*;

    const GUEST: [u8; 4] = [169, 254, 0, 21];
    const WAN: [u8; 4] = [198, 18, 0, 10];
    const UPLINK: [u8; 4] = [10, 0, 0, 1];

    fn be(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// Masquerades `f` (source := uplink, source port := `port`) and returns the
    /// frame with its L4 checksum state.
    fn masquerade(mut f: Vec<u8>, port: u16) -> (Vec<u8>, L4Check) {
        let ip = ipv4(&f[..]).unwrap().unwrap();
        let l = l4(&f[..], &ip).unwrap();
        ipv4_addr_rewrite(
            &mut f[..],
            &l,
            ip.l4_off(),
            IP_SRC_OFF,
            ip.saddr,
            be(UPLINK),
        )
        .unwrap();
        l4_port_rewrite(
            &mut f[..],
            &l,
            ip.l4_off(),
            PortField::Source,
            l.sport,
            port.to_be(),
        )
        .unwrap();
        let ip = ipv4(&f[..]).unwrap().unwrap();
        assert_eq!(ip.saddr, be(UPLINK));
        assert!(ipv4_header_valid(&f, &ip));
        let state = l4_check(&f, &ip);
        (f, state)
    }

    #[test]
    fn tcp_and_udp_masquerade_verify_from_scratch() {
        let t = Datagram::tcp(GUEST, WAN, tcp(40000, 80, 0x02, b"abc")).frame();
        assert_eq!(masquerade(t, 33000).1, L4Check::Valid);
        let u = Datagram::udp(GUEST, WAN, udp(40000, 53, b"abcd")).frame();
        let (u, state) = masquerade(u, 33001);
        assert_eq!(state, L4Check::Valid);
        assert_eq!(u16::from_be_bytes([u[34], u[35]]), 33001);
    }

    #[test]
    fn udp_checksum_0_stays_0() {
        let u = Datagram::udp(GUEST, WAN, udp(40000, 53, b"abcd")).frame_with(true);
        let (u, state) = masquerade(u, 33001);
        assert_eq!(state, L4Check::NoChecksum);
        assert_eq!(&u[40..42], &[0, 0]);
    }

    #[test]
    fn udp_checksum_that_comes_out_0_is_sent_as_ffff() {
        let u = Datagram::udp(GUEST, WAN, udp(40000, 53, b"abcd")).frame();
        // Find the port for which the updated checksum is 0 (one exists: the
        // checksum takes every value as the port does).
        let hit = (0..=u16::MAX)
            .map(|port| masquerade(u.clone(), port))
            .find(|(f, _)| f[40..42] == [0xff, 0xff])
            .expect("some port yields a zero checksum");
        assert_eq!(hit.1, L4Check::Valid);
    }

    #[test]
    fn icmp_echo_identifier_and_address() {
        let e = Datagram::icmp(GUEST, WAN, icmp_echo(true, 7, 1, b"ping")).frame();
        let (e, state) = masquerade(e, 33002);
        assert_eq!(state, L4Check::Valid);
        assert_eq!(u16::from_be_bytes([e[38], e[39]]), 33002);
        // The identifier is only the source port of a request.
        let ip = ipv4(&e[..]).unwrap().unwrap();
        let l = l4(&e[..], &ip).unwrap();
        let mut f = e.clone();
        let r = l4_port_rewrite(&mut f[..], &l, ip.l4_off(), PortField::Destination, 0, 5);
        assert_eq!(r, Err(DropReason::UnsupportedProtocol));
        assert_eq!(f, e, "a refused rewrite writes nothing");
    }

    /// Found by the `rewrite` fuzz target: an echo reply whose identifier is
    /// rewritten to 0, with sequence 0 and no data, has only zero words besides
    /// its checksum. RFC 1624's update (and the kernel's) yields 0x0000 there,
    /// which a receiver rejects (the sum is +0, not -0); 0xffff is right.
    #[test]
    fn icmp_checksum_of_an_all_zero_message_is_ffff() {
        let e = Datagram::icmp(WAN, UPLINK, icmp_echo(false, 0xc601, 0, &[])).frame();
        let mut f = e.clone();
        let ip = ipv4(&f[..]).unwrap().unwrap();
        let l = l4(&f[..], &ip).unwrap();
        let csum = l4_csum(&l, ip.l4_off(), false).unwrap();
        assert_eq!(csum.zero, CsumZero::NeverZero);
        l4_port_rewrite(
            &mut f[..],
            &l,
            ip.l4_off(),
            PortField::Destination,
            l.dport,
            0,
        )
        .unwrap();
        assert_eq!(&f[34..42], &[0, 0, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(l4_check(&f, &ip), L4Check::Valid);
        // A checksum of 0 is a real one for ICMP: it is updated, not skipped.
        let mut g = Datagram::icmp(WAN, UPLINK, icmp_echo(false, 0xffff, 0, &[])).frame();
        assert_eq!(&g[36..38], &[0, 0]);
        l4_port_rewrite(
            &mut g[..],
            &l,
            ip.l4_off(),
            PortField::Destination,
            0xffff,
            0x0100u16.to_be(),
        )
        .unwrap();
        assert_eq!(l4_check(&g, &ip), L4Check::Valid);
    }

    #[test]
    fn address_change_leaves_icmp_checksum_alone() {
        let e = Datagram::icmp(GUEST, WAN, icmp_echo(true, 7, 1, b"ping")).frame();
        let ip = ipv4(&e[..]).unwrap().unwrap();
        let l = l4(&e[..], &ip).unwrap();
        assert_eq!(l4_csum(&l, ip.l4_off(), true), None);
        assert_eq!(l4_csum(&l, ip.l4_off(), false).unwrap().off, 34 + 2);
    }

    /// The uplink's path for "fragmentation needed" about a masqueraded TCP
    /// flow: outer destination, quoted source address and port back to the
    /// guest side; every checksum verifies from scratch.
    #[test]
    fn icmp_error_reverse_translation_verifies() {
        let out = Datagram::tcp(UPLINK, WAN, tcp(33000, 443, 0x10, &[])).ip_bytes();
        let f = Datagram::icmp([198, 18, 0, 1], UPLINK, frag_needed(1400, &out[..28])).frame();
        let mut g = f.clone();
        let ip = ipv4(&g[..]).unwrap().unwrap();
        let q = icmp_error_quote(&g[..], &ip).unwrap();
        assert!(quoted_header_valid(&g, &q));
        let vpeer = be([10, 200, 0, 2]);
        let outer = L4 {
            kind: L4Kind::IcmpError,
            sport: 0,
            dport: 0,
            tcp_flags: 0,
        };
        ipv4_addr_rewrite(&mut g[..], &outer, ip.l4_off(), IP_DST_OFF, ip.daddr, vpeer).unwrap();
        quoted_addr_rewrite(&mut g[..], &q, q.check, QUOTED_SRC, q.saddr, vpeer).unwrap();
        quoted_port_rewrite(
            &mut g[..],
            &q,
            ip.l4_off(),
            PortField::Source,
            q.sport,
            40000u16.to_be(),
        )
        .unwrap();
        let ip2 = ipv4(&g[..]).unwrap().unwrap();
        let q2 = icmp_error_quote(&g[..], &ip2).unwrap();
        assert_eq!(
            (ip2.daddr, q2.saddr, u16::from_be(q2.sport)),
            (vpeer, vpeer, 40000)
        );
        assert!(ipv4_header_valid(&g, &ip2));
        assert_eq!(l4_check(&g, &ip2), L4Check::Valid, "outer ICMP checksum");
        assert!(quoted_header_valid(&g, &q2));
    }
}
