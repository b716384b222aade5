//! Packet parsing and rewrite logic shared by the eBPF programs, userspace and
//! the fuzz targets (`netagent-common/fuzz`). Generic over `PacketRead` /
//! `PacketWrite` (`access`): the programs implement them on the skb (bounds
//! checked against `data_end`, kernel checksum helpers), `[u8]` implements them
//! in software (`slice`). So the code fuzzed and unit-tested here is the code
//! the verifier loads.
//!
//! Outcomes are documented per step: `ipv4` (not IPv4 / malformed / parsed),
//! `l4` (fragment / malformed / kind), `icmp_error` (malformed / unsupported /
//! quote). `rewrite` says which fields and checksums a rewrite touches;
//! `csum` holds the one's complement arithmetic, `full_csum` the from-scratch
//! checksums used to verify rewrites.

pub mod access;
pub mod csum;
pub mod eth;
pub mod full_csum;
pub mod header;
pub mod icmp_error;
pub mod ipv4;
pub mod l4;
pub mod rewrite;
pub mod slice;

#[cfg(any(test, feature = "check"))]
pub mod check;
#[cfg(any(test, feature = "check"))]
pub mod frames;

pub use access::{CsumZero, FieldSize, L4Csum, PacketRead, PacketWrite, Wire};
pub use eth::eth_addrs;
pub use icmp_error::{Quoted, icmp_error_quote};
pub use ipv4::{Ipv4, ipv4, raw_daddr};
pub use l4::{L4, L4Kind, l4};
pub use rewrite::PortField;
