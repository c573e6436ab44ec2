//! One finite-difference test per gradient rule: a one-op model, the loss sum(y^2 (0.5 + 0.2 y)), and
//! central differences of the loss against the rule's gradient for every float input, on tract
//! and ONNX Runtime. `every_rule_has_a_case` fails when the registry gains a rule without one.

use crate::common::*;
use dagr_inject::autodiff::{self as grad, rules};
use dagr_inject::onnx::builder::{attr_float, attr_int, attr_ints, attr_string, Builder};
use dagr_inject::onnx::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
use dagr_inject::onnx::{self, dtype, tensor, Dim, GraphIndex, Model, ValueFact};
use dagr_inject::runtime::{Backend, Runner, Tensors, Value};
use ndarray::ArrayD;
use std::collections::HashSet;

#[derive(Clone)]
enum In {
    /// A differentiable float input of this shape.
    X(Vec<usize>),
    /// Constant int64 input (axes, shapes, indices).
    Ints(Vec<i64>, Vec<i64>),
    /// Constant float input.
    F(Vec<i64>, Vec<f32>),
    /// Constant bool input.
    B(Vec<i64>, Vec<bool>),
    /// Constant int32 input (RNN sequence lengths).
    I32(Vec<i64>, Vec<i32>),
    /// An optional input left out (its name empty).
    Absent,
}

#[derive(Clone, Copy, PartialEq)]
enum Gen {
    /// Values in ±[0.2, 2]: away from 0 (kinks of Relu, Abs; poles of Div, Log).
    AwayFromZero,
    /// Positive values in [0.5, 2].
    Positive,
    /// Distinct values on a grid 0.05 apart (no ties: Max/Min, MaxPool).
    Distinct,
    /// Values in ±[0.1, 0.8] (Asin, Acos, Atanh).
    Unit,
    /// Values in [1.2, 3] (Acosh).
    AboveOne,
}

struct Case {
    name: &'static str,
    op: &'static str,
    attrs: Vec<AttributeProto>,
    inputs: Vec<In>,
    outputs: usize,
    /// How many of the outputs the loss sums over (the first ones).
    loss_outputs: usize,
    gen: Gen,
    backends: &'static [Backend],
    opset: i64,
    /// The dims of the first input declared symbolic by `every_rule_handles_symbolic_dims`
    /// (default: all but those of size 1 and an image's or signal's channels).
    symbolic: Option<Vec<usize>>,
    /// Why onnx.checker refuses the one-op model whatever its gradient (None: it is checked).
    checker_refuses: Option<&'static str>,
}

const BOTH: &[Backend] = &[Backend::Tract, Backend::Ort];
/// Ops tract cannot run forward (BatchNormalization with non-constant parameters or in training
/// mode, SoftmaxCrossEntropyLoss); training graphs use portable forms of them instead.
const ORT_ONLY: &[Backend] = &[Backend::Ort];
/// Ops ONNX Runtime cannot run forward (batch-major recurrent layouts).
const TRACT_ONLY: &[Backend] = &[Backend::Tract];

fn case(name: &'static str, op: &'static str, inputs: Vec<In>) -> Case {
    Case {
        name,
        op,
        attrs: vec![],
        inputs,
        outputs: 1,
        loss_outputs: 1,
        gen: Gen::AwayFromZero,
        backends: BOTH,
        opset: 17,
        symbolic: None,
        checker_refuses: None,
    }
}

impl Case {
    fn attrs(mut self, a: Vec<AttributeProto>) -> Self {
        self.attrs = a;
        self
    }
    fn gen(mut self, g: Gen) -> Self {
        self.gen = g;
        self
    }
    fn outputs(mut self, n: usize) -> Self {
        self.outputs = n;
        self
    }
    /// `n` outputs, all in the loss.
    fn all_outputs(mut self, n: usize) -> Self {
        self.outputs = n;
        self.loss_outputs = n;
        self
    }
    fn checker_refuses(mut self, why: &'static str) -> Self {
        self.checker_refuses = Some(why);
        self
    }
    fn symbolic(mut self, dims: &[usize]) -> Self {
        self.symbolic = Some(dims.to_vec());
        self
    }
    fn only(mut self, b: &'static [Backend]) -> Self {
        self.backends = b;
        self
    }
}

fn x(s: &[usize]) -> In {
    In::X(s.to_vec())
}
fn ints(v: &[i64]) -> In {
    In::Ints(vec![v.len() as i64], v.to_vec())
}

