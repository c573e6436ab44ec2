//! Data-movement operators: reshapes, transposes, concatenation, slicing, gathering,
//! broadcasting and reductions.

use super::{g0_owned, Out};
use crate::ctx::{norm_axis, Ctx};
use dagr_onnx::builder::{attr_int, attr_ints, attr_string};
use dagr_onnx::error::Result;
use dagr_onnx::{dtype, Dim};

/// Reshape, Flatten, Squeeze, Unsqueeze: the gradient takes the input's shape back.
pub fn reshape(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let x = c.input(0).to_string();
    let mut v = vec![Some(c.reshape_like(&g, &x))];
    v.resize(need.len(), None);
    Ok(v)
}

pub fn transpose(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let r = c.rank(c.input(0))?;
    let perm = c.attr_ints("perm").unwrap_or_else(|| (0..r as i64).rev().collect());
    let mut inv = vec![0i64; r];
    for (i, &p) in perm.iter().enumerate() {
        inv[p as usize] = i as i64;
    }
    Ok(vec![Some(c.op_a("Transpose", &[&g], vec![attr_ints("perm", &inv)]))])
}

/// Concat: each input gets its slice of the gradient (one Slice per input, constant bounds,
/// which tract needs).
pub fn concat(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let r = c.rank(c.input(0))?;
    let axis = norm_axis(c.attr_i("axis", 0), r) as i64;
    let lens: Vec<Dim> = (0..need.len())
        .map(|i| Ok(c.shape(c.input(i))?[axis as usize].clone()))
        .collect::<dagr_onnx::Result<_>>()?;
    let a = c.ints(&[axis]);
    let mut out = Vec::new();
    if lens.iter().all(|d| d.known().is_some()) {
        let mut start = 0i64;
        for (len, &need_i) in lens.iter().zip(need) {
            let len = len.known().unwrap_or(0);
            out.push(need_i.then(|| {
                let (s, e) = (c.ints(&[start]), c.ints(&[start + len]));
                c.op("Slice", &[&g, &s, &e, &a])
            }));
            start += len;
        }
        return Ok(out);
    }
    // Offsets from the inputs' shapes at run time.
    let (from, to) = (c.ints(&[axis]), c.ints(&[axis + 1]));
    let mut start = c.ints(&[0]);
    for (i, &need_i) in need.iter().enumerate() {
        let x = c.input(i).to_string();
        let s = c.shape_of(&x);
        let len = c.op("Slice", &[&s, &from, &to]);
        let end = c.op("Add", &[&start, &len]);
        out.push(need_i.then(|| c.op("Slice", &[&g, &start, &end, &a])));
        start = end;
    }
    Ok(out)
}

