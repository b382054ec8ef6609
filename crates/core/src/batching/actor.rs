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
    stats: Arc<crate::stats::ModelStats>,
    /// Device workers → batcher: parts to run again. Bounded by the model's queue capacity;
    /// when full (or the batcher is gone) the part is answered with its error instead.
    retry: mpsc::Sender<Entry>,
    threshold: u32,
}

pub(super) async fn run(
    rx: mpsc::UnboundedReceiver<Entry>,
    pool: Arc<DevicePool>,
    settings: Settings,
    metrics: Arc<Metrics>,
    stats: Arc<crate::stats::ModelStats>,
    retry_capacity: usize,
) {
    let (retry_tx, retry_rx) = mpsc::channel::<Entry>(retry_capacity.max(1));
    let ctx = Ctx {
        model: settings.model.clone(),
        metrics: metrics.clone(),
        stats,
        retry: retry_tx,
        threshold: settings.failure_threshold,
    };
    let batcher = Batcher {
        depth: metrics.queue_depth.with_label_values(&[&settings.model]),
        next_probe: Instant::now() + settings.reprobe_interval,
        rx,
        retry_rx,
        pool,
        settings,
        ctx,
        state: State::new(),
        open: true,
        alone: VecDeque::new(),
        sample: None,
        gathered: false,
        gather: Gather::default(),
    };
    batcher.run().await;
}

/// The batcher's state between turns of its loop ([`Batcher::run`]).
struct Batcher {
    /// Handlers → batcher: new request parts.
    rx: mpsc::UnboundedReceiver<Entry>,
    /// Device workers → batcher: parts to run again (see [`Ctx::retry`]).
    retry_rx: mpsc::Receiver<Entry>,
    pool: Arc<DevicePool>,
    settings: Settings,
    ctx: Ctx,
    state: State<Entry>,
    /// False once the handlers' channel has closed (the model is stopping).
    open: bool,
    /// Parts to run alone: retried after a device fault, or split out of a batch whose input
    /// was refused. Served before new batches.
    alone: VecDeque<Entry>,
    /// One row of a real request, kept to probe unhealthy devices with.
    sample: Option<Vec<Tensor>>,
    next_probe: Instant,
    /// Whether the batcher has already let the handlers run once since its last batch went out.
    gathered: bool,
    gather: Gather,
    depth: prometheus::IntGauge,
}

/// What one turn of the loop decided about the queue.
enum Turn {
    /// Something was sent, answered or gathered: look again at once.
    Again,
    /// Nothing to do before `until` (or before rows arrive, a device frees up, or a retry).
    Wait { until: Instant },
}

impl Batcher {
    /// Each turn: take retries and arrivals, look after device health, run the parts that run
    /// alone, answer expired parts, then send a batch or wait. Ends when the handlers are gone,
    /// the queue is empty and every device is idle; then stops the device workers.
    async fn run(mut self) {
        loop {
            while let Ok(e) = self.retry_rx.try_recv() {
                self.alone.push_back(e);
            }
            self.look_after_devices();
            self.run_alone();
            self.take_arrivals();
            self.answer_expired();
            self.depth.set((self.state.len() + self.alone.len()) as i64);
            // Armed before the decision, so a device freed while deciding still wakes the wait.
            let freed = self.pool.freed().clone();
            let notified = freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state.is_empty() {
                self.gathered = false;
                if self.finished() {
                    break;
                }
                let until = self.next_probe.min(Instant::now() + SWEEP * 4);
                // A freed device matters only to parts waiting to run alone, or to the end.
                let watch_freed = !self.alone.is_empty() || !self.open;
                self.wait(notified, until, watch_freed).await;
                continue;
            }
            match self.form_batch().await {
                Turn::Again => {}
                Turn::Wait { until } => {
                    self.wait(notified, until.min(self.next_probe), true).await;
                }
            }
        }
        self.depth.set(0);
        for d in self.pool.devices() {
            let _ = d.sender().send(DeviceCommand::Stop).await;
        }
    }

    /// The watchdog, and every `reprobe_interval` a probe for each unhealthy device.
    fn look_after_devices(&mut self) {
        watchdog(&self.pool, &self.ctx);
        if Instant::now() >= self.next_probe {
            self.next_probe = Instant::now() + self.settings.reprobe_interval;
            if let Some(sample) = &self.sample {
                probe_unhealthy(&self.pool, sample, &self.ctx);
            }
        }
    }

