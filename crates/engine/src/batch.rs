//! Continuous batching: one engine loop per model, on its own thread, serving many requests
//! at once from one [`Context`] whose paged KV cache they share.
//!
//! Every step runs, as one batched forward pass, the next token of every sequence that is
//! generating plus a chunk of pending prompt tokens, so each weight matrix is read once per
//! step for all of them. Requests wait in a bounded FIFO queue and start when a sequence id
//! (up to `n_slots` run at once) and the cache blocks their prompt needs are free: a request
//! never starts half-way. The prefix cache ([`capy_model::KvCache::plan_prefix`]) supplies
//! whatever leading blocks any earlier or running request with the same salt computed.
//! When generating sequences need a block and none is left, the newest running request is
//! preempted (its blocks return to the pool, those in the prefix index stay cached) and later
//! resumes ahead of new requests, recomputing what it lost with its sampler state intact,
//! so it completes with the output it would have had (vLLM's recompute preemption).
//! Events (tokens, the end) go to each request's [`Sink`]; a sink that reports itself
//! closed (the client went away) frees its sequence before the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use capy_kernels::attn::KV_TILE;
use capy_kernels::Isa;
use capy_model::{
    Batch, BlockNeed, Context, ContextParams, Hparams, KvLayout, KvType, Model, PrefixPlan,
};

use crate::generate::{
    choose, emit_token, prompt_logprob, GenerateParams, PromptLogprob, StopReason, TextStream,
    TokenOut,
};
use crate::grammar::Grammar;
use crate::sampler::Sampler;
use crate::speculative::{
    judge, DraftModel, Proposal, ProposeReq, Proposer, SpecParams, SpecStats, SpecType, Speculator,
};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Sizes of a batching engine.
#[derive(Clone, Debug)]
pub struct BatchParams {
    /// Most sequences running at once (`--parallel`).
    pub n_slots: usize,
    /// Most positions of one sequence (prompt + generated; `--ctx-size`), at most what the
    /// pool holds.
    pub n_ctx: usize,
    /// Bytes of the KV cache's block pool, shared by all sequences (`--kv-cache-size`);
    /// `None`: room for every sequence at its full context.
    pub kv_bytes: Option<u64>,
    /// Element types of the cached keys and values (`--cache-type-k/-v`).
    pub type_k: KvType,
    pub type_v: KvType,
    /// Keep every position in sliding-window layers too (`--swa-full`).
    pub swa_full: bool,
    /// Most tokens in one forward pass.
    pub n_batch: usize,
    pub n_threads: usize,
    /// Requests that may wait for a slot; more are refused with [`Error::QueueFull`].
    pub max_queue: usize,
    pub isa: Option<Isa>,
    /// Speculative decoding: the proposer and its settings (a draft model itself is given
    /// to [`BatchEngine::with_draft`]).
    pub spec: Option<(SpecType, SpecParams)>,
    /// Speculation is adaptive: a step guesses only while its generating sequences and
    /// their guesses together stay within this many tokens (the width the kernels take in
    /// one pass over the weights); a step with more sequences, or with prompt tokens, is
    /// compute-bound already and runs without guesses.
    pub spec_max_tokens: usize,
}

impl Default for BatchParams {
    fn default() -> Self {
        BatchParams {
            n_slots: 16,
            n_ctx: 2048,
            kv_bytes: None,
            type_k: KvType::F16,
            type_v: KvType::F16,
            swa_full: false,
            n_batch: 512,
            n_threads: ContextParams::default().n_threads,
            max_queue: 64,
            isa: None,
            spec: None,
            spec_max_tokens: 16,
        }
    }
}

impl BatchParams {
    /// Logit rows one step may produce: every generating sequence plus room for a chunk of
    /// prompt rows when prompt logprobs are asked for.
    fn n_outputs(&self) -> usize {
        (self.n_slots + 16).min(self.n_batch.max(1))
    }

    /// The shape of the KV cache of a model of `hp` ([`KvLayout::for_model`]).
    pub fn kv_layout(&self, hp: &Hparams) -> KvLayout {
        let types = (self.type_k, self.type_v);
        let mut lay = KvLayout::for_model(hp, self.n_slots, self.n_ctx.max(2), self.n_batch, types);
        if self.swa_full {
            lay.windows.fill(0);
        }
        lay
    }

    /// Blocks in the KV cache's pool for a model of `hp` (of its full-attention layers;
    /// [`KvLayout`]): what `kv_bytes` pays for (at least one), or every sequence at its
    /// full context.
    pub fn kv_blocks(&self, hp: &Hparams) -> usize {
        match self.kv_bytes {
            Some(b) => self.kv_layout(hp).blocks_for_bytes(b),
            None => (self.n_slots.max(1) as u64)
                .saturating_mul(self.n_ctx.max(2).div_ceil(KV_TILE) as u64)
                .clamp(1, u64::from(u32::MAX - 1)) as usize,
        }
    }

    /// Bytes of a KV pool of `n_blocks` blocks for a model of `hp` (keys and values of the
    /// types the model allows; a sliding-window group's share included).
    pub fn kv_bytes_for(&self, hp: &Hparams, n_blocks: usize) -> u64 {
        self.kv_layout(hp).bytes(n_blocks)
    }

    /// These settings as the engine runs them for `hp`: the per-sequence context at most
    /// the pool's positions.
    pub fn resolve(&self, hp: &Hparams) -> BatchParams {
        let mut p = self.clone();
        p.n_ctx = p.n_ctx.max(2).min(self.kv_blocks(hp) * KV_TILE);
        p
    }

