//! Agent configuration: a TOML file (`--config`), every key also a flag.
//!
//! The core fields are fixed here because slot addressing and the datapath read
//! them; loading/merging/validation lives alongside.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::slot::AddressPlan;

/// Everything `netagent up` is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name prefix: namespaces are `{prefix}-ns-N`, host veths `{prefix}-veth-N`.
    pub prefix: String,
    /// Base of the host-reachable addresses (HostIP = base + N), a /16 (x.y.0.0).
    pub host_base: Ipv4Addr,
    /// Base of the veth /31s (veth = base + 2N, vpeer = base + 2N + 1), a /16.
    pub vrt_base: Ipv4Addr,
    /// Uplink interface; `None` means the interface of the default route.
    pub uplink: Option<String>,
    /// API socket path.
    pub socket: PathBuf,
    /// Per-instance bpffs directory for pins.
    pub bpffs: PathBuf,
    /// Masquerade and flow tables.
    pub nat: NatConfig,
    /// Flow expiry.
    pub timeouts: Timeouts,
    /// Size of the per-slot arrays: slot indices must be `< max_slots`
    /// (at most 32768, so index 32767 fits).
    pub max_slots: u32,
}

/// Masquerade port range and table sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatConfig {
    /// First masquerade port (inclusive). The range is added to the host's
    /// `ip_local_reserved_ports` so its own sockets never collide.
    pub port_min: u16,
    /// Last masquerade port (inclusive).
    pub port_max: u16,
    /// Entries in each masquerade table (egress and ingress).
    pub table_size: u32,
    /// Entries in the host → guest flow table.
    pub host_flow_table_size: u32,
}

/// Idle timeouts, in seconds, after which a flow's entries are reclaimed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP flow that saw traffic both ways and no FIN/RST.
    pub tcp_established: u64,
    /// TCP flow still opening (no reply yet).
    pub tcp_opening: u64,
    /// TCP flow after FIN from both sides or an RST.
    pub tcp_closing: u64,
    /// UDP flow.
    pub udp: u64,
    /// ICMP echo flow.
    pub icmp: u64,
    /// How often the reaper walks the tables.
    pub reap_interval: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            prefix: "wrenn".into(),
            host_base: Ipv4Addr::new(10, 11, 0, 0),
            vrt_base: Ipv4Addr::new(10, 12, 0, 0),
            uplink: None,
            socket: PathBuf::from("/run/netagent/netagent.sock"),
            bpffs: PathBuf::from("/sys/fs/bpf/netagent"),
            nat: NatConfig::default(),
            timeouts: Timeouts::default(),
            max_slots: 32768,
        }
    }
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            port_min: 20000,
            port_max: 32767,
            table_size: 262_144,
            host_flow_table_size: 65_536,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_established: 21_600,
            tcp_opening: 60,
            tcp_closing: 10,
            udp: 60,
            icmp: 30,
            reap_interval: 5,
        }
    }
}

/// Why a configuration cannot be used. Each message is one line naming the key
/// (or the file and line) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for `Config` (syntax, an unknown key, a wrong type).
    #[error("config file {path}, line {line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem (0 when unknown).
        line: usize,
        /// The parser's message, on one line.
        message: String,
    },
    /// Values that parse but cannot work; one entry per problem.
    #[error("{}", .0.iter().map(|e| format!("invalid configuration: {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

/// Longest path a Unix socket address holds (`sun_path` less the NUL).
const SUN_PATH_MAX: usize = 107;

