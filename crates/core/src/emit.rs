//! The DAGR subgraph in standard ONNX operators: normalization, dispersion, anchoring, their
//! weighted sum, and the analytic gradient `dL_DAGR/dz` of every encoder output (spec 1-4, 6, 7).
//!
//! The backward nodes are written by hand from the closed forms below rather than by generic
//! autodiff, so that the whole regularizer costs one Gram matrix per modality in each direction.
//!
//! Pairwise squared distances come from the Gram matrix `G = U U^T` as
//! `delta_ij = q_i + q_j - 2 G_ij` with `q_i = ||u_i||^2` (exact even for a zero row). For any
//! loss `f = sum_{i != j} c_ij delta_ij` with `C` symmetric, `df/dU = 4 (rowsum(C) * U - C U)`;
//! both dispersion potentials reduce to choosing `C`.

use crate::config::{Config, Dispersion, Reduce, Variant, DIST_EPS, NORM_EPS};
use dagr_onnx::builder::{attr_int, attr_tensor, Builder};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{dtype, tensor};

/// An encoder output as the subgraph sees it.
#[derive(Debug, Clone)]
pub struct EncoderInput {
    pub modality: String,
    pub tensor: String,
    pub dtype: i32,
    pub rank: usize,
}

/// Names of the tensors the subgraph computes.
#[derive(Debug, Clone, Default)]
pub struct Emitted {
    pub loss: String,
    pub dispersion: String,
    pub dispersion_per_modality: Vec<String>,
    /// Absent when the widths differ and the variant does not anchor.
    pub anchoring: Option<String>,
    pub embeddings: Vec<String>,
    pub grads: Vec<String>,
    /// With `separate_terms`: (dL_disp/dz, dL_anc/dz) per encoder, unweighted.
    pub term_grads: Option<(Vec<String>, Vec<String>)>,
}

/// Large negative logit for masked (diagonal) pairs: exp of it underflows to exactly 0.
const MASKED: f32 = -1e30;

struct Normalized {
    /// `[B, D]` fp32 input of the normalization
    x: String,
    u: String,
    /// `||x_i||`, `[B, 1]`
    norm: String,
    /// `max(||x_i||, eps)`, `[B, 1]`
    denom: String,
}

fn normalize(b: &mut Builder, e: &EncoderInput, reduce: Reduce) -> Result<Normalized> {
    let h = e.modality.to_string();
    let mut x = e.tensor.clone();
    if e.dtype != dtype::FLOAT {
        x = b.cast(&x, dtype::FLOAT, &h);
    }
    x = match (e.rank, reduce) {
        (0 | 1, _) => {
            return Err(Error::Encoder(format!(
                "the encoder output '{}' ({}) has rank {}; DAGR needs per-sample features of shape [batch, ...]",
                e.tensor, e.modality, e.rank
            )))
        }
        (2, _) => x,
        (_, Reduce::Flatten) => b.op("Flatten", &[&x], vec![attr_int("axis", 1)], &h),
        (r, Reduce::Mean) => {
            let axes: Vec<i64> = (1..r as i64 - 1).collect();
            b.reduce("ReduceMean", &x, Some(&axes), false, &h)
        }
    };
    let sq = b.binary("Mul", &x, &x, &h);
    let sumsq = b.reduce("ReduceSum", &sq, Some(&[1]), true, &h);
    let norm = b.unary("Sqrt", &sumsq, &h);
    let eps = b.scalar(NORM_EPS);
    let denom = b.binary("Max", &norm, &eps, &h);
    let u = b.binary("Div", &x, &denom, &h);
    Ok(Normalized { x, u, norm, denom })
}

/// `4 (rowsum(C) * U - C U)`: the gradient of `sum c_ij delta_ij` with respect to `U`.
fn pairwise_backward(b: &mut Builder, c: &str, u: &str, h: &str) -> String {
    let rs = b.reduce("ReduceSum", c, Some(&[1]), true, h);
    let radial = b.binary("Mul", &rs, u, h);
    let cu = b.binary("MatMul", c, u, h);
    let diff = b.binary("Sub", &radial, &cu, h);
    let four = b.scalar(4.0);
    b.binary("Mul", &diff, &four, h)
}

