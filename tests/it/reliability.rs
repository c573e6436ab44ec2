//! Reliability, tried as a hostile user would: a training process killed (SIGKILL) at every
//! write boundary of a checkpoint, a log line and an export resumes to exactly the uninterrupted
//! result on both backends; damaged checkpoints, bad flags, bad data and output paths that are
//! inputs are refused with one message, a non-zero exit, no panic, and no input changed.

use crate::common::*;
use dagr_inject::runtime::StateValues;
use dagr_inject::train::checkpoint;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn sha(p: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()))
}

/// Runs a command that must fail without a panic; returns stderr (after any stdout).
fn fails(args: &[String]) -> String {
    let o = bin()
        .args(args)
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let all = format!("{}{err}", String::from_utf8_lossy(&o.stdout));
    assert!(!o.status.success(), "{args:?} should fail\n{err}");
    assert_eq!(o.status.code(), Some(1), "{args:?}: exit {:?}\n{err}", o.status);
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    assert!(err.starts_with("error") || err.contains("\nerror: "), "{args:?}: {err}");
    all
}

/// `MODEL --encoders audio,visual --logits logits --labels label --train -o OUT`.
fn inject_train_args(model: &Path, out: &Path) -> Vec<String> {
    [
        s(model),
        "--encoders".into(),
        "audio,visual".into(),
        "--logits".into(),
        "logits".into(),
        "--labels".into(),
        "label".into(),
        "--train".into(),
        "-o".into(),
        s(out),
    ]
    .to_vec()
}

/// The av_mlp training graph, its original model, and its data, in `dir`.
struct Setup {
    graph: PathBuf,
    data: PathBuf,
    original: PathBuf,
}

fn setup(dir: &Path) -> Setup {
    let original = dir.join("av_mlp.onnx");
    std::fs::copy(root().join("models/av_mlp.legacy.onnx"), &original).unwrap();
    let graph = dir.join("av_mlp.train.onnx");
    bin().args(inject_train_args(&original, &graph)).assert().success();
    let data = dir.join("data.npz");
    std::fs::copy(root().join("fixtures/optim_data_av_mlp.npz"), &data).unwrap();
    Setup { graph, data, original }
}

/// `train` with the test's settings; a flag in `extra` replaces the same flag's default.
fn train_args(st: &Setup, out: &Path, backend: &str, extra: &[&str]) -> Vec<String> {
    let defaults: Vec<(&str, String)> = vec![
        ("--data", s(&st.data)),
        ("--val", s(&st.data)),
        ("--epochs", "3".into()),
        ("--batch-size", "8".into()),
        ("--optimizer", "adamw".into()),
        ("--lr", "0.01".into()),
        ("--clip-grad-norm", "1.0".into()),
        ("--backend", backend.into()),
        ("--seed", "3".into()),
        ("--out", s(out)),
    ];
    let given = |f: &str| extra.iter().any(|x| *x == f || x.starts_with(&format!("{f}=")));
    let mut a = vec!["train".to_string(), s(&st.graph)];
    for (f, v) in defaults {
        if !given(f) {
            a.push(f.into());
            a.push(v);
        }
    }
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn state(dir: &Path) -> StateValues {
    let names = checkpoint::entries(dir).unwrap();
    let mut z = dagr_inject::npz::Npz::open(&dir.join(checkpoint::FILE)).unwrap();
    let shapes: BTreeMap<String, Vec<usize>> = names
        .iter()
        .map(|n| (n.clone(), z.array(n).unwrap().shape().to_vec()))
        .collect();
    checkpoint::load(dir, &shapes).unwrap().1
}

/// The epochs and losses of a log (the timings differ between runs).
fn log_losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["epoch"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".dagr-inject-"))
        .collect()
}

/// `train` with `extra`, killed (SIGKILL through the fault hook) at `point`, then resumed.
fn kill_then_resume(st: &Setup, out: &Path, backend: &str, extra: &[&str], point: &str) {
    let o = bin()
        .args(train_args(st, out, backend, extra))
        .env("DAGR_INJECT_FAULT", point)
        .output()
        .unwrap();
    assert_eq!(
        o.status.signal(),
        Some(9),
        "{backend} {point}: not killed ({:?})",
        o.status
    );
    let mut resume = extra.to_vec();
    resume.push("--resume");
    bin().args(train_args(st, out, backend, &resume)).assert().success();
}

