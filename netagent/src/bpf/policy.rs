//! The guest-facing security settings of the datapath: egress policy (allow and
//! deny CIDR lists per slot plus the default deny list, in `MAP_POLICY`), the
//! per-slot bandwidth limit (`MAP_RATE`) and the guest MAC a slot's frames must
//! come from (`SlotInfo::guest_mac`). The datapath side is `tap_ingress` (MAC,
//! rate) and `veth_ingress` (policy); see `netagent_common::PolicyKey` for how
//! the rules are evaluated.
//!
//! The datapath evaluates the policy only when a guest flow is allocated (an
//! established flow takes the fast path), so a change here cuts the flows it
//! denies (`purge`); for that the policy is evaluated in userspace too
//! ([`EgressView`], the same steps as the datapath's `policy::egress_check`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use netagent_common::{
    DropReason, GlobalConfig, POLICY_ALLOW, POLICY_DENY, PolicyKey, PolicyRule, SLOT_F_ACTIVE,
    SLOT_F_GUEST_MAC, egress_verdict,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{BpfError, Datapath, ip_from_map, ip_to_map};

/// The default deny list of guest-initiated traffic (config
/// `egress_default_deny`): "this network", loopback, private, shared (CGNAT),
/// link-local (cloud metadata 169.254.169.254 included), multicast and
/// reserved ranges (the limited broadcast 255.255.255.255 included).
pub const DEFAULT_EGRESS_DENY: [Cidr; 9] = [
    // "This network" and loopback: never a destination worth leaving the host.
    Cidr::new_unchecked(Ipv4Addr::new(0, 0, 0, 0), 8),
    Cidr::new_unchecked(Ipv4Addr::new(127, 0, 0, 0), 8),
    Cidr::new_unchecked(Ipv4Addr::new(10, 0, 0, 0), 8),
    Cidr::new_unchecked(Ipv4Addr::new(172, 16, 0, 0), 12),
    Cidr::new_unchecked(Ipv4Addr::new(192, 168, 0, 0), 16),
    Cidr::new_unchecked(Ipv4Addr::new(100, 64, 0, 0), 10),
    Cidr::new_unchecked(Ipv4Addr::new(169, 254, 0, 0), 16),
    Cidr::new_unchecked(Ipv4Addr::new(224, 0, 0, 0), 4),
    Cidr::new_unchecked(Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// Smallest accepted burst: one full Ethernet frame (1500 + 14). (A frame
/// longer than the burst, such as a 64 KiB GSO frame from a TAP with TSO,
/// still passes when the budget is whole: it overshoots the burst once.)
pub const MIN_BURST_BYTES: u64 = 1514;

const NS_PER_SEC: u128 = 1_000_000_000;

/// An IPv4 network `addr/len`; written and parsed as "a.b.c.d/n" with the host
/// bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

/// Why a string is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// No "/n" part.
    #[error("{0:?} is not a CIDR: expected a.b.c.d/n (e.g. 10.0.0.0/8, 1.2.3.4/32)")]
    Syntax(String),
    /// The address part is not an IPv4 address.
    #[error("{0:?} is not a CIDR: the address is not IPv4 a.b.c.d")]
    Address(String),
    /// The length is not a number in 0..=32.
    #[error("{0:?} is not a CIDR: the prefix length must be 0..=32")]
    Length(String),
    /// Bits beyond the prefix length are set.
    #[error("{given} has host bits set: did you mean {network}?")]
    HostBits {
        /// What was given.
        given: String,
        /// The network it lies in.
        network: Cidr,
    },
}

impl Cidr {
    /// `addr/len`, checked: `len <= 32` and no host bits set.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Cidr, CidrError> {
        if len > 32 {
            return Err(CidrError::Length(format!("{addr}/{len}")));
        }
        let cidr = Cidr { addr, len };
        let network = Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & cidr.mask()),
            len,
        };
        if network != cidr {
            return Err(CidrError::HostBits {
                given: format!("{addr}/{len}"),
                network,
            });
        }
        Ok(cidr)
    }

    /// `addr/len` for constants known to be valid.
    const fn new_unchecked(addr: Ipv4Addr, len: u8) -> Cidr {
        Cidr { addr, len }
    }

    /// The netmask, host order.
    fn mask(&self) -> u32 {
        match self.len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n.min(32))),
        }
    }

    /// Whether `addr` lies in this network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.addr)
    }

    /// This CIDR's key in the rules of `slot` (0: the defaults).
    fn key(&self, slot: u32) -> PolicyKey {
        PolicyKey::new(slot, ip_to_map(self.addr), u32::from(self.len))
    }

    fn from_key(key: &PolicyKey) -> Cidr {
        Cidr {
            addr: ip_from_map(key.addr),
            len: key.prefixlen.saturating_sub(32).min(32) as u8,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.to_string()))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| CidrError::Address(s.to_string()))?;
        // Digits only: `u8::from_str` would take "+8".
        if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::Length(s.to_string()));
        }
        let len: u8 = len.parse().map_err(|_| CidrError::Length(s.to_string()))?;
        Cidr::new(addr, len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A slot's own egress rules for guest-initiated traffic. The longest matching
/// CIDR of either list decides; a host address (the agent namespace's, any
/// slot's HostIP/veth/vpeer) is reachable only through an `allow` entry of
/// length 32 naming it. Where neither list matches, the default deny list
/// applies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressRules {
    /// Networks the guest may reach.
    pub allow: Vec<Cidr>,
    /// Networks the guest may not reach.
    pub deny: Vec<Cidr>,
}

