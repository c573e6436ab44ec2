//! tract backend. Input facts are fixed from the actual inputs before optimization, so symbolic
//! batch dims are resolved and every shape is concrete.

use super::{rt_err, Tensors, Value};
use dagr_onnx::error::Result;
use std::path::Path;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

fn err(e: impl std::fmt::Display) -> dagr_onnx::error::Error {
    rt_err("tract", e)
}

/// An optimized tract plan for fixed input shapes, run as often as needed.
pub struct Prepared {
    plan: std::sync::Arc<TypedSimplePlan>,
    input_names: Vec<String>,
    outputs: Vec<String>,
}

/// The element type and shape of each input that will be fed, by name.
pub type Facts = std::collections::HashMap<String, (DatumType, Vec<usize>)>;

/// A tract output as a host `Value` (copied).
fn to_value(name: &str, t: &Tensor) -> Result<Value> {
    Ok(match t.datum_type() {
        DatumType::F32 => Value::F32(t.to_plain_array_view::<f32>().map_err(err)?.to_owned()),
        DatumType::I64 => Value::I64(t.to_plain_array_view::<i64>().map_err(err)?.to_owned()),
        DatumType::Bool => Value::Bool(t.to_plain_array_view::<bool>().map_err(err)?.to_owned()),
        DatumType::F16 | DatumType::F64 => {
            let c = t.cast_to::<f32>().map_err(err)?;
            Value::F32(c.to_plain_array_view::<f32>().map_err(err)?.to_owned())
        }
        other => return Err(err(format!("output '{name}' has unsupported type {other:?}"))),
    })
}

fn to_tensor(v: &Value) -> Tensor {
    match v {
        Value::F32(a) => a.clone().into_tensor(),
        Value::I64(a) => a.clone().into_tensor(),
        Value::Bool(a) => a.clone().into_tensor(),
    }
}

/// What tract 0.23.9 cannot load, said before it tries (its own message names an internal node
/// and says nothing of what to do): a Loop (it has no such operator), more than one If (it names
/// every If it translates "If", and the second is a duplicate).
fn cannot_load(m: &dagr_onnx::Model) -> Option<String> {
    let count = |op: &str| {
        m.graph()
            .node
            .iter()
            .filter(|n| n.op_type == op && n.domain.is_empty())
            .count()
    };
    if count("Loop") > 0 {
        return Some(
            "the graph has a Loop, which tract has no operator for: run it on ONNX Runtime (--backend ort)".into(),
        );
    }
    match count("If") {
        ifs if ifs > 1 => Some(format!(
            "the graph has {ifs} If nodes and tract loads one per graph (it names every If \"If\"): run it on ONNX Runtime (--backend ort)"
        )),
        _ => None,
    }
}

impl Prepared {
    /// Inputs in `example` that are also initializers (the parameters of a training graph) are
    /// fed, not folded: tract would otherwise treat them as constants.
    pub fn new(path: &Path, example: &Tensors, outputs: &[String]) -> Result<Prepared> {
        let facts = example
            .iter()
            .map(|(k, v)| {
                let dt = match v {
                    Value::F32(_) => DatumType::F32,
                    Value::I64(_) => DatumType::I64,
                    Value::Bool(_) => DatumType::Bool,
                };
                (k.clone(), (dt, v.shape().to_vec()))
            })
            .collect();
        Self::with_facts(path, &facts, outputs)
    }

