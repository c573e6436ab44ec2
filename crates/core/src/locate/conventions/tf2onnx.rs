//! tf2onnx (its `from_keras`, its command line on a SavedModel, and Keras 3's
//! `model.export(format="onnx")`, which runs it): nodes are named by TensorFlow op path without a
//! leading `/` (`av_1/audio_encoder_1/fc_1/MatMul`, or under `StatefulPartitionedCall/` from a
//! SavedModel), each name scope with the `_<n>` suffix TensorFlow adds to make scopes unique;
//! tf2onnx's own helper nodes (`Transpose__61`, `const_fold_opt__29`) have no path.

use super::{ScopeConvention, ScopeSource};
use dagr_onnx::proto::NodeProto;
use dagr_onnx::Model;

pub struct Tf2OnnxNames;

/// The graph-function wrappers a SavedModel's signature adds above the model's own scopes.
const WRAPPERS: &[&str] = &["StatefulPartitionedCall", "PartitionedCall"];

impl ScopeConvention for Tf2OnnxNames {
    fn describe(&self) -> &'static str {
        "tf2onnx: TensorFlow op paths in node names"
    }
    fn applies(&self, model: &Model) -> bool {
        model.proto.producer_name == "tf2onnx"
    }
    fn scope(&self, n: &NodeProto) -> Option<(Vec<String>, ScopeSource)> {
        if n.name.starts_with('/') || !n.name.contains('/') {
            return None;
        }
        let mut comps: Vec<&str> = n.name.split('/').filter(|s| !s.is_empty()).collect();
        comps.pop();
        if let Some(first) = comps.first_mut() {
            *first = after_function_prefix(first);
        }
        let path: Vec<String> = comps
            .into_iter()
            .skip_while(|c| WRAPPERS.contains(c))
            .map(|c| strip_unique_suffix(c).to_string())
            .collect();
        Some((path, ScopeSource::NodeName))
    }
}

/// A node tf2onnx inlined from a TensorFlow function (a `while` loop's condition or body, as
/// Keras's GRU and LSTM write them) is named by the frozen function's name, `_`, then its own op
/// path: `pair_1_gru_1_while_cond_frozen_4010_pair_1/gru_1/while/Less` -> `pair_1/gru_1/...`.
fn after_function_prefix(first: &str) -> &str {
    let Some(at) = first.rfind("_frozen_") else {
        return first;
    };
    let rest = &first[at + "_frozen_".len()..];
    match rest.split_once('_') {
        Some((n, path)) if !n.is_empty() && !path.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => path,
        _ => first,
    }
}

/// `audio_encoder_1` -> `audio_encoder`: TensorFlow's name-scope uniquifier.
fn strip_unique_suffix(c: &str) -> &str {
    match c.rsplit_once('_') {
        Some((base, n)) if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_drop_wrappers_ops_and_suffixes() {
        let mut n = NodeProto::new();
        n.name = "StatefulPartitionedCall/av_1/audio_encoder_1/fc_1/BiasAdd__10".into();
        let (p, _) = Tf2OnnxNames.scope(&n).unwrap();
        assert_eq!(p, ["av", "audio_encoder", "fc"]);
        n.name = "pair_1_enc_1_gru_1_while_cond_frozen_4010_pair_1/enc_1/gru_1/while/Less_1".into();
        let (p, _) = Tf2OnnxNames.scope(&n).unwrap();
        assert_eq!(p, ["pair", "enc", "gru", "while"]);
        assert_eq!(after_function_prefix("a_frozen_"), "a_frozen_");
        assert_eq!(after_function_prefix("a_frozen_x_b"), "a_frozen_x_b");
        n.name = "Transpose__61".into();
        assert!(Tf2OnnxNames.scope(&n).is_none());
        assert_eq!(strip_unique_suffix("conv_"), "conv_");
        assert_eq!(strip_unique_suffix("_1"), "_1");
    }
}
