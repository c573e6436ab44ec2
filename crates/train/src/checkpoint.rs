//! Checkpoints: one file, `checkpoint.npz`, written atomically (a temporary file, fsynced,
//! renamed into place, the directory fsynced), so that whenever a kill lands the run directory
//! holds the previous checkpoint or the new one, whole. The file is a plain NumPy archive: every
//! state tensor (`param/`, `bn/`, `m/`, `v/` keys) and a `__checkpoint__` entry, the JSON record
//! of the run's progress and settings as uint8 bytes, whose SHA-256 covers the record and every
//! tensor. Loading refuses, naming the problem, anything it cannot honour: a damaged file, a
//! missing or ill-typed field, a missing, extra or misshapen tensor, a checksum mismatch.

use super::Settings;
use dagr_onnx::error::{Error, Result};
use dagr_runtime::npz::{self as npz, Npz};
use dagr_runtime::{StateValues, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The checkpoint's file name inside a run directory.
pub const FILE: &str = "checkpoint.npz";
/// The archive entry holding the record.
pub const RECORD_ENTRY: &str = "__checkpoint__";
/// The record's format; a checkpoint of another format is refused.
pub const FORMAT: u32 = 2;

/// What a checkpoint records besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub format: u32,
    /// Steps taken and epochs completed.
    pub step: usize,
    pub epoch: usize,
    /// The shuffling generator's state after `epoch` epochs.
    pub rng: u64,
    /// The settings the run was made with.
    pub settings: Settings,
    /// The training graph it trains.
    pub model: PathBuf,
    /// SHA-256 (hex) of the record with this field empty, then of every tensor: key, shape and
    /// little-endian bytes, in key order.
    #[serde(default)]
    pub sha256: String,
}

/// The checksum of a record and the state, fed tensor by tensor in key order.
struct Checksum(Sha256);

impl Checksum {
    fn new(record: &Record) -> Result<Checksum> {
        let mut r = record.clone();
        r.sha256.clear();
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&r).map_err(|e| Error::Internal(format!("checkpoint record: {e}")))?);
        Ok(Checksum(h))
    }

    /// One state tensor: its key, its shape and its values' little-endian bytes.
    fn tensor(&mut self, key: &str, v: ndarray::ArrayViewD<'_, f32>) {
        let h = &mut self.0;
        h.update((key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        for &d in v.shape() {
            h.update((d as u64).to_le_bytes());
        }
        let v = v.as_standard_layout();
        h.update(dagr_onnx::tensor::f32_le_bytes(v.as_slice().unwrap_or(&[])));
    }

    fn finish(self) -> String {
        format!("{:x}", self.0.finalize())
    }
}

/// A source of the state's tensors, by key in key order (see `StateStepper::visit_state`).
pub type Visit<'a> = dyn Fn(&mut dyn FnMut(&str, ndarray::ArrayViewD<'_, f32>) -> Result<()>) -> Result<()> + 'a;

/// Write the state `visit` gives (in key order) and `record` (its checksum filled in here) to
/// `dir/checkpoint.npz`, streaming each tensor from where it lives to the file (no copy of the
/// state is made). A state holding a non-finite value is refused: a good checkpoint is never
/// replaced by a bad one.
pub fn save(dir: &Path, record: &Record, visit: &Visit<'_>) -> Result<()> {
    let path = dir.join(FILE);
    dagr_onnx::io::write_atomic_try(&path, |file| {
        let werr = |source| Error::Write {
            path: path.clone(),
            source,
        };
        let mut r = record.clone();
        let mut d = Checksum::new(&r)?;
        let mut w = npz::Writer::new(file);
        visit(&mut |k, v| {
            let finite = match v.as_slice() {
                Some(s) => s.iter().all(|x| x.is_finite()),
                None => v.iter().all(|x| x.is_finite()),
            };
            if !finite {
                return Err(Error::Data(format!(
                    "refusing to write a checkpoint whose '{k}' holds non-finite values; the previous checkpoint is kept"
                )));
            }
            d.tensor(k, v.view());
            w.f32(k, v).map_err(werr)
        })?;
        r.sha256 = d.finish();
        let json = serde_json::to_vec_pretty(&r).map_err(|e| Error::Internal(format!("checkpoint record: {e}")))?;
        w.bytes(RECORD_ENTRY, &json).map_err(werr)?;
        w.finish().map_err(werr)
    })
}

/// `save` from state values held in memory.
pub fn save_values(dir: &Path, record: &Record, state: &StateValues) -> Result<()> {
    save(dir, record, &|f| state.iter().try_for_each(|(k, v)| f(k, v.view())))
}

