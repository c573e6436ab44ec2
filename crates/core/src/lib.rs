//! DAGR on ONNX graphs: finding the encoders (`locate`), the regularizer subgraph (`emit`), its
//! direct reference implementation (`reference`), `inject`, which rewrites a model in place,
//! the training graph (`training`, with `portable` BatchNorm), the optimizers as ONNX nodes
//! (`optim`) folded into the step graph (`step_graph`), and the geometry of embeddings
//! (`geometry`: effective rank, drift, similarity gap).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod block;
pub mod config;
pub mod emit;
pub mod geometry;
pub mod locate;
pub mod optim;
pub mod portable;
pub mod reference;
pub mod step_graph;
pub mod training;

pub use config::{Config, Dispersion, Reduce, Task, Variant};

use crate::locate::Encoder;
use dagr_onnx::builder::{attr_int, Builder};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{dtype, Dim, GraphIndex, Model, ValueFact};
use serde::{Deserialize, Serialize};

/// Model metadata key under which a rewrite records its configuration.
pub const METADATA_KEY: &str = "dagr_inject";

/// Names of the graph outputs a rewrite added.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Outputs {
    pub loss: String,
    pub dispersion: String,
    /// (modality, output)
    pub dispersion_per_modality: Vec<(String, String)>,
    pub anchoring: Option<String>,
    pub task_loss: Option<String>,
    pub total_loss: Option<String>,
    /// (modality, output): `dL_DAGR/dz` for the raw encoder output
    pub grads: Vec<(String, String)>,
    /// (modality, output): the L2-normalized `[B, D]` embeddings
    pub embeddings: Vec<(String, String)>,
    /// (modality, dL_disp/dz, dL_anc/dz), unweighted; only for Pareto-balanced training graphs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub term_grads: Vec<(String, String, String)>,
    /// The label input added for `--labels`, if any.
    pub labels_input: Option<String>,
}

/// What a rewrite did; also stored (as JSON) in the model's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub tool_version: String,
    pub config: Config,
    /// (modality, tensor)
    pub encoders: Vec<(String, String)>,
    pub outputs: Outputs,
}

/// The result of `inject`.
#[derive(Debug, Clone)]
pub struct Injected {
    pub encoders: Vec<Encoder>,
    pub record: Record,
}

/// Read the record of an earlier rewrite, if the model has one.
pub fn record_of(model: &Model) -> Option<Record> {
    model.metadata(METADATA_KEY).and_then(|s| serde_json::from_str(s).ok())
}

/// Refuse a batch whose DAGR terms cannot fit in memory: the dispersion term holds
/// `[batch, batch]` matrices for every modality. Models without DAGR pass.
pub fn check_batch(model: &Model, batch: usize) -> Result<()> {
    let Some(rec) = record_of(model) else {
        return Ok(());
    };
    dagr_onnx::limits::check_alloc_hint(
        dagr_onnx::limits::dagr_pairwise_bytes(batch as u64, rec.encoders.len() as u64),
        &format!("DAGR's pairwise terms at batch {batch}"),
        "run smaller batches: the dispersion term holds [batch, batch] matrices",
    )
}

/// The width `D'` of an encoder output after reduction, when its shape says so.
fn reduced_width(f: &ValueFact, reduce: Reduce) -> Option<i64> {
    let s = f.shape.as_ref()?;
    match (s.len(), reduce) {
        (0 | 1, _) => None,
        (2, _) => s[1].known(),
        (_, Reduce::Flatten) => s[1..]
            .iter()
            .try_fold(1i64, |a, d| d.known().and_then(|v| a.checked_mul(v))),
        (_, Reduce::Mean) => s.last()?.known(),
    }
}

/// Add the DAGR subgraph to `model` (spec sections 1-4, 6, 7).
pub fn inject(model: &mut Model, cfg: &Config) -> Result<Injected> {
    let done = inject_with(model, cfg, false)?;
    dagr_ops::infer::check(model)?;
    Ok(done)
}

