//! `capy serve`: the OpenAI- and Ollama-compatible server.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use capy_server::config::{config_path, Config, Overrides};

use crate::common::model_path;

/// Flags override the environment, which overrides the `--config` file.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model to serve and keep loaded (repeatable; built-in models are pulled first).
    /// Without any, every model in the store is served, loaded on its first request.
    #[arg(
        short = 'm',
        long = "model",
        env = "CAPY_MODELS",
        value_delimiter = ','
    )]
    pub models: Vec<String>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "CAPY_HOST")]
    pub host: Option<String>,
    /// Port to listen on [default: 11434].
    #[arg(long, env = "CAPY_PORT")]
    pub port: Option<u16>,
    /// Threads of each model's engine (by default, all cores).
    #[arg(short = 't', long, env = "CAPY_THREADS")]
    pub threads: Option<usize>,
    /// TOML file with any of these settings (snake_case keys, e.g. memory_budget = "4GiB")
    /// and `[models.NAME]` tables [default: config.toml in CAPY_HOME, if there].
    #[arg(long, env = "CAPY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Idle time before a model is unloaded (5m, 30s, 1h; -1 = never) [default: 5m].
    #[arg(long, env = "CAPY_KEEP_ALIVE", allow_hyphen_values = true)]
    pub keep_alive: Option<String>,
    /// Most models loaded at once [default: 3].
    #[arg(long, env = "CAPY_MAX_LOADED_MODELS")]
    pub max_loaded_models: Option<usize>,
    /// Memory for the weights and KV caches of all loaded models (8GiB, 512MiB)
    /// [default: no limit].
    #[arg(long, env = "CAPY_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,
    /// Most positions of one sequence (prompt + answer) [default: the model's trained
    /// context].
    #[arg(short = 'c', long, env = "CAPY_CTX_SIZE")]
    pub ctx_size: Option<usize>,
    /// Most sequences each model runs at once [default: 16].
    #[arg(long, env = "CAPY_PARALLEL")]
    pub parallel: Option<usize>,
    /// Bytes of each model's KV cache, a pool of blocks its sequences share (2GiB, 512MiB)
    /// [default: room for --parallel sequences at full context, at most a quarter of the
    /// memory budget, or without one of the machine's memory over --max-loaded-models].
    #[arg(long, env = "CAPY_KV_CACHE_SIZE")]
    pub kv_cache_size: Option<String>,
    /// Element type of the cached keys (also `-ctk`): f16, q8_0 or fp8 (0.56x the memory of
    /// f16) [default: f16].
    #[arg(long = "cache-type-k", alias = "ctk", env = "CAPY_CACHE_TYPE_K")]
    pub cache_type_k: Option<String>,
    /// Element type of the cached values (also `-ctv`): f16, q8_0 or fp8 [default: f16].
    #[arg(long = "cache-type-v", alias = "ctv", env = "CAPY_CACHE_TYPE_V")]
    pub cache_type_v: Option<String>,
    /// Keep every position in sliding-window layers (Gemma 3's local layers) instead of
    /// only their window: more memory, but prefix hits and rollbacks always find them.
    #[arg(long, env = "CAPY_SWA_FULL", value_parser = clap::builder::FalseyValueParser::new())]
    pub swa_full: bool,
    /// Most tokens in one forward pass [default: 512].
    #[arg(short = 'b', long, env = "CAPY_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Draft model for speculative decoding of every served model that has none of its own
    /// (also `-md`; stored name or .gguf path; models with another vocabulary are served
    /// without it) [default: none].
    #[arg(long = "draft-model", env = "CAPY_DRAFT_MODEL")]
    pub draft_model: Option<String>,
    /// Speculation: `draft` (the default with a draft model) or `ngram` (prompt lookup).
    #[arg(long, env = "CAPY_SPEC_TYPE")]
    pub spec_type: Option<String>,
    /// Most tokens guessed per step, 1 to 32 [8].
    #[arg(long, env = "CAPY_DRAFT_MAX")]
    pub draft_max: Option<usize>,
    /// Fewest guessed tokens worth checking [0].
    #[arg(long, env = "CAPY_DRAFT_MIN")]
    pub draft_min: Option<usize>,
    /// A draft model stops guessing below this top-token probability, 0 to 1 [0].
    #[arg(long, env = "CAPY_DRAFT_P_MIN")]
    pub draft_p_min: Option<f64>,
    /// Requests that may wait per model before 429 [default: 64].
    #[arg(long, env = "CAPY_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Largest request body; larger ones get 413 (16MiB, 512KiB) [default: 16MiB].
    #[arg(long, env = "CAPY_MAX_BODY_SIZE")]
    pub max_body_size: Option<String>,
    /// Open connections at most; more are answered 503 [default: 512].
    #[arg(long, env = "CAPY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Time to send a request's headers (and an idle keep-alive connection's lifetime), and
    /// separately its body [default: 30s].
    #[arg(long, env = "CAPY_READ_TIMEOUT")]
    pub read_timeout: Option<String>,
    /// How long Ctrl-C or SIGTERM waits for requests in flight before closing them
    /// [default: 30s].
    #[arg(long, env = "CAPY_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<String>,
    /// Refuse `/api/pull` (models are then added with `capy pull` only).
    #[arg(long, env = "CAPY_NO_API_PULL", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_api_pull: bool,
    /// Hosts pulls may reach and be redirected to, subdomains included (comma-separated)
    /// [default: any].
    #[arg(long, env = "CAPY_PULL_HOSTS", value_delimiter = ',')]
    pub pull_hosts: Vec<String>,
    /// Most bytes one pull may download (20GiB) [default: the free disk space].
    #[arg(long, env = "CAPY_MAX_PULL_SIZE")]
    pub max_pull_size: Option<String>,
    /// How long a request waits for busy models to make room for its model before 503
    /// [default: 5m].
    #[arg(long, env = "CAPY_LOAD_TIMEOUT")]
    pub load_timeout: Option<String>,
    /// Database of API keys and usage: sqlite:PATH or postgres://USER@HOST/DB (shared by
    /// replicas) [default: capy.db in CAPY_HOME].
    #[arg(long, env = "CAPY_DATABASE_URL")]
    pub database_url: Option<String>,
    /// When requests need an API key: auto (once `capy keys create` made one), required,
    /// off [default: auto].
    #[arg(long, env = "CAPY_AUTH")]
    pub auth: Option<String>,
    /// Keep the per-minute limits in the PostgreSQL database, so every replica sharing it
    /// enforces them together.
    #[arg(long, env = "CAPY_SHARED_LIMITS", value_parser = clap::builder::FalseyValueParser::new())]
    pub shared_limits: bool,
    /// This server's name in usage records [default: HOSTNAME:PORT].
    #[arg(long, env = "CAPY_REPLICA")]
    pub replica: Option<String>,
    /// Record no usage rows (with `--auth off` as well, no database is opened at all).
    #[arg(long, env = "CAPY_NO_USAGE", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_usage: bool,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    // the server's log (errors with their request ids) on stderr; CAPY_LOG=debug for more
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // colours only on a terminal, not in log files
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let mut cfg = match config_path(a.config.as_deref(), &capy_store::Store::open_default().root) {
        Some(p) => Config::from_file(&p).map_err(|e| anyhow!(e))?,
        None => Config::default(),
    };
    // CAPY_HOST may carry a port or be a URL (as `capy ps` reads it, and OLLAMA_HOST works)
    let (host, port) = match a.host.as_deref().map(split_host) {
        Some((h, p)) => (Some(h), a.port.or(p)),
        None => (None, a.port),
    };
    cfg.apply(Overrides {
        host,
        port,
        threads: a.threads,
        models: a.models,
        keep_alive: a.keep_alive,
        max_loaded_models: a.max_loaded_models,
        memory_budget: a.memory_budget,
        ctx_size: a.ctx_size,
        parallel: a.parallel,
        kv_cache_size: a.kv_cache_size,
        cache_type_k: a.cache_type_k,
        cache_type_v: a.cache_type_v,
        swa_full: a.swa_full.then_some(true),
        batch_size: a.batch_size,
        draft_model: a.draft_model,
        spec_type: a.spec_type,
        draft_max: a.draft_max,
        draft_min: a.draft_min,
        draft_p_min: a.draft_p_min,
        max_queue: a.max_queue,
        max_body_size: a.max_body_size,
        max_connections: a.max_connections,
        read_timeout: a.read_timeout,
        shutdown_timeout: a.shutdown_timeout,
        api_pull: a.no_api_pull.then_some(false),
        pull_hosts: a.pull_hosts,
        max_pull_size: a.max_pull_size,
        load_timeout: a.load_timeout,
        database_url: a.database_url,
        auth: a.auth,
        shared_limits: a.shared_limits.then_some(true),
        replica: a.replica,
        usage: a.no_usage.then_some(false),
    });
    let checked = cfg.validate().map_err(|e| anyhow!(e))?;
    // the configured models must be on disk before the server starts: pull built-ins now
    for m in checked.models.iter().filter(|m| !m.is_path) {
        model_path(&m.source, true).with_context(|| format!("model {:?}", m.name))?;
    }
    // and their draft models
    for m in &checked.models {
        if let Some(d) = m.spec.or(&checked.spec).draft_model {
            if !std::path::Path::new(&d).is_file()
                && capy_server::config::find_model(&checked.models, &d).is_none()
            {
                model_path(&d, true).with_context(|| format!("draft model {d:?}"))?;
            }
        }
    }
    capy_server::run(cfg, capy_store::Store::open_default()).map_err(|e| anyhow!(e))
}

