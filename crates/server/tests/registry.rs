//! The model registry under a memory budget, and the HTTP layer's errors, with the real
//! SmolLM2 model served under several names from a temporary store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use capy_server::app;
use capy_server::config::KeepAlive;
use capy_server::registry::{Registry, RegistryConfig};
use capy_store::Store;
use common::{call, registry_at, small_batch, temp_store};
use tower::ServiceExt;

fn registry(tag: &str, budget_models: Option<f64>, max_loaded: usize) -> Arc<Registry> {
    let store = temp_store(tag, &["m1", "m2", "m3"]);
    let probe = Registry::new(
        RegistryConfig {
            batch: small_batch(),
            keep_alive: KeepAlive::Forever,
            max_loaded,
            memory_budget: None,
            load_timeout: std::time::Duration::from_secs(2),
            spec: Default::default(),
        },
        Store::at(&store.root),
        vec![],
    );
    let (_, one) = probe
        .plan(&store.model_path("m1"), &Default::default())
        .expect("estimate");
    let one = one as f64;
    Registry::new(
        RegistryConfig {
            batch: small_batch(),
            keep_alive: KeepAlive::Forever,
            max_loaded,
            memory_budget: budget_models.map(|k| (k * one) as u64),
            load_timeout: std::time::Duration::from_secs(2),
            spec: Default::default(),
        },
        store,
        vec![],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_model_evicts_the_least_recently_used_idle_one() {
    let r = registry("evict", Some(2.5), 8);
    drop(r.acquire("m1", None).await.expect("m1 loads"));
    drop(r.acquire("m2", None).await.expect("m2 loads"));
    assert_eq!(r.loaded_names(), ["m1", "m2"]);
    // m1 was used before m2: it goes
    drop(r.acquire("m3", None).await.expect("m3 loads"));
    assert_eq!(r.loaded_names(), ["m2", "m3"]);
    assert!(r.used_bytes() <= r.cfg.memory_budget.expect("budget"));
    // using m2 again makes m3 the older one
    drop(r.acquire("m2", None).await.expect("m2 is loaded"));
    drop(r.acquire("m1:latest", None).await.expect("m1 loads again"));
    assert_eq!(r.loaded_names(), ["m1", "m2"]);
}

/// Two models under a budget that fits one: a request for the second waited for nothing
/// and got 503 while the first was busy. It waits until the busy model is idle, then
/// evicts it and loads (Ollama's behavior); 503 only after the load timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_a_busy_model_then_swaps_or_times_out() {
    let r = registry("busy", Some(1.5), 8);
    let held = r.acquire("m1", None).await.expect("m1 loads");
    // nobody releases m1 within the load timeout (2 s): 503 with Retry-After
    let t = std::time::Instant::now();
    let e = r.acquire("m2", None).await.err().expect("no room");
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(e.code, Some("no_room"));
    assert!(e.retry_after.is_some());
    assert_eq!(r.loaded_names(), ["m1"]);
    // several waiters: each gets its 503 after its own load timeout, not one after another
    let t = std::time::Instant::now();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let r = Arc::clone(&r);
            tokio::spawn(async move { r.acquire("m2", None).await.map(drop) })
        })
        .collect();
    for w in waiters {
        assert!(w.await.expect("join").is_err());
    }
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // m1 is released while m2's request waits: m2 gets it
    let waiter = {
        let r = Arc::clone(&r);
        tokio::spawn(async move { r.acquire("m2", None).await.map(drop) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "it waits rather than failing");
    drop(held);
    waiter
        .await
        .expect("join")
        .expect("m1 is idle now and gives way");
    assert_eq!(r.loaded_names(), ["m2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_larger_than_the_budget_is_refused_clearly() {
    let r = registry("large", Some(0.5), 8);
    let e = r.acquire("m1", None).await.err().expect("too large");
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert_eq!(e.code, Some("model_too_large"));
    assert!(e.message.contains("memory budget"), "{}", e.message);
    assert!(r.loaded_names().is_empty());
}

/// A KV cache pool no machine has would abort the process at allocation: refused with a
/// 400 before loading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_cache_larger_than_the_machine_is_refused_not_an_abort() {
    let store = temp_store("huge", &["m1"]);
    let mut batch = small_batch();
    batch.kv_bytes = Some(1 << 50);
    let r = registry_at(store, batch, &[]);
    let e = r.acquire("m1", None).await.err().expect("refused");
    assert_eq!(e.code, Some("model_too_large"), "{}", e.message);
    assert!(e.message.contains("this machine has"), "{}", e.message);
}

/// A pulled file of an architecture capy does not run (or a cut-off one) answered 500 with
/// a generic message: it is the model, not the server, so a 400 `model_not_supported` says
/// why, on both APIs, and names no server paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_capy_cannot_run_is_a_400_saying_why() {
    let store = temp_store("unsupported", &["phi", "cut"]);
    // a GGUF v3 with no tensors and one key: general.architecture = "phi3"
    let mut phi = b"GGUF".to_vec();
    phi.extend(3u32.to_le_bytes());
    phi.extend(0u64.to_le_bytes());
    phi.extend(1u64.to_le_bytes());
    let key = b"general.architecture";
    phi.extend((key.len() as u64).to_le_bytes());
    phi.extend(key);
    phi.extend(8u32.to_le_bytes()); // string
    phi.extend(4u64.to_le_bytes());
    phi.extend(b"phi3");
    let real = std::fs::read(store.model_path("cut")).expect("model");
    for (name, bytes) in [("phi", phi), ("cut", real[..real.len() / 2].to_vec())] {
        let path = store.model_path(name);
        std::fs::remove_file(&path).expect("unlink");
        std::fs::write(&path, bytes).expect("write");
    }
    let root = store.root.clone();
    let app = app(capy_server::AppState::new(registry_at(
        store,
        small_batch(),
        &[],
    )));
    for (model, want) in [
        ("phi", "unsupported model architecture \"phi3\""),
        ("cut", "lies outside the file"),
    ] {
        let body = format!(r#"{{"model": "{model}", "prompt": "Hi", "max_tokens": 1}}"#);
        let (status, v, _) = call(&app, "POST", "/v1/completions", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], "model_not_supported", "{v}");
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(msg.contains(want), "{msg}");
        assert!(!msg.contains(root.to_str().expect("utf-8")), "{msg}");
        let body = format!(r#"{{"model": "{model}", "prompt": "Hi", "stream": false}}"#);
        let (status, v, _) = call(&app, "POST", "/api/generate", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"].as_str().expect("error").contains(want), "{v}");
    }
    // /api/show too (it answered 500)
    let (status, v, _) = call(&app, "POST", "/api/show", r#"{"model": "cut"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let path = root.join("models").join("cut.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00garbage").expect("write");
    let (status, v, _) = call(&app, "POST", "/api/show", r#"{"model": "cut"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"].as_str().expect("error").contains("truncated"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_loaded_models_and_keep_alive() {
    let r = registry("maxloaded", None, 1);
    drop(r.acquire("m1", None).await.expect("loads"));
    drop(r.acquire("m2", None).await.expect("loads"));
    assert_eq!(r.loaded_names(), ["m2"]);
    // keep_alive 0: unloaded as soon as the request ends
    let l = r
        .acquire("m2", Some(KeepAlive::For(Duration::ZERO)))
        .await
        .expect("loaded");
    assert_eq!(r.loaded_names(), ["m2"]);
    drop(l);
    assert!(r.loaded_names().is_empty());
    // a short keep-alive expires
    drop(
        r.acquire("m3", Some(KeepAlive::For(Duration::from_millis(50))))
            .await
            .expect("loads"),
    );
    assert!(r.unload_expired().is_empty(), "not expired yet");
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(r.unload_expired(), ["m3"]);
    assert!(r.loaded_names().is_empty());
    let e = r.acquire("m9", None).await.err().expect("unknown");
    assert_eq!(e.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_health_and_a_full_queue() {
    let mut batch = small_batch();
    batch.n_slots = 1;
    batch.max_queue = 1;
    let state = common::state("http", batch);
    let app = app(Arc::clone(&state));
    let (s, _, retry) = call(&app, "GET", "/health", "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry.is_some());
    state.load_warm_set().await.expect("warm set loads");
    assert_eq!(call(&app, "GET", "/health", "").await.0, StatusCode::OK);

    let (s, v, _) = call(&app, "POST", "/v1/chat/completions", "{not json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("invalid JSON"));
    let (s, v, _) = call(
        &app,
        "POST",
        "/api/generate",
        r#"{"model":"nope","prompt":"hi"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        v["error"].as_str().unwrap_or("").contains("nope"),
        "Ollama's shape: {v}"
    );
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/completions",
        r#"{"model":"m1","prompt":[1,2,99999999]}"#,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let long: Vec<String> = (0..300).map(|_| "1".to_string()).collect();
    let body = format!(r#"{{"model":"m1","prompt":[{}]}}"#, long.join(","));
    let (s, v, _) = call(&app, "POST", "/v1/completions", &body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (s, _, _) = call(&app, "GET", "/v1/nothing", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"m1","messages":[{"role":"user","content":"x"}],"n":99}"#,
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("n"))
    );

    // one slot and one queue place: a third concurrent request gets 429 + Retry-After
    let stream = r#"{"model":"m1","prompt":"Tell me a story","max_tokens":200,"stream":true,"ignore_eos":true}"#;
    let req = |b: &str| {
        Request::builder()
            .method("POST")
            .uri("/v1/completions")
            .body(Body::from(b.to_string()))
            .expect("request")
    };
    let first = app.clone().oneshot(req(stream)).await.expect("response");
    assert_eq!(first.status(), StatusCode::OK);
    let model = state.registry.loaded().remove(0).model;
    while model
        .batch
        .stats()
        .running
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = app.clone().oneshot(req(stream)).await.expect("response");
    assert_eq!(second.status(), StatusCode::OK);
    let (s, v, retry) = call(&app, "POST", "/v1/completions", stream).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(retry.as_deref(), Some("1"));
    // the streams end with [DONE]
    for r in [first, second] {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 24)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        assert_eq!(text.matches("\"finish_reason\":\"length\"").count(), 1);
    }
}

/// `capy serve -m smollm2-135m` answered 404 to `"model": "smollm2"`, the built-in alias.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_model_answers_to_its_built_in_alias() {
    let store = temp_store("alias", &["smollm2-135m"]);
    let r = registry_at(store, small_batch(), &["smollm2-135m"]);
    for alias in ["smollm2", "smollm2:135m", "smollm2-135m:latest"] {
        let got = r.resolve(alias).expect(alias);
        assert_eq!(got.name, "smollm2-135m");
    }
    assert!(r.resolve("gemma3").is_err());
}

/// A model's KV-cache preemptions still count in the metrics after it is unloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemptions_of_an_unloaded_model_still_count() {
    let store = temp_store("preempt", &["m1"]);
    let g = capy_gguf::Gguf::open(store.model_path("m1")).expect("gguf");
    let hp = capy_model::Hparams::from_gguf(&g).expect("hparams");
    let mut batch = small_batch();
    // 4 blocks for two sequences that grow to 3 blocks each
    batch.kv_bytes = Some(batch.kv_bytes_for(&hp, 4));
    let r = registry_at(store, batch, &[]);
    let lease = r.acquire("m1", None).await.expect("loads");
    let prompt: Vec<u32> = (0..100).map(|i| 1000 + i).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..2 {
        let tx = tx.clone();
        let mut params = capy_engine::GenerateParams {
            max_tokens: 120,
            ..Default::default()
        };
        params.ignore_eos = true;
        lease
            .batch
            .submit(capy_engine::Request {
                prompt: prompt.clone(),
                params,
                n_ctx: None,
                salt: String::new(),
                sink: Box::new(capy_engine::FnSink(move |ev| {
                    if matches!(
                        ev,
                        capy_engine::Event::Done(_) | capy_engine::Event::Failed(_)
                    ) {
                        let _ = tx.send(matches!(ev, capy_engine::Event::Done(_)));
                    }
                    true
                })),
            })
            .expect("queued");
    }
    for _ in 0..2 {
        assert!(
            rx.recv_timeout(Duration::from_secs(120)).expect("ends"),
            "completes"
        );
    }
    let n = lease
        .batch
        .stats()
        .preemptions
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(n > 0, "the pool was meant to run out");
    assert_eq!(r.retired_preemptions(), 0);
    let metrics = capy_server::metrics::Metrics::default();
    let text = metrics.render(&r);
    assert_eq!(metric(&text, "capy_kv_cache_preemptions_total"), n as f64);
    assert_eq!(metric(&text, "capy_kv_cache_capacity_tokens"), 4.0 * 64.0);
    assert_eq!(
        metric(&text, "capy_kv_cache_bytes") as u64,
        small_batch().kv_bytes_for(&hp, 4)
    );
    let ratio = metric(&text, "capy_kv_cache_usage_ratio");
    assert!((0.0..=1.0).contains(&ratio), "{ratio}");
    drop(lease);
    assert!(r.unload("m1"));
    assert_eq!(r.retired_preemptions(), n);
    let text = metrics.render(&r);
    assert_eq!(
        metric(&text, "capy_kv_cache_preemptions_total"),
        n as f64,
        "the counter does not go down when the model unloads"
    );
    assert_eq!(metric(&text, "capy_kv_cache_bytes"), 0.0);
}

/// The value of an unlabelled series in a Prometheus text page.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}
