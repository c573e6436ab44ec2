//! A direct ndarray implementation of DAGR's losses and their gradients, in f64.
//!
//! It is written from the spec's formulas pair by pair (no Gram-matrix tricks, no masking), so
//! that it is an independent check of the graph that `emit` builds. Tests and `verify` use it.

use crate::config::{Config, Dispersion, Reduce, Variant, DIST_EPS, NORM_EPS};
use ndarray::{Array2, ArrayD, Axis, Ix2};

/// Every value the rewritten graph exposes, computed directly.
#[derive(Debug, Clone)]
pub struct Terms {
    pub loss: f64,
    pub dispersion: f64,
    pub dispersion_per_modality: Vec<f64>,
    pub anchoring: f64,
    /// `dL_DAGR/dz` for each (reduced, `[B, D]`) encoder output.
    pub grads: Vec<Array2<f64>>,
    /// The L2-normalized embeddings.
    pub embeddings: Vec<Array2<f64>>,
}

/// Reduce an encoder output to `[B, D']` as the spec's `--reduce` says.
pub fn reduce(z: &ArrayD<f64>, how: Reduce) -> Array2<f64> {
    let b = z.shape()[0];
    match (z.ndim(), how) {
        (2, _) => z.clone().into_dimensionality::<Ix2>().expect("rank 2"),
        (_, Reduce::Flatten) => {
            let rest: usize = z.shape()[1..].iter().product();
            z.as_standard_layout()
                .into_owned()
                .into_shape_with_order((b, rest))
                .expect("flatten")
        }
        (r, Reduce::Mean) => {
            let mut m = z.clone();
            for ax in (1..r - 1).rev() {
                m = m.mean_axis(Axis(ax)).expect("non-empty axis");
            }
            m.into_dimensionality::<Ix2>().expect("rank 2 after mean")
        }
    }
}

/// Undo `reduce` for a gradient: the adjoint of flatten or of the mean.
pub fn reduce_backward(g: &Array2<f64>, shape: &[usize], how: Reduce) -> ArrayD<f64> {
    match (shape.len(), how) {
        (2, _) | (_, Reduce::Flatten) => g
            .clone()
            .into_shape_with_order(shape.to_vec())
            .expect("same size")
            .into_dyn(),
        (r, Reduce::Mean) => {
            let count: usize = shape[1..r - 1].iter().product();
            let mut out = ArrayD::<f64>::zeros(shape.to_vec());
            for (idx, v) in out.indexed_iter_mut() {
                *v = g[[idx[0], idx[r - 1]]] / count as f64;
            }
            out
        }
    }
}

