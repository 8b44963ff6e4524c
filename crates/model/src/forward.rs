//! The batched forward pass.
//!
//! A [`Batch`] holds tokens with their positions and sequence ids; every token of the batch
//! goes through each weight matrix in one matrix-matrix call, so prefill and the decode
//! steps of several sequences share one read of the weights. Attention reads each token's
//! own sequence from the KV cache. Buffers are sized for `n_batch` tokens and `n_outputs`
//! logit rows when the context is made and reused by every call.

use std::sync::Arc;

use capy_kernels::blocks::AlignedBuf;
use capy_kernels::matmul::matmul_repacked_many;
use capy_kernels::ops;
use capy_kernels::pool::{split_range, SharedMut};
use capy_kernels::{kernels, matmul, Isa, Kernels, ThreadPool};

use crate::attention::{self, AttnWork};
use crate::hparams::Activation;
use crate::kv::{KvCache, KvLayout};
use crate::weights::{Model, Tensor};
use crate::{Error, Result};
use capy_kernels::kvquant::KvType;

/// Tokens to run, with their position, sequence and whether their logits are wanted.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub pos: Vec<usize>,
    pub seq: Vec<usize>,
    pub logits: Vec<bool>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn clear(&mut self) {
        self.tokens.clear();
        self.pos.clear();
        self.seq.clear();
        self.logits.clear();
    }

    pub fn push(&mut self, token: u32, pos: usize, seq: usize, logits: bool) {
        self.tokens.push(token);
        self.pos.push(pos);
        self.seq.push(seq);
        self.logits.push(logits);
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn n_outputs(&self) -> usize {
        self.logits.iter().filter(|&&l| l).count()
    }
}

/// Sizes of a context.
#[derive(Clone, Debug)]
pub struct ContextParams {
    /// Positions per sequence.
    pub n_ctx: usize,
    /// Sequences held at once.
    pub n_seq: usize,
    /// Blocks of [`capy_kernels::attn::KV_TILE`] positions in the KV cache's pool, shared
    /// by all sequences; `None`: enough for every sequence at its full context.
    pub kv_blocks: Option<usize>,
    /// Element types of the cached keys and values (`--cache-type-k/-v`); an 8-bit type a
    /// model's head sizes do not allow ([`crate::kv_type_fits`]) is kept as f16.
    pub type_k: KvType,
    pub type_v: KvType,
    /// Keep every position in sliding-window layers too (llama.cpp's `--swa-full`): more
    /// memory, but any rollback or prefix hit finds them.
    pub swa_full: bool,
    /// Most tokens in one batch.
    pub n_batch: usize,
    /// Most logit rows one batch may ask for.
    pub n_outputs: usize,
    pub n_threads: usize,
    /// Kernels of this instruction set instead of the process-wide choice (tests compare
    /// ISAs this way); ignored if the CPU cannot run them.
    pub isa: Option<Isa>,
}

impl Default for ContextParams {
    fn default() -> Self {
        ContextParams {
            n_ctx: 4096,
            n_seq: 1,
            kv_blocks: None,
            type_k: Default::default(),
            type_v: Default::default(),
            swa_full: false,
            n_batch: 512,
            n_outputs: 8,
            n_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            isa: None,
        }
    }
}

impl ContextParams {
    /// The key and value types the cache of a model of `hp` gets ([`crate::kv_types`]).
    pub fn kv_types(&self, hp: &crate::Hparams) -> (KvType, KvType) {
        crate::kv_types(hp, (self.type_k, self.type_v))
    }

    /// The shape of the KV cache of a model of `hp` ([`KvLayout::for_model`]).
    pub fn kv_layout(&self, hp: &crate::Hparams) -> KvLayout {
        let mut lay = KvLayout::for_model(
            hp,
            self.n_seq.max(1),
            self.n_ctx.max(1),
            self.n_batch.max(1),
            (self.type_k, self.type_v),
        );
        if self.swa_full {
            lay.windows.fill(0);
        }
        lay
    }

    /// Blocks in the KV cache's pool (of its full-attention layers; [`KvLayout`]).
    pub fn kv_blocks(&self) -> usize {
        self.kv_blocks
            .unwrap_or(self.n_seq.max(1) * self.n_ctx.max(1).div_ceil(capy_kernels::attn::KV_TILE))
            .max(1)
    }

