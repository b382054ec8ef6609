//! Per-model inference statistics as the V2 statistics extension reports them (Triton's
//! `/v2/models/{m}/stats`): requests that succeeded or failed and how long they took, time in
//! the queue, time in the device run, and per batch size the runs and their time. Counted with
//! atomics on the request and device paths; read when a client asks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A count and the nanoseconds they took together.
#[derive(Debug, Default)]
pub struct Tally {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Tally {
    /// Adds `count` events that took `took` together.
    pub fn add(&self, count: u64, took: Duration) {
        self.count.fetch_add(count, Ordering::Relaxed);
        self.ns.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// (count, nanoseconds).
    pub fn read(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.ns.load(Ordering::Relaxed),
        )
    }
}

/// One model version's statistics.
#[derive(Debug, Default)]
pub struct ModelStats {
    /// Requests answered with their outputs, from arrival to answer.
    pub success: Tally,
    /// Requests that failed after they reached the model (refused inputs, a full queue, a
    /// deadline, a failed run), from arrival to the error.
    pub fail: Tally,
    /// Request parts, from entering the queue to their batch going to a device.
    pub queue: Tally,
    /// Request parts, the device run of the batch that carried them (input assembly and output
    /// copies included: ONNX Runtime's run does both).
    pub compute_infer: Tally,
    /// Rows inferred (a request of 3 rows counts 3).
    pub inference_count: AtomicU64,
    /// Device runs.
    pub execution_count: AtomicU64,
    /// When the last request succeeded, in milliseconds since the Unix epoch.
    pub last_inference_ms: AtomicU64,
    /// Per batch size (rows run together), the runs and their time.
    batches: Mutex<BTreeMap<usize, (u64, u64)>>,
}

/// A reading of [`ModelStats`], as the front doors report it. Each pair is (count,
/// nanoseconds). Input assembly and output copies happen inside ONNX Runtime's run, so they are
/// in `compute_infer`; a front door reports `compute_input` and `compute_output` with its count
/// and 0 ns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub last_inference_ms: u64,
    pub inference_count: u64,
    pub execution_count: u64,
    pub success: (u64, u64),
    pub fail: (u64, u64),
    pub queue: (u64, u64),
    pub compute_infer: (u64, u64),
    /// Per batch size: (size, runs, nanoseconds), smallest first.
    pub batches: Vec<(usize, u64, u64)>,
}

impl ModelStats {
    /// Everything, read now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            last_inference_ms: self.last_inference_ms.load(Ordering::Relaxed),
            inference_count: self.inference_count.load(Ordering::Relaxed),
            execution_count: self.execution_count.load(Ordering::Relaxed),
            success: self.success.read(),
            fail: self.fail.read(),
            queue: self.queue.read(),
            compute_infer: self.compute_infer.read(),
            batches: self.batches(),
        }
    }

    /// A request answered with its outputs after `took`.
    pub fn succeeded(&self, took: Duration) {
        self.success.add(1, took);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_inference_ms
            .store(now.as_millis() as u64, Ordering::Relaxed);
    }

    /// A device run of `rows` rows for `parts` request parts that took `took`.
    pub fn ran(&self, rows: usize, parts: usize, took: Duration) {
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        self.inference_count
            .fetch_add(rows as u64, Ordering::Relaxed);
        self.compute_infer.add(parts as u64, took * parts as u32);
        let mut b = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        let e = b.entry(rows).or_default();
        e.0 += 1;
        e.1 += u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    }

    /// Per batch size: (size, runs, nanoseconds), smallest first.
    pub fn batches(&self) -> Vec<(usize, u64, u64)> {
        self.batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&size, &(runs, ns))| (size, runs, ns))
            .collect()
    }
}
