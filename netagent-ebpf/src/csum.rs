//! Address and port rewrites: the eBPF side of `netagent_common::packet::rewrite`,
//! which decides what a rewrite touches (shared with userspace and fuzzed
//! there). Here `SkbWriter` applies it with `bpf_skb_store_bytes` and the
//! `bpf_l3_csum_replace` / `bpf_l4_csum_replace` helpers, which know the skb's
//! checksum state (none, partial for offload, complete) and keep it consistent,
//! which a hand-rolled update could not.

use aya_ebpf::{
    bindings::{BPF_F_MARK_ENFORCE, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use core::mem;

use netagent_common::{
    DropReason,
    packet::{
        CsumZero, FieldSize, L4Csum, PacketWrite, Wire, csum::csum_replace4, header::IP_SRC_OFF,
        rewrite,
    },
};

use crate::parse::{L4, Quoted};

pub use netagent_common::packet::{
    PortField,
    header::{QUOTED_DST, QUOTED_SRC},
};

/// The packet of a TC program, as the shared rewrites write it.
struct SkbWriter<'a>(&'a TcContext);

impl PacketWrite for SkbWriter<'_> {
    #[inline(always)]
    fn store<T: Wire>(&mut self, off: usize, value: &T) -> Result<(), DropReason> {
        self.0
            .store(off, value, 0)
            .map_err(|_| DropReason::RewriteFailed)
    }

    #[inline(always)]
    fn l3_csum_replace4(&mut self, off: usize, from: u32, to: u32) -> Result<(), DropReason> {
        self.0
            .l3_csum_replace(off, u64::from(from), u64::from(to), 4)
            .map_err(|_| DropReason::RewriteFailed)
    }

    #[inline(always)]
    fn l4_csum_replace(
        &mut self,
        csum: &L4Csum,
        from: u32,
        to: u32,
        size: FieldSize,
    ) -> Result<(), DropReason> {
        let mut flags = size as u64;
        if csum.pseudo {
            flags |= u64::from(BPF_F_PSEUDO_HDR);
        }
        match csum.zero {
            CsumZero::AsComputed => {}
            CsumZero::UdpNone => flags |= u64::from(BPF_F_MARK_MANGLED_0),
            CsumZero::NeverZero => {
                flags |= u64::from(BPF_F_MARK_MANGLED_0) | u64::from(BPF_F_MARK_ENFORCE)
            }
        }
        self.0
            .l4_csum_replace(csum.off, u64::from(from), u64::from(to), flags)
            .map_err(|_| DropReason::RewriteFailed)
    }
}

/// The packet of a TC program written directly: stores and the IPv4 header
/// checksum (always a full checksum, so the shared `csum_replace4` applies)
/// with direct packet access, bounds-checked against `data_end`; only the L4
/// checksum goes through `bpf_l4_csum_replace`, which knows the skb's checksum
/// state. Each store is one instruction instead of a helper call.
///
/// A program that writes the packet directly gets an unclone prologue from the
/// verifier: a cloned skb's linear part is made private
/// (`bpf_skb_pull_data(skb, 0)`) before the program runs, and the packet is
/// dropped if that fails. So only `veth_ingress`, which sees nothing but slot
/// traffic, uses it; `uplink_ingress` also sees the host's own packets (cloned
/// whenever a packet socket listens on the uplink) and keeps the helpers.
pub struct DirectWriter<'a>(pub &'a TcContext);

