//! `slot_ingress` (on `eth0`, every slot namespace, one shared instance):
//! a reply `uplink_ingress` already translated for the guest (`TO_GUEST_MARK`,
//! which names the slot) goes on to `tap0` untouched. Other packets are found
//! a slot by their destination (`ADDR_SLOTS`):
//! - to HostIP: for the guest; the destination becomes 169.254.0.21 and the
//!   flow is tracked (`HOST_FLOWS`), so the guest's replies leave as HostIP
//!   again;
//! - to the vpeer address: the host's side of a flow the guest opened to the
//!   host (tracked in `HOST_FLOWS` by `veth_ingress`) goes to the guest
//!   likewise; anything else (a flow the host opens to the vpeer address,
//!   replies to the slot namespace's own flows) is the slot namespace's and
//!   passes untouched. Until `CONFIG_F_TO_GUEST_MARK` is set (an upgrade
//!   adopting slots), replies of guest flows may still come unmarked to the
//!   vpeer address, so every packet for it goes to the guest, as before.
//!
//! A packet for the guest goes to `tap0`: with `bpf_redirect` once
//! `veth_ingress` has learned the guest's MAC, with `bpf_redirect_neigh` (the
//! kernel resolves it) before that. When `tap0` is a veth to a guest namespace
//! (`SLOT_F_GUEST_VETH`), a frame with the guest's MAC goes straight to the
//! peer's ingress (`bpf_redirect_peer`), as a TAP's frame goes straight to the
//! VMM: no transmit on `tap0` and no second backlog pass in the guest's
//! namespace.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use netagent_common::{
    CONFIG_F_TO_GUEST_MARK, Counter, DropReason, FlowKey, GUEST_IP_BYTES, GUEST_L2_F_VALID,
    SLOT_F_GUEST_VETH, SlotInfo, TO_GUEST_MARK, TO_GUEST_MARK_MASK, TO_GUEST_MARK_NEIGH,
    TO_GUEST_MARK_SLOT,
};

use crate::{
    conntrack::{self, Dir},
    csum, fwd,
    maps::{GUEST_L2, config, slot_by_addr, slot_info},
    parse::{self, IP_DST_OFF, Ipv4, L4Kind},
    stats::{self, Drop},
};

#[inline(always)]
pub fn try_slot_ingress(ctx: &TcContext) -> Result<i32, Drop> {
    // SAFETY: reading a field of the context the kernel passed in.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & TO_GUEST_MARK_MASK == TO_GUEST_MARK {
        return Ok(pass_translated(ctx, mark));
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
    if !to_host_ip && replies_marked() {
        return to_vpeer(ctx, &ip, slot, info);
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
        let key = FlowKey::new(ip.saddr, ip.daddr, l4.sport, l4.dport, ip.proto);
        conntrack::host_flow_track(&key, &l4, Dir::Original, slot, guest, conntrack::now_ns())
            .map_err(drop)?;
    }
    csum::ipv4_addr_rewrite(ctx, &l4, ip.l4_off(), IP_DST_OFF, ip.daddr, guest).map_err(drop)?;
    to_guest(ctx, slot, info).map_err(drop)
}

/// Whether `CONFIG_F_TO_GUEST_MARK` is set (every reply of a guest flow comes
/// marked). A bool, not a filtered `Option` of the config: see `guest`.
#[inline(always)]
fn replies_marked() -> bool {
    match config() {
        Some(cfg) => cfg.flags & CONFIG_F_TO_GUEST_MARK != 0,
        None => false,
    }
}

/// A packet for the vpeer address of `slot` once every reply of a guest flow
/// comes marked (module doc): the host's side of a guest → host flow, and an
/// ICMP error about one of the guest's datagrams to the host, go to the guest;
/// everything else is the slot namespace's and passes untouched.
#[inline(always)]
fn to_vpeer(ctx: &TcContext, ip: &Ipv4, slot: u32, info: &SlotInfo) -> Result<i32, Drop> {
    let pass = Ok(TC_ACT_OK as i32);
    let drop = |reason| Drop::new(slot, reason);
    let Ok(l4) = parse::l4(ctx, ip) else {
        return pass; // the slot namespace's stack judges it
    };
    let guest = u32::from_ne_bytes(GUEST_IP_BYTES);
    if l4.kind == L4Kind::IcmpError {
        let Ok(q) = parse::icmp_error_quote(ctx, ip) else {
            return pass;
        };
        // The quote is a datagram the guest sent to the host as the vpeer: its
        // flow is keyed as the host's side of it arrives.
        let key = FlowKey::new(q.daddr, q.saddr, q.dport, q.sport, q.proto);
        if q.saddr != ip.daddr || conntrack::host_flow_lookup(&key).is_none() {
            return pass;
        }
        csum::quoted_addr_rewrite(ctx, &q, q.check, csum::QUOTED_SRC, q.saddr, guest)
            .map_err(drop)?;
    } else {
        if !l4.translatable() {
            return pass;
        }
        let key = FlowKey::new(ip.saddr, ip.daddr, l4.sport, l4.dport, ip.proto);
        let Some(flow) = conntrack::host_flow_lookup(&key) else {
            return pass;
        };
        conntrack::touch(flow, &l4, Dir::Reply, conntrack::now_ns());
    }
    csum::ipv4_addr_rewrite(ctx, &l4, ip.l4_off(), IP_DST_OFF, ip.daddr, guest).map_err(drop)?;
    to_guest(ctx, slot, info).map_err(drop)
}

/// Counts a packet translated for the guest of `slot` and sends it to `tap0`.
/// With the guest's addresses known, the frame is addressed here and skips the
/// kernel's route and neighbour lookup.
#[inline(always)]
fn to_guest(ctx: &TcContext, slot: u32, info: &SlotInfo) -> Result<i32, DropReason> {
    stats::count_packet(slot, Counter::TO_GUEST_PACKETS, ctx.len());
    if let Some(l2) = GUEST_L2.get(slot)
        && l2.flags & GUEST_L2_F_VALID != 0
    {
        fwd::set_macs(ctx, &l2.gateway_mac, &l2.guest_mac)?;
        if info.flags & SLOT_F_GUEST_VETH != 0 {
            return Ok(fwd::redirect_peer_as_host(ctx, info.tap_ifindex));
        }
        return Ok(fwd::redirect(info.tap_ifindex));
    }
    Ok(fwd::redirect_neigh(info.tap_ifindex))
}

/// A reply `uplink_ingress` already translated for the guest of the slot its
/// `mark` names (`TO_GUEST_MARK`): counted and sent on to `tap0` as it is, by
/// `bpf_redirect_neigh` when the mark says the guest's MACs were not known
/// (`TO_GUEST_MARK_NEIGH`). The mark is cleared first, so the guest's side
/// never sees it. (A slot deleted meanwhile has no `tap0` left: the packet is
/// dropped.)
#[inline(always)]
fn pass_translated(ctx: &TcContext, mark: u32) -> i32 {
    ctx.set_mark(0);
    let slot = mark & TO_GUEST_MARK_SLOT;
    let Some(info) = slot_info(slot) else {
        return TC_ACT_SHOT as i32;
    };
    stats::count_packet(slot, Counter::TO_GUEST_PACKETS, ctx.len());
    if mark & TO_GUEST_MARK_NEIGH != 0 {
        fwd::redirect_neigh(info.tap_ifindex)
    } else if info.flags & SLOT_F_GUEST_VETH != 0 {
        fwd::redirect_peer_as_host(ctx, info.tap_ifindex)
    } else {
        fwd::redirect(info.tap_ifindex)
    }
}
