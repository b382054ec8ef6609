//! A connection's HTTP/2 streams, polled by the connection's own task.
//!
//! hyper's HTTP/2 server hands every stream (a call) to its executor. With tokio's
//! `spawn` each call was a task of its own: the connection task woke it, and it woke the
//! connection task again to send its answer, each wake-up a hand-off between threads whenever
//! another worker picked the task up. HTTP/1 (the REST port) reads, answers and writes a request
//! in the connection's one task. Here the connection task polls its calls itself, beside the
//! connection: a call is woken in the task that reads its frames and writes its answer, and
//! calls on different connections still run on different threads. A call that panics is
//! dropped and logged, and the connection's other calls go on, as with a task of its own.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;

type Call = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Default)]
struct Queue {
    /// Calls handed over since the connection task last looked.
    new: Vec<Call>,
    /// The connection task, woken when a call is handed over.
    waker: Option<Waker>,
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
        let call = AssertUnwindSafe(call).catch_unwind().map(|ended| {
            if ended.is_err() {
                tracing::error!("a gRPC call panicked; it was dropped");
            }
        });
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.new.push(Box::pin(call));
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }
}

impl ConnExecutor {
    /// The future that runs this connection's calls; it never completes (drop it once the
    /// connection has ended).
    pub(crate) fn calls(&self) -> Calls {
        Calls {
            queue: self.0.clone(),
            running: FuturesUnordered::new(),
        }
    }
}

/// Runs a connection's calls (see [`ConnExecutor::calls`]).
pub(crate) struct Calls {
    queue: Arc<Mutex<Queue>>,
    running: FuturesUnordered<Call>,
}

impl Calls {
    /// Calls not yet finished, including those handed over but not yet polled.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.running.len()
            + self
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .new
                .len()
    }
}

impl Future for Calls {
    type Output = Infallible;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Infallible> {
        loop {
            let new = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                match &mut q.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    w => *w = Some(cx.waker().clone()),
                }
                std::mem::take(&mut q.new)
            };
            if new.is_empty() {
                // Every call is waiting (or there are none): a call handed over from now on
                // wakes this task.
                while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
                let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if q.new.is_empty() {
                    return Poll::Pending;
                }
                continue;
            }
            for call in new {
                self.running.push(call);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Calls handed over run to their end in the task that polls `Calls`, one that waits is
    /// woken when it can go on, and one that panics is dropped without stopping the others.
    #[tokio::test]
    async fn calls_run_in_the_connection_task_and_a_panic_stays_in_its_call() {
        let exec = ConnExecutor::default();
        let calls = exec.calls();
        tokio::pin!(calls);
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let d = done.clone();
        exec.execute(async move {
            rx.await.unwrap();
            d.fetch_add(1, Ordering::SeqCst);
        });
        exec.execute(async move { panic!("a call that panics") });
        let d = done.clone();
        exec.execute(async move {
            d.fetch_add(1, Ordering::SeqCst);
        });
        // One poll runs what can run: the panicking call is gone, the waiting one waits.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(calls.as_mut().poll(&mut cx).is_pending());
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert_eq!(calls.len(), 1);
        // Its wake-up comes back to this task.
        tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while done.load(Ordering::SeqCst) < 2 {
                tokio::select! {
                    never = calls.as_mut() => match never {},
                    _ = tokio::task::yield_now() => {}
                }
            }
        })
        .await
        .expect("the waiting call finished");
        assert_eq!(calls.len(), 0);
    }
}
