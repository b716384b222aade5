//! Slots: addressing, and create/delete with rollback.

pub mod addressing;

pub use addressing::{AddressPlan, AddressingError, SlotAddr};
