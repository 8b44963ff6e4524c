//! Server settings: defaults, then a TOML file, then environment variables and flags (the
//! CLI merges those last two and applies them over the file with [`Config::apply`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capy_engine::{SamplingOptions, SpecParams, SpecType};
use capy_model::KvType;
use serde::Deserialize;

/// How long a model stays loaded after its last request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAlive {
    For(Duration),
    Forever,
}

impl KeepAlive {
    /// The longest finite keep-alive, ten years; longer is an error (use -1 for forever).
    pub const MAX_SECS: f64 = 10.0 * 365.0 * 86_400.0;

    /// Ollama's forms: a duration string ("5m", "1h30m", "90s", "500ms"), a number of
    /// seconds, "0" to unload at once, anything negative to keep forever.
    ///
    /// # Errors
    /// Not a duration, not finite ("NaN", "inf"), or longer than [`KeepAlive::MAX_SECS`].
    pub fn parse(s: &str) -> Result<KeepAlive, String> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<f64>() {
            return KeepAlive::from_secs(secs);
        }
        if s.starts_with('-') && parse_duration(&s[1..]).is_some() {
            return Ok(KeepAlive::Forever);
        }
        parse_duration(s)
            .ok_or_else(|| format!("bad duration {s:?} (examples: 5m, 30s, 1h, 0, -1)"))
            .and_then(KeepAlive::from_secs)
    }

    /// A number of seconds: negative keeps forever.
    ///
    /// # Errors
    /// Not finite, or longer than [`KeepAlive::MAX_SECS`].
    pub fn from_secs(secs: f64) -> Result<KeepAlive, String> {
        if !secs.is_finite() {
            return Err(format!("keep_alive must be a finite duration, got {secs}"));
        }
        if secs < 0.0 {
            return Ok(KeepAlive::Forever);
        }
        if secs > Self::MAX_SECS {
            return Err(format!(
                "keep_alive of {secs} s is longer than ten years; use -1 to keep the model loaded"
            ));
        }
        Ok(KeepAlive::For(Duration::from_secs_f64(secs)))
    }

    /// From a JSON value: a string as [`KeepAlive::parse`], or a number of seconds.
    ///
    /// # Errors
    /// As [`KeepAlive::parse`], or a value that is neither a string nor a number.
    pub fn from_json(v: &serde_json::Value) -> Result<KeepAlive, String> {
        match v {
            serde_json::Value::String(s) => KeepAlive::parse(s),
            serde_json::Value::Number(n) => KeepAlive::from_secs(n.as_f64().unwrap_or(f64::NAN)),
            _ => Err(format!("keep_alive must be a duration or seconds, got {v}")),
        }
    }
}

/// "1h30m", "5m", "90s", "250ms", in seconds.
fn parse_duration(s: &str) -> Option<f64> {
    let mut total = 0.0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[u..];
    }
    Some(total).filter(|t| t.is_finite())
}

/// "8GiB", "512MiB", "2GB", "1500000000".
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let n = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let value: f64 = t[..n]
        .parse()
        .map_err(|_| format!("bad size {s:?} (examples: 8GiB, 512MiB, 2GB)"))?;
    let scale = match t[n..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("bad size unit {u:?} in {s:?}")),
    };
    Ok((value * scale) as u64)
}

/// Everything `capy serve` can be told.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// Threads of each model's engine.
    pub threads: usize,
    /// The models served: `models = ["a", "b"]` (names, loaded at start and kept loaded)
    /// or `[models.NAME]` tables with each model's settings ([`ModelConfig`]). When empty,
    /// every model in the store is served, loaded on its first request.
    #[serde(deserialize_with = "list_or_tables")]
    pub models: Vec<ModelEntry>,
    /// Default idle time before a model is unloaded ("5m", or seconds; -1 never).
    #[serde(deserialize_with = "duration_text")]
    pub keep_alive: String,
    /// Most models loaded at once.
    pub max_loaded_models: usize,
    /// Bytes that the weights and KV caches of all loaded models may take ("8GiB");
    /// empty means no limit.
    pub memory_budget: String,
    /// Most positions of one sequence; 0: the model's trained context.
    pub ctx_size: usize,
    /// Most sequences each model runs at once.
    pub parallel: usize,
    /// Bytes of each model's KV cache pool, shared by its sequences ("2GiB" or a number of
    /// bytes); empty: room
    /// for `parallel` sequences at full context, at most a quarter of the memory budget (or,
    /// without one, of the machine's memory over `max_loaded_models`).
    #[serde(deserialize_with = "size_text")]
    pub kv_cache_size: String,
    /// Element type of the cached keys: `f16`, `q8_0` or `fp8` (llama.cpp's `-ctk`).
    pub cache_type_k: String,
    /// Element type of the cached values (`-ctv`).
    pub cache_type_v: String,
    /// Keep every position in sliding-window layers too (llama.cpp's `--swa-full`); by
    /// default they keep only their window.
    pub swa_full: bool,
    /// Most tokens in one forward pass.
    pub batch_size: usize,
    /// Speculative decoding for every served model without its own `draft_model` /
    /// `spec_type`: a draft model (stored name or .gguf path) sharing the models'
    /// vocabulary; a model whose vocabulary differs is served without it (logged).
    pub draft_model: String,
    /// `draft` (the default with a draft model) or `ngram` (prompt lookup, no second model).
    pub spec_type: String,
    /// Most tokens guessed per step, 1 to 32.
    pub draft_max: usize,
    /// Fewest guessed tokens worth checking, 0 to 32.
    pub draft_min: usize,
    /// A draft model stops guessing when its top token's probability falls below this.
    pub draft_p_min: f64,
    /// Requests that may wait per model; more get 429.
    pub max_queue: usize,
    /// Largest request body ("16MiB"); larger ones get 413.
    pub max_body_size: String,
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (also how long an idle keep-alive
    /// connection stays open) and, separately, its body ("30s").
    pub read_timeout: String,
    /// How long a shutdown waits for requests in flight before closing them ("30s").
    pub shutdown_timeout: String,
    /// Whether clients may pull models through `/api/pull`.
    pub api_pull: bool,
    /// Hosts pulls may reach (and be redirected to), subdomains included; empty: any.
    pub pull_hosts: Vec<String>,
    /// Most bytes one pull may download ("20GiB"); empty: the free disk space.
    pub max_pull_size: String,
    /// How long a request waits for a busy model to make room for its own ("5m").
    pub load_timeout: String,
    /// Database of API keys and usage records: `sqlite:PATH` or `postgres://USER@HOST/DB`;
    /// empty: `capy.db` in CAPY_HOME.
    pub database_url: String,
    /// When requests need an API key: `auto` (once any key exists), `required` or `off`.
    pub auth: String,
    /// Keep the per-minute limits in the (PostgreSQL) database, so replicas share them.
    pub shared_limits: bool,
    /// This server's name in usage records; empty: the host name and port.
    pub replica: String,
    /// Record one usage row per generation request.
    pub usage: bool,
    /// Virtual models (`[virtual.NAME]`): routers and ensembles over the served models.
    #[serde(rename = "virtual")]
    pub virtuals: BTreeMap<String, crate::virtuals::VirtualConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "127.0.0.1".into(),
            port: 11434,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            models: Vec::new(),
            keep_alive: "5m".into(),
            max_loaded_models: 3,
            memory_budget: String::new(),
            ctx_size: 0,
            parallel: 16,
            kv_cache_size: String::new(),
            cache_type_k: "f16".into(),
            cache_type_v: "f16".into(),
            swa_full: false,
            batch_size: 512,
            draft_model: String::new(),
            spec_type: String::new(),
            draft_max: 8,
            draft_min: 0,
            draft_p_min: 0.0,
            max_queue: 64,
            max_body_size: "16MiB".into(),
            max_connections: 512,
            read_timeout: "30s".into(),
            shutdown_timeout: "30s".into(),
            api_pull: true,
            pull_hosts: Vec::new(),
            max_pull_size: String::new(),
            load_timeout: "5m".into(),
            database_url: String::new(),
            auth: "auto".into(),
            shared_limits: false,
            replica: String::new(),
            usage: true,
            virtuals: BTreeMap::new(),
        }
    }
}

