//! The YAML configuration: schema, defaults, environment overrides and fail-fast validation.
//!
//! One file (`--config` or `ORTSERVE_CONFIG`) describes the server, the ONNX Runtime library and
//! the models. Unknown keys are errors; every validation error names the key's path. This is the
//! only module that reads the environment.

mod devices;
mod image;
mod model_dir;
mod telemetry;
mod units;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use devices::{DeviceEntry, DeviceSpec, Devices, ProviderKind};
pub use image::{
    ChannelOrder, ClassificationConfig, ImageConfig, ImageDtype, Interpolation, Layout,
};
pub use model_dir::{models_in_dir, versions_of, LABELS_FILE, MODEL_FILE, SETTINGS_FILE};
pub use telemetry::{resource_attributes, TelemetryConfig, SAMPLERS};
pub use units::{ByteSize, Dur};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// A `--model-dir` folder, or a file in it, that cannot be served.
    #[error("{path}: {message}")]
    ModelDir { path: PathBuf, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Traces over OTLP; off unless an endpoint is set.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    pub models: Vec<ModelConfig>,
    /// Where this config was read from, to read it again (`model_control: poll` and `explicit`).
    #[serde(skip)]
    pub source: Option<ConfigSource>,
}

/// What `serve` was given: the config file, the model folder, the model name and the port.
/// Reading the same again ([`Config::reread`]) gives the config as the files say it now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub model_dir: Option<PathBuf>,
    pub model_name: Option<String>,
    pub http_port: Option<u16>,
    pub grpc_port: Option<u16>,
}

/// `models[].version_policy`: which versions of a versioned folder (`NAME/VERSION/model.onnx`)
/// are served. In YAML: `{latest: N}`, `all` or `{specific: [1, 3]}` (Triton's words).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The highest N versions.
    Latest(usize),
    /// Every version.
    All,
    /// These versions (those present).
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> VersionPolicy {
        VersionPolicy::Latest(1)
    }
}

impl Serialize for VersionPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            VersionPolicy::All => s.serialize_str("all"),
            VersionPolicy::Latest(n) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("latest", n)?;
                m.end()
            }
            VersionPolicy::Specific(v) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("specific", v)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for VersionPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<VersionPolicy, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        struct V;
        const WANT: &str = "`all`, `{latest: N}` or `{specific: [versions]}`";
        impl<'de> Visitor<'de> for V {
            type Value = VersionPolicy;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(WANT)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<VersionPolicy, E> {
                match v {
                    "all" => Ok(VersionPolicy::All),
                    _ => Err(E::custom(format!("expected {WANT}, got {v:?}"))),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<VersionPolicy, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(format!("expected {WANT}, got {{}}")));
                };
                let policy = match key.as_str() {
                    "latest" => VersionPolicy::Latest(map.next_value()?),
                    "specific" => VersionPolicy::Specific(map.next_value()?),
                    other => {
                        return Err(de::Error::custom(format!(
                            "expected {WANT}, got the key {other:?}"
                        )))
                    }
                };
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom(format!("expected one of {WANT}")));
                }
                Ok(policy)
            }
        }
        d.deserialize_any(V)
    }
}

impl VersionPolicy {
    /// The versions to serve out of those present.
    pub fn choose(&self, present: &[u64]) -> Vec<u64> {
        let mut present = present.to_vec();
        present.sort_unstable();
        present.dedup();
        match self {
            VersionPolicy::Latest(n) => present[present.len().saturating_sub(*n)..].to_vec(),
            VersionPolicy::All => present,
            VersionPolicy::Specific(wanted) => {
                present.retain(|v| wanted.contains(v));
                present
            }
        }
    }
}

/// `models[].swap`: how a new version (or new content of a served one) replaces the served one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SwapMode {
    /// Load, tune and warm up the new one beside the served one, then switch: no request sees
    /// the swap. Needs memory for both; a load that fails (for want of memory or otherwise)
    /// leaves the served one serving.
    #[default]
    Overlap,
    /// Unload the served one first, then load: the model answers 503 with `Retry-After`
    /// meanwhile. For models too large to hold twice.
    Replace,
}

