//! Training graphs: the model with DAGR, its task loss, and `<param>_grad` for every trainable
//! parameter, in standard ONNX operators (spec sections 4-6).
//!
//! The geometry gradient enters at the encoder outputs through DAGR's analytic
//! `dagr/grad/<m>`; the task loss is differentiated by `grad::backward`. With Pareto balancing
//! the two geometry terms are back-propagated separately and mixed with `alpha*` computed in
//! the graph (MGDA closed form for two tasks).

use crate::portable::{self, RunningStats};
use crate::{self as dagr, Config, Record};
use dagr_onnx::builder::Builder;
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{dtype, Dim, GraphIndex, Model, ValueFact};
use globset::{Glob, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Where `alpha*` of the Pareto balance is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pareto {
    /// Over the encoder parameters (exact; two extra backward passes).
    Param,
    /// Over the concatenated encoder outputs (MGDA-UB bound; cheap).
    Feature,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    /// Glob patterns of parameters that are not trained.
    pub freeze: Vec<String>,
    /// Glob patterns of tensors to train that the tool keeps constant on its own: scalar or
    /// folded initializers, and `Constant` nodes (made initializers) that feed no weight.
    #[serde(default)]
    pub trainable: Vec<String>,
    /// Tensors the gradient does not flow through.
    pub stop_gradient: Vec<String>,
    pub pareto: Option<Pareto>,
    /// Scale of the balanced geometry gradient (spec: beta, default 0.1).
    pub beta: f64,
    /// Train on the task loss only: DAGR's terms are still computed and output (to watch the
    /// geometry of a baseline run) but do not enter the gradients.
    #[serde(default)]
    pub no_dagr: bool,
}

/// What a training graph holds, recorded in its metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainRecord {
    pub dagr: Record,
    pub options: TrainOptions,
    /// (parameter, gradient output), in graph order.
    pub params: Vec<(String, String)>,
    /// Parameters whose gradient includes the geometry term (ancestors of an encoder output).
    pub encoder_params: Vec<String>,
    pub batchnorm: Vec<RunningStats>,
    /// Training-mode Dropouts whose masks the trainer feeds (see `portable::feed_dropout_masks`).
    #[serde(default)]
    pub dropout_masks: Vec<portable::DropoutMask>,
    /// The graph output holding the loss that the parameter gradients are the gradient of.
    pub loss: String,
    pub pareto_alpha: Option<String>,
    /// What the user should know before training this graph (DAGR reaching no parameter, a
    /// parameter shared between modules).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The model this training graph was built from (for exporting the trained inference
    /// model), as given when building it.
    #[serde(default)]
    pub original: Option<String>,
}

pub const METADATA_KEY: &str = "dagr_inject.train";

/// Float initializers that `roots` depend on.
fn ancestors(model: &Model, idx: &GraphIndex, roots: &[String]) -> BTreeSet<String> {
    let seen = dagr_onnx::index::upstream(model, idx, roots);
    model
        .graph()
        .initializer
        .iter()
        .filter(|t| seen.contains(&t.name) && dtype::is_float(t.data_type))
        .map(|t| t.name.clone())
        .collect()
}

