//! The models a server holds: loaded on first request, a warm set loaded at start and kept,
//! idle ones unloaded after their keep-alive, at most `max_loaded` at once, and the weights
//! plus KV caches of all of them within one memory budget (idle models are evicted to make
//! room, least recently used first; a model that cannot fit even then is refused).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use axum::http::StatusCode;
use capy_engine::{BatchEngine, BatchParams, Engine, Message};
use capy_model::KV_TILE;
use capy_store::Store;

use crate::config::{KeepAlive, ServedModel};
use crate::error::ApiError;
use crate::gen::blocking;

pub struct RegistryConfig {
    pub batch: BatchParams,
    pub keep_alive: KeepAlive,
    pub max_loaded: usize,
    pub memory_budget: Option<u64>,
    /// How long a request for a model that has no room waits for busy models to become
    /// idle (and evictable) before it gets 503; Ollama's `OLLAMA_LOAD_TIMEOUT`.
    pub load_timeout: std::time::Duration,
    /// Server-wide speculative decoding settings (a model's own take precedence).
    pub spec: crate::config::SpecSettings,
}

/// A model in memory with its engine loop.
pub struct Loaded {
    /// The name clients use.
    pub name: String,
    pub path: PathBuf,
    pub engine: Engine,
    pub batch: BatchEngine,
    /// The model's recommended sampling (a built-in model's card over its GGUF's
    /// `general.sampling.*`), for the fields a request leaves out.
    pub sampling: capy_engine::SamplingOptions,
    /// Its settings from the config file (defaults for a model served from the store).
    pub settings: ServedModel,
    /// Weights plus KV cache and buffers, as counted against the budget.
    pub bytes: u64,
    pub loaded_at: SystemTime,
    pub load_ms: f64,
    /// Requests holding a [`Lease`].
    active: AtomicUsize,
    /// The registry's counts of unloaded models, which this one's join when it is dropped
    /// (so the metrics' counters never go down).
    retired: Arc<Retired>,
}

