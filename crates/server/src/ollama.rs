//! The Ollama-compatible API: `/api/generate`, `/api/chat` (NDJSON streaming), `/api/tags`,
//! `/api/show`, `/api/ps`, `/api/pull`, `/api/delete`, `/api/version`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use capy_engine::{Event, GenerateParams, Message, StopReason};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::KeepAlive;
use crate::error::{parse_json, ApiError, Flavor};
use crate::gateway::{Caller, Ticket};
use crate::gen::{rfc3339, stream_response, Gens};
use crate::params;
use crate::registry::Lease;
use crate::structured;
use crate::virtuals::ensemble::{last_user, Input, Job, ParamsFn};
use crate::virtuals::respond::{self, unsupported, Ask};
use crate::virtuals::router::{self, Api};
use crate::{AppState, Knobs};
use capy_engine::tools::ToolFormat;

/// `options` of a request (other Ollama options are accepted and ignored).
#[derive(Deserialize, Default)]
struct Options {
    num_ctx: Option<usize>,
    num_predict: Option<i64>,
    #[serde(flatten)]
    knobs: Knobs,
    stop: Option<crate::params::Stop>,
}

impl Options {
    fn params(&self, model: &capy_engine::SamplingOptions) -> Result<GenerateParams, ApiError> {
        Ok((self.params_fn())(model, 0))
    }

    /// Generation settings by the model's defaults and a choice's index (an ensemble's
    /// candidates take the function).
    fn params_fn(&self) -> ParamsFn {
        let knobs = self.knobs.clone();
        let stop = self
            .stop
            .as_ref()
            .map(crate::params::Stop::strings)
            .unwrap_or_default();
        // -1 (and -2, "fill the context") run until the context ends
        let max_tokens = match self.num_predict {
            Some(n) if n >= 0 => n as usize,
            _ => usize::MAX,
        };
        Arc::new(move |model, i| GenerateParams {
            max_tokens,
            sampler: crate::sampler(&knobs, i, model),
            stop: stop.clone(),
            ..Default::default()
        })
    }
}

/// Whether a request's `format` asks for structured output (`null` and `""` do not).
fn has_format(f: &Option<Value>) -> bool {
    f.as_ref().is_some_and(|f| !f.is_null() && f != "")
}

fn keep_alive(v: &Option<Value>) -> Result<Option<KeepAlive>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => KeepAlive::from_json(v)
            .map(Some)
            .map_err(|e| ApiError::bad_request(e).flavor(Flavor::Ollama)),
    }
}

fn ollama(e: ApiError) -> ApiError {
    e.flavor(Flavor::Ollama)
}

fn done_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Length | StopReason::Context => "length",
        _ => "stop",
    }
}

fn ns(ms: f64) -> u64 {
    (ms * 1e6) as u64
}

/// The counters and durations of a final response line.
fn finals(v: &mut Value, s: &capy_engine::Summary, t0: Instant, load_ms: f64) {
    v["done"] = json!(true);
    v["done_reason"] = json!(done_reason(s.stop_reason));
    v["total_duration"] = json!(t0.elapsed().as_nanos() as u64);
    v["load_duration"] = json!(ns(load_ms));
    // the whole prompt, as Ollama reports it; the duration is what was computed
    v["prompt_eval_count"] = json!(s.prompt_tokens);
    v["prompt_eval_duration"] = json!(ns(s.prompt_ms));
    v["eval_count"] = json!(s.completion_tokens);
    v["eval_duration"] = json!(ns(s.gen_ms));
}

#[derive(Deserialize)]
struct GenerateRequest {
    model: String,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    suffix: String,
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    stream: Option<bool>,
    #[serde(default)]
    options: Options,
    keep_alive: Option<Value>,
    context: Option<Vec<u32>>,
    #[serde(default)]
    images: Vec<Value>,
    format: Option<Value>,
    template: Option<String>,
    include_candidates: Option<bool>,
}

/// `format` (JSON mode, a JSON schema) is refused until structured outputs exist, rather
/// than ignored: a client relying on it would get prose. `null` and `""` mean none.
/// The compiled grammar of a request's `format`, if it has one.
async fn format_grammar(
    format: &Option<Value>,
    lease: &Lease,
) -> Result<Option<capy_engine::grammar::Grammar>, ApiError> {
    match structured::ollama_format(format.as_ref())? {
        Some(a) => Ok(Some(structured::compile(&lease.engine.tokenizer, a).await?)),
        None => Ok(None),
    }
}