/// Build the training graph of `model` in place: DAGR's forward and backward (inject), portable
/// BatchNorm, the parameters' gradients (plain or Pareto-balanced), then the parameters as graph
/// inputs and their gradients as outputs.
pub fn make_training_graph(model: &mut Model, cfg: &Config, opts: &TrainOptions) -> Result<TrainRecord> {
    check_options(cfg, opts)?;
    // Functions inlined and weights held by Constant nodes made initializers first: those are
    // parameters too.
    let opset_given = model.opset();
    let named = prepare(model, opts)?;
    // Only the model's own initializers can be parameters (not constants this tool adds).
    let original: HashSet<String> = model.graph().initializer.iter().map(|t| t.name.clone()).collect();
    let fixed = not_parameters(model);
    // Encoders are located on the model as exported, before BatchNorm is decomposed.
    let injected = dagr::inject_with(model, cfg, opts.pareto.is_some())?;
    let batchnorm = portable::decompose_batchnorm(model)?;
    let dropout_masks = portable::feed_dropout_masks(model)?;
    let rec = injected.record;
    if opts.no_dagr && (rec.outputs.task_loss.is_none() || opts.pareto.is_some()) {
        return Err(Error::Config(
            "`no_dagr` trains the task loss alone: it needs `loss` or `logits`/`labels`, and no `pareto`".into(),
        ));
    }
    let idx = dagr_ops::index(model)?;
    let (params, enc_params) = select_params(model, &idx, &rec, opts, |p| {
        original.contains(p) && (!fixed.contains_key(p) || named.is_match(p))
    })?;
    let stop: HashSet<String> = opts.stop_gradient.iter().cloned().collect();
    let mut warnings = warnings(model, &idx, &params, &enc_params, opts.no_dagr);
    if opset_given > 0 && model.opset() != opset_given {
        warnings.push(format!(
            "the model's opset {opset_given} is read as opset {new} (the operators whose form changed since are rewritten as {new} writes them, computing the same); the trained model is exported at opset {new}",
            new = model.opset()
        ));
    }

    let mut b = Builder::new(model, "grad/");
    let task_seed = rec.outputs.task_loss.as_ref().map(|t| (t.clone(), b.scalar(1.0)));
    let mut pareto_alpha = None;
    let grads: HashMap<String, String> = match opts.pareto {
        None => {
            let mut seeds: Vec<(String, String)> = task_seed.into_iter().collect();
            if !opts.no_dagr {
                for (m, t) in &rec.encoders {
                    let g =
                        rec.outputs.grads.iter().find(|g| &g.0 == m).ok_or_else(|| {
                            Error::Internal(format!("the DAGR rewrite has no gradient output for '{m}'"))
                        })?;
                    seeds.push((t.clone(), g.1.clone()));
                }
            }
            dagr_autodiff::backward(model, &idx, &mut b, &seeds, &params, &stop)?
        }
        Some(level) => {
            let balanced = Balanced {
                level,
                beta: opts.beta,
                params: &params,
                encoder_params: &enc_params,
                stop: &stop,
            };
            let (grads, alpha) = balanced.gradients(model, &idx, &mut b, &rec, task_seed)?;
            pareto_alpha = Some(alpha);
            grads
        }
    };

    // Outputs: `<param>_grad` (ONNX Runtime's training convention), running statistics, alpha.
    let mut new_outputs: Vec<(String, ValueFact)> = Vec::new();
    let mut param_grads = Vec::new();
    for p in &params {
        let Some(gr) = grads.get(p) else { continue };
        let name = format!("{p}_grad");
        if b.names.contains(&name) {
            return Err(Error::NameTaken { name });
        }
        b.names.fresh(&name);
        b.op_named("Identity", &[gr], vec![], &name);
        let f = idx.fact(p).cloned().unwrap_or_default();
        new_outputs.push((name.clone(), f));
        param_grads.push((p.clone(), name));
    }
    for s in &batchnorm {
        for (_, t) in [&s.mean, &s.var] {
            let f = idx.fact(t).cloned().unwrap_or(ValueFact {
                dtype: dtype::FLOAT,
                shape: None,
            });
            new_outputs.push((t.clone(), f));
        }
    }
    let alpha_out = pareto_alpha.map(|a| {
        let n = b.names.fresh("dagr/pareto_alpha");
        b.op_named("Identity", &[&a], vec![], &n);
        new_outputs.push((n.clone(), ValueFact::new(dtype::FLOAT, vec![])));
        n
    });
    let forward = 0..model.graph().node.len();
    b.finish(model);
    dagr_ops::lower(model, &idx, forward)?;
    let state: Vec<String> = batchnorm
        .iter()
        .flat_map(|s| [s.mean.0.clone(), s.var.0.clone()])
        .collect();
    let fed: Vec<&String> = param_grads.iter().map(|p| &p.0).chain(&state).collect();
    feed_and_expose(model, &fed, &new_outputs)?;
    dagr_onnx::index::prune(model);

    let loss = if opts.no_dagr {
        rec.outputs.task_loss.clone()
    } else {
        rec.outputs.total_loss.clone()
    }
    .unwrap_or_else(|| rec.outputs.loss.clone());
    let record = TrainRecord {
        dagr: rec,
        options: opts.clone(),
        params: param_grads,
        encoder_params: enc_params,
        batchnorm,
        dropout_masks,
        loss,
        pareto_alpha: alpha_out,
        warnings,
        original: model.source.as_ref().map(|p| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        }),
    };
    let json = serde_json::to_string(&record).map_err(|e| Error::Internal(format!("record: {e}")))?;
    model.set_metadata(METADATA_KEY, &json);
    dagr_ops::annotate_shapes(model)?;
    dagr_ops::infer::check(model)?;
    Ok(record)
}

