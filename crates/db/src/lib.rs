//! capy's database: API keys, usage records and the per-second request and token counts
//! that replicas share for their limits.
//!
//! One code path for both back ends: sqlx's `Any` driver over SQLite (the embedded
//! default, `$CAPY_HOME/capy.db`, nothing to install) or PostgreSQL (`postgres://...`, for
//! several `capy serve` replicas). The schema is created and upgraded by versioned
//! migrations (`migrations/`, sqlx's migrator, recorded in `_sqlx_migrations`); its SQL is
//! the subset both databases read the same way (`BIGINT`, `TEXT`, `DOUBLE PRECISION`,
//! `$N` parameters).
//!
//! Secrets are never stored: a key's secret (`capy-` and 43 base-62 characters, 256 bits
//! from the operating system's generator) is shown once at creation; the database keeps its
//! SHA-256 and its first characters, to recognise it in listings.

#[cfg(feature = "testing")]
pub mod testing;
pub mod time;

use time::now_ms;

use std::borrow::Cow;

use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

/// What can go wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("no key named {0:?}")]
    NoSuchKey(String),
    #[error("a key named {0:?} exists already")]
    KeyExists(String),
    #[error("the key {0:?} is revoked already")]
    Revoked(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The database a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The back end of `url` (`sqlite:` or `postgres://`/`postgresql://`).
    ///
    /// # Errors
    /// [`Error::Invalid`] for any other scheme.
    pub fn of(url: &str) -> Result<Backend> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(Error::Invalid(format!(
                "unsupported database URL {:?}: use sqlite:PATH or postgres://USER@HOST/DB",
                redact_url(url)
            )))
        }
    }
}

/// `url` without its password (for messages and logs).
pub fn redact_url(url: &str) -> String {
    let url = &redact_query(url);
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `url` with the value of a `password=` query parameter hidden.
fn redact_query(url: &str) -> String {
    let Some((base, q)) = url.split_once('?') else {
        return url.to_string();
    };
    let q: Vec<String> = q
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_string(),
        })
        .collect();
    format!("{base}?{}", q.join("&"))
}

/// The SQLite URL of the default database in a capy home directory (created if missing,
/// so the database can be; an explicit URL's directory must exist).
pub fn default_url(home: &std::path::Path) -> String {
    let _ = std::fs::create_dir_all(home);
    format!("sqlite://{}?mode=rwc", home.join("capy.db").display())
}

/// The schema's migrations, in order.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "keys and usage",
        include_str!("../migrations/0001_keys_and_usage.sql"),
    ),
    (
        2,
        "key version and daily totals",
        include_str!("../migrations/0002_versions_and_daily_totals.sql"),
    ),
];

/// An open database (a pool of connections).
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

/// A key as stored: everything but the secret.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Key {
    /// Random public id (`key_` and 16 hex digits); usage rows refer to it.
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the secret.
    #[serde(skip)]
    pub secret_hash: String,
    /// The secret's first 9 characters, to recognise it (`capy-AbCd`).
    pub secret_prefix: String,
    /// Keys with the same tenant share a prefix cache; `None`: the key's own.
    pub tenant: Option<String>,
    pub admin: bool,
    #[serde(flatten)]
    pub limits: Limits,
    /// Models the key may use; `None`: all.
    pub models: Option<Vec<String>>,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; a revoked key is refused.
    pub revoked_at: Option<i64>,
}

impl Key {
    /// The prefix-cache tenant: the shared `tenant`, else the key's id.
    pub fn tenant_id(&self) -> &str {
        self.tenant.as_deref().unwrap_or(&self.id)
    }

    /// Whether the key may be used at `now` (unix seconds).
    pub fn active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }

    /// Whether the key may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// A key's limits; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Requests per minute (any 60 s).
    pub rpm: Option<i64>,
    /// Prompt plus completion tokens per minute (any 60 s).
    pub tpm: Option<i64>,
    /// Requests running at once.
    pub max_concurrent: Option<i64>,
    /// Prompt plus completion tokens per UTC day.
    pub tokens_per_day: Option<i64>,
    /// Prompt plus completion tokens per UTC calendar month.
    pub tokens_per_month: Option<i64>,
}

