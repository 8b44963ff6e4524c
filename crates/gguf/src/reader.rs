//! Hardened GGUF parser over a memory map or owned bytes.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use crate::types::{Array, GgmlType, Value, ValueType};
use crate::{Error, Result, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};

/// One entry of the tensor index.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Size in bytes of the tensor data.
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Length of one row (`dims[0]`).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    /// Number of rows (product of `dims[1..]`).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Tensor data is borrowed from the mapping.
pub struct Gguf {
    storage: Storage,
    pub version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Maps and parses a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            return Err(Error::Truncated {
                what: "magic".into(),
                offset: 0,
                need: 4,
                len: 0,
            });
        }
        // SAFETY: the mapping is read-only and private to this process. A concurrent
        // truncation of the file by another process could fault; that is the documented
        // contract of every mmap-based model loader (llama.cpp included).
        #[allow(unsafe_code)]
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(Storage::Mmap(mmap))
    }

    /// Parses a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Gguf> {
        let bytes = storage.bytes();
        let mut c = Cursor { buf: bytes, pos: 0 };
        let magic: [u8; 4] = c.take(4, "magic")?.try_into().unwrap_or([0; 4]);
        if magic != MAGIC {
            return Err(Error::BadMagic { got: magic });
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // Each tensor info takes at least 8 (name len) + 4 + 4 + 8 bytes, each kv 8 + 4 + 1.
        c.check_count("tensor", n_tensors, 24)?;
        c.check_count("metadata", n_kv, 13)?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty_id = c.u32("metadata value type")?;
            let ty = ValueType::from_id(ty_id).ok_or_else(|| Error::BadValueType {
                key: key.clone(),
                got: ty_id,
            })?;
            let value = c.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(Error::Duplicate {
                    what: "metadata key",
                    name: key,
                });
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            Some(&i) => {
                let a = metadata[i].1.as_i64().unwrap_or(0);
                if a <= 0 || (a as u64).count_ones() != 1 {
                    return Err(Error::BadAlignment(a as u64));
                }
                a as u64
            }
            None => DEFAULT_ALIGNMENT,
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor n_dims")? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::BadTensor {
                    tensor: name,
                    reason: format!("{n_dims} dimensions (1..={MAX_DIMS} allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dim")?);
            }
            let ty_id = c.u32("tensor type")?;
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| Error::UnknownType {
                tensor: name.clone(),
                got: ty_id,
            })?;
            let offset = c.u64("tensor offset")?;
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| Error::BadTensor {
                    tensor: name.clone(),
                    reason: format!("element count of dims {dims:?} overflows"),
                })?;
            if dims[0] % ty.block_size() as u64 != 0 {
                return Err(Error::BadTensor {
                    tensor: name,
                    reason: format!(
                        "row length {} is not a multiple of the {} block size {}",
                        dims[0],
                        ty,
                        ty.block_size()
                    ),
                });
            }
            let n_bytes = ty.bytes_for(n_elements).ok_or_else(|| Error::BadTensor {
                tensor: name.clone(),
                reason: "byte size overflows".into(),
            })?;
            if offset % alignment != 0 {
                return Err(Error::BadTensor {
                    tensor: name,
                    reason: format!("offset {offset} is not aligned to {alignment}"),
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::Duplicate {
                    what: "tensor",
                    name,
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
            });
        }

        let len = bytes.len() as u64;
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|x| x.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= len => {}
                _ => {
                    return Err(Error::BadTensor {
                        tensor: t.name.clone(),
                        reason: format!(
                            "data [{} + {}, {} bytes] lies outside the file of {len} bytes",
                            data_offset, t.offset, t.n_bytes
                        ),
                    })
                }
            }
        }

        // a tensor's data must not run into the next one's (a wrong type or shape would)
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for w in by_offset.windows(2) {
            if w[0].offset + w[0].n_bytes > w[1].offset {
                return Err(Error::BadTensor {
                    tensor: w[0].name.clone(),
                    reason: format!(
                        "data [{} + {}, {} bytes] overlaps tensor \"{}\" at {}",
                        data_offset, w[0].offset, w[0].n_bytes, w[1].name, w[1].offset
                    ),
                });
            }
        }

        Ok(Gguf {
            storage,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn meta_err(key: &str, reason: &str) -> Error {
        Error::Metadata {
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    /// An integer value of any width, `None` when absent, an error when of another type.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| Self::meta_err(key, "expected an integer")),
        }
    }

    /// A non-negative integer that fits in usize.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get_i64(key)? {
            None => Ok(None),
            Some(x) => usize::try_from(x)
                .map(Some)
                .map_err(|_| Self::meta_err(key, "expected a non-negative integer")),
        }
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::meta_err(key, "expected a number")),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| Self::meta_err(key, "expected a string")),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Self::meta_err(key, "expected a bool")),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&Array>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| Self::meta_err(key, "expected an array")),
        }
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor (bounds were checked at parse time).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        let end = start + info.n_bytes as usize;
        self.storage.bytes().get(start..end).unwrap_or(&[])
    }

    /// Looks a tensor up by name and returns its info and bytes.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        Ok((info, self.tensor_data(info)))
    }

    /// Offset of the tensor data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Tells the OS that bytes `start..start + len` of the file image will not be read again
    /// soon (their pages leave the resident set; a later read maps them in again). Used after
    /// copying weights into another layout. Does nothing for in-memory images.
    pub fn release_range(&self, start: usize, len: usize) {
        #[cfg(unix)]
        if let Storage::Mmap(m) = &self.storage {
            const PAGE: usize = 4096;
            let first = start.div_ceil(PAGE) * PAGE;
            let end = (start + len).min(m.len()) / PAGE * PAGE;
            if end > first {
                // SAFETY: the mapping is a read-only view of a file that is never written
                // through it: dropped pages come back from the file with the same contents
                // on the next access, so live borrows keep seeing the same bytes. The
                // range is inside the mapping (clamped above).
                #[allow(unsafe_code)]
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first)
                };
            }
        }
    }

    /// The whole file image.
    pub fn image(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Total size of the file image.
    pub fn file_size(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// Number of weights in all tensors.
    pub fn n_params(&self) -> u64 {
        self.tensors().iter().map(|t| t.n_elements()).sum()
    }

    /// llama.cpp's name for `general.file_type` ("Q4_K - Medium"), else the type holding
    /// most bytes of the matrices.
    pub fn file_type_name(&self) -> String {
        let named = match self.get_i64("general.file_type").ok().flatten() {
            Some(0) => "all F32",
            Some(1) => "F16",
            Some(2) => "Q4_0",
            Some(3) => "Q4_1",
            Some(7) => "Q8_0",
            Some(8) => "Q5_0",
            Some(9) => "Q5_1",
            Some(10) => "Q2_K - Medium",
            Some(11) => "Q3_K - Small",
            Some(12) => "Q3_K - Medium",
            Some(13) => "Q3_K - Large",
            Some(14) => "Q4_K - Small",
            Some(15) => "Q4_K - Medium",
            Some(16) => "Q5_K - Small",
            Some(17) => "Q5_K - Medium",
            Some(18) => "Q6_K",
            Some(32) => "BF16",
            Some(36) => "TQ1_0 - 1.69 bpw ternary",
            Some(37) => "TQ2_0 - 2.06 bpw ternary",
            _ => "",
        };
        if !named.is_empty() {
            return named.to_string();
        }
        let mut bytes: std::collections::HashMap<String, u64> = Default::default();
        for t in self.tensors() {
            if t.dims.len() >= 2 {
                *bytes.entry(t.ty.to_string()).or_default() += t.n_bytes;
            }
        }
        bytes
            .into_iter()
            .max_by_key(|x| x.1)
            .map(|x| x.0)
            .unwrap_or_default()
    }
}

/// Bounds-checked little-endian reader.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                need: n as u64,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Rejects a count of items that could not fit in the bytes left.
    fn check_count(&self, what: &str, count: u64, min_item_size: usize) -> Result<()> {
        if count > (self.remaining() / min_item_size.max(1)) as u64 {
            return Err(Error::BadCount {
                what: what.to_string(),
                count,
                len: self.buf.len() as u64,
            });
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(Error::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                need: len,
                len: self.buf.len() as u64,
            });
        }
        let offset = self.pos as u64;
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::BadString { offset })
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::Bool => Value::Bool(self.array::<1>(key)?[0] != 0),
            ValueType::String => Value::String(self.string(key)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Array => Value::Array(self.array_value(key, depth)?),
        })
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<Array> {
        if depth > 8 {
            return Err(Error::Metadata {
                key: key.to_string(),
                reason: "arrays nested too deeply".into(),
            });
        }
        let ty_id = self.u32(key)?;
        let ty = ValueType::from_id(ty_id).ok_or_else(|| Error::BadValueType {
            key: key.to_string(),
            got: ty_id,
        })?;
        let n = self.u64(key)?;
        self.check_count(&format!("array {key:?}"), n, ty.min_size())?;
        let n = n as usize;
        macro_rules! prim {
            ($variant:ident, $t:ty) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(<$t>::from_le_bytes(self.array(key)?));
                }
                Array::$variant(v)
            }};
        }
        Ok(match ty {
            ValueType::U8 => Array::U8(self.take(n, key)?.to_vec()),
            ValueType::I8 => Array::I8(self.take(n, key)?.iter().map(|&b| b as i8).collect()),
            ValueType::Bool => Array::Bool(self.take(n, key)?.iter().map(|&b| b != 0).collect()),
            ValueType::U16 => prim!(U16, u16),
            ValueType::I16 => prim!(I16, i16),
            ValueType::U32 => prim!(U32, u32),
            ValueType::I32 => prim!(I32, i32),
            ValueType::F32 => prim!(F32, f32),
            ValueType::U64 => prim!(U64, u64),
            ValueType::I64 => prim!(I64, i64),
            ValueType::F64 => prim!(F64, f64),
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(key)?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufWriter;

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", Value::String("llama".into()));
        w.add_metadata("llama.block_count", Value::U32(2));
        w.add_metadata("x.f", Value::F32(1.5));
        w.add_metadata(
            "tok",
            Value::Array(Array::String(vec!["a".into(), "bc".into()])),
        );
        w.add_metadata(
            "nested",
            Value::Array(Array::Array(vec![
                Array::I32(vec![1, 2]),
                Array::I32(vec![]),
            ])),
        );
        w.add_tensor("t0", GgmlType::F32, &[4, 2], vec![0u8; 32])
            .unwrap();
        w.add_tensor("t1", GgmlType::Q8_0, &[64], vec![7u8; 68])
            .unwrap();
        let mut out = Vec::new();
        w.write_to(&mut out).unwrap();
        out
    }

    #[test]
    fn roundtrip() {
        let g = Gguf::from_bytes(sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), Some("llama"));
        assert_eq!(g.get_usize("llama.block_count").unwrap(), Some(2));
        assert_eq!(g.get_f64("x.f").unwrap(), Some(1.5));
        assert_eq!(
            g.get_array("tok").unwrap().unwrap(),
            &Array::String(vec!["a".into(), "bc".into()])
        );
        assert!(matches!(g.get_array("nested").unwrap().unwrap(), Array::Array(v) if v.len() == 2));
        let (info, data) = g.tensor("t1").unwrap();
        assert_eq!(info.dims, vec![64]);
        assert_eq!(data, &[7u8; 68][..]);
        assert_eq!(g.tensor("t0").unwrap().0.n_rows(), 2);
        assert!(g.get_str("llama.block_count").is_err());
        assert!(matches!(g.tensor("nope"), Err(Error::MissingTensor(_))));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let r = Gguf::from_bytes(bytes[..len].to_vec());
            assert!(r.is_err(), "truncated to {len} bytes parsed");
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(Gguf::from_bytes(b), Err(Error::BadMagic { .. })));
        let mut b = sample();
        b[4] = 1;
        assert!(matches!(
            Gguf::from_bytes(b),
            Err(Error::UnsupportedVersion(1))
        ));
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        // tensor count at 8..16, kv count at 16..24
        let mut b = sample();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::from_bytes(b), Err(Error::BadCount { .. })));
        let mut b = sample();
        b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(Gguf::from_bytes(b), Err(Error::BadCount { .. })));
        // first key length at 24..32
        let mut b = sample();
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::from_bytes(b), Err(Error::Truncated { .. })));
    }

    #[test]
    fn huge_array_length_is_rejected() {
        let bytes = sample();
        // find the "tok" array: key len 3 + "tok" + type 9 + elem type 8 + count 2
        let pat = [
            3u8, 0, 0, 0, 0, 0, 0, 0, b't', b'o', b'k', 9, 0, 0, 0, 8, 0, 0, 0,
        ];
        let at = bytes.windows(pat.len()).position(|w| w == pat).unwrap();
        let mut b = bytes.clone();
        let c = at + pat.len();
        b[c..c + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(matches!(Gguf::from_bytes(b), Err(Error::BadCount { .. })));
    }

    #[test]
    fn out_of_range_tensor_offset() {
        let bytes = sample();
        let g = Gguf::from_bytes(bytes.clone()).unwrap();
        let t1 = g.tensor_info("t1").unwrap().clone();
        // the offset field of t1 is the 8 bytes before the data section padding; find it
        let pat = t1.offset.to_le_bytes();
        let name_at = bytes.windows(2).rposition(|w| w == b"t1").unwrap();
        // name, n_dims(4), dim(8), type(4), offset(8)
        let off_at = name_at + 2 + 4 + 8 + 4;
        assert_eq!(&bytes[off_at..off_at + 8], &pat);
        let mut b = bytes.clone();
        b[off_at..off_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(Gguf::from_bytes(b), Err(Error::BadTensor { .. })));
        let mut b = bytes.clone();
        b[off_at..off_at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
        assert!(matches!(Gguf::from_bytes(b), Err(Error::BadTensor { .. })));
        let mut b = bytes.clone();
        b[off_at..off_at + 8].copy_from_slice(&3u64.to_le_bytes());
        assert!(matches!(Gguf::from_bytes(b), Err(Error::BadTensor { .. })));
        // aligned and inside the file, but on top of t0's data
        let mut b = bytes.clone();
        b[off_at..off_at + 8].copy_from_slice(&0u64.to_le_bytes());
        match Gguf::from_bytes(b) {
            Err(Error::BadTensor { reason, .. }) => {
                assert!(reason.contains("overlaps"), "{reason}")
            }
            other => panic!("overlapping tensors accepted: {:?}", other.map(|_| ())),
        }
        // t0 twice as long (a wrong shape or type) runs into t1
        let dim_at = bytes.windows(2).position(|w| w == b"t0").unwrap() + 2 + 4;
        let mut b = bytes;
        b[dim_at..dim_at + 8].copy_from_slice(&8u64.to_le_bytes());
        assert!(matches!(Gguf::from_bytes(b), Err(Error::BadTensor { .. })));
    }

    #[test]
    fn random_corruption_never_panics() {
        let bytes = sample();
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..3000 {
            let mut b = bytes.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state as usize) % b.len();
                b[i] = (state >> 32) as u8;
            }
            let _ = Gguf::from_bytes(b);
        }
    }
}