/// Settings given on the command line or in the environment; `None` leaves the file's
/// (or the default) value.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub threads: Option<usize>,
    pub models: Vec<String>,
    pub keep_alive: Option<String>,
    pub max_loaded_models: Option<usize>,
    pub memory_budget: Option<String>,
    pub ctx_size: Option<usize>,
    pub parallel: Option<usize>,
    pub kv_cache_size: Option<String>,
    pub cache_type_k: Option<String>,
    pub cache_type_v: Option<String>,
    pub swa_full: Option<bool>,
    pub batch_size: Option<usize>,
    pub draft_model: Option<String>,
    pub spec_type: Option<String>,
    pub draft_max: Option<usize>,
    pub draft_min: Option<usize>,
    pub draft_p_min: Option<f64>,
    pub max_queue: Option<usize>,
    pub max_body_size: Option<String>,
    pub max_connections: Option<usize>,
    pub read_timeout: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub api_pull: Option<bool>,
    pub pull_hosts: Vec<String>,
    pub max_pull_size: Option<String>,
    pub load_timeout: Option<String>,
    pub database_url: Option<String>,
    pub auth: Option<String>,
    pub shared_limits: Option<bool>,
    pub replica: Option<String>,
    pub usage: Option<bool>,
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn apply(&mut self, o: Overrides) {
        fn set<T>(dst: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *dst = v;
            }
        }
        set(&mut self.host, o.host);
        set(&mut self.port, o.port);
        set(&mut self.threads, o.threads);
        if !o.models.is_empty() {
            // `-m NAME` serves NAME with the file's settings for it, if it has any
            let mut from_file = std::mem::take(&mut self.models);
            self.models = o
                .models
                .into_iter()
                .map(|m| {
                    let canonical = store_name(&m);
                    match from_file.iter().position(|e| {
                        e.name == m
                            || e.config.aliases.contains(&m)
                            || store_name(&e.name) == canonical
                    }) {
                        Some(i) => from_file.remove(i),
                        None => ModelEntry {
                            name: m,
                            config: ModelConfig::default(),
                        },
                    }
                })
                .collect();
        }
        set(&mut self.keep_alive, o.keep_alive);
        set(&mut self.max_loaded_models, o.max_loaded_models);
        set(&mut self.memory_budget, o.memory_budget);
        set(&mut self.ctx_size, o.ctx_size);
        set(&mut self.parallel, o.parallel);
        set(&mut self.kv_cache_size, o.kv_cache_size);
        set(&mut self.cache_type_k, o.cache_type_k);
        set(&mut self.cache_type_v, o.cache_type_v);
        set(&mut self.swa_full, o.swa_full);
        set(&mut self.batch_size, o.batch_size);
        set(&mut self.draft_model, o.draft_model);
        set(&mut self.spec_type, o.spec_type);
        set(&mut self.draft_max, o.draft_max);
        set(&mut self.draft_min, o.draft_min);
        set(&mut self.draft_p_min, o.draft_p_min);
        set(&mut self.max_queue, o.max_queue);
        set(&mut self.max_body_size, o.max_body_size);
        set(&mut self.max_connections, o.max_connections);
        set(&mut self.read_timeout, o.read_timeout);
        set(&mut self.shutdown_timeout, o.shutdown_timeout);
        set(&mut self.api_pull, o.api_pull);
        if !o.pull_hosts.is_empty() {
            self.pull_hosts = o.pull_hosts;
        }
        set(&mut self.max_pull_size, o.max_pull_size);
        set(&mut self.load_timeout, o.load_timeout);
        set(&mut self.database_url, o.database_url);
        set(&mut self.auth, o.auth);
        set(&mut self.shared_limits, o.shared_limits);
        set(&mut self.replica, o.replica);
        set(&mut self.usage, o.usage);
    }

    /// Checks the values and turns the strings into numbers.
    pub fn validate(&self) -> Result<Checked, String> {
        let keep_alive = KeepAlive::parse(&self.keep_alive)?;
        let memory_budget = if self.memory_budget.trim().is_empty() {
            None
        } else {
            Some(parse_bytes(&self.memory_budget)?)
        };
        for (name, v, max) in [
            ("threads", self.threads, 1024),
            ("max_loaded_models", self.max_loaded_models, 1024),
            ("parallel", self.parallel, 4096),
            ("batch_size", self.batch_size, 1 << 20),
            ("max_queue", self.max_queue, 1 << 20),
            ("max_connections", self.max_connections, 1 << 20),
        ] {
            if v == 0 || v > max {
                return Err(format!("{name} must be between 1 and {max}, got {v}"));
            }
        }
        if self.ctx_size != 0 && !(16..=1 << 24).contains(&self.ctx_size) {
            return Err(format!(
                "ctx_size must be between 16 and {} (or 0: the model's), got {}",
                1 << 24,
                self.ctx_size
            ));
        }
        let kv_cache_size = kv_size("kv_cache_size", &self.kv_cache_size)?;
        let cache_type = |name: &str, v: &str| KvType::parse(v).map_err(|e| format!("{name}: {e}"));
        let cache_type_k = cache_type("cache_type_k", &self.cache_type_k)?;
        let cache_type_v = cache_type("cache_type_v", &self.cache_type_v)?;
        let max_body = parse_bytes(&self.max_body_size)?;
        if max_body < 1024 {
            return Err(format!(
                "max_body_size must be at least 1KiB, got {max_body} bytes"
            ));
        }
        let duration = |name: &str, s: &str| match KeepAlive::parse(s) {
            Ok(KeepAlive::For(d)) if !d.is_zero() => Ok(d),
            _ => Err(format!(
                "{name} must be a positive duration such as 30s, got {s:?}"
            )),
        };
        let max_pull = if self.max_pull_size.trim().is_empty() {
            None
        } else {
            Some(parse_bytes(&self.max_pull_size)?)
        };
        let spec = SpecSettings {
            draft_model: Some(self.draft_model.trim().to_string()).filter(|d| !d.is_empty()),
            spec_type: spec_type("spec_type", Some(self.spec_type.as_str()))?,
            draft_max: draft_count("draft_max", Some(self.draft_max), 1)?,
            draft_min: draft_count("draft_min", Some(self.draft_min), 0)?,
            draft_p_min: p_min("draft_p_min", Some(self.draft_p_min))?,
        };
        let mut models: Vec<ServedModel> = Vec::with_capacity(self.models.len());
        for e in &self.models {
            let m = e.check()?;
            for n in m.names() {
                if let Some(other) = models.iter().find(|o| o.names().any(|x| x == n)) {
                    return Err(format!(
                        "models: the name {n:?} is given to both {:?} and {:?}",
                        other.name, m.name
                    ));
                }
            }
            m.spec
                .or(&spec)
                .check(&m.spec, &format!("models.{}: ", m.key))?;
            models.push(m);
        }
        spec.check(&spec, "")?;
        let virtuals = crate::virtuals::check_all(
            &self.virtuals,
            &|n| find_model(&models, n).is_some(),
            self.max_queue,
        )?;
        Ok(Checked {
            virtuals,
            models,
            spec,
            keep_alive,
            memory_budget,
            kv_cache_size,
            cache_type_k,
            cache_type_v,
            max_pull,
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
            read_timeout: duration("read_timeout", &self.read_timeout)?,
            shutdown_timeout: duration("shutdown_timeout", &self.shutdown_timeout)?,
            load_timeout: duration("load_timeout", &self.load_timeout)?,
            auth: self.auth.parse()?,
            database_url: self.database_url.trim().to_string(),
            shared_limits: self.shared_limits,
            replica: self.replica.trim().to_string(),
            usage: self.usage,
        })
        .and_then(|c| {
            if c.shared_limits && !c.database_url.starts_with("postgres") {
                return Err(
                    "shared_limits needs database_url = postgres://... (the replicas' database)"
                        .to_string(),
                );
            }
            if !c.database_url.is_empty() {
                capy_db::Backend::of(&c.database_url).map_err(|e| e.to_string())?;
            }
            Ok(c)
        })
    }
}

