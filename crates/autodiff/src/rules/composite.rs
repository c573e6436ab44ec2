//! Normalizations that ONNX defines as functions of simpler ops, differentiated through bodies
//! written as the spec's function bodies write them (the forward keeps the op itself).

use crate::ctx::{norm_axis, Ctx};
use dagr_onnx::builder::attr_ints;
use dagr_onnx::error::Result;

impl Ctx<'_> {
    fn mean_over(&mut self, x: &str, axes: &[i64]) -> String {
        let h = format!("grad/{}", self.hint());
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
    let h = format!("grad/{}", c.hint());
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
