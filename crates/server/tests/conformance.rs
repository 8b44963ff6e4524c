//! API conformance faults found by replaying public bug reports of llama.cpp, Ollama and vLLM
//! against capy, one regression test per kind, over the HTTP layer with the real SmolLM2
//! (context 256). The per-field tables are covered field by field in `params.rs`'s tests.

mod common;

use axum::http::StatusCode;
use common::{call, served, small_batch};
use serde_json::{json, Value};

fn chat(extra: Value) -> String {
    let mut v = json!({"model": "m1", "max_tokens": 3, "temperature": 0,
                       "messages": [{"role": "user", "content": "Hi"}]});
    for (k, x) in extra.as_object().expect("object") {
        v[k] = x.clone();
    }
    v.to_string()
}

fn param(v: &Value) -> Option<&str> {
    v["error"]["param"].as_str()
}

/// `{"logprobs": null}` was a 400 `invalid_json`: the openai client sends nulls for unset
/// arguments, and Ollama's clients send `null` options, images, format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nullable_fields_mean_default_on_every_route() {
    let (app, _st) = served("nulls", small_batch()).await;
    let nulls = json!({"logprobs": null, "top_logprobs": null, "stream": null,
                       "stream_options": null, "n": null, "stop": null, "seed": null,
                       "temperature": null, "top_p": null, "user": null, "max_tokens": 3,
                       "presence_penalty": null, "frequency_penalty": null});
    let (s, v, _) = call(&app, "POST", "/v1/chat/completions", &chat(nulls.clone())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    let mut c = nulls;
    c["prompt"] = json!("Hello");
    c["echo"] = Value::Null;
    c["suffix"] = Value::Null;
    c["model"] = json!("m1");
    let (s, v, _) = call(&app, "POST", "/v1/completions", &c.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v, _) = call(
        &app,
        "POST",
        "/api/generate",
        r#"{"model":"m1","prompt":"Hi","stream":false,
        "options":{"temperature":null,"num_predict":3,"stop":"\n\n\n"},"images":null,"format":null,
        "raw":null,"suffix":null,"system":null,"keep_alive":null,"context":null,"template":null}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v, _) = call(
        &app,
        "POST",
        "/api/chat",
        r#"{"model":"m1","stream":false,"tools":null,
        "options":{"num_predict":3},"messages":[{"role":"user","content":"Hi","images":null}]}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// `{"max_tokens": -1}` and `{"n": -1}` were reported as bad JSON with a serde message and
/// `param: null`; `repeat_penalty` 0 or below was accepted and degenerated the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_json_with_an_invalid_value_names_the_field() {
    let (app, _st) = served("values", small_batch()).await;
    for (field, bad) in [
        ("max_tokens", json!(-1)),
        ("n", json!(-1)),
        ("n", json!(17)),
        ("repeat_penalty", json!(0)),
        ("repeat_penalty", json!(-1.5)),
        ("temperature", json!("hot")),
        ("top_logprobs", json!(21)),
        ("seed", json!(1.5)),
    ] {
        let (s, v, _) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            &chat(json!({ field: bad })),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{field}={bad}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{field}");
        assert_ne!(v["error"]["code"], "invalid_json", "{field}");
        assert_eq!(param(&v), Some(field), "{field}={bad}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(field) && !msg.contains("line 1 column"),
            "{msg}"
        );
    }
    for body in [
        r#"{"model":"m1","prompt":"Hi","options":{"repeat_penalty":0}}"#,
        r#"{"model":"m1","prompt":"Hi","options":{"num_ctx":"big"}}"#,
        r#"{"model":"m1","prompt":"Hi","keep_alive":"NaN"}"#,
        r#"{"model":"m1","prompt":"Hi","keep_alive":1e300}"#,
        r#"{"model":"m1","prompt":"Hi","keep_alive":1e19}"#,
    ] {
        let (s, v, _) = call(&app, "POST", "/api/generate", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(v["error"].is_string(), "Ollama's shape: {v}");
    }
    // the model is not held by any of those: it can still be unloaded
    let (s, v, _) = call(
        &app,
        "POST",
        "/api/generate",
        r#"{"model":"m1","keep_alive":0}"#,
    )
    .await;
    assert_eq!(
        (s, v["done_reason"].as_str()),
        (StatusCode::OK, Some("unload")),
        "{v}"
    );
    let (s, _, _) = call(&app, "GET", "/api/ps", "").await;
    assert_eq!(s, StatusCode::OK);
}