/// Split: the output gradients concatenated; outputs without one contribute zeros of their
/// shape (skipping them would give the wrong size).
pub fn split(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    if g.iter().all(Option::is_none) {
        return Ok(vec![None; need.len()]);
    }
    let r = c.rank(c.input(0))?;
    let axis = norm_axis(c.attr_i("axis", 0), r) as i64;
    let mut parts = Vec::new();
    for (i, gi) in g.iter().enumerate() {
        parts.push(match gi {
            Some(x) => x.clone(),
            None => {
                let o = c.output(i).to_string();
                c.zeros_like(&o)
            }
        });
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let mut v = vec![Some(c.op_a("Concat", &refs, vec![attr_int("axis", axis)]))];
    v.resize(need.len(), None);
    Ok(v)
}

/// Slice with step 1 and constant bounds: pad the gradient back with zeros.
pub fn slice(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let x = c.input(0).to_string();
    let xs = c.shape(&x)?;
    let r = xs.len();
    let starts = c.const_input(1).ok_or_else(|| c.err("its starts must be constant"))?;
    let ends = c.const_input(2).ok_or_else(|| c.err("its ends must be constant"))?;
    let axes = if c.has_input(3) {
        c.const_input(3).ok_or_else(|| c.err("its axes must be constant"))?
    } else {
        (0..starts.len() as i64).collect()
    };
    if c.has_input(4) {
        let steps = c.const_input(4).ok_or_else(|| c.err("its steps must be constant"))?;
        if steps.iter().any(|&s| s != 1) {
            return Err(c.err("only step 1 has a gradient rule"));
        }
    }
    let mut pads = vec![0i64; 2 * r];
    let mut dynamic: Vec<(usize, i64, i64)> = Vec::new();
    for ((&s, &e), &a) in starts.iter().zip(&ends).zip(&axes) {
        let a = norm_axis(a, r);
        let d = match &xs[a] {
            Dim::Known(v) => *v,
            _ => {
                dynamic.push((a, s, e));
                continue;
            }
        };
        let clamp = |v: i64| if v < 0 { (v + d).clamp(0, d) } else { v.clamp(0, d) };
        let (s, e) = (clamp(s), clamp(e).max(clamp(s)));
        pads[a] = s;
        pads[a + r] = d - e;
    }
    let p = if dynamic.is_empty() {
        c.ints(&pads)
    } else {
        // A symbolic dim d: the start and end clamped into [0, d] at run time.
        let shape = c.shape_of(&x);
        let zero = c.ints(&[0]);
        let mut parts: Vec<String> = pads.iter().map(|&v| c.ints(&[v])).collect();
        for (a, s, e) in dynamic {
            let (from, to) = (c.ints(&[a as i64]), c.ints(&[a as i64 + 1]));
            let d = c.op("Slice", &[&shape, &from, &to]);
            let mut clamp = |v: i64| {
                let v = v.clamp(-(i64::MAX / 2), i64::MAX / 2);
                let k = c.ints(&[v]);
                let v = if v < 0 { c.op("Add", &[&k, &d]) } else { k };
                let v = c.op("Max", &[&v, &zero]);
                c.op("Min", &[&v, &d])
            };
            let (s, e) = (clamp(s), clamp(e));
            let e = c.op("Max", &[&e, &s]);
            parts[a] = s;
            parts[a + r] = c.op("Sub", &[&d, &e]);
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        c.op_a("Concat", &refs, vec![attr_int("axis", 0)])
    };
    let mut v = vec![Some(c.op_a("Pad", &[&g, &p], vec![attr_string("mode", "constant")]))];
    v.resize(need.len(), None);
    Ok(v)
}

/// Indices made non-negative (tract's ScatterND does not wrap them).
fn normalized_indices(c: &mut Ctx, idx: &str, x: &str, axis: usize) -> String {
    let idx = if c.dtype(idx) != dtype::INT64 {
        c.cast(idx, dtype::INT64)
    } else {
        idx.to_string()
    };
    // The dim as a scalar, so that the indices keep their rank (a scalar index stays one).
    let s = c.shape_of(x);
    let a = c.b.scalar_i64(axis as i64);
    let d = c.op_a("Gather", &[&s, &a], vec![attr_int("axis", 0)]);
    let zero = c.b.scalar_i64(0);
    let neg = c.op("Less", &[&idx, &zero]);
    let wrapped = c.op("Add", &[&idx, &d]);
    c.op("Where", &[&neg, &wrapped, &idx])
}

/// The upstream gradient of Gather/GatherElements when X's gradient is wanted. Both scatter it
/// back with `reduction="add"`, which needs opset 16.
fn scatter_add_upstream(c: &Ctx, g: &[Option<String>], need: &[bool]) -> Result<Option<String>> {
    let Some(g) = g0_owned(g) else { return Ok(None) };
    if !need[0] {
        return Ok(None);
    }
    if c.b.opset < 16 {
        return Err(c.err("its gradient scatters with reduction=\"add\", which needs opset 16 or newer"));
    }
    Ok(Some(g))
}

/// Gather (embedding lookups): scatter-add the gradient rows back into zeros of X's shape.
pub fn gather(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = scatter_add_upstream(c, g, need)? else {
        return Ok(vec![None, None]);
    };
    let x = c.input(0).to_string();
    let i = c.input(1).to_string();
    let rx = c.rank(&x)?;
    let ri = c.rank(&i)?;
    let axis = norm_axis(c.attr_i("axis", 0), rx);
    let idx = normalized_indices(c, &i, &x, axis);
    let idx = c.unsqueeze(&idx, &[ri as i64]);
    let add = attr_string("reduction", "add");
    if axis == 0 {
        let zeros = c.zeros_like(&x);
        return Ok(vec![Some(c.op_a("ScatterND", &[&zeros, &idx, &g], vec![add])), None]);
    }
    // Move the gathered axis to the front, scatter, move it back.
    let mut p: Vec<i64> = vec![axis as i64];
    p.extend((0..rx as i64).filter(|&a| a != axis as i64));
    let xt = c.op_a("Transpose", &[&x], vec![attr_ints("perm", &p)]);
    let zeros = c.zeros_like_dynamic(&xt);
    // g is X[:axis] + I + X[axis+1:]; bring the index dims to the front.
    let rg = rx - 1 + ri;
    let mut pg: Vec<i64> = (axis..axis + ri).map(|a| a as i64).collect();
    pg.extend((0..axis).map(|a| a as i64));
    pg.extend((axis + ri..rg).map(|a| a as i64));
    let gt = c.op_a("Transpose", &[&g], vec![attr_ints("perm", &pg)]);
    let sc = c.op_a("ScatterND", &[&zeros, &idx, &gt], vec![add]);
    let mut inv = vec![0i64; rx];
    for (k, &v) in p.iter().enumerate() {
        inv[v as usize] = k as i64;
    }
    Ok(vec![
        Some(c.op_a("Transpose", &[&sc], vec![attr_ints("perm", &inv)])),
        None,
    ])
}

pub fn gather_elements(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = scatter_add_upstream(c, g, need)? else {
        return Ok(vec![None, None]);
    };
    let x = c.input(0).to_string();
    let rx = c.rank(&x)?;
    let axis = norm_axis(c.attr_i("axis", 0), rx);
    let i = c.input(1).to_string();
    let idx = normalized_indices(c, &i, &x, axis);
    let zeros = c.zeros_like(&x);
    Ok(vec![
        Some(c.op_a(
            "ScatterElements",
            &[&zeros, &idx, &g],
            vec![attr_int("axis", axis as i64), attr_string("reduction", "add")],
        )),
        None,
    ])
}

/// Expand: g, summed to X's shape by the engine (`Kind::Broadcast`).
pub fn expand(_: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    Ok(vec![g0_owned(g), None])
}

/// The reductions: dX = expand(g) d, the reduced axes put back (Unsqueeze when keepdims=0)
/// and broadcast to X's shape, times each reduction's local derivative.
#[derive(Clone, Copy, PartialEq)]
enum Reduction {
    Sum,
    Mean,
    SumSquare,
    L1,
    L2,
    LogSum,
    LogSumExp,
    /// Max and Min: ties share the gradient equally.
    Extremum,
    Prod,
}

fn reduce(c: &mut Ctx, g: &[Option<String>], need: &[bool], kind: Reduction) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let x = c.input(0).to_string();
    let r = c.rank(&x)?;
    let keep = c.attr_i("keepdims", 1) == 1;
    let axes = c.reduce_axes(r)?;
    let noop = c.attr_i("noop_with_empty_axes", 0) == 1;
    let mut v = vec![None; need.len()];
    let axes: Vec<i64> = match axes {
        Some(a) if !a.is_empty() => a.iter().map(|&a| a as i64).collect(),
        // No axes and `noop_with_empty_axes`: the op is the identity, or its local map.
        _ if noop => vec![],
        _ => (0..r as i64).collect(),
    };
    let mut sorted = axes.clone();
    sorted.sort();
    let y = c.output(0).to_string();
    let back = |c: &mut Ctx, t: &str| -> String {
        if keep || sorted.is_empty() {
            t.to_string()
        } else {
            c.unsqueeze(t, &sorted)
        }
    };
    let gk = back(c, &g);
    let s = c.shape_of(&x);
    let ex = c.op("Expand", &[&gk, &s]);
    let yk = back(c, &y);
    if kind == Reduction::Mean {
        let n = c.size_ratio(&x, &y);
        v[0] = Some(c.op("Div", &[&ex, &n]));
        return Ok(v);
    }
    let local = match kind {
        Reduction::Sum | Reduction::Mean => None,
        Reduction::SumSquare => {
            let two = c.scalar(2.0);
            Some(c.op("Mul", &[&x, &two]))
        }
        Reduction::L1 => Some(c.op("Sign", &[&x])),
        Reduction::L2 => Some(c.op("Div", &[&x, &yk])),
        Reduction::LogSum => {
            let sum = c.op("Exp", &[&yk]);
            Some(c.op("Reciprocal", &[&sum]))
        }
        Reduction::LogSumExp => {
            let d = c.op("Sub", &[&x, &yk]);
            Some(c.op("Exp", &[&d]))
        }
        Reduction::Extremum => {
            let eq = c.op("Equal", &[&x, &yk]);
            let m = c.to_float(&eq);
            let count = if sorted.is_empty() {
                m.clone()
            } else {
                c.reduce_sum(&m, &sorted, true)
            };
            Some(c.op("Div", &[&m, &count]))
        }
        Reduction::Prod if sorted.is_empty() => None,
        Reduction::Prod => {
            // d/dX_i of the product is the product of the others. Y / X where no element is
            // zero; with zeros, the product of the others' non-zero elements where none of the
            // others is zero, and 0 where one is: with X' = X with its zeros replaced by 1,
            // P' = prod(X') and Z_i = [X_i = 0], the derivative is
            // Where(sum(Z) - Z_i = 0, P' / X'_i, 0).
            let zero = c.scalar(0.0);
            let one = c.scalar(1.0);
            let z = c.op("Equal", &[&x, &zero]);
            let x1 = c.op("Where", &[&z, &one, &x]);
            let p1 = c.reduce("ReduceProd", &x1, &sorted, true);
            let zf = c.to_float(&z);
            let count = c.reduce_sum(&zf, &sorted, true);
            let others = c.op("Sub", &[&count, &zf]);
            let none = c.op("Equal", &[&others, &zero]);
            let q = c.op("Div", &[&p1, &x1]);
            Some(c.op("Where", &[&none, &q, &zero]))
        }
    };
    v[0] = Some(match local {
        Some(d) => c.op("Mul", &[&ex, &d]),
        None => ex,
    });
    Ok(v)
}

pub fn reduce_sum(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    reduce(c, g, need, Reduction::Sum)
}
pub fn reduce_mean(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    reduce(c, g, need, Reduction::Mean)
}
pub fn reduce_sum_square(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    reduce(c, g, need, Reduction::SumSquare)
}
pub fn reduce_l1(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    reduce(c, g, need, Reduction::L1)
}
pub fn reduce_l2(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    reduce(c, g, need, Reduction::L2)
}
pub fn reduce_log_sum(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    reduce(c, g, need, Reduction::LogSum)
}
pub fn reduce_log_sum_exp(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    reduce(c, g, need, Reduction::LogSumExp)
}
pub fn reduce_extremum(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    reduce(c, g, need, Reduction::Extremum)
}
pub fn reduce_prod(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    reduce(c, g, need, Reduction::Prod)
}

/// GlobalMaxPool: a max over the spatial axes (ties share the gradient).
pub fn global_max_pool(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let (x, y) = (c.input(0).to_string(), c.output(0).to_string());
    let r = c.rank(&x)?;
    let axes: Vec<i64> = (2..r as i64).collect();
    let s = c.shape_of(&x);
    let ex = c.op("Expand", &[&g, &s]);
    let eq = c.op("Equal", &[&x, &y]);
    let m = c.to_float(&eq);
    let count = c.reduce_sum(&m, &axes, true);
    let share = c.op("Div", &[&m, &count]);
    Ok(vec![Some(c.op("Mul", &[&ex, &share]))])
}

/// Tile: the gradient summed over the repeats: g reshaped to [r0, d0, r1, d1, ...] (both read
/// at run time) and summed over the r axes.
pub fn tile(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let x = c.input(0).to_string();
    let reps = c.input(1).to_string();
    let r = c.rank(&x)?;
    let s = c.shape_of(&x);
    let mut parts = Vec::new();
    for i in 0..r as i64 {
        let (from, to) = (c.ints(&[i]), c.ints(&[i + 1]));
        parts.push(c.op("Slice", &[&reps, &from, &to]));
        parts.push(c.op("Slice", &[&s, &from, &to]));
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let target = c.op_a("Concat", &refs, vec![attr_int("axis", 0)]);
    let split = c.op("Reshape", &[&g, &target]);
    let axes: Vec<i64> = (0..r as i64).map(|i| 2 * i).collect();
    let mut out = vec![Some(c.reduce_sum(&split, &axes, false))];
    out.resize(need.len(), None);
    Ok(out)
}

/// DepthToSpace: its inverse rearrangement of the gradient. In DCR mode (the default) that is
/// SpaceToDepth; in CRD mode the channels then go from DCR's order (block position major) to
/// CRD's (channel major): [N, b*b, C', H, W] transposed to [N, C', b*b, H, W].
pub fn depth_to_space(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let b = c.attr_i("blocksize", 0);
    if b < 1 {
        return Err(c.err(format!("blocksize {b}; the spec wants a positive blocksize")));
    }
    let s2d = c.op_a("SpaceToDepth", &[&g], vec![attr_int("blocksize", b)]);
    if c.attr_s("mode").as_deref().unwrap_or("DCR") == "DCR" {
        return Ok(vec![Some(s2d)]);
    }
    let x = c.input(0).to_string();
    let s = c.shape_of(&x);
    let dims = |c: &mut Ctx, from: i64, to: i64| {
        let (f, t) = (c.ints(&[from]), c.ints(&[to]));
        c.op("Slice", &[&s, &f, &t])
    };
    let n = dims(c, 0, 1);
    let hw = dims(c, 2, 4);
    let mid = c.ints(&[b * b, -1]);
    let target = c.op_a("Concat", &[&n, &mid, &hw], vec![attr_int("axis", 0)]);
    let split = c.op("Reshape", &[&s2d, &target]);
    let t = c.op_a("Transpose", &[&split], vec![attr_ints("perm", &[0, 2, 1, 3, 4])]);
    Ok(vec![Some(c.op("Reshape", &[&t, &s]))])
}

/// SpaceToDepth: its inverse, DepthToSpace in DCR mode, of the gradient.
pub fn space_to_depth(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let b = c.attr_i("blocksize", 0);
    if b < 1 {
        return Err(c.err(format!("blocksize {b}; the spec wants a positive blocksize")));
    }
    let attrs = vec![attr_int("blocksize", b), attr_string("mode", "DCR")];
    Ok(vec![Some(c.op_a("DepthToSpace", &[&g], attrs))])
}

/// ReverseSequence: the same reversal of the gradient (it is its own inverse); the lengths
/// have none.
pub fn reverse_sequence(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None, None]);
    };
    let lens = c.input(1).to_string();
    let attrs = vec![
        attr_int("batch_axis", c.attr_i("batch_axis", 1)),
        attr_int("time_axis", c.attr_i("time_axis", 0)),
    ];
    Ok(vec![Some(c.op_a("ReverseSequence", &[&g, &lens], attrs)), None])
}

