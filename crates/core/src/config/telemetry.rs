//! The `telemetry` section: traces exported over OTLP. Off unless an endpoint is set. The
//! standard `OTEL_*` variables override the file's keys (see `Config::apply_env`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, Dur};

/// The samplers `sampler` (`OTEL_TRACES_SAMPLER`) accepts: the OpenTelemetry names.
pub const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// `telemetry`: where and how traces are exported.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OTLP receiver (an OpenTelemetry Collector), e.g. `http://otel-collector:4317`. None:
    /// traces are off, and cost nothing. Env: `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The OTLP transport: `grpc` only (`http/protobuf` and `http/json` are refused).
    /// Env: `OTEL_EXPORTER_OTLP_PROTOCOL`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Which traces are recorded: one of [`SAMPLERS`]. The default respects the caller's
    /// decision (`traceparent`'s sampled flag) and records every trace that starts here.
    /// Env: `OTEL_TRACES_SAMPLER`.
    #[serde(default = "default_sampler")]
    pub sampler: String,
    /// The ratio for the `*traceidratio` samplers, 0 to 1 (default 1).
    /// Env: `OTEL_TRACES_SAMPLER_ARG`.
    #[serde(default)]
    pub sampler_arg: Option<String>,
    /// The `service.name` resource attribute. Env: `OTEL_SERVICE_NAME`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// More resource attributes (`deployment.environment: prod`). Env:
    /// `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k2=v2`), whose keys replace the file's.
    #[serde(default)]
    pub resource_attributes: BTreeMap<String, String>,
    /// Most finished spans held for export; a span ending when this many wait (the receiver is
    /// slow or down) is dropped and counted in `ortserve_trace_spans_dropped_total`.
    #[serde(default = "default_max_queue_size")]
    pub max_queue_size: usize,
    /// How long one export may take before it is abandoned.
    #[serde(default = "default_export_timeout")]
    pub export_timeout: Dur,
    /// How long the spans still held may take to be sent at shutdown, after the drain.
    #[serde(default = "default_flush_timeout")]
    pub flush_timeout: Dur,
}

impl Default for TelemetryConfig {
    fn default() -> TelemetryConfig {
        TelemetryConfig {
            endpoint: None,
            protocol: default_protocol(),
            sampler: default_sampler(),
            sampler_arg: None,
            service_name: default_service_name(),
            resource_attributes: BTreeMap::new(),
            max_queue_size: default_max_queue_size(),
            export_timeout: default_export_timeout(),
            flush_timeout: default_flush_timeout(),
        }
    }
}

fn default_protocol() -> String {
    "grpc".into()
}
fn default_sampler() -> String {
    "parentbased_always_on".into()
}
fn default_service_name() -> String {
    "ortserve".into()
}
fn default_max_queue_size() -> usize {
    2048
}
fn default_export_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_flush_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}

impl TelemetryConfig {
    /// Whether traces are exported.
    pub fn enabled(&self) -> bool {
        self.endpoint.is_some()
    }

    /// The ratio of the `*traceidratio` samplers (1 when not given).
    pub fn ratio(&self) -> f64 {
        self.sampler_arg
            .as_deref()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or(1.0)
    }

