//! Training graphs of every model in models/ against PyTorch autograd
//! (fixtures/generate_train.py): every `<param>_grad`, the BatchNorm running statistics, the
//! loss and Pareto's alpha, on ONNX Runtime and tract, with and without --stop-gradient and
//! Pareto balancing. Each graph also passes onnx.checker.

use crate::common::*;
use dagr_inject::dagr::training::{make_training_graph, Pareto, TrainOptions};
use dagr_inject::dagr::{Config, Task};
use dagr_inject::onnx;
use dagr_inject::runtime::Tensors;
use serde::Deserialize;

#[derive(Deserialize)]
struct TrainCase {
    model: String,
    logits: Vec<String>,
    stop_gradient: Option<String>,
    pareto: Option<String>,
    beta: Option<f64>,
}

const RTOL: f64 = 1e-4;

#[test]
fn parameter_gradients_match_pytorch_on_both_backends() {
    let cases: Vec<TrainCase> =
        serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/train_cases.json")).unwrap()).unwrap();
    let fx = dagr_inject::npz::read(&root().join("fixtures/train_reference.npz")).unwrap();
    let fx64 = npz_f64(&root().join("fixtures/train_reference.npz"));
    let dir = tempfile::tempdir().unwrap();
    let mut checks = OnnxChecks::default();
    for (k, c) in cases.iter().enumerate() {
        let path = root().join("models").join(&c.model);
        let mut model = onnx::load(&path).unwrap();
        let mut enc = vec!["audio".to_string(), "visual".to_string()];
        if c.model.starts_with("tri") {
            enc.push("text".into());
        }
        let cfg = Config {
            encoders: enc,
            task: Task::CrossEntropy {
                logits: c.logits.clone(),
                labels: "label".into(),
            },
            ..Default::default()
        };
        let opts = TrainOptions {
            stop_gradient: c.stop_gradient.iter().cloned().collect(),
            pareto: c
                .pareto
                .as_deref()
                .map(|p| if p == "param" { Pareto::Param } else { Pareto::Feature }),
            beta: c.beta.unwrap_or(0.1),
            ..Default::default()
        };
        let rec = make_training_graph(&mut model, &cfg, &opts).unwrap_or_else(|e| panic!("case {k} {}: {e}", c.model));
        let out = dir.path().join(format!("case{k}.onnx"));
        onnx::save(&model, &out).unwrap();
        checks.add(&out);

        let prefix = format!("{k}/input/");
        let feed: Tensors = fx
            .iter()
            .filter_map(|(n, v)| n.strip_prefix(&prefix).map(|s| (s.to_string(), v.clone())))
            .collect();
        // Every output, in the graph's order, as a user's `run` asks for them: the gradients,
        // loss and running statistics compared below, and the logits, DAGR's terms and the
        // task loss (tract once failed on av_cnn's with the task loss asked before the audio
        // gradients, see `index::merge_duplicates`).
        let names: Vec<String> = model.graph().output.iter().map(|o| o.name.clone()).collect();
        let wanted = rec
            .params
            .iter()
            .map(|p| &p.1)
            .chain([&rec.loss])
            .chain(rec.batchnorm.iter().flat_map(|s| [&s.mean.1, &s.var.1]))
            .chain(rec.pareto_alpha.iter());
        for w in wanted {
            assert!(
                names.contains(w),
                "case {k}: '{w}' is not an output of the training graph"
            );
        }
        // Every trainable parameter of the PyTorch model has a gradient here, and vice versa.
        let want: Vec<&String> = fx64.keys().filter(|n| n.starts_with(&format!("{k}/grad/"))).collect();
        assert_eq!(
            want.len(),
            rec.params.len(),
            "case {k}: parameter sets differ: {:?}",
            rec.params
        );
        for backend in BACKENDS {
            let tag = format!(
                "case {k} ({}{}{}) on {}",
                c.model,
                c.stop_gradient.as_ref().map(|_| ", stop-gradient").unwrap_or(""),
                c.pareto.as_ref().map(|p| format!(", pareto {p}")).unwrap_or_default(),
                backend.name()
            );
            let res = run(backend, &out, &feed, &names);
            // A parameter whose true gradient vanishes (a conv bias before training-mode
            // BatchNorm) is compared on the scale of the largest gradient of the model.
            let global = rec
                .params
                .iter()
                .map(|(p, _)| fx64[&format!("{k}/grad/{p}")].iter().fold(0f64, |a, v| a.max(v.abs())))
                .fold(0f64, f64::max);
            for (p, g) in &rec.params {
                let r = &fx64[&format!("{k}/grad/{p}")];
                let got = f32_of(&res, g);
                let e = rel_err(&got, r, 1e-2 * global);
                assert!(e <= RTOL, "{tag}: {g} relative error {e:e}");
            }
            let loss = f32_of(&res, &rec.loss).iter().next().copied().unwrap() as f64;
            let wl = fx64[&format!("{k}/loss")].iter().next().copied().unwrap();
            assert!((loss - wl).abs() <= RTOL * wl.abs(), "{tag}: loss {loss} vs {wl}");
            for s in &rec.batchnorm {
                for (init, t) in [&s.mean, &s.var] {
                    let torch_name = init.clone();
                    let r = &fx64[&format!("{k}/bn/{torch_name}")];
                    let e = rel_err(&f32_of(&res, t), r, 1e-8);
                    assert!(e <= RTOL, "{tag}: running statistic {init} relative error {e:e}");
                }
            }
            if let Some(a) = &rec.pareto_alpha {
                let got = f32_of(&res, a).iter().next().copied().unwrap() as f64;
                let w = fx64[&format!("{k}/alpha")].iter().next().copied().unwrap();
                assert!((got - w).abs() <= 1e-4, "{tag}: alpha {got} vs {w}");
            }
        }
    }
}

