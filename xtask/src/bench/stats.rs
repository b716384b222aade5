//! Samples, medians and spread.

/// A datapath under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Path {
    /// Guest stand-in and server on one bare veth pair.
    F0,
    /// The slot chain with plain kernel forwarding, no NAT rules.
    Floor,
    /// The seed's iptables rules.
    Legacy,
    /// The eBPF datapath.
    Netagent,
}

impl Path {
    pub const ALL: [Path; 4] = [Path::F0, Path::Floor, Path::Legacy, Path::Netagent];

    pub fn name(self) -> &'static str {
        match self {
            Path::F0 => "f0",
            Path::Floor => "floor",
            Path::Legacy => "legacy",
            Path::Netagent => "netagent",
        }
    }
}

/// What one sample measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    RttP50,
    RttP99,
    RttMin,
    StreamGbps,
    StreamMssGbps,
    UdpKpps,
    CrrPerSec,
}

impl Metric {
    pub const ALL: [Metric; 7] = [
        Metric::RttP50,
        Metric::RttP99,
        Metric::RttMin,
        Metric::StreamGbps,
        Metric::StreamMssGbps,
        Metric::UdpKpps,
        Metric::CrrPerSec,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::RttP50 => "TCP RTT p50 (µs)",
            Metric::RttP99 => "TCP RTT p99 (µs)",
            Metric::RttMin => "TCP RTT min (µs)",
            Metric::StreamGbps => "TCP stream (Gbit/s)",
            Metric::StreamMssGbps => "TCP stream, small MSS (Gbit/s)",
            Metric::UdpKpps => "UDP small packets (kpps received)",
            Metric::CrrPerSec => "new TCP connections (conn/s)",
        }
    }

    /// The unit after a figure, with its leading space.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::RttP50 | Metric::RttP99 | Metric::RttMin => " µs",
            Metric::StreamGbps | Metric::StreamMssGbps => " Gbit/s",
            Metric::UdpKpps => " kpps",
            Metric::CrrPerSec => " conn/s",
        }
    }

    /// Whether lower is better (latencies).
    pub fn lower_is_better(self) -> bool {
        matches!(self, Metric::RttP50 | Metric::RttP99 | Metric::RttMin)
    }
}

/// One measured value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub path: Path,
    pub n: u32,
    pub metric: Metric,
    pub round: u32,
    pub value: f64,
}

/// Median and spread of several rounds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        Some(Summary {
            median: median_sorted(&v),
            min: v[0],
            max: v[v.len() - 1],
            count: v.len(),
        })
    }
}

fn median_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The summary of one (path, n, metric) over all rounds.
pub fn summarize(samples: &[Sample], path: Path, n: u32, metric: Metric) -> Option<Summary> {
    let values: Vec<f64> = samples
        .iter()
        .filter(|s| s.path == path && s.n == n && s.metric == metric)
        .map(|s| s.value)
        .collect();
    Summary::of(&values)
}

/// The ratio `a / b` of each round in which both paths were measured (the paths of
/// a round run back to back, so a machine that speeds up or slows down between
/// rounds moves both alike), summarized over the rounds.
pub fn paired_ratio(
    samples: &[Sample],
    a: Path,
    b: Path,
    n: u32,
    metric: Metric,
) -> Option<Summary> {
    Summary::of(&paired_ratio_values(samples, a, b, n, metric))
}

/// The per-round ratios `a / b` that `paired_ratio` summarizes, in round order.
pub fn paired_ratio_values(
    samples: &[Sample],
    a: Path,
    b: Path,
    n: u32,
    metric: Metric,
) -> Vec<f64> {
    paired(samples, a, b, n, metric, |x, y| (y != 0.0).then(|| x / y))
}

/// `f(a, b)` of each round in which both paths were measured, in round order.
fn paired(
    samples: &[Sample],
    a: Path,
    b: Path,
    n: u32,
    metric: Metric,
    f: impl Fn(f64, f64) -> Option<f64>,
) -> Vec<f64> {
    let value = |path: Path, round: u32| {
        samples
            .iter()
            .find(|s| s.path == path && s.n == n && s.metric == metric && s.round == round)
            .map(|s| s.value)
    };
    samples
        .iter()
        .filter(|s| s.path == a && s.n == n && s.metric == metric)
        .filter_map(|s| value(b, s.round).and_then(|v| f(s.value, v)))
        .collect()
}

/// The difference `a - b` of each round in which both paths were measured,
/// summarized over the rounds: an overhead over f0 taken round by round, so a
/// drift of the machine between rounds (which moves every path of a round
/// alike) does not land on one path's median and not on another's.
pub fn paired_difference(
    samples: &[Sample],
    a: Path,
    b: Path,
    n: u32,
    metric: Metric,
) -> Option<Summary> {
    Summary::of(&paired(samples, a, b, n, metric, |x, y| Some(x - y)))
}

/// Every sample as CSV (path, n, metric, round, value).
pub fn csv(samples: &[Sample]) -> String {
    let mut out = String::from("path,n,metric,round,value\n");
    for s in samples {
        out.push_str(&format!(
            "{},{},{:?},{},{}\n",
            s.path.name(),
            s.n,
            s.metric,
            s.round + 1,
            s.value
        ));
    }
    out
}

/// Percentile (0..=100) of unsorted values, nearest-rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratio_is_taken_round_by_round() {
        let sample = |path, round, value| Sample {
            path,
            n: 1,
            metric: Metric::StreamGbps,
            round,
            value,
        };
        // The machine doubles its speed in round 1: the per-round ratio stays 1.2
        // while the ratio of the medians would not.
        let samples = [
            sample(Path::Netagent, 0, 12.0),
            sample(Path::Floor, 0, 10.0),
            sample(Path::Netagent, 1, 24.0),
            sample(Path::Floor, 1, 20.0),
            sample(Path::Netagent, 2, 13.2),
            sample(Path::Floor, 2, 10.0),
            sample(Path::Netagent, 3, 99.0), // no floor in round 3: left out
        ];
        let s = paired_ratio(&samples, Path::Netagent, Path::Floor, 1, Metric::StreamGbps).unwrap();
        assert_eq!(s.count, 3);
        assert!((s.median - 1.2).abs() < 1e-9);
        assert!((s.min - 1.2).abs() < 1e-9 && (s.max - 1.32).abs() < 1e-9);
        assert!(
            paired_ratio(
                &samples,
                Path::Netagent,
                Path::Legacy,
                1,
                Metric::StreamGbps
            )
            .is_none()
        );
    }

    #[test]
    fn median_and_percentile() {
        let s = Summary::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!((s.min, s.max), (1.0, 10.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
        assert_eq!(
            percentile(&(1..=100).map(f64::from).collect::<Vec<_>>(), 99.0),
            99.0
        );
    }
}
