//! `dagr-inject verify`: check a rewritten model's outputs against a reference file, against the
//! original model, against the built-in reference implementation of DAGR, against finite
//! differences (parameter gradients of training graphs), and across backends.

use dagr_core::{self as dagr, reference};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{self as onnx, dtype, Dim, GraphIndex, Model};
use dagr_runtime::{self as runtime, Backend, Tensors, Value};
use ndarray::ArrayD;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub output: String,
    pub backend: String,
    pub max_abs: f64,
    /// max |got - want| / max |want|
    pub rel: f64,
    pub pass: bool,
    /// The inputs a joint check covers (finite differences over several parameter tensors at
    /// once); empty for a check of one output.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub covers: Vec<String>,
}

fn compare(check: &str, output: &str, backend: &str, got: &Value, want: &Value, rtol: f64) -> Check {
    compare_floor(check, output, backend, got, want, rtol, 0.0)
}

/// `floor`: the smallest scale the error is relative to, for outputs whose true value is
/// (nearly) zero, such as the gradient of a bias followed by BatchNorm.
fn compare_floor(check: &str, output: &str, backend: &str, got: &Value, want: &Value, rtol: f64, floor: f64) -> Check {
    let (max_abs, rel) = match (got, want) {
        (Value::F32(a), Value::F32(b)) if a.shape() == b.shape() => {
            let scale = b.iter().fold(floor, |m, v| m.max(v.abs() as f64));
            let d = a
                .iter()
                .zip(b.iter())
                .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
            let nonfinite = a.iter().any(|v| !v.is_finite()) != b.iter().any(|v| !v.is_finite());
            if nonfinite {
                (f64::INFINITY, f64::INFINITY)
            } else {
                (d, if scale > 0.0 { d / scale } else { d })
            }
        }
        (a, b) if a == b => (0.0, 0.0),
        _ => (f64::INFINITY, f64::INFINITY),
    };
    Check {
        check: check.into(),
        output: output.into(),
        backend: backend.into(),
        max_abs,
        rel,
        pass: rel <= rtol,
        covers: Vec::new(),
    }
}

/// Inputs for the built-in checks: random floats, integers valid where the graph uses them
/// (token ids, labels; masks all ones), with symbolic dims set to `batch`.
/// The most elements `random_inputs` fills per input (64 M floats, 256 MB).
pub const MAX_RANDOM_ELEMENTS: usize = 1 << 26;

pub fn random_inputs(model: &Model, batch: usize, seed: u64) -> Result<Tensors> {
    let idx = dagr_ops::index(model)?;
    let mut rng = dagr_runtime::data::Rng(seed);
    let mut out = Tensors::new();
    for name in idx.user_inputs() {
        let f = idx.fact(&name).cloned().unwrap_or_default();
        let dims = f
            .shape
            .ok_or_else(|| Error::Data(format!("the shape of input '{name}' is unknown; pass `inputs`")))?;
        let mut shape = Vec::with_capacity(dims.len());
        for d in &dims {
            shape.push(match d {
                Dim::Known(v) if *v >= 0 => *v as usize,
                Dim::Known(v) => {
                    return Err(Error::Data(format!(
                        "input '{name}' declares the dimension {v}, which no tensor has; fix the model or pass `inputs`"
                    )))
                }
                _ => batch,
            });
        }
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= MAX_RANDOM_ELEMENTS)
            .ok_or_else(|| {
                Error::Data(format!(
                    "input '{name}' has shape {shape:?}, too large to fill with random values (at most {MAX_RANDOM_ELEMENTS} elements); pass `inputs`"
                ))
            })?;
        let shaped = |e: ndarray::ShapeError| Error::Data(format!("input '{name}': {e}"));
        let v = match f.dtype {
            dtype::INT64 | dtype::INT32 => {
                // Indices below their bound; anything else (a mask) ones.
                let values: Vec<i64> = match index_bound(model, &idx, &name) {
                    Some(b) => (0..n).map(|_| (rng.next_u64() % b.max(1) as u64) as i64).collect(),
                    None => vec![1; n],
                };
                Value::I64(ArrayD::from_shape_vec(shape, values).map_err(shaped)?)
            }
            // Masks (a fed Dropout mask): everything kept.
            dtype::BOOL => Value::Bool(ArrayD::from_shape_vec(shape, vec![true; n]).map_err(shaped)?),
            _ => Value::F32(
                ArrayD::from_shape_vec(
                    shape,
                    (0..n)
                        .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0)
                        .collect(),
                )
                .map_err(shaped)?,
            ),
        };
        out.insert(name, v);
    }
    Ok(out)
}

