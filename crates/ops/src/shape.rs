//! Data-movement operators: reshapes, transposes, concatenation, slicing, gathering,
//! broadcasting and reductions.

use super::{g0_owned, Out};
use crate::ctx::{norm_axis, Ctx};
use crate::Kind::{Body, Broadcast, NoGradient, NoRule, Vjp};
use crate::{op, Op};
use dagr_onnx::builder::{attr_int, attr_ints, attr_string};
use dagr_onnx::error::Result;
use dagr_onnx::{dtype, Dim};

/// This family's operators, each one entry: name, the first schema version covered, shape
/// inference, gradient, formula.
pub(crate) static OPS: &[Op] = &[
    op("Flatten", 1, Some(shapes::flatten), Vjp(reshape), "dX = reshape(g, shape(X))"),
    op("Reshape", 1, Some(shapes::reshape), Vjp(reshape), "dX = reshape(g, shape(X))"),
    op("Squeeze", 1, Some(shapes::squeeze), Vjp(reshape), "dX = reshape(g, shape(X))"),
    op("Unsqueeze", 1, Some(shapes::unsqueeze), Vjp(reshape), "dX = reshape(g, shape(X))"),
    op("Transpose", 1, Some(shapes::transpose), Vjp(transpose), "dX = transpose(g, inverse perm)"),
    op("Concat", 4, Some(shapes::concat), Vjp(concat), "dX_i = slice of g"),
    op("Split", 1, Some(shapes::split), Vjp(split), "dX = concat(g_i, zeros for missing g_i)"),
    op("Slice", 10, Some(shapes::slice), Vjp(slice), "dX = pad(g), a strided axis's gradient spread by its step"),
    op("Gather", 1, Some(shapes::gather), Vjp(gather), "dX = scatter_nd_add(zeros, indices, g)"),
    op("GatherND", 11, Some(shapes::gather_nd), Vjp(gather_nd), "dX = scatter_nd_add(zeros, indices, g); batch_dims: over the batch flattened, its position leading each tuple"),
    op("GatherElements", 11, Some(shapes::gather_elements), Vjp(gather_elements), "dX = scatter_elements_add(zeros, indices, g)"),
    op("Expand", 8, Some(shapes::expand), Broadcast(expand), "dX = unb(g)"),
    op("ReduceSum", 1, Some(shapes::reduce), Vjp(reduce_sum), "dX = expand(g)"),
    op("ReduceMean", 1, Some(shapes::reduce), Vjp(reduce_mean), "dX = expand(g) / n"),
    op("ReduceSumSquare", 1, Some(shapes::reduce), Vjp(reduce_sum_square), "dX = expand(g) 2X"),
    op("ReduceL1", 1, Some(shapes::reduce), Vjp(reduce_l1), "dX = expand(g) sign(X)"),
    op("ReduceL2", 1, Some(shapes::reduce), Vjp(reduce_l2), "dX = expand(g) X / Y"),
    op("ReduceLogSum", 1, Some(shapes::reduce), Vjp(reduce_log_sum), "dX = expand(g) / exp(Y)"),
    op("ReduceLogSumExp", 1, Some(shapes::reduce), Vjp(reduce_log_sum_exp), "dX = expand(g) exp(X - Y)"),
    op("ReduceMax", 1, Some(shapes::reduce), Vjp(reduce_extremum), "dX = expand(g) [X = Y] / count(X = Y)"),
    op("ReduceMin", 1, Some(shapes::reduce), Vjp(reduce_extremum), "dX = expand(g) [X = Y] / count(X = Y)"),
    op("ReduceProd", 1, Some(shapes::reduce), Vjp(reduce_prod), "dX = expand(g) times the product of the others (zeros included)"),
    op("GlobalMaxPool", 1, Some(crate::nn::shapes::global_pool), Vjp(global_max_pool), "dX = expand(g) [X = Y] / count(X = Y)"),
    op("Tile", 6, Some(shapes::tile), Vjp(tile), "dX = sum over the repeats of g"),
    op("Trilu", 14, Some(crate::infer::same), Vjp(trilu), "dX = trilu(g)"),
    op("DepthToSpace", 1, Some(shapes::depth_space), Vjp(depth_to_space), "dX = SpaceToDepth(g) (DCR); CRD: its channels back from block-major to channel-major"),
    op("SpaceToDepth", 1, Some(shapes::depth_space), Vjp(space_to_depth), "dX = DepthToSpace(g, DCR)"),
    op("ReverseSequence", 10, Some(crate::infer::same), Vjp(reverse_sequence), "dX = ReverseSequence(g) (its own inverse)"),
    op("Compress", 9, Some(shapes::compress), Body(compress), "Gather(X or flat X, NonZero(condition)) along the axis"),
    op("ScatterND", 11, Some(crate::infer::same), Vjp(scatter_nd), "none/add: ddata = g (written positions zeroed for none), dupdates = gather_nd(g); max/min: g to the values equal to the output, ties sharing; mul: g times the product of the others"),
    op("ScatterElements", 11, Some(crate::infer::same), Vjp(scatter_elements), "as ScatterND, with gather_elements"),
    op("TopK", 1, Some(shapes::top_k), Vjp(top_k), "dX = scatter_elements(zeros, indices, g)"),
    op("Shape", 1, Some(shapes::shape), NoGradient, "no gradient"),
    op("Size", 1, Some(shapes::size), NoGradient, "no gradient"),
    op("Constant", 1, Some(shapes::constant), NoGradient, "no gradient"),
    op("ConstantOfShape", 9, Some(shapes::constant_of_shape), NoGradient, "no gradient"),
    op("EyeLike", 9, Some(shapes::eye_like), NoGradient, "no gradient"),
    op("Range", 11, Some(shapes::range), NoGradient, "no gradient"),
    op("ArgMax", 1, Some(shapes::arg_reduce), NoGradient, "no gradient"),
    op("ArgMin", 1, Some(shapes::arg_reduce), NoGradient, "no gradient"),
    op("NonZero", 9, Some(shapes::non_zero), NoGradient, "no gradient"),
    op("OneHot", 9, Some(shapes::one_hot), NoGradient, "no gradient"),
    op("ConcatFromSequence", 11, Some(shapes::concat_from_sequence), NoRule, "no gradient rule: differentiating through it is refused"),
    op("SequenceAt", 11, Some(shapes::sequence_at), NoRule, "no gradient rule: differentiating through it is refused"),
    op("SequenceConstruct", 11, Some(shapes::sequence_construct), NoRule, "no gradient rule: differentiating through it is refused"),
    op("SequenceLength", 11, Some(shapes::sequence_length), NoRule, "no gradient rule: differentiating through it is refused"),
    op("SplitToSequence", 11, Some(shapes::split_to_sequence), NoRule, "no gradient rule: differentiating through it is refused"),
];

