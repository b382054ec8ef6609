//! The batch-size sweep (README.md, "Batch-size tuning"), written against a [`Target`] so the
//! policy is tested with scripted measurements.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::device::RunError;

pub use crate::device::MemoryReading;

/// What one size's timed runs measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct Measured {
    /// Each batch's time as a loaded server pays it: with the next batch already handed to the
    /// device thread, from the last reply of the batch before to its own last reply (the run,
    /// the split into its requests' parts, the replies).
    pub served: Vec<Duration>,
    /// The session run of each of those batches alone, timed on the device thread.
    pub run: Vec<Duration>,
}

/// What the sweep measures: a device serving batches of a given size.
pub(crate) trait Target {
    /// One warm-up batch, then timed batches of `rows` rows, one request part per row, two in
    /// flight. Stops adding timed batches after `deadline` (there is always at least one).
    fn measure(&mut self, rows: usize, deadline: Instant) -> Result<Measured, RunError>;
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
    pub cores: Cores,
}

/// The process's cores as the choice sees them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cores {
    /// Which end of the tied sizes the model's threads ask for ([`Prefer::for_threads`]).
    pub prefer: Prefer,
    /// Cores left for request handling, per CPU session of the model (see
    /// [`device_limits_the_server`]); 0 (a GPU, or none left) leaves the choice to `prefer`.
    pub handling: f64,
}

/// What the server's own work on a one-row request (HTTP, parsing, the hand-offs, the reply)
/// costs, in units of the per-batch cost the probe measures (`fixed_cost_ms`, the split and
/// the replies on this machine). On the development machine the HTTP side of a one-row binary
/// request took 0.11 ms of CPU (55 µs user, 54 µs kernel, pinned) where the probe's fixed cost
/// was 0.03-0.037 ms: about three times.
pub(crate) const HANDLING_PER_FIXED_COST: f64 = 3.0;

/// Whether a loaded server will be limited by the device rather than by its request handling:
/// the device's time for a row at its best size (`row_ms`), times the cores left to handle requests beside
/// it, is at least what handling one request costs ([`HANDLING_PER_FIXED_COST`] times the
/// measured fixed cost; with no fixed cost measured there is no estimate, and the rule does
/// not apply). Then every rows/s the device loses is a rows/s the server does not
/// serve, and the hand-offs a larger batch saves are device time: the largest size within 3% of
/// the most is chosen, as when the device's threads take every core (`cnn_wide`, 0.24 ms a row
/// on one thread with one core spare: caps 1 and 2 served 0.89-0.94 of the best under load,
/// 4-256 0.93-1.00). When it is less (the CNN fixture: 0.019 ms a row), the request handling
/// limits, and the smaller end keeps it and the device working at once.
pub(crate) fn device_limits_the_server(
    row_ms: f64,
    fixed_cost_ms: f64,
    handling_cores: f64,
) -> bool {
    handling_cores > 0.0
        && fixed_cost_ms > 0.0
        && row_ms * handling_cores >= HANDLING_PER_FIXED_COST * fixed_cost_ms
}

/// For a model whose one CPU session has `threads` intra-op threads, every core the process may
/// use, from `runtime.cpu_threads: auto`, and whose probe gave `probes` and `fixed_cost_ms`:
/// whether the session should have one thread fewer, and why. It should where, by the rule of
/// [`device_limits_the_server`], the device with one thread fewer would still not limit a loaded
/// server, so the core it gives up serves more handling requests than running rows. A row's run
/// at the size that served the most is taken as `threads / (threads - 1)` times as long with one
/// thread fewer (the most it can take: threads rarely share a run perfectly), which leans
/// towards keeping every thread. On the development machine's two cores the CNN fixture (a row
/// 0.013 ms at two threads, alone) served 28,479 rows/s under load with one thread and 24,566 with two,
/// `cnn_wide` 4,065 and 5,472, the MLP the same with either (docs/BENCHMARKS.md,
/// "Threads for the device or for request handling").
pub(crate) fn one_thread_fewer(
    probes: &[Probe],
    fixed_cost_ms: f64,
    threads: usize,
) -> Option<String> {
    if threads < 2 || fixed_cost_ms <= 0.0 {
        return None;
    }
    let top = probes
        .iter()
        .filter(|p| p.outcome == Outcome::Ok && p.latency_ms > 0.0)
        .max_by(|a, b| {
            a.served_rows_per_second
                .total_cmp(&b.served_rows_per_second)
        })?;
    let fewer = threads - 1;
    let row_ms = top.latency_ms / top.batch.max(1) as f64 * threads as f64 / fewer as f64;
    if device_limits_the_server(row_ms, fixed_cost_ms, 1.0) {
        return None;
    }
    Some(format!(
        "{fewer} intra-op thread(s), not {threads}: with one thread fewer a row at size {} would take at most {row_ms:.4} ms, less than {HANDLING_PER_FIXED_COST} x the fixed cost ({fixed_cost_ms:.4} ms), so the device would not limit a loaded server and the core is left to request handling",
        top.batch
    ))
}

