//! An ensemble's answer in each API's shape: whole, or streamed (SSE for OpenAI, NDJSON
//! for Ollama), with the `ensemble` extension field on the response (the last chunk or
//! line when streamed).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::ensemble::{self, Final, Job, Out};
use super::router::Api;
use super::{VirtualKind, VirtualModel};
use crate::error::ApiError;
use crate::gateway::Ticket;
use crate::gen::{new_id, rfc3339, stream_response, unix_now};
use crate::openai::finish_reason;
use crate::AppState;

/// An ensemble request as a handler parsed it: what to ask, and how to answer.
pub struct Ask {
    pub job: Job,
    pub stream: bool,
    /// OpenAI's `stream_options.include_usage`.
    pub include_usage: bool,
}

/// A 400 for a field ensembles do not take.
pub fn unsupported(field: &str) -> ApiError {
    ApiError::bad_request(format!("{field} is not supported by ensemble models")).param(field)
}

/// Runs ensemble `v` for a request of `api` and answers it.
///
/// # Errors
/// Every member refused (see [`ensemble::start`]); a failure during a response that is
/// not streamed.
pub async fn ensemble(
    st: &Arc<AppState>,
    v: &VirtualModel,
    api: Api,
    ask: Ask,
    ticket: Option<Arc<Ticket>>,
    t0: Instant,
) -> Result<Response, ApiError> {
    let VirtualKind::Ensemble(spec) = &v.kind else {
        return Err(ApiError::internal(format!("{} is not an ensemble", v.name)));
    };
    let rx = ensemble::start(st, v, spec, ask.job, ticket).await?;
    let name = match api {
        Api::OllamaChat | Api::OllamaGenerate => format!("{}:latest", v.name),
        _ => v.name.clone(),
    };
    if !ask.stream {
        let (text, f) = ensemble::collect(rx).await?;
        return Ok(Json(whole(api, &name, &text, &f, t0)).into_response());
    }
    let content_type = match api {
        Api::OpenAiChat | Api::OpenAiCompletions => "text/event-stream",
        _ => "application/x-ndjson",
    };
    Ok(stream_response(content_type, move |out| async move {
        stream(api, name, rx, ask.include_usage, t0, out).await
    }))
}

fn usage(f: &Final) -> Value {
    crate::openai::usage(f.prompt_tokens, f.completion_tokens, f.cached_tokens)
}

fn fingerprint() -> String {
    format!("capy-{}", env!("CARGO_PKG_VERSION"))
}

/// Ollama's final counters (durations other than the total are not split per model).
fn ollama_finals(v: &mut Value, f: &Final, t0: Instant) {
    v["done"] = json!(true);
    v["done_reason"] = json!(finish_reason(f.stop));
    v["total_duration"] = json!(t0.elapsed().as_nanos() as u64);
    v["load_duration"] = json!(0);
    v["prompt_eval_count"] = json!(f.prompt_tokens);
    v["prompt_eval_duration"] = json!(0);
    v["eval_count"] = json!(f.completion_tokens);
    v["eval_duration"] = json!(0);
    v["ensemble"] = f.ensemble.clone();
}

fn ollama_piece(api: Api, name: &str, text: &str) -> Value {
    let mut v = json!({"model": name, "created_at": rfc3339(SystemTime::now()), "done": false});
    if api == Api::OllamaChat {
        v["message"] = json!({"role": "assistant", "content": text});
    } else {
        v["response"] = json!(text);
    }
    v
}

/// The whole answer.
fn whole(api: Api, name: &str, text: &str, f: &Final, t0: Instant) -> Value {
    match api {
        Api::OpenAiChat => json!({
            "id": new_id("chatcmpl"), "object": "chat.completion", "created": unix_now(),
            "model": name, "system_fingerprint": fingerprint(),
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": text, "refusal": null},
                         "logprobs": null, "finish_reason": finish_reason(f.stop)}],
            "usage": usage(f), "ensemble": f.ensemble,
        }),
        Api::OpenAiCompletions => json!({
            "id": new_id("cmpl"), "object": "text_completion", "created": unix_now(),
            "model": name,
            "choices": [{"index": 0, "text": text, "logprobs": null,
                         "finish_reason": finish_reason(f.stop)}],
            "usage": usage(f), "ensemble": f.ensemble,
        }),
        Api::OllamaChat | Api::OllamaGenerate => {
            let mut v = ollama_piece(api, name, text);
            ollama_finals(&mut v, f, t0);
            v
        }
    }
}

/// Streams the answer's pieces, then its end.
async fn stream(
    api: Api,
    name: String,
    mut rx: mpsc::Receiver<Out>,
    include_usage: bool,
    t0: Instant,
    out: crate::gen::Frames,
) {
    let openai = matches!(api, Api::OpenAiChat | Api::OpenAiCompletions);
    let id = new_id(if api == Api::OpenAiChat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = unix_now();
    let chunk = |delta: Value, finish: Option<&str>| -> Value {
        let mut v = if api == Api::OpenAiChat {
            json!({"id": id, "object": "chat.completion.chunk", "created": created,
                   "model": name, "system_fingerprint": fingerprint(),
                   "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                "finish_reason": finish}]})
        } else {
            json!({"id": id, "object": "text_completion", "created": created, "model": name,
                   "choices": [{"index": 0, "text": delta, "logprobs": null,
                                "finish_reason": finish}]})
        };
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    if api == Api::OpenAiChat
        && !out
            .sse(&chunk(json!({"role": "assistant", "content": ""}), None))
            .await
    {
        return;
    }
    while let Some(o) = rx.recv().await {
        let ok = match o {
            Out::Piece(p) if p.is_empty() => true,
            Out::Piece(p) => match api {
                Api::OpenAiChat => out.sse(&chunk(json!({"content": p}), None)).await,
                Api::OpenAiCompletions => out.sse(&chunk(json!(p), None)).await,
                _ => out.line(&ollama_piece(api, &name, &p)).await,
            },
            Out::Failed(e) => {
                let e = e.for_client();
                if openai {
                    let _ = out.sse(&e.body()).await;
                } else {
                    let _ = out.line(&json!({"error": e.message})).await;
                }
                return;
            }
            Out::Done(f) => {
                if openai {
                    let empty = if api == Api::OpenAiChat {
                        json!({})
                    } else {
                        json!("")
                    };
                    let mut last = chunk(empty, Some(finish_reason(f.stop)));
                    last["ensemble"] = f.ensemble.clone();
                    if !out.sse(&last).await {
                        return;
                    }
                    if include_usage {
                        let mut u = chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(&f);
                        if !out.sse(&u).await {
                            return;
                        }
                    }
                    let _ = out.send("data: [DONE]\n\n".into()).await;
                } else {
                    let mut v = ollama_piece(api, &name, "");
                    ollama_finals(&mut v, &f, t0);
                    let _ = out.line(&v).await;
                }
                return;
            }
        };
        if !ok {
            return;
        }
    }
    let e = ApiError::internal("the ensemble stopped during the request").for_client();
    if openai {
        let _ = out.sse(&e.body()).await;
    } else {
        let _ = out.line(&json!({"error": e.message})).await;
    }
}
