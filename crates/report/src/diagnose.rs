//! `dagr-inject diagnose`: the geometry diagnostics of the spec (section 8) on a model's
//! normalized embeddings, robustness to missing or noisy modalities, and SVG pictures.

use crate::plots::{self, write_picture};
use dagr_core::geometry::{accuracy, geometry, Modality, Pair};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{self as onnx, GraphIndex, Model};
use dagr_runtime::data::{Dataset, Rng};
use dagr_runtime::{Backend, Tensors, Value};
use dagr_train::eval::{run_all, stack};
use ndarray::Array2;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub samples: usize,
    pub modalities: Vec<Modality>,
    pub pairs: Vec<Pair>,
    /// head -> (condition -> accuracy)
    pub robustness: BTreeMap<String, Vec<(String, f64)>>,
}

/// The graph inputs each encoder depends on (to drop or corrupt one modality).
fn modality_inputs(model: &Model, idx: &GraphIndex, encoders: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
    let users = idx.user_inputs();
    encoders
        .iter()
        .map(|(m, t)| {
            let seen = dagr_onnx::index::upstream(model, idx, std::slice::from_ref(t));
            (m.clone(), users.iter().filter(|u| seen.contains(*u)).cloned().collect())
        })
        .collect()
}

/// Diagnose `path` (a model rewritten by dagr-inject) on `data`.
pub fn diagnose(
    path: &Path,
    data_path: &Path,
    labels: Option<&str>,
    heads: &[String],
    backend: Backend,
) -> Result<Report> {
    Ok(analyse(path, data_path, labels, heads, backend)?.0)
}

type Embeddings = Vec<(String, Array2<f64>)>;

