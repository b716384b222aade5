//! netagent: per-host networking for microVM sandboxes. Every sandbox ("slot") gets
//! a network namespace, a veth pair to the host and a TAP for its VM; TC eBPF
//! programs do the NAT and forwarding that the reference implementation did with
//! iptables.
//!
//! Layout: `slot` (addressing, create/delete with rollback) builds on `netlink`
//! (netns, link, addr, route, tap, sysctl) and `bpf` (load, attach, maps); `api`
//! parses requests into actions that `controller` applies; `daemon` runs it all;
//! `stats` and `pressure` shape counters and table occupancy; `memory` gives
//! the heap back after bursts of slot changes.

pub mod api;
pub mod bpf;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod error;
pub mod memory;
pub mod netlink;
pub mod pressure;
pub mod slot;
pub mod stats;
pub mod verify;
