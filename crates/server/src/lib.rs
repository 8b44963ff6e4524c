//! `capy serve`: an OpenAI- and Ollama-compatible HTTP server over capy's engine.
//!
//! Each loaded model runs a continuous-batching engine loop on its own threads
//! ([`capy_engine::BatchEngine`]); the HTTP side (axum on tokio) only parses requests,
//! queues them on the right model and streams back what the engine reports. Models are
//! held by a [`registry::Registry`] under one memory budget.

pub mod admin;
pub mod config;
pub mod error;
pub mod gateway;
pub mod gen;
pub mod info;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod params;
pub mod registry;
pub mod structured;
pub mod virtuals;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use capy_engine::{SamplerParams, SamplingOptions};
use serde::Deserialize;
use serde_json::json;

use crate::config::{Checked, Config};
use crate::error::{ApiError, Flavor};
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryConfig};

pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    /// Set once the warm set is loaded; `/health` answers 503 before.
    pub ready: AtomicBool,
    pub limits: Limits,
    /// What `/api/pull` may do; `None`: pulls through the API are refused.
    pub pull: Option<capy_store::PullPolicy>,
    /// Keys, limits and usage records; `None`: no database (every request is served).
    pub gateway: Option<Arc<gateway::Gateway>>,
    /// Routers and ensembles (`[virtual.NAME]`).
    pub virtuals: virtuals::Virtuals,
}

/// What one request may take of the server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request body, bytes; larger ones get 413.
    pub max_body: usize,
    /// Time to receive a request's body; slower ones get 408.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body: 16 << 20,
            body_timeout: Duration::from_secs(30),
        }
    }
}

impl AppState {
    pub fn new(registry: Arc<Registry>) -> Arc<AppState> {
        AppState::with_limits(registry, Limits::default())
    }

    pub fn with_limits(registry: Arc<Registry>, limits: Limits) -> Arc<AppState> {
        Arc::new(AppState {
            registry,
            metrics: Metrics::default(),
            ready: AtomicBool::new(false),
            limits,
            pull: Some(capy_store::PullPolicy::default()),
            gateway: None,
            virtuals: virtuals::Virtuals::default(),
        })
    }

    /// Builds the state from a validated configuration and a store.
    pub fn from_config(cfg: &Config, checked: Checked, store: capy_store::Store) -> Arc<AppState> {
        let registry = Registry::new(
            RegistryConfig {
                batch: capy_engine::BatchParams {
                    n_slots: cfg.parallel,
                    n_ctx: cfg.ctx_size,
                    kv_bytes: checked.kv_cache_size,
                    type_k: checked.cache_type_k,
                    type_v: checked.cache_type_v,
                    swa_full: cfg.swa_full,
                    n_batch: cfg.batch_size,
                    n_threads: cfg.threads,
                    max_queue: cfg.max_queue,
                    isa: None,
                    ..Default::default()
                },
                spec: checked.spec.clone(),
                keep_alive: checked.keep_alive,
                max_loaded: cfg.max_loaded_models,
                memory_budget: checked.memory_budget,
                load_timeout: checked.load_timeout,
            },
            store,
            checked.models.clone(),
        );
        let mut st = AppState::with_limits(
            registry,
            Limits {
                max_body: checked.max_body,
                body_timeout: checked.read_timeout,
            },
        );
        if let Some(s) = Arc::get_mut(&mut st) {
            s.pull = cfg.api_pull.then(|| capy_store::PullPolicy {
                max_bytes: checked.max_pull,
                hosts: cfg.pull_hosts.clone(),
                ..Default::default()
            });
            s.virtuals = virtuals::Virtuals::new(checked.virtuals.clone());
        }
        st
    }

