//! Loss operators.

use super::Out;
use crate::ctx::Ctx;
use crate::Kind::Vjp;
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
        "t = -onehot(y) w[y] g (as NLL) + g_logprob, dS = t - softmax(S) sum_c t",
    )
    .portable(softmax_cross_entropy_form),
    op(
        "NegativeLogLikelihoodLoss",
        12,
        Some(shapes::loss),
        Vjp(negative_log_likelihood),
        "dX = -onehot(y) w[y] g (0 where y is ignored; mean: g / sum w[y])",
    )
    .portable(negative_log_likelihood_form),
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

/// SoftmaxCrossEntropyLoss: the NegativeLogLikelihoodLoss of log_softmax(scores) over axis 1
/// (class weights, `ignore_index`, every reduction, [N, C, d...] scores), and its `log_prob`
/// output. With t the gradient reaching log_prob (from the loss and the output itself),
/// d scores = t - softmax(scores) sum_c t.
pub fn softmax_cross_entropy(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let g_loss = g.first().cloned().flatten();
    let g_lp = g.get(1).cloned().flatten();
    if g_loss.is_none() && g_lp.is_none() {
        return Ok(vec![None; need.len()]);
    }
    let scores = c.input(0).to_string();
    let t = match (g_loss, g_lp) {
        (Some(gl), Some(gp)) => {
            let t = nll_input_grad(c, &scores, &gl)?;
            c.op("Add", &[&t, &gp])
        }
        (Some(gl), None) => nll_input_grad(c, &scores, &gl)?,
        (None, Some(gp)) => gp,
        (None, None) => unreachable!("returned above"),
    };
    let p = softmax_axis1(c, &scores)?;
    let sum = c.reduce_sum(&t, &[1], true);
    let ps = c.op("Mul", &[&p, &sum]);
    let mut v = vec![Some(c.op("Sub", &[&t, &ps]))];
    v.resize(need.len(), None);
    Ok(v)
}

/// NegativeLogLikelihoodLoss (class weights, `ignore_index`, every reduction, [N, C, d...]):
/// d input = -onehot(target) w[target] G, zero where the target is ignored, G the output
/// gradient (over the summed weights of the targets for `mean`). The class weights get none:
/// they are fixed in practice (PyTorch's `weight=` a constant or a buffer, which the legacy
/// exporter writes as an initializer that a gradient would train).
pub fn negative_log_likelihood(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g.first().cloned().flatten() else {
        return Ok(vec![None; need.len()]);
    };
    let input = c.input(0).to_string();
    let mut v = vec![Some(nll_input_grad(c, &input, &g)?)];
    v.resize(need.len(), None);
    Ok(v)
}

/// What the targets of a NegativeLogLikelihoodLoss-shaped node (its inputs 1 and 2, the targets
/// and class weights, and its attributes `ignore_index` and `reduction`) select.
struct Targets {
    /// The targets as int64, those `ignore_index` removes made 0 (a valid class to read).
    target: String,
    /// Each target's weight, [N, d...]: its class weight, 0 where ignored (None: 1 everywhere).
    weight: Option<String>,
    reduction: String,
}

fn targets(c: &mut Ctx) -> dagr_onnx::Result<Targets> {
    let labels = c.input(1).to_string();
    let labels = if c.dtype(&labels) != dtype::INT64 {
        c.cast(&labels, dtype::INT64)
    } else {
        labels
    };
    let ignore = dagr_onnx::attr::attr(c.node, "ignore_index").map(|a| a.i);
    let (target, mask) = match ignore {
        Some(i) => {
            let ig = c.b.scalar_i64(i);
            let eq = c.op("Equal", &[&labels, &ig]);
            let keep = c.op("Not", &[&eq]);
            let zero = c.b.scalar_i64(0);
            let target = c.op("Where", &[&keep, &labels, &zero]);
            (target, Some(c.to_float(&keep)))
        }
        None => (labels, None),
    };
    let weight = if c.has_input(2) {
        let weights = c.input(2).to_string();
        let wt = c.op_a("Gather", &[&weights, &target], vec![attr_int("axis", 0)]);
        Some(match &mask {
            Some(m) => c.op("Mul", &[&wt, m]),
            None => wt,
        })
    } else {
        mask
    };
    let reduction = c.attr_s("reduction").unwrap_or_else(|| "mean".into());
    if !["none", "sum", "mean"].contains(&reduction.as_str()) {
        return Err(c.err(format!("reduction '{reduction}' is not one the spec defines")));
    }
    Ok(Targets {
        target,
        weight,
        reduction,
    })
}

