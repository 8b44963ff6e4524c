//! Speculative decoding: a cheap proposer guesses the next few tokens, the target model
//! checks them all in one batched forward pass (one logit row per guessed position), and
//! the guesses it agrees with are kept.
//!
//! Two proposers: a small **draft model** with its own KV cache (Leviathan et al., "Fast
//! Inference from Transformers via Speculative Decoding", 2023; llama.cpp's `-md`), and
//! **n-gram lookup** in the sequence so far (prompt lookup decoding; llama.cpp's
//! `--spec-type ngram`), which costs no second model and pays off where the answer repeats
//! the prompt (quoting, code edits, summaries).
//!
//! Acceptance is exact. A greedy request keeps a guess only where it is the target's own
//! argmax, so the tokens equal those without speculation. A sampled request uses
//! speculative sampling with rejection: a guess `x` drawn from the proposer's distribution
//! `q` is kept with probability `min(1, p(x) / q(x))`, where `p` is the target's
//! distribution after every sampler stage (penalties, top-k, top-p, min-p, temperature);
//! at the first rejection the token is drawn from `max(p - q, 0)` renormalised, and when
//! every guess is kept one more token is drawn from the target's next row. The tokens are
//! then distributed exactly as the target's own sampling (an n-gram guess is a point mass:
//! `q(x) = 1`).

use capy_model::{Batch, Context};

