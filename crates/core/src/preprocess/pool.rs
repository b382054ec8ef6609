//! The bounded CPU pool for decoding, resizing and parsing big bodies: its own threads, at
//! most `threads` jobs at a time, so the async workers stay free and this work cannot take more
//! cores than the ONNX Runtime sessions leave.
//!
//! Jobs run at one of two priorities. Image preprocessing is on the request's critical path and
//! overlaps inference, so it runs at the server's own priority. Parsing a big body runs at a
//! lower one (nice 10), so that a multi-MB body yields the CPU to the async workers answering
//! small requests and probes as soon as they have work (docs/BENCHMARKS.md, scenarios e and f).
//! Each priority has its own threads, the pool's and not tokio's blocking threads: a thread
//! cannot raise its priority back, and tokio's blocking threads also create ONNX Runtime
//! sessions, whose threads would inherit it.

use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};

use tokio::sync::{oneshot, Semaphore};

type Job = Box<dyn FnOnce() + Send>;

/// Which of the pool's threads run a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Priority {
    /// The server's own priority (image preprocessing).
    Normal,
    /// Nice [`NICE`]: yields to everything else (parsing big bodies).
    Background,
}

pub(crate) struct Pool {
    /// One permit per job allowed to run, whatever its priority; handlers wait here when every
    /// slot is busy.
    permits: Arc<Semaphore>,
    /// To the pool's threads, per priority; they end when the pool is dropped.
    normal: mpsc::Sender<Job>,
    background: mpsc::Sender<Job>,
}

/// The nice value of the background threads.
const NICE: i32 = 10;

impl Pool {
    pub(crate) fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        Pool {
            permits: Arc::new(Semaphore::new(threads)),
            normal: spawn_threads("ortserve-pre", threads, Priority::Normal),
            background: spawn_threads("ortserve-bg", threads, Priority::Background),
        }
    }

    /// Waits for a free slot, then starts `job` on a pool thread and returns where its result
    /// will come. A request with several jobs starts them one after another, so its later jobs
    /// queue behind jobs other requests asked for meanwhile (the semaphore is first come, first
    /// served): requests share the slots instead of one taking them all.
    pub(crate) async fn start<T: Send + 'static>(
        &self,
        priority: Priority,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Started<T> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _slot = permit;
            // A panic goes to the caller (see [`finished`]), not to the pool's thread.
            let _ = done.send(std::panic::catch_unwind(AssertUnwindSafe(job)));
        });
        let threads = match priority {
            Priority::Normal => &self.normal,
            Priority::Background => &self.background,
        };
        // The threads live as long as `self`, so the send only fails if one of them died,
        // which catch_unwind prevents; the receiver then reports the job as lost.
        let _ = threads.send(job);
        result
    }
}

/// Starts `count` threads that run the jobs sent on the returned channel, at `priority`.
fn spawn_threads(name: &str, count: usize, priority: Priority) -> mpsc::Sender<Job> {
    let (jobs, queue) = mpsc::channel::<Job>();
    let queue = Arc::new(Mutex::new(queue));
    for i in 0..count {
        let queue = queue.clone();
        std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                if priority == Priority::Background {
                    lower_priority();
                }
                loop {
                    // The lock is held only to take a job, not to run it.
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match next {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })
            .expect("the preprocessing threads start");
    }
    jobs
}

/// A started job's result, to await.
pub(crate) type Started<T> = oneshot::Receiver<std::thread::Result<T>>;

/// A job's result; a panic in the job goes on in the caller.
pub(crate) fn finished<T>(r: Result<std::thread::Result<T>, oneshot::error::RecvError>) -> T {
    match r {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("a preprocessing job was lost: its thread is gone"),
    }
}

/// Lowers the calling thread's scheduling priority to [`NICE`] (Linux: `setpriority` on a
/// thread id applies to that thread only). Unprivileged, and a failure only leaves the default.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid takes nothing and cannot fail; setpriority only reads its arguments.
        let rc = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE)
        };
        if rc != 0 {
            tracing::debug!("could not lower the preprocessing threads' priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn jobs_run_at_their_priority_and_panics_reach_the_caller() {
        let pool = Pool::new(2);
        let nice = || {
            // SAFETY: as in lower_priority.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        };
        let normal = finished(pool.start(Priority::Normal, nice).await.await);
        let background = finished(pool.start(Priority::Background, nice).await.await);
        assert_eq!((normal, background), (nice(), NICE));
        let panicked = pool
            .start(Priority::Background, || -> u8 { panic!("in the job") })
            .await
            .await;
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| finished(panicked)));
        assert!(caught.is_err());
        // The thread that ran it is still there for the next job.
        for _ in 0..4 {
            assert_eq!(
                finished(pool.start(Priority::Background, || 7).await.await),
                7
            );
        }
    }
}
