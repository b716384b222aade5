//! A small builder of Ethernet/IPv4 frames with correct checksums, for the
//! seed corpora of the fuzz targets and for tests (`check` feature). Addresses
//! and ports are given as host-order numbers.

use alloc::vec::Vec;

use super::full_csum::{fill_ipv4_header, fill_l4, fill_quoted_header};
use super::header::{ETH_HLEN, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST};
use super::icmp_error::icmp_error_quote;
use super::ipv4::ipv4;
use super::l4::{L4Kind, l4};
use crate::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
    /// URG.
    pub const URG: u8 = 0x20;
}

/// An IPv4 datagram under construction.
#[derive(Clone, Debug)]
pub struct Datagram {
    /// Source address.
    pub src: u32,
    /// Destination address.
    pub dst: u32,
    /// IP protocol.
    pub proto: u8,
    /// IP options (padded to a multiple of 4 bytes with zeros, at most 40).
    pub options: Vec<u8>,
    /// Flags and fragment offset field (host order).
    pub frag_off: u16,
    /// Everything after the IPv4 header.
    pub payload: Vec<u8>,
}

/// A TCP header without options, then `data`.
pub fn tcp(sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + data.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // sequence
    h.extend_from_slice(&0u32.to_be_bytes()); // acknowledgement
    h.extend_from_slice(&[5 << 4, flags]);
    h.extend_from_slice(&65535u16.to_be_bytes()); // window
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    h.extend_from_slice(data);
    h
}

/// A UDP header (length = 8 + data) then `data`.
pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + data.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(data);
    h
}

/// An ICMP echo request (or reply) with identifier `id`.
pub fn icmp_echo(request: bool, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let ty = if request {
        ICMP_ECHO_REQUEST
    } else {
        ICMP_ECHO_REPLY
    };
    let mut h = Vec::with_capacity(8 + data.len());
    h.extend_from_slice(&[ty, 0, 0, 0]);
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(data);
    h
}

/// An ICMP error of `ty`/`code` with the 4 "rest of header" bytes `rest`
/// (e.g. the next-hop MTU of "fragmentation needed"), quoting `quoted` (an IPv4
/// datagram without Ethernet header, usually cut after 8 L4 bytes).
pub fn icmp_error(ty: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + quoted.len());
    h.extend_from_slice(&[ty, code, 0, 0]);
    h.extend_from_slice(&rest);
    h.extend_from_slice(quoted);
    h
}

/// "Fragmentation needed" (destination unreachable, code 4) with next-hop MTU
/// `mtu`, quoting `quoted`.
pub fn frag_needed(mtu: u16, quoted: &[u8]) -> Vec<u8> {
    let m = mtu.to_be_bytes();
    icmp_error(ICMP_DEST_UNREACH, 4, [0, 0, m[0], m[1]], quoted)
}

impl Datagram {
    /// A datagram from `src` to `dst` carrying `payload` under `proto`.
    pub fn new(src: [u8; 4], dst: [u8; 4], proto: u8, payload: Vec<u8>) -> Self {
        Datagram {
            src: u32::from_be_bytes(src),
            dst: u32::from_be_bytes(dst),
            proto,
            options: Vec::new(),
            frag_off: 0x4000, // DF
            payload,
        }
    }

    /// TCP.
    pub fn tcp(src: [u8; 4], dst: [u8; 4], payload: Vec<u8>) -> Self {
        Self::new(src, dst, IPPROTO_TCP, payload)
    }

    /// UDP.
    pub fn udp(src: [u8; 4], dst: [u8; 4], payload: Vec<u8>) -> Self {
        Self::new(src, dst, IPPROTO_UDP, payload)
    }

    /// ICMP.
    pub fn icmp(src: [u8; 4], dst: [u8; 4], payload: Vec<u8>) -> Self {
        Self::new(src, dst, IPPROTO_ICMP, payload)
    }

    /// With IP options.
    pub fn options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        while !self.options.len().is_multiple_of(4) {
            self.options.push(0);
        }
        self
    }

    /// With this flags/fragment offset field.
    pub fn frag_off(mut self, frag_off: u16) -> Self {
        self.frag_off = frag_off;
        self
    }

    /// The IPv4 header and payload, with a correct header checksum (no L4
    /// checksum: see `frame`).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let hlen = 20 + self.options.len();
        let mut b = Vec::with_capacity(hlen + self.payload.len());
        b.push(0x40 | (hlen / 4) as u8);
        b.push(0);
        b.extend_from_slice(&((hlen + self.payload.len()) as u16).to_be_bytes());
        b.extend_from_slice(&0x1234u16.to_be_bytes());
        b.extend_from_slice(&self.frag_off.to_be_bytes());
        b.extend_from_slice(&[64, self.proto, 0, 0]);
        b.extend_from_slice(&self.src.to_be_bytes());
        b.extend_from_slice(&self.dst.to_be_bytes());
        b.extend_from_slice(&self.options);
        let check = !super::csum::fold64(super::csum::sum_be_words(&b, 0));
        b[10..12].copy_from_slice(&check.to_be_bytes());
        b.extend_from_slice(&self.payload);
        b
    }

    /// The Ethernet frame with every checksum correct (IPv4 header, L4, and
    /// for an ICMP error the quoted header). `udp_no_checksum` sends UDP with
    /// checksum 0.
    pub fn frame_with(&self, udp_no_checksum: bool) -> Vec<u8> {
        let mut f = Vec::with_capacity(ETH_HLEN + 60 + self.payload.len());
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00]);
        f.extend_from_slice(&self.ip_bytes());
        fix_checksums(&mut f, udp_no_checksum);
        f
    }

    /// The Ethernet frame with every checksum correct.
    pub fn frame(&self) -> Vec<u8> {
        self.frame_with(false)
    }
}

