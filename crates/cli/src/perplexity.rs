//! `capy perplexity`: llama-perplexity's method. The text is tokenized whole (with BOS
//! when the model adds one), cut into chunks of `c` tokens; each chunk's first token becomes
//! BOS when the model adds BOS, and the negative log-likelihood is taken over the second
//! half of every chunk.
//!
//! `--kl-divergence-base FILE` saves every scored position's log-probabilities in
//! llama-perplexity's format (so either engine's file serves the other); with
//! `--kl-divergence` the tokens come from such a file instead of `-f`, and the model is
//! compared with the saved distributions: KL divergence, the target token's log-probability
//! difference, top-1 agreement. The file (llama.cpp's `--kl-divergence-base`): `_logits_`,
//! then `n_ctx`, `n_vocab`, `n_chunk` as 32-bit integers, the `n_chunk * n_ctx` tokens
//! (i32), and per chunk `n_ctx - 1 - n_ctx/2` records of `2*((n_vocab+1)/2) + 4` u16: an f32
//! `scale` and f32 `min_log_prob`, then per token a code `c` for the log-probability
//! `min_log_prob + scale * c` (the range is the top 16 nats; 0 = at or below it).

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
    #[arg(short = 'f', long, required_unless_present = "kl_divergence")]
    pub file: Option<std::path::PathBuf>,
    /// Log-probabilities file (llama-perplexity's format): written from `-f`'s text, or
    /// read with `--kl-divergence`.
    #[arg(long)]
    pub kl_divergence_base: Option<std::path::PathBuf>,
    /// Compare with the log-probabilities of `--kl-divergence-base` (its tokens, its `-c`).
    #[arg(long, requires = "kl_divergence_base")]
    pub kl_divergence: bool,
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
    let tok = &engine.tokenizer;
    let base = match (&a.kl_divergence_base, a.kl_divergence) {
        (Some(p), true) => Some(BaseFile::read(p)?),
        _ => None,
    };
    let (tokens, n_ctx, mut n_chunk) = match &base {
        Some(b) => (b.tokens.clone(), b.n_ctx, b.n_chunk),
        None => {
            let file = a.file.as_ref().context("-f FILE is required")?;
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let tokens = tok.encode(&text, true, true)?;
            let n = tokens.len() / a.ctx_size.max(1);
            (tokens, a.ctx_size, n)
        }
    };
    if n_ctx < 4 {
        bail!("context size must be at least 4");
    }
    if let Some(c) = a.chunks {
        n_chunk = n_chunk.min(c);
    }
    if n_chunk == 0 {
        bail!("{} tokens is less than one chunk of {n_ctx}", tokens.len());
    }
    // checked before the context (and its KV cache, sized by the base's n_ctx) is made
    let n_vocab = engine.model.hp.n_vocab;
    if let Some(b) = &base {
        if b.n_vocab != n_vocab {
            bail!(
                "the base file has a vocabulary of {}, the model {n_vocab}",
                b.n_vocab
            );
        }
    }
    if let (Some(p), None) = (&a.kl_divergence_base, &base) {
        for (input, what) in [(Some(&path), "model"), (a.file.as_ref(), "text")] {
            if input.is_some_and(|i| crate::common::same_file(i, p)) {
                bail!("the base file would overwrite the {what} {}", p.display());
            }
        }
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
    let mut out = match (&a.kl_divergence_base, &base) {
        (Some(p), None) => Some(BaseWriter::create(p, n_ctx, n_vocab, n_chunk, &tokens)?),
        _ => None,
    };
    let first = n_ctx / 2;
    eprintln!(
        "perplexity: {} tokens, {n_chunk} chunks of {n_ctx}",
        tokens.len()
    );
    let t0 = std::time::Instant::now();
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut kld = KlStats::default();
    let mut batch = Batch::new();
    let mut stderr = std::io::stderr();
    let per_chunk = n_ctx - 1 - first;
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
                let lse = max as f64 + sum.ln();
                let v = lse - row[target] as f64;
                nll += v;
                nll2 += v * v;
                count += 1;
                if let Some(b) = &base {
                    let i = c * per_chunk + q - first;
                    if !kld.add(row, lse, b.record(i), target) {
                        bail!(
                            "{}: record {i} is not a probability distribution",
                            a.kl_divergence_base.as_deref().unwrap_or(&path).display()
                        );
                    }
                }
                if let Some(w) = out.as_mut() {
                    w.push(row)?;
                }
            }
            p = end;
        }
        eprint!("[{}]{:.4},", c + 1, (nll / count as f64).exp());
        stderr.flush().ok();
    }
    eprintln!();
    if let Some(w) = out {
        w.finish()?;
    }
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
    if base.is_some() {
        kld.print();
    }
    Ok(())
}

