//! The controller applies the actions the API layer parsed from requests. It
//! validates what the API could not (index range, guest namespace name), calls the
//! slot backend and shapes the results. The backend is the slot manager in the
//! daemon and an in-memory fake in unit tests.
//!
//! Creates and deletes run on their own tokio task: once accepted, a change runs
//! to completion (or rolls back) even if the client hangs up, so a dropped
//! request never leaves a half-made slot. Requests for one slot are serialized
//! by the manager; different slots proceed concurrently.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use netagent_common::SlotStats;
use serde::{Deserialize, Serialize};

use crate::bpf::EgressRules;
use crate::pressure::TablePressure;
use crate::slot::{
    AddressPlan, AddressingError, GuestLink, PolicyRequest, RateLimitSpec, SlotAddr, SlotError,
    SlotManager, SlotPolicy,
};
use crate::stats::{MetricsSnapshot, SlotCounters, TableGauge, render_prometheus};
use crate::verify::VerifyReport;

/// A boxed, sendable future (the backend trait is object-safe with it).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A slot as the API returns it: DESIGN §4's slot object, plus `guest_link`
/// (`"tap"` or `"veth"`), for a veth `guest_netns`, and the security settings
/// `guest_mac`, `egress` and `rate_limit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotView {
    /// Names and addresses.
    #[serde(flatten)]
    pub addr: SlotAddr,
    /// What the guest side is.
    #[serde(flatten)]
    pub guest: GuestLink,
    /// Guest MAC, egress lists, rate limit.
    #[serde(flatten)]
    pub policy: SlotPolicy,
}

impl From<crate::slot::Slot> for SlotView {
    fn from(s: crate::slot::Slot) -> SlotView {
        SlotView {
            addr: s.addr,
            guest: s.guest,
            policy: s.policy,
        }
    }
}

/// The answer of `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `"ok"` while the datapath is loaded, `"stopping"` during shutdown.
    pub status: String,
    /// Slots that exist.
    pub slots: usize,
    /// Datapath programs loaded.
    pub programs_loaded: u64,
}

/// What went wrong applying an action; the API maps each kind to a status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    /// The slot index is outside what this agent serves.
    #[error("{0}")]
    Index(#[from] AddressingError),
    /// The index is valid in general but not below this agent's `max_slots`.
    #[error("slot index {index} is out of range for this agent: max_slots is {max_slots}, so use 1 to {}", max_slots - 1)]
    AboveMaxSlots {
        /// The index.
        index: i64,
        /// The configured `max_slots`.
        max_slots: u32,
    },
    /// The request is malformed in a way only the controller can see.
    #[error("{0}")]
    BadRequest(String),
    /// The slot does not exist.
    #[error("slot {0} does not exist: create it first (PUT /v1/slots/{0})")]
    NotFound(i64),
    /// The slot exists with a different guest link.
    #[error("{0}")]
    Conflict(String),
    /// The agent is shutting down or its datapath is not loaded.
    #[error("{0}")]
    Unavailable(String),
    /// The operation failed on the host (netlink, BPF); the message says which step.
    #[error("{0}")]
    Failed(String),
}

/// What one reaper run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Flows removed.
    pub flows: u64,
    /// Occupancy of the tables after the run.
    pub tables: Vec<TableGauge>,
}

/// What the controller needs from the slot manager. Methods mirror
/// `slot::SlotManager` (see the contract in `slot/mod.rs`).
pub trait SlotBackend: Send + Sync + 'static {
    /// Creates slot `index`; `Ok((slot, false))` if it already existed identically
    /// (in the guest link and every setting `policy` gives).
    fn create(
        &self,
        index: i64,
        guest: GuestLink,
        policy: PolicyRequest,
    ) -> BoxFuture<'_, Result<(SlotView, bool), ControllerError>>;
    /// Replaces slot `index`'s egress lists.
    fn set_egress(
        &self,
        index: i64,
        egress: EgressRules,
    ) -> BoxFuture<'_, Result<SlotView, ControllerError>>;
    /// Sets or removes slot `index`'s rate limit.
    fn set_rate_limit(
        &self,
        index: i64,
        limit: Option<RateLimitSpec>,
    ) -> BoxFuture<'_, Result<SlotView, ControllerError>>;
    /// Deletes slot `index`.
    fn delete(&self, index: i64) -> BoxFuture<'_, Result<(), ControllerError>>;
    /// One slot.
    fn get(&self, index: i64) -> Result<SlotView, ControllerError>;
    /// Every slot, sorted by index.
    fn list(&self) -> Vec<SlotView>;
    /// One slot's counters summed over CPUs.
    fn stats(&self, index: i64) -> Result<SlotStats, ControllerError>;
    /// Occupancy of the NAT and flow tables.
    fn tables(&self) -> Result<Vec<TableGauge>, ControllerError>;
    /// Datapath programs loaded and attachments in place.
    fn programs(&self) -> (u64, u64);
    /// Removes expired flows.
    fn reap(&self) -> BoxFuture<'_, Result<Reaped, ControllerError>>;
    /// Deletes every slot and detaches the datapath.
    fn shutdown(&self) -> BoxFuture<'_, Result<(), ControllerError>>;
    /// Compares the kernel's state with the backend's (see `verify`).
    fn verify(&self) -> BoxFuture<'_, Result<VerifyReport, ControllerError>>;
}

