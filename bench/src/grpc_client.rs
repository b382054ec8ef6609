//! A gRPC load generator: N callers, each sending the same prepared unary `ModelInfer` call back
//! to back for a bounded time, recording each call's status code and latency, like the HTTP
//! load generator in `client`.
//!
//! The generator shares the cores with the server it measures, so it costs what the HTTP
//! generator costs, no more: it writes the HTTP/2 frames itself (RFC 9113), as the HTTP generator
//! writes its prepared request. The message is encoded once (the gRPC length prefix and the
//! protobuf message) and, when large, put in an in-memory file and sent with `sendfile(2)`, as
//! the HTTP generator sends its bodies; the request's header block is encoded by hand (HPACK,
//! RFC 7541: the first call on a connection adds its headers to the server's table, later calls
//! name them in six bytes, as a client's encoder would); a connection's callers are its open
//! streams, kept by one task, as each of the HTTP generator's connections is one task. The
//! answers' header blocks are decoded with `httlib-hpack` (the server's encoder uses its table
//! and Huffman codes). Before this, the generator used the `h2` crate, with a task per caller:
//! 1.5 times the HTTP generator's CPU per call on the CNN fixture and 1.7 times at one MLP
//! client, which the server's side of the comparison paid for on the shared cores
//! (docs/BENCHMARKS.md, "gRPC: a load generator that costs what the HTTP one costs").
//!
//! The callers share a few HTTP/2 connections, [`CALLERS_PER_CONNECTION`] to each by default,
//! as a client's pool of channels would spread them; scenario b also runs one connection a
//! caller, as the HTTP generator has, to tell the protocol's cost from the sharing's.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ortserve::grpc::proto::inference::ModelInferRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::{cpu_between, file_to_send, send_all, sendfile_range, LoadResult};

/// Callers that share one HTTP/2 connection.
pub const CALLERS_PER_CONNECTION: usize = 8;

pub use ortserve::grpc::raw_request;

/// The method called.
const PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// Frame types and flags (RFC 9113 §6).
pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
pub(crate) const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
pub(crate) const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The receive window this client offers on every stream and on the connection: the most the
/// protocol allows, so the server never waits to send an answer.
pub(crate) const WINDOW: u32 = (1 << 31) - 1;
/// The protocol's initial window, frame size and header table size, until the server's
/// SETTINGS say otherwise. This client never raises the frame size it accepts.
pub(crate) const DEFAULT_WINDOW: i64 = 65_535;
pub(crate) const DEFAULT_FRAME: usize = 16_384;
const DEFAULT_TABLE: usize = 4_096;
/// The largest stream id (client streams are odd).
const LAST_STREAM: u32 = (1 << 31) - 1;
/// How long past the end of the run the calls still open may take; then they count as errors.
const GRACE: Duration = Duration::from_secs(5);

/// A call as sent: the gRPC length-prefixed message, and for a large one an in-memory file
/// holding the same bytes.
struct Call {
    message: Vec<u8>,
    file: Option<File>,
}

impl Call {
    fn new(request: &ModelInferRequest) -> Call {
        let encoded = prost::Message::encode_to_vec(request);
        let mut message = Vec::with_capacity(5 + encoded.len());
        message.push(0);
        message.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        message.extend_from_slice(&encoded);
        let file = file_to_send(&message);
        Call { message, file }
    }
}

/// An HPACK integer (RFC 7541 §5.1): `value` after `flags` in a first byte with a
/// `prefix_bits`-bit prefix.
fn hpack_int(out: &mut Vec<u8>, flags: u8, prefix_bits: u32, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// An HPACK string literal, not Huffman-coded (§5.2).
fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// How a request's header block is encoded.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Block {
    /// The first on a connection: `:path`, `:authority`, `content-type` and `te` as literals with
    /// incremental indexing (§6.2.1), each added to the server's table.
    Indexing,
    /// Every later one: those four named by their index in the server's table (§6.1; the entry
    /// added last is 62).
    Indexed,
    /// Literals without indexing (§6.2.2), where the server's table is too small to hold them.
    Plain,
}

