//! Appending nodes to a graph: unique names, constants, and opset-aware forms of the operators
//! whose signature changed across opsets (axes as attribute or as input).

use crate::proto::{attribute_proto::AttributeType, AttributeProto, GraphProto, NodeProto, TensorProto};
use crate::{dtype, tensor, Model};
use std::collections::{HashMap, HashSet};

/// Generates names that collide with nothing already in the model, nor with each other.
#[derive(Debug, Clone, Default)]
pub struct NameGen {
    used: HashSet<String>,
}

impl NameGen {
    pub fn for_model(model: &Model) -> NameGen {
        let mut used = HashSet::new();
        collect_names(model.graph(), &mut used);
        for f in &model.proto.functions {
            used.insert(f.name.clone());
        }
        NameGen { used }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.used.contains(name)
    }

    /// `base` itself if free, else `base_1`, `base_2`, ...
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while self.used.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.used.insert(name.clone());
        name
    }
}

fn collect_names(g: &GraphProto, used: &mut HashSet<String>) {
    for n in &g.node {
        used.insert(n.name.clone());
        used.extend(n.input.iter().cloned());
        used.extend(n.output.iter().cloned());
        for a in &n.attribute {
            if let Some(sg) = a.g.as_ref() {
                collect_names(sg, used);
            }
            for sg in &a.graphs {
                collect_names(sg, used);
            }
        }
    }
    used.extend(g.initializer.iter().map(|t| t.name.clone()));
    used.extend(g.input.iter().map(|v| v.name.clone()));
    used.extend(g.output.iter().map(|v| v.name.clone()));
    used.extend(g.value_info.iter().map(|v| v.name.clone()));
    used.remove("");
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    crate::attr::keep_zero(&mut a);
    a
}
pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::FLOAT.into();
    a.f = v;
    crate::attr::keep_zero(&mut a);
    a
}
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = v.to_vec();
    a
}
pub fn attr_floats(name: &str, v: &[f32]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::FLOATS.into();
    a.floats = v.to_vec();
    a
}
pub fn attr_string(name: &str, v: &str) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::STRING.into();
    a.s = v.as_bytes().to_vec();
    crate::attr::keep_zero(&mut a);
    a
}
pub fn attr_graph(name: &str, g: GraphProto) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::GRAPH.into();
    a.g = protobuf::MessageField::some(g);
    a
}
pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::TENSOR.into();
    a.t = protobuf::MessageField::some(t);
    a
}

/// Collects new nodes and initializers; `finish` appends them to the model.
pub struct Builder {
    pub names: NameGen,
    pub opset: i64,
    /// Prefix of generated tensor and node names, e.g. `dagr/`.
    pub prefix: String,
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    f32_consts: HashMap<(u32, Vec<i64>), String>,
    i64_consts: HashMap<Vec<i64>, String>,
    typed_consts: HashMap<(i32, u64), String>,
}

impl Builder {
    pub fn new(model: &Model, prefix: &str) -> Builder {
        Builder {
            names: NameGen::for_model(model),
            opset: model.opset(),
            prefix: prefix.to_string(),
            nodes: Vec::new(),
            initializers: Vec::new(),
            f32_consts: HashMap::new(),
            i64_consts: HashMap::new(),
            typed_consts: HashMap::new(),
        }
    }

    /// Append a copy of a subgraph's body (an If branch) to this builder, every name it defines
    /// (node outputs, initializers) and every node name made fresh under `prefix`; the names it
    /// reads from the outer scope stay. Returns the renaming, to find its outputs by.
    pub fn inline_body(&mut self, g: &GraphProto, prefix: &str) -> HashMap<String, String> {
        self.inline_body_as(g, prefix, HashMap::new())
    }

    /// `inline_body` with the body's inputs (a Scan's) bound to the given names (`bound`: body
    /// input -> name); the map returned includes them.
    pub fn inline_body_as(
        &mut self,
        g: &GraphProto,
        prefix: &str,
        bound: HashMap<String, String>,
    ) -> HashMap<String, String> {
        let mut rename = bound;
        let local = g
            .node
            .iter()
            .flat_map(|m| m.output.iter())
            .chain(g.initializer.iter().map(|t| &t.name))
            .filter(|x| !x.is_empty());
        for x in local {
            rename.insert(x.clone(), self.names.fresh(&format!("{prefix}/{x}")));
        }
        let new = |x: &String| rename.get(x).cloned().unwrap_or_else(|| x.clone());
        for m in &g.node {
            let mut m = m.clone();
            m.name = self.names.fresh(&format!("{prefix}/{}", m.name));
            m.input = m.input.iter().map(new).collect();
            m.output = m.output.iter().map(new).collect();
            self.nodes.push(m);
        }
        for t in &g.initializer {
            let mut t = t.clone();
            t.name = new(&t.name);
            self.initializers.push(t);
        }
        rename
    }