/// A documented action, parsed from one API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `PUT /v1/slots/{n}`.
    CreateSlot {
        /// Slot index as given.
        index: i64,
        /// The guest side.
        guest: GuestLink,
        /// Guest MAC, egress lists, rate limit (each optional).
        policy: PolicyRequest,
    },
    /// `PUT /v1/slots/{n}/egress`.
    SetEgress {
        /// Slot index as given.
        index: i64,
        /// The new lists (replacing the old).
        egress: EgressRules,
    },
    /// `PUT /v1/slots/{n}/rate_limit` (`Some`), `DELETE /v1/slots/{n}/rate_limit`
    /// (`None`).
    SetRateLimit {
        /// Slot index as given.
        index: i64,
        /// The new limit, or none.
        limit: Option<RateLimitSpec>,
    },
    /// `DELETE /v1/slots/{n}`.
    DeleteSlot {
        /// Slot index as given.
        index: i64,
    },
    /// `GET /v1/slots/{n}`.
    GetSlot {
        /// Slot index as given.
        index: i64,
    },
    /// `GET /v1/slots`.
    ListSlots,
    /// `GET /v1/slots/{n}/stats`.
    SlotStats {
        /// Slot index as given.
        index: i64,
    },
    /// `GET /metrics`.
    Metrics,
    /// `GET /healthz`.
    Health,
    /// `GET /v1/verify`.
    Verify,
}

/// The result of an action.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A slot; `created` is false when it already existed identically.
    Slot {
        /// The slot.
        slot: SlotView,
        /// Whether this request made it.
        created: bool,
    },
    /// The slot is gone.
    Deleted,
    /// Every slot.
    Slots(Vec<SlotView>),
    /// One slot's counters.
    Stats(SlotCounters),
    /// Prometheus text.
    Metrics(String),
    /// Health; `healthy` false answers 503.
    Health {
        /// The body.
        health: Health,
        /// Whether the datapath is loaded and serving.
        healthy: bool,
    },
    /// Differences between the kernel and the agent.
    Verify(VerifyReport),
}

/// Applies actions to a backend.
pub struct Controller {
    backend: Arc<dyn SlotBackend>,
    plan: AddressPlan,
    max_slots: u32,
    serving: AtomicBool,
    reaped: AtomicU64,
    reap_errors: AtomicU64,
    pressure: TablePressure,
    activity: Arc<std::sync::Mutex<Activity>>,
}

/// Which slots are being changed, and when each last was: `verify` leaves out
/// slots that a create or delete touched while it ran.
#[derive(Debug, Default)]
struct Activity {
    /// Bumped at the start and the end of every slot change.
    seq: u64,
    /// Changes in progress per slot.
    busy: std::collections::BTreeMap<u32, usize>,
    /// `seq` of each slot's latest start or end of a change.
    last: std::collections::BTreeMap<u32, u64>,
}

fn lock_activity(a: &std::sync::Mutex<Activity>) -> std::sync::MutexGuard<'_, Activity> {
    a.lock().unwrap_or_else(|p| p.into_inner())
}

/// A slot change in progress; dropped when the change ends (it travels with the
/// change's own task, so it ends when the change does, not when the client
/// hangs up).
struct Busy {
    activity: Arc<std::sync::Mutex<Activity>>,
    index: u32,
}

