//! Helpers shared by the integration tests. Tests that need ONNX Runtime or the onnx checker
//! fail (never skip) when `scripts/setup.sh` has not been run.
#![allow(dead_code)]

use dagr_inject::dagr::{self, Config, Dispersion, Reduce, Variant};
use dagr_inject::onnx::{self, Model};
use dagr_inject::runtime::{self, Backend, Tensors, Value};
use ndarray::ArrayD;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const BACKENDS: [Backend; 2] = [Backend::Tract, Backend::Ort];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn models() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    v.sort();
    assert!(v.len() >= 6, "models/ should hold the exported models");
    v
}

pub fn model_inputs(model: &Path) -> Tensors {
    let name = model.file_name().unwrap().to_str().unwrap();
    let base = name.split('.').next().unwrap();
    dagr_inject::npz::read(&root().join(format!("models/{base}.inputs.npz"))).unwrap()
}

/// The project's Python (made by scripts/setup.sh), with onnx and onnxruntime.
pub fn venv_python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh first (it installs onnx and onnxruntime)",
        p.display()
    );
    p
}

/// `onnx.checker.check_model(full_check=True)` on a file.
pub fn onnx_check(path: &Path) {
    onnx_check_all(&[path.to_path_buf()]);
}

/// `onnx.checker.check_model(full_check=True)` on every file, in one Python process.
pub fn onnx_check_all(paths: &[PathBuf]) {
    if paths.is_empty() {
        return;
    }
    let script = "import onnx, sys\nbad = []\nfor p in sys.argv[1:]:\n    try:\n        onnx.checker.check_model(onnx.load(p), full_check=True)\n    except Exception as e:\n        bad.append(f'{p}: {e}')\nprint('\\n'.join(bad), file=sys.stderr)\nsys.exit(1 if bad else 0)";
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(script)
        .args(paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "onnx.checker rejected:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Files to pass through `onnx.checker` together, in one Python process, when the test ends
/// (when it has not failed already). Declare it after the directory the files are in, so that
/// it is dropped first.
#[derive(Default)]
pub struct OnnxChecks(Vec<PathBuf>);

impl OnnxChecks {
    pub fn add(&mut self, path: &Path) {
        self.0.push(path.to_path_buf());
    }
}

impl Drop for OnnxChecks {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            onnx_check_all(&self.0);
        }
    }
}

/// Make sure ONNX Runtime can be loaded: a test that needs it fails here if it is missing.
pub fn require_ort() {
    if let Err(m) = runtime::ort_backend::locate_library() {
        panic!("ONNX Runtime is required by this test: {m}");
    }
}

pub fn run(backend: Backend, path: &Path, inputs: &Tensors, outputs: &[String]) -> Tensors {
    if backend == Backend::Ort {
        require_ort();
    }
    runtime::run(backend, path, inputs, outputs)
        .unwrap_or_else(|e| panic!("{} on {}: {e}", backend.name(), path.display()))
}

pub fn f32_of(t: &Tensors, name: &str) -> ArrayD<f32> {
    t.get(name)
        .and_then(Value::as_f32)
        .unwrap_or_else(|| panic!("missing float output {name}"))
        .clone()
}

/// Normwise relative error: max |a - b| / max(max |b|, floor); NaN where a difference is.
pub fn rel_err(a: &ArrayD<f32>, b: &ArrayD<f64>, floor: f64) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shape mismatch");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(floor);
    max_abs_diff(a, b) / scale
}

/// The largest |a - b| over paired elements, and NaN if any difference is NaN: `f64::max`
/// drops a NaN, so a fold with it lets a NaN gradient pass every bound.
pub fn max_abs_diff<'a, 'b, A, B>(a: impl IntoIterator<Item = &'a A>, b: impl IntoIterator<Item = &'b B>) -> f64
where
    A: Copy + Into<f64> + 'a,
    B: Copy + Into<f64> + 'b,
{
    a.into_iter().zip(b).fold(0.0, |m, (x, y)| {
        let d = ((*x).into() - (*y).into()).abs();
        if m.is_nan() || d.is_nan() {
            f64::NAN
        } else {
            m.max(d)
        }
    })
}

#[derive(Debug, Deserialize, Clone)]
pub struct Case {
    pub name: String,
    pub reduce: String,
    pub tau: f64,
    pub delta: f64,
    pub lambda_disp: f64,
    pub lambda_anc: f64,
    pub dispersion: String,
    pub margin: f64,
    pub variant: String,
    pub shapes: Vec<Vec<i64>>,
}

