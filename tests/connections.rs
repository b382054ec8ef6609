//! The server on a loopback socket (127.0.0.1): slow clients are closed within the configured
//! timeouts while a normal client stays fast, and keep-alive clients lose no request when the
//! server drains (issue 13, findings 8 and 9). Every loop is bounded.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BODY: &str =
    r#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#;

fn request() -> Vec<u8> {
    format!(
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
}

/// Starts the server on 127.0.0.1:0; returns its address, a trigger for SIGTERM's part, and the
/// serving task.
async fn serve(
    server_yaml: &str,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (addr, _, stop, task) = serve_with_admin(server_yaml, false).await;
    (addr, stop, task)
}

/// [`serve`], with an admin listener on 127.0.0.1:0 when `admin` (its address second).
async fn serve_with_admin(
    server_yaml: &str,
    admin: bool,
) -> (
    std::net::SocketAddr,
    Option<std::net::SocketAddr>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let config = config(&format!(
        "server: {server_yaml}\nmodels: [{{name: mlp, path: mlp.onnx, devices: cpu, batching: {{max_batch_size: 8}}}}]"
    ));
    let server = ortserve::start(&config).await.expect("server starts");
    let listener = ortserve::http::bind("127.0.0.1:0", 4096).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = match admin {
        true => Some(ortserve::http::bind("127.0.0.1:0", 64).await.unwrap()),
        false => None,
    };
    let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
    let listeners = ortserve::Listeners {
        http: listener,
        admin,
        grpc: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listeners, async {
        let _ = stopped.await;
    }));
    (addr, admin_addr, stop, task)
}

/// One response: status, whether it said `Connection: close`, and its body.
async fn read_response(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> std::io::Result<(u16, bool, Vec<u8>)> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if l == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).await?;
    Ok((status, close, body))
}

