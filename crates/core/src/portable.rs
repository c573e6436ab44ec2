//! Rewrites that make a training graph portable: tract runs BatchNormalization in inference
//! mode only, so a training-mode BatchNormalization becomes its primitive form (batch mean and
//! variance by ReduceMean), with the updated running statistics as explicit tensors.

use dagr_onnx::builder::Builder;
use dagr_onnx::error::{Error, Result};
use dagr_onnx::proto::NodeProto;
use dagr_onnx::{attr, dtype, Dim, Model, ValueFact};

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
    let idx = dagr_ops::index(model)?;
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
        // (x - mean) (scale / sd) + B: the per-channel factor made before it meets the
        // activation, so the forward makes two passes over it after the centring (not three)
        // and the backward two (g a, and g (x - mean) for the factor) instead of three.
        let gamma = b.unsqueeze(&n.input[1], &axes, &h);
        let beta = b.unsqueeze(&n.input[2], &axes, &h);
        let a = b.binary("Div", &gamma, &sd, &h);
        let y = b.binary("Mul", &d, &a, &h);
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

/// Replace dynamo's `split`/`chunk` form, a SplitToSequence read only by SequenceAt at known
/// positions, by a Split (and Squeeze where `keepdims=0`): the same values as plain tensors,
/// which tract runs and the gradient rules differentiate. Sequences used any other way stay.
/// Returns how many were replaced.
pub fn lower_sequences(model: &mut Model) -> Result<usize> {
    let idx = dagr_ops::index(model)?;
    let opset = model.opset();
    let mut b = Builder::new(model, "");
    // (position of the SplitToSequence, its replacement, SequenceAt position -> part)
    type Plan = (usize, Vec<NodeProto>, Vec<(usize, String)>);
    let mut plans: Vec<Plan> = Vec::new();
    let g = model.graph();
    for (i, n) in g.node.iter().enumerate() {
        if n.op_type != "SplitToSequence" || !n.domain.is_empty() || n.output.len() != 1 {
            continue;
        }
        let seq = &n.output[0];
        let (Some(elems), Some(rank)) = (
            idx.known.sequences.get(seq),
            idx.fact(&n.input[0]).and_then(|f| f.rank()),
        ) else {
            continue;
        };
        if idx.graph_outputs.contains(seq) || elems.is_empty() {
            continue;
        }
        let a = attr::attr_i(n, "axis").unwrap_or(0);
        let axis = if a < 0 { a + rank as i64 } else { a };
        // keepdims=0 only applies when no split is given: parts of size 1, the axis removed.
        let squeeze = attr::attr_i(n, "keepdims") == Some(0) && n.input.get(1).is_none_or(|s| s.is_empty());
        let sizes: Option<Vec<i64>> = elems
            .iter()
            .map(|f| match squeeze {
                true => Some(1),
                false => f.shape.as_ref()?.get(axis as usize)?.known(),
            })
            .collect();
        let Some(sizes) = sizes else { continue };
        let k = sizes.len() as i64;
        let uses: Option<Vec<(usize, usize)>> = idx
            .consumers_of(seq)
            .iter()
            .map(|&c| {
                let u = &g.node[c];
                let pos = idx.value(u.input.get(1)?)?.first()?;
                let p = pos.known()?;
                let p = if p < 0 { p + k } else { p };
                (u.op_type == "SequenceAt" && (0..k).contains(&p)).then_some((c, p as usize))
            })
            .collect();
        let Some(uses) = uses else { continue };
        let before = b.nodes.len();
        let split_attrs = match opset >= 13 {
            true => vec![dagr_onnx::builder::attr_int("axis", axis)],
            false => vec![
                dagr_onnx::builder::attr_int("axis", axis),
                dagr_onnx::builder::attr_ints("split", &sizes),
            ],
        };
        let parts = if opset >= 13 {
            let s = b.const_i64(&sizes);
            b.node_n("Split", &[&n.input[0], &s], sizes.len(), split_attrs, "sequence")
        } else {
            b.node_n("Split", &[&n.input[0]], sizes.len(), split_attrs, "sequence")
        };
        let parts: Vec<String> = if squeeze {
            parts
                .iter()
                .map(|p| match opset >= 13 {
                    true => {
                        let ax = b.const_i64(&[axis]);
                        b.op("Squeeze", &[p, &ax], vec![], "sequence")
                    }
                    false => b.op(
                        "Squeeze",
                        &[p],
                        vec![dagr_onnx::builder::attr_ints("axes", &[axis])],
                        "sequence",
                    ),
                })
                .collect()
        } else {
            parts
        };
        let mut nodes: Vec<NodeProto> = b.nodes.drain(before..).collect();
        for nn in nodes.iter_mut() {
            nn.metadata_props = n.metadata_props.clone();
        }
        plans.push((i, nodes, uses.into_iter().map(|(c, p)| (c, parts[p].clone())).collect()));
    }
    let count = plans.len();
    let inits = std::mem::take(&mut b.initializers);
    let g = model.graph_mut();
    // Each SequenceAt becomes an Identity of its part (its output keeps its name).
    for (_, _, uses) in &plans {
        for (c, part) in uses {
            let u = &mut g.node[*c];
            u.op_type = "Identity".into();
            u.input = vec![part.clone()];
            u.attribute.clear();
        }
    }
    for (i, nodes, _) in plans.into_iter().rev() {
        g.node.splice(i..i + 1, nodes);
    }
    g.initializer.extend(inits);
    Ok(count)
}

