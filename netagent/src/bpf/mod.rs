//! The eBPF datapath from userspace: load the object, attach programs, fill and
//! read maps, reap expired flows, pin.
//!
//! CONTRACT (owned by the datapath work; signatures used by `slot` and the daemon):
//!
//! ```ignore
//! pub struct DatapathConfig { pub max_slots: u32, pub nat_table_size: u32,
//!     pub host_flow_table_size: u32, pub port_min: u16, pub port_max: u16 }
//! pub struct Datapath { .. }
//! impl Datapath {
//!     pub fn load(cfg: &DatapathConfig) -> Result<Datapath, BpfError>;
//!     /// Attaches `uplink_ingress` to the uplink (agent namespace) and writes CONFIG.
//!     pub fn attach_uplink(&mut self, uplink: &Uplink) -> Result<(), BpfError>;
//!     /// Attaches `tap_ingress` (tap0) and `slot_ingress` (eth0) inside the slot
//!     /// namespace and `veth_ingress` on the host veth; fills SLOTS, NETNS_SLOTS,
//!     /// VETH_SLOTS. All-or-nothing.
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
//! }
//! pub struct Uplink { pub ifindex: u32, pub name: String, pub ipv4: Ipv4Addr }
//! pub struct SlotDatapath<'a> { pub index: u32, pub netns: BorrowedFd<'a>,
//!     pub veth_ifindex: u32, pub veth_mac: [u8; 6], pub eth0_ifindex: u32,
//!     pub eth0_mac: [u8; 6], pub tap_ifindex: u32, pub vpeer_ip: Ipv4Addr,
//!     pub host_ip: Ipv4Addr }
//! ```
