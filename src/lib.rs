//! ortserve: an HTTP prediction server for ONNX models.
//!
//! It runs one ONNX Runtime session per device (GPU, or CPU slot), merges concurrent requests
//! into batches, sends each batch to a device through a round-robin or least-loaded dispatcher,
//! and speaks the KServe V2 / Open Inference Protocol over REST.
//!
//! # Crates
//!
//! The workspace's crates are its layers, and dependencies point one way:
//! `ortserve` (this crate: the binary, serving and the drain) → `ortserve-http` (the REST front
//! door) → `ortserve-core` (tensors, models, batching, dispatch, devices, tuning, preprocessing,
//! config, loading; no HTTP). docs/ARCHITECTURE.md has the map, a request's path and the rules.
//!
//! This crate re-exports the core's public modules and the HTTP crate under the names the
//! binary, the bench (bench/) and the integration tests use.

#![warn(unreachable_pub)]

mod server;
pub mod shutdown;
pub mod telemetry;

pub use ortserve_core::startup::{check, CheckReport, StartupError};
pub use ortserve_core::{
    app, call, config, device, memory, metrics, model, preprocess, registry, tensor, testing,
    tuning,
};
pub use ortserve_grpc as grpc;
pub use ortserve_http as http;
pub use server::{run, start, tune, Listeners, Server};
