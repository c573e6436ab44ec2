//! Lossless loading and saving of ONNX models.
//!
//! The model is kept as the protobuf message itself (`onnx-protobuf` keeps unknown fields), so a
//! load followed by a save changes nothing. Weights stored as external data are never read into
//! memory here: only their locations are checked, and on saving to another directory the data
//! files are copied beside the new model so that no reference dangles.

use crate::error::{Error, Result};
use crate::proto::{tensor_proto::DataLocation, ModelProto, TensorProto};
use protobuf::Message;
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// A model and the directory its external data is relative to.
#[derive(Debug, Clone)]
pub struct Model {
    pub proto: ModelProto,
    /// Directory that external-data locations are resolved against.
    pub base_dir: PathBuf,
    /// The file it was loaded from, if any (used to refuse overwriting the input).
    pub source: Option<PathBuf>,
}

impl Model {
    pub fn graph(&self) -> &crate::proto::GraphProto {
        self.proto.graph.as_ref().expect("validated on load: model has a graph")
    }

    pub fn graph_mut(&mut self) -> &mut crate::proto::GraphProto {
        self.proto.graph.mut_or_insert_default()
    }

    /// The default-domain opset ("" or "ai.onnx").
    pub fn opset(&self) -> i64 {
        self.proto
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .unwrap_or(0)
    }

    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.proto
            .metadata_props
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.value.as_str())
    }

    pub fn set_metadata(&mut self, key: &str, value: &str) {
        if let Some(p) = self.proto.metadata_props.iter_mut().find(|p| p.key == key) {
            p.value = value.to_string();
        } else {
            let mut p = crate::proto::StringStringEntryProto::new();
            p.key = key.to_string();
            p.value = value.to_string();
            self.proto.metadata_props.push(p);
        }
    }

    /// Make the tensors `names` graph outputs too (those that are not already), with the facts
    /// `idx` knows of them.
    pub fn expose(&mut self, idx: &crate::GraphIndex, names: &[String]) {
        for t in names {
            if !self.graph().output.iter().any(|o| &o.name == t) {
                let f = idx.fact(t).cloned().unwrap_or_default();
                self.graph_mut().output.push(f.to_value_info(t));
            }
        }
    }

    pub fn remove_metadata(&mut self, key: &str) {
        self.proto.metadata_props.retain(|p| p.key != key);
    }

    /// Serialized bytes of the model (external data stays where it is).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.proto
            .write_to_bytes()
            .map_err(|e| Error::Internal(format!("cannot serialize the model: {e}")))
    }

    /// Parse a model from bytes; `base_dir` resolves external data.
    pub fn from_bytes(bytes: &[u8], base_dir: &Path, label: &Path) -> Result<Model> {
        let mut proto = ModelProto::parse_from_bytes(bytes).map_err(|e| Error::NotOnnx {
            path: label.to_path_buf(),
            reason: format!("protobuf decoding failed ({e})"),
        })?;
        crate::attr::keep_zeros(&mut proto);
        let model = Model {
            proto,
            base_dir: base_dir.to_path_buf(),
            source: None,
        };
        validate(&model, label)?;
        Ok(model)
    }
}

/// ONNX IR versions we read and write (14 is what onnx 1.23 writes).
pub const IR_VERSIONS: std::ops::RangeInclusive<i64> = 3..=14;

fn validate(model: &Model, label: &Path) -> Result<()> {
    let bad = |reason: String| Error::NotOnnx {
        path: label.to_path_buf(),
        reason,
    };
    let p = &model.proto;
    if p.ir_version == 0 && p.graph.is_none() && p.opset_import.is_empty() {
        return Err(bad("it decodes as protobuf but has no ONNX model fields".into()));
    }
    if !IR_VERSIONS.contains(&p.ir_version) {
        return Err(Error::UnsupportedIr {
            path: label.to_path_buf(),
            version: p.ir_version,
            lowest: *IR_VERSIONS.start(),
            highest: *IR_VERSIONS.end(),
        });
    }
    if p.graph.is_none() {
        return Err(bad("the model has no graph".into()));
    }
    if p.opset_import.is_empty() {
        return Err(bad("the model declares no opset_import".into()));
    }
    for t in external_tensors(p) {
        check_external(t, &model.base_dir)?;
    }
    if let Some(g) = p.graph.as_ref() {
        for t in g
            .initializer
            .iter()
            .filter(|t| !is_external(t) && !t.raw_data.is_empty())
        {
            let size = crate::dtype::size_of(t.data_type);
            let need = t.dims.iter().try_fold(size.unwrap_or(0) as u64, |a, &d| {
                u64::try_from(d).ok().and_then(|d| a.checked_mul(d))
            });
            if size.is_some() && need != Some(t.raw_data.len() as u64) {
                return Err(bad(format!(
                    "initializer '{}' holds {} bytes, but its dims {:?} of {} need {}",
                    t.name,
                    t.raw_data.len(),
                    t.dims,
                    crate::dtype::name(t.data_type),
                    need.map_or("more than any file".to_string(), |n| n.to_string())
                )));
            }
        }
    }
    Ok(())
}