    /// A fresh tensor name under the builder's prefix.
    pub fn name(&mut self, hint: &str) -> String {
        let base = format!("{}{}", self.prefix, hint);
        self.names.fresh(&base)
    }

    /// Append a node with `n_out` outputs; returns the output names.
    pub fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        n_out: usize,
        attrs: Vec<AttributeProto>,
        hint: &str,
    ) -> Vec<String> {
        let mut n = NodeProto::new();
        n.op_type = op.to_string();
        n.name = self.names.fresh(&format!("{}{}/{}", self.prefix, hint, op));
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = (0..n_out)
            .map(|i| {
                self.name(&format!(
                    "{hint}/{}{}",
                    op.to_lowercase(),
                    if i == 0 { String::new() } else { format!("_{i}") }
                ))
            })
            .collect();
        n.attribute = attrs;
        let out = n.output.clone();
        self.nodes.push(n);
        out
    }

    /// Append a node with one output.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, hint: &str) -> String {
        self.node_n(op, inputs, 1, attrs, hint).remove(0)
    }

    /// Append a node whose single output gets exactly `output` (which must be fresh).
    pub fn op_named(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, output: &str) {
        let mut n = NodeProto::new();
        n.op_type = op.to_string();
        n.name = self.names.fresh(&format!("{output}/{op}"));
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![output.to_string()];
        n.attribute = attrs;
        self.nodes.push(n);
    }

    /// A float32 constant (an initializer), shared between identical uses.
    pub fn const_f32(&mut self, dims: &[i64], data: &[f32]) -> String {
        if data.len() == 1 {
            let key = (data[0].to_bits(), dims.to_vec());
            if let Some(n) = self.f32_consts.get(&key) {
                return n.clone();
            }
            let name = self.name("const");
            self.initializers.push(tensor::f32_tensor(&name, dims, data));
            self.f32_consts.insert(key, name.clone());
            return name;
        }
        let name = self.name("const");
        self.initializers.push(tensor::f32_tensor(&name, dims, data));
        name
    }

    /// A float32 scalar constant (the value is rounded to f32).
    pub fn scalar(&mut self, v: f64) -> String {
        self.const_f32(&[], &[v as f32])
    }

    /// A scalar constant of float type `elem` (float32 shared as `scalar` does).
    pub fn scalar_of(&mut self, v: f64, elem: i32) -> String {
        if elem == dtype::FLOAT || !dtype::is_float(elem) {
            return self.scalar(v);
        }
        let key = (elem, v.to_bits());
        if let Some(n) = self.typed_consts.get(&key) {
            return n.clone();
        }
        let name = self.name("const");
        self.initializers.push(tensor::float_tensor(&name, &[], &[v], elem));
        self.typed_consts.insert(key, name.clone());
        name
    }

    /// An int64 1-D constant (axes, shapes), shared between identical uses.
    pub fn const_i64(&mut self, data: &[i64]) -> String {
        if let Some(n) = self.i64_consts.get(data) {
            return n.clone();
        }
        let name = self.name("axes");
        self.initializers
            .push(tensor::i64_tensor(&name, &[data.len() as i64], data));
        self.i64_consts.insert(data.to_vec(), name.clone());
        name
    }

    pub fn scalar_i64(&mut self, v: i64) -> String {
        let name = self.name("const_i64");
        self.initializers.push(tensor::i64_tensor(&name, &[], &[v]));
        name
    }

    // ---- opset-aware forms -------------------------------------------------------------

    /// `op` (a sum-like reduction: ReduceSum, ReduceSumSquare, ReduceL1) over every element of
    /// `x` (of rank `rank` where known), as a one-element vector. With `rows_first` and a rank
    /// of 2 or more, `op` reduces the last axis first and the partial results are summed: tract
    /// sums a matrix's rows on its threads (8.3 GB/s on the 2-core machine, 9043 x 9043) but
    /// every axis in one scalar loop (2.4 GB/s), and copies a tensor it flattens while another
    /// node reads it. Otherwise `x` is flattened and reduced at once, which ONNX Runtime runs
    /// twice as fast as the rows first. A vector is not flattened (no Reshape that does
    /// nothing: a step graph has several sums per parameter).
    pub fn reduce_whole(&mut self, op: &str, x: &str, rank: Option<usize>, rows_first: bool, hint: &str) -> String {
        match rank {
            Some(rank) if rows_first && rank >= 2 => {
                let mut rows = self.reduce(op, x, Some(&[rank as i64 - 1]), false, hint);
                if rank > 2 {
                    let flat = self.const_i64(&[-1]);
                    rows = self.op("Reshape", &[&rows, &flat], vec![], hint);
                }
                self.reduce("ReduceSum", &rows, Some(&[0]), true, hint)
            }
            Some(1) => self.reduce(op, x, Some(&[0]), true, hint),
            _ => {
                let flat = self.const_i64(&[-1]);
                let all = self.op("Reshape", &[x, &flat], vec![], hint);
                self.reduce(op, &all, Some(&[0]), true, hint)
            }
        }
    }

    /// A reduction. `axes = None` reduces over all axes. ReduceSum takes axes as an input from
    /// opset 13, the other reductions from opset 18; before that they are an attribute.
    pub fn reduce(&mut self, op: &str, x: &str, axes: Option<&[i64]>, keepdims: bool, hint: &str) -> String {
        let as_input = if op == "ReduceSum" {
            self.opset >= 13
        } else {
            self.opset >= 18
        };
        let keep = attr_int("keepdims", keepdims as i64);
        match axes {
            None => self.op(op, &[x], vec![keep], hint),
            Some(ax) if as_input => {
                let a = self.const_i64(ax);
                self.op(op, &[x, &a], vec![keep], hint)
            }
            Some(ax) => self.op(op, &[x], vec![keep, attr_ints("axes", ax)], hint),
        }
    }

    /// Unsqueeze/Squeeze with constant axes (an input from opset 13).
    pub fn unsqueeze(&mut self, x: &str, axes: &[i64], hint: &str) -> String {
        if self.opset >= 13 {
            let a = self.const_i64(axes);
            self.op("Unsqueeze", &[x, &a], vec![], hint)
        } else {
            self.op("Unsqueeze", &[x], vec![attr_ints("axes", axes)], hint)
        }
    }

    /// Split along `axis` into pieces of the given sizes (an input from opset 13, an attribute
    /// before).
    pub fn split(&mut self, x: &str, axis: i64, sizes: &[i64], hint: &str) -> Vec<String> {
        let ax = attr_int("axis", axis);
        if self.opset >= 13 {
            let s = self.const_i64(sizes);
            self.node_n("Split", &[x, &s], sizes.len(), vec![ax], hint)
        } else {
            self.node_n("Split", &[x], sizes.len(), vec![ax, attr_ints("split", sizes)], hint)
        }
    }

    /// The element-wise sum of `xs`: the tensor itself when there is one (no node), else a
    /// `Sum` node. `xs` must not be empty.
    pub fn sum(&mut self, xs: &[String], hint: &str) -> String {
        match xs {
            [one] => one.clone(),
            _ => {
                let refs: Vec<&str> = xs.iter().map(String::as_str).collect();
                self.op("Sum", &refs, vec![], hint)
            }
        }
    }

    pub fn binary(&mut self, op: &str, a: &str, b: &str, hint: &str) -> String {
        self.op(op, &[a, b], vec![], hint)
    }

    pub fn unary(&mut self, op: &str, a: &str, hint: &str) -> String {
        self.op(op, &[a], vec![], hint)
    }

    pub fn cast(&mut self, x: &str, to: i32, hint: &str) -> String {
        self.op("Cast", &[x], vec![attr_int("to", to as i64)], hint)
    }

    /// Dimension `axis` of `x` as a float32 scalar (for dynamic batch sizes).
    pub fn dim_f32(&mut self, x: &str, axis: i64, hint: &str) -> String {
        let s = self.unary("Shape", x, hint);
        let i = self.scalar_i64(axis);
        let d = self.op("Gather", &[&s, &i], vec![attr_int("axis", 0)], hint);
        self.cast(&d, dtype::FLOAT, hint)
    }

    /// Append everything built to the model's graph.
    pub fn finish(self, model: &mut Model) {
        let g = model.graph_mut();
        g.node.extend(self.nodes);
        g.initializer.extend(self.initializers);
    }
}