impl Case {
    pub fn config(&self, encoders: Vec<String>) -> Config {
        Config {
            encoders,
            reduce: if self.reduce == "mean" {
                Reduce::Mean
            } else {
                Reduce::Flatten
            },
            tau: self.tau,
            delta: self.delta,
            lambda_disp: self.lambda_disp,
            lambda_anc: self.lambda_anc,
            dispersion: if self.dispersion == "hinge" {
                Dispersion::Hinge { margin: self.margin }
            } else {
                Dispersion::Rbf
            },
            variant: match self.variant.as_str() {
                "dagr" => Variant::Dagr,
                "disp-only" => Variant::DispOnly,
                "anchor-only" => Variant::AnchorOnly,
                "naive-align" => Variant::NaiveAlign,
                "unit-sphere" => Variant::UnitSphere,
                v => panic!("unknown variant {v}"),
            },
            task: Default::default(),
        }
    }
    pub fn names(&self) -> Vec<String> {
        (0..self.shapes.len()).map(|m| format!("m{m}")).collect()
    }
}

pub fn cases() -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/dagr_cases.json")).unwrap()).unwrap()
}

pub fn fixture() -> Tensors {
    dagr_inject::npz::read(&root().join("fixtures/dagr_reference.npz")).unwrap()
}

/// The fixture arrays, read as f64 (the library's npz reader gives the f32 the models take).
pub fn fixture_f64() -> std::collections::BTreeMap<String, ArrayD<f64>> {
    npz_f64(&root().join("fixtures/dagr_reference.npz"))
}

/// Every float array of an .npz, as f64.
pub fn npz_f64(path: &Path) -> std::collections::BTreeMap<String, ArrayD<f64>> {
    use ndarray_npy::NpzReader;
    let mut r = NpzReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for n in r.names().unwrap() {
        let key = n.trim_end_matches(".npy").to_string();
        if let Ok(a) = r.by_name::<ndarray::OwnedRepr<f64>, ndarray::IxDyn>(&n) {
            out.insert(key, a);
        } else if let Ok(a) = r.by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(&n) {
            out.insert(key, a.mapv(|v| v as f64));
        }
    }
    out
}

/// A DAGR block for `case`, written to a temporary directory.
pub fn block_for(case: &Case, dir: &Path) -> (PathBuf, Model, dagr::Injected) {
    let names = case.names();
    let trailing: Vec<Vec<i64>> = case.shapes.iter().map(|s| s[1..].to_vec()).collect();
    let mut model = dagr::block::skeleton_shaped(&names, &trailing, 17).unwrap();
    let entries = names.iter().map(|n| format!("{n}={n}/z")).collect();
    let done = dagr::inject(&mut model, &case.config(entries)).unwrap();
    let path = dir.join(format!("{}.onnx", case.name));
    onnx::save(&model, &path).unwrap();
    (path, model, done)
}

/// The value of each symbolic input dimension in `feed` (for evaluating inferred shapes).
pub fn bindings(idx: &dagr_inject::onnx::GraphIndex, feed: &Tensors) -> std::collections::HashMap<String, i64> {
    let mut env = std::collections::HashMap::new();
    for (name, v) in feed {
        let Some(shape) = idx.fact(name).and_then(|f| f.shape.clone()) else {
            continue;
        };
        for (d, &n) in shape.iter().zip(v.shape()) {
            if let dagr_inject::onnx::Dim::Sym(e) = d {
                let syms: Vec<&String> = e.symbols().collect();
                if let [one] = syms.as_slice() {
                    if d.to_string() == **one {
                        env.insert(one.to_string(), n as i64);
                    }
                }
            }
        }
    }
    env
}

