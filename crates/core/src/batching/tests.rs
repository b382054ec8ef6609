//! The batcher's timing on tokio's paused clock: no sleeping, and the instants are exact.

use std::sync::mpsc as std_mpsc;
use std::sync::Mutex;

use super::*;
use crate::config::DispatchPolicy;
use crate::model::TensorInfo;
use crate::tensor::DataType;

/// Echoes its input; each run first waits for a token on `gate` (or for the gate to close).
struct Gated(Mutex<std_mpsc::Receiver<()>>);

impl ModelRunner for Gated {
    fn run(&mut self, parts: &[Vec<Tensor>]) -> Result<Vec<Tensor>, RunError> {
        let _ = self.0.lock().map(|g| g.recv());
        let firsts: Vec<&Tensor> = parts.iter().map(|p| &p[0]).collect();
        Ok(vec![
            Tensor::concat(&firsts).map_err(|e| RunError::Failed(e.to_string()))?
        ])
    }
}

fn info() -> ModelInfo {
    let t = |n: &str| TensorInfo {
        name: n.into(),
        dtype: DataType::F32,
        dims: vec![-1, 1],
    };
    ModelInfo {
        inputs: vec![t("x")],
        outputs: vec![t("y")],
    }
}

fn row(v: f32) -> Vec<(String, Tensor)> {
    vec![("x".into(), Tensor::from_f32(vec![1, 1], &[v]).unwrap())]
}

/// Model `m` on one gated device of `max_batch` rows; send a token on the sender (or drop it)
/// to let runs through.
fn gated(
    max_batch: usize,
    max_queue_delay: Duration,
) -> (ModelHandle, ModelOwner, std_mpsc::Sender<()>, Arc<Metrics>) {
    let (open, gate) = std_mpsc::channel();
    let metrics = Arc::new(Metrics::new());
    let settings = BatchSettings::new(max_queue_delay, 16, Duration::from_secs(30));
    let runner = DeviceRunner {
        run_timeout: std::time::Duration::from_secs(30),
        refine: None,
        name: "cpu:0".into(),
        max_batch,
        buckets: Vec::new(),
        runner: Box::new(Gated(Mutex::new(gate))),
        rebuild: None,
    };
    let (handle, owner) = ModelHandle::start(
        "m",
        "1",
        info(),
        DispatchPolicy::LeastLoaded,
        settings,
        vec![runner],
        metrics.clone(),
    )
    .unwrap();
    (handle, owner, open, metrics)
}

/// Lets other tasks run (and the paused clock move 1 ms at a time) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{what} did not happen within 1 s of the paused clock");
}

