//! L4 header parsing of a non-fragment IPv4 datagram. Outcomes:
//! - `Err(Fragment)`: the datagram is a fragment (its L4 header is absent or
//!   incomplete; the NAT cannot translate it).
//! - `Err(Malformed)`: the L4 header the protocol needs is cut off by the packet
//!   or by the IP total length (TCP: 20 bytes, UDP: 8, ICMP: 8), or a TCP data
//!   offset is below 5.
//! - `Ok(L4)` otherwise, with `kind` saying what it is. TCP flags are reported as
//!   they are, in any combination (SYN+FIN, none, all): flow tracking only reads
//!   FIN/SYN/RST/ACK bits, the endpoints judge the rest. TCP options are not
//!   read. The UDP length field is not checked (a zero or oversized length is
//!   translated as it is; the receiving stack drops it). ICMP errors are
//!   `IcmpError`; their quote is parsed by `icmp_error::icmp_error_quote`.

use super::access::PacketRead;
use super::header::{
    ICMP_DEST_UNREACH, ICMP_ECHO_HLEN, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_PARAMETER_PROBLEM,
    ICMP_TIME_EXCEEDED, IcmpEcho, Ports, TCP_CSUM_OFF, TCP_FLAGS_WORD_OFF, TCP_HLEN, TcpFlagsWord,
    UDP_CSUM_OFF, UDP_HLEN,
};
use super::ipv4::Ipv4;
use crate::{DropReason, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

/// What kind of L4 header the packet has, which decides where its checksum and
/// "ports" sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Kind {
    /// TCP: ports at 0/2, checksum at 16 (pseudo-header).
    Tcp,
    /// UDP: ports at 0/2, checksum at 6 (pseudo-header, 0 = none).
    Udp,
    /// ICMP echo request: identifier at 4 used as the source port.
    IcmpEchoRequest,
    /// ICMP echo reply: identifier at 4 used as the destination port.
    IcmpEchoReply,
    /// An ICMP error (destination unreachable, time exceeded, parameter
    /// problem) quoting a datagram: see `icmp_error::icmp_error_quote`.
    IcmpError,
    /// Any other ICMP message: checksum at 2, no pseudo-header, no ports.
    IcmpOther,
    /// Any other protocol: left alone above L3.
    Other,
}

/// The L4 fields the programs use; ports in network order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4 {
    /// Header kind.
    pub kind: L4Kind,
    /// Source port (ICMP echo request: identifier; else 0).
    pub sport: u16,
    /// Destination port (ICMP echo reply: identifier; else 0).
    pub dport: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
}

impl L4 {
    /// Whether the masquerade and flow tracking can translate this packet.
    #[inline(always)]
    pub fn translatable(&self) -> bool {
        !matches!(
            self.kind,
            L4Kind::IcmpError | L4Kind::IcmpOther | L4Kind::Other
        )
    }
}