fn cases() -> Vec<Case> {
    use Gen::*;
    vec![
        case("add_broadcast", "Add", vec![x(&[2, 3, 4]), x(&[3, 1])]),
        case("sub_broadcast", "Sub", vec![x(&[2, 3]), x(&[3])]),
        case("mul_broadcast", "Mul", vec![x(&[2, 1, 4]), x(&[3, 1])]),
        case("div", "Div", vec![x(&[2, 3]), x(&[2, 3])]),
        case("div_broadcast", "Div", vec![x(&[2, 3]), x(&[1])]),
        case("pow", "Pow", vec![x(&[2, 3]), x(&[3])]).gen(Positive),
        case("sum3", "Sum", vec![x(&[2, 3]), x(&[3]), x(&[2, 1])]),
        case("neg", "Neg", vec![x(&[3, 2])]),
        case("identity", "Identity", vec![x(&[3, 2])]),
        case("relu", "Relu", vec![x(&[3, 4])]),
        case("leaky_relu", "LeakyRelu", vec![x(&[3, 4])]).attrs(vec![attr_float("alpha", 0.2)]),
        case("sigmoid", "Sigmoid", vec![x(&[3, 4])]),
        case("tanh", "Tanh", vec![x(&[3, 4])]),
        case("erf", "Erf", vec![x(&[3, 4])]),
        case("gelu", "Gelu", vec![x(&[3, 4])]).opset(20),
        case("gelu_tanh", "Gelu", vec![x(&[3, 4])])
            .attrs(vec![attr_string("approximate", "tanh")])
            .opset(20),
        case("hard_sigmoid", "HardSigmoid", vec![x(&[3, 4])])
            .attrs(vec![attr_float("alpha", 0.3), attr_float("beta", 0.4)]),
        case(
            "hard_swish",
            "HardSwish",
            vec![In::F(vec![6], vec![-4.0, -2.0, -0.5, 0.7, 2.5, 3.5])],
        ),
        case(
            "instance_norm",
            "InstanceNormalization",
            vec![x(&[2, 3, 5]), x(&[3]), x(&[3])],
        )
        .attrs(vec![attr_float("epsilon", 1e-3)]),
        // A repeated index: its gradients add up.
        case(
            "gather_nd",
            "GatherND",
            vec![x(&[3, 4, 2]), In::Ints(vec![3, 2], vec![0, 1, 2, 3, 0, 1])],
        ),
        // Negative indices count from the end (tract 0.23 panics on them in the forward pass).
        case(
            "gather_nd_negative",
            "GatherND",
            vec![x(&[3, 4, 2]), In::Ints(vec![2, 2], vec![-1, 1, 2, -4])],
        )
        .only(ORT_ONLY),
        case("cast_like", "CastLike", vec![x(&[3, 4]), In::F(vec![], vec![0.0])]),
        case("exp", "Exp", vec![x(&[3, 4])]),
        case("log", "Log", vec![x(&[3, 4])]).gen(Positive),
        case("sqrt", "Sqrt", vec![x(&[3, 4])]).gen(Positive),
        case("abs", "Abs", vec![x(&[3, 4])]),
        case(
            "clip",
            "Clip",
            vec![x(&[3, 4]), In::F(vec![], vec![-1.05]), In::F(vec![], vec![0.95])],
        ),
        case("clip_min_only", "Clip", vec![x(&[3, 4]), In::F(vec![], vec![0.0])]),
        case("max", "Max", vec![x(&[2, 3]), x(&[3])]).gen(Distinct),
        case("min", "Min", vec![x(&[2, 3]), x(&[2, 3])]).gen(Distinct),
        case(
            "where",
            "Where",
            vec![
                In::B(vec![2, 3], vec![true, false, true, false, false, true]),
                x(&[2, 3]),
                x(&[3]),
            ],
        ),
        case("cast_double", "Cast", vec![x(&[2, 3])]).attrs(vec![attr_int("to", dtype::DOUBLE as i64)]),
        case(
            "dropout_inference",
            "Dropout",
            vec![x(&[2, 3]), In::F(vec![], vec![0.3])],
        ),
        case("matmul_weight", "MatMul", vec![x(&[2, 3, 4]), x(&[4, 5])]),
        case("matmul_batched", "MatMul", vec![x(&[3, 4]), x(&[2, 4, 5])]),
        case("matmul_vec_left", "MatMul", vec![x(&[4]), x(&[4, 5])]),
        case("matmul_vec_right", "MatMul", vec![x(&[2, 3, 4]), x(&[4])]),
        case("matmul_bcast_batch", "MatMul", vec![x(&[2, 1, 3, 4]), x(&[5, 4, 2])]),
        case("gemm", "Gemm", vec![x(&[3, 4]), x(&[4, 5]), x(&[5])])
            .attrs(vec![attr_float("alpha", 0.7), attr_float("beta", 1.3)]),
        case("gemm_ta", "Gemm", vec![x(&[4, 3]), x(&[4, 5]), x(&[1, 5])]).attrs(vec![attr_int("transA", 1)]),
        case("gemm_tb", "Gemm", vec![x(&[3, 4]), x(&[5, 4]), x(&[3, 5])]).attrs(vec![attr_int("transB", 1)]),
        case("gemm_tab_noc", "Gemm", vec![x(&[4, 3]), x(&[5, 4])]).attrs(vec![
            attr_int("transA", 1),
            attr_int("transB", 1),
            attr_float("alpha", 1.5),
        ]),
        case("softmax", "Softmax", vec![x(&[2, 3, 4])]).attrs(vec![attr_int("axis", 1)]),
        case("log_softmax", "LogSoftmax", vec![x(&[2, 3, 4])]),
        case(
            "conv1d_stride_asym_pads",
            "Conv",
            vec![x(&[2, 3, 9]), x(&[4, 3, 3]), x(&[4])],
        )
        .attrs(vec![attr_ints("strides", &[2]), attr_ints("pads", &[1, 0])]),
        case(
            "conv2d_groups_dilation",
            "Conv",
            vec![x(&[2, 4, 7, 6]), x(&[6, 2, 3, 3])],
        )
        .attrs(vec![
            attr_int("group", 2),
            attr_ints("strides", &[2, 1]),
            attr_ints("dilations", &[1, 2]),
            attr_ints("pads", &[1, 0, 0, 2]),
        ]),
        case(
            "conv2d_same_upper",
            "Conv",
            vec![x(&[1, 2, 6, 5]), x(&[3, 2, 3, 2]), x(&[3])],
        )
        .attrs(vec![
            attr_string("auto_pad", "SAME_UPPER"),
            attr_ints("strides", &[2, 2]),
        ]),
        // ONNX Runtime runs no dilation with SAME padding.
        case("conv2d_same_lower", "Conv", vec![x(&[1, 2, 7, 6]), x(&[2, 2, 3, 2])]).attrs(vec![
            attr_string("auto_pad", "SAME_LOWER"),
            attr_ints("strides", &[3, 2]),
        ]),
        case(
            "conv3d",
            "Conv",
            vec![x(&[1, 2, 4, 4, 3]), x(&[3, 2, 2, 2, 2]), x(&[3])],
        ),
        case(
            "conv_transpose_stride_output_padding",
            "ConvTranspose",
            vec![x(&[2, 3, 5]), x(&[3, 4, 3]), x(&[4])],
        )
        .attrs(vec![
            attr_ints("strides", &[2]),
            attr_ints("pads", &[1, 0]),
            attr_ints("output_padding", &[1]),
        ]),
        case(
            "conv_transpose2d_groups_dilation",
            "ConvTranspose",
            vec![x(&[1, 4, 3, 4]), x(&[4, 3, 2, 3])],
        )
        .attrs(vec![
            attr_int("group", 2),
            attr_ints("strides", &[1, 2]),
            attr_ints("dilations", &[2, 1]),
            attr_ints("pads", &[0, 1, 1, 0]),
        ]),
        case("maxpool", "MaxPool", vec![x(&[2, 2, 6, 6])])
            .attrs(vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])])
            .gen(Distinct),
        case("maxpool_overlap_pad", "MaxPool", vec![x(&[1, 2, 5, 5])])
            .attrs(vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ])
            .gen(Distinct),
        case("avgpool", "AveragePool", vec![x(&[2, 2, 6, 6])])
            .attrs(vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])]),
        case("avgpool_pads_exclusive", "AveragePool", vec![x(&[1, 2, 5, 5])]).attrs(vec![
            attr_ints("kernel_shape", &[3, 3]),
            attr_ints("strides", &[2, 2]),
            attr_ints("pads", &[1, 1, 1, 1]),
        ]),
        case("global_avgpool", "GlobalAveragePool", vec![x(&[2, 3, 4, 5])]),
        case(
            "batchnorm_inference",
            "BatchNormalization",
            vec![
                x(&[2, 3, 4]),
                x(&[3]),
                x(&[3]),
                In::F(vec![3], vec![0.1, -0.2, 0.3]),
                In::F(vec![3], vec![0.5, 1.0, 1.5]),
            ],
        )
        .only(ORT_ONLY),
        case(
            "batchnorm_training",
            "BatchNormalization",
            vec![
                x(&[4, 3, 5]),
                x(&[3]),
                x(&[3]),
                In::F(vec![3], vec![0.1, -0.2, 0.3]),
                In::F(vec![3], vec![0.5, 1.0, 1.5]),
            ],
        )
        .attrs(vec![attr_int("training_mode", 1)])
        .outputs(3)
        .only(ORT_ONLY),
        case(
            "layernorm_last",
            "LayerNormalization",
            vec![x(&[2, 3, 4]), x(&[4]), x(&[4])],
        ),
        case(
            "layernorm_axis1",
            "LayerNormalization",
            vec![x(&[2, 3, 4]), x(&[3, 4]), x(&[3, 4])],
        )
        .attrs(vec![attr_int("axis", 1)]),
        case("flatten", "Flatten", vec![x(&[2, 3, 4])]).attrs(vec![attr_int("axis", 2)]),
        case("reshape", "Reshape", vec![x(&[2, 3, 4]), ints(&[6, -1])]),
        case("squeeze", "Squeeze", vec![x(&[2, 1, 3]), ints(&[1])]),
        case("unsqueeze", "Unsqueeze", vec![x(&[2, 3]), ints(&[0, 3])]),
        case("transpose", "Transpose", vec![x(&[2, 3, 4])]).attrs(vec![attr_ints("perm", &[2, 0, 1])]),
        case("concat", "Concat", vec![x(&[2, 3]), x(&[2, 5])]).attrs(vec![attr_int("axis", 1)]),
        case("split_one_output_used", "Split", vec![x(&[2, 6]), ints(&[2, 4])])
            .attrs(vec![attr_int("axis", 1)])
            .outputs(2),
        case(
            "slice",
            "Slice",
            vec![x(&[4, 6]), ints(&[1, -4]), ints(&[3, 100]), ints(&[0, 1])],
        ),
        case(
            "gather_rows_negative",
            "Gather",
            vec![x(&[5, 3]), In::Ints(vec![2, 2], vec![0, 2, 4, -1])],
        ),
        case("gather_axis1_repeated", "Gather", vec![x(&[2, 5, 3]), ints(&[1, 3, 1])]).attrs(vec![attr_int("axis", 1)]),
        case(
            "gather_elements",
            "GatherElements",
            vec![x(&[3, 4]), In::Ints(vec![3, 2], vec![0, 3, 1, 1, 2, 0])],
        )
        .attrs(vec![attr_int("axis", 1)]),
        case("expand", "Expand", vec![x(&[3, 1]), ints(&[2, 3, 4])]),
        case("reduce_sum", "ReduceSum", vec![x(&[2, 3, 4]), ints(&[1])]).attrs(vec![attr_int("keepdims", 0)]),
        case("reduce_mean", "ReduceMean", vec![x(&[2, 3, 4])]).attrs(vec![attr_ints("axes", &[0, 2])]),
        case("reduce_mean_all_18", "ReduceMean", vec![x(&[2, 3, 4])])
            .attrs(vec![attr_int("keepdims", 0)])
            .opset(18),
        // Recurrent cells (inputs X, W, R, B, sequence_lens, initial_h[, initial_c, P]), the
        // loss over every output; the batch symbolic, and in some the sequence length too.
        case(
            "rnn_initial_state",
            "RNN",
            vec![
                x(&[4, 2, 3]),
                x(&[1, 5, 3]),
                x(&[1, 5, 5]),
                x(&[1, 10]),
                In::Absent,
                x(&[1, 2, 5]),
            ],
        )
        .attrs(vec![attr_int("hidden_size", 5)])
        .all_outputs(2)
        .symbolic(&[0, 1]),
        case(
            "gru_bidirectional_linear_before_reset",
            "GRU",
            vec![
                x(&[3, 2, 4]),
                x(&[2, 9, 4]),
                x(&[2, 9, 3]),
                x(&[2, 18]),
                In::Absent,
                x(&[2, 2, 3]),
            ],
        )
        .attrs(vec![
            attr_int("hidden_size", 3),
            attr_string("direction", "bidirectional"),
            attr_int("linear_before_reset", 1),
        ])
        .all_outputs(2)
        .symbolic(&[1]),
        // tract runs no sequence_lens that differ, ONNX Runtime no layout 1.
        case(
            "gru_reverse_sequence_lens",
            "GRU",
            vec![
                x(&[3, 2, 4]),
                x(&[1, 9, 4]),
                x(&[1, 9, 3]),
                x(&[1, 18]),
                In::I32(vec![2], vec![3, 2]),
            ],
        )
        .attrs(vec![attr_int("hidden_size", 3), attr_string("direction", "reverse")])
        .all_outputs(2)
        .symbolic(&[0, 1])
        .only(ORT_ONLY),
        case(
            "gru_layout1",
            "GRU",
            vec![
                x(&[2, 3, 4]),
                x(&[1, 9, 4]),
                x(&[1, 9, 3]),
                x(&[1, 18]),
                In::Absent,
                x(&[2, 1, 3]),
            ],
        )
        .attrs(vec![attr_int("hidden_size", 3), attr_int("layout", 1)])
        .all_outputs(2)
        .only(TRACT_ONLY),
        case(
            "lstm_bidirectional_peepholes",
            "LSTM",
            vec![
                x(&[3, 2, 4]),
                x(&[2, 12, 4]),
                x(&[2, 12, 3]),
                x(&[2, 24]),
                In::Absent,
                x(&[2, 2, 3]),
                x(&[2, 2, 3]),
                x(&[2, 9]),
            ],
        )
        .attrs(vec![
            attr_int("hidden_size", 3),
            attr_string("direction", "bidirectional"),
        ])
        .all_outputs(3)
        .symbolic(&[1]),
        case(
            "lstm_sequence_lens_no_bias",
            "LSTM",
            vec![
                x(&[3, 2, 4]),
                x(&[1, 12, 4]),
                x(&[1, 12, 3]),
                In::Absent,
                In::I32(vec![2], vec![1, 3]),
            ],
        )
        .attrs(vec![attr_int("hidden_size", 3), attr_int("input_forget", 1)])
        .all_outputs(3)
        .symbolic(&[1])
        .only(ORT_ONLY),
        // Activations with parameters, and clipped gates (tract 0.23's GRU runs its default
        // activations whatever the node says: the forward differs from ONNX Runtime's). Small
        // values keep the central differences off the kinks of the clip and of LeakyRelu.
        case(
            "gru_activations_clip",
            "GRU",
            vec![x(&[3, 2, 4]), x(&[1, 9, 4]), x(&[1, 9, 3]), x(&[1, 18])],
        )
        .attrs(vec![
            attr_int("hidden_size", 3),
            attr_float("clip", 1.2),
            AttributeProto {
                name: "activations".into(),
                type_: dagr_inject::onnx::proto::attribute_proto::AttributeType::STRINGS.into(),
                strings: vec![b"HardSigmoid".to_vec(), b"LeakyRelu".to_vec()],
                ..Default::default()
            },
            AttributeProto {
                name: "activation_alpha".into(),
                type_: dagr_inject::onnx::proto::attribute_proto::AttributeType::FLOATS.into(),
                floats: vec![0.3, 0.1],
                ..Default::default()
            },
        ])
        .all_outputs(2)
        .gen(Unit)
        .symbolic(&[1])
        .only(ORT_ONLY),
        case("elu", "Elu", vec![x(&[3, 4])]).attrs(vec![attr_float("alpha", 0.7)]),
        case("selu", "Selu", vec![x(&[3, 4])]),
        // tract 0.23's Celu disagrees with ONNX Runtime's forward for alpha != 1.
        case("celu", "Celu", vec![x(&[3, 4])])
            .attrs(vec![attr_float("alpha", 1.5)])
            .only(ORT_ONLY),
        case("celu_alpha_1", "Celu", vec![x(&[3, 4])]),
        case("softplus", "Softplus", vec![x(&[3, 4])]),
        case("softsign", "Softsign", vec![x(&[3, 4])]),
        case("mish", "Mish", vec![x(&[3, 4])]).opset(18),
        case("thresholded_relu", "ThresholdedRelu", vec![x(&[3, 4])]).attrs(vec![attr_float("alpha", 0.5)]),
        // Values 0.01 or more away from the jumps at ±lambd.
        case("shrink", "Shrink", vec![x(&[3, 4])])
            .attrs(vec![attr_float("lambd", 0.12), attr_float("bias", 0.3)])
            .gen(Distinct),
        case("prelu_channel_slope", "PRelu", vec![x(&[2, 3, 4]), x(&[3, 1])]),
        case("reciprocal", "Reciprocal", vec![x(&[3, 4])]),
        case("sin", "Sin", vec![x(&[3, 4])]),
        case("cos", "Cos", vec![x(&[3, 4])]),
        case("tan", "Tan", vec![x(&[3, 4])]).gen(Unit),
        case("sinh", "Sinh", vec![x(&[3, 4])]),
        case("cosh", "Cosh", vec![x(&[3, 4])]),
        case("asin", "Asin", vec![x(&[3, 4])]).gen(Unit),
        case("acos", "Acos", vec![x(&[3, 4])]).gen(Unit),
        case("atan", "Atan", vec![x(&[3, 4])]),
        case("asinh", "Asinh", vec![x(&[3, 4])]),
        case("acosh", "Acosh", vec![x(&[3, 4])]).gen(AboveOne),
        case("atanh", "Atanh", vec![x(&[3, 4])]).gen(Unit),
        case("mean3", "Mean", vec![x(&[2, 3]), x(&[3]), x(&[2, 1])]),
        case("reduce_sum_square", "ReduceSumSquare", vec![x(&[2, 3, 4])]).attrs(vec![attr_ints("axes", &[1])]),
        case("reduce_l1", "ReduceL1", vec![x(&[2, 3, 4])])
            .attrs(vec![attr_ints("axes", &[2]), attr_int("keepdims", 0)]),
        case("reduce_l2_18", "ReduceL2", vec![x(&[2, 3, 4]), ints(&[0, 2])]).opset(18),
        case("reduce_log_sum", "ReduceLogSum", vec![x(&[2, 3, 4])])
            .attrs(vec![attr_ints("axes", &[1])])
            .gen(Positive),
        case("reduce_log_sum_exp", "ReduceLogSumExp", vec![x(&[2, 3, 4])]).attrs(vec![attr_int("keepdims", 0)]),
        case("reduce_max", "ReduceMax", vec![x(&[2, 3, 4])])
            .attrs(vec![attr_ints("axes", &[1])])
            .gen(Distinct),
        case("reduce_min_all", "ReduceMin", vec![x(&[2, 3, 4])])
            .attrs(vec![attr_int("keepdims", 0)])
            .gen(Distinct),
        case("reduce_prod", "ReduceProd", vec![x(&[2, 3, 4])]).attrs(vec![attr_ints("axes", &[2])]),
        case("global_max_pool", "GlobalMaxPool", vec![x(&[2, 3, 4, 5])]).gen(Distinct),
        case("tile", "Tile", vec![x(&[2, 3]), ints(&[2, 3])]),
        case("trilu_lower_k", "Trilu", vec![x(&[2, 3, 4]), In::Ints(vec![], vec![1])])
            .attrs(vec![attr_int("upper", 0)]),
        case(
            "scatter_nd",
            "ScatterND",
            vec![x(&[4, 3]), In::Ints(vec![2, 1], vec![2, 0]), x(&[2, 3])],
        ),
        case(
            "scatter_nd_add",
            "ScatterND",
            vec![x(&[4, 3]), In::Ints(vec![2, 1], vec![2, 2]), x(&[2, 3])],
        )
        .attrs(vec![attr_string("reduction", "add")])
        .only(ORT_ONLY),
        case(
            "scatter_elements",
            "ScatterElements",
            vec![x(&[3, 4]), In::Ints(vec![3, 2], vec![0, 3, 1, 2, 2, 0]), x(&[3, 2])],
        )
        .attrs(vec![attr_int("axis", 1)]),
        case("top_k", "TopK", vec![x(&[3, 5]), ints(&[2])])
            .outputs(2)
            .gen(Distinct),
        case(
            "group_norm_18",
            "GroupNormalization",
            vec![x(&[2, 4, 3]), x(&[2]), x(&[2])],
        )
        .attrs(vec![attr_int("num_groups", 2), attr_float("epsilon", 1e-3)])
        .opset(18)
        .checker_refuses("GroupNormalization-18 is deprecated (models still carry it)"),
        case(
            "group_norm_21",
            "GroupNormalization",
            vec![x(&[2, 4, 3, 2]), x(&[4]), x(&[4])],
        )
        .attrs(vec![attr_int("num_groups", 2)])
        .opset(21),
        case("lp_norm_2", "LpNormalization", vec![x(&[3, 4])]),
        case("lp_norm_1_axis0", "LpNormalization", vec![x(&[3, 4])]).attrs(vec![attr_int("p", 1), attr_int("axis", 0)]),
        case(
            "mean_variance_norm",
            "MeanVarianceNormalization",
            vec![x(&[2, 3, 4, 2])],
        )
        .checker_refuses("onnx 1.23's own function body of the op fails its shape inference"),
        case("rms_norm", "RMSNormalization", vec![x(&[2, 3, 4]), x(&[4])]).opset(23),
        case("lrn", "LRN", vec![x(&[2, 5, 3, 3])]).attrs(vec![
            attr_int("size", 3),
            attr_float("alpha", 0.3),
            attr_float("beta", 0.75),
            attr_float("bias", 1.5),
        ]),
        // Opset-23 attention (tract 0.23 runs neither op).
        case(
            "attention_4d",
            "Attention",
            vec![x(&[2, 2, 3, 4]), x(&[2, 2, 5, 4]), x(&[2, 2, 5, 3])],
        )
        .opset(23)
        .symbolic(&[0, 2])
        .only(ORT_ONLY),
        case(
            "attention_3d_grouped_causal_softcap",
            "Attention",
            vec![x(&[2, 3, 8]), x(&[2, 3, 4]), x(&[2, 3, 6])],
        )
        .attrs(vec![
            attr_int("q_num_heads", 4),
            attr_int("kv_num_heads", 2),
            attr_int("is_causal", 1),
            attr_float("scale", 0.4),
            attr_float("softcap", 2.0),
        ])
        .opset(23)
        .symbolic(&[0, 1])
        .only(ORT_ONLY),
        case(
            "attention_bool_mask_past",
            "Attention",
            vec![
                x(&[1, 2, 2, 4]),
                x(&[1, 2, 2, 4]),
                x(&[1, 2, 2, 4]),
                In::B(vec![2, 4], vec![true, false, true, true, true, true, false, true]),
                x(&[1, 2, 2, 4]),
                x(&[1, 2, 2, 4]),
            ],
        )
        .attrs(vec![attr_int("is_causal", 1)])
        .all_outputs(3)
        .opset(23)
        .symbolic(&[0])
        .only(ORT_ONLY),
        case(
            "rotary_4d",
            "RotaryEmbedding",
            vec![x(&[2, 2, 3, 4]), x(&[2, 3, 2]), x(&[2, 3, 2])],
        )
        .opset(23)
        .symbolic(&[0, 2])
        .only(ORT_ONLY),
        case(
            "rotary_3d_interleaved_partial_positions",
            "RotaryEmbedding",
            vec![
                x(&[2, 3, 8]),
                x(&[5, 1]),
                x(&[5, 1]),
                In::Ints(vec![2, 3], vec![0, 1, 2, 4, 3, 2]),
            ],
        )
        .attrs(vec![
            attr_int("num_heads", 2),
            attr_int("interleaved", 1),
            attr_int("rotary_embedding_dim", 2),
        ])
        .opset(23)
        .symbolic(&[0, 1])
        .only(ORT_ONLY),
        case("cumsum", "CumSum", vec![x(&[3, 4]), In::Ints(vec![], vec![1])]),
        case(
            "cumsum_exclusive_reverse",
            "CumSum",
            vec![x(&[3, 4]), In::Ints(vec![], vec![0])],
        )
        .attrs(vec![attr_int("exclusive", 1), attr_int("reverse", 1)]),
        case("pad_constant", "Pad", vec![x(&[2, 3]), ints(&[1, 0, 0, 2])]),
        // A negative pad crops (tract 0.23 overflows on one).
        case(
            "pad_constant_negative_value",
            "Pad",
            vec![x(&[3, 4]), ints(&[1, -1, -1, 2]), In::F(vec![], vec![0.5])],
        )
        .only(ORT_ONLY),
        case("pad_reflect", "Pad", vec![x(&[2, 4]), ints(&[0, 2, 0, 1])]).attrs(vec![attr_string("mode", "reflect")]),
        case("pad_edge", "Pad", vec![x(&[3, 2]), ints(&[2, 1, 1, 3])]).attrs(vec![attr_string("mode", "edge")]),
        case(
            "pad_wrap_axes",
            "Pad",
            vec![x(&[2, 3]), ints(&[2, 1]), In::Absent, ints(&[1])],
        )
        .attrs(vec![attr_string("mode", "wrap")])
        .opset(19)
        .only(ORT_ONLY),
        case(
            "resize_linear_scales",
            "Resize",
            vec![x(&[1, 2, 5]), In::Absent, In::F(vec![3], vec![1.0, 1.0, 2.0])],
        )
        .attrs(vec![attr_string("mode", "linear")]),
        case(
            "resize_nearest_sizes",
            "Resize",
            vec![x(&[2, 2, 4, 3]), In::Absent, In::Absent, ints(&[2, 2, 6, 7])],
        )
        .attrs(vec![
            attr_string("mode", "nearest"),
            attr_string("coordinate_transformation_mode", "asymmetric"),
            attr_string("nearest_mode", "round_prefer_ceil"),
        ]),
        case(
            "resize_cubic_align_corners",
            "Resize",
            vec![x(&[1, 1, 4, 5]), In::Absent, In::F(vec![4], vec![1.0, 1.0, 1.5, 2.0])],
        )
        .attrs(vec![
            attr_string("mode", "cubic"),
            attr_string("coordinate_transformation_mode", "align_corners"),
        ])
        .only(ORT_ONLY),
        case(
            "resize_linear_antialias_down",
            "Resize",
            vec![x(&[1, 1, 8, 6]), In::Absent, In::F(vec![4], vec![1.0, 1.0, 0.5, 0.75])],
        )
        .attrs(vec![attr_string("mode", "linear"), attr_int("antialias", 1)])
        .opset(18)
        .only(ORT_ONLY),
        case("einsum_conv_like", "Einsum", vec![x(&[2, 3, 4]), x(&[3, 5])])
            .attrs(vec![attr_string("equation", "bcl,cd->bdl")]),
        case(
            "einsum_batched_transposed",
            "Einsum",
            vec![x(&[2, 3, 4]), x(&[2, 5, 4])],
        )
        .attrs(vec![attr_string("equation", "bij,bkj->bik")]),
        case(
            "einsum_implicit_summed_letter",
            "Einsum",
            vec![x(&[3, 4]), x(&[4, 2, 5])],
        )
        .attrs(vec![attr_string("equation", "ij,jkl")]),
        case("einsum_ellipsis", "Einsum", vec![x(&[2, 3, 4]), x(&[2, 4, 5])])
            .attrs(vec![attr_string("equation", "...ij,...jk->...ik")]),
        // Ellipsis dims broadcasting from 1 (tract 0.23's Einsum does not broadcast).
        case(
            "einsum_ellipsis_broadcast",
            "Einsum",
            vec![x(&[2, 1, 3, 4]), x(&[1, 5, 4, 2])],
        )
        .attrs(vec![attr_string("equation", "...ij,...jk->...ik")])
        .symbolic(&[2])
        .only(ORT_ONLY),
        case(
            "softmax_cross_entropy",
            "SoftmaxCrossEntropyLoss",
            vec![x(&[4, 5]), In::Ints(vec![4], vec![1, 0, 4, 2])],
        )
        .only(ORT_ONLY),
    ]
}

