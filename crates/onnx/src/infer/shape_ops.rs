//! Operators that move, select or compute shapes: their output shapes, and the values of the
//! shape tensors they build.

use super::{axis, broadcast, Node, Rule};
use crate::attr::attr;
use crate::dim::{self, Dim};
use crate::dtype;
use crate::index::ValueFact;

pub(super) const RULES: &[(&[&str], Rule)] = &[
    (&["EyeLike"], eye_like),
    (&["Shape"], shape),
    (&["Size"], size),
    (&["Constant"], constant),
    (&["ConstantOfShape"], constant_of_shape),
    (&["Reshape"], reshape),
    (&["Flatten"], flatten),
    (&["Transpose"], transpose),
    (&["Concat"], concat),
    (&["Squeeze"], squeeze),
    (&["Unsqueeze"], unsqueeze),
    (&["Slice"], slice),
    (&["Split"], split),
    (&["Gather"], gather),
    (&["GatherElements"], gather_elements),
    (&["GatherND"], gather_nd),
    (&["Expand"], expand),
    (&["Tile"], tile),
    (&["Pad"], pad),
    (&["Range"], range),
    (
        &[
            "ReduceSum",
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceSumSquare",
        ],
        reduce,
    ),
    (&["ArgMax", "ArgMin"], arg_reduce),
    (&["TopK"], top_k),
    (&["OneHot"], one_hot),
    (&["NonZero"], non_zero),
    (&["DepthToSpace", "SpaceToDepth"], depth_space),
    (&["SplitToSequence"], split_to_sequence),
    (&["SequenceConstruct"], sequence_construct),
    (&["SequenceAt"], sequence_at),
    (&["SequenceLength"], sequence_length),
    (&["ConcatFromSequence"], concat_from_sequence),
];

fn shape(c: &mut Node) -> Option<()> {
    let s = c.shape(0);
    let r = s.as_ref().map(Vec::len);
    // Opset 15: `start` and `end` select a range of the dims.
    let range = r.map(|r| {
        let clamp = |v: i64| (if v < 0 { v + r as i64 } else { v }).clamp(0, r as i64) as usize;
        let (a, b) = (clamp(c.attr_i("start", 0)), clamp(c.attr_i("end", r as i64)));
        (a, b.max(a))
    });
    c.set(0, dtype::INT64, range.map(|(a, b)| vec![Dim::Known((b - a) as i64)]));
    let (s, (a, b)) = (s?, range?);
    c.set_value(0, s[a..b].to_vec());
    Some(())
}

fn size(c: &mut Node) -> Option<()> {
    c.set(0, dtype::INT64, Some(vec![]));
    let s = c.shape(0)?;
    c.set_value(0, vec![dim::product(&s)]);
    Some(())
}

fn constant(c: &mut Node) -> Option<()> {
    let n = c.n;
    let (dt, shape) = match attr(n, "value").and_then(|a| a.t.as_ref()) {
        Some(t) => (t.data_type, t.dims.iter().map(|&d| Dim::Known(d)).collect()),
        None => {
            let a = n.attribute.first()?;
            match a.name.as_str() {
                "value_float" => (dtype::FLOAT, vec![]),
                "value_int" => (dtype::INT64, vec![]),
                "value_floats" => (dtype::FLOAT, vec![Dim::Known(a.floats.len() as i64)]),
                "value_ints" => (dtype::INT64, vec![Dim::Known(a.ints.len() as i64)]),
                _ => return None,
            }
        }
    };
    c.set(0, dt, Some(shape));
    Some(())
}

fn constant_of_shape(c: &mut Node) -> Option<()> {
    let t = attr(c.n, "value").and_then(|a| a.t.as_ref());
    let dt = t.map(|t| t.data_type).unwrap_or(dtype::FLOAT);
    let shape = c.value(0);
    c.set(0, dt, shape.clone());
    // A small integer filler (ones or zeros for Expand and Reshape targets) has a value.
    if matches!(dt, dtype::INT64 | dtype::INT32) {
        let n = dim::product(&shape?).known()?;
        let fill = match t {
            Some(t) if !t.int64_data.is_empty() => t.int64_data[0],
            Some(t) if !t.int32_data.is_empty() => t.int32_data[0] as i64,
            Some(t) if t.raw_data.len() >= 8 && dt == dtype::INT64 => {
                i64::from_le_bytes(t.raw_data[..8].try_into().ok()?)
            }
            Some(t) if t.raw_data.len() >= 4 => i32::from_le_bytes(t.raw_data[..4].try_into().ok()?) as i64,
            _ => 0,
        };
        if (0..=super::MAX_VALUE_LEN as i64).contains(&n) {
            c.set_value(0, vec![Dim::Known(fill); n as usize]);
        }
    }
    Some(())
}

