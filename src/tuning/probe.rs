//! The batch-size sweep (README.md, "Batch-size tuning"), written against a [`Target`] so the
//! policy is tested with scripted measurements.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::device::RunError;

/// Memory as one probe sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryReading {
    /// Bytes in use (process or cgroup on CPU, the device on CUDA).
    pub used: u64,
    /// The limit `used` counts against, when one is known.
    pub limit: Option<u64>,
}

/// What the sweep measures: a device running the model at a given batch size.
pub(crate) trait Target {
    /// One warm-up run, then timed runs of `rows` rows; returns the timed durations. Stops
    /// adding timed runs after `deadline` (there is always at least one).
    fn measure(&mut self, rows: usize, deadline: Instant) -> Result<Vec<Duration>, RunError>;
    fn memory(&mut self) -> MemoryReading;
}

/// The limits the sweep works within.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub memory_headroom: f64,
    pub memory_budget: Option<u64>,
    pub latency_budget: Option<Duration>,
    pub max_batch_cap: usize,
    pub max_duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    OutOfMemory,
    OverMemoryBudget,
    OverLatencyBudget,
    Failed,
}

/// One probed size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub batch: usize,
    pub outcome: Outcome,
    /// Median of the timed runs (0 when the run failed).
    pub latency_ms: f64,
    pub rows_per_second: f64,
    pub memory_used_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    /// True when `memory_used_bytes` is interpolated rather than read (see [`sweep`]).
    #[serde(default)]
    pub memory_estimated: bool,
    /// The error text when the run failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The sweep's result for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Sweep {
    pub chosen: usize,
    pub reason: String,
    pub probes: Vec<Probe>,
    /// Memory in use before the first probe.
    pub baseline_memory_bytes: u64,
    pub duration_ms: f64,
}

#[derive(Debug, Error, PartialEq)]
pub enum ProbeError {
    #[error("batch size 1 does not fit: {0}")]
    BatchOneFails(String),
}

fn is_oom(e: &RunError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("failed to allocate memory") || text.contains("out of memory")
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

struct Sweeper<'a, T: Target> {
    target: &'a mut T,
    limits: &'a Limits,
    baseline: u64,
    probes: Vec<Probe>,
    /// While bisecting below a size that broke the memory budget: the (size, bytes) readings of
    /// the last good and the first bad size. Memory pools keep what the bad size took, so later
    /// readings would be too high; sizes between are judged by the straight line between these.
    interpolate: Option<((usize, u64), (usize, u64))>,
}