    /// The context the engine runs in.
    fn context_params(&self, hp: &Hparams) -> ContextParams {
        ContextParams {
            type_k: self.type_k,
            type_v: self.type_v,
            swa_full: self.swa_full,
            n_ctx: self.n_ctx.max(2),
            n_seq: self.n_slots.max(1),
            kv_blocks: Some(self.kv_blocks(hp)),
            n_batch: self.n_batch.max(1),
            n_outputs: self.n_outputs(),
            n_threads: self.n_threads.max(1),
            isa: self.isa,
        }
    }

    /// Bytes of the KV cache's pool and the per-step buffers of an engine of these sizes.
    pub fn memory_bytes(&self, hp: &Hparams) -> u64 {
        self.resolve(hp).context_params(hp).memory_bytes(hp)
    }

    /// The context a draft model of `draft` runs in beside a target of `hp`: a sequence per
    /// slot, the target's positions (within what the draft was trained for) and cache types.
    pub fn draft_context_params(&self, hp: &Hparams, draft: &Hparams) -> ContextParams {
        let p = self.resolve(hp).context_params(hp);
        let n_ctx = p.n_ctx.min(draft.n_ctx_train.max(2));
        ContextParams {
            n_ctx,
            kv_blocks: p
                .kv_blocks
                .map(|b| b.min(p.n_seq * n_ctx.div_ceil(KV_TILE))),
            n_outputs: p.n_seq,
            ..p
        }
    }

    /// Bytes a draft model's context takes (its file not included).
    pub fn draft_memory_bytes(&self, hp: &Hparams, draft: &Hparams) -> u64 {
        self.draft_context_params(hp, draft).memory_bytes(draft)
    }
}

/// What a request hears back, in this order: `Started`, `PromptLogprobs` (with `echo`),
/// one `Token` per generated token, then `Done` (or `Failed`).
#[derive(Clone, Debug)]
pub enum Event {
    /// The request has a sequence; `cached` prompt tokens came from the prefix cache.
    Started {
        cached: usize,
    },
    PromptLogprobs(Vec<Option<PromptLogprob>>),
    /// A generated token and the text it makes safe to show (may be empty while a stop
    /// string or a multi-byte character is incomplete).
    Token {
        token: TokenOut,
        text: String,
    },
    Done(Summary),
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub stop_reason: StopReason,
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the cache instead of computed.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Text not yet handed out by `Token` events (a held-back tail).
    pub tail: String,
    /// The whole generated text.
    pub text: String,
    pub queue_ms: f64,
    pub prompt_ms: f64,
    pub gen_ms: f64,
    /// Speculative decoding's counters for this request.
    pub spec: SpecStats,
}

/// Where a request's events go.
pub trait Sink: Send {
    /// Delivers an event; `false` when nobody listens any more (the request is dropped).
    fn send(&mut self, ev: Event) -> bool;
    /// Whether the listener is gone, checked before every step.
    fn is_closed(&self) -> bool {
        false
    }
}

/// A sink from a closure.
pub struct FnSink<F>(pub F);

impl<F: FnMut(Event) -> bool + Send> Sink for FnSink<F> {
    fn send(&mut self, ev: Event) -> bool {
        (self.0)(ev)
    }
}

pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// A context limit below the engine's (Ollama's `num_ctx`).
    pub n_ctx: Option<usize>,
    /// The tenant the request belongs to: requests with different salts never share
    /// cached blocks ("" for none).
    pub salt: String,
    pub sink: Box<dyn Sink>,
}

/// Live counters of an engine, read by the server's metrics.
#[derive(Default, Debug)]
pub struct Stats {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    /// Positions held in the KV cache by running sequences.
    pub kv_used: AtomicUsize,
    /// Blocks in the KV cache's pools (all groups of layers); blocks a new sequence can
    /// take (free, or cached and unreferenced); of those, the ones kept for the prefix
    /// cache.
    pub kv_blocks: AtomicUsize,
    pub kv_blocks_free: AtomicUsize,
    pub kv_blocks_cached: AtomicUsize,
    /// Bytes of the pools, and of the blocks sequences hold.
    pub kv_bytes: AtomicUsize,
    pub kv_bytes_used: AtomicUsize,
    /// Positions the pool holds (all sequences together).
    pub kv_capacity: AtomicUsize,
    pub steps: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests taken off their sequence to free blocks (they resume later).
    pub preemptions: AtomicU64,
    /// Speculative decoding: tokens proposed, proposed tokens kept, and steps that
    /// carried guesses.
    pub spec_drafted: AtomicU64,
    pub spec_accepted: AtomicU64,
    pub spec_steps: AtomicU64,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    stats: Stats,
    /// Set by [`BatchEngine::inject_failure`]: the loop panics at its next step.
    inject: std::sync::atomic::AtomicBool,
}

struct Queue {
    pending: VecDeque<(Request, Instant)>,
    shutdown: bool,
    /// Why the loop died (a panic in a kernel or a pool worker); it takes no more requests.
    failed: Option<String>,
}

/// A model's engine loop. Dropping it stops the loop; requests still waiting or running
/// get [`Event::Failed`].
pub struct BatchEngine {
    pub params: BatchParams,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    n_vocab: usize,
}

