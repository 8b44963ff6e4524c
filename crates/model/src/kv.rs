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
//! (`[KV_TILE, n_embd_v]`). Layers are grouped by the attention window they see
//! ([`KvLayout`]): each group has its own pool and block tables, and a block id names the
//! same block in every layer of its group. A sliding-window group (Gemma 3's local layers)
//! releases a sequence's blocks once they fall behind the window. The pool is allocated zeroed and untouched, so memory
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

/// Most groups of layers a cache keeps apart (distinct sliding windows beyond this share
/// the first group, which keeps every position).
pub const MAX_GROUPS: usize = 4;

/// A table entry for a block a sliding-window group released.
const HOLE: u32 = u32::MAX;

/// Blocks per group of layers, in the cache's group order (see [`KvLayout`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockNeed(pub [usize; MAX_GROUPS]);

impl BlockNeed {
    /// Whether every group's count is at most `avail`'s.
    pub fn fits_in(&self, avail: &BlockNeed) -> bool {
        self.0.iter().zip(&avail.0).all(|(n, a)| n <= a)
    }
}

impl std::ops::Add for BlockNeed {
    type Output = BlockNeed;
    fn add(mut self, o: BlockNeed) -> BlockNeed {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
        self
    }
}

impl std::iter::Sum for BlockNeed {
    fn sum<I: Iterator<Item = BlockNeed>>(it: I) -> BlockNeed {
        it.fold(BlockNeed::default(), |a, b| a + b)
    }
}

/// The shape of a KV cache: what each layer stores and which positions it must keep.
///
/// Layers are grouped by the attention window they see. The group of full-attention layers
/// (window 0) holds every position of every sequence in its `n_blocks` blocks. A group of
/// sliding-window layers (Gemma 3's local layers, window `w`) only needs the last `w`
/// positions of a sequence: its blocks behind the window go back to the pool as the
/// sequence grows (cached, so a rollback or a prefix hit can still find them), and its pool
/// holds what `n_seq` sequences can keep at once, [`KvLayout::window_blocks`] each. This
/// is vLLM's hybrid KV cache manager in spirit (one block table per group of layers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Values per position of one layer's keys and values (all heads).
    pub n_embd_k: usize,
    pub n_embd_v: usize,
    /// Per layer: the positions before the current one it attends to (0: all of them).
    pub windows: Vec<usize>,
    /// Element types of keys and values (an 8-bit type needs its width in groups of 32;
    /// a side whose width is not is kept as f16).
    pub types: (KvType, KvType),
    /// Most sequences at once.
    pub n_seq: usize,
    /// Most positions of one sequence; a window at least this long is none.
    pub n_ctx: usize,
    /// Most positions one forward pass writes for one sequence.
    pub n_batch: usize,
}

impl KvLayout {
    /// The layout of a model's cache: its sliding-window layers (if any) kept apart, key
    /// and value types as [`kv_types`] allows them.
    pub fn for_model(
        hp: &crate::Hparams,
        n_seq: usize,
        n_ctx: usize,
        n_batch: usize,
        types: (KvType, KvType),
    ) -> KvLayout {
        let windows = (0..hp.n_layer)
            .map(|il| {
                if hp.swa_layers.get(il).copied().unwrap_or(false) {
                    hp.sliding_window
                } else {
                    0
                }
            })
            .collect();
        KvLayout {
            n_embd_k: hp.n_embd_k(),
            n_embd_v: hp.n_embd_v(),
            windows,
            types: kv_types(hp, types),
            n_seq: n_seq.max(1),
            n_ctx: n_ctx.max(1),
            n_batch: n_batch.max(1),
        }
    }

    /// `n_layer` layers that all see every position.
    pub fn uniform(
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_embd_k: usize,
        n_embd_v: usize,
        types: (KvType, KvType),
    ) -> KvLayout {
        KvLayout {
            n_embd_k,
            n_embd_v,
            windows: vec![0; n_layer],
            types,
            n_seq: n_seq.max(1),
            n_ctx: n_ctx.max(1),
            n_batch: n_ctx.max(1),
        }
    }

    /// The groups: each one's window and layers, in order of first layer (windows that
    /// cover the whole context count as 0; past [`MAX_GROUPS`], more windows join group 0).
    fn groups(&self) -> Vec<(usize, Vec<usize>)> {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (il, &w) in self.windows.iter().enumerate() {
            let w = if w >= self.n_ctx { 0 } else { w };
            match groups.iter_mut().position(|g| g.0 == w) {
                Some(g) => groups[g].1.push(il),
                None if groups.len() < MAX_GROUPS => groups.push((w, vec![il])),
                None => groups[0].1.push(il),
            }
        }
        if groups.is_empty() {
            groups.push((0, Vec::new()));
        }
        groups
    }

    /// Blocks a sequence holds at most in a group of window `w`: the window with one block
    /// of slack behind it (so a rollback of up to [`KV_TILE`] positions needs no recompute),
    /// one forward pass of new positions, and the block being copied on write.
    pub fn window_blocks(&self, w: usize) -> usize {
        (w + KV_TILE + self.n_batch).div_ceil(KV_TILE) + 3
    }

    /// Blocks of the group of window `w` in a cache of `n_blocks` (the full-attention
    /// group's count): all of them for window 0; else room for every sequence's window and
    /// one more, at most `n_blocks`.
    fn group_blocks(&self, w: usize, n_blocks: usize) -> usize {
        if w == 0 {
            n_blocks
        } else {
            n_blocks.min((self.n_seq + 1).saturating_mul(self.window_blocks(w)))
        }
    }