/// Compress as a Gather of the condition's true positions (`NonZero`) along `axis`, or from the
/// flattened input without one; the engine differentiates the Gather.
pub fn compress(c: &mut Ctx) -> Result<Vec<String>> {
    let x = c.input(0).to_string();
    let cond = c.input(1).to_string();
    let nz = c.op("NonZero", &[&cond]);
    let flat = c.ints(&[-1]);
    let idx = c.op("Reshape", &[&nz, &flat]);
    let out = match c.node.attribute.iter().any(|a| a.name == "axis") {
        true => {
            let r = c.rank(&x)?;
            let axis = norm_axis(c.attr_i("axis", 0), r) as i64;
            c.op_a("Gather", &[&x, &idx], vec![attr_int("axis", axis)])
        }
        false => {
            let xf = c.op("Reshape", &[&x, &flat]);
            c.op_a("Gather", &[&xf, &idx], vec![attr_int("axis", 0)])
        }
    };
    Ok(vec![out])
}

/// Trilu: the same triangle of the gradient.
pub fn trilu(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let upper = c.attr_i("upper", 1);
    let mut ins = vec![g.as_str()];
    let k = c.input(1).to_string();
    if !k.is_empty() {
        ins.push(&k);
    }
    let mut out = vec![Some(c.op_a("Trilu", &ins, vec![attr_int("upper", upper)]))];
    out.resize(need.len(), None);
    Ok(out)
}

