//! `capy run ROUTER_OR_ENSEMBLE`: a chat with a virtual model of the config file. The
//! file's models and virtual models are served in this process on a loopback port
//! ([`capy_server::serve_local`]), and each message goes to its `/api/chat`, so the answer
//! is the one `capy serve` would give; it streams as it comes (a router's member's tokens,
//! an ensemble's chosen answer or its judge's tokens).

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail, Context, Result};
use capy_engine::SamplingOptions;
use capy_server::config::Config;
use capy_server::virtuals::VirtualModel;
use serde_json::{json, Map, Value};

use crate::run::{Conversation, RunArgs, STOP};

/// One conversation with a virtual model.
pub struct VirtualChat {
    v: VirtualModel,
    url: String,
    client: reqwest::blocking::Client,
    messages: Vec<Value>,
    system: Option<String>,
    options: SamplingOptions,
    max_tokens: usize,
    verbose: bool,
    /// Runs the in-process server; dropped with the chat.
    _rt: tokio::runtime::Runtime,
}

const HELP: &str = "Commands:
  /set parameter NAME VALUE   temperature, top_k, top_p, min_p, repeat_penalty,
                              repeat_last_n, presence_penalty, frequency_penalty, seed,
                              num_predict
  /set system TEXT            the system message (clears the conversation)
  /set verbose | quiet        show which member answered, the vote, the timing
  /show                       the virtual model's kind and members
  /clear                      forget the conversation
  /bye                        exit
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer.";

impl VirtualChat {
    /// Starts the file's server in this process for virtual model `v`.
    ///
    /// # Errors
    /// Flags a virtual model does not take, the config's errors, no loopback port.
    pub fn start(a: &RunArgs, mut cfg: Config, v: VirtualModel) -> Result<VirtualChat> {
        if a.grammar.format.is_some() || a.grammar.grammar.is_some() {
            bail!("--format and --grammar are not supported by virtual models");
        }
        if a.spec.draft_model.is_some() || a.spec.spec_type.is_some() {
            bail!(
                "speculative decoding is set per model in the config file, not for a virtual model"
            );
        }
        if a.cache_type_k.is_some() || a.cache_type_v.is_some() {
            bail!("cache types are set per model in the config file, not for a virtual model");
        }
        cfg.threads = crate::common::capped_threads(a.threads);
        if let Some(c) = a.ctx_size {
            cfg.ctx_size = c;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the runtime")?;
        let store = capy_store::Store::open_default();
        let url = rt
            .block_on(capy_server::serve_local(cfg, store))
            .map_err(|e| anyhow!(e))?;
        let client = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .context("making the HTTP client")?;
        Ok(VirtualChat {
            v,
            url,
            client,
            messages: Vec::new(),
            system: a.system.clone(),
            options: a.sampling.options(),
            max_tokens: a.max_tokens,
            verbose: a.verbose,
            _rt: rt,
        })
    }

    /// The request's `options`: the flags and `/set`s given, and `num_predict`.
    fn options_json(&self) -> Value {
        let mut o = Map::new();
        for (k, v) in self.options.given() {
            let n: Value = v.parse::<i64>().map(Value::from).unwrap_or_else(|_| {
                v.parse::<f64>()
                    .map(Value::from)
                    .unwrap_or(Value::String(v))
            });
            o.insert(k.to_string(), n);
        }
        let n = if self.max_tokens == usize::MAX {
            -1
        } else {
            self.max_tokens as i64
        };
        o.insert("num_predict".into(), json!(n));
        Value::Object(o)
    }

    /// Sends the conversation and prints the answer as it streams.
    pub fn ask(&mut self, text: &str) -> Result<()> {
        self.messages.push(json!({"role": "user", "content": text}));
        let mut all = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system {
            all.push(json!({"role": "system", "content": s}));
        }
        all.extend(self.messages.iter().cloned());
        let body = json!({"model": self.v.name, "messages": all, "stream": true,
                          "options": self.options_json()});
        let r = self
            .client
            .post(format!("{}/api/chat", self.url))
            .json(&body)
            .send()
            .context("asking the in-process server")?;
        let routed = r
            .headers()
            .get("x-capy-routed-to")
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let why = r
            .headers()
            .get("x-capy-route")
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        if !r.status().is_success() {
            self.messages.pop();
            let v: Value = r.json().unwrap_or_default();
            bail!(
                "{}",
                v["error"].as_str().unwrap_or("the virtual model failed")
            );
        }
        STOP.store(false, Ordering::SeqCst);
        let mut out = std::io::stdout();
        let mut answer = String::new();
        let mut last = Value::Null;
        for line in BufReader::new(r).lines() {
            let line = line.context("reading the answer")?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(e) = v["error"].as_str() {
                println!();
                self.messages.pop();
                bail!("{e}");
            }
            if let Some(t) = v["message"]["content"].as_str() {
                answer.push_str(t);
                let _ = out.write_all(t.as_bytes());
                let _ = out.flush();
            }
            if v["done"] == true {
                last = v;
                break;
            }
            if STOP.load(Ordering::SeqCst) {
                break;
            }
        }
        println!();
        if STOP.swap(false, Ordering::SeqCst) {
            eprintln!("(stopped)");
        }
        if self.verbose {
            let ns = |k: &str| last[k].as_f64().unwrap_or(0.0) / 1e9;
            if last["done"] == true {
                let (p, c, t) = (
                    &last["prompt_eval_count"],
                    &last["eval_count"],
                    ns("total_duration"),
                );
                eprintln!(
                    "prompt: {p} tokens | generation: {c} tokens | total: {t:.2} s ({:.1} generated tokens/s)",
                    c.as_f64().unwrap_or(0.0) / t.max(1e-9)
                );
            }
            if let Some(m) = &routed {
                eprintln!("routed to {m} ({})", why.as_deref().unwrap_or(""));
            }
            let e = &last["ensemble"];
            if !e.is_null() {
                eprintln!("{}", ensemble_line(e));
            }
        }
        self.messages
            .push(json!({"role": "assistant", "content": answer}));
        Ok(())
    }
}

/// `--verbose`'s line on an ensemble's answer.
fn ensemble_line(e: &Value) -> String {
    let mut s = format!("{}:", e["strategy"].as_str().unwrap_or("ensemble"));
    if let Some(a) = e["answer"].as_str() {
        s.push_str(&format!(" answer {a:?}, votes {}", e["votes"]));
    }
    if let Some(m) = e["chosen"]["model"].as_str() {
        s.push_str(&format!(" chosen from {m}"));
    }
    if let Some(m) = e["judge"]["model"].as_str() {
        s.push_str(&format!(" written by {m}"));
    }
    for m in e["members"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            " | {}: {} of {} finished, {:.2} s",
            m["model"].as_str().unwrap_or("?"),
            m["finished"],
            m["candidates"],
            m["seconds"].as_f64().unwrap_or(0.0)
        ));
        if let Some(err) = m["error"].as_str() {
            s.push_str(&format!(" (failed: {err})"));
        }
    }
    if e["deadline_hit"] == true {
        s.push_str(" | deadline reached");
    }
    s
}

