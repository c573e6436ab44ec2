//! The gradient registry: one line per operator, in the spirit of PyTorch's
//! `derivatives.yaml`. In the formulas, `unb` is the engine's sum of a broadcast gradient down
//! to its input's shape, applied to every rule of kind `Broadcast`. Each rule builds the vector-Jacobian product of its op from standard ONNX
//! operators only. Each module holds its rules and, beside them, their finite-difference cases
//! (`cases()`), which `tests/it/grad_rules.rs` runs; it fails when an entry has no case or no
//! shape inference rule.

pub mod composite;
pub mod elementwise;
pub mod linalg;
pub mod loss;
pub mod nn;
pub mod recurrent;
pub mod resample;
pub mod shape;

use crate::ctx;
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
    pub kind: Kind,
    /// The formula, for people reading the registry.
    pub formula: &'static str,
}

/// How an op's gradient is built.
#[derive(Clone, Copy)]
pub enum Kind {
    /// A vector-Jacobian product written out: each gradient shaped like its input.
    Vjp(ctx::Vjp),
    /// The vector-Jacobian product of an op whose inputs broadcast to its output: the rule
    /// returns each input's gradient shaped like the output, and the engine sums it down to the
    /// input's shape (PyTorch's central `sum_to`; `Ctx::unbroadcast`), deciding at run time where
    /// a symbolic dim may or may not broadcast.
    Broadcast(ctx::Vjp),
    /// Differentiated through its body: the op is rewritten into primitive ops (recomputed in
    /// the backward part, the forward keeps the op itself), and the engine differentiates those.
    Body(ctx::Body),
    /// Outputs that carry no gradient (shapes, constants, comparisons, indices, rounding).
    NoGradient,
}

macro_rules! rules {
    ($($op:literal => $kind:expr, $doc:literal;)*) => {
        pub static RULES: &[Rule] = &[$(Rule { op: $op, kind: $kind, formula: $doc },)*];
    };
}

