//! Forwarding: Ethernet address rewrite, the redirect helpers, and the way out
//! by the uplink (`to_uplink`).

use core::{mem, ptr};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup},
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_change_type,
    },
    programs::TcContext,
};
use netagent_common::{CONFIG_F_UPLINK_PEER, DropReason, GlobalConfig, packet::PacketWrite};

use crate::{csum::DirectWriter, next_hop};

/// `AF_INET`, as `bpf_fib_lookup` wants the family.
const AF_INET: u8 = 2;
/// `PACKET_HOST`: a frame addressed to the receiving device.
const PACKET_HOST: u32 = 0;

/// The parts of a masqueraded packet the uplink's next hop depends on (all in
/// network order, as they are on the wire after the rewrite).
pub struct Egress {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// The IP datagram's total length (host order).
    pub tot_len: u16,
    /// Now, by the flows' coarse clock (`conntrack::now_ns`, read once per packet).
    pub now: u64,
}

/// Sends a masqueraded packet out by the uplink (from `veth_ingress`: the MACs
/// are written directly, see `csum::DirectWriter`).
///
/// With `CONFIG_F_UPLINK_PEER` (the uplink is a veth whose peer is in another
/// namespace) the next hop comes from `bpf_fib_lookup` (the kernel's routes and
/// neighbours, as an output lookup on the uplink), cached per CPU and
/// destination (address, port, protocol) for a moment (`next_hop`); when it is
/// on the uplink with a resolved neighbour, both MACs are written and the frame goes straight to the
/// peer's ingress (`bpf_redirect_peer`): no transmit queue and no backlog pass,
/// which on a veth uplink is one softirq round per packet less. In every other
/// case — an uplink of another kind, forwarding off on the uplink (which
/// `bpf_fib_lookup` requires), a neighbour not yet resolved, a route by another
/// device, a packet over the MTU — `bpf_redirect_neigh` transmits it and the
/// kernel resolves the next hop itself. Returns the verdict.
#[inline(always)]
pub fn to_uplink(ctx: &TcContext, cfg: &GlobalConfig, e: &Egress) -> i32 {
    if cfg.flags & CONFIG_F_UPLINK_PEER != 0 {
        // SAFETY: the context's `__sk_buff`, valid for this run.
        let gso_size = unsafe { (*ctx.skb.skb).gso_size };
        let hop = next_hop::Lookup::new(e, gso_size);
        if let Some((smac, dmac)) = hop.cached()
            && set_macs_direct(ctx, &smac, &dmac).is_ok()
        {
            return redirect_peer_as_host(ctx, cfg.uplink_ifindex);
        }
        // SAFETY: `bpf_fib_lookup` is plain old data; all zeros is a valid value
        // (and means "no TOS, no VLAN, no mark").
        let mut p: bpf_fib_lookup = unsafe { mem::zeroed() };
        p.family = AF_INET;
        p.l4_protocol = e.proto;
        p.sport = e.sport;
        p.dport = e.dport;
        p.ifindex = cfg.uplink_ifindex;
        // With the length given, the lookup checks it against the route's MTU
        // itself; without it (a GSO packet, whose segments are what must fit) the
        // helper checks the skb against the device's MTU, a second look-up of the
        // device by index.
        if gso_size == 0 {
            p.__bindgen_anon_1.tot_len = e.tot_len;
        }
        p.__bindgen_anon_3.ipv4_src = e.saddr;
        p.__bindgen_anon_4.ipv4_dst = e.daddr;
        // SAFETY: the skb is this program's context; `p` is a valid, writable
        // struct of the size passed.
        let rc = unsafe {
            fib_lookup(
                ctx.skb.skb as *mut _,
                &mut p,
                mem::size_of::<bpf_fib_lookup>() as i32,
                BPF_FIB_LOOKUP_OUTPUT,
            )
        };
        if rc == BPF_FIB_LKUP_RET_SUCCESS as i64
            && p.ifindex == cfg.uplink_ifindex
            && set_macs_direct(ctx, &p.smac, &p.dmac).is_ok()
        {
            hop.remember(&p);
            return redirect_peer_as_host(ctx, cfg.uplink_ifindex);
        }
    }
    redirect_neigh(cfg.uplink_ifindex)
}

/// The first 12 bytes of a frame: destination, then source MAC.
#[inline(always)]
fn frame_macs(src: &[u8; 6], dst: &[u8; 6]) -> [u8; 12] {
    [
        dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], src[0], src[1], src[2], src[3], src[4],
        src[5],
    ]
}

/// Writes destination and source MAC (the first 12 bytes of the frame).
#[inline(always)]
pub fn set_macs(ctx: &TcContext, src: &[u8; 6], dst: &[u8; 6]) -> Result<(), DropReason> {
    ctx.store(0, &frame_macs(src, dst), 0)
        .map_err(|_| DropReason::RewriteFailed)
}

/// `set_macs` with a direct store (`csum::DirectWriter`, for `veth_ingress`).
#[inline(always)]
fn set_macs_direct(ctx: &TcContext, src: &[u8; 6], dst: &[u8; 6]) -> Result<(), DropReason> {
    DirectWriter(ctx).store(0, &frame_macs(src, dst))
}

/// Hands the packet to the ingress of `ifindex`'s veth peer (in the peer's
/// namespace) without a trip through the backlog queue. Returns the verdict
/// (`TC_ACT_REDIRECT`, or `TC_ACT_SHOT` for bad arguments).
#[inline(always)]
pub fn redirect_peer(ifindex: u32) -> i32 {
    // SAFETY: a plain helper call with scalar arguments.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}

/// `redirect_peer` for a frame the caller addressed to the peer's MAC: the
/// frame keeps the packet type its first device gave it, and the peer's IP
/// layer drops anything but one addressed to it, so it is made `PACKET_HOST`.
#[inline(always)]
pub fn redirect_peer_as_host(ctx: &TcContext, ifindex: u32) -> i32 {
    // SAFETY: the context's `__sk_buff`, valid for this run.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        // SAFETY: a helper call on this program's context.
        unsafe { bpf_skb_change_type(ctx.skb.skb as *mut _, PACKET_HOST) };
    }
    redirect_peer(ifindex)
}

/// Transmits the packet on `ifindex` after a FIB lookup and neighbour resolution
/// done by the kernel (fills in both MACs). Returns the verdict.
#[inline(always)]
pub fn redirect_neigh(ifindex: u32) -> i32 {
    // SAFETY: a helper call; a null `params` with length 0 asks the kernel to look
    // up the next hop itself.
    unsafe { bpf_redirect_neigh(ifindex, ptr::null_mut(), 0, 0) as i32 }
}

/// Transmits the packet on `ifindex` as it is (the caller wrote the Ethernet
/// header). Returns the verdict.
#[inline(always)]
pub fn redirect(ifindex: u32) -> i32 {
    // SAFETY: a plain helper call with scalar arguments.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