use crate::sampler::{argmax, Sampler, SamplerParams};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Which proposer speculative decoding uses (`--spec-type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecType {
    /// A smaller model sharing the target's vocabulary (`--draft-model`).
    Draft,
    /// Continuations of the longest recent n-gram match in the prompt and the output.
    Ngram,
}

impl SpecType {
    /// Parses `--spec-type` values: `draft` or `ngram`.
    pub fn parse(s: &str) -> Option<SpecType> {
        match s {
            "draft" => Some(SpecType::Draft),
            "ngram" | "ngram-simple" | "lookup" => Some(SpecType::Ngram),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SpecType::Draft => "draft",
            SpecType::Ngram => "ngram",
        }
    }
}

/// Speculation settings; the defaults are llama.cpp's where it has one.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecParams {
    /// Most tokens proposed per step (`--draft-max`, default 8).
    pub draft_max: usize,
    /// Fewest tokens worth verifying (`--draft-min`): a shorter proposal is dropped and the
    /// step decodes one token as usual.
    pub draft_min: usize,
    /// The draft model stops proposing when its most likely token's probability falls
    /// below this (`--draft-p-min`; default 0, llama.cpp b11312's: a floor such as 0.5 or
    /// llama.cpp's older 0.75 stops a good draft early where it is unsure yet right, which
    /// cost the SmolLM2 pair a fifth of its speed-up (bench/RESULTS.md); a weak draft may
    /// gain from one).
    pub p_min: f32,
    /// N-gram lookup: the longest and shortest suffix of the sequence searched for earlier
    /// in it (longest first; the most recent earlier match wins).
    pub ngram_max: usize,
    pub ngram_min: usize,
}

impl Default for SpecParams {
    fn default() -> Self {
        SpecParams {
            draft_max: 8,
            draft_min: 0,
            p_min: 0.0,
            ngram_max: 4,
            ngram_min: 2,
        }
    }
}

/// Counters of one request or of a whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecStats {
    /// Tokens proposed and checked by the target.
    pub drafted: u64,
    /// Proposed tokens the target kept.
    pub accepted: u64,
    /// Verification steps that carried at least one proposed token.
    pub steps: u64,
}

impl SpecStats {
    /// Kept / proposed, 0 when nothing was proposed.
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// Proposed tokens kept per verification step (the tokens a step gains over plain
    /// decoding, which makes one).
    pub fn mean_accepted(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.accepted as f64 / self.steps as f64
        }
    }

    pub fn add(&mut self, o: &SpecStats) {
        self.drafted += o.drafted;
        self.accepted += o.accepted;
        self.steps += o.steps;
    }
}

/// Checks that a draft model can propose for a target: the same tokens under the same ids.
/// llama.cpp allows vocabularies differing in size by up to 128 padding tokens; so does
/// this, and the draft never proposes an id the target lacks.
///
/// # Errors
/// [`Error::DraftMismatch`] naming both sizes and the first token that differs.
pub fn check_vocab(target: &Tokenizer, draft: &Tokenizer) -> Result<()> {
    let (nt, nd) = (target.n_vocab(), draft.n_vocab());
    let n = nt.min(nd);
    let differs = (0..n as u32).find(|&i| target.piece(i) != draft.piece(i));
    if let Some(i) = differs {
        return Err(Error::DraftMismatch(format!(
            "the draft model's vocabulary ({nd} tokens) differs from the target's ({nt} tokens) \
             at token {i}: {:?} in the target, {:?} in the draft; draft and target must share \
             a tokenizer",
            target.piece(i).unwrap_or_default(),
            draft.piece(i).unwrap_or_default()
        )));
    }
    if nt.abs_diff(nd) > 128 {
        return Err(Error::DraftMismatch(format!(
            "the draft model's vocabulary has {nd} tokens and the target's {nt}: draft and \
             target must share a tokenizer (sizes may differ by at most 128 padding tokens)"
        )));
    }
    Ok(())
}

/// One sequence's proposal request: its tokens so far (ending with the token the target
/// decodes next), how many guesses at most, and its sampler settings.
#[derive(Clone, Copy)]
pub struct ProposeReq<'a> {
    /// The sequence id (of the target's and the draft's caches alike).
    pub seq: usize,
    pub tokens: &'a [u32],
    pub k: usize,
    pub sampling: &'a SamplerParams,
}

/// One draft sequence's state.
#[derive(Default)]
struct DraftSeq {
    /// Tokens whose K/V are in the draft's cache, in order.
    cached: Vec<u32>,
    /// `[n_vocab]` the logits after `cached`'s last token.
    logits: Vec<f32>,
    /// The sampler of sampled requests (one random stream per request: a new one each step
    /// would replay the same draws, correlated with the rejections before them), and the
    /// settings it was made for.
    sampler: Option<(SamplerParams, Sampler)>,
    /// Guesses still to make this step (0: done).
    left: usize,
}

/// A draft model's context, for as many sequences as its cache has: each step brings every
/// proposing sequence's draft cache up to date in one batch, then makes its guesses one
/// position per batch for all of them together.
pub struct DraftModel {
    pub ctx: Context,
    seqs: Vec<DraftSeq>,
    batch: Batch,
}

impl DraftModel {
    pub fn new(ctx: Context) -> DraftModel {
        DraftModel {
            seqs: (0..ctx.kv.n_seq).map(|_| DraftSeq::default()).collect(),
            ctx,
            batch: Batch::new(),
        }
    }

    /// A new request starts on sequence `seq`: its draws start from its own seed (the
    /// cache is kept, for a prompt that shares its start).
    pub fn new_request(&mut self, seq: usize) {
        if let Some(d) = self.seqs.get_mut(seq) {
            d.sampler = None;
        }
    }

    /// Forgets what sequence `seq` holds (its request ended).
    pub fn clear(&mut self, seq: usize) {
        if let Some(d) = self.seqs.get_mut(seq) {
            if !d.cached.is_empty() {
                d.cached.clear();
                let _ = self.ctx.kv.clear(seq);
            }
            d.sampler = None;
        }
    }

    /// Whether sequence `seq` holds anything.
    pub fn holds(&self, seq: usize) -> bool {
        self.seqs.get(seq).is_some_and(|d| !d.cached.is_empty())
    }

    /// Brings each request's draft cache to its tokens (keeping the common start; the last
    /// token is always run, its logits are needed), in batches of at most `n_batch` tokens
    /// for all of them together.
    fn sync(&mut self, reqs: &[ProposeReq<'_>]) -> Result<()> {
        let n_vocab = self.ctx.n_vocab();
        let mut todo: Vec<(usize, usize)> = Vec::new(); // (request, next position to run)
        for (ri, r) in reqs.iter().enumerate() {
            let d = &mut self.seqs[r.seq];
            let common = d
                .cached
                .iter()
                .zip(r.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            let keep = self
                .ctx
                .kv
                .truncate(r.seq, common.min(r.tokens.len().saturating_sub(1)))?;
            d.cached.truncate(keep);
            todo.push((ri, keep));
        }
        let n_batch = self.ctx.params.n_batch.max(1);
        let n_out = self.ctx.params.n_outputs.max(1);
        while todo.iter().any(|&(ri, next)| next < reqs[ri].tokens.len()) {
            self.batch.clear();
            let mut outs = Vec::new();
            for (ri, next) in todo.iter_mut() {
                let r = &reqs[*ri];
                let room = n_batch - self.batch.len();
                if room == 0 || outs.len() == n_out {
                    break;
                }
                let end = (*next + room).min(r.tokens.len());
                for p in *next..end {
                    let last = p + 1 == r.tokens.len();
                    self.batch.push(r.tokens[p], p, r.seq, last);
                    if last {
                        outs.push(r.seq);
                    }
                }
                self.seqs[r.seq]
                    .cached
                    .extend_from_slice(&r.tokens[*next..end]);
                *next = end;
            }
            let logits = self.ctx.decode(&self.batch)?;
            for (row, seq) in logits.chunks_exact(n_vocab).zip(outs) {
                let d = &mut self.seqs[seq];
                d.logits.clear();
                d.logits.extend_from_slice(row);
            }
        }
        Ok(())
    }

    /// Proposes up to each request's `k` tokens after its tokens into `out` (one entry per
    /// request): greedy for greedy requests, otherwise drawn with the request's sampler
    /// settings, recording each position's distribution. A sequence stops early below
    /// `p_min`, at an end-of-generation token, or at an id the target's vocabulary
    /// (`n_vocab_target`) lacks.
    fn propose(
        &mut self,
        reqs: &[ProposeReq<'_>],
        p: &SpecParams,
        is_eog: &dyn Fn(u32) -> bool,
        n_vocab_target: usize,
        out: &mut [Proposal],
    ) -> Result<()> {
        let n_ctx = self.ctx.params.n_ctx;
        let n_seqs = self.seqs.len();
        let ok = |r: &ProposeReq<'_>| r.k > 0 && r.tokens.len() + r.k < n_ctx && r.seq < n_seqs;
        let live: Vec<ProposeReq<'_>> = reqs.iter().filter(|r| ok(r)).copied().collect();
        self.sync(&live)?;
        for r in &live {
            let d = &mut self.seqs[r.seq];
            d.left = r.k;
            // greedy requests too: their guesses must see the same penalties
            if d.sampler.as_ref().map(|s| &s.0) != Some(r.sampling) {
                let sp = SamplerParams {
                    // the draft's own draws must not repeat the target's
                    seed: r.sampling.seed.map(|s| s ^ 0xd1a5_7ed5_eed5_0001),
                    ..r.sampling.clone()
                };
                d.sampler = Some((r.sampling.clone(), Sampler::new(sp)));
            }
            if let Some((_, s)) = d.sampler.as_mut() {
                s.set_history(r.tokens);
            }
        }
        let n_vocab = self.ctx.n_vocab();
        loop {
            self.batch.clear();
            for (r, prop) in reqs.iter().zip(out.iter_mut()) {
                if !ok(r) {
                    continue;
                }
                let d = &mut self.seqs[r.seq];
                if d.left == 0 {
                    continue;
                }
                let (tok, top) = match d.sampler.as_mut() {
                    Some((_, s)) if !s.is_greedy() => {
                        let q = s.distribution(&d.logits);
                        let top = q.first().map(|x| x.1).unwrap_or(0.0);
                        let t = s.draw(&q).unwrap_or(0);
                        s.accept(t);
                        prop.qs.push(q);
                        (t, top)
                    }
                    // greedy: the argmax after the request's penalties
                    Some((_, s)) => {
                        let t = s.distribution(&d.logits).first().map_or(0, |x| x.0);
                        s.accept(t);
                        (t, top_prob(&d.logits, t))
                    }
                    None => {
                        let t = argmax(&d.logits);
                        (t, top_prob(&d.logits, t))
                    }
                };
                if (top as f32) < p.p_min || tok as usize >= n_vocab_target {
                    // the draft is unsure (llama.cpp's --draft-p-min), or no such target token
                    prop.qs.truncate(prop.tokens.len());
                    d.left = 0;
                    continue;
                }
                prop.tokens.push(tok);
                d.left -= 1;
                if is_eog(tok) || d.left == 0 {
                    d.left = 0;
                    continue;
                }
                self.batch.push(tok, d.cached.len(), r.seq, true);
                d.cached.push(tok);
            }
            if self.batch.is_empty() {
                return Ok(());
            }
            let logits = self.ctx.decode(&self.batch)?;
            for (row, &seq) in logits.chunks_exact(n_vocab).zip(&self.batch.seq) {
                let d = &mut self.seqs[seq];
                d.logits.clear();
                d.logits.extend_from_slice(row);
            }
        }
    }
}

/// The softmax probability of `tok` at temperature 1.
fn top_prob(logits: &[f32], tok: u32) -> f64 {
    let max = logits[tok as usize];
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    1.0 / sum
}

/// Proposes the tokens that followed the most recent earlier occurrence of the sequence's
/// last `n` tokens, trying `n` from `n_max` down to `n_min`; at most `k` tokens.
pub fn ngram_propose(seq: &[u32], k: usize, n_max: usize, n_min: usize, out: &mut Vec<u32>) {
    let len = seq.len();
    for n in (n_min.max(1)..=n_max).rev() {
        if n >= len {
            continue;
        }
        let pat = &seq[len - n..];
        // latest start s < len - n where seq[s..s + n] == pat
        if let Some(s) = (0..len - n).rev().find(|&s| &seq[s..s + n] == pat) {
            let from = s + n;
            let take = k.min(len - from);
            out.extend_from_slice(&seq[from..from + take]);
            return;
        }
    }
}

/// A step's guesses: the tokens, and for a sampled draft the distribution each was drawn
/// from (empty: point masses, as n-gram guesses are).
#[derive(Clone, Debug, Default)]
pub struct Proposal {
    pub tokens: Vec<u32>,
    pub qs: Vec<Vec<(u32, f64)>>,
}

/// What speculative decoding proposes with.
pub enum Proposer {
    Draft(Box<DraftModel>),
    Ngram,
}

/// A proposer with its settings and running counters, attached to a [`crate::Session`].
pub struct Speculator {
    pub params: SpecParams,
    pub proposer: Proposer,
    /// Counters since the speculator was made.
    pub stats: SpecStats,
}

impl Speculator {
    pub fn new(params: SpecParams, proposer: Proposer) -> Speculator {
        Speculator {
            params,
            proposer,
            stats: SpecStats::default(),
        }
    }

    pub fn spec_type(&self) -> SpecType {
        match self.proposer {
            Proposer::Draft(_) => SpecType::Draft,
            Proposer::Ngram => SpecType::Ngram,
        }
    }

    /// Runs the prompt through the draft model (part of the prompt's time, not of the first
    /// generation step's), for sequence `seq`.
    pub fn prefill(&mut self, seq: usize, prompt: &[u32]) -> Result<()> {
        if let Proposer::Draft(d) = &mut self.proposer {
            if prompt.len() < d.ctx.params.n_ctx {
                let sampling = SamplerParams::greedy();
                d.sync(&[ProposeReq {
                    seq,
                    tokens: prompt,
                    k: 0,
                    sampling: &sampling,
                }])?;
            }
        }
        Ok(())
    }

    /// A new request starts on sequence `seq`: the draft's random draws restart from the
    /// request's seed, so a seeded request gives the same tokens every time.
    pub fn new_request(&mut self, seq: usize) {
        if let Proposer::Draft(d) = &mut self.proposer {
            d.new_request(seq);
        }
    }

    /// Forgets sequence `seq`'s draft state (its request ended).
    pub fn clear(&mut self, seq: usize) {
        if let Proposer::Draft(d) = &mut self.proposer {
            d.clear(seq);
        }
    }

    /// Whether sequence `seq` has draft state to clear.
    pub fn holds(&self, seq: usize) -> bool {
        matches!(&self.proposer, Proposer::Draft(d) if d.holds(seq))
    }

    /// Proposes guesses for each request into `out` (one entry per request, cleared
    /// first): at most `min(k, draft_max)` tokens each; a proposal shorter than
    /// `draft_min` is dropped.
    pub fn propose(
        &mut self,
        reqs: &[ProposeReq<'_>],
        tok: &Tokenizer,
        n_vocab_target: usize,
        out: &mut [Proposal],
    ) -> Result<()> {
        let p = &self.params;
        for o in out.iter_mut() {
            o.tokens.clear();
            o.qs.clear();
        }
        let reqs: Vec<ProposeReq<'_>> = reqs
            .iter()
            .map(|r| ProposeReq {
                seq: r.seq,
                tokens: r.tokens,
                k: r.k.min(p.draft_max),
                sampling: r.sampling,
            })
            .collect();
        match &mut self.proposer {
            Proposer::Ngram => {
                for (r, o) in reqs.iter().zip(out.iter_mut()) {
                    ngram_propose(r.tokens, r.k, p.ngram_max, p.ngram_min, &mut o.tokens);
                    o.tokens.retain(|&t| (t as usize) < n_vocab_target);
                }
            }
            Proposer::Draft(d) => d.propose(&reqs, p, &|t| tok.is_eog(t), n_vocab_target, out)?,
        }
        for o in out.iter_mut() {
            if o.tokens.len() < p.draft_min {
                o.tokens.clear();
                o.qs.clear();
            }
        }
        Ok(())
    }
}

/// Judges one proposed token against the target's logits at its position: `Ok(x)` keeps
/// it, `Err(t)` rejects it and gives the token to take instead. `q` is the distribution `x`
/// was drawn from (`None`: a deterministic guess, `q(x) = 1`). Greedy samplers keep `x`
/// only where it is the argmax, so the output equals plain greedy decoding.
pub fn judge(
    sampler: &mut Sampler,
    logits: &[f32],
    x: u32,
    q: Option<&[(u32, f64)]>,
) -> std::result::Result<u32, u32> {
    let p = sampler.distribution(logits);
    if sampler.is_greedy() {
        let best = p.first().map(|e| e.0).unwrap_or(0);
        return if best == x { Ok(x) } else { Err(best) };
    }
    let px = p.iter().find(|e| e.0 == x).map(|e| e.1).unwrap_or(0.0);
    let qx = match q {
        Some(q) => q.iter().find(|e| e.0 == x).map(|e| e.1).unwrap_or(0.0),
        None => 1.0,
    };
    if px > 0.0 && (qx <= 0.0 || sampler.uniform() < px / qx) {
        return Ok(x);
    }
    // the residual max(p - q, 0), renormalised
    let mut resid: Vec<(u32, f64)> = p
        .iter()
        .map(|&(t, pt)| {
            let qt = match q {
                Some(q) => q.iter().find(|e| e.0 == t).map(|e| e.1).unwrap_or(0.0),
                None => f64::from(u8::from(t == x)),
            };
            (t, (pt - qt).max(0.0))
        })
        .filter(|e| e.1 > 0.0)
        .collect();
    let sum: f64 = resid.iter().map(|e| e.1).sum();
    if sum <= 0.0 {
        // p <= q everywhere yet x was rejected: only rounding gets here; draw from p
        return Err(sampler.draw(&p).unwrap_or(x));
    }
    for e in resid.iter_mut() {
        e.1 /= sum;
    }
    Err(sampler.draw(&resid).unwrap_or(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_takes_the_longest_most_recent_match() {
        let seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3];
        let mut out = Vec::new();
        // "2 3" last occurred at index 5..7, followed by 7 8 5 ...
        ngram_propose(&seq, 3, 4, 2, &mut out);
        assert_eq!(out, [7, 8, 5]);
        out.clear();
        // "5 2 3" has no earlier match; "2 3" does
        ngram_propose(&seq, 8, 3, 3, &mut out);
        assert!(out.is_empty());
        out.clear();
        ngram_propose(&[4, 4], 5, 4, 1, &mut out);
        assert_eq!(out, [4]);
    }

    /// The empirical frequencies of `judge`'s outcomes equal p, with q far from p.
    #[test]
    fn rejection_keeps_the_target_distribution() {
        let logits = [1.0f32, 0.5, -0.5, 2.0, 0.0];
        let params = SamplerParams {
            temperature: 0.9,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(7),
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        let p = s.distribution(&logits);
        // a bad proposal distribution: mostly the target's least likely token
        let q: Vec<(u32, f64)> = vec![(2, 0.7), (0, 0.1), (1, 0.1), (3, 0.05), (4, 0.05)];
        let mut counts = [0u32; 5];
        let n = 200_000;
        for _ in 0..n {
            let x = s.draw(&q).unwrap();
            let t = match judge(&mut s, &logits, x, Some(&q)) {
                Ok(t) | Err(t) => t,
            };
            counts[t as usize] += 1;
        }
        for &(t, pt) in &p {
            let f = counts[t as usize] as f64 / n as f64;
            assert!((f - pt).abs() < 0.005, "token {t}: {f} vs {pt}");
        }
        // a point-mass guess (n-gram) too
        let mut counts = [0u32; 5];
        for _ in 0..n {
            let t = match judge(&mut s, &logits, 2, None) {
                Ok(t) | Err(t) => t,
            };
            counts[t as usize] += 1;
        }
        for &(t, pt) in &p {
            let f = counts[t as usize] as f64 / n as f64;
            assert!((f - pt).abs() < 0.005, "token {t}: {f} vs {pt}");
        }
    }

    #[test]
    fn greedy_keeps_only_the_argmax() {
        let mut s = Sampler::new(SamplerParams::greedy());
        let logits = [0.1f32, 3.0, 2.9];
        assert_eq!(judge(&mut s, &logits, 1, None), Ok(1));
        assert_eq!(judge(&mut s, &logits, 2, None), Err(1));
    }
}
