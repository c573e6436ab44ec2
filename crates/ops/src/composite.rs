//! Normalizations that ONNX defines as functions of simpler ops, differentiated through bodies
//! written as the spec's function bodies write them (the forward keeps the op itself).

use crate::ctx::{norm_axis, Ctx};
use crate::Kind::Body;
use crate::{op, Op};
use dagr_onnx::builder::{attr_int, attr_ints};
use dagr_onnx::error::Result;

/// This family's operators, each one entry: name, the first schema version covered, shape
/// inference, gradient, formula.
pub(crate) static OPS: &[Op] = &[
    op(
        "GroupNormalization",
        18,
        Some(crate::infer::same),
        Body(group_norm),
        "X as [N, G, rest] standardized, scale and bias per group (18) or channel (21)",
    ),
    op(
        "LpNormalization",
        1,
        Some(crate::infer::same),
        Body(lp_norm),
        "X / ReduceL1 or ReduceL2 of X along the axis",
    ),
    op(
        "MeanVarianceNormalization",
        9,
        Some(crate::infer::same),
        Body(mean_variance_norm),
        "the spec's function body: (X - E X) / (sqrt(E X^2 - (E X)^2) + 1e-9)",
    ),
    op(
        "RMSNormalization",
        23,
        Some(crate::infer::same),
        Body(rms_norm),
        "X / sqrt(mean(X^2) + eps) scale",
    ),
    op(
        "Attention",
        23,
        Some(shapes::attention),
        Body(attention),
        "the spec's function body: softmax(Q K^T scale + mask + causal) V, grouped KV heads repeated",
    ),
    op(
        "RotaryEmbedding",
        23,
        Some(shapes::rotary_embedding),
        Body(rotary_embedding),
        "the spec's rotation of pairs by the cos and sin caches",
    ),
    op(
        "LRN",
        1,
        Some(crate::infer::same),
        Body(lrn),
        "X / (bias + alpha/size window-sum X^2)^beta, the window by Pad and Slices",
    ),
    op(
        "LpPool",
        2,
        Some(crate::nn::shapes::pool),
        Body(lp_pool),
        "(window sum of |X|^p)^(1/p), the sum an AveragePool counting padding, times the window size",
    ),
    op(
        "GlobalLpPool",
        2,
        Some(crate::nn::shapes::global_pool),
        Body(global_lp_pool),
        "(sum over the spatial axes of |X|^p)^(1/p)",
    ),
];

/// Shape (and value) inference of this family's operators.
pub(crate) mod shapes {
    use crate::infer::Node;
    use dagr_onnx::dim::Dim;

    /// Attention (opset 23): Q, K, V `[batch, heads, seq, head]` or `[batch, seq, hidden]` (heads
    /// from `q_num_heads` / `kv_num_heads`), optional mask and past key and value. Y is shaped
    /// like Q with V's head size; the present key and value add the past length; the QK output is
    /// `[batch, q_heads, q_seq, total_seq]`.
    pub(crate) fn attention(c: &mut Node) -> Option<()> {
        let (q, k, v) = (c.shape(0)?, c.shape(1)?, c.shape(2)?);
        let dt = c.dtype(0);
        let past = c.shape(4).map(|p| p.get(2).cloned().unwrap_or(Dim::Unknown));
        let total = |kv_seq: &Dim| match &past {
            Some(p) => p.add(kv_seq),
            None => kv_seq.clone(),
        };
        match (q.len(), k.len(), v.len()) {
            (4, 4, 4) => {
                c.set(
                    0,
                    dt,
                    Some(vec![q[0].clone(), q[1].clone(), q[2].clone(), v[3].clone()]),
                );
                let t = total(&k[2]);
                c.set(1, dt, Some(vec![k[0].clone(), k[1].clone(), t.clone(), k[3].clone()]));
                c.set(2, dt, Some(vec![v[0].clone(), v[1].clone(), t.clone(), v[3].clone()]));
                c.set(3, dt, Some(vec![q[0].clone(), q[1].clone(), q[2].clone(), t]));
            }
            (3, 3, 3) => {
                let qh = Dim::Known(c.attr_i("q_num_heads", 0));
                let kvh = Dim::Known(c.attr_i("kv_num_heads", 0));
                let (dk, dv) = (k[2].div(&kvh), v[2].div(&kvh));
                c.set(0, dt, Some(vec![q[0].clone(), q[1].clone(), qh.mul(&dv)]));
                let t = total(&k[1]);
                c.set(1, dt, Some(vec![k[0].clone(), kvh.clone(), t.clone(), dk]));
                c.set(2, dt, Some(vec![v[0].clone(), kvh, t.clone(), dv]));
                c.set(3, dt, Some(vec![q[0].clone(), qh, q[1].clone(), t]));
            }
            _ => return None,
        }
        Some(())
    }