/// A slot's bandwidth limit on the frames its guest sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate, bytes (Ethernet frame length) per second; at least 1.
    pub rate_bytes_per_sec: u64,
    /// Bytes that may pass at once after an idle period (plus the frame that
    /// overshoots it); at least `MIN_BURST_BYTES`. Read back exactly for rates up to 1 GB/s (above, the
    /// datapath keeps it to the nanosecond).
    pub burst_bytes: u64,
}

impl RateLimit {
    fn validate(&self) -> Result<(), BpfError> {
        if self.rate_bytes_per_sec == 0 {
            return Err(BpfError::Config(
                "rate_bytes_per_sec must be at least 1 (no limit: remove the rate limit)".into(),
            ));
        }
        if self.burst_bytes < MIN_BURST_BYTES {
            return Err(BpfError::Config(format!(
                "burst_bytes is {}, it must be at least {MIN_BURST_BYTES} (one Ethernet frame)",
                self.burst_bytes
            )));
        }
        Ok(())
    }

    /// The map value: the burst as its transmit time at the rate, rounded up.
    fn to_map(self) -> netagent_common::RateLimit {
        let rate = u128::from(self.rate_bytes_per_sec);
        let burst_ns = (u128::from(self.burst_bytes) * NS_PER_SEC).div_ceil(rate);
        netagent_common::RateLimit {
            rate_bytes_per_sec: self.rate_bytes_per_sec,
            burst_ns: u64::try_from(burst_ns).unwrap_or(u64::MAX),
            next_ns: 0,
        }
    }

    fn from_map(v: &netagent_common::RateLimit) -> Option<RateLimit> {
        if v.rate_bytes_per_sec == 0 {
            return None;
        }
        let burst = u128::from(v.burst_ns) * u128::from(v.rate_bytes_per_sec) / NS_PER_SEC;
        Some(RateLimit {
            rate_bytes_per_sec: v.rate_bytes_per_sec,
            burst_bytes: u64::try_from(burst).unwrap_or(u64::MAX),
        })
    }
}

