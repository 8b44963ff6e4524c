//! Generation for one sequence: prompt prefill (reusing the cached prefix), token-by-token
//! decoding with sampling, logprobs, stop tokens and stop strings, streamed by callback.

use std::sync::Arc;
use std::time::Instant;

use capy_model::{Batch, Context};

use crate::grammar::Grammar;
use crate::sampler::{logprobs, Sampler, SamplerParams};
use crate::speculative::{judge, Proposal, ProposeReq, SpecStats, Speculator};
use crate::tokenizer::{Tokenizer, Utf8Stream};

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampler: SamplerParams,
    pub stop: Vec<String>,
    /// Report each generated token's logprob (costs a pass over the vocabulary per token,
    /// so it is off unless asked for; `top_logprobs > 0` turns it on too).
    pub logprobs: bool,
    /// How many alternatives to report per token (0 = none).
    pub top_logprobs: usize,
    /// Also report the prompt's logprobs.
    pub echo: bool,
    /// Keep going past end-of-generation tokens (not with a grammar: its end is one).
    pub ignore_eos: bool,
    /// Constrains the output (structured outputs): only tokens the grammar allows are
    /// sampled. Each sequence advances its own copy. Logprobs stay the model's, taken
    /// before the mask, as OpenAI and llama.cpp report them.
    pub grammar: Option<Grammar>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 128,
            sampler: SamplerParams::default(),
            stop: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
            echo: false,
            ignore_eos: false,
            grammar: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    /// This token's own text (lossy if it is part of a multi-byte character).
    pub text: String,
    /// Present when logprobs were asked for.
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// Prompt position `i`: what the model predicted there from the tokens before it.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-generation token.
    Eos,
    /// A stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context is full.
    Context,
    /// The callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct GenerateResult {
    pub prompt_tokens: Vec<u32>,
    /// Present with `echo`: entry 0 is `None`.
    pub prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
    pub tokens: Vec<TokenOut>,
    pub text: String,
    pub stop_reason: StopReason,
    /// Prompt tokens actually computed (the rest came from the cache).
    pub prompt_n: usize,
    pub prompt_ms: f64,
    pub gen_ms: f64,
    /// Speculative decoding's counters for this request (zero without a speculator).
    pub spec: SpecStats,
}

/// One sequence in its own context; remembers what the KV cache holds so a follow-up
/// prompt that extends the previous one (a chat) only computes the new tokens.
pub struct Session {
    pub ctx: Context,
    pub tokenizer: Arc<Tokenizer>,
    /// Tokens whose K/V are in the cache, in order.
    cached: Vec<u32>,
    batch: Batch,
    /// Speculative decoding, when set ([`Session::set_speculator`]).
    spec: Option<Speculator>,
}

impl Session {
    pub fn new(ctx: Context, tokenizer: Arc<Tokenizer>) -> Session {
        Session {
            ctx,
            tokenizer,
            cached: Vec::new(),
            batch: Batch::new(),
            spec: None,
        }
    }

    /// Turns speculative decoding on (or off with `None`). Its proposals are capped at
    /// the context's logit rows less one (`ContextParams::n_outputs`: the target checks a
    /// step's tokens in one batch with a row each).
    pub fn set_speculator(&mut self, spec: Option<Speculator>) {
        self.spec = spec;
    }

    pub fn speculator(&self) -> Option<&Speculator> {
        self.spec.as_ref()
    }

    pub fn n_ctx(&self) -> usize {
        self.ctx.params.n_ctx
    }

    /// Forgets the cache.
    pub fn reset(&mut self) {
        self.cached.clear();
        let _ = self.ctx.kv.clear(0);
    }

