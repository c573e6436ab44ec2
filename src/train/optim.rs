//! Optimizers, learning-rate schedules and gradient clipping, with the semantics of
//! `torch.optim` (so that a step here equals a step there; tests/train_loop.rs checks it).

use ndarray::{ArrayD, Zip};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Optimizer {
    /// `torch.optim.SGD(lr, momentum, nesterov, weight_decay)` (dampening 0).
    Sgd {
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    /// `torch.optim.AdamW(lr, betas, eps, weight_decay)`.
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Multiply by `gamma` every `step_size` epochs.
    Step {
        step_size: usize,
        gamma: f64,
    },
    /// Cosine decay from the base rate to `min_lr` over all steps after warm-up.
    Cosine {
        min_lr: f64,
    },
}

/// The learning rate at `step` (0-based) of `total` steps, in epoch `epoch`: a linear warm-up
/// over the first `warmup` steps, then the schedule.
pub fn learning_rate(base: f64, schedule: Schedule, warmup: usize, step: usize, total: usize, epoch: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Constant => base,
        Schedule::Step { step_size, gamma } => base * gamma.powi((epoch / step_size.max(1)) as i32),
        Schedule::Cosine { min_lr } => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let t = (step - warmup) as f64 / span;
            min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

/// Scale all gradients so that their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [ArrayD<f32>], max_norm: f64) -> f64 {
    let total: f64 = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt();
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            g.mapv_inplace(|v| (v as f64 * coef) as f32);
        }
    }
    total
}

/// Per-parameter optimizer state.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// SGD momentum buffer, or Adam's first moment.
    pub m: Option<ArrayD<f32>>,
    /// Adam's second moment.
    pub v: Option<ArrayD<f32>>,
}

/// One update of parameter `p` with gradient `g`; `t` is the 1-based step count.
pub fn step(opt: Optimizer, lr: f64, t: usize, p: &mut ArrayD<f32>, g: &ArrayD<f32>, s: &mut State) {
    match opt {
        Optimizer::Sgd {
            momentum,
            nesterov,
            weight_decay,
        } => {
            let mut d = g.mapv(|v| v as f64);
            if weight_decay != 0.0 {
                Zip::from(&mut d)
                    .and(&*p)
                    .for_each(|d, &p| *d += weight_decay * p as f64);
            }
            if momentum != 0.0 {
                let buf = match s.m.take() {
                    None => d.mapv(|v| v as f32),
                    Some(mut b) => {
                        Zip::from(&mut b)
                            .and(&d)
                            .for_each(|b, &d| *b = (momentum * *b as f64 + d) as f32);
                        b
                    }
                };
                if nesterov {
                    Zip::from(&mut d).and(&buf).for_each(|d, &b| *d += momentum * b as f64);
                } else {
                    d = buf.mapv(|v| v as f64);
                }
                s.m = Some(buf);
            }
            Zip::from(p).and(&d).for_each(|p, &d| *p = (*p as f64 - lr * d) as f32);
        }
        Optimizer::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } => {
            p.mapv_inplace(|v| (v as f64 * (1.0 - lr * weight_decay)) as f32);
            let m = s.m.get_or_insert_with(|| ArrayD::zeros(g.raw_dim()));
            Zip::from(&mut *m)
                .and(g)
                .for_each(|m, &g| *m = (beta1 * *m as f64 + (1.0 - beta1) * g as f64) as f32);
            let v = s.v.get_or_insert_with(|| ArrayD::zeros(g.raw_dim()));
            Zip::from(&mut *v)
                .and(g)
                .for_each(|v, &g| *v = (beta2 * *v as f64 + (1.0 - beta2) * (g as f64) * (g as f64)) as f32);
            let bc1 = 1.0 - beta1.powi(t as i32);
            let bc2 = 1.0 - beta2.powi(t as i32);
            let m = s.m.as_ref().unwrap();
            let v = s.v.as_ref().unwrap();
            Zip::from(p).and(m).and(v).for_each(|p, &m, &v| {
                let denom = (v as f64 / bc2).sqrt() + eps;
                *p = (*p as f64 - lr * (m as f64 / bc1) / denom) as f32;
            });
        }
    }
}
