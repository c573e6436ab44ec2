//! `dagr-inject train`: run a training graph (built with `--train`) step by step on tract or
//! ONNX Runtime, update the parameters, log, checkpoint, and export the trained inference model.
//!
//! The optimizer (`optim`, equal to `torch.optim`) is folded into the training graph as ONNX
//! nodes (`step_graph`), so one run of the graph is one whole step and the parameters and the
//! optimizer state stay where the backend keeps them (`runtime::Stepper`).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod checkpoint;
pub mod eval;

use dagr_core::training::{TrainRecord, METADATA_KEY};
use dagr_core::{optim, step_graph};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{self as onnx, dtype, tensor, GraphIndex, Model};
use dagr_runtime::data::{Dataset, Rng};
use dagr_runtime::{Backend, Device, GraphSpec, StateValues, StepSpec, Stepper, Tensors, Value};
use ndarray::ArrayD;
use optim::{Optimizer, Schedule};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    /// Where the backend computes.
    #[serde(default)]
    pub device: Device,
    /// ONNX Runtime's intra-op threads (default: one per physical core).
    #[serde(default)]
    pub threads: Option<usize>,
    /// How ONNX Runtime keeps the state between steps (see `StateUpdate`).
    #[serde(default)]
    pub state_update: StateUpdate,
    /// Which GPU `device` cuda computes on (a data-parallel run's local rank).
    #[serde(default)]
    pub device_index: usize,
    /// Micro-batches per step: each batch is split in this many parts (along every input's
    /// first axis), their gradients summed on the backend, weighted by their share of the
    /// batch, then one update (see `step_graph::build_split`). 1: the whole step in one graph.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// In place on the host, state tensors larger than this many bytes are updated in parts of
    /// rows of about this size. None (the default): parts of `STATE_PART_BYTES` where memory is
    /// short (`auto_parts`), whole updates elsewhere.
    #[serde(default)]
    pub state_part_bytes: Option<usize>,
}

fn one() -> usize {
    1
}

/// How the backend keeps the state (parameters, optimizer slots, BatchNorm statistics) between
/// steps. Either way a rejected step leaves the state as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateUpdate {
    /// Two sets while they and the step's working set stay within 1.5 times what PyTorch
    /// holds for the same training (parameters, gradients, optimizer slots and its own 0.5 GB)
    /// and, on the CPU, within 80% of the free memory; in place beyond.
    #[default]
    Auto,
    /// Two sets of buffers, one read and one written per step, swapped when the step is
    /// accepted: the fastest update, twice the state's memory.
    TwoSets,
    /// One set: the step graph gates every write on the step's acceptance and makes the update
    /// after the test (which bounds it, `StepRecord::check_bounds`), so that each output can
    /// share its input's buffer (where the graph allows it: `StepRecord::in_place`). ONNX
    /// Runtime binds each output to its input's buffer; tract takes the tensors written whole
    /// by value (freeing each after its last reader) and writes each part into its rows.
    InPlace,
}

impl Settings {
    /// Refuse settings that cannot give a finite, meaningful run, as `torch.optim` refuses
    /// them (a negative learning rate, momentum or weight decay, betas outside [0, 1)) and
    /// values that do not fit the float32 the step graph computes in.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let f32_max = f32::MAX as f64;
        let nonneg = |name: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v >= 0.0 && v <= f32_max) {
                return Err(Error::Config(format!(
                    "{name} must be a finite number >= 0 that fits in float32, got {v}"
                )));
            }
            Ok(())
        };
        if self.epochs == 0 || self.batch_size == 0 {
            return bad("the number of epochs and the batch size must be positive".into());
        }
        if self.grad_accum == 0 || self.grad_accum > self.batch_size {
            return bad(format!(
                "gradient accumulation takes 1 to batch-size ({}) micro-batches per step, got {}",
                self.batch_size, self.grad_accum
            ));
        }
        nonneg("the learning rate (lr)", self.lr)?;
        match self.optimizer {
            Optimizer::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                nonneg("momentum", momentum)?;
                nonneg("weight decay", weight_decay)?;
                if nesterov && momentum <= 0.0 {
                    return bad("Nesterov momentum requires a momentum > 0".into());
                }
            }
            Optimizer::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                for (n, b) in [("beta1", beta1), ("beta2", beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return bad(format!("AdamW's {n} must be in [0, 1), got {b}"));
                    }
                }
                nonneg("AdamW's eps", eps)?;
                nonneg("weight decay", weight_decay)?;
            }
        }
        match self.schedule {
            Schedule::Constant => {}
            Schedule::Step { step_size, gamma } => {
                if step_size == 0 {
                    return bad("the step schedule's step size must be at least 1 epoch".into());
                }
                nonneg("the step schedule's gamma", gamma)?;
            }
            Schedule::Cosine { min_lr } => nonneg("the cosine schedule's minimum learning rate", min_lr)?,
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c > 0.0 && c.is_finite()) {
                return bad(format!("the gradient-norm clip must be a positive number, got {c}"));
            }
        }
        if let Some(t) = self.threads {
            if t == 0 || t > dagr_onnx::limits::MAX_THREADS {
                return bad(format!(
                    "the thread count must be between 1 and {}, got {t}",
                    dagr_onnx::limits::MAX_THREADS
                ));
            }
        }
        Ok(())
    }
}