/// An empty request loads (or with `keep_alive: 0` unloads) the model, as Ollama does.
async fn load_only(
    st: &Arc<AppState>,
    model: &str,
    ka: Option<KeepAlive>,
    chat: bool,
) -> Result<Response, ApiError> {
    // a virtual model loads its members
    let (name, members) = match st.virtuals.get(model) {
        Some(v) if ka == Some(KeepAlive::For(Duration::ZERO)) => {
            return Err(ollama(ApiError::bad_request(format!(
                "{} is a virtual model; unload its members by name ({})",
                v.name,
                v.members().join(", ")
            ))))
        }
        Some(v) => (v.name.clone(), v.members()),
        None => {
            let name = st.registry.resolve(model).map_err(ollama)?.name;
            (name, vec![model.to_string()])
        }
    };
    let reason = if ka == Some(KeepAlive::For(Duration::ZERO)) {
        for m in &members {
            if let Ok(r) = st.registry.resolve(m) {
                st.registry.unload_soon(&r.name);
            }
        }
        "unload"
    } else {
        for m in &members {
            drop(st.registry.acquire(m, ka).await.map_err(ollama)?);
        }
        "load"
    };
    let mut v = json!({"model": name, "created_at": rfc3339(SystemTime::now()),
                       "done": true, "done_reason": reason});
    if chat {
        v["message"] = json!({"role": "assistant", "content": ""});
    } else {
        v["response"] = json!("");
    }
    Ok(Json(v).into_response())
}

pub async fn generate(
    State(st): State<Arc<AppState>>,
    ticket: Option<Extension<Arc<Ticket>>>,
    body: Bytes,
) -> Response {
    let ticket = ticket.map(|t| t.0);
    match st.virtuals.router_in(&body) {
        Some((v, r)) => {
            let api = Api::OllamaGenerate;
            router::serve(Arc::clone(&st), &v, &r, api, body, ticket, generate_inner).await
        }
        None => generate_inner(st, body, ticket).await,
    }
    .unwrap_or_else(|e| ollama(e).into_response())
}

async fn generate_inner(
    st: Arc<AppState>,
    body: Bytes,
    ticket: Option<Arc<Ticket>>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let req: GenerateRequest = params::parse(&body, params::GENERATE, Flavor::Ollama)?;
    let ka = keep_alive(&req.keep_alive)?;
    structured::ollama_format(req.format.as_ref())?;
    if req.template.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::bad_request(
            "template (a prompt template for this request) is not supported; the model's own chat template is used",
        )
        .param("template"));
    }
    if !req.images.is_empty() {
        return Err(ApiError::bad_request(
            "images are not supported by this model",
        ));
    }
    if !req.suffix.is_empty() {
        return Err(ApiError::bad_request(
            "suffix (fill-in-the-middle) is not supported",
        ));
    }
    if req.prompt.is_empty() && req.context.is_none() {
        return load_only(&st, &req.model, ka, false).await;
    }
    if let Some(v) = st.virtuals.get(&req.model).cloned() {
        if has_format(&req.format) {
            return Err(unsupported("format"));
        }
        if req.context.is_some() {
            return Err(unsupported("context"));
        }
        let input = if req.raw {
            Input::Text(req.prompt.clone())
        } else {
            let mut msgs = Vec::new();
            if let Some(s) = req.system.as_ref().filter(|s| !s.is_empty()) {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::new("user", &req.prompt));
            Input::Chat(msgs)
        };
        let ask = Ask {
            job: Job {
                input,
                question: req.prompt.clone(),
                params: req.options.params_fn(),
                n_ctx: req.options.num_ctx,
                include_candidates: req.include_candidates,
            },
            stream: req.stream.unwrap_or(true),
            include_usage: false,
        };
        return respond::ensemble(&st, &v, Api::OllamaGenerate, ask, ticket, t0).await;
    }
    let lease = st.registry.acquire(&req.model, ka).await?;
    let mut params = req.options.params(&lease.sampling)?;
    params.grammar = format_grammar(&req.format, &lease).await?;
    let m = &lease.model;
    let mut prompt = req.context.clone().unwrap_or_default();
    m.check_text(
        req.prompt.len() + req.system.as_ref().map_or(0, String::len),
        "prompt",
    )?;
    if req.raw {
        let first = prompt.is_empty();
        prompt.extend(m.encode(req.prompt.clone(), first, true).await?);
    } else {
        let mut msgs = Vec::new();
        // "" is no system message, as Ollama takes it (the model's default then applies)
        if let Some(s) = req.system.as_ref().filter(|s| !s.is_empty()) {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &req.prompt));
        // a follow-up turn: the template's rendering of this turn alone, no new BOS
        let turn = !prompt.is_empty();
        prompt.extend(m.chat_tokens(msgs, turn).await?);
        structured::after_thinking(&lease.engine.tokenizer, &prompt, &mut params.grammar);
    }
    run(
        st,
        lease,
        prompt,
        params,
        req.options.num_ctx,
        req.stream.unwrap_or(true),
        t0,
        false,
        None,
        ticket,
    )
    .await
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    images: Vec<Value>,
    /// an assistant's calls: `[{"function": {"name", "arguments": {...}}}]`
    #[serde(default)]
    tool_calls: Vec<Value>,
    /// a tool result's function (`tool_name`, or the older `name`)
    tool_name: Option<String>,
    name: Option<String>,
}

