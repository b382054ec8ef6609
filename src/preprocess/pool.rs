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

    /// Runs `job` on a blocking thread once a slot is free.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        let result = tokio::task::spawn_blocking(move || {
            let _slot = permit;
            job()
        })
        .await;
        match result {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}
