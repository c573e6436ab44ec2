//! The zoo (`models/zoo/`): real architectures exported by every PyTorch exporter (legacy with
//! dynamic and static batch, dynamo at opsets 18 and 20). For every model x exporter:
//! inferred shapes and shape values equal what ONNX Runtime computes at two batch sizes;
//! `inspect` ranks the encoders first; the DAGR rewrite equals PyTorch autograd; and the training
//! graph of every export builds with nothing frozen, its parameter gradients equal PyTorch's,
//! and train steps run on both backends.

use crate::common::*;
use assert_cmd::Command;
use dagr_inject::dagr::training::{make_training_graph, TrainOptions};
use dagr_inject::dagr::{Config, Task};
use dagr_inject::onnx::{self, dtype};
use dagr_inject::runtime::{Backend, Tensors, Value};
use ndarray::ArrayD;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// torch parameter -> (ONNX initializer, stored transposed)
type ParamMap = BTreeMap<String, (String, bool)>;

#[derive(Deserialize)]
struct Entry {
    modalities: Vec<String>,
    inputs: Vec<String>,
    /// export -> its parameter map (None: the exporter failed)
    exports: BTreeMap<String, Option<ParamMap>>,
}

struct Export {
    name: String,
    suffix: String,
    path: PathBuf,
    entry: std::rc::Rc<Entry>,
}

impl Export {
    fn label(&self) -> String {
        format!("{}.{}", self.name, self.suffix)
    }
    fn static_batch(&self) -> bool {
        self.suffix.contains("static")
    }
    fn params(&self) -> &ParamMap {
        self.entry.exports[&self.suffix].as_ref().unwrap()
    }
    fn encoders(&self) -> Vec<String> {
        self.entry.modalities.iter().map(|m| format!("{m}_encoder")).collect()
    }
    fn reference(&self) -> BTreeMap<String, ArrayD<f64>> {
        npz_f64(&zoo_dir().join(format!("{}.ref.npz", self.name)))
    }
    /// The inputs at batch 4 (`in/`) or 3 (`in3/`), and the labels `y` at batch 4.
    fn feed(&self, prefix: &str, labels: bool) -> Tensors {
        let all = dagr_inject::npz::read(&zoo_dir().join(format!("{}.ref.npz", self.name))).unwrap();
        let mut feed = Tensors::new();
        for i in &self.entry.inputs {
            feed.insert(i.clone(), all[&format!("{prefix}/{i}")].clone());
        }
        if labels {
            feed.insert("y".into(), all["y"].clone());
        }
        feed
    }
}

fn zoo_dir() -> PathBuf {
    root().join("models/zoo")
}

