//! Datasets from `.npz` files: arrays named after the graph inputs (and the label input),
//! checked against the graph before the first step; seeded shuffling and batching.

use crate::{Tensors, Value};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{dtype, Dim, GraphIndex};
use ndarray::Axis;
use std::path::Path;

pub use dagr_onnx::rng::Rng;

pub struct Dataset {
    pub arrays: Tensors,
    pub len: usize,
}

impl Dataset {
    /// Load `path` and check it against the inputs the training graph needs.
    pub fn load(path: &Path, idx: &GraphIndex, inputs: &[String], labels: Option<(&str, i64)>) -> Result<Dataset> {
        Self::load_with(path, idx, inputs, labels, &[])
    }

    /// `load`, also reading the arrays named in `also` when the file has them. Only the arrays
    /// named are read; a float array holding NaN or infinity is refused.
    pub fn load_with(
        path: &Path,
        idx: &GraphIndex,
        inputs: &[String],
        labels: Option<(&str, i64)>,
        also: &[&str],
    ) -> Result<Dataset> {
        let wanted: Vec<String> = inputs
            .iter()
            .cloned()
            .chain(labels.map(|l| l.0.to_string()))
            .chain(also.iter().map(|s| s.to_string()))
            .collect();
        let arrays = crate::npz::read_only(path, &wanted)?;
        let bad = |m: String| Error::Data(format!("{}: {m}", path.display()));
        let mut len = None;
        for name in inputs {
            let v = arrays.get(name).ok_or_else(|| {
                bad(format!(
                    "no array named '{name}' (the graph input); arrays present: {}",
                    crate::npz::Npz::open(path)
                        .map(|z| z.names().join(", "))
                        .unwrap_or_default()
                ))
            })?;
            let f = idx.fact(name).cloned().unwrap_or_default();
            let want = f.dtype;
            let got = match v {
                Value::F32(_) => dtype::FLOAT,
                Value::I64(_) => dtype::INT64,
                Value::Bool(_) => dtype::BOOL,
            };
            // Integers are held as int64 and fed to an int32 input as int32 (the backends narrow).
            let narrowed = got == dtype::INT64 && want == dtype::INT32;
            if want != 0 && want != got && !narrowed {
                return Err(bad(format!(
                    "'{name}' has type {}, the graph input wants {}",
                    dtype::name(got),
                    dtype::name(want)
                )));
            }
            if let Value::F32(a) = v {
                if let Some(i) = a.iter().position(|x| !x.is_finite()) {
                    let per = a.len() / a.shape().first().copied().unwrap_or(1).max(1);
                    return Err(bad(format!(
                        "'{name}' holds a non-finite value ({}) in sample {}\n  hint: clean or impute the data before training",
                        a.iter().nth(i).copied().unwrap_or(f32::NAN),
                        i / per.max(1)
                    )));
                }
            }
            let shape = v.shape();
            if let Some(s) = &f.shape {
                let ok = s.len() == shape.len()
                    && s.iter()
                        .zip(shape)
                        .skip(1)
                        .all(|(d, &n)| !matches!(d, Dim::Known(k) if *k as usize != n));
                if !ok {
                    return Err(bad(format!(
                        "'{name}' has shape {shape:?}, the graph input wants {} (any batch size)",
                        f.shape_string()
                    )));
                }
            }
            let n = shape.first().copied().unwrap_or(0);
            match len {
                None => len = Some(n),
                Some(l) if l != n => {
                    return Err(bad(format!("'{name}' has {n} samples but other arrays have {l}")));
                }
                _ => {}
            }
        }
        if let Some((lab, classes)) = labels {
            if let Some(Value::I64(y)) = arrays.get(lab) {
                if let Some(bad_label) = y.iter().find(|&&v| v < 0 || v >= classes) {
                    return Err(bad(format!(
                        "label {bad_label} in '{lab}' is out of range: the heads have {classes} classes"
                    )));
                }
            }
        }
        let len = len.unwrap_or(0);
        if len == 0 {
            return Err(bad("the dataset is empty".into()));
        }
        Ok(Dataset { arrays, len })
    }

    /// The samples at `rows`, as a batch.
    pub fn batch(&self, rows: &[usize]) -> Tensors {
        self.arrays
            .iter()
            .filter(|(_, v)| v.shape().first() == Some(&self.len))
            .map(|(k, v)| {
                let v = match v {
                    Value::F32(a) => Value::F32(a.select(Axis(0), rows)),
                    Value::I64(a) => Value::I64(a.select(Axis(0), rows)),
                    Value::Bool(a) => Value::Bool(a.select(Axis(0), rows)),
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// Batches of one epoch: shuffled with `rng` (or in order), the last partial batch kept
    /// unless `drop_last`.
    pub fn batches(&self, batch_size: usize, rng: Option<&mut Rng>, drop_last: bool) -> Vec<Vec<usize>> {
        let order = match rng {
            Some(r) => r.permutation(self.len),
            None => (0..self.len).collect(),
        };
        order
            .chunks(batch_size.max(1))
            .filter(|c| !drop_last || c.len() == batch_size)
            .map(|c| c.to_vec())
            .collect()
    }
}
