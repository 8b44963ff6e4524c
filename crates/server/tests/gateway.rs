//! The gateway over the real SmolLM2, against SQLite and a real PostgreSQL server: keys
//! and their errors in each API's shape, the admin API, limits with OpenAI's headers,
//! budgets, revocation, tenant-scoped prefix caching, and usage records that sum to what
//! the responses reported.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use capy_db::testing::Postgres;
use capy_db::{Limits, NewKey, UsageFilter};
use capy_server::gateway::{AuthMode, Gateway, GatewayConfig};
use capy_server::AppState;
use common::{registry_at, small_batch, temp_store};
use serde_json::{json, Value};
use tower::ServiceExt;

async fn gated(tag: &str, url: &str) -> (axum::Router, Arc<AppState>, Arc<Gateway>) {
    gated_with(tag, url, false).await
}

async fn gated_with(
    tag: &str,
    url: &str,
    shared_limits: bool,
) -> (axum::Router, Arc<AppState>, Arc<Gateway>) {
    let gw = Gateway::start(GatewayConfig {
        database_url: url.to_string(),
        auth: AuthMode::Auto,
        replica: format!("test-{tag}"),
        shared_limits,
        usage: true,
    })
    .await
    .expect("gateway starts");
    let mut batch = small_batch();
    batch.n_ctx = 512;
    let mut st = AppState::new(registry_at(
        temp_store(tag, &["m1", "m2"]),
        batch,
        &["m1", "m2"],
    ));
    Arc::get_mut(&mut st).expect("unshared").gateway = Some(Arc::clone(&gw));
    st.load_warm_set().await.expect("warm set loads");
    (capy_server::app(Arc::clone(&st)), st, gw)
}

/// One request with optional headers: (status, headers, JSON body or the raw text).
async fn send(
    app: &axum::Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).expect("request"))
        .await
        .expect("response");
    let (status, h) = (resp.status(), resp.headers().clone());
    let bytes = axum::body::to_bytes(resp.into_body(), 8 << 20)
        .await
        .expect("body");
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, h, v)
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

fn chat_body(model: &str, content: &str, max_tokens: u32) -> String {
    json!({"model": model, "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": content}]})
    .to_string()
}

/// The usage of every response a scenario got, to compare with the records.
#[derive(Default)]
struct Reported {
    prompt: i64,
    completion: i64,
    requests: i64,
}

impl Reported {
    fn add_openai(&mut self, v: &Value) {
        self.prompt += v["usage"]["prompt_tokens"].as_i64().expect("usage");
        self.completion += v["usage"]["completion_tokens"].as_i64().expect("usage");
        self.requests += 1;
    }
}