fn lock(q: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

impl BatchEngine {
    /// Starts the loop for `model`; `params` are [`BatchParams::resolve`]d for it (the
    /// engine's `params` show the context it really gives a sequence). Speculation by a
    /// draft model needs [`BatchEngine::with_draft`]; without one it is off.
    pub fn new(model: Arc<Model>, tokenizer: Arc<Tokenizer>, params: BatchParams) -> BatchEngine {
        Self::with_draft(model, tokenizer, params, None)
    }

    /// [`BatchEngine::new`] with a draft model for `params.spec` of type
    /// [`SpecType::Draft`] (the caller checked that it shares the vocabulary:
    /// [`crate::speculative::check_vocab`]).
    pub fn with_draft(
        model: Arc<Model>,
        tokenizer: Arc<Tokenizer>,
        params: BatchParams,
        draft: Option<Arc<Model>>,
    ) -> BatchEngine {
        let params = params.resolve(&model.hp);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                pending: VecDeque::new(),
                shutdown: false,
                failed: None,
            }),
            wake: Condvar::new(),
            stats: Stats::default(),
            inject: std::sync::atomic::AtomicBool::new(false),
        });
        let n_vocab = model.hp.n_vocab;
        let (sh, p) = (Arc::clone(&shared), params.clone());
        let thread = std::thread::Builder::new()
            .name("capy-batch".into())
            // grammar masks recurse as deep as a request's grammar nests
            .stack_size(crate::grammar::COMPILE_STACK / 4)
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    let cp = p.context_params(&model.hp);
                    let spec = p.spec.as_ref().and_then(|(ty, sp)| {
                        let proposer = match (ty, draft) {
                            (SpecType::Ngram, _) => Proposer::Ngram,
                            (SpecType::Draft, Some(d)) => {
                                let dcp = p.draft_context_params(&model.hp, &d.hp);
                                Proposer::Draft(Box::new(DraftModel::new(Context::new(d, dcp))))
                            }
                            (SpecType::Draft, None) => return None,
                        };
                        Some(Speculator::new(sp.clone(), proposer))
                    });
                    let ctx = Context::new(model, cp);
                    let mut lp = Loop::new(Arc::clone(&sh), ctx, tokenizer);
                    lp.spec = spec;
                    lp.spec_max_tokens = p.spec_max_tokens;
                    lp.run();
                });
                // a panic (a kernel, a pool worker) ends the loop: its running requests'
                // sinks were dropped with it; fail the waiting ones and refuse new ones
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    let why = format!("the engine loop failed: {why}");
                    let pending: Vec<_> = {
                        let mut q = lock(&sh.queue);
                        q.failed = Some(why.clone());
                        q.pending.drain(..).collect()
                    };
                    for (mut r, _) in pending {
                        r.sink.send(Event::Failed(why.clone()));
                    }
                }
            })
            .ok();
        if thread.is_none() {
            lock(&shared.queue).failed = Some("the engine thread could not be started".into());
        }
        BatchEngine {
            params,
            shared,
            thread,
            n_vocab,
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Why the engine loop is dead, if it is: it then answers nothing, and the model must
    /// be loaded again.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.queue).failed.clone()
    }

    /// Makes the loop panic at its next step, as a kernel or pool worker failure would:
    /// for tests and fault drills of what depends on the engine.
    pub fn inject_failure(&self) {
        self.shared
            .inject
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.wake.notify_all();
    }

    /// Queues a request. Checks it first: an empty prompt, a token outside the vocabulary
    /// or a prompt that leaves no room to generate is refused here, as is a request that
    /// finds the queue full.
    ///
    /// # Errors
    /// As [`BatchEngine::submit_all`].
    pub fn submit(&self, req: Request) -> Result<()> {
        self.submit_all(vec![req])
    }

    /// Queues the choices of one request together, or none of them: each is checked as
    /// [`BatchEngine::submit`] says, and they enter the queue only if all fit in it now.
    ///
    /// # Errors
    /// [`Error::EmptyPrompt`], [`Error::BadToken`], [`Error::PromptTooLong`] for a bad choice;
    /// [`Error::TooManyChoices`] when there are more than the queue can ever hold (retrying
    /// cannot help); [`Error::QueueFull`] when they do not fit now; [`Error::Stopped`].
    pub fn submit_all(&self, reqs: Vec<Request>) -> Result<()> {
        for req in &reqs {
            self.check(req)?;
        }
        if reqs.len() > self.params.max_queue {
            return Err(Error::TooManyChoices {
                n: reqs.len(),
                max: self.params.max_queue,
            });
        }
        let mut q = lock(&self.shared.queue);
        if let Some(why) = &q.failed {
            return Err(Error::Failed(why.clone()));
        }
        if self.thread.is_none() || q.shutdown {
            return Err(Error::Stopped);
        }
        // requests whose client left wait for nothing: they give their places up
        q.pending.retain(|(r, _)| !r.sink.is_closed());
        if q.pending.len() + reqs.len() > self.params.max_queue {
            return Err(Error::QueueFull {
                max: self.params.max_queue,
            });
        }
        let now = Instant::now();
        q.pending.extend(reqs.into_iter().map(|r| (r, now)));
        self.shared
            .stats
            .queued
            .store(q.pending.len(), Ordering::Relaxed);
        drop(q);
        self.shared.wake.notify_all();
        Ok(())
    }

    fn check(&self, req: &Request) -> Result<()> {
        if req.prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= self.n_vocab) {
            return Err(Error::BadToken {
                token: bad,
                n_vocab: self.n_vocab,
            });
        }
        let n_ctx = self.n_ctx_for(req);
        if req.prompt.len() >= n_ctx {
            return Err(Error::PromptTooLong {
                n_prompt: req.prompt.len(),
                n_ctx,
            });
        }
        Ok(())
    }

    /// The context a request gets: the engine's per-sequence cap, or less if it asks.
    pub fn n_ctx_for(&self, req: &Request) -> usize {
        let n = self.params.n_ctx.max(2);
        req.n_ctx.map_or(n, |c| c.clamp(2, n))
    }
}