/// `d/dt loss(params + t v)` at 0 by central differences equals `sum <grad, v>`, for a random
/// direction `v` over the given parameters (float32: a check at 2 %, which a wrong rule misses
/// by far more). `v` moves every coordinate of a tensor of up to 4096 elements and 4096 random
/// coordinates of a larger one, each by up to its tensor's RMS times the step. `path` is a
/// model that reads the parameters as inputs. Of `steps`, the first at which the difference
/// agrees passes (too large a step leaves the linear range of a network with large
/// activations, too small a one meets float32's rounding: a wrong gradient agrees at none).
pub fn directional_check(
    label: &str,
    m: &dagr_inject::onnx::Model,
    path: &std::path::Path,
    feed: &Tensors,
    loss: &str,
    params: &[(String, ndarray::ArrayD<f32>)],
    steps: &[f32],
) {
    const DENSE: usize = 4096;
    if params.is_empty() {
        return;
    }
    let mut rng = dagr_inject::runtime::data::Rng(7);
    let mut uniform = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
    let (mut analytic, mut spread) = (0f64, 0f64);
    // (name, values, coordinates moved with their direction)
    let mut dirs = Vec::new();
    for (name, grad) in params {
        let init = m.graph().initializer.iter().find(|i| &i.name == name).unwrap();
        let v0 = dagr_inject::onnx::tensor::to_f32(init, &m.base_dir).unwrap();
        let shape: Vec<usize> = init.dims.iter().map(|&d| d as usize).collect();
        let v0 = ndarray::ArrayD::from_shape_vec(shape, v0).unwrap();
        let n = v0.len();
        let coords: Vec<usize> = if n <= DENSE {
            (0..n).collect()
        } else {
            (0..DENSE).map(|_| (uniform() * n as f32) as usize % n).collect()
        };
        let flat = v0.as_slice().unwrap();
        let ms = coords.iter().map(|&i| (flat[i] * flat[i]) as f64).sum::<f64>() / coords.len().max(1) as f64;
        let rms = ms.sqrt() as f32 + 1e-2;
        let g = grad.as_slice().unwrap();
        let moved: Vec<(usize, f32)> = coords.into_iter().map(|i| (i, (uniform() * 2.0 - 1.0) * rms)).collect();
        for &(i, d) in &moved {
            analytic += g[i] as f64 * d as f64;
            spread += (g[i] as f64 * d as f64).powi(2);
        }
        dirs.push((name.clone(), v0, moved));
    }
    // One session for every evaluation.
    let outs = [loss.to_string()];
    let mut runner =
        dagr_inject::runtime::Runner::new(Backend::Ort, path, feed, &outs).unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut l = |f: &Tensors| {
        f32_of(&runner.run(f).unwrap_or_else(|e| panic!("{label}: {e}")), loss)
            .iter()
            .next()
            .copied()
            .unwrap() as f64
    };
    let tol = 2e-2 * analytic.abs().max(spread.sqrt()) + 1e-3;
    let mut seen = Vec::new();
    for &t in steps {
        let (mut plus, mut minus) = (feed.clone(), feed.clone());
        for (name, v0, moved) in &dirs {
            let (mut p, mut q) = (v0.clone(), v0.clone());
            let (ps, qs) = (p.as_slice_mut().unwrap(), q.as_slice_mut().unwrap());
            for &(i, d) in moved {
                ps[i] += t * d;
                qs[i] -= t * d;
            }
            plus.insert(name.clone(), dagr_inject::runtime::Value::F32(p));
            minus.insert(name.clone(), dagr_inject::runtime::Value::F32(q));
        }
        let fd = (l(&plus) - l(&minus)) / (2.0 * t as f64);
        if (fd - analytic).abs() <= tol {
            return;
        }
        seen.push(format!("{fd} at step {t}"));
    }
    panic!(
        "{label}: directional derivative over {} parameters: gradients {analytic}, finite differences {}",
        params.len(),
        seen.join(", ")
    );
}

/// Fails listing every failure, when there are any.
pub fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Move every float initializer of `m` into `weights.bin` beside `dir/name`.
pub fn externalize(m: &Model, dir: &Path, name: &str) -> Model {
    let mut m = m.clone();
    m.source = None;
    m.base_dir = dir.to_path_buf();
    let mut blob: Vec<u8> = Vec::new();
    for t in m.graph_mut().initializer.iter_mut() {
        if t.data_type != 1 || t.raw_data.is_empty() {
            continue;
        }
        let off = blob.len();
        blob.extend_from_slice(&t.raw_data);
        t.raw_data.clear();
        t.data_location = onnx::proto::tensor_proto::DataLocation::EXTERNAL.into();
        for (k, v) in [
            ("location", "weights.bin".to_string()),
            ("offset", off.to_string()),
            ("length", (blob.len() - off).to_string()),
        ] {
            let mut e = onnx::proto::StringStringEntryProto::new();
            e.key = k.into();
            e.value = v;
            t.external_data.push(e);
        }
    }
    std::fs::write(dir.join("weights.bin"), &blob).unwrap();
    onnx::save(&m, &dir.join(name)).unwrap();
    m
}

/// The `dagr-inject` command line, built by cargo for the tests.
pub fn bin() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("dagr-inject").unwrap()
}

