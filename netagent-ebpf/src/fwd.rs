//! Forwarding: Ethernet address rewrite and the redirect helpers.

use core::ptr;

use aya_ebpf::{
    helpers::generated::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use netagent_common::DropReason;

/// Writes destination and source MAC (the first 12 bytes of the frame).
#[inline(always)]
pub fn set_macs(ctx: &TcContext, src: &[u8; 6], dst: &[u8; 6]) -> Result<(), DropReason> {
    let macs: [u8; 12] = [
        dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], src[0], src[1], src[2], src[3], src[4],
        src[5],
    ];
    ctx.store(0, &macs, 0)
        .map_err(|_| DropReason::RewriteFailed)
}

/// Hands the packet to the ingress of `ifindex`'s veth peer (in the peer's
/// namespace) without a trip through the backlog queue. Returns the verdict
/// (`TC_ACT_REDIRECT`, or `TC_ACT_SHOT` for bad arguments).
#[inline(always)]
pub fn redirect_peer(ifindex: u32) -> i32 {
    // SAFETY: a plain helper call with scalar arguments.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
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
