//! Shared CLI pieces: resolving a model argument, sampling flags, threads.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use capy_engine::grammar::{Grammar, GrammarSpec};
use capy_engine::{params, Engine, SamplingOptions};
use capy_server::config::{config_path, Config, ServedModel};
use capy_store::{ModelRef, Store};

use crate::progress::Bar;

/// A model argument as a file path: an existing .gguf path, a stored model, or (when
/// `pull` is set) a model pulled now.
pub fn model_path(arg: &str, pull: bool) -> Result<PathBuf> {
    let p = PathBuf::from(arg);
    if p.is_file() {
        return Ok(p);
    }
    let store = Store::open_default();
    match store.resolve(arg) {
        Ok(path) => Ok(path),
        Err(capy_store::Error::NotFound(_))
            if pull && !matches!(ModelRef::parse(arg)?, ModelRef::Local(_)) =>
        {
            eprintln!("pulling {arg}...");
            store
                .pull(arg, &Bar::default())
                .with_context(|| format!("pulling {arg}"))?;
            Ok(store.resolve(arg)?)
        }
        // a path to a .gguf that is not there: say so, not that no such name is stored
        Err(capy_store::Error::NotFound(_) | capy_store::Error::BadName(_))
            if names_a_file(arg) =>
        {
            anyhow::bail!(
                "{arg}: no such file (a model is a .gguf file or a name in the store; \
                 `capy list` shows the store)"
            )
        }
        // the store's message says what a name may be
        Err(e @ (capy_store::Error::NotFound(_) | capy_store::Error::AlreadyStored { .. })) => {
            Err(e.into())
        }
        Err(e) => {
            Err(e).with_context(|| format!("model {arg:?} is neither a file nor in the store"))
        }
    }
}

/// Whether a model argument can only mean a local file: a `.gguf` name that is no URL and
/// no `hf.co/` path.
fn names_a_file(arg: &str) -> bool {
    arg.to_ascii_lowercase().ends_with(".gguf")
        && !arg.contains("://")
        && !arg.starts_with("hf.co/")
        && !arg.starts_with("huggingface.co/")
}

/// A model argument as a file path with its settings from the config file (`--config`,
/// `CAPY_CONFIG`, else `config.toml` in CAPY_HOME) when it names a `[models.NAME]` entry
/// or alias there; otherwise as [`model_path`].
///
/// # Errors
/// A config file that cannot be read or is invalid, or [`model_path`]'s.
pub fn configured_model(
    arg: &str,
    config: Option<&Path>,
    pull: bool,
) -> Result<(PathBuf, Option<ServedModel>)> {
    if let Some(file) = config_path(config, &Store::open_default().root) {
        let checked = Config::from_file(&file)
            .and_then(|c| c.validate())
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("config file {}", file.display()))?;
        if let Some(m) = capy_server::config::find_model(&checked.models, arg).cloned() {
            let path = if m.is_path {
                PathBuf::from(&m.source)
            } else {
                model_path(&m.source, pull).with_context(|| format!("model {:?}", m.name))?
            };
            return Ok((path, Some(m)));
        }
    }
    Ok((model_path(arg, pull)?, None))
}

/// The router or ensemble called `name` in the config file (`config`, `CAPY_CONFIG`, or
/// config.toml in CAPY_HOME), with the file's settings; `None` when there is none.
///
/// # Errors
/// The file cannot be read or has a mistake.
pub fn virtual_model(
    name: &str,
    config: Option<&Path>,
) -> Result<Option<(Config, capy_server::virtuals::VirtualModel)>> {
    let Some(file) = config_path(config, &Store::open_default().root) else {
        return Ok(None);
    };
    let cfg = Config::from_file(&file)
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("config file {}", file.display()))?;
    let base = name.trim().strip_suffix(":latest").unwrap_or(name.trim());
    if !cfg.virtuals.contains_key(base) {
        return Ok(None);
    }
    let checked = cfg
        .validate()
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("config file {}", file.display()))?;
    let Some(v) = checked.virtuals.iter().find(|v| v.name == base).cloned() else {
        return Ok(None);
    };
    // as `capy serve` checks them: configured models, or stored ones without tables
    let store = Store::open_default();
    for m in v.members() {
        let served = if checked.models.is_empty() {
            capy_store::ModelRef::parse(&m)
                .ok()
                .and_then(|r| store.get(&r.store_name()).ok().flatten())
                .is_some()
        } else {
            capy_server::config::find_model(&checked.models, &m).is_some()
        };
        if !served {
            let names: Vec<&str> = checked.models.iter().map(|m| m.name.as_str()).collect();
            bail!(
                "virtual.{}: member {m:?} is not served; {}",
                v.name,
                capy_server::virtuals::member_hint(&names)
            );
        }
    }
    Ok(Some((cfg, v)))
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A `--threads` value: 1 to 1024.
pub fn threads(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("threads must be between 1 and 1024, got {s:?}")),
    }
}

