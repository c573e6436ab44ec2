//! The binary, run as a user would: `inspect`, `inject`, `block`, `run`, and every bad input:
//! one clear message, a non-zero exit, no panic, and no output file left behind.

use crate::common::*;
use dagr_inject::onnx;
use predicates::prelude::*;
use std::path::Path;

fn model(name: &str) -> String {
    root().join("models").join(name).to_str().unwrap().to_string()
}

/// `dagr-inject SRC --encoders audio_encoder,visual_encoder --train -o OUT`, which must fail; the
/// assertion, for what its message must say.
fn refused_train(src: &Path, out: &Path) -> assert_cmd::assert::Assert {
    bin()
        .args([
            src.to_str().unwrap(),
            "--encoders",
            "audio_encoder,visual_encoder",
            "--train",
        ])
        .args(["-o", out.to_str().unwrap()])
        .assert()
        .failure()
}

/// A Cast node `name` of `input` to the element type `to`, written to `output`.
fn cast_node(name: &str, input: &str, output: &str, to: i32) -> onnx::proto::NodeProto {
    let mut cast = onnx::proto::NodeProto::new();
    cast.op_type = "Cast".into();
    cast.name = name.into();
    cast.input = vec![input.into()];
    cast.output = vec![output.into()];
    cast.attribute.push(onnx::builder::attr_int("to", to as i64));
    cast
}

/// Runs a command that must fail; returns stderr. Checks no panic text and no output file.
fn fails(args: &[&str], out: Option<&Path>) -> String {
    let o = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?} panicked:\n{err}"
    );
    assert!(err.starts_with("error"), "{args:?}: {err}");
    if let Some(p) = out {
        assert!(!p.exists(), "{args:?} left {} behind", p.display());
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().flatten().collect();
        assert!(leftovers.is_empty(), "{args:?} left temporary files: {leftovers:?}");
    }
    err
}

#[test]
fn inspect_lists_io_and_encoder_candidates() {
    bin()
        .args(["inspect", &model("av_cnn.legacy.onnx")])
        .assert()
        .success()
        .stdout(predicate::str::contains("ai.onnx 17"))
        .stdout(predicate::str::contains("audio"))
        .stdout(predicate::str::contains("[batch, 3, 16, 16]"))
        .stdout(predicate::str::contains("--encoders audio_encoder"))
        .stdout(predicate::str::contains(
            "suggested: dagr-inject MODEL --encoders audio_encoder,visual_encoder",
        ));
    let o = bin()
        .args(["inspect", "--json", &model("tri_token.dynamo.onnx")])
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["opsets"]["ai.onnx"], 18);
    assert_eq!(v["inputs"].as_array().unwrap().len(), 3);
    assert!(v["parameters"].as_u64().unwrap() > 1000);
    assert_eq!(v["encoder_candidates"][0]["score"], 8);
}

/// `inspect` says whether `--train` can differentiate a model: here an op of a custom domain
/// on the audio encoder's path, named by inspect and by the `--train` error alike.
#[test]
fn inspect_names_the_ops_without_a_gradient_rule() {
    bin()
        .args(["inspect", &model("av_cnn.legacy.onnx")])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "gradients   every op between the parameters and the outputs has a rule",
        ));
    let dir = tempfile::tempdir().unwrap();
    let mut m = onnx::load(Path::new(&model("av_cnn.legacy.onnx"))).unwrap();
    let idx = dagr_inject::ops::index(&m).unwrap();
    let node = m
        .graph_mut()
        .node
        .iter_mut()
        .find(|n| n.op_type == "Relu" && n.name.starts_with("/audio_encoder"))
        .unwrap();
    node.domain = "com.example".into();
    node.op_type = "MyRelu".into();
    let name = node.name.clone();
    // Its output's type, as a user gives it for a custom op.
    let out = node.output[0].clone();
    let vi = idx.fact(&out).unwrap().to_value_info(&out);
    m.graph_mut().value_info.push(vi);
    let p = dir.path().join("custom.onnx");
    onnx::save(&m, &p).unwrap();
    bin()
        .args(["inspect", p.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "--train stops here: no gradient rule for com.example::MyRelu (1 nodes: {name})"
        )));
    bin()
        .args([
            p.to_str().unwrap(),
            "--encoders",
            "audio_encoder,visual_encoder",
            "--train",
        ])
        .args(["-o", dir.path().join("t.onnx").to_str().unwrap()])
        .assert()
        .failure()
        .stderr(predicate::str::contains("no gradient rule for com.example::MyRelu"));
}

