//! `dagr-inject train`: run a training graph (built with `--train`) step by step on tract or
//! ONNX Runtime, update the parameters, log, checkpoint, and export the trained inference model.
//!
//! The graph computes the loss and every `<param>_grad`; the optimizer (`optim`, equal to
//! `torch.optim`) runs on the host between steps.

pub mod data;
pub mod optim;

use crate::error::{Error, Result};
use crate::grad::train::{TrainRecord, METADATA_KEY};
use crate::onnx::{self, dtype, tensor, GraphIndex, Model};
use crate::runtime::{Backend, Runner, Tensors, Value};
use data::{Dataset, Rng};
use ndarray::ArrayD;
use optim::{Optimizer, Schedule, State};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub clip_grad_norm: Option<f64>,
    pub seed: u64,
    pub shuffle: bool,
    pub drop_last: bool,
    pub backend: Backend,
    pub cuda: bool,
}

/// Read the training record a `--train` rewrite stored in the model.
pub fn record_of(model: &Model) -> Result<TrainRecord> {
    let s = model.metadata(METADATA_KEY).ok_or_else(|| {
        Error::Config(
            "this model is not a training graph\n  hint: build one with `dagr-inject MODEL --encoders a,b --logits ... --labels y --train -o model.train.onnx`"
                .into(),
        )
    })?;
    serde_json::from_str(s).map_err(|e| Error::Config(format!("the training metadata is unreadable: {e}")))
}

/// Parameters, BatchNorm statistics and optimizer state: everything a step changes.
#[derive(Debug, Clone, Default)]
pub struct TrainState {
    pub params: BTreeMap<String, ArrayD<f32>>,
    pub bn: BTreeMap<String, ArrayD<f32>>,
    pub opt: BTreeMap<String, State>,
    /// Steps taken.
    pub step: usize,
    /// Epochs completed.
    pub epoch: usize,
    pub rng: Rng,
}

fn initializer_arrays(model: &Model, names: &[String]) -> Result<BTreeMap<String, ArrayD<f32>>> {
    let mut out = BTreeMap::new();
    for n in names {
        let t = model
            .graph()
            .initializer
            .iter()
            .find(|t| &t.name == n)
            .ok_or_else(|| Error::Graph(format!("the training graph has no initializer '{n}'")))?;
        if t.data_type != dtype::FLOAT {
            return Err(Error::Config(format!(
                "parameter '{n}' is {}; training supports float32 parameters",
                dtype::name(t.data_type)
            )));
        }
        let v = tensor::to_f32(t, &model.base_dir)?;
        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        out.insert(
            n.clone(),
            ArrayD::from_shape_vec(shape, v).map_err(|e| Error::Graph(e.to_string()))?,
        );
    }
    Ok(out)
}

/// What one step reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepStats {
    pub loss: f64,
    pub task_loss: Option<f64>,
    pub dagr_loss: f64,
    pub dispersion: f64,
    pub anchoring: Option<f64>,
    pub pareto_alpha: Option<f64>,
    pub grad_norm: f64,
    pub lr: f64,
}

/// A training graph ready to step.
pub struct Trainer {
    pub path: PathBuf,
    pub record: TrainRecord,
    pub settings: Settings,
    pub state: TrainState,
    runners: HashMap<usize, Runner>,
    outputs: Vec<String>,
    pub total_steps: usize,
}

fn scalar(t: &Tensors, n: &str) -> Option<f64> {
    t.get(n)
        .and_then(Value::as_f32)
        .and_then(|a| a.iter().next().copied())
        .map(|v| v as f64)
}

