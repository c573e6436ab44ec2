//! Conversions between `TensorProto` and plain Rust values.

use crate::dtype;
use crate::error::{Error, Result};
use crate::io::{external_info, is_external};
use crate::proto::TensorProto;
use std::path::Path;

/// Build a float32 tensor.
pub fn f32_tensor(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.dims = dims.to_vec();
    t.data_type = dtype::FLOAT;
    t.raw_data = f32_le_bytes(data).into_owned();
    t
}

/// A float tensor of any float type (float, double, float16, bfloat16) from f64 values, each
/// rounded to the nearest of the type.
pub fn float_tensor(name: &str, dims: &[i64], data: &[f64], elem: i32) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.dims = dims.to_vec();
    t.data_type = elem;
    t.raw_data = match elem {
        dtype::DOUBLE => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        dtype::FLOAT16 => data
            .iter()
            .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
            .collect(),
        dtype::BFLOAT16 => data
            .iter()
            .flat_map(|&v| half::bf16::from_f64(v).to_le_bytes())
            .collect(),
        _ => {
            t.data_type = dtype::FLOAT;
            data.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect()
        }
    };
    t
}

/// Build an int64 tensor.
pub fn i64_tensor(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.dims = dims.to_vec();
    t.data_type = dtype::INT64;
    t.raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    t
}

pub fn numel(t: &TensorProto) -> usize {
    t.dims.iter().fold(1usize, |a, &d| a.saturating_mul(d.max(0) as usize))
}

/// The raw little-endian bytes of a tensor, reading external data from `base_dir` if needed.
pub fn raw_bytes(t: &TensorProto, base_dir: &Path) -> Result<Vec<u8>> {
    if is_external(t) {
        let (loc, off, len) = external_info(t)?;
        let loc = loc.unwrap_or_default();
        let path = base_dir.join(&loc);
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        f.seek(SeekFrom::Start(off)).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let mut buf = Vec::new();
        match len {
            Some(n) => {
                crate::limits::check_alloc(n, &format!("the external data of tensor '{}'", t.name))?;
                buf.resize(n as usize, 0);
                f.read_exact(&mut buf).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
            }
            None => {
                f.read_to_end(&mut buf).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        return Ok(buf);
    }
    Ok(t.raw_data.clone())
}

/// Integer values of an int64/int32 tensor (e.g. a Reshape shape or axes input).
pub fn to_i64(t: &TensorProto, base_dir: &Path) -> Result<Vec<i64>> {
    to_i64_unchecked(t, base_dir).and_then(|v| whole(t, v))
}

fn to_i64_unchecked(t: &TensorProto, base_dir: &Path) -> Result<Vec<i64>> {
    let n = numel(t);
    match t.data_type {
        dtype::INT64 => {
            if !t.int64_data.is_empty() {
                return Ok(t.int64_data.clone());
            }
            let raw = raw_bytes(t, base_dir)?;
            Ok(raw
                .chunks_exact(8)
                .take(n)
                .map(|c| i64::from_le_bytes(bytes(c)))
                .collect())
        }
        dtype::INT32 => {
            if !t.int32_data.is_empty() {
                return Ok(t.int32_data.iter().map(|&v| v as i64).collect());
            }
            let raw = raw_bytes(t, base_dir)?;
            Ok(raw
                .chunks_exact(4)
                .take(n)
                .map(|c| i32::from_le_bytes(bytes(c)) as i64)
                .collect())
        }
        other => Err(Error::InvalidModel(format!(
            "tensor '{}' has type {}, expected an integer tensor",
            t.name,
            dtype::name(other)
        ))),
    }
}

/// Float values of a floating tensor, converted to f32.
pub fn to_f32(t: &TensorProto, base_dir: &Path) -> Result<Vec<f32>> {
    to_f32_unchecked(t, base_dir).and_then(|v| whole(t, v))
}

/// `values` when they are as many as the tensor's dims say, else an error naming the tensor (a
/// truncated or damaged model).
fn whole<T>(t: &TensorProto, values: Vec<T>) -> Result<Vec<T>> {
    let n = numel(t);
    if values.len() != n || t.dims.iter().any(|&d| d < 0) {
        return Err(Error::InvalidModel(format!(
            "tensor '{}' holds {} values but its dims {:?} need {n}: the model is damaged or truncated\n  hint: re-export the model",
            t.name,
            values.len(),
            t.dims
        )));
    }
    Ok(values)
}

fn to_f32_unchecked(t: &TensorProto, base_dir: &Path) -> Result<Vec<f32>> {
    let n = numel(t);
    match t.data_type {
        dtype::FLOAT => {
            if !t.float_data.is_empty() {
                return Ok(t.float_data.clone());
            }
            let raw = raw_bytes(t, base_dir)?;
            Ok(raw
                .chunks_exact(4)
                .take(n)
                .map(|c| f32::from_le_bytes(bytes(c)))
                .collect())
        }
        dtype::DOUBLE => {
            if !t.double_data.is_empty() {
                return Ok(t.double_data.iter().map(|&v| v as f32).collect());
            }
            let raw = raw_bytes(t, base_dir)?;
            Ok(raw
                .chunks_exact(8)
                .take(n)
                .map(|c| f64::from_le_bytes(bytes(c)) as f32)
                .collect())
        }
        other => Err(Error::InvalidModel(format!(
            "tensor '{}' has type {}, expected float32 or float64",
            t.name,
            dtype::name(other)
        ))),
    }
}

/// A chunk of `chunks_exact(N)` as an array.
fn bytes<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&c[..N]);
    a
}