/// Read the training record a `--train` rewrite stored in the model.
pub fn record_of(model: &Model) -> Result<TrainRecord> {
    if model.metadata(step_graph::METADATA_KEY).is_some() {
        return Err(Error::NotATrainingGraph(
            "this is a step graph (the step.onnx that training writes): it already holds its optimizer\n  hint: train the training graph it came from (built with `train`), or run the step graph yourself in any ONNX runtime"
                .into(),
        ));
    }
    let s = model.metadata(METADATA_KEY).ok_or_else(|| {
        Error::NotATrainingGraph(
            "this model is not a training graph\n  hint: build one with the training rewrite (`train`, with `encoders`, and `loss` or `logits` and `labels`)"
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

/// The size of the parts a state tensor is updated in, in place on the host
/// (`step_graph::Form::part_bytes`): AdamW's update holds three temporaries the size of what it
/// updates at once, so a tensor updated whole needs three more copies of itself beside the state
/// and the gradients (the 1.2B model's largest, 800 MB: 2.4 GB); in parts, three parts.
pub const STATE_PART_BYTES: usize = 64 << 20;

/// Whether an in-place update on the host is made in parts (`Settings::state_part_bytes` None):
/// where the state, the gradients and the whole update's temporaries (three of the largest
/// tensor, AdamW's) would pass 80% of the `free` memory, or that is unknown. Elsewhere whole
/// updates, which are faster: a part's reads of the state are copies (500M parameters, SGD
/// momentum: a step 1.84 s in parts, 1.49 s whole; AdamW 3.15 s and 2.92 s).
pub fn auto_parts(state_bytes: u64, param_bytes: u64, largest_bytes: u64, free: Option<u64>) -> bool {
    let Some(free) = free else { return true };
    let need = state_bytes
        .saturating_add(param_bytes)
        .saturating_add(largest_bytes.saturating_mul(3));
    need as f64 > 0.8 * free as f64
}

/// `StateUpdate::Auto`'s choice for a state of `state_bytes` (parameters `param_bytes` of it):
/// two sets and the step's working set (the gradients and the update's temporaries, about 1.3
/// times the parameters) against what PyTorch holds for the same training (parameters,
/// gradients, slots), each with its fixed cost on the device: two sets while they stay within
/// 1.5 times PyTorch and, on the CPU, within 80% of the `free` memory; in place beyond.
///
/// The fixed costs were measured with `scripts/bench_scale.py` at 10M parameters: on the CPU
/// PyTorch's process holds about 0.5 GB more than its tensors and ours nothing that counts; on
/// CUDA (an H200, the process's device memory as NVML reports it) ONNX Runtime's CUDA context,
/// cuBLAS and cuDNN hold about 1.05 GB, PyTorch's context about 0.8 GB.
pub fn auto_in_place(state_bytes: u64, param_bytes: u64, device: Device, free: Option<u64>) -> bool {
    let (ours_fixed, pytorch_fixed): (u64, u64) = match device {
        Device::Cpu => (0, 500 << 20),
        Device::Cuda => (1050 << 20, 800 << 20),
    };
    let two_sets = state_bytes
        .saturating_mul(2)
        .saturating_add(param_bytes.saturating_mul(13) / 10)
        .saturating_add(ours_fixed);
    let pytorch = state_bytes.saturating_add(param_bytes).saturating_add(pytorch_fixed);
    let fits = device != Device::Cpu || free.is_none_or(|free| two_sets <= free / 5 * 4);
    !(fits && two_sets <= pytorch.saturating_mul(3) / 2)
}

/// The float32 initializers of the training graph that hold the named state, by name.
fn state_initializers<'m>(model: &'m Model, names: &[String]) -> Result<Vec<(String, &'m onnx::proto::TensorProto)>> {
    let by_name: BTreeMap<&str, &onnx::proto::TensorProto> =
        model.graph().initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = Vec::new();
    for n in names {
        let t = by_name
            .get(n.as_str())
            .ok_or_else(|| Error::InvalidModel(format!("the training graph has no initializer '{n}', which its training record lists\n  hint: rebuild the training graph; it was edited after it was written")))?;
        if t.data_type != dtype::FLOAT {
            return Err(Error::Config(format!(
                "parameter '{n}' is {}; training supports float32 parameters",
                dtype::name(t.data_type)
            )));
        }
        if t.dims.iter().any(|&d| d < 0) {
            return Err(Error::InvalidModel(format!(
                "initializer '{n}' has negative dims {:?}",
                t.dims
            )));
        }
        out.push((n.clone(), *t));
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
    /// The weighted mean of each quantity over the micro-batches of one step (weights summing
    /// to one; an optional one over the parts that have it, renormalized).
    pub fn weighted(parts: &[(StepStats, f64)]) -> StepStats {
        let sum = |f: fn(&StepStats) -> f64| parts.iter().map(|(s, w)| f(s) * w).sum::<f64>();
        let opt = |f: fn(&StepStats) -> Option<f64>| {
            let v: Vec<(f64, f64)> = parts.iter().filter_map(|(s, w)| f(s).map(|x| (x, *w))).collect();
            let total: f64 = v.iter().map(|p| p.1).sum();
            (total > 0.0).then(|| v.iter().map(|(x, w)| x * w).sum::<f64>() / total)
        };
        StepStats {
            loss: sum(|s| s.loss),
            task_loss: opt(|s| s.task_loss),
            dagr_loss: sum(|s| s.dagr_loss),
            dispersion: sum(|s| s.dispersion),
            anchoring: opt(|s| s.anchoring),
            pareto_alpha: opt(|s| s.pareto_alpha),
            grad_norm: 0.0,
            lr: 0.0,
        }
    }

    /// The mean of each quantity over `steps` (an optional one over the steps that have it);
    /// the learning rate is the last step's.
    pub fn mean(steps: &[StepStats]) -> StepStats {
        let n = steps.len().max(1) as f64;
        let parts: Vec<(StepStats, f64)> = steps.iter().map(|s| (s.clone(), 1.0 / n)).collect();
        StepStats {
            grad_norm: steps.iter().map(|s| s.grad_norm).sum::<f64>() / n,
            lr: steps.last().map_or(0.0, |s| s.lr),
            ..Self::weighted(&parts)
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
    /// Time spent in collectives with the other processes so far (data-parallel runs).
    pub collective_time: std::time::Duration,
    stepper: Stepper,
    /// Whether the step is split in a gradient graph (graph 0, run per micro-batch) and an
    /// update graph (graph 1); otherwise graph 0 is the whole step.
    split: bool,
    /// The scratch keys of the summed gradients (split steps), and the BatchNorm statistics'
    /// keys, in key order.
    acc_keys: Vec<String>,
    bn_keys: Vec<String>,
    /// Holds the step graphs' files for the backend.
    workdir: tempfile::TempDir,
    pub total_steps: usize,
    /// State keys in the order of the step graph's `STATE_CHECK` output.
    state_keys: Vec<String>,
    /// Whether that check bounds the updates (`StepRecord::check_bounds`).
    check_bounds: bool,
    /// The declared dims of the data inputs, to size the Dropout masks of each batch.
    input_dims: BTreeMap<String, Vec<onnx::Dim>>,
    /// When this trainer's first step ended.
    first_step_done: Option<std::time::Instant>,
}

fn scalar(t: &Tensors, n: &str) -> Option<f64> {
    t.get(n)
        .and_then(Value::as_f32)
        .and_then(|a| a.iter().next().copied())
        .map(|v| v as f64)
}

impl Trainer {
    /// A trainer whose step graph is kept in the system's temporary directory.
    pub fn new(path: &Path, settings: Settings) -> Result<Trainer> {
        Self::new_in(path, settings, &std::env::temp_dir())
    }

    /// A trainer whose step graph is kept in a temporary directory inside `workdir` (a run
    /// directory, where a killed run's leftovers are cleared at the next start).
    pub fn new_in(path: &Path, settings: Settings, workdir: &Path) -> Result<Trainer> {
        Self::new_for(path, settings, workdir, 1)
    }

    /// A trainer for one of `processes` processes of a data-parallel run (see `step_with`):
    /// with more than one, the step is split (as with gradient accumulation) so that the
    /// processes can sum their gradients between the two graphs.
    pub fn new_for(path: &Path, settings: Settings, workdir: &Path, processes: usize) -> Result<Trainer> {
        settings.validate()?;
        let model = onnx::load(path)?;
        let record = record_of(&model)?;
        let pnames: Vec<String> = record.params.iter().map(|p| p.0.clone()).collect();
        let bnames: Vec<String> = record
            .batchnorm
            .iter()
            .flat_map(|s| [s.mean.0.clone(), s.var.0.clone()])
            .collect();
        // Each state tensor's initial value: an initializer of the training graph, read straight
        // into the engine's buffer, or zeros (the optimizer's slots).
        let mut sources: BTreeMap<String, Option<&onnx::proto::TensorProto>> = BTreeMap::new();
        let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (p, t) in state_initializers(&model, &pnames)? {
            let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            for &slot in settings.optimizer.slots() {
                let k = step_graph::slot_key(slot, &p);
                shapes.insert(k.clone(), shape.clone());
                sources.insert(k, None);
            }
            shapes.insert(step_graph::param_key(&p), shape);
            sources.insert(step_graph::param_key(&p), Some(t));
        }
        for (b, t) in state_initializers(&model, &bnames)? {
            shapes.insert(step_graph::bn_key(&b), t.dims.iter().map(|&d| d as usize).collect());
            sources.insert(step_graph::bn_key(&b), Some(t));
        }
        let state_bytes = shapes.values().map(|s| f32_bytes(s)).fold(0u64, u64::saturating_add);
        let param_bytes = pnames
            .iter()
            .filter_map(|p| shapes.get(&step_graph::param_key(p)))
            .map(|s| f32_bytes(s))
            .fold(0u64, u64::saturating_add);
        let in_place = match settings.state_update {
            StateUpdate::TwoSets => false,
            StateUpdate::InPlace => true,
            StateUpdate::Auto => auto_in_place(
                state_bytes,
                param_bytes,
                settings.device,
                onnx::limits::available_memory(),
            ),
        };
        let split = settings.grad_accum > 1 || processes > 1;
        if settings.batch_size < settings.grad_accum.saturating_mul(processes) {
            return Err(Error::Config(format!(
                "a batch of {} cannot be split in {} micro-batches ({} per process, {processes} processes)\n  hint: raise the batch size or lower the gradient accumulation",
                settings.batch_size,
                settings.grad_accum.saturating_mul(processes),
                settings.grad_accum
            )));
        }
        // In place on the host, the largest tensors are updated in parts (their temporaries a
        // part's: see `STATE_PART_BYTES`).
        let largest = pnames
            .iter()
            .filter_map(|p| shapes.get(&step_graph::param_key(p)))
            .map(|s| f32_bytes(s))
            .max()
            .unwrap_or(0);
        let part_bytes = match settings.state_part_bytes {
            _ if !in_place || settings.device != Device::Cpu => None,
            Some(bytes) => Some(bytes.max(1)),
            None => auto_parts(state_bytes, param_bytes, largest, onnx::limits::available_memory())
                .then_some(STATE_PART_BYTES),
        };
        let form = step_graph::Form {
            in_place,
            part_bytes,
            target: match settings.backend {
                Backend::Ort => step_graph::Target::OnnxRuntime,
                Backend::Tract => step_graph::Target::Tract,
            },
        };
        let (opt, clip) = (settings.optimizer, settings.clip_grad_norm);
        let (sg, grad) = if split {
            let s = step_graph::build_split(&model, &record, opt, clip, form)?;
            (s.update, Some(s.grad))
        } else {
            (step_graph::build(&model, &record, opt, clip, form)?, None)
        };
        let o = &record.dagr.outputs;
        let mut losses: Vec<String> = vec![record.loss.clone()];
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
            if !losses.contains(t) {
                losses.push(t.clone());
            }
        }
        let mut fetch: Vec<String> = vec![step_graph::GRAD_SQ.to_string(), step_graph::STATE_CHECK.to_string()];
        if !split {
            fetch.extend(losses.iter().cloned());
        }
        let workdir = tempfile::Builder::new()
            .prefix(onnx::io::TEMP_PREFIX)
            .tempdir_in(workdir)
            .map_err(|source| Error::Write {
                path: workdir.to_path_buf(),
                source,
            })?;
        let step_path = workdir.path().join(STEP_FILE);
        let grad_path = workdir.path().join(GRAD_STEP_FILE);
        // Saved before the backend loads them; `fit` keeps a copy in the run's directory.
        if let Some(g) = &grad {
            onnx::save(&g.model, &grad_path)?;
        }
        onnx::save(&sg.model, &step_path)?;
        // One check per key, in the order keys first appear (a key updated in parts has a link
        // per part).
        let mut state_keys: Vec<String> = Vec::new();
        for l in &sg.state {
            if !state_keys.contains(&l.key) {
                state_keys.push(l.key.clone());
            }
        }
        let check_bounds = sg.check_bounds;
        let idx = dagr_ops::index(&model)?;
        let input_dims = idx
            .user_inputs()
            .into_iter()
            .filter_map(|n| Some((n.clone(), idx.fact(&n)?.shape.clone()?)))
            .collect();
        // The engine holds the state on the host unless it computes on a device: once where it
        // updates it in place, else twice (see `runtime::Stepper`).
        let sets = if sg.in_place { 1 } else { 2 };
        if settings.device == Device::Cpu {
            // With accumulation, one more copy of the parameters: the summed gradients.
            let scratch_bytes = if split { param_bytes } else { 0 };
            onnx::limits::check_alloc_hint(
                state_bytes.saturating_mul(sets).saturating_add(scratch_bytes),
                "the training state (parameters and optimizer slots)",
                "train a smaller model, use SGD without momentum (no optimizer slots), or use `device` cuda",
            )?;
        }
        let zeros: Vec<String> = sources
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        let base_dir = model.base_dir.clone();
        let mut fill = |key: &str, mut out: ndarray::ArrayViewMutD<'_, f32>| -> Result<()> {
            match sources.get(key) {
                Some(Some(t)) => match out.as_slice_mut() {
                    Some(buf) => tensor::read_f32_into(t, &base_dir, buf),
                    None => {
                        let v = tensor::to_f32(t, &base_dir)?;
                        let a = ndarray::ArrayViewD::from_shape(out.shape(), &v)
                            .map_err(|e| Error::Internal(e.to_string()))?;
                        out.assign(&a);
                        Ok(())
                    }
                },
                Some(None) => {
                    out.fill(0.0);
                    Ok(())
                }
                None => Err(Error::Internal(format!("no initial value for the state '{key}'"))),
            }
        };
        let mut graphs = Vec::new();
        let mut scratch = Vec::new();
        if let Some(g) = grad {
            for l in &g.state {
                if let Some(p) = l.key.strip_prefix("acc/") {
                    scratch.push(l.key.clone());
                    if let Some(shape) = shapes.get(&step_graph::param_key(p)).cloned() {
                        shapes.insert(l.key.clone(), shape);
                    }
                }
            }
            graphs.push(GraphSpec {
                path: &grad_path,
                links: g.state,
                reads: g.reads,
                fetch: &losses,
                in_place: g.in_place,
            });
        }
        graphs.push(GraphSpec {
            path: &step_path,
            links: sg.state,
            reads: sg.reads,
            fetch: &fetch,
            in_place: sg.in_place,
        });
        let acc_keys = scratch.clone();
        let mut bn_keys: Vec<String> = bnames.iter().map(|b| step_graph::bn_key(b)).collect();
        bn_keys.sort();
        let stepper = Stepper::new(
            settings.backend,
            StepSpec {
                graphs,
                device: settings.device,
                threads: settings.threads,
                shapes: &shapes,
                scratch,
                zeros,
                device_index: settings.device_index,
            },
            &mut fill,
        )?;
        Ok(Trainer {
            path: path.to_path_buf(),
            state_keys,
            check_bounds,
            record,
            progress: Progress {
                rng: Rng(settings.seed),
                ..Default::default()
            },
            settings,
            backend_time: Default::default(),
            collective_time: Default::default(),
            stepper,
            split,
            acc_keys,
            bn_keys,
            workdir,
            total_steps: 0,
            input_dims,
            first_step_done: None,
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
        let masks: std::collections::HashSet<&String> = self.record.dropout_masks.iter().map(|m| &m.input).collect();
        idx.user_inputs()
            .into_iter()
            .filter(|n| !masks.contains(n))
            .chain(
                idx.graph_inputs
                    .iter()
                    .filter(|n| idx.initializers.contains(*n))
                    .cloned(),
            )
            .filter(|n| !state.contains(n))
            .collect()
    }

    /// The Dropout masks of this step, added to `feed`: each element kept with probability
    /// `1 - ratio`, from a generator seeded by the run's seed, the step and the mask, so that
    /// a resumed run and another backend draw the same masks.
    /// `part`: the micro-batch's index among the step's parts (0 for a whole step), so that each
    /// part draws its own masks.
    fn draw_dropout_masks(&self, feed: &mut Tensors, part: usize) -> Result<()> {
        if self.record.dropout_masks.is_empty() {
            return Ok(());
        }
        // The symbolic dims (the batch) as this batch has them.
        let mut env = std::collections::HashMap::new();
        for (name, dims) in &self.input_dims {
            if let Some(v) = feed.get(name) {
                for (d, &n) in dims.iter().zip(v.shape()) {
                    if let onnx::Dim::Sym(e) = d {
                        if e.symbols().count() == 1 && e.symbols().next() == Some(&d.to_string()) {
                            env.insert(d.to_string(), n as i64);
                        }
                    }
                }
            }
        }
        for (k, m) in self.record.dropout_masks.iter().enumerate() {
            let shape: Option<Vec<usize>> = m
                .shape
                .iter()
                .map(|s| onnx::Dim::parse(s).eval(&env).and_then(|v| usize::try_from(v).ok()))
                .collect();
            let shape = shape.ok_or_else(|| {
                Error::Data(format!(
                    "the Dropout mask '{}' has dims {:?} that this batch does not determine",
                    m.input, m.shape
                ))
            })?;
            let n: usize = shape.iter().product();
            let mut rng = Rng(self
                .settings
                .seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add((self.progress.step as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
                .wrapping_add((part as u64).wrapping_mul(0x94D0_49BB_1331_11EB))
                .wrapping_add(k as u64));
            let keep = 1.0 - m.ratio;
            let v: Vec<bool> = (0..n)
                .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < keep)
                .collect();
            let a = ArrayD::from_shape_vec(shape, v).map_err(|e| Error::Internal(e.to_string()))?;
            feed.insert(m.input.clone(), Value::Bool(a));
        }
        Ok(())
    }

    /// The step graph this trainer runs (standard ONNX; see `step_graph`); with gradient
    /// accumulation, the update graph.
    pub fn step_graph_path(&self) -> PathBuf {
        self.workdir.path().join(STEP_FILE)
    }

    /// The files of the graphs this trainer runs, in its working directory and a run's.
    pub fn step_graph_files(&self) -> Vec<&'static str> {
        if self.split {
            vec![GRAD_STEP_FILE, STEP_FILE]
        } else {
            vec![STEP_FILE]
        }
    }

    /// Every state tensor (`param/`, `bn/`, `m/`, `v/` keys), copied from the backend.
    pub fn state(&self) -> Result<StateValues> {
        self.stepper.state()
    }

    /// Replace state tensors by key (each keeps its shape; keys not given are kept).
    pub fn set_state(&mut self, values: &StateValues) -> Result<()> {
        self.stepper.set_state(values)
    }

    /// One training step on `batch`: forward, backward and the optimizer update, all in the
    /// step graph, or with `grad_accum` K > 1, the gradients of K micro-batches (the batch split
    /// along every input's first axis in K nearly equal parts) summed on the backend, weighted
    /// by their share of the batch, then the update. Nothing changes when the loss or a gradient
    /// is not finite (with micro-batches: the parameters and optimizer state; the BatchNorm
    /// statistics keep the updates of the micro-batches before the one that failed).
    pub fn step(&mut self, batch: Tensors) -> Result<StepStats> {
        self.step_with(batch, &dagr_dist::Alone)
    }

    /// The learning rate of the next step, and the feed of its per-step scalars.
    fn next_scalars(&self) -> (f64, Tensors) {
        let lr = optim::learning_rate(
            self.settings.lr,
            self.settings.schedule,
            self.settings.warmup_steps,
            self.progress.step,
            self.total_steps.max(1),
            self.progress.epoch,
        );
        let mut feed = Tensors::new();
        for (name, v) in self.settings.optimizer.scalars(lr, self.progress.step + 1) {
            feed.insert(name.to_string(), Value::F32(ndarray::arr0(v as f32).into_dyn()));
        }
        (lr, feed)
    }

    fn non_finite(&self, what: String) -> Error {
        Error::NonFinite {
            step: self.progress.step + 1,
            epoch: self.progress.epoch + 1,
            what,
        }
    }

    /// The loss and its terms in `out` (a whole step's or a micro-batch's).
    fn losses(&self, out: &Tensors) -> Result<StepStats> {
        let loss = scalar(out, &self.record.loss).unwrap_or(f64::NAN);
        if !loss.is_finite() {
            return Err(self.non_finite(format!("loss ({loss})")));
        }
        let o = &self.record.dagr.outputs;
        Ok(StepStats {
            loss,
            task_loss: o.task_loss.as_ref().and_then(|t| scalar(out, t)),
            dagr_loss: scalar(out, &o.loss).unwrap_or(f64::NAN),
            dispersion: scalar(out, &o.dispersion).unwrap_or(f64::NAN),
            anchoring: o.anchoring.as_ref().and_then(|t| scalar(out, t)),
            pareto_alpha: self.record.pareto_alpha.as_ref().and_then(|t| scalar(out, t)),
            grad_norm: 0.0,
            lr: 0.0,
        })
    }

    /// Check the update's report (`GRAD_SQ`, `STATE_CHECK`) and return the gradient norm.
    fn check_update(&self, out: &Tensors, lr: f64) -> Result<f64> {
        let sq = out
            .get(step_graph::GRAD_SQ)
            .and_then(Value::as_f32)
            .ok_or_else(|| Error::Internal("the step graph returned no gradient norms".into()))?;
        if let Some(i) = sq.iter().position(|v| !v.is_finite()) {
            return Err(self.non_finite(format!("gradient of '{}'", self.record.params[i].0)));
        }
        // The update itself (a huge learning rate, eps 0 over a zero gradient, ...).
        let check = out
            .get(step_graph::STATE_CHECK)
            .and_then(Value::as_f32)
            .ok_or_else(|| Error::Internal("the step graph returned no state check".into()))?;
        if let Some(i) = check.iter().position(|&v| v != 0.0) {
            let key = self.state_keys.get(i).cloned().unwrap_or_default();
            let how = match self.check_bounds {
                true => ", or one within 4x of float32's range: its bound reaches it",
                false => "",
            };
            return Err(self.non_finite(format!(
                "update of '{key}' (learning rate {lr}{how}: check the optimizer settings)"
            )));
        }
        Ok(sq.iter().map(|&v| v as f64).sum::<f64>().sqrt())
    }

    fn whole_step(&mut self, batch: Tensors) -> Result<StepStats> {
        let (lr, mut feed) = self.next_scalars();
        feed.extend(batch);
        self.draw_dropout_masks(&mut feed, 0)?;
        let started = std::time::Instant::now();
        let out = self.stepper.run(0, feed);
        self.backend_time += started.elapsed();
        let out = out?;
        let mut stats = self.losses(&out)?;
        stats.grad_norm = self.check_update(&out, lr)?;
        stats.lr = lr;
        self.stepper.commit();
        self.progress.step += 1;
        self.first_step_done.get_or_insert_with(std::time::Instant::now);
        Ok(stats)
    }

    /// One step of a data-parallel run over `batch`, the same global batch on every process of
    /// `comm`: this process takes its `grad_accum` parts of the batch's `processes x grad_accum`
    /// (as `np.array_split`), the processes sum their weighted gradients (and their loss terms)
    /// before the update, which every process then makes alike, and process 0's BatchNorm
    /// statistics become everyone's (as DDP's `broadcast_buffers`). `step` is this with one
    /// process (`Alone`).
    pub fn step_with(&mut self, batch: Tensors, comm: &dyn dagr_dist::Collective) -> Result<StepStats> {
        if !self.split {
            return self.whole_step(batch);
        }
        let rows = batch_rows(&batch)?;
        let k = self.settings.grad_accum;
        let parts = k * comm.size();
        let first = comm.rank() * k;
        let micro: Vec<Tensors> = (first..first + k)
            .map(|j| slice_rows(&batch, part_range(rows, parts, j)))
            .collect::<Result<_>>()?;
        let stats = self.accumulate(micro, rows, first, comm)?;
        if comm.size() > 1 && !self.bn_keys.is_empty() {
            let keys = self.bn_keys.clone();
            self.collective_on(&keys, &mut |buf| comm.broadcast_f32(buf))?;
        }
        Ok(stats)
    }

    /// Apply the collective `op` to each of `keys` (state or scratch) where the backend keeps it,
    /// timed in `collective_time`.
    fn collective_on(&mut self, keys: &[String], op: &mut dyn FnMut(&mut [f32]) -> Result<()>) -> Result<()> {
        let started = std::time::Instant::now();
        self.stepper.visit_mut(keys, &mut |key, mut v| match v.as_slice_mut() {
            Some(buf) => op(buf),
            None => Err(Error::Internal(format!("the buffer of '{key}' is not contiguous"))),
        })?;
        self.collective_time += started.elapsed();
        Ok(())
    }

    /// One step over `micro` batches that hold part of a step of `total_rows` samples (the
    /// others, if any, are other processes'): each gradient is summed with its weight
    /// `rows / total_rows`, the sums and loss terms summed over `comm`, then the update.
    /// `first_part`: the index of `micro[0]` among all the step's parts (it seeds the Dropout
    /// masks).
    fn accumulate(
        &mut self,
        micro: Vec<Tensors>,
        total_rows: usize,
        first_part: usize,
        comm: &dyn dagr_dist::Collective,
    ) -> Result<StepStats> {
        if !self.split {
            return Err(Error::Internal("an accumulated step needs a split step graph".into()));
        }
        let mut parts: Vec<(StepStats, f64)> = Vec::new();
        let mut failed: Option<Error> = None;
        let mut first = true;
        for (j, batch) in micro.into_iter().enumerate() {
            let rows = batch_rows(&batch)?;
            if rows == 0 {
                continue;
            }
            let w = rows as f64 / total_rows.max(1) as f64;
            let mut feed = batch;
            self.draw_dropout_masks(&mut feed, first_part + j)?;
            feed.insert(
                step_graph::ACC_FIRST.into(),
                Value::Bool(ndarray::arr0(first).into_dyn()),
            );
            feed.insert(
                step_graph::ACC_WEIGHT.into(),
                Value::F32(ndarray::arr0(w as f32).into_dyn()),
            );
            let started = std::time::Instant::now();
            let out = self.stepper.run(0, feed);
            self.backend_time += started.elapsed();
            match self.losses(&out?) {
                Ok(stats) => parts.push((stats, w)),
                Err(Error::NonFinite { step, epoch, what }) => {
                    failed = Some(Error::NonFinite {
                        step,
                        epoch,
                        what: format!(
                            "{what} in micro-batch {}{}",
                            first_part + j + 1,
                            if self.record.batchnorm.is_empty() || first {
                                ""
                            } else {
                                " (the BatchNorm running statistics keep the earlier micro-batches' updates)"
                            }
                        ),
                    });
                    break;
                }
                Err(e) => return Err(e),
            }
            self.stepper.commit();
            first = false;
        }
        let mut stats = StepStats::weighted(&parts);
        if comm.size() > 1 {
            if first {
                // No sample here (a last batch smaller than the parts): a zero gradient.
                let keys = self.acc_keys.clone();
                self.stepper.visit_mut(&keys, &mut |_, mut v| {
                    v.fill(0.0);
                    Ok(())
                })?;
            }
            // The loss terms, weighted, and whether any process failed, summed over all.
            let opt = |x: Option<f64>, w: f64| [x.map_or(0.0, |v| v * w), if x.is_some() { w } else { 0.0 }];
            let mut v: Vec<f64> = vec![f64::from(u8::from(failed.is_some()))];
            for (s, w) in &parts {
                let mut row = vec![s.loss * w, s.dagr_loss * w, s.dispersion * w];
                row.extend(opt(s.task_loss, *w));
                row.extend(opt(s.anchoring, *w));
                row.extend(opt(s.pareto_alpha, *w));
                if v.len() == 1 {
                    v.extend(row);
                } else {
                    v.iter_mut().skip(1).zip(row).for_each(|(a, b)| *a += b);
                }
            }
            v.resize(10, 0.0);
            let started = std::time::Instant::now();
            comm.sum_f64(&mut v)?;
            self.collective_time += started.elapsed();
            if v[0] > 0.0 {
                return Err(failed.unwrap_or_else(|| self.non_finite(format!("loss on {} other process(es)", v[0]))));
            }
            let ratio = |num: f64, den: f64| (den > 0.0).then(|| num / den);
            stats = StepStats {
                loss: v[1],
                dagr_loss: v[2],
                dispersion: v[3],
                task_loss: ratio(v[4], v[5]),
                anchoring: ratio(v[6], v[7]),
                pareto_alpha: ratio(v[8], v[9]),
                grad_norm: 0.0,
                lr: 0.0,
            };
            let keys = self.acc_keys.clone();
            self.collective_on(&keys, &mut |buf| comm.sum_f32(buf))?;
        } else if let Some(e) = failed {
            return Err(e);
        } else if first {
            return Err(Error::Data("a step with no samples".into()));
        }
        let (lr, feed) = self.next_scalars();
        let started = std::time::Instant::now();
        let out = self.stepper.run(1, feed);
        self.backend_time += started.elapsed();
        let out = out?;
        let grad_norm = self.check_update(&out, lr)?;
        self.stepper.commit();
        self.progress.step += 1;
        self.first_step_done.get_or_insert_with(std::time::Instant::now);
        stats.grad_norm = grad_norm;
        stats.lr = lr;
        Ok(stats)
    }

    /// A fingerprint of the whole state (every bit of every tensor, in key order): processes
    /// that hold the same state have the same fingerprint.
    pub fn state_fingerprint(&self) -> Result<u64> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        self.stepper.visit_state(&mut |key, v| {
            for b in key.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            for x in v.iter() {
                h = (h ^ u64::from(x.to_bits())).wrapping_mul(0x0100_0000_01b3);
            }
            Ok(())
        })?;
        Ok(h)
    }

    // ---- checkpoints -------------------------------------------------------------------

    /// Write the current state, streamed from the engine, and the run's progress to `dir`
    /// (see `checkpoint`).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let record = checkpoint::Record {
            format: checkpoint::FORMAT,
            step: self.progress.step,
            epoch: self.progress.epoch,
            rng: self.progress.rng.0,
            settings: self.settings.clone(),
            model: self.path.clone(),
            sha256: String::new(),
        };
        checkpoint::save(dir, &record, &|f| self.stepper.visit_state(f))
    }

    /// Continue from the checkpoint in `dir`. Settings other than those of the checkpoint are
    /// refused unless `new_settings`; then the optimizer's state is reset when the optimizer
    /// changed. Returns what was reset or changed, one line each.
    ///
    /// The same run's checkpoint streams into the backend one tensor at a time (no copy of the
    /// state is held); its checksum is checked at the end, so after an error the trainer's state
    /// is partly replaced: discard the trainer (as `fit` does).
    pub fn load_checkpoint(&mut self, dir: &Path, new_settings: bool) -> Result<Vec<String>> {
        let shapes = self.stepper.shapes();
        // The record first: a file that is no checkpoint says so before anything else.
        let was = checkpoint::record(dir)?;
        let held = checkpoint::entries(dir)?;
        let is_model_state = |k: &String| k.starts_with("param/") || k.starts_with("bn/");
        let does_not_fit = |m: String| {
            Error::Data(format!(
                "the checkpoint in {} does not fit this training run: {m}\n  hint: resume with the training graph and optimizer it was made with",
                dir.display()
            ))
        };
        if let Some(k) = shapes.keys().filter(|k| is_model_state(k)).find(|k| !held.contains(k)) {
            return Err(does_not_fit(format!("it has no entry '{k}'")));
        }
        // The shape each entry must have: the state's, or for the slots of another optimizer,
        // their parameter's.
        let mut expected = BTreeMap::new();
        for k in held {
            let param = k.split_once('/').map(|(_, p)| step_graph::param_key(p));
            match shapes.get(&k).or_else(|| param.and_then(|p| shapes.get(&p))) {
                Some(s) => expected.insert(k, s.clone()),
                None => return Err(does_not_fit(format!("it holds '{k}', which is not state of this run"))),
            };
        }
        let diffs = checkpoint::differences(&was.settings, &self.settings);
        let mut notes = Vec::new();
        if !diffs.is_empty() {
            if !new_settings {
                return Err(Error::Config(format!(
                    "the checkpoint in {} was made with other settings:\n    {}\n  hint: resume with the same settings, or ask for the new ones explicitly (`new_settings`)",
                    dir.display(),
                    diffs.join("\n    ")
                )));
            }
            notes.extend(diffs.iter().map(|d| format!("changed {d}")));
        }
        // Another kind of optimizer starts from a zero state; the same kind keeps its slots
        // (a new momentum keeps the buffer, as editing a PyTorch param group does), and slots
        // it did not have start at zero.
        let kind_changed =
            std::mem::discriminant(&was.settings.optimizer) != std::mem::discriminant(&self.settings.optimizer);
        let missing: Vec<String> = shapes.keys().filter(|k| !expected.contains_key(*k)).cloned().collect();
        let extra = expected.keys().filter(|k| !shapes.contains_key(*k)).count();
        let changed = kind_changed || !missing.is_empty() || extra > 0;
        if changed && !new_settings {
            return Err(does_not_fit(format!(
                "its optimizer state differs ({} entries missing, {extra} not state of this run)",
                missing.len()
            )));
        }
        let record = if changed {
            // The checkpoint whole, then the optimizer's state reset.
            let (record, mut values) = checkpoint::load(dir, &expected)?;
            values.retain(|k, _| is_model_state(k) || (!kind_changed && shapes.contains_key(k)));
            let mut zeroed = 0;
            for (k, s) in &shapes {
                if !values.contains_key(k) {
                    values.insert(k.clone(), ArrayD::zeros(s.as_slice()));
                    zeroed += 1;
                }
            }
            notes.push(format!(
                "the optimizer changed: its state was reset ({zeroed} tensors start at zero)"
            ));
            self.stepper.set_state(&values)?;
            record
        } else {
            // The same state: each tensor from the file straight into its backend buffer.
            let stepper = &mut self.stepper;
            checkpoint::load_each(dir, &expected, &mut |k, a| {
                stepper.visit_mut(&[k.to_string()], &mut |_, mut v| {
                    v.assign(&a);
                    Ok(())
                })
            })?
        };
        self.progress.step = record.step;
        self.progress.epoch = record.epoch;
        self.progress.rng = Rng(record.rng);
        Ok(notes)
    }

    // ---- export ------------------------------------------------------------------------

    /// The original model with the trained weights and running statistics, BatchNorm in
    /// inference mode: what serves predictions, with no DAGR cost, built in memory with every
    /// trained tensor inline (`export_to` writes it without holding the weights).
    /// `state` is the trainer's (from `state()`).
    pub fn export(&self, original: &Model, state: &StateValues) -> Result<Model> {
        let mut m = self.exported_graph(original)?;
        let index = trained_initializers(&m, state.keys().map(String::as_str))?;
        let g = m.graph_mut();
        for (k, v) in state {
            if let Some(&i) = index.get(k.as_str()) {
                let t = &mut g.initializer[i];
                let v = v.as_standard_layout();
                *t = tensor::f32_tensor(&t.name, &t.dims, v.as_slice().unwrap_or(&[]));
            }
        }
        Ok(m)
    }

    /// `export`, written to `path` with the trained tensors streamed from the engine's state
    /// (no copy of the weights is held). The original's layout is kept: tensors it stores as
    /// external data go to one data file beside `path` (`<file name>.data`, each tensor at a
    /// 4 KiB-aligned offset: the trained ones from the state, the others copied from the
    /// original's data files), the others inline. The data file is written (atomically) before
    /// the model; both hold the same layout every epoch, so a kill between the two leaves the
    /// previous epoch's model reading this epoch's weights, never a broken model. Returns the
    /// written model (its weights external or, where the original held them inline, inline).
    pub fn export_to(&self, original: &Model, path: &Path) -> Result<Model> {
        let mut m = self.exported_graph(original)?;
        let main_external = m
            .graph()
            .initializer
            .iter()
            .filter(|t| onnx::io::is_external(t))
            .count();
        if onnx::io::external_tensors(&m.proto).len() > main_external {
            // External data outside the main graph's initializers (tensor attributes, subgraph
            // initializers): the model is built in memory and saved with its data files copied.
            let m = self.export(original, &self.state()?)?;
            onnx::save(&m, path)?;
            return Ok(m);
        }
        let keys: Vec<String> = self.stepper.shapes().into_keys().collect();
        let index = trained_initializers(&m, keys.iter().map(String::as_str))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| MODEL_FILE.into());
        let data_name = format!("{file_name}.data");
        let data_path = dir.join(&data_name);
        let external: Vec<usize> = (0..m.graph().initializer.len())
            .filter(|&i| onnx::io::is_external(&m.graph().initializer[i]))
            .collect();
        for t in onnx::io::external_tensors(&m.proto) {
            let (loc, _, _) = onnx::io::external_info(t)?;
            let from = m.base_dir.join(loc.unwrap_or_default());
            if onnx::io::same_file(&from, &data_path) {
                return Err(Error::Config(format!(
                    "the exported model's weights would go to {}, which holds the weights of the model it is made from\n  hint: choose another output directory",
                    data_path.display()
                )));
            }
        }
        let original_dir = m.base_dir.clone();
        // Where each external tensor goes in the new data file: (offset, length) by initializer.
        let mut placed: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
        let mut inline: Vec<(usize, Vec<u8>)> = Vec::new();
        if external.is_empty() {
            self.stepper.visit_state(&mut |k, v| {
                if let Some(&i) = index.get(k) {
                    let v = v.as_standard_layout();
                    inline.push((i, tensor::f32_le_bytes(v.as_slice().unwrap_or(&[])).into_owned()));
                }
                Ok(())
            })?;
        } else {
            let g = m.graph();
            onnx::io::write_atomic_try(&data_path, |file| {
                use std::io::{Seek, Write};
                let werr = |source| Error::Write {
                    path: data_path.clone(),
                    source,
                };
                let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
                let mut at = 0u64;
                self.stepper.visit_state(&mut |k, v| {
                    let Some(&i) = index.get(k) else { return Ok(()) };
                    let v = v.as_standard_layout();
                    let bytes = tensor::f32_le_bytes(v.as_slice().unwrap_or(&[]));
                    if onnx::io::is_external(&g.initializer[i]) {
                        pad_to_page(&mut w, &mut at).map_err(werr)?;
                        onnx::io::write_chunked(&mut w, &bytes).map_err(werr)?;
                        placed.insert(i, (at, bytes.len() as u64));
                        at += bytes.len() as u64;
                    } else {
                        inline.push((i, bytes.into_owned()));
                    }
                    Ok(())
                })?;
                // The external tensors that did not train, copied from the original's files.
                w.flush().map_err(werr)?;
                let file = w.into_inner().map_err(|e| werr(e.into_error()))?;
                for &i in &external {
                    if placed.contains_key(&i) {
                        continue;
                    }
                    let t = &g.initializer[i];
                    let (loc, off, len) = onnx::io::external_info(t)?;
                    let from = original_dir.join(loc.unwrap_or_default());
                    let rerr = |source| Error::Read {
                        path: from.clone(),
                        source,
                    };
                    let mut src = std::fs::File::open(&from).map_err(rerr)?;
                    let len = match len {
                        Some(l) => l,
                        None => src.metadata().map_err(rerr)?.len().saturating_sub(off),
                    };
                    src.seek(std::io::SeekFrom::Start(off)).map_err(rerr)?;
                    pad_to_page(file, &mut at).map_err(werr)?;
                    let copied = std::io::copy(&mut std::io::Read::take(&mut src, len), file).map_err(werr)?;
                    if copied != len {
                        return Err(Error::ExternalData {
                            tensor: t.name.clone(),
                            location: from.display().to_string(),
                            problem: format!("holds {copied} bytes where {len} were expected"),
                        });
                    }
                    placed.insert(i, (at, len));
                    at += len;
                }
                Ok(())
            })?;
        }
        let g = m.graph_mut();
        for (i, bytes) in inline {
            let t = &mut g.initializer[i];
            t.raw_data = bytes;
            t.float_data.clear();
            t.data_location = Default::default();
            t.external_data.clear();
        }
        for (&i, &(offset, length)) in &placed {
            let t = &mut g.initializer[i];
            t.raw_data.clear();
            t.external_data.clear();
            for (key, value) in [
                ("location", data_name.clone()),
                ("offset", offset.to_string()),
                ("length", length.to_string()),
            ] {
                let mut e = onnx::proto::StringStringEntryProto::new();
                e.key = key.into();
                e.value = value;
                t.external_data.push(e);
            }
        }
        m.base_dir = dir;
        onnx::save(&m, path)?;
        Ok(m)
    }

    /// The original, prepared as the training graph was (functions inlined, Constant-node
    /// weights and the tensors named trainable as initializers, so that every trained tensor
    /// has its initializer), with BatchNorm and Dropout in inference mode. Keeps the original's
    /// source path, so that saving over the original is refused.
    fn exported_graph(&self, original: &Model) -> Result<Model> {
        let mut m = original.clone();
        dagr_core::training::prepare(&mut m, &self.record.options)?;
        let g = m.graph_mut();
        let outputs: std::collections::HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
        let consumed: std::collections::HashSet<String> = g.node.iter().flat_map(|n| n.input.clone()).collect();
        for n in g.node.iter_mut() {
            if dagr_onnx::ops::is_training_batchnorm(n)
                && n.output
                    .iter()
                    .skip(1)
                    .all(|o| o.is_empty() || (!outputs.contains(o) && !consumed.contains(o)))
            {
                n.output.truncate(1);
                n.attribute.retain(|a| a.name != "training_mode");
            }
            // A trained model predicts: Dropout in inference mode (no training_mode input), its
            // mask output dropped when nothing reads it.
            if n.op_type == "Dropout" && n.domain.is_empty() && n.input.len() > 2 {
                n.input.truncate(2);
                if n.output
                    .get(1)
                    .is_some_and(|o| !outputs.contains(o) && !consumed.contains(o))
                {
                    n.output.truncate(1);
                }
            }
        }
        // An initializer nothing reads now (exporters leave some: jax2onnx a kernel's layout
        // beside its transpose; a Dropout's training_mode dropped above) is not exported: it is
        // dead weight, and ONNX Runtime warns of each.
        let read: std::collections::HashSet<String> = g
            .node
            .iter()
            .flat_map(dagr_onnx::index::node_reads)
            .chain(g.input.iter().map(|i| i.name.clone()))
            .chain(outputs)
            .collect();
        g.initializer.retain(|t| read.contains(&t.name));
        Ok(m)
    }
}

/// Zeros up to the next multiple of 4 KiB after `at` (the offset written so far), which moves on.
/// The number of samples in `batch`: the first axis, the same for every input.
fn batch_rows(batch: &Tensors) -> Result<usize> {
    let mut rows = None;
    for (name, v) in batch {
        let n = v.shape().first().copied().ok_or_else(|| {
            Error::Data(format!(
                "'{name}' is a scalar: micro-batches split every input along its first axis (the batch)"
            ))
        })?;
        match rows {
            None => rows = Some(n),
            Some(r) if r != n => {
                return Err(Error::Data(format!(
                    "'{name}' has {n} rows where the other inputs have {r}: micro-batches split every input along its first axis (the batch)"
                )))
            }
            _ => {}
        }
    }
    rows.ok_or_else(|| Error::Data("a batch with no inputs".into()))
}

/// The rows of part `j` of `parts` nearly equal contiguous parts of `rows` rows (the first
/// `rows % parts` parts have one more).
pub fn part_range(rows: usize, parts: usize, j: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    let (q, r) = (rows / parts, rows % parts);
    let start = j * q + j.min(r);
    start..start + q + usize::from(j < r)
}

/// The rows `range` of every input of `batch`.
fn slice_rows(batch: &Tensors, range: std::ops::Range<usize>) -> Result<Tensors> {
    use ndarray::{Axis, Slice};
    let s = Slice::from(range);
    Ok(batch
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::F32(a) => Value::F32(a.slice_axis(Axis(0), s).to_owned()),
                Value::I64(a) => Value::I64(a.slice_axis(Axis(0), s).to_owned()),
                Value::Bool(a) => Value::Bool(a.slice_axis(Axis(0), s).to_owned()),
            };
            (k.clone(), v)
        })
        .collect())
}

