//! MatMul and Gemm.

use super::Out;
use crate::ctx::Ctx;
use crate::Kind::{NoRule, Vjp};
use crate::{op, Op};
use dagr_onnx::builder::{attr_float, attr_int, attr_ints};
use dagr_onnx::Dim;

/// This family's operators, each one entry: name, the first schema version covered, shape
/// inference, gradient, formula.
pub(crate) static OPS: &[Op] = &[
    op(
        "MatMul",
        1,
        Some(shapes::matmul),
        Vjp(matmul),
        "dA = unb(g B^T), dB = unb(A^T g)",
    ),
    op(
        "Gemm",
        1,
        Some(shapes::gemm),
        Vjp(gemm),
        "dA = alpha g B'^T (transposed back), dB = alpha A'^T g, dC = beta unb(g)",
    ),
    op(
        "Einsum",
        12,
        Some(shapes::einsum),
        Vjp(einsum),
        "dA_i = einsum(g, other operands -> A_i), expanded over letters only A_i has",
    ),
    op(
        "Det",
        11,
        Some(shapes::det),
        Vjp(det),
        "dA = g cofactors(A) = g [(-1)^(i+j) det(A without row i, column j)]",
    ),
    op(
        "MatMulInteger",
        10,
        Some(shapes::matmul),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
];

/// Shape (and value) inference of this family's operators.
pub(crate) mod shapes {
    use crate::infer::broadcast;
    use crate::infer::Node;
    use dagr_onnx::dim::Dim;
    use dagr_onnx::dtype;

    /// Det: the batch dims of `[*, M, M]`.
    pub(crate) fn det(c: &mut Node) -> Option<()> {
        let s = c.shape(0)?;
        let r = s.len().checked_sub(2)?;
        c.set(0, c.dtype(0), Some(s[..r].to_vec()));
        Some(())
    }

    pub(crate) fn matmul(c: &mut Node) -> Option<()> {
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

    pub(crate) fn gemm(c: &mut Node) -> Option<()> {
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

    /// Einsum: each letter names one dim; `...` broadcasts; without `->` the output is the
    /// letters used once, in alphabetical order.
    pub(crate) fn einsum(c: &mut Node) -> Option<()> {
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
}

fn swap_last_two(rank: usize) -> Vec<i64> {
    let mut p: Vec<i64> = (0..rank as i64).collect();
    p.swap(rank - 1, rank - 2);
    p
}

/// Y = A @ B with numpy semantics (1-D operands promoted, batch dims broadcast).
pub fn matmul(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g.first().and_then(|x| x.clone()) else {
        return Ok(vec![None, None]);
    };
    let (a, b) = (c.input(0).to_string(), c.input(1).to_string());
    let (sa, sb) = (c.shape(&a)?, c.shape(&b)?);
    let (ra, rb) = (sa.len(), sb.len());
    if ra == 1 && rb == 1 {
        let ga = need[0].then(|| c.op("Mul", &[&g, &b]));
        let gb = need[1].then(|| c.op("Mul", &[&g, &a]));
        return Ok(vec![ga, gb]);
    }
    // Promote 1-D operands and the gradient to the matrix form.
    let (a2, sa2) = if ra == 1 {
        (c.unsqueeze(&a, &[0]), [vec![Dim::Known(1)], sa.clone()].concat())
    } else {
        (a.clone(), sa.clone())
    };
    let (b2, sb2) = if rb == 1 {
        (c.unsqueeze(&b, &[1]), [sb.clone(), vec![Dim::Known(1)]].concat())
    } else {
        (b.clone(), sb.clone())
    };
    let mut g2 = g.clone();
    let gr = c.rank(c.output(0))?;
    if ra == 1 {
        g2 = c.unsqueeze(&g2, &[gr as i64 - 1]);
    }
    if rb == 1 {
        let r = if ra == 1 { gr + 1 } else { gr };
        g2 = c.unsqueeze(&g2, &[r as i64]);
    }
    let batch = crate::infer::broadcast(&[sa2[..sa2.len() - 2].to_vec(), sb2[..sb2.len() - 2].to_vec()]);
    let m = sa2[sa2.len() - 2].clone();
    let k = sa2[sa2.len() - 1].clone();
    let n = sb2[sb2.len() - 1].clone();
    let mut out = vec![None, None];
    if need[0] {
        let bt = c.op_a("Transpose", &[&b2], vec![attr_ints("perm", &swap_last_two(sb2.len()))]);
        let ga = c.op("MatMul", &[&g2, &bt]);
        let gd = [batch.clone(), vec![m.clone(), k.clone()]].concat();
        out[0] = Some(c.sum_to(&ga, &gd, &sa2, &a));
    }
    if need[1] {
        if rb == 2 && ra >= 2 {
            // A 2-D weight: fold every batch dim into one Gemm (no batch reduction needed).
            let kk = rows_of(c, &k, &a2);
            let nn = rows_of(c, &n, &g2);
            let a_flat = c.op("Reshape", &[&a2, &kk]);
            let g_flat = c.op("Reshape", &[&g2, &nn]);
            let gb = c.op_a("Gemm", &[&a_flat, &g_flat], vec![attr_int("transA", 1)]);
            out[1] = Some(c.reshape_like(&gb, &b));
        } else {
            let at = c.op_a("Transpose", &[&a2], vec![attr_ints("perm", &swap_last_two(sa2.len()))]);
            let gb = c.op("MatMul", &[&at, &g2]);
            let gd = [batch, vec![k, n]].concat();
            out[1] = Some(c.sum_to(&gb, &gd, &sb2, &b));
        }
    }
    Ok(out)
}

/// The shape `[-1, d]` that folds every leading dim of `t` into rows of its last dim `d`:
/// a constant when `d` is known, read from `t`'s shape at run time otherwise (a Reshape may
/// hold only one -1).
fn rows_of(c: &mut Ctx, d: &Dim, t: &str) -> String {
    match d {
        Dim::Known(v) => c.ints(&[-1, *v]),
        _ => {
            let s = c.shape_of(t);
            let (from, to) = (c.ints(&[-1]), c.ints(&[i64::MAX]));
            let last = c.op("Slice", &[&s, &from, &to]);
            let minus_one = c.ints(&[-1]);
            c.op_a("Concat", &[&minus_one, &last], vec![attr_int("axis", 0)])
        }
    }
}

/// Y = alpha * A' B' + beta * C, with A' = A or A^T (transA), B' likewise.
pub fn gemm(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g.first().and_then(|x| x.clone()) else {
        return Ok(vec![None; need.len()]);
    };
    let (a, b) = (c.input(0).to_string(), c.input(1).to_string());
    let ta = c.attr_i("transA", 0) == 1;
    let tb = c.attr_i("transB", 0) == 1;
    let alpha = c.attr_f("alpha", 1.0);
    let beta = c.attr_f("beta", 1.0);
    let gemm = |c: &mut Ctx, x: &str, y: &str, t1: bool, t2: bool| {
        c.op_a(
            "Gemm",
            &[x, y],
            vec![
                attr_int("transA", t1 as i64),
                attr_int("transB", t2 as i64),
                attr_float("alpha", alpha),
            ],
        )
    };
    let mut out = vec![None; need.len()];
    if need[0] {
        out[0] = Some(match (ta, tb) {
            (false, false) => gemm(c, &g, &b, false, true),
            (false, true) => gemm(c, &g, &b, false, false),
            (true, false) => gemm(c, &b, &g, false, true),
            (true, true) => gemm(c, &b, &g, true, true),
        });
    }
    if need[1] {
        out[1] = Some(match (ta, tb) {
            (false, false) => gemm(c, &a, &g, true, false),
            (true, false) => gemm(c, &a, &g, false, false),
            (false, true) => gemm(c, &g, &a, true, false),
            (true, true) => gemm(c, &g, &a, true, true),
        });
    }
    if need.len() > 2 && need[2] {
        let y = c.output(0).to_string();
        let cc = c.input(2).to_string();
        let gs = if beta == 1.0 {
            g.clone()
        } else {
            let s = c.scalar(beta as f64);
            c.op("Mul", &[&g, &s])
        };
        out[2] = Some(c.unbroadcast(&gs, &cc, &y)?);
    }
    Ok(out)
}

/// An Einsum equation in explicit form, ellipses replaced by letters of their own.
struct Equation {
    inputs: Vec<Vec<char>>,
    output: Vec<char>,
}

fn parse_einsum(eq: &str, ranks: &[usize]) -> std::result::Result<Equation, String> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != ranks.len() {
        return Err(format!(
            "the equation has {} operands, the node {}",
            terms.len(),
            ranks.len()
        ));
    }
    // Letters for the ellipsis dims: unused ones, the last of them right-aligned per operand.
    let spare: Vec<char> = ('A'..='Z').chain('a'..='z').filter(|c| !eq.contains(*c)).collect();
    let mut ell = 0usize;
    let mut inputs = Vec::new();
    for (t, &r) in terms.iter().zip(ranks) {
        let named = t.replace("...", "").chars().count();
        let e = if t.contains("...") { r.saturating_sub(named) } else { 0 };
        ell = ell.max(e);
        inputs.push((t.to_string(), e));
    }
    if spare.len() < ell {
        return Err("too many ellipsis dims".into());
    }
    let ell_letters = &spare[..ell];
    let expand = |t: &str, e: usize| -> Vec<char> {
        let mut out = Vec::new();
        if let Some((a, b)) = t.split_once("...") {
            out.extend(a.chars());
            out.extend(&ell_letters[ell - e..]);
            out.extend(b.chars());
        } else {
            out.extend(t.chars());
        }
        out
    };
    let ins: Vec<Vec<char>> = inputs.iter().map(|(t, e)| expand(t, *e)).collect();
    for (t, &r) in ins.iter().zip(ranks) {
        if t.len() != r {
            return Err(format!(
                "operand '{}' does not match its rank {r}",
                t.iter().collect::<String>()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if !t.iter().all(|c| seen.insert(*c)) {
            return Err("a letter repeated within one operand (a diagonal) has no gradient rule".into());
        }
    }
    let output = match rhs {
        Some(r) => expand(&r, ell),
        None => {
            let mut once: Vec<char> = lhs
                .replace("...", "")
                .chars()
                .filter(|c| c.is_alphabetic() && lhs.matches(*c).count() == 1)
                .collect();
            once.sort_unstable();
            [ell_letters.to_vec(), once].concat()
        }
    };
    Ok(Equation { inputs: ins, output })
}

/// Einsum: dA_i = einsum(out, other operands -> A_i's letters) over the letters that appear in
/// the output or another operand; letters only A_i has (summed away) come back by Unsqueeze and
/// Expand, and ellipsis dims that broadcast from 1 are summed.
/// Det of [*, n, n] (n static): d det(A) / d A_ij is the cofactor (-1)^(i+j) det(M_ij), M_ij
/// the minor without row i and column j; the minors are gathered (rows, then columns), their
/// determinants taken by Det itself. Standard ONNX has no inverse, and the cofactors, unlike
/// det(A) A^-T, are the gradient at singular matrices too.
pub fn det(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g.first().and_then(|x| x.clone()) else {
        return Ok(vec![None; need.len()]);
    };
    let a = c.input(0).to_string();
    let s = c.shape(&a)?;
    let rank = s.len();
    let n = match s.last() {
        Some(Dim::Known(n)) if rank >= 2 => *n,
        _ => return Err(c.err("its gradient needs the matrix size (the last two dims) known")),
    };
    // g as [*, 1, 1], against A's [*, n, n]
    let g = c.unsqueeze(&g, &[rank as i64 - 2, rank as i64 - 1]);
    if n == 1 {
        return Ok(vec![Some(g)]);
    }
    let n = n as usize;
    // others[i] = every index but i: [n, n-1]
    let others: Vec<i64> = (0..n)
        .flat_map(|i| (0..n).filter(move |&k| k != i).map(|k| k as i64))
        .collect();
    let idx = c.ints(&others);
    let shape = c.ints(&[n as i64, n as i64 - 1]);
    let idx = c.op("Reshape", &[&idx, &shape]);
    let r = rank as i64;
    // [*, n, n] -> rows [*, i, n-1, n] -> columns [*, i, n-1, j, n-1] -> [*, i, j, n-1, n-1]
    let rows = c.op_a("Gather", &[&a, &idx], vec![attr_int("axis", r - 2)]);
    let minors = c.op_a("Gather", &[&rows, &idx], vec![attr_int("axis", r)]);
    let mut perm: Vec<i64> = (0..r - 2).collect();
    perm.extend([r - 2, r, r - 1, r + 1]);
    let minors = c.op_a("Transpose", &[&minors], vec![attr_ints("perm", &perm)]);
    let dets = c.op("Det", &[&minors]);
    let signs: Vec<f64> = (0..n * n)
        .map(|k| if (k / n + k % n).is_multiple_of(2) { 1.0 } else { -1.0 })
        .collect();
    let signs = c.floats(&[n as i64, n as i64], &signs);
    let cof = c.op("Mul", &[&dets, &signs]);
    Ok(vec![Some(c.op("Mul", &[&cof, &g]))])
}

pub fn einsum(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g.first().and_then(|x| x.clone()) else {
        return Ok(vec![None; need.len()]);
    };
    let eq = c.attr_s("equation").unwrap_or_default();
    let shapes: Vec<Vec<Dim>> = (0..need.len())
        .map(|i| c.shape(c.input(i)))
        .collect::<dagr_onnx::Result<_>>()?;
    let ranks: Vec<usize> = shapes.iter().map(Vec::len).collect();
    let e = parse_einsum(&eq, &ranks).map_err(|m| c.err(format!("equation '{eq}': {m}")))?;
    let out_s: String = e.output.iter().collect();
    let mut out = vec![None; need.len()];
    for (i, &w) in need.iter().enumerate() {
        if !w {
            continue;
        }
        let a = &e.inputs[i];
        let elsewhere =
            |ch: &char| e.output.contains(ch) || e.inputs.iter().enumerate().any(|(j, t)| j != i && t.contains(ch));
        let kept: Vec<char> = a.iter().copied().filter(elsewhere).collect();
        let mut terms = vec![out_s.clone()];
        let mut ops = vec![g.clone()];
        for (j, t) in e.inputs.iter().enumerate() {
            if j != i {
                terms.push(t.iter().collect());
                ops.push(c.input(j).to_string());
            }
        }
        let eqn = format!("{}->{}", terms.join(","), kept.iter().collect::<String>());
        let refs: Vec<&str> = ops.iter().map(String::as_str).collect();
        let mut d = c.op_a("Einsum", &refs, vec![dagr_onnx::builder::attr_string("equation", &eqn)]);
        let x = c.input(i).to_string();
        if kept.len() != a.len() {
            let dropped: Vec<i64> = (0..a.len())
                .filter(|&k| !kept.contains(&a[k]))
                .map(|k| k as i64)
                .collect();
            d = c.unsqueeze(&d, &dropped);
            let s = c.shape_of(&x);
            d = c.op("Expand", &[&d, &s]);
        }
        // Dims of size 1 that broadcast against a larger one elsewhere.
        let ones: Vec<i64> = shapes[i]
            .iter()
            .enumerate()
            .filter(|(k, dim)| **dim == Dim::Known(1) && kept.contains(&a[*k]))
            .map(|(k, _)| k as i64)
            .collect();
        if !ones.is_empty() {
            d = c.reduce_sum(&d, &ones, true);
        }
        out[i] = Some(d);
    }
    Ok(out)
}

/// Finite-difference cases of this module's ops (see `crate::cases`).
pub fn cases() -> Vec<crate::cases::Case> {
    use crate::cases::*;
    use dagr_onnx::builder::{attr_float, attr_int, attr_string};
    vec![
        case("matmul_weight", "MatMul", vec![x(&[2, 3, 4]), x(&[4, 5])]),
        // Det (tract 0.23 has none): one matrix, a batch, 2x2 (1x1 minors) and 1x1.
        // The matrix size must be known; batch dims may be symbolic.
        case("det_3x3", "Det", vec![x(&[3, 3])]).only(ORT_ONLY).symbolic(&[]),
        case("det_batched_4x4", "Det", vec![x(&[2, 3, 4, 4])])
            .only(ORT_ONLY)
            .symbolic(&[0, 1]),
        case("det_2x2", "Det", vec![x(&[2, 2, 2])])
            .only(ORT_ONLY)
            .symbolic(&[0]),
        case("det_1x1", "Det", vec![x(&[3, 1, 1])])
            .only(ORT_ONLY)
            .symbolic(&[0]),
        case("matmul_batched", "MatMul", vec![x(&[3, 4]), x(&[2, 4, 5])]),
        case("matmul_vec_left", "MatMul", vec![x(&[4]), x(&[4, 5])]),
        case("matmul_vec_right", "MatMul", vec![x(&[2, 3, 4]), x(&[4])]),
        case("matmul_bcast_batch", "MatMul", vec![x(&[2, 1, 3, 4]), x(&[5, 4, 2])]),
        case("gemm", "Gemm", vec![x(&[3, 4]), x(&[4, 5]), x(&[5])])
            .attrs(vec![attr_float("alpha", 0.7), attr_float("beta", 1.3)]),
        case("gemm_ta", "Gemm", vec![x(&[4, 3]), x(&[4, 5]), x(&[1, 5])]).attrs(vec![attr_int("transA", 1)]),
        case("gemm_tb", "Gemm", vec![x(&[3, 4]), x(&[5, 4]), x(&[3, 5])]).attrs(vec![attr_int("transB", 1)]),
        case("gemm_tab_noc", "Gemm", vec![x(&[4, 3]), x(&[5, 4])]).attrs(vec![
            attr_int("transA", 1),
            attr_int("transB", 1),
            attr_float("alpha", 1.5),
        ]),
        case("einsum_conv_like", "Einsum", vec![x(&[2, 3, 4]), x(&[3, 5])])
            .attrs(vec![attr_string("equation", "bcl,cd->bdl")]),
        case(
            "einsum_batched_transposed",
            "Einsum",
            vec![x(&[2, 3, 4]), x(&[2, 5, 4])],
        )
        .attrs(vec![attr_string("equation", "bij,bkj->bik")]),
        case(
            "einsum_implicit_summed_letter",
            "Einsum",
            vec![x(&[3, 4]), x(&[4, 2, 5])],
        )
        .attrs(vec![attr_string("equation", "ij,jkl")]),
        case("einsum_ellipsis", "Einsum", vec![x(&[2, 3, 4]), x(&[2, 4, 5])])
            .attrs(vec![attr_string("equation", "...ij,...jk->...ik")]),
        // Ellipsis dims broadcasting from 1 (tract 0.23's Einsum does not broadcast).
        case(
            "einsum_ellipsis_broadcast",
            "Einsum",
            vec![x(&[2, 1, 3, 4]), x(&[1, 5, 4, 2])],
        )
        .attrs(vec![attr_string("equation", "...ij,...jk->...ik")])
        .symbolic(&[2])
        .only(ORT_ONLY),
    ]
}