/// Shape (and value) inference of this family's operators.
pub(crate) mod shapes {
    use crate::infer::axis;
    use crate::infer::broadcast;
    use crate::infer::Node;
    use dagr_onnx::attr::attr;
    use dagr_onnx::dim::{self, Dim};
    use dagr_onnx::dtype;
    use dagr_onnx::index::ValueFact;

    pub(crate) fn shape(c: &mut Node) -> Option<()> {
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

    pub(crate) fn size(c: &mut Node) -> Option<()> {
        c.set(0, dtype::INT64, Some(vec![]));
        let s = c.shape(0)?;
        c.set_value(0, vec![dim::product(&s)]);
        Some(())
    }

    pub(crate) fn constant(c: &mut Node) -> Option<()> {
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

    pub(crate) fn constant_of_shape(c: &mut Node) -> Option<()> {
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
            if (0..=crate::infer::MAX_VALUE_LEN as i64).contains(&n) {
                c.set_value(0, vec![Dim::Known(fill); n as usize]);
            }
        }
        Some(())
    }

    /// Values pass through ops that only change the shape.
    pub(crate) fn pass_value(c: &mut Node) {
        if let Some(v) = c.value(0) {
            c.set_value(0, v);
        }
    }

    pub(crate) fn reshape(c: &mut Node) -> Option<()> {
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

    pub(crate) fn flatten(c: &mut Node) -> Option<()> {
        pass_value(c);
        let s = c.shape(0)?;
        let a = c.attr_i("axis", 1);
        let a = if a < 0 { a + s.len() as i64 } else { a }.clamp(0, s.len() as i64) as usize;
        c.set(0, c.dtype(0), Some(vec![dim::product(&s[..a]), dim::product(&s[a..])]));
        Some(())
    }

    pub(crate) fn transpose(c: &mut Node) -> Option<()> {
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

    pub(crate) fn concat(c: &mut Node) -> Option<()> {
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

    pub(crate) fn squeeze(c: &mut Node) -> Option<()> {
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

    pub(crate) fn unsqueeze(c: &mut Node) -> Option<()> {
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

    pub(crate) fn slice(c: &mut Node) -> Option<()> {
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
    pub(crate) fn strides(dims: &[i64]) -> Vec<i64> {
        let mut s = vec![1i64; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * dims[i + 1];
        }
        s
    }

    /// The elements of `v` (shape `dims`) that a Slice selects, in order.
    pub(crate) fn slice_value(
        v: &[Dim],
        dims: &[i64],
        st: &[i64],
        en: &[i64],
        axes: &[i64],
        steps: &[i64],
    ) -> Option<Vec<Dim>> {
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

    pub(crate) fn split(c: &mut Node) -> Option<()> {
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

    pub(crate) fn gather(c: &mut Node) -> Option<()> {
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

    pub(crate) fn gather_elements(c: &mut Node) -> Option<()> {
        c.set(0, c.dtype(0), c.shape(1));
        Some(())
    }

    pub(crate) fn gather_nd(c: &mut Node) -> Option<()> {
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

    pub(crate) fn expand(c: &mut Node) -> Option<()> {
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
            if (0..=crate::infer::MAX_VALUE_LEN as i64).contains(&n) {
                c.set_value(0, vec![v[0].clone(); n as usize]);
            }
        }
        Some(())
    }

    pub(crate) fn tile(c: &mut Node) -> Option<()> {
        let x = c.shape(0)?;
        let reps = c.value(1)?;
        if reps.len() != x.len() {
            return None;
        }
        let out = x.iter().zip(&reps).map(|(d, r)| d.mul(r)).collect();
        c.set(0, c.dtype(0), Some(out));
        Some(())
    }

    pub(crate) fn range(c: &mut Node) -> Option<()> {
        let dt = c.dtype(0);
        let (start, limit, delta) = (c.value(0), c.value(1), c.value(2));
        let len = match (&start, &limit, &delta) {
            (Some(s), Some(l), Some(d)) => {
                let (s, l, d) = (s.first()?, l.first()?, d.first()?);
                match (s.known(), l.known(), d.known()) {
                    (Some(s), Some(l), Some(d)) if d != 0 => {
                        Dim::Known(((l - s) as f64 / d as f64).ceil().max(0.0) as i64)
                    }
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
        if (0..=crate::infer::MAX_VALUE_LEN as i64).contains(&n) {
            c.set_value(0, (0..n).map(|i| Dim::Known(s + i * d)).collect());
        }
        Some(())
    }

    pub(crate) fn reduce(c: &mut Node) -> Option<()> {
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

    pub(crate) fn arg_reduce(c: &mut Node) -> Option<()> {
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

    pub(crate) fn top_k(c: &mut Node) -> Option<()> {
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

    pub(crate) fn one_hot(c: &mut Node) -> Option<()> {
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

    pub(crate) fn non_zero(c: &mut Node) -> Option<()> {
        let r = c.shape(0)?.len();
        c.set(0, dtype::INT64, Some(vec![Dim::Known(r as i64), Dim::Unknown]));
        Some(())
    }

    pub(crate) fn depth_space(c: &mut Node) -> Option<()> {
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

    pub(crate) fn split_to_sequence(c: &mut Node) -> Option<()> {
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

    pub(crate) fn sequence_construct(c: &mut Node) -> Option<()> {
        let elems: Option<Vec<ValueFact>> = (0..c.inputs()).map(|i| c.fact(i).cloned()).collect();
        c.set_sequence(0, elems?);
        Some(())
    }

    pub(crate) fn sequence_at(c: &mut Node) -> Option<()> {
        let seq = c.sequence(0)?;
        let p = *c.ints(1)?.first()?;
        let n = seq.len() as i64;
        let p = if p < 0 { p + n } else { p };
        let f = seq.get(usize::try_from(p).ok()?)?.clone();
        c.set(0, f.dtype, f.shape);
        Some(())
    }

    pub(crate) fn sequence_length(c: &mut Node) -> Option<()> {
        c.set(0, dtype::INT64, Some(vec![]));
        let n = c.sequence(0)?.len();
        c.set_value(0, vec![Dim::Known(n as i64)]);
        Some(())
    }

    pub(crate) fn concat_from_sequence(c: &mut Node) -> Option<()> {
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
    pub(crate) fn eye_like(c: &mut Node) -> Option<()> {
        let dt = match c.attr_i("dtype", 0) {
            0 => c.dtype(0),
            d => d as i32,
        };
        c.set(0, dt, c.shape(0));
        Some(())
    }

    /// Compress: the selected length is only known at run time.
    pub(crate) fn compress(c: &mut Node) -> Option<()> {
        let s = c.shape(0)?;
        // A condition known when the graph is built (a constant) selects a known count: its true
        // elements (the spec lets it be shorter than the axis, not longer).
        let selected = c
            .ints(1)
            .map(|v| Dim::Known(v.iter().filter(|&&b| b != 0).count() as i64))
            .unwrap_or(Dim::Unknown);
        let shape = match dagr_onnx::attr::attr_i(c.n, "axis") {
            Some(a) => {
                let a = axis(a, s.len())?;
                let mut s = s;
                s[a] = selected;
                s
            }
            None => vec![selected],
        };
        c.set(0, c.dtype(0), Some(shape));
        Some(())
    }
}

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
    let mut start = c.ints(&[0]);
    for (i, &need_i) in need.iter().enumerate() {
        let x = c.input(i).to_string();
        let len = c.dim_vec_of(&x, axis as usize);
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

/// Slice with constant bounds: the gradient put back where the slice took it, zeros elsewhere.
/// The axes of step 1 with one Pad; an axis of another step (Swin's patch merging takes
/// `x[:, 0::2, 1::2]`, a flip steps by -1) with `place_strided`.
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
    let steps = if c.has_input(4) {
        c.const_input(4).ok_or_else(|| c.err("its steps must be constant"))?
    } else {
        vec![1; starts.len()]
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(c.err("its starts, ends, axes and steps differ in length"));
    }
    if steps.contains(&0) {
        return Err(c.err("a step is 0, which ONNX does not allow"));
    }
    let mut pads = vec![0i64; 2 * r];
    let mut dynamic: Vec<(usize, i64, i64)> = Vec::new();
    let mut strided: Vec<(usize, (i64, i64, i64))> = Vec::new();
    for (((&s, &e), &a), &k) in starts.iter().zip(&ends).zip(&axes).zip(&steps) {
        let a = norm_axis(a, r);
        if k != 1 {
            strided.push((a, (s, e, k)));
            continue;
        }
        let d = match &xs[a] {
            Dim::Known(v) => *v,
            // The whole of a symbolic dim (`x[0:]`, dynamo's slices over the batch): no pads,
            // whatever its size (a start at or before minus it, an end at or past it).
            _ if (s == 0 || s <= -(i32::MAX as i64)) && e >= i32::MAX as i64 => continue,
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
    // No pads (every step-1 axis taken whole): the gradient as it is.
    let mut t = if dynamic.is_empty() && pads.iter().all(|&p| p == 0) {
        g
    } else {
        let p = if dynamic.is_empty() {
            c.ints(&pads)
        } else {
            // A symbolic dim d: the start and end clamped into [0, d] at run time.
            let mut parts: Vec<String> = pads.iter().map(|&v| c.ints(&[v])).collect();
            for (a, s, e) in dynamic {
                let d = c.dim_vec_of(&x, a);
                let (s, e) = (clamp_at_run_time(c, s, &d, 0), clamp_at_run_time(c, e, &d, 0));
                let e = c.op("Max", &[&e, &s]);
                parts[a] = s;
                parts[a + r] = c.op("Sub", &[&d, &e]);
            }
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            c.op_a("Concat", &refs, vec![attr_int("axis", 0)])
        };
        c.op_a("Pad", &[&g, &p], vec![attr_string("mode", "constant")])
    };
    for (a, bounds) in strided {
        t = place_strided(c, &t, &x, (a, r), bounds, &xs[a]);
    }
    let mut v = vec![Some(t)];
    v.resize(need.len(), None);
    Ok(v)
}

/// A Slice bound `v` over a dim `d` known at run time: counted from the end where negative,
/// clamped into `[0, d - less]`.
fn clamp_at_run_time(c: &mut Ctx, v: i64, d: &str, less: i64) -> String {
    let v = v.clamp(-(i64::MAX / 2), i64::MAX / 2);
    let k = c.ints(&[v]);
    let v = if v < 0 { c.op("Add", &[&k, d]) } else { k };
    let zero = c.ints(&[0]);
    let v = c.op("Max", &[&v, &zero]);
    let hi = if less == 0 {
        d.to_string()
    } else {
        let l = c.ints(&[less]);
        c.op("Sub", &[d, &l])
    };
    c.op("Min", &[&v, &hi])
}

/// The gradient `t` of a Slice of step `step` (not 1) from `start` to `end` on axis `axis` (of
/// `rank`) put back into `x`'s dim `d` there: the elements in index order (a negative step took
/// them from the last one: reversed), each followed by `|step| - 1` zeros (Unsqueeze, Pad, a
/// Reshape merging the two axes), cut after the last element and padded to its place. Standard
/// ops only, so both runtimes run it; the place is computed at run time where `d` is symbolic.
fn place_strided(
    c: &mut Ctx,
    t: &str,
    x: &str,
    (axis, rank): (usize, usize),
    bounds: (i64, i64, i64),
    d: &Dim,
) -> String {
    let (start, end, step) = bounds;
    let k = step.abs();
    let ax = c.ints(&[axis as i64]);
    let t = if step < 0 {
        let (s, e, m1) = (c.ints(&[-1]), c.ints(&[i64::MIN]), c.ints(&[-1]));
        c.op("Slice", &[t, &s, &e, &ax, &m1])
    } else {
        t.to_string()
    };
    let spread = if k == 1 {
        t.clone()
    } else {
        let u = c.unsqueeze(&t, &[axis as i64 + 1]);
        let mut pads = vec![0i64; 2 * (rank + 1)];
        pads[axis + 1 + rank + 1] = k - 1;
        let pads = c.ints(&pads);
        let u = c.op_a("Pad", &[&u, &pads], vec![attr_string("mode", "constant")]);
        let shape = c.shape_of(&t);
        let (zero, at, after, last) = (
            c.ints(&[0]),
            c.ints(&[axis as i64]),
            c.ints(&[axis as i64 + 1]),
            c.ints(&[i64::MAX]),
        );
        let head = c.op("Slice", &[&shape, &zero, &at]);
        let tail = c.op("Slice", &[&shape, &after, &last]);
        let merged = c.ints(&[-1]);
        let shape = c.op_a("Concat", &[&head, &merged, &tail], vec![attr_int("axis", 0)]);
        let u = c.op("Reshape", &[&u, &shape]);
        let (s, e) = (c.ints(&[0]), c.ints(&[-(k - 1)]));
        c.op("Slice", &[&u, &s, &e, &ax])
    };
    // The first element's index `lo` and the span to the last, `(n - 1) |step| + 1`.
    let pads = match d.known() {
        Some(d) => {
            let norm = |v: i64, lo: i64, hi: i64| (if v < 0 { v.saturating_add(d) } else { v }).clamp(lo, hi);
            let (lo, n) = if step > 0 {
                let (s, e) = (norm(start, 0, d), norm(end, 0, d));
                (s, (e - s + k - 1).div_euclid(k).max(0))
            } else {
                let (s, e) = (norm(start, 0, d - 1), norm(end, -1, d - 1));
                let n = (s - e + k - 1).div_euclid(k).max(0);
                (if n > 0 { s - (n - 1) * k } else { 0 }, n)
            };
            let span = if n > 0 { (n - 1) * k + 1 } else { 0 };
            let mut p = vec![0i64; 2 * rank];
            p[axis] = lo;
            p[axis + rank] = d - lo - span;
            c.ints(&p)
        }
        None => {
            let (dd, n) = (c.dim_vec_of(x, axis), c.dim_vec_of(&t, axis));
            let (kk, km1, zero) = (c.ints(&[k]), c.ints(&[k - 1]), c.ints(&[0]));
            let lo = if step > 0 {
                clamp_at_run_time(c, start, &dd, 0)
            } else {
                // the last element taken, start - (n - 1) |step|, kept in [0, d] where n is 0
                let s = clamp_at_run_time(c, start, &dd, 1);
                let one = c.ints(&[1]);
                let nm1 = c.op("Sub", &[&n, &one]);
                let back = c.op("Mul", &[&nm1, &kk]);
                let lo = c.op("Sub", &[&s, &back]);
                let lo = c.op("Max", &[&lo, &zero]);
                c.op("Min", &[&lo, &dd])
            };
            let nk = c.op("Mul", &[&n, &kk]);
            let span = c.op("Sub", &[&nk, &km1]);
            let span = c.op("Max", &[&span, &zero]);
            let used = c.op("Add", &[&lo, &span]);
            let hi = c.op("Sub", &[&dd, &used]);
            c.pads_on_axis(rank, axis, lo, hi)
        }
    };
    c.op_a("Pad", &[&spread, &pads], vec![attr_string("mode", "constant")])
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
    if let (Some(g), true) = (g0_owned(g), need[0]) {
        if let Some(dx) = gather_one(c, &g)? {
            return Ok(vec![Some(dx), None]);
        }
    }
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

/// Gather of one constant index (`x[:, 0]`, the class token of a ViT or BERT's pooler): the
/// gradient padded with zeros to its place on the axis, no scatter. None for other indices.
fn gather_one(c: &mut Ctx, g: &str) -> Result<Option<String>> {
    let (x, i) = (c.input(0).to_string(), c.input(1).to_string());
    let Some(index) = c.const_input(1).filter(|v| v.len() == 1).map(|v| v[0]) else {
        return Ok(None);
    };
    let (rx, ri) = (c.rank(&x)?, c.rank(&i)?);
    if ri > 1 {
        return Ok(None);
    }
    let axis = norm_axis(c.attr_i("axis", 0), rx);
    let g = if ri == 0 {
        c.unsqueeze(g, &[axis as i64])
    } else {
        g.to_string()
    };
    let dim = c.shape(&x)?[axis].clone();
    let pads = match dim.known() {
        Some(d) => {
            let at = if index < 0 { index + d } else { index };
            if !(0..d).contains(&at) {
                return Err(c.err(format!("its index {index} is outside the axis of size {d}")));
            }
            let mut p = vec![0i64; 2 * rx];
            p[axis] = at;
            p[axis + rx] = d - at - 1;
            c.ints(&p)
        }
        None => {
            // The dim at run time: the index counted from the start or the end, the other
            // side's zeros from the size.
            let d = c.dim_vec_of(&x, axis);
            let (before, after) = if index >= 0 {
                let at = c.ints(&[index + 1]);
                (c.ints(&[index]), c.op("Sub", &[&d, &at]))
            } else {
                let k = c.ints(&[index]);
                (c.op("Add", &[&d, &k]), c.ints(&[-index - 1]))
            };
            c.pads_on_axis(rx, axis, before, after)
        }
    };
    Ok(Some(c.op_a("Pad", &[&g, &pads], vec![attr_string("mode", "constant")])))
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
        // Swin's patch merging, x[:, 1::2, 0::2]: steps of 2, one selecting an odd count.
        case(
            "slice_strided",
            "Slice",
            vec![
                x(&[2, 5, 6]),
                ints(&[1, 0]),
                ints(&[i64::MAX, 100]),
                ints(&[1, 2]),
                ints(&[2, 2]),
            ],
        ),
        // A flip (step -1) and a reversed stride of 3 ending short of the start, a step-1 axis
        // beside them.
        case(
            "slice_negative_steps",
            "Slice",
            vec![
                x(&[3, 7, 4]),
                ints(&[-1, 5, 1]),
                ints(&[i64::MIN, 0, 3]),
                ints(&[0, 1, 2]),
                ints(&[-1, -3, 1]),
            ],
        ),
        // The same over symbolic dims: the places computed at run time.
        case(
            "slice_strided_symbolic",
            "Slice",
            vec![
                x(&[3, 7, 4]),
                ints(&[-1, 1, 1]),
                ints(&[i64::MIN, -1, 3]),
                ints(&[0, 1, 2]),
                ints(&[-2, 3, 1]),
            ],
        )
        .symbolic(&[0, 1, 2]),
        case(
            "gather_rows_negative",
            "Gather",
            vec![x(&[5, 3]), In::Ints(vec![2, 2], vec![0, 2, 4, -1])],
        ),
        case("gather_axis1_repeated", "Gather", vec![x(&[2, 5, 3]), ints(&[1, 3, 1])]).attrs(vec![attr_int("axis", 1)]),
        // One constant index (a class token, `x[:, 0]`; the last, `x[:, -1]`; a kept axis,
        // `x[:, [2]]`): a Pad instead of a scatter.
        case(
            "gather_one_index",
            "Gather",
            vec![x(&[2, 5, 3]), In::Ints(vec![], vec![0])],
        )
        .attrs(vec![attr_int("axis", 1)]),
        case(
            "gather_one_index_last",
            "Gather",
            vec![x(&[2, 5, 3]), In::Ints(vec![], vec![-1])],
        )
        .attrs(vec![attr_int("axis", 2)]),
        case("gather_one_index_kept", "Gather", vec![x(&[4, 3]), ints(&[2])]),
        case(
            "gather_one_index_inner",
            "Gather",
            vec![x(&[2, 3, 5]), In::Ints(vec![], vec![1])],
        )
        .attrs(vec![attr_int("axis", 2)]),
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
