//! Packet parsing: the eBPF side of `netagent_common::packet`, where the parser
//! itself lives (shared with userspace and fuzzed there, see its module docs
//! for every outcome). This file gives it the packet: `Skb` implements
//! `PacketRead` with direct packet access bounds-checked against `data_end` —
//! the only direct packet reads — and makes the headers linear first.
//! Parsing copies what the programs need into plain values, so nothing else
//! holds a packet pointer across a helper call that may move the data.

use core::mem;

use aya_ebpf::programs::TcContext;
use netagent_common::{
    DropReason,
    packet::{
        self, PacketRead, Wire,
        header::{ETH_HLEN, ICMP_QUOTED_L4, IPV4_MAX_HLEN, IPV4_MIN_HLEN, MAX_PARSE_LEN, TCP_HLEN},
    },
};

pub use netagent_common::packet::{
    Ipv4, L4, L4Kind, Quoted,
    header::{IP_DST_OFF, IP_SRC_OFF},
};

/// The packet of a TC program, as the shared parser reads it.
pub struct Skb<'a>(pub &'a TcContext);

impl PacketRead for Skb<'_> {
    /// A copy of the `T` at `off` bytes into the packet, if the whole `T` lies
    /// before `data_end` (the comparison the verifier needs to see).
    #[inline(always)]
    fn load<T: Wire>(&self, off: usize) -> Option<T> {
        let start = self.0.data();
        let end = self.0.data_end();
        if start + off + mem::size_of::<T>() > end {
            return None;
        }
        // SAFETY: the check above put `size_of::<T>()` bytes at `start + off`
        // inside the packet; `T: Wire` is valid for any bit pattern.
        Some(unsafe { ((start + off) as *const T).read_unaligned() })
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.0.len() as usize
    }
}

/// Makes the first `want` bytes of the packet (or all of it, if shorter)
/// linear when the skb's linear part is shorter (a TAP or GSO skb may carry
/// headers in frags). Only what is read is pulled: pulling payload into the
/// linear part costs a copy per packet, often a new head (a TCP segment's
/// head has no room after its headers, and TCP keeps a clone of it).
#[inline(always)]
fn pull_to(ctx: &TcContext, want: usize) {
    let linear = ctx.data_end().saturating_sub(ctx.data());
    let want = core::cmp::min(ctx.len() as usize, want);
    if linear < want {
        // A failed pull leaves the skb as it was; the bounds checks then report
        // the packet as malformed.
        let _ = ctx.pull_data(want as u32);
    }
}

/// Makes Ethernet, the IPv4 header (options included) and the 20 bytes of L4
/// header the programs read linear.
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    pull_to(ctx, ETH_HLEN + IPV4_MIN_HLEN + TCP_HLEN);
    // IP options: the IHL says how much more.
    if let Some(vihl) = Skb(ctx).load::<u8>(ETH_HLEN) {
        let ihl = usize::from(vihl & 0x0f) * 4;
        if ihl > IPV4_MIN_HLEN {
            pull_to(
                ctx,
                core::cmp::min(ETH_HLEN + ihl + TCP_HLEN, MAX_PARSE_LEN),
            );
        }
    }
}

/// Destination and source MAC of the frame.
#[inline(always)]
pub fn eth_addrs(ctx: &TcContext) -> Option<([u8; 6], [u8; 6])> {
    packet::eth_addrs(&Skb(ctx))
}

/// The destination address of an IPv4 header that may be malformed (network
/// order), if the frame is long enough to hold it.
#[inline(always)]
pub fn raw_daddr(ctx: &TcContext) -> Option<u32> {
    packet::raw_daddr(&Skb(ctx))
}

/// Parses Ethernet and IPv4 (`packet::ipv4`): `Ok(None)` for anything that is
/// not IPv4, `Err(Malformed)` for a truncated or inconsistent IPv4 header.
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Result<Option<Ipv4>, DropReason> {
    pull_headers(ctx);
    packet::ipv4(&Skb(ctx))
}

/// Parses the L4 header of a non-fragment (`packet::l4`): `Err(Fragment)`,
/// `Err(Malformed)`, or its kind and ports.
#[inline(always)]
pub fn l4(ctx: &TcContext, ip: &Ipv4) -> Result<L4, DropReason> {
    packet::l4(&Skb(ctx), ip)
}

/// Parses the datagram an ICMP error quotes (`packet::icmp_error_quote`).
#[inline(always)]
pub fn icmp_error_quote(ctx: &TcContext, ip: &Ipv4) -> Result<Quoted, DropReason> {
    // The quote: ICMP header, the quoted IPv4 header (options included) and
    // the 8 bytes of its L4 header.
    pull_to(
        ctx,
        ip.l4_off() + ICMP_QUOTED_L4 + IPV4_MAX_HLEN + ICMP_QUOTED_L4,
    );
    packet::icmp_error_quote(&Skb(ctx), ip)
}
