//! Exports from other frameworks (`models/frameworks/`): Keras 3 through tf2onnx (`from_keras`,
//! the command line on a SavedModel, Keras's own `export(format="onnx")` at opset 15), Flax NNX
//! and Linen through jax2onnx (one with each encoder an ONNX local function), PaddlePaddle
//! through paddle2onnx. The same two-encoder model everywhere; the references are each
//! framework's own autodiff (`models/frameworks/export_*.py`).
//!
//! For every export: `inspect` ranks the two encoder outputs first; `--encoders
//! audio_encoder,visual_encoder` finds them; the training graph (cross-entropy of the three heads
//! plus DAGR) trains exactly the framework's parameters (no scalar constant, nothing frozen) and
//! its gradients equal the framework's; it runs at another batch size; `train` runs on both
//! backends and the exported model runs in ONNX Runtime.

use crate::common::*;
use assert_cmd::Command;
use dagr_inject::dagr::training::{make_training_graph, TrainOptions};
use dagr_inject::dagr::{Config, Task};
use dagr_inject::onnx;
use dagr_inject::runtime::{Backend, Tensors, Value};
use ndarray::{ArrayD, IxDyn};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

#[derive(Deserialize)]
struct Entry {
    file: String,
    #[serde(rename = "ref")]
    reference: String,
    modalities: Vec<String>,
    /// The graph inputs, in modality order.
    inputs: Vec<String>,
    /// The graph outputs: the fusion head, then the audio and visual heads.
    heads: Vec<String>,
    /// modality -> every tensor holding that encoder's output.
    encoder_tensors: BTreeMap<String, Vec<String>>,
    /// framework parameter -> (ONNX tensor, permutation of its squeezed axes).
    params: BTreeMap<String, (String, Vec<usize>)>,
}

fn dir() -> PathBuf {
    root().join("models/frameworks")
}

fn exports() -> Vec<(String, Entry)> {
    let index: BTreeMap<String, Entry> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("index.json")).unwrap()).unwrap();
    assert!(index.len() >= 7, "3 Keras, 3 Flax and 1 Paddle exports");
    index.into_iter().collect()
}

impl Entry {
    fn path(&self) -> PathBuf {
        dir().join(&self.file)
    }
    fn arrays(&self) -> Tensors {
        dagr_inject::npz::read(&dir().join(&self.reference)).unwrap()
    }
    /// The inputs at batch 4 (`in`) or 3 (`in3`), with the labels `y` (the first `b`).
    fn feed(&self, prefix: &str) -> Tensors {
        let all = self.arrays();
        let mut feed = Tensors::new();
        let mut b = 0;
        for (m, i) in self.modalities.iter().zip(&self.inputs) {
            let a = all[&format!("{prefix}/{m}")].clone();
            b = a.shape()[0];
            feed.insert(i.clone(), a);
        }
        let Value::I64(y) = &all["y"] else {
            panic!("labels are int64")
        };
        let y: Vec<i64> = y.iter().take(b).copied().collect();
        feed.insert("y".into(), Value::I64(ArrayD::from_shape_vec(IxDyn(&[b]), y).unwrap()));
        feed
    }
    /// The framework's gradient of `param`, laid out as the ONNX tensor holding it.
    fn gradient(&self, r: &BTreeMap<String, ArrayD<f64>>, param: &str, shape: &[usize]) -> ArrayD<f64> {
        let (_, perm) = &self.params[param];
        let g = &r[&format!("grad/{param}")];
        let squeezed: Vec<usize> = g.shape().iter().copied().filter(|&d| d != 1).collect();
        let g = g.to_shape(IxDyn(&squeezed)).unwrap().to_owned();
        let g = g.permuted_axes(IxDyn(perm));
        let flat: Vec<f64> = g.iter().copied().collect();
        ArrayD::from_shape_vec(IxDyn(shape), flat).unwrap()
    }
    fn encoders_found(&self, tensors: &[String]) -> bool {
        self.modalities
            .iter()
            .zip(tensors)
            .all(|(m, t)| self.encoder_tensors[m].contains(t))
    }
}

