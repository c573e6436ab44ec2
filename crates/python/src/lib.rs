//! The native part of the `dagr_inject` Python package (`python/dagr_inject/`): the library's
//! rewrites on serialized models, and the command line in-process. Models cross as ONNX bytes
//! (the Python side turns them into `onnx.ModelProto`), settings as JSON; library errors become
//! `ValueError` (what the caller passed is wrong) or `RuntimeError`, with the library's message.

use dagr_inject::dagr::training::{make_training_graph, TrainOptions};
use dagr_inject::dagr::Config;
use dagr_inject::onnx::{self, Model};
use dagr_inject::Error;
use protobuf::Message;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::PathBuf;

// The command's allocator: `dagr-inject train` run from Python trains in this process.
dagr_inject::jemalloc_keeping_freed_pages!();

fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Config(_)
        | Error::Encoder(_)
        | Error::NotOnnx { .. }
        | Error::InvalidModel(_)
        | Error::NameTaken { .. }
        | Error::NoGradientRule { .. }
        | Error::OpVersionUnsupported { .. }
        | Error::GradientUnsupported { .. }
        | Error::ShapeUnknown { .. }
        | Error::UnsupportedIr { .. } => PyValueError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}

fn json_err(what: &str, e: serde_json::Error) -> PyErr {
    PyValueError::new_err(format!("{what}: {e}"))
}

/// A model from its bytes; `base_dir` is where its external data lies (the directory of the
/// file it came from).
fn model_of(bytes: &[u8], base_dir: Option<PathBuf>) -> PyResult<Model> {
    let proto = onnx::proto::ModelProto::parse_from_bytes(bytes)
        .map_err(|e| PyValueError::new_err(format!("not a serialized ONNX model: {e}")))?;
    if proto.graph.is_none() {
        return Err(PyValueError::new_err("the ONNX model has no graph"));
    }
    Ok(Model {
        proto,
        base_dir: base_dir.unwrap_or_else(|| PathBuf::from(".")),
        source: None,
    })
}

fn bytes_of<'py>(py: Python<'py>, m: &Model) -> PyResult<Bound<'py, PyBytes>> {
    let b = m.to_bytes().map_err(py_err)?;
    Ok(PyBytes::new(py, &b))
}

/// `inject(model_bytes, base_dir, config_json, train, options_json)` -> (model bytes, record
/// JSON): DAGR added (or the training graph built when `train`), checked as the command checks
/// what it writes.
#[pyfunction]
#[pyo3(signature = (model, base_dir, config, train=false, options=None))]
fn inject<'py>(
    py: Python<'py>,
    model: &[u8],
    base_dir: Option<PathBuf>,
    config: &str,
    train: bool,
    options: Option<&str>,
) -> PyResult<(Bound<'py, PyBytes>, String)> {
    let cfg: Config = serde_json::from_str(config).map_err(|e| json_err("config", e))?;
    let opts: TrainOptions = match options {
        Some(o) => serde_json::from_str(o).map_err(|e| json_err("training options", e))?,
        None => TrainOptions::default(),
    };
    let mut m = model_of(model, base_dir)?;
    let record = py
        .detach(|| -> Result<String, Error> {
            if train {
                let rec = make_training_graph(&mut m, &cfg, &opts)?;
                dagr_inject::ops::infer::check(&m)?;
                serde_json::to_string(&rec).map_err(|e| Error::Internal(e.to_string()))
            } else {
                let done = dagr_inject::inject(&mut m, &cfg)?;
                serde_json::to_string(&done.record).map_err(|e| Error::Internal(e.to_string()))
            }
        })
        .map_err(py_err)?;
    Ok((bytes_of(py, &m)?, record))
}

/// `block(names, dim, config_json, opset)` -> model bytes: DAGR alone, one input `[batch, dim]`
/// per name (as `dagr-inject block`).
#[pyfunction]
fn block<'py>(
    py: Python<'py>,
    names: Vec<String>,
    dim: i64,
    config: &str,
    opset: i64,
) -> PyResult<Bound<'py, PyBytes>> {
    let cfg: Config = serde_json::from_str(config).map_err(|e| json_err("config", e))?;
    if !(2..=dagr_inject::limits::MAX_MODALITIES).contains(&names.len()) {
        return Err(PyValueError::new_err(format!(
            "DAGR needs between 2 and {} modalities, got {}",
            dagr_inject::limits::MAX_MODALITIES,
            names.len()
        )));
    }
    let (m, _) = dagr_inject::dagr::block::build(&names, dim, opset, &cfg).map_err(py_err)?;
    bytes_of(py, &m)
}

/// `inspect(model_bytes, base_dir)` -> the report as JSON (as `dagr-inject inspect --json`).
#[pyfunction]
fn inspect(model: &[u8], base_dir: Option<PathBuf>) -> PyResult<String> {
    let m = model_of(model, base_dir)?;
    let r = dagr_inject::inspect::report(&m).map_err(py_err)?;
    serde_json::to_string(&r).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The `dagr-inject` command, in this process: arguments (the program name first) in, exit
/// status out; it prints as the command does.
#[pyfunction]
fn run_cli(py: Python<'_>, args: Vec<String>) -> i32 {
    let args = args.into_iter().map(std::ffi::OsString::from).collect();
    py.detach(|| dagr_inject::cli::main_with(args))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(inject, m)?)?;
    m.add_function(wrap_pyfunction!(block, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(run_cli, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