/// SIGKILL at each write boundary (the temporary file written, fsynced, renamed; the log line
/// before and after its write; before the export, before and after the checkpoint), at the
/// first, second and later occurrences: `--resume` then reaches exactly the uninterrupted
/// result, with one log line per epoch and no temporary file left.
#[test]
fn a_kill_at_any_write_boundary_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let st = setup(dir.path());
    let inputs = [&st.graph, &st.data, &st.original].map(|p| sha(p));
    for backend in ["tract", "ort"] {
        let full = dir.path().join(format!("full-{backend}"));
        bin().args(train_args(&st, &full, backend, &[])).assert().success();
        let want = state(&full);
        let want_log = log_losses(&full);
        assert_eq!(want_log.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        let mut points: Vec<String> = Vec::new();
        for p in ["write.before-sync", "write.before-rename", "write.after-rename"] {
            points.extend([1, 2, 3, 5, 8].map(|k| format!("{p}@{k}")));
        }
        for p in [
            "log.before-write",
            "log.after-write",
            "epoch.before-export",
            "epoch.before-checkpoint",
            "epoch.after-checkpoint",
        ] {
            points.extend([1, 2].map(|k| format!("{p}@{k}")));
        }
        for point in &points {
            let out = dir.path().join(format!("killed-{backend}-{}", point.replace('@', "-")));
            kill_then_resume(&st, &out, backend, &[], point);
            let got = state(&out);
            assert_eq!(got, want, "{backend} {point}: resumed state differs");
            assert_eq!(log_losses(&out), want_log, "{backend} {point}: log differs");
            assert!(leftovers(&out).is_empty(), "{backend} {point}: {:?}", leftovers(&out));
        }
    }
    assert_eq!(inputs, [&st.graph, &st.data, &st.original].map(|p| sha(p)));
}

/// A model whose weights are external data exports two files per epoch (`model.onnx.data`, then
/// `model.onnx`): SIGKILL at each write boundary of either, in the first and the second epoch,
/// then `--resume`, gives the uninterrupted run's state, log and exported files byte for byte,
/// with no temporary file left and the original's data untouched.
#[test]
fn a_kill_while_exporting_external_data_resumes_to_the_uninterrupted_export() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let inline = dagr_inject::onnx::load(&root().join("models/av_mlp.legacy.onnx")).unwrap();
    externalize(&inline, &src, "av_mlp.onnx");
    let original = src.join("av_mlp.onnx");
    let graph_dir = dir.path().join("graph");
    std::fs::create_dir(&graph_dir).unwrap();
    let graph = graph_dir.join("av_mlp.train.onnx");
    bin().args(inject_train_args(&original, &graph)).assert().success();
    let data = dir.path().join("data.npz");
    std::fs::copy(root().join("fixtures/optim_data_av_mlp.npz"), &data).unwrap();
    let st = Setup {
        graph,
        data,
        original: original.clone(),
    };
    let inputs = [&original, &src.join("weights.bin"), &st.graph].map(|p| sha(p));
    let orig = ["--original", original.to_str().unwrap(), "--epochs", "2"];
    let files = ["model.onnx", "model.onnx.data"];
    for backend in ["tract", "ort"] {
        let full = dir.path().join(format!("full-{backend}"));
        bin().args(train_args(&st, &full, backend, &orig)).assert().success();
        let want = state(&full);
        let want_log = log_losses(&full);
        let want_files = files.map(|f| sha(&full.join(f)));
        // Whole-file writes: two at start-up (the step graph), then per epoch the data, the
        // model and the checkpoint: the exports are writes 3, 4 (epoch 1) and 6, 7 (epoch 2).
        let mut points: Vec<String> = Vec::new();
        for p in ["write.before-sync", "write.before-rename", "write.after-rename"] {
            points.extend([3, 4, 6, 7].map(|k| format!("{p}@{k}")));
        }
        for point in &points {
            let out = dir.path().join(format!("killed-{backend}-{}", point.replace('@', "-")));
            kill_then_resume(&st, &out, backend, &orig, point);
            assert_eq!(state(&out), want, "{backend} {point}: resumed state differs");
            assert_eq!(log_losses(&out), want_log, "{backend} {point}: log differs");
            assert_eq!(
                files.map(|f| sha(&out.join(f))),
                want_files,
                "{backend} {point}: export differs"
            );
            assert!(leftovers(&out).is_empty(), "{backend} {point}: {:?}", leftovers(&out));
        }
    }
    assert_eq!(inputs, [&original, &src.join("weights.bin"), &st.graph].map(|p| sha(p)));
}