impl ChatMessage {
    fn to_message(&self) -> Message {
        let mut m = Message::new(&self.role, &self.content);
        if !self.tool_calls.is_empty() {
            m.tool_calls = Some(
                self.tool_calls
                    .iter()
                    .map(|c| {
                        let f = &c["function"];
                        let arguments = structured::arguments_object(&f["arguments"]);
                        json!({"type": "function",
                               "function": {"name": f["name"], "arguments": arguments}})
                    })
                    .collect(),
            );
        }
        m.name = self.tool_name.clone().or_else(|| self.name.clone());
        m
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    #[serde(default)]
    options: Options,
    keep_alive: Option<Value>,
    #[serde(default)]
    tools: Vec<Value>,
    format: Option<Value>,
    include_candidates: Option<bool>,
}

pub async fn chat(
    State(st): State<Arc<AppState>>,
    ticket: Option<Extension<Arc<Ticket>>>,
    body: Bytes,
) -> Response {
    let ticket = ticket.map(|t| t.0);
    match st.virtuals.router_in(&body) {
        Some((v, r)) => {
            let api = Api::OllamaChat;
            router::serve(Arc::clone(&st), &v, &r, api, body, ticket, chat_inner).await
        }
        None => chat_inner(st, body, ticket).await,
    }
    .unwrap_or_else(|e| ollama(e).into_response())
}

async fn chat_inner(
    st: Arc<AppState>,
    body: Bytes,
    ticket: Option<Arc<Ticket>>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let req: ChatRequest = params::parse(&body, params::CHAT, Flavor::Ollama)?;
    let ka = keep_alive(&req.keep_alive)?;
    if req.messages.is_empty() {
        return load_only(&st, &req.model, ka, true).await;
    }
    structured::ollama_format(req.format.as_ref())?;
    if let Some((i, m)) = req
        .messages
        .iter()
        .enumerate()
        .find(|(_, m)| !["system", "user", "assistant", "tool"].contains(&m.role.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "messages[{i}].role must be system, user, assistant or tool, got {:?}",
            m.role
        ))
        .param(format!("messages[{i}].role")));
    }
    if req.messages.iter().any(|m| !m.images.is_empty()) {
        return Err(ApiError::bad_request(
            "images are not supported by this model",
        ));
    }
    // Ollama has no tool_choice: the model calls when it decides to
    let tools = structured::tools(Some(&req.tools), None, None)?;
    if tools.is_some() && req.format.as_ref().is_some_and(|f| f != "") {
        return Err(ApiError::bad_request("format cannot be combined with tools").param("format"));
    }
    if let Some(v) = st.virtuals.get(&req.model).cloned() {
        if tools.is_some() {
            return Err(unsupported("tools"));
        }
        if has_format(&req.format) {
            return Err(unsupported("format"));
        }
        let msgs: Vec<Message> = req.messages.iter().map(ChatMessage::to_message).collect();
        let question = last_user(&msgs);
        let ask = Ask {
            job: Job {
                input: Input::Chat(msgs),
                question,
                params: req.options.params_fn(),
                n_ctx: req.options.num_ctx,
                include_candidates: req.include_candidates,
            },
            stream: req.stream.unwrap_or(true),
            include_usage: false,
        };
        return respond::ensemble(&st, &v, Api::OllamaChat, ask, ticket, t0).await;
    }
    let lease = st.registry.acquire(&req.model, ka).await?;
    let mut params = req.options.params(&lease.sampling)?;
    params.grammar = format_grammar(&req.format, &lease).await?;
    let format = ToolFormat::of(&lease.engine.template);
    if let Some(t) = &tools {
        params.grammar = structured::tool_grammar(&lease.engine.tokenizer, format, t).await?;
    }
    let msgs: Vec<Message> = req.messages.iter().map(ChatMessage::to_message).collect();
    let tool_list = tools.as_ref().map(|t| t.tools.clone()).unwrap_or_default();
    let prompt = lease
        .model
        .chat_tokens_tools(msgs, tool_list, false)
        .await?;
    structured::after_thinking(&lease.engine.tokenizer, &prompt, &mut params.grammar);
    let tools = tools.map(|t| (t, format));
    run(
        st,
        lease,
        prompt,
        params,
        req.options.num_ctx,
        req.stream.unwrap_or(true),
        t0,
        true,
        tools,
        ticket,
    )
    .await
}

