//! A one-pass JSON reader for request bodies. Tensor data (V2 `data`, TF-Serving `instances`) is
//! read once, straight from the text into the tensor's little-endian bytes: the reader checks
//! the JSON grammar of each number as it finds the number's end, and turns it into its value by
//! a fast path with a proven error bound ([`f32_near`], Clinger's for f64), or, where that
//! cannot decide, a correctly rounded parser (Eisel-Lemire, `fast-float2`). No JSON tree is
//! built and nothing is validated first and parsed again. The small members around the data
//! (names, shapes, parameters) are cut out by their brackets and handed to serde_json, which
//! checks and types them.

use std::borrow::Cow;
use std::fmt::Display;

use serde::de::{DeserializeOwned, IgnoredAny};

use ortserve_core::tensor::{element_count, DataType};

use super::error::CallError;

/// Nesting deeper than this in tensor data is refused (a model input rarely has more than 8
/// dims).
const MAX_DATA_DEPTH: usize = 32;

/// A cursor over one JSON text. Syntax errors are `MalformedBody`, worded `{context}: {what} at
/// line L column C`.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    context: &'static str,
}

#[inline(always)]
fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\n' | b'\r' | b'\t')
}

impl<'a> Reader<'a> {
    pub(crate) fn new(text: &'a [u8], context: &'static str) -> Self {
        Reader {
            b: text,
            pos: 0,
            context,
        }
    }

    /// The cursor's byte offset.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// A reader of the same text with its cursor at `pos`.
    pub(crate) fn at(&self, pos: usize) -> Self {
        Reader {
            b: self.b,
            pos,
            context: self.context,
        }
    }