/// The wanted entries of one slot's rules.
fn wanted_entries(slot: u32, rules: &EgressRules) -> Result<BTreeMap<Cidr, u32>, BpfError> {
    let mut out = BTreeMap::new();
    for (list, action) in [(&rules.allow, POLICY_ALLOW), (&rules.deny, POLICY_DENY)] {
        for cidr in list {
            if let Some(prev) = out.insert(*cidr, action)
                && prev != action
            {
                return Err(BpfError::Config(format!(
                    "{cidr} is both allowed and denied for slot {slot}: keep it in one list"
                )));
            }
        }
    }
    Ok(out)
}

/// One part of a slot's policy whose map entries differ from the agent's
/// (`Datapath::policy_differences`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDifference {
    /// The map entry, as `netagent verify` names objects.
    pub object: String,
    /// What the agent wrote.
    pub expected: String,
    /// What the map holds.
    pub found: String,
}

/// Whether a slot's POLICY entries `have` are other than the `wanted` ones
/// (each wanted CIDR with its action and prefix length, and nothing else).
fn entries_differ(have: &BTreeMap<Cidr, PolicyRule>, wanted: &BTreeMap<Cidr, u32>) -> bool {
    have.len() != wanted.len()
        || wanted
            .iter()
            .any(|(cidr, action)| have.get(cidr) != Some(&rule(cidr, *action)))
}

/// The POLICY value of `cidr` with `action`.
fn rule(cidr: &Cidr, action: u32) -> PolicyRule {
    PolicyRule {
        action,
        prefix_len: u32::from(cidr.len),
    }
}

/// A slot's rules as one line: `allow 198.18.0.0/15; deny 10.0.0.0/8`, or `none`.
fn rules_text(entries: &BTreeMap<Cidr, u32>) -> String {
    let list = |action| {
        entries
            .iter()
            .filter(|(_, a)| **a == action)
            .map(|(c, _)| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let parts: Vec<String> = [("allow", list(POLICY_ALLOW)), ("deny", list(POLICY_DENY))]
        .into_iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(name, l)| format!("{name} {l}"))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("; ")
    }
}

/// Mask of a /16 in the maps' address form (network order).
const NET16_MASK: u32 = u32::from_ne_bytes([255, 255, 0, 0]);

/// What the datapath's `policy::egress_check` reads, copied: the slot ranges
/// of `CONFIG`, `LOCAL_ADDRS` and the `POLICY` rules of the slots asked for
/// and of slot 0 (the defaults). Addresses are in the maps' form (network
/// order in a `u32`).
#[derive(Debug, Clone, Default)]
pub struct EgressView {
    host_base: u32,
    vrt_base: u32,
    local: BTreeSet<u32>,
    rules: BTreeMap<u32, Vec<(PolicyKey, PolicyRule)>>,
}

impl EgressView {
    /// A view of `cfg`'s ranges, the `local` addresses and the rules `rules`
    /// (slot → its POLICY entries; slot 0: the defaults).
    pub fn new(
        cfg: &GlobalConfig,
        local: impl IntoIterator<Item = u32>,
        rules: impl IntoIterator<Item = (u32, Vec<(PolicyKey, PolicyRule)>)>,
    ) -> EgressView {
        EgressView {
            host_base: cfg.host_base,
            vrt_base: cfg.vrt_base,
            local: local.into_iter().collect(),
            rules: rules.into_iter().collect(),
        }
    }

    /// Whether `daddr` is an address of the host (`policy::is_host_addr`):
    /// the agent namespace's own, or in the HostIP or veth /16.
    pub fn is_host_addr(&self, daddr: u32) -> bool {
        let dnet = daddr & NET16_MASK;
        dnet == self.host_base || dnet == self.vrt_base || self.local.contains(&daddr)
    }

