//! Shape inference with value propagation, one rule per operator.
//!
//! Every tensor gets a fact (element type and shape, each dimension known, symbolic or
//! unknown). Small integer tensors also get their **value**, element by element, each element a
//! known integer or a symbolic dimension expression: `Shape(x)` of a `[batch, 7, 32]` tensor is
//! `[batch, 7, 32]`, `Gather(Shape(x), 0) * 7` is `7*batch`, and a `Reshape` to
//! `Concat(Unsqueeze(that), [-1])` has the shape `[7*batch, 32]`. That is how exporters write
//! shapes (`view(b, -1)`, `chunk`, `expand`, RNN initial states), and why a shape tensor must be
//! evaluated rather than only typed. ONNX Runtime's `symbolic_shape_infer.py` is the model.
//!
//! The model's own value_info is kept; an inferred fact only fills what it leaves out (a whole
//! shape, or single unknown dims). Ops without a rule leave their outputs unknown, which callers
//! treat as "shape not known", never as an error. Rules read inputs whether an opset passes a
//! value as an attribute or as an input (`axes`, `split`, `pads`), so one rule covers the
//! opsets without version branches.

use dagr_onnx::attr::{attr, attr_i, attr_ints};
use dagr_onnx::dim::Dim;
use dagr_onnx::index::{GraphIndex, Known, ValueFact};
use dagr_onnx::proto::NodeProto;
use dagr_onnx::{dtype, tensor, Model};
use std::collections::HashMap;

/// The largest integer tensor whose value is tracked (shape tensors are short).
pub const MAX_VALUE_LEN: usize = 64;

/// A rule fills the facts (and values) of a node's outputs from those of its inputs; `None`
/// when what it needs is not known. Each operator's rule is in its registry entry.
pub type Rule = fn(&mut Node) -> Option<()>;

/// The operators that have an inference rule.
pub fn supported_ops() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = crate::registry()
        .iter()
        .filter(|o| o.infer.is_some())
        .map(|o| o.op)
        .collect();
    v.sort();
    v
}

/// The rule of the many operators whose output is shaped and typed like their first input.
pub(crate) fn same(c: &mut Node) -> Option<()> {
    c.same(0, 0);
    Some(())
}

/// A node being inferred: reads the facts of its inputs, writes those of its outputs.
pub struct Node<'a> {
    pub n: &'a NodeProto,
    pub opset: i64,
    facts: &'a HashMap<String, ValueFact>,
    known: &'a Known,
    out: Vec<Option<ValueFact>>,
    out_values: Vec<Option<Vec<Dim>>>,
    out_seq: Vec<Option<Vec<ValueFact>>>,
    out_floats: Vec<Option<Vec<f64>>>,
}

