//! A real ONNX Runtime session behind [`ModelRunner`].

use std::borrow::Cow;
use std::path::Path;

use ort::ep;
use ort::error::ErrorCode;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynTensorValueType, TensorElementType, ValueType};

use crate::model::{ModelInfo, TensorInfo};
use crate::tensor::{DataType, Tensor};

use super::{runtime, DeviceError, DeviceKind, DevicePlan, ModelRunner, RunError};

/// Owns one `ort::Session`. `Session::run` takes `&mut self`, so exactly one thread uses it.
pub struct OrtRunner {
    session: Session,
    info: ModelInfo,
    /// Per input, the name of each dimension ("" where the model names none).
    dim_names: Vec<Vec<String>>,
    /// Host allocator for input tensors.
    allocator: Allocator,
}

fn dtype_from_ort(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::U8,
        TensorElementType::Uint16 => DataType::U16,
        TensorElementType::Uint32 => DataType::U32,
        TensorElementType::Uint64 => DataType::U64,
        TensorElementType::Int8 => DataType::I8,
        TensorElementType::Int16 => DataType::I16,
        TensorElementType::Int32 => DataType::I32,
        TensorElementType::Int64 => DataType::I64,
        TensorElementType::Float16 => DataType::F16,
        TensorElementType::Float32 => DataType::F32,
        TensorElementType::Float64 => DataType::F64,
        _ => return None,
    })
}

fn dtype_to_ort(dt: DataType) -> TensorElementType {
    match dt {
        DataType::Bool => TensorElementType::Bool,
        DataType::U8 => TensorElementType::Uint8,
        DataType::U16 => TensorElementType::Uint16,
        DataType::U32 => TensorElementType::Uint32,
        DataType::U64 => TensorElementType::Uint64,
        DataType::I8 => TensorElementType::Int8,
        DataType::I16 => TensorElementType::Int16,
        DataType::I32 => TensorElementType::Int32,
        DataType::I64 => TensorElementType::Int64,
        DataType::F16 => TensorElementType::Float16,
        DataType::F32 => TensorElementType::Float32,
        DataType::F64 => TensorElementType::Float64,
    }
}

fn tensor_infos(
    path: &Path,
    outlets: &[ort::value::Outlet],
) -> Result<Vec<TensorInfo>, DeviceError> {
    outlets
        .iter()
        .map(|o| match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => Ok(TensorInfo {
                name: o.name().to_string(),
                dtype: dtype_from_ort(*ty).ok_or_else(|| DeviceError::UnsupportedModel {
                    path: path.display().to_string(),
                    message: format!(
                        "{:?} has element type {ty:?}, which ortserve does not serve",
                        o.name()
                    ),
                })?,
                dims: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
            }),
            other => Err(DeviceError::UnsupportedModel {
                path: path.display().to_string(),
                message: format!("{:?} is a {other}, not a tensor", o.name()),
            }),
        })
        .collect()
}

