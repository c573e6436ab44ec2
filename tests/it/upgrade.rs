//! Models of opsets 6 to 15 read as opset 16 (`dagr_ops::upgrade`): each rewritten form computes
//! what ONNX Runtime computes for the old one, and real PyTorch exports at opsets 9 to 15 train
//! to PyTorch's gradients.

use crate::common::*;
use dagr_inject::onnx::builder::{attr_float, attr_floats, attr_graph, attr_int, attr_ints, attr_string};
use dagr_inject::onnx::proto::{AttributeProto, GraphProto, NodeProto};
use dagr_inject::onnx::{self, dtype, tensor, ValueFact};
use dagr_inject::runtime::{Backend, Tensors, Value};
use ndarray::ArrayD;

/// An input of a form's node: the first is fed (a graph input), the others are initializers.
enum In {
    /// Float values in [-1.2, 1.2], distinct.
    F(Vec<i64>),
    Fv(Vec<i64>, Vec<f64>),
    I(Vec<i64>, Vec<i64>),
    Bool(bool),
}

struct Form {
    name: &'static str,
    opset: i64,
    op: &'static str,
    attrs: Vec<AttributeProto>,
    inputs: Vec<In>,
    /// Each output's type and shape.
    outputs: Vec<(i32, Vec<i64>)>,
    /// The old form's output written out, for opsets ONNX Runtime no longer runs (6): from the
    /// inputs' values.
    reference: Option<Written>,
}

/// An old form's output computed from its inputs' values.
type Written = fn(&[ArrayD<f32>]) -> ArrayD<f32>;

fn form(name: &'static str, opset: i64, op: &'static str, inputs: Vec<In>, out: &[i64]) -> Form {
    Form {
        name,
        opset,
        op,
        attrs: vec![],
        inputs,
        outputs: vec![(dtype::FLOAT, out.to_vec())],
        reference: None,
    }
}

impl Form {
    fn attrs(mut self, a: Vec<AttributeProto>) -> Form {
        self.attrs = a;
        self
    }
    fn reference(mut self, r: Written) -> Form {
        self.reference = Some(r);
        self
    }
    fn outputs(mut self, o: Vec<(i32, Vec<i64>)>) -> Form {
        self.outputs = o;
        self
    }
}

fn distinct(dims: &[i64]) -> Vec<f64> {
    let n: i64 = dims.iter().product();
    (0..n).map(|i| ((i * 37 % 101) as f64 / 101.0 - 0.5) * 2.4).collect()
}

/// The form's model at its opset, and the feed of its first input.
fn model(f: &Form) -> (onnx::Model, Tensors) {
    let mut g = GraphProto::new();
    let mut node = NodeProto::new();
    node.op_type = f.op.into();
    node.name = "n".into();
    node.attribute = f.attrs.clone();
    let mut feed = Tensors::new();
    for (k, i) in f.inputs.iter().enumerate() {
        let name = format!("in{k}");
        match i {
            In::F(d) | In::Fv(d, _) => {
                let v = match i {
                    In::Fv(_, v) => v.clone(),
                    _ => distinct(d),
                };
                if k == 0 {
                    g.input.push(
                        ValueFact::new(dtype::FLOAT, d.iter().map(|&x| onnx::Dim::Known(x)).collect())
                            .to_value_info(&name),
                    );
                    let a = ArrayD::from_shape_vec(
                        d.iter().map(|&x| x as usize).collect::<Vec<_>>(),
                        v.iter().map(|&x| x as f32).collect(),
                    )
                    .unwrap();
                    feed.insert(name.clone(), Value::F32(a));
                } else {
                    g.initializer.push(tensor::float_tensor(&name, d, &v, dtype::FLOAT));
                }
            }
            In::I(d, v) => g.initializer.push(tensor::i64_tensor(&name, d, v)),
            In::Bool(b) => {
                let mut t = tensor::i64_tensor(&name, &[], &[]);
                t.data_type = dtype::BOOL;
                t.raw_data = vec![*b as u8];
                g.initializer.push(t);
            }
        }
        node.input.push(name);
    }
    for (k, (t, d)) in f.outputs.iter().enumerate() {
        let name = format!("y{k}");
        node.output.push(name.clone());
        g.output
            .push(ValueFact::new(*t, d.iter().map(|&x| onnx::Dim::Known(x)).collect()).to_value_info(&name));
    }
    g.node.push(node);
    (model_of(g, f.opset), feed)
}

