//! KV cache: one pool of fixed-size blocks per layer, stored as f16 (as llama.cpp's default
//! cache; half the memory of f32) or in an 8-bit format (`q8_0`, `fp8`:
//! [`capy_kernels::kvquant`], keys and values chosen separately), a block table per sequence (paged attention, as in vLLM:
//! Kwon et al., "Efficient Memory Management for Large Language Model Serving with
//! PagedAttention", 2023), and a prefix cache over the blocks (vLLM's automatic prefix
//! caching; SGLang's radix cache shares prefixes the same way at token granularity).
//!
//! A block holds [`KV_TILE`] positions, the attention tile, so flash attention reads whole
//! tiles from one block. Keys are kept transposed per block (`[n_embd_k, KV_TILE]`), so each
//! head's tile is a `[head_dim, KV_TILE]` matrix; values are row-major within the block
//! (`[KV_TILE, n_embd_v]`). Block ids are shared by all layers: a sequence's table names the
//! same block in every layer's pool. The pool is allocated zeroed and untouched, so memory
//! is only committed for the blocks sequences actually write.
//!
//! **Sharing.** Every full block a sequence computes is entered in an index under the hash
//! chain `hash(parent's hash, the block's tokens, salt)`, the root's hash coming from the salt
//! alone, so requests with different salts never meet. A sequence that ends leaves its last,
//! partly filled block in the index too. [`KvCache::plan_prefix`] walks the chain of a new
//! prompt: each full block found is mapped into the new sequence's table (reference counted,
//! read-only); where the walk stops, the cached block sharing the most leading tokens with the
//! rest of the prompt (a partly filled one, or a full one the prompt leaves part-way) is
//! copied into a block of the sequence's own (copy on write), which then continues it. A
//! block is only ever written while its sequence holds it alone and it is out of the index.
//! Blocks no sequence holds but the index names stay cached until the pool needs them and are
//! then evicted least recently released first; a sequence's blocks are released last block
//! first, so leaves go before the blocks they continue.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use capy_kernels::attn::{KvData, KvSide, KvView, KV_TILE};
use capy_kernels::kvquant::{quantize_group, KvType, QK};
use half::f16;
use half::slice::HalfBitsSliceExt;

use crate::{Error, Result};

/// A cached block's place in the index: the chain it continues and the tokens it holds.
#[derive(Clone, Debug)]
struct Key {
    /// hash of the block before it (or of the root)
    parent: u64,
    /// its own hash, when it is full (the parent of the next block)
    hash: Option<u64>,
    /// `[1..=KV_TILE]` tokens at the block's positions
    tokens: Vec<u32>,
}

#[derive(Clone, Debug, Default)]
struct BlockMeta {
    /// sequences whose tables hold it
    refs: u32,
    /// set while the block is in the index
    key: Option<Key>,
    /// set while the block is unreferenced and cached: its place in the eviction order
    lru: Option<u64>,
}

/// Counts of the pool's blocks, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    pub total: usize,
    /// held by at least one sequence
    pub used: usize,
    /// held by none but kept for the prefix cache (evictable)
    pub cached: usize,
    /// holding nothing
    pub free: usize,
}

/// What [`KvCache::plan_prefix`] found for a prompt.
#[derive(Clone, Debug, Default)]
pub struct PrefixPlan {
    salt: u64,
    /// cached full blocks to map, in position order
    shared: Vec<u32>,
    /// a cached block to copy and how many of its leading positions to keep
    partial: Option<(u32, usize)>,
    /// prompt tokens the cache supplies
    pub matched: usize,
    /// of the blocks needed for the whole prompt, those the pool must still provide (the
    /// blocks `shared` maps are not among them; a copied block is)
    pub new_blocks: usize,
    /// unreferenced cached blocks `shared` takes out of the evictable set
    pub revived: usize,
}

/// One side (keys or values) of every layer's blocks: f16 bits, or 8-bit codes and scales.
/// Both zero-allocated, untouched until written.
enum Side {
    F16(Vec<u16>),
    Q8 {
        ty: KvType,
        codes: Vec<u8>,
        scales: Vec<f32>,
    },
}