/// Parses the L4 header of the datagram `ip` (see the module docs for the
/// outcomes).
#[inline(always)]
pub fn l4<P: PacketRead + ?Sized>(p: &P, ip: &Ipv4) -> Result<L4, DropReason> {
    if ip.fragment {
        return Err(DropReason::Fragment);
    }
    // `l4_off` is at most 14 + 60 (IHL is 4 bits), so the verifier can bound the
    // packet offsets below.
    let off = ip.l4_off();
    match ip.proto {
        IPPROTO_TCP => {
            if off + TCP_HLEN > ip.end {
                return Err(DropReason::Malformed);
            }
            let ports: Ports = p.load(off).ok_or(DropReason::Malformed)?;
            let flags: TcpFlagsWord = p
                .load(off + TCP_FLAGS_WORD_OFF)
                .ok_or(DropReason::Malformed)?;
            // The checksum field must be present as well.
            p.load::<u16>(off + TCP_CSUM_OFF)
                .ok_or(DropReason::Malformed)?;
            if usize::from(flags.doff_res >> 4) * 4 < TCP_HLEN {
                return Err(DropReason::Malformed);
            }
            Ok(L4 {
                kind: L4Kind::Tcp,
                sport: ports.source,
                dport: ports.dest,
                tcp_flags: flags.flags,
            })
        }
        IPPROTO_UDP => {
            if off + UDP_HLEN > ip.end {
                return Err(DropReason::Malformed);
            }
            let ports: Ports = p.load(off).ok_or(DropReason::Malformed)?;
            p.load::<u16>(off + UDP_CSUM_OFF)
                .ok_or(DropReason::Malformed)?;
            Ok(L4 {
                kind: L4Kind::Udp,
                sport: ports.source,
                dport: ports.dest,
                tcp_flags: 0,
            })
        }
        IPPROTO_ICMP => {
            if off + ICMP_ECHO_HLEN > ip.end {
                return Err(DropReason::Malformed);
            }
            let icmp: IcmpEcho = p.load(off).ok_or(DropReason::Malformed)?;
            let (kind, sport, dport) = match (icmp.ty, icmp.code) {
                (ICMP_ECHO_REQUEST, 0) => (L4Kind::IcmpEchoRequest, icmp.id, 0),
                (ICMP_ECHO_REPLY, 0) => (L4Kind::IcmpEchoReply, 0, icmp.id),
                (ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM, _) => {
                    (L4Kind::IcmpError, 0, 0)
                }
                _ => (L4Kind::IcmpOther, 0, 0),
            };
            Ok(L4 {
                kind,
                sport,
                dport,
                tcp_flags: 0,
            })
        }
        _ => Ok(L4 {
            kind: L4Kind::Other,
            sport: 0,
            dport: 0,
            tcp_flags: 0,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::frames::{Datagram, icmp_echo, tcp, tcp_flags, udp};
    use super::super::ipv4::ipv4;
    use super::*;

    const A: [u8; 4] = [169, 254, 0, 21];
    const B: [u8; 4] = [198, 18, 0, 10];

    fn parse(f: &[u8]) -> Result<L4, DropReason> {
        let ip = ipv4(f).unwrap().unwrap();
        l4(f, &ip)
    }

    #[test]
    fn tcp_ports_and_any_flags() {
        for flags in [
            0,
            tcp_flags::SYN | tcp_flags::FIN,
            0xff,
            tcp_flags::RST | tcp_flags::ACK,
        ] {
            let f = Datagram::tcp(A, B, tcp(40000, 80, flags, &[])).frame();
            let l = parse(&f).unwrap();
            assert_eq!(l.kind, L4Kind::Tcp);
            assert_eq!((u16::from_be(l.sport), u16::from_be(l.dport)), (40000, 80));
            assert_eq!(l.tcp_flags, flags);
            assert!(l.translatable());
        }
    }

    #[test]
    fn truncated_l4_headers_are_malformed() {
        for (proto, payload, need) in [
            (crate::IPPROTO_TCP, tcp(1, 2, 0, &[]), 20),
            (crate::IPPROTO_UDP, udp(1, 2, &[]), 8),
            (crate::IPPROTO_ICMP, icmp_echo(true, 1, 1, &[]), 8),
        ] {
            for len in 0..need {
                let f = Datagram::new(A, B, proto, payload[..len].to_vec()).frame();
                assert_eq!(
                    parse(&f),
                    Err(DropReason::Malformed),
                    "proto {proto}, {len} bytes"
                );
            }
        }
    }

    #[test]
    fn l4_header_cut_by_total_length_is_malformed() {
        // The frame holds the whole TCP header, the IP total length does not.
        let mut f = Datagram::tcp(A, B, tcp(1, 2, 0, &[])).frame();
        f[16..18].copy_from_slice(&39u16.to_be_bytes());
        assert_eq!(parse(&f), Err(DropReason::Malformed));
    }

    #[test]
    fn tcp_data_offset_below_5_is_malformed() {
        let mut f = Datagram::tcp(A, B, tcp(1, 2, 0, &[])).frame();
        for doff in 0..5u8 {
            f[ETH_HLEN_TEST + 12] = doff << 4;
            assert_eq!(parse(&f), Err(DropReason::Malformed), "doff {doff}");
        }
    }
    const ETH_HLEN_TEST: usize = 14 + 20;

    #[test]
    fn zero_length_udp_is_translated_as_it_is() {
        let mut f = Datagram::udp(A, B, udp(1, 2, &[])).frame();
        f[ETH_HLEN_TEST + 4..ETH_HLEN_TEST + 6].copy_from_slice(&[0, 0]);
        assert_eq!(parse(&f).unwrap().kind, L4Kind::Udp);
    }

    #[test]
    fn fragments_are_refused() {
        for frag_off in [0x2000, 0x0001, 0x3fff] {
            let f = Datagram::udp(A, B, udp(1, 2, &[]))
                .frag_off(frag_off)
                .frame();
            assert_eq!(parse(&f), Err(DropReason::Fragment), "{frag_off:#x}");
        }
    }

    #[test]
    fn icmp_kinds() {
        let kind = |ty: u8, code: u8| {
            let f = Datagram::icmp(A, B, alloc::vec![ty, code, 0, 0, 0x12, 0x34, 0, 1]).frame();
            parse(&f).unwrap()
        };
        let req = kind(8, 0);
        assert_eq!(
            (req.kind, u16::from_be(req.sport), req.dport),
            (L4Kind::IcmpEchoRequest, 0x1234, 0)
        );
        let rep = kind(0, 0);
        assert_eq!(
            (rep.kind, rep.sport, u16::from_be(rep.dport)),
            (L4Kind::IcmpEchoReply, 0, 0x1234)
        );
        assert_eq!(kind(8, 1).kind, L4Kind::IcmpOther, "echo with a code");
        for ty in [3, 11, 12] {
            assert_eq!(kind(ty, 4).kind, L4Kind::IcmpError);
            assert!(!kind(ty, 4).translatable());
        }
        assert_eq!(kind(13, 0).kind, L4Kind::IcmpOther);
        let gre = Datagram::new(A, B, 47, alloc::vec![]).frame();
        assert_eq!(parse(&gre).unwrap().kind, L4Kind::Other);
    }
}