fn forms() -> Vec<Form> {
    let f = |d: &[i64]| In::F(d.to_vec());
    // An If whose branches normalize a captured 3-D tensor at axis 1 the opset-11 way (its rank
    // unknown inside the branch: the Flatten form).
    let branch = |op: &str| {
        let mut g = GraphProto::new();
        g.name = format!("{op}_branch");
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.input.push("in1".into());
        n.output.push(format!("{op}_out"));
        n.attribute.push(attr_int("axis", 1));
        g.node.push(n);
        g.output
            .push(ValueFact::new(dtype::FLOAT, vec![]).to_value_info(&format!("{op}_out")));
        g.output[0].type_.mut_or_insert_default().mut_tensor_type().shape = protobuf::MessageField::none();
        g
    };
    vec![
        form("slice_1", 9, "Slice", vec![f(&[3, 5, 4])], &[2, 5, 3]).attrs(vec![
            attr_ints("starts", &[1, 0]),
            attr_ints("ends", &[3, -1]),
            attr_ints("axes", &[0, 2]),
        ]),
        form("slice_1_no_axes", 9, "Slice", vec![f(&[3, 5])], &[2, 3])
            .attrs(vec![attr_ints("starts", &[1, 1]), attr_ints("ends", &[3, 4])]),
        form("squeeze_1", 9, "Squeeze", vec![f(&[3, 1, 4])], &[3, 4]).attrs(vec![attr_ints("axes", &[1])]),
        form("unsqueeze_11", 11, "Unsqueeze", vec![f(&[3, 4])], &[1, 3, 4, 1]).attrs(vec![attr_ints("axes", &[-1, 0])]),
        form("reduce_sum_11", 12, "ReduceSum", vec![f(&[3, 5, 4])], &[1, 5, 1]).attrs(vec![attr_ints("axes", &[0, 2])]),
        form("reduce_sum_11_all", 12, "ReduceSum", vec![f(&[3, 5])], &[]).attrs(vec![attr_int("keepdims", 0)]),
        form("split_2", 9, "Split", vec![f(&[3, 6])], &[])
            .attrs(vec![attr_int("axis", 1), attr_ints("split", &[2, 4])])
            .outputs(vec![(dtype::FLOAT, vec![3, 2]), (dtype::FLOAT, vec![3, 4])]),
        form("pad_2_reflect", 9, "Pad", vec![f(&[2, 3, 5])], &[2, 3, 8]).attrs(vec![
            attr_ints("pads", &[0, 0, 1, 0, 0, 2]),
            attr_string("mode", "reflect"),
        ]),
        form("pad_2_value", 10, "Pad", vec![f(&[2, 3])], &[3, 5])
            .attrs(vec![attr_ints("pads", &[1, 0, 0, 2]), attr_float("value", 1.5)]),
        form("clip_6", 9, "Clip", vec![f(&[3, 4])], &[3, 4])
            .attrs(vec![attr_float("min", -0.5), attr_float("max", 0.7)]),
        form("clip_6_max_only", 10, "Clip", vec![f(&[3, 4])], &[3, 4]).attrs(vec![attr_float("max", 0.2)]),
        form("top_k_1", 9, "TopK", vec![f(&[3, 5])], &[])
            .attrs(vec![attr_int("k", 2), attr_int("axis", 1)])
            .outputs(vec![(dtype::FLOAT, vec![3, 2]), (dtype::INT64, vec![3, 2])]),
        form("dropout_7", 9, "Dropout", vec![f(&[3, 4])], &[3, 4]).attrs(vec![attr_float("ratio", 0.3)]),
        form("dropout_10", 11, "Dropout", vec![f(&[3, 4])], &[3, 4]).attrs(vec![attr_float("ratio", 0.2)]),
        // Softmax before 13 normalizes the input flattened to 2-D at its axis (default 1).
        form("softmax_1_axis1_3d", 9, "Softmax", vec![f(&[2, 3, 4])], &[2, 3, 4]).attrs(vec![attr_int("axis", 1)]),
        form(
            "log_softmax_11_default_3d",
            11,
            "LogSoftmax",
            vec![f(&[2, 3, 4])],
            &[2, 3, 4],
        ),
        form("hardmax_11_last", 12, "Hardmax", vec![f(&[2, 3, 4])], &[2, 3, 4]).attrs(vec![attr_int("axis", 2)]),
        form("softmax_11_axis0", 11, "Softmax", vec![f(&[2, 3])], &[2, 3]).attrs(vec![attr_int("axis", 0)]),
        form(
            "upsample_7_nearest",
            7,
            "Upsample",
            vec![f(&[1, 2, 2, 3])],
            &[1, 2, 4, 9],
        )
        .attrs(vec![attr_floats("scales", &[1.0, 1.0, 2.0, 3.0])]),
        form(
            "upsample_9_linear",
            9,
            "Upsample",
            vec![f(&[1, 2, 3, 3]), In::Fv(vec![4], vec![1.0, 1.0, 2.0, 2.0])],
            &[1, 2, 6, 6],
        )
        .attrs(vec![attr_string("mode", "linear")]),
        form(
            "resize_10_nearest_down",
            10,
            "Resize",
            vec![f(&[1, 1, 4, 6]), In::Fv(vec![4], vec![1.0, 1.0, 0.5, 0.75])],
            &[1, 1, 2, 4],
        ),
        form(
            "resize_10_nearest_up",
            10,
            "Resize",
            vec![f(&[1, 1, 3, 2]), In::Fv(vec![4], vec![1.0, 1.0, 1.5, 2.0])],
            &[1, 1, 4, 4],
        ),
        form(
            "resize_10_linear",
            10,
            "Resize",
            vec![f(&[1, 1, 3, 3]), In::Fv(vec![4], vec![1.0, 1.0, 2.0, 2.0])],
            &[1, 1, 6, 6],
        )
        .attrs(vec![attr_string("mode", "linear")]),
        form(
            "scatter_9",
            9,
            "Scatter",
            vec![f(&[3, 4]), In::I(vec![3, 2], vec![1, 0, 2, 3, 0, 1]), f(&[3, 2])],
            &[3, 4],
        )
        .attrs(vec![attr_int("axis", 1)]),
        form(
            "batch_norm_7_inference",
            7,
            "BatchNormalization",
            vec![
                f(&[2, 3, 4]),
                In::Fv(vec![3], vec![1.0, 0.5, 2.0]),
                In::Fv(vec![3], vec![0.1, -0.2, 0.3]),
                In::Fv(vec![3], vec![0.05, 0.0, -0.1]),
                In::Fv(vec![3], vec![1.0, 0.5, 2.0]),
            ],
            &[2, 3, 4],
        )
        .attrs(vec![attr_int("spatial", 1)]),
        // Opset 6 broadcasts by attribute: B aligned with A's dims from `axis` (B [3] against A
        // [2, 3, 4] at axis 1 is B [3, 1] from 7 on), or from the end without `axis`.
        form(
            "add_6_broadcast_axis",
            6,
            "Add",
            vec![f(&[2, 3, 4]), f(&[3])],
            &[2, 3, 4],
        )
        .attrs(vec![attr_int("broadcast", 1), attr_int("axis", 1)])
        .reference(|x| &x[0] + &x[1].clone().into_shape_with_order(vec![1, 3, 1]).unwrap()),
        form(
            "mul_6_broadcast_end",
            6,
            "Mul",
            vec![f(&[2, 3, 4]), f(&[3, 4])],
            &[2, 3, 4],
        )
        .attrs(vec![attr_int("broadcast", 1)])
        .reference(|x| &x[0] * &x[1]),
        form(
            "prelu_6_per_channel",
            6,
            "PRelu",
            vec![f(&[2, 3, 4]), f(&[3])],
            &[2, 3, 4],
        )
        .reference(|x| {
            let slope = x[1].clone().into_shape_with_order(vec![1, 3, 1]).unwrap();
            let neg = &x[0] * &slope;
            ndarray::Zip::from(&x[0])
                .and(&neg)
                .map_collect(|&a, &n| if a > 0.0 { a } else { n })
        }),
        form(
            "image_scaler_7",
            7,
            "ImageScaler",
            vec![f(&[2, 3, 2, 2])],
            &[2, 3, 2, 2],
        )
        .attrs(vec![attr_float("scale", 0.5), attr_floats("bias", &[0.1, -0.2, 0.3])]),
        form(
            "roi_align_10",
            10,
            "RoiAlign",
            vec![
                f(&[1, 2, 6, 6]),
                In::Fv(vec![2, 4], vec![0.5, 1.0, 4.0, 5.5, 1.5, 0.0, 5.0, 3.0]),
                In::I(vec![2], vec![0, 0]),
            ],
            &[2, 2, 2, 2],
        )
        .attrs(vec![
            attr_int("output_height", 2),
            attr_int("output_width", 2),
            attr_int("sampling_ratio", 2),
        ]),
        form("if_11_softmax_in_branches", 11, "If", vec![In::Bool(true)], &[2, 3, 4]).attrs(vec![
            attr_graph("then_branch", branch("Softmax")),
            attr_graph("else_branch", branch("LogSoftmax")),
        ]),
    ]
}

