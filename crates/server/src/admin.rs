//! The admin API (admin keys only): keys and usage, the same operations as `capy keys` and
//! `capy usage`.
//!
//! - `GET /admin/keys`, `POST /admin/keys` (`{"name", "rpm", "tpm", "max_concurrent",
//!   "tokens_per_day", "tokens_per_month", "models": [..], "expires_at", "tenant",
//!   "admin"}`; the answer carries the secret, once), `GET|PATCH|DELETE /admin/keys/{name}`
//!   (PATCH sets the fields given, `null` clears one; DELETE revokes).
//! - `GET /admin/usage?key=&model=&since=&by=day|key|model|replica` (totals, by day unless
//!   told), with `records=true` the rows themselves (`limit`, default 1000).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use capy_db::{GroupBy, KeyUpdate, Limits, NewKey, UsageFilter};
use serde::Deserialize;
use serde_json::json;

use crate::error::{ApiError, Flavor};
use crate::gateway::Gateway;
use crate::AppState;

impl From<capy_db::Error> for ApiError {
    fn from(e: capy_db::Error) -> ApiError {
        use capy_db::Error as E;
        match &e {
            E::NoSuchKey(_) => ApiError::not_found(e.to_string()).code("key_not_found"),
            E::KeyExists(_) => {
                ApiError::new(StatusCode::CONFLICT, e.to_string()).code("key_exists")
            }
            E::Revoked(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()).code("key_revoked"),
            E::Invalid(_) => ApiError::bad_request(e.to_string()),
            E::Sql(_) | E::Migrate(_) => {
                tracing::warn!("admin API: {e}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the database is unavailable",
                )
                .retry_after(1)
            }
        }
    }
}

fn gateway(st: &AppState) -> Result<&Arc<Gateway>, ApiError> {
    st.gateway
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this server has no key database"))
}

/// A date or unix seconds.
enum When {
    Unix(i64),
    Date(String),
}

impl<'de> Deserialize<'de> for When {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<When, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) if n.is_i64() => Ok(When::Unix(n.as_i64().unwrap_or(0))),
            serde_json::Value::String(s) => Ok(When::Date(s)),
            _ => Err(serde::de::Error::custom(
                "expires_at must be a date (YYYY-MM-DD) or unix seconds",
            )),
        }
    }
}

impl When {
    fn secs(&self) -> Result<i64, ApiError> {
        match self {
            When::Unix(s) => Ok(*s),
            When::Date(d) => capy_db::time::parse_date(d)
                .map_err(|e| ApiError::bad_request(e).param("expires_at")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    tenant: Option<String>,
    #[serde(default)]
    admin: bool,
    rpm: Option<i64>,
    tpm: Option<i64>,
    max_concurrent: Option<i64>,
    tokens_per_day: Option<i64>,
    tokens_per_month: Option<i64>,
    models: Option<Vec<String>>,
    expires_at: Option<When>,
}

fn key_json(k: &capy_db::Key) -> serde_json::Value {
    let mut v = serde_json::to_value(k).unwrap_or_default();
    v["object"] = json!("api_key");
    v
}

pub async fn list_keys(State(st): State<Arc<AppState>>) -> Response {
    let r = async {
        let gw = gateway(&st)?;
        let keys = gw.db.keys().await?;
        Ok::<_, ApiError>(
            Json(json!({"object": "list", "data": keys.iter().map(key_json).collect::<Vec<_>>()}))
                .into_response(),
        )
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn create_key(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = async {
        let gw = gateway(&st)?;
        let c: CreateKey = crate::error::parse_json(&body, Flavor::OpenAi)?;
        let new = NewKey {
            name: c.name,
            tenant: c.tenant,
            admin: c.admin,
            limits: Limits {
                rpm: c.rpm,
                tpm: c.tpm,
                max_concurrent: c.max_concurrent,
                tokens_per_day: c.tokens_per_day,
                tokens_per_month: c.tokens_per_month,
            },
            models: c.models,
            expires_at: c.expires_at.as_ref().map(When::secs).transpose()?,
        };
        let (k, secret) = gw.db.create_key(&new).await?;
        gw.reload_now().await;
        let mut v = key_json(&k);
        v["key"] = json!(secret);
        Ok::<_, ApiError>((StatusCode::CREATED, Json(v)).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn get_key(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let r = async {
        let gw = gateway(&st)?;
        let k = gw
            .db
            .key(&name)
            .await?
            .ok_or(capy_db::Error::NoSuchKey(name))?;
        Ok::<_, ApiError>(Json(key_json(&k)).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn update_key(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let r = async {
        let gw = gateway(&st)?;
        // expires_at may be a date here too
        let mut v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("bad JSON: {e}")))?;
        if let Some(d) = v.get("expires_at").and_then(|d| d.as_str()) {
            let secs = capy_db::time::parse_date(d)
                .map_err(|e| ApiError::bad_request(e).param("expires_at"))?;
            v["expires_at"] = json!(secs);
        }
        let u: KeyUpdate = serde_json::from_value(v)
            .map_err(|e| ApiError::bad_request(format!("bad key update: {e}")))?;
        let k = gw.db.update_key(&name, &u).await?;
        gw.reload_now().await;
        Ok::<_, ApiError>(Json(key_json(&k)).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn revoke_key(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let r = async {
        let gw = gateway(&st)?;
        let k = gw.db.revoke_key(&name).await?;
        gw.reload_now().await;
        Ok::<_, ApiError>(Json(key_json(&k)).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize)]
pub struct UsageQuery {
    key: Option<String>,
    model: Option<String>,
    since: Option<String>,
    by: Option<String>,
    #[serde(default)]
    records: bool,
    limit: Option<i64>,
}

/// `day`, `key` or `model`.
pub fn group_by(s: &str) -> Result<GroupBy, String> {
    match s {
        "day" => Ok(GroupBy::Day),
        "key" => Ok(GroupBy::Key),
        "model" => Ok(GroupBy::Model),
        "replica" => Ok(GroupBy::Replica),
        _ => Err(format!(
            "bad grouping {s:?}: use day, key, model or replica"
        )),
    }
}

pub async fn usage(
    State(st): State<Arc<AppState>>,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let r = async {
        let gw = gateway(&st)?;
        let Query(q) = q.map_err(|e| {
            ApiError::bad_request(format!(
                "bad query ({e}): use key, model, since, by, records, limit"
            ))
        })?;
        let now = capy_db::time::now_ms();
        // an empty parameter is no filter
        let given = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let f = UsageFilter {
            key: given(q.key),
            model: given(q.model),
            since_ms: given(q.since)
                .as_deref()
                .map(|s| capy_db::time::parse_since(s, now))
                .transpose()
                .map_err(|e| ApiError::bad_request(e).param("since"))?,
        };
        if q.records {
            let rows = gw.db.usage_records(&f, q.limit.unwrap_or(1000)).await?;
            return Ok::<_, ApiError>(
                Json(json!({"object": "list", "data": rows})).into_response(),
            );
        }
        let by = group_by(given(q.by).as_deref().unwrap_or("day"))
            .map_err(|e| ApiError::bad_request(e).param("by"))?;
        let totals = gw.db.usage_totals(&f, by).await?;
        Ok(Json(json!({"object": "list", "data": totals})).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}
