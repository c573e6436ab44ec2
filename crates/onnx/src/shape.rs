//! Shape inference for the operators PyTorch's exporters emit in encoders and heads.
//!
//! It only fills facts that the model's own value_info leaves out; a fact already present is
//! never changed. Ops outside the table leave their outputs unknown, which callers treat as
//! "shape not known" rather than as an error.

use crate::attr::{attr, attr_i, attr_ints, attr_s};
use crate::dtype;
use crate::index::{Dim, GraphIndex, ValueFact};
use crate::proto::NodeProto;
use crate::{tensor, Model};
use std::collections::HashMap;

/// Integer constants known at graph-build time: int initializers and Constant nodes.
pub fn int_constants(model: &Model) -> HashMap<String, Vec<i64>> {
    let g = model.graph();
    let mut out = HashMap::new();
    for t in &g.initializer {
        if matches!(t.data_type, dtype::INT64 | dtype::INT32) && tensor::numel(t) <= 64 {
            if let Ok(v) = tensor::to_i64(t, &model.base_dir) {
                out.insert(t.name.clone(), v);
            }
        } else if t.data_type == dtype::BOOL && tensor::numel(t) <= 64 {
            // booleans (e.g. Dropout's training_mode) as 0/1
            let v: Vec<i64> = if t.int32_data.is_empty() {
                t.raw_data.iter().map(|&b| (b != 0) as i64).collect()
            } else {
                t.int32_data.iter().map(|&b| (b != 0) as i64).collect()
            };
            out.insert(t.name.clone(), v);
        }
    }
    for n in &g.node {
        if n.op_type == "Constant" && n.domain.is_empty() {
            if let Some(t) = attr(n, "value").and_then(|a| a.t.as_ref()) {
                if matches!(t.data_type, dtype::INT64 | dtype::INT32) {
                    if let Ok(v) = tensor::to_i64(t, &model.base_dir) {
                        out.insert(n.output[0].clone(), v);
                    }
                }
            } else if let Some(a) = attr(n, "value_ints") {
                out.insert(n.output[0].clone(), a.ints.clone());
            } else if let Some(a) = attr(n, "value_int") {
                out.insert(n.output[0].clone(), vec![a.i]);
            }
        } else if n.domain.is_empty() && !n.output.is_empty() {
            // Fold what exporters build axes and shapes with: the values pass through reshapes
            // unchanged, and Concat joins them.
            let ins: Option<Vec<&Vec<i64>>> = match n.op_type.as_str() {
                "Reshape" | "Squeeze" | "Unsqueeze" | "Flatten" | "Identity" | "Cast" => {
                    out.get(&n.input[0]).map(|v| vec![v])
                }
                "Concat" => n.input.iter().map(|i| out.get(i)).collect(),
                _ => None,
            };
            if let Some(ins) = ins {
                let v: Vec<i64> = ins.into_iter().flatten().copied().collect();
                out.insert(n.output[0].clone(), v);
            }
        }
    }
    out
}

fn known(d: &Dim) -> Option<i64> {
    match d {
        Dim::Known(v) => Some(*v),
        _ => None,
    }
}

/// Numpy-style broadcast of several shapes.
pub fn broadcast(shapes: &[Vec<Dim>]) -> Vec<Dim> {
    let rank = shapes.iter().map(Vec::len).max().unwrap_or(0);
    (0..rank)
        .map(|i| {
            let mut out = Dim::Known(1);
            for s in shapes {
                let off = rank - s.len();
                if i < off {
                    continue;
                }
                let d = &s[i - off];
                out = match (&out, d) {
                    (Dim::Known(1), _) => d.clone(),
                    (_, Dim::Known(1)) => out,
                    (a, b) if a == b => out,
                    (Dim::Known(_), _) => out,
                    (_, Dim::Known(_)) => d.clone(),
                    _ => Dim::Unknown,
                };
            }
            out
        })
        .collect()
}

fn norm_axis(a: i64, rank: usize) -> usize {
    if a < 0 {
        (a + rank as i64).max(0) as usize
    } else {
        a as usize
    }
}

