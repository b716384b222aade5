//! The map layout descriptor: what a restarted agent checks before it reuses
//! the maps a previous run pinned.
//!
//! The descriptor is text: `LAYOUT_VERSION` (netagent-common, bumped with any
//! change to a key or value struct that older maps would not read the same),
//! the size of every key and value struct,
//! and one line per map with its type, key size, value size and max_entries
//! (the latter from the configuration). Its FNV-1a hash is the short id the
//! logs show. It is stored beside the map pins as the pinned one-entry array
//! `LAYOUT` (bpffs holds no plain files) and written whenever maps are pinned.
//!
//! On start, pinned maps are reused only when (1) the stored descriptor equals
//! the agent's own and (2) every pinned map, as the kernel reports it, has the
//! type, sizes and max_entries the agent expects. Anything else is a
//! [`LayoutCheck::Mismatch`] listing every difference by map; the datapath then
//! unpins the old maps and starts from fresh ones (never a silent reuse), and
//! the slots that ran on the old maps cannot be adopted (see `slot::adopt`).

use std::path::Path;

use aya::maps::{Array, Map, MapData, MapInfo, MapType};
use netagent_common::{
    FlowKey, GlobalConfig, GuestL2, LAYOUT_VERSION, MAP_ADDR_SLOTS, MAP_CONFIG, MAP_GUEST_L2,
    MAP_HOST_FLOWS, MAP_LOCAL_ADDRS, MAP_NAT_EGRESS, MAP_NAT_INGRESS, MAP_NAT_PORT_CURSORS,
    MAP_NEXT_HOPS, MAP_POLICY, MAP_RATE, MAP_SLOTS, MAP_STATS, MAP_VETH_SLOTS, NatEntry, NextHop,
    PolicyKey, PolicyRule, RateLimit, SlotInfo, SlotStats,
};

use super::BpfError;
use super::load::{DatapathConfig, MAP_NAMES};
use super::pins::PinDir;

/// Name of the pinned descriptor map.
pub const LAYOUT_PIN: &str = "LAYOUT";
/// Bytes of the descriptor map's one value: a little-endian `u32` length, then
/// the text.
const LAYOUT_BYTES: usize = 2048;

/// One map as the layout describes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapLayout {
    /// Map name (also its pin name).
    pub name: &'static str,
    /// Kernel map type.
    pub map_type: MapType,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes (per CPU for per-CPU maps).
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
}

const fn size<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// The maps this agent expects with configuration `cfg`.
pub fn expected_maps(cfg: &DatapathConfig) -> Vec<MapLayout> {
    MAP_NAMES
        .iter()
        .map(|&name| {
            let (map_type, key_size, value_size) = match name {
                MAP_CONFIG => (MapType::Array, 4, size::<GlobalConfig>()),
                MAP_SLOTS => (MapType::Array, 4, size::<SlotInfo>()),
                MAP_ADDR_SLOTS | MAP_VETH_SLOTS | MAP_LOCAL_ADDRS => (MapType::Hash, 4, 4),
                MAP_NAT_EGRESS | MAP_NAT_INGRESS | MAP_HOST_FLOWS => {
                    (MapType::Hash, size::<FlowKey>(), size::<NatEntry>())
                }
                MAP_STATS => (MapType::PerCpuArray, 4, size::<SlotStats>()),
                MAP_GUEST_L2 => (MapType::Array, 4, size::<GuestL2>()),
                MAP_POLICY => (MapType::LpmTrie, size::<PolicyKey>(), size::<PolicyRule>()),
                MAP_RATE => (MapType::Array, 4, size::<RateLimit>()),
                MAP_NAT_PORT_CURSORS => (MapType::Array, 4, size::<u64>()),
                MAP_NEXT_HOPS => (MapType::PerCpuArray, 4, size::<NextHop>()),
                _ => (MapType::Unspecified, 0, 0),
            };
            MapLayout {
                name,
                map_type,
                key_size,
                value_size,
                max_entries: cfg.max_entries(name),
            }
        })
        .collect()
}

fn map_line(m: &MapLayout) -> String {
    format!(
        "map {} type={:?} key={} value={} max_entries={}",
        m.name, m.map_type, m.key_size, m.value_size, m.max_entries
    )
}

