//! Reading a whole BPF hash map in a few system calls (`BPF_MAP_LOOKUP_BATCH`,
//! Linux 5.6+) instead of two per entry (`get_next_key`, then `lookup`): the
//! flow tables hold up to hundreds of thousands of entries and are walked by
//! the reaper, by slot delete (the slot's flows) and for occupancy, each time
//! with the datapath lock held. A walk by keys also restarts from the first
//! key when the key it stands on is deleted meanwhile (the datapath and the
//! reaper delete concurrently); a batch walk goes bucket by bucket.
//!
//! Where the kernel refuses batch operations (EINVAL, ENOTSUPP) the caller
//! falls back to the walk by keys.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::Pod;

/// `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call. A hash bucket holding more than this makes the
/// kernel answer ENOSPC; the call is then repeated with room for more.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Whether an error means the kernel has no batch operations for this map.
pub(super) fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524 /* ENOTSUPP */)
    )
}

/// Every (key, value) of the hash map `map` (plain, not per-CPU, values).
pub(super) fn lookup_all<K: Pod + Default, V: Pod + Default>(
    map: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // The kernel's opaque position (a bucket index for hash maps).
    let mut position: u64 = 0;
    let mut first = true;
    loop {
        let mut next: u64 = 0;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &mut position as *mut u64 as u64
            },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` batch member; the kernel writes at
        // most `count` keys and values into `keys`/`values` (each `chunk` long,
        // of the map's key and value sizes, which the caller's types match) and
        // one position into `next`; all outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = (rc != 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // A bucket larger than the buffers: make room and ask again.
            Some(libc::ENOSPC) if attr.count == 0 => {
                chunk *= 2;
                keys.resize(chunk, K::default());
                values.resize(chunk, V::default());
                continue;
            }
            None | Some(libc::ENOENT) => {}
            _ => return Err(err.unwrap_or_else(|| io::Error::other("batch lookup"))),
        }
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if err.is_some() {
            // ENOENT: the walk is complete.
            return Ok(out);
        }
        position = next;
        first = false;
    }
}