/// Damaged, edited or foreign checkpoints are refused by name, and the refusal changes nothing.
#[test]
fn damaged_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let st = setup(dir.path());
    let good = dir.path().join("good");
    bin()
        .args(train_args(&st, &good, "ort", &["--epochs", "1"]))
        .assert()
        .success();
    let ck = good.join(checkpoint::FILE);
    let bytes = std::fs::read(&ck).unwrap();
    let st0 = state(&good);
    let shapes: BTreeMap<String, Vec<usize>> = st0.iter().map(|(k, v)| (k.clone(), v.shape().to_vec())).collect();
    let (record, _) = checkpoint::load(&good, &shapes).unwrap();

    // Each case: how to damage a copy of the run directory, and what the message must say.
    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    let write_record = |rec: serde_json::Value, state: &StateValues, p: &Path| {
        let json = serde_json::to_vec(&rec).unwrap();
        let vals: Vec<(String, dagr_inject::runtime::Value)> = state
            .iter()
            .map(|(k, v)| (k.clone(), dagr_inject::runtime::Value::F32(v.clone())))
            .collect();
        let mut e: Vec<(&str, dagr_inject::npz::Entry)> = vals
            .iter()
            .map(|(k, v)| (k.as_str(), dagr_inject::npz::Entry::Tensor(v)))
            .collect();
        e.push((checkpoint::RECORD_ENTRY, dagr_inject::npz::Entry::Bytes(&json)));
        dagr_inject::npz::write_entries(&p.join(checkpoint::FILE), &e).unwrap();
    };
    let rec_json = serde_json::to_value(&record).unwrap();
    // A damage that edits the record (keeping its old checksum).
    let edit = |f: fn(&mut serde_json::Value)| -> Damage {
        let (rec_json, st0, write_record) = (&rec_json, &st0, &write_record);
        Box::new(move |p: &Path| {
            let mut r = rec_json.clone();
            f(&mut r);
            write_record(r, st0, p)
        })
    };
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "truncated",
            Box::new(|p: &Path| std::fs::write(p.join(checkpoint::FILE), &bytes[..bytes.len() / 2]).unwrap()),
            "not a readable .npz",
        ),
        (
            "payload byte flipped",
            Box::new(|p: &Path| {
                let mut b = bytes.clone();
                let i = b.len() / 3;
                b[i] ^= 0x40;
                std::fs::write(p.join(checkpoint::FILE), b).unwrap()
            }),
            "cannot be resumed",
        ),
        (
            "empty archive",
            Box::new(|p: &Path| dagr_inject::npz::write_entries(&p.join(checkpoint::FILE), &[]).unwrap()),
            "no '__checkpoint__' record",
        ),
        (
            "a tensor missing",
            Box::new(|p: &Path| {
                let mut s = st0.clone();
                let k = s.keys().find(|k| k.starts_with("param/")).unwrap().clone();
                s.remove(&k);
                write_record(rec_json.clone(), &s, p)
            }),
            "no entry 'param/",
        ),
        (
            "record is a list",
            Box::new(|p: &Path| write_record(serde_json::json!([]), &st0, p)),
            "unreadable or incomplete",
        ),
        (
            "epoch missing",
            edit(|r| {
                r.as_object_mut().unwrap().remove("epoch");
            }),
            "missing field `epoch`",
        ),
        (
            "epoch a string",
            edit(|r| {
                r["epoch"] = "1".into();
            }),
            "invalid type",
        ),
        (
            "epoch negative",
            edit(|r| {
                r["epoch"] = (-1).into();
            }),
            "invalid value",
        ),
        (
            "rng missing",
            edit(|r| {
                r.as_object_mut().unwrap().remove("rng");
            }),
            "missing field `rng`",
        ),
        (
            "epoch edited",
            edit(|r| {
                r["epoch"] = 99.into();
            }),
            "checksum does not match",
        ),
        (
            // (With only the first epoch logged, the first checkpoint may not have landed: the
            // fault-injection test covers that the run then starts over.)
            "checkpoint deleted after two epochs",
            Box::new(|p: &Path| {
                std::fs::remove_file(p.join(checkpoint::FILE)).unwrap();
                let log = std::fs::read_to_string(p.join("log.jsonl")).unwrap();
                let second = log.replace("\"epoch\":1", "\"epoch\":2");
                std::fs::write(p.join("log.jsonl"), format!("{log}{second}")).unwrap();
            }),
            "the checkpoint was removed",
        ),
    ];
    for (what, damage, says) in &cases {
        let d = dir.path().join(format!("case-{}", what.replace(' ', "-")));
        std::fs::create_dir(&d).unwrap();
        for f in std::fs::read_dir(&good).unwrap().flatten() {
            std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
        }
        damage(&d);
        let before: Vec<(String, String)> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|f| (f.file_name().to_string_lossy().to_string(), sha(&f.path())))
            .collect();
        let e = fails(&train_args(&st, &d, "ort", &["--resume"]));
        assert!(e.contains(says), "{what}: {e}");
        let after: Vec<(String, String)> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|f| (f.file_name().to_string_lossy().to_string(), sha(&f.path())))
            .filter(|(n, _)| n != ".lock")
            .collect();
        let before: Vec<_> = before.into_iter().filter(|(n, _)| n != ".lock").collect();
        assert_eq!(before, after, "{what}: the refusal changed the run directory");
    }

    // Other optimizer settings: refused, or taken with --new-settings, saying what is reset.
    let e = fails(&train_args(
        &st,
        &good,
        "ort",
        &["--resume", "--optimizer", "sgd", "--momentum", "0.9"],
    ));
    assert!(e.contains("other settings") && e.contains("optimizer"), "{e}");
    assert_eq!(std::fs::read(&ck).unwrap(), bytes);
    let o = bin()
        .args(train_args(
            &st,
            &good,
            "ort",
            &["--resume", "--new-settings", "--optimizer", "sgd", "--momentum", "0.9"],
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("changed optimizer") && err.contains("state was reset"),
        "{err}"
    );

    // A finished run resumed with no more epochs does nothing, and says so.
    let o = bin()
        .args(train_args(
            &st,
            &good,
            "ort",
            &["--resume", "--optimizer", "sgd", "--momentum", "0.9"],
        ))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(out.contains("nothing to do") && !out.contains("wrote"), "{out}");
}