fn pad_to_page(w: &mut impl std::io::Write, at: &mut u64) -> std::io::Result<()> {
    let pad = (4096 - *at % 4096) % 4096;
    *at += pad;
    w.write_all(&vec![0u8; pad as usize])
}

/// Bytes of a float32 tensor of `shape` (saturating).
fn f32_bytes(shape: &[usize]) -> u64 {
    shape.iter().fold(4u64, |a, &d| a.saturating_mul(d as u64))
}

/// The initializer of `m` each trained state key (`param/`, `bn/`; other keys are optimizer
/// slots) writes, by key; an error when one has none (another original model).
fn trained_initializers<'k>(m: &Model, keys: impl Iterator<Item = &'k str>) -> Result<BTreeMap<&'k str, usize>> {
    let by_name: BTreeMap<&str, usize> = m
        .graph()
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut out = BTreeMap::new();
    let mut missing = Vec::new();
    for k in keys {
        let Some(name) = k.strip_prefix("param/").or_else(|| k.strip_prefix("bn/")) else {
            continue;
        };
        match by_name.get(name) {
            Some(&i) => {
                out.insert(k, i);
            }
            None => missing.push(name),
        }
    }
    if !missing.is_empty() {
        return Err(Error::Config(format!(
            "the original model has no tensor for the trained {missing:?}: it is not the model this training graph was made from\n  hint: pass the model given to `--train` as `original`"
        )));
    }
    Ok(out)
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
    /// Resuming with settings other than the checkpoint's is allowed (and said).
    pub new_settings: bool,
    /// Stop after this many steps (for tests and benchmarks).
    pub max_steps: Option<usize>,
    /// The processes of a data-parallel run (`dagr_dist::Alone` for one): each takes its
    /// share of every batch; process 0 alone writes the run's files (see `fit`).
    pub comm: &'a dyn dagr_dist::Collective,
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
    /// In the first epoch a process runs: seconds from the start of the run (`fit`) to the end
    /// of its first step: loading, building the step graph, creating the session and
    /// filling the state, one step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_step_seconds: Option<f64>,
    /// In a data-parallel run: the part of `step_seconds` process 0 spent in the collectives
    /// (summing gradients and loss terms, sharing BatchNorm statistics, waiting for the others).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collective_seconds: Option<f64>,
}

