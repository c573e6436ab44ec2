//! Every ONNX operator the tool understands, each as **one unit**: one registry entry (in its
//! family's module, beside its code) names the operator, the first ONNX schema version it
//! covers, its shape (and value) inference, its gradient, and the gradient's formula; the
//! family's `cases()` beside them hold its finite-difference cases, which `tests/it/grad_rules.rs`
//! runs for every entry of the registry (it fails when a differentiable entry has none).
//! Adding an operator is one entry and its functions, in one file.
//!
//! In the formulas, `unb` is the engine's sum of a broadcast gradient down to its input's shape,
//! applied to every rule of kind `Broadcast` (PyTorch's central `sum_to`). Each rule builds the
//! vector-Jacobian product of its op from standard ONNX operators only (the `derivatives.yaml` of
//! this tool). Shape inference (`infer`) evaluates shape tensors as well as typing them; the
//! gradient engine (`dagr-autodiff`) walks the graph and asks this registry for each node's rule.
//!
//! Lowerings: an entry may also carry a faster equivalent form of its op for training graphs
//! (`Op::lower`, applied by `lower` after differentiation, so rules see the op itself and what a
//! user exports keeps it): a convolution with few output positions becomes one matrix product.
//! Portable forms: an entry whose op a runtime lacks may carry the op written in other standard
//! ops (`Op::portable`; a `Body` entry's body serves too), which that runtime's backend runs in
//! its place (`expand_bodies`; tract's runs the loss ops so).
//!
//! Versions: an entry covers the schema versions of its operator from `since` on (ONNX's own
//! version history, `schemas.rs`, resolves a node's version from the model's opset). Where those
//! versions differ (an attribute that became an input, Softmax's axis semantics at 13), the
//! entry's functions read both forms; a node of an older version than `since` is refused by the
//! engine with a message naming the versions covered, and inference leaves its outputs unknown.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cases;
pub mod ctx;
pub mod infer;
pub mod schemas;

pub mod composite;
pub mod control;
pub mod elementwise;
pub mod linalg;
pub mod loss;
pub mod nn;
pub mod recurrent;
pub mod resample;
pub mod shape;
pub mod upgrade;

use dagr_onnx::error::Result;
use dagr_onnx::{GraphIndex, Model};
use std::collections::HashMap;
use std::sync::OnceLock;

/// What a rule returns: the gradient of each input (None where none flows or none is needed).
type Out = Result<Vec<Option<String>>>;

/// The upstream gradient of the op's first output, if any flows.
fn g0(g: &[Option<String>]) -> Option<&str> {
    g.first().and_then(|x| x.as_deref())
}

/// `g0`, owned (for rules that keep it across builder calls).
fn g0_owned(g: &[Option<String>]) -> Option<String> {
    g0(g).map(String::from)
}

/// One operator of the default domain: everything the tool knows about it.
pub struct Op {
    pub op: &'static str,
    /// The first schema version (an opset at which the operator's schema changed, as ONNX's
    /// history lists it) that inference and gradient cover; every later version is covered.
    pub since: i64,
    /// Shape and value inference: fills the facts of the node's outputs from its inputs'.
    pub infer: Option<infer::Rule>,
    /// How its gradient is built.
    pub kind: Kind,
    /// The gradient's formula, for people reading the registry.
    pub formula: &'static str,
    /// A faster equivalent form for training graphs, where the runtimes run the op itself
    /// slowly (`lower`).
    pub lower: Option<ctx::Lower>,
    /// The op written in other standard ops, for a runtime that lacks it (`expand_bodies`; an
    /// entry of kind `Body` has its body for that already). It computes the op's outputs; the
    /// gradient stays the entry's rule.
    pub portable: Option<ctx::Body>,
}

/// An entry (a `const fn`, so that each family's table is a static).
pub(crate) const fn op(
    op: &'static str,
    since: i64,
    infer: Option<infer::Rule>,
    kind: Kind,
    formula: &'static str,
) -> Op {
    Op {
        op,
        since,
        infer,
        kind,
        formula,
        lower: None,
        portable: None,
    }
}

impl Op {
    /// The entry with a lowering.
    pub(crate) const fn lowered(mut self, lower: ctx::Lower) -> Op {
        self.lower = Some(lower);
        self
    }
    /// The entry with a form in other standard ops (`portable`).
    pub(crate) const fn portable(mut self, form: ctx::Body) -> Op {
        self.portable = Some(form);
        self
    }
    /// The op in other standard ops, where the entry has such a form: its `portable` one, else
    /// its body (kind `Body`).
    pub fn portable_form(&self) -> Option<ctx::Body> {
        match self.kind {
            Kind::Body(body) => Some(self.portable.unwrap_or(body)),
            _ => self.portable,
        }
    }
}

