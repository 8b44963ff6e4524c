//! `capy perplexity`: llama-perplexity's method. The text is tokenized whole (with BOS
//! when the model adds one), cut into chunks of `c` tokens; each chunk's first token becomes
//! BOS when the model adds BOS, and the negative log-likelihood is taken over the second
//! half of every chunk.

use std::io::Write;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use capy_engine::{Batch, ContextParams, Engine};

use crate::common::{default_threads, model_path, threads};

#[derive(clap::Args)]
pub struct PerplexityArgs {
    #[arg(short = 'm', long)]
    pub model: String,
    /// Text file.
    #[arg(short = 'f', long)]
    pub file: std::path::PathBuf,
    /// Chunk length in tokens.
    #[arg(short = 'c', long, default_value_t = 512)]
    pub ctx_size: usize,
    /// Evaluate at most this many chunks.
    #[arg(long)]
    pub chunks: Option<usize>,
    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = threads)]
    pub threads: usize,
    /// Element type of the cached keys: f16, q8_0, fp8 (also `-ctk`).
    #[arg(long = "cache-type-k", default_value = "f16", value_parser = crate::common::kv_type)]
    pub cache_type_k: capy_model::KvType,
    /// Element type of the cached values (also `-ctv`).
    #[arg(long = "cache-type-v", default_value = "f16", value_parser = crate::common::kv_type)]
    pub cache_type_v: capy_model::KvType,
}

/// Logit rows computed per forward call.
const OUT_ROWS: usize = 64;

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let path = model_path(&a.model, false)?;
    let engine = Engine::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let tok = &engine.tokenizer;
    let tokens = tok.encode(&text, true, true)?;
    let n_ctx = a.ctx_size;
    if n_ctx < 4 {
        bail!("context size must be at least 4");
    }
    let mut n_chunk = tokens.len() / n_ctx;
    if let Some(c) = a.chunks {
        n_chunk = n_chunk.min(c);
    }
    if n_chunk == 0 {
        bail!("{} tokens is less than one chunk of {n_ctx}", tokens.len());
    }
    let add_bos = tok.add_bos && tok.bos.is_some();
    let mut ctx = capy_engine::Context::new(
        Arc::clone(&engine.model),
        ContextParams {
            n_ctx,
            n_seq: 1,
            kv_blocks: None,
            type_k: a.cache_type_k,
            type_v: a.cache_type_v,
            swa_full: false,
            n_batch: n_ctx,
            n_outputs: OUT_ROWS,
            n_threads: a.threads,
            isa: None,
        },
    );
    let n_vocab = ctx.n_vocab();
    let first = n_ctx / 2;
    eprintln!(
        "perplexity: {} tokens, {n_chunk} chunks of {n_ctx}",
        tokens.len()
    );
    let t0 = std::time::Instant::now();
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut batch = Batch::new();
    let mut stderr = std::io::stderr();
    for c in 0..n_chunk {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if add_bos {
            chunk[0] = tok.bos.unwrap_or(chunk[0]);
        }
        ctx.kv.clear(0)?;
        // first half: context only
        batch.clear();
        for (p, &t) in chunk.iter().enumerate().take(first) {
            batch.push(t, p, 0, false);
        }
        ctx.decode(&batch)?;
        // second half: predictions of tokens first+1 .. n_ctx-1
        let mut p = first;
        while p < n_ctx - 1 {
            let end = (p + OUT_ROWS).min(n_ctx - 1);
            batch.clear();
            for (q, &t) in chunk.iter().enumerate().take(end).skip(p) {
                batch.push(t, q, 0, true);
            }
            let logits = ctx.decode(&batch)?;
            for (row, q) in logits.chunks_exact(n_vocab).zip(p..end) {
                let target = chunk[q + 1] as usize;
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
                let v = (max as f64 + sum.ln()) - row[target] as f64;
                nll += v;
                nll2 += v * v;
                count += 1;
            }
            p = end;
        }
        eprint!("[{}]{:.4},", c + 1, (nll / count as f64).exp());
        stderr.flush().ok();
    }
    eprintln!();
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let err = if var > 0.0 && count > 1 {
        (var / (count as f64 - 1.0)).sqrt() * ppl
    } else {
        0.0
    };
    eprintln!(
        "{} tokens scored in {:.1} s",
        count,
        t0.elapsed().as_secs_f64()
    );
    println!("PPL = {ppl:.4} +/- {err:.5}");
    Ok(())
}
