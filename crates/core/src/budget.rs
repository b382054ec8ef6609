//! [`Budget`]: a count of something limited (a model's queue places, bytes of request bodies),
//! taken without waiting and given back when the [`Taken`] guard drops. One atomic, no lock on
//! either side: a tokio `Semaphore` takes its waiters' mutex on every release, and nothing here
//! ever waits.

use std::sync::atomic::{AtomicIsize, Ordering};

#[derive(Debug)]
pub(crate) struct Budget {
    /// Below zero when more was taken with [`Budget::take_anyway`] than was free.
    free: AtomicIsize,
    /// What `new` was given (at most `isize::MAX`).
    total: isize,
}

fn signed(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

impl Budget {
    pub(crate) fn new(total: usize) -> Budget {
        Budget {
            free: AtomicIsize::new(signed(total)),
            total: signed(total),
        }
    }

    /// Takes `n`, or nothing when less than `n` is free.
    pub(crate) fn try_take(&self, n: usize) -> Option<Taken<'_>> {
        let want = signed(n);
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                (f >= want).then(|| f - want)
            })
            .ok()
            .map(|_| Taken { budget: self, n })
    }

    /// Takes `n` whether or not it is free (for what is held already, which the count must
    /// show): until as much is given back, nothing else can be taken.
    pub(crate) fn take_anyway(&self, n: usize) {
        let want = signed(n);
        let _ = self
            .free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                Some(f.saturating_sub(want))
            });
    }

    /// Gives back `n` taken earlier and kept past its guard ([`std::mem::forget`]).
    pub(crate) fn give_back(&self, n: usize) {
        self.free.fetch_add(signed(n), Ordering::AcqRel);
    }

    /// What is free now (nothing while more than the total is taken).
    pub(crate) fn free(&self) -> usize {
        usize::try_from(self.free.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// What is taken now (more than the total after [`Budget::take_anyway`]).
    pub(crate) fn taken(&self) -> usize {
        let free = self.free.load(Ordering::Acquire);
        usize::try_from(self.total.saturating_sub(free)).unwrap_or(0)
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
        self.budget.give_back(self.n);
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
        assert_eq!(b.taken(), 0);
        let huge = Budget::new(usize::MAX);
        let held = huge.try_take(7).expect("7 of all");
        assert_eq!(huge.taken(), 7);
        drop(held);
        assert_eq!(huge.taken(), 0);
        // Taken past what is free: nothing is free until it is given back.
        b.take_anyway(15);
        assert_eq!(b.free(), 0);
        assert_eq!(b.taken(), 15);
        assert!(b.try_take(1).is_none());
        b.give_back(15);
        assert_eq!(b.free(), 10);
    }
}