fn zoo() -> Vec<Export> {
    let index: BTreeMap<String, Entry> =
        serde_json::from_str(&std::fs::read_to_string(zoo_dir().join("index.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for (name, entry) in index {
        let entry = std::rc::Rc::new(entry);
        for (suffix, map) in &entry.exports {
            assert!(
                map.is_some(),
                "{name}.{suffix}: the exporter failed when the zoo was made"
            );
            out.push(Export {
                name: name.clone(),
                suffix: suffix.clone(),
                path: zoo_dir().join(format!("{name}.{suffix}.onnx")),
                entry: entry.clone(),
            });
        }
    }
    assert!(out.len() >= 24, "the zoo holds 6 models x 4 exports");
    out
}

#[test]
fn zoo_shapes_and_shape_values_match_onnx_runtime_at_two_batch_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for e in zoo() {
        let mut m = onnx::load(&e.path).unwrap();
        m.source = None;
        m.graph_mut().value_info.clear();
        let idx = dagr_inject::ops::index(&m).unwrap();
        let mut exposed = m.clone();
        let mut names = Vec::new();
        let mut missing = Vec::new();
        let outputs: Vec<String> = m.graph().node.iter().flat_map(|n| n.output.clone()).collect();
        for t in outputs {
            if t.is_empty() || m.graph().output.iter().any(|o| o.name == t) {
                continue;
            }
            let f = idx.fact(&t).cloned().unwrap_or_default();
            if !matches!(f.dtype, dtype::FLOAT | dtype::INT64 | dtype::BOOL) {
                continue;
            }
            match &f.shape {
                Some(s) if s.iter().all(|d| !d.is_unknown()) => {}
                _ => missing.push(format!("{t} {}", f.shape_string())),
            }
            exposed.graph_mut().output.push(f.to_value_info(&t));
            names.push(t);
        }
        assert!(
            missing.is_empty(),
            "{}: {} tensors without a fully inferred shape, e.g. {:?}",
            e.label(),
            missing.len(),
            &missing[..missing.len().min(8)]
        );
        let p = dir.path().join(format!("{}.exposed.onnx", e.label()));
        onnx::save(&exposed, &p).unwrap();
        let prefixes: &[&str] = if e.static_batch() { &["in"] } else { &["in", "in3"] };
        let mut values = 0;
        for prefix in prefixes {
            let feed = e.feed(prefix, false);
            let env = bindings(&idx, &feed);
            let out = run(Backend::Ort, &p, &feed, &names);
            for t in &names {
                let got = out[t].shape();
                let want = idx.fact(t).unwrap().shape.clone().unwrap();
                let want: Vec<Option<i64>> = want.iter().map(|d| d.eval(&env)).collect();
                let got_i: Vec<Option<i64>> = got.iter().map(|&g| Some(g as i64)).collect();
                assert_eq!(got_i, want, "{} at {prefix}: shape of {t}", e.label());
                // Shape values (the elements of small integer tensors) as ONNX Runtime computes them.
                if let (Some(v), Value::I64(a)) = (idx.value(t), &out[t]) {
                    let want: Vec<Option<i64>> = v.iter().map(|d| d.eval(&env)).collect();
                    for (k, (w, g)) in want.iter().zip(a.iter()).enumerate() {
                        if let Some(w) = w {
                            assert_eq!(*w, *g, "{} at {prefix}: element {k} of {t} ({v:?})", e.label());
                        }
                    }
                    values += 1;
                }
            }
        }
        report.push(format!("{}: {} tensors, {values} shape values", e.label(), names.len()));
    }
    eprintln!("{}", report.join("\n"));
}

/// Every training graph, and the SGD step graph made from it, records (value_info) the type and
/// shape of every value its nodes make, and those shapes are what ONNX Runtime computes, at two
/// batch sizes: ONNX Runtime plans its memory from them (`ops::annotate_shapes`; a wrong one
/// would make it reuse a buffer of another size).
#[test]
fn zoo_training_graphs_record_the_shapes_onnx_runtime_computes() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for e in zoo()
        .into_iter()
        .filter(|e| !e.static_batch() && e.suffix != "dynamo20")
    {
        let mut m = onnx::load(&e.path).unwrap();
        let rec = make_training_graph(&mut m, &config(&e), &TrainOptions::default()).unwrap();
        let step = sgd_step_in_place(&m, &rec);
        for (graph, what) in [(&m, "training"), (&step.model, "step")] {
            let label = format!("{} {what} graph", e.label());
            let n = recorded_shapes_match_onnx_runtime(&label, graph, &e, dir.path());
            report.push(format!("{label}: {n} shapes recorded"));
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// The step graph of SGD with momentum 0.9, updating in place where the graph allows it.
fn sgd_step_in_place(
    m: &onnx::Model,
    rec: &dagr_inject::dagr::training::TrainRecord,
) -> dagr_inject::dagr::step_graph::StepGraph {
    let sgd = dagr_inject::dagr::optim::Optimizer::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    };
    let whole = dagr_inject::dagr::step_graph::Form::whole(true);
    dagr_inject::dagr::step_graph::build(m, rec, sgd, None, whole).unwrap()
}

/// `graph`'s recorded shapes, complete for every value its nodes make, against what ONNX
/// Runtime computes with `e`'s inputs at batches 4 and 3 (every other input zeros); returns how
/// many were checked.
fn recorded_shapes_match_onnx_runtime(label: &str, graph: &onnx::Model, e: &Export, dir: &std::path::Path) -> usize {
    let idx = dagr_inject::ops::index(graph).unwrap();
    let g = graph.graph();
    let recorded: HashMap<&str, &onnx::proto::ValueInfoProto> =
        g.value_info.iter().map(|v| (v.name.as_str(), v)).collect();
    let outputs: std::collections::HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let missing: Vec<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter())
        .map(String::as_str)
        .filter(|t| !t.is_empty() && !outputs.contains(t) && !recorded.contains_key(t))
        .filter(|t| {
            idx.fact(t)
                .is_some_and(|f| matches!(f.dtype, dtype::FLOAT | dtype::INT64 | dtype::BOOL))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{label}: {} values without a recorded shape, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(8)]
    );
    let mut exposed = graph.clone();
    let names: Vec<String> = g.value_info.iter().map(|v| v.name.clone()).collect();
    exposed.graph_mut().output.extend(g.value_info.iter().cloned());
    let p = dir.join(format!("{}.exposed.onnx", label.replace(' ', "_")));
    onnx::save(&exposed, &p).unwrap();
    let initialized: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    for prefix in ["in", "in3"] {
        let mut feed = e.feed(prefix, true);
        if prefix == "in3" {
            let Some(Value::I64(y)) = feed.get("y") else {
                panic!("{label}: labels")
            };
            let y3 = y.slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..3)).to_owned();
            feed.insert("y".into(), Value::I64(y3));
        }
        let env = bindings(&idx, &feed);
        for i in &g.input {
            if feed.contains_key(&i.name) || initialized.contains(i.name.as_str()) {
                continue;
            }
            let f = idx.fact(&i.name).unwrap();
            let shape: Vec<usize> = f
                .shape
                .as_ref()
                .unwrap()
                .iter()
                .map(|d| d.eval(&env).unwrap() as usize)
                .collect();
            let zeros = match f.dtype {
                dtype::FLOAT => Value::F32(ArrayD::zeros(shape)),
                dtype::INT64 => Value::I64(ArrayD::zeros(shape)),
                other => panic!("{label}: input {} of type {other}", i.name),
            };
            feed.insert(i.name.clone(), zeros);
        }
        let out = run(Backend::Ort, &p, &feed, &names);
        for v in &g.value_info {
            let want: Vec<Option<i64>> = onnx::ValueFact::from_type_proto(v.type_.get_or_default())
                .and_then(|f| f.shape)
                .unwrap_or_default()
                .iter()
                .map(|d| d.eval(&env))
                .collect();
            let got: Vec<Option<i64>> = out[&v.name].shape().iter().map(|&d| Some(d as i64)).collect();
            assert_eq!(got, want, "{label} at {prefix}: recorded shape of {}", v.name);
        }
    }
    names.len()
}

