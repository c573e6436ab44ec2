//! `train`: optimizer steps equal PyTorch's (`torch.optim`, fixtures/generate_optim.py) on
//! both backends; resume equals an uninterrupted run; the same seed gives the same result; the
//! exported inference model predicts as the trained graph; bad inputs stop cleanly.

use crate::common::*;
use dagr_inject::dagr::optim::{learning_rate, Optimizer, Schedule};
use dagr_inject::dagr::step_graph;
use dagr_inject::dagr::training::{make_training_graph, TrainOptions};
use dagr_inject::dagr::{Config, Task};
use dagr_inject::onnx;
use dagr_inject::runtime::data::Dataset;
use dagr_inject::runtime::{Backend, Value};
use dagr_inject::train::{checkpoint, fit, Run, Settings, StateUpdate, Trainer};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Deserialize)]
struct OptimCase {
    model: String,
    logits: Vec<String>,
    steps: usize,
    batch: usize,
    optimizer: serde_json::Value,
    clip: Option<f64>,
    schedule: Option<serde_json::Value>,
    /// Micro-batches per step (`--grad-accum`).
    accum: Option<usize>,
}

/// Our schedule settings for a PyTorch scheduler description in the fixtures.
fn schedule_of(s: &serde_json::Value) -> (Schedule, usize) {
    let warmup = s["warmup"].as_u64().unwrap_or(0) as usize;
    let sched = match s["kind"].as_str().unwrap() {
        "cosine" => Schedule::Cosine {
            min_lr: s["min_lr"].as_f64().unwrap(),
        },
        "step" => Schedule::Step {
            step_size: s["step_size"].as_u64().unwrap() as usize,
            gamma: s["gamma"].as_f64().unwrap(),
        },
        other => panic!("unknown schedule {other}"),
    };
    (sched, warmup)
}

pub fn training_graph(model: &str, logits: &[String], dir: &Path) -> PathBuf {
    let path = root().join("models").join(model);
    let mut m = onnx::load(&path).unwrap();
    let mut enc = vec!["audio".to_string(), "visual".to_string()];
    if model.starts_with("tri") {
        enc.push("text".into());
    }
    let cfg = Config {
        encoders: enc,
        task: Task::CrossEntropy {
            logits: logits.to_vec(),
            labels: "label".into(),
        },
        ..Default::default()
    };
    make_training_graph(&mut m, &cfg, &TrainOptions::default()).unwrap();
    let out = dir.join(format!("{}.train.onnx", model.trim_end_matches(".onnx")));
    onnx::save(&m, &out).unwrap();
    out
}

/// The optimizer fixtures' data for model `base` (`av_mlp`, `av_cnn`, `tri_token`).
fn optim_data(t: &Trainer, base: &str, idx: &onnx::GraphIndex) -> Dataset {
    let path = root().join(format!("fixtures/optim_data_{base}.npz"));
    Dataset::load(&path, idx, &t.data_inputs(idx), None).unwrap()
}

/// Where the training loop runs: tract and ONNX Runtime, each with two state sets and with the
/// state updated in place.
const STATE_RUNS: [(Backend, StateUpdate); 4] = [
    (Backend::Tract, StateUpdate::TwoSets),
    (Backend::Tract, StateUpdate::InPlace),
    (Backend::Ort, StateUpdate::TwoSets),
    (Backend::Ort, StateUpdate::InPlace),
];

/// `torch.optim.AdamW`'s defaults (betas 0.9, 0.999, weight decay 0.01) with `eps`.
fn adamw(eps: f64) -> Optimizer {
    Optimizer::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps,
        weight_decay: 0.01,
    }
}

pub fn settings(opt: Optimizer, lr: f64, backend: Backend) -> Settings {
    Settings {
        epochs: 1,
        batch_size: 8,
        lr,
        optimizer: opt,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        clip_grad_norm: None,
        seed: 0,
        shuffle: false,
        drop_last: false,
        backend,
        device: dagr_inject::runtime::Device::Cpu,
        threads: None,
        state_update: StateUpdate::Auto,
        grad_accum: 1,
        device_index: 0,
        // In place, the test models' larger tensors are updated in parts (of rows, the last
        // one shorter where they do not divide).
        state_part_bytes: Some(1000),
    }
}

#[test]
fn optimizer_steps_equal_pytorch_on_both_backends() {
    let cases: Vec<OptimCase> =
        serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/optim_cases.json")).unwrap()).unwrap();
    let fx = npz_f64(&root().join("fixtures/optim_reference.npz"));
    let dir = tempfile::tempdir().unwrap();
    for (k, c) in cases.iter().enumerate() {
        let graph = training_graph(&c.model, &c.logits, dir.path());
        let o = &c.optimizer;
        let opt = if o["kind"] == "sgd" {
            Optimizer::Sgd {
                momentum: o["momentum"].as_f64().unwrap(),
                nesterov: o["nesterov"].as_bool().unwrap(),
                weight_decay: o["weight_decay"].as_f64().unwrap(),
            }
        } else {
            Optimizer::AdamW {
                beta1: o["betas"][0].as_f64().unwrap(),
                beta2: o["betas"][1].as_f64().unwrap(),
                eps: o["eps"].as_f64().unwrap(),
                weight_decay: o["weight_decay"].as_f64().unwrap(),
            }
        };
        let base = c.model.split('.').next().unwrap();
        let data_path = root().join(format!("fixtures/optim_data_{base}.npz"));
        for (backend, update) in STATE_RUNS {
            let mut s = settings(opt, o["lr"].as_f64().unwrap(), backend);
            s.state_update = update;
            s.clip_grad_norm = c.clip;
            s.batch_size = c.batch;
            s.grad_accum = c.accum.unwrap_or(1);
            if let Some(sch) = &c.schedule {
                (s.schedule, s.warmup_steps) = schedule_of(sch);
            }
            let whole = {
                let mut s = s.clone();
                s.state_part_bytes = Some(usize::MAX);
                Trainer::new(&graph, s).unwrap()
            };
            let mut t = Trainer::new(&graph, s).unwrap();
            t.total_steps = c.steps;
            let m = onnx::load(&graph).unwrap();
            let idx = dagr_inject::ops::index(&m).unwrap();
            let data = Dataset::load(&data_path, &idx, &t.data_inputs(&idx), None).unwrap();
            let batches = data.batches(c.batch, None, false);
            for i in 0..c.steps {
                t.step(data.batch(&batches[i % batches.len()])).unwrap();
            }
            if update == StateUpdate::InPlace {
                // Updated in parts, the state is bit for bit the state updated whole.
                let step = onnx::load(&t.step_graph_path()).unwrap();
                let rec: step_graph::StepRecord =
                    serde_json::from_str(step.metadata(step_graph::METADATA_KEY).unwrap()).unwrap();
                let split = c.accum.unwrap_or(1) > 1;
                if !split || rec.in_place {
                    assert!(
                        rec.state.iter().any(|l| l.rows.is_some()),
                        "case {k}: no state updated in parts"
                    );
                }
                let mut whole = whole;
                whole.total_steps = c.steps;
                for i in 0..c.steps {
                    whole.step(data.batch(&batches[i % batches.len()])).unwrap();
                }
                assert_eq!(
                    t.state().unwrap(),
                    whole.state().unwrap(),
                    "case {k}: in parts and whole differ"
                );
            }
            let tag = format!(
                "case {k} ({}, {} steps, {}, {} micro-batches) on {} ({update:?})",
                c.model,
                c.steps,
                o["kind"],
                c.accum.unwrap_or(1),
                backend.name()
            );
            let state = t.state().unwrap();
            let of = |prefix: &str| -> Vec<(String, ndarray::ArrayD<f32>)> {
                state
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                    .collect()
            };
            let params = of("param/");
            let global = params
                .iter()
                .map(|(p, _)| fx[&format!("{k}/param/{p}")].iter().fold(0f64, |a, v| a.max(v.abs())))
                .fold(0f64, f64::max);
            for (p, v) in &params {
                let want = &fx[&format!("{k}/param/{p}")];
                let e = rel_err(v, want, 1e-2 * global);
                assert!(e <= 1e-4, "{tag}: parameter {p} relative error {e:e}");
            }
            for (b, v) in &of("bn/") {
                let want = &fx[&format!("{k}/bn/{b}")];
                let e = rel_err(v, want, 1e-6);
                assert!(e <= 1e-4, "{tag}: running statistic {b} relative error {e:e}");
            }
        }
    }
}

