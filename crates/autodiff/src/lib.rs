//! Reverse-mode differentiation of ONNX graphs into standard ONNX operators.
//!
//! `backward` walks the nodes between the tensors to differentiate with respect to and the
//! seeded tensors in reverse topological order, asks each op's rule (the registry of `dagr-ops`) for the
//! vector-Jacobian product, and sums the contributions a tensor receives from all its
//! consumers. The `dagr` layer builds whole training graphs on top of it.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use dagr_onnx::builder::Builder;
use dagr_onnx::error::{Error, Result};
use dagr_onnx::index::node_reads;
use dagr_onnx::proto::{GraphProto, ModelProto, NodeProto};
use dagr_onnx::{dtype, GraphIndex, Model};
use dagr_ops::{ctx, Kind};
use std::collections::{HashMap, HashSet};

/// Gradients accumulated per tensor; summed when first read.
#[derive(Default)]
struct Accum {
    parts: HashMap<String, Vec<String>>,
}

impl Accum {
    fn add(&mut self, t: &str, g: String) {
        self.parts.entry(t.to_string()).or_default().push(g);
    }
    fn take(&mut self, b: &mut Builder, t: &str) -> Option<String> {
        let parts = self.parts.remove(t)?;
        let s = b.sum(&parts, "grad/accumulate");
        self.parts.insert(t.to_string(), vec![s.clone()]);
        Some(s)
    }
}

/// Differentiate: `seeds` are (tensor, its gradient) pairs, `wrt` the tensors whose gradients
/// are wanted. Gradient does not flow through the tensors in `stop`. Returns the gradient
/// tensor of each `wrt` entry that the seeds reach.
pub fn backward(
    model: &Model,
    idx: &GraphIndex,
    b: &mut Builder,
    seeds: &[(String, String)],
    wrt: &[String],
    stop: &HashSet<String>,
) -> Result<HashMap<String, String>> {
    let g = model.graph();
    let is_float = |t: &str| {
        idx.fact(t)
            .map(|f| f.dtype == 0 || dtype::is_float(f.dtype))
            .unwrap_or(true)
    };

    // The outer tensors each node's subgraphs read (If branches, Loop and Scan bodies): a
    // gradient flows through them as through inputs.
    let caps: HashMap<usize, Vec<String>> = idx
        .topo
        .iter()
        .map(|&i| (i, captured(&g.node[i])))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    let no_caps: Vec<String> = Vec::new();
    let caps_of = |i: usize| caps.get(&i).unwrap_or(&no_caps);
    // Tensors that depend on a `wrt` tensor (not through a stopped tensor).
    let mut reach: HashSet<String> = wrt.iter().cloned().collect();
    for &i in &idx.topo {
        let n = &g.node[i];
        if n.input
            .iter()
            .chain(caps_of(i))
            .any(|x| reach.contains(x) && !stop.contains(x))
        {
            for o in &n.output {
                if !o.is_empty() && is_float(o) {
                    reach.insert(o.clone());
                }
            }
        }
    }
    // Tensors the seeds depend on.
    let mut needed: HashSet<String> = seeds.iter().map(|s| s.0.clone()).collect();
    for &i in idx.topo.iter().rev() {
        let n = &g.node[i];
        if n.output.iter().any(|o| needed.contains(o)) {
            needed.extend(n.input.iter().chain(caps_of(i)).filter(|x| !x.is_empty()).cloned());
        }
    }

    // A node older than its entry covers is refused before any rule runs: its inference was
    // left out too, so a later rule would otherwise stop at an unknown shape instead.
    let opset = model.opset();
    for &i in idx.topo.iter().rev() {
        let n = &g.node[i];
        let on_path =
            n.output.iter().any(|o| needed.contains(o)) && n.input.iter().chain(caps_of(i)).any(|x| reach.contains(x));
        if let Some(rule) = dagr_ops::gradient_rule(&n.domain, &n.op_type).filter(|r| on_path && !r.covers(opset)) {
            return Err(Error::OpVersionUnsupported {
                op: n.op_type.clone(),
                node: n.name.clone(),
                version: dagr_ops::schema_version(&n.op_type, opset).unwrap_or(opset),
                since: rule.since,
            });
        }
    }
    let consts = idx.int_constants();
    let mut acc = Accum::default();
    for (t, s) in seeds {
        acc.add(t, s.clone());
    }
    for &i in idx.topo.iter().rev() {
        let n = &g.node[i];
        if !n.output.iter().any(|o| needed.contains(o)) {
            continue;
        }
        let need: Vec<bool> = n
            .input
            .iter()
            .map(|x| !x.is_empty() && reach.contains(x) && !stop.contains(x) && is_float(x))
            .collect();
        let wanted: Vec<String> = caps_of(i)
            .iter()
            .filter(|x| reach.contains(*x) && !stop.contains(*x) && is_float(x))
            .cloned()
            .collect();
        if !need.iter().any(|&x| x) && wanted.is_empty() {
            continue;
        }
        let outs: Vec<Option<String>> = n
            .output
            .iter()
            .map(|o| if stop.contains(o) { None } else { acc.take(b, o) })
            .collect();
        if outs.iter().all(Option::is_none) {
            continue;
        }
        let no_rule = || Error::NoGradientRule {
            op: if n.domain.is_empty() {
                n.op_type.clone()
            } else {
                format!("{}::{}", n.domain, n.op_type)
            },
            node: n.name.clone(),
        };
        let rule = dagr_ops::gradient_rule(&n.domain, &n.op_type).ok_or_else(no_rule)?;
        let mut ctx = ctx::Ctx {
            model,
            b,
            idx,
            consts: &consts,
            node: n,
            differentiate: Some(differentiate_subgraph),
        };
        if !wanted.is_empty() && !matches!(rule.kind, Kind::Subgraph(_)) {
            return Err(ctx.err(format!(
                "its subgraphs read {} which need a gradient, and its rule does not differentiate subgraphs",
                wanted.join(", ")
            )));
        }
        let grads = match rule.kind {
            Kind::Subgraph(vjp) => {
                let (grads, captured) = vjp(&mut ctx, &outs, &need, &wanted)?;
                for (x, gr) in wanted.iter().zip(captured) {
                    if let Some(gr) = gr {
                        acc.add(x, gr);
                    }
                }
                grads
            }
            Kind::Vjp(vjp) => vjp(&mut ctx, &outs, &need)?,
            Kind::Broadcast(vjp) => {
                let y = n.output.first().cloned().unwrap_or_default();
                let mut grads = vjp(&mut ctx, &outs, &need)?;
                for (j, gr) in grads.iter_mut().enumerate() {
                    if let (Some(g), Some(x)) = (gr.as_mut(), n.input.get(j)) {
                        *g = ctx.unbroadcast(g, x, &y)?;
                    }
                }
                grads
            }
            Kind::Body(body) => through_body(body, &mut ctx, &outs, &need)?,
            Kind::NoGradient => continue,
            Kind::NoRule => return Err(no_rule()),
        };
        for (j, gr) in grads.into_iter().enumerate() {
            if let Some(gr) = gr {
                if need.get(j).copied().unwrap_or(false) {
                    acc.add(&n.input[j], gr);
                }
            }
        }
    }
    let mut out = HashMap::new();
    for w in wrt {
        if let Some(gr) = acc.take(b, w) {
            out.insert(w.clone(), gr);
        }
    }
    Ok(out)
}

