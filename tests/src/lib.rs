//! Test fixtures shared by netagent's suites (`tests/tests/*.rs`):
//! `world` (throwaway namespaces: host, wan, slots), `pump` (a TAP⇄veth frame pump
//! standing in for a VMM), `packet` (packet builder and independent checksum
//! checks), `vm` (a real QEMU guest on a slot's TAP), `daemon` (a `netagent up`
//! process in a test namespace and an HTTP-over-Unix-socket client).

pub mod daemon;
pub mod leaks;
pub mod packet;
pub mod pump;
pub mod vm;
pub mod world;
