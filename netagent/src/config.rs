//! Agent configuration: a TOML file (`--config`), every key also a flag.
//!
//! The core fields are fixed here because slot addressing and the datapath read
//! them; loading/merging/validation lives alongside.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bpf::{Cidr, DEFAULT_EGRESS_DENY};
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
    /// Group that may use the API socket: the socket is then mode 0660 owned by
    /// root and this group (a name or a numeric gid). `None`: root only (0600).
    pub socket_group: Option<String>,
    /// Also serve the API over TCP on this loopback address (`"127.0.0.1:PORT"`).
    /// `None` (the default): no TCP listener. Non-loopback addresses are refused.
    pub api_tcp: Option<SocketAddr>,
    /// Request limits of the API.
    pub api: ApiConfig,
    /// Per-instance bpffs directory for pins.
    pub bpffs: PathBuf,
    /// Masquerade and flow tables.
    pub nat: NatConfig,
    /// Flow expiry.
    pub timeouts: Timeouts,
    /// Destinations guests may not open connections to unless a slot's own
    /// egress rules allow them (default: private, shared, link-local/metadata,
    /// multicast and reserved ranges; `[]`: none).
    pub egress_default_deny: Vec<Cidr>,
    /// Percent of a NAT or flow table's capacity at which the agent warns
    /// (logged when a table crosses it; `netagent_table_pressure` in the metrics).
    pub table_warn_percent: u8,
    /// Size of the per-slot arrays: slot indices must be `< max_slots`
    /// (at most 32768, so index 32767 fits).
    pub max_slots: u32,
    /// Network namespaces kept ready for the next slot creates (made in the
    /// background; 0: each create makes its own).
    pub netns_pool: usize,
}

/// Largest `netns_pool`: each ready namespace costs kernel memory.
pub const MAX_NETNS_POOL: usize = 256;

/// Size and time limits of API requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Largest request body accepted, in bytes (larger: 413).
    pub body_limit: usize,
    /// Seconds a client has to send its request headers (then it is disconnected).
    pub header_timeout: u64,
    /// Seconds within which a request (body included) must be answered (then
    /// 503; a slot change already started still runs to completion).
    pub request_timeout: u64,
}

impl ApiConfig {
    /// `header_timeout` as a duration.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout)
    }

    /// `request_timeout` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout)
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            body_limit: 16 * 1024,
            header_timeout: 10,
            request_timeout: 60,
        }
    }
}

/// Largest `api.body_limit` accepted (the API's bodies are small JSON objects).
pub const API_BODY_LIMIT_MAX: usize = 1024 * 1024;
/// Smallest `api.body_limit` accepted (a slot request with a long namespace name fits).
pub const API_BODY_LIMIT_MIN: usize = 512;

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
    /// Entries in the table of flows between the host and the guests: the
    /// host's to a HostIP, and a guest's to a host address its slot allows.
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
            socket_group: None,
            api_tcp: None,
            api: ApiConfig::default(),
            bpffs: PathBuf::from("/sys/fs/bpf/netagent"),
            nat: NatConfig::default(),
            timeouts: Timeouts::default(),
            egress_default_deny: DEFAULT_EGRESS_DENY.to_vec(),
            table_warn_percent: 80,
            max_slots: 32768,
            netns_pool: 8,
        }
    }
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            // 22,768 ports: a closed TCP flow's port is taken again after
            // NAT_REUSE_CLOSED_AFTER_NS (1 s), so about 20,000 new connections per
            // second to one destination fit.
            port_min: 10000,
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

