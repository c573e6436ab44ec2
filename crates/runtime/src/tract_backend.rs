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

/// tract's preparation of a model (`into_optimized`: typing, declutter, codegen) without the
/// declutter pass `ChangeAxes`. That pass tries to push every axis change (each Reshape,
/// Unsqueeze, Transpose and unit axis) through the graph and rebuilds the graph's order for each
/// one it makes: on a 13,300-node step graph of EfficientNet-B0 (B = 4) it made 2,004 changes in
/// 25 of the 28 s that declutter took, and the plan ran no faster for it (a step 0.33 s without,
/// 0.36 s with). Measured with tract 0.23.9.
fn optimize(model: InferenceModel) -> TractResult<TypedModel> {
    let mut typed = model.into_typed()?;
    declutter_passes().optimize(&mut typed)?;
    typed.optimize()?;
    Ok(typed)
}

/// tract's declutter passes less `ChangeAxes` (see `optimize`).
fn declutter_passes() -> tract_onnx::tract_core::optim::Optimizer {
    let mut passes = tract_onnx::tract_core::optim::Optimizer::declutter();
    passes.passes.retain(|p| format!("{p:?}") != "ChangeAxes");
    passes
}

/// An optimized tract plan for fixed input shapes, run as often as needed.
pub struct Prepared {
    plan: std::sync::Arc<TypedSimplePlan>,
    input_names: Vec<String>,
    outputs: Vec<String>,
    /// The outputs handed over as they are made (`run_handing`) instead of kept to the end of the
    /// run: by the node making them, (its output slot, the index in `outputs`).
    handed: std::collections::HashMap<usize, Vec<(usize, usize)>>,
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

/// A `Where` (tract's `Iff`) whose one condition holds for every element, between two inputs of
/// its output's shape and type: the chosen input itself. tract's own walks the three inputs
/// element by element on one thread (a step graph that updates in place writes every state
/// tensor as `Where(accepted, update, state)`: 0.13 s of a 0.8 s step at 138M parameters).
fn picked(node: &TypedNode, values: &TVec<TValue>) -> Option<TValue> {
    if !node.op_is::<tract_onnx::tract_core::ops::logic::Iff>() {
        return None;
    }
    let [cond, t, f] = values.as_slice() else {
        return None;
    };
    let same = t.shape() == f.shape() && t.datum_type() == f.datum_type();
    if !same || cond.len() != 1 || cond.rank() > t.rank() || cond.datum_type() != DatumType::Bool {
        return None;
    }
    let c = *cond.try_as_plain_ram().ok()?.as_slice::<bool>().ok()?.first()?;
    Some(if c { t.clone() } else { f.clone() })
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
        Self::with_facts(path, &facts, outputs, None)
    }

    /// As `new`, from the type and shape of every input that will be fed (no values).
    ///
    /// `in_place`, for a step graph that updates its state in place, names the outputs to hand
    /// to `run_handing`'s callback as soon as they are made, then freed (their value in the run's
    /// result is empty: no rows), and orders the nodes output by output, each output's inputs
    /// first (tract's default runs every node as soon as its inputs are there: a state tensor's
    /// reads that wait for nothing, like the parts' Slices, are all made first and held until
    /// the test; measured at 138M parameters, SGD momentum, in place: 1811 MB against 2238).
    pub fn with_facts(
        path: &Path,
        example: &Facts,
        outputs: &[String],
        in_place: Option<&[String]>,
    ) -> Result<Prepared> {
        let handed = in_place.unwrap_or_default();
        let mut onnx_model = dagr_onnx::load(path)?;
        if let Some(why) = cannot_load(&onnx_model) {
            return Err(err(why));
        }
        let external = !dagr_onnx::io::external_tensors(&onnx_model.proto).is_empty();
        // Repeated computations merged here: tract's own merging of them can leave a reader on
        // a removed node (see `index::merge_duplicates`). A model with external data is read
        // by tract from its file (its data resolved there), as it is.
        let merged = !external && dagr_onnx::index::merge_duplicates(&mut onnx_model) > 0;
        let merged = (!external && int64_casts_to_cast_like(&mut onnx_model) > 0) || merged;
        let merged = (!external && ops_as_bodies(&mut onnx_model)? > 0) || merged;
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
        let mut typed = guarded(|| optimize(model))?.map_err(err)?;
        // A handed output is kept to the end as an empty slice of it, so that tract frees the
        // value after its one reader, which comes right after it is made. Wired after the
        // optimization: tract would push the slice up through the ops making the value (and make
        // nothing).
        let mut handed_by_node: std::collections::HashMap<usize, Vec<(usize, usize)>> = Default::default();
        let mut kept = typed.output_outlets().map_err(err)?.to_vec();
        for (i, name) in outputs.iter().enumerate() {
            if !handed.contains(name) {
                continue;
            }
            let o = kept[i];
            if typed.outlet_fact(o).map_err(err)?.rank() == 0 {
                return Err(err(format!(
                    "the output '{name}' is a scalar and cannot be handed over by rows"
                )));
            }
            handed_by_node.entry(o.node).or_default().push((o.slot, i));
            let empty = tract_onnx::tract_core::ops::array::Slice::new(0, 0, 0);
            kept[i] = typed.wire_node(format!("{name}.handed"), empty, &[o]).map_err(err)?[0];
        }
        if !handed_by_node.is_empty() {
            typed.select_output_outlets(&kept).map_err(err)?;
        }
        let options = RunOptions {
            skip_order_opt_ram: in_place.is_some(),
            ..Default::default()
        };
        let plan = guarded(|| typed.into_runnable_with_options(&options))?.map_err(err)?;
        Ok(Prepared {
            plan,
            input_names,
            outputs: outputs.to_vec(),
            handed: handed_by_node,
        })
    }

