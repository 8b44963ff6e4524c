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
    /// below this (`--draft-p-min`, default 0.75, llama.cpp's server default).
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
            p_min: 0.75,
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
/// [`Error::Failed`] naming both sizes and the first token that differs.
pub fn check_vocab(target: &Tokenizer, draft: &Tokenizer) -> Result<()> {
    let (nt, nd) = (target.n_vocab(), draft.n_vocab());
    let n = nt.min(nd);
    let differs = (0..n as u32).find(|&i| target.piece(i) != draft.piece(i));
    if let Some(i) = differs {
        return Err(Error::Failed(format!(
            "the draft model's vocabulary ({nd} tokens) differs from the target's ({nt} tokens) \
             at token {i}: {:?} in the target, {:?} in the draft; draft and target must share \
             a tokenizer",
            target.piece(i).unwrap_or_default(),
            draft.piece(i).unwrap_or_default()
        )));
    }
    if nt.abs_diff(nd) > 128 {
        return Err(Error::Failed(format!(
            "the draft model's vocabulary has {nd} tokens and the target's {nt}: draft and \
             target must share a tokenizer (sizes may differ by at most 128 padding tokens)"
        )));
    }
    Ok(())
}

/// A draft model's context and what its KV cache holds.
pub struct DraftModel {
    pub ctx: Context,
    /// Tokens whose K/V are in the draft's cache (sequence 0), in order.
    cached: Vec<u32>,
    batch: Batch,
    sampler: Option<Sampler>,
    /// The request settings `sampler` was made for.
    sampler_for: Option<SamplerParams>,
    /// The draft's last logit row.
    logits: Vec<f32>,
}

impl DraftModel {
    pub fn new(ctx: Context) -> DraftModel {
        DraftModel {
            ctx,
            cached: Vec::new(),
            batch: Batch::new(),
            sampler: None,
            sampler_for: None,
            logits: Vec::new(),
        }
    }

    /// Brings the draft's cache to `seq` (keeping the common start) and leaves the logits
    /// after its last token in `self.logits`.
    fn sync(&mut self, seq: &[u32]) -> Result<()> {
        let mut keep = self
            .cached
            .iter()
            .zip(seq)
            .take_while(|(a, b)| a == b)
            .count();
        // the last token is always recomputed: its logits are needed
        keep = keep.min(seq.len().saturating_sub(1));
        keep = self.ctx.kv.truncate(0, keep)?;
        self.cached.truncate(keep);
        let chunk = self.ctx.params.n_batch.max(1);
        let n_vocab = self.ctx.n_vocab();
        let mut i = keep;
        while i < seq.len() {
            let end = (i + chunk).min(seq.len());
            self.batch.clear();
            for (p, &t) in seq.iter().enumerate().take(end).skip(i) {
                self.batch.push(t, p, 0, p + 1 == seq.len());
            }
            let out = self.ctx.decode(&self.batch)?;
            if end == seq.len() {
                self.logits.clear();
                self.logits.extend_from_slice(&out[out.len() - n_vocab..]);
            }
            self.cached.extend_from_slice(&seq[i..end]);
            i = end;
        }
        Ok(())
    }

    /// Proposes up to `k` tokens after `seq`: greedy when `sampling` is greedy, otherwise
    /// drawn with the same sampler settings, recording each position's distribution in `qs`.
    /// Stops early below `p_min`, at an end-of-generation token, or at an id the target's
    /// vocabulary (`n_vocab_target`) lacks.
    #[allow(clippy::too_many_arguments)]
    fn propose(
        &mut self,
        seq: &[u32],
        k: usize,
        p: &SpecParams,
        sampling: &SamplerParams,
        is_eog: &dyn Fn(u32) -> bool,
        n_vocab_target: usize,
        out: &mut Vec<u32>,
        qs: &mut Vec<Vec<(u32, f64)>>,
    ) -> Result<()> {
        if k == 0 || seq.len() + k >= self.ctx.params.n_ctx {
            return Ok(());
        }
        self.sync(seq)?;
        let greedy = sampling.temperature <= 0.0;
        if !greedy {
            // one sampler (one random stream) per request: a new one each step would
            // replay the same draws, correlated with the rejections before them
            if self.sampler_for.as_ref() != Some(sampling) {
                self.sampler = Some(Sampler::new(SamplerParams {
                    // the draft's own draws must not repeat the target's
                    seed: sampling.seed.map(|s| s ^ 0xd1a5_7ed5_eed5_0001),
                    ..sampling.clone()
                }));
                self.sampler_for = Some(sampling.clone());
            }
            if let Some(s) = self.sampler.as_mut() {
                s.set_history(seq);
            }
        }
        for (i, pos) in (0..k).zip(seq.len()..) {
            let (tok, top) = if greedy {
                let t = argmax(&self.logits);
                (t, top_prob(&self.logits, t))
            } else {
                let s = self.sampler.as_mut().expect("set above");
                let q = s.distribution(&self.logits);
                let top = q.first().map(|x| x.1).unwrap_or(0.0);
                let t = s.draw(&q).unwrap_or(0);
                s.accept(t);
                qs.push(q);
                (t, top)
            };
            if (top as f32) < p.p_min || tok as usize >= n_vocab_target {
                // the draft is unsure (llama.cpp's --draft-p-min), or no such target token
                if !greedy {
                    qs.pop();
                }
                break;
            }
            out.push(tok);
            if is_eog(tok) || i + 1 == k {
                break;
            }
            self.batch.clear();
            self.batch.push(tok, pos, 0, true);
            let row = self.ctx.decode(&self.batch)?;
            self.logits.clear();
            self.logits.extend_from_slice(row);
            self.cached.push(tok);
        }
        Ok(())
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
    /// generation step's).
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<()> {
        if let Proposer::Draft(d) = &mut self.proposer {
            if prompt.len() < d.ctx.params.n_ctx {
                d.sync(prompt)?;
            }
        }
        Ok(())
    }

    /// Proposes up to `k` tokens to follow `seq` into `out`. A proposal shorter than
    /// `draft_min` is dropped.
    pub fn propose(
        &mut self,
        seq: &[u32],
        k: usize,
        sampling: &SamplerParams,
        tok: &Tokenizer,
        n_vocab_target: usize,
        out: &mut Proposal,
    ) -> Result<()> {
        let Proposal { tokens: out, qs } = out;
        out.clear();
        qs.clear();
        let k = k.min(self.params.draft_max);
        if k == 0 {
            return Ok(());
        }
        match &mut self.proposer {
            Proposer::Ngram => {
                ngram_propose(seq, k, self.params.ngram_max, self.params.ngram_min, out);
                out.retain(|&t| (t as usize) < n_vocab_target);
            }
            Proposer::Draft(d) => d.propose(
                seq,
                k,
                &self.params,
                sampling,
                &|t| tok.is_eog(t),
                n_vocab_target,
                out,
                qs,
            )?,
        }
        if out.len() < self.params.draft_min {
            out.clear();
            qs.clear();
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
