//! Token sampling: penalties, top-k, top-p, min-p, temperature, seeded draws; greedy when the
//! temperature is zero. Stages run in llama.cpp's default order.

/// Sampling settings; the defaults are llama.cpp's.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerParams {
    /// <= 0 means greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off; divides positive logits (multiplies negative ones) of recent tokens.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at; `usize::MAX` = the whole context.
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `None`: seeded from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplerParams {
    fn default() -> Self {
        SamplerParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplerParams {
    /// `top_k` as requests give it: 0 and -1 (vLLM's "off") both turn it off.
    pub fn top_k_from(k: i64) -> usize {
        usize::try_from(k).unwrap_or(0)
    }

    /// `repeat_last_n` as requests give it: -1 is the whole context (Ollama's meaning).
    pub fn last_n_from(n: i64) -> usize {
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    pub fn greedy() -> SamplerParams {
        SamplerParams {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

/// splitmix64 -> xoshiro-style generator; small, seedable, good enough for sampling.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    pub params: SamplerParams,
    rng: Rng,
    history: Vec<u32>,
    /// (token, logit) candidates, reused between calls
    cand: Vec<(u32, f32)>,
    /// logits with penalties applied, reused between calls
    penalized: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplerParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        });
        Sampler {
            params,
            rng: Rng::new(seed),
            history: Vec::new(),
            cand: Vec::new(),
            penalized: Vec::new(),
        }
    }

    /// Records a token (prompt or generated) for the penalties.
    pub fn accept(&mut self, token: u32) {
        self.history.push(token);
    }

    fn has_penalties(&self) -> bool {
        let p = &self.params;
        p.repeat_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
    }

    /// The logits with the repetition, presence and frequency penalties applied to the
    /// tokens of the recent history, in `self.penalized`.
    fn apply_penalties(&mut self, logits: &[f32]) {
        let p = &self.params;
        let start = self.history.len().saturating_sub(p.repeat_last_n);
        let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for &t in &self.history[start..] {
            *counts.entry(t).or_insert(0) += 1;
        }
        self.penalized.clear();
        self.penalized.extend_from_slice(logits);
        for (&t, &c) in &counts {
            if let Some(l) = self.penalized.get_mut(t as usize) {
                if *l > 0.0 {
                    *l /= p.repeat_penalty;
                } else {
                    *l *= p.repeat_penalty;
                }
                *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }

    /// Picks the next token from raw logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if !self.has_penalties() {
            return self.sample_from(logits);
        }
        self.apply_penalties(logits);
        let penalized = std::mem::take(&mut self.penalized);
        let id = self.sample_from(&penalized);
        self.penalized = penalized;
        id
    }

    fn sample_from(&mut self, logits: &[f32]) -> u32 {
        let p = self.params.clone();
        if p.temperature <= 0.0 {
            // the first of equal maxima, as a stable argmax
            return logits
                .iter()
                .enumerate()
                .fold((0u32, f32::NEG_INFINITY), |best, (t, &l)| {
                    if l > best.1 {
                        (t as u32, l)
                    } else {
                        best
                    }
                })
                .0;
        }
        self.cand.clear();
        if p.top_k > 0 && p.top_k < logits.len() {
            top_k_into(logits, p.top_k, &mut self.cand);
        } else {
            self.cand
                .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        }
        // sort by logit, descending
        self.cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        // probabilities at temperature 1 for top-p / min-p, as llama.cpp does
        let probs = softmax_of(&self.cand, 1.0);
        let mut keep = self.cand.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p as f64 {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        if p.min_p > 0.0 && !probs.is_empty() {
            let floor = probs[0] * p.min_p as f64;
            let n = probs.iter().take_while(|&&pr| pr >= floor).count().max(1);
            keep = keep.min(n);
        }
        self.cand.truncate(keep.max(1));
        let probs = softmax_of(&self.cand, p.temperature);
        let r = self.rng.uniform();
        let mut cum = 0.0;
        for (i, pr) in probs.iter().enumerate() {
            cum += pr;
            if r < cum {
                return self.cand[i].0;
            }
        }
        self.cand.last().map(|c| c.0).unwrap_or(0)
    }
}

/// The `k` largest logits as (token, logit), in no order: one pass that keeps at most
/// `2k` candidates, pruning to `k` (and raising the bar to the k-th largest) when full, so
/// most of the vocabulary costs one comparison.
fn top_k_into(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    out.clear();
    let mut bar = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > bar || out.len() < k {
            out.push((i as u32, l));
            if out.len() == 2 * k {
                out.select_nth_unstable_by(k - 1, desc);
                out.truncate(k);
                bar = out[k - 1].1; // the smallest kept
            }
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, desc);
        out.truncate(k);
    }
}

fn softmax_of(cand: &[(u32, f32)], temp: f32) -> Vec<f64> {
    let max = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
    let mut p: Vec<f64> = cand
        .iter()
        .map(|c| (((c.1 - max) / temp) as f64).exp())
        .collect();
    let sum: f64 = p.iter().sum();
    for v in p.iter_mut() {
        *v /= sum;
    }
    p
}

/// Log-softmax over the whole vocabulary: the log-probability of `token` and the `k` most
/// likely tokens with theirs, best first.
pub fn logprobs(logits: &[f32], token: Option<u32>, k: usize) -> (Option<f32>, Vec<(u32, f32)>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |v: f32| (v as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &v) in logits.iter().enumerate() {
            if top.len() < k || v > top[top.len() - 1].1 {
                let at = top.partition_point(|&(_, x)| x >= v);
                top.insert(at, (i as u32, v));
                top.truncate(k);
            }
        }
    }
    let top = top.into_iter().map(|(i, v)| (i, lp(v))).collect();
    (
        token.and_then(|t| logits.get(t as usize)).map(|&v| lp(v)),
        top,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.0, 2.9]
    }

    /// `repeat_last_n: -1` turned the penalty off (it was clamped to 0); Ollama means the
    /// whole context by it.
    #[test]
    fn repeat_last_n_minus_one_penalizes_the_whole_history() {
        let run = |last_n: i64| {
            let mut s = Sampler::new(SamplerParams {
                repeat_penalty: 2.0,
                repeat_last_n: SamplerParams::last_n_from(last_n),
                ..SamplerParams::greedy()
            });
            // token 1 (the argmax) was seen 100 tokens ago only
            s.accept(1);
            for _ in 0..100 {
                s.accept(3);
            }
            s.sample(&logits())
        };
        assert_eq!(run(64), 1, "out of the window: not penalized");
        assert_eq!(run(0), 1, "0 = off");
        assert_eq!(run(-1), 5, "-1 = everything: 3.0 / 2 falls below 2.9");
        assert_eq!(SamplerParams::top_k_from(-1), 0);
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplerParams::greedy());
        assert_eq!(s.sample(&logits()), 1);
    }

    #[test]
    fn same_seed_same_draws_and_top_k_limits() {
        let p = SamplerParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(42),
            ..Default::default()
        };
        let mut a = Sampler::new(p.clone());
        let mut b = Sampler::new(p);
        let da: Vec<u32> = (0..50).map(|_| a.sample(&logits())).collect();
        let db: Vec<u32> = (0..50).map(|_| b.sample(&logits())).collect();
        assert_eq!(da, db);
        assert!(da.iter().all(|&t| t == 1 || t == 5));
        assert!(da.contains(&1) && da.contains(&5));
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let p = SamplerParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        for _ in 0..100 {
            assert!([1, 2, 5].contains(&s.sample(&logits())));
        }
        let p = SamplerParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.3,
            min_p: 0.0,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        for _ in 0..100 {
            assert_eq!(s.sample(&logits()), 1);
        }
    }

    #[test]
    fn repetition_penalty_steers_away() {
        let p = SamplerParams {
            repeat_penalty: 10.0,
            ..SamplerParams::greedy()
        };
        let mut s = Sampler::new(p);
        s.accept(1);
        s.accept(5);
        assert_eq!(s.sample(&logits()), 2);
        let p = SamplerParams {
            presence_penalty: 1.0,
            frequency_penalty: 0.0,
            ..SamplerParams::greedy()
        };
        let mut s = Sampler::new(p);
        s.accept(1);
        assert_eq!(s.sample(&logits()), 5);
    }

    #[test]
    fn top_k_scan_keeps_the_k_largest() {
        let mut rng = Rng::new(7);
        for n in [1usize, 5, 40, 41, 100, 5000] {
            let logits: Vec<f32> = (0..n)
                .map(|_| (rng.uniform() * 20.0 - 10.0) as f32)
                .collect();
            for k in [1usize, 2, 40, 64] {
                if k >= n {
                    continue;
                }
                let mut got = Vec::new();
                top_k_into(&logits, k, &mut got);
                got.sort_by(|a, b| b.1.total_cmp(&a.1));
                let mut all: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, l))
                    .collect();
                all.sort_by(|a, b| b.1.total_cmp(&a.1));
                all.truncate(k);
                assert_eq!(got, all, "n={n} k={k}");
            }
        }
    }

    #[test]
    fn logprobs_normalize() {
        let (lp, top) = logprobs(&logits(), Some(3), 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 5, 2]);
        let sum: f32 = (0..6)
            .map(|t| logprobs(&logits(), Some(t), 0).0.unwrap().exp())
            .sum();
        assert!((sum - 1.0).abs() < 1e-5);
        assert!(lp.unwrap() < top[2].1);
        assert!(logprobs(&logits(), None, 0).0.is_none());
    }
}
