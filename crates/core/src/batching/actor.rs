//! The batcher actor: one tokio task per model. It owns the [`State`], forms a batch when a
//! device has a free slot and the batch is full, the device is idle, or the oldest part has
//! waited `max_queue_delay`, and hands it to the device worker; for an idle device it first lets
//! the handlers that are ready run, so requests that arrived together share the batch. It
//! exits when the handlers' channel closes and the queue is empty.
//!
//! Faults: a batch that fails for a reason other than its input comes back here and each part is
//! run once more, alone, on another healthy device; a batch that ONNX Runtime refused for its
//! input is split and each part run alone, so one bad request does not fail its batch mates.
//! After `failure_threshold` failures in a row a device turns unhealthy; every
//! `reprobe_interval` an unhealthy device gets a one-row probe and turns healthy when it passes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::device::{DeviceCommand, RunDone, RunError, RunJob};
use crate::dispatch::{DevicePool, InFlight, Pick};
use crate::metrics::Metrics;
use crate::tensor::Tensor;

use super::{Entry, InferError, State};

pub(super) struct Settings {
    pub model: String,
    pub max_queue_delay: Duration,
    pub batchable: bool,
    pub failure_threshold: u32,
    pub reprobe_interval: Duration,
}

/// While parts wait for a busy device, look at the queue this often to drop those whose client
/// left or whose deadline passed.
const SWEEP: Duration = Duration::from_millis(50);

/// What a batch's completion needs besides the pool.
#[derive(Clone)]
struct Ctx {
    model: String,
    metrics: Arc<Metrics>,
    /// Device workers → batcher: parts to run again. Bounded by the model's queue capacity;
    /// when full (or the batcher is gone) the part is answered with its error instead.
    retry: mpsc::Sender<Entry>,
    threshold: u32,
}

