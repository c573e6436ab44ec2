//! Typed errors of the library. The CLI wraps them with `anyhow`; every message says what was
//! wrong and what to do about it.

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot read {path}: {source}\n  hint: check the path and that the file is readable")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}\n  hint: check that the directory exists and is writable")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid ONNX model: {reason}\n  hint: the file may be truncated or not an .onnx file; re-export it from your framework")]
    NotOnnx { path: PathBuf, reason: String },
    #[error("{path} has ONNX IR version {version}; this tool reads IR versions {lowest} to {highest}\n  hint: save the model with an IR version in that range (onnx.helper.make_model(..., ir_version={highest}))")]
    UnsupportedIr {
        path: PathBuf,
        version: i64,
        lowest: i64,
        highest: i64,
    },
    #[error("{what} needs {needed_mb} MB, more than the {available_mb} MB of memory available\n  hint: {hint}")]
    TooLarge {
        what: String,
        needed_mb: u64,
        available_mb: u64,
        hint: String,
    },
    #[error("non-finite {what} at step {step} (epoch {epoch}); nothing was updated")]
    NonFinite { step: usize, epoch: usize, what: String },
    #[error("external data of tensor '{tensor}' refers to {location}, which {problem}\n  hint: keep the external data file next to the model, at the location it was saved with")]
    ExternalData {
        tensor: String,
        location: String,
        problem: String,
    },
    #[error("{0}")]
    Encoder(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The model's content is damaged or outside what ONNX allows (wrong tensor data, a cycle,
    /// a node missing required inputs, state computed by a node instead of stored).
    #[error("{0}")]
    InvalidModel(String),
    /// A name the rewrite must create is taken by a tensor of the model.
    #[error("the model already has a tensor named '{name}'\n  hint: rename that tensor in the model; names under dagr/ are reserved for the rewrite")]
    NameTaken { name: String },
    /// A rule exists for the node's operator, but not for this use of it.
    #[error("cannot build the gradient of {op} node '{node}': {reason}")]
    GradientUnsupported { op: String, node: String, reason: String },
    /// Something this tool built is not what it should be: a bug, never the user's input.
    #[error("internal error: {0}\n  hint: this is a bug in dagr-inject; please report it with the command and model that caused it")]
    Internal(String),
    /// An operator on the path from the parameters to the loss has no gradient rule.
    #[error("no gradient rule for {op} (node '{node}'), which lies between the parameters and the loss\n  hint: freeze the parameters before it, or cut the path there (stop-gradient)")]
    NoGradientRule { op: String, node: String },
    /// A node's operator version (from the model's opset) is older than its rule covers.
    #[error("the gradient rule for {op} covers its schema versions {since} and later, but node '{node}' is version {version} (the model's opset)\n  hint: upgrade the model's opset (onnx.version_converter.convert_version) or re-export it with a newer opset")]
    OpVersionUnsupported {
        op: String,
        node: String,
        version: i64,
        since: i64,
    },
    /// A tensor's shape (or rank) could not be inferred where it is needed.
    #[error("the shape of '{tensor}' is unknown{context}\n  hint: add value_info for it (onnx.shape_inference.infer_shapes) or export with fixed shapes")]
    ShapeUnknown { tensor: String, context: String },
    /// The model is not a training graph (or is a step graph).
    #[error("{0}")]
    NotATrainingGraph(String),
    #[error("refusing to overwrite the input {0}\n  hint: write the output to another path")]
    WouldOverwriteInput(PathBuf),
    #[error("runtime error ({backend}): {message}")]
    Runtime { backend: String, message: String },
    #[error("{0}")]
    Data(String),
    /// The run was stopped by a signal (Ctrl-C, SIGTERM) between two steps.
    #[error("{0}")]
    Interrupted(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