impl Trainer {
    pub fn new(path: &Path, settings: Settings) -> Result<Trainer> {
        let model = onnx::load(path)?;
        let record = record_of(&model)?;
        let pnames: Vec<String> = record.params.iter().map(|p| p.0.clone()).collect();
        let bnames: Vec<String> = record
            .batchnorm
            .iter()
            .flat_map(|s| [s.mean.0.clone(), s.var.0.clone()])
            .collect();
        let o = &record.dagr.outputs;
        let mut outputs: Vec<String> = record.params.iter().map(|p| p.1.clone()).collect();
        outputs.push(record.loss.clone());
        outputs.push(o.loss.clone());
        outputs.push(o.dispersion.clone());
        outputs.extend(o.anchoring.clone());
        outputs.extend(o.task_loss.clone());
        outputs.extend(record.pareto_alpha.clone());
        for s in &record.batchnorm {
            outputs.push(s.mean.1.clone());
            outputs.push(s.var.1.clone());
        }
        let state = TrainState {
            params: initializer_arrays(&model, &pnames)?,
            bn: initializer_arrays(&model, &bnames)?,
            rng: Rng(settings.seed),
            ..Default::default()
        };
        Ok(Trainer {
            path: path.to_path_buf(),
            record,
            settings,
            state,
            runners: HashMap::new(),
            outputs,
            total_steps: 0,
        })
    }

    /// Inputs the data must provide: the graph inputs that are neither parameters nor state.
    pub fn data_inputs(&self, idx: &GraphIndex) -> Vec<String> {
        idx.user_inputs()
            .into_iter()
            .chain(
                idx.graph_inputs
                    .iter()
                    .filter(|n| idx.initializers.contains(*n))
                    .cloned(),
            )
            .filter(|n| !self.state.params.contains_key(n) && !self.state.bn.contains_key(n))
            .collect()
    }

