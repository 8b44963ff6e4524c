//! The gateway in front of the API: API keys, per-key limits and one usage record per
//! generation request.
//!
//! - **Keys** live in the database ([`capy_db`]) as SHA-256 hashes; the server holds them in
//!   memory and reloads them when their version changes (polled every 500 ms, so a key
//!   revoked by `capy keys revoke` or another replica is refused within a second).
//! - **Auth**: `Authorization: Bearer KEY` or `x-api-key: KEY`. Required once any key
//!   exists (revoked ones count: revoking the last key does not open the server), or always
//!   with `--auth required`; `--auth off` never asks. `/health` is always open; `/admin/*`,
//!   `/api/pull` and `/api/delete` need an admin key.
//! - **Limits** per key: requests and tokens in any 60 s (sliding windows, exact: a 60 rpm
//!   key gets 60 requests in any minute, not GCRA's 60 plus one a second), requests at
//!   once, tokens per UTC day and month (checked when a request starts: a budget stops a
//!   key within one request). With `--shared-limits` (PostgreSQL), the minute windows live
//!   in the database, one transaction per request under a per-key advisory lock, so
//!   replicas share them exactly; concurrency is per replica; budgets are the database's
//!   totals refreshed every 500 ms plus this replica's unwritten usage.
//! - **Usage**: a [`Ticket`] rides with each generation request; when the last holder (the
//!   handler, or the stream that outlives it) lets go, its record is queued for a writer
//!   task that inserts in batches (every 200 ms or 256 records) and retries a database
//!   that is down, so the request path never waits on the database.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use capy_db::{Db, Key, UsageRecord};
use tokio::sync::{mpsc, oneshot};

use crate::error::{ApiError, Flavor};
use crate::AppState;

/// When requests need a key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthMode {
    /// Once any key exists.
    #[default]
    Auto,
    /// Always (no key yet: every request but `/health` is refused).
    Required,
    /// Never (keys are ignored; usage is still recorded).
    Off,
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<AuthMode, String> {
        match s {
            "auto" | "" => Ok(AuthMode::Auto),
            "required" | "on" => Ok(AuthMode::Required),
            "off" => Ok(AuthMode::Off),
            _ => Err(format!("bad auth {s:?}: use auto, required or off")),
        }
    }
}

/// How the gateway runs.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub database_url: String,
    pub auth: AuthMode,
    /// This process's name in usage records (default: host name and port).
    pub replica: String,
    /// Keep the minute windows in the database, shared by every replica (PostgreSQL).
    pub shared_limits: bool,
    /// Record usage rows (limits and budgets work either way).
    pub usage: bool,
}

const WINDOW_MS: i64 = 60_000;
const POLL: Duration = Duration::from_millis(500);

use capy_db::time::now_ms;

/// A UTC day or month and the tokens used in it.
#[derive(Clone, Copy, Debug, Default)]
struct Period {
    end: i64,
    used: i64,
}

impl Period {
    /// Moves to the period holding `now` (used from 0) when it has passed.
    fn roll(&mut self, now: i64, bounds: fn(i64) -> (i64, i64)) {
        if now >= self.end {
            *self = Period {
                end: bounds(now).1,
                used: 0,
            };
        }
    }
}

/// A key's running counts (kept across key reloads, by key id).
#[derive(Debug, Default)]
struct KeyState {
    /// Times (ms) of the requests admitted in the last minute.
    requests: VecDeque<i64>,
    /// (time ms, tokens) used in the last minute.
    tokens: VecDeque<(i64, i64)>,
    tokens_in_window: i64,
    in_flight: i64,
    /// Tokens the requests in flight may still use (their estimates), so concurrent
    /// requests cannot all pass a budget that has room for one.
    reserved: i64,
    day: Period,
    month: Period,
    /// Tokens of records not yet in the database (shared budgets add them to its totals).
    unwritten: i64,
}

impl KeyState {
    fn prune(&mut self, now: i64) {
        while self.requests.front().is_some_and(|&t| t <= now - WINDOW_MS) {
            self.requests.pop_front();
        }
        while let Some(&(t, n)) = self.tokens.front() {
            if t > now - WINDOW_MS {
                break;
            }
            self.tokens.pop_front();
            self.tokens_in_window -= n;
        }
    }
}

/// A key as the server holds it.
pub struct Entry {
    pub key: Key,
    hash: [u8; 32],
    state: Arc<Mutex<KeyState>>,
}

impl Entry {
    /// The prefix-cache salt of the key's tenant.
    pub fn salt(&self) -> String {
        format!("tenant:{}", self.key.tenant_id())
    }
}

#[derive(Default)]
struct KeyTable {
    by_hash: HashMap<[u8; 32], Arc<Entry>>,
    /// Any key exists (revoked ones too).
    any: bool,
    version: (i64, i64),
}

/// Why a request was refused before it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Invalid,
    Revoked,
    Expired,
    Forbidden,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::Missing,
        Refusal::Invalid,
        Refusal::Revoked,
        Refusal::Expired,
        Refusal::Forbidden,
    ];
    fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Invalid => "invalid",
            Refusal::Revoked => "revoked",
            Refusal::Expired => "expired",
            Refusal::Forbidden => "forbidden",
        }
    }
}

/// Per-key counters for `/metrics` (by key name).
#[derive(Default, Clone, Copy)]
struct KeyCounters {
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    limited: u64,
}

/// Buckets of the time the gateway's checks take per request, seconds.
const CHECK_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025,
];