/// Runs one generation and answers in Ollama's shape, streamed as NDJSON or whole.
#[allow(clippy::too_many_arguments)]
async fn run(
    st: Arc<AppState>,
    lease: Lease,
    prompt: Vec<u32>,
    params: GenerateParams,
    num_ctx: Option<usize>,
    stream: bool,
    t0: Instant,
    chat: bool,
    tools: Option<(structured::ToolsAsked, ToolFormat)>,
    ticket: Option<Arc<Ticket>>,
) -> Result<Response, ApiError> {
    let model = format!("{}:latest", lease.name);
    let load_ms = if lease.loaded_at.elapsed().unwrap_or_default()
        < t0.elapsed() + Duration::from_millis(1)
    {
        lease.load_ms
    } else {
        0.0
    };
    let gens = Gens::start(
        &st,
        lease,
        vec![(prompt.clone(), params)],
        1,
        num_ctx,
        t0,
        ticket,
    )?;
    let piece = move |text: &str| -> Value {
        let mut v =
            json!({"model": model, "created_at": rfc3339(SystemTime::now()), "done": false});
        if chat {
            v["message"] = json!({"role": "assistant", "content": text});
        } else {
            v["response"] = json!(text);
        }
        v
    };
    let tok = Arc::clone(&gens.lease.engine.tokenizer);
    // Ollama's calls: arguments as an object
    let calls_json = |calls: &[capy_engine::tools::ToolCall]| -> Value {
        calls
            .iter()
            .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}}))
            .collect()
    };
    if !stream {
        let mut outs = gens.collect().await?;
        let o = outs.pop().unwrap_or_default();
        let s = o.summary.ok_or_else(|| ApiError::internal("no result"))?;
        let mut calls = Vec::new();
        let mut text = o.text.clone();
        if let Some((t, format)) = &tools {
            let ids: Vec<u32> = o.tokens.iter().map(|t| t.id).collect();
            (text, calls) = structured::read_calls(&tok, *format, t, &ids, &o.text);
        }
        let mut v = piece(&text);
        if !calls.is_empty() {
            v["message"]["tool_calls"] = calls_json(&calls);
        }
        finals(&mut v, &s, t0, load_ms);
        if !chat {
            let mut ctx = prompt;
            ctx.extend(o.tokens.iter().map(|t| t.id));
            v["context"] = json!(ctx);
        }
        return Ok(Json(v).into_response());
    }
    Ok(stream_response(
        "application/x-ndjson",
        move |out| async move {
            let mut gens = gens;
            let mut ctx = prompt;
            let mut cs = structured::CallStream::default();
            while let Some((_, ev)) = gens.next().await {
                match ev {
                    Event::Token { token, text } => {
                        ctx.push(token.id);
                        let text = match &tools {
                            Some((t, format)) => cs.push(&tok, *format, &t.choice, token.id, &text),
                            None => text,
                        };
                        if !text.is_empty() && !out.line(&piece(&text)).await {
                            return;
                        }
                    }
                    Event::Done(s) => {
                        let (rest, calls) = match &tools {
                            Some((t, format)) => cs.finish(&tok, *format, t, &s.tail),
                            None => (s.tail.clone(), Vec::new()),
                        };
                        if !rest.is_empty() && !out.line(&piece(&rest)).await {
                            return;
                        }
                        if !calls.is_empty() {
                            let mut v = piece("");
                            v["message"]["tool_calls"] = calls_json(&calls);
                            if !out.line(&v).await {
                                return;
                            }
                        }
                        let mut v = piece("");
                        finals(&mut v, &s, t0, load_ms);
                        if !chat {
                            v["context"] = json!(ctx);
                        }
                        let _ = out.line(&v).await;
                        return;
                    }
                    Event::Failed(m) => {
                        let e = crate::gen::failure(m).for_client();
                        let _ = out.line(&json!({"error": e.message})).await;
                        return;
                    }
                    _ => {}
                }
            }
            // the engine went away before the answer ended
            let e = ApiError::internal("the engine stopped during the request").for_client();
            let _ = out.line(&json!({"error": e.message})).await;
        },
    ))
}