/// How an op's gradient is built.
#[derive(Clone, Copy)]
pub enum Kind {
    /// A vector-Jacobian product written out: each gradient shaped like its input.
    Vjp(ctx::Vjp),
    /// The vector-Jacobian product of an op whose inputs broadcast to its output: the rule
    /// returns each input's gradient shaped like the output, and the engine sums it down to the
    /// input's shape (PyTorch's central `sum_to`; `Ctx::unbroadcast`), deciding at run time where
    /// a symbolic dim may or may not broadcast.
    Broadcast(ctx::Vjp),
    /// Differentiated through its body: the op is rewritten into primitive ops (recomputed in
    /// the backward part, the forward keeps the op itself), and the engine differentiates those.
    Body(ctx::Body),
    /// An op whose subgraphs read outer tensors (If): the rule gives the gradients of those
    /// captured tensors, which are not among the node's inputs.
    Subgraph(ctx::SubgraphVjp),
    /// Outputs that carry no gradient (shapes, constants, comparisons, indices, rounding).
    NoGradient,
    /// Inference only: no gradient rule yet, so a path to the loss through it is refused (the
    /// engine's error names the op and the node).
    NoRule,
}

impl Op {
    /// Whether the entry covers the operator as a model of default-domain opset `opset` defines
    /// it (its schema version there is `since` or later). An operator the schema table does not
    /// know is taken as covered.
    pub fn covers(&self, opset: i64) -> bool {
        schema_version(self.op, opset).is_none_or(|v| v >= self.since)
    }
    /// Whether a gradient rule exists (of any kind but `NoRule`).
    pub fn has_gradient(&self) -> bool {
        !matches!(self.kind, Kind::NoRule)
    }
}

/// The schema version of `op` in a model of default-domain opset `opset`: the largest opset not
/// above `opset` at which its schema changed. None where the table does not know the operator or
/// it did not exist yet.
pub fn schema_version(op: &str, opset: i64) -> Option<i64> {
    let i = schemas::VERSIONS.binary_search_by(|(o, _)| o.cmp(&op)).ok()?;
    schemas::VERSIONS[i].1.iter().rev().find(|&&v| v <= opset).copied()
}

/// Every entry, the families' tables in one.
pub fn registry() -> &'static [&'static Op] {
    static ALL: OnceLock<Vec<&'static Op>> = OnceLock::new();
    ALL.get_or_init(|| {
        [
            elementwise::OPS,
            linalg::OPS,
            nn::OPS,
            composite::OPS,
            loss::OPS,
            recurrent::OPS,
            resample::OPS,
            shape::OPS,
            control::OPS,
        ]
        .into_iter()
        .flatten()
        .collect()
    })
}

fn by_name() -> &'static HashMap<&'static str, &'static Op> {
    static MAP: OnceLock<HashMap<&'static str, &'static Op>> = OnceLock::new();
    MAP.get_or_init(|| registry().iter().map(|o| (o.op, *o)).collect())
}

/// The entry of an operator of the default domain.
pub fn lookup(domain: &str, op: &str) -> Option<&'static Op> {
    if !(domain.is_empty() || domain == "ai.onnx") {
        return None;
    }
    by_name().get(op).copied()
}

/// The gradient rule of an operator of the default domain: its entry where it has one.
pub fn gradient_rule(domain: &str, op: &str) -> Option<&'static Op> {
    lookup(domain, op).filter(|o| o.has_gradient())
}

/// Ops whose outputs never carry a gradient, so tests need no case for them.
pub fn is_non_differentiable(op: &str) -> bool {
    by_name().get(op).is_some_and(|r| matches!(r.kind, Kind::NoGradient))
}

/// Index a model's main graph and complete its facts with shape and value inference: what every
/// layer above reads a model through.
pub fn index(model: &Model) -> Result<GraphIndex> {
    let mut idx = GraphIndex::declared(model)?;
    idx.known = infer::infer(model, &mut idx);
    Ok(idx)
}

/// Record the type and shape inferred for every value the main graph's nodes make (its
/// `value_info`), where every dim is known or symbolic and no complete shape is recorded for it
/// yet (an exporter's entry without one, as dynamo writes for constants, is completed); entries
/// naming no value of the graph (an exporter's, for nodes a rewrite removed) are dropped.
/// Returns how many were recorded. ONNX Runtime plans memory from them: for a value whose shape
/// its own inference leaves unknown, or unrelated to another's, it cannot reuse a freed buffer,
/// and its planner scans every freed buffer for each value (6.1 of the 6.8 s that a
/// 10,600-node step graph of EfficientNet-B0 took ONNX Runtime 1.31 to load; 3.1 s in all
/// with the shapes recorded).
pub fn annotate_shapes(model: &mut Model) -> Result<usize> {
    let complete = |f: &dagr_onnx::ValueFact| {
        f.dtype != 0
            && f.shape
                .as_ref()
                .is_some_and(|s| s.iter().all(|d| !matches!(d, dagr_onnx::Dim::Unknown)))
    };
    let idx = index(model)?;
    let g = model.graph();
    let mut taken: std::collections::HashSet<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
    taken.extend(g.output.iter().map(|v| v.name.as_str()));
    taken.extend(g.initializer.iter().map(|t| t.name.as_str()));
    // value_info entry -> (its position, whether its shape is complete)
    let declared: HashMap<&str, (usize, bool)> = g
        .value_info
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let fact = v.type_.as_ref().and_then(dagr_onnx::ValueFact::from_type_proto);
            (v.name.as_str(), (k, fact.is_some_and(|f| complete(&f))))
        })
        .collect();
    let (mut add, mut completed) = (Vec::new(), Vec::new());
    let mut made = std::collections::HashSet::new();
    for o in g.node.iter().flat_map(|n| n.output.iter()).filter(|o| !o.is_empty()) {
        made.insert(o.as_str());
        let Some(f) = idx.fact(o).filter(|f| complete(f)) else {
            continue;
        };
        match declared.get(o.as_str()) {
            _ if !taken.insert(o.as_str()) => {}
            Some((_, true)) => {}
            Some(&(k, false)) => completed.push((k, f.to_value_info(o).type_)),
            None => add.push(f.to_value_info(o)),
        }
    }
    let recorded = add.len() + completed.len();
    let keep: std::collections::HashSet<String> = made.iter().chain(&taken).map(|s| s.to_string()).collect();
    let vi = &mut model.graph_mut().value_info;
    for (k, t) in completed {
        vi[k].type_ = t;
    }
    vi.retain(|v| keep.contains(&v.name));
    vi.extend(add);
    Ok(recorded)
}