impl Busy {
    fn start(activity: &Arc<std::sync::Mutex<Activity>>, index: i64) -> Busy {
        let index = index as u32;
        let mut a = lock_activity(activity);
        a.seq += 1;
        let seq = a.seq;
        *a.busy.entry(index).or_default() += 1;
        a.last.insert(index, seq);
        Busy {
            activity: activity.clone(),
            index,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut a = lock_activity(&self.activity);
        a.seq += 1;
        let seq = a.seq;
        if let Some(n) = a.busy.get_mut(&self.index) {
            *n -= 1;
            if *n == 0 {
                a.busy.remove(&self.index);
            }
        }
        a.last.insert(self.index, seq);
    }
}

/// Longest namespace name accepted (a file name in `/run/netns`).
const NETNS_NAME_MAX: usize = 255;

impl Controller {
    /// A controller over `backend`; `plan` and `max_slots` come from the config.
    pub fn new(backend: Arc<dyn SlotBackend>, plan: AddressPlan, max_slots: u32) -> Controller {
        Controller {
            backend,
            plan,
            max_slots,
            serving: AtomicBool::new(true),
            reaped: AtomicU64::new(0),
            reap_errors: AtomicU64::new(0),
            pressure: TablePressure::new(80),
            activity: Arc::default(),
        }
    }

    /// Sets the table occupancy warning threshold (`table_warn_percent`).
    pub fn with_table_warn_percent(mut self, percent: u8) -> Controller {
        self.pressure = TablePressure::new(percent);
        self
    }

    fn check_index(&self, index: i64) -> Result<(), ControllerError> {
        self.plan.slot(index)?;
        if index >= i64::from(self.max_slots) {
            return Err(ControllerError::AboveMaxSlots {
                index,
                max_slots: self.max_slots,
            });
        }
        Ok(())
    }

    /// Runs one change of slot `index` to completion (`run_to_completion`),
    /// counted as activity on the slot while it runs; refused once the agent
    /// stops serving.
    async fn change<T, Fut>(
        &self,
        index: i64,
        f: impl FnOnce(Arc<dyn SlotBackend>) -> Fut,
    ) -> Result<T, ControllerError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, ControllerError>> + Send + 'static,
    {
        self.check_serving()?;
        let change = f(self.backend.clone());
        let busy = Busy::start(&self.activity, index);
        run_to_completion(async move {
            let result = change.await;
            drop(busy);
            result
        })
        .await
    }

    fn check_serving(&self) -> Result<(), ControllerError> {
        if self.serving.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(ControllerError::Unavailable(
                "netagent is shutting down: retry against the next instance".into(),
            ))
        }
    }

    /// Applies one action.
    pub async fn apply(&self, action: Action) -> Result<Outcome, ControllerError> {
        match action {
            Action::CreateSlot {
                index,
                guest,
                policy,
            } => {
                self.check_index(index)?;
                check_guest(&guest)?;
                policy.validate().map_err(ControllerError::BadRequest)?;
                let (slot, created) = self
                    .change(
                        index,
                        |b| async move { b.create(index, guest, policy).await },
                    )
                    .await?;
                Ok(Outcome::Slot { slot, created })
            }
            Action::SetEgress { index, egress } => {
                self.check_index(index)?;
                crate::slot::policy::validate_egress(&egress)
                    .map_err(ControllerError::BadRequest)?;
                let slot = self
                    .change(index, |b| async move { b.set_egress(index, egress).await })
                    .await?;
                Ok(Outcome::Slot {
                    slot,
                    created: false,
                })
            }
            Action::SetRateLimit { index, limit } => {
                self.check_index(index)?;
                if let Some(limit) = &limit {
                    limit.validate().map_err(ControllerError::BadRequest)?;
                }
                let slot = self
                    .change(
                        index,
                        |b| async move { b.set_rate_limit(index, limit).await },
                    )
                    .await?;
                Ok(Outcome::Slot {
                    slot,
                    created: false,
                })
            }
            Action::DeleteSlot { index } => {
                self.check_index(index)?;
                self.change(index, |b| async move { b.delete(index).await })
                    .await?;
                Ok(Outcome::Deleted)
            }
            Action::GetSlot { index } => {
                self.check_index(index)?;
                Ok(Outcome::Slot {
                    slot: self.backend.get(index)?,
                    created: false,
                })
            }
            Action::ListSlots => Ok(Outcome::Slots(self.backend.list())),
            Action::SlotStats { index } => {
                self.check_index(index)?;
                let stats = self.backend.stats(index)?;
                Ok(Outcome::Stats(SlotCounters::from_stats(
                    index as u32,
                    &stats,
                )))
            }
            Action::Metrics => Ok(Outcome::Metrics(render_prometheus(&self.metrics()?))),
            Action::Verify => {
                self.check_serving()?;
                let start = lock_activity(&self.activity).seq;
                let report = self.backend.verify().await?;
                // Slots a create or delete touched meanwhile are in flux.
                let a = lock_activity(&self.activity);
                let touched = |slot: u32| {
                    a.busy.contains_key(&slot) || a.last.get(&slot).is_some_and(|s| *s > start)
                };
                let differences = report
                    .differences
                    .into_iter()
                    .filter(|d| d.slot.is_none_or(|s| !touched(s)))
                    .collect();
                Ok(Outcome::Verify(VerifyReport::new(
                    &report.prefix,
                    report.slots,
                    differences,
                )))
            }
            Action::Health => {
                let (programs_loaded, _) = self.backend.programs();
                let serving = self.serving.load(Ordering::Acquire);
                let healthy = serving && programs_loaded > 0;
                Ok(Outcome::Health {
                    health: Health {
                        status: if !serving {
                            "stopping"
                        } else if healthy {
                            "ok"
                        } else {
                            "datapath not loaded"
                        }
                        .into(),
                        slots: self.backend.list().len(),
                        programs_loaded,
                    },
                    healthy,
                })
            }
        }
    }

