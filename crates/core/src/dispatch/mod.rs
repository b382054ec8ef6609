//! Choosing the device for a batch: `round_robin` or `least_loaded`, skipping unhealthy devices.
//!
//! Each device has a few job slots (one running, one being prepared); a batch is only formed for a
//! device that has a free slot, so the batcher never blocks on a busy device and a batch is sized
//! for the device that will run it. In-flight rows are counted by an RAII guard, so the count
//! cannot drift on errors or cancellation.

mod refine;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::DispatchPolicy;
use crate::device::DeviceCommand;
use crate::stamp::Stamp;

pub use refine::CapChange;
pub use refine::RefineSettings;
use refine::Refiner;

/// Jobs a device may hold at once: one running and one ready to start.
pub(crate) const DEVICE_DEPTH: usize = 2;

/// A device that runs fewer rows a second than this (20 µs or more a row) has rows worth
/// starting while the caller decodes its next request (on a process with more than one core);
/// a faster one (the tiny MLP fixture, a few µs a row in batches) gains more from the rows that
/// arrive meanwhile joining the batch. See [`crate::call::take_batcher_can_start`].
pub(crate) const OVERLAP_BELOW_ROWS_PER_SECOND: f64 = 50_000.0;

/// Whether this process may run on more than one core (its CPU affinity and quota, as
/// `available_parallelism` reads them), looked up once. On one core a run started early
/// overlaps nothing: it only splits the rows that would have shared a batch (the CNN fixture at
/// 16 gRPC callers, the server pinned to one core: 0.74-0.77 of REST binary with the early
/// start, 0.94-0.95 without; docs/BENCHMARKS.md). A GPU's runs would overlap even then; a one-core
/// process driving a GPU does not get the early start.
pub(crate) fn more_than_one_core() -> bool {
    static MORE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MORE.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// One (device, instance) as the dispatcher sees it.
pub(crate) struct DeviceSlot {
    /// `cpu:0`, or `cpu:0#1` for a second instance.
    pub name: String,
    /// The batch size the device started with (tuned or configured). Requests are split into
    /// parts of at most the smallest of these over the pool.
    pub max_batch: usize,
    /// Most rows one batch on this device may have now: `max_batch`, or as the refiner moved it.
    cap: AtomicUsize,
    /// Moves `cap` under sustained load (`tuning.refine`); `None` keeps it at `max_batch`.
    /// Set once, before the first batch; unset, a finished batch takes no lock for it.
    refiner: OnceLock<Mutex<Refiner>>,
    /// The watchdog's limit on one run (see [`DeviceSlot::stalled`]).
    pub run_timeout: Duration,
    /// When the run now on the device started, shared with the device worker, which sets it.
    pub running: Arc<Stamp>,
    healthy: AtomicBool,
    inflight_rows: AtomicUsize,
    /// Measured rows/s (EWMA) as f64 bits; 0 until the first batch finishes.
    rate_bits: AtomicU64,
    /// Free job slots on this device. The batcher takes one per batch; the [`InFlight`] guard
    /// gives it back when the run ends.
    slots: Arc<Semaphore>,
    /// Batcher → device worker.
    tx: mpsc::Sender<DeviceCommand>,
    /// Signalled whenever a job on any device of the pool ends; the batcher waits on it.
    freed: Arc<Notify>,
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    pub failures: AtomicU64,
    /// Failed runs since the last success; at the pool's threshold the device turns unhealthy.
    consecutive_failures: AtomicU32,
}

impl DeviceSlot {
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Release);
        self.freed.notify_one();
    }

    pub(crate) fn inflight_rows(&self) -> usize {
        self.inflight_rows.load(Ordering::Acquire)
    }

    /// Whether the batcher could send this device a batch now (one of its job slots is free),
    /// a row takes it long enough to be worth starting before the caller goes on (at most
    /// [`OVERLAP_BELOW_ROWS_PER_SECOND`] measured, or no batch finished yet), and the process
    /// has more than one core, so that the run can go on beside the caller's thread.
    pub(crate) fn worth_starting_now(&self) -> bool {
        self.slots.available_permits() > 0
            && self.rate() < OVERLAP_BELOW_ROWS_PER_SECOND
            && more_than_one_core()
    }

    /// Measured rows per second, 0.0 before the first batch.
    pub(crate) fn rate(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Ordering::Acquire))
    }

    /// Records a finished batch: counters and the rows/s average. Returns true when this
    /// failure is the one that reaches `threshold` consecutive failures.
    pub(crate) fn record(&self, rows: usize, elapsed: Duration, ok: bool, threshold: u32) -> bool {
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
            let n = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
            return n == threshold.max(1);
        }
        self.consecutive_failures.store(0, Ordering::Release);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        let sample = rows as f64 / elapsed.as_secs_f64().max(1e-6);
        let old = self.rate();
        let new = if old == 0.0 {
            sample
        } else {
            0.7 * old + 0.3 * sample
        };
        self.rate_bits.store(new.to_bits(), Ordering::Release);
        false
    }

    pub(crate) fn sender(&self) -> &mpsc::Sender<DeviceCommand> {
        &self.tx
    }

    /// How long until the device is expected to finish the rows it holds, and how long all of
    /// them take: the rows in flight at the measured rate, less how long the current run has
    /// gone on. `None` before the first batch has been measured.
    pub(crate) fn busy_for(&self) -> Option<(Duration, Duration)> {
        let rate = self.rate();
        if rate.is_nan() || rate <= 0.0 {
            return None;
        }
        let total = Duration::try_from_secs_f64(self.inflight_rows() as f64 / rate).ok()?;
        let running = self.running.elapsed().unwrap_or_default();
        Some((total.saturating_sub(running), total))
    }

    /// Most rows the next batch on this device may have.
    pub(crate) fn cap(&self) -> usize {
        self.cap.load(Ordering::Acquire)
    }

    /// Lets the cap move between `settings.floor` (the startup size) and `settings.ceiling`
    /// from what the device serves under load.
    pub(crate) fn refine(&self, settings: RefineSettings) {
        let r = Refiner::new(settings, tokio::time::Instant::now());
        self.cap.store(r.cap(), Ordering::Release);
        if self.refiner.set(Mutex::new(r)).is_err() {
            tracing::warn!(device = %self.name, "the cap's refiner was set up twice; the first stays");
        }
    }

    /// A batch of `rows` rows sent at cap `cap_at_send` ran for `run` and was answered: the
    /// refiner's evidence. Returns the change of the cap it caused, if any.
    pub(crate) fn observe(
        &self,
        rows: usize,
        cap_at_send: usize,
        run: Duration,
    ) -> Option<CapChange> {
        let mut r = self
            .refiner
            .get()?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let change = r.observe(rows, cap_at_send, run, tokio::time::Instant::now())?;
        self.cap.store(r.cap(), Ordering::Release);
        Some(change)
    }

    /// The refiner's state for the tuning report; `None` when the cap is fixed.
    pub(crate) fn refine_report(&self) -> Option<RefineReport> {
        let r = self
            .refiner
            .get()?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Some(RefineReport {
            cap: r.cap(),
            floor: r.settings().floor,
            ceiling: r.settings().ceiling,
            changes_total: r.changed(),
            changes: r.changes(),
        })
    }

    /// How long the run now on the device has taken, when that is more than its
    /// `run_timeout`.
    pub(crate) fn stalled(&self) -> Option<Duration> {
        self.running.elapsed().filter(|&t| t > self.run_timeout)
    }
}

