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
//! is counted and sent whether or not the budget had room for it (it is made already: the
//! budget can go below zero). And answer bytes
//! not written within `server.write_timeout` of being handed over close their connection (its
//! calls and buffers dropped), as the REST port closes a connection whose client stopped
//! reading. A deadline on the bytes, not on any write, and only the payload of DATA frames
//! counts as written (the socket's bytes are read as the frames they are): PING acks, the
//! server's own pings, settings and the answers to calls it refuses are writes a client can
//! make the server send at will, and a review kept 256 MiB of unread answers for minutes by
//! flooding PINGs while they counted.

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
    /// DATA payload bytes written to the socket (never more than `handed`).
    written: u64,
    /// When the answer bytes up to each offset of `handed` were handed over, oldest first;
    /// those written are dropped (hand-overs within a tenth of a second share an entry).
    marks: VecDeque<(u64, Instant)>,
    /// What is owed (`handed - written`), taken from the budget.
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
        // Counted whether or not the budget has room: the answer is made, and goes out either
        // way; until it is written, new messages wait for room.
        s.memory.take_anyway(n);
    }

    /// `n` bytes of DATA frames' payload were written to the socket.
    fn written(&self, n: u64) {
        let mut s = self.state();
        s.written = s.written.saturating_add(n).min(s.handed);
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
            frames: FrameWalk::default(),
        }
    }
}

/// The HTTP/2 frames of what the server writes, followed through the bytes as they are taken
/// by the socket (a server's output is frames from its first byte: SETTINGS, no preface), to
/// count the DATA frames' payload.
#[derive(Default)]
struct FrameWalk {
    /// The next frame's header, as much of it as has been written.
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame not yet written; 0 between frames.
    left: usize,
    data: bool,
}

/// HTTP/2's DATA frame type.
const DATA: u8 = 0;

impl FrameWalk {
    /// Follows `bytes`, the next ones written; returns the DATA payload bytes among them.
    fn walk(&mut self, mut bytes: &[u8]) -> u64 {
        let mut payload = 0u64;
        while !bytes.is_empty() {
            if self.left == 0 {
                let n = (9 - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == 9 {
                    self.have = 0;
                    let h = &self.head;
                    self.left =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    self.data = h[3] == DATA;
                }
            } else {
                let n = self.left.min(bytes.len());
                if self.data {
                    payload += n as u64;
                }
                self.left -= n;
                bytes = &bytes[n..];
            }
        }
        payload
    }
}

/// A socket whose writes are counted into its connection's [`Outbox`].
pub(crate) struct Counted<T> {
    io: T,
    outbox: Outbox,
    frames: FrameWalk,
}

impl<T> Counted<T> {
    /// Counts the first `n` bytes of `bufs`, which the socket took.
    fn count<'b>(&mut self, bufs: impl IntoIterator<Item = &'b [u8]>, mut n: usize) {
        let mut payload = 0;
        for b in bufs {
            if n == 0 {
                break;
            }
            let taken = &b[..n.min(b.len())];
            payload += self.frames.walk(taken);
            n -= taken.len();
        }
        if payload > 0 {
            self.outbox.written(payload);
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
        if let Poll::Ready(Ok(n)) = written {
            self.count([buf], n);
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            self.count(bufs.iter().map(|b| &b[..]), n);
        }
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

    /// An HTTP/2 frame of `kind` with `len` bytes of payload.
    fn frame(kind: u8, len: usize) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            1,
        ];
        f.resize(9 + len, 7);
        f
    }

    #[test]
    fn only_data_payload_counts_however_the_writes_cut_the_frames() {
        let mut bytes = frame(4, 0); // SETTINGS
        bytes.extend(frame(6, 8)); // PING
        bytes.extend(frame(DATA, 300));
        bytes.extend(frame(1, 40)); // HEADERS (trailers)
        bytes.extend(frame(DATA, 0));
        bytes.extend(frame(DATA, 5));
        for cut in [1, 3, 9, 10, 17, 100, 330, bytes.len()] {
            let mut walk = FrameWalk::default();
            let counted: u64 = bytes.chunks(cut).map(|c| walk.walk(c)).sum();
            assert_eq!(counted, 305, "writes of {cut} bytes");
        }
    }

    #[tokio::test]
    async fn answers_hold_the_budget_until_written_and_a_stall_is_timed() {
        let app = app(1000);
        let outbox = Outbox::new(app.clone());
        let free = || OwnedBodyMemory::new(app.clone()).free();
        assert_eq!(outbox.oldest_owed(), None);
        outbox.handed(600);
        assert_eq!(free(), 400);
        // Over what is free: counted anyway, nothing free until it is written.
        outbox.handed(600);
        assert_eq!(free(), 0);
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut socket = outbox.socket(client);
        // Frames that are not DATA are no progress, however many.
        for _ in 0..100 {
            socket.write_all(&frame(6, 8)).await.unwrap();
        }
        assert_eq!(free(), 0);
        assert!(outbox.oldest_owed().is_some());
        socket.write_all(&frame(DATA, 700)).await.unwrap();
        // 500 owed and counted. Written bytes short of the last answer's end leave it owed,
        // from when it was handed over.
        assert_eq!(free(), 500);
        assert!(outbox.oldest_owed().is_some());
        let last = frame(DATA, 500);
        socket.write_all(&last[..4]).await.unwrap();
        socket.write_all(&last[4..]).await.unwrap();
        assert_eq!(free(), 1000);
        assert_eq!(outbox.oldest_owed(), None);
        let mut read = vec![0; 100 * 17 + 709 + 509];
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
