//! `PacketRead` and `PacketWrite` for a frame in memory (`[u8]`): userspace,
//! tests and fuzzing run the datapath's parser and rewrites on it. The checksum
//! updates do in software what `bpf_l3_csum_replace` / `bpf_l4_csum_replace` do
//! on an skb without checksum offload (`CHECKSUM_NONE`, as a test run or a
//! forwarded packet has): the RFC 1624 update of `csum_replace4` /
//! `csum_replace2`, then the `CsumZero` rule (`BPF_F_MARK_MANGLED_0`, with or
//! without `BPF_F_MARK_ENFORCE`).

use core::mem::size_of;

use super::access::{CsumZero, FieldSize, L4Csum, PacketRead, PacketWrite, Wire};
use super::csum::{csum_replace2, csum_replace4};
use crate::DropReason;

/// The kernel's `CSUM_MANGLED_0`: a computed UDP checksum of 0, as sent.
const CSUM_MANGLED_0: u16 = 0xffff;

impl PacketRead for [u8] {
    #[inline(always)]
    fn load<T: Wire>(&self, off: usize) -> Option<T> {
        let bytes = self.get(off..off.checked_add(size_of::<T>())?)?;
        // SAFETY: `bytes` holds exactly `size_of::<T>()` initialized bytes, and
        // `T: Wire` is valid for any bit pattern; the read is unaligned.
        Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.len()
    }
}

impl PacketWrite for [u8] {
    fn store<T: Wire>(&mut self, off: usize, value: &T) -> Result<(), DropReason> {
        let end = off
            .checked_add(size_of::<T>())
            .ok_or(DropReason::RewriteFailed)?;
        let bytes = self.get_mut(off..end).ok_or(DropReason::RewriteFailed)?;
        // SAFETY: `bytes` is exactly `size_of::<T>()` writable bytes; `T: Wire`
        // has no padding, so every byte written is initialized; unaligned write.
        unsafe { bytes.as_mut_ptr().cast::<T>().write_unaligned(*value) };
        Ok(())
    }

    fn l3_csum_replace4(&mut self, off: usize, from: u32, to: u32) -> Result<(), DropReason> {
        let check: u16 = self.load(off).ok_or(DropReason::RewriteFailed)?;
        self.store(off, &csum_replace4(check, from, to))
    }

    fn l4_csum_replace(
        &mut self,
        csum: &L4Csum,
        from: u32,
        to: u32,
        size: FieldSize,
    ) -> Result<(), DropReason> {
        let check: u16 = self.load(csum.off).ok_or(DropReason::RewriteFailed)?;
        if csum.zero == CsumZero::UdpNone && check == 0 {
            return Ok(());
        }
        let mut new = match size {
            FieldSize::Four => csum_replace4(check, from, to),
            FieldSize::Two => csum_replace2(check, from as u16, to as u16),
        };
        if csum.zero != CsumZero::AsComputed && new == 0 {
            new = CSUM_MANGLED_0;
        }
        self.store(csum.off, &new)
    }
}