/// `top_logprobs` without `logprobs: true` returned empty top lists, and `stream_options`
/// without `stream: true` was accepted: OpenAI and vLLM answer 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_pairs_that_need_each_other() {
    let (app, _st) = served("pairs", small_batch()).await;
    for (extra, field) in [
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (
            json!({"top_logprobs": 2, "logprobs": false}),
            "top_logprobs",
        ),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (
            json!({"stream_options": {"include_usage": true}, "stream": false}),
            "stream_options",
        ),
    ] {
        let (s, v, _) = call(&app, "POST", "/v1/chat/completions", &chat(extra.clone())).await;
        assert_eq!(
            (s, param(&v)),
            (StatusCode::BAD_REQUEST, Some(field)),
            "{extra}: {v}"
        );
    }
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        &chat(json!({"top_logprobs": 2, "logprobs": true})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs");
    assert!(content
        .iter()
        .all(|t| t["top_logprobs"].as_array().map(Vec::len) == Some(2)));
    // OpenAI's schema requires refusal fields, null when there is none
    assert_eq!(v["choices"][0]["message"]["refusal"], Value::Null);
    assert!(v["choices"][0]["message"]
        .as_object()
        .expect("message")
        .contains_key("refusal"));
    assert!(v["choices"][0]["logprobs"]
        .as_object()
        .expect("lp")
        .contains_key("refusal"));
}

/// A repeated `/api/chat` reported `prompt_eval_count: 1` (only the uncached tokens);
/// Ollama reports the whole prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_prompt_eval_count_is_the_whole_prompt_when_cached() {
    let (app, _st) = served("evalcount", small_batch()).await;
    let body = r#"{"model":"m1","stream":false,"options":{"num_predict":2,"temperature":0},
        "messages":[{"role":"user","content":"What is the capital of France?"}]}"#;
    let (_, first, _) = call(&app, "POST", "/api/chat", body).await;
    let (_, second, _) = call(&app, "POST", "/api/chat", body).await;
    let n = first["prompt_eval_count"].as_u64().expect("count");
    assert!(n > 10, "{first}");
    assert_eq!(second["prompt_eval_count"].as_u64(), Some(n), "{second}");
}

/// Prompt + `max_tokens` beyond the context was silently capped (200 with `total_tokens`
/// above the context); the completions route named `messages` in its context error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_that_cannot_fit_is_a_context_error() {
    let (app, _st) = served("ctxfit", small_batch()).await;
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 250})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(param(&v), Some("messages"));
    let body = r#"{"model":"m1","prompt":"Once upon a time","max_tokens":256}"#;
    let (s, v, _) = call(&app, "POST", "/v1/completions", body).await;
    assert_eq!(
        (s, param(&v)),
        (StatusCode::BAD_REQUEST, Some("prompt")),
        "{v}"
    );
    let long = format!(
        r#"{{"model":"m1","prompt":[{}]}}"#,
        vec!["1"; 300].join(",")
    );
    let (s, v, _) = call(&app, "POST", "/v1/completions", &long).await;
    assert_eq!(
        (s, param(&v)),
        (StatusCode::BAD_REQUEST, Some("prompt")),
        "{v}"
    );
    // without max_tokens: to the end of the context, finish_reason "length"
    let body = r#"{"model":"m1","prompt":"Once upon a time","ignore_eos":true,"temperature":0}"#;
    let (s, v, _) = call(&app, "POST", "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"]["total_tokens"].as_u64(),
        Some(256),
        "{}",
        v["usage"]
    );
}

