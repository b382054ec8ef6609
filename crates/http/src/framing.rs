//! Reads an HTTP/1.1 connection's request framing along with hyper, for the one fact hyper does
//! not expose: the size a chunk declares. A chunk that declares more than the body limit is
//! answered 413 at once (a size line of 2^64-1 would otherwise hold the request until its body
//! timeout, waiting for bytes that would be refused anyway).
//!
//! hyper stays the parser: this only follows heads (their `Content-Length` and
//! `Transfer-Encoding`), fixed-length bodies and chunk size lines, keeping at most [`KEPT`] bytes
//! of a line. Anything it cannot follow exactly (a head or chunk hyper will refuse, a header it
//! would need but only sees part of) turns it off for the rest of the connection, which then
//! behaves as it would without it.

/// The bytes of one line that are kept: enough for a header's name and a length or coding, and
/// for a chunk size (16 hex digits at most).
const KEPT: usize = 256;

/// A chunk size line declared more than the body limit: `request` is the ordinal of its request
/// on the connection (1 for the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Oversized {
    pub request: u64,
    pub declared: u64,
}

/// What a request's body reader gets instead of the bytes of a chunk declared over the limit.
#[derive(Debug)]
pub(crate) struct ChunkTooLarge {
    pub declared: u64,
    pub limit: u64,
}

impl std::fmt::Display for ChunkTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a chunk declares {} bytes; the body limit is {}",
            self.declared, self.limit
        )
    }
}

impl std::error::Error for ChunkTooLarge {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Lines of a request head (leading empty lines are skipped, as hyper does).
    Head,
    /// This many bytes of a `Content-Length` body are still to come.
    Length(u64),
    /// A chunk size line.
    Size,
    /// This many bytes of a chunk's data are still to come.
    Data(u64),
    /// The empty line after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk, until an empty one.
    Trailers,
    /// Not following this connection any more.
    Off,
}

/// What a head said about its body so far.
#[derive(Default)]
struct Head {
    started: bool,
    /// Whether the last `Transfer-Encoding` ends in `chunked` (none seen: `None`).
    chunked: Option<bool>,
    length: Option<u64>,
    /// A header this could not follow.
    lost: bool,
}

pub(crate) struct Framing {
    state: State,
    limit: u64,
    /// Request heads completed: the ordinal of the request whose body is being read.
    heads: u64,
    /// The first [`KEPT`] bytes of the line so far, and its whole length.
    line: Vec<u8>,
    line_len: usize,
    head: Head,
}

impl Framing {
    /// Follows a connection whose request bodies may be at most `limit` bytes.
    pub(crate) fn new(limit: u64) -> Framing {
        Framing {
            state: State::Head,
            limit,
            heads: 0,
            line: Vec::new(),
            line_len: 0,
            head: Head::default(),
        }
    }

    /// Reads the connection's next `bytes` along; says when a chunk size line among them
    /// declared more than the limit (the connection is not followed after that).
    pub(crate) fn read(&mut self, mut bytes: &[u8]) -> Option<Oversized> {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return None,
                State::Length(n) | State::Data(n) => {
                    let take = n.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    let left = n - take;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Head,
                        (State::Length(_), _) => State::Length(left),
                        (_, 0) => State::DataEnd,
                        _ => State::Data(left),
                    };
                }
                _ => match bytes.iter().position(|&b| b == b'\n') {
                    None => {
                        self.keep(bytes);
                        bytes = &[];
                    }
                    Some(end) => {
                        self.keep(&bytes[..end]);
                        bytes = &bytes[end + 1..];
                        if let Some(found) = self.line_done() {
                            return Some(found);
                        }
                    }
                },
            }
        }
        None
    }

    fn keep(&mut self, part: &[u8]) {
        let room = KEPT.saturating_sub(self.line.len());
        self.line.extend_from_slice(&part[..part.len().min(room)]);
        self.line_len += part.len();
    }

    /// Whether the whole line is in `line` (its `\r` stripped); `None` when it was cut.
    fn whole_line(&self) -> Option<&[u8]> {
        (self.line_len <= KEPT).then(|| self.line.strip_suffix(b"\r").unwrap_or(&self.line))
    }

    fn line_done(&mut self) -> Option<Oversized> {
        let empty = self.whole_line().is_some_and(<[u8]>::is_empty);
        let mut found = None;
        self.state = match self.state {
            State::Head if empty && !self.head.started => State::Head,
            State::Head if empty => {
                self.heads += 1;
                let head = std::mem::take(&mut self.head);
                match (head.lost, head.chunked, head.length) {
                    (true, _, _) | (_, Some(false), _) => State::Off,
                    (_, Some(true), _) => State::Size,
                    (_, None, Some(n)) if n > 0 => State::Length(n),
                    _ => State::Head,
                }
            }
            State::Head if !self.head.started => {
                self.head.started = true;
                State::Head
            }
            State::Head => {
                self.header();
                State::Head
            }
            State::Size => match chunk_size(&self.line) {
                None => State::Off,
                Some(0) => State::Trailers,
                Some(n) if n > self.limit => {
                    found = Some(Oversized {
                        request: self.heads,
                        declared: n,
                    });
                    State::Off
                }
                Some(n) => State::Data(n),
            },
            State::DataEnd if empty => State::Size,
            State::DataEnd => State::Off,
            State::Trailers if empty => State::Head,
            other => other,
        };
        self.line.clear();
        self.line_len = 0;
        found
    }

    /// A header line of a head: notes its `Transfer-Encoding` or `Content-Length`.
    fn header(&mut self) {
        let cut = self.line_len > KEPT;
        if self.line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            // A folded line: hyper refuses it.
            self.head.lost = true;
            return;
        }
        let Some(colon) = self.line.iter().position(|&b| b == b':') else {
            // A name longer than what is kept is neither header; a line without a colon is
            // refused by hyper.
            self.head.lost |= !cut;
            return;
        };
        let name = &self.line[..colon];
        let te = name.eq_ignore_ascii_case(b"transfer-encoding");
        let cl = name.eq_ignore_ascii_case(b"content-length");
        if !te && !cl {
            return;
        }
        let Some(line) = self.whole_line() else {
            self.head.lost = true;
            return;
        };
        let value = line[colon + 1..].trim_ascii();
        if te {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            self.head.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            return;
        }
        let n = std::str::from_utf8(value)
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok());
        match (n, self.head.length) {
            (Some(n), None) => self.head.length = Some(n),
            (Some(n), Some(seen)) if n == seen => {}
            _ => self.head.lost = true,
        }
    }
}

