//! Sysctls through `/proc/sys`, read and written inside a chosen namespace, and the
//! host's `ip_local_reserved_ports` list.
//!
//! `/proc/sys/net` shows the namespace of the thread that opens the file, so
//! [`write_in`] and [`read_in`] open it on a thread that joined the namespace.

use std::fmt;
use std::fs;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;

use super::{NetlinkError, Result, netns};

/// The host's reserved local ports sysctl.
pub const RESERVED_PORTS: &str = "net.ipv4.ip_local_reserved_ports";

fn path_of(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Reads `key` (e.g. `net.ipv4.ip_forward`) as seen from the calling thread.
pub fn read(key: &str) -> Result<String> {
    fs::read_to_string(path_of(key))
        .map(|s| s.trim().to_string())
        .map_err(|e| NetlinkError::io(format!("read sysctl {key}"), e))
}

/// Writes `key` as seen from the calling thread.
pub fn write(key: &str, value: &str) -> Result<()> {
    fs::write(path_of(key), value)
        .map_err(|e| NetlinkError::io(format!("write sysctl {key}={value}"), e))
}

/// Reads `key` inside namespace `ns`.
pub fn read_in(ns: BorrowedFd<'_>, key: &str) -> Result<String> {
    netns::run_in(ns, || read(key))?
}

/// Writes `key` inside namespace `ns`.
pub fn write_in(ns: BorrowedFd<'_>, key: &str, value: &str) -> Result<()> {
    netns::run_in(ns, || write(key, value))?
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    /// First port.
    pub min: u16,
    /// Last port (inclusive).
    pub max: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// Parses the kernel's `ip_local_reserved_ports` format (`"8080,20000-32767"`,
/// empty for none) into sorted, merged ranges.
pub fn parse_ranges(text: &str) -> Option<Vec<PortRange>> {
    let mut ranges = Vec::new();
    for part in text
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (min, max) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let p = part.parse().ok()?;
                (p, p)
            }
        };
        if min > max {
            return None;
        }
        ranges.push(PortRange { min, max });
    }
    Some(merge(ranges))
}

/// Sorts and merges overlapping or adjacent ranges.
pub fn merge(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if u32::from(r.min) <= u32::from(last.max) + 1 => {
                last.max = last.max.max(r.max)
            }
            _ => out.push(r),
        }
    }
    out
}

/// `ranges` without the ports of `remove`.
pub fn subtract(ranges: &[PortRange], remove: PortRange) -> Vec<PortRange> {
    let mut out = Vec::new();
    for r in ranges {
        if r.max < remove.min || r.min > remove.max {
            out.push(*r);
            continue;
        }
        if r.min < remove.min {
            out.push(PortRange {
                min: r.min,
                max: remove.min - 1,
            });
        }
        if r.max > remove.max {
            out.push(PortRange {
                min: remove.max + 1,
                max: r.max,
            });
        }
    }
    out
}

/// Formats ranges in the kernel's format.
pub fn format_ranges(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn read_reserved(ns: BorrowedFd<'_>) -> Result<Vec<PortRange>> {
    let text = read_in(ns, RESERVED_PORTS)?;
    parse_ranges(&text).ok_or_else(|| {
        NetlinkError::io(
            format!("parse {RESERVED_PORTS} = {text:?}"),
            std::io::Error::from_raw_os_error(libc::EINVAL),
        )
    })
}

/// Adds `range` to `ip_local_reserved_ports` of namespace `ns`, keeping what is
/// there. Returns the parts of `range` that were not reserved before (what
/// [`unreserve_ports`] should later remove so the operator's own reservations stay).
pub fn reserve_ports(ns: BorrowedFd<'_>, range: PortRange) -> Result<Vec<PortRange>> {
    let before = read_reserved(ns)?;
    let mut added = vec![range];
    for r in &before {
        added = added.into_iter().flat_map(|a| subtract(&[a], *r)).collect();
    }
    if !added.is_empty() {
        let mut all = before;
        all.push(range);
        write_in(ns, RESERVED_PORTS, &format_ranges(&merge(all)))?;
    }
    Ok(added)
}

/// Removes `ranges` from `ip_local_reserved_ports` of namespace `ns`.
pub fn unreserve_ports(ns: BorrowedFd<'_>, ranges: &[PortRange]) -> Result<()> {
    let mut now = read_reserved(ns)?;
    for r in ranges {
        now = subtract(&now, *r);
    }
    let text = format_ranges(&now);
    // The kernel treats an empty write as "no reserved ports" only with a newline.
    write_in(
        ns,
        RESERVED_PORTS,
        if text.is_empty() { "\n" } else { &text },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u16, max: u16) -> PortRange {
        PortRange { min, max }
    }

    #[test]
    fn parse_merge_format() {
        assert_eq!(parse_ranges(""), Some(vec![]));
        assert_eq!(
            parse_ranges("8080,20000-32767\n"),
            Some(vec![r(8080, 8080), r(20000, 32767)])
        );
        assert_eq!(parse_ranges("5-9,1-4,20"), Some(vec![r(1, 9), r(20, 20)]));
        assert_eq!(parse_ranges("9-5"), None);
        assert_eq!(parse_ranges("x"), None);
        assert_eq!(format_ranges(&[r(1, 9), r(20, 20)]), "1-9,20");
    }

    #[test]
    fn subtract_splits_and_trims() {
        assert_eq!(subtract(&[r(1, 100)], r(10, 20)), vec![r(1, 9), r(21, 100)]);
        assert_eq!(subtract(&[r(1, 100)], r(1, 100)), vec![]);
        assert_eq!(
            subtract(&[r(1, 5), r(50, 60)], r(4, 55)),
            vec![r(1, 3), r(56, 60)]
        );
        assert_eq!(subtract(&[r(0, 65535)], r(0, 0)), vec![r(1, 65535)]);
        assert_eq!(subtract(&[r(0, 65535)], r(65535, 65535)), vec![r(0, 65534)]);
    }
}
