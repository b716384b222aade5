//! The eBPF datapath from userspace: load the object, attach programs, fill and
//! read maps, reap expired flows.
//!
//! CONTRACT (owned by the datapath work; signatures used by `slot` and the daemon):
//!
//! ```ignore
//! pub struct DatapathConfig { pub max_slots: u32, pub nat_table_size: u32,
//!     pub host_flow_table_size: u32, pub policy_table_size: u32,
//!     pub port_min: u16, pub port_max: u16,
//!     pub host_base: Ipv4Addr, pub vrt_base: Ipv4Addr,
//!     pub pin_dir: Option<PathBuf>, pub attach_mode: AttachMode }
//!     // DatapathConfig::from_config(&Config)
//! pub struct Datapath { .. }
//! impl Datapath {
//!     pub fn load(cfg: &DatapathConfig) -> Result<Datapath, BpfError>;
//!     /// Attaches `uplink_ingress` to the uplink (agent namespace) and writes CONFIG.
//!     pub fn attach_uplink(&mut self, uplink: &Uplink) -> Result<(), BpfError>;
//!     /// Attaches `tap_ingress` (tap0) and `slot_ingress` (eth0) inside the slot
//!     /// namespace and `veth_ingress` on the host veth (links of the programs
//!     /// loaded once); fills SLOTS, ADDR_SLOTS, VETH_SLOTS. All-or-nothing.
//!     pub fn attach_slot(&mut self, slot: &SlotDatapath<'_>) -> Result<(), BpfError>;
//!     /// Detaches the slot's programs and removes every map entry of the slot
//!     /// (slot info, lookups, NAT and host-flow entries, counters). Idempotent.
//!     pub fn detach_slot(&mut self, index: u32) -> Result<(), BpfError>;
//!     /// Counters of one slot summed over CPUs.
//!     pub fn slot_stats(&self, index: u32) -> Result<SlotStats, BpfError>;
//!     /// Occupancy of the NAT and host-flow tables.
//!     pub fn table_usage(&self) -> Result<TableUsage, BpfError>;
//!     /// Removes flows idle longer than their timeout; returns how many.
//!     pub fn reap(&mut self, timeouts: &crate::config::Timeouts) -> Result<ReapReport, BpfError>;
//!     /// Replaces LOCAL_ADDRS (addresses of the agent namespace: slot traffic to
//!     /// them goes up the host stack instead of being masqueraded).
//!     pub fn set_local_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<(), BpfError>;
//!     /// Detaches the uplink program (slots stay attached).
//!     pub fn detach_uplink(&mut self) -> Result<(), BpfError>;
//!     /// Runs one program once on `frame` with BPF_PROG_TEST_RUN (tests).
//!     pub fn test_run(&self, prog: Program, frame: &[u8]) -> Result<TestRunOutput, BpfError>;
//!     /// The same `repeat` times; also returns the mean kernel time of one run.
//!     pub fn test_run_repeat(&self, prog: Program, frame: &[u8], repeat: u32)
//!         -> Result<(TestRunOutput, Duration), BpfError>;
//!     /// `reap` at a given CLOCK_MONOTONIC instant (tests).
//!     pub fn reap_at(&mut self, timeouts: &Timeouts, now_ns: u64) -> Result<ReapReport, BpfError>;
//!     pub fn uplink(&self) -> Option<&Uplink>;  pub fn attached_slots(&self) -> Vec<u32>;
//!     pub fn unattributed_stats(&self) -> Result<SlotStats, BpfError>;  // STATS[0]
//!     /// Direct map access for tests and diagnostics.
//!     pub fn maps(&self) -> &Maps;  pub fn maps_mut(&mut self) -> &mut Maps;
//!     // Security (policy.rs): the default deny list (slot 0's rules), a slot's
//!     // own allow/deny CIDRs (replaced as a whole), its bandwidth limit and the
//!     // MAC its guest must send from; detach_slot clears a slot's.
//!     // Both cut the guest flows the new rules deny (as set_local_addrs does
//!     // for a new host address): established flows skip the policy.
//!     pub fn set_default_egress(&mut self, deny: &[Cidr]) -> Result<(), BpfError>;
//!     pub fn set_slot_egress(&mut self, index: u32, rules: &EgressRules) -> Result<(), BpfError>;
//!     /// The policy's verdict, evaluated in userspace as the datapath does.
//!     pub fn egress_verdict(&self, index: u32, daddr: Ipv4Addr)
//!         -> Result<Option<DropReason>, BpfError>;
//!     pub fn slot_egress(&self, index: u32) -> Result<EgressRules, BpfError>;
//!     pub fn set_rate_limit(&mut self, index: u32, limit: Option<RateLimit>) -> Result<(), BpfError>;
//!     pub fn rate_limit(&self, index: u32) -> Result<Option<RateLimit>, BpfError>;
//!     pub fn set_guest_mac(&mut self, index: u32, mac: Option<[u8; 6]>) -> Result<(), BpfError>;
//!     /// BPF_PROG_TEST_RUN on device `ifindex` of the caller's namespace (tests).
//!     pub fn test_run_on(&self, prog: Program, frame: &[u8], ifindex: u32)
//!         -> Result<TestRunOutput, BpfError>;
//! }
//! pub struct Uplink { pub ifindex: u32, pub name: String, pub ipv4: Ipv4Addr, pub veth_peer: bool }
//! pub struct SlotDatapath<'a> { pub index: u32, pub netns: BorrowedFd<'a>,
//!     pub veth_ifindex: u32, pub veth_mac: [u8; 6], pub eth0_ifindex: u32,
//!     pub eth0_mac: [u8; 6], pub tap_ifindex: u32, pub tap_is_veth: bool,
//!     pub vpeer_ip: Ipv4Addr, pub host_ip: Ipv4Addr }   // eth0_ifindex == SLOT_ETH0_IFINDEX
//! ```
//!
//! One instance of each program serves every slot; a slot costs three tc
//! filters (no fd; found again by priority and handle) and a few map entries.
//! Inside a slot namespace nothing in the packet says which
//! slot it is (a tc program's `bpf_get_netns_cookie` reports the skb's *socket*
//! namespace, and frames from a TAP or veth carry none), so the ifindexes do:
//! `tap0` of slot N has `SLOT_TAP_IFINDEX_BASE + N`, and `tap_ingress` checks
//! the guest's frames for that slot (MAC, ARP, IPv4 source, bandwidth) and
//! hands them untouched to the host veth with
//! `bpf_redirect_peer(SLOT_ETH0_IFINDEX)` (`eth0` has that ifindex in every
//! slot namespace); `veth_ingress` finds the slot by its ifindex (read off
//! `HOST_VETH_INDEX_BASE + (k << 15) + N`, else VETH_SLOTS),
//! applies the egress policy and translates them there; `slot_ingress` finds
//! the slot by the mark `uplink_ingress` gives a reply it translated
//! (`TO_GUEST_MARK`), else by the destination address (ADDR_SLOTS).
//! The maps are pinned in `DatapathConfig::pin_dir` (for inspection and a
//! restarted agent).
//!
//! Files: `load` (object, map sizes, `Datapath`, reuse of a previous run's
//! pins), `layout` (the map layout descriptor checked before reuse), `attach`
//! (per-slot tc filters, the uplink's pinned TCX link with a clsact fallback,
//! in-place program replacement of a previous run's hooks, netns hopping), `maps`
//! (typed map access), `batch` (whole-table reads in a few system calls),
//! `reap` (flow expiry), `stats` (counters, table usage, LOCAL_ADDRS),
//! `netns` (running code inside a slot namespace),
//! `policy` (egress rules and their userspace evaluation, bandwidth limit,
//! guest MAC), `purge` (cutting the guest flows a policy or LOCAL_ADDRS change
//! denies) and `test_run` (BPF_PROG_TEST_RUN, also with the
//! skb on a given device).