fn row_norm(r: ndarray::ArrayView1<f64>) -> f64 {
    r.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn normalize(z: &Array2<f64>) -> (Array2<f64>, Vec<f64>) {
    let mut u = z.clone();
    let mut norms = Vec::with_capacity(z.nrows());
    for mut row in u.rows_mut() {
        let n = row_norm(row.view());
        norms.push(n);
        let d = n.max(NORM_EPS);
        row.mapv_inplace(|v| v / d);
    }
    (u, norms)
}

fn normalize_backward(g: &Array2<f64>, u: &Array2<f64>, norms: &[f64]) -> Array2<f64> {
    let mut out = g.clone();
    for i in 0..g.nrows() {
        let n = norms[i];
        if n > NORM_EPS {
            let dot: f64 = g.row(i).dot(&u.row(i));
            for k in 0..g.ncols() {
                out[[i, k]] = (g[[i, k]] - u[[i, k]] * dot) / n;
            }
        } else {
            for k in 0..g.ncols() {
                out[[i, k]] = g[[i, k]] / NORM_EPS;
            }
        }
    }
    out
}

fn sqdist(u: &Array2<f64>, i: usize, j: usize, v: &Array2<f64>) -> f64 {
    u.row(i)
        .iter()
        .zip(v.row(j).iter())
        .map(|(a, b)| (a - b) * (a - b))
        .sum()
}

/// Dispersion of one modality and its gradient with respect to `u`.
fn dispersion(u: &Array2<f64>, kind: Dispersion, tau: f64) -> (f64, Array2<f64>) {
    let b = u.nrows();
    let mut g = Array2::<f64>::zeros(u.raw_dim());
    if b < 2 {
        return (0.0, g);
    }
    let pairs: Vec<(usize, usize)> = (0..b).flat_map(|i| (i + 1..b).map(move |j| (i, j))).collect();
    let p = pairs.len() as f64;
    match kind {
        Dispersion::Rbf => {
            let s: Vec<f64> = pairs.iter().map(|&(i, j)| -sqdist(u, i, j, u) / tau).collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
            let sum: f64 = e.iter().sum();
            let loss = mx + (sum / p).ln();
            for (k, &(i, j)) in pairs.iter().enumerate() {
                let w = e[k] / sum;
                for c in 0..u.ncols() {
                    let d = u[[i, c]] - u[[j, c]];
                    g[[i, c]] += w * (-2.0 * d / tau);
                    g[[j, c]] += w * (2.0 * d / tau);
                }
            }
            (loss, g)
        }
        Dispersion::Hinge { margin } => {
            let r = margin;
            let mut loss = 0.0;
            for &(i, j) in &pairs {
                let d = (sqdist(u, i, j, u) + DIST_EPS).sqrt();
                let h = (r - d).max(0.0);
                loss += h * h / p;
                if h > 0.0 {
                    for c in 0..u.ncols() {
                        let dd = (u[[i, c]] - u[[j, c]]) / d;
                        g[[i, c]] += -2.0 * h * dd / p;
                        g[[j, c]] += 2.0 * h * dd / p;
                    }
                }
            }
            (loss, g)
        }
    }
}

/// Cross-modal term of one modality pair and its gradients with respect to `ua` and `ub`.
fn anchoring(ua: &Array2<f64>, ub: &Array2<f64>, delta: f64, naive: bool) -> (f64, Array2<f64>, Array2<f64>) {
    let b = ua.nrows();
    let mut ga = Array2::<f64>::zeros(ua.raw_dim());
    let mut loss = 0.0;
    for i in 0..b {
        let sq = sqdist(ua, i, i, ub);
        if naive {
            loss += sq / b as f64;
            for c in 0..ua.ncols() {
                ga[[i, c]] = 2.0 * (ua[[i, c]] - ub[[i, c]]) / b as f64;
            }
        } else {
            let d = (sq + DIST_EPS).sqrt();
            loss += (d - delta).max(0.0) / b as f64;
            if d > delta {
                for c in 0..ua.ncols() {
                    ga[[i, c]] = (ua[[i, c]] - ub[[i, c]]) / d / b as f64;
                }
            }
        }
    }
    let gb = -&ga;
    (loss, ga, gb)
}

/// DAGR on reduced encoder outputs `z[m]` (`[B, D]` each).
pub fn compute(z: &[Array2<f64>], cfg: &Config) -> Terms {
    let m = z.len();
    let normed: Vec<(Array2<f64>, Vec<f64>)> = z.iter().map(normalize).collect();
    let mut gu: Vec<Array2<f64>> = z.iter().map(|x| Array2::zeros(x.raw_dim())).collect();

    let mut per = Vec::with_capacity(m);
    let wd = if cfg.variant.uses_dispersion() {
        cfg.lambda_disp
    } else {
        0.0
    };
    for (k, (u, _)) in normed.iter().enumerate() {
        let (l, g) = dispersion(u, cfg.dispersion, cfg.tau);
        per.push(l);
        gu[k] = &gu[k] + &(g * (wd / m as f64));
    }
    let disp = per.iter().sum::<f64>() / m as f64;

    let naive = cfg.variant == Variant::NaiveAlign;
    let wa = if cfg.variant.uses_anchoring() {
        cfg.lambda_anc
    } else {
        0.0
    };
    let pairs: Vec<(usize, usize)> = (0..m).flat_map(|a| (a + 1..m).map(move |b| (a, b))).collect();
    let mut anc = 0.0;
    for &(a, b) in &pairs {
        let (l, ga, gb) = anchoring(&normed[a].0, &normed[b].0, cfg.delta, naive);
        anc += l / pairs.len() as f64;
        let s = wa / pairs.len() as f64;
        gu[a] = &gu[a] + &(ga * s);
        gu[b] = &gu[b] + &(gb * s);
    }
    let grads = gu
        .iter()
        .zip(&normed)
        .map(|(g, (u, n))| normalize_backward(g, u, n))
        .collect();
    Terms {
        loss: wd * disp + wa * anc,
        dispersion: disp,
        dispersion_per_modality: per,
        anchoring: anc,
        grads,
        embeddings: normed.into_iter().map(|(u, _)| u).collect(),
    }
}
