//! KV cache: per layer, per sequence, a contiguous run of positions, stored as f16 (as
//! llama.cpp's default cache; half the memory of f32).

use half::f16;

use crate::{Error, Result};

/// Keys and values of every layer for `n_seq` sequences of up to `n_ctx` positions.
pub struct KvCache {
    pub n_seq: usize,
    pub n_ctx: usize,
    pub n_embd_k: usize,
    pub n_embd_v: usize,
    /// per layer: `[n_seq, n_ctx, n_embd_k]`
    k: Vec<Vec<f16>>,
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
        KvCache {
            n_seq,
            n_ctx,
            n_embd_k,
            n_embd_v,
            k: (0..n_layer)
                .map(|_| vec![f16::ZERO; n_seq * n_ctx * n_embd_k])
                .collect(),
            v: (0..n_layer)
                .map(|_| vec![f16::ZERO; n_seq * n_ctx * n_embd_v])
                .collect(),
            seq_len: vec![0; n_seq],
        }
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.k.len() * self.n_seq * self.n_ctx * (self.n_embd_k + self.n_embd_v) * 2
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

    fn row(&self, seq: usize, pos: usize) -> usize {
        seq * self.n_ctx + pos
    }

    pub(crate) fn k_row_mut(&mut self, layer: usize, seq: usize, pos: usize) -> &mut [f16] {
        let (r, n) = (self.row(seq, pos), self.n_embd_k);
        &mut self.k[layer][r * n..(r + 1) * n]
    }

    pub(crate) fn v_row_mut(&mut self, layer: usize, seq: usize, pos: usize) -> &mut [f16] {
        let (r, n) = (self.row(seq, pos), self.n_embd_v);
        &mut self.v[layer][r * n..(r + 1) * n]
    }

    /// Keys of positions `0..len` of a sequence: `[len, n_embd_k]`.
    pub(crate) fn k_seq(&self, layer: usize, seq: usize, len: usize) -> &[f16] {
        let r = self.row(seq, 0);
        &self.k[layer][r * self.n_embd_k..(r + len) * self.n_embd_k]
    }

    pub(crate) fn v_seq(&self, layer: usize, seq: usize, len: usize) -> &[f16] {
        let r = self.row(seq, 0);
        &self.v[layer][r * self.n_embd_v..(r + len) * self.n_embd_v]
    }
}
