//! Finding encoder outputs: resolving the names a user passes to `--encoders`, and ranking the
//! tensors of a model that look like encoder outputs (for `inspect`).
//!
//! Exporters record module structure differently: PyTorch's legacy exporter names nodes
//! `/audio_encoder/fc/Gemm`; its dynamo exporter leaves node names opaque and writes the module
//! path into node `metadata_props` (`pkg.torch.onnx.name_scopes`, `namespace`). Each convention
//! is one `ScopeConvention`; all become a module path here, e.g. `["audio_encoder", "fc"]`.

use dagr_onnx::error::{Error, Result};
use dagr_onnx::proto::NodeProto;
use dagr_onnx::{dtype, GraphIndex, Model, ValueFact};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Where a node's module path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeSource {
    /// `pkg.torch.onnx.name_scopes` or `namespace` metadata (dynamo exporter).
    Metadata,
    /// A `/module/sub/Op` node name (legacy exporter).
    NodeName,
}

/// How one exporter records the module a node belongs to: the extension point for exporter
/// naming conventions (one implementation per convention, listed in `CONVENTIONS`).
pub trait ScopeConvention: Sync {
    /// The exporter and the record read, for people ("PyTorch dynamo: name_scopes metadata").
    fn describe(&self) -> &'static str;
    /// The module path of `n` (e.g. `["audio_encoder", "fc"]`), if this convention recorded one.
    fn scope(&self, n: &NodeProto) -> Option<(Vec<String>, ScopeSource)>;
    /// Whether the initializer `name` is a constant the exporter computed (folded) rather than
    /// a parameter of the source model. Exporters that record nothing about it say `false`.
    fn is_folded_constant(&self, _name: &str) -> bool {
        false
    }
}

fn meta<'a>(n: &'a NodeProto, key: &str) -> Option<&'a str> {
    n.metadata_props.iter().find(|p| p.key == key).map(|p| p.value.as_str())
}

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

/// PyTorch's legacy (TorchScript) exporter: node names `/audio_encoder/fc/Gemm`.
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

/// The conventions tried, in order; a node takes the path of the first that recognizes it.
pub static CONVENTIONS: &[&dyn ScopeConvention] = &[&TorchNameScopes, &TorchNamespace, &TorchLegacyNames];

/// The convention of the exporter that wrote `model`: the first that recognizes one of its
/// nodes.
pub fn convention_of(model: &Model) -> Option<&'static dyn ScopeConvention> {
    CONVENTIONS
        .iter()
        .copied()
        .find(|c| model.graph().node.iter().any(|n| c.scope(n).is_some()))
}

/// The module path of a node, if its exporter recorded one (see `CONVENTIONS`).
pub fn node_scope(n: &NodeProto) -> Option<(Vec<String>, ScopeSource)> {
    CONVENTIONS.iter().find_map(|c| c.scope(n))
}

fn split_path(module: &str) -> Vec<String> {
    module
        .split(['.', '/'])
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
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

/// How an `--encoders` entry was resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resolution {
    /// `name=tensor`
    Explicit,
    /// The entry is the exact name of a tensor produced by a node.
    TensorName,
    /// The entry matched a module scope; the tensor is the one leaving it.
    Scope { scope: String, source: ScopeSource },
}

/// One resolved encoder.
#[derive(Debug, Clone, Serialize)]
pub struct Encoder {
    /// The modality name used in output names (`dagr/grad/<modality>`).
    pub modality: String,
    pub tensor: String,
    pub resolution: Resolution,
    pub dtype: String,
    pub shape: String,
}

/// Module scopes of every node, plus the set of distinct scope paths (all prefixes).
pub struct Scopes {
    pub node_scope: Vec<Option<(Vec<String>, ScopeSource)>>,
    /// scope path ("a.b") -> source
    pub paths: BTreeMap<String, ScopeSource>,
}

