//! PyTorch's exporters: dynamo (`pkg.torch.onnx.name_scopes` or, older, `namespace` metadata)
//! and legacy TorchScript (`/module/sub/Op` node names).

use super::{meta, split_path, ScopeConvention, ScopeSource};
use dagr_onnx::proto::NodeProto;

/// PyTorch's dynamo exporter: `pkg.torch.onnx.name_scopes`, a Python list whose last-but-one
/// entry is the module path (`['', 'audio_encoder', 'audio_encoder.fc', 'linear']`).
pub struct TorchNameScopes;

impl ScopeConvention for TorchNameScopes {
    fn describe(&self) -> &'static str {
        "PyTorch dynamo exporter: pkg.torch.onnx.name_scopes metadata"
    }
    fn scope(&self, n: &NodeProto) -> Option<(Vec<String>, ScopeSource)> {
        let items = parse_py_str_list(meta(n, "pkg.torch.onnx.name_scopes")?);
        let module = items.len().checked_sub(2).and_then(|i| items.get(i))?;
        Some((split_path(module), ScopeSource::Metadata))
    }
    fn is_folded_constant(&self, name: &str) -> bool {
        dynamo_folded(name)
    }
}

/// The dynamo exporter names parameters by their module path (`audio_encoder.fc.weight`, and
/// `<conv>.weight_bias` for a BatchNorm it folded into a convolution) and the constants its
/// optimizer folds by the value they replace (`val_83`, `embedding_2`, `clamp_2`): no dot.
fn dynamo_folded(name: &str) -> bool {
    !name.contains('.')
}

/// PyTorch's dynamo exporter, older form: `namespace` metadata,
/// `": __main__.M/audio_encoder: __main__.Enc/audio_encoder.fc: torch.nn.Linear/linear: aten.linear"`.
pub struct TorchNamespace;

impl ScopeConvention for TorchNamespace {
    fn describe(&self) -> &'static str {
        "PyTorch dynamo exporter: namespace metadata"
    }
    fn scope(&self, n: &NodeProto) -> Option<(Vec<String>, ScopeSource)> {
        let parts: Vec<&str> = meta(n, "namespace")?.split('/').collect();
        let part = parts.len().checked_sub(2).and_then(|i| parts.get(i))?;
        let module = part.split(':').next().unwrap_or("").trim();
        Some((split_path(module), ScopeSource::Metadata))
    }
    fn is_folded_constant(&self, name: &str) -> bool {
        dynamo_folded(name)
    }
}

/// PyTorch's legacy (TorchScript) exporter: node names `/audio_encoder/fc/Gemm`. Keras 3 on
/// its torch backend exports through it, under `/_wrapped/`, which the common root drops.
pub struct TorchLegacyNames;

impl ScopeConvention for TorchLegacyNames {
    fn describe(&self) -> &'static str {
        "PyTorch legacy exporter: /module/sub/Op node names"
    }
    fn scope(&self, n: &NodeProto) -> Option<(Vec<String>, ScopeSource)> {
        if !n.name.starts_with('/') {
            return None;
        }
        let mut comps: Vec<String> = n.name.split('/').filter(|s| !s.is_empty()).map(String::from).collect();
        comps.pop();
        Some((comps, ScopeSource::NodeName))
    }
}

/// Parse a Python list of strings as `repr` writes it: `['', 'a', "b'c"]`.
fn parse_py_str_list(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' || c == '"' {
            let q = c;
            let mut cur = String::new();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == q {
                    break;
                } else {
                    cur.push(c);
                }
            }
            out.push(cur);
        }
    }
    out
}
