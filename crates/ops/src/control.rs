//! Control flow and quantization: If differentiated through its branches (a condition known at
//! build time is folded before, `dagr-core`'s portable pass); Loop, Scan and quantization have
//! inference only.

use crate::ctx::{body_value_info, Ctx, SubgraphGrads};
use crate::Kind::{NoRule, Subgraph};
use crate::{op, Op};
use dagr_onnx::builder::{attr_graph, attr_tensor, Builder};
use dagr_onnx::builder::{attr_int, attr_ints};
use dagr_onnx::error::Error;
use dagr_onnx::proto::{GraphProto, NodeProto};
use dagr_onnx::{dtype, tensor, ValueFact};
use std::collections::HashSet;

/// This family's operators, each one entry: name, the first schema version covered, shape
/// inference, gradient, formula.
pub(crate) static OPS: &[Op] = &[
    op(
        "DequantizeLinear",
        10,
        Some(shapes::dequantize),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
    op(
        "If",
        1,
        Some(shapes::if_),
        Subgraph(if_),
        "dX = If(cond, VJP of then_branch, VJP of else_branch) for each outer X a branch reads (zeros where it does not)",
    ),
    op(
        "Loop",
        1,
        Some(shapes::loop_),
        Subgraph(loop_),
        "a Loop recomputing the states before each iteration, then a Loop over the iterations in reverse whose body is the body differentiated: dstate carried, captured gradients summed",
    ),
    op(
        "NonMaxSuppression",
        10,
        Some(shapes::non_max_suppression),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
    op(
        "QuantizeLinear",
        10,
        Some(shapes::quantize),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
    op(
        "Scan",
        9,
        Some(shapes::scan),
        Subgraph(scan),
        "a forward Scan recomputing the states before each step, then a backward Scan in reverse whose body is the body differentiated: dstate carried, captured gradients summed, dX scanned",
    ),
];

/// If on a condition known only at run time: the gradient is an If on the same condition whose
/// branches are the vector-Jacobian products of the forward branches, for every outer tensor
/// (`captured`) either branch reads. Each backward branch recomputes its forward branch (its
/// names renamed fresh) and the engine differentiates it from the If's output gradients; a
/// tensor a branch does not differentiate gets zeros there.
pub fn if_(c: &mut Ctx, g: &[Option<String>], need: &[bool], captured: &[String]) -> Result<SubgraphGrads, Error> {
    let cond = c.input(0).to_string();
    let mut branches = Vec::new();
    for name in ["then_branch", "else_branch"] {
        let body = subgraph(c, name)?;
        branches.push(branch_vjp(c, &body, name, g, captured)?);
    }
    let h = c.hint();
    let else_branch = branches.pop().unwrap_or_default();
    let then_branch = branches.pop().unwrap_or_default();
    let outs = c.b.node_n(
        "If",
        &[&cond],
        captured.len(),
        vec![
            attr_graph("then_branch", then_branch),
            attr_graph("else_branch", else_branch),
        ],
        &h,
    );
    Ok((vec![None; need.len()], outs.into_iter().map(Some).collect()))
}

/// One backward branch: the forward branch recomputed under fresh names, differentiated from
/// the If's output gradients `g` for the `captured` tensors, one output per captured tensor.
fn branch_vjp(
    c: &mut Ctx,
    body: &GraphProto,
    which: &str,
    g: &[Option<String>],
    captured: &[String],
) -> Result<GraphProto, Error> {
    let mut bb = c.body_builder();
    // The branch under fresh names (the backward If is another scope, but names must stay
    // unique in the whole model).
    let rename = bb.inline_body(body, &format!("{}grad/if/{which}", c.b.prefix));
    let rn = |s: &String| rename.get(s).cloned().unwrap_or_else(|| s.clone());
    let range = (0..bb.nodes.len(), 0..bb.initializers.len());
    // The branch's outer reads, with their facts: the inputs of the graph the engine indexes.
    let mut inputs: Vec<(String, ValueFact)> = Vec::new();
    outer_facts(c, &bb.nodes, &rename, &mut inputs)?;
    let seeds: Vec<(String, String)> = body
        .output
        .iter()
        .zip(g)
        .filter_map(|(o, gk)| Some((rn(&o.name), gk.clone()?)))
        .collect();
    let reads: HashSet<&String> = inputs
        .iter()
        .map(|(x, _)| x)
        .chain(seeds.iter().map(|(y, _)| y))
        .collect();
    let wrt: Vec<String> = captured.iter().filter(|x| reads.contains(x)).cloned().collect();
    let label = format!("the {which} of If node '{}'", c.node.name);
    let mut grads = c.engine(&label)?(c.model, c.idx, &mut bb, &label, &inputs, range, &seeds, &wrt)?;
    // One output per captured tensor: its gradient, or zeros shaped like it.
    let mut out = GraphProto::new();
    out.name = bb.names.fresh(&format!("{}grad/if/{which}", c.b.prefix));
    for x in captured {
        let fact = c.idx.fact(x).cloned().unwrap_or_default();
        let elem = if dtype::is_float(fact.dtype) {
            fact.dtype
        } else {
            dtype::FLOAT
        };
        let value = match grads.remove(x) {
            Some(gx) => gx,
            None => zeros_like(&mut bb, x, elem),
        };
        // A subgraph's outputs are its own tensors (a gradient may be an outer name itself).
        let y = bb.op("Identity", &[&value], vec![], "grad/if");
        out.output.push(body_value_info(
            &y,
            &ValueFact {
                dtype: elem,
                shape: fact.shape,
            },
        ));
    }
    prune_unused(&mut bb, &out);
    c.b.names = bb.names.clone();
    out.node = bb.nodes;
    out.initializer = bb.initializers;
    Ok(out)
}

/// Scan (opset 9 on): each scan input and output moved to axis 0 and read forward
/// (`to_forward`), a forward Scan over the same body recomputes the states before each step, then a backward Scan, in reverse, runs the body
/// again on each step's states and slices and differentiates it (the engine), carrying the
/// state gradients and the sums of the captured tensors' gradients, and scanning out the
/// gradients of the scan inputs' slices.
pub fn scan(c: &mut Ctx, g: &[Option<String>], need: &[bool], captured: &[String]) -> Result<SubgraphGrads, Error> {
    let body = subgraph(c, "body")?;
    let m = c.attr_i("num_scan_inputs", 0).max(0) as usize;
    let inputs: Vec<String> = c.node.input.clone();
    let n = inputs
        .len()
        .checked_sub(m)
        .filter(|&n| body.input.len() == n + m && body.output.len() >= n && c.node.output.len() == body.output.len())
        .ok_or_else(|| c.err("its body's inputs and outputs do not match its own"))?;
    if inputs.iter().any(String::is_empty) {
        return Err(c.err("it has an empty input"));
    }
    let k = body.output.len() - n;
    // Each scan input and output as a forward scan along axis 0 would read or write it: moved
    // to the front and reversed where the node says so (`to_forward`), and back (`from_forward`,
    // also the adjoint of `to_forward`).
    let axes_of = |c: &Ctx, name: &str, len: usize| c.attr_ints(name).unwrap_or_else(|| vec![0; len]);
    let (in_axes, in_dirs) = (axes_of(c, "scan_input_axes", m), axes_of(c, "scan_input_directions", m));
    let (out_axes, out_dirs) = (
        axes_of(c, "scan_output_axes", k),
        axes_of(c, "scan_output_directions", k),
    );
    if in_axes.len() != m || in_dirs.len() != m || out_axes.len() != k || out_dirs.len() != k {
        return Err(c.err("its scan axes or directions do not match its scan inputs and outputs"));
    }
    let mut in_map = Vec::new();
    for j in 0..m {
        let r = c.rank(&inputs[n + j])?;
        in_map.push((crate::ctx::norm_axis(in_axes[j], r), r, in_dirs[j] == 1));
    }
    let mut out_map = Vec::new();
    for j in 0..k {
        let r = c.rank(&c.node.output[n + j].clone())?;
        out_map.push((crate::ctx::norm_axis(out_axes[j], r), r, out_dirs[j] == 1));
    }
    let xs: Vec<String> = (0..m)
        .map(|j| {
            let (a, r, rev) = in_map[j];
            to_forward(c, &inputs[n + j], a, r, rev)
        })
        .collect();
    let is_float = |c: &Ctx, t: &str| c.idx.fact(t).is_some_and(|f| dtype::is_float(f.dtype));
    // A slice's fact: the sequence's without its scan axis.
    let slice_fact = |f: ValueFact, axis: usize| ValueFact {
        dtype: f.dtype,
        shape: f.shape.map(|s| {
            s.into_iter()
                .enumerate()
                .filter(|(d, _)| *d != axis)
                .map(|(_, v)| v)
                .collect()
        }),
    };
    let vi = body_value_info;
    let h = c.hint();

    // 1. The states before each step: the body again, outputting its state inputs as well.
    let pf = format!("{}grad/scan/forward", c.b.prefix);
    let (mut fb, fwd_in, rn) = body_copy(c, &body, &pf);
    let name_of =
        |rn: &std::collections::HashMap<String, String>, s: &str| rn.get(s).cloned().unwrap_or_else(|| s.to_string());
    let mut fwd = GraphProto::new();
    fwd.name = fb.names.fresh(&pf);
    for (i, x) in fwd_in.iter().enumerate() {
        let f = if i < n {
            fact_of(c, &inputs[i])?
        } else {
            slice_fact(fact_of(c, &inputs[i])?, in_map[i - n].0)
        };
        fwd.input.push(vi(x, &f));
    }
    for (i, o) in body.output.iter().take(n).enumerate() {
        let y = fb.op("Identity", &[&name_of(&rn, &o.name)], vec![], "grad/scan/next");
        fwd.output.push(vi(&y, &fact_of(c, &inputs[i])?));
    }
    for (i, x) in fwd_in.iter().take(n).enumerate() {
        let y = fb.op("Identity", &[x], vec![], "grad/scan/before");
        fwd.output.push(vi(&y, &fact_of(c, &inputs[i])?));
    }
    c.b.names = fb.names.clone();
    fwd.node = fb.nodes;
    fwd.initializer = fb.initializers;
    let refs: Vec<&str> = inputs[..n].iter().chain(&xs).map(String::as_str).collect();
    let outs = c.b.node_n(
        "Scan",
        &refs,
        2 * n,
        vec![attr_graph("body", fwd), attr_int("num_scan_inputs", m as i64)],
        &h,
    );
    let before: Vec<String> = outs[n..].to_vec();

    // 2. The backward body: carried state gradients (float states) and captured sums; scanned
    // the states before the step, the slices, the output gradients (float scan outputs).
    let float_states: Vec<usize> = (0..n).filter(|&i| is_float(c, &inputs[i])).collect();
    let float_outs: Vec<usize> = (0..k).filter(|&j| is_float(c, &c.node.output[n + j])).collect();
    let mut bb = c.body_builder();
    let p = format!("{}grad/scan/backward", c.b.prefix);
    let ds_in: Vec<String> = float_states
        .iter()
        .map(|_| bb.names.fresh(&format!("{p}/dstate")))
        .collect();
    let dw_in: Vec<String> = captured
        .iter()
        .map(|_| bb.names.fresh(&format!("{p}/dcaptured")))
        .collect();
    let s_t: Vec<String> = (0..n).map(|_| bb.names.fresh(&format!("{p}/state"))).collect();
    let x_t: Vec<String> = (0..m).map(|_| bb.names.fresh(&format!("{p}/slice"))).collect();
    let gy_t: Vec<String> = float_outs
        .iter()
        .map(|_| bb.names.fresh(&format!("{p}/doutput")))
        .collect();
    let bound: std::collections::HashMap<String, String> = body
        .input
        .iter()
        .map(|x| x.name.clone())
        .zip(s_t.iter().chain(&x_t).cloned())
        .collect();
    let rn = bb.inline_body_as(&body, &p, bound);
    let range = (0..bb.nodes.len(), 0..bb.initializers.len());
    let mut facts: Vec<(String, ValueFact)> = Vec::new();
    for (i, t) in s_t.iter().enumerate() {
        facts.push((t.clone(), fact_of(c, &inputs[i])?));
    }
    for (j, t) in x_t.iter().enumerate() {
        facts.push((t.clone(), slice_fact(fact_of(c, &inputs[n + j])?, in_map[j].0)));
    }
    outer_facts(c, &bb.nodes, &rn, &mut facts)?;
    let mut seeds = Vec::new();
    for (a, &i) in float_states.iter().enumerate() {
        seeds.push((name_of(&rn, &body.output[i].name), ds_in[a].clone()));
    }
    for (a, &j) in float_outs.iter().enumerate() {
        seeds.push((name_of(&rn, &body.output[n + j].name), gy_t[a].clone()));
    }
    let mut wrt: Vec<String> = float_states.iter().map(|&i| s_t[i].clone()).collect();
    wrt.extend((0..m).filter(|&j| is_float(c, &inputs[n + j])).map(|j| x_t[j].clone()));
    wrt.extend(captured.iter().cloned());
    let label = format!("the body of Scan node '{}' (one step)", c.node.name);
    let mut grads = c.engine(&label)?(c.model, c.idx, &mut bb, &label, &facts, range, &seeds, &wrt)?;
    let mut bg = GraphProto::new();
    bg.name = bb.names.fresh(&format!("{p}/step"));
    let states: Vec<(&str, &str, &str)> = float_states
        .iter()
        .zip(&ds_in)
        .map(|(&i, d)| (inputs[i].as_str(), s_t[i].as_str(), d.as_str()))
        .collect();
    let mut outs_b = carried_grads(c, &mut bb, &mut bg, &mut grads, &states, captured, &dw_in)?;
    for (i, t) in s_t.iter().enumerate() {
        bg.input.push(vi(t, &fact_of(c, &inputs[i])?));
    }
    for (j, t) in x_t.iter().enumerate() {
        bg.input
            .push(vi(t, &slice_fact(fact_of(c, &inputs[n + j])?, in_map[j].0)));
    }
    for (a, &j) in float_outs.iter().enumerate() {
        bg.input.push(vi(
            &gy_t[a],
            &slice_fact(fact_of(c, &c.node.output[n + j])?, out_map[j].0),
        ));
    }
    let float_xs: Vec<usize> = (0..m).filter(|&j| is_float(c, &inputs[n + j])).collect();
    for &j in &float_xs {
        let f = slice_fact(fact_of(c, &inputs[n + j])?, in_map[j].0);
        let d = grads
            .remove(&x_t[j])
            .unwrap_or_else(|| zeros_like(&mut bb, &x_t[j], f.dtype));
        outs_b.push((bb.op("Identity", &[&d], vec![], "grad/scan"), f));
    }
    for (y, f) in &outs_b {
        bg.output.push(vi(y, f));
    }
    prune_unused(&mut bb, &bg);
    c.b.names = bb.names.clone();
    bg.node = bb.nodes;
    bg.initializer = bb.initializers;

    // 3. The backward Scan, in reverse.
    let mut init: Vec<String> = Vec::new();
    for &i in &float_states {
        init.push(match g.get(i).cloned().flatten() {
            Some(gi) => gi,
            None => c.zeros_like(&inputs[i]),
        });
    }
    for w in captured {
        init.push(c.zeros_like(w));
    }
    let mut scans: Vec<String> = before;
    scans.extend(xs.iter().cloned());
    for &j in &float_outs {
        let gy = match g.get(n + j).cloned().flatten() {
            Some(gy) => gy,
            None => c.zeros_like(&c.node.output[n + j].clone()),
        };
        let (a, r, rev) = out_map[j];
        scans.push(to_forward(c, &gy, a, r, rev));
    }
    let ins: Vec<&str> = init.iter().chain(&scans).map(String::as_str).collect();
    let (n_carried, n_scan_out) = (init.len(), float_xs.len());
    let outs = c.b.node_n(
        "Scan",
        &ins,
        n_carried + n_scan_out,
        vec![
            attr_graph("body", bg),
            attr_int("num_scan_inputs", scans.len() as i64),
            attr_ints("scan_input_directions", &vec![1; scans.len()]),
            attr_ints("scan_output_directions", &vec![1; n_scan_out]),
        ],
        &h,
    );
    let mut grads_in = vec![None; need.len()];
    for (a, &i) in float_states.iter().enumerate() {
        if need.get(i).copied().unwrap_or(false) {
            grads_in[i] = Some(outs[a].clone());
        }
    }
    for (a, &j) in float_xs.iter().enumerate() {
        if need.get(n + j).copied().unwrap_or(false) {
            let (ax, r, rev) = in_map[j];
            grads_in[n + j] = Some(from_forward(c, &outs[n_carried + a].clone(), ax, r, rev));
        }
    }
    let grads_cap = (0..captured.len())
        .map(|a| Some(outs[float_states.len() + a].clone()))
        .collect();
    Ok((grads_in, grads_cap))
}

/// Loop: a Loop like the node's (same trip count and condition) recomputes the states before
/// each iteration, as scan outputs; their length is the number of iterations run, T. Then a
/// Loop of T iterations runs the body again on iteration T-1-t's states (with the iteration
/// number it had, its condition input true as every run iteration's was) and differentiates it,
/// carrying the state gradients and the sums of the captured tensors' gradients, the scan
/// outputs' gradients read at that iteration.
pub fn loop_(c: &mut Ctx, g: &[Option<String>], need: &[bool], captured: &[String]) -> Result<SubgraphGrads, Error> {
    let body = subgraph(c, "body")?;
    let inputs: Vec<String> = c.node.input.clone();
    let n = inputs
        .len()
        .checked_sub(2)
        .filter(|&n| body.input.len() == n + 2 && body.output.len() > n && c.node.output.len() + 1 == body.output.len())
        .ok_or_else(|| c.err("its body's inputs and outputs do not match its own"))?;
    if inputs[2..].iter().any(String::is_empty) {
        return Err(c.err("it has an empty loop-carried input"));
    }
    let k = body.output.len() - 1 - n;
    let is_float = |c: &Ctx, t: &str| c.idx.fact(t).is_some_and(|f| dtype::is_float(f.dtype));
    let scalar = |d: i32| ValueFact::new(d, vec![]);
    let h = c.hint();
    let name_of =
        |rn: &std::collections::HashMap<String, String>, s: &str| rn.get(s).cloned().unwrap_or_else(|| s.to_string());

    // 1. The states before each iteration, and the iteration numbers (their count is T).
    let pf = format!("{}grad/loop/forward", c.b.prefix);
    let (mut fb, fwd_in, rn) = body_copy(c, &body, &pf);
    let mut fwd = GraphProto::new();
    fwd.name = fb.names.fresh(&pf);
    fwd.input.push(body_value_info(&fwd_in[0], &scalar(dtype::INT64)));
    fwd.input.push(body_value_info(&fwd_in[1], &scalar(dtype::BOOL)));
    for i in 0..n {
        fwd.input
            .push(body_value_info(&fwd_in[2 + i], &fact_of(c, &inputs[2 + i])?));
    }
    let cond_out = fb.op(
        "Identity",
        &[&name_of(&rn, &body.output[0].name)],
        vec![],
        "grad/loop/cond",
    );
    fwd.output.push(body_value_info(&cond_out, &scalar(dtype::BOOL)));
    for i in 0..n {
        let y = fb.op(
            "Identity",
            &[&name_of(&rn, &body.output[1 + i].name)],
            vec![],
            "grad/loop/next",
        );
        fwd.output.push(body_value_info(&y, &fact_of(c, &inputs[2 + i])?));
    }
    let it = fb.op("Identity", &[&fwd_in[0]], vec![], "grad/loop/iteration");
    fwd.output.push(body_value_info(&it, &scalar(dtype::INT64)));
    for i in 0..n {
        let y = fb.op("Identity", &[&fwd_in[2 + i]], vec![], "grad/loop/before");
        fwd.output.push(body_value_info(&y, &fact_of(c, &inputs[2 + i])?));
    }
    prune_unused(&mut fb, &fwd);
    c.b.names = fb.names.clone();
    fwd.node = fb.nodes;
    fwd.initializer = fb.initializers;
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let outs = c.b.node_n("Loop", &refs, 2 * n + 1, vec![attr_graph("body", fwd)], &h);
    let iterations = outs[n].clone();
    let before: Vec<String> = outs[n + 1..].to_vec();
    let shape = c.op("Shape", &[&iterations]);
    let t = c.op_a("Squeeze", &[&shape], vec![]);
    let one = c.b.scalar_i64(1);
    let last = c.op("Sub", &[&t, &one]);

    // 2. The backward body: iteration t runs the forward iteration last - t.
    let float_states: Vec<usize> = (0..n).filter(|&i| is_float(c, &inputs[2 + i])).collect();
    let float_outs: Vec<usize> = (0..k).filter(|&j| is_float(c, &c.node.output[n + j])).collect();
    let mut gys = Vec::new();
    for &j in &float_outs {
        gys.push(match g.get(n + j).cloned().flatten() {
            Some(gy) => gy,
            None => c.zeros_like(&c.node.output[n + j].clone()),
        });
    }
    let mut bb = c.body_builder();
    let p = format!("{}grad/loop/backward", c.b.prefix);
    let it_b = bb.names.fresh(&format!("{p}/iteration"));
    let cond_b = bb.names.fresh(&format!("{p}/cond"));
    let ds_in: Vec<String> = float_states
        .iter()
        .map(|_| bb.names.fresh(&format!("{p}/dstate")))
        .collect();
    let dw_in: Vec<String> = captured
        .iter()
        .map(|_| bb.names.fresh(&format!("{p}/dcaptured")))
        .collect();
    let idx = bb.op("Sub", &[&last, &it_b], vec![], "grad/loop");
    let gather = |bb: &mut Builder, seq: &str| bb.op("Gather", &[seq, &idx], vec![attr_int("axis", 0)], "grad/loop");
    let s_t: Vec<String> = before.iter().map(|s| gather(&mut bb, s)).collect();
    let gy_t: Vec<String> = gys.iter().map(|s| gather(&mut bb, s)).collect();
    let mut t_true = tensor::i64_tensor("", &[], &[]);
    t_true.data_type = dtype::BOOL;
    t_true.raw_data = vec![1];
    let yes = bb.op("Constant", &[], vec![attr_tensor("value", t_true)], "grad/loop/true");
    let (n0, i0) = (bb.nodes.len(), bb.initializers.len());
    let bound: std::collections::HashMap<String, String> = body
        .input
        .iter()
        .map(|x| x.name.clone())
        .zip([idx.clone(), yes.clone()].into_iter().chain(s_t.iter().cloned()))
        .collect();
    let rn = bb.inline_body_as(&body, &p, bound);
    let range = (n0..bb.nodes.len(), i0..bb.initializers.len());
    let mut facts: Vec<(String, ValueFact)> =
        vec![(idx.clone(), scalar(dtype::INT64)), (yes.clone(), scalar(dtype::BOOL))];
    for (i, st) in s_t.iter().enumerate() {
        facts.push((st.clone(), fact_of(c, &inputs[2 + i])?));
    }
    outer_facts(c, &bb.nodes[n0..], &rn, &mut facts)?;
    let mut seeds = Vec::new();
    for (a, &i) in float_states.iter().enumerate() {
        seeds.push((name_of(&rn, &body.output[1 + i].name), ds_in[a].clone()));
    }
    for (a, &j) in float_outs.iter().enumerate() {
        seeds.push((name_of(&rn, &body.output[1 + n + j].name), gy_t[a].clone()));
    }
    let mut wrt: Vec<String> = float_states.iter().map(|&i| s_t[i].clone()).collect();
    wrt.extend(captured.iter().cloned());
    let label = format!("the body of Loop node '{}' (one iteration)", c.node.name);
    let mut grads = c.engine(&label)?(c.model, c.idx, &mut bb, &label, &facts, range, &seeds, &wrt)?;
    let mut bg = GraphProto::new();
    bg.name = bb.names.fresh(&format!("{p}/iteration"));
    bg.input.push(body_value_info(&it_b, &scalar(dtype::INT64)));
    bg.input.push(body_value_info(&cond_b, &scalar(dtype::BOOL)));
    let cond_next = bb.op("Identity", &[&cond_b], vec![], "grad/loop");
    let mut outs_b: Vec<(String, ValueFact)> = vec![(cond_next, scalar(dtype::BOOL))];
    let states: Vec<(&str, &str, &str)> = float_states
        .iter()
        .zip(&ds_in)
        .map(|(&i, d)| (inputs[2 + i].as_str(), s_t[i].as_str(), d.as_str()))
        .collect();
    outs_b.extend(carried_grads(
        c, &mut bb, &mut bg, &mut grads, &states, captured, &dw_in,
    )?);
    for (y, f) in &outs_b {
        bg.output.push(body_value_info(y, f));
    }
    prune_unused(&mut bb, &bg);
    c.b.names = bb.names.clone();
    bg.node = bb.nodes;
    bg.initializer = bb.initializers;

    // 3. The backward Loop: T iterations.
    let mut init: Vec<String> = Vec::new();
    for &i in &float_states {
        init.push(match g.get(i).cloned().flatten() {
            Some(gi) => gi,
            None => c.zeros_like(&inputs[2 + i]),
        });
    }
    for w in captured {
        init.push(c.zeros_like(w));
    }
    let ins: Vec<&str> = [t.as_str(), ""]
        .into_iter()
        .chain(init.iter().map(String::as_str))
        .collect();
    let outs = c.b.node_n("Loop", &ins, init.len(), vec![attr_graph("body", bg)], &h);
    let mut grads_in = vec![None; need.len()];
    for (a, &i) in float_states.iter().enumerate() {
        if need.get(2 + i).copied().unwrap_or(false) {
            grads_in[2 + i] = Some(outs[a].clone());
        }
    }
    let grads_cap = (0..captured.len())
        .map(|a| Some(outs[float_states.len() + a].clone()))
        .collect();
    Ok((grads_in, grads_cap))
}

/// `x` as a forward scan along axis 0 reads it: `axis` moved to the front, then reversed along
/// it where `reverse`.
fn to_forward(c: &mut Ctx, x: &str, axis: usize, rank: usize, reverse: bool) -> String {
    let mut t = x.to_string();
    if axis != 0 {
        let perm: Vec<i64> = std::iter::once(axis)
            .chain((0..rank).filter(|&d| d != axis))
            .map(|d| d as i64)
            .collect();
        t = c.op_a("Transpose", &[&t], vec![attr_ints("perm", &perm)]);
    }
    if reverse {
        t = reverse_front(c, &t);
    }
    t
}

/// The inverse of `to_forward`, which is also its adjoint (a permutation of elements).
fn from_forward(c: &mut Ctx, x: &str, axis: usize, rank: usize, reverse: bool) -> String {
    let mut t = x.to_string();
    if reverse {
        t = reverse_front(c, &t);
    }
    if axis != 0 {
        let perm: Vec<i64> = (0..rank)
            .map(|d| match d.cmp(&axis) {
                std::cmp::Ordering::Less => d + 1,
                std::cmp::Ordering::Equal => 0,
                std::cmp::Ordering::Greater => d,
            } as i64)
            .collect();
        t = c.op_a("Transpose", &[&t], vec![attr_ints("perm", &perm)]);
    }
    t
}

/// `x` read backwards along axis 0 (a Slice of step -1).
fn reverse_front(c: &mut Ctx, x: &str) -> String {
    let (starts, ends, axes, steps) = (c.ints(&[-1]), c.ints(&[i64::MIN]), c.ints(&[0]), c.ints(&[-1]));
    c.op("Slice", &[x, &starts, &ends, &axes, &steps])
}

/// The carried part of a Scan's or Loop's backward body, its inputs added to `bg` and its
/// outputs returned: per float state `(initial value outside, its value in the step, the
/// incoming gradient)`, the gradient with respect to the state before the step; per captured
/// tensor (`sums` the running sums' inputs), the sum so far plus this step's gradient. What the
/// step's differentiation (`grads`) did not reach is zeros.
fn carried_grads(
    c: &Ctx,
    bb: &mut Builder,
    bg: &mut GraphProto,
    grads: &mut std::collections::HashMap<String, String>,
    states: &[(&str, &str, &str)],
    captured: &[String],
    sums: &[String],
) -> Result<Vec<(String, ValueFact)>, Error> {
    let mut take = |bb: &mut Builder, t: &str, elem: i32| grads.remove(t).unwrap_or_else(|| zeros_like(bb, t, elem));
    let mut outs = Vec::new();
    for &(initial, state, incoming) in states {
        let f = fact_of(c, initial)?;
        bg.input.push(body_value_info(incoming, &f));
        let d = take(bb, state, f.dtype);
        outs.push((bb.op("Identity", &[&d], vec![], "grad/carried"), f));
    }
    for (w, sum) in captured.iter().zip(sums) {
        let f = fact_of(c, w)?;
        bg.input.push(body_value_info(sum, &f));
        let gw = take(bb, w, f.dtype);
        outs.push((bb.op("Add", &[sum, &gw], vec![], "grad/carried"), f));
    }
    Ok(outs)
}

/// A builder holding a copy of a Loop's or Scan's body under fresh names, its inputs too
/// (returned, in order), and the renaming.
fn body_copy(
    c: &Ctx,
    body: &GraphProto,
    prefix: &str,
) -> (Builder, Vec<String>, std::collections::HashMap<String, String>) {
    let mut b = c.body_builder();
    let inputs: Vec<String> = body
        .input
        .iter()
        .map(|x| b.names.fresh(&format!("{prefix}/{}", x.name)))
        .collect();
    let bound = body
        .input
        .iter()
        .map(|x| x.name.clone())
        .zip(inputs.iter().cloned())
        .collect();
    let rename = b.inline_body_as(body, prefix, bound);
    (b, inputs, rename)
}

/// A node's subgraph attribute (an If branch, a Loop or Scan body), refused where it holds
/// subgraphs of its own.
fn subgraph(c: &Ctx, name: &str) -> Result<GraphProto, Error> {
    let g = dagr_onnx::attr::attr(c.node, name)
        .and_then(|a| a.g.as_ref())
        .ok_or_else(|| c.err(format!("it has no {name}")))?;
    if g.node
        .iter()
        .any(|n| n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()))
    {
        return Err(c.err(format!(
            "its {name} holds a subgraph of its own, which this rule does not differentiate"
        )));
    }
    Ok(g.clone())
}

/// The fact of an outer tensor a subgraph's gradient needs.
fn fact_of(c: &Ctx, t: &str) -> Result<ValueFact, Error> {
    c.idx.fact(t).cloned().ok_or_else(|| Error::ShapeUnknown {
        tensor: t.to_string(),
        context: format!(
            ", so the gradient of {} node '{}' cannot be built",
            c.node.op_type, c.node.name
        ),
    })
}

/// Add to `facts` the fact of every tensor `nodes` (a subgraph's copy, its names renamed by
/// `rename`) read from the outer scope: the inputs of the graph the engine differentiates.
fn outer_facts(
    c: &Ctx,
    nodes: &[NodeProto],
    rename: &std::collections::HashMap<String, String>,
    facts: &mut Vec<(String, ValueFact)>,
) -> Result<(), Error> {
    let local: HashSet<&String> = rename.values().collect();
    for x in nodes.iter().flat_map(|n| n.input.iter()) {
        if x.is_empty() || local.contains(x) || facts.iter().any(|(f, _)| f == x) {
            continue;
        }
        facts.push((x.clone(), fact_of(c, x)?));
    }
    Ok(())
}

/// Zeros shaped like `t` (as it is at run time), of element type `elem`: a gradient nothing
/// reached.
fn zeros_like(bb: &mut Builder, t: &str, elem: i32) -> String {
    let s = bb.op("Shape", &[t], vec![], "grad/zeros");
    let z = tensor::float_tensor("", &[1], &[0.0], elem);
    bb.op("ConstantOfShape", &[&s], vec![attr_tensor("value", z)], "grad/zeros")
}

/// Drop the nodes and initializers of a body that none of its outputs needs (the recomputed
/// forward nodes whose values the gradient does not read).
fn prune_unused(bb: &mut Builder, g: &GraphProto) {
    let mut live: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; bb.nodes.len()];
    for (k, n) in bb.nodes.iter().enumerate().rev() {
        if n.output.iter().any(|o| live.contains(o)) {
            keep[k] = true;
            live.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
        }
    }
    let mut it = keep.into_iter();
    bb.nodes.retain(|_| it.next().unwrap_or(false));
    bb.initializers.retain(|t| live.contains(&t.name));
}

/// Shape (and value) inference of this family's operators.
pub(crate) mod shapes {
    use crate::infer::axis;
    use crate::infer::Node;
    use dagr_onnx::dim::Dim;
    use dagr_onnx::dtype;
    use dagr_onnx::index::ValueFact;
    use dagr_onnx::proto::GraphProto;

    pub(crate) fn body<'a>(c: &Node<'a>, name: &str) -> Option<&'a GraphProto> {
        dagr_onnx::attr::attr(c.n, name).and_then(|a| a.g.as_ref())
    }

    /// The facts a body declares for its outputs (symbolic names there are the body's own, so
    /// only known dims are kept).
    pub(crate) fn declared(g: &GraphProto) -> Vec<Option<ValueFact>> {
        g.output
            .iter()
            .map(|v| {
                let f = v.type_.as_ref().and_then(ValueFact::from_type_proto)?;
                let shape = f.shape.map(|s| {
                    s.into_iter()
                        .map(|d| if d.known().is_some() { d } else { Dim::Unknown })
                        .collect()
                });
                Some(ValueFact { dtype: f.dtype, shape })
            })
            .collect()
    }

    /// If: each output typed as both branches agree, with the dims they agree on.
    pub(crate) fn if_(c: &mut Node) -> Option<()> {
        // Each branch's outputs inferred through its nodes from the outer facts, else as the
        // branch declares them.
        let branch = |c: &Node, name: &str| -> Option<Vec<Option<ValueFact>>> {
            let g = body(c, name)?;
            let inferred = c.infer_body(g, &[]);
            Some(
                inferred
                    .into_iter()
                    .zip(declared(g))
                    .map(|(i, d)| match (i, d) {
                        (Some(i), _) if i.shape.is_some() && i.dtype != 0 => Some(i),
                        (i, d) => d.or(i),
                    })
                    .collect(),
            )
        };
        let (t, e) = (branch(c, "then_branch")?, branch(c, "else_branch")?);
        for (o, (a, b)) in t.into_iter().zip(e).enumerate() {
            let (Some(a), Some(b)) = (a, b) else { continue };
            if a.dtype != b.dtype {
                continue;
            }
            let shape = match (a.shape, b.shape) {
                (Some(x), Some(y)) if x.len() == y.len() => Some(
                    x.into_iter()
                        .zip(y)
                        .map(|(p, q)| if p == q { p } else { Dim::Unknown })
                        .collect(),
                ),
                _ => None,
            };
            c.set(o, a.dtype, shape);
        }
        Some(())
    }

    /// Loop: the loop-carried values as the body declares them (after its condition output), the
    /// scan outputs with a leading dim of the trip count for a for-loop, of unknown length
    /// otherwise (the condition decides it at run time).
    /// The facts of a Loop's or Scan's body outputs from one step inferred on the facts its
    /// inputs have from outside (`inputs`); a carried value (the first `carried` outputs after
    /// `skip`) keeps the dims its step leaves as they were (`initial`, the value before the
    /// first step) and loses the others, which may change from step to step. Where inference
    /// knows nothing, the body's declared facts.
    fn stepped(
        c: &Node,
        g: &GraphProto,
        inputs: &[Option<ValueFact>],
        skip: usize,
        initial: &[Option<ValueFact>],
    ) -> Vec<Option<ValueFact>> {
        let inferred = c.infer_body(g, inputs);
        let declared = declared(g);
        inferred
            .into_iter()
            .zip(declared)
            .enumerate()
            .map(|(o, (i, d))| {
                let i = i.filter(|f| f.dtype != 0 && f.shape.is_some());
                let i = match (i, o.checked_sub(skip).and_then(|k| initial.get(k))) {
                    (Some(f), Some(Some(init))) => Some(ValueFact {
                        dtype: f.dtype,
                        shape: match (&f.shape, &init.shape) {
                            (Some(a), Some(b)) if a.len() == b.len() => Some(
                                a.iter()
                                    .zip(b)
                                    .map(|(x, y)| if x == y { x.clone() } else { Dim::Unknown })
                                    .collect(),
                            ),
                            _ => None,
                        },
                    }),
                    (Some(_), Some(None)) => None,
                    (i, _) => i,
                };
                i.or(d)
            })
            .collect()
    }

    pub(crate) fn loop_(c: &mut Node) -> Option<()> {
        let g = body(c, "body")?;
        let carried = c.inputs().saturating_sub(2);
        let initial: Vec<Option<ValueFact>> = (0..carried).map(|i| c.fact(2 + i).cloned()).collect();
        let mut inputs = vec![
            Some(ValueFact::new(dtype::INT64, vec![])),
            Some(ValueFact::new(dtype::BOOL, vec![])),
        ];
        inputs.extend(initial.iter().cloned());
        let outs = stepped(c, g, &inputs, 1, &initial);
        // A for-loop (the trip count known, the condition true and passed on unchanged by the
        // body, as exporters write `for i in range(n)`) runs exactly the trip count.
        let cond_in = g.input.get(1).map(|v| v.name.as_str());
        let passes_cond_on = g.output.first().is_some_and(|o| {
            Some(o.name.as_str()) == cond_in
                || g.node.iter().any(|n| {
                    n.op_type == "Identity"
                        && n.output.first() == Some(&o.name)
                        && n.input.first().map(String::as_str) == cond_in
                })
        });
        let starts_true = !c.has(1) || c.ints(1).is_some_and(|v| v == [1]);
        let trips = match c.ints(0) {
            Some(v) if passes_cond_on && starts_true && v.len() == 1 => Dim::Known(v[0].max(0)),
            _ => Dim::Unknown,
        };
        for (o, f) in outs.into_iter().skip(1).enumerate() {
            let Some(f) = f else { continue };
            let shape = if o < carried {
                f.shape
            } else {
                f.shape.map(|s| std::iter::once(trips.clone()).chain(s).collect())
            };
            c.set(o, f.dtype, shape);
        }
        Some(())
    }

    /// Scan (opset 9 on): the states as declared by the body (or as their initial values), each
    /// scan output the body's per-step fact with the scan length inserted at its axis.
    pub(crate) fn scan(c: &mut Node) -> Option<()> {
        let g = body(c, "body")?;
        let scans = c.attr_i("num_scan_inputs", 0) as usize;
        let states = c.inputs().checked_sub(scans)?;
        let in_axes = c.attr_ints("scan_input_axes").unwrap_or_else(|| vec![0; scans]);
        let initial: Vec<Option<ValueFact>> = (0..states).map(|i| c.fact(i).cloned()).collect();
        let mut inputs = initial.clone();
        for j in 0..scans {
            // A slice: the sequence without its scan axis.
            inputs.push(c.fact(states + j).map(|f| ValueFact {
                dtype: f.dtype,
                shape: f.shape.clone().and_then(|s| {
                    let a = axis(*in_axes.get(j).unwrap_or(&0), s.len())?;
                    Some(
                        s.into_iter()
                            .enumerate()
                            .filter(|(d, _)| *d != a)
                            .map(|(_, v)| v)
                            .collect(),
                    )
                }),
            }));
        }
        let outs = stepped(c, g, &inputs, 0, &initial);
        let first = c.shape(states)?;
        let len = first.get(axis(*in_axes.first().unwrap_or(&0), first.len())?)?.clone();
        let out_axes = c.attr_ints("scan_output_axes").unwrap_or_default();
        for (o, f) in outs.into_iter().enumerate() {
            if o < states {
                match f {
                    Some(f) => c.set(o, f.dtype, f.shape.or_else(|| c.shape(o))),
                    None => c.same(o, o),
                }
                continue;
            }
            let Some(f) = f else { continue };
            let shape = f.shape.and_then(|mut s| {
                let a = *out_axes.get(o - states).unwrap_or(&0);
                let a = axis(a, s.len() + 1)?;
                s.insert(a, len.clone());
                Some(s)
            });
            c.set(o, f.dtype, shape);
        }
        Some(())
    }

    /// QuantizeLinear: X's shape; the zero point's type, else `output_dtype`, else uint8.
    pub(crate) fn quantize(c: &mut Node) -> Option<()> {
        let dt = if c.has(2) {
            c.dtype(2)
        } else {
            match c.attr_i("output_dtype", 0) {
                0 => dtype::UINT8,
                d => d as i32,
            }
        };
        c.set(0, dt, c.shape(0));
        Some(())
    }

    /// DequantizeLinear: X's shape in the scale's type (or `output_dtype`).
    pub(crate) fn dequantize(c: &mut Node) -> Option<()> {
        let dt = match c.attr_i("output_dtype", 0) {
            0 => c.dtype(1),
            d => d as i32,
        };
        c.set(0, dt, c.shape(0));
        Some(())
    }

    /// NonMaxSuppression: `[selected, 3]` int64 indices.
    pub(crate) fn non_max_suppression(c: &mut Node) -> Option<()> {
        c.set(0, dtype::INT64, Some(vec![Dim::Unknown, Dim::Known(3)]));
        Some(())
    }
}