    /// A syntax error at byte `at`.
    pub(crate) fn error(&self, at: usize, what: impl Display) -> CallError {
        let before = &self.b[..at.min(self.b.len())];
        let line = before.iter().filter(|&&c| c == b'\n').count() + 1;
        let column = before.len()
            - before
                .iter()
                .rposition(|&c| c == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        CallError::MalformedBody(format!(
            "{}: {what} at line {line} column {column}",
            self.context
        ))
    }

    #[inline(always)]
    fn ws(&mut self) {
        while self.b.get(self.pos).is_some_and(|&c| is_ws(c)) {
            self.pos += 1;
        }
    }

    /// The next byte that is not whitespace, the cursor on it.
    pub(crate) fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.pos).copied()
    }

    fn unexpected(&self, expected: &str) -> CallError {
        match self.b.get(self.pos) {
            None => self.error(self.pos, format!("EOF while parsing {expected}")),
            Some(_) => self.error(self.pos, format!("expected {expected}")),
        }
    }

    fn eat(&mut self, c: u8, expected: &str) -> Result<(), CallError> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    /// The end of the text: only whitespace may follow.
    pub(crate) fn end(mut self) -> Result<(), CallError> {
        self.ws();
        if self.pos < self.b.len() {
            return Err(self.error(self.pos, "trailing characters"));
        }
        Ok(())
    }

    /// `{"key": value, ...}`: `each` gets every key with the cursor on its value, and must read
    /// the value.
    pub(crate) fn object(
        &mut self,
        mut each: impl FnMut(&mut Self, Cow<'a, str>) -> Result<(), CallError>,
    ) -> Result<(), CallError> {
        self.members(b'{', b'}', |r| {
            if r.peek() != Some(b'"') {
                return Err(r.unexpected("a string key"));
            }
            let key = r.string()?;
            r.eat(b':', "`:`")?;
            r.ws();
            each(r, key)
        })
    }

    /// `[value, ...]`: `each` gets the cursor on every element, and must read it.
    pub(crate) fn array(
        &mut self,
        each: impl FnMut(&mut Self) -> Result<(), CallError>,
    ) -> Result<(), CallError> {
        self.members(b'[', b']', each)
    }

    /// The members of an object or array between `open` and `close`, separated by commas:
    /// `each` reads one, from the cursor after the separator.
    fn members(
        &mut self,
        open: u8,
        close: u8,
        mut each: impl FnMut(&mut Self) -> Result<(), CallError>,
    ) -> Result<(), CallError> {
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
                _ => return Err(self.unexpected(after)),
            }
        }
    }

    /// The string at the cursor, unescaped.
    fn string(&mut self) -> Result<Cow<'a, str>, CallError> {
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
    fn skip_string(&mut self) -> Result<(), CallError> {
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
    pub(crate) fn skip(&mut self) -> Result<&'a [u8], CallError> {
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
    pub(crate) fn value<T: DeserializeOwned>(&mut self) -> Result<T, CallError> {
        self.ws();
        let start = self.pos;
        let text = self.skip()?;
        serde_json::from_slice(text).map_err(|e| self.serde_error(start, e))
    }

    /// Moves past a value nobody reads, checking that it is JSON.
    pub(crate) fn ignore(&mut self) -> Result<(), CallError> {
        self.value::<IgnoredAny>().map(|_| ())
    }

    /// serde_json's error about the text from `start`, its place given in the whole text.
    fn serde_error(&self, start: usize, e: serde_json::Error) -> CallError {
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

    /// Tensor data at the cursor: a JSON array of numbers or booleans, flat or nested
    /// (row-major), or one bare value for a shape of no dims, read into little-endian bytes of
    /// `dtype`. Checked: the count, every value's range, and, when nested, that every array has
    /// the length the shape gives it (so `[[1,2,3],[4,5,6,7,8]]` is not read as two rows of 4).
    pub(crate) fn tensor_data(
        &mut self,
        dtype: DataType,
        shape: &[usize],
        what: &str,
    ) -> Result<Vec<u8>, CallError> {
        let rows = Rows::Given;
        self.data(dtype, shape, rows, what).map(|(bytes, _)| bytes)
    }

    /// Rows of tensor data (TF-Serving `instances`), each of shape `rest`: the bytes and the
    /// number of rows. More than `max` rows is `too_many(max)`, as soon as the reader meets one
    /// more.
    pub(crate) fn tensor_rows(
        &mut self,
        dtype: DataType,
        rest: &[usize],
        max: usize,
        too_many: &dyn Fn(usize) -> CallError,
        what: &str,
    ) -> Result<(Vec<u8>, usize), CallError> {
        let mut shape = Vec::with_capacity(rest.len() + 1);
        shape.push(max);
        shape.extend_from_slice(rest);
        self.data(dtype, &shape, Rows::Counted { too_many }, what)
    }

    fn data(
        &mut self,
        dtype: DataType,
        shape: &[usize],
        rows: Rows,
        what: &str,
    ) -> Result<(Vec<u8>, usize), CallError> {
        match dtype {
            DataType::Bool => self.data_of::<Bool>(dtype, shape, rows, what),
            DataType::U8 => self.data_of::<u8>(dtype, shape, rows, what),
            DataType::U16 => self.data_of::<u16>(dtype, shape, rows, what),
            DataType::U32 => self.data_of::<u32>(dtype, shape, rows, what),
            DataType::U64 => self.data_of::<u64>(dtype, shape, rows, what),
            DataType::I8 => self.data_of::<i8>(dtype, shape, rows, what),
            DataType::I16 => self.data_of::<i16>(dtype, shape, rows, what),
            DataType::I32 => self.data_of::<i32>(dtype, shape, rows, what),
            DataType::I64 => self.data_of::<i64>(dtype, shape, rows, what),
            DataType::F16 => self.data_of::<half::f16>(dtype, shape, rows, what),
            DataType::F32 => self.data_of::<f32>(dtype, shape, rows, what),
            DataType::F64 => self.data_of::<f64>(dtype, shape, rows, what),
        }
    }

    /// The reader of [`Self::tensor_data`] and [`Self::tensor_rows`], for one element type.
    fn data_of<E: Element>(
        &mut self,
        dtype: DataType,
        shape: &[usize],
        rows: Rows,
        what: &str,
    ) -> Result<(Vec<u8>, usize), CallError> {
        let too_large = || CallError::InvalidInput(format!("{what}: shape {shape:?} is too large"));
        let per_row = match rows {
            Rows::Given => 1,
            Rows::Counted { .. } => element_count(&shape[1..]).ok_or_else(too_large)?,
        };
        // Given rows: the count the shape names; counted rows: the most that may come.
        let limit = element_count(shape).ok_or_else(too_large)?;
        let b = self.b;
        // Every element takes at least one character and a separator: the text bounds what can
        // arrive, whatever the shape claims.
        let most = limit.min((b.len() - self.pos) / 2 + 1);
        let mut out = Vec::with_capacity(most.saturating_mul(E::SIZE));
        // Per open array, the elements (values or arrays) seen in it so far.
        let mut open: Vec<usize> = Vec::with_capacity(8);
        // How deep the values sit; 1 is flat.
        let mut leaf: Option<usize> = None;
        let mut n = 0usize;
        // The length of the array closed last: at the end, the outer array's (the rows).
        let mut outer = 0usize;
        let mut i = self.pos;
        let nesting = |detail: String| {
            CallError::InvalidInput(format!(
                "{what}: data is nested in a way that does not match shape {shape:?}: {detail}"
            ))
        };
        // One more element in the innermost open array; a row when that array is the outer one.
        let counted = |open: &mut Vec<usize>| -> Result<(), CallError> {
            let depth = open.len();
            if let Some(c) = open.last_mut() {
                *c += 1;
                if let (Rows::Counted { too_many }, 1) = (rows, depth) {
                    if *c > shape[0] {
                        return Err(too_many(shape[0]));
                    }
                }
            }
            Ok(())
        };
        // The innermost array closes with `len` elements.
        let close = |open: &mut Vec<usize>, leaf: Option<usize>| -> Result<usize, CallError> {
            let depth = open.len();
            let len = open.pop().unwrap_or(0);
            if let Some(leaf) = leaf.filter(|&l| l > 1) {
                if depth == 1 && matches!(rows, Rows::Counted { .. }) {
                    return Ok(len);
                }
                // Above the values an array has one dim's length; holding the values, the
                // product of the dims left.
                let want = if depth < leaf {
                    shape.get(depth - 1).copied()
                } else {
                    shape.get(depth - 1..).and_then(element_count)
                };
                if want != Some(len) {
                    return Err(nesting(format!(
                        "an array at depth {depth} has {len} elements, not {}",
                        want.map_or_else(|| "any".to_string(), |w| w.to_string())
                    )));
                }
            }
            Ok(len)
        };
        'value: loop {
            while b.get(i).is_some_and(|&c| is_ws(c)) {
                i += 1;
            }
            match b.get(i) {
                None | Some(b',' | b']') => {
                    self.pos = i;
                    return Err(self.unexpected("a value"));
                }
                Some(b'[') => {
                    counted(&mut open)?;
                    open.push(0);
                    if open.len() > MAX_DATA_DEPTH {
                        return Err(CallError::MalformedBody(format!(
                            "{what}: data is nested more than {MAX_DATA_DEPTH} levels deep"
                        )));
                    }
                    i += 1;
                    while b.get(i).is_some_and(|&c| is_ws(c)) {
                        i += 1;
                    }
                    if b.get(i) != Some(&b']') {
                        continue 'value;
                    }
                    outer = close(&mut open, leaf)?;
                    i += 1;
                }
                Some(_) => {
                    counted(&mut open)?;
                    match leaf {
                        None => leaf = Some(open.len()),
                        Some(l) if l != open.len() => {
                            return Err(nesting(format!("values at depths {l} and {}", open.len())))
                        }
                        Some(_) => {}
                    }
                    // A run of values in one array, the common case, without the general
                    // loop's bookkeeping between them. `room`: how many more values the run may
                    // take, none after a bare value (there is no array to continue), and the
                    // rows left when rows are counted in the outer array.
                    let room = match (open.len(), rows) {
                        (0, _) => 0,
                        (1, Rows::Counted { .. }) => shape[0] - open[0],
                        _ => usize::MAX,
                    };
                    let mut more = 0usize;
                    loop {
                        match E::read(b, i) {
                            Ok((v, end)) => {
                                if n < limit {
                                    v.put(&mut out);
                                }
                                i = end;
                            }
                            Err(Bad::Syntax(at)) => return Err(self.error(at, "invalid number")),
                            Err(Bad::Value) => {
                                let shown = shown(&b[i..]);
                                return Err(CallError::InvalidInput(format!(
                                    "{what}: element {n} ({shown}) is not a valid {dtype}"
                                )));
                            }
                        }
                        n += 1;
                        if b.get(i) != Some(&b',') || more == room {
                            break;
                        }
                        let mut j = i + 1;
                        while b.get(j).is_some_and(|&c| is_ws(c)) {
                            j += 1;
                        }
                        if matches!(b.get(j), None | Some(b'[' | b']' | b',')) {
                            // Not a value of this run: the general loop says what it is.
                            break;
                        }
                        i = j;
                        more += 1;
                    }
                    if let Some(c) = open.last_mut() {
                        *c += more;
                    }
                }
            }
            // After a value: commas and closing brackets until the next value or the end.
            loop {
                if open.is_empty() {
                    break 'value;
                }
                while b.get(i).is_some_and(|&c| is_ws(c)) {
                    i += 1;
                }
                match b.get(i) {
                    Some(b',') => {
                        i += 1;
                        continue 'value;
                    }
                    Some(b']') => {
                        outer = close(&mut open, leaf)?;
                        i += 1;
                    }
                    _ => {
                        self.pos = i;
                        return Err(self.unexpected("`,` or `]`"));
                    }
                }
            }
        }
        self.pos = i;
        let count = match rows {
            Rows::Given => limit,
            Rows::Counted { .. } => outer * per_row,
        };
        if n != count {
            return Err(CallError::InvalidInput(format!(
                "{what}: shape needs {count} elements, data has {n}"
            )));
        }
        Ok((out, outer))
    }
}

