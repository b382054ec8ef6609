"""Checks of one gRPC connection's calls, over raw HTTP/2 frames (scripts/h2raw.py), against a
running server's gRPC port. Written for the review of the per-connection executor
(crates/grpc/src/streams.rs); the figures it printed are in docs/BENCHMARKS.md ("gRPC: each
connection's calls polled by the connection's own task").

  hol N        a ModelInfer of N unpacked bool_contents elements on connection A, then 10 ms
               after its last byte a PING and a small call on A and on another connection B:
               when each is answered (one call must not hold up its connection)
  many N       N waves of 128 concurrent small calls on one connection (a hang is a lost wake-up)
  connect      a CONNECT stream, then a call on the same connection
  drain PIDFILE  a call half sent, SIGTERM to the server, the rest after GOAWAY: answered?
  leak PIDFILE N N connections that each send 100 calls' HEADERS and 10 KB of DATA and close at
               once: the server's RSS before and after (calls left when a connection ends)

The server's model is `mlp` (tests/fixtures/mlp.onnx), e.g. with `max_body_bytes: 64MiB` for
`hol`. Usage: python3 scripts/grpc_connection_checks.py PORT CHECK [ARGS]
"""
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import h2raw as H  # noqa: E402


def pb_varint_field(field, v):
    return H.varint(field << 3 | 0) + H.varint(v)

def small_infer():
    raw = struct.pack("<4f", 1, 2, 3, 4)
    return H.grpc_message(H.infer_request("mlp", "input", "FP32", [1, 4], raw))

def big_infer(n):
    # InferTensorContents.bool_contents (field 1) NOT packed: 2 bytes per element, each a
    # separate field for prost to decode.
    contents = b"\x08\x01" * n
    packed = H.varint(n)
    tensor = H.pb_bytes(1, b"input") + H.pb_bytes(2, b"BOOL") + H.pb_bytes(3, packed) + H.pb_bytes(5, contents)
    return H.grpc_message(H.pb_bytes(1, b"mlp") + H.pb_bytes(5, tensor))

class C:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Our receive windows as large as allowed.
        self.s.sendall(H.PREFACE + H.frame(H.SETTINGS, 0, 0, struct.pack(">HI", 4, 0x7FFFFFFF))
                       + H.frame(H.WINDOW_UPDATE, 0, 0, struct.pack(">I", 0x7FFFFFFF - 65535)))
        self.buf = b""; self.next = 1
        self.conn_win = 65535; self.init_win = 65535; self.max_frame = 16384
        self.win = {}; self.ends = {}; self.acks = {}; self.goaway = None; self.closed = False
        self.log = []

    def open(self, block, end=False):
        sid = self.next; self.next += 2
        self.win[sid] = self.init_win
        self.s.sendall(H.frame(H.HEADERS, H.END_HEADERS | (H.END_STREAM if end else 0), sid, block))
        return sid

    def ping(self, tag):
        self.acks[tag] = None
        self.s.sendall(H.frame(H.PING, 0, 0, tag.ljust(8, b"\0")[:8]))

    def pump(self, t):
        self.s.settimeout(max(0.0005, t))
        try:
            chunk = self.s.recv(1 << 20)
        except socket.timeout:
            chunk = None
        except OSError:
            self.closed = True; return
        if chunk == b"":
            self.closed = True; return
        if chunk:
            self.buf += chunk
        now = time.perf_counter()
        while len(self.buf) >= 9:
            ln = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + ln: break
            k, fl = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            p = self.buf[9:9 + ln]; self.buf = self.buf[9 + ln:]
            self.log.append((now, k, fl, sid, len(p)))
            if k == H.SETTINGS and not fl & H.ACK:
                for i in range(0, len(p), 6):
                    ident, val = struct.unpack(">HI", p[i:i + 6])
                    if ident == 4:
                        d = val - self.init_win; self.init_win = val
                        for s in self.win: self.win[s] += d
                    if ident == 5: self.max_frame = val
                self.s.sendall(H.frame(H.SETTINGS, H.ACK, 0))
            elif k == H.PING:
                if fl & H.ACK:
                    self.acks[p.rstrip(b"\0")] = now
                else:
                    self.s.sendall(H.frame(H.PING, H.ACK, 0, p))
            elif k == H.WINDOW_UPDATE:
                inc = int.from_bytes(p[:4], "big") & 0x7FFFFFFF
                if sid == 0: self.conn_win += inc
                elif sid in self.win: self.win[sid] += inc
            elif k in (H.HEADERS, H.DATA) and fl & H.END_STREAM:
                self.ends.setdefault(sid, ("end", now))
            elif k == H.RST_STREAM:
                self.ends.setdefault(sid, ("rst%d" % int.from_bytes(p[:4], "big"), now))
            elif k == H.GOAWAY:
                self.goaway = (int.from_bytes(p[4:8], "big"), now)

    def send_data(self, sid, data, end=True):
        off = 0
        while off < len(data):
            n = min(self.conn_win, self.win[sid], self.max_frame, len(data) - off)
            if n <= 0:
                self.pump(0.05); continue
            last = off + n == len(data)
            self.s.sendall(H.frame(H.DATA, H.END_STREAM if (last and end) else 0, sid, data[off:off + n]))
            self.conn_win -= n; self.win[sid] -= n; off += n
            if self.buf or True:
                # drain what the server sent without blocking
                self.pump(0.0005)

    def wait(self, cond, t=10):
        end = time.time() + t
        while not cond() and time.time() < end and not self.closed:
            self.pump(0.01)
        return cond()


