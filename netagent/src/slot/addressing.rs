//! Slot addressing and names, computed exactly as the reference implementation's
//! `NewSlot` does (DESIGN §1): HostIP = host_base + N, veth = vrt_base + 2N,
//! vpeer = vrt_base + 2N + 1, with the carry into the third octet.

use std::net::Ipv4Addr;

use serde::Serialize;

/// Lowest valid slot index.
pub const MIN_INDEX: u32 = 1;
/// Highest valid slot index (2N + 1 must fit in 16 bits).
pub const MAX_INDEX: u32 = netagent_common::MAX_SLOT_INDEX;

/// Fixed per-namespace values (identical in every slot).
pub const TAP_NAME: &str = "tap0";
/// Slot side of the veth pair.
pub const VPEER_NAME: &str = "eth0";
/// TAP address inside the slot namespace.
pub const TAP_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// TAP prefix length.
pub const TAP_PREFIX: u8 = 30;
/// TAP MAC (the seed's `02:FC:00:00:00:05`).
pub const TAP_MAC: [u8; 6] = [0x02, 0xfc, 0x00, 0x00, 0x00, 0x05];
/// TAP transmit queue length.
pub const TAP_TXQUEUELEN: u32 = 5000;
/// MAC of slot `index`'s host veth: locally administered, `02:6e:61:00:` and
/// the index (a veth pair is its own link, so only the two ends must differ).
pub const fn host_veth_mac(index: u32) -> [u8; 6] {
    [0x02, 0x6e, 0x61, 0x00, (index >> 8) as u8, index as u8]
}
/// MAC of slot `index`'s `eth0` (the host veth's peer): `02:6e:61:01:` and the
/// index.
pub const fn eth0_mac(index: u32) -> [u8; 6] {
    [0x02, 0x6e, 0x61, 0x01, (index >> 8) as u8, index as u8]
}
/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The guest's netmask.
pub const GUEST_NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 252);
/// Prefix length of the veth /31.
pub const VETH_PREFIX: u8 = 31;
/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Why a slot's addressing cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressingError {
    /// The index is outside `[1, 32767]`.
    #[error("slot index {0} is out of range: use an integer from 1 to 32767")]
    IndexOutOfRange(i64),
    /// A base address is not the start of a /16.
    #[error("{name} {addr} is not a /16 base: its last two octets must be 0 (e.g. 10.11.0.0)")]
    BaseNotSlash16 {
        /// Which setting.
        name: &'static str,
        /// Its value.
        addr: Ipv4Addr,
    },
    /// The prefix makes some interface name longer than the kernel allows.
    #[error(
        "prefix {prefix:?} is too long: interface name {example:?} would exceed 15 characters; use at most 8 characters"
    )]
    PrefixTooLong {
        /// The configured prefix.
        prefix: String,
        /// The name that does not fit.
        example: String,
    },
    /// The prefix has characters that are not allowed in names.
    #[error("prefix {0:?} must be non-empty ASCII letters, digits, '_' or '.'")]
    PrefixInvalid(String),
}

/// The naming and address plan shared by every slot of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPlan {
    prefix: String,
    host_base: Ipv4Addr,
    vrt_base: Ipv4Addr,
}