impl<'a> Node<'a> {
    fn name(&self, i: usize) -> Option<&'a str> {
        self.n.input.get(i).map(String::as_str).filter(|s| !s.is_empty())
    }
    pub fn has(&self, i: usize) -> bool {
        self.name(i).is_some()
    }
    pub fn inputs(&self) -> usize {
        self.n.input.len()
    }
    pub fn fact(&self, i: usize) -> Option<&'a ValueFact> {
        self.name(i).and_then(|s| self.facts.get(s))
    }
    pub fn shape(&self, i: usize) -> Option<Vec<Dim>> {
        self.fact(i).and_then(|f| f.shape.clone())
    }
    pub fn dtype(&self, i: usize) -> i32 {
        self.fact(i).map(|f| f.dtype).unwrap_or(0)
    }
    /// The value of an integer input, each element known or symbolic.
    pub fn value(&self, i: usize) -> Option<Vec<Dim>> {
        self.name(i).and_then(|s| self.known.values.get(s)).cloned()
    }
    /// The value of an integer input when every element is known.
    pub fn ints(&self, i: usize) -> Option<Vec<i64>> {
        self.value(i)?.iter().map(Dim::known).collect()
    }
    pub fn floats(&self, i: usize) -> Option<Vec<f64>> {
        let name = self.name(i)?;
        if let Some(f) = self.known.floats.get(name) {
            return Some(f.clone());
        }
        Some(self.ints(i)?.iter().map(|&v| v as f64).collect())
    }
    pub fn sequence(&self, i: usize) -> Option<&'a Vec<ValueFact>> {
        self.name(i).and_then(|s| self.known.sequences.get(s))
    }
    /// An integer list given as input `i` (newer opsets) or as attribute `name` (older ones);
    /// `Some(None)` when neither is present, `None` when the input is there but not known.
    pub fn ints_or_attr(&self, i: usize, name: &str) -> Option<Option<Vec<i64>>> {
        if self.has(i) {
            return self.ints(i).map(Some);
        }
        Some(attr_ints(self.n, name))
    }
    pub fn attr_i(&self, name: &str, default: i64) -> i64 {
        attr_i(self.n, name).unwrap_or(default)
    }
    pub fn attr_ints(&self, name: &str) -> Option<Vec<i64>> {
        attr_ints(self.n, name)
    }
    pub fn attr_s(&self, name: &str) -> Option<String> {
        dagr_onnx::attr::attr_s(self.n, name)
    }
    pub fn attr_f(&self, name: &str) -> Option<f32> {
        dagr_onnx::attr::attr_f(self.n, name)
    }

    pub fn set(&mut self, o: usize, dtype: i32, shape: Option<Vec<Dim>>) {
        if o < self.out.len() {
            self.out[o] = Some(ValueFact { dtype, shape });
        }
    }
    /// Output `o` has input `i`'s fact.
    pub fn same(&mut self, o: usize, i: usize) {
        let f = self.fact(i).cloned().unwrap_or_default();
        self.set(o, f.dtype, f.shape);
    }
    pub fn set_value(&mut self, o: usize, v: Vec<Dim>) {
        if o < self.out_values.len() && v.len() <= MAX_VALUE_LEN {
            self.out_values[o] = Some(v);
        }
    }
    pub fn set_floats(&mut self, o: usize, v: Vec<f64>) {
        if o < self.out_floats.len() && v.len() <= MAX_VALUE_LEN {
            self.out_floats[o] = Some(v);
        }
    }
    pub fn set_sequence(&mut self, o: usize, elems: Vec<ValueFact>) {
        if o < self.out_seq.len() {
            self.out_seq[o] = Some(elems);
        }
    }
    pub fn outputs(&self) -> usize {
        self.n.output.len()
    }

    /// The facts of a subgraph's outputs (an If branch, a Loop or Scan body), inferred through
    /// its nodes from the facts of its inputs (`inputs`, in the order of the body's; None where
    /// not known) and the facts and values of the outer tensors it reads (their symbolic dims
    /// are the outer graph's); None for an output whose fact stays unknown. The body's own declared shapes
    /// are left out (their symbolic names are the body's own); its declared types are kept.
    pub fn infer_body(&self, g: &dagr_onnx::proto::GraphProto, inputs: &[Option<ValueFact>]) -> Vec<Option<ValueFact>> {
        let mut body = g.clone();
        body.value_info.clear();
        for o in body.output.iter_mut() {
            let dtype = o
                .type_
                .as_ref()
                .and_then(ValueFact::from_type_proto)
                .map(|f| f.dtype)
                .unwrap_or(0);
            *o = ValueFact { dtype, shape: None }.to_value_info(&o.name);
        }
        let mut proto = dagr_onnx::proto::ModelProto::new();
        let mut op = dagr_onnx::proto::OperatorSetIdProto::new();
        op.version = self.opset;
        proto.opset_import.push(op);
        proto.graph = Some(body).into();
        let sub = Model {
            proto,
            base_dir: std::path::PathBuf::new(),
            source: None,
        };
        let Ok(mut idx) = GraphIndex::declared(&sub) else {
            return vec![None; g.output.len()];
        };
        // The body's own inputs (a Loop's or Scan's), as the caller knows them from outside.
        for (v, f) in g.input.iter().zip(inputs) {
            if let Some(f) = f {
                idx.facts.insert(v.name.clone(), f.clone());
            }
        }
        let mut known = constants(&sub);
        for r in sub.graph().node.iter().flat_map(dagr_onnx::index::node_reads) {
            if idx.producer.contains_key(&r) || idx.initializers.contains(&r) {
                continue;
            }
            if let Some(f) = self.facts.get(&r) {
                idx.facts.entry(r.clone()).or_insert_with(|| f.clone());
            }
            if let Some(v) = self.known.values.get(&r) {
                known.values.entry(r.clone()).or_insert_with(|| v.clone());
            }
            if let Some(v) = self.known.floats.get(&r) {
                known.floats.entry(r.clone()).or_insert_with(|| v.clone());
            }
        }
        infer_from(&sub, &mut idx, known);
        g.output.iter().map(|o| idx.fact(&o.name).cloned()).collect()
    }
}