    /// RotaryEmbedding (opset 23): the output is shaped like X.
    pub(crate) fn rotary_embedding(c: &mut Node) -> Option<()> {
        c.same(0, 0);
        Some(())
    }
}

impl Ctx<'_> {
    fn mean_over(&mut self, x: &str, axes: &[i64]) -> String {
        let h = self.hint();
        self.b.reduce("ReduceMean", x, Some(axes), true, &h)
    }
    /// (x - mean) / sqrt(var + eps) over `axes`.
    fn standardized(&mut self, x: &str, axes: &[i64], eps: f32) -> String {
        let m = self.mean_over(x, axes);
        let d = self.op("Sub", &[x, &m]);
        let d2 = self.op("Mul", &[&d, &d]);
        let var = self.mean_over(&d2, axes);
        let e = self.scalar(eps as f64);
        let ve = self.op("Add", &[&var, &e]);
        let sd = self.op("Sqrt", &[&ve]);
        self.op("Div", &[&d, &sd])
    }
    /// `t` ([n]) shaped to broadcast along axis 1 of a rank-`rank` tensor.
    fn per_channel(&mut self, t: &str, rank: usize) -> String {
        let axes: Vec<i64> = (1..rank as i64 - 1).collect();
        if axes.is_empty() {
            t.to_string()
        } else {
            self.unsqueeze(t, &axes)
        }
    }
}

/// GroupNormalization: X as [N, G, rest], standardized over the rest; scale and bias per group
/// (opset 18) or per channel (opset 21).
pub fn group_norm(c: &mut Ctx) -> Result<Vec<String>> {
    let x = c.input(0).to_string();
    let (scale, bias) = (c.input(1).to_string(), c.input(2).to_string());
    let groups = c.attr_i("num_groups", 0);
    if groups <= 0 {
        return Err(c.err("it has no num_groups"));
    }
    let rank = c.rank(&x)?;
    let eps = c.attr_f("epsilon", 1e-5);
    let target = c.ints(&[0, groups, -1]);
    let xr = c.op("Reshape", &[&x, &target]);
    let n = c.standardized(&xr, &[2], eps);
    let s = c.shape_of(&x);
    let y = if c.b.opset >= 21 {
        let n = c.op("Reshape", &[&n, &s]);
        let sc = c.per_channel(&scale, rank);
        let bi = c.per_channel(&bias, rank);
        let m = c.op("Mul", &[&n, &sc]);
        c.op("Add", &[&m, &bi])
    } else {
        let sc = c.unsqueeze(&scale, &[1]);
        let bi = c.unsqueeze(&bias, &[1]);
        let m = c.op("Mul", &[&n, &sc]);
        let a = c.op("Add", &[&m, &bi]);
        c.op("Reshape", &[&a, &s])
    };
    Ok(vec![y])
}

/// LpNormalization: X / ||X||_p along `axis` (p 1 or 2).
pub fn lp_norm(c: &mut Ctx) -> Result<Vec<String>> {
    let x = c.input(0).to_string();
    let rank = c.rank(&x)?;
    let axis = norm_axis(c.attr_i("axis", -1), rank) as i64;
    let op = match c.attr_i("p", 2) {
        1 => "ReduceL1",
        2 => "ReduceL2",
        p => return Err(c.err(format!("p = {p}; the spec allows 1 and 2"))),
    };
    let h = c.hint();
    let norm = c.b.reduce(op, &x, Some(&[axis]), true, &h);
    Ok(vec![c.op("Div", &[&x, &norm])])
}

