//! The `devices` key: which device slots a model runs on.

use std::fmt;
use std::str::FromStr;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{invalid, ConfigError};

/// One device as written in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// Every visible GPU, else one CPU slot.
    Auto,
    /// A CPU slot; `cpu` is slot 0. Slots are separate sessions with their own threads.
    Cpu(u32),
    /// One GPU by CUDA index (PCI bus order).
    Cuda(u32),
    /// Every visible GPU.
    CudaAll,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a device; use auto, cpu, cpu:N, cuda:N or cuda:*");
        match s.trim() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu(0)),
            "cuda:*" => Ok(DeviceSpec::CudaAll),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            t => {
                let (kind, n) = t.split_once(':').ok_or_else(bad)?;
                let n: u32 = n.parse().map_err(|_| bad())?;
                match kind {
                    "cpu" if n < 256 => Ok(DeviceSpec::Cpu(n)),
                    "cuda" if n < 256 => Ok(DeviceSpec::Cuda(n)),
                    _ => Err(bad()),
                }
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu(n) => write!(f, "cpu:{n}"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::CudaAll => f.write_str("cuda:*"),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A device with optional per-device settings: `cpu:1` or `{device: cpu:1, intra_op_threads: 1}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceEntry {
    pub device: DeviceSpec,
    /// Intra-op threads of this slot's session (CPU). Default: an even share of `runtime.cpu_threads`.
    pub intra_op_threads: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FullEntry {
    device: DeviceSpec,
    #[serde(default)]
    intra_op_threads: Option<usize>,
}

impl From<FullEntry> for DeviceEntry {
    fn from(f: FullEntry) -> DeviceEntry {
        DeviceEntry {
            device: f.device,
            intra_op_threads: f.intra_op_threads,
        }
    }
}

fn short_entry<E: serde::de::Error>(s: &str) -> Result<DeviceEntry, E> {
    Ok(DeviceEntry {
        device: s.parse().map_err(E::custom)?,
        intra_op_threads: None,
    })
}

impl<'de> Deserialize<'de> for DeviceEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DeviceEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a device (auto, cpu, cpu:N, cuda:N, cuda:*) or {device: ..., intra_op_threads: N}")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<DeviceEntry, E> {
                short_entry(s)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DeviceEntry, A::Error> {
                FullEntry::deserialize(MapAccessDeserializer::new(map)).map(Into::into)
            }
        }
        d.deserialize_any(V)
    }
}

/// The `devices` value: one entry or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Devices(pub Vec<DeviceEntry>);

impl Default for Devices {
    fn default() -> Self {
        Devices(vec![DeviceEntry {
            device: DeviceSpec::Auto,
            intra_op_threads: None,
        }])
    }
}

impl<'de> Deserialize<'de> for Devices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Devices;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a device or a list of devices")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Devices, E> {
                Ok(Devices(vec![short_entry(s)?]))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Devices, A::Error> {
                Ok(Devices(vec![FullEntry::deserialize(
                    MapAccessDeserializer::new(map),
                )?
                .into()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Devices, A::Error> {
                Vec::<DeviceEntry>::deserialize(SeqAccessDeserializer::new(seq)).map(Devices)
            }
        }
        d.deserialize_any(V)
    }
}

impl Devices {
    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            return Err(invalid(key, "at least one device is needed"));
        }
        for (i, e) in self.0.iter().enumerate() {
            if self.0[..i].iter().any(|p| p.device == e.device) {
                return Err(invalid(
                    format!("{key}[{i}]"),
                    format!("{} is listed twice", e.device),
                ));
            }
            if matches!(e.device, DeviceSpec::Auto | DeviceSpec::CudaAll) && self.0.len() > 1 {
                return Err(invalid(
                    format!("{key}[{i}]"),
                    format!("{} cannot be combined with other devices", e.device),
                ));
            }
            if let Some(t) = e.intra_op_threads {
                if t == 0 || t > 1024 {
                    return Err(invalid(
                        format!("{key}[{i}].intra_op_threads"),
                        format!("must be 1..=1024, got {t}"),
                    ));
                }
            }
        }
        Ok(())
    }
}
