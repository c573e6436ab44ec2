//! Inlining ONNX local functions (`ModelProto.functions`): jax2onnx's `@onnx_function`, and any
//! exporter that writes a module as a function, put a whole encoder inside one node. Everything
//! downstream (shape facts, gradients, parameter selection) works on plain graphs, so the calls
//! of the main graph are replaced by their bodies first.
//!
//! Naming: a tensor `t` made inside a function called by the node `N` becomes `N/t` (the
//! function's inputs and outputs take the call's names), a body node `n` becomes `N/n`, and
//! every inlined node records the call path in its metadata (`dagr.function_call`: `N`, or
//! `N/M` for a call nested in a function), which the scope conventions read as a module path.
//!
//! A local function cannot hold initializers, so exporters write the weights they close over as
//! `Constant` nodes in the body; on inlining, a float `Constant` becomes an initializer of the
//! graph (`N/t`), where the parameter rules treat it as any other initializer.

use crate::error::{Error, Result};
use crate::io::Model;
use crate::proto::{AttributeProto, FunctionProto, GraphProto, NodeProto, StringStringEntryProto, TensorProto};
use std::collections::{HashMap, HashSet};

/// The metadata key naming the call path of an inlined node.
pub const CALL_KEY: &str = "dagr.function_call";

/// Calls nested deeper than this are refused (a function calling itself, directly or not).
const MAX_DEPTH: usize = 32;

/// Replace every call of a local function in the main graph by the function's body, repeatedly
/// (bodies may call other functions); drop the functions and the opset imports no node uses
/// anymore. Returns the number of calls inlined.
pub fn inline_local_functions(model: &mut Model) -> Result<usize> {
    if model.proto.functions.is_empty() {
        return Ok(0);
    }
    let functions: HashMap<(String, String), FunctionProto> = model
        .proto
        .functions
        .iter()
        .map(|f| ((f.domain.clone(), f.name.clone()), f.clone()))
        .collect();
    let opset = model.opset();
    for f in functions.values() {
        let own = f
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version);
        if let Some(v) = own {
            if v != opset {
                return Err(Error::InvalidModel(format!(
                    "the local function '{}' uses ONNX opset {v} and the model opset {opset}; inlining it would change what its operators mean\n  hint: export the model with one opset (or convert the model with onnx.version_converter after inlining with onnx.inliner)",
                    f.name
                )));
            }
        }
    }
    let mut total = 0;
    for depth in 0.. {
        let g = model.graph_mut();
        let calls = g
            .node
            .iter()
            .filter(|n| functions.contains_key(&(n.domain.clone(), n.op_type.clone())))
            .count();
        if calls == 0 {
            break;
        }
        if depth >= MAX_DEPTH {
            return Err(Error::InvalidModel(format!(
                "local functions call each other more than {MAX_DEPTH} deep (a recursive function?); cannot inline them"
            )));
        }
        let taken = defined_names(g);
        let mut nodes = Vec::with_capacity(g.node.len());
        let mut initializers = Vec::new();
        for (k, call) in std::mem::take(&mut g.node).into_iter().enumerate() {
            let Some(f) = functions.get(&(call.domain.clone(), call.op_type.clone())) else {
                nodes.push(call);
                continue;
            };
            let prefix = if call.name.is_empty() {
                format!("{}_{k}", call.op_type)
            } else {
                call.name.clone()
            };
            expand(f, &call, &prefix, &taken, &mut nodes, &mut initializers)?;
            total += 1;
        }
        g.node = nodes;
        g.initializer.extend(initializers);
    }
    model.proto.functions.clear();
    let used: HashSet<String> = model.graph().node.iter().map(|n| n.domain.clone()).collect();
    model
        .proto
        .opset_import
        .retain(|o| o.domain.is_empty() || o.domain == "ai.onnx" || used.contains(&o.domain));
    Ok(total)
}