/// Which of the sizes within [`Prefer::tolerance`] of the most served rows/s is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prefer {
    /// The smallest: cores are left for request handling beside the device, and a smaller cap
    /// keeps the two working at once.
    Smaller,
    /// The largest: the device's threads take every core the process may use, so request
    /// handling runs on the device's cores and what a batch's hand-offs cost comes out of the
    /// rows the device serves; or the device will limit a loaded server
    /// ([`device_limits_the_server`]), and the hand-offs a larger batch saves are its time.
    Larger,
}

impl Prefer {
    /// Sizes that serve within this fraction of the most rows/s count as tied. Taking the
    /// smallest, it is wide: one size's figure moves by up to 10% from one start to the next
    /// (the CNN fixture's size 4, one thread on two cores: 42.5k-47.0k rows/s in five starts),
    /// and within 3% that fixture was given a flat top's far end (8 to 256) in 7 of 16 starts,
    /// where a cap above the best served 0.77-0.85 of it at 32 clients; a flood loses at most
    /// the 10% to a smaller cap (and `tuning.refine` raises it when full batches serve more).
    /// Taking the largest, it is 3%, the noise alone: a size further under the most is slower
    /// on the device itself.
    pub fn tolerance(self) -> f64 {
        match self {
            Prefer::Smaller => 0.10,
            Prefer::Larger => 0.03,
        }
    }

    /// For a model whose CPU sessions have `threads` intra-op threads in all, in a process that
    /// may use `cores` cores (its affinity and cgroup quota, as the standard library reads them).
    pub fn for_threads(threads: usize, cores: usize) -> Prefer {
        if threads >= cores.max(1) {
            Prefer::Larger
        } else {
            Prefer::Smaller
        }
    }
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
    /// Median session run of the timed batches, on the device thread (0 when the run failed).
    pub latency_ms: f64,
    /// `batch` over `latency_ms`: what the session alone would do.
    pub rows_per_second: f64,
    /// Median time a batch takes as served with the next one waiting, as under load: the run,
    /// the split and the replies.
    pub served_ms: f64,
    /// `batch` over `served_ms`: what the choice maximises.
    pub served_rows_per_second: f64,
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
    /// Median over the good sizes of `served_ms - latency_ms`: what serving adds to a batch.
    pub fixed_cost_ms: f64,
    /// The largest good size: the most a device may be given (see `tuning.refine`).
    pub max_good: usize,
    /// The end of the tied sizes chosen: `limits.cores.prefer`, or the larger where the device will
    /// limit a loaded server ([`device_limits_the_server`]).
    pub prefer: Prefer,
}

#[derive(Debug, Error, PartialEq)]
pub enum ProbeError {
    #[error("batch size 1 does not fit: {0}")]
    BatchOneFails(String),
    #[error("cannot start the probe's device thread: {0}")]
    Thread(String),
}

fn is_oom(e: &RunError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("failed to allocate memory") || text.contains("out of memory")
}

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs.get(runs.len() / 2).copied().unwrap_or_default()
}