/// Most CIDRs in `egress_default_deny`.
pub const EGRESS_DEFAULT_DENY_MAX: usize = 256;

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
        if let Some(uplink) = &self.uplink
            && let Some(plan) = &plan
        {
            if uplink == "lo" {
                errors.push(
                    "uplink lo is the loopback interface: name the interface slot traffic leaves through, e.g. --uplink eth0".to_string(),
                );
            } else if let Some(index) = plan.index_of_veth(uplink) {
                errors.push(format!(
                    "uplink {uplink} is the host veth of slot {index} of prefix {}: name the host's own uplink interface, e.g. --uplink eth0",
                    self.prefix
                ));
            }
        }
        if let Some(group) = &self.socket_group
            && (group.is_empty()
                || group.len() > 32
                || !group
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')))
        {
            errors.push(format!(
                "socket_group {group:?} is not a group name or gid (letters, digits, '_', '-', '.')"
            ));
        }
        if let Some(addr) = self.api_tcp {
            if !addr.ip().is_loopback() {
                errors.push(format!(
                    "api_tcp {addr} is not a loopback address: the API has no authentication, so TCP is served on loopback only (e.g. api_tcp = \"127.0.0.1:{}\")",
                    addr.port()
                ));
            } else if addr.port() == 0 {
                errors.push(format!(
                    "api_tcp {addr} has port 0: give the port clients connect to, e.g. 127.0.0.1:7070"
                ));
            }
        }
        let api = &self.api;
        if !(API_BODY_LIMIT_MIN..=API_BODY_LIMIT_MAX).contains(&api.body_limit) {
            errors.push(format!(
                "api.body_limit {} is out of range: use {API_BODY_LIMIT_MIN} to {API_BODY_LIMIT_MAX} bytes",
                api.body_limit
            ));
        }
        for (key, value) in [
            ("api.header_timeout", api.header_timeout),
            ("api.request_timeout", api.request_timeout),
        ] {
            if !(1..=3600).contains(&value) {
                errors.push(format!(
                    "{key} {value} is out of range: use 1 to 3600 seconds"
                ));
            }
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
        if self.netns_pool > MAX_NETNS_POOL {
            errors.push(format!(
                "netns_pool {} is too large: use 0 to {MAX_NETNS_POOL} (namespaces kept ready)",
                self.netns_pool
            ));
        }
        if !(1..=100).contains(&self.table_warn_percent) {
            errors.push(format!(
                "table_warn_percent {} is out of range: use 1 to 100 (percent of a table's capacity)",
                self.table_warn_percent
            ));
        }
        if self.egress_default_deny.len() > EGRESS_DEFAULT_DENY_MAX {
            errors.push(format!(
                "egress_default_deny has {} CIDRs: at most {EGRESS_DEFAULT_DENY_MAX}",
                self.egress_default_deny.len()
            ));
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
    fn api_tcp_is_loopback_only_and_off_by_default() {
        assert_eq!(Config::default().api_tcp, None);
        for ok in ["127.0.0.1:7070", "127.0.0.9:80", "[::1]:7070"] {
            let cfg = parse(&format!("api_tcp = \"{ok}\"\n")).unwrap();
            assert_eq!(cfg.api_tcp, Some(ok.parse().unwrap()));
            cfg.validate().unwrap();
        }
        for bad in [
            "0.0.0.0:7070",
            "10.0.0.1:80",
            "[::]:7070",
            "198.18.0.1:7070",
        ] {
            let cfg = parse(&format!("api_tcp = \"{bad}\"\n")).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.contains(&format!("api_tcp {bad} is not a loopback address")),
                "{err}"
            );
        }
        let err = parse("api_tcp = \"127.0.0.1:0\"\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("port 0"), "{err}");
        // Not an address at all: a parse error naming the line.
        let err = parse("\napi_tcp = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && !err.contains('\n'), "{err}");
    }

    #[test]
    fn api_limits_are_keys_with_sane_defaults() {
        let d = ApiConfig::default();
        assert_eq!(
            (d.body_limit, d.header_timeout, d.request_timeout),
            (16384, 10, 60)
        );
        let cfg =
            parse("[api]\nbody_limit = 2048\nheader_timeout = 2\nrequest_timeout = 3\n").unwrap();
        assert_eq!(cfg.api.body_limit, 2048);
        assert_eq!(cfg.api.header_timeout(), Duration::from_secs(2));
        assert_eq!(cfg.api.request_timeout(), Duration::from_secs(3));
        cfg.validate().unwrap();
        let cfg =
            parse("[api]\nbody_limit = 10\nheader_timeout = 0\nrequest_timeout = 99999\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert_eq!(err.lines().count(), 3, "{err}");
        for key in [
            "api.body_limit",
            "api.header_timeout",
            "api.request_timeout",
        ] {
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn socket_group_names_are_checked() {
        for ok in ["netagent", "sandbox-ops", "1001"] {
            let cfg = parse(&format!("socket_group = \"{ok}\"\n")).unwrap();
            cfg.validate().unwrap();
        }
        for bad in ["", "a b", "x/y", "g:1"] {
            let cfg = Config {
                socket_group: Some(bad.into()),
                ..Config::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("socket_group"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn uplink_cannot_be_loopback_or_a_slot_veth() {
        for (uplink, needle) in [
            ("lo", "uplink lo is the loopback interface"),
            (
                "wrenn-veth-3",
                "uplink wrenn-veth-3 is the host veth of slot 3",
            ),
            ("wrenn-v20000", "host veth of slot 20000"),
        ] {
            let cfg = Config {
                uplink: Some(uplink.into()),
                ..Config::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(needle), "{uplink}: {err}");
        }
        // Another prefix's veth name is just a name here (the agent checks the
        // interface itself at start).
        let cfg = Config {
            uplink: Some("other-veth-3".into()),
            ..Config::default()
        };
        cfg.validate().unwrap();
    }

    #[test]
    fn netns_pool_is_bounded() {
        assert_eq!(Config::default().netns_pool, 8);
        assert_eq!(parse("netns_pool = 0\n").unwrap().netns_pool, 0);
        let cfg = Config {
            netns_pool: MAX_NETNS_POOL + 1,
            ..Config::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("netns_pool 257 is too large"), "{err}");
    }

    #[test]
    fn table_warn_percent_is_a_percentage() {
        assert_eq!(Config::default().table_warn_percent, 80);
        let cfg = parse("table_warn_percent = 95\n").unwrap();
        assert_eq!(cfg.table_warn_percent, 95);
        cfg.validate().unwrap();
        for ok in [1, 100] {
            let cfg = Config {
                table_warn_percent: ok,
                ..Config::default()
            };
            cfg.validate().unwrap();
        }
        for bad in [0, 101, 255] {
            let cfg = Config {
                table_warn_percent: bad,
                ..Config::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.contains(&format!(
                    "table_warn_percent {bad} is out of range: use 1 to 100"
                )),
                "{err}"
            );
        }
        // Not a small integer at all: a parse error naming the line.
        let err = parse("\ntable_warn_percent = 300\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && !err.contains('\n'), "{err}");
    }

    #[test]
    fn egress_default_deny_is_a_cidr_list() {
        let d = Config::default().egress_default_deny;
        assert_eq!(d, DEFAULT_EGRESS_DENY.to_vec());
        assert!(d.iter().any(|c| c.to_string() == "169.254.0.0/16"));
        let cfg = parse("egress_default_deny = [\"10.0.0.0/8\", \"203.0.113.0/24\"]\n").unwrap();
        let got: Vec<String> = cfg
            .egress_default_deny
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(got, ["10.0.0.0/8", "203.0.113.0/24"]);
        cfg.validate().unwrap();
        assert!(
            parse("egress_default_deny = []\n")
                .unwrap()
                .egress_default_deny
                .is_empty()
        );
        for bad in ["[\"10.0.0.1/8\"]", "[\"10.0.0.0\"]", "\"10.0.0.0/8\""] {
            let err = parse(&format!("\negress_default_deny = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("line 2") && !err.contains('\n'),
                "{bad}: {err}"
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