/// `server.model_control`: who may change the served models while the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelControl {
    /// The models are fixed at startup; the repository API's load and unload are refused.
    #[default]
    None,
    /// `POST /v2/repository/models/{m}/load` and `/unload` load (or reload) and unload
    /// configured models.
    Explicit,
    /// Each configured model's file is checked every `poll_interval` (and at once on SIGHUP)
    /// and reloaded when its content changed, as a ConfigMap or a synced volume changes it.
    Poll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP server binds. Env: `ORTSERVE_HTTP_ADDR`.
    #[serde(default = "default_http_addr")]
    pub http_addr: String,
    /// Address of the admin listener: liveness, readiness and `/metrics` only, with its own
    /// connection limit, so clients that fill the data port cannot starve the probes. Point
    /// Kubernetes probes and Prometheus here. `null` turns it off (the same routes stay on
    /// `http_addr`). Env: `ORTSERVE_ADMIN_ADDR` (`off` turns it off).
    #[serde(default = "default_admin_addr")]
    pub admin_addr: Option<String>,
    /// Address of the gRPC listener (the KServe V2 gRPC service and `grpc.health.v1`); `null`
    /// turns it off. Env: `ORTSERVE_GRPC_ADDR` (`off` turns it off).
    #[serde(default = "default_grpc_addr")]
    pub grpc_addr: Option<String>,
    /// Most connections open at once on the admin listener (probes and scrapers need a few).
    #[serde(default = "default_admin_max_connections")]
    pub admin_max_connections: usize,
    /// Largest request body accepted; larger ones get 413. Raise it for big binary tensors.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: ByteSize,
    /// Default deadline of an inference request, from its arrival to its answer, through body
    /// read, preprocessing, queue and run (504 after). A request can ask for less with
    /// `X-Timeout-Ms` or, on V2, `parameters.timeout` (microseconds).
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Dur,
    /// After SIGTERM: how long to keep serving with readiness at 503 so load balancers deregister.
    #[serde(default = "default_drain_delay")]
    pub drain_delay: Dur,
    /// After the drain delay: how long accepted work may take to finish before the process exits.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Dur,
    /// A request's head (request line and headers) must be complete within this once its first
    /// byte has arrived; otherwise the connection is closed (slow-header clients).
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Dur,
    /// A keep-alive connection with no request is closed after this. Keep it above the load
    /// balancer's idle timeout, so the balancer closes first (AWS ALB: 60 s).
    #[serde(default = "default_keep_alive_timeout")]
    pub keep_alive_timeout: Dur,
    /// A request's body must have arrived within this from the request's start (408 after), or
    /// by its deadline when that is sooner.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: Dur,
    /// Most connections open at once; more wait in the listen backlog until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A response that makes no progress for this long (the client stopped reading) closes
    /// its connection, as nginx's `send_timeout` does. Progress is any byte taken by the socket,
    /// so a slow but reading client is never cut off. On the gRPC port, where one connection
    /// carries many answers, each answer must be written within this long of being made.
    #[serde(default = "default_write_timeout")]
    pub write_timeout: Dur,
    /// The listen backlog: connections the kernel completes before the server accepts them.
    /// A burst of new connections bigger than this has its extra handshakes dropped, and those
    /// clients retry a second later. The kernel caps it at `net.core.somaxconn`.
    #[serde(default = "default_listen_backlog")]
    pub listen_backlog: u32,
    /// Most request-body bytes held at once over all requests, gRPC answers not yet written
    /// to their clients included; a body that would go over is answered 503 (gRPC:
    /// UNAVAILABLE) at once (load is shed, not queued). At least `max_body_bytes`. Default:
    /// 16 × `max_body_bytes` (256 MiB with the default).
    #[serde(default)]
    pub max_body_memory: Option<ByteSize>,
    /// `text` for people, `json` for log collectors. Env: `ORTSERVE_LOG_FORMAT`.
    #[serde(default = "default_log_format")]
    pub log_format: LogFormat,
    /// One info line per answered request (target `ortserve::access`: method, path, status,
    /// milliseconds, request id). Off by default; its cost is in docs/BENCHMARKS.md.
    #[serde(default)]
    pub access_log: bool,
    /// Who may change the served models while the server runs: `none` (they are fixed at
    /// startup), `explicit` (the V2 repository API's load and unload) or `poll` (each model's
    /// file is checked every `poll_interval`, and on SIGHUP, and reloaded when its content
    /// changed).
    #[serde(default)]
    pub model_control: ModelControl,
    /// With `model_control: poll`: how often the model files are checked.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Dur,
    /// Bearer-token auth for inference and model routes; health, readiness and metrics stay open.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
}

/// Where the accepted bearer tokens come from (either or both).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// A file with one token per line (blank lines and `#` comments ignored), e.g. a mounted
    /// Kubernetes Secret.
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    /// An environment variable holding comma-separated tokens.
    #[serde(default)]
    pub tokens_env: Option<String>,
    /// The tokens read from both at load time.
    #[serde(skip)]
    pub tokens: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http_addr: default_http_addr(),
            admin_addr: default_admin_addr(),
            grpc_addr: default_grpc_addr(),
            admin_max_connections: default_admin_max_connections(),
            max_body_bytes: default_max_body(),
            request_timeout: default_request_timeout(),
            drain_delay: default_drain_delay(),
            shutdown_timeout: default_shutdown_timeout(),
            header_timeout: default_header_timeout(),
            keep_alive_timeout: default_keep_alive_timeout(),
            body_timeout: default_body_timeout(),
            max_connections: default_max_connections(),
            write_timeout: default_write_timeout(),
            listen_backlog: default_listen_backlog(),
            max_body_memory: None,
            log_format: default_log_format(),
            access_log: false,
            model_control: ModelControl::None,
            poll_interval: default_poll_interval(),
            auth: None,
        }
    }
}