    /// Checks that every virtual model's members are served (configured, or in the store
    /// when the config lists no models), and a virtual name is not a stored model's.
    ///
    /// # Errors
    /// The first member that is not served, naming its virtual model.
    pub fn check_virtuals(&self) -> Result<(), String> {
        let served = self.registry.configured_names();
        let hint = virtuals::member_hint(&served.iter().map(String::as_str).collect::<Vec<_>>());
        for v in &self.virtuals.models {
            for m in v.members() {
                self.registry.resolve(&m).map_err(|e| {
                    format!(
                        "virtual.{}: member {m:?} is not served ({}); {hint}",
                        v.name, e.message
                    )
                })?;
            }
            if self.registry.resolve(&v.name).is_ok() {
                return Err(format!(
                    "virtual.{}: a served model has this name; pick another",
                    v.name
                ));
            }
        }
        Ok(())
    }

    /// Loads the warm set, then marks the server ready.
    pub async fn load_warm_set(self: &Arc<Self>) -> Result<(), ApiError> {
        for name in self.registry.warm_names() {
            let lease = self
                .registry
                .acquire(&name, None)
                .await
                .map_err(|e| ApiError {
                    message: format!("model {name:?}: {}", e.message),
                    ..e
                })?;
            drop(lease);
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }
}

/// Sampling settings as requests give them (the same names in both APIs), their ranges
/// checked by [`params::SAMPLING`].
pub(crate) type Knobs = SamplingOptions;

/// The sampler settings of a request: its own, then the model's defaults (the config
/// file's, its card's, its GGUF's), then llama.cpp's; `choice` varies the seed between the
/// choices of a request.
pub(crate) fn sampler(knobs: &Knobs, choice: usize, model: &SamplingOptions) -> SamplerParams {
    let mut p = knobs.or(model);
    p.seed = p.seed.map(|s| s.wrapping_add(choice as u64));
    p.params()
}

/// The HTTP routes.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{*id}", get(openai::model))
        .route("/api/generate", post(ollama::generate))
        .route("/api/chat", post(ollama::chat))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/pull", post(ollama::pull))
        .route("/api/delete", delete(ollama::delete))
        .route("/api/version", get(ollama::version))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/api/embed", post(not_yet))
        .route("/api/embeddings", post(not_yet))
        .route("/v1/embeddings", post(not_yet))
        .route("/", get(|| async { "capy is running" }))
        .route("/admin/keys", get(admin::list_keys).post(admin::create_key))
        .route(
            "/admin/keys/{name}",
            get(admin::get_key)
                .patch(admin::update_key)
                .delete(admin::revoke_key),
        )
        .route("/admin/usage", get(admin::usage))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        // innermost: a key's models and limits, and the usage ticket (needs the body)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            gateway::limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            read_body,
        ))
        // read_body enforces the limit, in each API's error shape
        .layer(axum::extract::DefaultBodyLimit::disable())
        // the key is checked before the body is read
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            gateway::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            count_requests,
        ))
        .with_state(state)
}

/// Reads a request's body whole before the handler runs: larger than
/// [`Limits::max_body`] is a 413 (at once when `Content-Length` says so), slower than
/// [`Limits::body_timeout`] a 408, both in the API's error shape.
async fn read_body(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let flavor = flavor_of(req.uri().path());
    let limit = st.limits.max_body;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the server's limit of {limit} bytes (max_body_size)"),
        )
        .code("request_too_large")
        .flavor(flavor)
        .into_response()
    };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let bytes =
        match tokio::time::timeout(st.limits.body_timeout, axum::body::to_bytes(body, limit)).await
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                let over = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                    || e.to_string().contains("length limit exceeded");
                if over {
                    return too_large();
                }
                return ApiError::bad_request(format!("reading the request body: {e}"))
                    .flavor(flavor)
                    .into_response();
            }
            Err(_) => {
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} s (read_timeout)",
                        st.limits.body_timeout.as_secs_f64()
                    ),
                )
                .flavor(flavor)
                .into_response()
            }
        };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// The error shape of a path: Ollama's under `/api/`, OpenAI's elsewhere.