struct Counters {
    /// Time spent on a request's key, model and limit checks (not the handler).
    check: crate::metrics::Histogram,
    auth_failures: [AtomicU64; 5],
    per_key: Mutex<HashMap<String, KeyCounters>>,
    records_written: AtomicU64,
    records_dropped: AtomicU64,
    write_errors: AtomicU64,
    pending: AtomicU64,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            check: crate::metrics::Histogram::new(CHECK_BUCKETS),
            auth_failures: Default::default(),
            per_key: Default::default(),
            records_written: Default::default(),
            records_dropped: Default::default(),
            write_errors: Default::default(),
            pending: Default::default(),
        }
    }
}

enum Msg {
    Record(UsageRecord),
    Flush(oneshot::Sender<()>),
}

/// The gateway: keys, limits and the usage writer.
pub struct Gateway {
    pub db: Db,
    cfg: GatewayConfig,
    keys: RwLock<Arc<KeyTable>>,
    states: Mutex<HashMap<String, Arc<Mutex<KeyState>>>>,
    writer: mpsc::UnboundedSender<Msg>,
    counters: Counters,
    /// Until when (ms) the shared windows are not asked (the database failed).
    shared_down_until: std::sync::atomic::AtomicI64,
}

/// Most records held while the database is down; older ones are dropped (and counted).
const MAX_PENDING: usize = 100_000;