/// What a user must know before training: DAGR's gradient reaching no parameter (it would only
/// train the heads), and parameters read by several top-level modules, which PyTorch's
/// exporters produce from weights tied in the model, or by merging initializers of equal value
/// (the legacy exporter in eval mode, the dynamo exporter's optimizer): those train as one.
fn warnings(model: &Model, idx: &GraphIndex, params: &[String], enc_params: &[String], no_dagr: bool) -> Vec<String> {
    let mut out = Vec::new();
    if enc_params.is_empty() && !no_dagr {
        out.push(
            "DAGR's gradient reaches no trainable parameter: the encoder outputs depend on no parameter that trains (all frozen, constants, or weights the exporter stored as Constant nodes), so only the task loss trains the model".into(),
        );
    }
    let scopes = crate::locate::Scopes::of(model, idx);
    for p in params {
        let mut modules: BTreeSet<String> = BTreeSet::new();
        for &c in idx.consumers_of(p) {
            if let Some(path) = scopes.of_node(c) {
                if let Some(top) = path.first() {
                    modules.insert(top.clone());
                }
            }
        }
        if modules.len() > 1 {
            out.push(format!(
                "parameter '{p}' is read by the modules {}: it trains as one tensor. If the model does not tie these weights, the exporter merged initializers of equal value (torch.onnx.export in eval mode, or dynamo's optimizer): export for training (training=TrainingMode.TRAINING, or dynamo=True with optimize=False)",
                modules.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    out
}

/// Why a float initializer of the model never trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotParameter {
    /// A scalar or one-element tensor: an epsilon, a scale the exporter stored.
    Scalar,
    /// A constant the exporter computed (as its naming convention tells).
    Folded,
    /// BatchNorm running statistics: state that training updates, not by gradient.
    RunningStatistics,
    /// A buffer, as the exporter recorded (PyTorch's `register_buffer`).
    Buffer,
}

/// What the exporter recorded an initializer to be: torch.export's graph signature, which
/// dynamo writes on the value_info of each lifted input (`PARAMETER`, `BUFFER`,
/// `CONSTANT_TENSOR`).
fn recorded_kinds(model: &Model) -> std::collections::HashMap<String, String> {
    const KEY: &str = "pkg.torch.export.graph_signature.InputSpec.kind";
    let g = model.graph();
    g.value_info
        .iter()
        .chain(g.input.iter())
        .filter_map(|v| {
            let k = v.metadata_props.iter().find(|p| p.key == KEY)?;
            Some((v.name.clone(), k.value.clone()))
        })
        .collect()
}

/// The float initializers of `model` that are not parameters, and why. What the exporter
/// recorded decides where it recorded anything; otherwise scalars and what its naming
/// convention marks as folded are constants.
pub fn not_parameters(model: &Model) -> std::collections::BTreeMap<String, NotParameter> {
    let convention = crate::locate::convention_of(model);
    let recorded = recorded_kinds(model);
    let g = model.graph();
    let mut out = std::collections::BTreeMap::new();
    for n in g.node.iter().filter(|n| n.op_type == "BatchNormalization") {
        for s in n.input.iter().skip(3).take(2) {
            out.insert(s.clone(), NotParameter::RunningStatistics);
        }
    }
    for t in g.initializer.iter().filter(|t| dtype::is_float(t.data_type)) {
        if out.contains_key(&t.name) {
            continue;
        }
        match recorded.get(&t.name).map(String::as_str) {
            Some("PARAMETER") => continue,
            Some("BUFFER") => {
                out.insert(t.name.clone(), NotParameter::Buffer);
                continue;
            }
            Some(_) => {
                out.insert(t.name.clone(), NotParameter::Folded);
                continue;
            }
            None => {}
        }
        if t.dims.iter().all(|&d| d == 1) {
            out.insert(t.name.clone(), NotParameter::Scalar);
        } else if convention.is_some_and(|c| c.is_folded_constant(&t.name)) {
            out.insert(t.name.clone(), NotParameter::Folded);
        }
    }
    out
}

/// The options that do not depend on the model.
fn check_options(cfg: &Config, opts: &TrainOptions) -> Result<()> {
    if let Some(p) = opts.pareto {
        if !(opts.beta > 0.0 && opts.beta.is_finite()) {
            return Err(Error::Config(format!("`beta` must be positive, got {}", opts.beta)));
        }
        if !cfg.variant.uses_dispersion() || !cfg.variant.uses_anchoring() {
            return Err(Error::Config(format!(
                "`pareto` {p:?} balances dispersion against anchoring; it needs `variant` dagr"
            )));
        }
    }
    Ok(())
}

/// The parameters to train (float initializers upstream of the encoders or the task loss that
/// `eligible` admits and no `freeze` pattern matches), and those of them upstream of the encoders.
fn select_params(
    model: &Model,
    idx: &GraphIndex,
    rec: &Record,
    opts: &TrainOptions,
    eligible: impl Fn(&String) -> bool,
) -> Result<(Vec<String>, Vec<String>)> {
    for s in &opts.stop_gradient {
        if !idx.producer.contains_key(s) && !idx.is_graph_input(s) {
            return Err(Error::Config(format!(
                "`stop_gradient` '{s}' is not a tensor of the model"
            )));
        }
    }
    let frozen = globs("freeze", &opts.freeze)?;
    let trainable = |p: &String| eligible(p) && !frozen.is_match(p);
    let encoders: Vec<String> = rec.encoders.iter().map(|(_, t)| t.clone()).collect();
    let mut roots = encoders.clone();
    roots.extend(rec.outputs.task_loss.iter().cloned());
    let params: Vec<String> = ancestors(model, idx, &roots).into_iter().filter(trainable).collect();
    if params.is_empty() {
        return Err(Error::Config(
            "no trainable parameter reaches the loss (all frozen?)".into(),
        ));
    }
    let enc_params = ancestors(model, idx, &encoders).into_iter().filter(trainable).collect();
    Ok((params, enc_params))
}

/// Parameters (and running statistics) become graph inputs, their values staying as
/// initializers so that the model still runs unfed; `outputs` become graph outputs.
fn feed_and_expose(model: &mut Model, fed: &[&String], outputs: &[(String, ValueFact)]) -> Result<()> {
    let g = model.graph_mut();
    let existing: HashSet<String> = g.input.iter().map(|i| i.name.clone()).collect();
    for p in fed {
        if existing.contains(*p) {
            continue;
        }
        let t = g.initializer.iter().find(|t| &t.name == *p).ok_or_else(|| {
            Error::InvalidModel(format!(
                "'{p}' is state to train or update but is computed by a node, not stored as an initializer\n  hint: store it as an initializer (e.g. export with constant folding off), or freeze it"
            ))
        })?;
        let f = ValueFact::new(t.data_type, t.dims.iter().map(|&d| Dim::Known(d)).collect());
        g.input.push(f.to_value_info(p));
    }
    for (n, f) in outputs {
        if !g.output.iter().any(|o| &o.name == n) {
            g.output.push(f.to_value_info(n));
        }
    }
    Ok(())
}

/// Pareto-balanced gradients (spec section 5): the task's gradient plus DAGR's two terms
/// weighted `beta * alpha` and `beta * (1 - alpha)`, alpha from MGDA over the encoder features
/// or the encoder parameters.
struct Balanced<'a> {
    level: Pareto,
    beta: f64,
    params: &'a [String],
    encoder_params: &'a [String],
    stop: &'a HashSet<String>,
}

impl Balanced<'_> {
    /// The gradient of every parameter, and alpha's tensor.
    fn gradients(
        &self,
        model: &Model,
        idx: &GraphIndex,
        b: &mut Builder,
        rec: &Record,
        task_seed: Option<(String, String)>,
    ) -> Result<(HashMap<String, String>, String)> {
        let task = match task_seed {
            Some(s) => dagr_autodiff::backward(model, idx, b, &[s], self.params, self.stop)?,
            None => HashMap::new(),
        };
        let seeds = |term: fn(&(String, String, String)) -> &String| -> Vec<(String, String)> {
            rec.encoders
                .iter()
                .zip(&rec.outputs.term_grads)
                .map(|((_, t), g)| (t.clone(), term(g).clone()))
                .collect()
        };
        let (disp_seeds, anc_seeds) = (seeds(|g| &g.1), seeds(|g| &g.2));
        let enc = self.encoder_params;
        let gd = dagr_autodiff::backward(model, idx, b, &disp_seeds, enc, self.stop)?;
        let ga = dagr_autodiff::backward(model, idx, b, &anc_seeds, enc, self.stop)?;
        let pairs: Vec<(String, String)> = match self.level {
            Pareto::Feature => disp_seeds
                .iter()
                .zip(&anc_seeds)
                .map(|(d, a)| (d.1.clone(), a.1.clone()))
                .collect(),
            Pareto::Param => enc
                .iter()
                .filter_map(|p| Some((gd.get(p)?.clone(), ga.get(p)?.clone())))
                .collect(),
        };
        let alpha = mgda_alpha(b, &pairs);
        let beta = b.scalar(self.beta);
        let wd = b.binary("Mul", &alpha, &beta, "pareto");
        let one = b.scalar(1.0);
        let oma = b.binary("Sub", &one, &alpha, "pareto");
        let wa = b.binary("Mul", &oma, &beta, "pareto");
        let mut out = HashMap::new();
        for p in self.params {
            let mut parts = Vec::new();
            if let Some(t) = task.get(p) {
                parts.push(t.clone());
            }
            if let Some(d) = gd.get(p) {
                parts.push(b.binary("Mul", d, &wd, "pareto"));
            }
            if let Some(a) = ga.get(p) {
                parts.push(b.binary("Mul", a, &wa, "pareto"));
            }
            if !parts.is_empty() {
                out.insert(p.clone(), b.sum(&parts, "pareto"));
            }
        }
        Ok((out, alpha))
    }
}

/// `alpha* = clip((g_a - g_d) . g_a / ||g_d - g_a||^2, 0, 1)`, 0.5 when the denominator is
/// below 1e-12, over the (g_d, g_a) tensor pairs; a constant for the backward (spec section 5).
fn mgda_alpha(b: &mut Builder, pairs: &[(String, String)]) -> String {
    let mut nums = Vec::new();
    let mut dens = Vec::new();
    for (d, a) in pairs {
        let amd = b.binary("Sub", a, d, "pareto");
        let t = b.binary("Mul", &amd, a, "pareto");
        nums.push(b.reduce("ReduceSum", &t, None, false, "pareto"));
        let t = b.binary("Mul", &amd, &amd, "pareto");
        dens.push(b.reduce("ReduceSum", &t, None, false, "pareto"));
    }
    let num = b.sum(&nums, "pareto");
    let den = b.sum(&dens, "pareto");
    let tiny = b.scalar(1e-12);
    let small = b.binary("Less", &den, &tiny, "pareto");
    let safe = b.binary("Max", &den, &tiny, "pareto");
    let ratio = b.binary("Div", &num, &safe, "pareto");
    let zero = b.scalar(0.0);
    let one = b.scalar(1.0);
    let clipped = b.op("Clip", &[&ratio, &zero, &one], vec![], "pareto");
    let half = b.scalar(0.5);
    b.op("Where", &[&small, &half, &clipped], vec![], "pareto")
}

/// The glob patterns of the option `what`, as one set.
fn globs(what: &str, patterns: &[String]) -> Result<globset::GlobSet> {
    let mut set = GlobSetBuilder::new();
    for f in patterns {
        set.add(Glob::new(f).map_err(|e| Error::Config(format!("`{what}` '{f}': {e}")))?);
    }
    set.build().map_err(|e| Error::Config(e.to_string()))
}

/// `portable::prepare`, then the `Constant` nodes that `opts.trainable` names made initializers:
/// the model as its training graph sees it (and as a trained model is exported into). Returns
/// the `trainable` patterns.
pub fn prepare(model: &mut Model, opts: &TrainOptions) -> Result<globset::GlobSet> {
    portable::prepare(model)?;
    let named = globs("trainable", &opts.trainable)?;
    portable::promote_constants(model, |n, _| named.is_match(n))?;
    Ok(named)
}
