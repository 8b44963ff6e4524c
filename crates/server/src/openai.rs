//! The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use capy_engine::tools::{ToolCall, ToolChoice, ToolFormat};
use capy_engine::{GenerateParams, Message, StopReason, TokenOut, Tokenizer};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, Flavor};
use crate::gateway::{Caller, Ticket};
use crate::gen::{new_id, stream_response, unix_now, Gens, Outcome};
use crate::params::{self, Stop};
use crate::structured::{self, Asked};
use crate::virtuals::ensemble::{last_user, Input, Job, ParamsFn};
use crate::virtuals::respond::{self, unsupported, Ask};
use crate::virtuals::router::{self, Api};
use crate::{AppState, Knobs};

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What chat and completion requests share; every field was checked by
/// [`params::OPENAI_COMMON`] and [`params::SAMPLING`] first.
#[derive(Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    /// also the extensions top_k, min_p, repeat_penalty, as llama-server and vLLM take them
    #[serde(flatten)]
    knobs: Knobs,
    stop: Option<Stop>,
    n: Option<usize>,
    #[allow(dead_code)]
    user: Option<String>,
    #[serde(default)]
    ignore_eos: bool,
    /// llama-server's structured outputs: a GBNF grammar or a JSON schema
    grammar: Option<String>,
    json_schema: Option<Value>,
    /// ensembles: put the candidates in the answer's `ensemble` field
    include_candidates: Option<bool>,
}

impl Common {
    /// Checks what the field tables cannot see alone: `stream_options` needs `stream`.
    fn check(&self) -> Result<(), ApiError> {
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::bad_request(
                "stream_options is only allowed when stream is true",
            )
            .param("stream_options"));
        }
        Ok(())
    }

    fn n(&self) -> usize {
        self.n.unwrap_or(1)
    }

    /// The answer length a request asks for, if it names one.
    fn max_tokens(&self) -> Option<usize> {
        self.max_completion_tokens
            .or(self.max_tokens)
            .map(|m| m.min(usize::MAX as u64) as usize)
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// Generation settings; `choice` varies the seed between the `n` choices.
    fn params(
        &self,
        logprobs: bool,
        top: usize,
        choice: usize,
        model: &capy_engine::SamplingOptions,
    ) -> GenerateParams {
        GenerateParams {
            logprobs,
            top_logprobs: top,
            ..(self.params_fn())(model, choice)
        }
    }

    /// Generation settings without logprobs, by the model's defaults and the choice's
    /// index (an ensemble's candidates take the function).
    fn params_fn(&self) -> ParamsFn {
        let knobs = self.knobs.clone();
        let stop = self.stop.as_ref().map(Stop::strings).unwrap_or_default();
        let (max_tokens, ignore_eos) = (self.max_tokens().unwrap_or(usize::MAX), self.ignore_eos);
        Arc::new(move |model, i| GenerateParams {
            max_tokens,
            sampler: crate::sampler(&knobs, i, model),
            stop: stop.clone(),
            ignore_eos,
            ..Default::default()
        })
    }

    /// Refuses what ensembles do not take: `n` over 1, llama-server's grammars.
    fn check_ensemble(&self) -> Result<(), ApiError> {
        if self.n() != 1 {
            return Err(ApiError::bad_request("n must be 1 for ensemble models").param("n"));
        }
        if self.grammar.is_some() {
            return Err(unsupported("grammar"));
        }
        if self.json_schema.is_some() {
            return Err(unsupported("json_schema"));
        }
        Ok(())
    }

    /// The grammar llama-server's `grammar` or `json_schema` asks for.
    fn asked(&self) -> Result<Option<Asked>, ApiError> {
        structured::llama_fields(self.grammar.as_deref(), self.json_schema.as_ref())
    }

    /// A prompt of `n_prompt` tokens and an explicit `max_tokens` must fit the context
    /// together (OpenAI and vLLM answer 400); without `max_tokens` the answer runs to the end
    /// of the context with `finish_reason: "length"`.
    fn check_fits(&self, n_prompt: usize, n_ctx: usize, param: &str) -> Result<(), ApiError> {
        match self.max_tokens() {
            Some(m) if n_prompt.saturating_add(m) > n_ctx => Err(ApiError::bad_request(format!(
                "this model's context is {n_ctx} tokens, but {n_prompt} tokens of prompt and \
                 {m} of {field} were asked for; shorten the prompt or lower {field}",
                field = if self.max_completion_tokens.is_some() {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                }
            ))
            .code("context_length_exceeded")
            .param(param)),
            _ => Ok(()),
        }
    }
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    /// a string, an array of content parts, or absent
    content: Option<Value>,
    /// an assistant's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`
    tool_calls: Option<Vec<Value>>,
    /// a tool result's call
    tool_call_id: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    response_format: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

/// The roles OpenAI's chat takes (`developer` is its newer name for `system`).
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

fn to_message(i: usize, m: &ChatMessage) -> Result<Message, ApiError> {
    let bad =
        |what: &str, msg: String| ApiError::bad_request(msg).param(format!("messages[{i}].{what}"));
    if !ROLES.contains(&m.role.as_str()) {
        return Err(bad(
            "role",
            format!(
                "messages[{i}].role must be one of {ROLES:?}, got {:?}",
                m.role
            ),
        ));
    }
    let content = match &m.content {
        None => String::new(),
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for p in parts {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    (Some("text"), None) => {
                        return Err(bad(
                            "content",
                            format!("a text part of messages[{i}].content has no text string"),
                        ))
                    }
                    (k, _) => {
                        return Err(bad(
                            "content",
                            format!(
                                "message content of type {} is not supported (text only)",
                                k.map_or("(none)".into(), |k| format!("{k:?}"))
                            ),
                        ))
                    }
                }
            }
            s
        }
        Some(_) => {
            return Err(bad(
                "content",
                format!("messages[{i}].content must be a string or an array of content parts"),
            ))
        }
    };
    let role = if m.role == "developer" {
        "system"
    } else {
        m.role.as_str()
    };
    let mut msg = Message::new(role, &content);
    if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) {
        if m.role != "assistant" {
            return Err(bad(
                "tool_calls",
                format!("messages[{i}] has tool_calls but only assistant messages make calls"),
            ));
        }
        let mut out = Vec::with_capacity(calls.len());
        for (j, c) in calls.iter().enumerate() {
            let f = &c["function"];
            let Some(name) = f["name"].as_str() else {
                return Err(bad(
                    &format!("tool_calls[{j}].function.name"),
                    format!("messages[{i}].tool_calls[{j}].function.name must be a string"),
                ));
            };
            // templates print the arguments as an object (`tojson`)
            let arguments = structured::arguments_object(&f["arguments"]);
            out.push(json!({"id": c["id"], "type": "function",
                            "function": {"name": name, "arguments": arguments}}));
        }
        msg.tool_calls = Some(out);
    }
    msg.tool_call_id = m.tool_call_id.clone();
    msg.name = m.name.clone();
    Ok(msg)
}

