//! Reading and writing `.npz` files (NumPy archives) as named tensors.
//!
//! The reader parses each `.npy` header itself, so that nothing is allocated before the sizes
//! are checked: an array whose header claims more elements than its entry holds, or more bytes
//! than the machine has free, is refused with a message instead of aborting the process. Only
//! the arrays asked for are read (`read_only`), so an unused large array costs nothing.

use crate::{Tensors, Value};
use dagr_onnx::error::{Error, Result};
use ndarray::{ArrayD, IxDyn, ShapeBuilder};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// The element types an `.npy` entry may hold here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    F64,
    I64,
    I32,
    Bool,
    U8,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::F64 | Elem::I64 => 8,
            Elem::Bool | Elem::U8 => 1,
        }
    }
}

/// What an `.npy` header says.
#[derive(Debug, Clone)]
pub struct Header {
    pub elem: Elem,
    pub big_endian: bool,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Bytes before the data.
    pub len: usize,
}

impl Header {
    /// The data's size in bytes, or `None` when it overflows.
    pub fn data_bytes(&self) -> Option<usize> {
        self.shape.iter().try_fold(self.elem.size(), |a, &d| a.checked_mul(d))
    }
}

/// An open `.npz` archive.
pub struct Npz {
    zip: zip::ZipArchive<BufReader<File>>,
    path: PathBuf,
}