/// The parsed forms of [`Config`]'s strings.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The served models with their checked settings, in the file's (or flags') order.
    pub models: Vec<ServedModel>,
    /// The virtual models, by name.
    pub virtuals: Vec<crate::virtuals::VirtualModel>,
    /// The server-wide speculation settings (a model's own take precedence).
    pub spec: SpecSettings,
    pub keep_alive: KeepAlive,
    pub memory_budget: Option<u64>,
    /// Bytes of each model's KV cache pool; `None`: derived per model.
    pub kv_cache_size: Option<u64>,
    pub cache_type_k: KvType,
    pub cache_type_v: KvType,
    /// Bytes one pull may download; `None`: the free disk.
    pub max_pull: Option<u64>,
    /// Bytes.
    pub max_body: usize,
    pub read_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub load_timeout: Duration,
    pub auth: crate::gateway::AuthMode,
    /// Empty: the default SQLite file.
    pub database_url: String,
    pub shared_limits: bool,
    pub replica: String,
    pub usage: bool,
}

impl Checked {
    /// The gateway's settings (the default database is `capy.db` in `home`); `None` when
    /// there is nothing for it to do (`auth = "off"` and `usage = false`): no database.
    pub fn gateway(&self, home: &Path, port: u16) -> Option<crate::gateway::GatewayConfig> {
        if self.auth == crate::gateway::AuthMode::Off && !self.usage {
            return None;
        }
        let replica = if self.replica.is_empty() {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into());
            format!("{host}:{port}")
        } else {
            self.replica.clone()
        };
        Some(crate::gateway::GatewayConfig {
            database_url: if self.database_url.is_empty() {
                capy_db::default_url(home)
            } else {
                self.database_url.clone()
            },
            auth: self.auth,
            replica,
            shared_limits: self.shared_limits,
            usage: self.usage,
        })
    }
}

