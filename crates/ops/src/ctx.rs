//! What a gradient rule sees: the forward node, facts about its tensors, a builder for the
//! backward nodes, and shared helpers (un-broadcasting, zeros, shapes) so that each rule stays
//! a few lines of math.

use dagr_onnx::builder::{attr_int, attr_tensor, Builder};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::proto::NodeProto;
use dagr_onnx::{dtype, tensor, Dim, GraphIndex};
use std::collections::HashMap;

pub struct Ctx<'a> {
    /// The model the node belongs to.
    pub model: &'a dagr_onnx::Model,
    pub b: &'a mut Builder,
    pub idx: &'a GraphIndex,
    /// Integer constants of the graph (axes, shapes, indices given as initializers/Constants).
    pub consts: &'a HashMap<String, Vec<i64>>,
    pub node: &'a NodeProto,
    /// The engine, for rules that differentiate a body they emit themselves (a recurrent
    /// cell's step, inside the backward Scan they build); none where nothing is differentiated
    /// (a lowering).
    pub differentiate: Option<Differentiate>,
}

/// A subgraph's input or output (a Scan body's, an If branch's): known dims kept, symbolic ones
/// left unnamed (a runtime resolves a body's named dims apart from the outer graph's, and tract
/// then cannot unify them with the values it runs).
pub fn body_value_info(name: &str, f: &dagr_onnx::ValueFact) -> dagr_onnx::proto::ValueInfoProto {
    let shape = f.shape.as_ref().map(|s| {
        s.iter()
            .map(|d| if d.known().is_some() { d.clone() } else { Dim::Unknown })
            .collect()
    });
    dagr_onnx::ValueFact { dtype: f.dtype, shape }.to_value_info(name)
}

/// Positions in a builder's nodes and initializers: what one rule emitted.
pub type Emitted = (std::ops::Range<usize>, std::ops::Range<usize>);

/// The engine's `differentiate_subgraph`: reverse mode over the nodes a builder emitted in a
/// range, indexed as a graph of its own whose inputs are the given (tensor, fact) pairs (those
/// whose integer values `outer`, the index of the graph they come from, knows enter as those
/// constants, so that shapes computed from them stay known); returns the gradient of each `wrt`
/// tensor that the seeds reach.
pub type Differentiate = fn(
    model: &dagr_onnx::Model,
    outer: &GraphIndex,
    b: &mut Builder,
    label: &str,
    inputs: &[(String, dagr_onnx::ValueFact)],
    range: Emitted,
    seeds: &[(String, String)],
    wrt: &[String],
) -> Result<HashMap<String, String>>;

/// The output gradients of a node (None: no gradient reaches that output) and which inputs need
/// a gradient. A rule returns one entry per input; None means "no gradient" (never a zero
/// tensor that nobody asked for).
pub type Vjp = fn(&mut Ctx, &[Option<String>], &[bool]) -> Result<Vec<Option<String>>>;

/// The vector-Jacobian product of an op with subgraphs (If, Scan): from the output gradients,
/// which inputs need one (`need`) and the outer tensors its subgraphs read that need one
/// (`captured`), the gradient of each input and of each captured tensor (None where none
/// flows).
pub type SubgraphVjp = fn(&mut Ctx, &[Option<String>], &[bool], &[String]) -> Result<SubgraphGrads>;

/// What a `SubgraphVjp` returns: (one per input, one per captured tensor).
pub type SubgraphGrads = (Vec<Option<String>>, Vec<Option<String>>);

/// A lowering: emits a computation equal to the node's (reading its inputs, writing its outputs
/// under their own names with `Builder::op_named`) that runtimes run faster in a training graph,
/// and returns true; returns false, having emitted nothing, where the node is better left as it
/// is.
pub type Lower = fn(&mut Ctx) -> Result<bool>;

/// An op written as primitive ops: emits them (reading the node's inputs) and returns the tensor
/// that equals each output of the node ("" for an output the node does not produce).
pub type Body = fn(&mut Ctx) -> Result<Vec<String>>;

impl<'a> Ctx<'a> {
    /// The same node seen through another builder (a subgraph's body).
    pub fn with_builder<'b>(&'b self, b: &'b mut Builder) -> Ctx<'b>
    where
        'a: 'b,
    {
        Ctx {
            model: self.model,
            b,
            idx: self.idx,
            consts: self.consts,
            node: self.node,
            differentiate: self.differentiate,
        }
    }

    pub fn input(&self, i: usize) -> &str {
        self.node.input.get(i).map(String::as_str).unwrap_or("")
    }
    pub fn output(&self, i: usize) -> &str {
        &self.node.output[i]
    }
    pub fn has_input(&self, i: usize) -> bool {
        !self.input(i).is_empty()
    }
    pub fn hint(&self) -> String {
        self.node.op_type.to_lowercase()
    }

