//! Routers: one member answers each request. Rules are checked in order (a regular
//! expression on the last user message, the prompt's length in tokens, what the request
//! needs); when none matches, a classifier member scores the category labels by their
//! log-probability as the first token of its answer (one prefill: the labels' first tokens
//! are read from the distribution of the first generated position), else the default
//! answers. When the chosen member is refused (too big for the memory budget, queue full,
//! load failure, not found), the fallbacks are tried in order. The request is handed to the
//! member's own handler with its `model` field rewritten, so everything a model takes a
//! routed request takes too; the response names the member (`model` and the
//! `x-capy-routed-to` header) and why (`x-capy-route`).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use capy_engine::{GenerateParams, Message, SamplerParams, Tokenizer};
use serde_json::Value;

use super::{Classifier, Need, RouterSpec, VirtualModel};
use crate::error::ApiError;
use crate::gateway::Ticket;
use crate::gen::Gens;
use crate::AppState;

/// The routes a router serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    OpenAiChat,
    OpenAiCompletions,
    OllamaChat,
    OllamaGenerate,
}

/// What the rules look at, read loosely from the body (the member's handler checks it).
#[derive(Debug, Default, PartialEq)]
pub struct Facts {
    /// The last user message (or the completion prompt).
    pub last_user: String,
    /// Every message's text (or the prompt), for counting tokens.
    pub all_text: String,
    pub tools: bool,
    pub response_format: bool,
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Reads the [`Facts`] of a request body of `api`.
pub fn facts(api: Api, v: &Value) -> Facts {
    let mut f = Facts {
        tools: v["tools"].as_array().is_some_and(|t| !t.is_empty()) && v["tool_choice"] != "none",
        response_format: ["response_format", "grammar", "json_schema"]
            .iter()
            .any(|k| !v[k].is_null())
            || v["format"]
                .as_str()
                .map_or(!v["format"].is_null(), |s| !s.is_empty()),
        ..Default::default()
    };
    match api {
        Api::OpenAiChat | Api::OllamaChat => {
            let msgs = v["messages"].as_array().cloned().unwrap_or_default();
            let texts: Vec<String> = msgs.iter().map(|m| text_of(&m["content"])).collect();
            f.all_text = texts.join("\n");
            f.last_user = msgs
                .iter()
                .zip(&texts)
                .rev()
                .find(|(m, _)| m["role"] == "user")
                .map(|(_, t)| t.clone())
                .unwrap_or_default();
        }
        Api::OpenAiCompletions | Api::OllamaGenerate => {
            let p = match &v["prompt"] {
                Value::Array(a) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n"),
                o => o.as_str().unwrap_or_default().to_string(),
            };
            f.last_user = p.clone();
            f.all_text = match v["system"].as_str() {
                Some(s) => format!("{s}\n{p}"),
                None => p,
            };
        }
    }
    f
}

/// Whether a member's refusal should pass the request on to the next member: not found,
/// too big for the budget or no room now, a file it cannot load, a full queue, a server
/// error; a request the member finds bad (400) goes back to the client.
pub(crate) fn refused(e: &ApiError) -> bool {
    e.status == StatusCode::NOT_FOUND
        || e.status == StatusCode::TOO_MANY_REQUESTS
        || e.status.is_server_error()
        || matches!(
            e.code,
            Some("model_too_large" | "no_room" | "model_not_supported")
        )
}

/// Tokens of `text` by the tokenizer of the model file at `path` (read once, cached), or
/// some number over `limit` when there are more: only the bytes that many tokens can span
/// are counted (a huge prompt costs no more than one just over the rules' thresholds).
async fn count_tokens(
    st: &Arc<AppState>,
    path: PathBuf,
    text: &str,
    limit: usize,
) -> Result<usize, ApiError> {
    let cached = st
        .virtuals
        .tokenizers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&path)
        .cloned();
    let tok = match cached {
        Some(t) => t,
        None => {
            let p = path.clone();
            let t = crate::gen::blocking(move || {
                let g =
                    capy_gguf::Gguf::open(&p).map_err(|e| crate::registry::gguf_error(&p, e))?;
                Tokenizer::from_gguf(&g)
                    .map(Arc::new)
                    .map_err(|e| ApiError::internal(format!("{}: {e}", p.display())))
            })
            .await?;
            st.virtuals
                .tokenizers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(path, Arc::clone(&t));
            t
        }
    };
    // each token spans at most max_token_bytes bytes: this many bytes hold over `limit`
    let mut cut = limit
        .saturating_add(2)
        .saturating_mul(tok.max_token_bytes().max(1))
        .min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let text = text[..cut].to_string();
    crate::gen::blocking(move || Ok(tok.encode(&text, false, false)?.len())).await
}

