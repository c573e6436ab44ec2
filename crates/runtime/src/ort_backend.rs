//! ONNX Runtime backend through the `ort` crate, loading `libonnxruntime` at run time.
//!
//! The library is found through `ORT_DYLIB_PATH`, else the project's `.venv` (made by
//! `scripts/setup.sh`), else the `onnxruntime` Python package of `python3`.

use super::{rt_err, Tensors, Value};
use dagr_onnx::error::{Error, Result};
use ort::session::Session;
use ort::value::{Tensor, TensorRef};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn err(e: impl std::fmt::Display) -> Error {
    rt_err("ort", e)
}

static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

fn find_in_capi(dir: &Path) -> Option<PathBuf> {
    let rd = std::fs::read_dir(dir).ok()?;
    let mut libs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    libs.sort();
    libs.pop()
}

/// Where the ONNX Runtime shared library is, or a message saying how to get it.
pub fn locate_library() -> std::result::Result<PathBuf, String> {
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(format!(
                "ORT_DYLIB_PATH points to {}, which does not exist",
                p.display()
            ))
        };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(d) = std::env::current_dir() {
        roots.extend(d.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().map(Path::to_path_buf));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for r in roots {
        let lib = r.join(".venv/lib");
        if let Ok(rd) = std::fs::read_dir(&lib) {
            for py in rd.flatten() {
                let capi = py.path().join("site-packages/onnxruntime/capi");
                if let Some(p) = find_in_capi(&capi) {
                    return Ok(p);
                }
            }
        }
    }
    let py = std::process::Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output();
    if let Ok(o) = py {
        if o.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("capi");
            if let Some(p) = find_in_capi(&dir) {
                return Ok(p);
            }
        }
    }
    Err("ONNX Runtime's shared library was not found.\n  hint: run scripts/setup.sh (it installs the PyPI onnxruntime wheel into .venv), \
         or `pip install onnxruntime==1.31.1`, or set ORT_DYLIB_PATH to libonnxruntime.so; \
         the tract backend (--backend tract) needs no install"
        .into())
}

/// The process-wide ONNX Runtime environment (loaded once).
pub fn environment() -> Result<&'static ort::environment::Environment> {
    let env = ENV.get_or_init(|| {
        let lib = locate_library()?;
        ort::init_from(&lib)
            .map_err(|e| format!("cannot load {}: {e}", lib.display()))?
            .with_name("dagr-inject")
            // ONNX Runtime's own log lines would print before (and repeat) the errors it
            // returns, which this tool reports once, with a hint.
            .with_logger(std::sync::Arc::new(|_, _, _, _, _| {}))
            .build()
            .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
    });
    env.as_ref().map_err(err)
}

pub fn session(path: &Path) -> Result<Session> {
    session_on(path, false, None)
}

/// A session on the CPU, or on the CUDA execution provider. CUDA never silently falls back
/// to the CPU: a failed registration is an error. `threads`: intra-op threads (ONNX Runtime's
/// default is one per physical core).
pub fn session_on(path: &Path, cuda: bool, threads: Option<usize>) -> Result<Session> {
    builder(cuda.then_some(0), threads)?.commit_from_file(path).map_err(err)
}

/// `cuda`: the CUDA device to compute on, if any.
fn builder(cuda: Option<i32>, threads: Option<usize>) -> Result<ort::session::builder::SessionBuilder> {
    let env = environment()?;
    let mut b = Session::builder(env).map_err(err)?;
    if let Some(n) = threads {
        b = b.with_intra_threads(n).map_err(err)?;
    }
    if let Some(id) = cuda {
        // The arena grows by what is asked (its default doubles each extension: up to twice the
        // state's device memory); float32 matrix products stay float32 (ONNX Runtime's default
        // is TF32, PyTorch's is not), so a CUDA run ends where the CPU run does.
        let ep = ort::ep::CUDA::default()
            .with_device_id(id)
            .with_arena_extend_strategy(ort::ep::ArenaExtendStrategy::SameAsRequested)
            .with_tf32(false)
            .build()
            .error_on_failure();
        b = b.with_execution_providers([ep]).map_err(|e| {
            err(format!(
                "cannot use the CUDA execution provider: {e}\n  hint: install onnxruntime-gpu==1.31.1 (CUDA 13, cuDNN 9) and point ORT_DYLIB_PATH at its libonnxruntime.so, or use `device` cpu"
            ))
        })?;
    }
    Ok(b)
}

