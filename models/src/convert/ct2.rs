//! A reader for CTranslate2's `model.bin` (the format faster-whisper models ship in).
//!
//! Layout (little-endian): `u32` format version, the spec name, `u32` spec revision, `u32` variable
//! count, then per variable its name, `u8` rank, `u32` dims, `u8` dtype, `u32` byte count and the
//! bytes; then `u32` alias count and (alias, target) name pairs. Strings are a `u16` length and that
//! many bytes, NUL-terminated. The file is read once into memory and variables are views into it, so
//! converting costs the file's size plus what is being written.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::ConvertError;
use crate::onnx::f16_to_f32;

/// A variable's element type (CTranslate2's `DataType` numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DType {
    F32,
    I8,
    I16,
    I32,
    F16,
    Bf16,
}

impl DType {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => DType::F32,
            1 => DType::I8,
            2 => DType::I16,
            3 => DType::I32,
            4 => DType::F16,
            5 => DType::Bf16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            DType::I8 => 1,
            DType::I16 | DType::F16 | DType::Bf16 => 2,
            DType::F32 | DType::I32 => 4,
        }
    }
}

/// Where one variable lies in the file.
#[derive(Debug, Clone)]
struct Var {
    dims: Vec<usize>,
    dtype: DType,
    bytes: Range<usize>,
}

/// A parsed `model.bin`: its spec name and revision and its variables (aliases resolved).
#[derive(Debug)]
pub(crate) struct Ct2Model {
    path: PathBuf,
    pub spec: String,
    data: Vec<u8>,
    vars: BTreeMap<String, Var>,
}

