//! Loading the embedded object with map sizes from the configuration.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use aya::{EbpfLoader, programs::SchedClassifier};
use netagent_common::{
    CONFIG_F_TO_GUEST_MARK, MAP_ADDR_SLOTS, MAP_CONFIG, MAP_GUEST_L2, MAP_HOST_FLOWS,
    MAP_LOCAL_ADDRS, MAP_NAT_EGRESS, MAP_NAT_INGRESS, MAP_NAT_PORT_CURSORS, MAP_NEXT_HOPS,
    MAP_POLICY, MAP_RATE, MAP_SLOTS, MAP_STATS, MAP_VETH_SLOTS, MAX_SLOT_INDEX,
    NAT_PORT_CURSOR_COUNT, NEXT_HOP_CACHE_SIZE,
};

use super::attach::{AttachMode, AttachedSlot, AttachedUplink};
use super::layout::{self, LayoutCheck};
use super::maps::Maps;
use super::pins::PinDir;
use super::test_run::Program;
use super::{BpfError, ip_to_map};
use crate::config::Config;

/// The eBPF object built by `cargo xtask build-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netagent-ebpf.o"));

/// Map sizes and the masquerade range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Entries of the per-slot maps; slot indices must be `< max_slots`.
    pub max_slots: u32,
    /// Entries of each masquerade table (NAT_EGRESS, NAT_INGRESS).
    pub nat_table_size: u32,
    /// Entries of HOST_FLOWS.
    pub host_flow_table_size: u32,
    /// Entries of POLICY: every CIDR of every slot's egress rules and of the
    /// default deny list.
    pub policy_table_size: u32,
    /// First masquerade port (inclusive).
    pub port_min: u16,
    /// Last masquerade port (inclusive).
    pub port_max: u16,
    /// Base of the HostIP /16: slot traffic to it is not masqueraded.
    pub host_base: Ipv4Addr,
    /// Base of the veth /16: slot traffic to it is not masqueraded.
    pub vrt_base: Ipv4Addr,
    /// bpffs directory for the map pins (the agent's `--bpffs`); a bpffs is
    /// mounted there if needed (at `/sys/fs/bpf` for paths below it). `None`: a
    /// private bpffs on a temporary directory, removed with the `Datapath`.
    pub pin_dir: Option<PathBuf>,
    /// TCX where available (the default), or clsact filters always.
    pub attach_mode: AttachMode,
}

/// Every map of the object (all pinned in the instance's bpffs directory).
pub(super) const MAP_NAMES: [&str; 14] = [
    MAP_CONFIG,
    MAP_SLOTS,
    MAP_ADDR_SLOTS,
    MAP_VETH_SLOTS,
    MAP_NAT_EGRESS,
    MAP_NAT_INGRESS,
    MAP_HOST_FLOWS,
    MAP_LOCAL_ADDRS,
    MAP_STATS,
    MAP_GUEST_L2,
    MAP_POLICY,
    MAP_RATE,
    MAP_NAT_PORT_CURSORS,
    MAP_NEXT_HOPS,
];

/// Entries of LOCAL_ADDRS (addresses of the agent namespace).
pub const LOCAL_ADDRS_SIZE: u32 = 256;

/// Default entries of POLICY (`DatapathConfig::policy_table_size`).
pub const DEFAULT_POLICY_TABLE_SIZE: u32 = 65_536;

/// `AttachMode::Auto`, or with the `fault-injection` feature (tests) the clsact
/// fallback when `NETAGENT_ATTACH_MODE=clsact`: the path a kernel without TCX
/// takes, exercised on one with it.
fn attach_mode_from_env() -> AttachMode {
    #[cfg(feature = "fault-injection")]
    if std::env::var("NETAGENT_ATTACH_MODE").is_ok_and(|v| v == "clsact") {
        return AttachMode::Clsact;
    }
    AttachMode::Auto
}

impl DatapathConfig {
    /// The datapath part of the agent configuration.
    pub fn from_config(cfg: &Config) -> Self {
        DatapathConfig {
            max_slots: cfg.max_slots,
            nat_table_size: cfg.nat.table_size,
            host_flow_table_size: cfg.nat.host_flow_table_size,
            policy_table_size: DEFAULT_POLICY_TABLE_SIZE,
            port_min: cfg.nat.port_min,
            port_max: cfg.nat.port_max,
            host_base: cfg.host_base,
            vrt_base: cfg.vrt_base,
            pin_dir: Some(cfg.bpffs.clone()),
            attach_mode: attach_mode_from_env(),
        }
    }