impl Npz {
    pub fn open(path: &Path) -> Result<Npz> {
        let f = File::open(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let zip = zip::ZipArchive::new(BufReader::new(f)).map_err(|e| {
            Error::Data(format!(
                "{}: not a readable .npz archive ({e})\n  hint: write it with numpy.savez or numpy.savez_compressed",
                path.display()
            ))
        })?;
        Ok(Npz {
            zip,
            path: path.to_path_buf(),
        })
    }

    fn bad(&self, m: String) -> Error {
        Error::Data(format!("{}: {m}", self.path.display()))
    }

    /// The names of the arrays (entry names without `.npy`).
    pub fn names(&self) -> Vec<String> {
        self.zip
            .file_names()
            .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
            .collect()
    }

    fn entry_name(&self, name: &str) -> Option<String> {
        let with = format!("{name}.npy");
        self.zip
            .file_names()
            .find(|n| *n == with || *n == name)
            .map(str::to_string)
    }

    /// Read the entry `name`: its header and its data bytes, sizes checked before allocating.
    fn raw(&mut self, name: &str) -> Result<(Header, Vec<u8>)> {
        let entry = self
            .entry_name(name)
            .ok_or_else(|| self.bad(format!("no array named '{name}'")))?;
        let path = self.path.clone();
        let bad = |m: String| Error::Data(format!("{}: array '{name}' {m}", path.display()));
        let mut f = self
            .zip
            .by_name(&entry)
            .map_err(|e| bad(format!("cannot be opened ({e})")))?;
        let declared = f.size();
        let mut head = vec![0u8; 10];
        f.read_exact(&mut head)
            .map_err(|e| bad(format!("is shorter than an .npy header ({e})")))?;
        if &head[..6] != b"\x93NUMPY" {
            return Err(bad("is not an .npy array (bad magic bytes)".into()));
        }
        let (hlen, pre) = match head[6] {
            1 => (u16::from_le_bytes([head[8], head[9]]) as usize, 10),
            2 | 3 => {
                let mut more = [0u8; 2];
                f.read_exact(&mut more)
                    .map_err(|e| bad(format!("has a truncated header ({e})")))?;
                (u32::from_le_bytes([head[8], head[9], more[0], more[1]]) as usize, 12)
            }
            v => {
                return Err(bad(format!(
                    "has .npy format version {v}, which this tool does not read"
                )))
            }
        };
        if hlen > 1 << 20 {
            return Err(bad(format!("has a header of {hlen} bytes: the file is damaged")));
        }
        let mut dict = vec![0u8; hlen];
        f.read_exact(&mut dict)
            .map_err(|e| bad(format!("has a truncated header ({e})")))?;
        let dict = String::from_utf8_lossy(&dict).to_string();
        let mut h =
            parse_header(&dict).map_err(|m| bad(format!("has an unreadable header: {m} (header: {})", dict.trim())))?;
        h.len = pre + hlen;
        let need = h
            .data_bytes()
            .ok_or_else(|| bad(format!("claims shape {:?}, whose size overflows", h.shape)))?;
        let holds = declared.saturating_sub(h.len as u64);
        if need as u64 != holds {
            return Err(bad(format!(
                "claims shape {:?} ({need} bytes of data) but its entry holds {holds} bytes: the file is damaged or not written by numpy",
                h.shape
            )));
        }
        dagr_onnx::limits::check_alloc(need as u64, &format!("array '{name}' of {}", self.path.display()))?;
        let mut data = vec![0u8; need];
        f.read_exact(&mut data)
            .map_err(|e| bad(format!("is truncated or damaged ({e})")))?;
        // Reading to the end checks the entry's CRC.
        let mut rest = Vec::new();
        f.read_to_end(&mut rest).map_err(|e| {
            bad(format!(
                "is damaged: {e}\n  hint: the archive's checksum does not match; re-create the file"
            ))
        })?;
        Ok((h, data))
    }

    /// The array `name` as a tensor: float64 becomes float32 and int32 becomes int64, the
    /// types ONNX models take.
    pub fn array(&mut self, name: &str) -> Result<Value> {
        let (h, data) = self.raw(name)?;
        let shape = h.shape.clone();
        let make = |v: Vec<f32>| to_array(v, &shape, h.fortran_order).map(Value::F32);
        let v = match h.elem {
            Elem::F32 => make(decode(&data, h.big_endian, f32::from_le_bytes, f32::from_be_bytes))?,
            Elem::F64 => make(
                decode(&data, h.big_endian, f64::from_le_bytes, f64::from_be_bytes)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect(),
            )?,
            Elem::I64 => Value::I64(to_array(
                decode(&data, h.big_endian, i64::from_le_bytes, i64::from_be_bytes),
                &shape,
                h.fortran_order,
            )?),
            Elem::I32 => Value::I64(to_array(
                decode(&data, h.big_endian, i32::from_le_bytes, i32::from_be_bytes)
                    .into_iter()
                    .map(i64::from)
                    .collect(),
                &shape,
                h.fortran_order,
            )?),
            Elem::Bool => Value::Bool(to_array(data.iter().map(|&b| b != 0).collect(), &shape, h.fortran_order)?),
            Elem::U8 => {
                return Err(self.bad(format!(
                    "array '{name}' is uint8, a type this tool does not read as a tensor (use float32, float64, int64, int32 or bool)"
                )))
            }
        };
        Ok(v)
    }

    /// The raw bytes of a one-dimensional uint8 array (used for metadata entries).
    pub fn bytes(&mut self, name: &str) -> Result<Vec<u8>> {
        let (h, data) = self.raw(name)?;
        if h.elem != Elem::U8 || h.shape.len() != 1 {
            return Err(self.bad(format!("entry '{name}' is not a one-dimensional uint8 array")));
        }
        Ok(data)
    }
}

fn decode<T, const N: usize>(data: &[u8], be: bool, le: fn([u8; N]) -> T, bef: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| {
            let a: [u8; N] = c.try_into().unwrap_or([0; N]);
            if be {
                bef(a)
            } else {
                le(a)
            }
        })
        .collect()
}

fn to_array<T: Clone>(v: Vec<T>, shape: &[usize], fortran: bool) -> Result<ArrayD<T>> {
    let a = if fortran {
        ArrayD::from_shape_vec(IxDyn(shape).f(), v)
    } else {
        ArrayD::from_shape_vec(IxDyn(shape), v)
    }
    .map_err(|e| Error::Data(format!("array data does not fit its shape {shape:?}: {e}")))?;
    Ok(if fortran {
        a.as_standard_layout().into_owned()
    } else {
        a
    })
}

