//! How the shared packet code reaches packet bytes. `PacketRead` hands out
//! bounds-checked copies of wire values at an offset; `PacketWrite` stores values
//! and applies the incremental checksum updates of the kernel's
//! `bpf_l3_csum_replace` / `bpf_l4_csum_replace`. The eBPF programs implement
//! both on the skb (direct packet access compared against `data_end`, and the
//! helpers); `[u8]` implements them in software (`slice`) for userspace, tests
//! and fuzzing, so every side runs the same parser and the same rewrite
//! decisions.

use crate::DropReason;

/// A plain wire value that may be copied out of (or into) packet bytes.
///
/// # Safety
///
/// Implementors are `Copy` types without padding for which every bit pattern is
/// a valid value (integers, byte arrays, `#[repr(C)]` structs of those).
pub unsafe trait Wire: Copy {}

// SAFETY: plain integers and byte arrays: no padding, every bit pattern valid.
unsafe impl Wire for u8 {}
// SAFETY: as above.
unsafe impl Wire for u16 {}
// SAFETY: as above.
unsafe impl Wire for u32 {}
// SAFETY: as above.
unsafe impl<const N: usize> Wire for [u8; N] {}

/// Bounds-checked reads of packet bytes.
pub trait PacketRead {
    /// The `T` whose bytes start at `off`, if all of them are readable (for an
    /// skb: before `data_end`). Multi-byte values come out as they sit in the
    /// packet (network order).
    fn load<T: Wire>(&self, off: usize) -> Option<T>;

    /// Length of the whole packet. For an skb this is `skb->len`, which may be
    /// more than the readable (linear) bytes.
    fn packet_len(&self) -> usize;
}

/// The size of the field a checksum update is for (`BPF_F_HDR_FIELD_MASK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldSize {
    /// A 16-bit field (a port, an ICMP identifier).
    Two = 2,
    /// A 32-bit field (an IPv4 address).
    Four = 4,
}

/// What an L4 checksum update does around zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsumZero {
    /// TCP: the result is written as computed (the pseudo-header's protocol
    /// word is never zero, so neither is the sum).
    AsComputed,
    /// UDP: a checksum of 0 means "none" and stays 0; a result of 0 is written
    /// as 0xffff (`BPF_F_MARK_MANGLED_0`).
    UdpNone,
    /// ICMP: a result of 0 is written as 0xffff (`BPF_F_MARK_MANGLED_0 |
    /// BPF_F_MARK_ENFORCE`). Both verify, except when every other word of the
    /// message is zero (an echo with identifier and sequence 0 and no data):
    /// then only 0xffff does, and RFC 1624's update yields 0.
    NeverZero,
}

/// Where an L4 checksum sits and how an update of it behaves
/// (`rewrite::l4_csum` decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4Csum {
    /// Offset of the checksum in the packet.
    pub off: usize,
    /// The changed field is part of the IPv4 pseudo-header (`BPF_F_PSEUDO_HDR`).
    pub pseudo: bool,
    /// What happens around zero.
    pub zero: CsumZero,
}

/// Writes to the packet with the checksum semantics of the kernel helpers.
/// Every method fails with `DropReason::RewriteFailed` when the field is not
/// inside the packet.
pub trait PacketWrite {
    /// Writes `value`'s bytes at `off` (`bpf_skb_store_bytes`).
    fn store<T: Wire>(&mut self, off: usize, value: &T) -> Result<(), DropReason>;

    /// Updates the IPv4 header checksum at `off` for a 32-bit field changing
    /// from `from` to `to` (`bpf_l3_csum_replace(off, from, to, 4)`).
    fn l3_csum_replace4(&mut self, off: usize, from: u32, to: u32) -> Result<(), DropReason>;

    /// Updates the L4 checksum described by `csum` for a field of `size` bytes
    /// changing from `from` to `to` (`bpf_l4_csum_replace`). Values as they sit
    /// in the packet; a 16-bit value in the low half.
    fn l4_csum_replace(
        &mut self,
        csum: &L4Csum,
        from: u32,
        to: u32,
        size: FieldSize,
    ) -> Result<(), DropReason>;
}