/// The bound below which an integer input's values must lie, as the graph uses it: token ids
/// below the rows of the table they index (Gather), labels below the class count (a
/// cross-entropy, OneHot). `None` for anything else (an attention mask, positions), which gets
/// ones: a mask then hides nothing (a fully masked row makes float32 attention flat, and finite
/// differences blind).
fn index_bound(model: &Model, idx: &GraphIndex, input: &str) -> Option<i64> {
    let g = model.graph();
    let mut bound: Option<i64> = None;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![input.to_string()];
    while let Some(t) = stack.pop() {
        if !seen.insert(t.clone()) {
            continue;
        }
        for &c in idx.consumers_of(&t) {
            let n = &g.node[c];
            let dim_of = |tensor: &str, axis: i64| -> Option<i64> {
                let s = idx.fact(tensor)?.shape.clone()?;
                let a = if axis < 0 { axis + s.len() as i64 } else { axis };
                s.get(usize::try_from(a).ok()?)?.known()
            };
            let found = match n.op_type.as_str() {
                "Gather" if n.input.get(1) == Some(&t) => {
                    dim_of(&n.input[0], onnx::attr::attr_i(n, "axis").unwrap_or(0))
                }
                "SoftmaxCrossEntropyLoss" | "NegativeLogLikelihoodLoss" if n.input.get(1) == Some(&t) => {
                    dim_of(&n.input[0], 1)
                }
                "OneHot" if n.input.first() == Some(&t) => n
                    .input
                    .get(1)
                    .and_then(|d| idx.value(d))
                    .and_then(|v| v.first()?.known()),
                // Ops that pass integer values on unchanged.
                "Cast" | "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "Identity" | "Expand" => {
                    stack.extend(n.output.iter().cloned());
                    None
                }
                _ => None,
            };
            if let Some(b) = found {
                bound = Some(bound.map_or(b, |x| x.min(b)));
            }
        }
    }
    bound
}

/// Outputs of the reference file on every backend.
pub fn against_reference(path: &Path, reference: &Tensors, backends: &[Backend], rtol: f64) -> Result<Vec<Check>> {
    let model = onnx::load(path)?;
    let outs: Vec<String> = model
        .graph()
        .output
        .iter()
        .map(|o| o.name.clone())
        .filter(|n| reference.contains_key(n))
        .collect();
    if outs.is_empty() {
        return Err(Error::Data(
            "the reference file has no array named like an output of the model".into(),
        ));
    }
    let mut checks = Vec::new();
    for &b in backends {
        let got = runtime::run(b, path, reference, &outs)?;
        for o in &outs {
            checks.push(compare("reference", o, b.name(), &got[o], &reference[o], rtol));
        }
    }
    Ok(checks)
}

