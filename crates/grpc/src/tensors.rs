//! Tensors between the protocol's messages and the core's [`Tensor`]: typed `contents` or
//! `raw_input_contents` in, raw contents out. Every size a client states is checked against the
//! bytes it sent before anything is allocated for it.

use bytes::Bytes;

use ortserve_core::call::CallError;
use ortserve_core::tensor::{element_count, DataType, Tensor};

use crate::proto::inference::model_infer_request::InferInputTensor;
use crate::proto::inference::InferTensorContents;

fn invalid(message: String) -> CallError {
    CallError::InvalidInput(message)
}

/// A datatype name (`FP32`, `INT64`, ...) the server takes.
pub(crate) fn dtype(name: &str, input: &str) -> Result<DataType, CallError> {
    DataType::from_v2_name(name).ok_or_else(|| {
        invalid(format!(
            "input {input:?}: datatype {name:?} is not supported (BYTES tensors are not served)"
        ))
    })
}

/// A shape as sizes; a negative size is refused.
pub(crate) fn shape(dims: &[i64], input: &str) -> Result<Vec<usize>, CallError> {
    dims.iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                invalid(format!(
                    "input {input:?}: shape {dims:?} has a negative size"
                ))
            })
        })
        .collect()
}

/// The tensor of `input`: from `raw` (its entry of `raw_input_contents`) when the request
/// carries raw contents, else from its typed `contents`.
pub(crate) fn input(input: InferInputTensor, raw: Option<Bytes>) -> Result<Tensor, CallError> {
    let name = input.name.as_str();
    let dtype = dtype(&input.datatype, name)?;
    let shape = shape(&input.shape, name)?;
    let count = element_count(&shape)
        .filter(|n| n.checked_mul(dtype.size()).is_some())
        .ok_or_else(|| invalid(format!("input {name:?}: shape {shape:?} is too large")))?;
    let data = match (raw, input.contents) {
        (Some(raw), _) => raw,
        (None, Some(contents)) => from_contents(dtype, count, contents, name)?,
        (None, None) => {
            return Err(invalid(format!(
                "input {name:?} has neither contents nor raw_input_contents"
            )))
        }
    };
    Tensor::new(dtype, shape, data).map_err(|e| invalid(format!("input {name:?}: {e}")))
}

