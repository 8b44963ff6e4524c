//! `capy ps` and `capy stop`: what a running `capy serve` has loaded, and unloading a model
//! now, as `ollama ps` and `ollama stop` do. The server is found at `CAPY_HOST` (a host,
//! `host:port` or a URL) and `CAPY_PORT`, the same variables `capy serve` listens by, or
//! the config file's `host` and `port`.

use anyhow::{bail, Context, Result};
use serde_json::Value;

#[derive(clap::Args)]
pub struct StopArgs {
    /// The loaded model to unload.
    pub model: String,
}

/// The server's base URL from `CAPY_HOST` and `CAPY_PORT`, else the `host` and `port` of
/// the config file `capy serve` reads (`CAPY_CONFIG`, or config.toml in CAPY_HOME), else
/// `127.0.0.1:11434`; a server listening on every address, `0.0.0.0`, is reached on
/// loopback.
pub fn server_url() -> String {
    let file = std::env::var_os("CAPY_CONFIG").map(std::path::PathBuf::from);
    let cfg =
        capy_server::config::config_path(file.as_deref(), &capy_store::Store::open_default().root)
            .and_then(|p| capy_server::config::Config::from_file(&p).ok())
            .unwrap_or_default();
    let host = std::env::var("CAPY_HOST").unwrap_or(cfg.host);
    let host = host.trim().trim_end_matches('/');
    if host.contains("://") {
        return host.to_string();
    }
    let port = std::env::var("CAPY_PORT").unwrap_or_else(|_| cfg.port.to_string());
    let (h, p) = match host.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && !h.is_empty() => (h, p.to_string()),
        _ => (host, port.trim().to_string()),
    };
    let h = match h {
        "" | "0.0.0.0" | "::" | "[::]" => "127.0.0.1",
        h => h,
    };
    format!("http://{h}:{p}")
}

fn client() -> Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("starting an HTTP client")
}

/// A request to the server, its JSON answer, and its error message on a failure status.
fn call(req: reqwest::blocking::RequestBuilder, url: &str) -> Result<Value> {
    let resp = req.send().with_context(|| {
        format!("no capy server at {url} (start one with `capy serve`, or set CAPY_HOST)")
    })?;
    let status = resp.status();
    let v: Value = resp.json().unwrap_or(Value::Null);
    if !status.is_success() {
        let msg = v["error"]
            .as_str()
            .or(v["error"]["message"].as_str())
            .unwrap_or("no message");
        bail!("the server answered {status}: {msg}");
    }
    Ok(v)
}

pub fn ps() -> Result<()> {
    let base = server_url();
    let v = call(client()?.get(format!("{base}/api/ps")), &base)?;
    println!(
        "{:<24} {:>10}  {:>8}  {:>11}  {:>7}  {:>5}  {:>7}  {:<8} UNTIL",
        "NAME", "SIZE", "CONTEXT", "KV USED", "CACHED", "HIT", "PREEMPT", "STATUS"
    );
    for m in v["models"].as_array().into_iter().flatten() {
        let until = m["expires_at"].as_str().unwrap_or("");
        let until = if until.starts_with("9999") {
            "forever"
        } else {
            until
        };
        let kv = &m["kv_cache"];
        let n = |k: &str| kv[k].as_u64().unwrap_or(0);
        // prompt tokens the prefix cache supplied, of all the model's sequences had
        let hit = match n("prompt_tokens") {
            0 => "-".to_string(),
            p => format!("{:.0}%", 100.0 * n("cached_tokens") as f64 / p as f64),
        };
        println!(
            "{:<24} {:>10}  {:>8}  {:>11}  {:>7}  {:>5}  {:>7}  {:<8} {}",
            m["name"]
                .as_str()
                .unwrap_or("?")
                .trim_end_matches(":latest"),
            crate::store_cmds::human_bytes(m["size"].as_u64().unwrap_or(0)),
            m["context_length"].as_u64().unwrap_or(0),
            format!("{}/{}", n("blocks_used"), n("blocks")),
            n("blocks_cached"),
            hit,
            n("preemptions"),
            m["status"].as_str().unwrap_or("ok"),
            until
        );
    }
    Ok(())
}

pub fn stop(a: StopArgs) -> Result<()> {
    let base = server_url();
    let loaded = call(client()?.get(format!("{base}/api/ps")), &base)?;
    // the server resolves the name (a configured alias, a built-in's alias) and unloads it
    // now, or as soon as its running requests end
    let body = serde_json::json!({"model": a.model.trim(), "keep_alive": 0});
    let v = call(
        client()?.post(format!("{base}/api/generate")).json(&body),
        &base,
    )?;
    let name = v["model"].as_str().unwrap_or(a.model.trim()).to_string();
    let was_loaded = loaded["models"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| m["name"].as_str().map(|n| n.trim_end_matches(":latest")) == Some(&name));
    if !was_loaded {
        bail!("{name} is not loaded (see `capy ps`)");
    }
    println!("stopped {name}");
    Ok(())
}
