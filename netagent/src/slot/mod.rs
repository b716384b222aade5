//! Slots: addressing, and create/delete with rollback.
//!
//! CONTRACT (owned by the slot/topology work; used by the controller and daemon):
//!
//! ```ignore
//! pub struct SlotManager { .. }            // slot/manager.rs
//! impl SlotManager {
//!     /// Opens the agent (host) namespace, loads and attaches the datapath
//!     /// (uplink from config or default route), reserves the masquerade ports,
//!     /// adopts the intact slots of a previous run of the prefix and removes
//!     /// the rest (see `adopt`).
//!     pub async fn start(cfg: &Config) -> Result<Arc<SlotManager>, SlotError>;
//!     /// Idempotent: same index and same guest link -> Ok(created = false).
//!     /// Same index, different guest link -> SlotError::Conflict.
//!     pub async fn create(&self, index: i64, guest: GuestLink) -> Result<(SlotAddr, bool), SlotError>;
//!     /// The same with security settings (guest MAC, egress lists, rate limit),
//!     /// applied in the Datapath step; for an existing slot, what the request
//!     /// names must match (else SlotError::Conflict naming the sub-route).
//!     pub async fn create_with(&self, index: i64, guest: GuestLink, policy: PolicyRequest) -> Result<(Slot, bool), SlotError>;
//!     /// Replace a slot's egress lists / rate limit (None: unlimited).
//!     pub async fn set_egress(&self, index: i64, egress: EgressRules) -> Result<Slot, SlotError>;
//!     pub async fn set_rate_limit(&self, index: i64, limit: Option<RateLimitSpec>) -> Result<Slot, SlotError>;
//!     /// SlotError::NotFound if unknown. Tries every step, reports all failures.
//!     pub async fn delete(&self, index: i64) -> Result<(), SlotError>;
//!     pub fn get(&self, index: i64) -> Result<Slot, SlotError>;
//!     pub fn list(&self) -> Vec<Slot>;                   // sorted by index
//!     pub fn stats(&self, index: i64) -> Result<SlotStats, SlotError>;
//!     pub fn table_usage(&self) -> Result<TableUsage, SlotError>;
//!     pub async fn reap(&self) -> Result<ReapReport, SlotError>;
//!     /// Deletes every slot and detaches the datapath.
//!     pub async fn shutdown(&self) -> Result<(), SlotError>;
//!     // Added by the implementation:
//!     pub fn plan(&self) -> &AddressPlan;  pub fn uplink(&self) -> &Uplink;
//!     pub fn config(&self) -> &Config;
//!     /// Runs `f` with the datapath (diagnostics, tests reading maps).
//!     pub fn with_datapath<T>(&self, f: impl FnOnce(&mut Datapath) -> T) -> Result<T, SlotError>;
//!     /// `fault-injection` feature only: create fails right after `step`.
//!     pub fn set_fail_at(&self, step: Option<CreateStep>);
//!     /// `fault-injection` feature only: delete fails (skips) these steps.
//!     pub fn set_fail_delete(&self, steps: &[DeleteStep]);
//! }
//! pub struct Slot { pub addr: SlotAddr, pub guest: GuestLink }
//! ```
//! Requests for the same index are serialized inside the manager; different
//! indices run concurrently.
//!
//! Files: `addressing` (names and addresses), `manager` (the manager, start-up and
//! shutdown), `adopt` (taking over a previous run's slots; slot records),
//! `create` (the steps of create and their rollback), `delete` (delete that
//! tries every step), `flow_purge` (deleted slots' flows, removed after the
//! delete answered), `policy` (guest MAC, egress lists and rate limit:
//! types and validation), `local_addrs` (keeps LOCAL_ADDRS equal to the agent
//! namespace's addresses), `error` (`SlotError`). The agent namespace is the
//! namespace of the thread that calls `start`; every later kernel call targets a
//! namespace explicitly (netlink sockets bound to it, or a thread that joined it).

pub mod addressing;
pub mod adopt;
pub mod create;
pub mod delete;
pub mod error;
pub mod flow_purge;
pub mod local_addrs;
pub mod manager;
pub mod policy;

pub use addressing::{AddressPlan, AddressingError, SlotAddr};
pub use create::CreateStep;
pub use delete::DeleteStep;
pub use error::{SlotError, StepError};
pub use manager::SlotManager;
pub use policy::{GuestMac, PolicyRequest, RateLimitSpec, SlotPolicy};

/// A slot the manager holds: its addressing, its guest link and its security
/// settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Slot {
    /// Names and addresses.
    pub addr: SlotAddr,
    /// The guest side.
    pub guest: GuestLink,
    /// Guest MAC, egress lists, rate limit.
    pub policy: SlotPolicy,
}

/// What the guest side of a slot is.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "guest_link", rename_all = "lowercase")]
pub enum GuestLink {
    /// A persistent TAP `tap0` for a VMM (the default).
    #[default]
    Tap,
    /// A veth: the slot end is `tap0`, the other end becomes `eth0` in the existing
    /// namespace `guest_netns` with the guest address and default route.
    Veth {
        /// Name of an existing namespace in `/run/netns`.
        guest_netns: String,
    },
}