impl Targets {
    /// `v` over what `mean` divides by: the targets' summed weights (their count, unweighted).
    fn over_mean_divisor(&self, c: &mut Ctx, v: &str) -> String {
        let total = match &self.weight {
            Some(w) => {
                let h = c.hint();
                c.b.reduce("ReduceSum", w, None, false, &h)
            }
            None => {
                let n = c.op("Size", &[&self.target]);
                c.to_float(&n)
            }
        };
        c.op("Div", &[v, &total])
    }
}

/// The gradient of a NegativeLogLikelihoodLoss-shaped loss (this node's inputs 1 and 2, its
/// attributes, `Targets`) with respect to its [N, C, d...] input `x`, for the loss gradient `g`.
fn nll_input_grad(c: &mut Ctx, x: &str, g: &str) -> dagr_onnx::Result<String> {
    let xs = c.shape(x)?;
    if xs.len() < 2 {
        return Err(c.err("its input must have a batch and a class axis"));
    }
    let t = targets(c)?;
    let scaled = match t.reduction.as_str() {
        "mean" => t.over_mean_divisor(c, g),
        _ => g.to_string(),
    };
    let wg = match &t.weight {
        Some(w) => c.op("Mul", &[w, &scaled]),
        None => scaled,
    };
    // [N, d...] (or a scalar) against onehot [N, C, d...]: the class axis inserted.
    let wg = if t.reduction == "none" || t.weight.is_some() {
        c.unsqueeze(&wg, &[1])
    } else {
        wg
    };
    let depth = match &xs[1] {
        Dim::Known(v) => c.ints(&[*v]),
        _ => {
            let s = c.shape_of(x);
            let (a, b) = (c.ints(&[1]), c.ints(&[2]));
            c.op("Slice", &[&s, &a, &b])
        }
    };
    let values = c.floats(&[2], &[0.0, -1.0]);
    let onehot = c.op_a("OneHot", &[&t.target, &depth, &values], vec![attr_int("axis", 1)]);
    Ok(c.op("Mul", &[&onehot, &wg]))
}

/// The NegativeLogLikelihoodLoss of [N, C, d...] `x` (this node's targets, weights and
/// attributes; `x` shaped as its input 0): -x[n, target, d...] weight[n, d...], reduced.
fn nll_loss(c: &mut Ctx, x: &str) -> dagr_onnx::Result<String> {
    if c.rank(c.input(0))? < 2 {
        return Err(c.err("its input must have a batch and a class axis"));
    }
    let t = targets(c)?;
    let at = c.unsqueeze(&t.target, &[1]);
    let picked = c.op_a("GatherElements", &[x, &at], vec![attr_int("axis", 1)]);
    let picked = c.reduce_sum(&picked, &[1], false);
    let each = match &t.weight {
        Some(w) => c.op("Mul", &[&picked, w]),
        None => picked,
    };
    let each = c.op("Neg", &[&each]);
    if t.reduction == "none" {
        return Ok(each);
    }
    let h = c.hint();
    let sum = c.b.reduce("ReduceSum", &each, None, false, &h);
    Ok(match t.reduction.as_str() {
        "mean" => t.over_mean_divisor(c, &sum),
        _ => sum,
    })
}

/// NegativeLogLikelihoodLoss in other standard ops (GatherElements, Gather, reductions), for a
/// runtime without it.
fn negative_log_likelihood_form(c: &mut Ctx) -> dagr_onnx::Result<Vec<String>> {
    let x = c.input(0).to_string();
    Ok(vec![nll_loss(c, &x)?])
}

/// SoftmaxCrossEntropyLoss in other standard ops: its NegativeLogLikelihoodLoss of
/// log_softmax(scores) over axis 1, and that log_softmax (`log_prob`).
fn softmax_cross_entropy_form(c: &mut Ctx) -> dagr_onnx::Result<Vec<String>> {
    let scores = c.input(0).to_string();
    let lp = log_softmax_axis1(c, &scores)?;
    Ok(vec![nll_loss(c, &lp)?, lp])
}

/// LogSoftmax over axis 1 of [N, C, d...] (`normalized_axis1`).
fn log_softmax_axis1(c: &mut Ctx, x: &str) -> dagr_onnx::Result<String> {
    normalized_axis1(c, x, true)
}

