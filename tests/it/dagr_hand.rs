//! The hand-computed case of the spec (section 9), on the Rust reference and on both backends.

use crate::common::*;
use dagr_inject::dagr::{self, reference, Config};
use dagr_inject::onnx;
use dagr_inject::runtime::{Tensors, Value};
use ndarray::{array, ArrayD};

fn spec_config(encoders: Vec<String>) -> Config {
    Config {
        encoders,
        tau: 0.5,
        delta: 0.5,
        lambda_disp: 1.0,
        lambda_anc: 1.0,
        ..Default::default()
    }
}

fn expected() -> (f64, f64, f64) {
    let e = |x: f64| x.exp();
    let audio = ((e(-4.0) + e(-8.0) + e(-4.0)) / 3.0).ln();
    // visual pairs: [1,0]-[1,0] -> 0, [1,0]-[0,-1] -> 2, twice
    let visual = ((e(0.0) + e(-4.0) + e(-4.0)) / 3.0).ln();
    let anc = (0.0 + 2.0 * (2f64.sqrt() - 0.5)) / 3.0;
    (audio, visual, anc)
}

#[test]
fn reference_reproduces_the_spec_values() {
    let a = array![[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]];
    let v = array![[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]];
    let t = reference::compute(&[a, v], &spec_config(vec!["a".into(), "v".into()]));
    let (da, dv, anc) = expected();
    assert!((t.dispersion_per_modality[0] - da).abs() < 1e-12);
    assert!((t.dispersion_per_modality[1] - dv).abs() < 1e-12);
    assert!((t.anchoring - anc).abs() < 1e-9, "{} vs {anc}", t.anchoring);
    assert!((t.loss - ((da + dv) / 2.0 + anc)).abs() < 1e-9);
    // Sample 0 is anchored within delta (distance 0): no anchoring gradient there; the audio
    // gradient of sample 0 then comes from dispersion alone and is tangent to the sphere.
    let g0 = t.grads[0].row(0);
    assert!((g0[0]).abs() < 1e-12, "radial component must vanish: {g0:?}");
}

#[test]
fn graph_reproduces_the_spec_values_on_both_backends() {
    let names = vec!["audio".to_string(), "visual".to_string()];
    let mut model = dagr::block::skeleton(&names, 2, 17).unwrap();
    let done = dagr::inject(
        &mut model,
        &spec_config(vec!["audio=audio/z".into(), "visual=visual/z".into()]),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spec.onnx");
    onnx::save(&model, &path).unwrap();
    let mut feed = Tensors::new();
    let a: ArrayD<f32> = array![[1.0f32, 0.0], [0.0, 1.0], [-1.0, 0.0]].into_dyn();
    let v: ArrayD<f32> = array![[1.0f32, 0.0], [1.0, 0.0], [0.0, -1.0]].into_dyn();
    feed.insert("audio".into(), Value::F32(a));
    feed.insert("visual".into(), Value::F32(v));
    let o = &done.record.outputs;
    let names: Vec<String> = vec![
        o.loss.clone(),
        o.anchoring.clone().unwrap(),
        o.dispersion_per_modality[0].1.clone(),
        o.dispersion_per_modality[1].1.clone(),
    ];
    let (da, dv, anc) = expected();
    for backend in BACKENDS {
        let out = run(backend, &path, &feed, &names);
        let s = |n: &str| f32_of(&out, n).iter().next().copied().unwrap() as f64;
        let b = backend.name();
        assert!(
            (s(&names[2]) - da).abs() < 1e-5 * da.abs(),
            "{b}: audio dispersion {} vs {da}",
            s(&names[2])
        );
        assert!((s(&names[3]) - dv).abs() < 1e-5 * dv.abs(), "{b}: visual dispersion");
        assert!(
            (s(&names[1]) - anc).abs() < 1e-5 * anc,
            "{b}: anchoring {} vs {anc}",
            s(&names[1])
        );
        let want = (da + dv) / 2.0 + anc;
        assert!((s(&names[0]) - want).abs() < 1e-5 * want.abs(), "{b}: loss");
    }
}

#[test]
fn the_block_is_correct_at_every_supported_opset() {
    // Opset 13 takes Squeeze/ReduceSum axes as inputs but ReduceMean/ReduceMax axes as
    // attributes; 18 makes every reduction take them as inputs.
    let dir = tempfile::tempdir().unwrap();
    let mut checks = OnnxChecks::default();
    let (da, dv, anc) = expected();
    let want = (da + dv) / 2.0 + anc;
    for opset in [13, 15, 17, 18, 21] {
        let names = vec!["audio".to_string(), "visual".to_string()];
        let mut model = dagr::block::skeleton(&names, 2, opset).unwrap();
        let done = dagr::inject(
            &mut model,
            &spec_config(vec!["audio=audio/z".into(), "visual=visual/z".into()]),
        )
        .unwrap();
        let path = dir.path().join(format!("opset{opset}.onnx"));
        onnx::save(&model, &path).unwrap();
        checks.add(&path);
        let mut feed = Tensors::new();
        feed.insert(
            "audio".into(),
            Value::F32(array![[1.0f32, 0.0], [0.0, 1.0], [-1.0, 0.0]].into_dyn()),
        );
        feed.insert(
            "visual".into(),
            Value::F32(array![[1.0f32, 0.0], [1.0, 0.0], [0.0, -1.0]].into_dyn()),
        );
        for backend in BACKENDS {
            let out = run(backend, &path, &feed, std::slice::from_ref(&done.record.outputs.loss));
            let got = f32_of(&out, &done.record.outputs.loss).iter().next().copied().unwrap() as f64;
            assert!(
                (got - want).abs() < 1e-5 * want.abs(),
                "opset {opset} on {}: {got} vs {want}",
                backend.name()
            );
        }
    }
}