#[test]
fn learning_rate_schedules_equal_pytorch() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/lr_schedules.json")).unwrap()).unwrap();
    for c in &cases {
        let (sched, warmup) = schedule_of(c);
        let total = c["steps"].as_u64().unwrap() as usize;
        let per_epoch = c["steps_per_epoch"].as_u64().unwrap() as usize;
        for (step, want) in c["lrs"].as_array().unwrap().iter().enumerate() {
            let got = learning_rate(c["lr"].as_f64().unwrap(), sched, warmup, step, total, step / per_epoch);
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-12 + 1e-9 * want.abs(),
                "{c}: step {step}: {got} vs PyTorch {want}"
            );
        }
    }
}

/// A step whose loss is not finite changes nothing: the next good step gives what it gives
/// from the untouched state (the backend's pending state update is dropped, not applied). With
/// two micro-batches the second one fails, after the first added its gradient to the sums: the
/// next step starts new sums.
#[test]
fn a_rejected_step_leaves_the_state_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_mlp.legacy.onnx", &["logits".into()], dir.path());
    let m = onnx::load(&graph).unwrap();
    let idx = dagr_inject::ops::index(&m).unwrap();
    let opt = adamw(1e-8);
    for ((backend, update), accum) in STATE_RUNS.into_iter().flat_map(|r| [(r, 1), (r, 2)]) {
        let fresh = || {
            let mut s = settings(opt, 1e-3, backend);
            s.state_update = update;
            s.grad_accum = accum;
            Trainer::new(&graph, s).unwrap()
        };
        let mut t = fresh();
        let data = optim_data(&t, "av_mlp", &idx);
        let rows: Vec<usize> = (0..8).collect();
        let before = t.state().unwrap();
        let mut poisoned = data.batch(&rows);
        if let Some(Value::F32(a)) = poisoned.get_mut("audio") {
            a[[7, 0]] = f32::NAN;
        }
        let e = t.step(poisoned).unwrap_err().to_string();
        assert!(e.contains("non-finite") && e.contains("nothing was updated"), "{e}");
        assert_eq!(
            t.state().unwrap(),
            before,
            "{} ({update:?}, {accum} micro-batches): a rejected step changed the state",
            backend.name()
        );
        assert_eq!(t.progress.step, 0);
        t.step(data.batch(&rows)).unwrap();
        let mut u = fresh();
        u.step(data.batch(&rows)).unwrap();
        assert_eq!(
            t.state().unwrap(),
            u.state().unwrap(),
            "{} ({update:?}, {accum} micro-batches): the step after a rejected one differs from a first step",
            backend.name()
        );
        assert_ne!(t.state().unwrap(), before);
        // Finite gradients, an update that overflows (lr * weight decay * p): refused, the
        // state as it was.
        let mut s = settings(
            Optimizer::Sgd {
                momentum: 0.9,
                nesterov: false,
                weight_decay: 3e38,
            },
            3e38,
            backend,
        );
        s.state_update = update;
        s.grad_accum = accum;
        let mut t = Trainer::new(&graph, s).unwrap();
        let before = t.state().unwrap();
        let e = t.step(data.batch(&rows)).unwrap_err().to_string();
        assert!(e.contains("update of"), "{e}");
        assert_eq!(
            t.state().unwrap(),
            before,
            "{} ({update:?}): a rejected update changed the state",
            backend.name()
        );
    }
}