/// The nodes between `from` and `to` (on a float path from one to the other) whose op the
/// registry has no rule for, or a rule that does not cover the node's schema version, as (op,
/// node name), in graph order: what stops a training graph from being built.
pub fn ops_without_rule(model: &Model, idx: &GraphIndex, from: &[String], to: &[String]) -> Vec<(String, String)> {
    let g = model.graph();
    let is_float = |t: &str| {
        idx.fact(t)
            .map(|f| f.dtype == 0 || dtype::is_float(f.dtype))
            .unwrap_or(true)
    };
    let caps: HashMap<usize, Vec<String>> = idx.topo.iter().map(|&i| (i, captured(&g.node[i]))).collect();
    let reads = |i: usize| g.node[i].input.iter().chain(caps.get(&i).into_iter().flatten());
    let mut reach: HashSet<&str> = from.iter().map(String::as_str).collect();
    for &i in &idx.topo {
        let n = &g.node[i];
        if reads(i).any(|x| reach.contains(x.as_str())) {
            reach.extend(
                n.output
                    .iter()
                    .filter(|o| !o.is_empty() && is_float(o))
                    .map(String::as_str),
            );
        }
    }
    let mut needed: HashSet<&str> = to.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for &i in idx.topo.iter().rev() {
        let n = &g.node[i];
        if !n.output.iter().any(|o| needed.contains(o.as_str())) {
            continue;
        }
        needed.extend(reads(i).map(String::as_str));
        let on_path = reads(i).any(|x| reach.contains(x.as_str()) && is_float(x));
        if !on_path {
            continue;
        }
        match dagr_ops::gradient_rule(&n.domain, &n.op_type) {
            None => {
                let op = if n.domain.is_empty() {
                    n.op_type.clone()
                } else {
                    format!("{}::{}", n.domain, n.op_type)
                };
                out.push((op, n.name.clone()));
            }
            Some(r) if !r.covers(model.opset()) => {
                let version = dagr_ops::schema_version(&n.op_type, model.opset()).unwrap_or(0);
                let op = format!(
                    "{} (version {version}; its rule covers {} and later)",
                    n.op_type, r.since
                );
                out.push((op, n.name.clone()));
            }
            Some(_) => {}
        }
    }
    out.reverse();
    out
}

