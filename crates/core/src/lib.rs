//! ortserve-core: everything a request needs below its front door, with no HTTP in it.
//!
//! Tensors and models, batching, dispatch, devices, tuning, image preprocessing, the
//! configuration, the metrics registry and loading. The front doors (`ortserve-http`, and any
//! other protocol) sit above it and reach it through [`app`]; the `ortserve` crate wires them.
//! This crate does not depend on axum, hyper, tower-http or tonic: `cargo tree -p ortserve-core`
//! shows it, and the compiler enforces it.
//!
//! # Layout
//!
//! Arrows point one way: `app` → (`preprocess`, `batching`) → `dispatch` → `device`;
//! `startup` → everything; `tuning` → `device`; `codec` → `tensor`. `config`, `metrics`,
//! `tensor`, `model`, `stamp` and `budget` are leaves. docs/ARCHITECTURE.md has the request path and the rules.
//!
//! - [`config`]: the YAML schema, defaults, environment overrides, validation with key paths.
//! - [`call`]: the protocol-neutral core of a call (context, auth, errors and their kinds,
//!   request metrics) that every front door drives.
//! - [`app`]: the façade the front doors call: models (infer tensors, status, tuning), image
//!   prediction (preprocessing → batching → classification), readiness, the metrics text.
//! - [`startup`]: loading and tuning every (model, device); stopping them; `check()`.
//! - [`stats`]: per-model inference statistics (the V2 statistics extension).
//! - [`lifecycle`]: loading, reloading and unloading configured models while serving (the V2
//!   repository extension's index, load and unload), over the registry.
//! - [`registry`]: the served models by name and version, changeable at runtime.
//! - `batching`: a model's lock-free request handle and its owner (which stops and joins), the
//!   batcher actor and its pure `State`.
//! - `dispatch`: device choice (`round_robin`, `least_loaded`), job slots, the in-flight guard,
//!   each slot's cap refiner.
//! - [`device`]: the ONNX Runtime library, sessions, device planning, the execution providers
//!   (what each kind of device means: `device::provider`, one file per kind), device memory
//!   readings and the worker threads. The only module that imports `ort`.
//! - [`tensor`]: `Tensor { dtype, shape, data }`, concatenation and slicing along dim 0.
//! - [`codec`]: the JSON tensor codec: a one-pass reader of request bodies, tensor data straight
//!   into tensor bytes, with its own error type ([`codec::JsonError`]).
//! - [`model`]: a model's inputs and outputs and the checks on a request's tensors.
//! - [`preprocess`]: uploaded images into model input rows, on a bounded CPU pool.
//! - `classify`: labels, softmax and top-k for classification outputs.
//! - [`metrics`]: the Prometheus registry.
//! - [`stamp`]: a moment in one atomic (device run start, request head start).
//! - `budget`: a lock-free count taken and given back (queue places, body bytes).
//! - [`gather`]: a request's bytes as they arrive, in one buffer (REST bodies, gRPC messages).
//! - [`tuning`]: the startup batch-size probe, the tuning cache and plot.
//! - [`memory`]: the binaries' allocator.
//! - `testing` (hidden; for tests): a model served by any runner, device health switches.

#![warn(unreachable_pub)]

pub mod app;
mod batching;
mod budget;
pub mod call;
mod classify;
pub mod codec;
pub mod config;
pub mod device;
mod dispatch;
pub mod gather;
pub mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod registry;
pub mod stamp;
pub mod startup;
pub mod stats;
pub mod tensor;
#[doc(hidden)]
pub mod testing;
pub mod trace_context;
pub mod tuning;