/// Whether the outer dim of tensor data is given by the shape or counted as it is read.
#[derive(Clone, Copy)]
enum Rows<'f> {
    Given,
    Counted {
        too_many: &'f dyn Fn(usize) -> CallError,
    },
}

/// The start of a value that is not a valid element, as an error message shows it.
fn shown(text: &[u8]) -> String {
    let end = text
        .iter()
        .position(|&c| matches!(c, b',' | b']' | b'}') || is_ws(c))
        .unwrap_or(text.len())
        .clamp(1, 160.min(text.len()));
    String::from_utf8_lossy(&text[..end])
        .chars()
        .take(40)
        .collect()
}

/// Why an element could not be read: the text is not a JSON number (a syntax error at that
/// byte), or it is not a value of the element type.
enum Bad {
    Syntax(usize),
    Value,
}

/// Where no number starts: another JSON value (a string, `true`, `false`, `null`, an object) is
/// a value of the wrong type; any other byte breaks the grammar.
fn not_a_number(b: &[u8], i: usize) -> Bad {
    match b.get(i) {
        Some(b'"' | b't' | b'f' | b'n' | b'{') => Bad::Value,
        _ => Bad::Syntax(i),
    }
}

/// An element type of tensor data: reads one JSON value into itself.
trait Element: Sized {
    const SIZE: usize;
    fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad>;
    fn put(self, out: &mut Vec<u8>);
}

