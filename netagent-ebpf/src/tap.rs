//! `tap_ingress` (on `tap0`, every slot namespace, one shared instance): the
//! first hook the guest's frames meet, and the guest is untrusted. The slot is
//! the one whose `tap0` has this ifindex (`SLOT_TAP_IFINDEX_BASE + slot`,
//! checked against `SlotInfo::tap_ifindex`); a TAP of no live slot drops
//! everything (`SpoofedSource`, counted for slot 0). Then, in order:
//! - ARP must come from the guest: Ethernet/IPv4, sender IP 169.254.0.21,
//!   sender MAC the frame's source, and that the slot's guest MAC when one is
//!   set (`SpoofedArp`); it goes to the slot namespace, which answers;
//! - any other frame's Ethernet source must be the slot's guest MAC, when one
//!   is set (`SpoofedSource`);
//! - IPv6 (`Ipv6`) and every other EtherType (`UnsupportedEthertype`) drop;
//! - IPv4 must be well-formed (`Malformed`) and from 169.254.0.21
//!   (`SpoofedSource`);
//! - the slot's bandwidth limit (`RateLimited`) applies to every frame that
//!   passes;
//! - traffic to the TAP's /30 (the gateway 169.254.0.22) goes to the slot
//!   namespace; the rest goes untouched to the host veth's ingress with
//!   `bpf_redirect_peer(SLOT_ETH0_IFINDEX)`, where `veth_ingress` applies the
//!   egress policy and translates it.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use netagent_common::{
    DropReason, GUEST_IP_BYTES, SLOT_ETH0_IFINDEX, SLOT_F_ACTIVE, SLOT_F_GUEST_MAC,
    SLOT_TAP_IFINDEX_BASE, SlotInfo,
};

use crate::{
    fwd,
    l2::{self, ArpError},
    maps::SLOTS,
    parse, ratelimit,
    stats::Drop,
};

/// The guest's /30 (169.254.0.20/30): addresses on the TAP link itself.
const TAP_NET: u32 = u32::from_ne_bytes([169, 254, 0, 20]);
/// Mask of the /30, network order.
const TAP_MASK: u32 = u32::from_ne_bytes([255, 255, 255, 252]);

/// Where a frame that passed the checks goes.
enum Dest {
    /// The slot namespace's own stack (ARP, the gateway).
    SlotNs,
    /// The host veth (everything leaving the /30).
    Host,
}

#[inline(always)]
pub fn try_tap_ingress(ctx: &TcContext) -> Result<i32, Drop> {
    // SAFETY: reading a field of the context the kernel passed in.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let slot = ifindex.wrapping_sub(SLOT_TAP_IFINDEX_BASE);
    let Some(info) = SLOTS
        .get(slot)
        .filter(|i| i.flags & SLOT_F_ACTIVE != 0 && i.tap_ifindex == ifindex)
    else {
        return Err(Drop::new(0, DropReason::SpoofedSource));
    };
    let dest = check(ctx, info).map_err(|reason| Drop::new(slot, reason))?;
    if !ratelimit::within_limit(slot, ctx.len()) {
        return Err(Drop::new(slot, DropReason::RateLimited));
    }
    Ok(match dest {
        Dest::SlotNs => TC_ACT_OK as i32,
        Dest::Host => fwd::redirect_peer(SLOT_ETH0_IFINDEX),
    })
}

/// The guest's frame against the rules of the module doc.
#[inline(always)]
fn check(ctx: &TcContext, info: &SlotInfo) -> Result<Dest, DropReason> {
    let guest = u32::from_ne_bytes(GUEST_IP_BYTES);
    // Pulls the headers into the linear part, so the Ethernet read below is
    // direct.
    let ip = parse::ipv4(ctx);
    let (_, src) = parse::eth_addrs(ctx).ok_or(DropReason::Malformed)?;
    let mac_ok = info.flags & SLOT_F_GUEST_MAC == 0 || src == info.guest_mac;
    let ethertype = match ip {
        Ok(Some(_)) | Err(_) => None,
        Ok(None) => l2::ethertype(ctx),
    };
    if ethertype == Some(l2::ETH_P_ARP_BE) {
        let sender = l2::arp_sender(ctx).map_err(|e| match e {
            ArpError::Truncated => DropReason::Malformed,
            ArpError::NotEthernetIpv4 => DropReason::SpoofedArp,
        })?;
        if !mac_ok || sender.ip != guest || sender.mac != src {
            return Err(DropReason::SpoofedArp);
        }
        return Ok(Dest::SlotNs);
    }
    if !mac_ok {
        return Err(DropReason::SpoofedSource);
    }
    match ip? {
        Some(ip) => {
            if ip.saddr != guest {
                return Err(DropReason::SpoofedSource);
            }
            if ip.daddr & TAP_MASK == TAP_NET {
                return Ok(Dest::SlotNs);
            }
            Ok(Dest::Host)
        }
        None => match ethertype {
            Some(l2::ETH_P_IPV6_BE) => Err(DropReason::Ipv6),
            Some(_) => Err(DropReason::UnsupportedEthertype),
            None => Err(DropReason::Malformed),
        },
    }
}
