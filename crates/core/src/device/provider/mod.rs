//! Execution providers: everything one kind of device means, behind one trait. A kind's name
//! and config forms are in [`ProviderKind`] (config may not depend on this module); what the
//! kind does at run time is its [`ExecutionProvider`], one file each: how many devices this
//! process may use, why one cannot be used, its session options, its memory probe, whether its
//! arena is capped and whether it is a GPU. Planning, sessions, tuning, startup and the metrics
//! reach a kind only through here.
//!
//! A new kind (TensorRT, OpenVINO) is a file here implementing the trait, a [`ProviderKind`]
//! variant (name and forms), a [`DeviceKind`] variant for its sessions and an arm in [`of`].

mod cpu;
mod cuda;

use ort::memory::Allocator;
use ort::session::builder::SessionBuilder;
use ort::session::{IoBinding, Session};

use crate::config::{ConvAlgoSearch, ProviderKind, RuntimeConfig};

use super::memory::DeviceMemory;
use super::{DeviceKind, RuntimeInfo};

/// Session settings that a kind may use; each ignores what does not apply to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SessionSettings {
    /// The arena's limit on a kind with device memory ([`ExecutionProvider::caps_arena`]): it
    /// then grows by what is requested, so ONNX Runtime fails an allocation instead of taking
    /// the card.
    pub memory_limit: Option<u64>,
    /// Assemble each batch in pinned (page-locked) host memory and run through an IoBinding,
    /// so the copy to the device is a fast asynchronous DMA (`cuda.pinned_inputs`).
    pub pinned_inputs: bool,
    /// The CUDA provider's `cudnn_conv_algo_search`.
    pub conv_search: ConvAlgoSearch,
}

/// Where the inputs of a session's runs are assembled, decided once the session is built.
pub(crate) struct Inputs {
    /// Allocator for input tensors: host memory, or pinned host memory.
    pub allocator: Allocator,
    /// The binding every run goes through, when inputs are pinned.
    pub binding: Option<IoBinding>,
}

/// What one kind of device means. Implementations are stateless: what they see of the host
/// they read when asked.
pub(crate) trait ExecutionProvider: Sync {
    /// The kind, whose name is the one in config and in device names (`cuda` in `cuda:1`).
    fn kind(&self) -> ProviderKind;

    /// How many devices of this kind this process may use (`kind:*` and `auto` take them all,
    /// `kind:N` must be below it). CPU slots are not devices: the CPU says 1.
    fn visible(&self, runtime: &RuntimeConfig) -> u32;

    /// Whether `auto` takes every visible device of this kind when it is usable, before
    /// falling back to one CPU slot.
    fn auto(&self) -> bool;

    /// Why no device of this kind can be used with the loaded ONNX Runtime (a missing provider
    /// library), as the startup error says it.
    fn missing(&self, runtime: &RuntimeInfo) -> Option<String>;

    /// Why device `id` cannot be used when `visible` devices are: none visible, `id` out of
    /// range, or [`ExecutionProvider::missing`]. `None` when it can.
    fn unusable(&self, id: u32, visible: u32, runtime: &RuntimeInfo) -> Option<String>;

    /// The session kind of device `id`. `None` for the CPU, whose slots the planner gives their
    /// share of `runtime.cpu_threads`.
    fn device_kind(&self, id: u32) -> Option<DeviceKind>;

    /// Applies this kind's session options to `builder` (threads, the execution provider).
    fn configure(
        &self,
        builder: SessionBuilder,
        kind: DeviceKind,
        settings: &SessionSettings,
    ) -> Result<SessionBuilder, String>;

    /// Once the session is built: checks it really is on the device, and says where inputs are
    /// assembled (pinned host memory and an IoBinding where [`SessionSettings::pinned_inputs`]
    /// applies, else the default host allocator).
    fn inputs(
        &self,
        session: &Session,
        kind: DeviceKind,
        settings: &SessionSettings,
    ) -> Result<Inputs, String>;

