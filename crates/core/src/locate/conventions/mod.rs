//! How each exporter records the module a node belongs to: one `ScopeConvention` per exporter
//! and record, one file per exporter. All become a module path, e.g. `["audio_encoder", "fc"]`.
//! Where an exporter records nothing (paddle2onnx), encoders are found by structure instead
//! (`super::branches`).

mod functions;
mod jax2onnx;
mod tf2onnx;
mod torch;

pub use functions::InlinedFunctions;
pub use jax2onnx::Jax2OnnxCallsite;
pub use tf2onnx::Tf2OnnxNames;
pub use torch::{TorchLegacyNames, TorchNameScopes, TorchNamespace};

use dagr_onnx::proto::NodeProto;
use dagr_onnx::Model;
use serde::Serialize;

/// Where a node's module path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeSource {
    /// Node metadata (`pkg.torch.onnx.name_scopes`, `namespace`, `pkg.jax2onnx.callsite`).
    Metadata,
    /// Node names (`/module/sub/Op`, tf2onnx's `model/module/sub/Op`).
    NodeName,
    /// The ONNX local function the node was inlined from (its call node's name).
    Function,
    /// A recorded call stack (jax2onnx's `pkg.jax2onnx.jax_traceback`): the classes of the
    /// frames, so the calls of one class are told apart by the graph (`Tower_1`, `Tower_2`).
    CallStack,
}

impl ScopeSource {
    pub fn describe(&self) -> &'static str {
        match self {
            ScopeSource::Metadata => "node metadata",
            ScopeSource::NodeName => "node names",
            ScopeSource::Function => "an inlined local function",
            ScopeSource::CallStack => "the recorded call stack",
        }
    }
}

/// How one exporter records the module a node belongs to: the extension point for exporter
/// naming conventions (one implementation per convention, listed in `CONVENTIONS`).
pub trait ScopeConvention: Sync {
    /// The exporter and the record read, for people ("PyTorch dynamo: name_scopes metadata").
    fn describe(&self) -> &'static str;
    /// Whether the convention can hold for this model (an exporter that writes its name in
    /// `producer_name` is recognized by it; node names alone are ambiguous).
    fn applies(&self, _model: &Model) -> bool {
        true
    }
    /// The module path of `n` (e.g. `["audio_encoder", "fc"]`), if this convention recorded one.
    fn scope(&self, n: &NodeProto) -> Option<(Vec<String>, ScopeSource)>;
    /// Whether the initializer `name` is a constant the exporter computed (folded) rather than
    /// a parameter of the source model. Exporters that record nothing about it say `false`.
    fn is_folded_constant(&self, _name: &str) -> bool {
        false
    }
}

/// The conventions tried, in order; a node takes the path of the first that recognizes it.
pub static CONVENTIONS: &[&dyn ScopeConvention] = &[
    &InlinedFunctions,
    &TorchNameScopes,
    &TorchNamespace,
    &TorchLegacyNames,
    &Tf2OnnxNames,
    &Jax2OnnxCallsite,
];

/// The conventions that can hold for `model`.
pub fn applicable(model: &Model) -> Vec<&'static dyn ScopeConvention> {
    CONVENTIONS.iter().copied().filter(|c| c.applies(model)).collect()
}

/// The convention of the exporter that wrote `model`: the first that recognizes one of its
/// nodes.
pub fn convention_of(model: &Model) -> Option<&'static dyn ScopeConvention> {
    applicable(model)
        .into_iter()
        .find(|c| model.graph().node.iter().any(|n| c.scope(n).is_some()))
}

/// The module path of a node under the first of `conventions` that recorded one.
pub fn node_scope(conventions: &[&dyn ScopeConvention], n: &NodeProto) -> Option<(Vec<String>, ScopeSource)> {
    conventions.iter().find_map(|c| c.scope(n))
}

pub(crate) fn meta<'a>(n: &'a NodeProto, key: &str) -> Option<&'a str> {
    n.metadata_props.iter().find(|p| p.key == key).map(|p| p.value.as_str())
}

pub(crate) fn split_path(module: &str) -> Vec<String> {
    module
        .split(['.', '/'])
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}