    /// Decodes `id` at the end of the cache, then up to the proposer's guesses after it,
    /// keeps the guesses the target agrees with (emitting each through `emit`) and returns
    /// the token to decode next, or the reason generation ended.
    #[allow(clippy::too_many_arguments)]
    fn speculative_step(
        &mut self,
        id: u32,
        k: usize,
        seq: &mut Vec<u32>,
        sampler: &mut Sampler,
        params: &GenerateParams,
        stats: &mut SpecStats,
        emit: &mut EmitFn<'_>,
        scratch: &mut SpecScratch,
    ) -> Result<std::result::Result<u32, StopReason>> {
        let n_vocab = self.ctx.n_vocab();
        let pos = self.cached.len();
        let spec = self.spec.as_mut().expect("called with a speculator");
        // seq = the cache's tokens and `id`
        seq.clear();
        seq.extend_from_slice(&self.cached);
        seq.push(id);
        let k = k.min(self.ctx.params.n_outputs.saturating_sub(1));
        let req = ProposeReq {
            seq: 0,
            tokens: seq,
            k,
            sampling: &params.sampler,
        };
        spec.propose(
            &[req],
            &self.tokenizer,
            n_vocab,
            std::slice::from_mut(&mut scratch.guess),
        )?;
        let drafts = &scratch.guess.tokens;
        self.batch.clear();
        self.batch.push(id, pos, 0, true);
        for (i, &t) in drafts.iter().enumerate() {
            self.batch.push(t, pos + 1 + i, 0, true);
        }
        let rows = self.ctx.decode(&self.batch)?;
        scratch.rows.clear();
        scratch.rows.extend_from_slice(rows);
        self.cached.push(id);
        self.cached.extend_from_slice(drafts);
        if !drafts.is_empty() {
            stats.steps += 1;
            stats.drafted += drafts.len() as u64;
        }
        let mut n_acc = 0;
        let mut out = None;
        for (i, &x) in drafts.iter().enumerate() {
            let row = &scratch.rows[i * n_vocab..(i + 1) * n_vocab];
            let q = scratch.guess.qs.get(i).map(|q| q.as_slice());
            match judge(sampler, row, x, q) {
                Ok(x) => {
                    n_acc += 1;
                    if let Some(r) = emit(sampler, x, row) {
                        out = Some(Err(r));
                        break;
                    }
                }
                Err(t) => {
                    out = Some(emit(sampler, t, row).map_or(Ok(t), Err));
                    break;
                }
            }
        }
        stats.accepted += n_acc as u64;
        // the cache keeps `id` and the kept guesses
        let keep = pos + 1 + n_acc;
        if self.cached.len() > keep {
            let kept = self.ctx.kv.truncate(0, keep)?;
            self.cached.truncate(kept);
            if kept < keep {
                // a sliding-window layer could not take the rejected guesses back: recompute
                self.batch.clear();
                for (p, &t) in seq
                    .iter()
                    .chain(drafts.iter())
                    .enumerate()
                    .take(keep)
                    .skip(kept)
                {
                    self.batch.push(t, p, 0, false);
                }
                self.ctx.decode(&self.batch)?;
                self.cached
                    .extend(seq.iter().chain(drafts.iter()).take(keep).skip(kept));
            }
        }
        if let Some(o) = out {
            return Ok(o);
        }
        // every guess kept: one more token from the target's last row
        let row = &scratch.rows[n_acc * n_vocab..(n_acc + 1) * n_vocab];
        let t = sampler.sample(row);
        Ok(emit(sampler, t, row).map_or(Ok(t), Err))
    }

