//! `train --distributed` under `mpirun` (Open MPI, installed by scripts/setup.sh): N processes
//! each taking its share of every batch reach the parameters of one process accumulating the
//! same N micro-batches, on both backends; a process killed mid-run stops the others, and the
//! last checkpoint resumes.

use crate::common::{max_abs_diff, root};
use crate::train_loop::{checkpoint_state, training_graph};
use assert_cmd::cargo::CommandCargoExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `mpirun -np n` (allowed as root, as CI runs; more processes than cores allowed).
fn mpirun(n: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &n.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    let found = Command::new("mpirun").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "mpirun not found: scripts/setup.sh installs Open MPI (apt-get install openmpi-bin)"
    );
    c
}

fn exe() -> PathBuf {
    Command::cargo_bin("dagr-inject").unwrap().get_program().into()
}

/// `train` with AdamW (SGD with momentum where `sgd`: a conv bias before BatchNorm has a true
/// gradient of zero, and Adam turns the rounding noise there into full-size steps that no two
/// summation orders agree on), `epochs` epochs, and `extra`.
fn train_args(graph: &Path, data: &Path, out: &Path, backend: &str, epochs: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["train".into(), graph.to_str().unwrap().into()];
    a.extend(["--data".into(), data.to_str().unwrap().into()]);
    a.extend(["--epochs".into(), epochs.to_string()]);
    let sgd = extra.contains(&"sgd");
    let opt: &[&str] = if sgd {
        &["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.002"]
    } else {
        &["--optimizer", "adamw", "--lr", "0.003", "--clip-grad-norm", "0.5"]
    };
    a.extend(opt.iter().map(|s| s.to_string()));
    if !extra.contains(&"--batch-size") {
        a.extend(["--batch-size", "8"].map(String::from));
    }
    a.extend(["--seed", "4", "--threads", "1", "--backend", backend, "--out"].map(String::from));
    a.push(out.to_str().unwrap().into());
    a.extend(
        extra
            .iter()
            .filter(|s| !["sgd", "adamw"].contains(*s))
            .map(|s| s.to_string()),
    );
    a
}

