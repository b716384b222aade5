//! Per-slot counters as users see them: the stable JSON shape of
//! `GET /v1/slots/{n}/stats`, the Prometheus text of `GET /metrics`, and the
//! human tables of `netagent stats`. Counters come from the per-CPU `STATS` map
//! already summed over CPUs; names of drop reasons come from the one shared table
//! (`netagent_common::DropReason::ALL`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use netagent_common::{Counter, DropReason, SlotStats};
use serde::{Deserialize, Serialize};

/// Packets and bytes of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes (L2 frame length).
    pub bytes: u64,
}

/// Masquerade allocations of one slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatCounters {
    /// Ports allocated (new outbound flows).
    pub allocations: u64,
    /// Allocations that failed.
    pub failures: u64,
}

/// One slot's counters: the JSON body of `GET /v1/slots/{n}/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotCounters {
    /// Slot index.
    pub index: u32,
    /// Traffic the guest sent that was forwarded.
    pub from_guest: Traffic,
    /// Traffic delivered to the guest.
    pub to_guest: Traffic,
    /// Masquerade port allocations.
    pub nat: NatCounters,
    /// Drops by reason (`DropReason::name`), every reason present.
    pub drops: BTreeMap<String, u64>,
}

impl SlotCounters {
    /// Converts the raw counter array of slot `index`.
    pub fn from_stats(index: u32, stats: &SlotStats) -> SlotCounters {
        let c = &stats.counters;
        SlotCounters {
            index,
            from_guest: Traffic {
                packets: c[Counter::FROM_GUEST_PACKETS],
                bytes: c[Counter::FROM_GUEST_BYTES],
            },
            to_guest: Traffic {
                packets: c[Counter::TO_GUEST_PACKETS],
                bytes: c[Counter::TO_GUEST_BYTES],
            },
            nat: NatCounters {
                allocations: c[Counter::NAT_ALLOCATIONS],
                failures: c[Counter::NAT_FAILURES],
            },
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name().to_string(), c[r.counter()]))
                .collect(),
        }
    }

    /// All drops together.
    pub fn drops_total(&self) -> u64 {
        self.drops.values().sum()
    }
}

/// Occupancy of one BPF table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableGauge {
    /// Table name (`nat_egress`, `nat_ingress`, `host_flows`).
    pub table: String,
    /// Entries in use.
    pub entries: u64,
    /// Maximum entries.
    pub capacity: u64,
}

impl TableGauge {
    /// The three flow tables' gauges (`nat_egress`, `nat_ingress`, `host_flows`).
    pub fn from_usage(u: &crate::bpf::TableUsage) -> Vec<TableGauge> {
        let gauge = |table: &str, entries: usize, capacity: u32| TableGauge {
            table: table.into(),
            entries: entries as u64,
            capacity: u64::from(capacity),
        };
        vec![
            gauge("nat_egress", u.nat_egress, u.nat_capacity),
            gauge("nat_ingress", u.nat_ingress, u.nat_capacity),
            gauge("host_flows", u.host_flows, u.host_flow_capacity),
        ]
    }

    /// `entries / capacity` (0 for a table without capacity).
    pub fn ratio(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            self.entries as f64 / self.capacity as f64
        }
    }
}