/// Threads for a chat or a completion: more than the machine's cores only slows the
/// engine's workers (they wait on each other), so the count is capped there, with a note.
pub fn capped_threads(n: usize) -> usize {
    let cores = default_threads();
    if n > cores {
        eprintln!("capy: {n} threads asked for, but this machine has {cores} cores; using {cores}");
        cores
    } else {
        n
    }
}

/// A `--ctx-size` value: 16 to 16M positions.
pub fn ctx_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (16..=1 << 24).contains(&n) => Ok(n),
        _ => Err(format!(
            "ctx-size must be between 16 and 16777216 positions, got {s:?}"
        )),
    }
}

/// Structured-output flags shared by `run` and `generate`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct GrammarArgs {
    /// Constrain the answer to JSON: `json` for any JSON object, or a JSON schema (a file,
    /// or the schema itself when it starts with `{`).
    #[arg(long, value_name = "json|SCHEMA", conflicts_with = "grammar")]
    pub format: Option<String>,
    /// Constrain the answer to a grammar file: GBNF as llama.cpp writes it (`root ::= ...`),
    /// or llguidance's Lark when the file name ends in `.lark`.
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
}

impl GrammarArgs {
    /// The grammar asked for, compiled for this tokenizer.
    ///
    /// # Errors
    /// An unreadable file, a schema that is not JSON, a grammar llguidance cannot compile.
    pub fn grammar(&self, tok: &capy_engine::Tokenizer) -> Result<Option<Grammar>> {
        let spec = if let Some(f) = &self.format {
            if f == "json" {
                GrammarSpec::json_object()
            } else {
                let text = if f.trim_start().starts_with('{') {
                    f.clone()
                } else {
                    read_capped(Path::new(f)).with_context(|| {
                        format!(
                            "--format takes json, a JSON schema file or a schema ({{...}}): \
                             reading the file {f}"
                        )
                    })?
                };
                let schema: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("--format: {f} is not JSON"))?;
                GrammarSpec::JsonSchema(schema)
            }
        } else if let Some(path) = &self.grammar {
            let text = read_capped(path)
                .with_context(|| format!("--grammar: reading {}", path.display()))?;
            if path.extension().is_some_and(|e| e == "lark") {
                GrammarSpec::Lark(text)
            } else {
                GrammarSpec::Gbnf(text)
            }
        } else {
            return Ok(None);
        };
        let flag = if self.format.is_some() {
            "--format"
        } else {
            "--grammar"
        };
        let grammars = tok.grammars().map_err(|e| anyhow!("{flag}: {e}"))?;
        let g = grammars
            .compile(&spec)
            .map_err(|e| anyhow!("{flag}: {e}"))?;
        Ok(Some(g))
    }
}

/// A schema or grammar file's text, refused past 16 MiB (`/dev/zero` would never end).
fn read_capped(path: &Path) -> Result<String> {
    use std::io::Read;
    const MAX: u64 = 16 << 20;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX {
        bail!("larger than 16 MiB");
    }
    Ok(text)
}

