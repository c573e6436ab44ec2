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
