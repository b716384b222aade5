//! The command line (clap derive): `up` runs the daemon; `slot`, `stats` talk to
//! it over the API socket; `cleanup` removes a stopped instance's leftovers.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::api::client::{Client, ClientError};
use crate::bpf::Cidr;
use crate::bpf::EgressRules;
use crate::config::Config;
use crate::controller::SlotView;
use crate::daemon::LogFormat;
use crate::error::CliError;
use crate::slot::{GuestLink, GuestMac, PolicyRequest, RateLimitSpec};
use crate::stats::{self, Rates, SlotCounters};

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/netagent/netagent.sock";

const MAIN_EXAMPLES: &str = "\
Examples:
  netagent up --uplink eth0                 run the agent (foreground)
  netagent slot create 1                    create slot 1 (namespace wrenn-ns-1, tap0)
  netagent slot list                        list slots
  netagent stats 1 --watch                  watch slot 1's traffic
  curl --unix-socket /run/netagent/netagent.sock http://localhost/v1/slots";

const UP_EXAMPLES: &str = "\
Examples:
  netagent up
  netagent up --config /etc/netagent/netagent.toml --log-format json
  netagent up --uplink eth0 --prefix wrenn --nat-port-min 10000 --nat-port-max 32767
  netagent up --socket-group sandbox --api-tcp 127.0.0.1:7070

Every key of the TOML config file is also a flag (nat.port_min is --nat-port-min);
flags override the file. On SIGINT/SIGTERM the agent finishes in-flight requests,
deletes every slot it created, detaches the datapath and removes its socket.

The API socket is root-only (0600) unless --socket-group names a group (0660);
TCP is off unless --api-tcp gives a loopback address. The agent refuses an
uplink that does not exist, is a loopback interface or one of its slot veths.";

const SLOT_EXAMPLES: &str = "\
Examples:
  netagent slot create 1
  netagent slot create 2 --guest-netns bench-guest --json
  netagent slot create 3 --guest-mac 02:00:00:00:00:03 --allow 10.1.0.0/16 --rate 100M --burst 65536
  netagent slot egress 3 --allow 10.1.0.0/16 --deny 203.0.113.0/24
  netagent slot rate 3 --rate 20M --burst 65536
  netagent slot list --json
  netagent slot delete 1";

const SLOT_CREATE_EXAMPLES: &str = "\
Examples:
  netagent slot create 1
  netagent slot create 7 --json
  netagent slot create 2 --guest-netns bench-guest   (guest end as eth0 in that namespace)
  netagent slot create 3 --guest-mac 02:00:00:00:00:03 --allow 10.1.0.0/16 --deny 198.51.100.0/24
  netagent slot create 4 --rate 20M --burst 65536    (20 Mbit/s from the guest, 64 KiB burst)

Without --allow/--deny the slot has no rules of its own (the agent's
egress_default_deny applies); without --rate it is unlimited. Re-running the same
create is a no-op; different settings are refused (use `slot egress`/`slot rate`).";

const SLOT_EGRESS_EXAMPLES: &str = "\
Examples:
  netagent slot egress 3 --allow 10.1.0.0/16 --allow 192.168.5.7/32
  netagent slot egress 3 --deny 203.0.113.0/24
  netagent slot egress 3                  (no rules of its own: the defaults apply)

Replaces both lists. The longest matching CIDR of the slot decides; where none
matches, egress_default_deny does. A host address (the host's own, any slot's
HostIP/veth/vpeer) is reachable only through an --allow of that exact /32.";

const SLOT_RATE_EXAMPLES: &str = "\
Examples:
  netagent slot rate 3 --rate 20M --burst 65536   (20 Mbit/s, 64 KiB burst)
  netagent slot rate 3 --rate 1500000000 --burst 1048576
  netagent slot rate 3 --off

The rate counts the guest's Ethernet frames in bits per second (suffixes k, M, G,
T are powers of 1000); frames beyond rate and burst are dropped and counted as
rate_limited. A guest with TSO sends frames of up to 64 KiB: keep the burst above.";

const SLOT_DELETE_EXAMPLES: &str = "\
Example:
  netagent slot delete 1";

const SLOT_LIST_EXAMPLES: &str = "\
Examples:
  netagent slot list
  netagent slot list --json | jq '.[].host_ip'";

const STATS_EXAMPLES: &str = "\
Examples:
  netagent stats                all slots, one table
  netagent stats 1              slot 1 in detail, drops by reason
  netagent stats --watch        refresh every second with rates
  netagent stats 1 --json       stable JSON for scripts";

