//! A connection task's wake-ups of itself, folded into the turn that made them.
//!
//! The gRPC connection's task (`lib.rs`) polls hyper's HTTP/2 connection and the connection's
//! calls (`streams.rs`), and wakes itself while it runs: h2 wakes the connection's task when a
//! call queues its answer or a stream is handed over, and `FuturesUnordered` wakes it when it has
//! polled every call it holds. tokio's multi-thread scheduler takes a task that wakes itself while
//! it runs for a yield: it puts the task at the back of the worker's queue and wakes a parked
//! worker (`schedule_local`, `is_yield`), which finds nothing to do or steals the connection.
//! REST's HTTP/1.1 connections answer in the poll that computed the answer and wake nobody.
//!
//! [`Turns::run`] gives the task a waker that, while the task is being polled, only marks it to
//! be polled again before the turn ends (up to [`ROUNDS`] polls a turn, and not once tokio's
//! cooperative budget is spent); a wake-up that arrives between turns (the device thread's
//! answer, a timer, the socket) goes to tokio as before. One MLP caller on two cores: 0.92 of
//! REST binary's calls/s with it, 0.83 without (medians of four alternated runs;
//! docs/BENCHMARKS.md).
//!
//! A turn that is meant to end, so that another task runs first (the batcher, in `streams.rs`),
//! ends through [`Turns::give_way`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The most polls in one turn; then the task is woken through tokio like any other.
pub(crate) const ROUNDS: usize = 16;

#[derive(Default)]
struct State {
    /// The task is being polled: a wake-up now means "once more", not "schedule me".
    polling: AtomicBool,
    /// Woken since the current poll began.
    woken: AtomicBool,
    /// The current turn is to end with the task queued behind its thread's other work.
    give_way: AtomicBool,
    /// The waker tokio gave the task at its last poll (taken by the wake-up that uses it).
    outer: AtomicWaker,
}

impl Wake for State {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // `woken` first: a poll that ends after this store sees it and polls again; one that
        // ended before it stored `polling = false` first, which this load then sees.
        self.woken.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            self.outer.wake();
        }
    }
}

/// A connection task's turns (see the module's notes); clones share them.
#[derive(Clone, Default)]
pub(crate) struct Turns(Arc<State>);

impl Turns {
    /// `task`, polled with wake-ups of itself folded into the turn.
    pub(crate) fn run<F: Future>(&self, task: F) -> Folded<F> {
        Folded {
            task: Box::pin(task),
            waker: Waker::from(self.0.clone()),
            state: self.0.clone(),
        }
    }

    /// Ends the current turn with the task woken through tokio, behind what its thread runs
    /// next. Outside [`Turns::run`] it is a plain wake-up through `cx`.
    pub(crate) fn give_way(&self, cx: &Context<'_>) {
        self.0.give_way.store(true, SeqCst);
        cx.waker().wake_by_ref();
    }
}

/// The future of [`Turns::run`].
pub(crate) struct Folded<F> {
    task: Pin<Box<F>>,
    waker: Waker,
    state: Arc<State>,
}

impl<F: Future> Future for Folded<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let state = &this.state;
        state.outer.register(cx.waker());
        for _ in 0..ROUNDS {
            state.woken.store(false, SeqCst);
            state.polling.store(true, SeqCst);
            let polled = this
                .task
                .as_mut()
                .poll(&mut Context::from_waker(&this.waker));
            state.polling.store(false, SeqCst);
            if polled.is_ready() {
                return polled;
            }
            let woken = state.woken.swap(false, SeqCst);
            if state.give_way.swap(false, SeqCst) || !tokio::task::coop::has_budget_remaining() {
                // The turn ends here; what woke the task in it (`give_way` among them) goes
                // through tokio, and without a wake-up the task waits for its resources.
                if woken {
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
            }
            if !woken {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<F> Drop for Folded<F> {
    fn drop(&mut self) {
        // A copy of this task's waker kept somewhere would otherwise keep tokio's waker for the
        // task, and with it the task's memory, alive through `State`.
        drop(self.state.outer.take());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A waker that counts its wake-ups: tokio's, for a task (here and in `streams.rs`).
    #[derive(Default)]
    pub(crate) struct Counted(pub(crate) AtomicUsize);

    impl Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A counting waker and its count.
    pub(crate) fn outer() -> (Arc<Counted>, Waker) {
        let c = Arc::new(Counted::default());
        (c.clone(), Waker::from(c))
    }

    /// A task that wakes itself `times` times while it is polled, then finishes; counts its polls.
    fn waking_itself(times: usize, polls: Arc<AtomicUsize>) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            if polls.fetch_add(1, Ordering::SeqCst) < times {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
    }

    #[test]
    fn wake_ups_of_itself_are_polls_of_the_same_turn() {
        let (count, waker) = outer();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut task = Turns::default().run(waking_itself(3, polls.clone()));
        let ready = Pin::new(&mut task).poll(&mut Context::from_waker(&waker));
        assert!(ready.is_ready(), "not finished in one turn");
        assert_eq!(polls.load(Ordering::SeqCst), 4);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "tokio was asked to schedule it"
        );
    }

    #[test]
    fn a_turn_has_at_most_rounds_polls_then_tokio_wakes_the_task() {
        let (count, waker) = outer();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut task = Turns::default().run(waking_itself(usize::MAX, polls.clone()));
        let pending = Pin::new(&mut task).poll(&mut Context::from_waker(&waker));
        assert!(pending.is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), ROUNDS);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "not woken to come back");
    }

    #[test]
    fn wake_ups_from_elsewhere_between_turns_reach_tokio() {
        let (count, waker) = outer();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<u8>();
        let mut task = Turns::default().run(async move { (&mut rx).await.unwrap() });
        assert!(Pin::new(&mut task)
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // From another thread, as the device thread answers.
        std::thread::spawn(move || tx.send(7).unwrap())
            .join()
            .unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the answer woke nobody");
        let done = Pin::new(&mut task).poll(&mut Context::from_waker(&waker));
        assert_eq!(done, Poll::Ready(7));
    }

    #[test]
    fn a_wake_up_from_another_thread_during_a_poll_is_not_lost() {
        // Woken from another thread while it is polled (the answer arrives as the connection
        // is being read): polled again in the same turn, and then it is done.
        let (count, waker) = outer();
        let polls = Arc::new(AtomicUsize::new(0));
        let p = polls.clone();
        let mut task = Turns::default().run(std::future::poll_fn(move |cx| {
            if p.fetch_add(1, Ordering::SeqCst) == 0 {
                let w = cx.waker().clone();
                std::thread::spawn(move || w.wake()).join().unwrap();
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }));
        let ready = Pin::new(&mut task).poll(&mut Context::from_waker(&waker));
        assert!(ready.is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn giving_way_ends_the_turn_through_tokio() {
        let (count, waker) = outer();
        let turns = Turns::default();
        let polls = Arc::new(AtomicUsize::new(0));
        let (t, p) = (turns.clone(), polls.clone());
        let mut task = turns.run(std::future::poll_fn(move |cx| {
            if p.fetch_add(1, Ordering::SeqCst) == 0 {
                t.give_way(cx);
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }));
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut task).poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "polled again in the same turn"
        );
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "not woken to come back");
        assert!(Pin::new(&mut task).poll(&mut cx).is_ready());
    }
}