/// A served model as the config file gives it: its name (a `[models.NAME]` table's key, or
/// an entry of a `models = [...]` list) and settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEntry {
    pub name: String,
    pub config: ModelConfig,
}

/// One model's settings in the config file (`[models.NAME]`): what an Ollama Modelfile's
/// `FROM`, `PARAMETER` and `SYSTEM` give, and what a multi-model deployment needs. Unset
/// ones take the server's settings; request fields and `capy run` flags still win.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A .gguf file served under this name.
    pub path: Option<String>,
    /// A built-in name, stored name or URL served under this name (built-ins and URLs are
    /// pulled at start when missing); without `path` or `source`, the name itself.
    pub source: Option<String>,
    /// Most positions of one of this model's sequences.
    pub ctx_size: Option<usize>,
    /// Most sequences this model runs at once.
    pub parallel: Option<usize>,
    /// Bytes of this model's KV cache pool ("1GiB", or a number of bytes).
    #[serde(deserialize_with = "some_size_text")]
    pub kv_cache_size: Option<String>,
    /// Element types of this model's cached keys and values (`f16`, `q8_0`, `fp8`).
    pub cache_type_k: Option<String>,
    pub cache_type_v: Option<String>,
    /// Loaded at start and kept loaded (the default); `false`: loaded on first request and
    /// unloaded after its keep-alive.
    pub warm: Option<bool>,
    /// Idle time before this model is unloaded, when not warm ("10m", or seconds; -1 never).
    #[serde(deserialize_with = "some_duration_text")]
    pub keep_alive: Option<String>,
    /// System message for chats that bring none (Ollama's `SYSTEM`).
    pub system: Option<String>,
    /// More names clients may use for this model.
    pub aliases: Vec<String>,
    /// Speculative decoding for this model: a draft model (stored name or .gguf path) with
    /// the same vocabulary, the proposer (`draft` or `ngram`) and its settings.
    pub draft_model: Option<String>,
    pub spec_type: Option<String>,
    pub draft_max: Option<usize>,
    pub draft_min: Option<usize>,
    pub draft_p_min: Option<f64>,
    /// Default sampling settings by request field name (`temperature`, `top_k`, `top_p`,
    /// `min_p`, `repeat_penalty`, `repeat_last_n`, `presence_penalty`, `frequency_penalty`,
    /// `seed`), as Ollama's `PARAMETER`; over the model's own recommendations.
    pub options: BTreeMap<String, toml::Value>,
}

/// A served model's checked settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServedModel {
    /// The name clients use (a file's stem for a .gguf path given in a list).
    pub name: String,
    /// The name as the config file or `-m` wrote it (a path, `smollm2`, a table's key).
    pub key: String,
    /// A .gguf path, or a built-in name, stored name or URL for the store.
    pub source: String,
    /// Whether `source` is a file path (`path =` or a listed .gguf).
    pub is_path: bool,
    pub aliases: Vec<String>,
    pub warm: bool,
    pub ctx_size: Option<usize>,
    pub parallel: Option<usize>,
    pub kv_cache_size: Option<u64>,
    pub cache_type_k: Option<KvType>,
    pub cache_type_v: Option<KvType>,
    pub keep_alive: Option<KeepAlive>,
    pub system: Option<String>,
    pub sampling: SamplingOptions,
    /// Its own speculation settings, over the server's.
    pub spec: SpecSettings,
}

impl ServedModel {
    /// A listed model with no settings (a `-m` flag, or a test's warm set).
    pub fn named(name: &str) -> ServedModel {
        ModelEntry {
            name: name.to_string(),
            config: ModelConfig::default(),
        }
        .check()
        .unwrap_or_else(|_| ServedModel {
            name: name.to_string(),
            key: name.to_string(),
            source: name.to_string(),
            warm: true,
            ..Default::default()
        })
    }

    /// Whether a client's name means this model: its name, an alias or the name as the
    /// config wrote it (a trailing `:latest` ignored). A table's `source` is not one of its
    /// names: two tables may serve one file with different settings.
    pub fn answers_to(&self, name: &str) -> bool {
        let name = name.trim();
        let name = name.strip_suffix(":latest").unwrap_or(name);
        self.name == name || self.key == name || self.aliases.iter().any(|a| a == name)
    }

    /// Its sampling for the fields a request leaves out: the config file's options, over a
    /// built-in model's card (when its source is a built-in; a file given by path has none,
    /// whatever it is called), over `gguf`, the file's `general.sampling.*`.
    pub fn default_sampling(&self, gguf: &SamplingOptions) -> SamplingOptions {
        let card = (!self.is_path)
            .then(|| capy_store::builtin(&self.source))
            .flatten()
            .and_then(|b| SamplingOptions::from_pairs(b.sampling).ok())
            .unwrap_or_default();
        self.sampling.or(&card.or(gguf))
    }

    /// The names this model may be asked for by: its name, the name as written, aliases.
    fn names(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.name)
            .chain(std::iter::once(&self.key))
            .chain(&self.aliases)
    }
}