trait Opset {
    fn opset(self, o: i64) -> Self;
}
impl Opset for Case {
    fn opset(mut self, o: i64) -> Self {
        self.opset = o;
        self
    }
}

fn values(n: usize, gen: Gen, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(12345);
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    match gen {
        Gen::AwayFromZero => (0..n)
            .map(|_| {
                let m = 0.2 + 1.8 * next();
                if next() < 0.5 {
                    -m
                } else {
                    m
                }
            })
            .collect(),
        Gen::Positive => (0..n).map(|_| 0.5 + 1.5 * next()).collect(),
        Gen::Unit => (0..n)
            .map(|_| {
                let m = 0.1 + 0.7 * next();
                if next() < 0.5 {
                    -m
                } else {
                    m
                }
            })
            .collect(),
        Gen::AboveOne => (0..n).map(|_| 1.2 + 1.8 * next()).collect(),
        Gen::Distinct => {
            let mut idx: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = (next() * (i + 1) as f32) as usize % (i + 1);
                idx.swap(i, j);
            }
            idx.iter().map(|&k| k as f32 * 0.05 - n as f32 * 0.025 + 0.01).collect()
        }
    }
}

/// The values of case `ci`'s differentiated inputs.
fn feed_for(c: &Case, ci: usize) -> Tensors {
    let mut feed = Tensors::new();
    for (i, inp) in c.inputs.iter().enumerate() {
        if let In::X(s) = inp {
            let n: usize = s.iter().product();
            let v = values(n, c.gen, (ci * 31 + i) as u64);
            feed.insert(
                format!("in{i}"),
                Value::F32(ArrayD::from_shape_vec(s.clone(), v).unwrap()),
            );
        }
    }
    feed
}

