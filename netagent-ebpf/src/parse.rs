//! Packet parsing: the ONLY place that reads packet bytes. Every access goes through
//! `ptr_at`, which checks the bounds against `data_end` before handing out a
//! pointer. Parsing copies what the programs need into plain values, so nothing
//! else holds a packet pointer across a helper call that may move the data.

use core::mem;

use aya_ebpf::programs::TcContext;
use netagent_common::{DropReason, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// EtherType of IPv4, as it sits in the packet (network order).
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Shortest IPv4 header.
const IPV4_MIN_HLEN: usize = 20;
/// Longest IPv4 header (IHL 15).
const IPV4_MAX_HLEN: usize = 60;
/// TCP header without options, the largest L4 header we read.
const TCP_HLEN: usize = 20;
/// UDP header.
const UDP_HLEN: usize = 8;
/// ICMP echo header (type, code, checksum, identifier, sequence).
const ICMP_ECHO_HLEN: usize = 8;
/// Everything any program reads: made linear with one `bpf_skb_pull_data` when the
/// linear part of the skb is shorter.
const MAX_PARSE_LEN: usize = ETH_HLEN + IPV4_MAX_HLEN + TCP_HLEN;

/// IPv4 `frag_off` bits that mark a fragment: More Fragments and the offset.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
/// ICMP echo reply.
const ICMP_ECHO_REPLY: u8 = 0;
/// ICMP echo request.
const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP destination unreachable (includes "fragmentation needed").
const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP time exceeded.
const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMP parameter problem.
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Bytes of the quoted datagram's L4 header every ICMP error carries (RFC 792).
const ICMP_QUOTED_L4: usize = 8;

/// Offset of the IPv4 header checksum.
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
/// Offset of the IPv4 source address.
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
/// Offset of the IPv4 destination address.
pub const IP_DST_OFF: usize = ETH_HLEN + 16;

// Wire layout: every field is named even where unused.
#[allow(dead_code)]
#[repr(C)]
#[derive(Clone, Copy)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    proto: u16,
}

// Wire layout: every field is named even where unused.
#[allow(dead_code)]
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

// Wire layout: every field is named even where unused.
#[allow(dead_code)]
#[repr(C)]
#[derive(Clone, Copy)]
struct Ports {
    source: u16,
    dest: u16,
}

// Wire layout: every field is named even where unused.
#[allow(dead_code)]
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpFlagsWord {
    doff_res: u8,
    flags: u8,
}

// Wire layout: every field is named even where unused.
#[allow(dead_code)]
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpEcho {
    ty: u8,
    code: u8,
    check: u16,
    id: u16,
    seq: u16,
}

/// A pointer to a `T` at `off` bytes into the packet, if the whole `T` lies before
/// `data_end`.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Reads a `T` at `off`, bounds-checked.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let p = ptr_at::<T>(ctx, off)?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` are inside the
    // packet; `T` is a plain integer/byte struct for which any bit pattern is valid.
    Some(unsafe { p.read_unaligned() })
}

/// Makes the headers we read linear when the skb's linear part is shorter than both
/// the packet and `MAX_PARSE_LEN` (a TAP or GSO skb may carry headers in frags).
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    let linear = ctx.data_end().saturating_sub(ctx.data());
    let want = core::cmp::min(ctx.len() as usize, MAX_PARSE_LEN);
    if linear < want {
        // A failed pull leaves the skb as it was; the bounds checks below then
        // report the packet as malformed.
        let _ = ctx.pull_data(want as u32);
    }
}

/// Destination and source MAC of the frame.
#[inline(always)]
pub fn eth_addrs(ctx: &TcContext) -> Option<([u8; 6], [u8; 6])> {
    let eth: EthHdr = load(ctx, 0)?;
    Some((eth.dst, eth.src))
}

/// The destination address of an IPv4 header that may be malformed (network
/// order), if the frame is long enough to hold it.
#[inline(always)]
pub fn raw_daddr(ctx: &TcContext) -> Option<u32> {
    load(ctx, IP_DST_OFF)
}

/// The IPv4 header fields the programs use, network order.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
    /// IP protocol.
    pub proto: u8,
    /// IHL: header length in 32-bit words (5..=15).
    ihl: u8,
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
}

