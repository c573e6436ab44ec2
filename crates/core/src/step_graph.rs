//! The step graph: a training graph with its optimizer folded in, so that one run is one whole
//! training step and the parameters never leave the backend.
//!
//! Inputs: the batch, every piece of state (parameters, BatchNorm running statistics, the
//! optimizer's per-parameter slots) and the optimizer's per-step scalars. Outputs: the updated
//! state, the loss and its terms, and `grad_sq`, the squared L2 norm of each parameter's
//! gradient before clipping (one float per parameter), from which the host takes the global
//! gradient norm and sees a non-finite gradient before it accepts the step. The state outputs
//! are bound back to the state inputs by `runtime::Stepper` (IoBinding on ONNX Runtime).
//!
//! Clipping by global norm happens in the graph as `torch.nn.utils.clip_grad_norm_` does it:
//! `g * min(1, max_norm / (||g|| + 1e-6))`.

use super::optim::{Optimizer, Slot};
use crate::training::TrainRecord;
use dagr_onnx::builder::{attr_int, Builder};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::state::{StateLink, StateRead};
use dagr_onnx::{dtype, Dim, Model, ValueFact};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The output holding each parameter's squared gradient norm, in `TrainRecord::params` order.
pub const GRAD_SQ: &str = "dagr/opt/grad_sq";

/// The output that checks the update: one value per state tensor, in `StepGraph::state` order:
/// 0 when every element of the updated tensor is finite, 1 otherwise. A NaN or an infinity makes
/// the tensor's sum non-finite, and the sum of finite elements scaled by 2^-64 cannot overflow
/// (2^31 elements of at most 3.4e38 * 2^-64 sum below 4e28), so `IsNaN or IsInf` of
/// `ReduceSum(x * 2^-64)` is exact: two passes over the state instead of five (`x * 0` would do
/// in exact arithmetic, but runtimes fold a product with zero away). Where the update is made
/// in place and bounded (`StepRecord::check_bounds`), 1 where its bound is not finite with a
/// margin of 4: the test refuses every update that is not finite, and also the finite ones
/// within 4x of float32's range (or whose norms overflow), without making them.
/// A slot whose non-finite update always makes its parameter's non-finite
/// (`Optimizer::checked_through_param`: SGD's momentum, Adam's first moment) is checked through
/// the parameter: its own value is a constant 0 (three nodes fewer per parameter).
/// The host refuses a step whose update is not finite before making it the state.
pub const STATE_CHECK: &str = "dagr/opt/state_check";

/// Metadata key of a step graph's `StepRecord` (it replaces the training graph's record, so
/// that a step graph is never mistaken for a training graph to build another step on).
pub const METADATA_KEY: &str = "dagr_inject.step";

/// What a step graph holds, recorded in its metadata for other runtimes and for `inspect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub optimizer: Optimizer,
    pub clip_grad_norm: Option<f64>,
    /// Every state tensor: its checkpoint key, input and updated output.
    pub state: Vec<StateLink>,
    /// The per-step scalar inputs (see `optim::scalar`).
    pub scalars: Vec<String>,
    /// The loss the step descends, and the per-parameter squared gradient norms.
    pub loss: String,
    pub grad_sq: String,
    /// The finiteness check of the update (see `STATE_CHECK`), in `state` order.
    #[serde(default)]
    pub state_check: String,
    /// Parameter names in the order of `grad_sq`.
    pub params: Vec<String>,
    /// Every node that reads a state input runs before the node that writes its output (checked
    /// on the graph by `state_written_last`), so a runtime executing nodes one at a time may
    /// bind each state output to its input's buffer: one copy of the state instead of two.
    #[serde(default)]
    pub in_place: bool,
    /// The state check of a parameter and its slots bounds the update from norms (the update is
    /// then made once, after the test; `Optimizer::emit_bounds`): 1 where the bound comes within
    /// a factor of 4 of float32's range, which an update that is finite but that large also does.
    #[serde(default)]
    pub check_bounds: bool,
}

/// Checkpoint and state keys: `param/<name>`, `bn/<name>`, `m/<name>`, `v/<name>`.
pub fn param_key(p: &str) -> String {
    format!("param/{p}")
}
pub fn bn_key(s: &str) -> String {
    format!("bn/{s}")
}
pub fn slot_key(slot: Slot, p: &str) -> String {
    format!("{}/{p}", slot.key())
}

pub struct StepGraph {
    pub model: Model,
    /// Every state tensor: its key, the input it is read from and the output of its update.
    pub state: Vec<StateLink>,
    /// The optimizer's per-step scalar inputs.
    pub scalars: Vec<&'static str>,
    /// See `StepRecord::in_place`.
    pub in_place: bool,
    /// See `StepRecord::check_bounds`.
    pub check_bounds: bool,
    /// State it only reads (an update graph's accumulated gradients; none in a whole step).
    pub reads: Vec<StateRead>,
}

/// The runtime a step graph is made for, where the fastest form of its work differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// ONNX Runtime: sums reduce every axis at once (a 9043 x 9043 matrix's L1 norm in 9.6 ms
    /// on 2 threads, against 19.5 ms over its rows first); the parts' first rows are read as
    /// `Where(accepted, start, start)`: the parts' reads wait for the acceptance test, and ONNX
    /// Runtime cannot merge them into one split of the whole (its GatherSliceToSplitFusion fuses
    /// Slices by constant bounds, which makes every part at once: the whole tensor's temporaries
    /// again).
    #[default]
    OnnxRuntime,
    /// tract: norms and checks sum each tensor's last axis first (tract sums rows on its threads,
    /// every axis of a matrix in one scalar loop, 3.5x slower: `Builder::reduce_whole`); the parts'
    /// bounds are constants (tract 0.23 cannot run a Slice by computed bounds: the symbol it
    /// gives the length dies with the optimizer's patch, "points to an invalid (dead ?)
    /// SymbolScope"; its backend orders an in-place plan output by output, each part after the
    /// test).
    Tract,
}