impl<T: Target> Sweeper<'_, T> {
    fn probe(&mut self, batch: usize, deadline: Instant) -> Probe {
        let result = self.target.measure(batch, deadline);
        let mut mem = self.target.memory();
        let mut estimated = false;
        if let Some(((g, gm), (b, bm))) = self.interpolate {
            let frac = (batch - g) as f64 / (b - g).max(1) as f64;
            mem.used = gm + ((bm.saturating_sub(gm)) as f64 * frac) as u64;
            estimated = true;
        }
        let mut p = Probe {
            batch,
            outcome: Outcome::Ok,
            latency_ms: 0.0,
            rows_per_second: 0.0,
            memory_used_bytes: mem.used,
            memory_limit_bytes: mem.limit,
            memory_estimated: estimated,
            error: None,
        };
        match result {
            Err(e) => {
                p.outcome = if is_oom(&e) {
                    Outcome::OutOfMemory
                } else {
                    Outcome::Failed
                };
                p.error = Some(e.to_string());
            }
            Ok(mut runs) => {
                runs.sort();
                let median = runs.get(runs.len() / 2).copied().unwrap_or_default();
                p.latency_ms = median.as_secs_f64() * 1e3;
                p.rows_per_second = batch as f64 / median.as_secs_f64().max(1e-9);
                let grown = mem.used.saturating_sub(self.baseline);
                let over_limit = mem.limit.is_some_and(|l| {
                    mem.used as f64 > l as f64 * (1.0 - self.limits.memory_headroom)
                });
                let over_budget = self.limits.memory_budget.is_some_and(|b| grown > b);
                if over_limit || over_budget {
                    p.outcome = Outcome::OverMemoryBudget;
                } else if self.limits.latency_budget.is_some_and(|l| median > l) {
                    p.outcome = Outcome::OverLatencyBudget;
                }
            }
        }
        self.probes.push(p.clone());
        p
    }

    fn describe_failure(&self, p: &Probe) -> String {
        let mem = format!(
            "memory in use {} (before probing {}, limit {}, headroom {:.0}%, budget {})",
            mib(p.memory_used_bytes),
            mib(self.baseline),
            p.memory_limit_bytes.map_or("unknown".into(), mib),
            self.limits.memory_headroom * 100.0,
            self.limits.memory_budget.map_or("none".into(), mib),
        );
        match p.outcome {
            Outcome::OverLatencyBudget => format!(
                "one row takes {:.3} ms, over the latency budget of {:.3} ms",
                p.latency_ms,
                self.limits.latency_budget.unwrap_or_default().as_secs_f64() * 1e3
            ),
            Outcome::OverMemoryBudget => format!("over the memory budget: {mem}"),
            Outcome::OutOfMemory => format!(
                "out of memory ({}); {mem}",
                p.error.as_deref().unwrap_or("")
            ),
            _ => format!(
                "the run failed ({}); {mem}",
                p.error.as_deref().unwrap_or("")
            ),
        }
    }
}