/// The sha256 of a served model's stored file (by its source's store name), or empty.
fn digest(st: &AppState, settings: &crate::config::ServedModel) -> String {
    if settings.is_path {
        return String::new();
    }
    let Ok(r) = capy_store::ModelRef::parse(&settings.source) else {
        return String::new();
    };
    st.registry
        .store
        .get(&r.store_name())
        .ok()
        .flatten()
        .map(|m| m.sha256)
        .unwrap_or_default()
}

/// A model's `details`, or `{"format": "gguf"}` for a file that cannot be read.
async fn details(st: &AppState, path: &std::path::Path) -> Value {
    match st.registry.info.get(path).await {
        Ok(i) => i.details.clone(),
        Err(_) => json!({"format": "gguf"}),
    }
}

/// The served models (those the caller's key may use).
pub async fn tags(State(st): State<Arc<AppState>>, caller: Option<Extension<Caller>>) -> Response {
    let mut models = Vec::new();
    for r in st.registry.served() {
        if caller.as_ref().is_some_and(|c| !c.allows(&r.name)) {
            continue;
        }
        let name = format!("{}:latest", r.name);
        let info = st.registry.info.get(&r.path).await.ok();
        models.push(json!({
            "name": name, "model": name,
            "modified_at": rfc3339(info.as_ref().map_or(SystemTime::UNIX_EPOCH, |i| i.modified)),
            "size": info.as_ref().map_or(0, |i| i.size),
            "digest": digest(&st, &r.settings),
            "details": info.map_or_else(|| json!({"format": "gguf"}), |i| i.details.clone()),
        }));
    }
    for v in &st.virtuals.models {
        if caller.as_ref().is_some_and(|c| !c.allows(&v.name)) {
            continue;
        }
        models.push(virtual_tag(&st, v));
    }
    Json(json!({"models": models})).into_response()
}

/// A router's or ensemble's `/api/tags` entry: `virtual` says what it is and its members.
fn virtual_tag(st: &AppState, v: &crate::virtuals::VirtualModel) -> Value {
    let name = format!("{}:latest", v.name);
    json!({
        "name": name, "model": name,
        "modified_at": rfc3339(st.virtuals.since.unwrap_or(SystemTime::UNIX_EPOCH)),
        "size": 0, "digest": "",
        "details": {"format": "virtual", "family": v.kind_name(), "families": [v.kind_name()],
                    "parameter_size": "", "quantization_level": ""},
        "virtual": v.describe(),
    })
}

/// A loaded model's KV cache for `/api/ps`: its pool's blocks, those held by running
/// sequences, those kept only for the prefix cache, the bytes in use, the prompt tokens its
/// sequences had and those the prefix cache supplied, and preemptions, since it loaded.
fn kv_cache(st: &capy_engine::Stats) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let (total, free) = (st.kv_blocks.load(Relaxed), st.kv_blocks_free.load(Relaxed));
    let used = total.saturating_sub(free);
    json!({"blocks": total, "blocks_used": used,
           "blocks_cached": st.kv_blocks_cached.load(Relaxed),
           "bytes": st.kv_bytes.load(Relaxed), "bytes_used": st.kv_bytes_used.load(Relaxed),
           "prompt_tokens": st.prompt_tokens.load(Relaxed),
           "cached_tokens": st.cached_tokens.load(Relaxed),
           "preemptions": st.preemptions.load(Relaxed)})
}

