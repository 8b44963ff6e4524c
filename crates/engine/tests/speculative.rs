//! Speculative decoding keeps the target's outputs: greedy tokens equal plain decoding on
//! every golden prompt of both real models (draft model and n-gram proposers), and sampled
//! tokens follow the target's distribution on tiny random models (chi-square goodness of
//! fit against the exact distribution, computed by enumerating every continuation), also
//! with a draft that is a different random model.

mod common;

use std::path::{Path, PathBuf};

use capy_engine::{
    Batch, Context, ContextParams, Engine, GenerateParams, Sampler, SamplerParams, SpecParams,
    SpecType,
};
use capy_gguf::{Array, GgmlType, GgufWriter, Value};
use common::{golden, ids, model_path, MODELS};

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampler: SamplerParams::greedy(),
        ignore_eos: true,
        ..Default::default()
    }
}

fn ctx(n_outputs: usize) -> ContextParams {
    ContextParams {
        n_ctx: 256,
        n_outputs,
        n_threads: 2,
        ..Default::default()
    }
}

/// A second copy of a model in another type, as a draft that disagrees now and then.
fn requantized(name: &str, ft: capy_model::quantize::FileType) -> PathBuf {
    let out = std::env::temp_dir().join(format!(
        "capy-spec-draft-{name}-{}-{}.gguf",
        ft.name(),
        std::process::id()
    ));
    capy_model::quantize::quantize_file(&model_path(name), &out, ft, 2, &mut |_, _, _| {})
        .expect("quantize the draft");
    out
}

#[test]
fn greedy_tokens_equal_plain_decoding_on_the_golden_prompts() {
    for (name, file) in MODELS {
        let engine = Engine::load(model_path(name)).expect("model loads");
        let draft_path = requantized(name, capy_model::quantize::FileType::Q4_0);
        let draft = Engine::load(&draft_path).expect("draft loads");
        let g = golden(file);
        let cases = g["completions"].as_array().unwrap();
        let mut plain = engine.session(ctx(1));
        let n = 48;
        let wants: Vec<_> = cases
            .iter()
            .map(|c| {
                plain
                    .generate(&ids(&c["prompt_token_ids"]), &greedy(n), |_, _| true)
                    .unwrap()
            })
            .collect();
        let settings = [
            (SpecType::Draft, SpecParams::default()),
            // long proposals the target often cuts short: many rejections and rollbacks
            (
                SpecType::Draft,
                SpecParams {
                    draft_max: 12,
                    p_min: 0.0,
                    ..Default::default()
                },
            ),
            (SpecType::Ngram, SpecParams::default()),
            (
                SpecType::Ngram,
                SpecParams {
                    ngram_min: 1,
                    draft_max: 5,
                    ..Default::default()
                },
            ),
        ];
        for (ty, sp) in settings {
            let mut s = engine.session(ctx(sp.draft_max + 1));
            let spec = engine
                .speculator(ty, Some(&draft), sp.clone(), &s.ctx.params)
                .expect("speculator");
            s.set_speculator(Some(spec));
            let mut total = capy_engine::SpecStats::default();
            for (c, want) in cases.iter().zip(&wants) {
                let prompt = ids(&c["prompt_token_ids"]);
                let got = s.generate(&prompt, &greedy(n), |_, _| true).unwrap();
                let w: Vec<u32> = want.tokens.iter().map(|t| t.id).collect();
                let o: Vec<u32> = got.tokens.iter().map(|t| t.id).collect();
                assert_eq!(o, w, "{name} {ty:?} {sp:?}: {:?}", c["prompt"]);
                assert_eq!(got.text, want.text);
                total.add(&got.spec);
            }
            eprintln!(
                "{name} {} draft_max {} p_min {}: {} proposed, {:.1}% accepted",
                ty.name(),
                sp.draft_max,
                sp.p_min,
                total.drafted,
                100.0 * total.acceptance_rate()
            );
            // the proposer did propose, and the target rejected some (the rollback ran)
            if ty == SpecType::Draft {
                assert!(total.drafted > 0 && total.accepted > 0);
            }
            if sp.p_min == 0.0 {
                assert!(
                    total.accepted < total.drafted,
                    "{name}: no rejection exercised"
                );
            }
        }
        let _ = std::fs::remove_file(&draft_path);
    }
}

