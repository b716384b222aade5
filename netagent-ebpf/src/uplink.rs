//! `uplink_ingress` (on the uplink, agent namespace): replies to masqueraded
//! flows get their original port back and go straight to the slot's `eth0`
//! ingress with `bpf_redirect_peer(host veth)`. A guest flow's reply (and an
//! ICMP error about one) is translated for the guest here (169.254.0.21, the
//! guest's MACs once known) and marked `TO_GUEST_MARK`, so `slot_ingress` only
//! passes it on; a flow of the slot namespace's own stack (`STATE_SLOT_NS`)
//! gets the vpeer address, unmarked, for that stack. (Until
//! `CONFIG_F_TO_GUEST_MARK` says every `slot_ingress` knows the mark, every
//! reply goes to the vpeer address for `slot_ingress` to translate.)
//! Everything else is the host's own traffic and passes untouched.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use netagent_common::{
    CONFIG_F_TO_GUEST_MARK, DropReason, FlowKey, GUEST_IP_BYTES, GUEST_L2_F_VALID, GlobalConfig,
    STATE_SLOT_NS, SlotInfo, TO_GUEST_MARK, TO_GUEST_MARK_NEIGH,
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
    let key = FlowKey::new(ip.saddr, ip.daddr, l4.sport, l4.dport, ip.proto);
    let Some(entry) = nat::rev_snat_v4_lookup(&key) else {
        return pass;
    };
    conntrack::touch(entry, &l4, Dir::Reply, conntrack::now_ns());
    // SAFETY: pointer from a successful lookup, valid for this run.
    let (slot, vpeer, orig_port, state) =
        unsafe { ((*entry).slot, (*entry).addr, (*entry).port, (*entry).state) };
    let Some(info) = slot_info(slot) else {
        return pass;
    };
    let drop = |reason| Drop::new(slot, reason);
    let to = ToSlot::of(cfg, slot, state);
    csum::ipv4_addr_rewrite(ctx, &l4, ip.l4_off(), IP_DST_OFF, ip.daddr, to.daddr(vpeer))
        .map_err(drop)?;
    csum::l4_port_rewrite(
        ctx,
        &l4,
        ip.l4_off(),
        PortField::Destination,
        l4.dport,
        orig_port,
    )
    .map_err(drop)?;
    to.hand_over(ctx, info, slot).map_err(drop)
}

/// Who a reply of a masqueraded flow is for, and how it reaches them.
enum ToSlot {
    /// The guest (a guest flow, with `CONFIG_F_TO_GUEST_MARK`): translated to
    /// 169.254.0.21 here and marked for `slot_ingress`, which only passes it
    /// on; addressed to the guest's MACs when they are known, else marked
    /// `TO_GUEST_MARK_NEIGH` for `slot_ingress` to let the kernel resolve them.
    Guest { macs: Option<([u8; 6], [u8; 6])> },
    /// The vpeer address: a flow of the slot namespace's own stack, which
    /// gets it unmarked; or any flow while an older `slot_ingress` may be on a
    /// slot's `eth0` (no `CONFIG_F_TO_GUEST_MARK`: an upgrade adopting slots),
    /// which translates it for the guest itself.
    Vpeer,
}

impl ToSlot {
    /// Where a reply of the flow of `slot` with the `STATE_*` bits `state` goes.
    #[inline(always)]
    fn of(cfg: &GlobalConfig, slot: u32, state: u32) -> ToSlot {
        if state & STATE_SLOT_NS != 0 || cfg.flags & CONFIG_F_TO_GUEST_MARK == 0 {
            return ToSlot::Vpeer;
        }
        let macs = match GUEST_L2.get(slot) {
            Some(l2) if l2.flags & GUEST_L2_F_VALID != 0 => Some((l2.gateway_mac, l2.guest_mac)),
            _ => None,
        };
        ToSlot::Guest { macs }
    }

    /// The destination address the reply gets (`vpeer`: the flow's).
    #[inline(always)]
    fn daddr(&self, vpeer: u32) -> u32 {
        match self {
            ToSlot::Guest { .. } => u32::from_ne_bytes(GUEST_IP_BYTES),
            ToSlot::Vpeer => vpeer,
        }
    }

    /// Addresses and marks the translated reply and hands it to the ingress of
    /// the slot's `eth0`.
    #[inline(always)]
    fn hand_over(&self, ctx: &TcContext, info: &SlotInfo, slot: u32) -> Result<i32, DropReason> {
        match self {
            ToSlot::Guest {
                macs: Some((gateway_mac, guest_mac)),
            } => {
                fwd::set_macs(ctx, gateway_mac, guest_mac)?;
                ctx.set_mark(TO_GUEST_MARK | slot);
            }
            ToSlot::Guest { macs: None } => {
                fwd::set_macs(ctx, &info.veth_mac, &info.eth0_mac)?;
                ctx.set_mark(TO_GUEST_MARK | TO_GUEST_MARK_NEIGH | slot);
            }
            ToSlot::Vpeer => fwd::set_macs(ctx, &info.veth_mac, &info.eth0_mac)?,
        }
        Ok(fwd::redirect_peer(info.veth_ifindex))
    }
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
    let key = FlowKey::new(q.daddr, q.saddr, q.dport, q.sport, q.proto);
    let Some(entry) = nat::rev_snat_v4_lookup(&key) else {
        return pass;
    };
    // SAFETY: pointer from a successful lookup, valid for this run.
    let (slot, vpeer, orig_port, state) =
        unsafe { ((*entry).slot, (*entry).addr, (*entry).port, (*entry).state) };
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
    let to = ToSlot::of(cfg, slot, state);
    let daddr = to.daddr(vpeer);
    csum::ipv4_addr_rewrite(ctx, &outer, ip.l4_off(), IP_DST_OFF, ip.daddr, daddr).map_err(drop)?;
    csum::quoted_addr_rewrite(ctx, &q, q.check, csum::QUOTED_SRC, q.saddr, daddr).map_err(drop)?;
    csum::quoted_port_rewrite(ctx, &q, ip.l4_off(), PortField::Source, q.sport, orig_port)
        .map_err(drop)?;
    to.hand_over(ctx, info, slot).map_err(drop)
}