impl Drop for BatchEngine {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request holding a sequence, running or preempted.
struct Active {
    sink: Box<dyn Sink>,
    /// prompt tokens: the first ones of `tokens`
    n_prompt: usize,
    params: GenerateParams,
    n_ctx: usize,
    salt: u64,
    /// The tokens whose keys and values the sequence needs before its next step: the
    /// prompt, then each generated token once it has been fed back.
    tokens: Vec<u32>,
    /// How many of `tokens` the cache holds; prefill (or, after a preemption, recomputing)
    /// is done when it reaches `tokens.len()`.
    next: usize,
    cached_tokens: usize,
    sampler: Sampler,
    /// the request's grammar, advanced token by token (structured outputs)
    grammar: Option<Grammar>,
    /// the grammar allows nothing after the token being handed out
    grammar_done: bool,
    text: Option<TextStream>,
    n_gen: usize,
    /// The sampled token to feed at the next step.
    pending: Option<u32>,
    prompt_lp: Option<Vec<Option<PromptLogprob>>>,
    /// admission order: prefill goes oldest first, preemption takes the newest
    order: u64,
    queue_ms: f64,
    t_start: Instant,
    t_gen: Option<Instant>,
    spec: SpecStats,
}

impl Active {
    /// Leading tokens the prefix cache may supply when the sequence (re)starts: all of them
    /// when the next step feeds a sampled token, all but the last prompt token (its logits
    /// are needed) otherwise, none while the prompt's logprobs are still wanted.
    fn max_cached(&self) -> usize {
        if self.prompt_lp.is_some() {
            0
        } else if self.pending.is_some() {
            self.tokens.len()
        } else {
            self.tokens.len() - 1
        }
    }
}

/// What a logit row of the batch belongs to.
#[derive(Clone, Copy)]
enum Row {
    Decode(usize),
    /// A guessed token of the sequence, checked against the row before it.
    Guess,
    Prompt {
        seq: usize,
        pos: usize,
    },
}

struct Loop {
    shared: Arc<Shared>,
    ctx: Context,
    tok: Arc<Tokenizer>,
    /// per sequence id of the cache: the request using it
    seqs: Vec<Option<Active>>,
    /// requests whose blocks were taken back, oldest first; they resume before new ones
    preempted: VecDeque<Active>,
    batch: Batch,
    rows: Vec<Row>,
    admitted: u64,
    /// Speculative decoding, when configured.
    spec: Option<Speculator>,
    spec_max_tokens: usize,
    /// per sequence id: this step's guesses
    guesses: Vec<Proposal>,
}

/// Sequences the pool keeps one block of room for, each, when admitting another: growth
/// of running sequences should not have to preempt the one just admitted.
fn headroom(n_running: usize) -> usize {
    n_running
}

impl Loop {
    fn new(shared: Arc<Shared>, ctx: Context, tok: Arc<Tokenizer>) -> Loop {
        let n_seq = ctx.kv.n_seq;
        Loop {
            seqs: (0..ctx.kv.n_seq).map(|_| None).collect(),
            preempted: VecDeque::new(),
            shared,
            ctx,
            tok,
            batch: Batch::new(),
            rows: Vec::new(),
            admitted: 0,
            spec: None,
            spec_max_tokens: 0,
            guesses: (0..n_seq).map(|_| Proposal::default()).collect(),
        }
    }

    fn n_running(&self) -> usize {
        self.seqs.iter().filter(|s| s.is_some()).count()
    }

    fn run(mut self) {
        loop {
            if !self.admit() {
                break;
            }
            self.drop_closed();
            if self.n_running() == 0 {
                continue;
            }
            self.step();
            self.publish();
        }
        // shutdown: tell everyone
        let pending: Vec<_> = lock(&self.shared.queue).pending.drain(..).collect();
        for (mut r, _) in pending {
            r.sink.send(Event::Failed("the model was unloaded".into()));
        }
        let running = self.seqs.iter_mut().filter_map(Option::take);
        for mut a in running.chain(self.preempted.drain(..)) {
            a.sink.send(Event::Failed("the model was unloaded".into()));
        }
    }