impl Scopes {
    pub fn of(model: &Model) -> Scopes {
        let node_scope: Vec<_> = model.graph().node.iter().map(node_scope).collect();
        let mut paths = BTreeMap::new();
        for (p, src) in node_scope.iter().flatten() {
            for k in 1..=p.len() {
                paths.entry(p[..k].join(".")).or_insert(*src);
            }
        }
        Scopes { node_scope, paths }
    }

    fn in_scope(&self, node: usize, scope: &[String]) -> bool {
        matches!(&self.node_scope[node], Some((p, _)) if p.len() >= scope.len() && p[..scope.len()] == *scope)
    }

    /// Tensors produced inside `scope` and used outside it (by another node or as graph output).
    pub fn leaving(&self, model: &Model, idx: &GraphIndex, scope: &str) -> Vec<String> {
        let comps = split_path(scope);
        let g = model.graph();
        // Constants and shape-only values that the exporter labels with the scope (and reuses
        // elsewhere) are not what the module computes.
        let data = idx.data_dependent(model);
        let mut out = Vec::new();
        for &i in &idx.topo {
            if !self.in_scope(i, &comps) {
                continue;
            }
            for o in &g.node[i].output {
                if o.is_empty() {
                    continue;
                }
                let used_outside = idx.consumers_of(o).iter().any(|&c| !self.in_scope(c, &comps))
                    || idx.graph_outputs.iter().any(|x| x == o);
                let floating = idx
                    .fact(o)
                    .map(|f| f.dtype == 0 || dtype::is_float(f.dtype))
                    .unwrap_or(true);
                if used_outside && floating && data.contains(o) {
                    out.push(o.clone());
                }
            }
        }
        out
    }
}

fn describe(idx: &GraphIndex, t: &str) -> (String, String) {
    let f = idx.fact(t).cloned().unwrap_or_default();
    (dtype::name(f.dtype).to_string(), f.shape_string())
}

fn encoder(idx: &GraphIndex, modality: &str, tensor: &str, resolution: Resolution) -> Encoder {
    let (dtype, shape) = describe(idx, tensor);
    Encoder {
        modality: modality.to_string(),
        tensor: tensor.to_string(),
        resolution,
        dtype,
        shape,
    }
}

/// A modality name usable in output names: the last path component, without punctuation.
fn modality_from_tensor(t: &str) -> String {
    let base = t.trim_start_matches('/').replace(['/', '.', ':', ' '], "_");
    if base.is_empty() {
        "encoder".into()
    } else {
        base
    }
}

/// Resolve every `--encoders` entry, in the order the user gave them.
pub fn resolve_all(model: &Model, idx: &GraphIndex, entries: &[String]) -> Result<Vec<Encoder>> {
    let scopes = Scopes::of(model);
    let mut out: Vec<Encoder> = Vec::new();
    for e in entries {
        let enc = resolve(model, idx, &scopes, e)?;
        if let Some(prev) = out.iter().find(|p| p.tensor == enc.tensor) {
            return Err(Error::Encoder(format!(
                "'{}' and '{}' both resolve to the tensor '{}'; each modality needs its own encoder output",
                prev.modality, enc.modality, enc.tensor
            )));
        }
        if let Some(prev) = out.iter().find(|p| p.modality == enc.modality) {
            return Err(Error::Encoder(format!(
                "two encoders are named '{}' ({} and {}); give them distinct names with name=tensor",
                enc.modality, prev.tensor, enc.tensor
            )));
        }
        out.push(enc);
    }
    Ok(out)
}