/// `inject`, optionally also exposing each term's encoder-output gradient, unweighted
/// (`dagr/grad_disp/<m>`, `dagr/grad_anc/<m>`), which Pareto balancing needs. The graph is not
/// yet checked: the caller builds on it (the training graph) and checks what it writes.
pub fn inject_with(model: &mut Model, cfg: &Config, separate_terms: bool) -> Result<Injected> {
    cfg.validate()?;
    portable::prepare(model)?;
    check_rewritable(model)?;
    dagr_ops::infer::check_given(model)?;
    // Branches chosen when the graph is built, and sequences of split parts as plain tensors:
    // portable to tract, differentiable.
    portable::fold_constant_ifs(model)?;
    portable::lower_sequences(model)?;
    let idx = dagr_ops::index(model)?;
    let encoders = locate::resolve_all(model, &idx, &cfg.encoders)?;
    let inputs = encoder_inputs(&idx, &encoders)?;
    let widths_agree = widths_agree(&idx, &encoders, cfg)?;
    let batch = batch_dim(&idx, &encoders)?;

    let mut b = Builder::new(model, "dagr/");
    let em = emit::emit(&mut b, &inputs, cfg, widths_agree, separate_terms)?;
    let mut ex = Exposed::default();
    let scalar = || ValueFact::new(dtype::FLOAT, vec![]);
    // A gradient has its encoder output's shape and type.
    let like = |e: &Encoder, inp: &emit::EncoderInput| ValueFact {
        dtype: inp.dtype,
        shape: idx.fact(&e.tensor).and_then(|f| f.shape.clone()),
    };
    let mut outputs = Outputs {
        loss: ex.expose(&mut b, &em.loss, "dagr/loss", scalar()),
        dispersion: ex.expose(&mut b, &em.dispersion, "dagr/dispersion", scalar()),
        ..Default::default()
    };
    for (e, t) in encoders.iter().zip(&em.dispersion_per_modality) {
        let n = ex.expose(&mut b, t, &format!("dagr/dispersion/{}", e.modality), scalar());
        outputs.dispersion_per_modality.push((e.modality.clone(), n));
    }
    if let Some(a) = &em.anchoring {
        outputs.anchoring = Some(ex.expose(&mut b, a, "dagr/anchoring", scalar()));
    }
    for ((e, g), inp) in encoders.iter().zip(&em.grads).zip(&inputs) {
        let n = ex.expose(&mut b, g, &format!("dagr/grad/{}", e.modality), like(e, inp));
        outputs.grads.push((e.modality.clone(), n));
    }
    if let Some((td, ta)) = &em.term_grads {
        for ((e, d), (a, inp)) in encoders.iter().zip(td).zip(ta.iter().zip(&inputs)) {
            let nd = ex.expose(&mut b, d, &format!("dagr/grad_disp/{}", e.modality), like(e, inp));
            let na = ex.expose(&mut b, a, &format!("dagr/grad_anc/{}", e.modality), like(e, inp));
            outputs.term_grads.push((e.modality.clone(), nd, na));
        }
    }
    for (e, u) in encoders.iter().zip(&em.embeddings) {
        let fact = ValueFact::new(dtype::FLOAT, vec![batch.clone(), Dim::Unknown]);
        let n = ex.expose(&mut b, u, &format!("dagr/embedding/{}", e.modality), fact);
        outputs.embeddings.push((e.modality.clone(), n));
    }

    // Task loss and the total objective.
    let mut label_input = None;
    let task = match &cfg.task {
        Task::None => None,
        Task::Loss { output } => Some(task_from_output(&mut b, &idx, output)?),
        Task::CrossEntropy { logits, labels } => {
            let (t, lab) = cross_entropy(&mut b, &idx, logits, labels, &batch)?;
            label_input = lab;
            Some(t)
        }
    };
    if let Some(t) = task {
        let total = b.binary("Add", &t, &em.loss, "total");
        outputs.task_loss = Some(ex.expose(&mut b, &t, "dagr/task_loss", scalar()));
        outputs.total_loss = Some(ex.expose(&mut b, &total, "dagr/total_loss", scalar()));
    }
    b.finish(model);

    let g = model.graph_mut();
    for (n, f) in &ex.0 {
        g.output.push(f.to_value_info(n));
    }
    if let Some((name, fact)) = &label_input {
        g.input.push(fact.to_value_info(name));
        outputs.labels_input = Some(name.clone());
    }
    let record = Record {
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        config: cfg.clone(),
        encoders: encoders
            .iter()
            .map(|e| (e.modality.clone(), e.tensor.clone()))
            .collect(),
        outputs,
    };
    let json = serde_json::to_string(&record).map_err(|e| Error::Internal(format!("record: {e}")))?;
    model.set_metadata(METADATA_KEY, &json);
    Ok(Injected { encoders, record })
}

