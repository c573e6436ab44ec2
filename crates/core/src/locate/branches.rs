//! Encoders found by structure, for exporters that record no module (paddle2onnx): the branch of
//! a graph input is the set of nodes that depend on that input and on no other; its output is
//! the last float tensor of the branch that a node depending on other inputs too reads (where
//! the modalities meet: the fusion), taken before any Identity chain the exporter put there.

use dagr_onnx::{dtype, GraphIndex, Model};
use std::collections::HashMap;

/// One graph input's branch and where it ends.
#[derive(Debug, Clone)]
pub struct Branch {
    pub input: String,
    pub output: String,
}

/// The graph's user inputs, and the inputs each tensor and each node depends on, as bit sets over
/// those inputs.
pub(crate) type Dependence = (Vec<String>, HashMap<String, u64>, Vec<u64>);

/// The inputs each tensor depends on, as a bit set over `idx.user_inputs()` (at most 64), with
/// the same for each node.
pub(crate) fn dependence(model: &Model, idx: &GraphIndex) -> Option<Dependence> {
    let inputs = idx.user_inputs();
    if inputs.len() < 2 || inputs.len() > 64 {
        return None;
    }
    let mut of: HashMap<String, u64> = HashMap::new();
    for (k, i) in inputs.iter().enumerate() {
        of.insert(i.clone(), 1 << k);
    }
    let g = model.graph();
    let mut node_mask = vec![0u64; g.node.len()];
    for &i in &idx.topo {
        let n = &g.node[i];
        let m = n.input.iter().fold(0, |m, t| m | of.get(t).copied().unwrap_or(0));
        node_mask[i] = m;
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            of.insert(o.clone(), m);
        }
    }
    Some((inputs, of, node_mask))
}

/// Where each graph input's branch meets the others (inputs whose branch has no such float
/// tensor are left out).
pub fn all(model: &Model, idx: &GraphIndex) -> Vec<Branch> {
    let Some((inputs, of, node_mask)) = dependence(model, idx) else {
        return Vec::new();
    };
    let g = model.graph();
    let data = idx.data_dependent(model);
    let mut out = Vec::new();
    for (k, input) in inputs.iter().enumerate() {
        let bit = 1u64 << k;
        let mut best: Option<(usize, String)> = None;
        for (pos, &i) in idx.topo.iter().enumerate() {
            if node_mask[i] != bit {
                continue;
            }
            for o in &g.node[i].output {
                if o.is_empty() || of.get(o) != Some(&bit) || !data.contains(o) {
                    continue;
                }
                let float = idx.fact(o).is_some_and(|f| dtype::is_float(f.dtype));
                let meets = idx.consumers_of(o).iter().any(|&c| node_mask[c] & !bit != 0);
                if float && meets && best.as_ref().is_none_or(|(p, _)| pos > *p) {
                    best = Some((pos, o.clone()));
                }
            }
        }
        if let Some((_, t)) = best {
            out.push(Branch {
                input: input.clone(),
                output: before_identity(model, idx, &t),
            });
        }
    }
    out
}

/// The branch output of `input` (see `all`).
pub fn output_of(model: &Model, idx: &GraphIndex, input: &str) -> Option<String> {
    all(model, idx).into_iter().find(|b| b.input == input).map(|b| b.output)
}

/// The graph input an `--encoders` entry names: the input itself (`audio`), or with an
/// `encoder` suffix (`audio_encoder`, `audioEncoder`).
pub fn input_named(idx: &GraphIndex, entry: &str) -> Option<String> {
    let inputs = idx.user_inputs();
    if let Some(i) = inputs.iter().find(|i| i.as_str() == entry) {
        return Some(i.clone());
    }
    let loose = super::loose;
    let e = loose(entry);
    let e = e.strip_suffix("encoder").unwrap_or(&e).to_string();
    let found: Vec<&String> = inputs.iter().filter(|i| loose(i) == e).collect();
    match found.as_slice() {
        [one] => Some((*one).clone()),
        _ => None,
    }
}

/// `t`, or the start of the Identity chain that ends in it.
fn before_identity(model: &Model, idx: &GraphIndex, t: &str) -> String {
    let g = model.graph();
    let mut t = t.to_string();
    while let Some(&(p, _)) = idx.producer.get(&t) {
        let n = &g.node[p];
        if n.op_type != "Identity" || n.input.is_empty() || !idx.producer.contains_key(&n.input[0]) {
            break;
        }
        t = n.input[0].clone();
    }
    t
}

/// The nodes reading `t`, looking through Identity nodes.
pub fn consumers_through_identity(model: &Model, idx: &GraphIndex, t: &str) -> Vec<usize> {
    let g = model.graph();
    let mut out = Vec::new();
    let mut stack = vec![t.to_string()];
    let mut seen = std::collections::HashSet::new();
    while let Some(t) = stack.pop() {
        if !seen.insert(t.clone()) {
            continue;
        }
        for &c in idx.consumers_of(&t) {
            if g.node[c].op_type == "Identity" {
                stack.extend(g.node[c].output.iter().cloned());
            } else {
                out.push(c);
            }
        }
    }
    out
}
