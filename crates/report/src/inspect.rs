//! `dagr-inject inspect`: what a model contains and which tensors look like encoder outputs.

use dagr_core::locate::{self, Candidate};
use dagr_onnx::error::Result;
use dagr_onnx::{dtype, tensor, Model};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ir_version: i64,
    pub producer: String,
    pub opsets: BTreeMap<String, i64>,
    pub inputs: Vec<TensorSummary>,
    pub outputs: Vec<TensorSummary>,
    pub nodes: usize,
    pub op_counts: BTreeMap<String, usize>,
    pub parameter_tensors: usize,
    pub parameters: u64,
    /// Float initializers that never train (`--train`), by reason.
    pub not_trained: BTreeMap<String, usize>,
    /// Ops between the parameters and the outputs that have no gradient rule (op -> nodes):
    /// empty when `--train` can differentiate the model as it is.
    pub without_gradient_rule: BTreeMap<String, Vec<String>>,
    pub external_data: bool,
    pub encoder_candidates: Vec<Candidate>,
    /// The configuration a previous `dagr-inject` rewrite recorded, if any.
    pub dagr: Option<serde_json::Value>,
    /// For a training graph (`--train`): its loss, parameters and options.
    pub training: Option<TrainingSummary>,
    /// For a step graph (`step.onnx` from `train`): its optimizer, state and scalar inputs.
    pub step: Option<dagr_core::step_graph::StepRecord>,
    /// What every rewrite changes first (local functions inlined, Constant-node weights made
    /// initializers, symbolic dims found equal); the report describes the model after it.
    pub prepared: dagr_core::portable::Prepared,
}

#[derive(Debug, Serialize)]
pub struct TrainingSummary {
    pub loss: String,
    pub parameters: usize,
    pub geometry_parameters: usize,
    pub batchnorm_layers: usize,
    pub options: serde_json::Value,
}

pub fn report(model: &Model) -> Result<Report> {
    // Read as every rewrite reads it: local functions inlined, Constant-node weights as
    // initializers.
    let mut prepared_model = model.clone();
    let prepared = dagr_core::portable::prepare(&mut prepared_model)?;
    let model = &prepared_model;
    let idx = dagr_ops::index(model)?;
    let g = model.graph();
    let summary = |name: &String| {
        let f = idx.fact(name).cloned().unwrap_or_default();
        TensorSummary {
            name: name.clone(),
            dtype: dtype::name(f.dtype).into(),
            shape: f.shape_string(),
        }
    };
    let mut op_counts = BTreeMap::new();
    for n in &g.node {
        let key = if n.domain.is_empty() {
            n.op_type.clone()
        } else {
            format!("{}::{}", n.domain, n.op_type)
        };
        *op_counts.entry(key).or_insert(0) += 1;
    }
    let params: Vec<_> = g.initializer.iter().filter(|t| dtype::is_float(t.data_type)).collect();
    let not_parameters = dagr_core::training::not_parameters(model);
    let trainable: Vec<String> = params
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| !not_parameters.contains_key(n))
        .collect();
    let mut without_gradient_rule: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (op, node) in dagr_autodiff::ops_without_rule(model, &idx, &trainable, &idx.graph_outputs) {
        without_gradient_rule.entry(op).or_default().push(node);
    }
    Ok(Report {
        ir_version: model.proto.ir_version,
        producer: format!("{} {}", model.proto.producer_name, model.proto.producer_version)
            .trim()
            .to_string(),
        opsets: model
            .proto
            .opset_import
            .iter()
            .map(|o| {
                (
                    if o.domain.is_empty() {
                        "ai.onnx".to_string()
                    } else {
                        o.domain.clone()
                    },
                    o.version,
                )
            })
            .collect(),
        inputs: idx.user_inputs().iter().map(summary).collect(),
        outputs: idx.graph_outputs.iter().map(summary).collect(),
        nodes: g.node.len(),
        op_counts,
        parameter_tensors: params.len(),
        without_gradient_rule,
        not_trained: not_parameters.values().fold(BTreeMap::new(), |mut m, r| {
            let key = serde_json::to_value(r)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            *m.entry(key).or_insert(0) += 1;
            m
        }),
        parameters: params.iter().map(|t| tensor::numel(t) as u64).sum(),
        external_data: !dagr_onnx::io::external_tensors(&model.proto).is_empty(),
        encoder_candidates: locate::candidates(model, &idx),
        dagr: model
            .metadata(dagr_core::METADATA_KEY)
            .and_then(|s| serde_json::from_str(s).ok()),
        training: model
            .metadata(dagr_core::training::METADATA_KEY)
            .and_then(|s| serde_json::from_str::<dagr_core::training::TrainRecord>(s).ok())
            .map(|r| TrainingSummary {
                loss: r.loss.clone(),
                parameters: r.params.len(),
                geometry_parameters: r.encoder_params.len(),
                batchnorm_layers: r.batchnorm.len(),
                options: serde_json::to_value(&r.options).unwrap_or_default(),
            }),
        step: model
            .metadata(dagr_core::step_graph::METADATA_KEY)
            .and_then(|s| serde_json::from_str(s).ok()),
        prepared,
    })
}

