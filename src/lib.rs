//! ortserve: an HTTP prediction server for ONNX models.
//!
//! It runs one ONNX Runtime session per device (GPU, or CPU slot), merges concurrent requests
//! into batches, sends each batch to a device through a round-robin or least-loaded dispatcher,
//! and speaks the KServe V2 / Open Inference Protocol over REST.
//!
//! # Layout
//!
//! Arrows point one way: `http` → `app` → (`preprocess`, `batching`) → `dispatch` → `device`;
//! `startup` → everything below `http`; `tuning` → `device`. `config`, `metrics`, `tensor`,
//! `model`, `stamp` and `budget` are leaves. `http` calls the core only through `app`.
//! docs/ARCHITECTURE.md has the request path, the rules and how they are enforced.
//!
//! - [`config`]: the YAML schema, defaults, environment overrides, validation with key paths.
//! - [`http`]: the axum router, tower layers, the accept loop with its connection limits,
//!   extractors (body deadlines and memory), the V2 codec and the status table. The only module
//!   that imports axum, tower-http and hyper.
//! - [`app`]: the façade `http` calls: models (infer tensors, status, tuning), image prediction
//!   (preprocessing → batching → classification), readiness, the metrics text.
//! - `startup`: loading, tuning and serving; the drain sequence on shutdown ([`run`], [`start`],
//!   [`Server`], [`tune`]).
//! - `batching`: a model's lock-free request handle and its owner (which stops and joins), the
//!   batcher actor and its pure `State`.
//! - `dispatch`: device choice (`round_robin`, `least_loaded`), job slots and the in-flight guard.
//! - [`device`]: the ONNX Runtime library, sessions, device planning and the worker threads. The
//!   only module that imports `ort`.
//! - [`tensor`]: `Tensor { dtype, shape, data }`, concatenation and slicing along dim 0.
//! - [`model`]: a model's inputs and outputs and the checks on a request's tensors.
//! - [`preprocess`]: uploaded images into model input rows, on a bounded CPU pool.
//! - `classify`: labels, softmax and top-k for classification outputs.
//! - `metrics`: the Prometheus registry.
//! - `stamp`: a moment in one atomic (device run start, request head start).
//! - `budget`: a lock-free count taken and given back (queue places, body bytes).
//! - [`tuning`]: the startup batch-size probe, memory readings, the tuning cache and plot.
//! - [`shutdown`]: the signals that start the drain.
//! - `testing` (hidden; for the integration tests): a model served by any runner, device health
//!   switches, the V2 parser. Nothing in the server calls it.
//!
//! The public surface is what the `ortserve` binary, the `ortserve-bench` crate (bench/) and the
//! integration tests use; everything else is crate-private, so rustc reports what is unused.

#![warn(unreachable_pub)]

pub mod app;
mod batching;
mod budget;
mod classify;
pub mod config;
pub mod device;
mod dispatch;
pub mod http;
pub mod memory;
mod metrics;
pub mod model;
pub mod preprocess;
pub mod shutdown;
mod stamp;
mod startup;
pub mod tensor;
#[doc(hidden)]
pub mod testing;
pub mod tuning;

pub use startup::{check, run, start, tune, CheckReport, Listeners, Server, StartupError};
