//! Layers: products, convolutions and pools, normalizations, losses, recurrent layers,
//! resizing and Einsum.

use super::{axis, broadcast, Node, Rule};
use crate::dim::Dim;
use crate::dtype;

pub(super) const RULES: &[(&[&str], Rule)] = &[
    (&["MatMul", "MatMulInteger"], matmul),
    (&["Det"], det),
    (&["Gemm"], gemm),
    (&["Conv"], conv),
    (&["ConvTranspose"], conv_transpose),
    (&["MaxPool", "AveragePool", "LpPool"], pool),
    (&["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"], global_pool),
    (&["BatchNormalization"], batch_norm),
    (&["LayerNormalization"], layer_norm),
    (&["Dropout"], dropout),
    (&["SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"], loss),
    (&["RNN", "GRU", "LSTM"], recurrent),
    (&["Resize", "Upsample"], resize),
    (&["Einsum"], einsum),
    (&["Attention"], attention),
    (&["RotaryEmbedding"], rotary_embedding),
];

/// Attention (opset 23): Q, K, V `[batch, heads, seq, head]` or `[batch, seq, hidden]` (heads
/// from `q_num_heads` / `kv_num_heads`), optional mask and past key and value. Y is shaped
/// like Q with V's head size; the present key and value add the past length; the QK output is
/// `[batch, q_heads, q_seq, total_seq]`.
fn attention(c: &mut Node) -> Option<()> {
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
fn rotary_embedding(c: &mut Node) -> Option<()> {
    c.same(0, 0);
    Some(())
}

/// Det: the batch dims of `[*, M, M]`.
fn det(c: &mut Node) -> Option<()> {
    let s = c.shape(0)?;
    let r = s.len().checked_sub(2)?;
    c.set(0, c.dtype(0), Some(s[..r].to_vec()));
    Some(())
}

fn matmul(c: &mut Node) -> Option<()> {
    let (mut a, mut b) = (c.shape(0)?, c.shape(1)?);
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let (a1, b1) = (a.len() == 1, b.len() == 1);
    if a1 {
        a.insert(0, Dim::Known(1));
    }
    if b1 {
        b.push(Dim::Known(1));
    }
    let mut out = broadcast(&[a[..a.len() - 2].to_vec(), b[..b.len() - 2].to_vec()]);
    if !a1 {
        out.push(a[a.len() - 2].clone());
    }
    if !b1 {
        out.push(b[b.len() - 1].clone());
    }
    let dt = if c.n.op_type == "MatMulInteger" {
        dtype::INT32
    } else {
        c.dtype(0)
    };
    c.set(0, dt, Some(out));
    Some(())
}

fn gemm(c: &mut Node) -> Option<()> {
    let (a, b) = (c.shape(0)?, c.shape(1)?);
    if a.len() != 2 || b.len() != 2 {
        return None;
    }
    let ta = c.attr_i("transA", 0) == 1;
    let tb = c.attr_i("transB", 0) == 1;
    let out = vec![a[ta as usize].clone(), b[1 - tb as usize].clone()];
    c.set(0, c.dtype(0), Some(out));
    Some(())
}

/// Output spatial dims of a convolution or pool: `(d + pads - dilated kernel) / stride + 1`,
/// symbolic where `d` is and the division is exact.
fn window_out(c: &Node, input: &[Dim], kernel: &[i64]) -> Option<Vec<Dim>> {
    let sp = input.len().checked_sub(2)?;
    let strides = c.attr_ints("strides").unwrap_or_else(|| vec![1; sp]);
    let dil = c.attr_ints("dilations").unwrap_or_else(|| vec![1; sp]);
    let pads = c.attr_ints("pads").unwrap_or_else(|| vec![0; 2 * sp]);
    if kernel.len() != sp || strides.len() != sp || dil.len() != sp || pads.len() != 2 * sp {
        return None;
    }
    if strides.iter().chain(&dil).chain(kernel).any(|&v| v <= 0) || pads.iter().any(|&p| p < 0) {
        return None;
    }
    let auto = c.attr_s("auto_pad").unwrap_or_default();
    let ceil = c.attr_i("ceil_mode", 0) == 1;
    let mut out = Vec::with_capacity(sp);
    for i in 0..sp {
        let (d, s) = (&input[i + 2], Dim::Known(strides[i]));
        let o = if auto == "SAME_UPPER" || auto == "SAME_LOWER" {
            d.add(&Dim::Known(strides[i] - 1)).div(&s)
        } else {
            let (pb, pe) = if auto == "VALID" {
                (0, 0)
            } else {
                (pads[i], pads[i + sp])
            };
            let k = dil[i].saturating_mul(kernel[i] - 1).saturating_add(1);
            let num = d.add(&Dim::Known(pb + pe - k));
            if num.known().is_some_and(|v| v < 0) {
                return None;
            }
            let q = match (ceil, num.known()) {
                (true, Some(v)) => {
                    // The last window must start inside the input or its left padding.
                    let mut q = (v + strides[i] - 1) / strides[i];
                    if let Some(dv) = d.known() {
                        if q * strides[i] >= dv + pb {
                            q -= 1;
                        }
                    }
                    Dim::Known(q)
                }
                (true, None) => num.add(&Dim::Known(strides[i] - 1)).div(&s),
                (false, _) => num.div(&s),
            };
            q.add(&Dim::Known(1))
        };
        out.push(o);
    }
    Some(out)
}

fn conv(c: &mut Node) -> Option<()> {
    let (x, w) = (c.shape(0)?, c.shape(1)?);
    if x.len() < 3 || w.len() != x.len() {
        return None;
    }
    let kernel = match c.attr_ints("kernel_shape") {
        Some(k) => k,
        None => w[2..].iter().map(Dim::known).collect::<Option<_>>()?,
    };
    let mut out = vec![x[0].clone(), w[0].clone()];
    out.extend(window_out(c, &x, &kernel)?);
    c.set(0, c.dtype(0), Some(out));
    Some(())
}

fn conv_transpose(c: &mut Node) -> Option<()> {
    let (x, w) = (c.shape(0)?, c.shape(1)?);
    if x.len() < 3 || w.len() != x.len() {
        return None;
    }
    let sp = x.len() - 2;
    let group = c.attr_i("group", 1);
    let mut out = vec![x[0].clone(), w[1].mul(&Dim::Known(group))];
    if let Some(os) = c.attr_ints("output_shape") {
        out.extend(os.iter().rev().take(sp).rev().map(|&v| Dim::Known(v)));
        c.set(0, c.dtype(0), Some(out));
        return Some(());
    }
    let kernel: Vec<i64> = match c.attr_ints("kernel_shape") {
        Some(k) => k,
        None => w[2..].iter().map(Dim::known).collect::<Option<_>>()?,
    };
    let strides = c.attr_ints("strides").unwrap_or_else(|| vec![1; sp]);
    let dil = c.attr_ints("dilations").unwrap_or_else(|| vec![1; sp]);
    let pads = c.attr_ints("pads").unwrap_or_else(|| vec![0; 2 * sp]);
    let opad = c.attr_ints("output_padding").unwrap_or_else(|| vec![0; sp]);
    let auto = c.attr_s("auto_pad").unwrap_or_default();
    if kernel.len() != sp || strides.len() != sp || dil.len() != sp || pads.len() != 2 * sp || opad.len() != sp {
        return None;
    }
    for i in 0..sp {
        let s = Dim::Known(strides[i]);
        let o = if auto == "SAME_UPPER" || auto == "SAME_LOWER" {
            x[i + 2].mul(&s)
        } else {
            let k = dil[i] * (kernel[i] - 1) + 1;
            x[i + 2]
                .sub(&Dim::Known(1))
                .mul(&s)
                .add(&Dim::Known(opad[i] + k - pads[i] - pads[i + sp]))
        };
        out.push(o);
    }
    c.set(0, c.dtype(0), Some(out));
    Some(())
}

fn pool(c: &mut Node) -> Option<()> {
    let x = c.shape(0)?;
    let k = c.attr_ints("kernel_shape")?;
    if x.len() < 3 {
        return None;
    }
    let mut out = vec![x[0].clone(), x[1].clone()];
    out.extend(window_out(c, &x, &k)?);
    c.set(0, c.dtype(0), Some(out.clone()));
    c.set(1, dtype::INT64, Some(out));
    Some(())
}

fn global_pool(c: &mut Node) -> Option<()> {
    let s = c.shape(0)?;
    let out = s
        .iter()
        .enumerate()
        .map(|(i, d)| if i < 2 { d.clone() } else { Dim::Known(1) })
        .collect();
    c.set(0, c.dtype(0), Some(out));
    Some(())
}

fn batch_norm(c: &mut Node) -> Option<()> {
    c.same(0, 0);
    let ch = c.shape(0).and_then(|s| s.get(1).cloned());
    let dt = c.dtype(0);
    for o in 1..c.outputs() {
        c.set(o, dt, ch.clone().map(|d| vec![d]));
    }
    Some(())
}

fn layer_norm(c: &mut Node) -> Option<()> {
    c.same(0, 0);
    let s = c.shape(0)?;
    let a = axis(c.attr_i("axis", -1), s.len())?;
    let stat: Vec<Dim> = s
        .iter()
        .enumerate()
        .map(|(i, d)| if i < a { d.clone() } else { Dim::Known(1) })
        .collect();
    let st = c.attr_i("stash_type", 1) as i32;
    c.set(1, st, Some(stat.clone()));
    c.set(2, st, Some(stat));
    Some(())
}

fn dropout(c: &mut Node) -> Option<()> {
    c.same(0, 0);
    c.set(1, dtype::BOOL, c.shape(0));
    Some(())
}

fn loss(c: &mut Node) -> Option<()> {
    let red = c.attr_s("reduction").unwrap_or_else(|| "mean".into());
    let l = if red == "none" { c.shape(1) } else { Some(vec![]) };
    c.set(0, c.dtype(0), l);
    c.same(1, 0);
    Some(())
}

/// RNN, GRU, LSTM: `Y` is `[seq, dirs, batch, hidden]` (`layout=1`: `[batch, seq, dirs,
/// hidden]`), the last states `[dirs, batch, hidden]` (`[batch, dirs, hidden]`).
fn recurrent(c: &mut Node) -> Option<()> {
    let x = c.shape(0)?;
    if x.len() != 3 {
        return None;
    }
    let hidden = Dim::Known(c.attr_i("hidden_size", 0));
    let dirs = Dim::Known(if c.attr_s("direction").as_deref() == Some("bidirectional") {
        2
    } else {
        1
    });
    let batch_first = c.attr_i("layout", 0) == 1;
    let (seq, batch) = if batch_first { (&x[1], &x[0]) } else { (&x[0], &x[1]) };
    let dt = c.dtype(0);
    let (y, state) = if batch_first {
        (
            vec![batch.clone(), seq.clone(), dirs.clone(), hidden.clone()],
            vec![batch.clone(), dirs, hidden],
        )
    } else {
        (
            vec![seq.clone(), dirs.clone(), batch.clone(), hidden.clone()],
            vec![dirs, batch.clone(), hidden],
        )
    };
    c.set(0, dt, Some(y));
    for o in 1..c.outputs() {
        c.set(o, dt, Some(state.clone()));
    }
    Some(())
}

/// Resize (and the older Upsample): output sizes given, or `floor(d * scale)` per dim.
fn resize(c: &mut Node) -> Option<()> {
    let x = c.shape(0)?;
    let dt = c.dtype(0);
    let (scales_at, sizes_at) = if c.n.op_type == "Upsample" || c.opset < 11 {
        (1, usize::MAX)
    } else {
        (2, 3)
    };
    // Opset 18: `axes` restricts scales/sizes to some dims.
    let axes: Vec<usize> = match c.attr_ints("axes") {
        Some(a) => a.iter().map(|&a| axis(a, x.len())).collect::<Option<_>>()?,
        None => (0..x.len()).collect(),
    };
    let mut out = x.clone();
    if c.has(sizes_at) {
        let sizes = c.value(sizes_at)?;
        if sizes.len() != axes.len() {
            return None;
        }
        if c.attr_s("keep_aspect_ratio_policy").is_some_and(|p| p != "stretch") {
            let known: Option<Vec<i64>> = axes.iter().map(|&a| x[a].known()).collect();
            let sz: Option<Vec<i64>> = sizes.iter().map(Dim::known).collect();
            let (known, sz) = (known?, sz?);
            let ratios: Vec<f64> = sz.iter().zip(&known).map(|(&s, &d)| s as f64 / d as f64).collect();
            let policy_larger = c.attr_s("keep_aspect_ratio_policy").as_deref() == Some("not_smaller");
            let r = ratios
                .iter()
                .cloned()
                .fold(if policy_larger { f64::MIN } else { f64::MAX }, |a, b| {
                    if policy_larger {
                        a.max(b)
                    } else {
                        a.min(b)
                    }
                });
            for (j, &a) in axes.iter().enumerate() {
                out[a] = Dim::Known((known[j] as f64 * r).round() as i64);
            }
        } else {
            for (j, &a) in axes.iter().enumerate() {
                out[a] = sizes[j].clone();
            }
        }
    } else {
        let scales = match c.floats(scales_at) {
            Some(s) => s,
            None if c.n.op_type == "Upsample" || c.opset < 10 => c
                .attr_ints("scales")
                .map(|v| v.iter().map(|&x| x as f64).collect())
                .or_else(|| crate::attr::attr(c.n, "scales").map(|a| a.floats.iter().map(|&x| x as f64).collect()))?,
            None => return None,
        };
        if scales.len() != axes.len() {
            return None;
        }
        for (j, &a) in axes.iter().enumerate() {
            let s = scales[j];
            out[a] = match x[a].known() {
                Some(d) => Dim::Known((d as f64 * s + 1e-9).floor() as i64),
                None if s.fract() == 0.0 => x[a].mul(&Dim::Known(s as i64)),
                None => Dim::Unknown,
            };
        }
    }
    c.set(0, dt, Some(out));
    Some(())
}

/// Einsum: each letter names one dim; `...` broadcasts; without `->` the output is the
/// letters used once, in alphabetical order.
fn einsum(c: &mut Node) -> Option<()> {
    let eq: String = c.attr_s("equation")?.chars().filter(|ch| !ch.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != c.inputs() {
        return None;
    }
    let mut dims: std::collections::BTreeMap<char, Dim> = Default::default();
    let mut counts: std::collections::BTreeMap<char, usize> = Default::default();
    let mut ellipsis: Vec<Vec<Dim>> = Vec::new();
    for (i, t) in terms.iter().enumerate() {
        let s = c.shape(i)?;
        let (pre, post) = match t.split_once("...") {
            Some((a, b)) => (a, Some(b)),
            None => (*t, None),
        };
        let pre: Vec<char> = pre.chars().collect();
        let post: Vec<char> = post.map(|p| p.chars().collect()).unwrap_or_default();
        let named = pre.len() + post.len();
        if s.len() < named || (!t.contains("...") && s.len() != named) {
            return None;
        }
        let ell = s.len() - named;
        for (j, ch) in pre.iter().enumerate() {
            let d = s[j].clone();
            let e = dims.entry(*ch).or_insert(Dim::Known(1));
            *e = broadcast(&[vec![e.clone()], vec![d]]).pop()?;
            *counts.entry(*ch).or_default() += 1;
        }
        for (j, ch) in post.iter().enumerate() {
            let d = s[pre.len() + ell + j].clone();
            let e = dims.entry(*ch).or_insert(Dim::Known(1));
            *e = broadcast(&[vec![e.clone()], vec![d]]).pop()?;
            *counts.entry(*ch).or_default() += 1;
        }
        if t.contains("...") {
            ellipsis.push(s[pre.len()..pre.len() + ell].to_vec());
        }
    }
    let ell = broadcast(&ellipsis);
    let rhs = rhs.unwrap_or_else(|| {
        let once: String = counts.iter().filter(|(_, &n)| n == 1).map(|(ch, _)| *ch).collect();
        if ellipsis.is_empty() {
            once
        } else {
            format!("...{once}")
        }
    });
    let mut out = Vec::new();
    let (pre, post) = match rhs.split_once("...") {
        Some((a, b)) => (a.to_string(), Some(b.to_string())),
        None => (rhs.clone(), None),
    };
    for ch in pre.chars() {
        out.push(dims.get(&ch)?.clone());
    }
    if let Some(post) = post {
        out.extend(ell);
        for ch in post.chars() {
            out.push(dims.get(&ch)?.clone());
        }
    }
    c.set(0, c.dtype(0), Some(out));
    Some(())
}
