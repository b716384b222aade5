//! Test packets: a small builder for Ethernet/IPv4/TCP/UDP/ICMP frames (with IP
//! options and fragments), a parser for reading the interesting fields back, and
//! an independent checksum verifier (RFC 1071, written here from the RFC, not
//! shared with the datapath).

use std::net::{Ipv4Addr, SocketAddrV4};

/// EtherType IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

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
}

/// The L4 part of a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    /// TCP segment without options.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Flags byte.
        flags: u8,
        /// Sequence number.
        seq: u32,
        /// Acknowledgement number.
        ack: u32,
    },
    /// UDP datagram.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Send checksum 0 ("none") instead of a computed one.
        no_checksum: bool,
    },
    /// ICMP echo request (type 8) or reply (type 0).
    IcmpEcho {
        /// Request (true) or reply.
        request: bool,
        /// Identifier.
        id: u16,
        /// Sequence number.
        seq: u16,
    },
    /// Any other ICMP message (type, code, 4 bytes rest-of-header).
    Icmp {
        /// Type.
        ty: u8,
        /// Code.
        code: u8,
    },
    /// Raw payload under another protocol number.
    Raw {
        /// IP protocol.
        proto: u8,
    },
}

impl L4 {
    fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::IcmpEcho { .. } | L4::Icmp { .. } => 1,
            L4::Raw { proto } => *proto,
        }
    }
}

/// Builds one Ethernet + IPv4 frame with correct checksums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketBuilder {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// IPv4 source.
    pub src: Ipv4Addr,
    /// IPv4 destination.
    pub dst: Ipv4Addr,
    /// TTL.
    pub ttl: u8,
    /// IP identification.
    pub ip_id: u16,
    /// IP options (padded with zeros to a multiple of 4 bytes).
    pub options: Vec<u8>,
    /// Flags and fragment offset field (host order), e.g. 0x4000 = DF.
    pub frag: u16,
    /// L4 header.
    pub l4: L4,
    /// Payload after the L4 header.
    pub payload: Vec<u8>,
}

/// Default source MAC of built frames.
pub const DEFAULT_SRC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Default destination MAC of built frames.
pub const DEFAULT_DST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

