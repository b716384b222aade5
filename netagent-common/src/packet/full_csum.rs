//! Checksums computed from scratch over a parsed frame in memory (RFC 1071),
//! independent of the incremental updates: the fuzz targets and tests verify
//! rewritten frames with them, and fill them in to make valid frames.
//!
//! What "valid" means here: the IPv4 header (with options) sums to 0xffff; a
//! TCP segment or ICMP message sums to 0xffff over the bytes up to the IP total
//! length (TCP with the pseudo-header, length = IP payload length); a UDP
//! datagram with checksum 0 has none, otherwise it sums to 0xffff with the
//! pseudo-header over the UDP length (which must lie within the IP payload).

use super::csum::{fold64, sum_be_words};
use super::header::{
    ETH_HLEN, ICMP_CSUM_OFF, IP_CSUM_OFF, IP_SRC_OFF, QUOTED_CSUM, TCP_CSUM_OFF, UDP_CSUM_OFF,
    UDP_HLEN,
};
use super::icmp_error::Quoted;
use super::ipv4::Ipv4;
use crate::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

/// The state of an L4 checksum, computed from scratch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Check {
    /// The checksum verifies.
    Valid,
    /// The checksum does not verify (or the UDP length does not fit).
    Invalid,
    /// UDP checksum 0: none.
    NoChecksum,
    /// Not TCP, UDP or ICMP, or a fragment: nothing to check.
    NotApplicable,
}

/// Whether the IPv4 header checksum of `ip` verifies.
pub fn ipv4_header_valid(frame: &[u8], ip: &Ipv4) -> bool {
    frame
        .get(ETH_HLEN..ip.l4_off())
        .is_some_and(|h| fold64(sum_be_words(h, 0)) == 0xffff)
}

/// Whether the header checksum of the IPv4 header quoted by an ICMP error
/// verifies.
pub fn quoted_header_valid(frame: &[u8], q: &Quoted) -> bool {
    frame
        .get(q.ip_off()..q.l4_off())
        .is_some_and(|h| fold64(sum_be_words(h, 0)) == 0xffff)
}

/// The L4 bytes a checksum covers and its pseudo-header sum (0 for ICMP), or
/// `None` when there is nothing to check.
fn l4_span(frame: &[u8], ip: &Ipv4) -> Option<(core::ops::Range<usize>, u64, usize)> {
    if ip.fragment || ip.end > frame.len() || ip.l4_off() > ip.end {
        return None;
    }
    let off = ip.l4_off();
    let (end, csum_off) = match ip.proto {
        IPPROTO_TCP => (ip.end, off + TCP_CSUM_OFF),
        IPPROTO_UDP => {
            let ulen = frame.get(off + 4..off + 6)?;
            let ulen = usize::from(u16::from_be_bytes([ulen[0], ulen[1]]));
            (
                off + ulen.max(UDP_HLEN).min(ip.end - off),
                off + UDP_CSUM_OFF,
            )
        }
        IPPROTO_ICMP => (ip.end, off + ICMP_CSUM_OFF),
        _ => return None,
    };
    if csum_off + 2 > end {
        return None;
    }
    let pseudo = if ip.proto == IPPROTO_ICMP {
        0
    } else {
        let addrs = frame.get(IP_SRC_OFF..IP_SRC_OFF + 8)?;
        sum_be_words(addrs, u64::from(ip.proto) + (end - off) as u64)
    };
    Some((off..end, pseudo, csum_off))
}

/// The state of the L4 checksum of `ip`, computed from scratch.
pub fn l4_check(frame: &[u8], ip: &Ipv4) -> L4Check {
    let Some((span, pseudo, csum_off)) = l4_span(frame, ip) else {
        return L4Check::NotApplicable;
    };
    if ip.proto == IPPROTO_UDP {
        if frame[csum_off..csum_off + 2] == [0, 0] {
            return L4Check::NoChecksum;
        }
        let ulen = usize::from(u16::from_be_bytes([
            frame[span.start + 4],
            frame[span.start + 5],
        ]));
        if ulen < UDP_HLEN || span.start + ulen > ip.end {
            return L4Check::Invalid;
        }
    }
    if fold64(sum_be_words(&frame[span], pseudo)) == 0xffff {
        L4Check::Valid
    } else {
        L4Check::Invalid
    }
}

/// Writes a correct IPv4 header checksum for `ip`.
pub fn fill_ipv4_header(frame: &mut [u8], ip: &Ipv4) {
    let Some(h) = frame.get_mut(ETH_HLEN..ip.l4_off()) else {
        return;
    };
    h[10..12].copy_from_slice(&[0, 0]);
    let check = !fold64(sum_be_words(h, 0));
    frame[IP_CSUM_OFF..IP_CSUM_OFF + 2].copy_from_slice(&check.to_be_bytes());
}

/// Writes a correct header checksum into the IPv4 header quoted by an ICMP
/// error (call before `fill_l4`, which covers the quote).
pub fn fill_quoted_header(frame: &mut [u8], q: &Quoted) {
    let Some(h) = frame.get_mut(q.ip_off()..q.l4_off()) else {
        return;
    };
    h[QUOTED_CSUM..QUOTED_CSUM + 2].copy_from_slice(&[0, 0]);
    let check = !fold64(sum_be_words(h, 0));
    h[QUOTED_CSUM..QUOTED_CSUM + 2].copy_from_slice(&check.to_be_bytes());
}

/// Writes a correct L4 checksum for `ip` (TCP, UDP, ICMP), making the UDP
/// length match the IP payload first. A UDP checksum that is 0 stays 0 when
/// `keep_udp_zero` is set; a computed 0 is sent as 0xffff.
pub fn fill_l4(frame: &mut [u8], ip: &Ipv4, keep_udp_zero: bool) {
    if ip.proto == IPPROTO_UDP && !ip.fragment && ip.l4_off() + UDP_HLEN <= ip.end {
        let off = ip.l4_off();
        if keep_udp_zero && frame.get(off + 6..off + 8) == Some(&[0, 0]) {
            return;
        }
        let Ok(ulen) = u16::try_from(ip.end - off) else {
            return;
        };
        frame[off + 4..off + 6].copy_from_slice(&ulen.to_be_bytes());
    }
    let Some((span, pseudo, csum_off)) = l4_span(frame, ip) else {
        return;
    };
    frame[csum_off..csum_off + 2].copy_from_slice(&[0, 0]);
    let mut check = !fold64(sum_be_words(&frame[span], pseudo));
    if ip.proto == IPPROTO_UDP && check == 0 {
        check = 0xffff;
    }
    frame[csum_off..csum_off + 2].copy_from_slice(&check.to_be_bytes());
}