#[test]
fn mismatched_vocabularies_are_refused_with_both_sizes() {
    let a = Engine::load(model_path("smollm2-135m")).unwrap();
    let b = Engine::load(model_path("gemma3-270m")).unwrap();
    let err = a
        .speculator(SpecType::Draft, Some(&b), SpecParams::default(), &ctx(9))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains(&a.tokenizer.n_vocab().to_string())
            && err.contains(&b.tokenizer.n_vocab().to_string())
            && err.contains("at token"),
        "{err}"
    );
}

// ---- the sampled distribution, on tiny random models ----

const N_VOCAB: usize = 8;
const N_EMBD: usize = 32;
const N_FF: usize = 48;

struct Rng(u64);
impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A 2-layer llama model with random F32 weights (seeded) and an 8-token vocabulary.
fn tiny_model(dir: &Path, seed: u64) -> PathBuf {
    let mut rng = Rng(seed);
    let mut w = GgufWriter::new();
    let (n_head, n_head_kv, head_dim, n_layer) = (2usize, 1usize, 16usize, 2usize);
    let k = |s: &str| format!("llama.{s}");
    w.add_metadata("general.architecture", Value::String("llama".into()));
    w.add_metadata(&k("embedding_length"), Value::U32(N_EMBD as u32));
    w.add_metadata(&k("block_count"), Value::U32(n_layer as u32));
    w.add_metadata(&k("feed_forward_length"), Value::U32(N_FF as u32));
    w.add_metadata(&k("attention.head_count"), Value::U32(n_head as u32));
    w.add_metadata(&k("attention.head_count_kv"), Value::U32(n_head_kv as u32));
    w.add_metadata(&k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5));
    w.add_metadata(&k("context_length"), Value::U32(256));
    w.add_metadata("tokenizer.ggml.model", Value::String("llama".into()));
    let tokens: Vec<String> = (0..N_VOCAB).map(|i| format!("t{i}")).collect();
    w.add_metadata("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    let f32s = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut rand = |n: usize, scale: f32| f32s((0..n).map(|_| rng.f32() * scale).collect());
    let e = N_EMBD as u64;
    let mut add = |name: &str, dims: &[u64], data: Vec<u8>| {
        w.add_tensor(name, GgmlType::F32, dims, data).unwrap();
    };
    add(
        "token_embd.weight",
        &[e, N_VOCAB as u64],
        rand(N_VOCAB * N_EMBD, 1.0),
    );
    add(
        "output.weight",
        &[e, N_VOCAB as u64],
        rand(N_VOCAB * N_EMBD, 0.5),
    );
    add("output_norm.weight", &[e], f32s(vec![1.0; N_EMBD]));
    let (q, kv) = ((n_head * head_dim) as u64, (n_head_kv * head_dim) as u64);
    for il in 0..n_layer {
        let n = |s: &str| format!("blk.{il}.{s}.weight");
        add(&n("attn_norm"), &[e], f32s(vec![1.0; N_EMBD]));
        add(&n("ffn_norm"), &[e], f32s(vec![1.0; N_EMBD]));
        add(&n("attn_q"), &[e, q], rand(N_EMBD * q as usize, 0.5));
        add(&n("attn_k"), &[e, kv], rand(N_EMBD * kv as usize, 0.5));
        add(&n("attn_v"), &[e, kv], rand(N_EMBD * kv as usize, 0.5));
        add(&n("attn_output"), &[q, e], rand(N_EMBD * q as usize, 0.5));
        add(&n("ffn_gate"), &[e, N_FF as u64], rand(N_EMBD * N_FF, 0.5));
        add(&n("ffn_up"), &[e, N_FF as u64], rand(N_EMBD * N_FF, 0.5));
        add(&n("ffn_down"), &[N_FF as u64, e], rand(N_EMBD * N_FF, 0.5));
    }
    let path = dir.join(format!("tiny-{seed:x}.gguf"));
    w.write_file(&path).unwrap();
    path
}