/// Normalize a possibly negative axis for `rank` dims; `None` when out of range.
pub fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    (0..r).contains(&a).then_some(a as usize)
}

/// Numpy-style broadcast of several shapes.
pub fn broadcast(shapes: &[Vec<Dim>]) -> Vec<Dim> {
    let rank = shapes.iter().map(Vec::len).max().unwrap_or(0);
    (0..rank)
        .map(|i| {
            let mut out = Dim::Known(1);
            for s in shapes {
                let off = rank - s.len();
                if i < off {
                    continue;
                }
                let d = &s[i - off];
                out = match (&out, d) {
                    (Dim::Known(1), _) => d.clone(),
                    (_, Dim::Known(1)) => out,
                    (a, b) if a == b => out,
                    (Dim::Known(_), _) => out,
                    (_, Dim::Known(_)) => d.clone(),
                    _ => Dim::Unknown,
                };
            }
            out
        })
        .collect()
}

/// Record the value of a constant tensor `t` named `name` (integers, booleans, small floats).
fn take_constant(k: &mut Known, name: &str, t: &dagr_onnx::proto::TensorProto, base_dir: &std::path::Path) {
    if tensor::numel(t) > MAX_VALUE_LEN {
        return;
    }
    match t.data_type {
        dtype::INT64 | dtype::INT32 => {
            if let Ok(v) = tensor::to_i64(t, base_dir) {
                k.values
                    .insert(name.to_string(), v.into_iter().map(Dim::Known).collect());
            }
        }
        dtype::BOOL => {
            let v: Vec<Dim> = if t.int32_data.is_empty() {
                t.raw_data.iter().map(|&b| Dim::Known((b != 0) as i64)).collect()
            } else {
                t.int32_data.iter().map(|&b| Dim::Known((b != 0) as i64)).collect()
            };
            if v.len() == tensor::numel(t) {
                k.values.insert(name.to_string(), v);
            }
        }
        t2 if dtype::is_float(t2) => {
            if let Ok(v) = tensor::to_f32(t, base_dir) {
                k.floats
                    .insert(name.to_string(), v.into_iter().map(f64::from).collect());
            }
        }
        _ => {}
    }
}

/// Integer and float constants: initializers and Constant nodes.
fn constants(model: &Model) -> Known {
    let g = model.graph();
    let mut k = Known::default();
    for t in &g.initializer {
        take_constant(&mut k, &t.name, t, &model.base_dir);
    }
    for n in &g.node {
        if n.op_type != "Constant" || !n.domain.is_empty() || n.output.is_empty() {
            continue;
        }
        let o = n.output[0].as_str();
        if let Some(t) = attr(n, "value").and_then(|a| a.t.as_ref()) {
            take_constant(&mut k, o, t, &model.base_dir);
        } else if let Some(a) = attr(n, "value_ints") {
            k.values
                .insert(o.to_string(), a.ints.iter().map(|&v| Dim::Known(v)).collect());
        } else if let Some(a) = attr(n, "value_int") {
            k.values.insert(o.to_string(), vec![Dim::Known(a.i)]);
        } else if let Some(a) = attr(n, "value_float") {
            k.floats.insert(o.to_string(), vec![a.f as f64]);
        } else if let Some(a) = attr(n, "value_floats") {
            k.floats
                .insert(o.to_string(), a.floats.iter().map(|&v| v as f64).collect());
        }
    }
    k
}

/// Fill the facts of `idx` in topological order, and return the values learnt on the way.
pub fn infer(model: &Model, idx: &mut GraphIndex) -> Known {
    infer_from(model, idx, constants(model))
}

