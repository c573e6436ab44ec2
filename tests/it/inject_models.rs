//! Injection into every exported model: the output passes onnx.checker, runs on tract and
//! ONNX Runtime, leaves the original outputs bit-identical, and its DAGR outputs equal the
//! reference computed from the model's own encoder outputs.

use crate::common::*;
use dagr_inject::dagr::{self, reference, Config, Task};
use dagr_inject::onnx::{self, Model};
use dagr_inject::runtime::{Backend, Tensors, Value};
use ndarray::{ArrayD, Axis, Ix2};
use std::path::Path;

fn encoders_for(model: &Path) -> Vec<String> {
    let name = model.file_name().unwrap().to_str().unwrap();
    if name.starts_with("tri_token") {
        vec!["audio".into(), "visual".into(), "text".into()]
    } else {
        vec!["audio".into(), "visual".into()]
    }
}

/// A copy of `model` whose graph also outputs `tensors` (to read the encoder outputs).
fn exposing(model: &Model, tensors: &[String], path: &Path) {
    let idx = dagr_inject::ops::index(model).unwrap();
    let mut m = model.clone();
    m.source = None;
    for t in tensors {
        let f = idx.fact(t).cloned().unwrap();
        m.graph_mut().output.push(f.to_value_info(t));
    }
    onnx::save(&m, path).unwrap();
}

fn slice_batch(inputs: &Tensors, n: usize) -> Tensors {
    inputs
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::F32(a) => Value::F32(a.slice_axis(Axis(0), (0..n).into()).to_owned()),
                Value::I64(a) => Value::I64(a.slice_axis(Axis(0), (0..n).into()).to_owned()),
                Value::Bool(a) => Value::Bool(a.slice_axis(Axis(0), (0..n).into()).to_owned()),
            };
            (k.clone(), v)
        })
        .collect()
}

#[test]
fn every_model_rewrites_runs_and_keeps_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut checks = OnnxChecks::default();
    for path in models() {
        let original = onnx::load(&path).unwrap();
        let orig_outputs: Vec<String> = original.graph().output.iter().map(|o| o.name.clone()).collect();
        let cfg = Config {
            encoders: encoders_for(&path),
            task: Task::CrossEntropy {
                logits: vec![orig_outputs[0].clone()],
                labels: "label".into(),
            },
            ..Default::default()
        };
        let mut model = original.clone();
        let done = dagr::inject(&mut model, &cfg).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let out = dir.path().join(format!("{stem}.dagr.onnx"));
        onnx::save(&model, &out).unwrap();
        checks.add(&out);

        let exposed = dir.path().join(format!("{stem}.exposed.onnx"));
        let enc_tensors: Vec<String> = done.encoders.iter().map(|e| e.tensor.clone()).collect();
        exposing(&original, &enc_tensors, &exposed);

        for batch in [4usize, 1] {
            let mut feed = slice_batch(&model_inputs(&path), batch);
            let labels: Vec<i64> = (0..batch as i64).map(|i| (3 * i + 1) % 10).collect();
            let orig_feed = feed.clone();
            feed.insert(
                "label".into(),
                Value::I64(ArrayD::from_shape_vec(vec![batch], labels).unwrap()),
            );
            let o = &done.record.outputs;
            let mut names = orig_outputs.clone();
            names.extend([
                o.loss.clone(),
                o.total_loss.clone().unwrap(),
                o.task_loss.clone().unwrap(),
            ]);
            names.extend(o.grads.iter().map(|g| g.1.clone()));
            for backend in BACKENDS {
                let tag = format!("{} (batch {batch}) on {}", path.display(), backend.name());
                if backend == Backend::Tract && uses_training_batchnorm(&original) {
                    // tract runs BatchNormalization in inference mode only: the original model
                    // already fails there, and the rewrite must fail the same way, not differently.
                    let e1 = dagr_inject::runtime::run(backend, &path, &orig_feed, &orig_outputs).unwrap_err();
                    let e2 = dagr_inject::runtime::run(backend, &out, &feed, &names).unwrap_err();
                    for e in [e1, e2] {
                        assert!(e.to_string().contains("BatchNorm"), "{tag}: unexpected tract error {e}");
                    }
                    continue;
                }
                let before = run(backend, &path, &orig_feed, &orig_outputs);
                let after = run(backend, &out, &feed, &names);
                for n in &orig_outputs {
                    assert_eq!(before[n], after[n], "{tag}: original output '{n}' changed");
                }
                // The DAGR values against the reference, from this backend's own encoder outputs.
                let z = run(backend, &exposed, &orig_feed, &enc_tensors);
                let zs: Vec<ndarray::Array2<f64>> = enc_tensors
                    .iter()
                    .map(|t| f32_of(&z, t).mapv(|v| v as f64).into_dimensionality::<Ix2>().unwrap())
                    .collect();
                let r = reference::compute(&zs, &cfg);
                let loss = f32_of(&after, &o.loss).iter().next().copied().unwrap() as f64;
                assert!(loss.is_finite(), "{tag}: loss is {loss}");
                assert!(
                    (loss - r.loss).abs() <= 1e-5 * r.loss.abs().max(1e-3),
                    "{tag}: loss {loss} vs {}",
                    r.loss
                );
                for ((_, g), want) in o.grads.iter().zip(&r.grads) {
                    let got = f32_of(&after, g);
                    assert!(got.iter().all(|v| v.is_finite()), "{tag}: {g} has non-finite values");
                    let e = rel_err(&got, &want.clone().into_dyn(), 1e-6);
                    assert!(e <= 1e-5, "{tag}: {g} relative error {e:e}");
                }
                let total = f32_of(&after, o.total_loss.as_ref().unwrap())
                    .iter()
                    .next()
                    .copied()
                    .unwrap();
                let task = f32_of(&after, o.task_loss.as_ref().unwrap())
                    .iter()
                    .next()
                    .copied()
                    .unwrap();
                assert!(
                    (total - (task + loss as f32)).abs() <= 1e-6 * total.abs().max(1.0),
                    "{tag}: total != task + dagr"
                );
            }
        }
    }
}

fn uses_training_batchnorm(m: &Model) -> bool {
    m.graph().node.iter().any(|n| {
        n.op_type == "BatchNormalization"
            && (n.output.len() > 1 || n.attribute.iter().any(|a| a.name == "training_mode" && a.i == 1))
    })
}
