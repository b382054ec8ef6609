//! [`Budget`]: a count of something limited (a model's queue places, bytes of request bodies),
//! taken without waiting and given back when the [`Taken`] guard drops. One atomic, no lock on
//! either side: a tokio `Semaphore` takes its waiters' mutex on every release, and nothing here
//! ever waits.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub(crate) struct Budget {
    free: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(total: usize) -> Budget {
        Budget {
            free: AtomicUsize::new(total),
        }
    }

    /// Takes `n`, or nothing when less than `n` is free.
    pub(crate) fn try_take(&self, n: usize) -> Option<Taken<'_>> {
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| f.checked_sub(n))
            .ok()
            .map(|_| Taken { budget: self, n })
    }

    /// Gives back `n` taken earlier and kept past its guard ([`std::mem::forget`]).
    pub(crate) fn give_back(&self, n: usize) {
        self.free.fetch_add(n, Ordering::AcqRel);
    }

    /// What is free now.
    pub(crate) fn free(&self) -> usize {
        self.free.load(Ordering::Acquire)
    }
}

/// Part of a [`Budget`], given back on drop.
#[derive(Debug)]
pub(crate) struct Taken<'a> {
    budget: &'a Budget,
    n: usize,
}

impl Taken<'_> {
    /// Takes `n` more into this guard; false (and nothing taken) when less than `n` is free.
    pub(crate) fn grow(&mut self, n: usize) -> bool {
        match self.budget.try_take(n) {
            Some(more) => {
                self.n += more.n;
                std::mem::forget(more);
                true
            }
            None => false,
        }
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.budget.free.fetch_add(self.n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_is_free_and_gives_it_back() {
        let b = Budget::new(10);
        let mut a = b.try_take(4).expect("4 of 10");
        assert!(b.try_take(7).is_none(), "6 are free");
        assert!(a.grow(6));
        assert_eq!(b.free(), 0);
        assert!(!a.grow(1));
        drop(a);
        assert_eq!(b.free(), 10);
    }
}