/// Replace every `If` whose condition is known when the graph is built (a constant, or computed
/// from static shapes) by the nodes of the branch it takes, their names made fresh, and an
/// Identity per output: the graph then holds only ops the gradient rules and both backends
/// know. An `If` whose branch holds subgraphs of its own stays. Returns how many were folded.
pub fn fold_constant_ifs(model: &mut Model) -> Result<usize> {
    let idx = dagr_ops::index(model)?;
    let mut b = Builder::new(model, "");
    let mut plans: Vec<(usize, Vec<NodeProto>)> = Vec::new();
    for (i, n) in model.graph().node.iter().enumerate() {
        if n.op_type != "If" || !n.domain.is_empty() {
            continue;
        }
        let Some(cond) = n
            .input
            .first()
            .and_then(|c| idx.value(c))
            .and_then(|v| match v.as_slice() {
                [d] => d.known(),
                _ => None,
            })
        else {
            continue;
        };
        let branch = if cond != 0 { "then_branch" } else { "else_branch" };
        let Some(g) = attr::attr(n, branch).and_then(|a| a.g.as_ref()) else {
            continue;
        };
        let nested = g
            .node
            .iter()
            .any(|m| m.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()));
        if nested || g.output.len() != n.output.len() {
            continue;
        }
        let n0 = b.nodes.len();
        let rename = b.inline_body(g, &n.name);
        let new = |x: &String| rename.get(x).cloned().unwrap_or_else(|| x.clone());
        let mut nodes: Vec<NodeProto> = b.nodes.drain(n0..).collect();
        for (o, out) in g.output.iter().zip(&n.output) {
            if out.is_empty() {
                continue;
            }
            let mut id = NodeProto::new();
            id.op_type = "Identity".into();
            id.name = b.names.fresh(&format!("{}/output", n.name));
            id.input = vec![new(&o.name)];
            id.output = vec![out.clone()];
            nodes.push(id);
        }
        plans.push((i, nodes));
    }
    let count = plans.len();
    let inits = std::mem::take(&mut b.initializers);
    let g = model.graph_mut();
    for (i, nodes) in plans.into_iter().rev() {
        g.node.splice(i..i + 1, nodes);
    }
    g.initializer.extend(inits);
    Ok(count)
}