/// Sampling flags shared by `run` and `generate`, checked against the engine's ranges
/// ([`capy_engine::params`]) as the server checks request fields. Unset ones take the
/// model's recommended settings (a built-in model's card, the GGUF's `general.sampling.*`),
/// then llama.cpp's defaults (shown in brackets).
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature, 0 to 100; 0 = greedy [0.8].
    #[arg(long, allow_negative_numbers = true, value_parser = float(&params::TEMPERATURE))]
    pub temp: Option<f32>,
    /// Top-k (0 or -1 = off) [40].
    #[arg(long, allow_negative_numbers = true, value_parser = int(&params::TOP_K))]
    pub top_k: Option<i64>,
    /// Top-p, 0 to 1 (1.0 = off) [0.95].
    #[arg(long, allow_negative_numbers = true, value_parser = float(&params::TOP_P))]
    pub top_p: Option<f32>,
    /// Min-p, 0 to 1 (0 = off) [0.05].
    #[arg(long, allow_negative_numbers = true, value_parser = float(&params::MIN_P))]
    pub min_p: Option<f32>,
    /// Repetition penalty, above 0 and at most 10 (1.0 = off) [1.0].
    #[arg(long, allow_negative_numbers = true, value_parser = float(&params::REPEAT_PENALTY))]
    pub repeat_penalty: Option<f32>,
    /// Tokens the repetition penalties look back over (-1 = the whole context, 0 = off) [64].
    #[arg(long, allow_negative_numbers = true, value_parser = int(&params::REPEAT_LAST_N))]
    pub repeat_last_n: Option<i64>,
    /// -2 to 2 (0 = off) [0].
    #[arg(long, allow_negative_numbers = true, value_parser = float(&params::PRESENCE_PENALTY))]
    pub presence_penalty: Option<f32>,
    /// -2 to 2 (0 = off) [0].
    #[arg(long, allow_negative_numbers = true, value_parser = float(&params::FREQUENCY_PENALTY))]
    pub frequency_penalty: Option<f32>,
    /// Random seed, any 64-bit integer (negative ones wrap) [from the clock].
    #[arg(long, allow_negative_numbers = true, value_parser = seed)]
    pub seed: Option<u64>,
}

/// A seed as requests give it: any 64-bit integer, signed or not.
fn seed(s: &str) -> Result<u64, String> {
    let s = s.trim();
    s.parse::<u64>()
        .or_else(|_| s.parse::<i64>().map(|i| i as u64))
        .map_err(|_| format!("seed must be a 64-bit integer, got {s:?}"))
}

/// A clap value parser for a float parameter, through the engine's range.
fn float(p: &'static params::Param) -> impl Fn(&str) -> Result<f32, String> + Clone {
    move |s| p.parse(s).map(|v| v as f32)
}

/// A clap value parser for an integer parameter, through the engine's range.
fn int(p: &'static params::Param) -> impl Fn(&str) -> Result<i64, String> + Clone {
    move |s| p.parse(s).map(|v| v as i64)
}

impl SamplingArgs {
    /// The flags given, as options.
    pub fn options(&self) -> SamplingOptions {
        SamplingOptions {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        }
    }
}

/// A model's default sampling: the config file's options for it, over a built-in model's
/// card (by the name it was run with, or its configured source; none for a configured
/// path), over its GGUF's `general.sampling.*` keys.
pub fn model_sampling(
    name: &str,
    settings: Option<&ServedModel>,
    engine: &Engine,
) -> SamplingOptions {
    let unconfigured;
    let settings = match settings {
        Some(s) => s,
        None => {
            unconfigured = ServedModel {
                source: name.to_string(),
                ..Default::default()
            };
            &unconfigured
        }
    };
    settings.default_sampling(&engine.sampling)
}

/// A KV cache type for clap (`f16`, `q8_0`, `fp8`).
pub fn kv_type(s: &str) -> Result<capy_model::KvType, String> {
    capy_model::KvType::parse(s)
}