/// MeanVarianceNormalization, as the spec's function body: (X - E[X]) / (sqrt(E[X^2] - E[X]^2)
/// + 1e-9) over `axes` (default [0, 2, 3]).
pub fn mean_variance_norm(c: &mut Ctx) -> Result<Vec<String>> {
    let x = c.input(0).to_string();
    let rank = c.rank(&x)?;
    let axes: Vec<i64> = c
        .attr_ints("axes")
        .unwrap_or_else(|| vec![0, 2, 3])
        .iter()
        .map(|&a| norm_axis(a, rank) as i64)
        .collect();
    let m = c.mean_over(&x, &axes);
    let m2 = c.op("Mul", &[&m, &m]);
    let x2 = c.op("Mul", &[&x, &x]);
    let ex2 = c.mean_over(&x2, &axes);
    let var = c.op("Sub", &[&ex2, &m2]);
    let sd = c.op("Sqrt", &[&var]);
    let e = c.scalar(1e-9);
    let sde = c.op("Add", &[&sd, &e]);
    let d = c.op("Sub", &[&x, &m]);
    Ok(vec![c.op("Div", &[&d, &sde])])
}

/// RMSNormalization (opset 23): X / sqrt(mean(X^2 over the axes from `axis`) + epsilon) scale.
pub fn rms_norm(c: &mut Ctx) -> Result<Vec<String>> {
    let x = c.input(0).to_string();
    let rank = c.rank(&x)?;
    let axis = norm_axis(c.attr_i("axis", -1), rank);
    let axes: Vec<i64> = (axis as i64..rank as i64).collect();
    let x2 = c.op("Mul", &[&x, &x]);
    let ms = c.mean_over(&x2, &axes);
    let e = c.scalar(c.attr_f("epsilon", 1e-5) as f64);
    let mse = c.op("Add", &[&ms, &e]);
    let rms = c.op("Sqrt", &[&mse]);
    let n = c.op("Div", &[&x, &rms]);
    let scale = c.input(1).to_string();
    Ok(vec![c.op("Mul", &[&n, &scale])])
}

/// `p`: an int from opset 11 on, a float before (LpPool-2, GlobalLpPool-2).
fn lp_order(c: &Ctx) -> f64 {
    match dagr_onnx::attr::attr(c.node, "p") {
        Some(a) if a.type_.value() == dagr_onnx::proto::attribute_proto::AttributeType::FLOAT as i32 => a.f as f64,
        Some(a) => a.i as f64,
        None => 2.0,
    }
}

/// |x|^p (x x for p = 2, keeping the sign's kink out of the gradient).
fn abs_pow(c: &mut Ctx, x: &str, p: f64) -> String {
    if p == 2.0 {
        return c.op("Mul", &[x, x]);
    }
    let a = c.op("Abs", &[x]);
    if p == 1.0 {
        return a;
    }
    let e = c.scalar(p);
    c.op("Pow", &[&a, &e])
}

/// s^(1/p).
fn root(c: &mut Ctx, s: &str, p: f64) -> String {
    match p {
        1.0 => s.to_string(),
        2.0 => c.op("Sqrt", &[s]),
        _ => {
            let e = c.scalar(1.0 / p);
            c.op("Pow", &[s, &e])
        }
    }
}