/// The configured model a client's name means: one that [`ServedModel::answers_to`] it,
/// else one named as the store names it (a built-in's alias such as `smollm2` means the
/// table `[models.smollm2-135m]`).
pub fn find_model<'a>(models: &'a [ServedModel], name: &str) -> Option<&'a ServedModel> {
    models.iter().find(|m| m.answers_to(name)).or_else(|| {
        let canonical = store_name(name.trim().strip_suffix(":latest").unwrap_or(name.trim()));
        models
            .iter()
            .find(|m| m.name == canonical || store_name(&m.key) == canonical)
    })
}

/// A name as the store knows it (`smollm2` -> `smollm2-135m`), or as given.
fn store_name(name: &str) -> String {
    capy_store::ModelRef::parse(name)
        .map(|r| r.store_name())
        .unwrap_or_else(|_| name.to_string())
}

impl ModelEntry {
    /// Checks the settings (ranges, durations, option names and values) and gives their
    /// parsed form; errors name the setting (`models.NAME.options.temperature`).
    ///
    /// # Errors
    /// A bad name, both `path` and `source`, a missing `path`, a value out of range.
    pub fn check(&self) -> Result<ServedModel, String> {
        let c = &self.config;
        let at = |field: &str| format!("models.{}.{field}", self.name);
        if self.name.trim().is_empty()
            || self.name.chars().any(char::is_whitespace)
            || self.name.ends_with(":latest")
        {
            return Err(format!(
                "models: {:?} is not a model name (not empty, no spaces, no :latest tag)",
                self.name
            ));
        }
        let (source, is_path) = match (&c.path, &c.source) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{}: give path (a .gguf file) or source (a model to pull or a stored name), not both",
                    at("path")
                ))
            }
            (Some(p), None) => {
                if !Path::new(p).is_file() {
                    return Err(format!("{}: no such file {p:?}", at("path")));
                }
                (p.clone(), true)
            }
            // a file given as the source is served as `path` would be (and checked so)
            (None, Some(s)) => (s.clone(), Path::new(s).is_file()),
            // a listed .gguf path serves the file under its stem
            (None, None) => (
                self.name.clone(),
                self.name.ends_with(".gguf") && Path::new(&self.name).is_file(),
            ),
        };
        let name = if is_path && c.path.is_none() && c.source.is_none() {
            Path::new(&self.name)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.name.clone())
        } else if c.source.is_none() && c.path.is_none() {
            // a built-in or stored name as the store knows it (`smollm2` -> `smollm2-135m`)
            store_name(&self.name)
        } else {
            self.name.clone()
        };
        for a in &c.aliases {
            if a.trim().is_empty() || a.chars().any(char::is_whitespace) || a.ends_with(":latest") {
                return Err(format!("{}: {a:?} is not a name", at("aliases")));
            }
        }
        let count = |field: &str, v: Option<usize>, min: usize, max: usize| match v {
            Some(v) if v < min || v > max => Err(format!(
                "{} must be between {min} and {max}, got {v}",
                at(field)
            )),
            _ => Ok(v),
        };
        let keep_alive = c
            .keep_alive
            .as_deref()
            .map(|k| KeepAlive::parse(k).map_err(|e| format!("{}: {e}", at("keep_alive"))))
            .transpose()?;
        let mut sampling = SamplingOptions::default();
        for (k, v) in &c.options {
            let field = at(&format!("options.{k}"));
            let n = match v {
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => {
                    return Err(format!(
                        "{field} must be a number, got {}",
                        article(v.type_str())
                    ))
                }
            };
            sampling
                .set_text(k, &n)
                .map_err(|e| format!("{field}: {e}"))?;
        }
        Ok(ServedModel {
            name,
            key: self.name.clone(),
            source,
            is_path,
            aliases: c.aliases.clone(),
            warm: c.warm.unwrap_or(true),
            // 0: the model's trained context, as the server's ctx_size
            ctx_size: match c.ctx_size {
                Some(0) => None,
                v => count("ctx_size", v, 16, 1 << 24)?,
            },
            parallel: count("parallel", c.parallel, 1, 4096)?,
            kv_cache_size: c
                .kv_cache_size
                .as_deref()
                .map(|v| kv_size(&at("kv_cache_size"), v))
                .transpose()?
                .flatten(),
            cache_type_k: c
                .cache_type_k
                .as_deref()
                .map(|v| KvType::parse(v).map_err(|e| format!("{}: {e}", at("cache_type_k"))))
                .transpose()?,
            cache_type_v: c
                .cache_type_v
                .as_deref()
                .map(|v| KvType::parse(v).map_err(|e| format!("{}: {e}", at("cache_type_v"))))
                .transpose()?,
            keep_alive,
            system: c.system.clone(),
            sampling,
            spec: SpecSettings {
                draft_model: c
                    .draft_model
                    .as_deref()
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(String::from),
                spec_type: spec_type(&at("spec_type"), c.spec_type.as_deref())?,
                draft_max: draft_count(&at("draft_max"), c.draft_max, 1)?,
                draft_min: draft_count(&at("draft_min"), c.draft_min, 0)?,
                draft_p_min: p_min(&at("draft_p_min"), c.draft_p_min)?,
            },
        })
    }
}

/// Speculative decoding settings (server-wide, or one model's); `None`: not given here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecSettings {
    /// A draft model: stored name, built-in name or .gguf path.
    pub draft_model: Option<String>,
    pub spec_type: Option<SpecType>,
    pub draft_max: Option<usize>,
    pub draft_min: Option<usize>,
    pub draft_p_min: Option<f32>,
}