/// Resolve one `--encoders` entry: `name=tensor`, an exact tensor name, or a module scope.
pub fn resolve(model: &Model, idx: &GraphIndex, scopes: &Scopes, entry: &str) -> Result<Encoder> {
    let entry = entry.trim();
    if entry.is_empty() {
        return Err(Error::Encoder(
            "an empty encoder name was given; pass `encoders` a,b".into(),
        ));
    }
    if let Some((name, tensor)) = entry.split_once('=') {
        let (name, tensor) = (name.trim(), tensor.trim());
        if name.is_empty() {
            return Err(Error::Encoder(format!(
                "'{entry}': the modality name before '=' is empty"
            )));
        }
        check_produced(idx, tensor, entry)?;
        if !idx.producer.contains_key(tensor) {
            return Err(not_found(model, idx, scopes, tensor));
        }
        return Ok(encoder(idx, name, tensor, Resolution::Explicit));
    }
    if idx.producer.contains_key(entry) {
        return Ok(encoder(
            idx,
            &modality_from_tensor(entry),
            entry,
            Resolution::TensorName,
        ));
    }
    // Module scopes: the same depth as the entry, equal to it or starting with it.
    let want = split_path(entry);
    let depth = want.len();
    let joined = want.join(".");
    let at_depth: Vec<(&String, &ScopeSource)> = scopes
        .paths
        .iter()
        .filter(|(p, _)| p.split('.').count() == depth)
        .collect();
    let exact: Vec<_> = at_depth.iter().filter(|(p, _)| **p == joined).collect();
    let matches: Vec<_> = if exact.is_empty() {
        at_depth.iter().filter(|(p, _)| p.starts_with(&joined)).collect()
    } else {
        exact
    };
    match matches.len() {
        0 => {
            check_produced(idx, entry, entry)?;
            Err(not_found(model, idx, scopes, entry))
        }
        1 => {
            let (scope, src) = matches[0];
            let leaving = scopes.leaving(model, idx, scope);
            match leaving.len() {
                1 => Ok(encoder(
                    idx,
                    entry,
                    &leaving[0],
                    Resolution::Scope {
                        scope: (*scope).clone(),
                        source: **src,
                    },
                )),
                0 => Err(Error::Encoder(format!(
                    "the module scope '{scope}' (matched by '{entry}') produces no tensor that is used outside it\n  hint: pass the tensor explicitly, e.g. `encoders` {entry}=TENSOR (the inspect report lists candidates)"
                ))),
                _ => Err(Error::Encoder(format!(
                    "the module scope '{scope}' (matched by '{entry}') has several outputs used outside it; pick one with {entry}=TENSOR:\n{}",
                    list(idx, &leaving)
                ))),
            }
        }
        _ => {
            Err(Error::Encoder(format!(
            "'{entry}' is ambiguous: it matches the module scopes {}\n  hint: pass the full scope name, or name=TENSOR",
            matches.iter().map(|(p, _)| format!("'{p}'")).collect::<Vec<_>>().join(", ")
        )))
        }
    }
}

fn check_produced(idx: &GraphIndex, tensor: &str, entry: &str) -> Result<()> {
    if idx.initializers.contains(tensor) {
        return Err(Error::Encoder(format!(
            "'{entry}': '{tensor}' is an initializer (a weight), not an encoder output\n  hint: name the tensor an encoder produces; `dagr-inject inspect MODEL` lists candidates"
        )));
    }
    if idx.is_graph_input(tensor) {
        return Err(Error::Encoder(format!(
            "'{entry}': '{tensor}' is a graph input, not an encoder output\n  hint: DAGR regularizes what an encoder produces; `dagr-inject inspect MODEL` lists candidates"
        )));
    }
    Ok(())
}