impl Gateway {
    /// Opens the database, loads the keys and starts the usage writer and the key poller.
    ///
    /// # Errors
    /// The database's (unreachable, bad URL, failed migration).
    pub async fn start(cfg: GatewayConfig) -> Result<Arc<Gateway>, String> {
        let db = Db::open(&cfg.database_url)
            .await
            .map_err(|e| e.to_string())?;
        if cfg.shared_limits && db.backend() != capy_db::Backend::Postgres {
            return Err("shared_limits needs a PostgreSQL database_url".into());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let gw = Arc::new(Gateway {
            db,
            cfg,
            keys: RwLock::new(Arc::new(KeyTable::default())),
            states: Mutex::new(HashMap::new()),
            writer: tx,
            counters: Counters::default(),
            shared_down_until: Default::default(),
        });
        gw.reload(true).await.map_err(|e| e.to_string())?;
        tokio::spawn(writer(Arc::downgrade(&gw), rx));
        let weak = Arc::downgrade(&gw);
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut down = false;
            loop {
                tokio::time::sleep(POLL).await;
                let Some(gw) = weak.upgrade() else { return };
                n += 1;
                // a database that stays down is logged when it goes and when it comes back,
                // not twice a second
                match gw.reload(false).await {
                    Err(e) if !down => {
                        tracing::warn!("reloading API keys: {e}; keeping the keys loaded");
                        down = true;
                    }
                    Ok(()) if down => {
                        tracing::info!("the key database answers again");
                        down = false;
                    }
                    _ => {}
                }
                // shared budgets: the database's daily totals every 2 s, when a key has one
                if gw.cfg.shared_limits && !down && n.is_multiple_of(4) && gw.any_budget() {
                    if let Err(e) = gw.refresh_budgets().await {
                        tracing::warn!("reading shared token budgets: {e}");
                    }
                    if n.is_multiple_of(20) {
                        let _ = gw.db.prune_rate_events(now_ms() - 2 * WINDOW_MS).await;
                    }
                }
            }
        });
        Ok(gw)
    }

    fn any_budget(&self) -> bool {
        self.table().by_hash.values().any(|e| {
            e.key.limits.tokens_per_day.is_some() || e.key.limits.tokens_per_month.is_some()
        })
    }

    /// Reloads the keys now (after the admin API changed one).
    pub async fn reload_now(&self) {
        if let Err(e) = self.reload(true).await {
            tracing::warn!("reloading API keys: {e}");
        }
    }

    pub fn auth_mode(&self) -> AuthMode {
        self.cfg.auth
    }

    /// Whether requests need a key now.
    pub fn required(&self) -> bool {
        match self.cfg.auth {
            AuthMode::Off => false,
            AuthMode::Required => true,
            AuthMode::Auto => self.table().any,
        }
    }

    fn table(&self) -> Arc<KeyTable> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reloads the keys when their version changed (always with `force`); a key new to
    /// this process gets its day and month totals from the usage table.
    async fn reload(&self, force: bool) -> capy_db::Result<()> {
        let version = self.db.keys_version().await?;
        if !force && version == self.table().version {
            return Ok(());
        }
        let keys = self.db.keys().await?;
        let now = now_ms();
        let mut fresh = Vec::new();
        let mut by_hash = HashMap::new();
        {
            let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
            for k in &keys {
                let Some(hash) = unhex32(&k.secret_hash) else {
                    tracing::warn!("key {:?} has a malformed hash; skipped", k.name);
                    continue;
                };
                let state = Arc::clone(states.entry(k.id.clone()).or_insert_with(|| {
                    fresh.push(k.id.clone());
                    Arc::new(Mutex::new(KeyState::default()))
                }));
                by_hash.insert(
                    hash,
                    Arc::new(Entry {
                        key: k.clone(),
                        hash,
                        state,
                    }),
                );
            }
        }
        if !fresh.is_empty() {
            self.load_budgets(now, Some(&fresh)).await?;
        }
        if !self.table().any && !keys.is_empty() && self.cfg.auth == AuthMode::Auto {
            tracing::info!("an API key exists now: every request but /health needs one");
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(KeyTable {
            by_hash,
            any: !keys.is_empty(),
            version,
        });
        Ok(())
    }

    /// Sets the day and month totals of the keys `only` names (all with `None`) from the
    /// usage table, plus what this process has not written yet.
    async fn load_budgets(&self, now: i64, only: Option<&[String]>) -> capy_db::Result<()> {
        let (day0, day1) = capy_db::time::day_bounds(now);
        let (month0, month1) = capy_db::time::month_bounds(now);
        const DAY_MS: i64 = 86_400_000;
        let day: HashMap<String, i64> = self
            .db
            .tokens_from_day(day0 / DAY_MS)
            .await?
            .into_iter()
            .collect();
        let month: HashMap<String, i64> = self
            .db
            .tokens_from_day(month0 / DAY_MS)
            .await?
            .into_iter()
            .collect();
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        for (id, s) in states.iter() {
            if only.is_some_and(|o| !o.contains(id)) {
                continue;
            }
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            let extra = s.unwritten;
            s.day = Period {
                end: day1,
                used: day.get(id).copied().unwrap_or(0) + extra,
            };
            s.month = Period {
                end: month1,
                used: month.get(id).copied().unwrap_or(0) + extra,
            };
        }
        Ok(())
    }

    async fn refresh_budgets(&self) -> capy_db::Result<()> {
        self.load_budgets(now_ms(), None).await
    }

    /// The key a request's headers carry, checked.
    fn identify(&self, headers: &HeaderMap) -> Result<Arc<Entry>, Refusal> {
        let secret = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .or_else(|| {
                headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
            })
            .filter(|s| !s.is_empty())
            .ok_or(Refusal::Missing)?;
        let hash: [u8; 32] = sha2_32(secret);
        let table = self.table();
        let e = table.by_hash.get(&hash).ok_or(Refusal::Invalid)?;
        // the map found it by hash; compare the whole hash in constant time all the same
        if !constant_time_eq(&e.hash, &hash) {
            return Err(Refusal::Invalid);
        }
        if e.key.revoked_at.is_some() {
            return Err(Refusal::Revoked);
        }
        if !e.key.active(now_ms() / 1000) {
            return Err(Refusal::Expired);
        }
        Ok(Arc::clone(e))
    }

    fn count_refusal(&self, r: Refusal) {
        self.counters.auth_failures[r as usize].fetch_add(1, Relaxed);
    }

    fn refuse(&self, r: Refusal, flavor: Flavor) -> Response {
        self.count_refusal(r);
        let (status, code, msg) = match r {
            Refusal::Missing => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "an API key is required: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
            ),
            Refusal::Invalid => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "incorrect API key provided",
            ),
            Refusal::Revoked => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "this API key has been revoked",
            ),
            Refusal::Expired => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "this API key has expired",
            ),
            Refusal::Forbidden => (
                StatusCode::FORBIDDEN,
                "admin_required",
                "this route needs an admin key (capy keys create NAME --admin)",
            ),
        };
        let mut resp = ApiError::new(status, msg)
            .code(code)
            .flavor(flavor)
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }

    /// Checks a key's limits for a new request at `now` and, when it may run, counts it.
    /// `reserve` is the request's estimated tokens (prompt and the most it may generate):
    /// while other requests of the key run, a token limit admits it only if their estimates
    /// and its own fit too, so a budget is overrun by one request at most.
    async fn admit(&self, e: &Entry, now: i64, reserve: i64) -> Result<Quota, Box<Limited>> {
        let l = &e.key.limits;
        let shared = self.cfg.shared_limits && (l.rpm.is_some() || l.tpm.is_some());
        let mut quota = {
            let mut s = e.state.lock().unwrap_or_else(|p| p.into_inner());
            s.day.roll(now, capy_db::time::day_bounds);
            s.month.roll(now, capy_db::time::month_bounds);
            s.prune(now);
            let before = Quota::local(l, &s, now);
            let refuse = |what, limit, retry_after_ms, budget| {
                Err(Box::new(Limited {
                    what,
                    limit,
                    retry_after_ms,
                    quota: before,
                    budget,
                }))
            };
            if let Some(max) = l.max_concurrent {
                if s.in_flight >= max {
                    return refuse("concurrent requests", max, 1000, false);
                }
            }
            let busy = s.in_flight > 0;
            let ahead = s.reserved + reserve;
            for (what, p, max) in [
                ("tokens per day", s.day, l.tokens_per_day),
                ("tokens per month", s.month, l.tokens_per_month),
            ] {
                if let Some(max) = max {
                    if p.used >= max {
                        return refuse(what, max, p.end - now, true);
                    }
                    if busy && p.used + ahead > max {
                        // room for what runs now, not for this one too: try once they end
                        return refuse(what, max, 1000, false);
                    }
                }
            }
            if !shared {
                before.check()?;
                if let Some(tpm) = l.tpm {
                    if busy && s.tokens_in_window + ahead > tpm {
                        return refuse("tokens per minute", tpm, 1000, false);
                    }
                }
            }
            // the replica's own window is kept in shared mode too: it decides while the
            // database is unreachable
            if l.rpm.is_some() {
                s.requests.push_back(now);
            }
            s.in_flight += 1;
            s.reserved += reserve;
            // what the response reports: the window with this request in it
            Quota::local(l, &s, now)
        };
        if shared {
            // a database that is down or slow is skipped for 2 s at a time (the replica's
            // own windows decide meanwhile): requests never queue behind it
            let w = if now < self.shared_down_until.load(Relaxed) {
                Err(())
            } else {
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    self.db.admit_shared(&e.key.id, now, l.rpm, l.tpm),
                )
                .await
                {
                    Ok(Ok(w)) => Ok(w),
                    Ok(Err(err)) => {
                        tracing::warn!("shared limits unavailable for 2 s: {err}");
                        Err(())
                    }
                    Err(_) => {
                        tracing::warn!("shared limits unavailable for 2 s: no answer within 1 s");
                        Err(())
                    }
                }
            };
            if w.is_err() {
                self.shared_down_until.store(now_ms() + 2000, Relaxed);
            }
            let r = match w {
                Ok(w) => {
                    quota = Quota::shared(l, &w, now);
                    if w.admitted {
                        Ok(quota)
                    } else {
                        quota.check().map(|()| quota)
                    }
                }
                // the database is down: the replica's own windows decide (without this
                // request, counted in them above)
                Err(_) => {
                    let mut s = e.state.lock().unwrap_or_else(|p| p.into_inner());
                    let mine = s.requests.iter().rposition(|&t| t == now);
                    if let Some(i) = mine {
                        s.requests.remove(i);
                    }
                    let r = Quota::local(l, &s, now).check();
                    if l.rpm.is_some() {
                        s.requests.push_back(now);
                    }
                    r.map(|()| Quota::local(l, &s, now))
                }
            };
            if r.is_err() {
                let mut s = e.state.lock().unwrap_or_else(|p| p.into_inner());
                s.in_flight -= 1;
                s.reserved -= reserve;
                if let Some(i) = s.requests.iter().rposition(|&t| t == now) {
                    s.requests.remove(i);
                }
            }
            return r;
        }
        Ok(quota)
    }

    fn count_key(&self, name: &str, f: impl FnOnce(&mut KeyCounters)) {
        let mut m = self
            .counters
            .per_key
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f(m.entry(name.to_string()).or_default());
    }

    /// Writes every queued usage record now (at shutdown).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writer.send(Msg::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
        let left = self.counters.pending.load(Relaxed);
        if left > 0 {
            tracing::error!("{left} usage records could not be written (the database is down)");
        }
    }

    /// The gateway's lines of `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        self.counters.check.render(
            out,
            "capy_gateway_check_seconds",
            "Time the gateway's key, model and limit checks took per request.",
        );
        let _ = writeln!(
            out,
            "# HELP capy_auth_failures_total Requests refused for their API key, by reason.\n\
             # TYPE capy_auth_failures_total counter"
        );
        for (r, n) in Refusal::ALL.iter().zip(&self.counters.auth_failures) {
            let _ = writeln!(
                out,
                "capy_auth_failures_total{{reason=\"{}\"}} {}",
                r.label(),
                n.load(Relaxed)
            );
        }
        let per_key = self
            .counters
            .per_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut names: Vec<&String> = per_key.keys().collect();
        names.sort();
        for (metric, help, get) in [
            (
                "capy_key_requests_total",
                "Generation requests by API key name.",
                (|c: &KeyCounters| c.requests) as fn(&KeyCounters) -> u64,
            ),
            (
                "capy_key_prompt_tokens_total",
                "Prompt tokens by API key name.",
                |c: &KeyCounters| c.prompt_tokens,
            ),
            (
                "capy_key_completion_tokens_total",
                "Completion tokens by API key name.",
                |c: &KeyCounters| c.completion_tokens,
            ),
            (
                "capy_key_rate_limited_total",
                "Requests refused by a limit (429), by API key name.",
                |c: &KeyCounters| c.limited,
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for n in &names {
                let _ = writeln!(out, "{metric}{{key=\"{n}\"}} {}", get(&per_key[*n]));
            }
        }
        for (metric, help, v) in [
            (
                "capy_usage_records_written_total",
                "Usage records written to the database.",
                self.counters.records_written.load(Relaxed),
            ),
            (
                "capy_usage_records_dropped_total",
                "Usage records lost because the database stayed down too long.",
                self.counters.records_dropped.load(Relaxed),
            ),
            (
                "capy_usage_write_errors_total",
                "Failed attempts to write usage records (retried).",
                self.counters.write_errors.load(Relaxed),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {metric} {help}\n# TYPE {metric} counter\n{metric} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP capy_usage_records_pending Usage records waiting to be written.\n\
             # TYPE capy_usage_records_pending gauge\ncapy_usage_records_pending {}",
            self.counters.pending.load(Relaxed)
        );
    }
}

