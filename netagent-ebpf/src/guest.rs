//! The guest's frames at the host veth (`veth_ingress`, source 169.254.0.21,
//! checked and handed over untouched by `tap_ingress`). The slot is known here,
//! so this is where they are parsed and counted and the guest's MACs learned.
//!
//! Fast path first: a packet of a flow the guest opened to the world finds its
//! `NAT_EGRESS` entry (keyed by the slot's vpeer address, unique per slot, so
//! guests that all use 169.254.0.21 never share a flow) marked `STATE_GUEST`,
//! and is touched, translated to the uplink address and port in one rewrite,
//! counted and sent out by the uplink (`fwd::to_uplink`) — no `HOST_FLOWS`,
//! policy or `LOCAL_ADDRS` lookup. That is sound because such an entry is only
//! made for a destination that passed the egress policy and is not a host
//! address, and the agent removes the entries a later change of the policy or
//! of `LOCAL_ADDRS` denies (`netagent::bpf::purge`). (A tuple that is both a
//! masquerade flow and the reply of a host → guest flow, which one guest stack
//! cannot make, goes by its masquerade entry.)
//!
//! Everything else: replies of host → guest flows always pass and leave as
//! HostIP; what the guest opens meets the egress policy (`policy`), then goes
//! to the host stack as the vpeer address when it stays on the host (tracked in
//! `HOST_FLOWS` as the host's replies will arrive, so `slot_ingress` tells them
//! from traffic for the slot namespace's own stack), else is masqueraded with a
//! newly allocated port (`STATE_GUEST`).

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use netagent_common::{
    Counter, DropReason, FLOW_SCOPE_GUEST, FlowKey, GUEST_IP_BYTES, GUEST_L2_F_VALID, GlobalConfig,
    GuestL2, STATE_GUEST, SlotInfo,
};

use crate::{
    conntrack::{self, Dir},
    csum, fwd,
    maps::{GUEST_L2, config, global_config, has_uplink},
    nat::{self, Known},
    parse::{self, IP_SRC_OFF, Ipv4, L4, L4Kind},
    policy,
    stats::{self, Drop},
    veth::{masquerade, masquerade_icmp_error, snat_and_send, stays_on_host},
};

#[inline(always)]
pub fn from_guest(ctx: &TcContext, ip: &Ipv4, slot: u32, info: &SlotInfo) -> Result<i32, Drop> {
    let drop = |reason| Drop::new(slot, reason);
    let l4 = parse::l4(ctx, ip).map_err(drop)?;
    learn_guest_l2(ctx, slot);
    let known = match established(ctx, ip, &l4, slot, info)? {
        Fast::Sent(verdict) => return Ok(verdict),
        Fast::Slow(known) => known,
    };
    let Some(cfg) = config() else {
        count_from_guest(ctx, slot);
        return Ok(TC_ACT_OK as i32);
    };
    if l4.kind == L4Kind::IcmpError {
        return icmp_error(ctx, cfg, ip, slot, info);
    }
    if l4.translatable() {
        let original = FlowKey::new(ip.daddr, info.host_ip, l4.dport, l4.sport, ip.proto);
        if let Some(flow) = conntrack::host_flow_lookup(&original) {
            conntrack::touch(flow, &l4, Dir::Reply, conntrack::now_ns());
            count_from_guest(ctx, slot);
            return to_host(ctx, &l4, ip, info, info.host_ip).map_err(drop);
        }
    }
    // Everything else the guest opens itself.
    let host = policy::is_host_addr(cfg, ip.daddr);
    policy::egress_check(slot, ip.daddr, host).map_err(drop)?;
    count_from_guest(ctx, slot);
    // (A bool, not an `Option` of the config: LLVM turns a filtered map
    // pointer into masking it, which the verifier refuses.)
    if stays_on_host(ip.daddr, host) || !has_uplink(cfg) {
        // For the host stack (or no uplink to masquerade to): as the vpeer, and
        // tracked so the host's replies find their way back to the guest.
        if l4.translatable() && l4.kind != L4Kind::IcmpEchoReply {
            let reply = FlowKey::new(ip.daddr, info.vpeer_ip, l4.dport, l4.sport, ip.proto);
            let guest = u32::from_ne_bytes(GUEST_IP_BYTES);
            conntrack::host_flow_track(
                &reply,
                &l4,
                Dir::Original,
                slot,
                guest,
                conntrack::now_ns(),
            )
            .map_err(drop)?;
        }
        return to_host(ctx, &l4, ip, info, info.vpeer_ip).map_err(drop);
    }
    masquerade(ctx, ip, &l4, slot, info.vpeer_ip, cfg, STATE_GUEST, known)
}

/// What the fast path did with a guest packet.
enum Fast {
    /// Translated and sent: the verdict.
    Sent(i32),
    /// Not an established guest flow to the world: the slow path's job, with
    /// what the fast path learned of the flow's masquerade entry.
    Slow(Known),
}

