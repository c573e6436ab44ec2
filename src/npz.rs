//! Reading and writing `.npz` files (NumPy archives) as named tensors.

use crate::error::{Error, Result};
use crate::runtime::{Tensors, Value};
use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, NpzWriter};
use std::fs::File;
use std::path::Path;

/// Read every array of an `.npz` file. float64 becomes float32 and int32 becomes int64, the
/// types ONNX models take.
pub fn read(path: &Path) -> Result<Tensors> {
    let f = File::open(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |m: String| Error::Data(format!("{}: {m}", path.display()));
    let mut npz = NpzReader::new(f).map_err(|e| bad(format!("not a readable .npz archive ({e})")))?;
    let names = npz.names().map_err(|e| bad(e.to_string()))?;
    let mut out = Tensors::new();
    for n in names {
        let key = n.trim_end_matches(".npy").to_string();
        let v = if let Ok(a) = npz.by_name::<OwnedRepr<f32>, IxDyn>(&n) {
            Value::F32(a)
        } else if let Ok(a) = npz.by_name::<OwnedRepr<f64>, IxDyn>(&n) {
            Value::F32(a.mapv(|v| v as f32))
        } else if let Ok(a) = npz.by_name::<OwnedRepr<i64>, IxDyn>(&n) {
            Value::I64(a)
        } else if let Ok(a) = npz.by_name::<OwnedRepr<i32>, IxDyn>(&n) {
            Value::I64(a.mapv(|v| v as i64))
        } else if let Ok(a) = npz.by_name::<OwnedRepr<bool>, IxDyn>(&n) {
            Value::Bool(a)
        } else {
            return Err(bad(format!(
                "array '{key}' has a type this tool does not read (use float32, float64, int64, int32 or bool)"
            )));
        };
        out.insert(key, v);
    }
    Ok(out)
}

/// Write named tensors to an `.npz` file (atomically).
pub fn write(path: &Path, tensors: &Tensors) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let werr = |e: String| Error::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| werr(e.to_string()))?;
    {
        let mut w = NpzWriter::new(tmp.as_file());
        for (k, v) in tensors {
            match v {
                Value::F32(a) => w.add_array(k.as_str(), a),
                Value::I64(a) => w.add_array(k.as_str(), a),
                Value::Bool(a) => w.add_array(k.as_str(), a),
            }
            .map_err(|e| werr(e.to_string()))?;
        }
        w.finish().map_err(|e| werr(e.to_string()))?;
    }
    tmp.persist(path).map_err(|e| werr(e.to_string()))?;
    Ok(())
}

pub fn f32_array(v: &Value) -> Option<&ArrayD<f32>> {
    v.as_f32()
}