/// The one-op model, its loss, and the gradient outputs `<input>_grad`.
fn build(c: &Case) -> (Model, Vec<String>) {
    try_build(c).unwrap_or_else(|e| panic!("{}: {e}", c.name))
}

fn try_build(c: &Case) -> Result<(Model, Vec<String>), dagr_inject::Error> {
    try_build_with(c, false)
}

/// The case's single-op model with its loss and the rule's gradient outputs, or the error the
/// gradient engine gave; with `symbolic`, every dim of the first input except those of size 1
/// and the channels of an image or signal is declared symbolic (`in0_d2`), as the activations
/// of a model exported with dynamic axes (weights, channels and broadcast dims stay static, as
/// exporters write them).
fn try_build_with(c: &Case, symbolic: bool) -> Result<(Model, Vec<String>), dagr_inject::Error> {
    let mut g = GraphProto::new();
    g.name = c.name.into();
    let mut node = NodeProto::new();
    node.op_type = c.op.into();
    node.name = format!("op/{}", c.op);
    node.attribute = c.attrs.clone();
    let mut wrt = Vec::new();
    for (i, inp) in c.inputs.iter().enumerate() {
        let name = format!("in{i}");
        match inp {
            In::X(s) => {
                let dims = s
                    .iter()
                    .enumerate()
                    .map(|(k, &d)| {
                        let sym = match &c.symbolic {
                            Some(ks) => ks.contains(&k),
                            None => d != 1 && !(k == 1 && s.len() >= 3),
                        };
                        match symbolic && i == 0 && sym {
                            true => Dim::sym(&format!("{name}_d{k}")),
                            false => Dim::Known(d as i64),
                        }
                    })
                    .collect();
                let f = ValueFact::new(dtype::FLOAT, dims);
                g.input.push(f.to_value_info(&name));
                wrt.push(name.clone());
            }
            In::Ints(d, v) => g.initializer.push(tensor::i64_tensor(&name, d, v)),
            In::F(d, v) => g.initializer.push(tensor::f32_tensor(&name, d, v)),
            In::B(d, v) => {
                let mut t = tensor::i64_tensor(&name, d, &[]);
                t.data_type = dtype::BOOL;
                t.raw_data = v.iter().map(|&b| b as u8).collect();
                g.initializer.push(t);
            }
            In::I32(d, v) => {
                let mut t = tensor::i64_tensor(&name, d, &[]);
                t.data_type = dtype::INT32;
                t.raw_data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                g.initializer.push(t);
            }
            In::Absent => {
                node.input.push(String::new());
                continue;
            }
        }
        node.input.push(name);
    }
    if c.op == "Dropout" {
        let mut t = tensor::i64_tensor("in_training", &[], &[]);
        t.data_type = dtype::BOOL;
        t.raw_data = vec![0];
        g.initializer.push(t);
        node.input.push("in_training".into());
    }
    node.output = (0..c.outputs).map(|i| format!("y{i}")).collect();
    g.node.push(node);
    let mut p = ModelProto::new();
    p.ir_version = 8;
    let mut o = OperatorSetIdProto::new();
    o.version = c.opset;
    p.opset_import.push(o);
    p.graph = protobuf::MessageField::some(g);
    let mut model = Model {
        proto: p,
        base_dir: ".".into(),
        source: None,
    };

    // loss = sum(y^2 (0.5 + 0.2 y)), in float32: not symmetric in y, so that ops whose output
    // has invariant moments (training-mode normalization) still get a non-zero gradient.
    let mut b = Builder::new(&model, "t/");
    let mut terms = Vec::new();
    for k in 0..c.loss_outputs {
        let y = if c.op == "Cast" {
            b.cast(&format!("y{k}"), dtype::FLOAT, "loss")
        } else {
            format!("y{k}")
        };
        let sq = b.binary("Mul", &y, &y, "loss");
        let kk = b.scalar(0.2);
        let half = b.scalar(0.5);
        let ky = b.binary("Mul", &y, &kk, "loss");
        let w = b.binary("Add", &ky, &half, "loss");
        let t = b.binary("Mul", &sq, &w, "loss");
        terms.push(b.reduce("ReduceSum", &t, None, false, "loss"));
    }
    let refs: Vec<&str> = terms.iter().map(String::as_str).collect();
    b.op_named("Sum", &refs, vec![], "loss");
    b.finish(&mut model);
    let idx = GraphIndex::new(&model).unwrap();
    let mut b = Builder::new(&model, "g/");
    let one = b.scalar(1.0);
    let grads = grad::backward(&model, &idx, &mut b, &[("loss".into(), one)], &wrt, &HashSet::new())?;
    let mut outs = vec!["loss".to_string()];
    let mut facts = vec![ValueFact::new(dtype::FLOAT, vec![])];
    for w in &wrt {
        let gname = format!("{w}_grad");
        b.op_named("Identity", &[&grads[w]], vec![], &gname);
        outs.push(gname);
        facts.push(idx.fact(w).cloned().unwrap());
    }
    b.finish(&mut model);
    for (n, f) in outs.iter().zip(&facts) {
        model.graph_mut().output.push(f.to_value_info(n));
    }
    Ok((model, wrt))
}