/// The little-endian bytes of `values`: a view of their memory on a little-endian machine, a
/// converted copy on a big-endian one.
pub fn f32_le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Read a float32 tensor's values straight into `out` (exactly as many as its dims say):
/// external data is read from its file into `out`'s memory, with no intermediate buffer, so a
/// large weight is held once.
pub fn read_f32_into(t: &TensorProto, base_dir: &Path, out: &mut [f32]) -> Result<()> {
    let n = numel(t);
    let wrong = |got: usize| {
        Error::InvalidModel(format!(
            "tensor '{}' holds {got} values but its dims {:?} need {n}: the model is damaged or truncated\n  hint: re-export the model",
            t.name, t.dims
        ))
    };
    if t.data_type != dtype::FLOAT {
        return Err(Error::InvalidModel(format!(
            "tensor '{}' has type {}, expected float32",
            t.name,
            dtype::name(t.data_type)
        )));
    }
    if out.len() != n || t.dims.iter().any(|&d| d < 0) {
        return Err(wrong(out.len()));
    }
    if !t.float_data.is_empty() {
        if t.float_data.len() != n {
            return Err(wrong(t.float_data.len()));
        }
        out.copy_from_slice(&t.float_data);
        return Ok(());
    }
    if is_external(t) {
        let (loc, off, len) = external_info(t)?;
        if len.is_some_and(|l| l != 4 * n as u64) {
            return Err(wrong(len.unwrap_or(0) as usize / 4));
        }
        let path = base_dir.join(loc.unwrap_or_default());
        use std::io::{Read, Seek, SeekFrom};
        let rerr = |source| Error::Read {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::open(&path).map_err(rerr)?;
        f.seek(SeekFrom::Start(off)).map_err(rerr)?;
        f.read_exact(bytemuck::cast_slice_mut(out)).map_err(rerr)?;
    } else {
        if t.raw_data.len() != 4 * n {
            return Err(wrong(t.raw_data.len() / 4));
        }
        bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(&t.raw_data);
    }
    if cfg!(target_endian = "big") {
        for v in out.iter_mut() {
            *v = f32::from_le_bytes(v.to_ne_bytes());
        }
    }
    Ok(())
}