mod attach;
mod batch;
mod error;
mod flow_tables;
pub mod layout;
mod load;
mod maps;
mod netns;
mod pins;
mod policy;
mod purge;
mod reap;
mod stats;
mod test_run;

use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;

pub use attach::{AttachMode, FILTER_PRIORITY, UPLINK_FILTER_HANDLE};
pub use error::BpfError;
pub use flow_tables::FlowTables;
pub use load::{Datapath, DatapathConfig};
pub use maps::{FlowTable, Maps};
pub use netns::in_netns;
pub use pins::UPLINK_LINK_PIN;
pub use policy::{
    Cidr, CidrError, DEFAULT_EGRESS_DENY, EgressRules, EgressView, MIN_BURST_BYTES,
    PolicyDifference, RateLimit,
};
pub use reap::ReapReport;
pub use stats::TableUsage;
pub use test_run::{Program, TEST_RUN_IFINDEX, TestRunOutput};

/// The uplink: where masqueraded traffic leaves and its replies arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// Interface index in the agent namespace.
    pub ifindex: u32,
    /// Interface name (for messages).
    pub name: String,
    /// The masquerade source address.
    pub ipv4: Ipv4Addr,
    /// The uplink is a veth whose peer is in another namespace: masqueraded
    /// packets with a resolved next hop go straight to the peer's ingress
    /// (`CONFIG_F_UPLINK_PEER`).
    pub veth_peer: bool,
}

/// What the datapath needs to know about one slot's links.
#[derive(Debug, Clone, Copy)]
pub struct SlotDatapath<'a> {
    /// Slot index, `1 <= index < max_slots`.
    pub index: u32,
    /// The slot's network namespace (an open `/run/netns/...` file).
    pub netns: BorrowedFd<'a>,
    /// Host-side veth ifindex (agent namespace).
    pub veth_ifindex: u32,
    /// Host-side veth MAC.
    pub veth_mac: [u8; 6],
    /// `eth0` ifindex in the slot namespace: must be `SLOT_ETH0_IFINDEX`.
    pub eth0_ifindex: u32,
    /// `eth0` MAC.
    pub eth0_mac: [u8; 6],
    /// `tap0` ifindex in the slot namespace.
    pub tap_ifindex: u32,
    /// `tap0` is a veth whose peer is the guest's `eth0` (`guest_link: veth`).
    pub tap_is_veth: bool,
    /// Slot-side veth address.
    pub vpeer_ip: Ipv4Addr,
    /// Host-reachable address of the slot.
    pub host_ip: Ipv4Addr,
}

/// An IPv4 address as the datapath stores it (network order in a native `u32`).
pub(crate) fn ip_to_map(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The inverse of `ip_to_map`.
pub(crate) fn ip_from_map(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}
