//! The datagram an ICMP error (destination unreachable, time exceeded,
//! parameter problem) quotes: its IPv4 header and the first 8 bytes of its L4
//! header (RFC 792). Outcomes of `icmp_error_quote`:
//! - `Err(Malformed)`: the quoted IPv4 header (20 bytes) or the 8 quoted L4
//!   bytes after its options do not fit before the outer datagram's end, or the
//!   quoted version is not 4 or its IHL below 5.
//! - `Err(UnsupportedProtocol)`: the quote is of anything but TCP, UDP or an ICMP
//!   echo request/reply (only those can belong to a translated flow).
//! - `Ok(Quoted)` otherwise. The quoted total length, fragment bits and
//!   checksums are not checked (the quote is usually cut short).

use super::access::PacketRead;
use super::header::{
    ETH_HLEN, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_ERROR_HLEN, ICMP_QUOTED_L4, IPV4_MIN_HLEN,
    IcmpEcho, Ipv4Hdr, Ports,
};
use super::ipv4::Ipv4;
use super::l4::L4Kind;
use crate::{DropReason, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

/// The datagram quoted by an ICMP error. Addresses and ports in network order,
/// as in `L4` (an echo request's identifier is `sport`, an echo reply's
/// `dport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    /// Quoted source address.
    pub saddr: u32,
    /// Quoted destination address.
    pub daddr: u32,
    /// Quoted protocol.
    pub proto: u8,
    /// Quoted IHL in 32-bit words.
    pub(crate) ihl: u8,
    /// Quoted IPv4 header checksum.
    pub check: u16,
    /// Quoted source port (or echo request identifier).
    pub sport: u16,
    /// Quoted destination port (or echo reply identifier).
    pub dport: u16,
    /// Which of the quoted L4 kinds this is (Tcp, Udp, IcmpEchoRequest/Reply).
    pub kind: L4Kind,
    /// IHL of the outer header, to recompute offsets.
    pub(crate) outer_ihl: u8,
}

impl Quoted {
    /// Offset of the quoted IPv4 header.
    ///
    /// Recomputed from the 4-bit IHLs at each use (see `Ipv4::l4_off`;
    /// verifier-only shape).
    #[inline(always)]
    pub fn ip_off(&self) -> usize {
        ETH_HLEN + usize::from(self.outer_ihl & 0x0f) * 4 + ICMP_ERROR_HLEN
    }

    /// Offset of the quoted L4 header.
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        self.ip_off() + usize::from(self.ihl & 0x0f) * 4
    }
}

/// Parses the datagram an ICMP error quotes (`l4.kind == IcmpError`; see the
/// module docs for the outcomes).
#[inline(always)]
pub fn icmp_error_quote<P: PacketRead + ?Sized>(p: &P, ip: &Ipv4) -> Result<Quoted, DropReason> {
    let off = ip.l4_off() + ICMP_ERROR_HLEN;
    if off + IPV4_MIN_HLEN > ip.end {
        return Err(DropReason::Malformed);
    }
    let q: Ipv4Hdr = p.load(off).ok_or(DropReason::Malformed)?;
    let ihl = q.version_ihl & 0x0f;
    if q.version_ihl >> 4 != 4 || usize::from(ihl) * 4 < IPV4_MIN_HLEN {
        return Err(DropReason::Malformed);
    }
    let mut quoted = Quoted {
        saddr: q.saddr,
        daddr: q.daddr,
        proto: q.proto,
        ihl,
        check: q.check,
        sport: 0,
        dport: 0,
        kind: L4Kind::Other,
        outer_ihl: ip.ihl,
    };
    let l4_off = quoted.l4_off();
    if l4_off + ICMP_QUOTED_L4 > ip.end {
        return Err(DropReason::Malformed);
    }
    match q.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: Ports = p.load(l4_off).ok_or(DropReason::Malformed)?;
            quoted.sport = ports.source;
            quoted.dport = ports.dest;
            quoted.kind = if q.proto == IPPROTO_TCP {
                L4Kind::Tcp
            } else {
                L4Kind::Udp
            };
        }
        IPPROTO_ICMP => {
            let icmp: IcmpEcho = p.load(l4_off).ok_or(DropReason::Malformed)?;
            match icmp.ty {
                ICMP_ECHO_REQUEST => {
                    quoted.sport = icmp.id;
                    quoted.kind = L4Kind::IcmpEchoRequest;
                }
                ICMP_ECHO_REPLY => {
                    quoted.dport = icmp.id;
                    quoted.kind = L4Kind::IcmpEchoReply;
                }
                _ => return Err(DropReason::UnsupportedProtocol),
            }
        }
        _ => return Err(DropReason::UnsupportedProtocol),
    }
    Ok(quoted)
}