/// A subgraph of float `[2, 3]` inputs and outputs, its nodes `(op, inputs, output)`.
fn body_of(name: &str, inputs: &[&str], nodes: &[(&str, &[&str], &str)], outputs: &[&str]) -> GraphProto {
    let f23 = ValueFact::new(dtype::FLOAT, vec![dagr_onnx::Dim::Known(2), dagr_onnx::Dim::Known(3)]);
    let mut g = GraphProto::new();
    g.name = name.into();
    for i in inputs {
        g.input.push(f23.to_value_info(i));
    }
    for (op, ins, o) in nodes {
        let mut n = NodeProto::new();
        n.op_type = (*op).into();
        n.name = format!("{name}/{o}");
        n.input = ins.iter().map(|s| s.to_string()).collect();
        n.output = vec![o.to_string()];
        g.node.push(n);
    }
    for o in outputs {
        g.output.push(f23.to_value_info(o));
    }
    g
}

/// A Loop body h' = tanh(h W + i h), y = h' h' (W is `in3`, read from the outer scope), whose
/// condition output is `i < stop`, or its condition input passed on.
fn loop_body(stop: Option<i64>) -> GraphProto {
    let mut g = body_of(
        "iteration",
        &[],
        &[
            ("MatMul", &["h", "in3"], "hw"),
            ("Cast", &["i"], "fi"),
            ("Mul", &["h", "fi"], "hi"),
            ("Add", &["hw", "hi"], "pre"),
            ("Tanh", &["pre"], "h2"),
            ("Mul", &["h2", "h2"], "y"),
        ],
        &["h2", "y"],
    );
    if let Some(cast) = g.node.iter_mut().find(|n| n.op_type == "Cast") {
        cast.attribute.push(attr_int("to", dtype::FLOAT as i64));
    }
    let f23 = ValueFact::new(dtype::FLOAT, vec![dagr_onnx::Dim::Known(2), dagr_onnx::Dim::Known(3)]);
    g.input = vec![
        ValueFact::new(dtype::INT64, vec![]).to_value_info("i"),
        ValueFact::new(dtype::BOOL, vec![]).to_value_info("c"),
        f23.to_value_info("h"),
    ];
    let mut cond = NodeProto::new();
    cond.output = vec!["c2".into()];
    match stop {
        Some(stop) => {
            let mut k = NodeProto::new();
            k.op_type = "Constant".into();
            k.name = "iteration/stop".into();
            k.output = vec!["stop".into()];
            k.attribute
                .push(attr_tensor("value", tensor::i64_tensor("", &[], &[stop])));
            g.node.push(k);
            cond.op_type = "Less".into();
            cond.input = vec!["i".into(), "stop".into()];
        }
        None => {
            cond.op_type = "Identity".into();
            cond.input = vec!["c".into()];
        }
    }
    cond.name = "iteration/c2".into();
    g.node.push(cond);
    g.output
        .insert(0, ValueFact::new(dtype::BOOL, vec![]).to_value_info("c2"));
    g
}