/// LpPool: (sum over each window of |X|^p)^(1/p); the window sums are an AveragePool that
/// counts the padding (zeros, adding nothing) times the window's size, with the node's kernel,
/// strides, pads, auto_pad, ceil_mode and dilations.
pub fn lp_pool(c: &mut Ctx) -> Result<Vec<String>> {
    let x = c.input(0).to_string();
    let p = lp_order(c);
    let kernel = c
        .attr_ints("kernel_shape")
        .ok_or_else(|| c.err("kernel_shape is missing"))?;
    let dilated = c.attr_ints("dilations").is_some_and(|d| d.iter().any(|&v| v != 1));
    if dilated && c.b.opset < 19 {
        return Err(c.err("its gradient sums dilated windows with AveragePool, which has dilations from opset 19 on"));
    }
    let mut attrs = vec![attr_ints("kernel_shape", &kernel), attr_int("count_include_pad", 1)];
    for name in ["strides", "dilations"] {
        if let Some(v) = c.attr_ints(name) {
            attrs.push(attr_ints(name, &v));
        }
    }
    let sp = kernel.len();
    let mut pads = c.attr_ints("pads").unwrap_or_else(|| vec![0; 2 * sp]);
    if let Some(v) = c.attr_s("auto_pad").filter(|v| v != "NOTSET") {
        attrs.push(dagr_onnx::builder::attr_string("auto_pad", &v));
    }
    if c.attr_i("ceil_mode", 0) != 0 {
        // The windows' overflow past the padded input adds nothing to their sums, but an
        // AveragePool would not count it: it is made explicit end padding (counted, zeros).
        if c.attr_s("auto_pad").is_some_and(|v| v != "NOTSET") {
            return Err(c.err("its gradient with ceil_mode=1 needs explicit pads"));
        }
        let overflow = crate::nn::conv_geom(c, kernel.clone())?.ceil_overflow(c)?;
        for (end, e) in pads[sp..].iter_mut().zip(overflow) {
            *end += e;
        }
    }
    if c.attr_s("auto_pad").is_none_or(|v| v == "NOTSET") {
        attrs.push(attr_ints("pads", &pads));
    }
    let powered = abs_pow(c, &x, p);
    let mean = c.op_a("AveragePool", &[&powered], attrs);
    let size = c.scalar(kernel.iter().product::<i64>() as f64);
    let sum = c.op("Mul", &[&mean, &size]);
    Ok(vec![root(c, &sum, p)])
}

/// GlobalLpPool: (sum over the spatial axes of |X|^p)^(1/p).
pub fn global_lp_pool(c: &mut Ctx) -> Result<Vec<String>> {
    let x = c.input(0).to_string();
    let rank = c.rank(&x)?;
    let p = lp_order(c);
    let powered = abs_pow(c, &x, p);
    let axes: Vec<i64> = (2..rank as i64).collect();
    let sum = c.reduce_sum(&powered, &axes, true);
    Ok(vec![root(c, &sum, p)])
}

