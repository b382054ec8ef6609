//! Prometheus metrics. One registry per server instance (tests run several in one process).
//! Names carry the `ortserve_` prefix and a unit suffix.

use std::sync::OnceLock;

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Finished spans the trace exporter dropped because its queue was full (the receiver slow or
/// down). One per process, as the exporter is; every server's registry shows the same counter.
pub fn trace_spans_dropped() -> &'static IntCounter {
    static DROPPED: OnceLock<IntCounter> = OnceLock::new();
    DROPPED.get_or_init(|| {
        IntCounter::new(
            "ortserve_trace_spans_dropped_total",
            "Finished spans not exported because the export queue was full",
        )
        .expect("valid metric")
    })
}

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by model, route and HTTP status.
    pub requests: IntCounterVec,
    /// Request duration in seconds, by model and route.
    pub request_duration: HistogramVec,
    /// Rows per batch run, by model.
    pub batch_size: HistogramVec,
    /// Device run duration in seconds, by model and device.
    pub inference_duration: HistogramVec,
    /// Rows run, by model and device.
    pub device_rows: IntCounterVec,
    /// Failed runs, by model and device.
    pub device_failures: IntCounterVec,
    /// Request parts waiting in the batcher, by model.
    pub queue_depth: IntGaugeVec,
    /// 1 healthy, 0 not, by model and device.
    pub device_healthy: IntGaugeVec,
    /// The batch size each device was given at startup (tuned or configured), by model and device.
    pub tuned_max_batch: IntGaugeVec,
    /// The batch cap each device runs at now: the startup size, or what `tuning.refine` moved it
    /// to under load, by model and device.
    pub max_batch: IntGaugeVec,
    /// Changes of a device's cap by `tuning.refine`, by model, device and why (try, check, keep, back).
    pub cap_changes: IntCounterVec,
    /// Decode + resize + normalize time of one uploaded image, by model.
    pub preprocess_duration: HistogramVec,
    /// Time from a request part's arrival to its batch starting, by model.
    pub queue_duration: HistogramVec,
    /// Batches sent, by model and why the batch closed (full, idle, delay, ahead, drain, retry).
    pub batches: IntCounterVec,
    /// Rows queued or running on a device, by model and device (read at scrape time).
    pub inflight_rows: IntGaugeVec,
    pub saturation: GaugeVec,
    pub padded_rows: IntCounterVec,
    /// Loads and reloads while serving (repository API or poller), by model and result (`ok`,
    /// `failed`).
    pub model_loads: IntCounterVec,
    /// Unloads while serving, by model.
    pub model_unloads: IntCounterVec,
    /// Reads of the config by the poller, by result (`ok`, `invalid`).
    pub config_reads: IntCounterVec,
    /// How long a load took, from the call to the new sessions serving, by model.
    pub model_load_duration: HistogramVec,
    /// Each configured model's state as the repository index says it: 1 for the state it is in,
    /// 0 for the others, by model, version and state (read at scrape time).
    pub model_state: IntGaugeVec,
    /// GPU memory and utilisation from NVML, by GPU index (read at scrape time on GPU hosts).
    pub gpu_memory_used: IntGaugeVec,
    pub gpu_memory_total: IntGaugeVec,
    pub gpu_utilization: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("ortserve_requests_total", "Requests answered"),
            &["model", "route", "status", "protocol"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new("ortserve_request_duration_seconds", "Request duration")
                .buckets(exponential_buckets(0.0001, 2.0, 18).expect("valid buckets")),
            &["model", "route", "protocol"],
        )
        .expect("valid metric");
        let batch_size = HistogramVec::new(
            HistogramOpts::new("ortserve_batch_size_rows", "Rows per batch run")
                .buckets(exponential_buckets(1.0, 2.0, 13).expect("valid buckets")),
            &["model"],
        )
        .expect("valid metric");
        let inference_duration = HistogramVec::new(
            HistogramOpts::new("ortserve_inference_duration_seconds", "Device run duration")
                .buckets(exponential_buckets(0.00005, 2.0, 20).expect("valid buckets")),
            &["model", "device"],
        )
        .expect("valid metric");
        let device_rows = IntCounterVec::new(
            Opts::new("ortserve_device_rows_total", "Rows run on a device"),
            &["model", "device"],
        )
        .expect("valid metric");
        let device_failures = IntCounterVec::new(
            Opts::new("ortserve_device_failures_total", "Failed device runs"),
            &["model", "device"],
        )
        .expect("valid metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "ortserve_queue_depth_requests",
                "Request parts waiting for a batch",
            ),
            &["model"],
        )
        .expect("valid metric");
        let device_healthy = IntGaugeVec::new(
            Opts::new("ortserve_device_healthy", "1 when the device takes batches"),
            &["model", "device"],
        )
        .expect("valid metric");
        for c in [&requests, &device_rows, &device_failures] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(trace_spans_dropped().clone()))
            .expect("unique metric");
        let preprocess_duration = HistogramVec::new(
            HistogramOpts::new(
                "ortserve_preprocess_duration_seconds",
                "Decode and preprocess time of one image",
            )
            .buckets(exponential_buckets(0.0001, 2.0, 18).expect("valid buckets")),
            &["model"],
        )
        .expect("valid metric");
        let queue_duration = HistogramVec::new(
            HistogramOpts::new(
                "ortserve_queue_duration_seconds",
                "Time from arrival to the batch starting",
            )
            .buckets(exponential_buckets(0.00005, 2.0, 20).expect("valid buckets")),
            &["model"],
        )
        .expect("valid metric");
        let batches = IntCounterVec::new(
            Opts::new(
                "ortserve_batches_total",
                "Batches sent, by the reason the batch closed",
            ),
            &["model", "reason"],
        )
        .expect("valid metric");
        let inflight_rows = IntGaugeVec::new(
            Opts::new(
                "ortserve_inflight_rows",
                "Rows queued or running on a device",
            ),
            &["model", "device"],
        )
        .expect("valid metric");
        let saturation = GaugeVec::new(
            Opts::new(
                "ortserve_saturation",
                "Rows admitted and not answered (queued or running) over the rows the model's \
                 devices run at once; above 1, requests wait behind full batches",
            ),
            &["model"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(saturation.clone()))
            .expect("unique metric");
        let padded_rows = IntCounterVec::new(
            Opts::new(
                "ortserve_padded_rows_total",
                "Zero rows added to batches to reach a batch-size bucket (batching.buckets)",
            ),
            &["model", "device"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(padded_rows.clone()))
            .expect("unique metric");
        let gpu = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["gpu"]).expect("valid metric")
        };
        let gpu_memory_used = gpu("ortserve_gpu_memory_used_bytes", "GPU memory in use (NVML)");
        let gpu_memory_total = gpu(
            "ortserve_gpu_memory_total_bytes",
            "GPU memory in all (NVML)",
        );
        let gpu_utilization = gpu(
            "ortserve_gpu_utilization_percent",
            "GPU busy percentage over NVML's last sample period",
        );
        registry
            .register(Box::new(batches.clone()))
            .expect("unique metric");
        for g in [
            &inflight_rows,
            &gpu_memory_used,
            &gpu_memory_total,
            &gpu_utilization,
        ] {
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
        }
        for h in [
            &request_duration,
            &batch_size,
            &inference_duration,
            &preprocess_duration,
            &queue_duration,
        ] {
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
        }
        let model_loads = IntCounterVec::new(
            Opts::new(
                "ortserve_model_loads_total",
                "Model loads and reloads while serving, by result",
            ),
            &["model", "result"],
        )
        .expect("valid metric");
        let model_unloads = IntCounterVec::new(
            Opts::new(
                "ortserve_model_unloads_total",
                "Model unloads while serving",
            ),
            &["model"],
        )
        .expect("valid metric");
        let config_reads = IntCounterVec::new(
            Opts::new(
                "ortserve_config_reads_total",
                "Reads of the config file by the poller (model_control: poll), by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(config_reads.clone()))
            .expect("unique metric");
        let model_load_duration = HistogramVec::new(
            HistogramOpts::new(
                "ortserve_model_load_duration_seconds",
                "Time from a load call to the new sessions serving",
            )
            .buckets(exponential_buckets(0.05, 2.0, 14).expect("valid buckets")),
            &["model"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(model_loads.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(model_unloads.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(model_load_duration.clone()))
            .expect("unique metric");
        let model_state = IntGaugeVec::new(
            Opts::new(
                "ortserve_model_state",
                "A configured model's state (READY, LOADING, UNLOADING, UNAVAILABLE): 1 for the one it is in",
            ),
            &["model", "version", "state"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(model_state.clone()))
            .expect("unique metric");
        let tuned_max_batch = IntGaugeVec::new(
            Opts::new(
                "ortserve_tuned_max_batch_size",
                "Batch size a device runs at (tuned or configured)",
            ),
            &["model", "device"],
        )
        .expect("valid metric");
        let max_batch = IntGaugeVec::new(
            Opts::new(
                "ortserve_max_batch_size",
                "Batch cap a device runs at now (the startup size, or as tuning.refine moved it)",
            ),
            &["model", "device"],
        )
        .expect("valid metric");
        let cap_changes = IntCounterVec::new(
            Opts::new(
                "ortserve_batch_cap_changes_total",
                "Changes of a device's batch cap under load (tuning.refine)",
            ),
            &["model", "device", "why"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(cap_changes.clone()))
            .expect("unique metric");
        for g in [&queue_depth, &device_healthy, &tuned_max_batch, &max_batch] {
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
        }
        Metrics {
            registry,
            requests,
            request_duration,
            batch_size,
            inference_duration,
            device_rows,
            device_failures,
            queue_depth,
            device_healthy,
            tuned_max_batch,
            max_batch,
            cap_changes,
            model_loads,
            model_unloads,
            config_reads,
            model_load_duration,
            model_state,
            preprocess_duration,
            queue_duration,
            batches,
            inflight_rows,
            saturation,
            padded_rows,
            gpu_memory_used,
            gpu_memory_total,
            gpu_utilization,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}
