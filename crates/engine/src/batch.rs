//! Continuous batching: one engine loop per model, on its own thread, serving many requests
//! at once from one [`Context`] with a sequence slot per request.
//!
//! Every step runs, as one batched forward pass, the next token of every sequence that is
//! generating plus a chunk of pending prompt tokens, so each weight matrix is read once per
//! step for all of them. Requests wait in a bounded FIFO queue and take the next free slot;
//! a slot remembers the tokens its cache holds after its request ends, and a new request
//! goes to the free slot sharing the longest prefix with its prompt (a prefix cache).
//! Events (tokens, the end) go to each request's [`Sink`]; a sink that reports itself
//! closed (the client went away) frees its slot before the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use capy_kernels::Isa;
use capy_model::{Batch, Context, ContextParams, Hparams, Model};

use crate::generate::{
    prompt_logprob, sample_next, GenerateParams, PromptLogprob, StopReason, TextStream, TokenOut,
};
use crate::sampler::Sampler;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Sizes of a batching engine.
#[derive(Clone, Debug)]
pub struct BatchParams {
    /// Sequences generating at once.
    pub n_slots: usize,
    /// Positions per sequence (prompt + generated).
    pub n_ctx: usize,
    /// Most tokens in one forward pass.
    pub n_batch: usize,
    pub n_threads: usize,
    /// Requests that may wait for a slot; more are refused with [`Error::QueueFull`].
    pub max_queue: usize,
    pub isa: Option<Isa>,
}

impl Default for BatchParams {
    fn default() -> Self {
        BatchParams {
            n_slots: 16,
            n_ctx: 2048,
            n_batch: 512,
            n_threads: ContextParams::default().n_threads,
            max_queue: 64,
            isa: None,
        }
    }
}

impl BatchParams {
    /// Logit rows one step may produce: every generating sequence plus room for a chunk of
    /// prompt rows when prompt logprobs are asked for.
    fn n_outputs(&self) -> usize {
        (self.n_slots + 16).min(self.n_batch.max(1))
    }

    /// The context the engine runs in.
    fn context_params(&self) -> ContextParams {
        ContextParams {
            n_ctx: self.n_ctx.max(2),
            n_seq: self.n_slots.max(1),
            n_batch: self.n_batch.max(1),
            n_outputs: self.n_outputs(),
            n_threads: self.n_threads.max(1),
            isa: self.isa,
        }
    }