    pub fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::GradientUnsupported {
            op: self.node.op_type.clone(),
            node: self.node.name.clone(),
            reason: what.to_string(),
        }
    }

    pub fn attr_i(&self, name: &str, default: i64) -> i64 {
        dagr_onnx::attr::attr_i(self.node, name).unwrap_or(default)
    }
    pub fn attr_f(&self, name: &str, default: f32) -> f32 {
        dagr_onnx::attr::attr_f(self.node, name).unwrap_or(default)
    }
    pub fn attr_ints(&self, name: &str) -> Option<Vec<i64>> {
        dagr_onnx::attr::attr_ints(self.node, name)
    }
    pub fn attr_s(&self, name: &str) -> Option<String> {
        dagr_onnx::attr::attr_s(self.node, name)
    }

    pub fn shape(&self, t: &str) -> Result<Vec<Dim>> {
        self.idx
            .fact(t)
            .and_then(|f| f.shape.clone())
            .ok_or_else(|| Error::ShapeUnknown {
                tensor: t.to_string(),
                context: format!(
                    ", so the gradient of {} node '{}' cannot be built",
                    self.node.op_type, self.node.name
                ),
            })
    }
    pub fn rank(&self, t: &str) -> Result<usize> {
        Ok(self.shape(t)?.len())
    }
    pub fn dtype(&self, t: &str) -> i32 {
        self.idx.fact(t).map(|f| f.dtype).unwrap_or(dtype::FLOAT)
    }
    /// Known sizes of all dims of `t`.
    pub fn known_shape(&self, t: &str) -> Result<Vec<i64>> {
        self.shape(t)?
            .iter()
            .map(|d| match d {
                Dim::Known(v) => Ok(*v),
                _ => Err(self.err(format!("'{t}' needs a static shape here, it has {:?}", self.shape(t)))),
            })
            .collect()
    }
    /// Dim `axis` of `t`, which must be known at build time.
    pub fn known_dim(&self, t: &str, axis: usize) -> Result<i64> {
        self.shape(t)?
            .get(axis)
            .and_then(Dim::known)
            .ok_or_else(|| self.err(format!("dim {axis} of '{t}' must be known when the graph is built")))
    }
    /// An integer constant input (axes, shape, indices) known at build time.
    pub fn const_input(&self, i: usize) -> Option<Vec<i64>> {
        self.consts.get(self.input(i)).cloned()
    }
    /// The axes of a reduction: attribute before the opset that made them an input.
    pub fn reduce_axes(&self, rank: usize) -> Result<Option<Vec<usize>>> {
        let as_input = if self.node.op_type == "ReduceSum" {
            self.b.opset >= 13
        } else {
            self.b.opset >= 18
        };
        let raw = if as_input {
            if self.has_input(1) {
                Some(
                    self.const_input(1)
                        .ok_or_else(|| self.err("its axes must be a constant"))?,
                )
            } else {
                None
            }
        } else {
            self.attr_ints("axes")
        };
        Ok(raw.map(|a| a.iter().map(|&x| norm_axis(x, rank)).collect()))
    }

    // ---- emitting helpers ------------------------------------------------------------

    pub fn op(&mut self, op: &str, inputs: &[&str]) -> String {
        let h = self.hint();
        self.b.op(op, inputs, vec![], &h)
    }
    pub fn op_a(&mut self, op: &str, inputs: &[&str], attrs: Vec<dagr_onnx::proto::AttributeProto>) -> String {
        let h = self.hint();
        self.b.op(op, inputs, attrs, &h)
    }
    /// A scalar constant in the op's float type (`float_type`): float16 and bfloat16 segments
    /// get constants of their own type.
    pub fn scalar(&mut self, v: f64) -> String {
        let t = self.float_type();
        self.b.scalar_of(v, t)
    }
    /// The float type the op computes in: its first output's, else its first float input's
    /// (float32 when no fact says).
    pub fn float_type(&self) -> i32 {
        let n = self.node;
        n.output
            .iter()
            .take(1)
            .chain(n.input.iter())
            .filter_map(|t| self.idx.fact(t).map(|f| f.dtype))
            .find(|&d| dtype::is_float(d))
            .unwrap_or(dtype::FLOAT)
    }
    /// A constant tensor of ones in the op's float type.
    pub fn ones(&mut self, dims: &[i64]) -> String {
        let n: i64 = dims.iter().product();
        self.floats(dims, &vec![1.0; n as usize])
    }
    /// A constant tensor of these values in the op's float type.
    pub fn floats(&mut self, dims: &[i64], values: &[f64]) -> String {
        let name = self.b.name("const");
        let t = tensor::float_tensor(&name, dims, values, self.float_type());
        self.b.initializers.push(t);
        name
    }
    /// `t` (a mask, a count) cast to the op's float type.
    pub fn to_float(&mut self, t: &str) -> String {
        let to = self.float_type();
        self.cast(t, to)
    }
    pub fn ints(&mut self, v: &[i64]) -> String {
        self.b.const_i64(v)
    }
    pub fn shape_of(&mut self, t: &str) -> String {
        self.op("Shape", &[t])
    }
    pub fn reduce_sum(&mut self, x: &str, axes: &[i64], keepdims: bool) -> String {
        self.reduce("ReduceSum", x, axes, keepdims)
    }
    /// A reduction `op` over constant `axes` (an attribute or an input, as the opset wants).
    pub fn reduce(&mut self, op: &str, x: &str, axes: &[i64], keepdims: bool) -> String {
        let h = self.hint();
        self.b.reduce(op, x, Some(axes), keepdims, &h)
    }
    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let h = self.hint();
        self.b.unsqueeze(x, axes, &h)
    }
    pub fn cast(&mut self, x: &str, to: i32) -> String {
        self.op_a("Cast", &[x], vec![attr_int("to", to as i64)])
    }
    /// Zeros shaped like `t`, of its float type (the op's where `t` is not a float tensor with
    /// a known type).
    pub fn zeros_like(&mut self, t: &str) -> String {
        let elem = match self.idx.fact(t).map(|f| f.dtype) {
            Some(d) if dtype::is_float(d) => d,
            _ => self.float_type(),
        };
        let s = self.shape_of(t);
        let z = tensor::float_tensor("", &[1], &[0.0], elem);
        self.op_a("ConstantOfShape", &[&s], vec![attr_tensor("value", z)])
    }
    /// Same as `zeros_like`, for tensors the rule itself made (no facts needed).
    pub fn zeros_like_dynamic(&mut self, t: &str) -> String {
        self.zeros_like(t)
    }
    /// A reduced gradient reshaped to a parameter's own shape.
    pub fn unbroadcast_to(&mut self, g: &str, target: &str) -> Result<String> {
        Ok(self.reshape_like(g, target))
    }
    /// Reshape `g` to the shape of `t`: an initializer's (a parameter's) as a constant, whose
    /// dims its data fixes; `Shape(t)` of any other tensor, whose inferred dims a body's
    /// differentiation may see otherwise than they run (a recurrent cell's step).
    pub fn reshape_like(&mut self, g: &str, t: &str) -> String {
        let fixed = self.idx.initializers.contains(t).then(|| self.shape(t).ok()).flatten();
        let s = match fixed.and_then(|d| d.iter().map(Dim::known).collect::<Option<Vec<i64>>>()) {
            Some(dims) => self.ints(&dims),
            None => self.shape_of(t),
        };
        self.op("Reshape", &[g, &s])
    }

    /// Sum `g` (shaped like the broadcast result `y`) back to the shape of input `x`.
    pub fn unbroadcast(&mut self, g: &str, x: &str, y: &str) -> Result<String> {
        let xs = self.shape(x)?;
        let ys = self.shape(y)?;
        if xs == ys {
            return Ok(g.to_string());
        }
        Ok(self.sum_to(g, &ys, &xs, x))
    }

    /// Sum `g` (dims `gd`) down to dims `xd` (numpy broadcasting), then reshape like `like`:
    /// the leading axes `xd` lacks, plus every axis where `xd` has size 1 and `gd` may not.
    /// Where `xd` has a symbolic dim not known to equal `gd`'s, whether it broadcasts is decided
    /// at run time (ONNX Runtime's dynamic broadcast fallback, in standard ops): the axis summed
    /// with `keepdims`, chosen by `Where(dim == 1)`, then sliced to the dim's length. The
    /// reduction axes stay constants (tract needs them so).
    pub fn sum_to(&mut self, g: &str, gd: &[Dim], xd: &[Dim], like: &str) -> String {
        let lead = gd.len().saturating_sub(xd.len());
        let mut axes: Vec<i64> = (0..lead as i64).collect();
        let mut undecided = Vec::new();
        for (i, d) in xd.iter().enumerate() {
            let o = gd.get(lead + i);
            match d {
                Dim::Known(1) if o != Some(&Dim::Known(1)) => axes.push((lead + i) as i64),
                Dim::Known(_) => {}
                _ if o == Some(d) || o == Some(&Dim::Known(1)) => {}
                _ => undecided.push(i),
            }
        }
        let mut summed = if axes.is_empty() {
            g.to_string()
        } else {
            self.reduce_sum(g, &axes, true)
        };
        // Run-time decisions need `like`'s own dims, axis for axis.
        let aligned = self.idx.fact(like).and_then(|f| f.rank()) == Some(xd.len());
        if aligned && !undecided.is_empty() {
            let shape = self.shape_of(like);
            let one = self.b.scalar_i64(1);
            let start = self.ints(&[0]);
            for i in undecided {
                let a = (lead + i) as i64;
                let at = self.b.scalar_i64(i as i64);
                let d = self.op_a("Gather", &[&shape, &at], vec![attr_int("axis", 0)]);
                let is_one = self.op("Equal", &[&d, &one]);
                let red = self.reduce_sum(&summed, &[a], true);
                let picked = self.op("Where", &[&is_one, &red, &summed]);
                let end = self.unsqueeze(&d, &[0]);
                let ax = self.ints(&[a]);
                summed = self.op("Slice", &[&picked, &start, &end, &ax]);
            }
        }
        self.reshape_like(&summed, like)
    }

    /// Dim `axis` of `t` at run time, an int64 scalar.
    pub fn dim_of(&mut self, t: &str, axis: i64) -> String {
        let s = self.shape_of(t);
        let a = self.b.scalar_i64(axis);
        self.op_a("Gather", &[&s, &a], vec![attr_int("axis", 0)])
    }

    /// Dim `axis` of `t` at run time as a one-element int64 vector (a piece of a shape or of
    /// Pad's pads, joined by Concat).
    pub fn dim_vec_of(&mut self, t: &str, axis: usize) -> String {
        let s = self.shape_of(t);
        let (from, to) = (self.ints(&[axis as i64]), self.ints(&[axis as i64 + 1]));
        self.op("Slice", &[&s, &from, &to])
    }

    /// Pad's pads for a rank-`rank` tensor, zeros but on `axis`: `before` and `after`, one-element
    /// int64 vectors computed at run time.
    pub fn pads_on_axis(&mut self, rank: usize, axis: usize, before: String, after: String) -> String {
        let zero = self.ints(&[0]);
        let mut parts: Vec<String> = (0..2 * rank).map(|_| zero.clone()).collect();
        parts[axis] = before;
        parts[axis + rank] = after;
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.op_a("Concat", &refs, vec![attr_int("axis", 0)])
    }

    /// `size(a) / size(b)` as a scalar of the op's float type: the number of elements a reduction folded.
    pub fn size_ratio(&mut self, a: &str, b: &str) -> String {
        let sa = self.op("Size", &[a]);
        let sb = self.op("Size", &[b]);
        let sa = self.to_float(&sa);
        let sb = self.to_float(&sb);
        self.op("Div", &[&sa, &sb])
    }
}

