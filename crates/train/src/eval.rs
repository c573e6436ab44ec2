//! Running a model over a dataset: the batched outputs of a rewritten model (embeddings,
//! heads), and the geometry of its embeddings.

use dagr_core::geometry::{accuracy, geometry, Modality, Pair};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{self as onnx};
use dagr_runtime::data::Dataset;
use dagr_runtime::{Backend, Runner, Tensors, Value};
use ndarray::{Array2, ArrayD, Axis};
use std::collections::BTreeMap;
use std::path::Path;

/// The outputs `outs` of the model at `path` on every batch of `data` (each batch changed by
/// `edit` first); every output must be float32 `[batch, width]`. Runners are kept per batch
/// size in `runners`, for reuse across calls.
pub fn run_all(
    runners: &mut BTreeMap<usize, Runner>,
    backend: Backend,
    path: &Path,
    data: &Dataset,
    outs: &[String],
    edit: &mut dyn FnMut(&mut Tensors),
) -> Result<BTreeMap<String, Vec<ArrayD<f32>>>> {
    let mut res: BTreeMap<String, Vec<ArrayD<f32>>> = BTreeMap::new();
    for rows in data.batches(256, None, false) {
        let mut b = data.batch(&rows);
        edit(&mut b);
        let r = match runners.entry(rows.len()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(Runner::new(backend, path, &b, outs)?),
        };
        let out = r.run(&b)?;
        for o in outs {
            let v = out
                .get(o)
                .ok_or_else(|| Error::Internal(format!("the model returned no output '{o}'")))?;
            let a = v.as_f32().filter(|a| a.ndim() == 2).ok_or_else(|| {
                Error::Config(format!(
                    "output '{o}' is {} of shape {:?}; embeddings and heads must be float32 [batch, width] (logits: [batch, classes])",
                    v.dtype_name(),
                    v.shape()
                ))
            })?;
            res.entry(o.clone()).or_default().push(a.clone());
        }
    }
    Ok(res)
}

/// Batches of a `[batch, width]` output (checked by `run_all`), stacked.
pub fn stack(parts: &[ArrayD<f32>]) -> Array2<f64> {
    let views: Vec<ndarray::ArrayView2<f32>> = parts
        .iter()
        .filter_map(|p| p.view().into_dimensionality().ok())
        .collect();
    ndarray::concatenate(Axis(0), &views)
        .map(|a| a.mapv(|v| v as f64))
        .unwrap_or_else(|_| Array2::zeros((0, 0)))
}

/// Geometry of the embeddings of the model at `path` (rewritten by dagr-inject) on `data`.
pub fn geometry_on(
    path: &Path,
    data: &Dataset,
    labels: Option<&str>,
    backend: Backend,
) -> Result<(Vec<Modality>, Vec<Pair>)> {
    let model = onnx::load(path)?;
    let rec = dagr_core::record_of(&model)
        .ok_or_else(|| Error::Config("the model was not rewritten by dagr-inject".into()))?;
    let y: Option<Vec<i64>> = match labels.and_then(|l| data.arrays.get(l)) {
        Some(Value::I64(a)) => Some(a.iter().copied().collect()),
        _ => None,
    };
    let outs: Vec<String> = rec.outputs.embeddings.iter().map(|e| e.1.clone()).collect();
    let mut runners = BTreeMap::new();
    let res = run_all(&mut runners, backend, path, data, &outs, &mut |_| {})?;
    let us: Vec<Array2<f64>> = outs.iter().map(|o| stack(&res[o])).collect();
    Ok(geometry(&rec.outputs.embeddings, &us, y.as_deref()))
}

/// Accuracy of every head of the model at `path` (an inference model) on `data`, against the
/// int64 labels `labels`.
pub fn accuracy_on(
    path: &Path,
    backend: Backend,
    data: &Dataset,
    heads: &[String],
    labels: &str,
) -> Result<BTreeMap<String, f64>> {
    let Some(Value::I64(y)) = data.arrays.get(labels) else {
        return Err(Error::Data(format!(
            "the validation data has no int64 array '{labels}'"
        )));
    };
    let y: Vec<i64> = y.iter().copied().collect();
    let res = run_all(&mut BTreeMap::new(), backend, path, data, heads, &mut |_| {})?;
    Ok(heads
        .iter()
        .map(|h| {
            let logits = res.get(h).map(|p| stack(p)).unwrap_or_else(|| Array2::zeros((0, 0)));
            (h.clone(), accuracy(&logits, &y))
        })
        .collect())
}