/// The step graph (training graph + optimizer + clipping) is standard ONNX: onnx.checker's
/// full check passes, and it holds no parameter values (they are fed).
#[test]
fn step_graph_is_standard_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_cnn.legacy.onnx", &["logits".into()], dir.path());
    let m = onnx::load(&graph).unwrap();
    let rec = dagr_inject::train::record_of(&m).unwrap();
    for opt in [
        adamw(1e-8),
        Optimizer::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
        },
    ] {
        let sg = step_graph::build(&m, &rec, opt, Some(1.0), step_graph::Form::whole(true)).unwrap();
        let p = dir.path().join("step.onnx");
        onnx::save(&sg.model, &p).unwrap();
        onnx_check(&p);
        let inits: std::collections::HashSet<&String> = sg.model.graph().initializer.iter().map(|t| &t.name).collect();
        for (p, _) in &rec.params {
            assert!(!inits.contains(p), "{p} is still an initializer of the step graph");
        }
        let slots = opt.slots().len();
        assert_eq!(sg.state.len(), rec.params.len() * (1 + slots) + 2 * rec.batchnorm.len());
        assert!(sg.in_place, "every read of the state must come before its update");
        // It says what it is, and is not taken for a training graph.
        let saved = onnx::load(&p).unwrap();
        let report = dagr_inject::inspect::report(&saved).unwrap();
        assert_eq!(report.step.as_ref().map(|s| s.state.len()), Some(sg.state.len()));
        let e = dagr_inject::train::record_of(&saved).unwrap_err().to_string();
        assert!(e.contains("step graph"), "{e}");
        // Updated in parts, and for tract: as standard, in place, a part per row range.
        for target in [step_graph::Target::Tract, step_graph::Target::OnnxRuntime] {
            let form = step_graph::Form {
                in_place: true,
                part_bytes: None,
                target,
            };
            let whole = step_graph::build(&m, &rec, opt, Some(1.0), form).unwrap();
            onnx::save(&whole.model, &p).unwrap();
            onnx_check(&p);
            assert!(whole.in_place);
            let form = step_graph::Form {
                part_bytes: Some(1000),
                ..form
            };
            let parts = step_graph::build(&m, &rec, opt, Some(1.0), form).unwrap();
            onnx::save(&parts.model, &p).unwrap();
            onnx_check(&p);
            assert!(parts.in_place && parts.state.iter().any(|l| l.rows.is_some()));
        }
        // `inspect` counts state tensors, not parts, and says which rows each part writes.
        let text = dagr_inject::inspect::report(&onnx::load(&p).unwrap())
            .unwrap()
            .to_text();
        let keys = rec.params.len() * (1 + slots) + 2 * rec.batchnorm.len();
        assert!(text.contains(&format!("and {keys} state tensors")), "{text}");
        assert!(text.contains("(rows 0.."), "{text}");
    }
}

/// In place, the step's test of each update is a bound from norms (no candidate update is
/// made): checked against the exact test of the same step (every candidate's finiteness, as
/// the two-set step graph makes it) over states and learning rates from ordinary to past
/// float32's range. The bound never accepts an update the exact test refuses, refuses nothing
/// at ordinary magnitudes, and where it accepts, the in-place graph writes exactly the two-set
/// graph's update (and the old state where it refuses). AdamW with eps 0 has no bound: its
/// in-place graph tests the candidates.
#[test]
fn in_place_bounds_refuse_every_update_the_exact_test_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_mlp.legacy.onnx", &["logits".into()], dir.path());
    let m = onnx::load(&graph).unwrap();
    let rec = dagr_inject::train::record_of(&m).unwrap();
    let idx = dagr_inject::ops::index(&m).unwrap();
    let sgd = Optimizer::Sgd {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 1e-4,
    };
    let mut false_refusals = 0;
    // Each graph in the form for each runtime (their norms differ: `step_graph::Target`), run
    // there.
    let targets = [
        (step_graph::Target::OnnxRuntime, Backend::Ort),
        (step_graph::Target::Tract, Backend::Tract),
    ];
    let cases = [(adamw(1e-8), true), (sgd, true), (adamw(0.0), false)];
    for ((opt, bounded), (target, backend)) in cases.into_iter().flat_map(|c| targets.map(|t| (c, t))) {
        let form = |in_place: bool| step_graph::Form {
            in_place,
            part_bytes: None,
            target,
        };
        let exact = step_graph::build(&m, &rec, opt, None, form(false)).unwrap();
        let gated = step_graph::build(&m, &rec, opt, None, form(true)).unwrap();
        assert!(!exact.check_bounds && gated.in_place);
        assert_eq!(gated.check_bounds, bounded, "{opt:?}");
        let (pe, pg) = (dir.path().join("exact.onnx"), dir.path().join("gated.onnx"));
        onnx::save(&exact.model, &pe).unwrap();
        onnx::save(&gated.model, &pg).unwrap();
        let t = Trainer::new(&graph, settings(opt, 1e-3, Backend::Ort)).unwrap();
        let data = optim_data(&t, "av_mlp", &idx);
        let start = t.state().unwrap();
        let rows: Vec<usize> = (0..8).collect();
        // (parameter scale, first slot's values, second slot's, learning rate): ordinary
        // first, then towards and past float32's range.
        for (k, &(ps, m1, m2, lr)) in [
            (1.0, 1e-3, 1e-6, 1e-3),
            (1.0, 1.0, 0.0, 10.0),
            (3.0, 1e3, 1e6, 1e3),
            (1.0, 1e30, 0.0, 1e-3),
            (1.0, 1e36, 0.0, 1.0),
            (1.0, 1e36, 1e30, 1e-3),
            (1.0, 1e-3, 3e38, 1e-3),
            (1.0, 1e-3, 1e-6, 1e36),
            (1.0, 1e3, 0.0, 1e36),
            (1e15, 1e-3, 1e-6, 1e-3),
            (1.0, 3e38, 0.0, 1e-3),
            (1.0, 1e-3, 1e-6, 3e38),
        ]
        .iter()
        .enumerate()
        {
            let mut feed = data.batch(&rows);
            for (name, v) in opt.scalars(lr, 3) {
                feed.insert(name.to_string(), Value::F32(ndarray::arr0(v as f32).into_dyn()));
            }
            for l in &gated.state {
                let fill = |v: f64| start[&l.key].mapv(|_| v as f32);
                let v = if l.key == step_graph::param_key(&l.input) {
                    start[&l.key].mapv(|x| x * ps)
                } else if l.key.starts_with("m/") {
                    fill(m1)
                } else {
                    fill(m2)
                };
                feed.insert(l.input.clone(), Value::F32(v));
            }
            let mut names: Vec<String> = gated.state.iter().map(|l| l.output.clone()).collect();
            names.push(step_graph::STATE_CHECK.into());
            let got = run(backend, &pg, &feed, &names);
            let want = run(
                backend,
                &pe,
                &feed,
                &[
                    step_graph::STATE_CHECK.to_string(),
                    step_graph::GRAD_SQ.to_string(),
                    rec.loss.clone(),
                ],
            );
            let (b, e) = (
                f32_of(&got, step_graph::STATE_CHECK),
                f32_of(&want, step_graph::STATE_CHECK),
            );
            let gsq = f32_of(&want, step_graph::GRAD_SQ);
            assert_eq!(exact.state.len(), gated.state.len());
            let loss = f32_of(&want, &rec.loss);
            let mut accepted = gsq.iter().chain(&loss).all(|v| v.is_finite());
            for (i, (le, lg)) in exact.state.iter().zip(&gated.state).enumerate() {
                assert_eq!(le.key, lg.key);
                assert!(
                    e[i] == 0.0 || b[i] == 1.0,
                    "{opt:?} {target:?} case {k}: the exact test refuses {}, the bound accepts it",
                    le.key
                );
                if k < 3 {
                    assert_eq!(
                        b[i], e[i],
                        "{opt:?} case {k}: {} judged otherwise at ordinary magnitudes",
                        le.key
                    );
                    assert!(e[i] == 0.0 || !bounded, "{opt:?} case {k}: {} refused", le.key);
                }
                false_refusals += usize::from(b[i] != e[i]);
                accepted &= b[i] == 0.0;
            }
            let want_state = run(
                backend,
                &pe,
                &feed,
                &exact.state.iter().map(|l| l.output.clone()).collect::<Vec<_>>(),
            );
            for (le, lg) in exact.state.iter().zip(&gated.state) {
                let v = f32_of(&got, &lg.output);
                let expect = match accepted {
                    true => f32_of(&want_state, &le.output),
                    false => feed[&lg.input].as_f32().unwrap().clone(),
                };
                assert!(
                    v.iter().zip(&expect).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{opt:?} case {k}: {} is not the {} state",
                    le.key,
                    if accepted { "updated" } else { "old" }
                );
            }
        }
    }
    // The bound is not the exact test: past float32's range it refuses some finite updates.
    assert!(false_refusals > 0);
}

