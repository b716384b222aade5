//! Cutting the guest flows a change denies. The guest's packets of an
//! established masquerade flow (`STATE_GUEST` in `NAT_EGRESS`) take the fast
//! path, which looks up neither the egress policy nor `LOCAL_ADDRS`: the
//! policy is evaluated only when a flow is allocated. So whenever a slot's
//! rules, the default deny list or `LOCAL_ADDRS` change, the flows whose
//! destination the new state denies (or makes a host address) are removed,
//! both halves (`NAT_INGRESS`, then `NAT_EGRESS`, as the reaper does). The
//! guest's next packet of such a flow goes the slow way and meets the policy.
//! The guest's flows to host addresses always take the slow way, but their
//! `HOST_FLOWS` entries let the host's replies through: those the new state
//! denies go too.
//!
//! Order: the change is written first, then the kernel is asked to wait for
//! an RCU grace period (`membarrier(MEMBARRIER_CMD_GLOBAL)`, i.e.
//! `synchronize_rcu`, a few milliseconds), so that every program run that may
//! have read the old rules and be allocating a flow with them has finished;
//! only then is `NAT_EGRESS` walked (in batches) and evaluated
//! (`EgressView`, the datapath's evaluation in userspace). A flow allocated
//! after the change met the new rules.

use std::collections::HashMap;

use netagent_common::{SLOT_F_ACTIVE, STATE_GUEST};

use super::maps::FlowTable;
use super::reap::reverse_of_egress;
use super::{BpfError, Datapath};

/// `MEMBARRIER_CMD_GLOBAL`: returns after an RCU grace period.
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// Waits until every datapath program run that began before now has ended.
/// Without `membarrier` (a `nohz_full` kernel refuses this command) a pause
/// far longer than any program run stands in for it.
fn wait_for_running_programs() {
    // SAFETY: membarrier takes two integer arguments and touches no memory of
    // ours.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Datapath {
    /// After a change of the policy or of LOCAL_ADDRS (`changed`): cuts the
    /// guest flows it denies for `slot` (`None`: every slot). A slot not
    /// attached has no flows and no traffic: nothing to cut. A cut that failed
    /// is owed (`purge_pending`) and done for every slot by the next call,
    /// changed or not.
    pub(super) fn cut_denied_flows(
        &mut self,
        slot: Option<u32>,
        changed: bool,
    ) -> Result<(), BpfError> {
        let scope = if self.purge_pending {
            None
        } else if !changed {
            return Ok(());
        } else {
            slot
        };
        if let Some(index) = scope
            && self.maps.slot(index)?.flags & SLOT_F_ACTIVE == 0
        {
            return Ok(());
        }
        self.purge_pending = true;
        let removed = self.purge_denied_flows(scope)?;
        self.purge_pending = false;
        if removed > 0 {
            tracing::info!(
                slot = ?scope,
                flows = removed,
                "cut guest flows the new egress policy or host addresses deny"
            );
        }
        Ok(())
    }

    /// Removes both halves of every guest masquerade flow of `slot` (`None`:
    /// every slot) the current policy and `LOCAL_ADDRS` deny, and every flow
    /// its guest opened to a host address that the policy now denies (in
    /// `HOST_FLOWS`, keyed to the slot's vpeer address: the host's replies
    /// would still reach the guest); returns how many flows.
    pub(super) fn purge_denied_flows(&mut self, slot: Option<u32>) -> Result<usize, BpfError> {
        wait_for_running_programs();
        let in_scope = |s: u32| slot.is_none_or(|want| want == s);
        let masquerade: Vec<_> = self
            .maps
            .flows(FlowTable::NatEgress)?
            .into_iter()
            .filter(|(_, e)| e.state & STATE_GUEST != 0 && in_scope(e.slot))
            .collect();
        let mut vpeers = HashMap::new();
        let mut to_host = Vec::new();
        for (key, entry) in self.maps.flows(FlowTable::HostFlows)? {
            if !in_scope(entry.slot) {
                continue;
            }
            let vpeer = match vpeers.get(&entry.slot) {
                Some(&v) => v,
                None => {
                    let v = self.maps.slot(entry.slot)?.vpeer_ip;
                    vpeers.insert(entry.slot, v);
                    v
                }
            };
            // The others are the host's flows to HostIP, which no egress rule cuts.
            if key.daddr == vpeer {
                to_host.push((key, entry));
            }
        }
        let mut slots: Vec<u32> = masquerade
            .iter()
            .chain(&to_host)
            .map(|(_, e)| e.slot)
            .collect();
        slots.sort_unstable();
        slots.dedup();
        if slots.is_empty() {
            return Ok(0);
        }
        let view = self.egress_view(&slots)?;
        let mut removed = 0;
        for (key, entry) in masquerade {
            if view.keeps_masquerade_flow(entry.slot, key.daddr) {
                continue;
            }
            self.maps
                .remove_flow(FlowTable::NatIngress, &reverse_of_egress(&key, &entry))?;
            self.maps.remove_flow(FlowTable::NatEgress, &key)?;
            removed += 1;
        }
        // Keyed as the host's side arrives: the address the guest reached is the source.
        for (key, entry) in to_host {
            if view.egress_check(entry.slot, key.saddr).is_ok() {
                continue;
            }
            self.maps.remove_flow(FlowTable::HostFlows, &key)?;
            removed += 1;
        }
        Ok(removed)
    }
}