/// Gather's and GatherElements' gradients scatter with reduction="add" (opset 16): below that,
/// the engine says so instead of emitting an invalid graph.
#[test]
fn gather_gradients_below_opset_16_say_why() {
    for op in ["Gather", "GatherElements"] {
        let idx = if op == "Gather" {
            ints(&[1, 0])
        } else {
            In::Ints(vec![2, 2], vec![1, 0, 2, 2])
        };
        let c = case("gather_opset15", op, vec![x(&[2, 3]), idx]).opset(15);
        let e = try_build(&c).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("opset 16"), "{op}: {e}");
    }
}

/// An op without a rule on the path to the loss is a typed error naming op and node (the first
/// element-wise op, of a few that shape inference knows, that the registry has no rule for).
#[test]
fn an_op_without_a_rule_is_named() {
    let Some(op) = ["DepthToSpace", "SpaceToDepth", "Hardmax2"]
        .into_iter()
        .find(|op| rules::lookup("", op).is_none())
    else {
        panic!("every candidate has a rule now: list an op the registry has no rule for");
    };
    let c = case("norule", op, vec![x(&[1, 4, 2, 2])]);
    match try_build(&c).map(|_| ()) {
        Err(dagr_inject::Error::NoGradientRule { op: o, node }) => {
            assert_eq!((o.as_str(), node.as_str()), (op, format!("op/{op}").as_str()));
        }
        other => panic!("expected NoGradientRule for {op}, got {other:?}"),
    }
}