/// An `If` whose condition the shapes decide when the graph is built (here `audio`'s width is
/// 40) is replaced by the branch it takes: the training graph of av_mlp with its audio ReLU
/// inside such an If (the other branch a Neg, both branches naming their output alike) has the
/// gradients of the plain model's. The same If on a condition known only at run time (the
/// audio is finite) stays, and its gradient (an If of the branches' gradients, through the
/// tensor the branches capture) gives those gradients too.
#[test]
fn an_if_decided_by_static_shapes_is_folded_and_trains() {
    use dagr_inject::onnx::builder::{attr_int, Builder};
    use dagr_inject::onnx::proto::{attribute_proto::AttributeType, AttributeProto, GraphProto, NodeProto};
    let path = root().join("models/av_mlp.legacy.onnx");
    let plain = onnx::load(&path).unwrap();
    let mut with_if = plain.clone();
    let pos = with_if
        .graph()
        .node
        .iter()
        .position(|n| n.name == "/audio_encoder/Relu")
        .unwrap();
    let relu = with_if.graph().node[pos].clone();
    let mut at_run_time = with_if.clone();
    let mut b = Builder::new(&with_if, "");
    let shape = b.op("Shape", &["audio"], vec![], "/audio_encoder/width");
    let one = b.scalar_i64(1);
    let width = b.op(
        "Gather",
        &[&shape, &one],
        vec![attr_int("axis", 0)],
        "/audio_encoder/width",
    );
    let forty = b.scalar_i64(40);
    let cond = b.op("Equal", &[&width, &forty], vec![], "/audio_encoder/width");
    let mut rb = Builder::new(&at_run_time, "");
    let total = rb.reduce("ReduceSum", "audio", None, false, "/audio_encoder/finite");
    let nan = rb.unary("IsNaN", &total, "/audio_encoder/finite");
    let runtime_cond = rb.unary("Not", &nan, "/audio_encoder/finite");
    let branch = |op: &str, name: &str| {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.name = name.into();
        n.input = vec![relu.input[0].clone()];
        n.output = vec!["y".into()];
        let mut g = GraphProto::new();
        g.name = name.into();
        g.node.push(n);
        let mut o = dagr_inject::onnx::proto::ValueInfoProto::new();
        o.name = "y".into();
        g.output.push(o);
        g
    };
    let graph_attr = |name: &str, g: GraphProto| AttributeProto {
        name: name.into(),
        type_: AttributeType::GRAPH.into(),
        g: Some(g).into(),
        ..Default::default()
    };
    let iff = |cond: String| {
        let mut iff = NodeProto::new();
        iff.op_type = "If".into();
        iff.name = "/audio_encoder/If".into();
        iff.input = vec![cond];
        iff.output = relu.output.clone();
        iff.attribute = vec![
            graph_attr("then_branch", branch("Relu", "relu")),
            graph_attr("else_branch", branch("Neg", "neg")),
        ];
        iff
    };
    for (m, b, cond) in [(&mut with_if, b, cond), (&mut at_run_time, rb, runtime_cond)] {
        let mut b = b;
        let mut nodes = std::mem::take(&mut b.nodes);
        nodes.push(iff(cond));
        let inits = std::mem::take(&mut b.initializers);
        let g = m.graph_mut();
        g.node.splice(pos..pos + 1, nodes);
        g.initializer.extend(inits);
    }

    let cfg = Config {
        encoders: vec!["audio_encoder".into(), "visual_encoder".into()],
        task: Task::CrossEntropy {
            logits: vec!["logits".into()],
            labels: "label".into(),
        },
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut checks = OnnxChecks::default();
    let mut grads = Vec::new();
    for (tag, mut m) in [("plain", plain), ("if", with_if), ("runtime_if", at_run_time)] {
        let rec = make_training_graph(&mut m, &cfg, &TrainOptions::default()).unwrap_or_else(|e| panic!("{tag}: {e}"));
        let ifs = m.graph().node.iter().filter(|n| n.op_type == "If").count();
        // Folded where the shapes decide; else the forward If and its gradient's.
        assert_eq!(ifs, if tag == "runtime_if" { 2 } else { 0 }, "{tag}");
        let p = dir.path().join(format!("{tag}.onnx"));
        onnx::save(&m, &p).unwrap();
        checks.add(&p);
        let mut feed = model_inputs(&path);
        feed.insert(
            "label".into(),
            dagr_inject::runtime::Value::I64(ndarray::ArrayD::from_shape_vec(vec![4], vec![1, 0, 3, 9]).unwrap()),
        );
        let names: Vec<String> = rec.params.iter().map(|p| p.1.clone()).collect();
        let out = dagr_inject::runtime::run(dagr_inject::runtime::Backend::Ort, &p, &feed, &names).unwrap();
        grads.push(names.iter().map(|n| (n.clone(), f32_of(&out, n))).collect::<Vec<_>>());
    }
    assert_eq!(grads[0].len(), 10);
    assert_eq!(grads[0], grads[1]);
    for ((name, plain), (_, runtime)) in grads[0].iter().zip(&grads[2]) {
        let e = rel_err(runtime, &plain.mapv(f64::from), 1e-6);
        assert!(
            e <= 1e-5,
            "{name}: the run-time If's gradient differs by {e} (relative)"
        );
    }
}

/// What trains follows what dynamo recorded in torch.export's graph signature: a parameter of
/// the root module (a name without a dot, which the naming convention alone takes for a folded
/// constant) and a scalar parameter (a learned temperature) train; a float buffer does not.
#[test]
fn what_trains_follows_the_recorded_graph_signature() {
    use dagr_inject::dagr::training::{not_parameters, NotParameter};
    use dagr_inject::onnx::proto::StringStringEntryProto;
    let path = root().join("models/av_mlp.dynamo.onnx");
    let mut m = onnx::load(&path).unwrap();
    let kind = "pkg.torch.export.graph_signature.InputSpec.kind";
    let rename = |m: &mut onnx::Model, from: &str, to: &str, k: &str| {
        let g = m.graph_mut();
        for t in g.initializer.iter_mut().filter(|t| t.name == from) {
            t.name = to.into();
        }
        for n in g.node.iter_mut() {
            for i in n.input.iter_mut().filter(|i| *i == from) {
                *i = to.into();
            }
        }
        let v = g.value_info.iter_mut().find(|v| v.name == from).unwrap();
        v.name = to.into();
        let p = v.metadata_props.iter_mut().find(|p| p.key == kind).unwrap();
        p.value = k.into();
    };
    rename(&mut m, "fusion_head.bias", "head_bias", "PARAMETER");
    rename(&mut m, "visual_encoder.fc2.bias", "visual_encoder.fc2.table", "BUFFER");
    // A scalar parameter (a learned temperature).
    let g = m.graph_mut();
    g.initializer
        .push(onnx::tensor::f32_tensor("temperature", &[], &[0.07]));
    let mut v = onnx::ValueFact::new(onnx::dtype::FLOAT, vec![]).to_value_info("temperature");
    let mut entry = StringStringEntryProto::new();
    entry.key = kind.into();
    entry.value = "PARAMETER".into();
    v.metadata_props.push(entry);
    g.value_info.push(v);
    let not = not_parameters(&m);
    assert_eq!(not.get("head_bias"), None, "{not:?}");
    assert_eq!(not.get("temperature"), None, "{not:?}");
    assert_eq!(not.get("visual_encoder.fc2.table"), Some(&NotParameter::Buffer));
    // Without the record, the naming convention decides: no dot, a folded constant.
    for v in m.graph_mut().value_info.iter_mut() {
        v.metadata_props.clear();
    }
    let not = not_parameters(&m);
    assert_eq!(not.get("head_bias"), Some(&NotParameter::Folded));
    assert_eq!(not.get("temperature"), Some(&NotParameter::Scalar));
    assert_eq!(not.get("visual_encoder.fc2.table"), None);
}

/// Control flow as PyTorch exports it (`models/control_flow/export.py`): a recurrent cell in a
/// Python `for` loop and a gate taking one of two branches by the sign of the state's sum,
/// scripted and exported by the TorchScript exporter (a `Loop` reading the time length at run
/// time, an `If` on a run-time condition, both reading the parameters from the outer scope) and
/// by torch.export (the loop unrolled, the gate `torch.cond`, an `If`). The gradient of
/// 0.5 sum(y^2) with respect to every parameter equals PyTorch autograd's, for inputs taking
/// each branch, on ONNX Runtime (tract has no Loop and loads one If per graph).
#[test]
fn control_flow_exports_match_pytorch_autograd() {
    use dagr_inject::autodiff as grad;
    use dagr_inject::onnx::builder::Builder;
    use std::collections::HashSet;
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let base = root().join("models/control_flow");
    let all = dagr_inject::npz::read(&base.join("ref.npz")).unwrap();
    let reference = npz_f64(&base.join("ref.npz"));
    let mut checks = OnnxChecks::default();
    let mut compared = 0;
    for tag in ["legacy", "dynamo"] {
        let m = onnx::load(&base.join(format!("{tag}.onnx"))).unwrap();
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type.as_str()).collect();
        assert!(
            ops.contains(&"If") && (tag == "dynamo" || ops.contains(&"Loop")),
            "{tag}: {ops:?}"
        );
        let mut gm = m.clone();
        let mut b = Builder::new(&gm, "t/");
        let sq = b.binary("Mul", "y", "y", "loss");
        let sum = b.reduce("ReduceSum", &sq, None, false, "loss");
        let half = b.scalar(0.5);
        b.op_named("Mul", &[&sum, &half], vec![], "loss");
        b.finish(&mut gm);
        let idx = dagr_inject::ops::index(&gm).unwrap();
        // The encoder's output shape through the Loop (its state inferred through the body from
        // the initial state) and the If (through its branches): [batch, 6].
        let y = idx.fact("y").and_then(|f| f.shape.clone()).unwrap_or_default();
        assert_eq!(y.len(), 2, "{tag}: y is {y:?}");
        assert_eq!(y[1], dagr_inject::onnx::Dim::Known(6), "{tag}: y is {y:?}");
        assert!(
            y[0].known().is_none_or(|b| b == 3) && !y[0].is_unknown(),
            "{tag}: y is {y:?}"
        );
        let params: Vec<String> = reference
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("grad/{tag}/pos/")))
            .map(String::from)
            .collect();
        assert_eq!(params.len(), 8, "{tag}: {params:?}");
        let mut b = Builder::new(&gm, "g/");
        let one = b.scalar(1.0);
        let grads = grad::backward(&gm, &idx, &mut b, &[("loss".into(), one)], &params, &HashSet::new())
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
        let outs: Vec<String> = params.iter().map(|p| format!("{p}_grad")).collect();
        for (p, o) in params.iter().zip(&outs) {
            b.op_named("Identity", &[&grads[p]], vec![], o);
        }
        b.finish(&mut gm);
        for (p, o) in params.iter().zip(&outs) {
            gm.graph_mut().output.push(idx.fact(p).unwrap().to_value_info(o));
        }
        dagr_inject::ops::infer::check(&gm).unwrap_or_else(|e| panic!("{tag}: {e}"));
        let path = dir.path().join(format!("{tag}.grad.onnx"));
        onnx::save(&gm, &path).unwrap();
        checks.add(&path);
        for key in ["pos", "neg"] {
            let mut feed = Tensors::new();
            feed.insert("x".into(), all[&format!("in/{key}")].clone());
            let out = dagr_inject::runtime::run(dagr_inject::runtime::Backend::Ort, &path, &feed, &outs)
                .unwrap_or_else(|e| panic!("{tag}/{key}: {e}"));
            // tract cannot load these graphs, and says so, with what to do.
            let e = dagr_inject::runtime::run(dagr_inject::runtime::Backend::Tract, &path, &feed, &outs)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--backend ort") && (e.contains("Loop") || e.contains("2 If")),
                "{tag}: {e}"
            );
            for (p, o) in params.iter().zip(&outs) {
                let want = &reference[&format!("grad/{tag}/{key}/{p}")];
                let e = rel_err(&f32_of(&out, o), want, 1e-6);
                assert!(
                    e <= 1e-4,
                    "{tag}/{key}: d loss / d {p} differs from PyTorch's by {e} (relative)"
                );
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 32);
    drop(checks); // onnx.checker on both gradient graphs
}

