//! A small HTTP/1.1 load generator: N keep-alive connections, each sending the same prepared
//! request back to back for a bounded time, recording status and latency per request.
//!
//! The generator shares the cores with the server it measures, so it should cost as little as it
//! can: a large request (a model's input tensors) is put once into an in-memory file and sent
//! with `sendfile(2)`, which hands the file's pages to the socket instead of copying the bytes
//! from user memory on every send. Small requests are written as usual.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// Requests at least this large are sent with `sendfile(2)`.
const SENDFILE_FROM: usize = 16 * 1024;

/// The prepared request: its bytes, and for a large one the in-memory file holding them.
struct Prepared {
    bytes: Arc<Vec<u8>>,
    file: Option<File>,
}

impl Prepared {
    fn new(bytes: Arc<Vec<u8>>) -> Prepared {
        let file = file_to_send(&bytes);
        Prepared { bytes, file }
    }

    async fn send(&self, stream: &mut TcpStream) -> std::io::Result<()> {
        match &self.file {
            Some(f) => sendfile_range(stream, f, 0, self.bytes.len()).await,
            None => stream.write_all(&self.bytes).await,
        }
    }
}

/// For bytes of at least [`SENDFILE_FROM`], an in-memory file holding them to send with
/// `sendfile(2)`; none for fewer, or where no such file can be made (they are then written).
pub(crate) fn file_to_send(bytes: &[u8]) -> Option<File> {
    (bytes.len() >= SENDFILE_FROM)
        .then(|| memfile(bytes))
        .and_then(|r| {
            r.map_err(|e| eprintln!("bench: no in-memory file ({e}); using write(2)"))
                .ok()
        })
}

