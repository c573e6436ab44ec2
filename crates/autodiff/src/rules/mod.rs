//! The gradient registry: one line per operator, in the spirit of PyTorch's
//! `derivatives.yaml`. Each rule builds the vector-Jacobian product of its op from standard ONNX
//! operators only. `tests/it/grad_rules.rs` holds a finite-difference case for every entry and
//! fails when an entry has none.

pub mod elementwise;
pub mod linalg;
pub mod loss;
pub mod nn;
pub mod shape;

use crate::ctx::{Ctx, Vjp};
use dagr_onnx::error::Result;

/// What a rule returns: the gradient of each input (None where none flows or none is needed).
type Out = Result<Vec<Option<String>>>;

/// The upstream gradient of the op's first output, if any flows.
fn g0(g: &[Option<String>]) -> Option<&str> {
    g.first().and_then(|x| x.as_deref())
}

/// `g0`, owned (for rules that keep it across builder calls).
fn g0_owned(g: &[Option<String>]) -> Option<String> {
    g0(g).map(String::from)
}

/// One registry entry.
pub struct Rule {
    pub op: &'static str,
    pub vjp: Vjp,
    /// The formula, for people reading the registry.
    pub formula: &'static str,
}

/// Ops whose outputs carry no gradient (shapes, constants, comparisons, indices).
fn none(_: &mut Ctx, _: &[Option<String>], need: &[bool]) -> Result<Vec<Option<String>>> {
    Ok(vec![None; need.len()])
}

macro_rules! rules {
    ($($op:literal => $f:path, $doc:literal;)*) => {
        pub static RULES: &[Rule] = &[$(Rule { op: $op, vjp: $f, formula: $doc },)*];
    };
}

