//! Shared CLI pieces: resolving a model argument, sampling flags, threads.

use std::path::PathBuf;

use anyhow::{Context, Result};
use capy_engine::{params, Engine, SamplingOptions};
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
        Err(e) => {
            Err(e).with_context(|| format!("model {arg:?} is neither a file nor in the store"))
        }
    }
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
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

/// A model's recommended sampling: a built-in model's card (by the name it was run with),
/// over its GGUF's `general.sampling.*` keys.
pub fn model_sampling(name: &str, engine: &Engine) -> SamplingOptions {
    let card = capy_store::builtin(name)
        .and_then(|b| SamplingOptions::from_pairs(b.sampling).ok())
        .unwrap_or_default();
    card.or(&engine.sampling)
}
