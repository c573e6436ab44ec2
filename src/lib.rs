//! dagr-inject: rewrite ONNX multimodal graphs to add DAGR (dispersive and anchoring geometric
//! regularization), in standard ONNX operators, and run them on tract or ONNX Runtime.
//!
//! Layers, each using only the ones before it:
//! `onnx` (model I/O, graph index, builders) -> `locate` (encoder outputs) -> `dagr` (the
//! regularizer subgraph, its analytic gradients, and an ndarray reference) -> `runtime`
//! (tract and ONNX Runtime backends) -> the `dagr-inject` binary.

pub mod dagr;
pub mod diagnose;
pub mod error;
pub mod grad;
pub mod inspect;
pub mod locate;
pub mod npz;
pub mod onnx;
pub mod runtime;
pub mod train;
pub mod verify;

pub use dagr::{inject, Config};
pub use error::{Error, Result};