/// Settings that cannot give a finite run are refused before anything is written; an update
/// that is not finite although loss and gradients are is refused before it becomes the state.
#[test]
fn bad_settings_and_non_finite_updates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let st = setup(dir.path());
    let out = dir.path().join("run");
    for (flags, says) in [
        (vec!["--lr", "1e39"], "learning rate"),
        (vec!["--lr", "nan"], "learning rate"),
        (vec!["--lr=-0.1"], "learning rate"),
        (vec!["--optimizer", "sgd", "--momentum", "inf"], "momentum"),
        (vec!["--optimizer", "sgd", "--momentum=-0.5"], "momentum"),
        (vec!["--weight-decay=-1"], "weight decay"),
        (vec!["--betas=-1,0.999"], "beta1"),
        (vec!["--betas=0.9,1.0"], "beta2"),
        (vec!["--optimizer", "sgd", "--nesterov"], "Nesterov"),
        (vec!["--max-steps", "0"], "step limit"),
        (vec!["--threads", "1000000"], "thread count"),
        (vec!["--drop-last", "--batch-size", "100"], "has no batch"),
        (vec!["--grad-accum", "0"], "micro-batches"),
        (vec!["--batch-size", "4", "--grad-accum", "5"], "micro-batches"),
        (vec!["--distributed"], "mpirun -np"),
    ] {
        let e = fails(&train_args(&st, &out, "ort", &flags));
        assert!(e.contains(says), "{flags:?}: {e}");
        assert!(!out.exists(), "{flags:?} left {}", out.display());
    }
    // lr 3e38 fits in float32 but the update overflows: the first step is refused, nothing
    // was checkpointed, and the run directory is gone.
    let overflow = ["--optimizer", "sgd", "--lr", "3e38", "--weight-decay", "3e38"];
    let e = fails(&train_args(&st, &out, "tract", &overflow));
    assert!(
        e.contains("non-finite update of 'param/") && e.contains("nothing was updated"),
        "{e}"
    );
    assert!(!out.exists());
    // After a good epoch, the same refusal keeps the good checkpoint.
    bin()
        .args(train_args(&st, &out, "ort", &["--optimizer", "sgd", "--epochs", "1"]))
        .assert()
        .success();
    let good = sha(&out.join(checkpoint::FILE));
    let e = fails(&train_args(
        &st,
        &out,
        "ort",
        &[&overflow[..], &["--resume", "--new-settings"]].concat(),
    ));
    assert!(
        e.contains("non-finite update") && e.contains("last good checkpoint"),
        "{e}"
    );
    assert_eq!(sha(&out.join(checkpoint::FILE)), good);
    assert!(checkpoint_is_finite(&out));
    // DAGR's constants must fit float32.
    for flags in [["--tau", "1e-300"], ["--lambda-disp", "1e300"]] {
        let o = dir.path().join("x.onnx");
        let mut a = vec![
            s(&st.original),
            "--encoders".into(),
            "audio,visual".into(),
            "-o".into(),
            s(&o),
        ];
        a.extend(flags.iter().map(|f| f.to_string()));
        let e = fails(&a);
        assert!(e.contains(flags[0]), "{e}");
        assert!(!o.exists());
    }
    for rtol in ["nan", "inf", "-1"] {
        let e = fails(&["verify".into(), s(&st.graph), format!("--rtol={rtol}")]);
        assert!(e.contains("--rtol"), "{e}");
    }
    let e = fails(&[
        "block".into(),
        "--modalities".into(),
        "100000".into(),
        "--dim".into(),
        "4".into(),
    ]);
    assert!(e.contains("--modalities"), "{e}");
}

fn checkpoint_is_finite(dir: &Path) -> bool {
    state(dir).values().all(|a| a.iter().all(|v| v.is_finite()))
}

