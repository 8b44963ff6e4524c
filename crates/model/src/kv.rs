//! KV cache: per layer, per sequence, a contiguous run of positions, stored as f16 (as
//! llama.cpp's default cache; half the memory of f32).
//!
//! Keys are kept transposed in tiles of [`KV_TILE`] positions (`[n_embd_k, KV_TILE]` per
//! tile), so flash attention reads each head's tile as a `[head_dim, KV_TILE]` matrix;
//! values are row-major (`[pos, n_embd_v]`).

use capy_kernels::attn::{KvView, KV_TILE};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::{Error, Result};

/// Keys and values of every layer for `n_seq` sequences of up to `n_ctx` positions.
pub struct KvCache {
    pub n_seq: usize,
    pub n_ctx: usize,
    pub n_embd_k: usize,
    pub n_embd_v: usize,
    /// per layer: `[n_seq, n_tiles, n_embd_k, KV_TILE]`
    k: Vec<Vec<f16>>,
    /// `n_ctx` rounded up to whole tiles
    n_tiles: usize,
    /// per layer: `[n_seq, n_ctx, n_embd_v]`
    v: Vec<Vec<f16>>,
    /// Number of valid positions per sequence.
    seq_len: Vec<usize>,
}

impl KvCache {
    pub fn new(
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_embd_k: usize,
        n_embd_v: usize,
    ) -> KvCache {
        let n_tiles = n_ctx.div_ceil(KV_TILE);
        KvCache {
            n_tiles,
            n_seq,
            n_ctx,
            n_embd_k,
            n_embd_v,
            k: (0..n_layer)
                .map(|_| vec![f16::ZERO; n_seq * n_tiles * KV_TILE * n_embd_k])
                .collect(),
            v: (0..n_layer)
                .map(|_| vec![f16::ZERO; n_seq * n_ctx * n_embd_v])
                .collect(),
            seq_len: vec![0; n_seq],
        }
    }

    /// Bytes a cache of these sizes holds.
    pub fn bytes_for(
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_embd_k: usize,
        n_embd_v: usize,
    ) -> usize {
        let per_seq = n_ctx.div_ceil(KV_TILE) * KV_TILE * n_embd_k + n_ctx * n_embd_v;
        n_layer * n_seq * per_seq * 2
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|l| l.len() * 2).sum()
    }

    pub fn seq_len(&self, seq: usize) -> usize {
        self.seq_len.get(seq).copied().unwrap_or(0)
    }

    /// Forgets positions `len..` of a sequence.
    pub fn truncate(&mut self, seq: usize, len: usize) -> Result<()> {
        let n_seq = self.n_seq;
        let l = self
            .seq_len
            .get_mut(seq)
            .ok_or(Error::BadSequence { seq, n_seq })?;
        *l = (*l).min(len);
        Ok(())
    }

    pub fn clear(&mut self, seq: usize) -> Result<()> {
        self.truncate(seq, 0)
    }

    pub(crate) fn set_seq_len(&mut self, seq: usize, len: usize) {
        if let Some(l) = self.seq_len.get_mut(seq) {
            *l = len;
        }
    }

    /// Stores the key and value of one position.
    pub(crate) fn store(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (ek, ev) = (self.n_embd_k, self.n_embd_v);
        let tile = (seq * self.n_tiles + pos / KV_TILE) * ek * KV_TILE;
        let kt = &mut self.k[layer][tile..tile + ek * KV_TILE];
        for (e, &x) in k[..ek].iter().enumerate() {
            kt[e * KV_TILE + pos % KV_TILE] = f16::from_f32(x);
        }
        let r = seq * self.n_ctx + pos;
        self.v[layer][r * ev..(r + 1) * ev].convert_from_f32_slice(&v[..ev]);
    }

    /// Keys and values of KV head `kvh` of a sequence, for flash attention.
    pub(crate) fn view(
        &self,
        layer: usize,
        seq: usize,
        kvh: usize,
        head_dim: usize,
        head_dim_v: usize,
    ) -> KvView<'_> {
        let (ek, ev) = (self.n_embd_k, self.n_embd_v);
        let kseq = seq * self.n_tiles * KV_TILE * ek;
        let vseq = seq * self.n_ctx * ev;
        KvView {
            k: &self.k[layer][kseq..kseq + self.n_tiles * KV_TILE * ek],
            k_tile_stride: ek * KV_TILE,
            k_off: kvh * head_dim * KV_TILE,
            v: &self.v[layer][vseq..vseq + self.n_ctx * ev],
            v_stride: ev,
            v_off: kvh * head_dim_v,
        }
    }
}