    /// Gathers every counter and gauge for `/metrics`.
    pub fn metrics(&self) -> Result<MetricsSnapshot, ControllerError> {
        let mut slots = Vec::new();
        for slot in self.backend.list() {
            let index = i64::from(slot.addr.index);
            match self.backend.stats(index) {
                Ok(stats) => slots.push(SlotCounters::from_stats(slot.addr.index, &stats)),
                // Deleted between list and read: leave it out.
                Err(ControllerError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let (programs_loaded, program_attachments) = self.backend.programs();
        Ok(MetricsSnapshot {
            slots,
            tables: self.pressure.scrape(|| self.backend.tables())?,
            table_warn_percent: self.pressure.warn_percent(),
            programs_loaded,
            program_attachments,
            reaped_flows: self.reaped.load(Ordering::Relaxed),
            reap_errors: self.reap_errors.load(Ordering::Relaxed),
        })
    }

    /// One reaper run; failures are counted and logged, never fatal.
    pub async fn reap_once(&self) {
        match self.backend.reap().await {
            Ok(Reaped { flows, tables }) => {
                self.reaped.fetch_add(flows, Ordering::Relaxed);
                if flows > 0 {
                    tracing::debug!(flows, "reaped expired flows");
                }
                self.pressure.observe(&tables);
            }
            Err(e) => {
                self.reap_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "reaping expired flows failed");
            }
        }
    }

    /// Stops accepting changes and deletes every slot (see `daemon` for why).
    pub async fn shutdown(&self) -> Result<(), ControllerError> {
        self.serving.store(false, Ordering::Release);
        self.backend.shutdown().await
    }
}

/// Starts the real backend: the slot manager (loads and attaches the datapath,
/// adopts a previous run's intact slots and removes the rest).
pub async fn start_backend(
    config: &crate::config::Config,
) -> Result<Arc<dyn SlotBackend>, crate::error::DaemonError> {
    let manager = SlotManager::start(config)
        .await
        .map_err(|e| crate::error::DaemonError::Start(e.to_string()))?;
    Ok(manager)
}

impl From<SlotError> for ControllerError {
    fn from(e: SlotError) -> ControllerError {
        match e {
            SlotError::InvalidIndex(msg) | SlotError::InvalidPolicy(msg) => {
                ControllerError::BadRequest(msg)
            }
            SlotError::NotFound(index) => ControllerError::NotFound(index),
            SlotError::Conflict(msg) => ControllerError::Conflict(msg),
            e @ SlotError::GuestNamespaceMissing(_) => ControllerError::BadRequest(e.to_string()),
            e @ SlotError::ShutDown => ControllerError::Unavailable(e.to_string()),
            e => ControllerError::Failed(e.to_string()),
        }
    }
}

/// Programs in the datapath object (`tap_ingress`, `veth_ingress`,
/// `uplink_ingress`, `slot_ingress`); all are loaded at start.
const DATAPATH_PROGRAMS: u64 = 4;
/// Attachments per slot: `tap_ingress`, `slot_ingress` and `veth_ingress`.
const ATTACHMENTS_PER_SLOT: u64 = 3;

impl SlotBackend for SlotManager {
    fn create(
        &self,
        index: i64,
        guest: GuestLink,
        policy: PolicyRequest,
    ) -> BoxFuture<'_, Result<(SlotView, bool), ControllerError>> {
        Box::pin(async move {
            let (slot, created) = SlotManager::create_with(self, index, guest, policy).await?;
            Ok((slot.into(), created))
        })
    }

    fn set_egress(
        &self,
        index: i64,
        egress: EgressRules,
    ) -> BoxFuture<'_, Result<SlotView, ControllerError>> {
        Box::pin(async move { Ok(SlotManager::set_egress(self, index, egress).await?.into()) })
    }