impl Conversation for VirtualChat {
    fn name(&self) -> &str {
        &self.v.name
    }

    fn input(&mut self, text: &str) -> Result<bool> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(true);
        }
        if !text.starts_with('/') {
            if let Err(e) = self.ask(text) {
                eprintln!("error: {e:#}");
            }
            return Ok(true);
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["/bye" | "/exit" | "/quit", ..] => return Ok(false),
            ["/clear", ..] => {
                self.messages.clear();
                eprintln!("Cleared session context");
            }
            ["/?" | "/help", ..] => eprintln!("{HELP}"),
            ["/set", "parameter", "num_predict", value] => match crate::run::num_predict(value) {
                Ok(n) => {
                    self.max_tokens = n;
                    eprintln!("Set parameter 'num_predict' to '{value}'");
                }
                Err(e) => eprintln!("Couldn't set parameter: {e}"),
            },
            ["/set", "parameter", name, value] => match self.options.set_text(name, value) {
                Ok(()) => eprintln!("Set parameter '{name}' to '{value}'"),
                Err(e) => eprintln!("Couldn't set parameter: {e}"),
            },
            ["/set", "system", ..] => {
                self.system = crate::run::set_system_text(text);
                self.messages.clear();
                eprintln!("Set system message.");
            }
            ["/set", "verbose"] => self.verbose = true,
            ["/set", "quiet"] => self.verbose = false,
            ["/show", ..] => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&self.v.describe()).unwrap_or_default()
                )
            }
            _ => eprintln!("Unknown command '{text}'. Type /? for help"),
        }
        Ok(true)
    }
}
