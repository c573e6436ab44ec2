//! A read-only index over a graph: who produces and who consumes each tensor, a topological
//! order, and the value facts (element type and shape, symbolic dims included) of every tensor,
//! taken from the model's own value_info and completed by our shape inference.

use crate::error::{Error, Result};
use crate::proto::{GraphProto, NodeProto, TypeProto, ValueInfoProto};
use crate::Model;
use std::collections::{HashMap, HashSet, VecDeque};

pub use crate::dim::Dim;

/// What is known of a tensor: its element type and, if known, its shape.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValueFact {
    /// ONNX element type (0 when unknown).
    pub dtype: i32,
    pub shape: Option<Vec<Dim>>,
}

impl ValueFact {
    pub fn new(dtype: i32, shape: Vec<Dim>) -> Self {
        ValueFact {
            dtype,
            shape: Some(shape),
        }
    }
    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(Vec::len)
    }
    pub fn shape_string(&self) -> String {
        match &self.shape {
            Some(s) => format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
            None => "[?]".into(),
        }
    }
    pub fn from_type_proto(t: &TypeProto) -> Option<ValueFact> {
        if !t.has_tensor_type() {
            return None;
        }
        let tt = t.tensor_type();
        let shape = tt.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| {
                    if d.has_dim_value() {
                        Dim::Known(d.dim_value())
                    } else if d.has_dim_param() && !d.dim_param().is_empty() {
                        Dim::sym(d.dim_param())
                    } else {
                        Dim::Unknown
                    }
                })
                .collect()
        });
        Some(ValueFact {
            dtype: tt.elem_type,
            shape,
        })
    }

    /// A `ValueInfoProto` carrying this fact.
    pub fn to_value_info(&self, name: &str) -> ValueInfoProto {
        use crate::proto::{tensor_shape_proto::Dimension, type_proto, TensorShapeProto};
        let mut tt = type_proto::Tensor::new();
        tt.elem_type = self.dtype;
        if let Some(s) = &self.shape {
            let mut sp = TensorShapeProto::new();
            for d in s {
                let mut dim = Dimension::new();
                match d {
                    Dim::Known(v) => dim.set_dim_value(*v),
                    Dim::Sym(p) => dim.set_dim_param(p.to_string()),
                    Dim::Unknown => {}
                }
                sp.dim.push(dim);
            }
            tt.shape = protobuf::MessageField::some(sp);
        }
        let mut tp = TypeProto::new();
        tp.set_tensor_type(tt);
        let mut vi = ValueInfoProto::new();
        vi.name = name.to_string();
        vi.type_ = protobuf::MessageField::some(tp);
        vi
    }
}

/// What inference knows besides each tensor's fact: small integer values and the elements of
/// sequences.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Small integer tensors (shape computations): their elements, row-major.
    pub values: HashMap<String, Vec<Dim>>,
    /// Small float constants (Resize scales, OneHot depth).
    pub floats: HashMap<String, Vec<f64>>,
    /// The facts of a sequence's elements, where their number is known.
    pub sequences: HashMap<String, Vec<ValueFact>>,
}

/// Index over the main graph of a model.
#[derive(Debug, Clone)]
pub struct GraphIndex {
    /// tensor -> (node index, output slot)
    pub producer: HashMap<String, (usize, usize)>,
    /// tensor -> consuming node indices (a node appears once per tensor even if it uses it twice)
    pub consumers: HashMap<String, Vec<usize>>,
    pub initializers: HashSet<String>,
    pub graph_inputs: Vec<String>,
    pub graph_outputs: Vec<String>,
    /// Nodes in an order where every producer precedes its consumers.
    pub topo: Vec<usize>,
    pub facts: HashMap<String, ValueFact>,
    /// Values of small integer tensors (shape computations), float constants and sequences.
    pub known: Known,
}