def hol(port, n):
    """A big typed message on connection A; 10 ms after its last byte a PING and a small call on
    A and on B. Prints when each is answered, relative to the big message's last byte."""
    a, b = C(port), C(port)
    for c in (a, b):  # warm: one small call each
        sid = c.open(H.grpc_headers(H.INFER)); c.send_data(sid, small_infer())
        assert c.wait(lambda: sid in c.ends), "warm call"
    msg = big_infer(n)
    big = a.open(H.grpc_headers(H.INFER))
    a.send_data(big, msg)
    t0 = time.perf_counter()
    time.sleep(0.01)
    ts = time.perf_counter()
    a.ping(b"a"); b.ping(b"b")
    sa = a.open(H.grpc_headers(H.INFER)); a.send_data(sa, small_infer())
    sb = b.open(H.grpc_headers(H.INFER)); b.send_data(sb, small_infer())
    end = time.time() + 20
    while time.time() < end and not (big in a.ends and sa in a.ends and sb in b.ends and a.acks[b"a"] and b.acks[b"b"]):
        a.pump(0.001); b.pump(0.001)
    ms = lambda t: None if t is None else round((t - t0) * 1e3, 1)
    print(f"message {len(msg)/2**20:.1f} MiB; probes sent at +{ms(ts)} ms after its last byte")
    print(f"  big call on A ended: {a.ends.get(big)} at +{ms(a.ends.get(big, (0, None))[1])} ms")
    print(f"  PING on A acked at +{ms(a.acks[b'a'])} ms; small call on A ended at +{ms(a.ends.get(sa, (0, None))[1])} ms")
    print(f"  PING on B acked at +{ms(b.acks[b'b'])} ms; small call on B ended at +{ms(b.ends.get(sb, (0, None))[1])} ms")


def many(port, rounds, width=128):
    """`rounds` waves of `width` concurrent small calls on one connection; any call not ended in
    10 s is a hang (a lost wake-up)."""
    c = C(port)
    msg = small_infer(); t = time.perf_counter(); total = 0
    for r in range(rounds):
        sids = []
        for _ in range(width):
            sid = c.open(H.grpc_headers(H.INFER)); sids.append(sid)
        for sid in sids:
            c.send_data(sid, msg)
        ok = c.wait(lambda: all(s in c.ends for s in sids), 10)
        total += sum(1 for s in sids if s in c.ends)
        if not ok:
            print(f"round {r}: {sum(1 for s in sids if s not in c.ends)} calls hung"); return
        bad = [c.ends[s][0] for s in sids if c.ends[s][0] != "end"]
        if bad: print(f"round {r}: non-normal ends {bad[:5]}")
    print(f"{total} calls in {rounds} waves of {width} on one connection, all ended, {time.perf_counter()-t:.2f}s")


