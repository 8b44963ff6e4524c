//! `capy bench`: llama-bench's method. pp: one batch of `p` prompt tokens into the cache;
//! tg: `n` tokens decoded one at a time. The cache is empty, or holds `d` tokens already
//! (`-d`, llama-bench's depth: prefilled once per test, untimed). Each test runs once to warm
//! up, then `r` times; rows report mean and standard deviation of tokens/s.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use capy_engine::{Batch, ContextParams, Engine};
use capy_model::KvType;
use serde_json::json;

use crate::bench_spec;
use crate::common::model_path;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model(s): stored name or .gguf path (repeatable).
    #[arg(short = 'm', long, required = true)]
    pub model: Vec<String>,
    /// Prompt lengths (comma-separated; 0 skips).
    #[arg(short = 'p', long, value_delimiter = ',', default_value = "512")]
    pub n_prompt: Vec<usize>,
    /// Generation lengths (comma-separated; 0 skips).
    #[arg(short = 'n', long, value_delimiter = ',', default_value = "128")]
    pub n_gen: Vec<usize>,
    /// Depths: tokens already in the cache before each test (comma-separated), as
    /// llama-bench's `-d`.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub n_depth: Vec<usize>,
    /// Thread counts (comma-separated).
    #[arg(short = 't', long, value_delimiter = ',')]
    pub threads: Option<Vec<usize>>,
    /// Key cache types (comma-separated: f16, q8_0, fp8; also `-ctk`).
    #[arg(long = "cache-type-k", value_delimiter = ',', default_value = "f16",
          value_parser = crate::common::kv_type)]
    pub cache_type_k: Vec<KvType>,
    /// Value cache types (also `-ctv`).
    #[arg(long = "cache-type-v", value_delimiter = ',', default_value = "f16",
          value_parser = crate::common::kv_type)]
    pub cache_type_v: Vec<KvType>,
    /// Repetitions per test.
    #[arg(short = 'r', long, default_value_t = 5)]
    pub repetitions: usize,
    /// Print a JSON array instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
    /// Draft model for speculative decoding rows (also `-md`): each `-n` length is also
    /// generated from `--spec-prompt`, without speculation and with each setting.
    #[arg(long = "draft-model")]
    pub draft_model: Option<String>,
    /// Speculation settings to compare (comma-separated: none, draft, ngram) [default with
    /// a draft model: none,draft].
    #[arg(long, value_delimiter = ',')]
    pub spec_type: Vec<String>,
    /// Most guesses per step for the speculation rows (comma-separated) [8].
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub draft_max: Vec<usize>,
    /// The draft's floor on its top token's probability [0].
    #[arg(long)]
    pub draft_p_min: Option<f32>,
    /// Text the speculation rows generate from (greedy, end of text ignored).
    #[arg(long, default_value = DEFAULT_SPEC_PROMPT)]
    pub spec_prompt: String,
}

/// The speculation rows' default prompt: a chat turn asking for code, in ChatML (SmolLM2's
/// format; other models read it as text).
const DEFAULT_SPEC_PROMPT: &str = "<|im_start|>user\nWrite a Python function that checks \
whether a number is prime, with a docstring and tests.<|im_end|>\n<|im_start|>assistant\n";

/// The speculation settings asked for, `None` when there are none.
fn spec_settings(a: &BenchArgs) -> Result<Option<Vec<bench_spec::Setting>>> {
    let mut types = a.spec_type.clone();
    if types.is_empty() {
        if a.draft_model.is_none() {
            return Ok(None);
        }
        types = vec!["none".into(), "draft".into()];
    }
    let mut out = Vec::new();
    for t in &types {
        let ty =
            match t.trim() {
                "none" => None,
                other => Some(capy_engine::SpecType::parse(other).ok_or_else(|| {
                    anyhow::anyhow!("--spec-type: none, draft or ngram, got {t:?}")
                })?),
            };
        if ty == Some(capy_engine::SpecType::Draft) && a.draft_model.is_none() {
            bail!("--spec-type draft needs --draft-model (-md)");
        }
        if ty.is_none() {
            out.push(bench_spec::Setting { ty, draft_max: 0 });
            continue;
        }
        for &m in &a.draft_max {
            if !(1..=32).contains(&m) {
                bail!("--draft-max must be between 1 and 32, got {m}");
            }
            out.push(bench_spec::Setting { ty, draft_max: m });
        }
    }
    Ok(Some(out))
}

struct Row {
    model: String,
    file: String,
    size: u64,
    params: u64,
    threads: usize,
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    type_k: KvType,
    type_v: KvType,
    samples: Vec<f64>,
}

impl Row {
    fn mean(&self) -> f64 {
        self.samples.iter().sum::<f64>() / self.samples.len().max(1) as f64
    }
    fn stddev(&self) -> f64 {
        let n = self.samples.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self.samples.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64).sqrt()
    }
}

/// Deterministic pseudo-random token ids (llama-bench also feeds random tokens).
fn tokens(n: usize, n_vocab: usize) -> Vec<u32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % n_vocab as u64) as u32
        })
        .collect()
}

