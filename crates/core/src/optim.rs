//! Optimizers and learning-rate schedules, with the semantics of `torch.optim` (so that a step
//! here equals a step there; tests/it/train_loop.rs checks it against PyTorch).
//!
//! Each optimizer is declared in one place: the state it keeps per parameter
//! (`Optimizer::slots`), its update as ONNX nodes (`Optimizer::emit_update`, folded into the
//! step graph by `step_graph`), and the few scalars the host computes per step
//! (`Optimizer::scalars`: the learning rate and bias corrections). Parameters and state never
//! leave the backend; a step moves the batch and these scalars only.

use dagr_onnx::builder::Builder;
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

/// Names of the per-step scalar inputs of the step graph.
pub mod scalar {
    /// SGD: the learning rate.
    pub const LR: &str = "dagr/opt/lr";
    /// AdamW: `1 - lr * weight_decay`, the decoupled weight decay factor.
    pub const DECAY: &str = "dagr/opt/decay";
    /// AdamW: `lr / (1 - beta1^t)`.
    pub const STEP_SIZE: &str = "dagr/opt/step_size";
    /// AdamW: `sqrt(1 - beta2^t)`.
    pub const BC2_SQRT: &str = "dagr/opt/bc2_sqrt";
}

/// A per-parameter state tensor of an optimizer (same shape as the parameter, zeros at first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// SGD's momentum buffer, or Adam's first moment (`exp_avg`).
    M,
    /// Adam's second moment (`exp_avg_sq`).
    V,
}

impl Slot {
    /// The key prefix of this slot in checkpoints and the step graph's input names.
    pub fn key(self) -> &'static str {
        match self {
            Slot::M => "m",
            Slot::V => "v",
        }
    }
}