fn default_http_addr() -> String {
    "0.0.0.0:8080".into()
}
fn default_grpc_addr() -> Option<String> {
    Some("0.0.0.0:8081".into())
}
fn default_admin_addr() -> Option<String> {
    Some("0.0.0.0:8082".into())
}
fn default_admin_max_connections() -> usize {
    32
}
fn default_write_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}
fn default_max_body() -> ByteSize {
    ByteSize(16 << 20)
}
fn default_request_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}
fn default_poll_interval() -> Dur {
    Dur(std::time::Duration::from_secs(15))
}
fn default_drain_delay() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_shutdown_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(25))
}
fn default_header_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_keep_alive_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(75))
}
fn default_body_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}
fn default_max_connections() -> usize {
    1024
}
fn default_listen_backlog() -> u32 {
    4096
}

impl ServerConfig {
    /// `max_body_memory`, or its default.
    pub fn body_memory(&self) -> u64 {
        self.max_body_memory
            .map_or(self.max_body_bytes.0.saturating_mul(16), |b| b.0)
    }
}

fn default_log_format() -> LogFormat {
    LogFormat::Text
}

/// The tuning cache's folder when `tuning.cache_dir` is unset (see there).
pub fn default_cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return d.join("ortserve").join("tuning");
    }
    if let Some(home) = var("HOME").filter(|d| d.is_absolute() && d != Path::new("/")) {
        return home.join(".cache").join("ortserve").join("tuning");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    std::env::temp_dir().join(format!("ortserve-tuning-{uid}"))
}

/// A thread count: `auto` or a positive integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(untagged)]
pub enum Threads {
    #[default]
    #[serde(with = "auto_tag")]
    Auto,
    Count(usize),
}

mod auto_tag {
    use serde::Serializer;
    pub(super) fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("auto")
    }
}

/// Reads `auto` (`None`) or a count. Written out rather than derived (`untagged`): a derived
/// untagged enum buffers the value, so its error says only "data did not match any variant"
/// and points at the line of the key's map, not at the value.
fn auto_or_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    use serde::de::{self, Visitor};
    struct AutoOrCount;
    impl Visitor<'_> for AutoOrCount {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("`auto` or a number")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
            if v == "auto" {
                Ok(None)
            } else {
                Err(E::custom(format!("expected `auto` or a number, got {v:?}")))
            }
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<usize>, E> {
            usize::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("{v} is too large")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<usize>, E> {
            usize::try_from(v).map(Some).map_err(|_| {
                E::custom(format!("expected `auto` or a number of 0 or more, got {v}"))
            })
        }
    }
    d.deserialize_any(AutoOrCount)
}

impl<'de> Deserialize<'de> for Threads {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Threads, D::Error> {
        Ok(auto_or_count(d)?.map_or(Threads::Auto, Threads::Count))
    }
}

/// `max_batch_size`: `auto` (probe at startup) or a fixed count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(untagged)]
pub enum MaxBatch {
    #[default]
    #[serde(with = "auto_tag")]
    Auto,
    Fixed(usize),
}