/// Values pass through ops that only change the shape.
fn pass_value(c: &mut Node) {
    if let Some(v) = c.value(0) {
        c.set_value(0, v);
    }
}

fn reshape(c: &mut Node) -> Option<()> {
    pass_value(c);
    let dt = c.dtype(0);
    let target = c.value(1);
    let Some(target) = target else {
        // The rank is still known from the target's length.
        let len = c.shape(1).and_then(|s| s.first()?.known());
        c.set(0, dt, len.map(|l| vec![Dim::Unknown; l.max(0) as usize]));
        return None;
    };
    let src = c.shape(0);
    let allow_zero = c.attr_i("allowzero", 0) == 1;
    let mut out: Vec<Dim> = target
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            Dim::Known(0) if !allow_zero => src.as_ref().and_then(|s| s.get(i).cloned()).unwrap_or(Dim::Unknown),
            Dim::Known(-1) => Dim::Unknown,
            d => d.clone(),
        })
        .collect();
    if let Some(pos) = target.iter().position(|t| *t == Dim::Known(-1)) {
        let rest = dim::product(out.iter().enumerate().filter(|(i, _)| *i != pos).map(|(_, d)| d));
        out[pos] = match &src {
            Some(s) => dim::product(s).div(&rest),
            None => Dim::Unknown,
        };
    }
    c.set(0, dt, Some(out));
    Some(())
}

fn flatten(c: &mut Node) -> Option<()> {
    pass_value(c);
    let s = c.shape(0)?;
    let a = c.attr_i("axis", 1);
    let a = if a < 0 { a + s.len() as i64 } else { a }.clamp(0, s.len() as i64) as usize;
    c.set(0, c.dtype(0), Some(vec![dim::product(&s[..a]), dim::product(&s[a..])]));
    Some(())
}

fn transpose(c: &mut Node) -> Option<()> {
    let s = c.shape(0)?;
    let perm = c
        .attr_ints("perm")
        .unwrap_or_else(|| (0..s.len() as i64).rev().collect());
    let out: Option<Vec<Dim>> = perm
        .iter()
        .map(|&p| usize::try_from(p).ok().and_then(|p| s.get(p).cloned()))
        .collect();
    c.set(0, c.dtype(0), out.clone());
    // The value of a transposed small tensor.
    let (v, dims) = (c.value(0)?, s.iter().map(Dim::known).collect::<Option<Vec<i64>>>()?);
    if dims.iter().product::<i64>() != v.len() as i64 || perm.len() != dims.len() {
        return None;
    }
    let str = strides(&dims);
    let out_dims: Vec<i64> = perm.iter().map(|&p| dims[p as usize]).collect();
    let mut idx = vec![0i64];
    for (k, &p) in perm.iter().enumerate() {
        let (n, st) = (out_dims[k], str[p as usize]);
        idx = idx
            .iter()
            .flat_map(|&base| (0..n).map(move |j| base + j * st))
            .collect();
    }
    c.set_value(0, idx.iter().map(|&i| v[i as usize].clone()).collect());
    Some(())
}