    /// Sends the parts that run alone, each to a device other than the one that failed it,
    /// while devices are free.
    fn run_alone(&mut self) {
        while let Some(e) = self.alone.pop_front() {
            if e.reply.is_closed() {
                continue;
            }
            match self.pool.pick_excluding(e.rows, e.failed_on) {
                Pick::Ready(r) => {
                    let rows = e.rows;
                    let inflight = r.start(&self.pool, rows);
                    send_batch(vec![e], rows, 0, inflight, &self.ctx, "retry");
                }
                Pick::Busy => {
                    self.alone.push_front(e);
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
    }

    /// Queues every part the handlers have sent.
    fn take_arrivals(&mut self) {
        while self.open {
            match self.rx.try_recv() {
                Ok(e) => self.state.push(e),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.open = false,
            }
        }
    }

    /// Answers 504 to parts whose deadline passed (and drops those whose client left).
    fn answer_expired(&mut self) {
        let dead = self.state.remove_dead(Instant::now());
        for e in dead.expired {
            let _ = e.reply.send(Err(InferError::DeadlineExceeded));
        }
    }

    /// Nothing queued, nothing to retry, no handler left and no run in flight.
    fn finished(&self) -> bool {
        !self.open
            && self.alone.is_empty()
            && self.pool.devices().iter().all(|d| d.inflight_rows() == 0)
    }

    /// Decides about a non-empty queue: send a batch to a free device (full, idle device,
    /// waited long enough, the device about to be free, or draining), take a gathering turn,
    /// or wait.
    async fn form_batch(&mut self) -> Turn {
        let now = Instant::now();
        let oldest = self.state.oldest().unwrap_or(now);
        let sweep = self.state.next_deadline().map(|d| d.min(now + SWEEP));
        let hint = self
            .state
            .next_batch_rows(self.pool.chunk_rows(), self.settings.batchable);
        let reservation = match self.pool.pick(hint) {
            Pick::NoHealthyDevice => {
                for e in self.state.drain() {
                    let _ = e.reply.send(Err(InferError::NoHealthyDevice(
                        self.settings.model.clone(),
                    )));
                }
                return Turn::Again;
            }
            Pick::Busy => {
                return Turn::Wait {
                    until: sweep.unwrap_or(now + SWEEP),
                }
            }
            Pick::Ready(reservation) => reservation,
        };
        let max = reservation.slot.cap();
        // The delay is for a device that is busy, while its next batch fills up; but not past
        // the moment its run is expected to end less a hand-off and a timer tick, so the batch
        // is waiting in the device's second slot when it does. Without that, a cap above what
        // the load fills left the device idle between runs (docs/BENCHMARKS.md, "Tuning for
        // the server").
        let ready_by = reservation.slot.busy_for().and_then(|(left, total)| {
            // A loaded machine wakes the batcher late: for long runs, an eighth of the run as
            // well.
            now.checked_add(left.saturating_sub(HANDOFF.max(total / 8)))
        });
        let delayed = oldest + self.settings.max_queue_delay;
        let due = ready_by.map_or(delayed, |r| r.min(delayed));
        let full = self.state.batch_full(max, self.settings.batchable);
        // An idle device gets what is queued without a timed wait: waiting would only leave it
        // idle.
        let idle = reservation.slot.inflight_rows() == 0;
        if idle && !full && self.open && !self.gathered && self.gather.worth_it() {
            // But first the batcher goes to the back of its worker's queue, so the handlers of
            // requests that have already arrived queue their rows. Without it, on a busy core
            // the batcher, woken by the first handler's send and run next from tokio's LIFO
            // slot, sent an idle device one row at a time (docs/BENCHMARKS.md).
            drop(reservation);
            self.gathered = true;
            self.gather.before = self.state.len();
            to_the_back_of_the_queue().await;
            return Turn::Again;
        }
        if !self.open || now >= due || full || idle {
            if self.gathered {
                self.gather.after(self.state.len());
            }
            self.gathered = false;
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
            let batch = self.state.take_batch(max, self.settings.batchable);
            if self.sample.is_none() {
                self.sample = batch
                    .first()
                    .map(|e| e.inputs.iter().map(|t| t.copy_rows(0, 1)).collect());
            }
            let rows = batch.iter().map(|e| e.rows).sum();
            let inflight = reservation.start(&self.pool, rows);
            send_batch(batch, rows, max, inflight, &self.ctx, reason);
            return Turn::Again;
        }
        // Not full and not due: give the slot back and wait for more rows.
        drop(reservation);
        Turn::Wait {
            until: sweep.map_or(due, |w| w.min(due)),
        }
    }

    /// Waits until `until`, a new part, a part to retry, or (when `watch_freed`) a device
    /// slot freed.
    async fn wait(
        &mut self,
        freed: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        until: Instant,
        watch_freed: bool,
    ) {
        let sleep = tokio::time::sleep_until(until);
        tokio::select! {
            e = self.rx.recv(), if self.open => match e {
                Some(e) => self.state.push(e),
                None => self.open = false,
            },
            Some(e) = self.retry_rx.recv() => self.alone.push_back(e),
            _ = freed, if watch_freed => {}
            _ = sleep => {}
        }
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
        let waited = now.duration_since(e.enqueued);
        queue_time.observe(waited.as_secs_f64());
        ctx.stats.queue.add(1, waited);
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
    let done = BatchDone {
        ctx: ctx.clone(),
        device_index: inflight.index(),
        inflight,
        rows,
        cap,
        metas,
    };
    let done: RunDone = Box::new(move |result, elapsed, parts| done.finish(result, elapsed, parts));
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

/// A batch's completion, called on the device thread when its run ends: the device's health
/// and the metrics are updated, then each part is answered, or handed back to run again.
struct BatchDone {
    ctx: Ctx,
    inflight: InFlight,
    device_index: usize,
    rows: usize,
    /// The cap the batch was formed under (0 for a retry), for the refiner.
    cap: usize,
    /// The batch's parts, their inputs taken out for the run.
    metas: Vec<Entry>,
}

impl BatchDone {
    fn finish(
        self,
        result: Result<Vec<Vec<Tensor>>, RunError>,
        elapsed: Duration,
        parts: Vec<Vec<Tensor>>,
    ) {
        let slot = self.inflight.slot();
        let labels = [self.ctx.model.as_str(), slot.name.as_str()];
        // Only faults of the device count against its health, not refused inputs.
        let device_fault = matches!(result, Err(RunError::Failed(_)));
        if slot.record(self.rows, elapsed, !device_fault, self.ctx.threshold) {
            slot.set_healthy(false);
            tracing::warn!(model = %self.ctx.model, device = %slot.name, failures = self.ctx.threshold, "device failed repeatedly: unhealthy");
        }
        self.ctx
            .metrics
            .inference_duration
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        match result {
            Ok(outputs) => self.answer(outputs, elapsed),
            Err(err) => self.retry_or_answer(err, device_fault, parts),
        }
    }

    /// Answers each part with its outputs, and lets the device's refiner judge the run.
    fn answer(self, outputs: Vec<Vec<Tensor>>, elapsed: Duration) {
        let slot = self.inflight.slot();
        let labels = [self.ctx.model.as_str(), slot.name.as_str()];
        let m = &self.ctx.metrics;
        m.device_rows
            .with_label_values(&labels)
            .inc_by(self.rows as u64);
        self.ctx.stats.ran(self.rows, self.metas.len(), elapsed);
        for (e, out) in self.metas.into_iter().zip(outputs) {
            let _ = e.reply.send(Ok(out));
        }
        if let Some(c) = slot.observe(self.rows, self.cap, elapsed) {
            m.max_batch
                .with_label_values(&labels)
                .set(slot.cap() as i64);
            m.cap_changes
                .with_label_values(&[labels[0], labels[1], c.why])
                .inc();
            tracing::info!(model = %self.ctx.model, device = %slot.name, from = c.from, to = c.to, why = c.why, rows_per_second = c.rows_per_second, "batch cap refined");
        }
    }

    /// The retry policy. A device fault: each part once more, elsewhere. A refused input in a
    /// shared batch: each part alone, to find whose it was. Otherwise, or when the batcher
    /// cannot take the part back, the error is the answer.
    fn retry_or_answer(self, err: RunError, device_fault: bool, parts: Vec<Vec<Tensor>>) {
        if device_fault {
            let slot = self.inflight.slot();
            self.ctx
                .metrics
                .device_failures
                .with_label_values(&[self.ctx.model.as_str(), slot.name.as_str()])
                .inc();
        }
        let several = self.metas.len() > 1;
        for (mut e, inputs) in self.metas.into_iter().zip(parts) {
            let again = if device_fault {
                e.failed_on.is_none()
            } else {
                several
            };
            if !again {
                let _ = e.reply.send(Err(InferError::from(err.clone())));
                continue;
            }
            e.inputs = inputs;
            if device_fault {
                e.failed_on = Some(self.device_index);
            }
            e.last_error = Some(err.clone());
            if let Err(TrySendError::Full(e) | TrySendError::Closed(e)) = self.ctx.retry.try_send(e)
            {
                let _ = e.reply.send(Err(InferError::from(err.clone())));
            }
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
