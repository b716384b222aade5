//! `SlotManager`: the agent's slots, their creation and deletion, and the datapath
//! they share (see the contract in `slot/mod.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use netagent_common::SlotStats;

use super::flow_purge::FlowPurger;
use crate::bpf::{
    Datapath, DatapathConfig, EgressRules, ReapReport, SlotDatapath, TableUsage, Uplink,
};
use crate::config::Config;
use crate::memory::Trimmer;
use crate::netlink::{Netlink, netns, netns_pool::NetnsPool, sysctl, tc::TcSocket};

use super::adopt::{self, AdoptReport};
use super::create::{self, CreateStep};
use super::delete::{self, DeleteStep};
use super::error::{SlotError, StepError};
use super::local_addrs;
use super::policy::{PolicyRequest, RateLimitSpec, SlotPolicy, validate_egress};
use super::{AddressPlan, GuestLink, Slot, SlotAddr};

/// Owns the slots of one agent (one prefix) and the datapath.
pub struct SlotManager {
    cfg: Config,
    plan: AddressPlan,
    /// The agent (host) namespace: the namespace of the thread that called `start`.
    host_ns: OwnedFd,
    host: Netlink,
    /// A tc socket in the agent namespace, for the slots' host veth filters.
    host_tc: Mutex<TcSocket>,
    uplink: Uplink,
    datapath: Mutex<Option<Datapath>>,
    slots: Mutex<BTreeMap<u32, Slot>>,
    locks: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
    /// Parts of the masquerade range this agent added to `ip_local_reserved_ports`.
    reserved: Mutex<Vec<sysctl::PortRange>>,
    /// The task that keeps LOCAL_ADDRS current (see `local_addrs`).
    addr_monitor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// What start-up did with the previous run's slots.
    startup: Mutex<Option<AdoptReport>>,
    /// Namespaces made ready for the next creates.
    netns_pool: NetnsPool,
    /// Trims the heap once creates and deletes pause.
    trimmer: Trimmer,
    /// Removes deleted slots' flows after the deletes answered.
    flow_purger: FlowPurger,
    #[cfg(feature = "fault-injection")]
    fail_at: Mutex<Option<CreateStep>>,
    #[cfg(feature = "fault-injection")]
    fail_delete: Mutex<Vec<DeleteStep>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f`, which blocks (program loads, a namespace thread, the datapath lock),
/// without stalling the other tasks of a multi-threaded runtime's worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn start_err(step: &'static str) -> impl FnOnce(StepError) -> SlotError {
    move |source| SlotError::Start { step, source }
}

impl SlotManager {
    /// Starts the manager in the calling thread's network namespace (the agent's
    /// "host" namespace): finds the uplink (configured, or the default route's
    /// interface) and its IPv4 address, loads the datapath (reusing a previous
    /// run's pinned maps when their layout matches) and attaches the uplink
    /// program (replacing the previous run's in place), writes the default
    /// egress deny list (`egress_default_deny`), fills LOCAL_ADDRS with the
    /// namespace's addresses (and starts the task that keeps it current),
    /// reserves the masquerade ports, then adopts the previous run's intact
    /// slots and removes everything else of the prefix (see `adopt`), logging
    /// a one-line summary. Must run inside a tokio runtime.
    pub async fn start(cfg: &Config) -> Result<Arc<SlotManager>, SlotError> {
        let plan = AddressPlan::new(&cfg.prefix, cfg.host_base, cfg.vrt_base)
            .map_err(|e| start_err("check the configuration")(StepError::Other(e.to_string())))?;
        let host_ns =
            netns::current().map_err(|e| start_err("open the agent namespace")(e.into()))?;
        let host = Netlink::connect_in(host_ns.as_fd())
            .map_err(|e| start_err("connect to rtnetlink")(e.into()))?;
        let host_tc = TcSocket::open().map_err(|e| start_err("open a tc socket")(e.into()))?;

        let uplink = find_uplink(&host, cfg.uplink.as_deref()).await?;
        tracing::info!(uplink = %uplink.name, ip = %uplink.ipv4, "uplink");

        let mut dp = Datapath::load(&DatapathConfig::from_config(cfg))
            .map_err(|e| start_err("load the datapath")(e.into()))?;
        let (reused, layout_mismatch, layout_id) = (
            dp.reused_pins(),
            dp.layout_mismatch().to_vec(),
            dp.layout_id(),
        );
        netns::run_in(host_ns.as_fd(), || dp.attach_uplink(&uplink))
            .map_err(|e| start_err("attach the uplink program")(e.into()))?
            .map_err(|e| start_err("attach the uplink program")(e.into()))?;
        dp.set_default_egress(&cfg.egress_default_deny)
            .map_err(|e| start_err("write the default egress deny list")(e.into()))?;
        let locals: Vec<_> = host
            .addr_list()
            .await
            .map_err(|e| start_err("list the agent namespace's addresses")(e.into()))?
            .into_iter()
            .map(|a| a.ip)
            .collect();
        dp.set_local_addrs(&local_addrs::host_addrs(
            &locals,
            cfg.host_base,
            cfg.vrt_base,
        ))
        .map_err(|e| start_err("fill LOCAL_ADDRS")(e.into()))?;
        let range = sysctl::PortRange {
            min: cfg.nat.port_min,
            max: cfg.nat.port_max,
        };
        let reserved = sysctl::reserve_ports(host_ns.as_fd(), range).map_err(|e| {
            start_err("reserve the masquerade ports (ip_local_reserved_ports)")(e.into())
        })?;

        let flow_purger = dp
            .flow_tables()
            .map_err(|e| start_err("open the flow tables")(e.into()))
            .and_then(|t| {
                FlowPurger::start(t).map_err(|e| {
                    start_err("start the flow purge thread")(StepError::Other(e.to_string()))
                })
            })?;
        let mgr = Arc::new(SlotManager {
            cfg: cfg.clone(),
            plan,
            host_ns,
            host,
            host_tc: Mutex::new(host_tc),
            uplink,
            datapath: Mutex::new(Some(dp)),
            slots: Mutex::new(BTreeMap::new()),
            locks: Mutex::new(HashMap::new()),
            reserved: Mutex::new(reserved),
            addr_monitor: Mutex::new(None),
            startup: Mutex::new(None),
            netns_pool: NetnsPool::start(cfg.netns_pool),
            trimmer: Trimmer::spawn(),
            flow_purger,
            #[cfg(feature = "fault-injection")]
            fail_at: Mutex::new(None),
            #[cfg(feature = "fault-injection")]
            fail_delete: Mutex::new(Vec::new()),
        });
        // The previous run's slots: adopt the intact, remove the rest, then
        // whatever else of the prefix is left (namespaces, veths, routes).
        let adopted = adopt::adopt_previous(&mgr).await;
        let keep: BTreeSet<u32> = adopted.adopted.iter().copied().collect();
        let report = crate::cleanup::remove_leftovers_except(&cfg.prefix, &mgr.host, &keep)
            .await
            .map_err(|e| {
                start_err("remove leftovers of a previous run")(StepError::Other(e.to_string()))
            })?;
        let removed: Vec<String> = adopted
            .removed
            .iter()
            .map(|(i, why)| format!("slot {i} ({why})"))
            .collect();
        let summary = format!(
            "start-up: maps {} (layout {layout_id}); uplink hook {}; adopted {} slot(s) {:?}; removed {} slot(s) that could not be adopted{}{}; \
             removed leftovers: {} namespace(s), {} link(s), {} route(s)",
            if reused {
                "reused from the previous run".to_string()
            } else if layout_mismatch.is_empty() {
                "new".to_string()
            } else {
                format!("new (layout mismatch: {})", layout_mismatch.join("; "))
            },
            if mgr.with_datapath(|dp| dp.uplink_adopted()).unwrap_or(false) {
                "taken over (program replaced)"
            } else {
                "attached"
            },
            adopted.adopted.len(),
            adopted.adopted,
            removed.len(),
            if removed.is_empty() { "" } else { ": " },
            removed.join(", "),
            report.namespaces.len(),
            report.links.len(),
            report.routes,
        );
        if removed.is_empty() && layout_mismatch.is_empty() && !report.removed_anything() {
            tracing::info!(adopted = adopted.adopted.len(), "{summary}");
        } else {
            tracing::warn!(
                adopted = adopted.adopted.len(),
                removed = removed.len(),
                "{summary}"
            );
        }
        let mut failures = adopted.failures.clone();
        failures.extend(report.failures);
        if !failures.is_empty() {
            return Err(start_err("remove leftovers of a previous run")(
                StepError::Other(failures.join("; ")),
            ));
        }
        // Every slot left runs this build's programs now: replies may be
        // translated for the guest on the uplink (see `CONFIG_F_TO_GUEST_MARK`).
        mgr.with_datapath(|dp| dp.set_to_guest_mark(true))?
            .map_err(|e| start_err("let the uplink translate replies for the guests")(e.into()))?;
        *lock(&mgr.startup) = Some(adopted.clone());
        let monitor = local_addrs::spawn_monitor(Arc::downgrade(&mgr), mgr.host_ns.as_fd())
            .map_err(|e| start_err("watch the agent namespace's addresses")(e.into()))?;
        *lock(&mgr.addr_monitor) = Some(monitor);
        // An address added between the listing above and the subscription.
        local_addrs::refresh(&mgr).await?;
        Ok(mgr)
    }

    /// What start-up did with the previous run's slots (adopted, removed).
    pub fn startup_report(&self) -> Option<AdoptReport> {
        lock(&self.startup).clone()
    }

    /// The address plan (prefix and bases).
    pub fn plan(&self) -> &AddressPlan {
        &self.plan
    }

    /// The uplink in use.
    pub fn uplink(&self) -> &Uplink {
        &self.uplink
    }

    /// The configuration the manager started with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn addr_of(&self, index: i64) -> Result<SlotAddr, SlotError> {
        let addr = self.plan.slot(index)?;
        if addr.index >= self.cfg.max_slots {
            return Err(SlotError::InvalidIndex(format!(
                "slot index {index} is out of range: this agent runs with max_slots = {}, so use 1 to {}",
                self.cfg.max_slots,
                self.cfg.max_slots - 1
            )));
        }
        Ok(addr)
    }

    fn index_lock(&self, index: u32) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.locks).entry(index).or_default().clone()
    }

    /// Creates slot `index`. Idempotent: the same index with the same guest link
    /// gives `Ok((slot, false))`; a different guest link is `SlotError::Conflict`.
    /// All-or-nothing: on failure nothing of the slot is left.
    pub async fn create(
        &self,
        index: i64,
        guest: GuestLink,
    ) -> Result<(SlotAddr, bool), SlotError> {
        let (slot, created) = self
            .create_with(index, guest, PolicyRequest::default())
            .await?;
        Ok((slot.addr, created))
    }

    /// Creates slot `index` with the security settings `policy` (applied in the
    /// Datapath step, so a failure leaves nothing). For a slot that exists, the
    /// guest link and every setting the request gives must match what it has
    /// (`Ok((slot, false))`), else `SlotError::Conflict` says which differs and
    /// how to change it.
    pub async fn create_with(
        &self,
        index: i64,
        guest: GuestLink,
        policy: PolicyRequest,
    ) -> Result<(Slot, bool), SlotError> {
        let addr = self.addr_of(index)?;
        policy.validate().map_err(SlotError::InvalidPolicy)?;
        let _trim = self.trimmer.poke_when_done();
        let index_lock = self.index_lock(addr.index);
        let _held = index_lock.lock().await;
        if lock(&self.datapath).is_none() {
            return Err(SlotError::ShutDown);
        }
        if let Some(existing) = lock(&self.slots).get(&addr.index) {
            if existing.guest != guest {
                return Err(SlotError::Conflict(format!(
                    "slot {index} exists with guest link {:?}; delete it first to change it to {:?}",
                    existing.guest, guest
                )));
            }
            return match policy.mismatch(addr.index, &existing.policy) {
                None => Ok((existing.clone(), false)),
                Some(why) => Err(SlotError::Conflict(why)),
            };
        }
        let policy = policy.to_policy();
        create::create(self, &addr, &guest, &policy).await?;
        // Last: the record says the create finished (a restart adopts the slot).
        if let Err(e) = adopt::write_record(self.plan.prefix(), addr.index, &guest) {
            let undone = delete::delete(self, &addr, &guest).await;
            return Err(SlotError::Create {
                index: addr.index,
                step: CreateStep::Datapath,
                source: StepError::Other(format!(
                    "writing the slot record under {}: {e}",
                    adopt::records_dir(self.plan.prefix()).display()
                )),
                rollback: undone,
            });
        }
        let slot = Slot {
            addr: addr.clone(),
            guest,
            policy,
        };
        lock(&self.slots).insert(addr.index, slot.clone());
        tracing::info!(slot = addr.index, ns = %addr.namespace, host_ip = %addr.host_ip, "slot created");
        Ok((slot, true))
    }

    /// Replaces slot `index`'s egress lists. On a datapath failure the previous
    /// lists are put back and the error returned.
    pub async fn set_egress(&self, index: i64, egress: EgressRules) -> Result<Slot, SlotError> {
        validate_egress(&egress).map_err(SlotError::InvalidPolicy)?;
        self.change_policy(index, |p| p.egress = egress).await
    }

    /// Sets (`Some`) or removes (`None`) slot `index`'s rate limit.
    pub async fn set_rate_limit(
        &self,
        index: i64,
        limit: Option<RateLimitSpec>,
    ) -> Result<Slot, SlotError> {
        if let Some(limit) = &limit {
            limit.validate().map_err(SlotError::InvalidPolicy)?;
        }
        self.change_policy(index, |p| p.rate_limit = limit).await
    }

    async fn change_policy(
        &self,
        index: i64,
        change: impl FnOnce(&mut SlotPolicy),
    ) -> Result<Slot, SlotError> {
        let addr = self.addr_of(index)?;
        let index_lock = self.index_lock(addr.index);
        let _held = index_lock.lock().await;
        let Some(mut slot) = lock(&self.slots).get(&addr.index).cloned() else {
            return Err(SlotError::NotFound(index));
        };
        let old = slot.policy.clone();
        change(&mut slot.policy);
        if slot.policy != old {
            if let Err(e) = self.write_policy(addr.index, &slot.policy) {
                if let Err(undo) = self.write_policy(addr.index, &old) {
                    tracing::error!(slot = addr.index, error = %undo, "restoring the previous policy failed");
                }
                return Err(SlotError::Policy {
                    index: addr.index,
                    source: e,
                });
            }
            lock(&self.slots).insert(addr.index, slot.clone());
            tracing::info!(slot = addr.index, policy = ?slot.policy, "slot policy changed");
        }
        Ok(slot)
    }

    /// Writes a slot's guest MAC, egress lists and rate limit into the datapath.
    pub(super) fn write_policy(&self, index: u32, policy: &SlotPolicy) -> Result<(), StepError> {
        blocking(|| {
            let mut guard = lock(&self.datapath);
            let dp = guard
                .as_mut()
                .ok_or(StepError::Other("the datapath is shut down".into()))?;
            dp.set_guest_mac(index, policy.guest_mac.map(|m| m.0))?;
            dp.set_slot_egress(index, &policy.egress)?;
            dp.set_rate_limit(index, policy.rate_limit.map(|r| r.limit()))?;
            Ok(())
        })
    }

    /// Deletes slot `index`: every step is tried, what is already gone counts as
    /// done, all failures are returned together (the slot stays listed then, so
    /// the delete can be retried). `SlotError::NotFound` if the slot is unknown.
    pub async fn delete(&self, index: i64) -> Result<(), SlotError> {
        let addr = self.addr_of(index)?;
        let _trim = self.trimmer.poke_when_done();
        let index_lock = self.index_lock(addr.index);
        let held = index_lock.lock_owned().await;
        let Some(slot) = lock(&self.slots).get(&addr.index).cloned() else {
            return Err(SlotError::NotFound(index));
        };
        // First: without its record a restart never adopts a half-deleted slot.
        let mut failures = Vec::new();
        if let Err(e) = adopt::remove_record(self.plan.prefix(), addr.index) {
            failures.push(format!("remove the slot record: {e}"));
        }
        failures.extend(delete::delete(self, &addr, &slot.guest).await);
        // The slot's flows go after the answer (see `flow_purge`).
        self.flow_purger.purge(addr.index, held);
        if !failures.is_empty() {
            return Err(SlotError::Delete {
                index: addr.index,
                failures,
            });
        }
        lock(&self.slots).remove(&addr.index);
        tracing::info!(slot = addr.index, "slot deleted");
        Ok(())
    }

    /// One slot; `SlotError::NotFound` if unknown.
    pub fn get(&self, index: i64) -> Result<Slot, SlotError> {
        let addr = self.addr_of(index)?;
        lock(&self.slots)
            .get(&addr.index)
            .cloned()
            .ok_or(SlotError::NotFound(index))
    }

    /// Every slot, sorted by index.
    pub fn list(&self) -> Vec<Slot> {
        lock(&self.slots).values().cloned().collect()
    }

    /// One slot's counters summed over CPUs.
    pub fn stats(&self, index: i64) -> Result<SlotStats, SlotError> {
        let slot = self.get(index)?;
        self.with_datapath(|dp| dp.slot_stats(slot.addr.index))?
            .map_err(SlotError::from)
    }

    /// Occupancy of the NAT and host-flow tables.
    pub fn table_usage(&self) -> Result<TableUsage, SlotError> {
        self.with_datapath(|dp| dp.table_usage())?
            .map_err(SlotError::from)
    }

    /// Removes flows idle longer than their timeouts, and refreshes LOCAL_ADDRS
    /// (repairing what a lost address notification missed).
    pub async fn reap(&self) -> Result<ReapReport, SlotError> {
        if let Err(e) = local_addrs::refresh(self).await {
            tracing::warn!(error = %e, "refreshing LOCAL_ADDRS failed");
        }
        let timeouts = self.cfg.timeouts.clone();
        self.with_datapath(|dp| dp.reap(&timeouts))?
            .map_err(SlotError::from)
    }

    /// Deletes every slot, detaches the datapath and releases the reserved ports.
    /// Returns every failure together; calling it again retries what failed.
    pub async fn shutdown(&self) -> Result<(), SlotError> {
        if let Some(monitor) = lock(&self.addr_monitor).take() {
            monitor.abort();
        }
        let mut failures = Vec::new();
        let indices: Vec<u32> = lock(&self.slots).keys().copied().collect();
        for index in indices {
            if let Err(e) = self.delete(i64::from(index)).await {
                failures.push(e.to_string());
            }
        }
        if let Some(mut dp) = lock(&self.datapath).take() {
            match netns::run_in(self.host_ns.as_fd(), || dp.detach_uplink()) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("detach the uplink program: {e}")),
                Err(e) => failures.push(format!("detach the uplink program: {e}")),
            }
            // Dropping the datapath closes every remaining program link.
            drop(dp);
        }
        if failures.is_empty()
            && let Err(e) = adopt::remove_records(self.plan.prefix())
        {
            failures.push(format!("remove the slot records: {e}"));
        }
        let reserved = std::mem::take(&mut *lock(&self.reserved));
        if !reserved.is_empty()
            && let Err(e) = sysctl::unreserve_ports(self.host_ns.as_fd(), &reserved)
        {
            failures.push(format!("release the masquerade ports: {e}"));
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(SlotError::Start {
                step: "shut down",
                source: StepError::Other(failures.join("; ")),
            })
        }
    }

    /// Runs `f` with the datapath (tests and diagnostics read maps through it).
    pub fn with_datapath<T>(&self, f: impl FnOnce(&mut Datapath) -> T) -> Result<T, SlotError> {
        let mut guard = lock(&self.datapath);
        let dp = guard.as_mut().ok_or(SlotError::ShutDown)?;
        Ok(f(dp))
    }

    /// Makes create fail right after `step` has done its work (`None`: never).
    #[cfg(feature = "fault-injection")]
    pub fn set_fail_at(&self, step: Option<CreateStep>) {
        *lock(&self.fail_at) = step;
    }

    /// Makes delete fail at each of `steps` (skipping them, as if the kernel
    /// refused); an empty list: never.
    #[cfg(feature = "fault-injection")]
    pub fn set_fail_delete(&self, steps: &[DeleteStep]) {
        *lock(&self.fail_delete) = steps.to_vec();
    }

    pub(super) fn inject_delete(&self, _step: DeleteStep) -> Result<(), String> {
        #[cfg(feature = "fault-injection")]
        if lock(&self.fail_delete).contains(&_step) {
            return Err("injected failure".into());
        }
        Ok(())
    }

    pub(super) fn inject(&self, _step: CreateStep) -> Result<(), StepError> {
        crash_point("create", _step.name());
        #[cfg(feature = "fault-injection")]
        if *lock(&self.fail_at) == Some(_step) {
            return Err(StepError::Injected);
        }
        Ok(())
    }

    /// A previous run's slot taken over (see `adopt`).
    pub(super) fn insert_adopted(&self, slot: Slot) {
        lock(&self.slots).insert(slot.addr.index, slot);
    }

    /// Takes over a previous run's slot in the datapath (checks its map
    /// entries, replaces its filters' programs).
    pub(super) fn adopt_slot(&self, slot: &SlotDatapath<'_>) -> Result<(), StepError> {
        blocking(|| {
            let mut guard = lock(&self.datapath);
            let dp = guard
                .as_mut()
                .ok_or(StepError::Other("the datapath is shut down".into()))?;
            netns::run_in(self.host_ns.as_fd(), || dp.adopt_slot(slot))??;
            Ok(())
        })
    }

    /// A namespace made ready in the background, if the pool has one.
    pub(super) fn take_prepared_ns(&self) -> Option<netns::Prepared> {
        self.netns_pool.take()
    }

    /// The agent (host) namespace.
    pub(super) fn host_ns(&self) -> std::os::fd::BorrowedFd<'_> {
        self.host_ns.as_fd()
    }

    /// The rtnetlink connection to the agent namespace.
    pub(super) fn host(&self) -> &Netlink {
        &self.host
    }

    /// Attaches a slot's programs; interface indices resolve in the host namespace.
    /// `slot_tc` is a tc socket in the slot's namespace; the host veth's
    /// filter goes through the manager's own tc socket in the agent namespace.
    /// Adds the `ingress` qdisc to the agent namespace's link `ifindex` (a new
    /// slot's host veth, before it is up: see `create`).
    pub(super) fn add_host_ingress_qdisc(&self, ifindex: u32) -> Result<(), StepError> {
        blocking(|| {
            lock(&self.host_tc).add_ingress_qdisc(ifindex)?;
            Ok(())
        })
    }

    pub(super) fn attach_slot(
        &self,
        slot: &SlotDatapath<'_>,
        slot_tc: &mut TcSocket,
    ) -> Result<(), StepError> {
        blocking(|| {
            let mut guard = lock(&self.datapath);
            let dp = guard
                .as_mut()
                .ok_or(StepError::Other("the datapath is shut down".into()))?;
            dp.attach_slot_with(slot, slot_tc, &mut lock(&self.host_tc))?;
            Ok(())
        })
    }

    /// Detaches a deleted slot's programs and map entries, but not its flows
    /// (`purge_flows_after` removes them).
    pub(super) fn detach_slot_keeping_flows(&self, index: u32) -> Result<(), StepError> {
        blocking(|| {
            let mut guard = lock(&self.datapath);
            let Some(dp) = guard.as_mut() else {
                return Ok(());
            };
            dp.detach_slot_keeping_flows(index)?;
            Ok(())
        })
    }

    pub(super) fn detach_slot(&self, index: u32) -> Result<(), StepError> {
        blocking(|| self.detach_slot_now(index))
    }

    fn detach_slot_now(&self, index: u32) -> Result<(), StepError> {
        let mut guard = lock(&self.datapath);
        let Some(dp) = guard.as_mut() else {
            return Ok(());
        };
        dp.detach_slot(index)?;
        Ok(())
    }
}

impl Drop for SlotManager {
    fn drop(&mut self) {
        if let Some(monitor) = lock(&self.addr_monitor).take() {
            monitor.abort();
        }
    }
}

/// `fault-injection` feature only: aborts the process (as `kill -9` would: no
/// destructor, no cleanup) right after step `step` of `op` ("create" or
/// "delete") when the environment variable `NETAGENT_CRASH_AT` is
/// `{op}:{step}`. Tests use it to check what a restart makes of every
/// interrupted state.
pub(super) fn crash_point(_op: &str, _step: &str) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("NETAGENT_CRASH_AT").is_ok_and(|v| v == format!("{_op}:{_step}")) {
        eprintln!("NETAGENT_CRASH_AT={_op}:{_step}: aborting");
        std::process::abort();
    }
}

/// The configured uplink, or the default route's interface, with its first IPv4
/// address.
async fn find_uplink(host: &Netlink, name: Option<&str>) -> Result<Uplink, SlotError> {
    let step = "find the uplink";
    let link = match name {
        Some(name) => host
            .link_by_name(name)
            .await
            .map_err(|e| start_err(step)(e.into()))?
            .ok_or_else(|| {
                start_err(step)(StepError::Other(format!(
                    "the configured uplink {name} does not exist in the agent's namespace: check --uplink"
                )))
            })?,
        None => {
            let route = host
                .route_default()
                .await
                .map_err(|e| start_err(step)(e.into()))?
                .ok_or_else(|| {
                    start_err(step)(StepError::Other(
                        "there is no default route in the agent's namespace: pass --uplink IFACE".into(),
                    ))
                })?;
            let oif = route.oif.ok_or_else(|| {
                start_err(step)(StepError::Other(
                    "the default route has no output interface (multipath?): pass --uplink IFACE".into(),
                ))
            })?;
            host.link_by_index(oif)
                .await
                .map_err(|e| start_err(step)(e.into()))?
                .ok_or_else(|| start_err(step)(StepError::Other(format!("default route interface #{oif} vanished"))))?
        }
    };
    let ipv4 = host
        .addr_list_link(link.index)
        .await
        .map_err(|e| start_err(step)(e.into()))?
        .first()
        .map(|a| a.ip)
        .ok_or_else(|| {
            start_err(step)(StepError::Other(format!(
                "the uplink {} has no IPv4 address to masquerade to",
                link.name
            )))
        })?;
    let veth_peer = link.kind.as_deref() == Some("veth") && link.peer_netnsid.is_some();
    Ok(Uplink {
        ifindex: link.index,
        name: link.name,
        ipv4,
        veth_peer,
    })
}
