//! Backends that run a (rewritten) model: tract, pure Rust and embedded, and ONNX Runtime,
//! loaded dynamically from its shared library.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod data;
pub mod npz;
pub mod ort_backend;
pub mod tract_backend;

pub use dagr_onnx::state::{StateLink, StateRead};

use dagr_onnx::error::{Error, Result};
use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD};
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

/// Where an engine computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider.
    Cuda,
}

/// An engine that runs ONNX graphs: the extension point for backends. Each engine prepares a
/// graph once for repeated runs (`Prepared`) and keeps a step graph's state between runs
/// (`StateStepper`); `Backend::engine` lists the engines there are.
pub trait Engine: Sync {
    fn name(&self) -> &'static str;
    /// Run the model at `path` once.
    fn run(&self, path: &Path, inputs: &Tensors, outputs: &[String]) -> Result<Tensors>;
    /// Prepare `path` on the CPU; `example` fixes the input shapes (an engine may specialize
    /// its plan to them).
    fn prepare(&self, path: &Path, example: &Tensors, outputs: &[String]) -> Result<Box<dyn Prepared>>;
    /// Prepare a step graph as `spec` says, each state tensor written once by `fill` where it
    /// lives (see `Fill`).
    fn stepper(&self, spec: StepSpec<'_>, fill: &mut Fill<'_>) -> Result<Box<dyn StateStepper>>;
}

/// The graphs of a training step to prepare, sharing one state: on `device` with `threads`
/// intra-op threads (the engine's default if none), every state tensor of the `shapes` given by
/// key. One graph (the whole step), or a gradient graph and an update graph (gradient
/// accumulation, data-parallel training): each key is written by at most one graph and may be
/// read by the others. `scratch` keys are working buffers shared by the graphs (accumulated
/// gradients), not state: zeroed at first, never filled, visited, set or checkpointed. `zeros`
/// are state keys whose initial value is zero (fresh optimizer slots): an engine whose new
/// buffers are zeroed already leaves them to be written by the first step (tract: start-up
/// does not write gigabytes of zeros, measured 4.8 s of a 500M-parameter AdamW start), another
/// fills them like the rest.
pub struct StepSpec<'a> {
    pub graphs: Vec<GraphSpec<'a>>,
    pub device: Device,
    pub threads: Option<usize>,
    pub shapes: &'a BTreeMap<String, Vec<usize>>,
    pub scratch: Vec<String>,
    pub zeros: Vec<String>,
    /// Which device of its kind (the GPU of a data-parallel run's process on its node).
    pub device_index: usize,
}

/// One graph of a `StepSpec`: the graph at `path`, the state it reads and writes (`links`) and
/// only reads (`reads`), and `fetch` returned to the host each run. `in_place`: the graph writes
/// each state output after every read of its input and leaves the state as it was when it
/// rejects a step (see `step_graph::StepRecord::in_place`), so an engine may keep one set of
/// buffers for the keys it writes (ONNX Runtime binds each output to its input's buffer; tract
/// takes the tensors by value and writes parts into their rows); otherwise it keeps two, the
/// written set becoming current on `commit`.
pub struct GraphSpec<'a> {
    pub path: &'a Path,
    pub links: Vec<StateLink>,
    pub reads: Vec<StateRead>,
    pub fetch: &'a [String],
    pub in_place: bool,
}

impl StepSpec<'_> {
    /// The graph writing each key, checked: at most one per key, a shape for every key any
    /// graph uses, and a writer (or a scratch buffer) for every key a graph only reads.
    pub fn writers(&self) -> Result<BTreeMap<&str, usize>> {
        let mut writer: BTreeMap<&str, usize> = BTreeMap::new();
        for (gi, g) in self.graphs.iter().enumerate() {
            for l in &g.links {
                // A key updated in parts has a link per part, all in one graph.
                if writer.insert(l.key.as_str(), gi).is_some_and(|w| w != gi) {
                    return Err(Error::Internal(format!("two graphs write the state '{}'", l.key)));
                }
            }
        }
        for g in &self.graphs {
            for key in g.links.iter().map(|l| &l.key).chain(g.reads.iter().map(|r| &r.key)) {
                if !self.shapes.contains_key(key) {
                    return Err(Error::Internal(format!("no shape for the state '{key}'")));
                }
            }
            for r in &g.reads {
                if !writer.contains_key(r.key.as_str()) && !self.scratch.contains(&r.key) {
                    return Err(Error::Internal(format!("no graph writes the state '{}'", r.key)));
                }
            }
        }
        Ok(writer)
    }
}

/// A graph prepared once for repeated runs with inputs of the same shapes.
pub trait Prepared {
    fn run(&mut self, inputs: &Tensors) -> Result<Tensors>;
}

