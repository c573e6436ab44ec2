//! Finite-difference cases of the gradient rules, kept beside them: each rules module lists
//! the cases of its ops (`cases()`), which the rule tests (tests/it/grad_rules.rs) build into
//! one-op models, differentiate, and check against central differences on the backends each
//! case names, again with symbolic dims, and for their output shapes against ONNX Runtime.
//! `every_rule_has_a_case` fails when the registry gains a rule without one.

use dagr_onnx::proto::AttributeProto;

#[derive(Clone)]
pub enum In {
    /// A differentiable float input of this shape.
    X(Vec<usize>),
    /// A differentiable float graph input of this shape that the op does not take as an input:
    /// its subgraphs read it from the outer scope (If branches).
    Captured(Vec<usize>),
    /// Constant int64 input (axes, shapes, indices).
    Ints(Vec<i64>, Vec<i64>),
    /// An int64 graph input fed these values at every run: values the graph cannot know when
    /// it is built (pads or sizes computed from data).
    FedInts(Vec<i64>, Vec<i64>),
    /// Constant float input.
    F(Vec<i64>, Vec<f32>),
    /// Constant bool input.
    B(Vec<i64>, Vec<bool>),
    /// Constant int32 input (RNN sequence lengths).
    I32(Vec<i64>, Vec<i32>),
    /// An optional input left out (its name empty).
    Absent,
}

/// How the values of the differentiated inputs are drawn.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Gen {
    /// Values in ±[0.2, 2]: away from 0 (kinks of Relu, Abs; poles of Div, Log).
    AwayFromZero,
    /// Positive values in [0.5, 2].
    Positive,
    /// Distinct values on a grid 0.05 apart, each input's grid shifted by its own fraction of
    /// the spacing (no ties, within an input or across inputs: Max/Min, MaxPool, scatter max).
    Distinct,
    /// Values in ±[0.1, 0.8] (Asin, Acos, Atanh).
    Unit,
    /// Values in [1.2, 3] (Acosh).
    AboveOne,
    /// `AwayFromZero`, with exact zeros at these flat indices (ReduceProd's zeros).
    ZerosAt(&'static [usize]),
}

/// The backends that run a case's forward op as the spec says.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Runs {
    Both,
    /// Ops tract cannot run forward (BatchNormalization with non-constant parameters or in
    /// training mode, SoftmaxCrossEntropyLoss, ...).
    OrtOnly,
    /// Ops ONNX Runtime cannot run forward (batch-major recurrent layouts).
    TractOnly,
}

pub const BOTH: Runs = Runs::Both;
pub const ORT_ONLY: Runs = Runs::OrtOnly;
pub const TRACT_ONLY: Runs = Runs::TractOnly;

/// One case: a one-op model and how to check its gradient.
pub struct Case {
    pub name: &'static str,
    pub op: &'static str,
    pub attrs: Vec<AttributeProto>,
    pub inputs: Vec<In>,
    pub outputs: usize,
    /// How many of the outputs the loss sums over (the first ones).
    pub loss_outputs: usize,
    pub gen: Gen,
    pub runs: Runs,
    pub opset: i64,
    /// The dims of the first input declared symbolic by `every_rule_handles_symbolic_dims`
    /// (default: all but those of size 1 and an image's or signal's channels).
    pub symbolic: Option<Vec<usize>>,
    /// Why onnx.checker refuses the one-op model whatever its gradient (None: it is checked).
    pub checker_refuses: Option<&'static str>,
    /// Dims (output, dim) that the op decides from values at run time (a Loop's iteration count
    /// under its condition): inference must leave them unknown, and the shape test checks that.
    pub run_time_dims: Vec<(usize, usize)>,
}

pub fn case(name: &'static str, op: &'static str, inputs: Vec<In>) -> Case {
    Case {
        name,
        op,
        attrs: vec![],
        inputs,
        outputs: 1,
        loss_outputs: 1,
        gen: Gen::AwayFromZero,
        runs: BOTH,
        opset: 17,
        symbolic: None,
        checker_refuses: None,
        run_time_dims: vec![],
    }
}

impl Case {
    pub fn attrs(mut self, a: Vec<AttributeProto>) -> Self {
        self.attrs = a;
        self
    }
    pub fn gen(mut self, g: Gen) -> Self {
        self.gen = g;
        self
    }
    pub fn outputs(mut self, n: usize) -> Self {
        self.outputs = n;
        self
    }
    /// `n` outputs, all in the loss.
    pub fn all_outputs(mut self, n: usize) -> Self {
        self.outputs = n;
        self.loss_outputs = n;
        self
    }
    /// Dim `dim` of output `output` is decided at run time (see `run_time_dims`).
    pub fn run_time_dim(mut self, output: usize, dim: usize) -> Self {
        self.run_time_dims.push((output, dim));
        self
    }
    pub fn checker_refuses(mut self, why: &'static str) -> Self {
        self.checker_refuses = Some(why);
        self
    }
    pub fn symbolic(mut self, dims: &[usize]) -> Self {
        self.symbolic = Some(dims.to_vec());
        self
    }
    pub fn only(mut self, r: Runs) -> Self {
        self.runs = r;
        self
    }
    pub fn opset(mut self, o: i64) -> Self {
        self.opset = o;
        self
    }
}

/// A differentiable float input of shape `s`.
pub fn x(s: &[usize]) -> In {
    In::X(s.to_vec())
}
/// A constant 1-D int64 input.
pub fn ints(v: &[i64]) -> In {
    In::Ints(vec![v.len() as i64], v.to_vec())
}
