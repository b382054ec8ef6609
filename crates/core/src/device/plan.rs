//! Turning the `devices` of each model into concrete sessions: which device, how many threads.

use std::path::Path;

use crate::config::{Config, DeviceSpec, Threads};

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
}

/// One session to build: a (model, device, instance) triple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    /// `cpu:0`, `cuda:1`; instances of one device share the name.
    pub device: String,
    pub instance: usize,
    pub kind: DeviceKind,
}

/// GPUs this process may use: the NVIDIA driver's list, narrowed by `CUDA_VISIBLE_DEVICES`.
fn visible_gpus(cuda_visible_devices: Option<&str>) -> u32 {
    let present = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|d| d.count() as u32)
        .unwrap_or(0);
    match cuda_visible_devices {
        Some(v) if v.trim().is_empty() || v.trim() == "-1" => 0,
        Some(v) => present.min(v.split(',').filter(|s| !s.trim().is_empty()).count() as u32),
        None => present,
    }
}

/// Plans every model's sessions. CUDA requests are checked against the GPUs the driver shows and
/// against the CUDA provider library sitting next to the loaded ONNX Runtime.
pub(crate) fn plan_devices(
    config: &Config,
    runtime: &RuntimeInfo,
) -> Result<Vec<Vec<DevicePlan>>, DeviceError> {
    plan_with(
        config,
        runtime,
        visible_gpus(config.runtime.cuda_visible_devices.as_deref()),
    )
}

fn plan_with(
    config: &Config,
    runtime: &RuntimeInfo,
    gpus: u32,
) -> Result<Vec<Vec<DevicePlan>>, DeviceError> {
    let provider = runtime
        .library
        .parent()
        .unwrap_or(Path::new("."))
        .join("libonnxruntime_providers_cuda.so");
    // First pass: expand auto/cuda:* and count CPU sessions that share the thread budget.
    let mut expanded = Vec::new();
    for m in &config.models {
        let mut devices = Vec::new();
        for e in &m.devices.0 {
            let specs: Vec<DeviceSpec> = match e.device {
                DeviceSpec::Auto if gpus > 0 && provider.exists() => {
                    (0..gpus).map(DeviceSpec::Cuda).collect()
                }
                DeviceSpec::Auto => vec![DeviceSpec::Cpu(0)],
                DeviceSpec::CudaAll => (0..gpus.max(1)).map(DeviceSpec::Cuda).collect(),
                d => vec![d],
            };
            for d in specs {
                if let DeviceSpec::Cuda(id) = d {
                    let name = format!("cuda:{id}");
                    if gpus == 0 {
                        return Err(DeviceError::Unavailable {
                            device: name,
                            message: "no NVIDIA GPU is visible on this machine (/proc/driver/nvidia/gpus is empty or missing, or CUDA_VISIBLE_DEVICES hides them); use `cpu` or `auto`".into(),
                        });
                    }
                    if id >= gpus {
                        return Err(DeviceError::Unavailable {
                            device: name,
                            message: format!(
                                "only {gpus} GPU(s) visible (cuda:0..cuda:{})",
                                gpus - 1
                            ),
                        });
                    }
                    if !provider.exists() {
                        return Err(DeviceError::Unavailable {
                            device: name,
                            message: format!(
                                "the CUDA execution provider {} is missing; use the onnxruntime-gpu libraries",
                                provider.display()
                            ),
                        });
                    }
                }
                devices.push((d, e.intra_op_threads));
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
        for (d, threads) in devices {
            if let DeviceSpec::Cpu(_) = d {
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
                .flat_map(|(d, threads)| {
                    (0..instances).map(move |instance| DevicePlan {
                        device: d.to_string(),
                        instance,
                        kind: match d {
                            DeviceSpec::Cuda(id) => DeviceKind::Cuda { id },
                            _ => DeviceKind::Cpu {
                                intra_op_threads: threads.unwrap_or(share),
                                spinning,
                            },
                        },
                    })
                })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml).unwrap()
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
        let p = plan_with(&c, &runtime(), 0).unwrap();
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
        let p = plan_with(&c, &runtime(), 0).unwrap();
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
        let p = plan_with(&c, &runtime(), 0).unwrap();
        assert!(p[0].iter().all(|d| d.kind
            == DeviceKind::Cpu {
                intra_op_threads: 1,
                spinning: true
            }));
    }

    #[test]
    fn auto_without_gpu_is_one_cpu_slot() {
        let p = plan_with(&config("models: [{name: m, path: x}]"), &runtime(), 0).unwrap();
        assert_eq!(p[0].len(), 1);
        assert_eq!(p[0][0].device, "cpu:0");
    }

    #[test]
    fn cuda_without_gpu_is_a_clear_error() {
        for devices in ["cuda:0", "cuda:*"] {
            let c = config(&format!(
                "models: [{{name: m, path: x, devices: '{devices}'}}]"
            ));
            let e = plan_with(&c, &runtime(), 0).unwrap_err().to_string();
            assert!(e.starts_with("cuda:0: no NVIDIA GPU is visible"), "{e}");
        }
        let c = config("models: [{name: m, path: x, devices: 'cuda:2'}]");
        let e = plan_with(&c, &runtime(), 1).unwrap_err().to_string();
        assert!(e.contains("only 1 GPU(s) visible"), "{e}");
        let c = config("models: [{name: m, path: x, devices: 'cuda:0'}]");
        let e = plan_with(&c, &runtime(), 1).unwrap_err().to_string();
        assert!(
            e.contains("libonnxruntime_providers_cuda.so is missing"),
            "{e}"
        );
    }
}