    fn set_rate_limit(
        &self,
        index: i64,
        limit: Option<RateLimitSpec>,
    ) -> BoxFuture<'_, Result<SlotView, ControllerError>> {
        Box::pin(async move {
            Ok(SlotManager::set_rate_limit(self, index, limit)
                .await?
                .into())
        })
    }

    fn delete(&self, index: i64) -> BoxFuture<'_, Result<(), ControllerError>> {
        Box::pin(async move { Ok(SlotManager::delete(self, index).await?) })
    }

    fn get(&self, index: i64) -> Result<SlotView, ControllerError> {
        Ok(SlotManager::get(self, index)?.into())
    }

    fn list(&self) -> Vec<SlotView> {
        SlotManager::list(self)
            .into_iter()
            .map(SlotView::from)
            .collect()
    }

    fn stats(&self, index: i64) -> Result<SlotStats, ControllerError> {
        Ok(SlotManager::stats(self, index)?)
    }

    fn tables(&self) -> Result<Vec<TableGauge>, ControllerError> {
        Ok(TableGauge::from_usage(&self.table_usage()?))
    }

    fn programs(&self) -> (u64, u64) {
        self.with_datapath(|dp| {
            let uplink = u64::from(dp.uplink().is_some());
            (
                DATAPATH_PROGRAMS,
                uplink + ATTACHMENTS_PER_SLOT * dp.attached_slots().len() as u64,
            )
        })
        .unwrap_or((0, 0))
    }

    fn reap(&self) -> BoxFuture<'_, Result<Reaped, ControllerError>> {
        Box::pin(async move {
            let report = SlotManager::reap(self).await?;
            Ok(Reaped {
                flows: report.total() as u64,
                tables: TableGauge::from_usage(&report.usage),
            })
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<(), ControllerError>> {
        Box::pin(async move { Ok(SlotManager::shutdown(self).await?) })
    }

    fn verify(&self) -> BoxFuture<'_, Result<VerifyReport, ControllerError>> {
        Box::pin(async move {
            crate::verify::verify(self)
                .await
                .map_err(|e| ControllerError::Failed(e.to_string()))
        })
    }
}

/// Runs a slot change on its own task, so that it finishes (or rolls back) even
/// when the request that asked for it is dropped — a client that disconnects
/// mid-create must not cancel the create half-way.
async fn run_to_completion<T: Send + 'static>(
    change: impl Future<Output = Result<T, ControllerError>> + Send + 'static,
) -> Result<T, ControllerError> {
    tokio::spawn(change)
        .await
        .map_err(|e| ControllerError::Failed(format!("the slot operation did not complete: {e}")))?
}

fn check_guest(guest: &GuestLink) -> Result<(), ControllerError> {
    if let GuestLink::Veth { guest_netns } = guest {
        let ok = !guest_netns.is_empty()
            && guest_netns.len() <= NETNS_NAME_MAX
            && guest_netns != "."
            && guest_netns != ".."
            && !guest_netns.contains(['/', '\0']);
        if !ok {
            return Err(ControllerError::BadRequest(format!(
                "guest_netns {guest_netns:?} is not a namespace name: give the name of an existing namespace in /run/netns"
            )));
        }
    }
    Ok(())
}