impl Side {
    /// Room for `n` blocks of `per_block` values (`per_block / QK` scales for 8-bit types).
    fn new(ty: KvType, n: usize, per_block: usize) -> Side {
        match ty {
            KvType::F16 => Side::F16(vec![0u16; n * per_block]),
            ty => Side::Q8 {
                ty,
                codes: vec![0u8; n * per_block],
                scales: vec![0.0f32; n * per_block / QK],
            },
        }
    }

    fn ty(&self) -> KvType {
        match self {
            Side::F16(_) => KvType::F16,
            Side::Q8 { ty, .. } => *ty,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Side::F16(d) => d.len() * 2,
            Side::Q8 { codes, scales, .. } => codes.len() + scales.len() * 4,
        }
    }

    /// Copies pool block `src` to `dst` (`per_block` values each).
    fn copy(&mut self, src: usize, dst: usize, per_block: usize) {
        match self {
            Side::F16(d) => d.copy_within(src * per_block..(src + 1) * per_block, dst * per_block),
            Side::Q8 { codes, scales, .. } => {
                codes.copy_within(src * per_block..(src + 1) * per_block, dst * per_block);
                let ps = per_block / QK;
                scales.copy_within(src * ps..(src + 1) * ps, dst * ps);
            }
        }
    }

    /// Writes `x` (one position's values): element `e` at `at + e * stride`; an 8-bit side's
    /// scale of group `g` at `s_at + g * s_stride`.
    fn write(&mut self, x: &[f32], at: usize, stride: usize, s_at: usize, s_stride: usize) {
        match self {
            Side::F16(d) => {
                for (e, &v) in x.iter().enumerate() {
                    d[at + e * stride] = f16::from_f32(v).to_bits();
                }
            }
            Side::Q8 { ty, codes, scales } => {
                for (g, group) in x.chunks_exact(QK).enumerate() {
                    let c = &mut codes[at + g * QK * stride..];
                    scales[s_at + g * s_stride] = quantize_group(*ty, group, c, stride);
                }
            }
        }
    }

    /// The side of layer `layer` as flash attention reads it: `per_block` values per pool
    /// block, the head's first value `off` (rows `stride` apart) and first scale `s_off`
    /// (rows `s_stride` apart) in a block.
    #[allow(clippy::too_many_arguments)]
    fn view(
        &self,
        layer: usize,
        n_blocks: usize,
        per_block: usize,
        off: usize,
        stride: usize,
        s_off: usize,
        s_stride: usize,
    ) -> KvSide<'_> {
        let ps = per_block / QK;
        let data = match self {
            Side::F16(d) => KvData::F16(
                d[layer * n_blocks * per_block..][..n_blocks * per_block].reinterpret_cast(),
            ),
            Side::Q8 { ty, codes, scales } => KvData::Q8 {
                ty: *ty,
                codes: &codes[layer * n_blocks * per_block..][..n_blocks * per_block],
                scales: &scales[layer * n_blocks * ps..][..n_blocks * ps],
            },
        };
        KvSide {
            data,
            block_stride: per_block,
            off,
            stride,
            s_block_stride: ps,
            s_off,
            s_stride,
        }
    }
}

/// Whether a model of these head sizes can keep its cache as `ty`: the 8-bit types need
/// head sizes in whole groups of 32.
pub fn kv_type_fits(ty: KvType, head_dim: usize, head_dim_v: usize) -> bool {
    !ty.is_quantized() || (head_dim.is_multiple_of(QK) && head_dim_v.is_multiple_of(QK))
}

/// The key and value types a model of `hp` gets for the `wanted` ones: each as asked where
/// its head sizes allow it ([`kv_type_fits`]), f16 otherwise.
pub fn kv_types(hp: &crate::Hparams, wanted: (KvType, KvType)) -> (KvType, KvType) {
    let fit = |ty| {
        if kv_type_fits(ty, hp.head_dim, hp.head_dim_v) {
            ty
        } else {
            KvType::F16
        }
    };
    (fit(wanted.0), fit(wanted.1))
}