/// The outer tensors a node's subgraphs read (If branches, Loop and Scan bodies) that are not
/// among its inputs, each once.
fn captured(n: &NodeProto) -> Vec<String> {
    if !n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    for r in node_reads(n) {
        if !n.input.contains(&r) && !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// The vector-Jacobian product of a node written as a body of primitive ops: the body is
/// emitted (a recomputation, in the backward part), indexed as a graph of its own whose inputs
/// are the node's inputs, and differentiated by `backward` from the node's output gradients.
/// A tensor the node reads twice gets its gradient once.
fn through_body(
    body: ctx::Body,
    c: &mut ctx::Ctx,
    outs: &[Option<String>],
    need: &[bool],
) -> Result<Vec<Option<String>>> {
    let (n0, i0) = (c.b.nodes.len(), c.b.initializers.len());
    let produced = body(c)?;
    let seeds: Vec<(String, String)> = outs
        .iter()
        .zip(&produced)
        .filter_map(|(g, y)| Some((y.clone(), g.clone()?)))
        .filter(|(y, _)| !y.is_empty())
        .collect();
    let (n1, i1) = (c.b.nodes.len(), c.b.initializers.len());
    c.differentiate_emitted((n0..n1, i0..i1), &seeds, need)
}

pub use ctx::Emitted;

/// `backward` over the nodes `b` emitted in `range`, indexed as a graph whose inputs are
/// `inputs`; initializers `b` made before (it shares equal scalars) come along. The gradient
/// nodes go to `b` as well.
#[allow(clippy::too_many_arguments)]
pub fn differentiate_subgraph(
    model: &Model,
    outer: &GraphIndex,
    b: &mut Builder,
    label: &str,
    inputs: &[(String, dagr_onnx::ValueFact)],
    range: Emitted,
    seeds: &[(String, String)],
    wrt: &[String],
) -> Result<HashMap<String, String>> {
    let (nodes, inits) = range;
    let i0 = inits.start;
    let mut g = GraphProto::new();
    g.name = format!("body of {label}");
    let mut constants = Vec::new();
    for (x, f) in inputs {
        // An integer whose value the outer graph knows (axes, shapes a body reads from outside)
        // enters as that constant, as inference saw it there.
        let dims: Option<Vec<i64>> = f.shape.as_ref().and_then(|s| s.iter().map(|d| d.known()).collect());
        let value: Option<Vec<i64>> = outer.value(x).and_then(|v| v.iter().map(|d| d.known()).collect());
        match (dims, value) {
            (Some(d), Some(v)) if f.dtype == dtype::INT64 && d.iter().product::<i64>() == v.len() as i64 => {
                constants.push(dagr_onnx::tensor::i64_tensor(x, &d, &v));
            }
            _ => g.input.push(f.to_value_info(x)),
        }
    }
    g.node = b.nodes[nodes].to_vec();
    g.initializer = b.initializers[inits].to_vec();
    g.initializer.extend(constants);
    let made: HashSet<&String> = g.node.iter().flat_map(|m| m.output.iter()).collect();
    let mut known: HashSet<String> = inputs.iter().map(|(x, _)| x.clone()).collect();
    known.extend(g.initializer.iter().map(|t| t.name.clone()));
    let mut shared = Vec::new();
    for m in &g.node {
        for x in &m.input {
            if !x.is_empty() && !made.contains(x) && known.insert(x.clone()) {
                match b.initializers[..i0].iter().find(|t| &t.name == x) {
                    Some(t) => shared.push(t.clone()),
                    None => {
                        return Err(Error::Internal(format!(
                            "the body of {label} reads '{x}', which it neither makes nor receives"
                        )))
                    }
                }
            }
        }
    }
    g.initializer.extend(shared);
    let mut p = ModelProto::new();
    p.ir_version = model.proto.ir_version;
    p.opset_import = model.proto.opset_import.clone();
    p.graph = Some(g).into();
    let sub = Model {
        proto: p,
        base_dir: model.base_dir.clone(),
        source: None,
    };
    let sub_idx = dagr_ops::index(&sub)?;
    backward(&sub, &sub_idx, b, seeds, wrt, &HashSet::new())
}
