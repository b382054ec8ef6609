//! The bounded CPU pool for decoding and resizing: blocking work runs on tokio's blocking
//! threads, at most `threads` at a time, so the async workers stay free and decoding cannot
//! take more cores than the ONNX Runtime sessions leave.

use std::sync::Arc;

use tokio::sync::Semaphore;

pub(crate) struct Pool {
    /// One permit per job allowed to run; handlers wait here when every slot is busy.
    permits: Arc<Semaphore>,
}

impl Pool {
    pub(crate) fn new(threads: usize) -> Pool {
        Pool {
            permits: Arc::new(Semaphore::new(threads.max(1))),
        }
    }

    /// Waits for a free slot, then starts `job` on a blocking thread and returns its handle.
    /// A request with several jobs starts them one after another, so its later jobs queue
    /// behind jobs other requests asked for meanwhile (the semaphore is first come, first
    /// served): requests share the slots instead of one taking them all.
    pub(crate) async fn start<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let _slot = permit;
            job()
        })
    }
}

/// A job's result; a panic in the job goes on in the caller.
pub(crate) fn finished<T>(r: Result<T, tokio::task::JoinError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