/// How a step graph keeps and updates the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Form {
    /// Each state output gated on the step's acceptance and made after the test, so that it can
    /// share its input's buffer (see `build`).
    pub in_place: bool,
    /// In place, each state tensor larger than this many bytes is updated in parts of rows of
    /// about that size (`StateLink::rows`): the update's temporaries are a part's, not the whole
    /// tensor's (AdamW holds three at a time). Where the optimizer's update is not bounded
    /// (`Optimizer::bounded`) the state is updated whole.
    pub part_bytes: Option<usize>,
    pub target: Target,
}

impl Form {
    /// Whole updates (in place or in two sets) for ONNX Runtime.
    pub fn whole(in_place: bool) -> Form {
        Form {
            in_place,
            ..Form::default()
        }
    }
}

/// Fold `opt` (and clipping to `clip` if given) into the training graph `train`. In place
/// (`Form::in_place`), each state output is gated (`Where(accepted, update, state)`, the update
/// made after the acceptance test, which bounds it from norms: `StepRecord::check_bounds`; where
/// the optimizer has no bound, the test makes a candidate update and the update is made a
/// second time) so that it can share its input's buffer: one copy of the state instead of two
/// (see `StepRecord::in_place` for whether the graph allows it). Without, the outputs are the
/// updates, which the host discards when it rejects the step.
pub fn build(train: &Model, rec: &TrainRecord, opt: Optimizer, clip: Option<f64>, form: Form) -> Result<StepGraph> {
    fold(train, rec, opt, clip, form, Some(&rec.loss))
}

