//! Tensor data read by [`Reader`]: a JSON array of numbers or booleans, flat or nested
//! (row-major), or one bare value, straight into the tensor's little-endian bytes in one pass.
//!
//! The pass is a [`Walk`]: from a value it goes into arrays ([`Walk::open_array`]) or reads a
//! run of elements ([`Walk::run_of_elements`], the fast path, where the time goes); after one it
//! takes a comma or closes arrays ([`Walk::after_value`], [`Walk::close_array`]), checking each
//! array's length against the shape as it closes. [`Walk::finish`] checks the element count.

use std::marker::PhantomData;

use crate::tensor::{element_count, DataType};

use super::number::{Bad, Bool, Element};
use super::reader::{is_ws, skip_ws, Reader};
use super::JsonError;

/// Nesting deeper than this in tensor data is refused (a model input rarely has more than 8
/// dims).
const MAX_DATA_DEPTH: usize = 32;

impl Reader<'_> {
    /// Tensor data at the cursor: a JSON array of numbers or booleans, flat or nested
    /// (row-major), or one bare value for a shape of no dims, read into little-endian bytes of
    /// `dtype`. Checked: the count, every value's range, and, when nested, that every array has
    /// the length the shape gives it (so `[[1,2,3],[4,5,6,7,8]]` is not read as two rows of 4).
    /// `what` (`input "x"`) starts the messages of errors about the data.
    pub fn tensor_data(
        &mut self,
        dtype: DataType,
        shape: &[usize],
        what: &str,
    ) -> Result<Vec<u8>, JsonError> {
        self.data(dtype, shape, Rows::Given, what)
            .map(|(bytes, _)| bytes)
    }

    /// Rows of tensor data (TF-Serving `instances`), each of shape `rest`: the bytes and the
    /// number of rows. More than `max` rows is [`JsonError::TooManyRows`], as soon as the reader
    /// meets one more.
    pub fn tensor_rows(
        &mut self,
        dtype: DataType,
        rest: &[usize],
        max: usize,
        what: &str,
    ) -> Result<(Vec<u8>, usize), JsonError> {
        let mut shape = Vec::with_capacity(rest.len() + 1);
        shape.push(max);
        shape.extend_from_slice(rest);
        self.data(dtype, &shape, Rows::Counted, what)
    }

    fn data(
        &mut self,
        dtype: DataType,
        shape: &[usize],
        rows: Rows,
        what: &str,
    ) -> Result<(Vec<u8>, usize), JsonError> {
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

    /// The reader of [`Self::tensor_data`] and [`Self::tensor_rows`], for one element type: the
    /// bytes and the number of rows (the outer array's length).
    fn data_of<E: Element>(
        &mut self,
        dtype: DataType,
        shape: &[usize],
        rows: Rows,
        what: &str,
    ) -> Result<(Vec<u8>, usize), JsonError> {
        let mut walk = Walk::<E>::start(self, dtype, shape, rows, what)?;
        walk.walk()?;
        walk.finish()
    }
}

/// Whether the outer dim of tensor data is given by the shape or counted as it is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rows {
    Given,
    /// Counted, up to the shape's outer dim.
    Counted,
}

/// Where a walk is: what comes at its cursor.
enum Step {
    /// A value: at the start, after `[` or after `,`.
    Value,
    /// The end of a value (an array or a run of elements): `,` or `]`, unless no array is open.
    AfterValue,
    /// The data's end.
    Done,
}

/// One pass over tensor data of element type `E`, from the reader's cursor; the reader's
/// cursor is moved to the data's end when the pass ends there.
struct Walk<'w, 'a, E> {
    r: &'w mut Reader<'a>,
    /// The text, and the walk's cursor in it.
    b: &'a [u8],
    i: usize,
    dtype: DataType,
    shape: &'w [usize],
    rows: Rows,
    /// `input "x"`, as errors about the data start.
    what: &'w str,
    /// Given rows: the count the shape names; counted rows: the most that may come.
    limit: usize,
    /// Elements in a row of counted rows.
    per_row: usize,
    out: Vec<u8>,
    /// Per open array, the elements (values or arrays) seen in it so far.
    open: Vec<usize>,
    /// How deep the values sit (1 is flat), once one is seen.
    leaf: Option<usize>,
    /// Elements read.
    n: usize,
    /// The length of the array closed last: at the end, the outer array's (the rows).
    outer: usize,
    element: PhantomData<E>,
}

