//! dagr-inject: rewrite ONNX multimodal graphs to add DAGR (dispersive and anchoring geometric
//! regularization), in standard ONNX operators, build their training graphs, and run them on
//! tract or ONNX Runtime.
//!
//! The layers are crates, each depending only on the ones before it (the compiler forbids a
//! back-edge):
//! `dagr-onnx` (model I/O, graph index, shape facts, builders; errors, bounds, the fault hook) ->
//! `dagr-ops` (every operator as one registry entry: shape and value inference, gradient rule,
//! schema versions covered, finite-difference cases) -> `dagr-autodiff` (the reverse-mode
//! engine over that registry) -> `dagr-core` (encoder
//! location, the regularizer and its reference, training graphs, optimizers as ONNX nodes, step
//! graphs, embedding geometry) -> `dagr-runtime` (host tensors, `.npz`, datasets, tract and ONNX
//! Runtime, `Stepper`) -> `dagr-train` (the loop, checkpoints, evaluation) -> `dagr-report`
//! (verify, diagnose, inspect) -> this crate: the `dagr-inject` command (`cli`), and this facade,
//! which re-exports each layer under a short name.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

// The command line names this crate by its name, as the binary did.
extern crate self as dagr_inject;

/// The `dagr-inject` command line (the binary and the Python package's command run
/// `cli::main_with`): the one place, with the Python binding, that prints.
pub mod cli;

pub use dagr_autodiff as autodiff;
pub use dagr_core as dagr;
pub use dagr_core::locate;
pub use dagr_dist as dist;
pub use dagr_onnx as onnx;
pub use dagr_onnx::{error, fault, limits};
pub use dagr_ops as ops;
pub use dagr_report::{diagnose, inspect, plots, verify};
pub use dagr_runtime as runtime;
pub use dagr_runtime::npz;
pub use dagr_train as train;

pub use dagr_core::{inject, Config};
pub use error::{Error, Result};