#[test]
fn inject_shorthand_writes_the_model_and_inspect_shows_the_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("av_mlp.onnx");
    std::fs::copy(model("av_mlp.legacy.onnx"), &src).unwrap();
    bin()
        .args([src.to_str().unwrap(), "--encoders", "audio,visual", "--tau", "0.2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("dagr/grad/audio"));
    let out = dir.path().join("av_mlp.dagr.onnx");
    assert!(out.exists());
    onnx_check(&out);
    bin()
        .args(["inspect", out.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains("rewritten by dagr-inject"))
        .stdout(predicate::str::contains("\"tau\":0.2"));
    // Rewriting a rewritten model is refused.
    let again = dir.path().join("twice.onnx");
    let e = fails(
        &[
            out.to_str().unwrap(),
            "--encoders",
            "audio,visual",
            "-o",
            again.to_str().unwrap(),
        ],
        None,
    );
    assert!(e.contains("already rewritten"), "{e}");
    assert!(!again.exists());
}

#[test]
fn block_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let block = dir.path().join("block.onnx");
    bin()
        .args([
            "block",
            "--modalities",
            "3",
            "--dim",
            "8",
            "--names",
            "a,b,c",
            "-o",
            block.to_str().unwrap(),
        ])
        .assert()
        .success();
    onnx_check(&block);
    let inputs = dir.path().join("in.npz");
    let mut t = dagr_inject::runtime::Tensors::new();
    for (k, n) in ["a", "b", "c"].iter().enumerate() {
        let data: Vec<f32> = (0..40).map(|i| ((i * 7 + k * 3) % 11) as f32 - 5.0).collect();
        t.insert(
            n.to_string(),
            dagr_inject::runtime::Value::F32(ndarray::ArrayD::from_shape_vec(vec![5, 8], data).unwrap()),
        );
    }
    dagr_inject::npz::write(&inputs, &t).unwrap();
    for backend in ["tract", "ort"] {
        let out = dir.path().join(format!("{backend}.npz"));
        bin()
            .args([
                "run",
                block.to_str().unwrap(),
                "--inputs",
                inputs.to_str().unwrap(),
                "--backend",
                backend,
            ])
            .args(["-o", out.to_str().unwrap()])
            .assert()
            .success();
        let r = dagr_inject::npz::read(&out).unwrap();
        assert_eq!(r["dagr/grad/b"].shape(), &[5, 8]);
    }
}

#[test]
fn bad_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out").join("o.onnx");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    let o = out.to_str().unwrap();
    let e = fails(&["inspect", "/no/such/model.onnx"], None);
    assert!(e.contains("cannot read") && e.contains("/no/such/model.onnx"), "{e}");

    let bytes = std::fs::read(model("av_cnn.legacy.onnx")).unwrap();
    let trunc = dir.path().join("trunc.onnx");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(
        &[trunc.to_str().unwrap(), "--encoders", "audio,visual", "-o", o],
        Some(&out),
    );
    assert!(e.contains("not a valid ONNX model"), "{e}");

    let text = dir.path().join("notes.onnx");
    std::fs::write(&text, "this is a text file, not a model\n").unwrap();
    let e = fails(&["inspect", text.to_str().unwrap()], None);
    assert!(e.contains("not a valid ONNX model"), "{e}");

    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let e = fails(&["inspect", empty.to_str().unwrap()], None);
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn bad_encoder_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out").join("o.onnx");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    let o = out.to_str().unwrap();
    let m = model("av_cnn.legacy.onnx");
    let e = fails(&[&m, "--encoders", "audoi,visual", "-o", o], Some(&out));
    assert!(e.contains("close candidates") && e.contains("audio_encoder"), "{e}");
    let e = fails(&[&m, "--encoders", "head,audio", "-o", o], Some(&out));
    assert!(e.contains("ambiguous"), "{e}");
    let e = fails(&[&m, "--encoders", "x=audio,visual", "-o", o], Some(&out));
    assert!(e.contains("graph input"), "{e}");
    let e = fails(&[&m, "--encoders", "audio", "-o", o], Some(&out));
    assert!(e.contains("at least two encoders"), "{e}");
    let e = fails(&[&m, "--encoders", "audio,audio", "-o", o], Some(&out));
    assert!(e.contains("named twice"), "{e}");
    let e = fails(&[&m, "--encoders", "audio,audio_encoder", "-o", o], Some(&out));
    assert!(e.contains("both resolve"), "{e}");
}