/// The member the rules or the classifier pick, and why. Prompt tokens are counted with
/// the default member's tokenizer (a fallback's when its file cannot be read; none can:
/// the token rules do not match). The classifier's tokens count toward `ticket`.
pub async fn choose(
    st: &Arc<AppState>,
    r: &RouterSpec,
    f: &Facts,
    ticket: Option<Arc<Ticket>>,
) -> (String, String) {
    let limit = r
        .rules
        .iter()
        .flat_map(|x| [x.min_prompt_tokens, x.max_prompt_tokens])
        .flatten()
        .max();
    let mut n_tokens = None;
    if let Some(limit) = limit {
        for m in std::iter::once(&r.default).chain(&r.fallback) {
            let Ok(res) = st.registry.resolve(m) else {
                continue;
            };
            match count_tokens(st, res.path, &f.all_text, limit).await {
                Ok(n) => {
                    n_tokens = Some(n);
                    break;
                }
                Err(e) => tracing::warn!("router: cannot count tokens with {m}: {}", e.message),
            }
        }
    }
    for (i, rule) in r.rules.iter().enumerate() {
        let ok = rule
            .regex
            .as_ref()
            .is_none_or(|re| re.is_match(&f.last_user))
            && rule
                .min_prompt_tokens
                .is_none_or(|m| n_tokens.is_some_and(|n| n >= m))
            && rule
                .max_prompt_tokens
                .is_none_or(|m| n_tokens.is_some_and(|n| n <= m))
            && match rule.needs {
                None => true,
                Some(Need::Tools) => f.tools,
                Some(Need::ResponseFormat) => f.response_format,
            };
        if ok {
            return (rule.model.clone(), format!("rule {i}"));
        }
    }
    if let Some(c) = &r.classifier {
        match classify(st, c, &f.last_user, ticket).await {
            Ok(Some((label, member, lp))) => {
                return (member, format!("classifier {label} (logprob {lp:.3})"))
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("router classifier {} failed: {}", c.model, e.message),
        }
    }
    (r.default.clone(), "default".into())
}

/// Most bytes of the user's message the classifier reads (its head and tail).
const CLASSIFIER_BYTES: usize = 4000;

/// Alternatives read at the classifier's first position: labels whose first token is not
/// among them score lowest.
const CLASSIFIER_TOP: usize = 256;

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let (mut a, mut b) = (max / 2, s.len() - max / 2);
    while !s.is_char_boundary(a) {
        a -= 1;
    }
    while !s.is_char_boundary(b) {
        b += 1;
    }
    format!("{}\n...\n{}", &s[..a], &s[b..])
}