    /// Bytes a context of these sizes allocates for `hp`: the KV cache plus the scratch
    /// buffers of [`Context::new`] (thread-local attention buffers left out).
    pub fn memory_bytes(&self, hp: &crate::Hparams) -> u64 {
        let nb = self.n_batch.max(1);
        let kv = self.kv_layout(hp).bytes(self.kv_blocks()) as usize;
        // x, xn, q, k, v, attn, gate, up, and the two RoPE tables of cos and sin
        let per_token = 2 * hp.n_embd
            + hp.n_embd_q()
            + hp.n_embd_k()
            + hp.n_embd_v()
            + hp.n_head * hp.head_dim_v
            + 2 * hp.n_ff
            + 2 * hp.rope_dim;
        let outputs = self.n_outputs.max(1) * (hp.n_embd + hp.n_vocab);
        (kv + (nb * per_token + outputs) * 4) as u64
    }
}

/// Per-context scratch, one allocation each, sized for `n_batch` tokens.
struct Scratch {
    /// `[n_batch, n_embd]` residual stream
    x: Vec<f32>,
    /// `[n_batch, n_embd]` normalized input / projection output
    xn: Vec<f32>,
    /// `[n_batch, n_embd_q]`
    q: Vec<f32>,
    /// `[n_batch, n_embd_k]`
    k: Vec<f32>,
    /// `[n_batch, n_embd_v]`
    v: Vec<f32>,
    /// `[n_batch, n_head * head_dim_v]`
    attn: Vec<f32>,
    /// `[n_batch, n_ff]`
    gate: Vec<f32>,
    /// `[n_batch, n_ff]`
    up: Vec<f32>,
    /// `[n_batch, rope_dim/2]` for the global and the sliding-window RoPE bases
    cos: [Vec<f32>; 2],
    sin: [Vec<f32>; 2],
    /// flash attention's work items and per-thread buffers
    attn_work: AttnWork,
    /// `[n_outputs, n_embd]`
    out_rows: Vec<f32>,
    /// `[n_outputs, n_vocab]`
    logits: Vec<f32>,
    /// quantized activations
    qbuf: AlignedBuf,
}

/// A model with its KV cache, thread pool and scratch buffers.
pub struct Context {
    pub model: Arc<Model>,
    pub params: ContextParams,
    pub kv: KvCache,
    pool: ThreadPool,
    kern: Kernels,
    s: Scratch,
    /// per sequence: the position the next batch token must have (validation scratch)
    seq_next: Vec<Option<usize>>,
}

impl Context {
    pub fn new(model: Arc<Model>, params: ContextParams) -> Context {
        let hp = &model.hp;
        let nb = params.n_batch.max(1);
        let n_threads = params.n_threads.max(1);
        let kern = params.isa.and_then(Kernels::for_isa).unwrap_or(*kernels());
        let kv = KvCache::from_layout(&params.kv_layout(hp), params.kv_blocks());
        let s = Scratch {
            x: vec![0.0; nb * hp.n_embd],
            xn: vec![0.0; nb * hp.n_embd],
            q: vec![0.0; nb * hp.n_embd_q()],
            k: vec![0.0; nb * hp.n_embd_k()],
            v: vec![0.0; nb * hp.n_embd_v()],
            attn: vec![0.0; nb * hp.n_head * hp.head_dim_v],
            gate: vec![0.0; nb * hp.n_ff],
            up: vec![0.0; nb * hp.n_ff],
            cos: [
                vec![0.0; nb * hp.rope_dim / 2],
                vec![0.0; nb * hp.rope_dim / 2],
            ],
            sin: [
                vec![0.0; nb * hp.rope_dim / 2],
                vec![0.0; nb * hp.rope_dim / 2],
            ],
            attn_work: AttnWork::new(hp, kern, n_threads, nb),
            out_rows: vec![0.0; params.n_outputs.max(1) * hp.n_embd],
            logits: vec![0.0; params.n_outputs.max(1) * hp.n_vocab],
            qbuf: AlignedBuf::new(),
        };
        Context {
            pool: ThreadPool::new(n_threads),
            kern,
            seq_next: vec![None; kv.n_seq],
            kv,
            s,
            params,
            model,
        }
    }

    pub fn n_vocab(&self) -> usize {
        self.model.hp.n_vocab
    }

