//! jax2onnx: node names are opaque (`node_Gemm_6`); with
//! `JAX2ONNX_ENABLE_STACKTRACE_METADATA=1` each node records the user frame that emitted it,
//! `pkg.jax2onnx.callsite` = `AudioEncoder.__call__:36`, whose class is the module. (Modules
//! exported with `@onnx_function` become local functions, read by `InlinedFunctions` once
//! inlined.)

use super::{meta, ScopeConvention, ScopeSource};
use dagr_onnx::proto::NodeProto;

pub struct Jax2OnnxCallsite;

impl ScopeConvention for Jax2OnnxCallsite {
    fn describe(&self) -> &'static str {
        "jax2onnx: pkg.jax2onnx.callsite metadata (Class.method:line)"
    }
    fn scope(&self, n: &NodeProto) -> Option<(Vec<String>, ScopeSource)> {
        let site = meta(n, "pkg.jax2onnx.callsite")?;
        let frame = site.rsplit_once(':').map_or(site, |(f, _)| f);
        // `Class.method` (a module's method) names a module; a plain function does not.
        let (class, _method) = frame.rsplit_once('.')?;
        let class = class.rsplit('.').next().unwrap_or(class);
        (!class.is_empty() && !class.starts_with('<')).then(|| (vec![class.to_string()], ScopeSource::Metadata))
    }
}