/// Parse the Python-literal dictionary of an `.npy` header.
fn parse_header(dict: &str) -> std::result::Result<Header, String> {
    let value_after = |key: &str| -> std::result::Result<&str, String> {
        let k = dict
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("no '{key}' entry"))?;
        let rest = &dict[k + key.len() + 2..];
        let colon = rest.find(':').ok_or_else(|| format!("no value for '{key}'"))?;
        Ok(rest[colon + 1..].trim_start())
    };
    let descr = value_after("descr")?;
    let quote = descr.chars().next().filter(|c| *c == '\'' || *c == '"');
    let descr = match quote {
        Some(q) => descr[1..]
            .split(q)
            .next()
            .ok_or_else(|| "unterminated 'descr'".to_string())?,
        None => return Err("'descr' is not a simple type string (structured arrays are not read)".into()),
    };
    let first = descr.chars().next().map_or(0, char::len_utf8);
    let (order, code) = descr.split_at(first);
    let big_endian = match order {
        "<" | "|" | "=" => false,
        ">" => true,
        _ => return Err(format!("unknown byte order in '{descr}'")),
    };
    let elem = match code {
        "f4" => Elem::F32,
        "f8" => Elem::F64,
        "i8" => Elem::I64,
        "i4" => Elem::I32,
        "b1" => Elem::Bool,
        "u1" => Elem::U8,
        other => {
            return Err(format!(
                "type '{other}' is not read by this tool (use float32, float64, int64, int32 or bool)"
            ))
        }
    };
    let fortran_order = value_after("fortran_order")?.starts_with("True");
    let shape = value_after("shape")?;
    let shape = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| "'shape' is not a tuple".to_string())?;
    let shape = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("'{s}' is not a dimension"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Header {
        elem,
        big_endian,
        fortran_order,
        shape,
        len: 0,
    })
}

/// Read every array of an `.npz` file.
pub fn read(path: &Path) -> Result<Tensors> {
    let mut z = Npz::open(path)?;
    let names = z.names();
    names.into_iter().map(|n| Ok((n.clone(), z.array(&n)?))).collect()
}

/// Read the arrays among `names` that the file holds (the others are left unread).
pub fn read_only(path: &Path, names: &[String]) -> Result<Tensors> {
    let mut z = Npz::open(path)?;
    let present = z.names();
    names
        .iter()
        .filter(|n| present.contains(n))
        .map(|n| Ok((n.clone(), z.array(n)?)))
        .collect()
}

