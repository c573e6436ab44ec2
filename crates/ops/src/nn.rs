//! Convolution, pooling, normalization and softmax.

use super::{g0_owned, Out};
use crate::ctx::{norm_axis, Ctx};
use crate::Kind::Vjp;
use crate::{op, Op};
use dagr_onnx::builder::{attr_int, attr_ints};
use dagr_onnx::error::Result;

/// This family's operators, each one entry: name, the first schema version covered, shape
/// inference, gradient, formula.
pub(crate) static OPS: &[Op] = &[
    op(
        "Softmax",
        1,
        Some(crate::infer::same),
        Vjp(softmax),
        "dX = Y (g - sum(g Y))",
    ),
    op(
        "LogSoftmax",
        1,
        Some(crate::infer::same),
        Vjp(log_softmax),
        "dX = g - exp(Y) sum(g)",
    ),
    op(
        "Conv",
        1,
        Some(shapes::conv),
        Vjp(conv),
        "dX = ConvTranspose(g, W) or col2im(W^T g), dW = Conv(X^T, g^T) cropped or g im2col(X)^T, dB = sum(g)",
    )
    .lowered(lower_conv),
    op(
        "ConvTranspose",
        1,
        Some(shapes::conv_transpose),
        Vjp(conv_transpose),
        "dX = Conv(g, W), dW = Conv's weight gradient with input and output exchanged, dB = sum(g)",
    ),
    op(
        "MaxPool",
        1,
        Some(shapes::pool),
        Vjp(max_pool),
        "dX = scatter_add(g at the argmax indices)",
    ),
    op(
        "AveragePool",
        1,
        Some(shapes::pool),
        Vjp(average_pool),
        "dX = ConvTranspose(g / count, ones)",
    ),
    op(
        "GlobalAveragePool",
        1,
        Some(shapes::global_pool),
        Vjp(global_average_pool),
        "dX = expand(g / (H W))",
    ),
    op(
        "BatchNormalization",
        9,
        Some(shapes::batch_norm),
        Vjp(batch_norm),
        "inference: dX = g scale r; training: dX = scale r/M (M g - sum g - x̂ sum(g x̂))",
    ),
    op(
        "InstanceNormalization",
        1,
        Some(crate::infer::same),
        Vjp(instance_norm),
        "dX = r (ĝ - mean ĝ - x̂ mean(ĝ x̂)), ĝ = g scale, over the spatial dims; dscale = Σ g x̂, dB = Σ g",
    ),
    op(
        "LayerNormalization",
        17,
        Some(shapes::layer_norm),
        Vjp(layer_norm),
        "dX = r (ĝ - mean ĝ - x̂ mean(ĝ x̂)), ĝ = g scale",
    ),
];

/// Shape (and value) inference of this family's operators.
pub(crate) mod shapes {
    use crate::infer::axis;
    use crate::infer::Node;
    use dagr_onnx::dim::Dim;
    use dagr_onnx::dtype;