/// Recomputes every checksum of a frame that parses (IPv4 header, the L4
/// checksum, an ICMP error's quoted header). A UDP checksum of 0 stays 0 when
/// `keep_udp_zero`. Frames that do not parse are left alone.
pub fn fix_checksums(f: &mut [u8], keep_udp_zero: bool) {
    let Ok(Some(ip)) = ipv4(&*f) else {
        return;
    };
    if let Ok(l) = l4(&*f, &ip)
        && l.kind == L4Kind::IcmpError
        && let Ok(q) = icmp_error_quote(&*f, &ip)
    {
        fill_quoted_header(f, &q);
    }
    fill_l4(f, &ip, keep_udp_zero);
    fill_ipv4_header(f, &ip);
}

/// The guest's address.
const GUEST: [u8; 4] = [169, 254, 0, 21];
/// A "wan" server.
const WAN: [u8; 4] = [198, 18, 0, 10];
/// A router on the way.
const ROUTER: [u8; 4] = [198, 18, 0, 1];
/// The uplink address.
const UPLINK: [u8; 4] = [10, 0, 0, 1];

/// Real frames of every class the parser distinguishes, valid and hostile
/// (named after what they are): the seed corpus of both fuzz targets and the
/// starting points of the randomized tests.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use tcp_flags::*;
    let syn = Datagram::tcp(GUEST, WAN, tcp(40000, 80, SYN, &[]));
    let out_tcp = Datagram::tcp(
        UPLINK,
        WAN,
        tcp(33000, 443, ACK | PSH, b"GET / HTTP/1.1\r\n"),
    );
    let out_udp = Datagram::udp(UPLINK, WAN, udp(33001, 53, b"dns?"));
    let out_echo = Datagram::icmp(UPLINK, WAN, icmp_echo(true, 33002, 1, b"ping"));
    let quote = |d: &Datagram, len: usize| {
        let b = d.ip_bytes();
        b[..len.min(b.len())].to_vec()
    };
    let mut v: Vec<(&'static str, Vec<u8>)> = alloc::vec![
        ("tcp_syn", syn.frame()),
        (
            "tcp_data_odd_length",
            Datagram::tcp(GUEST, WAN, tcp(40000, 80, ACK | PSH, b"hello")).frame(),
        ),
        (
            "tcp_reply",
            Datagram::tcp(WAN, UPLINK, tcp(443, 33000, SYN | ACK, &[])).frame()
        ),
        (
            "tcp_ip_options",
            Datagram::tcp(GUEST, WAN, tcp(40000, 80, ACK, b"x"))
                .options(&[0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00])
                .frame(),
        ),
        (
            "tcp_ip_options_max",
            Datagram::tcp(GUEST, WAN, tcp(40000, 80, ACK, &[]))
                .options(&[1; 40])
                .frame(),
        ),
        (
            "tcp_odd_flags",
            Datagram::tcp(
                GUEST,
                WAN,
                tcp(40000, 80, SYN | FIN | RST | PSH | URG | 0xc0, &[])
            )
            .frame(),
        ),
        (
            "tcp_no_flags",
            Datagram::tcp(GUEST, WAN, tcp(40000, 80, 0, &[])).frame()
        ),
        (
            "udp",
            Datagram::udp(GUEST, WAN, udp(40001, 53, b"query")).frame()
        ),
        (
            "udp_no_checksum",
            Datagram::udp(GUEST, WAN, udp(40001, 53, b"q")).frame_with(true)
        ),
        (
            "udp_empty",
            Datagram::udp(GUEST, WAN, udp(40001, 9, &[])).frame()
        ),
        (
            "icmp_echo_request",
            Datagram::icmp(GUEST, WAN, icmp_echo(true, 7, 1, b"ping")).frame()
        ),
        (
            "icmp_echo_reply",
            Datagram::icmp(WAN, UPLINK, icmp_echo(false, 33002, 1, b"ping")).frame()
        ),
        (
            "icmp_other_timestamp",
            Datagram::icmp(GUEST, WAN, alloc::vec![13, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0]).frame(),
        ),
        (
            "icmp_frag_needed_tcp",
            Datagram::icmp(ROUTER, UPLINK, frag_needed(1400, &quote(&out_tcp, 28))).frame(),
        ),
        (
            "icmp_frag_needed_udp_full_quote",
            Datagram::icmp(ROUTER, UPLINK, frag_needed(576, &out_udp.ip_bytes())).frame(),
        ),
        (
            "icmp_time_exceeded_echo",
            Datagram::icmp(
                ROUTER,
                UPLINK,
                icmp_error(11, 0, [0; 4], &quote(&out_echo, 28))
            )
            .frame(),
        ),
        (
            "icmp_error_quote_with_options",
            Datagram::icmp(
                ROUTER,
                UPLINK,
                icmp_error(
                    3,
                    3,
                    [0; 4],
                    &quote(&out_udp.clone().options(&[1, 1, 1, 1]), 32)
                ),
            )
            .options(&[1, 1, 1, 1])
            .frame(),
        ),
        (
            "icmp_error_quoting_guest",
            Datagram::icmp(
                GUEST,
                WAN,
                icmp_error(
                    3,
                    3,
                    [0; 4],
                    &quote(&Datagram::udp(WAN, GUEST, udp(53, 40001, b"late")), 28)
                ),
            )
            .frame(),
        ),
        (
            "fragment_first",
            Datagram::udp(GUEST, WAN, udp(40001, 53, b"frag"))
                .frag_off(0x2000)
                .frame()
        ),
        (
            "fragment_later",
            Datagram::udp(GUEST, WAN, b"rest".to_vec())
                .frag_off(0x0010)
                .frame()
        ),
        (
            "gre",
            Datagram::new(GUEST, WAN, 47, alloc::vec![0; 8]).frame()
        ),
    ];
    // Hostile variants of valid frames.
    let mut truncated = syn.frame();
    truncated.truncate(30);
    v.push(("ipv4_truncated", truncated));
    let mut bad_ihl = syn.frame();
    bad_ihl[ETH_HLEN] = 0x44;
    v.push(("ipv4_ihl_4", bad_ihl));
    let mut long = syn.frame();
    long[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&1500u16.to_be_bytes());
    v.push(("ipv4_total_length_beyond_frame", long));
    let mut short_tot = syn.frame();
    short_tot[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&30u16.to_be_bytes());
    v.push(("ipv4_total_length_cuts_tcp", short_tot));
    let mut padded = Datagram::udp(GUEST, WAN, udp(40001, 53, &[])).frame();
    padded.extend_from_slice(&[0xee; 18]);
    v.push(("ethernet_padding", padded));
    let mut doff = syn.frame();
    doff[ETH_HLEN + 20 + 12] = 4 << 4;
    v.push(("tcp_data_offset_4", doff));
    let mut udp_len0 = Datagram::udp(GUEST, WAN, udp(40001, 53, b"x")).frame_with(true);
    udp_len0[ETH_HLEN + 20 + 4..ETH_HLEN + 20 + 6].copy_from_slice(&[0, 0]);
    v.push(("udp_length_0", udp_len0));
    let mut arp = alloc::vec![0xff; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2, 169, 254, 0, 21]);
    arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 169, 254, 0, 22]);
    v.push(("arp_request", arp));
    let mut ipv6 = alloc::vec![
        0x33, 0x33, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd, 0x60
    ];
    ipv6.extend_from_slice(&[0; 39]);
    v.push(("ipv6", ipv6));
    v
}