/// A JSON number's parts, read in the pass that checks its grammar: `negative`, the decimal
/// significand `digits` (`None` past 19 digits), the power of ten it is scaled by, and whether
/// it was written as an integer (no fraction or exponent).
struct Decimal {
    end: usize,
    negative: bool,
    integer: bool,
    digits: Option<u64>,
    exponent: i64,
}

/// Reads the run of decimal digits at `i` into `m` (`m * 10^k + run`, wrapping), eight at a
/// time where eight are there; returns where the run ends and the new `m`.
#[inline(always)]
fn digits(b: &[u8], mut i: usize, mut m: u64) -> (usize, u64) {
    while let Some(chunk) = b.get(i..i + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let Some(v) = eight_digits(word) else { break };
        m = m.wrapping_mul(100_000_000).wrapping_add(v);
        i += 8;
    }
    while let Some(d) = b.get(i).filter(|c| c.is_ascii_digit()) {
        m = m.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
        i += 1;
    }
    (i, m)
}

/// The value of eight ASCII digits read as a little-endian word (the first digit in the low
/// byte), or `None` unless all eight bytes are digits. Each byte less `'0'` must be 0..=9: a
/// byte below `'0'` borrows into its top bit, one above `'9'` carries into it when 0x46 is
/// added. Then pairs, quads and the two halves are combined by multiply-and-shift.
#[inline(always)]
fn eight_digits(word: u64) -> Option<u64> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let v = word.wrapping_sub(0x30 * ONES);
    if (v | word.wrapping_add(0x46 * ONES)) & (0x80 * ONES) != 0 {
        return None;
    }
    // Byte k holds digit k (most significant first). Pairs: 10 * even + odd, in each 16 bits.
    let v = (v.wrapping_mul(10) + (v >> 8)) & 0x00FF_00FF_00FF_00FF;
    // Quads: 100 * first pair + second, in each 32 bits.
    let v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
    // The whole: 10^4 * first quad + second.
    Some((v.wrapping_mul(10_000) + (v >> 32)) & 0xFFFF_FFFF)
}

/// Powers of ten that f64 holds exactly.
const EXACT_POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// 10^-k, each the f64 nearest it (one rounding).
const NEGATIVE_POW10: [f64; 23] = [
    1e0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13, 1e-14,
    1e-15, 1e-16, 1e-17, 1e-18, 1e-19, 1e-20, 1e-21, 1e-22,
];