    /// As `new`, from the type and shape of every input that will be fed (no values).
    pub fn with_facts(path: &Path, example: &Facts, outputs: &[String]) -> Result<Prepared> {
        let mut onnx_model = dagr_onnx::load(path)?;
        if let Some(why) = cannot_load(&onnx_model) {
            return Err(err(why));
        }
        let external = !dagr_onnx::io::external_tensors(&onnx_model.proto).is_empty();
        // Repeated computations merged here: tract's own merging of them can leave a reader on
        // a removed node (see `index::merge_duplicates`). A model with external data is read
        // by tract from its file (its data resolved there), as it is.
        let merged = !external && dagr_onnx::index::merge_duplicates(&mut onnx_model) > 0;
        // Only initializers that are also graph inputs can be overridden (as in ONNX Runtime).
        let graph_inputs: std::collections::HashSet<&String> =
            onnx_model.graph().input.iter().map(|i| &i.name).collect();
        let fed: std::collections::HashSet<String> = onnx_model
            .graph()
            .initializer
            .iter()
            .map(|t| &t.name)
            .filter(|n| example.contains_key(*n) && graph_inputs.contains(n))
            .cloned()
            .collect();
        let mut model = if fed.is_empty() && !merged {
            tract_onnx::onnx().model_for_path(path).map_err(err)?
        } else {
            if external {
                return Err(err(
                    "feeding parameters of a model with external data is not supported on tract; use `backend` ort",
                ));
            }
            onnx_model.graph_mut().initializer.retain(|t| !fed.contains(&t.name));
            let bytes = onnx_model.to_bytes()?;
            tract_onnx::onnx().model_for_read(&mut bytes.as_slice()).map_err(err)?
        };
        let outlets = model.input_outlets().map_err(err)?.to_vec();
        let input_names: Vec<String> = outlets.iter().map(|o| model.node(o.node).name.clone()).collect();
        // Facts from value_info may name a symbolic batch ("batch") that the concrete input
        // shapes below cannot unify with; let tract infer every intermediate from the inputs.
        let input_nodes: Vec<usize> = outlets.iter().map(|o| o.node).collect();
        for id in 0..model.nodes().len() {
            if input_nodes.contains(&id) {
                continue;
            }
            for slot in 0..model.node(id).outputs.len() {
                let o = OutletId::new(id, slot);
                if model.outlet_fact(o).map_err(err)?.value.is_concrete() {
                    continue;
                }
                model.set_outlet_fact(o, InferenceFact::default()).map_err(err)?;
            }
        }
        for (i, name) in input_names.iter().enumerate() {
            let (dt, shape) = example
                .get(name)
                .ok_or_else(|| err(format!("no value given for the graph input '{name}'")))?;
            model
                .set_input_fact(i, InferenceFact::dt_shape(*dt, shape))
                .map_err(err)?;
        }
        let mut wanted = Vec::new();
        for name in outputs {
            let o = model
                .find_outlet_label(name)
                .ok_or_else(|| err(format!("the model has no tensor named '{name}'")))?;
            wanted.push(o);
        }
        model.select_output_outlets(&wanted).map_err(err)?;
        let plan = guarded(|| model.into_optimized().and_then(|m| m.into_runnable()))?.map_err(err)?;
        Ok(Prepared {
            plan,
            input_names,
            outputs: outputs.to_vec(),
        })
    }

    pub fn run(&self, inputs: &Tensors) -> Result<Tensors> {
        let mut feed: TVec<TValue> = tvec!();
        for name in &self.input_names {
            let v = inputs
                .get(name)
                .ok_or_else(|| err(format!("no value given for the graph input '{name}'")))?;
            feed.push(to_tensor(v).into_tvalue());
        }
        let res = guarded(|| self.plan.run(feed))?.map_err(err)?;
        let mut out = Tensors::new();
        for (name, t) in self.outputs.iter().zip(res) {
            out.insert(name.clone(), to_value(name, &t)?);
        }
        Ok(out)
    }
}

thread_local! {
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside a guarded tract call, whose panics become errors: a program's
/// panic hook can stay quiet about them (the error says what happened).
pub fn in_guarded_call() -> bool {
    GUARDED.with(|g| g.get())
}

/// Run `f`, turning a panic inside tract (an unsupported case it asserts on, e.g. a negative
/// GatherND index in tract 0.23) into an error instead of aborting the caller.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T> {
    let outer = GUARDED.with(|g| g.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    r.map_err(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "no message".into());
        err(format!("tract failed on this graph ({what}); use `backend` ort"))
    })
}

pub fn run(path: &Path, inputs: &Tensors, outputs: &[String]) -> Result<Tensors> {
    Prepared::new(path, inputs, outputs)?.run(inputs)
}