#[test]
fn every_rule_has_a_case() {
    let covered: HashSet<&str> = cases().iter().map(|c| c.op).collect();
    let missing: Vec<&str> = rules::RULES
        .iter()
        .filter(|r| !rules::is_non_differentiable(r.op) && !covered.contains(r.op))
        .map(|r| r.op)
        .collect();
    assert!(
        missing.is_empty(),
        "gradient rules without a finite-difference case: {missing:?}"
    );
}

/// An op the registry differentiates also has a shape inference rule (the gradient rules read
/// the shapes of what they meet): adding one without the other fails here.
#[test]
fn every_rule_has_an_inference_rule() {
    let inferred: HashSet<&str> = onnx::infer::supported_ops().into_iter().collect();
    let missing: Vec<&str> = rules::RULES
        .iter()
        .map(|r| r.op)
        .filter(|op| !inferred.contains(op))
        .collect();
    assert!(missing.is_empty(), "registry ops without shape inference: {missing:?}");
}

#[test]
fn every_rule_matches_central_differences() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let mut checks = OnnxChecks::default();
    let mut failures = Vec::new();
    for (ci, c) in cases().iter().enumerate() {
        let (model, wrt) = build(c);
        let path = dir.path().join(format!("{}.onnx", c.name));
        onnx::save(&model, &path).unwrap();
        if c.checker_refuses.is_none() {
            checks.add(&path);
        }
        let feed = feed_for(c, ci);
        let outs: Vec<String> = std::iter::once("loss".to_string())
            .chain(wrt.iter().map(|w| format!("{w}_grad")))
            .collect();
        for &backend in c.backends {
            let mut r = Runner::new(backend, &path, &feed, &outs)
                .unwrap_or_else(|e| panic!("{} on {}: {e}", c.name, backend.name()));
            let base = r.run(&feed).unwrap();
            let loss = |r: &mut Runner, f: &Tensors| -> f64 {
                f32_of(&r.run(f).unwrap(), "loss").iter().next().copied().unwrap() as f64
            };
            for w in &wrt {
                let g = f32_of(&base, &format!("{w}_grad"));
                let x0 = feed[w].as_f32().unwrap().clone();
                assert_eq!(g.shape(), x0.shape(), "{}: gradient of {w} has the wrong shape", c.name);
                let scale = g.iter().fold(1e-3f64, |a, v| a.max(v.abs() as f64));
                let h = 2e-3f32;
                for i in 0..x0.len() {
                    let mut p = x0.clone();
                    p.as_slice_mut().unwrap()[i] += h;
                    let mut m = x0.clone();
                    m.as_slice_mut().unwrap()[i] -= h;
                    let mut f = feed.clone();
                    f.insert(w.clone(), Value::F32(p));
                    let lp = loss(&mut r, &f);
                    f.insert(w.clone(), Value::F32(m));
                    let lm = loss(&mut r, &f);
                    let fd = (lp - lm) / (2.0 * h as f64);
                    let an = g.as_slice().unwrap()[i] as f64;
                    if (fd - an).abs() > 1e-2 * scale + 2e-3 * fd.abs().max(1.0) {
                        failures.push(format!(
                            "{} on {}: d loss / d {w}[{i}] = {fd} by differences, {an} by the rule",
                            c.name,
                            backend.name()
                        ));
                        break;
                    }
                }
            }
        }
    }
    assert_no_failures(&failures);
}