    /// Run the graph on `batch` with the current parameters and statistics, which are moved
    /// into the feed and back: no copy of them on the host (ONNX Runtime reads them as views).
    fn forward_backward(&mut self, batch: Tensors) -> Result<Tensors> {
        let n = batch.values().next().map(|v| v.shape()[0]).unwrap_or(0);
        let mut feed = batch;
        let param_keys: Vec<String> = self.state.params.keys().cloned().collect();
        let bn_keys: Vec<String> = self.state.bn.keys().cloned().collect();
        for (k, v) in std::mem::take(&mut self.state.params)
            .into_iter()
            .chain(std::mem::take(&mut self.state.bn))
        {
            feed.insert(k, Value::F32(v));
        }
        let result = match self.runners.entry(n) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => Runner::on(
                self.settings.backend,
                self.settings.cuda,
                &self.path,
                &feed,
                &self.outputs,
            )
            .map(|r| e.insert(r)),
        }
        .and_then(|r| r.run(&feed));
        for (keys, into) in [(param_keys, &mut self.state.params), (bn_keys, &mut self.state.bn)] {
            for k in keys {
                if let Some(Value::F32(a)) = feed.remove(&k) {
                    into.insert(k, a);
                }
            }
        }
        result
    }

    /// Forward and backward on `batch`, then one optimizer update. Nothing changes when the
    /// loss or a gradient is not finite.
    pub fn step(&mut self, batch: Tensors) -> Result<StepStats> {
        let out = self.forward_backward(batch)?;
        let loss = scalar(&out, &self.record.loss).unwrap_or(f64::NAN);
        let o = &self.record.dagr.outputs;
        let mut grads: Vec<ArrayD<f32>> = Vec::new();
        for (p, g) in &self.record.params {
            let a = out
                .get(g)
                .and_then(Value::as_f32)
                .ok_or_else(|| Error::Graph(format!("no gradient output {g}")))?;
            if !a.iter().all(|v| v.is_finite()) || !loss.is_finite() {
                return Err(Error::Data(format!(
                    "non-finite {} at step {} (epoch {}): loss {loss}; nothing was updated",
                    if loss.is_finite() {
                        format!("gradient of '{p}'")
                    } else {
                        "loss".to_string()
                    },
                    self.state.step + 1,
                    self.state.epoch + 1
                )));
            }
            grads.push(a.clone());
        }
        let grad_norm = match self.settings.clip_grad_norm {
            Some(c) => optim::clip_grad_norm(&mut grads, c),
            None => grads
                .iter()
                .flat_map(|g| g.iter())
                .map(|&v| (v as f64).powi(2))
                .sum::<f64>()
                .sqrt(),
        };
        let lr = optim::learning_rate(
            self.settings.lr,
            self.settings.schedule,
            self.settings.warmup_steps,
            self.state.step,
            self.total_steps.max(1),
            self.state.epoch,
        );
        self.state.step += 1;
        for ((p, _), g) in self.record.params.iter().zip(&grads) {
            let st = self.state.opt.entry(p.clone()).or_default();
            let param = self.state.params.get_mut(p).unwrap();
            optim::step(self.settings.optimizer, lr, self.state.step, param, g, st);
        }
        for s in &self.record.batchnorm {
            for (init, t) in [&s.mean, &s.var] {
                if let Some(a) = out.get(t).and_then(Value::as_f32) {
                    self.state.bn.insert(init.clone(), a.clone());
                }
            }
        }
        Ok(StepStats {
            loss,
            task_loss: o.task_loss.as_ref().and_then(|t| scalar(&out, t)),
            dagr_loss: scalar(&out, &o.loss).unwrap_or(f64::NAN),
            dispersion: scalar(&out, &o.dispersion).unwrap_or(f64::NAN),
            anchoring: o.anchoring.as_ref().and_then(|t| scalar(&out, t)),
            pareto_alpha: self.record.pareto_alpha.as_ref().and_then(|t| scalar(&out, t)),
            grad_norm,
            lr,
        })
    }

    // ---- checkpoints -------------------------------------------------------------------

    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let mut t = Tensors::new();
        for (k, v) in &self.state.params {
            t.insert(format!("param/{k}"), Value::F32(v.clone()));
        }
        for (k, v) in &self.state.bn {
            t.insert(format!("bn/{k}"), Value::F32(v.clone()));
        }
        for (k, s) in &self.state.opt {
            if let Some(m) = &s.m {
                t.insert(format!("m/{k}"), Value::F32(m.clone()));
            }
            if let Some(v) = &s.v {
                t.insert(format!("v/{k}"), Value::F32(v.clone()));
            }
        }
        crate::npz::write(&dir.join("checkpoint.npz"), &t)?;
        let meta = serde_json::json!({
            "step": self.state.step, "epoch": self.state.epoch, "rng": self.state.rng.0,
            "settings": self.settings, "model": self.path,
        });
        onnx::io::write_atomic(
            &dir.join("checkpoint.json"),
            serde_json::to_string_pretty(&meta).unwrap().as_bytes(),
        )
    }

    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("checkpoint.json")).map_err(
            |source| Error::Read {
                path: dir.join("checkpoint.json"),
                source,
            },
        )?)
        .map_err(|e| Error::Data(format!("checkpoint.json: {e}")))?;
        let t = crate::npz::read(&dir.join("checkpoint.npz"))?;
        for (k, v) in t {
            let Value::F32(a) = v else { continue };
            if let Some(n) = k.strip_prefix("param/") {
                self.state.params.insert(n.into(), a);
            } else if let Some(n) = k.strip_prefix("bn/") {
                self.state.bn.insert(n.into(), a);
            } else if let Some(n) = k.strip_prefix("m/") {
                self.state.opt.entry(n.into()).or_default().m = Some(a);
            } else if let Some(n) = k.strip_prefix("v/") {
                self.state.opt.entry(n.into()).or_default().v = Some(a);
            }
        }
        self.state.step = meta["step"].as_u64().unwrap_or(0) as usize;
        self.state.epoch = meta["epoch"].as_u64().unwrap_or(0) as usize;
        self.state.rng = Rng(meta["rng"].as_u64().unwrap_or(self.settings.seed));
        Ok(())
    }

    // ---- export ------------------------------------------------------------------------

    /// The original model with the trained weights and running statistics, BatchNorm in
    /// inference mode: what serves predictions, with no DAGR cost.
    pub fn export(&self, original: &Model) -> Result<Model> {
        let mut m = original.clone();
        m.source = None;
        let values: BTreeMap<&String, &ArrayD<f32>> = self.state.params.iter().chain(&self.state.bn).collect();
        for t in m.graph_mut().initializer.iter_mut() {
            if let Some(a) = values.get(&t.name) {
                let data: Vec<f32> = a.iter().copied().collect();
                *t = tensor::f32_tensor(&t.name, &t.dims, &data);
            }
        }
        let g = m.graph_mut();
        let outputs: std::collections::HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
        let consumed: std::collections::HashSet<String> = g.node.iter().flat_map(|n| n.input.clone()).collect();
        for n in g.node.iter_mut() {
            if n.op_type == "BatchNormalization"
                && n.output
                    .iter()
                    .skip(1)
                    .all(|o| o.is_empty() || (!outputs.contains(o) && !consumed.contains(o)))
            {
                n.output.truncate(1);
                n.attribute.retain(|a| a.name != "training_mode");
            }
        }
        Ok(m)
    }
}