fn product(ds: &[Dim]) -> Dim {
    let mut p = 1i64;
    let mut sym: Option<Dim> = None;
    for d in ds {
        match d {
            Dim::Known(v) => p = p.saturating_mul(*v),
            other => {
                if sym.is_some() {
                    return Dim::Unknown;
                }
                sym = Some(other.clone());
            }
        }
    }
    match sym {
        None => Dim::Known(p),
        Some(s) if p == 1 => s,
        Some(_) => Dim::Unknown,
    }
}

fn pool_out(n: &NodeProto, input: &[Dim], kernel: &[i64], out_ch: Option<Dim>) -> Option<Vec<Dim>> {
    let sp = input.len().checked_sub(2)?;
    let strides = attr_ints(n, "strides").unwrap_or_else(|| vec![1; sp]);
    let dil = attr_ints(n, "dilations").unwrap_or_else(|| vec![1; sp]);
    let pads = attr_ints(n, "pads").unwrap_or_else(|| vec![0; 2 * sp]);
    if kernel.len() != sp || strides.len() != sp || dil.len() != sp || pads.len() != 2 * sp {
        return None;
    }
    if strides.iter().chain(&dil).chain(kernel).any(|&v| v <= 0) || pads.iter().any(|&p| p < 0) {
        return None;
    }
    let auto = attr_s(n, "auto_pad").unwrap_or_default();
    let ceil = attr_i(n, "ceil_mode").unwrap_or(0) == 1;
    let mut out = vec![input[0].clone(), out_ch.unwrap_or_else(|| input[1].clone())];
    for i in 0..sp {
        let d = match known(&input[i + 2]) {
            None => Dim::Unknown,
            Some(x) => {
                let s = strides[i];
                if auto == "SAME_UPPER" || auto == "SAME_LOWER" {
                    Dim::Known(x.saturating_add(s - 1) / s)
                } else {
                    let (pb, pe) = if auto == "VALID" {
                        (0, 0)
                    } else {
                        (pads[i], pads[i + sp])
                    };
                    let k = dil[i].saturating_mul(kernel[i] - 1).saturating_add(1);
                    let num = x.saturating_add(pb).saturating_add(pe).saturating_sub(k);
                    if num < 0 {
                        return None;
                    }
                    let v = if ceil { (num + s - 1) / s + 1 } else { num / s + 1 };
                    Dim::Known(v)
                }
            }
        };
        out.push(d);
    }
    Some(out)
}