    /// The same configuration with a private pin directory (tests).
    pub fn with_private_pins(mut self) -> Self {
        self.pin_dir = None;
        self
    }

    pub(super) fn max_entries(&self, map: &str) -> u32 {
        match map {
            MAP_SLOTS | MAP_STATS | MAP_VETH_SLOTS | MAP_GUEST_L2 | MAP_RATE => self.max_slots,
            // Two addresses per slot: vpeer_ip and host_ip.
            MAP_ADDR_SLOTS => self.max_slots.saturating_mul(2),
            MAP_NAT_EGRESS | MAP_NAT_INGRESS => self.nat_table_size,
            MAP_HOST_FLOWS => self.host_flow_table_size,
            MAP_LOCAL_ADDRS => LOCAL_ADDRS_SIZE,
            MAP_POLICY => self.policy_table_size,
            // The cursors and the hash key: a fixed size, not configuration.
            MAP_NAT_PORT_CURSORS => NAT_PORT_CURSOR_COUNT + 1,
            MAP_NEXT_HOPS => NEXT_HOP_CACHE_SIZE,
            _ => 1,
        }
    }

    /// A loader whose maps are (or get) pinned in `pins`, sized from `self`.
    fn loader<'a>(&self, pins: &PinDir) -> EbpfLoader<'a> {
        let mut loader = EbpfLoader::new();
        for name in MAP_NAMES {
            loader.map_pin_path(name, pins.map_path(name));
            if name != MAP_CONFIG {
                loader.map_max_entries(name, self.max_entries(name));
            }
        }
        loader
    }

    fn validate(&self) -> Result<(), BpfError> {
        if self.max_slots < 2 || self.max_slots > MAX_SLOT_INDEX + 1 {
            return Err(BpfError::Config(format!(
                "max_slots is {}, it must be in 2..={}",
                self.max_slots,
                MAX_SLOT_INDEX + 1
            )));
        }
        if self.nat_table_size == 0 || self.host_flow_table_size == 0 {
            return Err(BpfError::Config(
                "nat.table_size and nat.host_flow_table_size must be at least 1".into(),
            ));
        }
        if self.policy_table_size == 0 {
            return Err(BpfError::Config(
                "policy_table_size must be at least 1".into(),
            ));
        }
        if self.port_min == 0 || self.port_min > self.port_max {
            return Err(BpfError::Config(format!(
                "masquerade port range {}..={} is empty or starts at 0",
                self.port_min, self.port_max
            )));
        }
        Ok(())
    }
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig::from_config(&Config::default())
    }
}