impl PacketWrite for DirectWriter<'_> {
    #[inline(always)]
    fn store<T: Wire>(&mut self, off: usize, value: &T) -> Result<(), DropReason> {
        let start = self.0.data();
        if start + off + mem::size_of::<T>() > self.0.data_end() {
            return Err(DropReason::RewriteFailed);
        }
        // SAFETY: the check above put `size_of::<T>()` bytes at `start + off`
        // inside the packet, which the verifier's prologue made writable.
        unsafe { ((start + off) as *mut T).write_unaligned(*value) };
        Ok(())
    }

    #[inline(always)]
    fn l3_csum_replace4(&mut self, off: usize, from: u32, to: u32) -> Result<(), DropReason> {
        let start = self.0.data();
        if start + off + mem::size_of::<u16>() > self.0.data_end() {
            return Err(DropReason::RewriteFailed);
        }
        let check = (start + off) as *mut u16;
        // SAFETY: as in `store`; the checksum as it sits in the packet, like
        // `from` and `to`.
        unsafe { check.write_unaligned(csum_replace4(check.read_unaligned(), from, to)) };
        Ok(())
    }

    #[inline(always)]
    fn l4_csum_replace(
        &mut self,
        csum: &L4Csum,
        from: u32,
        to: u32,
        size: FieldSize,
    ) -> Result<(), DropReason> {
        SkbWriter(self.0).l4_csum_replace(csum, from, to, size)
    }
}

/// The masquerade's source rewrite (`ipv4_addr_rewrite` of the source, then
/// `l4_port_rewrite` of the source port) with `DirectWriter`.
#[inline(always)]
pub fn source_rewrite_direct(
    ctx: &TcContext,
    l4: &L4,
    l4_off: usize,
    (old_ip, new_ip): (u32, u32),
    (old_port, new_port): (u16, u16),
) -> Result<(), DropReason> {
    let mut w = DirectWriter(ctx);
    rewrite::ipv4_addr_rewrite(&mut w, l4, l4_off, IP_SRC_OFF, old_ip, new_ip)?;
    rewrite::l4_port_rewrite(&mut w, l4, l4_off, PortField::Source, old_port, new_port)
}

/// Rewrites the IPv4 address at `addr_off` (source or destination) from `old` to
/// `new` (both network order), fixing the IPv4 header checksum and, for TCP and
/// UDP, the L4 checksum's pseudo-header part.
#[inline(always)]
pub fn ipv4_addr_rewrite(
    ctx: &TcContext,
    l4: &L4,
    l4_off: usize,
    addr_off: usize,
    old: u32,
    new: u32,
) -> Result<(), DropReason> {
    rewrite::ipv4_addr_rewrite(&mut SkbWriter(ctx), l4, l4_off, addr_off, old, new)
}

/// Rewrites a port (or the ICMP echo identifier) from `old` to `new` (network
/// order), fixing the L4 checksum.
#[inline(always)]
pub fn l4_port_rewrite(
    ctx: &TcContext,
    l4: &L4,
    l4_off: usize,
    field: PortField,
    old: u16,
    new: u16,
) -> Result<(), DropReason> {
    rewrite::l4_port_rewrite(&mut SkbWriter(ctx), l4, l4_off, field, old, new)
}

/// Rewrites an address of the datagram quoted by an ICMP error (`field`:
/// `QUOTED_SRC` or `QUOTED_DST`) and its header checksum `check` with it.
/// Returns the quoted header's new checksum.
#[inline(always)]
pub fn quoted_addr_rewrite(
    ctx: &TcContext,
    q: &Quoted,
    check: u16,
    field: usize,
    old: u32,
    new: u32,
) -> Result<u16, DropReason> {
    rewrite::quoted_addr_rewrite(&mut SkbWriter(ctx), q, check, field, old, new)
}

/// Rewrites a port (or echo identifier) of the datagram quoted by an ICMP error,
/// fixing the outer ICMP checksum at `outer_l4_off + 2`.
#[inline(always)]
pub fn quoted_port_rewrite(
    ctx: &TcContext,
    q: &Quoted,
    outer_l4_off: usize,
    field: PortField,
    old: u16,
    new: u16,
) -> Result<(), DropReason> {
    rewrite::quoted_port_rewrite(&mut SkbWriter(ctx), q, outer_l4_off, field, old, new)
}