    /// The types keys and values are stored as: an 8-bit type only where the width is in
    /// whole groups of 32, f16 otherwise.
    fn stored_types(&self) -> (KvType, KvType) {
        let fits = |ty: KvType, n: usize| {
            if n.is_multiple_of(QK) {
                ty
            } else {
                KvType::F16
            }
        };
        (
            fits(self.types.0, self.n_embd_k),
            fits(self.types.1, self.n_embd_v),
        )
    }

    /// Bytes of one block of a group of `n_layer` layers.
    fn block_bytes(&self, n_layer: usize) -> usize {
        KvCache::block_bytes_for(n_layer, self.n_embd_k, self.n_embd_v, self.stored_types())
    }

    /// Bytes of a cache of `n_blocks` blocks (the full-attention group's count; the
    /// sliding-window groups' follow from it).
    pub fn bytes(&self, n_blocks: usize) -> u64 {
        self.groups()
            .iter()
            .map(|(w, layers)| {
                (self.group_blocks(*w, n_blocks) as u64)
                    .saturating_mul(self.block_bytes(layers.len()) as u64)
            })
            .fold(0u64, u64::saturating_add)
    }

    /// The most blocks (at least 1, at most `u32::MAX - 1`: block ids are u32) whose cache
    /// takes at most `bytes`.
    pub fn blocks_for_bytes(&self, bytes: u64) -> usize {
        let (mut lo, mut hi) = (1usize, (u32::MAX - 1) as usize);
        if self.bytes(hi) <= bytes {
            return hi;
        }
        // bytes() grows with n: the largest n with bytes(n) <= budget
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.bytes(mid) <= bytes {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }
}

/// The blocks of one group of layers: their keys and values, each sequence's table and
/// the prefix cache's index over them.
struct Group {
    /// the attention window of its layers (0: every position)
    window: usize,
    n_layer: usize,
    n_blocks: usize,
    /// values per block of one layer: keys, values
    per_k: usize,
    per_v: usize,
    /// `[n_layer, n_blocks, n_embd_k, KV_TILE]` (8-bit scales: `[.., n_embd_k / 32, KV_TILE]`)
    k: Side,
    /// `[n_layer, n_blocks, KV_TILE, n_embd_v]` (8-bit scales: `[.., KV_TILE, n_embd_v / 32]`)
    v: Side,
    /// per sequence: its blocks in position order (position `p` is in `tables[seq][p /
    /// KV_TILE]`); entries before `start[seq]` are released ([`HOLE`])
    tables: Vec<Vec<u32>>,
    start: Vec<usize>,
    meta: Vec<BlockMeta>,
    /// blocks holding nothing, taken from the end
    free: Vec<u32>,
    /// unreferenced cached blocks by release order (evicted from the front)
    lru: BTreeMap<u64, u32>,
    /// cached blocks by the hash of the block they continue
    index: HashMap<u64, Vec<u32>>,
    tick: u64,
}

/// A group's part of a [`PrefixPlan`].
#[derive(Clone, Debug, Default)]
struct GroupPlan {
    /// table entries left released before the shared blocks (sliding-window groups)
    first: usize,
    /// cached full blocks to map at `first..`
    shared: Vec<u32>,
    /// a cached block to copy after them, keeping its first `matched % KV_TILE` positions
    partial: Option<u32>,
}

/// What [`KvCache::plan_prefix`] found for a prompt.
#[derive(Clone, Debug, Default)]
pub struct PrefixPlan {
    salt: u64,
    /// the hashes of the matched full blocks
    chain: Vec<u64>,
    groups: Vec<GroupPlan>,
    /// prompt tokens the cache supplies
    pub matched: usize,
    /// per group: blocks starting the sequence takes from the pool (new ones for the rest
    /// of the prompt, or its first forward pass in a sliding-window group, the copied
    /// block, and unreferenced cached ones it revives)
    pub need: BlockNeed,
}

impl Group {
    fn new(window: usize, n_layer: usize, n_blocks: usize, lay: &KvLayout) -> Group {
        let n_blocks = n_blocks.max(1);
        let (ek, ev) = (lay.n_embd_k, lay.n_embd_v);
        let (tk, tv) = lay.stored_types();
        Group {
            window,
            n_layer,
            n_blocks,
            per_k: KV_TILE * ek,
            per_v: KV_TILE * ev,
            // zeroed allocations: the pages are committed when first written
            k: Side::new(tk, n_layer * n_blocks, KV_TILE * ek),
            v: Side::new(tv, n_layer * n_blocks, KV_TILE * ev),
            tables: vec![Vec::new(); lay.n_seq],
            start: vec![0; lay.n_seq],
            meta: vec![BlockMeta::default(); n_blocks],
            // taken from the end: block 0 first
            free: (0..n_blocks as u32).rev().collect(),
            lru: BTreeMap::new(),
            index: HashMap::new(),
            tick: 0,
        }
    }