impl SpecSettings {
    /// These settings over `base` (the server's).
    pub fn or(&self, base: &SpecSettings) -> SpecSettings {
        SpecSettings {
            draft_model: self
                .draft_model
                .clone()
                .or_else(|| base.draft_model.clone()),
            spec_type: self.spec_type.or(base.spec_type),
            draft_max: self.draft_max.or(base.draft_max),
            draft_min: self.draft_min.or(base.draft_min),
            draft_p_min: self.draft_p_min.or(base.draft_p_min),
        }
    }

    /// The speculation these settings ask for: `ngram`, or `draft` with a draft model (the
    /// default when one is given); `None` for none.
    /// Settings that can never take effect: fewer guesses allowed than the least worth
    /// checking (of these settings, merged), or a draft model given together with n-gram
    /// lookup in the same place (`own`: these settings before merging; an n-gram model may
    /// inherit a server-wide draft model, which it then does not use).
    pub fn check(&self, own: &SpecSettings, at: &str) -> Result<(), String> {
        if let (Some(min), Some(max)) = (self.draft_min, self.draft_max) {
            if min > max {
                return Err(format!(
                    "{at}draft_min {min} exceeds draft_max {max}: nothing would ever be checked"
                ));
            }
        }
        if own.spec_type == Some(SpecType::Ngram) && own.draft_model.is_some() {
            return Err(format!(
                "{at}spec_type = \"ngram\" uses no draft model: drop draft_model or use \
                 spec_type = \"draft\""
            ));
        }
        Ok(())
    }

    pub fn resolved(&self) -> Option<(SpecType, SpecParams)> {
        let ty = match (self.spec_type, &self.draft_model) {
            (Some(t), _) => t,
            (None, Some(_)) => SpecType::Draft,
            (None, None) => return None,
        };
        let d = SpecParams::default();
        Some((
            ty,
            SpecParams {
                draft_max: self.draft_max.unwrap_or(d.draft_max),
                draft_min: self.draft_min.unwrap_or(d.draft_min),
                p_min: self.draft_p_min.unwrap_or(d.p_min),
                ..d
            },
        ))
    }
}

fn spec_type(name: &str, v: Option<&str>) -> Result<Option<SpecType>, String> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) => SpecType::parse(t)
            .map(Some)
            .ok_or_else(|| format!("{name} must be draft or ngram, got {t:?}")),
    }
}

fn draft_count(name: &str, v: Option<usize>, min: usize) -> Result<Option<usize>, String> {
    match v {
        Some(n) if !(min..=32).contains(&n) => {
            Err(format!("{name} must be between {min} and 32, got {n}"))
        }
        v => Ok(v),
    }
}

fn p_min(name: &str, v: Option<f64>) -> Result<Option<f32>, String> {
    match v {
        Some(p) if !(0.0..=1.0).contains(&p) => {
            Err(format!("{name} must be between 0 and 1, got {p}"))
        }
        v => Ok(v.map(|p| p as f32)),
    }
}

/// A KV cache size ("2GiB"; empty: the default), at least 1 MiB.
fn kv_size(name: &str, v: &str) -> Result<Option<u64>, String> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    let b = parse_bytes(v).map_err(|e| format!("{name}: {e}"))?;
    if b < 1 << 20 {
        return Err(format!("{name} must be at least 1MiB, got {b} bytes"));
    }
    Ok(Some(b))
}

/// A duration as the file gives it: a string ("5m") or a number of seconds (300, -1).
fn duration_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    match toml::Value::deserialize(d)? {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        v => Err(D::Error::custom(format!(
            "a duration is a string such as \"5m\" or a number of seconds, got {}",
            article(v.type_str())
        ))),
    }
}

/// A size as the file gives it: a string ("2GiB") or a number of bytes.
fn size_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    match toml::Value::deserialize(d)? {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(i) => Ok(i.to_string()),
        v => Err(D::Error::custom(format!(
            "a size is a string such as \"2GiB\" or a number of bytes, got {}",
            article(v.type_str())
        ))),
    }
}

fn some_size_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    size_text(d).map(Some)
}

pub(crate) fn some_duration_text<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    duration_text(d).map(Some)
}

/// "a string", "an array".
fn article(what: &str) -> String {
    if what.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {what}")
    } else {
        format!("a {what}")
    }
}

/// `models = ["a", "b"]` or `[models.NAME]` tables, in the file's order.
fn list_or_tables<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ModelEntry>, D::Error> {
    use serde::de::Error;
    match toml::Value::deserialize(d)? {
        toml::Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                toml::Value::String(name) => Ok(ModelEntry {
                    name,
                    config: ModelConfig::default(),
                }),
                v => Err(D::Error::custom(format!(
                    "models: a list holds model names, got {}",
                    article(v.type_str())
                ))),
            })
            .collect(),
        toml::Value::Table(t) => t
            .into_iter()
            .map(|(name, v)| {
                let config = ModelConfig::deserialize(v)
                    .map_err(|e| D::Error::custom(format!("models.{name}: {e}")))?;
                Ok(ModelEntry { name, config })
            })
            .collect(),
        v => Err(D::Error::custom(format!(
            "models is a list of names or [models.NAME] tables, got {}",
            article(v.type_str())
        ))),
    }
}