pub(crate) fn flavor_of(path: &str) -> Flavor {
    if path == "/api" || path.starts_with("/api/") {
        Flavor::Ollama
    } else {
        Flavor::OpenAi
    }
}

/// Routes capy does not have: 404 in the shape of the API the path belongs to.
async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", uri.path())).flavor(flavor_of(uri.path()))
}

/// A known path with the wrong method: 405 in the shape of the path's API.
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
    .flavor(flavor_of(uri.path()))
}

/// Embeddings are not built yet: 501 rather than a 404 that looks like a typo.
async fn not_yet(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "embeddings are not supported yet: capy serves text generation only",
    )
    .code("not_implemented")
    .flavor(flavor_of(uri.path()))
}

/// Counts requests by route and status for `/metrics`.
async fn count_requests(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route: &'static str = match req.extensions().get::<MatchedPath>().map(|m| m.as_str()) {
        Some("/v1/chat/completions") => "/v1/chat/completions",
        Some("/v1/completions") => "/v1/completions",
        Some("/api/generate") => "/api/generate",
        Some("/api/chat") => "/api/chat",
        Some(_) => "other",
        None => "unmatched",
    };
    let r = next.run(req).await;
    st.metrics.request(route, r.status().as_u16());
    r
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let failed: Vec<String> = st
        .registry
        .loaded()
        .iter()
        .filter(|l| l.model.batch.failure().is_some())
        .map(|l| l.model.name.clone())
        .collect();
    if !failed.is_empty() {
        // until the dead engines are unloaded (the next request for each reloads it)
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the engine of {} failed; it is being unloaded",
                failed.join(", ")
            ),
        )
        .retry_after(1)
        .into_response()
    } else if st.ready.load(Ordering::Acquire) {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "loading models")
            .retry_after(1)
            .into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut text = st.metrics.render(&st.registry);
    if let Some(gw) = &st.gateway {
        gw.render_metrics(&mut text);
    }
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

/// The model a `/tokenize` or `/detokenize` request means: the one named, else the first
/// of the warm set, else the first loaded or served.
fn default_model(st: &AppState, named: Option<&str>) -> Result<String, ApiError> {
    if let Some(m) = named {
        return Ok(m.to_string());
    }
    st.registry
        .warm_names()
        .into_iter()
        .chain(st.registry.loaded_names())
        .chain(st.registry.served().into_iter().map(|r| r.name))
        .next()
        .ok_or_else(|| ApiError::not_found("no model to tokenize with"))
}

/// llama-server's `/tokenize`: `add_special` (BOS) off and `parse_special` (control-token
/// text becomes control tokens) on unless given.
#[derive(Deserialize)]
struct TokenizeRequest {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
    #[serde(default)]
    with_pieces: bool,
    model: Option<String>,
}

fn yes() -> bool {
    true
}

async fn tokenize(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = async {
        let req: TokenizeRequest = params::parse(&body, params::TOKENIZE, Flavor::OpenAi)?;
        let model = default_model(&st, req.model.as_deref())?;
        let lease = st.registry.acquire(&model, None).await?;
        let tok = &lease.engine.tokenizer;
        let ids = lease
            .model
            .encode(req.content, req.add_special, req.parse_special)
            .await?;
        let tokens: Vec<serde_json::Value> = if req.with_pieces {
            ids.iter()
                .map(|&id| {
                    let b = tok.token_bytes(id, true);
                    match std::str::from_utf8(b) {
                        Ok(s) => json!({"id": id, "piece": s}),
                        Err(_) => json!({"id": id, "piece": b}),
                    }
                })
                .collect()
        } else {
            ids.iter().map(|&id| json!(id)).collect()
        };
        Ok::<_, ApiError>(Json(json!({"tokens": tokens})).into_response())
    };
    r.await.unwrap_or_else(|e| e.into_response())
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
    model: Option<String>,
}

