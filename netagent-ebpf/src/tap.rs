//! `tap_ingress` (on `tap0`, every slot namespace, one shared instance): the
//! guest's IPv4 frames that leave its /30 go untouched to the host veth's ingress
//! with `bpf_redirect_peer(SLOT_ETH0_IFINDEX)` — `eth0` has that ifindex in every
//! slot namespace, so nothing here needs to know the slot. `veth_ingress` finds
//! the slot by the veth's ifindex and does the translation there.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use netagent_common::{GUEST_IP_BYTES, SLOT_ETH0_IFINDEX};

use crate::{addr::is_multicast_or_broadcast, fwd, parse};

/// The guest's /30 (169.254.0.20/30): addresses on the TAP link itself.
const TAP_NET: u32 = u32::from_ne_bytes([169, 254, 0, 20]);
/// Mask of the /30, network order.
const TAP_MASK: u32 = u32::from_ne_bytes([255, 255, 255, 252]);

#[inline(always)]
pub fn try_tap_ingress(ctx: &TcContext) -> i32 {
    match parse::ipv4(ctx) {
        // ARP, IPv6: the slot namespace answers.
        Ok(None) => return TC_ACT_OK as i32,
        Ok(Some(ip)) => {
            if ip.saddr != u32::from_ne_bytes(GUEST_IP_BYTES)
                || ip.daddr & TAP_MASK == TAP_NET
                || is_multicast_or_broadcast(ip.daddr)
            {
                // The gateway's own traffic, and sources that are not the
                // guest's: the slot namespace (which forwards nothing) decides.
                return TC_ACT_OK as i32;
            }
        }
        // A malformed IPv4 header: `veth_ingress` drops and counts it for the
        // slot (which is not known here).
        Err(_) => {}
    }
    fwd::redirect_peer(SLOT_ETH0_IFINDEX)
}