#[cfg(test)]
mod tests {
    use super::super::frames::{Datagram, frag_needed, icmp_echo, icmp_error, tcp, udp};
    use super::super::ipv4::ipv4;
    use super::*;

    const ROUTER: [u8; 4] = [198, 18, 0, 1];
    const UPLINK: [u8; 4] = [10, 0, 0, 1];
    const WAN: [u8; 4] = [198, 18, 0, 10];

    fn quote_of(quoted: &[u8], outer_options: &[u8]) -> Result<Quoted, DropReason> {
        let f = Datagram::icmp(ROUTER, UPLINK, frag_needed(1400, quoted))
            .options(outer_options)
            .frame();
        let ip = ipv4(&f[..]).unwrap().unwrap();
        icmp_error_quote(&f[..], &ip)
    }

    #[test]
    fn quoted_tcp_udp_and_echo() {
        let t = Datagram::tcp(UPLINK, WAN, tcp(33000, 443, 0, &[])).ip_bytes();
        let q = quote_of(&t[..28], &[]).unwrap();
        assert_eq!(
            (q.kind, u16::from_be(q.sport), u16::from_be(q.dport)),
            (L4Kind::Tcp, 33000, 443)
        );
        assert_eq!(
            (q.saddr, q.daddr),
            (u32::from_ne_bytes(UPLINK), u32::from_ne_bytes(WAN))
        );
        assert_eq!(q.ip_off(), 14 + 20 + 8);
        let u = Datagram::udp(UPLINK, WAN, udp(33001, 53, b"x")).ip_bytes();
        assert_eq!(quote_of(&u, &[1, 1, 1, 1]).unwrap().kind, L4Kind::Udp);
        assert_eq!(quote_of(&u, &[1, 1, 1, 1]).unwrap().ip_off(), 14 + 24 + 8);
        let e = Datagram::icmp(UPLINK, WAN, icmp_echo(true, 33002, 1, &[])).ip_bytes();
        let q = quote_of(&e, &[]).unwrap();
        assert_eq!(
            (q.kind, u16::from_be(q.sport)),
            (L4Kind::IcmpEchoRequest, 33002)
        );
        let r = Datagram::icmp(UPLINK, WAN, icmp_echo(false, 33002, 1, &[])).ip_bytes();
        let q = quote_of(&r, &[]).unwrap();
        assert_eq!(
            (q.kind, u16::from_be(q.dport)),
            (L4Kind::IcmpEchoReply, 33002)
        );
    }

    #[test]
    fn quoted_options_are_skipped() {
        let u = Datagram::udp(UPLINK, WAN, udp(33001, 53, &[]))
            .options(&[1; 8])
            .ip_bytes();
        let q = quote_of(&u, &[]).unwrap();
        assert_eq!(q.l4_off(), q.ip_off() + 28);
        assert_eq!(u16::from_be(q.sport), 33001);
        // The options cut the 8 quoted L4 bytes short.
        assert_eq!(quote_of(&u[..28 + 7], &[]), Err(DropReason::Malformed));
    }

    #[test]
    fn short_or_bad_quotes_are_malformed() {
        let t = Datagram::tcp(UPLINK, WAN, tcp(33000, 443, 0, &[])).ip_bytes();
        for len in [0, 19, 20, 27] {
            assert_eq!(
                quote_of(&t[..len], &[]),
                Err(DropReason::Malformed),
                "{len} bytes"
            );
        }
        let mut bad = t[..28].to_vec();
        bad[0] = 0x65;
        assert_eq!(quote_of(&bad, &[]), Err(DropReason::Malformed), "version 6");
        bad[0] = 0x44;
        assert_eq!(quote_of(&bad, &[]), Err(DropReason::Malformed), "IHL 4");
    }

    #[test]
    fn other_quoted_protocols_are_unsupported() {
        let gre = Datagram::new(UPLINK, WAN, 47, alloc::vec![0; 8]).ip_bytes();
        assert_eq!(quote_of(&gre, &[]), Err(DropReason::UnsupportedProtocol));
        let err = Datagram::icmp(UPLINK, WAN, icmp_error(3, 1, [0; 4], &[])).ip_bytes();
        assert_eq!(
            quote_of(&err, &[]),
            Err(DropReason::UnsupportedProtocol),
            "error quoting an error"
        );
    }
}