impl AddressPlan {
    /// Validates the prefix and bases once, so per-slot computation cannot fail
    /// except on the index.
    pub fn new(
        prefix: &str,
        host_base: Ipv4Addr,
        vrt_base: Ipv4Addr,
    ) -> Result<Self, AddressingError> {
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(AddressingError::PrefixInvalid(prefix.to_string()));
        }
        for (name, addr) in [("host_base", host_base), ("vrt_base", vrt_base)] {
            if addr.octets()[2] != 0 || addr.octets()[3] != 0 {
                return Err(AddressingError::BaseNotSlash16 { name, addr });
            }
        }
        let plan = AddressPlan {
            prefix: prefix.to_string(),
            host_base,
            vrt_base,
        };
        let longest = plan.veth_name(MAX_INDEX);
        if longest.len() > IFNAME_MAX {
            return Err(AddressingError::PrefixTooLong {
                prefix: prefix.to_string(),
                example: longest,
            });
        }
        Ok(plan)
    }

    /// The name prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Namespace name of slot `index`: `{prefix}-ns-{index}`.
    pub fn namespace_name(&self, index: u32) -> String {
        format!("{}-ns-{index}", self.prefix)
    }

    /// Host-side veth name: `{prefix}-veth-{index}` as the seed names it, or the
    /// short form `{prefix}-v{index}` where that would exceed 15 characters (the
    /// seed's names stop fitting at index 10000 with the default prefix).
    pub fn veth_name(&self, index: u32) -> String {
        let long = format!("{}-veth-{index}", self.prefix);
        if long.len() <= IFNAME_MAX {
            long
        } else {
            format!("{}-v{index}", self.prefix)
        }
    }

    /// Parses a namespace name of this plan back into its index.
    pub fn index_of_namespace(&self, name: &str) -> Option<u32> {
        parse_index(name.strip_prefix(&self.prefix)?.strip_prefix("-ns-")?)
    }

    /// Parses a host veth name of this plan (either form) back into its index.
    pub fn index_of_veth(&self, name: &str) -> Option<u32> {
        let rest = name.strip_prefix(&self.prefix)?;
        let digits = rest
            .strip_prefix("-veth-")
            .or_else(|| rest.strip_prefix("-v"))?;
        let index = parse_index(digits)?;
        (self.veth_name(index) == name).then_some(index)
    }

    /// Computes slot `index`'s addressing; the only failure is an index outside
    /// `[1, 32767]`.
    pub fn slot(&self, index: i64) -> Result<SlotAddr, AddressingError> {
        if !(MIN_INDEX as i64..=MAX_INDEX as i64).contains(&index) {
            return Err(AddressingError::IndexOutOfRange(index));
        }
        let n = index as u32;
        Ok(SlotAddr {
            index: n,
            namespace: self.namespace_name(n),
            veth: self.veth_name(n),
            host_ip: offset(self.host_base, n),
            veth_ip: offset(self.vrt_base, 2 * n),
            vpeer_ip: offset(self.vrt_base, 2 * n + 1),
            tap: TAP_NAME.to_string(),
            tap_ip: TAP_IP,
            tap_mac: format_mac(&TAP_MAC),
            guest_ip: GUEST_IP,
            guest_netmask: GUEST_NETMASK,
        })
    }
}

/// A slot's names and addresses; serializes to the API's slot object (DESIGN §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SlotAddr {
    /// Slot index, 1..=32767.
    pub index: u32,
    /// Network namespace name (in `/run/netns`).
    pub namespace: String,
    /// Host-side veth name.
    pub veth: String,
    /// Host-reachable address of the guest.
    pub host_ip: Ipv4Addr,
    /// Host-side veth address.
    pub veth_ip: Ipv4Addr,
    /// Slot-side veth (`eth0`) address.
    pub vpeer_ip: Ipv4Addr,
    /// TAP name inside the namespace.
    pub tap: String,
    /// TAP address.
    pub tap_ip: Ipv4Addr,
    /// TAP MAC, lower-case `aa:bb:..`.
    pub tap_mac: String,
    /// Guest address.
    pub guest_ip: Ipv4Addr,
    /// Guest netmask.
    pub guest_netmask: Ipv4Addr,
}

/// `base + off` with the seed's per-octet arithmetic: the high byte of `off` goes
/// into the third octet and the low byte into the fourth. With a /16 base (checked
/// by `AddressPlan::new`) and `off < 65536` this never wraps.
fn offset(base: Ipv4Addr, off: u32) -> Ipv4Addr {
    let [a, b, c, d] = base.octets();
    Ipv4Addr::new(
        a,
        b,
        c.wrapping_add((off >> 8) as u8),
        d.wrapping_add((off & 0xff) as u8),
    )
}

fn parse_index(digits: &str) -> Option<u32> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    digits
        .parse()
        .ok()
        .filter(|n| (MIN_INDEX..=MAX_INDEX).contains(n))
}