    /// The longest rule of `slot` covering `daddr`, as the LPM trie finds it:
    /// a key matches when its first `prefixlen` bits (the slot, then the
    /// address) equal the lookup's.
    fn longest_match(&self, slot: u32, daddr: u32) -> Option<PolicyRule> {
        let want = PolicyKey::lookup(slot, daddr);
        let bits =
            |k: &PolicyKey| u64::from(u32::from_be(k.slot)) << 32 | u64::from(u32::from_be(k.addr));
        let want_bits = bits(&want);
        self.rules
            .get(&slot)?
            .iter()
            .filter(|(k, _)| {
                let len = k.prefixlen.min(64);
                let mask = if len == 0 { 0 } else { u64::MAX << (64 - len) };
                (bits(k) ^ want_bits) & mask == 0
            })
            .max_by_key(|(k, _)| k.prefixlen)
            .map(|(_, r)| *r)
    }

    /// Whether `slot`'s guest may open traffic to `daddr`, and the drop reason
    /// if not: step for step the datapath's `policy::egress_check`.
    pub fn egress_check(&self, slot: u32, daddr: u32) -> Result<(), DropReason> {
        egress_verdict(
            self.longest_match(slot, daddr).as_ref(),
            self.is_host_addr(daddr),
            || self.longest_match(0, daddr),
        )
    }

    /// Whether a masquerade flow of `slot`'s guest to `daddr` may stay: the
    /// policy allows it and `daddr` is no host address (traffic to one goes up
    /// the host stack, never through the masquerade).
    pub fn keeps_masquerade_flow(&self, slot: u32, daddr: u32) -> bool {
        !self.is_host_addr(daddr) && self.egress_check(slot, daddr).is_ok()
    }
}

impl Datapath {
    /// Replaces the default deny list (the rules of slot 0) every slot falls
    /// back to where its own rules do not match.
    /// Cuts every slot's guest flows the new list denies (`purge`).
    pub fn set_default_egress(&mut self, deny: &[Cidr]) -> Result<(), BpfError> {
        let rules = EgressRules {
            allow: Vec::new(),
            deny: deny.to_vec(),
        };
        let changed = self.replace_rules(0, &rules)?;
        self.cut_denied_flows(None, changed)
    }

    /// The default deny list.
    pub fn default_egress(&self) -> Result<Vec<Cidr>, BpfError> {
        Ok(self.rules_of(0)?.deny)
    }

    /// Replaces slot `index`'s own egress rules (the datapath passes or drops
    /// by the old or the new set while this runs, never by none), then cuts
    /// the slot's guest flows the new rules deny (`purge`; nothing to cut for
    /// a slot not attached yet). A CIDR in both lists is an error; on any error
    /// the old rules stay.
    pub fn set_slot_egress(&mut self, index: u32, rules: &EgressRules) -> Result<(), BpfError> {
        self.check_index(index)?;
        let changed = self.replace_rules(index, rules)?;
        self.cut_denied_flows(Some(index), changed)
    }

    /// The verdict of the egress policy on guest-initiated traffic of slot
    /// `index` to `daddr`, evaluated in userspace as the datapath does: `None`
    /// if it passes, else the reason it is dropped.
    pub fn egress_verdict(
        &self,
        index: u32,
        daddr: Ipv4Addr,
    ) -> Result<Option<DropReason>, BpfError> {
        let view = self.egress_view(&[index])?;
        Ok(view.egress_check(index, ip_to_map(daddr)).err())
    }

    /// The rules of `slots` and the defaults, `LOCAL_ADDRS` and the slot
    /// ranges, copied for evaluation in userspace.
    pub(super) fn egress_view(&self, slots: &[u32]) -> Result<EgressView, BpfError> {
        let cfg = self.maps.global()?;
        let local: Vec<u32> = self
            .maps
            .local_addrs()?
            .into_iter()
            .map(ip_to_map)
            .collect();
        let mut rules = Vec::new();
        for slot in slots.iter().copied().chain([0]) {
            rules.push((slot, self.maps.policy_rules(slot)?));
        }
        Ok(EgressView::new(&cfg, local, rules))
    }

    /// Slot `index`'s own egress rules, each list sorted.
    pub fn slot_egress(&self, index: u32) -> Result<EgressRules, BpfError> {
        self.check_index(index)?;
        self.rules_of(index)
    }