/// Every rule builds when the first input's dims are symbolic (a model exported with dynamic axes),
/// using the runtime form where a dim is not known, and gives the same gradients on ONNX
/// Runtime as with the dims known.
#[test]
fn every_rule_handles_symbolic_dims() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (ci, c) in cases().iter().enumerate() {
        if !c.backends.contains(&Backend::Ort) {
            continue;
        }
        let (fixed, wrt) = build(c);
        let dynamic = match try_build_with(c, true) {
            Ok((m, _)) => m,
            Err(e) => {
                failures.push(format!("{}: {e}", c.name));
                continue;
            }
        };
        let feed = feed_for(c, ci);
        let outs: Vec<String> = wrt.iter().map(|w| format!("{w}_grad")).collect();
        let run_one = |m: &Model, tag: &str| -> Result<Tensors, String> {
            let p = dir.path().join(format!("{}.{tag}.onnx", c.name));
            onnx::save(m, &p).unwrap();
            dagr_inject::runtime::run(Backend::Ort, &p, &feed, &outs).map_err(|e| e.to_string())
        };
        match (run_one(&fixed, "fixed"), run_one(&dynamic, "symbolic")) {
            (Ok(a), Ok(b)) => {
                for o in &outs {
                    if f32_of(&a, o) != f32_of(&b, o) {
                        failures.push(format!("{}: {o} differs with symbolic dims", c.name));
                    }
                }
            }
            (_, Err(e)) => failures.push(format!("{}: the symbolic-dims graph fails: {e}", c.name)),
            (Err(e), _) => panic!("{}: {e}", c.name),
        }
    }
    assert_no_failures(&failures);
}