/// A graph run again and again whose state stays with the engine between runs; a run's state
/// update takes effect only on `commit`.
pub trait StateStepper {
    /// Run graph `graph` of the spec once with `feed` (every input that is not state); returns
    /// the fetched outputs.
    fn run(&mut self, graph: usize, feed: Tensors) -> Result<Tensors>;
    /// Make the last run's state updates the current state.
    fn commit(&mut self);
    /// Each tensor of the current state in turn, in key order, as a host view: no copy on the CPU;
    /// from a device, one tensor at a time crosses to the host. This is how checkpoints and
    /// exports read the state without holding a second copy of it.
    fn visit_state(&self, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>) -> Result<()>) -> Result<()>;
    /// The current state, copied to the host (one whole copy: for tests and small models).
    fn state(&self) -> Result<StateValues> {
        let mut out = StateValues::new();
        self.visit_state(&mut |k, v| {
            out.insert(k.to_string(), v.to_owned());
            Ok(())
        })?;
        Ok(out)
    }
    /// Each of `keys` (state or scratch) in turn, as a mutable host view of its current value:
    /// no copy on the CPU; from a device, one tensor at a time crosses to the host and back.
    /// How processes sum their gradients and share their BatchNorm statistics between runs.
    fn visit_mut(
        &mut self,
        keys: &[String],
        f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>) -> Result<()>,
    ) -> Result<()>;
    /// The shape of every state tensor, without copying the state.
    fn shapes(&self) -> BTreeMap<String, Vec<usize>>;
    /// Replace the current state; every value has the shape `shapes` gives.
    fn set_state(&mut self, values: &StateValues) -> Result<()>;
}

impl Backend {
    /// The engine behind this backend.
    pub fn engine(self) -> &'static dyn Engine {
        match self {
            Backend::Tract => &tract_backend::Tract,
            Backend::Ort => &ort_backend::OnnxRuntime,
        }
    }
}

/// Run the model at `path` with `inputs`, returning the named `outputs`.
pub fn run(backend: Backend, path: &Path, inputs: &Tensors, outputs: &[String]) -> Result<Tensors> {
    backend.engine().run(path, inputs, outputs)
}

/// `run` of a reference: on ONNX Runtime without its graph optimizations
/// (`ort_backend::run_as_written`), on tract as `run`.
pub fn run_as_written(backend: Backend, path: &Path, inputs: &Tensors, outputs: &[String]) -> Result<Tensors> {
    match backend {
        Backend::Ort => ort_backend::run_as_written(path, inputs, outputs),
        Backend::Tract => run(backend, path, inputs, outputs),
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
pub struct Runner(Box<dyn Prepared>);

impl Runner {
    /// Prepare `path` on the CPU; `example` fixes the input shapes (tract specializes the plan
    /// to them).
    pub fn new(backend: Backend, path: &Path, example: &Tensors, outputs: &[String]) -> Result<Runner> {
        Ok(Runner(backend.engine().prepare(path, example, outputs)?))
    }

    pub fn run(&mut self, inputs: &Tensors) -> Result<Tensors> {
        self.0.run(inputs)
    }
}

/// A graph run again and again with state that stays on the backend between runs: on ONNX
/// Runtime the state lives in two sets of buffers bound with IoBinding (on the GPU with the
/// CUDA execution provider), one read and one written per run, so a run moves only the feed
/// and the fetched outputs. A run's state update takes effect only on `commit`, so a step that
/// goes wrong (a non-finite loss) is discarded by not committing it.
pub struct Stepper(Box<dyn StateStepper>);

/// State values by key.
pub type StateValues = BTreeMap<String, ArrayD<f32>>;

/// Writes the initial value of one state tensor (by key) into its buffer, which holds no
/// meaningful values before: every element must be written. Called once per state tensor, in
/// the order of the links, with the buffer where the engine keeps it (host memory, or a host
/// staging buffer that then goes to the device), so start-up never holds a second copy of the
/// state.
pub type Fill<'a> = dyn FnMut(&str, ArrayViewMutD<'_, f32>) -> Result<()> + 'a;

impl Stepper {
    /// Prepare the step graph `spec` describes (an error where its `device` cannot be used;
    /// `threads`: intra-op threads, the engine's default being the physical cores); `fill`
    /// writes each state tensor's initial value (see `Fill`).
    pub fn new(backend: Backend, spec: StepSpec<'_>, fill: &mut Fill<'_>) -> Result<Stepper> {
        spec.writers()?;
        Ok(Stepper(backend.engine().stepper(spec, fill)?))
    }

    /// Run graph `graph` once with `feed` (every input that is not state); returns the fetched
    /// outputs.
    pub fn run(&mut self, graph: usize, feed: Tensors) -> Result<Tensors> {
        self.0.run(graph, feed)
    }

    /// Make the last run's state updates the current state.
    pub fn commit(&mut self) {
        self.0.commit()
    }

    /// The current state, copied to the host (one whole copy).
    pub fn state(&self) -> Result<StateValues> {
        self.0.state()
    }
    /// Each tensor of the current state in turn, by key, as a host view (see
    /// `StateStepper::visit_state`).
    pub fn visit_state(&self, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>) -> Result<()>) -> Result<()> {
        self.0.visit_state(f)
    }

    /// Each of `keys` as a mutable host view of its current value (see
    /// `StateStepper::visit_mut`).
    pub fn visit_mut(
        &mut self,
        keys: &[String],
        f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>) -> Result<()>,
    ) -> Result<()> {
        self.0.visit_mut(keys, f)
    }

    /// The shape of every state tensor, read from the backend's buffers without copying them.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.0.shapes()
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
        self.0.set_state(values)
    }
}