/// Dispersion of one modality: (loss scalar, dL/dU).
fn dispersion(b: &mut Builder, u: &str, cfg: &Config, h: &str) -> (String, String) {
    let ut = b.op(
        "Transpose",
        &[u],
        vec![dagr_onnx::builder::attr_ints("perm", &[1, 0])],
        h,
    );
    let gram = b.binary("MatMul", u, &ut, h);
    let uu = b.binary("Mul", u, u, h);
    let q = b.reduce("ReduceSum", &uu, Some(&[1]), true, h);
    let qt = b.op(
        "Transpose",
        &[&q],
        vec![dagr_onnx::builder::attr_ints("perm", &[1, 0])],
        h,
    );
    let qq = b.binary("Add", &q, &qt, h);
    let two = b.scalar(2.0);
    let g2 = b.binary("Mul", &gram, &two, h);
    let dist2 = b.binary("Sub", &qq, &g2, h);
    // Diagonal mask and the number of ordered pairs B(B-1) (dynamic batch).
    let eye = b.op("EyeLike", &[&gram], vec![], h);
    let half = b.scalar(0.5);
    let diag = b.binary("Greater", &eye, &half, h);
    let one = b.scalar(1.0);
    let off = b.binary("Sub", &one, &eye, h);
    let bf = b.dim_f32(u, 0, h);
    let bm1 = b.binary("Sub", &bf, &one, h);
    let cnt = b.binary("Mul", &bf, &bm1, h);
    let cnt_safe = b.binary("Max", &cnt, &one, h);
    let has_pairs = b.binary("Greater", &bf, &one, h);
    let zero = b.scalar(0.0);
    match cfg.dispersion {
        Dispersion::Rbf => {
            let neg_inv_tau = b.scalar(-1.0 / cfg.tau);
            let s = b.binary("Mul", &dist2, &neg_inv_tau, h);
            let masked = b.scalar(MASKED as f64);
            let s = b.op("Where", &[&diag, &masked, &s], vec![], h);
            let mx = b.reduce("ReduceMax", &s, None, false, h);
            let sh = b.binary("Sub", &s, &mx, h);
            let e = b.unary("Exp", &sh, h);
            let sum = b.reduce("ReduceSum", &e, None, false, h);
            let lse = b.unary("Log", &sum, h);
            let lcnt = b.unary("Log", &cnt_safe, h);
            let raw = b.binary("Add", &mx, &lse, h);
            let raw = b.binary("Sub", &raw, &lcnt, h);
            let loss = b.op("Where", &[&has_pairs, &raw, &zero], vec![], h);
            // dL/ds = softmax over the off-diagonal pairs; ds/d(delta) = -1/tau.
            let w = b.binary("Div", &e, &sum, h);
            let w = b.binary("Mul", &w, &off, h);
            let c = b.binary("Mul", &w, &neg_inv_tau, h);
            let g = pairwise_backward(b, &c, u, h);
            (loss, g)
        }
        Dispersion::Hinge { margin } => {
            let z = b.scalar(0.0);
            let d2 = b.binary("Max", &dist2, &z, h);
            let eps = b.scalar(DIST_EPS);
            let d2 = b.binary("Add", &d2, &eps, h);
            let d = b.unary("Sqrt", &d2, h);
            let r = b.scalar(margin);
            let gap = b.binary("Sub", &r, &d, h);
            let hinge = b.unary("Relu", &gap, h);
            let hinge = b.binary("Mul", &hinge, &off, h);
            let h2 = b.binary("Mul", &hinge, &hinge, h);
            let total = b.reduce("ReduceSum", &h2, None, false, h);
            let loss = b.binary("Div", &total, &cnt_safe, h);
            // d(h^2)/d(delta) = -h / d
            let c = b.binary("Div", &hinge, &d, h);
            let c = b.binary("Div", &c, &cnt_safe, h);
            let c = b.unary("Neg", &c, h);
            let g = pairwise_backward(b, &c, u, h);
            (loss, g)
        }
    }
}

