//! netagent's TC datapath: four ingress programs, one per hook of a slot's path.
//! The entry points only map a program's result to a verdict; the work lives in
//! one file per concern (see each module).
#![no_std]
#![no_main]
// `nat`'s port cursors: the target has no atomic read-modify-write methods,
// only the intrinsics.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod addr;
mod conntrack;
mod csum;
mod fwd;
mod guest;
mod l2;
mod maps;
mod nat;
mod next_hop;
mod parse;
mod policy;
mod ratelimit;
mod slot;
mod stats;
mod tap;
mod uplink;
mod veth;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// Guest → anywhere, on `tap0` (every slot namespace): the guest's frames
/// checked, then to the host veth.
#[classifier]
pub fn tap_ingress(ctx: TcContext) -> i32 {
    match tap::try_tap_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(d) => stats::drop_packet(d.slot, d.reason),
    }
}

/// Guest and slot → world or host, on the host veth (agent namespace).
#[classifier]
pub fn veth_ingress(ctx: TcContext) -> i32 {
    match veth::try_veth_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(d) => stats::drop_packet(d.slot, d.reason),
    }
}

/// World → slot replies, on the uplink (agent namespace).
#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    match uplink::try_uplink_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(d) => stats::drop_packet(d.slot, d.reason),
    }
}

/// Anything → guest, on `eth0` (every slot namespace).
#[classifier]
pub fn slot_ingress(ctx: TcContext) -> i32 {
    match slot::try_slot_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(d) => stats::drop_packet(d.slot, d.reason),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
