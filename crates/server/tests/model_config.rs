//! Per-model settings from the config file (`[models.NAME]`): names and aliases, context
//! and parallel sequences, a default system message, default sampling options under the
//! request's, warm and cold models, all through the real server routes and SmolLM2.

mod common;

use std::sync::Arc;

use capy_server::config::{Config, KeepAlive};
use capy_server::registry::{Registry, RegistryConfig};
use capy_server::{app, AppState};
use common::{call, small_batch, temp_store};
use serde_json::{json, Value};

const SYSTEM: &str = "You answer every question with a single word.";

const CONFIG: &str = r#"
[models.terse]
source = "m1"
ctx_size = 128
parallel = 1
system = "You answer every question with a single word."
aliases = ["t", "gpt-4o-mini"]
[models.terse.options]
temperature = 1.5
top_k = 40
seed = 42

[models.plain]
source = "m1"
warm = false
keep_alive = "0"
"#;

async fn served(tag: &str) -> (axum::Router, Arc<AppState>) {
    served_with(tag, &["m1"], CONFIG).await
}

async fn chat(app: &axum::Router, body: Value) -> Value {
    let (status, v, _) = call(app, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, 200, "{body}: {v}");
    v
}

fn text(v: &Value) -> &str {
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
}

fn loaded(ps: &Value) -> Vec<(String, u64)> {
    ps["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("").to_string(),
                m["context_length"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_tables_set_names_context_system_and_sampling() {
    let (app, _state) = served("model-config").await;

    // the warm model is loaded at start with its own context; the cold one is not
    let (_, ps, _) = call(&app, "GET", "/api/ps", "").await;
    assert_eq!(loaded(&ps), [("terse:latest".to_string(), 128)]);
    let (_, models, _) = call(&app, "GET", "/v1/models", "").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["terse", "plain"]);

    let user = json!({"role": "user", "content": "What color is the sky?"});
    let with_system = json!([{"role": "system", "content": SYSTEM}, user]);

    // an alias answers as the model's name; the configured system message is added to a
    // conversation that has none, so the prompt is the one with it written out
    let a = chat(
        &app,
        json!({"model": "gpt-4o-mini", "messages": [user], "max_tokens": 12}),
    )
    .await;
    assert_eq!(a["model"], "terse");
    let b = chat(
        &app,
        json!({"model": "plain", "messages": with_system, "max_tokens": 12,
               "temperature": 1.5, "top_k": 40, "seed": 42}),
    )
    .await;
    assert_eq!(
        a["usage"]["prompt_tokens"], b["usage"]["prompt_tokens"],
        "the default system message is in the prompt"
    );
    // and the configured options (temperature 1.5, seed 42) are the sampling defaults
    assert_eq!(
        text(&a),
        text(&b),
        "config options == the same request fields"
    );

    // a conversation with its own system message keeps it, without the default
    let own = json!([{"role": "system", "content": "Be brief."}, user]);
    let c = chat(
        &app,
        json!({"model": "t", "messages": own, "max_tokens": 1}),
    )
    .await;
    let d = chat(
        &app,
        json!({"model": "plain", "messages": own, "max_tokens": 1}),
    )
    .await;
    assert_eq!(c["usage"]["prompt_tokens"], d["usage"]["prompt_tokens"]);

    // request fields win over the configured options
    let greedy = chat(
        &app,
        json!({"model": "terse", "messages": [user], "max_tokens": 12, "temperature": 0}),
    )
    .await;
    let greedy_plain = chat(
        &app,
        json!({"model": "plain", "messages": with_system, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(text(&greedy), text(&greedy_plain));

    // the cold model was loaded on request and, with keep_alive "0", unloaded after it
    let (_, ps, _) = call(&app, "GET", "/api/ps", "").await;
    assert_eq!(loaded(&ps), [("terse:latest".to_string(), 128)]);
    // its KV cache: one sequence of 128 positions = 2 blocks, none held by a running
    // sequence now, the ones its requests wrote kept for the prefix cache
    let kv = &ps["models"][0]["kv_cache"];
    assert_eq!(kv["blocks"], 2, "{ps}");
    assert_eq!(kv["blocks_used"], 0, "{ps}");
    assert!(
        kv["blocks_cached"]
            .as_u64()
            .is_some_and(|u| (1..=2).contains(&u)),
        "{ps}"
    );
    assert_eq!(kv["bytes_used"], 0, "{ps}");
    // the prompt tokens of its requests, some of them (the shared start) from the cache
    let (prompt, cached) = (kv["prompt_tokens"].as_u64(), kv["cached_tokens"].as_u64());
    assert!(prompt.is_some_and(|p| p > 0), "{ps}");
    assert!(cached.is_some_and(|c| c <= prompt.unwrap_or(0)), "{ps}");
    assert_eq!(
        kv["bytes"],
        kv["blocks"].as_u64().unwrap() * 1_474_560,
        "{ps}"
    );

    // the per-model context: 128 positions, so a long prompt is refused for terse only
    let long = "the sky is blue and ".repeat(40);
    let body = json!({"model": "terse", "messages": [{"role": "user", "content": long}],
                      "max_tokens": 4});
    let (status, e, _) = call(&app, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    let body = json!({"model": "plain", "messages": [{"role": "user", "content": long}],
                      "max_tokens": 4});
    let (status, e, _) = call(&app, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, 200, "plain has the server's 256: {e}");

    // /api/show reports the settings as Ollama's Modelfile PARAMETER and SYSTEM do
    let (status, show, _) = call(&app, "POST", "/api/show", r#"{"model": "t"}"#).await;
    assert_eq!(status, 200, "{show}");
    assert_eq!(show["system"], SYSTEM);
    let params = show["parameters"].as_str().expect("parameters");
    assert!(
        params.contains("temperature") && params.contains("1.5"),
        "{params}"
    );
    assert!(params.contains("seed") && params.contains("42"), "{params}");
    let modelfile = show["modelfile"].as_str().expect("modelfile");
    assert!(modelfile.contains("PARAMETER top_k 40"), "{modelfile}");
    assert!(modelfile.contains("SYSTEM"), "{modelfile}");

    // the source's own name is not one this server answers to, nor is anything unlisted
    for name in ["m1", "nope"] {
        let body = json!({"model": name, "messages": [user], "max_tokens": 1});
        let (status, _, _) = call(&app, "POST", "/v1/chat/completions", &body.to_string()).await;
        assert_eq!(status, 404, "{name}");
    }
    // and a configured model's file cannot be deleted while the server serves it
    let (status, _, _) = call(&app, "DELETE", "/api/delete", r#"{"model": "m1"}"#).await;
    assert_eq!(status, 409);
}

/// Ollama's routes take the same defaults: `/api/chat` and `/api/generate` get the system
/// message unless they bring their own (`system` on `/api/generate`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_routes_get_the_configured_system_message() {
    let (app, _state) = served("model-config-ollama").await;
    let count = |v: &Value| v["prompt_eval_count"].as_u64().expect("prompt_eval_count");
    let msg = json!({"role": "user", "content": "Hi"});
    let ask = |model: &str, messages: Value| {
        json!({"model": model, "messages": messages, "stream": false,
               "options": {"num_predict": 1}})
        .to_string()
    };
    let (s1, a, _) = call(&app, "POST", "/api/chat", &ask("terse", json!([msg]))).await;
    let sys = json!({"role": "system", "content": SYSTEM});
    let (s2, b, _) = call(&app, "POST", "/api/chat", &ask("plain", json!([sys, msg]))).await;
    assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200), "{a} {b}");
    assert_eq!(count(&a), count(&b));

    let gen = |model: &str, system: Option<&str>| {
        let mut v = json!({"model": model, "prompt": "Hi", "stream": false,
                           "options": {"num_predict": 1}});
        if let Some(s) = system {
            v["system"] = json!(s);
        }
        v.to_string()
    };
    let (_, g1, _) = call(&app, "POST", "/api/generate", &gen("terse", None)).await;
    let (_, g2, _) = call(&app, "POST", "/api/generate", &gen("plain", Some(SYSTEM))).await;
    let (_, g3, _) = call(
        &app,
        "POST",
        "/api/generate",
        &gen("terse", Some("Be brief.")),
    )
    .await;
    let (_, g4, _) = call(
        &app,
        "POST",
        "/api/generate",
        &gen("plain", Some("Be brief.")),
    )
    .await;
    assert_eq!(count(&g1), count(&g2), "{g1} {g2}");
    assert_eq!(count(&g3), count(&g4), "{g3} {g4}");
    assert_ne!(count(&g1), count(&g3));
}

/// The app over a store holding SmolLM2 as each of `names`, serving `config`'s models
/// (`STORE` in it stands for the store's directory), the warm ones loaded.
async fn served_with(tag: &str, names: &[&str], config: &str) -> (axum::Router, Arc<AppState>) {
    let store = temp_store(tag, names);
    let config = config.replace("STORE", store.root.to_str().expect("utf-8"));
    let checked = Config::from_toml(&config)
        .expect("valid TOML")
        .validate()
        .expect("valid settings");
    let registry = Registry::new(
        RegistryConfig {
            batch: small_batch(),
            keep_alive: KeepAlive::Forever,
            max_loaded: 3,
            memory_budget: None,
            load_timeout: std::time::Duration::from_secs(2),
            spec: Default::default(),
        },
        store,
        checked.models,
    );
    let state = AppState::new(registry);
    state.load_warm_set().await.expect("warm set loads");
    (app(Arc::clone(&state)), state)
}

/// `DELETE /api/delete` by a built-in's alias (`smollm2`) deleted the served model's file,
/// and a `path =` table over a stored file did not protect it; a configured name got 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_files_cannot_be_deleted_by_any_name() {
    let (app, _state) = served_with(
        "delete-alias",
        &["smollm2-135m", "other"],
        "[models.smollm2-135m]\n[models.local]\npath = \"STORE/models/other.gguf\"\nwarm = false\n",
    )
    .await;
    for name in [
        "smollm2",
        "smollm2:latest",
        "smollm2-135m",
        "other",
        "local",
    ] {
        let body = json!({"model": name}).to_string();
        let (status, v, _) = call(&app, "DELETE", "/api/delete", &body).await;
        assert_eq!(status, 409, "{name}: {v}");
    }
    let (status, _, _) = call(&app, "GET", "/api/tags", "").await;
    assert_eq!(status, 200);
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 1});
    let (status, v, _) = call(&app, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, 200, "still served: {v}");
}

/// `keep_alive: 0` (and `capy stop`) on a busy model answered "unload" and unloaded
/// nothing: it is unloaded when its last request ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_busy_model_unloads_it_when_idle() {
    let (app, state) = served_with("stop-busy", &["m1"], "[models.hot]\nsource = \"m1\"\n").await;
    let lease = state.registry.acquire("hot", None).await.expect("loaded");
    let (status, v, _) = call(
        &app,
        "POST",
        "/api/generate",
        r#"{"model":"hot","keep_alive":0}"#,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["done_reason"], "unload");
    assert_eq!(state.registry.loaded_names(), ["hot"], "busy: still loaded");
    drop(lease);
    assert!(
        state.registry.loaded_names().is_empty(),
        "unloaded once idle"
    );
}

/// A table's `ctx_size` beyond the model's trained context was taken as is (SmolLM2 took
/// 9000-token prompts at a 20000 context): it is capped there, as `capy run` caps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_beyond_the_trained_one_is_capped() {
    let (app, _state) = served_with(
        "ctx-cap",
        &["m1"],
        "[models.wide]\nsource = \"m1\"\nctx_size = 100000\nparallel = 1\n",
    )
    .await;
    let (_, ps, _) = call(&app, "GET", "/api/ps", "").await;
    assert_eq!(ps["models"][0]["context_length"], 8192, "{ps}");
}

/// Ollama's routes: an unknown chat role, a bad `format` and `template` were accepted and
/// ignored; `"system": ""` dropped the configured system message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_requests_refuse_what_they_cannot_honour() {
    let (app, _state) = served("ollama-refusals").await;
    for (path, body, want) in [
        (
            "/api/chat",
            json!({"model": "terse", "messages": [{"role": "wizard", "content": "Hi"}]}),
            "messages[0].role",
        ),
        (
            "/api/chat",
            json!({"model": "terse", "messages": [{"role": "developer", "content": "Hi"}]}),
            "messages[0].role",
        ),
        (
            "/api/chat",
            json!({"model": "terse", "format": "yaml",
                   "messages": [{"role": "user", "content": "Hi"}]}),
            "format",
        ),
        (
            "/api/generate",
            json!({"model": "terse", "prompt": "Hi", "format": {"type": "object",
                   "properties": {"a": {"$ref": "#/$defs/missing"}}}}),
            "format",
        ),
        (
            "/api/generate",
            json!({"model": "terse", "prompt": "Hi", "format": 7}),
            "format",
        ),
        (
            "/api/generate",
            json!({"model": "terse", "prompt": "Hi", "template": "{{ .Prompt }}"}),
            "template",
        ),
        (
            "/api/generate",
            json!({"model": "terse", "prompt": "Hi", "keep_alive": "soon"}),
            "keep_alive",
        ),
    ] {
        let (status, v, _) = call(&app, "POST", path, &body.to_string()).await;
        assert_eq!(status, 400, "{body}: {v}");
        let e = v["error"].as_str().expect("Ollama's error shape");
        assert!(e.contains(want), "{body}: {e}");
    }
    // null and "" mean no format, and "" no system message (the configured one applies)
    let count = |v: &Value| v["prompt_eval_count"].as_u64().expect("prompt_eval_count");
    let gen = |system: Value| {
        json!({"model": "terse", "prompt": "Hi", "stream": false, "format": "",
               "system": system, "options": {"num_predict": 1}})
        .to_string()
    };
    let (s1, a, _) = call(&app, "POST", "/api/generate", &gen(json!(""))).await;
    let (s2, b, _) = call(&app, "POST", "/api/generate", &gen(Value::Null)).await;
    assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200), "{a} {b}");
    assert_eq!(count(&a), count(&b));
}