impl<'w, 'a, E: Element> Walk<'w, 'a, E> {
    /// A walk from the reader's cursor, its output sized by what the text left can hold.
    fn start(
        r: &'w mut Reader<'a>,
        dtype: DataType,
        shape: &'w [usize],
        rows: Rows,
        what: &'w str,
    ) -> Result<Self, JsonError> {
        let too_large = || JsonError::Invalid(format!("{what}: shape {shape:?} is too large"));
        let per_row = match rows {
            Rows::Given => 1,
            Rows::Counted => element_count(&shape[1..]).ok_or_else(too_large)?,
        };
        let limit = element_count(shape).ok_or_else(too_large)?;
        // Every element takes at least one character and a separator: the text bounds what can
        // arrive, whatever the shape claims.
        let most = limit.min((r.b.len() - r.pos) / 2 + 1);
        Ok(Walk {
            b: r.b,
            i: r.pos,
            r,
            dtype,
            shape,
            rows,
            what,
            limit,
            per_row,
            out: Vec::with_capacity(most.saturating_mul(E::SIZE)),
            open: Vec::with_capacity(8),
            leaf: None,
            n: 0,
            outer: 0,
            element: PhantomData,
        })
    }

    /// Every step from the first value to the data's end.
    fn walk(&mut self) -> Result<(), JsonError> {
        let mut step = Step::Value;
        loop {
            step = match step {
                Step::Value => self.value()?,
                Step::AfterValue => self.after_value()?,
                Step::Done => {
                    self.r.pos = self.i;
                    return Ok(());
                }
            };
        }
    }

    /// The value at the cursor: an array opened, or a run of elements read.
    fn value(&mut self) -> Result<Step, JsonError> {
        self.i = skip_ws(self.b, self.i);
        match self.b.get(self.i) {
            None | Some(b',' | b']') => Err(self.unexpected("a value")),
            Some(b'[') => self.open_array(),
            Some(_) => {
                self.run_of_elements()?;
                Ok(Step::AfterValue)
            }
        }
    }

    /// `[` at the cursor: an element of the array around it, and an array of its own; `[]` is
    /// closed at once.
    fn open_array(&mut self) -> Result<Step, JsonError> {
        self.count_element()?;
        self.open.push(0);
        if self.open.len() > MAX_DATA_DEPTH {
            return Err(JsonError::Malformed(format!(
                "{}: data is nested more than {MAX_DATA_DEPTH} levels deep",
                self.what
            )));
        }
        self.i = skip_ws(self.b, self.i + 1);
        if self.b.get(self.i) != Some(&b']') {
            return Ok(Step::Value);
        }
        self.close_array()?;
        Ok(Step::AfterValue)
    }

    /// After a value: `,` before the next, or `]` closing the innermost array; nothing more
    /// once no array is open (a bare value is the data's end, and what follows it is not read).
    fn after_value(&mut self) -> Result<Step, JsonError> {
        if self.open.is_empty() {
            return Ok(Step::Done);
        }
        self.i = skip_ws(self.b, self.i);
        match self.b.get(self.i) {
            Some(b',') => {
                self.i += 1;
                Ok(Step::Value)
            }
            Some(b']') => {
                self.close_array()?;
                Ok(Step::AfterValue)
            }
            _ => Err(self.unexpected("`,` or `]`")),
        }
    }

    /// A run of elements in one array, the common case, read straight into the bytes without
    /// the walk's bookkeeping between them. The run stops at anything that is not an element
    /// after a comma (the walk says what it is), after a bare value (there is no array to
    /// continue), and when rows are counted in the outer array, at the last row that may come.
    fn run_of_elements(&mut self) -> Result<(), JsonError> {
        self.count_element()?;
        self.check_values_depth()?;
        // How many more elements the run may take after the first.
        let room = match (self.open.len(), self.rows) {
            (0, _) => 0,
            (1, Rows::Counted) => self.shape[0] - self.open[0],
            _ => usize::MAX,
        };
        let (b, limit) = (self.b, self.limit);
        let (mut i, mut n) = (self.i, self.n);
        let out = &mut self.out;
        let mut more = 0usize;
        loop {
            match E::read(b, i) {
                Ok((v, end)) => {
                    // Past the limit values are counted, not kept: `finish` refuses the count.
                    if n < limit {
                        v.put(out);
                    }
                    i = end;
                }
                Err(Bad::Syntax(at)) => return Err(self.r.error(at, "invalid number")),
                Err(Bad::Value) => return Err(self.not_an_element(i, n)),
            }
            n += 1;
            if b.get(i) != Some(&b',') || more == room {
                break;
            }
            let next = skip_ws(b, i + 1);
            if matches!(b.get(next), None | Some(b'[' | b']' | b',')) {
                break;
            }
            i = next;
            more += 1;
        }
        self.i = i;
        self.n = n;
        if let Some(c) = self.open.last_mut() {
            *c += more;
        }
        Ok(())
    }

