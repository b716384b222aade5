//! Wire layouts of the headers the parser copies out of packets, and the offsets
//! of the fields the programs rewrite. Multi-byte fields hold network-order
//! bytes (they are loaded as they sit in the packet).

use super::access::Wire;

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// EtherType of IPv4, as it sits in the packet (loaded natively).
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Shortest IPv4 header.
pub const IPV4_MIN_HLEN: usize = 20;
/// Longest IPv4 header (IHL 15).
pub const IPV4_MAX_HLEN: usize = 60;
/// TCP header without options, the largest L4 header read.
pub const TCP_HLEN: usize = 20;
/// UDP header.
pub const UDP_HLEN: usize = 8;
/// ICMP echo header (type, code, checksum, identifier, sequence).
pub const ICMP_ECHO_HLEN: usize = 8;
/// ICMP error header before the quoted datagram (type, code, checksum and the
/// 4 unused/MTU bytes).
pub const ICMP_ERROR_HLEN: usize = 8;
/// Bytes of the quoted datagram's L4 header every ICMP error carries (RFC 792).
pub const ICMP_QUOTED_L4: usize = 8;
/// Everything any program reads in one packet: an skb whose linear part is
/// shorter is made linear up to this length first.
pub const MAX_PARSE_LEN: usize = ETH_HLEN + IPV4_MAX_HLEN + TCP_HLEN;

/// IPv4 `frag_off` bits that mark a fragment: More Fragments and the offset.
pub const IP_MF_OFFSET_MASK: u16 = 0x3fff;
/// ICMP echo reply.
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMP echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP destination unreachable (includes "fragmentation needed").
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMP parameter problem.
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// Offset of the IPv4 header checksum in the frame.
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
/// Offset of the IPv4 source address in the frame.
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
/// Offset of the IPv4 destination address in the frame.
pub const IP_DST_OFF: usize = ETH_HLEN + 16;

/// Offset of the source address inside an IPv4 header (e.g. a quoted one).
pub const QUOTED_SRC: usize = 12;
/// Offset of the destination address inside an IPv4 header.
pub const QUOTED_DST: usize = 16;
/// Offset of the header checksum inside an IPv4 header.
pub const QUOTED_CSUM: usize = 10;

/// Offset of the source port inside a TCP/UDP header.
pub const L4_SPORT_OFF: usize = 0;
/// Offset of the destination port inside a TCP/UDP header.
pub const L4_DPORT_OFF: usize = 2;
/// Offset of the ICMP echo identifier inside the ICMP header.
pub const ICMP_ID_OFF: usize = 4;
/// Offset of the TCP checksum inside the TCP header.
pub const TCP_CSUM_OFF: usize = 16;
/// Offset of the TCP data offset / flags word inside the TCP header.
pub const TCP_FLAGS_WORD_OFF: usize = 12;
/// Offset of the UDP checksum inside the UDP header.
pub const UDP_CSUM_OFF: usize = 6;
/// Offset of the ICMP checksum inside the ICMP header.
pub const ICMP_CSUM_OFF: usize = 2;

/// Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// EtherType (network order).
    pub proto: u16,
}

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and IHL (low nibble).
    pub version_ihl: u8,
    /// Type of service.
    pub tos: u8,
    /// Total length.
    pub tot_len: u16,
    /// Identification.
    pub id: u16,
    /// Flags and fragment offset.
    pub frag_off: u16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol.
    pub proto: u8,
    /// Header checksum.
    pub check: u16,
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
}

/// The ports at the start of a TCP or UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ports {
    /// Source port.
    pub source: u16,
    /// Destination port.
    pub dest: u16,
}

/// TCP data offset (high nibble) and flags.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpFlagsWord {
    /// Data offset in 32-bit words (high nibble), reserved bits.
    pub doff_res: u8,
    /// Flags (CWR ECE URG ACK PSH RST SYN FIN).
    pub flags: u8,
}

/// ICMP echo header (also the first 8 bytes of any ICMP message).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpEcho {
    /// Type.
    pub ty: u8,
    /// Code.
    pub code: u8,
    /// Checksum.
    pub check: u16,
    /// Identifier.
    pub id: u16,
    /// Sequence number.
    pub seq: u16,
}

// SAFETY: `#[repr(C)]` structs of integers and byte arrays whose sizes (asserted
// below) leave no padding; every bit pattern is valid.
unsafe impl Wire for EthHdr {}
// SAFETY: as above.
unsafe impl Wire for Ipv4Hdr {}
// SAFETY: as above.
unsafe impl Wire for Ports {}
// SAFETY: as above.
unsafe impl Wire for TcpFlagsWord {}
// SAFETY: as above.
unsafe impl Wire for IcmpEcho {}

const _: () = assert!(core::mem::size_of::<EthHdr>() == ETH_HLEN);
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == IPV4_MIN_HLEN);
const _: () = assert!(core::mem::size_of::<Ports>() == 4);
const _: () = assert!(core::mem::size_of::<TcpFlagsWord>() == 2);
const _: () = assert!(core::mem::size_of::<IcmpEcho>() == ICMP_ECHO_HLEN);