/// The header of an `.npy` entry, padded so that the data starts at a multiple of 64 bytes.
fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    // Pad so that the data starts at a multiple of 64 bytes, ending the header with '\n'.
    let total = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - total % 64) % 64));
    dict.push('\n');
    let mut out = Vec::with_capacity(10 + dict.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

fn le_bytes<T: Copy, const N: usize>(a: &ArrayD<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
    a.iter().flat_map(|&v| f(v)).collect()
}

/// An entry of an archive being written: a tensor, or raw bytes stored as a uint8 array.
pub enum Entry<'a> {
    Tensor(&'a Value),
    Bytes(&'a [u8]),
}

/// An `.npz` archive written entry by entry into a file, stored uncompressed as `numpy.savez`
/// does; a float32 entry goes from the caller's memory to the file with no copy in between.
///
/// A writer dropped unfinished (an entry failed, or its caller refused a value) is left as it
/// is, its buffer not freed: `zip`'s own drop would try to finish the archive and print its
/// failure to stderr, and the caller discards the file anyway (see `io::write_atomic_try`).
pub struct Writer<'f> {
    zip: std::mem::ManuallyDrop<zip::ZipWriter<std::io::BufWriter<&'f mut File>>>,
}

impl<'f> Writer<'f> {
    pub fn new(file: &'f mut File) -> Writer<'f> {
        Writer {
            zip: std::mem::ManuallyDrop::new(zip::ZipWriter::new(std::io::BufWriter::with_capacity(1 << 20, file))),
        }
    }

    fn entry(&mut self, name: &str, header: &[u8], data: &[u8]) -> std::io::Result<()> {
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        self.zip
            .start_file(format!("{name}.npy"), opts)
            .map_err(std::io::Error::other)?;
        self.zip.write_all(header)?;
        dagr_onnx::io::write_chunked(&mut *self.zip, data)
    }

    /// A float32 array (copied only where it is not in standard layout).
    pub fn f32(&mut self, name: &str, a: ndarray::ArrayViewD<'_, f32>) -> std::io::Result<()> {
        let a = a.as_standard_layout();
        let data = a.as_slice().unwrap_or(&[]);
        self.entry(
            name,
            &npy_header("<f4", a.shape()),
            &dagr_onnx::tensor::f32_le_bytes(data),
        )
    }

    pub fn value(&mut self, name: &str, v: &Value) -> std::io::Result<()> {
        match v {
            Value::F32(a) => self.f32(name, a.view()),
            Value::I64(a) => self.entry(name, &npy_header("<i8", a.shape()), &le_bytes(a, i64::to_le_bytes)),
            Value::Bool(a) => self.entry(name, &npy_header("|b1", a.shape()), &le_bytes(a, |b: bool| [b as u8])),
        }
    }

    /// Raw bytes, as a uint8 array.
    pub fn bytes(&mut self, name: &str, b: &[u8]) -> std::io::Result<()> {
        self.entry(name, &npy_header("|u1", &[b.len()]), b)
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        // SAFETY: `self.zip` is taken once, here, and `self` goes right after; dropping a
        // `ManuallyDrop` does not touch what it holds.
        let zip = unsafe { std::mem::ManuallyDrop::take(&mut self.zip) };
        let mut w = zip.finish().map_err(std::io::Error::other)?;
        w.flush()
    }
}

/// Write entries to `path` atomically (a temporary file, fsynced, renamed into place), stored
/// uncompressed as `numpy.savez` does.
pub fn write_entries(path: &Path, entries: &[(&str, Entry)]) -> Result<()> {
    dagr_onnx::io::write_atomic_with(path, |file| {
        let mut w = Writer::new(file);
        for (name, e) in entries {
            match e {
                Entry::Tensor(v) => w.value(name, v)?,
                Entry::Bytes(b) => w.bytes(name, b)?,
            }
        }
        w.finish()
    })
}

/// Write named tensors to an `.npz` file (atomically).
pub fn write(path: &Path, tensors: &Tensors) -> Result<()> {
    let entries: Vec<(&str, Entry)> = tensors.iter().map(|(k, v)| (k.as_str(), Entry::Tensor(v))).collect();
    write_entries(path, &entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_as_numpy_writes_them() {
        let h = parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }").unwrap();
        assert_eq!(
            (h.elem, h.shape.clone(), h.fortran_order),
            (Elem::F32, vec![3, 4], false)
        );
        let h = parse_header("{'descr': '>i8', 'fortran_order': True, 'shape': (5,), }").unwrap();
        assert!(h.big_endian && h.fortran_order && h.shape == vec![5]);
        let h = parse_header("{'descr': '|b1', 'fortran_order': False, 'shape': (), }").unwrap();
        assert!(h.shape.is_empty() && h.data_bytes() == Some(1));
        assert!(parse_header("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }").is_err());
        assert!(parse_header("{'descr': '<f4', 'shape': (2,), }").is_err());
        let huge =
            parse_header("{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, 8), }").unwrap();
        assert_eq!(huge.data_bytes(), None);
    }

    /// Damaged archives (every single-bit flip of every byte, every truncation) give an error
    /// or, where the damage missed everything read, the same arrays; never a panic.
    #[test]
    fn damaged_archives_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.npz");
        let mut t = Tensors::new();
        t.insert(
            "a".into(),
            Value::F32(ArrayD::from_shape_vec(vec![3, 4], (0..12).map(|v| v as f32).collect()).unwrap()),
        );
        t.insert(
            "b".into(),
            Value::I64(ArrayD::from_shape_vec(vec![5], (0..5).collect()).unwrap()),
        );
        t.insert("c".into(), Value::Bool(ArrayD::from_elem(vec![2, 2], true)));
        write(&good, &t).unwrap();
        assert_eq!(read(&good).unwrap(), t);
        let bytes = std::fs::read(&good).unwrap();
        let p = dir.path().join("bad.npz");
        let mut refused = 0;
        for pos in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[pos] ^= 1 << bit;
                std::fs::write(&p, &b).unwrap();
                match read(&p) {
                    Err(_) => refused += 1,
                    // A name is stored twice in a zip and only the central directory's is read,
                    // so a flip there renames an entry (a reader then misses it by name); the
                    // values never change silently.
                    Ok(got) => assert!(
                        got.values().all(|v| t.values().any(|w| w == v)),
                        "flipping bit {bit} of byte {pos} changed an array silently"
                    ),
                }
            }
        }
        for cut in 0..bytes.len() {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(read(&p).is_err(), "a truncation to {cut} bytes was read");
        }
        // The rest land in fields nothing reads (time stamps, header padding).
        assert!(
            refused * 10 > bytes.len() * 8 * 7,
            "{refused} of {} flips refused",
            bytes.len() * 8
        );
    }
}
