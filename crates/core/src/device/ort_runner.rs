//! A real ONNX Runtime session behind [`ModelRunner`].

use std::borrow::Cow;
use std::path::Path;

use ort::error::ErrorCode;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, SessionInputValue, SessionOutputs};
use ort::value::{DynTensor, DynTensorValueType, TensorElementType, ValueType};

use crate::model::{ModelInfo, TensorInfo};
use crate::tensor::{DataType, Tensor};

use super::provider::{Inputs, SessionSettings};
use super::{runtime, DeviceError, DevicePlan, ModelRunner, RunError};

/// Owns one `ort::Session`. `Session::run` takes `&mut self`, so exactly one thread uses it.
pub struct OrtRunner {
    session: Session,
    info: ModelInfo,
    /// Per input, the name of each dimension ("" where the model names none).
    dim_names: Vec<Vec<String>>,
    /// Allocator for input tensors: host memory, or pinned host memory where the provider pins.
    allocator: Allocator,
    /// With pinned inputs: the binding every run goes through.
    binding: Option<IoBinding>,
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
        OrtRunner::open_with(path, plan, SessionSettings::default())
    }

    /// [`OrtRunner::open`] with the session settings; the plan's execution provider applies
    /// those of its kind.
    pub(crate) fn open_with(
        path: &Path,
        plan: &DevicePlan,
        settings: SessionSettings,
    ) -> Result<OrtRunner, DeviceError> {
        let fail = |message: String| DeviceError::Session {
            path: path.display().to_string(),
            device: plan.device.clone(),
            message,
        };
        let env =
            runtime::environment().ok_or_else(|| fail("ONNX Runtime is not loaded".into()))?;
        let provider = plan.kind.provider();
        let builder = Session::builder(env).map_err(|e| fail(e.to_string()))?;
        let mut builder = provider
            .configure(builder, plan.kind, &settings)
            .map_err(fail)?;
        let session = builder
            .commit_from_file(path)
            .map_err(|e| fail(e.to_string()))?;
        let Inputs { allocator, binding } = provider
            .inputs(&session, plan.kind, &settings)
            .map_err(fail)?;
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
            allocator,
            binding,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Per input, the model's name for each dimension ("" where it has none).
    pub(crate) fn dim_names(&self) -> &[Vec<String>] {
        &self.dim_names
    }

    /// Copies every part's rows of input `i` into one ONNX Runtime tensor (the batch's only copy).
    fn batch_input(&self, parts: &[Vec<Tensor>], i: usize) -> Result<DynTensor, RunError> {
        let first = &parts[0][i];
        let mut shape: Vec<i64> = first.shape.iter().map(|&d| d as i64).collect();
        if !shape.is_empty() {
            shape[0] = parts.iter().map(|p| p[i].shape[0] as i64).sum();
        }
        let mut value = uninit_tensor(&self.allocator, dtype_to_ort(first.dtype), &shape)
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

/// A tensor from `allocator` whose bytes are left as they are. `DynTensor::new` zeroes host
/// memory first, and every byte of a batch input is then written again by the copy: the zeroing
/// was 6.4% of the CNN fixture's device thread at 32 clients (docs/BENCHMARKS.md).
fn uninit_tensor(
    allocator: &Allocator,
    dtype: TensorElementType,
    shape: &[i64],
) -> Result<DynTensor, ort::Error> {
    use ort::AsPointer;
    let mut out: *mut ort::sys::OrtValue = std::ptr::null_mut();
    // SAFETY: the allocator and the shape are valid for the call; ONNX Runtime writes `out` only
    // when the status is OK.
    let status = unsafe {
        (ort::api().CreateTensorAsOrtValue)(
            allocator.ptr().cast_mut(),
            shape.as_ptr(),
            shape.len(),
            dtype.into(),
            &mut out,
        )
    };
    // SAFETY: the status comes from the call above, and is consumed once.
    unsafe { ort::Error::result_from_status(status) }?;
    let value = std::ptr::NonNull::new(out)
        .ok_or_else(|| ort::Error::new("CreateTensorAsOrtValue returned no value"))?;
    // SAFETY: `value` is a tensor just created with `allocator`, owned by nobody else.
    Ok(unsafe { DynTensor::from_ptr(value, Some(allocator)) })
}

/// Copies every output into a server tensor, in the model's output order.
fn collect_outputs(
    info: &ModelInfo,
    outputs: &mut SessionOutputs<'_>,
) -> Result<Vec<Tensor>, RunError> {
    let mut result = Vec::with_capacity(info.outputs.len());
    for out in &info.outputs {
        let value = outputs.remove(out.name.as_str()).ok_or_else(|| {
            RunError::Failed(format!("output {:?} missing from the run", out.name))
        })?;
        let tensor = value
            .downcast::<DynTensorValueType>()
            .map_err(|e| RunError::Failed(format!("output {:?}: {e}", out.name)))?;
        if !tensor.memory_info().is_cpu_accessible() {
            return Err(RunError::Failed(format!(
                "output {:?} is not in host memory",
                out.name
            )));
        }
        let shape: Vec<usize> = tensor.shape().iter().map(|&d| d as usize).collect();
        let bytes = tensor.size().unwrap_or(0);
        let data = if bytes == 0 {
            Vec::new()
        } else {
            // SAFETY: the tensor is in host memory (checked above) and holds `bytes` bytes.
            unsafe { std::slice::from_raw_parts(tensor.data_ptr().cast::<u8>(), bytes) }.to_vec()
        };
        result.push(
            Tensor::new(out.dtype, shape, data)
                .map_err(|e| RunError::Failed(format!("output {:?}: {e}", out.name)))?,
        );
    }
    Ok(result)
}

fn run_error(e: ort::Error) -> RunError {
    match e.code() {
        ErrorCode::InvalidArgument => RunError::Input(e.message().to_string()),
        _ => RunError::Failed(e.to_string()),
    }
}

impl ModelRunner for OrtRunner {
    fn run(&mut self, parts: &[Vec<Tensor>]) -> Result<Vec<Tensor>, RunError> {
        let mut inputs = Vec::with_capacity(self.info.inputs.len());
        for i in 0..self.info.inputs.len() {
            inputs.push(self.batch_input(parts, i)?);
        }
        if let Some(binding) = &mut self.binding {
            // Pinned inputs, copied to the GPU asynchronously; outputs come back to host memory.
            let host = MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::CPUOutput,
            )
            .map_err(|e| RunError::Failed(e.to_string()))?;
            binding.clear();
            for (info, value) in self.info.inputs.iter().zip(&inputs) {
                binding
                    .bind_input(info.name.as_str(), value)
                    .map_err(run_error)?;
            }
            for info in &self.info.outputs {
                binding
                    .bind_output_to_device(info.name.as_str(), &host)
                    .map_err(run_error)?;
            }
            let mut outputs = self.session.run_binding(binding).map_err(run_error)?;
            return collect_outputs(&self.info, &mut outputs);
        }
        let named: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = self
            .info
            .inputs
            .iter()
            .zip(inputs)
            .map(|(info, value)| (Cow::Owned(info.name.clone()), value.into()))
            .collect();
        let mut outputs = self.session.run(named).map_err(run_error)?;
        collect_outputs(&self.info, &mut outputs)
    }
}
