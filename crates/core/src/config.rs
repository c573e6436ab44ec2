//! The DAGR hyper-parameters and the choices of `../shared/dagr-spec.md`, with their defaults.

use dagr_onnx::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// How an encoder output of rank > 2 becomes `[B, D']` (spec, Symbols).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Reduce {
    /// Row-major flatten of all non-batch axes.
    #[default]
    Flatten,
    /// Mean over all axes between the batch axis and the last.
    Mean,
}

/// The intra-modal dispersion potential (spec section 2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Dispersion {
    /// `log mean_{i<j} exp(-||u_i - u_j||^2 / tau)`
    Rbf,
    /// `mean_{i<j} max(0, margin - ||u_i - u_j||)^2`
    Hinge { margin: f64 },
}

/// Ablation variants (spec section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// Dispersion and bounded-hinge anchoring.
    #[default]
    Dagr,
    DispOnly,
    AnchorOnly,
    /// Dispersion plus always-on `mean_i ||u_i^a - u_i^b||^2` in place of the hinge.
    NaiveAlign,
    /// Normalization only: the losses and gradients are zero.
    UnitSphere,
}

impl Variant {
    pub fn uses_dispersion(self) -> bool {
        matches!(self, Variant::Dagr | Variant::DispOnly | Variant::NaiveAlign)
    }
    pub fn uses_anchoring(self) -> bool {
        matches!(self, Variant::Dagr | Variant::AnchorOnly | Variant::NaiveAlign)
    }
}

/// The task loss that `dagr/total_loss` adds DAGR to (spec section 4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Task {
    /// Only DAGR's losses and gradients are produced.
    #[default]
    None,
    /// An existing scalar output of the model.
    Loss { output: String },
    /// Cross-entropy over named logits and a new int64 label input, summed over heads.
    CrossEntropy { logits: Vec<String>, labels: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// `--encoders` entries: `name=tensor`, tensor names or module scopes.
    pub encoders: Vec<String>,
    pub reduce: Reduce,
    pub tau: f64,
    pub delta: f64,
    pub lambda_disp: f64,
    pub lambda_anc: f64,
    pub dispersion: Dispersion,
    pub variant: Variant,
    pub task: Task,
}

/// The defaults of the paper's experiments (the command line's defaults too).
pub mod defaults {
    pub const TAU: f64 = 0.5;
    pub const DELTA: f64 = 0.5;
    pub const LAMBDA_DISP: f64 = 0.1;
    pub const LAMBDA_ANC: f64 = 0.1;
    /// Margin of the hinge dispersion potential.
    pub const MARGIN: f64 = 1.0;
}

impl Default for Config {
    fn default() -> Self {
        Config {
            encoders: Vec::new(),
            reduce: Reduce::Flatten,
            tau: defaults::TAU,
            delta: defaults::DELTA,
            lambda_disp: defaults::LAMBDA_DISP,
            lambda_anc: defaults::LAMBDA_ANC,
            dispersion: Dispersion::Rbf,
            variant: Variant::Dagr,
            task: Task::None,
        }
    }
}

/// `normalize` eps, as in PyTorch's `F.normalize`.
pub const NORM_EPS: f64 = 1e-12;
/// Added under the square root of distances so that the gradient at distance 0 is finite.
pub const DIST_EPS: f64 = 1e-12;

impl Config {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.encoders.len() < 2 {
            return bad(format!(
                "DAGR needs at least two encoders, got {} ({}); pass `encoders` a,b",
                self.encoders.len(),
                self.encoders.join(",")
            ));
        }
        for (i, a) in self.encoders.iter().enumerate() {
            if self.encoders[..i].contains(a) {
                return bad(format!("the encoder '{a}' is named twice in `encoders`"));
            }
        }
        if self.encoders.len() > dagr_onnx::limits::MAX_MODALITIES {
            return bad(format!(
                "DAGR takes at most {} encoders, got {}",
                dagr_onnx::limits::MAX_MODALITIES,
                self.encoders.len()
            ));
        }
        // The graph computes in float32: exp(-d^2 / tau) with d^2 up to 4, gradients scaled by
        // lambda / tau. These ranges keep every intermediate finite.
        if !(TAU_RANGE.contains(&self.tau)) {
            return bad(format!(
                "`tau` must be a positive number between {:e} and {:e} (float32 computes exp(-d^2/tau) with d^2 up to 4), got {}",
                TAU_RANGE.start(),
                TAU_RANGE.end(),
                self.tau
            ));
        }
        if !(self.delta >= 0.0 && self.delta.is_finite()) {
            return bad(format!("`delta` must be >= 0, got {}", self.delta));
        }
        for (n, v) in [("`lambda_disp`", self.lambda_disp), ("`lambda_anc`", self.lambda_anc)] {
            if !(0.0..=MAX_LAMBDA).contains(&v) {
                return bad(format!("{n} must be a number between 0 and {MAX_LAMBDA:e}, got {v}"));
            }
        }
        if let Dispersion::Hinge { margin } = self.dispersion {
            if !(margin > 0.0 && margin <= 1e6) {
                return bad(format!("`margin` must be positive, got {margin}"));
            }
        }
        if let Task::CrossEntropy { logits, labels } = &self.task {
            if logits.is_empty() {
                return bad("`labels` needs `logits` naming at least one logits tensor".into());
            }
            if labels.trim().is_empty() {
                return bad("`labels` needs a name for the label input".into());
            }
        }
        Ok(())
    }
}

/// The temperatures DAGR's float32 graph computes with (see `Config::validate`).
pub const TAU_RANGE: std::ops::RangeInclusive<f64> = 1e-6..=1e6;
/// The largest weight of a DAGR term.
pub const MAX_LAMBDA: f64 = 1e6;
