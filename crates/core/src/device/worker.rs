//! The device worker: one named OS thread per (model, device, instance) that owns a runner and
//! loops on `blocking_recv` over [`DeviceCommand`]s.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::stamp::Stamp;
use crate::tensor::Tensor;

use super::{ModelRunner, RunError};

/// Called on the worker thread when a job ends: the outputs split per part (in part order), or
/// the error; how long the run took; and the job's inputs back (so a failed batch can be retried
/// elsewhere without a copy).
pub(crate) type RunDone =
    Box<dyn FnOnce(Result<Vec<Vec<Tensor>>, RunError>, Duration, Vec<Vec<Tensor>>) + Send>;

/// One batch for a device.
pub(crate) struct RunJob {
    /// Per request part, the inputs in model order. Parts are run as one batch.
    pub parts: Vec<Vec<Tensor>>,
    /// The batch's span, entered on the worker so its log lines carry the request ids.
    pub span: tracing::Span,
    pub done: RunDone,
    /// When the device's current run started: set while this job runs (the batcher's watchdog
    /// reads it).
    pub clock: Arc<Stamp>,
}

pub(crate) enum DeviceCommand {
    Run(RunJob),
    /// Sent by the batcher after its last batch: the worker exits once it gets here.
    Stop,
}

/// Handle to a running worker thread.
pub(crate) struct DeviceWorker {
    /// Batcher → worker. The worker exits on [`DeviceCommand::Stop`] or when every sender is gone.
    tx: mpsc::Sender<DeviceCommand>,
    thread: JoinHandle<()>,
}

impl DeviceWorker {
    /// Starts the thread. `depth` is how many jobs may wait for it; the batcher limits what
    /// it sends with its own per-device slots, so sends never wait.
    pub(crate) fn spawn(
        name: &str,
        runner: Box<dyn ModelRunner>,
        rebuild: Option<Rebuild>,
        padding: Option<Padding>,
        depth: usize,
    ) -> std::io::Result<DeviceWorker> {
        let (tx, rx) = mpsc::channel(depth.max(1));
        let thread = std::thread::Builder::new()
            .name(format!("ortserve-{name}"))
            .spawn(move || worker_loop(runner, rebuild, padding, rx))?;
        Ok(DeviceWorker { tx, thread })
    }

    pub(crate) fn sender(&self) -> mpsc::Sender<DeviceCommand> {
        self.tx.clone()
    }

    /// Waits for the thread to finish; call after the batcher sent [`DeviceCommand::Stop`].
    pub(crate) fn join(self) {
        drop(self.tx);
        if self.thread.join().is_err() {
            tracing::error!("device worker thread panicked outside a run");
        }
    }
}

/// Builds a fresh runner for the same model and device, after a panic left the old one in an
/// unknown state.
pub type Rebuild = Box<dyn Fn() -> Result<Box<dyn ModelRunner>, String> + Send>;

/// Batch-size buckets for a device: a batch is padded with zero rows up to the next size, so
/// the session only ever sees those sizes (each one warmed up before readiness).
pub(crate) struct Padding {
    /// Ascending; the last is the device's batch size.
    pub sizes: Vec<usize>,
    /// `ortserve_padded_rows_total{model,device}`.
    pub padded: prometheus::IntCounter,
}

impl Padding {
    /// Zero rows to add to a batch of `rows` rows.
    fn extra_rows(&self, rows: usize) -> usize {
        self.sizes
            .iter()
            .find(|&&b| b >= rows)
            .map_or(0, |b| b - rows)
    }
}

/// `rows` rows of zeros shaped like the part `like` (zero bytes are 0, 0.0 or false in every
/// datatype).
fn zero_rows(like: &[Tensor], rows: usize) -> Vec<Tensor> {
    like.iter()
        .map(|t| {
            let mut shape = t.shape.clone();
            let row_bytes = match shape.first() {
                Some(&n) if n > 0 => t.data.len() / n,
                _ => 0,
            };
            if let Some(first) = shape.first_mut() {
                *first = rows;
            }
            Tensor {
                dtype: t.dtype,
                shape,
                data: vec![0; rows * row_bytes].into(),
            }
        })
        .collect()
}