/// The descriptor text of configuration `cfg`.
pub fn descriptor(cfg: &DatapathConfig) -> String {
    let mut text = format!("netagent map layout version={LAYOUT_VERSION}\n");
    text += &format!(
        "structs GlobalConfig={} SlotInfo={} FlowKey={} NatEntry={} SlotStats={} GuestL2={} \
         PolicyKey={} PolicyRule={} RateLimit={}\n",
        size::<GlobalConfig>(),
        size::<SlotInfo>(),
        size::<FlowKey>(),
        size::<NatEntry>(),
        size::<SlotStats>(),
        size::<GuestL2>(),
        size::<PolicyKey>(),
        size::<PolicyRule>(),
        size::<RateLimit>(),
    );
    for m in expected_maps(cfg) {
        text += &map_line(&m);
        text.push('\n');
    }
    text
}

/// FNV-1a (64 bits) of `text`: the layout's short id in logs.
pub fn layout_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What was found in the pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutCheck {
    /// No map is pinned: nothing to reuse.
    Fresh,
    /// Every map is pinned with the expected layout: reuse them.
    Match,
    /// Pins exist but do not match; one line per difference, each naming the
    /// map (or the descriptor) and what differs.
    Mismatch(Vec<String>),
}

/// The descriptor stored in `pins`, if any.
fn read_stored(pins: &PinDir) -> Result<Option<String>, String> {
    read_stored_at(&pins.map_path(LAYOUT_PIN))
}

/// The descriptor stored at `path` (a `LAYOUT` pin), if there is one.
pub fn read_stored_at(path: &Path) -> Result<Option<String>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let map = Map::from_map_data(data).map_err(|e| format!("open {}: {e}", path.display()))?;
    let array = Array::<MapData, [u8; LAYOUT_BYTES]>::try_from(map)
        .map_err(|e| format!("the pinned {LAYOUT_PIN} is not a layout descriptor: {e}"))?;
    let value = array
        .get(&0, 0)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    let len = u32::from_le_bytes([value[0], value[1], value[2], value[3]]) as usize;
    if len > LAYOUT_BYTES - 4 {
        return Err(format!("the stored descriptor claims {len} bytes"));
    }
    Ok(Some(
        String::from_utf8_lossy(&value[4..4 + len]).into_owned(),
    ))
}

/// Line-by-line differences between the stored and the expected descriptor,
/// keyed by their first words (`map NAME`, `structs`, the version line).
fn descriptor_diffs(stored: &str, expected: &str) -> Vec<String> {
    let key = |line: &str| -> String {
        if let Some(rest) = line.strip_prefix("map ") {
            format!("map {}", rest.split_whitespace().next().unwrap_or(""))
        } else {
            line.split_whitespace().next().unwrap_or("").to_string()
        }
    };
    let mut out = Vec::new();
    for want in expected.lines() {
        let k = key(want);
        match stored.lines().find(|l| key(l) == k) {
            Some(have) if have == want => {}
            Some(have) => out.push(format!(
                "descriptor {k}: stored \"{have}\", this agent has \"{want}\""
            )),
            None => out.push(format!(
                "descriptor {k}: not in the stored layout (this agent has \"{want}\")"
            )),
        }
    }
    for have in stored.lines() {
        let k = key(have);
        if !expected.lines().any(|l| key(l) == k) {
            out.push(format!(
                "descriptor {k}: stored \"{have}\", unknown to this agent"
            ));
        }
    }
    out
}

