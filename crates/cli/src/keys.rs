//! `capy keys` and `capy usage`: API keys and usage records in the server's database
//! (`--database-url`, `CAPY_DATABASE_URL`, the config file's `database_url`, else
//! `capy.db` in CAPY_HOME). They work on the database directly, with or without a running
//! server; a running server picks changes up within a second.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use capy_db::{Db, GroupBy, Key, KeyUpdate, Limits, NewKey, UsageFilter};

/// Where the database is.
#[derive(clap::Args, Clone)]
pub struct DbArgs {
    /// `sqlite:PATH` or `postgres://USER@HOST/DB` [default: the config file's
    /// database_url, else capy.db in CAPY_HOME].
    #[arg(long, env = "CAPY_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// The server's config file (for its database_url) [default: config.toml in CAPY_HOME].
    #[arg(long, env = "CAPY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

impl DbArgs {
    fn url(&self) -> Result<String> {
        if let Some(u) = self.database_url.as_ref().filter(|u| !u.trim().is_empty()) {
            return Ok(u.trim().to_string());
        }
        // the config file named (or CAPY_HOME's config.toml) gives the server's database
        let home = capy_store::Store::open_default().root;
        if let Some(p) = capy_server::config::config_path(self.config.as_deref(), &home) {
            let cfg = capy_server::config::Config::from_file(&p).map_err(|e| anyhow!(e))?;
            if !cfg.database_url.trim().is_empty() {
                return Ok(cfg.database_url.trim().to_string());
            }
        }
        Ok(capy_db::default_url(&home))
    }
}

#[derive(clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    cmd: KeysCmd,
    #[command(flatten)]
    db: DbArgs,
}

/// A key's limits and permissions as flags.
#[derive(clap::Args, Default)]
struct KeyFlags {
    /// Requests per minute (any 60 s) [`none`: no limit].
    #[arg(long, value_parser = limit)]
    rpm: Option<Limit>,
    /// Prompt plus completion tokens per minute.
    #[arg(long, value_parser = limit)]
    tpm: Option<Limit>,
    /// Requests running at once.
    #[arg(long, value_parser = limit)]
    max_concurrent: Option<Limit>,
    /// Prompt plus completion tokens per UTC day.
    #[arg(long, value_parser = limit)]
    tokens_per_day: Option<Limit>,
    /// Prompt plus completion tokens per UTC calendar month.
    #[arg(long, value_parser = limit)]
    tokens_per_month: Option<Limit>,
    /// Models the key may use, comma-separated [`all`: every model].
    #[arg(long)]
    models: Option<String>,
    /// Refuse the key from this date (YYYY-MM-DD, UTC) [`never`].
    #[arg(long)]
    expires: Option<String>,
    /// Keys with the same tenant share a prefix cache [default: the key's own].
    #[arg(long)]
    tenant: Option<String>,
}

/// A limit flag's value: a positive number, or `none` (`None`) for no limit.
#[derive(Clone, Copy, Debug, Default)]
struct Limit(Option<i64>);

fn limit(s: &str) -> Result<Limit, String> {
    if s == "none" {
        return Ok(Limit(None));
    }
    match s.parse::<i64>() {
        Ok(n) if n >= 1 => Ok(Limit(Some(n))),
        _ => Err(format!("{s:?} is not a positive number (or `none`)")),
    }
}

/// The flag's value for a new key (`None`: no limit).
fn given(l: Option<Limit>) -> Option<i64> {
    l.and_then(|l| l.0)
}

/// The flag as a change (`None`: leave the limit; `Some(None)`: remove it).
fn change(l: Option<Limit>) -> Option<Option<i64>> {
    l.map(|l| l.0)
}

impl KeyFlags {
    fn models(&self) -> Result<Option<Option<Vec<String>>>> {
        Ok(match self.models.as_deref() {
            None => None,
            Some("all") => Some(None),
            Some(m) => {
                let v: Vec<String> = m
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if v.is_empty() {
                    bail!("--models needs model names (or `all`)");
                }
                Some(Some(v))
            }
        })
    }