pub fn run(path: &Path, inputs: &Tensors, outputs: &[String]) -> Result<Tensors> {
    let mut s = session(path)?;
    run_session(&mut s, inputs, outputs)
}

/// `run` with ONNX Runtime's graph optimizations off: the model computed as it is written, for
/// a reference. ONNX Runtime 1.31's basic level moves a `Pad` with zeros into a following
/// MaxPool's `pads`, which MaxPool leaves out of its maximum (ResNet50V2 from Keras, whose
/// first max pool reads a zero-padded convolution output with negative values: logits 2.2e-3
/// off Keras's float32 ones at the default level, 1.1e-6 with the optimizations off).
pub fn run_as_written(path: &Path, inputs: &Tensors, outputs: &[String]) -> Result<Tensors> {
    let mut b = builder(None, None)?
        .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)
        .map_err(err)?;
    let mut s = b.commit_from_file(path).map_err(err)?;
    run_session(&mut s, inputs, outputs)
}

/// What a session can be fed: its inputs, and the initializers that are also graph inputs
/// (the parameters of a training graph), which ONNX Runtime lists apart.
pub fn feedable(s: &Session) -> Vec<String> {
    s.inputs()
        .iter()
        .map(|i| i.name().to_string())
        .chain(s.overridable_initializers().iter().map(|o| o.name().to_string()))
        .collect()
}

pub fn run_session(s: &mut Session, inputs: &Tensors, outputs: &[String]) -> Result<Tensors> {
    let names = feedable(s);
    run_session_fed(s, &names, inputs, outputs)
}

/// Run with every value of `inputs` whose name is in `names` (see `feedable`).
pub fn run_session_fed(s: &mut Session, names: &[String], inputs: &Tensors, outputs: &[String]) -> Result<Tensors> {
    // Inputs are passed as views of the caller's arrays (no copy on the CPU); arrays that are
    // not in standard layout are copied first.
    let narrow = int32_inputs(s);
    let mut feed: Vec<(std::borrow::Cow<'_, str>, ort::session::SessionInputValue<'_>)> = Vec::new();
    for name in names {
        let Some(v) = inputs.get(name) else {
            continue;
        };
        let iv: ort::session::SessionInputValue<'_> = match v {
            Value::I64(a) if narrow.contains(name) => as_int32(name, a)?.into(),
            Value::F32(a) if a.is_standard_layout() => TensorRef::from_array_view(a).map_err(err)?.into(),
            Value::I64(a) if a.is_standard_layout() => TensorRef::from_array_view(a).map_err(err)?.into(),
            Value::Bool(a) if a.is_standard_layout() => TensorRef::from_array_view(a).map_err(err)?.into(),
            Value::F32(a) => Tensor::from_array(a.as_standard_layout().into_owned())
                .map_err(err)?
                .into(),
            Value::I64(a) => Tensor::from_array(a.as_standard_layout().into_owned())
                .map_err(err)?
                .into(),
            Value::Bool(a) => Tensor::from_array(a.as_standard_layout().into_owned())
                .map_err(err)?
                .into(),
        };
        feed.push((std::borrow::Cow::Borrowed(name.as_str()), iv));
    }
    let res = s.run(feed).map_err(err)?;
    let mut out = Tensors::new();
    for name in outputs {
        let v = res
            .get(name.as_str())
            .ok_or_else(|| err(format!("the model has no output '{name}'")))?;
        out.insert(name.clone(), to_host_value(name, v)?);
    }
    Ok(out)
}

/// The inputs a session declares int32 (jax2onnx's and Keras's token ids): integers are held as
/// int64 on the host (`Value::I64`) and narrowed where they are fed.
fn int32_inputs(s: &Session) -> std::collections::HashSet<String> {
    s.inputs()
        .iter()
        .filter(|i| i.dtype().tensor_type() == Some(ort::value::TensorElementType::Int32))
        .map(|i| i.name().to_string())
        .collect()
}

/// `a` as an int32 tensor for the int32 input `name`; an error for a value int32 cannot hold.
fn as_int32(name: &str, a: &ndarray::ArrayD<i64>) -> Result<ort::value::DynValue> {
    let narrowed = a
        .iter()
        .map(|&x| i32::try_from(x))
        .collect::<std::result::Result<Vec<i32>, _>>()
        .map_err(|_| {
            err(format!(
                "input '{name}' is int32, and a value fed to it does not fit in int32"
            ))
        })?;
    let a = ndarray::ArrayD::from_shape_vec(a.shape(), narrowed).map_err(err)?;
    Ok(Tensor::from_array(a).map_err(err)?.into_dyn())
}

