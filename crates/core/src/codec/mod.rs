//! The JSON tensor codec: a one-pass reader for request bodies, for every front door that takes
//! JSON. Tensor data (V2 `data`, TF-Serving `instances`) is read once, straight from the text
//! into the tensor's little-endian bytes: the reader checks the JSON grammar of each number as
//! it finds the number's end, and turns it into its value by a fast path with a proven error
//! bound, or, where that cannot decide, a correctly rounded parser. No JSON tree is built and
//! nothing is validated first and parsed again. The small members around the data (names,
//! shapes, parameters) are cut out by their brackets and handed to serde_json, which checks and
//! types them.
//!
//! - `reader`: [`Reader`], the cursor: objects, arrays, strings, values passed over by their
//!   brackets, members typed by serde_json, syntax errors with their line and column.
//! - `tensor`: [`Reader::tensor_data`] and [`Reader::tensor_rows`], the walk over flat or nested
//!   arrays that checks them against the shape.
//! - `number`: one number or boolean into an element type (`f32_near`, Clinger's fast path,
//!   `fast-float2`, the integer ranges).
//!
//! Errors are [`JsonError`]s, which say whose fault the failure is; the request core's
//! `CallError` converts from them ([`crate::call`]).

mod number;
mod reader;
mod tensor;
#[cfg(test)]
mod tests;

pub use reader::Reader;

/// Why a JSON body could not be read. The messages are written for the client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JsonError {
    /// The text is not JSON, or not the JSON expected there: a syntax error (worded
    /// `{context}: {what} at line L column C`), a member missing or given twice, data nested
    /// too deep. The body's fault.
    #[error("{0}")]
    Malformed(String),
    /// Valid JSON that does not make the tensor asked for: a value out of its type's range or
    /// of another type, a shape too large, nesting that does not match the shape, too few or
    /// too many elements. The input's fault.
    #[error("{0}")]
    Invalid(String),
    /// More rows than [`Reader::tensor_rows`] was told may come (`max`), found as soon as one
    /// more starts. Invalid input, which a front door words in its own terms (instances, say).
    #[error("the data has more than {max} rows")]
    TooManyRows { max: usize },
}
