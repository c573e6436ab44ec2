//! `dagr-inject diagnose`: the geometry diagnostics of the spec (section 8) on a model's
//! normalized embeddings, robustness to missing or noisy modalities, and SVG pictures.

use dagr_core::geometry::{accuracy, geometry, Modality, Pair};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{self as onnx, GraphIndex, Model};
use dagr_runtime::data::{Dataset, Rng};
use dagr_runtime::{Backend, Tensors, Value};
use dagr_train::eval::{run_all, stack};
use ndarray::{Array1, Array2, Axis};
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
    let idx = GraphIndex::new(&model)?;
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

    /// Accuracy of each head as one modality goes missing (p) or noisy (sigma): one panel per
    /// head and kind of corruption, one line per modality, the clean accuracy at 0.
    pub fn robustness_svg(&self) -> String {
        let (w, h) = (360.0, 200.0);
        let palette = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f"];
        let mut panels = Vec::new();
        for (head, rows) in &self.robustness {
            let clean = rows.iter().find(|r| r.0 == "clean").map(|r| r.1).unwrap_or(0.0);
            for (kind, key) in [("missing", " missing p="), ("noise", " noise sigma=")] {
                // modality -> [(strength, accuracy)]
                let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
                for (cond, acc) in rows {
                    if let Some((m, v)) = cond.split_once(key) {
                        let e = lines.entry(m.to_string()).or_insert_with(|| vec![(0.0, clean)]);
                        e.push((v.parse().unwrap_or(0.0), *acc));
                    }
                }
                if !lines.is_empty() {
                    panels.push((format!("{head}: {kind}"), lines));
                }
            }
        }
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
            2.0 * w,
            h * panels.len().div_ceil(2).max(1) as f64
        );
        for (i, (title, lines)) in panels.iter().enumerate() {
            let (x0, y0) = ((i % 2) as f64 * w, (i / 2) as f64 * h);
            let xmax = lines.values().flatten().fold(1e-9f64, |m, p| m.max(p.0));
            let sx = |v: f64| x0 + 40.0 + v / xmax * (w - 60.0);
            let sy = |a: f64| y0 + h - 30.0 - a * (h - 60.0);
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\">{title} (accuracy 0..1)</text>",
                x0 + 40.0,
                y0 + 15.0
            );
            for (k, (m, pts)) in lines.iter().enumerate() {
                let color = palette[k % palette.len()];
                let path: Vec<String> = pts.iter().map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1))).collect();
                let _ = writeln!(
                    svg,
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
                    path.join(" ")
                );
                let _ = writeln!(
                    svg,
                    "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{m}</text>",
                    x0 + w - 90.0,
                    y0 + 30.0 + 14.0 * k as f64
                );
            }
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\">0 .. {xmax}</text>",
                x0 + w / 2.0 - 20.0,
                y0 + h - 10.0
            );
        }
        svg.push_str("</svg>\n");
        svg
    }

    /// Histograms of positive and negative cross-modal cosine similarity, one panel per pair.
    pub fn similarity_svg(&self) -> String {
        let (w, h) = (560.0, 260.0);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
            w,
            h * self.pairs.len().max(1) as f64
        );
        for (k, p) in self.pairs.iter().enumerate() {
            let y0 = k as f64 * h;
            let bins = 40;
            let hist = |v: &[f64]| {
                let mut c = vec![0f64; bins];
                for x in v {
                    let b = (((x + 1.0) / 2.0) * bins as f64).clamp(0.0, bins as f64 - 1.0) as usize;
                    c[b] += 1.0;
                }
                c
            };
            let (hp, hn) = (hist(&p.positives), hist(&p.negatives));
            let top = hp.iter().chain(&hn).cloned().fold(1.0, f64::max);
            let _ = writeln!(svg, "<text x=\"10\" y=\"{}\">{}-{}: positive (blue) vs negative (orange) cosine similarity; gap {:.3}, KS {:.3}</text>", y0 + 15.0, p.a, p.b, p.gap, p.ks);
            for (hist, color) in [(&hn, "#f28e2b"), (&hp, "#4e79a7")] {
                for (i, c) in hist.iter().enumerate() {
                    let bh = c / top * (h - 60.0);
                    let x = 30.0 + i as f64 * (w - 40.0) / bins as f64;
                    let _ = writeln!(
                        svg,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{color}\" fill-opacity=\"0.6\"/>",
                        y0 + h - 30.0 - bh,
                        (w - 40.0) / bins as f64
                    );
                }
            }
            let _ = writeln!(
                svg,
                "<text x=\"25\" y=\"{}\">-1</text><text x=\"{}\" y=\"{}\">0</text><text x=\"{}\" y=\"{}\">1</text>",
                y0 + h - 15.0,
                w / 2.0,
                y0 + h - 15.0,
                w - 20.0,
                y0 + h - 15.0
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// A 2-D PCA scatter of embeddings coloured by class (power iteration for the top two axes).
pub fn pca_svg(name: &str, u: &Array2<f64>, y: &[i64]) -> String {
    let Some(mean) = u.mean_axis(Axis(0)) else {
        return String::new();
    };
    let c = u - &mean;
    let cov = c.t().dot(&c);
    let mut axes: Vec<Array1<f64>> = Vec::new();
    for k in 0..2 {
        let mut v = Array1::from_iter((0..cov.nrows()).map(|i| ((i * 7 + k * 3) % 11) as f64 + 1.0));
        for _ in 0..200 {
            let mut w = cov.dot(&v);
            for a in &axes {
                let p = w.dot(a);
                w = w - a * p;
            }
            let n = w.dot(&w).sqrt().max(1e-12);
            v = w / n;
        }
        axes.push(v);
    }
    let pts: Vec<(f64, f64)> = c.outer_iter().map(|r| (r.dot(&axes[0]), r.dot(&axes[1]))).collect();
    let mx = pts.iter().fold(1e-9f64, |m, p| m.max(p.0.abs()).max(p.1.abs()));
    let palette = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
    ];
    let mut svg = String::from("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"420\" font-family=\"sans-serif\" font-size=\"11\">\n");
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"15\">{name}: PCA of the normalized embeddings, coloured by class</text>"
    );
    for (p, cls) in pts.iter().zip(y) {
        let _ = writeln!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{}\"/>",
            200.0 + p.0 / mx * 185.0,
            220.0 - p.1 / mx * 185.0,
            palette[cls.rem_euclid(10) as usize]
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Render an SVG picture to PNG (system fonts for the labels, white background).
pub fn svg_to_png(svg: &str) -> Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    let bad = |e: String| Error::Internal(format!("cannot render a picture: {e}"));
    let mut opt = usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    // "sans-serif" maps to Arial by default; use whatever sans face the system has.
    let family = opt
        .fontdb
        .faces()
        .flat_map(|f| f.families.iter().map(|(n, _)| n.clone()))
        .find(|n| n.contains("Sans") && !n.contains("Mono"))
        .or_else(|| {
            opt.fontdb
                .faces()
                .next()
                .and_then(|f| f.families.first().map(|(n, _)| n.clone()))
        });
    if let Some(f) = family {
        opt.fontdb_mut().set_sans_serif_family(f.clone());
        opt.font_family = f;
    }
    let tree = usvg::Tree::from_str(svg, &opt).map_err(|e| bad(e.to_string()))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).ok_or_else(|| bad("empty picture".into()))?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| bad(e.to_string()))
}