/// Load a model from a file.
pub fn load(path: &Path) -> Result<Model> {
    let bytes = fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(Error::NotOnnx {
            path: path.to_path_buf(),
            reason: "the file is empty".into(),
        });
    }
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let mut model = Model::from_bytes(&bytes, &base, path)?;
    model.source = Some(path.to_path_buf());
    Ok(model)
}

/// Every tensor of the model whose data lives in an external file (initializers of the main
/// graph and of subgraphs, and tensor attributes).
pub fn external_tensors(model: &ModelProto) -> Vec<&TensorProto> {
    let mut out = Vec::new();
    if let Some(g) = model.graph.as_ref() {
        collect_graph(g, &mut out);
    }
    for f in &model.functions {
        for n in &f.node {
            collect_node(n, &mut out);
        }
    }
    out
}

fn collect_graph<'a>(g: &'a crate::proto::GraphProto, out: &mut Vec<&'a TensorProto>) {
    for t in &g.initializer {
        if is_external(t) {
            out.push(t);
        }
    }
    for n in &g.node {
        collect_node(n, out);
    }
}

fn collect_node<'a>(n: &'a crate::proto::NodeProto, out: &mut Vec<&'a TensorProto>) {
    for a in &n.attribute {
        if let Some(t) = a.t.as_ref() {
            if is_external(t) {
                out.push(t);
            }
        }
        if let Some(g) = a.g.as_ref() {
            collect_graph(g, out);
        }
        for g in &a.graphs {
            collect_graph(g, out);
        }
    }
}

pub fn is_external(t: &TensorProto) -> bool {
    t.data_location.enum_value() == Ok(DataLocation::EXTERNAL)
}

/// The `location`, `offset` and `length` entries of an external tensor; an `offset` or
/// `length` that is not a whole number is an error.
pub fn external_info(t: &TensorProto) -> Result<(Option<String>, u64, Option<u64>)> {
    let mut loc = None;
    let mut off = 0;
    let mut len = None;
    for e in &t.external_data {
        let num = |v: &str| {
            v.trim().parse::<u64>().map_err(|_| Error::ExternalData {
                tensor: t.name.clone(),
                location: loc.clone().unwrap_or_default(),
                problem: format!("has {} '{v}', which is not a byte count", e.key),
            })
        };
        match e.key.as_str() {
            "location" => loc = Some(e.value.clone()),
            "offset" => off = num(&e.value)?,
            "length" => len = Some(num(&e.value)?),
            _ => {}
        }
    }
    Ok((loc, off, len))
}

fn check_external(t: &TensorProto, base: &Path) -> Result<()> {
    let (loc, off, len) = external_info(t)?;
    let err = |location: &str, problem: &str| Error::ExternalData {
        tensor: t.name.clone(),
        location: location.to_string(),
        problem: problem.to_string(),
    };
    let loc = loc.ok_or_else(|| err("(none)", "is missing: the tensor has no 'location' entry"))?;
    let rel = Path::new(&loc);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(err(
            &loc,
            "points outside the model's directory (ONNX requires a relative path below it)",
        ));
    }
    let path = base.join(rel);
    let meta = fs::metadata(&path).map_err(|_| err(&loc, &format!("does not exist at {}", path.display())))?;
    // A symbolic link may lead out of the model's directory: the runtimes refuse that, and so
    // does this tool.
    match (fs::canonicalize(&path), fs::canonicalize(base)) {
        (Ok(real), Ok(dir)) if real.starts_with(&dir) => {}
        (Ok(real), Ok(_)) => {
            return Err(err(
                &loc,
                &format!(
                "resolves through a symbolic link to {}, outside the model's directory (ONNX Runtime refuses that too)",
                real.display()
            ),
            ))
        }
        _ => return Err(err(&loc, "cannot be resolved to a file below the model's directory")),
    }
    if !meta.is_file() {
        return Err(err(&loc, "is not a regular file"));
    }
    let need = off.saturating_add(len.unwrap_or(0));
    if need > meta.len() {
        return Err(err(
            &loc,
            &format!(
                "is too short: {} bytes, but the tensor needs bytes up to {need}",
                meta.len()
            ),
        ));
    }
    Ok(())
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, then a rename, so
/// that a failure never leaves a partial file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| write_chunked(f, bytes))
}