/// Speculative decoding flags shared by `run`, `generate` and `bench` (llama.cpp's names).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SpecArgs {
    /// Draft model for speculative decoding (also `-md`): stored name or .gguf path; it must
    /// share the model's vocabulary.
    #[arg(long = "draft-model")]
    pub draft_model: Option<String>,
    /// Speculation: `draft` (with --draft-model; the default when one is given) or `ngram`
    /// (prompt lookup: continuations of the longest recent n-gram match, no second model).
    #[arg(long, value_parser = spec_type)]
    pub spec_type: Option<capy_engine::SpecType>,
    /// Most tokens proposed per step, 1 to 32 [8].
    #[arg(long, value_parser = draft_count)]
    pub draft_max: Option<usize>,
    /// Fewest proposed tokens worth checking; shorter proposals are dropped [0].
    #[arg(long, value_parser = draft_count_or_zero)]
    pub draft_min: Option<usize>,
    /// The draft model stops proposing when its top token's probability falls below this,
    /// 0 to 1 [0].
    #[arg(long, value_parser = unit_float)]
    pub draft_p_min: Option<f32>,
}

fn spec_type(s: &str) -> Result<capy_engine::SpecType, String> {
    capy_engine::SpecType::parse(s.trim())
        .ok_or_else(|| format!("spec-type must be draft or ngram, got {s:?}"))
}

fn draft_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=32).contains(&n) => Ok(n),
        _ => Err(format!("must be between 1 and 32, got {s:?}")),
    }
}

fn draft_count_or_zero(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= 32 => Ok(n),
        _ => Err(format!("must be between 0 and 32, got {s:?}")),
    }
}

fn unit_float(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("must be between 0 and 1, got {s:?}")),
    }
}

impl SpecArgs {
    /// The speculation asked for: `None` when neither a draft model nor `--spec-type` is
    /// given.
    pub fn spec_type(&self) -> Option<capy_engine::SpecType> {
        self.spec_type.or(self
            .draft_model
            .as_ref()
            .map(|_| capy_engine::SpecType::Draft))
    }

    pub fn params(&self) -> capy_engine::SpecParams {
        let d = capy_engine::SpecParams::default();
        capy_engine::SpecParams {
            draft_max: self.draft_max.unwrap_or(d.draft_max),
            draft_min: self.draft_min.unwrap_or(d.draft_min),
            p_min: self.draft_p_min.unwrap_or(d.p_min),
            ..d
        }
    }

    /// Logit rows a target context needs for these settings (`n_outputs`).
    pub fn n_outputs(&self) -> usize {
        if self.spec_type().is_some() {
            self.params().draft_max + 1
        } else {
            1
        }
    }

    /// Loads the draft model (pulling a built-in one on first use) and makes the speculator
    /// for `engine`'s sessions with context `ctx`; `None` without speculation.
    ///
    /// # Errors
    /// `--spec-type draft` without a draft model, a draft that cannot be loaded, or one
    /// whose vocabulary differs.
    pub fn speculator(
        &self,
        engine: &Engine,
        ctx: &capy_engine::ContextParams,
    ) -> Result<Option<capy_engine::Speculator>> {
        let Some(ty) = self.spec_type() else {
            if self.draft_max.is_some() || self.draft_min.is_some() || self.draft_p_min.is_some() {
                return Err(anyhow!(
                    "--draft-max/--draft-min/--draft-p-min need speculation: give --draft-model \
                     (-md) or --spec-type ngram"
                ));
            }
            return Ok(None);
        };
        let p = self.params();
        if p.draft_min > p.draft_max {
            return Err(anyhow!(
                "--draft-min {} exceeds --draft-max {}: nothing would ever be checked",
                p.draft_min,
                p.draft_max
            ));
        }
        if ty == capy_engine::SpecType::Ngram && self.draft_model.is_some() {
            return Err(anyhow!(
                "--spec-type ngram uses no draft model: drop --draft-model (-md), or use \
                 --spec-type draft"
            ));
        }
        let draft = match (ty, &self.draft_model) {
            (capy_engine::SpecType::Draft, Some(name)) => {
                let path = model_path(name, true)?;
                Some(
                    Engine::load(&path)
                        .with_context(|| format!("loading the draft model {}", path.display()))?,
                )
            }
            (capy_engine::SpecType::Draft, None) => {
                return Err(anyhow!("--spec-type draft needs --draft-model (-md)"))
            }
            _ => None,
        };
        Ok(Some(engine.speculator(
            ty,
            draft.as_ref(),
            self.params(),
            ctx,
        )?))
    }
}

/// Whether two paths name the same existing file (after links and `..` are resolved).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
