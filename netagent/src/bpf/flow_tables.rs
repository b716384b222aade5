//! The three flow tables on file descriptors of their own, so that a walk of
//! every flow — the purge of deleted slots' flows (`slot::flow_purge`), ~10 ms at 65,536 entries —
//! runs without holding the datapath (and so without stalling the creates and
//! deletes behind it). The kernel serializes map operations itself; the only
//! other writers are the programs, the reaper and the policy cut, and a flow
//! that one of them removed first is simply gone.

use std::collections::BTreeSet;
use std::os::fd::AsFd;

use aya::maps::{HashMap, Map, MapData, MapError};
use netagent_common::{FlowKey, NatEntry};

use super::maps::{FlowTable, ignore_missing};
use super::{BpfError, Datapath};

/// The flow tables, opened again (see the module doc).
pub struct FlowTables {
    tables: [(FlowTable, HashMap<MapData, FlowKey, NatEntry>); 3],
}

impl Datapath {
    /// The flow tables on fds of their own, for walks outside the datapath lock.
    pub fn flow_tables(&self) -> Result<FlowTables, BpfError> {
        let open = |t: FlowTable| -> Result<_, BpfError> {
            let fd = self
                .maps
                .table_fd(t)
                .try_clone_to_owned()
                .map_err(|e| BpfError::syscall(format!("dup of the {} fd", t.map_name()), e))?;
            let data = MapData::from_fd(fd).map_err(|e| BpfError::map(t.map_name(), "open", e))?;
            let map =
                Map::from_map_data(data).map_err(|e| BpfError::map(t.map_name(), "open", e))?;
            let table =
                HashMap::try_from(map).map_err(|e| BpfError::map(t.map_name(), "open", e))?;
            Ok((t, table))
        };
        let [a, b, c] = FlowTable::ALL;
        Ok(FlowTables {
            tables: [open(a)?, open(b)?, open(c)?],
        })
    }
}

impl FlowTables {
    /// Deletes every flow of the slots `slots` from all three tables, in one
    /// walk; returns how many.
    pub fn remove_flows_of(&mut self, slots: &BTreeSet<u32>) -> Result<usize, BpfError> {
        remove_flows_in(self.tables.iter_mut().map(|(t, m)| (*t, m)), |slot| {
            slots.contains(&slot)
        })
    }
}

/// Deletes every flow of a slot `of` picks from `tables`; returns how many.
pub(super) fn remove_flows_in<'a>(
    tables: impl IntoIterator<Item = (FlowTable, &'a mut HashMap<MapData, FlowKey, NatEntry>)>,
    of: impl Fn(u32) -> bool,
) -> Result<usize, BpfError> {
    let mut removed = 0;
    for (t, table) in tables {
        for (key, entry) in read_all(t, table)? {
            if of(entry.slot) {
                ignore_missing(table.remove(&key))
                    .map_err(|e| BpfError::map(t.map_name(), "delete", e))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Every entry of the flow table `t` (`map`): in batches, or key by key on a
/// kernel without batch operations.
pub(super) fn read_all(
    t: FlowTable,
    map: &HashMap<MapData, FlowKey, NatEntry>,
) -> Result<Vec<(FlowKey, NatEntry)>, BpfError> {
    match super::batch::lookup_all(aya::maps::IterableMap::map(map).fd().as_fd()) {
        Ok(all) => return Ok(all),
        Err(e) if super::batch::unsupported(&e) => {}
        Err(e) => {
            return Err(BpfError::syscall(
                format!("BPF_MAP_LOOKUP_BATCH on {}", t.map_name()),
                e,
            ));
        }
    }
    let mut out = Vec::new();
    for key in map.keys() {
        let key = key.map_err(|e| BpfError::map(t.map_name(), "iterate", e))?;
        match map.get(&key, 0) {
            Ok(v) => out.push((key, v)),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(BpfError::map(t.map_name(), "lookup", e)),
        }
    }
    Ok(out)
}
