//! Ops that are linear and act on each axis separately (Resize, Pad, CumSum): the gradient
//! applies each axis's transposed map.
//!
//! For Resize and for Pad in the reflect, edge and wrap modes the map of one axis is measured at
//! run time by applying the op itself to an identity matrix (`[n, n]`, only that axis resized or
//! padded): row i is the response to the input's i-th position, so every mode, coordinate
//! transformation, rounding and antialias filter the runtime implements is differentiated as
//! the runtime computes it, and symbolic sizes need nothing known at build time.

use super::{g0_owned, Out};
use crate::ctx::{norm_axis, Ctx};
use crate::Kind::Vjp;
use crate::{op, Op};
use dagr_onnx::builder::{attr_float, attr_floats, attr_int, attr_ints, attr_string};
use dagr_onnx::Dim;

/// This family's operators, each one entry: name, the first schema version covered, shape
/// inference, gradient, formula.
pub(crate) static OPS: &[Op] = &[
    op(
        "CumSum",
        11,
        Some(crate::infer::same),
        Vjp(cumsum),
        "dX = cumsum(g) in the other direction",
    ),
    op(
        "Pad",
        2,
        Some(shapes::pad),
        Vjp(pad),
        "constant: dX = Pad(g, -pads); reflect/edge/wrap: per axis, the transposed map measured on an identity (pads known or read at run time)",
    ),
    op(
        "Resize",
        10,
        Some(shapes::resize),
        Vjp(resize),
        "per resized axis, the transposed map measured by resizing an identity",
    ),
    op(
        "Upsample",
        7,
        Some(shapes::resize),
        Vjp(resize),
        "as Resize's, the map measured by upsampling an identity",
    ),
];

/// Shape (and value) inference of this family's operators.
pub(crate) mod shapes {
    use crate::infer::axis;
    use crate::infer::Node;
    use dagr_onnx::dim::Dim;

