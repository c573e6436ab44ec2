//! `dagr-inject train`: run a training graph (built with `--train`) step by step on tract or
//! ONNX Runtime, update the parameters, log, checkpoint, and export the trained inference model.
//!
//! The optimizer (`optim`, equal to `torch.optim`) is folded into the training graph as ONNX
//! nodes (`step_graph`), so one run of the graph is one whole step and the parameters and the
//! optimizer state stay where the backend keeps them (`runtime::Stepper`).

pub mod data;
pub mod optim;
pub mod step_graph;

use crate::error::{Error, Result};
use crate::grad::train::{TrainRecord, METADATA_KEY};
use crate::onnx::{self, dtype, tensor, GraphIndex, Model};
use crate::runtime::{Backend, Runner, StateValues, Stepper, Tensors, Value};
use data::{Dataset, Rng};
use ndarray::ArrayD;
use optim::{Optimizer, Schedule};
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
    /// ONNX Runtime's intra-op threads (default: one per physical core).
    #[serde(default)]
    pub threads: Option<usize>,
}

/// Read the training record a `--train` rewrite stored in the model.
pub fn record_of(model: &Model) -> Result<TrainRecord> {
    if model.metadata(step_graph::METADATA_KEY).is_some() {
        return Err(Error::Config(
            "this is a step graph (the step.onnx that `train` writes): it already holds its optimizer\n  hint: train the training graph it came from (built with --train), or run the step graph yourself in any ONNX runtime"
                .into(),
        ));
    }
    let s = model.metadata(METADATA_KEY).ok_or_else(|| {
        Error::Config(
            "this model is not a training graph\n  hint: build one with `dagr-inject MODEL --encoders a,b --logits ... --labels y --train -o model.train.onnx`"
                .into(),
        )
    })?;
    serde_json::from_str(s).map_err(|e| Error::Config(format!("the training metadata is unreadable: {e}")))
}

/// How far a run is: everything but the tensors (which stay on the backend).
#[derive(Debug, Clone, Default)]
pub struct Progress {
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

impl StepStats {
    /// The mean of each quantity over `steps` (an optional one over the steps that have it);
    /// the learning rate is the last step's.
    pub fn mean(steps: &[StepStats]) -> StepStats {
        let n = steps.len().max(1) as f64;
        let avg = |f: fn(&StepStats) -> f64| steps.iter().map(f).sum::<f64>() / n;
        let avg_opt = |f: fn(&StepStats) -> Option<f64>| {
            let v: Vec<f64> = steps.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        StepStats {
            loss: avg(|s| s.loss),
            task_loss: avg_opt(|s| s.task_loss),
            dagr_loss: avg(|s| s.dagr_loss),
            dispersion: avg(|s| s.dispersion),
            anchoring: avg_opt(|s| s.anchoring),
            pareto_alpha: avg_opt(|s| s.pareto_alpha),
            grad_norm: avg(|s| s.grad_norm),
            lr: steps.last().map_or(0.0, |s| s.lr),
        }
    }
}

/// A training graph with its optimizer folded in (`step_graph`), ready to step. Parameters,
/// running statistics and optimizer state live in the backend's `Stepper` (on the GPU with
/// `--device cuda`); they come to the host for checkpoints and export only.
pub struct Trainer {
    pub path: PathBuf,
    pub record: TrainRecord,
    pub settings: Settings,
    pub progress: Progress,
    /// Time spent inside the backend's runs so far.
    pub backend_time: std::time::Duration,
    stepper: Stepper,
    /// Holds the step graph's file for the backend.
    workdir: tempfile::TempDir,
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
        let mut initial = StateValues::new();
        for (p, a) in initializer_arrays(&model, &pnames)? {
            for &slot in settings.optimizer.slots() {
                initial.insert(step_graph::slot_key(slot, &p), ArrayD::zeros(a.raw_dim()));
            }
            initial.insert(step_graph::param_key(&p), a);
        }
        for (b, a) in initializer_arrays(&model, &bnames)? {
            initial.insert(step_graph::bn_key(&b), a);
        }
        let sg = step_graph::build(&model, &record, settings.optimizer, settings.clip_grad_norm)?;
        let o = &record.dagr.outputs;
        let mut fetch: Vec<String> = vec![step_graph::GRAD_SQ.to_string(), record.loss.clone()];
        for t in [
            Some(&o.loss),
            Some(&o.dispersion),
            o.anchoring.as_ref(),
            o.task_loss.as_ref(),
        ]
        .into_iter()
        .flatten()
        .chain(record.pareto_alpha.as_ref())
        {
            if !fetch.contains(t) {
                fetch.push(t.clone());
            }
        }
        let workdir = tempfile::tempdir().map_err(|source| Error::Write {
            path: std::env::temp_dir(),
            source,
        })?;
        let step_path = workdir.path().join("step.onnx");
        // Saved before the backend loads it; `fit` keeps a copy in the run's directory.
        onnx::save(&sg.model, &step_path)?;
        let stepper = Stepper::new(
            settings.backend,
            settings.cuda,
            settings.threads,
            &step_path,
            sg.state,
            &initial,
            &fetch,
        )?;
        Ok(Trainer {
            path: path.to_path_buf(),
            record,
            progress: Progress {
                rng: Rng(settings.seed),
                ..Default::default()
            },
            settings,
            backend_time: Default::default(),
            stepper,
            workdir,
            total_steps: 0,
        })
    }