/// Counters of models since unloaded.
#[derive(Debug, Default)]
pub struct Retired {
    pub preemptions: AtomicU64,
    pub spec_drafted: AtomicU64,
    pub spec_accepted: AtomicU64,
    pub spec_steps: AtomicU64,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let st = self.batch.stats();
        let r = &self.retired;
        for (to, from) in [
            (&r.preemptions, &st.preemptions),
            (&r.spec_drafted, &st.spec_drafted),
            (&r.spec_accepted, &st.spec_accepted),
            (&r.spec_steps, &st.spec_steps),
        ] {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

impl Loaded {
    /// Refuses a text of `bytes` bytes that cannot fit the context whatever it says (each
    /// token stands for at most [`capy_engine::Tokenizer::max_token_bytes`]), before any
    /// time goes into tokenizing it.
    ///
    /// # Errors
    /// 400 `context_length_exceeded` naming `param`.
    pub fn check_text(&self, bytes: usize, param: &str) -> Result<(), ApiError> {
        let n_ctx = self.batch.params.n_ctx;
        let at_least = bytes / self.engine.tokenizer.max_token_bytes();
        if at_least >= n_ctx {
            return Err(ApiError::bad_request(format!(
                "the prompt has at least {at_least} tokens, more than the context of {n_ctx}"
            ))
            .code("context_length_exceeded")
            .param(param));
        }
        Ok(())
    }

    /// A conversation's prompt tokens ([`Engine::chat_tokens`], or with `turn` the tokens
    /// of a follow-up turn), checked for size first and tokenized on a blocking thread so
    /// the async workers keep answering. A conversation that starts without a system
    /// message gets the model's configured one ([`ServedModel::system`]), as Ollama's
    /// `SYSTEM` works.
    ///
    /// # Errors
    /// [`Loaded::check_text`]'s, the template's and the tokenizer's.
    pub async fn chat_tokens(
        self: &Arc<Self>,
        messages: Vec<Message>,
        turn: bool,
    ) -> Result<Vec<u32>, ApiError> {
        self.chat_tokens_tools(messages, Vec::new(), turn).await
    }

    /// [`Loaded::chat_tokens`] with tools the model may call
    /// ([`capy_engine::Engine::chat_tokens_tools`]).
    ///
    /// # Errors
    /// As [`Loaded::chat_tokens`].
    pub async fn chat_tokens_tools(
        self: &Arc<Self>,
        mut messages: Vec<Message>,
        tools: Vec<capy_engine::tools::Tool>,
        turn: bool,
    ) -> Result<Vec<u32>, ApiError> {
        if let Some(system) = &self.settings.system {
            let has_system = messages
                .iter()
                .any(|m| m.role == "system" || m.role == "developer");
            if !turn && !has_system {
                messages.insert(0, Message::new("system", system));
            }
        }
        self.check_text(messages.iter().map(|m| m.content.len()).sum(), "messages")?;
        let me = Arc::clone(self);
        blocking(move || {
            let e = &me.engine;
            Ok(if turn {
                e.chat_turn_tokens(&messages)?
            } else {
                e.chat_tokens_tools(&messages, &tools)?
            })
        })
        .await
    }

    /// Text to tokens ([`capy_engine::Tokenizer::encode`]) on a blocking thread.
    ///
    /// # Errors
    /// The tokenizer's.
    pub async fn encode(
        self: &Arc<Self>,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, ApiError> {
        let me = Arc::clone(self);
        blocking(move || {
            Ok(me
                .engine
                .tokenizer
                .encode(&text, add_special, parse_special)?)
        })
        .await
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

struct Entry {
    model: Arc<Loaded>,
    /// `None`: never unloaded for idleness.
    expires: Option<Instant>,
    last_used: Instant,
    warm: bool,
    /// Unload when the last request ends (`capy stop`, `keep_alive: 0` while busy).
    unload_when_idle: bool,
}

/// What `/api/ps` shows of a loaded model.
pub struct LoadedInfo {
    pub model: Arc<Loaded>,
    pub expires: Option<Instant>,
}

pub struct Registry {
    pub cfg: RegistryConfig,
    pub store: Store,
    /// What the listing routes say of each file.
    pub info: crate::info::InfoCache,
    /// The configured models (the warm set and `[models.NAME]` tables); empty: serve the
    /// store.
    models: Vec<ServedModel>,
    loaded: Mutex<HashMap<String, Entry>>,
    /// One load at a time, so two first requests for a model load it once.
    load_lock: tokio::sync::Mutex<()>,
    /// Woken whenever a lease ends (a model may have become evictable).
    released: tokio::sync::Notify,
    /// Requests waiting for room, at most `batch.max_queue`.
    waiting: AtomicUsize,
    /// Preemptions in the KV caches of models since unloaded.
    retired: Arc<Retired>,
}

/// A request's hold on a loaded model: the model is not evicted while held, and its
/// keep-alive starts when the last lease ends.
pub struct Lease {
    pub model: Arc<Loaded>,
    registry: Arc<Registry>,
    keep_alive: Option<KeepAlive>,
}

impl std::ops::Deref for Lease {
    type Target = Loaded;
    fn deref(&self) -> &Loaded {
        &self.model
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let unload_now = {
            let mut map = self.registry.lock();
            let mut unload = false;
            if let Some(e) = map.get_mut(&self.model.name) {
                if Arc::ptr_eq(&e.model, &self.model) {
                    // released first, so nothing below can leave the model held forever
                    let idle = self.model.active.fetch_sub(1, Ordering::AcqRel) == 1;
                    e.last_used = Instant::now();
                    // the warm set stays loaded whatever a request asks
                    let ka = if e.warm {
                        KeepAlive::Forever
                    } else {
                        self.keep_alive
                            .or(self.model.settings.keep_alive)
                            .unwrap_or(self.registry.cfg.keep_alive)
                    };
                    e.expires = match ka {
                        KeepAlive::Forever => None,
                        KeepAlive::For(d) => Instant::now().checked_add(d),
                    };
                    unload =
                        idle && (e.unload_when_idle || ka == KeepAlive::For(Default::default()));
                }
            }
            if unload {
                map.remove(&self.model.name)
            } else {
                None
            }
        };
        drop(unload_now); // the engine stops outside the lock
        self.registry.released.notify_waiters();
    }
}

/// Where a served name's file is, the name it is known by, and its settings.
pub struct Resolved {
    pub name: String,
    pub path: PathBuf,
    pub settings: ServedModel,
}

impl Registry {
    /// A registry serving `models` (each [`ServedModel::warm`] one loaded by
    /// [`crate::AppState::load_warm_set`]), or every model in the store when empty.
    pub fn new(cfg: RegistryConfig, store: Store, models: Vec<ServedModel>) -> Arc<Registry> {
        Arc::new(Registry {
            cfg,
            store,
            info: Default::default(),
            models,
            loaded: Mutex::new(HashMap::new()),
            load_lock: tokio::sync::Mutex::new(()),
            released: tokio::sync::Notify::new(),
            waiting: AtomicUsize::new(0),
            retired: Arc::new(Retired::default()),
        })
    }

    /// Preemptions in the KV caches of models loaded before and since unloaded.
    /// Counters of the models unloaded since the server started.
    pub fn retired(&self) -> &Retired {
        &self.retired
    }

    pub fn retired_preemptions(&self) -> u64 {
        self.retired.preemptions.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The warm set's names as clients use them.
    pub fn warm_names(&self) -> Vec<String> {
        self.models
            .iter()
            .filter(|m| m.warm)
            .map(|m| m.name.clone())
            .collect()
    }

    /// Plans each model of the warm set that is already in the store ([`Registry::plan`]),
    /// so settings that cannot work (a KV pool under two blocks, a file capy cannot run)
    /// are refused before the server listens.
    ///
    /// # Errors
    /// The first warm model's plan that fails, its name in the message.
    pub fn check_warm_set(&self) -> Result<(), ApiError> {
        for name in self.warm_names() {
            let Ok(r) = self.resolve(&name) else {
                continue;
            };
            if r.path.is_file() {
                self.plan(&r.path, &r.settings).map_err(|e| ApiError {
                    message: format!("model {name:?}: {}", e.message),
                    ..e
                })?;
            }
        }
        Ok(())
    }

    /// The configured models' names, in the config's order.
    pub fn configured_names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }

    /// The configured model a client's name means (its name, an alias, the name as written).
    pub fn configured(&self, name: &str) -> Option<&ServedModel> {
        crate::config::find_model(&self.models, name)
    }

    /// Whether a configured model serves this store name (so it may not be deleted).
    pub fn serves_store_name(&self, name: &str) -> bool {
        self.models.iter().any(|m| {
            !m.is_path
                && capy_store::ModelRef::parse(&m.source).is_ok_and(|r| r.store_name() == name)
        })
    }

    /// Whether a configured model is a file (`path =`) that `is_it` accepts.
    pub fn serves_file(&self, is_it: &dyn Fn(&Path) -> bool) -> bool {
        self.models
            .iter()
            .any(|m| m.is_path && is_it(Path::new(&m.source)))
    }

    /// Names this server answers to: the configured models, or every model in the store.
    pub fn served(&self) -> Vec<Resolved> {
        if !self.models.is_empty() {
            return self
                .models
                .iter()
                .filter_map(|m| self.resolve(&m.name).ok())
                .collect();
        }
        self.store
            .list()
            .unwrap_or_default()
            .into_iter()
            .map(|m| Resolved {
                path: self.store.model_path(&m.name),
                settings: ServedModel {
                    name: m.name.clone(),
                    key: m.name.clone(),
                    source: m.name.clone(),
                    ..Default::default()
                },
                name: m.name,
            })
            .collect()
    }

    /// Finds a model by the name a client gave (a trailing `:latest` is ignored).
    /// The served name that a request's model name means (an alias, `NAME:latest`), found
    /// without touching the disk (the gateway asks on every request); `None` for a name
    /// the server does not serve.
    pub fn served_name(&self, name: &str) -> Option<String> {
        let name = name.trim();
        let name = name.strip_suffix(":latest").unwrap_or(name);
        if name.is_empty() {
            return None;
        }
        if !self.models.is_empty() {
            return crate::config::find_model(&self.models, name).map(|m| m.name.clone());
        }
        capy_store::ModelRef::parse(name)
            .ok()
            .map(|r| r.store_name())
    }

    pub fn resolve(&self, name: &str) -> Result<Resolved, ApiError> {
        let name = name.trim();
        let name = name.strip_suffix(":latest").unwrap_or(name);
        if name.is_empty() {
            return Err(ApiError::bad_request("no model given").param("model"));
        }
        let not_found =
            || ApiError::not_found(format!("model '{name}' not found")).code("model_not_found");
        if !self.models.is_empty() {
            // a built-in model's alias (`smollm2`) names the same model as its name
            let m = crate::config::find_model(&self.models, name).ok_or_else(not_found)?;
            let path = if m.is_path {
                PathBuf::from(&m.source)
            } else {
                self.store.resolve(&m.source).map_err(|e| match e {
                    e @ capy_store::Error::AlreadyStored { .. } => {
                        ApiError::new(StatusCode::CONFLICT, e.to_string())
                    }
                    _ => not_found(),
                })?
            };
            return Ok(Resolved {
                name: m.name.clone(),
                path,
                settings: m.clone(),
            });
        }
        let path = self.store.resolve(name).map_err(|_| not_found())?;
        let name = capy_store::ModelRef::parse(name)
            .map_err(|_| not_found())?
            .store_name();
        Ok(Resolved {
            settings: ServedModel {
                name: name.clone(),
                key: name.clone(),
                source: name.clone(),
                ..Default::default()
            },
            name,
            path,
        })
    }

    /// The engine settings of a model: the server's, with its own `ctx_size`, `parallel`
    /// and `kv_cache_size` where the config file gives them.
    pub fn batch_params(&self, settings: &ServedModel) -> BatchParams {
        let mut p = self.cfg.batch.clone();
        p.n_ctx = settings.ctx_size.unwrap_or(p.n_ctx);
        p.n_slots = settings.parallel.unwrap_or(p.n_slots);
        p.kv_bytes = settings.kv_cache_size.or(p.kv_bytes);
        p.type_k = settings.cache_type_k.unwrap_or(p.type_k);
        p.type_v = settings.cache_type_v.unwrap_or(p.type_v);
        p.spec = settings.spec.or(&self.cfg.spec).resolved();
        p
    }

    /// The draft model a served model's speculation uses, as a file: its own `draft_model`,
    /// else the server's; `None` without draft speculation. The flag says whether it is the
    /// model's own (a vocabulary mismatch is then an error, not a note).
    ///
    /// # Errors
    /// A draft that is neither a file nor in the store (400).
    pub fn draft_path(&self, settings: &ServedModel) -> Result<Option<(PathBuf, bool)>, ApiError> {
        let spec = settings.spec.or(&self.cfg.spec);
        if !matches!(spec.resolved(), Some((capy_engine::SpecType::Draft, _))) {
            return Ok(None);
        }
        let own = settings.spec.draft_model.is_some();
        let Some(name) = spec.draft_model else {
            return Err(ApiError::bad_request(format!(
                "{}: spec_type = \"draft\" needs a draft_model",
                settings.name
            ))
            .code("bad_draft_model"));
        };
        let p = PathBuf::from(&name);
        if p.is_file() {
            return Ok(Some((p, own)));
        }
        let path = match crate::config::find_model(&self.models, &name) {
            Some(m) if m.is_path => Ok(PathBuf::from(&m.source)),
            Some(m) => self.store.resolve(&m.source),
            None => self.store.resolve(&name),
        }
        .map_err(|e| {
            ApiError::bad_request(format!(
                "the draft model {name:?} of {} is neither a file nor in the store: {e}",
                settings.name
            ))
            .code("bad_draft_model")
        })?;
        Ok(Some((path, own)))
    }

    /// The engine settings a model gets ([`Registry::batch_params`], its context capped at
    /// the one it was trained for) and the bytes it would then take: its file (the weights
    /// are mapped or repacked in place of their source pages) plus the KV cache and buffers
    /// of its engine.
    ///
    /// # Errors
    /// The file cannot be read (500) or is not a model capy can run (400).
    pub fn plan(
        &self,
        path: &Path,
        settings: &ServedModel,
    ) -> Result<(BatchParams, u64), ApiError> {
        let g = capy_gguf::Gguf::open(path).map_err(|e| gguf_error(path, e))?;
        let hp = capy_model::Hparams::from_gguf(&g).map_err(|e| model_error(path, e))?;
        let mut params = self.batch_params(settings);
        // a sequence's context: the trained one, unless a smaller one is asked for
        let trained = if hp.n_ctx_train > 0 {
            hp.n_ctx_train.max(16)
        } else {
            4096
        };
        params.n_ctx = match params.n_ctx {
            0 => trained,
            n => n.min(trained),
        };
        let two = params.kv_bytes_for(&hp, 2);
        if params.kv_bytes.is_none() {
            // room for every sequence at full context, within a quarter of what the budget
            // leaves after the weights (or, without one, of the machine's memory shared by
            // the models loaded at once)
            let blocks = params.n_slots.max(1) * params.n_ctx.div_ceil(KV_TILE);
            let full = params.kv_bytes_for(&hp, blocks);
            let share = match self.cfg.memory_budget {
                Some(b) => Some(b.saturating_sub(g.file_size()) / 4),
                None => total_memory().map(|m| m / 4 / self.cfg.max_loaded.max(1) as u64),
            };
            params.kv_bytes = Some(share.map_or(full, |s| full.min(s.max(two))));
        }
        let params = params.resolve(&hp);
        if params.kv_bytes.is_some_and(|b| b < two) {
            return Err(ApiError::bad_request(format!(
                "the KV cache size for {} holds less than two of its blocks (64 positions \
                 each, all layers): give at least {two} bytes ({})",
                settings.name,
                human(two)
            ))
            .code("model_too_large"));
        }
        let mut need = g.file_size() + params.memory_bytes(&hp);
        if let Some((draft, _)) = self.draft_path(settings)? {
            // the draft's weights and its own KV cache and buffers
            let d = capy_gguf::Gguf::open(&draft).map_err(|e| gguf_error(&draft, e))?;
            let dhp = capy_model::Hparams::from_gguf(&d).map_err(|e| model_error(&draft, e))?;
            need += d.file_size() + params.draft_memory_bytes(&hp, &dhp);
        }
        Ok((params, need))
    }

    /// Takes a lease on a model, loading it first if needed. `keep_alive` overrides the
    /// default idle time once this request ends.
    pub async fn acquire(
        self: &Arc<Self>,
        name: &str,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Lease, ApiError> {
        let r = self.resolve(name)?;
        if let Some(l) = self.lease_loaded(&r.name, keep_alive) {
            return Ok(l);
        }
        // one deadline per request, whether it waits for the load lock (another request is
        // waiting for room) or for room itself
        let deadline = tokio::time::Instant::now() + self.cfg.load_timeout;
        let Ok(_one_load) = tokio::time::timeout_at(deadline, self.load_lock.lock()).await else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "cannot load the model now: other models are loading or waiting for room \
                     (waited {} s); try again later",
                    self.cfg.load_timeout.as_secs_f64()
                ),
            )
            .code("no_room")
            .retry_after(5));
        };
        if let Some(l) = self.lease_loaded(&r.name, keep_alive) {
            return Ok(l);
        }
        let (me, path, settings) = (Arc::clone(self), r.path.clone(), r.settings.clone());
        let (params, need) = blocking(move || me.plan(&path, &settings)).await?;
        let evicted = self.wait_for_room(need, &r.settings, deadline).await?;
        drop(evicted);
        let path = r.path.clone();
        let draft = self.draft_path(&r.settings)?;
        let name = r.name.clone();
        let t0 = Instant::now();
        let engine = tokio::task::spawn_blocking(move || -> Result<_, capy_engine::Error> {
            let engine = Engine::load(&path)?;
            let mut params = params;
            let draft = match draft {
                Some((dpath, own)) => {
                    let d = Engine::load(&dpath).map_err(|e| {
                        capy_engine::Error::DraftMismatch(format!(
                            "cannot load its draft model {}: {e}",
                            dpath.display()
                        ))
                    })?;
                    match capy_engine::speculative::check_vocab(&engine.tokenizer, &d.tokenizer) {
                        Ok(()) => Some(Arc::clone(&d.model)),
                        Err(e) if own => return Err(e),
                        Err(e) => {
                            // the server-wide draft does not fit this model: serve it plain
                            tracing::warn!(model = %name, "speculation off: {e}");
                            params.spec = None;
                            None
                        }
                    }
                }
                None => None,
            };
            let batch = BatchEngine::with_draft(
                Arc::clone(&engine.model),
                Arc::clone(&engine.tokenizer),
                params,
                draft,
            );
            Ok((engine, batch))
        })
        .await
        .map_err(|e| ApiError::internal(format!("loading {}: {e}", r.name)))?;
        let (engine, batch) = engine.map_err(|e| match e {
            capy_engine::Error::Model(e) => model_error(&r.path, e),
            capy_engine::Error::Gguf(e) => gguf_error(&r.path, e),
            e @ (capy_engine::Error::Tokenizer(_) | capy_engine::Error::Template(_)) => unusable(e),
            capy_engine::Error::DraftMismatch(m) => {
                ApiError::bad_request(format!("{}: {m}", r.name)).code("bad_draft_model")
            }
            e => ApiError::internal(format!("loading {} ({}): {e}", r.name, r.path.display())),
        })?;
        let model = Arc::new(Loaded {
            sampling: r.settings.default_sampling(&engine.sampling),
            name: r.name.clone(),
            path: r.path,
            engine,
            batch,
            bytes: need,
            loaded_at: SystemTime::now(),
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            active: AtomicUsize::new(1),
            retired: Arc::clone(&self.retired),
            settings: r.settings,
        });
        let warm = model.settings.warm;
        self.lock().insert(
            r.name,
            Entry {
                model: Arc::clone(&model),
                expires: None,
                last_used: Instant::now(),
                warm,
                unload_when_idle: false,
            },
        );
        Ok(Lease {
            model,
            registry: Arc::clone(self),
            keep_alive,
        })
    }

    fn lease_loaded(self: &Arc<Self>, name: &str, keep_alive: Option<KeepAlive>) -> Option<Lease> {
        let mut map = self.lock();
        if map.get(name)?.model.batch.failure().is_some() {
            // its engine loop died: unload it so this request loads it again
            let dead = map.remove(name);
            drop(map);
            drop(dead);
            return None;
        }
        let e = map.get_mut(name)?;
        e.model.active.fetch_add(1, Ordering::AcqRel);
        e.last_used = Instant::now();
        Some(Lease {
            model: Arc::clone(&e.model),
            registry: Arc::clone(self),
            keep_alive,
        })
    }

    /// [`Registry::make_room`], waiting while busy models hold the room: each ended lease
    /// tries again, until [`RegistryConfig::load_timeout`] passes (then 503). At most
    /// `batch.max_queue` requests wait; more get 503 at once.
    async fn wait_for_room(
        &self,
        need: u64,
        settings: &ServedModel,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Arc<Loaded>>, ApiError> {
        /// Counts a waiter while it waits, whether it ends or is dropped.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let mut waiting = None;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let e = match self.make_room(need, settings) {
                Ok(v) => return Ok(v),
                Err(e) if e.code == Some("no_room") => e,
                Err(e) => return Err(e),
            };
            if waiting.is_none() {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.cfg.batch.max_queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(e);
                }
                waiting = Some(Waiting(&self.waiting));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(ApiError {
                    message: format!(
                        "{} (waited {} s for a busy model to become idle)",
                        e.message,
                        self.cfg.load_timeout.as_secs_f64()
                    ),
                    ..e
                });
            }
        }
    }