/// `write_all` in pieces of 1 MiB: one write() of hundreds of megabytes is several times slower
/// on Linux than the same bytes in pieces (measured: 552 MB in 1.2 s against 0.15-0.27 s), as
/// the kernel throttles a single huge dirtying write.
pub fn write_chunked(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    bytes.chunks(1 << 20).try_for_each(|c| w.write_all(c))
}

/// Write `path` atomically with `fill`: a temporary file in the same directory (mode 0666 less
/// the umask, as a plain create would get), fsynced, renamed into place, and the directory
/// fsynced, so that whenever the process dies the path holds the old file or the new one, whole.
/// A temporary file left by a killed process starts with `.dagr-inject-` and ends with `.tmp`
/// (`remove_stale_temps` clears them).
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>) -> Result<()> {
    let werr = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    write_atomic_try(path, |f| fill(f).map_err(werr))
}

/// `write_atomic_with` for a `fill` that can fail for reasons of its own (a value it refuses
/// to write): its error is returned as it is, and nothing is left at `path`.
pub fn write_atomic_try(path: &Path, fill: impl FnOnce(&mut fs::File) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let werr = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut b = tempfile::Builder::new();
    b.prefix(TEMP_PREFIX).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(fs::Permissions::from_mode(0o666));
    }
    let mut tmp = b.tempfile_in(dir).map_err(werr)?;
    fill(tmp.as_file_mut())?;
    crate::fault::point("write.before-sync");
    tmp.as_file().sync_all().map_err(werr)?;
    crate::fault::point("write.before-rename");
    tmp.persist(path).map_err(|e| werr(e.error))?;
    sync_dir(dir);
    crate::fault::point("write.after-rename");
    Ok(())
}

/// The prefix of every temporary file this tool writes.
pub const TEMP_PREFIX: &str = ".dagr-inject-";

/// Flush a directory's entries (a rename in it) to disk; best effort where the platform has no
/// such call.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Remove the temporary files a killed process left in `dir` (see `write_atomic_with`).
pub fn remove_stale_temps(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TEMP_PREFIX) {
                let p = e.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
    }
}

/// Save a model to `path`. External data files referenced by the model are copied next to the
/// new file when it is written to another directory (never overwriting a different file).
/// Refuses to overwrite the file the model was loaded from.
pub fn save(model: &Model, path: &Path) -> Result<()> {
    if let Some(src) = &model.source {
        if same_file(src, path) {
            return Err(Error::WouldOverwriteInput(path.to_path_buf()));
        }
    }
    let locations: BTreeSet<String> = external_tensors(&model.proto)
        .into_iter()
        .filter_map(|t| external_info(t).ok().and_then(|i| i.0))
        .collect();
    // Nor over the external data the model reads.
    for loc in &locations {
        let data = model.base_dir.join(loc);
        if same_file(&data, path) {
            return Err(Error::WouldOverwriteInput(data));
        }
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    for loc in &locations {
        let from = model.base_dir.join(loc);
        let to = dir.join(loc);
        if same_file(&from, &to) {
            continue;
        }
        if to.exists() {
            if files_equal(&from, &to)? {
                continue;
            }
            return Err(Error::Write {
                path: to.clone(),
                source: std::io::Error::other(format!(
                    "a different file already exists where the external data '{loc}' must be copied; \
                     write the model to another directory"
                )),
            });
        }
        if let Some(p) = to.parent() {
            fs::create_dir_all(p).map_err(|source| Error::Write {
                path: p.to_path_buf(),
                source,
            })?;
        }
        copy_atomic(&from, &to)?;
    }
    write_atomic(path, &model.to_bytes()?)
}

fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let mut src = fs::File::open(from).map_err(|source| Error::Read {
        path: from.to_path_buf(),
        source,
    })?;
    write_atomic_with(to, |f| std::io::copy(&mut src, f).map(|_| ()))
}

fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let ma = fs::metadata(a).map_err(|source| Error::Read {
        path: a.to_path_buf(),
        source,
    })?;
    let mb = fs::metadata(b).map_err(|source| Error::Read {
        path: b.to_path_buf(),
        source,
    })?;
    if ma.len() != mb.len() {
        return Ok(false);
    }
    use std::io::Read;
    let mut fa = std::io::BufReader::new(fs::File::open(a).map_err(|source| Error::Read {
        path: a.to_path_buf(),
        source,
    })?);
    let mut fb = std::io::BufReader::new(fs::File::open(b).map_err(|source| Error::Read {
        path: b.to_path_buf(),
        source,
    })?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let na = fa.read(&mut ba).map_err(|source| Error::Read {
            path: a.to_path_buf(),
            source,
        })?;
        if na == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..na]).map_err(|source| Error::Read {
            path: b.to_path_buf(),
            source,
        })?;
        if ba[..na] != bb[..na] {
            return Ok(false);
        }
    }
}

/// A model written for a runtime to load (a rewritten copy, a copy with more outputs), removed
/// when dropped. A model with external data is written beside its data (the locations are
/// relative to the model's file, and the runtimes refuse links that lead out of its directory);
/// where the model's directory is not writable, into a temporary directory that holds the data
/// files too, hard-linked where the file system allows and copied otherwise. Any other model
/// goes to the system's temporary directory.
pub struct Scratch {
    file: tempfile::TempPath,
    _dir: Option<tempfile::TempDir>,
}

impl Scratch {
    pub fn new(model: &Model) -> Result<Scratch> {
        if external_tensors(&model.proto).is_empty() {
            return Self::write_in(model, &std::env::temp_dir(), None);
        }
        match Self::write_in(model, &model.base_dir, None) {
            Ok(s) => Ok(s),
            Err(_) => Self::beside_linked_data(model),
        }
    }

    /// The model in a new temporary directory, with its external data files linked or copied
    /// there at the same relative locations.
    pub fn beside_linked_data(model: &Model) -> Result<Scratch> {
        let tmp = std::env::temp_dir();
        let dir = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempdir_in(&tmp)
            .map_err(|source| Error::Write { path: tmp, source })?;
        let mut done = std::collections::HashSet::new();
        for t in external_tensors(&model.proto) {
            let (Some(loc), _, _) = external_info(t)? else { continue };
            if !done.insert(loc.clone()) {
                continue;
            }
            let (from, to) = (model.base_dir.join(&loc), dir.path().join(&loc));
            let werr = |source| Error::Write {
                path: to.clone(),
                source,
            };
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(werr)?;
            }
            if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to).map_err(werr)?;
            }
        }
        let path = dir.path().to_path_buf();
        Self::write_in(model, &path, Some(dir))
    }

    fn write_in(model: &Model, dir: &Path, keep: Option<tempfile::TempDir>) -> Result<Scratch> {
        let werr = |source| Error::Write {
            path: dir.to_path_buf(),
            source,
        };
        let mut f = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(".onnx")
            .tempfile_in(dir)
            .map_err(werr)?;
        f.write_all(&model.to_bytes()?).map_err(werr)?;
        Ok(Scratch {
            file: f.into_temp_path(),
            _dir: keep,
        })
    }

    pub fn path(&self) -> &Path {
        &self.file
    }
}

/// Refuse to write `output` when it is one of `inputs` (through any path: links, `..`).
pub fn refuse_overwrite(output: &Path, inputs: &[&Path]) -> Result<()> {
    match inputs.iter().find(|i| same_file(i, output)) {
        Some(i) => Err(Error::WouldOverwriteInput(i.to_path_buf())),
        None => Ok(()),
    }
}

/// True when both paths name the same existing file (or the same path once made absolute).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => {
            let abs = |p: &Path| {
                std::env::current_dir()
                    .map(|d| d.join(p))
                    .unwrap_or_else(|_| p.to_path_buf())
            };
            abs(a) == abs(b)
        }
    }
}
