//! GGUF v3 writer.

use std::io::Write;
use std::path::Path;

use crate::types::{Array, GgmlType, Value};
use crate::{Error, Result, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};

struct PendingTensor {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    data: Vec<u8>,
}

/// Builds a GGUF v3 file in memory and writes it out.
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
    alignment: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter {
            metadata: Vec::new(),
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }

    /// Adds (or replaces) a metadata entry. `general.alignment` also sets the alignment.
    pub fn add_metadata(&mut self, key: &str, value: Value) {
        if key == "general.alignment" {
            if let Some(a) = value
                .as_i64()
                .filter(|a| *a > 0 && (*a as u64).is_power_of_two())
            {
                self.alignment = a as u64;
            }
        }
        if let Some(slot) = self.metadata.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
        } else {
            self.metadata.push((key.to_string(), value));
        }
    }

    /// Adds a tensor; `dims` are in ggml order (row length first).
    pub fn add_tensor(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        data: Vec<u8>,
    ) -> Result<()> {
        let bad = |reason: String| Error::BadTensor {
            tensor: name.to_string(),
            reason,
        };
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(bad(format!("{} dimensions", dims.len())));
        }
        let n: u64 = dims.iter().product();
        let expected = ty
            .bytes_for(n)
            .ok_or_else(|| bad(format!("{n} elements is not whole {ty} blocks")))?;
        if !dims[0].is_multiple_of(ty.block_size() as u64) {
            return Err(bad(format!(
                "row length {} not a multiple of the block",
                dims[0]
            )));
        }
        if expected != data.len() as u64 {
            return Err(bad(format!(
                "data has {} bytes, {ty} {dims:?} needs {expected}",
                data.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::Duplicate {
                what: "tensor",
                name: name.to_string(),
            });
        }
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            ty,
            dims: dims.to_vec(),
            data,
        });
        Ok(())
    }

    /// Serializes the whole file.
    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut buf = Vec::new();
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        buf.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut buf, k);
            buf.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut buf, v);
        }
        let align = self.alignment;
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(&mut buf, &t.name);
            buf.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                buf.extend_from_slice(&d.to_le_bytes());
            }
            buf.extend_from_slice(&t.ty.id().to_le_bytes());
            buf.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(align) * align;
        }
        pad_to(&mut buf, align);
        out.write_all(&buf)?;
        let mut written = 0u64;
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            let pad = (off - written) as usize;
            out.write_all(&vec![0u8; pad])?;
            out.write_all(&t.data)?;
            written = off + t.data.len() as u64;
        }
        Ok(())
    }

    /// Writes to a file (through a temporary name, renamed into place when complete; the
    /// temporary file is removed when writing fails, e.g. on a full disk).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("gguf.partial");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let written = self
            .write_to(&mut f)
            .and_then(|()| f.flush())
            .and_then(|()| {
                drop(f);
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(())
    }
}

fn pad_to(buf: &mut Vec<u8>, align: u64) {
    let len = buf.len() as u64;
    let target = len.div_ceil(align) * align;
    buf.resize(target as usize, 0);
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => put_str(buf, s),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => put_array(buf, a),
    }
}

fn put_array(buf: &mut Vec<u8>, a: &Array) {
    buf.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => buf.extend_from_slice(v),
        Array::I8(v) => buf.extend(v.iter().map(|&x| x as u8)),
        Array::Bool(v) => buf.extend(v.iter().map(|&x| x as u8)),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::String(v) => {
            for s in v {
                put_str(buf, s);
            }
        }
        Array::Array(v) => {
            for inner in v {
                put_array(buf, inner);
            }
        }
    }
}
