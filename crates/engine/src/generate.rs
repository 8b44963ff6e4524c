//! Generation for one sequence: prompt prefill (reusing the cached prefix), token-by-token
//! decoding with sampling, logprobs, stop tokens and stop strings, streamed by callback.

use std::sync::Arc;
use std::time::Instant;

use capy_model::{Batch, Context};

use crate::sampler::{logprobs, Sampler, SamplerParams};
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
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
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
}

/// One sequence in its own context; remembers what the KV cache holds so a follow-up
/// prompt that extends the previous one (a chat) only computes the new tokens.
pub struct Session {
    pub ctx: Context,
    pub tokenizer: Arc<Tokenizer>,
    /// Tokens whose K/V are in the cache, in order.
    cached: Vec<u32>,
    batch: Batch,
}

impl Session {
    pub fn new(ctx: Context, tokenizer: Arc<Tokenizer>) -> Session {
        Session {
            ctx,
            tokenizer,
            cached: Vec::new(),
            batch: Batch::new(),
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.ctx.params.n_ctx
    }

    /// Forgets the cache.
    pub fn reset(&mut self) {
        self.cached.clear();
        let _ = self.ctx.kv.clear(0);
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
        let prompt_n = prompt.len() - keep;
        let prompt_ms = t0.elapsed().as_secs_f64() * 1e3;

        let t1 = Instant::now();
        let mut sampler = Sampler::new(params.sampler.clone());
        for &t in prompt {
            sampler.accept(t);
        }
        let mut tokens = Vec::new();
        let mut text = TextStream::new(&params.stop);
        let mut stop_reason = StopReason::Length;
        while tokens.len() < params.max_tokens {
            let (tok, new_text, end) = sample_next(
                &mut sampler,
                &last_logits,
                &self.tokenizer,
                params,
                &mut text,
            );
            let id = tok.id;
            tokens.push(tok);
            let go_on = on_token(tokens.last().expect("just pushed"), &new_text);
            if let Some(r) = end {
                stop_reason = r;
                break;
            }
            if !go_on {
                stop_reason = StopReason::Cancelled;
                break;
            }
            if tokens.len() >= params.max_tokens {
                break;
            }
            let pos = self.cached.len();
            // prompt + answer fill the context: the token just sampled was the last place
            if pos + 1 >= n_ctx {
                stop_reason = StopReason::Context;
                break;
            }
            self.batch.clear();
            self.batch.push(id, pos, 0, true);
            let logits = self.ctx.decode(&self.batch)?;
            last_logits.clear();
            last_logits.extend_from_slice(logits);
            self.cached.push(id);
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

/// Samples the next token from `logits` (recording it for the penalties), with its
/// logprobs when asked for, and feeds its text to `text`. Returns the token, the text now
/// safe to show, and `Eos` or `Stop` when the token ends generation.
pub(crate) fn sample_next(
    sampler: &mut Sampler,
    logits: &[f32],
    tok: &Tokenizer,
    params: &GenerateParams,
    text: &mut TextStream,
) -> (TokenOut, String, Option<StopReason>) {
    let id = sampler.sample(logits);
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
