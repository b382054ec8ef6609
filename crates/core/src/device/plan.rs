//! Turning the `devices` of each model into concrete sessions: which device, how many threads.
//! What a kind of device means comes from its execution provider ([`super::provider`]).

use crate::config::{Config, DeviceSpec, ProviderKind, Threads};

use super::provider::{self, ExecutionProvider};
use super::{DeviceError, RuntimeInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu {
        intra_op_threads: usize,
        /// ONNX Runtime's intra-op threads spin between operators instead of sleeping
        /// (`runtime.cpu_spinning`).
        spinning: bool,
    },
    Cuda {
        id: u32,
    },
    /// The test-only kind (`provider::tests::Fake`).
    #[cfg(test)]
    Fake {
        id: u32,
    },
}

impl DeviceKind {
    /// The kind of device, as named in config.
    pub fn provider_kind(&self) -> ProviderKind {
        match self {
            DeviceKind::Cpu { .. } => ProviderKind::Cpu,
            DeviceKind::Cuda { .. } => ProviderKind::Cuda,
            #[cfg(test)]
            DeviceKind::Fake { .. } => ProviderKind::Fake,
        }
    }

    /// What this kind of device means: its session options, memory probe and the rest.
    pub(crate) fn provider(&self) -> &'static dyn ExecutionProvider {
        provider::of(self.provider_kind())
    }
}

/// One session to build: a (model, device, instance) triple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    /// `cpu:0`, `cuda:1`; instances of one device share the name.
    pub device: String,
    pub instance: usize,
    pub kind: DeviceKind,
}

/// The execution providers planning consults, each with the devices it sees.
type Seen<'a> = [(&'a dyn ExecutionProvider, u32)];

/// Plans every model's sessions. Each device is checked by its kind's provider against the
/// devices it sees (for CUDA: the GPUs the driver shows, and the CUDA provider library sitting
/// next to the loaded ONNX Runtime).
pub(crate) fn plan_devices(
    config: &Config,
    runtime: &RuntimeInfo,
) -> Result<Vec<Vec<DevicePlan>>, DeviceError> {
    let seen: Vec<_> = ProviderKind::ALL
        .iter()
        .map(|&k| {
            let p = provider::of(k);
            (p, p.visible(&config.runtime))
        })
        .collect();
    plan_with(config, runtime, &seen)
}

