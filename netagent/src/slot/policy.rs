//! A slot's security settings as the API and the slot manager hold them: the
//! guest's MAC, its egress allow/deny lists and its bandwidth limit, with the
//! validation that turns bad input into one clear message before anything is
//! changed. The datapath form (`bpf::EgressRules`, `bpf::RateLimit`) is derived
//! from these.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bpf::{EgressRules, RateLimit};

use super::addressing::{TAP_MAC, format_mac};

/// Most CIDRs in one slot's `allow` plus `deny` lists.
pub const MAX_EGRESS_RULES: usize = 64;
/// Smallest `bits_per_second` (1 kbit/s).
pub const MIN_RATE_BITS: u64 = 1_000;
/// Largest `bits_per_second` (10 Tbit/s).
pub const MAX_RATE_BITS: u64 = 10_000_000_000_000;
pub use crate::bpf::MIN_BURST_BYTES;
/// Largest `burst_bytes` (1 GiB).
pub const MAX_BURST_BYTES: u64 = 1 << 30;

/// The only source MAC the guest may use: a unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestMac(pub [u8; 6]);

impl FromStr for GuestMac {
    type Err = String;

    fn from_str(s: &str) -> Result<GuestMac, String> {
        let bad = || {
            format!(
                "guest_mac {s:?} is not a MAC address: use six hex bytes separated by ':', e.g. \"02:00:00:00:00:01\""
            )
        };
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(format!(
                "guest_mac {s} is a multicast/broadcast address: the guest's MAC must be unicast (first byte even, e.g. 02:...)"
            ));
        }
        if mac == [0; 6] {
            return Err("guest_mac 00:00:00:00:00:00 is not a usable address".into());
        }
        if mac == TAP_MAC {
            return Err(format!(
                "guest_mac {s} is the MAC of the slot's tap0 (the guest's gateway): give the guest its own"
            ));
        }
        Ok(GuestMac(mac))
    }
}

impl fmt::Display for GuestMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_mac(&self.0))
    }
}

impl Serialize for GuestMac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GuestMac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<GuestMac, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a slot's egress lists: at most [`MAX_EGRESS_RULES`] CIDRs, none twice,
/// none in both lists.
pub fn validate_egress(egress: &EgressRules) -> Result<(), String> {
    let total = egress.allow.len() + egress.deny.len();
    if total > MAX_EGRESS_RULES {
        return Err(format!(
            "egress has {total} rules: at most {MAX_EGRESS_RULES} CIDRs in allow and deny together"
        ));
    }
    let mut seen = BTreeSet::new();
    for (list, cidrs) in [("allow", &egress.allow), ("deny", &egress.deny)] {
        for cidr in cidrs {
            if !seen.insert(*cidr) {
                let both = egress.allow.contains(cidr) && egress.deny.contains(cidr);
                return Err(if both {
                    format!("egress: {cidr} is in both allow and deny; keep it in one")
                } else {
                    format!("egress: {cidr} appears twice in {list}")
                });
            }
        }
    }
    Ok(())
}

/// Whether two rule sets are the same, in whatever order the CIDRs are listed.
pub fn same_rules(a: &EgressRules, b: &EgressRules) -> bool {
    let set = |v: &[crate::bpf::Cidr]| v.iter().copied().collect::<BTreeSet<_>>();
    set(&a.allow) == set(&b.allow) && set(&a.deny) == set(&b.deny)
}

/// A slot's bandwidth limit for traffic from the guest: a sustained rate and
/// the burst allowed above it. Frames beyond it are dropped (`rate_limited`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Sustained rate in bits per second (L2 frame bytes × 8).
    pub bits_per_second: u64,
    /// Bytes the guest may send at once above the rate (at least one frame; a
    /// guest with TSO sends frames of up to 64 KiB).
    pub burst_bytes: u64,
}