    /// The overrides from `OTEL_*` variables; an empty variable counts as unset.
    pub(super) fn apply_env(&mut self, text: impl Fn(&str) -> Option<String>) {
        let set = |k: &str| text(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = set("OTEL_EXPORTER_OTLP_ENDPOINT") {
            self.endpoint = Some(v.trim().to_string());
        }
        if let Some(v) = set("OTEL_EXPORTER_OTLP_PROTOCOL") {
            self.protocol = v.trim().to_string();
        }
        if let Some(v) = set("OTEL_TRACES_SAMPLER") {
            self.sampler = v.trim().to_string();
        }
        if let Some(v) = set("OTEL_TRACES_SAMPLER_ARG") {
            self.sampler_arg = Some(v.trim().to_string());
        }
        if let Some(v) = set("OTEL_SERVICE_NAME") {
            self.service_name = v.trim().to_string();
        }
        if let Some(v) = set("OTEL_RESOURCE_ATTRIBUTES") {
            for (k, v) in resource_attributes(&v) {
                self.resource_attributes.insert(k, v);
            }
        }
        // The specification's switch: the SDK off whatever else is set.
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            self.endpoint = None;
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(e) = &self.endpoint {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty()) {
                return Err(invalid(
                    "telemetry.endpoint",
                    format!("{e:?} is not a URL such as http://otel-collector:4317"),
                ));
            }
            if e.starts_with("https://") {
                return Err(invalid(
                    "telemetry.endpoint",
                    format!("{e:?}: TLS is not supported; send to a collector over http:// (a sidecar or in-cluster one)"),
                ));
            }
        }
        if self.protocol != "grpc" {
            return Err(invalid(
                "telemetry.protocol",
                format!(
                    "{:?} is not supported: only `grpc` (OTLP over gRPC, usually port 4317)",
                    self.protocol
                ),
            ));
        }
        if !SAMPLERS.contains(&self.sampler.as_str()) {
            return Err(invalid(
                "telemetry.sampler",
                format!("{:?} is not one of {}", self.sampler, SAMPLERS.join(", ")),
            ));
        }
        if let Some(a) = &self.sampler_arg {
            let ok = a
                .trim()
                .parse::<f64>()
                .is_ok_and(|r| (0.0..=1.0).contains(&r));
            if !ok {
                return Err(invalid(
                    "telemetry.sampler_arg",
                    format!("{a:?} is not a ratio from 0 to 1"),
                ));
            }
        }
        if self.service_name.trim().is_empty() {
            return Err(invalid("telemetry.service_name", "must not be empty"));
        }
        if self.max_queue_size == 0 {
            return Err(invalid("telemetry.max_queue_size", "must be at least 1"));
        }
        for (key, d) in [
            ("telemetry.export_timeout", self.export_timeout),
            ("telemetry.flush_timeout", self.flush_timeout),
        ] {
            if d.0.is_zero() {
                return Err(invalid(key, "must be more than 0"));
            }
        }
        Ok(())
    }
}

/// `k=v,k2=v2` as `OTEL_RESOURCE_ATTRIBUTES` writes it: values may be percent-encoded; an
/// entry without `=` or with an empty key is skipped.
pub fn resource_attributes(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), percent_decoded(v.trim())))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_attributes_are_split_and_decoded() {
        assert_eq!(
            resource_attributes("a=1, b = x%20y ,bad,=v,c=100%"),
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "x y".to_string()),
                ("c".to_string(), "100%".to_string()),
            ]
        );
    }

    #[test]
    fn env_overrides_the_file_and_refuses_what_is_not_supported() {
        let mut t = TelemetryConfig {
            endpoint: Some("http://file:4317".into()),
            ..TelemetryConfig::default()
        };
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://env:4317".to_string()),
            "OTEL_SERVICE_NAME" => Some("svc".to_string()),
            "OTEL_TRACES_SAMPLER" => Some("".to_string()),
            _ => None,
        };
        t.apply_env(env);
        assert_eq!(t.endpoint.as_deref(), Some("http://env:4317"));
        assert_eq!(t.service_name, "svc");
        assert_eq!(t.sampler, "parentbased_always_on", "empty is unset");
        t.validate().unwrap();
        t.protocol = "http/protobuf".into();
        let e = t.validate().unwrap_err().to_string();
        assert!(
            e.contains("telemetry.protocol") && e.contains("only `grpc`"),
            "{e}"
        );
        t.protocol = "grpc".into();
        t.sampler_arg = Some("2".into());
        assert!(t.validate().is_err());
        t.apply_env(|k| (k == "OTEL_SDK_DISABLED").then(|| "true".to_string()));
        assert!(!t.enabled());
    }
}