impl PacketBuilder {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        PacketBuilder {
            src_mac: DEFAULT_SRC_MAC,
            dst_mac: DEFAULT_DST_MAC,
            src,
            dst,
            ttl: 64,
            ip_id: 0x1234,
            options: Vec::new(),
            frag: 0x4000,
            l4,
            payload: Vec::new(),
        }
    }

    /// A TCP segment `src` → `dst` with `flags`.
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self::new(
            *src.ip(),
            *dst.ip(),
            L4::Tcp {
                sport: src.port(),
                dport: dst.port(),
                flags,
                seq: 0x0102_0304,
                ack: if flags & tcp_flags::ACK != 0 {
                    0x0a0b_0c0d
                } else {
                    0
                },
            },
        )
    }

    /// A UDP datagram `src` → `dst` carrying `payload`.
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        let mut b = Self::new(
            *src.ip(),
            *dst.ip(),
            L4::Udp {
                sport: src.port(),
                dport: dst.port(),
                no_checksum: false,
            },
        );
        b.payload = payload.to_vec();
        b
    }

    /// An ICMP echo request.
    pub fn icmp_echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Self {
        let mut b = Self::new(
            src,
            dst,
            L4::IcmpEcho {
                request: true,
                id,
                seq,
            },
        );
        b.payload = b"netagent-ping".to_vec();
        b
    }

    /// An ICMP echo reply.
    pub fn icmp_echo_reply(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Self {
        let mut b = Self::new(
            src,
            dst,
            L4::IcmpEcho {
                request: false,
                id,
                seq,
            },
        );
        b.payload = b"netagent-ping".to_vec();
        b
    }

    /// Another ICMP message (e.g. type 3 destination unreachable).
    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, code: u8) -> Self {
        Self::new(src, dst, L4::Icmp { ty, code })
    }

    /// Sets the MACs.
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Sets IP options.
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        self
    }

    /// Makes this a fragment: `more` sets MF, `offset` is in 8-byte units.
    pub fn fragment(mut self, more: bool, offset: u16) -> Self {
        self.frag = (if more { 0x2000 } else { 0 }) | (offset & 0x1fff);
        self
    }

    /// UDP with checksum 0 (none).
    pub fn udp_no_checksum(mut self) -> Self {
        if let L4::Udp { no_checksum, .. } = &mut self.l4 {
            *no_checksum = true;
        }
        self
    }

    /// Replaces the source address and port (TCP/UDP) or ICMP id (echo request).
    pub fn with_src(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.src = addr;
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
            L4::IcmpEcho {
                request: true, id, ..
            } => *id = port,
            _ => {}
        }
        self
    }

    /// Replaces the destination address and port (TCP/UDP) or ICMP id (echo reply).
    pub fn with_dst(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.dst = addr;
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
            L4::IcmpEcho {
                request: false, id, ..
            } => *id = port,
            _ => {}
        }
        self
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
            } => {
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&ack.to_be_bytes());
                out.push(5 << 4);
                out.push(*flags);
                out.extend_from_slice(&64240u16.to_be_bytes());
                out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                out.extend_from_slice(&self.payload);
                let c = l4_checksum(self.src, self.dst, 6, &out);
                out[16..18].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp {
                sport,
                dport,
                no_checksum,
            } => {
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&self.payload);
                if !no_checksum {
                    let mut c = l4_checksum(self.src, self.dst, 17, &out);
                    if c == 0 {
                        c = 0xffff; // RFC 768: a computed 0 is sent as all ones
                    }
                    out[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            L4::IcmpEcho { request, id, seq } => {
                out.push(if *request { 8 } else { 0 });
                out.push(0);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&self.payload);
                let c = internet_checksum(&out);
                out[2..4].copy_from_slice(&c.to_be_bytes());
            }
            L4::Icmp { ty, code } => {
                out.extend_from_slice(&[*ty, *code, 0, 0, 0, 0, 0, 0]);
                out.extend_from_slice(&self.payload);
                let c = internet_checksum(&out);
                out[2..4].copy_from_slice(&c.to_be_bytes());
            }
            L4::Raw { .. } => out.extend_from_slice(&self.payload),
        }
        out
    }

    /// The IPv4 datagram (header + L4), without Ethernet.
    pub fn ipv4_bytes(&self) -> Vec<u8> {
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        let hlen = 20 + options.len();
        let l4 = self.l4_bytes();
        let total = hlen + l4.len();
        let mut ip = Vec::with_capacity(total);
        ip.push(0x40 | (hlen / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&self.ip_id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.l4.proto());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&options);
        let c = internet_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip
    }

    /// The whole Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let mut f = ethernet_header(self.dst_mac, self.src_mac, ETHERTYPE_IPV4);
        f.extend_from_slice(&self.ipv4_bytes());
        f
    }
}

/// An Ethernet header.
pub fn ethernet_header(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(14);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An ARP request "who has `target`, tell `sender`".
pub fn arp_request(src_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet_header([0xff; 6], src_mac, ETHERTYPE_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// A minimal IPv6 frame (UDP, no checksum check intended).
pub fn ipv6_udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut f = ethernet_header(dst_mac, src_mac, ETHERTYPE_IPV6);
    let payload = [0x12, 0x34, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00];
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[17, 64]);
    let mut src = [0u8; 16];
    src[0] = 0xfe;
    src[1] = 0x80;
    src[15] = 1;
    let mut dst = src;
    dst[15] = 2;
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&payload);
    f
}

/// RFC 1071 Internet checksum of `data`: the one's complement of the one's
/// complement sum of its 16-bit big-endian words (an odd last byte is padded).
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(ones_sum(data, 0))
}

fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(proto);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    ones_sum(&p, 0)
}

/// Checksum of a TCP or UDP segment `seg` (checksum field zeroed or not: a
/// correct segment yields 0 when its field is included).
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, seg: &[u8]) -> u16 {
    !fold(ones_sum(seg, pseudo_header_sum(src, dst, proto, seg.len())))
}

/// The fields of a frame the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// EtherType.
    pub ethertype: u16,
    /// IPv4 source.
    pub src: Ipv4Addr,
    /// IPv4 destination.
    pub dst: Ipv4Addr,
    /// IP protocol.
    pub proto: u8,
    /// IPv4 header length in bytes.
    pub ihl_bytes: usize,
    /// TCP/UDP source port; ICMP echo identifier for requests.
    pub sport: u16,
    /// TCP/UDP destination port; ICMP echo identifier for replies.
    pub dport: u16,
    /// The L4 checksum field as it is in the frame.
    pub l4_checksum: u16,
}

impl Parsed {
    /// Source as a socket address.
    pub fn src_sock(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.src, self.sport)
    }

    /// Destination as a socket address.
    pub fn dst_sock(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.dst, self.dport)
    }
}

