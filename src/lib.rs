//! dagr-inject: rewrite ONNX multimodal graphs to add DAGR (dispersive and anchoring geometric
//! regularization), in standard ONNX operators, build their training graphs, and run them on
//! tract or ONNX Runtime.
//!
//! Layers, each using only the ones before it:
//! `onnx` (model I/O, graph index, shape facts, builders) -> `locate` (encoder outputs) ->
//! `dagr` (the regularizer subgraph, its analytic gradients, an ndarray reference) -> `grad`
//! (reverse-mode rules in one registry, training graphs) -> `runtime` (tract and ONNX Runtime;
//! `Stepper` keeps a graph's state on the backend between runs) -> `train` (the optimizer as
//! ONNX nodes folded into a step graph, the training loop), `verify`, `diagnose`, `inspect`
//! (reports) -> the `dagr-inject` binary. `error`, `limits` (size checks made before allocating)
//! and `fault` (the fault-injection test hook) serve every layer.

pub mod dagr;
pub mod diagnose;
pub mod error;
pub mod fault;
pub mod grad;
pub mod inspect;
pub mod limits;
pub mod locate;
pub mod npz;
pub mod onnx;
pub mod runtime;
pub mod train;
pub mod verify;

pub use dagr::{inject, Config};
pub use error::{Error, Result};