    /// Runs `prompt` then generates, calling `on_token(token, new_text)` for each token;
    /// returning `false` from it stops generation.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_token: impl FnMut(&TokenOut, &str) -> bool,
    ) -> Result<GenerateResult> {
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let n_vocab = self.ctx.n_vocab();
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::BadToken {
                token: bad,
                n_vocab,
            });
        }
        let n_ctx = self.n_ctx();
        if prompt.len() >= n_ctx {
            return Err(Error::PromptTooLong {
                n_prompt: prompt.len(),
                n_ctx,
            });
        }
        let t0 = Instant::now();
        // reuse the cached prefix, but always recompute at least the last prompt token
        // (its logits are needed) and everything when logprobs of the prompt are wanted
        let mut keep = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        keep = keep.min(prompt.len() - 1);
        if params.echo {
            keep = 0;
        }
        // (a sliding-window layer may no longer hold what the prefix's end reads: the cache
        // then keeps less)
        keep = self.ctx.kv.truncate(0, keep)?;
        self.cached.truncate(keep);

        let mut prompt_lp: Option<Vec<Option<PromptLogprob>>> = params.echo.then(|| vec![None]);
        let chunk = if params.echo {
            self.ctx.params.n_outputs.min(self.ctx.params.n_batch)
        } else {
            self.ctx.params.n_batch
        };
        let mut last_logits: Vec<f32> = Vec::new();
        let mut i = keep;
        while i < prompt.len() {
            let end = (i + chunk.max(1)).min(prompt.len());
            self.batch.clear();
            for (p, &t) in prompt.iter().enumerate().take(end).skip(i) {
                self.batch
                    .push(t, p, 0, params.echo || p + 1 == prompt.len());
            }
            let logits = self.ctx.decode(&self.batch)?;
            if let Some(lp) = prompt_lp.as_mut() {
                for (row, p) in logits.chunks_exact(n_vocab).zip(i..end) {
                    if p + 1 < prompt.len() {
                        lp.push(Some(prompt_logprob(
                            row,
                            prompt[p + 1],
                            params.top_logprobs,
                        )));
                    }
                }
            }
            if end == prompt.len() {
                let start = logits.len() - n_vocab;
                last_logits.clear();
                last_logits.extend_from_slice(&logits[start..]);
            }
            self.cached.extend_from_slice(&prompt[i..end]);
            i = end;
        }
        if let Some(spec) = self.spec.as_mut() {
            spec.new_request(0);
            spec.prefill(0, prompt)?;
        }
        let prompt_n = prompt.len() - keep;
        let prompt_ms = t0.elapsed().as_secs_f64() * 1e3;

        let t1 = Instant::now();
        // a grammar's end is an end-of-generation token, ignore_eos or not
        let mut grammar = params.grammar.clone();
        let own;
        let params = if grammar.is_some() && params.ignore_eos {
            own = GenerateParams {
                ignore_eos: false,
                grammar: None,
                ..params.clone()
            };
            &own
        } else {
            params
        };
        let mut sampler = Sampler::new(params.sampler.clone());
        for &t in prompt {
            sampler.accept(t);
        }
        let tokenizer = Arc::clone(&self.tokenizer);
        let mut tokens = Vec::new();
        let mut text = TextStream::new(&params.stop);
        let n_out = std::cell::Cell::new(0usize);
        // the grammar allows nothing more after the token being handed out
        let complete = std::cell::Cell::new(false);
        let mut stats = SpecStats::default();
        let mut stop_reason = StopReason::Length;
        if params.max_tokens > 0 {
            // hands a chosen token out; says why generation ends, if it does
            let mut emit = |sampler: &mut Sampler, id: u32, row: &[f32]| {
                let (tok, new_text, end) =
                    emit_token(sampler, id, row, &tokenizer, params, &mut text);
                tokens.push(tok);
                n_out.set(tokens.len());
                let go_on = on_token(tokens.last().expect("just pushed"), &new_text);
                if end.is_some() {
                    end
                } else if !go_on {
                    Some(StopReason::Cancelled)
                } else if complete.get() {
                    // the answer is whole, as if the model had ended it
                    Some(StopReason::Eos)
                } else if tokens.len() >= params.max_tokens {
                    Some(StopReason::Length)
                } else {
                    None
                }
            };
            // the grammar allows nothing more: the answer is whole
            let first =
                choose(&mut sampler, grammar.as_mut(), &last_logits).map_err(Error::Grammar)?;
            complete.set(finished(&mut grammar)?);
            let mut next = emit(&mut sampler, first, &last_logits).map_or(Ok(first), Err);
            let mut seq = Vec::new();
            let mut scratch = SpecScratch::default();
            while let Ok(id) = next {
                let pos = self.cached.len();
                // prompt + answer fill the context: the token just chosen was the last place
                if pos + 1 >= n_ctx {
                    next = Err(StopReason::Context);
                    break;
                }
                // guesses that could all be kept without passing max_tokens or the context
                let k = (params.max_tokens - n_out.get() - 1).min(n_ctx - 2 - pos);
                if self.spec.is_some() && k > 0 && grammar.is_none() {
                    next = self.speculative_step(
                        id,
                        k,
                        &mut seq,
                        &mut sampler,
                        params,
                        &mut stats,
                        &mut emit,
                        &mut scratch,
                    )?;
                } else {
                    self.batch.clear();
                    self.batch.push(id, pos, 0, true);
                    let logits = self.ctx.decode(&self.batch)?;
                    last_logits.clear();
                    last_logits.extend_from_slice(logits);
                    self.cached.push(id);
                    let t = choose(&mut sampler, grammar.as_mut(), &last_logits)
                        .map_err(Error::Grammar)?;
                    complete.set(finished(&mut grammar)?);
                    next = emit(&mut sampler, t, &last_logits).map_or(Ok(t), Err);
                }
            }
            if let Err(r) = next {
                stop_reason = r;
            }
        }
        if let Some(spec) = self.spec.as_mut() {
            spec.stats.add(&stats);
        }
        let text = text.finish(stop_reason == StopReason::Stop).1;
        Ok(GenerateResult {
            prompt_tokens: prompt.to_vec(),
            prompt_logprobs: prompt_lp,
            tokens,
            text,
            stop_reason,
            prompt_n,
            prompt_ms,
            gen_ms: t1.elapsed().as_secs_f64() * 1e3,
            spec: stats,
        })
    }
}