/// Copy an output (in host memory) into a `Value`.
fn to_host_value(name: &str, v: &ort::value::DynValue) -> Result<Value> {
    Ok(if let Ok(a) = v.try_extract_array::<f32>() {
        Value::F32(a.to_owned())
    } else if let Ok(a) = v.try_extract_array::<f64>() {
        Value::F32(a.mapv(|x| x as f32))
    } else if let Ok(a) = v.try_extract_array::<i64>() {
        Value::I64(a.to_owned())
    } else if let Ok(a) = v.try_extract_array::<i32>() {
        Value::I64(a.mapv(i64::from))
    } else if let Ok(a) = v.try_extract_array::<bool>() {
        Value::Bool(a.to_owned())
    } else if let Ok(a) = v.try_extract_array::<half::f16>() {
        Value::F32(a.mapv(f32::from))
    } else if let Ok(a) = v.try_extract_array::<half::bf16>() {
        Value::F32(a.mapv(f32::from))
    } else {
        return Err(err(format!("output '{name}' has a type this tool does not read")));
    })
}

/// An owned ONNX Runtime tensor holding `v` (moved, not copied, when it is contiguous).
fn owned_tensor(v: Value) -> Result<ort::value::DynValue> {
    Ok(match v {
        Value::F32(a) => Tensor::from_array(a).map_err(err)?.into_dyn(),
        Value::I64(a) => Tensor::from_array(a).map_err(err)?.into_dyn(),
        Value::Bool(a) => Tensor::from_array(a).map_err(err)?.into_dyn(),
    })
}

/// `runtime::Stepper` on ONNX Runtime. The state lives in tensors allocated for the session's
/// device, one or two per key. Keys written by an in-place graph (`GraphSpec::in_place`) and
/// scratch keys have one buffer, each output bound to its input's buffer: the graph itself leaves
/// the state as it was when it rejects a step. Keys written by another graph have two: a run
/// reads set `current[g]` of graph `g`'s keys and writes into the other, so committing the run
/// is flipping `current[g]`, and a run that is not committed leaves the current set untouched.
/// A binding per graph and combination of current sets is made once, when first needed; a run
/// binds only the feed (the batch and the optimizer's scalars) and fetches the reported outputs
/// into host memory.
pub struct Stepper {
    /// Declared before `buffers`, so dropped first: on the CPU a binding's outputs point into
    /// `buffers`.
    bindings: std::collections::HashMap<(usize, Vec<usize>), ort::session::IoBinding>,
    sessions: Vec<Session>,
    graphs: Vec<StepGraph>,
    /// By key: one buffer, or two (see above).
    buffers: BTreeMap<String, Vec<Tensor<f32>>>,
    /// The graph writing each key.
    writer: BTreeMap<String, usize>,
    scratch: std::collections::BTreeSet<String>,
    /// The current set of each graph's double-buffered keys.
    current: Vec<usize>,
    /// The graph whose run is not committed yet.
    ran: Option<usize>,
    cuda: bool,
}

/// What a `Stepper` keeps of a `GraphSpec`.
struct StepGraph {
    links: Vec<super::StateLink>,
    reads: Vec<super::StateRead>,
    fetch: Vec<String>,
    /// Whether the keys it writes have two buffers each.
    double: bool,
    /// Its inputs declared int32, fed narrowed (`int32_inputs`), found once.
    int32: std::collections::HashSet<String>,
}

use std::collections::BTreeMap;