/// Formats a MAC as lower-case colon-separated hex.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> AddressPlan {
        AddressPlan::new(
            "wrenn",
            Ipv4Addr::new(10, 11, 0, 0),
            Ipv4Addr::new(10, 12, 0, 0),
        )
        .unwrap()
    }

    #[test]
    fn slot_1_matches_the_seed() {
        let s = plan().slot(1).unwrap();
        assert_eq!(s.namespace, "wrenn-ns-1");
        assert_eq!(s.veth, "wrenn-veth-1");
        assert_eq!(s.host_ip, Ipv4Addr::new(10, 11, 0, 1));
        assert_eq!(s.veth_ip, Ipv4Addr::new(10, 12, 0, 2));
        assert_eq!(s.vpeer_ip, Ipv4Addr::new(10, 12, 0, 3));
        assert_eq!(s.tap_mac, "02:fc:00:00:00:05");
    }

    #[test]
    fn carry_into_the_third_octet() {
        let s = plan().slot(300).unwrap();
        assert_eq!(s.host_ip, Ipv4Addr::new(10, 11, 1, 44));
        assert_eq!(s.veth_ip, Ipv4Addr::new(10, 12, 2, 88));
        assert_eq!(s.vpeer_ip, Ipv4Addr::new(10, 12, 2, 89));
        let s = plan().slot(128).unwrap();
        assert_eq!(s.veth_ip, Ipv4Addr::new(10, 12, 1, 0));
        assert_eq!(s.vpeer_ip, Ipv4Addr::new(10, 12, 1, 1));
        assert_eq!(s.host_ip, Ipv4Addr::new(10, 11, 0, 128));
    }

    #[test]
    fn both_ends_of_the_range() {
        let s = plan().slot(32767).unwrap();
        assert_eq!(s.host_ip, Ipv4Addr::new(10, 11, 127, 255));
        assert_eq!(s.veth_ip, Ipv4Addr::new(10, 12, 255, 254));
        assert_eq!(s.vpeer_ip, Ipv4Addr::new(10, 12, 255, 255));
        assert_eq!(s.veth, "wrenn-v32767");
        for bad in [0, -1, 32768, i64::MAX, i64::MIN] {
            assert_eq!(plan().slot(bad), Err(AddressingError::IndexOutOfRange(bad)));
        }
    }

    #[test]
    fn names_round_trip_and_switch_form_where_too_long() {
        let p = plan();
        assert_eq!(p.veth_name(9999), "wrenn-veth-9999");
        assert_eq!(p.veth_name(10000), "wrenn-v10000");
        for n in [1, 9, 10, 9999, 10000, 32767] {
            assert_eq!(p.index_of_veth(&p.veth_name(n)), Some(n));
            assert_eq!(p.index_of_namespace(&p.namespace_name(n)), Some(n));
        }
        for bad in [
            "wrenn-veth-0",
            "wrenn-veth-01",
            "wrenn-v5",
            "other-veth-1",
            "wrenn-ns-x",
            "wrenn-ns-40000",
        ] {
            assert_eq!(
                p.index_of_veth(bad).or(p.index_of_namespace(bad)),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn plan_rejects_bad_prefix_and_bases() {
        let b = Ipv4Addr::new(10, 11, 0, 0);
        assert!(matches!(
            AddressPlan::new("", b, b),
            Err(AddressingError::PrefixInvalid(_))
        ));
        assert!(matches!(
            AddressPlan::new("a/b", b, b),
            Err(AddressingError::PrefixInvalid(_))
        ));
        assert!(matches!(
            AddressPlan::new("toolongprefix", b, b),
            Err(AddressingError::PrefixTooLong { .. })
        ));
        assert!(matches!(
            AddressPlan::new("w", Ipv4Addr::new(10, 11, 0, 1), b),
            Err(AddressingError::BaseNotSlash16 {
                name: "host_base",
                ..
            })
        ));
    }

    #[test]
    fn json_shape_is_the_api_contract() {
        let v = serde_json::to_value(plan().slot(1).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"index":1,"namespace":"wrenn-ns-1","veth":"wrenn-veth-1",
                "host_ip":"10.11.0.1","veth_ip":"10.12.0.2","vpeer_ip":"10.12.0.3","tap":"tap0",
                "tap_ip":"169.254.0.22","tap_mac":"02:fc:00:00:00:05","guest_ip":"169.254.0.21",
                "guest_netmask":"255.255.255.252"})
        );
    }
}