/// Keys and values of every layer for up to `n_seq` sequences of up to `n_ctx` positions
/// each, in a pool of `n_blocks` blocks of [`KV_TILE`] positions.
pub struct KvCache {
    pub n_seq: usize,
    pub n_ctx: usize,
    pub n_embd_k: usize,
    pub n_embd_v: usize,
    n_layer: usize,
    n_blocks: usize,
    /// `[n_layer, n_blocks, n_embd_k, KV_TILE]` (8-bit scales: `[.., n_embd_k / 32, KV_TILE]`)
    k: Side,
    /// `[n_layer, n_blocks, KV_TILE, n_embd_v]` (8-bit scales: `[.., KV_TILE, n_embd_v / 32]`)
    v: Side,
    /// per sequence: its blocks in position order (position `p` is in `tables[seq][p / KV_TILE]`)
    tables: Vec<Vec<u32>>,
    /// per sequence: the tokens at its positions (their number is its length)
    tokens: Vec<Vec<u32>>,
    /// per sequence: the hashes of its full blocks (block `i`'s is `chain[i]`)
    chain: Vec<Vec<u64>>,
    /// per sequence: its salt
    salt: Vec<u64>,
    meta: Vec<BlockMeta>,
    /// blocks holding nothing, taken from the end
    free: Vec<u32>,
    /// unreferenced cached blocks by release order (evicted from the front)
    lru: BTreeMap<u64, u32>,
    /// cached blocks by the hash of the block they continue
    index: HashMap<u64, Vec<u32>>,
    tick: u64,
}