/// Reads the JSON number at `i`: `Err(Syntax)` where the grammar breaks, `Err(Value)` where
/// another JSON value starts (see [`not_a_number`]).
#[inline(always)]
fn decimal(b: &[u8], mut i: usize) -> Result<Decimal, Bad> {
    let negative = b.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let mut m: u64 = 0;
    // Digits taken into `m` (past 19 it has wrapped, and the slow parser decides).
    let mut count = 0usize;
    let mut exponent: i64 = 0;
    let mut integer = true;
    let digit = |i: usize| b.get(i).filter(|c| c.is_ascii_digit()).map(|c| c - b'0');
    match digit(i) {
        Some(0) => i += 1,
        Some(_) => {
            let start = i;
            (i, m) = digits(b, i, m);
            count += i - start;
        }
        None if negative => return Err(Bad::Syntax(i)),
        None => return Err(not_a_number(b, i)),
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let first = i;
        (i, m) = digits(b, i, m);
        if i == first {
            return Err(Bad::Syntax(i));
        }
        // Leading zeros of a fraction (0.0001) are not significant, but counting them only
        // sends a rare long number to the slow parser.
        count += i - first;
        exponent -= (i - first) as i64;
        integer = false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        integer = false;
        i += 1;
        let sign = match b.get(i) {
            Some(b'-') => {
                i += 1;
                -1
            }
            Some(b'+') => {
                i += 1;
                1
            }
            _ => 1,
        };
        let first = i;
        let mut e: i64 = 0;
        while let Some(d) = digit(i) {
            e = (e * 10 + i64::from(d)).min(1 << 40);
            i += 1;
        }
        if i == first {
            return Err(Bad::Syntax(i));
        }
        exponent += sign * e;
    }
    Ok(Decimal {
        end: i,
        negative,
        integer,
        digits: (count <= 19).then_some(m),
        exponent,
    })
}

/// The f64 nearest to `d` when Clinger's fast path gives it exactly: the significand fits in 53
/// bits and the power of ten is exact (short numbers, as serializers of f32 write them).
#[inline(always)]
fn clinger(d: &Decimal) -> Option<f64> {
    let m = d.digits.filter(|&m| m <= 1 << 53)?;
    if !(-22..=22).contains(&d.exponent) {
        return None;
    }
    let p = EXACT_POW10[d.exponent.unsigned_abs() as usize];
    let v = if d.exponent < 0 {
        m as f64 / p
    } else {
        m as f64 * p
    };
    Some(if d.negative { -v } else { v })
}

/// The f32 nearest to `d` when its significand fits in a u64 (at most 19 digits: f32s written
/// short, `0.19`, and widened to f64, `0.19000005722045898`, as numpy's `tolist()` gives them)
/// and its power of ten is at most 22. At most three roundings make the f64 `wide`: the
/// significand's conversion, 10^-k (10^k is exact) and the product; each is within half an ulp,
/// so `wide` is within three f64 ulps of the number. It rounds to the same f32 as the number
/// unless one of f32's halfway points (an f64 whose 29 bits below f32's 24 are a one and 28
/// zeros) lies that close: then `None` leaves it to the full parser (about one number in 10^8).
/// Values here lie in 1e-22..2e41, where f32 is normal, or overflows at a threshold that is a
/// halfway point too.
#[inline(always)]
fn f32_near(d: &Decimal) -> Option<f32> {
    const HALF: u64 = 0x1000_0000;
    let m = d.digits?;
    if !(-22..=22).contains(&d.exponent) {
        return None;
    }
    // A signed conversion is one instruction; the unsigned one (past 2^63) several.
    let wide = if m >> 63 == 0 {
        m as i64 as f64
    } else {
        m as f64
    };
    let k = d.exponent.unsigned_abs() as usize;
    let wide = if d.exponent < 0 {
        wide * NEGATIVE_POW10[k]
    } else {
        wide * EXACT_POW10[k]
    };
    if (wide.to_bits() & 0x1FFF_FFFF).abs_diff(HALF) <= 3 {
        return None;
    }
    let v = wide as f32;
    Some(if d.negative { -v } else { v })
}

/// The JSON number at `i` as the f64 nearest to it, and its end: by [`clinger`], else by
/// fast-float2 (Eisel-Lemire).
#[inline(always)]
fn float64(b: &[u8], i: usize) -> Result<(f64, usize), Bad> {
    let d = match decimal(b, i) {
        Ok(d) => d,
        Err(e) => return non_finite(b, i).ok_or(e),
    };
    match clinger(&d) {
        Some(v) => Ok((v, d.end)),
        None => Ok((
            fast_float2::parse(&b[i..d.end]).map_err(|_| Bad::Value)?,
            d.end,
        )),
    }
}

/// `NaN`, `Infinity` or `-Infinity` at `i`, as Triton and Python's `json` write non-finite
/// floats (not JSON, but what float clients send); read only where a float is expected.
#[cold]
fn non_finite(b: &[u8], i: usize) -> Option<(f64, usize)> {
    let rest = &b[i..];
    [
        (&b"NaN"[..], f64::NAN),
        (b"Infinity", f64::INFINITY),
        (b"-Infinity", f64::NEG_INFINITY),
    ]
    .into_iter()
    .find(|(word, _)| rest.starts_with(word))
    .map(|(word, v)| (v, i + word.len()))
}