    /// Checks a batch against the context and the cache before any work is done.
    fn validate(&mut self, batch: &Batch) -> Result<()> {
        let n = batch.len();
        if batch.pos.len() != n || batch.seq.len() != n || batch.logits.len() != n {
            return Err(Error::BadBatch(
                "tokens, pos, seq and logits differ in length".into(),
            ));
        }
        if n > self.params.n_batch {
            return Err(Error::BatchTooLarge {
                got: n,
                max: self.params.n_batch,
            });
        }
        let n_out = batch.n_outputs();
        if n_out > self.params.n_outputs {
            return Err(Error::TooManyOutputs {
                got: n_out,
                max: self.params.n_outputs,
            });
        }
        let n_vocab = self.model.hp.n_vocab;
        // per sequence, positions must continue the cache without gaps
        let next = &mut self.seq_next;
        next.fill(None);
        for i in 0..n {
            let (tok, pos, seq) = (batch.tokens[i], batch.pos[i], batch.seq[i]);
            if tok as usize >= n_vocab {
                return Err(Error::BadToken {
                    token: tok,
                    n_vocab,
                });
            }
            if seq >= self.kv.n_seq {
                return Err(Error::BadSequence {
                    seq,
                    n_seq: self.kv.n_seq,
                });
            }
            if pos >= self.kv.n_ctx {
                return Err(Error::ContextFull {
                    seq,
                    pos,
                    n_ctx: self.kv.n_ctx,
                });
            }
            let expect = next[seq];
            let ok = match expect {
                None => pos <= self.kv.seq_len(seq),
                Some(e) => pos == e,
            };
            if !ok {
                return Err(Error::BadBatch(format!(
                    "sequence {seq}: position {pos} does not follow the cache (length {}) or the previous token",
                    self.kv.seq_len(seq)
                )));
            }
            next[seq] = Some(pos + 1);
        }
        Ok(())
    }

