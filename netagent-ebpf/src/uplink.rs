//! `uplink_ingress` (on the uplink, agent namespace): replies to masqueraded
//! flows get their vpeer address and original port back and go straight to the
//! slot's `eth0` ingress with `bpf_redirect_peer(host veth)`. Everything else is
//! the host's own traffic and passes untouched.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use netagent_common::{FlowKey, GlobalConfig};

use crate::{
    conntrack::{self, Dir},
    csum::{self, PortField},
    fwd,
    maps::{global_config, slot_info},
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
    csum::ipv4_addr_rewrite(ctx, &l4, ip.l4_off(), IP_DST_OFF, ip.daddr, vpeer).map_err(drop)?;
    csum::l4_port_rewrite(
        ctx,
        &l4,
        ip.l4_off(),
        PortField::Destination,
        l4.dport,
        orig_port,
    )
    .map_err(drop)?;
    fwd::set_macs(ctx, &info.veth_mac, &info.eth0_mac).map_err(drop)?;
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
