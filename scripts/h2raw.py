"""Just enough HTTP/2 (cleartext, prior knowledge) and protobuf to send hostile gRPC traffic from
the standard library: frames written by hand, headers as HPACK literals (no Huffman, no table),
and the replies judged by frame type (a stream's end, RST_STREAM and GOAWAY error codes), which
needs no HPACK decoder. Used by scripts/hostile.py's gRPC classes.
"""
import socket
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
REFUSED_STREAM, CANCEL = 7, 8


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_int(value, bits, flags=0):
    limit = (1 << bits) - 1
    if value < limit:
        return bytes([flags | value])
    out = [flags | limit]
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name, value):
    """A literal header field without indexing, with a literal name; neither Huffman-coded."""
    name, value = name.encode(), value.encode()
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def grpc_headers(path, extra=()):
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "127.0.0.1"),
              ("content-type", "application/grpc"), ("te", "trailers"), *extra]
    return b"".join(hpack_literal(n, v) for n, v in fields)


def grpc_message(body, declared=None):
    """gRPC's length-prefixed message: not compressed, `declared` bytes long (the real length
    unless a lie is wanted)."""
    return b"\x00" + struct.pack(">I", len(body) if declared is None else declared) + body


# ---------------------------------------------------------------- protobuf, by hand


def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 127
        n >>= 7
        if n:
            out.append(b | 128)
        else:
            out.append(b)
            return bytes(out)


def pb_bytes(field, data):
    return varint(field << 3 | 2) + varint(len(data)) + data


def infer_request(model, name, datatype, shape, raw):
    """An inference.ModelInferRequest: one input with raw contents."""
    packed = b"".join(varint(d) for d in shape)
    tensor = pb_bytes(1, name.encode()) + pb_bytes(2, datatype.encode()) + pb_bytes(3, packed)
    return pb_bytes(1, model.encode()) + pb_bytes(5, tensor) + pb_bytes(7, raw)


INFER = "/inference.GRPCInferenceService/ModelInfer"


class H2:
    """One HTTP/2 connection: the preface and an empty SETTINGS go out at once."""

    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self.buf = b""
        self.next_stream = 1

    def send(self, *frames):
        self.sock.sendall(b"".join(frames))

    def open(self, headers_block, end_stream=False):
        sid = self.next_stream
        self.next_stream += 2
        self.send(frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, headers_block))
        return sid

    def frames(self, seconds, until=None):
        """Frames read for up to `seconds` (fewer when the connection closes, or `until(frames)`
        says enough). SETTINGS are acknowledged and PINGs answered, as a client must."""
        got, deadline = [], time.time() + seconds
        while time.time() < deadline:
            while len(self.buf) >= 9:
                length = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + length:
                    break
                kind, flags = self.buf[3], self.buf[4]
                sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
                payload = self.buf[9:9 + length]
                self.buf = self.buf[9 + length:]
                got.append((kind, flags, sid, payload))
                try:
                    if kind == SETTINGS and not flags & ACK:
                        self.send(frame(SETTINGS, ACK, 0))
                    elif kind == PING and not flags & ACK:
                        self.send(frame(PING, ACK, 0, payload))
                except OSError:
                    return got + [("closed",)]
            if until and until(got):
                return got
            self.sock.settimeout(max(0.01, deadline - time.time()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return got + [("closed",)]
            if not chunk:
                return got + [("closed",)]
            self.buf += chunk
        return got

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def goaway_code(frames):
    for f in frames:
        if f[0] == GOAWAY:
            return int.from_bytes(f[3][4:8], "big")
    return None


def ended(frames):
    """Streams the server ended: a HEADERS or DATA frame with END_STREAM, or RST_STREAM (with its
    error code), by stream id."""
    out = {}
    for f in frames:
        if f[0] in (HEADERS, DATA) and f[1] & END_STREAM:
            out[f[2]] = "end"
        elif f[0] == RST_STREAM:
            out[f[2]] = int.from_bytes(f[3][:4], "big")
    return out


def closed(frames):
    return any(f[0] == "closed" for f in frames)