    fn publish(&self) {
        let st = &self.shared.stats;
        st.running.store(self.n_running(), Ordering::Relaxed);
        let used = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].is_some())
            .map(|i| self.ctx.kv.seq_len(i))
            .sum();
        st.kv_used.store(used, Ordering::Relaxed);
        let c = self.ctx.kv.block_counts();
        st.kv_blocks.store(c.total, Ordering::Relaxed);
        st.kv_blocks_free
            .store(c.free + c.cached, Ordering::Relaxed);
        st.kv_blocks_cached.store(c.cached, Ordering::Relaxed);
        st.kv_bytes.store(self.ctx.kv.bytes(), Ordering::Relaxed);
        st.kv_bytes_used
            .store(self.ctx.kv.bytes_used(), Ordering::Relaxed);
        st.kv_capacity
            .store(self.ctx.kv.capacity(), Ordering::Relaxed);
    }

    /// Starts waiting requests (preempted ones first) while a sequence id and the blocks
    /// their prompts need are free; sleeps while there is nothing to do. `false` on
    /// shutdown.
    fn admit(&mut self) -> bool {
        let shared = Arc::clone(&self.shared);
        let mut q = lock(&shared.queue);
        loop {
            if q.shutdown {
                return false;
            }
            // requests whose client went away while waiting leave the queue (and its count)
            q.pending.retain(|(r, _)| !r.sink.is_closed());
            if self.n_running() > 0 || !q.pending.is_empty() || !self.preempted.is_empty() {
                break;
            }
            self.publish();
            q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        while let Some(si) = self.seqs.iter().position(Option::is_none) {
            if let Some(a) = self.preempted.front() {
                let Some(plan) = self.fits(&a.tokens, a.salt, a.max_cached()) else {
                    break;
                };
                let Some(a) = self.preempted.pop_front() else {
                    break;
                };
                self.resume(si, a, &plan);
                continue;
            }
            let Some((req, _)) = q.pending.front() else {
                break;
            };
            if req.sink.is_closed() {
                q.pending.pop_front();
                continue;
            }
            let salt = capy_model::salt_id(&req.salt);
            let max = if req.params.echo {
                0
            } else {
                req.prompt.len() - 1
            };
            let Some(plan) = self.fits(&req.prompt, salt, max) else {
                break;
            };
            if self.computing_shared_start(&req.prompt, salt, plan.matched.min(max), max) {
                break;
            }
            let Some((req, t_queued)) = q.pending.pop_front() else {
                break;
            };
            self.start(si, req, t_queued, salt, &plan);
        }
        shared
            .stats
            .queued
            .store(q.pending.len() + self.preempted.len(), Ordering::Relaxed);
        true
    }

    /// Whether a running sequence is still computing full blocks of the start of `tokens`
    /// that the cache does not hold yet (it supplies `matched`, at most `max` may come
    /// from it), or the whole of `tokens[..max]` (the same prompt; its partly filled last
    /// block is published when done): then the request waits and finds them there once
    /// computed, instead of computing them too (the choices of a request with `n` > 1, an
    /// ensemble's samples, clients arriving together with the same system prompt).
    fn computing_shared_start(
        &self,
        tokens: &[u32],
        salt: u64,
        matched: usize,
        max: usize,
    ) -> bool {
        self.seqs.iter().flatten().any(|a| {
            let common = a.tokens[..a.n_prompt]
                .iter()
                .zip(&tokens[..max])
                .take_while(|(x, y)| x == y)
                .count();
            let blocks = common / KV_TILE;
            // the same prompt (all `max` tokens) as one still being computed: its last,
            // partly filled block is entered in the index once it is done
            // ([`capy_model::KvCache::publish_partial`])
            let same = max > matched && common == max && a.next < a.n_prompt;
            a.salt == salt && (same || (blocks > matched / KV_TILE && a.next < blocks * KV_TILE))
        })
    }

    /// The prefix cache's plan for these tokens if the pool can take them now, with a
    /// block of room for each running sequence to grow (none needed when nothing runs).
    fn fits(&self, tokens: &[u32], salt: u64, max: usize) -> Option<PrefixPlan> {
        let kv = &self.ctx.kv;
        let plan = kv.plan_prefix(tokens, salt, max);
        let need = plan.need + kv.per_group(headroom(self.n_running()));
        need.fits_in(&kv.available()).then_some(plan)
    }

    /// Gives a sequence the cached prefix of `tokens` and every block the rest needs.
    fn attach(&mut self, si: usize, tokens: &[u32], plan: &PrefixPlan) -> usize {
        let kv = &mut self.ctx.kv;
        let kept = kv.attach_prefix(si, plan, tokens).unwrap_or(0);
        // cannot fail: `fits` counted the blocks
        let _ = kv.reserve(si, tokens.len());
        kept
    }

    fn start(&mut self, si: usize, req: Request, t_queued: Instant, salt: u64, plan: &PrefixPlan) {
        let Request {
            prompt,
            mut params,
            n_ctx,
            mut sink,
            ..
        } = req;
        let cap = self.ctx.kv.n_ctx;
        let n_ctx = n_ctx.map_or(cap, |c| c.clamp(2, cap));
        let keep = self.attach(si, &prompt, plan);
        if let Some(spec) = self.spec.as_mut() {
            spec.new_request(si);
        }
        if !sink.send(Event::Started { cached: keep }) {
            let _ = self.ctx.kv.clear(si);
            return;
        }
        let mut sampler = Sampler::new(params.sampler.clone());
        for &t in &prompt {
            sampler.accept(t);
        }
        // a grammar's end is an end-of-generation token, ignore_eos or not
        let grammar = params.grammar.take();
        if grammar.is_some() {
            params.ignore_eos = false;
        }
        let st = &self.shared.stats;
        st.prompt_tokens
            .fetch_add(prompt.len() as u64, Ordering::Relaxed);
        st.cached_tokens.fetch_add(keep as u64, Ordering::Relaxed);
        self.admitted += 1;
        self.seqs[si] = Some(Active {
            sink,
            text: Some(TextStream::new(&params.stop)),
            prompt_lp: params.echo.then(|| vec![None]),
            n_ctx,
            salt,
            n_prompt: prompt.len(),
            next: keep,
            cached_tokens: keep,
            sampler,
            grammar,
            grammar_done: false,
            n_gen: 0,
            pending: None,
            order: self.admitted,
            queue_ms: t_queued.elapsed().as_secs_f64() * 1e3,
            t_start: Instant::now(),
            t_gen: None,
            spec: SpecStats::default(),
            tokens: prompt,
            params,
        });
    }

    /// Puts a preempted request back on a sequence; it recomputes what the cache lost.
    fn resume(&mut self, si: usize, mut a: Active, plan: &PrefixPlan) {
        let tokens = std::mem::take(&mut a.tokens);
        a.next = self.attach(si, &tokens, plan);
        a.tokens = tokens;
        self.seqs[si] = Some(a);
    }

    /// Takes the newest running request off its sequence, returning its blocks to the pool
    /// (those the index names stay cached, so it may find them again); it waits to resume
    /// ahead of new requests and then computes again what it lost, with the same sampler
    /// state, so its output is what it would have been.
    fn preempt_newest(&mut self) -> bool {
        let Some(si) = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].is_some())
            .max_by_key(|&i| self.seqs[i].as_ref().map_or(0, |a| a.order))
        else {
            return false;
        };
        let Some(mut a) = self.seqs[si].take() else {
            return false;
        };
        let _ = self.ctx.kv.clear(si);
        a.next = 0;
        if a.prompt_lp.is_some() {
            a.prompt_lp = Some(vec![None]);
        }
        self.shared
            .stats
            .preemptions
            .fetch_add(1, Ordering::Relaxed);
        let at = self.preempted.partition_point(|p| p.order < a.order);
        self.preempted.insert(at, a);
        true
    }

    /// Frees the sequences of requests whose listener went away.
    fn drop_closed(&mut self) {
        for si in 0..self.seqs.len() {
            if self.seqs[si].as_ref().is_some_and(|a| a.sink.is_closed()) {
                self.seqs[si] = None;
                let _ = self.ctx.kv.clear(si);
            }
        }
        self.preempted.retain(|a| !a.sink.is_closed());
    }

    /// Preempts the newest running requests until every generating sequence has a block
    /// for its next token (prefilling ones took theirs when they started).
    fn make_room(&mut self) {
        loop {
            let need: BlockNeed = (0..self.seqs.len())
                .filter_map(|si| {
                    let a = self.seqs[si].as_ref()?;
                    let len = a.tokens.len();
                    (a.pending.is_some() && a.next == len)
                        .then(|| self.ctx.kv.blocks_to_reach(si, len + 1))
                })
                .sum();
            if need.fits_in(&self.ctx.kv.available()) || !self.preempt_newest() {
                return;
            }
        }
    }

    /// Guesses for the sequences about to decode (their token to feed is the last of their
    /// tokens), into `self.guesses`, when speculation is on and the step is small enough:
    /// no prompt tokens waiting, and the decoding sequences with their guesses within
    /// `spec_max_tokens`. Guesses the pool has no blocks for are dropped.
    fn guess(&mut self, decoding: &[usize]) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        let n = decoding.len();
        let budget = self.spec_max_tokens.min(self.ctx.params.n_outputs);
        let prefilling = self.seqs.iter().flatten().any(|a| a.next < a.tokens.len());
        if n == 0 || prefilling || 2 * n > budget {
            return;
        }
        let per_seq = (budget - n) / n;
        let mut reqs = Vec::with_capacity(n);
        for &si in decoding {
            let Some(a) = self.seqs[si].as_ref() else {
                continue;
            };
            let pos = a.tokens.len() - 1;
            // guesses that could all be kept without passing max_tokens or the context
            let k = per_seq
                .min(a.params.max_tokens.saturating_sub(a.n_gen + 1))
                .min(a.n_ctx.saturating_sub(pos + 2));
            // (a grammar would have to check each guess: constrained sequences don't guess)
            if k > 0 && a.grammar.is_none() {
                reqs.push(ProposeReq {
                    seq: si,
                    tokens: &a.tokens,
                    k,
                    sampling: &a.params.sampler,
                });
            }
        }
        let mut out: Vec<Proposal> = reqs
            .iter()
            .map(|r| std::mem::take(&mut self.guesses[r.seq]))
            .collect();
        let n_vocab = self.ctx.n_vocab();
        if let Err(e) = spec.propose(&reqs, &self.tok, n_vocab, &mut out) {
            // a failed draft pass costs the guesses, not the requests
            tracing::warn!("speculation failed this step: {e}");
            out.iter_mut().for_each(|o| o.tokens.clear());
        }
        let seqs: Vec<usize> = reqs.iter().map(|r| r.seq).collect();
        drop(reqs);
        // the guesses' positions need blocks; when the pool is short, no guesses
        let need: BlockNeed = seqs
            .iter()
            .zip(&out)
            .map(|(&si, o)| {
                let len = self.seqs[si].as_ref().map_or(0, |a| a.tokens.len());
                self.ctx.kv.blocks_to_reach(si, len + o.tokens.len())
            })
            .sum();
        let short = !need.fits_in(&self.ctx.kv.available());
        for (si, mut o) in seqs.into_iter().zip(out) {
            if short {
                o.tokens.clear();
                o.qs.clear();
            }
            if let Some(a) = self.seqs[si].as_mut() {
                a.spec.drafted += o.tokens.len() as u64;
                a.spec.steps += u64::from(!o.tokens.is_empty());
            }
            self.guesses[si] = o;
        }
    }

    /// One forward pass: every generating sequence's next token, then prompt chunks in
    /// admission order while the batch has room.
    fn step(&mut self) {
        if self
            .shared
            .inject
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            panic!("injected failure");
        }
        self.make_room();
        self.batch.clear();
        self.rows.clear();
        let n_batch = self.ctx.params.n_batch;
        let n_out_max = self.ctx.params.n_outputs;
        // sequences whose request ended: their draft state goes
        if let Some(spec) = self.spec.as_mut() {
            for (si, s) in self.seqs.iter().enumerate() {
                if s.is_none() && spec.holds(si) {
                    spec.clear(si);
                }
            }
        }
        let mut decoding = Vec::new();
        for (si, s) in self.seqs.iter_mut().enumerate() {
            let Some(a) = s.as_mut() else { continue };
            self.guesses[si].tokens.clear();
            self.guesses[si].qs.clear();
            if a.next < a.tokens.len() {
                continue;
            }
            if let Some(tok) = a.pending.take() {
                a.tokens.push(tok);
                a.next += 1;
                decoding.push(si);
            }
        }
        self.guess(&decoding);
        for &si in &decoding {
            let Some(a) = self.seqs[si].as_ref() else {
                continue;
            };
            let pos = a.tokens.len() - 1;
            self.batch.push(a.tokens[pos], pos, si, true);
            self.rows.push(Row::Decode(si));
            for (i, &t) in self.guesses[si].tokens.iter().enumerate() {
                self.batch.push(t, pos + 1 + i, si, true);
                self.rows.push(Row::Guess);
            }
        }
        let mut prefill: Vec<(u64, usize)> = self
            .seqs
            .iter()
            .enumerate()
            .filter_map(|(si, s)| {
                let a = s.as_ref()?;
                (a.next < a.tokens.len()).then_some((a.order, si))
            })
            .collect();
        prefill.sort_unstable();
        for (_, si) in prefill {
            let room = n_batch - self.batch.len();
            let out_room = n_out_max - self.rows.len();
            let Some(a) = self.seqs[si].as_mut() else {
                continue;
            };
            let echo = a.prompt_lp.is_some();
            // the last token's logits are needed unless a sampled token is waiting
            let wants_last = a.pending.is_none();
            let left = a.tokens.len() - a.next;
            let mut take = left.min(room);
            if echo {
                take = take.min(out_room);
            } else if take == left && wants_last && out_room == 0 {
                take -= 1;
            }
            if take == 0 {
                continue;
            }
            for p in a.next..a.next + take {
                let last = p + 1 == a.tokens.len();
                let out = echo || (last && wants_last);
                self.batch.push(a.tokens[p], p, si, out);
                if out {
                    self.rows.push(Row::Prompt { seq: si, pos: p });
                }
            }
            a.next += take;
        }
        if self.batch.is_empty() {
            return;
        }
        self.shared.stats.steps.fetch_add(1, Ordering::Relaxed);
        let n_vocab = self.ctx.n_vocab();
        let logits = match self.ctx.decode(&self.batch) {
            Ok(l) => l,
            Err(e) => {
                // not expected (the batch is checked as it is built); fail its requests
                let msg = format!("forward pass failed: {e}");
                for &si in self.batch.seq.iter() {
                    if let Some(mut a) = self.seqs[si].take() {
                        a.sink.send(Event::Failed(msg.clone()));
                    }
                    let _ = self.ctx.kv.clear(si);
                }
                return;
            }
        };
        let mut ended = Vec::new();
        let mut resized = Vec::new();
        // sequences whose prompt this step finished
        let mut prompt_done = Vec::new();
        let row_at = |j: usize| &logits[j * n_vocab..(j + 1) * n_vocab];
        for (j, &r) in self.rows.iter().enumerate() {
            let row = row_at(j);
            let (si, pos) = match r {
                Row::Decode(si) => (si, None),
                Row::Guess => continue,
                Row::Prompt { seq, pos } => (seq, Some(pos)),
            };
            let s = &mut self.seqs[si];
            let Some(a) = s.as_mut() else { continue };
            if let Some(pos) = pos {
                let len = a.n_prompt;
                if let Some(lp) = a.prompt_lp.as_mut() {
                    if pos + 1 < len {
                        let next = a.tokens[pos + 1];
                        lp.push(Some(prompt_logprob(row, next, a.params.top_logprobs)));
                    }
                }
                if pos + 1 < len {
                    continue;
                }
                a.t_gen = Some(Instant::now());
                prompt_done.push(si);
                if let Some(lp) = a.prompt_lp.take() {
                    if !a.sink.send(Event::PromptLogprobs(lp)) {
                        *s = None;
                        ended.push(si);
                        continue;
                    }
                }
                if a.params.max_tokens == 0 {
                    finish(s, StopReason::Length);
                    ended.push(si);
                    continue;
                }
            }
            let guess = &self.guesses[si];
            if guess.tokens.is_empty() {
                if emit(s, row, &self.tok, &self.shared.stats) {
                    ended.push(si);
                }
                continue;
            }
            let rows: Vec<&[f32]> = (j..=j + guess.tokens.len()).map(row_at).collect();
            let (done, n_acc) = verify(s, &rows, guess, &self.tok, &self.shared.stats);
            let st = &self.shared.stats;
            st.spec_steps.fetch_add(1, Ordering::Relaxed);
            st.spec_drafted
                .fetch_add(guess.tokens.len() as u64, Ordering::Relaxed);
            st.spec_accepted.fetch_add(n_acc as u64, Ordering::Relaxed);
            if done {
                ended.push(si);
            } else if n_acc < guess.tokens.len() {
                resized.push(si);
            }
        }
        // rejected guesses leave the cache (a sliding-window layer that cannot take them
        // back has the sequence recompute what it lost)
        for si in resized {
            if let Some(a) = self.seqs[si].as_mut() {
                let len = a.tokens.len();
                a.next = self.ctx.kv.truncate(si, len).unwrap_or(0).min(len);
            }
        }
        // requests waiting with the same prompt copy the last, partly filled block
        for si in prompt_done {
            self.ctx.kv.publish_partial(si);
        }
        for si in ended {
            let _ = self.ctx.kv.clear(si);
        }
    }
}