fn sha2_32(secret: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16)?;
        let lo = (b[2 * i + 1] as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Equality that takes the same time wherever the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let d = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(d) == 0
}

/// A key's minute windows as a response reports them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quota {
    rpm: Option<i64>,
    requests: i64,
    /// ms until the oldest counted request leaves the window.
    request_free_ms: i64,
    /// ms until every counted request has left.
    request_reset_ms: i64,
    tpm: Option<i64>,
    tokens: i64,
    token_free_ms: i64,
    token_reset_ms: i64,
}

impl Quota {
    /// The server's own windows, as [`Quota::shared`] reads the database's.
    fn local(l: &capy_db::Limits, s: &KeyState, now: i64) -> Quota {
        let w = capy_db::Window {
            admitted: false,
            requests: s.requests.len() as i64,
            tokens: s.tokens_in_window,
            oldest_request_ms: s.requests.front().copied(),
            newest_request_ms: s.requests.back().copied(),
            oldest_token_ms: s.tokens.front().map(|x| x.0),
            newest_token_ms: s.tokens.back().map(|x| x.0),
        };
        Quota::shared(l, &w, now)
    }

    fn shared(l: &capy_db::Limits, w: &capy_db::Window, now: i64) -> Quota {
        let left = |t: Option<i64>| t.map_or(0, |t| (t + WINDOW_MS - now).max(0));
        Quota {
            rpm: l.rpm,
            requests: w.requests,
            request_free_ms: left(w.oldest_request_ms),
            request_reset_ms: left(w.newest_request_ms),
            tpm: l.tpm,
            tokens: w.tokens,
            token_free_ms: left(w.oldest_token_ms),
            token_reset_ms: left(w.newest_token_ms),
        }
    }

