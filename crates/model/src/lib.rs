//! The transformer: hyper-parameters, weights and the batched forward pass.
//!
//! One decoder serves every supported family; what differs between them (norm placement,
//! RoPE style, QK-norm, gated activation, embedding scale, sliding-window layers) is data in
//! [`Hparams`], not separate code paths. Weights stay in the GGUF mapping. The forward pass
//! ([`Context::decode`]) takes a [`Batch`] of tokens that may belong to several sequences;
//! all scratch memory is sized once when the context is created.

mod attention;
mod forward;
mod hparams;
mod kv;
pub mod quantize;
pub mod synthetic;
mod weights;

pub use capy_kernels::attn::KV_TILE;
pub use capy_kernels::kvquant::KvType;
pub use forward::{Batch, Context, ContextParams};
pub use hparams::{Activation, Arch, Hparams};
pub use kv::{
    kv_type_fits, kv_types, salt_id, BlockCounts, BlockNeed, KvCache, KvLayout, PrefixPlan,
    MAX_GROUPS,
};
pub use weights::{Layer, Model, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gguf(#[from] capy_gguf::Error),
    #[error(transparent)]
    Kernel(#[from] capy_kernels::Error),
    #[error(
        "unsupported model architecture {0:?} (supported: llama, mistral, qwen2, qwen3, gemma3, bitnet)"
    )]
    UnknownArch(String),
    #[error("model metadata lacks {0}")]
    MissingKey(String),
    #[error("bad hyper-parameters: {0}")]
    BadHparams(String),
    #[error("model is missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {tensor}: value {value} is not finite")]
    NonFinite { tensor: String, value: f32 },
    #[error("tensor {tensor}: expected shape {expected:?}, got {got:?}")]
    BadShape {
        tensor: String,
        expected: Vec<u64>,
        got: Vec<u64>,
    },
    #[error("batch of {got} tokens exceeds the context's batch size {max}")]
    BatchTooLarge { got: usize, max: usize },
    #[error("batch asks for {got} output rows, the context holds {max}")]
    TooManyOutputs { got: usize, max: usize },
    #[error("position {pos} of sequence {seq} is outside the context of {n_ctx} tokens")]
    ContextFull {
        seq: usize,
        pos: usize,
        n_ctx: usize,
    },
    #[error("sequence id {seq} out of range (the context has {n_seq} sequences)")]
    BadSequence { seq: usize, n_seq: usize },
    #[error("token id {token} out of range (vocabulary of {n_vocab})")]
    BadToken { token: u32, n_vocab: usize },
    #[error("invalid batch: {0}")]
    BadBatch(String),
    #[error("the KV cache has no free block for sequence {seq} ({n_blocks} blocks in all)")]
    KvFull { seq: usize, n_blocks: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
