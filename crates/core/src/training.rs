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
    /// The graph output holding the loss that the parameter gradients are the gradient of.
    pub loss: String,
    pub pareto_alpha: Option<String>,
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

/// Build the training graph of `model` in place.
pub fn make_training_graph(model: &mut Model, cfg: &Config, opts: &TrainOptions) -> Result<TrainRecord> {
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
    // Only the model's own initializers can be parameters (not constants this tool adds).
    let original: HashSet<String> = model.graph().initializer.iter().map(|t| t.name.clone()).collect();
    // BatchNorm running statistics are state, not parameters.
    let bn_state: HashSet<String> = model
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type == "BatchNormalization")
        .flat_map(|n| n.input.iter().skip(3).take(2).cloned())
        .collect();
    // Encoders are located on the model as exported, before BatchNorm is decomposed.
    let injected = dagr::inject_with(model, cfg, opts.pareto.is_some())?;
    let batchnorm = portable::decompose_batchnorm(model)?;
    let rec = injected.record.clone();
    let idx = GraphIndex::new(model)?;

    for s in &opts.stop_gradient {
        if !idx.producer.contains_key(s) && !idx.is_graph_input(s) {
            return Err(Error::Config(format!(
                "`stop_gradient` '{s}' is not a tensor of the model"
            )));
        }
    }
    let mut frozen = GlobSetBuilder::new();
    for f in &opts.freeze {
        frozen.add(Glob::new(f).map_err(|e| Error::Config(format!("`freeze` '{f}': {e}")))?);
    }
    let frozen = frozen.build().map_err(|e| Error::Config(e.to_string()))?;

    let encoders: Vec<String> = rec.encoders.iter().map(|(_, t)| t.clone()).collect();
    let mut roots = encoders.clone();
    if let Some(t) = &rec.outputs.task_loss {
        roots.push(t.clone());
    }
    let trainable = |p: &String| original.contains(p) && !bn_state.contains(p) && !frozen.is_match(p);
    let params: Vec<String> = ancestors(model, &idx, &roots).into_iter().filter(trainable).collect();
    if params.is_empty() {
        return Err(Error::Config(
            "no trainable parameter reaches the loss (all frozen?)".into(),
        ));
    }
    let enc_params: BTreeSet<String> = ancestors(model, &idx, &encoders)
        .into_iter()
        .filter(trainable)
        .collect();
    let stop: HashSet<String> = opts.stop_gradient.iter().cloned().collect();

    let mut b = Builder::new(model, "grad/");
    let grad_name = |m: &str| {
        rec.outputs
            .grads
            .iter()
            .find(|g| g.0 == m)
            .map(|g| g.1.clone())
            .ok_or_else(|| Error::Internal(format!("the DAGR rewrite has no gradient output for '{m}'")))
    };
    let task_seed = rec.outputs.task_loss.as_ref().map(|t| (t.clone(), b.scalar(1.0)));
    let mut pareto_alpha = None;

    if opts.no_dagr && (task_seed.is_none() || opts.pareto.is_some()) {
        return Err(Error::Config(
            "`no_dagr` trains the task loss alone: it needs `loss` or `logits`/`labels`, and no `pareto`".into(),
        ));
    }
    let grads: HashMap<String, String> = match opts.pareto {
        None => {
            let mut seeds: Vec<(String, String)> = task_seed.into_iter().collect();
            if !opts.no_dagr {
                for (m, t) in &rec.encoders {
                    seeds.push((t.clone(), grad_name(m)?));
                }
            }
            dagr_autodiff::backward(model, &idx, &mut b, &seeds, &params, &stop)?
        }
        Some(level) => {
            let task = match task_seed {
                Some(s) => dagr_autodiff::backward(model, &idx, &mut b, &[s], &params, &stop)?,
                None => HashMap::new(),
            };
            let disp_seeds: Vec<(String, String)> = rec
                .encoders
                .iter()
                .zip(&rec.outputs.term_grads)
                .map(|((_, t), g)| (t.clone(), g.1.clone()))
                .collect();
            let anc_seeds: Vec<(String, String)> = rec
                .encoders
                .iter()
                .zip(&rec.outputs.term_grads)
                .map(|((_, t), g)| (t.clone(), g.2.clone()))
                .collect();
            let enc_list: Vec<String> = enc_params.iter().cloned().collect();
            let gd = dagr_autodiff::backward(model, &idx, &mut b, &disp_seeds, &enc_list, &stop)?;
            let ga = dagr_autodiff::backward(model, &idx, &mut b, &anc_seeds, &enc_list, &stop)?;
            let pairs: Vec<(String, String)> = match level {
                Pareto::Feature => disp_seeds
                    .iter()
                    .zip(&anc_seeds)
                    .map(|(d, a)| (d.1.clone(), a.1.clone()))
                    .collect(),
                Pareto::Param => enc_list
                    .iter()
                    .filter_map(|p| Some((gd.get(p)?.clone(), ga.get(p)?.clone())))
                    .collect(),
            };
            let alpha = mgda_alpha(&mut b, &pairs);
            pareto_alpha = Some(alpha.clone());
            let beta = b.scalar(opts.beta);
            let wd = b.binary("Mul", &alpha, &beta, "pareto");
            let one = b.scalar(1.0);
            let oma = b.binary("Sub", &one, &alpha, "pareto");
            let wa = b.binary("Mul", &oma, &beta, "pareto");
            let mut out = HashMap::new();
            for p in &params {
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
                let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                match refs.len() {
                    0 => {}
                    1 => {
                        out.insert(p.clone(), parts[0].clone());
                    }
                    _ => {
                        out.insert(p.clone(), b.op("Sum", &refs, vec![], "pareto"));
                    }
                }
            }
            out
        }
    };

    // Outputs: `<param>_grad` (ONNX Runtime's training convention), running statistics, alpha.
    let mut new_outputs: Vec<(String, ValueFact)> = Vec::new();
    let mut param_grads = Vec::new();
    for p in &params {
        let Some(gr) = grads.get(p) else { continue };
        let name = format!("{p}_grad");
        if b.names.contains(&name) {
            return Err(Error::NameTaken { name: name.to_string() });
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
    b.finish(model);

    // Parameters become graph inputs (their values stay as initializers, so the model still
    // runs unfed).
    let g = model.graph_mut();
    let existing: HashSet<String> = g.input.iter().map(|i| i.name.clone()).collect();
    let state: Vec<String> = batchnorm
        .iter()
        .flat_map(|s| [s.mean.0.clone(), s.var.0.clone()])
        .collect();
    for p in param_grads.iter().map(|p| &p.0).chain(&state) {
        if existing.contains(p) {
            continue;
        }
        let t = g.initializer.iter().find(|t| &t.name == p).ok_or_else(|| {
            Error::InvalidModel(format!(
                "'{p}' is state to train or update but is computed by a node, not stored as an initializer\n  hint: store it as an initializer (e.g. export with constant folding off), or freeze it"
            ))
        })?;
        let f = ValueFact::new(t.data_type, t.dims.iter().map(|&d| Dim::Known(d)).collect());
        g.input.push(f.to_value_info(p));
    }
    for (n, f) in &new_outputs {
        if !g.output.iter().any(|o| &o.name == n) {
            g.output.push(f.to_value_info(n));
        }
    }
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
        encoder_params: enc_params.into_iter().collect(),
        batchnorm,
        loss,
        pareto_alpha: alpha_out,
        original: model.source.as_ref().map(|p| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        }),
    };
    let json = serde_json::to_string(&record).map_err(|e| Error::Internal(format!("record: {e}")))?;
    model.set_metadata(METADATA_KEY, &json);
    Ok(record)
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