impl<'de> Deserialize<'de> for MaxBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MaxBatch, D::Error> {
        Ok(auto_or_count(d)?.map_or(MaxBatch::Auto, MaxBatch::Fixed))
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Path of `libonnxruntime.so`; when set (or `ORT_DYLIB_PATH` is), only that file is tried.
    /// Unset: next to the executable, its `lib/`, then the project's `.ortserve/lib`.
    /// Env: `ORTSERVE_ONNXRUNTIME_PATH`.
    #[serde(default)]
    pub onnxruntime_path: Option<PathBuf>,
    /// Total intra-op threads for CPU sessions; `auto` uses every core, shared among the CPU
    /// slots of all models. A device entry's own `intra_op_threads` wins.
    #[serde(default)]
    pub cpu_threads: Threads,
    /// CPU sessions' intra-op threads spin while they wait between operators instead of
    /// sleeping: a run wakes no thread, so latency at low load drops, but the spinning takes
    /// CPU that HTTP threads and other sessions need under load (docs/BENCHMARKS.md).
    #[serde(default)]
    pub cpu_spinning: bool,
    /// Threads decoding and resizing uploaded images (and, at a lower priority, JSON bodies of
    /// 256 KiB or more and gRPC messages heavy to decode); `auto`: the cores the CPU sessions
    /// leave free, at least 1.
    #[serde(default)]
    pub preprocess_threads: Threads,
    /// `ORT_DYLIB_PATH` from the environment, which wins over every other place.
    #[serde(skip)]
    pub dylib_env: Option<PathBuf>,
    /// `CUDA_VISIBLE_DEVICES` from the environment: limits which GPUs `auto` and `cuda:*` see.
    #[serde(skip)]
    pub cuda_visible_devices: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DispatchPolicy {
    /// Devices take batches in turn, whatever their speed.
    RoundRobin,
    /// The device with the least estimated time to drain its in-flight rows takes the batch.
    #[default]
    LeastLoaded,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name in URLs (`/v2/models/{name}`): letters, digits, `_`, `-`, `.`.
    pub name: String,
    /// Version reported by the metadata routes and accepted in `/versions/{v}` URLs. For a
    /// versioned folder, each version's folder name.
    #[serde(default = "default_version")]
    pub version: String,
    /// The `.onnx` file, or a versioned folder holding `VERSION/model.onnx` (VERSION a positive
    /// whole number); a relative path is relative to the config file's folder.
    pub path: PathBuf,
    /// Which versions of a versioned folder are served (default: the highest one).
    #[serde(default)]
    pub version_policy: Option<VersionPolicy>,
    /// How a new version replaces the served one (model lifecycle).
    #[serde(default)]
    pub swap: SwapMode,
    /// Where the model runs: `auto`, `cpu`, `cpu:N`, `cuda:N`, `cuda:*`, or a list of those.
    #[serde(default)]
    pub devices: Devices,
    /// Sessions per device. More than one lets one device overlap runs of small batches.
    #[serde(default = "one")]
    pub instances_per_device: usize,
    #[serde(default)]
    pub dispatch: DispatchPolicy,
    #[serde(default)]
    pub batching: BatchingConfig,
    #[serde(default)]
    pub tuning: TuningConfig,
    #[serde(default)]
    pub cuda: CudaConfig,
    /// Set for image models: uploads to `/v1/models/{name}:predict` are preprocessed this way.
    #[serde(default)]
    pub image: Option<ImageConfig>,
    /// Set to answer predictions with top-k labels.
    #[serde(default)]
    pub classification: Option<ClassificationConfig>,
    #[serde(default)]
    pub health: HealthConfig,
}

/// When a device is taken out of service and how it comes back.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Failed runs in a row (not counting refused inputs) after which the device is unhealthy:
    /// skipped by the dispatcher, shown in readiness and metrics.
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
    /// How often an unhealthy device gets a one-row probe; it is healthy again when it passes.
    #[serde(default = "default_reprobe")]
    pub reprobe_interval: Dur,
    /// The watchdog: a run that has not returned after this long marks its device unhealthy, so
    /// batches go to the other devices (503 when none is left) and readiness reflects it.
    /// Default: 20 × the tuned latency of the device's chosen batch size, at least 10 s (30 s
    /// when that latency is unknown).
    #[serde(default)]
    pub run_timeout: Option<Dur>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            failure_threshold: default_threshold(),
            reprobe_interval: default_reprobe(),
            run_timeout: None,
        }
    }
}

impl HealthConfig {
    /// The watchdog limit for a device whose chosen batch size took `tuned_latency` (when known).
    pub fn run_timeout_for(
        &self,
        tuned_latency: Option<std::time::Duration>,
    ) -> std::time::Duration {
        use std::time::Duration;
        match (self.run_timeout, tuned_latency) {
            (Some(d), _) => d.0,
            (None, Some(l)) => (l * 20).max(Duration::from_secs(10)),
            (None, None) => Duration::from_secs(30),
        }
    }
}

fn default_threshold() -> u32 {
    3
}
fn default_reprobe() -> Dur {
    Dur(std::time::Duration::from_secs(2))
}

/// Settings that only apply to CUDA devices.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CudaConfig {
    /// Assemble batches in pinned host memory and run through an IoBinding (faster copies to
    /// the GPU). Turn off only to compare.
    #[serde(default = "yes")]
    pub pinned_inputs: bool,
    /// How cuDNN picks each convolution's algorithm (the CUDA provider's
    /// `cudnn_conv_algo_search`): `exhaustive` benchmarks every algorithm on the first run of
    /// each input shape (ONNX Runtime's default; slow first runs, which `batching.buckets` moves
    /// before readiness), `heuristic` takes cuDNN's guess, `default` always the same algorithm.
    /// Not yet measured on a GPU here (issue 16), so ONNX Runtime's default is kept.
    #[serde(default)]
    pub cudnn_conv_algo_search: ConvAlgoSearch,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            pinned_inputs: true,
            cudnn_conv_algo_search: ConvAlgoSearch::Exhaustive,
        }
    }
}

/// `cuda.cudnn_conv_algo_search`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgoSearch {
    #[default]
    Exhaustive,
    Heuristic,
    Default,
}

fn yes() -> bool {
    true
}

fn default_version() -> String {
    "1".into()
}
fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most rows one device run takes; larger requests are split across devices. `auto` (the
    /// default) measures it per device at startup (see `tuning`); a number skips the probe.
    #[serde(default)]
    pub max_batch_size: MaxBatch,
    /// How long a batch that is not full waits for more rows. 0 sends at once; raise it for
    /// throughput under light load.
    #[serde(default = "default_queue_delay")]
    pub max_queue_delay: Dur,
    /// Requests waiting for this model (queued plus running); more get 429.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Batch-size buckets: run only the sizes 1, 2, 4, ... up to the batch size (and that size),
    /// padding a batch with zero rows up to the next one (the padded outputs are dropped), and
    /// run every bucket once before readiness. On CUDA the first run of each new input shape is
    /// slow (cuDNN searches convolution algorithms per shape), so `auto` is on there, off on CPU.
    #[serde(default)]
    pub buckets: Buckets,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch_size: MaxBatch::Auto,
            max_queue_delay: default_queue_delay(),
            queue_capacity: default_queue_capacity(),
            buckets: Buckets::Auto,
        }
    }
}