/// A `--kl-divergence-base` file read whole.
struct BaseFile {
    n_ctx: usize,
    n_vocab: usize,
    n_chunk: usize,
    tokens: Vec<u32>,
    /// u16 values of all records
    records: Vec<u16>,
    /// u16 values per record
    nv: usize,
}

impl BaseFile {
    fn read(path: &std::path::Path) -> Result<BaseFile> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let bad = || {
            anyhow::anyhow!(
                "{} is not a llama-perplexity log-probabilities file",
                path.display()
            )
        };
        if bytes.len() < 20 || &bytes[..8] != b"_logits_" {
            return Err(bad());
        }
        let int = |i: usize| i32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or([0; 4]));
        let (n_ctx, n_vocab, n_chunk) = (int(8), int(12), int(16));
        if n_ctx < 4 || n_vocab < 1 || n_chunk < 1 {
            return Err(bad());
        }
        let (n_ctx, n_vocab, n_chunk) = (n_ctx as usize, n_vocab as usize, n_chunk as usize);
        let nv = 2 * n_vocab.div_ceil(2) + 4;
        // sizes from the header, checked: a corrupt header must not overflow them
        let sizes = n_chunk
            .checked_mul(n_ctx)
            .and_then(|n| n.checked_mul(4))
            .and_then(|t| {
                let records = n_chunk
                    .checked_mul(n_ctx - 1 - n_ctx / 2)?
                    .checked_mul(nv * 2)?;
                Some((20 + t, (20 + t).checked_add(records)?))
            });
        let (tok_end, need) = sizes.unwrap_or((usize::MAX, usize::MAX));
        if bytes.len() != need {
            bail!(
                "{}: {} bytes, its header ({n_chunk} chunks of {n_ctx}, vocabulary {n_vocab}) needs {need}",
                path.display(),
                bytes.len()
            );
        }
        let mut tokens = Vec::with_capacity(n_chunk * n_ctx);
        for c in bytes[20..tok_end].chunks_exact(4) {
            let t = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if t < 0 || t as usize >= n_vocab {
                bail!("{}: token {t} outside the vocabulary", path.display());
            }
            tokens.push(t as u32);
        }
        let records = bytes[tok_end..]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(BaseFile {
            n_ctx,
            n_vocab,
            n_chunk,
            tokens,
            records,
            nv,
        })
    }

    /// Record `i`: its `(scale, min_log_prob)` and the vocabulary's codes.
    fn record(&self, i: usize) -> (f32, f32, &[u16]) {
        let r = &self.records[i * self.nv..(i + 1) * self.nv];
        let f = |a: u16, b: u16| f32::from_bits(a as u32 | (b as u32) << 16);
        (f(r[0], r[1]), f(r[2], r[3]), &r[4..4 + self.n_vocab])
    }
}

/// Writes a `--kl-divergence-base` file as llama-perplexity does.
struct BaseWriter {
    out: std::io::BufWriter<std::fs::File>,
    codes: Vec<u16>,
}

impl BaseWriter {
    fn create(
        path: &std::path::Path,
        n_ctx: usize,
        n_vocab: usize,
        n_chunk: usize,
        tokens: &[u32],
    ) -> Result<BaseWriter> {
        let f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = std::io::BufWriter::new(f);
        out.write_all(b"_logits_")?;
        for v in [n_ctx, n_vocab, n_chunk] {
            out.write_all(&(v as i32).to_le_bytes())?;
        }
        for &t in &tokens[..n_chunk * n_ctx] {
            out.write_all(&(t as i32).to_le_bytes())?;
        }
        let nv = 2 * n_vocab.div_ceil(2) + 4;
        Ok(BaseWriter {
            out,
            codes: vec![0; nv],
        })
    }