/// An anonymous in-memory file (`memfd_create(2)`) holding `bytes`.
fn memfile(bytes: &[u8]) -> std::io::Result<File> {
    use std::io::Write;
    // SAFETY: the name is a valid C string; the returned descriptor is checked and then owned by
    // the `File`.
    let fd = unsafe { libc::memfd_create(c"ortserve-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(bytes)?;
    Ok(f)
}

/// Sends `len` bytes of `file` from `from` on `stream`, waiting whenever the socket is full.
/// Each call keeps its own offset, so connections can share one file.
pub(crate) async fn sendfile_range(
    stream: &TcpStream,
    file: &File,
    from: usize,
    len: usize,
) -> std::io::Result<()> {
    send_all(stream, len, |done| {
        let mut offset = (from + done) as libc::off_t;
        // SAFETY: both descriptors are open for the duration of the call, and `offset` is a
        // valid pointer to a local.
        unsafe {
            libc::sendfile(
                stream.as_raw_fd(),
                file.as_raw_fd(),
                &mut offset,
                len - done,
            )
        }
    })
    .await
}

/// Sends `len` bytes on `stream` with `send`, a non-blocking system call that sends what is left
/// after the first `done` bytes and returns how many it sent (or -1), waiting whenever the socket
/// is full.
pub(crate) async fn send_all(
    stream: &TcpStream,
    len: usize,
    mut send: impl FnMut(usize) -> isize,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let n = send(done);
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match sent {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What one load run measured.
#[derive(Debug, Default, Clone)]
pub struct LoadResult {
    /// Answered requests by HTTP status. The gRPC load generator counts a call answered OK
    /// under 200 and any other gRPC code under its number (1 to 16), so both build a row alike.
    pub statuses: BTreeMap<u16, u64>,
    /// Connection or protocol failures.
    pub errors: u64,
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
    /// Where the CPU went over the measured time (not the warm-up).
    pub cpu: Option<super::cpu::CpuSplit>,
}

impl LoadResult {
    /// Adds `other`'s counts and latencies to these (one connection's or caller's share).
    pub fn add(&mut self, other: LoadResult) {
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.errors += other.errors;
        self.latencies.extend(other.latencies);
    }

    pub fn ok(&self) -> u64 {
        self.statuses.get(&200).copied().unwrap_or(0)
    }

    pub fn requests_per_second(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile in milliseconds (of every answered request).
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let mut l = self.latencies.clone();
        l.sort();
        let i = ((l.len() as f64 - 1.0) * p).round() as usize;
        l[i].as_secs_f64() * 1e3
    }
}

/// Builds a complete HTTP/1.1 request (keep-alive).
pub fn request(method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads one response; returns its status. `buf` keeps bytes that arrived past it.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let (status, body) = read_head_and_body(stream, buf).await?;
    buf.drain(..body.end);
    Ok(status)
}

/// Reads until `buf` holds one whole response; returns its status and where its body lies in
/// `buf`.
async fn read_head_and_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, std::ops::Range<usize>)> {
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(stream, &mut chunk, buf, "connection closed").await?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(std::io::Error::other)?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        read_more(stream, &mut chunk, buf, "body cut short").await?;
    }
    Ok((status, head_end..head_end + length))
}

/// One read from `stream` appended to `buf`; the end of the stream is an error saying `what`.
async fn read_more(
    stream: &mut TcpStream,
    chunk: &mut [u8],
    buf: &mut Vec<u8>,
    what: &'static str,
) -> std::io::Result<()> {
    let n = stream.read(chunk).await?;
    if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// One GET on a fresh connection; the body as text (for `/metrics`).
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&request("GET", path, &[], b"")).await?;
    let mut buf = Vec::new();
    let (status, body) = read_head_and_body(&mut stream, &mut buf).await?;
    if status != 200 {
        return Err(std::io::Error::other(format!(
            "GET {path}: status {status}"
        )));
    }
    String::from_utf8(buf[body].to_vec()).map_err(std::io::Error::other)
}

/// Drives `addr` with `concurrency` connections for `duration`, after `warmup` (not counted).
pub async fn run(
    addr: SocketAddr,
    request: Arc<Vec<u8>>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let request = Arc::new(Prepared::new(request));
    let cpu = cpu_between(measure_from, end);
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = LoadResult::default();
            let mut stream: Option<TcpStream> = None;
            let mut buf = Vec::with_capacity(64 * 1024);
            while Instant::now() < end {
                if stream.is_none() {
                    match TcpStream::connect(addr).await {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            stream = Some(s);
                            buf.clear();
                        }
                        Err(_) => {
                            r.errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let s = stream.as_mut().expect("connected above");
                let t0 = Instant::now();
                let outcome = match request.send(s).await {
                    Ok(()) => read_response(s, &mut buf).await,
                    Err(e) => Err(e),
                };
                let counted = t0 >= measure_from && Instant::now() <= end;
                match outcome {
                    Ok(status) => {
                        if counted {
                            *r.statuses.entry(status).or_default() += 1;
                            r.latencies.push(t0.elapsed());
                        }
                    }
                    Err(_) => {
                        if counted {
                            r.errors += 1;
                        }
                        stream = None;
                    }
                }
            }
            r
        }));
    }
    gather(tasks, duration, cpu).await
}

/// The callers' results added up, over `duration`, with the CPU split `cpu` reads.
pub async fn gather(
    tasks: Vec<tokio::task::JoinHandle<LoadResult>>,
    duration: Duration,
    cpu: tokio::task::JoinHandle<Option<crate::cpu::CpuSplit>>,
) -> LoadResult {
    let mut total = LoadResult::default();
    for t in tasks {
        if let Ok(r) = t.await {
            total.add(r);
        }
    }
    total.elapsed = duration;
    total.cpu = cpu.await.ok().flatten();
    total
}

/// Where the CPU went from `from` to `to`, read by a task on the calling runtime. That runtime
/// runs on one thread, the load generator's, so the snapshots name it as such.
pub fn cpu_between(
    from: Instant,
    to: Instant,
) -> tokio::task::JoinHandle<Option<super::cpu::CpuSplit>> {
    tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let before = super::cpu::snapshot()?;
        tokio::time::sleep_until(to.into()).await;
        Some(before.until(&super::cpu::snapshot()?))
    })
}
