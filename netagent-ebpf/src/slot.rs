//! `slot_ingress` (on `eth0`, every slot namespace, one shared instance):
//! a reply `uplink_ingress` already translated for the guest (`TO_GUEST_MARK`,
//! which names the slot) goes on to `tap0` untouched. Other
//! packets for a slot's vpeer address or HostIP are for that slot's guest (the
//! slot is found by the destination in `ADDR_SLOTS`). Their destination becomes 169.254.0.21 (HostIP
//! flows are tracked so the guest's replies leave as HostIP again) and they go to
//! `tap0`: with `bpf_redirect` once `veth_ingress` has learned the guest's MAC,
//! with `bpf_redirect_neigh` (the kernel resolves it) before that. When `tap0`
//! is a veth to a guest namespace (`SLOT_F_GUEST_VETH`), a frame with the
//! guest's MAC goes straight to the peer's ingress (`bpf_redirect_peer`), as a
//! TAP's frame goes straight to the VMM: no transmit on `tap0` and no second
//! backlog pass in the guest's namespace.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use netagent_common::{
    Counter, DropReason, FlowKey, GUEST_IP_BYTES, GUEST_L2_F_VALID, SLOT_F_GUEST_VETH,
    TO_GUEST_MARK, TO_GUEST_MARK_MASK,
};

use crate::{
    conntrack, csum, fwd,
    maps::{GUEST_L2, slot_by_addr, slot_info},
    parse::{self, IP_DST_OFF, L4Kind},
    stats::{self, Drop},
};

#[inline(always)]
pub fn try_slot_ingress(ctx: &TcContext) -> Result<i32, Drop> {
    // SAFETY: reading a field of the context the kernel passed in.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & TO_GUEST_MARK_MASK == TO_GUEST_MARK {
        return Ok(pass_translated(ctx, mark & !TO_GUEST_MARK_MASK));
    }
    let ip = match parse::ipv4(ctx) {
        Ok(Some(ip)) => ip,
        Ok(None) => return Ok(TC_ACT_OK as i32),
        // Dropped like every malformed IPv4 header here; counted for the slot
        // its destination names, if it can be read.
        Err(reason) => {
            let slot = parse::raw_daddr(ctx)
                .and_then(slot_by_addr)
                .map_or(0, |(slot, _)| slot);
            return Err(Drop::new(slot, reason));
        }
    };
    let Some((slot, info)) = slot_by_addr(ip.daddr) else {
        return Ok(TC_ACT_OK as i32);
    };
    let drop = |reason| Drop::new(slot, reason);
    let to_host_ip = ip.daddr == info.host_ip;
    if !to_host_ip && ip.daddr != info.vpeer_ip {
        return Ok(TC_ACT_OK as i32);
    }
    let l4 = parse::l4(ctx, &ip).map_err(drop)?;
    let guest = u32::from_ne_bytes(GUEST_IP_BYTES);
    if l4.kind == L4Kind::IcmpError {
        // An error about a datagram the guest sent (translated to this address on
        // the way out): the quoted source goes back to the guest as well, so the
        // guest's stack can match the error to its socket (path-MTU discovery).
        if let Ok(q) = parse::icmp_error_quote(ctx, &ip)
            && q.saddr == ip.daddr
        {
            csum::quoted_addr_rewrite(ctx, &q, q.check, csum::QUOTED_SRC, q.saddr, guest)
                .map_err(drop)?;
        }
    } else if to_host_ip {
        if !l4.translatable() {
            return Err(drop(DropReason::UnsupportedProtocol));
        }
        let key = FlowKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: l4.sport,
            dport: l4.dport,
            proto: ip.proto,
            _pad: [0; 3],
        };
        conntrack::host_flow_track(&key, &l4, slot, guest, conntrack::now_ns()).map_err(drop)?;
    }
    csum::ipv4_addr_rewrite(ctx, &l4, ip.l4_off(), IP_DST_OFF, ip.daddr, guest).map_err(drop)?;
    stats::count_packet(slot, Counter::TO_GUEST_PACKETS, ctx.len());
    // With the guest's addresses known, address the frame here and skip the
    // kernel's route and neighbour lookup.
    if let Some(l2) = GUEST_L2.get(slot)
        && l2.flags & GUEST_L2_F_VALID != 0
    {
        fwd::set_macs(ctx, &l2.gateway_mac, &l2.guest_mac).map_err(drop)?;
        if info.flags & SLOT_F_GUEST_VETH != 0 {
            return Ok(fwd::redirect_peer_as_host(ctx, info.tap_ifindex));
        }
        return Ok(fwd::redirect(info.tap_ifindex));
    }
    Ok(fwd::redirect_neigh(info.tap_ifindex))
}

/// A reply `uplink_ingress` already translated for the guest of `slot` and
/// addressed to it (`TO_GUEST_MARK`): counted and sent on to `tap0` as it is.
/// The mark is cleared first, so the guest's side never sees it. (A slot
/// deleted meanwhile has no `tap0` left: the packet is dropped.)
#[inline(always)]
fn pass_translated(ctx: &TcContext, slot: u32) -> i32 {
    ctx.set_mark(0);
    let Some(info) = slot_info(slot) else {
        return TC_ACT_SHOT as i32;
    };
    stats::count_packet(slot, Counter::TO_GUEST_PACKETS, ctx.len());
    if info.flags & SLOT_F_GUEST_VETH != 0 {
        fwd::redirect_peer_as_host(ctx, info.tap_ifindex)
    } else {
        fwd::redirect(info.tap_ifindex)
    }
}