fn infer_node(
    n: &NodeProto,
    idx: &GraphIndex,
    consts: &HashMap<String, Vec<i64>>,
    opset: i64,
) -> Vec<Option<ValueFact>> {
    let inp =
        |i: usize| -> Option<&ValueFact> { n.input.get(i).filter(|s| !s.is_empty()).and_then(|s| idx.facts.get(s)) };
    let shp = |i: usize| -> Option<Vec<Dim>> { inp(i).and_then(|f| f.shape.clone()) };
    let dt = |i: usize| -> i32 { inp(i).map(|f| f.dtype).unwrap_or(0) };
    let cst = |i: usize| -> Option<&Vec<i64>> { n.input.get(i).and_then(|s| consts.get(s)) };
    let same = || vec![inp(0).cloned()];
    let fact = |d: i32, s: Option<Vec<Dim>>| Some(ValueFact { dtype: d, shape: s });
    if !n.domain.is_empty() && n.domain != "ai.onnx" {
        return vec![];
    }
    match n.op_type.as_str() {
        "Relu"
        | "LeakyRelu"
        | "Sigmoid"
        | "Tanh"
        | "Erf"
        | "Exp"
        | "Log"
        | "Sqrt"
        | "Neg"
        | "Abs"
        | "Clip"
        | "Identity"
        | "Softmax"
        | "LogSoftmax"
        | "Gelu"
        | "Elu"
        | "Selu"
        | "HardSigmoid"
        | "Softplus"
        | "Reciprocal"
        | "Floor"
        | "Ceil"
        | "Round"
        | "Sin"
        | "Cos"
        | "InstanceNormalization"
        | "HardSwish" => same(),
        "Dropout" => vec![inp(0).cloned(), fact(dtype::BOOL, shp(0))],
        "LayerNormalization" => {
            let s = shp(0);
            let axis = attr_i(n, "axis").unwrap_or(-1);
            let stat = s.as_ref().map(|s| {
                let a = norm_axis(axis, s.len());
                s.iter()
                    .enumerate()
                    .map(|(i, d)| if i < a { d.clone() } else { Dim::Known(1) })
                    .collect()
            });
            vec![
                inp(0).cloned(),
                fact(dtype::FLOAT, stat.clone()),
                fact(dtype::FLOAT, stat),
            ]
        }
        "BatchNormalization" => {
            let c = shp(0).and_then(|s| s.get(1).cloned());
            let stat = fact(dt(0), c.map(|c| vec![c]));
            vec![inp(0).cloned(), stat.clone(), stat]
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Sum" | "Mean" | "Mod" | "PRelu" => {
            let shapes: Option<Vec<Vec<Dim>>> = (0..n.input.len()).map(shp).collect();
            vec![fact(dt(0), shapes.map(|s| broadcast(&s)))]
        }
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" => {
            let shapes: Option<Vec<Vec<Dim>>> = (0..2).map(shp).collect();
            vec![fact(dtype::BOOL, shapes.map(|s| broadcast(&s)))]
        }
        "Not" => vec![fact(dtype::BOOL, shp(0))],
        "Where" => {
            let shapes: Option<Vec<Vec<Dim>>> = (0..3).map(shp).collect();
            vec![fact(dt(1), shapes.map(|s| broadcast(&s)))]
        }
        "Cast" => vec![fact(attr_i(n, "to").unwrap_or(0) as i32, shp(0))],
        "MatMul" => {
            let s = match (shp(0), shp(1)) {
                (Some(mut a), Some(mut b)) if !a.is_empty() && !b.is_empty() => {
                    let (a1, b1) = (a.len() == 1, b.len() == 1);
                    if a1 {
                        a.insert(0, Dim::Known(1));
                    }
                    if b1 {
                        b.push(Dim::Known(1));
                    }
                    let batch = broadcast(&[a[..a.len() - 2].to_vec(), b[..b.len() - 2].to_vec()]);
                    let mut out = batch;
                    if !a1 {
                        out.push(a[a.len() - 2].clone());
                    }
                    if !b1 {
                        out.push(b[b.len() - 1].clone());
                    }
                    Some(out)
                }
                _ => None,
            };
            vec![fact(dt(0), s)]
        }
        "Gemm" => {
            let ta = attr_i(n, "transA").unwrap_or(0) == 1;
            let tb = attr_i(n, "transB").unwrap_or(0) == 1;
            let s = match (shp(0), shp(1)) {
                (Some(a), Some(b)) if a.len() == 2 && b.len() == 2 => Some(vec![
                    a[if ta { 1 } else { 0 }].clone(),
                    b[if tb { 0 } else { 1 }].clone(),
                ]),
                _ => None,
            };
            vec![fact(dt(0), s)]
        }
        "Flatten" => {
            let s = shp(0).map(|s| {
                let a = norm_axis(attr_i(n, "axis").unwrap_or(1), s.len()).min(s.len());
                vec![product(&s[..a]), product(&s[a..])]
            });
            vec![fact(dt(0), s)]
        }
        "Reshape" => {
            let s = match (shp(0), cst(1)) {
                (Some(src), Some(target)) => {
                    let allow_zero = attr_i(n, "allowzero").unwrap_or(0) == 1;
                    let mut out: Vec<Dim> = target
                        .iter()
                        .enumerate()
                        .map(|(i, &t)| match t {
                            0 if !allow_zero => src.get(i).cloned().unwrap_or(Dim::Unknown),
                            -1 => Dim::Unknown,
                            v => Dim::Known(v),
                        })
                        .collect();
                    if let Some(pos) = target.iter().position(|&t| t == -1) {
                        let rest: Vec<Dim> = out
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| *i != pos)
                            .map(|(_, d)| d.clone())
                            .collect();
                        out[pos] = infer_minus_one(&src, &rest);
                    }
                    Some(out)
                }
                _ => None,
            };
            vec![fact(dt(0), s)]
        }
        "Transpose" => {
            let s = shp(0).and_then(|s| {
                let perm = attr_ints(n, "perm").unwrap_or_else(|| (0..s.len() as i64).rev().collect());
                perm.iter()
                    .map(|&p| usize::try_from(p).ok().and_then(|p| s.get(p).cloned()))
                    .collect()
            });
            vec![fact(dt(0), s)]
        }
        "Concat" => {
            let shapes: Option<Vec<Vec<Dim>>> = (0..n.input.len()).map(shp).collect();
            let s = shapes.and_then(|sh| {
                let first = sh.first()?.clone();
                let a = norm_axis(attr_i(n, "axis").unwrap_or(0), first.len());
                if a >= first.len() || sh.iter().any(|s| s.len() != first.len()) {
                    return None;
                }
                let mut out = first;
                out[a] = product_sum(sh.iter().map(|s| s[a].clone()));
                Some(out)
            });
            vec![fact(dt(0), s)]
        }
        "Squeeze" | "Unsqueeze" => {
            let axes = if opset >= 13 {
                cst(1).cloned()
            } else {
                attr_ints(n, "axes")
            };
            let s = shp(0).and_then(|s| {
                if n.op_type == "Squeeze" {
                    match axes {
                        Some(ax) => {
                            let ax: Vec<usize> = ax.iter().map(|&a| norm_axis(a, s.len())).collect();
                            Some(
                                s.iter()
                                    .enumerate()
                                    .filter(|(i, _)| !ax.contains(i))
                                    .map(|(_, d)| d.clone())
                                    .collect(),
                            )
                        }
                        None if s.iter().all(|d| known(d).is_some()) => {
                            Some(s.into_iter().filter(|d| *d != Dim::Known(1)).collect())
                        }
                        None => None,
                    }
                } else {
                    let ax = axes?;
                    let r = s.len() + ax.len();
                    let mut ax: Vec<usize> = ax.iter().map(|&a| norm_axis(a, r)).collect();
                    ax.sort();
                    let mut out = s;
                    for a in ax {
                        out.insert(a.min(out.len()), Dim::Known(1));
                    }
                    Some(out)
                }
            });
            vec![fact(dt(0), s)]
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL2" | "ReduceL1"
        | "ReduceLogSumExp" | "ReduceSumSquare" => {
            let axes_as_input = n.op_type == "ReduceSum" && opset >= 13 || opset >= 18;
            let axes = if axes_as_input {
                cst(1).cloned()
            } else {
                attr_ints(n, "axes")
            };
            let has_axes_input = axes_as_input && n.input.get(1).is_some_and(|s| !s.is_empty());
            let keep = attr_i(n, "keepdims").unwrap_or(1) == 1;
            let noop = attr_i(n, "noop_with_empty_axes").unwrap_or(0) == 1;
            let s = shp(0).and_then(|s| {
                let ax: Vec<usize> = match axes {
                    Some(a) => a.iter().map(|&a| norm_axis(a, s.len())).collect(),
                    None if has_axes_input => return None,
                    None if noop => return Some(s),
                    None => (0..s.len()).collect(),
                };
                Some(
                    s.iter()
                        .enumerate()
                        .filter_map(|(i, d)| {
                            if ax.contains(&i) {
                                keep.then_some(Dim::Known(1))
                            } else {
                                Some(d.clone())
                            }
                        })
                        .collect(),
                )
            });
            vec![fact(dt(0), s)]
        }
        "Conv" => {
            let s = match (shp(0), shp(1)) {
                (Some(x), Some(w)) if x.len() >= 3 && w.len() == x.len() => {
                    let kernel = attr_ints(n, "kernel_shape")
                        .unwrap_or_else(|| w[2..].iter().map(|d| known(d).unwrap_or(1)).collect());
                    pool_out(n, &x, &kernel, Some(w[0].clone()))
                }
                _ => None,
            };
            vec![fact(dt(0), s)]
        }
        "MaxPool" | "AveragePool" | "LpPool" => {
            let s = match (shp(0), attr_ints(n, "kernel_shape")) {
                (Some(x), Some(k)) if x.len() >= 3 => pool_out(n, &x, &k, None),
                _ => None,
            };
            vec![fact(dt(0), s.clone()), fact(dtype::INT64, s)]
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let s = shp(0).map(|s| {
                s.iter()
                    .enumerate()
                    .map(|(i, d)| if i < 2 { d.clone() } else { Dim::Known(1) })
                    .collect()
            });
            vec![fact(dt(0), s)]
        }
        "Gather" => {
            let s = match (shp(0), shp(1)) {
                (Some(d), Some(i)) if norm_axis(attr_i(n, "axis").unwrap_or(0), d.len()) < d.len() => {
                    let a = norm_axis(attr_i(n, "axis").unwrap_or(0), d.len());
                    let mut out = d[..a].to_vec();
                    out.extend(i);
                    out.extend_from_slice(&d[a + 1..]);
                    Some(out)
                }
                _ => None,
            };
            vec![fact(dt(0), s)]
        }
        "GatherElements" => vec![fact(dt(0), shp(1))],
        "Sign" => same(),
        "SoftmaxCrossEntropyLoss" => {
            let red = attr_s(n, "reduction").unwrap_or_else(|| "mean".into());
            let loss = if red == "none" { shp(1) } else { Some(vec![]) };
            vec![fact(dt(0), loss), inp(0).cloned()]
        }
        "Expand" => {
            let s = match (shp(0), cst(1)) {
                (Some(x), Some(t)) => Some(broadcast(&[x, t.iter().map(|&v| Dim::Known(v)).collect()])),
                _ => None,
            };
            vec![fact(dt(0), s)]
        }
        "Slice" if opset >= 10 => {
            let s = match (shp(0), cst(1), cst(2)) {
                (Some(x), Some(st), Some(en)) => {
                    let axes: Vec<i64> = match n.input.get(3).filter(|a| !a.is_empty()) {
                        Some(_) => cst(3).cloned().unwrap_or_default(),
                        None => (0..st.len() as i64).collect(),
                    };
                    let steps: Vec<i64> = match n.input.get(4).filter(|a| !a.is_empty()) {
                        Some(_) => cst(4).cloned().unwrap_or_default(),
                        None => vec![1; st.len()],
                    };
                    let mut out = x.clone();
                    let mut ok = axes.len() == st.len() && en.len() == st.len() && steps.len() == st.len();
                    for k in 0..st.len().min(axes.len()).min(en.len()).min(steps.len()) {
                        let a = norm_axis(axes[k], x.len());
                        match (x.get(a), steps[k]) {
                            (Some(Dim::Known(d)), 1) => {
                                let d = *d;
                                let c = |v: i64| {
                                    if v < 0 {
                                        (v.saturating_add(d)).clamp(0, d)
                                    } else {
                                        v.clamp(0, d)
                                    }
                                };
                                out[a] = Dim::Known((c(en[k]) - c(st[k])).max(0));
                            }
                            (Some(_), _) => out[a] = Dim::Unknown,
                            (None, _) => ok = false,
                        }
                    }
                    ok.then_some(out)
                }
                _ => None,
            };
            vec![fact(dt(0), s)]
        }
        "Split" => {
            let x = shp(0);
            let axis = x.as_ref().map(|x| norm_axis(attr_i(n, "axis").unwrap_or(0), x.len()));
            let sizes = if opset >= 13 {
                cst(1).cloned()
            } else {
                attr_ints(n, "split")
            };
            match (x, axis, sizes) {
                (Some(x), Some(a), Some(sz)) if a < x.len() && sz.len() == n.output.len() => sz
                    .iter()
                    .map(|&v| {
                        let mut o = x.clone();
                        o[a] = Dim::Known(v);
                        fact(dt(0), Some(o))
                    })
                    .collect(),
                _ => vec![],
            }
        }
        "Pad" => {
            let s = match (shp(0), cst(1)) {
                (Some(x), Some(p)) if p.len() == 2 * x.len() => Some(
                    x.iter()
                        .enumerate()
                        .map(|(i, d)| match d {
                            Dim::Known(v) => Dim::Known(v + p[i] + p[i + x.len()]),
                            _ => Dim::Unknown,
                        })
                        .collect(),
                ),
                _ => None,
            };
            vec![fact(dt(0), s)]
        }
        "ScatterElements" | "ScatterND" => same(),
        "Shape" => vec![fact(dtype::INT64, shp(0).map(|s| vec![Dim::Known(s.len() as i64)]))],
        "Size" => vec![fact(dtype::INT64, Some(vec![]))],
        "Constant" => {
            let t = attr(n, "value").and_then(|a| a.t.as_ref());
            match t {
                Some(t) => vec![fact(t.data_type, Some(t.dims.iter().map(|&d| Dim::Known(d)).collect()))],
                None => match n.attribute.first().map(|a| a.name.as_str()) {
                    Some("value_float") => vec![fact(dtype::FLOAT, Some(vec![]))],
                    Some("value_int") => vec![fact(dtype::INT64, Some(vec![]))],
                    Some("value_floats") => vec![fact(
                        dtype::FLOAT,
                        Some(vec![Dim::Known(n.attribute[0].floats.len() as i64)]),
                    )],
                    Some("value_ints") => vec![fact(
                        dtype::INT64,
                        Some(vec![Dim::Known(n.attribute[0].ints.len() as i64)]),
                    )],
                    _ => vec![],
                },
            }
        }
        "ConstantOfShape" => {
            let d = attr(n, "value")
                .and_then(|a| a.t.as_ref())
                .map(|t| t.data_type)
                .unwrap_or(dtype::FLOAT);
            vec![fact(d, cst(0).map(|v| v.iter().map(|&x| Dim::Known(x)).collect()))]
        }
        _ => vec![],
    }
}