/// What `tuning.refine` did on one device, as `GET /v1/models/{m}/tuning` serves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RefineReport {
    /// The cap now.
    pub cap: usize,
    /// The startup size: the cap never goes below it.
    pub floor: usize,
    /// The largest size the probe ran within its limits: the cap never goes above it.
    pub ceiling: usize,
    pub changes_total: u64,
    /// The last 32 changes, oldest first.
    pub changes: Vec<CapChange>,
}

/// A free job slot on a chosen device, not yet used.
pub(crate) struct Reservation {
    pub slot: Arc<DeviceSlot>,
    index: usize,
    permit: OwnedSemaphorePermit,
}

/// Counts a batch's rows as in flight on its device until dropped (after its run ends, or
/// when the job is dropped unrun). Dropping frees the device's job slot and wakes the batcher.
pub(crate) struct InFlight {
    slot: Arc<DeviceSlot>,
    /// The device's place in its pool.
    index: usize,
    rows: usize,
    /// `Some` until drop, which releases it before waking the batcher.
    permit: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    pub(crate) fn slot(&self) -> &Arc<DeviceSlot> {
        &self.slot
    }

    pub(crate) fn index(&self) -> usize {
        self.index
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slot
            .inflight_rows
            .fetch_sub(self.rows, Ordering::AcqRel);
        // Free the slot before the wake-up, so the woken batcher finds it free.
        drop(self.permit.take());
        self.slot.freed.notify_one();
    }
}