/// `build`, the loss (if any: an update graph has none) part of the acceptance test.
fn fold(
    train: &Model,
    rec: &TrainRecord,
    opt: Optimizer,
    clip: Option<f64>,
    form: Form,
    loss: Option<&str>,
) -> Result<StepGraph> {
    let in_place = form.in_place;
    if let Some(c) = clip {
        if !(c > 0.0 && c.is_finite()) {
            return Err(Error::Config(format!(
                "`clip_grad_norm` must be a positive number, got {c}"
            )));
        }
    }
    let mut model = train.clone();
    let idx = dagr_ops::index(&model)?;
    let mut b = Builder::new(&model, "dagr/opt/");
    let fact_of = |n: &str| idx.fact(n).cloned().unwrap_or(ValueFact::new(dtype::FLOAT, vec![]));
    // The fixed names of the step graph's own inputs and outputs must be free.
    let scalars = opt.scalar_names();
    for name in scalars.iter().copied().chain([GRAD_SQ, STATE_CHECK]) {
        if b.names.fresh(name) != name {
            return Err(Error::NameTaken { name: name.to_string() });
        }
    }

    let flat_shape = b.const_i64(&[-1]);
    // Whether sums reduce a tensor's rows first (`Builder::reduce_whole`), and its rank.
    let rows_first = form.target == Target::Tract;
    let rank = |f: &ValueFact| f.shape.as_ref().map(|s| s.len());
    let grads: Vec<&str> = rec.params.iter().map(|p| p.1.as_str()).collect();
    let g_sq = per_tensor(&mut b, &grads, GRAD_SQ, |b, g| {
        b.reduce_whole("ReduceSumSquare", g, idx.fact(g).and_then(rank), rows_first, "norm")
    });
    let scale = clip.map(|c| clip_coefficient(&mut b, c));

    // Every state tensor with its candidate update (the first emission), and the output the
    // gated update goes to.
    struct Update {
        link: StateLink,
        /// None where the update is made only once, after the test (`bounded`).
        candidate: Option<String>,
        fact: ValueFact,
    }
    let mut updates: Vec<Update> = Vec::new();
    let mut new_inputs: Vec<(String, ValueFact)> = Vec::new();
    let mut new_outputs: Vec<(String, ValueFact)> = vec![(
        GRAD_SQ.into(),
        ValueFact::new(dtype::FLOAT, vec![Dim::Known(rec.params.len() as _)]),
    )];
    let mut clipped: Vec<String> = Vec::new();
    let tiny = b.scalar((-64f64).exp2());
    let mut parts: Vec<String> = Vec::new();
    // The check of a state tensor that another tensor's check covers: a constant 0.
    let mut checked_elsewhere: Option<String> = None;
    let mut slot_inputs_of: Vec<Vec<String>> = Vec::new();
    // In place, the test bounds each update from norms where the optimizer allows it
    // (`Optimizer::emit_bounds`) instead of making it twice, once to test it.
    let bounded = in_place && opt.bounded();
    for ((p, g), g_sq) in rec.params.iter().zip(&g_sq) {
        let fact = fact_of(p);
        let g = match &scale {
            Some(s) => b.binary("Mul", g, s, "clip"),
            None => g.clone(),
        };
        let slot_inputs: Vec<String> = opt
            .slots()
            .iter()
            .map(|&s| {
                let name = b.names.fresh(&format!("dagr/opt/{}/{p}", s.key()));
                new_inputs.push((name.clone(), fact.clone()));
                name
            })
            .collect();
        let bounds = bounded
            .then(|| {
                let mut l1 = |b: &mut Builder, x: &str| b.reduce_whole("ReduceL1", x, rank(&fact), rows_first, "norm");
                opt.emit_bounds(&mut b, p, &slot_inputs, g_sq, &mut l1)
            })
            .flatten();
        let (p_next, slots_next) = match bounds {
            Some((p_bound, slot_bounds)) => {
                for x in std::iter::once(&p_bound).chain(&slot_bounds) {
                    parts.push(bound_part(&mut b, x, &flat_shape));
                }
                (None, vec![None; slot_bounds.len()])
            }
            None => {
                let (p_next, slots_next) = opt.emit_update(&mut b, p, &g, &slot_inputs, None);
                // Each candidate is checked right after it is made, so that a runtime following
                // the node order frees it before the next parameter's update; a slot whose
                // non-finite update shows in the parameter's is checked through it.
                parts.push(check_part(&mut b, &p_next, &tiny, rank(&fact), rows_first));
                for (&slot, c) in opt.slots().iter().zip(&slots_next) {
                    parts.push(match opt.checked_through_param(slot) {
                        true => checked_elsewhere
                            .get_or_insert_with(|| b.const_f32(&[1], &[0.0]))
                            .clone(),
                        false => check_part(&mut b, c, &tiny, rank(&fact), rows_first),
                    });
                }
                (Some(p_next), slots_next.into_iter().map(Some).collect())
            }
        };
        updates.push(Update {
            link: StateLink {
                key: param_key(p),
                input: p.clone(),
                output: b.names.fresh(&format!("dagr/opt/next/{p}")),
                rows: None,
            },
            candidate: p_next,
            fact: fact.clone(),
        });
        for ((&slot, input), next) in opt.slots().iter().zip(&slot_inputs).zip(slots_next) {
            updates.push(Update {
                link: StateLink {
                    key: slot_key(slot, p),
                    input: input.clone(),
                    output: b.names.fresh(&format!("{input}/next")),
                    rows: None,
                },
                candidate: next,
                fact: fact.clone(),
            });
        }
        clipped.push(g);
        slot_inputs_of.push(slot_inputs);
    }
    let mut bn_outputs: HashSet<String> = HashSet::new();
    for s in &rec.batchnorm {
        for (init, next) in [&s.mean, &s.var] {
            bn_outputs.insert(next.clone());
            parts.push(check_part(&mut b, next, &tiny, rank(&fact_of(init)), rows_first));
            updates.push(Update {
                link: StateLink {
                    key: bn_key(init),
                    input: init.clone(),
                    output: b.names.fresh(&format!("dagr/opt/next/{init}")),
                    rows: None,
                },
                candidate: Some(next.clone()),
                fact: fact_of(init),
            });
        }
    }
    for s in &scalars {
        new_inputs.push((s.to_string(), ValueFact::new(dtype::FLOAT, vec![])));
    }
    let sums = b.name("check/sums");
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    b.op_named("Concat", &refs, vec![attr_int("axis", 0)], &sums);
    let nan = b.unary("IsNaN", &sums, "check");
    let inf = b.unary("IsInf", &sums, "check");
    let bad = b.binary("Or", &nan, &inf, "check");
    let bad = b.cast(&bad, dtype::FLOAT, "check");
    b.op_named("Identity", &[&bad], vec![], STATE_CHECK);
    new_outputs.push((
        STATE_CHECK.into(),
        ValueFact::new(dtype::FLOAT, vec![Dim::Known(updates.len() as _)]),
    ));

    if !in_place {
        let mut state = Vec::new();
        for u in updates {
            let candidate = u
                .candidate
                .ok_or_else(|| Error::Internal("an update of two state sets not made".into()))?;
            if bn_outputs.contains(&candidate) {
                // BatchNorm's statistics: the training graph's own outputs.
                state.push(StateLink {
                    output: candidate,
                    rows: None,
                    ..u.link
                });
            } else {
                b.op_named("Identity", &[&candidate], vec![], &u.link.output);
                new_outputs.push((u.link.output.clone(), u.fact));
                state.push(u.link);
            }
        }
        b.finish(&mut model);
        let fed: Vec<&str> = state.iter().map(|l| l.input.as_str()).collect();
        rewire(&mut model, rec, &fed, new_inputs, new_outputs);
        return finish(model, rec, opt, clip, state, (false, false), loss.unwrap_or_default());
    }

    // The step is accepted when the loss and every squared gradient norm are finite and every
    // update is: bounded far from float32's range (`bounded`, see `Optimizer::emit_bounds`), or
    // else its candidate finite, exactly the host's test. Each state output is
    // `Where(ok, update, state)`, written only after every reader of the old state has run: the
    // state outputs can be bound to the state inputs' own buffers. Bounded, the update is made
    // once, after the test; else it is computed a second time from `Where(ok, gradient, 0)`, so
    // that it depends on `ok` (a runtime cannot merge it with the candidate).
    let mut flags: Vec<String> = vec![bad];
    if let Some(loss) = loss {
        let nan = b.unary("IsNaN", loss, "accept");
        let inf = b.unary("IsInf", loss, "accept");
        let either = b.binary("Or", &nan, &inf, "accept");
        let f = b.cast(&either, dtype::FLOAT, "accept");
        let one = b.const_i64(&[1]);
        flags.push(b.op("Reshape", &[&f, &one], vec![], "accept"));
    }
    let sq_bad = {
        let nan = b.unary("IsNaN", GRAD_SQ, "accept");
        let inf = b.unary("IsInf", GRAD_SQ, "accept");
        let either = b.binary("Or", &nan, &inf, "accept");
        b.cast(&either, dtype::FLOAT, "accept")
    };
    flags.insert(1, sq_bad);
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let flags = b.op("Concat", &refs, vec![attr_int("axis", 0)], "accept");
    let worst = b.reduce("ReduceMax", &flags, None, false, "accept");
    let zero = b.scalar(0.0);
    let ok = b.binary("Equal", &worst, &zero, "accept");
    let mut state = Vec::new();
    let mut pending = updates.into_iter();
    // The gated write of a state output (or of a part of it: `old` its rows of the state).
    let write = |b: &mut Builder,
                 (value, old): (&str, &str),
                 link: StateLink,
                 fact: ValueFact,
                 state: &mut Vec<StateLink>,
                 outputs: &mut Vec<(String, ValueFact)>| {
        b.op_named("Where", &[&ok, value, old], vec![], &link.output);
        outputs.push((link.output.clone(), fact));
        state.push(link);
    };
    let missing = || Error::Internal("a state update without its state".into());
    // Parameter by parameter: the update (again where unbounded), and its gated writes.
    for ((p, _), (g, slot_inputs)) in rec.params.iter().zip(clipped.iter().zip(&slot_inputs_of)) {
        let parts = match (bounded && in_place, form.part_bytes) {
            (true, Some(bytes)) => row_parts(&fact_of(p), bytes),
            _ => None,
        };
        if let Some(parts) = parts {
            // In parts of rows: each part's update reads its rows of the state and of the
            // gradient and writes them (outputs the runtime binds to those rows of the state's
            // own buffer); the whole state is read by the test and the gradient, before any
            // part is written, and each part's rows by that part only.
            let whole: Vec<Update> = (0..=slot_inputs.len())
                .map(|_| pending.next().ok_or_else(missing))
                .collect::<Result<_>>()?;
            let axes = b.const_i64(&[0]);
            for (start, end) in parts {
                let mut fact = whole[0].fact.clone();
                if let Some(d) = fact.shape.as_mut().and_then(|s| s.first_mut()) {
                    *d = Dim::Known((end - start) as i64);
                }
                // For ONNX Runtime, the first row read after the test (`Where(ok, start,
                // start)`: see `Target`).
                let first = b.const_i64(&[start as i64]);
                let from = match form.target {
                    Target::OnnxRuntime => b.op("Where", &[&ok, &first, &first], vec![], "rows"),
                    Target::Tract => first,
                };
                let to = b.const_i64(&[end as i64]);
                let rows_of = |b: &mut Builder, x: &str| b.op("Slice", &[x, &from, &to, &axes], vec![], "rows");
                let ins: Vec<String> = whole.iter().map(|u| rows_of(&mut b, &u.link.input)).collect();
                let g_part = rows_of(&mut b, g);
                let (p_next, slots_next) = opt.emit_update(&mut b, &ins[0], &g_part, &ins[1..], None);
                for ((value, u), rows) in std::iter::once(p_next).chain(slots_next).zip(&whole).zip(&ins) {
                    let link = StateLink {
                        key: u.link.key.clone(),
                        input: u.link.input.clone(),
                        output: b.names.fresh(&format!("{}/rows{start}", u.link.output)),
                        rows: Some((start, end)),
                    };
                    write(&mut b, (&value, rows), link, fact.clone(), &mut state, &mut new_outputs);
                }
            }
            continue;
        }
        let (p_next, slots_next) = if bounded {
            opt.emit_update(&mut b, p, g, slot_inputs, None)
        } else {
            let gated = b.op("Where", &[&ok, g, &zero], vec![], "accept");
            opt.emit_update(&mut b, p, &gated, slot_inputs, Some(&ok))
        };
        for value in std::iter::once(p_next).chain(slots_next) {
            let u = pending.next().ok_or_else(missing)?;
            let old = u.link.input.clone();
            write(&mut b, (&value, &old), u.link, u.fact, &mut state, &mut new_outputs);
        }
    }
    // BatchNorm's statistics.
    for u in pending {
        let value = u
            .candidate
            .clone()
            .ok_or_else(|| Error::Internal("a statistic without its update".into()))?;
        let old = u.link.input.clone();
        write(&mut b, (&value, &old), u.link, u.fact, &mut state, &mut new_outputs);
    }
    b.finish(&mut model);

    let fed: Vec<&str> = state.iter().map(|l| l.input.as_str()).collect();
    rewire(&mut model, rec, &fed, new_inputs, new_outputs);
    // The training graph's own BatchNorm outputs are internal now (the gated ones replace them).
    model.graph_mut().output.retain(|o| !bn_outputs.contains(&o.name));
    dagr_onnx::index::prune(&mut model);
    let in_place = state_written_last(&model, &state, Some(&ok));
    if !in_place && state.iter().any(|l| l.rows.is_some()) {
        // Parts have no other home than their state's buffer: whole updates, two sets.
        let whole = Form {
            part_bytes: None,
            ..form
        };
        return fold(train, rec, opt, clip, whole, loss);
    }
    finish(
        model,
        rec,
        opt,
        clip,
        state,
        (in_place, bounded),
        loss.unwrap_or_default(),
    )
}

