//! Backends that run a (rewritten) model: tract, pure Rust and embedded, and ONNX Runtime,
//! loaded dynamically from its shared library.

pub mod ort_backend;
pub mod tract_backend;

use crate::error::{Error, Result};
use ndarray::ArrayD;
use std::collections::BTreeMap;
use std::path::Path;

/// A tensor crossing the backend boundary.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

impl Value {
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F32(a) => a.shape(),
            Value::I64(a) => a.shape(),
            Value::Bool(a) => a.shape(),
        }
    }
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Value::F32(a) => Some(a),
            _ => None,
        }
    }
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Value::F32(_) => "float32",
            Value::I64(_) => "int64",
            Value::Bool(_) => "bool",
        }
    }
}

pub type Tensors = BTreeMap<String, Value>;

/// Which runtime executes a model.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// tract: pure Rust, embedded, no install needed.
    Tract,
    /// ONNX Runtime (CPU execution provider), loaded from its shared library.
    Ort,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tract => "tract",
            Backend::Ort => "ort",
        }
    }
}

/// Run the model at `path` with `inputs`, returning the named `outputs`.
pub fn run(backend: Backend, path: &Path, inputs: &Tensors, outputs: &[String]) -> Result<Tensors> {
    match backend {
        Backend::Tract => tract_backend::run(path, inputs, outputs),
        Backend::Ort => ort_backend::run(path, inputs, outputs),
    }
}

pub(crate) fn rt_err(backend: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime {
        backend: backend.to_string(),
        message: format!("{e:#}"),
    }
}

/// A model prepared once for repeated runs with inputs of the same shapes (training steps,
/// finite differences): tract's optimized plan, or an ONNX Runtime session.
pub enum Runner {
    Tract(tract_backend::Prepared),
    /// The session, the names it can be fed, and the outputs to fetch.
    Ort(Box<ort::session::Session>, Vec<String>, Vec<String>),
}

impl Runner {
    /// Prepare `path`; `example` fixes the input shapes (tract specializes the plan to them).
    pub fn new(backend: Backend, path: &Path, example: &Tensors, outputs: &[String]) -> Result<Runner> {
        Self::on(backend, false, path, example, outputs)
    }

    /// `cuda`: ONNX Runtime's CUDA execution provider (an error on tract, or if it cannot load).
    pub fn on(backend: Backend, cuda: bool, path: &Path, example: &Tensors, outputs: &[String]) -> Result<Runner> {
        Ok(match backend {
            Backend::Tract if cuda => {
                return Err(rt_err(
                    "tract",
                    "tract runs on the CPU only; use --backend ort --device cuda",
                ))
            }
            Backend::Tract => Runner::Tract(tract_backend::Prepared::new(path, example, outputs)?),
            Backend::Ort => {
                let s = ort_backend::session_on(path, cuda)?;
                let names = ort_backend::feedable(&s);
                Runner::Ort(Box::new(s), names, outputs.to_vec())
            }
        })
    }

    pub fn run(&mut self, inputs: &Tensors) -> Result<Tensors> {
        match self {
            Runner::Tract(p) => p.run(inputs),
            Runner::Ort(s, names, outs) => ort_backend::run_session_fed(s, names, inputs, outs),
        }
    }
}