/// Compares what is pinned in `pins` with configuration `cfg`.
pub(super) fn check(pins: &PinDir, cfg: &DatapathConfig) -> LayoutCheck {
    let expected = expected_maps(cfg);
    let pinned: Vec<&MapLayout> = expected
        .iter()
        .filter(|m| pins.map_path(m.name).exists())
        .collect();
    if pinned.is_empty() && !pins.map_path(LAYOUT_PIN).exists() {
        return LayoutCheck::Fresh;
    }
    let mut diffs = Vec::new();
    match read_stored(pins) {
        Ok(Some(stored)) => diffs.extend(descriptor_diffs(&stored, &descriptor(cfg))),
        Ok(None) => diffs.push(format!(
            "descriptor: no {LAYOUT_PIN} pin beside the maps (written by another version?)"
        )),
        Err(e) => diffs.push(format!("descriptor: {e}")),
    }
    for m in &expected {
        let path = pins.map_path(m.name);
        if !path.exists() {
            diffs.push(format!("map {}: not pinned", m.name));
            continue;
        }
        let info = match MapInfo::from_pin(&path) {
            Ok(i) => i,
            Err(e) => {
                diffs.push(format!("map {}: unreadable pin: {e}", m.name));
                continue;
            }
        };
        let map_type = info
            .map_type()
            .map_or_else(|e| e.to_string(), |t| format!("{t:?}"));
        for (what, want, have) in [
            ("type", format!("{:?}", m.map_type), map_type),
            (
                "key size",
                m.key_size.to_string(),
                info.key_size().to_string(),
            ),
            (
                "value size",
                m.value_size.to_string(),
                info.value_size().to_string(),
            ),
            (
                "max_entries",
                m.max_entries.to_string(),
                info.max_entries().to_string(),
            ),
        ] {
            if want != have {
                diffs.push(format!(
                    "map {}: {what} is {have} in the pinned map, this agent expects {want}",
                    m.name
                ));
            }
        }
    }
    if diffs.is_empty() {
        LayoutCheck::Match
    } else {
        LayoutCheck::Mismatch(diffs)
    }
}

/// Pins the descriptor of `cfg` in `pins` (replacing any stored one).
pub(super) fn store(pins: &PinDir, cfg: &DatapathConfig) -> Result<(), BpfError> {
    let text = descriptor(cfg);
    let mut value = [0u8; LAYOUT_BYTES];
    let bytes = text.as_bytes();
    if bytes.len() > LAYOUT_BYTES - 4 {
        return Err(BpfError::Config(format!(
            "the layout descriptor is {} bytes, more than the {} it is stored in",
            bytes.len(),
            LAYOUT_BYTES - 4
        )));
    }
    value[..4].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
    value[4..4 + bytes.len()].copy_from_slice(bytes);
    let mut array = Array::<MapData, [u8; LAYOUT_BYTES]>::create(1, 0)
        .map_err(|e| BpfError::map(LAYOUT_PIN, "create", e))?;
    array
        .set(0, value, 0)
        .map_err(|e| BpfError::map(LAYOUT_PIN, "update", e))?;
    pins.unpin(LAYOUT_PIN)?;
    let path = pins.map_path(LAYOUT_PIN);
    array.pin(&path).map_err(|e| {
        BpfError::syscall(
            format!("pin {}", path.display()),
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(())
}

/// Overwrites the descriptor stored at `pin` with `text` (tests tamper with it
/// to check that a mismatch is detected).
pub fn overwrite_stored(pin: &Path, text: &str) -> Result<(), String> {
    let data = MapData::from_pin(pin).map_err(|e| e.to_string())?;
    let map = Map::from_map_data(data).map_err(|e| e.to_string())?;
    let mut array =
        Array::<MapData, [u8; LAYOUT_BYTES]>::try_from(map).map_err(|e| e.to_string())?;
    let mut value = [0u8; LAYOUT_BYTES];
    let bytes = &text.as_bytes()[..text.len().min(LAYOUT_BYTES - 4)];
    value[..4].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
    value[4..4 + bytes.len()].copy_from_slice(bytes);
    array.set(0, value, 0).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_names_every_map_and_changes_with_the_sizes() {
        let cfg = DatapathConfig::default();
        let text = descriptor(&cfg);
        for name in MAP_NAMES {
            assert!(text.contains(&format!("map {name} type=")), "{text}");
        }
        assert!(text.starts_with(&format!("netagent map layout version={LAYOUT_VERSION}\n")));
        let mut bigger = cfg.clone();
        bigger.nat_table_size += 1;
        let other = descriptor(&bigger);
        assert_ne!(layout_hash(&text), layout_hash(&other));
        let diffs = descriptor_diffs(&text, &other);
        assert_eq!(diffs.len(), 2, "{diffs:?}");
        assert!(
            diffs[0].starts_with("descriptor map NAT_EGRESS: stored"),
            "{diffs:?}"
        );
        assert!(descriptor_diffs(&text, &text).is_empty());
        let old = text.replace(
            &format!("version={LAYOUT_VERSION}"),
            &format!("version={}", LAYOUT_VERSION + 1),
        );
        let diffs = descriptor_diffs(&old, &text);
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert!(diffs[0].contains("version="), "{diffs:?}");
    }
}