/// Cross-modal term of one pair: (loss, dL/dUa); dL/dUb is its negation.
fn anchoring(b: &mut Builder, ua: &str, ub: &str, cfg: &Config, h: &str) -> (String, String) {
    let diff = b.binary("Sub", ua, ub, h);
    let sq = b.binary("Mul", &diff, &diff, h);
    let ss = b.reduce("ReduceSum", &sq, Some(&[1]), true, h);
    let bf = b.dim_f32(ua, 0, h);
    if cfg.variant == Variant::NaiveAlign {
        let loss = b.reduce("ReduceMean", &ss, None, false, h);
        let two = b.scalar(2.0);
        let g = b.binary("Mul", &diff, &two, h);
        let g = b.binary("Div", &g, &bf, h);
        return (loss, g);
    }
    let eps = b.scalar(DIST_EPS);
    let ss = b.binary("Add", &ss, &eps, h);
    let d = b.unary("Sqrt", &ss, h);
    let delta = b.scalar(cfg.delta);
    let excess = b.binary("Sub", &d, &delta, h);
    let hinge = b.unary("Relu", &excess, h);
    let loss = b.reduce("ReduceMean", &hinge, None, false, h);
    // Gradient exactly 0 where d <= delta (spec Eq. 49).
    let active = b.binary("Greater", &d, &delta, h);
    let active = b.cast(&active, dtype::FLOAT, h);
    let coef = b.binary("Div", &active, &d, h);
    let coef = b.binary("Div", &coef, &bf, h);
    let g = b.binary("Mul", &diff, &coef, h);
    (loss, g)
}

/// Build the subgraph for encoders `encs` (at least two).
pub fn emit(
    b: &mut Builder,
    encs: &[EncoderInput],
    cfg: &Config,
    with_anchoring: bool,
    separate_terms: bool,
) -> Result<Emitted> {
    let m = encs.len();
    let normed: Vec<Normalized> = encs
        .iter()
        .map(|e| normalize(b, e, cfg.reduce))
        .collect::<Result<_>>()?;

    // Dispersion, always computed (it is a diagnostic too); weighted by the variant.
    let wd = if cfg.variant.uses_dispersion() {
        cfg.lambda_disp
    } else {
        0.0
    };
    let wa = if cfg.variant.uses_anchoring() {
        cfg.lambda_anc
    } else {
        0.0
    };
    // Per modality, the parts of dL_disp/du and dL_anc/du (unweighted by the lambdas).
    let mut per = Vec::new();
    let mut gd: Vec<Vec<String>> = vec![Vec::new(); m];
    let mut ga: Vec<Vec<String>> = vec![Vec::new(); m];
    let want_disp = wd > 0.0 || separate_terms;
    let want_anc = wa > 0.0 || separate_terms;
    for (k, n) in normed.iter().enumerate() {
        let h = format!("dispersion/{}", encs[k].modality);
        let (l, g) = dispersion(b, &n.u, cfg, &h);
        per.push(l);
        if want_disp {
            let s = b.scalar(1.0 / m as f64);
            gd[k].push(b.binary("Mul", &g, &s, &h));
        }
    }
    let disp_sum = b.sum(&per, "dispersion");
    let inv_m = b.scalar(1.0 / m as f64);
    let disp = b.binary("Mul", &disp_sum, &inv_m, "dispersion");

    let pairs: Vec<(usize, usize)> = (0..m).flat_map(|a| (a + 1..m).map(move |c| (a, c))).collect();
    let mut anc = None;
    if with_anchoring {
        let mut anc_terms = Vec::new();
        for &(a, c) in &pairs {
            let h = format!("anchoring/{}_{}", encs[a].modality, encs[c].modality);
            let (l, g) = anchoring(b, &normed[a].u, &normed[c].u, cfg, &h);
            anc_terms.push(l);
            if want_anc {
                let s = b.scalar(1.0 / pairs.len() as f64);
                let pa = b.binary("Mul", &g, &s, &h);
                let pb = b.unary("Neg", &pa, &h);
                ga[a].push(pa);
                ga[c].push(pb);
            }
        }
        let anc_sum = b.sum(&anc_terms, "anchoring");
        let inv_p = b.scalar(1.0 / pairs.len() as f64);
        anc = Some(b.binary("Mul", &anc_sum, &inv_p, "anchoring"));
    }

    let lw_d = b.scalar(wd);
    let loss = b.binary("Mul", &disp, &lw_d, "loss");
    let loss = match &anc {
        Some(a) if wa > 0.0 => {
            let lw_a = b.scalar(wa);
            let ta = b.binary("Mul", a, &lw_a, "loss");
            b.binary("Add", &loss, &ta, "loss")
        }
        _ => loss,
    };

    let mut grads = Vec::new();
    let mut term_grads = separate_terms.then(|| (Vec::new(), Vec::new()));
    for (k, (e, n)) in encs.iter().zip(&normed).enumerate() {
        let h = format!("grad/{}", e.modality);
        let mut parts = Vec::new();
        for (w, p) in [(wd, &gd[k]), (wa, &ga[k])] {
            if w > 0.0 && !p.is_empty() {
                let t = b.sum(p, &h);
                let s = b.scalar(w);
                parts.push(b.binary("Mul", &t, &s, &h));
            }
        }
        grads.push(if parts.is_empty() {
            zeros_like(b, &e.tensor, e.dtype, &h)
        } else {
            let g = b.sum(&parts, &h);
            to_input_space(b, &g, n, e, cfg.reduce, &h)
        });
        if let Some((td, ta)) = term_grads.as_mut() {
            for (list, p, tag) in [(&mut *td, &gd[k], "disp"), (&mut *ta, &ga[k], "anc")] {
                let h = format!("grad_{tag}/{}", e.modality);
                list.push(if p.is_empty() {
                    zeros_like(b, &e.tensor, e.dtype, &h)
                } else {
                    let g = b.sum(p, &h);
                    to_input_space(b, &g, n, e, cfg.reduce, &h)
                });
            }
        }
    }
    Ok(Emitted {
        term_grads,
        loss,
        dispersion: disp,
        dispersion_per_modality: per,
        anchoring: anc,
        embeddings: normed.into_iter().map(|n| n.u).collect(),
        grads,
    })
}