/// Every tensor name a node reads, including names its subgraphs capture from the outer scope.
pub fn node_reads(n: &NodeProto) -> Vec<String> {
    let mut out: Vec<String> = n.input.iter().filter(|s| !s.is_empty()).cloned().collect();
    for a in &n.attribute {
        let mut gs: Vec<&GraphProto> = a.graphs.iter().collect();
        if let Some(g) = a.g.as_ref() {
            gs.push(g);
        }
        for g in gs {
            let local: HashSet<&str> = g
                .node
                .iter()
                .flat_map(|n| n.output.iter().map(String::as_str))
                .chain(g.input.iter().map(|i| i.name.as_str()))
                .chain(g.initializer.iter().map(|i| i.name.as_str()))
                .collect();
            for inner in &g.node {
                for r in node_reads(inner) {
                    if !local.contains(r.as_str()) {
                        out.push(r);
                    }
                }
            }
        }
    }
    out
}

impl GraphIndex {
    /// The index with the facts the model declares (its value_info, inputs, outputs and
    /// initializers) and no inference: `dagr_ops::index` adds shape and value inference, and is
    /// how every layer above reads a model.
    pub fn declared(model: &Model) -> Result<GraphIndex> {
        let g = model.graph();
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for (slot, o) in n.output.iter().enumerate() {
                if !o.is_empty() {
                    producer.insert(o.clone(), (i, slot));
                }
            }
            let mut seen = HashSet::new();
            for r in node_reads(n) {
                if seen.insert(r.clone()) {
                    consumers.entry(r).or_default().push(i);
                }
            }
        }
        let initializers: HashSet<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
        let graph_inputs = g.input.iter().map(|v| v.name.clone()).collect();
        let graph_outputs = g.output.iter().map(|v| v.name.clone()).collect();
        let topo = topo_order(g, &producer)?;

        let mut facts = HashMap::new();
        for vi in g.input.iter().chain(g.value_info.iter()).chain(g.output.iter()) {
            if let Some(f) = vi.type_.as_ref().and_then(ValueFact::from_type_proto) {
                merge_fact(&mut facts, &vi.name, f);
            }
        }
        for t in &g.initializer {
            let dims = t.dims.iter().map(|&d| Dim::Known(d)).collect();
            facts.insert(t.name.clone(), ValueFact::new(t.data_type, dims));
        }
        Ok(GraphIndex {
            producer,
            consumers,
            initializers,
            graph_inputs,
            graph_outputs,
            topo,
            facts,
            known: Known::default(),
        })
    }

    pub fn fact(&self, name: &str) -> Option<&ValueFact> {
        self.facts.get(name)
    }

    /// The value of a small integer tensor, each element known or symbolic.
    pub fn value(&self, name: &str) -> Option<&Vec<Dim>> {
        self.known.values.get(name)
    }

    /// The values of a small float tensor known at build time (a constant, or computed from
    /// constants).
    pub fn float_constant(&self, name: &str) -> Option<Vec<f32>> {
        self.known
            .floats
            .get(name)
            .map(|v| v.iter().map(|&x| x as f32).collect())
    }

    /// Integer tensors whose every element is known at build time: constants, and shapes
    /// computed from static dims.
    pub fn int_constants(&self) -> HashMap<String, Vec<i64>> {
        self.known
            .values
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.iter().map(Dim::known).collect::<Option<Vec<i64>>>()?)))
            .collect()
    }

    pub fn is_graph_input(&self, name: &str) -> bool {
        self.graph_inputs.iter().any(|n| n == name)
    }

    /// Graph inputs that are not initializers: what a user feeds.
    pub fn user_inputs(&self) -> Vec<String> {
        self.graph_inputs
            .iter()
            .filter(|n| !self.initializers.contains(*n))
            .cloned()
            .collect()
    }

    /// The tensors whose values depend on the data fed to the model: reachable from a user
    /// input through nodes that read values. Constants, and values computed from shapes alone
    /// (`Shape`, `Size`, `ConstantOfShape`, `EyeLike`), are not.
    pub fn data_dependent(&self, model: &Model) -> HashSet<String> {
        let mut out: HashSet<String> = self.user_inputs().into_iter().collect();
        let g = model.graph();
        for &i in &self.topo {
            let n = &g.node[i];
            if matches!(n.op_type.as_str(), "Shape" | "Size" | "ConstantOfShape" | "EyeLike") {
                continue;
            }
            if node_reads(n).iter().any(|r| out.contains(r)) {
                out.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
            }
        }
        out
    }

    pub fn consumers_of(&self, name: &str) -> &[usize] {
        self.consumers.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// A fact from value_info never loses information already known (an output's declared shape may
/// be less precise than an intermediate's value_info).
fn merge_fact(facts: &mut HashMap<String, ValueFact>, name: &str, f: ValueFact) {
    match facts.get_mut(name) {
        Some(old) => {
            if old.dtype == 0 {
                old.dtype = f.dtype;
            }
            if old.shape.is_none() {
                old.shape = f.shape;
            }
        }
        None => {
            facts.insert(name.to_string(), f);
        }
    }
}

fn topo_order(g: &GraphProto, producer: &HashMap<String, (usize, usize)>) -> Result<Vec<usize>> {
    let n = g.node.len();
    let mut indeg = vec![0usize; n];
    let mut succ: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in g.node.iter().enumerate() {
        let mut deps = HashSet::new();
        for r in node_reads(node) {
            if let Some(&(p, _)) = producer.get(&r) {
                if p != i && deps.insert(p) {
                    succ[p].push(i);
                    indeg[i] += 1;
                }
            }
        }
    }
    let mut q: VecDeque<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = q.pop_front() {
        order.push(i);
        for &s in &succ[i] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                q.push_back(s);
            }
        }
    }
    if order.len() != n {
        let stuck = (0..n)
            .find(|&i| indeg[i] > 0)
            .map(|i| g.node[i].name.clone())
            .unwrap_or_default();
        return Err(Error::InvalidModel(format!(
            "the graph has a cycle (node '{stuck}' depends on its own output); ONNX graphs must be acyclic"
        )));
    }
    Ok(order)
}