/// `batching.buckets`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Buckets {
    /// On for CUDA devices, off for CPU ones.
    #[default]
    Auto,
    On,
    Off,
}

impl Buckets {
    /// The sizes a device with batch size `max` runs: powers of two below `max`, and `max`.
    /// Empty when off (any size runs as it comes).
    pub fn sizes(self, max: usize, on_cuda: bool) -> Vec<usize> {
        if self == Buckets::Off || (self == Buckets::Auto && !on_cuda) || max == 0 {
            return Vec::new();
        }
        let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
            .take_while(|&b| b < max)
            .collect();
        sizes.push(max);
        sizes
    }
}

/// How `max_batch_size: auto` is measured. See README.md ("Batch-size tuning").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TuningConfig {
    /// Fraction of the device's memory limit that must stay free at the chosen size.
    #[serde(default = "default_headroom")]
    pub memory_headroom: f64,
    /// Most memory the probe may add on a device (over what it used before the first probe).
    /// Unset: only the headroom counts.
    #[serde(default)]
    pub memory_budget: Option<ByteSize>,
    /// Largest median time of one batch as served (the run, the split and the replies, with the
    /// next batch queued as under load); larger sizes are not chosen, and `refine` does not
    /// move the cap to them.
    #[serde(default)]
    pub latency_budget: Option<Dur>,
    /// Largest size probed.
    #[serde(default = "default_cap")]
    pub max_batch_cap: usize,
    /// Time limit of the whole probe of one device; it stops before a size would pass it.
    #[serde(default = "default_max_duration")]
    pub max_duration: Dur,
    /// Values for dynamic non-batch dimensions, by the model's dimension name (e.g. `height: 224`).
    #[serde(default)]
    pub dims: std::collections::BTreeMap<String, usize>,
    /// Folder of the tuning cache (one JSON file per model, device, runtime and settings).
    /// Unset: `$XDG_CACHE_HOME/ortserve/tuning`, else `$HOME/.cache/ortserve/tuning`, else
    /// `ortserve-tuning-<uid>` in the system temp folder. The folder is created readable and
    /// writable by this user only, and a folder that another user owns or may write is not used
    /// (another user could plant a result there).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Results to reuse, shared between pods (a file from a ConfigMap or a volume), written by
    /// `ortserve tune --json FILE`. A result is used when its key matches this start's: model
    /// sha256, device (the GPU's name on CUDA, threads on CPU), ONNX Runtime release, ortserve
    /// version and the tuning settings. Otherwise the device is probed (with a log line).
    #[serde(default)]
    pub results_file: Option<PathBuf>,
    /// Probe even when the cache or `results_file` has a result.
    #[serde(default)]
    pub force: bool,
    /// Under sustained load (full batches), let each device's cap move from the probe's choice
    /// toward the size that serves the most rows/s, up to the largest size the probe ran within
    /// its limits, never below the choice (README.md, "Batch-size tuning"). Only with
    /// `max_batch_size: auto` and no `buckets`.
    #[serde(default = "default_true")]
    pub refine: bool,
}

impl Default for TuningConfig {
    fn default() -> Self {
        TuningConfig {
            memory_headroom: default_headroom(),
            memory_budget: None,
            latency_budget: None,
            max_batch_cap: default_cap(),
            max_duration: default_max_duration(),
            dims: Default::default(),
            cache_dir: None,
            results_file: None,
            force: false,
            refine: true,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_headroom() -> f64 {
    0.15
}
fn default_cap() -> usize {
    256
}
fn default_max_duration() -> Dur {
    Dur(std::time::Duration::from_secs(60))
}
fn default_queue_delay() -> Dur {
    Dur(std::time::Duration::from_millis(2))
}
fn default_queue_capacity() -> usize {
    1024
}

/// Parses YAML text into `T`, naming the key path of the first problem.
fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text))
        .map_err(path_error)
}

/// [`parse_yaml`] for YAML already parsed (no line numbers: they would not be the file's).
fn parse_value<T: serde::de::DeserializeOwned>(
    value: serde_yaml_ng::Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(path_error)
}

fn path_error(e: serde_path_to_error::Error<serde_yaml_ng::Error>) -> ConfigError {
    let path = match e.path().to_string() {
        p if p == "." => "config".to_string(),
        p => p,
    };
    // serde_yaml_ng starts its message with the part of the path it knows; drop it.
    let inner = e.into_inner().to_string();
    let message = match inner.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') && path.starts_with(prefix) => {
            rest.to_string()
        }
        _ => inner,
    };
    ConfigError::Parse { path, message }
}