    /// Refuses a request the windows have no room for.
    fn check(&self) -> Result<(), Box<Limited>> {
        if let Some(rpm) = self.rpm {
            if self.requests >= rpm {
                return Err(Box::new(Limited {
                    what: "requests per minute",
                    limit: rpm,
                    retry_after_ms: self.request_free_ms,
                    quota: *self,
                    budget: false,
                }));
            }
        }
        if let Some(tpm) = self.tpm {
            if self.tokens >= tpm {
                return Err(Box::new(Limited {
                    what: "tokens per minute",
                    limit: tpm,
                    retry_after_ms: self.token_free_ms,
                    quota: *self,
                    budget: false,
                }));
            }
        }
        Ok(())
    }

    /// OpenAI's `x-ratelimit-*` headers (for the limits the key has).
    fn headers(&self, h: &mut HeaderMap) {
        let mut put = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        if let Some(rpm) = self.rpm {
            put("x-ratelimit-limit-requests", rpm.to_string());
            put(
                "x-ratelimit-remaining-requests",
                (rpm - self.requests).max(0).to_string(),
            );
            put(
                "x-ratelimit-reset-requests",
                go_duration(self.request_reset_ms),
            );
        }
        if let Some(tpm) = self.tpm {
            put("x-ratelimit-limit-tokens", tpm.to_string());
            put(
                "x-ratelimit-remaining-tokens",
                (tpm - self.tokens).max(0).to_string(),
            );
            put("x-ratelimit-reset-tokens", go_duration(self.token_reset_ms));
        }
    }
}

/// A duration as OpenAI's headers write it (Go's format: `20ms`, `1.5s`, `6m0s`).
fn go_duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, ms) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (ms / 60_000, ms % 60_000);
    let secs = if rest % 1000 == 0 {
        format!("{}s", rest / 1000)
    } else {
        let s = format!("{:.3}", rest as f64 / 1000.0);
        format!("{}s", s.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}")
    } else if m > 0 {
        format!("{m}m{secs}")
    } else {
        secs
    }
}

/// A request over one of its key's limits.
#[derive(Debug)]
pub struct Limited {
    what: &'static str,
    limit: i64,
    retry_after_ms: i64,
    quota: Quota,
    budget: bool,
}

impl Limited {
    fn response(&self, key: &str, flavor: Flavor) -> Response {
        let secs = ((self.retry_after_ms.max(0) + 999) / 1000).max(1) as u64;
        let (code, msg) = if self.budget {
            (
                "insufficient_quota",
                format!(
                    "key {key:?} has used its {} {} budget; it renews in {}",
                    self.limit,
                    self.what,
                    go_duration(self.retry_after_ms)
                ),
            )
        } else {
            (
                "rate_limit_exceeded",
                format!(
                    "rate limit reached for key {key:?}: {} {}; try again in {}",
                    self.limit,
                    self.what,
                    go_duration(self.retry_after_ms)
                ),
            )
        };
        let mut r = ApiError::new(StatusCode::TOO_MANY_REQUESTS, msg)
            .code(code)
            .retry_after(secs)
            .flavor(flavor)
            .into_response();
        self.quota.headers(r.headers_mut());
        r
    }
}

/// One generation request's usage, recorded when the last holder drops it.
pub struct Ticket {
    gw: Arc<Gateway>,
    pub key: Option<Arc<Entry>>,
    /// The tokens reserved for it at admission, given back when it ends.
    reserve: i64,
    /// Its key's limits let it run (it holds a place in the key's concurrency count).
    admitted: bool,
    t0: Instant,
    time_ms: i64,
    endpoint: &'static str,
    model: Option<String>,
    tally: Mutex<Tally>,
}

/// What a request used, filled in by the handler and its generation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    pub status: u16,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Seconds from arrival to the first token.
    pub ttft: Option<f64>,
    pub disconnected: bool,
}

impl Ticket {
    /// The prefix-cache salt: the key's tenant, or none.
    pub fn salt(&self) -> String {
        self.key.as_ref().map_or_else(String::new, |e| e.salt())
    }

    /// Notes the request's first generated token (later calls change nothing).
    pub fn first_token(&self) {
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        if t.ttft.is_none() {
            t.ttft = Some(self.t0.elapsed().as_secs_f64());
        }
    }

    /// Adds what one generation used (a request may run several: an ensemble's members,
    /// a router's classifier and member).
    pub fn add_tokens(&self, prompt: usize, cached: usize, completion: usize, gone: bool) {
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        t.prompt_tokens += prompt;
        t.cached_tokens += cached;
        t.completion_tokens += completion;
        t.disconnected |= gone;
    }

