//! [`Reader`]: a cursor over one JSON text, its objects, arrays and strings, the values it
//! passes over by their brackets, and the small members it hands to serde_json.

use std::borrow::Cow;
use std::fmt::Display;

use serde::de::{DeserializeOwned, IgnoredAny};

use super::JsonError;

/// A cursor over one JSON text. Syntax errors are [`JsonError::Malformed`], worded
/// `{context}: {what} at line L column C`.
pub struct Reader<'a> {
    pub(super) b: &'a [u8],
    pub(super) pos: usize,
    context: &'static str,
}

/// JSON's whitespace.
#[inline(always)]
pub(super) fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\n' | b'\r' | b'\t')
}

/// Where the whitespace from `b[i]` ends.
#[inline(always)]
pub(super) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|&c| is_ws(c)) {
        i += 1;
    }
    i
}

impl<'a> Reader<'a> {
    /// A reader at the start of `text`; `context` starts every syntax error's message.
    pub fn new(text: &'a [u8], context: &'static str) -> Self {
        Reader {
            b: text,
            pos: 0,
            context,
        }
    }

    /// The cursor's byte offset.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// A reader of the same text with its cursor at `pos`.
    pub fn at(&self, pos: usize) -> Self {
        Reader {
            b: self.b,
            pos,
            context: self.context,
        }
    }

