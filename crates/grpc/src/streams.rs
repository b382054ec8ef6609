//! A connection's HTTP/2 streams, polled by the connection's own task.
//!
//! hyper's HTTP/2 server hands every stream (a call) to its executor. With tokio's
//! `spawn` each call was a task of its own: the connection task woke it, and it woke the
//! connection task again to send its answer, each wake-up a hand-off between threads whenever
//! another worker picked the task up. HTTP/1 (the REST port) reads, answers and writes a request
//! in the connection's one task. Here the connection task polls its calls itself, beside the
//! connection: a call is woken in the task that reads its frames and writes its answer. Calls on
//! different connections are different tasks, which tokio may run on different threads. The task
//! runs in [`Turns`](crate::turns::Turns), so the wake-ups it gives itself while it polls (h2's
//! when a call queues its answer, `FuturesUnordered`'s, this executor's when hyper hands over a
//! call) are more polls of the same turn instead of yields that wake another worker.
//!
//! Several calls that arrive together are polled one at a time, and when the one just queued
//! can start on a free device whose rows are slow enough to be worth it, in a process with more
//! than one core (`ortserve_core::call::take_batcher_can_start`), the task gives its thread to
//! the model's batcher before it decodes the next (`Turns::give_way`, a wake-up through tokio).
//! tokio runs a task woken on a worker thread there, once the waking task is done with it, so
//! otherwise the device waited until every call
//! of the burst was decoded and queued: four CNN callers on one connection ran as one batch after
//! another, the device and the connection never busy at once (0.71-0.80 of REST binary's
//! rows/s, whose four connections interleave; docs/BENCHMARKS.md).
//!
//! What a call does synchronously holds up the connection's other calls and frames: a message
//! with more than `ortserve_core::app::BACKGROUND_BYTES` of fields and typed values to decode is
//! decoded on the server's preprocessing pool (`fast.rs`). A call that panics, polled or dropped, is dropped and logged, and the
//! connection's other calls go on. Calls handed over after the connection ended are dropped at
//! once: each holds a copy of the executor, and a call left queued would keep it, the queue and
//! itself alive.

use std::any::Any;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::turns::Turns;

type Call = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Default)]
struct Queue {
    /// Calls handed over since the connection task last looked.
    new: Vec<Guarded>,
    /// The connection task, woken when a call is handed over.
    waker: Option<Waker>,
    /// The connection's task is done with its calls: later ones are dropped.
    closed: bool,
}

fn lock(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

fn panicked(what: &Box<dyn Any + Send>, when: &str) {
    let message = ortserve_core::device::panic_message(what.as_ref());
    tracing::error!(panic = %message, "a gRPC call panicked {when}; it was dropped");
}

/// A call whose panics, while polled or dropped, stay in it.
struct Guarded(Option<Call>);

impl Future for Guarded {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(call) = self.0.as_mut() else {
            return Poll::Ready(());
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| call.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(what) => {
                panicked(&what, "while polled");
                // Dropped here, where a panic in its drop is caught too.
                drop(self.0.take());
                Poll::Ready(())
            }
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(call) = self.0.take() {
            if let Err(what) = std::panic::catch_unwind(AssertUnwindSafe(|| drop(call))) {
                panicked(&what, "while dropped");
            }
        }
    }
}

/// hyper's executor for one connection: the calls it is given are run by [`Calls`], which
/// the connection's task polls beside the connection.
#[derive(Clone, Default)]
pub(crate) struct ConnExecutor(Arc<Mutex<Queue>>);

impl<F> hyper::rt::Executor<F> for ConnExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, call: F) {
        let call = Guarded(Some(Box::pin(call)));
        let mut q = lock(&self.0);
        if q.closed {
            drop(q);
            drop(call);
            return;
        }
        q.new.push(call);
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }
}

impl ConnExecutor {
    /// The future that runs this connection's calls; it never completes (drop it once the
    /// connection has ended: the calls not finished are dropped with it).
    pub(crate) fn calls(&self, turns: Turns) -> Calls {
        Calls {
            queue: self.0.clone(),
            turns,
            fresh: VecDeque::new(),
            running: FuturesUnordered::new(),
        }
    }
}