const VERIFY_EXAMPLES: &str = "\
Examples:
  netagent verify                 list every difference between the kernel and the agent
  netagent verify --json          the same as JSON (GET /v1/verify)

Exit status 0 when the kernel matches the agent, 1 when there are differences
(or the agent cannot be asked).";

const CLEANUP_EXAMPLES: &str = "\
Examples:
  netagent cleanup
  netagent cleanup --prefix t1a2b --bpffs /sys/fs/bpf/netagent-t1a2b

Refuses to run while a netagent of the prefix is running.";

/// netagent: eBPF networking for microVM sandbox hosts.
#[derive(Debug, Parser)]
#[command(name = "netagent", version, after_help = MAIN_EXAMPLES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground: datapath, API socket, reaper.
    #[command(after_help = UP_EXAMPLES)]
    Up(Box<UpArgs>),
    /// Create, delete and list slots (talks to the running agent).
    #[command(subcommand, after_help = SLOT_EXAMPLES)]
    Slot(SlotCommand),
    /// Show per-slot counters: packets, bytes, NAT, drops by reason.
    #[command(after_help = STATS_EXAMPLES)]
    Stats(StatsArgs),
    /// Compare the kernel's state with the agent's and list every difference
    /// (exit status 1 when there are any).
    #[command(after_help = VERIFY_EXAMPLES)]
    Verify(VerifyArgs),
    /// Remove every resource of a prefix (namespaces, veths, routes, pins); the
    /// agent must be stopped.
    #[command(after_help = CLEANUP_EXAMPLES)]
    Cleanup(CleanupArgs),
}

/// `netagent up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// TOML configuration file; absent keys keep their defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Configuration keys.
    #[command(flatten)]
    pub flags: ConfigFlags,
}

/// One flag per configuration key; each overrides the file.
#[derive(Debug, Default, Clone, Args)]
pub struct ConfigFlags {
    /// [prefix] Name prefix: namespaces {prefix}-ns-N, veths {prefix}-veth-N (default wrenn).
    #[arg(long, value_name = "NAME")]
    pub prefix: Option<String>,
    /// [host_base] Base of the host-reachable /16 (default 10.11.0.0).
    #[arg(long, value_name = "ADDR")]
    pub host_base: Option<Ipv4Addr>,
    /// [vrt_base] Base of the veth /16 (default 10.12.0.0).
    #[arg(long, value_name = "ADDR")]
    pub vrt_base: Option<Ipv4Addr>,
    /// [uplink] Uplink interface (default: the interface of the default route).
    #[arg(long, value_name = "IFACE")]
    pub uplink: Option<String>,
    /// [socket] API socket (default /run/netagent/netagent.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// [socket_group] Group allowed on the API socket (mode 0660); default: root only (0600).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// [api_tcp] Also serve the API on this loopback address, e.g. 127.0.0.1:7070 (default: no TCP).
    #[arg(long, value_name = "ADDR:PORT")]
    pub api_tcp: Option<SocketAddr>,
    /// [api.body_limit] Largest request body in bytes (default 16384).
    #[arg(long, value_name = "BYTES")]
    pub api_body_limit: Option<usize>,
    /// [api.header_timeout] Seconds a client has to send its request headers (default 10).
    #[arg(long, value_name = "SECS")]
    pub api_header_timeout: Option<u64>,
    /// [api.request_timeout] Seconds within which a request is answered (default 60).
    #[arg(long, value_name = "SECS")]
    pub api_request_timeout: Option<u64>,
    /// [bpffs] Per-instance bpffs directory (default /sys/fs/bpf/netagent).
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// [max_slots] Size of the per-slot arrays; indices must be below it (default 32768).
    #[arg(long, value_name = "N")]
    pub max_slots: Option<u32>,
    /// [nat.port_min] First masquerade port (default 10000).
    #[arg(long, value_name = "PORT")]
    pub nat_port_min: Option<u16>,
    /// [nat.port_max] Last masquerade port (default 32767).
    #[arg(long, value_name = "PORT")]
    pub nat_port_max: Option<u16>,
    /// [nat.table_size] Entries in each masquerade table (default 262144).
    #[arg(long, value_name = "N")]
    pub nat_table_size: Option<u32>,
    /// [nat.host_flow_table_size] Entries in the host → guest flow table (default 65536).
    #[arg(long, value_name = "N")]
    pub nat_host_flow_table_size: Option<u32>,
    /// [timeouts.tcp_established] Seconds (default 21600).
    #[arg(long, value_name = "SECS")]
    pub timeouts_tcp_established: Option<u64>,
    /// [timeouts.tcp_opening] Seconds (default 60).
    #[arg(long, value_name = "SECS")]
    pub timeouts_tcp_opening: Option<u64>,
    /// [timeouts.tcp_closing] Seconds (default 10).
    #[arg(long, value_name = "SECS")]
    pub timeouts_tcp_closing: Option<u64>,
    /// [timeouts.udp] Seconds (default 60).
    #[arg(long, value_name = "SECS")]
    pub timeouts_udp: Option<u64>,
    /// [timeouts.icmp] Seconds (default 30).
    #[arg(long, value_name = "SECS")]
    pub timeouts_icmp: Option<u64>,
    /// [timeouts.reap_interval] Seconds between reaper runs (default 5).
    #[arg(long, value_name = "SECS")]
    pub timeouts_reap_interval: Option<u64>,
    /// [egress_default_deny] CIDRs guests may not reach unless a slot allows them,
    /// comma-separated; "" for none (default 0.0.0.0/8,127.0.0.0/8,10.0.0.0/8,
    /// 172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,169.254.0.0/16,224.0.0.0/4,240.0.0.0/4).
    #[arg(long, value_name = "CIDR,...", value_parser = parse_cidr_list)]
    pub egress_default_deny: Option<CidrList>,
    /// [table_warn_percent] Warn when a NAT or flow table is this full, 1 to 100 (default 80).
    #[arg(long, value_name = "PERCENT")]
    pub table_warn_percent: Option<u8>,
    /// [netns_pool] Namespaces kept ready for slot creates, 0 to 256 (default 8).
    #[arg(long, value_name = "N")]
    pub netns_pool: Option<usize>,
}