/// A cursor over the file that turns every overrun into a format error naming the offset.
struct Cursor<'a> {
    b: &'a [u8],
    o: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<Range<usize>, String> {
        let end = self
            .o
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| format!("truncated: {what} needs {n} bytes at offset {} but the file has {}", self.o, self.b.len()))?;
        let r = self.o..end;
        self.o = end;
        Ok(r)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        let r = self.take(1, what)?;
        Ok(self.b[r.start])
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let r = self.take(2, what)?;
        Ok(u16::from_le_bytes([self.b[r.start], self.b[r.start + 1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let r = self.take(4, what)?;
        let s = &self.b[r];
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = usize::from(self.u16(what)?);
        let r = self.take(n, what)?;
        let raw = &self.b[r];
        let raw = raw.iter().position(|c| *c == 0).map_or(raw, |end| &raw[..end]);
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{what} at offset {} is not UTF-8", self.o - n))
    }
}

/// The largest variable count or rank a real model has, with room to spare; a bigger number means
/// the file is not a CTranslate2 model (and would make the reader allocate for nothing).
const MAX_VARS: u32 = 1 << 20;
const MAX_RANK: u8 = 8;

impl Ct2Model {
    /// Reads and indexes `path`.
    ///
    /// # Errors
    /// The file cannot be read ([`ConvertError::Io`]) or is not a CTranslate2 model
    /// ([`ConvertError::Format`], saying where it stopped making sense).
    pub fn open(path: &Path) -> Result<Self, ConvertError> {
        let data = std::fs::read(path).map_err(|e| ConvertError::io(path, e))?;
        let (spec, vars) =
            Self::index(&data).map_err(|reason| ConvertError::format(path, format!("not a CTranslate2 model.bin: {reason}")))?;
        Ok(Self { path: path.to_path_buf(), spec, data, vars })
    }

    fn index(b: &[u8]) -> Result<(String, BTreeMap<String, Var>), String> {
        let mut c = Cursor { b, o: 0 };
        let version = c.u32("format version")?;
        if !(1..=64).contains(&version) {
            return Err(format!("format version {version} (expected 1..64)"));
        }
        let spec = c.string("spec name")?;
        let _spec_revision = c.u32("spec revision")?;
        let count = c.u32("variable count")?;
        if count > MAX_VARS {
            return Err(format!("{count} variables"));
        }
        let mut vars = BTreeMap::new();
        for _ in 0..count {
            let name = c.string("variable name")?;
            let rank = c.u8("rank")?;
            if rank > MAX_RANK {
                return Err(format!("variable {name:?} has rank {rank}"));
            }
            let mut dims = Vec::with_capacity(usize::from(rank));
            for _ in 0..rank {
                dims.push(c.u32("dimension")? as usize);
            }
            let code = c.u8("dtype")?;
            let dtype = DType::from_code(code).ok_or_else(|| format!("variable {name:?} has unknown dtype {code}"))?;
            let nbytes = c.u32("byte count")? as usize;
            let elements: usize = dims.iter().product();
            if elements.checked_mul(dtype.size()) != Some(nbytes) {
                return Err(format!("variable {name:?}: {nbytes} bytes for dims {dims:?} of {dtype:?}"));
            }
            let bytes = c.take(nbytes, &format!("data of {name:?}"))?;
            vars.insert(name, Var { dims, dtype, bytes });
        }
        if c.o < b.len() {
            let aliases = c.u32("alias count")?;
            for _ in 0..aliases.min(MAX_VARS) {
                let alias = c.string("alias")?;
                let target = c.string("alias target")?;
                if let Some(v) = vars.get(&target).cloned() {
                    vars.insert(alias, v);
                }
            }
        }
        Ok((spec, vars))
    }

    /// The file, for errors.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Variable names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }

    fn var(&self, name: &str) -> Result<&Var, ConvertError> {
        self.vars.get(name).ok_or_else(|| ConvertError::format(&self.path, format!("variable {name:?} is missing")))
    }

    /// A variable's dimensions.
    ///
    /// # Errors
    /// The model has no such variable.
    pub fn dims(&self, name: &str) -> Result<&[usize], ConvertError> {
        Ok(&self.var(name)?.dims)
    }

    /// A float variable as f32 (f16 and bf16 widen exactly).
    ///
    /// # Errors
    /// The variable is missing or is not a float.
    pub fn f32s(&self, name: &str) -> Result<Vec<f32>, ConvertError> {
        let v = self.var(name)?;
        let raw = &self.data[v.bytes.clone()];
        Ok(match v.dtype {
            DType::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => raw.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            DType::Bf16 => raw.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect(),
            other => {
                return Err(ConvertError::format(&self.path, format!("variable {name:?} is {other:?}, expected a float")));
            }
        })
    }

    /// A variable's bytes when it is stored as f16 (little-endian), for copying into an fp16
    /// initializer without widening it to f32 first.
    pub fn f16_bytes(&self, name: &str) -> Option<&[u8]> {
        self.vars.get(name).filter(|v| v.dtype == DType::F16).map(|v| &self.data[v.bytes.clone()])
    }

    /// The first element of an integer variable (CTranslate2 stores settings such as `num_heads` so).
    ///
    /// # Errors
    /// The variable is missing, empty or not an integer.
    pub fn int(&self, name: &str) -> Result<i64, ConvertError> {
        let v = self.var(name)?;
        let raw = &self.data[v.bytes.clone()];
        let bad = || ConvertError::format(&self.path, format!("variable {name:?} is not a non-empty integer"));
        Ok(match v.dtype {
            DType::I8 => i64::from(*raw.first().ok_or_else(bad)? as i8),
            DType::I16 => {
                let c = raw.get(..2).ok_or_else(bad)?;
                i64::from(i16::from_le_bytes([c[0], c[1]]))
            }
            DType::I32 => {
                let c = raw.get(..4).ok_or_else(bad)?;
                i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            }
            _ => return Err(bad()),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny model.bin: version 6, the given spec, one f16 variable and one alias.
    pub(crate) fn tiny(spec: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(6u32.to_le_bytes());
        let s = format!("{spec}\0");
        b.extend((s.len() as u16).to_le_bytes());
        b.extend(s.as_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend(1u32.to_le_bytes());
        let n = "w\0";
        b.extend((n.len() as u16).to_le_bytes());
        b.extend(n.as_bytes());
        b.push(1);
        b.extend(2u32.to_le_bytes());
        b.push(4);
        b.extend(4u32.to_le_bytes());
        b.extend(0x3c00u16.to_le_bytes()); // 1.0
        b.extend(0xc000u16.to_le_bytes()); // -2.0
        b.extend(1u32.to_le_bytes());
        for s in ["alias\0", "w\0"] {
            b.extend((s.len() as u16).to_le_bytes());
            b.extend(s.as_bytes());
        }
        b
    }

    #[test]
    fn reads_variables_and_aliases() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.bin");
        std::fs::write(&p, tiny("WhisperSpec")).unwrap();
        let m = Ct2Model::open(&p).unwrap();
        assert_eq!(m.spec, "WhisperSpec");
        assert_eq!(m.f32s("w").unwrap(), [1.0, -2.0]);
        assert_eq!(m.f32s("alias").unwrap(), [1.0, -2.0]);
        assert_eq!(m.dims("w").unwrap(), [2]);
    }

    #[test]
    fn a_truncated_file_is_a_format_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.bin");
        let full = tiny("WhisperSpec");
        std::fs::write(&p, &full[..full.len() - 20]).unwrap();
        let e = Ct2Model::open(&p).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ConvertError::Format { .. }), "{e:?}");
        assert!(text.contains(&p.display().to_string()) && text.contains("truncated"), "{text}");
    }
}