fn plan_with(
    config: &Config,
    runtime: &RuntimeInfo,
    seen: &Seen<'_>,
) -> Result<Vec<Vec<DevicePlan>>, DeviceError> {
    let lookup = |kind: ProviderKind| {
        seen.iter()
            .find(|(p, _)| p.kind() == kind)
            .copied()
            .unwrap_or((provider::of(kind), 0))
    };
    // `auto`: every visible device of the first usable kind that `auto` takes, else cpu:0.
    let auto = ProviderKind::ALL
        .iter()
        .map(|&k| lookup(k))
        .find(|(p, visible)| p.auto() && *visible > 0 && p.missing(runtime).is_none());
    // First pass: expand auto and kind:*, check each device with its kind, and count CPU
    // sessions that share the thread budget.
    let mut expanded = Vec::new();
    for m in &config.models {
        let mut devices = Vec::new();
        for e in &m.devices.0 {
            let specs: Vec<(ProviderKind, u32)> = match e.device {
                DeviceSpec::Auto => match auto {
                    Some((p, visible)) => (0..visible).map(|id| (p.kind(), id)).collect(),
                    None => vec![(ProviderKind::Cpu, 0)],
                },
                DeviceSpec::All(kind) => (0..lookup(kind).1.max(1)).map(|id| (kind, id)).collect(),
                DeviceSpec::One(kind, id) => vec![(kind, id)],
            };
            for (kind, id) in specs {
                let (p, visible) = lookup(kind);
                if let Some(message) = p.unusable(id, visible, runtime) {
                    return Err(DeviceError::Unavailable {
                        device: DeviceSpec::One(kind, id).to_string(),
                        message,
                    });
                }
                devices.push((p, id, e.intra_op_threads));
            }
        }
        expanded.push((m.instances_per_device, devices));
    }
    let total = match config.runtime.cpu_threads {
        Threads::Count(n) => n,
        Threads::Auto => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    let (mut fixed, mut shared) = (0usize, 0usize);
    for (instances, devices) in &expanded {
        for (p, _, threads) in devices {
            if p.kind() == ProviderKind::Cpu {
                match threads {
                    Some(t) => fixed += t * instances,
                    None => shared += instances,
                }
            }
        }
    }
    let spinning = config.runtime.cpu_spinning;
    let share = total
        .saturating_sub(fixed)
        .checked_div(shared)
        .unwrap_or(1)
        .max(1);
    Ok(expanded
        .into_iter()
        .map(|(instances, devices)| {
            devices
                .into_iter()
                .flat_map(|(p, id, threads)| {
                    let kind = p.device_kind(id).unwrap_or(DeviceKind::Cpu {
                        intra_op_threads: threads.unwrap_or(share),
                        spinning,
                    });
                    let device = DeviceSpec::One(p.kind(), id).to_string();
                    (0..instances).map(move |instance| DevicePlan {
                        device: device.clone(),
                        instance,
                        kind,
                    })
                })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeConfig;
    use crate::device::provider::tests::Fake;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml).unwrap()
    }

    /// The CPU, and CUDA seeing `n` GPUs.
    fn gpus(n: u32) -> Vec<(&'static dyn ExecutionProvider, u32)> {
        vec![
            (provider::of(ProviderKind::Cpu), 1),
            (provider::of(ProviderKind::Cuda), n),
        ]
    }

    fn runtime() -> RuntimeInfo {
        RuntimeInfo {
            library: "/nonexistent/libonnxruntime.so".into(),
            build_info: String::new(),
        }
    }

    #[test]
    fn cpu_threads_are_shared_among_slots() {
        let c = config(
            "runtime: {cpu_threads: 4}\nmodels: [{name: m, path: x, devices: [cpu:0, {device: 'cpu:1', intra_op_threads: 1}, cpu:2]}]",
        );
        let p = plan_with(&c, &runtime(), &gpus(0)).unwrap();
        let threads: Vec<_> = p[0].iter().map(|d| d.kind).collect();
        assert_eq!(
            threads,
            vec![
                DeviceKind::Cpu {
                    intra_op_threads: 1,
                    spinning: false
                },
                DeviceKind::Cpu {
                    intra_op_threads: 1,
                    spinning: false
                },
                DeviceKind::Cpu {
                    intra_op_threads: 1,
                    spinning: false
                }
            ]
        );
        let c = config("runtime: {cpu_threads: 6}\nmodels: [{name: m, path: x, devices: cpu, instances_per_device: 2}]");
        let p = plan_with(&c, &runtime(), &gpus(0)).unwrap();
        assert_eq!(p[0].len(), 2);
        assert_eq!(
            p[0][1].kind,
            DeviceKind::Cpu {
                intra_op_threads: 3,
                spinning: false
            }
        );
        assert_eq!(p[0][1].instance, 1);
    }

    #[test]
    fn cpu_spinning_reaches_every_cpu_slot() {
        let c = config("runtime: {cpu_threads: 2, cpu_spinning: true}\nmodels: [{name: m, path: x, devices: [cpu:0, cpu:1]}]");
        let p = plan_with(&c, &runtime(), &gpus(0)).unwrap();
        assert!(p[0].iter().all(|d| d.kind
            == DeviceKind::Cpu {
                intra_op_threads: 1,
                spinning: true
            }));
    }

    #[test]
    fn auto_without_gpu_is_one_cpu_slot() {
        let p = plan_with(
            &config("models: [{name: m, path: x}]"),
            &runtime(),
            &gpus(0),
        )
        .unwrap();
        assert_eq!(p[0].len(), 1);
        assert_eq!(p[0][0].device, "cpu:0");
    }

    #[test]
    fn cuda_without_gpu_is_a_clear_error() {
        for devices in ["cuda:0", "cuda:*"] {
            let c = config(&format!(
                "models: [{{name: m, path: x, devices: '{devices}'}}]"
            ));
            let e = plan_with(&c, &runtime(), &gpus(0)).unwrap_err().to_string();
            assert!(e.starts_with("cuda:0: no NVIDIA GPU is visible"), "{e}");
        }
        let c = config("models: [{name: m, path: x, devices: 'cuda:2'}]");
        let e = plan_with(&c, &runtime(), &gpus(1)).unwrap_err().to_string();
        assert!(e.contains("only 1 GPU(s) visible"), "{e}");
        let c = config("models: [{name: m, path: x, devices: 'cuda:0'}]");
        let e = plan_with(&c, &runtime(), &gpus(1)).unwrap_err().to_string();
        assert!(
            e.contains("libonnxruntime_providers_cuda.so is missing"),
            "{e}"
        );
    }

    /// The CPU, no GPU, and the fake kind with `visible` devices.
    fn plan_fake(yaml: &str, fake: &Fake) -> Result<Vec<Vec<DevicePlan>>, DeviceError> {
        let seen: Vec<(&dyn ExecutionProvider, u32)> = vec![
            (provider::of(ProviderKind::Cpu), 1),
            (provider::of(ProviderKind::Cuda), 0),
            (fake, fake.visible(&RuntimeConfig::default())),
        ];
        plan_with(&config(yaml), &runtime(), &seen)
    }

    const TWO: Fake = Fake {
        visible: 2,
        missing: None,
    };

    #[test]
    fn auto_and_all_expand_over_the_visible_devices_of_a_kind() {
        for devices in ["auto", "'fake:*'"] {
            let p = plan_fake(
                &format!(
                    "models: [{{name: m, path: x, devices: {devices}, instances_per_device: 2}}]"
                ),
                &TWO,
            )
            .unwrap();
            let planned: Vec<_> = p[0]
                .iter()
                .map(|d| (d.device.as_str(), d.instance, d.kind))
                .collect();
            assert_eq!(
                planned,
                vec![
                    ("fake:0", 0, DeviceKind::Fake { id: 0 }),
                    ("fake:0", 1, DeviceKind::Fake { id: 0 }),
                    ("fake:1", 0, DeviceKind::Fake { id: 1 }),
                    ("fake:1", 1, DeviceKind::Fake { id: 1 }),
                ],
                "{devices}"
            );
        }
        // A kind's devices do not take CPU threads: the CPU slot beside them has them all.
        let p = plan_fake(
            "runtime: {cpu_threads: 4}\nmodels: [{name: a, path: x, devices: 'fake:1'}, {name: b, path: x, devices: cpu}]",
            &TWO,
        )
        .unwrap();
        assert_eq!(p[0][0].kind, DeviceKind::Fake { id: 1 });
        assert_eq!(
            p[1][0].kind,
            DeviceKind::Cpu {
                intra_op_threads: 4,
                spinning: false
            }
        );
    }

    #[test]
    fn a_device_beyond_the_visible_ones_is_an_error_of_its_kind() {
        let e = plan_fake("models: [{name: m, path: x, devices: 'fake:2'}]", &TWO)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "fake:2: only 2 fake device(s)");
        let none = Fake {
            visible: 0,
            missing: None,
        };
        let e = plan_fake("models: [{name: m, path: x, devices: 'fake:*'}]", &none)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "fake:0: only 0 fake device(s)");
        // `auto` does not take a kind with nothing visible.
        let p = plan_fake("models: [{name: m, path: x}]", &none).unwrap();
        assert_eq!(p[0][0].device, "cpu:0");
    }

    #[test]
    fn an_unavailable_kind_is_an_error_and_auto_passes_it_by() {
        let missing = Fake {
            visible: 2,
            missing: Some("the fake provider library is missing"),
        };
        let e = plan_fake("models: [{name: m, path: x, devices: 'fake:0'}]", &missing)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "fake:0: the fake provider library is missing");
        let p = plan_fake("models: [{name: m, path: x}]", &missing).unwrap();
        assert_eq!(p[0].len(), 1);
        assert_eq!(p[0][0].device, "cpu:0");
        assert!(matches!(p[0][0].kind, DeviceKind::Cpu { .. }));
    }
}