impl ConfigFlags {
    /// Writes every given flag over `cfg`.
    pub fn apply(&self, cfg: &mut Config) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut cfg.prefix, &self.prefix);
        set(&mut cfg.host_base, &self.host_base);
        set(&mut cfg.vrt_base, &self.vrt_base);
        if self.uplink.is_some() {
            cfg.uplink = self.uplink.clone();
        }
        set(&mut cfg.socket, &self.socket);
        if self.socket_group.is_some() {
            cfg.socket_group = self.socket_group.clone();
        }
        if self.api_tcp.is_some() {
            cfg.api_tcp = self.api_tcp;
        }
        set(&mut cfg.api.body_limit, &self.api_body_limit);
        set(&mut cfg.api.header_timeout, &self.api_header_timeout);
        set(&mut cfg.api.request_timeout, &self.api_request_timeout);
        set(&mut cfg.bpffs, &self.bpffs);
        set(&mut cfg.max_slots, &self.max_slots);
        set(&mut cfg.nat.port_min, &self.nat_port_min);
        set(&mut cfg.nat.port_max, &self.nat_port_max);
        set(&mut cfg.nat.table_size, &self.nat_table_size);
        set(
            &mut cfg.nat.host_flow_table_size,
            &self.nat_host_flow_table_size,
        );
        let t = &mut cfg.timeouts;
        set(&mut t.tcp_established, &self.timeouts_tcp_established);
        set(&mut t.tcp_opening, &self.timeouts_tcp_opening);
        set(&mut t.tcp_closing, &self.timeouts_tcp_closing);
        set(&mut t.udp, &self.timeouts_udp);
        set(&mut t.icmp, &self.timeouts_icmp);
        set(&mut t.reap_interval, &self.timeouts_reap_interval);
        if let Some(list) = &self.egress_default_deny {
            cfg.egress_default_deny = list.0.clone();
        }
        set(&mut cfg.table_warn_percent, &self.table_warn_percent);
        set(&mut cfg.netns_pool, &self.netns_pool);
    }
}

/// A comma-separated CIDR list given as one flag value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

/// Parses "a.b.c.d/n,..." (empty: no CIDR).
pub fn parse_cidr_list(text: &str) -> Result<CidrList, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<Cidr>().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()
        .map(CidrList)
}