/// The rows `[start, end)` of `input` that `node` reads, where it is a Slice of `input` on its
/// first axis by constant bounds with no step or a step of 1. A bound is constant when it is an
/// initializer, or a Where choosing between one initializer and itself.
fn rows_read(
    model: &Model,
    producer: &std::collections::HashMap<&str, usize>,
    node: &dagr_onnx::proto::NodeProto,
    input: &str,
) -> Option<(usize, usize)> {
    if node.op_type != "Slice" || !node.domain.is_empty() || node.input.first().map(String::as_str) != Some(input) {
        return None;
    }
    let g = model.graph();
    let constant = |i: usize| -> Option<Vec<i64>> {
        let mut name = node.input.get(i)?;
        if let Some(w) = producer.get(name.as_str()).map(|&j| &g.node[j]) {
            match w.input.as_slice() {
                [_, a, b] if w.op_type == "Where" && w.domain.is_empty() && a == b => name = a,
                _ => return None,
            }
        }
        let t = g.initializer.iter().find(|t| &t.name == name)?;
        dagr_onnx::tensor::to_i64(t, &model.base_dir).ok()
    };
    let (starts, ends, axes) = (constant(1)?, constant(2)?, constant(3)?);
    let steps_ok = node
        .input
        .get(4)
        .is_none_or(|s| s.is_empty() || constant(4).as_deref() == Some(&[1]));
    match (starts.as_slice(), ends.as_slice(), axes.as_slice()) {
        (&[s], &[e], &[0]) if steps_ok && 0 <= s && s <= e => Some((s as usize, e as usize)),
        _ => None,
    }
}