async fn scenario(tag: &str, url: &str) {
    let (app, _st, gw) = gated(tag, url).await;
    let db = gw.db.clone();
    let hello = chat_body("m1", "Say hello.", 4);

    // no key exists: the server is open, and the admin API is closed
    let (s, _, v) = send(&app, "POST", "/v1/chat/completions", &[], &hello).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut anon = Reported::default();
    anon.add_openai(&v);
    let (s, _, v) = send(&app, "GET", "/admin/keys", &[], "").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // keys made in the database (as `capy keys create` does) are picked up
    let (_, root) = db
        .create_key(&NewKey {
            name: "root".into(),
            admin: true,
            ..NewKey::default()
        })
        .await
        .unwrap();
    let (_, user) = db
        .create_key(&NewKey {
            name: "user".into(),
            ..NewKey::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(gw.required());

    // missing and wrong keys: 401 in each API's shape; /health stays open
    let (s, h, v) = send(&app, "POST", "/v1/chat/completions", &[], &hello).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    assert_eq!(h["www-authenticate"], "Bearer");
    let (s, _, v) = send(&app, "POST", "/api/chat", &[], "{}").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["error"].is_string(), "{v}");
    let wrong = bearer("capy-not-a-key");
    let (s, _, _) = send(&app, "GET", "/api/tags", &[("authorization", &wrong)], "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = send(&app, "GET", "/metrics", &[], "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = send(&app, "GET", "/health", &[], "").await;
    assert_eq!(s, StatusCode::OK);

    // both header forms work
    let mut by_user = Reported::default();
    let ub = bearer(&user);
    let (s, _, v) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &ub)],
        &hello,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    by_user.add_openai(&v);
    let (s, _, v) = send(
        &app,
        "POST",
        "/api/generate",
        &[("x-api-key", &user)],
        r#"{"model":"m1","prompt":"Hi","stream":false,"options":{"num_predict":3}}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    by_user.prompt += v["prompt_eval_count"].as_i64().unwrap();
    by_user.completion += v["eval_count"].as_i64().unwrap();
    by_user.requests += 1;
    // n > 1 counts the prompt once, every choice's tokens
    let (s, _, v) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &ub)],
        &json!({"model": "m1", "max_tokens": 3, "n": 3, "seed": 1,
                "messages": [{"role": "user", "content": "Count."}]})
        .to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    by_user.add_openai(&v);
    // a request error is a record too (no tokens)
    let (s, _, _) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &ub)],
        r#"{"model":"m1","messages":[]}"#,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    by_user.requests += 1;

    // admin routes need an admin key
    let (s, _, v) = send(&app, "GET", "/admin/keys", &[("authorization", &ub)], "").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _, _) = send(
        &app,
        "POST",
        "/api/pull",
        &[("authorization", &ub)],
        r#"{"model":"x"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let rb = bearer(&root);
    let (s, _, v) = send(
        &app,
        "POST",
        "/admin/keys",
        &[("authorization", &rb)],
        r#"{"name":"limited","rpm":3,"tpm":100000,"models":["m1"]}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let limited = v["key"].as_str().expect("secret").to_string();
    assert_eq!(v["rpm"], 3);
    assert!(v.get("secret_hash").is_none(), "{v}");
    let (s, _, v) = send(
        &app,
        "POST",
        "/admin/keys",
        &[("authorization", &rb)],
        r#"{"name":"limited"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, _, v) = send(
        &app,
        "POST",
        "/admin/keys",
        &[("authorization", &rb)],
        r#"{"name":"x","rpm":-1}"#,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _, v) = send(&app, "GET", "/admin/keys", &[("authorization", &rb)], "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"].as_array().map(Vec::len), Some(3), "{v}");

    // a model outside the key's list: 403
    let lb = bearer(&limited);
    let (s, _, v) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &lb)],
        &chat_body("m2", "Hi", 2),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "model_not_allowed");
    // lists show the key's models only; routes naming another model refuse it; a served
    // model's other names (NAME:latest) count as the model
    let (_, _, v) = send(&app, "GET", "/v1/models", &[("authorization", &lb)], "").await;
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m1"], "{v}");
    let (_, _, v) = send(&app, "GET", "/api/tags", &[("authorization", &ub)], "").await;
    assert_eq!(v["models"].as_array().map(Vec::len), Some(2), "{v}");
    let (_, _, v) = send(&app, "GET", "/api/ps", &[("authorization", &lb)], "").await;
    let names: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["m1:latest"], "{v}");
    let (s, _, _) = send(&app, "GET", "/v1/models/m2", &[("authorization", &lb)], "").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, v) = send(
        &app,
        "POST",
        "/api/show",
        &[("authorization", &lb)],
        r#"{"name":"m2"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["error"].is_string(), "{v}");
    let (s, _, v) = send(
        &app,
        "POST",
        "/api/show",
        &[("authorization", &lb)],
        r#"{"model":"m1:latest"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // 3 requests a minute: three pass with falling remaining counts, the fourth is a 429
    let mut by_limited = Reported::default();
    for left in ["2", "1", "0"] {
        let (s, h, v) = send(
            &app,
            "POST",
            "/v1/chat/completions",
            &[("authorization", &lb)],
            &hello,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        by_limited.add_openai(&v);
        assert_eq!(h["x-ratelimit-limit-requests"], "3");
        assert_eq!(h["x-ratelimit-remaining-requests"], left);
        assert_eq!(h["x-ratelimit-limit-tokens"], "100000");
        assert!(h.contains_key("x-ratelimit-reset-requests"));
        assert!(h.contains_key("x-ratelimit-remaining-tokens"));
    }
    let (s, h, v) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &lb)],
        &hello,
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    by_limited.requests += 1;
    // the same limit on the Ollama route, in its shape
    let (s, _, v) = send(
        &app,
        "POST",
        "/api/chat",
        &[("authorization", &lb)],
        r#"{"model":"m1","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(v["error"].is_string(), "{v}");
    by_limited.requests += 1;

    // a daily budget stops the key within one request of it
    let (s, _, v) = send(
        &app,
        "PATCH",
        "/admin/keys/limited",
        &[("authorization", &rb)],
        r#"{"rpm": null, "tokens_per_day": 150}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rpm"], Value::Null);
    let mut last = 0;
    let mut refused = false;
    for _ in 0..20 {
        let (s, _, v) = send(
            &app,
            "POST",
            "/v1/chat/completions",
            &[("authorization", &lb)],
            &hello,
        )
        .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(v["error"]["code"], "insufficient_quota", "{v}");
            by_limited.requests += 1;
            refused = true;
            break;
        }
        assert_eq!(s, StatusCode::OK, "{v}");
        last = v["usage"]["total_tokens"].as_i64().unwrap();
        by_limited.add_openai(&v);
    }
    assert!(refused, "the budget never stopped the key");
    let used = by_limited.prompt + by_limited.completion;
    assert!(
        used >= 150 && used - last < 150,
        "used {used}, last request {last}"
    );

    // revocation: refused on the next request
    let (s, _, v) = send(
        &app,
        "DELETE",
        "/admin/keys/limited",
        &[("authorization", &rb)],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["revoked_at"].is_i64());
    let (s, _, v) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &lb)],
        &hello,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("revoked"),
        "{v}"
    );

    // tenants: another tenant's identical prompt computes its prompt anew
    let (_, t2) = db
        .create_key(&NewKey {
            name: "other-tenant".into(),
            tenant: Some("acme".into()),
            ..NewKey::default()
        })
        .await
        .unwrap();
    gw.reload_now().await;
    let long = "Tell me a long story about a capybara who travels to the mountains, \
                meets a wise old tortoise, learns about the stars and the seasons, and \
                comes home to share what it learned with every animal by the river.";
    let body = chat_body("m1", long, 2);
    let (_, _, first) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &ub)],
        &body,
    )
    .await;
    let (_, _, again) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &ub)],
        &body,
    )
    .await;
    let (_, _, other) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &bearer(&t2))],
        &body,
    )
    .await;
    let cached = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_i64()
            .unwrap()
    };
    // (the key's earlier requests cached the template's opening already)
    assert!(cached(&again) > cached(&first), "{first} {again}");
    assert_eq!(cached(&other), 0, "{other}");
    by_user.add_openai(&first);
    by_user.add_openai(&again);

    // the records sum to what the responses reported
    gw.flush().await;
    for (name, r) in [("user", &by_user), ("limited", &by_limited)] {
        let rows = db
            .usage_records(
                &UsageFilter {
                    key: Some(name.into()),
                    ..UsageFilter::default()
                },
                10_000,
            )
            .await
            .unwrap();
        assert_eq!(rows.len() as i64, r.requests, "{name}: {rows:?}");
        let p: i64 = rows.iter().map(|x| x.prompt_tokens).sum();
        let c: i64 = rows.iter().map(|x| x.completion_tokens).sum();
        assert_eq!((p, c), (r.prompt, r.completion), "{name}");
        assert!(rows.iter().all(|x| x.replica == format!("test-{tag}")));
        assert!(rows.iter().any(|x| x.status == 200 && x.ttft_ms.is_some()));
    }
    let all = db
        .usage_records(&UsageFilter::default(), 10_000)
        .await
        .unwrap();
    let anon_rows: Vec<_> = all.iter().filter(|x| x.key_id.is_none()).collect();
    assert_eq!(anon_rows.len(), 1);
    assert_eq!(anon_rows[0].prompt_tokens, anon.prompt);
    let limited_rows = db
        .usage_records(
            &UsageFilter {
                key: Some("limited".into()),
                ..UsageFilter::default()
            },
            100,
        )
        .await
        .unwrap();
    assert_eq!(limited_rows.iter().filter(|x| x.status == 429).count(), 3);

    // the admin usage report and the metrics name keys, never secrets
    let (s, _, v) = send(
        &app,
        "GET",
        "/admin/usage?by=key",
        &[("authorization", &rb)],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let groups: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_str().unwrap())
        .collect();
    assert!(
        groups.contains(&"user") && groups.contains(&"limited"),
        "{v}"
    );
    let (s, _, v) = send(
        &app,
        "GET",
        "/admin/usage?by=week",
        &[("authorization", &rb)],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (_, _, m) = send(&app, "GET", "/metrics", &[("authorization", &rb)], "").await;
    let m = m.as_str().unwrap_or_default().to_string();
    assert!(
        m.contains("capy_auth_failures_total{reason=\"invalid\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("capy_key_rate_limited_total{key=\"limited\"} 3"),
        "{m}"
    );
    assert!(m.contains("capy_key_requests_total{key=\"user\"}"), "{m}");
    for s in [&root, &user, &limited, &t2] {
        assert!(!m.contains(&s[5..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("capy-gw-sqlite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    scenario("gw-sqlite", &capy_db::default_url(&dir)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_on_postgres() {
    let pg = Postgres::start().expect("PostgreSQL (apt-get install postgresql)");
    scenario("gw-pg", &pg.database("capy").unwrap()).await;
}

/// A database that goes away loses no usage: records wait and are written when it is back;
/// keys already loaded keep working, and shared limits fall back to the server's own
/// windows without making requests wait for the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_database_loses_no_usage() {
    let pg = Postgres::start().expect("PostgreSQL (apt-get install postgresql)");
    let (app, _st, gw) = gated_with("gw-dead", &pg.database("capy").unwrap(), true).await;
    let (_, user) = gw
        .db
        .create_key(&NewKey {
            name: "u".into(),
            limits: Limits {
                rpm: Some(1000),
                ..Limits::default()
            },
            ..NewKey::default()
        })
        .await
        .unwrap();
    gw.reload_now().await;
    pg.stop();
    let ub = bearer(&user);
    let mut completion = 0;
    let t = std::time::Instant::now();
    for _ in 0..3 {
        let (s, _, v) = send(
            &app,
            "POST",
            "/v1/chat/completions",
            &[("authorization", &ub)],
            &chat_body("m1", "Hi", 3),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        completion += v["usage"]["completion_tokens"].as_i64().unwrap();
    }
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.restart().expect("restarts");
    // the writer retries every second
    let mut rows = Vec::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rows = gw
            .db
            .usage_records(&UsageFilter::default(), 100)
            .await
            .unwrap_or_else(|e| {
                eprintln!("{e}");
                Vec::new()
            });
        if rows.len() == 3 {
            break;
        }
    }
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(
        rows.iter().map(|r| r.completion_tokens).sum::<i64>(),
        completion
    );
}

/// What an outside tester found: duplicate JSON fields slipped past a key's models,
/// concurrent requests overran budgets 8x, a NUL in a model name stopped every usage write
/// on PostgreSQL, 405s and preflights used up rpm, an admin key with a model list could not
/// create keys, `/tokenize` without a model used a model outside the key's list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_findings() {
    let pg = Postgres::start().expect("PostgreSQL (apt-get install postgresql)");
    let (app, _st, gw) = gated("gw-breaker", &pg.database("capy").unwrap()).await;
    let mk = |name: &str, limits: Limits, models: Option<Vec<String>>, admin: bool| NewKey {
        name: name.into(),
        limits,
        models,
        admin,
        ..NewKey::default()
    };
    let (_, only_m1) = gw
        .db
        .create_key(&mk(
            "only-m1",
            Limits {
                rpm: Some(2),
                ..Limits::default()
            },
            Some(vec!["m1".into()]),
            false,
        ))
        .await
        .unwrap();
    let (_, budget) = gw
        .db
        .create_key(&mk(
            "budget",
            Limits {
                tokens_per_day: Some(60),
                ..Limits::default()
            },
            None,
            false,
        ))
        .await
        .unwrap();
    let (_, admin) = gw
        .db
        .create_key(&mk(
            "admin-m1",
            Limits::default(),
            Some(vec!["m1".into()]),
            true,
        ))
        .await
        .unwrap();
    gw.reload_now().await;
    let k1 = bearer(&only_m1);

    // a repeated field: the handler takes the last one, and so does the check
    let dup =
        r#"{"model":"m1","model":"m2","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}"#;
    let (s, _, v) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &k1)],
        dup,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // wrong methods are not generations: no rpm used, no record
    for m in ["GET", "OPTIONS", "PUT"] {
        let (s, _, _) = send(
            &app,
            m,
            "/v1/chat/completions",
            &[("authorization", &k1)],
            "",
        )
        .await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{m}");
    }
    let hi = chat_body("m1", "hi", 2);
    for _ in 0..2 {
        let (s, _, v) = send(
            &app,
            "POST",
            "/v1/chat/completions",
            &[("authorization", &k1)],
            &hi,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    // /tokenize must name one of the key's models
    let (s, _, v) = send(
        &app,
        "POST",
        "/tokenize",
        &[("authorization", &k1)],
        r#"{"content":"hi"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _, v) = send(
        &app,
        "POST",
        "/tokenize",
        &[("authorization", &k1)],
        r#"{"content":"hi","model":"m2"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _, v) = send(
        &app,
        "POST",
        "/tokenize",
        &[("authorization", &k1)],
        r#"{"content":"hi","model":"m1"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // an admin key with a model list manages keys (a key's "name" is no model)
    let (s, _, v) = send(
        &app,
        "POST",
        "/admin/keys",
        &[("authorization", &bearer(&admin))],
        r#"{"name":"bob"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, _, v) = send(
        &app,
        "DELETE",
        "/admin/keys/bob",
        &[("authorization", &bearer(&admin))],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = send(
        &app,
        "DELETE",
        "/admin/keys/bob",
        &[("authorization", &bearer(&admin))],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, _, v) = send(
        &app,
        "POST",
        "/admin/keys",
        &[("authorization", &bearer(&admin))],
        r#"{"name":"old","expires_at":"2020-01-01"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // eight at once against a 60-token day: the key stops within one request of it
    let kb = bearer(&budget);
    let body = chat_body("m1", "Write a poem.", 8);
    let auth = [("authorization", kb.as_str())];
    let runs = (0..8).map(|_| send(&app, "POST", "/v1/chat/completions", &auth, &body));
    let results = futures_util::future::join_all(runs).await;
    let mut used = 0;
    let mut largest = 0;
    for (s, _, v) in &results {
        if *s == StatusCode::OK {
            let t = v["usage"]["total_tokens"].as_i64().unwrap();
            used += t;
            largest = largest.max(t);
        } else {
            assert_eq!(*s, StatusCode::TOO_MANY_REQUESTS, "{v}");
        }
    }
    assert!(
        used > 0 && used < 60 + largest,
        "used {used}, largest request {largest}"
    );

    // a NUL in a model name: an error record like any other, and later records still land
    let nul = "{\"model\":\"m1\\u0000\",\"prompt\":\"hi\",\"stream\":false}";
    let (s, _, _) = send(
        &app,
        "POST",
        "/api/generate",
        &[("authorization", &kb)],
        nul,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, v) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &k1)],
        &chat_body("m1", "x", 1),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    gw.flush().await;
    let rows = gw
        .db
        .usage_records(&UsageFilter::default(), 1000)
        .await
        .unwrap();
    assert!(
        rows.iter()
            .any(|r| r.status == 404 && r.model.as_deref() == Some("m1")),
        "{rows:?}"
    );
    assert!(rows.iter().any(|r| r.status == 429), "{rows:?}");
    assert!(!rows.iter().any(|r| r.status == 405));
    assert_eq!(rows.iter().filter(|r| r.status == 403).count(), 0);
}
