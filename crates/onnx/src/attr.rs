//! Reading a node's attributes by name.

use crate::proto::{AttributeProto, NodeProto};

/// An integer attribute.
pub fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}
pub fn attr_f(n: &NodeProto, name: &str) -> Option<f32> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}
pub fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone())
}
pub fn attr_s(n: &NodeProto, name: &str) -> Option<String> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| String::from_utf8_lossy(&a.s).into_owned())
}
pub fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// ONNX's schema is proto2, where a scalar attribute value is present even when it is zero
/// (`Constant(value_float=0)` needs its `f`); the proto3 code this crate uses omits zeros when
/// writing. Carry a typed attribute's zero value as an explicit field so that it is written.
/// Idempotent.
pub fn keep_zero(a: &mut AttributeProto) {
    use crate::proto::attribute_proto::AttributeType;
    let (number, zero) = match a.type_.enum_value() {
        Ok(AttributeType::FLOAT) if a.f == 0.0 => (2, Some(a.f.to_bits())),
        Ok(AttributeType::INT) if a.i == 0 => (3, None),
        Ok(AttributeType::STRING) if a.s.is_empty() => (4, None),
        _ => return,
    };
    let unknown = a.special_fields.mut_unknown_fields();
    if unknown.get(number).is_some() {
        return;
    }
    match (number, zero) {
        (2, Some(bits)) => unknown.add_fixed32(2, bits),
        (3, _) => unknown.add_varint(3, 0),
        _ => unknown.add_length_delimited(4, Vec::new()),
    }
}

/// `keep_zero` on every attribute of every node, in subgraphs and functions too.
pub fn keep_zeros(model: &mut crate::proto::ModelProto) {
    fn graph(g: &mut crate::proto::GraphProto) {
        for n in g.node.iter_mut() {
            node(n);
        }
    }
    fn node(n: &mut NodeProto) {
        for a in n.attribute.iter_mut() {
            keep_zero(a);
            if let Some(g) = a.g.as_mut() {
                graph(g);
            }
            for g in a.graphs.iter_mut() {
                graph(g);
            }
        }
    }
    if let Some(g) = model.graph.as_mut() {
        graph(g);
    }
    for f in model.functions.iter_mut() {
        for n in f.node.iter_mut() {
            node(n);
        }
    }
}
