//! Errors of the datapath layer; each names the call that failed.

use std::io;

/// What went wrong loading, attaching or operating the datapath.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The embedded object could not be loaded (map creation, relocation).
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program or map the object should have is missing.
    #[error(
        "the eBPF object has no {kind} named {name} (rebuild it with `cargo xtask build-ebpf`)"
    )]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// A program operation (load = verifier, attach, detach, test run) failed.
    #[error("{call} of program {program} failed: {source}")]
    Program {
        /// The program.
        program: &'static str,
        /// What was being done.
        call: &'static str,
        /// aya's error (for a verifier rejection it contains the verifier log).
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A tc request (qdisc or filter) failed.
    #[error(transparent)]
    Tc(Box<crate::netlink::NetlinkError>),
    /// A map operation failed.
    #[error("{call} on map {map} failed: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// What was being done.
        call: &'static str,
        /// aya's error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Syscall {
        /// The call (and its subject).
        call: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The slot index is outside the range the maps were sized for.
    #[error("slot index {index} is out of range: it must be in 1..{max_slots} (max_slots)")]
    SlotIndex {
        /// The index given.
        index: u32,
        /// The configured `max_slots`.
        max_slots: u32,
    },
    /// `attach_slot` for a slot that is attached already.
    #[error("slot {0} is already attached; detach it first")]
    SlotAttached(u32),
    /// The slot's `eth0` does not have the ifindex the shared `tap_ingress`
    /// redirects to.
    #[error(
        "eth0 of slot {index} has ifindex {ifindex}; the datapath needs {}",
        netagent_common::SLOT_ETH0_IFINDEX
    )]
    Eth0Ifindex {
        /// The slot.
        index: u32,
        /// The ifindex it has.
        ifindex: u32,
    },
    /// `attach_uplink` while an uplink is attached.
    #[error("an uplink ({0}) is already attached; detach it first")]
    UplinkAttached(String),
    /// The configuration cannot work.
    #[error("invalid datapath configuration: {0}")]
    Config(String),
    /// Several steps of a teardown failed.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Multiple(Vec<BpfError>),
}

impl BpfError {
    pub(crate) fn program(
        program: &'static str,
        call: &'static str,
        source: aya::programs::ProgramError,
    ) -> Self {
        BpfError::Program {
            program,
            call,
            source: Box::new(source),
        }
    }

    pub(crate) fn map(map: &'static str, call: &'static str, source: aya::maps::MapError) -> Self {
        BpfError::Map {
            map,
            call,
            source: Box::new(source),
        }
    }

    pub(crate) fn syscall(call: impl Into<String>, source: io::Error) -> Self {
        BpfError::Syscall {
            call: call.into(),
            source,
        }
    }
}

impl From<crate::netlink::NetlinkError> for BpfError {
    fn from(e: crate::netlink::NetlinkError) -> BpfError {
        BpfError::Tc(Box::new(e))
    }
}