/// Softmax over axis 1 of [N, C, d...] (`normalized_axis1`).
fn softmax_axis1(c: &mut Ctx, x: &str) -> dagr_onnx::Result<String> {
    normalized_axis1(c, x, false)
}

/// Softmax (or LogSoftmax, `log`) over axis 1 of [N, C, d...]: the op itself where it normalizes
/// one axis (opset 13 on, or a matrix), else written out (older ones flatten the axes from
/// `axis` on).
fn normalized_axis1(c: &mut Ctx, x: &str, log: bool) -> dagr_onnx::Result<String> {
    let rank = c.shape(x)?.len();
    if c.b.opset >= 13 || rank == 2 {
        let op = if log { "LogSoftmax" } else { "Softmax" };
        return Ok(c.op_a(op, &[x], vec![attr_int("axis", 1)]));
    }
    let m = c.reduce("ReduceMax", x, &[1], true);
    let d = c.op("Sub", &[x, &m]);
    let e = c.op("Exp", &[&d]);
    let s = c.reduce_sum(&e, &[1], true);
    if log {
        let l = c.op("Log", &[&s]);
        return Ok(c.op("Sub", &[&d, &l]));
    }
    Ok(c.op("Div", &[&e, &s]))
}

/// Finite-difference cases of this module's ops (see `crate::cases`): PyTorch's export of
/// `F.cross_entropy` (ignore_index -100, a target that is ignored), class weights with an
/// ignored class that targets use, [N, C, d] scores, every reduction, the log_prob output.
pub fn cases() -> Vec<crate::cases::Case> {
    use crate::cases::*;
    use dagr_onnx::builder::{attr_int, attr_string};
    let labels = |v: &[i64]| In::Ints(vec![v.len() as i64], v.to_vec());
    let weights = In::F(vec![5], vec![0.5, 1.0, 2.0, 0.25, 1.5]);
    let red = |r: &str| attr_string("reduction", r);
    let mut out = Vec::new();
    for op in ["SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"] {
        let sce = op == "SoftmaxCrossEntropyLoss";
        let name = |a: &'static str, b: &'static str| if sce { a } else { b };
        out.extend([
            case(
                name("sce_mean", "nll_mean"),
                op,
                vec![x(&[4, 5]), labels(&[1, 0, 4, 2])],
            ),
            case(
                name("sce_torch_ignore_index", "nll_torch_ignore_index"),
                op,
                vec![x(&[4, 5]), labels(&[1, -100, 4, 2])],
            )
            .attrs(vec![attr_int("ignore_index", -100), red("mean")]),
            case(
                name("sce_weights_ignored_class", "nll_weights_ignored_class"),
                op,
                vec![x(&[4, 5]), labels(&[2, 0, 4, 2]), weights.clone()],
            )
            .attrs(vec![attr_int("ignore_index", 2)]),
            case(
                name("sce_weights_sum", "nll_weights_sum"),
                op,
                vec![x(&[4, 5]), labels(&[3, 0, 4, 3]), weights.clone()],
            )
            .attrs(vec![red("sum")]),
            case(
                name("sce_spatial_none", "nll_spatial_none"),
                op,
                vec![x(&[2, 3, 4]), In::Ints(vec![2, 4], vec![0, 2, 1, 1, 2, 0, 0, 1])],
            )
            .attrs(vec![red("none")]),
            case(
                name("sce_spatial_weights_mean", "nll_spatial_weights_mean"),
                op,
                vec![
                    x(&[2, 5, 3]),
                    In::Ints(vec![2, 3], vec![0, 4, 1, 3, 3, 2]),
                    weights.clone(),
                ],
            )
            .attrs(vec![attr_int("ignore_index", 3)]),
        ]);
    }
    out.extend([
        // Both outputs in the loss: the gradient reaching log_prob too.
        case(
            "sce_log_prob",
            "SoftmaxCrossEntropyLoss",
            vec![x(&[3, 4]), labels(&[1, 3, 0])],
        )
        .attrs(vec![red("sum")])
        .all_outputs(2),
        // Opset 12: Softmax flattens the axes from its axis on, so softmax over the class axis of
        // [N, C, d] is written out.
        case(
            "sce_spatial_opset12",
            "SoftmaxCrossEntropyLoss",
            vec![x(&[2, 3, 4]), In::Ints(vec![2, 4], vec![0, 2, 1, 1, 2, 0, 0, 1])],
        )
        .opset(12),
    ]);
    out
}