    /// Inputs the data must provide: the graph inputs that are neither parameters nor state.
    pub fn data_inputs(&self, idx: &GraphIndex) -> Vec<String> {
        let state: std::collections::HashSet<&String> = self
            .record
            .params
            .iter()
            .map(|p| &p.0)
            .chain(self.record.batchnorm.iter().flat_map(|s| [&s.mean.0, &s.var.0]))
            .collect();
        idx.user_inputs()
            .into_iter()
            .chain(
                idx.graph_inputs
                    .iter()
                    .filter(|n| idx.initializers.contains(*n))
                    .cloned(),
            )
            .filter(|n| !state.contains(n))
            .collect()
    }

    /// The step graph this trainer runs (standard ONNX; see `step_graph`).
    pub fn step_graph_path(&self) -> PathBuf {
        self.workdir.path().join("step.onnx")
    }

    /// Every state tensor (`param/`, `bn/`, `m/`, `v/` keys), copied from the backend.
    pub fn state(&self) -> Result<StateValues> {
        self.stepper.state()
    }

    /// One training step on `batch`: forward, backward and the optimizer update, all in the
    /// step graph. Nothing changes when the loss or a gradient is not finite.
    pub fn step(&mut self, batch: Tensors) -> Result<StepStats> {
        let lr = optim::learning_rate(
            self.settings.lr,
            self.settings.schedule,
            self.settings.warmup_steps,
            self.progress.step,
            self.total_steps.max(1),
            self.progress.epoch,
        );
        let mut feed = batch;
        for (name, v) in self.settings.optimizer.scalars(lr, self.progress.step + 1) {
            feed.insert(name.to_string(), Value::F32(ndarray::arr0(v as f32).into_dyn()));
        }
        let started = std::time::Instant::now();
        let out = self.stepper.run(feed);
        self.backend_time += started.elapsed();
        let out = out?;
        let loss = scalar(&out, &self.record.loss).unwrap_or(f64::NAN);
        let sq = out
            .get(step_graph::GRAD_SQ)
            .and_then(Value::as_f32)
            .ok_or_else(|| Error::Graph("the step graph returned no gradient norms".into()))?;
        let bad = sq.iter().position(|v| !v.is_finite());
        if !loss.is_finite() || bad.is_some() {
            let what = match bad {
                Some(i) if loss.is_finite() => format!("gradient of '{}'", self.record.params[i].0),
                _ => "loss".to_string(),
            };
            return Err(Error::Data(format!(
                "non-finite {what} at step {} (epoch {}): loss {loss}; nothing was updated",
                self.progress.step + 1,
                self.progress.epoch + 1
            )));
        }
        self.stepper.commit();
        self.progress.step += 1;
        let o = &self.record.dagr.outputs;
        Ok(StepStats {
            loss,
            task_loss: o.task_loss.as_ref().and_then(|t| scalar(&out, t)),
            dagr_loss: scalar(&out, &o.loss).unwrap_or(f64::NAN),
            dispersion: scalar(&out, &o.dispersion).unwrap_or(f64::NAN),
            anchoring: o.anchoring.as_ref().and_then(|t| scalar(&out, t)),
            pareto_alpha: self.record.pareto_alpha.as_ref().and_then(|t| scalar(&out, t)),
            grad_norm: sq.iter().map(|&v| v as f64).sum::<f64>().sqrt(),
            lr,
        })
    }

    // ---- checkpoints -------------------------------------------------------------------