/// Everything `GET /metrics` exposes, gathered by the controller.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    /// Every slot's counters, sorted by index.
    pub slots: Vec<SlotCounters>,
    /// Table occupancy.
    pub tables: Vec<TableGauge>,
    /// The occupancy warning threshold (`table_warn_percent`), percent.
    pub table_warn_percent: u8,
    /// Datapath programs loaded.
    pub programs_loaded: u64,
    /// Program attachments (hooks) in place.
    pub program_attachments: u64,
    /// Flows removed by the reaper since start.
    pub reaped_flows: u64,
    /// Reaper runs that failed since start.
    pub reap_errors: u64,
}

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders the Prometheus text exposition format (version 0.0.4): one series per
/// slot and counter, and the global gauges.
pub fn render_prometheus(m: &MetricsSnapshot) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "netagent_slot_packets_total",
        "counter",
        "Packets forwarded per slot and direction.",
    );
    for s in &m.slots {
        for (dir, t) in [("from_guest", s.from_guest), ("to_guest", s.to_guest)] {
            let _ = writeln!(
                out,
                "netagent_slot_packets_total{{slot=\"{}\",direction=\"{dir}\"}} {}",
                s.index, t.packets
            );
        }
    }
    family(
        &mut out,
        "netagent_slot_bytes_total",
        "counter",
        "Bytes (L2 frame length) forwarded per slot and direction.",
    );
    for s in &m.slots {
        for (dir, t) in [("from_guest", s.from_guest), ("to_guest", s.to_guest)] {
            let _ = writeln!(
                out,
                "netagent_slot_bytes_total{{slot=\"{}\",direction=\"{dir}\"}} {}",
                s.index, t.bytes
            );
        }
    }
    family(
        &mut out,
        "netagent_slot_drops_total",
        "counter",
        "Packets dropped per slot and reason.",
    );
    for s in &m.slots {
        for reason in DropReason::ALL {
            let n = s.drops.get(reason.name()).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "netagent_slot_drops_total{{slot=\"{}\",reason=\"{}\"}} {n}",
                s.index,
                reason.name()
            );
        }
    }
    family(
        &mut out,
        "netagent_slot_nat_allocations_total",
        "counter",
        "Masquerade ports allocated per slot.",
    );
    for s in &m.slots {
        let _ = writeln!(
            out,
            "netagent_slot_nat_allocations_total{{slot=\"{}\"}} {}",
            s.index, s.nat.allocations
        );
    }
    family(
        &mut out,
        "netagent_slot_nat_failures_total",
        "counter",
        "Masquerade allocations that failed per slot.",
    );
    for s in &m.slots {
        let _ = writeln!(
            out,
            "netagent_slot_nat_failures_total{{slot=\"{}\"}} {}",
            s.index, s.nat.failures
        );
    }
    family(
        &mut out,
        "netagent_table_entries",
        "gauge",
        "Entries in use in a NAT or flow table.",
    );
    for t in &m.tables {
        let _ = writeln!(
            out,
            "netagent_table_entries{{table=\"{}\"}} {}",
            t.table, t.entries
        );
    }
    family(
        &mut out,
        "netagent_table_capacity",
        "gauge",
        "Maximum entries of a NAT or flow table.",
    );
    for t in &m.tables {
        let _ = writeln!(
            out,
            "netagent_table_capacity{{table=\"{}\"}} {}",
            t.table, t.capacity
        );
    }
    family(
        &mut out,
        "netagent_table_usage_ratio",
        "gauge",
        "Entries in use divided by the capacity of a NAT or flow table (1 = full: new flows are dropped).",
    );
    for t in &m.tables {
        let _ = writeln!(
            out,
            "netagent_table_usage_ratio{{table=\"{}\"}} {}",
            t.table,
            t.ratio()
        );
    }
    family(
        &mut out,
        "netagent_table_pressure",
        "gauge",
        "1 while a NAT or flow table is at or above the warning threshold (table_warn_percent), else 0.",
    );
    for t in &m.tables {
        let _ = writeln!(
            out,
            "netagent_table_pressure{{table=\"{}\"}} {}",
            t.table,
            u8::from(crate::pressure::over_threshold(t, m.table_warn_percent))
        );
    }
    family(
        &mut out,
        "netagent_table_warn_ratio",
        "gauge",
        "The occupancy warning threshold (table_warn_percent / 100).",
    );
    let _ = writeln!(
        out,
        "netagent_table_warn_ratio {}",
        f64::from(m.table_warn_percent) / 100.0
    );
    family(&mut out, "netagent_slots", "gauge", "Slots that exist.");
    let _ = writeln!(out, "netagent_slots {}", m.slots.len());
    family(
        &mut out,
        "netagent_programs_loaded",
        "gauge",
        "Datapath programs loaded.",
    );
    let _ = writeln!(out, "netagent_programs_loaded {}", m.programs_loaded);
    family(
        &mut out,
        "netagent_program_attachments",
        "gauge",
        "Datapath program attachments (hooks) in place.",
    );
    let _ = writeln!(
        out,
        "netagent_program_attachments {}",
        m.program_attachments
    );
    family(
        &mut out,
        "netagent_reaped_flows_total",
        "counter",
        "Expired flows removed by the reaper.",
    );
    let _ = writeln!(out, "netagent_reaped_flows_total {}", m.reaped_flows);
    family(
        &mut out,
        "netagent_reap_errors_total",
        "counter",
        "Reaper runs that failed.",
    );
    let _ = writeln!(out, "netagent_reap_errors_total {}", m.reap_errors);
    out
}

/// Bytes with a binary unit: `512 B`, `1.5 KiB`, `20.0 MiB`, `3.25 GiB`.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{} B", value.round() as u64)
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A count with a thousands-free compact form: `999`, `12.3k`, `4.5M`.
pub fn human_count(n: f64) -> String {
    if n < 10_000.0 {
        format!("{}", n.round() as u64)
    } else if n < 10_000_000.0 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{:.1}M", n / 1e6)
    }
}

/// Per-second rates between two samples of one slot.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Packets/s and bytes/s from the guest.
    pub from_guest: (f64, f64),
    /// Packets/s and bytes/s to the guest.
    pub to_guest: (f64, f64),
}

