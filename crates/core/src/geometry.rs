//! The geometry of DAGR's normalized embeddings (spec section 8): effective rank and semantic
//! margin per modality; drift, similarity gap, KS distance and Recall@K per pair; and the
//! argmax that turns logits into predictions.

use dagr_onnx::rng::Rng;
use ndarray::{s, Array2, Axis};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Modality {
    pub name: String,
    pub effective_rank: f64,
    pub dim: usize,
    pub semantic_margin: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub a: String,
    pub b: String,
    pub drift: f64,
    pub positive_mean: f64,
    pub negative_mean: f64,
    pub gap: f64,
    pub ks: f64,
    /// Recall@1, 5, 10 retrieving b from a.
    pub recall: [f64; 3],
    #[serde(skip)]
    pub positives: Vec<f64>,
    #[serde(skip)]
    pub negatives: Vec<f64>,
}

/// `(tr S)^2 / tr(S^2)` of the covariance of the rows of `u`.
pub fn effective_rank(u: &Array2<f64>) -> f64 {
    let n = u.nrows().max(1) as f64;
    let Some(mean) = u.mean_axis(Axis(0)) else {
        return 0.0;
    };
    let c = u - &mean;
    let s = c.t().dot(&c) / n;
    let tr: f64 = s.diag().sum();
    let tr2: f64 = s.iter().map(|v| v * v).sum();
    if tr2 > 0.0 {
        tr * tr / tr2
    } else {
        0.0
    }
}

/// Mean inter-class distance minus mean intra-class distance.
pub fn semantic_margin(u: &Array2<f64>, y: &[i64]) -> Option<f64> {
    let (mut intra, mut ni, mut inter, mut ne) = (0.0, 0usize, 0.0, 0usize);
    for i in 0..u.nrows() {
        for j in i + 1..u.nrows() {
            let d = (&u.row(i) - &u.row(j)).mapv(|v| v * v).sum().sqrt();
            if y[i] == y[j] {
                intra += d;
                ni += 1;
            } else {
                inter += d;
                ne += 1;
            }
        }
    }
    (ni > 0 && ne > 0).then(|| inter / ne as f64 - intra / ni as f64)
}

/// Kolmogorov-Smirnov distance between two samples.
pub fn ks_distance(a: &[f64], b: &[f64]) -> f64 {
    // Non-finite values have no place in a distribution of similarities (and would stall the
    // walk below).
    let mut a: Vec<f64> = a.iter().copied().filter(|v| v.is_finite()).collect();
    let mut b: Vec<f64> = b.iter().copied().filter(|v| v.is_finite()).collect();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0, 0, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

fn cos(a: ndarray::ArrayView1<f64>, b: ndarray::ArrayView1<f64>) -> f64 {
    let na = a.dot(&a).sqrt().max(1e-12);
    let nb = b.dot(&b).sqrt().max(1e-12);
    a.dot(&b) / (na * nb)
}

pub fn pair(a: &str, ua: &Array2<f64>, b: &str, ub: &Array2<f64>, rng: &mut Rng) -> Pair {
    let n = ua.nrows();
    let drift = (0..n)
        .map(|i| (&ua.row(i) - &ub.row(i)).mapv(|v| v * v).sum().sqrt())
        .sum::<f64>()
        / n.max(1) as f64;
    let positives: Vec<f64> = (0..n).map(|i| cos(ua.row(i), ub.row(i))).collect();
    // negatives: a random derangement (sample i against sample pi(i) != i)
    let perm = rng.permutation(n);
    let negatives: Vec<f64> = (0..n)
        .map(|i| {
            let j = if perm[i] == i { (i + 1) % n } else { perm[i] };
            cos(ua.row(i), ub.row(j))
        })
        .collect();
    let pm = positives.iter().sum::<f64>() / n.max(1) as f64;
    let nm = negatives.iter().sum::<f64>() / n.max(1) as f64;
    let sims = ua.dot(&ub.t());
    let mut hits = [0usize; 3];
    for i in 0..n {
        let own = sims[[i, i]];
        let rank = sims.row(i).iter().filter(|&&v| v > own).count();
        for (h, k) in hits.iter_mut().zip([1, 5, 10]) {
            if rank < k {
                *h += 1;
            }
        }
    }
    Pair {
        a: a.into(),
        b: b.into(),
        drift,
        positive_mean: pm,
        negative_mean: nm,
        gap: pm - nm,
        ks: ks_distance(&positives, &negatives),
        recall: hits.map(|h| h as f64 / n.max(1) as f64),
        positives,
        negatives,
    }
}

/// The index of the largest value (the first on ties; NaN never wins): a predicted class.
pub fn argmax<'a, T: PartialOrd + Copy + 'a>(row: impl IntoIterator<Item = &'a T>) -> usize {
    let mut best: Option<(usize, T)> = None;
    for (k, &v) in row.into_iter().enumerate() {
        let comparable = v.partial_cmp(&v).is_some(); // not NaN
        if comparable && best.is_none_or(|(_, b)| v > b) {
            best = Some((k, v));
        }
    }
    best.map_or(0, |(k, _)| k)
}

/// The fraction of rows whose argmax is the label.
pub fn accuracy(logits: &Array2<f64>, y: &[i64]) -> f64 {
    let mut c = 0;
    for (i, row) in logits.outer_iter().enumerate() {
        if argmax(row) as i64 == y[i] {
            c += 1;
        }
    }
    c as f64 / y.len().max(1) as f64
}

/// Per-modality and per-pair geometry of normalized embeddings `us` (named by `emb`).
pub fn geometry(emb: &[(String, String)], us: &[Array2<f64>], y: Option<&[i64]>) -> (Vec<Modality>, Vec<Pair>) {
    let modalities = emb
        .iter()
        .zip(us)
        .map(|((m, _), u)| Modality {
            name: m.clone(),
            effective_rank: effective_rank(u),
            dim: u.ncols(),
            // O(N^2) pairs: the first 2,000 samples are plenty for a mean distance.
            semantic_margin: y.and_then(|y| semantic_margin(&u.slice(s![..u.nrows().min(2000), ..]).to_owned(), y)),
        })
        .collect();
    let mut rng = Rng(0);
    let mut pairs = Vec::new();
    for a in 0..emb.len() {
        for b in a + 1..emb.len() {
            if us[a].ncols() == us[b].ncols() {
                pairs.push(pair(&emb[a].0, &us[a], &emb[b].0, &us[b], &mut rng));
            }
        }
    }
    (modalities, pairs)
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_takes_the_first_largest_and_skips_nan() {
        assert_eq!(argmax(&[1.0f32, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f64::NAN, -1.0, f64::NAN, -0.5]), 3);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }
}