/// Every rewrite computes what the old form computes: each form's model at its old opset and
/// the same model read as opset 16 give the same outputs on ONNX Runtime (which runs both),
/// and the rewritten model passes the emitted-graph check; no rewritten node keeps an old form.
#[test]
fn every_upgraded_form_computes_the_old_one() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for f in forms() {
        let (mut old, mut feed) = model(&f);
        if f.op == "If" {
            // Its branches read in1 from the outer scope: a graph input, fed.
            let d = vec![2, 3, 4];
            let v: Vec<f32> = distinct(&[2, 3, 4]).iter().map(|&x| x as f32).collect();
            feed.insert("in1".into(), Value::F32(ArrayD::from_shape_vec(d, v).unwrap()));
            let fact = ValueFact::new(dtype::FLOAT, [2, 3, 4].map(onnx::Dim::Known).to_vec());
            old.graph_mut().input.push(fact.to_value_info("in1"));
        }
        let mut new = old.clone();
        let from = dagr_inject::ops::upgrade::upgrade(&mut new).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        assert_eq!(from, Some(f.opset), "{}", f.name);
        assert_eq!(new.opset(), dagr_inject::ops::upgrade::TARGET);
        if let Err(e) = dagr_inject::ops::infer::check(&new) {
            failures.push(format!("{}: {e}", f.name));
            continue;
        }
        let attrs_left = [
            "starts",
            "ends",
            "pads",
            "min",
            "max",
            "k",
            "ratio",
            "split",
            "scales",
            "spatial",
            "broadcast",
        ];
        for n in &new.graph().node {
            if n.op_type == f.op
                && n.attribute
                    .iter()
                    .any(|a| attrs_left.contains(&a.name.as_str()) || (a.name == "axes" && n.op_type != "Slice"))
            {
                failures.push(format!("{}: the rewritten node keeps an old attribute", f.name));
            }
        }
        let (p_old, p_new) = (
            dir.path().join(format!("{}.old.onnx", f.name)),
            dir.path().join(format!("{}.new.onnx", f.name)),
        );
        onnx::save(&old, &p_old).unwrap();
        onnx::save(&new, &p_new).unwrap();
        let outs: Vec<String> = (0..f.outputs.len()).map(|k| format!("y{k}")).collect();
        let want = match f.reference {
            Some(r) => {
                let values: Vec<ArrayD<f32>> = f
                    .inputs
                    .iter()
                    .map(|i| match i {
                        In::F(d) => {
                            let shape: Vec<usize> = d.iter().map(|&x| x as usize).collect();
                            ArrayD::from_shape_vec(shape, distinct(d).iter().map(|&v| v as f32).collect()).unwrap()
                        }
                        _ => panic!("{}: a written-out reference takes float inputs", f.name),
                    })
                    .collect();
                Tensors::from([("y0".to_string(), Value::F32(r(&values)))])
            }
            None => run(Backend::Ort, &p_old, &feed, &outs),
        };
        let got = match dagr_inject::runtime::run(Backend::Ort, &p_new, &feed, &outs) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{} read as opset 16: {e}", f.name));
                continue;
            }
        };
        for o in &outs {
            let same = match (&want[o], &got[o]) {
                (Value::F32(a), Value::F32(b)) => {
                    a.shape() == b.shape()
                        && a.iter()
                            .zip(b.iter())
                            .all(|(x, y)| (x - y).abs() <= 1e-6 * x.abs().max(1.0))
                }
                (Value::I64(a), Value::I64(b)) => a == b,
                _ => false,
            };
            if !same {
                failures.push(format!("{}: {o} differs read as opset 16", f.name));
            }
        }
    }
    assert_no_failures(&failures);
}

