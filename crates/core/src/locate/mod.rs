//! Finding encoder outputs: resolving the names a user passes to `--encoders`, and ranking the
//! tensors of a model that look like encoder outputs (for `inspect`).
//!
//! Exporters record module structure differently (`conventions`: PyTorch's node names and
//! metadata, tf2onnx's op paths, jax2onnx's call sites, inlined local functions); all become a
//! module path, e.g. `["audio_encoder", "fc"]`, relative to the model's common root (Keras's
//! outer model, `/_wrapped/`). Where an exporter records nothing, the branches of the graph
//! inputs stand in (`branches`).

pub mod branches;
pub mod conventions;

pub use conventions::{convention_of, ScopeConvention, ScopeSource, CONVENTIONS};

use conventions::split_path;
use dagr_onnx::error::{Error, Result};
use dagr_onnx::{dtype, GraphIndex, Model, ValueFact};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

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
    /// The entry named a graph input (`audio`, or `audio_encoder` for the input `audio`); the
    /// tensor is where that input's branch meets the other inputs (`branches`).
    Branch { input: String },
}

impl Resolution {
    /// How the entry was resolved, for people.
    pub fn describe(&self) -> String {
        match self {
            Resolution::Explicit => "given as name=tensor".into(),
            Resolution::TensorName => "exact tensor name".into(),
            Resolution::Scope { scope, source } => format!("module scope '{scope}' ({})", source.describe()),
            Resolution::Branch { input } => format!(
                "the branch of input '{input}' where it meets the other inputs (the exporter recorded no module)"
            ),
        }
    }
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

/// Module scopes of every node, plus the set of distinct scope paths (all prefixes), relative
/// to the model's common root.
pub struct Scopes {
    pub node_scope: Vec<Option<(Vec<String>, ScopeSource)>>,
    /// scope path ("a.b") -> source
    pub paths: BTreeMap<String, ScopeSource>,
    /// The path every scoped node lies under, dropped from the paths above: Keras's outer model
    /// (`av`), Keras-on-torch's `_wrapped`; empty for most exports.
    pub root: Vec<String>,
}

impl Scopes {
    pub fn of(model: &Model, idx: &GraphIndex) -> Scopes {
        let conventions = conventions::applicable(model);
        let mut node_scope: Vec<_> = model
            .graph()
            .node
            .iter()
            .map(|n| conventions::node_scope(&conventions, n))
            .collect();
        number_calls(model, idx, &mut node_scope);
        let root = common_root(node_scope.iter().flatten().map(|(p, _)| p.as_slice()));
        for (p, _) in node_scope.iter_mut().flatten() {
            p.drain(..root.len());
        }
        inherit_scopes(model, idx, &mut node_scope);
        let mut paths = BTreeMap::new();
        for (p, src) in node_scope.iter().flatten() {
            for k in 1..=p.len() {
                paths.entry(p[..k].join(".")).or_insert(*src);
            }
        }
        Scopes {
            node_scope,
            paths,
            root,
        }
    }