/// Parses an Ethernet + IPv4 frame (non-fragment) into `Parsed`.
pub fn parse(frame: &[u8]) -> Result<Parsed, String> {
    if frame.len() < 34 {
        return Err(format!(
            "frame of {} bytes is too short for Ethernet + IPv4",
            frame.len()
        ));
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype != ETHERTYPE_IPV4 {
        return Err(format!("ethertype {ethertype:#06x} is not IPv4"));
    }
    let ip = &frame[14..];
    let ihl_bytes = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl_bytes < 20 || total < ihl_bytes || total > ip.len() {
        return Err(format!(
            "bad IPv4 lengths: ihl {ihl_bytes}, total {total}, have {}",
            ip.len()
        ));
    }
    let proto = ip[9];
    let l4 = &ip[ihl_bytes..total];
    let (sport, dport, l4_checksum) = match proto {
        6 if l4.len() >= 20 => (be16(l4, 0), be16(l4, 2), be16(l4, 16)),
        17 if l4.len() >= 8 => (be16(l4, 0), be16(l4, 2), be16(l4, 6)),
        1 if l4.len() >= 8 => match l4[0] {
            8 => (be16(l4, 4), 0, be16(l4, 2)),
            0 => (0, be16(l4, 4), be16(l4, 2)),
            _ => (0, 0, be16(l4, 2)),
        },
        _ => (0, 0, 0),
    };
    Ok(Parsed {
        dst_mac: frame[0..6].try_into().expect("6 bytes"),
        src_mac: frame[6..12].try_into().expect("6 bytes"),
        ethertype,
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        proto,
        ihl_bytes,
        sport,
        dport,
        l4_checksum,
    })
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// Verifies the IPv4 header checksum and the TCP/UDP/ICMP checksum of a
/// (non-fragment) frame from scratch. UDP checksum 0 means "none" and passes.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let p = parse(frame)?;
    let ip = &frame[14..];
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if internet_checksum(&ip[..p.ihl_bytes]) != 0 {
        return Err(format!(
            "IPv4 header checksum {:#06x} is wrong",
            be16(ip, 10)
        ));
    }
    let seg = &ip[p.ihl_bytes..total];
    let ok = match p.proto {
        6 => l4_checksum(p.src, p.dst, 6, seg) == 0,
        17 => p.l4_checksum == 0 || l4_checksum(p.src, p.dst, 17, seg) == 0,
        1 => internet_checksum(seg) == 0,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "L4 checksum {:#06x} (protocol {}) is wrong",
            p.l4_checksum, p.proto
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (one's complement).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(ones_sum(&data, 0)), 0xddf2);
        assert_eq!(internet_checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_is_padded() {
        assert_eq!(internet_checksum(&[0x01]), !0x0100);
    }

    #[test]
    fn built_frames_verify() {
        let a = SocketAddrV4::new(Ipv4Addr::new(169, 254, 0, 21), 40000);
        let b = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100), 80);
        for f in [
            PacketBuilder::tcp(a, b, tcp_flags::SYN).build(),
            PacketBuilder::udp(a, b, b"hello").build(),
            PacketBuilder::udp(a, b, b"hello").udp_no_checksum().build(),
            PacketBuilder::icmp_echo_request(*a.ip(), *b.ip(), 7, 1).build(),
            PacketBuilder::tcp(a, b, tcp_flags::ACK)
                .ip_options(&[0x94, 0x04, 0, 0])
                .payload(b"abc")
                .build(),
        ] {
            verify_checksums(&f).unwrap();
        }
    }

    #[test]
    fn a_flipped_bit_is_caught() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 1);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 2);
        let mut f = PacketBuilder::tcp(a, b, tcp_flags::SYN).build();
        f[14 + 20 + 4] ^= 0x10; // inside the sequence number
        assert!(verify_checksums(&f).is_err());
        let mut f = PacketBuilder::udp(a, b, b"x").build();
        f[14 + 8] ^= 1; // TTL
        assert!(verify_checksums(&f).is_err());
    }

    #[test]
    fn parse_reads_back_the_fields() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 1234);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80);
        let p = parse(
            &PacketBuilder::tcp(a, b, tcp_flags::SYN)
                .ip_options(&[1])
                .build(),
        )
        .unwrap();
        assert_eq!(
            (p.src_sock(), p.dst_sock(), p.proto, p.ihl_bytes),
            (a, b, 6, 24)
        );
    }
}
