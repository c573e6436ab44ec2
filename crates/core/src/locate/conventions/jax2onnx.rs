//! jax2onnx: node names are opaque (`node_Gemm_6`); with
//! `JAX2ONNX_ENABLE_STACKTRACE_METADATA=1` each node records the user frame that emitted it,
//! `pkg.jax2onnx.callsite` = `AudioEncoder.__call__:36`, whose class is the module. With
//! `JAX2ONNX_STACKTRACE_DETAIL=full` as well, `pkg.jax2onnx.jax_traceback` holds the whole call
//! stack (innermost first, `path:line (Class.method)`): the classes of the user's frames,
//! outermost first, are the module path (`Pair`, `Tower`, `ResNet18`, `BasicBlock`). Either
//! way a path names classes, not attributes, so two towers of one class share it until
//! `super::super::number_calls` tells their calls apart. (Modules exported with
//! `@onnx_function` become local functions, read by `InlinedFunctions` once inlined.)

use super::{meta, ScopeConvention, ScopeSource};
use dagr_onnx::proto::NodeProto;

pub struct Jax2OnnxCallsite;

impl ScopeConvention for Jax2OnnxCallsite {
    fn describe(&self) -> &'static str {
        "jax2onnx: pkg.jax2onnx.jax_traceback (the call stack) or pkg.jax2onnx.callsite (Class.method:line) metadata"
    }
    fn scope(&self, n: &NodeProto) -> Option<(Vec<String>, ScopeSource)> {
        if let Some(path) = meta(n, "pkg.jax2onnx.jax_traceback").and_then(stack_classes) {
            return Some((path, ScopeSource::CallStack));
        }
        let site = meta(n, "pkg.jax2onnx.callsite")?;
        let frame = site.rsplit_once(':').map_or(site, |(f, _)| f);
        class_of(frame).map(|class| (vec![class], ScopeSource::Metadata))
    }
}

/// The class of a `Class.method` qualified name (`f.<locals>.Class.method` too); `None` for a
/// plain function, a lambda or a local closure.
fn class_of(qualname: &str) -> Option<String> {
    let (class, _method) = qualname.rsplit_once('.')?;
    let class = class.rsplit('.').next().unwrap_or(class);
    (!class.is_empty() && !class.starts_with('<')).then(|| class.to_string())
}

/// Frames of JAX, Flax and jax2onnx itself (tracing, `nnx.scan`, Linen's method wrappers, the
/// plugins' patches) are not the user's modules; jax2onnx's bundled example models are.
fn library_frame(file: &str) -> bool {
    let file = file.replace('\\', "/");
    ["site-packages/", "dist-packages/"].iter().any(|root| {
        file.split(root).skip(1).any(|rest| {
            let package = rest.split('/').next().unwrap_or("");
            matches!(package, "jax" | "jaxlib" | "flax")
                || (package == "jax2onnx" && !rest.starts_with("jax2onnx/plugins/examples/"))
        })
    })
}

/// The module path a `pkg.jax2onnx.jax_traceback` records: the classes of the user's frames,
/// outermost first, a class calling its own methods (`Pair.__call__` -> `Pair.encode`) once.
fn stack_classes(trace: &str) -> Option<Vec<String>> {
    let mut path: Vec<String> = Vec::new();
    for line in trace.lines().rev() {
        let Some((file, rest)) = line.trim().rsplit_once(" (") else {
            continue;
        };
        let qualname = rest.trim_end_matches(')');
        let file = file.rsplit_once(':').map_or(file, |(f, _)| f);
        if library_frame(file) {
            continue;
        }
        if let Some(class) = class_of(qualname) {
            if path.last() != Some(&class) {
                path.push(class);
            }
        }
    }
    (!path.is_empty()).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_call_stack_gives_the_classes_outermost_first() {
        let trace = "/venv/lib/python3.11/site-packages/jax/_src/core.py:705 (Primitive.bind)\n\
            /venv/lib/python3.11/site-packages/jax2onnx/plugins/flax/nnx/conv.py:1579 (ConvPlugin._make_patch.<locals>.patched)\n\
            /home/u/model.py:78 (ResNet18.__call__)\n\
            /venv/lib/python3.11/site-packages/flax/linen/module.py:1200 (Module._call_wrapped_method)\n\
            /home/u/model.py:246 (Tower.__call__)\n\
            /home/u/model.py:256 (Pair.encode)\n\
            /home/u/model.py:259 (Pair.__call__)\n\
            /home/u/model.py:12 (make.<locals>.<lambda>)\n\
            /venv/lib/python3.11/site-packages/jax2onnx/converter/conversion_api.py:729 (_trace_to_jaxpr.<locals>._wrapped)";
        assert_eq!(stack_classes(trace).unwrap(), ["Pair", "Tower", "ResNet18"]);
        // jax2onnx's own example models are user code.
        let example =
            "/venv/lib/python3.11/site-packages/jax2onnx/plugins/examples/nnx/vit.py:40 (PatchEmbedding.__call__)";
        assert_eq!(stack_classes(example).unwrap(), ["PatchEmbedding"]);
        assert_eq!(
            stack_classes("/venv/site-packages/jax/_src/core.py:1 (Primitive.bind)"),
            None
        );
    }
}