/// Checks a sequence's guesses (`guess`) against its logit rows (`rows[i]` predicts guess
/// `i`; the last row follows the last guess): each kept guess is reported and joins the
/// sequence's tokens; at the first rejection the token drawn instead is reported and
/// becomes the next to feed; when all are kept one more token is sampled from the last row.
/// Returns whether the request ended and how many guesses were kept.
fn verify(
    s: &mut Option<Active>,
    rows: &[&[f32]],
    guess: &Proposal,
    tok: &Tokenizer,
    stats: &Stats,
) -> (bool, usize) {
    let mut n_acc = 0;
    for (i, &x) in guess.tokens.iter().enumerate() {
        let Some(a) = s.as_mut() else {
            return (true, n_acc);
        };
        let q = guess.qs.get(i).map(|q| q.as_slice());
        match judge(&mut a.sampler, rows[i], x, q) {
            Ok(x) => {
                n_acc += 1;
                a.spec.accepted += 1;
                if emit_chosen(s, x, rows[i], tok, stats) {
                    return (true, n_acc);
                }
                if let Some(a) = s.as_mut() {
                    // fed in this step already
                    a.pending = None;
                    a.tokens.push(x);
                    a.next += 1;
                }
            }
            Err(t) => return (emit_chosen(s, t, rows[i], tok, stats), n_acc),
        }
    }
    (emit(s, rows[guess.tokens.len()], tok, stats), n_acc)
}