impl Stepper {
    pub fn new(spec: super::StepSpec<'_>, fill: &mut super::Fill<'_>) -> Result<Stepper> {
        let writer: BTreeMap<String, usize> = spec.writers()?.into_iter().map(|(k, g)| (k.to_string(), g)).collect();
        let super::StepSpec {
            graphs,
            device,
            threads,
            shapes,
            scratch,
            // ONNX Runtime's new buffers are not zeroed: `fill` writes every state key.
            zeros: _,
            device_index,
        } = spec;
        let cuda = device == super::Device::Cuda;
        let index = i32::try_from(device_index).map_err(|_| err(format!("no device {device_index}")))?;
        use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
        // No memory pattern: ONNX Runtime would plan a second block of the step's whole working
        // set beside the arena (measured on a 138M-parameter step graph: peak RSS 0.75 GB higher
        // and the step 20% slower with it).
        // Several graphs run in turn: threads that spin after a run (ONNX Runtime's default)
        // would compete with the next graph's (measured on a 10M-parameter split step, 2 cores:
        // 0.18 s per step spinning, 0.15 s not).
        let spin = graphs.len() == 1;
        let sessions = graphs
            .iter()
            .map(|g| {
                builder(cuda.then_some(index), threads)?
                    .with_memory_pattern(false)
                    .map_err(err)?
                    .with_intra_op_spinning(spin)
                    .map_err(err)?
                    .commit_from_file(g.path)
                    .map_err(err)
            })
            .collect::<Result<Vec<_>>>()?;
        let allocator = if cuda {
            let info = MemoryInfo::new(
                AllocationDevice::CUDA,
                index,
                AllocatorType::Device,
                MemoryType::Default,
            )
            .map_err(err)?;
            Allocator::new(&sessions[0], info).map_err(err)?
        } else {
            Allocator::default()
        };
        let scratch: std::collections::BTreeSet<String> = scratch.into_iter().collect();
        let sets_of = |key: &str| -> usize {
            match writer.get(key) {
                Some(&g) if !graphs[g].in_place && !scratch.contains(key) => 2,
                _ => 1,
            }
        };
        // Set 0 is written by `fill` now (scratch keys: zeros); set 1 is first written by the
        // first run. On the CPU the buffers are the process's own zeroed allocations (fresh
        // pages the system maps on first write), moved into ONNX Runtime tensors: `Tensor::new`
        // would write zeros over both sets at once, making every page resident before any value
        // is known.
        let mut buffers: BTreeMap<String, Vec<Tensor<f32>>> = BTreeMap::new();
        let keys: std::collections::BTreeSet<&String> = graphs
            .iter()
            .flat_map(|g| g.links.iter().map(|l| &l.key).chain(g.reads.iter().map(|r| &r.key)))
            .collect();
        for key in keys {
            let shape = shapes
                .get(key)
                .ok_or_else(|| err(format!("no shape for the state '{key}'")))?;
            let mut set = Vec::new();
            for _ in 0..sets_of(key) {
                set.push(if cuda {
                    Tensor::<f32>::new(&allocator, shape.clone()).map_err(err)?
                } else {
                    Tensor::from_array(ndarray::ArrayD::<f32>::zeros(shape.clone())).map_err(err)?
                });
            }
            let t = &mut set[0];
            if cuda {
                let mut host = ndarray::ArrayD::<f32>::zeros(shape.clone());
                if !scratch.contains(key) {
                    fill(key, host.view_mut())?;
                }
                Tensor::from_array(host).map_err(err)?.copy_into(&mut *t).map_err(err)?;
            } else if !scratch.contains(key) {
                fill(key, t.try_extract_array_mut::<f32>().map_err(err)?)?;
            }
            buffers.insert(key.clone(), set);
        }
        let steps: Vec<StepGraph> = graphs
            .into_iter()
            .zip(&sessions)
            .map(|(g, s)| StepGraph {
                int32: int32_inputs(s),
                double: !g.in_place && g.links.iter().any(|l| !scratch.contains(&l.key)),
                links: g.links,
                reads: g.reads,
                fetch: g.fetch.to_vec(),
            })
            .collect();
        Ok(Stepper {
            bindings: Default::default(),
            sessions,
            current: vec![0; steps.len()],
            graphs: steps,
            buffers,
            writer,
            scratch,
            ran: None,
            cuda,
        })
    }

    /// Which of its buffers holds the current value of `key`.
    fn current_of(&self, key: &str) -> usize {
        let n = self.buffers.get(key).map_or(1, Vec::len);
        self.writer.get(key).map_or(0, |&g| self.current[g] % n)
    }