/// A training-mode Dropout made portable: its mask is the graph input `input` (bool, the shape
/// of the dropped tensor, symbolic dims by name), drawn by the trainer each step with keep
/// probability `1 - ratio`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DropoutMask {
    pub input: String,
    pub ratio: f64,
    /// The mask's dims: integers or the model's symbolic dims (`batch`, `7*batch`).
    pub shape: Vec<String>,
}

/// Replace every training-mode Dropout (its `training_mode` a constant true) by
/// `Y = X * mask / (1 - ratio)` with the mask fed as a graph input, and its mask output (if
/// anything reads it) by that input. Runtimes draw Dropout masks their own way (tract runs
/// Dropout as the identity, the dynamo exporter writes no mask output); a fed mask makes the
/// step the same on every backend, reproducible from the trainer's seed, and differentiable by
/// the Mul rule.
pub fn feed_dropout_masks(model: &mut Model) -> Result<Vec<DropoutMask>> {
    let idx = dagr_ops::index(model)?;
    let consts = idx.int_constants();
    let mut b = Builder::new(model, "");
    let mut replaced: Vec<(usize, Vec<NodeProto>)> = Vec::new();
    let mut masks = Vec::new();
    let mut inputs = Vec::new();
    let g = model.graph();
    for (i, n) in g.node.iter().enumerate() {
        if n.op_type != "Dropout" || !n.domain.is_empty() {
            continue;
        }
        let training = n
            .input
            .get(2)
            .filter(|s| !s.is_empty())
            .and_then(|t| consts.get(t))
            .and_then(|v| v.first().copied());
        match training {
            Some(1) => {}
            Some(_) => continue,
            None if n.input.get(2).is_none_or(|s| s.is_empty()) => continue,
            None => {
                return Err(Error::InvalidModel(format!(
                    "Dropout '{}' decides its training mode at run time; export with a fixed mode",
                    n.name
                )))
            }
        }
        let ratio = match n.input.get(1).filter(|s| !s.is_empty()) {
            None => 0.5,
            Some(r) => match idx.known.floats.get(r).and_then(|v| v.first()) {
                Some(&v) => v,
                None => {
                    return Err(Error::InvalidModel(format!(
                        "Dropout '{}' has a ratio computed at run time; export with a constant ratio",
                        n.name
                    )))
                }
            },
        };
        if !(0.0..1.0).contains(&ratio) {
            return Err(Error::InvalidModel(format!(
                "Dropout '{}' has ratio {ratio}, outside [0, 1)",
                n.name
            )));
        }
        let x = &n.input[0];
        let shape = idx
            .fact(x)
            .and_then(|f| f.shape.clone())
            .filter(|s| s.iter().all(|d| !d.is_unknown()));
        let Some(shape) = shape else {
            return Err(Error::ShapeUnknown {
                tensor: x.clone(),
                context: format!(" (the input of training-mode Dropout '{}', whose mask is fed)", n.name),
            });
        };
        let mask = b.names.fresh(&format!("dagr/dropout_mask/{}", n.output[0]));
        inputs.push(dagr_onnx::ValueFact::new(dtype::BOOL, shape.clone()).to_value_info(&mask));
        let before = b.nodes.len();
        let keep = b.cast(&mask, idx.fact(x).map(|f| f.dtype).unwrap_or(dtype::FLOAT), "dropout");
        let scale = b.scalar(1.0 / (1.0 - ratio));
        let kept = b.binary("Mul", x, &keep, "dropout");
        b.op_named("Mul", &[&kept, &scale], vec![], &n.output[0]);
        if let Some(m) = n.output.get(1).filter(|s| !s.is_empty()) {
            b.op_named("Identity", &[&mask], vec![], m);
        }
        let mut nodes: Vec<NodeProto> = b.nodes.drain(before..).collect();
        for nn in nodes.iter_mut() {
            nn.metadata_props = n.metadata_props.clone();
        }
        replaced.push((i, nodes));
        masks.push(DropoutMask {
            input: mask,
            ratio,
            shape: shape.iter().map(|d| d.to_string()).collect(),
        });
    }
    let inits = std::mem::take(&mut b.initializers);
    let g = model.graph_mut();
    for (i, nodes) in replaced.into_iter().rev() {
        g.node.splice(i..i + 1, nodes);
    }
    g.initializer.extend(inits);
    g.input.extend(inputs);
    Ok(masks)
}