    /// Sets (`Some`) or removes (`None`) slot `index`'s bandwidth limit; a new
    /// limit starts with a full burst.
    pub fn set_rate_limit(&mut self, index: u32, limit: Option<RateLimit>) -> Result<(), BpfError> {
        self.check_index(index)?;
        let value = match limit {
            Some(l) => {
                l.validate()?;
                l.to_map()
            }
            None => netagent_common::RateLimit::default(),
        };
        self.maps.set_rate(index, &value)
    }

    /// How slot `index`'s policy in the maps differs from the wanted one (guest
    /// MAC, egress rules, bandwidth limit), compared in the maps' own form so
    /// that what was written reads back equal: one difference per part that
    /// differs, none when the maps hold exactly these.
    pub fn policy_differences(
        &self,
        index: u32,
        guest_mac: Option<[u8; 6]>,
        egress: &EgressRules,
        rate: Option<RateLimit>,
    ) -> Result<Vec<PolicyDifference>, BpfError> {
        self.check_index(index)?;
        let mut out = Vec::new();
        let mac_text = |m: Option<[u8; 6]>| {
            m.map_or("none".to_string(), |m| {
                crate::slot::addressing::format_mac(&m)
            })
        };
        let found_mac = self.guest_mac(index)?;
        if found_mac != guest_mac {
            out.push(PolicyDifference {
                object: format!("map SLOTS[{index}].guest_mac"),
                expected: mac_text(guest_mac),
                found: mac_text(found_mac),
            });
        }
        let wanted = wanted_entries(index, egress)?;
        let found = self.entries_of(index)?;
        if entries_differ(&found, &wanted) {
            let found = found.iter().map(|(c, r)| (*c, r.action)).collect();
            out.push(PolicyDifference {
                object: format!("map POLICY (slot {index}'s egress rules)"),
                expected: rules_text(&wanted),
                found: rules_text(&found),
            });
        }
        let want = rate
            .filter(|r| r.rate_bytes_per_sec > 0)
            .map_or(netagent_common::RateLimit::default(), RateLimit::to_map);
        let have = self.maps.rate(index)?;
        let same = have.rate_bytes_per_sec == want.rate_bytes_per_sec
            && (want.rate_bytes_per_sec == 0 || have.burst_ns == want.burst_ns);
        if !same {
            let text = |v: &netagent_common::RateLimit| {
                RateLimit::from_map(v).map_or("none".to_string(), |l| {
                    format!("{} B/s, burst {} B", l.rate_bytes_per_sec, l.burst_bytes)
                })
            };
            out.push(PolicyDifference {
                object: format!("map RATE[{index}]"),
                expected: text(&want),
                found: text(&have),
            });
        }
        Ok(out)
    }

    /// Slot `index`'s bandwidth limit, if it has one.
    pub fn rate_limit(&self, index: u32) -> Result<Option<RateLimit>, BpfError> {
        self.check_index(index)?;
        Ok(RateLimit::from_map(&self.maps.rate(index)?))
    }

    /// Sets (`Some`) or clears (`None`) the MAC slot `index`'s guest must send
    /// from: with one set, `tap_ingress` drops frames and ARP from any other.
    /// The slot must be attached (the MAC is part of its `SlotInfo`); the MAC
    /// must be a unicast address other than 00:00:00:00:00:00.
    pub fn set_guest_mac(&mut self, index: u32, mac: Option<[u8; 6]>) -> Result<(), BpfError> {
        self.check_index(index)?;
        if let Some(m) = mac
            && (m[0] & 1 != 0 || m == [0; 6])
        {
            return Err(BpfError::Config(format!(
                "guest MAC {} is not a unicast address",
                m.map(|b| format!("{b:02x}")).join(":")
            )));
        }
        let mut info = self.maps.slot(index)?;
        if info.flags & SLOT_F_ACTIVE == 0 {
            return Err(BpfError::Config(format!(
                "slot {index} is not attached: set its guest MAC after attach_slot"
            )));
        }
        match mac {
            Some(m) => {
                info.guest_mac = m;
                info.flags |= SLOT_F_GUEST_MAC;
            }
            None => {
                info.guest_mac = [0; 6];
                info.flags &= !SLOT_F_GUEST_MAC;
            }
        }
        self.maps.set_slot(index, &info)
    }