/// The loaded models (those the caller's key may use).
pub async fn ps(State(st): State<Arc<AppState>>, caller: Option<Extension<Caller>>) -> Response {
    let now = Instant::now();
    let mut models = Vec::new();
    for l in st.registry.loaded() {
        if caller.as_ref().is_some_and(|c| !c.allows(&l.model.name)) {
            continue;
        }
        let details = details(&st, &l.model.path).await;
        models.push({
            let m = &l.model;
            let name = format!("{}:latest", m.name);
            let expires = match l.expires {
                Some(t) => SystemTime::now()
                    .checked_add(t.saturating_duration_since(now))
                    .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)),
                // never: Ollama shows a far-future time
                None => SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799),
            };
            json!({
                "name": name, "model": name, "size": m.bytes, "size_vram": 0,
                "digest": digest(&st, &m.settings),
                "details": details,
                "expires_at": rfc3339(expires),
                "context_length": m.batch.params.n_ctx,
                "kv_cache": kv_cache(m.batch.stats()),
                "status": if m.batch.failure().is_some() { "failed" } else { "ok" },
            })
        });
    }
    Json(json!({"models": models})).into_response()
}

#[derive(Deserialize)]
struct NameRequest {
    model: Option<String>,
    name: Option<String>,
    stream: Option<bool>,
}

impl NameRequest {
    fn model(&self) -> Result<&str, ApiError> {
        self.model
            .as_deref()
            .or(self.name.as_deref())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ollama(ApiError::bad_request("model is required")))
    }
}

pub async fn show(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = async {
        let req: NameRequest = parse_json(&body, Flavor::Ollama)?;
        if let Some(v) = st.virtuals.get(req.model()?) {
            let d = v.describe();
            return Ok(Json(json!({
                "modelfile": format!("# capy {} {}\n", v.kind_name(), v.name),
                "parameters": "", "template": "",
                "details": virtual_tag(&st, v)["details"], "model_info": {},
                "capabilities": ["completion"],
                "virtual": d,
            }))
            .into_response());
        }
        let r = st.registry.resolve(req.model()?).map_err(ollama)?;
        let info = st.registry.info.get(&r.path).await.map_err(ollama)?;
        // what a request that sets nothing gets: the config's, the card's, the GGUF's
        let sampling = r.settings.default_sampling(&info.sampling);
        let parameters: Vec<String> = sampling
            .given()
            .into_iter()
            .map(|(k, v)| format!("{k:<20}{v}"))
            .collect();
        let mut modelfile = format!("# capy model {}\nFROM {}\n", r.name, r.path.display());
        for (k, v) in sampling.given() {
            modelfile.push_str(&format!("PARAMETER {k} {v}\n"));
        }
        if let Some(s) = &r.settings.system {
            modelfile.push_str(&format!("SYSTEM \"\"\"{s}\"\"\"\n"));
        }
        let mut out = json!({
                "modelfile": modelfile,
                "parameters": parameters.join("\n"),
                "template": info.template,
                "details": info.details,
                "model_info": info.metadata,
                "capabilities": ["completion", "tools"],
                "modified_at": rfc3339(info.modified),
        });
        if let Some(s) = &r.settings.system {
            out["system"] = json!(s);
        }
        Ok::<_, ApiError>(Json(out).into_response())
    };
    r.await.unwrap_or_else(|e| ollama(e).into_response())
}

/// Reports pull progress as NDJSON lines.
struct PullProgress {
    tx: tokio::sync::mpsc::UnboundedSender<Value>,
    state: std::sync::Mutex<(String, Option<u64>, u64, Instant)>,
}

impl capy_store::Progress for PullProgress {
    fn begin(&self, label: &str, total: Option<u64>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = (label.to_string(), total, 0, Instant::now());
        let _ = self
            .tx
            .send(json!({"status": label, "total": total, "completed": 0}));
    }
    fn advance(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.2 += bytes;
        // at most ten lines a second
        if s.3.elapsed() >= Duration::from_millis(100) {
            s.3 = Instant::now();
            let _ = self
                .tx
                .send(json!({"status": s.0, "total": s.1, "completed": s.2}));
        }
    }
    fn end(&self) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .tx
            .send(json!({"status": s.0, "total": s.1, "completed": s.1.unwrap_or(s.2)}));
    }
    /// The client left (its response, which holds the receiver, was dropped).
    fn cancelled(&self) -> bool {
        self.tx.is_closed()
    }
}

