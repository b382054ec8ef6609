//! What a model looks like from outside: its inputs and outputs, and the checks a request's
//! tensors must pass before they are queued.

use thiserror::Error;

use crate::tensor::{DataType, Tensor};

/// One input or output of a model. `dims` holds -1 where a dimension is dynamic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
}

/// Inputs and outputs in the model's own order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

/// A request's tensors that do not fit the model. Every message names the input.
#[derive(Debug, Error, PartialEq)]
pub enum InputError {
    #[error("unknown input {name:?}; the model's inputs are {expected:?}")]
    UnknownInput { name: String, expected: Vec<String> },
    #[error("input {0:?} is given twice")]
    Duplicate(String),
    #[error("missing input {0:?}")]
    Missing(String),
    #[error("input {name:?}: expected datatype {expected}, got {got}")]
    Dtype {
        name: String,
        expected: DataType,
        got: DataType,
    },
    #[error("input {name:?}: expected shape {expected:?} (-1 = any), got {got:?}")]
    Shape {
        name: String,
        expected: Vec<i64>,
        got: Vec<usize>,
    },
    #[error("input {name:?} has {got} rows along dim 0 but input {first:?} has {expected}; all inputs need the same batch size")]
    RowMismatch {
        name: String,
        first: String,
        expected: usize,
        got: usize,
    },
    #[error("input {0:?} has no rows (dim 0 is 0)")]
    Empty(String),
    #[error("unknown output {name:?}; the model's outputs are {expected:?}")]
    UnknownOutput { name: String, expected: Vec<String> },
}

impl ModelInfo {
    /// A model whose first input has a fixed first dimension is run without batching.
    pub fn batchable(&self) -> bool {
        self.inputs.iter().all(|i| i.dims.first() == Some(&-1))
            && self
                .outputs
                .iter()
                .all(|o| o.dims.first().is_none_or(|&d| d == -1))
    }

    pub fn input_names(&self) -> Vec<String> {
        self.inputs.iter().map(|i| i.name.clone()).collect()
    }

    pub fn output_index(&self, name: &str) -> Result<usize, InputError> {
        self.outputs
            .iter()
            .position(|o| o.name == name)
            .ok_or_else(|| InputError::UnknownOutput {
                name: name.to_string(),
                expected: self.outputs.iter().map(|o| o.name.clone()).collect(),
            })
    }

    /// Orders named tensors as the model expects and checks dtype, rank, fixed dims and rows.
    /// Returns the tensors in model order and the number of rows.
    pub fn check_inputs(
        &self,
        named: Vec<(String, Tensor)>,
    ) -> Result<(Vec<Tensor>, usize), InputError> {
        let mut slots: Vec<Option<Tensor>> = vec![None; self.inputs.len()];
        for (name, t) in named {
            let i = self
                .inputs
                .iter()
                .position(|info| info.name == name)
                .ok_or_else(|| InputError::UnknownInput {
                    name: name.clone(),
                    expected: self.input_names(),
                })?;
            if slots[i].is_some() {
                return Err(InputError::Duplicate(name));
            }
            let info = &self.inputs[i];
            if t.dtype != info.dtype {
                return Err(InputError::Dtype {
                    name,
                    expected: info.dtype,
                    got: t.dtype,
                });
            }
            let fits = t.shape.len() == info.dims.len()
                && t.shape
                    .iter()
                    .zip(&info.dims)
                    .all(|(&g, &e)| e < 0 || g as i64 == e);
            if !fits {
                return Err(InputError::Shape {
                    name,
                    expected: info.dims.clone(),
                    got: t.shape,
                });
            }
            slots[i] = Some(t);
        }
        let mut tensors = Vec::with_capacity(slots.len());
        for (slot, info) in slots.into_iter().zip(&self.inputs) {
            tensors.push(slot.ok_or_else(|| InputError::Missing(info.name.clone()))?);
        }
        let rows = match tensors.first().and_then(Tensor::rows) {
            Some(r) => r,
            None => return Ok((tensors, 1)),
        };
        if rows == 0 {
            return Err(InputError::Empty(self.inputs[0].name.clone()));
        }
        for (t, info) in tensors.iter().zip(&self.inputs).skip(1) {
            let got = t.rows().unwrap_or(0);
            if got != rows {
                return Err(InputError::RowMismatch {
                    name: info.name.clone(),
                    first: self.inputs[0].name.clone(),
                    expected: rows,
                    got,
                });
            }
        }
        Ok((tensors, rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ModelInfo {
        let ti = |name: &str, dims: Vec<i64>| TensorInfo {
            name: name.into(),
            dtype: DataType::F32,
            dims,
        };
        ModelInfo {
            inputs: vec![ti("a", vec![-1, 4]), ti("b", vec![-1, 4])],
            outputs: vec![ti("sum", vec![-1, 4])],
        }
    }

    fn t(rows: usize, cols: usize) -> Tensor {
        Tensor::from_f32(vec![rows, cols], &vec![0.5; rows * cols]).unwrap()
    }

    #[test]
    fn orders_inputs_and_counts_rows() {
        let (ts, rows) = info()
            .check_inputs(vec![("b".into(), t(3, 4)), ("a".into(), t(3, 4))])
            .unwrap();
        assert_eq!(rows, 3);
        assert_eq!(ts.len(), 2);
    }

    #[test]
    fn rejects_what_does_not_fit() {
        let m = info();
        let err = |named| m.check_inputs(named).unwrap_err();
        assert!(matches!(
            err(vec![("c".into(), t(1, 4))]),
            InputError::UnknownInput { .. }
        ));
        assert!(matches!(err(vec![("a".into(), t(1, 4))]), InputError::Missing(n) if n == "b"));
        assert!(matches!(
            err(vec![("a".into(), t(1, 4)), ("a".into(), t(1, 4))]),
            InputError::Duplicate(_)
        ));
        assert!(matches!(
            err(vec![("a".into(), t(1, 5)), ("b".into(), t(1, 4))]),
            InputError::Shape { .. }
        ));
        assert!(matches!(
            err(vec![("a".into(), t(2, 4)), ("b".into(), t(1, 4))]),
            InputError::RowMismatch { .. }
        ));
        assert!(matches!(
            err(vec![("a".into(), t(0, 4)), ("b".into(), t(0, 4))]),
            InputError::Empty(_)
        ));
        let i32t = Tensor::new(DataType::I32, vec![1, 4], vec![0; 16]).unwrap();
        assert!(matches!(
            err(vec![("a".into(), i32t), ("b".into(), t(1, 4))]),
            InputError::Dtype { .. }
        ));
        assert!(m.batchable());
    }
}