/// tract runs its kernels on `threads` threads (matrix products by output tiles, element-wise
/// ops by blocks), which changes nothing but the time: three steps of the CNN model on four
/// threads, with tract's thresholds at 0 so that every kernel it can split is split, give the
/// state one thread gives, bit for bit.
#[test]
fn tract_threads_change_nothing_but_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_cnn.legacy.onnx", &["logits".into()], dir.path());
    let m = onnx::load(&graph).unwrap();
    let idx = dagr_inject::ops::index(&m).unwrap();
    let opt = adamw(1e-8);
    tract_linalg::multithread::set_threading_panel_threshold(0);
    tract_linalg::multithread::set_threading_element_threshold(0);
    tract_linalg::multithread::set_threading_mac_threshold(0);
    let states: Vec<_> = [1, 4]
        .into_iter()
        .map(|threads| {
            let mut s = settings(opt, 1e-3, Backend::Tract);
            s.threads = Some(threads);
            let mut t = Trainer::new(&graph, s).unwrap();
            let data = optim_data(&t, "av_cnn", &idx);
            for k in 0..3 {
                let rows: Vec<usize> = (4 * k..4 * k + 4).collect();
                t.step(data.batch(&rows)).unwrap();
            }
            t.state().unwrap()
        })
        .collect();
    // Back to tract's defaults for the other tests of this binary.
    tract_linalg::multithread::set_threading_panel_threshold(64);
    tract_linalg::multithread::set_threading_element_threshold(32768);
    tract_linalg::multithread::set_threading_mac_threshold(1 << 21);
    for (k, v) in &states[0] {
        let w = &states[1][k];
        assert!(
            v.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{k}: 4 threads differ from 1 by {}",
            max_abs_diff(v, w)
        );
    }
}

/// A step graph in which a parameter is read after its update could be written (here: an
/// output that copies the parameter and feeds nothing the update waits for) is not updated in
/// place, and ONNX Runtime keeps two state sets for it; both ways give the same steps.
#[test]
fn the_state_is_updated_in_place_only_where_every_read_comes_first() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_mlp.legacy.onnx", &["logits".into()], dir.path());
    let m = onnx::load(&graph).unwrap();
    let rec = dagr_inject::train::record_of(&m).unwrap();
    let opt = Optimizer::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    };
    assert!(
        step_graph::build(&m, &rec, opt, None, step_graph::Form::whole(true))
            .unwrap()
            .in_place
    );
    let mut late = m.clone();
    let p = rec.params[0].0.clone();
    let fact = dagr_inject::ops::index(&m).unwrap().fact(&p).cloned().unwrap();
    let mut copy = onnx::proto::NodeProto::new();
    copy.op_type = "Identity".into();
    copy.name = "late_reader".into();
    copy.input.push(p.clone());
    copy.output.push("late_copy".into());
    late.graph_mut().node.push(copy);
    late.graph_mut().output.push(fact.to_value_info("late_copy"));
    assert!(
        !step_graph::build(&late, &rec, opt, None, step_graph::Form::whole(true))
            .unwrap()
            .in_place
    );
    // Asked for parts, it updates whole (parts are written into their state's buffer only).
    let parts = step_graph::Form {
        part_bytes: Some(1000),
        ..step_graph::Form::whole(true)
    };
    let whole = step_graph::build(&late, &rec, opt, None, parts).unwrap();
    assert!(!whole.in_place && whole.state.iter().all(|l| l.rows.is_none()));
    assert!(step_graph::build(&m, &rec, opt, None, parts)
        .unwrap()
        .state
        .iter()
        .any(|l| l.rows.is_some()));
    let late_path = dir.path().join("late.train.onnx");
    onnx::save(&late, &late_path).unwrap();
    let idx = dagr_inject::ops::index(&m).unwrap();
    let mut s = settings(opt, 0.05, Backend::Ort);
    s.state_update = StateUpdate::InPlace;
    let mut a = Trainer::new(&graph, s.clone()).unwrap();
    let mut b = Trainer::new(&late_path, s).unwrap();
    let mut c = Trainer::new(&graph, settings(opt, 0.05, Backend::Tract)).unwrap();
    let data = optim_data(&a, "av_mlp", &idx);
    for k in 0..3 {
        let rows: Vec<usize> = (4 * k..4 * k + 4).collect();
        a.step(data.batch(&rows)).unwrap();
        b.step(data.batch(&rows)).unwrap();
        c.step(data.batch(&rows)).unwrap();
    }
    let (a, b, c) = (a.state().unwrap(), b.state().unwrap(), c.state().unwrap());
    assert_eq!(a, b, "in place and two sets differ");
    for (k, v) in &a {
        let d = max_abs_diff(v, &c[k]);
        assert!(d < 1e-5, "{k}: ONNX Runtime in place and tract differ by {d}");
    }
}

