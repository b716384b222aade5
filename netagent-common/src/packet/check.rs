//! The properties the fuzz targets and the randomized tests check (`check`
//! feature). Each function panics when a property is violated, so libFuzzer
//! and `cargo test` both report it with the input.
//!
//! `check_parse`: on any bytes, parsing never panics; its outcome equals that
//! of a reference parser written separately from the module docs (so every
//! outcome is a documented one and every field matches the bytes); and on a
//! packet whose readable part is cut short (an skb's linear part), the outcome
//! is the same as on the whole packet or `Malformed` (or "not IPv4" below 14
//! bytes) — a cut never yields different fields, i.e. nothing past the readable
//! end is ever used.
//!
//! `check_rewrite`: a frame that parses as translatable (or as an ICMP error
//! with a translatable quote) gets valid checksums, then the datapath's address
//! and port rewrite is applied in software; the result must parse to the same
//! datagram with the new address and port, verify its IPv4 and L4 checksums from
//! scratch (UDP checksum 0 stays 0; an ICMP error's quoted header stays valid),
//! and differ from the input only in the rewritten fields and checksums.

use alloc::vec::Vec;

use super::access::PacketRead;
use super::full_csum::{L4Check, ipv4_header_valid, l4_check, quoted_header_valid};
use super::header::{
    ETH_HLEN, ICMP_CSUM_OFF, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, QUOTED_CSUM, QUOTED_DST,
    QUOTED_SRC, TCP_CSUM_OFF, UDP_CSUM_OFF,
};
use super::icmp_error::{Quoted, icmp_error_quote};
use super::ipv4::{Ipv4, ipv4};
use super::l4::{L4, L4Kind, l4};
use super::rewrite::{
    PortField, ipv4_addr_rewrite, l4_port_rewrite, port_field_off, quoted_addr_rewrite,
    quoted_port_rewrite,
};
use crate::{DropReason, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

/// A packet of which only the first `readable` bytes can be read, as an skb
/// whose linear part is shorter than the packet.
pub struct Split<'a> {
    /// The whole packet.
    pub bytes: &'a [u8],
    /// How many bytes from the start are readable.
    pub readable: usize,
}

impl PacketRead for Split<'_> {
    fn load<T: super::access::Wire>(&self, off: usize) -> Option<T> {
        self.bytes[..self.readable.min(self.bytes.len())].load(off)
    }

    fn packet_len(&self) -> usize {
        self.bytes.len()
    }
}

fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

fn ne16(f: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([f[off], f[off + 1]])
}

fn ne32(f: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([f[off], f[off + 1], f[off + 2], f[off + 3]])
}

/// Reference for `ipv4`, from the documented rules, on a whole frame.
pub fn reference_ipv4(f: &[u8]) -> Result<Option<Ipv4>, DropReason> {
    if f.len() < 14 || f[12..14] != [0x08, 0x00] {
        return Ok(None);
    }
    if f.len() < 34 || f[14] >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = f[14] & 0x0f;
    let hlen = usize::from(ihl) * 4;
    let tot = usize::from(be16(f, 16));
    if hlen < 20 || tot < hlen || 14 + tot > f.len() {
        return Err(DropReason::Malformed);
    }
    Ok(Some(Ipv4 {
        saddr: ne32(f, 26),
        daddr: ne32(f, 30),
        proto: f[23],
        ihl,
        end: 14 + tot,
        fragment: be16(f, 20) & 0x3fff != 0,
    }))
}