#[test]
fn zoo_inspect_ranks_the_encoders_first() {
    for e in zoo() {
        let out = Command::cargo_bin("dagr-inject")
            .unwrap()
            .arg("inspect")
            .arg(&e.path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", e.label());
        let text = String::from_utf8_lossy(&out.stdout);
        let mut want = e.encoders();
        want.sort();
        let suggested = text
            .lines()
            .find_map(|l| l.strip_prefix("suggested: dagr-inject MODEL --encoders "))
            .unwrap_or_else(|| panic!("{}: no suggestion in\n{text}", e.label()));
        let mut got: Vec<String> = suggested.split(',').map(str::to_string).collect();
        got.sort();
        assert_eq!(got, want, "{}: {text}", e.label());
        // What will not train is said (BatchNorm's running statistics in the CNNs).
        let cnn = ["resnet_gru", "mobilenet_lstm", "efficientnet_wav2vec"].contains(&e.name.as_str());
        assert_eq!(text.contains("running statistics"), cnn, "{}: {text}", e.label());
    }
}

fn config(e: &Export) -> Config {
    Config {
        encoders: e.encoders(),
        task: Task::CrossEntropy {
            logits: vec!["logits".into()],
            labels: "y".into(),
        },
        ..Default::default()
    }
}

#[test]
fn zoo_dagr_rewrite_equals_pytorch_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let mut checks = OnnxChecks::default();
    for e in zoo() {
        let r = e.reference();
        let mut m = onnx::load(&e.path).unwrap();
        let done = dagr_inject::dagr::inject(&mut m, &config(&e)).unwrap_or_else(|err| panic!("{}: {err}", e.label()));
        let p = dir.path().join(format!("{}.dagr.onnx", e.label()));
        onnx::save(&m, &p).unwrap();
        checks.add(&p);
        let o = &done.record.outputs;
        let mut names = vec![o.loss.clone(), o.total_loss.clone().unwrap()];
        names.extend(o.grads.iter().map(|g| g.1.clone()));
        for backend in BACKENDS {
            let out = run(backend, &p, &e.feed("in", true), &names);
            let err = |got: &str, want: &str| rel_err(&f32_of(&out, got), &r[want], 1e-6);
            let tag = format!("{} on {}", e.label(), backend.name());
            assert!(err(&o.loss, "dagr/loss") < 1e-4, "{tag}: dagr/loss");
            assert!(
                err(o.total_loss.as_ref().unwrap(), "total_loss") < 1e-4,
                "{tag}: total loss"
            );
            for (m, g) in &o.grads {
                let key = format!("dagr/grad/{}", m.trim_end_matches("_encoder"));
                assert!(err(g, &key) < 1e-4, "{tag}: {key} off by {}", err(g, &key));
            }
        }
    }
}