/// A model exported with its own loss, as PyTorch writes it (`models/own_loss/export.py`):
/// `F.cross_entropy`, which the legacy exporter writes as SoftmaxCrossEntropyLoss with
/// ignore_index -100 (a label ignored), and `F.nll_loss(F.log_softmax(..))` with class weights
/// and an ignored class the labels use (legacy: SoftmaxCrossEntropyLoss with weights, dynamo:
/// NegativeLogLikelihoodLoss). `--loss loss --train` builds on every export; every parameter's
/// gradient of loss + DAGR equals PyTorch autograd in float64 on both backends (tract runs the
/// loss ops as their portable forms), `verify --original` passes, and 3 steps of `train` reach
/// the same loss on both backends.
#[test]
fn a_models_own_cross_entropy_trains_as_pytorch_computes_it() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let base = root().join("models/own_loss");
    let mut compared = 0;
    for kind in ["ce", "weighted"] {
        let (feed, reference) = reference_npz(&base.join(format!("{kind}.ref.npz")), &["audio", "visual", "y"]);
        let data = dir.path().join(format!("{kind}.data.npz"));
        dagr_inject::npz::write(&data, &feed).unwrap();
        for exporter in ["legacy", "dynamo"] {
            let src = base.join(format!("{kind}.{exporter}.onnx"));
            let train = dir.path().join(format!("{kind}.{exporter}.train.onnx"));
            bin()
                .args([src.to_str().unwrap(), "--encoders", "audio_encoder,visual_encoder"])
                .args(["--loss", "loss", "--train", "-o", train.to_str().unwrap()])
                .assert()
                .success();
            // tract runs the loss op as its portable form (`expand_bodies`).
            gradients_match_reference(&train, &feed, &reference, 1e-6, 10);
            compared += 10;
            verify_and_train_alike(&train, &src, &data, &dir.path().join(format!("{kind}.{exporter}.run")));
        }
    }
    assert_eq!(compared, 40);
}
