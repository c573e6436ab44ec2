//! Rewrites that make a training graph portable: tract runs BatchNormalization in inference
//! mode only, so a training-mode BatchNormalization becomes its primitive form (batch mean and
//! variance by ReduceMean), with the updated running statistics as explicit tensors.

use dagr_onnx::builder::Builder;
use dagr_onnx::error::{Error, Result};
use dagr_onnx::proto::NodeProto;
use dagr_onnx::{attr, dtype, GraphIndex, Model};

/// A decomposed training-mode BatchNormalization: where its updated running statistics are.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RunningStats {
    /// The initializer holding the running mean, and the tensor with its updated value.
    pub mean: (String, String),
    pub var: (String, String),
}

use dagr_onnx::ops::is_training_batchnorm;

/// Replace every BatchNormalization by primitives, in place (same position, so the node order
/// stays topological): training mode normalizes with the batch statistics, inference mode with
/// the running ones. tract needs this twice over: it runs BatchNormalization in inference mode
/// only, and only with constant parameters (a training graph feeds them).
///
/// The updated running statistics (training mode) follow PyTorch: the running variance is
/// updated with the unbiased batch variance, `running * momentum + batch * (1 - momentum)`,
/// with ONNX's `momentum` (PyTorch's 1 - momentum).
pub fn decompose_batchnorm(model: &mut Model) -> Result<Vec<RunningStats>> {
    let idx = GraphIndex::new(model)?;
    let positions: Vec<usize> = model
        .graph()
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "BatchNormalization" && n.domain.is_empty())
        .map(|(i, _)| i)
        .collect();
    let mut b = Builder::new(model, "");
    let mut stats = Vec::new();
    let mut replacements: Vec<(usize, Vec<NodeProto>)> = Vec::new();
    for &i in &positions {
        let n = model.graph().node[i].clone();
        if n.input.len() != 5 || n.input.iter().any(String::is_empty) {
            return Err(Error::InvalidModel(format!(
                "BatchNormalization '{}' has {} inputs; it needs five (X, scale, B, mean, var)",
                n.name,
                n.input.len()
            )));
        }
        let x = &n.input[0];
        let rank = idx.fact(x).and_then(|f| f.rank()).ok_or_else(|| {
            Error::InvalidModel(format!(
                "the rank of the input of BatchNormalization '{}' is unknown",
                n.name
            ))
        })?;
        let eps = attr::attr_f(&n, "epsilon").unwrap_or(1e-5) as f64;
        let momentum = attr::attr_f(&n, "momentum").unwrap_or(0.9) as f64;
        let before = b.nodes.len();
        let h = if n.name.is_empty() {
            "batchnorm".to_string()
        } else {
            n.name.clone()
        };
        let mut axes = vec![0i64];
        axes.extend(2..rank as i64);
        let training = is_training_batchnorm(&n);
        let (m, v, d) = if training {
            let m = b.reduce("ReduceMean", x, Some(&axes), true, &h);
            let d = b.binary("Sub", x, &m, &h);
            let d2 = b.binary("Mul", &d, &d, &h);
            let v = b.reduce("ReduceMean", &d2, Some(&axes), true, &h);
            (m, v, d)
        } else {
            let m = b.unsqueeze(&n.input[3], &axes, &h);
            let d = b.binary("Sub", x, &m, &h);
            (m, b.unsqueeze(&n.input[4], &axes, &h), d)
        };
        let e = b.scalar(eps);
        let ve = b.binary("Add", &v, &e, &h);
        let sd = b.unary("Sqrt", &ve, &h);
        let xhat = b.binary("Div", &d, &sd, &h);
        let gamma = b.unsqueeze(&n.input[1], &axes, &h);
        let beta = b.unsqueeze(&n.input[2], &axes, &h);
        let y = b.binary("Mul", &xhat, &gamma, &h);
        b.op_named("Add", &[&y, &beta], vec![], &n.output[0]);
        if !training {
            let mut new_nodes: Vec<NodeProto> = b.nodes.drain(before..).collect();
            for nn in new_nodes.iter_mut() {
                nn.metadata_props = n.metadata_props.clone();
            }
            replacements.push((i, new_nodes));
            continue;
        }
        // Running statistics.
        let flat = b.const_i64(&[-1]);
        let bm = b.binary("Reshape", &m, &flat, &h);
        let bv = b.binary("Reshape", &v, &flat, &h);
        let sx = b.unary("Size", x, &h);
        let sm = b.unary("Size", &m, &h);
        let sx = b.cast(&sx, dtype::FLOAT, &h);
        let sm = b.cast(&sm, dtype::FLOAT, &h);
        let cnt = b.binary("Div", &sx, &sm, &h);
        let one = b.scalar(1.0);
        let cm1 = b.binary("Sub", &cnt, &one, &h);
        let cm1 = b.binary("Max", &cm1, &one, &h);
        let ratio = b.binary("Div", &cnt, &cm1, &h);
        let ub = b.binary("Mul", &bv, &ratio, &h);
        let mo = b.scalar(momentum);
        let om = b.scalar(1.0 - momentum);
        let mut updated = Vec::new();
        for (k, (run, batch)) in [(&n.input[3], &bm), (&n.input[4], &ub)].into_iter().enumerate() {
            let a = b.binary("Mul", run, &mo, &h);
            let c = b.binary("Mul", batch, &om, &h);
            let name = match n.output.get(k + 1).filter(|o| !o.is_empty()) {
                Some(o) => o.clone(),
                None => b.name(&format!("{h}/running_{k}")),
            };
            b.op_named("Add", &[&a, &c], vec![], &name);
            updated.push(name);
        }
        stats.push(RunningStats {
            mean: (n.input[3].clone(), updated[0].clone()),
            var: (n.input[4].clone(), updated[1].clone()),
        });
        // The new nodes stay in the module scope of the node they replace.
        let mut new_nodes: Vec<NodeProto> = b.nodes.drain(before..).collect();
        for nn in new_nodes.iter_mut() {
            nn.metadata_props = n.metadata_props.clone();
        }
        replacements.push((i, new_nodes));
    }
    let inits = std::mem::take(&mut b.initializers);
    let g = model.graph_mut();
    for (i, nodes) in replacements.into_iter().rev() {
        g.node.splice(i..i + 1, nodes);
    }
    g.initializer.extend(inits);
    Ok(stats)
}
