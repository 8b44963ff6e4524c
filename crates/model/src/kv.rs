//! KV cache: one pool of fixed-size blocks per layer, stored as f16 (as llama.cpp's default
//! cache; half the memory of f32), and a block table per sequence (paged attention, as in
//! vLLM: Kwon et al., "Efficient Memory Management for Large Language Model Serving with
//! PagedAttention", 2023).
//!
//! A block holds [`KV_TILE`] positions, the attention tile, so flash attention reads whole
//! tiles from one block. Keys are kept transposed per block (`[n_embd_k, KV_TILE]`), so each
//! head's tile is a `[head_dim, KV_TILE]` matrix; values are row-major within the block
//! (`[KV_TILE, n_embd_v]`). Block ids are shared by all layers: a sequence's table names the
//! same block in every layer's pool. Blocks are taken when a sequence first writes a position
//! in them ([`KvCache::reserve`]) and go back to the pool when it is cut short or cleared.

use capy_kernels::attn::{KvView, KV_TILE};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::{Error, Result};

/// Keys and values of every layer for `n_seq` sequences of up to `n_ctx` positions each, in
/// a pool of `n_blocks` blocks of [`KV_TILE`] positions.
pub struct KvCache {
    pub n_seq: usize,
    pub n_ctx: usize,
    pub n_embd_k: usize,
    pub n_embd_v: usize,
    n_blocks: usize,
    /// per layer: `[n_blocks, n_embd_k, KV_TILE]`
    k: Vec<Vec<f16>>,
    /// per layer: `[n_blocks, KV_TILE, n_embd_v]`
    v: Vec<Vec<f16>>,
    /// per sequence: its blocks in position order (position `p` is in `tables[seq][p / KV_TILE]`)
    tables: Vec<Vec<u32>>,
    /// blocks no sequence holds
    free: Vec<u32>,
    /// Number of valid positions per sequence.
    seq_len: Vec<usize>,
}

impl KvCache {
    /// A cache whose pool holds every sequence at its full context (`n_seq` x `n_ctx`
    /// positions, in whole blocks).
    pub fn new(
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_embd_k: usize,
        n_embd_v: usize,
    ) -> KvCache {
        let n_blocks = n_seq * n_ctx.div_ceil(KV_TILE);
        KvCache {
            n_seq,
            n_ctx,
            n_embd_k,
            n_embd_v,
            n_blocks,
            k: (0..n_layer)
                .map(|_| vec![f16::ZERO; n_blocks * KV_TILE * n_embd_k])
                .collect(),
            v: (0..n_layer)
                .map(|_| vec![f16::ZERO; n_blocks * KV_TILE * n_embd_v])
                .collect(),
            tables: vec![Vec::new(); n_seq],
            // taken from the end: block 0 first
            free: (0..n_blocks as u32).rev().collect(),
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
        let n_blocks = n_seq * n_ctx.div_ceil(KV_TILE);
        n_layer * n_blocks * KV_TILE * (n_embd_k + n_embd_v) * 2
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|l| l.len() * 2).sum()
    }

    /// Bytes one block takes across all layers (keys and values).
    pub fn block_bytes(&self) -> usize {
        self.k.len() * KV_TILE * (self.n_embd_k + self.n_embd_v) * 2
    }

    /// Blocks in the pool, and how many no sequence holds.
    pub fn blocks(&self) -> (usize, usize) {
        (self.n_blocks, self.free.len())
    }

    pub fn seq_len(&self, seq: usize) -> usize {
        self.seq_len.get(seq).copied().unwrap_or(0)
    }

    /// Makes sure a sequence has blocks for positions `0..len`, taking free ones.
    ///
    /// # Errors
    /// [`Error::BadSequence`]; [`Error::KvFull`] when the pool has no free block left (the
    /// blocks taken before stay with the sequence).
    pub fn reserve(&mut self, seq: usize, len: usize) -> Result<()> {
        let n_seq = self.n_seq;
        let table = self
            .tables
            .get_mut(seq)
            .ok_or(Error::BadSequence { seq, n_seq })?;
        while table.len() < len.div_ceil(KV_TILE) {
            let b = self.free.pop().ok_or(Error::KvFull {
                seq,
                n_blocks: self.n_blocks,
            })?;
            table.push(b);
        }
        Ok(())
    }

    /// Forgets positions `len..` of a sequence; blocks it no longer needs go back to the
    /// pool.
    pub fn truncate(&mut self, seq: usize, len: usize) -> Result<()> {
        let n_seq = self.n_seq;
        let l = self
            .seq_len
            .get_mut(seq)
            .ok_or(Error::BadSequence { seq, n_seq })?;
        *l = (*l).min(len);
        let keep = (*l).div_ceil(KV_TILE);
        let table = &mut self.tables[seq];
        if table.len() > keep {
            self.free.extend(table.drain(keep..).rev());
        }
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

    /// Stores the key and value of one position, whose block [`KvCache::reserve`] gave.
    pub(crate) fn store(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (ek, ev) = (self.n_embd_k, self.n_embd_v);
        let b = self.tables[seq][pos / KV_TILE] as usize;
        let (off, row) = (pos % KV_TILE, b * KV_TILE + pos % KV_TILE);
        let kt = &mut self.k[layer][b * ek * KV_TILE..(b + 1) * ek * KV_TILE];
        for (e, &x) in k[..ek].iter().enumerate() {
            kt[e * KV_TILE + off] = f16::from_f32(x);
        }
        self.v[layer][row * ev..(row + 1) * ev].convert_from_f32_slice(&v[..ev]);
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
        KvView {
            blocks: &self.tables[seq],
            k: &self.k[layer],
            k_block_stride: ek * KV_TILE,
            k_off: kvh * head_dim * KV_TILE,
            v: &self.v[layer],
            v_block_stride: KV_TILE * ev,
            v_stride: ev,
            v_off: kvh * head_dim_v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_taken_on_demand_and_returned() {
        let mut kv = KvCache::new(1, 2, 3 * KV_TILE, 4, 4);
        assert_eq!(kv.blocks(), (6, 6));
        kv.reserve(0, 1).unwrap();
        kv.reserve(1, KV_TILE + 1).unwrap();
        assert_eq!(kv.blocks(), (6, 3));
        kv.set_seq_len(1, KV_TILE + 1);
        kv.truncate(1, KV_TILE).unwrap();
        assert_eq!(
            kv.blocks(),
            (6, 4),
            "the second block of seq 1 is free again"
        );
        kv.reserve(0, 3 * KV_TILE).unwrap();
        assert_eq!(kv.blocks(), (6, 2));
        assert!(matches!(
            kv.reserve(1, 4 * KV_TILE),
            Err(Error::KvFull { seq: 1, .. })
        ));
        assert_eq!(kv.blocks(), (6, 0));
        kv.clear(0).unwrap();
        kv.reserve(1, 4 * KV_TILE).unwrap();
        assert_eq!(kv.blocks(), (6, 2));
        assert!(kv.reserve(5, 1).is_err());
    }
}