/// The loaded datapath: programs, maps and what is attached where.
pub struct Datapath {
    pub(super) ebpf: aya::Ebpf,
    pub(super) maps: Maps,
    pub(super) cfg: DatapathConfig,
    pub(super) uplink: Option<AttachedUplink>,
    pub(super) slots: HashMap<u32, AttachedSlot>,
    /// The namespace the datapath was loaded in (the agent's, the host
    /// namespace): host-side filters are removed there, whichever thread asks.
    pub(super) home_ns: std::os::fd::OwnedFd,
    /// Whether the maps were reused from a previous run's pins (layout matched).
    pub(super) reused: bool,
    /// Why pins of a previous run were not reused (empty when they were, or
    /// when there were none).
    pub(super) layout_mismatch: Vec<String>,
    /// Whether `attach_uplink` replaced the program on a hook a previous run
    /// left (instead of attaching anew).
    pub(super) uplink_adopted: bool,
    /// A change of the policy or of LOCAL_ADDRS was written but cutting the
    /// flows it denies failed (`purge`): the next such call cuts every slot's,
    /// changed or not.
    pub(super) purge_pending: bool,
    /// Declared last: the pins go after everything that uses the maps.
    pub(super) pins: PinDir,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("cfg", &self.cfg)
            .field("uplink", &self.uplink.as_ref().map(|u| &u.uplink))
            .field("slots", &self.slots.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Datapath {
    /// Loads the object, sizes the maps and loads (verifies) all four programs,
    /// once: every slot's links attach these same programs. Nothing is attached
    /// yet.
    ///
    /// Maps a previous run pinned in the directory are **reused** (flows,
    /// policy, counters and slot entries kept) when their layout matches this
    /// agent's (see `layout`); when it does not, every difference is logged at
    /// error level and kept in [`Datapath::layout_mismatch`], the old pins are
    /// removed and the maps start empty. [`Datapath::reused_pins`] tells which.
    pub fn load(cfg: &DatapathConfig) -> Result<Datapath, BpfError> {
        cfg.validate()?;
        let mut pins = match &cfg.pin_dir {
            Some(dir) => PinDir::at(dir)?,
            None => PinDir::private()?,
        };
        let (reused, layout_mismatch) = match layout::check(&pins, cfg) {
            LayoutCheck::Fresh => (false, Vec::new()),
            LayoutCheck::Match => (true, Vec::new()),
            LayoutCheck::Mismatch(diffs) => {
                tracing::error!(
                    pin_dir = %pins.path().display(),
                    differences = %diffs.join("; "),
                    "the pinned maps of a previous run have another layout: NOT reusing them \
                     (their flows and slots are dropped; the maps start empty)"
                );
                (false, diffs)
            }
        };
        if !reused {
            for name in MAP_NAMES {
                pins.unpin(name)?;
            }
            pins.unpin(layout::LAYOUT_PIN)?;
        }
        let mut ebpf = cfg
            .loader(&pins)
            .load(OBJECT)
            .map_err(|e| BpfError::Load(Box::new(e)))?;
        pins.claim()?;
        if !reused {
            layout::store(&pins, cfg)?;
        }
        for prog in Program::ALL {
            let name = prog.name();
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(BpfError::Missing {
                    kind: "program",
                    name,
                })?
                .try_into()
                .map_err(|e| BpfError::program(name, "type check", e))?;
            p.load().map_err(|e| BpfError::program(name, "load", e))?;
        }
        let home_ns = super::attach::thread_netns()?;
        let mut maps = Maps::take(&mut ebpf)?;
        let mut global = maps.global()?;
        global.port_min = cfg.port_min;
        global.port_max = cfg.port_max;
        global.host_base = ip_to_map(cfg.host_base);
        global.vrt_base = ip_to_map(cfg.vrt_base);
        // Replies are translated for the guest on the uplink only once every
        // slot's eth0 runs this build's slot_ingress: at once on fresh maps,
        // after adoption on reused ones (`enable_to_guest_mark`).
        if reused {
            global.flags &= !CONFIG_F_TO_GUEST_MARK;
        } else {
            global.flags |= CONFIG_F_TO_GUEST_MARK;
        }
        maps.write_global(&global)?;
        Ok(Datapath {
            ebpf,
            maps,
            cfg: cfg.clone(),
            uplink: None,
            slots: HashMap::new(),
            home_ns,
            reused,
            layout_mismatch,
            uplink_adopted: false,
            purge_pending: false,
            pins,
        })
    }

    /// The short id of this datapath's map layout (FNV-1a of its descriptor).
    pub fn layout_id(&self) -> String {
        format!(
            "{:016x}",
            layout::layout_hash(&layout::descriptor(&self.cfg))
        )
    }

    /// Whether the maps are a previous run's, reused (their layout matched).
    pub fn reused_pins(&self) -> bool {
        self.reused
    }

    /// Lets `uplink_ingress` translate replies for the guest and mark them for
    /// `slot_ingress` (`CONFIG_F_TO_GUEST_MARK`), or makes it hand them to the
    /// vpeer address again: call it with `true` once every slot adopted from a
    /// previous run has this build's programs on its hooks.
    pub fn set_to_guest_mark(&mut self, on: bool) -> Result<(), BpfError> {
        let mut global = self.maps.global()?;
        if on {
            global.flags |= CONFIG_F_TO_GUEST_MARK;
        } else {
            global.flags &= !CONFIG_F_TO_GUEST_MARK;
        }
        self.maps.write_global(&global)
    }

    /// Why a previous run's pinned maps were not reused: one line per
    /// difference, naming the map (empty if they were reused or there were none).
    pub fn layout_mismatch(&self) -> &[String] {
        &self.layout_mismatch
    }

    /// Whether `attach_uplink` found the previous run's uplink hook and replaced
    /// its program in place.
    pub fn uplink_adopted(&self) -> bool {
        self.uplink_adopted
    }

    /// The bpffs directory holding the map pins.
    pub fn pin_dir(&self) -> &std::path::Path {
        self.pins.path()
    }

    /// The configuration the datapath was loaded with.
    pub fn config(&self) -> &DatapathConfig {
        &self.cfg
    }

    /// Typed access to the maps (tests seed and read them here).
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Mutable typed access to the maps.
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Indices of the slots attached through this `Datapath`.
    pub fn attached_slots(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.slots.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub(super) fn check_index(&self, index: u32) -> Result<(), BpfError> {
        if index == 0 || index >= self.cfg.max_slots {
            return Err(BpfError::SlotIndex {
                index,
                max_slots: self.cfg.max_slots,
            });
        }
        Ok(())
    }
}