fn worker_loop(
    mut runner: Box<dyn ModelRunner>,
    rebuild: Option<Rebuild>,
    padding: Option<Padding>,
    mut rx: mpsc::Receiver<DeviceCommand>,
) {
    // `Stop` or a closed channel ends the loop.
    while let Some(DeviceCommand::Run(job)) = rx.blocking_recv() {
        if !run_job(runner.as_mut(), padding.as_ref(), job) {
            continue;
        }
        if let Some(rebuild) = &rebuild {
            match rebuild() {
                Ok(fresh) => {
                    runner = fresh;
                    tracing::warn!("session rebuilt after the panic");
                }
                Err(e) => tracing::error!(error = %e, "could not rebuild the session"),
            }
        }
    }
}

/// The worker loop over a borrowed runner, without padding or rebuilds: the startup probe runs
/// its timed batches through it on a thread of its own (`tuning`), so what it measures is the
/// device thread's path: the run, the split and the replies, and the hand-offs it waits for.
pub(crate) fn serve_borrowed(runner: &mut dyn ModelRunner, mut rx: mpsc::Receiver<DeviceCommand>) {
    while let Some(DeviceCommand::Run(job)) = rx.blocking_recv() {
        run_job(runner, None, job);
    }
}

/// Runs one job on `runner`: pads it to its bucket, runs it (a panic is caught and becomes a
/// failed run), splits the outputs per part and calls the job's `done`. Returns whether the
/// runner panicked (its state is then unknown).
fn run_job(runner: &mut dyn ModelRunner, padding: Option<&Padding>, job: RunJob) -> bool {
    let RunJob {
        mut parts,
        span,
        done,
        clock,
    } = job;
    let _entered = span.enter();
    let started = Instant::now();
    clock.set();
    let mut rows: Vec<usize> = parts
        .iter()
        .map(|p| p.first().and_then(Tensor::rows).unwrap_or(1))
        .collect();
    // Padding rides along as one more part, whose outputs are dropped.
    let extra = match (padding, parts.first()) {
        (Some(p), Some(first)) => {
            let extra = p.extra_rows(rows.iter().sum());
            if extra > 0 {
                parts.push(zero_rows(first, extra));
                rows.push(extra);
                p.padded.inc_by(extra as u64);
            }
            extra
        }
        _ => 0,
    };
    let mut panicked = false;
    let run = tracing::debug_span!("run", padded_rows = extra).entered();
    let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| runner.run(&parts))) {
        Ok(result) => result,
        Err(panic) => {
            let what = panic_message(panic.as_ref());
            tracing::error!(panic = %what, "model runner panicked");
            panicked = true;
            Err(RunError::Failed(format!("runner panicked: {what}")))
        }
    }
    .and_then(|outputs| split_outputs(outputs, &rows))
    .map(|mut split| {
        if extra > 0 {
            split.pop();
        }
        split
    });
    drop(run);
    if extra > 0 {
        parts.pop();
    }
    let elapsed = started.elapsed();
    clock.clear();
    if let Err(e) = &outcome {
        tracing::warn!(error = %e, "batch failed");
    }
    done(outcome, elapsed, parts);
    panicked
}

/// The message a panic was raised with (`panic!("...")` or a formatted one); empty otherwise.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Splits batched outputs back into the parts' rows, in order.
fn split_outputs(outputs: Vec<Tensor>, rows: &[usize]) -> Result<Vec<Vec<Tensor>>, RunError> {
    if rows.len() == 1 {
        return Ok(vec![outputs]);
    }
    let total: usize = rows.iter().sum();
    for (i, o) in outputs.iter().enumerate() {
        if o.rows() != Some(total) {
            return Err(RunError::Failed(format!(
                "output {i} has shape {:?}, not {total} rows along dim 0, so a batch cannot be split",
                o.shape
            )));
        }
    }
    let mut start = 0;
    Ok(rows
        .iter()
        .map(|&n| {
            let part = outputs.iter().map(|o| o.slice_rows(start, n)).collect();
            start += n;
            part
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_row_order() {
        let out = Tensor::from_f32(vec![3, 1], &[1.0, 2.0, 3.0]).unwrap();
        let parts = split_outputs(vec![out], &[1, 2]).unwrap();
        assert_eq!(parts[0][0].to_f32(), vec![1.0]);
        assert_eq!(parts[1][0].to_f32(), vec![2.0, 3.0]);
        let bad = Tensor::from_f32(vec![2, 1], &[1.0, 2.0]).unwrap();
        assert!(split_outputs(vec![bad], &[1, 2]).is_err());
    }
}