/// The parts of rows a state tensor of `fact` is updated in, each of about `bytes` (at least
/// one row): None where it is no larger, its shape is not fully known, or it has one row.
fn row_parts(fact: &ValueFact, bytes: usize) -> Option<Vec<(usize, usize)>> {
    let dims: Vec<usize> = fact
        .shape
        .as_ref()?
        .iter()
        .map(|d| d.known().and_then(|v| usize::try_from(v).ok()))
        .collect::<Option<_>>()?;
    let (&rows, rest) = dims.split_first()?;
    let row_bytes = rest
        .iter()
        .product::<usize>()
        .checked_mul(dtype::size_of(fact.dtype)?)?;
    if rows < 2 || row_bytes == 0 || rows.checked_mul(row_bytes)? <= bytes {
        return None;
    }
    let per = (bytes / row_bytes).max(1);
    Some((0..rows).step_by(per).map(|a| (a, (a + per).min(rows))).collect())
}

/// The boolean scalar input of a gradient graph that starts a new sum: the accumulated
/// gradient becomes this micro-batch's instead of the sum with it.
pub const ACC_FIRST: &str = "dagr/acc/first";
/// The float scalar input of a gradient graph weighing its micro-batch's gradient: its share
/// of the samples of the whole step (over every micro-batch and every process).
pub const ACC_WEIGHT: &str = "dagr/acc/weight";

/// The scratch key of a parameter's accumulated gradient (shared by the two graphs of a split
/// step, never checkpointed).
pub fn acc_key(p: &str) -> String {
    format!("acc/{p}")
}

/// The graph input of a parameter's accumulated gradient, in both graphs of a split step.
fn acc_input(p: &str) -> String {
    format!("dagr/acc/{p}")
}

/// A training step split in two graphs sharing the state (see `build_split`).
pub struct SplitStep {
    pub grad: StepGraph,
    pub update: StepGraph,
}

/// The step split into a gradient graph and an update graph, for gradient accumulation and
/// data-parallel training: a step runs the gradient graph once per micro-batch, then (after the
/// processes have summed their accumulated gradients) the update graph once.
///
/// The gradient graph is the training graph reading the parameters (state written by the update
/// graph) and adding each gradient, times `ACC_WEIGHT`, into its scratch buffer `acc/<param>`
/// (replacing it where `ACC_FIRST`): `acc = Where(first, w g, acc + w g)`. It writes the BatchNorm
/// statistics as `Where(loss finite, new, old)`, so a micro-batch whose loss is not finite leaves
/// them as they were; both writes come after every read, so the graph updates in place.
///
/// The update graph is `build`'s step over those sums: its gradients are the `acc/<param>`
/// buffers it reads (the weights sum to one: the sum is the mean gradient of the step's
/// samples), clipping, the optimizer, the checks and (with `in_place`) the gated writes as in
/// `build`.
pub fn build_split(
    train: &Model,
    rec: &TrainRecord,
    opt: Optimizer,
    clip: Option<f64>,
    form: Form,
) -> Result<SplitStep> {
    let grad = gradient_graph(train, rec)?;
    let idx = dagr_ops::index(train)?;
    let mut update = train.clone();
    {
        let g = update.graph_mut();
        g.node.clear();
        g.input.clear();
        g.output.clear();
        g.initializer.clear();
        g.sparse_initializer.clear();
        g.value_info.clear();
    }
    let mut params = Vec::new();
    let mut reads = Vec::new();
    for (p, _) in &rec.params {
        let fact = idx
            .fact(p)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("no type and shape for the parameter '{p}'")))?;
        let acc = acc_input(p);
        let g = update.graph_mut();
        g.input.push(fact.to_value_info(p));
        g.input.push(fact.to_value_info(&acc));
        reads.push(StateRead {
            key: acc_key(p),
            input: acc.clone(),
        });
        params.push((p.clone(), acc));
    }
    let urec = TrainRecord {
        params,
        batchnorm: Vec::new(),
        ..rec.clone()
    };
    let mut update = fold(&update, &urec, opt, clip, form, None)?;
    update.reads.extend(reads);
    Ok(SplitStep { grad, update })
}

