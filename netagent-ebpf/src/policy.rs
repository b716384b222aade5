//! Egress policy of guest-initiated traffic (`POLICY`, an LPM trie keyed by
//! slot and address; slot 0 holds the defaults) and the host's protection:
//! see `netagent_common::PolicyKey` for the order of evaluation. It is
//! evaluated when a guest flow is opened (and for what is not masqueraded);
//! an established guest flow skips it (`guest`'s fast path), and the agent
//! evaluates the same steps in userspace (`netagent::bpf::EgressView`) to cut
//! the flows a change of the rules or of `LOCAL_ADDRS` denies: keep the two
//! identical.

use aya_ebpf::maps::lpm_trie::Key;
use netagent_common::{DropReason, GlobalConfig, PolicyKey, PolicyRule, egress_verdict};

use crate::maps::{LOCAL_ADDRS, POLICY};

/// Mask of a /16, network order.
const NET16_MASK: u32 = u32::from_ne_bytes([255, 255, 0, 0]);

/// Whether `daddr` (network order) is an address of the host: the agent
/// namespace's own (`LOCAL_ADDRS`), or in the HostIP or veth range (every slot's
/// HostIP, veth and vpeer address).
#[inline(always)]
pub fn is_host_addr(cfg: &GlobalConfig, daddr: u32) -> bool {
    let dnet = daddr & NET16_MASK;
    dnet == cfg.host_base || dnet == cfg.vrt_base || LOCAL_ADDRS.get_ptr(&daddr).is_some()
}

/// The longest rule of `slot` (0: the defaults) that covers `daddr`.
#[inline(always)]
fn longest_match(slot: u32, daddr: u32) -> Option<&'static PolicyRule> {
    let k = PolicyKey::lookup(slot, daddr);
    POLICY.get(Key::new(k.prefixlen, k.data()))
}

/// Whether `slot`'s guest may open traffic to `daddr` (network order); the
/// reason to drop it if not. `host`: `is_host_addr` of `daddr`, which the
/// caller needs as well (one `LOCAL_ADDRS` lookup per packet).
#[inline(always)]
pub fn egress_check(slot: u32, daddr: u32, host: bool) -> Result<(), DropReason> {
    egress_verdict(longest_match(slot, daddr), host, || {
        longest_match(0, daddr).copied()
    })
}