/// What has no opset-16 form is refused by name, and nothing older than opset 7 is read.
#[test]
fn old_forms_without_a_later_one_are_refused() {
    let bn = form(
        "bn_per_element",
        7,
        "BatchNormalization",
        vec![
            In::F(vec![2, 3]),
            In::F(vec![3]),
            In::F(vec![3]),
            In::F(vec![3]),
            In::Fv(vec![3], vec![1.0; 3]),
        ],
        &[2, 3],
    )
    .attrs(vec![attr_int("spatial", 0)]);
    let (mut m, _) = model(&bn);
    let e = dagr_inject::ops::upgrade::upgrade(&mut m).unwrap_err().to_string();
    assert!(
        e.contains("BatchNormalization node 'n'") && e.contains("spatial=0"),
        "{e}"
    );
    let (mut m, _) = model(&form("clip_1", 5, "Clip", vec![In::F(vec![3])], &[3]));
    let e = dagr_inject::ops::upgrade::upgrade(&mut m).unwrap_err().to_string();
    assert!(e.contains("opset 5") && e.contains("opsets 6 and newer"), "{e}");
    let resize = form(
        "resize_runtime_scales",
        10,
        "Resize",
        vec![In::F(vec![1, 1, 2, 2]), In::F(vec![4])],
        &[1, 1, 2, 2],
    );
    let (mut m, _) = model(&resize);
    // The scales are an initializer here: known. Fed at run time, the rounding is unknown.
    m.graph_mut().initializer.retain(|t| t.name != "in1");
    m.graph_mut()
        .input
        .push(ValueFact::new(dtype::FLOAT, vec![onnx::Dim::Known(4)]).to_value_info("in1"));
    let e = dagr_inject::ops::upgrade::upgrade(&mut m).unwrap_err().to_string();
    assert!(
        e.contains("Resize node 'n'") && e.contains("scales computed at run time"),
        "{e}"
    );
}

