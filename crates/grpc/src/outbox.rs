//! What a connection owes its client: the bytes of its answers handed to HTTP/2 and not yet
//! written to the socket.
//!
//! An answer's body is handed to hyper whole, and HTTP/2 sends it only as fast as the client's
//! flow-control window allows: a client that opens many calls and never opens its window (or
//! never reads its socket) had the server hold every answer for as long as it kept the
//! connection, outside every limit (a review held 2.3 GB with four connections; docs/BENCHMARKS.md).
//! Here each answer's bytes count against the server's body-memory budget (`max_body_memory`,
//! which request bodies count against as they arrive) from the moment they are handed over
//! until as many bytes have been written to the socket: while clients leave answers unread,
//! new request bodies are refused with UNAVAILABLE instead of more answers piling up. An answer
//! is sent whether or not the budget had room for it (it is made already). And answer bytes
//! not written within `server.write_timeout` of being handed over close their connection (its
//! calls and buffers dropped), as the REST port closes a connection whose client stopped
//! reading. A deadline on the bytes, not on any write: the server's own pings, and the answers
//! to calls it refuses, are writes a client could otherwise keep the connection alive with.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ortserve_core::app::AppState;
use ortserve_core::call::OwnedBodyMemory;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One connection's answers not yet written; clones share it.
#[derive(Clone)]
pub(crate) struct Outbox(Arc<Mutex<State>>);

struct State {
    /// Answer bytes handed over since the connection began.
    handed: u64,
    /// Bytes written to the socket while answer bytes were owed, so never more than
    /// `handed` (frame headers, pings and settings count too: the count errs toward the
    /// client, by a few bytes a frame).
    written: u64,
    /// When the answer bytes up to each offset of `handed` were handed over, oldest first;
    /// those written are dropped (hand-overs within a tenth of a second share an entry).
    marks: VecDeque<(u64, Instant)>,
    /// The part of what is owed (`handed - written`) taken from the budget.
    memory: OwnedBodyMemory,
}

/// Hand-overs closer together than this share a mark.
const MARK_EVERY: Duration = Duration::from_millis(100);

impl State {
    fn owed(&self) -> u64 {
        self.handed.saturating_sub(self.written)
    }
}

impl Outbox {
    pub(crate) fn new(app: Arc<AppState>) -> Outbox {
        Outbox(Arc::new(Mutex::new(State {
            handed: 0,
            written: 0,
            marks: VecDeque::new(),
            memory: OwnedBodyMemory::new(app),
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` bytes of an answer were handed to HTTP/2.
    pub(crate) fn handed(&self, n: usize) {
        let mut s = self.state();
        s.handed = s.handed.saturating_add(n as u64);
        let handed = s.handed;
        let now = Instant::now();
        match s.marks.back_mut() {
            Some((offset, at)) if now.duration_since(*at) < MARK_EVERY => *offset = handed,
            _ => s.marks.push_back((handed, now)),
        }
        // Taken when the budget has room; the answer goes out either way.
        s.memory.try_take(n);
    }

    /// `n` bytes were written to the socket.
    fn written(&self, n: usize) {
        let mut s = self.state();
        // Bytes written while nothing is owed are no credit against later answers.
        s.written = s.written.saturating_add(n as u64).min(s.handed);
        let written = s.written;
        while s
            .marks
            .front()
            .is_some_and(|&(offset, _)| offset <= written)
        {
            s.marks.pop_front();
        }
        let excess = s
            .memory
            .held()
            .saturating_sub(usize::try_from(s.owed()).unwrap_or(usize::MAX));
        s.memory.give_back(excess);
    }

    /// How long ago the oldest answer bytes not yet written were handed over; `None` when
    /// everything handed over has been written.
    pub(crate) fn oldest_owed(&self) -> Option<Duration> {
        let s = self.state();
        s.marks.front().map(|&(_, at)| at.elapsed())
    }
}

impl Outbox {
    /// The connection's socket, its writes counted here.
    pub(crate) fn socket<T>(&self, io: T) -> Counted<T> {
        Counted {
            io,
            outbox: self.clone(),
        }
    }
}

/// A socket whose writes are counted into its connection's [`Outbox`].
pub(crate) struct Counted<T> {
    io: T,
    outbox: Outbox,
}

impl<T> Counted<T> {
    fn count(&self, written: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = written {
            if *n > 0 {
                self.outbox.written(*n);
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.count(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.count(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn app(budget: u64) -> Arc<AppState> {
        let server = ortserve_core::config::ServerConfig {
            max_body_memory: Some(ortserve_core::config::ByteSize(budget)),
            ..Default::default()
        };
        let metrics = Arc::new(ortserve_core::metrics::Metrics::new());
        Arc::new(AppState::loading(metrics, &server, 1, Vec::new()))
    }

    #[tokio::test]
    async fn answers_hold_the_budget_until_written_and_a_stall_is_timed() {
        let app = app(1000);
        let outbox = Outbox::new(app.clone());
        let free = || OwnedBodyMemory::new(app.clone()).free();
        assert_eq!(outbox.oldest_owed(), None);
        outbox.handed(600);
        assert_eq!(free(), 400);
        // Over what is free: sent anyway, held outside the budget.
        outbox.handed(600);
        assert_eq!(free(), 400);
        assert!(outbox.oldest_owed().is_some());
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut socket = outbox.socket(client);
        socket.write_all(&[0; 700]).await.unwrap();
        // 500 owed, all of it outside the budget's 600: 100 of those given back. Written
        // bytes short of the last answer's end leave it owed, from when it was handed over.
        assert_eq!(free(), 500);
        assert!(outbox.oldest_owed().is_some());
        socket.write_all(&[0; 500]).await.unwrap();
        assert_eq!(free(), 1000);
        assert_eq!(outbox.oldest_owed(), None);
        let mut read = vec![0; 1200];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut read)
            .await
            .unwrap();
        // Dropped while owing: the budget is whole again.
        outbox.handed(300);
        assert_eq!(free(), 700);
        drop(socket);
        drop(outbox);
        assert_eq!(free(), 1000);
    }
}