    /// The binding of graph `gi` for the current sets, made the first time it is needed.
    fn binding(&mut self, gi: usize) -> Result<&mut ort::session::IoBinding> {
        use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
        let id = (gi, self.current.clone());
        if !self.bindings.contains_key(&id) {
            let host =
                MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(err)?;
            let mut b = self.sessions[gi].create_binding().map_err(err)?;
            let g = &self.graphs[gi];
            let reads: Vec<(String, String, usize)> = g
                .reads
                .iter()
                .map(|r| (r.input.clone(), r.key.clone(), self.current_of(&r.key)))
                .collect();
            let links: Vec<(super::StateLink, usize)> =
                g.links.iter().map(|l| (l.clone(), self.current_of(&l.key))).collect();
            let fetch = g.fetch.clone();
            for (input, key, cur) in &reads {
                b.bind_input(input.as_str(), &self.buffers[key][*cur]).map_err(err)?;
            }
            for (l, cur) in &links {
                let set = self
                    .buffers
                    .get_mut(&l.key)
                    .ok_or_else(|| err(format!("no buffer for the state '{}'", l.key)))?;
                b.bind_input(l.input.as_str(), &set[*cur]).map_err(err)?;
                if let Some((start, end)) = l.rows {
                    // A part: the output is those rows of the input's own buffer (the graph
                    // writes each part after every read of those rows).
                    if self.cuda || set.len() != 1 {
                        return Err(err(format!(
                            "the state '{}' is updated in parts, which this engine binds only on the CPU, in place",
                            l.key
                        )));
                    }
                    let t = &mut set[0];
                    let shape = t.shape().clone();
                    let rows = shape.first().map_or(0, |&d| usize::try_from(d).unwrap_or(0));
                    if start >= end || end > rows {
                        return Err(err(format!(
                            "rows {start}..{end} of the state '{}' ({rows} rows)",
                            l.key
                        )));
                    }
                    let row: usize = shape.iter().skip(1).map(|&d| usize::try_from(d).unwrap_or(0)).product();
                    let mut part = shape.clone();
                    part[0] = (end - start) as i64;
                    let base = t.try_extract_array_mut::<f32>().map_err(err)?.as_mut_ptr();
                    // SAFETY: rows start..end of a contiguous f32 buffer of `rows` rows of `row`
                    // values (checked above), owned by `buffers`, which outlives the bindings and
                    // is never reallocated.
                    let view = unsafe {
                        ort::value::TensorRefMut::<f32>::from_raw(host.clone(), base.add(start * row).cast(), part)
                            .map_err(err)?
                    };
                    b.bind_output(l.output.as_str(), view).map_err(err)?;
                    continue;
                }
                let n = set.len();
                let out = &mut set[(cur + 1) % n];
                if self.cuda {
                    b.bind_output(l.output.as_str(), out).map_err(err)?;
                } else {
                    // `ort` binds as outputs only tensors it allocated; a tensor over the same
                    // memory (not owning it) writes into our buffer. SAFETY: the buffer is a
                    // contiguous f32 array of this shape, owned by `buffers`, which outlives
                    // the bindings (field order) and is never reallocated.
                    let shape = out.shape().clone();
                    let ptr = out.try_extract_array_mut::<f32>().map_err(err)?.as_mut_ptr();
                    let view = unsafe {
                        ort::value::TensorRefMut::<f32>::from_raw(host.clone(), ptr.cast(), shape).map_err(err)?
                    };
                    b.bind_output(l.output.as_str(), view).map_err(err)?;
                }
            }
            for f in &fetch {
                b.bind_output_to_device(f.as_str(), &host).map_err(err)?;
            }
            self.bindings.insert(id.clone(), b);
        }
        self.bindings.get_mut(&id).ok_or_else(|| err("a binding was not kept"))
    }
}

impl crate::StateStepper for Stepper {
    fn run(&mut self, graph: usize, feed: Tensors) -> Result<Tensors> {
        self.ran = None;
        if graph >= self.graphs.len() {
            return Err(err(format!("the step has no graph {graph}")));
        }
        let narrow = &self.graphs[graph].int32;
        let tensors = feed
            .into_iter()
            .map(|(name, v)| {
                let t = match v {
                    Value::I64(a) if narrow.contains(&name) => as_int32(&name, &a)?,
                    v => owned_tensor(v)?,
                };
                Ok((name, t))
            })
            .collect::<Result<Vec<_>>>()?;
        let binding = self.binding(graph)?;
        for (name, t) in tensors {
            binding
                .bind_input(name.as_str(), &t)
                .map_err(|e| err(format!("cannot feed '{name}': {e}")))?;
        }
        let id = (graph, self.current.clone());
        let binding = self.bindings.get(&id).ok_or_else(|| err("a binding was not kept"))?;
        let res = self.sessions[graph].run_binding(binding).map_err(err)?;
        let mut out = Tensors::new();
        for name in &self.graphs[graph].fetch {
            let v = res
                .get(name.as_str())
                .ok_or_else(|| err(format!("the model has no output '{name}'")))?;
            out.insert(name.clone(), to_host_value(name, v)?);
        }
        self.ran = Some(graph);
        Ok(out)
    }