    fn available(&self) -> usize {
        self.free.len() + self.lru.len()
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

    /// The cached full block continuing `parent` with hash `hash` and these tokens.
    fn find_full(&self, parent: u64, hash: u64, tokens: &[u32]) -> Option<u32> {
        self.index.get(&parent)?.iter().copied().find(|&b| {
            self.meta[b as usize]
                .key
                .as_ref()
                .is_some_and(|k| k.hash == Some(hash) && k.tokens == tokens)
        })
    }

    /// The cached block continuing `parent` that shares the most leading tokens with
    /// `want` (at least one), and how many.
    fn find_partial(&self, parent: u64, want: &[u32]) -> Option<(u32, usize)> {
        let mut best: Option<(u32, usize)> = None;
        for &b in self.index.get(&parent)? {
            let Some(key) = &self.meta[b as usize].key else {
                continue;
            };
            let n = common_prefix(&key.tokens, want);
            if n > 0 && best.is_none_or(|(_, bn)| n > bn) {
                best = Some((b, n));
            }
        }
        best
    }

    /// Copies block `src` into block `dst` in every layer.
    fn copy_block(&mut self, src: u32, dst: u32) {
        let (nb, pk, pv) = (self.n_blocks, self.per_k, self.per_v);
        for layer in 0..self.n_layer {
            let (s, d) = (layer * nb + src as usize, layer * nb + dst as usize);
            self.k.copy(s, d, pk);
            self.v.copy(s, d, pv);
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

    /// The first block a query at position `pos` (or later) reads in this group.
    fn first_needed(&self, pos: usize) -> usize {
        if self.window == 0 {
            0
        } else {
            (pos + 1).saturating_sub(self.window) / KV_TILE
        }
    }

    /// Releases a sliding-window sequence's blocks that queries from position `pos` on
    /// never read, keeping one block of slack; oldest first, so they are evicted first.
    fn release_behind(&mut self, seq: usize, pos: usize) {
        if self.window == 0 {
            return;
        }
        let keep = (pos + 1).saturating_sub(self.window + KV_TILE) / KV_TILE;
        let keep = keep.min(self.tables[seq].len());
        for i in self.start[seq]..keep {
            let b = std::mem::replace(&mut self.tables[seq][i], HOLE);
            if b != HOLE {
                self.unref(b);
            }
        }
        self.start[seq] = self.start[seq].max(keep);
    }

    /// The last position (exclusive) a reservation to `len` takes blocks for, from a
    /// sequence length of `from`: all of it, or one forward pass in a sliding-window group.
    fn reserve_end(&self, from: usize, len: usize, n_batch: usize) -> usize {
        if self.window == 0 {
            len
        } else {
            len.min(from + n_batch)
        }
    }

    /// Forgets a sequence's table entries from `keep` on, last first.
    fn truncate_table(&mut self, seq: usize, keep: usize) {
        while self.tables[seq].len() > keep {
            if let Some(b) = self.tables[seq].pop() {
                if b != HOLE {
                    self.unref(b);
                }
            }
        }
        self.start[seq] = self.start[seq].min(keep);
    }
}

/// Keys and values of every layer for up to `n_seq` sequences of up to `n_ctx` positions
/// each, in pools of blocks of [`KV_TILE`] positions, one per group of layers
/// ([`KvLayout`]).
pub struct KvCache {
    pub n_seq: usize,
    pub n_ctx: usize,
    pub n_embd_k: usize,
    pub n_embd_v: usize,
    n_batch: usize,
    groups: Vec<Group>,
    /// per layer: its group and its index within the group
    layer_at: Vec<(usize, usize)>,
    /// per sequence: the tokens at its positions (their number is its length)
    tokens: Vec<Vec<u32>>,
    /// per sequence: the hashes of its full blocks (block `i`'s is `chain[i]`)
    chain: Vec<Vec<u64>>,
    /// per sequence: its salt
    salt: Vec<u64>,
}

fn hash_of(parts: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

fn root_hash(salt: u64) -> u64 {
    hash_of(("capy-root", salt))
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
    /// A cache of f16 layers that all see every position, whose pool holds every sequence
    /// at its full context (`n_seq` x `n_ctx` positions, in whole blocks).
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

    /// A cache of `n_blocks` blocks of layers that all see every position, shared by up to
    /// `n_seq` sequences of at most `n_ctx` positions, keys and values stored as `types`.
    pub fn with_blocks(
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_embd_k: usize,
        n_embd_v: usize,
        n_blocks: usize,
        types: (KvType, KvType),
    ) -> KvCache {
        let lay = KvLayout::uniform(n_layer, n_seq, n_ctx, n_embd_k, n_embd_v, types);
        KvCache::from_layout(&lay, n_blocks)
    }

    /// A cache of this layout whose full-attention group has `n_blocks` blocks (at least
    /// one; the sliding-window groups get [`KvLayout::bytes`]'s share). Allocated zeroed:
    /// memory is committed as blocks are written.
    pub fn from_layout(lay: &KvLayout, n_blocks: usize) -> KvCache {
        let groups = lay.groups();
        let mut layer_at = vec![(0, 0); lay.windows.len()];
        for (g, (_, layers)) in groups.iter().enumerate() {
            for (i, &il) in layers.iter().enumerate() {
                layer_at[il] = (g, i);
            }
        }
        KvCache {
            n_seq: lay.n_seq,
            n_ctx: lay.n_ctx,
            n_embd_k: lay.n_embd_k,
            n_embd_v: lay.n_embd_v,
            n_batch: lay.n_batch,
            groups: groups
                .iter()
                .map(|(w, layers)| {
                    Group::new(*w, layers.len(), lay.group_blocks(*w, n_blocks), lay)
                })
                .collect(),
            layer_at,
            tokens: vec![Vec::new(); lay.n_seq],
            chain: vec![Vec::new(); lay.n_seq],
            salt: vec![0; lay.n_seq],
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
        (self.groups[0].k.ty(), self.groups[0].v.ty())
    }

    /// Bytes held by the pools.
    pub fn bytes(&self) -> usize {
        self.groups.iter().map(|g| g.k.bytes() + g.v.bytes()).sum()
    }

    /// Bytes of the blocks sequences hold.
    pub fn bytes_used(&self) -> usize {
        self.groups
            .iter()
            .map(|g| {
                let used = g.n_blocks - g.free.len() - g.lru.len();
                used * (g.k.bytes() + g.v.bytes()) / g.n_blocks
            })
            .sum()
    }

    /// Positions the cache can hold (all sequences together): those of its full-attention
    /// group (a sliding-window group keeps only windows).
    pub fn capacity(&self) -> usize {
        let g = self.groups.iter().find(|g| g.window == 0);
        g.unwrap_or(&self.groups[0]).n_blocks * KV_TILE
    }

    /// The pools' blocks by state (all groups together).
    pub fn block_counts(&self) -> BlockCounts {
        let mut c = BlockCounts::default();
        for g in &self.groups {
            c.total += g.n_blocks;
            c.used += g.n_blocks - g.free.len() - g.lru.len();
            c.cached += g.lru.len();
            c.free += g.free.len();
        }
        c
    }

    /// Per group: blocks a sequence can take now (free ones and unreferenced cached ones).
    pub fn available(&self) -> BlockNeed {
        let mut n = BlockNeed::default();
        for (a, g) in n.0.iter_mut().zip(&self.groups) {
            *a = g.available();
        }
        n
    }

    /// `n` blocks in every group.
    pub fn per_group(&self, n: usize) -> BlockNeed {
        let mut need = BlockNeed::default();
        for a in need.0.iter_mut().take(self.groups.len()) {
            *a = n;
        }
        need
    }

    pub fn seq_len(&self, seq: usize) -> usize {
        self.tokens.get(seq).map_or(0, Vec::len)
    }

    /// Blocks a sequence holds in the first group.
    pub fn seq_blocks(&self, seq: usize) -> &[u32] {
        self.groups[0].tables.get(seq).map_or(&[], |t| t.as_slice())
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

    /// Makes sure a sequence has blocks it may write for positions from its length to
    /// `len` (in a sliding-window group, for the first `n_batch` of them, after releasing
    /// the blocks behind its window), taking free ones or evicting cached ones.
    ///
    /// # Errors
    /// [`Error::BadSequence`]; [`Error::KvFull`] when a pool has no block left (the
    /// blocks taken before stay with the sequence).
    pub fn reserve(&mut self, seq: usize, len: usize) -> Result<()> {
        self.check_seq(seq)?;
        let from = self.tokens[seq].len();
        if len <= from {
            return Ok(());
        }
        let n_batch = self.n_batch;
        for g in &mut self.groups {
            g.release_behind(seq, from);
            let end = g.reserve_end(from, len, n_batch);
            // the partly filled block the writes start in
            if !from.is_multiple_of(KV_TILE) && from / KV_TILE < g.tables[seq].len() {
                g.make_writable(seq, from / KV_TILE)?;
            }
            while g.tables[seq].len() < end.div_ceil(KV_TILE) {
                let b = g.take_block().ok_or(Error::KvFull {
                    seq,
                    n_blocks: g.n_blocks,
                })?;
                g.tables[seq].push(b);
            }
        }
        Ok(())
    }

    /// Per group: blocks [`KvCache::reserve`] would have to take for a sequence to reach
    /// `len` (not counting those it releases).
    pub fn blocks_to_reach(&self, seq: usize, len: usize) -> BlockNeed {
        let mut need = BlockNeed::default();
        let Some(from) = self.tokens.get(seq).map(Vec::len) else {
            return need;
        };
        for (n, g) in need.0.iter_mut().zip(&self.groups) {
            let table = &g.tables[seq];
            let end = g.reserve_end(from, len, self.n_batch);
            *n = end.div_ceil(KV_TILE).saturating_sub(table.len());
            if len > from && !from.is_multiple_of(KV_TILE) {
                if let Some(&b) = table.get(from / KV_TILE) {
                    *n += usize::from(b != HOLE && g.meta[b as usize].refs > 1);
                }
            }
        }
        need
    }

    /// Forgets positions `len..` of a sequence; blocks it no longer needs are released
    /// (last first), cached if the index names them. A sliding-window group must still
    /// hold the blocks the next query reads: released ones are taken back from the cache,
    /// and where one was evicted the sequence is cut back further, to that block's start.
    /// Returns the length kept.
    ///
    /// # Errors
    /// [`Error::BadSequence`].
    pub fn truncate(&mut self, seq: usize, len: usize) -> Result<usize> {
        self.check_seq(seq)?;
        let mut len = len.min(self.tokens[seq].len());
        'again: loop {
            for gi in 0..self.groups.len() {
                let g = &self.groups[gi];
                let lo = g.first_needed(len);
                let hi = g.start[seq].min(len.div_ceil(KV_TILE));
                for i in lo..hi {
                    if self.groups[gi].tables[seq][i] != HOLE {
                        continue;
                    }
                    let parent = self.parent_hash(seq, i);
                    let toks = &self.tokens[seq][i * KV_TILE..(i + 1) * KV_TILE];
                    let found = self.groups[gi].find_full(parent, self.chain[seq][i], toks);
                    match found {
                        Some(b) => {
                            let g = &mut self.groups[gi];
                            g.add_ref(b);
                            g.tables[seq][i] = b;
                        }
                        None => {
                            len = i * KV_TILE;
                            for g in &mut self.groups {
                                g.truncate_table(seq, len.div_ceil(KV_TILE));
                            }
                            continue 'again;
                        }
                    }
                }
                let g = &mut self.groups[gi];
                g.start[seq] = g.start[seq].min(lo);
            }
            break;
        }
        self.tokens[seq].truncate(len);
        self.chain[seq].truncate(len / KV_TILE);
        let keep = len.div_ceil(KV_TILE);
        for g in &mut self.groups {
            g.truncate_table(seq, keep);
        }
        Ok(len)
    }

    /// Ends a sequence: its partly filled last block joins the index (a later prompt that
    /// continues it copies what it shares), and all its blocks are released, last first.
    ///
    /// # Errors
    /// [`Error::BadSequence`].
    pub fn clear(&mut self, seq: usize) -> Result<()> {
        self.check_seq(seq)?;
        self.publish_partial(seq);
        for g in &mut self.groups {
            g.truncate_table(seq, 0);
            g.start[seq] = 0;
        }
        self.tokens[seq].clear();
        self.chain[seq].clear();
        Ok(())
    }

    /// Enters a sequence's partly filled last block into the index, so a prompt that
    /// continues what it holds copies the positions it shares instead of computing them:
    /// at its end ([`KvCache::clear`]), and once its prompt is computed (requests with the
    /// same prompt starting next: the choices of `n` > 1, an ensemble's samples). The
    /// sequence's next write into the block takes it out of the index again
    /// ([`KvCache::reserve`]), so only the positions entered are ever copied.
    pub fn publish_partial(&mut self, seq: usize) {
        let Some(toks) = self.tokens.get(seq) else {
            return;
        };
        let len = toks.len();
        if len.is_multiple_of(KV_TILE) {
            return;
        }
        let i = len / KV_TILE;
        let parent = self.parent_hash(seq, i);
        let tokens = &self.tokens[seq][i * KV_TILE..len];
        for g in &mut self.groups {
            if let Some(&b) = g.tables[seq].get(i) {
                let m = &g.meta[b as usize];
                if b != HOLE && m.refs == 1 && m.key.is_none() {
                    let key = Key {
                        parent,
                        hash: None,
                        tokens: tokens.to_vec(),
                    };
                    g.insert_index(b, key);
                }
            }
        }
    }

    /// The hash block `i` of a sequence continues.
    fn parent_hash(&self, seq: usize, i: usize) -> u64 {
        if i == 0 {
            root_hash(self.salt[seq])
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
    /// (callers keep at least the last prompt token to compute its logits). A match must
    /// give every group what the next query reads: the whole prefix in the full-attention
    /// group, the blocks inside the window in a sliding-window group. Changes nothing;
    /// [`KvCache::attach_prefix`] applies the plan.
    pub fn plan_prefix(&self, prompt: &[u32], salt: u64, max: usize) -> PrefixPlan {
        let max = max.min(prompt.len());
        let n_full = max / KV_TILE;
        // the hash chain of the prompt's full blocks: parents[i] is block i's parent
        let mut parents = Vec::with_capacity(n_full + 1);
        parents.push(root_hash(salt));
        for i in 0..n_full {
            let toks = &prompt[i * KV_TILE..(i + 1) * KV_TILE];
            parents.push(hash_of((parents[i], toks, salt)));
        }
        // per group: the cached block of each full prompt block (a full-attention group's
        // walk stops at its first miss)
        let mut found: Vec<Vec<Option<u32>>> = Vec::with_capacity(self.groups.len());
        let mut top = n_full;
        for g in &self.groups {
            let mut f = Vec::with_capacity(n_full);
            for i in 0..n_full {
                if g.window == 0 && i >= top {
                    break;
                }
                let toks = &prompt[i * KV_TILE..(i + 1) * KV_TILE];
                let b = g.find_full(parents[i], parents[i + 1], toks);
                if b.is_none() && g.window == 0 {
                    top = i;
                }
                f.push(b);
            }
            found.push(f);
        }
        let has_all = |m: usize, j: usize| {
            self.groups
                .iter()
                .zip(&found)
                .all(|(g, f)| (g.first_needed(m)..j).all(|i| f.get(i).copied().flatten().is_some()))
        };
        // the longest match: the full blocks up to `top` and a partial block after them,
        // else fewer full blocks
        let mut best: Option<(usize, Vec<Option<u32>>)> = None;
        if top < prompt.len().div_ceil(KV_TILE) && top * KV_TILE < max {
            let want = &prompt[top * KV_TILE..max];
            let parts: Vec<_> = self
                .groups
                .iter()
                .map(|g| g.find_partial(parents[top], want))
                .collect();
            let n = parts
                .iter()
                .map(|p| p.map_or(0, |(_, n)| n))
                .min()
                .unwrap_or(0)
                .min(KV_TILE - 1);
            if n > 0 && has_all(top * KV_TILE + n, top) {
                best = Some((n, parts.iter().map(|p| p.map(|(b, _)| b)).collect()));
            }
        }
        let mut j = top;
        if best.is_none() {
            while j > 0 && !has_all(j * KV_TILE, j) {
                j -= 1;
            }
        }
        let (n_part, part_blocks) = best.unwrap_or((0, vec![None; self.groups.len()]));
        let matched = j * KV_TILE + n_part;
        let mut plan = PrefixPlan {
            salt,
            chain: parents[1..=j].to_vec(),
            matched,
            ..Default::default()
        };
        for (gi, g) in self.groups.iter().enumerate() {
            let first = g.first_needed(matched).min(j);
            let shared: Vec<u32> = found[gi][first..j].iter().filter_map(|b| *b).collect();
            let end = g.reserve_end(matched, prompt.len(), self.n_batch);
            let revived = shared
                .iter()
                .filter(|&&b| g.meta[b as usize].refs == 0)
                .count();
            plan.need.0[gi] = end.div_ceil(KV_TILE).saturating_sub(j) + revived;
            plan.groups.push(GroupPlan {
                first,
                shared,
                partial: part_blocks[gi].filter(|_| n_part > 0),
            });
        }
        plan
    }

    /// Starts an empty sequence from a [`PrefixPlan`] made for it just before: maps the
    /// shared blocks, copies the partial ones, and returns the number of positions it now
    /// holds (the plan's `matched`, or fewer if no block was left for a copy).
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
        self.clear(seq)?;
        self.salt[seq] = plan.salt;
        let j = plan.chain.len();
        let valid = plan.groups.len() == self.groups.len()
            && plan.matched <= prompt.len()
            && self.groups.iter().zip(&plan.groups).all(|(g, gp)| {
                gp.first + gp.shared.len() == j
                    && gp.shared.iter().all(|&b| {
                        g.meta
                            .get(b as usize)
                            .is_some_and(|m| m.key.as_ref().is_some_and(|k| k.hash.is_some()))
                    })
            });
        if !valid {
            return Ok(0);
        }
        for (g, gp) in self.groups.iter_mut().zip(&plan.groups) {
            g.tables[seq].resize(gp.first, HOLE);
            g.start[seq] = gp.first;
            for &b in &gp.shared {
                g.add_ref(b);
                g.tables[seq].push(b);
            }
        }
        self.chain[seq].extend_from_slice(&plan.chain);
        let mut len = j * KV_TILE;
        let n_part = plan.matched - len;
        let srcs: Vec<u32> = plan.groups.iter().filter_map(|gp| gp.partial).collect();
        if n_part > 0 && srcs.len() == self.groups.len() {
            // hold the sources while taking blocks, so none can be the one evicted
            for (g, &src) in self.groups.iter_mut().zip(&srcs) {
                g.add_ref(src);
            }
            let taken: Vec<Option<u32>> = self.groups.iter_mut().map(|g| g.take_block()).collect();
            let ok = taken.iter().all(Option::is_some);
            for ((g, &src), nb) in self.groups.iter_mut().zip(&srcs).zip(taken) {
                if let Some(nb) = nb {
                    if ok {
                        g.copy_block(src, nb);
                        g.tables[seq].push(nb);
                    } else {
                        g.unref(nb);
                    }
                }
                g.unref(src);
            }
            if ok {
                len += n_part;
            }
        }
        self.tokens[seq].extend_from_slice(&prompt[..len]);
        Ok(len)
    }

    /// Records that a sequence now holds `token` at `pos` (positions after it are
    /// forgotten), and enters each block this fills into every group's index.
    pub(crate) fn commit(&mut self, seq: usize, pos: usize, token: u32) {
        if seq >= self.n_seq {
            return;
        }
        let toks = &mut self.tokens[seq];
        toks.truncate(pos);
        toks.push(token);
        self.chain[seq].truncate(pos / KV_TILE);
        let full = self.tokens[seq].len() / KV_TILE;
        while self.chain[seq].len() < full {
            let i = self.chain[seq].len();
            let parent = self.parent_hash(seq, i);
            let tokens = self.tokens[seq][i * KV_TILE..(i + 1) * KV_TILE].to_vec();
            let hash = hash_of((parent, &tokens, self.salt[seq]));
            self.chain[seq].push(hash);
            for g in &mut self.groups {
                let Some(&b) = g.tables[seq].get(i) else {
                    continue;
                };
                // a block equal to one already cached (two sequences computed the same
                // prefix at once) stays private
                if b == HOLE
                    || g.meta[b as usize].key.is_some()
                    || g.find_full(parent, hash, &tokens).is_some()
                {
                    continue;
                }
                let key = Key {
                    parent,
                    hash: Some(hash),
                    tokens: tokens.clone(),
                };
                g.insert_index(b, key);
            }
        }
    }

    /// Stores the key and value of one position, whose block [`KvCache::reserve`] gave.
    pub(crate) fn store(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (gi, li) = self.layer_at[layer];
        let (ek, ev) = (self.n_embd_k, self.n_embd_v);
        let g = &mut self.groups[gi];
        let b = li * g.n_blocks + g.tables[seq][pos / KV_TILE] as usize;
        let off = pos % KV_TILE;
        // keys transposed: element e at row e of the tile, scales [n_embd_k / 32, KV_TILE]
        let (at, s_at) = (b * ek * KV_TILE + off, b * ek / QK * KV_TILE + off);
        g.k.write(&k[..ek], at, KV_TILE, s_at, KV_TILE);
        // values row-major: scales [KV_TILE, n_embd_v / 32]
        let row = b * KV_TILE + off;
        g.v.write(&v[..ev], row * ev, 1, row * (ev / QK), 1);
    }

    /// Keys and values of KV head `kvh` of a sequence, for flash attention (a
    /// sliding-window layer's table has released entries before its window).
    pub(crate) fn view(
        &self,
        layer: usize,
        seq: usize,
        kvh: usize,
        head_dim: usize,
        head_dim_v: usize,
    ) -> KvView<'_> {
        let (gi, li) = self.layer_at[layer];
        let g = &self.groups[gi];
        let (nb, ek, ev) = (g.n_blocks, self.n_embd_k, self.n_embd_v);
        KvView {
            blocks: &g.tables[seq],
            k: g.k.view(
                li,
                nb,
                ek * KV_TILE,
                kvh * head_dim * KV_TILE,
                KV_TILE,
                kvh * head_dim / QK * KV_TILE,
                KV_TILE,
            ),
            v: g.v.view(
                li,
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
        assert_eq!(blocks(&kv), (6, 6));
        kv.reserve(0, 1).unwrap();
        kv.reserve(1, KV_TILE + 1).unwrap();
        assert_eq!(blocks(&kv), (6, 3));
        kv.set_seq_len_for_test(1, KV_TILE + 1);
        kv.truncate(1, KV_TILE).unwrap();
        assert_eq!(
            blocks(&kv),
            (6, 4),
            "the second block of seq 1 is free again"
        );
        kv.reserve(0, 3 * KV_TILE).unwrap();
        assert_eq!(blocks(&kv), (6, 2));
        assert!(matches!(
            kv.reserve(1, 4 * KV_TILE),
            Err(Error::KvFull { seq: 1, .. })
        ));
        assert_eq!(blocks(&kv), (6, 0));
        kv.clear(0).unwrap();
        kv.reserve(1, 4 * KV_TILE).unwrap();
        assert_eq!(blocks(&kv), (6, 2));
        assert!(kv.reserve(5, 1).is_err());
    }

    /// The first group's blocks: all of them, and those a sequence can take now.
    fn blocks(kv: &KvCache) -> (usize, usize) {
        (kv.groups[0].n_blocks, kv.available().0[0])
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
        assert_eq!(plan.groups[0].shared.len(), 2);
        assert_eq!(plan.matched, 128);
        assert!(plan.groups[0].partial.is_none());
        assert_eq!(plan.need.0[0], 1);
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
        assert_eq!((plan.groups[0].shared.len(), plan.matched), (2, 150));
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
        assert!(plan.groups[0].shared.is_empty());
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
        assert_eq!((other.matched, other.groups[0].shared.len()), (0, 0));
        assert!(other.groups[0].partial.is_none());
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
        assert_eq!(kv.available().0[0], 4);
        // another prompt needs two blocks: the free one, then the chain's leaf
        write(&mut kv, 1, 0, &toks(1000..1100));
        let plan = kv.plan_prefix(&toks(0..192), 0, 192);
        assert_eq!(plan.matched, 128, "the first two blocks are still cached");
        write(&mut kv, 1, 100, &toks(1100..1150));
        let plan = kv.plan_prefix(&toks(0..192), 0, 192);
        assert_eq!(plan.matched, 64, "then the middle one went");
        // a hit revives a block (no longer evictable): with the two new ones, three
        assert_eq!(plan.need.0[0], 3);
        kv.clear(1).unwrap();
        kv.attach_prefix(0, &plan, &toks(0..192)).unwrap();
        assert_eq!(kv.block_counts().used, 1);
    }

    /// Two layers: the first sees every position, the second a window of 128; passes of
    /// at most 64 positions per sequence.
    fn swa_cache(n_blocks: usize) -> KvCache {
        let lay = KvLayout {
            n_embd_k: 2,
            n_embd_v: 2,
            windows: vec![0, 128],
            types: F16S,
            n_seq: 2,
            n_ctx: 1024,
            n_batch: 64,
        };
        KvCache::from_layout(&lay, n_blocks)
    }

    /// Writes `toks` at positions `from..` of a sequence in both layers, one pass of up to
    /// 64 positions at a time, as the forward pass does.
    fn write_passes(kv: &mut KvCache, seq: usize, from: usize, toks: &[u32]) {
        for (c, chunk) in toks.chunks(64).enumerate() {
            let p0 = from + c * 64;
            for (i, &t) in chunk.iter().enumerate() {
                kv.reserve(seq, p0 + i + 1).unwrap();
                let (k, v) = (vec![t as f32; kv.n_embd_k], vec![-(t as f32); kv.n_embd_v]);
                kv.store(0, seq, p0 + i, &k, &v);
                kv.store(1, seq, p0 + i, &k, &v);
            }
            for (i, &t) in chunk.iter().enumerate() {
                kv.commit(seq, p0 + i, t);
            }
        }
    }

    /// The key a layer holds for position `pos` of a sequence, `None` where its block was
    /// released.
    fn layer_key(kv: &KvCache, layer: usize, seq: usize, pos: usize) -> Option<f32> {
        let view = kv.view(layer, seq, 0, kv.n_embd_k, kv.n_embd_v);
        let b = *view.blocks.get(pos / KV_TILE)?;
        if b == HOLE {
            return None;
        }
        match view.k.data {
            KvData::F16(k) => Some(k[b as usize * view.k.block_stride + pos % KV_TILE].to_f32()),
            KvData::Q8 { .. } => unreachable!("the tests use f16"),
        }
    }

    #[test]
    fn sliding_window_layers_release_blocks_behind_the_window() {
        let mut kv = swa_cache(40);
        let lay_blocks = kv.groups[1].n_blocks;
        assert_eq!(
            lay_blocks,
            3 * 7,
            "room for two sequences' windows and one more"
        );
        write_passes(&mut kv, 0, 0, &toks(0..1000));
        // the full-attention layer holds all 16 blocks, the windowed one only its window
        // (128 positions), a block of slack and the block being written
        assert_eq!(kv.groups[0].tables[0].len(), 16);
        let held = kv.groups[1].tables[0]
            .iter()
            .filter(|&&b| b != HOLE)
            .count();
        assert!(held <= 5, "{held} blocks held by the windowed layer");
        for p in [0, 500, 999] {
            assert_eq!(layer_key(&kv, 0, 0, p), Some(p as f32));
        }
        // every position the next query reads (999 - 127 ..= 999) is still there
        for p in 872..1000 {
            assert_eq!(layer_key(&kv, 1, 0, p), Some(p as f32), "position {p}");
        }
        assert_eq!(layer_key(&kv, 1, 0, 100), None, "released");
        let c = kv.block_counts();
        assert_eq!(c.used, 16 + held);
        // the released blocks were full: cached, not lost
        assert!(c.cached > 0);
    }

    #[test]
    fn a_rollback_behind_the_window_takes_released_blocks_back_from_the_cache() {
        let mut kv = swa_cache(40);
        write_passes(&mut kv, 0, 0, &toks(0..1000));
        assert_eq!(kv.truncate(0, 600).unwrap(), 600);
        for p in 600 - 127..600 {
            assert_eq!(layer_key(&kv, 1, 0, p), Some(p as f32), "position {p}");
        }
        write_passes(&mut kv, 0, 600, &toks(1100..1200));
        assert_eq!(layer_key(&kv, 1, 0, 650), Some(1150.0));
        assert_eq!(layer_key(&kv, 0, 0, 599), Some(599.0));
    }

    #[test]
    fn a_rollback_to_evicted_blocks_cuts_the_sequence_back_to_what_is_held() {
        let mut kv = swa_cache(40);
        write_passes(&mut kv, 0, 0, &toks(0..1000));
        // another sequence's writes evict the windowed layer's cached blocks (oldest first)
        write_passes(&mut kv, 1, 0, &toks(2000..3000));
        let kept = kv.truncate(0, 300).unwrap();
        assert!(kept < 300 && kept.is_multiple_of(KV_TILE), "kept {kept}");
        assert_eq!(kv.seq_len(0), kept);
        // what is kept can be read by its next query in both layers
        for p in kept.saturating_sub(127)..kept {
            assert_eq!(layer_key(&kv, 1, 0, p), Some(p as f32));
        }
        write_passes(&mut kv, 0, kept, &toks(kept as u32..1000));
        assert_eq!(layer_key(&kv, 1, 0, 999), Some(999.0));
    }

    #[test]
    fn a_prefix_hit_maps_only_the_window_of_a_sliding_window_group() {
        let mut kv = swa_cache(40);
        let prompt = toks(0..600);
        write_passes(&mut kv, 0, 0, &prompt);
        kv.clear(0).unwrap();
        let plan = kv.plan_prefix(&prompt, 0, 599);
        assert_eq!(plan.matched, 599);
        assert_eq!(plan.groups[0].shared.len(), 9);
        // the next query (position 599) reads 472..599: blocks 7 and 8, then the tail
        assert_eq!(plan.groups[1].first, 7);
        assert_eq!(plan.groups[1].shared.len(), 2);
        assert_eq!(kv.attach_prefix(1, &plan, &prompt).unwrap(), 599);
        for p in 472..599 {
            assert_eq!(layer_key(&kv, 1, 1, p), Some(p as f32));
        }
        assert_eq!(layer_key(&kv, 0, 1, 10), Some(10.0));
        write_passes(&mut kv, 1, 599, &[1777]);
        assert_eq!(layer_key(&kv, 1, 1, 599), Some(1777.0));
    }

    #[test]
    fn a_prefix_is_matched_only_as_far_as_the_window_group_still_holds_it() {
        let mut kv = swa_cache(40);
        let prompt = toks(0..600);
        write_passes(&mut kv, 0, 0, &prompt);
        kv.clear(0).unwrap();
        // evict the windowed layer's blocks of that prompt (oldest first); the full layer
        // keeps them
        write_passes(&mut kv, 1, 0, &toks(2000..3000));
        kv.clear(1).unwrap();
        write_passes(&mut kv, 1, 0, &toks(3000..3500));
        let plan = kv.plan_prefix(&prompt, 0, 599);
        let g1 = &kv.groups[1];
        for (i, &b) in plan.groups[1].shared.iter().enumerate() {
            assert!(
                g1.meta[b as usize].key.is_some(),
                "shared block {i} is cached"
            );
        }
        assert!(plan.matched < 599, "matched {}", plan.matched);
        let got = kv.attach_prefix(0, &plan, &prompt).unwrap();
        assert_eq!(got, plan.matched);
        for p in got.saturating_sub(127)..got {
            assert_eq!(layer_key(&kv, 1, 0, p), Some(p as f32));
        }
    }

    #[test]
    fn a_layout_sizes_windowed_groups_by_their_window() {
        let lay = KvLayout {
            n_embd_k: 256,
            n_embd_v: 256,
            windows: [512, 512, 512, 512, 512, 0].repeat(3),
            types: F16S,
            n_seq: 4,
            n_ctx: 32768,
            n_batch: 512,
        };
        let block = |n| KvCache::block_bytes_for(n, 256, 256, F16S) as u64;
        let w = lay.window_blocks(512);
        assert_eq!(w, (512 + 64 + 512usize).div_ceil(64) + 3);
        // a small pool: the windowed group as large as the full one
        assert_eq!(lay.bytes(10), 10 * block(18));
        // a large one: the windowed group holds 5 windows
        assert_eq!(
            lay.bytes(2048),
            2048 * block(3) + (5 * w) as u64 * block(15)
        );
        for n in [1usize, 7, 10, 99, 100, 2048, 100_000] {
            assert_eq!(lay.blocks_for_bytes(lay.bytes(n)), n);
            assert_eq!(lay.blocks_for_bytes(lay.bytes(n) + 1), n);
        }
        // a window covering the whole context is none
        let short = KvLayout { n_ctx: 512, ..lay };
        assert_eq!(short.bytes(10), 10 * block(18));
        assert_eq!(KvCache::from_layout(&short, 10).groups.len(), 1);
    }
}