    /// The MAC slot `index`'s guest must send from, if one is set.
    pub fn guest_mac(&self, index: u32) -> Result<Option<[u8; 6]>, BpfError> {
        self.check_index(index)?;
        let info = self.maps.slot(index)?;
        Ok((info.flags & SLOT_F_GUEST_MAC != 0).then_some(info.guest_mac))
    }

    /// `slot`'s POLICY entries, by CIDR.
    fn entries_of(&self, slot: u32) -> Result<BTreeMap<Cidr, PolicyRule>, BpfError> {
        Ok(self
            .maps
            .policy_rules(slot)?
            .into_iter()
            .map(|(k, r)| (Cidr::from_key(&k), r))
            .collect())
    }

    fn rules_of(&self, slot: u32) -> Result<EgressRules, BpfError> {
        let mut rules = EgressRules::default();
        for (cidr, rule) in self.entries_of(slot)? {
            match rule.action {
                POLICY_ALLOW => rules.allow.push(cidr),
                _ => rules.deny.push(cidr),
            }
        }
        Ok(rules)
    }

    /// Makes `slot`'s entries exactly `rules`: writes the wanted ones first,
    /// then removes the rest; returns whether anything changed. On an error
    /// the previous entries are restored.
    fn replace_rules(&mut self, slot: u32, rules: &EgressRules) -> Result<bool, BpfError> {
        let wanted = wanted_entries(slot, rules)?;
        let old = self.entries_of(slot)?;
        if !entries_differ(&old, &wanted) {
            return Ok(false);
        }
        let result = self.write_rules(slot, &wanted, &old);
        if result.is_err() {
            // Back to the old set: drop what is not in it, rewrite what is.
            let now: BTreeSet<Cidr> = self
                .maps
                .policy_rules(slot)
                .map(|v| v.iter().map(|(k, _)| Cidr::from_key(k)).collect())
                .unwrap_or_default();
            for cidr in now.iter().filter(|c| !old.contains_key(c)) {
                let _ = self.maps.remove_policy(&cidr.key(slot));
            }
            for (cidr, rule) in &old {
                let _ = self.maps.insert_policy(&cidr.key(slot), rule);
            }
        }
        result.map(|()| true)
    }

    fn write_rules(
        &mut self,
        slot: u32,
        wanted: &BTreeMap<Cidr, u32>,
        old: &BTreeMap<Cidr, PolicyRule>,
    ) -> Result<(), BpfError> {
        for (cidr, action) in wanted {
            let rule = rule(cidr, *action);
            if old.get(cidr) != Some(&rule) {
                self.maps.insert_policy(&cidr.key(slot), &rule)?;
            }
        }
        for cidr in old.keys().filter(|c| !wanted.contains_key(c)) {
            self.maps.remove_policy(&cidr.key(slot))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_displays() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(c, Cidr::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap());
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().len, 0);
        assert_eq!(
            "1.2.3.4/32".parse::<Cidr>().unwrap().to_string(),
            "1.2.3.4/32"
        );
        for bad in [
            "10.0.0.0",
            "10.0.0/8",
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "x/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let e = "10.1.2.3/8".parse::<Cidr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "10.1.2.3/8 has host bits set: did you mean 10.0.0.0/8?"
        );
    }