    /// Bytes of the KV cache and the per-step buffers of an engine of these sizes.
    pub fn memory_bytes(&self, hp: &Hparams) -> u64 {
        self.context_params().memory_bytes(hp)
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
    pub sink: Box<dyn Sink>,
}

/// Live counters of an engine, read by the server's metrics.
#[derive(Default, Debug)]
pub struct Stats {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    /// Positions held in the KV cache by running sequences.
    pub kv_used: AtomicUsize,
    /// Blocks in the KV cache's pool, blocks that no sequence holds (idle sequences keep
    /// theirs as a prefix cache), and bytes per block.
    pub kv_blocks: AtomicUsize,
    pub kv_blocks_free: AtomicUsize,
    pub kv_block_bytes: AtomicUsize,
    pub steps: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
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
    pub fn new(model: Arc<Model>, tokenizer: Arc<Tokenizer>, params: BatchParams) -> BatchEngine {
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
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    let ctx = Context::new(model, p.context_params());
                    Loop::new(Arc::clone(&sh), ctx, tokenizer).run();
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

    /// The context a request gets: the engine's, or less if it asks.
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

/// A request holding a slot.
struct Active {
    sink: Box<dyn Sink>,
    prompt: Vec<u32>,
    params: GenerateParams,
    n_ctx: usize,
    /// Next prompt index to compute; prefill is done when it reaches `prompt.len()`.
    next: usize,
    cached_tokens: usize,
    sampler: Sampler,
    text: Option<TextStream>,
    n_gen: usize,
    /// The sampled token to feed at the next step.
    pending: Option<u32>,
    prompt_lp: Option<Vec<Option<PromptLogprob>>>,
    /// admission order, for fair prefill
    order: u64,
    queue_ms: f64,
    t_start: Instant,
    t_gen: Option<Instant>,
}

struct Slot {
    /// Tokens whose K/V the cache holds for this sequence.
    cached: Vec<u32>,
    active: Option<Active>,
    /// step of last use, to keep recently used prefixes longest
    last_used: u64,
}

/// What a logit row of the batch belongs to.
#[derive(Clone, Copy)]
enum Row {
    Decode(usize),
    Prompt { slot: usize, pos: usize },
}

struct Loop {
    shared: Arc<Shared>,
    ctx: Context,
    tok: Arc<Tokenizer>,
    slots: Vec<Slot>,
    batch: Batch,
    rows: Vec<Row>,
    step: u64,
    admitted: u64,
}

impl Loop {
    fn new(shared: Arc<Shared>, ctx: Context, tok: Arc<Tokenizer>) -> Loop {
        let slots = (0..ctx.kv.n_seq)
            .map(|_| Slot {
                cached: Vec::new(),
                active: None,
                last_used: 0,
            })
            .collect();
        Loop {
            shared,
            ctx,
            tok,
            slots,
            batch: Batch::new(),
            rows: Vec::new(),
            step: 0,
            admitted: 0,
        }
    }

    fn n_running(&self) -> usize {
        self.slots.iter().filter(|s| s.active.is_some()).count()
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
        for s in &mut self.slots {
            if let Some(mut a) = s.active.take() {
                a.sink.send(Event::Failed("the model was unloaded".into()));
            }
        }
    }

    fn publish(&self) {
        let st = &self.shared.stats;
        st.running.store(self.n_running(), Ordering::Relaxed);
        let used = self
            .slots
            .iter()
            .filter(|s| s.active.is_some())
            .map(|s| s.cached.len())
            .sum();
        st.kv_used.store(used, Ordering::Relaxed);
        let (total, free) = self.ctx.kv.blocks();
        st.kv_blocks.store(total, Ordering::Relaxed);
        st.kv_blocks_free.store(free, Ordering::Relaxed);
        st.kv_block_bytes
            .store(self.ctx.kv.block_bytes(), Ordering::Relaxed);
    }

    /// Moves waiting requests into free slots; sleeps while there is nothing to do.
    /// `false` on shutdown.
    fn admit(&mut self) -> bool {
        let shared = Arc::clone(&self.shared);
        let mut q = lock(&shared.queue);
        loop {
            if q.shutdown {
                return false;
            }
            if self.n_running() > 0 || !q.pending.is_empty() {
                break;
            }
            self.publish();
            q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        while !q.pending.is_empty() {
            let Some(si) = self.free_slot(&q.pending[0].0.prompt) else {
                break;
            };
            let Some((req, t_queued)) = q.pending.pop_front() else {
                break;
            };
            self.start(si, req, t_queued);
        }
        shared
            .stats
            .queued
            .store(q.pending.len(), Ordering::Relaxed);
        true
    }

    /// The free slot whose cache shares the longest prefix with `prompt`; among equals
    /// the least recently used.
    fn free_slot(&self, prompt: &[u32]) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .map(|(i, s)| {
                (
                    common_prefix(&s.cached, prompt),
                    std::cmp::Reverse(s.last_used),
                    i,
                )
            })
            .max()
            .map(|(_, _, i)| i)
    }

    fn start(&mut self, si: usize, req: Request, t_queued: Instant) {
        let Request {
            prompt,
            params,
            n_ctx,
            mut sink,
        } = req;
        let n_ctx = n_ctx.map_or(self.ctx.kv.n_ctx, |c| c.clamp(2, self.ctx.kv.n_ctx));
        let slot = &mut self.slots[si];
        // reuse the cached prefix, but recompute at least the last prompt token (its
        // logits are needed) and everything when the prompt's logprobs are wanted
        let mut keep = common_prefix(&slot.cached, &prompt).min(prompt.len() - 1);
        if params.echo {
            keep = 0;
        }
        slot.cached.truncate(keep);
        // cannot fail: the slot index is in range
        let _ = self.ctx.kv.truncate(si, keep);
        if !sink.send(Event::Started { cached: keep }) {
            return;
        }
        let mut sampler = Sampler::new(params.sampler.clone());
        for &t in &prompt {
            sampler.accept(t);
        }
        let st = &self.shared.stats;
        st.prompt_tokens
            .fetch_add(prompt.len() as u64, Ordering::Relaxed);
        st.cached_tokens.fetch_add(keep as u64, Ordering::Relaxed);
        self.admitted += 1;
        slot.active = Some(Active {
            sink,
            text: Some(TextStream::new(&params.stop)),
            prompt_lp: params.echo.then(|| vec![None]),
            n_ctx,
            next: keep,
            cached_tokens: keep,
            sampler,
            n_gen: 0,
            pending: None,
            order: self.admitted,
            queue_ms: t_queued.elapsed().as_secs_f64() * 1e3,
            t_start: Instant::now(),
            t_gen: None,
            prompt,
            params,
        });
    }

    /// Frees the slots of requests whose listener went away.
    fn drop_closed(&mut self) {
        for s in &mut self.slots {
            if s.active.as_ref().is_some_and(|a| a.sink.is_closed()) {
                s.active = None;
            }
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
        self.step += 1;
        self.batch.clear();
        self.rows.clear();
        let n_batch = self.ctx.params.n_batch;
        let n_out_max = self.ctx.params.n_outputs;
        for (si, s) in self.slots.iter_mut().enumerate() {
            if let Some(tok) = s.active.as_mut().and_then(|a| a.pending.take()) {
                self.batch.push(tok, s.cached.len(), si, true);
                s.cached.push(tok);
                self.rows.push(Row::Decode(si));
            }
        }
        let mut prefill: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(si, s)| {
                let a = s.active.as_ref()?;
                (a.next < a.prompt.len()).then_some((a.order, si))
            })
            .collect();
        prefill.sort_unstable();
        for (_, si) in prefill {
            let room = n_batch - self.batch.len();
            let out_room = n_out_max - self.rows.len();
            let s = &mut self.slots[si];
            let Some(a) = s.active.as_mut() else { continue };
            let left = a.prompt.len() - a.next;
            let mut take = left.min(room);
            if a.params.echo {
                take = take.min(out_room);
            } else if take == left && out_room == 0 {
                take -= 1; // the last prompt token needs a logit row
            }
            if take == 0 {
                continue;
            }
            for p in a.next..a.next + take {
                let last = p + 1 == a.prompt.len();
                let out = a.params.echo || last;
                self.batch.push(a.prompt[p], p, si, out);
                if out {
                    self.rows.push(Row::Prompt { slot: si, pos: p });
                }
            }
            s.cached.extend_from_slice(&a.prompt[a.next..a.next + take]);
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
                    let s = &mut self.slots[si];
                    if let Some(mut a) = s.active.take() {
                        a.sink.send(Event::Failed(msg.clone()));
                    }
                    s.cached.clear();
                    let _ = self.ctx.kv.clear(si);
                }
                return;
            }
        };
        let step = self.step;
        for (row, &r) in logits.chunks_exact(n_vocab).zip(&self.rows) {
            match r {
                Row::Decode(si) => {
                    self.slots[si].last_used = step;
                    emit(&mut self.slots[si], row, &self.tok, &self.shared.stats);
                }
                Row::Prompt { slot: si, pos } => {
                    let s = &mut self.slots[si];
                    s.last_used = step;
                    let Some(a) = s.active.as_mut() else { continue };
                    let len = a.prompt.len();
                    if let Some(lp) = a.prompt_lp.as_mut() {
                        if pos + 1 < len {
                            let next = a.prompt[pos + 1];
                            lp.push(Some(prompt_logprob(row, next, a.params.top_logprobs)));
                        }
                    }
                    if pos + 1 == len {
                        a.t_gen = Some(Instant::now());
                        if let Some(lp) = a.prompt_lp.take() {
                            if !a.sink.send(Event::PromptLogprobs(lp)) {
                                s.active = None;
                                continue;
                            }
                        }
                        if a.params.max_tokens == 0 {
                            finish(s, StopReason::Length);
                        } else {
                            emit(s, row, &self.tok, &self.shared.stats);
                        }
                    }
                }
            }
        }
    }
}

/// Samples a slot's next token from its logits, reports it, and ends the request when it
/// is done.
fn emit(s: &mut Slot, row: &[f32], tok: &Tokenizer, stats: &Stats) {
    let Some(a) = s.active.as_mut() else { return };
    let Some(stream) = a.text.as_mut() else {
        return;
    };
    let (token, text, end) = sample_next(&mut a.sampler, row, tok, &a.params, stream);
    let id = token.id;
    a.n_gen += 1;
    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let alive = a.sink.send(Event::Token { token, text });
    let reason = if end.is_some() {
        end
    } else if !alive {
        Some(StopReason::Cancelled)
    } else if a.n_gen >= a.params.max_tokens {
        Some(StopReason::Length)
    } else if s.cached.len() + 1 >= a.n_ctx {
        // prompt + answer fill the context (the token just sampled takes the last place)
        Some(StopReason::Context)
    } else {
        None
    };
    match reason {
        Some(r) => finish(s, r),
        None => a.pending = Some(id),
    }
}

fn finish(s: &mut Slot, reason: StopReason) {
    let Some(mut a) = s.active.take() else { return };
    let (tail, text) = match a.text.take() {
        Some(t) => t.finish(reason == StopReason::Stop),
        None => Default::default(),
    };
    let now = Instant::now();
    let t_gen = a.t_gen.unwrap_or(now);
    a.sink.send(Event::Done(Summary {
        stop_reason: reason,
        prompt_tokens: a.prompt.len(),
        cached_tokens: a.cached_tokens,
        completion_tokens: a.n_gen,
        tail,
        text,
        queue_ms: a.queue_ms,
        prompt_ms: (t_gen - a.t_start).as_secs_f64() * 1e3,
        gen_ms: (now - t_gen).as_secs_f64() * 1e3,
    }));
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