pub async fn pull(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let req: NameRequest = match parse_json(&body, Flavor::Ollama) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let name = match req.model() {
        Ok(n) => n.strip_suffix(":latest").unwrap_or(n).to_string(),
        Err(e) => return e.into_response(),
    };
    let Some(policy) = st.pull.clone() else {
        return ollama(ApiError::new(
            StatusCode::FORBIDDEN,
            "pulling models through the API is disabled on this server (capy serve --no-api-pull)",
        ))
        .into_response();
    };
    if let Err(e) = capy_store::ModelRef::parse(&name) {
        return ollama(ApiError::bad_request(e.to_string())).into_response();
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let root = st.registry.store.root.clone();
    // stops by itself once the client is gone (the receiver dropped with the response)
    let task = tokio::task::spawn_blocking(move || {
        let p = PullProgress {
            tx: tx.clone(),
            state: std::sync::Mutex::new((String::new(), None, 0, Instant::now())),
        };
        let _ = tx.send(json!({"status": "pulling manifest"}));
        capy_store::Store::at(root)
            .pull_with(&name, &p, &policy)
            .map_err(|e| match e {
                // the store's own files: the detail (paths) goes to the log only
                capy_store::Error::Io { .. } | capy_store::Error::Manifest { .. } => {
                    ApiError::internal(e.to_string()).for_client().message
                }
                e => e.to_string(),
            })
    });
    if req.stream == Some(false) {
        while rx.recv().await.is_some() {}
        return match task.await {
            Ok(Ok(_)) => Json(json!({"status": "success"})).into_response(),
            Ok(Err(e)) => ollama(ApiError::bad_request(e)).into_response(),
            Err(e) => ollama(ApiError::internal(e.to_string())).into_response(),
        };
    }
    stream_response("application/x-ndjson", move |out| async move {
        while let Some(v) = rx.recv().await {
            if !out.line(&v).await {
                return;
            }
        }
        let last = match task.await {
            Ok(Ok(_)) => json!({"status": "success"}),
            Ok(Err(e)) => json!({"error": e}),
            Err(e) => json!({"error": e.to_string()}),
        };
        let _ = out.line(&last).await;
    })
}

pub async fn delete(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = (|| -> Result<Response, ApiError> {
        let req: NameRequest = parse_json(&body, Flavor::Ollama)?;
        let name = req.model()?;
        let name = name.strip_suffix(":latest").unwrap_or(name);
        if let Some(v) = st.virtuals.get(name) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "'{}' is a virtual model of the config file ([virtual.{}]); remove its table \
                     to remove it",
                    v.name, v.name
                ),
            ));
        }
        if let Some(m) = st.registry.configured(name) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "model '{}' is configured on this server (-m or the config file, serving {}); \
                     it cannot be deleted while the server runs",
                    m.name,
                    if m.is_path {
                        "a file"
                    } else {
                        m.source.as_str()
                    }
                ),
            ));
        }
        // a store name as /api/tags lists it (or a built-in's alias for it), never a URL or
        // path whose file name happens to match a stored model
        let not_found = || {
            ApiError::not_found(format!(
                "model '{name}' not found (delete takes a name as /api/tags lists it)"
            ))
        };
        let name = match capy_store::ModelRef::parse(name) {
            Ok(capy_store::ModelRef::Builtin(b)) => b.name.to_string(),
            Ok(capy_store::ModelRef::Local(n)) => n,
            _ => return Err(not_found()),
        };
        let known = st.registry.store.list().unwrap_or_default();
        if !known.iter().any(|m| m.name == name) {
            return Err(not_found());
        }
        let file = st.registry.store.model_path(&name);
        let same_file = |p: &std::path::Path| {
            p == file || std::fs::canonicalize(p).ok() == std::fs::canonicalize(&file).ok()
        };
        if st.registry.serves_store_name(&name) || st.registry.serves_file(&same_file) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("model '{name}' is served by this server's configured models (-m, the config file); it cannot be deleted while the server runs"),
            ));
        }
        for l in st.registry.loaded() {
            if same_file(&l.model.path) && !st.registry.unload(&l.model.name) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("model '{name}' is in use"),
                ));
            }
        }
        let name = name.as_str();
        match st.registry.store.remove(name) {
            Ok(true) => Ok(StatusCode::OK.into_response()),
            Ok(false) => Err(ApiError::not_found(format!("model '{name}' not found"))),
            Err(e) => Err(ApiError::bad_request(e.to_string())),
        }
    })();
    r.unwrap_or_else(|e| ollama(e).into_response())
}

pub async fn version() -> Response {
    Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}