impl Limits {
    /// Each limit with its field name, in the table's order.
    pub fn named(&self) -> [(&'static str, Option<i64>); 5] {
        [
            ("rpm", self.rpm),
            ("tpm", self.tpm),
            ("max_concurrent", self.max_concurrent),
            ("tokens_per_day", self.tokens_per_day),
            ("tokens_per_month", self.tokens_per_month),
        ]
    }
}

/// What `create_key` stores.
#[derive(Clone, Debug, Default)]
pub struct NewKey {
    pub name: String,
    pub tenant: Option<String>,
    pub admin: bool,
    pub limits: Limits,
    pub models: Option<Vec<String>>,
    pub expires_at: Option<i64>,
}

/// Changes to a key: each `Some` replaces the stored value (`Some(None)` clears it).
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyUpdate {
    #[serde(default, deserialize_with = "some")]
    pub tenant: Option<Option<String>>,
    pub admin: Option<bool>,
    #[serde(default, deserialize_with = "some")]
    pub rpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "some")]
    pub tpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "some")]
    pub max_concurrent: Option<Option<i64>>,
    #[serde(default, deserialize_with = "some")]
    pub tokens_per_day: Option<Option<i64>>,
    #[serde(default, deserialize_with = "some")]
    pub tokens_per_month: Option<Option<i64>>,
    #[serde(default, deserialize_with = "some")]
    pub models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "some")]
    pub expires_at: Option<Option<i64>>,
}

/// A present JSON field (even `null`) as `Some`.
fn some<'de, T: serde::Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// One request as the usage table records it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct UsageRecord {
    /// When the request arrived, ms since the Unix epoch.
    pub time_ms: i64,
    /// The key's id; `None` without authentication.
    pub key_id: Option<String>,
    pub model: Option<String>,
    /// The route, e.g. `/v1/chat/completions`.
    pub endpoint: String,
    pub prompt_tokens: i64,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    /// HTTP status of the response.
    pub status: i64,
    /// Time to the first generated token, ms.
    pub ttft_ms: Option<f64>,
    /// Time to the response's end (its last streamed byte), ms.
    pub latency_ms: f64,
    /// The client went away before the response ended.
    pub disconnected: bool,
    /// The `capy serve` process that served it.
    pub replica: String,
}

/// A key's shared minute window as [`Db::admit_shared`] found it (times in ms).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// The request was counted (the window had room).
    pub admitted: bool,
    /// Requests in the window, this one included when admitted.
    pub requests: i64,
    pub tokens: i64,
    pub oldest_request_ms: Option<i64>,
    pub newest_request_ms: Option<i64>,
    pub oldest_token_ms: Option<i64>,
    pub newest_token_ms: Option<i64>,
}

/// Which rows a usage report covers.
#[derive(Clone, Debug, Default)]
pub struct UsageFilter {
    /// Key name.
    pub key: Option<String>,
    pub model: Option<String>,
    /// Rows from this time on, ms since the Unix epoch.
    pub since_ms: Option<i64>,
}

/// How a usage report groups rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Day,
    Key,
    Model,
    Replica,
}

/// One group of a usage report.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct UsageTotal {
    /// The day (`2026-11-30`, UTC), key name or model the row sums.
    pub group: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    /// Requests answered with a status of 400 or more.
    pub errors: i64,
    pub disconnected: i64,
    /// Mean time to the first token over the requests that had one, ms.
    pub mean_ttft_ms: Option<f64>,
    pub mean_latency_ms: f64,
}