/// Every tensor that `roots` depend on (themselves included), through node inputs and the
/// outer names that subgraphs (If, Loop, Scan bodies) capture.
pub fn upstream(model: &Model, idx: &GraphIndex, roots: &[String]) -> HashSet<String> {
    let mut seen: HashSet<String> = roots.iter().cloned().collect();
    let mut stack: Vec<String> = roots.to_vec();
    let g = model.graph();
    while let Some(t) = stack.pop() {
        if let Some(n) = idx.producer.get(&t).and_then(|&(n, _)| g.node.get(n)) {
            for i in node_reads(n) {
                if seen.insert(i.clone()) {
                    stack.push(i);
                }
            }
        }
    }
    seen
}

/// Remove nodes none of whose outputs reaches a graph output.
pub fn prune(model: &mut Model) {
    let g = model.graph_mut();
    let mut live: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; g.node.len()];
    for i in (0..g.node.len()).rev() {
        let n = &g.node[i];
        if n.output.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(node_reads(n));
        }
    }
    let mut k = keep.iter();
    g.node.retain(|_| k.next().copied().unwrap_or(true));
    g.initializer
        .retain(|t| live.contains(&t.name) || g.input.iter().any(|i| i.name == t.name));
}

/// Ops whose every run draws new values: two such nodes are never the same computation.
const RANDOM_OPS: [&str; 7] = [
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
];