/// Unknown `/api/...` routes answered in OpenAI's shape; embeddings were plain 404s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_shapes_follow_the_api_of_the_route() {
    let (app, _st) = served("shapes", small_batch()).await;
    let (s, v, _) = call(&app, "POST", "/api/nothing", "{}").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["error"].is_string(), "{v}");
    let (s, v, _) = call(&app, "GET", "/v1/nothing", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["error"]["message"].is_string(), "{v}");
    for path in ["/api/embed", "/api/embeddings"] {
        let (s, v, _) = call(&app, "POST", path, r#"{"model":"m1","input":"x"}"#).await;
        assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{path}");
        assert!(
            v["error"].as_str().unwrap_or("").contains("embeddings"),
            "{v}"
        );
    }
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/embeddings",
        r#"{"model":"m1","input":"x"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(v["error"]["code"], "not_implemented", "{v}");
    let (s, v, _) = call(&app, "POST", "/api/generate", r#"[1,2]"#).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"].is_string(), "{v}");
}

/// `/tokenize` ignored `parse_special: false`; `/detokenize` dropped control tokens' text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_parse_special_and_detokenize_keep_control_text() {
    let (app, _st) = served("tokenize", small_batch()).await;
    let tok = |b: &'static str| {
        let app = app.clone();
        async move { call(&app, "POST", "/tokenize", b).await.1["tokens"].clone() }
    };
    let special = tok(r#"{"model":"m1","content":"<|im_start|>user"}"#).await;
    let literal = tok(r#"{"model":"m1","content":"<|im_start|>user","parse_special":false}"#).await;
    let n_special = special.as_array().map_or(0, Vec::len);
    let n_literal = literal.as_array().map_or(0, Vec::len);
    assert_eq!(n_special, 2, "{special}");
    assert!(n_literal > 2, "as text: {literal}");
    let body = json!({"model": "m1", "tokens": special}).to_string();
    let (_, v, _) = call(&app, "POST", "/detokenize", &body).await;
    assert_eq!(v["content"], "<|im_start|>user");
    let body = json!({"model": "m1", "tokens": literal}).to_string();
    let (_, v, _) = call(&app, "POST", "/detokenize", &body).await;
    assert_eq!(v["content"], "<|im_start|>user");
}

/// 16 prompts x `n=16` can never fit the queue yet got 429 + `Retry-After`, so a client
/// retrying it starved everyone: a request larger than the queue can ever hold is a 400, and
/// the choices of a request enter the queue together or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_queue_is_a_400_not_a_429() {
    let (app, st) = served("impossible", small_batch()).await; // queue of 4
    let body = r#"{"model":"m1","prompt":["a","b","c"],"n":2,"max_tokens":2}"#;
    let (s, v, retry) = call(&app, "POST", "/v1/completions", body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!((param(&v), retry), (Some("n"), None));
    assert_eq!(v["error"]["code"], "too_many_choices");
    let model = st.registry.loaded().remove(0).model;
    let queued = model
        .batch
        .stats()
        .queued
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(queued, 0, "nothing of it was queued");
    let body = r#"{"model":"m1","prompt":["a","b"],"n":2,"max_tokens":2}"#;
    let (s, v, _) = call(&app, "POST", "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(4));
}

/// Internal errors reached clients as raw text with server file paths: the client gets a
/// generic message with a request id, the detail goes to the log. (A store entry that cannot
/// be read, here a directory, is the server's fault; a malformed model file is a 400
/// `model_not_supported`, tested in `registry.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_errors_hide_server_paths() {
    let store = common::temp_store("internal", &["m1"]);
    let bad = store.model_path("broken");
    std::fs::create_dir_all(&bad).expect("mkdir");
    let manifest = store.root.join("manifests").join("broken.json");
    let text = std::fs::read_to_string(store.root.join("manifests").join("m1.json"))
        .expect("manifest")
        .replace("\"m1\"", "\"broken\"");
    std::fs::write(manifest, text).expect("write");
    let root = store.root.display().to_string();
    let reg = common::registry_at(store, small_batch(), &[]);
    let app = capy_server::app(capy_server::AppState::new(reg));
    for (path, body) in [
        ("/v1/chat/completions", chat(json!({"model": "broken"}))),
        (
            "/api/generate",
            r#"{"model":"broken","prompt":"hi"}"#.to_string(),
        ),
    ] {
        let (s, v, _) = call(&app, "POST", path, &body).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
        let text = v.to_string();
        assert!(!text.contains(&root) && !text.contains(".gguf"), "{text}");
        assert!(text.contains("request id req-"), "{text}");
    }
}

/// `DELETE /api/delete` with a URL whose file name matched a stored model deleted it; pulls
/// could not be turned off; a URL with no file name was stored under an empty name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_take_store_names_and_pulls_can_be_disabled() {
    let (app, _st) = served("pulls", small_batch()).await;
    for name in [
        "http://example.invalid/m1.gguf",
        "hf.co/org/repo/m1",
        "../m1",
    ] {
        let body = json!({ "model": name }).to_string();
        let (s, v, _) = call(&app, "DELETE", "/api/delete", &body).await;
        assert!(s.is_client_error(), "{name}: {s} {v}");
    }
    let (_, v, _) = call(&app, "GET", "/api/tags", "").await;
    assert_eq!(
        v["models"][0]["name"], "m1:latest",
        "m1 is still there: {v}"
    );
    let (s, v, _) = call(
        &app,
        "POST",
        "/api/pull",
        r#"{"model":"http://127.0.0.1:9/","stream":false}"#,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("names no file"),
        "{v}"
    );

    let st = common::state("nopull", small_batch());
    let mut st =
        capy_server::AppState::with_limits(std::sync::Arc::clone(&st.registry), Default::default());
    std::sync::Arc::get_mut(&mut st).expect("sole owner").pull = None;
    let app = capy_server::app(st);
    let (s, v, _) = call(&app, "POST", "/api/pull", r#"{"model":"smollm2-135m"}"#).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("disabled"),
        "{v}"
    );
}

