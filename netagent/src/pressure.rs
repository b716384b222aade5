//! Table pressure: how full the NAT and host-flow tables are, read cheaply, and
//! the `table_warn_percent` warning.
//!
//! Counting a BPF hash table's entries from userspace means walking it (one
//! `BPF_MAP_GET_NEXT_KEY` per entry; the kernel keeps no count userspace can
//! read), so the two readers get their counts differently:
//!
//! - the **reaper** walks every table anyway; its pass reports what is left and
//!   [`TablePressure::observe`] compares that with the threshold: a warning when
//!   a table goes above it (at most once per [`WARN_INTERVAL`] per table, also
//!   while it stays above), an info line when it falls back below;
//! - a **scrape** (`GET /metrics`) walks the tables at most once per
//!   [`COUNT_TTL`]; scrapes in between get the same figures
//!   ([`TablePressure::scrape`]), so a scrape storm costs one walk a second.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::stats::TableGauge;

/// How long a scrape's table counts are reused.
pub const COUNT_TTL: Duration = Duration::from_secs(1);
/// Least time between two warnings about one table.
pub const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Whether `t` is at or above `warn_percent` of its capacity.
pub fn over_threshold(t: &TableGauge, warn_percent: u8) -> bool {
    t.capacity > 0
        && u128::from(t.entries) * 100 >= u128::from(warn_percent) * u128::from(t.capacity)
}

/// What an observation of one table calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing to say.
    Quiet,
    /// Above the threshold and no warning about it within `WARN_INTERVAL`.
    Warn,
    /// Back below the threshold after a warning.
    Recovered,
}

#[derive(Debug, Default)]
struct TableState {
    over: bool,
    /// A warning was logged for the current episode above the threshold.
    warned: bool,
    last_warn: Option<Instant>,
}