/// Reference for `l4`, on a whole frame.
pub fn reference_l4(f: &[u8], ip: &Ipv4) -> Result<L4, DropReason> {
    if ip.fragment {
        return Err(DropReason::Fragment);
    }
    let off = 14 + usize::from(ip.ihl) * 4;
    let need = match ip.proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP | IPPROTO_ICMP => 8,
        _ => 0,
    };
    if off + need > ip.end {
        return Err(DropReason::Malformed);
    }
    let mut l = L4 {
        kind: L4Kind::Other,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };
    match ip.proto {
        IPPROTO_TCP => {
            if f[off + 12] >> 4 < 5 {
                return Err(DropReason::Malformed);
            }
            l.kind = L4Kind::Tcp;
            l.sport = ne16(f, off);
            l.dport = ne16(f, off + 2);
            l.tcp_flags = f[off + 13];
        }
        IPPROTO_UDP => {
            l.kind = L4Kind::Udp;
            l.sport = ne16(f, off);
            l.dport = ne16(f, off + 2);
        }
        IPPROTO_ICMP => match (f[off], f[off + 1]) {
            (8, 0) => {
                l.kind = L4Kind::IcmpEchoRequest;
                l.sport = ne16(f, off + 4);
            }
            (0, 0) => {
                l.kind = L4Kind::IcmpEchoReply;
                l.dport = ne16(f, off + 4);
            }
            (3 | 11 | 12, _) => l.kind = L4Kind::IcmpError,
            _ => l.kind = L4Kind::IcmpOther,
        },
        _ => {}
    }
    Ok(l)
}

/// Reference for `icmp_error_quote`, on a whole frame.
pub fn reference_quote(f: &[u8], ip: &Ipv4) -> Result<Quoted, DropReason> {
    let qoff = 14 + usize::from(ip.ihl) * 4 + 8;
    if qoff + 20 > ip.end || f[qoff] >> 4 != 4 || f[qoff] & 0x0f < 5 {
        return Err(DropReason::Malformed);
    }
    let qihl = f[qoff] & 0x0f;
    let ql4 = qoff + usize::from(qihl) * 4;
    if ql4 + 8 > ip.end {
        return Err(DropReason::Malformed);
    }
    let proto = f[qoff + 9];
    let (kind, sport, dport) = match (proto, f[ql4]) {
        (IPPROTO_TCP, _) => (L4Kind::Tcp, ne16(f, ql4), ne16(f, ql4 + 2)),
        (IPPROTO_UDP, _) => (L4Kind::Udp, ne16(f, ql4), ne16(f, ql4 + 2)),
        (IPPROTO_ICMP, 8) => (L4Kind::IcmpEchoRequest, ne16(f, ql4 + 4), 0),
        (IPPROTO_ICMP, 0) => (L4Kind::IcmpEchoReply, 0, ne16(f, ql4 + 4)),
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    Ok(Quoted {
        saddr: ne32(f, qoff + 12),
        daddr: ne32(f, qoff + 16),
        proto,
        ihl: qihl,
        check: ne16(f, qoff + 10),
        sport,
        dport,
        kind,
        outer_ihl: ip.ihl,
    })
}

/// What `check_parse` saw, for statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseSeen {
    /// Not IPv4.
    NotIpv4,
    /// IPv4 header refused.
    Ipv4Error(DropReason),
    /// L4 refused.
    L4Error(DropReason),
    /// Parsed; for an ICMP error, whether the quote parsed.
    Parsed(L4Kind),
    /// An ICMP error whose quote was refused.
    QuoteError(DropReason),
}