/// The new graph outputs: each an Identity of an internal tensor under a fresh public name.
#[derive(Default)]
struct Exposed(Vec<(String, ValueFact)>);

impl Exposed {
    fn expose(&mut self, b: &mut Builder, src: &str, name: &str, fact: ValueFact) -> String {
        let out = b.names.fresh(name);
        b.op_named("Identity", &[src], vec![], &out);
        self.0.push((out.clone(), fact));
        out
    }
}

/// A model that is not yet rewritten, at an opset the rewrite can use.
fn check_rewritable(model: &Model) -> Result<()> {
    if let Some(prev) = model.metadata(METADATA_KEY) {
        return Err(Error::Config(format!(
            "this model was already rewritten by dagr-inject ({prev}); rewrite the original model instead"
        )));
    }
    let opset = model.opset();
    if opset < 13 {
        return Err(Error::Config(format!(
            "the model uses opset {opset}; dagr-inject needs opset 13 or newer\n  hint: convert it with onnx.version_converter.convert_version(model, 17)"
        )));
    }
    check_standard_ops(model, opset)
}

/// Nodes of ONNX's default domain whose operator ONNX does not define at the model's opset: an
/// exporter that could not convert an op may write it as it was (tf2onnx keeps TensorFlow's
/// `Erfc` and `StatefulPartitionedCall` with a warning and exits 0), and no runtime runs it.
fn check_standard_ops(model: &Model, opset: i64) -> Result<()> {
    use std::collections::{BTreeMap, BTreeSet};
    if opset > dagr_ops::schemas::LATEST_OPSET {
        // Newer than the table: an operator it does not know may be one ONNX added since.
        return Ok(());
    }
    let local: BTreeSet<(&str, &str)> = model
        .proto
        .functions
        .iter()
        .map(|f| (f.domain.as_str(), f.name.as_str()))
        .collect();
    let mut bad: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
    for n in &model.graph().node {
        let default = n.domain.is_empty() || n.domain == "ai.onnx";
        if default
            && !local.contains(&(n.domain.as_str(), n.op_type.as_str()))
            && dagr_ops::schema_version(&n.op_type, opset).is_none()
        {
            bad.entry(n.op_type.as_str()).or_insert((0, n.name.as_str())).0 += 1;
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = bad
        .iter()
        .map(|(op, (k, first))| format!("{op} ({k} node{}, first '{first}')", if *k == 1 { "" } else { "s" }))
        .collect();
    Err(Error::InvalidModel(format!(
        "the model has operators that ONNX does not define at opset {opset}: {}; no runtime can run it\n  hint: the exporter could not convert these ops and wrote them as they were (tf2onnx warns \"Tensorflow op ... is not supported\"); replace them in the source model (for Keras's exact GELU, `approximate=True`) or export at an opset that defines them",
        list.join(", ")
    )))
}

/// Each encoder output's type and rank, which the DAGR block is built for.
fn encoder_inputs(idx: &GraphIndex, encoders: &[Encoder]) -> Result<Vec<emit::EncoderInput>> {
    encoders
        .iter()
        .map(|e| {
            let f = idx.fact(&e.tensor).cloned().unwrap_or_default();
            if f.dtype != 0 && !dtype::is_float(f.dtype) {
                return Err(Error::Encoder(format!(
                    "the encoder output '{}' ({}) has type {}; DAGR needs a floating-point embedding",
                    e.tensor,
                    e.modality,
                    dtype::name(f.dtype)
                )));
            }
            let rank = f.rank().ok_or_else(|| Error::ShapeUnknown {
                tensor: e.tensor.clone(),
                context: format!(" (encoder '{}'), so it cannot be reduced to [batch, D]", e.modality),
            })?;
            if rank < 2 {
                return Err(Error::Encoder(format!(
                    "the encoder output '{}' ({}) has shape {}; DAGR needs a batch of embeddings, [batch, D] or more dims (reduced to [batch, D])\n  hint: name the tensor the encoder produces per sample (the inspect report lists candidates)",
                    e.tensor,
                    e.modality,
                    f.shape_string()
                )));
            }
            Ok(emit::EncoderInput {
                modality: e.modality.clone(),
                tensor: e.tensor.clone(),
                dtype: if f.dtype == 0 { dtype::FLOAT } else { f.dtype },
                rank,
            })
        })
        .collect()
}

/// Whether all known embedding widths agree; anchoring compares embeddings row by row, so with
/// anchoring on, two known widths that differ are an error.
fn widths_agree(idx: &GraphIndex, encoders: &[Encoder], cfg: &Config) -> Result<bool> {
    let widths: Vec<Option<i64>> = encoders
        .iter()
        .map(|e| idx.fact(&e.tensor).and_then(|f| reduced_width(f, cfg.reduce)))
        .collect();
    let mut agree = true;
    for a in 0..encoders.len() {
        for b in a + 1..encoders.len() {
            if let (Some(wa), Some(wb)) = (widths[a], widths[b]) {
                if wa != wb {
                    agree = false;
                    if cfg.variant.uses_anchoring() {
                        return Err(Error::Encoder(format!(
                            "anchoring needs equal embedding widths, but '{}' ({}) has width {wa} and '{}' ({}) has width {wb}\n  hint: pass `no_anchor` (dispersion only), or name tensors of equal width",
                            encoders[a].tensor, encoders[a].modality, encoders[b].tensor, encoders[b].modality
                        )));
                    }
                }
            }
        }
    }
    Ok(agree)
}

/// The batch dimension shared by the encoder outputs (an error if two known sizes differ).
fn batch_dim(idx: &GraphIndex, encs: &[Encoder]) -> Result<Dim> {
    let mut found: Option<(Dim, &str)> = None;
    for e in encs {
        let d = idx
            .fact(&e.tensor)
            .and_then(|f| f.shape.as_ref())
            .and_then(|s| s.first().cloned());
        if let Some(d) = d {
            if let Some((prev, t)) = &found {
                if let (Dim::Known(x), Dim::Known(y)) = (prev, &d) {
                    if x != y {
                        return Err(Error::Encoder(format!(
                            "the encoder outputs disagree on the batch size: '{t}' has {x}, '{}' has {y}",
                            e.tensor
                        )));
                    }
                }
                if matches!(prev, Dim::Known(_)) {
                    continue;
                }
            }
            found = Some((d, &e.tensor));
        }
    }
    Ok(found.map(|(d, _)| d).unwrap_or(Dim::Unknown))
}

fn produced(idx: &GraphIndex, t: &str) -> bool {
    idx.producer.contains_key(t)
}

fn task_from_output(b: &mut Builder, idx: &GraphIndex, output: &str) -> Result<String> {
    if !produced(idx, output) {
        return Err(Error::Config(format!(
            "`loss` '{output}' is not a tensor the model computes\n  hint: outputs are: {}",
            idx.graph_outputs.join(", ")
        )));
    }
    let f = idx.fact(output).cloned().unwrap_or_default();
    if let Some(s) = &f.shape {
        let numel: Option<i64> = s
            .iter()
            .map(|d| if let Dim::Known(v) = d { Some(*v) } else { None })
            .product();
        if numel != Some(1) {
            return Err(Error::Config(format!(
                "`loss` '{output}' has shape {}, but a loss must be a scalar\n  hint: name the model's scalar loss output, or use `logits`/`labels` to append a cross-entropy",
                f.shape_string()
            )));
        }
    }
    if f.dtype != 0 && !dtype::is_float(f.dtype) {
        return Err(Error::Config(format!(
            "`loss` '{output}' has type {}, expected a float",
            dtype::name(f.dtype)
        )));
    }
    let x = if f.dtype != dtype::FLOAT {
        b.cast(output, dtype::FLOAT, "task")
    } else {
        output.to_string()
    };
    Ok(b.reduce("ReduceSum", &x, None, false, "task"))
}

/// Sum over heads of `-mean_i log_softmax(logits)[i, y_i]`, written with LogSoftmax and
/// GatherElements (portable: tract has no SoftmaxCrossEntropyLoss).
fn cross_entropy(
    b: &mut Builder,
    idx: &GraphIndex,
    logits: &[String],
    labels: &str,
    batch: &Dim,
) -> Result<(String, Option<(String, ValueFact)>)> {
    let (label_name, new_input) = if idx.is_graph_input(labels) {
        let f = idx.fact(labels).cloned().unwrap_or_default();
        if f.dtype != dtype::INT64 {
            return Err(Error::Config(format!(
                "`labels` '{labels}' is an existing input of type {}, expected int64",
                dtype::name(f.dtype)
            )));
        }
        (labels.to_string(), None)
    } else if b.names.contains(labels) {
        return Err(Error::Config(format!(
            "`labels` '{labels}' names a tensor the model already has; choose a new input name"
        )));
    } else {
        let name = b.names.fresh(labels);
        let fact = ValueFact::new(dtype::INT64, vec![batch.clone()]);
        (name.clone(), Some((name, fact)))
    };
    let mut terms = Vec::new();
    for l in logits {
        if !produced(idx, l) && !idx.is_graph_input(l) {
            return Err(Error::Config(format!(
                "`logits` '{l}' is not a tensor of the model\n  hint: outputs are: {}",
                idx.graph_outputs.join(", ")
            )));
        }
        let f = idx.fact(l).cloned().unwrap_or_default();
        if let Some(s) = &f.shape {
            if s.len() != 2 {
                return Err(Error::Config(format!(
                    "`logits` '{l}' has shape {}, expected [batch, classes]",
                    f.shape_string()
                )));
            }
            if let (Dim::Known(x), Dim::Known(y)) = (&s[0], batch) {
                if x != y {
                    return Err(Error::Config(format!(
                        "`logits` '{l}' has batch size {x}, but the encoder outputs have batch size {y}"
                    )));
                }
            }
        }
        let x = if f.dtype != 0 && f.dtype != dtype::FLOAT {
            b.cast(l, dtype::FLOAT, "task")
        } else {
            l.clone()
        };
        let logp = b.op("LogSoftmax", &[&x], vec![attr_int("axis", 1)], "task");
        let lab = b.unsqueeze(&label_name, &[1], "task");
        let picked = if b.opset >= 16 {
            b.op("GatherElements", &[&logp, &lab], vec![attr_int("axis", 1)], "task")
        } else {
            // GatherElements' gradient scatters with reduction="add" (opset 16): before that,
            // the label's entry is picked by a one-hot mask (`Equal` against the class
            // indices) and a sum, whose gradient every opset has. `Where`, not a product with
            // the mask: a -inf log-probability of another class stays out of the sum.
            let shape = b.op("Shape", &[&logp], vec![], "task");
            let one = b.const_i64(&[1]);
            let classes = b.op("Gather", &[&shape, &one], vec![attr_int("axis", 0)], "task");
            let zero_i = b.scalar_i64(0);
            let one_i = b.scalar_i64(1);
            let c = b.op("Squeeze", &[&classes], vec![], "task");
            let range = b.op("Range", &[&zero_i, &c, &one_i], vec![], "task");
            let hit = b.binary("Equal", &lab, &range, "task");
            let zero = b.scalar(0.0);
            let masked = b.op("Where", &[&hit, &logp, &zero], vec![], "task");
            b.reduce("ReduceSum", &masked, Some(&[1]), true, "task")
        };
        let mean = b.reduce("ReduceMean", &picked, None, false, "task");
        terms.push(b.unary("Neg", &mean, "task"));
    }
    let total = b.sum(&terms, "task");
    Ok((total, new_input))
}
