//! Typed access to the datapath's maps. The maps are taken out of the `Ebpf`
//! object after loading, so each has one owner here.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use aya::maps::{
    Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use netagent_common::{
    FlowKey, GlobalConfig, GuestL2, MAP_ADDR_SLOTS, MAP_CONFIG, MAP_GUEST_L2, MAP_HOST_FLOWS,
    MAP_LOCAL_ADDRS, MAP_NAT_EGRESS, MAP_NAT_INGRESS, MAP_POLICY, MAP_RATE, MAP_SLOTS, MAP_STATS,
    MAP_VETH_SLOTS, NatEntry, PolicyKey, PolicyRule, RateLimit, SlotInfo, SlotStats,
};

use super::{BpfError, ip_to_map};

/// One of the three flow tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowTable {
    /// Masquerade, original direction.
    NatEgress,
    /// Masquerade, reply direction.
    NatIngress,
    /// Host → guest flows.
    HostFlows,
}

impl FlowTable {
    /// Every table.
    pub const ALL: [FlowTable; 3] = [
        FlowTable::NatEgress,
        FlowTable::NatIngress,
        FlowTable::HostFlows,
    ];

    /// The map's name.
    pub const fn map_name(self) -> &'static str {
        match self {
            FlowTable::NatEgress => MAP_NAT_EGRESS,
            FlowTable::NatIngress => MAP_NAT_INGRESS,
            FlowTable::HostFlows => MAP_HOST_FLOWS,
        }
    }
}

/// The datapath's maps, typed.
pub struct Maps {
    config: Array<MapData, GlobalConfig>,
    slots: Array<MapData, SlotInfo>,
    addr_slots: HashMap<MapData, u32, u32>,
    veth_slots: HashMap<MapData, u32, u32>,
    nat_egress: HashMap<MapData, FlowKey, NatEntry>,
    nat_ingress: HashMap<MapData, FlowKey, NatEntry>,
    host_flows: HashMap<MapData, FlowKey, NatEntry>,
    local_addrs: HashMap<MapData, u32, u32>,
    stats: PerCpuArray<MapData, SlotStats>,
    guest_l2: Array<MapData, GuestL2>,
    policy: LpmTrie<MapData, [u32; 2], PolicyRule>,
    /// POLICY's entries by slot, as written here: only userspace writes
    /// POLICY, so a slot's rules are found without walking every slot's
    /// (filled from the map once, when a previous run's pins are reused).
    policy_index: std::collections::HashMap<u32, std::collections::HashMap<PolicyKey, PolicyRule>>,
    rate: Array<MapData, RateLimit>,
}

/// A POLICY key in aya's form (prefix length, then the data bits).
fn trie_key(key: &PolicyKey) -> Key<[u32; 2]> {
    Key::new(key.prefixlen, key.data())
}

fn policy_key(key: &Key<[u32; 2]>) -> PolicyKey {
    let [slot, addr] = key.data();
    PolicyKey {
        prefixlen: key.prefix_len(),
        slot,
        addr,
    }
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(BpfError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|e| BpfError::map(name, "type check", e))
}