/// The request headers: `:method POST` and `:scheme http` (static table entries 3 and 6), then
/// `:path`, `:authority`, `content-type: application/grpc` and `te: trailers`.
fn header_block(authority: &str, how: Block) -> Vec<u8> {
    let mut b = vec![0x83, 0x86];
    // (static index of the name, or 0 for a literal name; name; value)
    let fields: [(usize, &[u8], &[u8]); 4] = [
        (4, b":path", PATH.as_bytes()),
        (1, b":authority", authority.as_bytes()),
        (31, b"content-type", b"application/grpc"),
        (0, b"te", b"trailers"),
    ];
    match how {
        Block::Indexed => {
            // Added in the order above, so `te` is 62 and `:path` 65.
            for i in (62..62 + fields.len()).rev() {
                hpack_int(&mut b, 0x80, 7, i);
            }
        }
        Block::Indexing | Block::Plain => {
            let (flags, prefix) = if how == Block::Indexing {
                (0x40, 6)
            } else {
                (0x00, 4)
            };
            for (index, name, value) in fields {
                hpack_int(&mut b, flags, prefix, index);
                if index == 0 {
                    hpack_str(&mut b, name);
                }
                hpack_str(&mut b, value);
            }
        }
    }
    b
}

/// The room the indexed headers take in the server's table (§4.1: name, value and 32 octets
/// each).
fn table_room(authority: &str) -> usize {
    [
        b":path".len() + PATH.len(),
        b":authority".len() + authority.len(),
        b"content-type".len() + b"application/grpc".len(),
        b"te".len() + b"trailers".len(),
    ]
    .iter()
    .map(|n| n + 32)
    .sum()
}

/// A connection's request header blocks, each encoded once, and the room the indexed ones take
/// in the server's table.
struct Blocks {
    indexing: Vec<u8>,
    indexed: Vec<u8>,
    plain: Vec<u8>,
    room: usize,
}

impl Blocks {
    fn new(authority: &str) -> Blocks {
        Blocks {
            indexing: header_block(authority, Block::Indexing),
            indexed: header_block(authority, Block::Indexed),
            plain: header_block(authority, Block::Plain),
            room: table_room(authority),
        }
    }
}

/// A frame's nine-byte header.
pub(crate) fn frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

fn protocol_error(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// A call in flight: when it was sent, and the `grpc-status` its answer has carried so far.
struct Open {
    sent: Instant,
    status: Option<u16>,
}

/// What one run counts: a call that ended between `from` and `to` and was sent after `from`.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    to: Instant,
}

impl Window {
    fn counts(&self, sent: Instant) -> bool {
        sent >= self.from && Instant::now() <= self.to
    }
}

