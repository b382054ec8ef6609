//! [`Stamp`]: a moment kept in one atomic, for "since when" that one thread sets and another
//! reads without a lock (a device run's start for the watchdog, a request head's first byte for
//! the header timeout).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A moment as microseconds since a process-wide origin, or none (0).
#[derive(Debug, Default)]
pub struct Stamp(AtomicU64);

fn now_us() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    (origin.elapsed().as_micros() as u64).max(1)
}

impl Stamp {
    /// Now.
    pub fn set(&self) {
        self.0.store(now_us(), Ordering::Release);
    }

    /// Now, unless a moment is already set.
    pub fn set_if_unset(&self) {
        let _ = self
            .0
            .compare_exchange(0, now_us(), Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn clear(&self) {
        self.0.store(0, Ordering::Release);
    }

    /// Time since the moment; `None` when none is set.
    pub fn elapsed(&self) -> Option<Duration> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            since => Some(Duration::from_micros(now_us().saturating_sub(since))),
        }
    }
}
