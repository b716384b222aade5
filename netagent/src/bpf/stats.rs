//! Counters, table occupancy and the `LOCAL_ADDRS` set.

use netagent_common::SlotStats;

use super::maps::FlowTable;
use super::{BpfError, Datapath};

/// Occupancy of the flow tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableUsage {
    /// Entries in NAT_EGRESS.
    pub nat_egress: usize,
    /// Entries in NAT_INGRESS.
    pub nat_ingress: usize,
    /// Capacity of each NAT table.
    pub nat_capacity: u32,
    /// Entries in HOST_FLOWS.
    pub host_flows: usize,
    /// Capacity of HOST_FLOWS.
    pub host_flow_capacity: u32,
}

impl Datapath {
    /// Counters of one slot summed over CPUs.
    pub fn slot_stats(&self, index: u32) -> Result<SlotStats, BpfError> {
        self.check_index(index)?;
        self.maps.stats(index)
    }

    /// Counters that could not be attributed to a slot (STATS entry 0).
    pub fn unattributed_stats(&self) -> Result<SlotStats, BpfError> {
        self.maps.stats(0)
    }

    /// Occupancy of the NAT and host-flow tables.
    pub fn table_usage(&self) -> Result<TableUsage, BpfError> {
        Ok(TableUsage {
            nat_egress: self.maps.flow_count(FlowTable::NatEgress)?,
            nat_ingress: self.maps.flow_count(FlowTable::NatIngress)?,
            nat_capacity: self.cfg.nat_table_size,
            host_flows: self.maps.flow_count(FlowTable::HostFlows)?,
            host_flow_capacity: self.cfg.host_flow_table_size,
        })
    }

    /// Replaces LOCAL_ADDRS: slot traffic to these addresses (the agent
    /// namespace's own) goes up the host stack instead of being masqueraded.
    /// When the set changed, every slot's guest flows to a new host address
    /// are cut (`purge`).
    pub fn set_local_addrs(&mut self, addrs: &[std::net::Ipv4Addr]) -> Result<(), BpfError> {
        let changed = self.maps.set_local_addrs(addrs)?;
        self.cut_denied_flows(None, changed)
    }
}
