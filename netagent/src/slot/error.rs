//! Errors of slot create/delete/start. Each says which step failed and what to do;
//! `NotFound`, `Conflict`, `InvalidIndex` and `InvalidPolicy` are the caller's
//! mistakes (the API maps them to 404, 409 and 400), everything else is the
//! host's.

use crate::bpf::BpfError;
use crate::netlink::NetlinkError;

use super::AddressingError;
use super::create::CreateStep;

/// Why a slot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The index is outside `[1, 32767]` or `max_slots`.
    #[error("{0}")]
    InvalidIndex(String),
    /// The slot does not exist.
    #[error("slot {0} does not exist: create it first (PUT /v1/slots/{0})")]
    NotFound(i64),
    /// A guest MAC, egress list or rate limit that cannot be applied (the
    /// message names the field and the allowed values).
    #[error("{0}")]
    InvalidPolicy(String),
    /// The slot exists with a different guest link, or a resource with the slot's
    /// name exists that the agent did not make.
    #[error("{0}")]
    Conflict(String),
    /// The guest namespace of a veth guest link does not exist.
    #[error(
        "guest namespace {0:?} does not exist in /run/netns: create it first (ip netns add {0})"
    )]
    GuestNamespaceMissing(String),
    /// A step of create failed; everything made before it was removed again
    /// (`rollback` lists what could not be removed).
    #[error("creating slot {index} failed at step {step}: {source}{}", rollback_note(.rollback))]
    Create {
        /// The slot.
        index: u32,
        /// The step that failed.
        step: CreateStep,
        /// What failed.
        #[source]
        source: StepError,
        /// Undo steps that failed in turn (empty when the rollback was clean).
        rollback: Vec<String>,
    },
    /// Some delete steps failed (each is listed); the others were done. Retrying
    /// the delete is safe.
    #[error("deleting slot {index} left work undone (retry the delete): {}", .failures.join("; "))]
    Delete {
        /// The slot.
        index: u32,
        /// One message per failed step.
        failures: Vec<String>,
    },
    /// Writing a slot's new guest MAC, egress lists or rate limit into the
    /// datapath failed; the previous settings were written back.
    #[error(
        "changing the policy of slot {index} failed (the previous policy was put back): {source}"
    )]
    Policy {
        /// The slot.
        index: u32,
        /// What failed.
        #[source]
        source: StepError,
    },
    /// Start-up failed.
    #[error("starting the slot manager failed while trying to {step}: {source}")]
    Start {
        /// What was being done.
        step: &'static str,
        /// What failed.
        #[source]
        source: StepError,
    },
    /// A datapath read (stats, table usage, reap) failed.
    #[error("datapath: {0}")]
    Datapath(#[from] BpfError),
    /// The manager is shut down.
    #[error("the slot manager is shut down; restart netagent")]
    ShutDown,
}

/// The cause of a failed step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A netlink, ioctl or procfs operation.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A datapath operation.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// Injected by a test (`fault-injection` feature).
    #[error("injected failure")]
    Injected,
    /// Anything else, described.
    #[error("{0}")]
    Other(String),
}

fn rollback_note(failures: &[String]) -> String {
    if failures.is_empty() {
        "; everything made before it was removed".into()
    } else {
        format!(
            "; rollback could not remove: {} (run `netagent cleanup` with the daemon stopped)",
            failures.join("; ")
        )
    }
}

impl From<AddressingError> for SlotError {
    fn from(e: AddressingError) -> Self {
        SlotError::InvalidIndex(e.to_string())
    }
}
