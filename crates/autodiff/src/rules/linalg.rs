//! MatMul and Gemm.

use super::Out;
use crate::ctx::Ctx;
use dagr_onnx::builder::{attr_float, attr_int, attr_ints};
use dagr_onnx::Dim;

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
    let batch = dagr_onnx::infer::broadcast(&[sa2[..sa2.len() - 2].to_vec(), sb2[..sb2.len() - 2].to_vec()]);
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
