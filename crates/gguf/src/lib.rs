//! GGUF v2/v3 reader and writer.
//!
//! The reader maps the file (or takes owned bytes) and parses the header, the metadata and
//! the tensor index eagerly; tensor data stays in the mapping and is handed out as byte
//! slices. Every count, length, offset and size read from the file is checked against the
//! bytes that are actually there before anything is allocated, so a truncated or hostile
//! file gives an [`Error`], never a panic or a huge allocation.
//!
//! The writer produces files the reader (and llama.cpp) accept; tests use it for fixtures and
//! `capy quantize` will use it for output. The only `unsafe` is the memory map itself.
#![deny(unsafe_code)]

mod reader;
mod types;
mod writer;

pub use reader::{Gguf, TensorInfo};
pub use types::{Array, GgmlType, Value, ValueType};
pub use writer::GgufWriter;

/// The GGUF magic, "GGUF" read as little-endian u32.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's maximum number of tensor dimensions.
pub const MAX_DIMS: usize = 4;

/// Errors from reading or writing GGUF files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: bad magic {got:02x?}")]
    BadMagic { got: [u8; 4] },
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("truncated GGUF: need {need} bytes at offset {offset} for {what}, file has {len}")]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        len: u64,
    },
    #[error("GGUF {what} count {count} is impossible for a file of {len} bytes")]
    BadCount { what: String, count: u64, len: u64 },
    #[error("unknown GGUF metadata value type {got} for key {key:?}")]
    BadValueType { key: String, got: u32 },
    #[error("invalid UTF-8 in GGUF string at offset {offset}")]
    BadString { offset: u64 },
    #[error("duplicate {what} {name:?}")]
    Duplicate { what: &'static str, name: String },
    #[error("tensor {tensor:?}: {reason}")]
    BadTensor { tensor: String, reason: String },
    #[error("tensor {tensor:?} has unknown ggml type id {got}")]
    UnknownType { tensor: String, got: u32 },
    #[error("bad general.alignment {0}: must be a power of two")]
    BadAlignment(u64),
    #[error("metadata key {key:?}: {reason}")]
    Metadata { key: String, reason: String },
    #[error("tensor {0:?} not found")]
    MissingTensor(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