/// The sweep stops after two sizes in a row that serve more than this fraction under the best.
pub(crate) const TOLERANCE: f64 = 0.05;

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
    /// A size not run because the memory it would take, extrapolated from `from` (what a
    /// batch adds grows with its rows), is over the limit less the headroom, or over the
    /// budget: running it could take the process past a container's limit (and the kernel
    /// kills it) before the reading after it could say so. `None` when it looks like it fits,
    /// or nothing says otherwise.
    fn predicted_over(&mut self, batch: usize, from: &Probe) -> Option<Probe> {
        if from.batch == 0 || batch <= from.batch {
            return None;
        }
        let grown = from.memory_used_bytes.saturating_sub(self.baseline) as f64;
        let more = grown * (batch as f64 / from.batch as f64 - 1.0);
        let used = from.memory_used_bytes as f64 + more;
        let over_limit = from
            .memory_limit_bytes
            .is_some_and(|l| used > l as f64 * (1.0 - self.limits.memory_headroom));
        let over_budget = self
            .limits
            .memory_budget
            .is_some_and(|b| grown + more > b as f64);
        (over_limit || over_budget).then(|| {
            let p = Probe {
                batch,
                outcome: Outcome::OverMemoryBudget,
                latency_ms: 0.0,
                rows_per_second: 0.0,
                served_ms: 0.0,
                served_rows_per_second: 0.0,
                memory_used_bytes: used as u64,
                memory_limit_bytes: from.memory_limit_bytes,
                memory_estimated: true,
                error: Some(format!(
                    "not run: extrapolated from size {} ({} in use), it would take {}",
                    from.batch,
                    mib(from.memory_used_bytes),
                    mib(used as u64)
                )),
            };
            self.probes.push(p.clone());
            p
        })
    }

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
            served_ms: 0.0,
            served_rows_per_second: 0.0,
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
            Ok(m) => {
                let run = median(m.run);
                let served = median(m.served).max(run);
                p.latency_ms = run.as_secs_f64() * 1e3;
                p.rows_per_second = batch as f64 / run.as_secs_f64().max(1e-9);
                p.served_ms = served.as_secs_f64() * 1e3;
                p.served_rows_per_second = batch as f64 / served.as_secs_f64().max(1e-9);
                let grown = mem.used.saturating_sub(self.baseline);
                let over_limit = mem.limit.is_some_and(|l| {
                    mem.used as f64 > l as f64 * (1.0 - self.limits.memory_headroom)
                });
                let over_budget = self.limits.memory_budget.is_some_and(|b| grown > b);
                if over_limit || over_budget {
                    p.outcome = Outcome::OverMemoryBudget;
                } else if self.limits.latency_budget.is_some_and(|l| served > l) {
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
                "one row takes {:.3} ms as served, over the latency budget of {:.3} ms",
                p.served_ms,
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

/// Runs the sweep: sizes 1, 2, 4, … up to the cap, each timed as served (see [`Target`]);
/// stops at the first size that fails (out of memory, memory budget, latency budget, error),
/// after two sizes in a row that serve more than 5% fewer rows/s than the best so far while
/// their session run is at least half their served time, or
/// before the time limit; then bisects between the last good and the first failing size. The
/// choice is a good size within [`Prefer::tolerance`] (10% or 3%) of the most served rows/s,
/// the smallest or the largest of them as `limits.cores.prefer` says, or the largest where the device
/// will limit a loaded server ([`device_limits_the_server`]). With cores left for request
/// handling and a device faster than it, once the device serves no more rows/s a larger cap
/// only lets a closed-loop load's requests merge into fewer, larger batches, which the device
/// runs while the rest of the server waits (the CNN fixture at 32 clients, one ONNX Runtime
/// thread on two cores: caps 16-256, within 1-3% of size 4 in the probe, served 0.77-0.82 of
/// cap 4's rows/s, with 0.4 of a core idle; docs/BENCHMARKS.md). A flood that fills larger
/// batches loses at most the 10% (and `tuning.refine` may raise the cap under it). When the
/// device's threads take every core, request handling shares them, and a larger batch leaves
/// more of them to the device (the same fixture on one core: cap 32 served 1.07 times cap 4).
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
    let mut best = 0.0f64;
    let mut below = 0;
    let mut last_cost = Duration::ZERO;
    for &b in &sizes {
        if b > 1 && !fits_in_time(last_cost) {
            stop = format!("time limit {:?} before size {b}", limits.max_duration);
            break;
        }
        let t0 = Instant::now();
        let predicted = last_good.clone().and_then(|g| s.predicted_over(b, &g));
        let p = match predicted {
            Some(p) => p,
            None => {
                let p = s.probe(b, deadline);
                last_cost = t0.elapsed();
                p
            }
        };
        if p.outcome != Outcome::Ok {
            if b == 1 {
                return Err(ProbeError::BatchOneFails(s.describe_failure(&p)));
            }
            stop = format!("{:?} at size {b}", p.outcome).to_lowercase();
            first_bad = Some(b);
            break;
        }
        // Only a size whose own run sets its pace counts against it: where the run is a small
        // part of the served time (the MLP: 0.006 ms of 0.03-0.06), the hand-offs' wake-ups,
        // which vary from batch to batch, decide its figure, and a sweep stopped on them chose
        // 2 for a model that serves 30 times as many rows/s at 256.
        let paced_by_run = p.latency_ms * 2.0 >= p.served_ms;
        if paced_by_run && p.served_rows_per_second < best * (1.0 - TOLERANCE) {
            below += 1;
        } else {
            below = 0;
        }
        best = best.max(p.served_rows_per_second);
        last_good = Some(p);
        if below >= 2 {
            stop = format!(
                "served rows/s more than {:.0}% under the best twice in a row, at size {b}",
                TOLERANCE * 100.0
            );
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
        let mut from = good.clone();
        while hi - lo > 1 && fits_in_time(last_cost) {
            let mid = lo + (hi - lo) / 2;
            let t0 = Instant::now();
            let p = match s.predicted_over(mid, &from) {
                Some(p) => p,
                None => {
                    let p = s.probe(mid, deadline);
                    last_cost = t0.elapsed();
                    p
                }
            };
            if p.outcome == Outcome::Ok {
                lo = mid;
                from = p;
            } else {
                hi = mid;
            }
        }
    }
    let mut good: Vec<&Probe> = s
        .probes
        .iter()
        .filter(|p| p.outcome == Outcome::Ok)
        .collect();
    good.sort_by_key(|p| p.batch);
    let top = good
        .iter()
        .copied()
        .max_by(|a, b| {
            a.served_rows_per_second
                .total_cmp(&b.served_rows_per_second)
        })
        .expect("batch 1 ran");
    let mut costs: Vec<f64> = good.iter().map(|p| p.served_ms - p.latency_ms).collect();
    costs.sort_by(f64::total_cmp);
    let fixed_cost_ms = costs.get(costs.len() / 2).copied().unwrap_or(0.0).max(0.0);
    let row_ms = top.latency_ms / top.batch.max(1) as f64;
    let Cores { prefer, handling } = limits.cores;
    let bound =
        prefer == Prefer::Smaller && device_limits_the_server(row_ms, fixed_cost_ms, handling);
    let prefer = if bound { Prefer::Larger } else { prefer };
    let floor = top.served_rows_per_second * (1.0 - prefer.tolerance());
    let mut tied = good
        .iter()
        .copied()
        .filter(|p| p.served_rows_per_second >= floor);
    let chosen = match prefer {
        Prefer::Smaller => tied.next(),
        Prefer::Larger => tied.next_back(),
    }
    .unwrap_or(top);
    let end = match (prefer, bound) {
        (Prefer::Smaller, _) => "smallest size (cores are left for request handling)".to_string(),
        (Prefer::Larger, false) => {
            "largest size (the device's threads take every core)".to_string()
        }
        (Prefer::Larger, true) => format!(
            "largest size (the device will limit a loaded server: a row's run, {:.3} ms at size \
             {}, times {:.2} cores for request handling is at least {HANDLING_PER_FIXED_COST} \
             times the {fixed_cost_ms:.3} ms serving adds to a batch)",
            row_ms, top.batch, handling,
        ),
    };
    let reason = format!(
        "{} served rows/s ({:.3} ms a batch, {:.3} ms of it the session run): the {end} \
         within {:.0}% of the most served rows/s ({} at size {}); sweep stopped: {stop}",
        chosen.served_rows_per_second.round(),
        chosen.served_ms,
        chosen.latency_ms,
        prefer.tolerance() * 100.0,
        top.served_rows_per_second.round(),
        top.batch,
    );
    Ok(Sweep {
        chosen: chosen.batch,
        reason,
        prefer,
        max_good: good.last().map_or(1, |p| p.batch),
        probes: s.probes,
        baseline_memory_bytes: baseline,
        duration_ms: started.elapsed().as_secs_f64() * 1e3,
        fixed_cost_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe of `batch` rows whose session run took `latency_ms`, served in `served_ms`.
    fn measured(batch: usize, latency_ms: f64, served_ms: f64) -> Probe {
        Probe {
            batch,
            outcome: Outcome::Ok,
            latency_ms,
            rows_per_second: batch as f64 / latency_ms * 1e3,
            served_ms,
            served_rows_per_second: batch as f64 / served_ms * 1e3,
            memory_used_bytes: 0,
            memory_limit_bytes: None,
            memory_estimated: false,
            error: None,
        }
    }

    #[test]
    fn a_light_model_gives_a_thread_to_request_handling_and_a_heavy_one_keeps_them() {
        // Two threads on two cores, a fixed cost of 0.03 ms (handling a request: about 0.09).
        // Light (the CNN fixture, alone: 0.013 ms a row at size 256): with one thread fewer a
        // row takes at most 0.027 ms, under 0.09, so one thread.
        let light = [
            measured(1, 0.05, 0.08),
            measured(8, 0.18, 0.21),
            measured(256, 3.4, 3.43),
        ];
        let why = one_thread_fewer(&light, 0.03, 2).expect("one thread fewer");
        assert!(why.starts_with("1 intra-op thread(s), not 2"), "{why}");
        assert!(why.contains("size 256"), "{why}");
        // Heavy (0.12 ms a row at two threads: at most 0.24 with one): keeps both.
        let heavy = [measured(1, 0.2, 0.23), measured(16, 1.92, 1.95)];
        assert_eq!(one_thread_fewer(&heavy, 0.03, 2), None);
        // One thread has none to give; with no fixed cost measured the rule does not apply.
        assert_eq!(one_thread_fewer(&light, 0.03, 1), None);
        assert_eq!(one_thread_fewer(&light, 0.0, 2), None);
        // Failed sizes do not count: only the light sizes failed, the heavy one ran.
        let mut mixed = light.to_vec();
        for p in &mut mixed {
            p.outcome = Outcome::OutOfMemory;
        }
        mixed.push(measured(2, 0.5, 0.52));
        assert_eq!(one_thread_fewer(&mixed, 0.03, 2), None);
        // Four threads: one fewer is 4/3 as long at most (0.03 ms a row: 0.04, under 0.09).
        let four = [measured(32, 0.96, 0.99)];
        let why = one_thread_fewer(&four, 0.03, 4).expect("three threads");
        assert!(why.starts_with("3 intra-op thread(s), not 4"), "{why}");
    }

    /// A scripted device: session run time per batch size from a function, plus `cost_ms` of
    /// serving per batch; memory grows by `bytes_per_row` per row of the largest batch run so
    /// far; out of memory from `oom_at` rows.
    struct Scripted {
        latency: fn(usize) -> f64,
        cost_ms: f64,
        /// More served time for some sizes (ms), as thread wake-ups add.
        jitter: fn(usize) -> f64,
        bytes_per_row: u64,
        oom_at: usize,
        peak_rows: usize,
        /// Really take the scripted time (for the time-limit test).
        sleep: bool,
        limit: Option<u64>,
        probed: Vec<usize>,
    }

    impl Target for Scripted {
        fn measure(&mut self, rows: usize, _deadline: Instant) -> Result<Measured, RunError> {
            self.probed.push(rows);
            if rows >= self.oom_at {
                return Err(RunError::Failed(
                    "Failed to allocate memory for requested buffer".into(),
                ));
            }
            self.peak_rows = self.peak_rows.max(rows);
            let run = Duration::from_secs_f64((self.latency)(rows) / 1e3);
            let served = run + Duration::from_secs_f64((self.cost_ms + (self.jitter)(rows)) / 1e3);
            if self.sleep {
                std::thread::sleep(served * 4);
            }
            Ok(Measured {
                served: vec![served; 3],
                run: vec![run; 3],
            })
        }
        fn memory(&mut self) -> MemoryReading {
            MemoryReading {
                used: (100 << 20) + self.peak_rows as u64 * self.bytes_per_row,
                limit: self.limit,
            }
        }
    }

    fn device(latency: fn(usize) -> f64, cost_ms: f64) -> Scripted {
        Scripted {
            latency,
            cost_ms,
            jitter: |_| 0.0,
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
            // No cores for request handling: the device never limits, `prefer` decides.
            cores: Cores {
                prefer: Prefer::Smaller,
                handling: 0.0,
            },
        }
    }

    fn limits_with(prefer: Prefer, handling: f64) -> Limits {
        Limits {
            cores: Cores { prefer, handling },
            ..limits()
        }
    }

    /// Compute-bound: 0.19 ms a row whatever the batch, so the session alone gains nothing
    /// from batching (the case where timing the session picked 1).
    fn flat(rows: usize) -> f64 {
        0.19 * rows as f64
    }

    /// 1 ms fixed cost + 0.1 ms per row: batching pays until the per-row cost dominates.
    fn overhead_bound(rows: usize) -> f64 {
        1.0 + 0.1 * rows as f64
    }

    /// A run that grows faster than its rows (caches overflow): best near 4 rows.
    fn superlinear(rows: usize) -> f64 {
        1.0 + 0.05 * (rows * rows) as f64
    }

    #[test]
    fn flat_compute_with_a_per_batch_cost_picks_a_large_size() {
        // Served rows/s with 0.09 ms a batch: 1→3571, 2→4255, 4→4706, 8→4969, 16→5112,
        // 32→5186, 64→5224, … 256→5253: never falling, so the sweep goes up to the cap; 8 is
        // the first size within 10% of 256's.
        let mut d = device(flat, 0.09);
        let s = sweep(&mut d, &limits()).unwrap();
        assert_eq!(d.probed, vec![1, 2, 4, 8, 16, 32, 64, 128, 256]);
        assert_eq!(s.chosen, 8);
        assert!((s.fixed_cost_ms - 0.09).abs() < 1e-6, "{}", s.fixed_cost_ms);
        assert!(s.reason.contains("reached max_batch_cap"), "{}", s.reason);
        // Timing the session alone, every size does 5263 rows/s: nothing to tell them apart.
        let runs: Vec<f64> = s.probes.iter().map(|p| p.rows_per_second).collect();
        assert!(runs.iter().all(|r| (r - 5263.2).abs() < 1.0), "{runs:?}");
    }

    #[test]
    fn a_run_that_grows_faster_than_its_rows_picks_a_small_size() {
        // Served rows/s: 1→952, 2→1667, 4→2222, 8→1905, 16→1159: two in a row more than 5%
        // below the best, so the sweep stops; 4 is the best.
        let mut d = device(superlinear, 0.0);
        let s = sweep(&mut d, &limits()).unwrap();
        assert_eq!(d.probed, vec![1, 2, 4, 8, 16]);
        assert!(s.reason.contains("under the best twice"), "{}", s.reason);
        assert_eq!(s.chosen, 4);
        assert_eq!(s.max_good, 16);
    }

    /// 0.3 ms a batch, 0.1 ms a row and a little more for large batches: served rows/s
    /// 16→8365, 32→9011, 64→9269, 128→9196, 256→8773.
    fn flat_top(rows: usize) -> f64 {
        0.3 + 0.1 * rows as f64 + 0.00005 * (rows * rows) as f64
    }

    #[test]
    fn the_smallest_size_within_the_tolerance_of_the_most_is_chosen() {
        // 16 serves within 10% of 64, the most (8365 against 9269); 128 within 1%. The rule
        // before these ("the largest size within 5% of the most") chose 128, and under a
        // closed-loop load with cores to spare such a cap only merges requests into larger
        // batches.
        let mut d = device(flat_top, 0.0);
        let s = sweep(&mut d, &limits()).unwrap();
        assert_eq!(d.probed, vec![1, 2, 4, 8, 16, 32, 64, 128, 256]);
        assert_eq!(s.chosen, 16);
        assert_eq!(s.max_good, 256);
        assert!(
            s.reason
                .contains("smallest size (cores are left for request handling) within 10% of the most served rows/s (9269 at size 64)"),
            "{}",
            s.reason
        );
        // Overhead-bound: served rows/s still grow at the cap (9624 at 256); 128 (9275) is the
        // smallest within 10% of it.
        let mut d = device(overhead_bound, 0.0);
        let s = sweep(&mut d, &limits()).unwrap();
        assert_eq!(s.chosen, 128);
        assert!(
            s.reason.contains("reached max_batch_cap 256"),
            "{}",
            s.reason
        );
    }

    #[test]
    fn the_largest_size_within_the_tolerance_is_chosen_when_the_device_takes_every_core() {
        // The same device: 32 (9011), 64 (9269) and 128 (9196) are within 3% of the most; 256
        // (8773) is not.
        let mut d = device(flat_top, 0.0);
        let s = sweep(&mut d, &limits_with(Prefer::Larger, 0.0)).unwrap();
        assert_eq!(s.chosen, 128);
        assert!(
            s.reason.contains("largest size (the device's threads take every core) within 3% of the most served rows/s (9269 at size 64)"),
            "{}",
            s.reason
        );
        // A latency budget still cuts it: 128's batch takes 13.9 ms, over 10 ms; bisecting
        // between 64 and 128 finds 92 (9.92 ms, 9274 rows/s), the largest within the budget.
        let mut d = device(flat_top, 0.0);
        let s = sweep(
            &mut d,
            &Limits {
                latency_budget: Some(Duration::from_millis(10)),
                ..limits_with(Prefer::Larger, 0.0)
            },
        )
        .unwrap();
        assert_eq!(s.chosen, 92);
        assert!(s
            .probes
            .iter()
            .any(|p| p.batch == 128 && p.outcome == Outcome::OverLatencyBudget));
    }

    #[test]
    fn the_largest_tied_size_is_chosen_when_the_device_will_limit_a_loaded_server() {
        // Flat compute, 0.19 ms a row, 0.09 ms of serving a batch (served rows/s 8→4969,
        // 16→5112, … 256→5253). With one core for request handling, a row's 0.19 ms is under
        // 3 × 0.09 ms: handling requests limits the server, so the smallest within 10% (8).
        let with = |cores| limits_with(Prefer::Smaller, cores);
        let mut d = device(flat, 0.09);
        let s = sweep(&mut d, &with(1.0)).unwrap();
        assert_eq!((s.chosen, s.prefer), (8, Prefer::Smaller), "{}", s.reason);
        // With two: 0.38 ms ≥ 0.27 ms, the device limits, and the largest size within 3% of
        // the most is chosen.
        let mut d = device(flat, 0.09);
        let s = sweep(&mut d, &with(2.0)).unwrap();
        assert_eq!((s.chosen, s.prefer), (256, Prefer::Larger), "{}", s.reason);
        assert!(
            s.reason.contains(
                "largest size (the device will limit a loaded server: a row's run, 0.190 ms at \
                 size 256, times 2.00 cores for request handling is at least 3 times the 0.090 \
                 ms serving adds to a batch) within 3%"
            ),
            "{}",
            s.reason
        );
        // A latency budget still bounds it: 32's batch takes 6.17 ms, over 4 ms; bisecting
        // between 16 and 32 finds 20 (3.89 ms), the largest within the budget.
        let mut d = device(flat, 0.09);
        let s = sweep(
            &mut d,
            &Limits {
                latency_budget: Some(Duration::from_millis(4)),
                ..with(2.0)
            },
        )
        .unwrap();
        assert_eq!((s.chosen, s.prefer), (20, Prefer::Larger), "{}", s.reason);
        // Where the device's threads take every core the rule is that one's.
        let mut d = device(flat, 0.09);
        let s = sweep(&mut d, &limits_with(Prefer::Larger, 8.0)).unwrap();
        assert!(
            s.reason.contains("the device's threads take every core"),
            "{}",
            s.reason
        );
        // No per-batch cost measured: no estimate of request handling, and the rule stays off.
        let mut d = device(flat, 0.0);
        let s = sweep(&mut d, &with(2.0)).unwrap();
        assert_eq!(s.prefer, Prefer::Smaller, "{}", s.reason);
    }

    #[test]
    fn the_device_takes_every_core_when_its_threads_are_as_many_as_the_cores() {
        assert_eq!(Prefer::for_threads(1, 1), Prefer::Larger);
        assert_eq!(Prefer::for_threads(2, 2), Prefer::Larger);
        assert_eq!(Prefer::for_threads(3, 2), Prefer::Larger);
        assert_eq!(Prefer::for_threads(1, 2), Prefer::Smaller);
        // A GPU session has no intra-op threads: the cores are left to request handling.
        assert_eq!(Prefer::for_threads(0, 1), Prefer::Smaller);
        assert_eq!(Prefer::for_threads(0, 0), Prefer::Smaller);
    }

    /// An MLP-like device: runs of 0.006-0.057 ms, 0.03 ms of hand-offs a batch, and 0.3 ms
    /// more at sizes 4 and 8 (wake-ups that came late).
    #[test]
    fn sizes_slowed_by_their_hand_offs_do_not_stop_the_sweep() {
        let mut d = device(|rows| 0.006 + 0.0002 * rows as f64, 0.03);
        d.jitter = |rows| if rows == 4 || rows == 8 { 0.3 } else { 0.0 };
        let s = sweep(&mut d, &limits()).unwrap();
        // Served rows/s 2 → 54.9k, 4 → 11.9k, 8 → 23.7k: two in a row under the best, which
        // stopped the sweep before (and 2 was chosen), but their runs are a fiftieth of it.
        // 256 serves 2.9M.
        assert_eq!(d.probed, vec![1, 2, 4, 8, 16, 32, 64, 128, 256]);
        assert_eq!(s.chosen, 256, "{}", s.reason);
        // The same device with its runs setting the pace stops where they fall.
        let mut d = device(superlinear, 0.03);
        d.jitter = |rows| if rows == 4 || rows == 8 { 0.3 } else { 0.0 };
        let s = sweep(&mut d, &limits()).unwrap();
        assert!(s.reason.contains("under the best twice"), "{}", s.reason);
    }

    #[test]
    fn a_latency_budget_cuts_the_size() {
        // 0.19 ms a row + 0.09 ms a batch; 2 ms allows 10 rows (1.99 ms), not 11 (2.18 ms).
        let mut d = device(flat, 0.09);
        let mut l = limits();
        l.latency_budget = Some(Duration::from_millis(2));
        let s = sweep(&mut d, &l).unwrap();
        assert_eq!(d.probed, vec![1, 2, 4, 8, 16, 12, 10, 11]);
        // 10 rows serve the most within the budget (5025 rows/s); 4 is within 10% of it (4706).
        assert_eq!(s.max_good, 10);
        assert_eq!(s.chosen, 4);
        assert!(
            s.reason.contains("overlatencybudget at size 16"),
            "{}",
            s.reason
        );
    }

    #[test]
    fn out_of_memory_bisects_between_the_last_good_and_first_bad_size() {
        let mut d = device(overhead_bound, 0.0);
        d.oom_at = 40;
        let s = sweep(&mut d, &limits()).unwrap();
        assert_eq!(d.probed, vec![1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 39]);
        // 39 serves the most (7959 rows/s), 32 within 10% of it (7619).
        assert_eq!(s.chosen, 32);
        assert_eq!(s.max_good, 39);
        assert!(s.reason.contains("outofmemory at size 64"), "{}", s.reason);
        assert_eq!(
            s.probes
                .iter()
                .filter(|p| p.outcome == Outcome::OutOfMemory)
                .count(),
            3
        );
    }

    /// A doubled size whose memory, extrapolated, would go past the container's limit is not
    /// run: a real run could get the process killed before its reading said so.
    #[test]
    fn a_size_that_would_go_past_the_limit_is_not_run() {
        let mut d = device(overhead_bound, 0.0);
        // The headroom leaves 140 MiB: 40 rows on top of the 100 MiB baseline.
        d.limit = Some((140.5 * 1048576.0 / 0.85) as u64);
        let s = sweep(&mut d, &limits()).unwrap();
        assert!(d.probed.iter().all(|&b| b <= 40), "{:?}", d.probed);
        assert!(!d.probed.contains(&64));
        // 40 serves the most (8000 rows/s), 32 within 10% of it (7619).
        assert_eq!(s.max_good, 40);
        assert_eq!(s.chosen, 32);
    }

    #[test]
    fn a_memory_budget_picks_a_smaller_size() {
        let mut d = device(overhead_bound, 0.0);
        let mut l = limits();
        l.memory_budget = Some(20 << 20); // 1 MiB per row: at most 20 rows
        let s = sweep(&mut d, &l).unwrap();
        // 32 rows would break the budget (extrapolated from 16 rows' 16 MiB) and is not run;
        // neither are 24, 22 and 21. 20 is run and fits.
        assert_eq!(d.probed, vec![1, 2, 4, 8, 16, 20]);
        // 20 serves the most (6667 rows/s), 16 within 10% of it (6154).
        assert_eq!(s.max_good, 20);
        assert_eq!(s.chosen, 16);
        let not_run: Vec<usize> = s
            .probes
            .iter()
            .filter(|p| p.error.as_deref().is_some_and(|e| e.starts_with("not run")))
            .map(|p| p.batch)
            .collect();
        assert_eq!(not_run, vec![32, 24, 22, 21]);
        assert!(s
            .probes
            .iter()
            .filter(|p| p.batch > 16)
            .all(|p| p.memory_estimated));
        let mut d = device(overhead_bound, 0.0);
        d.limit = Some((110.5 * 1048576.0 / 0.85) as u64); // headroom leaves 110.5 MiB: 10 rows
        let s = sweep(&mut d, &limits()).unwrap();
        assert_eq!(s.chosen, 10);
    }

    #[test]
    fn a_latency_budget_below_batch_two_picks_one() {
        let mut d = device(overhead_bound, 0.0);
        let mut l = limits();
        l.latency_budget = Some(Duration::from_micros(1150)); // 1 row 1.1 ms, 2 rows 1.2 ms
        let s = sweep(&mut d, &l).unwrap();
        assert_eq!(s.chosen, 1);
        assert_eq!(s.probes[1].outcome, Outcome::OverLatencyBudget);
    }

    #[test]
    fn an_impossible_budget_is_an_error_naming_the_figures() {
        let mut d = device(overhead_bound, 0.05);
        let mut l = limits();
        l.latency_budget = Some(Duration::from_micros(10));
        let e = sweep(&mut d, &l).unwrap_err().to_string();
        assert!(
            e.contains("1.150 ms as served") && e.contains("0.010 ms"),
            "{e}"
        );
        let mut d = device(overhead_bound, 0.0);
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
        let mut d = device(overhead_bound, 0.0);
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