    /// The scope path of node `i`, if its exporter recorded one.
    pub fn of_node(&self, i: usize) -> Option<&[String]> {
        self.node_scope.get(i)?.as_ref().map(|(p, _)| p.as_slice())
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

/// Nodes an exporter added without a path (tf2onnx's `Conv__508`, `LSTM__837`, `Transpose__61`,
/// which replace or wrap TensorFlow ops of a layer) take the innermost scope that encloses every
/// scoped node they exchange tensors with. Connected nodes without a path are taken together
/// (a Transpose, Conv, Transpose chain belongs where both its ends do); the graph's inputs and
/// outputs count as the root, so a helper between two modules, or at the model's edge, stays
/// outside both.
fn inherit_scopes(model: &Model, idx: &GraphIndex, node_scope: &mut [Option<(Vec<String>, ScopeSource)>]) {
    let g = model.graph();
    // The graph's data inputs (not initializers listed as inputs, as IR 3 lists them) and outputs.
    let weights: BTreeSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let graph_io: BTreeSet<&str> = g
        .input
        .iter()
        .chain(&g.output)
        .map(|v| v.name.as_str())
        .filter(|n| !weights.contains(n))
        .collect();
    let mut seen = vec![false; g.node.len()];
    for start in 0..g.node.len() {
        if seen[start] || node_scope[start].is_some() {
            continue;
        }
        // One component of unscoped nodes, and the paths of the scoped nodes around it.
        let (mut component, mut stack, mut around) = (Vec::new(), vec![start], Vec::new());
        let mut at_root = false;
        seen[start] = true;
        while let Some(i) = stack.pop() {
            component.push(i);
            let n = &g.node[i];
            at_root |= n.input.iter().chain(&n.output).any(|t| graph_io.contains(t.as_str()));
            // Producers of what it reads, consumers of what it writes (not the other readers of
            // its inputs: a constant several modules share does not join them).
            let readers = n.output.iter().flat_map(|t| idx.consumers_of(t).iter().copied());
            let near = n
                .input
                .iter()
                .filter_map(|t| idx.producer.get(t).map(|&(j, _)| j))
                .chain(readers);
            for j in near {
                match &node_scope[j] {
                    Some((p, src)) => around.push((p.clone(), *src)),
                    None if !seen[j] => {
                        seen[j] = true;
                        stack.push(j);
                    }
                    None => {}
                }
            }
        }
        if at_root || around.is_empty() {
            continue;
        }
        let mut common = around[0].0.clone();
        for (p, _) in &around[1..] {
            let k = common.iter().zip(p).take_while(|(a, b)| a == b).count();
            common.truncate(k);
        }
        if common.is_empty() {
            continue;
        }
        let src = around[0].1;
        for i in component {
            node_scope[i] = Some((common.clone(), src));
        }
    }
}

/// Paths read from a call stack name classes, so two towers of one class share `Pair.Tower`.
/// Each call of a class is a connected part of the graph (data edges between the nodes under
/// its path), numbered in the order the exporter wrote them: `Tower_1`, `Tower_2`, as jax2onnx
/// numbers the calls of an `@onnx_function`. Calls chained one into the next (the blocks of a
/// loop) stay one scope; constants and shape computations under the path go with the call that
/// reads them.
fn number_calls(model: &Model, idx: &GraphIndex, node_scope: &mut [Option<(Vec<String>, ScopeSource)>]) {
    let stacked = |s: &Option<(Vec<String>, ScopeSource)>| matches!(s, Some((_, ScopeSource::CallStack)));
    let deepest = node_scope
        .iter()
        .filter(|s| stacked(s))
        .flatten()
        .map(|(p, _)| p.len())
        .max();
    let Some(deepest) = deepest else { return };
    let g = model.graph();
    let data = idx.data_dependent(model);
    for d in 1..=deepest {
        let mut groups: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
        for (i, s) in node_scope.iter().enumerate() {
            if let (true, Some((p, _))) = (stacked(s), s) {
                if p.len() >= d {
                    groups.entry(p[..d].to_vec()).or_default().push(i);
                }
            }
        }
        for (key, members) in groups {
            let at: BTreeMap<usize, usize> = members.iter().enumerate().map(|(k, &i)| (i, k)).collect();
            let mut parent: Vec<usize> = (0..members.len()).collect();
            fn root(parent: &mut [usize], mut k: usize) -> usize {
                while parent[k] != k {
                    parent[k] = parent[parent[k]];
                    k = parent[k];
                }
                k
            }
            for (k, &i) in members.iter().enumerate() {
                // Data edges only: a constant two calls read, or a shape one call takes from
                // another's tensor (jax2onnx reads the batch size off any tensor that has it),
                // does not join them.
                for t in g.node[i].output.iter().filter(|t| data.contains(*t)) {
                    for c in idx.consumers_of(t) {
                        if let Some(&kc) = at.get(c) {
                            let (a, b) = (root(&mut parent, k), root(&mut parent, kc));
                            parent[a] = b;
                        }
                    }
                }
            }
            // The calls: parts that compute data, numbered by their first node.
            let mut call: BTreeMap<usize, usize> = BTreeMap::new();
            for (k, &i) in members.iter().enumerate() {
                if g.node[i].output.iter().any(|t| data.contains(t)) {
                    let r = root(&mut parent, k);
                    let next = call.len() + 1;
                    call.entry(r).or_insert(next);
                }
            }
            if call.len() < 2 {
                continue;
            }
            let mut number: Vec<Option<usize>> = (0..members.len())
                .map(|k| call.get(&root(&mut parent, k)).copied())
                .collect();
            // A part that computes no data (a constant, a shape) goes with the call reading it.
            for k in (0..members.len()).rev() {
                if number[k].is_none() {
                    number[k] = g.node[members[k]]
                        .output
                        .iter()
                        .flat_map(|t| idx.consumers_of(t))
                        .find_map(|c| at.get(c).and_then(|&kc| number[kc]));
                }
            }
            for (k, &i) in members.iter().enumerate() {
                if let (Some(n), Some((p, _))) = (number[k], &mut node_scope[i]) {
                    p[d - 1] = format!("{}_{n}", key[d - 1]);
                }
            }
        }
    }
}

/// The longest path that every non-empty path starts with, provided at least two distinct
/// modules lie directly below it (a root hiding a single module would hide the module).
fn common_root<'a>(paths: impl Iterator<Item = &'a [String]>) -> Vec<String> {
    let paths: Vec<&[String]> = paths.filter(|p| !p.is_empty()).collect();
    let mut root: Vec<String> = Vec::new();
    loop {
        let d = root.len();
        let here: BTreeSet<&String> = paths.iter().filter_map(|p| p.get(d)).collect();
        let below: BTreeSet<&String> = paths.iter().filter_map(|p| p.get(d + 1)).collect();
        let all_under = paths.iter().all(|p| p.len() > d);
        match (here.len(), all_under, below.len() >= 2) {
            (1, true, true) => root.push(paths[0][d].clone()),
            _ => return root,
        }
    }
}

/// A name compared loosely: lower case, letters and digits only (`audio_encoder`,
/// `AudioEncoder` and `audio-encoder` are one name).
pub(crate) fn loose(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
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
    let scopes = Scopes::of(model, idx);
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
    // Module scopes at the depth of the entry: equal to it, else starting with it, else the
    // same loosely (`audio_encoder` for jax2onnx's `AudioEncoder`, or a call `AudioEncoder_1`).
    let mut want = split_path(entry);
    if want.len() > scopes.root.len() && want[..scopes.root.len()] == scopes.root[..] {
        want.drain(..scopes.root.len());
    }
    let depth = want.len();
    let joined = want.join(".");
    let at_depth: Vec<(&String, &ScopeSource)> = scopes
        .paths
        .iter()
        .filter(|(p, _)| p.split('.').count() == depth)
        .collect();
    let tiers: [&dyn Fn(&str) -> bool; 4] = [
        &|p| p == joined,
        &|p| p.starts_with(&joined),
        &|p| loose(p) == loose(&joined),
        &|p| loose(p).starts_with(&loose(&joined)),
    ];
    let mut matches: Vec<_> = tiers
        .iter()
        .map(|t| at_depth.iter().filter(|(p, _)| t(p)).copied().collect::<Vec<_>>())
        .find(|m| !m.is_empty())
        .unwrap_or_default();
    if matches.is_empty() {
        // Else deeper scopes whose last components match (jax2onnx's classes lie at any depth
        // of the call stack: `Tower_1` under `Pair`).
        let tail = |p: &str| {
            let comps: Vec<&str> = p.split('.').collect();
            (comps.len() > depth).then(|| comps[comps.len() - depth..].join("."))
        };
        let deeper: Vec<(String, &String, &ScopeSource)> = scopes
            .paths
            .iter()
            .filter_map(|(p, src)| tail(p).map(|t| (t, p, src)))
            .collect();
        matches = tiers
            .iter()
            .map(|t| {
                deeper
                    .iter()
                    .filter(|(tl, _, _)| t(tl))
                    .map(|&(_, p, src)| (p, src))
                    .collect::<Vec<_>>()
            })
            .find(|m| !m.is_empty())
            .unwrap_or_default();
    }
    if matches.is_empty() {
        // No module: the branch of the graph input the entry names.
        if let Some(input) = branches::input_named(idx, entry) {
            return match branches::output_of(model, idx, &input) {
                Some(t) => Ok(encoder(idx, entry, &t, Resolution::Branch { input })),
                None => Err(Error::Encoder(format!(
                    "'{entry}' names the input '{input}', but its branch does not meet the other inputs in a float tensor of its own\n  hint: pass the encoder output as {entry}=TENSOR (`dagr-inject inspect MODEL` lists candidates)"
                ))),
            };
        }
        check_produced(idx, entry, entry)?;
    }
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
                        source: *src,
                    },
                )),
                0 => Err(Error::Encoder(format!(
                    "the module scope '{scope}' (matched by '{entry}') produces no tensor that is used outside it\n  hint: pass the tensor explicitly, e.g. `encoders` {entry}=TENSOR (the inspect report lists candidates)"
                ))),
                _ => Err(Error::Encoder(format!(
                    "the module scope '{scope}' (matched by '{entry}') has several outputs used outside it; pick one with {entry}=TENSOR:\n{}{}",
                    list(idx, &leaving),
                    if *src == ScopeSource::Metadata && by_jax2onnx(model) { JAX2ONNX_CALLS } else { "" }
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
    let classes = if by_jax2onnx(model) {
        "\n  hint: jax2onnx records the classes of modules, not their attribute names: name the class (`AudioEncoder`), or its call (`Tower_1`, `Tower_2`) where one class is called twice (exported with JAX2ONNX_STACKTRACE_DETAIL=full)"
    } else {
        ""
    };
    Error::Encoder(format!(
        "no tensor or module scope named '{entry}' in the model; close candidates:\n{}\n  hint: `dagr-inject inspect MODEL` ranks the tensors that look like encoder outputs{classes}",
        close.join("\n")
    ))
}

fn by_jax2onnx(model: &Model) -> bool {
    model.proto.producer_name == "jax2onnx"
}

/// With only `pkg.jax2onnx.callsite`, the calls of one class share a scope.
const JAX2ONNX_CALLS: &str = "\n  hint: jax2onnx's call sites name the class, not the call: exported with JAX2ONNX_STACKTRACE_DETAIL=full (beside JAX2ONNX_ENABLE_STACKTRACE_METADATA=1), each call of a class is a scope of its own (`Tower_1`, `Tower_2`)";

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
    let scopes = Scopes::of(model, idx);
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
            let unique = leaving.len() == 1;
            let pass_as = if unique { scope.clone() } else { format!("{scope}={t}") };
            let why = format!("leaves module '{scope}'");
            if let Some(c) = candidate(model, idx, &batch_dims, t, pass_as, Some(scope.clone()), why) {
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        // Nothing recorded: where each input's branch meets the others.
        let producer = &model.proto.producer_name;
        let who = if producer.is_empty() {
            "the exporter"
        } else {
            producer.as_str()
        };
        for b in branches::all(model, idx) {
            let why = format!(
                "where the branch of input '{}' meets the other inputs ({who} recorded no module scopes: found by structure)",
                b.input
            );
            if let Some(c) = candidate(model, idx, &batch_dims, &b.output, b.input.clone(), None, why) {
                out.push(c);
            }
        }
    }
    penalize_fusions(model, idx, &mut out);
    out.sort_by(|a, b| b.score.cmp(&a.score).then(a.tensor.cmp(&b.tensor)));
    out
}

/// A candidate computed from the inputs of two other candidates that share no input is where
/// the modalities are fused, not an encoder output.
fn penalize_fusions(model: &Model, idx: &GraphIndex, out: &mut [Candidate]) {
    let Some((_, of, _)) = branches::dependence(model, idx) else {
        return;
    };
    let masks: Vec<u64> = out.iter().map(|c| of.get(&c.tensor).copied().unwrap_or(0)).collect();
    for (i, c) in out.iter_mut().enumerate() {
        let m = masks[i];
        let inside: Vec<u64> = masks
            .iter()
            .enumerate()
            .filter(|&(j, &o)| j != i && o != 0 && o != m && o & !m == 0)
            .map(|(_, &o)| o)
            .collect();
        let fused = inside
            .iter()
            .enumerate()
            .any(|(a, x)| inside[a + 1..].iter().any(|y| x & y == 0));
        if fused {
            c.score -= 4;
            c.reasons
                .push("mixes the inputs of other candidates (a fusion, not an encoder)".into());
        }
    }
}

/// Score one tensor as an encoder output (None: rank below 2).
fn candidate(
    model: &Model,
    idx: &GraphIndex,
    batch_dims: &BTreeSet<String>,
    t: &str,
    pass_as: String,
    scope: Option<String>,
    why: String,
) -> Option<Candidate> {
    let g = model.graph();
    let f: ValueFact = idx.fact(t).cloned().unwrap_or_default();
    let mut score = 3;
    let mut reasons = vec![why];
    if let Some(s) = &f.shape {
        if s.len() < 2 {
            return None;
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
    // Through the Identity chains some exporters write (paddle2onnx).
    let consumers = branches::consumers_through_identity(model, idx, t);
    if consumers
        .iter()
        .any(|&c| matches!(g.node[c].op_type.as_str(), "Concat" | "Add" | "Mul"))
    {
        score += 2;
        reasons.push("feeds a fusion (Concat/Add/Mul)".into());
    }
    if consumers
        .iter()
        .any(|&c| matches!(g.node[c].op_type.as_str(), "Gemm" | "MatMul"))
    {
        score += 1;
        reasons.push("feeds a linear head".into());
    }
    if idx.graph_outputs.iter().any(|o| o == t) {
        score -= 4;
        reasons.push("is a graph output (likely logits)".into());
    }
    Some(Candidate {
        pass_as,
        tensor: t.to_string(),
        scope,
        dtype: dtype::name(f.dtype).into(),
        shape: f.shape_string(),
        score,
        reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagr_onnx::proto::{NodeProto, ValueInfoProto};

    /// A tf2onnx-style graph: `name` with a `/` has an op path, `Helper__n` has none.
    fn model(nodes: &[(&str, &[&str], &str)], inputs: &[&str], outputs: &[&str]) -> Model {
        let mut m = Model {
            proto: Default::default(),
            base_dir: Default::default(),
            source: None,
        };
        m.proto.producer_name = "tf2onnx".into();
        let g = m.graph_mut();
        for (name, ins, out) in nodes {
            let mut n = NodeProto::new();
            n.name = name.to_string();
            n.op_type = "Relu".into();
            n.input = ins.iter().map(|s| s.to_string()).collect();
            n.output = vec![out.to_string()];
            g.node.push(n);
        }
        let vi = |s: &&str| {
            let mut v = ValueInfoProto::new();
            v.name = s.to_string();
            v
        };
        g.input = inputs.iter().map(vi).collect();
        g.output = outputs.iter().map(vi).collect();
        // `k`, a weight, listed among the inputs too (as IR 3 does).
        g.input.push(vi(&"k"));
        let mut k = dagr_onnx::proto::TensorProto::new();
        k.name = "k".into();
        k.data_type = dagr_onnx::dtype::FLOAT;
        k.float_data = vec![1.0];
        g.initializer.push(k);
        m
    }

    fn scope(s: &Scopes, m: &Model, name: &str) -> Option<String> {
        let i = m.graph().node.iter().position(|n| n.name == name).unwrap();
        s.of_node(i).map(|p| p.join("."))
    }

    #[test]
    fn calls_of_one_class_are_told_apart_by_the_graph() {
        // jax2onnx with JAX2ONNX_STACKTRACE_DETAIL=full: two towers of one class (called on one
        // line), a Resnet inside each whose own nodes are split by its blocks, and the second
        // tower's initial state shaped from the first tower's output (a shape, not data).
        let stack = |frames: &[&str]| {
            frames
                .iter()
                .rev()
                .map(|f| format!("/u/model.py:1 ({f}.__call__)"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let nodes: &[(&str, &[&str], &str, &[&str])] = &[
            ("stem1", &["a"], "s1", &["Pair", "Tower", "Resnet"]),
            ("block1", &["s1"], "b1", &["Pair", "Tower", "Resnet", "Block"]),
            ("block1b", &["b1"], "b1b", &["Pair", "Tower", "Resnet", "Block"]),
            ("pool1", &["b1b"], "p1", &["Pair", "Tower", "Resnet"]),
            ("proj1", &["p1", "k"], "z1", &["Pair", "Tower"]),
            ("shape", &["z1"], "batch", &["Pair", "Tower"]),
            ("stem2", &["b", "batch"], "s2", &["Pair", "Tower", "Resnet"]),
            ("block2", &["s2"], "b2", &["Pair", "Tower", "Resnet", "Block"]),
            ("pool2", &["b2"], "p2", &["Pair", "Tower", "Resnet"]),
            ("proj2", &["p2", "k"], "z2", &["Pair", "Tower"]),
            ("head", &["z1", "z2"], "y", &["Pair"]),
        ];
        let mut m = model(&[], &["a", "b"], &["y"]);
        m.proto.producer_name = "jax2onnx".into();
        for (name, ins, out, frames) in nodes {
            let mut n = NodeProto::new();
            n.name = name.to_string();
            n.op_type = if *name == "shape" { "Shape" } else { "Add" }.into();
            n.input = ins.iter().map(|s| s.to_string()).collect();
            n.output = vec![out.to_string()];
            let mut p = dagr_onnx::proto::StringStringEntryProto::new();
            p.key = "pkg.jax2onnx.jax_traceback".into();
            p.value = stack(frames);
            n.metadata_props.push(p);
            m.graph_mut().node.push(n);
        }
        let idx = dagr_ops::index(&m).unwrap();
        let s = Scopes::of(&m, &idx);
        assert_eq!(s.root, ["Pair"]);
        assert_eq!(scope(&s, &m, "stem1").as_deref(), Some("Tower_1.Resnet"));
        assert_eq!(scope(&s, &m, "block1b").as_deref(), Some("Tower_1.Resnet.Block"));
        // The shape read off the first tower's output does not join the second to it.
        assert_eq!(scope(&s, &m, "stem2").as_deref(), Some("Tower_2.Resnet"));
        assert_eq!(scope(&s, &m, "pool2").as_deref(), Some("Tower_2.Resnet"));
        assert_eq!(s.leaving(&m, &idx, "Tower_1"), ["z1"]);
        let tensor = |entry: &str| resolve(&m, &idx, &s, entry).map(|e| e.tensor);
        assert_eq!(tensor("Tower_2").unwrap(), "z2");
        assert_eq!(tensor("tower_1").unwrap(), "z1");
        // A class below the root is found at any depth; one called twice is ambiguous.
        assert_eq!(tensor("Tower_2.Resnet").unwrap(), "p2");
        assert!(tensor("Resnet").unwrap_err().to_string().contains("ambiguous"));
    }

    #[test]
    fn nodes_without_a_path_take_the_scope_around_them() {
        let m = model(
            &[
                ("Edge__1", &["x"], "x_t"),
                ("m/enc/conv/Op", &["x_t", "k"], "a"),
                ("Helper__2", &["a", "k"], "b"),
                ("Helper__3", &["b"], "c"),
                ("m/enc/relu/Op", &["c"], "d"),
                ("Between__4", &["d"], "e"),
                ("m/other/fc/Op", &["e", "k"], "f"),
                ("m/other/fc/Op2", &["f"], "g"),
                ("m/head/fc/Op", &["g"], "y"),
                ("Lone__5", &["k"], "z"),
            ],
            &["x"],
            &["y", "z"],
        );
        let idx = dagr_ops::index(&m).unwrap();
        let s = Scopes::of(&m, &idx);
        // A chain inside one module joins it (at the deepest scope around it: enc).
        assert_eq!(scope(&s, &m, "Helper__2").as_deref(), Some("enc"));
        assert_eq!(scope(&s, &m, "Helper__3").as_deref(), Some("enc"));
        // At the graph's edge, or between two modules, a helper stays outside both; readers of
        // one shared input are not joined by it.
        assert_eq!(scope(&s, &m, "Edge__1"), None);
        assert_eq!(scope(&s, &m, "Between__4"), None);
        assert_eq!(scope(&s, &m, "Lone__5"), None);
        assert_eq!(s.leaving(&m, &idx, "enc"), ["d"]);
    }
}