/// Little-endian bytes of `count` values of `dtype` from the typed list the protocol gives that
/// type (INT8 and INT16 in `int_contents`, UINT8 and UINT16 in `uint_contents`, range-checked).
fn from_contents(
    dtype: DataType,
    count: usize,
    c: InferTensorContents,
    name: &str,
) -> Result<Bytes, CallError> {
    fn check<T>(values: &[T], count: usize, name: &str, list: &str) -> Result<(), CallError> {
        if values.len() == count {
            Ok(())
        } else {
            Err(invalid(format!(
                "input {name:?}: its shape holds {count} values, {list} has {}",
                values.len()
            )))
        }
    }
    fn narrow<T: TryFrom<W>, W: Copy + std::fmt::Display>(
        values: &[W],
        name: &str,
        dtype: DataType,
        put: impl Fn(T, &mut Vec<u8>),
    ) -> Result<Vec<u8>, CallError> {
        let mut out = Vec::with_capacity(values.len() * dtype.size());
        for &v in values {
            let n = T::try_from(v)
                .map_err(|_| invalid(format!("input {name:?}: {v} is out of range for {dtype}")))?;
            put(n, &mut out);
        }
        Ok(out)
    }
    let bytes: Vec<u8> = match dtype {
        DataType::F32 => {
            check(&c.fp32_contents, count, name, "fp32_contents")?;
            c.fp32_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        DataType::F64 => {
            check(&c.fp64_contents, count, name, "fp64_contents")?;
            c.fp64_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        DataType::I64 => {
            check(&c.int64_contents, count, name, "int64_contents")?;
            c.int64_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        DataType::U64 => {
            check(&c.uint64_contents, count, name, "uint64_contents")?;
            c.uint64_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        DataType::I32 => {
            check(&c.int_contents, count, name, "int_contents")?;
            c.int_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        DataType::U32 => {
            check(&c.uint_contents, count, name, "uint_contents")?;
            c.uint_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        DataType::I16 => {
            check(&c.int_contents, count, name, "int_contents")?;
            narrow::<i16, i32>(&c.int_contents, name, dtype, |v, o| {
                o.extend(v.to_le_bytes())
            })?
        }
        DataType::I8 => {
            check(&c.int_contents, count, name, "int_contents")?;
            narrow::<i8, i32>(&c.int_contents, name, dtype, |v, o| {
                o.extend(v.to_le_bytes())
            })?
        }
        DataType::U16 => {
            check(&c.uint_contents, count, name, "uint_contents")?;
            narrow::<u16, u32>(&c.uint_contents, name, dtype, |v, o| {
                o.extend(v.to_le_bytes())
            })?
        }
        DataType::U8 => {
            check(&c.uint_contents, count, name, "uint_contents")?;
            narrow::<u8, u32>(&c.uint_contents, name, dtype, |v, o| o.push(v))?
        }
        DataType::Bool => {
            check(&c.bool_contents, count, name, "bool_contents")?;
            c.bool_contents.iter().map(|&b| u8::from(b)).collect()
        }
        DataType::F16 => {
            return Err(invalid(format!(
            "input {name:?}: FP16 has no typed contents in the protocol; send raw_input_contents"
        )))
        }
    };
    Ok(Bytes::from(bytes))
}

/// A `ModelInfer` request for `model` with `inputs` as raw little-endian contents, one per
/// input, as `tritonclient.grpc` sends them (for clients: the benchmark, the tests).
pub fn raw_request(
    model: &str,
    inputs: &[(&str, &Tensor)],
) -> crate::proto::inference::ModelInferRequest {
    crate::proto::inference::ModelInferRequest {
        model_name: model.into(),
        inputs: inputs
            .iter()
            .map(|(name, t)| InferInputTensor {
                name: name.to_string(),
                datatype: t.dtype.v2_name().into(),
                shape: dims(t),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: inputs.iter().map(|(_, t)| t.data.clone()).collect(),
        ..Default::default()
    }
}

/// The protocol's shape of a tensor.
pub(crate) fn dims(t: &Tensor) -> Vec<i64> {
    t.shape.iter().map(|&d| d as i64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(datatype: &str, shape: Vec<i64>, contents: InferTensorContents) -> InferInputTensor {
        InferInputTensor {
            name: "x".into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents: Some(contents),
        }
    }

    #[test]
    fn typed_contents_become_little_endian_bytes_of_the_right_count() {
        let t = input(
            tensor(
                "INT16",
                vec![1, 3],
                InferTensorContents {
                    int_contents: vec![1, -2, 300],
                    ..Default::default()
                },
            ),
            None,
        )
        .unwrap();
        assert_eq!(t.shape, vec![1, 3]);
        assert_eq!(&t.data[..], &[1, 0, 0xfe, 0xff, 0x2c, 0x01]);
        let too_big = input(
            tensor(
                "UINT8",
                vec![1],
                InferTensorContents {
                    uint_contents: vec![256],
                    ..Default::default()
                },
            ),
            None,
        );
        assert!(too_big.unwrap_err().message().contains("out of range"));
        let short = input(
            tensor(
                "FP32",
                vec![2, 2],
                InferTensorContents {
                    fp32_contents: vec![1.0],
                    ..Default::default()
                },
            ),
            None,
        );
        assert!(short.unwrap_err().message().contains("holds 4 values"));
    }

    /// A shape is a claim: a huge one with a few raw bytes, or one whose byte count overflows,
    /// is refused without allocating for it.
    #[test]
    fn claimed_shapes_are_checked_against_the_bytes_sent() {
        let huge = InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1 << 40, 1 << 20],
            parameters: Default::default(),
            contents: None,
        };
        let e = input(huge.clone(), Some(Bytes::from_static(&[0; 16]))).unwrap_err();
        assert!(
            e.message().contains("too large") || e.message().contains("bytes"),
            "{e:?}"
        );
        let mut big = huge;
        big.shape = vec![1 << 20, 1 << 10];
        let e = input(big, Some(Bytes::from_static(&[0; 16]))).unwrap_err();
        assert!(e.message().contains("input \"x\""), "{e:?}");
        let negative = tensor("FP32", vec![-1, 4], InferTensorContents::default());
        assert!(input(negative, None)
            .unwrap_err()
            .message()
            .contains("negative"));
        let bytes = tensor("BYTES", vec![1], InferTensorContents::default());
        assert!(input(bytes, None).unwrap_err().message().contains("BYTES"));
    }
}