/// The config file a command reads: the one given (`--config`, `CAPY_CONFIG`), else
/// `config.toml` in capy's home (`CAPY_HOME`, `~/.capy`) when it exists.
pub fn config_path(given: Option<&Path>, home: &Path) -> Option<PathBuf> {
    match given {
        Some(p) => Some(p.to_path_buf()),
        None => Some(home.join("config.toml")).filter(|p| p.is_file()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_like_ollama() {
        let s = |secs: u64| KeepAlive::For(Duration::from_secs(secs));
        assert_eq!(KeepAlive::parse("5m"), Ok(s(300)));
        assert_eq!(KeepAlive::parse("1h30m"), Ok(s(5400)));
        assert_eq!(KeepAlive::parse("0"), Ok(s(0)));
        assert_eq!(KeepAlive::parse("90"), Ok(s(90)));
        assert_eq!(
            KeepAlive::parse("250ms"),
            Ok(KeepAlive::For(Duration::from_millis(250)))
        );
        assert_eq!(KeepAlive::parse("-1"), Ok(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("-1m"), Ok(KeepAlive::Forever));
        assert!(KeepAlive::parse("soon").is_err());
        assert!(KeepAlive::parse("5x").is_err());
        assert_eq!(KeepAlive::from_json(&serde_json::json!(10)), Ok(s(10)));
        assert_eq!(parse_bytes("8GiB"), Ok(8 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }

    /// `keep_alive: "NaN"`, `"inf"` and `1e300` panicked the handler, `1e19` left the model
    /// held forever and `9.2233720368547e18` made `/api/ps` panic: durations are finite and
    /// bounded, with a clear error.
    #[test]
    fn keep_alive_nan_inf_and_huge_are_errors_not_panics() {
        use serde_json::json;
        for s in [
            "NaN",
            "nan",
            "inf",
            "-inf",
            "Infinity",
            "1e300",
            "99999999999999999999h",
            "1e19",
        ] {
            let r = KeepAlive::parse(s);
            assert!(r.is_err() || s.starts_with('-'), "{s}: {r:?}");
        }
        assert_eq!(
            KeepAlive::parse("-inf"),
            Err("keep_alive must be a finite duration, got -inf".into())
        );
        for v in [
            json!(1e300),
            json!(1e19),
            json!(9.2233720368547e18),
            json!(u64::MAX),
        ] {
            let e = KeepAlive::from_json(&v).unwrap_err();
            assert!(e.contains("longer than ten years"), "{v}: {e}");
        }
        let ten_years = KeepAlive::MAX_SECS as u64;
        assert_eq!(
            KeepAlive::from_json(&json!(ten_years)),
            Ok(KeepAlive::For(Duration::from_secs(ten_years)))
        );
        assert_eq!(KeepAlive::from_json(&json!(-5)), Ok(KeepAlive::Forever));
        assert!(KeepAlive::from_json(&json!(true)).is_err());
    }

    #[test]
    fn file_then_overrides() {
        let mut c = Config::from_toml(
            "port = 8080\nmodels = [\"smollm2-135m\"]\nmemory_budget = \"1GiB\"\nkeep_alive = \"10m\"\n",
        )
        .expect("valid TOML");
        assert_eq!(c.port, 8080);
        assert_eq!(c.host, "127.0.0.1");
        c.apply(Overrides {
            port: Some(9000),
            parallel: Some(4),
            ..Default::default()
        });
        assert_eq!((c.port, c.parallel), (9000, 4));
        assert_eq!(c.models[0].name, "smollm2-135m");
        let k = c.validate().expect("valid");
        assert_eq!(k.memory_budget, Some(1 << 30));
        assert_eq!(k.keep_alive, KeepAlive::For(Duration::from_secs(600)));
        assert!(
            Config::from_toml("prot = 1").is_err(),
            "unknown keys refused"
        );
        assert!(Config::from_toml("port = \"x\"").is_err());
        c.parallel = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn models_as_a_list_or_as_tables_with_settings() {
        let c = Config::from_toml(
            r#"
[models.assistant]
source = "smollm2-135m"
ctx_size = 4096
parallel = 4
system = "You are terse."
aliases = ["default", "gpt-4o-mini"]
options = { temperature = 0.7, top_k = 20, seed = -1 }

[models.cold]
source = "gemma3-270m"
warm = false
keep_alive = 600

[models.seeded]
source = "smollm2"
options = { seed = 12345678901234567 }
"#,
        )
        .expect("valid TOML");
        let k = c.validate().expect("valid");
        let names: Vec<&str> = k.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["assistant", "cold", "seeded"], "the file's order");
        assert_eq!(
            k.models[2].sampling.seed,
            Some(12345678901234567),
            "exact, not through a float"
        );
        let a = &k.models[0];
        assert_eq!(a.source, "smollm2-135m");
        assert!(!a.is_path && a.warm);
        assert_eq!((a.ctx_size, a.parallel), (Some(4096), Some(4)));
        assert_eq!(a.system.as_deref(), Some("You are terse."));
        assert_eq!(a.sampling.temperature, Some(0.7));
        assert_eq!(a.sampling.top_k, Some(20));
        assert_eq!(a.sampling.seed, Some(u64::MAX));
        for n in ["assistant", "default", "gpt-4o-mini", "assistant:latest"] {
            assert!(a.answers_to(n), "{n}");
        }
        assert!(!a.answers_to("smollm2-135m"), "a source is not a name");
        let cold = &k.models[1];
        assert!(!cold.warm);
        assert_eq!(
            cold.keep_alive,
            Some(KeepAlive::For(Duration::from_secs(600)))
        );

        // the list form: names, all warm, built-in aliases as the store names them
        let l = Config::from_toml("models = [\"smollm2\", \"gemma3-270m\"]")
            .expect("valid")
            .validate()
            .expect("valid");
        assert_eq!(l.models[0].name, "smollm2-135m");
        assert!(l.models[0].answers_to("smollm2") && l.models.iter().all(|m| m.warm));
    }

    #[test]
    fn flags_choose_models_and_keep_their_file_settings() {
        let mut c = Config::from_toml(
            "[models.a]\nsource = \"m1\"\naliases = [\"x\"]\nctx_size = 64\n[models.b]\nsource = \"m2\"\n",
        )
        .expect("valid");
        c.apply(Overrides {
            models: vec!["x".into(), "m3".into()],
            ..Default::default()
        });
        let k = c.validate().expect("valid");
        assert_eq!(k.models.len(), 2);
        assert_eq!(
            (k.models[0].name.as_str(), k.models[0].ctx_size),
            ("a", Some(64))
        );
        assert_eq!(
            (k.models[1].name.as_str(), k.models[1].ctx_size),
            ("m3", None)
        );

        // a built-in's alias picks the table named as the store names it, on the command
        // line and in requests alike
        let mut c = Config::from_toml("[models.smollm2-135m]\nctx_size = 256\n").expect("valid");
        c.apply(Overrides {
            models: vec!["smollm2".into()],
            ..Default::default()
        });
        let k = c.validate().expect("valid");
        assert_eq!(
            k.models[0].ctx_size,
            Some(256),
            "-m smollm2 keeps the table"
        );
        for n in ["smollm2", "smollm2:latest", "smollm2-135m"] {
            let m = find_model(&k.models, n).expect(n);
            assert_eq!(m.name, "smollm2-135m");
        }
        assert!(find_model(&k.models, "gemma3").is_none());
        // an existing file as the source, whatever its name, is served (and checked) as a path
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let k = Config::from_toml(&format!("[models.c]\nsource = {file:?}\n"))
            .expect("valid")
            .validate()
            .expect("valid");
        assert!(k.models[0].is_path && k.models[0].name == "c");
        // a table keep_alive of seconds, as the top-level one
        let k = Config::from_toml("keep_alive = -1\n[models.a]\nkeep_alive = 300\n")
            .expect("valid")
            .validate()
            .expect("valid");
        assert_eq!(k.keep_alive, KeepAlive::Forever);
        assert_eq!(
            k.models[0].keep_alive,
            Some(KeepAlive::For(Duration::from_secs(300)))
        );
    }

    /// Every bad per-model setting is refused at start with the setting named.
    #[test]
    fn speculation_settings_merge_over_the_servers() {
        let c = Config::from_toml(
            "draft_model = \"smollm2-135m\"\ndraft_max = 4\n\
             [models.a]\nsource = \"x\"\n\
             [models.b]\nsource = \"y\"\nspec_type = \"ngram\"\ndraft_max = 6\n\
             [models.c]\nsource = \"z\"\ndraft_model = \"tiny\"\ndraft_p_min = 0.5",
        )
        .unwrap();
        let k = c.validate().unwrap();
        let eff = |i: usize| k.models[i].spec.or(&k.spec).resolved().unwrap();
        assert_eq!(eff(0).0, SpecType::Draft);
        assert_eq!(eff(0).1.draft_max, 4);
        assert_eq!(eff(1).0, SpecType::Ngram);
        assert_eq!(eff(1).1.draft_max, 6);
        assert_eq!(
            k.models[2].spec.or(&k.spec).draft_model.as_deref(),
            Some("tiny")
        );
        assert_eq!(eff(2).1.p_min, 0.5);
        // nothing asked for: no speculation
        let k = Config::default().validate().unwrap();
        assert_eq!(k.spec.resolved(), None);
    }

    #[test]
    fn bad_model_settings_name_the_setting() {
        for (toml, want) in [
            ("[models.a]\nctx = 5", "models.a: unknown field `ctx`"),
            (
                "[models.a]\nctx_size = 8",
                "models.a.ctx_size must be between 16",
            ),
            (
                "[models.a]\nparallel = 0",
                "models.a.parallel must be between 1",
            ),
            (
                "[models.a]\ncache_type_k = \"q4_0\"",
                "models.a.cache_type_k: unknown KV cache type",
            ),
            (
                "[models.a]\nspec_type = \"medusa\"",
                "models.a.spec_type must be draft or ngram",
            ),
            (
                "[models.a]\ndraft_max = 40",
                "models.a.draft_max must be between 1 and 32",
            ),
            (
                "[models.a]\ndraft_p_min = 1.5",
                "models.a.draft_p_min must be between 0 and 1",
            ),
            (
                "[models.a]\nkv_cache_size = \"1KiB\"",
                "models.a.kv_cache_size must be",
            ),
            (
                "cache_type_v = \"bf16\"",
                "cache_type_v: unknown KV cache type",
            ),
            ("[models.a]\nkeep_alive = \"soon\"", "models.a.keep_alive"),
            ("[models.a]\nkeep_alive = \"NaN\"", "models.a.keep_alive"),
            (
                "[models.a.options]\ntemperature = -1",
                "models.a.options.temperature",
            ),
            (
                "[models.a.options]\nwarmth = 1",
                "unknown sampling parameter",
            ),
            (
                "[models.a.options]\ntop_p = \"high\"",
                "models.a.options.top_p must be a number, got a string",
            ),
            (
                "[models.a.options]\ntop_k = [1]",
                "models.a.options.top_k must be a number, got an array",
            ),
            (
                "[models.a]\npath = \"/x.gguf\"\nsource = \"m1\"",
                "not both",
            ),
            ("[models.a]\npath = \"/no/such.gguf\"", "no such file"),
            (
                "[models.a]\naliases = [\"b\"]\n[models.b]\n",
                "the name \"b\" is given to both",
            ),
            ("[models.a]\naliases = [\"\"]", "models.a.aliases"),
            ("[models.\"a b\"]", "is not a model name"),
            ("[models.\"a:latest\"]", "no :latest tag"),
            ("[models.a]\naliases = [\"b:latest\"]", "models.a.aliases"),
            (
                "[models.smollm2]\n[models.x]\naliases = [\"smollm2\"]",
                "the name \"smollm2\" is given to both",
            ),
            ("models = [1]", "a list holds model names"),
            ("models = 3", "a list of names or [models.NAME] tables"),
            ("models = [\"a\", \"a\"]", "given to both"),
        ] {
            let r = Config::from_toml(toml).and_then(|c| c.validate().map(|_| ()));
            let e = r.expect_err(toml);
            assert!(e.contains(want), "{toml:?}: {e}");
        }
    }
}
