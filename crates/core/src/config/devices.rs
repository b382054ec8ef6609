//! The `devices` key: which device slots a model runs on.

use std::fmt;
use std::str::FromStr;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{invalid, ConfigError};

/// The kinds of device config names, one per execution provider (`device::provider` has what
/// each kind means at run time). A new kind is a variant here, its name, and its forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// The host's cores. `cpu:N` are slots (separate sessions with their own threads), not
    /// devices, so there is no `cpu:*`.
    Cpu,
    /// NVIDIA GPUs by CUDA index (PCI bus order).
    Cuda,
    /// The test-only kind `fake` (`device::provider::tests`).
    #[cfg(test)]
    Fake,
}

impl ProviderKind {
    /// Every kind, in config order (`auto` tries the accelerators in this order).
    pub const ALL: &'static [ProviderKind] = &[
        ProviderKind::Cpu,
        ProviderKind::Cuda,
        #[cfg(test)]
        ProviderKind::Fake,
    ];

    /// The name in config and in device names (`cuda` in `cuda:1`).
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Cpu => "cpu",
            ProviderKind::Cuda => "cuda",
            #[cfg(test)]
            ProviderKind::Fake => "fake",
        }
    }

    /// Whether `kind:*` (every visible device of the kind) is a device.
    pub fn has_all(self) -> bool {
        match self {
            ProviderKind::Cpu => false,
            ProviderKind::Cuda => true,
            #[cfg(test)]
            ProviderKind::Fake => true,
        }
    }

    /// The forms the error messages list for this kind.
    fn forms(self) -> &'static [&'static str] {
        match self {
            ProviderKind::Cpu => &["cpu", "cpu:N"],
            ProviderKind::Cuda => &["cuda:N", "cuda:*"],
            #[cfg(test)]
            ProviderKind::Fake => &[],
        }
    }

    fn named(name: &str) -> Option<ProviderKind> {
        ProviderKind::ALL.iter().copied().find(|k| k.name() == name)
    }
}

/// Every device form, `auto` first and then per kind in config order (`auto, cpu, cpu:N, ...`).
fn device_forms() -> Vec<&'static str> {
    let mut forms = vec!["auto"];
    for kind in ProviderKind::ALL {
        forms.extend(kind.forms());
    }
    forms
}

/// One device as written in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// Every visible device of the first accelerator kind that has one, else one CPU slot.
    Auto,
    /// One device of a kind by index (`cpu:1`, `cuda:0`); the bare name is index 0.
    One(ProviderKind, u32),
    /// Every visible device of a kind (`cuda:*`).
    All(ProviderKind),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            let forms = device_forms();
            let (last, rest) = forms.split_last().expect("auto is a form");
            format!("{s:?} is not a device; use {} or {last}", rest.join(", "))
        };
        let t = s.trim();
        if t == "auto" {
            return Ok(DeviceSpec::Auto);
        }
        if let Some(kind) = ProviderKind::named(t) {
            return Ok(DeviceSpec::One(kind, 0));
        }
        let (name, n) = t.split_once(':').ok_or_else(bad)?;
        let kind = ProviderKind::named(name).ok_or_else(bad)?;
        if n == "*" && kind.has_all() {
            return Ok(DeviceSpec::All(kind));
        }
        match n.parse::<u32>() {
            Ok(n) if n < 256 => Ok(DeviceSpec::One(kind, n)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::One(kind, n) => write!(f, "{}:{n}", kind.name()),
            DeviceSpec::All(kind) => write!(f, "{}:*", kind.name()),
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
                write!(
                    f,
                    "a device ({}) or {{device: ..., intra_op_threads: N}}",
                    device_forms().join(", ")
                )
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
            if matches!(e.device, DeviceSpec::Auto | DeviceSpec::All(_)) && self.0.len() > 1 {
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