fn config(e: &Entry) -> Config {
    Config {
        encoders: vec!["audio_encoder".into(), "visual_encoder".into()],
        task: Task::CrossEntropy {
            logits: e.heads.clone(),
            labels: "y".into(),
        },
        ..Default::default()
    }
}

#[test]
fn framework_exports_inspect_ranks_the_encoders_first() {
    let mut failures = Vec::new();
    for (label, e) in exports() {
        let out = Command::cargo_bin("dagr-inject")
            .unwrap()
            .args(["inspect", "--json"])
            .arg(e.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let cands = report["encoder_candidates"].as_array().unwrap();
        let top: Vec<String> = cands
            .iter()
            .take(2)
            .map(|c| c["tensor"].as_str().unwrap().to_string())
            .collect();
        // Either order: the two best are the two encoder outputs.
        let mut sorted = top.clone();
        sorted.sort_by_key(|t| !e.encoder_tensors["audio"].contains(t));
        if top.len() < 2 || !e.encoders_found(&sorted) {
            failures.push(format!(
                "{label}: the best candidates are {top:?}, not the encoder outputs {:?}",
                e.encoder_tensors
            ));
        }
        // Each input's own batch symbol (tf2onnx, paddle2onnx) is read as one batch.
        let batches: BTreeSet<String> = report["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                i["shape"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches('[')
                    .split(',')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        if batches.len() != 1 {
            failures.push(format!("{label}: the inputs have the batch dims {batches:?}"));
        }
        if report["parameters"].as_u64().unwrap_or(0) == 0 {
            failures.push(format!("{label}: inspect counts no parameter"));
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn framework_training_graphs_equal_each_frameworks_autodiff_and_train_on_both_backends() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checks = OnnxChecks::default();
    let mut failures = Vec::new();
    for (label, e) in exports() {
        let mut m = onnx::load(&e.path()).unwrap();
        let rec = match make_training_graph(&mut m, &config(&e), &TrainOptions::default()) {
            Ok(r) => r,
            Err(err) => {
                failures.push(format!("{label}: {err}"));
                continue;
            }
        };
        let found: Vec<String> = rec.dagr.encoders.iter().map(|(_, t)| t.clone()).collect();
        if !e.encoders_found(&found) {
            failures.push(format!(
                "{label}: audio_encoder,visual_encoder resolved to {found:?}, not {:?}",
                e.encoder_tensors
            ));
            continue;
        }
        let p = tmp.path().join(format!("{label}.train.onnx"));
        onnx::save(&m, &p).unwrap();
        checks.add(&p);
        // Exactly the framework's parameters train: none frozen, no scalar constant trained.
        let trained: BTreeSet<&String> = rec.params.iter().map(|p| &p.0).collect();
        let want: BTreeSet<&String> = e.params.values().map(|p| &p.0).collect();
        if trained != want {
            failures.push(format!(
                "{label}: trains {:?} beyond the framework's parameters and misses {:?}",
                trained.difference(&want).collect::<Vec<_>>(),
                want.difference(&trained).collect::<Vec<_>>()
            ));
            continue;
        }
        let r = npz_f64(&dir().join(&e.reference));
        let mut names: Vec<String> = rec.params.iter().map(|p| p.1.clone()).collect();
        names.push(rec.loss.clone());
        names.push(rec.dagr.outputs.loss.clone());
        let out = run(Backend::Ort, &p, &e.feed("in"), &names);
        let scalar = |n: &str| f32_of(&out, n).iter().next().copied().unwrap() as f64;
        let total = r["total_loss"].iter().next().copied().unwrap();
        let dagr_loss = r["dagr/loss"].iter().next().copied().unwrap();
        if (scalar(&rec.loss) - total).abs() > 1e-4 * total.abs().max(1.0)
            || (scalar(&rec.dagr.outputs.loss) - dagr_loss).abs() > 1e-5
        {
            failures.push(format!(
                "{label}: loss {} (DAGR {}), the framework's {total} ({dagr_loss})",
                scalar(&rec.loss),
                scalar(&rec.dagr.outputs.loss)
            ));
        }
        let by_onnx: BTreeMap<&String, &String> = e.params.iter().map(|(k, v)| (&v.0, k)).collect();
        for (param, grad) in &rec.params {
            let got = f32_of(&out, grad);
            let want = e.gradient(&r, by_onnx[param], got.shape());
            let err = rel_err(&got, &want, 1e-6);
            if err >= 1e-4 {
                failures.push(format!("{label}: {param} ({}) off by {err:.2e}", by_onnx[param]));
            }
        }
        // Another batch size: the graph is not specialized to the example batch.
        let out3 = run(Backend::Ort, &p, &e.feed("in3"), std::slice::from_ref(&rec.loss));
        if !f32_of(&out3, &rec.loss).iter().all(|v| v.is_finite()) {
            failures.push(format!("{label}: the loss at batch 3 is not finite"));
        }
        train_and_export(&label, &e, &p, tmp.path(), &mut failures);
    }
    assert_no_failures(&failures);
}

/// Two epochs of `train` on each backend; the exported model runs in ONNX Runtime and its
/// heads moved.
fn train_and_export(
    label: &str,
    e: &Entry,
    graph: &std::path::Path,
    tmp: &std::path::Path,
    failures: &mut Vec<String>,
) {
    let data = tmp.join(format!("{label}.data.npz"));
    dagr_inject::npz::write(&data, &e.feed("in")).unwrap();
    for backend in ["ort", "tract"] {
        let out = tmp.join(format!("{label}.{backend}.run"));
        let o = Command::cargo_bin("dagr-inject")
            .unwrap()
            .args(["train", graph.to_str().unwrap(), "--data", data.to_str().unwrap()])
            .args([
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--lr",
                "0.05",
                "--backend",
                backend,
            ])
            .args(["--original", e.path().to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        if !o.status.success() {
            failures.push(format!("{label} on {backend}: {}", String::from_utf8_lossy(&o.stderr)));
            continue;
        }
        let exported = out.join("model.onnx");
        // Nothing the model does not read (jax2onnx's function bodies hold Constants nothing
        // reads; inlined as initializers, ONNX Runtime warned about each).
        let m = onnx::load(&exported).unwrap();
        let read: std::collections::HashSet<String> = m
            .graph()
            .node
            .iter()
            .flat_map(dagr_inject::onnx::index::node_reads)
            .collect();
        let unread: Vec<&str> = m
            .graph()
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .filter(|t| !read.contains(*t))
            .collect();
        if !unread.is_empty() {
            failures.push(format!(
                "{label} on {backend}: the exported model has unread initializers {unread:?}"
            ));
        }
        let feed: Tensors = e.feed("in").into_iter().filter(|(k, _)| k != "y").collect();
        let before = run(Backend::Ort, &e.path(), &feed, &e.heads);
        let after = run(Backend::Ort, &exported, &feed, &e.heads);
        let moved = e.heads.iter().any(|h| {
            f32_of(&before, h)
                .iter()
                .zip(f32_of(&after, h).iter())
                .any(|(a, b)| a != b)
        });
        if !moved {
            failures.push(format!(
                "{label} on {backend}: the exported model predicts as before training"
            ));
        }
    }
}

#[test]
fn framework_exports_resolve_encoders_by_input_when_nothing_is_recorded() {
    // paddle2onnx records no module: `audio_encoder` is the branch that starts at the input
    // `audio`, and `audio` names it too.
    let (_, e) = exports().into_iter().find(|(l, _)| l.starts_with("paddle")).unwrap();
    for names in [["audio_encoder", "visual_encoder"], ["audio", "visual"]] {
        let m = onnx::load(&e.path()).unwrap();
        let mut m2 = m.clone();
        let cfg = Config {
            encoders: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let done = dagr_inject::dagr::inject(&mut m2, &cfg).unwrap();
        let found: Vec<String> = done.encoders.iter().map(|e| e.tensor.clone()).collect();
        assert!(e.encoders_found(&found), "{names:?} -> {found:?}");
        let idx = dagr_inject::ops::index(&m).unwrap();
        assert!(idx.producer.len() > 10);
    }
}

#[test]
fn tensors_named_trainable_train_and_export() {
    // A weight written as a Constant node that feeds no MatMul/Gemm/Conv weight (a bias added
    // by an Add) stays constant, and a scalar initializer (LayerNorm's epsilon) too, unless
    // `trainable` names them; then they train, with TensorFlow's gradient, and a trained model
    // exports into the original with them.
    let (label, e) = exports().into_iter().find(|(l, _)| l == "keras.tf2onnx").unwrap();
    let bias = &e.params["logits/bias"].0;
    let mut m = onnx::load(&e.path()).unwrap();
    let g = m.graph_mut();
    let k = g.initializer.iter().position(|t| &t.name == bias).unwrap();
    let t = g.initializer.remove(k);
    let mut node = dagr_inject::onnx::proto::NodeProto::new();
    node.op_type = "Constant".into();
    node.output.push(bias.clone());
    let mut a = dagr_inject::onnx::proto::AttributeProto::new();
    a.name = "value".into();
    a.type_ = dagr_inject::onnx::proto::attribute_proto::AttributeType::TENSOR.into();
    a.t = Some(t).into();
    node.attribute.push(a);
    g.node.insert(0, node);
    let tmp = tempfile::tempdir().unwrap();
    let with_constant = tmp.path().join("keras.constant_bias.onnx");
    onnx::save(&m, &with_constant).unwrap();
    let epsilon = "av_1/audio_encoder_1/norm_1/add/y:0".to_string();

    let mut plain = m.clone();
    let rec = make_training_graph(&mut plain, &config(&e), &TrainOptions::default()).unwrap();
    let trained: BTreeSet<&String> = rec.params.iter().map(|p| &p.0).collect();
    assert!(
        !trained.contains(bias) && !trained.contains(&epsilon),
        "{label}: {trained:?}"
    );

    let opts = TrainOptions {
        trainable: vec!["*logits_1/BiasAdd/*".into(), epsilon.clone()],
        ..Default::default()
    };
    let rec = make_training_graph(&mut m, &config(&e), &opts).unwrap();
    let trained: BTreeSet<&String> = rec.params.iter().map(|p| &p.0).collect();
    assert!(
        trained.contains(bias) && trained.contains(&epsilon),
        "{label}: {trained:?}"
    );
    let p = tmp.path().join("named.train.onnx");
    onnx::save(&m, &p).unwrap();
    onnx_check(&p);
    let grad = &rec.params.iter().find(|x| &x.0 == bias).unwrap().1;
    let out = run(Backend::Ort, &p, &e.feed("in"), std::slice::from_ref(grad));
    let got = f32_of(&out, grad);
    let want = e.gradient(&npz_f64(&dir().join(&e.reference)), "logits/bias", got.shape());
    assert!(rel_err(&got, &want, 1e-6) < 1e-4);

    let data = tmp.path().join("data.npz");
    dagr_inject::npz::write(&data, &e.feed("in")).unwrap();
    let run_dir = tmp.path().join("run");
    let o = Command::cargo_bin("dagr-inject")
        .unwrap()
        .args([
            "train",
            p.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "1",
        ])
        .args([
            "--original",
            with_constant.to_str().unwrap(),
            "--out",
            run_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exported = onnx::load(&run_dir.join("model.onnx")).unwrap();
    assert!(exported.graph().initializer.iter().any(|t| &t.name == bias));
}