/// What `prepare` changed in a model as exported.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prepared {
    /// The opset the model had where it was older than 16 (6 to 15): it is read as opset 16
    /// (`dagr_ops::upgrade`).
    #[serde(default)]
    pub upgraded_from: Option<i64>,
    /// Calls of ONNX local functions replaced by their bodies.
    pub inlined_calls: usize,
    /// `Constant` nodes holding weights that became initializers.
    pub constant_weights: Vec<String>,
    /// Symbolic dims found to be one (each input's own batch symbol, as tf2onnx and paddle2onnx
    /// write them): the names, renamed to the first.
    pub unified_dims: Vec<Vec<String>>,
    /// Tensors whose declared shape (value_info) the graph's operators contradict, with the
    /// shape declared: their value_info now holds the shape the operators compute.
    pub corrected_shapes: Vec<(String, String)>,
}

/// The operators whose inputs at these positions are weights: a float `Constant` feeding one is
/// a parameter written as a node (paddle2onnx before 2.0, hand-built graphs).
fn weight_slot(op: &str, input: usize) -> bool {
    match op {
        "MatMul" | "Gemm" => true,
        "Conv" | "ConvTranspose" => input >= 1,
        _ => false,
    }
}

/// Normalize a model as exported before anything reads its structure (encoder location,
/// parameter selection, shape facts), the same way every time so that the names agree between
/// the training graph and the model trained weights are exported into: a model of opset 6 to 15
/// is rewritten as opset 16 (`dagr_ops::upgrade`), local functions are
/// inlined (their captured weights become initializers, see `dagr_onnx::functions`), and a float
/// `Constant` node with more than one element that feeds the weight of a MatMul, Gemm, Conv or
/// ConvTranspose becomes an initializer of the same name. Idempotent.
pub fn prepare(model: &mut Model) -> Result<Prepared> {
    let upgraded_from = dagr_ops::upgrade::upgrade(model)?;
    let inlined_calls = dagr_onnx::functions::inline_local_functions(model)?;
    let g = model.graph();
    let mut weights: std::collections::HashSet<String> = std::collections::HashSet::new();
    for n in &g.node {
        if !n.domain.is_empty() && n.domain != "ai.onnx" {
            continue;
        }
        for (k, i) in n.input.iter().enumerate() {
            if weight_slot(&n.op_type, k) {
                weights.insert(i.clone());
            }
        }
    }
    let constant_weights = promote_constants(model, |t, numel| numel > 1 && weights.contains(t))?;
    let unified_dims = unify_dims(model)?;
    let corrected_shapes = correct_declared_shapes(model)?;
    Ok(Prepared {
        upgraded_from,
        inlined_calls,
        constant_weights,
        unified_dims,
        corrected_shapes,
    })
}

/// Declared shapes (value_info) that the graph's operators contradict, replaced by the shapes
/// they compute from the graph's inputs (`dagr_ops::infer`: a contradiction goes to the
/// operators). jax2onnx declares NHWC shapes for the NCHW tensors between the convolutions it
/// keeps in NCHW; ONNX Runtime runs such a model but refuses a graph built on those shapes, and
/// gradients built from them reshape wrongly. Returns each tensor with the shape it declared.
fn correct_declared_shapes(model: &mut Model) -> Result<Vec<(String, String)>> {
    let idx = dagr_ops::index(model)?;
    let mut out = Vec::new();
    for v in model.graph_mut().value_info.iter_mut() {
        let Some(declared) = v.type_.as_ref().and_then(ValueFact::from_type_proto) else {
            continue;
        };
        let Some(fact) = idx.fact(&v.name) else { continue };
        let (Some(d), Some(f)) = (&declared.shape, &fact.shape) else {
            continue;
        };
        let contradicts = d.len() != f.len()
            || d.iter()
                .zip(f)
                .any(|(a, b)| matches!((a, b), (Dim::Known(x), Dim::Known(y)) if x != y));
        if contradicts {
            out.push((v.name.clone(), declared.shape_string()));
            *v = fact.to_value_info(&v.name);
        }
    }
    Ok(out)
}