    /// Runs the batch and returns the logits of the rows marked for output, in batch
    /// order: `[n_outputs, n_vocab]`.
    pub fn decode(&mut self, batch: &Batch) -> Result<&[f32]> {
        self.validate(batch)?;
        // blocks for every position the batch writes, before any is written (a sequence
        // the batch rewrites forgets the positions from there on first)
        for (&seq, &pos) in batch.seq.iter().zip(&batch.pos) {
            if pos < self.kv.seq_len(seq) {
                let kept = self.kv.truncate(seq, pos)?;
                if kept < pos {
                    return Err(Error::BadBatch(format!(
                        "sequence {seq}: the sliding-window layers no longer hold what position \
                         {pos} reads; the cache now ends at {kept}"
                    )));
                }
            }
            self.kv.reserve(seq, pos + 1)?;
        }
        let n_tok = batch.len();
        let model = Arc::clone(&self.model);
        let hp = &model.hp;
        let (n_embd, k) = (hp.n_embd, &self.kern);
        if n_tok == 0 {
            return Ok(&[]);
        }

        // token embeddings [n_tok, n_embd]
        let emb = model.weight(&model.tok_embd);
        for (t, &tok) in batch.tokens.iter().enumerate() {
            let row = &mut self.s.x[t * n_embd..(t + 1) * n_embd];
            match &model.tok_embd.repacked {
                Some(rp) => rp.dequantize_row(tok as usize, row)?,
                None => capy_kernels::dequantize_row(emb, tok as usize, row)?,
            }
            if hp.embd_scale != 1.0 {
                ops::scale_inplace(row, hp.embd_scale);
            }
        }

        // RoPE tables for this batch's positions
        let half = hp.rope_dim / 2;
        for (which, base) in [hp.rope_base, hp.rope_base_swa].into_iter().enumerate() {
            for (t, &pos) in batch.pos.iter().enumerate() {
                let r = t * half..(t + 1) * half;
                ops::rope_cache(
                    pos as f32,
                    base,
                    if which == 0 { hp.rope_freq_scale } else { 1.0 },
                    hp.rope_dim,
                    &mut self.s.cos[which][r.clone()],
                    &mut self.s.sin[which][r],
                );
            }
        }

        self.s.attn_work.plan(batch, self.pool.n_threads());
        for (il, layer) in model.layers.iter().enumerate() {
            let s = &mut self.s;
            let x = &mut s.x[..n_tok * n_embd];
            let xn = &mut s.xn[..n_tok * n_embd];
            rms_norm_rows(k, x, xn, &layer.attn_norm, hp.rms_eps, n_embd);

            // projections
            let q = &mut s.q[..n_tok * hp.n_embd_q()];
            let kk = &mut s.k[..n_tok * hp.n_embd_k()];
            let v = &mut s.v[..n_tok * hp.n_embd_v()];
            mm_same_input(
                k,
                &self.pool,
                &model,
                &mut [
                    (&layer.wq, &mut *q),
                    (&layer.wk, &mut *kk),
                    (&layer.wv, &mut *v),
                ],
                xn,
                &mut s.qbuf,
            )?;
            if let (Some(bq), Some(bk), Some(bv)) = (&layer.bq, &layer.bk, &layer.bv) {
                add_rows(q, bq);
                add_rows(kk, bk);
                add_rows(v, bv);
            }
            if let Some(w) = &layer.q_norm {
                rms_norm_rows_inplace(k, q, w, hp.rms_eps, hp.head_dim);
            }
            if let Some(w) = &layer.k_norm {
                rms_norm_rows_inplace(k, kk, w, hp.rms_eps, hp.head_dim);
            }
            let which = usize::from(hp.swa_layers[il]);
            for t in 0..n_tok {
                let (c, sn) = (
                    &s.cos[which][t * half..(t + 1) * half],
                    &s.sin[which][t * half..(t + 1) * half],
                );
                for h in q[t * hp.n_embd_q()..(t + 1) * hp.n_embd_q()].chunks_exact_mut(hp.head_dim)
                {
                    (k.rope)(h, c, sn, hp.rope_dim, hp.rope_neox);
                }
                for h in
                    kk[t * hp.n_embd_k()..(t + 1) * hp.n_embd_k()].chunks_exact_mut(hp.head_dim)
                {
                    (k.rope)(h, c, sn, hp.rope_dim, hp.rope_neox);
                }
            }

            // store K and V
            for t in 0..n_tok {
                self.kv.store(
                    il,
                    batch.seq[t],
                    batch.pos[t],
                    &kk[t * hp.n_embd_k()..(t + 1) * hp.n_embd_k()],
                    &v[t * hp.n_embd_v()..(t + 1) * hp.n_embd_v()],
                );
            }

            // attention
            let window = if hp.swa_layers[il] {
                hp.sliding_window
            } else {
                0
            };
            attention::attention(
                &self.pool,
                &self.kv,
                il,
                batch,
                q,
                &mut s.attn[..n_tok * hp.n_head * hp.head_dim_v],
                &mut s.attn_work,
                window,
            );
            let attn = &mut s.attn[..n_tok * hp.n_head * hp.head_dim_v];
            if let Some(w) = &layer.attn_sub_norm {
                rms_norm_rows_inplace(k, attn, w, hp.rms_eps, w.len());
            }
            mm(k, &self.pool, &model, &layer.wo, attn, xn, &mut s.qbuf)?;
            if let Some(w) = &layer.post_attn_norm {
                rms_norm_rows_inplace(k, xn, w, hp.rms_eps, n_embd);
            }
            ops::add_inplace(x, xn);

            // feed-forward
            rms_norm_rows(k, x, xn, &layer.ffn_norm, hp.rms_eps, n_embd);
            let gate = &mut s.gate[..n_tok * hp.n_ff];
            let up = &mut s.up[..n_tok * hp.n_ff];
            mm_same_input(
                k,
                &self.pool,
                &model,
                &mut [(&layer.ffn_gate, &mut *gate), (&layer.ffn_up, &mut *up)],
                xn,
                &mut s.qbuf,
            )?;
            gated_activation(k, &self.pool, hp.activation, gate, up);
            if let Some(w) = &layer.ffn_sub_norm {
                rms_norm_rows_inplace(k, gate, w, hp.rms_eps, hp.n_ff);
            }
            mm(
                k,
                &self.pool,
                &model,
                &layer.ffn_down,
                gate,
                xn,
                &mut s.qbuf,
            )?;
            if let Some(w) = &layer.post_ffn_norm {
                rms_norm_rows_inplace(k, xn, w, hp.rms_eps, n_embd);
            }
            ops::add_inplace(x, xn);
        }

        // sequences now extend through the last position written
        for t in 0..n_tok {
            self.kv.commit(batch.seq[t], batch.pos[t], batch.tokens[t]);
        }

        // output rows
        let n_out = batch.n_outputs();
        let s = &mut self.s;
        let mut o = 0;
        for t in 0..n_tok {
            if batch.logits[t] {
                let dst = &mut s.out_rows[o * n_embd..(o + 1) * n_embd];
                dst.copy_from_slice(&s.x[t * n_embd..(t + 1) * n_embd]);
                (k.rms_norm)(dst, &model.output_norm, hp.rms_eps);
                o += 1;
            }
        }
        let logits = &mut s.logits[..n_out * hp.n_vocab];
        if n_out > 0 {
            mm(
                k,
                &self.pool,
                &model,
                &model.output,
                &s.out_rows[..n_out * n_embd],
                logits,
                &mut s.qbuf,
            )?;
            if hp.final_logit_softcap > 0.0 {
                let c = hp.final_logit_softcap;
                for l in logits.iter_mut() {
                    *l = c * (*l / c).tanh();
                }
            }
        }
        Ok(&self.s.logits[..n_out * hp.n_vocab])
    }
}

