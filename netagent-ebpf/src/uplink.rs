//! `uplink_ingress` (on the uplink, agent namespace): replies to masqueraded
//! flows get their original port back and go straight to the slot's `eth0`
//! ingress with `bpf_redirect_peer(host veth)`: translated for the guest
//! (169.254.0.21, the guest's MACs, `TO_GUEST_MARK`) once its addresses are
//! known (and `CONFIG_F_TO_GUEST_MARK` says every `slot_ingress` knows the
//! mark), else to the vpeer address for `slot_ingress` to translate. Everything
//! else is the host's own traffic and passes untouched.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use netagent_common::{
    CONFIG_F_TO_GUEST_MARK, FlowKey, GUEST_IP_BYTES, GUEST_L2_F_VALID, GlobalConfig, TO_GUEST_MARK,
};

use crate::{
    conntrack::{self, Dir},
    csum::{self, PortField},
    fwd,
    maps::{GUEST_L2, global_config, slot_info},
    nat,
    parse::{self, IP_DST_OFF, Ipv4, L4Kind},
    stats::Drop,
};

#[inline(always)]
pub fn try_uplink_ingress(ctx: &TcContext) -> Result<i32, Drop> {
    let pass = Ok(TC_ACT_OK as i32);
    let Some(cfg) = global_config() else {
        return pass;
    };
    // Nothing here is dropped: a packet that is not ours, even a malformed one, is
    // the host's business.
    let Ok(Some(ip)) = parse::ipv4(ctx) else {
        return pass;
    };
    if ip.daddr != cfg.uplink_ip {
        return pass;
    }
    let Ok(l4) = parse::l4(ctx, &ip) else {
        return pass;
    };
    if l4.kind == L4Kind::IcmpError {
        return icmp_error(ctx, cfg, &ip);
    }
    if !l4.translatable() {
        return pass;
    }
    let port = u16::from_be(l4.dport);
    if port < cfg.port_min || port > cfg.port_max {
        return pass;
    }
    let key = FlowKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: l4.sport,
        dport: l4.dport,
        proto: ip.proto,
        _pad: [0; 3],
    };
    let Some(entry) = nat::rev_snat_v4_lookup(&key) else {
        return pass;
    };
    conntrack::touch(entry, &l4, Dir::Reply, conntrack::now_ns());
    // SAFETY: pointer from a successful lookup, valid for this run.
    let (slot, vpeer, orig_port) = unsafe { ((*entry).slot, (*entry).addr, (*entry).port) };
    let Some(info) = slot_info(slot) else {
        return pass;
    };
    let drop = |reason| Drop::new(slot, reason);
    // Once the guest's addresses are known (it has sent since the slot came
    // up), the reply is translated for the guest right here and `slot_ingress`
    // only passes it on (`TO_GUEST_MARK`); before, it goes to the vpeer address
    // and `slot_ingress` translates it again.
    let guest_l2 = if cfg.flags & CONFIG_F_TO_GUEST_MARK == 0 {
        None // an older slot_ingress may be on eth0 (an upgrade adopting slots)
    } else {
        match GUEST_L2.get(slot) {
            Some(l2) if l2.flags & GUEST_L2_F_VALID != 0 => Some((l2.gateway_mac, l2.guest_mac)),
            _ => None,
        }
    };
    let daddr = match guest_l2 {
        Some(_) => u32::from_ne_bytes(GUEST_IP_BYTES),
        None => vpeer,
    };
    csum::ipv4_addr_rewrite(ctx, &l4, ip.l4_off(), IP_DST_OFF, ip.daddr, daddr).map_err(drop)?;
    csum::l4_port_rewrite(
        ctx,
        &l4,
        ip.l4_off(),
        PortField::Destination,
        l4.dport,
        orig_port,
    )
    .map_err(drop)?;
    match guest_l2 {
        Some((gateway_mac, guest_mac)) => {
            fwd::set_macs(ctx, &gateway_mac, &guest_mac).map_err(drop)?;
            ctx.set_mark(TO_GUEST_MARK | slot);
        }
        None => fwd::set_macs(ctx, &info.veth_mac, &info.eth0_mac).map_err(drop)?,
    }
    Ok(fwd::redirect_peer(info.veth_ifindex))
}

/// An ICMP error about a masqueraded flow (e.g. "fragmentation needed", which
/// path-MTU discovery depends on): the quoted datagram is the one that left
/// through the masquerade, so it is looked up as the reply direction and both the
/// outer destination and the quoted source (address and port) are restored
/// before the error goes to the slot.
#[inline(always)]
fn icmp_error(ctx: &TcContext, cfg: &GlobalConfig, ip: &Ipv4) -> Result<i32, Drop> {
    let pass = Ok(TC_ACT_OK as i32);
    let Ok(q) = parse::icmp_error_quote(ctx, ip) else {
        return pass;
    };
    if q.saddr != cfg.uplink_ip
        || !matches!(q.kind, L4Kind::Tcp | L4Kind::Udp | L4Kind::IcmpEchoRequest)
    {
        return pass;
    }
    let port = u16::from_be(q.sport);
    if port < cfg.port_min || port > cfg.port_max {
        return pass;
    }
    // The reply-direction key of the quoted (outgoing) datagram.
    let key = FlowKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        _pad: [0; 3],
    };
    let Some(entry) = nat::rev_snat_v4_lookup(&key) else {
        return pass;
    };
    // SAFETY: pointer from a successful lookup, valid for this run.
    let (slot, vpeer, orig_port) = unsafe { ((*entry).slot, (*entry).addr, (*entry).port) };
    let Some(info) = slot_info(slot) else {
        return pass;
    };
    let drop = |reason| Drop::new(slot, reason);
    let outer = parse::L4 {
        kind: L4Kind::IcmpError,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };
    csum::ipv4_addr_rewrite(ctx, &outer, ip.l4_off(), IP_DST_OFF, ip.daddr, vpeer).map_err(drop)?;
    csum::quoted_addr_rewrite(ctx, &q, q.check, csum::QUOTED_SRC, q.saddr, vpeer).map_err(drop)?;
    csum::quoted_port_rewrite(ctx, &q, ip.l4_off(), PortField::Source, q.sport, orig_port)
        .map_err(drop)?;
    fwd::set_macs(ctx, &info.veth_mac, &info.eth0_mac).map_err(drop)?;
    Ok(fwd::redirect_peer(info.veth_ifindex))
}
