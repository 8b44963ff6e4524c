//! What the server's integration tests share: a temporary store holding the real SmolLM2
//! under test names, small engine settings, a served app and one-request calls.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use capy_engine::BatchParams;
use capy_server::config::{KeepAlive, ServedModel};
use capy_server::registry::{Registry, RegistryConfig};
use capy_server::{app, AppState};
use capy_store::{Manifest, Store};
use serde_json::Value;
use tower::ServiceExt;

/// A store in a fresh temporary directory holding SmolLM2 under each of `names`.
pub fn temp_store(tag: &str, names: &[&str]) -> Store {
    let real = Store::open_default()
        .resolve("smollm2-135m")
        .expect("the tests need the real model: run `capy pull smollm2-135m`");
    let root: PathBuf =
        std::env::temp_dir().join(format!("capy-registry-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let store = Store::at(&root);
    std::fs::create_dir_all(root.join("models")).expect("mkdir");
    std::fs::create_dir_all(root.join("manifests")).expect("mkdir");
    for n in names {
        std::os::unix::fs::symlink(&real, store.model_path(n)).expect("symlink");
        let m = Manifest {
            name: n.to_string(),
            source: "test".into(),
            sha256: String::new(),
            size: 0,
            pulled_at: 0,
        };
        let text = serde_json::to_string(&m).expect("json");
        std::fs::write(root.join("manifests").join(format!("{n}.json")), text).expect("write");
    }
    store
}

pub fn small_batch() -> BatchParams {
    BatchParams {
        n_slots: 2,
        n_ctx: 256,
        kv_bytes: None,
        type_k: Default::default(),
        type_v: Default::default(),
        swa_full: false,
        n_batch: 64,
        n_threads: 1,
        max_queue: 4,
        isa: None,
        ..Default::default()
    }
}

/// A registry over `store` with `batch`, the warm set `warm`, no memory budget, at most two
/// models loaded, kept forever, a 2 s load timeout.
pub fn registry_at(store: Store, batch: BatchParams, warm: &[&str]) -> Arc<Registry> {
    Registry::new(
        RegistryConfig {
            batch,
            keep_alive: KeepAlive::Forever,
            max_loaded: 2,
            memory_budget: None,
            load_timeout: std::time::Duration::from_secs(2),
            spec: Default::default(),
        },
        store,
        warm.iter().map(|w| ServedModel::named(w)).collect(),
    )
}

/// The state over a store holding SmolLM2 as `m1`, the warm set, not loaded yet.
pub fn state(tag: &str, batch: BatchParams) -> Arc<AppState> {
    AppState::new(registry_at(temp_store(tag, &["m1"]), batch, &["m1"]))
}

/// The app over [`state`], with `m1` loaded.
pub async fn served(tag: &str, batch: BatchParams) -> (axum::Router, Arc<AppState>) {
    let state = state(tag, batch);
    state.load_warm_set().await.expect("warm set loads");
    (app(Arc::clone(&state)), state)
}

/// One request: (status, JSON body or `Null`, `Retry-After`).
pub async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, Value, Option<String>) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        retry,
    )
}