    #[test]
    fn cidr_contains() {
        let c: Cidr = "172.16.0.0/12".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(172, 31, 255, 255)));
        assert!(!c.contains(Ipv4Addr::new(172, 32, 0, 0)));
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains(Ipv4Addr::BROADCAST)
        );
    }

    #[test]
    fn cidr_serde_is_the_string() {
        let rules = EgressRules {
            allow: vec!["1.2.3.4/32".parse().unwrap()],
            deny: vec![],
        };
        let json = serde_json::to_string(&rules).unwrap();
        assert_eq!(json, r#"{"allow":["1.2.3.4/32"],"deny":[]}"#);
        assert_eq!(serde_json::from_str::<EgressRules>(&json).unwrap(), rules);
        assert!(serde_json::from_str::<EgressRules>(r#"{"allow":["1.2.3.4/33"]}"#).is_err());
        assert!(serde_json::from_str::<EgressRules>(r#"{"permit":[]}"#).is_err());
    }

    #[test]
    fn default_deny_list_is_valid() {
        for c in DEFAULT_EGRESS_DENY {
            assert_eq!(Cidr::new(c.addr, c.len).unwrap(), c);
        }
        assert!(
            DEFAULT_EGRESS_DENY
                .iter()
                .any(|c| c.contains(Ipv4Addr::new(169, 254, 169, 254)))
        );
        assert!(
            DEFAULT_EGRESS_DENY
                .iter()
                .any(|c| c.contains(Ipv4Addr::BROADCAST))
        );
    }

    #[test]
    fn rate_limit_round_trips_through_the_map_value() {
        for (rate, burst) in [(3, 1514), (125_000, 10_000), (1_000_000_000, 65_536)] {
            let l = RateLimit {
                rate_bytes_per_sec: rate,
                burst_bytes: burst,
            };
            assert_eq!(RateLimit::from_map(&l.to_map()), Some(l));
        }
        assert_eq!(
            RateLimit {
                rate_bytes_per_sec: 1_000_000,
                burst_bytes: 10_000
            }
            .to_map()
            .burst_ns,
            10_000_000
        );
        assert_eq!(RateLimit::from_map(&Default::default()), None);
    }

    /// An `EgressView` of slot 7's rules and the defaults, with the slot
    /// ranges 10.11/16 and 10.12/16 and the host addresses `local`.
    fn view(own: &EgressRules, defaults: &[Cidr], local: &[&str]) -> EgressView {
        let cfg = GlobalConfig {
            host_base: ip_to_map(Ipv4Addr::new(10, 11, 0, 0)),
            vrt_base: ip_to_map(Ipv4Addr::new(10, 12, 0, 0)),
            ..GlobalConfig::default()
        };
        let entries = |slot: u32, rules: &EgressRules| -> Vec<(PolicyKey, PolicyRule)> {
            wanted_entries(slot, rules)
                .unwrap()
                .into_iter()
                .map(|(c, action)| {
                    (
                        c.key(slot),
                        PolicyRule {
                            action,
                            prefix_len: u32::from(c.len),
                        },
                    )
                })
                .collect()
        };
        let defaults = EgressRules {
            allow: vec![],
            deny: defaults.to_vec(),
        };
        // Slot 9's rules are there too, and never apply to slot 7.
        let other = EgressRules {
            allow: vec![cidr("0.0.0.0/0")],
            deny: vec![],
        };
        EgressView::new(
            &cfg,
            local.iter().map(|a| ip_to_map(a.parse().unwrap())),
            [
                (7, entries(7, own)),
                (9, entries(9, &other)),
                (0, entries(0, &defaults)),
            ],
        )
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn rules(allow: &[&str], deny: &[&str]) -> EgressRules {
        EgressRules {
            allow: allow.iter().map(|s| cidr(s)).collect(),
            deny: deny.iter().map(|s| cidr(s)).collect(),
        }
    }

    fn check(v: &EgressView, addr: &str) -> Result<(), DropReason> {
        v.egress_check(7, ip_to_map(addr.parse().unwrap()))
    }

    /// The cases of `tests/tests/guest_filter.rs`, which run them through the
    /// datapath.
    #[test]
    fn default_deny_ranges() {
        let none = view(&EgressRules::default(), &[], &[]);
        assert_eq!(check(&none, "10.1.2.3"), Ok(()));
        let v = view(&EgressRules::default(), &DEFAULT_EGRESS_DENY, &[]);
        for a in [
            "0.1.2.3",
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.169.254",
            "169.254.1.1",
            "224.0.0.251",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert_eq!(check(&v, a), Err(DropReason::PolicyDenied), "{a}");
        }
        for a in [
            "11.0.0.1",
            "172.32.0.1",
            "192.169.0.1",
            "100.128.0.1",
            "198.18.0.100",
        ] {
            assert_eq!(check(&v, a), Ok(()), "{a}");
        }
    }

    #[test]
    fn slot_rules_and_longest_prefix() {
        let v = view(
            &rules(&["10.1.0.0/16", "169.254.169.254/32"], &[]),
            &DEFAULT_EGRESS_DENY,
            &[],
        );
        assert_eq!(check(&v, "10.1.2.3"), Ok(()));
        assert_eq!(check(&v, "169.254.169.254"), Ok(()));
        assert_eq!(check(&v, "10.2.0.1"), Err(DropReason::PolicyDenied));
        assert_eq!(check(&v, "169.254.169.253"), Err(DropReason::PolicyDenied));
        let v = view(
            &rules(
                &["198.18.0.100/32", "8.8.0.0/16"],
                &["198.18.0.0/15", "8.8.8.0/24"],
            ),
            &[],
            &[],
        );
        assert_eq!(check(&v, "198.18.0.100"), Ok(()));
        assert_eq!(check(&v, "198.18.0.101"), Err(DropReason::PolicyDenied));
        assert_eq!(check(&v, "198.19.255.1"), Err(DropReason::PolicyDenied));
        assert_eq!(check(&v, "8.8.8.8"), Err(DropReason::PolicyDenied));
        assert_eq!(check(&v, "8.8.4.4"), Ok(()));
        assert_eq!(check(&v, "9.9.9.9"), Ok(()));
        let deny_all = view(&rules(&[], &["0.0.0.0/0"]), &[], &[]);
        assert_eq!(check(&deny_all, "9.9.9.9"), Err(DropReason::PolicyDenied));
    }

    #[test]
    fn host_addresses_need_a_slash_32_allow() {
        let v = view(&EgressRules::default(), &[], &["203.0.113.5", "198.18.0.1"]);
        for a in [
            "203.0.113.5",
            "198.18.0.1",
            "10.11.0.7",
            "10.12.0.14",
            "10.12.0.15",
            "10.11.0.9",
            "10.12.0.18",
        ] {
            assert_eq!(check(&v, a), Err(DropReason::HostDenied), "{a}");
            assert!(!v.keeps_masquerade_flow(7, ip_to_map(a.parse().unwrap())));
        }
        assert_eq!(check(&v, "203.0.113.6"), Ok(()));
        let slash16 = view(&rules(&["10.12.0.0/16"], &[]), &[], &[]);
        assert_eq!(check(&slash16, "10.12.0.14"), Err(DropReason::HostDenied));
        let slash32 = view(&rules(&["10.12.0.14/32"], &[]), &[], &[]);
        assert_eq!(check(&slash32, "10.12.0.14"), Ok(()));
        assert_eq!(check(&slash32, "10.12.0.19"), Err(DropReason::HostDenied));
        // Allowed, but a host address: no masquerade flow may stay.
        assert!(!slash32.keeps_masquerade_flow(7, ip_to_map(Ipv4Addr::new(10, 12, 0, 14))));
        assert!(slash32.keeps_masquerade_flow(7, ip_to_map(Ipv4Addr::new(1, 1, 1, 1))));
    }

    #[test]
    fn conflicting_lists_are_an_error() {
        let c: Cidr = "8.8.8.0/24".parse().unwrap();
        let rules = EgressRules {
            allow: vec![c],
            deny: vec![c],
        };
        assert!(wanted_entries(3, &rules).is_err());
    }
}