/// One HTTP/2 connection and the calls open on it.
struct Conn {
    tcp: TcpStream,
    blocks: Blocks,
    /// Bytes received; those before `at` are parsed.
    read: Vec<u8>,
    at: usize,
    /// Frames to write before the next payload.
    out: Vec<u8>,
    hpack: httlib_hpack::Decoder<'static>,
    /// The fields of the block last decoded.
    fields: Vec<(Vec<u8>, Vec<u8>, u8)>,
    next_stream: u32,
    first_sent: bool,
    /// The server's settings and the connection's send window.
    settled: bool,
    send_window: i64,
    stream_window: i64,
    max_frame: usize,
    max_streams: usize,
    table: usize,
    /// The calls open, by stream (a few: a scan costs less than hashing).
    open: Vec<(u32, Open)>,
    /// A header block continued in CONTINUATION frames: its stream, END_STREAM, the octets.
    block: Option<(u32, bool, Vec<u8>)>,
    /// DATA octets received since the last WINDOW_UPDATE this client sent for the connection.
    received: usize,
    goaway: bool,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let mut out = PREFACE.to_vec();
        // SETTINGS_ENABLE_PUSH 0, SETTINGS_INITIAL_WINDOW_SIZE the largest.
        frame_head(&mut out, 12, SETTINGS, 0, 0);
        out.extend_from_slice(&[0, 2, 0, 0, 0, 0, 0, 4]);
        out.extend_from_slice(&WINDOW.to_be_bytes());
        frame_head(&mut out, 4, WINDOW_UPDATE, 0, 0);
        out.extend_from_slice(&(WINDOW - DEFAULT_WINDOW as u32).to_be_bytes());
        Ok(Conn {
            tcp,
            blocks: Blocks::new(&addr.to_string()),
            read: Vec::with_capacity(64 * 1024),
            at: 0,
            out,
            hpack: httlib_hpack::Decoder::default(),
            fields: Vec::new(),
            next_stream: 1,
            first_sent: false,
            settled: false,
            send_window: DEFAULT_WINDOW,
            stream_window: DEFAULT_WINDOW,
            max_frame: DEFAULT_FRAME,
            max_streams: usize::MAX,
            table: DEFAULT_TABLE,
            open: Vec::new(),
            block: None,
            received: 0,
            goaway: false,
        })
    }

    /// Keeps `callers` calls open until the run's end (or the server's GOAWAY), then waits for
    /// the open ones. Returns an error when the connection failed; its open calls are then
    /// still in `self.open`.
    async fn drive(
        &mut self,
        call: &Call,
        callers: usize,
        window: Window,
        r: &mut LoadResult,
    ) -> std::io::Result<()> {
        let give_up = window.to + GRACE;
        let len = call.message.len() as i64;
        loop {
            let now = Instant::now();
            while self.settled
                && !self.goaway
                && self.next_stream <= LAST_STREAM
                && now < window.to
                && self.open.len() < callers.min(self.max_streams)
                && self.send_window >= len
            {
                if self.stream_window < len {
                    return Err(protocol_error(format!(
                        "the server's stream window ({}) is smaller than the message ({len} bytes)",
                        self.stream_window
                    )));
                }
                self.send(call).await?;
            }
            if !self.out.is_empty() {
                self.tcp.write_all(&self.out).await?;
                self.out.clear();
            }
            // Stream ids run out after about a billion calls: then a new connection.
            let spent = self.next_stream > LAST_STREAM;
            if self.open.is_empty() && (now >= window.to || self.goaway || spent) {
                return Ok(());
            }
            if self.read.capacity() - self.read.len() < 16 * 1024 {
                self.read.reserve(64 * 1024);
            }
            let n = tokio::time::timeout_at(give_up.into(), self.tcp.read_buf(&mut self.read))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.frames(window, r)?;
        }
    }

    /// Sends one call on a new stream: HEADERS, then DATA frames of at most the server's frame
    /// size, the last with END_STREAM. A large message is sent from its file; a small one is
    /// left in `out` with whatever else is to be written.
    async fn send(&mut self, call: &Call) -> std::io::Result<()> {
        let id = self.next_stream;
        self.next_stream += 2;
        let block = if self.table < self.blocks.room {
            &self.blocks.plain
        } else if self.first_sent {
            &self.blocks.indexed
        } else {
            &self.blocks.indexing
        };
        self.first_sent = true;
        frame_head(&mut self.out, block.len(), HEADERS, END_HEADERS, id);
        self.out.extend_from_slice(block);
        let len = call.message.len();
        self.send_window -= len as i64;
        self.open.push((
            id,
            Open {
                sent: Instant::now(),
                status: None,
            },
        ));
        let mut offset = 0;
        while offset < len {
            let n = (len - offset).min(self.max_frame);
            let flags = if offset + n == len { END_STREAM } else { 0 };
            frame_head(&mut self.out, n, DATA, flags, id);
            match &call.file {
                Some(file) => {
                    write_more(&self.tcp, &self.out).await?;
                    self.out.clear();
                    sendfile_range(&self.tcp, file, offset, n).await?;
                }
                None => self
                    .out
                    .extend_from_slice(&call.message[offset..offset + n]),
            }
            offset += n;
        }
        Ok(())
    }

    /// Handles every whole frame received.
    fn frames(&mut self, window: Window, r: &mut LoadResult) -> std::io::Result<()> {
        while self.read.len() - self.at >= 9 {
            let head = &self.read[self.at..self.at + 9];
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if len > DEFAULT_FRAME {
                return Err(protocol_error(format!("a frame of {len} bytes")));
            }
            if self.read.len() - self.at < 9 + len {
                break;
            }
            let start = self.at + 9;
            self.at = start + len;
            if self.block.is_some() && kind != CONTINUATION {
                return Err(protocol_error("a header block left unfinished"));
            }
            match kind {
                DATA => {
                    self.received += len;
                    if self.received >= 1 << 30 {
                        frame_head(&mut self.out, 4, WINDOW_UPDATE, 0, 0);
                        self.out
                            .extend_from_slice(&(self.received as u32).to_be_bytes());
                        self.received = 0;
                    }
                    if flags & END_STREAM != 0 {
                        self.end(id, window, r);
                    }
                }
                HEADERS => {
                    let payload = &self.read[start..start + len];
                    let mut from = 0;
                    let mut to = len;
                    if flags & PADDED != 0 {
                        let pad = *payload.first().ok_or_else(|| protocol_error("padding"))?;
                        from = 1;
                        to = len
                            .checked_sub(pad as usize)
                            .ok_or_else(|| protocol_error("padding"))?;
                    }
                    if flags & PRIORITY != 0 {
                        from += 5;
                    }
                    if from > to {
                        return Err(protocol_error("a HEADERS frame too short"));
                    }
                    let fragment = payload[from..to].to_vec();
                    self.block = Some((id, flags & END_STREAM != 0, fragment));
                    if flags & END_HEADERS != 0 {
                        self.headers(window, r)?;
                    }
                }
                CONTINUATION => {
                    let fragment = &self.read[start..start + len];
                    match &mut self.block {
                        Some((on, _, block)) if *on == id => block.extend_from_slice(fragment),
                        _ => return Err(protocol_error("a CONTINUATION out of place")),
                    }
                    if flags & END_HEADERS != 0 {
                        self.headers(window, r)?;
                    }
                }
                RST_STREAM => {
                    if let Some(open) = self.find(id) {
                        open.status = None;
                    }
                    self.end(id, window, r);
                }
                SETTINGS if flags & ACK == 0 => {
                    for p in self.read[start..start + len].chunks_exact(6) {
                        let value = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
                        match u16::from_be_bytes([p[0], p[1]]) {
                            1 => self.table = value as usize,
                            3 => self.max_streams = value as usize,
                            4 => self.stream_window = i64::from(value),
                            5 => self.max_frame = value as usize,
                            _ => {}
                        }
                    }
                    frame_head(&mut self.out, 0, SETTINGS, ACK, 0);
                    self.settled = true;
                }
                PING if flags & ACK == 0 => {
                    frame_head(&mut self.out, len, PING, ACK, 0);
                    let (out, read) = (&mut self.out, &self.read);
                    out.extend_from_slice(&read[start..start + len]);
                }
                GOAWAY if len >= 4 => {
                    let p = &self.read[start..start + 4];
                    let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
                    self.goaway = true;
                    // Streams above the last the server took were not processed.
                    let dropped: Vec<u32> = self
                        .open
                        .iter()
                        .map(|(s, _)| *s)
                        .filter(|s| *s > last)
                        .collect();
                    for s in dropped {
                        self.end(s, window, r);
                    }
                }
                WINDOW_UPDATE if len == 4 && id == 0 => {
                    let p = &self.read[start..start + 4];
                    let inc = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
                    self.send_window += i64::from(inc);
                }
                PUSH_PROMISE => return Err(protocol_error("a PUSH_PROMISE, push being off")),
                _ => {}
            }
        }
        if self.at == self.read.len() {
            self.read.clear();
            self.at = 0;
        } else if self.at >= 32 * 1024 {
            self.read.drain(..self.at);
            self.at = 0;
        }
        Ok(())
    }

    /// Decodes the header block just completed (every block is decoded, in order, to keep the
    /// table the server's encoder shares with it) and ends its stream if the block did.
    fn headers(&mut self, window: Window, r: &mut LoadResult) -> std::io::Result<()> {
        let Some((id, end_stream, mut block)) = self.block.take() else {
            return Ok(());
        };
        self.fields.clear();
        self.hpack
            .decode(&mut block, &mut self.fields)
            .map_err(|e| protocol_error(format!("HPACK: {e:?}")))?;
        let status = self
            .fields
            .iter()
            .find(|(name, _, _)| name == b"grpc-status")
            .and_then(|(_, value, _)| std::str::from_utf8(value).ok()?.parse().ok());
        if let (Some(code), Some(open)) = (status, self.find(id)) {
            open.status = Some(code);
        }
        if end_stream {
            self.end(id, window, r);
        }
        Ok(())
    }

    fn find(&mut self, id: u32) -> Option<&mut Open> {
        self.open.iter_mut().find(|(s, _)| *s == id).map(|(_, o)| o)
    }

    /// The call on stream `id` ended: counted under its code (OK as 200) or, with none, as an
    /// error.
    fn end(&mut self, id: u32, window: Window, r: &mut LoadResult) {
        let Some(at) = self.open.iter().position(|(s, _)| *s == id) else {
            return;
        };
        let (_, open) = self.open.swap_remove(at);
        if !window.counts(open.sent) {
            return;
        }
        match open.status {
            Some(code) => {
                let code = if code == 0 { 200 } else { code };
                *r.statuses.entry(code).or_default() += 1;
                r.latencies.push(open.sent.elapsed());
            }
            None => r.errors += 1,
        }
    }

    /// The connection failed: every call still open is an error.
    fn failed(&mut self, window: Window, r: &mut LoadResult) {
        for (_, open) in self.open.drain(..) {
            if window.counts(open.sent) {
                r.errors += 1;
            }
        }
    }
}