impl RateLimitSpec {
    /// Checks both values against their ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_RATE_BITS..=MAX_RATE_BITS).contains(&self.bits_per_second) {
            return Err(format!(
                "rate_limit.bits_per_second {} is out of range: use {MIN_RATE_BITS} (1 kbit/s) to {MAX_RATE_BITS} (10 Tbit/s); DELETE the rate_limit to have none",
                self.bits_per_second
            ));
        }
        if !self.bits_per_second.is_multiple_of(8) {
            return Err(format!(
                "rate_limit.bits_per_second {} is not a whole number of bytes per second: use a multiple of 8 (the datapath counts bytes; e.g. {})",
                self.bits_per_second,
                self.bits_per_second / 8 * 8
            ));
        }
        if !(MIN_BURST_BYTES..=MAX_BURST_BYTES).contains(&self.burst_bytes) {
            return Err(format!(
                "rate_limit.burst_bytes {} is out of range: use {MIN_BURST_BYTES} (one frame) to {MAX_BURST_BYTES}; 65536 or more lets a guest with TSO send full-size segments",
                self.burst_bytes
            ));
        }
        Ok(())
    }

    /// The datapath form (bytes per second).
    pub fn limit(&self) -> RateLimit {
        RateLimit {
            rate_bytes_per_sec: self.bits_per_second / 8,
            burst_bytes: self.burst_bytes,
        }
    }
}

/// Everything security-related a slot carries.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SlotPolicy {
    /// The only source MAC the guest may use (`None`: any).
    pub guest_mac: Option<GuestMac>,
    /// The slot's own egress lists.
    #[serde(default)]
    pub egress: EgressRules,
    /// The bandwidth limit (`None`: unlimited).
    pub rate_limit: Option<RateLimitSpec>,
}

/// The policy part of a create request: what is given is applied at create and,
/// for a slot that exists, compared with what it has; what is absent is left as
/// it is (a new slot: no guest MAC, no own rules, no limit).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyRequest {
    /// `guest_mac`, if given.
    pub guest_mac: Option<GuestMac>,
    /// `egress`, if given.
    pub egress: Option<EgressRules>,
    /// `rate_limit`, if given.
    pub rate_limit: Option<RateLimitSpec>,
}