/// What a training run tells its caller as it goes, and how the caller stops it. The library
/// prints nothing: the command line draws a progress bar and prints the epoch logs, the Python
/// binding does what a notebook wants. Every method has a silent default.
pub trait Callbacks {
    /// A remark before training: where a resumed run continues, what a new setting changed.
    fn notice(&mut self, _text: &str) {}
    /// Epoch `epoch` (1-based) of `epochs` starts, with `steps` steps.
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _steps: usize) {}
    /// A step was taken: its statistics, and the epoch's throughput so far.
    fn step(&mut self, _stats: &StepStats, _samples_per_second: f64) {}
    /// The epoch ended; `line` is the JSON line written to the log.
    fn epoch_end(&mut self, _log: &EpochLog, _line: &str) {}
    /// Asked before every step: true stops the run there (the last checkpoint stays intact).
    fn should_stop(&self) -> bool {
        false
    }
}

/// No reports, never stops.
impl Callbacks for () {}

/// No reports; stops when the flag is set (a signal handler's flag, for instance).
impl Callbacks for Arc<AtomicBool> {
    fn should_stop(&self) -> bool {
        self.load(Ordering::SeqCst)
    }
}

/// What a finished `fit` reports besides the epochs' logs.
#[derive(Debug, Default)]
pub struct Fitted {
    /// One per epoch trained by this call.
    pub logs: Vec<EpochLog>,
    /// Said once, before training: where a resumed run continues, what a new setting changed.
    pub notices: Vec<String>,
    /// The files this run writes in its directory.
    pub files: Vec<PathBuf>,
}