    /// Unloads idle models (not warm ones first, then the least recently used) until
    /// `need` more bytes and one more model fit. Returns the unloaded models, to be
    /// dropped by the caller outside the lock.
    fn make_room(&self, need: u64, settings: &ServedModel) -> Result<Vec<Arc<Loaded>>, ApiError> {
        // what sets the KV cache's size: the model's table, where it gives one, or the flags
        let sizes = if settings.kv_cache_size.is_some() {
            format!("models.{}.kv_cache_size in the config file", settings.name)
        } else {
            "--kv-cache-size".to_string()
        };
        // an allocation that cannot succeed would abort the process, not fail a request
        if let Some(total) = total_memory().filter(|&t| need > t) {
            return Err(ApiError::bad_request(format!(
                "the model needs {} (weights, KV cache and buffers) but this machine has {} of \
                 memory; lower {sizes}",
                human(need),
                human(total)
            ))
            .code("model_too_large"));
        }
        if let Some(budget) = self.cfg.memory_budget {
            if need > budget {
                return Err(ApiError::bad_request(format!(
                    "the model needs {} (weights, KV cache and buffers) but the memory budget is {}; \
                     raise --memory-budget or lower {sizes}",
                    human(need),
                    human(budget)
                ))
                .code("model_too_large"));
            }
        }
        let mut map = self.lock();
        let mut out = Vec::new();
        loop {
            let used: u64 = map.values().map(|e| e.model.bytes).sum();
            let fits_budget = self.cfg.memory_budget.is_none_or(|b| used + need <= b);
            if fits_budget && map.len() < self.cfg.max_loaded {
                return Ok(out);
            }
            let victim = map
                .iter()
                .filter(|(_, e)| e.model.active() == 0)
                .min_by_key(|(_, e)| (e.warm, e.last_used))
                .map(|(k, _)| k.clone());
            match victim.and_then(|v| map.remove(&v)) {
                Some(e) => out.push(e.model),
                None => {
                    let why = if fits_budget {
                        format!(
                            "{} models are loaded (the most allowed) and all are busy",
                            map.len()
                        )
                    } else {
                        format!(
                            "the model needs {} and busy models hold {} of the {} budget",
                            human(need),
                            human(used),
                            human(self.cfg.memory_budget.unwrap_or(0))
                        )
                    };
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("cannot load the model now: {why}; try again later"),
                    )
                    .code("no_room")
                    .retry_after(5));
                }
            }
        }
    }

    /// Unloads models whose keep-alive has passed and that no request holds.
    /// Also unloads models whose engine loop died and that no request holds (the next
    /// request for one loads it again).
    pub fn unload_expired(&self) -> Vec<String> {
        let now = Instant::now();
        let gone: Vec<Entry> = {
            let mut map = self.lock();
            let names: Vec<String> = map
                .iter()
                .filter(|(_, e)| {
                    e.model.active() == 0
                        && (e.expires.is_some_and(|t| t <= now)
                            || e.model.batch.failure().is_some())
                })
                .map(|(k, _)| k.clone())
                .collect();
            names.iter().filter_map(|n| map.remove(n)).collect()
        };
        gone.into_iter().map(|e| e.model.name.clone()).collect()
    }

    /// Unloads a model now if no request holds it; `false` if it is busy or not loaded.
    pub fn unload(&self, name: &str) -> bool {
        let name = name.strip_suffix(":latest").unwrap_or(name);
        let e = {
            let mut map = self.lock();
            match map.get(name) {
                Some(e) if e.model.active() == 0 => map.remove(name),
                _ => None,
            }
        };
        e.is_some()
    }

    /// Unloads a model now, or (if requests hold it) as soon as the last of them ends;
    /// `false` if it is not loaded.
    pub fn unload_soon(&self, name: &str) -> bool {
        if self.unload(name) {
            return true;
        }
        let name = name.strip_suffix(":latest").unwrap_or(name);
        match self.lock().get_mut(name) {
            Some(e) => {
                e.unload_when_idle = true;
                true
            }
            None => false,
        }
    }

    pub fn loaded(&self) -> Vec<LoadedInfo> {
        let mut v: Vec<LoadedInfo> = self
            .lock()
            .values()
            .map(|e| LoadedInfo {
                model: Arc::clone(&e.model),
                expires: e.expires,
            })
            .collect();
        v.sort_by(|a, b| a.model.name.cmp(&b.model.name));
        v
    }

    pub fn loaded_names(&self) -> Vec<String> {
        self.loaded()
            .into_iter()
            .map(|l| l.model.name.clone())
            .collect()
    }

    pub fn used_bytes(&self) -> u64 {
        self.lock().values().map(|e| e.model.bytes).sum()
    }
}

/// A model file capy cannot serve (an architecture it does not know, a malformed or
/// truncated file, a tokenizer or template it cannot build): 400 `model_not_supported`
/// saying why, so the client can tell it from a server fault. The reason names no paths.
fn unusable(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("this model cannot be served: {e}")).code("model_not_supported")
}

/// [`unusable`], except a failure to read the file, which is the server's (500, logged).
pub(crate) fn gguf_error(path: &Path, e: capy_gguf::Error) -> ApiError {
    match e {
        capy_gguf::Error::Io { .. } => ApiError::internal(format!("{}: {e}", path.display())),
        e => unusable(e),
    }
}

/// [`gguf_error`] for the model's own errors.
fn model_error(path: &Path, e: capy_model::Error) -> ApiError {
    match e {
        capy_model::Error::Gguf(e) => gguf_error(path, e),
        e => unusable(e),
    }
}

pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo), where it can be read.
fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