impl OrtRunner {
    /// Builds a session for `plan` (CPU with its thread count, or CUDA with no silent CPU
    /// fallback) from the model file. [`super::init_runtime`] must have succeeded first.
    pub fn open(path: &Path, plan: &DevicePlan) -> Result<OrtRunner, DeviceError> {
        let fail = |message: String| DeviceError::Session {
            path: path.display().to_string(),
            device: plan.device.clone(),
            message,
        };
        let env =
            runtime::environment().ok_or_else(|| fail("ONNX Runtime is not loaded".into()))?;
        let builder = Session::builder(env).map_err(|e| fail(e.to_string()))?;
        let mut builder = match plan.kind {
            DeviceKind::Cpu { intra_op_threads } => {
                let b = builder
                    .with_intra_threads(intra_op_threads)
                    .map_err(|e| fail(e.to_string()))?;
                let b = b.with_inter_threads(1).map_err(|e| fail(e.to_string()))?;
                // Several sessions and the HTTP workers share the cores: a spinning pool would
                // burn the time the others need.
                b.with_intra_op_spinning(false)
                    .map_err(|e| fail(e.to_string()))?
            }
            DeviceKind::Cuda { id } => builder
                .with_execution_providers([ep::CUDA::default()
                    .with_device_id(id as i32)
                    .build()
                    .error_on_failure()])
                .map_err(|e| fail(e.to_string()))?,
        };
        let session = builder
            .commit_from_file(path)
            .map_err(|e| fail(e.to_string()))?;
        if let DeviceKind::Cuda { id } = plan.kind {
            // A CUDA allocator only exists when the session really runs on that GPU.
            let mem = MemoryInfo::new(
                AllocationDevice::CUDA,
                id as i32,
                AllocatorType::Device,
                MemoryType::Default,
            )
            .map_err(|e| fail(e.to_string()))?;
            Allocator::new(&session, mem).map_err(|e| {
                fail(format!(
                    "session is not on the GPU (no CUDA allocator: {e})"
                ))
            })?;
        }
        let info = ModelInfo {
            inputs: tensor_infos(path, session.inputs())?,
            outputs: tensor_infos(path, session.outputs())?,
        };
        let dim_names = session
            .inputs()
            .iter()
            .map(|o| match o.dtype() {
                ValueType::Tensor {
                    dimension_symbols, ..
                } => dimension_symbols.iter().cloned().collect(),
                _ => Vec::new(),
            })
            .collect();
        Ok(OrtRunner {
            session,
            info,
            dim_names,
            allocator: Allocator::default(),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Per input, the model's name for each dimension ("" where it has none).
    pub fn dim_names(&self) -> &[Vec<String>] {
        &self.dim_names
    }

    /// One unbatched run, in-process: the reference the tests compare the server with.
    pub fn run_once(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        self.run(&[inputs.to_vec()])
    }

    /// Copies every part's rows of input `i` into one ONNX Runtime tensor (the batch's only copy).
    fn batch_input(&self, parts: &[Vec<Tensor>], i: usize) -> Result<DynTensor, RunError> {
        let first = &parts[0][i];
        let mut shape: Vec<i64> = first.shape.iter().map(|&d| d as i64).collect();
        if !shape.is_empty() {
            shape[0] = parts.iter().map(|p| p[i].shape[0] as i64).sum();
        }
        let mut value = DynTensor::new(&self.allocator, dtype_to_ort(first.dtype), shape)
            .map_err(|e| RunError::Failed(format!("allocating input {i}: {e}")))?;
        let total: usize = parts.iter().map(|p| p[i].data.len()).sum();
        if value.size() != Some(total) {
            return Err(RunError::Failed(format!(
                "input {i}: {total} bytes do not fill the batch tensor"
            )));
        }
        let dst = value.data_ptr_mut().cast::<u8>();
        let mut offset = 0;
        for p in parts {
            let src = &p[i].data;
            // SAFETY: `dst` is a CPU buffer of `total` bytes (checked above) and the parts' bytes
            // sum to `total`, so every copy stays inside it; the buffers do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(offset), src.len()) };
            offset += src.len();
        }
        Ok(value)
    }
}

impl ModelRunner for OrtRunner {
    fn run(&mut self, parts: &[Vec<Tensor>]) -> Result<Vec<Tensor>, RunError> {
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(self.info.inputs.len());
        for (i, info) in self.info.inputs.iter().enumerate() {
            inputs.push((
                Cow::Owned(info.name.clone()),
                self.batch_input(parts, i)?.into(),
            ));
        }
        let mut outputs = self.session.run(inputs).map_err(|e| match e.code() {
            ErrorCode::InvalidArgument => RunError::Input(e.message().to_string()),
            _ => RunError::Failed(e.to_string()),
        })?;
        let mut result = Vec::with_capacity(self.info.outputs.len());
        for info in &self.info.outputs {
            let value = outputs.remove(info.name.as_str()).ok_or_else(|| {
                RunError::Failed(format!("output {:?} missing from the run", info.name))
            })?;
            let tensor = value
                .downcast::<DynTensorValueType>()
                .map_err(|e| RunError::Failed(format!("output {:?}: {e}", info.name)))?;
            let shape: Vec<usize> = tensor.shape().iter().map(|&d| d as usize).collect();
            let bytes = tensor.size().unwrap_or(0);
            let data = if bytes == 0 {
                Vec::new()
            } else {
                // SAFETY: outputs of a CPU-bound run live in host memory of `bytes` bytes.
                unsafe { std::slice::from_raw_parts(tensor.data_ptr().cast::<u8>(), bytes) }
                    .to_vec()
            };
            result.push(
                Tensor::new(info.dtype, shape, data)
                    .map_err(|e| RunError::Failed(format!("output {:?}: {e}", info.name)))?,
            );
        }
        Ok(result)
    }
}