fn concat(c: &mut Node) -> Option<()> {
    let k = c.inputs();
    let dt = (0..k).map(|i| c.dtype(i)).find(|&d| d != 0).unwrap_or(0);
    let shapes: Option<Vec<Vec<Dim>>> = (0..k).filter(|&i| c.has(i)).map(|i| c.shape(i)).collect();
    let out = shapes.and_then(|sh| {
        let first = sh.first()?.clone();
        let a = axis(c.attr_i("axis", 0), first.len())?;
        if sh.iter().any(|s| s.len() != first.len()) {
            return None;
        }
        let mut out: Vec<Dim> = (0..first.len())
            .map(|i| {
                let ds: Vec<Vec<Dim>> = sh.iter().map(|s| vec![s[i].clone()]).collect();
                broadcast(&ds).pop().unwrap_or(Dim::Unknown)
            })
            .collect();
        out[a] = dim::sum(sh.iter().map(|s| &s[a]));
        Some(out)
    });
    c.set(0, dt, out);
    // Float constants joined (Resize scales).
    if dtype::is_float(dt) {
        let f: Option<Vec<Vec<f64>>> = (0..k).filter(|&i| c.has(i)).map(|i| c.floats(i)).collect();
        c.set_floats(0, f?.concat());
        return Some(());
    }
    let vals: Option<Vec<Vec<Dim>>> = (0..k).filter(|&i| c.has(i)).map(|i| c.value(i)).collect();
    c.set_value(0, vals?.concat());
    Some(())
}

fn squeeze(c: &mut Node) -> Option<()> {
    pass_value(c);
    let s = c.shape(0)?;
    let axes = c.ints_or_attr(1, "axes")?;
    let out: Vec<Dim> = match axes {
        Some(ax) => {
            let ax: Vec<usize> = ax.iter().map(|&a| axis(a, s.len())).collect::<Option<_>>()?;
            s.iter()
                .enumerate()
                .filter(|(i, _)| !ax.contains(i))
                .map(|(_, d)| d.clone())
                .collect()
        }
        None if s.iter().all(|d| d.known().is_some()) => s.into_iter().filter(|d| *d != Dim::Known(1)).collect(),
        None => return None,
    };
    c.set(0, c.dtype(0), Some(out));
    Some(())
}

fn unsqueeze(c: &mut Node) -> Option<()> {
    pass_value(c);
    let s = c.shape(0)?;
    let ax = c.ints_or_attr(1, "axes")??;
    let r = s.len() + ax.len();
    let mut ax: Vec<usize> = ax.iter().map(|&a| axis(a, r)).collect::<Option<_>>()?;
    ax.sort();
    let mut out = s;
    for a in ax {
        out.insert(a.min(out.len()), Dim::Known(1));
    }
    c.set(0, c.dtype(0), Some(out));
    Some(())
}

/// The length of `x[start:end:step]` over a dim of size `d` (ONNX Slice's clamping), symbolic
/// where `d` is: an end at or beyond `i32::MAX` means "to the end", a negative start or end
/// counts from it.
pub fn slice_len(d: &Dim, start: &Dim, end: &Dim, step: i64) -> Dim {
    if let (Some(d), Some(s), Some(e)) = (d.known(), start.known(), end.known()) {
        let norm = |v: i64, lo: i64, hi: i64| (if v < 0 { v.saturating_add(d) } else { v }).clamp(lo, hi);
        let n = if step > 0 {
            let (s, e) = (norm(s, 0, d), norm(e, 0, d));
            (e - s + step - 1).div_euclid(step)
        } else {
            let (s, e) = (norm(s, 0, d - 1), norm(e, -1, d - 1));
            (s - e - step - 1).div_euclid(-step)
        };
        return Dim::Known(n.max(0));
    }
    let big = i32::MAX as i64;
    // A bound on a symbolic dim, assumed in range as exporters write them.
    let bound = |v: &Dim| match v.known() {
        Some(v) if v >= big => d.clone(),
        Some(v) if v <= -big => Dim::Known(0),
        Some(v) if v < 0 => d.add(&Dim::Known(v)),
        Some(v) => Dim::Known(v),
        None => v.clone(),
    };
    match step {
        1 => bound(end).sub(&bound(start)),
        -1 => {
            // Backwards from start (inclusive) to end (exclusive): start=-1, end=-big flips.
            let s = match start.known() {
                Some(v) if v >= big => d.sub(&Dim::Known(1)),
                _ => bound(start),
            };
            let e = match end.known() {
                Some(v) if v <= -big => Dim::Known(-1),
                _ => bound(end),
            };
            s.sub(&e)
        }
        s if s > 1 => bound(end)
            .sub(&bound(start))
            .add(&Dim::Known(s - 1))
            .div(&Dim::Known(s)),
        _ => Dim::Unknown,
    }
}