/// ScatterND and ScatterElements. `none`: data's gradient is g with the written positions
/// zeroed, the updates' g gathered at them; `add`: g to data, g gathered to the updates;
/// `max`/`min`: each output is the extremum of its data element and the updates written there,
/// so g goes to those equal to it (ties share it equally, as PyTorch's `scatter_reduce`);
/// `mul`: each gets g times the product of the others at its position (zeros counted, as
/// ReduceProd's rule does, so that no division by zero happens).
fn scatter(c: &mut Ctx, g: &[Option<String>], need: &[bool], elements: bool) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let reduction = c.attr_s("reduction").unwrap_or_else(|| "none".into());
    let (x, idx, upd) = (c.input(0).to_string(), c.input(1).to_string(), c.input(2).to_string());
    let axis = c.attr_i("axis", 0);
    let attrs = |red: Option<&str>| {
        let mut a = if elements { vec![attr_int("axis", axis)] } else { vec![] };
        a.extend(red.map(|r| attr_string("reduction", r)));
        a
    };
    let (scatter_op, gather_op) = if elements {
        ("ScatterElements", "GatherElements")
    } else {
        ("ScatterND", "GatherND")
    };
    let gather = |c: &mut Ctx, t: &str| c.op_a(gather_op, &[t, &idx], attrs(None));
    let mut out = vec![None; need.len()];
    let need_upd = need.get(2).copied().unwrap_or(false);
    match reduction.as_str() {
        "none" | "add" => {
            if need[0] {
                out[0] = Some(if reduction == "add" {
                    g.clone()
                } else {
                    let z = c.zeros_like(&upd);
                    c.op_a(scatter_op, &[&g, &idx, &z], attrs(None))
                });
            }
            if need_upd {
                out[2] = Some(gather(c, &g));
            }
        }
        "max" | "min" => {
            let y = c.output(0).to_string();
            let wins_x = c.op("Equal", &[&x, &y]);
            let wins_x = c.to_float(&wins_x);
            let yg = gather(c, &y);
            let wins_u = c.op("Equal", &[&upd, &yg]);
            let wins_u = c.to_float(&wins_u);
            // How many share each output: its data element and the updates written there.
            let count = c.op_a(scatter_op, &[&wins_x, &idx, &wins_u], attrs(Some("add")));
            let share = c.op("Div", &[&g, &count]);
            if need[0] {
                out[0] = Some(c.op("Mul", &[&share, &wins_x]));
            }
            if need_upd {
                let sg = gather(c, &share);
                out[2] = Some(c.op("Mul", &[&sg, &wins_u]));
            }
        }
        "mul" => {
            // With X' and U' the values with zeros replaced by 1, P' = X' times the U' written
            // there, and Z the count of zeros at the position: a factor's derivative is P' over
            // its own value where no other factor is zero, 0 where one is.
            let (zero, one) = (c.scalar(0.0), c.scalar(1.0));
            let zx = c.op("Equal", &[&x, &zero]);
            let zu = c.op("Equal", &[&upd, &zero]);
            let x1 = c.op("Where", &[&zx, &one, &x]);
            let u1 = c.op("Where", &[&zu, &one, &upd]);
            let p1 = c.op_a(scatter_op, &[&x1, &idx, &u1], attrs(Some("mul")));
            let (zxf, zuf) = (c.to_float(&zx), c.to_float(&zu));
            let zeros = c.op_a(scatter_op, &[&zxf, &idx, &zuf], attrs(Some("add")));
            if need[0] {
                let others = c.op("Sub", &[&zeros, &zxf]);
                let none = c.op("Equal", &[&others, &zero]);
                let q = c.op("Div", &[&p1, &x1]);
                let d = c.op("Where", &[&none, &q, &zero]);
                out[0] = Some(c.op("Mul", &[&g, &d]));
            }
            if need_upd {
                let zg = gather(c, &zeros);
                let others = c.op("Sub", &[&zg, &zuf]);
                let none = c.op("Equal", &[&others, &zero]);
                let pg = gather(c, &p1);
                let q = c.op("Div", &[&pg, &u1]);
                let d = c.op("Where", &[&none, &q, &zero]);
                let gg = gather(c, &g);
                out[2] = Some(c.op("Mul", &[&gg, &d]));
            }
        }
        r => return Err(c.err(format!("reduction '{r}' is not one the spec defines"))),
    }
    Ok(out)
}