    /// Output spatial dims of a convolution or pool: `(d + pads - dilated kernel) / stride + 1`,
    /// symbolic where `d` is and the division is exact.
    pub(crate) fn window_out(c: &Node, input: &[Dim], kernel: &[i64]) -> Option<Vec<Dim>> {
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

    pub(crate) fn conv(c: &mut Node) -> Option<()> {
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

    pub(crate) fn conv_transpose(c: &mut Node) -> Option<()> {
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

    pub(crate) fn pool(c: &mut Node) -> Option<()> {
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

    pub(crate) fn global_pool(c: &mut Node) -> Option<()> {
        let s = c.shape(0)?;
        let out = s
            .iter()
            .enumerate()
            .map(|(i, d)| if i < 2 { d.clone() } else { Dim::Known(1) })
            .collect();
        c.set(0, c.dtype(0), Some(out));
        Some(())
    }

    pub(crate) fn batch_norm(c: &mut Node) -> Option<()> {
        c.same(0, 0);
        let ch = c.shape(0).and_then(|s| s.get(1).cloned());
        let dt = c.dtype(0);
        for o in 1..c.outputs() {
            c.set(o, dt, ch.clone().map(|d| vec![d]));
        }
        Some(())
    }

    pub(crate) fn layer_norm(c: &mut Node) -> Option<()> {
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
}

/// Softmax over `axes`: dX = Y (g - sum(g Y)).
pub fn softmax(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let y = c.output(0).to_string();
    let axes = softmax_axes(c)?;
    let gy = c.op("Mul", &[&g, &y]);
    let s = c.reduce_sum(&gy, &axes, true);
    let d = c.op("Sub", &[&g, &s]);
    Ok(vec![Some(c.op("Mul", &[&y, &d]))])
}

/// LogSoftmax: dX = g - exp(Y) sum(g).
pub fn log_softmax(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let y = c.output(0).to_string();
    let axes = softmax_axes(c)?;
    let s = c.reduce_sum(&g, &axes, true);
    let p = c.op("Exp", &[&y]);
    let ps = c.op("Mul", &[&p, &s]);
    Ok(vec![Some(c.op("Sub", &[&g, &ps]))])
}

/// From opset 13 Softmax normalizes one axis (default -1); before, the input is coerced to 2-D
/// at `axis` (default 1), so the sum runs over every axis from `axis` on.
fn softmax_axes(c: &Ctx) -> Result<Vec<i64>> {
    let r = c.rank(c.input(0))?;
    if c.b.opset >= 13 {
        Ok(vec![norm_axis(c.attr_i("axis", -1), r) as i64])
    } else {
        Ok((norm_axis(c.attr_i("axis", 1), r)..r).map(|a| a as i64).collect())
    }
}

pub(crate) struct ConvGeom {
    sp: usize,
    strides: Vec<i64>,
    dil: Vec<i64>,
    /// begin pads then end pads, explicit (auto_pad resolved)
    pads: Vec<i64>,
    kernel: Vec<i64>,
    /// spatial input sizes (None: symbolic)
    input: Vec<Option<i64>>,
    /// Per spatial dim: SAME padding whose amount depends on a symbolic size (its entries in
    /// `pads` are 0 and the gradients pad and crop at run time), and whether it is SAME_UPPER.
    same_at_run_time: Vec<bool>,
    same_upper: bool,
}

pub(crate) fn conv_geom(c: &Ctx, kernel: Vec<i64>) -> Result<ConvGeom> {
    let x = c.input(0);
    let xs = c.shape(x)?;
    let sp = xs.len() - 2;
    let input: Vec<Option<i64>> = xs[2..].iter().map(|d| d.known()).collect();
    let strides = c.attr_ints("strides").unwrap_or_else(|| vec![1; sp]);
    let dil = c.attr_ints("dilations").unwrap_or_else(|| vec![1; sp]);
    let auto = c.attr_s("auto_pad").unwrap_or_default();
    let pads = match auto.as_str() {
        "SAME_UPPER" | "SAME_LOWER" => {
            let mut b = vec![0; sp];
            let mut e = vec![0; sp];
            for i in 0..sp {
                // With stride 1 the total padding does not depend on the input size.
                let total = match (input[i], strides[i]) {
                    (_, 1) => dil[i] * (kernel[i] - 1),
                    (Some(d), st) => {
                        let out = (d + st - 1) / st;
                        ((out - 1) * st + dil[i] * (kernel[i] - 1) + 1 - d).max(0)
                    }
                    (None, _) => continue,
                };
                let small = total / 2;
                if auto == "SAME_UPPER" {
                    b[i] = small;
                    e[i] = total - small;
                } else {
                    b[i] = total - small;
                    e[i] = small;
                }
            }
            [b, e].concat()
        }
        "VALID" => vec![0; 2 * sp],
        _ => c.attr_ints("pads").unwrap_or_else(|| vec![0; 2 * sp]),
    };
    let same_at_run_time = (0..sp)
        .map(|i| auto.starts_with("SAME") && input[i].is_none() && strides[i] > 1)
        .collect();
    Ok(ConvGeom {
        sp,
        strides,
        dil,
        pads,
        kernel,
        input,
        same_at_run_time,
        same_upper: auto == "SAME_UPPER",
    })
}

impl ConvGeom {
    /// ceil_mode=1: per spatial axis, how far the last window runs past the padded input (the
    /// output's size decides it, so both sizes must be static); zeros without ceil_mode.
    pub(crate) fn ceil_overflow(&self, c: &Ctx) -> Result<Vec<i64>> {
        if c.attr_i("ceil_mode", 0) == 0 {
            return Ok(vec![0; self.sp]);
        }
        let out: Option<Vec<i64>> = c.shape(c.output(0))?[2..].iter().map(|d| d.known()).collect();
        let (Some(out), Some(input)) = (out, self.input.iter().copied().collect::<Option<Vec<i64>>>()) else {
            return Err(c.err("its gradient with ceil_mode=1 needs the spatial sizes known"));
        };
        let sp = self.sp;
        Ok((0..sp)
            .map(|i| {
                let span = (out[i] - 1) * self.strides[i] + self.dil[i] * (self.kernel[i] - 1) + 1;
                (span - (input[i] + self.pads[i] + self.pads[sp + i])).max(0)
            })
            .collect())
    }

    /// output_padding making ConvTranspose return exactly the input size (< stride); for a
    /// symbolic dim, the largest (stride - 1), and the result is cropped (`crop`).
    fn output_padding(&self) -> Vec<i64> {
        (0..self.sp)
            .map(|i| match self.input[i] {
                Some(d) => {
                    let span = d + self.pads[i] + self.pads[i + self.sp] - self.dil[i] * (self.kernel[i] - 1) - 1;
                    span.rem_euclid(self.strides[i])
                }
                None => self.strides[i] - 1,
            })
            .collect()
    }
    /// Whether the transposed convolution may come out longer than the input (a symbolic dim
    /// with a stride over 1): the positions past the input get no window, so cropping is exact.
    fn needs_crop(&self) -> bool {
        (0..self.sp).any(|i| self.input[i].is_none() && self.strides[i] > 1)
    }
    /// ConvTranspose of `g` by `w` back to the input's spatial size; SAME pads decided at run
    /// time are cropped from the front.
    fn transpose_back(&self, c: &mut Ctx, g: &str, w: &str, x: &str, group: i64) -> String {
        let t = c.op_a("ConvTranspose", &[g, w], self.transpose_attrs(group));
        if !self.needs_crop() {
            return t;
        }
        let (starts, ends, axes) = spatial_of(c, x, self.sp);
        if !self.same_at_run_time.iter().any(|&d| d) {
            return c.op("Slice", &[&t, &starts, &ends, &axes]);
        }
        let (begin, _) = self.run_time_pads(c, x);
        let ends = c.op("Add", &[&begin, &ends]);
        c.op("Slice", &[&t, &begin, &ends, &axes])
    }
    /// The begin and end pads of each spatial dim, `[sp]` int64 each: SAME pads decided at run
    /// time from the input's size (ceil(L / s) outputs, the total split as auto_pad says), 0 for
    /// the other dims (whose pads are the attribute's).
    fn run_time_pads(&self, c: &mut Ctx, x: &str) -> (String, String) {
        let (mut begin, mut end) = (Vec::new(), Vec::new());
        for i in 0..self.sp {
            if !self.same_at_run_time[i] {
                begin.push(c.ints(&[0]));
                end.push(c.ints(&[0]));
                continue;
            }
            let l = c.dim_of(x, 2 + i as i64);
            let (s, span) = (
                c.b.scalar_i64(self.strides[i]),
                c.b.scalar_i64(self.dil[i] * (self.kernel[i] - 1) + 1),
            );
            let (one, two, zero) = (c.b.scalar_i64(1), c.b.scalar_i64(2), c.b.scalar_i64(0));
            let sm1 = c.op("Sub", &[&s, &one]);
            let up = c.op("Add", &[&l, &sm1]);
            let outs = c.op("Div", &[&up, &s]);
            let o1 = c.op("Sub", &[&outs, &one]);
            let reach = c.op("Mul", &[&o1, &s]);
            let reach = c.op("Add", &[&reach, &span]);
            let total = c.op("Sub", &[&reach, &l]);
            let total = c.op("Max", &[&total, &zero]);
            let small = c.op("Div", &[&total, &two]);
            let large = c.op("Sub", &[&total, &small]);
            let (b, e) = if self.same_upper {
                (small, large)
            } else {
                (large, small)
            };
            begin.push(c.unsqueeze(&b, &[0]));
            end.push(c.unsqueeze(&e, &[0]));
        }
        let cat = |c: &mut Ctx, v: &[String]| {
            let refs: Vec<&str> = v.iter().map(String::as_str).collect();
            c.op_a("Concat", &refs, vec![attr_int("axis", 0)])
        };
        (cat(c, &begin), cat(c, &end))
    }
    /// The output's spatial sizes where every input spatial size is known (then the pads are
    /// explicit too); None otherwise.
    fn static_out(&self) -> Option<Vec<i64>> {
        (0..self.sp)
            .map(|i| {
                let span =
                    self.input[i]? + self.pads[i] + self.pads[i + self.sp] - self.dil[i] * (self.kernel[i] - 1) - 1;
                (span >= 0).then(|| span / self.strides[i] + 1)
            })
            .collect()
    }
    /// The kernel's offsets, row-major (the order of a weight's trailing dims).
    fn offsets(&self) -> Vec<Vec<i64>> {
        self.kernel.iter().fold(vec![vec![]], |acc, &k| {
            acc.into_iter()
                .flat_map(|p| {
                    (0..k).map(move |i| {
                        let mut q = p.clone();
                        q.push(i);
                        q
                    })
                })
                .collect()
        })
    }
    /// The windows of im2col, one per kernel offset (row-major, the order of a weight's
    /// trailing dims): `x` [N, C, S...] (static spatial sizes, `out` the output's) as
    /// [C, O..., N], the input each output position's window reads at that offset (zeros where
    /// it covers padding). One strided Slice each, of the padded input laid out batch last
    /// (`batch_last`): a window is runs of at least N contiguous values, where batch-first
    /// windows are runs as short as an output row (2 values at ResNet-18's last stage, B = 32:
    /// its layout, padding and nine windows took ONNX Runtime 2.5 ms so, 0.3 ms batch last).
    fn windows(&self, c: &mut Ctx, x: &str, out: &[i64]) -> Vec<String> {
        let sp = self.sp;
        let mut xp = batch_last(c, x, sp);
        if self.pads.iter().any(|&p| p != 0) {
            let pads = [&[0], &self.pads[..sp], &[0, 0], &self.pads[sp..], &[0]].concat();
            let pads = c.ints(&pads);
            xp = c.op("Pad", &[&xp, &pads]);
        }
        let axes = c.ints(&(1..=sp as i64).collect::<Vec<_>>());
        let steps = c.ints(&self.strides);
        // The padded input's spatial sizes: a window that is all of it is the input itself
        // (a 1x1 kernel at stride 1).
        let padded: Vec<i64> = (0..sp)
            .map(|i| self.input[i].unwrap_or(-1) + self.pads[i] + self.pads[sp + i])
            .collect();
        self.offsets()
            .iter()
            .map(|off| {
                let starts: Vec<i64> = (0..sp).map(|i| off[i] * self.dil[i]).collect();
                let ends: Vec<i64> = (0..sp)
                    .map(|i| starts[i] + self.strides[i] * (out[i] - 1) + 1)
                    .collect();
                let whole = (0..sp).all(|i| starts[i] == 0 && self.strides[i] == 1 && ends[i] == padded[i]);
                if whole {
                    return xp.clone();
                }
                let (s, e) = (c.ints(&starts), c.ints(&ends));
                c.op("Slice", &[&xp, &s, &e, &axes, &steps])
            })
            .collect()
    }
    /// im2col: `x` [N, C, S...] as a matrix [C K, O N] (K kernel offsets, O output positions):
    /// column (o, n) holds the window of output position o of sample n, rows ordered as a
    /// weight's [C, k...] (so the weight multiplies it as it is). The windows stacked.
    fn unfold(&self, c: &mut Ctx, x: &str, channels: i64, out: &[i64]) -> String {
        let windows = self.windows(c, x, out);
        let shape = c.ints(&[channels * windows.len() as i64, -1]);
        let stacked = match windows.as_slice() {
            [one] => one.clone(),
            _ => {
                let parts: Vec<String> = windows.iter().map(|w| c.unsqueeze(w, &[1])).collect();
                let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                c.op_a("Concat", &refs, vec![attr_int("axis", 1)])
            }
        };
        c.op("Reshape", &[&stacked, &shape])
    }
    /// col2im, the adjoint of `unfold`: `col` [C K, O N] back to [N, C, S...] (`size` the
    /// input's spatial sizes), each entry added at the input position its window offset
    /// covers: per channel, one product by the constant 0/1 matrix [S, K O] of where each
    /// (offset, output position) lands (`fold_size` bounds it).
    fn fold(&self, c: &mut Ctx, col: &str, channels: i64, out: &[i64], size: &[i64]) -> String {
        let sp = self.sp;
        let offsets = self.offsets();
        let k = offsets.len() as i64;
        let (o_total, s_total) = (out.iter().product::<i64>(), size.iter().product::<i64>());
        let mut lands = vec![0.0; (k * o_total * s_total) as usize];
        for (j, off) in offsets.iter().enumerate() {
            for o in 0..o_total {
                // output position o's coordinates (row-major), the input position it reads
                let (mut rest, mut flat, mut inside) = (o, 0, true);
                for i in (0..sp).rev() {
                    let oi = rest % out[i];
                    rest /= out[i];
                    let p = oi * self.strides[i] + off[i] * self.dil[i] - self.pads[i];
                    inside &= (0..size[i]).contains(&p);
                    let stride: i64 = size[i + 1..].iter().product();
                    flat += p * stride;
                }
                if inside {
                    lands[(flat * k * o_total + j as i64 * o_total + o) as usize] = 1.0;
                }
            }
        }
        let lands = c.floats(&[s_total, k * o_total], &lands);
        // [C, K O, N]; [S, K O] x [C, K O, N] -> [C, S, N] -> [N, C S] -> [N, C, S...]
        let shape = c.ints(&[channels, k * o_total, -1]);
        let col = c.op("Reshape", &[col, &shape]);
        let dx = c.op("MatMul", &[&lands, &col]);
        let shape = c.ints(&[channels * s_total, -1]);
        let dx = c.op("Reshape", &[&dx, &shape]);
        let dx = c.op_a("Transpose", &[&dx], vec![attr_ints("perm", &[1, 0])]);
        let shape = c.ints(&[&[-1, channels][..], size].concat());
        c.op("Reshape", &[&dx, &shape])
    }
    /// The size of `fold`'s constant matrix: K O S entries.
    fn fold_size(&self, out: &[i64]) -> i64 {
        let size: i64 = self.input.iter().map(|d| d.unwrap_or(0)).product();
        self.kernel.iter().chain(out).product::<i64>() * size
    }
    fn transpose_attrs(&self, group: i64) -> Vec<dagr_onnx::proto::AttributeProto> {
        vec![
            attr_ints("strides", &self.strides),
            attr_ints("dilations", &self.dil),
            attr_ints("pads", &self.pads),
            attr_ints("output_padding", &self.output_padding()),
            attr_ints("kernel_shape", &self.kernel),
            attr_int("group", group),
        ]
    }
}

/// Conv. dX = ConvTranspose(g, W) with explicit pads and output_padding (never output_shape,
/// which re-splits asymmetric pads). dW = a Conv of the input with the gradient as kernel
/// (strides and dilations swapped), groups folded into the batch, cropped to the kernel size.
///
/// With static spatial sizes and one group, the gradients are matrix products over the whole
/// batch instead where the runtimes' convolutions multiply thin matrices one sample at a time:
/// dW = g [Cout, O N] x im2col(X)^T when the kernel is small (a weight-gradient Conv's matrices
/// are K wide), dX = col2im(W^T [C K, Cout] x g) when the output has few positions (a
/// ConvTranspose's are O wide), the batch last throughout (`Geometry::windows`). Measured on
/// ResNet-18's convolutions: `scripts/bench_zoo.py`.
pub fn conv(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let (x, w) = (c.input(0).to_string(), c.input(1).to_string());
    let ws = c.known_shape(&w)?;
    let group = c.attr_i("group", 1);
    let geo = conv_geom(c, ws[2..].to_vec())?;
    let sp = geo.sp;
    let out_sizes = geo.static_out().filter(|_| group == 1);
    let kernel: i64 = geo.kernel.iter().product();
    let matrices = out_sizes.map(|o| {
        let positions: i64 = o.iter().product();
        let unfold = need[1] && kernel <= UNFOLD_MAX_KERNEL && ws[0] >= UNFOLD_MIN_OUT_CHANNELS;
        let fold = need[0] && positions <= FOLD_MAX_POSITIONS && geo.fold_size(&o) <= FOLD_MAX_MATRIX;
        (o, unfold, fold)
    });
    // g as [Cout, O N], the columns of im2col's order, for the matrix forms
    let gt = match &matrices {
        Some((o, u, f)) if *u || *f => {
            let shape = c.ints(&[-1, ws[0], o.iter().product()]);
            let g3 = c.op("Reshape", &[&g, &shape]);
            let gt = c.op_a("Transpose", &[&g3], vec![attr_ints("perm", &[1, 2, 0])]);
            let shape = c.ints(&[ws[0], -1]);
            Some(c.op("Reshape", &[&gt, &shape]))
        }
        _ => None,
    };
    let mut out = vec![None; need.len()];
    if need[0] {
        out[0] = Some(match (&matrices, &gt) {
            (Some((o, _, true)), Some(gt)) => {
                // col [C K, O N] = W^T [C K, Cout] x g
                let x_sizes: Vec<i64> = geo.input.iter().map(|d| d.unwrap_or(0)).collect();
                let shape = c.ints(&[ws[0], -1]);
                let w2 = c.op("Reshape", &[&w, &shape]);
                let wt = c.op_a("Transpose", &[&w2], vec![attr_ints("perm", &[1, 0])]);
                let col = c.op("MatMul", &[&wt, gt]);
                geo.fold(c, &col, ws[1], o, &x_sizes)
            }
            _ => geo.transpose_back(c, &g, &w, &x, group),
        });
    }
    if need[1] {
        out[1] = Some(match (&matrices, &gt) {
            // Where the forward is lowered, its im2col is this product's too.
            (Some((o, true, _)), Some(gt)) if o.iter().product::<i64>() <= LOWER_MAX_POSITIONS => {
                let col = geo.unfold(c, &x, ws[1], o);
                let colt = c.op_a("Transpose", &[&col], vec![attr_ints("perm", &[1, 0])]);
                let dw = c.op("MatMul", &[gt, &colt]);
                let shape = c.ints(&ws);
                c.op("Reshape", &[&dw, &shape])
            }
            // Elsewhere one product per kernel offset, g [Cout, O N] x window^T, spares
            // stacking the windows (ResNet-18's first stage, B = 32, 1 thread: 4.0 against
            // 5.8 ms).
            (Some((o, true, _)), Some(gt)) => {
                let rows = c.ints(&[ws[1], -1]);
                let parts: Vec<String> = geo
                    .windows(c, &x, o)
                    .iter()
                    .map(|win| {
                        let win = c.op("Reshape", &[win, &rows]);
                        let wt = c.op_a("Transpose", &[&win], vec![attr_ints("perm", &[1, 0])]);
                        let dw = c.op("MatMul", &[gt, &wt]);
                        c.unsqueeze(&dw, &[2])
                    })
                    .collect();
                let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                let stacked = c.op_a("Concat", &refs, vec![attr_int("axis", 2)]);
                let shape = c.ints(&ws);
                c.op("Reshape", &[&stacked, &shape])
            }
            _ => weight_grad(c, &x, &g, &ws, group, &geo),
        });
    }
    if need.len() > 2 && need[2] {
        out[2] = Some(bias_grad(c, &g, sp));
    }
    Ok(out)
}

/// Conv's lowering for training graphs: where the output has few positions per sample, one
/// matrix product over the batch, Y = W [Cout, C K] x im2col(X) (+ B), instead of a convolution
/// that ONNX Runtime computes as a product C K deep but only O wide per sample (ResNet-18's last
/// stage, 2x2 outputs, B = 32, 1 thread: 3.9 against 10.6 ms). One group, static spatial sizes.
pub fn lower_conv(c: &mut Ctx) -> Result<bool> {
    let (x, w) = (c.input(0).to_string(), c.input(1).to_string());
    let Ok(ws) = c.known_shape(&w) else {
        return Ok(false);
    };
    if c.attr_i("group", 1) != 1 || ws.len() < 3 || c.shape(&x).map(|s| s.len()).ok() != Some(ws.len()) {
        return Ok(false);
    }
    let Ok(geo) = conv_geom(c, ws[2..].to_vec()) else {
        return Ok(false);
    };
    let Some(out) = geo.static_out() else {
        return Ok(false);
    };
    if out.iter().product::<i64>() > LOWER_MAX_POSITIONS {
        return Ok(false);
    }
    let col = geo.unfold(c, &x, ws[1], &out);
    let shape = c.ints(&[ws[0], -1]);
    let w2 = c.op("Reshape", &[&w, &shape]);
    // [Cout, C K] x [C K, O N] = Y as [Cout, O N]
    let mut y = c.op("MatMul", &[&w2, &col]);
    if c.has_input(2) {
        let shape = c.ints(&[ws[0], 1]);
        let b = c.input(2).to_string();
        let bias = c.op("Reshape", &[&b, &shape]);
        y = c.op("Add", &[&y, &bias]);
    }
    // [Cout O, N] -> [N, Cout O] -> [N, Cout, O...]
    let positions: i64 = out.iter().product();
    let shape = c.ints(&[ws[0] * positions, -1]);
    let y = c.op("Reshape", &[&y, &shape]);
    let y = c.op_a("Transpose", &[&y], vec![attr_ints("perm", &[1, 0])]);
    let shape = c.ints(&[&[-1, ws[0]][..], &out].concat());
    let output = c.output(0).to_string();
    c.b.op_named("Reshape", &[&y, &shape], vec![], &output);
    Ok(true)
}

/// `x` [N, C, S...] laid out batch last, [C, S..., N] (a Transpose of the tensor; as one of
/// the matrix [N, C S] between Reshapes it is as fast on ONNX Runtime, but tract's optimizer
/// then fails to move a strided Slice of it over the Reshape, or moves it wrongly where the
/// batch is symbolic).
fn batch_last(c: &mut Ctx, x: &str, sp: usize) -> String {
    let perm: Vec<i64> = (1..=sp as i64 + 1).chain([0]).collect();
    c.op_a("Transpose", &[x], vec![attr_ints("perm", &perm)])
}

/// The most output positions per sample of a convolution lowered to one matrix product.
const LOWER_MAX_POSITIONS: i64 = 16;

/// The largest kernel (number of offsets) whose weight gradient is an im2col matrix product.
const UNFOLD_MAX_KERNEL: i64 = 9;
/// The fewest output channels whose weight gradient is an im2col product: the product's work
/// per element the im2col copies is proportional to them (narrower, the copies cost more than
/// the thin products save).
const UNFOLD_MIN_OUT_CHANNELS: i64 = 32;
/// The most output positions per sample whose input gradient is a col2im of a matrix product.
const FOLD_MAX_POSITIONS: i64 = 16;
/// The most entries of col2im's constant matrix (256 KiB in float32).
const FOLD_MAX_MATRIX: i64 = 1 << 16;

/// The gradient of a convolution's bias: g summed over the batch and the spatial dims.
fn bias_grad(c: &mut Ctx, g: &str, sp: usize) -> String {
    let mut axes = vec![0];
    axes.extend(2..(sp + 2) as i64);
    c.reduce_sum(g, &axes, false)
}

/// The gradient of a convolution's weight: a Conv of the input `x` with the output gradient `g`
/// as kernel (strides and dilations swapped), groups folded into the batch, cropped to the
/// kernel size.
fn weight_grad(c: &mut Ctx, x: &str, g: &str, ws: &[i64], group: i64, geo: &ConvGeom) -> String {
    let sp = geo.sp;
    // SAME pads decided at run time: pad the input itself.
    let padded;
    let x = if geo.same_at_run_time.iter().any(|&d| d) {
        let (b, e) = geo.run_time_pads(c, x);
        let z = c.ints(&[0, 0]);
        let pads = c.op_a("Concat", &[&z, &b, &z, &e], vec![attr_int("axis", 0)]);
        padded = c.op("Pad", &[x, &pads]);
        padded.as_str()
    } else {
        x
    };
    let mut perm: Vec<i64> = (0..(sp + 2) as i64).collect();
    perm.swap(0, 1);
    let gt = c.op_a("Transpose", &[g], vec![attr_ints("perm", &perm)]);
    let xt = if group == 1 {
        c.op_a("Transpose", &[x], vec![attr_ints("perm", &perm)])
    } else {
        let cg = ws[1];
        // [N, group, C/group, spatial...] and [C/group, N group, spatial...], the spatial
        // sizes constants or read from the input's shape.
        let (_, spatial, _) = spatial_of(c, x, sp);
        let head = c.ints(&[0, group, cg]);
        let s = c.op_a("Concat", &[&head, &spatial], vec![attr_int("axis", 0)]);
        let x5 = c.op("Reshape", &[x, &s]);
        let mut p: Vec<i64> = vec![2, 1, 0];
        p.extend((3..(sp + 3) as i64).collect::<Vec<_>>());
        let xp = c.op_a("Transpose", &[&x5], vec![attr_ints("perm", &p)]);
        let head = c.ints(&[cg, -1]);
        let f = c.op_a("Concat", &[&head, &spatial], vec![attr_int("axis", 0)]);
        c.op("Reshape", &[&xp, &f])
    };
    let r = c.op_a(
        "Conv",
        &[&xt, &gt],
        vec![
            attr_ints("strides", &geo.dil),
            attr_ints("dilations", &geo.strides),
            attr_ints("pads", &geo.pads),
            attr_int("group", group),
        ],
    );
    let r = c.op_a("Transpose", &[&r], vec![attr_ints("perm", &perm)]);
    let starts = c.ints(&vec![0; sp]);
    let ends = c.ints(&geo.kernel);
    let axes = c.ints(&(2..(sp + 2) as i64).collect::<Vec<_>>());
    c.op("Slice", &[&r, &starts, &ends, &axes])
}

/// ConvTranspose, the input gradient of a Conv: dX = Conv(g, W) with the same strides, pads,
/// dilations and groups (the output_padding rows fall outside every window); dW = the Conv
/// weight gradient with the roles of input and output exchanged (g the input, X the output
/// gradient); dB = sum(g). auto_pad SAME and output_shape are resolved to explicit pads first
/// (`transpose_pads`).
pub fn conv_transpose(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let (x, w) = (c.input(0).to_string(), c.input(1).to_string());
    let ws = c.known_shape(&w)?;
    let group = c.attr_i("group", 1);
    let mut geo = conv_geom(c, ws[2..].to_vec())?;
    if let Some(pads) = transpose_pads(c, &geo)? {
        geo.pads = pads;
        geo.same_at_run_time = vec![false; geo.sp];
    }
    let sp = geo.sp;
    let mut out = vec![None; need.len()];
    if need[0] {
        out[0] = Some(c.op_a(
            "Conv",
            &[&g, &w],
            vec![
                attr_ints("strides", &geo.strides),
                attr_ints("dilations", &geo.dil),
                attr_ints("pads", &geo.pads),
                attr_ints("kernel_shape", &geo.kernel),
                attr_int("group", group),
            ],
        ));
    }
    if need[1] {
        out[1] = Some(weight_grad(c, &g, &x, &ws, group, &geo));
    }
    if need.len() > 2 && need[2] {
        out[2] = Some(bias_grad(c, &g, sp));
    }
    Ok(out)
}

/// ConvTranspose's explicit pads where auto_pad SAME (output = input x stride) or output_shape
/// chooses them from the output size: the total `stride (in - 1) + output_padding + dilation
/// (kernel - 1) + 1 - out` split as the spec and ONNX Runtime split it (SAME_UPPER: the larger
/// half last; SAME_LOWER and output_shape: first). None where the attribute's pads hold.
fn transpose_pads(c: &Ctx, geo: &ConvGeom) -> Result<Option<Vec<i64>>> {
    let auto = c.attr_s("auto_pad").unwrap_or_default();
    let output_shape = c.attr_ints("output_shape");
    if !auto.starts_with("SAME") && output_shape.is_none() {
        return Ok(None);
    }
    let sp = geo.sp;
    let input: Vec<i64> = match geo.input.iter().copied().collect::<Option<Vec<_>>>() {
        Some(v) => v,
        None => {
            return Err(c.err(
                "auto_pad SAME or output_shape with a symbolic spatial input dim: its pads depend on the size; export with static spatial dims or explicit pads",
            ))
        }
    };
    let out_pad = c.attr_ints("output_padding").unwrap_or_else(|| vec![0; sp]);
    let out: Vec<i64> = match &output_shape {
        // The spatial dims: output_shape may also lead with the batch and channel dims.
        Some(o) if o.len() >= sp => o[o.len() - sp..].to_vec(),
        Some(o) => return Err(c.err(format!("output_shape {o:?} has fewer than {sp} spatial dims"))),
        None => (0..sp).map(|i| input[i] * geo.strides[i]).collect(),
    };
    let (mut begin, mut end) = (vec![0; sp], vec![0; sp]);
    for i in 0..sp {
        let full = geo.strides[i] * (input[i] - 1)
            + out_pad.get(i).copied().unwrap_or(0)
            + geo.dil[i] * (geo.kernel[i] - 1)
            + 1;
        let total = full - out[i];
        if total < 0 {
            return Err(c.err(format!(
                "output size {} is larger than the {full} a transposed convolution of this input makes",
                out[i]
            )));
        }
        let (small, large) = (total / 2, total - total / 2);
        (begin[i], end[i]) = if auto == "SAME_UPPER" {
            (small, large)
        } else {
            (large, small)
        };
    }
    Ok(Some([begin, end].concat()))
}

/// MaxPool: route each output gradient to the input element that was the maximum. The rule
/// re-runs MaxPool with its Indices output and keeps only the in-plane part of each index
/// (tract numbers them per (n, c) plane, ONNX Runtime over the whole tensor), then scatters
/// with reduction "add" (overlapping windows).
pub fn max_pool(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    if c.b.opset < 16 {
        return Err(c.err("its gradient scatters with reduction=\"add\", which needs opset 16 or newer"));
    }
    if c.attr_i("storage_order", 0) != 0 {
        return Err(c.err("storage_order=1 is not supported"));
    }
    let x = c.input(0).to_string();
    let xs = c.shape(&x)?;
    if xs.len() < 3 {
        return Err(c.err("its input must have a batch, a channel and a spatial dim"));
    }
    // The flat index of a plane's element: modulo the plane size, known or read at run time.
    let spatial: Option<Vec<i64>> = xs[2..].iter().map(|d| d.known()).collect();
    let p = match spatial {
        Some(s) => c.b.const_i64(&[s.iter().product()]),
        None => {
            let shape = c.shape_of(&x);
            let (from, to) = (c.ints(&[2]), c.ints(&[i64::MAX]));
            let dims = c.op("Slice", &[&shape, &from, &to]);
            let h = c.hint();
            c.b.reduce("ReduceProd", &dims, Some(&[0]), true, &h)
        }
    };
    let attrs = c.node.attribute.clone();
    let h = c.hint();
    let outs = c.b.node_n("MaxPool", &[&x], 2, attrs, &h);
    let idx = &outs[1];
    let local = c.op("Mod", &[idx, &p]);
    let flat = c.ints(&[0, 0, -1]);
    let local = c.op("Reshape", &[&local, &flat]);
    let gf = c.op("Reshape", &[&g, &flat]);
    let xf = c.op("Reshape", &[&x, &flat]);
    let zeros = c.zeros_like_dynamic(&xf);
    let sc = c.op_a(
        "ScatterElements",
        &[&zeros, &local, &gf],
        vec![attr_int("axis", 2), dagr_onnx::builder::attr_string("reduction", "add")],
    );
    Ok(vec![Some(c.reshape_like(&sc, &x)), None])
}

/// AveragePool: spread each output gradient evenly over its window, with a ConvTranspose by a
/// ones kernel (one group per channel). Divisors exclude padding unless count_include_pad.
pub fn average_pool(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    let kernel = c
        .attr_ints("kernel_shape")
        .ok_or_else(|| c.err("kernel_shape is missing"))?;
    let mut geo = conv_geom(c, kernel.clone())?;
    let sp = geo.sp;
    let include = c.attr_i("count_include_pad", 0) == 1;
    // ceil_mode: the last windows run past the padded input; that overflow is taken as more
    // end padding that no divisor counts (static sizes: the output's decides it).
    let overflow = geo.ceil_overflow(c)?;
    if include && geo.dil.iter().any(|&d| d != 1) && overflow.iter().any(|&e| e > 0) {
        return Err(c.err("ceil_mode=1 with count_include_pad=1 and dilations is not supported"));
    }
    let explicit = geo.pads.clone();
    for (end, e) in geo.pads[sp..].iter_mut().zip(&overflow) {
        *end += e;
    }
    // SAME pads that depend on a symbolic size are decided at run time (`run_time_pads`).
    let same_at_run_time = geo.same_at_run_time.iter().any(|&d| d);
    let channels = match c.shape(&x)?[1] {
        dagr_onnx::Dim::Known(v) => v,
        _ => return Err(c.err("its channel dim must be static")),
    };
    let padded = geo.pads.iter().any(|&p| p != 0) || same_at_run_time;
    let ksize: i64 = kernel.iter().product();
    let scaled = if include && overflow.iter().any(|&e| e > 0) {
        // divisor = the window within the explicitly padded input (the pads count, the
        // overflow does not): ones of the padded size, summed over each window.
        let size: Vec<i64> = (0..sp)
            .map(|i| geo.input[i].unwrap_or(0) + explicit[i] + explicit[sp + i])
            .collect();
        let mut shape = vec![1, 1];
        shape.extend(&size);
        let ones = c.ones(&shape);
        let mut kshape = vec![1, 1];
        kshape.extend(&kernel);
        let kones = c.ones(&kshape);
        let pads = [vec![0; sp], overflow.clone()].concat();
        let counts = c.op_a(
            "Conv",
            &[&ones, &kones],
            vec![
                attr_ints("strides", &geo.strides),
                attr_ints("pads", &pads),
                attr_ints("dilations", &geo.dil),
            ],
        );
        c.op("Div", &[&g, &counts])
    } else if padded && !include {
        // divisor per output position = number of real (unpadded) input elements in its window:
        // ones of the input's size, padded with zeros (the attribute's pads in the Conv, the
        // run-time SAME pads by a Pad), summed over each window.
        let (_, spatial, _) = spatial_of(c, &x, geo.sp);
        let head = c.ints(&[1, 1]);
        let shape = c.op_a("Concat", &[&head, &spatial], vec![attr_int("axis", 0)]);
        let one = dagr_onnx::tensor::float_tensor("", &[1], &[1.0], c.float_type());
        let ones = c.op_a(
            "ConstantOfShape",
            &[&shape],
            vec![dagr_onnx::builder::attr_tensor("value", one)],
        );
        let ones = if same_at_run_time {
            let (b, e) = geo.run_time_pads(c, &x);
            let z = c.ints(&[0, 0]);
            let pads = c.op_a("Concat", &[&z, &b, &z, &e], vec![attr_int("axis", 0)]);
            c.op("Pad", &[&ones, &pads])
        } else {
            ones
        };
        let mut kshape = vec![1, 1];
        kshape.extend(&kernel);
        let kones = c.ones(&kshape);
        let counts = c.op_a(
            "Conv",
            &[&ones, &kones],
            vec![
                attr_ints("strides", &geo.strides),
                attr_ints("pads", &geo.pads),
                attr_ints("dilations", &geo.dil),
            ],
        );
        c.op("Div", &[&g, &counts])
    } else {
        let k = c.scalar(ksize as f64);
        c.op("Div", &[&g, &k])
    };
    let mut kshape = vec![channels, 1];
    kshape.extend(&kernel);
    let kones = c.ones(&kshape);
    Ok(vec![Some(geo.transpose_back(c, &scaled, &kones, &x, channels))])
}

/// `(zeros, spatial sizes, spatial axes)` of `x` as 1-D int64 tensors: the Slice bounds that
/// keep its spatial dims whole; the sizes are constants where known, read at run time if not.
fn spatial_of(c: &mut Ctx, x: &str, sp: usize) -> (String, String, String) {
    let starts = c.ints(&vec![0; sp]);
    let axes = c.ints(&(2..(sp + 2) as i64).collect::<Vec<_>>());
    let known: Option<Vec<i64>> = c.shape(x).ok().and_then(|s| s[2..].iter().map(|d| d.known()).collect());
    let ends = match known {
        Some(k) => c.ints(&k),
        None => {
            let s = c.shape_of(x);
            let (from, to) = (c.ints(&[2]), c.ints(&[i64::MAX]));
            c.op("Slice", &[&s, &from, &to])
        }
    };
    (starts, ends, axes)
}

pub fn global_average_pool(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    let y = c.output(0).to_string();
    let n = c.size_ratio(&x, &y);
    let d = c.op("Div", &[&g, &n]);
    let s = c.shape_of(&x);
    Ok(vec![Some(c.op("Expand", &[&d, &s]))])
}

/// BatchNormalization. Inference mode: an affine map with the running statistics. Training
/// mode: the batch statistics depend on X, giving dX = scale r / M (M g - sum g - x̂ sum(g x̂)).
pub fn batch_norm(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let x = c.input(0).to_string();
    let r = c.rank(&x)?;
    let eps = c.attr_f("epsilon", 1e-5) as f64;
    let training = dagr_onnx::ops::is_training_batchnorm(c.node);
    let mut stat_axes = vec![0];
    stat_axes.extend(2..r as i64);
    let bcast: Vec<i64> = stat_axes.clone();
    let (scale, mean_in, var_in) = (c.input(1).to_string(), c.input(3).to_string(), c.input(4).to_string());
    let (mean, var) = if training {
        let h = c.hint();
        let m = c.b.reduce("ReduceMean", &x, Some(&stat_axes), true, &h);
        let d = c.op("Sub", &[&x, &m]);
        let d2 = c.op("Mul", &[&d, &d]);
        let v = c.b.reduce("ReduceMean", &d2, Some(&stat_axes), true, &h);
        (m, v)
    } else {
        (c.unsqueeze(&mean_in, &bcast), c.unsqueeze(&var_in, &bcast))
    };
    let e = c.scalar(eps);
    let ve = c.op("Add", &[&var, &e]);
    let sd = c.op("Sqrt", &[&ve]);
    let one = c.scalar(1.0);
    let rstd = c.op("Div", &[&one, &sd]);
    let xc = c.op("Sub", &[&x, &mean]);
    let xhat = c.op("Mul", &[&xc, &rstd]);
    let gamma = c.unsqueeze(&scale, &bcast);
    let dbeta = c.reduce_sum(&g, &stat_axes, true);
    let gx = c.op("Mul", &[&g, &xhat]);
    let dgamma = c.reduce_sum(&gx, &stat_axes, true);
    let mut out = vec![None; need.len()];
    if need[0] {
        let gr = c.op("Mul", &[&gamma, &rstd]);
        out[0] = Some(if training {
            let m = c.size_ratio(&x, &mean);
            let mg = c.op("Mul", &[&g, &m]);
            let t = c.op("Sub", &[&mg, &dbeta]);
            let xd = c.op("Mul", &[&xhat, &dgamma]);
            let t = c.op("Sub", &[&t, &xd]);
            let t = c.op("Mul", &[&t, &gr]);
            c.op("Div", &[&t, &m])
        } else {
            c.op("Mul", &[&g, &gr])
        });
    }
    if need[1] {
        out[1] = Some(c.reshape_like(&dgamma, &scale));
    }
    if need[2] {
        let b = c.input(2).to_string();
        out[2] = Some(c.reshape_like(&dbeta, &b));
    }
    Ok(out)
}

/// LayerNormalization over the axes from `axis` on:
/// dX = r (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)), ĝ = g * scale; dScale = sum_lead g x̂; dB = sum_lead g.
pub fn layer_norm(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let x = c.input(0).to_string();
    let r = c.rank(&x)?;
    let axis = norm_axis(c.attr_i("axis", -1), r);
    let eps = c.attr_f("epsilon", 1e-5) as f64;
    let norm_axes: Vec<i64> = (axis..r).map(|a| a as i64).collect();
    let lead: Vec<i64> = (0..axis).map(|a| a as i64).collect();
    let (xhat, sd) = standardize(c, &x, &norm_axes, eps);
    let scale = c.input(1).to_string();
    let mut out = vec![None; need.len()];
    if need[0] {
        let gh = c.op("Mul", &[&g, &scale]);
        out[0] = Some(standardize_backward(c, &gh, &xhat, &sd, &norm_axes));
    }
    if need.len() > 1 && need[1] {
        let gx = c.op("Mul", &[&g, &xhat]);
        let s = if lead.is_empty() {
            gx
        } else {
            c.reduce_sum(&gx, &lead, false)
        };
        out[1] = Some(c.unbroadcast_to(&s, &scale)?);
    }
    if need.len() > 2 && need[2] {
        let b = c.input(2).to_string();
        let s = if lead.is_empty() {
            g.clone()
        } else {
            c.reduce_sum(&g, &lead, false)
        };
        out[2] = Some(c.unbroadcast_to(&s, &b)?);
    }
    Ok(out)
}

/// InstanceNormalization: per sample and channel over the spatial dims, with `[C]` scale and
/// bias: `dX = r (ĝ - mean ĝ - x̂ mean(ĝ x̂))`, `ĝ = g scale`; `dscale = Σ g x̂`, `dB = Σ g`
/// over the batch and spatial dims.
pub fn instance_norm(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let x = c.input(0).to_string();
    let r = c.rank(&x)?;
    if r < 3 {
        return Err(c.err("its input must have a batch, a channel and a spatial dim"));
    }
    let eps = c.attr_f("epsilon", 1e-5) as f64;
    let spatial: Vec<i64> = (2..r as i64).collect();
    let (xhat, sd) = standardize(c, &x, &spatial, eps);
    // [C] -> [C, 1, ...] to broadcast over the spatial dims.
    let per_channel: Vec<i64> = (1..r as i64 - 1).collect();
    let mut out = vec![None; need.len()];
    let batch_spatial: Vec<i64> = std::iter::once(0).chain(2..r as i64).collect();
    if need[0] {
        let scale = c.input(1).to_string();
        let s = c.unsqueeze(&scale, &per_channel);
        let gh = c.op("Mul", &[&g, &s]);
        out[0] = Some(standardize_backward(c, &gh, &xhat, &sd, &spatial));
    }
    if need.len() > 1 && need[1] {
        let gx = c.op("Mul", &[&g, &xhat]);
        out[1] = Some(c.reduce_sum(&gx, &batch_spatial, false));
    }
    if need.len() > 2 && need[2] {
        out[2] = Some(c.reduce_sum(&g, &batch_spatial, false));
    }
    Ok(out)
}

/// `x̂ = (x - mean) / sd`, `sd = sqrt(var + eps)`, the moments over `axes` (kept): what
/// LayerNormalization and InstanceNormalization normalize with.
fn standardize(c: &mut Ctx, x: &str, axes: &[i64], eps: f64) -> (String, String) {
    let h = c.hint();
    let mean = c.b.reduce("ReduceMean", x, Some(axes), true, &h);
    let xc = c.op("Sub", &[x, &mean]);
    let xc2 = c.op("Mul", &[&xc, &xc]);
    let var = c.b.reduce("ReduceMean", &xc2, Some(axes), true, &h);
    let e = c.scalar(eps);
    let ve = c.op("Add", &[&var, &e]);
    let sd = c.op("Sqrt", &[&ve]);
    (c.op("Div", &[&xc, &sd]), sd)
}

/// The input gradient of a standardization, given `ĝ` (the output gradient times the scale):
/// `(ĝ - mean ĝ - x̂ mean(ĝ x̂)) / sd` over `axes`.
fn standardize_backward(c: &mut Ctx, gh: &str, xhat: &str, sd: &str, axes: &[i64]) -> String {
    let h = c.hint();
    let m1 = c.b.reduce("ReduceMean", gh, Some(axes), true, &h);
    let ghx = c.op("Mul", &[gh, xhat]);
    let m2 = c.b.reduce("ReduceMean", &ghx, Some(axes), true, &h);
    let t = c.op("Sub", &[gh, &m1]);
    let xm = c.op("Mul", &[xhat, &m2]);
    let t = c.op("Sub", &[&t, &xm]);
    c.op("Div", &[&t, sd])
}

/// Finite-difference cases of this module's ops (see `crate::cases`).
pub fn cases() -> Vec<crate::cases::Case> {
    use crate::cases::*;
    use dagr_onnx::builder::{attr_float, attr_int, attr_ints, attr_string};
    use Gen::Distinct;
    vec![
        case(
            "instance_norm",
            "InstanceNormalization",
            vec![x(&[2, 3, 5]), x(&[3]), x(&[3])],
        )
        .attrs(vec![attr_float("epsilon", 1e-3)]),
        case("softmax", "Softmax", vec![x(&[2, 3, 4])]).attrs(vec![attr_int("axis", 1)]),
        case("log_softmax", "LogSoftmax", vec![x(&[2, 3, 4])]),
        case(
            "conv1d_stride_asym_pads",
            "Conv",
            vec![x(&[2, 3, 9]), x(&[4, 3, 3]), x(&[4])],
        )
        .attrs(vec![attr_ints("strides", &[2]), attr_ints("pads", &[1, 0])]),
        case(
            "conv2d_groups_dilation",
            "Conv",
            vec![x(&[2, 4, 7, 6]), x(&[6, 2, 3, 3])],
        )
        .attrs(vec![
            attr_int("group", 2),
            attr_ints("strides", &[2, 1]),
            attr_ints("dilations", &[1, 2]),
            attr_ints("pads", &[1, 0, 0, 2]),
        ]),
        case(
            "conv2d_same_upper",
            "Conv",
            vec![x(&[1, 2, 6, 5]), x(&[3, 2, 3, 2]), x(&[3])],
        )
        .attrs(vec![
            attr_string("auto_pad", "SAME_UPPER"),
            attr_ints("strides", &[2, 2]),
        ]),
        // ONNX Runtime runs no dilation with SAME padding.
        case("conv2d_same_lower", "Conv", vec![x(&[1, 2, 7, 6]), x(&[2, 2, 3, 2])]).attrs(vec![
            attr_string("auto_pad", "SAME_LOWER"),
            attr_ints("strides", &[3, 2]),
        ]),
        // 32 output channels: the weight gradient is an im2col product (stride, asymmetric
        // pads, dilation; the input gradient a col2im).
        case(
            "conv2d_im2col",
            "Conv",
            vec![x(&[2, 2, 5, 4]), x(&[32, 2, 3, 2]), x(&[32])],
        )
        .attrs(vec![
            attr_ints("strides", &[2, 1]),
            attr_ints("pads", &[1, 0, 0, 1]),
            attr_ints("dilations", &[1, 2]),
        ]),
        // 35 output positions: the forward is not lowered, the weight gradient is one product
        // per kernel offset (asymmetric pads, dilation).
        case(
            "conv2d_im2col_per_offset",
            "Conv",
            vec![x(&[2, 2, 7, 6]), x(&[32, 2, 3, 2]), x(&[32])],
        )
        .attrs(vec![attr_ints("pads", &[1, 0, 1, 1]), attr_ints("dilations", &[1, 2])]),
        // The same forms in 3-D (and the forward lowered: 12 output positions).
        case("conv3d_im2col", "Conv", vec![x(&[2, 2, 3, 3, 2]), x(&[32, 2, 2, 2, 1])])
            .attrs(vec![attr_ints("pads", &[0, 1, 0, 0, 0, 0])]),
        // A 1x1 kernel with stride 2 (ResNet's downsampling): input positions no window reads.
        case("conv2d_1x1_stride2", "Conv", vec![x(&[2, 3, 5, 4]), x(&[32, 3, 1, 1])])
            .attrs(vec![attr_ints("strides", &[2, 2])]),
        // A kernel of 12 offsets over 28 output positions: the convolutions' own gradients
        // (the matrix forms are for small kernels and few positions).
        case(
            "conv2d_wide_kernel",
            "Conv",
            vec![x(&[2, 2, 6, 8]), x(&[3, 2, 3, 4]), x(&[3])],
        )
        .attrs(vec![attr_ints("pads", &[0, 1, 0, 1])]),
        case(
            "conv3d",
            "Conv",
            vec![x(&[1, 2, 4, 4, 3]), x(&[3, 2, 2, 2, 2]), x(&[3])],
        ),
        case(
            "conv_transpose_stride_output_padding",
            "ConvTranspose",
            vec![x(&[2, 3, 5]), x(&[3, 4, 3]), x(&[4])],
        )
        .attrs(vec![
            attr_ints("strides", &[2]),
            attr_ints("pads", &[1, 0]),
            attr_ints("output_padding", &[1]),
        ]),
        // Pads chosen from the output size (odd totals show how they are split).
        case(
            "conv_transpose_output_shape",
            "ConvTranspose",
            vec![x(&[2, 3, 4, 5]), x(&[3, 2, 3, 3])],
        )
        .attrs(vec![attr_ints("strides", &[2, 2]), attr_ints("output_shape", &[8, 10])])
        .symbolic(&[0])
        // tract 0.23 puts the larger half of an odd total last here.
        .only(ORT_ONLY),
        case(
            "conv_transpose_same_upper",
            "ConvTranspose",
            vec![x(&[1, 2, 3, 4]), x(&[2, 3, 3, 4])],
        )
        .attrs(vec![
            attr_ints("strides", &[2, 3]),
            attr_string("auto_pad", "SAME_UPPER"),
        ])
        .symbolic(&[0]),
        case(
            "conv_transpose_same_lower",
            "ConvTranspose",
            vec![x(&[1, 2, 5]), x(&[2, 3, 3]), x(&[3])],
        )
        .attrs(vec![attr_ints("strides", &[2]), attr_string("auto_pad", "SAME_LOWER")])
        .symbolic(&[0]),
        case(
            "conv_transpose2d_groups_dilation",
            "ConvTranspose",
            vec![x(&[1, 4, 3, 4]), x(&[4, 3, 2, 3])],
        )
        .attrs(vec![
            attr_int("group", 2),
            attr_ints("strides", &[1, 2]),
            attr_ints("dilations", &[2, 1]),
            attr_ints("pads", &[0, 1, 1, 0]),
        ]),
        // ceil_mode: timm's ResNet-D shortcut (2x2, stride 2, padding not counted) on an odd
        // size, and pads counted with the overflow not.
        case("avgpool_ceil_odd", "AveragePool", vec![x(&[2, 2, 5, 7])])
            .attrs(vec![
                attr_ints("kernel_shape", &[2, 2]),
                attr_ints("strides", &[2, 2]),
                attr_int("ceil_mode", 1),
            ])
            .symbolic(&[0]),
        case("avgpool_ceil_pads_counted", "AveragePool", vec![x(&[1, 2, 6, 5])])
            .attrs(vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                attr_ints("pads", &[1, 1, 1, 1]),
                attr_int("count_include_pad", 1),
                attr_int("ceil_mode", 1),
            ])
            .symbolic(&[0]),
        case("maxpool", "MaxPool", vec![x(&[2, 2, 6, 6])])
            .attrs(vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])])
            .gen(Distinct),
        case("maxpool_overlap_pad", "MaxPool", vec![x(&[1, 2, 5, 5])])
            .attrs(vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ])
            .gen(Distinct),
        case("avgpool", "AveragePool", vec![x(&[2, 2, 6, 6])])
            .attrs(vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])]),
        case("avgpool_pads_exclusive", "AveragePool", vec![x(&[1, 2, 5, 5])]).attrs(vec![
            attr_ints("kernel_shape", &[3, 3]),
            attr_ints("strides", &[2, 2]),
            attr_ints("pads", &[1, 1, 1, 1]),
        ]),
        // SAME with a stride: with symbolic dims (every_rule_handles_symbolic_dims) the pads
        // are decided at run time, for the divisor too.
        case("avgpool_same_upper_stride", "AveragePool", vec![x(&[1, 2, 7, 6])]).attrs(vec![
            attr_ints("kernel_shape", &[3, 2]),
            attr_ints("strides", &[2, 2]),
            attr_string("auto_pad", "SAME_UPPER"),
        ]),
        case("avgpool_same_lower_stride_incl", "AveragePool", vec![x(&[1, 2, 6, 5])]).attrs(vec![
            attr_ints("kernel_shape", &[3, 3]),
            attr_ints("strides", &[2, 2]),
            attr_string("auto_pad", "SAME_LOWER"),
            attr_int("count_include_pad", 1),
        ]),
        case("global_avgpool", "GlobalAveragePool", vec![x(&[2, 3, 4, 5])]),
        case(
            "batchnorm_inference",
            "BatchNormalization",
            vec![
                x(&[2, 3, 4]),
                x(&[3]),
                x(&[3]),
                In::F(vec![3], vec![0.1, -0.2, 0.3]),
                In::F(vec![3], vec![0.5, 1.0, 1.5]),
            ],
        )
        .only(ORT_ONLY),
        case(
            "batchnorm_training",
            "BatchNormalization",
            vec![
                x(&[4, 3, 5]),
                x(&[3]),
                x(&[3]),
                In::F(vec![3], vec![0.1, -0.2, 0.3]),
                In::F(vec![3], vec![0.5, 1.0, 1.5]),
            ],
        )
        .attrs(vec![attr_int("training_mode", 1)])
        .outputs(3)
        .only(ORT_ONLY),
        case(
            "layernorm_last",
            "LayerNormalization",
            vec![x(&[2, 3, 4]), x(&[4]), x(&[4])],
        ),
        case(
            "layernorm_axis1",
            "LayerNormalization",
            vec![x(&[2, 3, 4]), x(&[3, 4]), x(&[3, 4])],
        )
        .attrs(vec![attr_int("axis", 1)]),
    ]
}