    fn expires(&self) -> Result<Option<Option<i64>>> {
        Ok(match self.expires.as_deref() {
            None => None,
            Some("never") => Some(None),
            Some(d) => Some(Some(capy_db::time::parse_date(d).map_err(|e| anyhow!(e))?)),
        })
    }
}

#[derive(clap::Subcommand)]
enum KeysCmd {
    /// Create a key and print its secret (shown once: only its hash is stored).
    Create {
        /// The key's name (also as --name).
        #[arg(value_name = "NAME", required_unless_present = "name_flag")]
        name: Option<String>,
        #[arg(long = "name", conflicts_with = "name")]
        name_flag: Option<String>,
        /// May use the admin API (/admin/keys, /admin/usage) and /api/pull, /api/delete.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        flags: KeyFlags,
    },
    /// List the keys (never their secrets).
    #[command(alias = "ls")]
    List {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: requests with it are refused from now on.
    Revoke { name: String },
    /// Change a key's limits, models, expiry, tenant or admin right.
    Update {
        name: String,
        /// Make it an admin key (`--admin false` to take the right away).
        #[arg(long)]
        admin: Option<bool>,
        #[command(flatten)]
        flags: KeyFlags,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

async fn open(db: &DbArgs) -> Result<Db> {
    let url = db.url()?;
    Db::open(&url).await.map_err(|e| anyhow!(e))
}

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn describe(k: &Key) -> String {
    let mut parts: Vec<String> = k
        .limits
        .named()
        .iter()
        .filter_map(|(n, v)| v.map(|v| format!("{n} {v}")))
        .collect();
    if parts.is_empty() {
        parts.push("no limits".into());
    }
    if let Some(m) = &k.models {
        parts.push(format!("models {}", m.join(",")));
    }
    if let Some(t) = &k.tenant {
        parts.push(format!("tenant {t}"));
    }
    if let Some(e) = k.expires_at {
        parts.push(format!("expires {}", capy_db::time::date(e)));
    }
    parts.join(", ")
}

fn status(k: &Key, now: i64) -> String {
    if let Some(t) = k.revoked_at {
        format!("revoked {}", capy_db::time::date(t))
    } else if k.expires_at.is_some_and(|e| now >= e) {
        "expired".into()
    } else if let Some(e) = k.expires_at {
        format!("active until {}", capy_db::time::date(e))
    } else {
        "active".into()
    }
}

fn now_s() -> i64 {
    capy_db::time::now_ms() / 1000
}

pub fn keys(a: KeysArgs) -> Result<()> {
    runtime()?.block_on(async {
        let db = open(&a.db).await?;
        let r = keys_cmd(&db, a.cmd).await;
        db.close().await;
        r
    })
}

async fn keys_cmd(db: &Db, cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Create {
            name,
            name_flag,
            admin,
            flags,
        } => {
            let name = name.or(name_flag).unwrap_or_default();
            let new = NewKey {
                name,
                tenant: flags.tenant.clone(),
                admin,
                limits: Limits {
                    rpm: given(flags.rpm),
                    tpm: given(flags.tpm),
                    max_concurrent: given(flags.max_concurrent),
                    tokens_per_day: given(flags.tokens_per_day),
                    tokens_per_month: given(flags.tokens_per_month),
                },
                models: flags.models()?.flatten(),
                expires_at: flags.expires()?.flatten(),
            };
            let (k, secret) = db.create_key(&new).await?;
            println!("{secret}");
            eprintln!(
                "created key {:?}{} ({}); the secret above is shown once: store it now",
                k.name,
                if k.admin { ", admin" } else { "" },
                describe(&k)
            );
        }
        KeysCmd::List { json } => {
            let keys = db.keys().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(());
            }
            let now = now_s();
            println!(
                "{:<20} {:<10} {:<6} {:>6} {:>8} {:>5} {:>11} {:>13} {:<20} {:<12} STATUS",
                "NAME",
                "PREFIX",
                "ADMIN",
                "RPM",
                "TPM",
                "CONC",
                "TOKENS/DAY",
                "TOKENS/MONTH",
                "MODELS",
                "CREATED"
            );
            for k in keys {
                let l = &k.limits;
                println!(
                    "{:<20} {:<10} {:<6} {:>6} {:>8} {:>5} {:>11} {:>13} {:<20} {:<12} {}",
                    k.name,
                    k.secret_prefix,
                    if k.admin { "yes" } else { "no" },
                    opt(l.rpm),
                    opt(l.tpm),
                    opt(l.max_concurrent),
                    opt(l.tokens_per_day),
                    opt(l.tokens_per_month),
                    k.models.as_ref().map_or("all".into(), |m| m.join(",")),
                    capy_db::time::date(k.created_at),
                    status(&k, now)
                );
            }
        }
        KeysCmd::Revoke { name } => {
            let k = db.revoke_key(&name).await?;
            println!("revoked key {:?}", k.name);
        }
        KeysCmd::Update { name, admin, flags } => {
            let u = KeyUpdate {
                tenant: flags.tenant.clone().map(Some),
                admin,
                rpm: change(flags.rpm),
                tpm: change(flags.tpm),
                max_concurrent: change(flags.max_concurrent),
                tokens_per_day: change(flags.tokens_per_day),
                tokens_per_month: change(flags.tokens_per_month),
                models: flags.models()?,
                expires_at: flags.expires()?,
            };
            let k = db.update_key(&name, &u).await?;
            println!("updated key {:?}: {}", k.name, describe(&k));
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct UsageArgs {
    /// Only this key's requests (its name).
    #[arg(long)]
    key: Option<String>,
    /// Only this model's requests.
    #[arg(long)]
    model: Option<String>,
    /// From this date (2026-11-01) or span back from now (30s, 90m, 24h, 7d) on
    /// [default: all].
    #[arg(long)]
    since: Option<String>,
    /// Rows per day, key, model or replica (the server that served them).
    #[arg(long, default_value = "day", value_parser = ["day", "key", "model", "replica"])]
    by: String,
    /// As JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DbArgs,
}

pub fn usage(a: UsageArgs) -> Result<()> {
    runtime()?.block_on(async {
        let db = open(&a.db).await?;
        let now = capy_db::time::now_ms();
        let f = UsageFilter {
            key: a.key.clone(),
            model: a.model.clone(),
            since_ms: a
                .since
                .as_deref()
                .map(|s| capy_db::time::parse_since(s, now))
                .transpose()
                .map_err(|e| anyhow!(e))?,
        };
        let by = match a.by.as_str() {
            "key" => GroupBy::Key,
            "model" => GroupBy::Model,
            "replica" => GroupBy::Replica,
            _ => GroupBy::Day,
        };
        let rows = db.usage_totals(&f, by).await;
        db.close().await;
        let rows = rows?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
            return Ok(());
        }
        println!(
            "{:<24} {:>9} {:>12} {:>12} {:>12} {:>7} {:>7} {:>10} {:>12}",
            a.by.to_uppercase(),
            "REQUESTS",
            "PROMPT",
            "CACHED",
            "COMPLETION",
            "ERRORS",
            "CUT",
            "TTFT MS",
            "LATENCY MS"
        );
        for r in &rows {
            println!(
                "{:<24} {:>9} {:>12} {:>12} {:>12} {:>7} {:>7} {:>10} {:>12.1}",
                r.group,
                r.requests,
                r.prompt_tokens,
                r.cached_tokens,
                r.completion_tokens,
                r.errors,
                r.disconnected,
                r.mean_ttft_ms.map_or("-".into(), |t| format!("{t:.1}")),
                r.mean_latency_ms
            );
        }
        if rows.is_empty() {
            eprintln!(
                "no usage recorded{}",
                if f.key.is_some() || f.model.is_some() || f.since_ms.is_some() {
                    " for this selection"
                } else {
                    " yet"
                }
            );
        }
        Ok(())
    })
}