/// Makes `path` relative to `base` when it is relative: the one rule every path in the config
/// follows (`base` is the config file's folder).
fn resolve(path: &mut PathBuf, base: &Path) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

impl ModelConfig {
    /// Makes its relative paths (model, labels, tuning cache) relative to `base`.
    fn resolve_paths(&mut self, base: &Path) {
        let labels = self.classification.as_mut().and_then(|c| c.labels.as_mut());
        for path in [
            Some(&mut self.path),
            labels,
            self.tuning.cache_dir.as_mut(),
            self.tuning.results_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            resolve(path, base);
        }
    }
}

/// The largest config file read (4 MiB).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The most rows a batch may hold, whatever the config says.
pub const MAX_BATCH_LIMIT: usize = 65_536;

impl Config {
    /// Reads, applies environment overrides, resolves paths and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config = Config::read(path)?;
        config.validate()?;
        config.source = Some(ConfigSource {
            file: Some(path.to_path_buf()),
            ..ConfigSource::default()
        });
        Ok(config)
    }

    /// The config as its files say it now: read again from where it was read (`None` for a
    /// config that was not read from files). The result is validated as at startup.
    pub fn reread(&self) -> Option<Result<Config, ConfigError>> {
        let s = self.source.as_ref()?;
        Some(Config::for_serve(
            s.file.as_deref(),
            s.model_dir.as_deref(),
            s.model_name.as_deref(),
            s.http_port,
            s.grpc_port,
        ))
    }

    /// [`Config::load`] without the validation.
    fn read(path: &Path) -> Result<Config, ConfigError> {
        let refuse = |message: String| ConfigError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::other(message),
        };
        // Read again while serving (`model_control: poll`): what is not a plain file (a FIFO
        // would block the read) or is implausibly large is refused before it is read.
        let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(refuse("not a regular file".into()));
        }
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(refuse(format!(
                "{} bytes, more than the {MAX_CONFIG_BYTES} a config may have",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::from_yaml(&text)?;
        config.apply_env(|k| std::env::var_os(k).map(PathBuf::from))?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.load_tokens(|k| std::env::var(k).ok())?;
        Ok(config)
    }

    /// What `serve` runs: the config file (or, with none, the defaults), plus the models of a
    /// `--model-dir` folder (KServe's `/mnt/models`, see [`models_in_dir`]), on `--http-port`.
    pub fn for_serve(
        file: Option<&Path>,
        model_dir: Option<&Path>,
        model_name: Option<&str>,
        http_port: Option<u16>,
        grpc_port: Option<u16>,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => Config::read(path)?,
            None => {
                let mut c = Config::from_yaml("models: []")?;
                c.apply_env(|k| std::env::var_os(k).map(PathBuf::from))?;
                c
            }
        };
        if let Some(dir) = model_dir {
            for m in models_in_dir(dir, model_name)? {
                if config.models.iter().any(|x| x.name == m.name) {
                    return Err(invalid(
                        "models",
                        format!(
                            "{:?} is both in the config file and in {}",
                            m.name,
                            dir.display()
                        ),
                    ));
                }
                config.models.push(m);
            }
        }
        config.source = Some(ConfigSource {
            file: file.map(Path::to_path_buf),
            model_dir: model_dir.map(Path::to_path_buf),
            model_name: model_name.map(str::to_string),
            http_port,
            grpc_port,
        });
        let with_port = |addr: Option<&str>, port: u16| {
            let host = addr
                .and_then(|a| a.rsplit_once(':'))
                .map_or("0.0.0.0", |(host, _)| host);
            format!("{host}:{port}")
        };
        if let Some(port) = http_port {
            config.server.http_addr = with_port(Some(&config.server.http_addr), port);
        }
        if let Some(port) = grpc_port {
            config.server.grpc_addr = Some(with_port(config.server.grpc_addr.as_deref(), port));
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses YAML text (no environment, no validation).
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        parse_yaml(text)
    }

    /// Environment overrides with the `ORTSERVE_` prefix, `ORT_DYLIB_PATH`, and the `OTEL_*`
    /// trace settings (`telemetry`). A value that cannot be used is an error naming the variable
    /// (not the file's key it overrides).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<PathBuf>) -> Result<(), ConfigError> {
        let text = |k: &str| var(k).and_then(|v| v.to_str().map(str::to_string));
        for k in [
            "ORTSERVE_HTTP_ADDR",
            "ORTSERVE_ADMIN_ADDR",
            "ORTSERVE_GRPC_ADDR",
            "ORTSERVE_LOG_FORMAT",
        ] {
            if var(k).is_some() && text(k).is_none() {
                return Err(invalid(k, "is not UTF-8"));
            }
        }
        let address = |k: &str, v: &str| {
            v.parse::<SocketAddr>().map(|_| ()).map_err(|e| {
                invalid(
                    k,
                    format!("{v:?} is not an address such as 0.0.0.0:8080 ({e})"),
                )
            })
        };
        if let Some(v) = text("ORTSERVE_HTTP_ADDR") {
            address("ORTSERVE_HTTP_ADDR", &v)?;
            self.server.http_addr = v;
        }
        if let Some(v) = text("ORTSERVE_ADMIN_ADDR") {
            if v != "off" {
                address("ORTSERVE_ADMIN_ADDR", &v)?;
            }
            self.server.admin_addr = (v != "off").then_some(v);
        }
        if let Some(v) = text("ORTSERVE_GRPC_ADDR") {
            if v != "off" {
                address("ORTSERVE_GRPC_ADDR", &v)?;
            }
            self.server.grpc_addr = (v != "off").then_some(v);
        }
        if let Some(v) = text("ORTSERVE_LOG_FORMAT") {
            self.server.log_format = match v.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => {
                    return Err(invalid(
                        "ORTSERVE_LOG_FORMAT",
                        format!("{v:?} is not `json` or `text`"),
                    ))
                }
            };
        }
        if let Some(v) = var("ORTSERVE_ONNXRUNTIME_PATH") {
            self.runtime.onnxruntime_path = Some(v);
        }
        self.runtime.dylib_env = var("ORT_DYLIB_PATH").filter(|p| !p.as_os_str().is_empty());
        self.runtime.cuda_visible_devices = text("CUDA_VISIBLE_DEVICES");
        self.telemetry.apply_env(text);
        Ok(())
    }

    /// Reads the auth tokens from the file and the environment variable the config names.
    pub fn load_tokens(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let Some(auth) = &mut self.server.auth else {
            return Ok(());
        };
        let mut tokens = Vec::new();
        if let Some(file) = &auth.tokens_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                invalid(
                    "server.auth.tokens_file",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string),
            );
        }
        if let Some(name) = &auth.tokens_env {
            let value = var(name)
                .ok_or_else(|| invalid("server.auth.tokens_env", format!("{name} is not set")))?;
            tokens.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            );
        }
        if tokens.is_empty() {
            return Err(invalid(
                "server.auth",
                "auth is on but no token was found in tokens_file or tokens_env",
            ));
        }
        if let Some(short) = tokens.iter().find(|t| t.len() < 16) {
            return Err(invalid(
                "server.auth",
                format!(
                    "tokens must be at least 16 characters; one has {}",
                    short.len()
                ),
            ));
        }
        auth.tokens = tokens;
        Ok(())
    }

    /// Makes relative model and library paths relative to `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for m in &mut self.models {
            m.resolve_paths(base);
        }
        let tokens_file = self
            .server
            .auth
            .as_mut()
            .and_then(|a| a.tokens_file.as_mut());
        for path in [tokens_file, self.runtime.onnxruntime_path.as_mut()]
            .into_iter()
            .flatten()
        {
            resolve(path, base);
        }
    }

    /// Checks every value; the first problem is returned with its key path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.runtime.validate()?;
        self.telemetry.validate()?;
        if self.models.is_empty() {
            return Err(invalid("models", "at least one model is needed"));
        }
        let mut names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            m.validate(i)?;
            if !names.insert(m.name.as_str()) {
                return Err(invalid(
                    format!("models[{i}].name"),
                    format!("{:?} is used by an earlier model", m.name),
                ));
            }
        }
        Ok(())
    }
}