/// What the batcher should do next.
pub(crate) enum Pick {
    Ready(Reservation),
    /// Every healthy device (or the one whose turn it is) is full; wait for `freed`.
    Busy,
    NoHealthyDevice,
}

/// The devices of one model.
pub(crate) struct DevicePool {
    devices: Vec<Arc<DeviceSlot>>,
    policy: DispatchPolicy,
    /// Round robin: index of the device whose turn it is.
    next: AtomicUsize,
    /// Shared with every slot; see [`DeviceSlot::freed`].
    freed: Arc<Notify>,
}

impl DevicePool {
    pub(crate) fn new(policy: DispatchPolicy) -> DevicePool {
        DevicePool {
            devices: Vec::new(),
            policy,
            next: AtomicUsize::new(0),
            freed: Arc::new(Notify::new()),
        }
    }

    pub(crate) fn add(
        &mut self,
        name: String,
        max_batch: usize,
        run_timeout: Duration,
        tx: mpsc::Sender<DeviceCommand>,
    ) -> Arc<DeviceSlot> {
        let slot = Arc::new(DeviceSlot {
            name,
            max_batch: max_batch.max(1),
            cap: AtomicUsize::new(max_batch.max(1)),
            refiner: OnceLock::new(),
            run_timeout,
            running: Arc::new(Stamp::default()),
            healthy: AtomicBool::new(true),
            inflight_rows: AtomicUsize::new(0),
            rate_bits: AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(DEVICE_DEPTH)),
            tx,
            freed: self.freed.clone(),
            batches: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
        });
        self.devices.push(slot.clone());
        slot
    }

    pub(crate) fn devices(&self) -> &[Arc<DeviceSlot>] {
        &self.devices
    }

    pub(crate) fn freed(&self) -> &Arc<Notify> {
        &self.freed
    }

    pub(crate) fn any_healthy(&self) -> bool {
        self.devices.iter().any(|d| d.is_healthy())
    }

    /// The largest request part that every device can take in one batch.
    pub(crate) fn chunk_rows(&self) -> usize {
        self.devices.iter().map(|d| d.max_batch).min().unwrap_or(1)
    }

    /// Chooses a device for a batch of about `rows` rows.
    pub(crate) fn pick(&self, rows: usize) -> Pick {
        self.pick_excluding(rows, None)
    }

    /// A free job slot on `index`, whatever its health (for health probes).
    pub(crate) fn reserve(&self, index: usize) -> Option<Reservation> {
        let slot = self.devices.get(index)?;
        slot.slots
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|permit| Reservation {
                slot: slot.clone(),
                index,
                permit,
            })
    }

    /// Like [`DevicePool::pick`], never choosing device `avoid` (where a batch just failed).
    pub(crate) fn pick_excluding(&self, rows: usize, avoid: Option<usize>) -> Pick {
        let n = self.devices.len();
        let usable = |i: usize| self.devices[i].is_healthy() && Some(i) != avoid;
        if !(0..n).any(usable) {
            return Pick::NoHealthyDevice;
        }
        let reserve = |index: usize| self.reserve(index);
        match self.policy {
            DispatchPolicy::RoundRobin => {
                let start = self.next.load(Ordering::Acquire);
                let turn = (0..n).map(|k| (start + k) % n).find(|&i| usable(i));
                match turn.and_then(reserve) {
                    Some(r) => Pick::Ready(r),
                    None => Pick::Busy,
                }
            }
            DispatchPolicy::LeastLoaded => {
                let known = self.devices.iter().map(|d| d.rate()).fold(0.0, f64::max);
                let mut order: Vec<(f64, usize)> = self
                    .devices
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| usable(*i))
                    .map(|(i, d)| {
                        let inflight = d.inflight_rows();
                        let estimate = match d.rate() {
                            r if r > 0.0 => (inflight + rows) as f64 / r,
                            // Never measured and idle: try it, so every device gets measured.
                            _ if inflight == 0 => 0.0,
                            _ if known > 0.0 => (inflight + rows) as f64 / known,
                            _ => (inflight + rows) as f64,
                        };
                        (estimate, i)
                    })
                    .collect();
                order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                match order.into_iter().find_map(|(_, i)| reserve(i)) {
                    Some(r) => Pick::Ready(r),
                    None => Pick::Busy,
                }
            }
        }
    }
}

