//! What a single node's attributes and optional outputs say about how it runs, asked by
//! several layers (autodiff, the training graph, export): one definition each.

use crate::proto::NodeProto;

/// A BatchNormalization in training mode: the `training_mode` attribute (opset 14+), or the
/// running-statistics outputs that only training mode has (opsets 9 to 13 have no attribute).
pub fn is_training_batchnorm(n: &NodeProto) -> bool {
    n.op_type == "BatchNormalization"
        && n.domain.is_empty()
        && (crate::attr::attr_i(n, "training_mode") == Some(1) || n.output.iter().skip(1).any(|o| !o.is_empty()))
}