    fn set_status(&self, status: u16) {
        self.tally.lock().unwrap_or_else(|e| e.into_inner()).status = status;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = *self.tally.get_mut().unwrap_or_else(|e| e.into_inner());
        if t.status == 0 {
            // the handler never answered: the client left first (nginx's 499)
            t.status = 499;
            t.disconnected = true;
        }
        let used = (t.prompt_tokens + t.completion_tokens) as i64;
        let now = now_ms();
        if let Some(e) = &self.key {
            let mut s = e.state.lock().unwrap_or_else(|p| p.into_inner());
            if self.admitted {
                s.in_flight -= 1;
                s.reserved -= self.reserve;
            }
            if used > 0 {
                s.prune(now);
                if e.key.limits.tpm.is_some() {
                    s.tokens.push_back((now, used));
                    s.tokens_in_window += used;
                }
                s.day.roll(now, capy_db::time::day_bounds);
                s.month.roll(now, capy_db::time::month_bounds);
                s.day.used += used;
                s.month.used += used;
                s.unwritten += used;
            }
            drop(s);
            self.gw.count_key(&e.key.name, |c| {
                c.requests += 1;
                c.prompt_tokens += t.prompt_tokens as u64;
                c.completion_tokens += t.completion_tokens as u64;
            });
        }
        let rec = UsageRecord {
            time_ms: self.time_ms,
            key_id: self.key.as_ref().map(|e| e.key.id.clone()),
            model: self.model.take(),
            endpoint: self.endpoint.to_string(),
            prompt_tokens: t.prompt_tokens as i64,
            cached_tokens: t.cached_tokens as i64,
            completion_tokens: t.completion_tokens as i64,
            status: i64::from(t.status),
            ttft_ms: t.ttft.map(|s| s * 1e3),
            latency_ms: self.t0.elapsed().as_secs_f64() * 1e3,
            disconnected: t.disconnected,
            replica: self.gw.cfg.replica.clone(),
        };
        if self.gw.cfg.usage {
            self.gw.counters.pending.fetch_add(1, Relaxed);
            let _ = self.gw.writer.send(Msg::Record(rec));
        }
    }
}

/// Writes usage records in batches; keeps them (up to [`MAX_PENDING`]) while the database
/// is down and retries every second.
async fn writer(gw: std::sync::Weak<Gateway>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut pending: VecDeque<UsageRecord> = VecDeque::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut failing = false;
    loop {
        // wait for work: at once when something is pending (after a pause when failing)
        let wait = if failing {
            Duration::from_secs(1)
        } else if pending.is_empty() {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(200)
        };
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        let mut closed = false;
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Msg::Record(r)) => {
                        pending.push_back(r);
                        if failing {
                            continue;
                        }
                        if pending.len() >= 256 {
                            break;
                        }
                        if pending.len() == 1 {
                            // the first record of a batch: written within 200 ms
                            deadline
                                .as_mut()
                                .reset(tokio::time::Instant::now() + Duration::from_millis(200));
                        }
                    }
                    Some(Msg::Flush(done)) => { waiting.push(done); break; }
                    None => { closed = true; break; }
                },
                _ = &mut deadline => break,
            }
        }
        let Some(g) = gw.upgrade() else { return };
        if pending.len() > MAX_PENDING {
            let lost: Vec<UsageRecord> = pending.drain(..pending.len() - MAX_PENDING).collect();
            g.counters
                .records_dropped
                .fetch_add(lost.len() as u64, Relaxed);
            settle(&g, &lost);
        }
        if !pending.is_empty() {
            let batch: Vec<UsageRecord> = pending.iter().take(1024).cloned().collect();
            // which of the batch were written; `None`: none, the database is down
            let written: Option<Vec<bool>> =
                match g.db.insert_usage(&batch, g.cfg.shared_limits).await {
                    Ok(()) => Some(vec![true; batch.len()]),
                    Err(e) => {
                        g.counters.write_errors.fetch_add(1, Relaxed);
                        // one by one: a record the database refuses while it takes the
                        // others would otherwise hold every later one back forever
                        let mut ok = vec![false; batch.len()];
                        if batch.len() > 1 {
                            for (i, r) in batch.iter().enumerate() {
                                let one = std::slice::from_ref(r);
                                ok[i] = g.db.insert_usage(one, g.cfg.shared_limits).await.is_ok();
                            }
                        }
                        if ok.contains(&true) {
                            Some(ok)
                        } else {
                            if !failing {
                                tracing::warn!(
                                    "writing {} usage records: {e}; keeping them and retrying",
                                    pending.len()
                                );
                            }
                            failing = true;
                            None
                        }
                    }
                };
            if let Some(ok) = written {
                if failing {
                    tracing::info!("usage records are being written again");
                }
                failing = false;
                let done: Vec<UsageRecord> = pending.drain(..ok.len()).collect();
                let refused = ok.iter().filter(|&&w| !w).count();
                if refused > 0 {
                    // the database works: the records it refuses are dropped
                    tracing::warn!("the database refused {refused} usage records; dropped");
                    g.counters
                        .records_dropped
                        .fetch_add(refused as u64, Relaxed);
                }
                g.counters
                    .records_written
                    .fetch_add((ok.len() - refused) as u64, Relaxed);
                settle(&g, &done);
            }
        }
        // a flush is answered once everything before it is written (or the database is down)
        if pending.is_empty() || failing {
            for w in waiting.drain(..) {
                let _ = w.send(());
            }
        }
        if closed && (pending.is_empty() || failing) {
            if !pending.is_empty() {
                tracing::error!(
                    "{} usage records could not be written before the server stopped",
                    pending.len()
                );
            }
            return;
        }
    }
}