fn hash_of(parts: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// The salt's number: requests given different salts never share a block.
pub fn salt_id(salt: &str) -> u64 {
    if salt.is_empty() {
        0
    } else {
        hash_of(("capy-salt", salt))
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
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
        let f16 = (KvType::F16, KvType::F16);
        KvCache::with_blocks(n_layer, n_seq, n_ctx, n_embd_k, n_embd_v, n_blocks, f16)
    }

    /// A cache of `n_blocks` blocks shared by up to `n_seq` sequences, each of at most
    /// `n_ctx` positions, keys and values stored as `types` (an 8-bit type needs the head
    /// sizes in whole groups of 32, [`kv_type_fits`]: the caller checks; a side whose width
    /// is not is kept as f16).
    pub fn with_blocks(
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_embd_k: usize,
        n_embd_v: usize,
        n_blocks: usize,
        types: (KvType, KvType),
    ) -> KvCache {
        let n_blocks = n_blocks.max(1);
        let fits = |ty: KvType, n: usize| {
            if n.is_multiple_of(QK) {
                ty
            } else {
                KvType::F16
            }
        };
        KvCache {
            n_seq,
            n_ctx,
            n_embd_k,
            n_embd_v,
            n_layer,
            n_blocks,
            // zeroed allocations: the pages are committed when first written
            k: Side::new(
                fits(types.0, n_embd_k),
                n_layer * n_blocks,
                KV_TILE * n_embd_k,
            ),
            v: Side::new(
                fits(types.1, n_embd_v),
                n_layer * n_blocks,
                KV_TILE * n_embd_v,
            ),
            tables: vec![Vec::new(); n_seq],
            tokens: vec![Vec::new(); n_seq],
            chain: vec![Vec::new(); n_seq],
            salt: vec![0; n_seq],
            meta: vec![BlockMeta::default(); n_blocks],
            // taken from the end: block 0 first
            free: (0..n_blocks as u32).rev().collect(),
            lru: BTreeMap::new(),
            index: HashMap::new(),
            tick: 0,
        }
    }

    /// Bytes one block takes across `n_layer` layers (keys and values of `types`).
    pub fn block_bytes_for(
        n_layer: usize,
        n_embd_k: usize,
        n_embd_v: usize,
        types: (KvType, KvType),
    ) -> usize {
        n_layer * KV_TILE * (types.0.row_bytes(n_embd_k) + types.1.row_bytes(n_embd_v))
    }

    /// The key and value types the cache stores.
    pub fn types(&self) -> (KvType, KvType) {
        (self.k.ty(), self.v.ty())
    }

    /// Bytes a cache of these sizes holds ([`KvCache::new`]).
    pub fn bytes_for(
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_embd_k: usize,
        n_embd_v: usize,
    ) -> usize {
        let f16 = (KvType::F16, KvType::F16);
        n_seq * n_ctx.div_ceil(KV_TILE) * KvCache::block_bytes_for(n_layer, n_embd_k, n_embd_v, f16)
    }

    /// Bytes held by the pool.
    pub fn bytes(&self) -> usize {
        self.k.bytes() + self.v.bytes()
    }

    /// Bytes one block takes across all layers (keys and values).
    pub fn block_bytes(&self) -> usize {
        KvCache::block_bytes_for(self.n_layer, self.n_embd_k, self.n_embd_v, self.types())
    }

    /// Blocks in the pool, and how many a sequence can take now (free or evictable).
    pub fn blocks(&self) -> (usize, usize) {
        (self.n_blocks, self.available())
    }

    /// The pool's blocks by state.
    pub fn block_counts(&self) -> BlockCounts {
        BlockCounts {
            total: self.n_blocks,
            used: self.n_blocks - self.free.len() - self.lru.len(),
            cached: self.lru.len(),
            free: self.free.len(),
        }
    }

    /// Blocks a sequence can take now: free ones and unreferenced cached ones.
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    pub fn seq_len(&self, seq: usize) -> usize {
        self.tokens.get(seq).map_or(0, Vec::len)
    }

    /// Blocks a sequence holds.
    pub fn seq_blocks(&self, seq: usize) -> &[u32] {
        self.tables.get(seq).map_or(&[], |t| t.as_slice())
    }

    fn check_seq(&self, seq: usize) -> Result<()> {
        if seq < self.n_seq {
            Ok(())
        } else {
            Err(Error::BadSequence {
                seq,
                n_seq: self.n_seq,
            })
        }
    }

    /// A block for a sequence to write: a free one, else the least recently released cached
    /// one (leaving the index). Its reference count is 1.
    fn take_block(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.lru.pop_first()?;
                self.meta[b as usize].lru = None;
                self.unindex(b);
                b
            }
        };
        self.meta[b as usize].refs = 1;
        Some(b)
    }

    /// Drops one reference; an unreferenced block is cached if the index names it, free
    /// otherwise.
    fn unref(&mut self, b: u32) {
        let m = &mut self.meta[b as usize];
        m.refs = m.refs.saturating_sub(1);
        if m.refs == 0 {
            if m.key.is_some() {
                self.tick += 1;
                m.lru = Some(self.tick);
                self.lru.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Takes a reference, reviving an unreferenced cached block.
    fn add_ref(&mut self, b: u32) {
        let m = &mut self.meta[b as usize];
        if let Some(t) = m.lru.take() {
            self.lru.remove(&t);
        }
        m.refs += 1;
    }

    fn unindex(&mut self, b: u32) {
        if let Some(key) = self.meta[b as usize].key.take() {
            if let Some(list) = self.index.get_mut(&key.parent) {
                list.retain(|&x| x != b);
                if list.is_empty() {
                    self.index.remove(&key.parent);
                }
            }
        }
    }

    fn insert_index(&mut self, b: u32, key: Key) {
        self.index.entry(key.parent).or_default().push(b);
        self.meta[b as usize].key = Some(key);
    }

    /// Copies block `src` into block `dst` in every layer.
    fn copy_block(&mut self, src: u32, dst: u32) {
        let (nb, ek, ev) = (self.n_blocks, self.n_embd_k, self.n_embd_v);
        for layer in 0..self.n_layer {
            let (s, d) = (layer * nb + src as usize, layer * nb + dst as usize);
            self.k.copy(s, d, KV_TILE * ek);
            self.v.copy(s, d, KV_TILE * ev);
        }
    }

    /// Makes block `i` of a sequence's table safe to write: a block other sequences share is
    /// replaced by a copy; one the sequence holds alone leaves the index.
    fn make_writable(&mut self, seq: usize, i: usize) -> Result<()> {
        let b = self.tables[seq][i];
        if self.meta[b as usize].refs > 1 {
            let nb = self.take_block().ok_or(Error::KvFull {
                seq,
                n_blocks: self.n_blocks,
            })?;
            self.copy_block(b, nb);
            self.unref(b);
            self.tables[seq][i] = nb;
        } else {
            self.unindex(b);
        }
        Ok(())
    }

    /// Makes sure a sequence has blocks it may write for positions from its length to `len`, taking
    /// free ones (or evicting cached ones).
    ///
    /// # Errors
    /// [`Error::BadSequence`]; [`Error::KvFull`] when the pool has no block left (the
    /// blocks taken before stay with the sequence).
    pub fn reserve(&mut self, seq: usize, len: usize) -> Result<()> {
        self.check_seq(seq)?;
        let from = self.tokens[seq].len();
        if len <= from {
            return Ok(());
        }
        // the partly filled block the writes start in
        if !from.is_multiple_of(KV_TILE) && from / KV_TILE < self.tables[seq].len() {
            self.make_writable(seq, from / KV_TILE)?;
        }
        while self.tables[seq].len() < len.div_ceil(KV_TILE) {
            let b = self.take_block().ok_or(Error::KvFull {
                seq,
                n_blocks: self.n_blocks,
            })?;
            self.tables[seq].push(b);
        }
        Ok(())
    }

    /// Blocks [`KvCache::reserve`] would have to take for a sequence to reach `len`.
    pub fn blocks_to_reach(&self, seq: usize, len: usize) -> usize {
        let Some(table) = self.tables.get(seq) else {
            return 0;
        };
        let from = self.tokens[seq].len();
        let mut n = len.div_ceil(KV_TILE).saturating_sub(table.len());
        if len > from && !from.is_multiple_of(KV_TILE) {
            if let Some(&b) = table.get(from / KV_TILE) {
                n += usize::from(self.meta[b as usize].refs > 1);
            }
        }
        n
    }

    /// Forgets positions `len..` of a sequence; blocks it no longer needs are released
    /// (last first), cached if the index names them.
    ///
    /// # Errors
    /// [`Error::BadSequence`].
    pub fn truncate(&mut self, seq: usize, len: usize) -> Result<()> {
        self.check_seq(seq)?;
        self.tokens[seq].truncate(len);
        let len = self.tokens[seq].len();
        self.chain[seq].truncate(len / KV_TILE);
        let keep = len.div_ceil(KV_TILE);
        while self.tables[seq].len() > keep {
            if let Some(b) = self.tables[seq].pop() {
                self.unref(b);
            }
        }
        Ok(())
    }

    /// Ends a sequence: its partly filled last block joins the index (a later prompt that
    /// continues it copies what it shares), and all its blocks are released, last first.
    ///
    /// # Errors
    /// [`Error::BadSequence`].
    pub fn clear(&mut self, seq: usize) -> Result<()> {
        self.check_seq(seq)?;
        let len = self.tokens[seq].len();
        if !len.is_multiple_of(KV_TILE) {
            if let Some(&b) = self.tables[seq].get(len / KV_TILE) {
                let m = &self.meta[b as usize];
                if m.refs == 1 && m.key.is_none() {
                    let key = Key {
                        parent: self.parent_hash(seq, len / KV_TILE),
                        hash: None,
                        tokens: self.tokens[seq][len / KV_TILE * KV_TILE..len].to_vec(),
                    };
                    self.insert_index(b, key);
                }
            }
        }
        self.truncate(seq, 0)
    }

    /// The hash block `i` of a sequence continues.
    fn parent_hash(&self, seq: usize, i: usize) -> u64 {
        if i == 0 {
            hash_of(("capy-root", self.salt[seq]))
        } else {
            self.chain[seq][i - 1]
        }
    }

    /// Sets the salt of an empty sequence ([`salt_id`]).
    pub fn set_salt(&mut self, seq: usize, salt: u64) {
        if let Some(s) = self.salt.get_mut(seq) {
            *s = salt;
        }
    }

    /// Looks a prompt up in the prefix cache, taking at most `max` of its tokens from it
    /// (callers keep at least the last prompt token to compute its logits). Changes nothing;
    /// [`KvCache::attach_prefix`] applies the plan.
    pub fn plan_prefix(&self, prompt: &[u32], salt: u64, max: usize) -> PrefixPlan {
        let max = max.min(prompt.len());
        let mut plan = PrefixPlan {
            salt,
            ..Default::default()
        };
        let mut parent = hash_of(("capy-root", salt));
        let mut pos = 0;
        while pos < max {
            let Some(list) = self.index.get(&parent) else {
                break;
            };
            let want = &prompt[pos..max];
            // a full block holding the next KV_TILE tokens, else the longest shared start
            let mut best: Option<(usize, u32)> = None;
            let mut full = None;
            for &b in list {
                let Some(key) = &self.meta[b as usize].key else {
                    continue;
                };
                let n = common_prefix(&key.tokens, want);
                if n == KV_TILE {
                    if let Some(h) = key.hash {
                        full = Some((b, h));
                        break;
                    }
                }
                if n > 0 && best.is_none_or(|(bn, _)| n > bn) {
                    best = Some((n, b));
                }
            }
            if let Some((b, h)) = full {
                plan.shared.push(b);
                plan.revived += usize::from(self.meta[b as usize].refs == 0);
                parent = h;
                pos += KV_TILE;
                continue;
            }
            if let Some((n, b)) = best {
                plan.partial = Some((b, n));
                pos += n;
            }
            break;
        }
        plan.matched = pos;
        plan.new_blocks = prompt.len().div_ceil(KV_TILE) - plan.shared.len();
        plan
    }

    /// Starts an empty sequence from a [`PrefixPlan`] made for it just before: maps the
    /// shared blocks, copies the partial one, and returns the number of positions it now
    /// holds (the plan's `matched`, or fewer if no block was left for the copy).
    ///
    /// # Errors
    /// [`Error::BadSequence`].
    pub fn attach_prefix(
        &mut self,
        seq: usize,
        plan: &PrefixPlan,
        prompt: &[u32],
    ) -> Result<usize> {
        self.check_seq(seq)?;
        self.truncate(seq, 0)?;
        self.salt[seq] = plan.salt;
        let mut len = 0;
        for &b in &plan.shared {
            let Some(h) = self.meta[b as usize].key.as_ref().and_then(|k| k.hash) else {
                break;
            };
            self.add_ref(b);
            self.tables[seq].push(b);
            self.chain[seq].push(h);
            len += KV_TILE;
        }
        if let Some((src, n)) = plan.partial.filter(|_| len == plan.shared.len() * KV_TILE) {
            // hold the source while taking a block, so it cannot be the one evicted
            self.add_ref(src);
            if let Some(nb) = self.take_block() {
                self.copy_block(src, nb);
                self.tables[seq].push(nb);
                len += n;
            }
            self.unref(src);
        }
        let len = len.min(prompt.len());
        self.tokens[seq].extend_from_slice(&prompt[..len]);
        Ok(len)
    }

    /// Records that a sequence now holds `token` at `pos` (positions after it are
    /// forgotten), and enters each block this fills into the index.
    pub(crate) fn commit(&mut self, seq: usize, pos: usize, token: u32) {
        if seq >= self.n_seq {
            return;
        }
        let toks = &mut self.tokens[seq];
        toks.truncate(pos);
        toks.push(token);
        self.chain[seq].truncate(pos / KV_TILE);
        let full = toks.len() / KV_TILE;
        while self.chain[seq].len() < full {
            let i = self.chain[seq].len();
            let parent = self.parent_hash(seq, i);
            let tokens = self.tokens[seq][i * KV_TILE..(i + 1) * KV_TILE].to_vec();
            let hash = hash_of((parent, &tokens, self.salt[seq]));
            self.chain[seq].push(hash);
            let b = self.tables[seq][i];
            // a block equal to one already cached (two sequences computed the same prefix
            // at once) stays private
            let known = self.index.get(&parent).is_some_and(|l| {
                l.iter().any(|&x| {
                    self.meta[x as usize]
                        .key
                        .as_ref()
                        .is_some_and(|k| k.hash == Some(hash))
                })
            });
            if !known && self.meta[b as usize].key.is_none() {
                let key = Key {
                    parent,
                    hash: Some(hash),
                    tokens,
                };
                self.insert_index(b, key);
            }
        }
    }

    /// Stores the key and value of one position, whose block [`KvCache::reserve`] gave.
    pub(crate) fn store(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (nb, ek, ev) = (self.n_blocks, self.n_embd_k, self.n_embd_v);
        let b = layer * nb + self.tables[seq][pos / KV_TILE] as usize;
        let off = pos % KV_TILE;
        // keys transposed: element e at row e of the tile, scales [n_embd_k / 32, KV_TILE]
        let (at, s_at) = (b * ek * KV_TILE + off, b * ek / QK * KV_TILE + off);
        self.k.write(&k[..ek], at, KV_TILE, s_at, KV_TILE);
        // values row-major: scales [KV_TILE, n_embd_v / 32]
        let row = b * KV_TILE + off;
        self.v.write(&v[..ev], row * ev, 1, row * (ev / QK), 1);
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
        let (nb, ek, ev) = (self.n_blocks, self.n_embd_k, self.n_embd_v);
        KvView {
            blocks: &self.tables[seq],
            k: self.k.view(
                layer,
                nb,
                ek * KV_TILE,
                kvh * head_dim * KV_TILE,
                KV_TILE,
                kvh * head_dim / QK * KV_TILE,
                KV_TILE,
            ),
            v: self.v.view(
                layer,
                nb,
                KV_TILE * ev,
                kvh * head_dim_v,
                ev,
                kvh * head_dim_v / QK,
                ev / QK,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F16S: (KvType, KvType) = (KvType::F16, KvType::F16);

    /// Writes tokens `toks` at positions `from..` of a sequence, with keys and values that
    /// record the token (so copies can be checked).
    fn write(kv: &mut KvCache, seq: usize, from: usize, toks: &[u32]) {
        kv.reserve(seq, from + toks.len()).unwrap();
        for (i, &t) in toks.iter().enumerate() {
            let (k, v) = (vec![t as f32; kv.n_embd_k], vec![-(t as f32); kv.n_embd_v]);
            kv.store(0, seq, from + i, &k, &v);
            kv.commit(seq, from + i, t);
        }
    }

    /// The key stored for position `pos` of a sequence (first element).
    fn key_at(kv: &KvCache, seq: usize, pos: usize) -> f32 {
        let view = kv.view(0, seq, 0, kv.n_embd_k, kv.n_embd_v);
        let b = view.blocks[pos / KV_TILE] as usize;
        match view.k.data {
            KvData::F16(k) => k[b * view.k.block_stride + pos % KV_TILE].to_f32(),
            KvData::Q8 { .. } => unreachable!("the tests use f16"),
        }
    }

    fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn blocks_are_taken_on_demand_and_returned() {
        let mut kv = KvCache::new(1, 2, 3 * KV_TILE, 4, 4);
        assert_eq!(kv.blocks(), (6, 6));
        kv.reserve(0, 1).unwrap();
        kv.reserve(1, KV_TILE + 1).unwrap();
        assert_eq!(kv.blocks(), (6, 3));
        kv.set_seq_len_for_test(1, KV_TILE + 1);
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

    impl KvCache {
        fn set_seq_len_for_test(&mut self, seq: usize, len: usize) {
            self.tokens[seq].resize(len, 0);
        }
    }

    #[test]
    fn a_prompt_maps_cached_full_blocks_and_copies_the_partial_one() {
        let mut kv = KvCache::with_blocks(1, 3, 1024, 2, 2, 8, F16S);
        let first = toks(0..150); // two full blocks and 22 positions
        write(&mut kv, 0, 0, &first);
        let c = kv.block_counts();
        assert_eq!((c.used, c.cached), (3, 0));
        // a running sequence's full blocks are shared at once (its partly filled block is
        // still being written: it is not offered)
        let second: Vec<u32> = toks(0..140).into_iter().chain([777, 778]).collect();
        let plan = kv.plan_prefix(&second, 0, second.len() - 1);
        assert_eq!(plan.shared.len(), 2);
        assert_eq!(plan.matched, 128);
        assert!(plan.partial.is_none());
        assert_eq!(plan.new_blocks, 1);
        assert_eq!(kv.attach_prefix(1, &plan, &second).unwrap(), 128);
        assert_eq!(&kv.seq_blocks(1)[..2], &kv.seq_blocks(0)[..2]);
        write(&mut kv, 1, 128, &second[128..]);
        assert_ne!(kv.seq_blocks(1)[2], kv.seq_blocks(0)[2]);
        for p in [0, 63, 64, 127, 128, 139] {
            assert_eq!(key_at(&kv, 1, p), p as f32);
        }
        assert_eq!(key_at(&kv, 1, 140), 777.0);
        assert_eq!(
            key_at(&kv, 0, 140),
            140.0,
            "the first sequence is untouched"
        );
        assert_eq!(kv.block_counts().used, 4);

        // the first ends: its partial block stays cached, its full blocks still shared
        kv.clear(0).unwrap();
        let c = kv.block_counts();
        assert_eq!((c.used, c.cached), (3, 1));
        // a continuation of the first conversation copies its tail
        let third: Vec<u32> = toks(0..200);
        let plan = kv.plan_prefix(&third, 0, 199);
        assert_eq!((plan.shared.len(), plan.matched), (2, 150));
        assert_eq!(kv.attach_prefix(2, &plan, &third).unwrap(), 150);
        write(&mut kv, 2, 150, &toks(150..200));
        for p in [0, 100, 149, 150, 199] {
            assert_eq!(key_at(&kv, 2, p), p as f32);
        }
    }

    #[test]
    fn writing_into_a_shared_block_copies_it_first() {
        let mut kv = KvCache::with_blocks(1, 2, 1024, 2, 2, 4, F16S);
        write(&mut kv, 0, 0, &toks(0..64));
        let plan = kv.plan_prefix(&toks(0..64), 0, 64);
        assert_eq!(kv.attach_prefix(1, &plan, &toks(0..64)).unwrap(), 64);
        // sequence 1 rewinds into the shared block and writes other tokens
        kv.truncate(1, 10).unwrap();
        write(&mut kv, 1, 10, &[500, 501]);
        assert_ne!(kv.seq_blocks(0)[0], kv.seq_blocks(1)[0]);
        assert_eq!(key_at(&kv, 0, 10), 10.0);
        assert_eq!(key_at(&kv, 1, 10), 500.0);
        assert_eq!(key_at(&kv, 1, 9), 9.0);
        // a block held alone but cached leaves the index before it is overwritten
        kv.truncate(0, 5).unwrap();
        write(&mut kv, 0, 5, &[900]);
        let plan = kv.plan_prefix(&toks(0..64), 0, 64);
        assert!(plan.shared.is_empty());
    }

    #[test]
    fn different_salts_share_no_block() {
        let mut kv = KvCache::with_blocks(1, 2, 1024, 2, 2, 8, F16S);
        let prompt = toks(0..200);
        kv.set_salt(0, salt_id("tenant-a"));
        write(&mut kv, 0, 0, &prompt);
        let same = kv.plan_prefix(&prompt, salt_id("tenant-a"), 199);
        assert_eq!(same.matched, 192);
        let other = kv.plan_prefix(&prompt, salt_id("tenant-b"), 199);
        assert_eq!((other.matched, other.shared.len()), (0, 0));
        assert!(other.partial.is_none());
        let none = kv.plan_prefix(&prompt, salt_id(""), 199);
        assert_eq!(none.matched, 0);
        kv.attach_prefix(1, &other, &prompt).unwrap();
        write(&mut kv, 1, 0, &prompt);
        for b in kv.seq_blocks(1) {
            assert!(!kv.seq_blocks(0).contains(b));
        }
    }

    #[test]
    fn cached_blocks_are_evicted_least_recent_first_leaves_before_parents() {
        let mut kv = KvCache::with_blocks(1, 2, 1024, 2, 2, 4, F16S);
        write(&mut kv, 0, 0, &toks(0..192)); // three full blocks
        kv.clear(0).unwrap();
        assert_eq!(kv.block_counts().cached, 3);
        assert_eq!(kv.available(), 4);
        // another prompt needs two blocks: the free one, then the chain's leaf
        write(&mut kv, 1, 0, &toks(1000..1100));
        let plan = kv.plan_prefix(&toks(0..192), 0, 192);
        assert_eq!(plan.matched, 128, "the first two blocks are still cached");
        write(&mut kv, 1, 100, &toks(1100..1150));
        let plan = kv.plan_prefix(&toks(0..192), 0, 192);
        assert_eq!(plan.matched, 64, "then the middle one went");
        // a hit revives a block: it is no longer evictable
        assert_eq!(plan.revived, 1);
        kv.clear(1).unwrap();
        kv.attach_prefix(0, &plan, &toks(0..192)).unwrap();
        assert_eq!(kv.block_counts().used, 1);
    }
}