/// The shape inference of every op with a case agrees with ONNX Runtime on the case's outputs
/// (the forward op's, all of them).
#[test]
fn every_case_output_shape_matches_onnx_runtime() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (ci, c) in cases().iter().enumerate() {
        if !c.backends.contains(&Backend::Ort) {
            continue;
        }
        let (mut m, _) = build(c);
        let idx = GraphIndex::new(&m).unwrap();
        let names: Vec<String> = (0..c.outputs).map(|k| format!("y{k}")).collect();
        for n in &names {
            match idx.fact(n).filter(|f| f.shape.is_some()) {
                Some(f) => m.graph_mut().output.push(f.to_value_info(n)),
                None => failures.push(format!("{}: no shape inferred for {n}", c.name)),
            }
        }
        let p = dir.path().join(format!("{}.shapes.onnx", c.name));
        onnx::save(&m, &p).unwrap();
        let out = dagr_inject::runtime::run(Backend::Ort, &p, &feed_for(c, ci), &names).unwrap();
        for n in &names {
            let want: Vec<Option<i64>> = idx
                .fact(n)
                .and_then(|f| f.shape.clone())
                .unwrap_or_default()
                .iter()
                .map(Dim::known)
                .collect();
            let got: Vec<Option<i64>> = out[n].shape().iter().map(|&d| Some(d as i64)).collect();
            if want != got {
                failures.push(format!("{}: {n} inferred {want:?}, ONNX Runtime {got:?}", c.name));
            }
        }
    }
    assert_no_failures(&failures);
}

/// A float16 segment (cast in, cast out, as mixed-precision exports write it): the gradient
/// graph is well typed (every constant a rule makes takes the op's float type; onnx.checker and
/// ONNX Runtime check the gradients' declared float16 outputs against their own inference) and
/// runs, and its parameter gradients equal those of the same model in float32 to float16's
/// precision.
#[test]
fn a_float16_segment_gets_float16_gradients() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let vals = |n: usize, seed: u64| {
        values(n, Gen::AwayFromZero, seed)
            .iter()
            .map(|&v| v as f64 * 0.3)
            .collect::<Vec<f64>>()
    };
    let (w, bias, scale, shift) = (vals(30, 1), vals(5, 2), vals(5, 3), vals(5, 4));
    let build_one = |half: bool| -> (Model, Vec<String>) {
        let elem = if half { dtype::FLOAT16 } else { dtype::FLOAT };
        // float32 values rounded as float16 rounds them, so that both models hold the same.
        let r = |v: &[f64]| v.iter().map(|&x| half::f16::from_f64(x).to_f64()).collect::<Vec<f64>>();
        let mut g = GraphProto::new();
        g.name = "half".into();
        g.input
            .push(ValueFact::new(dtype::FLOAT, vec![Dim::Known(4), Dim::Known(6)]).to_value_info("x"));
        for (name, dims, v) in [
            ("w", vec![6, 5], &w),
            ("b", vec![5], &bias),
            ("scale", vec![5], &scale),
            ("shift", vec![5], &shift),
        ] {
            g.initializer.push(tensor::float_tensor(name, &dims, &r(v), elem));
        }
        let mut p = ModelProto::new();
        p.ir_version = 8;
        let mut o = OperatorSetIdProto::new();
        o.version = 18;
        p.opset_import.push(o);
        p.graph = protobuf::MessageField::some(g);
        let mut model = Model {
            proto: p,
            base_dir: ".".into(),
            source: None,
        };
        let mut b = Builder::new(&model, "m/");
        let x = if half {
            b.cast("x", dtype::FLOAT16, "in")
        } else {
            "x".to_string()
        };
        let h = b.binary("MatMul", &x, "w", "f");
        let h = b.binary("Add", &h, "b", "f");
        let h = b.op(
            "LayerNormalization",
            &[&h, "scale", "shift"],
            vec![attr_int("axis", -1)],
            "f",
        );
        let s = b.unary("Sigmoid", &h, "f");
        let h = b.binary("Mul", &h, &s, "f");
        let p = b.op("Softmax", &[&h], vec![attr_int("axis", -1)], "f");
        let m = b.reduce("ReduceMean", &h, Some(&[1]), true, "f");
        let h = b.binary("Sub", &h, &m, "f");
        let h = b.binary("Add", &h, &p, "f");
        let h = b.unary("Tanh", &h, "f");
        let y = if half { b.cast(&h, dtype::FLOAT, "out") } else { h };
        let sq = b.binary("Mul", &y, &y, "loss");
        b.op_named("ReduceSum", &[&sq], vec![attr_int("keepdims", 0)], "loss");
        b.finish(&mut model);
        let idx = GraphIndex::new(&model).unwrap();
        let params: Vec<String> = ["w", "b", "scale", "shift"].iter().map(|s| s.to_string()).collect();
        let mut b = Builder::new(&model, "g/");
        let one = b.scalar(1.0);
        let grads = grad::backward(&model, &idx, &mut b, &[("loss".into(), one)], &params, &HashSet::new())
            .unwrap_or_else(|e| panic!("half={half}: {e}"));
        let mut outs = Vec::new();
        for w in &params {
            let o = format!("{w}_grad");
            b.op_named("Identity", &[&grads[w]], vec![], &o);
            outs.push(o);
        }
        b.finish(&mut model);
        for (w, o) in params.iter().zip(&outs) {
            let f = idx.fact(w).unwrap().clone();
            model.graph_mut().output.push(f.to_value_info(o));
        }
        onnx::infer::check(&model).unwrap_or_else(|e| panic!("half={half}: {e}"));
        (model, outs)
    };
    let mut feed = Tensors::new();
    feed.insert(
        "x".into(),
        Value::F32(ArrayD::from_shape_vec(vec![4, 6], values(24, Gen::AwayFromZero, 9)).unwrap()),
    );
    let mut got = Vec::new();
    for half in [false, true] {
        let (m, outs) = build_one(half);
        let p = dir.path().join(format!("half_{half}.onnx"));
        onnx::save(&m, &p).unwrap();
        onnx_check(&p);
        got.push(
            dagr_inject::runtime::run(Backend::Ort, &p, &feed, &outs).unwrap_or_else(|e| panic!("half={half}: {e}")),
        );
    }
    for name in ["w_grad", "b_grad", "scale_grad", "shift_grad"] {
        let a = f32_of(&got[0], name);
        let h = f32_of(&got[1], name);
        let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(h.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 2e-2 * scale, "{name}: float16 {h:?} against float32 {a:?}");
    }
}