def connect(port):
    """A CONNECT stream: hyper answers it through the executor from inside the call's poll
    (execute_upgrade), i.e. execute() runs during Calls::poll. Then a normal call on the same
    connection."""
    c = C(port)
    block = b"".join(H.hpack_literal(k, v) for k, v in [(":method", "CONNECT"), (":authority", "127.0.0.1:1")])
    sid = c.open(block)
    c.wait(lambda: sid in c.ends, 3)
    print("CONNECT stream:", c.ends.get(sid), "frames:", [(k, fl, s, n) for (_, k, fl, s, n) in c.log if s == sid])
    s2 = c.open(H.grpc_headers(H.INFER)); c.send_data(s2, small_infer())
    print("call after it:", c.wait(lambda: s2 in c.ends, 5) and c.ends[s2][0], "closed:", c.closed)


def drain(port, pidfile):
    """A call whose message is half sent; SIGTERM; wait for GOAWAY and 0.5 s more; send the rest.
    The call must be answered and the connection closed after it."""
    import os, signal
    c = C(port)
    msg = small_infer()
    sid = c.open(H.grpc_headers(H.INFER))
    c.send_data(sid, msg[:10], end=False)
    c.pump(0.2)
    pid = int(open(pidfile).read())
    os.kill(pid, signal.SIGTERM); t0 = time.perf_counter()
    c.wait(lambda: c.goaway is not None, 15)
    print("GOAWAY:", c.goaway and (c.goaway[0], round((c.goaway[1] - t0) * 1e3)), "ms after SIGTERM")
    time.sleep(0.5)
    c.send_data(sid, msg[10:])
    c.wait(lambda: sid in c.ends, 5)
    print("half-sent call:", c.ends.get(sid) and c.ends[sid][0])
    c.wait(lambda: False, 2)
    print("connection closed afterwards:", c.closed)


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024


def leak(port, pidfile, conns, streams=100, chunk=10000, fin=True):
    """Per connection: wait for the server's SETTINGS and connection WINDOW_UPDATE, then in one
    write `streams` x [HEADERS(sid), DATA(sid, chunk bytes, no END_STREAM)], then FIN at once
    (fin) or after reading the server's frames for a while (not fin: the control, conn ended by
    the client's close after the streams were surely polled). Prints the server's RSS."""
    pid = int(open(pidfile).read())
    before = rss(pid)
    block = H.grpc_headers(H.INFER)
    payload = b"\0" * chunk
    buf = b"".join(H.frame(H.HEADERS, H.END_HEADERS, 1 + 2 * i, block) + H.frame(H.DATA, 0, 1 + 2 * i, payload)
                   for i in range(streams))
    for n in range(conns):
        c = C(port)
        c.wait(lambda: c.conn_win > 65535 and c.max_frame > 16384, 5)
        c.s.sendall(buf)
        if fin:
            c.s.shutdown(socket.SHUT_WR)
        else:
            c.wait(lambda: False, 0.3)
            c.s.shutdown(socket.SHUT_WR)
        c.wait(lambda: False, 5)
        c.s.close()
    time.sleep(1)
    print(f"{conns} conns x {streams} x (HEADERS + {chunk} B DATA), FIN {'at once' if fin else 'after 0.3 s'}: RSS {before} -> {rss(pid)} MiB")


if __name__ == "__main__":
    port, what = int(sys.argv[1]), sys.argv[2]
    if what == "hol":
        hol(port, int(sys.argv[3]))
    elif what == "many":
        many(port, int(sys.argv[3]))
    elif what == "connect":
        connect(port)
    elif what == "drain":
        drain(port, sys.argv[3])
    elif what == "leak":
        leak(port, sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(f"unknown check {what!r}; see the docstring")