    /// How the tuning probe reads this device's memory.
    fn memory(
        &self,
        kind: DeviceKind,
        runtime: &RuntimeConfig,
    ) -> Result<Box<dyn DeviceMemory>, String>;

    /// Whether the device has memory of its own: ONNX Runtime's arena on it is capped at the
    /// free memory less the tuning headroom ([`SessionSettings::memory_limit`]), and its memory
    /// is read even when the batch size is not tuned.
    fn caps_arena(&self) -> bool;

    /// Whether the device is a GPU: NVML metrics are read while one serves, and batch-size
    /// buckets are on by default (the first run of each shape searches kernels).
    fn is_gpu(&self) -> bool;
}

/// The provider of a kind.
pub(crate) fn of(kind: ProviderKind) -> &'static dyn ExecutionProvider {
    match kind {
        ProviderKind::Cpu => &cpu::Cpu,
        ProviderKind::Cuda => &cuda::Cuda,
        #[cfg(test)]
        ProviderKind::Fake => &tests::Fake::ABSENT,
    }
}

/// Whether a served device name (`cuda:0`, `cpu:0#1`) is a GPU.
pub(crate) fn is_gpu_device(name: &str) -> bool {
    let device = name.split_once('#').map_or(name, |(d, _)| d);
    match device.parse() {
        Ok(crate::config::DeviceSpec::One(kind, _)) => of(kind).is_gpu(),
        _ => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! A fake kind (`fake:N`) without ONNX Runtime: planning reaches a kind only through the
    //! trait, so it plans this one as it plans CUDA.

    use super::*;

    pub(crate) struct Fake {
        /// Devices this process may use.
        pub visible: u32,
        /// What [`ExecutionProvider::missing`] says.
        pub missing: Option<&'static str>,
    }

    impl Fake {
        pub(crate) const ABSENT: Fake = Fake {
            visible: 0,
            missing: Some("no fake devices here"),
        };
    }

    impl ExecutionProvider for Fake {
        fn kind(&self) -> ProviderKind {
            ProviderKind::Fake
        }

        fn visible(&self, _: &RuntimeConfig) -> u32 {
            self.visible
        }

        fn auto(&self) -> bool {
            true
        }

        fn missing(&self, _: &RuntimeInfo) -> Option<String> {
            self.missing.map(str::to_string)
        }

        fn unusable(&self, id: u32, visible: u32, runtime: &RuntimeInfo) -> Option<String> {
            if id >= visible {
                return Some(format!("only {visible} fake device(s)"));
            }
            self.missing(runtime)
        }

        fn device_kind(&self, id: u32) -> Option<DeviceKind> {
            Some(DeviceKind::Fake { id })
        }

        fn configure(
            &self,
            _: SessionBuilder,
            _: DeviceKind,
            _: &SessionSettings,
        ) -> Result<SessionBuilder, String> {
            Err("the fake kind builds no sessions".into())
        }

        fn inputs(
            &self,
            _: &Session,
            _: DeviceKind,
            _: &SessionSettings,
        ) -> Result<Inputs, String> {
            Err("the fake kind builds no sessions".into())
        }

        fn memory(
            &self,
            _: DeviceKind,
            _: &RuntimeConfig,
        ) -> Result<Box<dyn DeviceMemory>, String> {
            Err("the fake kind has no memory".into())
        }

        fn caps_arena(&self) -> bool {
            true
        }

        fn is_gpu(&self) -> bool {
            false
        }
    }

    #[test]
    fn every_kind_has_its_provider() {
        for &kind in ProviderKind::ALL {
            assert_eq!(of(kind).kind(), kind);
        }
    }

    #[test]
    fn gpu_devices_by_name() {
        assert!(is_gpu_device("cuda:0"));
        assert!(is_gpu_device("cuda:1#2"));
        assert!(!is_gpu_device("cpu:0"));
        assert!(!is_gpu_device("cpu:0#1"));
        assert!(!is_gpu_device("fake:0"));
        assert!(!is_gpu_device("nonsense"));
    }
}