fn slice(c: &mut Node) -> Option<()> {
    let dt = c.dtype(0);
    let x = c.shape(0);
    // Opset 1-9 pass starts/ends/axes as attributes.
    type Bounds = (Vec<Dim>, Vec<Dim>, Option<Vec<i64>>, Option<Vec<i64>>);
    let (starts, ends, axes, steps): Bounds = if c.has(1) {
        (
            c.value(1)?,
            c.value(2)?,
            c.ints_or_attr(3, "axes")?,
            if c.has(4) { Some(c.ints(4)?) } else { None },
        )
    } else {
        let k = |n: &str| {
            c.attr_ints(n)
                .map(|v| v.into_iter().map(Dim::Known).collect::<Vec<_>>())
        };
        (k("starts")?, k("ends")?, c.attr_ints("axes"), None)
    };
    let n = starts.len();
    let axes = axes.unwrap_or_else(|| (0..n as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; n]);
    if ends.len() != n || axes.len() != n || steps.len() != n {
        return None;
    }
    // The value of a sliced small tensor (1-D shape tensors, exporters' 2-D pad tables).
    if let (Some(v), Some(x)) = (c.value(0), &x) {
        let dims: Option<Vec<i64>> = x.iter().map(Dim::known).collect();
        let st: Option<Vec<i64>> = starts.iter().map(Dim::known).collect();
        let en: Option<Vec<i64>> = ends.iter().map(Dim::known).collect();
        if let (Some(dims), Some(st), Some(en)) = (dims, st, en) {
            if let Some(picked) = slice_value(&v, &dims, &st, &en, &axes, &steps) {
                c.set_value(0, picked);
            }
        }
    }
    let mut out = x?;
    for k in 0..n {
        let a = axis(axes[k], out.len())?;
        out[a] = slice_len(&out[a], &starts[k], &ends[k], steps[k]);
    }
    c.set(0, dt, Some(out));
    Some(())
}