/// The fuzz targets' seed corpora, as (target, file name, bytes): every seed
/// frame for `parse`; for `rewrite` each one behind the parameters of a
/// source-side and a destination-side rewrite.
pub fn seed_corpus() -> Vec<(&'static str, alloc::string::String, Vec<u8>)> {
    use super::check::RewriteParams;
    let mut out = Vec::new();
    for (name, frame) in seeds() {
        out.push(("parse", alloc::string::String::from(name), frame.clone()));
        for (suffix, destination) in [("src", false), ("dst", true)] {
            let params = RewriteParams {
                addr: u32::from_ne_bytes(if destination { [10, 200, 0, 2] } else { UPLINK }),
                port: 33333u16.to_be(),
                destination,
                fix_quoted: true,
                keep_udp_zero: true,
            };
            let mut input = params.bytes().to_vec();
            input.extend_from_slice(&frame);
            out.push(("rewrite", alloc::format!("{name}-{suffix}"), input));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::path::PathBuf;

    use super::*;

    /// The committed seed corpora (`netagent-common/fuzz/seeds/<target>/`) are
    /// what `seed_corpus` builds. `NETAGENT_UPDATE_SEEDS=1 cargo test -p
    /// netagent-common seed` rewrites them.
    #[test]
    fn seed_corpus_files_are_current() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        let update = std::env::var_os("NETAGENT_UPDATE_SEEDS").is_some();
        let corpus = seed_corpus();
        for (target, name, bytes) in &corpus {
            let path = dir.join(target).join(name);
            if update {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, bytes).unwrap();
            }
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == *bytes,
                "{} is not current: run NETAGENT_UPDATE_SEEDS=1 cargo test -p netagent-common seed",
                path.display()
            );
        }
        for target in ["parse", "rewrite"] {
            let files = std::fs::read_dir(dir.join(target)).unwrap().count();
            let expected = corpus.iter().filter(|(t, _, _)| *t == target).count();
            assert_eq!(files, expected, "stale files in seeds/{target}");
        }
    }
}