/// Rewrite the nodes of the model's main graph at `positions` whose entry has a lowering
/// (`Op::lower`) into their equivalent forms, in place (the graph stays in topological order and
/// every tensor keeps its name). `idx` indexes the model as it is. Training graphs are lowered
/// after differentiation: the rules see the ops themselves, and what a user exports keeps them.
/// Returns how many nodes were rewritten.
pub fn lower(model: &mut Model, idx: &GraphIndex, positions: std::ops::Range<usize>) -> Result<usize> {
    rewrite(model, idx, positions, "lower/", |n| {
        lookup(&n.domain, &n.op_type).and_then(|o| o.lower)
    })
}

/// Rewrite every node of the model's main graph whose op `select` names and whose entry has a
/// form in other standard ops (`Op::portable_form`: the body of an op differentiated through it,
/// as Attention, RotaryEmbedding and the normalizations ONNX defines as functions; an entry's
/// `portable` form, as the loss ops') into that form, in place: for a runtime that lacks the op
/// (tract 0.23 parses Attention but cannot run it). Every tensor keeps its name. Returns how
/// many nodes were rewritten.
pub fn expand_bodies(model: &mut Model, idx: &GraphIndex, select: impl Fn(&str) -> bool) -> Result<usize> {
    let opset = model.opset();
    let all = 0..model.graph().node.len();
    rewrite(model, idx, all, "body/", |n| {
        let entry = lookup(&n.domain, &n.op_type).filter(|o| o.covers(opset) && select(&n.op_type))?;
        entry.portable_form().is_some().then_some(as_body as ctx::Lower)
    })
}

/// The node written as its entry's portable form, each output an Identity of what the form
/// computes.
fn as_body(c: &mut ctx::Ctx) -> Result<bool> {
    let Some(body) = lookup(&c.node.domain, &c.node.op_type).and_then(|o| o.portable_form()) else {
        return Ok(false);
    };
    let outs = body(c)?;
    if c.node.output.iter().skip(outs.len()).any(|o| !o.is_empty()) {
        return Ok(false);
    }
    for (made, name) in outs.iter().zip(&c.node.output) {
        if !name.is_empty() {
            c.b.op_named("Identity", &[made.as_str()], vec![], name);
        }
    }
    Ok(true)
}

/// Replace each node at `positions` for which `form` gives a rewrite by the nodes it builds.
fn rewrite(
    model: &mut Model,
    idx: &GraphIndex,
    positions: std::ops::Range<usize>,
    prefix: &str,
    form: impl Fn(&dagr_onnx::proto::NodeProto) -> Option<ctx::Lower>,
) -> Result<usize> {
    let consts = idx.int_constants();
    let mut b = dagr_onnx::builder::Builder::new(model, prefix);
    let mut spans = Vec::new();
    for i in positions {
        let n = &model.graph().node[i];
        let Some(lower) = form(n) else {
            continue;
        };
        let start = b.nodes.len();
        let mut c = ctx::Ctx {
            model,
            b: &mut b,
            idx,
            consts: &consts,
            node: n,
            differentiate: None,
        };
        if lower(&mut c)? {
            spans.push((i, start..b.nodes.len()));
        } else {
            b.nodes.truncate(start);
        }
    }
    let count = spans.len();
    let g = model.graph_mut();
    for (i, r) in spans.into_iter().rev() {
        g.node.splice(i..i + 1, b.nodes[r].iter().cloned());
    }
    g.initializer.append(&mut b.initializers);
    Ok(count)
}

/// The finite-difference cases of every rule, each module's beside its rules.
pub fn cases() -> Vec<crate::cases::Case> {
    [
        composite::cases(),
        control::cases(),
        elementwise::cases(),
        linalg::cases(),
        loss::cases(),
        nn::cases(),
        recurrent::cases(),
        resample::cases(),
        shape::cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}
