//! NVIDIA GPUs through ONNX Runtime's CUDA execution provider: `cuda`, `cuda:N`, `cuda:*`.
//! Which GPUs this process sees (the driver's list, narrowed by `CUDA_VISIBLE_DEVICES`, which is
//! read here only), the provider library next to the loaded ONNX Runtime, the session on one GPU
//! with no silent CPU fallback, pinned inputs, and memory read through NVML.

use std::path::Path;

use ort::ep;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::SessionBuilder;
use ort::session::Session;

use crate::config::{ConvAlgoSearch, ProviderKind, RuntimeConfig};
use crate::device::memory::{DeviceMemory, MemoryReading};
use crate::device::{DeviceKind, RuntimeInfo};

use super::{ExecutionProvider, Inputs, SessionSettings};

pub(super) struct Cuda;

/// `CUDA_VISIBLE_DEVICES` (`runtime.cuda_visible_devices`), parsed in this one place: how many
/// of the driver's GPUs this process may use, and the NVML index of each CUDA index.
struct Visible {
    /// The listed entries, trimmed; `None` when the variable is unset; empty when it hides every
    /// GPU (empty or `-1`).
    listed: Option<Vec<String>>,
}

impl Visible {
    fn parse(cuda_visible_devices: Option<&str>) -> Visible {
        Visible {
            listed: cuda_visible_devices.map(|v| {
                if v.trim().is_empty() || v.trim() == "-1" {
                    Vec::new()
                } else {
                    v.split(',').map(|s| s.trim().to_string()).collect()
                }
            }),
        }
    }

    /// GPUs this process may use, of the `present` ones the driver shows.
    fn count(&self, present: u32) -> u32 {
        match &self.listed {
            Some(l) => present.min(l.iter().filter(|s| !s.is_empty()).count() as u32),
            None => present,
        }
    }

    /// The NVML index of `cuda:id`: the id'th entry when it is a number (the variable renumbers
    /// GPUs), else `id`.
    fn nvml_index(&self, id: u32) -> u32 {
        self.listed
            .as_ref()
            .and_then(|l| l.get(id as usize))
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(id)
    }
}

/// The GPUs the NVIDIA driver shows.
fn present() -> u32 {
    std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|d| d.count() as u32)
        .unwrap_or(0)
}

fn provider_library(runtime: &RuntimeInfo) -> std::path::PathBuf {
    runtime
        .library
        .parent()
        .unwrap_or(Path::new("."))
        .join("libonnxruntime_providers_cuda.so")
}

fn gpu_id(kind: DeviceKind) -> Result<u32, String> {
    match kind {
        DeviceKind::Cuda { id } => Ok(id),
        other => Err(format!("{other:?} is not a CUDA device")),
    }
}