    /// One position's logits: the top 16 nats of its log-probabilities in 65536 steps.
    fn push(&mut self, row: &[f32]) -> Result<()> {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let min = row
            .iter()
            .fold(f32::INFINITY, |m, &v| m.min(v))
            .max(max - 16.0);
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let lse = sum.ln() as f32;
        let scale = (max - min) / 65535.0;
        let min_lp = min - max - lse;
        let (s, m) = (scale.to_bits(), min_lp.to_bits());
        self.codes[..4].copy_from_slice(&[s as u16, (s >> 16) as u16, m as u16, (m >> 16) as u16]);
        for (c, &v) in self.codes[4..].iter_mut().zip(row) {
            *c = if scale > 0.0 && v > min {
                nearest_u16(((v - min) / scale).min(65535.0))
            } else {
                0
            };
        }
        for c in &self.codes {
            self.out.write_all(&c.to_le_bytes())?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

/// Round to nearest, ties to even (llama-perplexity's `nearest_int`), into a u16.
fn nearest_u16(x: f32) -> u16 {
    x.round_ties_even().clamp(0.0, 65535.0) as u16
}

/// Tokens per position whose log-probabilities are compared.
const TOP_K: usize = 5;

/// The comparison with a base file's distributions.
#[derive(Default)]
struct KlStats {
    count: usize,
    sum_kld: f64,
    max_kld: f64,
    /// over the base's top [`TOP_K`] tokens of every position
    sum_dlp: f64,
    max_dlp: f64,
    n_dlp: usize,
    /// over the next tokens the base holds above its floor (16 nats below its top)
    sum_dlp_next: f64,
    n_dlp_next: usize,
    same_top: usize,
    /// positions where the base's top token leads the second by 0.5 nats or more
    confident: usize,
    confident_same_top: usize,
}

impl KlStats {
    /// One position: the model's logits `row` (with log-sum-exp `lse`), the base's record.
    /// False, with nothing counted, when the record is no probability distribution (a scale
    /// that is not finite or negative, or probabilities that do not sum to one).
    fn add(
        &mut self,
        row: &[f32],
        lse: f64,
        (scale, min_lp, codes): (f32, f32, &[u16]),
        target: usize,
    ) -> bool {
        let base_lp = |i: usize| (scale * codes[i] as f32 + min_lp) as f64;
        if !(scale.is_finite() && min_lp.is_finite() && scale >= 0.0) {
            return false;
        }
        let (mut kld, mut mass) = (0.0, 0.0);
        let (mut b1, mut b2, mut ib) = (f64::NEG_INFINITY, f64::NEG_INFINITY, 0);
        let mut im = 0;
        for (i, &v) in row.iter().enumerate() {
            let lb = base_lp(i);
            if lb > b1 {
                (b2, b1, ib) = (b1, lb, i);
            } else if lb > b2 {
                b2 = lb;
            }
            if v > row[im] {
                im = i;
            }
            if lb > -16.0 {
                kld += lb.exp() * (lb - (v as f64 - lse));
                mass += lb.exp();
            }
        }
        // the base's probabilities above its floor sum to one, up to its 16-bit codes and the
        // tail below e^-16 (at most n_vocab * e^-16)
        if (mass - 1.0).abs() > 0.01 + row.len() as f64 * (-16.0f64).exp() {
            return false;
        }
        // the base's five likeliest tokens
        let mut top: Vec<usize> = (0..row.len()).collect();
        let k = TOP_K.min(top.len());
        top.select_nth_unstable_by(k - 1, |&a, &b| codes[b].cmp(&codes[a]));
        for &i in &top[..k] {
            let d = ((row[i] as f64 - lse) - base_lp(i)).abs();
            self.sum_dlp += d;
            self.max_dlp = self.max_dlp.max(d);
            self.n_dlp += 1;
        }
        // the next token's, where the base holds it above its floor
        if codes[target] > 0 {
            let d = ((row[target] as f64 - lse) - base_lp(target)).abs();
            self.sum_dlp_next += d;
            self.n_dlp_next += 1;
        }
        self.count += 1;
        self.sum_kld += kld;
        self.max_kld = self.max_kld.max(kld);
        self.same_top += usize::from(im == ib);
        if b1 - b2 >= 0.5 {
            self.confident += 1;
            self.confident_same_top += usize::from(im == ib);
        }
        true
    }

    fn print(&self) {
        let n = self.count.max(1) as f64;
        println!("positions:            {}", self.count);
        println!(
            "mean KLD:             {:.6} (max {:.6})",
            self.sum_kld / n,
            self.max_kld
        );
        println!(
            "mean |dlogprob|:      {:.6} (max {:.6}) over the base's top {TOP_K} tokens",
            self.sum_dlp / self.n_dlp.max(1) as f64,
            self.max_dlp
        );
        println!(
            "mean |dlogprob| next: {:.6} over {} next tokens in the base's range",
            self.sum_dlp_next / self.n_dlp_next.max(1) as f64,
            self.n_dlp_next
        );
        println!(
            "same top token:       {:.2}% ({}/{})",
            100.0 * self.same_top as f64 / n,
            self.same_top,
            self.count
        );
        println!(
            "same top, margin>=0.5: {}/{} (positions where the base's top token leads by 0.5 nats or more)",
            self.confident_same_top, self.confident
        );
    }
}
