//! Central finite differences of `dagr/loss` against `dagr/grad/*`, on the rewritten graph
//! itself (a DAGR block, whose inputs are the encoder outputs), for each potential, variant and
//! reduction; and the same gradients on tract and ONNX Runtime agree.

use crate::common::*;
use dagr_inject::dagr::{self, Config, Dispersion, Reduce, Variant};
use dagr_inject::onnx;
use dagr_inject::runtime::{ort_backend, Backend, Tensors, Value};
use ndarray::ArrayD;
use rand_like::Lcg;

mod rand_like {
    /// A tiny deterministic generator (no extra dependency): inputs and coordinate choices.
    pub struct Lcg(pub u64);
    impl Lcg {
        pub fn next_f32(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n
        }
    }
}

struct Setup {
    name: &'static str,
    cfg: Config,
    shapes: Vec<Vec<usize>>,
}

fn setups() -> Vec<Setup> {
    let base = |enc: usize| Config {
        encoders: (0..enc).map(|m| format!("m{m}=m{m}/z")).collect(),
        lambda_disp: 1.0,
        lambda_anc: 1.0,
        ..Default::default()
    };
    vec![
        Setup {
            name: "rbf",
            cfg: base(2),
            shapes: vec![vec![6, 5], vec![6, 5]],
        },
        Setup {
            name: "rbf_tau0.1",
            cfg: Config { tau: 0.1, ..base(2) },
            shapes: vec![vec![6, 5], vec![6, 5]],
        },
        Setup {
            name: "hinge",
            cfg: Config {
                dispersion: Dispersion::Hinge { margin: 1.2 },
                ..base(2)
            },
            shapes: vec![vec![6, 5], vec![6, 5]],
        },
        Setup {
            name: "naive",
            cfg: Config {
                variant: Variant::NaiveAlign,
                ..base(2)
            },
            shapes: vec![vec![6, 5], vec![6, 5]],
        },
        Setup {
            name: "three",
            cfg: base(3),
            shapes: vec![vec![5, 4], vec![5, 4], vec![5, 4]],
        },
        Setup {
            name: "flatten",
            cfg: base(2),
            shapes: vec![vec![4, 2, 3], vec![4, 6]],
        },
        Setup {
            name: "mean",
            cfg: Config {
                reduce: Reduce::Mean,
                ..base(2)
            },
            shapes: vec![vec![4, 3, 2, 5], vec![4, 5]],
        },
    ]
}

#[test]
fn gradients_match_central_differences() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Lcg(7);
    for s in setups() {
        let names: Vec<String> = (0..s.shapes.len()).map(|m| format!("m{m}")).collect();
        let trailing: Vec<Vec<i64>> = s
            .shapes
            .iter()
            .map(|v| v[1..].iter().map(|&d| d as i64).collect())
            .collect();
        let mut model = dagr::block::skeleton_shaped(&names, &trailing, 17).unwrap();
        let done = dagr::inject(&mut model, &s.cfg).unwrap();
        let path = dir.path().join(format!("{}.onnx", s.name));
        onnx::save(&model, &path).unwrap();
        let o = &done.record.outputs;

        let mut feed = Tensors::new();
        for (n, shape) in names.iter().zip(&s.shapes) {
            let len: usize = shape.iter().product();
            let data: Vec<f32> = (0..len).map(|_| rng.next_f32() * 2.0).collect();
            feed.insert(
                n.clone(),
                Value::F32(ArrayD::from_shape_vec(shape.clone(), data).unwrap()),
            );
        }
        let grad_names: Vec<String> = o.grads.iter().map(|g| g.1.clone()).collect();
        let mut session = ort_backend::session(&path).unwrap();
        let analytic = ort_backend::run_session(&mut session, &feed, &grad_names).unwrap();
        let on_tract = run(Backend::Tract, &path, &feed, &grad_names);
        let loss_at = |session: &mut ort::session::Session, feed: &Tensors| -> f64 {
            let r = ort_backend::run_session(session, feed, std::slice::from_ref(&o.loss)).unwrap();
            f32_of(&r, &o.loss).iter().next().copied().unwrap() as f64
        };
        for (m, n) in names.iter().enumerate() {
            let g = f32_of(&analytic, &grad_names[m]);
            let gt = f32_of(&on_tract, &grad_names[m]);
            let scale = g.iter().fold(1e-4f32, |a, v| a.max(v.abs())) as f64;
            let parity = max_abs_diff(&g, &gt);
            assert!(
                parity <= 1e-5 * scale,
                "{}: tract and ORT gradients differ by {parity:e}",
                s.name
            );
            let len = g.len();
            for _ in 0..8 {
                let i = rng.below(len);
                let h = 1e-2f32;
                let base = feed[n].as_f32().unwrap().clone();
                let mut plus = base.clone();
                plus.as_slice_mut().unwrap()[i] += h;
                let mut minus = base.clone();
                minus.as_slice_mut().unwrap()[i] -= h;
                let mut f2 = feed.clone();
                f2.insert(n.clone(), Value::F32(plus));
                let lp = loss_at(&mut session, &f2);
                f2.insert(n.clone(), Value::F32(minus));
                let lm = loss_at(&mut session, &f2);
                let fd = (lp - lm) / (2.0 * h as f64);
                let an = g.as_slice().unwrap()[i] as f64;
                assert!(
                    (fd - an).abs() <= 2e-3 * scale + 1e-4 * an.abs(),
                    "{}: d loss / d {n}[{i}]: finite difference {fd}, analytic {an}",
                    s.name
                );
            }
        }
    }
}