/// Records that left the writer's queue (written or dropped): no longer pending, and
/// their tokens no longer "not yet in the database" for shared budgets.
fn settle(g: &Gateway, records: &[UsageRecord]) {
    g.counters.pending.fetch_sub(records.len() as u64, Relaxed);
    let states = g.states.lock().unwrap_or_else(|e| e.into_inner());
    for r in records {
        if let Some(s) = r.key_id.as_ref().and_then(|id| states.get(id)) {
            s.lock().unwrap_or_else(|e| e.into_inner()).unwritten -=
                r.prompt_tokens + r.completion_tokens;
        }
    }
}

/// The generation routes: the ones limits and usage records apply to.
pub fn is_generation(route: &str) -> bool {
    matches!(
        route,
        "/v1/chat/completions" | "/v1/completions" | "/api/generate" | "/api/chat"
    )
}

/// Routes only an admin key may use when keys are required (`/metrics` names every key
/// and its usage).
fn admin_only(path: &str) -> bool {
    path == "/admin"
        || path.starts_with("/admin/")
        || matches!(path, "/api/pull" | "/api/delete" | "/metrics")
}

/// The caller of a request, once its key is checked.
#[derive(Clone)]
pub struct Caller(pub Option<Arc<Entry>>);

/// First layer (before the body is read): checks the request's key.
pub async fn authenticate(
    State(st): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(gw) = st.gateway.clone() else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_string();
    if path == "/health" {
        return next.run(req).await;
    }
    let t = Instant::now();
    let flavor = crate::flavor_of(&path);
    let required = gw.required();
    let admin = path == "/admin" || path.starts_with("/admin/");
    let caller = if required || admin {
        match gw.identify(req.headers()) {
            Ok(e) => {
                if admin_only(&path) && !e.key.admin {
                    return gw.refuse(Refusal::Forbidden, flavor);
                }
                Some(e)
            }
            Err(Refusal::Missing) if admin && !required => {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "the admin API needs an admin key: create one with `capy keys create NAME --admin`",
                )
                .code("admin_required")
                .into_response();
            }
            Err(r) => return gw.refuse(r, flavor),
        }
    } else {
        None
    };
    req.extensions_mut().insert(Caller(caller));
    let spent = t.elapsed();
    if is_generation(&path) {
        // the limit layer adds its part and records the whole
        req.extensions_mut().insert(CheckTime(spent));
    } else {
        gw.counters.check.observe(spent.as_secs_f64());
    }
    next.run(req).await
}

/// Time [`authenticate`] spent on a request.
#[derive(Clone, Copy)]
struct CheckTime(Duration);

/// Whether the key may use `model`: a name on its list, or a name (alias, `NAME:latest`)
/// of a served model that is.
fn model_allowed(st: &AppState, e: &Entry, model: &str) -> bool {
    e.key.allows(model)
        || st
            .registry
            .served_name(model)
            .is_some_and(|n| e.key.allows(&n))
        || st
            .virtuals
            .get(model)
            .is_some_and(|v| e.key.allows(&v.name))
}

fn not_allowed(model: &str, flavor: Flavor) -> Response {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!("this API key may not use model {model:?}"),
    )
    .code("model_not_allowed")
    .param("model")
    .flavor(flavor)
    .into_response()
}

impl Caller {
    /// Whether the caller may see or use `model` (no key: any).
    pub fn allows(&self, model: &str) -> bool {
        self.0.as_ref().is_none_or(|e| e.key.allows(model))
    }
}

/// Second layer (after the body is read), on the generation routes: the key's models and
/// limits, then a [`Ticket`] for the handler, and the limit headers on the response.
pub async fn limit(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(gw) = st.gateway.clone() else {
        return next.run(req).await;
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let key = req.extensions().get::<Caller>().and_then(|c| c.0.clone());
    // only a POST runs a generation (a GET or an OPTIONS preflight is the handler's 405)
    let generation = is_generation(&route) && req.method() == axum::http::Method::POST;
    if !generation {
        return bound_to_models(&st, &gw, key, &route, req, next).await;
    }
    let endpoint: &'static str = match route.as_str() {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/api/generate" => "/api/generate",
        _ => "/api/chat",
    };
    let flavor = crate::flavor_of(endpoint);
    let t0 = Instant::now();
    let time_ms = now_ms();
    let (parts, body) = req.into_parts();
    // read_body has the whole body in memory already: this takes it back without a copy
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    // read as the handlers read it (a repeated field: the last one wins); a body that is
    // not JSON is the handler's to refuse
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let named = v.get("model").and_then(|m| m.as_str()).map(str::to_string);
    // an ensemble runs every candidate (and its judge) on the request
    let generations = named
        .as_deref()
        .and_then(|m| st.virtuals.get(m))
        .map_or(1, |v| v.generations());
    let reserve = estimate_tokens(&v, bytes.len()).saturating_mul(generations as i64);
    let mut req = Request::from_parts(parts, axum::body::Body::from(bytes));
    // the record names the served model (an alias or NAME:latest as its name)
    let model = named
        .as_ref()
        .map(|m| st.registry.served_name(m).unwrap_or_else(|| m.clone()));
    if let Some(e) = &key {
        if let Some(m) = named.as_ref().filter(|m| !model_allowed(&st, e, m)) {
            gw.count_refusal(Refusal::Forbidden);
            return not_allowed(m, flavor);
        }
    }
    let mut ticket = Ticket {
        gw: Arc::clone(&gw),
        key: key.clone(),
        reserve: 0,
        admitted: false,
        t0,
        time_ms,
        endpoint,
        model,
        tally: Mutex::new(Tally::default()),
    };
    let quota = match &key {
        Some(e) => {
            match gw.admit(e, time_ms, reserve).await {
                Ok(q) => {
                    ticket.reserve = reserve;
                    ticket.admitted = true;
                    Some(q)
                }
                Err(l) => {
                    gw.count_key(&e.key.name, |c| c.limited += 1);
                    let r = l.response(&e.key.name, flavor);
                    // the refusal is a request too: recorded (on drop), with its status
                    ticket.set_status(r.status().as_u16());
                    return r;
                }
            }
        }
        None => None,
    };
    let ticket = Arc::new(ticket);
    req.extensions_mut().insert(Arc::clone(&ticket));
    let before = req
        .extensions()
        .get::<CheckTime>()
        .map_or(Duration::ZERO, |c| c.0);
    gw.counters
        .check
        .observe((before + t0.elapsed()).as_secs_f64());
    let mut resp = next.run(req).await;
    ticket.set_status(resp.status().as_u16());
    if let Some(q) = quota {
        q.headers(resp.headers_mut());
    }
    resp
}

