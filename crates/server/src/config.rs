//! Server settings: defaults, then a TOML file, then environment variables and flags (the
//! CLI merges those last two and applies them over the file with [`Config::apply`]).

use std::path::Path;
use std::time::Duration;

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
    /// The warm set: loaded at start and kept loaded. When empty, every model in the
    /// store is served, loaded on its first request.
    pub models: Vec<String>,
    /// Default idle time before a model is unloaded ("5m"; "-1" never).
    pub keep_alive: String,
    /// Most models loaded at once.
    pub max_loaded_models: usize,
    /// Bytes that the weights and KV caches of all loaded models may take ("8GiB");
    /// empty means no limit.
    pub memory_budget: String,
    /// Context (positions) of each sequence.
    pub ctx_size: usize,
    /// Sequences each model runs at once.
    pub parallel: usize,
    /// Most tokens in one forward pass.
    pub batch_size: usize,
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
            ctx_size: 2048,
            parallel: 16,
            batch_size: 512,
            max_queue: 64,
            max_body_size: "16MiB".into(),
            max_connections: 512,
            read_timeout: "30s".into(),
            shutdown_timeout: "30s".into(),
            api_pull: true,
            pull_hosts: Vec::new(),
            max_pull_size: String::new(),
            load_timeout: "5m".into(),
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
    pub batch_size: Option<usize>,
    pub max_queue: Option<usize>,
    pub max_body_size: Option<String>,
    pub max_connections: Option<usize>,
    pub read_timeout: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub api_pull: Option<bool>,
    pub pull_hosts: Vec<String>,
    pub max_pull_size: Option<String>,
    pub load_timeout: Option<String>,
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
            self.models = o.models;
        }
        set(&mut self.keep_alive, o.keep_alive);
        set(&mut self.max_loaded_models, o.max_loaded_models);
        set(&mut self.memory_budget, o.memory_budget);
        set(&mut self.ctx_size, o.ctx_size);
        set(&mut self.parallel, o.parallel);
        set(&mut self.batch_size, o.batch_size);
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
            ("ctx_size", self.ctx_size, 1 << 24),
        ] {
            if v == 0 || v > max {
                return Err(format!("{name} must be between 1 and {max}, got {v}"));
            }
        }
        if self.ctx_size < 16 {
            return Err("ctx_size must be at least 16".into());
        }
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
        Ok(Checked {
            keep_alive,
            memory_budget,
            max_pull,
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
            read_timeout: duration("read_timeout", &self.read_timeout)?,
            shutdown_timeout: duration("shutdown_timeout", &self.shutdown_timeout)?,
            load_timeout: duration("load_timeout", &self.load_timeout)?,
        })
    }
}

/// The parsed forms of [`Config`]'s strings.
#[derive(Clone, Debug)]
pub struct Checked {
    pub keep_alive: KeepAlive,
    pub memory_budget: Option<u64>,
    /// Bytes one pull may download; `None`: the free disk.
    pub max_pull: Option<u64>,
    /// Bytes.
    pub max_body: usize,
    pub read_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub load_timeout: Duration,
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
        assert_eq!(c.models, vec!["smollm2-135m".to_string()]);
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
}