async fn detokenize(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = async {
        let req: DetokenizeRequest = params::parse(&body, params::DETOKENIZE, Flavor::OpenAi)?;
        let model = default_model(&st, req.model.as_deref())?;
        let lease = st.registry.acquire(&model, None).await?;
        let tok = &lease.engine.tokenizer;
        if let Some(&bad) = req.tokens.iter().find(|&&t| t as usize >= tok.n_vocab()) {
            return Err(ApiError::from(capy_engine::Error::BadToken {
                token: bad,
                n_vocab: tok.n_vocab(),
            }));
        }
        // as llama-server: control tokens keep their text
        Ok(Json(json!({"content": tok.decode(&req.tokens, true)})).into_response())
    };
    r.await.unwrap_or_else(|e| e.into_response())
}

/// [`serve`] on a tokio runtime of its own (two I/O threads: the engines have theirs).
pub fn run(cfg: Config, store: capy_store::Store) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("capy-http")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let r = rt.block_on(serve(cfg, store));
    // blocking work still running (a pull waiting on a slow upstream) does not hold the
    // exit: the shutdown deadline has passed
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

/// Serves `cfg`'s models and virtual models on a free loopback port from the current tokio
/// runtime, with no database (no keys, no usage records) and models loaded on first use:
/// `capy run` of a router or ensemble talks to it, so it answers with the server's own code.
/// Returns the base URL.
///
/// # Errors
/// The configuration's, a member that is not served, no port to listen on.
pub async fn serve_local(mut cfg: Config, store: capy_store::Store) -> Result<String, String> {
    cfg.auth = "off".into();
    cfg.usage = false;
    let checked = cfg.validate()?;
    let state = AppState::from_config(&cfg, checked, store);
    state.check_virtuals()?;
    state.ready.store(true, Ordering::Release);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on loopback: {e}"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app(state)).await;
    });
    Ok(format!("http://{addr}"))
}

/// Runs the server until Ctrl-C or SIGTERM: binds, starts answering (503 on `/health`
/// while the warm set loads), unloads idle models in the background.
pub async fn serve(cfg: Config, store: capy_store::Store) -> Result<(), String> {
    let checked = cfg.validate()?;
    let gw_cfg = checked.gateway(&store.root, cfg.port);
    let mut state = AppState::from_config(&cfg, checked.clone(), store);
    state.registry.check_warm_set().map_err(|e| e.message)?;
    state.check_virtuals()?;
    for v in &state.virtuals.models {
        let (kind, members) = (v.kind_name(), v.members().join(", "));
        eprintln!("capy: virtual model {} ({kind} over {members})", v.name);
    }
    let gw = match gw_cfg {
        Some(c) => Some(gateway::Gateway::start(c).await?),
        None => None,
    };
    let auth = match gw.as_ref().map(|g| (g.auth_mode(), g.required())) {
        None | Some((gateway::AuthMode::Off, _)) => "off",
        Some((_, true)) => "API keys required",
        Some((_, false)) => "open (no API key exists yet)",
    };
    if let Some(s) = Arc::get_mut(&mut state) {
        s.gateway = gw.clone();
    }
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    eprintln!(
        "capy: listening on http://{addr} (kernels: {}; auth: {auth})",
        capy_engine::kernels_name()
    );
    // a warm set that cannot load stops the server with its error
    let failed = Arc::new(tokio::sync::Notify::new());
    let warm_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let (warm, f, we) = (
        Arc::clone(&state),
        Arc::clone(&failed),
        Arc::clone(&warm_error),
    );
    tokio::spawn(async move {
        match warm.load_warm_set().await {
            Ok(()) => {
                // the warm models that stayed loaded (a budget may hold fewer than all)
                let names = warm.registry.loaded_names();
                let cold: Vec<String> = warm
                    .registry
                    .configured_names()
                    .into_iter()
                    .filter(|n| !names.contains(n))
                    .collect();
                match (names.is_empty(), cold.is_empty()) {
                    (true, true) => {
                        eprintln!("capy: ready; models in the store load on first request")
                    }
                    (false, true) => eprintln!("capy: ready; loaded {}", names.join(", ")),
                    (true, false) => eprintln!(
                        "capy: ready; serving {} (loaded on first request)",
                        cold.join(", ")
                    ),
                    (false, false) => eprintln!(
                        "capy: ready; loaded {}; serving {} too (loaded on first request)",
                        names.join(", "),
                        cold.join(", ")
                    ),
                }
            }
            Err(e) => {
                *we.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.message);
                f.notify_one();
            }
        }
    });
    let reaper = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for name in reaper.registry.unload_expired() {
                eprintln!("capy: unloaded {name} (idle)");
            }
        }
    });
    raise_fd_limit();
    let net = Net {
        max_connections: cfg.max_connections,
        read_timeout: checked.read_timeout,
        shutdown_timeout: checked.shutdown_timeout,
    };
    serve_connections(listener, app(Arc::clone(&state)), net, async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = failed.notified() => {}
        }
    })
    .await;
    // usage records of the requests that just ended
    if let Some(gw) = &gw {
        gw.flush().await;
    }
    let err = warm_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    match err {
        Some(e) => Err(format!("loading the warm set: {e}")),
        None => Ok(()),
    }
}