#[test]
fn zoo_training_graphs_equal_pytorch_autograd_and_train_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let mut checks = OnnxChecks::default();
    let mut trained = 0;
    for (k, e) in zoo().into_iter().enumerate() {
        let mut m = onnx::load(&e.path).unwrap();
        let built = make_training_graph(&mut m, &config(&e), &TrainOptions::default());
        match built {
            Err(err) => panic!("{}: {err}", e.label()),
            Ok(rec) => {
                let p = dir.path().join(format!("{}.train.onnx", e.label()));
                onnx::save(&m, &p).unwrap();
                checks.add(&p);
                let r = e.reference();
                let by_onnx: HashMap<&String, (&String, bool)> =
                    e.params().iter().map(|(t, (o, tr))| (o, (t, *tr))).collect();
                let mut names: Vec<String> = rec.params.iter().map(|p| p.1.clone()).collect();
                names.push(rec.loss.clone());
                let feed = e.feed("in", true);
                let out = run(Backend::Ort, &p, &feed, &names);
                // Parameters that are copies of torch parameters: PyTorch autograd. The others
                // (what the exporter reparametrized: BatchNorm folded into a convolution, RNN
                // weights packed per gate): a directional finite difference of the loss.
                let scale = r
                    .iter()
                    .filter(|(k, _)| k.starts_with("grad/"))
                    .flat_map(|(_, a)| a.iter())
                    .fold(0f64, |m, v| m.max(v.abs()));
                let mut reparametrized = Vec::new();
                let mut bad = Vec::new();
                for (param, grad) in &rec.params {
                    let got = f32_of(&out, grad);
                    let Some((torch, transposed)) = by_onnx.get(param) else {
                        reparametrized.push((param.clone(), got));
                        continue;
                    };
                    let mut want = r[&format!("grad/{torch}")].clone();
                    if *transposed {
                        want = want.t().to_owned();
                    }
                    // Relative to the tensor, with a floor at 1e-3 of the largest gradient of the
                    // model: a gradient that is zero in exact arithmetic (an attention key bias)
                    // is rounding noise in both implementations.
                    let err = rel_err(&got, &want, 1e-3 * scale);
                    if err >= 1e-4 {
                        bad.push(format!("{}: {grad} off by {err}", e.label()));
                    }
                }
                assert!(
                    bad.is_empty(),
                    "{} of {} gradients differ from PyTorch:\n{}",
                    bad.len(),
                    rec.params.len(),
                    bad.join("\n")
                );
                let training: std::collections::HashSet<&String> = rec.params.iter().map(|p| &p.0).collect();
                for (torch, (onnx_name, _)) in e.params() {
                    assert!(
                        training.contains(onnx_name),
                        "{}: {torch} ({onnx_name}) does not train",
                        e.label()
                    );
                }
                directional_check(&e.label(), &m, &p, &feed, &rec.loss, &reparametrized, &[1e-3]);
                // Every read of the state, views included, comes before its write: the step
                // graph of each real architecture updates in place.
                let step = sgd_step_in_place(&m, &rec);
                assert!(step.in_place, "{}: the step graph cannot update in place", e.label());
                // `verify`'s own finite differences pass on honest training graphs: every
                // model, each through another exporter in turn (all 24 pass; 6 keep the suite
                // short).
                if k % 4 == (k / 4) % 4 {
                    let fd = dagr_inject::verify::param_finite_differences(&p, &feed, Backend::Ort, 1)
                        .unwrap_or_else(|err| panic!("{}: verify: {err}", e.label()));
                    let failed: Vec<String> = fd
                        .iter()
                        .filter(|c| !c.pass)
                        .map(|c| format!("{} rel {:.3e}", c.output, c.rel))
                        .collect();
                    assert!(
                        failed.is_empty(),
                        "{}: verify fails honest gradients: {failed:?}",
                        e.label()
                    );
                }
                train_steps(&e, &p, dir.path());
                trained += 1;
            }
        }
    }
    assert_eq!(trained, zoo().len(), "every export trains");
}

/// Three SGD steps of `train` on each backend, from the same data.
fn train_steps(e: &Export, graph: &std::path::Path, dir: &std::path::Path) {
    let data = dir.join(format!("{}.data.npz", e.label()));
    dagr_inject::npz::write(&data, &e.feed("in", true)).unwrap();
    for backend in ["ort", "tract"] {
        let out = dir.join(format!("{}.{backend}.run", e.label()));
        let o = Command::cargo_bin("dagr-inject")
            .unwrap()
            .args(["train", graph.to_str().unwrap(), "--data", data.to_str().unwrap()])
            .args([
                "--epochs",
                "3",
                "--batch-size",
                "4",
                "--lr",
                "0.01",
                "--backend",
                backend,
            ])
            .args(["--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{} on {backend}: {}",
            e.label(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