fn ok(mut c: Command, what: &str) {
    let o = c.stdout(Stdio::piped()).stderr(Stdio::piped()).output().unwrap();
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// After two epochs, N processes equal one process with `--grad-accum N` over the same
/// micro-batches, to 1e-5 (the sums' order is MPI's); the run's files are process 0's alone.
#[test]
fn processes_equal_one_process_accumulating_their_shares() {
    let dir = tempfile::tempdir().unwrap();
    // (model, heads, processes, micro-batches each, batch, optimizer): the last runs 3 x 2 parts
    // of batches of 10 over 24 samples, so the last batch (4) leaves process 2 no sample.
    for (model, logits, n, k, batch, opt) in [
        ("av_mlp.legacy.onnx", vec!["logits".to_string()], 2, 1, 8, "adamw"),
        (
            "av_cnn.legacy.onnx",
            vec!["logits".into(), "logits_audio".into(), "logits_visual".into()],
            3,
            1,
            8,
            "sgd",
        ),
        ("av_mlp.legacy.onnx", vec!["logits".to_string()], 3, 2, 10, "adamw"),
    ] {
        let graph = training_graph(model, &logits, dir.path());
        let base = model.split('.').next().unwrap();
        let data = root().join(format!("fixtures/optim_data_{base}.npz"));
        for backend in ["tract", "ort"] {
            let tag = format!("{base}, {n} processes x {k} micro-batches, {backend}");
            let dist = dir.path().join(format!("{base}-{n}-{k}-{backend}-dist"));
            let one = dir.path().join(format!("{base}-{n}-{k}-{backend}-one"));
            let (k_s, nk_s, b_s) = (k.to_string(), (n * k).to_string(), batch.to_string());
            let mut c = mpirun(n);
            let flags = ["--distributed", "--grad-accum", &k_s, "--batch-size", &b_s, opt];
            c.arg(exe()).args(train_args(&graph, &data, &dist, backend, 2, &flags));
            ok(c, &tag);
            let mut c = Command::cargo_bin("dagr-inject").unwrap();
            let flags = ["--grad-accum", &nk_s, "--batch-size", &b_s, opt];
            c.args(train_args(&graph, &data, &one, backend, 2, &flags));
            ok(c, &tag);
            let (a, b) = (checkpoint_state(&dist), checkpoint_state(&one));
            let mut params = 0;
            // The parameters (the optimizer's slots of a parameter whose true gradient is zero,
            // a conv bias before BatchNorm, hold rounding noise of each summation order).
            for (k, want) in b.iter().filter(|(k, _)| k.starts_with("param/")) {
                let got = &a[k];
                let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let e = max_abs_diff(got, want) / scale as f64;
                assert!(e <= 1e-5, "{tag}: {k} differs by {e:e} (relative)");
                params += 1;
            }
            assert!(params > 0 && a.len() == b.len(), "{tag}: {:?}", a.keys());
            let log = std::fs::read_to_string(dist.join("log.jsonl")).unwrap();
            assert_eq!(log.lines().count(), 2, "{tag}: one log line per epoch, from process 0");
            assert!(log.contains("collective_seconds"), "{tag}: {log}");
        }
    }
}

/// A process killed with SIGKILL mid-run: `mpirun` ends the others and exits non-zero within
/// seconds (nobody waits forever for the dead one), and the last checkpoint resumes.
#[test]
fn a_killed_process_stops_the_run_and_the_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_mlp.legacy.onnx", &["logits".into()], dir.path());
    let data = root().join("fixtures/optim_data_av_mlp.npz");
    let out = dir.path().join("run");
    let mut c = mpirun(2);
    c.arg(exe())
        .args(train_args(&graph, &data, &out, "ort", 1_000_000, &["--distributed"]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let started = Instant::now();
    while !out.join("checkpoint.npz").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no checkpoint after a minute"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Process 1: the child of mpirun whose environment says rank 1.
    let victim = descendants(child.id())
        .into_iter()
        .find(|&p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .map(|e| e.split(|&b| b == 0).any(|v| v == b"OMPI_COMM_WORLD_RANK=1"))
                .unwrap_or(false)
        })
        .expect("no process of rank 1 under mpirun");
    // SAFETY: sending a signal to a process of this test's own job.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the other process still runs a minute after process 1 was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "mpirun exited 0 after a process was killed");
    // The checkpoint is whole: three processes (not two) resume from it for one more epoch.
    let before = checkpoint_state(&out);
    let shapes = before.iter().map(|(k, v)| (k.clone(), v.shape().to_vec())).collect();
    let epochs = dagr_inject::train::checkpoint::load(&out, &shapes).unwrap().0.epoch + 1;
    let mut c = mpirun(3);
    c.arg(exe()).args(train_args(
        &graph,
        &data,
        &out,
        "ort",
        epochs,
        &["--distributed", "--resume"],
    ));
    ok(c, "resume after the kill");
    assert_ne!(checkpoint_state(&out), before);
}

/// Every process below `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`: the parent after the command's closing parenthesis.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if ppid == Some(p) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// Two processes as the trainer sees them through `Collective`: the other holds `other`'s
/// fingerprint halves (the maxima are taken with them).
struct Pair {
    other: [f64; 4],
}

impl dagr_inject::dist::Collective for Pair {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        2
    }
    fn sum_f32(&self, _: &mut [f32]) -> dagr_inject::Result<()> {
        unreachable!()
    }
    fn sum_f64(&self, _: &mut [f64]) -> dagr_inject::Result<()> {
        unreachable!()
    }
    fn max_f64(&self, buf: &mut [f64]) -> dagr_inject::Result<()> {
        for (b, o) in buf.iter_mut().zip(self.other) {
            *b = b.max(o);
        }
        Ok(())
    }
    fn broadcast_f32(&self, _: &mut [f32]) -> dagr_inject::Result<()> {
        unreachable!()
    }
}

/// The per-epoch check: processes whose states agree pass; a state that differs in one bit of
/// one parameter stops the run.
#[test]
fn processes_holding_different_states_are_stopped() {
    use dagr_inject::dagr::optim::Optimizer;
    use dagr_inject::train::{same_state_everywhere, Trainer};
    let dir = tempfile::tempdir().unwrap();
    let graph = training_graph("av_mlp.legacy.onnx", &["logits".into()], dir.path());
    let mut settings = crate::train_loop::settings(
        Optimizer::Sgd {
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        },
        0.01,
        dagr_inject::runtime::Backend::Ort,
    );
    settings.threads = Some(1);
    let t = Trainer::new(&graph, settings).unwrap();
    let halves = |h: u64| {
        let (hi, lo) = ((h >> 32) as f64, (h & 0xffff_ffff) as f64);
        [hi, lo, -hi, -lo]
    };
    let same = t.state_fingerprint().unwrap();
    same_state_everywhere(&t, &Pair { other: halves(same) }).unwrap();
    // The other process: one parameter one bit apart.
    let mut state = t.state().unwrap();
    let key = state.keys().find(|k| k.starts_with("param/")).unwrap().clone();
    let v = state.get_mut(&key).unwrap();
    let x = v.iter_mut().next().unwrap();
    *x = f32::from_bits(x.to_bits() ^ 1);
    let mut u = Trainer::new(&graph, t.settings.clone()).unwrap();
    u.set_state(&state).unwrap();
    let other = u.state_fingerprint().unwrap();
    assert_ne!(other, same);
    let e = same_state_everywhere(&t, &Pair { other: halves(other) })
        .unwrap_err()
        .to_string();
    assert!(e.contains("different parameters"), "{e}");
}