/// An answer's `tool_calls` in OpenAI's form (arguments as a JSON string).
fn tool_calls_json(calls: &[ToolCall]) -> Vec<Value> {
    calls
        .iter()
        .map(|c| {
            json!({"id": structured::call_id(), "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments.to_string()}})
        })
        .collect()
}

fn finish_reason_calls(r: StopReason, calls: bool) -> &'static str {
    if calls {
        "tool_calls"
    } else {
        finish_reason(r)
    }
}

pub(crate) fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Length | StopReason::Context => "length",
        _ => "stop",
    }
}

fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    tok.token_bytes(id, false).to_vec()
}

fn piece(tok: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(tok.token_bytes(id, false)).into_owned()
}

/// A token in chat's logprobs form.
fn chat_logprob(tok: &Tokenizer, t: &TokenOut) -> Value {
    json!({
        "token": t.text,
        "logprob": t.logprob,
        "bytes": token_bytes(tok, t.id),
        "top_logprobs": t.top.iter().map(|&(id, lp)| json!({
            "token": piece(tok, id), "logprob": lp, "bytes": token_bytes(tok, id)
        })).collect::<Vec<_>>(),
    })
}

pub(crate) fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

pub async fn chat(
    State(st): State<Arc<AppState>>,
    ticket: Option<Extension<Arc<Ticket>>>,
    body: Bytes,
) -> Response {
    let ticket = ticket.map(|t| t.0);
    match st.virtuals.router_in(&body) {
        Some((v, r)) => {
            router::serve(
                Arc::clone(&st),
                &v,
                &r,
                Api::OpenAiChat,
                body,
                ticket,
                chat_inner,
            )
            .await
        }
        None => chat_inner(st, body, ticket).await,
    }
    .unwrap_or_else(|e| e.into_response())
}