fn analyse(
    path: &Path,
    data_path: &Path,
    labels: Option<&str>,
    heads: &[String],
    backend: Backend,
) -> Result<(Report, Embeddings, Option<Vec<i64>>)> {
    let model = onnx::load(path)?;
    let rec = dagr_core::record_of(&model).ok_or_else(|| {
        Error::Config("diagnose needs a model rewritten by dagr-inject (it reads dagr/embedding/*)".into())
    })?;
    let idx = dagr_ops::index(&model)?;
    let mut inputs = idx.user_inputs();
    if let Some(l) = &rec.outputs.labels_input {
        inputs.retain(|i| i != l);
    }
    let data = Dataset::load_with(data_path, &idx, &inputs, None, labels.as_slice())?;
    let y: Option<Vec<i64>> = match labels {
        Some(l) => match data.arrays.get(l) {
            Some(Value::I64(a)) => Some(a.iter().copied().collect()),
            _ => {
                return Err(Error::Data(format!(
                    "{}: no int64 array '{l}' for `labels`",
                    data_path.display()
                )))
            }
        },
        None => None,
    };
    let emb: Vec<(String, String)> = rec.outputs.embeddings.clone();
    let mut outs: Vec<String> = emb.iter().map(|e| e.1.clone()).collect();
    outs.extend(heads.iter().cloned());
    let mut runners = BTreeMap::new();
    let base = run_all(&mut runners, backend, path, &data, &outs, &mut |_| {})?;
    let us: Vec<Array2<f64>> = emb.iter().map(|(_, o)| stack(&base[o])).collect();
    let (modalities, pairs) = geometry(&emb, &us, y.as_deref());
    // Robustness: one modality's inputs zeroed with probability p, or under Gaussian noise.
    let mut robustness = BTreeMap::new();
    if let (Some(y), false) = (&y, heads.is_empty()) {
        let owners = modality_inputs(&model, &idx, &rec.encoders);
        for h in heads {
            robustness.insert(h.clone(), vec![("clean".to_string(), accuracy(&stack(&base[h]), y))]);
        }
        for (m, ins) in &owners {
            for p in [0.25, 0.5, 1.0] {
                let mut r = Rng(1);
                let res = run_all(&mut runners, backend, path, &data, heads, &mut |b: &mut Tensors| {
                    let n = b.values().next().map(|v| v.shape()[0]).unwrap_or(0);
                    let drop: Vec<bool> = (0..n)
                        .map(|_| (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p)
                        .collect();
                    for i in ins {
                        if let Some(Value::F32(a)) = b.get_mut(i) {
                            for (k, mut row) in a.outer_iter_mut().enumerate() {
                                if drop[k] {
                                    row.fill(0.0);
                                }
                            }
                        }
                    }
                })?;
                for h in heads {
                    robustness
                        .entry(h.clone())
                        .or_default()
                        .push((format!("{m} missing p={p}"), accuracy(&stack(&res[h]), y)));
                }
            }
            for sigma in [0.5, 1.0, 2.0] {
                let mut r = Rng(2);
                let res = run_all(&mut runners, backend, path, &data, heads, &mut |b: &mut Tensors| {
                    for i in ins {
                        if let Some(Value::F32(a)) = b.get_mut(i) {
                            a.mapv_inplace(|v| {
                                // Box-Muller
                                let u1 = ((r.next_u64() >> 11) as f64 / (1u64 << 53) as f64).max(1e-12);
                                let u2 = (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                                v + (sigma * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                            });
                        }
                    }
                })?;
                for h in heads {
                    robustness
                        .entry(h.clone())
                        .or_default()
                        .push((format!("{m} noise sigma={sigma}"), accuracy(&stack(&res[h]), y)));
                }
            }
        }
    }
    let embeddings = emb.iter().map(|e| e.0.clone()).zip(us).collect();
    Ok((
        Report {
            samples: data.len,
            modalities,
            pairs,
            robustness,
        },
        embeddings,
        y,
    ))
}

impl Report {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{} samples", self.samples);
        let _ = writeln!(s, "{:<12} {:>8} {:>6} {:>10}", "modality", "erank", "dim", "margin");
        for m in &self.modalities {
            let margin = m
                .semantic_margin
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "{:<12} {:>8.2} {:>6} {:>10}",
                m.name, m.effective_rank, m.dim, margin
            );
        }
        let _ = writeln!(
            s,
            "\n{:<20} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6}",
            "pair", "drift", "pos", "neg", "gap", "KS", "R@1", "R@5", "R@10"
        );
        for p in &self.pairs {
            let _ = writeln!(
                s,
                "{:<20} {:>7.4} {:>7.4} {:>7.4} {:>7.4} {:>6.3} {:>6.3} {:>6.3} {:>6.3}",
                format!("{}-{}", p.a, p.b),
                p.drift,
                p.positive_mean,
                p.negative_mean,
                p.gap,
                p.ks,
                p.recall[0],
                p.recall[1],
                p.recall[2]
            );
        }
        for (h, rows) in &self.robustness {
            let _ = writeln!(s, "\naccuracy of {h}");
            for (c, a) in rows {
                let _ = writeln!(s, "  {c:<28} {a:.4}");
            }
        }
        s
    }
}

/// Diagnose and write `report.json`, `report.txt`, and the pictures (`similarity`,
/// `robustness`, `pca_<m>`) as SVG and PNG.
pub fn write_report(
    path: &Path,
    data: &Path,
    labels: Option<&str>,
    heads: &[String],
    backend: Backend,
    out: &Path,
) -> Result<Report> {
    let (r, embeddings, y) = analyse(path, data, labels, heads, backend)?;
    // None of the files written may be an input, through any path.
    let mut names: Vec<String> = ["report.json", "report.txt"].map(String::from).to_vec();
    for pic in ["similarity", "robustness", "curves"]
        .map(String::from)
        .into_iter()
        .chain(embeddings.iter().map(|(m, _)| format!("pca_{}", m.replace('/', "_"))))
    {
        names.push(format!("{pic}.svg"));
        names.push(format!("{pic}.png"));
    }
    for n in &names {
        onnx::io::refuse_overwrite(&out.join(n), &[path, data])?;
    }
    std::fs::create_dir_all(out).map_err(|source| Error::Write {
        path: out.to_path_buf(),
        source,
    })?;
    onnx::io::write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&r)
            .map_err(|e| Error::Internal(format!("report: {e}")))?
            .as_bytes(),
    )?;
    onnx::io::write_atomic(&out.join("report.txt"), r.to_text().as_bytes())?;
    write_picture(out, "similarity", &plots::similarity(&r)?)?;
    if !r.robustness.is_empty() {
        write_picture(out, "robustness", &plots::robustness(&r)?)?;
    }
    if let Some(y) = y {
        for (m, u) in &embeddings {
            write_picture(out, &format!("pca_{}", m.replace('/', "_")), &plots::pca(m, u, &y)?)?;
        }
    }
    Ok(r)
}