impl ServerConfig {
    /// The `server` section's values, each error naming its key.
    fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        s.http_addr.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "server.http_addr",
                format!(
                    "{:?} is not an address like 0.0.0.0:8080 ({e})",
                    s.http_addr
                ),
            )
        })?;
        if let Some(addr) = &s.grpc_addr {
            addr.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "server.grpc_addr",
                    format!("{addr:?} is not an address like 0.0.0.0:8081 ({e})"),
                )
            })?;
            // Port 0 (any free port, as tests bind) may be given to several.
            let taken = [Some(&s.http_addr), s.admin_addr.as_ref()];
            if !addr.ends_with(":0") && taken.contains(&Some(addr)) {
                return Err(invalid(
                    "server.grpc_addr",
                    format!("{addr} is already http_addr or admin_addr"),
                ));
            }
        }
        if s.max_body_bytes.0 < 1024 {
            return Err(invalid(
                "server.max_body_bytes",
                format!("must be at least 1KiB, got {}", s.max_body_bytes.0),
            ));
        }
        for (key, d) in [
            ("server.header_timeout", s.header_timeout),
            ("server.keep_alive_timeout", s.keep_alive_timeout),
            ("server.body_timeout", s.body_timeout),
            ("server.write_timeout", s.write_timeout),
        ] {
            if d.0.is_zero() {
                return Err(invalid(key, "must be more than 0"));
            }
        }
        if s.poll_interval.0 < std::time::Duration::from_millis(100) {
            // Each poll stats every model file; below this it is a busy loop.
            return Err(invalid("server.poll_interval", "must be at least 100ms"));
        }
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if s.admin_max_connections == 0 {
            return Err(invalid(
                "server.admin_max_connections",
                "must be at least 1",
            ));
        }
        // Port 0 (any free port, as tests bind) may be given to both.
        if s.admin_addr.as_deref() == Some(s.http_addr.as_str()) && !s.http_addr.ends_with(":0") {
            return Err(invalid(
                "server.admin_addr",
                format!("must differ from http_addr ({})", s.http_addr),
            ));
        }
        if s.listen_backlog == 0 {
            return Err(invalid("server.listen_backlog", "must be at least 1"));
        }
        if s.body_memory() < s.max_body_bytes.0 {
            return Err(invalid(
                "server.max_body_memory",
                format!(
                    "must be at least max_body_bytes ({}), got {}",
                    s.max_body_bytes.0,
                    s.body_memory()
                ),
            ));
        }
        if s.request_timeout.0.is_zero() {
            return Err(invalid("server.request_timeout", "must be more than 0"));
        }
        Ok(())
    }
}