impl Rates {
    /// Rates from `prev` to `now` over `seconds`; counters that went backwards
    /// (a slot re-created) count from zero.
    pub fn between(prev: &SlotCounters, now: &SlotCounters, seconds: f64) -> Rates {
        let rate = |a: u64, b: u64| {
            if seconds <= 0.0 {
                0.0
            } else if b >= a {
                (b - a) as f64 / seconds
            } else {
                b as f64 / seconds
            }
        };
        Rates {
            from_guest: (
                rate(prev.from_guest.packets, now.from_guest.packets),
                rate(prev.from_guest.bytes, now.from_guest.bytes),
            ),
            to_guest: (
                rate(prev.to_guest.packets, now.to_guest.packets),
                rate(prev.to_guest.bytes, now.to_guest.bytes),
            ),
        }
    }
}

/// Lays out rows as columns padded to their widest cell; the first column is
/// left-aligned, the others right-aligned (numbers).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    aligned_table(header, rows, 1)
}

/// Like [`table`] with every column left-aligned (text).
pub fn table_left(header: &[&str], rows: &[Vec<String>]) -> String {
    aligned_table(header, rows, header.len())
}

fn aligned_table(header: &[&str], rows: &[Vec<String>], left_cols: usize) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            if i < left_cols {
                let _ = write!(l, "{cell:<w$}", w = width[i]);
            } else {
                let _ = write!(l, "{cell:>w$}", w = width[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// The table of `netagent stats` for many slots; with `rates`, adds per-second
/// columns. Slots that dropped packets are listed below by reason.
pub fn render_slots_table(slots: &[SlotCounters], rates: Option<&BTreeMap<u32, Rates>>) -> String {
    let mut header = vec![
        "SLOT",
        "FROM-GUEST PKTS",
        "FROM-GUEST BYTES",
        "TO-GUEST PKTS",
        "TO-GUEST BYTES",
    ];
    if rates.is_some() {
        header.extend(["FROM-GUEST RATE", "TO-GUEST RATE"]);
    }
    header.extend(["NAT ALLOC", "NAT FAIL", "DROPS"]);
    let rows: Vec<Vec<String>> = slots
        .iter()
        .map(|s| {
            let mut row = vec![
                s.index.to_string(),
                s.from_guest.packets.to_string(),
                human_bytes(s.from_guest.bytes as f64),
                s.to_guest.packets.to_string(),
                human_bytes(s.to_guest.bytes as f64),
            ];
            if let Some(rates) = rates {
                let r = rates.get(&s.index).copied().unwrap_or_default();
                row.push(format_rate(r.from_guest));
                row.push(format_rate(r.to_guest));
            }
            row.extend([
                s.nat.allocations.to_string(),
                s.nat.failures.to_string(),
                s.drops_total().to_string(),
            ]);
            row
        })
        .collect();
    let mut out = table(&header, &rows);
    let dropping: Vec<&SlotCounters> = slots.iter().filter(|s| s.drops_total() > 0).collect();
    if !dropping.is_empty() {
        out.push_str("\ndrops by reason:\n");
        for s in dropping {
            let reasons: Vec<String> = s
                .drops
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            let _ = writeln!(out, "  slot {}: {}", s.index, reasons.join(" "));
        }
    }
    if slots.is_empty() {
        out.push_str("(no slots)\n");
    }
    out
}

fn format_rate((pps, bps): (f64, f64)) -> String {
    format!("{} pkt/s {}/s", human_count(pps), human_bytes(bps))
}

/// The detailed view of `netagent stats N`: both directions, NAT and every drop
/// reason (zeros included, so the reasons are discoverable).
pub fn render_slot_detail(s: &SlotCounters, rates: Option<Rates>) -> String {
    let mut header = vec![
        "SLOT ".to_string() + &s.index.to_string(),
        "PACKETS".into(),
        "BYTES".into(),
    ];
    if rates.is_some() {
        header.extend(["PKT/S".to_string(), "BYTES/S".to_string()]);
    }
    let mut rows = Vec::new();
    for (name, t, r) in [
        ("from guest", s.from_guest, rates.map(|r| r.from_guest)),
        ("to guest", s.to_guest, rates.map(|r| r.to_guest)),
    ] {
        let mut row = vec![
            name.to_string(),
            t.packets.to_string(),
            human_bytes(t.bytes as f64),
        ];
        if let Some((pps, bps)) = r {
            row.push(human_count(pps));
            row.push(format!("{}/s", human_bytes(bps)));
        }
        rows.push(row);
    }
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut out = table(&header_refs, &rows);
    out.push('\n');
    let mut rows = vec![
        vec!["nat allocations".to_string(), s.nat.allocations.to_string()],
        vec!["nat failures".to_string(), s.nat.failures.to_string()],
    ];
    for reason in DropReason::ALL {
        let n = s.drops.get(reason.name()).copied().unwrap_or(0);
        rows.push(vec![format!("drops {}", reason.name()), n.to_string()]);
    }
    out.push_str(&table(&["COUNTER", "VALUE"], &rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(index: u32) -> SlotCounters {
        let mut stats = SlotStats::default();
        stats.counters[Counter::FROM_GUEST_PACKETS] = 10;
        stats.counters[Counter::FROM_GUEST_BYTES] = 1500;
        stats.counters[Counter::TO_GUEST_PACKETS] = 7;
        stats.counters[Counter::TO_GUEST_BYTES] = 3 * 1024 * 1024;
        stats.counters[Counter::NAT_ALLOCATIONS] = 2;
        stats.counters[DropReason::Fragment.counter()] = 4;
        SlotCounters::from_stats(index, &stats)
    }

    #[test]
    fn counters_map_to_named_fields() {
        let s = sample(3);
        assert_eq!(
            s.from_guest,
            Traffic {
                packets: 10,
                bytes: 1500
            }
        );
        assert_eq!(s.to_guest.bytes, 3 * 1024 * 1024);
        assert_eq!(s.nat.allocations, 2);
        assert_eq!(s.drops.len(), DropReason::ALL.len());
        assert_eq!(s.drops["fragment"], 4);
        assert_eq!(s.drops_total(), 4);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["from_guest"]["packets"], 10);
        assert_eq!(json["drops"]["malformed"], 0);
        let back: SlotCounters = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn units() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1023.0), "1023 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0), "3.0 MiB");
        assert_eq!(human_count(12_345.0), "12.3k");
    }

    #[test]
    fn prometheus_has_every_reason_and_gauge() {
        let m = MetricsSnapshot {
            slots: vec![sample(1)],
            tables: vec![TableGauge {
                table: "nat_egress".into(),
                entries: 3,
                capacity: 8,
            }],
            table_warn_percent: 80,
            programs_loaded: 4,
            program_attachments: 4,
            ..Default::default()
        };
        let text = render_prometheus(&m);
        assert!(text.contains("netagent_table_usage_ratio{table=\"nat_egress\"} 0.375\n"));
        assert!(text.contains("netagent_table_pressure{table=\"nat_egress\"} 0\n"));
        assert!(text.contains("netagent_table_warn_ratio 0.8\n"));
        let full = MetricsSnapshot {
            tables: vec![TableGauge {
                table: "host_flows".into(),
                entries: 7,
                capacity: 8,
            }],
            table_warn_percent: 80,
            ..Default::default()
        };
        let full = render_prometheus(&full);
        assert!(
            full.contains("netagent_table_pressure{table=\"host_flows\"} 1\n"),
            "{full}"
        );
        assert!(full.contains("netagent_table_usage_ratio{table=\"host_flows\"} 0.875\n"));
        assert!(
            text.contains("netagent_slot_packets_total{slot=\"1\",direction=\"from_guest\"} 10\n")
        );
        assert!(
            text.contains("netagent_slot_bytes_total{slot=\"1\",direction=\"to_guest\"} 3145728\n")
        );
        for r in DropReason::ALL {
            assert!(
                text.contains(&format!("reason=\"{}\"", r.name())),
                "{}",
                r.name()
            );
        }
        assert!(text.contains("netagent_table_capacity{table=\"nat_egress\"} 8\n"));
        assert!(text.contains("netagent_slots 1\n"));
        assert!(text.contains("netagent_programs_loaded 4\n"));
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["x".into(), "1".into()],
                vec!["long".into(), "12345".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A        BB");
        assert_eq!(lines[1], "x         1");
        assert_eq!(lines[2], "long  12345");
        let out = render_slots_table(&[sample(1), sample(22)], None);
        assert!(out.contains("3.0 MiB"), "{out}");
        assert!(out.contains("slot 22: fragment=4"), "{out}");
        let widths: Vec<usize> = out.lines().take(3).map(str::len).collect();
        assert_eq!(widths[1], widths[2], "{out}");
    }

    #[test]
    fn rates_handle_resets() {
        let a = sample(1);
        let mut b = a.clone();
        b.from_guest.packets += 20;
        let r = Rates::between(&a, &b, 2.0);
        assert_eq!(r.from_guest.0, 10.0);
        assert_eq!(r.to_guest.0, 0.0);
        let r = Rates::between(&b, &SlotCounters::from_stats(1, &SlotStats::default()), 1.0);
        assert_eq!(r.from_guest.0, 0.0);
    }
}