/// True when `dir` holds a checkpoint file.
pub fn exists(dir: &Path) -> bool {
    dir.join(FILE).is_file()
}

/// The tensor entries of the checkpoint in `dir` (without reading them).
pub fn entries(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join(FILE);
    let z = Npz::open(&path).map_err(|e| damaged(&path, e.to_string()))?;
    Ok(z.names().into_iter().filter(|n| n != RECORD_ENTRY).collect())
}

fn damaged(path: &Path, m: String) -> Error {
    Error::Data(format!(
        "the checkpoint {} cannot be resumed: {m}\n  hint: restore a good copy, or start over with `force`",
        path.display()
    ))
}

/// The record of the checkpoint in `dir`, checked for its fields and format (not yet against
/// the tensors' checksum, which `load` checks).
pub fn record(dir: &Path) -> Result<Record> {
    let path = dir.join(FILE);
    let mut z = Npz::open(&path).map_err(|e| damaged(&path, e.to_string()))?;
    read_record(&mut z).map_err(|m| damaged(&path, m))
}

fn read_record(z: &mut Npz) -> std::result::Result<Record, String> {
    if !z.names().iter().any(|n| n == RECORD_ENTRY) {
        return Err(format!(
            "it has no '{RECORD_ENTRY}' record (written by an older dagr-inject, or not a checkpoint)"
        ));
    }
    let bytes = z.bytes(RECORD_ENTRY).map_err(|e| e.to_string())?;
    let record: Record =
        serde_json::from_slice(&bytes).map_err(|e| format!("its record is unreadable or incomplete ({e})"))?;
    if record.format != FORMAT {
        return Err(format!(
            "its record has format {}, this version reads format {FORMAT}",
            record.format
        ));
    }
    Ok(record)
}

/// Read and check `dir/checkpoint.npz` against the state a run holds (`shapes`, by key).
pub fn load(dir: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> Result<(Record, StateValues)> {
    let mut state = StateValues::new();
    let record = load_each(dir, shapes, &mut |k, a| {
        state.insert(k.to_string(), a);
        Ok(())
    })?;
    Ok((record, state))
}

/// `load`, one tensor at a time: each entry of `shapes` (in key order) is read, checked and
/// handed to `take`, so that no more than one tensor of the checkpoint is held at once. The
/// checksum over all of them is checked at the end: where it fails (or any entry does), `take`
/// has already been given the entries before, and the caller must discard what it made of them.
pub fn load_each(
    dir: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
    take: &mut dyn FnMut(&str, ndarray::ArrayD<f32>) -> Result<()>,
) -> Result<Record> {
    let path = dir.join(FILE);
    let bad = |m: String| damaged(&path, m);
    let mut z = Npz::open(&path).map_err(|e| bad(e.to_string()))?;
    let names = z.names();
    let record = read_record(&mut z).map_err(bad)?;
    for n in &names {
        if n != RECORD_ENTRY && !shapes.contains_key(n) {
            return Err(bad(format!(
                "it holds '{n}', which this run does not (another model or optimizer?)"
            )));
        }
    }
    let mut d = Checksum::new(&record)?;
    for (k, shape) in shapes {
        if !names.contains(k) {
            return Err(bad(format!("it has no entry '{k}'")));
        }
        let Value::F32(a) = z.array(k).map_err(|e| bad(e.to_string()))? else {
            return Err(bad(format!("its entry '{k}' is not float32")));
        };
        if a.shape() != shape.as_slice() {
            return Err(bad(format!(
                "'{k}' has shape {:?}, the graph holds {shape:?} (it does not fit this training run)",
                a.shape()
            )));
        }
        d.tensor(k, a.view());
        take(k, a)?;
    }
    if d.finish() != record.sha256 {
        return Err(bad(
            "its checksum does not match its contents: it was changed or damaged after it was written".into(),
        ));
    }
    Ok(record)
}

/// The settings that must match for a resumed run to continue the same run: every one but the
/// number of epochs and where it runs (backend, device, threads). Returns one line per
/// difference.
pub fn differences(was: &Settings, now: &Settings) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(was), serde_json::to_value(now))
    else {
        return vec!["the settings cannot be compared".into()];
    };
    let free = ["epochs", "backend", "device", "device_index", "threads", "state_update"];
    let mut out = Vec::new();
    for (k, va) in &a {
        if free.contains(&k.as_str()) {
            continue;
        }
        let vb = b.get(k).cloned().unwrap_or(serde_json::Value::Null);
        if *va != vb {
            out.push(format!("{k}: checkpoint {va}, this run {vb}"));
        }
    }
    out
}