/// `--state-update auto`: two sets for a small state and, on the CPU, for the 138M-parameter
/// benchmark model, in place where two sets would pass 1.5x PyTorch's memory (a large model with
/// momentum or AdamW; on CUDA, the 138M model already) or not fit in the free memory.
#[test]
fn auto_updates_in_place_where_two_sets_cost_too_much() {
    use dagr_inject::runtime::Device;
    use dagr_inject::train::auto_in_place;
    let mb = |n: u64| n << 20;
    let gib = |n: u64| n << 30;
    // (device, free memory, parameters, slots per parameter) -> in place? On CUDA the host's
    // free memory does not count, the device's fixed costs do; those rows are what was measured
    // on an H200 (`scripts/bench_scale.py --device cuda`, device memory as NVML reports it,
    // against PyTorch's): 10M parameters, two sets: 1.30x with momentum, 1.29x with AdamW; 138M,
    // two sets: 1.67x and 1.49x, in place: 1.28x and 1.09x.
    let (cpu, cuda) = (Device::Cpu, Device::Cuda);
    for (device, free, params, slots, want) in [
        (cpu, gib(20), mb(40), 2, false),
        (cpu, gib(20), mb(552), 1, false),
        (cpu, gib(20), mb(552), 2, false),
        (cpu, gib(20), mb(2000), 0, false),
        (cpu, gib(20), mb(4000), 1, true),
        (cpu, gib(20), mb(5600), 2, true),
        // Two sets that would not fit in the free memory.
        (cpu, gib(4), mb(552), 2, true),
        (cuda, gib(1), mb(40), 1, false),
        (cuda, gib(1), mb(40), 2, false),
        (cuda, gib(1), mb(552), 1, true),
        (cuda, gib(1), mb(552), 2, true),
    ] {
        let state = params * (1 + slots);
        assert_eq!(
            auto_in_place(state, params, device, Some(free)),
            want,
            "{device:?}: {} MB of parameters, {slots} slots, {} GiB free",
            params >> 20,
            free >> 30
        );
    }
}

/// In place on the host, parts where the whole update would not fit comfortably: the state, the
/// gradients and three temporaries of the largest tensor past 80% of the free memory (this
/// machine's 24 GB: the 1.35B-parameter AdamW model, which PyTorch trains here, is updated in
/// parts; 500M with 14 GB free is updated whole); parts where the free memory is unknown.
#[test]
fn auto_updates_in_parts_where_memory_is_short() {
    use dagr_inject::train::auto_parts;
    let mb = |n: u64| n << 20;
    let gib = |n: u64| n << 30;
    // (free, parameters, slots, largest tensor) -> in parts?
    for (free, params, slots, largest, want) in [
        (Some(gib(23)), mb(5400), 2, mb(890), true),
        (Some(gib(23)), mb(2000), 2, mb(330), false),
        (Some(gib(14)), mb(2000), 2, mb(330), false),
        (Some(gib(10)), mb(2000), 2, mb(330), true),
        (Some(gib(23)), mb(4000), 1, mb(660), false),
        (None, mb(40), 1, mb(4), true),
    ] {
        let state = params * (1 + slots);
        assert_eq!(
            auto_parts(state, params, largest, free),
            want,
            "{} MB of parameters, {slots} slots, largest {} MB, free {free:?}",
            params >> 20,
            largest >> 20
        );
    }
}

/// `step.onnx` works on its own, as its metadata describes it: fed the batch, the scalars and
/// the state by the names its `StepRecord` lists, a plain run (no binding) returns the state
/// that `train` holds after the same step.
#[test]
fn the_step_graph_runs_standalone_as_its_record_says() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_cnn.legacy.onnx", &["logits".into()], dir.path());
    let m = onnx::load(&graph).unwrap();
    let idx = dagr_inject::ops::index(&m).unwrap();
    let opt = Optimizer::Sgd {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 1e-4,
    };
    for backend in BACKENDS {
        let mut s = settings(opt, 0.01, backend);
        s.clip_grad_norm = Some(1.0);
        let mut t = Trainer::new(&graph, s).unwrap();
        let data = optim_data(&t, "av_cnn", &idx);
        let rows: Vec<usize> = (0..8).collect();
        let before = t.state().unwrap();
        t.step(data.batch(&rows)).unwrap();
        let after = t.state().unwrap();

        let step = onnx::load(&t.step_graph_path()).unwrap();
        let rec: step_graph::StepRecord =
            serde_json::from_str(step.metadata(step_graph::METADATA_KEY).unwrap()).unwrap();
        let mut feed = data.batch(&rows);
        for name in &rec.scalars {
            assert_eq!(name, "dagr/opt/lr");
            feed.insert(name.clone(), Value::F32(ndarray::arr0(0.01f32).into_dyn()));
        }
        for l in &rec.state {
            feed.insert(l.input.clone(), Value::F32(before[&l.key].clone()));
        }
        let outputs: Vec<String> = rec.state.iter().map(|l| l.output.clone()).collect();
        let out = run(backend, &t.step_graph_path(), &feed, &outputs);
        for l in &rec.state {
            let got = f32_of(&out, &l.output);
            let e = rel_err(&got, &after[&l.key].mapv(|v| v as f64), 1e-6);
            assert!(e < 1e-6, "{}: {} differs by {e}", backend.name(), l.key);
        }
    }
}

/// The state tensors of the checkpoint in `dir`, checked (record, checksum) by the library.
pub fn checkpoint_state(dir: &Path) -> dagr_inject::runtime::StateValues {
    let mut z = dagr_inject::npz::Npz::open(&dir.join(checkpoint::FILE)).unwrap();
    let names: Vec<String> = z
        .names()
        .into_iter()
        .filter(|n| n != checkpoint::RECORD_ENTRY)
        .collect();
    let shapes = names
        .iter()
        .map(|n| (n.clone(), z.array(n).unwrap().shape().to_vec()))
        .collect();
    checkpoint::load(dir, &shapes).unwrap().1
}

fn shapes_of(s: &dagr_inject::runtime::StateValues) -> std::collections::BTreeMap<String, Vec<usize>> {
    s.iter().map(|(k, v)| (k.clone(), v.shape().to_vec())).collect()
}

fn run_dir<'a>(graph: &'a Path, data: &'a Path, out: &'a Path) -> Run<'a> {
    Run {
        model: graph,
        train: data,
        val: Some(data),
        out,
        original: None,
        resume: false,
        force: false,
        new_settings: false,
        max_steps: None,
        comm: &dagr_inject::dist::Alone,
    }
}