/// Runs a connection's calls (see [`ConnExecutor::calls`]).
pub(crate) struct Calls {
    queue: Arc<Mutex<Queue>>,
    /// The connection task's turns, to give the thread away through.
    turns: Turns,
    /// Calls handed over and not yet polled.
    fresh: VecDeque<Guarded>,
    running: FuturesUnordered<Guarded>,
}

impl Calls {
    /// Calls not yet finished, including those handed over but not yet polled.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.running.len() + self.fresh.len() + lock(&self.queue).new.len()
    }
}

impl Drop for Calls {
    fn drop(&mut self) {
        let queued = {
            let mut q = lock(&self.queue);
            q.closed = true;
            q.waker = None;
            std::mem::take(&mut q.new)
        };
        // Outside the lock: a call's drop drops its copy of the executor.
        drop(queued);
    }
}

impl Future for Calls {
    type Output = Infallible;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Infallible> {
        let this = &mut *self;
        loop {
            {
                let mut q = lock(&this.queue);
                match &mut q.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    w => *w = Some(cx.waker().clone()),
                }
                // Moved, not dropped, under the lock; the queue keeps its buffer.
                this.fresh.extend(q.new.drain(..));
            }
            // Answers first, then the calls that arrived, one at a time (see the module's
            // notes): a call's first poll decodes its message and queues it with its model.
            while let Poll::Ready(Some(())) = this.running.poll_next_unpin(cx) {}
            while let Some(mut call) = this.fresh.pop_front() {
                ortserve_core::call::take_batcher_can_start();
                if Pin::new(&mut call).poll(cx).is_ready() {
                    continue;
                }
                this.running.push(call);
                if !this.fresh.is_empty() && ortserve_core::call::take_batcher_can_start() {
                    // Queued behind what this thread runs next, the batcher first; the next
                    // worker to look may take this task on meanwhile.
                    this.turns.give_way(cx);
                    return Poll::Pending;
                }
            }
            // A call polled just now may have handed over another (hyper does for CONNECT);
            // otherwise every call waits, and one handed over from now on wakes this task.
            if lock(&this.queue).new.is_empty() {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turns::tests::outer as task;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Calls handed over run in the task that polls `Calls`; a call that waits wakes that task
    /// when it can go on, as does a call handed over later; one that panics is dropped without
    /// stopping the others.
    #[test]
    fn calls_run_in_the_connection_task_and_a_panic_stays_in_its_call() {
        let exec = ConnExecutor::default();
        let mut calls = Box::pin(exec.calls(Turns::default()));
        let (woken, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let d = done.clone();
        exec.execute(std::future::poll_fn(move |cx| {
            Pin::new(&mut rx).poll(cx).map(|_| {
                d.fetch_add(1, Ordering::SeqCst);
            })
        }));
        exec.execute(async move { panic!("a call that panics") });
        let d = done.clone();
        exec.execute(async move {
            d.fetch_add(1, Ordering::SeqCst);
        });
        // One poll runs what can run: the panicking call is gone, the waiting one waits.
        assert!(calls.as_mut().poll(&mut cx).is_pending());
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert_eq!(calls.len(), 1);
        // The waiting call's wake-up reaches the connection's task, and the next poll ends it.
        let before = woken.0.load(Ordering::SeqCst);
        tx.send(()).unwrap();
        assert!(
            woken.0.load(Ordering::SeqCst) > before,
            "the task was not woken"
        );
        assert!(calls.as_mut().poll(&mut cx).is_pending());
        assert_eq!(done.load(Ordering::SeqCst), 2);
        assert_eq!(calls.len(), 0);
        // A call handed over now wakes the task too.
        let before = woken.0.load(Ordering::SeqCst);
        exec.execute(async {});
        assert!(
            woken.0.load(Ordering::SeqCst) > before,
            "the task was not woken"
        );
        assert!(calls.as_mut().poll(&mut cx).is_pending());
        assert_eq!(calls.len(), 0);
    }

    /// Panics while dropped (h2's stream handles panic in their drop once its lock is
    /// poisoned) are caught: dropping `Calls` with such a call running does not unwind.
    #[test]
    fn a_call_that_panics_when_dropped_is_dropped_alone() {
        struct PanicsOnDrop;
        impl Drop for PanicsOnDrop {
            fn drop(&mut self) {
                panic!("a drop that panics");
            }
        }
        let exec = ConnExecutor::default();
        let mut calls = Box::pin(exec.calls(Turns::default()));
        let (_, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let guard = PanicsOnDrop;
        exec.execute(async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        assert!(calls.as_mut().poll(&mut cx).is_pending());
        assert_eq!(calls.len(), 1);
        let dropped = std::panic::catch_unwind(AssertUnwindSafe(|| drop(calls)));
        assert!(dropped.is_ok(), "the panic in the call's drop unwound");
    }

    /// A call each holds a copy of the executor (hyper hands every stream one): calls still
    /// queued when the connection's task drops `Calls` are freed with it, and a call handed
    /// over afterwards is dropped at once, instead of keeping the queue and itself alive.
    #[test]
    fn calls_left_when_the_connection_ends_are_freed() {
        let exec = ConnExecutor::default();
        let calls = exec.calls(Turns::default());
        let marker = Arc::new(());
        for _ in 0..3 {
            let (exec, marker) = (exec.clone(), marker.clone());
            exec.clone().execute(async move {
                let _held = (exec, marker);
            });
        }
        assert_eq!(Arc::strong_count(&marker), 4);
        drop(calls);
        assert_eq!(Arc::strong_count(&marker), 1, "queued calls were not freed");
        let m = marker.clone();
        exec.execute(async move {
            let _held = m;
        });
        assert_eq!(
            Arc::strong_count(&marker),
            1,
            "a call after the end was kept"
        );
    }

    /// Calls that arrive together are polled one at a time when the one just polled queued rows
    /// a free device can start on: the task gives its thread away (woken, to be polled again)
    /// before it polls the next. Calls that queue nothing of the kind are polled together.
    #[test]
    fn a_call_that_can_start_a_device_gives_the_thread_away_before_the_next() {
        let exec = ConnExecutor::default();
        let mut calls = Box::pin(exec.calls(Turns::default()));
        let (woken, waker) = task();
        let mut cx = Context::from_waker(&waker);
        // Hands over a call that queues its rows on its first poll (saying a device can start
        // them, or not), then waits for its answer; returns how often it was polled.
        let hand_over = |starts: bool| {
            let polled = Arc::new(AtomicUsize::new(0));
            let p = polled.clone();
            exec.execute(std::future::poll_fn(move |_| {
                if p.fetch_add(1, Ordering::SeqCst) == 0 && starts {
                    ortserve_core::call::batcher_can_start();
                }
                Poll::<()>::Pending
            }));
            polled
        };
        let polled = |c: &[Arc<AtomicUsize>]| -> Vec<bool> {
            c.iter().map(|p| p.load(Ordering::SeqCst) > 0).collect()
        };
        let starting: Vec<_> = (0..3).map(|_| hand_over(true)).collect();
        // The first is polled, then the thread is given away, the task woken to come back.
        assert!(calls.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polled(&starting), [true, false, false]);
        let w1 = woken.0.load(Ordering::SeqCst);
        assert!(w1 >= 1, "the task was not woken to come back");
        // Then the second, likewise, then the third.
        assert!(calls.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polled(&starting), [true, true, false]);
        assert!(
            woken.0.load(Ordering::SeqCst) > w1,
            "not woken to come back"
        );
        assert!(calls.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polled(&starting), [true, true, true]);
        assert_eq!(calls.len(), 3);

        // Calls that start nothing are all polled in one turn.
        let idle: Vec<_> = (0..3).map(|_| hand_over(false)).collect();
        assert!(calls.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polled(&idle), [true, true, true]);
        assert_eq!(calls.len(), 6);
    }
}