    /// Run with the executor's threads, handing each output named in `with_facts`' `handed` to
    /// `on` (its index in `outputs`, its value) as soon as the node making it has run; a `Where`
    /// by one condition gives the chosen input (`picked`).
    fn run_handing(
        &self,
        inputs: TVec<TValue>,
        executor: &tract_linalg::multithread::Executor,
        on: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<TVec<TValue>> {
        let executor = executor.clone();
        let run = || -> TractResult<TVec<TValue>> {
            let mut state = TypedSimpleState::new(&self.plan)?;
            state.run_plan_with_eval(inputs, |ctx, op_state, node, values| -> TractResult<TVec<TValue>> {
                let made = match picked(node, &values) {
                    Some(v) => tvec!(v),
                    None => tract_onnx::tract_core::plan::eval(ctx, op_state, node, values)?,
                };
                for &(slot, i) in self.handed.get(&node.id).into_iter().flatten() {
                    let v = made.get(slot).ok_or_else(|| {
                        tract_onnx::tract_core::internal::format_err!("node {} made no output {slot}", node.name)
                    })?;
                    on(i, v).map_err(|e| tract_onnx::tract_core::internal::format_err!("{e}"))?;
                }
                Ok(made)
            })
        };
        guarded(|| tract_linalg::multithread::multithread_tract_scope(executor, run))?.map_err(err)
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
///
/// A graph that updates its state in place (`GraphSpec::in_place`: its every write comes after
/// every read of what it writes, gated on the step's acceptance) keeps one set: the tensors it
/// writes whole are handed to the run by value, so tract frees each after its last reader and its
/// output becomes the state; the tensors it writes in parts stay here and each part is written
/// into its rows as soon as it is made (`Prepared::run_handing`), so that the update holds one
/// part's temporaries at a time. Otherwise two sets: the outputs become the state on `commit`.
pub struct Stepper {
    graphs: Vec<StepGraph>,
    state: std::collections::BTreeMap<String, TValue>,
    scratch: std::collections::BTreeSet<String>,
    /// The last run's state updates, by key, until `commit`.
    pending: Option<Vec<(String, TValue)>>,
    /// The keys an in-place run took and did not give back (it failed): the state is incomplete.
    lost: Vec<String>,
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
    in_place: bool,
    plans: std::collections::HashMap<Vec<Vec<usize>>, Prepared>,
}

impl Stepper {
    pub fn new(spec: crate::StepSpec<'_>, fill: &mut super::Fill<'_>) -> Result<Stepper> {
        spec.writers()?;
        if let Some(l) = spec
            .graphs
            .iter()
            .filter(|g| !g.in_place)
            .flat_map(|g| &g.links)
            .find(|l| l.rows.is_some())
        {
            return Err(err(format!(
                "the step graph updates the state '{}' in parts but not in place: a part is written into its state's rows, which two sets cannot",
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
                in_place: g.in_place,
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
            lost: Vec::new(),
            executor,
        })
    }

    /// An error where a failed in-place run left the state incomplete.
    fn whole(&self) -> Result<()> {
        match self.lost.first() {
            None => Ok(()),
            Some(key) => Err(err(format!(
                "the state ('{key}' and {} more) was lost when an in-place step failed: restart from the last checkpoint",
                self.lost.len() - 1
            ))),
        }
    }
}

/// Write `part` into rows `[start, end)` of `state`, whose other readers all ran before.
fn write_rows(key: &str, state: &Tensor, (start, end): (usize, usize), part: &Tensor) -> Result<()> {
    let shape = state.shape();
    let fits = shape.first().is_some_and(|&n| end <= n && start <= end)
        && part.shape().first() == Some(&(end - start))
        && part.shape()[1..] == shape[1..];
    if !fits {
        return Err(err(format!(
            "a part of the state '{key}' has shape {:?}, not rows {start}..{end} of {:?}",
            part.shape(),
            shape
        )));
    }
    let plain = part.try_as_plain_ram().map_err(err)?;
    let src = plain.as_slice::<f32>().map_err(err)?;
    let row: usize = shape[1..].iter().product();
    let dst = state.as_ptr::<f32>().map_err(err)?;
    // SAFETY: `dst` is this stepper's own buffer of `shape`'s elements, shared with the run only
    // as an input, which tract never writes (another reference to it is held here); the rows
    // written are in bounds (checked above) and not read again in this run: the step graph writes
    // a part after every read of its rows (`step_graph::state_written_last`), and tract runs
    // nodes in an order of their dependencies, one at a time (this runs between two nodes, with
    // no borrow of the buffer's data alive).
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), (dst as *mut f32).add(start * row), src.len());
    }
    Ok(())
}

impl crate::StateStepper for Stepper {
    fn run(&mut self, graph: usize, feed: Tensors) -> Result<Tensors> {
        self.whole()?;
        self.pending = None;
        let g = self
            .graphs
            .get_mut(graph)
            .ok_or_else(|| err(format!("the step has no graph {graph}")))?;
        let shapes: Vec<Vec<usize>> = feed.values().map(|v| v.shape().to_vec()).collect();
        // In place: the parts written into their rows, the whole writes taken by value.
        let parts: Vec<&super::StateLink> = g.links.iter().filter(|l| g.in_place && l.rows.is_some()).collect();
        let plan = match g.plans.entry(shapes) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut facts: Facts = Facts::new();
                for (input, key) in &g.key_of {
                    let v = self
                        .state
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
                let handed: Vec<String> = parts.iter().map(|l| l.output.clone()).collect();
                let in_place = g.in_place.then_some(handed.as_slice());
                e.insert(Prepared::with_facts(&g.path, &facts, &wanted, in_place)?)
            }
        };
        let by_value: std::collections::BTreeSet<&String> = g
            .links
            .iter()
            .filter(|l| g.in_place && l.rows.is_none())
            .map(|l| &l.key)
            .collect();
        // Every input found before any state is taken.
        let mut keys = Vec::new();
        for name in plan.input_names.iter().filter(|n| !feed.contains_key(*n)) {
            let key = g
                .key_of
                .get(name)
                .ok_or_else(|| err(format!("no value given for the graph input '{name}'")))?;
            if !self.state.contains_key(key) {
                return Err(err(format!("no value for the state '{key}'")));
            }
            keys.push(key);
        }
        let mut keys = keys.into_iter();
        let mut inputs: TVec<TValue> = tvec!();
        let mut taken = Vec::new();
        for name in &plan.input_names {
            let v = match feed.get(name) {
                Some(v) => Some(to_tensor(v).into_tvalue()),
                None => match keys.next() {
                    Some(key) if by_value.contains(key) => {
                        taken.push(key.clone());
                        self.state.remove(key)
                    }
                    key => key.and_then(|k| self.state.get(k).cloned()),
                },
            };
            inputs.push(v.ok_or_else(|| err(format!("no value given for the graph input '{name}'")))?);
        }
        let state = &self.state;
        // The plan's outputs are the fetched ones, then one per link, in order.
        let links = &g.links;
        let fetched = g.fetch.len();
        let mut write = |i: usize, part: &Tensor| -> Result<()> {
            let link = i.checked_sub(fetched).and_then(|j| links.get(j));
            match link.and_then(|l| Some((l, l.rows?))) {
                Some((l, rows)) if l.output == plan.outputs[i] => {
                    let buf = state
                        .get(&l.key)
                        .ok_or_else(|| err(format!("no value for the state '{}'", l.key)))?;
                    write_rows(&l.key, buf, rows, part)
                }
                _ => Err(err(format!(
                    "the output '{}' is not a part of the state",
                    plan.outputs[i]
                ))),
            }
        };
        let res = match plan.run_handing(inputs, &self.executor, &mut write) {
            Ok(res) => res,
            Err(e) => {
                self.lost = taken;
                return Err(e);
            }
        };
        let mut by_name: std::collections::HashMap<&String, TValue> = plan.outputs.iter().zip(res).collect();
        let mut out = Tensors::new();
        for name in &g.fetch {
            let t = by_name
                .get(name)
                .ok_or_else(|| err(format!("the model has no output '{name}'")))?;
            out.insert(name.clone(), to_value(name, t)?);
        }
        let mut pending = Vec::new();
        for l in g.links.iter().filter(|l| !(g.in_place && l.rows.is_some())) {
            let t = by_name
                .remove(&l.output)
                .ok_or_else(|| err(format!("the model has no output '{}'", l.output)))?;
            match g.in_place {
                true => {
                    self.state.insert(l.key.clone(), t);
                }
                false => pending.push((l.key.clone(), t)),
            }
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
        self.whole()?;
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
        self.whole()?;
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
            let lost = self.lost.contains(key);
            if (lost || self.state.contains_key(key)) && !self.scratch.contains(key) {
                self.state.insert(key.clone(), v.clone().into_tvalue());
            }
        }
        // A state replaced whole is whole again.
        self.lost.retain(|k| !self.state.contains_key(k));
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

/// The operators tract 0.23.9 cannot run, written in other standard ops (their entries'
/// portable forms, `dagr_ops::expand_bodies`): Attention, which it parses but stops at
/// "Operator can not be made a TypedOp" (in every jax2onnx transformer at its default opset 23),
/// as the primitives of its ONNX function body, the same body its gradient is built through;
/// LpPool and GlobalLpPool likewise; SoftmaxCrossEntropyLoss and NegativeLogLikelihoodLoss
/// (a PyTorch model exported with its own `F.cross_entropy`) as LogSoftmax, GatherElements and
/// reductions.
const NOT_IN_TRACT: &[&str] = &[
    "Attention",
    "LpPool",
    "GlobalLpPool",
    "SoftmaxCrossEntropyLoss",
    "NegativeLogLikelihoodLoss",
];

fn ops_as_bodies(model: &mut dagr_onnx::Model) -> Result<usize> {
    let present = model
        .graph()
        .node
        .iter()
        .any(|n| n.domain.is_empty() && NOT_IN_TRACT.contains(&n.op_type.as_str()));
    if !present {
        return Ok(0);
    }
    let idx = dagr_ops::index(model)?;
    dagr_ops::expand_bodies(model, &idx, |op| NOT_IN_TRACT.contains(&op))
}

/// Give tract each Cast to int64 as a CastLike of an int64 scalar. tract 0.23 reads ONNX's Cast
/// to int64 as a cast to its symbolic dim type, which holds an int64 through 32 bits where it
/// computes the value while analysing the graph, and which CumSum cannot sum: the torch dynamo
/// exporter's `x[:, 0]` ends its Slice at `Cast(Constant(INT64_MAX))`, which tract read as -1
/// (a dynamo-exported ViT or Swin ran on tract with one sample fewer than it was fed, its logits
/// [3, 10] for a batch of 4, and its training graph failed to load), and RoBERTa's position ids
/// are a CumSum of a Cast to int64 ("TDim is not a number"). tract's CastLike casts to the
/// type of its second input, a plain int64. The graph is the runtime's copy; the model file is
/// not changed. Returns how many were replaced.
fn int64_casts_to_cast_like(model: &mut dagr_onnx::Model) -> usize {
    use dagr_onnx::dtype::INT64;
    let like = dagr_onnx::builder::NameGen::for_model(model).fresh("dagr/tract/int64");
    let mut replaced = 0;
    for n in model.graph_mut().node.iter_mut() {
        let to_int64 = n.attribute.iter().any(|a| a.name == "to" && a.i == INT64 as i64);
        if n.op_type == "Cast" && (n.domain.is_empty() || n.domain == "ai.onnx") && to_int64 && n.input.len() == 1 {
            n.op_type = "CastLike".into();
            n.attribute.clear();
            n.input.push(like.clone());
            replaced += 1;
        }
    }
    if replaced > 0 {
        model
            .graph_mut()
            .initializer
            .push(dagr_onnx::tensor::i64_tensor(&like, &[], &[0]));
    }
    replaced
}

#[cfg(test)]
mod tests {
    /// `ChangeAxes` is found by name; a tract that renames it would keep it (slower start-up).
    #[test]
    fn declutter_leaves_out_change_axes_and_only_it() {
        let all = tract_onnx::tract_core::optim::Optimizer::declutter().passes;
        assert!(all.iter().any(|p| format!("{p:?}") == "ChangeAxes"));
        assert_eq!(super::declutter_passes().passes.len() + 1, all.len());
    }
}