#[tokio::test(start_paused = true)]
async fn a_busy_devices_next_batch_closes_after_max_queue_delay() {
    let (handle, owner, open, metrics) = gated(8, Duration::from_millis(100));
    let infer = |v: f32| {
        let h = handle.clone();
        tokio::spawn(async move { h.infer(row(v), &Call::default()).await })
    };
    // The idle device takes the first request at once, and holds it at the gate.
    let a = infer(1.0);
    until("the first run", || handle.devices()[0].inflight_rows == 1).await;
    // Two more arrive together. The device has a free job slot but is busy, so their batch
    // waits up to max_queue_delay for more rows, then closes with both.
    let queued = Instant::now();
    let (b, c) = (infer(2.0), infer(3.0));
    until("the second batch", || {
        handle.devices()[0].inflight_rows == 3
    })
    .await;
    let waited = queued.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_millis(110),
        "the batch closed after {waited:?}, not at max_queue_delay (100 ms)"
    );
    let closed = |reason: &str| metrics.batches.with_label_values(&["m", reason]).get();
    assert_eq!((closed("idle"), closed("delay"), closed("full")), (1, 1, 0));
    // From here the device thread runs for real; the paused clock would jump to the
    // handlers' deadlines while the runtime waits for it.
    tokio::time::resume();
    drop(open);
    for (task, want) in [(a, 1.0), (b, 2.0), (c, 3.0)] {
        let out = task.await.unwrap().expect("answered");
        assert_eq!(out[0].to_f32(), vec![want], "each request gets its own row");
    }
    owner.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_past_its_deadline_is_answered_504_without_running() {
    // With max_batch 1 every request is its own batch.
    let (handle, owner, open, _) = gated(1, Duration::ZERO);
    let infer = |v: f32, timeout: Option<Duration>| {
        let h = handle.clone();
        let call = Call {
            timeout,
            ..Call::default()
        };
        tokio::spawn(async move { h.infer(row(v), &call).await })
    };
    // Two requests fill the device's two job slots; the third waits in the queue.
    let held = [infer(1.0, None), infer(2.0, None)];
    until("both slots busy", || handle.devices()[0].inflight_rows == 2).await;
    let queued = Instant::now();
    let hurried = infer(3.0, Some(Duration::from_millis(250)));
    let answer = hurried.await.unwrap();
    let waited = queued.elapsed();
    assert!(
        matches!(answer, Err(InferError::DeadlineExceeded)),
        "{answer:?}"
    );
    // Swept from the queue within the batcher's sweep period (50 ms) after its deadline.
    assert!(
        waited >= Duration::from_millis(250) && waited <= Duration::from_millis(300),
        "answered after {waited:?}"
    );
    // From here the device thread runs for real; the paused clock would jump to the
    // handlers' deadlines while the runtime waits for it.
    tokio::time::resume();
    drop(open);
    for task in held {
        task.await.unwrap().expect("answered");
    }
    assert_eq!(
        handle.devices()[0].rows_run,
        2,
        "the expired request never ran"
    );
    owner.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_running_request_past_its_deadline_is_answered_504_and_frees_its_place() {
    let (handle, owner, open, _) = gated(1, Duration::ZERO);
    let start = Instant::now();
    let call = Call {
        timeout: Some(Duration::from_millis(300)),
        started: Some(start),
        ..Call::default()
    };
    let task = tokio::spawn({
        let h = handle.clone();
        async move { h.infer(row(1.0), &call).await }
    });
    until("running", || handle.devices()[0].inflight_rows == 1).await;
    let answer = task.await.unwrap();
    let took = start.elapsed();
    assert!(
        matches!(answer, Err(InferError::DeadlineExceeded)),
        "{answer:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took <= Duration::from_millis(301),
        "answered after {took:?}"
    );
    assert_eq!(
        handle.0.admission.free(),
        16,
        "its place in the queue is free while the run goes on"
    );
    assert_eq!(
        handle.devices()[0].inflight_rows,
        1,
        "the run itself goes on"
    );
    drop(open);
    owner.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_deadline_counts_from_arrival() {
    let (handle, owner, open, _) = gated(1, Duration::ZERO);
    // Arrived 400 ms ago (reading its body, preprocessing) with a 300 ms deadline.
    let started = Instant::now();
    tokio::time::advance(Duration::from_millis(400)).await;
    let call = Call {
        timeout: Some(Duration::from_millis(300)),
        started: Some(started),
        ..Call::default()
    };
    let answer = handle.infer(row(1.0), &call).await;
    assert!(
        matches!(answer, Err(InferError::DeadlineExceeded)),
        "{answer:?}"
    );
    assert_eq!(handle.devices()[0].rows_run, 0, "it never ran");
    drop(open);
    owner.shutdown().await;
}

/// Requests that arrive together at an idle device share its first batch, even with no queue
/// delay. On a busy tokio worker the batcher is woken by the first request's send and runs next
/// (tokio's LIFO slot), before the other arrivals' handlers; it lets them run once before it
/// closes a batch for an idle device (before, the first batch had one row).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn requests_arriving_together_at_an_idle_device_share_its_batch() {
    const N: usize = 8;
    let (handle, owner, open, metrics) = gated(N, Duration::ZERO);
    for _ in 0..N {
        open.send(()).unwrap();
    }
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (h, go, waiting) = (handle.clone(), go.clone(), waiting.clone());
            tokio::spawn(async move {
                let turn = go.acquire();
                waiting.fetch_add(1, Ordering::SeqCst);
                let _turn = turn.await.unwrap();
                h.infer(row(i as f32), &Call::default()).await
            })
        })
        .collect();
    // Let every task reach the semaphore, then release them all at once from a task on the
    // worker, as the I/O driver there makes many connections' handlers ready at once.
    until("every request waiting", || {
        waiting.load(Ordering::SeqCst) == N
    })
    .await;
    let release = go.clone();
    tokio::spawn(async move { release.add_permits(N) })
        .await
        .unwrap();
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap().expect("answered");
        assert_eq!(out[0].to_f32(), vec![i as f32]);
    }
    let sizes = metrics.batch_size.with_label_values(&["m"]);
    assert_eq!(
        (sizes.get_sample_count(), sizes.get_sample_sum()),
        (1, N as f64),
        "the {N} requests ran in one batch"
    );
    drop(open);
    owner.shutdown().await;
}