/// A new random secret and its stored hash.
pub fn new_secret() -> Result<(String, String)> {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut s = String::from("capy-");
    let mut buf = [0u8; 64];
    // 43 characters of 62 carry 256 bits; rejection sampling keeps them uniform
    while s.len() < 5 + 43 {
        getrandom::fill(&mut buf).map_err(|e| Error::Invalid(format!("random source: {e}")))?;
        for &b in &buf {
            if b < 248 && s.len() < 5 + 43 {
                s.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    let h = hash_secret(&s);
    Ok((s, h))
}

/// The hex SHA-256 of a secret, as the key table stores it.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random_id(prefix: &str) -> Result<String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Invalid(format!("random source: {e}")))?;
    Ok(format!("{prefix}{}", hex(&b)))
}

/// Whether `name` may name a key: 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(Error::Invalid(format!(
            "bad key name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

fn check_limits(l: &Limits) -> Result<()> {
    for (name, v) in l.named() {
        if v.is_some_and(|v| v < 1) {
            return Err(Error::Invalid(format!(
                "{name} must be at least 1 (leave it out for no limit)"
            )));
        }
    }
    Ok(())
}

fn join_models(m: &Option<Vec<String>>) -> Result<Option<String>> {
    match m {
        None => Ok(None),
        Some(v) => {
            if v.is_empty() || v.iter().any(|s| s.is_empty() || s.contains(',')) {
                return Err(Error::Invalid(
                    "models must be a non-empty list of model names".into(),
                ));
            }
            Ok(Some(v.join(",")))
        }
    }
}

const KEY_COLUMNS: &str = "id, name, secret_hash, secret_prefix, tenant, is_admin, rpm, tpm, \
    max_concurrent, tokens_per_day, tokens_per_month, models, expires_at, created_at, revoked_at";

fn key_of(r: &AnyRow) -> Result<Key> {
    Ok(Key {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        secret_hash: r.try_get("secret_hash")?,
        secret_prefix: r.try_get("secret_prefix")?,
        tenant: r.try_get("tenant")?,
        admin: r.try_get::<i64, _>("is_admin")? != 0,
        limits: Limits {
            rpm: r.try_get("rpm")?,
            tpm: r.try_get("tpm")?,
            max_concurrent: r.try_get("max_concurrent")?,
            tokens_per_day: r.try_get("tokens_per_day")?,
            tokens_per_month: r.try_get("tokens_per_month")?,
        },
        models: r
            .try_get::<Option<String>, _>("models")?
            .map(|s| s.split(',').map(str::to_string).collect()),
        expires_at: r.try_get("expires_at")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

impl Db {
    /// Opens (creating a SQLite file if need be) and migrates the database at `url`.
    ///
    /// # Errors
    /// An unsupported URL, a database that cannot be reached, or a failed migration.
    pub async fn open(url: &str) -> Result<Db> {
        let backend = Backend::of(url)?;
        // a SQLite file is created when missing (sqlx's `mode=rwc`) unless the URL says
        let created;
        let url = if backend == Backend::Sqlite && !url.contains("mode=") {
            created = format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' });
            created.as_str()
        } else {
            url
        };
        sqlx::any::install_default_drivers();
        if backend == Backend::Sqlite {
            let path = url
                .trim_start_matches("sqlite:")
                .trim_start_matches("//")
                .split('?')
                .next()
                .unwrap_or("");
            if path.is_empty() || path == ":memory:" || url.contains("mode=memory") {
                return Err(Error::Invalid(
                    "an in-memory SQLite database cannot hold keys and usage: use a file \
                     (sqlite:///path/capy.db)"
                        .into(),
                ));
            }
            if let Some(dir) = std::path::Path::new(path).parent() {
                if !dir.as_os_str().is_empty() && !dir.is_dir() {
                    return Err(Error::Invalid(format!(
                        "cannot open the database {}: no directory {}",
                        redact_url(url),
                        dir.display()
                    )));
                }
            }
        }
        // one plain connection first: the pool retries until its timeout and then reports
        // only that, where this says why (refused, no such database, bad password)
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::Invalid(format!("cannot open the database {}: {e}", redact_url(url)))
        };
        match tokio::time::timeout(
            std::time::Duration::from_secs(10),
            <sqlx::AnyConnection as sqlx::Connection>::connect(url),
        )
        .await
        {
            Ok(Ok(c)) => {
                let _ = sqlx::Connection::close(c).await;
            }
            Ok(Err(e)) => return Err(unreachable(&e)),
            Err(_) => return Err(unreachable(&"no answer within 10 s")),
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(std::time::Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // the server and `capy keys` share the file: readers never wait for
                        // the writer, a writer waits (up to 5 s) for another
                        sqlx::raw_sql("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000;")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|e| unreachable(&e))?;
        let db = Db { pool, backend };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<()> {
        let mut m = sqlx::migrate::Migrator::DEFAULT;
        m.migrations = Cow::Owned(
            MIGRATIONS
                .iter()
                .map(|&(v, d, sql)| {
                    sqlx::migrate::Migration::new(
                        v,
                        d.into(),
                        sqlx::migrate::MigrationType::Simple,
                        sqlx::SqlSafeStr::into_sql_str(sql),
                        false,
                    )
                })
                .collect(),
        );
        m.run(&self.pool).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs a write on one connection; a failed one is closed instead of going back to the
    /// pool (a SQLite connection whose COMMIT failed can stay inside its transaction and
    /// hold the file's write lock).
    async fn write<T>(
        &self,
        f: impl for<'c> FnOnce(
            &'c mut sqlx::AnyConnection,
        ) -> futures_util::future::BoxFuture<'c, Result<T>>,
    ) -> Result<T> {
        let mut conn = self.pool.acquire().await?;
        let r = f(&mut conn).await;
        if r.is_err() {
            conn.close_on_drop();
        }
        r
    }

    /// Stores a new key; returns it with its secret (shown once, never stored).
    ///
    /// # Errors
    /// A bad name, limit or expiry, [`Error::KeyExists`], or the database's.
    pub async fn create_key(&self, k: &NewKey) -> Result<(Key, String)> {
        check_name(&k.name)?;
        check_limits(&k.limits)?;
        let models = join_models(&k.models)?;
        let now = now_ms();
        if k.expires_at.is_some_and(|e| e <= now / 1000) {
            return Err(Error::Invalid("expires_at is in the past".into()));
        }
        if self.key(&k.name).await?.is_some() {
            return Err(Error::KeyExists(k.name.clone()));
        }
        let (secret, hash) = new_secret()?;
        let id = random_id("key_")?;
        let k2 = k.clone();
        let prefix = secret[..9].to_string();
        self.write(move |c| {
            Box::pin(async move {
                let mut tx = sqlx::Connection::begin(c).await?;
                let l = &k2.limits;
                query(
                    "INSERT INTO api_keys (id, name, secret_hash, secret_prefix, tenant, \
                     is_admin, rpm, tpm, max_concurrent, tokens_per_day, tokens_per_month, \
                     models, expires_at, created_at, revoked_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                     NULL, $15)",
                )
                .bind(&id)
                .bind(&k2.name)
                .bind(&hash)
                .bind(&prefix)
                .bind(&k2.tenant)
                .bind(i64::from(k2.admin))
                .bind(l.rpm)
                .bind(l.tpm)
                .bind(l.max_concurrent)
                .bind(l.tokens_per_day)
                .bind(l.tokens_per_month)
                .bind(&models)
                .bind(k2.expires_at)
                .bind(now / 1000)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(d) if d.is_unique_violation() => {
                        Error::KeyExists(k2.name.clone())
                    }
                    _ => Error::Sql(e),
                })?;
                bump_version(&mut tx).await?;
                tx.commit().await?;
                Ok(())
            })
        })
        .await?;
        let key = self
            .key(&k.name)
            .await?
            .ok_or_else(|| Error::NoSuchKey(k.name.clone()))?;
        Ok((key, secret))
    }

    /// The key named `name`, revoked or not.
    pub async fn key(&self, name: &str) -> Result<Option<Key>> {
        let q = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE name = $1");
        let r = query(sqlx::AssertSqlSafe(q))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        r.as_ref().map(key_of).transpose()
    }

    /// Every key, revoked ones too, by name.
    pub async fn keys(&self) -> Result<Vec<Key>> {
        let q = format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY name");
        let rows = query(sqlx::AssertSqlSafe(q)).fetch_all(&self.pool).await?;
        rows.iter().map(key_of).collect()
    }

    /// The keys' version (bumped by every creation, change and revocation, in the same
    /// transaction; servers poll it to reload their keys) and how many keys exist.
    pub async fn keys_version(&self) -> Result<(i64, i64)> {
        let r = query(
            "SELECT (SELECT v FROM key_version WHERE id = 1) AS v, \
             (SELECT COUNT(*) FROM api_keys) AS n",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((r.try_get("v")?, r.try_get("n")?))
    }

    /// Revokes the key named `name` (it stays listed, and in usage reports).
    ///
    /// # Errors
    /// [`Error::NoSuchKey`], [`Error::Revoked`] when it is revoked already.
    pub async fn revoke_key(&self, name: &str) -> Result<Key> {
        let now = now_ms();
        let n = name.to_string();
        let changed = self
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = sqlx::Connection::begin(c).await?;
                    let done = query(
                        "UPDATE api_keys SET revoked_at = $1, updated_at = $2 \
                         WHERE name = $3 AND revoked_at IS NULL",
                    )
                    .bind(now / 1000)
                    .bind(now)
                    .bind(&n)
                    .execute(&mut *tx)
                    .await?;
                    if done.rows_affected() > 0 {
                        bump_version(&mut tx).await?;
                    }
                    tx.commit().await?;
                    Ok(done.rows_affected() > 0)
                })
            })
            .await?;
        let k = self
            .key(name)
            .await?
            .ok_or_else(|| Error::NoSuchKey(name.to_string()))?;
        if !changed {
            return Err(Error::Revoked(name.to_string()));
        }
        Ok(k)
    }

    /// Applies `u` to the key named `name`: one UPDATE of the fields `u` gives, so
    /// concurrent updates of different fields all land.
    ///
    /// # Errors
    /// [`Error::NoSuchKey`], a bad limit or model list, or the database's.
    pub async fn update_key(&self, name: &str, u: &KeyUpdate) -> Result<Key> {
        check_limits(&Limits {
            rpm: u.rpm.flatten(),
            tpm: u.tpm.flatten(),
            max_concurrent: u.max_concurrent.flatten(),
            tokens_per_day: u.tokens_per_day.flatten(),
            tokens_per_month: u.tokens_per_month.flatten(),
        })?;
        let mut sets: Vec<(&'static str, Bind)> = Vec::new();
        let opt = |v: Option<i64>| v.map_or(Bind::Null, Bind::Int);
        if let Some(v) = &u.tenant {
            sets.push(("tenant", v.clone().map_or(Bind::NullText, Bind::Text)));
        }
        if let Some(v) = u.admin {
            sets.push(("is_admin", Bind::Int(i64::from(v))));
        }
        for (col, v) in [
            ("rpm", u.rpm),
            ("tpm", u.tpm),
            ("max_concurrent", u.max_concurrent),
            ("tokens_per_day", u.tokens_per_day),
            ("tokens_per_month", u.tokens_per_month),
            ("expires_at", u.expires_at),
        ] {
            if let Some(v) = v {
                sets.push((col, opt(v)));
            }
        }
        if let Some(m) = &u.models {
            sets.push(("models", join_models(m)?.map_or(Bind::NullText, Bind::Text)));
        }
        let now = now_ms();
        let n = name.to_string();
        let changed = self
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = sqlx::Connection::begin(c).await?;
                    let mut sql = String::from("UPDATE api_keys SET updated_at = $1");
                    for (i, (col, _)) in sets.iter().enumerate() {
                        sql.push_str(&format!(", {col} = ${}", i + 2));
                    }
                    sql.push_str(&format!(" WHERE name = ${}", sets.len() + 2));
                    let mut q = query(sqlx::AssertSqlSafe(sql)).bind(now);
                    for (_, b) in sets {
                        q = b.bind(q);
                    }
                    let done = q.bind(n).execute(&mut *tx).await?;
                    if done.rows_affected() > 0 {
                        bump_version(&mut tx).await?;
                    }
                    tx.commit().await?;
                    Ok(done.rows_affected() > 0)
                })
            })
            .await?;
        if !changed {
            return Err(Error::NoSuchKey(name.to_string()));
        }
        self.key(name)
            .await?
            .ok_or_else(|| Error::NoSuchKey(name.to_string()))
    }

    /// Appends usage records in one transaction, with their tokens in the keys' daily
    /// totals and, with `shared`, in the shared minute windows. Text fields lose NUL
    /// characters (PostgreSQL refuses them) and keep at most 256 characters.
    pub async fn insert_usage(&self, rows: &[UsageRecord], shared: bool) -> Result<()> {
        let rows: Vec<UsageRecord> = rows.iter().map(clean_record).collect();
        self.write(move |c| {
            Box::pin(async move {
                let mut tx = sqlx::Connection::begin(c).await?;
                for u in &rows {
                    query(
                        "INSERT INTO usage_records (time_ms, key_id, model, endpoint, \
                         prompt_tokens, cached_tokens, completion_tokens, status, ttft_ms, \
                         latency_ms, disconnected, replica) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                    )
                    .bind(u.time_ms)
                    .bind(&u.key_id)
                    .bind(&u.model)
                    .bind(&u.endpoint)
                    .bind(u.prompt_tokens)
                    .bind(u.cached_tokens)
                    .bind(u.completion_tokens)
                    .bind(u.status)
                    .bind(u.ttft_ms)
                    .bind(u.latency_ms)
                    .bind(i64::from(u.disconnected))
                    .bind(&u.replica)
                    .execute(&mut *tx)
                    .await?;
                    let tokens = u.prompt_tokens + u.completion_tokens;
                    let Some(k) = u.key_id.as_ref().filter(|_| tokens > 0) else {
                        continue;
                    };
                    query(
                        "INSERT INTO usage_daily (key_id, day, tokens) VALUES ($1, $2, $3) \
                         ON CONFLICT (key_id, day) \
                         DO UPDATE SET tokens = usage_daily.tokens + excluded.tokens",
                    )
                    .bind(k)
                    .bind(u.time_ms.div_euclid(86_400_000))
                    .bind(tokens)
                    .execute(&mut *tx)
                    .await?;
                    if shared {
                        query(
                            "INSERT INTO rate_events (key_id, time_ms, requests, tokens) \
                             VALUES ($1, $2, 0, $3)",
                        )
                        .bind(k)
                        .bind(u.time_ms + u.latency_ms as i64)
                        .bind(tokens)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                tx.commit().await?;
                Ok(())
            })
        })
        .await
    }

    /// The shared minute window of a key at `now_ms` and, when it has room (fewer than
    /// `rpm` requests and `tpm` tokens), the request counted in it: one transaction under
    /// a per-key advisory lock, so replicas admitting at once cannot both take the last
    /// place. PostgreSQL only.
    ///
    /// # Errors
    /// The database's (SQLite has no advisory locks: shared windows need PostgreSQL).
    pub async fn admit_shared(
        &self,
        key_id: &str,
        now_ms: i64,
        rpm: Option<i64>,
        tpm: Option<i64>,
    ) -> Result<Window> {
        if self.backend != Backend::Postgres {
            return Err(Error::Invalid("shared limits need PostgreSQL".into()));
        }
        let mut tx = self.pool.begin().await?;
        query("SELECT CAST(pg_advisory_xact_lock(hashtext($1)) AS TEXT) AS l")
            .bind(key_id)
            .fetch_one(&mut *tx)
            .await?;
        let r = query(
            "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) AS requests, \
             CAST(COALESCE(SUM(tokens), 0) AS BIGINT) AS tokens, \
             MIN(CASE WHEN requests > 0 THEN time_ms END) AS r0, \
             MAX(CASE WHEN requests > 0 THEN time_ms END) AS r1, \
             MIN(CASE WHEN tokens > 0 THEN time_ms END) AS t0, \
             MAX(CASE WHEN tokens > 0 THEN time_ms END) AS t1 \
             FROM rate_events WHERE key_id = $1 AND time_ms > $2",
        )
        .bind(key_id)
        .bind(now_ms - 60_000)
        .fetch_one(&mut *tx)
        .await?;
        let mut w = Window {
            admitted: false,
            requests: r.try_get("requests")?,
            tokens: r.try_get("tokens")?,
            oldest_request_ms: r.try_get("r0")?,
            newest_request_ms: r.try_get("r1")?,
            oldest_token_ms: r.try_get("t0")?,
            newest_token_ms: r.try_get("t1")?,
        };
        if rpm.is_none_or(|m| w.requests < m) && tpm.is_none_or(|m| w.tokens < m) {
            query(
                "INSERT INTO rate_events (key_id, time_ms, requests, tokens) VALUES ($1, $2, 1, 0)",
            )
            .bind(key_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            w.admitted = true;
            w.requests += 1;
            w.oldest_request_ms.get_or_insert(now_ms);
            w.newest_request_ms = Some(now_ms);
        }
        tx.commit().await?;
        Ok(w)
    }

    /// Drops shared window rows older than `before_ms`.
    pub async fn prune_rate_events(&self, before_ms: i64) -> Result<()> {
        query("DELETE FROM rate_events WHERE time_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Prompt plus completion tokens each key used from UTC day `from_day` (days since the
    /// Unix epoch) on, from the daily totals.
    pub async fn tokens_from_day(&self, from_day: i64) -> Result<Vec<(String, i64)>> {
        let rows = query(
            "SELECT key_id, CAST(SUM(tokens) AS BIGINT) AS t FROM usage_daily \
             WHERE day >= $1 GROUP BY key_id",
        )
        .bind(from_day)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("key_id")?, r.try_get("t")?)))
            .collect()
    }

    /// The records that `f` selects, oldest first (at most `limit`).
    pub async fn usage_records(&self, f: &UsageFilter, limit: i64) -> Result<Vec<UsageRecord>> {
        let (cond, binds) = self.conditions(f).await?;
        let q = format!(
            "SELECT time_ms, key_id, model, endpoint, prompt_tokens, cached_tokens, \
             completion_tokens, status, ttft_ms, latency_ms, disconnected, replica \
             FROM usage_records u WHERE {cond} ORDER BY time_ms LIMIT {}",
            limit.max(0)
        );
        let mut query = query(sqlx::AssertSqlSafe(q));
        for b in binds {
            query = b.bind(query);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRecord {
                    time_ms: r.try_get("time_ms")?,
                    key_id: r.try_get("key_id")?,
                    model: r.try_get("model")?,
                    endpoint: r.try_get("endpoint")?,
                    prompt_tokens: r.try_get("prompt_tokens")?,
                    cached_tokens: r.try_get("cached_tokens")?,
                    completion_tokens: r.try_get("completion_tokens")?,
                    status: r.try_get("status")?,
                    ttft_ms: r.try_get("ttft_ms")?,
                    latency_ms: r.try_get("latency_ms")?,
                    disconnected: r.try_get::<i64, _>("disconnected")? != 0,
                    replica: r.try_get("replica")?,
                })
            })
            .collect()
    }

    /// The WHERE clause of a filter (a key name becomes its id: usage rows keep ids).
    async fn conditions(&self, f: &UsageFilter) -> Result<(String, Vec<Bind>)> {
        let mut cond = vec!["1 = 1".to_string()];
        let mut binds = Vec::new();
        if let Some(name) = &f.key {
            let k = self
                .key(name)
                .await?
                .ok_or_else(|| Error::NoSuchKey(name.clone()))?;
            binds.push(Bind::Text(k.id));
            cond.push(format!("u.key_id = ${}", binds.len()));
        }
        if let Some(m) = &f.model {
            // records keep a served model's name, as Ollama's answers add ":latest"
            binds.push(Bind::Text(
                m.strip_suffix(":latest").unwrap_or(m).to_string(),
            ));
            cond.push(format!("u.model = ${}", binds.len()));
        }
        if let Some(t) = f.since_ms {
            binds.push(Bind::Int(t));
            cond.push(format!("u.time_ms >= ${}", binds.len()));
        }
        Ok((cond.join(" AND "), binds))
    }

    /// Usage totals of the rows `f` selects, grouped by day, key or model.
    pub async fn usage_totals(&self, f: &UsageFilter, by: GroupBy) -> Result<Vec<UsageTotal>> {
        let (cond, binds) = self.conditions(f).await?;
        let (select, join) = match by {
            GroupBy::Day => ("CAST(u.time_ms / 86400000 AS BIGINT)", ""),
            GroupBy::Key => (
                "COALESCE(k.name, '(no key)')",
                "LEFT JOIN api_keys k ON k.id = u.key_id",
            ),
            GroupBy::Model => ("COALESCE(u.model, '(none)')", ""),
            GroupBy::Replica => ("u.replica", ""),
        };
        let q = format!(
            "SELECT {select} AS g, COUNT(*) AS requests, \
             CAST(SUM(u.prompt_tokens) AS BIGINT) AS prompt_tokens, \
             CAST(SUM(u.cached_tokens) AS BIGINT) AS cached_tokens, \
             CAST(SUM(u.completion_tokens) AS BIGINT) AS completion_tokens, \
             CAST(SUM(CASE WHEN u.status >= 400 THEN 1 ELSE 0 END) AS BIGINT) AS errors, \
             CAST(SUM(u.disconnected) AS BIGINT) AS disconnected, \
             CAST(AVG(u.ttft_ms) AS DOUBLE PRECISION) AS ttft, \
             CAST(AVG(u.latency_ms) AS DOUBLE PRECISION) AS latency \
             FROM usage_records u {join} WHERE {cond} GROUP BY {select} ORDER BY {select}"
        );
        let mut query = query(sqlx::AssertSqlSafe(q));
        for b in binds {
            query = b.bind(query);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let group = match by {
                    GroupBy::Day => time::date(r.try_get::<i64, _>("g")? * 86_400),
                    _ => r.try_get("g")?,
                };
                Ok(UsageTotal {
                    group,
                    requests: r.try_get("requests")?,
                    prompt_tokens: r.try_get("prompt_tokens")?,
                    cached_tokens: r.try_get("cached_tokens")?,
                    completion_tokens: r.try_get("completion_tokens")?,
                    errors: r.try_get("errors")?,
                    disconnected: r.try_get("disconnected")?,
                    mean_ttft_ms: r.try_get("ttft")?,
                    mean_latency_ms: r.try_get::<Option<f64>, _>("latency")?.unwrap_or(0.0),
                })
            })
            .collect()
    }
}