    /// A syntax error at byte `at`.
    pub fn error(&self, at: usize, what: impl Display) -> JsonError {
        let before = &self.b[..at.min(self.b.len())];
        let line = before.iter().filter(|&&c| c == b'\n').count() + 1;
        let column = before.len()
            - before
                .iter()
                .rposition(|&c| c == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        JsonError::Malformed(format!(
            "{}: {what} at line {line} column {column}",
            self.context
        ))
    }

    /// Moves the cursor past whitespace.
    #[inline(always)]
    pub(super) fn ws(&mut self) {
        self.pos = skip_ws(self.b, self.pos);
    }

    /// The next byte that is not whitespace, the cursor on it.
    pub fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.pos).copied()
    }

    /// A syntax error at the cursor: `expected` was expected there.
    pub(super) fn unexpected(&self, expected: &str) -> JsonError {
        match self.b.get(self.pos) {
            None => self.error(self.pos, format!("EOF while parsing {expected}")),
            Some(_) => self.error(self.pos, format!("expected {expected}")),
        }
    }

    fn eat(&mut self, c: u8, expected: &str) -> Result<(), JsonError> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    /// The end of the text: only whitespace may follow.
    pub fn end(mut self) -> Result<(), JsonError> {
        self.ws();
        if self.pos < self.b.len() {
            return Err(self.error(self.pos, "trailing characters"));
        }
        Ok(())
    }

    /// `{"key": value, ...}`: `each` gets every key with the cursor on its value, and must read
    /// the value. `each` may fail with the caller's own error (a protocol's, say), which the
    /// reader's errors convert into.
    pub fn object<E: From<JsonError>>(
        &mut self,
        mut each: impl FnMut(&mut Self, Cow<'a, str>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.members(b'{', b'}', |r| {
            if r.peek() != Some(b'"') {
                return Err(r.unexpected("a string key").into());
            }
            let key = r.string()?;
            r.eat(b':', "`:`")?;
            r.ws();
            each(r, key)
        })
    }

    /// `[value, ...]`: `each` gets the cursor on every element, and must read it (its error
    /// type as in [`Self::object`]).
    pub fn array<E: From<JsonError>>(
        &mut self,
        each: impl FnMut(&mut Self) -> Result<(), E>,
    ) -> Result<(), E> {
        self.members(b'[', b']', each)
    }

    /// The members of an object or array between `open` and `close`, separated by commas:
    /// `each` reads one, from the cursor after the separator.
    fn members<E: From<JsonError>>(
        &mut self,
        open: u8,
        close: u8,
        mut each: impl FnMut(&mut Self) -> Result<(), E>,
    ) -> Result<(), E> {
        let (opening, after) = if open == b'{' {
            ("an object", "`,` or `}`")
        } else {
            ("an array", "`,` or `]`")
        };
        self.eat(open, opening)?;
        if self.peek() == Some(close) {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.ws();
            each(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(c) if c == close => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.unexpected(after).into()),
            }
        }
    }

    /// The string at the cursor, unescaped.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        let start = self.pos;
        self.skip_string()?;
        let inner = &self.b[start + 1..self.pos - 1];
        if !inner.iter().any(|&c| c == b'\\' || c < 0x20) {
            if let Ok(s) = std::str::from_utf8(inner) {
                return Ok(Cow::Borrowed(s));
            }
        }
        serde_json::from_slice::<String>(&self.b[start..self.pos])
            .map(Cow::Owned)
            .map_err(|e| self.serde_error(start, e))
    }

    /// Moves past the string whose opening quote is at the cursor.
    fn skip_string(&mut self) -> Result<(), JsonError> {
        let mut i = self.pos + 1;
        loop {
            match self.b.get(i) {
                None => return Err(self.error(i, "EOF while parsing a string")),
                Some(b'"') => break,
                Some(b'\\') => i += 2,
                Some(_) => i += 1,
            }
        }
        self.pos = i + 1;
        Ok(())
    }

    /// Moves past one value and returns its text, matching only its brackets and strings: the
    /// text is checked by whoever reads it. An array's end is found by its square brackets
    /// alone and an object's by its braces (in JSON each kind balances by itself), searched
    /// for with SIMD: passing over 100 KB of numbers takes microseconds.
    pub fn skip(&mut self) -> Result<&'a [u8], JsonError> {
        self.ws();
        let start = self.pos;
        let (open, close) = match self.b.get(start) {
            None => return Err(self.unexpected("a value")),
            Some(b'"') => {
                self.skip_string()?;
                return Ok(&self.b[start..self.pos]);
            }
            Some(b'[') => (b'[', b']'),
            Some(b'{') => (b'{', b'}'),
            Some(_) => {
                let end = self.b[start..]
                    .iter()
                    .position(|&c| matches!(c, b',' | b':' | b']' | b'}') || is_ws(c))
                    .map_or(self.b.len(), |p| start + p);
                if end == start {
                    return Err(self.unexpected("a value"));
                }
                self.pos = end;
                return Ok(&self.b[start..end]);
            }
        };
        let mut depth = 0usize;
        let mut i = start;
        while let Some(p) = memchr::memchr3(open, close, b'"', &self.b[i..]) {
            i += p;
            match self.b[i] {
                b'"' => {
                    self.pos = i;
                    self.skip_string()?;
                    i = self.pos;
                    continue;
                }
                c if c == open => depth += 1,
                _ => depth -= 1,
            }
            i += 1;
            if depth == 0 {
                self.pos = i;
                return Ok(&self.b[start..i]);
            }
        }
        self.pos = self.b.len();
        Err(self.error(self.pos, "EOF while parsing a value"))
    }

    /// The value at the cursor, checked and typed by serde_json.
    pub fn value<T: DeserializeOwned>(&mut self) -> Result<T, JsonError> {
        self.ws();
        let start = self.pos;
        let text = self.skip()?;
        serde_json::from_slice(text).map_err(|e| self.serde_error(start, e))
    }

    /// Moves past a value nobody reads, checking that it is JSON.
    pub fn ignore(&mut self) -> Result<(), JsonError> {
        self.value::<IgnoredAny>().map(|_| ())
    }

    /// serde_json's error about the text from `start`, its place given in the whole text.
    fn serde_error(&self, start: usize, e: serde_json::Error) -> JsonError {
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let what = full.strip_suffix(&suffix).unwrap_or(&full);
        let text = &self.b[start..];
        let line_start = text
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c == b'\n')
            .nth(e.line().saturating_sub(2))
            .filter(|_| e.line() > 1)
            .map_or(0, |(p, _)| p + 1);
        self.error(start + line_start + e.column().saturating_sub(1), what)
    }
}