/// An in-memory backend for unit tests of the API and controller.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use netagent_common::Counter;

    use super::*;

    /// Slots in a map; every slot reports the same counters.
    pub struct FakeBackend {
        plan: AddressPlan,
        slots: Mutex<BTreeMap<u32, SlotView>>,
    }

    impl FakeBackend {
        pub fn new() -> Arc<FakeBackend> {
            Arc::new(FakeBackend {
                plan: AddressPlan::new(
                    "wrenn",
                    std::net::Ipv4Addr::new(10, 11, 0, 0),
                    std::net::Ipv4Addr::new(10, 12, 0, 0),
                )
                .unwrap(),
                slots: Mutex::new(BTreeMap::new()),
            })
        }

        pub fn plan(&self) -> AddressPlan {
            self.plan.clone()
        }
    }

    impl SlotBackend for FakeBackend {
        fn create(
            &self,
            index: i64,
            guest: GuestLink,
            policy: PolicyRequest,
        ) -> BoxFuture<'_, Result<(SlotView, bool), ControllerError>> {
            Box::pin(async move {
                let addr = self.plan.slot(index)?;
                let mut slots = self.slots.lock().unwrap();
                if let Some(existing) = slots.get(&addr.index) {
                    if existing.guest != guest {
                        return Err(ControllerError::Conflict(format!(
                            "slot {index} exists with another guest link"
                        )));
                    }
                    return match policy.mismatch(addr.index, &existing.policy) {
                        None => Ok((existing.clone(), false)),
                        Some(why) => Err(ControllerError::Conflict(why)),
                    };
                }
                let view = SlotView {
                    addr,
                    guest,
                    policy: policy.to_policy(),
                };
                slots.insert(view.addr.index, view.clone());
                Ok((view, true))
            })
        }

        fn set_egress(
            &self,
            index: i64,
            egress: EgressRules,
        ) -> BoxFuture<'_, Result<SlotView, ControllerError>> {
            Box::pin(async move {
                let mut slots = self.slots.lock().unwrap();
                let slot = slots
                    .get_mut(&(index as u32))
                    .ok_or(ControllerError::NotFound(index))?;
                slot.policy.egress = egress;
                Ok(slot.clone())
            })
        }

        fn set_rate_limit(
            &self,
            index: i64,
            limit: Option<RateLimitSpec>,
        ) -> BoxFuture<'_, Result<SlotView, ControllerError>> {
            Box::pin(async move {
                let mut slots = self.slots.lock().unwrap();
                let slot = slots
                    .get_mut(&(index as u32))
                    .ok_or(ControllerError::NotFound(index))?;
                slot.policy.rate_limit = limit;
                Ok(slot.clone())
            })
        }

        fn delete(&self, index: i64) -> BoxFuture<'_, Result<(), ControllerError>> {
            Box::pin(async move {
                let mut slots = self.slots.lock().unwrap();
                slots
                    .remove(&(index as u32))
                    .map(|_| ())
                    .ok_or(ControllerError::NotFound(index))
            })
        }

        fn get(&self, index: i64) -> Result<SlotView, ControllerError> {
            let slots = self.slots.lock().unwrap();
            slots
                .get(&(index as u32))
                .cloned()
                .ok_or(ControllerError::NotFound(index))
        }

        fn list(&self) -> Vec<SlotView> {
            self.slots.lock().unwrap().values().cloned().collect()
        }

        fn stats(&self, index: i64) -> Result<SlotStats, ControllerError> {
            self.get(index)?;
            let mut stats = SlotStats::default();
            stats.counters[Counter::FROM_GUEST_PACKETS] = 3;
            stats.counters[Counter::FROM_GUEST_BYTES] = 300;
            Ok(stats)
        }

        fn tables(&self) -> Result<Vec<TableGauge>, ControllerError> {
            Ok(vec![TableGauge {
                table: "nat_egress".into(),
                entries: 0,
                capacity: 16,
            }])
        }

        fn programs(&self) -> (u64, u64) {
            (4, 1 + 3 * self.slots.lock().unwrap().len() as u64)
        }

        fn reap(&self) -> BoxFuture<'_, Result<Reaped, ControllerError>> {
            Box::pin(async { Ok(Reaped::default()) })
        }

        fn shutdown(&self) -> BoxFuture<'_, Result<(), ControllerError>> {
            Box::pin(async {
                self.slots.lock().unwrap().clear();
                Ok(())
            })
        }

        fn verify(&self) -> BoxFuture<'_, Result<VerifyReport, ControllerError>> {
            Box::pin(async {
                let n = self.slots.lock().unwrap().len();
                Ok(VerifyReport::new(self.plan.prefix(), n, Vec::new()))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeBackend;
    use super::*;

    fn controller() -> Controller {
        let backend = FakeBackend::new();
        let plan = backend.plan();
        Controller::new(backend, plan, 32768)
    }

    #[tokio::test]
    async fn create_is_idempotent_and_conflicts_on_another_guest() {
        let c = controller();
        let create = |guest| Action::CreateSlot {
            index: 5,
            guest,
            policy: PolicyRequest::default(),
        };
        let Outcome::Slot { created, slot } = c.apply(create(GuestLink::Tap)).await.unwrap() else {
            panic!()
        };
        assert!(created);
        assert_eq!(slot.addr.host_ip.to_string(), "10.11.0.5");
        let Outcome::Slot { created, .. } = c.apply(create(GuestLink::Tap)).await.unwrap() else {
            panic!()
        };
        assert!(!created);
        let other = GuestLink::Veth {
            guest_netns: "g".into(),
        };
        assert!(matches!(
            c.apply(create(other)).await,
            Err(ControllerError::Conflict(_))
        ));
    }

    #[tokio::test]
    async fn indices_are_checked_before_the_backend() {
        let c = Controller::new(FakeBackend::new(), FakeBackend::new().plan(), 100);
        for bad in [0, -1, 32768] {
            let err = c.apply(Action::GetSlot { index: bad }).await.unwrap_err();
            assert!(matches!(err, ControllerError::Index(_)), "{err}");
        }
        let err = c
            .apply(Action::DeleteSlot { index: 100 })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("1 to 99"), "{err}");
        let bad = GuestLink::Veth {
            guest_netns: "../x".into(),
        };
        let err = c
            .apply(Action::CreateSlot {
                index: 1,
                guest: bad,
                policy: PolicyRequest::default(),
            })
            .await
            .unwrap_err();
        assert!(matches!(err, ControllerError::BadRequest(_)));
    }

    #[tokio::test]
    async fn shutdown_refuses_changes_and_turns_health_red() {
        let c = controller();
        c.shutdown().await.unwrap();
        let err = c
            .apply(Action::CreateSlot {
                index: 1,
                guest: GuestLink::Tap,
                policy: PolicyRequest::default(),
            })
            .await
            .unwrap_err();
        assert!(matches!(err, ControllerError::Unavailable(_)));
        let Outcome::Health { healthy, health } = c.apply(Action::Health).await.unwrap() else {
            panic!()
        };
        assert!(!healthy);
        assert_eq!(health.status, "stopping");
    }

    #[test]
    fn slot_view_json_extends_the_design_shape() {
        let plan = FakeBackend::new().plan();
        let v = SlotView {
            addr: plan.slot(1).unwrap(),
            guest: GuestLink::Tap,
            policy: SlotPolicy::default(),
        };
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["namespace"], "wrenn-ns-1");
        assert_eq!(json["guest_link"], "tap");
        assert_eq!(json["guest_mac"], serde_json::Value::Null);
        assert_eq!(json["egress"], serde_json::json!({"allow": [], "deny": []}));
        assert_eq!(json["rate_limit"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<SlotView>(json).unwrap(), v);
        let v = SlotView {
            addr: plan.slot(2).unwrap(),
            guest: GuestLink::Veth {
                guest_netns: "g1".into(),
            },
            policy: SlotPolicy {
                guest_mac: Some("02:00:00:00:00:07".parse().unwrap()),
                egress: EgressRules {
                    allow: vec!["10.1.0.0/16".parse().unwrap()],
                    deny: vec!["198.18.9.0/24".parse().unwrap()],
                },
                rate_limit: Some(RateLimitSpec {
                    bits_per_second: 20_000_000,
                    burst_bytes: 65_536,
                }),
            },
        };
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["guest_netns"], "g1");
        assert_eq!(json["guest_mac"], "02:00:00:00:00:07");
        assert_eq!(json["egress"]["allow"][0], "10.1.0.0/16");
        assert_eq!(json["rate_limit"]["bits_per_second"], 20_000_000);
        assert_eq!(serde_json::from_value::<SlotView>(json).unwrap(), v);
    }
}