/// No command writes over one of its inputs, whatever the path; concurrent runs on one
/// directory are refused; --force starts a clean log.
#[test]
fn outputs_never_overwrite_inputs_and_runs_do_not_share_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let st = setup(dir.path());
    let inputs = dir.path().join("inputs.npz");
    std::fs::copy(root().join("models/av_mlp.inputs.npz"), &inputs).unwrap();
    let keep = [&st.graph, &st.data, &st.original, &inputs].map(|p| sha(p));
    // run -o onto its inputs or its model.
    for o in [&inputs, &st.original] {
        let e = fails(&[
            "run".into(),
            s(&st.original),
            "--inputs".into(),
            s(&inputs),
            "-o".into(),
            s(o),
        ]);
        assert!(e.contains("refusing to overwrite the input"), "{e}");
    }
    // A run directory that holds the training graph or the original as model.onnx.
    for input in [&st.graph, &st.original] {
        let out = dir.path().join("holds-input");
        std::fs::create_dir_all(&out).unwrap();
        let _ = std::fs::remove_file(out.join("model.onnx"));
        std::os::unix::fs::symlink(input, out.join("model.onnx")).unwrap();
        for flag in ["--force", "--resume"] {
            let e = fails(&train_args(&st, &out, "ort", &[flag, "--epochs", "1"]));
            assert!(e.contains("which is the input"), "{flag}: {e}");
        }
    }
    // Training data given as the log file.
    let out = dir.path().join("logdata");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(&st.data, out.join("log.jsonl")).unwrap();
    let mut a = train_args(&st, &out, "ort", &["--force"]);
    let i = a.iter().position(|x| x == "--data").unwrap();
    a[i + 1] = s(&out.join("log.jsonl"));
    let e = fails(&a);
    assert!(e.contains("which is the input"), "{e}");
    // diagnose whose data sits where its report goes.
    let dagr_model = dir.path().join("m.dagr.onnx");
    bin()
        .args([&s(&st.original), "--encoders", "audio,visual", "-o", &s(&dagr_model)])
        .assert()
        .success();
    let rep = dir.path().join("rep");
    std::fs::create_dir_all(&rep).unwrap();
    std::fs::copy(&st.data, rep.join("report.json")).unwrap();
    let held = sha(&rep.join("report.json"));
    let e = fails(&[
        "diagnose".into(),
        s(&dagr_model),
        "--data".into(),
        s(&rep.join("report.json")),
        "--out".into(),
        s(&rep),
    ]);
    assert!(e.contains("refusing to overwrite the input"), "{e}");
    assert_eq!(sha(&rep.join("report.json")), held);
    assert_eq!(keep, [&st.graph, &st.data, &st.original, &inputs].map(|p| sha(p)));

    // A second run on a directory in use is refused.
    let out = dir.path().join("busy");
    std::fs::create_dir_all(&out).unwrap();
    let lock = std::fs::File::create(out.join(".lock")).unwrap();
    lock.lock().unwrap();
    let e = fails(&train_args(&st, &out, "ort", &["--force"]));
    assert!(e.contains("another run is using"), "{e}");
    drop(lock);
    // --force starts over: the old log lines are gone.
    bin()
        .args(train_args(&st, &out, "ort", &["--force", "--epochs", "2"]))
        .assert()
        .success();
    bin()
        .args(train_args(&st, &out, "ort", &["--force", "--epochs", "1"]))
        .assert()
        .success();
    assert_eq!(log_losses(&out).len(), 1);
}