/// `--socket` of the commands that talk to the agent.
#[derive(Debug, Clone, Args)]
pub struct SocketArg {
    /// API socket of the running agent.
    #[arg(long, value_name = "PATH", env = "NETAGENT_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `netagent slot ...`.
#[derive(Debug, Subcommand)]
pub enum SlotCommand {
    /// Create slot N (idempotent: an identical slot is left as it is).
    #[command(after_help = SLOT_CREATE_EXAMPLES)]
    Create {
        /// Slot index, 1 to 32767.
        #[arg(allow_negative_numbers = true)]
        index: i64,
        /// Give the guest a veth whose end becomes eth0 in this existing namespace
        /// instead of a TAP.
        #[arg(long, value_name = "NAME")]
        guest_netns: Option<String>,
        /// The only source MAC the guest may use (frames and ARP from any other
        /// are dropped).
        #[arg(long, value_name = "MAC")]
        guest_mac: Option<GuestMac>,
        /// The slot's own egress rules.
        #[command(flatten)]
        egress: EgressArgs,
        /// Bandwidth limit from the guest, bits per second (k, M, G, T: ×1000).
        #[arg(long, value_name = "BITS/s", value_parser = parse_rate, requires = "burst")]
        rate: Option<u64>,
        /// Burst above the rate, bytes (with --rate).
        #[arg(long, value_name = "BYTES", requires = "rate")]
        burst: Option<u64>,
        /// Print the slot as JSON.
        #[arg(long)]
        json: bool,
        /// The agent's socket.
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Replace slot N's egress allow and deny lists.
    #[command(after_help = SLOT_EGRESS_EXAMPLES)]
    Egress {
        /// Slot index, 1 to 32767.
        #[arg(allow_negative_numbers = true)]
        index: i64,
        /// The new lists (none: no rules of its own).
        #[command(flatten)]
        egress: EgressArgs,
        /// Print the slot as JSON.
        #[arg(long)]
        json: bool,
        /// The agent's socket.
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Set or remove slot N's bandwidth limit.
    #[command(after_help = SLOT_RATE_EXAMPLES)]
    Rate {
        /// Slot index, 1 to 32767.
        #[arg(allow_negative_numbers = true)]
        index: i64,
        /// Bits per second (k, M, G, T: ×1000).
        #[arg(long, value_name = "BITS/s", value_parser = parse_rate, requires = "burst", required_unless_present = "off")]
        rate: Option<u64>,
        /// Burst above the rate, bytes.
        #[arg(long, value_name = "BYTES", requires = "rate")]
        burst: Option<u64>,
        /// Remove the limit.
        #[arg(long, conflicts_with_all = ["rate", "burst"])]
        off: bool,
        /// Print the slot as JSON.
        #[arg(long)]
        json: bool,
        /// The agent's socket.
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Delete slot N and everything it owns.
    #[command(after_help = SLOT_DELETE_EXAMPLES)]
    Delete {
        /// Slot index, 1 to 32767.
        #[arg(allow_negative_numbers = true)]
        index: i64,
        /// The agent's socket.
        #[command(flatten)]
        socket: SocketArg,
    },
    /// List slots.
    #[command(after_help = SLOT_LIST_EXAMPLES)]
    List {
        /// Print JSON (an array of slots).
        #[arg(long)]
        json: bool,
        /// The agent's socket.
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// `--allow` and `--deny` of `slot create` and `slot egress`.
#[derive(Debug, Clone, Default, Args)]
pub struct EgressArgs {
    /// A CIDR the guest may reach (repeatable); a host address needs its exact /32.
    #[arg(long, value_name = "CIDR")]
    pub allow: Vec<Cidr>,
    /// A CIDR the guest may not reach (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub deny: Vec<Cidr>,
}

impl EgressArgs {
    /// The lists as given.
    pub fn rules(&self) -> EgressRules {
        EgressRules {
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        }
    }

    /// Whether any CIDR was given.
    pub fn given(&self) -> bool {
        !self.allow.is_empty() || !self.deny.is_empty()
    }
}

/// Parses a rate in bits per second: digits with an optional k, M, G or T
/// (powers of 1000) and an optional "bit"/"bps" ("20M", "20Mbit", "1500000").
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "rate {text:?} is not bits per second: use digits with an optional k, M, G or T, e.g. 20M"
        )
    };
    let t = text.trim();
    let t = t
        .strip_suffix("bit")
        .or_else(|| t.strip_suffix("bps"))
        .unwrap_or(t);
    let (digits, scale) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1_000),
        Some((i, 'M')) => (&t[..i], 1_000_000),
        Some((i, 'G')) => (&t[..i], 1_000_000_000),
        Some((i, 'T')) => (&t[..i], 1_000_000_000_000),
        _ => (t, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(bad)
}

/// `netagent stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this slot (detailed view).
    #[arg(allow_negative_numbers = true)]
    pub index: Option<i64>,
    /// Print JSON: an object for one slot, an array for all (one document per
    /// line with --watch).
    #[arg(long)]
    pub json: bool,
    /// Refresh until interrupted, with per-second rates.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub interval: f64,
    /// The agent's socket.
    #[command(flatten)]
    pub socket: SocketArg,
}

/// `netagent verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The agent's socket.
    #[command(flatten)]
    pub socket: SocketArg,
}

/// `netagent cleanup`.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Configuration file of the instance (for prefix, bases and bpffs).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Prefix whose resources are removed (default wrenn).
    #[arg(long, value_name = "NAME")]
    pub prefix: Option<String>,
    /// The instance's bpffs directory (default /sys/fs/bpf/netagent).
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// The instance's API socket: cleanup refuses while an agent answers there.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// Builds the configuration of `up`: defaults, then the file, then the flags;
/// validated.
pub fn up_config(args: &UpArgs) -> Result<Config, CliError> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    args.flags.apply(&mut cfg);
    cfg.validate()?;
    Ok(cfg)
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Up(args) => {
            let cfg = up_config(&args)?;
            crate::daemon::init_logging(args.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("netagent")
                .build()
                .map_err(CliError::Runtime)?;
            runtime.block_on(crate::daemon::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Slot(cmd) => client_runtime()?.block_on(slot_command(cmd)),
        Command::Stats(args) => client_runtime()?.block_on(stats_command(args)),
        Command::Verify(args) => client_runtime()?.block_on(verify_command(args)),
        Command::Cleanup(args) => cleanup_command(args),
    }
}

fn client_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}

fn out(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(CliError::Output)
}

fn json_line<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Output(e.into()))?;
    out(&(text + "\n"))
}

