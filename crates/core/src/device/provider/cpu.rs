//! The host's cores: `cpu`, `cpu:N`. Slots, not devices: each is a session with its share of
//! `runtime.cpu_threads` (the planner's), and every slot is usable.

use ort::memory::Allocator;
use ort::session::builder::SessionBuilder;
use ort::session::Session;

use crate::config::{ProviderKind, RuntimeConfig};
use crate::device::memory::{CpuMemorySource, DeviceMemory};
use crate::device::{DeviceKind, RuntimeInfo};

use super::{ExecutionProvider, Inputs, SessionSettings};

pub(super) struct Cpu;

fn not_cpu(kind: DeviceKind) -> String {
    format!("{kind:?} is not a CPU slot")
}

impl ExecutionProvider for Cpu {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Cpu
    }

    fn visible(&self, _: &RuntimeConfig) -> u32 {
        1
    }

    fn auto(&self) -> bool {
        false
    }

    fn missing(&self, _: &RuntimeInfo) -> Option<String> {
        None
    }

    fn unusable(&self, _: u32, _: u32, _: &RuntimeInfo) -> Option<String> {
        None
    }

    fn device_kind(&self, _: u32) -> Option<DeviceKind> {
        None
    }

    fn configure(
        &self,
        builder: SessionBuilder,
        kind: DeviceKind,
        _: &SessionSettings,
    ) -> Result<SessionBuilder, String> {
        let DeviceKind::Cpu {
            intra_op_threads,
            spinning,
        } = kind
        else {
            return Err(not_cpu(kind));
        };
        let b = builder
            .with_intra_threads(intra_op_threads)
            .map_err(|e| e.to_string())?;
        let b = b.with_inter_threads(1).map_err(|e| e.to_string())?;
        // Off by default: several sessions and the HTTP workers share the cores, and a
        // spinning pool burns the time the others need (`runtime.cpu_spinning`).
        b.with_intra_op_spinning(spinning)
            .map_err(|e| e.to_string())
    }

    fn inputs(&self, _: &Session, _: DeviceKind, _: &SessionSettings) -> Result<Inputs, String> {
        Ok(Inputs {
            allocator: Allocator::default(),
            binding: None,
        })
    }

    fn memory(&self, _: DeviceKind, _: &RuntimeConfig) -> Result<Box<dyn DeviceMemory>, String> {
        Ok(Box::new(CpuMemorySource::detect()))
    }

    fn caps_arena(&self) -> bool {
        false
    }

    fn is_gpu(&self) -> bool {
        false
    }
}
