//! The bounded CPU pool for decoding, resizing and parsing big bodies: its own threads, at
//! most `threads` jobs at a time, so the async workers stay free and this work cannot take more
//! cores than the ONNX Runtime sessions leave.
//!
//! The threads run at a lower scheduling priority (nice 10) than the rest of the server, so
//! that a multi-MB body being parsed yields the CPU to the async workers answering small
//! requests and probes as soon as they have work (docs/BENCHMARKS.md, scenario f). They are the
//! pool's own threads, not tokio's blocking threads: a thread cannot raise its priority back, and
//! tokio's blocking threads also create ONNX Runtime sessions, whose threads inherit it.

use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};

use tokio::sync::{oneshot, Semaphore};

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct Pool {
    /// One permit per job allowed to run; handlers wait here when every slot is busy.
    permits: Arc<Semaphore>,
    /// To the pool's threads; they end when the pool is dropped.
    jobs: mpsc::Sender<Job>,
}

/// The nice value of the pool's threads.
const NICE: i32 = 10;

impl Pool {
    pub(crate) fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("ortserve-pre-{i}"))
                .spawn(move || {
                    lower_priority();
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
        Pool {
            permits: Arc::new(Semaphore::new(threads)),
            jobs,
        }
    }

    /// Waits for a free slot, then starts `job` on a pool thread and returns where its result
    /// will come. A request with several jobs starts them one after another, so its later jobs
    /// queue behind jobs other requests asked for meanwhile (the semaphore is first come, first
    /// served): requests share the slots instead of one taking them all.
    pub(crate) async fn start<T: Send + 'static>(
        &self,
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
        // The threads live as long as `self`, so the send only fails if one of them died,
        // which catch_unwind prevents; the receiver then reports the job as lost.
        let _ = self.jobs.send(job);
        result
    }
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
    async fn jobs_run_at_the_lower_priority_and_panics_reach_the_caller() {
        let pool = Pool::new(2);
        let nice = finished(
            pool.start(|| {
                // SAFETY: as in lower_priority.
                unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
            })
            .await
            .await,
        );
        assert_eq!(nice, NICE);
        let panicked = pool.start(|| -> u8 { panic!("in the job") }).await.await;
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| finished(panicked)));
        assert!(caught.is_err());
        // The thread that ran it is still there for the next job.
        for _ in 0..4 {
            assert_eq!(finished(pool.start(|| 7).await.await), 7);
        }
    }
}