/// "Not there" is success for deletes.
pub(super) fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl Maps {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Maps, BpfError> {
        let mut maps = Maps {
            config: take(ebpf, MAP_CONFIG)?,
            slots: take(ebpf, MAP_SLOTS)?,
            addr_slots: take(ebpf, MAP_ADDR_SLOTS)?,
            veth_slots: take(ebpf, MAP_VETH_SLOTS)?,
            nat_egress: take(ebpf, MAP_NAT_EGRESS)?,
            nat_ingress: take(ebpf, MAP_NAT_INGRESS)?,
            host_flows: take(ebpf, MAP_HOST_FLOWS)?,
            local_addrs: take(ebpf, MAP_LOCAL_ADDRS)?,
            stats: take(ebpf, MAP_STATS)?,
            guest_l2: take(ebpf, MAP_GUEST_L2)?,
            policy: take(ebpf, MAP_POLICY)?,
            policy_index: std::collections::HashMap::new(),
            rate: take(ebpf, MAP_RATE)?,
        };
        for entry in maps.policy.iter() {
            let (key, rule) = entry.map_err(|e| BpfError::map(MAP_POLICY, "iterate", e))?;
            let key = policy_key(&key);
            maps.policy_index
                .entry(key.slot_index())
                .or_default()
                .insert(key, rule);
        }
        Ok(maps)
    }

    /// The global configuration (CONFIG[0]).
    pub fn global(&self) -> Result<GlobalConfig, BpfError> {
        self.config
            .get(&0, 0)
            .map_err(|e| BpfError::map(MAP_CONFIG, "lookup", e))
    }

    /// Writes CONFIG[0].
    pub fn write_global(&mut self, cfg: &GlobalConfig) -> Result<(), BpfError> {
        self.config
            .set(0, cfg, 0)
            .map_err(|e| BpfError::map(MAP_CONFIG, "update", e))
    }

    /// SLOTS[index].
    pub fn slot(&self, index: u32) -> Result<SlotInfo, BpfError> {
        self.slots
            .get(&index, 0)
            .map_err(|e| BpfError::map(MAP_SLOTS, "lookup", e))
    }

    /// Writes SLOTS[index].
    pub fn set_slot(&mut self, index: u32, info: &SlotInfo) -> Result<(), BpfError> {
        self.slots
            .set(index, info, 0)
            .map_err(|e| BpfError::map(MAP_SLOTS, "update", e))
    }

    /// GUEST_L2[index]: the guest's addresses as `tap_ingress` learned them.
    pub fn guest_l2(&self, index: u32) -> Result<GuestL2, BpfError> {
        self.guest_l2
            .get(&index, 0)
            .map_err(|e| BpfError::map(MAP_GUEST_L2, "lookup", e))
    }

    /// Forgets slot `index`'s guest addresses.
    pub fn clear_guest_l2(&mut self, index: u32) -> Result<(), BpfError> {
        self.guest_l2
            .set(index, GuestL2::default(), 0)
            .map_err(|e| BpfError::map(MAP_GUEST_L2, "update", e))
    }

    /// Maps a slot address (vpeer_ip or host_ip) to its slot (ADDR_SLOTS).
    pub fn set_addr_slot(&mut self, addr: Ipv4Addr, index: u32) -> Result<(), BpfError> {
        self.addr_slots
            .insert(ip_to_map(addr), index, 0)
            .map_err(|e| BpfError::map(MAP_ADDR_SLOTS, "update", e))
    }

    /// Removes a slot address (absent is fine).
    pub fn remove_addr_slot(&mut self, addr: Ipv4Addr) -> Result<(), BpfError> {
        ignore_missing(self.addr_slots.remove(&ip_to_map(addr)))
            .map_err(|e| BpfError::map(MAP_ADDR_SLOTS, "delete", e))
    }

    /// Every ADDR_SLOTS entry.
    pub fn addr_slots(&self) -> Result<Vec<(Ipv4Addr, u32)>, BpfError> {
        self.addr_slots
            .iter()
            .map(|r| r.map(|(a, i)| (super::ip_from_map(a), i)))
            .collect::<Result<_, _>>()
            .map_err(|e| BpfError::map(MAP_ADDR_SLOTS, "iterate", e))
    }

    /// Maps a host veth ifindex to a slot (VETH_SLOTS).
    pub fn set_veth_slot(&mut self, ifindex: u32, index: u32) -> Result<(), BpfError> {
        self.veth_slots
            .insert(ifindex, index, 0)
            .map_err(|e| BpfError::map(MAP_VETH_SLOTS, "update", e))
    }

    /// Removes a host veth ifindex (absent is fine).
    pub fn remove_veth_slot(&mut self, ifindex: u32) -> Result<(), BpfError> {
        ignore_missing(self.veth_slots.remove(&ifindex))
            .map_err(|e| BpfError::map(MAP_VETH_SLOTS, "delete", e))
    }

    /// Every VETH_SLOTS entry.
    pub fn veth_slots(&self) -> Result<Vec<(u32, u32)>, BpfError> {
        self.veth_slots
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| BpfError::map(MAP_VETH_SLOTS, "iterate", e))
    }

    fn table(&self, t: FlowTable) -> &HashMap<MapData, FlowKey, NatEntry> {
        match t {
            FlowTable::NatEgress => &self.nat_egress,
            FlowTable::NatIngress => &self.nat_ingress,
            FlowTable::HostFlows => &self.host_flows,
        }
    }

    fn table_mut(&mut self, t: FlowTable) -> &mut HashMap<MapData, FlowKey, NatEntry> {
        match t {
            FlowTable::NatEgress => &mut self.nat_egress,
            FlowTable::NatIngress => &mut self.nat_ingress,
            FlowTable::HostFlows => &mut self.host_flows,
        }
    }

    /// Every entry of a flow table. Entries that vanish while the table is walked
    /// (the datapath or the reaper deleted them) are skipped.
    pub fn flows(&self, t: FlowTable) -> Result<Vec<(FlowKey, NatEntry)>, BpfError> {
        super::flow_tables::read_all(t, self.table(t))
    }

    /// The fd of the flow table `t`.
    pub(super) fn table_fd(&self, t: FlowTable) -> std::os::fd::BorrowedFd<'_> {
        aya::maps::IterableMap::map(self.table(t)).fd().as_fd()
    }

    /// Number of entries of a flow table.
    pub fn flow_count(&self, t: FlowTable) -> Result<usize, BpfError> {
        let map = self.table(t);
        match super::batch::lookup_all::<FlowKey, NatEntry>(
            aya::maps::IterableMap::map(map).fd().as_fd(),
        ) {
            Ok(all) => return Ok(all.len()),
            Err(e) if super::batch::unsupported(&e) => {}
            Err(e) => {
                return Err(BpfError::syscall(
                    format!("BPF_MAP_LOOKUP_BATCH on {}", t.map_name()),
                    e,
                ));
            }
        }
        let mut n = 0;
        for key in self.table(t).keys() {
            key.map_err(|e| BpfError::map(t.map_name(), "iterate", e))?;
            n += 1;
        }
        Ok(n)
    }

    /// One flow entry, if present.
    pub fn flow(&self, t: FlowTable, key: &FlowKey) -> Result<Option<NatEntry>, BpfError> {
        match self.table(t).get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(BpfError::map(t.map_name(), "lookup", e)),
        }
    }

    /// Inserts or replaces a flow entry.
    pub fn insert_flow(
        &mut self,
        t: FlowTable,
        key: &FlowKey,
        entry: &NatEntry,
    ) -> Result<(), BpfError> {
        self.table_mut(t)
            .insert(key, entry, 0)
            .map_err(|e| BpfError::map(t.map_name(), "update", e))
    }

    /// Deletes a flow entry (absent is fine).
    pub fn remove_flow(&mut self, t: FlowTable, key: &FlowKey) -> Result<(), BpfError> {
        ignore_missing(self.table_mut(t).remove(key))
            .map_err(|e| BpfError::map(t.map_name(), "delete", e))
    }

    /// Deletes every flow of `slot` from all three tables; returns how many.
    pub fn remove_slot_flows(&mut self, slot: u32) -> Result<usize, BpfError> {
        super::flow_tables::remove_flows_in(
            [
                (FlowTable::NatEgress, &mut self.nat_egress),
                (FlowTable::NatIngress, &mut self.nat_ingress),
                (FlowTable::HostFlows, &mut self.host_flows),
            ],
            |s| s == slot,
        )
    }

    /// Replaces the LOCAL_ADDRS set with `addrs`; returns whether it changed.
    pub fn set_local_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<bool, BpfError> {
        let wanted: HashSet<u32> = addrs.iter().map(|a| ip_to_map(*a)).collect();
        let present: Vec<u32> = self
            .local_addrs
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| BpfError::map(MAP_LOCAL_ADDRS, "iterate", e))?;
        let changed = present.len() != wanted.len() || present.iter().any(|a| !wanted.contains(a));
        for addr in present.iter().filter(|a| !wanted.contains(a)) {
            ignore_missing(self.local_addrs.remove(addr))
                .map_err(|e| BpfError::map(MAP_LOCAL_ADDRS, "delete", e))?;
        }
        for addr in &wanted {
            self.local_addrs
                .insert(addr, 1, 0)
                .map_err(|e| BpfError::map(MAP_LOCAL_ADDRS, "update", e))?;
        }
        Ok(changed)
    }

    /// The LOCAL_ADDRS set.
    pub fn local_addrs(&self) -> Result<Vec<Ipv4Addr>, BpfError> {
        let mut v: Vec<Ipv4Addr> = self
            .local_addrs
            .keys()
            .map(|k| k.map(super::ip_from_map))
            .collect::<Result<_, _>>()
            .map_err(|e| BpfError::map(MAP_LOCAL_ADDRS, "iterate", e))?;
        v.sort();
        Ok(v)
    }

    /// A slot's counters summed over CPUs.
    pub fn stats(&self, index: u32) -> Result<SlotStats, BpfError> {
        let per_cpu = self
            .stats
            .get(&index, 0)
            .map_err(|e| BpfError::map(MAP_STATS, "lookup", e))?;
        let mut sum = SlotStats::default();
        for cpu in per_cpu.iter() {
            for (total, c) in sum.counters.iter_mut().zip(cpu.counters.iter()) {
                *total = total.wrapping_add(*c);
            }
        }
        Ok(sum)
    }

    /// Zeroes a slot's counters on every CPU.
    pub fn zero_stats(&mut self, index: u32) -> Result<(), BpfError> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| BpfError::syscall(format!("reading {what}"), e))?;
        let zero = PerCpuValues::try_from(vec![SlotStats::default(); cpus])
            .map_err(|e| BpfError::syscall("building per-CPU values", e))?;
        self.stats
            .set(index, zero, 0)
            .map_err(|e| BpfError::map(MAP_STATS, "update", e))
    }

    /// Every POLICY entry of `slot` (0: the defaults).
    pub fn policy_rules(&self, slot: u32) -> Result<Vec<(PolicyKey, PolicyRule)>, BpfError> {
        Ok(self
            .policy_index
            .get(&slot)
            .map(|rules| rules.iter().map(|(k, r)| (*k, *r)).collect())
            .unwrap_or_default())
    }

    /// Inserts or replaces a POLICY entry.
    pub fn insert_policy(&mut self, key: &PolicyKey, rule: &PolicyRule) -> Result<(), BpfError> {
        self.policy
            .insert(&trie_key(key), rule, 0)
            .map_err(|e| BpfError::map(MAP_POLICY, "update", e))?;
        self.policy_index
            .entry(key.slot_index())
            .or_default()
            .insert(*key, *rule);
        Ok(())
    }

    /// Deletes a POLICY entry (absent is fine).
    pub fn remove_policy(&mut self, key: &PolicyKey) -> Result<(), BpfError> {
        ignore_missing(self.policy.remove(&trie_key(key)))
            .map_err(|e| BpfError::map(MAP_POLICY, "delete", e))?;
        let slot = key.slot_index();
        if let Some(rules) = self.policy_index.get_mut(&slot) {
            rules.remove(key);
            if rules.is_empty() {
                self.policy_index.remove(&slot);
            }
        }
        Ok(())
    }

    /// Deletes every POLICY entry of `slot`; returns how many.
    pub fn remove_slot_policy(&mut self, slot: u32) -> Result<usize, BpfError> {
        let keys: Vec<PolicyKey> = self
            .policy_rules(slot)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for key in &keys {
            self.remove_policy(key)?;
        }
        Ok(keys.len())
    }

    /// RATE[index].
    pub fn rate(&self, index: u32) -> Result<RateLimit, BpfError> {
        self.rate
            .get(&index, 0)
            .map_err(|e| BpfError::map(MAP_RATE, "lookup", e))
    }

    /// Writes RATE[index] (`RateLimit::default()`: no limit).
    pub fn set_rate(&mut self, index: u32, limit: &RateLimit) -> Result<(), BpfError> {
        self.rate
            .set(index, limit, 0)
            .map_err(|e| BpfError::map(MAP_RATE, "update", e))
    }
}
