//! `capy generate`: raw completion, with JSON output for scripts and tests.

use anyhow::{bail, Context, Result};
use capy_engine::{ContextParams, Engine, GenerateParams};
use serde_json::{json, Value};

use crate::common::{
    capped_threads, configured_model, ctx_size, default_threads, model_sampling, threads,
    GrammarArgs, SamplingArgs, SpecArgs,
};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model: stored name, .gguf path, or a name or alias from the config file.
    #[arg(short = 'm', long)]
    pub model: String,
    /// Prompt text (tokenized with BOS as the model wants and special tokens parsed).
    #[arg(long, conflicts_with = "prompt_tokens")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub prompt_tokens: Option<Vec<u32>>,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 32)]
    pub n_predict: usize,
    /// Alternatives reported per position.
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: usize,
    /// Also report the prompt's logprobs (`prompt_logprobs`).
    #[arg(long)]
    pub echo: bool,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Context size in tokens, 16 or more (grown to fit the prompt and -n).
    #[arg(short = 'c', long, default_value_t = 4096, value_parser = ctx_size)]
    pub ctx_size: usize,
    /// Threads, at most the machine's cores (by default, all of them).
    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = threads)]
    pub threads: usize,
    /// Element type of the cached keys: f16, q8_0, fp8 (also `-ctk`) [default: the config
    /// file's for this model, else f16].
    #[arg(long = "cache-type-k", value_parser = crate::common::kv_type)]
    pub cache_type_k: Option<capy_model::KvType>,
    /// Element type of the cached values (also `-ctv`) [default: the config file's for this
    /// model, else f16].
    #[arg(long = "cache-type-v", value_parser = crate::common::kv_type)]
    pub cache_type_v: Option<capy_model::KvType>,
    /// TOML file with `[models.NAME]` settings (their sampling options apply)
    /// [default: config.toml in CAPY_HOME, if there].
    #[arg(long, env = "CAPY_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Print token counts, speeds and speculation figures to stderr.
    #[arg(long)]
    pub verbose: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub grammar: GrammarArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
}

fn top_json(top: &[(u32, f32)]) -> Value {
    Value::Array(
        top.iter()
            .map(|&(id, lp)| json!({"id": id, "logprob": lp}))
            .collect(),
    )
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let (path, settings) = configured_model(&a.model, a.config.as_deref(), false)?;
    let engine = Engine::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let prompt = match (&a.prompt, &a.prompt_tokens) {
        (Some(p), None) => engine.tokenizer.encode(p, true, true)?,
        (None, Some(t)) => t.clone(),
        _ => bail!("give exactly one of --prompt or --prompt-tokens"),
    };
    let n_ctx = a.ctx_size.max(prompt.len() + a.n_predict + 1);
    let mut session = engine.session(ContextParams {
        n_ctx,
        n_threads: capped_threads(a.threads),
        n_outputs: if a.echo { 64 } else { 1 }.max(a.spec.n_outputs()),
        type_k: a
            .cache_type_k
            .or(settings.as_ref().and_then(|s| s.cache_type_k))
            .unwrap_or_default(),
        type_v: a
            .cache_type_v
            .or(settings.as_ref().and_then(|s| s.cache_type_v))
            .unwrap_or_default(),
        ..Default::default()
    });
    let spec = a.spec.speculator(&engine, &session.ctx.params)?;
    session.set_speculator(spec);
    let params = GenerateParams {
        max_tokens: a.n_predict,
        sampler: a
            .sampling
            .options()
            .or(&model_sampling(&a.model, settings.as_ref(), &engine))
            .params(),
        stop: a.stop.clone(),
        logprobs: true,
        top_logprobs: a.top_logprobs,
        echo: a.echo,
        ignore_eos: a.ignore_eos,
        grammar: a.grammar.grammar(&engine.tokenizer)?,
    };
    let stream = !a.json;
    let r = session.generate(&prompt, &params, |_, text| {
        if stream {
            print!("{text}");
        }
        true
    })?;
    let spec_kind = session.speculator().map(|s| s.spec_type().name());
    if a.verbose {
        if stream {
            // the text streamed without a final newline
            println!();
        }
        let n_gen = r.tokens.len();
        eprintln!(
            "prompt: {} tokens, {:.1} ms | generation: {} tokens, {:.1} ms, {:.2} tokens/s",
            r.prompt_n,
            r.prompt_ms,
            n_gen,
            r.gen_ms,
            n_gen.saturating_sub(1) as f64 / (r.gen_ms / 1e3).max(1e-9)
        );
        if let Some(kind) = spec_kind {
            eprintln!("{}", crate::run::spec_line(kind, &r.spec));
        }
    }
    if !a.json {
        println!();
        return Ok(());
    }
    let tokens: Vec<Value> = r
        .tokens
        .iter()
        .map(|t| json!({"id": t.id, "text": t.text, "logprob": t.logprob, "top": top_json(&t.top)}))
        .collect();
    let mut out = json!({
        "prompt_token_ids": r.prompt_tokens,
        "tokens": tokens,
        "text": r.text,
        "stop_reason": format!("{:?}", r.stop_reason).to_lowercase(),
        "kernels": capy_kernels::kernels().name,
        "timings": {
            "prompt_n": r.prompt_n,
            "prompt_ms": r.prompt_ms,
            "gen_n": r.tokens.len(),
            "gen_ms": r.gen_ms,
        },
    });
    if let Some(kind) = spec_kind {
        out["speculative"] = json!({
            "type": kind,
            "drafted": r.spec.drafted,
            "accepted": r.spec.accepted,
            "steps": r.spec.steps,
            "acceptance_rate": r.spec.acceptance_rate(),
            "mean_accepted": r.spec.mean_accepted(),
        });
    }
    if let Some(plp) = &r.prompt_logprobs {
        out["prompt_logprobs"] = Value::Array(
            plp.iter()
                .map(|e| match e {
                    None => Value::Null,
                    Some(p) => json!({"id": p.id, "logprob": p.logprob, "top": top_json(&p.top)}),
                })
                .collect(),
        );
    }
    println!("{out}");
    Ok(())
}