impl Reservation {
    /// Commits the reservation for a batch of `rows` rows: counts them in flight and, for round
    /// robin, passes the turn on.
    pub(crate) fn start(self, pool: &DevicePool, rows: usize) -> InFlight {
        self.slot.inflight_rows.fetch_add(rows, Ordering::AcqRel);
        pool.next.store(
            (self.index + 1) % pool.devices.len().max(1),
            Ordering::Release,
        );
        InFlight {
            slot: self.slot,
            index: self.index,
            rows,
            permit: Some(self.permit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(policy: DispatchPolicy, n: usize) -> (DevicePool, Vec<mpsc::Receiver<DeviceCommand>>) {
        let mut p = DevicePool::new(policy);
        let mut rxs = Vec::new();
        for i in 0..n {
            let (tx, rx) = mpsc::channel(4);
            p.add(format!("cpu:{i}"), 8, Duration::from_secs(30), tx);
            rxs.push(rx);
        }
        (p, rxs)
    }

    fn picked(p: &DevicePool, rows: usize) -> Option<InFlight> {
        match p.pick(rows) {
            Pick::Ready(r) => Some(r.start(p, rows)),
            _ => None,
        }
    }

    #[test]
    fn round_robin_takes_turns_and_waits_for_the_device_whose_turn_it_is() {
        let (p, _rx) = pool(DispatchPolicy::RoundRobin, 2);
        let a = picked(&p, 1).unwrap();
        let b = picked(&p, 1).unwrap();
        assert_eq!(
            (a.slot().name.as_str(), b.slot().name.as_str()),
            ("cpu:0", "cpu:1")
        );
        let c = picked(&p, 1).unwrap();
        assert_eq!(c.slot().name, "cpu:0");
        // cpu:1 has one slot left, cpu:0 none: it is cpu:1's turn.
        let d = picked(&p, 1).unwrap();
        assert_eq!(d.slot().name, "cpu:1");
        // Both full now.
        assert!(matches!(p.pick(1), Pick::Busy));
        drop(a);
        assert_eq!(picked(&p, 1).unwrap().slot().name, "cpu:0");
    }

    #[test]
    fn round_robin_skips_unhealthy_devices() {
        let (p, _rx) = pool(DispatchPolicy::RoundRobin, 3);
        p.devices()[1].set_healthy(false);
        let names: Vec<String> = (0..4)
            .map(|_| {
                let f = picked(&p, 1).unwrap();
                f.slot().name.clone()
            })
            .collect();
        assert_eq!(names, ["cpu:0", "cpu:2", "cpu:0", "cpu:2"]);
        for d in p.devices() {
            d.set_healthy(false);
        }
        assert!(matches!(p.pick(1), Pick::NoHealthyDevice));
    }

    #[test]
    fn consecutive_failures_reach_the_threshold_once_and_exclusion_works() {
        let (p, _rx) = pool(DispatchPolicy::LeastLoaded, 2);
        let d = &p.devices()[0];
        assert!(!d.record(1, Duration::ZERO, false, 3));
        assert!(!d.record(1, Duration::ZERO, false, 3));
        assert!(
            !d.record(1, Duration::from_millis(1), true, 3),
            "a success resets the count"
        );
        assert!(!d.record(1, Duration::ZERO, false, 3));
        assert!(!d.record(1, Duration::ZERO, false, 3));
        assert!(d.record(1, Duration::ZERO, false, 3));
        assert!(!d.record(1, Duration::ZERO, false, 3), "reported once");
        for _ in 0..3 {
            assert_eq!(picked_excluding(&p, Some(0)).unwrap().slot().name, "cpu:1");
        }
        p.devices()[1].set_healthy(false);
        assert!(matches!(
            p.pick_excluding(1, Some(0)),
            Pick::NoHealthyDevice
        ));
        assert!(
            matches!(p.pick(1), Pick::Ready(_)),
            "cpu:0 is still healthy"
        );
    }

    #[test]
    fn round_robin_skips_the_device_to_avoid() {
        let (p, _rx) = pool(DispatchPolicy::RoundRobin, 2);
        // It is cpu:0's turn, but the batch just failed there.
        let a = picked_excluding(&p, Some(0)).unwrap();
        let b = picked_excluding(&p, Some(0)).unwrap();
        assert_eq!(
            (a.slot().name.as_str(), b.slot().name.as_str()),
            ("cpu:1", "cpu:1")
        );
        assert!(
            picked_excluding(&p, Some(0)).is_none(),
            "cpu:1 is full: wait, never cpu:0"
        );
    }

    fn picked_excluding(p: &DevicePool, avoid: Option<usize>) -> Option<InFlight> {
        match p.pick_excluding(1, avoid) {
            Pick::Ready(r) => Some(r.start(p, 1)),
            _ => None,
        }
    }

    #[test]
    fn least_loaded_tries_a_device_it_has_not_measured() {
        let (p, _rx) = pool(DispatchPolicy::LeastLoaded, 2);
        p.devices()[0].record(100, Duration::from_millis(10), true, 3);
        assert_eq!(picked(&p, 8).unwrap().slot().name, "cpu:1");
    }

    #[test]
    fn least_loaded_prefers_the_device_that_drains_first() {
        let (p, _rx) = pool(DispatchPolicy::LeastLoaded, 2);
        // cpu:0 does 1000 rows/s, cpu:1 100 rows/s.
        p.devices()[0].record(100, Duration::from_millis(100), true, 3);
        p.devices()[1].record(10, Duration::from_millis(100), true, 3);
        let a = picked(&p, 8).unwrap();
        assert_eq!(a.slot().name, "cpu:0");
        // cpu:0 has 8 rows in flight (8 ms to drain + 8 ms) vs cpu:1 empty (80 ms): still cpu:0.
        let b = picked(&p, 8).unwrap();
        assert_eq!(b.slot().name, "cpu:0");
        // cpu:0 is full: the slow device takes the next one rather than waiting.
        let c = picked(&p, 8).unwrap();
        assert_eq!(c.slot().name, "cpu:1");
        assert_eq!(p.devices()[1].inflight_rows(), 8);
        drop(c);
        assert_eq!(
            p.devices()[1].inflight_rows(),
            0,
            "the guard gives the rows back"
        );
    }
}