/// Row-major strides of a shape.
fn strides(dims: &[i64]) -> Vec<i64> {
    let mut s = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// The elements of `v` (shape `dims`) that a Slice selects, in order.
fn slice_value(v: &[Dim], dims: &[i64], st: &[i64], en: &[i64], axes: &[i64], steps: &[i64]) -> Option<Vec<Dim>> {
    if dims.iter().product::<i64>() != v.len() as i64 {
        return None;
    }
    // Per dim: the source indices it keeps.
    let mut keep: Vec<Vec<i64>> = dims.iter().map(|&d| (0..d).collect()).collect();
    for k in 0..st.len() {
        let a = axis(axes[k], dims.len())?;
        let (d, step) = (dims[a], steps[k]);
        let norm = |v: i64, lo: i64, hi: i64| (if v < 0 { v.saturating_add(d) } else { v }).clamp(lo, hi);
        keep[a] = if step > 0 {
            let (s, e) = (norm(st[k], 0, d), norm(en[k], 0, d));
            (s..e).step_by(step as usize).collect()
        } else if step < 0 {
            let (s, e) = (norm(st[k], 0, d - 1), norm(en[k], -1, d - 1));
            let mut out = Vec::new();
            let mut i = s;
            while i > e {
                out.push(i);
                i += step;
            }
            out
        } else {
            return None;
        };
    }
    let str = strides(dims);
    let mut out = vec![0i64];
    for (a, ks) in keep.iter().enumerate() {
        let st = str[a];
        out = out
            .iter()
            .flat_map(|&base| ks.iter().map(move |&k| base + k * st))
            .collect();
    }
    out.iter().map(|&i| v.get(usize::try_from(i).ok()?).cloned()).collect()
}

fn split(c: &mut Node) -> Option<()> {
    let dt = c.dtype(0);
    let x = c.shape(0)?;
    let a = axis(c.attr_i("axis", 0), x.len())?;
    let k = c.outputs();
    let sizes: Vec<Dim> = match c.ints_or_attr(1, "split")? {
        Some(sz) => sz.into_iter().map(Dim::Known).collect(),
        None => {
            // Equal parts (opset 18: `num_outputs`, the last one smaller).
            let d = &x[a];
            match d.known() {
                Some(v) => {
                    let part = (v + k as i64 - 1) / k as i64;
                    (0..k as i64)
                        .map(|i| Dim::Known(part.min(v - i * part).max(0)))
                        .collect()
                }
                None => vec![d.div(&Dim::Known(k as i64)); k],
            }
        }
    };
    if sizes.len() != k {
        return None;
    }
    for (o, s) in sizes.into_iter().enumerate() {
        let mut sh = x.clone();
        sh[a] = s;
        c.set(o, dt, Some(sh));
    }
    Some(())
}

fn gather(c: &mut Node) -> Option<()> {
    let dt = c.dtype(0);
    let (d, i) = (c.shape(0), c.shape(1));
    if let (Some(d), Some(i)) = (&d, &i) {
        if let Some(a) = axis(c.attr_i("axis", 0), d.len()) {
            let mut out = d[..a].to_vec();
            out.extend(i.iter().cloned());
            out.extend_from_slice(&d[a + 1..]);
            c.set(0, dt, Some(out));
        }
    }
    // Picking elements of a 1-D shape value.
    let (v, idx) = (c.value(0)?, c.ints(1)?);
    if d?.len() != 1 {
        return None;
    }
    let n = v.len() as i64;
    let picked: Option<Vec<Dim>> = idx
        .iter()
        .map(|&j| {
            let j = if j < 0 { j + n } else { j };
            usize::try_from(j).ok().and_then(|j| v.get(j).cloned())
        })
        .collect();
    c.set_value(0, picked?);
    Some(())
}

fn gather_elements(c: &mut Node) -> Option<()> {
    c.set(0, c.dtype(0), c.shape(1));
    Some(())
}

fn gather_nd(c: &mut Node) -> Option<()> {
    let (d, i) = (c.shape(0)?, c.shape(1)?);
    let b = c.attr_i("batch_dims", 0).max(0) as usize;
    let last = i.last()?.known()? as usize;
    if b + last > d.len() {
        return None;
    }
    let mut out = i[..i.len() - 1].to_vec();
    out.extend_from_slice(&d[b + last..]);
    c.set(0, c.dtype(0), Some(out));
    Some(())
}

fn expand(c: &mut Node) -> Option<()> {
    let dt = c.dtype(0);
    let target = c.value(1);
    let x = c.shape(0);
    match (&x, &target) {
        (Some(x), Some(t)) => c.set(0, dt, Some(broadcast(&[x.clone(), t.clone()]))),
        _ => {
            let len = c.shape(1).and_then(|s| s.first()?.known());
            let r = x.map(|x| x.len()).unwrap_or(0).max(len.unwrap_or(0) as usize);
            if len.is_some() {
                c.set(0, dt, Some(vec![Dim::Unknown; r]));
            }
        }
    }
    // A one-element value repeated.
    let (v, t) = (c.value(0)?, target?);
    if v.len() == 1 && t.len() == 1 {
        let n = t[0].known()?;
        if (0..=super::MAX_VALUE_LEN as i64).contains(&n) {
            c.set_value(0, vec![v[0].clone(); n as usize]);
        }
    }
    Some(())
}

fn tile(c: &mut Node) -> Option<()> {
    let x = c.shape(0)?;
    let reps = c.value(1)?;
    if reps.len() != x.len() {
        return None;
    }
    let out = x.iter().zip(&reps).map(|(d, r)| d.mul(r)).collect();
    c.set(0, c.dtype(0), Some(out));
    Some(())
}

fn pad(c: &mut Node) -> Option<()> {
    let x = c.shape(0)?;
    let r = x.len();
    let pads: Vec<Dim> = if c.has(1) {
        c.value(1)?
    } else {
        c.attr_ints("pads")?.into_iter().map(Dim::Known).collect()
    };
    // Opset 18: `axes` names the padded dims.
    let axes: Vec<usize> = match c.has(3) {
        true => c.ints(3)?.iter().map(|&a| axis(a, r)).collect::<Option<_>>()?,
        false => (0..r).collect(),
    };
    let k = axes.len();
    if pads.len() != 2 * k {
        return None;
    }
    let mut out = x;
    for (j, &a) in axes.iter().enumerate() {
        out[a] = out[a].add(&pads[j]).add(&pads[j + k]);
    }
    c.set(0, c.dtype(0), Some(out));
    Some(())
}

fn range(c: &mut Node) -> Option<()> {
    let dt = c.dtype(0);
    let (start, limit, delta) = (c.value(0), c.value(1), c.value(2));
    let len = match (&start, &limit, &delta) {
        (Some(s), Some(l), Some(d)) => {
            let (s, l, d) = (s.first()?, l.first()?, d.first()?);
            match (s.known(), l.known(), d.known()) {
                (Some(s), Some(l), Some(d)) if d != 0 => Dim::Known(((l - s) as f64 / d as f64).ceil().max(0.0) as i64),
                (_, _, Some(1)) => l.sub(s),
                _ => Dim::Unknown,
            }
        }
        _ => match (c.floats(0), c.floats(1), c.floats(2)) {
            (Some(s), Some(l), Some(d)) if d.first() != Some(&0.0) => {
                Dim::Known(((l.first()? - s.first()?) / d.first()?).ceil().max(0.0) as i64)
            }
            _ => Dim::Unknown,
        },
    };
    c.set(0, dt, Some(vec![len.clone()]));
    let (s, d, n) = (start?.first()?.known()?, delta?.first()?.known()?, len.known()?);
    if (0..=super::MAX_VALUE_LEN as i64).contains(&n) {
        c.set_value(0, (0..n).map(|i| Dim::Known(s + i * d)).collect());
    }
    Some(())
}

fn reduce(c: &mut Node) -> Option<()> {
    let dt = c.dtype(0);
    let s = c.shape(0)?;
    let keep = c.attr_i("keepdims", 1) == 1;
    let noop = c.attr_i("noop_with_empty_axes", 0) == 1;
    let ax: Vec<usize> = match c.ints_or_attr(1, "axes")? {
        Some(a) if !a.is_empty() => a.iter().map(|&a| axis(a, s.len())).collect::<Option<_>>()?,
        _ if noop => {
            c.set(0, dt, Some(s));
            return Some(());
        }
        _ => (0..s.len()).collect(),
    };
    let out: Vec<Dim> = s
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match ax.contains(&i) {
            true => keep.then_some(Dim::Known(1)),
            false => Some(d.clone()),
        })
        .collect();
    c.set(0, dt, Some(out));
    // ReduceProd / ReduceSum of a 1-D shape value: the number of elements, or their total.
    if s.len() == 1 && matches!(c.n.op_type.as_str(), "ReduceProd" | "ReduceSum") {
        let v = c.value(0)?;
        let r = if c.n.op_type == "ReduceProd" {
            dim::product(&v)
        } else {
            dim::sum(&v)
        };
        c.set_value(0, vec![r]);
    }
    Some(())
}