/// `runtime::Stepper` on tract: the state is kept in host memory (tract's device) as tract's
/// own reference-counted tensors, by key, fed to each run and taken from its outputs without a
/// copy; one plan per graph and set of feed shapes (a last, partial batch gets its own).
pub struct Stepper {
    graphs: Vec<StepGraph>,
    state: std::collections::BTreeMap<String, TValue>,
    scratch: std::collections::BTreeSet<String>,
    /// The last run's state updates, by key, until `commit`.
    pending: Option<Vec<(String, TValue)>>,
    /// The threads tract's kernels run on (matrix products split by output tiles, element-wise
    /// ops by blocks: the same results as on one thread).
    executor: tract_linalg::multithread::Executor,
}

/// What a `Stepper` keeps of a `GraphSpec`, and its plans.
struct StepGraph {
    path: std::path::PathBuf,
    links: Vec<super::StateLink>,
    /// The key of each state input, by input name.
    key_of: std::collections::HashMap<String, String>,
    fetch: Vec<String>,
    plans: std::collections::HashMap<Vec<Vec<usize>>, Prepared>,
}

impl Stepper {
    pub fn new(spec: crate::StepSpec<'_>, fill: &mut super::Fill<'_>) -> Result<Stepper> {
        spec.writers()?;
        // Parts are written into their state's buffer, in place: ONNX Runtime only.
        if let Some(l) = spec.graphs.iter().flat_map(|g| &g.links).find(|l| l.rows.is_some()) {
            return Err(err(format!(
                "the step graph updates the state '{}' in parts, in place, which tract does not (it keeps two sets)",
                l.key
            )));
        }
        let scratch: std::collections::BTreeSet<String> = spec.scratch.iter().cloned().collect();
        // Zeros already (`ArrayD::zeros` maps zeroed pages): only the first step touches them.
        let zeros: std::collections::BTreeSet<&String> = spec.zeros.iter().collect();
        let mut state = std::collections::BTreeMap::new();
        for g in &spec.graphs {
            for key in g.links.iter().map(|l| &l.key).chain(g.reads.iter().map(|r| &r.key)) {
                if state.contains_key(key) {
                    continue;
                }
                let shape = spec
                    .shapes
                    .get(key)
                    .ok_or_else(|| err(format!("no shape for the state '{key}'")))?;
                let mut a = tract_ndarray::ArrayD::<f32>::zeros(shape.clone());
                if !scratch.contains(key) && !zeros.contains(key) {
                    fill(key, a.view_mut())?;
                }
                state.insert(key.clone(), a.into_tvalue());
            }
        }
        let graphs = spec
            .graphs
            .into_iter()
            .map(|g| StepGraph {
                path: g.path.to_path_buf(),
                key_of: g
                    .links
                    .iter()
                    .map(|l| (l.input.clone(), l.key.clone()))
                    .chain(g.reads.iter().map(|r| (r.input.clone(), r.key.clone())))
                    .collect(),
                links: g.links,
                fetch: g.fetch.to_vec(),
                plans: Default::default(),
            })
            .collect();
        let threads = match spec.threads {
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let executor = match threads {
            0 | 1 => tract_linalg::multithread::Executor::SingleThread,
            n => guarded(|| tract_linalg::multithread::Executor::multithread_with_name(n, "dagr-tract"))?,
        };
        Ok(Stepper {
            graphs,
            state,
            scratch,
            pending: None,
            executor,
        })
    }
}

impl crate::StateStepper for Stepper {
    fn run(&mut self, graph: usize, feed: Tensors) -> Result<Tensors> {
        self.pending = None;
        let state = &self.state;
        let g = self
            .graphs
            .get_mut(graph)
            .ok_or_else(|| err(format!("the step has no graph {graph}")))?;
        let shapes: Vec<Vec<usize>> = feed.values().map(|v| v.shape().to_vec()).collect();
        let plan = match g.plans.entry(shapes) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut facts: Facts = Facts::new();
                for (input, key) in &g.key_of {
                    let v = state
                        .get(key)
                        .ok_or_else(|| err(format!("no value for the state '{key}'")))?;
                    facts.insert(input.clone(), (v.datum_type(), v.shape().to_vec()));
                }
                for (k, v) in &feed {
                    let dt = match v {
                        Value::F32(_) => DatumType::F32,
                        Value::I64(_) => DatumType::I64,
                        Value::Bool(_) => DatumType::Bool,
                    };
                    facts.insert(k.clone(), (dt, v.shape().to_vec()));
                }
                let mut wanted = g.fetch.clone();
                wanted.extend(g.links.iter().map(|l| l.output.clone()));
                e.insert(Prepared::with_facts(&g.path, &facts, &wanted)?)
            }
        };
        let mut inputs: TVec<TValue> = tvec!();
        for name in &plan.input_names {
            let v = match feed.get(name) {
                Some(v) => to_tensor(v).into_tvalue(),
                None => g
                    .key_of
                    .get(name)
                    .and_then(|k| state.get(k))
                    .cloned()
                    .ok_or_else(|| err(format!("no value given for the graph input '{name}'")))?,
            };
            inputs.push(v);
        }
        let executor = self.executor.clone();
        let res = guarded(|| tract_linalg::multithread::multithread_tract_scope(executor, || plan.plan.run(inputs)))?
            .map_err(err)?;
        let mut by_name: std::collections::HashMap<&String, TValue> = plan.outputs.iter().zip(res).collect();
        let mut out = Tensors::new();
        for name in &g.fetch {
            let t = by_name
                .get(name)
                .ok_or_else(|| err(format!("the model has no output '{name}'")))?;
            out.insert(name.clone(), to_value(name, t)?);
        }
        let mut pending = Vec::new();
        for l in &g.links {
            let t = by_name
                .remove(&l.output)
                .ok_or_else(|| err(format!("the model has no output '{}'", l.output)))?;
            pending.push((l.key.clone(), t));
        }
        self.pending = Some(pending);
        Ok(out)
    }

    fn commit(&mut self) {
        if let Some(p) = self.pending.take() {
            self.state.extend(p);
        }
    }

    fn visit_state(&self, f: &mut dyn FnMut(&str, ndarray::ArrayViewD<'_, f32>) -> Result<()>) -> Result<()> {
        for (key, t) in &self.state {
            if !self.scratch.contains(key) {
                f(key, t.to_plain_array_view::<f32>().map_err(err)?)?;
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
            let v = self
                .state
                .remove(key)
                .ok_or_else(|| err(format!("no state or scratch value '{key}'")))?;
            // The only reference once the last run's inputs are gone: no copy.
            let mut t = v.into_tensor();
            let res = match t.to_plain_array_view_mut::<f32>() {
                Ok(view) => f(key, view),
                Err(e) => Err(err(e)),
            };
            self.state.insert(key.clone(), t.into_tvalue());
            res?;
        }
        self.pending = None;
        Ok(())
    }

    /// The shape of each state tensor, by key.
    fn shapes(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        self.state
            .iter()
            .filter(|(k, _)| !self.scratch.contains(*k))
            .map(|(k, t)| (k.clone(), t.shape().to_vec()))
            .collect()
    }

    fn set_state(&mut self, values: &super::StateValues) -> Result<()> {
        for (key, v) in values {
            if self.state.contains_key(key) && !self.scratch.contains(key) {
                self.state.insert(key.clone(), v.clone().into_tvalue());
            }
        }
        self.pending = None;
        Ok(())
    }
}

/// tract as an `Engine`: pure Rust, embedded, on the CPU.
pub struct Tract;

impl crate::Prepared for Prepared {
    fn run(&mut self, inputs: &Tensors) -> Result<Tensors> {
        Prepared::run(self, inputs)
    }
}

impl crate::Engine for Tract {
    fn name(&self) -> &'static str {
        "tract"
    }
    fn run(&self, path: &Path, inputs: &Tensors, outputs: &[String]) -> Result<Tensors> {
        run(path, inputs, outputs)
    }
    fn prepare(&self, path: &Path, example: &Tensors, outputs: &[String]) -> Result<Box<dyn crate::Prepared>> {
        Ok(Box::new(Prepared::new(path, example, outputs)?))
    }
    fn stepper(&self, spec: crate::StepSpec<'_>, fill: &mut crate::Fill<'_>) -> Result<Box<dyn crate::StateStepper>> {
        if spec.device != crate::Device::Cpu {
            return Err(err("tract runs on the CPU only; use `backend` ort `device` cuda"));
        }
        Ok(Box::new(Stepper::new(spec, fill)?))
    }
}
