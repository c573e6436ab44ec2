//! Loss operators.

use super::Out;
use crate::ctx::Ctx;
use crate::Kind::{NoRule, Vjp};
use crate::{op, Op};
use dagr_onnx::builder::attr_int;
use dagr_onnx::{dtype, Dim};

/// This family's operators, each one entry: name, the first schema version covered, shape
/// inference, gradient, formula.
pub(crate) static OPS: &[Op] = &[
    op(
        "SoftmaxCrossEntropyLoss",
        12,
        Some(shapes::loss),
        Vjp(softmax_cross_entropy),
        "dS = (softmax(S) - onehot(y)) g / N",
    ),
    op(
        "NegativeLogLikelihoodLoss",
        12,
        Some(shapes::loss),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
];

/// Shape (and value) inference of this family's operators.
pub(crate) mod shapes {
    use crate::infer::Node;

    pub(crate) fn loss(c: &mut Node) -> Option<()> {
        let red = c.attr_s("reduction").unwrap_or_else(|| "mean".into());
        let l = if red == "none" { c.shape(1) } else { Some(vec![]) };
        c.set(0, c.dtype(0), l);
        c.same(1, 0);
        Some(())
    }
}

/// SoftmaxCrossEntropyLoss (no weights, no ignore_index): d scores = (softmax - onehot) scaled
/// by the output gradient and the reduction.
pub fn softmax_cross_entropy(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    if g.get(1).is_some_and(Option::is_some) {
        return Err(c.err("a gradient through its log_prob output is not supported"));
    }
    let Some(g) = g.first().and_then(|x| x.clone()) else {
        return Ok(vec![None; need.len()]);
    };
    if c.has_input(2) {
        return Err(c.err("class weights are not supported"));
    }
    if dagr_onnx::attr::attr(c.node, "ignore_index").is_some() {
        return Err(c.err("ignore_index is not supported"));
    }
    let scores = c.input(0).to_string();
    let labels = c.input(1).to_string();
    let ss = c.shape(&scores)?;
    let p = c.op_a("Softmax", &[&scores], vec![attr_int("axis", 1)]);
    // The class count: a constant, or read from the scores' shape at run time.
    let depth = match ss.get(1) {
        Some(Dim::Known(v)) => c.ints(&[*v]),
        _ => {
            let s = c.shape_of(&scores);
            let (a, b) = (c.ints(&[1]), c.ints(&[2]));
            c.op("Slice", &[&s, &a, &b])
        }
    };
    let values = c.b.const_f32(&[2], &[0.0, 1.0]);
    let lab = if c.dtype(&labels) != dtype::INT64 {
        c.cast(&labels, dtype::INT64)
    } else {
        labels
    };
    let onehot = c.op_a("OneHot", &[&lab, &depth, &values], vec![attr_int("axis", 1)]);
    let d = c.op("Sub", &[&p, &onehot]);
    let red = c.attr_s("reduction").unwrap_or_else(|| "mean".into());
    let scaled = match red.as_str() {
        "none" => {
            let gu = c.unsqueeze(&g, &[1]);
            c.op("Mul", &[&d, &gu])
        }
        "sum" => c.op("Mul", &[&d, &g]),
        _ => {
            let sl = c.op("Size", &[&lab]);
            let n = c.cast(&sl, dtype::FLOAT);
            let t = c.op("Mul", &[&d, &g]);
            c.op("Div", &[&t, &n])
        }
    };
    let mut v = vec![Some(scaled)];
    v.resize(need.len(), None);
    Ok(v)
}

/// Finite-difference cases of this module's ops (see `crate::cases`).
pub fn cases() -> Vec<crate::cases::Case> {
    use crate::cases::*;
    vec![case(
        "softmax_cross_entropy",
        "SoftmaxCrossEntropyLoss",
        vec![x(&[4, 5]), In::Ints(vec![4], vec![1, 0, 4, 2])],
    )
    .only(ORT_ONLY)]
}