/// One PyTorch model exported by the legacy exporter at opsets 9 to 15
/// (`models/old_opset/export.py`: Slice, Squeeze, Unsqueeze, ReduceSum, Split, Pad, Clip, TopK
/// and Softmax in their old forms, Upsample, Resize-10, BatchNormalization in training mode, a
/// MaxPool whose gradient needs opset 16's scatter): `--train` builds on every export, every
/// parameter gradient of cross-entropy + DAGR equals PyTorch autograd in float64 on both
/// backends (to 1e-4 of the largest gradient: the convolution biases before BatchNorm have a
/// zero gradient), and on two of them `verify --original` passes and 3 steps of `train` reach
/// the same loss on both backends.
#[test]
fn old_opsets_train_as_pytorch_computes_it() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let base = root().join("models/old_opset");
    let (feed, reference) = reference_npz(&base.join("ref.npz"), &["audio", "visual", "y"]);
    let floor = 1e-3
        * reference
            .iter()
            .filter(|(k, _)| k.starts_with("grad/"))
            .map(|(_, v)| v.iter().fold(0f64, |a, x| a.max(x.abs())))
            .fold(0f64, f64::max);
    let data = dir.path().join("data.npz");
    dagr_inject::npz::write(&data, &feed).unwrap();
    for opset in 9..=15 {
        let src = base.join(format!("opset{opset}.onnx"));
        assert_eq!(onnx::load(&src).unwrap().opset(), opset);
        let train = dir.path().join(format!("opset{opset}.train.onnx"));
        cli_train(&src, "audio_encoder,visual_encoder", &train);
        assert_eq!(onnx::load(&train).unwrap().opset(), dagr_inject::ops::upgrade::TARGET);
        gradients_match_reference(&train, &feed, &reference, floor, 14);
        if opset != 9 && opset != 13 {
            continue;
        }
        verify_and_train_alike(&train, &src, &data, &dir.path().join(format!("opset{opset}.run")));
    }
}