    /// Resize (and the older Upsample): output sizes given, or `floor(d * scale)` per dim.
    pub(crate) fn resize(c: &mut Node) -> Option<()> {
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
                // Upsample-7's attribute: floats.
                None if c.n.op_type == "Upsample" || c.opset < 10 => {
                    dagr_onnx::attr::attr(c.n, "scales").map(|a| a.floats.iter().map(|&x| x as f64).collect())?
                }
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

    pub(crate) fn pad(c: &mut Node) -> Option<()> {
        let x = c.shape(0)?;
        let r = x.len();
        let pads: Vec<Dim> = if c.has(1) {
            // Pads computed at run time: the rank holds, the padded dims are unknown.
            match c.value(1) {
                Some(v) => v,
                None => vec![Dim::Unknown; usize::try_from(c.shape(1)?.first()?.known()?).ok()?],
            }
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
}

impl Ctx<'_> {
    /// The identity matrix `[n, n]` of the op's float type, `n` the length of `x` along
    /// `axis`: made at run time from the shape, or, before opset 11 (no Range; Upsample's
    /// opsets), a constant of the known length.
    fn identity_along(&mut self, x: &str, axis: usize) -> dagr_onnx::Result<String> {
        if self.b.opset < 11 {
            let Some(n) = self.shape(x)?.get(axis).and_then(Dim::known) else {
                return Err(self.err(format!(
                    "its gradient before opset 11 needs the length of axis {axis} known when the graph is built"
                )));
            };
            let n = n as usize;
            let eye: Vec<f64> = (0..n * n).map(|k| if k / n == k % n { 1.0 } else { 0.0 }).collect();
            return Ok(self.floats(&[n as i64, n as i64], &eye));
        }
        let s = self.shape_of(x);
        let (from, to) = (self.ints(&[axis as i64]), self.ints(&[axis as i64 + 1]));
        let n = self.op("Slice", &[&s, &from, &to]);
        let n = self.op_a("Squeeze", &[&n], vec![]);
        let (zero, one) = (self.b.scalar_i64(0), self.b.scalar_i64(1));
        let r = self.op("Range", &[&zero, &n, &one]);
        let rows = self.unsqueeze(&r, &[1]);
        let cols = self.unsqueeze(&r, &[0]);
        let eq = self.op("Equal", &[&rows, &cols]);
        Ok(self.to_float(&eq))
    }

    /// `g` mapped back along `axis` by the transpose of `m` (`[in, out]`: m[i, j] = dy_j / dx_i):
    /// dx[.., i, ..] = sum_j g[.., j, ..] m[i, j].
    fn apply_transposed(&mut self, g: &str, m: &str, axis: usize, rank: usize) -> String {
        let mt = self.op_a("Transpose", &[m], vec![attr_ints("perm", &[1, 0])]);
        if axis + 1 == rank {
            return self.op("MatMul", &[g, &mt]);
        }
        let mut perm: Vec<i64> = (0..rank as i64).collect();
        perm.swap(axis, rank - 1);
        let gt = self.op_a("Transpose", &[g], vec![attr_ints("perm", &perm)]);
        let d = self.op("MatMul", &[&gt, &mt]);
        self.op_a("Transpose", &[&d], vec![attr_ints("perm", &perm)])
    }
}

/// CumSum: dX = the cumulative sum of g in the other direction, with the same `exclusive`.
pub fn cumsum(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let axis = c.input(1).to_string();
    let attrs = vec![
        attr_int("exclusive", c.attr_i("exclusive", 0)),
        attr_int("reverse", 1 - c.attr_i("reverse", 0).clamp(0, 1)),
    ];
    let mut out = vec![Some(c.op_a("CumSum", &[&g, &axis], attrs))];
    out.resize(need.len(), None);
    Ok(out)
}

/// The pads of a Pad node per axis (begin, end), from the attribute (before opset 11) or the
/// inputs (with `axes` from opset 18); None where they are not known at build time.
fn pads(c: &Ctx, rank: usize) -> Option<Vec<(i64, i64)>> {
    let flat = if c.b.opset < 11 {
        c.attr_ints("pads")?
    } else {
        c.const_input(1)?
    };
    let axes: Vec<usize> = match c.has_input(3).then(|| c.const_input(3)) {
        Some(a) => a?.iter().map(|&x| norm_axis(x, rank)).collect(),
        None => (0..rank).collect(),
    };
    let k = axes.len();
    if flat.len() != 2 * k {
        return None;
    }
    let mut p = vec![(0, 0); rank];
    for (i, &a) in axes.iter().enumerate() {
        p[a] = (flat[i], flat[i + k]);
    }
    Some(p)
}

/// Pad. Constant mode: dX = Pad(g, -pads), which crops what was added and pads back with
/// zeros what negative pads cropped (the pads may be computed at run time). Reflect, edge and
/// wrap: the transposed map of each padded axis, measured on an identity.
pub fn pad(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let mut out = vec![None; need.len()];
    let x = c.input(0).to_string();
    let mode = c.attr_s("mode").unwrap_or_else(|| "constant".into());
    let rank = c.rank(&x)?;
    if mode == "constant" {
        out[0] = Some(match pads(c, rank) {
            Some(p) => crop_and_pad_back(c, &g, &p),
            None => {
                // Pads computed at run time: Pad by their negation.
                let p = c.input(1).to_string();
                let neg = c.op("Neg", &[&p]);
                let mut ins = vec![g.as_str(), neg.as_str()];
                let axes = c.input(3).to_string();
                if !axes.is_empty() {
                    ins.extend(["", axes.as_str()]);
                }
                c.op("Pad", &ins)
            }
        });
        return Ok(out);
    }
    // Per padded axis, the pads of its identity: `[0, begin, 0, end]`, the Pad's attribute
    // before opset 11, else an input (constant, or read from the pads at run time).
    enum Along {
        Attr([i64; 4]),
        Input(String),
    }
    let mut along: Vec<(usize, Along)> = Vec::new();
    match pads(c, rank) {
        Some(p) => {
            if p.iter().any(|&(b, e)| b < 0 || e < 0) {
                return Err(c.err(format!("negative pads in {mode} mode have no gradient rule")));
            }
            for (axis, &(b, e)) in p.iter().enumerate() {
                if (b, e) == (0, 0) {
                    continue;
                }
                along.push((
                    axis,
                    match c.b.opset < 11 {
                        true => Along::Attr([0, b, 0, e]),
                        false => Along::Input(c.ints(&[0, b, 0, e])),
                    },
                ));
            }
        }
        None => {
            // Pads computed at run time (opset 11 and newer: an input): each axis's pads read
            // from them at run time (an axis left unpadded at run time measures an identity).
            let axes: Vec<usize> = if c.has_input(3) {
                c.const_input(3)
                    .ok_or_else(|| {
                        c.err(format!(
                            "in {mode} mode with pads computed at run time, its axes must be a constant"
                        ))
                    })?
                    .iter()
                    .map(|&a| norm_axis(a, rank))
                    .collect()
            } else {
                (0..rank).collect()
            };
            let k = axes.len() as i64;
            let pads_t = c.input(1).to_string();
            // What value inference knows of the pads (exporters concatenate run-time pads with
            // constant zeros for the batch and channel axes): axes padded by zero are skipped.
            let known: Option<Vec<Dim>> = c.idx.value(&pads_t).cloned().filter(|v| v.len() as i64 == 2 * k);
            let zero = c.ints(&[0]);
            for (i, &axis) in axes.iter().enumerate() {
                let unpadded = known
                    .as_ref()
                    .is_some_and(|v| [&v[i], &v[i + k as usize]].iter().all(|d| d.known() == Some(0)));
                if unpadded {
                    continue;
                }
                let i = i as i64;
                let read = |c: &mut Ctx, at: i64| {
                    let (from, to) = (c.ints(&[at]), c.ints(&[at + 1]));
                    c.op("Slice", &[&pads_t, &from, &to])
                };
                let (b, e) = (read(c, i), read(c, i + k));
                let pp = c.op_a("Concat", &[&zero, &b, &zero, &e], vec![attr_int("axis", 0)]);
                along.push((axis, Along::Input(pp)));
            }
        }
    }
    let mut d = g;
    for (axis, pads) in along {
        let eye = c.identity_along(&x, axis)?;
        let mode = attr_string("mode", &mode);
        let m = match pads {
            Along::Attr(p) => c.op_a("Pad", &[&eye], vec![mode, attr_ints("pads", &p)]),
            Along::Input(p) => c.op_a("Pad", &[&eye, &p], vec![mode]),
        };
        d = c.apply_transposed(&d, &m, axis, rank);
    }
    out[0] = Some(d);
    Ok(out)
}

/// The gradient of a constant Pad with known pads: zeros where the pad cropped (a negative
/// pad), then a Slice dropping what it added (no negative pads, which tract does not run).
fn crop_and_pad_back(c: &mut Ctx, g: &str, p: &[(i64, i64)]) -> String {
    let mut d = g.to_string();
    let back: Vec<i64> = p
        .iter()
        .map(|&(b, _)| (-b).max(0))
        .chain(p.iter().map(|&(_, e)| (-e).max(0)))
        .collect();
    if back.iter().any(|&v| v > 0) {
        d = if c.b.opset < 11 {
            c.op_a("Pad", &[&d], vec![attr_ints("pads", &back)])
        } else {
            let pp = c.ints(&back);
            c.op("Pad", &[&d, &pp])
        };
    }
    let axes: Vec<i64> = (0..p.len())
        .filter(|&a| p[a].0 > 0 || p[a].1 > 0)
        .map(|a| a as i64)
        .collect();
    if axes.is_empty() {
        return d;
    }
    let starts: Vec<i64> = axes.iter().map(|&a| p[a as usize].0.max(0)).collect();
    let ends: Vec<i64> = axes
        .iter()
        .map(|&a| match p[a as usize].1 {
            e if e > 0 => -e,
            _ => i64::MAX,
        })
        .collect();
    let (s, e, a) = (c.ints(&starts), c.ints(&ends), c.ints(&axes));
    c.op("Slice", &[&d, &s, &e, &a])
}

/// Resize (opset 11 on; 10 has scales only): per resized axis, the transposed map measured by
/// resizing an identity `[n, n]` along its second axis with the node's own mode, coordinate
/// transformation, rounding, cubic coefficient, `exclude_outside` and antialias, and the axis's
/// own scale (or output size). The extrapolation value, constant in X, drops out.
pub fn resize(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let mut out = vec![None; need.len()];
    let x = c.input(0).to_string();
    let xs = c.shape(&x)?;
    let rank = xs.len();
    let policy = c.attr_s("keep_aspect_ratio_policy").unwrap_or_else(|| "stretch".into());
    if policy != "stretch" {
        return Err(c.err(format!("keep_aspect_ratio_policy '{policy}' has no gradient rule")));
    }
    // Upsample (opsets 7 to 9, before Resize): scales only, an attribute before opset 9; its
    // map is measured with Upsample itself.
    let upsample = c.node.op_type == "Upsample";
    let (scales_at, sizes_at) = if c.b.opset < 11 || upsample {
        (1, usize::MAX)
    } else {
        (2, 3)
    };
    let axes: Vec<usize> = match c.attr_ints("axes") {
        Some(a) => a.iter().map(|&v| norm_axis(v, rank)).collect(),
        None => (0..rank).collect(),
    };
    let scales = if upsample && c.b.opset < 9 {
        dagr_onnx::attr::attr(c.node, "scales").map(|a| a.floats.clone())
    } else {
        c.has_input(scales_at)
            .then(|| float_const(c, c.input(scales_at)))
            .flatten()
    };
    let scales = scales.filter(|s| !s.is_empty());
    let sizes: Option<Vec<Dim>> = (sizes_at != usize::MAX && c.has_input(sizes_at))
        .then(|| c.idx.value(c.input(sizes_at)).cloned())
        .flatten();
    let roi = (c.b.opset >= 11 && c.has_input(1))
        .then(|| float_const(c, c.input(1)))
        .flatten()
        .filter(|r| !r.is_empty());
    if scales.is_none() && sizes.is_none() {
        return Err(c.err("its scales or sizes must be known when the graph is built"));
    }
    let mut attrs = Vec::new();
    for name in ["mode", "coordinate_transformation_mode", "nearest_mode"] {
        if let Some(v) = c.attr_s(name) {
            attrs.push(attr_string(name, &v));
        }
    }
    for name in ["exclude_outside", "antialias"] {
        if let Some(v) = dagr_onnx::attr::attr_i(c.node, name) {
            attrs.push(attr_int(name, v));
        }
    }
    if let Some(v) = dagr_onnx::attr::attr_f(c.node, "cubic_coeff_a") {
        attrs.push(attr_float("cubic_coeff_a", v));
    }
    let mut d = g;
    for (k, &axis) in axes.iter().enumerate() {
        let scale = scales.as_ref().and_then(|s| s.get(k).copied());
        let size = sizes.as_ref().and_then(|s| s.get(k).cloned());
        let same = match (scale, &size) {
            (Some(s), _) => s == 1.0 && roi.is_none(),
            (None, Some(n)) => *n == xs[axis] && roi.is_none(),
            (None, None) => false,
        };
        if same {
            continue;
        }
        let eye = c.identity_along(&x, axis)?;
        if upsample {
            let s = scale.unwrap_or(1.0);
            let mut attrs = attrs.clone();
            let m = if c.b.opset < 9 {
                attrs.push(attr_floats("scales", &[1.0, s]));
                c.op_a("Upsample", &[&eye], attrs)
            } else {
                let sc = c.b.const_f32(&[2], &[1.0, s]);
                c.op_a("Upsample", &[&eye, &sc], attrs)
            };
            d = c.apply_transposed(&d, &m, axis, rank);
            continue;
        }
        let mut ins: Vec<String> = vec![eye];
        if c.b.opset < 11 {
            let s = c.b.const_f32(&[2], &[1.0, scale.unwrap_or(1.0)]);
            ins.push(s);
        } else {
            let r = match &roi {
                Some(r) => {
                    let n = r.len() / 2;
                    let (s, e) = (r[k.min(n - 1)], r[n + k.min(n - 1)]);
                    c.b.const_f32(&[4], &[0.0, s, 1.0, e])
                }
                None if c.b.opset < 13 => c.b.const_f32(&[0], &[]),
                None => String::new(),
            };
            ins.push(r);
            match scale {
                Some(s) => ins.push(c.b.const_f32(&[2], &[1.0, s])),
                None => {
                    let nn = c.shape_of(&d);
                    let (from, to) = (c.ints(&[axis as i64]), c.ints(&[axis as i64 + 1]));
                    // The output length along this axis: g's length there (not resized yet).
                    let len = c.op("Slice", &[&nn, &from, &to]);
                    let s0 = c.shape_of(&x);
                    let n0 = c.op("Slice", &[&s0, &from, &to]);
                    let sz = c.op_a("Concat", &[&n0, &len], vec![attr_int("axis", 0)]);
                    let no_scales = if c.b.opset < 13 {
                        c.b.const_f32(&[0], &[])
                    } else {
                        String::new()
                    };
                    ins.push(no_scales);
                    ins.push(sz);
                }
            }
        }
        let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
        let m = c.op_a("Resize", &refs, attrs.clone());
        d = c.apply_transposed(&d, &m, axis, rank);
    }
    out[0] = Some(d);
    Ok(out)
}

/// A float constant input's values (scales, roi).
fn float_const(c: &Ctx, name: &str) -> Option<Vec<f32>> {
    c.idx.float_constant(name)
}

/// Finite-difference cases of this module's ops (see `crate::cases`).
pub fn cases() -> Vec<crate::cases::Case> {
    use crate::cases::*;
    use dagr_onnx::builder::{attr_floats, attr_int, attr_string};
    vec![
        case("cumsum", "CumSum", vec![x(&[3, 4]), In::Ints(vec![], vec![1])]),
        case(
            "cumsum_exclusive_reverse",
            "CumSum",
            vec![x(&[3, 4]), In::Ints(vec![], vec![0])],
        )
        .attrs(vec![attr_int("exclusive", 1), attr_int("reverse", 1)]),
        case("pad_constant", "Pad", vec![x(&[2, 3]), ints(&[1, 0, 0, 2])]),
        // A negative pad crops (tract 0.23 overflows on one).
        case(
            "pad_constant_negative_value",
            "Pad",
            vec![x(&[3, 4]), ints(&[1, -1, -1, 2]), In::F(vec![], vec![0.5])],
        )
        .only(ORT_ONLY),
        case("pad_reflect", "Pad", vec![x(&[2, 4]), ints(&[0, 2, 0, 1])]).attrs(vec![attr_string("mode", "reflect")]),
        case("pad_edge", "Pad", vec![x(&[3, 2]), ints(&[2, 1, 1, 3])]).attrs(vec![attr_string("mode", "edge")]),
        // Pads fed at run time: every axis's map read from them (the first axis's unpadded);
        // tract 0.23 runs Pad with constant pads only.
        case(
            "pad_reflect_run_time_pads",
            "Pad",
            vec![x(&[2, 3, 5]), In::FedInts(vec![6], vec![0, 1, 2, 0, 2, 1])],
        )
        .attrs(vec![attr_string("mode", "reflect")])
        .run_time_dim(0, 0)
        .run_time_dim(0, 1)
        .run_time_dim(0, 2)
        .only(ORT_ONLY),
        case(
            "pad_edge_run_time_pads_axes",
            "Pad",
            vec![x(&[2, 3, 4]), In::FedInts(vec![2], vec![3, 1]), In::Absent, ints(&[-1])],
        )
        .attrs(vec![attr_string("mode", "edge")])
        .opset(18)
        .run_time_dim(0, 2)
        .only(ORT_ONLY),
        case(
            "pad_wrap_axes",
            "Pad",
            vec![x(&[2, 3]), ints(&[2, 1]), In::Absent, ints(&[1])],
        )
        .attrs(vec![attr_string("mode", "wrap")])
        .opset(19)
        .only(ORT_ONLY),
        // Upsample, before Resize: scales an input (opset 9) or an attribute (7 and 8); tract
        // 0.23 runs no Upsample.
        case(
            "upsample_nearest",
            "Upsample",
            vec![x(&[1, 2, 3, 4]), In::F(vec![4], vec![1.0, 1.0, 2.0, 3.0])],
        )
        .opset(9)
        .symbolic(&[0])
        .only(ORT_ONLY),
        case(
            "upsample_linear",
            "Upsample",
            vec![x(&[1, 1, 3, 4]), In::F(vec![4], vec![1.0, 1.0, 2.0, 2.5])],
        )
        .attrs(vec![attr_string("mode", "linear")])
        .opset(9)
        .symbolic(&[0])
        .only(ORT_ONLY),
        case("upsample_nearest_opset8", "Upsample", vec![x(&[2, 1, 2, 3])])
            .attrs(vec![attr_floats("scales", &[1.0, 1.0, 3.0, 2.0])])
            .opset(8)
            .symbolic(&[0])
            .only(ORT_ONLY),
        case(
            "resize_linear_scales",
            "Resize",
            vec![x(&[1, 2, 5]), In::Absent, In::F(vec![3], vec![1.0, 1.0, 2.0])],
        )
        .attrs(vec![attr_string("mode", "linear")]),
        case(
            "resize_nearest_sizes",
            "Resize",
            vec![x(&[2, 2, 4, 3]), In::Absent, In::Absent, ints(&[2, 2, 6, 7])],
        )
        .attrs(vec![
            attr_string("mode", "nearest"),
            attr_string("coordinate_transformation_mode", "asymmetric"),
            attr_string("nearest_mode", "round_prefer_ceil"),
        ]),
        case(
            "resize_cubic_align_corners",
            "Resize",
            vec![x(&[1, 1, 4, 5]), In::Absent, In::F(vec![4], vec![1.0, 1.0, 1.5, 2.0])],
        )
        .attrs(vec![
            attr_string("mode", "cubic"),
            attr_string("coordinate_transformation_mode", "align_corners"),
        ])
        .only(ORT_ONLY),
        case(
            "resize_linear_antialias_down",
            "Resize",
            vec![x(&[1, 1, 8, 6]), In::Absent, In::F(vec![4], vec![1.0, 1.0, 0.5, 0.75])],
        )
        .attrs(vec![attr_string("mode", "linear"), attr_int("antialias", 1)])
        .opset(18)
        .only(ORT_ONLY),
    ]
}