#[test]
fn bad_dagr_options() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out").join("o.onnx");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    let o = out.to_str().unwrap();
    let m = model("av_mlp.legacy.onnx");
    let e = fails(&[&m, "--encoders", "audio,visual", "--tau", "0", "-o", o], Some(&out));
    assert!(e.contains("--tau must be a positive"), "{e}");
    let e = fails(&[&m, "--encoders", "audio,visual", "--delta=-1", "-o", o], Some(&out));
    assert!(e.contains("--delta must be >= 0"), "{e}");
    // Unequal widths: audio is 32 wide, the visual encoder's first layer 64.
    let e = fails(
        &[
            &m,
            "--encoders",
            "audio,visual=/visual_encoder/fc1/Gemm_output_0",
            "-o",
            o,
        ],
        Some(&out),
    );
    assert!(
        e.contains("equal embedding widths") && e.contains("32") && e.contains("64") && e.contains("--no-anchor"),
        "{e}"
    );
    // ... which --no-anchor accepts.
    bin()
        .args([
            &m,
            "--encoders",
            "audio,visual=/visual_encoder/fc1/Gemm_output_0",
            "--no-anchor",
            "-o",
            o,
        ])
        .assert()
        .success();
    std::fs::remove_file(&out).unwrap();
    let e = fails(
        &[&m, "--encoders", "audio,visual", "--loss", "logits", "-o", o],
        Some(&out),
    );
    assert!(e.contains("must be a scalar"), "{e}");
    let e = fails(
        &[
            &m,
            "--encoders",
            "audio,visual",
            "--logits",
            "nope",
            "--labels",
            "y",
            "-o",
            o,
        ],
        Some(&out),
    );
    assert!(e.contains("--logits 'nope'"), "{e}");
    let e = fails(
        &[
            &m,
            "--encoders",
            "audio,visual",
            "--logits",
            "logits",
            "--labels",
            "audio",
            "-o",
            o,
        ],
        Some(&out),
    );
    assert!(e.contains("expected int64"), "{e}");
}

#[test]
fn the_input_model_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m.onnx");
    std::fs::copy(model("av_mlp.legacy.onnx"), &src).unwrap();
    let before = std::fs::read(&src).unwrap();
    let e = fails(
        &[
            src.to_str().unwrap(),
            "--encoders",
            "audio,visual",
            "-o",
            src.to_str().unwrap(),
        ],
        None,
    );
    assert!(e.contains("refusing to overwrite"), "{e}");
    assert_eq!(before, std::fs::read(&src).unwrap());
}

#[test]
fn help_has_examples() {
    bin()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("Examples:"));
}