/// Checks the parse properties on `f` (see the module docs).
pub fn check_parse(f: &[u8]) -> ParseSeen {
    let full = ipv4(f);
    assert_eq!(full, reference_ipv4(f), "ipv4 differs from the reference");
    if let Some(eth) = super::eth::eth_addrs(f) {
        assert_eq!((&eth.0[..], &eth.1[..]), (&f[0..6], &f[6..12]));
    }
    let l4_full = full.ok().flatten().map(|ip| (ip, l4(f, &ip)));
    let quote_full = match l4_full {
        Some((ip, Ok(l))) if l.kind == L4Kind::IcmpError => Some(icmp_error_quote(f, &ip)),
        _ => None,
    };
    if let Some((ip, res)) = l4_full {
        assert_eq!(res, reference_l4(f, &ip), "l4 differs from the reference");
        if let Some(q) = quote_full {
            assert_eq!(
                q,
                reference_quote(f, &ip),
                "quote differs from the reference"
            );
        }
    }
    // Cut the readable part at every length up to the end of what was parsed
    // (and a few beyond).
    let upto = f.len().min(200);
    for readable in 0..=upto {
        let s = Split { bytes: f, readable };
        let cut = ipv4(&s);
        if cut != full {
            assert!(
                cut == Err(DropReason::Malformed) || (readable < ETH_HLEN && cut == Ok(None)),
                "ipv4 on {readable} readable bytes: {cut:?}, whole frame: {full:?}"
            );
            continue;
        }
        let Some((ip, l4_whole)) = l4_full else {
            continue;
        };
        let l4_cut = l4(&s, &ip);
        if readable >= ip.end {
            assert_eq!(l4_cut, l4_whole, "l4 on {readable} readable bytes");
        } else if l4_cut != l4_whole {
            assert_eq!(l4_cut, Err(DropReason::Malformed), "l4 on {readable} bytes");
        }
        if let Some(q_whole) = quote_full {
            let q_cut = icmp_error_quote(&s, &ip);
            if readable >= ip.end {
                assert_eq!(q_cut, q_whole, "quote on {readable} readable bytes");
            } else if q_cut != q_whole {
                assert_eq!(
                    q_cut,
                    Err(DropReason::Malformed),
                    "quote on {readable} bytes"
                );
            }
        }
    }
    match (full, l4_full, quote_full) {
        (Ok(None), _, _) => ParseSeen::NotIpv4,
        (Err(e), _, _) => ParseSeen::Ipv4Error(e),
        (_, Some((_, Err(e))), _) => ParseSeen::L4Error(e),
        (_, _, Some(Err(e))) => ParseSeen::QuoteError(e),
        (_, Some((_, Ok(l))), _) => ParseSeen::Parsed(l.kind),
        (Ok(Some(_)), None, _) => unreachable!("l4 is parsed for every IPv4 header"),
    }
}

/// Parameters of one software rewrite (`check_rewrite`).
#[derive(Clone, Copy, Debug)]
pub struct RewriteParams {
    /// The new address (network order).
    pub addr: u32,
    /// The new port or echo identifier (network order).
    pub port: u16,
    /// Rewrite the destination side (reverse NAT: `uplink_ingress`,
    /// `slot_ingress`) instead of the source side (masquerade: `veth_ingress`).
    pub destination: bool,
    /// For ICMP errors: make the quoted header checksum valid first.
    pub fix_quoted: bool,
    /// Keep a UDP checksum of 0 as 0 ("none").
    pub keep_udp_zero: bool,
}

/// Bytes `check_rewrite` takes its parameters from, before the frame.
pub const REWRITE_PARAM_BYTES: usize = 7;

impl RewriteParams {
    /// Splits a fuzz input into parameters and frame.
    pub fn split(input: &[u8]) -> Option<(RewriteParams, &[u8])> {
        if input.len() < REWRITE_PARAM_BYTES {
            return None;
        }
        let (p, frame) = input.split_at(REWRITE_PARAM_BYTES);
        Some((
            RewriteParams {
                addr: ne32(p, 0),
                port: ne16(p, 4),
                destination: p[6] & 1 != 0,
                fix_quoted: p[6] & 2 == 0,
                keep_udp_zero: p[6] & 4 == 0,
            },
            frame,
        ))
    }

    /// The parameter bytes of a fuzz input (inverse of `split`).
    pub fn bytes(&self) -> [u8; REWRITE_PARAM_BYTES] {
        let a = self.addr.to_ne_bytes();
        let p = self.port.to_ne_bytes();
        let flags = u8::from(self.destination)
            | u8::from(!self.fix_quoted) << 1
            | u8::from(!self.keep_udp_zero) << 2;
        [a[0], a[1], a[2], a[3], p[0], p[1], flags]
    }
}

/// What `check_rewrite` did, for statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewriteSeen {
    /// The frame is nothing the datapath rewrites.
    Skipped,
    /// A translatable datagram of this kind was rewritten and checked.
    Rewritten(L4Kind),
    /// An ICMP error quoting this kind was rewritten and checked.
    IcmpError(L4Kind),
}