impl Report {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "IR version  {}", self.ir_version);
        let _ = writeln!(s, "producer    {}", self.producer);
        let ops: Vec<String> = self.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
        let _ = writeln!(s, "opsets      {}", ops.join(", "));
        let _ = writeln!(
            s,
            "parameters  {} in {} tensors{}",
            self.parameters,
            self.parameter_tensors,
            if self.external_data { " (external data)" } else { "" }
        );
        if !self.not_trained.is_empty() {
            let parts: Vec<String> = self
                .not_trained
                .iter()
                .map(|(k, n)| format!("{n} {}", k.replace('_', " ")))
                .collect();
            let _ = writeln!(s, "            not trained: {}", parts.join(", "));
        }
        let _ = writeln!(s, "nodes       {}", self.nodes);
        let p = &self.prepared;
        if let Some(from) = p.upgraded_from {
            let _ = writeln!(
                s,
                "upgraded    the model's opset {from} is read as opset {} (the operators whose form changed since rewritten)",
                dagr_ops::upgrade::TARGET
            );
        }
        if p.inlined_calls > 0 {
            let _ = writeln!(
                s,
                "functions   {} calls of local functions inlined (their weights train as initializers)",
                p.inlined_calls
            );
        }
        if !p.constant_weights.is_empty() {
            let _ = writeln!(
                s,
                "constants   {} Constant nodes hold weights (they train as parameters)",
                p.constant_weights.len()
            );
        }
        if let Some((first, declared)) = p.corrected_shapes.first() {
            let _ = writeln!(
                s,
                "shapes      {} tensors declare shapes their operators contradict ({first} declares {declared}); the computed shapes are used",
                p.corrected_shapes.len()
            );
        }
        for class in &p.unified_dims {
            let _ = writeln!(
                s,
                "dims        {} are one dim (the graph's operators equate them), read as {}",
                class.join(", "),
                class[0]
            );
        }
        if self.without_gradient_rule.is_empty() {
            let _ = writeln!(
                s,
                "gradients   every op between the parameters and the outputs has a rule (--train can differentiate it)"
            );
        } else {
            let parts: Vec<String> = self
                .without_gradient_rule
                .iter()
                .map(|(op, nodes)| {
                    let shown: Vec<&str> = nodes.iter().take(3).map(String::as_str).collect();
                    let more = if nodes.len() > 3 { ", ..." } else { "" };
                    format!("{op} ({} nodes: {}{more})", nodes.len(), shown.join(", "))
                })
                .collect();
            let _ = writeln!(
                s,
                "gradients   --train stops here: no gradient rule for {}; --freeze the parameters upstream of it, or report the op",
                parts.join("; ")
            );
        }
        let _ = writeln!(s, "\ninputs");
        for t in &self.inputs {
            let _ = writeln!(s, "  {:<28} {:<9} {}", t.name, t.dtype, t.shape);
        }
        let _ = writeln!(s, "outputs");
        for t in &self.outputs {
            let _ = writeln!(s, "  {:<28} {:<9} {}", t.name, t.dtype, t.shape);
        }
        let ops: Vec<String> = self.op_counts.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        let _ = writeln!(s, "\noperators   {}", ops.join(" "));
        if let Some(d) = &self.dagr {
            let _ = writeln!(s, "\nrewritten by dagr-inject: {d}");
        }
        if let Some(t) = &self.training {
            let _ = writeln!(
                s,
                "training graph: loss {}, {} parameters ({} also get the geometry gradient), {} BatchNorm layers, options {}",
                t.loss, t.parameters, t.geometry_parameters, t.batchnorm_layers, t.options
            );
        }
        if let Some(st) = &self.step {
            let _ = writeln!(
                s,
                "step graph (one training step: forward, backward, optimizer): loss {}, {} parameters, optimizer {}, clip {}\n  \
                 feed the batch, the scalars [{}] and {} state tensors; each comes back updated:",
                st.loss,
                st.params.len(),
                serde_json::to_string(&st.optimizer).unwrap_or_default(),
                st.clip_grad_norm.map_or("none".to_string(), |c| c.to_string()),
                st.scalars.join(", "),
                st.state.iter().map(|l| &l.key).collect::<std::collections::BTreeSet<_>>().len()
            );
            for l in &st.state {
                // A state updated in parts: each output is those rows of it, written in place.
                let rows = l
                    .rows
                    .map_or(String::new(), |(a, b)| format!(" (rows {a}..{b}, in place)"));
                let _ = writeln!(s, "  {:<40} {} -> {}{rows}", l.key, l.input, l.output);
            }
        }
        let _ = writeln!(s, "\nencoder-output candidates (best first)");
        if self.encoder_candidates.is_empty() {
            let _ = writeln!(
                s,
                "  none found: the exporter recorded no module scopes; pass tensor names to --encoders"
            );
        }
        for c in &self.encoder_candidates {
            let _ = writeln!(
                s,
                "  {:>3}  --encoders {:<22} {:<32} {:<8} {:<14} {}",
                c.score,
                c.pass_as,
                c.tensor,
                c.dtype,
                c.shape,
                c.reasons.join("; ")
            );
        }
        let enc: Vec<&str> = self
            .encoder_candidates
            .iter()
            .filter(|c| c.score >= 5)
            .map(|c| c.pass_as.as_str())
            .collect();
        if enc.len() >= 2 {
            let _ = writeln!(s, "\nsuggested: dagr-inject MODEL --encoders {}", enc.join(","));
        }
        s
    }
}