#[test]
fn resume_equals_an_uninterrupted_run_and_seeds_reproduce() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_mlp.legacy.onnx", &["logits".into()], dir.path());
    let data = root().join("fixtures/optim_data_av_mlp.npz");
    let opt = Optimizer::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 1e-4,
    };
    let mut s = settings(opt, 0.05, Backend::Ort);
    s.epochs = 4;
    s.shuffle = true;
    s.seed = 7;
    s.schedule = Schedule::Cosine { min_lr: 0.0 };
    s.warmup_steps = 2;
    let no = Arc::new(AtomicBool::new(false));
    let full = dir.path().join("full");
    fit(&run_dir(&graph, &data, &full), s.clone(), &mut no.clone()).unwrap();
    let again = dir.path().join("again");
    fit(&run_dir(&graph, &data, &again), s.clone(), &mut no.clone()).unwrap();
    // Interrupted after two of four epochs (3 steps each), same settings.
    let half = dir.path().join("half");
    let mut stopped = run_dir(&graph, &data, &half);
    stopped.max_steps = Some(6);
    fit(&stopped, s.clone(), &mut no.clone()).unwrap();
    // An existing directory is refused without --resume/--force ...
    let e = fit(&run_dir(&graph, &data, &half), s.clone(), &mut no.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists") && e.contains("`resume`"), "{e}");
    // ... and continued with it.
    let mut r = run_dir(&graph, &data, &half);
    r.resume = true;
    fit(&r, s.clone(), &mut no.clone()).unwrap();
    let a = checkpoint_state(&full);
    let b = checkpoint_state(&half);
    let c = checkpoint_state(&again);
    assert_eq!(a, c, "the same seed must give the same run");
    assert_eq!(a, b, "resuming must give the same parameters as an uninterrupted run");
    // A checkpoint whose tensors do not fit the graph is refused before any step.
    let mut bad = a.clone();
    let key = bad.keys().find(|k| k.starts_with("param/")).unwrap().clone();
    bad.insert(key, ndarray::ArrayD::zeros(vec![3, 3, 3]));
    let record = checkpoint::load(&half, &shapes_of(&a)).unwrap().0;
    checkpoint::save_values(&half, &record, &bad).unwrap();
    let mut r = run_dir(&graph, &data, &half);
    r.resume = true;
    let e = fit(&r, s.clone(), &mut Arc::new(AtomicBool::new(false)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit") && e.contains("[3, 3, 3]"), "{e}");
    let log = std::fs::read_to_string(full.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4);
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert!(
        last["task_loss"].as_f64().unwrap() < first["task_loss"].as_f64().unwrap(),
        "the task loss must decrease"
    );
    assert!(last["val_accuracy"]["logits"].as_f64().is_some());
    assert!(last["dispersion"].as_f64().is_some() && last["anchoring"].as_f64().is_some());
    // Geometry of the validation embeddings, per epoch.
    for key in [
        "erank.audio",
        "erank.visual",
        "margin.audio",
        "drift.audio-visual",
        "gap.audio-visual",
    ] {
        assert!(last["geometry"][key].as_f64().is_some(), "no {key} in {last}");
    }
    // ... which diagnose draws.
    let svg = dagr_inject::plots::curves(&log).unwrap();
    assert!(svg.contains("geometry.erank.audio") && svg.matches("<polyline").count() >= 10);
}

/// With micro-batches, a resumed run equals an uninterrupted one: the summed gradients are
/// working buffers, not state (the checkpoint holds none), and the run keeps both graphs.
#[test]
fn accumulated_runs_resume_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_mlp.legacy.onnx", &["logits".into()], dir.path());
    let data = root().join("fixtures/optim_data_av_mlp.npz");
    let opt = adamw(1e-8);
    for backend in [Backend::Tract, Backend::Ort] {
        let mut s = settings(opt, 1e-3, backend);
        s.epochs = 3;
        s.shuffle = true;
        s.seed = 5;
        s.grad_accum = 3;
        let no = Arc::new(AtomicBool::new(false));
        let full = dir.path().join(format!("full-{}", backend.name()));
        fit(&run_dir(&graph, &data, &full), s.clone(), &mut no.clone()).unwrap();
        assert!(full.join("step.grad.onnx").exists() && full.join("step.onnx").exists());
        let half = dir.path().join(format!("half-{}", backend.name()));
        let mut stopped = run_dir(&graph, &data, &half);
        stopped.max_steps = Some(3);
        fit(&stopped, s.clone(), &mut no.clone()).unwrap();
        let mut r = run_dir(&graph, &data, &half);
        r.resume = true;
        fit(&r, s.clone(), &mut no.clone()).unwrap();
        let a = checkpoint_state(&full);
        assert!(a.keys().all(|k| !k.starts_with("acc/")), "{:?}", a.keys());
        assert_eq!(a, checkpoint_state(&half), "{}", backend.name());
    }
}

#[test]
fn exported_model_predicts_like_the_trained_graph() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_mlp.legacy.onnx", &["logits".into()], dir.path());
    let data = root().join("fixtures/optim_data_av_mlp.npz");
    let out = dir.path().join("run");
    let mut s = settings(
        Optimizer::Sgd {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        },
        0.05,
        Backend::Tract,
    );
    s.epochs = 2;
    fit(
        &run_dir(&graph, &data, &out),
        s.clone(),
        &mut Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    let exported = out.join("model.onnx");
    onnx_check(&exported);
    let m = onnx::load(&exported).unwrap();
    assert!(m.metadata("dagr_inject").is_none() && !m.graph().node.iter().any(|n| n.name.starts_with("dagr/")));
    // The training graph fed with the checkpoint's parameters computes the same logits.
    let ck = checkpoint_state(&out);
    let mut feed = dagr_inject::npz::read(&data).unwrap();
    for (k, v) in ck.iter() {
        if let Some(p) = k.strip_prefix("param/") {
            feed.insert(p.to_string(), Value::F32(v.clone()));
        }
    }
    for backend in BACKENDS {
        let a = run(backend, &exported, &feed, &["logits".to_string()]);
        let b = run(backend, &graph, &feed, &["logits".to_string()]);
        let (a, b) = (f32_of(&a, "logits"), f32_of(&b, "logits"));
        let e = rel_err(&a, &b.mapv(|v| v as f64), 1e-6);
        assert!(
            e < 1e-6,
            "{}: exported logits differ from the training graph's by {e}",
            backend.name()
        );
    }
}

/// A model whose weights are external data trains and exports in the same layout: the trained
/// model's weights go to `model.onnx.data` beside it (streamed from the backend), never inline;
/// every external tensor holds the checkpoint's value where it trained and the original's bytes
/// where it did not; and it predicts like the training graph, on both backends.
#[test]
fn a_model_with_external_data_exports_its_weights_as_external_data() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let inline = onnx::load(&root().join("models/av_mlp.legacy.onnx")).unwrap();
    let original = externalize(&inline, &src, "av_mlp.onnx");
    let original_path = src.join("av_mlp.onnx");
    let mut m = onnx::load(&original_path).unwrap();
    let cfg = Config {
        encoders: vec!["audio".into(), "visual".into()],
        task: Task::CrossEntropy {
            logits: vec!["logits".into()],
            labels: "label".into(),
        },
        ..Default::default()
    };
    // A frozen tensor stays external and is copied from the original's data.
    let opts = TrainOptions {
        freeze: vec!["audio_encoder.fc1.bias".into()],
        ..Default::default()
    };
    make_training_graph(&mut m, &cfg, &opts).unwrap();
    let graph_dir = dir.path().join("graph");
    std::fs::create_dir(&graph_dir).unwrap();
    let graph = graph_dir.join("av_mlp.train.onnx");
    onnx::save(&m, &graph).unwrap();
    let data = root().join("fixtures/optim_data_av_mlp.npz");
    for backend in BACKENDS {
        let out = dir.path().join(format!("run_{}", backend.name()));
        let mut s = settings(adamw(1e-8), 0.01, backend);
        s.epochs = 2;
        let mut r = run_dir(&graph, &data, &out);
        r.original = Some(&original_path);
        fit(&r, s, &mut Arc::new(AtomicBool::new(false))).unwrap();
        let exported = out.join("model.onnx");
        onnx_check(&exported);
        let e = onnx::load(&exported).unwrap();
        let ck = checkpoint_state(&out);
        let mut trained = 0;
        for t in &e.graph().initializer {
            let was = original.graph().initializer.iter().find(|o| o.name == t.name).unwrap();
            assert_eq!(
                onnx::io::is_external(t),
                onnx::io::is_external(was),
                "'{}' changed its layout",
                t.name
            );
            if !onnx::io::is_external(t) {
                continue;
            }
            let (loc, off, _) = onnx::io::external_info(t).unwrap();
            assert_eq!(loc.as_deref(), Some("model.onnx.data"), "'{}'", t.name);
            assert_eq!(off % 4096, 0, "'{}' is not page-aligned", t.name);
            if t.data_type != 1 {
                continue;
            }
            let got = onnx::tensor::to_f32(t, &e.base_dir).unwrap();
            match ck.get(&format!("param/{}", t.name)) {
                Some(p) => {
                    trained += 1;
                    assert_eq!(got, p.iter().copied().collect::<Vec<f32>>(), "'{}'", t.name);
                }
                None => assert_eq!(
                    got,
                    onnx::tensor::to_f32(was, &original.base_dir).unwrap(),
                    "'{}'",
                    t.name
                ),
            }
        }
        assert!(
            trained > 0 && trained < e.graph().initializer.len(),
            "{trained} trained tensors: both kinds must be external"
        );
        assert!(
            std::fs::metadata(&exported).unwrap().len() < 64 * 1024,
            "the weights went inline"
        );
        let mut feed = dagr_inject::npz::read(&data).unwrap();
        for (k, v) in ck.iter() {
            if let Some(p) = k.strip_prefix("param/") {
                feed.insert(p.to_string(), Value::F32(v.clone()));
            }
        }
        let a = run(Backend::Ort, &exported, &feed, &["logits".to_string()]);
        let b = run(Backend::Ort, &graph, &feed, &["logits".to_string()]);
        let err = rel_err(&f32_of(&a, "logits"), &f32_of(&b, "logits").mapv(|v| v as f64), 1e-6);
        assert!(err < 1e-6, "{}: exported logits differ by {err}", backend.name());
    }
}