/// Where the data and the run's files are.
pub struct Run<'a> {
    pub model: &'a Path,
    pub train: &'a Path,
    pub val: Option<&'a Path>,
    pub out: &'a Path,
    pub original: Option<&'a Path>,
    pub resume: bool,
    pub force: bool,
    /// Stop after this many steps (for tests and benchmarks).
    pub max_steps: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub step: usize,
    pub lr: f64,
    pub loss: f64,
    pub task_loss: Option<f64>,
    pub dagr_loss: f64,
    pub dispersion: f64,
    pub anchoring: Option<f64>,
    pub pareto_alpha: Option<f64>,
    pub val_accuracy: BTreeMap<String, f64>,
    /// Geometry of the validation embeddings (exported model, DAGR's normalization).
    pub geometry: BTreeMap<String, f64>,
    pub samples_per_second: f64,
}

/// Accuracy of every head of `model` (an inference model) on `data`.
pub fn evaluate(
    model_path: &Path,
    backend: Backend,
    data: &Dataset,
    heads: &[String],
    labels: &str,
    batch_size: usize,
) -> Result<BTreeMap<String, f64>> {
    let Some(Value::I64(y)) = data.arrays.get(labels) else {
        return Err(Error::Data(format!(
            "the validation data has no int64 array '{labels}'"
        )));
    };
    let mut correct: BTreeMap<String, usize> = heads.iter().map(|h| (h.clone(), 0)).collect();
    let mut runners: HashMap<usize, Runner> = HashMap::new();
    for rows in data.batches(batch_size, None, false) {
        let b = data.batch(&rows);
        let runner = match runners.entry(rows.len()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Runner::new(backend, model_path, &b, heads)?),
        };
        let out = runner.run(&b)?;
        for h in heads {
            let logits = out[h].as_f32().unwrap();
            for (i, row) in logits.outer_iter().enumerate() {
                let arg = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |a, (k, &v)| if v > a.1 { (k, v) } else { a })
                    .0;
                if arg as i64 == y[rows[i]] {
                    *correct.get_mut(h).unwrap() += 1;
                }
            }
        }
    }
    Ok(correct
        .into_iter()
        .map(|(h, c)| (h, c as f64 / data.len as f64))
        .collect())
}