impl PolicyRequest {
    /// Validates every part given.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(egress) = &self.egress {
            validate_egress(egress)?;
        }
        if let Some(limit) = &self.rate_limit {
            limit.validate()?;
        }
        Ok(())
    }

    /// The policy of a slot created from this request.
    pub fn to_policy(&self) -> SlotPolicy {
        SlotPolicy {
            guest_mac: self.guest_mac,
            egress: self.egress.clone().unwrap_or_default(),
            rate_limit: self.rate_limit,
        }
    }

    /// For a slot that exists with `have`: `None` when everything given matches,
    /// else what differs and how to change it.
    pub fn mismatch(&self, index: u32, have: &SlotPolicy) -> Option<String> {
        if let Some(mac) = self.guest_mac
            && have.guest_mac != Some(mac)
        {
            let current = have
                .guest_mac
                .map_or_else(|| "none".to_string(), |m| m.to_string());
            return Some(format!(
                "slot {index} exists with guest_mac {current}, not {mac}; the guest MAC is set at create: delete the slot first to change it"
            ));
        }
        if let Some(egress) = &self.egress
            && !same_rules(egress, &have.egress)
        {
            return Some(format!(
                "slot {index} exists with other egress rules; change them with PUT /v1/slots/{index}/egress"
            ));
        }
        if let Some(limit) = &self.rate_limit
            && have.rate_limit != Some(*limit)
        {
            return Some(format!(
                "slot {index} exists with another rate_limit; change it with PUT /v1/slots/{index}/rate_limit"
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::Cidr;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn macs_parse_and_print() {
        let mac: GuestMac = "02:AB:00:00:00:01".parse().unwrap();
        assert_eq!(mac.0, [2, 0xab, 0, 0, 0, 1]);
        assert_eq!(mac.to_string(), "02:ab:00:00:00:01");
        for (bad, needle) in [
            ("02:00:00:00:00", "not a MAC"),
            ("02:00:00:00:00:01:02", "not a MAC"),
            ("02-00-00-00-00-01", "not a MAC"),
            ("2:0:0:0:0:1", "not a MAC"),
            ("zz:00:00:00:00:01", "not a MAC"),
            ("01:00:5e:00:00:01", "multicast"),
            ("ff:ff:ff:ff:ff:ff", "multicast"),
            ("00:00:00:00:00:00", "not a usable"),
            ("02:fc:00:00:00:05", "tap0"),
        ] {
            let err = bad.parse::<GuestMac>().unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn egress_limits_and_duplicates() {
        let ok = EgressRules {
            allow: vec![cidr("10.1.0.0/16"), cidr("192.168.1.7/32")],
            deny: vec![cidr("198.18.5.0/24")],
        };
        validate_egress(&ok).unwrap();
        let twice = EgressRules {
            allow: vec![cidr("10.1.0.0/16"), cidr("10.1.0.0/16")],
            deny: vec![],
        };
        assert!(
            validate_egress(&twice)
                .unwrap_err()
                .contains("twice in allow")
        );
        let both = EgressRules {
            allow: vec![cidr("10.1.0.0/16")],
            deny: vec![cidr("10.1.0.0/16")],
        };
        assert!(
            validate_egress(&both)
                .unwrap_err()
                .contains("both allow and deny")
        );
        let many = EgressRules {
            allow: (0..=MAX_EGRESS_RULES as u32)
                .map(|i| Cidr {
                    addr: std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)),
                    len: 24,
                })
                .collect(),
            deny: vec![],
        };
        assert!(validate_egress(&many).unwrap_err().contains("at most 64"));
    }

    #[test]
    fn rate_limits_are_ranged_and_converted() {
        let spec = RateLimitSpec {
            bits_per_second: 20_000_000,
            burst_bytes: 65_536,
        };
        spec.validate().unwrap();
        assert_eq!(spec.limit().rate_bytes_per_sec, 2_500_000);
        assert_eq!(spec.limit().burst_bytes, 65_536);
        for (bits, burst, needle) in [
            (0, 65_536, "bits_per_second 0"),
            (20_000_001, 65_536, "not a whole number of bytes"),
            (MAX_RATE_BITS + 1, 65_536, "bits_per_second"),
            (1_000_000, 0, "burst_bytes 0"),
            (1_000_000, 1_000, "burst_bytes 1000"),
            (1_000_000, MAX_BURST_BYTES + 1, "burst_bytes"),
        ] {
            let err = RateLimitSpec {
                bits_per_second: bits,
                burst_bytes: burst,
            }
            .validate()
            .unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn a_request_matches_what_it_names() {
        let have = SlotPolicy {
            guest_mac: Some("02:00:00:00:00:01".parse().unwrap()),
            egress: EgressRules {
                allow: vec![cidr("10.0.0.0/8")],
                deny: vec![],
            },
            rate_limit: None,
        };
        assert_eq!(PolicyRequest::default().mismatch(1, &have), None);
        let same = PolicyRequest {
            guest_mac: have.guest_mac,
            egress: Some(have.egress.clone()),
            rate_limit: None,
        };
        assert_eq!(same.mismatch(1, &have), None);
        let other_egress = PolicyRequest {
            egress: Some(EgressRules::default()),
            ..PolicyRequest::default()
        };
        let reordered = PolicyRequest {
            egress: Some(EgressRules {
                allow: vec![cidr("192.168.0.0/16"), cidr("10.0.0.0/8")],
                deny: vec![],
            }),
            ..PolicyRequest::default()
        };
        let mut have2 = have.clone();
        have2.egress.allow.push(cidr("192.168.0.0/16"));
        assert_eq!(reordered.mismatch(1, &have2), None);
        assert!(
            other_egress
                .mismatch(1, &have)
                .unwrap()
                .contains("PUT /v1/slots/1/egress")
        );
        let limit = PolicyRequest {
            rate_limit: Some(RateLimitSpec {
                bits_per_second: 8_000,
                burst_bytes: 2_000,
            }),
            ..PolicyRequest::default()
        };
        assert!(
            limit
                .mismatch(1, &have)
                .unwrap()
                .contains("/v1/slots/1/rate_limit")
        );
        let mac = PolicyRequest {
            guest_mac: Some("02:00:00:00:00:02".parse().unwrap()),
            ..PolicyRequest::default()
        };
        assert!(mac.mismatch(1, &have).unwrap().contains("delete the slot"));
    }
}
