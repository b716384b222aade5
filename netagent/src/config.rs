//! Agent configuration: a TOML file (`--config`), every key also a flag.
//!
//! The core fields are fixed here because slot addressing and the datapath read
//! them; loading/merging/validation lives alongside.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything `netagent up` is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name prefix: namespaces are `{prefix}-ns-N`, host veths `{prefix}-veth-N`.
    pub prefix: String,
    /// Base of the host-reachable addresses (HostIP = base + N), a /16 (x.y.0.0).
    pub host_base: Ipv4Addr,
    /// Base of the veth /31s (veth = base + 2N, vpeer = base + 2N + 1), a /16.
    pub vrt_base: Ipv4Addr,
    /// Uplink interface; `None` means the interface of the default route.
    pub uplink: Option<String>,
    /// API socket path.
    pub socket: PathBuf,
    /// Per-instance bpffs directory for pins.
    pub bpffs: PathBuf,
    /// Masquerade and flow tables.
    pub nat: NatConfig,
    /// Flow expiry.
    pub timeouts: Timeouts,
    /// Size of the per-slot arrays: slot indices must be `< max_slots`
    /// (at most 32768, so index 32767 fits).
    pub max_slots: u32,
}

/// Masquerade port range and table sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatConfig {
    /// First masquerade port (inclusive). The range is added to the host's
    /// `ip_local_reserved_ports` so its own sockets never collide.
    pub port_min: u16,
    /// Last masquerade port (inclusive).
    pub port_max: u16,
    /// Entries in each masquerade table (egress and ingress).
    pub table_size: u32,
    /// Entries in the host → guest flow table.
    pub host_flow_table_size: u32,
}

/// Idle timeouts, in seconds, after which a flow's entries are reclaimed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP flow that saw traffic both ways and no FIN/RST.
    pub tcp_established: u64,
    /// TCP flow still opening (no reply yet).
    pub tcp_opening: u64,
    /// TCP flow after FIN from both sides or an RST.
    pub tcp_closing: u64,
    /// UDP flow.
    pub udp: u64,
    /// ICMP echo flow.
    pub icmp: u64,
    /// How often the reaper walks the tables.
    pub reap_interval: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            prefix: "wrenn".into(),
            host_base: Ipv4Addr::new(10, 11, 0, 0),
            vrt_base: Ipv4Addr::new(10, 12, 0, 0),
            uplink: None,
            socket: PathBuf::from("/run/netagent/netagent.sock"),
            bpffs: PathBuf::from("/sys/fs/bpf/netagent"),
            nat: NatConfig::default(),
            timeouts: Timeouts::default(),
            max_slots: 32768,
        }
    }
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            port_min: 20000,
            port_max: 32767,
            table_size: 262_144,
            host_flow_table_size: 65_536,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_established: 21_600,
            tcp_opening: 60,
            tcp_closing: 10,
            udp: 60,
            icmp: 30,
            reap_interval: 5,
        }
    }
}