impl RuntimeConfig {
    /// The `runtime` section's values.
    fn validate(&self) -> Result<(), ConfigError> {
        if let Threads::Count(0) = self.cpu_threads {
            return Err(invalid(
                "runtime.cpu_threads",
                "must be `auto` or at least 1",
            ));
        }
        if let Threads::Count(0) = self.preprocess_threads {
            return Err(invalid(
                "runtime.preprocess_threads",
                "must be `auto` or at least 1",
            ));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// One model's values (its name's uniqueness is [`Config::validate`]'s), each error naming
    /// its key as `models[i].…`.
    fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("models[{i}].{k}");
        let valid_name = !self.name.is_empty()
            && self.name.len() <= 128
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !valid_name {
            return Err(invalid(
                key("name"),
                format!(
                    "{:?} must be 1-128 letters, digits, `_`, `-` or `.`",
                    self.name
                ),
            ));
        }
        if self.version.is_empty()
            || !self
                .version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return Err(invalid(
                key("version"),
                format!(
                    "{:?} must be letters, digits, `_`, `-` or `.`",
                    self.version
                ),
            ));
        }
        if self.path.is_dir() {
            if let Some(VersionPolicy::Latest(0)) = self.version_policy {
                return Err(invalid(key("version_policy.latest"), "must be at least 1"));
            }
        } else if !self.path.is_file() {
            return Err(invalid(
                key("path"),
                format!(
                    "no model file or versioned folder at {}",
                    self.path.display()
                ),
            ));
        } else if self.version_policy.is_some() {
            return Err(invalid(
                key("version_policy"),
                "applies to a versioned folder (VERSION/model.onnx); path is one file",
            ));
        }
        self.devices.validate(&key("devices"))?;
        if self.instances_per_device == 0 || self.instances_per_device > 64 {
            return Err(invalid(
                key("instances_per_device"),
                format!("must be 1..=64, got {}", self.instances_per_device),
            ));
        }
        let b = &self.batching;
        if let MaxBatch::Fixed(n) = b.max_batch_size {
            if n == 0 || n > MAX_BATCH_LIMIT {
                return Err(invalid(
                    key("batching.max_batch_size"),
                    format!("must be `auto` or 1..={MAX_BATCH_LIMIT}, got {n}"),
                ));
            }
        }
        let t = &self.tuning;
        if !(0.0..=0.9).contains(&t.memory_headroom) {
            return Err(invalid(
                key("tuning.memory_headroom"),
                format!("must be between 0 and 0.9, got {}", t.memory_headroom),
            ));
        }
        if t.max_batch_cap == 0 || t.max_batch_cap > MAX_BATCH_LIMIT {
            return Err(invalid(
                key("tuning.max_batch_cap"),
                format!("must be 1..={MAX_BATCH_LIMIT}, got {}", t.max_batch_cap),
            ));
        }
        if t.max_duration.0.is_zero() || t.max_duration.0 > std::time::Duration::from_secs(3600) {
            return Err(invalid(
                key("tuning.max_duration"),
                "must be more than 0 and at most 1h",
            ));
        }
        if let Some(img) = &self.image {
            img.validate(&key("image"))?;
        }
        if self.health.failure_threshold == 0 {
            return Err(invalid(
                key("health.failure_threshold"),
                "must be at least 1",
            ));
        }
        if self.health.reprobe_interval.0 < std::time::Duration::from_millis(10) {
            return Err(invalid(
                key("health.reprobe_interval"),
                "must be at least 10ms",
            ));
        }
        if let Some(c) = &self.classification {
            c.validate(&key("classification"))?;
        }
        if let Some((name, _)) = t.dims.iter().find(|(_, &v)| v == 0) {
            return Err(invalid(
                key(&format!("tuning.dims.{name}")),
                "must be at least 1",
            ));
        }
        if b.max_queue_delay.0 > std::time::Duration::from_secs(10) {
            return Err(invalid(
                key("batching.max_queue_delay"),
                "must be at most 10s",
            ));
        }
        if b.queue_capacity == 0 || b.queue_capacity > 1 << 20 {
            return Err(invalid(
                key("batching.queue_capacity"),
                format!("must be 1..=1048576, got {}", b.queue_capacity),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