/// Physical batch size: longer prompts go through in pieces of this many tokens, as
/// llama.cpp's `n_ubatch` (512).
const N_UBATCH: usize = 512;

/// Feeds `toks` at positions `start..` in batches of [`N_UBATCH`], the last token's logits
/// computed when `last_logits`.
fn feed(
    ctx: &mut capy_engine::Context,
    toks: &[u32],
    start: usize,
    last_logits: bool,
) -> Result<()> {
    let mut b = Batch::new();
    for (c, chunk) in toks.chunks(N_UBATCH).enumerate() {
        b.clear();
        for (i, &t) in chunk.iter().enumerate() {
            let p = c * N_UBATCH + i;
            b.push(t, start + p, 0, last_logits && p + 1 == toks.len());
        }
        ctx.decode(&b)?;
    }
    Ok(())
}

/// Fills the cache with `depth` tokens (untimed), once per test.
fn prefill(ctx: &mut capy_engine::Context, depth: &[u32]) -> Result<()> {
    ctx.kv.clear(0)?;
    feed(ctx, depth, 0, false)
}

/// Brings the cache back to the depth (untimed): what a sliding-window layer released and
/// the cache evicted since is computed again.
fn rewind(ctx: &mut capy_engine::Context, depth: &[u32]) -> Result<()> {
    let kept = ctx.kv.truncate(0, depth.len())?;
    if kept < depth.len() {
        feed(ctx, &depth[kept..], kept, false)?;
    }
    Ok(())
}

fn run_pp(ctx: &mut capy_engine::Context, toks: &[u32], depth: &[u32]) -> Result<f64> {
    rewind(ctx, depth)?;
    let t0 = Instant::now();
    feed(ctx, toks, depth.len(), true)?;
    Ok(toks.len() as f64 / t0.elapsed().as_secs_f64())
}

fn run_tg(ctx: &mut capy_engine::Context, toks: &[u32], depth: &[u32]) -> Result<f64> {
    rewind(ctx, depth)?;
    let d = depth.len();
    let mut b = Batch::new();
    let t0 = Instant::now();
    for (p, &t) in toks.iter().enumerate() {
        b.clear();
        b.push(t, d + p, 0, true);
        ctx.decode(&b)?;
    }
    Ok(toks.len() as f64 / t0.elapsed().as_secs_f64())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let threads = a
        .threads
        .clone()
        .unwrap_or_else(|| vec![crate::common::default_threads()]);
    if a.repetitions == 0 {
        bail!("-r must be at least 1");
    }
    let mut rows = Vec::new();
    let spec = spec_settings(&a)?;
    if let Some(p) = a.draft_p_min {
        if !(0.0..=1.0).contains(&p) {
            bail!("--draft-p-min must be between 0 and 1, got {p}");
        }
    }
    let draft = match &a.draft_model {
        Some(d) if spec.is_some() => {
            let p = model_path(d, false)?;
            Some(
                Engine::load(&p)
                    .with_context(|| format!("loading the draft model {}", p.display()))?,
            )
        }
        _ => None,
    };
    let mut spec_json = Vec::new();
    // llama-bench shows the cache types only when one is not f16
    let quantized = a
        .cache_type_k
        .iter()
        .chain(&a.cache_type_v)
        .any(|t| t.is_quantized());
    for m in &a.model {
        let path = model_path(m, false)?;
        let engine = Engine::load(&path).with_context(|| format!("loading {}", path.display()))?;
        if let Some(d) = &draft {
            // before the plain rows, not after them
            capy_engine::speculative::check_vocab(&engine.tokenizer, &d.tokenizer)?;
        }
        let hp = &engine.model.hp;
        let g = &engine.model.gguf;
        let params = g.n_params();
        let ftype = g.file_type_name();
        let label = format!("{} {} {}", hp.arch.name(), size_label(params), ftype);
        let max_p = a.n_prompt.iter().copied().max().unwrap_or(0);
        let max_n = a.n_gen.iter().copied().max().unwrap_or(0);
        let max_d = a.n_depth.iter().copied().max().unwrap_or(0);
        if max_d + max_p.max(max_n) >= hp.n_ctx_train.max(16) {
            bail!(
                "-d {max_d} plus the longest test ({}) does not fit the model's context of {}",
                max_p.max(max_n),
                hp.n_ctx_train
            );
        }
        let types: Vec<(KvType, KvType)> = a
            .cache_type_k
            .iter()
            .flat_map(|&k| a.cache_type_v.iter().map(move |&v| (k, v)))
            .collect();
        for (&t, &(type_k, type_v)) in threads
            .iter()
            .flat_map(|t| types.iter().map(move |ty| (t, ty)))
        {
            let mut ctx = capy_engine::Context::new(
                Arc::clone(&engine.model),
                ContextParams {
                    n_ctx: (max_d + max_p.max(max_n) + 1).max(16),
                    n_seq: 1,
                    kv_blocks: None,
                    type_k,
                    type_v,
                    swa_full: false,
                    n_batch: max_p.max(max_d).clamp(1, N_UBATCH),
                    n_outputs: 1,
                    n_threads: t,
                    isa: None,
                },
            );
            let tests: Vec<(usize, usize)> = a
                .n_prompt
                .iter()
                .filter(|&&p| p > 0)
                .map(|&p| (p, 0))
                .chain(a.n_gen.iter().filter(|&&n| n > 0).map(|&n| (0, n)))
                .collect();
            let tests = tests
                .iter()
                .flat_map(|&(p, n)| a.n_depth.iter().map(move |&d| (p, n, d)));
            for (p, n, d) in tests {
                // the depth's tokens, then the test's (a different stream)
                let all = tokens(d + p.max(n), hp.n_vocab);
                let (depth, toks) = all.split_at(d);
                prefill(&mut ctx, depth)?;
                let f = |ctx: &mut capy_engine::Context| {
                    if p > 0 {
                        run_pp(ctx, toks, depth)
                    } else {
                        run_tg(ctx, toks, depth)
                    }
                };
                f(&mut ctx)?; // warm-up
                let mut samples = Vec::with_capacity(a.repetitions);
                for _ in 0..a.repetitions {
                    samples.push(f(&mut ctx)?);
                }
                let row = Row {
                    model: label.clone(),
                    file: path.display().to_string(),
                    size: g.file_size(),
                    params,
                    threads: t,
                    n_prompt: p,
                    n_gen: n,
                    n_depth: d,
                    type_k: ctx.kv.types().0,
                    type_v: ctx.kv.types().1,
                    samples,
                };
                if !a.json {
                    if rows.is_empty() {
                        print_header(quantized);
                    }
                    print_row(&row, quantized);
                }
                rows.push(row);
            }
        }
        if let Some(settings) = &spec {
            for &t in &threads {
                let srows = bench_spec::run(
                    &engine,
                    draft.as_ref(),
                    settings,
                    &a.spec_prompt,
                    &a.n_gen,
                    t,
                    a.repetitions,
                    a.draft_p_min,
                )?;
                if a.json {
                    spec_json.extend(bench_spec::json_rows(&path.display().to_string(), &srows));
                } else {
                    bench_spec::print(&label, &srows);
                }
            }
        }
    }
    if !a.json {
        println!("\nkernels: {}", capy_kernels::kernels().name);
    }
    if a.json {
        let arr: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "model_filename": r.file, "model_type": r.model, "model_size": r.size,
                    "model_n_params": r.params, "backend": "CPU",
                    "cpu_kernels": capy_kernels::kernels().name, "n_threads": r.threads,
                    "n_prompt": r.n_prompt, "n_gen": r.n_gen, "n_depth": r.n_depth,
                    "type_k": r.type_k.name(), "type_v": r.type_v.name(),
                    "avg_ts": r.mean(),
                    "stddev_ts": r.stddev(), "samples_ts": r.samples,
                })
            })
            .chain(spec_json)
            .collect();
        println!("{}", serde_json::to_string_pretty(&arr)?);
    }
    Ok(())
}