/// `dagr-inject SRC --encoders E --train --logits logits --labels y -o OUT`, which must succeed.
pub fn cli_train(src: &std::path::Path, encoders: &str, out: &std::path::Path) {
    bin()
        .args([src.to_str().unwrap(), "--encoders", encoders, "--train"])
        .args(["--logits", "logits", "--labels", "y", "-o", out.to_str().unwrap()])
        .assert()
        .success();
}

/// `dagr-inject verify TRAIN --original SRC --backend ort`, which must succeed; the assertion,
/// for what its report must say.
pub fn cli_verify(train: &std::path::Path, original: &std::path::Path) -> assert_cmd::assert::Assert {
    bin()
        .args([
            "verify",
            train.to_str().unwrap(),
            "--original",
            original.to_str().unwrap(),
        ])
        .args(["--backend", "ort"])
        .assert()
        .success()
}

/// A model of this graph at default-domain `opset` (IR 8).
pub fn model_of(g: dagr_inject::onnx::proto::GraphProto, opset: i64) -> dagr_inject::onnx::Model {
    let mut p = dagr_inject::onnx::proto::ModelProto::new();
    p.ir_version = 8;
    let mut o = dagr_inject::onnx::proto::OperatorSetIdProto::new();
    o.version = opset;
    p.opset_import.push(o);
    p.graph = protobuf::MessageField::some(g);
    dagr_inject::onnx::Model {
        proto: p,
        base_dir: ".".into(),
        source: None,
    }
}

/// A reference file of `in/<input>` and `grad/<param>` arrays (`models/own_loss`,
/// `models/old_opset`): the feed of the inputs named, and every array in float64.
pub fn reference_npz(path: &Path, inputs: &[&str]) -> (Tensors, std::collections::BTreeMap<String, ArrayD<f64>>) {
    let all = dagr_inject::npz::read(path).unwrap();
    let feed = inputs
        .iter()
        .map(|k| (k.to_string(), all[&format!("in/{k}")].clone()))
        .collect();
    (feed, npz_f64(path))
}

/// `dagr-inject verify TRAIN --original SRC` passes, then 3 epochs of `dagr-inject train` on
/// DATA (batches of 6) reach the same final loss on ONNX Runtime and tract (runs written under
/// `out`).
pub fn verify_and_train_alike(train: &Path, src: &Path, data: &Path, out: &Path) {
    cli_verify(train, src);
    let last: Vec<f64> = ["ort", "tract"]
        .iter()
        .map(|backend| {
            let run = bin()
                .args(["train", train.to_str().unwrap(), "--data", data.to_str().unwrap()])
                .args(["--epochs", "3", "--batch-size", "6", "--backend", backend])
                .args(["--original", src.to_str().unwrap()])
                .args(["--out", out.join(backend).to_str().unwrap()])
                .assert()
                .success()
                .get_output()
                .clone();
            let text = String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
            text.rsplit("final loss ")
                .next()
                .and_then(|t| t.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} on {backend}: no final loss in {text}", train.display()))
        })
        .collect();
    assert!(
        (last[0] - last[1]).abs() <= 1e-4 * last[0].abs().max(1.0),
        "{}: 3 epochs end at loss {} on ONNX Runtime and {} on tract",
        train.display(),
        last[0],
        last[1]
    );
}

/// The training graph at `train`, run on both backends with `feed`: every parameter gradient it
/// outputs equals the reference's `grad/<param>` to 1e-4 relative (`rel_err` with `floor`), and
/// there are `params` of them.
pub fn gradients_match_reference(
    train: &Path,
    feed: &Tensors,
    reference: &std::collections::BTreeMap<String, ArrayD<f64>>,
    floor: f64,
    params: usize,
) {
    let m = onnx::load(train).unwrap();
    let rec = dagr_inject::train::record_of(&m).unwrap();
    let outs: Vec<String> = rec.params.iter().map(|p| p.1.clone()).collect();
    assert_eq!(
        rec.params.len(),
        params,
        "{}: every torch parameter trains",
        train.display()
    );
    for backend in [Backend::Ort, Backend::Tract] {
        let out = run(backend, train, feed, &outs);
        for (p, g) in &rec.params {
            let e = rel_err(&f32_of(&out, g), &reference[&format!("grad/{p}")], floor);
            assert!(
                e <= 1e-4,
                "{} on {}: d loss / d {p} differs from the reference by {e}",
                train.display(),
                backend.name()
            );
        }
    }
}