/// Reads until the server closes the connection (or `limit` passes); returns how long it took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((t + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// One request on a fresh connection; the status and how long it took.
async fn one_request(addr: std::net::SocketAddr) -> (u16, Duration) {
    let t = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(&request()).await.unwrap();
    let (status, _, _) = read_response(&mut BufReader::new(r)).await.unwrap();
    (status, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_in_time_and_others_stay_fast() {
    let (addr, stop, task) = serve(
        "{header_timeout: 300ms, keep_alive_timeout: 800ms, body_timeout: 500ms, drain_delay: 0s}",
    )
    .await;

    // Slowloris: a request head that never ends, a header line every 100 ms.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let dribble = tokio::spawn(async move {
        for i in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return Some(t.elapsed());
            }
            let mut buf = [0u8; 64];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await
            {
                return Some(t.elapsed());
            }
        }
        None
    });
    // Meanwhile a normal client is answered at once.
    for _ in 0..5 {
        let (status, took) = one_request(addr).await;
        assert_eq!(status, 200);
        assert!(
            took < Duration::from_millis(250),
            "normal request took {took:?}"
        );
    }
    let closed = dribble
        .await
        .unwrap()
        .expect("the slow head's connection was closed");
    assert!(
        closed < Duration::from_millis(900),
        "closed after {closed:?}; header_timeout is 300 ms"
    );

    // An idle keep-alive connection closes after keep_alive_timeout.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(&request()).await.unwrap();
    assert_eq!(read_response(&mut r).await.unwrap().0, 200);
    let mut stream = r.into_inner().reunite(w).unwrap();
    let idle = closed_within(&mut stream, Duration::from_secs(3))
        .await
        .expect("the idle connection was closed");
    assert!(
        idle >= Duration::from_millis(600) && idle < Duration::from_millis(2000),
        "closed after {idle:?}; keep_alive_timeout is 800 ms"
    );

    // A body that stops arriving is answered 408 at body_timeout.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let t = Instant::now();
    w.write_all(
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"inputs\":",
    )
    .await
    .unwrap();
    let (status, _, body) = tokio::time::timeout(
        Duration::from_secs(3),
        read_response(&mut BufReader::new(r)),
    )
    .await
    .expect("answered")
    .unwrap();
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_clients_lose_no_request_when_the_server_drains() {
    let (addr, stop, task) = serve("{drain_delay: 1s, shutdown_timeout: 5s}").await;
    let ok = Arc::new(AtomicUsize::new(0));
    let broken = Arc::new(AtomicUsize::new(0));
    let told_to_close = Arc::new(AtomicUsize::new(0));
    let signalled = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (ok, broken, told, signalled) = (
                ok.clone(),
                broken.clone(),
                told_to_close.clone(),
                signalled.clone(),
            );
            tokio::spawn(async move {
                let mut closes_after_signal = 0;
                // Bounded: 20 s of requests at most.
                let end = Instant::now() + Duration::from_secs(20);
                'connect: while Instant::now() < end {
                    // Refused: the server no longer listens (a client would go to another pod).
                    let Ok(stream) = TcpStream::connect(addr).await else {
                        break;
                    };
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    while Instant::now() < end {
                        let after_signal = signalled.load(Ordering::Acquire);
                        if w.write_all(&request()).await.is_err() {
                            // Nothing was accepted on this connection; try a new one.
                            continue 'connect;
                        }
                        match read_response(&mut r).await {
                            Ok((200, close, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if close {
                                    if after_signal {
                                        closes_after_signal += 1;
                                    }
                                    continue 'connect;
                                }
                            }
                            Ok((status, _, body)) => {
                                panic!("{status}: {}", String::from_utf8_lossy(&body))
                            }
                            Err(e) => {
                                broken.fetch_add(1, Ordering::Relaxed);
                                eprintln!("a written request got no answer: {e}");
                                continue 'connect;
                            }
                        }
                    }
                }
                if closes_after_signal > 0 {
                    told.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    signalled.store(true, Ordering::Release);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let served = ok.load(Ordering::Relaxed);
    assert!(before > 0 && served > before, "{before} then {served}");
    assert_eq!(
        broken.load(Ordering::Relaxed),
        0,
        "requests lost over the drain"
    );
    assert_eq!(
        told_to_close.load(Ordering::Relaxed),
        16,
        "every client got Connection: close after the signal"
    );
}

/// A burst of connections bigger than tokio's default listen backlog (128) all complete their
/// handshakes before the server accepts one: none waits a second for a dropped SYN to be sent
/// again (a liveness probe took 1.04 s under `scripts/hostile.py` before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_fits_the_listen_backlog() {
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    let burst = 300.min(somaxconn);
    let listener = ortserve::http::bind("127.0.0.1:0", 4096).await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Nothing accepts: every connection waits in the backlog.
    let connected = tokio::task::spawn_blocking(move || {
        (0..burst)
            .map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let failed = connected.iter().filter(|c| c.is_err()).count();
    assert_eq!(
        failed, 0,
        "{failed} of {burst} connections did not complete"
    );
    drop(listener);
}

/// A connection's read buffer is at most 128 KiB (`READ_BUFFER` in crates/http/src/serve.rs): a request
/// head larger than that is refused with 431 and the connection closed, and the server goes on
/// serving; a body larger than the buffer is read in several reads and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_larger_than_the_read_buffer_is_refused_and_a_larger_body_is_served() {
    let (addr, stop, task) = serve("{drain_delay: 0s}").await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let pad = "a".repeat(200 << 10);
    w.write_all(
        format!("GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Pad: {pad}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut r = BufReader::new(r);
    let (status, _, _) = read_response(&mut r).await.unwrap();
    assert_eq!(status, 431, "a 200 KiB head");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection is closed after the 431");
    // Issue 26, defect 4: heads between 128 and about 190 KiB that arrived in one write were
    // parsed whole and served; the limit is the same however the head arrives. Just under it
    // is served.
    for kib in [129, 150, 190] {
        let (mut r, _w) = send_padded_head(addr, kib << 10).await;
        let (status, _, _) = read_response(&mut r).await.unwrap();
        assert_eq!(status, 431, "a {kib} KiB head in one write");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the connection is closed after the 431");
    }
    let (mut r, _w) = send_padded_head(addr, (127 << 10) - 100).await;
    let (status, _, _) = read_response(&mut r).await.unwrap();
    assert_eq!(status, 200, "a head just under 127 KiB");

    // 300 KiB of JSON whitespace after the request: one body, several reads.
    let body = format!("{BODY}{}", " ".repeat(300 << 10));
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(
        format!(
            "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, _, answer) = read_response(&mut BufReader::new(r)).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(one_request(addr).await.0, 200);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

/// A GET of liveness whose head carries `pad` bytes of one header, written at once on a fresh
/// connection; returns both halves (the writing one kept open until the answer is read).
async fn send_padded_head(
    addr: std::net::SocketAddr,
    pad: usize,
) -> (
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let pad = "a".repeat(pad);
    w.write_all(
        format!("GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Pad: {pad}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    (BufReader::new(r), w)
}

/// A GET on a fresh connection: the status and how long the answer took.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut BufReader::new(r)).await.unwrap();
    (status, t.elapsed())
}

/// Clients that pipeline requests and never read their answers (issue 24, finding 1): each
/// fills the server's socket buffer and blocks its writes. They take every connection of the
/// data port; the admin port still answers liveness at once, and each stalled connection is
/// closed once its write has made no progress for `write_timeout`, so the data port serves
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_closed_and_cannot_starve_the_probes() {
    let (addr, admin, stop, task) = serve_with_admin(
        "{max_connections: 4, write_timeout: 600ms, keep_alive_timeout: 60s, drain_delay: 0s}",
        true,
    )
    .await;
    let admin = admin.unwrap();
    // Each request is answered 404 with its 16 KiB path in the body: 2,000 of them are 32 MiB
    // of answers, far more than loopback's socket buffers hold.
    let one = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "p".repeat(16 << 10));
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let one = one.clone();
        // Writes until the server stops reading (its buffers are full too) or closes.
        let writer = tokio::spawn(async move {
            for _ in 0..2000 {
                let sent =
                    tokio::time::timeout(Duration::from_secs(10), w.write_all(one.as_bytes()));
                if !matches!(sent.await, Ok(Ok(()))) {
                    break;
                }
            }
            w
        });
        stalled.push((r, writer));
    }
    // Let the writes fill every buffer and stall.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The admin port is not behind the data port's connection limit. (A second, not the
    // 100 ms `scripts/hostile.py` holds the release binary to: this debug build shares two
    // cores with the other tests and with clients writing 128 MiB.)
    for _ in 0..5 {
        let (status, took) = get(admin, "/v2/health/live").await;
        assert_eq!(status, 200);
        assert!(
            took < Duration::from_secs(1),
            "liveness on the admin port took {took:?} with the data port full"
        );
    }
    let (status, _) = get(admin, "/v2/health/ready").await;
    assert_eq!(status, 200);
    let (status, _) = get(admin, "/v2/models/mlp").await;
    assert_eq!(status, 404, "the admin port serves probes and metrics only");

    // The data port serves again once the stalled connections are closed.
    let (status, took) = tokio::time::timeout(Duration::from_secs(5), one_request(addr))
        .await
        .expect("a normal request was answered while every connection was held by a client that does not read");
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_millis(2500),
        "answered after {took:?}; write_timeout is 600 ms"
    );
    // And every stalled connection was closed: reading it ends (in a reset or the end). (Read
    // one too early, and it is a client that reads again: its answers go on.)
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for (mut r, writer) in stalled {
        let mut buf = vec![0u8; 1 << 16];
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a stalled connection is still open");
        drop(writer.await);
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// RFC 9112 section 3.2 (issue 24, finding 6): an HTTP/1.1 request without a `Host` header, or
/// with two, is answered 400; HTTP/1.0 may omit it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_1_requests_need_exactly_one_host() {
    let (addr, stop, task) = serve("{drain_delay: 0s}").await;
    for (head, want) in [
        ("GET /v2/health/live HTTP/1.1\r\n\r\n", 400),
        (
            "GET /v2/health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
        ),
        ("GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        ("GET /v2/health/live HTTP/1.0\r\n\r\n", 200),
    ] {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        w.write_all(head.as_bytes()).await.unwrap();
        let (status, _, body) = read_response(&mut BufReader::new(r)).await.unwrap();
        assert_eq!(status, want, "{head:?}: {}", String::from_utf8_lossy(&body));
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// An error answered before the request's body has arrived (an unknown model) says
/// `Connection: close`: the server does not keep that connection, and a keep-alive client that
/// was not told would write its next request on a closed socket. A request answered 200 keeps
/// its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_before_the_body_is_read_says_connection_close() {
    let (addr, stop, task) = serve("{drain_delay: 0s}").await;
    let body = r#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#;
    for (model, want, closes) in [("zzz", 404, true), ("mlp", 200, false)] {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let head = format!(
            "POST /v2/models/{model}/infer HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        w.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.write_all(body.as_bytes()).await.unwrap();
        let (status, close, text) = read_response(&mut BufReader::new(r)).await.unwrap();
        assert_eq!(status, want, "{}", String::from_utf8_lossy(&text));
        assert_eq!(close, closes, "{model}: Connection: close");
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// Issue 24, finding 6: a chunk that declares more than `max_body_bytes` is answered 413 at
/// once, not after `body_timeout` while the server waits for bytes it would refuse, whether the
/// size line comes with the head or after it, and on a keep-alive connection's second request.
/// Chunked bodies within the limit are served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_declared_over_the_body_limit_is_refused_at_once() {
    let (addr, stop, task) =
        serve("{drain_delay: 0s, body_timeout: 30s, max_body_bytes: 1MiB}").await;
    let head = "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let within = format!("{head}{:x}\r\n{BODY}\r\n0\r\n\r\n", BODY.len());
    for (first, size_line, later) in [
        ("", "ffffffffffffffff\r\n", false),
        ("", "100001;ext=1\r\n", true),
        (within.as_str(), "ffffffffffffffff\r\n", false),
        (within.as_str(), "200000\r\n", true),
    ] {
        let t = Instant::now();
        let stream = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        if !first.is_empty() {
            w.write_all(first.as_bytes()).await.unwrap();
            let (status, close, _) = read_response(&mut r).await.unwrap();
            assert_eq!(
                (status, close),
                (200, false),
                "a chunked body within the limit"
            );
        }
        w.write_all(head.as_bytes()).await.unwrap();
        if later {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        w.write_all(size_line.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), read_response(&mut r)).await;
        let (status, close, body) = answer
            .unwrap_or_else(|_| panic!("{size_line:?}: no answer within 10 s"))
            .unwrap();
        assert_eq!(
            status,
            413,
            "{size_line:?}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(close, "{size_line:?}: the connection is not kept");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