/// Train: epochs over `run.train`, validation and a checkpoint after each, JSON logs, the
/// trained inference model in `run.out/model.onnx`.
pub fn fit(run: &Run, settings: Settings, interrupted: Arc<AtomicBool>) -> Result<Vec<EpochLog>> {
    if run.out.exists() && !run.resume && !run.force {
        return Err(Error::Config(format!(
            "the output directory {} exists\n  hint: pass --resume to continue its run, or --force to start over in it",
            run.out.display()
        )));
    }
    let created = !run.out.exists();
    std::fs::create_dir_all(run.out).map_err(|source| Error::Write {
        path: run.out.to_path_buf(),
        source,
    })?;
    let result = fit_in(run, settings, interrupted);
    // A run that failed before its first checkpoint leaves no directory behind, so that the
    // same command works once the problem is fixed.
    if result.is_err() && created && !run.out.join("checkpoint.json").exists() {
        let _ = std::fs::remove_dir_all(run.out);
    }
    result
}

fn fit_in(run: &Run, settings: Settings, interrupted: Arc<AtomicBool>) -> Result<Vec<EpochLog>> {
    let mut t = Trainer::new(run.model, settings.clone())?;
    let model = onnx::load(run.model)?;
    let idx = GraphIndex::new(&model)?;
    let original_path = run
        .original
        .map(Path::to_path_buf)
        .or_else(|| t.record.original.as_ref().map(PathBuf::from))
        .ok_or_else(|| Error::Config("the original model is unknown; pass --original MODEL".into()))?;
    let original = onnx::load(&original_path)?;
    let (heads, labels) = match &t.record.dagr.config.task {
        crate::dagr::Task::CrossEntropy { logits, .. } => (logits.clone(), t.record.dagr.outputs.labels_input.clone()),
        _ => (Vec::new(), None),
    };
    let classes = heads
        .first()
        .and_then(|h| idx.fact(h))
        .and_then(|f| f.shape.clone())
        .and_then(|s| match s.get(1) {
            Some(crate::onnx::Dim::Known(c)) => Some(*c),
            _ => None,
        });
    let inputs = t.data_inputs(&idx);
    let label_check = labels.as_deref().zip(classes);
    let train = Dataset::load(run.train, &idx, &inputs, label_check)?;
    let val = match run.val {
        Some(p) => Some(Dataset::load(p, &idx, &inputs, label_check)?),
        None => None,
    };
    if run.resume && run.out.join("checkpoint.json").exists() {
        t.load_checkpoint(run.out)?;
        eprintln!("resuming after epoch {} (step {})", t.state.epoch, t.state.step);
    }
    let per_epoch = train.batches(settings.batch_size, None, settings.drop_last).len();
    t.total_steps = per_epoch * settings.epochs;
    let mut logs = Vec::new();
    let log_path = run.out.join("log.jsonl");
    let model_out = run.out.join("model.onnx");
    while t.state.epoch < settings.epochs {
        let mut rng = t.state.rng;
        let batches = train.batches(
            settings.batch_size,
            settings.shuffle.then_some(&mut rng),
            settings.drop_last,
        );
        let bar = indicatif::ProgressBar::new(batches.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!("{}/{}", t.state.epoch + 1, settings.epochs));
        let started = std::time::Instant::now();
        let (mut sum, mut count) = (StepStats::default(), 0usize);
        let mut task_sum = 0.0;
        let mut anc_sum = 0.0;
        let mut alpha_sum = 0.0;
        let mut samples = 0usize;
        for rows in &batches {
            if interrupted.load(Ordering::SeqCst) {
                bar.abandon();
                return Err(Error::Data(format!(
                    "interrupted during epoch {}; the last checkpoint (epoch {}) in {} is intact: continue with --resume",
                    t.state.epoch + 1,
                    t.state.epoch,
                    run.out.display()
                )));
            }
            let s = t.step(train.batch(rows)).map_err(|e| match e {
                Error::Data(m) => Error::Data(format!(
                    "{m}\n  the last good checkpoint is {} (epoch {})",
                    run.out.join("checkpoint.npz").display(),
                    t.state.epoch
                )),
                other => other,
            })?;
            sum.loss += s.loss;
            sum.dagr_loss += s.dagr_loss;
            sum.dispersion += s.dispersion;
            task_sum += s.task_loss.unwrap_or(0.0);
            anc_sum += s.anchoring.unwrap_or(0.0);
            alpha_sum += s.pareto_alpha.unwrap_or(0.0);
            sum.lr = s.lr;
            count += 1;
            samples += rows.len();
            bar.set_message(format!(
                "loss {:.4} ({:.0} samples/s)",
                s.loss,
                samples as f64 / started.elapsed().as_secs_f64()
            ));
            bar.inc(1);
            if run.max_steps.is_some_and(|m| t.state.step >= m) {
                break;
            }
        }
        bar.finish();
        let secs = started.elapsed().as_secs_f64();
        t.state.rng = rng;
        t.state.epoch += 1;
        let exported = t.export(&original)?;
        onnx::save(&exported, &model_out)?;
        let val_accuracy = match (&val, &labels) {
            (Some(v), Some(l)) if !heads.is_empty() => {
                evaluate(&model_out, settings.backend, v, &heads, l, settings.batch_size)?
            }
            _ => BTreeMap::new(),
        };
        let geometry = match &val {
            Some(v) => epoch_geometry(&exported, &t.record, v, labels.as_deref(), settings.backend)?,
            None => BTreeMap::new(),
        };
        t.save_checkpoint(run.out)?;
        let c = count.max(1) as f64;
        let log = EpochLog {
            epoch: t.state.epoch,
            step: t.state.step,
            lr: sum.lr,
            loss: sum.loss / c,
            task_loss: t.record.dagr.outputs.task_loss.as_ref().map(|_| task_sum / c),
            dagr_loss: sum.dagr_loss / c,
            dispersion: sum.dispersion / c,
            anchoring: t.record.dagr.outputs.anchoring.as_ref().map(|_| anc_sum / c),
            pareto_alpha: t.record.pareto_alpha.as_ref().map(|_| alpha_sum / c),
            val_accuracy,
            geometry,
            samples_per_second: samples as f64 / secs,
        };
        let line = serde_json::to_string(&log).unwrap();
        eprintln!("{line}");
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| Error::Write {
                path: log_path.clone(),
                source,
            })?;
        writeln!(f, "{line}").map_err(|source| Error::Write {
            path: log_path.clone(),
            source,
        })?;
        logs.push(log);
        if run.max_steps.is_some_and(|m| t.state.step >= m) {
            break;
        }
    }
    Ok(logs)
}