    /// Write `state` (from `state()`) and the run's progress to `dir`.
    pub fn save_checkpoint(&self, dir: &Path, state: &StateValues) -> Result<()> {
        let t: Tensors = state.iter().map(|(k, v)| (k.clone(), Value::F32(v.clone()))).collect();
        crate::npz::write(&dir.join("checkpoint.npz"), &t)?;
        let meta = serde_json::json!({
            "step": self.progress.step, "epoch": self.progress.epoch, "rng": self.progress.rng.0,
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
        let mut values = StateValues::new();
        for (k, v) in crate::npz::read(&dir.join("checkpoint.npz"))? {
            let Value::F32(a) = v else {
                return Err(Error::Data(format!("checkpoint entry '{k}' is not float32")));
            };
            values.insert(k, a);
        }
        self.stepper.set_state(&values).map_err(|e| {
            Error::Data(format!(
                "the checkpoint in {} does not fit this training run: {e}\n  hint: resume with the optimizer settings it was made with (see checkpoint.json)",
                dir.display()
            ))
        })?;
        self.progress.step = meta["step"].as_u64().unwrap_or(0) as usize;
        self.progress.epoch = meta["epoch"].as_u64().unwrap_or(0) as usize;
        self.progress.rng = Rng(meta["rng"].as_u64().unwrap_or(self.settings.seed));
        Ok(())
    }

    // ---- export ------------------------------------------------------------------------

    /// The original model with the trained weights and running statistics, BatchNorm in
    /// inference mode: what serves predictions, with no DAGR cost.
    /// `state` is the trainer's (from `state()`).
    pub fn export(&self, original: &Model, state: &StateValues) -> Result<Model> {
        let mut m = original.clone();
        m.source = None;
        let values: BTreeMap<&str, &ArrayD<f32>> = state
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("param/").or_else(|| k.strip_prefix("bn/"))?, v)))
            .collect();
        for t in m.graph_mut().initializer.iter_mut() {
            if let Some(a) = values.get(t.name.as_str()) {
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
    /// Means over the epoch's steps (the last learning rate).
    #[serde(flatten)]
    pub mean: StepStats,
    pub val_accuracy: BTreeMap<String, f64>,
    /// Geometry of the validation embeddings (exported model, DAGR's normalization).
    pub geometry: BTreeMap<String, f64>,
    pub samples_per_second: f64,
    /// Wall time of the epoch's steps, and the part of it spent inside the backend's run; the
    /// rest is the runner's own (data, feeding, checks, logging).
    pub step_seconds: f64,
    pub backend_seconds: f64,
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
                if crate::diagnose::argmax(row) as i64 == y[rows[i]] {
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
    // The whole training step as one standard ONNX graph, for other runtimes and for reading.
    let step_bytes = std::fs::read(t.step_graph_path()).map_err(|source| Error::Read {
        path: t.step_graph_path(),
        source,
    })?;
    onnx::io::write_atomic(&run.out.join("step.onnx"), &step_bytes)?;
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
        eprintln!("resuming after epoch {} (step {})", t.progress.epoch, t.progress.step);
    }
    let per_epoch = train.batches(settings.batch_size, None, settings.drop_last).len();
    t.total_steps = per_epoch * settings.epochs;
    let mut logs = Vec::new();
    let log_path = run.out.join("log.jsonl");
    let model_out = run.out.join("model.onnx");
    while t.progress.epoch < settings.epochs {
        let mut rng = t.progress.rng;
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
        bar.set_prefix(format!("{}/{}", t.progress.epoch + 1, settings.epochs));
        let started = std::time::Instant::now();
        let backend_before = t.backend_time;
        let mut stats = Vec::with_capacity(batches.len());
        let mut samples = 0usize;
        for rows in &batches {
            if interrupted.load(Ordering::SeqCst) {
                bar.abandon();
                return Err(Error::Data(format!(
                    "interrupted during epoch {}; the last checkpoint (epoch {}) in {} is intact: continue with --resume",
                    t.progress.epoch + 1,
                    t.progress.epoch,
                    run.out.display()
                )));
            }
            let s = t.step(train.batch(rows)).map_err(|e| match e {
                Error::Data(m) => Error::Data(format!(
                    "{m}\n  the last good checkpoint is {} (epoch {})",
                    run.out.join("checkpoint.npz").display(),
                    t.progress.epoch
                )),
                other => other,
            })?;
            samples += rows.len();
            bar.set_message(format!(
                "loss {:.4} ({:.0} samples/s)",
                s.loss,
                samples as f64 / started.elapsed().as_secs_f64()
            ));
            bar.inc(1);
            stats.push(s);
            if run.max_steps.is_some_and(|m| t.progress.step >= m) {
                break;
            }
        }
        bar.finish();
        let secs = started.elapsed().as_secs_f64();
        t.progress.rng = rng;
        t.progress.epoch += 1;
        // One copy of the state from the backend serves the export and the checkpoint.
        let state = t.state()?;
        let exported = t.export(&original, &state)?;
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
        t.save_checkpoint(run.out, &state)?;
        let log = EpochLog {
            epoch: t.progress.epoch,
            step: t.progress.step,
            mean: StepStats::mean(&stats),
            val_accuracy,
            geometry,
            samples_per_second: samples as f64 / secs,
            step_seconds: secs,
            backend_seconds: (t.backend_time - backend_before).as_secs_f64(),
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
        if run.max_steps.is_some_and(|m| t.progress.step >= m) {
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