impl ExecutionProvider for Cuda {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Cuda
    }

    fn visible(&self, runtime: &RuntimeConfig) -> u32 {
        Visible::parse(runtime.cuda_visible_devices.as_deref()).count(present())
    }

    fn auto(&self) -> bool {
        true
    }

    fn missing(&self, runtime: &RuntimeInfo) -> Option<String> {
        let provider = provider_library(runtime);
        (!provider.exists()).then(|| {
            format!(
                "the CUDA execution provider {} is missing; use the onnxruntime-gpu libraries",
                provider.display()
            )
        })
    }

    fn unusable(&self, id: u32, gpus: u32, runtime: &RuntimeInfo) -> Option<String> {
        if gpus == 0 {
            return Some("no NVIDIA GPU is visible on this machine (/proc/driver/nvidia/gpus is empty or missing, or CUDA_VISIBLE_DEVICES hides them); use `cpu` or `auto`".into());
        }
        if id >= gpus {
            return Some(format!(
                "only {gpus} GPU(s) visible (cuda:0..cuda:{})",
                gpus - 1
            ));
        }
        self.missing(runtime)
    }

    fn device_kind(&self, id: u32) -> Option<DeviceKind> {
        Some(DeviceKind::Cuda { id })
    }

    fn configure(
        &self,
        builder: SessionBuilder,
        kind: DeviceKind,
        settings: &SessionSettings,
    ) -> Result<SessionBuilder, String> {
        let id = gpu_id(kind)?;
        let search = match settings.conv_search {
            ConvAlgoSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
            ConvAlgoSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
            ConvAlgoSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
        };
        let mut ep = ep::CUDA::default()
            .with_device_id(id as i32)
            .with_conv_algorithm_search(search);
        if let Some(limit) = settings.memory_limit {
            ep = ep
                .with_memory_limit(limit as usize)
                .with_arena_extend_strategy(ep::ArenaExtendStrategy::SameAsRequested);
        }
        builder
            .with_execution_providers([ep.build().error_on_failure()])
            .map_err(|e| e.to_string())
    }

    fn inputs(
        &self,
        session: &Session,
        kind: DeviceKind,
        settings: &SessionSettings,
    ) -> Result<Inputs, String> {
        let id = gpu_id(kind)?;
        // A CUDA allocator only exists when the session really runs on that GPU.
        let mem = MemoryInfo::new(
            AllocationDevice::CUDA,
            id as i32,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(|e| e.to_string())?;
        Allocator::new(session, mem)
            .map_err(|e| format!("session is not on the GPU (no CUDA allocator: {e})"))?;
        if !settings.pinned_inputs {
            return Ok(Inputs {
                allocator: Allocator::default(),
                binding: None,
            });
        }
        let pinned = MemoryInfo::new(
            AllocationDevice::CUDA_PINNED,
            0,
            AllocatorType::Device,
            MemoryType::CPUInput,
        )
        .map_err(|e| e.to_string())?;
        let allocator =
            Allocator::new(session, pinned).map_err(|e| format!("pinned host allocator: {e}"))?;
        let binding = session
            .create_binding()
            .map_err(|e| format!("IoBinding: {e}"))?;
        Ok(Inputs {
            allocator,
            binding: Some(binding),
        })
    }

    fn memory(
        &self,
        kind: DeviceKind,
        runtime: &RuntimeConfig,
    ) -> Result<Box<dyn DeviceMemory>, String> {
        let id = gpu_id(kind)?;
        let index = Visible::parse(runtime.cuda_visible_devices.as_deref()).nvml_index(id);
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| e.to_string())?;
        nvml.device_by_index(index).map_err(|e| e.to_string())?;
        Ok(Box::new(NvmlMemory { nvml, index }))
    }

    fn caps_arena(&self) -> bool {
        true
    }

    fn is_gpu(&self) -> bool {
        true
    }
}

/// One GPU's memory through NVML, by NVML device index.
struct NvmlMemory {
    nvml: nvml_wrapper::Nvml,
    index: u32,
}

impl DeviceMemory for NvmlMemory {
    fn name(&self) -> String {
        format!("NVML device {}: used against total", self.index)
    }

    fn read(&self) -> MemoryReading {
        match self
            .nvml
            .device_by_index(self.index)
            .and_then(|d| d.memory_info())
        {
            Ok(m) => MemoryReading {
                used: m.used,
                limit: Some(m.total),
            },
            Err(e) => {
                tracing::warn!(error = %e, "NVML memory reading failed");
                MemoryReading {
                    used: 0,
                    limit: None,
                }
            }
        }
    }

    fn device_name(&self) -> Option<String> {
        Some(
            self.nvml
                .device_by_index(self.index)
                .and_then(|d| d.name())
                .unwrap_or_else(|e| format!("unknown ({e})")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_visible_devices_narrows_and_renumbers() {
        let unset = Visible::parse(None);
        assert_eq!(unset.count(4), 4);
        assert_eq!(unset.nvml_index(2), 2);
        for hidden in ["", " ", "-1"] {
            let v = Visible::parse(Some(hidden));
            assert_eq!(v.count(4), 0, "{hidden:?}");
            assert_eq!(v.nvml_index(0), 0);
        }
        let v = Visible::parse(Some("2, 0"));
        assert_eq!(v.count(4), 2);
        assert_eq!(v.count(1), 1);
        assert_eq!(v.nvml_index(0), 2);
        assert_eq!(v.nvml_index(1), 0);
        assert_eq!(v.nvml_index(5), 5);
        // An empty entry is not a GPU, and keeps its place when mapping to NVML.
        let v = Visible::parse(Some("1,,3"));
        assert_eq!(v.count(4), 2);
        assert_eq!(v.nvml_index(1), 1);
        assert_eq!(v.nvml_index(2), 3);
        // GPU UUIDs are not NVML indices: the CUDA index is used.
        assert_eq!(Visible::parse(Some("GPU-abc")).nvml_index(0), 0);
    }
}