/// Merge nodes that compute the same thing (common subexpressions): the same op of the same
/// domain with the same attributes over the same inputs. Readers of a merged node read the
/// first one's outputs; nodes that write graph outputs, hold subgraphs or whose outputs a
/// subgraph reads, and random ops are kept as they are. Nodes must be in topological order (as
/// ONNX requires). Returns the number of nodes removed.
///
/// The training graphs and step graphs repeat small computations where rules meet the same
/// tensor (a label's Unsqueeze per head, a Shape per reader); tract 0.23's own merging of such
/// repeats can route a reader to a node it has just removed, so the tract backend merges them
/// first.
pub fn merge_duplicates(model: &mut Model) -> usize {
    let g = model.graph_mut();
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    // Names read from inside subgraphs keep their producers (renaming would have to reach into
    // the subgraphs).
    let mut captured: HashSet<String> = HashSet::new();
    for n in &g.node {
        if n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
            captured.extend(node_reads(n));
        }
    }
    let mut rename: HashMap<String, String> = HashMap::new();
    // The outputs of the first node of each computation.
    let mut seen: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
    let mut keep = vec![true; g.node.len()];
    for (i, n) in g.node.iter_mut().enumerate() {
        for input in n.input.iter_mut() {
            if let Some(r) = rename.get(input.as_str()) {
                *input = r.clone();
            }
        }
        let mergeable = !n.output.is_empty()
            && !RANDOM_OPS.contains(&n.op_type.as_str())
            && !n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty())
            && !n
                .output
                .iter()
                .any(|o| outputs.contains(o) || captured.contains(o) || o.is_empty());
        if !mergeable {
            continue;
        }
        let mut attrs: Vec<&crate::proto::AttributeProto> = n.attribute.iter().collect();
        attrs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut key: Vec<u8> = Vec::new();
        for part in [&n.domain, &n.op_type].into_iter().chain(n.input.iter()) {
            key.extend_from_slice(part.as_bytes());
            key.push(0);
        }
        key.extend_from_slice(&(n.output.len() as u64).to_le_bytes());
        let mut described = true;
        for a in attrs {
            match protobuf::Message::write_to_bytes(a) {
                Ok(bytes) => {
                    key.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                    key.extend_from_slice(&bytes);
                }
                Err(_) => described = false,
            }
        }
        if !described {
            continue;
        }
        match seen.get(&key) {
            Some(first) => {
                keep[i] = false;
                rename.extend(n.output.iter().cloned().zip(first.iter().cloned()));
            }
            None => {
                seen.insert(key, n.output.clone());
            }
        }
    }
    let removed = keep.iter().filter(|k| !**k).count();
    let mut k = keep.iter();
    g.node.retain(|_| k.next().copied().unwrap_or(true));
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{GraphProto, ModelProto, NodeProto, ValueInfoProto};

    fn node(op: &str, inputs: &[&str], output: &str, attr: Option<i64>) -> NodeProto {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.name = format!("{output}/{op}");
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![output.to_string()];
        if let Some(v) = attr {
            n.attribute.push(crate::builder::attr_int("axis", v));
        }
        n
    }

    fn model(nodes: Vec<NodeProto>, outputs: &[&str]) -> Model {
        let mut g = GraphProto::new();
        g.node = nodes;
        for o in outputs {
            let mut v = ValueInfoProto::new();
            v.name = o.to_string();
            g.output.push(v);
        }
        let mut p = ModelProto::new();
        p.graph = Some(g).into();
        Model {
            proto: p,
            base_dir: ".".into(),
            source: None,
        }
    }

    /// Three heads unsqueeze the same labels and compare them alike: one chain is left, every
    /// reader reads it; different attributes, random ops and graph outputs stay apart.
    #[test]
    fn repeated_computations_are_merged_once() {
        let mut m = model(
            vec![
                node("Unsqueeze", &["label", "axes"], "u0", None),
                node("Unsqueeze", &["label", "axes"], "u1", None),
                node("Unsqueeze", &["label", "axes"], "u2", None),
                node("Less", &["u0", "zero"], "l0", None),
                node("Less", &["u1", "zero"], "l1", None),
                node("Less", &["u2", "zero"], "l2", None),
                node("Concat", &["l0", "l1", "l2"], "all", Some(0)),
                node("Concat", &["l0", "l1", "l2"], "other_axis", Some(1)),
                node("Concat", &["l0", "l1", "l2"], "out_again", Some(0)),
                node("RandomUniformLike", &["label"], "r0", None),
                node("RandomUniformLike", &["label"], "r1", None),
                node("Concat", &["all", "other_axis", "r0", "r1", "out_again"], "y", Some(0)),
            ],
            &["y", "out_again"],
        );
        assert_eq!(merge_duplicates(&mut m), 4);
        let g = m.graph();
        let ops: Vec<(&str, Vec<&str>)> = g
            .node
            .iter()
            .map(|n| (n.output[0].as_str(), n.input.iter().map(String::as_str).collect()))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("u0", vec!["label", "axes"]),
                ("l0", vec!["u0", "zero"]),
                ("all", vec!["l0", "l0", "l0"]),
                ("other_axis", vec!["l0", "l0", "l0"]),
                ("out_again", vec!["l0", "l0", "l0"]),
                ("r0", vec!["label"]),
                ("r1", vec!["label"]),
                ("y", vec!["all", "other_axis", "r0", "r1", "out_again"]),
            ]
        );
        // Nothing left to merge.
        assert_eq!(merge_duplicates(&mut m), 0);
    }
}