fn arg_reduce(c: &mut Node) -> Option<()> {
    let s = c.shape(0)?;
    let a = axis(c.attr_i("axis", 0), s.len())?;
    let keep = c.attr_i("keepdims", 1) == 1;
    let mut out = s;
    if keep {
        out[a] = Dim::Known(1);
    } else {
        out.remove(a);
    }
    c.set(0, dtype::INT64, Some(out));
    Some(())
}

fn top_k(c: &mut Node) -> Option<()> {
    let mut s = c.shape(0)?;
    let a = axis(c.attr_i("axis", -1), s.len())?;
    s[a] = match c.has(1) {
        true => c.value(1).and_then(|v| v.first().cloned()).unwrap_or(Dim::Unknown),
        false => Dim::Known(c.attr_i("k", 0)),
    };
    c.set(0, c.dtype(0), Some(s.clone()));
    c.set(1, dtype::INT64, Some(s));
    Some(())
}

fn one_hot(c: &mut Node) -> Option<()> {
    let mut s = c.shape(0)?;
    let depth = match c.value(1) {
        Some(v) => v.first()?.clone(),
        None => Dim::Known(*c.floats(1)?.first()? as i64),
    };
    let a = axis(c.attr_i("axis", -1), s.len() + 1)?;
    s.insert(a, depth);
    c.set(0, c.dtype(2), Some(s));
    Some(())
}