    /// One more element (a value or an array) in the innermost open array: one more row when
    /// that is the outer array of counted rows, refused past the most that may come.
    fn count_element(&mut self) -> Result<(), JsonError> {
        let depth = self.open.len();
        let Some(c) = self.open.last_mut() else {
            return Ok(());
        };
        *c += 1;
        if self.rows == Rows::Counted && depth == 1 && *c > self.shape[0] {
            return Err(JsonError::TooManyRows { max: self.shape[0] });
        }
        Ok(())
    }

    /// Values sit at one depth: the first value sets it.
    fn check_values_depth(&mut self) -> Result<(), JsonError> {
        let depth = self.open.len();
        match self.leaf {
            None => self.leaf = Some(depth),
            Some(l) if l != depth => {
                return Err(self.nesting(format!("values at depths {l} and {depth}")))
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// `]` at the cursor: the innermost array closes, its length checked.
    fn close_array(&mut self) -> Result<(), JsonError> {
        let depth = self.open.len();
        let len = self.open.pop().unwrap_or(0);
        self.check_array_length(depth, len)?;
        self.outer = len;
        self.i += 1;
        Ok(())
    }

    /// The shape check of an array at `depth` that closes with `len` elements, once values
    /// have been seen deeper than the outer array: above the values an array has one dim's
    /// length; holding the values, the product of the dims left. The outer array of counted
    /// rows may have any length up to the most (checked as it is read).
    fn check_array_length(&self, depth: usize, len: usize) -> Result<(), JsonError> {
        let Some(leaf) = self.leaf.filter(|&l| l > 1) else {
            return Ok(());
        };
        if depth == 1 && self.rows == Rows::Counted {
            return Ok(());
        }
        let want = if depth < leaf {
            self.shape.get(depth - 1).copied()
        } else {
            self.shape.get(depth - 1..).and_then(element_count)
        };
        if want == Some(len) {
            return Ok(());
        }
        Err(self.wrong_length(depth, len, want))
    }

    /// The element count checked: the shape's, or the rows read times a row's. The bytes and
    /// the number of rows.
    fn finish(self) -> Result<(Vec<u8>, usize), JsonError> {
        let count = match self.rows {
            Rows::Given => self.limit,
            Rows::Counted => self.outer * self.per_row,
        };
        if self.n != count {
            return Err(JsonError::Invalid(format!(
                "{}: shape needs {count} elements, data has {}",
                self.what, self.n
            )));
        }
        Ok((self.out, self.outer))
    }

    /// A syntax error at the cursor: `expected` was expected there.
    fn unexpected(&mut self, expected: &str) -> JsonError {
        self.r.pos = self.i;
        self.r.unexpected(expected)
    }

    #[cold]
    fn wrong_length(&self, depth: usize, len: usize, want: Option<usize>) -> JsonError {
        self.nesting(format!(
            "an array at depth {depth} has {len} elements, not {}",
            want.map_or_else(|| "any".to_string(), |w| w.to_string())
        ))
    }

    fn nesting(&self, detail: String) -> JsonError {
        JsonError::Invalid(format!(
            "{}: data is nested in a way that does not match shape {:?}: {detail}",
            self.what, self.shape
        ))
    }

    /// Element `n`, at `at`, is a JSON value but not one of the element type.
    #[cold]
    fn not_an_element(&self, at: usize, n: usize) -> JsonError {
        JsonError::Invalid(format!(
            "{}: element {n} ({}) is not a valid {}",
            self.what,
            shown(&self.b[at..]),
            self.dtype
        ))
    }
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