fn branch(name: &str, nodes: &[(&str, &[&str], &str)], out: &str) -> GraphProto {
    body_of(name, &[], nodes, &[out])
}

pub fn cases() -> Vec<crate::cases::Case> {
    use crate::cases::{case, In, ORT_ONLY};
    // The branches read `in1` ([2, 3]) and `in2` ([3]) from the outer graph; the else branch
    // does not read `in2` (its gradient there is zeros) and outputs `in1` through one op.
    let branches = || {
        vec![
            attr_graph(
                "then_branch",
                branch("then", &[("Mul", &["in1", "in2"], "t0"), ("Sin", &["t0"], "t1")], "t1"),
            ),
            attr_graph("else_branch", branch("else", &[("Tanh", &["in1"], "e0")], "e0")),
        ]
    };
    let ins = |cond: bool| {
        vec![
            In::B(vec![], vec![cond]),
            In::Captured(vec![2, 3]),
            In::Captured(vec![3]),
        ]
    };
    // ONNX Runtime only: tract 0.23.9 names every If it translates "If" (`If::to_typed` wires
    // the op's name, not the node's), so a graph with two (the forward and the backward) fails
    // to load there with "Duplicate node name: If".
    // A recurrence h' = tanh(h W + x_t), y_t = h' x_t over 4 steps: the initial state `in0`, the
    // sequence `in1` ([4, 2, 3]), W (`in2`) read from the outer scope.
    let step = || {
        vec![
            attr_graph(
                "body",
                body_of(
                    "step",
                    &["h", "x"],
                    &[
                        ("MatMul", &["h", "in2"], "hw"),
                        ("Add", &["hw", "x"], "pre"),
                        ("Tanh", &["pre"], "h2"),
                        ("Mul", &["h2", "x"], "y"),
                    ],
                    &["h2", "y"],
                ),
            ),
            attr_int("num_scan_inputs", 1),
        ]
    };
    let scan_ins = || vec![In::X(vec![2, 3]), In::X(vec![4, 2, 3]), In::Captured(vec![3, 3])];
    vec![
        case("if_then", "If", ins(true)).attrs(branches()).only(ORT_ONLY),
        case("if_else", "If", ins(false)).attrs(branches()).only(ORT_ONLY),
        case("scan", "Scan", scan_ins())
            .attrs(step())
            .all_outputs(2)
            .symbolic(&[0]),
        // Only the final state in the loss: the scan output's gradient is zeros.
        case("scan_final_state", "Scan", scan_ins())
            .attrs(step())
            .outputs(2)
            .symbolic(&[0]),
        // Loops (ONNX Runtime only: tract has no Loop): 4 iterations by the trip count; and
        // by the condition, which stops after iteration 2 (3 iterations, no trip count).
        case(
            "loop_trip_count",
            "Loop",
            vec![
                In::Ints(vec![], vec![4]),
                In::B(vec![], vec![true]),
                In::X(vec![2, 3]),
                In::Captured(vec![3, 3]),
            ],
        )
        .attrs(vec![attr_graph("body", loop_body(None))])
        .all_outputs(2)
        .only(ORT_ONLY),
        case(
            "loop_condition",
            "Loop",
            vec![
                In::Absent,
                In::B(vec![], vec![true]),
                In::X(vec![2, 3]),
                In::Captured(vec![3, 3]),
            ],
        )
        .attrs(vec![attr_graph("body", loop_body(Some(2)))])
        .all_outputs(2)
        .run_time_dim(1, 0)
        .only(ORT_ONLY),
        // The sequence along axis 1 read backwards, the scan output written along axis 1
        // backwards too.
        case(
            "scan_reverse_axis_1",
            "Scan",
            vec![In::X(vec![2, 3]), In::X(vec![2, 4, 3]), In::Captured(vec![3, 3])],
        )
        .attrs({
            let mut a = step();
            a.extend([
                attr_ints("scan_input_axes", &[1]),
                attr_ints("scan_input_directions", &[1]),
                attr_ints("scan_output_axes", &[1]),
                attr_ints("scan_output_directions", &[1]),
            ]);
            a
        })
        .all_outputs(2),
    ]
}