/// Make every float `Constant` node of the main graph that `select` admits (by output name and
/// element count) an initializer of the same name. Returns the tensors.
pub fn promote_constants(model: &mut Model, select: impl Fn(&str, i64) -> bool) -> Result<Vec<String>> {
    let mut promote: Vec<(usize, dagr_onnx::proto::TensorProto)> = Vec::new();
    for (k, n) in model.graph().node.iter().enumerate() {
        if n.op_type != "Constant" || !n.domain.is_empty() || n.output.len() != 1 {
            continue;
        }
        let Some(t) = attr::attr(n, "value").and_then(|a| a.t.as_ref()) else {
            continue;
        };
        if dtype::is_float(t.data_type) && select(&n.output[0], t.dims.iter().product::<i64>()) {
            let mut t = t.clone();
            t.name = n.output[0].clone();
            promote.push((k, t));
        }
    }
    let out = promote.iter().map(|(_, t)| t.name.clone()).collect();
    let drop: std::collections::HashSet<usize> = promote.iter().map(|(k, _)| *k).collect();
    let g = model.graph_mut();
    let mut k = 0;
    g.node.retain(|_| {
        k += 1;
        !drop.contains(&(k - 1))
    });
    g.initializer.extend(promote.into_iter().map(|(_, t)| t));
    Ok(out)
}

/// The name of a dim that is one symbol alone.
fn plain_symbol(d: &Dim) -> Option<String> {
    let Dim::Sym(e) = d else { return None };
    let mut names = e.symbols();
    let first = names.next()?.clone();
    (names.next().is_none() && *d == Dim::sym(&first)).then_some(first)
}

/// Symbolic dims that the graph's own operators prove equal: the dims of Concat's inputs off
/// its axis, and dims that elementwise operators meet (broadcasting only stretches a 1, and an
/// exporter's symbol is no 1). Exporters that give each input and output its own batch symbol
/// (tf2onnx `unk__45`, `unk__46`; paddle2onnx `DynamicDimension.k`) are read with one batch.
/// Renames them in the graph's inputs, outputs and value_info to the first of each class (in
/// input order); returns the classes.
fn unify_dims(model: &mut Model) -> Result<Vec<Vec<String>>> {
    // A class found in one pass makes shapes known that show the next (a Concat of two batch
    // symbols is unknown until they are one).
    let mut all = Vec::new();
    for _ in 0..8 {
        let found = unify_dims_once(model)?;
        if found.is_empty() {
            break;
        }
        for class in found {
            match all.iter_mut().find(|c: &&mut Vec<String>| c[0] == class[0]) {
                Some(c) => c.extend(class.into_iter().skip(1).filter(|m| !c.contains(m)).collect::<Vec<_>>()),
                None => all.push(class),
            }
        }
    }
    Ok(all)
}

