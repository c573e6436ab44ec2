//! The pictures of `diagnose` and of a training run, drawn with `plotters` (SVG, with axes,
//! ticks and legends) and rendered to PNG with `resvg`.

use crate::diagnose::Report;
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{self as onnx};
use ndarray::{Array1, Array2, Axis};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

const FONT: (&str, u32) = ("sans-serif", 13);

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("cannot draw a picture: {e}"))
}

/// An SVG of `cols` columns of panels of `w x h` pixels, each drawn by `panel(i, area)`.
fn panels(
    n: usize,
    cols: usize,
    (w, h): (u32, u32),
    mut panel: impl FnMut(usize, &Area) -> Result<()>,
) -> Result<String> {
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols).max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w * cols as u32, h * rows as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        for (i, area) in root.split_evenly((rows, cols)).iter().enumerate().take(n) {
            panel(i, area)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The labels of the series drawn so far, in a framed box at `at`.
fn legend<'a: 'b, 'b>(chart: &mut Chart<'b, 'a>, at: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}

/// The range of `v` widened so that a constant series still has a height.
fn span(v: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = v.fold((f64::MAX, f64::MIN), |a, x| (a.0.min(x), a.1.max(x)));
    if lo > hi {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs().max(1e-12) * 1e-3);
    lo - pad..hi + pad
}

/// Accuracy of each head as one modality goes missing (p) or noisy (sigma): one panel per
/// head and kind of corruption, one line per modality, the clean accuracy at 0.
pub fn robustness(r: &Report) -> Result<String> {
    let mut list = Vec::new();
    for (head, rows) in &r.robustness {
        let clean = rows.iter().find(|r| r.0 == "clean").map(|r| r.1).unwrap_or(0.0);
        for (kind, key) in [
            ("missing modality, p", " missing p="),
            ("noisy modality, sigma", " noise sigma="),
        ] {
            // modality -> [(strength, accuracy)]
            let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for (cond, acc) in rows {
                if let Some((m, v)) = cond.split_once(key) {
                    let e = lines.entry(m.to_string()).or_insert_with(|| vec![(0.0, clean)]);
                    e.push((v.parse().unwrap_or(0.0), *acc));
                }
            }
            if !lines.is_empty() {
                list.push((head.clone(), kind, lines));
            }
        }
    }
    panels(list.len(), 2, (420, 260), |i, area| {
        let (head, kind, lines) = &list[i];
        let xmax = lines.values().flatten().fold(1e-9f64, |m, p| m.max(p.0));
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{head}: accuracy"), FONT)
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..xmax, 0f64..1f64)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(*kind)
            .y_desc("accuracy")
            .draw()
            .map_err(plot_err)?;
        for (k, (m, pts)) in lines.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(m.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        legend(&mut chart, SeriesLabelPosition::MiddleRight)
    })
}

/// Histograms of positive and negative cross-modal cosine similarity, one panel per pair.
pub fn similarity(r: &Report) -> Result<String> {
    const BINS: usize = 40;
    let hist = |v: &[f64]| {
        let mut c = vec![0f64; BINS];
        for x in v {
            let b = (((x + 1.0) / 2.0) * BINS as f64).clamp(0.0, BINS as f64 - 1.0) as usize;
            c[b] += 1.0;
        }
        c
    };
    panels(r.pairs.len(), 1, (620, 280), |i, area| {
        let p = &r.pairs[i];
        let (hp, hn) = (hist(&p.positives), hist(&p.negatives));
        let top = hp.iter().chain(&hn).cloned().fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{}-{}: cosine similarity (gap {:.3}, KS {:.3})", p.a, p.b, p.gap, p.ks),
                FONT,
            )
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(44)
            .build_cartesian_2d(-1f64..1f64, 0f64..top * 1.05)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("cosine similarity")
            .y_desc("pairs")
            .draw()
            .map_err(plot_err)?;
        let width = 2.0 / BINS as f64;
        for (h, label, color) in [
            (&hn, "negative pairs", RGBColor(242, 142, 43)),
            (&hp, "positive pairs", RGBColor(78, 121, 167)),
        ] {
            chart
                .draw_series(h.iter().enumerate().map(|(b, &c)| {
                    let x = -1.0 + b as f64 * width;
                    Rectangle::new([(x, 0.0), (x + width, c)], color.mix(0.6).filled())
                }))
                .map_err(plot_err)?
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.6).filled()));
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)
    })
}

/// The top two principal axes of the rows of `u` (power iteration with deflation).
fn principal_axes(c: &Array2<f64>) -> Vec<Array1<f64>> {
    let cov = c.t().dot(c);
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
    axes
}

/// A 2-D PCA scatter of embeddings coloured by class.
pub fn pca(name: &str, u: &Array2<f64>, y: &[i64]) -> Result<String> {
    let Some(mean) = u.mean_axis(Axis(0)) else {
        return panels(0, 1, (440, 440), |_, _| Ok(()));
    };
    let c = u - &mean;
    let axes = principal_axes(&c);
    let pts: Vec<(f64, f64)> = c.outer_iter().map(|r| (r.dot(&axes[0]), r.dot(&axes[1]))).collect();
    let mx = pts.iter().fold(1e-9f64, |m, p| m.max(p.0.abs()).max(p.1.abs())) * 1.05;
    panels(1, 1, (440, 440), |_, area| {
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{name}: PCA of the normalized embeddings"), FONT)
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(44)
            .build_cartesian_2d(-mx..mx, -mx..mx)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("first axis")
            .y_desc("second axis")
            .draw()
            .map_err(plot_err)?;
        let mut classes: Vec<i64> = y.to_vec();
        classes.sort_unstable();
        classes.dedup();
        for cls in classes {
            let color = Palette99::pick(cls.rem_euclid(99) as usize).to_rgba();
            chart
                .draw_series(
                    pts.iter()
                        .zip(y)
                        .filter(|(_, &c)| c == cls)
                        .map(|(p, _)| Circle::new(*p, 2, color.filled())),
                )
                .map_err(plot_err)?
                .label(format!("class {cls}"))
                .legend(move |(x, y)| Circle::new((x + 6, y), 3, color.filled()));
        }
        legend(&mut chart, SeriesLabelPosition::MiddleRight)
    })
}

/// Curves over epochs of every numeric series in `train`'s log.jsonl (losses, geometry,
/// validation accuracy), one panel per series.
pub fn curves(log: &str) -> Result<String> {
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
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let e = r["epoch"].as_f64().unwrap_or(0.0);
        walk("", &r, e, &mut series);
    }
    series.retain(|k, _| !matches!(k.as_str(), "epoch" | "step" | "samples_per_second"));
    let list: Vec<(&String, &Vec<(f64, f64)>)> = series.iter().collect();
    panels(list.len(), 2, (400, 220), |i, area| {
        let (name, pts) = list[i];
        let mut chart = ChartBuilder::on(area)
            .caption(name.as_str(), FONT)
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(span(pts.iter().map(|p| p.0)), span(pts.iter().map(|p| p.1)))
            .map_err(plot_err)?;
        chart.configure_mesh().x_desc("epoch").draw().map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                RGBColor(78, 121, 167).stroke_width(2),
            ))
            .map_err(plot_err)?;
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, RGBColor(78, 121, 167).filled())))
            .map_err(plot_err)?;
        Ok(())
    })
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