/// How connections are held.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    /// Open connections at most; more get a 503 and are closed.
    pub max_connections: usize,
    /// Time to send a request's headers, and to idle between requests of a keep-alive
    /// connection (hyper's header read timeout runs in both).
    pub read_timeout: Duration,
    /// How long a shutdown waits for requests in flight.
    pub shutdown_timeout: Duration,
}

/// Accepts HTTP/1.1 connections for `app` until `stop` resolves, then stops accepting,
/// lets requests in flight finish for at most [`Net::shutdown_timeout`], and returns
/// (closing whatever is left). A slow or idle client loses its connection after
/// [`Net::read_timeout`]; beyond [`Net::max_connections`] a client gets a 503 at once.
pub async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    net: Net,
    stop: impl std::future::Future<Output = ()>,
) {
    use tokio::io::AsyncWriteExt;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(net.max_connections));
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // out of file descriptors, say: wait rather than spin
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                // the request line (if it comes within a second) says which API's shape
                let mut stream = stream;
                let mut buf = [0u8; 1024];
                let n = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
                let line = String::from_utf8_lossy(&buf[..n]);
                let ollama = line
                    .split_whitespace()
                    .nth(1)
                    .is_some_and(|p| p.starts_with("/api/"));
                let message = "too many open connections; try again shortly";
                let body = if ollama {
                    serde_json::json!({"error": message})
                } else {
                    serde_json::json!({"error": {"message": message, "type": "unavailable_error",
                                                 "param": null, "code": "too_many_connections"}})
                }
                .to_string();
                let head = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                     retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let write = async {
                    stream.write_all(head.as_bytes()).await?;
                    stream.write_all(body.as_bytes()).await?;
                    stream.shutdown().await
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
                // read what the client still sends (a request body) for a moment, so the
                // close does not reset the connection before it reads the answer
                let drain = async {
                    let mut seen = 0usize;
                    while seen < 4 << 20 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => seen += n,
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(net.read_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(net.shutdown_timeout) => {
            tracing::warn!(
                "requests still running {} s after the shutdown began: closing them",
                net.shutdown_timeout.as_secs_f64()
            );
        }
    }
}

/// Raises the soft limit on open files to the hard limit, so connections, not the
/// default 1,024 descriptors, are what [`Net::max_connections`] bounds.
fn raise_fd_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit only read and write the rlimit struct passed by pointer,
    // which lives on this stack frame for the duration of the calls.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                tracing::warn!("could not raise the open-file limit above {}", r.rlim_cur);
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
