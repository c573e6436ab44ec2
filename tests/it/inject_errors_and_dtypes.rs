//! Library-level checks of `inject`: half-precision encoders, and inputs the CLI tests cannot
//! reach easily (fixed batch sizes, integer tensors).

use crate::common::*;
use dagr_inject::dagr::{self, reference, Config, Task};
use dagr_inject::onnx::{self, builder::attr_int, dtype, Dim, Model, ValueFact};
use dagr_inject::runtime::{Backend, Tensors, Value};
use ndarray::{ArrayD, Ix2};

/// A block whose encoder outputs are `Cast(input, to)`: half-precision embeddings.
fn half_block(to: i32) -> Model {
    let names = vec!["a".to_string(), "b".to_string()];
    let mut m = dagr::block::skeleton(&names, 6, 17).unwrap();
    let g = m.graph_mut();
    for n in g.node.iter_mut() {
        n.op_type = "Cast".into();
        n.attribute.push(attr_int("to", to as i64));
    }
    for vi in g.value_info.iter_mut() {
        let f = ValueFact::new(to, vec![Dim::Sym("batch".into()), Dim::Known(6)]);
        *vi = f.to_value_info(&vi.name);
    }
    m
}

#[test]
fn fp16_and_bf16_encoders_get_gradients_in_their_own_type() {
    let dir = tempfile::tempdir().unwrap();
    for (to, backends) in [(dtype::FLOAT16, &BACKENDS[..]), (dtype::BFLOAT16, &[Backend::Ort][..])] {
        let mut m = half_block(to);
        let cfg = Config {
            encoders: vec!["a=a/z".into(), "b=b/z".into()],
            ..Default::default()
        };
        let done = dagr::inject(&mut m, &cfg).unwrap();
        let p = dir.path().join(format!("half{to}.onnx"));
        onnx::save(&m, &p).unwrap();
        onnx_check(&p);
        let grad_vi = m.graph().output.iter().find(|o| o.name == "dagr/grad/a").unwrap();
        assert_eq!(grad_vi.type_.tensor_type().elem_type, to, "gradient must be cast back");
        let mut feed = Tensors::new();
        let mut zs = Vec::new();
        for (k, n) in ["a", "b"].iter().enumerate() {
            let data: Vec<f32> = (0..30).map(|i| (((i * 13 + k * 7) % 17) as f32 - 8.0) / 3.0).collect();
            let z = ArrayD::from_shape_vec(vec![5, 6], data).unwrap();
            // The reference sees what the graph sees: the half-precision value.
            let rounded = if to == dtype::FLOAT16 {
                z.mapv(|v: f32| half::f16::from_f32(v).to_f32() as f64)
            } else {
                z.mapv(|v: f32| half::bf16::from_f32(v).to_f32() as f64)
            };
            zs.push(rounded.into_dimensionality::<Ix2>().unwrap());
            feed.insert(n.to_string(), Value::F32(z));
        }
        let r = reference::compute(&zs, &cfg);
        let o = &done.record.outputs;
        for &backend in backends {
            let out = run(backend, &p, &feed, &[o.loss.clone(), o.grads[0].1.clone()]);
            let loss = f32_of(&out, &o.loss).iter().next().copied().unwrap() as f64;
            assert!(
                (loss - r.loss).abs() < 1e-5 * r.loss.abs(),
                "{} {to}: loss {loss} vs {}",
                backend.name(),
                r.loss
            );
            let g = f32_of(&out, &o.grads[0].1);
            let e = rel_err(&g, &r.grads[0].clone().into_dyn(), 1e-6);
            let tol = if to == dtype::FLOAT16 { 1e-3 } else { 8e-3 };
            assert!(e < tol, "{} {to}: gradient relative error {e}", backend.name());
        }
    }
}

#[test]
fn integer_encoders_and_mismatched_logits_are_refused() {
    // An int64 tensor named as an encoder.
    let names = vec!["a".to_string(), "b".to_string()];
    let mut m = dagr::block::skeleton(&names, 4, 17).unwrap();
    {
        let g = m.graph_mut();
        g.node[0].op_type = "Cast".into();
        g.node[0].attribute.push(attr_int("to", dtype::INT64 as i64));
        g.value_info[0] =
            ValueFact::new(dtype::INT64, vec![Dim::Sym("batch".into()), Dim::Known(4)]).to_value_info("a/z");
    }
    let cfg = Config {
        encoders: vec!["a=a/z".into(), "b=b/z".into()],
        ..Default::default()
    };
    let e = dagr::inject(&mut m.clone(), &cfg).unwrap_err().to_string();
    assert!(e.contains("int64") && e.contains("floating-point"), "{e}");

    // Logits with a batch of 3 against encoders with a batch of 4.
    let mut m = dagr::block::skeleton(&names, 4, 17).unwrap();
    {
        let g = m.graph_mut();
        for vi in g.input.iter_mut().chain(g.value_info.iter_mut()) {
            *vi = ValueFact::new(dtype::FLOAT, vec![Dim::Known(4), Dim::Known(4)]).to_value_info(&vi.name);
        }
        let t = onnx::tensor::f32_tensor("", &[3, 10], &[0.0; 30]);
        let mut c = onnx::proto::NodeProto::new();
        c.op_type = "Constant".into();
        c.output = vec!["logits".into()];
        c.attribute.push(onnx::builder::attr_tensor("value", t));
        g.node.push(c);
    }
    let cfg = Config {
        task: Task::CrossEntropy {
            logits: vec!["logits".into()],
            labels: "y".into(),
        },
        ..cfg
    };
    let e = dagr::inject(&mut m, &cfg).unwrap_err().to_string();
    assert!(e.contains("batch size 3") && e.contains("batch size 4"), "{e}");
}

/// A scalar or a 1-D tensor named as an encoder output is refused with its shape (it was a
/// panic).
#[test]
fn scalar_and_vector_encoder_outputs_are_refused() {
    for keep in [0i64, 1] {
        let names = vec!["a".to_string(), "b".to_string()];
        let mut m = dagr::block::skeleton(&names, 6, 17).unwrap();
        let mut b = onnx::builder::Builder::new(&m, "t/");
        // keepdims=0 over all axes: a scalar; over axis 1 only: a [batch] vector.
        let r = if keep == 0 {
            b.reduce("ReduceSum", "a/z", None, false, "s")
        } else {
            b.reduce("ReduceSum", "a/z", Some(&[1]), false, "s")
        };
        b.finish(&mut m);
        let cfg = Config {
            encoders: vec![format!("a={r}"), "b=b/z".into()],
            ..Default::default()
        };
        let e = dagr::inject(&mut m, &cfg).unwrap_err().to_string();
        assert!(e.contains("[batch, D]") && e.contains(&r), "{e}");
    }
}
