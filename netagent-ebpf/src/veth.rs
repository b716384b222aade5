//! `veth_ingress` (on the slot's host veth, agent namespace): the slot is the
//! one of this veth, read off its ifindex (`HOST_VETH_INDEX_BASE + (k << 15) +
//! slot`, checked against the slot's `veth_ifindex`) or, for a veth that got
//! another index, from `VETH_SLOTS`. The guest's frames, checked and handed
//! over untouched by `tap_ingress`, take `guest`'s fast path (established
//! flows) or meet the egress policy, and are translated there; packets of the
//! slot namespace's own stack (source vpeer) to the world are masqueraded
//! here, as flows of their own (`FLOW_SCOPE_SLOT_NS`) whose replies
//! `uplink_ingress` hands back to that stack. Both get the uplink address and
//! a port allocated here and leave by the uplink (`fwd::to_uplink`:
//! `bpf_redirect_neigh`, or straight into a veth uplink's peer). Everything
//! else (traffic to host addresses, ARP) goes up the host stack.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use netagent_common::{
    Counter, DropReason, FLOW_SCOPE_GUEST, FLOW_SCOPE_SLOT_NS, FlowKey, GUEST_IP_BYTES,
    GlobalConfig,
};

use crate::{
    addr::is_multicast_or_broadcast,
    conntrack::{self, Dir},
    csum::{self, PortField},
    fwd, guest,
    maps::{global_config, slot_by_veth},
    nat::{self, Known},
    parse::{self, IP_SRC_OFF, Ipv4, L4, L4Kind, Quoted},
    policy,
    stats::{self, Drop},
};

#[inline(always)]
pub fn try_veth_ingress(ctx: &TcContext) -> Result<i32, Drop> {
    // SAFETY: reading a field of the context the kernel passed in.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some((slot, info)) = slot_by_veth(ifindex) else {
        return Ok(TC_ACT_OK as i32);
    };
    let drop = |reason| Drop::new(slot, reason);
    let Some(ip) = parse::ipv4(ctx).map_err(drop)? else {
        return Ok(TC_ACT_OK as i32);
    };
    if ip.saddr == u32::from_ne_bytes(GUEST_IP_BYTES) {
        return guest::from_guest(ctx, &ip, slot, info);
    }
    if ip.saddr != info.vpeer_ip {
        return Ok(TC_ACT_OK as i32);
    }
    let Some(cfg) = global_config() else {
        return Ok(TC_ACT_OK as i32);
    };
    if stays_on_host(ip.daddr, policy::is_host_addr(cfg, ip.daddr)) {
        return Ok(TC_ACT_OK as i32);
    }
    let l4 = parse::l4(ctx, &ip).map_err(drop)?;
    if l4.kind == L4Kind::IcmpError {
        return icmp_error(ctx, cfg, &ip, slot);
    }
    masquerade(
        ctx,
        &ip,
        &l4,
        slot,
        info.vpeer_ip,
        cfg,
        0,
        Known::NotLookedUp,
    )
}

/// Masquerades a packet of `slot` toward the world: the flow is keyed by the
/// slot's vpeer address (unique per slot, whatever the packet's source — the
/// guest's 169.254.0.21 or the vpeer itself) and whose it is, the source
/// becomes the uplink address and an allocated port in one rewrite, and the
/// packet leaves by the uplink. `guest` is `STATE_GUEST` for the guest's
/// packets (they passed the egress policy; the flow's entry gets it), else 0:
/// a flow of the slot namespace's own stack (`FLOW_SCOPE_SLOT_NS`). `known`:
/// what the caller already knows of the flow's entry.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn masquerade(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    slot: u32,
    vpeer_ip: u32,
    cfg: &GlobalConfig,
    guest: u32,
    known: Known,
) -> Result<i32, Drop> {
    let drop = |reason| Drop::new(slot, reason);
    // Only what opens a flow can be masqueraded: an echo *reply* to the world
    // answers nothing the world could have sent (there is no inbound NAT).
    if !l4.translatable() || l4.kind == L4Kind::IcmpEchoReply {
        return Err(drop(DropReason::UnsupportedProtocol));
    }
    let scope = if guest != 0 {
        FLOW_SCOPE_GUEST
    } else {
        FLOW_SCOPE_SLOT_NS
    };
    let key = FlowKey::new(vpeer_ip, ip.daddr, l4.sport, l4.dport, ip.proto).in_scope(scope);
    let now = conntrack::now_ns();
    let (nat_ip, nat_port) = snat(&key, l4, slot, cfg, guest, known, now)?;
    snat_and_send(ctx, ip, l4, nat_ip, nat_port, cfg, now).map_err(drop)
}

/// Source := `nat_ip`:`nat_port` in one rewrite, and out by the uplink. `now`:
/// the packet's coarse clock reading (`conntrack::now_ns`).
#[inline(always)]
pub fn snat_and_send(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    nat_ip: u32,
    nat_port: u16,
    cfg: &GlobalConfig,
    now: u64,
) -> Result<i32, DropReason> {
    csum::source_rewrite_direct(
        ctx,
        l4,
        ip.l4_off(),
        (ip.saddr, nat_ip),
        (l4.sport, nat_port),
    )?;
    let egress = fwd::Egress {
        saddr: nat_ip,
        daddr: ip.daddr,
        proto: ip.proto,
        sport: nat_port,
        dport: l4.dport,
        tot_len: (ip.end - netagent_common::packet::header::ETH_HLEN) as u16,
        now,
    };
    Ok(fwd::to_uplink(ctx, cfg, &egress))
}