pub fn scatter_nd(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    scatter(c, g, need, false)
}
pub fn scatter_elements(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    scatter(c, g, need, true)
}

/// TopK (values): the gradient scattered back to the selected positions (distinct per row).
pub fn top_k(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let x = c.input(0).to_string();
    let idx = c.output(1).to_string();
    if idx.is_empty() {
        return Err(c.err("its indices output is needed for the gradient"));
    }
    let axis = c.attr_i("axis", -1);
    let z = c.zeros_like(&x);
    let mut out = vec![Some(c.op_a(
        "ScatterElements",
        &[&z, &idx, &g],
        vec![attr_int("axis", axis)],
    ))];
    out.resize(need.len(), None);
    Ok(out)
}

/// GatherND (`batch_dims=0`): scatter-add the gradient slices back at their indices.
pub fn gather_nd(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = scatter_add_upstream(c, g, need)? else {
        return Ok(vec![None, None]);
    };
    let x = c.input(0).to_string();
    let i = c.input(1).to_string();
    let b = c.attr_i("batch_dims", 0).max(0) as usize;
    let k = match c.shape(&i)?.last().and_then(|d| d.known()) {
        Some(k) => k,
        None => return Err(c.err("the last dim of its indices must be known")),
    };
    let (r, ri) = (c.rank(&x)?, c.rank(&i)?);
    if b >= ri || b + k as usize > r {
        return Err(c.err(format!(
            "batch_dims {b} with data of rank {r} and indices of rank {ri} (tuples of {k}); the spec wants batch_dims < both ranks"
        )));
    }
    // Negative indices count from the end of their dim.
    let i = if c.dtype(&i) != dtype::INT64 {
        c.cast(&i, dtype::INT64)
    } else {
        i
    };
    let s = c.shape_of(&x);
    let slice = |c: &mut Ctx, t: &str, from: i64, to: i64| {
        let (f, e) = (c.ints(&[from]), c.ints(&[to]));
        c.op("Slice", &[t, &f, &e])
    };
    let dims = slice(c, &s, b as i64, b as i64 + k);
    let zero = c.b.scalar_i64(0);
    let neg = c.op("Less", &[&i, &zero]);
    let wrapped = c.op("Add", &[&i, &dims]);
    let idx = c.op("Where", &[&neg, &wrapped, &i]);
    let add = attr_string("reduction", "add");
    if b == 0 {
        let zeros = c.zeros_like(&x);
        return Ok(vec![Some(c.op_a("ScatterND", &[&zeros, &idx, &g], vec![add])), None]);
    }
    // batch_dims b: the batch dims flattened into one of P = B1 ... Bb, and each index tuple
    // led by its batch position p, so that the gather is a plain GatherND of [P, rest] whose
    // gradient is a scatter: data [P, D...], indices [P, I..., 1 + k], g [P, I..., rest].
    let minus1 = c.ints(&[-1]);
    let big = i64::MAX;
    let flat = |c: &mut Ctx, t: &str| {
        let st = c.shape_of(t);
        let rest = slice(c, &st, b as i64, big);
        let target = c.op_a("Concat", &[&minus1, &rest], vec![attr_int("axis", 0)]);
        c.op("Reshape", &[t, &target])
    };
    let x2 = flat(c, &x);
    let i2 = flat(c, &idx);
    let g2 = flat(c, &g);
    // p for each tuple: Range(P) as [P, 1, ..., 1] expanded to i2's shape with the last dim 1.
    let p = c.dim_of(&x2, 0);
    let one = c.b.scalar_i64(1);
    let range = c.op("Range", &[&zero, &p, &one]);
    let ones: Vec<i64> = std::iter::once(-1).chain(std::iter::repeat_n(1, ri - b)).collect();
    let ones = c.ints(&ones);
    let col = c.op("Reshape", &[&range, &ones]);
    let si = c.shape_of(&i2);
    let lead = slice(c, &si, 0, (ri - b) as i64);
    let last = c.ints(&[1]);
    let to = c.op_a("Concat", &[&lead, &last], vec![attr_int("axis", 0)]);
    let col = c.op("Expand", &[&col, &to]);
    let full = c.op_a("Concat", &[&col, &i2], vec![attr_int("axis", -1)]);
    let zeros = c.zeros_like_dynamic(&x2);
    let sc = c.op_a("ScatterND", &[&zeros, &full, &g2], vec![add]);
    Ok(vec![Some(c.op("Reshape", &[&sc, &s])), None])
}