/// What the model gave `next` at a prompt position, from that position's logits.
pub(crate) fn prompt_logprob(row: &[f32], next: u32, top_k: usize) -> PromptLogprob {
    let (l, top) = logprobs(row, Some(next), top_k);
    PromptLogprob {
        id: next,
        logprob: l.unwrap_or(f32::NEG_INFINITY),
        top,
    }
}

/// Whether a sequence's grammar allows nothing more (its answer is whole).
///
/// # Errors
/// The grammar's, as [`Grammar::is_finished`].
pub(crate) fn finished(grammar: &mut Option<Grammar>) -> Result<bool> {
    grammar
        .as_mut()
        .map_or(Ok(false), |g| g.is_finished().map_err(Error::Grammar))
}

/// Samples the next token from a logit row, among the tokens a grammar allows when there is
/// one (which then advances past it; end-of-generation tokens end it).
///
/// # Errors
/// The grammar allows no token, or failed (not expected of a compiled grammar).
pub(crate) fn choose(
    sampler: &mut Sampler,
    grammar: Option<&mut Grammar>,
    row: &[f32],
) -> std::result::Result<u32, String> {
    let Some(g) = grammar else {
        return Ok(sampler.sample(row));
    };
    if !g.is_active() {
        // a lazy grammar waiting for its trigger sees every token
        let id = sampler.sample(row);
        g.accept(id)?;
        return Ok(id);
    }
    let mask = g.mask()?;
    if mask.is_zero() {
        return Err("grammar: no token can continue the output".into());
    }
    let mut id = sampler.sample_masked(row, &mask);
    if !mask.is_allowed(id) {
        // every allowed token's logit was -inf or NaN: take the first allowed one
        id = mask.first_bit_set().map_or(id, |i| i as u32);
    }
    g.accept(id)?;
    Ok(id)
}

/// Hands a chosen token out (sampler, token, the logit row it was chosen at); says why
/// generation ends, if it does.
type EmitFn<'a> = dyn FnMut(&mut Sampler, u32, &[f32]) -> Option<StopReason> + 'a;

