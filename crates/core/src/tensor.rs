//! Tensors as the server moves them: a datatype, a shape and little-endian bytes.
//!
//! Everything between the HTTP codecs and the device worker speaks this type, so neither side
//! needs to know about the other. Rows are always along dim 0.

use std::fmt;

use bytes::Bytes;
use thiserror::Error;

/// Element types the server accepts, named as in the KServe V2 protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
}

impl DataType {
    pub const ALL: [DataType; 12] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::F32,
        DataType::F64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
        }
    }

    /// The V2 protocol name (`FP32`, `INT64`, ...).
    pub fn v2_name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
        }
    }

    pub fn from_v2_name(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.v2_name() == name)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.v2_name())
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum TensorError {
    #[error("shape {shape:?} needs {expected} bytes of {dtype} data, got {got}")]
    ByteCount {
        dtype: DataType,
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("shape {0:?} has too many elements")]
    ShapeOverflow(Vec<usize>),
    #[error("cannot concatenate tensors of {a} {a_shape:?} and {b} {b_shape:?} along dim 0")]
    Mismatch {
        a: DataType,
        a_shape: Vec<usize>,
        b: DataType,
        b_shape: Vec<usize>,
    },
    #[error("a tensor with rows needs at least one dimension")]
    Scalar,
}

/// A dense tensor: `data.len() == shape.product() * dtype.size()`, little-endian.
///
/// The bytes are shared, not owned: a binary request's tensor of 16 KiB or more is a slice of the
/// connection's read buffer when its bytes arrived in one piece, and [`Tensor::slice_rows`] is a
/// slice of its tensor, so neither copies. [`Tensor::copy_rows`] is for rows kept long.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({} {:?}, {} bytes)",
            self.dtype,
            self.shape,
            self.data.len()
        )
    }
}

/// Number of elements of a shape, or `None` on overflow.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    pub fn new(
        dtype: DataType,
        shape: Vec<usize>,
        data: impl Into<Bytes>,
    ) -> Result<Tensor, TensorError> {
        let data = data.into();
        let expected = element_count(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| TensorError::ShapeOverflow(shape.clone()))?;
        if expected != data.len() {
            return Err(TensorError::ByteCount {
                dtype,
                shape,
                expected,
                got: data.len(),
            });
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// Rows along dim 0 (`None` for a scalar).
    pub fn rows(&self) -> Option<usize> {
        self.shape.first().copied()
    }

    pub fn element_count(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// Bytes of one row (a slice along dim 0).
    pub fn row_bytes(&self) -> usize {
        match self.shape.first() {
            Some(0) | None => {
                element_count(&self.shape[1.min(self.shape.len())..]).unwrap_or(0)
                    * self.dtype.size()
            }
            Some(&r) => self.data.len() / r,
        }
    }

    /// Rows `start..start + count` as a new tensor sharing these bytes.
    pub fn slice_rows(&self, start: usize, count: usize) -> Tensor {
        let rb = self.row_bytes();
        let mut shape = self.shape.clone();
        shape[0] = count;
        Tensor {
            dtype: self.dtype,
            shape,
            data: self.data.slice(start * rb..(start + count) * rb),
        }
    }

    /// Rows `start..start + count` in a buffer of their own, for rows kept long after their
    /// request: a slice would keep the request's whole buffer alive.
    pub fn copy_rows(&self, start: usize, count: usize) -> Tensor {
        let mut rows = self.slice_rows(start, count);
        rows.data = Bytes::copy_from_slice(&rows.data);
        rows
    }

    /// Concatenates along dim 0. All parts must share dtype and non-batch dims.
    pub fn concat(parts: &[&Tensor]) -> Result<Tensor, TensorError> {
        let first = parts.first().ok_or(TensorError::Scalar)?;
        if first.shape.is_empty() {
            return Err(TensorError::Scalar);
        }
        let mut rows = 0;
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            if p.dtype != first.dtype
                || p.shape.len() != first.shape.len()
                || p.shape[1..] != first.shape[1..]
            {
                return Err(TensorError::Mismatch {
                    a: first.dtype,
                    a_shape: first.shape.clone(),
                    b: p.dtype,
                    b_shape: p.shape.clone(),
                });
            }
            rows += p.shape[0];
            data.extend_from_slice(&p.data);
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        Ok(Tensor {
            dtype: first.dtype,
            shape,
            data: data.into(),
        })
    }

    /// Builds an `F32` tensor (test and tooling convenience).
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Tensor, TensorError> {
        Tensor::new(
            DataType::F32,
            shape,
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
    }

    /// Reads an `F32` tensor's values (panics on another dtype: for tests and tooling).
    pub fn to_f32(&self) -> Vec<f32> {
        assert_eq!(
            self.dtype,
            DataType::F32,
            "to_f32 on a {} tensor",
            self.dtype
        );
        self.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_byte_count() {
        let err = Tensor::new(DataType::F32, vec![2, 3], vec![0; 23]).unwrap_err();
        assert_eq!(
            err,
            TensorError::ByteCount {
                dtype: DataType::F32,
                shape: vec![2, 3],
                expected: 24,
                got: 23
            }
        );
        assert!(Tensor::new(DataType::F32, vec![usize::MAX, 3], vec![]).is_err());
    }

    #[test]
    fn concat_then_slice_round_trips() {
        let a = Tensor::from_f32(vec![1, 2], &[1.0, 2.0]).unwrap();
        let b = Tensor::from_f32(vec![2, 2], &[3.0, 4.0, 5.0, 6.0]).unwrap();
        let c = Tensor::concat(&[&a, &b]).unwrap();
        assert_eq!(c.shape, vec![3, 2]);
        assert_eq!(c.to_f32(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(c.slice_rows(0, 1), a);
        assert_eq!(c.slice_rows(1, 2), b);
        // A slice shares the tensor's bytes; copied rows have their own.
        assert_eq!(c.slice_rows(1, 2).data.as_ptr(), c.data[8..].as_ptr());
        let own = c.copy_rows(1, 2);
        assert_eq!(own, b);
        assert_ne!(own.data.as_ptr(), c.data[8..].as_ptr());
    }

    #[test]
    fn concat_rejects_other_shapes_and_dtypes() {
        let a = Tensor::from_f32(vec![1, 2], &[1.0, 2.0]).unwrap();
        let b = Tensor::from_f32(vec![1, 3], &[1.0, 2.0, 3.0]).unwrap();
        assert!(matches!(
            Tensor::concat(&[&a, &b]),
            Err(TensorError::Mismatch { .. })
        ));
        let c = Tensor::new(DataType::I32, vec![1, 2], vec![0; 8]).unwrap();
        assert!(matches!(
            Tensor::concat(&[&a, &c]),
            Err(TensorError::Mismatch { .. })
        ));
    }

    #[test]
    fn v2_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::from_v2_name(d.v2_name()), Some(d));
        }
        assert_eq!(DataType::from_v2_name("BYTES"), None);
    }
}
