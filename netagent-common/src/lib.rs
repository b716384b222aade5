//! The contract between netagent's kernel side (`netagent-ebpf`) and its userspace
//! (`netagent`): map names, map keys and values, counter indices and drop reasons;
//! and the packet parsing and rewrite logic both sides (and the fuzz targets in
//! `fuzz/`) share (`packet`).
//!
//! Every type that crosses the boundary is `#[repr(C)]`, `Copy`, has explicit
//! padding fields and a size asserted at compile time. Addresses and ports inside
//! keys and values are kept in **network byte order** (as they sit in the packet),
//! so the datapath never swaps bytes on the hot path; userspace converts.
#![no_std]

#[cfg(any(test, feature = "check"))]
extern crate alloc;

pub mod counters;
pub mod maps;
pub mod packet;

pub use counters::{COUNTER_COUNT, Counter, DropReason, SlotStats};
pub use maps::*;