/// Buffers of a speculative step, reused between steps.
#[derive(Default)]
struct SpecScratch {
    guess: Proposal,
    /// `[1 + drafts, n_vocab]` the target's logit rows
    rows: Vec<f32>,
}

/// Hands out a chosen token `id`: records it for the penalties, takes its logprobs (when
/// asked for) from the row it was chosen at, and feeds its text to `text`. Returns the
/// token, the text now safe to show, and `Eos` or `Stop` when the token ends generation.
pub(crate) fn emit_token(
    sampler: &mut Sampler,
    id: u32,
    logits: &[f32],
    tok: &Tokenizer,
    params: &GenerateParams,
    text: &mut TextStream,
) -> (TokenOut, String, Option<StopReason>) {
    sampler.accept(id);
    let (logprob, top) = if params.logprobs || params.top_logprobs > 0 {
        logprobs(logits, Some(id), params.top_logprobs)
    } else {
        (None, Vec::new())
    };
    let eog = tok.is_eog(id) && !params.ignore_eos;
    let bytes = tok.token_bytes(id, false);
    let (new_text, hit_stop) = text.push(bytes, eog);
    let end = if eog {
        Some(StopReason::Eos)
    } else if hit_stop {
        Some(StopReason::Stop)
    } else {
        None
    };
    let token = TokenOut {
        id,
        text: String::from_utf8_lossy(bytes).into_owned(),
        logprob,
        top,
    };
    (token, new_text, end)
}

/// Generated text as it grows: cuts it at the first stop string and holds back a tail that
/// might be the start of one, so what is streamed never has to be taken back.
pub struct TextStream {
    text: String,
    /// bytes of `text` already handed out
    emitted: usize,
    utf8: Utf8Stream,
    stop: Vec<String>,
    max_stop: usize,
}

impl TextStream {
    pub fn new(stop: &[String]) -> TextStream {
        let stop: Vec<String> = stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        TextStream {
            text: String::new(),
            emitted: 0,
            utf8: Utf8Stream::default(),
            max_stop: stop.iter().map(|s| s.len()).max().unwrap_or(0),
            stop,
        }
    }

    /// Adds a token's bytes (none for an end-of-generation token, `eog`); returns the text
    /// that is now safe to hand out and whether a stop string was hit.
    pub fn push(&mut self, bytes: &[u8], eog: bool) -> (String, bool) {
        if !eog {
            let piece = self.utf8.push(bytes);
            self.text.push_str(&piece);
        }
        let mut hit_stop = false;
        if self.max_stop > 0 {
            let from = floor_char_boundary(&self.text, self.emitted.saturating_sub(self.max_stop));
            let found = self
                .stop
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|at| from + at))
                .min();
            if let Some(at) = found {
                self.text.truncate(at);
                hit_stop = true;
            }
        }
        let safe = if hit_stop || eog {
            self.text.len()
        } else {
            self.text.len() - self.stop_prefix_len()
        };
        let new_text = if safe > self.emitted {
            self.text[self.emitted..safe].to_string()
        } else {
            String::new()
        };
        self.emitted = self.emitted.max(safe);
        (new_text, hit_stop)
    }

    /// Length of the longest tail of the text that is a proper prefix of a stop string.
    fn stop_prefix_len(&self) -> usize {
        let t = &self.text;
        let mut held = 0;
        for s in &self.stop {
            for k in (1..s.len().min(t.len() + 1)).rev() {
                if k > held
                    && t.is_char_boundary(t.len() - k)
                    && s.is_char_boundary(k)
                    && t.ends_with(&s[..k])
                {
                    held = k;
                    break;
                }
            }
        }
        held
    }

    /// Ends the text: returns what was not handed out yet (the held-back tail and any
    /// incomplete character, unless generation ended on a stop string) and the whole text.
    pub fn finish(mut self, stopped: bool) -> (String, String) {
        if !stopped {
            let rest = self.utf8.finish();
            self.text.push_str(&rest);
        }
        let tail = self.text[self.emitted.min(self.text.len())..].to_string();
        (tail, self.text)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
