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
    builder(cuda, threads)?.commit_from_file(path).map_err(err)
}

fn builder(cuda: bool, threads: Option<usize>) -> Result<ort::session::builder::SessionBuilder> {
    let env = environment()?;
    let mut b = Session::builder(env).map_err(err)?;
    if let Some(n) = threads {
        b = b.with_intra_threads(n).map_err(err)?;
    }
    if cuda {
        let ep = ort::ep::CUDA::default().build().error_on_failure();
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
    let mut feed: Vec<(std::borrow::Cow<'_, str>, ort::session::SessionInputValue<'_>)> = Vec::new();
    for name in names {
        let Some(v) = inputs.get(name) else {
            continue;
        };
        let iv: ort::session::SessionInputValue<'_> = match v {
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

/// Copy an output (in host memory) into a `Value`.
fn to_host_value(name: &str, v: &ort::value::DynValue) -> Result<Value> {
    Ok(if let Ok(a) = v.try_extract_array::<f32>() {
        Value::F32(a.to_owned())
    } else if let Ok(a) = v.try_extract_array::<f64>() {
        Value::F32(a.mapv(|x| x as f32))
    } else if let Ok(a) = v.try_extract_array::<i64>() {
        Value::I64(a.to_owned())
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
/// device. With an in-place step graph (`StepSpec::in_place`) there is one set, and each state
/// output is bound to its input's buffer: the graph itself leaves the state as it was when it
/// rejects a step. Otherwise two sets: `bindings[k]` reads set `k` and writes its updates into
/// set `1 - k`, so committing a run is flipping `current`, and a run that is not committed leaves
/// the current set untouched. The bindings are made once; a run binds only the feed (the batch
/// and the optimizer's scalars) and fetches the reported outputs into host memory.
pub struct Stepper {
    /// Declared before `buffers`, so dropped first: on the CPU a binding's outputs point into
    /// `buffers`.
    bindings: Vec<ort::session::IoBinding>,
    session: Session,
    links: Vec<super::StateLink>,
    buffers: Vec<Vec<Tensor<f32>>>,
    current: usize,
    ran: bool,
    fetch: Vec<String>,
    cuda: bool,
}

impl Stepper {
    pub fn new(spec: super::StepSpec<'_>, fill: &mut super::Fill<'_>) -> Result<Stepper> {
        let super::StepSpec {
            path,
            device,
            threads,
            links,
            shapes,
            fetch,
            in_place,
        } = spec;
        let n_sets = if in_place { 1 } else { 2 };
        let cuda = device == super::Device::Cuda;
        use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
        // No memory pattern: ONNX Runtime would plan a second block of the step's whole working
        // set beside the arena (measured on a 138M-parameter step graph: peak RSS 0.75 GB higher
        // and the step 20% slower with it).
        let session = builder(cuda, threads)?
            .with_memory_pattern(false)
            .map_err(err)?
            .commit_from_file(path)
            .map_err(err)?;
        let allocator = if cuda {
            let info =
                MemoryInfo::new(AllocationDevice::CUDA, 0, AllocatorType::Device, MemoryType::Default).map_err(err)?;
            Allocator::new(&session, info).map_err(err)?
        } else {
            Allocator::default()
        };
        // Set 0 is written by `fill` now; set 1 is first written by the first run. On the CPU
        // the buffers are the process's own zeroed allocations (fresh pages the system maps
        // on first write), moved into ONNX Runtime tensors: `Tensor::new` would write zeros
        // over both sets at once, making every page resident before any value is known.
        let mut sets: Vec<Vec<Tensor<f32>>> = (0..n_sets).map(|_| Vec::new()).collect();
        for set in sets.iter_mut() {
            for l in &links {
                let shape = shapes
                    .get(&l.key)
                    .ok_or_else(|| err(format!("no shape for the state '{}'", l.key)))?;
                set.push(if cuda {
                    Tensor::<f32>::new(&allocator, shape.clone()).map_err(err)?
                } else {
                    Tensor::from_array(ndarray::ArrayD::<f32>::zeros(shape.clone())).map_err(err)?
                });
            }
        }
        for (l, t) in links.iter().zip(sets[0].iter_mut()) {
            if cuda {
                let mut host = ndarray::ArrayD::<f32>::zeros(shapes[&l.key].clone());
                fill(&l.key, host.view_mut())?;
                Tensor::from_array(host).map_err(err)?.copy_into(&mut *t).map_err(err)?;
            } else {
                fill(&l.key, t.try_extract_array_mut::<f32>().map_err(err)?)?;
            }
        }
        let host =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(err)?;
        let mut make_binding = |reads: usize| -> Result<ort::session::IoBinding> {
            let mut b = session.create_binding().map_err(err)?;
            for (i, l) in links.iter().enumerate() {
                b.bind_input(l.input.as_str(), &sets[reads][i]).map_err(err)?;
                let out = &mut sets[(reads + 1) % n_sets][i];
                if cuda {
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
            for f in fetch {
                b.bind_output_to_device(f.as_str(), &host).map_err(err)?;
            }
            Ok(b)
        };
        let bindings = (0..n_sets).map(&mut make_binding).collect::<Result<Vec<_>>>()?;
        Ok(Stepper {
            bindings,
            session,
            links,
            buffers: sets,
            current: 0,
            ran: false,
            fetch: fetch.to_vec(),
            cuda,
        })
    }
}

impl crate::StateStepper for Stepper {
    fn run(&mut self, feed: Tensors) -> Result<Tensors> {
        self.ran = false;
        let binding = &mut self.bindings[self.current];
        for (name, v) in feed {
            let t = owned_tensor(v)?;
            binding
                .bind_input(name.as_str(), &t)
                .map_err(|e| err(format!("cannot feed '{name}': {e}")))?;
        }
        let res = self.session.run_binding(binding).map_err(err)?;
        let mut out = Tensors::new();
        for name in &self.fetch {
            let v = res
                .get(name.as_str())
                .ok_or_else(|| err(format!("the model has no output '{name}'")))?;
            out.insert(name.clone(), to_host_value(name, v)?);
        }
        self.ran = true;
        Ok(out)
    }

    fn commit(&mut self) {
        if std::mem::take(&mut self.ran) {
            self.current = (self.current + 1) % self.buffers.len();
        }
    }

    fn visit_state(&self, f: &mut dyn FnMut(&str, ndarray::ArrayViewD<'_, f32>) -> Result<()>) -> Result<()> {
        for i in super::key_order(&self.links) {
            let (l, t) = (&self.links[i], &self.buffers[self.current][i]);
            if self.cuda {
                let host = t.to(ort::memory::AllocationDevice::CPU, 0).map_err(err)?;
                f(&l.key, host.try_extract_array::<f32>().map_err(err)?)?;
            } else {
                f(&l.key, t.try_extract_array::<f32>().map_err(err)?)?;
            }
        }
        Ok(())
    }

    /// The shape of each state tensor, by key (read from the buffers, no copy).
    fn shapes(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        self.links
            .iter()
            .zip(&self.buffers[self.current])
            .map(|(l, t)| (l.key.clone(), t.shape().iter().map(|&d| d as usize).collect()))
            .collect()
    }

    /// Overwrite the current state with `values` (by key; shapes already checked).
    fn set_state(&mut self, values: &super::StateValues) -> Result<()> {
        for (l, t) in self.links.iter().zip(self.buffers[self.current].iter_mut()) {
            let Some(a) = values.get(&l.key) else { continue };
            if self.cuda {
                let host = Tensor::from_array(a.as_standard_layout().into_owned()).map_err(err)?;
                host.copy_into(&mut *t).map_err(err)?;
            } else {
                t.try_extract_array_mut::<f32>().map_err(err)?.assign(a);
            }
        }
        self.ran = false;
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