/// The exact probability of every continuation of `len` tokens after `prompt` under the
/// target's sampler settings, by enumeration: `[N_VOCAB; len]` flattened, first token
/// most significant.
fn exact_joint(engine: &Engine, prompt: &[u32], sp: &SamplerParams, len: usize) -> Vec<f64> {
    let mut c = Context::new(std::sync::Arc::clone(&engine.model), ctx(1));
    let mut batch = Batch::new();
    let mut out = vec![0.0; N_VOCAB.pow(len as u32)];
    let mut stack = vec![(Vec::<u32>::new(), 1.0f64)];
    while let Some((prefix, p)) = stack.pop() {
        if prefix.len() == len {
            let idx = prefix.iter().fold(0usize, |a, &t| a * N_VOCAB + t as usize);
            out[idx] += p;
            continue;
        }
        let mut seq = prompt.to_vec();
        seq.extend_from_slice(&prefix);
        c.kv.clear(0).unwrap();
        batch.clear();
        for (i, &t) in seq.iter().enumerate() {
            batch.push(t, i, 0, i + 1 == seq.len());
        }
        let logits = c.decode(&batch).unwrap().to_vec();
        let mut sampler = Sampler::new(sp.clone());
        sampler.set_history(&seq);
        for (t, pt) in sampler.distribution(&logits) {
            let mut next = prefix.clone();
            next.push(t);
            stack.push((next, p * pt));
        }
    }
    out
}

