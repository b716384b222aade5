//! Ethernet and ARP fields of the guest's frames that `parse` does not hand
//! out: the EtherType of a non-IPv4 frame and the ARP sender. Read with
//! `bpf_skb_load_bytes` (`TcContext::load`, bounds-checked by the kernel): only
//! frames that are not IPv4 come here, so the helper call is off the hot path.

use aya_ebpf::programs::TcContext;

/// EtherType of ARP, as it sits in the packet (network order).
pub const ETH_P_ARP_BE: u16 = 0x0806u16.to_be();
/// EtherType of IPv6, network order.
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// Offset of the EtherType.
const ETH_PROTO_OFF: usize = 12;
/// Offset of the ARP header (after the Ethernet header).
const ARP_OFF: usize = 14;
/// ARP hardware type Ethernet, network order.
const ARPHRD_ETHER_BE: u16 = 1u16.to_be();
/// ARP protocol type IPv4, network order.
const ARP_PRO_IP_BE: u16 = 0x0800u16.to_be();

/// The EtherType, network order (`None`: shorter than an Ethernet header).
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Option<u16> {
    ctx.load::<u16>(ETH_PROTO_OFF).ok()
}

// Wire layout of an Ethernet/IPv4 ARP message: every field is named even where
// unused.
#[allow(dead_code)]
#[repr(C)]
#[derive(Clone, Copy)]
struct ArpEthIpv4 {
    htype: u16,
    ptype: u16,
    hlen: u8,
    plen: u8,
    oper: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// The sender of an ARP message.
#[derive(Clone, Copy)]
pub struct ArpSender {
    /// Sender hardware address.
    pub mac: [u8; 6],
    /// Sender protocol address, network order.
    pub ip: u32,
}

/// Why an ARP frame cannot be taken.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ArpError {
    /// Cut off before the end of an Ethernet/IPv4 ARP message.
    Truncated,
    /// Not Ethernet/IPv4 ARP (hardware or protocol type or address lengths).
    NotEthernetIpv4,
}

/// The sender of an Ethernet/IPv4 ARP message.
#[inline(always)]
pub fn arp_sender(ctx: &TcContext) -> Result<ArpSender, ArpError> {
    let arp: ArpEthIpv4 = ctx.load(ARP_OFF).map_err(|_| ArpError::Truncated)?;
    if arp.htype != ARPHRD_ETHER_BE || arp.ptype != ARP_PRO_IP_BE || arp.hlen != 6 || arp.plen != 4
    {
        return Err(ArpError::NotEthernetIpv4);
    }
    Ok(ArpSender {
        mac: arp.sha,
        ip: u32::from_ne_bytes(arp.spa),
    })
}
