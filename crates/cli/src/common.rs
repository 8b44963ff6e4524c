//! Shared CLI pieces: resolving a model argument, sampling flags, threads.

use std::path::PathBuf;

use anyhow::{Context, Result};
use capy_engine::SamplerParams;
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

/// Sampling flags shared by `run` and `generate` (llama.cpp's defaults).
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Top-p (1.0 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Tokens the repetition penalties look back over.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplerParams {
        SamplerParams {
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