/// A request's tokens, estimated before it is tokenized: its body's bytes over 4 for the
/// prompt, plus the most it may generate (`max_tokens`, `max_completion_tokens` or
/// `options.num_predict`, else 256) for each of its `n` choices.
fn estimate_tokens(v: &serde_json::Value, body_bytes: usize) -> i64 {
    let most = ["max_tokens", "max_completion_tokens"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|x| x.as_i64()))
        .or_else(|| v.pointer("/options/num_predict").and_then(|x| x.as_i64()))
        .filter(|&m| m > 0)
        .unwrap_or(256)
        .min(1 << 20);
    let n = v
        .get("n")
        .and_then(|x| x.as_i64())
        .unwrap_or(1)
        .clamp(1, 16);
    (body_bytes / 4) as i64 + most * n
}

/// The routes besides generation that name a model keep to a key's models: `/api/show`
/// (`model` or `name`), `/tokenize` and `/detokenize` (`model`; a key with a list must
/// name one), `/v1/models/ID`.
async fn bound_to_models(
    st: &AppState,
    gw: &Gateway,
    key: Option<Arc<Entry>>,
    route: &str,
    req: Request,
    next: Next,
) -> Response {
    let Some(e) = key.filter(|e| e.key.models.is_some()) else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_string();
    let flavor = crate::flavor_of(&path);
    if route == "/v1/models/{*id}" {
        let id = path.strip_prefix("/v1/models/").unwrap_or_default();
        if !model_allowed(st, &e, id) {
            gw.count_refusal(Refusal::Forbidden);
            return not_allowed(id, flavor);
        }
        return next.run(req).await;
    }
    let fields: &[&str] = match route {
        "/api/show" => &["model", "name"],
        "/tokenize" | "/detokenize" => &["model"],
        _ => return next.run(req).await,
    };
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let named = fields
        .iter()
        .find_map(|f| v.get(*f).and_then(|m| m.as_str()).map(str::to_string));
    match named {
        Some(m) if !model_allowed(st, &e, &m) => {
            gw.count_refusal(Refusal::Forbidden);
            return not_allowed(&m, flavor);
        }
        None if route != "/api/show" => {
            // the server's default model may not be one of the key's
            return ApiError::bad_request("this API key must name a model it may use")
                .param("model")
                .flavor(flavor)
                .into_response();
        }
        _ => {}
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_openai_writes_them() {
        assert_eq!(go_duration(20), "20ms");
        assert_eq!(go_duration(1000), "1s");
        assert_eq!(go_duration(1500), "1.5s");
        assert_eq!(go_duration(360_000), "6m0s");
        assert_eq!(go_duration(61_250), "1m1.25s");
        assert_eq!(go_duration(-5), "0ms");
        assert_eq!(go_duration(33_724_731), "9h22m4.731s");
    }

    #[test]
    fn hashes_and_comparison() {
        let h = sha2_32("capy-abc");
        assert_eq!(unhex32(&capy_db::hash_secret("capy-abc")), Some(h));
        assert!(constant_time_eq(&h, &h));
        let mut g = h;
        g[31] ^= 1;
        assert!(!constant_time_eq(&h, &g));
        assert_eq!(unhex32("zz"), None);
        assert_eq!("required".parse::<AuthMode>(), Ok(AuthMode::Required));
        assert!("maybe".parse::<AuthMode>().is_err());
    }

    #[test]
    fn windows_slide() {
        let mut s = KeyState::default();
        for t in [0, 10_000, 59_999] {
            s.requests.push_back(t);
            s.tokens.push_back((t, 5));
            s.tokens_in_window += 5;
        }
        s.prune(60_000);
        assert_eq!(s.requests.len(), 2);
        assert_eq!(s.tokens_in_window, 10);
        let l = capy_db::Limits {
            rpm: Some(2),
            tpm: Some(100),
            ..Default::default()
        };
        let q = Quota::local(&l, &s, 60_000);
        let e = q.check().unwrap_err();
        assert_eq!(e.retry_after_ms, 10_000);
        assert_eq!(q.request_reset_ms, 59_999);
        let mut h = HeaderMap::new();
        q.headers(&mut h);
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "90");
        assert_eq!(h["x-ratelimit-reset-requests"], "59.999s");
    }
}