/// From a gradient with respect to `u` to one with respect to the raw encoder output.
fn to_input_space(b: &mut Builder, g: &str, n: &Normalized, e: &EncoderInput, reduce: Reduce, h: &str) -> String {
    let gx = normalize_backward(b, g, n, h);
    let gx = reduce_backward(b, &gx, &n.x, e, reduce, h);
    if e.dtype != dtype::FLOAT {
        b.cast(&gx, e.dtype, h)
    } else {
        gx
    }
}

/// Through `u = x / max(||x||, eps)`: the tangential projection `(g - u (u.g)) / ||x||`, or
/// `g / eps` for rows whose norm is below eps (where the denominator is the constant eps).
fn normalize_backward(b: &mut Builder, g: &str, n: &Normalized, h: &str) -> String {
    let gu = b.binary("Mul", g, &n.u, h);
    let dot = b.reduce("ReduceSum", &gu, Some(&[1]), true, h);
    let radial = b.binary("Mul", &n.u, &dot, h);
    let proj = b.binary("Sub", g, &radial, h);
    let eps = b.scalar(NORM_EPS);
    let big = b.binary("Greater", &n.norm, &eps, h);
    let sel = b.op("Where", &[&big, &proj, g], vec![], h);
    b.binary("Div", &sel, &n.denom, h)
}

/// The adjoint of the reduction to `[B, D]`.
fn reduce_backward(b: &mut Builder, g: &str, x: &str, e: &EncoderInput, reduce: Reduce, h: &str) -> String {
    if e.rank == 2 {
        return g.to_string();
    }
    let shape = b.unary("Shape", &e.tensor, h);
    match reduce {
        Reduce::Flatten => b.binary("Reshape", g, &shape, h),
        Reduce::Mean => {
            let axes: Vec<i64> = (1..e.rank as i64 - 1).collect();
            let gu = b.unsqueeze(g, &axes, h);
            let ex = b.binary("Expand", &gu, &shape, h);
            // count = size(z) / size(x)
            let sz = b.unary("Size", &e.tensor, h);
            let sx = b.unary("Size", x, h);
            let sz = b.cast(&sz, dtype::FLOAT, h);
            let sx = b.cast(&sx, dtype::FLOAT, h);
            let cnt = b.binary("Div", &sz, &sx, h);
            b.binary("Div", &ex, &cnt, h)
        }
    }
}

fn zeros_like(b: &mut Builder, x: &str, dt: i32, h: &str) -> String {
    let shape = b.unary("Shape", x, h);
    let mut t = tensor::f32_tensor("", &[1], &[0.0]);
    t.data_type = dt;
    t.raw_data = vec![0u8; dtype_size(dt)];
    b.op("ConstantOfShape", &[&shape], vec![attr_tensor("value", t)], h)
}

fn dtype_size(dt: i32) -> usize {
    match dt {
        dtype::FLOAT16 | dtype::BFLOAT16 => 2,
        dtype::DOUBLE => 8,
        _ => 4,
    }
}