/// The original model's outputs after the rewrite: bit for bit the same for a DAGR rewrite
/// (`inject` only adds nodes); within `rtol` for a training graph, which legitimately computes
/// them through another path (BatchNorm decomposed, parameters fed as inputs, sequences
/// lowered): the check's name states which.
pub fn against_original(
    path: &Path,
    original: &Path,
    inputs: &Tensors,
    backends: &[Backend],
    rtol: f64,
) -> Result<Vec<Check>> {
    let mut orig = onnx::load(original)?;
    let training = onnx::load(path)?.metadata(dagr_core::training::METADATA_KEY).is_some();
    let (mut name, tol) = if training {
        (format!("original recomputed (training graph, rtol {rtol:.0e})"), rtol)
    } else {
        ("original unchanged (bit for bit)".to_string(), 0.0)
    };
    let outs: Vec<String> = orig.graph().output.iter().map(|o| o.name.clone()).collect();
    // The original as the rewrite read it (`portable::prepare`): local functions inlined (tract
    // runs none), shapes it declares and its operators contradict corrected (jax2onnx's NHWC
    // value_info, without which ONNX Runtime may not load it). The same computation.
    let p = dagr_core::portable::prepare(&mut orig)?;
    let mut read_as = Vec::new();
    if p.inlined_calls > 0 {
        read_as.push(format!("{} function calls inlined", p.inlined_calls));
    }
    if !p.corrected_shapes.is_empty() {
        read_as.push(format!(
            "{} contradicted shape declarations corrected",
            p.corrected_shapes.len()
        ));
    }
    let scratch = if read_as.is_empty() {
        None
    } else {
        name.push_str(&format!(
            ", the original read as the rewrite reads it: {}",
            read_as.join(", ")
        ));
        Some(onnx::io::Scratch::new(&orig)?)
    };
    let original = scratch.as_ref().map_or(original, |s| s.path());
    // tract runs BatchNormalization in inference mode only: a training graph's original in
    // training mode (PyTorch's export with `training=TRAINING`) is recomputed there with its
    // BatchNormalizations written as the training graph writes them (`decompose_batchnorm`),
    // the same computation; ONNX Runtime runs the original as it is.
    let training_bn = training && orig.graph().node.iter().any(onnx::ops::is_training_batchnorm);
    let decomposed = if training_bn && backends.contains(&Backend::Tract) {
        let mut m = orig.clone();
        dagr_core::portable::decompose_batchnorm(&mut m)?;
        Some(onnx::io::Scratch::new(&m)?)
    } else {
        None
    };
    let mut checks = Vec::new();
    for &b in backends {
        let (original, name) = match (&decomposed, b) {
            (Some(s), Backend::Tract) => (
                s.path(),
                format!(
                    "{name}, BatchNormalization in training mode as primitives (tract runs it in inference mode only)"
                ),
            ),
            _ => (original, name.clone()),
        };
        // The original as it is written (ONNX Runtime's optimizer has changed a model's
        // results: `run_as_written`); the training graph as it trains.
        let want = runtime::run_as_written(b, original, inputs, &outs)?;
        let got = runtime::run(b, path, inputs, &outs)?;
        for o in &outs {
            checks.push(compare(&name, o, b.name(), &got[o], &want[o], tol));
        }
    }
    Ok(checks)
}

/// DAGR's outputs against the built-in reference, from the model's own encoder outputs.
pub fn against_builtin(path: &Path, inputs: &Tensors, backends: &[Backend], rtol: f64) -> Result<Vec<Check>> {
    let model = onnx::load(path)?;
    let rec = dagr::record_of(&model)
        .ok_or_else(|| Error::Config("the model was not rewritten by dagr-inject (no dagr_inject metadata)".into()))?;
    let idx = dagr_ops::index(&model)?;
    // A copy that also outputs the raw encoder outputs.
    let enc: Vec<String> = rec.encoders.iter().map(|e| e.1.clone()).collect();
    let mut m = model.clone();
    m.expose(&idx, &enc);
    let scratch = onnx::io::Scratch::new(&m)?;
    let exposed = scratch.path();
    let o = &rec.outputs;
    let mut names = enc.clone();
    names.push(o.loss.clone());
    names.extend(o.grads.iter().map(|g| g.1.clone()));
    let mut checks = Vec::new();
    for &b in backends {
        let got = runtime::run(b, exposed, inputs, &names)?;
        let zs: Vec<ArrayD<f64>> = enc
            .iter()
            .map(|t| {
                got.get(t)
                    .and_then(|v| v.as_f32())
                    .map(|a| a.mapv(|v| v as f64))
                    .ok_or_else(|| Error::Internal(format!("the encoder output '{t}' is not a float32 output")))
            })
            .collect::<Result<_>>()?;
        let reduced: Vec<ndarray::Array2<f64>> = zs.iter().map(|z| reference::reduce(z, rec.config.reduce)).collect();
        let r = reference::compute(&reduced, &rec.config);
        let want_loss = Value::F32(ArrayD::from_elem(vec![], r.loss as f32));
        checks.push(compare(
            "built-in reference",
            &o.loss,
            b.name(),
            &got[&o.loss],
            &want_loss,
            rtol,
        ));
        for (k, (_, g)) in o.grads.iter().enumerate() {
            let full = reference::reduce_backward(&r.grads[k], zs[k].shape(), rec.config.reduce);
            let want = Value::F32(full.mapv(|v| v as f32));
            checks.push(compare(
                "built-in reference",
                g,
                b.name(),
                &got[g],
                &want,
                rtol.max(1e-5),
            ));
        }
    }
    Ok(checks)
}