/// The files a run writes in its directory, by role.
pub const MODEL_FILE: &str = "model.onnx";
pub const STEP_FILE: &str = "step.onnx";
/// With gradient accumulation, `STEP_FILE` is the update graph and this the gradient graph
/// (see `step_graph::build_split`).
pub const GRAD_STEP_FILE: &str = "step.grad.onnx";
pub const LOG_FILE: &str = "log.jsonl";
pub const LOCK_FILE: &str = ".lock";

/// The files a run writes into its directory (the lock aside): what may never be an input, and
/// what `--force` removes.
fn run_files() -> [String; 6] {
    [
        MODEL_FILE.to_string(),
        format!("{MODEL_FILE}.data"),
        STEP_FILE.to_string(),
        GRAD_STEP_FILE.to_string(),
        LOG_FILE.to_string(),
        checkpoint::FILE.to_string(),
    ]
}

/// The user's files a run must never overwrite: the training graph, the original model, the
/// data. An output that is one of them (through any path) is refused before anything is written.
fn refuse_overwriting_inputs(run: &Run, original: Option<&Path>) -> Result<()> {
    let mut inputs: Vec<PathBuf> = [Some(run.model), original, Some(run.train), run.val]
        .into_iter()
        .flatten()
        .map(Path::to_path_buf)
        .collect();
    // The external data files the models read.
    for m in [Some(run.model), original].into_iter().flatten() {
        if let Ok(m) = onnx::load(m) {
            for t in onnx::io::external_tensors(&m.proto) {
                if let Ok((Some(loc), _, _)) = onnx::io::external_info(t) {
                    inputs.push(m.base_dir.join(loc));
                }
            }
        }
    }
    inputs.sort();
    inputs.dedup();
    for name in run_files().iter().map(String::as_str).chain([LOCK_FILE]) {
        let out = run.out.join(name);
        if let Some(input) = inputs.iter().find(|i| onnx::io::same_file(i, &out)) {
            return Err(Error::Config(format!(
                "the run directory {} would write {name}, which is the input {}\n  hint: choose another output directory",
                run.out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Train: epochs over `run.train`, validation and a checkpoint after each, JSON logs, the
/// trained inference model in `run.out/model.onnx`.
///
/// The run directory is locked while the run uses it; leftovers of a killed run (temporary
/// files) are cleared at the start. An epoch ends by writing, in this order, the exported model,
/// the log line and then the checkpoint, which commits the epoch: a resumed run continues after
/// the last checkpoint and drops the log lines of any epoch after it.
pub fn fit(run: &Run, settings: Settings, callbacks: &mut dyn Callbacks) -> Result<Fitted> {
    let started = std::time::Instant::now();
    settings.validate()?;
    if run.max_steps == Some(0) {
        return Err(Error::Config("the step limit must be at least 1".into()));
    }
    if run.comm.rank() != 0 {
        return fit_worker(run, settings, callbacks);
    }
    let original = original_of(run)?;
    refuse_overwriting_inputs(run, original.as_deref())?;
    if run.out.exists() && !run.resume && !run.force {
        return Err(Error::Config(format!(
            "the output directory {} exists\n  hint: pass `resume` to continue its run, or `force` to start over in it",
            run.out.display()
        )));
    }
    if run.out.exists() && !run.out.is_dir() {
        return Err(Error::Config(format!(
            "{} exists and is not a directory",
            run.out.display()
        )));
    }
    let created = !run.out.exists();
    std::fs::create_dir_all(run.out).map_err(|source| Error::Write {
        path: run.out.to_path_buf(),
        source,
    })?;
    let lock_path = run.out.join(LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| Error::Write {
            path: lock_path.clone(),
            source,
        })?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::Config(format!(
                "another run is using {}\n  hint: wait for it to finish, or choose another output directory",
                run.out.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::Write {
                path: lock_path,
                source: std::io::Error::new(
                    e.kind(),
                    format!("cannot lock the run directory ({e}); it must be on a file system with file locks"),
                ),
            })
        }
    }
    onnx::io::remove_stale_temps(run.out);
    if run.force {
        for name in run_files() {
            let p = run.out.join(name);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|source| Error::Write { path: p, source })?;
            }
        }
    }
    let result = fit_in(run, settings, callbacks, original, started);
    // A run that failed before its first checkpoint leaves no directory behind, so that the
    // same command works once the problem is fixed.
    if result.is_err() && created && !checkpoint::exists(run.out) {
        let _ = std::fs::remove_dir_all(run.out);
        if let Err(Error::Interrupted(m)) = result {
            return Err(Error::Interrupted(format!(
                "{m}; no epoch had completed, so nothing was saved and {} was removed",
                run.out.display()
            )));
        }
    }
    drop(lock);
    result
}

/// The original model a run exports through: the one it names, else the one the training
/// graph's record names.
fn original_of(run: &Run) -> Result<Option<PathBuf>> {
    let record = record_of(&onnx::load(run.model)?)?;
    Ok(run
        .original
        .map(Path::to_path_buf)
        .or_else(|| record.original.as_ref().map(PathBuf::from)))
}

/// A process of a data-parallel run other than process 0: the same steps over its share of
/// each batch, resuming from process 0's checkpoint (read, never written), and nothing
/// written: no lock, log, checkpoint or model (process 0 writes them).
fn fit_worker(run: &Run, settings: Settings, cb: &mut dyn Callbacks) -> Result<Fitted> {
    let mut t = Trainer::new_for(run.model, settings.clone(), &std::env::temp_dir(), run.comm.size())?;
    let original = original_of(run)?;
    let data = RunInputs::load(run, &t, original)?;
    if run.resume && checkpoint::exists(run.out) {
        t.load_checkpoint(run.out, run.new_settings)?;
    }
    t.total_steps = data.per_epoch * settings.epochs;
    let mut fitted = Fitted::default();
    while t.progress.epoch < settings.epochs {
        train_epoch(run, &mut t, &data, cb)?;
        same_state_everywhere(&t, run.comm)?;
        if run.max_steps.is_some_and(|m| t.progress.step >= m) {
            break;
        }
    }
    fitted
        .notices
        .push(format!("process {} of {}: done", run.comm.rank(), run.comm.size()));
    Ok(fitted)
}

/// Stop the run where the processes of a data-parallel run no longer hold the same state (a
/// cheap fingerprint of it, compared once per epoch).
pub fn same_state_everywhere(t: &Trainer, comm: &dyn dagr_dist::Collective) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let h = t.state_fingerprint()?;
    // Exact in f64: two 32-bit halves; max(x) == -max(-x) on every process iff all agree.
    let (hi, lo) = ((h >> 32) as f64, (h & 0xffff_ffff) as f64);
    let mut v = [hi, lo, -hi, -lo];
    comm.max_f64(&mut v)?;
    if v[0] != -v[2] || v[1] != -v[3] {
        return Err(Error::Runtime {
            backend: "mpi".into(),
            message: format!(
                "after epoch {} the processes hold different parameters (process {} differs from another)\n  hint: every process must run the same build, backend and `threads` on the same data; the last checkpoint is intact",
                t.progress.epoch,
                comm.rank()
            ),
        });
    }
    Ok(())
}

/// Keep the log lines of the epochs up to `epoch` (a resumed run writes the later ones anew);
/// a torn last line is dropped too.
fn trim_log(path: &Path, epoch: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["epoch"].as_u64())
                .is_some_and(|e| e as usize <= epoch)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept != text {
        onnx::io::write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

/// The last epoch the log has a line for (0 when none).
fn logged_epochs(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["epoch"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Append one line to the log in a single write, flushed to disk.
fn append_log(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let werr = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(werr)?;
    dagr_onnx::fault::point("log.before-write");
    f.write_all(format!("{line}\n").as_bytes()).map_err(werr)?;
    f.sync_data().map_err(werr)?;
    dagr_onnx::fault::point("log.after-write");
    Ok(())
}

/// What a run reads before its first step: the original model (to export into), the heads and
/// label input (for validation), and the datasets, checked against the graph.
struct RunInputs {
    original: Model,
    heads: Vec<String>,
    labels: Option<String>,
    train: Dataset,
    val: Option<Dataset>,
    /// Steps in an epoch.
    per_epoch: usize,
}

impl RunInputs {
    fn load(run: &Run, t: &Trainer, original: Option<PathBuf>) -> Result<RunInputs> {
        let settings = &t.settings;
        let model = onnx::load(run.model)?;
        let idx = dagr_ops::index(&model)?;
        let original_path =
            original.ok_or_else(|| Error::Config("the original model is unknown; pass `original` MODEL".into()))?;
        let original = onnx::load(&original_path)?;
        let (heads, labels) = match &t.record.dagr.config.task {
            dagr_core::Task::CrossEntropy { logits, .. } => {
                (logits.clone(), t.record.dagr.outputs.labels_input.clone())
            }
            _ => (Vec::new(), None),
        };
        let classes = heads
            .first()
            .and_then(|h| idx.fact(h))
            .and_then(|f| f.shape.clone())
            .and_then(|s| match s.get(1) {
                Some(dagr_onnx::Dim::Known(c)) => Some(*c),
                _ => None,
            });
        let inputs = t.data_inputs(&idx);
        let label_check = labels.as_deref().zip(classes);
        let train = Dataset::load(run.train, &idx, &inputs, label_check)?;
        let val = match run.val {
            Some(p) => Some(Dataset::load(p, &idx, &inputs, label_check)?),
            None => None,
        };
        let modalities = t.record.dagr.encoders.len() as u64;
        dagr_onnx::limits::check_alloc_hint(
            dagr_onnx::limits::dagr_pairwise_bytes(settings.batch_size.min(train.len) as u64, modalities),
            &format!("DAGR's pairwise terms at batch size {}", settings.batch_size),
            "use a smaller batch size: the dispersion term holds [batch, batch] matrices",
        )?;
        let per_epoch = train.batches(settings.batch_size, None, settings.drop_last).len();
        if per_epoch == 0 {
            return Err(Error::Config(format!(
                "an epoch has no batch: the data has {} samples, fewer than the batch size {} whose partial batch drop-last drops",
                train.len, settings.batch_size
            )));
        }
        Ok(RunInputs {
            original,
            heads,
            labels,
            train,
            val,
            per_epoch,
        })
    }
}

/// Continue from the checkpoint in `run.out`, if there is one; returns what to tell the user.
fn resume(run: &Run, t: &mut Trainer, log_path: &Path) -> Result<Vec<String>> {
    if checkpoint::exists(run.out) {
        let notes = t.load_checkpoint(run.out, run.new_settings)?;
        trim_log(log_path, t.progress.epoch)?;
        let mut all = vec![format!(
            "resuming after epoch {} (step {})",
            t.progress.epoch, t.progress.step
        )];
        all.extend(notes);
        return Ok(all);
    }
    if logged_epochs(log_path) > 1 {
        return Err(Error::Data(format!(
            "{} has a log of completed epochs but no {}: the checkpoint was removed\n  hint: restore it, or start over with `force`",
            run.out.display(),
            checkpoint::FILE
        )));
    }
    // At most the first epoch's log line, written just before its checkpoint: that checkpoint
    // never landed (the process was killed while writing it).
    trim_log(log_path, 0)?;
    Ok(vec!["no checkpoint yet: starting from the first epoch".into()])
}

/// The steps of one epoch: their statistics, the samples seen, and the wall time. Stops early
/// (with the steps so far) at the step limit; returns an error when the caller stops the run or
/// a step is not finite.
fn train_epoch(
    run: &Run,
    t: &mut Trainer,
    data: &RunInputs,
    cb: &mut dyn Callbacks,
) -> Result<(Vec<StepStats>, usize, std::time::Duration)> {
    let settings = t.settings.clone();
    let mut rng = t.progress.rng;
    let batches = data.train.batches(
        settings.batch_size,
        settings.shuffle.then_some(&mut rng),
        settings.drop_last,
    );
    cb.epoch_start(t.progress.epoch + 1, settings.epochs, batches.len());
    let started = std::time::Instant::now();
    let mut stats = Vec::with_capacity(batches.len());
    let mut samples = 0usize;
    for rows in &batches {
        // Every process stops before the same step (a signal may reach them at different
        // steps).
        let mut stop = [f64::from(u8::from(cb.should_stop()))];
        if run.comm.size() > 1 {
            run.comm.max_f64(&mut stop)?;
        }
        if stop[0] > 0.0 {
            return Err(Error::Interrupted(format!(
                "interrupted during epoch {}{}",
                t.progress.epoch + 1,
                if checkpoint::exists(run.out) {
                    format!(
                        "; the last checkpoint (epoch {}) in {} is intact: continue with `resume`",
                        t.progress.epoch,
                        run.out.display()
                    )
                } else {
                    String::new()
                }
            )));
        }
        let s = t.step_with(data.train.batch(rows), run.comm).map_err(|e| match e {
            Error::NonFinite { .. } if checkpoint::exists(run.out) => Error::Data(format!(
                "{e}\n  the last good checkpoint is {} (epoch {})",
                run.out.join(checkpoint::FILE).display(),
                t.progress.epoch
            )),
            other => other,
        })?;
        samples += rows.len();
        cb.step(&s, samples as f64 / started.elapsed().as_secs_f64());
        stats.push(s);
        if run.max_steps.is_some_and(|m| t.progress.step >= m) {
            break;
        }
    }
    t.progress.rng = rng;
    t.progress.epoch += 1;
    Ok((stats, samples, started.elapsed()))
}

/// The end of an epoch, in the order that makes a kill at any point safe: the exported model,
/// the validation metrics, the log line, and then the checkpoint, which commits the epoch.
fn finish_epoch(run: &Run, t: &Trainer, data: &RunInputs, log: EpochLog) -> Result<(EpochLog, String)> {
    let backend = t.settings.backend;
    let mut log = log;
    // The export and the checkpoint each stream the state from the engine (no copy is held).
    let model_out = run.out.join(MODEL_FILE);
    dagr_onnx::fault::point("epoch.before-export");
    let exported = t.export_to(&data.original, &model_out)?;
    if let (Some(v), Some(l)) = (&data.val, &data.labels) {
        if !data.heads.is_empty() {
            log.val_accuracy = eval::accuracy_on(&model_out, backend, v, &data.heads, l)?;
        }
    }
    if let Some(v) = &data.val {
        log.geometry = epoch_geometry(&exported, &t.record, v, data.labels.as_deref(), backend)?;
    }
    let line = serde_json::to_string(&log).map_err(|e| Error::Internal(format!("epoch log: {e}")))?;
    append_log(&run.out.join(LOG_FILE), &line)?;
    dagr_onnx::fault::point("epoch.before-checkpoint");
    t.save_checkpoint(run.out)?;
    dagr_onnx::fault::point("epoch.after-checkpoint");
    Ok((log, line))
}

fn fit_in(
    run: &Run,
    settings: Settings,
    cb: &mut dyn Callbacks,
    original: Option<PathBuf>,
    started: std::time::Instant,
) -> Result<Fitted> {
    let mut t = Trainer::new_for(run.model, settings.clone(), run.out, run.comm.size())?;
    let data = RunInputs::load(run, &t, original)?;
    let mut fitted = Fitted {
        files: [MODEL_FILE, STEP_FILE, checkpoint::FILE, LOG_FILE]
            .iter()
            .map(|f| run.out.join(f))
            .collect(),
        ..Default::default()
    };
    if run.resume {
        fitted.notices = resume(run, &mut t, &run.out.join(LOG_FILE))?;
    }
    for n in &fitted.notices {
        cb.notice(n);
    }
    if t.progress.epoch >= settings.epochs {
        fitted.notices.push(format!(
            "the run in {} has already trained {} epochs: nothing to do (raise `epochs` to continue)",
            run.out.display(),
            t.progress.epoch
        ));
        fitted.files.clear();
        return Ok(fitted);
    }
    // The whole training step as standard ONNX graphs, for other runtimes and for reading.
    for file in t.step_graph_files() {
        let from = t.workdir.path().join(file);
        let bytes = std::fs::read(&from).map_err(|source| Error::Read { path: from, source })?;
        onnx::io::write_atomic(&run.out.join(file), &bytes)?;
        if file != STEP_FILE {
            fitted.files.push(run.out.join(file));
        }
    }
    t.total_steps = data.per_epoch * settings.epochs;
    while t.progress.epoch < settings.epochs {
        let backend_before = t.backend_time;
        let collective_before = t.collective_time;
        let (stats, samples, took) = train_epoch(run, &mut t, &data, cb)?;
        same_state_everywhere(&t, run.comm)?;
        let secs = took.as_secs_f64();
        let log = EpochLog {
            epoch: t.progress.epoch,
            step: t.progress.step,
            mean: StepStats::mean(&stats),
            val_accuracy: BTreeMap::new(),
            geometry: BTreeMap::new(),
            samples_per_second: samples as f64 / secs,
            step_seconds: secs,
            backend_seconds: (t.backend_time - backend_before).as_secs_f64(),
            collective_seconds: (run.comm.size() > 1).then(|| (t.collective_time - collective_before).as_secs_f64()),
            first_step_seconds: match (fitted.logs.is_empty(), t.first_step_done) {
                (true, Some(at)) => Some(at.duration_since(started).as_secs_f64()),
                _ => None,
            },
        };
        let (log, line) = finish_epoch(run, &t, &data, log)?;
        cb.epoch_end(&log, &line);
        fitted.logs.push(log);
        if run.max_steps.is_some_and(|m| t.progress.step >= m) {
            break;
        }
    }
    Ok(fitted)
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
    let cfg = dagr_core::Config {
        encoders: rec.dagr.encoders.iter().map(|(n, t)| format!("{n}={t}")).collect(),
        ..rec.dagr.config.clone()
    };
    let cfg = dagr_core::Config {
        task: dagr_core::Task::None,
        ..cfg
    };
    dagr_core::inject(&mut m, &cfg)?;
    let scratch = onnx::io::Scratch::new(&m)?;
    let (mods, pairs) = crate::eval::geometry_on(scratch.path(), val, labels, backend)?;
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