/// SIGTERM stops a run between steps like Ctrl-C: exit 143, the checkpoint intact, resumable.
#[test]
fn sigterm_stops_cleanly_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let st = setup(dir.path());
    let out = dir.path().join("run");
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("dagr-inject"))
        .args(train_args(&st, &out, "ort", &["--epochs", "100000"]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !out.join(checkpoint::FILE).exists() {
        assert!(started.elapsed().as_secs() < 60, "no checkpoint after 60 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(err.contains("interrupted") && err.contains("--resume"), "{err}");
    assert!(!state(&out).is_empty(), "the checkpoint must still load");
    bin()
        .args(train_args(&st, &out, "ort", &["--resume", "--epochs", "1"]))
        .assert()
        .success();
}

/// Bad data: NaN, lying headers, damaged archives, huge shapes: a message, never a hang, an
/// abort or an allocation the machine cannot make.
#[test]
fn bad_data_is_refused_without_hangs_or_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let st = setup(dir.path());
    let good = dagr_inject::npz::read(&st.data).unwrap();
    let write = |name: &str, t: &dagr_inject::runtime::Tensors| {
        let p = dir.path().join(name);
        dagr_inject::npz::write(&p, t).unwrap();
        p
    };
    let mut nan = good.clone();
    if let Some(dagr_inject::runtime::Value::F32(a)) = nan.get_mut("audio") {
        a[[5, 3]] = f32::NAN;
    }
    let nan = write("nan.npz", &nan);
    // NaN in the validation data of train, and in diagnose's data.
    let mut a = train_args(&st, &dir.path().join("o1"), "ort", &[]);
    let i = a.iter().position(|x| x == "--val").unwrap();
    a[i + 1] = s(&nan);
    let e = fails(&a);
    assert!(e.contains("non-finite value") && e.contains("sample 5"), "{e}");
    let dagr_model = dir.path().join("m.dagr.onnx");
    bin()
        .args([&s(&st.original), "--encoders", "audio,visual", "-o", &s(&dagr_model)])
        .assert()
        .success();
    let e = fails(&[
        "diagnose".into(),
        s(&dagr_model),
        "--data".into(),
        s(&nan),
        "--out".into(),
        s(&dir.path().join("rep")),
    ]);
    assert!(e.contains("non-finite value"), "{e}");
    // A head that is not [batch, classes].
    let e = fails(&[
        "diagnose".into(),
        s(&dagr_model),
        "--data".into(),
        s(&st.data),
        "--labels".into(),
        "label".into(),
        "--heads".into(),
        "dagr/loss".into(),
        "--out".into(),
        s(&dir.path().join("rep")),
    ]);
    assert!(e.contains("[batch, width]"), "{e}");

    // Hand-made archives: a header claiming 10^12 x 64 floats, a bad header, an unused array
    // whose header lies (never read), an object array.
    let npy = |descr: &str, shape: &str, data: &[u8]| {
        let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n");
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((dict.len() as u16).to_le_bytes());
        b.extend(dict.as_bytes());
        b.extend(data);
        b
    };
    let zip_of = |name: &str, entries: Vec<(&str, Vec<u8>)>| {
        use std::io::Write;
        let p = dir.path().join(name);
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        for (n, b) in entries {
            z.start_file(format!("{n}.npy"), zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(&b).unwrap();
        }
        z.finish().unwrap();
        p
    };
    let f32s = |a: &ndarray::ArrayD<f32>| a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let i64s = |a: &ndarray::ArrayD<i64>| a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let (
        dagr_inject::runtime::Value::F32(au),
        dagr_inject::runtime::Value::F32(vi),
        dagr_inject::runtime::Value::I64(la),
    ) = (&good["audio"], &good["visual"], &good["label"])
    else {
        panic!("fixture types")
    };
    let real = |extra: Vec<(&'static str, Vec<u8>)>| {
        let mut v = vec![
            ("audio", npy("<f4", "(24, 40)", &f32s(au))),
            ("visual", npy("<f4", "(24, 48)", &f32s(vi))),
            ("label", npy("<i8", "(24,)", &i64s(la))),
        ];
        v.extend(extra);
        v
    };
    let huge = zip_of(
        "huge.npz",
        vec![("audio", npy("<f4", "(1000000000000, 1, 64)", &[0u8; 64]))],
    );
    let e = fails(
        &train_args(&st, &dir.path().join("o2"), "ort", &[])
            .into_iter()
            .map(|x| if x == s(&st.data) { s(&huge) } else { x })
            .collect::<Vec<_>>(),
    );
    assert!(e.contains("claims shape [1000000000000, 1, 64]"), "{e}");
    assert!(!dir.path().join("o2").exists());
    let bad_header = zip_of(
        "badheader.npz",
        vec![("audio", b"\x93NUMPY\x01\x00\x05\x00{'de".to_vec())],
    );
    let e = fails(&["run".into(), s(&st.original), "--inputs".into(), s(&bad_header)]);
    assert!(e.contains("array 'audio'") && e.contains("header"), "{e}");
    let object = zip_of("object.npz", vec![("audio", npy("|O", "(2,)", &[0u8; 16]))]);
    let e = fails(&["run".into(), s(&st.original), "--inputs".into(), s(&object)]);
    assert!(e.contains("type 'O'"), "{e}");
    // An unused array that claims 8 GB: not read, training works.
    let lying = zip_of(
        "lying.npz",
        real(vec![("unused", npy("<f8", "(1000000000,)", &[0u8; 8]))]),
    );
    let mut a = train_args(&st, &dir.path().join("o3"), "tract", &["--epochs", "1"]);
    for x in a.iter_mut() {
        if *x == s(&st.data) {
            *x = s(&lying);
        }
    }
    bin().args(&a).assert().success();
    // A flipped payload byte: the archive's checksum says so.
    let mut flipped = std::fs::read(&st.data).unwrap();
    let n = flipped.len();
    // Inside the first array's data (after the local header and the .npy header).
    flipped[n / 4] ^= 0x01;
    let fp = dir.path().join("flipped.npz");
    std::fs::write(&fp, flipped).unwrap();
    let e = fails(&["run".into(), s(&st.original), "--inputs".into(), s(&fp)]);
    assert!(!e.contains("has a type this tool does not read"), "{e}");
    assert!(!e.contains("data error: data error"), "{e}");

    // Batches whose DAGR terms cannot fit in memory are refused before running.
    let block = dir.path().join("block.onnx");
    bin().args(["block", "--dim", "4", "-o", &s(&block)]).assert().success();
    let mut t = dagr_inject::runtime::Tensors::new();
    for m in ["m0", "m1"] {
        t.insert(
            m.into(),
            dagr_inject::runtime::Value::F32(ndarray::ArrayD::ones(vec![60000, 4])),
        );
    }
    let big = write("big.npz", &t);
    for backend in ["tract", "ort"] {
        let e = fails(&[
            "run".into(),
            s(&block),
            "--inputs".into(),
            s(&big),
            "--backend".into(),
            backend.into(),
        ]);
        assert!(e.contains("DAGR's pairwise terms at batch 60000"), "{e}");
    }
}

/// Damaged models: truncated initializers, impossible input dims, external data that leaves
/// the model's directory through a link or has an unreadable offset, a BatchNorm statistic
/// computed by a node, a model with no outputs, an IR version from the future.
#[test]
fn damaged_models_are_refused_with_a_message() {
    use dagr_inject::onnx::{self, proto::tensor_proto::DataLocation};
    let dir = tempfile::tempdir().unwrap();
    let base = onnx::load(&root().join("models/av_mlp.legacy.onnx")).unwrap();
    let save = |m: &onnx::Model, name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, m.to_bytes().unwrap()).unwrap();
        p
    };
    // A truncated initializer.
    let mut m = base.clone();
    let t = m
        .graph_mut()
        .initializer
        .iter_mut()
        .find(|t| !t.raw_data.is_empty() && t.raw_data.len() > 8)
        .unwrap();
    t.raw_data.truncate(4);
    let p = save(&m, "truncated.onnx");
    for cmd in [vec!["verify".to_string(), s(&p)], vec!["inspect".to_string(), s(&p)]] {
        let e = fails(&cmd);
        assert!(e.contains("holds 4 bytes") && e.contains("need 10240"), "{e}");
    }
    let e = fails(&inject_train_args(&p, &dir.path().join("t.onnx")));
    assert!(e.contains("holds 4 bytes"), "{e}");
    // Input dims no tensor can have.
    for d in [1i64 << 62, -7, 2_000_000_000] {
        let mut m = base.clone();
        let dims = &mut m.graph_mut().input[0]
            .type_
            .mut_or_insert_default()
            .mut_tensor_type()
            .shape
            .mut_or_insert_default()
            .dim;
        dims[1].set_dim_value(d);
        let p = save(&m, "dims.onnx");
        let e = fails(&["verify".into(), s(&p)]);
        assert!(e.contains("input 'audio'"), "{d}: {e}");
    }
    // External data: through a link out of the directory, and with an unreadable offset.
    let inside = dir.path().join("inside");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let external = |offset: &str, file: &str| {
        let mut m = base.clone();
        let t = m
            .graph_mut()
            .initializer
            .iter_mut()
            .find(|t| !t.raw_data.is_empty())
            .unwrap();
        std::fs::write(outside.join("w.bin"), &t.raw_data).unwrap();
        t.raw_data.clear();
        t.data_location = DataLocation::EXTERNAL.into();
        for (k, v) in [("location", file), ("offset", offset)] {
            let mut e = dagr_inject::onnx::proto::StringStringEntryProto::new();
            e.key = k.into();
            e.value = v.into();
            t.external_data.push(e);
        }
        let p = inside.join("m.onnx");
        std::fs::write(&p, m.to_bytes().unwrap()).unwrap();
        p
    };
    let _ = std::fs::remove_file(inside.join("w.bin"));
    std::os::unix::fs::symlink(outside.join("w.bin"), inside.join("w.bin")).unwrap();
    let p = external("0", "w.bin");
    let e = fails(&["inspect".into(), s(&p)]);
    assert!(
        e.contains("symbolic link") && e.contains("outside the model's directory"),
        "{e}"
    );
    std::fs::remove_file(inside.join("w.bin")).unwrap();
    std::fs::copy(outside.join("w.bin"), inside.join("w.bin")).unwrap();
    let p = external("twelve", "w.bin");
    let e = fails(&["inspect".into(), s(&p)]);
    assert!(e.contains("offset 'twelve'"), "{e}");
    // A BatchNorm running statistic computed by a Constant node.
    let mut m = onnx::load(&root().join("models/av_cnn.legacy.onnx")).unwrap();
    let bn = m
        .graph()
        .node
        .iter()
        .find(|n| n.op_type == "BatchNormalization")
        .unwrap()
        .clone();
    let g = m.graph_mut();
    let pos = g.initializer.iter().position(|t| t.name == bn.input[3]).unwrap();
    let t = g.initializer.remove(pos);
    let mut c = dagr_inject::onnx::proto::NodeProto::new();
    c.op_type = "Constant".into();
    c.output = vec![t.name.clone()];
    let mut a = dagr_inject::onnx::proto::AttributeProto::new();
    a.name = "value".into();
    a.type_ = dagr_inject::onnx::proto::attribute_proto::AttributeType::TENSOR.into();
    a.t = protobuf::MessageField::some(t);
    c.attribute.push(a);
    g.node.insert(0, c);
    let p = save(&m, "bnconst.onnx");
    let e = fails(&inject_train_args(&p, &dir.path().join("bn.train.onnx")));
    assert!(e.contains("computed by a node"), "{e}");
    // No outputs; an IR version newer than any onnx writes.
    let mut m = base.clone();
    m.graph_mut().output.clear();
    let p = save(&m, "noout.onnx");
    let inputs = root().join("models/av_mlp.inputs.npz");
    for backend in ["tract", "ort"] {
        let e = fails(&[
            "run".into(),
            s(&p),
            "--inputs".into(),
            s(&inputs),
            "--backend".into(),
            backend.into(),
        ]);
        assert!(e.contains("no outputs"), "{e}");
    }
    let mut m = base.clone();
    m.proto.ir_version = 99;
    let p = save(&m, "future.onnx");
    let e = fails(&["inspect".into(), s(&p)]);
    assert!(e.contains("IR version 99") && !e.contains("truncated"), "{e}");
}

/// Files written through a temporary file get the mode a plain create would (0666 less the
/// umask), not the temporary file's 0600.
#[test]
fn written_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: umask has no preconditions; read it by setting and restoring it.
    let mask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    let p = dir.path().join("x.npz");
    dagr_inject::npz::write(&p, &dagr_inject::runtime::Tensors::new()).unwrap();
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666 & !(mask as u32), "mode {mode:o}");
}