/// Whether slot traffic to `daddr` stays on the host (the host stack takes it)
/// instead of being masqueraded: the host's addresses (`host`, the caller's
/// `policy::is_host_addr` of it), multicast and broadcast.
#[inline(always)]
pub fn stays_on_host(daddr: u32, host: bool) -> bool {
    host || is_multicast_or_broadcast(daddr)
}

/// The masquerade address and port of the outgoing flow `key` (source = the
/// slot's vpeer address): the known entry, refreshed, or a newly allocated one
/// (counted as an allocation or a failure). `guest` (`STATE_GUEST` or 0) is
/// added to the entry's state; `known` spares a lookup the caller made already;
/// `now` is the packet's coarse clock reading.
#[inline(always)]
pub fn snat(
    key: &FlowKey,
    l4: &L4,
    slot: u32,
    cfg: &GlobalConfig,
    guest: u32,
    known: Known,
    now: u64,
) -> Result<(u32, u16), Drop> {
    match known.entry(key) {
        Some(entry) => {
            conntrack::touch(entry, l4, Dir::Original, now);
            // SAFETY: pointer from a successful lookup, valid for this run;
            // concurrent writers only race on plain integers.
            let e = unsafe { &mut *entry };
            if e.state & guest != guest {
                // A flow a version before `FLOW_SCOPE_SLOT_NS` made for the slot
                // namespace's own stack under the guest's key, which the guest's
                // packet, checked, now uses as well.
                e.state |= guest;
            }
            Ok((e.addr, e.port))
        }
        None => {
            let state = conntrack::state_bits(l4, Dir::Original) | guest;
            match nat::snat_v4_alloc(key, slot, cfg, state, now) {
                Ok(e) => {
                    stats::count(slot, Counter::NAT_ALLOCATIONS);
                    Ok((e.addr, e.port))
                }
                Err(reason) => {
                    stats::count(slot, Counter::NAT_FAILURES);
                    Err(Drop::new(slot, reason))
                }
            }
        }
    }
}

/// An ICMP error the slot namespace's own stack sent about a datagram of one of
/// its masqueraded flows (e.g. "port unreachable" for a late reply): it quotes
/// the reply as it was received, so the quoted destination (vpeer address and original port) goes back
/// to the uplink address and the allocated port along with the outer source.
/// Errors about anything else cannot be translated and are dropped.
#[inline(always)]
fn icmp_error(ctx: &TcContext, cfg: &GlobalConfig, ip: &Ipv4, slot: u32) -> Result<i32, Drop> {
    let drop = |reason| Drop::new(slot, reason);
    let q = parse::icmp_error_quote(ctx, ip).map_err(drop)?;
    if q.daddr != ip.saddr {
        return Err(drop(DropReason::UnsupportedProtocol));
    }
    masquerade_icmp_error(ctx, cfg, ip, &q, slot, ip.saddr, FLOW_SCOPE_SLOT_NS)
}

/// Sends an ICMP error about a masqueraded flow of `slot` to the world: the
/// quoted packet is a reply to the slot's flow keyed by `vpeer_ip` and
/// `scope` (the guest's or the slot namespace's); the outer
/// source and the quoted destination become the flow's uplink address and port.
/// Errors about flows that were never masqueraded are dropped.
#[inline(always)]
pub fn masquerade_icmp_error(
    ctx: &TcContext,
    cfg: &GlobalConfig,
    ip: &Ipv4,
    q: &Quoted,
    slot: u32,
    vpeer_ip: u32,
    scope: u8,
) -> Result<i32, Drop> {
    let drop = |reason| Drop::new(slot, reason);
    // The original-direction key of the flow the quoted reply belongs to.
    let key = FlowKey::new(vpeer_ip, q.saddr, q.dport, q.sport, q.proto).in_scope(scope);
    let Some(entry) = nat::snat_v4_lookup(&key) else {
        return Err(drop(DropReason::UnsupportedProtocol));
    };
    // SAFETY: pointer from a successful lookup, valid for this run.
    let (nat_ip, nat_port) = unsafe { ((*entry).addr, (*entry).port) };
    let outer = L4 {
        kind: L4Kind::IcmpError,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };
    csum::ipv4_addr_rewrite(ctx, &outer, ip.l4_off(), IP_SRC_OFF, ip.saddr, nat_ip)
        .map_err(drop)?;
    csum::quoted_addr_rewrite(ctx, q, q.check, csum::QUOTED_DST, q.daddr, nat_ip).map_err(drop)?;
    csum::quoted_port_rewrite(
        ctx,
        q,
        ip.l4_off(),
        PortField::Destination,
        q.dport,
        nat_port,
    )
    .map_err(drop)?;
    Ok(fwd::redirect_neigh(cfg.uplink_ifindex))
}