/// An engine loop that died (a worker panic) left the model taking requests it never
/// answered. Its running and queued requests fail with a 500, `/health` and `/api/ps` say
/// so, and the next request loads the model again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_fails_its_requests_and_is_reloaded() {
    let (app, st) = served("dead", small_batch()).await; // 2 slots
    let model = st.registry.loaded().remove(0).model;
    model.batch.inject_failure();
    // four choices: two run, two wait in the queue; all of them fail
    let body = r#"{"model":"m1","prompt":"Hello","n":4,"max_tokens":50,"ignore_eos":true}"#;
    let t = std::time::Instant::now();
    let (s, v, _) = call(&app, "POST", "/v1/completions", body).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "answered, not hung"
    );
    assert!(model.batch.failure().is_some());
    let (s, _, _) = call(&app, "GET", "/health", "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (_, v, _) = call(&app, "GET", "/api/ps", "").await;
    assert_eq!(v["models"][0]["status"], "failed", "{v}");
    // the next request reloads it
    let (s, v, _) = call(&app, "POST", "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, _) = call(&app, "GET", "/health", "").await;
    assert_eq!(s, StatusCode::OK);
    drop(model);
}

/// Found by a breaker: 405s had empty bodies; seeds of 1e19 or 2^64 were accepted; a bogus
/// role, a number as content and OpenAI `tools` were ignored; an empty prompt's error had no
/// `param`; a request's keep_alive unloaded a warm model, and a warm model could be deleted;
/// queued requests whose client left kept their places (429 for everyone else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_findings() {
    let (app, st) = served("breaker", small_batch()).await; // 2 slots, queue of 4
    let (s, v, _) = call(&app, "GET", "/v1/chat/completions", "").await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert!(v["error"]["message"].is_string(), "{v}");
    let (s, v, _) = call(&app, "GET", "/api/chat", "").await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert!(v["error"].is_string(), "{v}");
    for (extra, field) in [
        (json!({"seed": 1e19}), "seed"),
        (json!({"seed": 18446744073709551616u128 as f64}), "seed"),
        (
            json!({"messages": [{"role": "bogus", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
            "messages[0].content",
        ),
        (
            json!({"tools": [{"type": "function"}]}),
            "tools[0].function",
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format.type",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "string", "format": "no-such-format"}}}}),
            "response_format",
        ),
        (
            json!({"grammar": "root ::= \"a\" | undefined-rule"}),
            "grammar",
        ),
        (
            json!({"grammar": "root ::= \"a\"", "json_schema": {"type": "object"}}),
            "grammar",
        ),
    ] {
        let (s, v, _) = call(&app, "POST", "/v1/chat/completions", &chat(extra.clone())).await;
        assert_eq!(
            (s, param(&v)),
            (StatusCode::BAD_REQUEST, Some(field)),
            "{extra}: {v}"
        );
        assert!(!v.to_string().contains("untagged enum"), "{v}");
    }
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/completions",
        r#"{"model":"m1","prompt":""}"#,
    )
    .await;
    assert_eq!(
        (s, param(&v)),
        (StatusCode::BAD_REQUEST, Some("prompt")),
        "{v}"
    );
    // a warm model stays loaded whatever keep_alive a request gives, and is not deleted
    let body = r#"{"model":"m1","prompt":"Hi","stream":false,"keep_alive":"1s","options":{"num_predict":1}}"#;
    let (s, _, _) = call(&app, "POST", "/api/generate", body).await;
    assert_eq!(s, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    assert!(st.registry.unload_expired().is_empty());
    assert_eq!(st.registry.loaded_names(), ["m1"]);
    let (s, _, _) = call(&app, "DELETE", "/api/delete", r#"{"model":"m1"}"#).await;
    assert_eq!(s, StatusCode::CONFLICT);
    // two long streams hold the slots, four wait; their clients leave: the places free up
    let long = r#"{"model":"m1","prompt":"Once","max_tokens":200,"stream":true,"ignore_eos":true}"#;
    let req = || {
        axum::http::Request::builder()
            .method("POST")
            .uri("/v1/completions")
            .body(axum::body::Body::from(long))
            .expect("request")
    };
    use tower::ServiceExt;
    let mut running = Vec::new();
    for _ in 0..2 {
        running.push(app.clone().oneshot(req()).await.expect("response"));
    }
    let model = st.registry.loaded().remove(0).model;
    while model
        .batch
        .stats()
        .running
        .load(std::sync::atomic::Ordering::Relaxed)
        < 2
    {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut queued = Vec::new();
    for _ in 0..4 {
        let r = app.clone().oneshot(req()).await.expect("response");
        assert_eq!(r.status(), StatusCode::OK);
        queued.push(r);
    }
    let (s, _, _) = call(&app, "POST", "/v1/completions", long).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "the queue is full");
    drop(queued);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let r = app.clone().oneshot(req()).await.expect("response");
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the places of clients that left are free"
    );
    drop((r, running));
}