fn product_sum(ds: impl Iterator<Item = Dim>) -> Dim {
    let mut total: i64 = 0;
    for d in ds {
        match d {
            Dim::Known(v) => total = total.saturating_add(v),
            _ => return Dim::Unknown,
        }
    }
    Dim::Known(total)
}

/// The `-1` of a Reshape: the input's size divided by the product of the other target dims,
/// kept symbolic when the input has exactly one symbolic dim whose cofactor matches.
fn infer_minus_one(src: &[Dim], rest: &[Dim]) -> Dim {
    let split = |ds: &[Dim]| -> Option<(i64, Vec<Dim>)> {
        let mut p: i64 = 1;
        let mut syms = Vec::new();
        for d in ds {
            match d {
                Dim::Known(v) => p = p.saturating_mul(*v),
                Dim::Unknown => return None,
                s => syms.push(s.clone()),
            }
        }
        Some((p, syms))
    };
    match (split(src), split(rest)) {
        (Some((ps, ss)), Some((pr, sr))) => {
            let mut remaining = ss;
            for s in &sr {
                match remaining.iter().position(|x| x == s) {
                    Some(i) => {
                        remaining.remove(i);
                    }
                    None => return Dim::Unknown,
                }
            }
            if pr == 0 || ps % pr != 0 {
                return Dim::Unknown;
            }
            let k = ps / pr;
            match (remaining.len(), k) {
                (0, k) => Dim::Known(k),
                (1, 1) => remaining.pop().unwrap_or(Dim::Unknown),
                _ => Dim::Unknown,
            }
        }
        _ => Dim::Unknown,
    }
}

/// Fill missing facts of `idx` in topological order.
pub fn infer(model: &Model, idx: &mut GraphIndex) {
    let consts = int_constants(model);
    let opset = model.opset();
    let g = model.graph();
    for &i in &idx.topo.clone() {
        let n = &g.node[i];
        if n.output
            .iter()
            .all(|o| o.is_empty() || idx.facts.get(o).is_some_and(|f| f.shape.is_some() && f.dtype != 0))
        {
            continue;
        }
        let inferred = infer_node(n, idx, &consts, opset);
        for (o, f) in n.output.iter().zip(inferred) {
            let Some(f) = f else { continue };
            if o.is_empty() {
                continue;
            }
            let e = idx.facts.entry(o.clone()).or_default();
            if e.dtype == 0 {
                e.dtype = f.dtype;
            }
            if e.shape.is_none() {
                e.shape = f.shape;
            }
        }
    }
}