/// `infer`, from values already known (a subgraph's: its constants and what it reads from the
/// outer scope).
fn infer_from(model: &Model, idx: &mut GraphIndex, mut known: Known) -> Known {
    let opset = model.opset();
    let g = model.graph();
    for &i in &idx.topo.clone() {
        let n = &g.node[i];
        let Some(entry) = crate::lookup(&n.domain, &n.op_type).filter(|e| e.covers(opset)) else {
            continue;
        };
        let Some(rule) = entry.infer else {
            continue;
        };
        let k = n.output.len();
        let mut node = Node {
            n,
            opset,
            facts: &idx.facts,
            known: &known,
            out: vec![None; k],
            out_values: vec![None; k],
            out_seq: vec![None; k],
            out_floats: vec![None; k],
        };
        let _ = rule(&mut node);
        let (out, values, seqs, floats) = (node.out, node.out_values, node.out_seq, node.out_floats);
        for (j, o) in n.output.iter().enumerate() {
            if o.is_empty() {
                continue;
            }
            if let Some(f) = &out[j] {
                merge(idx.facts.entry(o.clone()).or_default(), f);
            }
            if let Some(v) = &values[j] {
                known.values.entry(o.clone()).or_insert_with(|| v.clone());
            }
            if let Some(f) = &floats[j] {
                known.floats.entry(o.clone()).or_insert_with(|| f.clone());
            }
            if let Some(s) = &seqs[j] {
                known.sequences.insert(o.clone(), s.clone());
            }
        }
    }
    known
}

/// An inferred fact fills what the declared one leaves out: the type, the shape, or single
/// unknown dims of a shape of the same rank. Where the two contradict each other (another rank,
/// or a dimension both know as different numbers), the declaration is wrong: the operators
/// compute the inferred shape from the graph's inputs (jax2onnx declares NHWC shapes for the
/// NCHW tensors between the convolutions it keeps in NCHW; ONNX Runtime loads such a model
/// and ignores them). A declared symbolic dimension is kept where nothing contradicts it.
fn merge(old: &mut ValueFact, new: &ValueFact) {
    if old.dtype == 0 {
        old.dtype = new.dtype;
    }
    match (&mut old.shape, &new.shape) {
        (None, s) => old.shape = s.clone(),
        (Some(o), Some(n)) if o.len() == n.len() => {
            let contradicts = o
                .iter()
                .zip(n)
                .any(|(a, b)| matches!((a, b), (Dim::Known(x), Dim::Known(y)) if x != y));
            for (a, b) in o.iter_mut().zip(n) {
                if contradicts && !b.is_unknown() || a.is_unknown() {
                    *a = b.clone();
                }
            }
        }
        (Some(o), Some(n)) if n.iter().all(|d| !d.is_unknown()) => *o = n.clone(),
        _ => {}
    }
}

/// Check a graph this tool built before it is written: every input a node reads exists, every
/// graph output is computed, and the node invariants that inference can see hold (a Reshape
/// target with at most one -1, a ScatterND whose updates have the rank its indices require).
/// A failure is this tool's bug, reported as an internal error naming the node.
pub fn check(model: &Model) -> dagr_onnx::error::Result<()> {
    match violation(model)? {
        Some(what) => Err(dagr_onnx::error::Error::Internal(format!("the graph built has {what}"))),
        None => Ok(()),
    }
}

/// `check` on a model as given, before anything is built on it: a violation there is the
/// exporter's (jax2onnx can write a Concat of float32 and float64 tensors, which no runtime
/// loads), said as such.
pub fn check_given(model: &Model) -> dagr_onnx::error::Result<()> {
    match violation(model)? {
        Some(what) => Err(dagr_onnx::error::Error::InvalidModel(format!(
            "the model is invalid as given, before any rewrite: it has {what}\n  hint: no runtime can load it (onnx.checker.check_model(model, full_check=True) says the same); re-export it, and report it to the exporter"
        ))),
        None => Ok(()),
    }
}