/// Writes `bytes` with `MSG_MORE`: the payload that follows (sent with `sendfile(2)`) goes out
/// in the same segments.
async fn write_more(tcp: &TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    send_all(tcp, bytes.len(), |done| {
        let rest = &bytes[done..];
        // SAFETY: the descriptor is open for the call and `rest` is valid for its length.
        unsafe {
            libc::send(
                tcp.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_MORE | libc::MSG_NOSIGNAL,
            )
        }
    })
    .await
}

/// One connection's callers until the run's end: when the connection fails, its open calls are
/// errors, and after 10 ms a new one is opened, as the HTTP generator does when it cannot
/// connect; after a GOAWAY, a new one at once.
async fn connection(
    addr: SocketAddr,
    call: Arc<Call>,
    callers: usize,
    window: Window,
) -> LoadResult {
    let mut r = LoadResult::default();
    while Instant::now() < window.to {
        let failed = match Conn::open(addr).await {
            Ok(mut conn) => match conn.drive(&call, callers, window, &mut r).await {
                Ok(()) => false,
                Err(_) => {
                    conn.failed(window, &mut r);
                    true
                }
            },
            Err(_) => {
                // Each caller's call could not be made.
                if window.counts(Instant::now()) {
                    r.errors += callers as u64;
                }
                true
            }
        };
        if failed {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    r
}

/// Drives the gRPC port at `addr` with `concurrency` callers for `duration`, after `warmup`
/// (not counted). A call answered OK counts under status 200 of the result, any other code the
/// server answered under its number; a call that got no answer (no connection, a reset stream)
/// is an error.
pub async fn run(
    addr: SocketAddr,
    request: ModelInferRequest,
    concurrency: usize,
    per_connection: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    let start = Instant::now();
    let window = Window {
        from: start + warmup,
        to: start + warmup + duration,
    };
    let cpu = cpu_between(window.from, window.to);
    let call = Arc::new(Call::new(&request));
    let connections = concurrency.div_ceil(per_connection.max(1)).max(1);
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let callers = concurrency / connections + usize::from(c < concurrency % connections);
        if callers > 0 {
            tasks.push(tokio::spawn(connection(
                addr,
                call.clone(),
                callers,
                window,
            )));
        }
    }
    crate::client::gather(tasks, duration, cpu).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(
        decoder: &mut httlib_hpack::Decoder<'static>,
        block: &[u8],
    ) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        decoder.decode(&mut block.to_vec(), &mut fields).unwrap();
        fields
            .into_iter()
            .map(|(n, v, _)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn the_header_blocks_decode_to_the_request_headers_in_sequence() {
        // An independent decoder, as the server's would be: the first block fills its table,
        // the later ones name the entries; the plain one leaves the table alone.
        let authority = "127.0.0.1:18081";
        let want: Vec<(String, String)> = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", PATH),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        let mut server = httlib_hpack::Decoder::default();
        let first = header_block(authority, Block::Indexing);
        assert_eq!(decoded(&mut server, &first), want);
        let later = header_block(authority, Block::Indexed);
        assert_eq!(later.len(), 6);
        for _ in 0..3 {
            assert_eq!(decoded(&mut server, &later), want);
        }
        let mut fresh = httlib_hpack::Decoder::default();
        let plain = header_block(authority, Block::Plain);
        assert_eq!(decoded(&mut fresh, &plain), want);
        // The plain block added nothing: an indexed one fails on this decoder.
        assert!(fresh.decode(&mut later.clone(), &mut Vec::new()).is_err());
        assert!(table_room(authority) < DEFAULT_TABLE);
    }

    #[test]
    fn hpack_integers_past_their_prefix_continue_in_seven_bit_groups() {
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        hpack_int(&mut out, 0, 5, 1337);
        assert_eq!(out, [31, 154, 10]);
        out.clear();
        hpack_int(&mut out, 0x80, 7, 65);
        assert_eq!(out, [0xc1]);
        out.clear();
        hpack_int(&mut out, 0x80, 7, 127);
        assert_eq!(out, [0xff, 0]);
    }
}