/// Effective rank and margin per modality, drift and similarity gap per pair, of the exported
/// model's embeddings on the validation data (DAGR's normalization added in memory).
fn epoch_geometry(
    exported: &Model,
    rec: &TrainRecord,
    val: &Dataset,
    labels: Option<&str>,
    backend: Backend,
) -> Result<BTreeMap<String, f64>> {
    let mut m = exported.clone();
    let cfg = crate::dagr::Config {
        encoders: rec.dagr.encoders.iter().map(|(n, t)| format!("{n}={t}")).collect(),
        ..rec.dagr.config.clone()
    };
    let cfg = crate::dagr::Config {
        task: crate::dagr::Task::None,
        ..cfg
    };
    crate::dagr::inject(&mut m, &cfg)?;
    let dir = tempfile::tempdir().map_err(|source| Error::Write {
        path: std::env::temp_dir(),
        source,
    })?;
    let p = dir.path().join("geometry.onnx");
    onnx::io::write_atomic(&p, &m.to_bytes()?)?;
    let (mods, pairs) = crate::diagnose::geometry_on(&p, val, labels, backend)?;
    let mut out = BTreeMap::new();
    for md in mods {
        out.insert(format!("erank.{}", md.name), md.effective_rank);
        if let Some(v) = md.semantic_margin {
            out.insert(format!("margin.{}", md.name), v);
        }
    }
    for p in pairs {
        out.insert(format!("drift.{}-{}", p.a, p.b), p.drift);
        out.insert(format!("gap.{}-{}", p.a, p.b), p.gap);
    }
    Ok(out)
}