/// A chunk size line's size: its leading hex digits (1 to 16 of them).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let hex = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What reading `stream` finds, read at once and byte by byte.
    fn found(limit: u64, stream: &[u8]) -> Option<Oversized> {
        let whole = Framing::new(limit).read(stream);
        let mut f = Framing::new(limit);
        let bytewise = stream.iter().find_map(|b| f.read(std::slice::from_ref(b)));
        assert_eq!(whole, bytewise, "{}", String::from_utf8_lossy(stream));
        whole
    }

    const CHUNKED: &str = "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn a_chunk_over_the_limit_is_found_in_its_request() {
        let s = format!("{CHUNKED}ffffffffffffffff\r\n");
        assert_eq!(
            found(1000, s.as_bytes()),
            Some(Oversized {
                request: 1,
                declared: u64::MAX
            })
        );
        // The size line is read whole before it counts; an extension does not hide it.
        assert_eq!(found(1000, format!("{CHUNKED}3e9").as_bytes()), None);
        let s = format!("{CHUNKED}3e9;name=value\r\n");
        assert_eq!(found(1000, s.as_bytes()).map(|o| o.declared), Some(1001));
        assert_eq!(found(1001, s.as_bytes()), None);
    }

    #[test]
    fn pipelined_requests_are_counted_through_their_bodies() {
        let body = "x".repeat(300);
        let s = format!(
            "\r\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n\
             POST /b HTTP/1.1\r\ncontent-length: 300\r\n\r\n{body}\
             {CHUNKED}5\r\nhello\r\n10;e\r\n{}\r\n0\r\nTrailer: t\r\n\r\n\
             {CHUNKED}100000\r\n",
            "y".repeat(16)
        );
        assert_eq!(
            found(65536, s.as_bytes()),
            Some(Oversized {
                request: 4,
                declared: 0x100000
            })
        );
        // A body that contains what looks like a chunked head is skipped as bytes.
        let inner = format!("{CHUNKED}ffffffff\r\n");
        let s = format!(
            "POST /b HTTP/1.1\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        );
        assert_eq!(found(10, s.as_bytes()), None);
    }

    #[test]
    fn what_hyper_would_refuse_turns_it_off() {
        for s in [
            // Two different lengths, a length that is not a number, a coding not ending in
            // chunked, a folded line, a header without a colon, bad chunk data ends and sizes.
            "POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_string(),
            "POST /x HTTP/1.1\r\nContent-Length: +1\r\n\r\n".to_string(),
            "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".to_string(),
            "POST /x HTTP/1.1\r\nA: b\r\n c\r\n\r\n".to_string(),
            "POST /x HTTP/1.1\r\nnonsense\r\n\r\n".to_string(),
            format!("{CHUNKED}2\r\nabX\r\n"),
            format!("{CHUNKED}zz\r\n"),
            format!("{CHUNKED}{}\r\n", "1".repeat(17)),
        ] {
            let mut f = Framing::new(10);
            assert_eq!(f.read(s.as_bytes()), None, "{s:?}");
            let s2 = format!("{CHUNKED}ffff\r\n");
            assert_eq!(f.read(s2.as_bytes()), None, "still off after {s:?}");
            assert_eq!(f.state, State::Off, "{s:?}");
        }
        // A Transfer-Encoding header longer than what is kept is not guessed at.
        let s = format!(
            "POST /x HTTP/1.1\r\nTransfer-Encoding: {}chunked\r\n\r\nffff\r\n",
            " ".repeat(KEPT)
        );
        assert_eq!(found(10, s.as_bytes()), None);
        // A long header of another name is passed over.
        let s = format!(
            "POST /x HTTP/1.1\r\nX-{}: 1\r\nTransfer-Encoding: chunked\r\n\r\nffff\r\n",
            "a".repeat(4 * KEPT)
        );
        assert_eq!(found(10, s.as_bytes()).map(|o| o.request), Some(1));
    }
}