/// One matrix product, with its per-tensor scale ([`mm_same_input`] of one matrix).
fn mm(
    k: &Kernels,
    pool: &ThreadPool,
    model: &Model,
    w: &Tensor,
    x: &[f32],
    out: &mut [f32],
    qbuf: &mut AlignedBuf,
) -> Result<()> {
    mm_same_input(k, pool, model, &mut [(w, out)], x, qbuf)
}

/// [`mm`] of several matrices with the same input: one activation quantization and one pass
/// over the pool for all of them when they are all repacked, else one product each; then
/// each matrix's per-tensor scale, if any.
fn mm_same_input(
    k: &Kernels,
    pool: &ThreadPool,
    model: &Model,
    mats: &mut [(&Tensor, &mut [f32])],
    x: &[f32],
    qbuf: &mut AlignedBuf,
) -> Result<()> {
    fn rp(w: &Tensor) -> Option<&capy_kernels::repack::Repacked> {
        w.repacked.as_deref()
    }
    let together = match mats {
        [(a, oa), (b, ob)] => match (rp(a), rp(b)) {
            (Some(a), Some(b)) => {
                let mut m = [(a, &mut **oa), (b, &mut **ob)];
                matmul_repacked_many(k, pool, &mut m, x, qbuf)?;
                true
            }
            _ => false,
        },
        [(a, oa), (b, ob), (c, oc)] => match (rp(a), rp(b), rp(c)) {
            (Some(a), Some(b), Some(c)) => {
                let mut m = [(a, &mut **oa), (b, &mut **ob), (c, &mut **oc)];
                matmul_repacked_many(k, pool, &mut m, x, qbuf)?;
                true
            }
            _ => false,
        },
        _ => false,
    };
    for (w, out) in mats.iter_mut() {
        if !together {
            match &w.repacked {
                Some(rp) => capy_kernels::matmul::matmul_repacked(k, pool, rp, x, out, qbuf)?,
                None => matmul(k, pool, model.weight(w), x, out, qbuf)?,
            }
        }
        // a per-tensor factor on the product's output (BitNet's `blk.N.*.scale`)
        if let Some(s) = w.scale {
            ops::scale_inplace(out, s);
        }
    }
    Ok(())
}

/// `gate = act(gate) * up`, split over the pool.
fn gated_activation(k: &Kernels, pool: &ThreadPool, act: Activation, gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    let g = SharedMut::new(gate);
    pool.run(&|ith, nth| {
        let r = split_range(n, ith, nth);
        // SAFETY: split_range gives every thread its own part of `gate`.
        let gs = unsafe { g.slice(r.clone()) };
        match act {
            Activation::Silu => (k.silu_mul)(gs, &up[r]),
            Activation::Gelu => (k.gelu_mul)(gs, &up[r]),
        }
    });
}

/// RMSNorm of each `w.len()`-long row of `x` into `out`.
fn rms_norm_rows(k: &Kernels, x: &[f32], out: &mut [f32], w: &[f32], eps: f32, n: usize) {
    out.copy_from_slice(x);
    rms_norm_rows_inplace(k, out, w, eps, n);
}

/// In-place RMSNorm of each `n`-long row (`n` = `head_dim` for per-head norms).
fn rms_norm_rows_inplace(k: &Kernels, x: &mut [f32], w: &[f32], eps: f32, n: usize) {
    for xr in x.chunks_exact_mut(n) {
        (k.rms_norm)(xr, w, eps);
    }
}

fn add_rows(x: &mut [f32], b: &[f32]) {
    for r in x.chunks_exact_mut(b.len()) {
        ops::add_inplace(r, b);
    }
}