/// Runs the sweep: sizes 1, 2, 4, … up to the cap; stops at the first size that fails (out of
/// memory, memory budget, latency budget, error), when doubling gains under 5% twice, or before
/// the time limit; then bisects between the last good and the first failing size.
pub(super) fn sweep<T: Target>(target: &mut T, limits: &Limits) -> Result<Sweep, ProbeError> {
    let started = Instant::now();
    let baseline = target.memory().used;
    let mut s = Sweeper {
        target,
        limits,
        baseline,
        probes: Vec::new(),
        interpolate: None,
    };
    let cap = limits.max_batch_cap.max(1);
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
        .take_while(|&b| b <= cap)
        .collect();
    if sizes.last() != Some(&cap) {
        sizes.push(cap);
    }
    // A size is only started when the time left covers three times the last one's cost (a
    // doubled batch costs about twice as much per run; the runs themselves stop at the deadline).
    let deadline = started + limits.max_duration;
    let fits_in_time = |last: Duration| started.elapsed() + last * 3 <= limits.max_duration;
    let mut stop = format!("reached max_batch_cap {cap}");
    let mut last_good: Option<Probe> = None;
    let mut first_bad: Option<usize> = None;
    let mut flat = 0;
    let mut last_cost = Duration::ZERO;
    for &b in &sizes {
        if b > 1 && !fits_in_time(last_cost) {
            stop = format!("time limit {:?} before size {b}", limits.max_duration);
            break;
        }
        let t0 = Instant::now();
        let p = s.probe(b, deadline);
        last_cost = t0.elapsed();
        if p.outcome != Outcome::Ok {
            if b == 1 {
                return Err(ProbeError::BatchOneFails(s.describe_failure(&p)));
            }
            stop = format!("{:?} at size {b}", p.outcome).to_lowercase();
            first_bad = Some(b);
            break;
        }
        if let Some(prev) = &last_good {
            if p.rows_per_second < prev.rows_per_second * 1.05 {
                flat += 1;
            } else {
                flat = 0;
            }
        }
        last_good = Some(p);
        if flat >= 2 {
            stop = format!("throughput gained under 5% twice, up to size {b}");
            break;
        }
    }
    if let (Some(good), Some(bad)) = (&last_good, first_bad) {
        let bad_probe = s.probes.last().cloned().expect("the bad size was probed");
        if bad_probe.outcome == Outcome::OverMemoryBudget {
            s.interpolate = Some((
                (good.batch, good.memory_used_bytes),
                (bad, bad_probe.memory_used_bytes),
            ));
        }
        let (mut lo, mut hi) = (good.batch, bad);
        while hi - lo > 1 && fits_in_time(last_cost) {
            let mid = lo + (hi - lo) / 2;
            let t0 = Instant::now();
            let p = s.probe(mid, deadline);
            last_cost = t0.elapsed();
            if p.outcome == Outcome::Ok {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    // The largest good size that still gains: at least 5% more rows/s than the best good size of
    // at most half as many rows.
    let mut good: Vec<&Probe> = s
        .probes
        .iter()
        .filter(|p| p.outcome == Outcome::Ok)
        .collect();
    good.sort_by_key(|p| p.batch);
    let gains = |p: &Probe| {
        p.batch == 1
            || good
                .iter()
                .filter(|q| q.batch <= p.batch / 2)
                .map(|q| q.rows_per_second)
                .fold(0.0, f64::max)
                * 1.05
                <= p.rows_per_second
    };
    let chosen = good
        .iter()
        .rev()
        .find(|p| gains(p))
        .copied()
        .unwrap_or(good[0]);
    let reason = format!(
        "{} rows/s at {:.3} ms: the largest size that gains 5% over half its size; sweep stopped: {stop}",
        chosen.rows_per_second.round(),
        chosen.latency_ms
    );
    let chosen = chosen.batch;
    Ok(Sweep {
        chosen,
        reason,
        probes: s.probes,
        baseline_memory_bytes: baseline,
        duration_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted device: latency per batch size from a function, memory grows by
    /// `bytes_per_row` per row of the largest batch run so far, OOM above `oom_at`.
    struct Scripted {
        latency: fn(usize) -> f64,
        bytes_per_row: u64,
        oom_at: usize,
        peak_rows: usize,
        /// Really take the scripted time (for the time-limit test).
        sleep: bool,
        limit: Option<u64>,
        probed: Vec<usize>,
    }

    impl Target for Scripted {
        fn measure(&mut self, rows: usize, _deadline: Instant) -> Result<Vec<Duration>, RunError> {
            self.probed.push(rows);
            if rows >= self.oom_at {
                return Err(RunError::Failed(
                    "Failed to allocate memory for requested buffer".into(),
                ));
            }
            self.peak_rows = self.peak_rows.max(rows);
            let t = Duration::from_secs_f64((self.latency)(rows) / 1e3);
            if self.sleep {
                std::thread::sleep(t * 4);
            }
            Ok(vec![t; 3])
        }
        fn memory(&mut self) -> MemoryReading {
            MemoryReading {
                used: (100 << 20) + self.peak_rows as u64 * self.bytes_per_row,
                limit: self.limit,
            }
        }
    }

    fn device(latency: fn(usize) -> f64) -> Scripted {
        Scripted {
            latency,
            bytes_per_row: 1 << 20,
            oom_at: usize::MAX,
            peak_rows: 0,
            sleep: false,
            limit: None,
            probed: Vec::new(),
        }
    }

    fn limits() -> Limits {
        Limits {
            memory_headroom: 0.15,
            memory_budget: None,
            latency_budget: None,
            max_batch_cap: 256,
            max_duration: Duration::from_secs(60),
        }
    }

    /// 1 ms fixed cost + 0.1 ms per row: batching pays until the per-row cost dominates.
    fn overhead_bound(rows: usize) -> f64 {
        1.0 + 0.1 * rows as f64
    }

    #[test]
    fn stops_when_doubling_no_longer_pays_and_picks_the_last_size_that_did() {
        let mut d = device(overhead_bound);
        let s = sweep(&mut d, &limits()).unwrap();
        // rows/s: 1→909, 2→1667, 4→2857, 8→4444, 16→6154, 32→7619, 64→8649, 128→9275, 256→9624
        // gains: ... 64→128 +7%, 128→256 +3.8% (flat once); cap reached.
        assert_eq!(d.probed, vec![1, 2, 4, 8, 16, 32, 64, 128, 256]);
        assert_eq!(s.chosen, 128);
        assert_eq!(s.probes.len(), 9);
    }

    #[test]
    fn out_of_memory_bisects_between_the_last_good_and_first_bad_size() {
        let mut d = device(overhead_bound);
        d.oom_at = 40;
        let s = sweep(&mut d, &limits()).unwrap();
        assert_eq!(d.probed, vec![1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 39]);
        assert_eq!(s.chosen, 39);
        assert!(s.reason.contains("outofmemory at size 64"), "{}", s.reason);
        assert_eq!(
            s.probes
                .iter()
                .filter(|p| p.outcome == Outcome::OutOfMemory)
                .count(),
            3
        );
    }

    #[test]
    fn a_memory_budget_picks_a_smaller_size() {
        let mut d = device(overhead_bound);
        let mut l = limits();
        l.memory_budget = Some(20 << 20); // 1 MiB per row: at most 20 rows
        let s = sweep(&mut d, &l).unwrap();
        // 32 breaks the budget; the pool keeps 32 rows' memory, so 24, 20, 18... are judged by
        // the line between 16 (16 MiB) and 32 (32 MiB).
        assert_eq!(d.probed, vec![1, 2, 4, 8, 16, 32, 24, 20, 22, 21]);
        assert_eq!(s.chosen, 20);
        assert!(s
            .probes
            .iter()
            .filter(|p| p.batch > 16 && p.batch < 32)
            .all(|p| p.memory_estimated));
        let mut d = device(overhead_bound);
        d.limit = Some((110.5 * 1048576.0 / 0.85) as u64); // headroom leaves 110.5 MiB: 10 rows
        let s = sweep(&mut d, &limits()).unwrap();
        assert_eq!(s.chosen, 10);
    }

    #[test]
    fn a_latency_budget_below_batch_two_picks_one() {
        let mut d = device(overhead_bound);
        let mut l = limits();
        l.latency_budget = Some(Duration::from_micros(1150)); // 1 row 1.1 ms, 2 rows 1.2 ms
        let s = sweep(&mut d, &l).unwrap();
        assert_eq!(s.chosen, 1);
        assert_eq!(s.probes[1].outcome, Outcome::OverLatencyBudget);
    }

    #[test]
    fn an_impossible_budget_is_an_error_naming_the_figures() {
        let mut d = device(overhead_bound);
        let mut l = limits();
        l.latency_budget = Some(Duration::from_micros(10));
        let e = sweep(&mut d, &l).unwrap_err().to_string();
        assert!(e.contains("1.100 ms") && e.contains("0.010 ms"), "{e}");
        let mut d = device(overhead_bound);
        let mut l = limits();
        l.memory_budget = Some(1);
        let e = sweep(&mut d, &l).unwrap_err().to_string();
        assert!(
            e.contains("memory in use 101.0 MiB") && e.contains("before probing 100.0 MiB"),
            "{e}"
        );
    }

    #[test]
    fn the_time_limit_is_respected() {
        // Each size really takes 4 × its latency: 4.4, 4.8, 5.6, 7.2, 10.4 ms...
        let mut d = device(overhead_bound);
        d.sleep = true;
        let mut l = limits();
        l.max_duration = Duration::from_millis(40);
        let s = sweep(&mut d, &l).unwrap();
        assert!(s.duration_ms <= 40.0, "took {} ms", s.duration_ms);
        // 4.4 + 4.8 + 5.6 = 14.8 ms; 8 rows would start at 14.8 + 3 × 5.6 > 40? No: 31.6 fits;
        // after it (22 ms) 16 rows would need 22 + 3 × 7.2 = 43.6 > 40.
        assert!(s.reason.contains("time limit"), "{}", s.reason);
        assert_eq!(d.probed, vec![1, 2, 4, 8]);
    }
}