fn cidrs(list: &[Cidr]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_slot(slot: &SlotView, json: bool, what: &str) -> Result<(), CliError> {
    if json {
        json_line(slot)
    } else {
        out(&format!(
            "slot {} {what}\n{}",
            slot.addr.index,
            render_slot(slot)
        ))
    }
}

/// The human form of one slot.
pub fn render_slot(slot: &SlotView) -> String {
    let a = &slot.addr;
    let guest = match &slot.guest {
        GuestLink::Tap => format!("tap ({} {})", a.tap, a.tap_mac),
        GuestLink::Veth { guest_netns } => format!("veth (eth0 in namespace {guest_netns})"),
    };
    let rows = vec![
        vec!["namespace".into(), a.namespace.clone()],
        vec!["host veth".into(), format!("{} {}/31", a.veth, a.veth_ip)],
        vec!["vpeer (eth0)".into(), format!("{}/31", a.vpeer_ip)],
        vec!["host ip".into(), a.host_ip.to_string()],
        vec!["tap".into(), format!("{} {}/30", a.tap, a.tap_ip)],
        vec![
            "guest".into(),
            format!(
                "{} netmask {} gateway {}",
                a.guest_ip, a.guest_netmask, a.tap_ip
            ),
        ],
        vec!["guest link".into(), guest],
        vec![
            "guest mac".into(),
            slot.policy
                .guest_mac
                .map_or_else(|| "any".to_string(), |m| m.to_string()),
        ],
        vec!["egress allow".into(), cidrs(&slot.policy.egress.allow)],
        vec!["egress deny".into(), cidrs(&slot.policy.egress.deny)],
        vec![
            "rate limit".into(),
            match &slot.policy.rate_limit {
                Some(l) => format!("{} bit/s, burst {} bytes", l.bits_per_second, l.burst_bytes),
                None => "none".into(),
            },
        ],
    ];
    stats::table_left(&["SLOT", &a.index.to_string()], &rows)
}

async fn slot_command(cmd: SlotCommand) -> Result<ExitCode, CliError> {
    match cmd {
        SlotCommand::Create {
            index,
            guest_netns,
            guest_mac,
            egress,
            rate,
            burst,
            json,
            socket,
        } => {
            let guest = match guest_netns {
                Some(guest_netns) => GuestLink::Veth { guest_netns },
                None => GuestLink::Tap,
            };
            let policy = PolicyRequest {
                guest_mac,
                egress: egress.given().then(|| egress.rules()),
                rate_limit: rate
                    .zip(burst)
                    .map(|(bits_per_second, burst_bytes)| RateLimitSpec {
                        bits_per_second,
                        burst_bytes,
                    }),
            };
            let (slot, created) = Client::new(socket.socket)
                .create_slot_with(index, &guest, &policy)
                .await?;
            let verb = if created {
                "created"
            } else {
                "already exists, unchanged:"
            };
            print_slot(&slot, json, verb)?;
        }
        SlotCommand::Egress {
            index,
            egress,
            json,
            socket,
        } => {
            let slot = Client::new(socket.socket)
                .set_egress(index, &egress.rules())
                .await?;
            print_slot(&slot, json, "egress rules set:")?;
        }
        SlotCommand::Rate {
            index,
            rate,
            burst,
            off: _,
            json,
            socket,
        } => {
            let limit = rate
                .zip(burst)
                .map(|(bits_per_second, burst_bytes)| RateLimitSpec {
                    bits_per_second,
                    burst_bytes,
                });
            let slot = Client::new(socket.socket)
                .set_rate_limit(index, limit.as_ref())
                .await?;
            let what = if limit.is_some() {
                "rate limit set:"
            } else {
                "rate limit removed:"
            };
            print_slot(&slot, json, what)?;
        }
        SlotCommand::Delete { index, socket } => {
            Client::new(socket.socket).delete_slot(index).await?;
            out(&format!("deleted slot {index}\n"))?;
        }
        SlotCommand::List { json, socket } => {
            let slots = Client::new(socket.socket).slots().await?;
            if json {
                json_line(&slots)?;
            } else {
                out(&render_slot_list(&slots))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The table of `netagent slot list`.
pub fn render_slot_list(slots: &[SlotView]) -> String {
    if slots.is_empty() {
        return "no slots\n".into();
    }
    let rows: Vec<Vec<String>> = slots
        .iter()
        .map(|s| {
            let a = &s.addr;
            vec![
                a.index.to_string(),
                a.namespace.clone(),
                a.veth.clone(),
                a.host_ip.to_string(),
                a.veth_ip.to_string(),
                a.vpeer_ip.to_string(),
                match &s.guest {
                    GuestLink::Tap => "tap".into(),
                    GuestLink::Veth { guest_netns } => format!("veth:{guest_netns}"),
                },
            ]
        })
        .collect();
    stats::table_left(
        &[
            "SLOT",
            "NAMESPACE",
            "VETH",
            "HOST IP",
            "VETH IP",
            "VPEER IP",
            "GUEST",
        ],
        &rows,
    )
}

async fn sample(client: &Client, index: Option<i64>) -> Result<Vec<SlotCounters>, ClientError> {
    if let Some(index) = index {
        return Ok(vec![client.stats(index).await?]);
    }
    let mut all = Vec::new();
    for slot in client.slots().await? {
        match client.stats(i64::from(slot.addr.index)).await {
            Ok(s) => all.push(s),
            // Deleted between the list and the read.
            Err(ClientError::Api { status: 404, .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(all)
}

fn render_sample(
    index: Option<i64>,
    now: &[SlotCounters],
    rates: Option<&BTreeMap<u32, Rates>>,
) -> String {
    match (index, now.first()) {
        (Some(_), Some(one)) => stats::render_slot_detail(
            one,
            rates.map(|r| r.get(&one.index).copied().unwrap_or_default()),
        ),
        _ => stats::render_slots_table(now, rates),
    }
}

async fn stats_command(args: StatsArgs) -> Result<ExitCode, CliError> {
    let client = Client::new(args.socket.socket);
    let print_json = |now: &[SlotCounters]| -> Result<(), CliError> {
        let text = match (args.index, now.first()) {
            (Some(_), Some(one)) => serde_json::to_string(one),
            _ => serde_json::to_string(now),
        }
        .map_err(|e| CliError::Output(e.into()))?;
        out(&(text + "\n"))
    };
    if !args.watch {
        let now = sample(&client, args.index).await?;
        if args.json {
            print_json(&now)?;
        } else {
            out(&render_sample(args.index, &now, None))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 3600.0));
    let mut previous: Option<(Instant, Vec<SlotCounters>)> = None;
    loop {
        let now = sample(&client, args.index).await?;
        let taken = Instant::now();
        if args.json {
            print_json(&now)?;
        } else {
            let rates: BTreeMap<u32, Rates> = match &previous {
                Some((at, prev)) => {
                    let secs = taken.duration_since(*at).as_secs_f64();
                    now.iter()
                        .map(|s| {
                            let r = prev
                                .iter()
                                .find(|p| p.index == s.index)
                                .map(|p| Rates::between(p, s, secs))
                                .unwrap_or_default();
                            (s.index, r)
                        })
                        .collect()
                }
                None => BTreeMap::new(),
            };
            let header = format!(
                "netagent stats — every {:.1}s, rates per second ({})\n\n",
                interval.as_secs_f64(),
                client.socket().display()
            );
            // Clear the screen and home the cursor, then draw.
            out(&format!(
                "\x1b[H\x1b[2J{header}{}",
                render_sample(args.index, &now, Some(&rates))
            ))?;
        }
        previous = Some((taken, now));
        tokio::time::sleep(interval).await;
    }
}

async fn verify_command(args: VerifyArgs) -> Result<ExitCode, CliError> {
    let report = Client::new(args.socket.socket).verify().await?;
    if args.json {
        json_line(&report)?;
    } else {
        out(&report.render())?;
    }
    Ok(if report.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cleanup_command(args: CleanupArgs) -> Result<ExitCode, CliError> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(prefix) = args.prefix {
        cfg.prefix = prefix;
    }
    if let Some(bpffs) = args.bpffs {
        cfg.bpffs = bpffs;
    }
    if let Some(socket) = args.socket {
        cfg.socket = socket;
    }
    cfg.validate()?;
    if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
        return Err(CliError::Cleanup(format!(
            "a netagent is serving on {}; stop it first (cleanup removes the resources of a stopped agent)",
            cfg.socket.display()
        )));
    }
    crate::daemon::init_logging(LogFormat::Human);
    // Holding the prefix lock proves no agent of the prefix runs, and keeps one
    // from starting while we remove things.
    let lock = crate::daemon::lock_prefix(&cfg.prefix)?;
    let result = client_runtime()?.block_on(crate::cleanup::cleanup(&cfg.prefix, &cfg.bpffs));
    drop(lock);
    let report = result.map_err(|e| CliError::Cleanup(e.to_string()))?;
    out(&format!(
        "prefix {}: removed {} namespace(s), {} link(s), {} route(s), {} pin(s)\n",
        cfg.prefix,
        report.namespaces.len(),
        report.links.len(),
        report.routes,
        report.pins
    ))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every key of the TOML config has a flag on `up` (`nat.port_min` →
    /// `--nat-port-min`).
    #[test]
    fn every_config_key_is_a_flag() {
        let value = toml::Value::try_from(Config {
            uplink: Some("x".into()),
            socket_group: Some("g".into()),
            api_tcp: Some("127.0.0.1:7070".parse().unwrap()),
            ..Config::default()
        })
        .unwrap();
        let mut keys = Vec::new();
        for (k, v) in value.as_table().unwrap() {
            match v.as_table() {
                Some(t) => keys.extend(t.keys().map(|k2| format!("{k}-{k2}"))),
                None => keys.push(k.clone()),
            }
        }
        let cmd = Cli::command();
        let up = cmd.find_subcommand("up").unwrap();
        let flags: Vec<String> = up
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        for key in keys {
            let flag = key.replace('_', "-");
            assert!(
                flags.contains(&flag),
                "config key {key} has no flag --{flag}"
            );
        }
    }

    #[test]
    fn flags_override_the_file() {
        let cli = Cli::try_parse_from([
            "netagent",
            "up",
            "--prefix",
            "t1",
            "--nat-port-min",
            "40000",
            "--nat-port-max",
            "40010",
            "--timeouts-reap-interval",
            "2",
            "--uplink",
            "up0",
            "--socket-group",
            "ops",
            "--api-tcp",
            "127.0.0.1:7070",
            "--api-body-limit",
            "4096",
            "--api-request-timeout",
            "5",
        ])
        .unwrap();
        let Command::Up(args) = cli.command else {
            panic!()
        };
        let cfg = up_config(&args).unwrap();
        assert_eq!(cfg.prefix, "t1");
        assert_eq!((cfg.nat.port_min, cfg.nat.port_max), (40000, 40010));
        assert_eq!(cfg.timeouts.reap_interval, 2);
        assert_eq!(cfg.uplink.as_deref(), Some("up0"));
        assert_eq!(cfg.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(cfg.socket_group.as_deref(), Some("ops"));
        assert_eq!(cfg.api_tcp, Some("127.0.0.1:7070".parse().unwrap()));
        assert_eq!((cfg.api.body_limit, cfg.api.request_timeout), (4096, 5));
        assert_eq!(cfg.api.header_timeout, 10);
    }

    #[test]
    fn bad_flags_fail_validation() {
        let cli = Cli::try_parse_from([
            "netagent",
            "up",
            "--nat-port-min",
            "5",
            "--nat-port-max",
            "4",
        ])
        .unwrap();
        let Command::Up(args) = cli.command else {
            panic!()
        };
        let err = up_config(&args).unwrap_err().to_string();
        assert!(err.contains("nat.port_min"), "{err}");
    }

    #[test]
    fn every_command_has_an_example() {
        let mut cmd = Cli::command();
        cmd.build();
        fn walk(cmd: &clap::Command, path: &str) {
            let help = cmd
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(help.contains("netagent"), "`{path}` --help has no example");
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        walk(&cmd, "netagent");
    }

    #[test]
    fn negative_and_text_indices_reach_the_server() {
        // The server names the problem; the CLI must not pre-empt it with a clap error
        // for negative numbers.
        let cli = Cli::try_parse_from(["netagent", "slot", "delete", "-1"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Slot(SlotCommand::Delete { index: -1, .. })
        ));
    }

    #[test]
    fn rates_parse_with_si_suffixes() {
        for (text, want) in [
            ("1500000", 1_500_000),
            ("20M", 20_000_000),
            ("20Mbit", 20_000_000),
            ("64k", 64_000),
            ("1G", 1_000_000_000),
            ("2T", 2_000_000_000_000),
        ] {
            assert_eq!(parse_rate(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "M",
            "1.5M",
            "-1",
            "20m",
            "20 Mb",
            "99999999999999999999",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policy_flags_parse() {
        let cli = Cli::try_parse_from([
            "netagent",
            "slot",
            "create",
            "3",
            "--guest-mac",
            "02:00:00:00:00:03",
            "--allow",
            "10.1.0.0/16",
            "--allow",
            "192.168.5.7/32",
            "--deny",
            "203.0.113.0/24",
            "--rate",
            "20M",
            "--burst",
            "65536",
        ])
        .unwrap();
        let Command::Slot(SlotCommand::Create {
            guest_mac,
            egress,
            rate,
            burst,
            ..
        }) = cli.command
        else {
            panic!()
        };
        assert_eq!(guest_mac.unwrap().0, [2, 0, 0, 0, 0, 3]);
        assert_eq!(egress.allow.len(), 2);
        assert_eq!(egress.deny[0].to_string(), "203.0.113.0/24");
        assert_eq!((rate, burst), (Some(20_000_000), Some(65_536)));
        for bad in [
            vec!["slot", "create", "3", "--allow", "10.1.2.3/16"],
            vec!["slot", "create", "3", "--guest-mac", "ff:ff:ff:ff:ff:ff"],
            vec!["slot", "create", "3", "--rate", "20M"],
            vec!["slot", "rate", "3"],
            vec![
                "slot", "rate", "3", "--off", "--rate", "1M", "--burst", "9000",
            ],
        ] {
            let args = std::iter::once("netagent").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from(["netagent", "slot", "rate", "3", "--off"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Slot(SlotCommand::Rate {
                off: true,
                rate: None,
                ..
            })
        ));
        let cfg = up_config(&match Cli::try_parse_from([
            "netagent",
            "up",
            "--egress-default-deny",
            "10.0.0.0/8, 169.254.169.254/32",
        ])
        .unwrap()
        .command
        {
            Command::Up(args) => *args,
            _ => panic!(),
        })
        .unwrap();
        let got: Vec<String> = cfg
            .egress_default_deny
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["10.0.0.0/8", "169.254.169.254/32"]);
        let Command::Up(args) =
            Cli::try_parse_from(["netagent", "up", "--egress-default-deny", ""])
                .unwrap()
                .command
        else {
            panic!()
        };
        assert!(up_config(&args).unwrap().egress_default_deny.is_empty());
        assert!(
            Cli::try_parse_from(["netagent", "up", "--egress-default-deny", "10.0.0.1/8"]).is_err()
        );
    }

    #[test]
    fn slot_list_aligns() {
        let plan = crate::slot::AddressPlan::new(
            "wrenn",
            Ipv4Addr::new(10, 11, 0, 0),
            Ipv4Addr::new(10, 12, 0, 0),
        )
        .unwrap();
        let slots = vec![
            SlotView {
                addr: plan.slot(1).unwrap(),
                guest: GuestLink::Tap,
                policy: Default::default(),
            },
            SlotView {
                addr: plan.slot(300).unwrap(),
                guest: GuestLink::Veth {
                    guest_netns: "g".into(),
                },
                policy: Default::default(),
            },
        ];
        let text = render_slot_list(&slots);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = lines[0].find("HOST IP").unwrap();
        assert_eq!(&lines[2][col..col + 9], "10.11.1.4");
        assert!(render_slot(&slots[0]).contains("10.12.0.3/31"));
    }
}
