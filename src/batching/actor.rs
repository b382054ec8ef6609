//! The batcher actor: one tokio task per model. It owns the [`State`], forms a batch when a
//! device has a free slot and the batch is full or has waited `max_queue_delay`, and hands it to
//! the device worker. It exits when the handlers' channel closes and the queue is empty.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::device::{DeviceCommand, RunDone, RunError, RunJob};
use crate::dispatch::{DevicePool, InFlight, Pick};
use crate::metrics::Metrics;

use super::{Entry, InferError, State};

pub(super) struct Settings {
    pub model: String,
    pub max_queue_delay: Duration,
    pub batchable: bool,
}

/// While parts wait for a busy device, look at the queue this often to drop those whose client
/// left or whose deadline passed.
const SWEEP: Duration = Duration::from_millis(50);

pub(super) async fn run(
    mut rx: mpsc::Receiver<Entry>,
    pool: Arc<DevicePool>,
    settings: Settings,
    metrics: Arc<Metrics>,
) {
    let mut state: State<Entry> = State::new();
    let mut open = true;
    let depth = metrics.queue_depth.with_label_values(&[&settings.model]);
    loop {
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
        depth.set(state.len() as i64);
        if state.is_empty() {
            if !open {
                break;
            }
            match rx.recv().await {
                Some(e) => state.push(e),
                None => open = false,
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
                let max = reservation.slot.max_batch;
                let due = oldest + settings.max_queue_delay;
                if !open || now >= due || state.batch_full(max, settings.batchable) {
                    let batch = state.take_batch(max, settings.batchable);
                    let rows = batch.iter().map(|e| e.rows).sum();
                    let inflight = reservation.start(&pool, rows);
                    send_batch(batch, rows, inflight, &settings.model, &metrics);
                    continue;
                }
                // Not full and not due: give the slot back and wait for more rows.
                drop(reservation);
                wake = Some(wake.map_or(due, |w| w.min(due)));
            }
            Pick::Busy => {}
        }
        let sleep = tokio::time::sleep_until(wake.unwrap_or(now + SWEEP).into());
        tokio::select! {
            e = rx.recv(), if open => match e {
                Some(e) => state.push(e),
                None => open = false,
            },
            _ = &mut notified => {}
            _ = sleep => {}
        }
    }
    depth.set(0);
    for d in pool.devices() {
        let _ = d.sender().send(DeviceCommand::Stop).await;
    }
}

/// Hands a batch to its device worker; the worker answers every part.
fn send_batch(
    batch: Vec<Entry>,
    rows: usize,
    inflight: InFlight,
    model: &str,
    metrics: &Arc<Metrics>,
) {
    let slot = inflight.slot().clone();
    metrics
        .batch_size
        .with_label_values(&[model])
        .observe(rows as f64);
    let span = tracing::info_span!("batch", model, device = %slot.name, rows, parts = batch.len());
    for e in &batch {
        span.follows_from(&e.span);
    }
    let mut parts = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for e in batch {
        parts.push(e.inputs);
        replies.push((e.reply, e.permit));
    }
    let (model, metrics) = (model.to_string(), metrics.clone());
    let done: RunDone = Box::new(move |result, elapsed| {
        let device = inflight.slot().name.as_str();
        let labels = [model.as_str(), device];
        inflight.slot().record(rows, elapsed, result.is_ok());
        metrics
            .inference_duration
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        match result {
            Ok(outputs) => {
                metrics
                    .device_rows
                    .with_label_values(&labels)
                    .inc_by(rows as u64);
                for ((reply, _permit), out) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(e) => {
                metrics.device_failures.with_label_values(&labels).inc();
                for (reply, _permit) in replies {
                    let _ = reply.send(Err(InferError::Run(e.clone())));
                }
            }
        }
        drop(inflight);
    });
    let job = RunJob { parts, span, done };
    if let Err(err) = slot.sender().try_send(DeviceCommand::Run(job)) {
        // The device's job slots make a full channel impossible; a closed one means its worker
        // thread is gone.
        let (TrySendError::Full(cmd) | TrySendError::Closed(cmd)) = err;
        if let DeviceCommand::Run(job) = cmd {
            tracing::error!(device = %slot.name, "device worker is not running");
            (job.done)(
                Err(RunError::Failed(format!(
                    "device {} is not running",
                    slot.name
                ))),
                Duration::ZERO,
            );
        }
    }
}