/// The gradient graph of `build_split`.
fn gradient_graph(train: &Model, rec: &TrainRecord) -> Result<StepGraph> {
    let mut model = train.clone();
    let idx = dagr_ops::index(&model)?;
    let mut b = Builder::new(&model, "dagr/acc/");
    let accs: Vec<String> = rec.params.iter().map(|(p, _)| acc_input(p)).collect();
    for name in accs.iter().map(String::as_str).chain([ACC_FIRST, ACC_WEIGHT]) {
        if b.names.fresh(name) != name {
            return Err(Error::NameTaken { name: name.to_string() });
        }
    }
    let mut state = Vec::new();
    let mut new_inputs = vec![
        (ACC_FIRST.to_string(), ValueFact::new(dtype::BOOL, vec![])),
        (ACC_WEIGHT.to_string(), ValueFact::new(dtype::FLOAT, vec![])),
    ];
    let mut new_outputs = Vec::new();
    for ((p, g), acc) in rec.params.iter().zip(&accs) {
        let fact = idx
            .fact(p)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("no type and shape for the parameter '{p}'")))?;
        let weighted = b.binary("Mul", g, ACC_WEIGHT, "weigh");
        let sum = b.binary("Add", acc, &weighted, "sum");
        let out = b.names.fresh(&format!("dagr/acc/next/{p}"));
        b.op_named("Where", &[ACC_FIRST, &weighted, &sum], vec![], &out);
        new_inputs.push((acc.clone(), fact.clone()));
        new_outputs.push((out.clone(), fact));
        state.push(StateLink {
            key: acc_key(p),
            input: acc.clone(),
            output: out,
            rows: None,
        });
    }
    let mut bn_outputs = HashSet::new();
    if !rec.batchnorm.is_empty() {
        let nan = b.unary("IsNaN", &rec.loss, "accept");
        let inf = b.unary("IsInf", &rec.loss, "accept");
        let either = b.binary("Or", &nan, &inf, "accept");
        let ok = b.unary("Not", &either, "accept");
        for s in &rec.batchnorm {
            for (init, next) in [&s.mean, &s.var] {
                let fact = idx
                    .fact(init)
                    .cloned()
                    .ok_or_else(|| Error::Internal(format!("no type and shape for '{init}'")))?;
                bn_outputs.insert(next.clone());
                let out = b.names.fresh(&format!("dagr/acc/next/{init}"));
                b.op_named("Where", &[&ok, next, init], vec![], &out);
                new_outputs.push((out.clone(), fact));
                state.push(StateLink {
                    key: bn_key(init),
                    input: init.clone(),
                    output: out,
                    rows: None,
                });
            }
        }
    }
    b.finish(&mut model);
    let fed: Vec<&str> = rec
        .params
        .iter()
        .map(|p| p.0.as_str())
        .chain(state.iter().map(|l| l.input.as_str()))
        .collect();
    rewire(&mut model, rec, &fed, new_inputs, new_outputs);
    model.graph_mut().output.retain(|o| !bn_outputs.contains(&o.name));
    dagr_onnx::index::prune(&mut model);
    // The parameters must stay inputs: a parameter the loss does not depend on is still read.
    for (p, _) in &rec.params {
        if !model.graph().input.iter().any(|i| &i.name == p) {
            if let Some(f) = idx.fact(p) {
                model.graph_mut().input.push(f.to_value_info(p));
            }
        }
    }
    let in_place = state_written_last(&model, &state, None);
    let reads = rec
        .params
        .iter()
        .map(|(p, _)| StateRead {
            key: param_key(p),
            input: p.clone(),
        })
        .collect();
    model.remove_metadata(crate::training::METADATA_KEY);
    dagr_ops::infer::check(&model)?;
    Ok(StepGraph {
        model,
        state,
        scalars: Vec::new(),
        in_place,
        check_bounds: false,
        reads,
    })
}

/// The step graph's record in its metadata, and the check every emitted graph passes.
fn finish(
    mut model: Model,
    rec: &TrainRecord,
    opt: Optimizer,
    clip: Option<f64>,
    state: Vec<StateLink>,
    (in_place, check_bounds): (bool, bool),
    loss: &str,
) -> Result<StepGraph> {
    let scalars = opt.scalar_names();
    let record = StepRecord {
        optimizer: opt,
        clip_grad_norm: clip,
        state: state.clone(),
        scalars: scalars.iter().map(|s| s.to_string()).collect(),
        loss: loss.to_string(),
        grad_sq: GRAD_SQ.into(),
        state_check: STATE_CHECK.into(),
        params: rec.params.iter().map(|p| p.0.clone()).collect(),
        in_place,
        check_bounds,
    };
    model.remove_metadata(crate::training::METADATA_KEY);
    model.set_metadata(
        METADATA_KEY,
        &serde_json::to_string(&record).map_err(|e| Error::Internal(format!("record: {e}")))?,
    );
    dagr_ops::annotate_shapes(&mut model)?;
    dagr_ops::infer::check(&model)?;
    Ok(StepGraph {
        model,
        state,
        scalars,
        in_place,
        check_bounds,
        reads: Vec::new(),
    })
}

/// `ReduceSum(x * 2^-64)` as a one-element vector (see `STATE_CHECK`), `rank` and `rows_first` as in
/// `Builder::reduce_whole`: the scaled terms cannot overflow a float32 sum in any order, so the
/// check is finite exactly where every term is, whatever the form. Scaled before it is
/// flattened: tract copies a tensor it flattens while another node reads it.
fn check_part(b: &mut Builder, x: &str, tiny: &str, rank: Option<usize>, rows_first: bool) -> String {
    let scaled = b.binary("Mul", x, tiny, "check");
    b.reduce_whole("ReduceSum", &scaled, rank, rows_first, "check")
}