/// Whether the float at `i` was written as one of [`non_finite`]'s words.
fn is_word(b: &[u8], i: usize) -> bool {
    matches!(b.get(i), Some(b'N' | b'I')) || b[i..].starts_with(b"-I")
}

/// A float read, or `Value` when it is out of its type's range (a finite number written too
/// large; the words for infinity are read as such, see [`non_finite`]).
#[inline(always)]
fn finite<T>(v: T, ok: bool, end: usize) -> Result<(T, usize), Bad> {
    if ok {
        Ok((v, end))
    } else {
        Err(Bad::Value)
    }
}

/// [`Element::put`] for a number type: its little-endian bytes.
macro_rules! put_le_bytes {
    () => {
        #[inline(always)]
        fn put(self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.to_le_bytes());
        }
    };
}

impl Element for f32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad> {
        let d = match decimal(b, i) {
            Ok(d) => d,
            Err(e) => return non_finite(b, i).map(|(v, end)| (v as f32, end)).ok_or(e),
        };
        let end = d.end;
        let v = match f32_near(&d) {
            Some(v) => v,
            None => fast_float2::parse::<f32, _>(&b[i..end]).map_err(|_| Bad::Value)?,
        };
        finite(v, v.is_finite(), end)
    }
    put_le_bytes!();
}

impl Element for f64 {
    const SIZE: usize = 8;
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad> {
        let (v, end) = float64(b, i)?;
        finite(v, v.is_finite() || is_word(b, i), end)
    }
    put_le_bytes!();
}

impl Element for half::f16 {
    const SIZE: usize = 2;
    fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad> {
        let (v, end) = float64(b, i)?;
        let v = half::f16::from_f64(v);
        finite(v, v.is_finite() || is_word(b, i), end)
    }
    put_le_bytes!();
}

/// `true` or `false`, as one byte.
struct Bool(u8);

impl Element for Bool {
    const SIZE: usize = 1;
    fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad> {
        let rest = &b[i..];
        if rest.starts_with(b"true") {
            Ok((Bool(1), i + 4))
        } else if rest.starts_with(b"false") {
            Ok((Bool(0), i + 5))
        } else {
            // A number is a valid JSON value but not a boolean; anything else is shown too.
            decimal(b, i)?;
            Err(Bad::Value)
        }
    }
    fn put(self, out: &mut Vec<u8>) {
        out.push(self.0);
    }
}

macro_rules! integer {
    ($($t:ty),*) => {$(
        impl Element for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad> {
                let d = decimal(b, i)?;
                if !d.integer {
                    return Err(Bad::Value);
                }
                // Past 19 digits only a few u64s fit: counted again, with overflow checked.
                let magnitude = match d.digits {
                    Some(m) => m,
                    None => b[i..d.end]
                        .iter()
                        .filter(|c| c.is_ascii_digit())
                        .try_fold(0u64, |m, &c| m.checked_mul(10)?.checked_add(u64::from(c - b'0')))
                        .ok_or(Bad::Value)?,
                };
                let wide = if d.negative {
                    -i128::from(magnitude)
                } else {
                    i128::from(magnitude)
                };
                <$t>::try_from(wide).map(|v| (v, d.end)).map_err(|_| Bad::Value)
            }
            put_le_bytes!();
        }
    )*};
}

