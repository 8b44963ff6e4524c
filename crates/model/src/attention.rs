//! Causal attention of a batch against the KV cache, as flash-attention work items.
//!
//! The batch's tokens are cut into runs (consecutive tokens of one sequence at consecutive
//! positions) and each run into blocks of tokens; a work item is one block against one KV
//! head, with the query heads of that head's GQA group as extra rows, so each key and value
//! tile is read once for up to [`TARGET_ROWS`] query rows. When there are too few items to
//! keep every thread busy (decoding one sequence), a group's heads are split across items.
//! Items are taken from a shared counter, costliest first (later positions see more keys).

use std::sync::atomic::{AtomicUsize, Ordering};

use capy_kernels::attn::{flash_attn, AttnShape, FlashScratch, TARGET_ROWS};
use capy_kernels::pool::SharedMut;
use capy_kernels::{Kernels, ThreadPool};

use crate::forward::Batch;
use crate::hparams::Hparams;
use crate::kv::KvCache;

/// Tokens `t0..t0+nt` of the batch (one sequence, consecutive positions) against KV head
/// `kvh`, query heads `h0..h0+nh` of its group.
#[derive(Clone, Copy, Debug)]
struct Item {
    t0: usize,
    nt: usize,
    kvh: usize,
    h0: usize,
    nh: usize,
    cost: usize,
}

/// Work items and per-thread buffers, allocated once per context.
pub(crate) struct AttnWork {
    kern: Kernels,
    n_head: usize,
    n_head_kv: usize,
    shape: AttnShape,
    /// tokens per block
    block: usize,
    items: Vec<Item>,
    /// one per pool thread
    scratch: Vec<FlashScratch>,
}

impl AttnWork {
    pub(crate) fn new(hp: &Hparams, kern: Kernels, n_threads: usize, n_batch: usize) -> AttnWork {
        let group = (hp.n_head / hp.n_head_kv.max(1)).max(1);
        let block = (TARGET_ROWS / group).max(1);
        let max_items = n_batch * hp.n_head_kv.max(1) * group;
        AttnWork {
            kern,
            n_head: hp.n_head,
            n_head_kv: hp.n_head_kv.max(1),
            shape: AttnShape {
                head_dim: hp.head_dim,
                head_dim_v: hp.head_dim_v,
                scale: hp.attn_scale,
                softcap: hp.attn_logit_softcap,
            },
            block,
            items: Vec::with_capacity(max_items),
            scratch: (0..n_threads)
                .map(|_| FlashScratch::new(block * group, hp.head_dim, hp.head_dim_v))
                .collect(),
        }
    }

    /// The end of the block starting at token `t`: at most `block` tokens of one sequence at
    /// consecutive positions.
    fn block_end(&self, batch: &Batch, t: usize) -> usize {
        let mut end = t + 1;
        while end < batch.len()
            && end - t < self.block
            && batch.seq[end] == batch.seq[t]
            && batch.pos[end] == batch.pos[end - 1] + 1
        {
            end += 1;
        }
        end
    }

    /// Cuts the batch into work items, once per batch for all layers (no allocation: `items`
    /// has room for the worst case).
    pub(crate) fn plan(&mut self, batch: &Batch, n_threads: usize) {
        let group = self.n_head / self.n_head_kv;
        self.items.clear();
        let n_tok = batch.len();
        let mut t = 0;
        let mut n_blocks = 0;
        while t < n_tok {
            let end = self.block_end(batch, t);
            n_blocks += 1;
            t = end;
        }
        // split the heads of a group when blocks x KV heads leave threads idle
        let base = n_blocks * self.n_head_kv;
        let split = if base < 2 * n_threads {
            (2 * n_threads).div_ceil(base).min(group)
        } else {
            1
        };
        let nh = group.div_ceil(split);
        let mut t = 0;
        while t < n_tok {
            let end = self.block_end(batch, t);
            let nt = end - t;
            for kvh in 0..self.n_head_kv {
                for h0 in (0..group).step_by(nh) {
                    let nh = nh.min(group - h0);
                    let cost = nt * nh * (batch.pos[end - 1] + 1);
                    self.items.push(Item {
                        t0: t,
                        nt,
                        kvh,
                        h0,
                        nh,
                        cost,
                    });
                }
            }
            t = end;
        }
        self.items
            .sort_unstable_by_key(|it| std::cmp::Reverse(it.cost));
    }
}

/// Causal attention of every (token, head) pair against its own sequence in the cache.
/// `q`: `[n_tok, n_head * head_dim]`, `out`: `[n_tok, n_head * head_dim_v]`; `window` is the
/// sliding window of this layer (0 = the whole sequence). `work` holds the items
/// [`AttnWork::plan`] made for this batch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    pool: &ThreadPool,
    kv: &KvCache,
    layer: usize,
    batch: &Batch,
    q: &[f32],
    out: &mut [f32],
    work: &mut AttnWork,
    window: usize,
) {
    let (n_head, group) = (work.n_head, work.n_head / work.n_head_kv);
    let sh = work.shape;
    let (hd, hdv) = (sh.head_dim, sh.head_dim_v);
    let kern = work.kern;
    let items = &work.items;
    let next = AtomicUsize::new(0);
    let out = SharedMut::new(out);
    let scratch = SharedMut::new(&mut work.scratch);
    pool.run(&|ith, _| {
        // SAFETY: thread `ith` alone uses scratch `ith`.
        let sc = unsafe { &mut scratch.slice(ith..ith + 1)[0] };
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(it) = items.get(i) else { break };
            let seq = batch.seq[it.t0];
            for ti in 0..it.nt {
                let t = it.t0 + ti;
                let hi = batch.pos[t] + 1;
                let lo = if window > 0 {
                    hi.saturating_sub(window)
                } else {
                    0
                };
                for hh in 0..it.nh {
                    let h = it.kvh * group + it.h0 + hh;
                    let qh = &q[(t * n_head + h) * hd..][..hd];
                    sc.set_row(ti * it.nh + hh, qh, lo, hi);
                }
            }
            let view = kv.view(layer, seq, it.kvh, hd, hdv);
            flash_attn(&kern, &sh, &view, it.nt * it.nh, sc);
            for ti in 0..it.nt {
                for hh in 0..it.nh {
                    let h = it.kvh * group + it.h0 + hh;
                    let o = (it.t0 + ti) * n_head + h;
                    // SAFETY: each (token, head) pair belongs to exactly one item.
                    let dst = unsafe { out.slice(o * hdv..(o + 1) * hdv) };
                    dst.copy_from_slice(sc.out_row(ti * it.nh + hh));
                }
            }
        }
    });
}