async fn chat_inner(
    st: Arc<AppState>,
    body: Bytes,
    ticket: Option<Arc<Ticket>>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let req: ChatRequest = params::parse(&body, params::CHAT_COMPLETIONS, Flavor::OpenAi)?;
    req.common.check()?;
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(
            ApiError::bad_request("top_logprobs requires logprobs to be true")
                .param("top_logprobs"),
        );
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").param("messages"));
    }
    let tools = structured::tools(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let asked = structured::one_of([
        req.common.asked()?,
        match &req.response_format {
            Some(rf) => structured::response_format(rf)?,
            None => None,
        },
    ])?;
    if let (Some(a), Some(t)) = (&asked, &tools) {
        if t.choice != ToolChoice::None {
            return Err(ApiError::bad_request(format!(
                "{} cannot be combined with tools (unless tool_choice is none)",
                a.param
            ))
            .param(a.param));
        }
    }
    let messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| to_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let c = &req.common;
    if let Some(v) = st.virtuals.get(&c.model).cloned() {
        c.check_ensemble()?;
        if req.logprobs {
            return Err(unsupported("logprobs"));
        }
        if tools.as_ref().is_some_and(|t| t.choice != ToolChoice::None) {
            return Err(unsupported("tools"));
        }
        if req.response_format.is_some() {
            return Err(unsupported("response_format"));
        }
        let question = last_user(&messages);
        let ask = Ask {
            job: Job {
                input: Input::Chat(messages),
                question,
                params: c.params_fn(),
                n_ctx: None,
                include_candidates: c.include_candidates,
            },
            stream: c.stream,
            include_usage: c.include_usage(),
        };
        return respond::ensemble(&st, &v, Api::OpenAiChat, ask, ticket, t0).await;
    }
    let n = c.n();
    let want_lp = req.logprobs;
    let top = req.top_logprobs.unwrap_or(0);
    let lease = st.registry.acquire(&c.model, None).await?;
    let format = ToolFormat::of(&lease.engine.template);
    // the field a grammar that fails during generation came from
    let grammar_param = match (&asked, &tools) {
        (Some(a), _) => Some(a.param),
        (None, Some(_)) => Some("tools"),
        _ => None,
    };
    let mut grammar = match (asked, &tools) {
        (Some(a), _) => Some(structured::compile(&lease.engine.tokenizer, a).await?),
        (None, Some(t)) => structured::tool_grammar(&lease.engine.tokenizer, format, t).await?,
        (None, None) => None,
    };
    // with tool_choice none the tools stay out of the prompt (a fallback prompt would ask
    // for calls)
    let tool_list = tools
        .as_ref()
        .filter(|t| t.choice != ToolChoice::None)
        .map(|t| t.tools.clone())
        .unwrap_or_default();
    let prompt = lease
        .model
        .chat_tokens_tools(messages, tool_list, false)
        .await?;
    structured::after_thinking(&lease.engine.tokenizer, &prompt, &mut grammar);
    let choices_params: Vec<_> = (0..n)
        .map(|i| GenerateParams {
            grammar: grammar.clone(),
            ..c.params(want_lp, top, i, &lease.sampling)
        })
        .collect();
    let n_prompt = prompt.len();
    c.check_fits(n_prompt, lease.batch.params.n_ctx, "messages")?;
    let (model, tok) = (lease.name.clone(), Arc::clone(&lease.engine.tokenizer));
    let choices = choices_params
        .into_iter()
        .map(|p| (prompt.clone(), p))
        .collect();
    let gens = Gens::start(&st, lease, choices, n, None, t0, ticket)?;
    let id = new_id("chatcmpl");
    let created = unix_now();
    let fingerprint = format!("capy-{}", env!("CARGO_PKG_VERSION"));

    if !c.stream {
        let outs = gens
            .collect()
            .await
            .map_err(|e| structured::blame(e, grammar_param))?;
        let mut completion = 0;
        let mut cached = 0;
        let choices: Vec<Value> = outs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let s = o.summary.as_ref();
                completion += s.map_or(0, |s| s.completion_tokens);
                if i == 0 {
                    cached = s.map_or(0, |s| s.cached_tokens);
                }
                let mut message = json!({"role": "assistant", "content": o.text, "refusal": null});
                let mut called = false;
                if let Some(t) = &tools {
                    let ids: Vec<u32> = o.tokens.iter().map(|t| t.id).collect();
                    let (text, calls) = structured::read_calls(&tok, format, t, &ids, &o.text);
                    if calls.is_empty() {
                        message["content"] = json!(text);
                    } else {
                        called = true;
                        message["content"] = if text.is_empty() { Value::Null } else { json!(text) };
                        message["tool_calls"] = json!(tool_calls_json(&calls));
                    }
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": want_lp.then(|| json!({
                        "content": o.tokens.iter().map(|t| chat_logprob(&tok, t)).collect::<Vec<_>>(),
                        "refusal": null,
                    })),
                    "finish_reason": s.map(|s| finish_reason_calls(s.stop_reason, called)),
                })
            })
            .collect();
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": choices,
            "usage": usage(n_prompt, completion, cached),
        }))
        .into_response());
    }

    let include_usage = c.include_usage();
    Ok(stream_response(
        "text/event-stream",
        move |out| async move {
            let mut gens = gens;
            let chunk = |choice: Value, with_usage: bool| {
                let mut v = json!({
                    "id": id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "system_fingerprint": fingerprint, "choices": [choice],
                });
                if with_usage {
                    v["usage"] = Value::Null;
                }
                v
            };
            for i in 0..n {
                let first = json!({"index": i, "delta": {"role": "assistant", "content": ""},
                               "logprobs": null, "finish_reason": null});
                if !out.sse(&chunk(first, include_usage)).await {
                    return;
                }
            }
            let (mut left, mut completion, mut cached) = (n, 0, 0);
            // with tools, per choice: the text so far, how much of it was sent, the tokens
            let mut calls_seen: Vec<structured::CallStream> =
                (0..n).map(|_| structured::CallStream::default()).collect();
            while left > 0 {
                let Some((i, ev)) = gens.next().await else {
                    // the engine went away before every choice ended: say so, no [DONE]
                    let e = ApiError::internal("the engine stopped during the request");
                    let _ = out.sse(&e.for_client().body()).await;
                    return;
                };
                let frame = match ev {
                    capy_engine::Event::Token { token, text } => {
                        let text = match (&tools, calls_seen.get_mut(i)) {
                            (Some(t), Some(cs)) if t.choice != ToolChoice::None => {
                                cs.push(&tok, format, &t.choice, token.id, &text)
                            }
                            _ => text,
                        };
                        if text.is_empty() && !want_lp {
                            continue;
                        }
                        json!({"index": i, "delta": {"content": text},
                           "logprobs": want_lp.then(|| json!({
                               "content": [chat_logprob(&tok, &token)], "refusal": null
                           })),
                           "finish_reason": null})
                    }
                    capy_engine::Event::Done(s) => {
                        left -= 1;
                        completion += s.completion_tokens;
                        if i == 0 {
                            cached = s.cached_tokens;
                        }
                        let (rest, calls) = match (&tools, calls_seen.get_mut(i)) {
                            (Some(t), Some(cs)) if t.choice != ToolChoice::None => {
                                cs.finish(&tok, format, t, &s.tail)
                            }
                            _ => (s.tail.clone(), Vec::new()),
                        };
                        if !rest.is_empty() {
                            let tail = json!({"index": i, "delta": {"content": rest},
                                          "logprobs": null, "finish_reason": null});
                            if !out.sse(&chunk(tail, include_usage)).await {
                                return;
                            }
                        }
                        for (k, c) in tool_calls_json(&calls).into_iter().enumerate() {
                            let mut c = c;
                            c["index"] = json!(k);
                            let d = json!({"index": i, "delta": {"tool_calls": [c]},
                                           "logprobs": null, "finish_reason": null});
                            if !out.sse(&chunk(d, include_usage)).await {
                                return;
                            }
                        }
                        json!({"index": i, "delta": {}, "logprobs": null,
                           "finish_reason": finish_reason_calls(s.stop_reason, !calls.is_empty())})
                    }
                    capy_engine::Event::Failed(m) => {
                        let _ = out.sse(&crate::gen::failure(m).for_client().body()).await;
                        return;
                    }
                    _ => continue,
                };
                if !out.sse(&chunk(frame, include_usage)).await {
                    return;
                }
            }
            if include_usage {
                let u = json!({
                    "id": id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "system_fingerprint": fingerprint, "choices": [],
                    "usage": usage(n_prompt, completion, cached),
                });
                if !out.sse(&u).await {
                    return;
                }
            }
            let _ = out.send("data: [DONE]\n\n".into()).await;
        },
    ))
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Value,
    #[serde(default)]
    echo: bool,
    /// legacy form: how many alternatives per token (0 = just the chosen token's)
    logprobs: Option<usize>,
    #[serde(default)]
    suffix: Option<String>,
    /// llama-server takes it on completions too
    response_format: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