/// The onnx wheel's `pytorch-converted` and `pytorch-operator` test models (PyTorch's first ONNX
/// exports: opsets 6 and 9, each with its inputs and expected outputs): every one is read as
/// opset 16 (none refused), and the upgraded model computes the expected outputs on ONNX Runtime
/// (float64 operator tests in float32). Opset 6 broadcasts element-wise by attributes
/// (`add_broadcast`: `broadcast=1, axis=1`) and gives PRelu's slope per channel.
#[test]
fn onnx_pytorch_test_models_compute_their_outputs_read_as_opset_16() {
    use dagr_inject::onnx::proto::TensorProto;
    use protobuf::Message;
    require_ort();
    let data = venv_python()
        .parent()
        .and_then(|b| b.parent())
        .map(|v| v.join("lib"))
        .and_then(|lib| std::fs::read_dir(lib).ok())
        .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path().join("site-packages/onnx/backend/test/data"))))
        .filter(|p| p.exists())
        .expect("the onnx wheel's backend test data (scripts/setup.sh installs onnx)");
    let dir = tempfile::tempdir().unwrap();
    let value = |t: &TensorProto| -> Value {
        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        match t.data_type {
            d if d == dtype::INT64 => Value::I64(
                ArrayD::from_shape_vec(shape, tensor::to_i64(t, std::path::Path::new(".")).unwrap()).unwrap(),
            ),
            _ => Value::F32(
                ArrayD::from_shape_vec(shape, tensor::to_f32(t, std::path::Path::new(".")).unwrap()).unwrap(),
            ),
        }
    };
    let (mut checked, mut failures) = (0, Vec::new());
    for set in ["pytorch-converted", "pytorch-operator"] {
        let mut cases: Vec<_> = std::fs::read_dir(data.join(set))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        cases.sort();
        for case in cases {
            let name = case.file_name().unwrap().to_string_lossy().to_string();
            let Ok(m) = onnx::load(&case.join("model.onnx")) else {
                continue;
            };
            let mut up = m.clone();
            match dagr_inject::ops::upgrade::upgrade(&mut up) {
                Ok(_) => {}
                Err(e) => {
                    failures.push(format!("{name}: refused: {e}"));
                    continue;
                }
            }
            if let Err(e) = dagr_inject::ops::infer::check(&up) {
                failures.push(format!("{name}: {e}"));
                continue;
            }
            let set0 = case.join("test_data_set_0");
            let read = |k: &str, i: usize| {
                std::fs::read(set0.join(format!("{k}_{i}.pb")))
                    .ok()
                    .map(|b| TensorProto::parse_from_bytes(&b).unwrap())
            };
            let init: std::collections::HashSet<&str> =
                up.graph().initializer.iter().map(|t| t.name.as_str()).collect();
            let ins: Vec<String> = up
                .graph()
                .input
                .iter()
                .map(|i| i.name.clone())
                .filter(|n| !init.contains(n.as_str()))
                .collect();
            let given: Vec<(String, TensorProto)> = ins
                .iter()
                .enumerate()
                .filter_map(|(i, n)| read("input", i).map(|t| (n.clone(), t)))
                .collect();
            // The runners take float32 and int64: the operator tests of float64 (the
            // attribute-broadcasting Adds among them) run in float32, their types changed.
            let kinds = [dtype::FLOAT, dtype::INT64, dtype::DOUBLE];
            if given.iter().any(|(_, t)| !kinds.contains(&t.data_type)) {
                continue;
            }
            let g = up.graph_mut();
            for v in g
                .input
                .iter_mut()
                .chain(g.output.iter_mut())
                .chain(g.value_info.iter_mut())
            {
                let tt = v.type_.mut_or_insert_default().mut_tensor_type();
                if tt.elem_type == dtype::DOUBLE {
                    tt.elem_type = dtype::FLOAT;
                }
            }
            let constants = g
                .node
                .iter_mut()
                .flat_map(|n| n.attribute.iter_mut())
                .filter_map(|a| a.t.as_mut());
            for t in g
                .initializer
                .iter_mut()
                .chain(constants)
                .filter(|t| t.data_type == dtype::DOUBLE)
            {
                let v = tensor::to_f32(t, std::path::Path::new(".")).unwrap();
                *t = tensor::f32_tensor(&t.name.clone(), &t.dims.clone(), &v);
            }
            let feed: Tensors = given.iter().map(|(n, t)| (n.clone(), value(t))).collect();
            let outs: Vec<String> = up.graph().output.iter().map(|o| o.name.clone()).collect();
            let p = dir.path().join(format!("{name}.onnx"));
            onnx::save(&up, &p).unwrap();
            let got = match dagr_inject::runtime::run(Backend::Ort, &p, &feed, &outs) {
                Ok(g) => g,
                Err(e) => {
                    failures.push(format!("{name}: read as opset 16: {e}"));
                    continue;
                }
            };
            for (i, o) in outs.iter().enumerate() {
                let Some(want) = read("output", i) else { continue };
                let (w, g) = (value(&want), &got[o]);
                let same = match (&w, g) {
                    (Value::F32(a), Value::F32(b)) => {
                        let scale = a.iter().filter(|v| v.is_finite()).fold(1e-3f32, |m, v| m.max(v.abs()));
                        let close =
                            |x: &f32, y: &f32| x == y || (x - y).abs() <= 1e-4 * scale || (x.is_nan() && y.is_nan());
                        a.shape() == b.shape() && a.iter().zip(b.iter()).all(|(x, y)| close(x, y))
                    }
                    (a, b) => a == b,
                };
                if !same {
                    failures.push(format!("{name}: {o} differs from the expected output"));
                }
            }
            checked += 1;
        }
    }
    assert_no_failures(&failures);
    assert_eq!(checked, 117, "every test model checked");
}