impl Optimizer {
    /// The state this optimizer keeps per parameter.
    pub fn slots(self) -> &'static [Slot] {
        match self {
            Optimizer::Sgd { momentum, .. } if momentum != 0.0 => &[Slot::M],
            Optimizer::Sgd { .. } => &[],
            Optimizer::AdamW { .. } => &[Slot::M, Slot::V],
        }
    }

    /// Whether every non-finite update of `slot` makes the parameter's update non-finite too,
    /// so that the parameter's finiteness check covers the slot's. SGD's momentum buffer: the
    /// step subtracts `lr buf` (or `lr (d + mu buf)`, mu != 0 where there is a buffer), and
    /// `lr * inf` is infinite for lr != 0 and NaN for lr = 0, as is `x * NaN`; the parameter
    /// before the step is finite (the state accepted). Adam's first moment likewise (`step_size
    /// m / (sqrt(v) + eps)`, a positive finite denominator or a NaN). Not Adam's second moment:
    /// an infinite `v` makes the step `m / inf = 0`, a finite parameter.
    pub fn checked_through_param(self, slot: Slot) -> bool {
        match (self, slot) {
            (Optimizer::Sgd { .. }, Slot::M) => true,
            (Optimizer::AdamW { .. }, Slot::M) => true,
            (_, Slot::V) => false,
        }
    }

    /// The scalar inputs of the step graph at 1-based step `t` with learning rate `lr`,
    /// computed in f64 as PyTorch computes them in Python floats.
    pub fn scalars(self, lr: f64, t: usize) -> Vec<(&'static str, f64)> {
        match self {
            Optimizer::Sgd { .. } => vec![(scalar::LR, lr)],
            Optimizer::AdamW {
                beta1,
                beta2,
                weight_decay,
                ..
            } => {
                let bc1 = 1.0 - beta1.powi(t as i32);
                let bc2 = 1.0 - beta2.powi(t as i32);
                vec![
                    (scalar::DECAY, 1.0 - lr * weight_decay),
                    (scalar::STEP_SIZE, lr / bc1),
                    (scalar::BC2_SQRT, bc2.sqrt()),
                ]
            }
        }
    }

    /// The names of the scalar inputs (as in `scalars`).
    pub fn scalar_names(self) -> Vec<&'static str> {
        self.scalars(0.0, 1).into_iter().map(|s| s.0).collect()
    }

    /// Emit the update of parameter `p` with (clipped) gradient `g`; `state` holds the inputs
    /// of `slots()` in order. Returns the updated parameter and the updated state, in order.
    ///
    /// SGD (`torch.optim.SGD`, dampening 0): `d = g + wd p`; `buf = mu buf + d` (the first
    /// step's `buf = d` is this with `buf = 0`); `d = d + mu buf` (Nesterov) or `d = buf`;
    /// `p - lr d`. AdamW (`torch.optim.AdamW`): `p (1 - lr wd)`; `m = b1 m + (1 - b1) g`;
    /// `v = b2 v + (1 - b2) g^2`; `p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)`.
    ///
    /// With `after` (a boolean scalar), every factor of a product with the old state is first
    /// passed through `Where(after, s, s)`: the same value, but the product now depends on
    /// `after`, so a runtime computes it after `after` and cannot merge it with the same
    /// product computed before (a second computation of the update, see `step_graph`).
    pub fn emit_update(
        self,
        b: &mut Builder,
        p: &str,
        g: &str,
        state: &[String],
        after: Option<&str>,
    ) -> (String, Vec<String>) {
        let late = |b: &mut Builder, s: &str| -> String {
            match after {
                Some(a) => b.op("Where", &[a, s, s], vec![], "late"),
                None => s.to_string(),
            }
        };
        match self {
            Optimizer::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                let mut d = g.to_string();
                if weight_decay != 0.0 {
                    let wd = b.scalar(weight_decay);
                    let wd = late(b, &wd);
                    let decay = b.binary("Mul", p, &wd, "sgd");
                    d = b.binary("Add", &d, &decay, "sgd");
                }
                let mut next_state = Vec::new();
                if momentum != 0.0 {
                    let mu = b.scalar(momentum);
                    let mu = late(b, &mu);
                    let kept = b.binary("Mul", &state[0], &mu, "sgd");
                    let buf = b.binary("Add", &kept, &d, "sgd");
                    d = if nesterov {
                        let ahead = b.binary("Mul", &buf, &mu, "sgd");
                        b.binary("Add", &d, &ahead, "sgd")
                    } else {
                        buf.clone()
                    };
                    next_state.push(buf);
                }
                let step = b.binary("Mul", &d, scalar::LR, "sgd");
                (b.binary("Sub", p, &step, "sgd"), next_state)
            }
            Optimizer::AdamW { beta1, beta2, eps, .. } => {
                let decay = late(b, scalar::DECAY);
                let decayed = b.binary("Mul", p, &decay, "adamw");
                let b1 = b.scalar(beta1);
                let b1 = late(b, &b1);
                let omb1 = b.scalar(1.0 - beta1);
                let m_kept = b.binary("Mul", &state[0], &b1, "adamw");
                let m_new = b.binary("Mul", g, &omb1, "adamw");
                let m = b.binary("Add", &m_kept, &m_new, "adamw");
                let b2 = b.scalar(beta2);
                let b2 = late(b, &b2);
                let omb2 = b.scalar(1.0 - beta2);
                let v_kept = b.binary("Mul", &state[1], &b2, "adamw");
                let g2 = b.binary("Mul", g, g, "adamw");
                let v_new = b.binary("Mul", &g2, &omb2, "adamw");
                let v = b.binary("Add", &v_kept, &v_new, "adamw");
                let root = b.unary("Sqrt", &v, "adamw");
                let scaled = b.binary("Div", &root, scalar::BC2_SQRT, "adamw");
                let eps = b.scalar(eps);
                let denom = b.binary("Add", &scaled, &eps, "adamw");
                let ratio = b.binary("Div", &m, &denom, "adamw");
                let step = b.binary("Mul", &ratio, scalar::STEP_SIZE, "adamw");
                (b.binary("Sub", &decayed, &step, "adamw"), vec![m, v])
            }
        }
    }

    /// Whether `emit_bounds` bounds this optimizer's update.
    pub fn bounded(self) -> bool {
        match self {
            Optimizer::AdamW { eps, .. } => eps > 0.0,
            Optimizer::Sgd { .. } => true,
        }
    }

    /// Bounds of the update `emit_update` makes of parameter `p` with slots `slots`, from
    /// magnitudes known without making it: the L1 norms of the parameter and of its slots (each
    /// at least the largest magnitude in its tensor, in float32 too: a sum of magnitudes rounded
    /// to nearest never falls below its largest term; one pass over each, and a NaN or an
    /// infinity makes it non-finite), and `g_sq`, the gradient's squared L2 norm (its root
    /// bounds every entry of the gradient, clipped or not). Returns,
    /// for the parameter and for each slot in order, a value at least as large as every
    /// magnitude the update computes on its way to that tensor, so that where the bound is
    /// finite with a margin the update is finite; `None` for an update that no magnitude bounds
    /// (AdamW with eps 0 divides by `sqrt(v)`, which may be 0).
    ///
    /// SGD: `|d| <= G + wd |p|`, `|buf'| <= mu |buf| + |d|`, `|p'| <= |p| + lr |d'|`. AdamW:
    /// `|m'| <= b1 |m| + (1 - b1) G`, `v' <= b2 v + (1 - b2) G^2` (the second moment is never
    /// negative: its updates keep it so, and a resumed one is checksummed),
    /// `|p'| <= |decay| |p| + |step size| |m'| / eps` (the denominator is at least eps).
    ///
    /// `l1` makes a tensor's L1 norm (a one-element vector), in the form the runtime runs fastest.
    pub fn emit_bounds(
        self,
        b: &mut Builder,
        p: &str,
        slots: &[String],
        g_sq: &str,
        l1: &mut dyn FnMut(&mut Builder, &str) -> String,
    ) -> Option<(String, Vec<String>)> {
        if !self.bounded() {
            return None;
        }
        let p_l1 = &l1(b, p);
        let slot_l1: Vec<String> = slots.iter().map(|s| l1(b, s)).collect();
        let g_max = b.unary("Sqrt", g_sq, "bound");
        let plus = |b: &mut Builder, x: &str, k: f64, y: &str| -> String {
            let k = b.scalar(k);
            let kx = b.binary("Mul", x, &k, "bound");
            b.binary("Add", &kx, y, "bound")
        };
        match self {
            Optimizer::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                let mut d = g_max;
                if weight_decay != 0.0 {
                    d = plus(b, p_l1, weight_decay, &d);
                }
                let mut slots = Vec::new();
                if momentum != 0.0 {
                    let buf = plus(b, &slot_l1[0], momentum, &d);
                    d = if nesterov {
                        plus(b, &buf, momentum, &d)
                    } else {
                        buf.clone()
                    };
                    slots.push(buf);
                }
                let lr = b.unary("Abs", scalar::LR, "bound");
                let step = b.binary("Mul", &d, &lr, "bound");
                Some((b.binary("Add", p_l1, &step, "bound"), slots))
            }
            Optimizer::AdamW { beta1, beta2, eps, .. } => {
                let omb1 = b.scalar(1.0 - beta1);
                let m_new = b.binary("Mul", &g_max, &omb1, "bound");
                let m = plus(b, &slot_l1[0], beta1, &m_new);
                let omb2 = b.scalar(1.0 - beta2);
                let v_new = b.binary("Mul", g_sq, &omb2, "bound");
                let v = plus(b, &slot_l1[1], beta2, &v_new);
                let size = b.unary("Abs", scalar::STEP_SIZE, "bound");
                let eps = b.scalar(eps);
                let ratio = b.binary("Div", &m, &eps, "bound");
                let step = b.binary("Mul", &ratio, &size, "bound");
                let decay = b.unary("Abs", scalar::DECAY, "bound");
                let decayed = b.binary("Mul", p_l1, &decay, "bound");
                Some((b.binary("Add", &decayed, &step, "bound"), vec![m, v]))
            }
        }
    }
}
