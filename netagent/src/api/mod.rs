//! TODO(owner): see the module plan in lib.rs.