/// The batcher's turn for an idle device is one pass over the worker's queue, not a wait until
/// the queue is empty: a task that is always ready (as a handler streaming a big body is) must
/// not hold a small request's batch back for tokio's maintenance interval (61 polls).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_busy_task_on_the_worker_does_not_hold_back_an_idle_devices_batch() {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    let (handle, owner, open, metrics) = gated(8, Duration::ZERO);
    open.send(()).unwrap();
    let polls = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Polls of the busy task between the request's send and its batch going to the device.
    let waited = Arc::new(AtomicUsize::new(usize::MAX));
    let sent_at = Arc::new(AtomicUsize::new(usize::MAX));
    let busy = tokio::spawn({
        let (polls, stop, waited, sent_at, metrics) = (
            polls.clone(),
            stop.clone(),
            waited.clone(),
            sent_at.clone(),
            metrics.clone(),
        );
        async move {
            while !stop.load(Ordering::SeqCst) {
                let n = polls.fetch_add(1, Ordering::SeqCst);
                let sent = sent_at.load(Ordering::SeqCst);
                let batches = metrics
                    .batch_size
                    .with_label_values(&["m"])
                    .get_sample_count();
                if batches > 0 && sent != usize::MAX && waited.load(Ordering::SeqCst) == usize::MAX
                {
                    waited.store(n - sent, Ordering::SeqCst);
                }
                actor::to_the_back_of_the_queue().await;
            }
        }
    });
    let request = tokio::spawn({
        let (h, polls, sent_at) = (handle.clone(), polls.clone(), sent_at.clone());
        async move {
            // The send happens in this same poll, before the task first waits.
            sent_at.store(polls.load(Ordering::SeqCst), Ordering::SeqCst);
            h.infer(row(1.0), &Call::default()).await
        }
    });
    request.await.unwrap().expect("answered");
    stop.store(true, Ordering::SeqCst);
    busy.await.unwrap();
    let waited = waited.load(Ordering::SeqCst);
    assert!(
        waited <= 4,
        "the batch went out {waited} polls of the busy task after the request was queued"
    );
    drop(open);
    owner.shutdown().await;
}

/// A request queued for a device that has a free job slot and rows slow enough to be worth
/// starting at once, in a process with more than one core, tells its thread so
/// (`call::take_batcher_can_start`); one queued while both of the device's slots are taken, or
/// for a device that runs rows fast, does not.
#[tokio::test(start_paused = true)]
async fn a_request_that_a_free_slow_device_can_start_says_so() {
    use crate::call::take_batcher_can_start;
    use std::future::Future;
    use std::task::Poll;
    let (handle, owner, open, _) = gated(1, Duration::ZERO);
    // The first poll of a request queues it, then it waits for its answer.
    let queue = |v: f32| {
        let h = handle.clone();
        async move {
            let mut f = Box::pin(async move { h.infer(row(v), &Call::default()).await });
            let first = std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await;
            assert!(first.is_pending());
            (take_batcher_can_start(), f)
        }
    };
    take_batcher_can_start();
    // On one core nothing would run beside the caller: never said (see `more_than_one_core`).
    let cores = crate::dispatch::more_than_one_core();
    // A device with no batch finished yet, both slots free.
    let (said, a) = queue(1.0).await;
    assert_eq!(said, cores, "a free device with no rate yet");
    let a = tokio::spawn(a);
    until("the first run", || handle.devices()[0].inflight_rows == 1).await;
    let (said, b) = queue(2.0).await;
    assert_eq!(said, cores, "one slot still free");
    let b = tokio::spawn(b);
    until("the second batch", || {
        handle.devices()[0].inflight_rows == 2
    })
    .await;
    // Both slots taken: the batcher could not send it anywhere now.
    let (said, c) = queue(3.0).await;
    assert!(!said, "both of the device's slots are taken");
    let c = tokio::spawn(c);
    tokio::time::resume();
    for _ in 0..3 {
        open.send(()).unwrap();
    }
    for t in [a, b, c] {
        t.await.unwrap().expect("answered");
    }
    // A device that runs rows fast (a million a second): its rows join the next batch instead.
    let device = &handle.0.pool.devices()[0];
    for _ in 0..20 {
        device.record(1_000, Duration::from_millis(1), true, 3);
    }
    assert!(device.rate() > crate::dispatch::OVERLAP_BELOW_ROWS_PER_SECOND);
    let (said, d) = queue(4.0).await;
    assert!(!said, "a fast device");
    open.send(()).unwrap();
    d.await.expect("answered");
    drop(open);
    owner.shutdown().await;
}
