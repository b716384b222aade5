//! `tap_ingress` (on `tap0`, slot namespace): frames the guest sends. Source
//! 169.254.0.21 becomes the vpeer address (the seed's SNAT), or HostIP when the
//! packet replies to a host → guest flow; then the frame is handed to the host
//! veth's ingress with `bpf_redirect_peer(eth0)`.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use netagent_common::{Counter, FlowKey, GUEST_IP_BYTES, GUEST_L2_F_VALID, GuestL2, TAP_IP_BYTES};

use crate::{
    addr::is_multicast_or_broadcast,
    conntrack::{self, Dir},
    csum, fwd,
    maps::{GUEST_L2, slot_by_netns},
    parse::{self, IP_SRC_OFF, L4Kind},
    stats::{self, Drop},
};

/// The guest's /30 (169.254.0.20/30): addresses on the TAP link itself.
const TAP_NET: u32 = u32::from_ne_bytes([169, 254, 0, 20]);
/// Mask of the /30, network order.
const TAP_MASK: u32 = u32::from_ne_bytes([255, 255, 255, 252]);

#[inline(always)]
pub fn try_tap_ingress(ctx: &TcContext) -> Result<i32, Drop> {
    let Some((slot, info)) = slot_by_netns(ctx) else {
        return Ok(TC_ACT_OK as i32);
    };
    let drop = |reason| Drop::new(slot, reason);
    let Some(ip) = parse::ipv4(ctx).map_err(drop)? else {
        return Ok(TC_ACT_OK as i32); // ARP, IPv6: the slot namespace answers
    };
    let guest = u32::from_ne_bytes(GUEST_IP_BYTES);
    if ip.daddr == u32::from_ne_bytes(TAP_IP_BYTES)
        || ip.saddr != guest
        || ip.daddr & TAP_MASK == TAP_NET
        || is_multicast_or_broadcast(ip.daddr)
    {
        return Ok(TC_ACT_OK as i32);
    }
    let l4 = parse::l4(ctx, &ip).map_err(drop)?;
    learn_guest_l2(ctx, slot);

    let mut new_src = info.vpeer_ip;
    if l4.kind == L4Kind::IcmpError {
        // An error about a datagram the guest received: it quotes that datagram
        // with the guest's address as destination, which gets translated along
        // with the outer source (to HostIP if it belongs to a host flow).
        if let Ok(q) = parse::icmp_error_quote(ctx, &ip)
            && q.daddr == guest
        {
            let original = FlowKey {
                saddr: q.saddr,
                daddr: info.host_ip,
                sport: q.sport,
                dport: q.dport,
                proto: q.proto,
                _pad: [0; 3],
            };
            if conntrack::host_flow_lookup(&original).is_some() {
                new_src = info.host_ip;
            }
            csum::quoted_addr_rewrite(ctx, &q, q.check, csum::QUOTED_DST, q.daddr, new_src)
                .map_err(drop)?;
        }
    } else if l4.translatable() {
        let original = FlowKey {
            saddr: ip.daddr,
            daddr: info.host_ip,
            sport: l4.dport,
            dport: l4.sport,
            proto: ip.proto,
            _pad: [0; 3],
        };
        if let Some(flow) = conntrack::host_flow_lookup(&original) {
            conntrack::touch(flow, &l4, Dir::Reply, conntrack::now_ns());
            new_src = info.host_ip;
        }
    }
    csum::ipv4_addr_rewrite(ctx, &l4, ip.l4_off(), IP_SRC_OFF, ip.saddr, new_src).map_err(drop)?;
    fwd::set_macs(ctx, &info.eth0_mac, &info.veth_mac).map_err(drop)?;
    stats::count_packet(slot, Counter::FROM_GUEST_PACKETS, ctx.len());
    Ok(fwd::redirect_peer(info.eth0_ifindex))
}

/// Records the guest's MAC and the MAC it sends to, so `slot_ingress` can address
/// frames to the guest itself. Writes only when they change.
#[inline(always)]
fn learn_guest_l2(ctx: &TcContext, slot: u32) {
    let Some((dst, src)) = parse::eth_addrs(ctx) else {
        return;
    };
    let Some(known) = GUEST_L2.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: pointer from a successful array lookup, valid for this run.
    let known = unsafe { &mut *known };
    if known.flags & GUEST_L2_F_VALID != 0 && known.guest_mac == src && known.gateway_mac == dst {
        return;
    }
    *known = GuestL2 {
        guest_mac: src,
        gateway_mac: dst,
        flags: GUEST_L2_F_VALID,
    };
}