/// LRN across channels: X / (bias + alpha / size * window sum of X^2)^beta, the window
/// [c - floor((size-1)/2), c + ceil((size-1)/2)] (zero past the channels).
pub fn lrn(c: &mut Ctx) -> Result<Vec<String>> {
    let x = c.input(0).to_string();
    let xs = c.shape(&x)?;
    let rank = xs.len();
    let channels = xs
        .get(1)
        .and_then(|d| d.known())
        .ok_or_else(|| c.err("its channel count must be known"))?;
    let size = c.attr_i("size", 0);
    if size <= 0 {
        return Err(c.err("it has no size"));
    }
    let (alpha, beta, bias) = (c.attr_f("alpha", 1e-4), c.attr_f("beta", 0.75), c.attr_f("bias", 1.0));
    let (lo, hi) = ((size - 1) / 2, size - 1 - (size - 1) / 2);
    let x2 = c.op("Mul", &[&x, &x]);
    let mut pads = vec![0i64; 2 * rank];
    pads[1] = lo;
    pads[rank + 1] = hi;
    let padded = if c.b.opset < 11 {
        c.op_a("Pad", &[&x2], vec![attr_ints("pads", &pads)])
    } else {
        let p = c.ints(&pads);
        c.op("Pad", &[&x2, &p])
    };
    let mut parts = Vec::new();
    let axis = c.ints(&[1]);
    for k in 0..size {
        let (s, e) = (c.ints(&[k]), c.ints(&[k + channels]));
        parts.push(c.op("Slice", &[&padded, &s, &e, &axis]));
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let sum = if refs.len() == 1 {
        parts[0].clone()
    } else {
        c.op("Sum", &refs)
    };
    let k = c.scalar(alpha as f64 / size as f64);
    let b = c.scalar(bias as f64);
    let ks = c.op("Mul", &[&sum, &k]);
    let base = c.op("Add", &[&ks, &b]);
    let p = c.scalar(beta as f64);
    let den = c.op("Pow", &[&base, &p]);
    Ok(vec![c.op("Div", &[&x, &den])])
}

/// Attention (opset 23) as the spec's function body: Q, K, V to `[batch, heads, seq, head]`
/// (from `[batch, seq, hidden]` with `q_num_heads` / `kv_num_heads`), the past key and value
/// prepended, KV heads repeated for grouped queries, `sqrt(scale)` on Q and K, the softcap, the
/// mask (bool: -inf where false; float: added) and the causal bias (offset by the past length),
/// Softmax, and the product with V. Outputs: Y, the present key and value, and the QK product
/// in `qk_matmul_output_mode` 0 to 3. Not covered (refused by name): `nonpad_kv_seqlen`, sliding
/// windows, a mask shorter than the keys.
pub fn attention(c: &mut Ctx) -> Result<Vec<String>> {
    if c.has_input(6) {
        return Err(c.err("nonpad_kv_seqlen has no gradient rule"));
    }
    for a in ["left_window_size", "right_window_size"] {
        if c.attr_i(a, -1) >= 0 {
            return Err(c.err(format!("{a} has no gradient rule")));
        }
    }
    let (q, k, v) = (c.input(0).to_string(), c.input(1).to_string(), c.input(2).to_string());
    let rank = c.rank(&q)?;
    let to_heads = |c: &mut Ctx, t: &str, heads: i64| -> String {
        let s = c.ints(&[0, 0, heads, -1]);
        let r = c.op("Reshape", &[t, &s]);
        c.op_a("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1, 3])])
    };
    let (q4, mut k4, mut v4, qh, kvh) = if rank == 3 {
        let (qh, kvh) = (c.attr_i("q_num_heads", 0), c.attr_i("kv_num_heads", 0));
        if qh <= 0 || kvh <= 0 {
            return Err(c.err("3-D inputs need q_num_heads and kv_num_heads"));
        }
        (to_heads(c, &q, qh), to_heads(c, &k, kvh), to_heads(c, &v, kvh), qh, kvh)
    } else {
        let (qs, ks) = (c.known_dim(&q, 1)?, c.known_dim(&k, 1)?);
        (q.clone(), k.clone(), v.clone(), qs, ks)
    };
    let head = if rank == 3 {
        c.known_dim(&q, 2)? / qh
    } else {
        c.known_dim(&q, 3)?
    };
    if c.has_input(4) {
        let (pk, pv) = (c.input(4).to_string(), c.input(5).to_string());
        k4 = c.op_a("Concat", &[&pk, &k4], vec![attr_int("axis", 2)]);
        v4 = c.op_a("Concat", &[&pv, &v4], vec![attr_int("axis", 2)]);
    }
    let (present_k, present_v) = (k4.clone(), v4.clone());
    let (mut kr, mut vr) = (k4, v4);
    if qh != kvh {
        if kvh <= 0 || qh % kvh != 0 {
            return Err(c.err(format!("{qh} query heads do not group over {kvh} key/value heads")));
        }
        let rep = qh / kvh;
        for t in [&mut kr, &mut vr] {
            // [b, kvh, s, d] -> [b, kvh, rep, s, d] -> [b, qh, s, d]: each head repeated in place.
            let u = c.unsqueeze(t, &[2]);
            let s = c.shape_of(&u);
            let reps = c.ints(&[1, 1, rep, 1, 1]);
            let target = c.op("Mul", &[&s, &reps]);
            let e = c.op("Expand", &[&u, &target]);
            let (from, to) = (c.ints(&[-1]), c.ints(&[i64::MAX]));
            let last = c.op("Slice", &[&s, &from, &to]);
            let head3 = c.ints(&[0, qh, -1]);
            let flat = c.op_a("Concat", &[&head3, &last], vec![attr_int("axis", 0)]);
            *t = c.op("Reshape", &[&e, &flat]);
        }
    }
    let scale = match dagr_onnx::attr::attr(c.node, "scale") {
        Some(a) => a.f as f64,
        None => 1.0 / (head as f64).sqrt(),
    };
    let sq = c.scalar(scale.sqrt());
    let qs = c.op("Mul", &[&q4, &sq]);
    let ks = c.op("Mul", &[&kr, &sq]);
    let kt = c.op_a("Transpose", &[&ks], vec![attr_ints("perm", &[0, 1, 3, 2])]);
    let mut logits = c.op("MatMul", &[&qs, &kt]);
    let cap = c.attr_f("softcap", 0.0);
    if cap > 0.0 {
        let cs = c.scalar(cap as f64);
        let d = c.op("Div", &[&logits, &cs]);
        let t = c.op("Tanh", &[&d]);
        logits = c.op("Mul", &[&t, &cs]);
    }
    let capped = logits.clone();
    let neg_inf = c.scalar(f64::NEG_INFINITY);
    let zero = c.scalar(0.0);
    let mut bias: Option<String> = None;
    if c.has_input(3) {
        let m = c.input(3).to_string();
        let mb = if c.dtype(&m) == dagr_onnx::dtype::BOOL {
            c.op("Where", &[&m, &zero, &neg_inf])
        } else {
            m
        };
        bias = Some(mb);
    }
    if c.attr_i("is_causal", 0) != 0 {
        // Key j is visible to query i when j <= i + the past length.
        let qlen = c.dim_of(&q4, 2);
        let klen = c.dim_of(&kr, 2);
        let (z, one) = (c.b.scalar_i64(0), c.b.scalar_i64(1));
        let i = c.op("Range", &[&z, &qlen, &one]);
        let i = c.unsqueeze(&i, &[1]);
        let offset = if c.has_input(4) {
            let pk = c.input(4).to_string();
            c.dim_of(&pk, 2)
        } else {
            z.clone()
        };
        let i = c.op("Add", &[&i, &offset]);
        let j = c.op("Range", &[&z, &klen, &one]);
        let j = c.unsqueeze(&j, &[0]);
        let allowed = c.op("LessOrEqual", &[&j, &i]);
        let causal = c.op("Where", &[&allowed, &zero, &neg_inf]);
        bias = Some(match bias {
            Some(b) => c.op("Add", &[&b, &causal]),
            None => causal,
        });
    }
    let biased = match &bias {
        Some(b) => c.op("Add", &[&logits, b]),
        None => logits,
    };
    let p = c.op_a("Softmax", &[&biased], vec![attr_int("axis", -1)]);
    let mut y = c.op("MatMul", &[&p, &vr]);
    if rank == 3 {
        let t = c.op_a("Transpose", &[&y], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let s = c.ints(&[0, 0, -1]);
        y = c.op("Reshape", &[&t, &s]);
    }
    let qk = match c.attr_i("qk_matmul_output_mode", 0) {
        0 | 1 => capped,
        2 => biased,
        _ => p,
    };
    Ok(vec![y, present_k, present_v, qk])
}

/// RotaryEmbedding (opset 23) as the spec writes it: X to `[batch, seq, heads, head]`, the
/// first `rotary_embedding_dim` of each head rotated in pairs (halves, or even and odd
/// positions when `interleaved`) by the cos and sin caches (gathered at `position_ids` when
/// given), the rest passed through.
pub fn rotary_embedding(c: &mut Ctx) -> Result<Vec<String>> {
    let x = c.input(0).to_string();
    let xs = c.shape(&x)?;
    let rank = xs.len();
    let x4 = match rank {
        4 => c.op_a("Transpose", &[&x], vec![attr_ints("perm", &[0, 2, 1, 3])]),
        3 => {
            let heads = c.attr_i("num_heads", 0);
            if heads <= 0 {
                return Err(c.err("a 3-D input needs num_heads"));
            }
            let s = c.ints(&[0, 0, heads, -1]);
            c.op("Reshape", &[&x, &s])
        }
        _ => return Err(c.err("X must be 3-D or 4-D")),
    };
    let head = match rank {
        4 => c.known_dim(&x, 3)?,
        _ => c.known_dim(&x, 2)? / c.attr_i("num_heads", 1),
    };
    let rot = match c.attr_i("rotary_embedding_dim", 0) {
        0 => head,
        r => r,
    };
    let half = rot / 2;
    let axis3 = c.ints(&[3]);
    let (zero_i, rot_i, head_i) = (c.ints(&[0]), c.ints(&[rot]), c.ints(&[head]));
    let xr = c.op("Slice", &[&x4, &zero_i, &rot_i, &axis3]);
    let mut caches = Vec::new();
    for i in [1, 2] {
        let cache = c.input(i).to_string();
        let t = if c.has_input(3) {
            let pos = c.input(3).to_string();
            c.op_a("Gather", &[&cache, &pos], vec![attr_int("axis", 0)])
        } else {
            cache
        };
        caches.push(c.unsqueeze(&t, &[2]));
    }
    let (cos, sin) = (caches[0].clone(), caches[1].clone());
    let interleaved = c.attr_i("interleaved", 0) != 0;
    let hint = c.hint();
    let (x1, x2) = if interleaved {
        let s = c.ints(&[0, 0, 0, half, 2]);
        let pairs = c.op("Reshape", &[&xr, &s]);
        let parts = c.b.split(&pairs, 4, &[1, 1], &hint);
        let sq = |c: &mut Ctx, t: &str| {
            let a = c.ints(&[4]);
            c.op("Squeeze", &[t, &a])
        };
        (sq(c, &parts[0]), sq(c, &parts[1]))
    } else {
        let parts = c.b.split(&xr, 3, &[half, half], &hint);
        (parts[0].clone(), parts[1].clone())
    };
    let (c1, s2) = (c.op("Mul", &[&cos, &x1]), c.op("Mul", &[&sin, &x2]));
    let real = c.op("Sub", &[&c1, &s2]);
    let (s1, c2) = (c.op("Mul", &[&sin, &x1]), c.op("Mul", &[&cos, &x2]));
    let imag = c.op("Add", &[&s1, &c2]);
    let rotated = if interleaved {
        let r = c.unsqueeze(&real, &[4]);
        let i = c.unsqueeze(&imag, &[4]);
        let cat = c.op_a("Concat", &[&r, &i], vec![attr_int("axis", 4)]);
        let s = c.ints(&[0, 0, 0, rot]);
        c.op("Reshape", &[&cat, &s])
    } else {
        c.op_a("Concat", &[&real, &imag], vec![attr_int("axis", 3)])
    };
    let out = if rot < head {
        let pass = c.op("Slice", &[&x4, &rot_i, &head_i, &axis3]);
        c.op_a("Concat", &[&rotated, &pass], vec![attr_int("axis", 3)])
    } else {
        rotated
    };
    let y = if rank == 4 {
        c.op_a("Transpose", &[&out], vec![attr_ints("perm", &[0, 2, 1, 3])])
    } else {
        let s = c.shape_of(&x);
        c.op("Reshape", &[&out, &s])
    };
    Ok(vec![y])
}

/// Finite-difference cases of this module's ops (see `crate::cases`).
pub fn cases() -> Vec<crate::cases::Case> {
    use crate::cases::*;
    use dagr_onnx::builder::{attr_float, attr_int, attr_ints};
    vec![
        // LpPool and GlobalLpPool: tract 0.23 runs neither, and its backend writes them as their
        // bodies (`expand_bodies`).
        case("lp_pool_p2_pads", "LpPool", vec![x(&[2, 3, 5, 4])]).attrs(vec![
            attr_ints("kernel_shape", &[2, 3]),
            attr_ints("strides", &[1, 2]),
            attr_ints("pads", &[1, 0, 0, 1]),
        ]),
        case("lp_pool_p1_1d", "LpPool", vec![x(&[2, 2, 6])])
            .attrs(vec![attr_ints("kernel_shape", &[3]), attr_int("p", 1)]),
        case("lp_pool_p3_dilated", "LpPool", vec![x(&[1, 2, 6, 5])])
            .attrs(vec![
                attr_ints("kernel_shape", &[2, 2]),
                attr_ints("dilations", &[2, 1]),
                attr_ints("strides", &[2, 2]),
                attr_int("p", 3),
            ])
            .opset(19),
        case("lp_pool_ceil", "LpPool", vec![x(&[1, 2, 5, 5])])
            .attrs(vec![
                attr_ints("kernel_shape", &[2, 2]),
                attr_ints("strides", &[2, 2]),
                attr_int("ceil_mode", 1),
            ])
            .opset(18)
            .symbolic(&[0]),
        case("global_lp_pool", "GlobalLpPool", vec![x(&[2, 3, 4, 2])]),
        case("global_lp_pool_p1", "GlobalLpPool", vec![x(&[2, 3, 5])]).attrs(vec![attr_int("p", 1)]),
        case(
            "group_norm_18",
            "GroupNormalization",
            vec![x(&[2, 4, 3]), x(&[2]), x(&[2])],
        )
        .attrs(vec![attr_int("num_groups", 2), attr_float("epsilon", 1e-3)])
        .opset(18)
        .checker_refuses("GroupNormalization-18 is deprecated (models still carry it)"),
        case(
            "group_norm_21",
            "GroupNormalization",
            vec![x(&[2, 4, 3, 2]), x(&[4]), x(&[4])],
        )
        .attrs(vec![attr_int("num_groups", 2)])
        .opset(21),
        case("lp_norm_2", "LpNormalization", vec![x(&[3, 4])]),
        case("lp_norm_1_axis0", "LpNormalization", vec![x(&[3, 4])]).attrs(vec![attr_int("p", 1), attr_int("axis", 0)]),
        case(
            "mean_variance_norm",
            "MeanVarianceNormalization",
            vec![x(&[2, 3, 4, 2])],
        )
        .checker_refuses("onnx 1.23's own function body of the op fails its shape inference"),
        case("rms_norm", "RMSNormalization", vec![x(&[2, 3, 4]), x(&[4])]).opset(23),
        case("lrn", "LRN", vec![x(&[2, 5, 3, 3])]).attrs(vec![
            attr_int("size", 3),
            attr_float("alpha", 0.3),
            attr_float("beta", 0.75),
            attr_float("bias", 1.5),
        ]),
        // Opset-23 attention: tract 0.23 runs RotaryEmbedding, not Attention, which its backend
        // writes as the op's function body (`expand_bodies`).
        case(
            "attention_4d",
            "Attention",
            vec![x(&[2, 2, 3, 4]), x(&[2, 2, 5, 4]), x(&[2, 2, 5, 3])],
        )
        .opset(23)
        .symbolic(&[0, 2]),
        case(
            "attention_3d_grouped_causal_softcap",
            "Attention",
            vec![x(&[2, 3, 8]), x(&[2, 3, 4]), x(&[2, 3, 6])],
        )
        .attrs(vec![
            attr_int("q_num_heads", 4),
            attr_int("kv_num_heads", 2),
            attr_int("is_causal", 1),
            attr_float("scale", 0.4),
            attr_float("softcap", 2.0),
        ])
        .opset(23)
        .symbolic(&[0, 1]),
        case(
            "attention_bool_mask_past",
            "Attention",
            vec![
                x(&[1, 2, 2, 4]),
                x(&[1, 2, 2, 4]),
                x(&[1, 2, 2, 4]),
                In::B(vec![2, 4], vec![true, false, true, true, true, true, false, true]),
                x(&[1, 2, 2, 4]),
                x(&[1, 2, 2, 4]),
            ],
        )
        .attrs(vec![attr_int("is_causal", 1)])
        .all_outputs(3)
        .opset(23)
        .symbolic(&[0]),
        case(
            "rotary_4d",
            "RotaryEmbedding",
            vec![x(&[2, 2, 3, 4]), x(&[2, 3, 2]), x(&[2, 3, 2])],
        )
        .opset(23)
        .symbolic(&[0, 2]),
        case(
            "rotary_3d_interleaved_partial_positions",
            "RotaryEmbedding",
            vec![
                x(&[2, 3, 8]),
                x(&[5, 1]),
                x(&[5, 1]),
                In::Ints(vec![2, 3], vec![0, 1, 2, 4, 3, 2]),
            ],
        )
        .attrs(vec![
            attr_int("num_heads", 2),
            attr_int("interleaved", 1),
            attr_int("rotary_embedding_dim", 2),
        ])
        .opset(23)
        .symbolic(&[0, 1]),
    ]
}