/// The body of `f` as called by `call`, appended to `nodes` (float constants to `initializers`).
fn expand(
    f: &FunctionProto,
    call: &NodeProto,
    prefix: &str,
    taken: &HashSet<String>,
    nodes: &mut Vec<NodeProto>,
    initializers: &mut Vec<TensorProto>,
) -> Result<()> {
    let mut rename: HashMap<String, String> = HashMap::new();
    for (k, i) in f.input.iter().enumerate() {
        rename.insert(i.clone(), call.input.get(k).cloned().unwrap_or_default());
    }
    for (k, o) in f.output.iter().enumerate() {
        rename.insert(o.clone(), call.output.get(k).cloned().unwrap_or_default());
    }
    for n in &f.node {
        for o in &n.output {
            if !o.is_empty() && !rename.contains_key(o) {
                let new = format!("{prefix}/{o}");
                if taken.contains(&new) {
                    return Err(Error::InvalidModel(format!(
                        "inlining the call '{prefix}' of the local function '{}' would create the tensor '{new}', which the graph already has",
                        f.name
                    )));
                }
                rename.insert(o.clone(), new);
            }
        }
    }
    let call_path = call
        .metadata_props
        .iter()
        .find(|p| p.key == CALL_KEY)
        .map(|p| format!("{}/{prefix}", p.value))
        .unwrap_or_else(|| prefix.to_string());
    // Attributes the call sets, then the function's defaults, for `ref_attr_name` references.
    let mut attrs: HashMap<&str, &AttributeProto> = f.attribute_proto.iter().map(|a| (a.name.as_str(), a)).collect();
    for a in &call.attribute {
        attrs.insert(a.name.as_str(), a);
    }
    // What the body reads (its subgraphs' captures too) and returns: a Constant outside both is
    // dead code (jax2onnx leaves a kernel's HWIO original beside its OIHW transpose), dropped
    // rather than made an initializer nothing reads.
    let live: HashSet<String> = f
        .node
        .iter()
        .flat_map(crate::index::node_reads)
        .chain(f.output.iter().cloned())
        .collect();
    for n in &f.node {
        if n.op_type == "Constant" && n.output.iter().all(|o| !live.contains(o)) {
            continue;
        }
        let mut n = n.clone();
        let mut resolved = Vec::with_capacity(n.attribute.len());
        for a in n.attribute.drain(..) {
            if a.ref_attr_name.is_empty() {
                resolved.push(a);
            } else if let Some(v) = attrs.get(a.ref_attr_name.as_str()) {
                let mut v = (*v).clone();
                v.name = a.name.clone();
                resolved.push(v);
            }
            // A reference to an attribute the call does not set and that has no default: the
            // attribute is absent, as the ONNX spec says.
        }
        n.attribute = resolved;
        for i in n.input.iter_mut() {
            if let Some(r) = rename.get(i.as_str()) {
                *i = r.clone();
            }
        }
        for o in n.output.iter_mut() {
            if let Some(r) = rename.get(o.as_str()) {
                *o = r.clone();
            }
        }
        for a in n.attribute.iter_mut() {
            if let Some(g) = a.g.as_mut() {
                rename_captures(g, &rename);
            }
            for g in a.graphs.iter_mut() {
                rename_captures(g, &rename);
            }
        }
        if let Some(t) = float_constant(&n) {
            let mut t = t.clone();
            t.name = n.output[0].clone();
            initializers.push(t);
            continue;
        }
        n.name = format!("{prefix}/{}", n.name);
        let mut p = StringStringEntryProto::new();
        p.key = CALL_KEY.to_string();
        p.value = call_path.clone();
        n.metadata_props.retain(|p| p.key != CALL_KEY);
        n.metadata_props.push(p);
        nodes.push(n);
    }
    Ok(())
}

/// The value of a `Constant` node holding a float tensor.
fn float_constant(n: &NodeProto) -> Option<&TensorProto> {
    if n.op_type != "Constant" || !(n.domain.is_empty() || n.domain == "ai.onnx") || n.output.len() != 1 {
        return None;
    }
    let a = n.attribute.iter().find(|a| a.name == "value")?;
    let t = a.t.as_ref()?;
    crate::dtype::is_float(t.data_type).then_some(t)
}

/// Rename the outer-scope tensors a subgraph reads (names the subgraph does not define itself).
fn rename_captures(g: &mut GraphProto, rename: &HashMap<String, String>) {
    let own = defined_names(g);
    for n in g.node.iter_mut() {
        for i in n.input.iter_mut() {
            if !own.contains(i.as_str()) {
                if let Some(r) = rename.get(i.as_str()) {
                    *i = r.clone();
                }
            }
        }
        for a in n.attribute.iter_mut() {
            if let Some(sub) = a.g.as_mut() {
                rename_captures(sub, rename);
            }
            for sub in a.graphs.iter_mut() {
                rename_captures(sub, rename);
            }
        }
    }
    for o in g.output.iter_mut() {
        if !own.contains(o.name.as_str()) {
            if let Some(r) = rename.get(o.name.as_str()) {
                o.name = r.clone();
            }
        }
    }
}

/// Every tensor name a graph defines: node outputs, inputs, initializers.
fn defined_names(g: &GraphProto) -> HashSet<String> {
    g.node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.input.iter().map(|i| i.name.clone()))
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .collect()
}