use elementwise as ew;
use Kind::{Body, Broadcast, NoGradient, Vjp};
rules! {
    "Add" => Broadcast(ew::add), "dA = unb(g), dB = unb(g)";
    "Sub" => Broadcast(ew::sub), "dA = unb(g), dB = -unb(g)";
    "Mul" => Broadcast(ew::mul), "dA = unb(g B), dB = unb(g A)";
    "Div" => Broadcast(ew::div), "dA = unb(g / B), dB = -unb(g Y / B)";
    "Pow" => Broadcast(ew::pow), "dA = unb(g B A^(B-1)), dB = unb(g Y ln A) (0 where A <= 0)";
    "Sum" => Broadcast(ew::add), "dX_i = unb(g)";
    "Neg" => Vjp(ew::neg), "dX = -g";
    "Identity" => Vjp(ew::identity), "dX = g";
    "Relu" => Vjp(ew::relu), "dX = g where X > 0";
    "LeakyRelu" => Vjp(ew::leaky_relu), "dX = g where X > 0, alpha g elsewhere";
    "Sigmoid" => Vjp(ew::sigmoid), "dX = g Y (1 - Y)";
    "Tanh" => Vjp(ew::tanh), "dX = g (1 - Y^2)";
    "Erf" => Vjp(ew::erf), "dX = g 2/sqrt(pi) exp(-X^2)";
    "Exp" => Vjp(ew::exp), "dX = g Y";
    "Log" => Vjp(ew::log), "dX = g / X";
    "Sqrt" => Vjp(ew::sqrt), "dX = g / (2 Y)";
    "Abs" => Vjp(ew::abs), "dX = g sign(X)";
    "Clip" => Vjp(ew::clip), "dX = g where min <= X <= max";
    "Max" => Broadcast(ew::max), "dA = unb(g [A > B] + g/2 [A = B]), dB likewise";
    "Min" => Broadcast(ew::min), "dA = unb(g [A < B] + g/2 [A = B]), dB likewise";
    "Where" => Broadcast(ew::where_), "dX = unb(where(C, g, 0)), dY = unb(where(C, 0, g))";
    "Cast" => Vjp(ew::cast), "dX = cast(g, type of X) for floating X";
    "CastLike" => Vjp(ew::cast_like), "dX = cast(g, type of X) for floating X; the type input has none";
    "Gelu" => Vjp(ew::gelu), "dX = g (Φ(X) + X φ(X)); tanh: its derivative";
    "HardSigmoid" => Vjp(ew::hard_sigmoid), "dX = g alpha where 0 < alpha X + beta < 1";
    "HardSwish" => Vjp(ew::hard_swish), "dX = g (2X + 3)/6 on (-3, 3), g above";
    "Elu" => Vjp(ew::elu), "dX = g where X > 0, g (Y + alpha) elsewhere";
    "Selu" => Vjp(ew::selu), "dX = g gamma where X > 0, g (Y + gamma alpha) elsewhere";
    "Celu" => Vjp(ew::celu), "dX = g where X > 0, g exp(X / alpha) elsewhere";
    "Softplus" => Vjp(ew::softplus), "dX = g sigmoid(X)";
    "Softsign" => Vjp(ew::softsign), "dX = g / (1 + |X|)^2";
    "Mish" => Vjp(ew::mish), "dX = g (t + X sigmoid(X) (1 - t^2)), t = tanh(softplus(X))";
    "ThresholdedRelu" => Vjp(ew::thresholded_relu), "dX = g where X > alpha";
    "Shrink" => Vjp(ew::shrink), "dX = g where |X| > lambd";
    "PRelu" => Broadcast(ew::prelu), "dX = g where X > 0, g slope elsewhere; dslope = unb(g X where X <= 0)";
    "Reciprocal" => Vjp(ew::reciprocal), "dX = -g Y^2";
    "Sin" => Vjp(ew::sin), "dX = g cos X";
    "Cos" => Vjp(ew::cos), "dX = -g sin X";
    "Tan" => Vjp(ew::tan), "dX = g (1 + Y^2)";
    "Sinh" => Vjp(ew::sinh), "dX = g cosh X";
    "Cosh" => Vjp(ew::cosh), "dX = g sinh X";
    "Asin" => Vjp(ew::asin), "dX = g / sqrt(1 - X^2)";
    "Acos" => Vjp(ew::acos), "dX = -g / sqrt(1 - X^2)";
    "Atan" => Vjp(ew::atan), "dX = g / (1 + X^2)";
    "Asinh" => Vjp(ew::asinh), "dX = g / sqrt(1 + X^2)";
    "Acosh" => Vjp(ew::acosh), "dX = g / sqrt(X^2 - 1)";
    "Atanh" => Vjp(ew::atanh), "dX = g / (1 - X^2)";
    "Mean" => Broadcast(ew::mean), "dX_i = unb(g) / n";
    "Dropout" => Vjp(ew::dropout), "dX = g mask / (1 - ratio) in training mode, g otherwise";
    "MatMul" => Vjp(linalg::matmul), "dA = unb(g B^T), dB = unb(A^T g)";
    "Gemm" => Vjp(linalg::gemm), "dA = alpha g B'^T (transposed back), dB = alpha A'^T g, dC = beta unb(g)";
    "RNN" => Vjp(recurrent::rnn), "a backward Scan over time whose body is the ONNX cell, differentiated";
    "GRU" => Vjp(recurrent::gru), "a backward Scan over time whose body is the ONNX cell, differentiated";
    "LSTM" => Vjp(recurrent::lstm), "a backward Scan over time whose body is the ONNX cell, differentiated";
    "Einsum" => Vjp(linalg::einsum), "dA_i = einsum(g, other operands -> A_i), expanded over letters only A_i has";
    "CumSum" => Vjp(resample::cumsum), "dX = cumsum(g) in the other direction";
    "Pad" => Vjp(resample::pad), "constant: dX = Pad(g, -pads); reflect/edge/wrap: per axis, the transposed map measured on an identity";
    "Resize" => Vjp(resample::resize), "per resized axis, the transposed map measured by resizing an identity";
    "Softmax" => Vjp(nn::softmax), "dX = Y (g - sum(g Y))";
    "LogSoftmax" => Vjp(nn::log_softmax), "dX = g - exp(Y) sum(g)";
    "Conv" => Vjp(nn::conv), "dX = ConvTranspose(g, W), dW = Conv(X^T, g^T) cropped, dB = sum(g)";
    "ConvTranspose" => Vjp(nn::conv_transpose), "dX = Conv(g, W), dW = Conv's weight gradient with input and output exchanged, dB = sum(g)";
    "MaxPool" => Vjp(nn::max_pool), "dX = scatter_add(g at the argmax indices)";
    "AveragePool" => Vjp(nn::average_pool), "dX = ConvTranspose(g / count, ones)";
    "GlobalAveragePool" => Vjp(nn::global_average_pool), "dX = expand(g / (H W))";
    "BatchNormalization" => Vjp(nn::batch_norm), "inference: dX = g scale r; training: dX = scale r/M (M g - sum g - x̂ sum(g x̂))";
    "InstanceNormalization" => Vjp(nn::instance_norm), "dX = r (ĝ - mean ĝ - x̂ mean(ĝ x̂)), ĝ = g scale, over the spatial dims; dscale = Σ g x̂, dB = Σ g";
    "GroupNormalization" => Body(composite::group_norm), "X as [N, G, rest] standardized, scale and bias per group (18) or channel (21)";
    "LpNormalization" => Body(composite::lp_norm), "X / ReduceL1 or ReduceL2 of X along the axis";
    "MeanVarianceNormalization" => Body(composite::mean_variance_norm), "the spec's function body: (X - E X) / (sqrt(E X^2 - (E X)^2) + 1e-9)";
    "RMSNormalization" => Body(composite::rms_norm), "X / sqrt(mean(X^2) + eps) scale";
    "Attention" => Body(composite::attention), "the spec's function body: softmax(Q K^T scale + mask + causal) V, grouped KV heads repeated";
    "RotaryEmbedding" => Body(composite::rotary_embedding), "the spec's rotation of pairs by the cos and sin caches";
    "LRN" => Body(composite::lrn), "X / (bias + alpha/size window-sum X^2)^beta, the window by Pad and Slices";
    "LayerNormalization" => Vjp(nn::layer_norm), "dX = r (ĝ - mean ĝ - x̂ mean(ĝ x̂)), ĝ = g scale";
    "Flatten" => Vjp(shape::reshape), "dX = reshape(g, shape(X))";
    "Reshape" => Vjp(shape::reshape), "dX = reshape(g, shape(X))";
    "Squeeze" => Vjp(shape::reshape), "dX = reshape(g, shape(X))";
    "Unsqueeze" => Vjp(shape::reshape), "dX = reshape(g, shape(X))";
    "Transpose" => Vjp(shape::transpose), "dX = transpose(g, inverse perm)";
    "Concat" => Vjp(shape::concat), "dX_i = slice of g";
    "Split" => Vjp(shape::split), "dX = concat(g_i, zeros for missing g_i)";
    "Slice" => Vjp(shape::slice), "dX = pad(g) (step 1)";
    "Gather" => Vjp(shape::gather), "dX = scatter_nd_add(zeros, indices, g)";
    "GatherND" => Vjp(shape::gather_nd), "dX = scatter_nd_add(zeros, indices, g); batch_dims: over the batch flattened, its position leading each tuple";
    "GatherElements" => Vjp(shape::gather_elements), "dX = scatter_elements_add(zeros, indices, g)";
    "Expand" => Broadcast(shape::expand), "dX = unb(g)";
    "ReduceSum" => Vjp(shape::reduce_sum), "dX = expand(g)";
    "ReduceMean" => Vjp(shape::reduce_mean), "dX = expand(g) / n";
    "ReduceSumSquare" => Vjp(shape::reduce_sum_square), "dX = expand(g) 2X";
    "ReduceL1" => Vjp(shape::reduce_l1), "dX = expand(g) sign(X)";
    "ReduceL2" => Vjp(shape::reduce_l2), "dX = expand(g) X / Y";
    "ReduceLogSum" => Vjp(shape::reduce_log_sum), "dX = expand(g) / exp(Y)";
    "ReduceLogSumExp" => Vjp(shape::reduce_log_sum_exp), "dX = expand(g) exp(X - Y)";
    "ReduceMax" => Vjp(shape::reduce_extremum), "dX = expand(g) [X = Y] / count(X = Y)";
    "ReduceMin" => Vjp(shape::reduce_extremum), "dX = expand(g) [X = Y] / count(X = Y)";
    "ReduceProd" => Vjp(shape::reduce_prod), "dX = expand(g) times the product of the others (zeros included)";
    "GlobalMaxPool" => Vjp(shape::global_max_pool), "dX = expand(g) [X = Y] / count(X = Y)";
    "Tile" => Vjp(shape::tile), "dX = sum over the repeats of g";
    "Trilu" => Vjp(shape::trilu), "dX = trilu(g)";
    "DepthToSpace" => Vjp(shape::depth_to_space), "dX = SpaceToDepth(g) (DCR); CRD: its channels back from block-major to channel-major";
    "SpaceToDepth" => Vjp(shape::space_to_depth), "dX = DepthToSpace(g, DCR)";
    "ReverseSequence" => Vjp(shape::reverse_sequence), "dX = ReverseSequence(g) (its own inverse)";
    "Compress" => Body(shape::compress), "Gather(X or flat X, NonZero(condition)) along the axis";
    "ScatterND" => Vjp(shape::scatter_nd), "none/add: ddata = g (written positions zeroed for none), dupdates = gather_nd(g); max/min: g to the values equal to the output, ties sharing; mul: g times the product of the others";
    "ScatterElements" => Vjp(shape::scatter_elements), "as ScatterND, with gather_elements";
    "TopK" => Vjp(shape::top_k), "dX = scatter_elements(zeros, indices, g)";
    "SoftmaxCrossEntropyLoss" => Vjp(loss::softmax_cross_entropy), "dS = (softmax(S) - onehot(y)) g / N";
    "Shape" => NoGradient, "no gradient";
    "Size" => NoGradient, "no gradient";
    "Constant" => NoGradient, "no gradient";
    "ConstantOfShape" => NoGradient, "no gradient";
    "EyeLike" => NoGradient, "no gradient";
    "Equal" => NoGradient, "no gradient";
    "Greater" => NoGradient, "no gradient";
    "Less" => NoGradient, "no gradient";
    "GreaterOrEqual" => NoGradient, "no gradient";
    "LessOrEqual" => NoGradient, "no gradient";
    "Not" => NoGradient, "no gradient";
    "And" => NoGradient, "no gradient";
    "Or" => NoGradient, "no gradient";
    "Range" => NoGradient, "no gradient";
    "ArgMax" => NoGradient, "no gradient";
    "ArgMin" => NoGradient, "no gradient";
    "Sign" => NoGradient, "no gradient (zero almost everywhere)";
    "Floor" => NoGradient, "no gradient (zero almost everywhere)";
    "Ceil" => NoGradient, "no gradient (zero almost everywhere)";
    "Round" => NoGradient, "no gradient (zero almost everywhere)";
    "Mod" => NoGradient, "no gradient (a discrete op: index arithmetic)";
    "Hardmax" => NoGradient, "no gradient (zero almost everywhere)";
    "IsNaN" => NoGradient, "no gradient";
    "IsInf" => NoGradient, "no gradient";
    "Xor" => NoGradient, "no gradient";
    "NonZero" => NoGradient, "no gradient";
    "OneHot" => NoGradient, "no gradient";
    "BitShift" => NoGradient, "no gradient";
}

/// The rule for an operator of the default domain.
pub fn lookup(domain: &str, op: &str) -> Option<&'static Rule> {
    if !(domain.is_empty() || domain == "ai.onnx") {
        return None;
    }
    RULES.iter().find(|r| r.op == op)
}

/// Ops whose outputs never carry a gradient, so tests need no case for them.
pub fn is_non_differentiable(op: &str) -> bool {
    RULES.iter().any(|r| r.op == op && matches!(r.kind, Kind::NoGradient))
}

/// The finite-difference cases of every rule, each module's beside its rules.
pub fn cases() -> Vec<crate::cases::Case> {
    [
        composite::cases(),
        elementwise::cases(),
        linalg::cases(),
        loss::cases(),
        nn::cases(),
        recurrent::cases(),
        resample::cases(),
        shape::cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}