/// `verify` computes the original it compares a training graph with as the original is written:
/// ONNX Runtime 1.31's basic optimizations move a `Pad` of zeros into a following MaxPool's
/// `pads`, which MaxPool leaves out of its maximum (Keras's ResNet50V2, whose first max pool reads
/// a zero-padded convolution output: its logits came out 2.2e-3 off Keras's, and `verify` failed
/// its honest training graph). Pad(0) then MaxPool 3x3 / 2 over negative values: every window
/// that covers the padding is 0.
#[test]
fn references_run_as_written_keep_a_zero_pad_before_max_pool() {
    use dagr_inject::onnx::{builder::attr_ints, dtype, proto::NodeProto, tensor, Dim, ValueFact};
    use dagr_inject::runtime::{Backend, Tensors, Value};
    use ndarray::ArrayD;
    let mut g = dagr_inject::onnx::proto::GraphProto::new();
    let vi =
        |n: &str, d: &[i64]| ValueFact::new(dtype::FLOAT, d.iter().map(|&x| Dim::Known(x)).collect()).to_value_info(n);
    g.input.push(vi("x", &[1, 1, 4, 4]));
    g.output.push(vi("y", &[1, 1, 2, 2]));
    g.initializer
        .push(tensor::i64_tensor("pads", &[8], &[0, 0, 1, 1, 0, 0, 1, 1]));
    let mut pad = NodeProto::new();
    (pad.op_type, pad.name) = ("Pad".into(), "pad".into());
    pad.input = vec!["x".into(), "pads".into()];
    pad.output = vec!["xp".into()];
    let mut pool = NodeProto::new();
    (pool.op_type, pool.name) = ("MaxPool".into(), "pool".into());
    pool.input = vec!["xp".into()];
    pool.output = vec!["y".into()];
    pool.attribute = vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("strides", &[2, 2])];
    g.node = vec![pad, pool];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pad_pool.onnx");
    dagr_inject::onnx::save(&model_of(g, 17), &path).unwrap();
    // x = -1 - (0..16): all negative, the largest (-1) in the corner
    let x = ArrayD::from_shape_vec(vec![1, 1, 4, 4], (0..16).map(|i| -1.0 - i as f32).collect()).unwrap();
    let feed: Tensors = [("x".to_string(), Value::F32(x))].into_iter().collect();
    // windows over the padded 6x6 from rows/cols 0 and 2: only the last, rows and columns 2..5
    // of the padded input (1..4 of x), misses the padding: max x[1..4, 1..4] = x[1,1] = -6
    let want = [0.0, 0.0, 0.0, -6.0];
    for b in [Backend::Ort, Backend::Tract] {
        let got = dagr_inject::runtime::run_as_written(b, &path, &feed, &["y".to_string()]).unwrap();
        let got = got["y"].as_f32().unwrap();
        assert_eq!(got.iter().copied().collect::<Vec<f32>>(), want, "{b:?}");
    }
}