/// One prompt of a completion request: its tokens and its text (for `echo`).
struct Prompt {
    tokens: Vec<u32>,
    text: String,
}

fn prompts(v: &Value, tok: &Tokenizer) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "prompt must be a string, an array of strings, an array of token ids or an array of arrays of token ids",
        )
        .param("prompt")
    };
    let ids = |a: &Vec<Value>| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(bad)
            })
            .collect()
    };
    let text = |s: &str| -> Result<Prompt, ApiError> {
        Ok(Prompt {
            tokens: tok.encode(s, true, true)?,
            text: s.to_string(),
        })
    };
    let from_ids = |t: Vec<u32>| Prompt {
        text: tok.decode(&t, false),
        tokens: t,
    };
    let out = match v {
        Value::String(s) => vec![text(s)?],
        Value::Array(a) if a.is_empty() => return Err(bad()),
        Value::Array(a) if a.iter().all(|x| x.is_string()) => a
            .iter()
            .map(|x| text(x.as_str().unwrap_or_default()))
            .collect::<Result<_, _>>()?,
        Value::Array(a) if a.iter().all(|x| x.is_number()) => vec![from_ids(ids(a)?)],
        Value::Array(a) if a.iter().all(|x| x.is_array()) => a
            .iter()
            .map(|x| ids(x.as_array().unwrap_or(&Vec::new())).map(from_ids))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if out.len() > 16 {
        return Err(ApiError::bad_request("at most 16 prompts per request").param("prompt"));
    }
    Ok(out)
}