/// Checks the rewrite properties on `frame` with `params` (see the module docs).
pub fn check_rewrite(params: &RewriteParams, frame: &[u8]) -> RewriteSeen {
    let mut f: Vec<u8> = frame.to_vec();
    let Ok(Some(ip)) = ipv4(&f[..]) else {
        return RewriteSeen::Skipped;
    };
    let Ok(l) = l4(&f[..], &ip) else {
        return RewriteSeen::Skipped;
    };
    let quote = if l.kind == L4Kind::IcmpError {
        match icmp_error_quote(&f[..], &ip) {
            Ok(q) => Some(q),
            Err(_) => return RewriteSeen::Skipped,
        }
    } else if l.translatable() {
        None
    } else {
        return RewriteSeen::Skipped;
    };
    // Valid checksums first (the fixes touch only checksums and the UDP length).
    if let Some(q) = &quote
        && params.fix_quoted
    {
        super::full_csum::fill_quoted_header(&mut f, q);
    }
    super::full_csum::fill_l4(&mut f, &ip, params.keep_udp_zero);
    super::full_csum::fill_ipv4_header(&mut f, &ip);
    assert!(ipv4_header_valid(&f, &ip));
    let l4_before = l4_check(&f, &ip);
    assert!(
        matches!(l4_before, L4Check::Valid | L4Check::NoChecksum),
        "fill_l4 left {l4_before:?}"
    );
    assert_eq!(
        ipv4(&f[..]),
        Ok(Some(ip)),
        "filling checksums changed the parse"
    );
    assert_eq!(l4(&f[..], &ip), Ok(l));
    // The quote again: its checksum may have been filled in.
    let quote = quote.map(|q| {
        let q2 = icmp_error_quote(&f[..], &ip).expect("filling checksums broke the quote");
        assert_eq!((q2.saddr, q2.daddr, q2.kind), (q.saddr, q.daddr, q.kind));
        q2
    });
    let before = f.clone();
    let mut expected = f.clone();
    // Checksum fields: may change; everything else must be exactly `expected`.
    let mut csum_offs: Vec<usize> = alloc::vec![IP_CSUM_OFF];
    let l4_off = ip.l4_off();

    let seen = match quote {
        None => {
            let (addr_off, old_addr, field, old_port) = if params.destination {
                (IP_DST_OFF, ip.daddr, PortField::Destination, l.dport)
            } else {
                (IP_SRC_OFF, ip.saddr, PortField::Source, l.sport)
            };
            csum_offs.push(
                l4_off
                    + match l.kind {
                        L4Kind::Tcp => TCP_CSUM_OFF,
                        L4Kind::Udp => UDP_CSUM_OFF,
                        _ => ICMP_CSUM_OFF,
                    },
            );
            ipv4_addr_rewrite(&mut f[..], &l, l4_off, addr_off, old_addr, params.addr)
                .expect("address rewrite of a parsed frame");
            expected[addr_off..addr_off + 4].copy_from_slice(&params.addr.to_ne_bytes());
            let port = l4_port_rewrite(&mut f[..], &l, l4_off, field, old_port, params.port);
            match port_field_off(l.kind, field) {
                Ok(off) => {
                    port.expect("port rewrite of a parsed frame");
                    expected[l4_off + off..l4_off + off + 2]
                        .copy_from_slice(&params.port.to_ne_bytes());
                }
                // An echo identifier is only a source (request) or destination
                // (reply) port: asking for the other one fails without a write.
                Err(e) if old_port != params.port => assert_eq!(port, Err(e)),
                Err(_) => assert_eq!(port, Ok(())),
            }
            RewriteSeen::Rewritten(l.kind)
        }
        Some(q) => {
            let quoted_valid = quoted_header_valid(&f, &q);
            // Uplink: outer destination and quoted source back to the flow's
            // address; veth: outer source and quoted destination to the
            // masquerade address.
            let (addr_off, old_addr, qfield, qold, pfield, pold) = if params.destination {
                (
                    IP_DST_OFF,
                    ip.daddr,
                    QUOTED_SRC,
                    q.saddr,
                    PortField::Source,
                    q.sport,
                )
            } else {
                (
                    IP_SRC_OFF,
                    ip.saddr,
                    QUOTED_DST,
                    q.daddr,
                    PortField::Destination,
                    q.dport,
                )
            };
            csum_offs.push(l4_off + ICMP_CSUM_OFF);
            csum_offs.push(q.ip_off() + QUOTED_CSUM);
            let outer = L4 {
                kind: L4Kind::IcmpError,
                sport: 0,
                dport: 0,
                tcp_flags: 0,
            };
            ipv4_addr_rewrite(&mut f[..], &outer, l4_off, addr_off, old_addr, params.addr)
                .expect("outer address rewrite");
            expected[addr_off..addr_off + 4].copy_from_slice(&params.addr.to_ne_bytes());
            let check = quoted_addr_rewrite(&mut f[..], &q, q.check, qfield, qold, params.addr)
                .expect("quoted address rewrite");
            assert_eq!(check, ne16(&f, q.ip_off() + QUOTED_CSUM));
            let qa = q.ip_off() + qfield;
            expected[qa..qa + 4].copy_from_slice(&params.addr.to_ne_bytes());
            let port = quoted_port_rewrite(&mut f[..], &q, l4_off, pfield, pold, params.port);
            match port_field_off(q.kind, pfield) {
                Ok(off) => {
                    port.expect("quoted port rewrite");
                    let pa = q.l4_off() + off;
                    expected[pa..pa + 2].copy_from_slice(&params.port.to_ne_bytes());
                }
                Err(e) if pold != params.port => assert_eq!(port, Err(e)),
                Err(_) => assert_eq!(port, Ok(())),
            }
            // The quote parses to the rewritten values, and its header checksum
            // is as valid as it was.
            let q2 = icmp_error_quote(&f[..], &ip).expect("quote still parses");
            assert_eq!(q2.kind, q.kind);
            assert_eq!(
                quoted_header_valid(&f, &q2),
                quoted_valid,
                "quoted header checksum"
            );
            RewriteSeen::IcmpError(q.kind)
        }
    };

    // The datagram parses the same, with the new address.
    let mut ip_expected = ip;
    if params.destination {
        ip_expected.daddr = params.addr;
    } else {
        ip_expected.saddr = params.addr;
    }
    assert_eq!(ipv4(&f[..]), Ok(Some(ip_expected)), "rewritten IPv4 header");
    assert!(
        ipv4_header_valid(&f, &ip_expected),
        "IPv4 checksum after rewrite"
    );
    let l4_after = l4_check(&f, &ip_expected);
    assert_eq!(l4_after, l4_before, "L4 checksum after rewrite");
    if l.kind == L4Kind::Udp && l4_before == L4Check::NoChecksum {
        assert_eq!(
            &f[l4_off + 6..l4_off + 8],
            &[0, 0],
            "UDP checksum 0 stays 0"
        );
    }
    // Nothing but the rewritten fields and the checksums changed.
    for (i, (got, want)) in f.iter().zip(expected.iter()).enumerate() {
        if csum_offs.iter().any(|&c| i == c || i == c + 1) {
            continue;
        }
        assert_eq!(got, want, "byte {i} (before {:#04x})", before[i]);
    }
    assert_eq!(f.len(), expected.len());
    seen
}