/// Occupancy tracking of the flow tables (one per agent).
#[derive(Debug)]
pub struct TablePressure {
    warn_percent: u8,
    states: Mutex<BTreeMap<String, TableState>>,
    cache: Mutex<Option<(Instant, Vec<TableGauge>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TablePressure {
    /// Tracking with the warning at `warn_percent` (1 to 100) of each table.
    pub fn new(warn_percent: u8) -> TablePressure {
        TablePressure {
            warn_percent,
            states: Mutex::default(),
            cache: Mutex::default(),
        }
    }

    /// The threshold, in percent of a table's capacity.
    pub fn warn_percent(&self) -> u8 {
        self.warn_percent
    }

    /// Table gauges for a scrape: those of a walk younger than [`COUNT_TTL`], else
    /// a fresh walk by `count`. Concurrent scrapes wait for one walk rather than
    /// each walking.
    pub fn scrape<E>(
        &self,
        count: impl FnOnce() -> Result<Vec<TableGauge>, E>,
    ) -> Result<Vec<TableGauge>, E> {
        let mut cache = lock(&self.cache);
        if let Some((at, tables)) = cache.as_ref()
            && at.elapsed() < COUNT_TTL
        {
            return Ok(tables.clone());
        }
        let tables = count()?;
        *cache = Some((Instant::now(), tables.clone()));
        Ok(tables)
    }

    /// Compares counts (a reaper pass's) with the threshold and logs what
    /// changed; returns the transition of each table, in the order given.
    pub fn observe(&self, tables: &[TableGauge]) -> Vec<Transition> {
        let now = Instant::now();
        tables
            .iter()
            .map(|t| {
                let transition = self.transition(t, now);
                let percent = if t.capacity == 0 {
                    0.0
                } else {
                    t.entries as f64 * 100.0 / t.capacity as f64
                };
                match transition {
                    Transition::Warn => tracing::warn!(
                        table = %t.table,
                        entries = t.entries,
                        capacity = t.capacity,
                        percent = format!("{percent:.1}"),
                        warn_percent = self.warn_percent,
                        full = t.entries >= t.capacity,
                        "flow table above the warning threshold: new flows are dropped (nat_table_full) once it is full; raise nat.table_size / nat.host_flow_table_size or shorten the timeouts"
                    ),
                    Transition::Recovered => tracing::info!(
                        table = %t.table,
                        entries = t.entries,
                        capacity = t.capacity,
                        percent = format!("{percent:.1}"),
                        warn_percent = self.warn_percent,
                        "flow table back below the warning threshold"
                    ),
                    Transition::Quiet => {}
                }
                transition
            })
            .collect()
    }

    /// The transition of one table observed at `now` (updates its state).
    fn transition(&self, t: &TableGauge, now: Instant) -> Transition {
        let over = over_threshold(t, self.warn_percent);
        let mut states = lock(&self.states);
        let s = states.entry(t.table.clone()).or_default();
        let was_over = s.over;
        s.over = over;
        if over {
            let due = s
                .last_warn
                .is_none_or(|at| now.duration_since(at) >= WARN_INTERVAL);
            if due {
                s.last_warn = Some(now);
                s.warned = true;
                return Transition::Warn;
            }
        } else if was_over && s.warned {
            s.warned = false;
            return Transition::Recovered;
        }
        Transition::Quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(entries: u64, capacity: u64) -> TableGauge {
        TableGauge {
            table: "nat_egress".into(),
            entries,
            capacity,
        }
    }

    #[test]
    fn threshold_is_inclusive_and_exact() {
        assert!(!over_threshold(&gauge(79, 100), 80));
        assert!(over_threshold(&gauge(80, 100), 80));
        assert!(over_threshold(&gauge(8, 8), 100));
        assert!(!over_threshold(&gauge(7, 8), 100));
        assert!(!over_threshold(&gauge(0, 0), 1));
        assert!(over_threshold(&gauge(u64::MAX, u64::MAX), 100));
    }

    #[test]
    fn warns_on_crossing_rate_limited_and_reports_recovery() {
        let p = TablePressure::new(80);
        let t0 = Instant::now();
        assert_eq!(p.transition(&gauge(10, 100), t0), Transition::Quiet);
        assert_eq!(p.transition(&gauge(85, 100), t0), Transition::Warn);
        // Still above: no repeat within the interval.
        assert_eq!(
            p.transition(&gauge(99, 100), t0 + Duration::from_secs(5)),
            Transition::Quiet
        );
        assert_eq!(
            p.transition(&gauge(50, 100), t0 + Duration::from_secs(6)),
            Transition::Recovered
        );
        assert_eq!(
            p.transition(&gauge(50, 100), t0 + Duration::from_secs(7)),
            Transition::Quiet
        );
        // Flapping back above within the interval: no second warning, and so no
        // recovery line either.
        assert_eq!(
            p.transition(&gauge(90, 100), t0 + Duration::from_secs(8)),
            Transition::Quiet
        );
        assert_eq!(
            p.transition(&gauge(10, 100), t0 + Duration::from_secs(9)),
            Transition::Quiet
        );
        // After the interval, staying above warns again.
        assert_eq!(
            p.transition(&gauge(90, 100), t0 + WARN_INTERVAL),
            Transition::Warn
        );
        assert_eq!(
            p.transition(&gauge(90, 100), t0 + 2 * WARN_INTERVAL),
            Transition::Warn
        );
        // Tables are tracked separately.
        let other = TableGauge {
            table: "host_flows".into(),
            entries: 90,
            capacity: 100,
        };
        assert_eq!(
            p.transition(&other, t0 + 2 * WARN_INTERVAL),
            Transition::Warn
        );
    }

    #[test]
    fn scrapes_within_the_ttl_reuse_one_walk() {
        let p = TablePressure::new(80);
        let walks = std::cell::Cell::new(0);
        let count = || -> Result<Vec<TableGauge>, ()> {
            walks.set(walks.get() + 1);
            Ok(vec![gauge(walks.get(), 8)])
        };
        assert_eq!(p.scrape(count).unwrap()[0].entries, 1);
        assert_eq!(p.scrape(count).unwrap()[0].entries, 1);
        assert_eq!(walks.get(), 1);
        // A failed walk is not cached.
        *lock(&p.cache) = None;
        assert!(p.scrape(|| Err::<Vec<TableGauge>, ()>(())).is_err());
        assert_eq!(p.scrape(count).unwrap()[0].entries, 2);
    }
}