/// A bound of an update (`Optimizer::emit_bounds`) as a one-element check: the bound times 4,
/// infinite (or NaN) where the update could come within a factor of 4 of float32's largest
/// value, which leaves the update's own few roundings far from overflowing; so the check reads
/// like `check_part`'s: finite where the update is.
fn bound_part(b: &mut Builder, bound: &str, flat_shape: &str) -> String {
    let four = b.scalar(4.0);
    let margin = b.binary("Mul", bound, &four, "bound");
    b.op("Reshape", &[&margin, flat_shape], vec![], "bound")
}

/// Whether every node reading a state input is the node writing its output or one of that
/// node's ancestors: then a runtime executing the graph node by node in a topological order
/// reads every old value before the new one overwrites it, and the state outputs may share the
/// inputs' buffers. An output that is rows of its state (`StateLink::rows`, a part) is exempt
/// from the readers of other rows only: Slices of the input on its first axis by constant
/// bounds that miss the part's.
/// The ops whose output ONNX Runtime may place in their input's buffer (a view of it).
const VIEW_OPS: [&str; 5] = ["Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"];

fn state_written_last(model: &Model, state: &[StateLink], ok: Option<&str>) -> bool {
    let nodes = &model.graph().node;
    let mut producer: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in &n.output {
            producer.insert(o.as_str(), i);
        }
    }
    // A view of a state input reads the state: ONNX Runtime gives a Reshape, Squeeze,
    // Unsqueeze, Flatten or Identity output its input's buffer, so whoever reads the view reads
    // the state's buffer (after the write, the new values). Each view is known by the state
    // input it shows (nodes are in topological order, so a view of a view is seen).
    let mut shows: std::collections::HashMap<&str, &str> =
        state.iter().map(|l| (l.input.as_str(), l.input.as_str())).collect();
    for n in nodes {
        if n.domain.is_empty() && VIEW_OPS.contains(&n.op_type.as_str()) {
            if let Some(&s) = n.input.first().and_then(|i| shows.get(i.as_str())) {
                for o in &n.output {
                    shows.insert(o.as_str(), s);
                }
            }
        }
    }
    // The nodes reading each name (subgraphs' reads count for the node holding them), a view's
    // readers counted as its state's.
    let mut readers: std::collections::HashMap<&str, Vec<usize>> = std::collections::HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut names: Vec<&str> = n.input.iter().map(String::as_str).collect();
        if n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
            // A node with a subgraph may read any outer name: treat it as reading the state.
            names.extend(state.iter().map(|l| l.input.as_str()));
        }
        for name in names {
            let name = shows.get(name).copied().unwrap_or(name);
            readers.entry(name).or_default().push(i);
        }
    }
    let ancestors = |from: usize| -> Vec<bool> {
        let mut seen = vec![false; nodes.len()];
        let mut stack = vec![from];
        seen[from] = true;
        while let Some(i) = stack.pop() {
            for input in &nodes[i].input {
                if let Some(&j) = producer.get(input.as_str()) {
                    if !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        seen
    };
    // Where every writer follows `ok`, the nodes before `ok` are before every writer; only the
    // other readers need a search from their writer.
    let before_ok = match ok {
        Some(ok) => match producer.get(ok) {
            Some(&ok_node) => ancestors(ok_node),
            None => return false,
        },
        None => vec![false; nodes.len()],
    };
    state.iter().all(|l| {
        let Some(&writer) = producer.get(l.output.as_str()) else {
            return false;
        };
        let Some(rs) = readers.get(l.input.as_str()) else {
            return true;
        };
        let late: Vec<usize> = rs
            .iter()
            .copied()
            .filter(|&r| !before_ok[r])
            .filter(|&r| match (l.rows, rows_read(model, &producer, &nodes[r], &l.input)) {
                (Some((a, b)), Some((s, e))) => s < b && a < e,
                _ => true,
            })
            .collect();
        if late.is_empty() {
            return true;
        }
        let before = ancestors(writer);
        late.iter().all(|&r| before[r])
    })
}

/// `out = Concat(f(x) for x in xs)`: one value per tensor (`f` makes a one-element vector:
/// squared norms); returns the parts.
fn per_tensor(b: &mut Builder, xs: &[&str], out: &str, mut f: impl FnMut(&mut Builder, &str) -> String) -> Vec<String> {
    let parts: Vec<String> = xs.iter().map(|x| f(b, x)).collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    b.op_named("Concat", &refs, vec![attr_int("axis", 0)], out);
    parts
}

/// `min(max_norm / (||g|| + 1e-6), 1)` over all gradients (`torch.nn.utils.clip_grad_norm_`),
/// from the squared norms in `GRAD_SQ`.
fn clip_coefficient(b: &mut Builder, max_norm: f64) -> String {
    let total = b.reduce("ReduceSum", GRAD_SQ, None, false, "clip");
    let norm = b.unary("Sqrt", &total, "clip");
    let tiny = b.scalar(1e-6);
    let den = b.binary("Add", &norm, &tiny, "clip");
    let max = b.scalar(max_norm);
    let coef = b.binary("Div", &max, &den, "clip");
    let one = b.scalar(1.0);
    b.binary("Min", &coef, &one, "clip")
}

/// The step graph's interface: the reports and the state's updates as outputs (the
/// `<param>_grad` outputs become internal), the slots and scalars as inputs; the state is always
/// fed, so its initializers go (tract folds an initializer into a constant, and the step graph
/// stays small).
fn rewire(
    model: &mut Model,
    rec: &TrainRecord,
    fed: &[&str],
    new_inputs: Vec<(String, ValueFact)>,
    new_outputs: Vec<(String, ValueFact)>,
) {
    let grads: HashSet<&String> = rec.params.iter().map(|p| &p.1).collect();
    let g = model.graph_mut();
    g.output.retain(|o| !grads.contains(&o.name));
    for (n, f) in new_outputs {
        if !g.output.iter().any(|o| o.name == n) {
            g.output.push(f.to_value_info(&n));
        }
    }
    for (n, f) in new_inputs {
        g.input.push(f.to_value_info(&n));
    }
    let fed: HashSet<&str> = fed.iter().copied().collect();
    g.initializer.retain(|t| !fed.contains(t.name.as_str()));
    bypass_identities(model);
    dagr_onnx::index::prune(model);
}

/// Read through every Identity whose output is not a graph output (the training graph's
/// `<param>_grad` outputs, now internal): a whole copy of a gradient per step otherwise, which
/// ONNX Runtime keeps when the gradient has other readers.
fn bypass_identities(model: &mut Model) {
    fn read_by_subgraphs(nodes: &[dagr_onnx::proto::NodeProto], out: &mut HashSet<String>) {
        for n in nodes {
            for a in &n.attribute {
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    out.extend(sub.node.iter().flat_map(|m| m.input.iter().cloned()));
                    read_by_subgraphs(&sub.node, out);
                }
            }
        }
    }
    let g = model.graph_mut();
    let mut keep: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    read_by_subgraphs(&g.node, &mut keep);
    let mut alias: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for n in &g.node {
        let plain = n.op_type == "Identity" && n.domain.is_empty() && n.input.len() == 1 && n.output.len() == 1;
        if plain && !keep.contains(&n.output[0]) {
            alias.insert(n.output[0].clone(), n.input[0].clone());
        }
    }
    let resolve = |mut t: String| {
        while let Some(a) = alias.get(&t) {
            t = a.clone();
        }
        t
    };
    for n in g.node.iter_mut() {
        for i in n.input.iter_mut() {
            if alias.contains_key(i.as_str()) {
                *i = resolve(i.clone());
            }
        }
    }
    // An Identity that names a graph output (each state tensor's update, `<state>/next`): the
    // node computing its input writes the output directly, and its readers read that.
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let produced: HashSet<String> = g.node.iter().flat_map(|n| n.output.iter().cloned()).collect();
    let mut rename: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut drop = HashSet::new();
    for (k, n) in g.node.iter().enumerate() {
        let plain = n.op_type == "Identity" && n.domain.is_empty() && n.input.len() == 1 && n.output.len() == 1;
        if plain
            && outputs.contains(&n.output[0])
            && produced.contains(&n.input[0])
            && !outputs.contains(&n.input[0])
            && !keep.contains(&n.input[0])
            && !rename.contains_key(&n.input[0])
        {
            rename.insert(n.input[0].clone(), n.output[0].clone());
            drop.insert(k);
        }
    }
    let mut k = 0;
    g.node.retain(|_| {
        k += 1;
        !drop.contains(&(k - 1))
    });
    for n in g.node.iter_mut() {
        for t in n.input.iter_mut().chain(n.output.iter_mut()) {
            if let Some(r) = rename.get(t.as_str()) {
                *t = r.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagr_onnx::proto::NodeProto;

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![output.into()];
        n
    }

    fn model(nodes: Vec<NodeProto>) -> Model {
        let mut m = Model {
            proto: Default::default(),
            base_dir: Default::default(),
            source: None,
        };
        m.graph_mut().node = nodes;
        m
    }

    /// `p_new` replaces `p` in `p`'s buffer only where nothing reads `p`, or a view of it that
    /// shares its buffer on ONNX Runtime, after the write.
    #[test]
    fn a_read_of_the_state_or_of_a_view_of_it_after_the_write_keeps_two_sets() {
        let link = StateLink {
            key: "param/p".into(),
            input: "p".into(),
            output: "p_new".into(),
            rows: None,
        };
        let cases = [
            // the state itself read by a node the write does not wait for
            (
                vec![node("Sub", &["p", "g"], "p_new"), node("Neg", &["p"], "late")],
                false,
            ),
            // a view of it so read, and a view of a view
            (
                vec![
                    node("Reshape", &["p", "s"], "v"),
                    node("Sub", &["p", "g"], "p_new"),
                    node("Neg", &["v"], "late"),
                ],
                false,
            ),
            (
                vec![
                    node("Flatten", &["p"], "v"),
                    node("Unsqueeze", &["v", "a"], "u"),
                    node("Sub", &["p", "g"], "p_new"),
                    node("MatMul", &["x", "u"], "late"),
                ],
                false,
            ),
            // the view's reader is one the write waits for
            (
                vec![
                    node("Reshape", &["p", "s"], "v"),
                    node("Neg", &["v"], "n"),
                    node("Sub", &["p", "n"], "p_new"),
                ],
                true,
            ),
            // made before the write, a copy (Transpose) read late reads its own buffer, a view
            // (Reshape) the state's
            (
                vec![
                    node("Transpose", &["p"], "t"),
                    node("Shape", &["t"], "s"),
                    node("Sub", &["p", "s"], "p_new"),
                    node("Neg", &["t"], "late"),
                ],
                true,
            ),
            (
                vec![
                    node("Reshape", &["p", "s0"], "t"),
                    node("Shape", &["t"], "s"),
                    node("Sub", &["p", "s"], "p_new"),
                    node("Neg", &["t"], "late"),
                ],
                false,
            ),
        ];
        for (i, (nodes, in_place)) in cases.into_iter().enumerate() {
            assert_eq!(
                state_written_last(&model(nodes), std::slice::from_ref(&link), None),
                in_place,
                "case {i}"
            );
        }
    }
}