#[cfg(test)]
mod tests {
    extern crate std;

    use alloc::vec::Vec;

    use super::super::frames::seeds;
    use super::*;

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Values that sit on the parser's boundaries.
    const INTERESTING: [u8; 12] = [0, 1, 4, 5, 6, 8, 0x0f, 0x11, 0x40, 0x45, 0x4f, 0xff];

    fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
        for _ in 0..1 + rng.below(3) {
            match rng.below(7) {
                0 if !f.is_empty() => {
                    let i = rng.below(f.len());
                    f[i] ^= 1 << rng.below(8);
                }
                1 if !f.is_empty() => {
                    let i = rng.below(f.len());
                    f[i] = INTERESTING[rng.below(INTERESTING.len())];
                }
                2 if !f.is_empty() => {
                    let i = rng.below(f.len());
                    f[i] = rng.next() as u8;
                }
                3 => f.truncate(rng.below(f.len() + 1)),
                4 => f.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
                // A length field: IP total length or UDP length.
                5 if f.len() >= 40 => {
                    let off = if rng.below(2) == 0 { 16 } else { 38 };
                    let v = (rng.below(f.len() + 8) as u16).to_be_bytes();
                    f[off..off + 2].copy_from_slice(&v);
                }
                _ if f.len() >= 15 => f[14] = 0x40 | rng.below(16) as u8,
                _ => {}
            }
        }
    }

    fn random_frame(rng: &mut Rng) -> Vec<u8> {
        let mut f: Vec<u8> = (0..rng.below(160)).map(|_| rng.next() as u8).collect();
        if f.len() >= 15 && rng.below(4) != 0 {
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            f[14] = 0x45;
        }
        f
    }

    fn params(rng: &mut Rng) -> RewriteParams {
        let mut b = [0u8; REWRITE_PARAM_BYTES];
        for x in &mut b {
            *x = rng.next() as u8;
        }
        RewriteParams::split(&b).unwrap().0
    }

    /// The fuzz targets' properties over 20 000 deterministic random and mutated
    /// frames (so they are checked by `cargo test` even where cargo-fuzz
    /// cannot run). Fails if a property breaks, and if the generator stops
    /// reaching the rewrites.
    #[test]
    fn properties_hold_on_random_and_mutated_frames() {
        let seeds = seeds();
        let mut rng = Rng(0x6e65_7461_6765_6e74);
        let (mut parsed, mut rewritten, mut icmp_errors) = (0, 0, 0);
        const FRAMES: usize = 20_000;
        for i in 0..FRAMES {
            let f = if i % 5 == 0 {
                random_frame(&mut rng)
            } else {
                let mut f = seeds[rng.below(seeds.len())].1.clone();
                mutate(&mut rng, &mut f);
                f
            };
            if matches!(check_parse(&f), ParseSeen::Parsed(_)) {
                parsed += 1;
            }
            match check_rewrite(&params(&mut rng), &f) {
                RewriteSeen::Rewritten(_) => rewritten += 1,
                RewriteSeen::IcmpError(_) => icmp_errors += 1,
                RewriteSeen::Skipped => {}
            }
        }
        std::eprintln!("{parsed} parsed, {rewritten} rewrites, {icmp_errors} ICMP errors");
        assert!(parsed > FRAMES / 6, "only {parsed} frames parsed");
        assert!(rewritten > FRAMES / 10, "only {rewritten} rewrites checked");
        assert!(
            icmp_errors > FRAMES / 50,
            "only {icmp_errors} ICMP errors rewritten"
        );
    }

    #[test]
    fn every_seed_passes_both_checks() {
        for (name, f) in seeds() {
            check_parse(&f);
            for flags in 0..8u8 {
                let mut input = [0x0a, 0x00, 0x00, 0x01, 0x80, 0x01, flags].to_vec();
                input.extend_from_slice(&f);
                let (p, frame) = RewriteParams::split(&input).unwrap();
                let seen = check_rewrite(&p, frame);
                let expect_rewrite = !name.starts_with("ipv4_")
                    && !matches!(
                        name,
                        "arp_request"
                            | "ipv6"
                            | "gre"
                            | "icmp_other_timestamp"
                            | "tcp_data_offset_4"
                    )
                    && !name.starts_with("fragment");
                assert_eq!(
                    seen != RewriteSeen::Skipped,
                    expect_rewrite,
                    "{name}: {seen:?}"
                );
            }
        }
    }

    /// A property violation is caught: a rewrite that forgets the L4 checksum
    /// (as the datapath would if `l4_csum` returned `None`) fails the check.
    #[test]
    fn a_missed_checksum_update_is_detected() {
        let f = seeds()
            .into_iter()
            .find(|(n, _)| *n == "tcp_syn")
            .unwrap()
            .1;
        let ip = ipv4(&f[..]).unwrap().unwrap();
        let mut g = f.clone();
        g[IP_SRC_OFF] ^= 1; // address changed, no checksum updated
        assert!(!super::super::full_csum::ipv4_header_valid(&g, &ip));
        let ip2 = ipv4(&g[..]).unwrap().unwrap();
        assert_eq!(l4_check(&g, &ip2), L4Check::Invalid);
    }
}
