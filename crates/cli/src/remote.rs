//! `capy ps` and `capy stop`: what a running `capy serve` has loaded, and unloading a model
//! now, as `ollama ps` and `ollama stop` do. The server is found at `CAPY_HOST` (a host,
//! `host:port` or a URL) and `CAPY_PORT`, the same variables `capy serve` listens by.

use anyhow::{bail, Context, Result};
use serde_json::Value;

#[derive(clap::Args)]
pub struct StopArgs {
    /// The loaded model to unload.
    pub model: String,
}

/// The server's base URL from `CAPY_HOST` and `CAPY_PORT` (default `127.0.0.1:11434`; a
/// server listening on every address, `0.0.0.0`, is reached on loopback).
pub fn server_url() -> String {
    let host = std::env::var("CAPY_HOST").unwrap_or_default();
    let host = host.trim().trim_end_matches('/');
    if host.contains("://") {
        return host.to_string();
    }
    let port = std::env::var("CAPY_PORT").unwrap_or_else(|_| "11434".into());
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
        "{:<32} {:>10}  {:>8}  {:<8} UNTIL",
        "NAME", "SIZE", "CONTEXT", "STATUS"
    );
    for m in v["models"].as_array().into_iter().flatten() {
        let until = m["expires_at"].as_str().unwrap_or("");
        let until = if until.starts_with("9999") {
            "forever"
        } else {
            until
        };
        println!(
            "{:<32} {:>10}  {:>8}  {:<8} {}",
            m["name"]
                .as_str()
                .unwrap_or("?")
                .trim_end_matches(":latest"),
            crate::store_cmds::human_bytes(m["size"].as_u64().unwrap_or(0)),
            m["context_length"].as_u64().unwrap_or(0),
            m["status"].as_str().unwrap_or("ok"),
            until
        );
    }
    Ok(())
}

pub fn stop(a: StopArgs) -> Result<()> {
    let base = server_url();
    let loaded = call(client()?.get(format!("{base}/api/ps")), &base)?;
    let name = a.model.trim_end_matches(":latest");
    // a built-in model's alias names the model by its own name
    let name = capy_store::builtin(name).map_or(name, |b| b.name);
    let is_loaded = loaded["models"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| m["name"].as_str().map(|n| n.trim_end_matches(":latest")) == Some(name));
    if !is_loaded {
        bail!("{name} is not loaded (see `capy ps`)");
    }
    let body = serde_json::json!({"model": name, "keep_alive": 0});
    call(
        client()?.post(format!("{base}/api/generate")).json(&body),
        &base,
    )?;
    println!("stopped {name}");
    Ok(())
}