/// A bound value of a built query.
enum Bind {
    Text(String),
    Int(i64),
    /// A NULL in an integer column.
    Null,
    /// A NULL in a text column.
    NullText,
}

/// Bumps the keys' version inside a key change's transaction.
async fn bump_version(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<()> {
    query("UPDATE key_version SET v = v + 1 WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A record fit for any database: no NUL characters, text at most 256 characters.
fn clean_record(u: &UsageRecord) -> UsageRecord {
    let clean = |s: &str| -> String { s.chars().filter(|&c| c != '\0').take(256).collect() };
    UsageRecord {
        key_id: u.key_id.as_deref().map(clean),
        model: u.model.as_deref().map(clean),
        endpoint: clean(&u.endpoint),
        replica: clean(&u.replica),
        ..u.clone()
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// A query that is not kept prepared: sqlx's `Any` driver on PostgreSQL keeps the parameter
/// types of a statement's first execution, so a prepared statement first run with a NULL
/// then refuses a value in that place ("incorrect binary data format").
fn query<'q>(sql: impl sqlx::SqlSafeStr) -> AnyQuery<'q> {
    sqlx::query(sql).persistent(false)
}

impl Bind {
    fn bind(self, q: AnyQuery<'_>) -> AnyQuery<'_> {
        match self {
            Bind::Text(s) => q.bind(s),
            Bind::Int(i) => q.bind(i),
            Bind::Null => q.bind(None::<i64>),
            Bind::NullText => q.bind(None::<String>),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_only_hashed() {
        let (a, ha) = new_secret().unwrap();
        let (b, _) = new_secret().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("capy-") && a.len() == 48, "{a}");
        assert!(a[5..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(ha, hash_secret(&a));
        assert_eq!(ha.len(), 64);
        assert!(!ha.contains(&a[5..]));
    }

    #[test]
    fn urls() {
        assert_eq!(Backend::of("sqlite:x.db").unwrap(), Backend::Sqlite);
        assert_eq!(
            Backend::of("postgresql://u@h/d").unwrap(),
            Backend::Postgres
        );
        assert!(Backend::of("mysql://u@h/d").is_err());
        assert_eq!(
            redact_url("postgres://bob:hunter2@db:5432/capy"),
            "postgres://bob:***@db:5432/capy"
        );
        assert_eq!(
            redact_url("postgres://bob@db/capy"),
            "postgres://bob@db/capy"
        );
        assert!(check_name("team-a.prod_1").is_ok());
        assert!(check_name("").is_err() && check_name("a b").is_err());
    }
}
