//! Token sampling: penalties, top-k, top-p, min-p, temperature, seeded draws; greedy when the
//! temperature is zero. Stages run in llama.cpp's default order.

use llguidance::toktrie::SimpleVob;

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

/// Sampling settings some of which are given: a model's recommendations (its GGUF's
/// `general.sampling.*` keys, a built-in model's card), a config file's, a command line's or
/// a request's. Layers are merged with [`SamplingOptions::or`] and applied over llama.cpp's
/// defaults with [`SamplingOptions::params`]. Values are as requests give them (`top_k` and
/// `repeat_last_n` may be -1) and are expected to be in [`crate::params`]' ranges.
///
/// Deserializes from a request's fields (the same names in OpenAI requests and Ollama's
/// `options`); `seed` takes any 64-bit integer, negative ones wrapping.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct SamplingOptions {
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    #[serde(default, deserialize_with = "any_u64")]
    pub seed: Option<u64>,
}

/// An optional 64-bit integer, signed or not (negative values wrap).
fn any_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Int {
        U(u64),
        I(i64),
    }
    Ok(
        <Option<Int> as serde::Deserialize>::deserialize(d)?.map(|i| match i {
            Int::U(u) => u,
            Int::I(i) => i as u64,
        }),
    )
}

impl SamplingOptions {
    /// The GGUF's `general.sampling.*` keys (llama.cpp's names: `temp`, `top_k`, `top_p`,
    /// `min_p`, `penalty_repeat`, `penalty_last_n`); values outside capy's ranges are
    /// ignored.
    pub fn from_gguf(g: &capy_gguf::Gguf) -> SamplingOptions {
        use crate::params as p;
        let num = |key: &str, param: &p::Param| -> Option<f64> {
            let v = g
                .metadata()
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)?;
            let x = match v {
                capy_gguf::Value::F32(x) => f64::from(*x),
                capy_gguf::Value::F64(x) => *x,
                other => other.as_i64()? as f64,
            };
            param.check(x).ok().map(|()| x)
        };
        SamplingOptions {
            temperature: num("general.sampling.temp", &p::TEMPERATURE).map(|x| x as f32),
            top_k: num("general.sampling.top_k", &p::TOP_K).map(|x| x as i64),
            top_p: num("general.sampling.top_p", &p::TOP_P).map(|x| x as f32),
            min_p: num("general.sampling.min_p", &p::MIN_P).map(|x| x as f32),
            repeat_penalty: num("general.sampling.penalty_repeat", &p::REPEAT_PENALTY)
                .map(|x| x as f32),
            repeat_last_n: num("general.sampling.penalty_last_n", &p::REPEAT_LAST_N)
                .map(|x| x as i64),
            ..Default::default()
        }
    }

    /// Settings by request field name, such as a built-in model's `[("temperature", 0.2)]`.
    ///
    /// # Errors
    /// An unknown name or a value outside its range.
    pub fn from_pairs(pairs: &[(&str, f64)]) -> Result<SamplingOptions, String> {
        let mut o = SamplingOptions::default();
        for &(name, v) in pairs {
            o.set(name, v)?;
        }
        Ok(o)
    }

    /// Sets one setting by its request field name (Ollama's `/set parameter` too; `temp`
    /// is taken for `temperature`).
    ///
    /// # Errors
    /// An unknown name or a value outside its range.
    pub fn set(&mut self, name: &str, v: f64) -> Result<(), String> {
        use crate::params as p;
        let name = if name == "temp" { "temperature" } else { name };
        let param = p::SAMPLING
            .iter()
            .find(|q| q.name == name)
            .ok_or_else(|| format!("unknown sampling parameter {name:?}"))?;
        param.check(v)?;
        match name {
            "temperature" => self.temperature = Some(v as f32),
            "top_k" => self.top_k = Some(v as i64),
            "top_p" => self.top_p = Some(v as f32),
            "min_p" => self.min_p = Some(v as f32),
            "repeat_penalty" => self.repeat_penalty = Some(v as f32),
            "repeat_last_n" => self.repeat_last_n = Some(v as i64),
            "presence_penalty" => self.presence_penalty = Some(v as f32),
            "frequency_penalty" => self.frequency_penalty = Some(v as f32),
            _ => self.seed = Some(if v < 0.0 { v as i64 as u64 } else { v as u64 }),
        }
        Ok(())
    }

    /// The settings given, by request field name, in [`crate::params::SAMPLING`]'s order
    /// (as Ollama's `/api/show` lists `parameters`).
    pub fn given(&self) -> Vec<(&'static str, String)> {
        let f = |v: Option<f32>| v.map(|x| x.to_string());
        let i = |v: Option<i64>| v.map(|x| x.to_string());
        [
            ("temperature", f(self.temperature)),
            ("top_k", i(self.top_k)),
            ("top_p", f(self.top_p)),
            ("min_p", f(self.min_p)),
            ("repeat_penalty", f(self.repeat_penalty)),
            ("repeat_last_n", i(self.repeat_last_n)),
            ("presence_penalty", f(self.presence_penalty)),
            ("frequency_penalty", f(self.frequency_penalty)),
            // as given: -1, not its 64-bit wrap
            ("seed", self.seed.map(|s| (s as i64).to_string())),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
    }

    /// Sets one setting from text (`/set parameter`, a config value): a number in its range,
    /// `seed` any 64-bit integer, read exactly (not through a float).
    ///
    /// # Errors
    /// Not a number, an unknown name or a value outside its range.
    pub fn set_text(&mut self, name: &str, text: &str) -> Result<(), String> {
        let t = text.trim();
        if name == "seed" {
            let seed = t
                .parse::<u64>()
                .or_else(|_| t.parse::<i64>().map(|i| i as u64))
                .map_err(|_| format!("seed must be a 64-bit integer, got {t:?}"))?;
            self.seed = Some(seed);
            return Ok(());
        }
        let v = t
            .parse::<f64>()
            .map_err(|_| format!("{name} must be a number, got {t:?}"))?;
        self.set(name, v)
    }

    /// These settings, with `base`'s where these have none.
    pub fn or(&self, base: &SamplingOptions) -> SamplingOptions {
        SamplingOptions {
            temperature: self.temperature.or(base.temperature),
            top_k: self.top_k.or(base.top_k),
            top_p: self.top_p.or(base.top_p),
            min_p: self.min_p.or(base.min_p),
            repeat_penalty: self.repeat_penalty.or(base.repeat_penalty),
            repeat_last_n: self.repeat_last_n.or(base.repeat_last_n),
            presence_penalty: self.presence_penalty.or(base.presence_penalty),
            frequency_penalty: self.frequency_penalty.or(base.frequency_penalty),
            seed: self.seed.or(base.seed),
        }
    }

    /// The sampler's settings: these, then llama.cpp's defaults for the rest.
    pub fn params(&self) -> SamplerParams {
        let d = SamplerParams::default();
        SamplerParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.map_or(d.top_k, SamplerParams::top_k_from),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: self
                .repeat_last_n
                .map_or(d.repeat_last_n, SamplerParams::last_n_from),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            // -1 asks for a random seed, as in llama.cpp and Ollama
            seed: self.seed.filter(|&s| s != u64::MAX),
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
    /// logits with a grammar's mask applied, reused between calls
    masked: Vec<f32>,
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
            masked: Vec::new(),
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

    /// Runs `f` on the logits with the penalties applied (the raw logits when there are
    /// none), without allocating.
    fn penalized<R>(&mut self, logits: &[f32], f: impl FnOnce(&mut Self, &[f32]) -> R) -> R {
        if !self.has_penalties() {
            return f(self, logits);
        }
        self.apply_penalties(logits);
        let penalized = std::mem::take(&mut self.penalized);
        let out = f(self, &penalized);
        self.penalized = penalized;
        out
    }

    /// Picks the next token from raw logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.penalized(logits, |s, l| s.sample_from(l))
    }

    /// Picks the next token from raw logits among the tokens `mask` allows (a grammar's,
    /// [`crate::grammar::Grammar::mask`]); the others count as `-inf`. With no allowed
    /// token at all, token 0 (callers check the mask first).
    ///
    /// A mask that allows few tokens (a quarter of the vocabulary or less) is sampled from
    /// its tokens alone, without a pass over the whole row; a wider one from a copy of the
    /// row with the others set to `-inf`. Both draw what [`Sampler::sample`] would draw
    /// from the masked row (tokens with equal logits aside: either may come first).
    pub fn sample_masked(&mut self, logits: &[f32], mask: &SimpleVob) -> u32 {
        self.penalized(logits, |s, l| s.sample_masked_from(l, mask))
    }

    fn sample_masked_from(&mut self, logits: &[f32], mask: &SimpleVob) -> u32 {
        if mask.num_set() * 4 <= logits.len() {
            self.cand.clear();
            let cand = &mut self.cand;
            mask.iter_set_entries(|i| {
                if let Some(&l) = logits.get(i) {
                    cand.push((i as u32, l));
                }
            });
            if self.params.temperature <= 0.0 {
                // the first of equal maxima, as argmax
                let mut best = (0, f32::NEG_INFINITY);
                for &(t, l) in self.cand.iter() {
                    if l > best.1 {
                        best = (t, l);
                    }
                }
                best.0
            } else {
                let k = self.params.top_k;
                if k > 0 && k < self.cand.len() {
                    self.cand
                        .select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
                    self.cand.truncate(k);
                }
                let probs = self.cut_candidates();
                self.draw_candidate(&probs)
            }
        } else {
            let mut masked = std::mem::take(&mut self.masked);
            masked.clear();
            masked.extend_from_slice(logits);
            crate::grammar::apply_mask(mask, &mut masked);
            let id = self.sample_from(&masked);
            self.masked = masked;
            id
        }
    }

    fn sample_from(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let probs = self.candidates(logits);
        self.draw_candidate(&probs)
    }

    /// Draws one of `self.cand` by its probability in `probs`.
    fn draw_candidate(&mut self, probs: &[f64]) -> u32 {
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

    /// Fills `self.cand` with the tokens that survive top-k, top-p and min-p (best first)
    /// and returns their probabilities at the sampler's temperature.
    fn candidates(&mut self, logits: &[f32]) -> Vec<f64> {
        let k = self.params.top_k;
        self.cand.clear();
        if k > 0 && k < logits.len() {
            top_k_into(logits, k, &mut self.cand);
        } else {
            self.cand
                .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        }
        self.cut_candidates()
    }

    /// Sorts `self.cand` (already cut to top-k), cuts it by top-p and min-p, and returns
    /// the survivors' probabilities at the sampler's temperature.
    fn cut_candidates(&mut self) -> Vec<f64> {
        let p = self.params.clone();
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
        softmax_of(&self.cand, p.temperature)
    }

    /// The distribution [`Sampler::sample`] draws from at these raw logits, given the
    /// history so far: `(token, probability)` for every token that survives the penalties,
    /// top-k, top-p, min-p and the temperature, most likely first, summing to 1. Greedy
    /// (temperature <= 0): the argmax alone. Speculative decoding compares the target's and
    /// the draft's distributions through this.
    pub fn distribution(&mut self, logits: &[f32]) -> Vec<(u32, f64)> {
        self.penalized(logits, |s, logits| {
            if s.params.temperature <= 0.0 {
                vec![(argmax(logits), 1.0)]
            } else {
                let probs = s.candidates(logits);
                s.cand.iter().map(|c| c.0).zip(probs).collect()
            }
        })
    }

    /// Draws a token from `dist` (`(token, probability)` pairs summing to 1, as
    /// [`Sampler::distribution`] gives) with this sampler's generator; the last entry on
    /// rounding. `None` for an empty distribution.
    pub fn draw(&mut self, dist: &[(u32, f64)]) -> Option<u32> {
        let r = self.rng.uniform();
        let mut cum = 0.0;
        for &(t, pr) in dist {
            cum += pr;
            if r < cum {
                return Some(t);
            }
        }
        dist.last().map(|d| d.0)
    }

    /// A uniform number in [0, 1) from this sampler's generator.
    pub fn uniform(&mut self) -> f64 {
        self.rng.uniform()
    }

    /// Whether the sampler picks the most likely token (temperature <= 0).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// Replaces the recorded tokens (a draft model's sampler follows the target's sequence).
    pub fn set_history(&mut self, tokens: &[u32]) {
        self.history.clear();
        self.history.extend_from_slice(tokens);
    }
}

/// The first of equal maxima: a stable argmax (0 for an empty slice).
pub fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0u32, f32::NEG_INFINITY), |best, (t, &l)| {
            if l > best.1 {
                (t as u32, l)
            } else {
                best
            }
        })
        .0
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

    /// Models recommend settings in `general.sampling.*` (llama.cpp reads them); values
    /// outside capy's ranges are ignored, and later layers win.
    #[test]
    fn gguf_sampling_keys_are_read_and_layers_merge() {
        use capy_gguf::{Gguf, GgufWriter, Value};
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", Value::String("llama".into()));
        w.add_metadata("general.sampling.temp", Value::F32(0.6));
        w.add_metadata("general.sampling.top_k", Value::U32(20));
        w.add_metadata("general.sampling.penalty_repeat", Value::F32(-3.0));
        w.add_metadata("general.sampling.penalty_last_n", Value::I32(-1));
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        let g = Gguf::from_bytes(bytes).unwrap();
        let o = SamplingOptions::from_gguf(&g);
        assert_eq!(o.temperature, Some(0.6));
        assert_eq!(o.top_k, Some(20));
        assert_eq!(o.repeat_penalty, None, "out of range: ignored");
        assert_eq!(o.repeat_last_n, Some(-1));
        let card = SamplingOptions::from_pairs(&[("temperature", 0.2), ("top_p", 0.9)]).unwrap();
        let flags = SamplingOptions {
            top_p: Some(0.5),
            ..Default::default()
        };
        let p = flags.or(&card.or(&o)).params();
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.2, 0.5, 20));
        assert_eq!(p.repeat_last_n, usize::MAX);
        assert_eq!(p.min_p, SamplerParams::default().min_p);
        // -1 asks for a random seed (llama.cpp, Ollama) and is shown as given
        let mut o = SamplingOptions::default();
        o.set_text("seed", "-1").unwrap();
        assert_eq!(o.params().seed, None);
        assert_eq!(o.given(), [("seed", "-1".to_string())]);
        o.set_text("seed", "12345678901234567").unwrap();
        assert_eq!(o.params().seed, Some(12345678901234567));
        assert!(SamplingOptions::from_pairs(&[("warmth", 1.0)]).is_err());
        assert!(SamplingOptions::from_pairs(&[("top_p", 2.0)]).is_err());
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
    fn masked_sampling_draws_what_the_masked_row_draws() {
        // a row of 1000 distinct logits (ties may be ordered either way); sparse masks take
        // the gather path, dense ones the copy
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 337 % 1009) as f32) * 0.005)
            .collect();
        for every in [7usize, 2] {
            let mut mask = SimpleVob::alloc(row.len());
            for i in (3..row.len()).step_by(every) {
                mask.allow_token(i as u32);
            }
            let mut masked = row.clone();
            crate::grammar::apply_mask(&mask, &mut masked);
            for p in [
                SamplerParams::greedy(),
                SamplerParams {
                    temperature: 0.9,
                    top_k: 20,
                    top_p: 0.9,
                    min_p: 0.02,
                    repeat_penalty: 1.2,
                    seed: Some(7),
                    ..Default::default()
                },
                SamplerParams {
                    temperature: 1.3,
                    top_k: 0,
                    top_p: 1.0,
                    min_p: 0.0,
                    seed: Some(9),
                    ..Default::default()
                },
            ] {
                let (mut a, mut b) = (Sampler::new(p.clone()), Sampler::new(p.clone()));
                for s in [&mut a, &mut b] {
                    s.set_history(&[3, 10, 17]);
                }
                for _ in 0..40 {
                    let x = a.sample_masked(&row, &mask);
                    let y = b.sample(&masked);
                    assert_eq!(x, y, "every {every}, {p:?}");
                    assert!(mask.is_allowed(x));
                    a.accept(x);
                    b.accept(y);
                }
            }
        }
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