/// Output piped into a reader that has gone (`dagr-inject train --help | head -1`) ends the
/// process quietly, never with a panic.
#[test]
fn a_closed_output_pipe_is_no_panic() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dagr-inject"))
        .args(["train", "--help"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes before the process writes (it is still starting).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn verify_passes_on_a_rewrite_and_fails_on_a_wrong_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.dagr.onnx");
    let src = model("av_mlp.dynamo.onnx");
    bin()
        .args([&src, "--encoders", "audio,visual", "-o", out.to_str().unwrap()])
        .assert()
        .success();
    bin()
        .args(["verify", out.to_str().unwrap(), "--original", &src])
        .assert()
        .success()
        .stdout(predicate::str::contains("original unchanged"))
        .stdout(predicate::str::contains("built-in reference"))
        .stdout(predicate::str::is_match("finite differences +dagr/grad/audio").unwrap())
        .stdout(predicate::str::contains("all checks passed"));
    // A training graph recomputes the original outputs through another path (BatchNorm
    // decomposed): compared within the tolerance, which the check names.
    let cnn = model("av_cnn.dynamo.onnx");
    let train = dir.path().join("cnn.train.onnx");
    cli_train(Path::new(&cnn), "audio,visual", &train);
    cli_verify(&train, Path::new(&cnn))
        .stdout(predicate::str::contains(
            "original recomputed (training graph, rtol 1e-5)",
        ))
        .stdout(predicate::str::contains("all checks passed"));
    // A reference whose expected loss is off by 1% fails, naming the output.
    let inputs = model_inputs(std::path::Path::new(&src));
    let mut reference = inputs.clone();
    let got = run(
        dagr_inject::runtime::Backend::Ort,
        &out,
        &inputs,
        &["dagr/loss".to_string()],
    );
    // Inputs lacking one the model reads: named before anything runs.
    let mut partial = inputs.clone();
    let dropped = partial.keys().next().cloned().unwrap();
    partial.remove(&dropped);
    let pp = dir.path().join("partial.npz");
    dagr_inject::npz::write(&pp, &partial).unwrap();
    bin()
        .args(["verify", out.to_str().unwrap(), "--inputs", pp.to_str().unwrap()])
        .assert()
        .failure()
        .stderr(predicate::str::contains(format!(
            "lacks an input the model reads: {dropped}"
        )))
        .stderr(predicate::str::contains("hint:"));
    bin()
        .args([
            "run",
            out.to_str().unwrap(),
            "--inputs",
            pp.to_str().unwrap(),
            "--backend",
            "ort",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains(format!(
            "lacks an input the model reads: {dropped}"
        )));
    let loss = f32_of(&got, "dagr/loss").mapv(|v| v * 1.01);
    reference.insert("dagr/loss".into(), dagr_inject::runtime::Value::F32(loss));
    let rp = dir.path().join("ref.npz");
    dagr_inject::npz::write(&rp, &reference).unwrap();
    let o = bin()
        .args([
            "verify",
            out.to_str().unwrap(),
            "--reference",
            rp.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pass"], false);
    let failing: Vec<&serde_json::Value> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["pass"] == false)
        .collect();
    assert!(
        failing
            .iter()
            .all(|c| c["output"] == "dagr/loss" && c["check"] == "reference"),
        "{failing:?}"
    );
    assert_eq!(failing.len(), 2, "one per backend");
}

#[test]
fn cuda_never_falls_back_to_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let graph = dir.path().join("t.onnx");
    bin()
        .args([
            &model("av_mlp.legacy.onnx"),
            "--encoders",
            "audio,visual",
            "--logits",
            "logits",
            "--labels",
            "label",
        ])
        .args(["--train", "-o", graph.to_str().unwrap()])
        .assert()
        .success();
    bin()
        .args(["inspect", graph.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "training graph: loss dagr/total_loss, 10 parameters (8 also get the geometry gradient)",
        ));
    let data = root().join("fixtures/optim_data_av_mlp.npz");
    // The PyPI `onnxruntime` wheel has no CUDA execution provider: the run must fail, loudly.
    for backend in ["ort", "tract"] {
        let out = dir.path().join(format!("run_{backend}"));
        let e = fails(
            &[
                "train",
                graph.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--backend",
                backend,
                "--device",
                "cuda",
                "--out",
                out.to_str().unwrap(),
            ],
            None,
        );
        assert!(e.contains("CUDA") || e.contains("cuda"), "{e}");
        assert!(!out.exists(), "a run that never stepped leaves no directory behind");
    }
}

/// `verify` on honest training graphs of real models passes (training-mode BatchNorm with ReLU
/// and max pooling, for any random inputs, and with `--original` on both backends; BERT with
/// token ids and masks drawn as the graph uses them), and fails when one DAGR constant is scaled
/// by 1.05 or one gradient rule's constant is changed.
#[test]
fn verify_passes_honest_training_graphs_and_fails_mutated_ones() {
    let dir = tempfile::tempdir().unwrap();
    let verify = |p: &std::path::Path| {
        let o = bin().args(["verify", p.to_str().unwrap(), "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
        (o.status.success(), v)
    };
    let cases = [
        (model("av_cnn.legacy.onnx"), "audio,visual", "label"),
        (
            root()
                .join("models/zoo/bert_distilbert.legacy.onnx")
                .display()
                .to_string(),
            "query_encoder,doc_encoder",
            "y",
        ),
    ];
    for (k, (src, enc, labels)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("{k}.train.onnx"));
        bin()
            .args([
                src.as_str(),
                "--encoders",
                enc,
                "--logits",
                "logits",
                "--labels",
                labels,
                "--train",
            ])
            .args(["-o", out.to_str().unwrap()])
            .assert()
            .success();
        let (ok, v) = verify(&out);
        assert!(ok, "{src}: verify fails an honest graph: {v}");
    }
    // `--original` on both backends (the default): av_cnn was exported in training mode, whose
    // BatchNormalization tract runs only as the training graph writes it.
    let o = bin()
        .args(["verify", dir.path().join("0.train.onnx").to_str().unwrap(), "--json"])
        .args(["--original", &cases[0].0])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    assert!(o.status.success(), "verify --original fails av_cnn's honest graph: {v}");
    let tract_original = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["backend"] == "tract" && c["check"].as_str().is_some_and(|n| n.starts_with("original")))
        .count();
    assert_eq!(tract_original, 3, "the three logits recomputed on tract: {v}");
    // Mutations of the av_cnn training graph.
    let out = dir.path().join("0.train.onnx");
    let m = onnx::load(&out).unwrap();
    // Its honest gradients pass for any random inputs: before a failing direction was drawn
    // again, a convolution before BatchNorm over 4 samples, ReLU and max pooling failed one
    // input draw in four (kinks and rounding spoiling every step of one direction).
    for seed in 1..=10 {
        let feed = dagr_inject::verify::random_inputs(&m, 4, seed).unwrap();
        let checks = dagr_inject::verify::param_finite_differences(
            &out,
            &feed,
            dagr_inject::runtime::Backend::Ort,
            dagr_inject::verify::PARAM_FD_DIRECTIONS,
        )
        .unwrap();
        if let Some(c) = checks.iter().find(|c| !c.pass) {
            panic!(
                "inputs of seed {seed}: verify fails honest {} by {:.3e}",
                c.output, c.rel
            );
        }
    }
    let scaled = |name: &str, by: f32| {
        let mut m = m.clone();
        let t = m.graph_mut().initializer.iter_mut().find(|t| t.name == name).unwrap();
        let v = onnx::tensor::to_f32(t, std::path::Path::new(".")).unwrap();
        *t = onnx::tensor::f32_tensor(name, &t.dims.clone(), &[v[0] * by]);
        let p = dir.path().join(format!("{}.onnx", name.replace('/', "_")));
        onnx::save(&m, &p).unwrap();
        p
    };
    // lambda (0.1) of the DAGR terms, and 2/sqrt(pi) in the gradient of Erf (GELU).
    let find = |prefix: &str, value: f32| {
        m.graph()
            .initializer
            .iter()
            .find(|t| {
                t.name.starts_with(prefix)
                    && t.dims.is_empty()
                    && onnx::tensor::to_f32(t, std::path::Path::new("."))
                        .map(|v| (v[0] - value).abs() < 1e-6)
                        .unwrap_or(false)
            })
            .map(|t| t.name.clone())
            .unwrap_or_else(|| panic!("no {prefix} constant {value}"))
    };
    for (name, by, check) in [
        (find("dagr/", 0.1), 1.05, "built-in reference"),
        (
            find("grad/", std::f32::consts::FRAC_2_SQRT_PI),
            1.5,
            "finite differences",
        ),
    ] {
        let (ok, v) = verify(&scaled(&name, by));
        assert!(!ok, "verify passes with {name} scaled by {by}");
        let failed: Vec<&str> = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["pass"] == false)
            .filter_map(|c| c["check"].as_str())
            .collect();
        assert!(failed.contains(&check), "{name} x{by}: failing checks {failed:?}");
    }
    // BERT's 77 parameter tensors are checked in 24 joint groups: one wrong gradient among them
    // (half again as large, or of the wrong sign), of a large tensor or a small one in its
    // group, fails the group that covers it, and that group only. (Tensors whose gradient the
    // float32 loss cannot resolve, such as the first query layer's here, are no test of this.)
    let bert = dir.path().join("1.train.onnx");
    let m = onnx::load(&bert).unwrap();
    let rec = dagr_inject::train::record_of(&m).unwrap();
    assert!(rec.params.len() > dagr_inject::verify::MAX_PARAM_CHECKS);
    let feed = dagr_inject::verify::random_inputs(&m, 4, 0).unwrap();
    // verify's parameter check as the command line runs it
    let fd = |p: &std::path::Path| {
        dagr_inject::verify::param_finite_differences(
            p,
            &feed,
            dagr_inject::runtime::Backend::Ort,
            dagr_inject::verify::PARAM_FD_DIRECTIONS,
        )
        .unwrap()
    };
    let honest = fd(&bert);
    assert_eq!(honest.len(), dagr_inject::verify::MAX_PARAM_CHECKS);
    let covered: usize = honest.iter().map(|c| c.covers.len().max(1)).sum();
    assert_eq!(covered, rec.params.len(), "every tensor in one check");
    for (param, by) in [
        ("doc_encoder.bert.transformer.layer.0.ffn.lin1.weight", 1.5),
        ("head.bias", 1.5),
        ("doc_encoder.bert.transformer.layer.1.sa_layer_norm.weight", -1.0),
        ("query_encoder.bert.embeddings.word_embeddings.weight", -1.0),
    ] {
        let grad = format!("{param}_grad");
        let mut w = m.clone();
        let g = w.graph_mut();
        let producer = g.node.iter_mut().find(|n| n.output.contains(&grad)).unwrap();
        for o in producer.output.iter_mut().filter(|o| **o == grad) {
            *o = format!("{grad}/unscaled");
        }
        g.initializer.push(onnx::tensor::f32_tensor("mutation/by", &[], &[by]));
        let mut mul = onnx::proto::NodeProto::new();
        mul.op_type = "Mul".into();
        mul.name = "mutation".into();
        mul.input = vec![format!("{grad}/unscaled"), "mutation/by".into()];
        mul.output = vec![grad.clone()];
        g.node.push(mul);
        let p = dir.path().join("mutated.onnx");
        onnx::save(&w, &p).unwrap();
        let checks = fd(&p);
        for (c, h) in checks.iter().zip(&honest) {
            let covers = c.covers.iter().any(|t| t == param) || c.output == grad;
            assert!(h.pass, "honest {}: rel {:.3e}", h.output, h.rel);
            assert_eq!(
                c.pass, !covers,
                "{param}'s gradient x{by}: {} rel {:.3e}",
                c.output, c.rel
            );
        }
    }
}

/// A graph that makes tract panic (a negative GatherND index, which tract 0.23 asserts on)
/// fails with one error that says so and names the other backend, without the panic's own
/// "thread panicked" report.
#[test]
fn a_tract_panic_is_one_clean_error() {
    use dagr_inject::onnx::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
    use dagr_inject::onnx::{dtype, Dim, ValueFact};
    let dir = tempfile::tempdir().unwrap();
    let mut g = GraphProto::new();
    g.name = "g".into();
    g.input
        .push(ValueFact::new(dtype::FLOAT, vec![Dim::Known(3), Dim::Known(2)]).to_value_info("x"));
    g.input
        .push(ValueFact::new(dtype::INT64, vec![Dim::Known(1), Dim::Known(1)]).to_value_info("idx"));
    let mut n = NodeProto::new();
    n.op_type = "GatherND".into();
    n.name = "gather".into();
    n.input = vec!["x".into(), "idx".into()];
    n.output = vec!["y".into()];
    g.node.push(n);
    g.output
        .push(ValueFact::new(dtype::FLOAT, vec![Dim::Known(1), Dim::Known(2)]).to_value_info("y"));
    let mut p = ModelProto::new();
    p.ir_version = 8;
    let mut o = OperatorSetIdProto::new();
    o.version = 17;
    p.opset_import.push(o);
    p.graph = protobuf::MessageField::some(g);
    let m = onnx::Model {
        proto: p,
        base_dir: dir.path().into(),
        source: None,
    };
    let path = dir.path().join("g.onnx");
    onnx::save(&m, &path).unwrap();
    let inputs = dir.path().join("in.npz");
    let mut t = dagr_inject::runtime::Tensors::new();
    t.insert(
        "x".into(),
        dagr_inject::runtime::Value::F32(ndarray::ArrayD::from_shape_vec(vec![3, 2], vec![1.0; 6]).unwrap()),
    );
    t.insert(
        "idx".into(),
        dagr_inject::runtime::Value::I64(ndarray::ArrayD::from_shape_vec(vec![1, 1], vec![-1]).unwrap()),
    );
    dagr_inject::npz::write(&inputs, &t).unwrap();
    let o = bin()
        .args([
            "run",
            path.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--backend",
            "tract",
        ])
        .args(["-o", dir.path().join("out.npz").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("tract failed on this graph"), "{err}");
    assert!(err.contains("--backend ort"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn settings_in_library_messages_become_flags() {
    use dagr_inject::cli::flags_for_fields;
    assert_eq!(
        flags_for_fields("`lambda_disp` must be >= 0; pass `no_anchor`, `train` or `epochs`"),
        "--lambda-disp must be >= 0; pass --no-anchor, --train or --epochs"
    );
    // Not settings: left as written (a command, an unknown name, an unclosed quote).
    assert_eq!(
        flags_for_fields("see `dagr-inject inspect`, `not_a_flag` and `tau"),
        "see `dagr-inject inspect`, `not_a_flag` and `tau"
    );
}

#[test]
fn operators_onnx_does_not_define_are_named_before_anything_is_written() {
    // tf2onnx writes a TensorFlow op it cannot convert as it is (Keras's exact GELU becomes
    // `Erfc`, a depthwise conv `StatefulPartitionedCall`), warns and exits 0; such a model was
    // refused later with a misleading "shape unknown".
    let dir = tempfile::tempdir().unwrap();
    let mut m = onnx::load(Path::new(&model("av_cnn.legacy.onnx"))).unwrap();
    let mut renamed = 0;
    for n in m.graph_mut().node.iter_mut().filter(|n| n.op_type == "Relu") {
        n.op_type = if renamed == 0 {
            "Erfc"
        } else {
            "StatefulPartitionedCall"
        }
        .into();
        renamed += 1;
    }
    assert!(renamed >= 2);
    let p = dir.path().join("unconverted.onnx");
    onnx::save(&m, &p).unwrap();
    let out = dir.path().join("t.onnx");
    refused_train(&p, &out)
        .stderr(predicate::str::contains("operators that ONNX does not define at opset"))
        .stderr(predicate::str::contains("Erfc (1 node, first"))
        .stderr(predicate::str::contains(format!(
            "StatefulPartitionedCall ({} node",
            renamed - 1
        )));
    assert!(!out.exists());
}

#[test]
fn a_model_invalid_as_exported_is_refused_as_the_exporters_not_as_ours() {
    // jax2onnx 0.17.1 can write a Concat of a float64 and a float32 tensor (its ViT example's
    // class token): no runtime loads it, and it was reported as a bug in dagr-inject.
    let dir = tempfile::tempdir().unwrap();
    let mut m = onnx::load(Path::new(&model("av_cnn.legacy.onnx"))).unwrap();
    let g = m.graph_mut();
    let at = g.node.iter().position(|n| n.op_type == "Add").expect("an Add");
    let input = g.node[at].input[0].clone();
    let cast = cast_node("to_double", &input, "as_double", onnx::dtype::DOUBLE);
    g.node[at].input[0] = "as_double".into();
    let add = g.node[at].name.clone();
    g.node.insert(at, cast);
    let p = dir.path().join("mixed.onnx");
    onnx::save(&m, &p).unwrap();
    let out = dir.path().join("t.onnx");
    refused_train(&p, &out)
        .stderr(predicate::str::contains(
            "the model is invalid as given, before any rewrite",
        ))
        .stderr(predicate::str::contains(format!("invalid Add node '{add}'")))
        .stderr(predicate::str::contains("must be of one type"))
        .stderr(predicate::str::contains("bug in dagr-inject").not());
    assert!(!out.exists());
}

#[test]
fn declared_shapes_the_operators_contradict_give_way_to_the_computed_ones() {
    // jax2onnx declares NHWC shapes for the NCHW tensors between the convolutions it keeps in
    // NCHW; gradients built on them reshaped wrongly and ONNX Runtime refused the training graph.
    let dir = tempfile::tempdir().unwrap();
    let src = model("av_cnn.legacy.onnx");
    let mut m = onnx::load(Path::new(&src)).unwrap();
    let idx = dagr_inject::ops::index(&m).unwrap();
    let rank = |t: &str| idx.fact(t).and_then(|f| f.rank());
    let conv = m
        .graph()
        .node
        .iter()
        .find(|n| n.op_type == "Conv" && rank(&n.output[0]) == Some(4))
        .unwrap();
    let t = conv.output[0].clone();
    let right = idx.fact(&t).unwrap().clone();
    let dims = right.shape.clone().unwrap();
    assert_eq!(dims.len(), 4);
    // The channels moved last, as NHWC.
    let wrong = dagr_inject::onnx::ValueFact::new(
        right.dtype,
        vec![dims[0].clone(), dims[2].clone(), dims[3].clone(), dims[1].clone()],
    );
    assert_ne!(wrong.shape, right.shape);
    let g = m.graph_mut();
    g.value_info.retain(|v| v.name != t);
    g.value_info.push(wrong.to_value_info(&t));
    let p = dir.path().join("misdeclared.onnx");
    onnx::save(&m, &p).unwrap();
    bin()
        .args(["inspect", p.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "1 tensors declare shapes their operators contradict ({t} declares {})",
            wrong.shape_string()
        )));
    let out = dir.path().join("t.onnx");
    cli_train(&p, "audio_encoder,visual_encoder", &out);
    let written = onnx::load(&out).unwrap();
    let declared = written.graph().value_info.iter().find(|v| v.name == t).unwrap();
    assert_eq!(
        dagr_inject::onnx::ValueFact::from_type_proto(declared.type_.as_ref().unwrap())
            .unwrap()
            .shape,
        right.shape
    );
    cli_verify(&out, &p);
}

#[test]
fn verify_reads_the_original_as_the_rewrite_does() {
    // jax2onnx writes `@onnx_function` modules as ONNX local functions, which tract cannot run:
    // `verify --original` on tract failed on such an honest training graph (the original did
    // not load), as it did on ONNX Runtime for a jax2onnx ResNet whose declared shapes its
    // operators contradict. The original is recomputed as the rewrite read it.
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("models/frameworks/flax.functions.onnx");
    let out = dir.path().join("t.onnx");
    cli_train(&src, "audio_encoder,visual_encoder", &out);
    bin()
        .args(["verify", out.to_str().unwrap(), "--original", src.to_str().unwrap()])
        .args(["--backend", "tract,ort"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "the original read as the rewrite reads it: 2 function calls inlined",
        ))
        .stdout(predicate::str::contains("all checks passed"));
}

#[test]
fn int32_token_inputs_are_fed_as_int32() {
    // jax2onnx and Keras declare token ids int32; integers are held as int64 and ONNX Runtime
    // refused them ("Actual: (tensor(int64)), expected: (tensor(int32))") in run, verify and train.
    let dir = tempfile::tempdir().unwrap();
    let mut m = onnx::load(Path::new(&model("tri_token.legacy.onnx"))).unwrap();
    let g = m.graph_mut();
    let text = g.input.iter_mut().find(|i| i.name == "text").unwrap();
    text.type_.mut_or_insert_default().mut_tensor_type().elem_type = onnx::dtype::INT32;
    for n in g.node.iter_mut() {
        for i in n.input.iter_mut().filter(|i| *i == "text") {
            *i = "text_int64".into();
        }
    }
    let cast = cast_node("text_to_int64", "text", "text_int64", onnx::dtype::INT64);
    g.node.insert(0, cast);
    let p = dir.path().join("int32.onnx");
    onnx::save(&m, &p).unwrap();
    let out = dir.path().join("t.onnx");
    cli_train(&p, "audio,visual,text", &out);
    bin()
        .args(["verify", out.to_str().unwrap(), "--original", p.to_str().unwrap()])
        .args(["--backend", "tract,ort"])
        .assert()
        .success()
        .stdout(predicate::str::contains("all checks passed"));
}