#[test]
fn bad_training_inputs_stop_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_mlp.legacy.onnx", &["logits".into()], dir.path());
    let good = dagr_inject::npz::read(&root().join("fixtures/optim_data_av_mlp.npz")).unwrap();
    let no = Arc::new(AtomicBool::new(false));
    let s = settings(
        Optimizer::Sgd {
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        },
        0.05,
        Backend::Ort,
    );
    let write = |name: &str, t: &dagr_inject::runtime::Tensors| {
        let p = dir.path().join(name);
        dagr_inject::npz::write(&p, t).unwrap();
        p
    };
    let mut missing = good.clone();
    missing.remove("visual");
    let p = write("missing.npz", &missing);
    let e = fit(&run_dir(&graph, &p, &dir.path().join("o1")), s.clone(), &mut no.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no array named 'visual'"), "{e}");

    let mut shape = good.clone();
    shape.insert("audio".into(), Value::F32(ndarray::ArrayD::zeros(vec![24, 39])));
    let p = write("shape.npz", &shape);
    let e = fit(&run_dir(&graph, &p, &dir.path().join("o2")), s.clone(), &mut no.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("'audio' has shape [24, 39]"), "{e}");

    let mut labels = good.clone();
    labels.insert("label".into(), Value::I64(ndarray::ArrayD::from_elem(vec![24], 10)));
    let p = write("labels.npz", &labels);
    let e = fit(&run_dir(&graph, &p, &dir.path().join("o3")), s.clone(), &mut no.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 10") && e.contains("out of range"), "{e}");

    // A diverging run stops at the first non-finite step and keeps the last good checkpoint.
    let p = write("good.npz", &good);
    let out = dir.path().join("o4");
    let mut calm = s.clone();
    calm.epochs = 1;
    fit(&run_dir(&graph, &p, &out), calm, &mut no.clone()).unwrap();
    let before = std::fs::read(out.join("checkpoint.npz")).unwrap();
    let mut wild = s.clone();
    wild.lr = 1e30;
    wild.epochs = 3;
    let mut r = run_dir(&graph, &p, &out);
    r.resume = true;
    // Other settings than the checkpoint's are refused unless asked for.
    let e = fit(&r, wild.clone(), &mut no.clone()).unwrap_err().to_string();
    assert!(
        e.contains("other settings") && e.contains("lr: checkpoint 0.05, this run 1e+30"),
        "{e}"
    );
    r.new_settings = true;
    let e = fit(&r, wild, &mut no.clone()).unwrap_err().to_string();
    assert!(e.contains("non-finite") && e.contains("last good checkpoint"), "{e}");
    assert_eq!(
        before,
        std::fs::read(out.join("checkpoint.npz")).unwrap(),
        "the good checkpoint was overwritten"
    );

    // Ctrl-C: the run stops before the next step and says how to continue ...
    let mut more = s.clone();
    more.epochs = 3;
    let mut r = run_dir(&graph, &p, &out);
    r.resume = true;
    let e = fit(&r, more, &mut Arc::new(AtomicBool::new(true)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("interrupted") && e.contains("intact") && e.contains("`resume`"),
        "{e}"
    );
    // ... and before any epoch completed, it says that nothing was kept.
    let o5 = dir.path().join("o5");
    let e = fit(&run_dir(&graph, &p, &o5), s, &mut Arc::new(AtomicBool::new(true)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("interrupted") && e.contains("nothing was saved"), "{e}");
    assert!(!o5.exists());
}

/// A training-mode Dropout without a mask output (what the dynamo exporter writes) trains: its
/// mask becomes an input that the trainer draws from its seed, so tract and ONNX Runtime take
/// the same steps; the gradient through it passes finite differences; the exported model
/// predicts in inference mode.
#[test]
fn training_mode_dropout_is_fed_its_mask_and_trains_alike_on_both_backends() {
    use dagr_inject::onnx::builder::Builder;
    let dir = tempfile::tempdir().unwrap();
    let mut m = onnx::load(&root().join("models/av_mlp.legacy.onnx")).unwrap();
    // Dropout(p = 0.3, training) after the audio encoder's hidden ReLU.
    let (pos, relu) = m
        .graph()
        .node
        .iter()
        .enumerate()
        .find(|(_, n)| n.op_type == "Relu" && n.name.contains("audio"))
        .map(|(i, n)| (i, n.output[0].clone()))
        .unwrap();
    let mut b = Builder::new(&m, "t/");
    let ratio = b.const_f32(&[], &[0.3]);
    let mut t = onnx::tensor::i64_tensor("t/training", &[], &[]);
    t.data_type = onnx::dtype::BOOL;
    t.raw_data = vec![1];
    b.initializers.push(t);
    b.op_named("Dropout", &[&relu, &ratio, "t/training"], vec![], "t/dropped");
    let mut node = b.nodes.pop().unwrap();
    node.name = "/audio_encoder/dropout/Dropout".into();
    b.finish(&mut m);
    for n in m.graph_mut().node.iter_mut() {
        for i in n.input.iter_mut() {
            if *i == relu {
                *i = "t/dropped".into();
            }
        }
    }
    m.graph_mut().node.insert(pos + 1, node);
    let cfg = Config {
        encoders: vec!["audio".into(), "visual".into()],
        task: Task::CrossEntropy {
            logits: vec!["logits".into()],
            labels: "label".into(),
        },
        ..Default::default()
    };
    let rec = make_training_graph(&mut m, &cfg, &TrainOptions::default()).unwrap();
    assert_eq!(rec.dropout_masks.len(), 1);
    let mask = &rec.dropout_masks[0];
    assert_eq!(
        (mask.ratio as f32, mask.shape.as_slice()),
        (0.3, &["batch".to_string(), "64".to_string()][..])
    );
    assert!(m.graph().node.iter().all(|n| n.op_type != "Dropout"));
    let graph = dir.path().join("dropout.train.onnx");
    onnx::save(&m, &graph).unwrap();
    onnx_check(&graph);

    // The gradient through a fed mask: finite differences (ONNX Runtime), and backend parity.
    let data_path = root().join("fixtures/optim_data_av_mlp.npz");
    let idx = dagr_inject::ops::index(&m).unwrap();
    let sgd = Optimizer::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    };
    let max_diff = |x: &ndarray::ArrayD<f32>, y: &ndarray::ArrayD<f32>| max_abs_diff(x, y);
    let t = Trainer::new(&graph, settings(sgd, 0.05, Backend::Tract)).unwrap();
    let data = Dataset::load(&data_path, &idx, &t.data_inputs(&idx), None).unwrap();
    assert!(!t.data_inputs(&idx).contains(&mask.input), "the mask is not data");
    let mut feed = data.batch(&[0, 1, 2, 3]);
    let bits: Vec<bool> = (0..4 * 64).map(|i| (i * 7 + 3) % 10 >= 3).collect();
    feed.insert(
        mask.input.clone(),
        Value::Bool(ndarray::ArrayD::from_shape_vec(vec![4, 64], bits).unwrap()),
    );
    let checks = dagr_inject::verify::param_finite_differences(&graph, &feed, Backend::Ort, 2).unwrap();
    assert!(checks.iter().all(|c| c.pass), "{checks:?}");
    let outs: Vec<String> = rec
        .params
        .iter()
        .map(|p| p.1.clone())
        .chain([rec.loss.clone()])
        .collect();
    let a = run(Backend::Tract, &graph, &feed, &outs);
    let b = run(Backend::Ort, &graph, &feed, &outs);
    for o in &outs {
        let d = max_diff(&f32_of(&a, o), &f32_of(&b, o));
        assert!(d < 1e-5, "{o}: tract and ONNX Runtime differ by {d}");
    }

    // Three steps on each backend draw the same masks: the same parameters after.
    let mut finals = Vec::new();
    for backend in BACKENDS {
        let mut t = Trainer::new(&graph, settings(sgd, 0.05, backend)).unwrap();
        for k in 0..3 {
            t.step(data.batch(&[k, k + 1, k + 2, k + 3])).unwrap();
        }
        finals.push(t.state().unwrap());
    }
    for (k, v) in &finals[0] {
        let w = &finals[1][k];
        let d = max_diff(v, w);
        assert!(d < 1e-5, "{k}: the backends' states differ by {d} after 3 steps");
    }
    // The exported model predicts: no Dropout in training mode left.
    let exported = Trainer::new(&graph, settings(sgd, 0.05, Backend::Tract))
        .unwrap()
        .export(
            &onnx::load(&root().join("models/av_mlp.legacy.onnx")).unwrap(),
            &finals[0],
        )
        .unwrap();
    assert!(exported
        .graph()
        .node
        .iter()
        .all(|n| n.op_type != "Dropout" || n.input.len() <= 2));
}