impl Config {
    /// Reads a TOML file; keys that are absent keep their defaults, unknown keys are
    /// rejected with their name. Does not validate (call [`Config::validate`] after
    /// applying flag overrides).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses TOML text; `path` only names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(0);
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                message: e.message().replace('\n', " ").trim().to_string(),
            }
        })
    }

    /// Checks every value and returns the address plan it implies. All problems
    /// are reported together, one line each.
    pub fn validate(&self) -> Result<AddressPlan, ConfigError> {
        let mut errors = Vec::new();
        let plan = match AddressPlan::new(&self.prefix, self.host_base, self.vrt_base) {
            Ok(plan) => Some(plan),
            Err(e) => {
                errors.push(format!("prefix/host_base/vrt_base: {e}"));
                None
            }
        };
        if self.host_base == self.vrt_base {
            errors.push(format!(
                "host_base and vrt_base are both {}: they must be two different /16s",
                self.host_base
            ));
        }
        if let Some(uplink) = &self.uplink
            && (uplink.is_empty()
                || uplink.len() > 15
                || uplink.contains('/')
                || uplink.contains(char::is_whitespace))
        {
            errors.push(format!(
                "uplink {uplink:?} is not a valid interface name (1 to 15 characters, no '/' or spaces)"
            ));
        }
        if !self.socket.is_absolute() {
            errors.push(format!(
                "socket {} must be an absolute path",
                self.socket.display()
            ));
        }
        if self.socket.as_os_str().len() > SUN_PATH_MAX {
            errors.push(format!(
                "socket {} is longer than {SUN_PATH_MAX} bytes, the limit of a Unix socket address",
                self.socket.display()
            ));
        }
        if !self.bpffs.is_absolute() || self.bpffs.parent().is_none_or(|p| p == Path::new("/")) {
            errors.push(format!(
                "bpffs {} must be an absolute directory below a mount point, e.g. /sys/fs/bpf/netagent",
                self.bpffs.display()
            ));
        }
        if !(2..=netagent_common::MAX_SLOT_INDEX + 1).contains(&self.max_slots) {
            errors.push(format!(
                "max_slots {} is out of range: use 2 to 32768 (slot indices must be < max_slots)",
                self.max_slots
            ));
        }
        let nat = &self.nat;
        if nat.port_min == 0 || nat.port_min > nat.port_max {
            errors.push(format!(
                "nat.port_min {} and nat.port_max {} do not form a range: need 1 <= port_min <= port_max",
                nat.port_min, nat.port_max
            ));
        }
        for (key, value) in [
            ("nat.table_size", nat.table_size),
            ("nat.host_flow_table_size", nat.host_flow_table_size),
        ] {
            if value == 0 {
                errors.push(format!("{key} must be at least 1"));
            }
        }
        let t = &self.timeouts;
        for (key, value) in [
            ("timeouts.tcp_established", t.tcp_established),
            ("timeouts.tcp_opening", t.tcp_opening),
            ("timeouts.tcp_closing", t.tcp_closing),
            ("timeouts.udp", t.udp),
            ("timeouts.icmp", t.icmp),
            ("timeouts.reap_interval", t.reap_interval),
        ] {
            if value == 0 {
                errors.push(format!("{key} must be at least 1 second"));
            }
        }
        match plan {
            Some(plan) if errors.is_empty() => Ok(plan),
            _ => Err(ConfigError::Invalid(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_is_the_defaults_and_they_are_valid() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg, Config::default());
        cfg.validate().unwrap();
    }

    #[test]
    fn keys_override_defaults() {
        let cfg = parse(
            "prefix = \"t1\"\nuplink = \"up0\"\n[nat]\nport_min = 40000\nport_max = 40100\n[timeouts]\nudp = 7\n",
        )
        .unwrap();
        assert_eq!(cfg.prefix, "t1");
        assert_eq!(cfg.uplink.as_deref(), Some("up0"));
        assert_eq!((cfg.nat.port_min, cfg.nat.port_max), (40000, 40100));
        assert_eq!(cfg.nat.table_size, NatConfig::default().table_size);
        assert_eq!(cfg.timeouts.udp, 7);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = parse("prefix = \"x\"\n[nat]\nport_mni = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("port_mni"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        let err = parse("bogus = 1\n").unwrap_err().to_string();
        assert!(err.contains("bogus") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn wrong_types_are_one_line() {
        let err = parse("host_base = \"10.11.0\"\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && !err.contains('\n'), "{err}");
    }

    #[test]
    fn validation_reports_every_problem_one_line_each() {
        let mut cfg = Config {
            prefix: "much-too-long-prefix".into(),
            socket: PathBuf::from("relative.sock"),
            max_slots: 40000,
            ..Config::default()
        };
        cfg.nat.port_min = 30000;
        cfg.nat.port_max = 20000;
        cfg.timeouts.reap_interval = 0;
        let err = cfg.validate().unwrap_err().to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 5, "{err}");
        for needle in [
            "prefix",
            "socket",
            "max_slots",
            "nat.port_min",
            "timeouts.reap_interval",
        ] {
            assert!(
                lines.iter().any(|l| l.contains(needle)),
                "{needle} missing in {err}"
            );
        }
    }

    #[test]
    fn bases_must_differ_and_bpffs_needs_a_parent() {
        let cfg = Config {
            vrt_base: Ipv4Addr::new(10, 11, 0, 0),
            bpffs: PathBuf::from("/netagent"),
            ..Config::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("host_base and vrt_base"), "{err}");
        assert!(err.contains("bpffs"), "{err}");
    }
}
