//! Memory readings for the tuning probe, as each execution provider takes them
//! ([`super::provider::ExecutionProvider::memory`]). CPU: the container's cgroup (v2, then v1),
//! else this process's resident memory against what the kernel says is available. CUDA: NVML,
//! loaded at run time.

use std::path::Path;

/// Tests only (`testing::pretend_cpu_memory_room`): when set, the CPU reading's limit is RSS plus
/// this many bytes, as a container's limit that close would give. `u64::MAX`: not set.
pub(crate) static PRETEND_ROOM: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(u64::MAX);

/// Memory as one probe sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryReading {
    /// Bytes in use (process or cgroup on CPU, the device on CUDA).
    pub used: u64,
    /// The limit `used` counts against, when one is known.
    pub limit: Option<u64>,
}

/// How the probe reads one device's memory.
pub(crate) trait DeviceMemory: Send + Sync {
    /// How memory is read, as `memory_source` in the tuning result.
    fn name(&self) -> String;
    fn read(&self) -> MemoryReading;
    /// The device's model (e.g. NVML's "NVIDIA H100 80GB HBM3"): part of the tuning key, so
    /// results are shared only between devices of one model. `None` on the host.
    fn device_name(&self) -> Option<String> {
        None
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Resident memory of this process, from /proc/self/statm (pages).
pub fn process_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Where CPU memory readings come from, found once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CpuMemorySource {
    /// cgroup v2: `memory.current` against `memory.max`.
    CgroupV2 { dir: std::path::PathBuf },
    /// cgroup v1: `memory.usage_in_bytes` against `memory.limit_in_bytes`.
    CgroupV1 { dir: std::path::PathBuf },
    /// No container limit: process RSS against RSS + MemAvailable.
    Host,
}

impl CpuMemorySource {
    /// Looks for a cgroup memory limit that is really set (not `max` or the v1 "unlimited").
    pub(crate) fn detect() -> CpuMemorySource {
        let v2 = Path::new("/sys/fs/cgroup");
        if let Ok(max) = std::fs::read_to_string(v2.join("memory.max")) {
            if max.trim() != "max" && v2.join("memory.current").exists() {
                return CpuMemorySource::CgroupV2 {
                    dir: v2.to_path_buf(),
                };
            }
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if let Some(limit) = read_u64(&v1.join("memory.limit_in_bytes")) {
            // v1 reports "no limit" as a huge page-aligned number.
            if limit < (1u64 << 60) && v1.join("memory.usage_in_bytes").exists() {
                return CpuMemorySource::CgroupV1 {
                    dir: v1.to_path_buf(),
                };
            }
        }
        CpuMemorySource::Host
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            CpuMemorySource::CgroupV2 { .. } => "process RSS against cgroup v2 memory.max",
            CpuMemorySource::CgroupV1 { .. } => {
                "process RSS against cgroup v1 memory.limit_in_bytes"
            }
            CpuMemorySource::Host => "process RSS against RSS + MemAvailable",
        }
    }

    /// `used` is this process's resident memory; `limit` is what this process may reach: the
    /// container limit less what the rest of the container uses, or RSS + MemAvailable.
    pub(crate) fn read(&self) -> MemoryReading {
        let rss = process_rss().unwrap_or(0);
        let pretend = PRETEND_ROOM.load(std::sync::atomic::Ordering::Relaxed);
        if pretend != u64::MAX {
            return MemoryReading {
                used: rss,
                limit: Some(rss.saturating_add(pretend)),
            };
        }
        let cgroup = |usage: &str, limit: &str, dir: &Path| {
            let current = read_u64(&dir.join(usage))?;
            let max = read_u64(&dir.join(limit))?;
            Some(max.saturating_sub(current.saturating_sub(rss)))
        };
        let limit = match self {
            CpuMemorySource::CgroupV2 { dir } => cgroup("memory.current", "memory.max", dir),
            CpuMemorySource::CgroupV1 { dir } => {
                cgroup("memory.usage_in_bytes", "memory.limit_in_bytes", dir)
            }
            CpuMemorySource::Host => mem_available().map(|a| a + rss),
        };
        MemoryReading { used: rss, limit }
    }
}

impl DeviceMemory for CpuMemorySource {
    fn name(&self) -> String {
        CpuMemorySource::name(self).to_string()
    }

    fn read(&self) -> MemoryReading {
        CpuMemorySource::read(self)
    }
}

/// Per GPU (NVML index): memory used and total in bytes, and utilisation in percent. Empty
/// when NVML is not available (no NVIDIA driver). NVML is loaded once, on first use.
pub(crate) fn gpu_readings() -> Vec<(u32, u64, u64, u32)> {
    static NVML: std::sync::OnceLock<Option<nvml_wrapper::Nvml>> = std::sync::OnceLock::new();
    let Some(nvml) = NVML.get_or_init(|| nvml_wrapper::Nvml::init().ok()) else {
        return Vec::new();
    };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            let m = d.memory_info().ok()?;
            let util = d.utilization_rates().map(|u| u.gpu).unwrap_or(0);
            Some((i, m.used, m.total, util))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_plausible_here() {
        let src = CpuMemorySource::detect();
        let m = src.read();
        assert!(m.used > 1 << 20, "{src:?}: used {}", m.used);
        if let Some(limit) = m.limit {
            assert!(limit >= m.used, "{src:?}: {m:?}");
        }
        assert!(process_rss().unwrap() > 1 << 20);
    }

    #[test]
    fn cgroup_limit_is_what_is_left_for_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let rss = process_rss().unwrap();
        // The container uses this process's RSS plus 1 GiB elsewhere, and may use 8 GiB.
        std::fs::write(
            dir.path().join("memory.current"),
            format!("{}\n", rss + (1 << 30)),
        )
        .unwrap();
        std::fs::write(dir.path().join("memory.max"), format!("{}\n", 8u64 << 30)).unwrap();
        let m = CpuMemorySource::CgroupV2 {
            dir: dir.path().to_path_buf(),
        }
        .read();
        let limit = m.limit.unwrap();
        // RSS moves a little between the two reads.
        assert!(limit.abs_diff(7 << 30) < 64 << 20, "{limit}");
    }
}