use elementwise as ew;
rules! {
    "Add" => ew::add, "dA = unb(g), dB = unb(g)";
    "Sub" => ew::sub, "dA = unb(g), dB = -unb(g)";
    "Mul" => ew::mul, "dA = unb(g B), dB = unb(g A)";
    "Div" => ew::div, "dA = unb(g / B), dB = -unb(g Y / B)";
    "Pow" => ew::pow, "dA = unb(g B A^(B-1)), dB = unb(g Y ln A) (0 where A <= 0)";
    "Sum" => ew::sum, "dX_i = unb(g)";
    "Neg" => ew::neg, "dX = -g";
    "Identity" => ew::identity, "dX = g";
    "Relu" => ew::relu, "dX = g where X > 0";
    "LeakyRelu" => ew::leaky_relu, "dX = g where X > 0, alpha g elsewhere";
    "Sigmoid" => ew::sigmoid, "dX = g Y (1 - Y)";
    "Tanh" => ew::tanh, "dX = g (1 - Y^2)";
    "Erf" => ew::erf, "dX = g 2/sqrt(pi) exp(-X^2)";
    "Exp" => ew::exp, "dX = g Y";
    "Log" => ew::log, "dX = g / X";
    "Sqrt" => ew::sqrt, "dX = g / (2 Y)";
    "Abs" => ew::abs, "dX = g sign(X)";
    "Clip" => ew::clip, "dX = g where min <= X <= max";
    "Max" => ew::max, "dA = unb(g [A > B] + g/2 [A = B]), dB likewise";
    "Min" => ew::min, "dA = unb(g [A < B] + g/2 [A = B]), dB likewise";
    "Where" => ew::where_, "dX = unb(where(C, g, 0)), dY = unb(where(C, 0, g))";
    "Cast" => ew::cast, "dX = cast(g, type of X) for floating X";
    "CastLike" => ew::cast_like, "dX = cast(g, type of X) for floating X; the type input has none";
    "Gelu" => ew::gelu, "dX = g (Φ(X) + X φ(X)); tanh: its derivative";
    "HardSigmoid" => ew::hard_sigmoid, "dX = g alpha where 0 < alpha X + beta < 1";
    "HardSwish" => ew::hard_swish, "dX = g (2X + 3)/6 on (-3, 3), g above";
    "Dropout" => ew::dropout, "dX = g mask / (1 - ratio) in training mode, g otherwise";
    "MatMul" => linalg::matmul, "dA = unb(g B^T), dB = unb(A^T g)";
    "Gemm" => linalg::gemm, "dA = alpha g B'^T (transposed back), dB = alpha A'^T g, dC = beta unb(g)";
    "Softmax" => nn::softmax, "dX = Y (g - sum(g Y))";
    "LogSoftmax" => nn::log_softmax, "dX = g - exp(Y) sum(g)";
    "Conv" => nn::conv, "dX = ConvTranspose(g, W), dW = Conv(X^T, g^T) cropped, dB = sum(g)";
    "MaxPool" => nn::max_pool, "dX = scatter_add(g at the argmax indices)";
    "AveragePool" => nn::average_pool, "dX = ConvTranspose(g / count, ones)";
    "GlobalAveragePool" => nn::global_average_pool, "dX = expand(g / (H W))";
    "BatchNormalization" => nn::batch_norm, "inference: dX = g scale r; training: dX = scale r/M (M g - sum g - x̂ sum(g x̂))";
    "InstanceNormalization" => nn::instance_norm, "dX = r (ĝ - mean ĝ - x̂ mean(ĝ x̂)), ĝ = g scale, over the spatial dims; dscale = Σ g x̂, dB = Σ g";
    "LayerNormalization" => nn::layer_norm, "dX = r (ĝ - mean ĝ - x̂ mean(ĝ x̂)), ĝ = g scale";
    "Flatten" => shape::reshape, "dX = reshape(g, shape(X))";
    "Reshape" => shape::reshape, "dX = reshape(g, shape(X))";
    "Squeeze" => shape::reshape, "dX = reshape(g, shape(X))";
    "Unsqueeze" => shape::reshape, "dX = reshape(g, shape(X))";
    "Transpose" => shape::transpose, "dX = transpose(g, inverse perm)";
    "Concat" => shape::concat, "dX_i = slice of g";
    "Split" => shape::split, "dX = concat(g_i, zeros for missing g_i)";
    "Slice" => shape::slice, "dX = pad(g) (step 1)";
    "Gather" => shape::gather, "dX = scatter_nd_add(zeros, indices, g)";
    "GatherND" => shape::gather_nd, "dX = scatter_nd_add(zeros, indices, g) (batch_dims 0)";
    "GatherElements" => shape::gather_elements, "dX = scatter_elements_add(zeros, indices, g)";
    "Expand" => shape::expand, "dX = unb(g)";
    "ReduceSum" => shape::reduce_sum, "dX = expand(g)";
    "ReduceMean" => shape::reduce_mean, "dX = expand(g) / n";
    "SoftmaxCrossEntropyLoss" => loss::softmax_cross_entropy, "dS = (softmax(S) - onehot(y)) g / N";
    "Shape" => none, "no gradient";
    "Size" => none, "no gradient";
    "Constant" => none, "no gradient";
    "ConstantOfShape" => none, "no gradient";
    "EyeLike" => none, "no gradient";
    "Equal" => none, "no gradient";
    "Greater" => none, "no gradient";
    "Less" => none, "no gradient";
    "GreaterOrEqual" => none, "no gradient";
    "LessOrEqual" => none, "no gradient";
    "Not" => none, "no gradient";
    "And" => none, "no gradient";
    "Or" => none, "no gradient";
    "Range" => none, "no gradient";
    "ArgMax" => none, "no gradient";
    "ArgMin" => none, "no gradient";
    "Sign" => none, "no gradient (zero almost everywhere)";
}

/// The rule for an operator of the default domain.
pub fn lookup(domain: &str, op: &str) -> Option<&'static Rule> {
    if !(domain.is_empty() || domain == "ai.onnx") {
        return None;
    }
    RULES.iter().find(|r| r.op == op)
}

/// Ops whose rule is `none`: they never carry a gradient, so tests need no case for them.
pub fn is_non_differentiable(op: &str) -> bool {
    RULES.iter().any(|r| r.op == op && r.formula.starts_with("no gradient"))
}