/// Samples a sequence's next token from its logits, reports it, and ends the request when
/// it is done (then `true`: its sequence is free).
fn emit(s: &mut Option<Active>, row: &[f32], tok: &Tokenizer, stats: &Stats) -> bool {
    let Some(a) = s.as_mut() else { return false };
    match choose(&mut a.sampler, a.grammar.as_mut(), row) {
        Ok(id) => match crate::generate::finished(&mut a.grammar) {
            Ok(complete) => {
                a.grammar_done = complete;
                emit_chosen(s, id, row, tok, stats)
            }
            Err(e) => {
                if let Some(mut a) = s.take() {
                    a.sink.send(Event::Failed(e.to_string()));
                }
                true
            }
        },
        Err(e) => {
            if let Some(mut a) = s.take() {
                a.sink.send(Event::Failed(e));
            }
            true
        }
    }
}

/// Reports a chosen token `id` (sampled from `row`, or a kept guess), and ends the request
/// when it is done (then `true`); otherwise `id` is the next token to feed.
fn emit_chosen(
    s: &mut Option<Active>,
    id: u32,
    row: &[f32],
    tok: &Tokenizer,
    stats: &Stats,
) -> bool {
    let Some(a) = s.as_mut() else { return false };
    let Some(stream) = a.text.as_mut() else {
        return false;
    };
    let (token, text, end) = emit_token(&mut a.sampler, id, row, tok, &a.params, stream);
    a.n_gen += 1;
    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let alive = a.sink.send(Event::Token { token, text });
    let reason = if end.is_some() {
        end
    } else if !alive {
        Some(StopReason::Cancelled)
    } else if a.grammar_done {
        // the grammar allows nothing more: the answer is whole, as if the model ended it
        Some(StopReason::Eos)
    } else if a.n_gen >= a.params.max_tokens {
        Some(StopReason::Length)
    } else if a.tokens.len() + 1 >= a.n_ctx {
        // prompt + answer fill the context (the token just sampled takes the last place)
        Some(StopReason::Context)
    } else {
        None
    };
    match reason {
        Some(r) => {
            finish(s, r);
            true
        }
        None => {
            a.pending = Some(id);
            false
        }
    }
}

fn finish(s: &mut Option<Active>, reason: StopReason) {
    let Some(mut a) = s.take() else { return };
    let (tail, text) = match a.text.take() {
        Some(t) => t.finish(reason == StopReason::Stop),
        None => Default::default(),
    };
    let now = Instant::now();
    let t_gen = a.t_gen.unwrap_or(now);
    a.sink.send(Event::Done(Summary {
        stop_reason: reason,
        prompt_tokens: a.n_prompt,
        cached_tokens: a.cached_tokens,
        completion_tokens: a.n_gen,
        tail,
        text,
        queue_ms: a.queue_ms,
        prompt_ms: (t_gen - a.t_start).as_secs_f64() * 1e3,
        gen_ms: (now - t_gen).as_secs_f64() * 1e3,
        spec: a.spec,
    }));
}