/// Scores `labels` by the log-probability of their first token (written as is, after a
/// space, or capitalized; the variants' probabilities summed) in `top`, the first
/// position's alternatives. Returns the best label's index and its log-probability;
/// `None` when no label's first token is in `top`.
pub fn score_labels(
    tok: &Tokenizer,
    labels: &[(String, String)],
    top: &[(u32, f32)],
) -> Option<(usize, f32)> {
    let mut best: Option<(usize, f32)> = None;
    for (i, (label, _)) in labels.iter().enumerate() {
        let mut cap = label.clone();
        if let Some(c) = cap.get(..1) {
            cap.replace_range(..1, &c.to_uppercase());
        }
        let mut ids: Vec<u32> = Vec::new();
        for variant in [
            label.clone(),
            format!(" {label}"),
            cap.clone(),
            format!(" {cap}"),
        ] {
            if let Some(&id) = tok
                .encode(&variant, false, false)
                .ok()
                .and_then(|t| t.first().copied())
                .as_ref()
            {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        let p: f64 = ids
            .iter()
            .filter_map(|id| top.iter().find(|t| t.0 == *id))
            .map(|t| (t.1 as f64).exp())
            .sum();
        if p > 0.0 {
            let lp = p.ln() as f32;
            if best.is_none_or(|b| lp > b.1) {
                best = Some((i, lp));
            }
        }
    }
    best
}

/// Runs the classifier on `text`: one prefill of its instruction and the text, and the
/// first position's distribution. Returns the label, its member and its log-probability.
///
/// # Errors
/// The classifier model was refused or failed.
pub async fn classify(
    st: &Arc<AppState>,
    c: &Classifier,
    text: &str,
    ticket: Option<Arc<Ticket>>,
) -> Result<Option<(String, String, f32)>, ApiError> {
    let lease = st.registry.acquire(&c.model, None).await?;
    let names: Vec<&str> = c.labels.iter().map(|l| l.0.as_str()).collect();
    let msgs = vec![
        Message::new(
            "system",
            &c.instruction.replace("{labels}", &names.join(", ")),
        ),
        Message::new("user", &cut(text, CLASSIFIER_BYTES)),
    ];
    let prompt = lease
        .model
        .chat_tokens_tools(msgs, Vec::new(), false)
        .await?;
    let tok = Arc::clone(&lease.engine.tokenizer);
    let params = GenerateParams {
        max_tokens: 1,
        sampler: SamplerParams {
            temperature: 0.0,
            ..Default::default()
        },
        logprobs: true,
        top_logprobs: CLASSIFIER_TOP,
        ..Default::default()
    };
    let gens = Gens::start(
        st,
        lease,
        vec![(prompt, params)],
        1,
        None,
        Instant::now(),
        None,
    )?;
    let outs = gens.collect().await?;
    // what the classifier used counts toward the request's usage (not its first token)
    if let (Some(t), Some(s)) = (&ticket, outs.first().and_then(|o| o.summary.as_ref())) {
        t.add_tokens(s.prompt_tokens, s.cached_tokens, s.completion_tokens, false);
    }
    let top = outs
        .first()
        .and_then(|o| o.tokens.first())
        .map(|t| t.top.clone())
        .unwrap_or_default();
    Ok(score_labels(&tok, &c.labels, &top)
        .map(|(i, lp)| (c.labels[i].0.clone(), c.labels[i].1.clone(), lp)))
}

/// Serves a request for router `v`: picks its member, then hands the body (its `model`
/// rewritten) to `inner`, the route's handler, trying the fallbacks when a member is
/// refused.
///
/// # Errors
/// The last member's refusal (naming every member tried), or the member's own error.
pub async fn serve<F, Fut>(
    st: Arc<AppState>,
    v: &VirtualModel,
    r: &RouterSpec,
    api: Api,
    body: Bytes,
    ticket: Option<Arc<Ticket>>,
    inner: F,
) -> Result<Response, ApiError>
where
    F: Fn(Arc<AppState>, Bytes, Option<Arc<Ticket>>) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let Ok(mut json) = serde_json::from_slice::<Value>(&body) else {
        // not JSON: the handler says so in its own words
        return inner(st, body, ticket).await;
    };
    // Ollama's empty request loads the model: the handler loads every member (and refuses
    // to unload them by the virtual name)
    let empty = match api {
        Api::OllamaChat => json["messages"].as_array().is_none_or(|m| m.is_empty()),
        Api::OllamaGenerate => {
            json["prompt"].as_str().is_none_or(str::is_empty) && json["context"].is_null()
        }
        _ => false,
    };
    if empty {
        return inner(st, body, ticket).await;
    }
    let f = facts(api, &json);
    let (chosen, why) = choose(&st, r, &f, ticket.clone()).await;
    let mut order = vec![chosen];
    for m in &r.fallback {
        if !order.contains(m) {
            order.push(m.clone());
        }
    }
    let mut tried: Vec<String> = Vec::new();
    let mut reason = why;
    for (k, member) in order.iter().enumerate() {
        json["model"] = Value::String(member.clone());
        let b = Bytes::from(serde_json::to_vec(&json).unwrap_or_default());
        match inner(Arc::clone(&st), b, ticket.clone()).await {
            Ok(mut resp) => {
                let h = resp.headers_mut();
                if let Ok(m) = HeaderValue::from_str(member) {
                    h.insert(HeaderName::from_static("x-capy-routed-to"), m);
                }
                if let Ok(m) = HeaderValue::from_str(&reason) {
                    h.insert(HeaderName::from_static("x-capy-route"), m);
                }
                return Ok(resp);
            }
            Err(e) if refused(&e) && k + 1 < order.len() => {
                tracing::warn!(router = %v.name, member = %member,
                               "member refused, trying the next: {}", e.message);
                tried.push(format!("{member}: {}", e.message));
                reason = format!("fallback after {member}");
            }
            Err(e) if refused(&e) => {
                tried.push(format!("{member}: {}", e.message));
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "router {}: every member refused the request ({})",
                        v.name,
                        tried.join("; ")
                    ),
                )
                .code("no_member_available"));
            }
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::internal("a router with no members"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn facts_read_both_apis() {
        let v = json!({"model": "auto", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "first"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "def f(): pass"}],
            "tools": [{"type": "function"}]});
        let f = facts(Api::OpenAiChat, &v);
        assert_eq!(f.last_user, "def f(): pass");
        assert!(f.all_text.contains("be brief") && f.all_text.contains("first"));
        assert!(f.tools && !f.response_format);
        let v = json!({"model": "auto", "prompt": "hi", "system": "sys", "format": "json"});
        let f = facts(Api::OllamaGenerate, &v);
        assert_eq!(
            (f.last_user.as_str(), f.all_text.as_str()),
            ("hi", "sys\nhi")
        );
        assert!(f.response_format && !f.tools);
        let v = json!({"messages": [], "format": "", "tools": [], "tool_choice": "none"});
        let f = facts(Api::OllamaChat, &v);
        assert!(!f.response_format && !f.tools);
    }

    #[test]
    fn cut_keeps_both_ends() {
        let s = format!("{}{}", "a".repeat(5000), "é".repeat(3000));
        let c = cut(&s, 4000);
        assert!(c.len() < 4100 && c.starts_with('a') && c.ends_with('é'));
        assert_eq!(cut("short", 10), "short");
    }
}