fn unify_dims_once(model: &mut Model) -> Result<Vec<Vec<String>>> {
    // Shapes as inference finds them from the inputs, declared output shapes aside: an output
    // (or value_info) declared with a symbol of its own is the same dim as the one inferred.
    let mut bare = model.clone();
    bare.graph_mut().value_info.clear();
    for o in bare.graph_mut().output.iter_mut() {
        o.type_.mut_or_insert_default().mut_tensor_type().shape.clear();
    }
    let idx = dagr_ops::index(&bare)?;
    let g = model.graph();
    let mut parent: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    fn find(p: &mut std::collections::BTreeMap<String, String>, x: &str) -> String {
        let mut r = x.to_string();
        while let Some(up) = p.get(&r).filter(|u| **u != r) {
            r = up.clone();
        }
        r
    }
    let unite = |a: &str, b: &str, p: &mut std::collections::BTreeMap<String, String>| {
        let (ra, rb) = (find(p, a), find(p, b));
        if ra != rb {
            p.insert(rb, ra);
        }
    };
    let shape = |t: &str| idx.fact(t).and_then(|f| f.shape.clone());
    for n in &g.node {
        if !n.domain.is_empty() {
            continue;
        }
        let shapes: Vec<Vec<Dim>> = n
            .input
            .iter()
            .filter(|i| !i.is_empty())
            .filter_map(|i| shape(i))
            .collect();
        match n.op_type.as_str() {
            "Concat" => {
                let Some(rank) = shapes.first().map(|s| s.len()) else {
                    continue;
                };
                if shapes.iter().any(|s| s.len() != rank) {
                    continue;
                }
                let axis = attr::attr_i(n, "axis").unwrap_or(0);
                let axis = if axis < 0 { axis + rank as i64 } else { axis } as usize;
                for d in (0..rank).filter(|&d| d != axis) {
                    let syms: Vec<String> = shapes.iter().filter_map(|s| plain_symbol(&s[d])).collect();
                    for w in syms.windows(2) {
                        unite(&w[0], &w[1], &mut parent);
                    }
                }
            }
            "Add" | "Sub" | "Mul" | "Div" | "Where" | "Sum" | "Max" | "Min" | "Mean" | "Equal" | "Less" | "Greater"
            | "Pow" => {
                let rank = shapes.iter().map(Vec::len).max().unwrap_or(0);
                for back in 1..=rank {
                    let syms: Vec<String> = shapes
                        .iter()
                        .filter_map(|s| s.len().checked_sub(back).and_then(|i| plain_symbol(&s[i])))
                        .collect();
                    for w in syms.windows(2) {
                        unite(&w[0], &w[1], &mut parent);
                    }
                }
            }
            _ => {}
        }
    }
    for v in g.output.iter().chain(g.value_info.iter()) {
        let declared = &v.type_.tensor_type().shape.dim;
        let Some(inferred) = shape(&v.name) else { continue };
        if inferred.len() != declared.len() {
            continue;
        }
        for (d, i) in declared.iter().zip(&inferred) {
            if let Some(s) = plain_symbol(i) {
                if !d.dim_param().is_empty() && d.dim_param() != s {
                    unite(&s, d.dim_param(), &mut parent);
                }
            }
        }
    }
    if parent.is_empty() {
        return Ok(Vec::new());
    }
    // The representative of each class: its first symbol in the order of the graph's inputs.
    let order: Vec<String> = g
        .input
        .iter()
        .chain(g.output.iter())
        .chain(g.value_info.iter())
        .flat_map(|v| {
            v.type_
                .tensor_type()
                .shape
                .dim
                .iter()
                .map(|d| d.dim_param().to_string())
        })
        .filter(|s| !s.is_empty())
        .collect();
    let names: Vec<String> = parent.keys().chain(parent.values()).cloned().collect();
    let mut classes: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for x in names {
        let r = find(&mut parent, &x);
        let c = classes.entry(r).or_default();
        if !c.contains(&x) {
            c.push(x);
        }
    }
    let mut rename: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut out = Vec::new();
    for mut members in classes.into_values() {
        members.sort_by_key(|m| order.iter().position(|o| o == m).unwrap_or(usize::MAX));
        for m in &members[1..] {
            rename.insert(m.clone(), members[0].clone());
        }
        out.push(members);
    }
    let g = model.graph_mut();
    for v in g
        .input
        .iter_mut()
        .chain(g.output.iter_mut())
        .chain(g.value_info.iter_mut())
    {
        let t = v.type_.mut_or_insert_default().mut_tensor_type();
        for d in t.shape.mut_or_insert_default().dim.iter_mut() {
            if let Some(r) = rename.get(d.dim_param()) {
                d.set_dim_param(r.clone());
            }
        }
    }
    Ok(out)
}
