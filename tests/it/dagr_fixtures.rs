//! DAGR losses and `dagr/grad/*` against PyTorch autograd (fixtures/generate.py), on tract and
//! ONNX Runtime, and the Rust reference implementation against the same fixtures.

use crate::common::*;
use dagr_inject::dagr::reference;
use dagr_inject::runtime::{Tensors, Value};
use ndarray::{ArrayD, Ix2};

const RTOL: f64 = 1e-5;

fn scalar(f: &std::collections::BTreeMap<String, ArrayD<f64>>, key: &str) -> f64 {
    f[key].iter().next().copied().unwrap()
}

fn close(got: f64, want: f64, what: &str) {
    let err = (got - want).abs();
    assert!(
        err <= RTOL * want.abs().max(1e-3),
        "{what}: got {got}, want {want} (error {err:e})"
    );
}

#[test]
fn graph_matches_pytorch_on_both_backends() {
    let fx = fixture_f64();
    let dir = tempfile::tempdir().unwrap();
    let mut checks = OnnxChecks::default();
    for (k, case) in cases().iter().enumerate() {
        let (path, _, done) = block_for(case, dir.path());
        checks.add(&path);
        let mut feed = Tensors::new();
        for (m, n) in case.names().iter().enumerate() {
            let z = fx[&format!("{k}/z{m}")].mapv(|v| v as f32);
            feed.insert(n.clone(), Value::F32(z));
        }
        let o = &done.record.outputs;
        let mut want: Vec<String> = vec![o.loss.clone(), o.dispersion.clone(), o.anchoring.clone().unwrap()];
        want.extend(o.grads.iter().map(|g| g.1.clone()));
        want.extend(o.dispersion_per_modality.iter().map(|g| g.1.clone()));
        for backend in BACKENDS {
            let out = run(backend, &path, &feed, &want);
            let tag = format!("case {} ({}) on {}", k, case.name, backend.name());
            let s = |n: &str| f32_of(&out, n).iter().next().copied().unwrap() as f64;
            close(s(&o.loss), scalar(&fx, &format!("{k}/loss")), &format!("{tag}: loss"));
            close(
                s(&o.dispersion),
                scalar(&fx, &format!("{k}/dispersion")),
                &format!("{tag}: dispersion"),
            );
            close(
                s(o.anchoring.as_ref().unwrap()),
                scalar(&fx, &format!("{k}/anchoring")),
                &format!("{tag}: anchoring"),
            );
            for (m, (_, name)) in o.dispersion_per_modality.iter().enumerate() {
                close(
                    s(name),
                    scalar(&fx, &format!("{k}/dispersion{m}")),
                    &format!("{tag}: dispersion{m}"),
                );
            }
            for (m, (_, name)) in o.grads.iter().enumerate() {
                let g = f32_of(&out, name);
                let r = &fx[&format!("{k}/grad{m}")];
                let e = rel_err(&g, r, 1e-6);
                assert!(e <= RTOL, "{tag}: grad{m} relative error {e:e}");
            }
        }
    }
}

#[test]
fn reference_matches_pytorch() {
    let fx = fixture_f64();
    for (k, case) in cases().iter().enumerate() {
        let cfg = case.config(case.names());
        let zs: Vec<ArrayD<f64>> = (0..case.shapes.len())
            .map(|m| fx[&format!("{k}/z{m}")].clone())
            .collect();
        let reduced: Vec<_> = zs.iter().map(|z| reference::reduce(z, cfg.reduce)).collect();
        let t = reference::compute(&reduced, &cfg);
        let tag = format!("case {k} ({})", case.name);
        // Both sides compute in f64 from the same f32 inputs.
        let tight = |got: f64, want: f64, what: &str| {
            assert!(
                (got - want).abs() <= 1e-10 * want.abs().max(1e-3),
                "{tag}: {what}: {got} vs {want}"
            );
        };
        tight(t.loss, scalar(&fx, &format!("{k}/loss")), "loss");
        tight(t.dispersion, scalar(&fx, &format!("{k}/dispersion")), "dispersion");
        tight(t.anchoring, scalar(&fx, &format!("{k}/anchoring")), "anchoring");
        for (m, g) in t.grads.iter().enumerate() {
            let full = reference::reduce_backward(g, zs[m].shape(), cfg.reduce);
            let want = &fx[&format!("{k}/grad{m}")];
            let err = max_abs_diff(&full, want);
            let scale = want.iter().fold(1e-12f64, |a, v| a.max(v.abs()));
            assert!(err / scale < 1e-9, "{tag}: grad{m} relative error {}", err / scale);
            let _ = g.clone().into_dimensionality::<Ix2>().unwrap();
        }
    }
}