fn non_zero(c: &mut Node) -> Option<()> {
    let r = c.shape(0)?.len();
    c.set(0, dtype::INT64, Some(vec![Dim::Known(r as i64), Dim::Unknown]));
    Some(())
}

fn depth_space(c: &mut Node) -> Option<()> {
    let s = c.shape(0)?;
    let b = Dim::Known(c.attr_i("blocksize", 1));
    let bb = b.mul(&b);
    if s.len() != 4 {
        return None;
    }
    let out = if c.n.op_type == "DepthToSpace" {
        vec![s[0].clone(), s[1].div(&bb), s[2].mul(&b), s[3].mul(&b)]
    } else {
        vec![s[0].clone(), s[1].mul(&bb), s[2].div(&b), s[3].div(&b)]
    };
    c.set(0, c.dtype(0), Some(out));
    Some(())
}

fn split_to_sequence(c: &mut Node) -> Option<()> {
    let dt = c.dtype(0);
    let x = c.shape(0)?;
    let a = axis(c.attr_i("axis", 0), x.len())?;
    let keep = c.attr_i("keepdims", 1) == 1;
    let d = x[a].known()?;
    let sizes: Vec<i64> = match c.has(1) {
        false => vec![1; d.max(0) as usize],
        true => {
            let v = c.ints(1)?;
            match c.shape(1)?.len() {
                // A scalar: chunks of that size, the last one smaller.
                0 => {
                    let k = *v.first()?;
                    if k <= 0 {
                        return None;
                    }
                    (0..d).step_by(k as usize).map(|s| k.min(d - s)).collect()
                }
                _ => v,
            }
        }
    };
    let elems = sizes
        .iter()
        .map(|&s| {
            let mut sh = x.clone();
            if !c.has(1) && !keep {
                sh.remove(a);
            } else {
                sh[a] = Dim::Known(s);
            }
            ValueFact::new(dt, sh)
        })
        .collect();
    c.set_sequence(0, elems);
    Some(())
}

fn sequence_construct(c: &mut Node) -> Option<()> {
    let elems: Option<Vec<ValueFact>> = (0..c.inputs()).map(|i| c.fact(i).cloned()).collect();
    c.set_sequence(0, elems?);
    Some(())
}

fn sequence_at(c: &mut Node) -> Option<()> {
    let seq = c.sequence(0)?;
    let p = *c.ints(1)?.first()?;
    let n = seq.len() as i64;
    let p = if p < 0 { p + n } else { p };
    let f = seq.get(usize::try_from(p).ok()?)?.clone();
    c.set(0, f.dtype, f.shape);
    Some(())
}

fn sequence_length(c: &mut Node) -> Option<()> {
    c.set(0, dtype::INT64, Some(vec![]));
    let n = c.sequence(0)?.len();
    c.set_value(0, vec![Dim::Known(n as i64)]);
    Some(())
}

fn concat_from_sequence(c: &mut Node) -> Option<()> {
    let seq = c.sequence(0)?;
    let first = seq.first()?.clone();
    let s = first.shape.clone()?;
    let new_axis = c.attr_i("new_axis", 0) == 1;
    let r = s.len() + new_axis as usize;
    let a = axis(c.attr_i("axis", 0), r)?;
    let shapes: Vec<Vec<Dim>> = seq.iter().map(|f| f.shape.clone()).collect::<Option<_>>()?;
    let out = if new_axis {
        let mut o = s;
        o.insert(a, Dim::Known(seq.len() as i64));
        o
    } else {
        let mut o = s;
        o[a] = dim::sum(shapes.iter().map(|s| &s[a]));
        o
    };
    c.set(0, first.dtype, Some(out));
    Some(())
}

/// EyeLike: the input's 2-D shape, in `dtype` (else the input's type).
fn eye_like(c: &mut Node) -> Option<()> {
    let dt = match c.attr_i("dtype", 0) {
        0 => c.dtype(0),
        d => d as i32,
    };
    c.set(0, dt, c.shape(0));
    Some(())
}
