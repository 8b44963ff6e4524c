//! `capy bench`'s speculative decoding rows: generation from a text prompt (greedy, end of
//! text ignored) with each speculation setting and without, so the rows compare tokens/s and
//! show how many guesses were kept. Random tokens, as the plain `tg` rows feed, would make
//! acceptance meaningless.

use anyhow::{Context, Result};
use capy_engine::{ContextParams, Engine, GenerateParams, SamplerParams, SpecParams, SpecType};
use serde_json::{json, Value};

/// A speculation setting of the bench: none, or a proposer with its most guesses per step.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    pub ty: Option<SpecType>,
    pub draft_max: usize,
}

impl Setting {
    fn label(&self) -> String {
        match self.ty {
            None => "none".into(),
            Some(t) => format!("{} max {}", t.name(), self.draft_max),
        }
    }
}

/// One row: a setting's generation speed over `reps` runs.
pub struct SpecRow {
    pub setting: Setting,
    pub threads: usize,
    pub n_gen: usize,
    pub samples: Vec<f64>,
    pub stats: capy_engine::SpecStats,
}

impl SpecRow {
    fn mean(&self) -> f64 {
        self.samples.iter().sum::<f64>() / self.samples.len().max(1) as f64
    }
}

/// Runs every setting for every generation length, each once to warm up and `reps` times.
///
/// # Errors
/// A draft model that cannot be loaded or whose vocabulary differs, or a failed pass.
#[allow(clippy::too_many_arguments)]
pub fn run(
    engine: &Engine,
    draft: Option<&Engine>,
    settings: &[Setting],
    prompt: &str,
    n_gens: &[usize],
    threads: usize,
    reps: usize,
    p_min: Option<f32>,
) -> Result<Vec<SpecRow>> {
    let prompt = engine.tokenizer.encode(prompt, true, true)?;
    let mut rows = Vec::new();
    for &n in n_gens.iter().filter(|&&n| n > 0) {
        for &setting in settings {
            let max = setting.draft_max;
            let mut session = engine.session(ContextParams {
                n_ctx: (prompt.len() + n + 1).max(16),
                n_outputs: max + 1,
                n_threads: threads,
                ..Default::default()
            });
            if let Some(ty) = setting.ty {
                let sp = SpecParams {
                    draft_max: max,
                    p_min: p_min.unwrap_or(SpecParams::default().p_min),
                    ..Default::default()
                };
                let spec = engine
                    .speculator(ty, draft, sp, &session.ctx.params)
                    .context("speculation")?;
                session.set_speculator(Some(spec));
            }
            let params = GenerateParams {
                max_tokens: n,
                sampler: SamplerParams::greedy(),
                ignore_eos: true,
                ..Default::default()
            };
            let mut samples = Vec::with_capacity(reps);
            let mut stats = capy_engine::SpecStats::default();
            for i in 0..=reps {
                // the whole prompt each time, as the first run: no cached prefix
                session.reset();
                let r = session.generate(&prompt, &params, |_, _| true)?;
                if i > 0 {
                    samples.push(r.tokens.len() as f64 / (r.gen_ms / 1e3).max(1e-9));
                    stats.add(&r.spec);
                }
            }
            rows.push(SpecRow {
                setting,
                threads,
                n_gen: n,
                samples,
                stats,
            });
        }
    }
    Ok(rows)
}

/// The rows as a Markdown table: tokens/s, speed-up over the row without speculation of the
/// same length, acceptance rate and kept guesses per step.
pub fn print(model: &str, rows: &[SpecRow]) {
    println!(
        "\n| {:<30} | {:>7} | {:>8} | {:<14} | {:>17} | {:>7} | {:>9} | {:>9} |",
        "model", "threads", "test", "speculation", "t/s", "speedup", "accepted", "per step"
    );
    println!(
        "| {:-<30} | {:->6}: | {:->7}: | {:-<14} | {:->16}: | {:->6}: | {:->8}: | {:->8}: |",
        "", "", "", "", "", "", "", ""
    );
    for r in rows {
        let sd = {
            let m = r.mean();
            let n = r.samples.len();
            if n < 2 {
                0.0
            } else {
                (r.samples.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64).sqrt()
            }
        };
        let (acc, per) = if r.setting.ty.is_some() {
            (
                format!("{:.1}%", 100.0 * r.stats.acceptance_rate()),
                format!("{:.2}", r.stats.mean_accepted()),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "| {:<30} | {:>7} | {:>8} | {:<14} | {:>17} | {:>7} | {:>9} | {:>9} |",
            model,
            r.threads,
            format!("tg{} text", r.n_gen),
            r.setting.label(),
            format!("{:.2} ± {:.2}", r.mean(), sd),
            speedup(rows, r).map_or("-".into(), |x| format!("{x:.2}x")),
            acc,
            per
        );
    }
}

/// The speed over the same length's row without speculation; `None` without such a row.
fn speedup(rows: &[SpecRow], r: &SpecRow) -> Option<f64> {
    rows.iter()
        .find(|b| b.setting.ty.is_none() && b.n_gen == r.n_gen && b.threads == r.threads)
        .map(|b| r.mean() / b.mean().max(1e-9))
}

/// The rows as JSON objects (llama-bench's field names where they apply).
pub fn json_rows(file: &str, rows: &[SpecRow]) -> Vec<Value> {
    rows.iter()
        .map(|r| {
            json!({
                "model_filename": file, "n_threads": r.threads, "n_prompt": 0,
                "n_gen": r.n_gen, "test": "tg text",
                "spec_type": r.setting.ty.map_or("none", |t| t.name()),
                "draft_max": r.setting.draft_max,
                "avg_ts": r.mean(), "samples_ts": r.samples,
                "speedup": speedup(rows, r),
                "drafted": r.stats.drafted, "accepted": r.stats.accepted,
                "acceptance_rate": r.stats.acceptance_rate(),
                "mean_accepted": r.stats.mean_accepted(),
            })
        })
        .collect()
}