/// The random directions `verify` takes per group of parameter tensors. With 3, a gradient half
/// again as large in the zoo's DistilBERT passed its group at the tolerance's edge (2.0e-2, or
/// 2.3e-2 with the loss's last bit rounded the other way); 4 fail it by 0.13.
pub const PARAM_FD_DIRECTIONS: usize = 4;

/// The most finite-difference checks `param_finite_differences` makes of one model: past this
/// many parameter tensors, consecutive tensors are checked together, so that its work is bounded
/// per model rather than per tensor.
pub const MAX_PARAM_CHECKS: usize = 24;

/// Central differences of the training loss against `<param>_grad` along `dirs` random
/// directions (training graphs only): one check per parameter tensor up to
/// [`MAX_PARAM_CHECKS`] tensors; past that, the tensors in order (the graph's, which is mostly
/// the layers') split into that many runs of consecutive tensors, each checked along joint
/// directions over its tensors.
pub fn param_finite_differences(path: &Path, inputs: &Tensors, backend: Backend, dirs: usize) -> Result<Vec<Check>> {
    let model = onnx::load(path)?;
    // Only training graphs have parameter gradients; a damaged training record is an error.
    let rec = match dagr_train::record_of(&model) {
        Ok(r) => r,
        Err(Error::NotATrainingGraph(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let pnames: Vec<String> = rec.params.iter().map(|p| p.0.clone()).collect();
    let mut feed = inputs.clone();
    for t in &model.graph().initializer {
        if pnames.contains(&t.name) {
            let v = onnx::tensor::to_f32(t, &model.base_dir)?;
            let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let a = ArrayD::from_shape_vec(shape, v)
                .map_err(|e| Error::Internal(format!("parameter '{}': {e}", t.name)))?;
            feed.insert(t.name.clone(), Value::F32(a));
        }
    }
    let outs: Vec<String> = rec.params.iter().map(|p| p.1.clone()).collect();
    let mut base = runtime::Runner::new(backend, path, &feed, &outs)?.run(&feed)?;
    // The differences run the loss alone: the graph pruned to it, without the backward pass
    // (mobilenet_v3_small's training graph: a run of 43 ms instead of 10 ms).
    let (_loss_graph, mut runner) = loss_runner(&model, &rec.loss, backend, &feed)?;
    let mut rng = dagr_runtime::data::Rng(17);
    let mut checks = Vec::new();
    let n = rec.params.len();
    let groups = n.min(MAX_PARAM_CHECKS);
    for k in 0..groups {
        let members = &rec.params[k * n / groups..(k + 1) * n / groups];
        let mut wrt = Vec::with_capacity(members.len());
        for (p, g) in members {
            let grad = match base.remove(g) {
                Some(Value::F32(a)) => a,
                _ => {
                    return Err(Error::Internal(format!(
                        "the gradient output '{g}' is not a float32 output"
                    )))
                }
            };
            wrt.push((p.as_str(), grad));
        }
        let name = match members {
            [(_, g)] => g.clone(),
            [(_, g), rest @ ..] => format!("{g} (+{} more)", rest.len()),
            [] => continue,
        };
        checks.push(fd_check(
            &mut runner,
            &mut feed,
            &wrt,
            &rec.loss,
            &name,
            backend,
            dirs,
            1e-4,
            &mut rng,
        )?);
    }
    Ok(checks)
}

/// Every output of the model equal on tract and ONNX Runtime.
pub fn cross_backend(path: &Path, inputs: &Tensors, rtol: f64) -> Result<Vec<Check>> {
    let model = onnx::load(path)?;
    let outs: Vec<String> = model.graph().output.iter().map(|o| o.name.clone()).collect();
    let a = runtime::run(Backend::Tract, path, inputs, &outs)?;
    let b = runtime::run(Backend::Ort, path, inputs, &outs)?;
    // Parameter gradients are compared on the scale of the largest one.
    let grad_scale = outs
        .iter()
        .filter(|o| o.ends_with("_grad"))
        .filter_map(|o| b[o].as_f32())
        .fold(0f64, |m, a| a.iter().fold(m, |m, v| m.max(v.abs() as f64)));
    Ok(outs
        .iter()
        .map(|o| {
            // Scalars (losses and their terms) on the scale of their terms: a dispersion of a
            // collapsed modality is a difference of O(1) numbers near 0.
            let scalar = b[o].shape().is_empty();
            let floor = match (o.ends_with("_grad"), scalar) {
                (true, _) => 1e-2 * grad_scale,
                (false, true) => 1.0,
                (false, false) => 0.0,
            };
            compare_floor("tract = ort", o, "both", &a[o], &b[o], rtol, floor)
        })
        .collect())
}

/// Central differences of `dagr/loss` with respect to the encoder outputs against
/// `dagr/grad/*`, on the model itself: a copy in which each encoder output becomes a graph input
/// (its producer's output renamed), so that the encoder outputs can be perturbed directly.
pub fn dagr_finite_differences(path: &Path, inputs: &Tensors, backend: Backend, coords: usize) -> Result<Vec<Check>> {
    let model = onnx::load(path)?;
    let rec = dagr::record_of(&model)
        .ok_or_else(|| Error::Config("the model was not rewritten by dagr-inject (no dagr_inject metadata)".into()))?;
    let idx = dagr_ops::index(&model)?;
    let o = &rec.outputs;
    // First the encoder outputs themselves, from the unmodified model.
    let enc: Vec<String> = rec.encoders.iter().map(|e| e.1.clone()).collect();
    let mut exposed = model.clone();
    exposed.expose(&idx, &enc);
    let exposed = onnx::io::Scratch::new(&exposed)?;
    let z = runtime::run(backend, exposed.path(), inputs, &enc)?;
    // Then the cut model: encoder outputs are inputs.
    let mut cut = model.clone();
    cut.source = None;
    let g = cut.graph_mut();
    for t in &enc {
        for n in g.node.iter_mut() {
            for out in n.output.iter_mut() {
                if out == t {
                    *out = format!("{t}__cut");
                }
            }
        }
        let f = idx.fact(t).cloned().unwrap_or_default();
        g.input.push(f.to_value_info(t));
    }
    let cut_file = onnx::io::Scratch::new(&cut)?;
    let p2 = cut_file.path();
    let mut feed = inputs.clone();
    for t in &enc {
        feed.insert(t.clone(), z[t].clone());
    }
    let outs: Vec<String> = o.grads.iter().map(|g| g.1.clone()).collect();
    let base = runtime::run(backend, p2, &feed, &outs)?;
    let (_loss_graph, mut runner) = loss_runner(&cut, &o.loss, backend, &feed)?;
    let mut rng = dagr_runtime::data::Rng(23);
    let mut checks = Vec::new();
    for (t, (_, gname)) in enc.iter().zip(&o.grads) {
        let Some(grad) = base[gname].as_f32().cloned() else {
            continue;
        };
        checks.push(fd_check(
            &mut runner,
            &mut feed,
            &[(t.as_str(), grad)],
            &o.loss,
            gname,
            backend,
            coords,
            1e-6,
            &mut rng,
        )?);
    }
    Ok(checks)
}

/// `model` pruned to its output `loss` (no backward pass, nor anything else the loss does not
/// need), written for the runtime and prepared with `example`'s shapes; the file lives as long
/// as the returned scratch.
fn loss_runner(
    model: &Model,
    loss: &str,
    backend: Backend,
    example: &Tensors,
) -> Result<(onnx::io::Scratch, runtime::Runner)> {
    let mut m = model.clone();
    m.source = None;
    m.graph_mut().output.retain(|o| o.name == loss);
    onnx::index::prune(&mut m);
    let scratch = onnx::io::Scratch::new(&m)?;
    let runner = runtime::Runner::new(backend, scratch.path(), example, &[loss.to_string()])?;
    Ok((scratch, runner))
}

/// The error of a finite-difference check, beyond what the difference resolves, relative to the
/// directional derivative's expected size, that fails it.
const FD_TOLERANCE: f64 = 2e-2;

/// How many more independent directions a failing direction is drawn (`fd_directions`): one;
/// two let the tests' wrong GELU gradient (`verify_passes_honest_training_graphs_and_fails_mutated_ones`)
/// pass.
const FD_REDRAWS: usize = 1;

/// The float32 rounding of the loss over a step, relative to the directional derivative's
/// expected size, up to which that step's finite difference can accept an analytic value.
const RESOLVED: f64 = 0.25;

/// In a joint check, a tensor whose share of the directional derivative is below the group's
/// median is moved by more than its typical entry, to weigh as much as the median: at most this
/// many times more.
const UPSCALE: f64 = 10.0;

/// Directional finite differences of the scalar output `loss` with respect to the inputs in
/// `wrt` (name, analytic gradient), reported as output `name`, along `dirs` random directions:
/// every entry of every tensor moves by `± t s_p` at once, and `(L(t) - L(-t)) / 2t` is
/// compared with `sum_p s_p <grad_p, v_p>`.
///
/// A direction spreads the check over every entry, so that its expected size is `||grad||`
/// (single coordinates of a float32 loss are mostly rounding noise where gradients are small).
/// `s_p` is the tensor's typical entry (its RMS), scaled so that the tensor's share
/// `s_p ||grad_p||` is the group's median share (raised at most [`UPSCALE`] times; a
/// single tensor keeps its RMS): no tensor of a group drowns the others, and a wrong gradient of
/// any one of them moves the sum by about the median share.
/// The error is measured relative to the whole sum's expected size (at least `floor` per unit
/// step) and allowed what the finite difference itself cannot resolve: its disagreement with
/// the step doubled (truncation, kinks, rounding), and float32 rounding of the loss over the
/// step. A wrong gradient is off by a sizeable fraction of its share; an honest one within 2 %.
#[allow(clippy::too_many_arguments)]
fn fd_check(
    runner: &mut runtime::Runner,
    feed: &mut Tensors,
    wrt: &[(&str, ArrayD<f32>)],
    loss: &str,
    name: &str,
    backend: Backend,
    dirs: usize,
    floor: f64,
    rng: &mut dagr_runtime::data::Rng,
) -> Result<Check> {
    // The tensors are taken out of the feed while they are perturbed and put back after, so the
    // check holds one more copy of them only, never of the whole feed (a large training graph's
    // feed is its parameters); the runner's session is the same for every run.
    let mut x0 = Vec::with_capacity(wrt.len());
    let mut taken = Ok(());
    for (t, _) in wrt {
        match feed.remove(*t) {
            Some(Value::F32(a)) => x0.push(a),
            Some(other) => {
                feed.insert(t.to_string(), other);
                taken = Err(Error::Data(format!("'{t}' is not a float tensor")));
                break;
            }
            None => {
                taken = Err(Error::Data(format!("'{t}' is not fed")));
                break;
            }
        }
    }
    let result = taken.and_then(|()| fd_directions(runner, feed, wrt, &x0, loss, dirs, floor, rng));
    for ((t, _), a) in wrt.iter().zip(x0) {
        feed.insert(t.to_string(), Value::F32(a));
    }
    let (worst_abs, worst) = result?;
    Ok(Check {
        check: "finite differences".into(),
        output: name.into(),
        backend: backend.name().into(),
        max_abs: worst_abs,
        rel: worst,
        pass: worst <= FD_TOLERANCE,
        covers: if wrt.len() > 1 {
            wrt.iter().map(|(t, _)| t.to_string()).collect()
        } else {
            Vec::new()
        },
    })
}

/// One step of a finite-difference direction.
#[derive(Clone, Copy)]
struct Step {
    /// What the difference cannot resolve: its disagreement with the step doubled, plus the
    /// loss's float32 rounding over the step.
    unresolved: f64,
    /// The error beyond `unresolved`, relative to the derivative's expected size.
    beyond: f64,
    /// |finite difference - analytic|.
    err: f64,
    /// Whether the rounding alone is at most `RESOLVED` of the expected size.
    resolves: bool,
}

/// `fd_check`'s directions: (largest absolute error per unit step, largest error relative to
/// the directional derivative's expected size beyond what the difference cannot resolve).
/// `feed` lacks the tensors of `wrt`, which are fed `x0 + t s v`.
#[allow(clippy::too_many_arguments)]
fn fd_directions(
    runner: &mut runtime::Runner,
    feed: &mut Tensors,
    wrt: &[(&str, ArrayD<f32>)],
    x0: &[ArrayD<f32>],
    loss: &str,
    dirs: usize,
    floor: f64,
    rng: &mut dagr_runtime::data::Rng,
) -> Result<(f64, f64)> {
    let sq = |a: &ArrayD<f32>| a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
    let rms: Vec<f64> = x0
        .iter()
        .map(|x| (sq(x) / x.len().max(1) as f64).sqrt().max(1e-2))
        .collect();
    let gnorm: Vec<f64> = wrt.iter().map(|(_, g)| sq(g).sqrt()).collect();
    let share: Vec<f64> = rms.iter().zip(&gnorm).map(|(r, g)| r * g).collect();
    let mut sorted = share.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let scale: Vec<f64> = rms
        .iter()
        .zip(&share)
        .map(|(r, s)| {
            if *s > 0.0 {
                r * (median / s).min(UPSCALE)
            } else {
                r * UPSCALE
            }
        })
        .collect();
    // The typical step per unit `t`, which `floor` (a gradient's smallest scale) is taken at.
    let unit = (scale.iter().map(|s| s * s).sum::<f64>() / scale.len().max(1) as f64).sqrt();
    let norm = scale
        .iter()
        .zip(&gnorm)
        .map(|(s, g)| (s * g).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(floor * unit);
    let mut loss_at = |v: &[Vec<f32>], t: f64| -> Result<f64> {
        for (((name, _), x), (v, s)) in wrt.iter().zip(x0).zip(v.iter().zip(&scale)) {
            let d = ndarray::ArrayViewD::from_shape(x.shape(), v).map_err(|e| Error::Internal(e.to_string()))?;
            let step = (t * s) as f32;
            let moved = ndarray::Zip::from(x).and(&d).map_collect(|a, d| a + step * d);
            feed.insert(name.to_string(), Value::F32(moved));
        }
        let out = runner.run(feed);
        for (name, _) in wrt {
            feed.remove(*name);
        }
        let out = out?;
        Ok(out[loss]
            .as_f32()
            .and_then(|a| a.iter().next().copied())
            .unwrap_or(f32::NAN) as f64)
    };
    // One random direction: (|finite difference - analytic| of the step that judges it, its
    // error beyond what the difference resolves, relative to the expected size).
    let mut direction = |rng: &mut dagr_runtime::data::Rng| -> Result<(f64, f64)> {
        let v: Vec<Vec<f32>> = x0
            .iter()
            .map(|x| {
                (0..x.len())
                    .map(|_| if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 })
                    .collect()
            })
            .collect();
        let analytic: f64 = wrt
            .iter()
            .zip(&v)
            .zip(&scale)
            .map(|(((_, g), v), s)| s * g.iter().zip(v).map(|(g, d)| *g as f64 * *d as f64).sum::<f64>())
            .sum();
        // Steps of 0.1 %, 0.01 % and 0.001 % of the typical entry, each an estimate whose
        // uncertainty is its disagreement with the step doubled plus float32 rounding of the
        // loss over the step. Kinks of ReLU and max pooling spoil large steps (many kinks within
        // a step bias both of its differences alike, so their disagreement can understate it:
        // at 1 % they do, by 10-40 %, on small ResNets whose gradients are exact),
        // rounding small ones: the analytic value is accepted where it lies within the
        // uncertainty of any step whose rounding is at most 25 % of the derivative's expected
        // size (where none is, the most certain step decides: a gradient too small for float32
        // to resolve is not called wrong), and the first step that accepts it ends the search.
        let mut steps: Vec<Step> = Vec::new();
        for t in [1e-3, 1e-4, 1e-5] {
            let (lp, lm) = (loss_at(&v, t)?, loss_at(&v, -t)?);
            let fd = (lp - lm) / (2.0 * t);
            let fd2 = (loss_at(&v, 2.0 * t)? - loss_at(&v, -2.0 * t)?) / (4.0 * t);
            // Each loss within 2 eps |L| (1 to 4 units in its last place): fd within 2 eps |L| / t.
            let rounding = 2.0 * f32::EPSILON as f64 * lp.abs().max(lm.abs()) / t;
            let unresolved = (fd - fd2).abs() + rounding;
            let err = (fd - analytic).abs();
            // A non-finite loss or difference is never within anything.
            let beyond = if err.is_finite() && unresolved.is_finite() {
                (err - unresolved).max(0.0) / norm
            } else {
                f64::INFINITY
            };
            let step = Step {
                unresolved,
                beyond,
                err,
                resolves: rounding <= RESOLVED * norm,
            };
            steps.push(step);
            if step.resolves && beyond <= FD_TOLERANCE {
                break;
            }
        }
        let by_beyond = |a: &&Step, b: &&Step| a.beyond.total_cmp(&b.beyond);
        let judge = steps
            .iter()
            .filter(|s| s.resolves)
            .min_by(by_beyond)
            .or_else(|| steps.iter().min_by(|a, b| a.unresolved.total_cmp(&b.unresolved)));
        Ok(judge.map_or((f64::NAN, f64::INFINITY), |s| (s.err, s.beyond)))
    };
    let (mut worst, mut worst_abs) = (0f64, 0f64);
    for _ in 0..dirs {
        let (mut err, mut beyond) = direction(rng)?;
        if beyond > FD_TOLERANCE {
            // A direction that fails is drawn again, independently: an honest gradient fails one
            // only where kinks and rounding spoil all its steps together (av_cnn's graph, a
            // convolution before BatchNorm over 4 samples, ReLU and max pooling, failed so for 4
            // of 16 random input draws; with one redraw for 1 of 40), which another direction
            // rarely repeats; a wrong gradient is off along most directions.
            for _ in 0..FD_REDRAWS {
                let (e2, b2) = direction(rng)?;
                if b2 < beyond {
                    (err, beyond) = (e2, b2);
                }
                if beyond <= FD_TOLERANCE {
                    break;
                }
            }
        }
        worst_abs = worst_abs.max(err / unit);
        worst = worst.max(beyond);
    }
    Ok((worst_abs, worst))
}