/// Parses Ethernet and IPv4. `Ok(None)` for anything that is not IPv4 (ARP,
/// IPv6, VLAN); `Err(Malformed)` for a truncated or inconsistent IPv4 header
/// (version, IHL below 5, total length shorter than the header or longer than
/// the packet).
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Result<Option<Ipv4>, DropReason> {
    pull_headers(ctx);
    let eth: EthHdr = match load(ctx, 0) {
        Some(eth) => eth,
        None => return Ok(None), // not even an Ethernet header: nothing of ours
    };
    if eth.proto != ETH_P_IP_BE {
        return Ok(None);
    }
    let ip: Ipv4Hdr = load(ctx, ETH_HLEN).ok_or(DropReason::Malformed)?;
    if ip.version_ihl >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let hlen = usize::from(ip.version_ihl & 0x0f) * 4;
    if hlen < IPV4_MIN_HLEN {
        return Err(DropReason::Malformed);
    }
    let tot_len = usize::from(u16::from_be(ip.tot_len));
    if tot_len < hlen || ETH_HLEN + tot_len > ctx.len() as usize {
        return Err(DropReason::Malformed);
    }
    // The options must be readable too, so a datagram with IHL > 5 whose options
    // are cut off is malformed rather than silently misparsed.
    if ptr_at::<u8>(ctx, ETH_HLEN + hlen - 1).is_none() {
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

/// What kind of L4 header the packet has, which decides where its checksum and
/// "ports" sit.
#[derive(Clone, Copy, PartialEq, Eq)]
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
    /// problem) quoting a datagram: see `icmp_error_inner`.
    IcmpError,
    /// Any other ICMP message: checksum at 2, no pseudo-header, no ports.
    IcmpOther,
    /// Any other protocol: left alone above L3.
    Other,
}

/// The L4 fields the programs use; ports in network order.
#[derive(Clone, Copy)]
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

/// Offset of the ICMP echo identifier inside the ICMP header.
pub const ICMP_ID_OFF: usize = 4;
/// Offset of the source port inside a TCP/UDP header.
pub const L4_SPORT_OFF: usize = 0;
/// Offset of the destination port inside a TCP/UDP header.
pub const L4_DPORT_OFF: usize = 2;

/// Parses the L4 header of a non-fragment. `Err(Fragment)` for fragments (their
/// L4 header is absent or incomplete), `Err(Malformed)` when the header is cut
/// off by the packet or by the IP total length.
#[inline(always)]
pub fn l4(ctx: &TcContext, ip: &Ipv4) -> Result<L4, DropReason> {
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
            let ports: Ports = load(ctx, off).ok_or(DropReason::Malformed)?;
            let flags: TcpFlagsWord = load(ctx, off + 12).ok_or(DropReason::Malformed)?;
            // The checksum field must be present as well.
            load::<u16>(ctx, off + 16).ok_or(DropReason::Malformed)?;
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
            let ports: Ports = load(ctx, off).ok_or(DropReason::Malformed)?;
            load::<u16>(ctx, off + 6).ok_or(DropReason::Malformed)?;
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
            let icmp: IcmpEcho = load(ctx, off).ok_or(DropReason::Malformed)?;
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

/// The datagram quoted by an ICMP error: its IPv4 header and the first 8 bytes of
/// its L4 header. Addresses and ports in network order, as in `L4` (an echo
/// request's identifier is `sport`, an echo reply's `dport`).
#[derive(Clone, Copy)]
pub struct Quoted {
    /// Quoted source address.
    pub saddr: u32,
    /// Quoted destination address.
    pub daddr: u32,
    /// Quoted protocol.
    pub proto: u8,
    /// Quoted IHL in 32-bit words.
    ihl: u8,
    /// Quoted IPv4 header checksum.
    pub check: u16,
    /// Quoted source port (or echo request identifier).
    pub sport: u16,
    /// Quoted destination port (or echo reply identifier).
    pub dport: u16,
    /// Which of the quoted L4 kinds this is (Tcp, Udp, IcmpEchoRequest/Reply).
    pub kind: L4Kind,
    /// IHL of the outer header, to recompute offsets.
    outer_ihl: u8,
}

/// Offset of the quoted IPv4 header inside an ICMP error (after type, code,
/// checksum and the 4 unused/MTU bytes).
const ICMP_ERROR_HLEN: usize = 8;

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

/// Parses the datagram an ICMP error quotes (`l4.kind == IcmpError`). Only
/// TCP, UDP and ICMP echo can belong to a translated flow; anything else, or a
/// quote cut short, is `Err(UnsupportedProtocol)` / `Err(Malformed)`.
#[inline(always)]
pub fn icmp_error_quote(ctx: &TcContext, ip: &Ipv4) -> Result<Quoted, DropReason> {
    let off = ip.l4_off() + ICMP_ERROR_HLEN;
    if off + IPV4_MIN_HLEN > ip.end {
        return Err(DropReason::Malformed);
    }
    let q: Ipv4Hdr = load(ctx, off).ok_or(DropReason::Malformed)?;
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
            let ports: Ports = load(ctx, l4_off).ok_or(DropReason::Malformed)?;
            quoted.sport = ports.source;
            quoted.dport = ports.dest;
            quoted.kind = if q.proto == IPPROTO_TCP {
                L4Kind::Tcp
            } else {
                L4Kind::Udp
            };
        }
        IPPROTO_ICMP => {
            let icmp: IcmpEcho = load(ctx, l4_off).ok_or(DropReason::Malformed)?;
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
