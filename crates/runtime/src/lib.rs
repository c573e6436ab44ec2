//! Backends that run a (rewritten) model: tract, pure Rust and embedded, and ONNX Runtime,
//! loaded dynamically from its shared library.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod data;
pub mod npz;
pub mod ort_backend;
pub mod tract_backend;

pub use dagr_onnx::state::StateLink;

use dagr_onnx::error::{Error, Result};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
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
    /// Prepare `path` on the CPU; `example` fixes the input shapes (tract specializes the plan
    /// to them).
    pub fn new(backend: Backend, path: &Path, example: &Tensors, outputs: &[String]) -> Result<Runner> {
        Ok(match backend {
            Backend::Tract => Runner::Tract(tract_backend::Prepared::new(path, example, outputs)?),
            Backend::Ort => {
                let s = ort_backend::session(path)?;
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

/// A graph run again and again with state that stays on the backend between runs: on ONNX
/// Runtime the state lives in two sets of buffers bound with IoBinding (on the GPU with the
/// CUDA execution provider), one read and one written per run, so a run moves only the feed
/// and the fetched outputs. A run's state update takes effect only on `commit`, so a step that
/// goes wrong (a non-finite loss) is discarded by not committing it.
pub enum Stepper {
    Tract(tract_backend::Stepper),
    Ort(Box<ort_backend::Stepper>),
}

/// State values by key.
pub type StateValues = BTreeMap<String, ArrayD<f32>>;

impl Stepper {
    /// Prepare the graph at `path`; `initial` holds a value for every link's key; `fetch` the
    /// outputs each run returns to the host.
    /// `cuda`: ONNX Runtime's CUDA execution provider (an error on tract, or if it cannot
    /// load); `threads`: ONNX Runtime's intra-op threads (its default: the physical cores).
    pub fn new(
        backend: Backend,
        cuda: bool,
        threads: Option<usize>,
        path: &Path,
        links: Vec<StateLink>,
        initial: &StateValues,
        fetch: &[String],
    ) -> Result<Stepper> {
        for l in &links {
            if !initial.contains_key(&l.key) {
                return Err(Error::Graph(format!("no initial value for the state '{}'", l.key)));
            }
        }
        Ok(match backend {
            Backend::Tract if cuda => {
                return Err(rt_err(
                    "tract",
                    "tract runs on the CPU only; use --backend ort --device cuda",
                ))
            }
            Backend::Tract => Stepper::Tract(tract_backend::Stepper::new(path, links, initial, fetch)),
            Backend::Ort => Stepper::Ort(Box::new(ort_backend::Stepper::new(
                path, cuda, threads, links, initial, fetch,
            )?)),
        })
    }

    /// Run once with `feed` (every input that is not state); returns the fetched outputs.
    pub fn run(&mut self, feed: Tensors) -> Result<Tensors> {
        match self {
            Stepper::Tract(s) => s.run(feed),
            Stepper::Ort(s) => s.run(feed),
        }
    }

    /// Make the last run's state updates the current state.
    pub fn commit(&mut self) {
        match self {
            Stepper::Tract(s) => s.commit(),
            Stepper::Ort(s) => s.commit(),
        }
    }

    /// The current state, copied to the host.
    pub fn state(&self) -> Result<StateValues> {
        match self {
            Stepper::Tract(s) => Ok(s.state()),
            Stepper::Ort(s) => s.state(),
        }
    }

    /// The shape of every state tensor, read from the backend's buffers without copying them.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        match self {
            Stepper::Tract(s) => s.shapes(),
            Stepper::Ort(s) => s.shapes(),
        }
    }

    /// Replace the current state (resuming from a checkpoint); every value must keep its shape.
    pub fn set_state(&mut self, values: &StateValues) -> Result<()> {
        let shapes = self.shapes();
        for (k, v) in values {
            match shapes.get(k) {
                None => return Err(Error::Data(format!("the state has no entry '{k}'"))),
                Some(c) if c.as_slice() != v.shape() => {
                    return Err(Error::Data(format!(
                        "'{k}' has shape {:?}, the graph holds {c:?}",
                        v.shape()
                    )))
                }
                _ => {}
            }
        }
        match self {
            Stepper::Tract(s) => {
                s.set_state(values);
                Ok(())
            }
            Stepper::Ort(s) => s.set_state(values),
        }
    }
}
