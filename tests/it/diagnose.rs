//! Geometry diagnostics on hand-computed cases, and `diagnose` end to end.

use crate::common::*;
use assert_cmd::Command;
use dagr_inject::dagr::geometry::{effective_rank, ks_distance, pair, semantic_margin};
use dagr_inject::plots;
use dagr_inject::runtime::data::Rng;
use ndarray::{array, Array2};

#[test]
fn effective_rank_of_known_spectra() {
    // One-hot rows over D classes, balanced: covariance (1/D) I - (1/D^2) 11^T has D-1 equal
    // non-zero eigenvalues, so the effective rank is D - 1.
    let d = 5;
    let u = Array2::from_shape_fn((4 * d, d), |(i, j)| if i % d == j { 1.0 } else { 0.0 });
    assert!((effective_rank(&u) - (d as f64 - 1.0)).abs() < 1e-9);
    // Collapsed embeddings: rank 0 (no variance); a line: rank 1.
    let same = Array2::from_elem((6, 3), 0.5);
    assert_eq!(effective_rank(&same), 0.0);
    let line = Array2::from_shape_fn((6, 3), |(i, j)| if j == 0 { i as f64 } else { 0.0 });
    assert!((effective_rank(&line) - 1.0).abs() < 1e-12);
}

#[test]
fn ks_margin_and_retrieval() {
    assert_eq!(ks_distance(&[0.1, 0.2, 0.3], &[0.1, 0.2, 0.3]), 0.0);
    assert_eq!(ks_distance(&[0.1, 0.2], &[0.5, 0.9]), 1.0);
    assert!((ks_distance(&[1.0, 2.0, 3.0, 4.0], &[3.5, 4.5, 5.5, 6.5]) - 0.75).abs() < 1e-12);
    // Two classes at distance 2 apart, samples of a class 0.5 apart.
    let u = array![[0.0, 0.0], [0.5, 0.0], [2.0, 0.0], [2.5, 0.0]];
    let m = semantic_margin(&u, &[0, 0, 1, 1]).unwrap();
    // inter: |0-2|, |0-2.5|, |0.5-2|, |0.5-2.5| -> mean 2; intra: 0.5
    assert!((m - 1.5).abs() < 1e-12, "{m}");
    // Identical modalities: no drift, perfect retrieval, gap between positives (1) and negatives.
    let a = array![[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]];
    let p = pair("a", &a, "b", &a, &mut Rng(3));
    assert_eq!(p.drift, 0.0);
    assert_eq!(p.recall, [1.0, 1.0, 1.0]);
    assert!((p.positive_mean - 1.0).abs() < 1e-12 && p.negative_mean < 0.5 && p.ks == 1.0);
}

#[test]
fn diagnose_writes_the_report_and_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let model = root().join("models/av_mlp.legacy.onnx");
    let data = root().join("fixtures/optim_data_av_mlp.npz");
    Command::cargo_bin("dagr-inject")
        .unwrap()
        .args([
            "diagnose",
            model.to_str().unwrap(),
            "--encoders",
            "audio,visual",
            "--data",
            data.to_str().unwrap(),
        ])
        .args(["--labels", "label", "--heads", "logits", "--out", out.to_str().unwrap()])
        .assert()
        .success();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["samples"], 24);
    let erank = r["modalities"][0]["effective_rank"].as_f64().unwrap();
    assert!(erank > 1.0 && erank <= 32.0);
    assert_eq!(r["pairs"][0]["recall"].as_array().unwrap().len(), 3);
    let rows = r["robustness"]["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 1 + 2 * 6, "clean + (3 missing + 3 noise) per modality");
    for f in [
        "report.txt",
        "similarity.svg",
        "pca_audio.svg",
        "pca_visual.svg",
        "robustness.svg",
    ] {
        let s = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(!s.is_empty(), "{f}");
    }
    assert!(
        std::fs::read_to_string(out.join("pca_audio.svg"))
            .unwrap()
            .matches("<circle")
            .count()
            >= 24,
        "a point per sample (and a legend mark per class)"
    );
}

#[test]
fn names_are_escaped_and_every_picture_renders() {
    // A series name with XML's special characters must not break the SVG.
    let log = "{\"epoch\":1,\"loss\":2.0,\"a<b&c\":1.0}\n{\"epoch\":2,\"loss\":1.5,\"a<b&c\":0.5}\n";
    let svg = plots::curves(log).unwrap();
    assert!(svg.contains("a&lt;b&amp;c"), "{svg}");
    assert!(svg.matches("<polyline").count() >= 2);
    assert!(!plots::svg_to_png(&svg).unwrap().is_empty());
    // A constant series still gets a range; an empty log an empty picture that renders.
    assert!(
        !plots::svg_to_png(&plots::curves("{\"epoch\":1,\"loss\":1.0}\n").unwrap())
            .unwrap()
            .is_empty()
    );
    assert!(!plots::svg_to_png(&plots::curves("").unwrap()).unwrap().is_empty());
    let u = ndarray::array![[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]];
    let svg = plots::pca("a&b", &u, &[0, 1, 1, 0]).unwrap();
    assert_eq!(svg.matches("<circle").count(), 4 + 2, "4 points and 2 legend marks");
    assert!(svg.contains("a&amp;b"));
}