integer!(u8, u16, u32, u64, i8, i16, i32, i64);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flat(text: &str, dtype: DataType, count: usize) -> Result<Vec<u8>, CallError> {
        let mut r = Reader::new(text.as_bytes(), "test");
        let data = r.tensor_data(dtype, &[count], "x")?;
        r.end()?;
        Ok(data)
    }

    /// What the standard library makes of one number, as `dtype`'s bytes; `None` where it is
    /// not a value of the type (out of range, or not an integer for an integer type).
    fn std_value(token: &str, dtype: DataType) -> Option<Vec<u8>> {
        macro_rules! int {
            ($t:ty) => {
                <$t>::try_from(token.parse::<i128>().ok()?)
                    .ok()
                    .map(|v| v.to_le_bytes().to_vec())
            };
        }
        match dtype {
            DataType::F32 => {
                let v = token.parse::<f32>().ok()?;
                v.is_finite().then(|| v.to_le_bytes().to_vec())
            }
            DataType::F64 => {
                let v = token.parse::<f64>().ok()?;
                v.is_finite().then(|| v.to_le_bytes().to_vec())
            }
            DataType::F16 => {
                let v = half::f16::from_f64(token.parse::<f64>().ok()?);
                v.is_finite().then(|| v.to_le_bytes().to_vec())
            }
            DataType::U8 => int!(u8),
            DataType::I8 => int!(i8),
            DataType::U16 => int!(u16),
            DataType::I16 => int!(i16),
            DataType::U32 => int!(u32),
            DataType::I32 => int!(i32),
            DataType::U64 => int!(u64),
            DataType::I64 => int!(i64),
            DataType::Bool => match token {
                "true" => Some(vec![1]),
                "false" => Some(vec![0]),
                _ => None,
            },
        }
    }

    /// JSON numbers of every form: integers of up to 25 digits, fractions with leading zeros,
    /// exponents far past every type's range, and the shortest and 17-digit forms of random
    /// f32 and f64 bit patterns.
    fn json_number() -> impl Strategy<Value = String> {
        let digits = |n: std::ops::RangeInclusive<usize>| {
            proptest::collection::vec(0u8..10, n)
                .prop_map(|d| d.iter().map(|d| char::from(b'0' + d)).collect::<String>())
        };
        prop_oneof![
            (
                any::<bool>(),
                digits(1..=25),
                proptest::option::of(digits(1..=25)),
                proptest::option::of((any::<bool>(), 0i32..400))
            )
                .prop_map(|(neg, int, frac, exp)| {
                    let int = int.trim_start_matches('0');
                    let mut s = String::from(if neg { "-" } else { "" });
                    s.push_str(if int.is_empty() { "0" } else { int });
                    if let Some(f) = frac {
                        s.push('.');
                        s.push_str(&f);
                    }
                    if let Some((neg, e)) = exp {
                        s.push_str(if neg { "e-" } else { "E+" });
                        s.push_str(&e.to_string());
                    }
                    s
                }),
            any::<f32>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(|v| serde_json::to_string(&v).unwrap()),
            // f32s widened to f64, as Python clients send them.
            any::<f32>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(|v| serde_json::to_string(&f64::from(v)).unwrap()),
            (-1.0e6f32..1.0e6).prop_map(|v| serde_json::to_string(&f64::from(v)).unwrap()),
            any::<f64>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(|v| serde_json::to_string(&v).unwrap()),
            any::<f64>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(|v| format!("{v:.17e}")),
            any::<i64>().prop_map(|v| v.to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Every number reads bit for bit as `str::parse` reads it, or is refused where that
        /// finds no value of the type.
        #[test]
        fn numbers_read_as_the_standard_library_reads_them(token in json_number()) {
            for dtype in DataType::ALL {
                let want = std_value(&token, dtype);
                let got = flat(&format!("[{token}]"), dtype, 1).ok();
                prop_assert_eq!(&got, &want, "{} as {}", token, dtype);
                // Alone and in the middle of others too.
                let got = flat(&format!("[0, {token} ,1]"), dtype, 3)
                    .ok()
                    .map(|b| b[dtype.size()..2 * dtype.size()].to_vec());
                if dtype != DataType::Bool {
                    prop_assert_eq!(&got, &want, "{} as {} among others", token, dtype);
                }
            }
        }

        /// Text that is not a JSON array of numbers is never read as one: a valid array of
        /// numbers is read as its tokens parse one by one, anything else is refused. The texts
        /// are arrays with one character inserted, deleted or changed.
        #[test]
        fn only_json_arrays_of_numbers_are_read(
            values in proptest::collection::vec(json_number(), 1..6),
            edit in proptest::option::of((any::<prop::sample::Index>(), 0u8..3, prop::sample::select(
                b"0123456789-+.eE[]{},: \"tn".to_vec()))),
        ) {
            let mut text = format!("[{}]", values.join(", ")).into_bytes();
            if let Some((at, kind, c)) = edit {
                let i = at.index(text.len() + 1);
                match kind {
                    0 => text.insert(i, c),
                    1 if i < text.len() => { text.remove(i); }
                    _ if i < text.len() => text[i] = c,
                    _ => {}
                }
            }
            let text = String::from_utf8(text).unwrap();
            let tokens: Option<Vec<String>> = serde_json::from_str::<Vec<serde_json::Value>>(&text)
                .ok()
                .filter(|v| v.iter().all(serde_json::Value::is_number))
                .map(|_| {
                    text.trim().trim_start_matches('[').trim_end_matches(']')
                        .split(',').map(|t| t.trim().to_string()).collect()
                });
            for dtype in [DataType::F32, DataType::I64] {
                let got = tokens.as_ref().map_or(1, Vec::len);
                let got = flat(&text, dtype, got);
                let want: Option<Vec<u8>> = tokens.as_ref().and_then(|t| {
                    t.iter().map(|t| std_value(t, dtype)).collect::<Option<Vec<_>>>()
                        .map(|v| v.concat())
                });
                match want {
                    Some(want) => prop_assert_eq!(got.ok(), Some(want), "{:?}", text),
                    None => prop_assert!(got.is_err(), "{:?} read as {:?}", text, got),
                }
            }
        }
    }

    #[test]
    fn halfway_between_two_f32s_the_text_decides() {
        // 1 + 2^-24 is exactly half way between 1 and the next f32; the f64 nearest each of
        // these texts is that halfway point, and only the digits after it tell which way.
        for text in [
            "1.000000059604644775390625",
            "1.000000059604644775390624",
            "1.000000059604644775390626",
            "1.0000000596046448",
        ] {
            let got = flat(&format!("[{text}]"), DataType::F32, 1).unwrap();
            let want = text.parse::<f32>().unwrap().to_le_bytes();
            assert_eq!(got, want, "{text}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Numbers a few f64 ulps from a point half way between two f32s, written with 16 to 19
        /// significant digits: the fast path's f64 may land on either side of such a point, and
        /// must then leave the number to the full parser.
        #[test]
        fn numbers_next_to_an_f32_halfway_point_read_as_the_standard_library_reads_them(
            bits in 0x0080_0000u32..0x7F7F_FFFF,
            ulps in -12i64..=12,
            digits in 15usize..=18,
            negative in any::<bool>(),
        ) {
            let low = f32::from_bits(bits);
            let high = f32::from_bits(bits + 1);
            let half = (f64::from(low) + f64::from(high)) / 2.0;
            let near = f64::from_bits(half.to_bits().wrapping_add_signed(ulps));
            let sign = if negative { "-" } else { "" };
            let token = format!("{sign}{near:.digits$e}");
            let got = flat(&format!("[{token}]"), DataType::F32, 1).ok();
            prop_assert_eq!(got, std_value(&token, DataType::F32), "{}", token);
        }
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = flat("[1,\n 2,,3]", DataType::F32, 3).unwrap_err();
        assert!(
            matches!(&e, CallError::MalformedBody(m) if m.ends_with("expected a value at line 2 column 4")),
            "{e:?}"
        );
        for bad in [
            "[1.]", "[-]", "[1e]", "[01]", "[1 2]", "[1,]", "[", "[1", "[1]]", "[+1]",
        ] {
            let e = flat(bad, DataType::F32, 1).unwrap_err();
            assert!(matches!(&e, CallError::MalformedBody(_)), "{bad}: {e:?}");
        }
        // A JSON value that is not a number of the type is the input's fault, not the body's.
        for bad in ["[true]", "[null]", "[\"1\"]", "[{}]"] {
            let e = flat(bad, DataType::F32, 1).unwrap_err();
            assert!(
                matches!(&e, CallError::InvalidInput(m) if m.contains("element 0")),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn counted_rows_stop_one_past_the_most() {
        let too_many = |max: usize| CallError::InvalidInput(format!("more than {max}"));
        let rows = |text: &str| {
            Reader::new(text.as_bytes(), "test").tensor_rows(DataType::I32, &[2], 3, &too_many, "x")
        };
        let (bytes, n) = rows("[[1,2],[3,4]]").unwrap();
        assert_eq!((bytes.len(), n), (16, 2));
        let e = rows("[[1,2],[3,4],[5,6],[7,8]]").unwrap_err();
        assert!(
            matches!(&e, CallError::InvalidInput(m) if m == "more than 3"),
            "{e:?}"
        );
        // Rows of the wrong length, and a flat list of values that are not rows.
        assert!(rows("[[1,2],[3]]").is_err());
        assert!(rows("[1,2]").is_err());
    }

    #[test]
    fn skipped_values_end_where_they_end() {
        let text = br#"{"a": [1, {"b": "]\""}], "c": "x,y", "d": -1.5e3, "e": {}}"#;
        let mut r = Reader::new(text, "test");
        let mut seen = Vec::new();
        r.object(|r, key| {
            seen.push((
                key.to_string(),
                String::from_utf8(r.skip()?.to_vec()).unwrap(),
            ));
            Ok(())
        })
        .unwrap();
        r.end().unwrap();
        let want = [
            ("a", r#"[1, {"b": "]\""}]"#),
            ("c", r#""x,y""#),
            ("d", "-1.5e3"),
            ("e", "{}"),
        ];
        assert_eq!(
            seen,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
    }
}
