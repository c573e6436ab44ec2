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
        let mut names: Vec<String> = rec.params.iter().map(|p| p.1.clone()).collect();
        names.push(rec.loss.clone());
        for s in &rec.batchnorm {
            names.push(s.mean.1.clone());
            names.push(s.var.1.clone());
        }
        names.extend(rec.pareto_alpha.clone());
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