fn list(idx: &GraphIndex, tensors: &[String]) -> String {
    tensors
        .iter()
        .map(|t| {
            let (d, s) = describe(idx, t);
            format!("    {t}  {d}{s}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn not_found(model: &Model, idx: &GraphIndex, scopes: &Scopes, entry: &str) -> Error {
    let lower = entry.to_lowercase();
    let mut scored: Vec<(usize, String, String)> = Vec::new();
    let mut seen = BTreeSet::new();
    for p in scopes.paths.keys() {
        if seen.insert(p.clone()) {
            let d = strsim::levenshtein(&lower, &p.to_lowercase());
            let sub = p.to_lowercase().contains(&lower) || lower.contains(&p.to_lowercase());
            let leaving = scopes.leaving(model, idx, p);
            let shape = leaving.first().map(|t| describe(idx, t).1).unwrap_or_default();
            scored.push((if sub { 0 } else { d }, format!("scope {p}"), shape));
        }
    }
    for t in idx.producer.keys() {
        if seen.insert(t.clone()) {
            let d = strsim::levenshtein(&lower, &t.to_lowercase());
            let sub = t.to_lowercase().contains(&lower);
            scored.push((
                if sub { d.min(3) } else { d },
                format!("tensor {t}"),
                describe(idx, t).1,
            ));
        }
    }
    scored.sort();
    let close: Vec<String> = scored.iter().take(6).map(|(_, n, s)| format!("    {n}  {s}")).collect();
    Error::Encoder(format!(
        "no tensor or module scope named '{entry}' in the model; close candidates:\n{}\n  hint: `dagr-inject inspect MODEL` ranks the tensors that look like encoder outputs",
        close.join("\n")
    ))
}

/// A tensor that looks like an encoder output, with the reasons for its score.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// What to pass to `--encoders` for this tensor.
    pub pass_as: String,
    pub tensor: String,
    pub scope: Option<String>,
    pub dtype: String,
    pub shape: String,
    pub score: i32,
    pub reasons: Vec<String>,
}

/// Rank tensors that look like per-sample encoder outputs: float tensors of rank >= 2 whose first
/// dim is the batch dim of the inputs, leaving a top-level module, feeding a fusion or a head.
pub fn candidates(model: &Model, idx: &GraphIndex) -> Vec<Candidate> {
    let scopes = Scopes::of(model);
    let g = model.graph();
    let batch_dims: BTreeSet<String> = idx
        .user_inputs()
        .iter()
        .filter_map(|i| {
            idx.fact(i)
                .and_then(|f| f.shape.as_ref())
                .and_then(|s| s.first())
                .map(|d| d.to_string())
        })
        .collect();
    let mut out = Vec::new();
    let top: Vec<String> = scopes.paths.keys().filter(|p| !p.contains('.')).cloned().collect();
    for scope in &top {
        let leaving = scopes.leaving(model, idx, scope);
        for t in &leaving {
            let f: ValueFact = idx.fact(t).cloned().unwrap_or_default();
            let mut score = 3;
            let mut reasons = vec![format!("leaves module '{scope}'")];
            if let Some(s) = &f.shape {
                if s.len() < 2 {
                    continue;
                }
                if batch_dims.contains(&s[0].to_string()) {
                    score += 2;
                    reasons.push("batch-major".into());
                }
                if s.len() == 2 {
                    score += 1;
                    reasons.push("[batch, D]".into());
                } else {
                    reasons.push(format!("rank {} (reduce with `reduce`)", s.len()));
                }
            }
            let fused = idx
                .consumers_of(t)
                .iter()
                .any(|&c| matches!(g.node[c].op_type.as_str(), "Concat" | "Add" | "Mul"));
            if fused {
                score += 2;
                reasons.push("feeds a fusion (Concat/Add/Mul)".into());
            }
            let heads = idx
                .consumers_of(t)
                .iter()
                .filter(|&&c| matches!(g.node[c].op_type.as_str(), "Gemm" | "MatMul"))
                .count();
            if heads > 0 {
                score += 1;
                reasons.push("feeds a linear head".into());
            }
            if idx.graph_outputs.contains(t) {
                score -= 4;
                reasons.push("is a graph output (likely logits)".into());
            }
            let unique = leaving.len() == 1;
            out.push(Candidate {
                pass_as: if unique { scope.clone() } else { format!("{scope}={t}") },
                tensor: t.clone(),
                scope: Some(scope.clone()),
                dtype: dtype::name(f.dtype).into(),
                shape: f.shape_string(),
                score,
                reasons,
            });
        }
    }
    out.sort_by(|a, b| b.score.cmp(&a.score).then(a.tensor.cmp(&b.tensor)));
    out
}