/// Finite-difference cases of this module's ops (see `crate::cases`).
pub fn cases() -> Vec<crate::cases::Case> {
    use crate::cases::*;
    use dagr_onnx::builder::{attr_int, attr_ints, attr_string};
    use Gen::{Distinct, Positive, ZerosAt};
    vec![
        // A repeated index: its gradients add up.
        case(
            "gather_nd",
            "GatherND",
            vec![x(&[3, 4, 2]), In::Ints(vec![3, 2], vec![0, 1, 2, 3, 0, 1])],
        ),
        // Negative indices count from the end (tract 0.23 panics on them in the forward pass).
        case(
            "gather_nd_negative",
            "GatherND",
            vec![x(&[3, 4, 2]), In::Ints(vec![2, 2], vec![-1, 1, 2, -4])],
        )
        .only(ORT_ONLY),
        // batch_dims 1: per batch row its own (repeated) tuples; batch_dims 2 with whole slices.
        case(
            "gather_nd_batch_dims",
            "GatherND",
            vec![x(&[2, 3, 4]), In::Ints(vec![2, 3, 1], vec![0, 2, 0, 1, 1, 2])],
        )
        .attrs(vec![attr_int("batch_dims", 1)]),
        case(
            "gather_nd_batch_dims_2",
            "GatherND",
            vec![
                x(&[2, 3, 4, 2]),
                In::Ints(vec![2, 3, 2, 1], vec![0, 3, 1, 1, 2, 0, 3, 3, 0, 1, 2, 2]),
            ],
        )
        .attrs(vec![attr_int("batch_dims", 2)]),
        case("flatten", "Flatten", vec![x(&[2, 3, 4])]).attrs(vec![attr_int("axis", 2)]),
        case("reshape", "Reshape", vec![x(&[2, 3, 4]), ints(&[6, -1])]),
        case("squeeze", "Squeeze", vec![x(&[2, 1, 3]), ints(&[1])]),
        case("unsqueeze", "Unsqueeze", vec![x(&[2, 3]), ints(&[0, 3])]),
        case("transpose", "Transpose", vec![x(&[2, 3, 4])]).attrs(vec![attr_ints("perm", &[2, 0, 1])]),
        case("concat", "Concat", vec![x(&[2, 3]), x(&[2, 5])]).attrs(vec![attr_int("axis", 1)]),
        case("split_one_output_used", "Split", vec![x(&[2, 6]), ints(&[2, 4])])
            .attrs(vec![attr_int("axis", 1)])
            .outputs(2),
        case(
            "slice",
            "Slice",
            vec![x(&[4, 6]), ints(&[1, -4]), ints(&[3, 100]), ints(&[0, 1])],
        ),
        case(
            "gather_rows_negative",
            "Gather",
            vec![x(&[5, 3]), In::Ints(vec![2, 2], vec![0, 2, 4, -1])],
        ),
        case("gather_axis1_repeated", "Gather", vec![x(&[2, 5, 3]), ints(&[1, 3, 1])]).attrs(vec![attr_int("axis", 1)]),
        case(
            "gather_elements",
            "GatherElements",
            vec![x(&[3, 4]), In::Ints(vec![3, 2], vec![0, 3, 1, 1, 2, 0])],
        )
        .attrs(vec![attr_int("axis", 1)]),
        case("expand", "Expand", vec![x(&[3, 1]), ints(&[2, 3, 4])]),
        case("reduce_sum", "ReduceSum", vec![x(&[2, 3, 4]), ints(&[1])]).attrs(vec![attr_int("keepdims", 0)]),
        case("reduce_mean", "ReduceMean", vec![x(&[2, 3, 4])]).attrs(vec![attr_ints("axes", &[0, 2])]),
        case("reduce_mean_all_18", "ReduceMean", vec![x(&[2, 3, 4])])
            .attrs(vec![attr_int("keepdims", 0)])
            .opset(18),
        case("reduce_sum_square", "ReduceSumSquare", vec![x(&[2, 3, 4])]).attrs(vec![attr_ints("axes", &[1])]),
        case("reduce_l1", "ReduceL1", vec![x(&[2, 3, 4])])
            .attrs(vec![attr_ints("axes", &[2]), attr_int("keepdims", 0)]),
        case("reduce_l2_18", "ReduceL2", vec![x(&[2, 3, 4]), ints(&[0, 2])]).opset(18),
        case("reduce_log_sum", "ReduceLogSum", vec![x(&[2, 3, 4])])
            .attrs(vec![attr_ints("axes", &[1])])
            .gen(Positive),
        case("reduce_log_sum_exp", "ReduceLogSumExp", vec![x(&[2, 3, 4])]).attrs(vec![attr_int("keepdims", 0)]),
        case("reduce_max", "ReduceMax", vec![x(&[2, 3, 4])])
            .attrs(vec![attr_ints("axes", &[1])])
            .gen(Distinct),
        case("reduce_min_all", "ReduceMin", vec![x(&[2, 3, 4])])
            .attrs(vec![attr_int("keepdims", 0)])
            .gen(Distinct),
        case("reduce_prod", "ReduceProd", vec![x(&[2, 3, 4])]).attrs(vec![attr_ints("axes", &[2])]),
        // Rows of four along axis 2 with one zero (indices 1, 15), two zeros (4, 6) and none.
        case("reduce_prod_zeros", "ReduceProd", vec![x(&[2, 3, 4]), ints(&[2])])
            .opset(18)
            .gen(ZerosAt(&[1, 4, 6, 15])),
        case("reduce_prod_zeros_all", "ReduceProd", vec![x(&[2, 3])])
            .attrs(vec![attr_int("keepdims", 0)])
            .gen(ZerosAt(&[2])),
        case("global_max_pool", "GlobalMaxPool", vec![x(&[2, 3, 4, 5])]).gen(Distinct),
        case("tile", "Tile", vec![x(&[2, 3]), ints(&[2, 3])]),
        case("depth_to_space_dcr", "DepthToSpace", vec![x(&[2, 8, 3, 2])]).attrs(vec![attr_int("blocksize", 2)]),
        case("depth_to_space_crd", "DepthToSpace", vec![x(&[2, 8, 3, 2])])
            .attrs(vec![attr_int("blocksize", 2), attr_string("mode", "CRD")]),
        case("space_to_depth", "SpaceToDepth", vec![x(&[2, 2, 4, 6])]).attrs(vec![attr_int("blocksize", 2)]),
        // tract 0.23 has no ReverseSequence.
        case(
            "reverse_sequence_time_major",
            "ReverseSequence",
            vec![x(&[4, 3, 2]), ints(&[4, 2, 1])],
        )
        .only(ORT_ONLY),
        case(
            "reverse_sequence_batch_major",
            "ReverseSequence",
            vec![x(&[3, 4, 2]), ints(&[1, 3, 4])],
        )
        .attrs(vec![attr_int("batch_axis", 0), attr_int("time_axis", 1)])
        .only(ORT_ONLY),
        // tract 0.23 cannot type Compress.
        case(
            "compress_axis",
            "Compress",
            vec![x(&[3, 4]), In::B(vec![4], vec![true, false, true, true])],
        )
        .attrs(vec![attr_int("axis", -1)])
        .only(ORT_ONLY),
        case(
            "compress_flat",
            "Compress",
            vec![x(&[2, 3]), In::B(vec![5], vec![true, false, false, true, true])],
        )
        .only(ORT_ONLY),
        case("trilu_lower_k", "Trilu", vec![x(&[2, 3, 4]), In::Ints(vec![], vec![1])])
            .attrs(vec![attr_int("upper", 0)]),
        case(
            "scatter_nd",
            "ScatterND",
            vec![x(&[4, 3]), In::Ints(vec![2, 1], vec![2, 0]), x(&[2, 3])],
        ),
        case(
            "scatter_nd_add",
            "ScatterND",
            vec![x(&[4, 3]), In::Ints(vec![2, 1], vec![2, 2]), x(&[2, 3])],
        )
        .attrs(vec![attr_string("reduction", "add")])
        .only(ORT_ONLY),
        case(
            "scatter_elements",
            "ScatterElements",
            vec![x(&[3, 4]), In::Ints(vec![3, 2], vec![0, 3, 1, 2, 2, 0]), x(&[3, 2])],
        )
        .attrs(vec![attr_int("axis", 1)]),
        // Reductions max, min and mul (opset 18): repeated indices; distinct values (no ties),
        // and zeros for mul (one at a position, two at another).
        case(
            "scatter_elements_max",
            "ScatterElements",
            vec![x(&[3, 4]), In::Ints(vec![3, 2], vec![0, 0, 1, 2, 3, 3]), x(&[3, 2])],
        )
        .attrs(vec![attr_int("axis", 1), attr_string("reduction", "max")])
        .opset(18)
        .gen(Distinct),
        case(
            "scatter_nd_min",
            "ScatterND",
            vec![x(&[4, 3]), In::Ints(vec![3, 1], vec![2, 0, 2]), x(&[3, 3])],
        )
        .attrs(vec![attr_string("reduction", "min")])
        .opset(18)
        .gen(Distinct),
        case(
            "scatter_elements_mul",
            "ScatterElements",
            vec![x(&[2, 4]), In::Ints(vec![2, 3], vec![1, 1, 3, 0, 2, 2]), x(&[2, 3])],
        )
        .attrs(vec![attr_int("axis", 1), attr_string("reduction", "mul")])
        .opset(18)
        .gen(ZerosAt(&[1, 3, 4])),
        case("top_k", "TopK", vec![x(&[3, 5]), ints(&[2])])
            .outputs(2)
            .gen(Distinct),
    ]
}