pub(super) async fn run(
    mut rx: mpsc::UnboundedReceiver<Entry>,
    pool: Arc<DevicePool>,
    settings: Settings,
    metrics: Arc<Metrics>,
    retry_capacity: usize,
) {
    let mut state: State<Entry> = State::new();
    let mut open = true;
    let depth = metrics.queue_depth.with_label_values(&[&settings.model]);
    let (retry_tx, mut retry_rx) = mpsc::channel::<Entry>(retry_capacity.max(1));
    let ctx = Ctx {
        model: settings.model.clone(),
        metrics: metrics.clone(),
        retry: retry_tx,
        threshold: settings.failure_threshold,
    };
    // Parts to run alone: retried after a device fault, or split out of a batch whose input was
    // refused. Served before new batches.
    let mut alone: VecDeque<Entry> = VecDeque::new();
    // One row of a real request, kept to probe unhealthy devices with.
    let mut sample: Option<Vec<Tensor>> = None;
    let mut next_probe = Instant::now() + settings.reprobe_interval;
    // Whether the batcher has already let the handlers run once since its last batch went out.
    let mut gathered = false;
    let mut gather = Gather::default();
    loop {
        while let Ok(e) = retry_rx.try_recv() {
            alone.push_back(e);
        }
        watchdog(&pool, &ctx);
        if Instant::now() >= next_probe {
            next_probe = Instant::now() + settings.reprobe_interval;
            if let Some(sample) = &sample {
                probe_unhealthy(&pool, sample, &ctx);
            }
        }
        // Parts that run alone first, each on a device other than the one that failed it.
        while let Some(e) = alone.pop_front() {
            if e.reply.is_closed() {
                continue;
            }
            match pool.pick_excluding(e.rows, e.failed_on) {
                Pick::Ready(r) => {
                    let rows = e.rows;
                    let inflight = r.start(&pool, rows);
                    send_batch(vec![e], rows, 0, inflight, &ctx, "retry");
                }
                Pick::Busy => {
                    alone.push_front(e);
                    break;
                }
                Pick::NoHealthyDevice => {
                    let err = e
                        .last_error
                        .clone()
                        .unwrap_or_else(|| RunError::Failed("no other healthy device".into()));
                    let _ = e.reply.send(Err(InferError::from(err)));
                }
            }
        }
        while open {
            match rx.try_recv() {
                Ok(e) => state.push(e),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let now = Instant::now();
        let dead = state.remove_dead(now);
        for e in dead.expired {
            let _ = e.reply.send(Err(InferError::DeadlineExceeded));
        }
        depth.set((state.len() + alone.len()) as i64);
        if state.is_empty() {
            gathered = false;
            if !open && alone.is_empty() && pool.devices().iter().all(|d| d.inflight_rows() == 0) {
                break;
            }
            let freed = pool.freed().clone();
            let notified = freed.notified();
            let idle = tokio::time::sleep_until(next_probe.min(Instant::now() + SWEEP * 4));
            tokio::select! {
                e = rx.recv(), if open => match e {
                    Some(e) => state.push(e),
                    None => open = false,
                },
                Some(e) = retry_rx.recv() => alone.push_back(e),
                _ = notified, if !alone.is_empty() || !open => {}
                _ = idle => {}
            }
            continue;
        }

        let freed = pool.freed().clone();
        let notified = freed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let oldest = state.oldest().unwrap_or(now);
        let mut wake = state.next_deadline().map(|d| d.min(now + SWEEP));
        let hint = state.next_batch_rows(pool.chunk_rows(), settings.batchable);
        match pool.pick(hint) {
            Pick::NoHealthyDevice => {
                for e in state.drain() {
                    let _ = e
                        .reply
                        .send(Err(InferError::NoHealthyDevice(settings.model.clone())));
                }
                continue;
            }
            Pick::Ready(reservation) => {
                let max = reservation.slot.cap();
                // The delay is for a device that is busy, while its next batch fills up; but
                // not past the moment its run is expected to end less a hand-off and a timer tick,
                // so the batch is waiting in the device's second slot when it does. Without that, a cap above
                // what the load fills left the device idle between runs: the CNN fixture at 32
                // clients served 24,000 rows/s with caps of 32 to 256 and 28,000 with 16
                // (docs/BENCHMARKS.md, "Tuning for the server").
                let ready_by = reservation.slot.busy_for().and_then(|(left, total)| {
                    // A loaded machine wakes the batcher late: for long runs, an eighth of
                    // the run as well.
                    now.checked_add(left.saturating_sub(HANDOFF.max(total / 8)))
                });
                let delayed = oldest + settings.max_queue_delay;
                let due = ready_by.map_or(delayed, |r| r.min(delayed));
                let full = state.batch_full(max, settings.batchable);
                // An idle device gets what is queued without a timed wait: waiting would only
                // leave it idle.
                let idle = reservation.slot.inflight_rows() == 0;
                let send = !open || now >= due || full || idle;
                if idle && !full && open && !gathered && gather.worth_it() {
                    // But first the batcher goes to the back of its worker's queue, so the
                    // handlers of requests that have already arrived queue their rows. Without
                    // it, on a busy core the batcher, woken by the first handler's send and run
                    // next from tokio's LIFO slot, sent an idle device one row at a time (1.3
                    // rows per batch for the bench's MLP at 32 clients; docs/BENCHMARKS.md).
                    drop(reservation);
                    gathered = true;
                    gather.before = state.len();
                    to_the_back_of_the_queue().await;
                    continue;
                }
                if send {
                    if gathered {
                        gather.after(state.len());
                    }
                    gathered = false;
                    let reason = if full {
                        "full"
                    } else if idle {
                        "idle"
                    } else if now >= delayed {
                        "delay"
                    } else if now >= due {
                        "ahead"
                    } else {
                        "drain"
                    };
                    let batch = state.take_batch(max, settings.batchable);
                    if sample.is_none() {
                        sample = batch
                            .first()
                            .map(|e| e.inputs.iter().map(|t| t.copy_rows(0, 1)).collect());
                    }
                    let rows = batch.iter().map(|e| e.rows).sum();
                    let inflight = reservation.start(&pool, rows);
                    send_batch(batch, rows, max, inflight, &ctx, reason);
                    continue;
                }
                // Not full and not due: give the slot back and wait for more rows.
                drop(reservation);
                wake = Some(wake.map_or(due, |w| w.min(due)));
            }
            Pick::Busy => {}
        }
        let wake = wake.unwrap_or(now + SWEEP).min(next_probe);
        let sleep = tokio::time::sleep_until(wake);
        tokio::select! {
            e = rx.recv(), if open => match e {
                Some(e) => state.push(e),
                None => open = false,
            },
            Some(e) = retry_rx.recv() => alone.push_back(e),
            _ = &mut notified => {}
            _ = sleep => {}
        }
    }
    depth.set(0);
    for d in pool.devices() {
        let _ = d.sender().send(DeviceCommand::Stop).await;
    }
}

/// How long before a busy device's run is expected to end its next batch is sent (at least; an
/// eighth of the run for long runs), so that the batch is in the device's second slot when the
/// run ends: the batcher's wake-up and the device thread's, and a tick of tokio's timer (they
/// fire on whole milliseconds, so a wake-up set for 50 µs before the end could come after it).
const HANDOFF: Duration = Duration::from_micros(1050);

/// Whether the gathering turn (the batcher going to the back of its worker's queue before it
/// sends an idle device a batch that is not full) gathers anything. Under a light load it does
/// not, and only delays each lone request by a turn of the scheduler (a cap of 256 against one
/// of 1 at one client: p50 0.201 against 0.176 ms). After 8 turns in a row that gathered
/// nothing it is skipped, except once every 32 batches, to look again.
#[derive(Debug, Default)]
struct Gather {
    /// Turns in a row that gathered nothing.
    fruitless: u32,
    /// Turns skipped since the last one taken.
    skipped: u32,
    /// Parts queued when the current turn started.
    before: usize,
}

impl Gather {
    fn worth_it(&mut self) -> bool {
        if self.fruitless < 8 {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= 32 {
            self.skipped = 0;
            return true;
        }
        false
    }

    /// The turn ended with `queued` parts queued.
    fn after(&mut self, queued: usize) {
        if queued > self.before {
            self.fruitless = 0;
        } else {
            self.fruitless = self.fruitless.saturating_add(1);
        }
    }
}

/// Lets every task already in the worker's queue run once, then resumes: a task that wakes
/// itself while it runs is put at the back of the queue. Not `tokio::task::yield_now`, which
/// waits until the worker's queue is empty and it has polled for I/O: beside clients streaming
/// 13 MiB bodies that deferred small requests' batches by milliseconds (the normal client's p99
/// in `scripts/hostile.py` went from about 22 ms to 33-44 ms), and it gathered fewer rows.
pub(super) async fn to_the_back_of_the_queue() {
    let mut woken = false;
    std::future::poll_fn(|cx| {
        if woken {
            return std::task::Poll::Ready(());
        }
        woken = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// Marks unhealthy every healthy device whose current run has gone on past its `run_timeout`,
/// so the dispatcher sends new batches elsewhere. The batcher looks at least every
/// `4 × SWEEP`. The stuck run's requests are answered 504 at their deadlines by their
/// handlers; when it returns at last, the device stays out until it passes a probe.
fn watchdog(pool: &DevicePool, ctx: &Ctx) {
    for d in pool.devices() {
        if !d.is_healthy() {
            continue;
        }
        if let Some(took) = d.stalled() {
            d.set_healthy(false);
            ctx.metrics
                .device_failures
                .with_label_values(&[ctx.model.as_str(), d.name.as_str()])
                .inc();
            tracing::error!(model = %ctx.model, device = %d.name, running_for = ?took, limit = ?d.run_timeout, "a run did not return within the watchdog limit: device unhealthy");
        }
    }
}

/// Sends a one-row probe to every unhealthy device with a free slot; one that runs it turns
/// healthy again.
fn probe_unhealthy(pool: &DevicePool, sample: &[Tensor], ctx: &Ctx) {
    for (i, d) in pool.devices().iter().enumerate() {
        if d.is_healthy() {
            continue;
        }
        let Some(r) = pool.reserve(i) else { continue };
        let inflight = r.start(pool, 1);
        let model = ctx.model.clone();
        let done: RunDone = Box::new(move |result, elapsed, _parts| {
            let slot = inflight.slot();
            // A refused input still shows the device works.
            let works = !matches!(result, Err(RunError::Failed(_)));
            if works {
                slot.record(1, elapsed, true, 1);
                slot.set_healthy(true);
                tracing::info!(model, device = %slot.name, "device passed its probe: healthy again");
            } else {
                tracing::debug!(model, device = %slot.name, "device failed its probe");
            }
        });
        let span = tracing::info_span!("probe", model = %ctx.model, device = %d.name);
        let job = RunJob {
            parts: vec![sample.to_vec()],
            span,
            done,
            clock: d.running.clone(),
        };
        if d.sender().try_send(DeviceCommand::Run(job)).is_err() {
            tracing::warn!(device = %d.name, "could not send a probe");
        }
    }
}

/// Hands a batch to its device worker; the worker answers every part (or hands failed parts
/// back through `ctx.retry`).
///
/// `reason` says why the batch closed: `full`, `idle` (the device had nothing to do), `delay`
/// (waited `max_queue_delay`), `ahead` (the device's run is about to end), `drain` (shutting
/// down), or `retry` (a part run alone after a failure). `cap` is the device's cap it was formed under (0 for a retry), for the refiner.
fn send_batch(
    batch: Vec<Entry>,
    rows: usize,
    cap: usize,
    inflight: InFlight,
    ctx: &Ctx,
    reason: &str,
) {
    let slot = inflight.slot().clone();
    let model = ctx.model.as_str();
    let m = &ctx.metrics;
    m.batch_size
        .with_label_values(&[model])
        .observe(rows as f64);
    m.batches.with_label_values(&[model, reason]).inc();
    let queue_time = m.queue_duration.with_label_values(&[model]);
    let now = Instant::now();
    for e in &batch {
        queue_time.observe(now.duration_since(e.enqueued).as_secs_f64());
    }
    // The requests' ids go on the batch span, so the worker's log lines name them.
    let ids: Vec<String> = batch.iter().filter_map(|e| e.request_id.clone()).collect();
    let span = tracing::info_span!("batch", model, device = %slot.name, rows, parts = batch.len(), request_ids = %ids.join(","));
    for e in &batch {
        span.follows_from(&e.span);
    }
    let mut parts = Vec::with_capacity(batch.len());
    let mut metas = Vec::with_capacity(batch.len());
    for mut e in batch {
        parts.push(std::mem::take(&mut e.inputs));
        metas.push(e);
    }
    let ctx = ctx.clone();
    let device_index = inflight.index();
    let done: RunDone = Box::new(move |result, elapsed, parts| {
        let slot = inflight.slot();
        let labels = [ctx.model.as_str(), slot.name.as_str()];
        // Only faults of the device count against its health, not refused inputs.
        let device_fault = matches!(result, Err(RunError::Failed(_)));
        if slot.record(rows, elapsed, !device_fault, ctx.threshold) {
            slot.set_healthy(false);
            tracing::warn!(model = %ctx.model, device = %slot.name, failures = ctx.threshold, "device failed repeatedly: unhealthy");
        }
        ctx.metrics
            .inference_duration
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        match result {
            Ok(outputs) => {
                ctx.metrics
                    .device_rows
                    .with_label_values(&labels)
                    .inc_by(rows as u64);
                for (e, out) in metas.into_iter().zip(outputs) {
                    let _ = e.reply.send(Ok(out));
                }
                if let Some(c) = slot.observe(rows, cap, elapsed) {
                    let m = &ctx.metrics;
                    m.max_batch
                        .with_label_values(&labels)
                        .set(slot.cap() as i64);
                    m.cap_changes
                        .with_label_values(&[labels[0], labels[1], c.why])
                        .inc();
                    tracing::info!(model = %ctx.model, device = %slot.name, from = c.from, to = c.to, why = c.why, rows_per_second = c.rows_per_second, "batch cap refined");
                }
            }
            Err(err) => {
                if device_fault {
                    ctx.metrics.device_failures.with_label_values(&labels).inc();
                }
                let several = metas.len() > 1;
                for (mut e, inputs) in metas.into_iter().zip(parts) {
                    // A fault: once more elsewhere. A refused input in a shared batch: alone, to
                    // find whose it was. Otherwise: the error is the answer.
                    let again = if device_fault {
                        e.failed_on.is_none()
                    } else {
                        several
                    };
                    if again {
                        e.inputs = inputs;
                        if device_fault {
                            e.failed_on = Some(device_index);
                        }
                        e.last_error = Some(err.clone());
                        match ctx.retry.try_send(e) {
                            Ok(()) => continue,
                            Err(TrySendError::Full(e) | TrySendError::Closed(e)) => {
                                let _ = e.reply.send(Err(InferError::from(err.clone())));
                            }
                        }
                    } else {
                        let _ = e.reply.send(Err(InferError::from(err.clone())));
                    }
                }
            }
        }
    });
    let job = RunJob {
        parts,
        span,
        done,
        clock: slot.running.clone(),
    };
    if let Err(err) = slot.sender().try_send(DeviceCommand::Run(job)) {
        // The device's job slots make a full channel impossible; a closed one means its worker
        // thread is gone.
        let (TrySendError::Full(cmd) | TrySendError::Closed(cmd)) = err;
        if let DeviceCommand::Run(job) = cmd {
            tracing::error!(device = %slot.name, "device worker is not running");
            let parts = job.parts;
            (job.done)(
                Err(RunError::Failed(format!(
                    "device {} is not running",
                    slot.name
                ))),
                Duration::ZERO,
                parts,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Gather;

    #[test]
    fn fruitless_gathering_turns_are_skipped_but_tried_again_every_32_batches() {
        let mut g = Gather::default();
        for _ in 0..8 {
            assert!(g.worth_it());
            g.before = 1;
            g.after(1);
        }
        let taken: Vec<bool> = (0..64).map(|_| g.worth_it()).collect();
        assert_eq!(taken.iter().filter(|&&t| t).count(), 2, "{taken:?}");
        assert!(taken[31] && taken[63]);
        // A turn that gathers a part turns it back on.
        g.before = 1;
        g.after(3);
        assert!((0..10).all(|_| g.worth_it()));
    }
}