/// Write `name.svg` and `name.png` into `out`.
pub fn write_picture(out: &Path, name: &str, svg: &str) -> Result<()> {
    onnx::io::write_atomic(&out.join(format!("{name}.svg")), svg.as_bytes())?;
    onnx::io::write_atomic(&out.join(format!("{name}.png")), &svg_to_png(svg)?)
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
    write_picture(out, "similarity", &r.similarity_svg())?;
    if !r.robustness.is_empty() {
        write_picture(out, "robustness", &r.robustness_svg())?;
    }
    if let Some(y) = y {
        for (m, u) in &embeddings {
            write_picture(out, &format!("pca_{}", m.replace('/', "_")), &pca_svg(m, u, &y))?;
        }
    }
    Ok(r)
}

/// Curves over epochs of every numeric series in `train`'s log.jsonl (losses, geometry,
/// validation accuracy), one panel per series.
pub fn curves_svg(log: &str) -> String {
    let rows: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    fn walk(prefix: &str, v: &serde_json::Value, epoch: f64, out: &mut BTreeMap<String, Vec<(f64, f64)>>) {
        match v {
            serde_json::Value::Number(n) => {
                if let Some(x) = n.as_f64() {
                    out.entry(prefix.to_string()).or_default().push((epoch, x));
                }
            }
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, epoch, out);
                }
            }
            _ => {}
        }
    }
    for r in &rows {
        let e = r["epoch"].as_f64().unwrap_or(0.0);
        walk("", r, e, &mut series);
    }
    series.retain(|k, _| !matches!(k.as_str(), "epoch" | "step" | "samples_per_second"));
    let (w, h) = (360.0, 160.0);
    let cols = 2usize;
    let n = series.len().max(1);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        w * cols as f64,
        h * n.div_ceil(cols) as f64
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let (x0, y0) = ((i % cols) as f64 * w, (i / cols) as f64 * h);
        let (emin, emax) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
        let (vmin, vmax) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
        let sx = |e: f64| x0 + 40.0 + (e - emin) / (emax - emin).max(1e-12) * (w - 60.0);
        let sy = |v: f64| y0 + h - 25.0 - (v - vmin) / (vmax - vmin).max(1e-12) * (h - 50.0);
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\">{name} ({vmin:.4} .. {vmax:.4})</text>",
            x0 + 40.0,
            y0 + 15.0
        );
        let path: Vec<String> = pts.iter().map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1))).collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"#4e79a7\" stroke-width=\"1.5\" points=\"{}\"/>",
            path.join(" ")
        );
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\">epoch</text>", x0 + w / 2.0, y0 + h - 8.0);
    }
    svg.push_str("</svg>\n");
    svg
}