/// Bytes of text in a completion prompt (the longest of its strings), for
/// [`crate::registry::Loaded::check_text`].
fn prompt_text_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(prompt_text_bytes).max().unwrap_or(0),
        _ => 0,
    }
}

/// The legacy logprobs object of a completion choice.
fn completion_logprobs(
    tok: &Tokenizer,
    o: &Outcome,
    prompt: Option<&Prompt>,
    offset0: usize,
) -> Value {
    let (mut tokens, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
    let mut off = offset0;
    let top_map = |top: &[(u32, f32)]| {
        let mut m = serde_json::Map::new();
        for &(id, lp) in top {
            m.insert(piece(tok, id), json!(lp));
        }
        Value::Object(m)
    };
    if let Some(p) = prompt {
        let plp = o.prompt_lp.as_deref().unwrap_or(&[]);
        for (i, &id) in p.tokens.iter().enumerate() {
            let s = piece(tok, id);
            offs.push(off);
            off += s.len();
            tokens.push(s);
            match plp.get(i).and_then(|x| x.as_ref()) {
                Some(l) => {
                    lps.push(json!(l.logprob));
                    tops.push(top_map(&l.top));
                }
                None => {
                    lps.push(Value::Null);
                    tops.push(Value::Null);
                }
            }
        }
    }
    for t in &o.tokens {
        offs.push(off);
        off += t.text.len();
        tokens.push(t.text.clone());
        lps.push(json!(t.logprob));
        tops.push(top_map(&t.top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
}

pub async fn completions(
    State(st): State<Arc<AppState>>,
    ticket: Option<Extension<Arc<Ticket>>>,
    body: Bytes,
) -> Response {
    let ticket = ticket.map(|t| t.0);
    match st.virtuals.router_in(&body) {
        Some((v, r)) => {
            let api = Api::OpenAiCompletions;
            router::serve(
                Arc::clone(&st),
                &v,
                &r,
                api,
                body,
                ticket,
                completions_inner,
            )
            .await
        }
        None => completions_inner(st, body, ticket).await,
    }
    .unwrap_or_else(|e| e.into_response())
}

async fn completions_inner(
    st: Arc<AppState>,
    body: Bytes,
    ticket: Option<Arc<Ticket>>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let req: CompletionRequest = params::parse(&body, params::COMPLETIONS, Flavor::OpenAi)?;
    req.common.check()?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix is not supported").param("suffix"));
    }
    let c = &req.common;
    let asked = structured::one_of([
        c.asked()?,
        match &req.response_format {
            Some(rf) => structured::response_format(rf)?,
            None => None,
        },
    ])?;
    if let Some(v) = st.virtuals.get(&c.model).cloned() {
        c.check_ensemble()?;
        if let Some(a) = &asked {
            return Err(unsupported(a.param));
        }
        if req.logprobs.is_some() {
            return Err(unsupported("logprobs"));
        }
        if req.echo {
            return Err(unsupported("echo"));
        }
        let Value::String(prompt) = &req.prompt else {
            return Err(
                ApiError::bad_request("ensemble models take one prompt string").param("prompt"),
            );
        };
        let ask = Ask {
            job: Job {
                input: Input::Text(prompt.clone()),
                question: prompt.clone(),
                params: c.params_fn(),
                n_ctx: None,
                include_candidates: c.include_candidates,
            },
            stream: c.stream,
            include_usage: c.include_usage(),
        };
        return respond::ensemble(&st, &v, Api::OpenAiCompletions, ask, ticket, t0).await;
    }
    let grammar_param = asked.as_ref().map(|a| a.param);
    let n = c.n();
    let want_lp = req.logprobs.is_some();
    let top = req.logprobs.unwrap_or(0);
    let lease = st.registry.acquire(&c.model, None).await?;
    let tok = Arc::clone(&lease.engine.tokenizer);
    let grammar = match asked {
        Some(a) => Some(structured::compile(&tok, a).await?),
        None => None,
    };
    let mut base = Vec::with_capacity(n);
    for i in 0..n {
        let mut p = c.params(want_lp, top, i, &lease.sampling);
        p.grammar = grammar.clone();
        // prompt logprobs are computed only when echo and logprobs are both asked for
        p.echo = req.echo && want_lp;
        base.push(p);
    }
    let text_bytes = prompt_text_bytes(&req.prompt);
    lease.model.check_text(text_bytes, "prompt")?;
    let prompts = {
        let (v, tok) = (req.prompt.clone(), Arc::clone(&tok));
        crate::gen::blocking(move || prompts(&v, &tok)).await?
    };
    for p in &prompts {
        c.check_fits(p.tokens.len(), lease.batch.params.n_ctx, "prompt")?;
    }
    let model = lease.name.clone();
    let mut choices = Vec::new();
    for p in &prompts {
        for b in &base {
            choices.push((p.tokens.clone(), b.clone()));
        }
    }
    let gens = Gens::start(&st, lease, choices, n, None, t0, ticket).map_err(|e| {
        // what the engine refuses in a completion is the prompt's fault
        if e.code == Some("context_length_exceeded")
            || (e.status == StatusCode::BAD_REQUEST && e.param.is_none())
        {
            e.param("prompt")
        } else {
            e
        }
    })?;
    let id = new_id("cmpl");
    let created = unix_now();
    let n_prompt: usize = prompts.iter().map(|p| p.tokens.len()).sum();
    let echo = req.echo;

    if !c.stream {
        let outs = gens
            .collect()
            .await
            .map_err(|e| structured::blame(e, grammar_param))?;
        let (mut completion, mut cached) = (0, 0);
        let choices: Vec<Value> = outs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let p = &prompts[i / n];
                let s = o.summary.as_ref();
                completion += s.map_or(0, |s| s.completion_tokens);
                if i % n == 0 {
                    cached += s.map_or(0, |s| s.cached_tokens);
                }
                let text = if echo {
                    format!("{}{}", p.text, o.text)
                } else {
                    o.text.clone()
                };
                json!({
                    "index": i,
                    "text": text,
                    "logprobs": want_lp.then(|| completion_logprobs(&tok, o, echo.then_some(p), 0)),
                    "finish_reason": s.map(|s| finish_reason(s.stop_reason)),
                })
            })
            .collect();
        return Ok(Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(n_prompt, completion, cached),
        }))
        .into_response());
    }

    let include_usage = c.include_usage();
    let n_choices = gens.n();
    Ok(stream_response(
        "text/event-stream",
        move |out| async move {
            let mut gens = gens;
            let chunk = |choice: Value| {
                let mut v = json!({"id": id, "object": "text_completion", "created": created,
                               "model": model, "choices": [choice]});
                if include_usage {
                    v["usage"] = Value::Null;
                }
                v
            };
            // text offsets per choice, for logprobs
            let mut offsets = vec![0usize; n_choices];
            if echo && !want_lp {
                for i in 0..n_choices {
                    let text = &prompts[i / n].text;
                    offsets[i] = text.len();
                    let c =
                        json!({"index": i, "text": text, "logprobs": null, "finish_reason": null});
                    if !out.sse(&chunk(c)).await {
                        return;
                    }
                }
            }
            let (mut left, mut completion, mut cached) = (n_choices, 0, 0);
            while left > 0 {
                let Some((i, ev)) = gens.next().await else {
                    // the engine went away before every choice ended: say so, no [DONE]
                    let e = ApiError::internal("the engine stopped during the request");
                    let _ = out.sse(&e.for_client().body()).await;
                    return;
                };
                let frame = match ev {
                    capy_engine::Event::PromptLogprobs(lp) => {
                        let p = &prompts[i / n];
                        let o = Outcome {
                            prompt_lp: Some(lp),
                            ..Default::default()
                        };
                        let l = completion_logprobs(&tok, &o, Some(p), 0);
                        offsets[i] = p.text.len();
                        json!({"index": i, "text": p.text, "logprobs": l, "finish_reason": null})
                    }
                    capy_engine::Event::Token { token, text } => {
                        if text.is_empty() && !want_lp {
                            continue;
                        }
                        let l = want_lp.then(|| {
                            let o = Outcome {
                                tokens: vec![token.clone()],
                                ..Default::default()
                            };
                            completion_logprobs(&tok, &o, None, offsets[i])
                        });
                        offsets[i] += token.text.len();
                        json!({"index": i, "text": text, "logprobs": l, "finish_reason": null})
                    }
                    capy_engine::Event::Done(s) => {
                        left -= 1;
                        completion += s.completion_tokens;
                        if i % n == 0 {
                            cached += s.cached_tokens;
                        }
                        json!({"index": i, "text": s.tail, "logprobs": null,
                           "finish_reason": finish_reason(s.stop_reason)})
                    }
                    capy_engine::Event::Failed(m) => {
                        let _ = out.sse(&crate::gen::failure(m).for_client().body()).await;
                        return;
                    }
                    capy_engine::Event::Started { .. } => continue,
                };
                if !out.sse(&chunk(frame)).await {
                    return;
                }
            }
            if include_usage {
                let u = json!({"id": id, "object": "text_completion", "created": created,
                           "model": model, "choices": [],
                           "usage": usage(n_prompt, completion, cached)});
                if !out.sse(&u).await {
                    return;
                }
            }
            let _ = out.send("data: [DONE]\n\n".into()).await;
        },
    ))
}