/// Regularized upper incomplete gamma Q(a, x), for the chi-square p-value Q(df/2, x/2).
fn gamma_q(a: f64, x: f64) -> f64 {
    let ln_gamma = |z: f64| {
        // Lanczos approximation (g = 7, n = 9)
        let c = [
            0.999_999_999_999_809_9,
            676.520_368_121_885_1,
            -1_259.139_216_722_402_8,
            771.323_428_777_653_1,
            -176.615_029_162_140_6,
            12.507_343_278_686_905,
            -0.138_571_095_265_720_12,
            9.984_369_578_019_572e-6,
            1.505_632_735_149_311_6e-7,
        ];
        let z = z - 1.0;
        let mut s = c[0];
        for (i, &ci) in c.iter().enumerate().skip(1) {
            s += ci / (z + i as f64);
        }
        let t = z + 7.5;
        0.5 * (2.0 * std::f64::consts::PI).ln() + (z + 0.5) * t.ln() - t + s.ln()
    };
    if x <= 0.0 {
        return 1.0;
    }
    let lead = (-x + a * x.ln() - ln_gamma(a)).exp();
    if x < a + 1.0 {
        // series for P(a, x)
        let (mut sum, mut term, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * lead
    } else {
        // continued fraction for Q(a, x) (modified Lentz)
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        lead * h
    }
}

/// Pearson's chi-square goodness of fit of `counts` to probabilities `p`, cells with an
/// expected count under 5 pooled; returns (statistic, degrees of freedom, p-value).
fn chi_square(counts: &[u64], p: &[f64]) -> (f64, usize, f64) {
    let n: u64 = counts.iter().sum();
    let (mut stat, mut cells) = (0.0, 0usize);
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (&o, &pi) in counts.iter().zip(p) {
        let e = pi * n as f64;
        if e < 5.0 {
            pool_o += o as f64;
            pool_e += e;
            continue;
        }
        stat += (o as f64 - e).powi(2) / e;
        cells += 1;
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
        cells += 1;
    }
    let df = cells.saturating_sub(1).max(1);
    (stat, df, gamma_q(df as f64 / 2.0, stat / 2.0))
}

#[test]
fn chi_square_p_values_are_right() {
    // known quantiles: chi2(1) = 3.841 at p = 0.05, chi2(10) = 23.209 at p = 0.01
    assert!((gamma_q(0.5, 3.841 / 2.0) - 0.05).abs() < 1e-3);
    assert!((gamma_q(5.0, 23.209 / 2.0) - 0.01).abs() < 1e-3);
    assert!((gamma_q(50.0, 135.807 / 2.0) - 0.01).abs() < 1e-3);
}

#[test]
fn sampled_tokens_follow_the_target_distribution() {
    let dir = std::env::temp_dir().join(format!("capy-spec-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = Engine::load(tiny_model(&dir, 0x5eed_0001)).unwrap();
    // a deliberately bad draft: another random model
    let bad = Engine::load(tiny_model(&dir, 0x0bad_d2af)).unwrap();
    // a good draft: the target itself
    let good = Engine::load(tiny_model(&dir, 0x5eed_0001)).unwrap();
    let prompt = [1u32, 4, 2, 7, 4, 2];
    // four tokens: the first is sampled as usual, the second step proposes two
    let len = 4;
    let settings = [
        SamplerParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        },
        SamplerParams {
            temperature: 0.7,
            top_k: 5,
            top_p: 0.9,
            min_p: 0.05,
            ..Default::default()
        },
        SamplerParams {
            temperature: 1.3,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.3,
            frequency_penalty: 0.4,
            presence_penalty: 0.2,
            ..Default::default()
        },
    ];
    let n_runs = 6000u64;
    for (si, sp) in settings.iter().enumerate() {
        let exact = exact_joint(&target, &prompt, sp, len);
        assert!((exact.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let proposers: [(&str, SpecType, Option<&Engine>); 4] = [
            ("none", SpecType::Ngram, None),
            ("bad draft", SpecType::Draft, Some(&bad)),
            ("good draft", SpecType::Draft, Some(&good)),
            ("ngram", SpecType::Ngram, None),
        ];
        for (label, ty, draft) in proposers {
            let mut s = target.session(ctx(5));
            if label != "none" {
                let spec = target
                    .speculator(
                        ty,
                        draft,
                        SpecParams {
                            draft_max: 4,
                            p_min: 0.0,
                            ngram_min: 1,
                            ..Default::default()
                        },
                        &s.ctx.params,
                    )
                    .unwrap();
                s.set_speculator(Some(spec));
            }
            let mut counts = vec![0u64; exact.len()];
            let mut stats = capy_engine::SpecStats::default();
            for run in 0..n_runs {
                let params = GenerateParams {
                    max_tokens: len,
                    ignore_eos: true,
                    sampler: SamplerParams {
                        seed: Some(run * 7919 + si as u64),
                        ..sp.clone()
                    },
                    ..Default::default()
                };
                let r = s.generate(&prompt, &params, |_, _| true).unwrap();
                assert_eq!(r.tokens.len(), len);
                let idx = r
                    .tokens
                    .iter()
                    .fold(0usize, |a, t| a * N_VOCAB + t.id as usize);
                counts[idx] += 1;
                stats.add(&r.spec);
            }
            if label != "none" {
                assert!(stats.drafted > 0, "{label}: nothing proposed");
            }
            // the joint distributions of token pairs (1, 2), (2, 3) and (3, 4)
            for first in 0..len - 1 {
                let pair = |v: &[f64]| {
                    let mut out = vec![0.0; N_VOCAB * N_VOCAB];
                    for (idx, &x) in v.iter().enumerate() {
                        let t = |i: usize| (idx / N_VOCAB.pow((len - 1 - i) as u32)) % N_VOCAB;
                        out[t(first) * N_VOCAB + t(first + 1)] += x;
                    }
                    out
                };
                let c: Vec<u64> = pair(&counts.iter().map(|&c| c as f64).collect::<Vec<_>>())
                    .iter()
                    .map(|&x| x as u64)
                    .collect();
                let (stat, df, p) = chi_square(&c, &pair(&exact));
                eprintln!(
                    "setting {si} {label} tokens {}-{}: chi2 {stat:.1} df {df} p {p:.4}; \
                     {} proposed, {:.0}% accepted",
                    first + 1,
                    first + 2,
                    stats.drafted,
                    100.0 * stats.acceptance_rate()
                );
                assert!(
                    std::env::var_os("SPEC_DEBUG").is_some() || p > 0.001,
                    "setting {si} {label}: the sampled tokens {} and {} do not follow the \
                     target's distribution (chi2 {stat:.1}, df {df}, p {p:.2e})",
                    first + 1,
                    first + 2
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
