//! Flow expiry: entries idle longer than their protocol/state timeout are
//! removed, both directions of a masquerade flow together. The datapath stamps
//! `last_seen_ns` with `bpf_ktime_get_coarse_ns` (`CLOCK_MONOTONIC_COARSE`, at
//! most a tick behind `CLOCK_MONOTONIC`, which the reaper reads: a flow may
//! live a tick longer than its timeout).

use netagent_common::{
    FlowKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, NatEntry, STATE_FIN_ORIG, STATE_FIN_REPLY,
    STATE_REPLIED, STATE_RST, flow_scope,
};

use super::maps::FlowTable;
use super::{BpfError, Datapath, TableUsage};
use crate::config::Timeouts;

/// What one reaper pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReapReport {
    /// Masquerade flows removed (each is an egress and an ingress entry).
    pub nat_flows: usize,
    /// Stray masquerade entries removed (one direction without the other).
    pub nat_orphans: usize,
    /// Host → guest flows removed.
    pub host_flows: usize,
    /// Entries left in each table after the pass (counted on the way, so a
    /// reader of the occupancy need not walk the tables again).
    pub usage: TableUsage,
}

impl ReapReport {
    /// Everything removed.
    pub fn total(&self) -> usize {
        self.nat_flows + self.nat_orphans + self.host_flows
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the flows' `last_seen_ns`.
pub(super) fn monotonic_ns() -> Result<u64, BpfError> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_err(|e| BpfError::syscall("clock_gettime(CLOCK_MONOTONIC)", e.into()))?;
    Ok(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

/// The idle timeout, in nanoseconds, of a flow of protocol `proto` whose two
/// directions together have the `STATE_*` bits `state`.
pub fn timeout_ns(timeouts: &Timeouts, proto: u8, state: u32) -> u64 {
    let secs = match proto {
        IPPROTO_TCP => {
            if state & STATE_RST != 0
                || state & (STATE_FIN_ORIG | STATE_FIN_REPLY) == (STATE_FIN_ORIG | STATE_FIN_REPLY)
            {
                timeouts.tcp_closing
            } else if state & STATE_REPLIED != 0 {
                timeouts.tcp_established
            } else {
                timeouts.tcp_opening
            }
        }
        IPPROTO_UDP => timeouts.udp,
        IPPROTO_ICMP => timeouts.icmp,
        _ => timeouts.udp,
    };
    secs.saturating_mul(1_000_000_000)
}

/// The NAT_INGRESS key of the masquerade flow whose NAT_EGRESS entry is `(k, e)`.
pub fn reverse_of_egress(k: &FlowKey, e: &NatEntry) -> FlowKey {
    FlowKey::new(k.daddr, e.addr, k.dport, e.port, k.proto)
}

/// The NAT_EGRESS key of the masquerade flow whose NAT_INGRESS entry is `(k, e)`.
pub fn egress_of_reverse(k: &FlowKey, e: &NatEntry) -> FlowKey {
    FlowKey::new(e.addr, k.saddr, e.port, k.sport, k.proto).in_scope(flow_scope(e.state))
}

impl Datapath {
    /// Removes flows idle longer than their timeout; returns how many.
    pub fn reap(&mut self, timeouts: &Timeouts) -> Result<ReapReport, BpfError> {
        self.reap_at(timeouts, monotonic_ns()?)
    }

    /// `reap` as if the time (`CLOCK_MONOTONIC`) were `now_ns` (tests).
    pub fn reap_at(&mut self, timeouts: &Timeouts, now_ns: u64) -> Result<ReapReport, BpfError> {
        let mut report = ReapReport {
            usage: TableUsage {
                nat_capacity: self.cfg.nat_table_size,
                host_flow_capacity: self.cfg.host_flow_table_size,
                ..TableUsage::default()
            },
            ..ReapReport::default()
        };
        let maps = &mut self.maps;

        // Masquerade flows: judged on both directions together.
        let egress_flows = maps.flows(FlowTable::NatEgress)?;
        report.usage.nat_egress = egress_flows.len();
        for (key, egress) in egress_flows {
            let rkey = reverse_of_egress(&key, &egress);
            let ingress = maps.flow(FlowTable::NatIngress, &rkey)?;
            let (state, last) = match &ingress {
                Some(i) => (
                    egress.state | i.state,
                    egress.last_seen_ns.max(i.last_seen_ns),
                ),
                None => (egress.state, egress.last_seen_ns),
            };
            if now_ns.saturating_sub(last) > timeout_ns(timeouts, key.proto, state) {
                // Reply direction first: a reply arriving in between finds no entry
                // and goes to the host, rather than to a flow about to vanish.
                maps.remove_flow(FlowTable::NatIngress, &rkey)?;
                maps.remove_flow(FlowTable::NatEgress, &key)?;
                report.usage.nat_egress -= 1;
                if ingress.is_some() {
                    report.nat_flows += 1;
                } else {
                    report.nat_orphans += 1;
                }
            }
        }
        // Reply entries whose egress entry is gone (an allocation undone halfway, or
        // a flow removed above between the two deletes).
        let ingress_flows = maps.flows(FlowTable::NatIngress)?;
        report.usage.nat_ingress = ingress_flows.len();
        for (key, ingress) in ingress_flows {
            let ekey = egress_of_reverse(&key, &ingress);
            if maps.flow(FlowTable::NatEgress, &ekey)?.is_none()
                && now_ns.saturating_sub(ingress.last_seen_ns)
                    > timeout_ns(timeouts, key.proto, ingress.state)
            {
                maps.remove_flow(FlowTable::NatIngress, &key)?;
                report.usage.nat_ingress -= 1;
                report.nat_orphans += 1;
            }
        }
        let host_flows = maps.flows(FlowTable::HostFlows)?;
        report.usage.host_flows = host_flows.len();
        for (key, flow) in host_flows {
            if now_ns.saturating_sub(flow.last_seen_ns)
                > timeout_ns(timeouts, key.proto, flow.state)
            {
                maps.remove_flow(FlowTable::HostFlows, &key)?;
                report.usage.host_flows -= 1;
                report.host_flows += 1;
            }
        }
        Ok(report)
    }
}
