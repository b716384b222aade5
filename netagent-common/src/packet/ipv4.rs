//! IPv4 header parsing (after Ethernet). Outcomes:
//! - `Ok(None)`: not IPv4 (shorter than an Ethernet header, or another
//!   EtherType: ARP, IPv6, VLAN tags). Not ours to judge.
//! - `Err(Malformed)`: EtherType IPv4 but the header is truncated (fewer than 20
//!   readable bytes, or options cut off), the version is not 4, IHL is below 5,
//!   or the total length is shorter than the header or longer than the packet.
//! - `Ok(Some(ip))`: otherwise. IP options (IHL 6..15) are skipped, not
//!   interpreted; `fragment` is set for any fragment (MF or a non-zero offset),
//!   which `l4` then refuses. Bytes after the total length (Ethernet padding)
//!   are ignored, and the header checksum is not verified (the receiving stack
//!   does that; the rewrites update it incrementally, so a bad one stays bad).

use super::access::PacketRead;
use super::header::{
    ETH_HLEN, ETH_P_IP_BE, EthHdr, IP_DST_OFF, IP_MF_OFFSET_MASK, IPV4_MIN_HLEN, Ipv4Hdr,
};
use crate::DropReason;

/// The IPv4 header fields the programs use, network order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
    /// IP protocol.
    pub proto: u8,
    /// IHL: header length in 32-bit words (5..=15).
    pub(crate) ihl: u8,
    /// End of the IP datagram (14 + total length); L4 headers must end before it.
    pub end: usize,
    /// A fragment (MF set or non-zero offset).
    pub fragment: bool,
}

impl Ipv4 {
    /// Offset of the L4 header (after IP options).
    ///
    /// Recomputed from the 4-bit IHL at every use rather than stored: a stored
    /// offset can lose its bounds in a stack spill, and the verifier then refuses
    /// the variable packet offset (verifier-only shape).
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        ETH_HLEN + usize::from(self.ihl & 0x0f) * 4
    }

    /// IHL: the header length in 32-bit words.
    #[inline(always)]
    pub fn ihl(&self) -> u8 {
        self.ihl
    }
}

/// The destination address of an IPv4 header that may be malformed (network
/// order), if the frame is long enough to hold it.
#[inline(always)]
pub fn raw_daddr<P: PacketRead + ?Sized>(p: &P) -> Option<u32> {
    p.load(IP_DST_OFF)
}

/// Parses Ethernet and IPv4 (see the module docs for the outcomes).
#[inline(always)]
pub fn ipv4<P: PacketRead + ?Sized>(p: &P) -> Result<Option<Ipv4>, DropReason> {
    let eth: EthHdr = match p.load(0) {
        Some(eth) => eth,
        None => return Ok(None), // not even an Ethernet header: nothing of ours
    };
    if eth.proto != ETH_P_IP_BE {
        return Ok(None);
    }
    let ip: Ipv4Hdr = p.load(ETH_HLEN).ok_or(DropReason::Malformed)?;
    if ip.version_ihl >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let hlen = usize::from(ip.version_ihl & 0x0f) * 4;
    if hlen < IPV4_MIN_HLEN {
        return Err(DropReason::Malformed);
    }
    let tot_len = usize::from(u16::from_be(ip.tot_len));
    if tot_len < hlen || ETH_HLEN + tot_len > p.packet_len() {
        return Err(DropReason::Malformed);
    }
    // The options must be readable too, so a datagram with IHL > 5 whose options
    // are cut off is malformed rather than silently misparsed.
    if p.load::<u8>(ETH_HLEN + hlen - 1).is_none() {
        return Err(DropReason::Malformed);
    }
    Ok(Some(Ipv4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        proto: ip.proto,
        ihl: ip.version_ihl & 0x0f,
        end: ETH_HLEN + tot_len,
        fragment: u16::from_be(ip.frag_off) & IP_MF_OFFSET_MASK != 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::frames::{Datagram, tcp, tcp_flags::SYN};
    use super::*;

    fn syn() -> alloc::vec::Vec<u8> {
        Datagram::tcp(
            [169, 254, 0, 21],
            [198, 18, 0, 10],
            tcp(40000, 80, SYN, &[]),
        )
        .frame()
    }

    #[test]
    fn parses_the_fields() {
        let f = syn();
        let ip = ipv4(&f[..]).unwrap().unwrap();
        assert_eq!(ip.saddr, u32::from_ne_bytes([169, 254, 0, 21]));
        assert_eq!(ip.daddr, u32::from_ne_bytes([198, 18, 0, 10]));
        assert_eq!(ip.proto, crate::IPPROTO_TCP);
        assert_eq!((ip.l4_off(), ip.end, ip.fragment), (34, f.len(), false));
        assert_eq!(raw_daddr(&f[..]), Some(ip.daddr));
    }

    #[test]
    fn not_ipv4_is_none() {
        assert_eq!(ipv4(&[0u8; 13][..]), Ok(None), "shorter than Ethernet");
        let mut f = syn();
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(ipv4(&f[..]), Ok(None), "IPv6");
        f[12..14].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(ipv4(&f[..]), Ok(None), "VLAN tag");
    }

    #[test]
    fn truncated_header_is_malformed() {
        let f = syn();
        for len in 14..34 {
            assert_eq!(ipv4(&f[..len]), Err(DropReason::Malformed), "{len} bytes");
        }
    }

    #[test]
    fn bad_version_and_ihl_are_malformed() {
        for (byte, what) in [(0x65, "version 6"), (0x44, "IHL 4"), (0x40, "IHL 0")] {
            let mut f = syn();
            f[ETH_HLEN] = byte;
            assert_eq!(ipv4(&f[..]), Err(DropReason::Malformed), "{what}");
        }
    }

    #[test]
    fn bad_total_length_is_malformed() {
        let mut f = syn();
        let n = f.len();
        for tot in [0u16, 19, (n - ETH_HLEN + 1) as u16, 0xffff] {
            f[16..18].copy_from_slice(&tot.to_be_bytes());
            assert_eq!(
                ipv4(&f[..]),
                Err(DropReason::Malformed),
                "total length {tot}"
            );
        }
        // Shorter than the frame (Ethernet padding): the end follows the IP length.
        f[16..18].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(ipv4(&f[..]).unwrap().unwrap().end, ETH_HLEN + 20);
    }

    #[test]
    fn options_are_skipped_and_must_be_readable() {
        let f = Datagram::tcp([1, 2, 3, 4], [5, 6, 7, 8], tcp(1, 2, SYN, &[]))
            .options(&[1; 40])
            .frame();
        let ip = ipv4(&f[..]).unwrap().unwrap();
        assert_eq!((ip.ihl(), ip.l4_off()), (15, ETH_HLEN + 60));
        // IHL 15 but only 59 header bytes readable (the skb's linear part).
        let cut = super::super::check::Split {
            bytes: &f,
            readable: ETH_HLEN + 59,
        };
        assert_eq!(ipv4(&cut), Err(DropReason::Malformed));
    }

    #[test]
    fn fragments_are_flagged() {
        for (frag_off, fragment) in [
            (0x4000, false),
            (0x2000, true),
            (0x0001, true),
            (0x8000, false),
        ] {
            let f = Datagram::udp([1, 2, 3, 4], [5, 6, 7, 8], alloc::vec![0; 8])
                .frag_off(frag_off)
                .frame();
            assert_eq!(
                ipv4(&f[..]).unwrap().unwrap().fragment,
                fragment,
                "{frag_off:#x}"
            );
        }
    }
}