fn model_card(st: &AppState, name: &str, path: &std::path::Path) -> Value {
    let created = st
        .registry
        .store
        .get(name)
        .ok()
        .flatten()
        .map(|m| m.pulled_at)
        .or_else(|| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        })
        .unwrap_or(0);
    json!({"id": name, "object": "model", "created": created, "owned_by": "capy"})
}

/// The served models (those the caller's key may use).
pub async fn models(
    State(st): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
) -> Response {
    let data: Vec<Value> = st
        .registry
        .served()
        .iter()
        .filter(|r| caller.as_ref().is_none_or(|c| c.allows(&r.name)))
        .map(|r| model_card(&st, &r.name, &r.path))
        .chain(
            st.virtuals
                .models
                .iter()
                .filter(|v| caller.as_ref().is_none_or(|c| c.allows(&v.name)))
                .map(|v| virtual_card(&st, v)),
        )
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// A router's or ensemble's card: `virtual` says what it is and its members.
fn virtual_card(st: &AppState, v: &crate::virtuals::VirtualModel) -> Value {
    let created = st
        .virtuals
        .since
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    json!({"id": v.name, "object": "model", "created": created, "owned_by": "capy",
           "virtual": v.describe()})
}

pub async fn model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if let Some(v) = st.virtuals.get(&id) {
        return Json(virtual_card(&st, v)).into_response();
    }
    match st.registry.resolve(&id) {
        Ok(r) => Json(model_card(&st, &r.name, &r.path)).into_response(),
        Err(e) => e.into_response(),
    }
}
