//! ONNX local functions, once inlined (`dagr_onnx::functions`): every node of a body records the
//! call it came from (`dagr.function_call`, e.g. `AudioEncoder_1`, nested calls joined by `/`),
//! which is the module path. Any exporter that writes modules as functions (jax2onnx's
//! `@onnx_function`, onnxscript) is read this way.

use super::{meta, ScopeConvention, ScopeSource};
use dagr_onnx::functions::CALL_KEY;
use dagr_onnx::proto::NodeProto;

pub struct InlinedFunctions;

impl ScopeConvention for InlinedFunctions {
    fn describe(&self) -> &'static str {
        "ONNX local functions: the call each inlined node came from"
    }
    fn scope(&self, n: &NodeProto) -> Option<(Vec<String>, ScopeSource)> {
        let call = meta(n, CALL_KEY)?;
        Some((
            call.split('/').filter(|s| !s.is_empty()).map(String::from).collect(),
            ScopeSource::Function,
        ))
    }
}