fn size_label(params: u64) -> String {
    if params >= 1_000_000_000 {
        format!("{:.0}B", params as f64 / 1e9)
    } else {
        format!("{:.0}M", params as f64 / 1e6)
    }
}

fn print_header(types: bool) {
    let (ty, line) = if types {
        ("| type_k | type_v ", "| ------ | ------ ")
    } else {
        ("", "")
    };
    println!(
        "| {:<30} | {:>10} | {:>10} | {:<10} | {:>7} {ty}| {:>15} | {:>20} |",
        "model", "size", "params", "backend", "threads", "test", "t/s"
    );
    println!(
        "| {:-<30} | {:->9}: | {:->9}: | {:-<10} | {:->6}: {line}| {:->14}: | {:->19}: |",
        "", "", "", "", "", "", ""
    );
}

fn print_row(r: &Row, types: bool) {
    let mut test = if r.n_prompt > 0 {
        format!("pp{}", r.n_prompt)
    } else {
        format!("tg{}", r.n_gen)
    };
    // llama-bench's label for a test at depth
    if r.n_depth > 0 {
        test.push_str(&format!(" @ d{}", r.n_depth));
    }
    let ty = if types {
        format!("| {:>6} | {:>6} ", r.type_k.name(), r.type_v.name())
    } else {
        String::new()
    };
    // llama-bench's units: GiB from 1 GiB, B(illion) parameters from 1e9
    let size = match r.size as f64 / (1024.0 * 1024.0) {
        mib if mib >= 1024.0 => format!("{:.2} GiB", mib / 1024.0),
        mib => format!("{mib:.2} MiB"),
    };
    let params = match r.params as f64 {
        p if p >= 1e9 => format!("{:.2} B", p / 1e9),
        p => format!("{:.2} M", p / 1e6),
    };
    println!(
        "| {:<30} | {:>10} | {:>10} | {:<10} | {:>7} {ty}| {:>15} | {:>20} |",
        r.model,
        size,
        params,
        "CPU",
        r.threads,
        test,
        format!("{:.2} ± {:.2}", r.mean(), r.stddev())
    );
}