pub fn norm_axis(a: i64, rank: usize) -> usize {
    if a < 0 {
        (a + rank as i64).max(0) as usize
    } else {
        a as usize
    }
}

impl Ctx<'_> {
    /// A builder for a subgraph's body (a Scan's step, an If's branch): names fresh in the whole
    /// model (subgraphs may not shadow outer names); hand its names back to `b` when the body
    /// is done (`self.b.names = body.names`).
    pub fn body_builder(&self) -> Builder {
        let mut b = Builder::new(self.model, &self.b.prefix);
        b.names = self.b.names.clone();
        b.opset = self.b.opset;
        b
    }

    /// The engine (`differentiate`), or an error naming `label` where there is none (a
    /// lowering's context).
    pub fn engine(&self, label: &str) -> Result<Differentiate> {
        self.differentiate
            .ok_or_else(|| Error::Internal(format!("{label}: differentiated where nothing is (a lowering)")))
    }

    /// Differentiate what the rule emitted in `range` (of its builder's nodes and
    /// initializers), as a graph of its own whose inputs are the node's inputs: the gradient of
    /// each input that `need` asks for, from the `seeds` on emitted tensors.
    pub fn differentiate_emitted(
        &mut self,
        range: Emitted,
        seeds: &[(String, String)],
        need: &[bool],
    ) -> Result<Vec<Option<String>>> {
        let n = self.node;
        let mut inputs: Vec<(String, dagr_onnx::ValueFact)> = Vec::new();
        for x in n.input.iter().filter(|x| !x.is_empty()) {
            if !inputs.iter().any(|(i, _)| i == x) {
                let f = self.idx.fact(x).ok_or_else(|| Error::ShapeUnknown {
                    tensor: x.to_string(),
                    context: format!(", so the gradient of {} node '{}' cannot be built", n.op_type, n.name),
                })?;
                inputs.push((x.clone(), f.clone()));
            }
        }
        let wrt: Vec<String> = inputs
            .iter()
            .map(|(x, _)| x.clone())
            .filter(|x| n.input.iter().zip(need).any(|(i, &w)| w && i == x))
            .collect();
        let label = format!("{} node '{}'", n.op_type, n.name);
        let mut grads = self.engine(&label)?(self.model, self.idx, self.b, &label, &inputs, range, seeds, &wrt)?;
        Ok(n.input
            .iter()
            .zip(need)
            .map(|(x, &w)| if w { grads.remove(x) } else { None })
            .collect())
    }
}