/// The first invariant `check` finds broken, said as "an invalid Concat node 'x': ...".
fn violation(model: &Model) -> dagr_onnx::error::Result<Option<String>> {
    let idx = crate::index(model)?;
    let g = model.graph();
    let bad = |n: &NodeProto, what: String| Ok(Some(format!("an invalid {} node '{}': {what}", n.op_type, n.name)));
    let opset = model.opset();
    let mut defined: std::collections::HashSet<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
    defined.extend(g.initializer.iter().map(|t| t.name.as_str()));
    for &i in &idx.topo {
        let n = &g.node[i];
        if let Some(missing) = n.input.iter().find(|s| !s.is_empty() && !defined.contains(s.as_str())) {
            return bad(n, format!("it reads '{missing}', which nothing defines"));
        }
        defined.extend(n.output.iter().map(String::as_str));
        // An operator the model's opset does not have yet (a rule's Expand in an opset-7 model).
        if n.domain.is_empty() || n.domain == "ai.onnx" {
            let since = crate::schemas::VERSIONS
                .iter()
                .find(|(o, _)| *o == n.op_type)
                .and_then(|(_, v)| v.first());
            if let Some(&since) = since.filter(|&&v| opset > 0 && v > opset) {
                return bad(
                    n,
                    format!("{} exists from opset {since} on, and the model's is {opset}", n.op_type),
                );
            }
        }
        match n.op_type.as_str() {
            "Reshape" => {
                if let Some(v) = n.input.get(1).and_then(|t| idx.value(t)) {
                    if v.iter().filter(|d| **d == Dim::Known(-1)).count() > 1 {
                        return bad(n, format!("its target shape {v:?} has more than one -1"));
                    }
                }
            }
            "ScatterND" => {
                let rank = |k: usize| n.input.get(k).and_then(|t| idx.fact(t)).and_then(|f| f.shape.clone());
                if let (Some(d), Some(ix), Some(u)) = (rank(0), rank(1), rank(2)) {
                    if let Some(k) = ix.last().and_then(Dim::known) {
                        let want = ix.len() - 1 + d.len().saturating_sub(k as usize);
                        if u.len() != want {
                            return bad(
                                n,
                                format!("its updates have rank {}, but data of rank {} and indices of shape {ix:?} need rank {want}", u.len(), d.len()),
                            );
                        }
                    }
                }
            }
            _ => {}
        }
        // An `axis` attribute within the rank its op allows (a rule that miscounts the axes of
        // a tensor it made: every runtime refuses to load the graph).
        let rank_of = |k: usize| {
            n.input
                .get(k)
                .and_then(|t| idx.fact(t))
                .and_then(|f| f.shape.as_ref())
                .map(|s| s.len() as i64)
        };
        let axis_range = match n.op_type.as_str() {
            "Gather" | "GatherElements" | "ScatterElements" | "Concat" | "Split" | "Softmax" | "LogSoftmax"
            | "Hardmax" | "ArgMax" | "ArgMin" | "Compress" => rank_of(0).map(|r| (-r, r - 1)),
            "Flatten" => rank_of(0).map(|r| (-r, r)),
            _ => None,
        };
        if let (Some((lo, hi)), Some(a)) = (axis_range, dagr_onnx::attr::attr(n, "axis").map(|a| a.i)) {
            if !(lo..=hi).contains(&a) {
                return bad(n, format!("its axis {a} is outside [{lo}, {hi}] for its input's rank"));
            }
        }
        // Inputs that the op's signature types alike (T) must be of one type.
        let same_type: &[usize] = match n.op_type.as_str() {
            "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" | "Sum" | "Mean" | "MatMul" | "Gemm" | "Concat" | "Equal"
            | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "PRelu" => &[0, 1, 2, 3, 4, 5, 6, 7],
            "Where" => &[1, 2],
            "LayerNormalization" | "InstanceNormalization" | "BatchNormalization" | "Conv" | "ConvTranspose" => {
                &[0, 1, 2]
            }
            _ => &[],
        };
        let types: Vec<(&String, i32)> = same_type
            .iter()
            .filter_map(|&k| n.input.get(k).filter(|t| !t.is_empty()))
            .filter_map(|t| idx.fact(t).map(|f| (t, f.dtype)).filter(|(_, d)| *d != 0))
            .collect();
        if let Some((t, d)) = types.iter().find(|(_, d)| *d != types[0].1) {
            return bad(
                n,
                format!(
                    "its inputs '{}' ({}) and '{t}' ({}) must be of one type",
                    types[0].0,
                    dagr_onnx::dtype::name(types[0].1),
                    dagr_onnx::dtype::name(*d)
                ),
            );
        }
    }
    if let Some(o) = g.output.iter().find(|o| !defined.contains(o.name.as_str())) {
        return Ok(Some(format!("an output '{}' that nothing computes", o.name)));
    }
    Ok(None)
}