/// `host`, `host:port` or `http://host:port/` -> (host, port if given).
fn split_host(s: &str) -> (String, Option<u16>) {
    let s = s.trim();
    let s = s.split_once("://").map_or(s, |(_, rest)| rest);
    let s = s.trim_end_matches('/');
    match s.rsplit_once(':') {
        // an IPv6 address has colons of its own: only `[addr]:port` carries a port
        Some((h, p)) if (!h.contains(':') || h.ends_with(']')) && p.parse::<u16>().is_ok() => {
            (h.trim_matches(['[', ']']).to_string(), p.parse().ok())
        }
        _ => (s.trim_matches(['[', ']']).to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::split_host;

    #[test]
    fn capy_host_takes_a_host_a_port_or_a_url() {
        assert_eq!(split_host("127.0.0.1"), ("127.0.0.1".into(), None));
        assert_eq!(
            split_host("127.0.0.1:18081"),
            ("127.0.0.1".into(), Some(18081))
        );
        assert_eq!(
            split_host("http://0.0.0.0:8080/"),
            ("0.0.0.0".into(), Some(8080))
        );
        assert_eq!(split_host("[::1]:9000"), ("::1".into(), Some(9000)));
        assert_eq!(split_host("::1"), ("::1".into(), None));
    }
}
