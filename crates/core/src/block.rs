//! The standalone DAGR block: a model whose inputs are the embeddings, for frameworks that run
//! DAGR beside their own graph (`dagr-inject block`).

use dagr_onnx::builder::NameGen;
use dagr_onnx::error::{Error, Result};
use dagr_onnx::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
use dagr_onnx::{dtype, Dim, Model, ValueFact};

/// A model with one `[batch, dim]` float input per modality, each passed through an Identity
/// named `<name>/z` so that `inject` can name it as an encoder output.
pub fn skeleton(names: &[String], dim: i64, opset: i64) -> Result<Model> {
    let shapes: Vec<Vec<i64>> = names.iter().map(|_| vec![dim]).collect();
    skeleton_shaped(names, &shapes, opset)
}

/// Like `skeleton`, with per-modality non-batch shapes (`[batch, ..shape]`).
pub fn skeleton_shaped(names: &[String], shapes: &[Vec<i64>], opset: i64) -> Result<Model> {
    if opset < 13 {
        return Err(Error::Config(format!("`opset` must be 13 or newer, got {opset}")));
    }
    let mut g = GraphProto::new();
    g.name = "dagr_block".into();
    let mut seen = NameGen::default();
    for (n, shape) in names.iter().zip(shapes) {
        if seen.contains(n) {
            return Err(Error::Config(format!("the modality name '{n}' is given twice")));
        }
        seen.fresh(n);
        let mut dims = vec![Dim::Sym("batch".into())];
        dims.extend(shape.iter().map(|&d| Dim::Known(d)));
        let fact = ValueFact::new(dtype::FLOAT, dims);
        g.input.push(fact.to_value_info(n));
        let mut id = NodeProto::new();
        id.op_type = "Identity".into();
        id.name = format!("{n}/identity");
        id.input = vec![n.clone()];
        id.output = vec![format!("{n}/z")];
        g.node.push(id);
        g.value_info.push(fact.to_value_info(&format!("{n}/z")));
    }
    let mut p = ModelProto::new();
    p.ir_version = 8;
    p.producer_name = "dagr-inject".into();
    p.producer_version = env!("CARGO_PKG_VERSION").into();
    let mut o = OperatorSetIdProto::new();
    o.version = opset;
    p.opset_import.push(o);
    p.graph = protobuf::MessageField::some(g);
    Ok(Model {
        proto: p,
        base_dir: ".".into(),
        source: None,
    })
}

/// The DAGR block: `skeleton` with DAGR added on its inputs (`cfg.encoders` is set here, one per
/// name); what `dagr-inject block` writes.
pub fn build(names: &[String], dim: i64, opset: i64, cfg: &crate::Config) -> Result<(Model, crate::Injected)> {
    if dim < 1 {
        return Err(Error::Config(format!("`dim` must be positive, got {dim}")));
    }
    let mut model = skeleton(names, dim, opset)?;
    let cfg = crate::Config {
        encoders: names.iter().map(|n| format!("{n}={n}/z")).collect(),
        ..cfg.clone()
    };
    let done = crate::inject(&mut model, &cfg)?;
    Ok((model, done))
}