/// The fast path (module doc) for a packet of an established guest flow to the
/// world.
#[inline(always)]
fn established(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    slot: u32,
    info: &SlotInfo,
) -> Result<Fast, Drop> {
    // An echo reply never opens a masquerade flow, even where its key (id 0)
    // equals an echo request's.
    if !l4.translatable() || l4.kind == L4Kind::IcmpEchoReply {
        return Ok(Fast::Slow(Known::NotLookedUp));
    }
    let Some(cfg) = global_config() else {
        return Ok(Fast::Slow(Known::NotLookedUp));
    };
    let key = FlowKey::new(info.vpeer_ip, ip.daddr, l4.sport, l4.dport, ip.proto);
    let Some(entry) = nat::snat_v4_lookup(&key) else {
        return Ok(Fast::Slow(Known::Absent));
    };
    // SAFETY: pointer from a successful lookup, valid for this run; copied at once.
    let (state, nat_ip, nat_port) = unsafe { ((*entry).state, (*entry).addr, (*entry).port) };
    if state & STATE_GUEST == 0 {
        // The slow path looks the entry up again rather than keep a pointer
        // across its other lookups (a rare case: the guest's packet on a flow
        // of the slot's own stack).
        return Ok(Fast::Slow(Known::NotLookedUp));
    }
    let now = conntrack::now_ns();
    conntrack::touch(entry, l4, Dir::Original, now);
    count_from_guest(ctx, slot);
    snat_and_send(ctx, ip, l4, nat_ip, nat_port, cfg, now)
        .map(Fast::Sent)
        .map_err(|reason| Drop::new(slot, reason))
}

/// Counts a guest frame that passed the checks.
#[inline(always)]
fn count_from_guest(ctx: &TcContext, slot: u32) {
    stats::count_packet(slot, Counter::FROM_GUEST_PACKETS, ctx.len());
}

/// Source := `new_src`, Ethernet addresses as if the frame came over the veth
/// (`eth0` → host veth), and up the host stack.
#[inline(always)]
fn to_host(
    ctx: &TcContext,
    l4: &L4,
    ip: &Ipv4,
    info: &SlotInfo,
    new_src: u32,
) -> Result<i32, DropReason> {
    csum::ipv4_addr_rewrite(ctx, l4, ip.l4_off(), IP_SRC_OFF, ip.saddr, new_src)?;
    fwd::set_macs(ctx, &info.eth0_mac, &info.veth_mac)?;
    Ok(TC_ACT_OK as i32)
}

/// An ICMP error the guest sent about a datagram it received: the quote has the
/// guest's address as destination. For a host → guest flow both the outer
/// source and the quoted destination become HostIP; for the host stack the vpeer
/// address; for a masqueraded flow (e.g. "port unreachable" for a late reply)
/// the uplink address, with the quoted destination port back to the allocated
/// port, and out on the uplink. Errors about anything else that would leave the
/// host cannot be translated and are dropped. Except for host → guest flows,
/// the egress policy applies to the error's destination.
#[inline(always)]
fn icmp_error(
    ctx: &TcContext,
    cfg: &GlobalConfig,
    ip: &Ipv4,
    slot: u32,
    info: &SlotInfo,
) -> Result<i32, Drop> {
    let drop = |reason| Drop::new(slot, reason);
    let guest = u32::from_ne_bytes(GUEST_IP_BYTES);
    let outer = L4 {
        kind: L4Kind::IcmpError,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };
    let quote = parse::icmp_error_quote(ctx, ip);
    let host = policy::is_host_addr(cfg, ip.daddr);
    let uplink = !stays_on_host(ip.daddr, host) && has_uplink(cfg);
    // The original direction of a host → guest flow the quote belongs to.
    let host_flow = match &quote {
        Ok(q) if q.daddr == guest => conntrack::host_flow_lookup(&FlowKey::new(
            q.saddr,
            info.host_ip,
            q.sport,
            q.dport,
            q.proto,
        ))
        .is_some(),
        _ => false,
    };
    if !host_flow {
        policy::egress_check(slot, ip.daddr, host).map_err(drop)?;
    }
    count_from_guest(ctx, slot);
    if let Ok(q) = &quote
        && q.daddr == guest
    {
        let new_src = if host_flow {
            info.host_ip
        } else if !uplink {
            info.vpeer_ip
        } else {
            0
        };
        if new_src != 0 {
            csum::quoted_addr_rewrite(ctx, q, q.check, csum::QUOTED_DST, q.daddr, new_src)
                .map_err(drop)?;
            return to_host(ctx, &outer, ip, info, new_src).map_err(drop);
        }
    }
    if !uplink {
        return to_host(ctx, &outer, ip, info, info.vpeer_ip).map_err(drop);
    }
    let q = quote.map_err(drop)?;
    if q.daddr != guest {
        return Err(drop(DropReason::UnsupportedProtocol));
    }
    masquerade_icmp_error(ctx, cfg, ip, &q, slot, info.vpeer_ip, FLOW_SCOPE_GUEST)
}

/// Records the guest's MAC and the MAC it sends to (as its frame arrived from the
/// TAP, untouched), so `slot_ingress` can address frames to the guest itself.
/// Writes only when they change.
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