    fn commit(&mut self) {
        if let Some(g) = self.ran.take() {
            if self.graphs[g].double {
                self.current[g] ^= 1;
            }
        }
    }

    fn visit_state(&self, f: &mut dyn FnMut(&str, ndarray::ArrayViewD<'_, f32>) -> Result<()>) -> Result<()> {
        for (key, set) in &self.buffers {
            if self.scratch.contains(key) {
                continue;
            }
            let t = &set[self.current_of(key)];
            if self.cuda {
                let host = t.to(ort::memory::AllocationDevice::CPU, 0).map_err(err)?;
                f(key, host.try_extract_array::<f32>().map_err(err)?)?;
            } else {
                f(key, t.try_extract_array::<f32>().map_err(err)?)?;
            }
        }
        Ok(())
    }

    fn visit_mut(
        &mut self,
        keys: &[String],
        f: &mut dyn FnMut(&str, ndarray::ArrayViewMutD<'_, f32>) -> Result<()>,
    ) -> Result<()> {
        for key in keys {
            let cur = self.current_of(key);
            let t = self
                .buffers
                .get_mut(key)
                .and_then(|set| set.get_mut(cur))
                .ok_or_else(|| err(format!("no state or scratch buffer '{key}'")))?;
            if self.cuda {
                let mut host = t.to(ort::memory::AllocationDevice::CPU, 0).map_err(err)?;
                f(key, host.try_extract_array_mut::<f32>().map_err(err)?)?;
                host.copy_into(&mut *t).map_err(err)?;
            } else {
                f(key, t.try_extract_array_mut::<f32>().map_err(err)?)?;
            }
        }
        self.ran = None;
        Ok(())
    }

    /// The shape of each state tensor, by key (read from the buffers, no copy).
    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.buffers
            .iter()
            .filter(|(k, _)| !self.scratch.contains(*k))
            .map(|(k, set)| (k.clone(), set[0].shape().iter().map(|&d| d as usize).collect()))
            .collect()
    }

    /// Overwrite the current state with `values` (by key; shapes already checked).
    fn set_state(&mut self, values: &super::StateValues) -> Result<()> {
        for (key, a) in values {
            if self.scratch.contains(key) {
                continue;
            }
            let cur = self.current_of(key);
            let Some(set) = self.buffers.get_mut(key) else { continue };
            let t = &mut set[cur];
            if self.cuda {
                let host = Tensor::from_array(a.as_standard_layout().into_owned()).map_err(err)?;
                host.copy_into(&mut *t).map_err(err)?;
            } else {
                t.try_extract_array_mut::<f32>().map_err(err)?.assign(a);
            }
        }
        self.ran = None;
        Ok(())
    }
}

/// ONNX Runtime as an `Engine`, loaded from its shared library: the CPU execution provider, or
/// CUDA (never a silent fall-back to the CPU).
pub struct OnnxRuntime;

/// A session, the names it can be fed, and the outputs to fetch.
struct PreparedSession {
    session: Session,
    names: Vec<String>,
    outputs: Vec<String>,
}

impl crate::Prepared for PreparedSession {
    fn run(&mut self, inputs: &Tensors) -> Result<Tensors> {
        run_session_fed(&mut self.session, &self.names, inputs, &self.outputs)
    }
}

impl crate::Engine for OnnxRuntime {
    fn name(&self) -> &'static str {
        "ort"
    }
    fn run(&self, path: &Path, inputs: &Tensors, outputs: &[String]) -> Result<Tensors> {
        run(path, inputs, outputs)
    }
    fn prepare(&self, path: &Path, _example: &Tensors, outputs: &[String]) -> Result<Box<dyn crate::Prepared>> {
        let session = session(path)?;
        let names = feedable(&session);
        Ok(Box::new(PreparedSession {
            session,
            names,
            outputs: outputs.to_vec(),
        }))
    }
    fn stepper(&self, spec: crate::StepSpec<'_>, fill: &mut crate::Fill<'_>) -> Result<Box<dyn crate::StateStepper>> {
        Ok(Box::new(Stepper::new(spec, fill)?))
    }
}
