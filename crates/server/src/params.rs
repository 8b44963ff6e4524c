//! Every request field of both APIs and how it is checked, in tables, before a handler reads
//! the typed request. One layer for all routes:
//! - `null` means "not given" for every optional field (the OpenAI spec marks them nullable,
//!   and its Python client sends `logprobs=None` as `null`; Ollama accepts nulls too), so nulls
//!   are dropped first, in nested objects as well;
//! - a value of the wrong type or outside its range is a 400 `invalid_request_error` whose
//!   `param` names the field, never a serde message about the JSON;
//! - numbers take their ranges from [`capy_engine::params`], which the CLI's flags use too.
//!
//! Fields a route does not list are accepted and ignored, as OpenAI and Ollama clients send
//! many (`logit_bias`, `num_gpu`, ...).

use capy_engine::params::{self as p, Param};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::config::KeepAlive;
use crate::error::{ApiError, Flavor};

/// A `stop` field: one string or several.
#[derive(serde::Deserialize, Clone, Debug)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub(crate) fn strings(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// What a field holds.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ty {
    Bool,
    Str,
    /// A number in the parameter's range (integral floats such as `5.0` count as integers).
    Num(&'static Param),
    /// A string or an array of at most 16 strings (OpenAI's `stop`).
    Stop,
    /// An array of token ids (Ollama's `context`).
    Tokens,
    /// An array; its elements are read by the handler (`messages`, `images`, `tools`).
    Array,
    /// An object with its own fields.
    Object(&'static [&'static [Field]]),
    /// A duration: a string such as "5m" or a number of seconds ([`KeepAlive`]).
    Duration,
    /// Any JSON, passed through as given (a prompt, a JSON schema).
    Any,
}

/// One request field.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Field {
    pub name: &'static str,
    pub ty: Ty,
    pub required: bool,
}

const fn opt(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        required: false,
    }
}

const fn req(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        required: true,
    }
}

const fn num(p: &'static Param) -> Field {
    opt(p.name, Ty::Num(p))
}

/// The sampling knobs, by the same names in OpenAI requests (with llama-server's and vLLM's
/// extensions) and in Ollama's `options`.
pub(crate) const SAMPLING: &[Field] = &[
    num(&p::TEMPERATURE),
    num(&p::TOP_K),
    num(&p::TOP_P),
    num(&p::MIN_P),
    num(&p::REPEAT_PENALTY),
    num(&p::REPEAT_LAST_N),
    num(&p::PRESENCE_PENALTY),
    num(&p::FREQUENCY_PENALTY),
    num(&p::SEED),
];

const STREAM_OPTIONS: &[Field] = &[opt("include_usage", Ty::Bool)];

/// What `/v1/chat/completions` and `/v1/completions` share.
pub(crate) const OPENAI_COMMON: &[Field] = &[
    req("model", Ty::Str),
    opt("stream", Ty::Bool),
    opt("stream_options", Ty::Object(&[STREAM_OPTIONS])),
    num(&p::MAX_TOKENS),
    num(&p::MAX_COMPLETION_TOKENS),
    opt("stop", Ty::Stop),
    num(&p::N),
    opt("user", Ty::Str),
    opt("ignore_eos", Ty::Bool),
    // llama-server's structured outputs
    opt("grammar", Ty::Str),
    opt("json_schema", Ty::Any),
    // ensembles' candidates in the answer
    opt("include_candidates", Ty::Bool),
];

pub(crate) const OPENAI_CHAT: &[Field] = &[
    req("messages", Ty::Array),
    opt("response_format", Ty::Any),
    opt("tools", Ty::Array),
    opt("tool_choice", Ty::Any),
    opt("parallel_tool_calls", Ty::Bool),
    opt("logprobs", Ty::Bool),
    num(&p::TOP_LOGPROBS),
];

pub(crate) const OPENAI_COMPLETION: &[Field] = &[
    req("prompt", Ty::Any),
    opt("echo", Ty::Bool),
    opt("response_format", Ty::Any),
    num(&p::LOGPROBS),
    opt("suffix", Ty::Str),
];

/// Ollama's `options` besides the sampling knobs (others, such as `num_gpu`, are accepted
/// and ignored).
pub(crate) const OLLAMA_OPTIONS: &[Field] = &[
    num(&p::NUM_CTX),
    num(&p::NUM_PREDICT),
    opt("stop", Ty::Stop),
];

/// What `/api/generate` and `/api/chat` share.
pub(crate) const OLLAMA_COMMON: &[Field] = &[
    req("model", Ty::Str),
    opt("stream", Ty::Bool),
    opt("options", Ty::Object(&[SAMPLING, OLLAMA_OPTIONS])),
    opt("keep_alive", Ty::Duration),
    opt("format", Ty::Any),
    opt("think", Ty::Any),
    // ensembles' candidates in the answer
    opt("include_candidates", Ty::Bool),
];

pub(crate) const OLLAMA_GENERATE: &[Field] = &[
    opt("prompt", Ty::Str),
    opt("suffix", Ty::Str),
    opt("system", Ty::Str),
    opt("template", Ty::Str),
    opt("raw", Ty::Bool),
    opt("context", Ty::Tokens),
    opt("images", Ty::Array),
];

pub(crate) const OLLAMA_CHAT: &[Field] = &[opt("messages", Ty::Array), opt("tools", Ty::Array)];

/// llama-server's `/tokenize` and `/detokenize`.
pub(crate) const TOKENIZE_FIELDS: &[Field] = &[
    req("content", Ty::Str),
    opt("add_special", Ty::Bool),
    opt("parse_special", Ty::Bool),
    opt("with_pieces", Ty::Bool),
    opt("model", Ty::Str),
];
pub(crate) const DETOKENIZE_FIELDS: &[Field] = &[req("tokens", Ty::Tokens), opt("model", Ty::Str)];

/// The routes' tables, for [`parse`].
pub(crate) const CHAT_COMPLETIONS: &[&[Field]] = &[OPENAI_COMMON, SAMPLING, OPENAI_CHAT];
pub(crate) const COMPLETIONS: &[&[Field]] = &[OPENAI_COMMON, SAMPLING, OPENAI_COMPLETION];
pub(crate) const GENERATE: &[&[Field]] = &[OLLAMA_COMMON, OLLAMA_GENERATE];
pub(crate) const CHAT: &[&[Field]] = &[OLLAMA_COMMON, OLLAMA_CHAT];
pub(crate) const TOKENIZE: &[&[Field]] = &[TOKENIZE_FIELDS];
pub(crate) const DETOKENIZE: &[&[Field]] = &[DETOKENIZE_FIELDS];

/// The JSON type of a value, in words.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Drops `null` members of an object and of the objects inside its arrays (messages and
/// their parts), except under fields whose JSON is the user's own ([`Ty::Any`]).
fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Checks one object against its tables, dropping nulls and turning integral floats of
/// integer fields into integers. `path` prefixes nested names (`options.`).
fn check_object(
    m: &mut Map<String, Value>,
    tables: &[&[Field]],
    path: &str,
) -> Result<(), ApiError> {
    m.retain(|_, x| !x.is_null());
    for f in tables.iter().flat_map(|t| t.iter()) {
        let name = format!("{path}{}", f.name);
        let Some(v) = m.get_mut(f.name) else {
            if f.required {
                return Err(ApiError::bad_request(format!("{name} is required")).param(name));
            }
            continue;
        };
        let wrong = |what: &str, v: &Value| {
            Err(ApiError::bad_request(format!(
                "invalid type for {name}: expected {what}, got {}",
                kind(v)
            ))
            .code("invalid_type")
            .param(name.clone()))
        };
        match f.ty {
            Ty::Bool if !v.is_boolean() => return wrong("a boolean", v),
            Ty::Str if !v.is_string() => return wrong("a string", v),
            Ty::Num(param) => {
                let Some(x) = v.as_f64() else {
                    return wrong(
                        if param.integer {
                            "an integer"
                        } else {
                            "a number"
                        },
                        v,
                    );
                };
                // a seed is a 64-bit integer exactly (1e19 or 2^64 are not) and keeps its
                // value; other integers fit an f64 exactly
                if param.name == p::SEED.name && !(v.is_i64() || v.is_u64()) {
                    return Err(ApiError::bad_request(format!(
                        "{name} must be {}, got {v}",
                        param.range
                    ))
                    .param(name));
                }
                if param.name != p::SEED.name {
                    param.check(x).map_err(|e| {
                        // the field's full name (`options.temperature`) in the message too
                        let e = e.replacen(param.name, &name, 1);
                        ApiError::bad_request(e).param(name.clone())
                    })?;
                }
                if param.integer && v.is_f64() {
                    *v = if x < 0.0 {
                        Value::from(x as i64)
                    } else {
                        Value::from(x as u64)
                    };
                }
            }
            Ty::Stop => match v {
                Value::String(_) => {}
                Value::Array(a) if a.iter().all(Value::is_string) => {
                    if a.len() > 16 {
                        return Err(ApiError::bad_request(format!(
                            "{name} takes at most 16 strings, got {}",
                            a.len()
                        ))
                        .param(name));
                    }
                }
                Value::Array(_) => {
                    return Err(ApiError::bad_request(format!(
                        "invalid type for {name}: expected a string or an array of strings, \
                         got an array holding something else"
                    ))
                    .code("invalid_type")
                    .param(name))
                }
                _ => return wrong("a string or an array of strings", v),
            },
            Ty::Tokens => match v {
                Value::Array(a)
                    if a.iter()
                        .all(|t| t.as_u64().is_some_and(|t| t <= u32::MAX as u64)) => {}
                _ => return wrong("an array of token ids", v),
            },
            Ty::Array if !v.is_array() => return wrong("an array", v),
            Ty::Object(fields) => match v {
                Value::Object(inner) => check_object(inner, fields, &format!("{name}."))?,
                _ => return wrong("an object", v),
            },
            Ty::Duration => {
                KeepAlive::from_json(v).map_err(|e| {
                    // the message names the field (Ollama's shape has no `param`)
                    let e = if e.starts_with(name.as_str()) {
                        e
                    } else {
                        format!("{name}: {e}")
                    };
                    ApiError::bad_request(e).param(name.clone())
                })?;
            }
            _ => {}
        }
        if !matches!(f.ty, Ty::Any) {
            drop_nulls(v);
        }
    }
    Ok(())
}

/// Reads a request body: JSON syntax, then every field the route's tables list, then the
/// typed request.
///
/// # Errors
/// 400 in the route's error shape: `invalid_json` for bad syntax, `invalid_request_error`
/// with `param` for a missing, mistyped or out-of-range field.
pub(crate) fn parse<T: DeserializeOwned>(
    body: &[u8],
    tables: &[&[Field]],
    flavor: Flavor,
) -> Result<T, ApiError> {
    let mut v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("invalid JSON body: {e}"))
            .code("invalid_json")
            .flavor(flavor)
    })?;
    let Value::Object(m) = &mut v else {
        return Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, got {}",
            kind(&v)
        ))
        .flavor(flavor));
    };
    check_object(m, tables, "").map_err(|e| e.flavor(flavor))?;
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad_request(format!("invalid value for {path}: {}", e.inner()))
            .param(path)
            .flavor(flavor)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route's table, for the table-driven tests.
    const ROUTES: &[(&str, &[&[Field]])] = &[
        ("/v1/chat/completions", CHAT_COMPLETIONS),
        ("/v1/completions", COMPLETIONS),
        ("/api/generate", GENERATE),
        ("/api/chat", CHAT),
        ("/tokenize", TOKENIZE),
        ("/detokenize", DETOKENIZE),
    ];

    /// A request with every required field, valid.
    fn base(tables: &[&[Field]]) -> Map<String, Value> {
        let mut m = Map::new();
        for f in tables.iter().flat_map(|t| t.iter()).filter(|f| f.required) {
            let v = match f.ty {
                Ty::Str => Value::from("m"),
                Ty::Array => serde_json::json!([{"role": "user", "content": "hi"}]),
                Ty::Tokens => serde_json::json!([1]),
                _ => Value::from("hello"),
            };
            m.insert(f.name.into(), v);
        }
        m
    }

    fn good(ty: Ty) -> Value {
        use serde_json::json;
        match ty {
            Ty::Bool => json!(true),
            Ty::Str => json!("x"),
            Ty::Num(p) => {
                let v = match p.min {
                    capy_engine::params::Bound::Incl(m) if m > -1e9 => m,
                    _ => 1.0,
                };
                if p.integer {
                    json!(v as i64)
                } else {
                    json!(v)
                }
            }
            Ty::Stop => json!(["a", "b"]),
            Ty::Tokens => json!([1, 2]),
            Ty::Array => json!([]),
            Ty::Object(_) => json!({}),
            Ty::Duration => json!("5m"),
            Ty::Any => json!({"a": 1}),
        }
    }

    fn wrong(ty: Ty) -> Option<Value> {
        use serde_json::json;
        match ty {
            Ty::Bool | Ty::Num(_) | Ty::Object(_) | Ty::Tokens => Some(json!("text")),
            Ty::Str | Ty::Stop | Ty::Array => Some(json!(12)),
            Ty::Duration => Some(json!([1])),
            Ty::Any => None,
        }
    }

    /// Values just outside a parameter's range, and infinite or NaN-like strings' kin.
    fn outside(p: &Param) -> Vec<Value> {
        use capy_engine::params::Bound;
        let mut v = Vec::new();
        match p.min {
            Bound::Incl(m) if m > -1e18 => v.push(m - 1.0),
            Bound::Excl(m) => v.push(m),
            _ => {}
        }
        match p.max {
            Bound::Incl(m) if m < 1e18 => v.push(m + 1.0),
            Bound::Excl(m) => v.push(m),
            _ => {}
        }
        v.push(1e300);
        let mut out: Vec<Value> = v.into_iter().map(Value::from).collect();
        if p.integer {
            out.push(Value::from(1.5));
        }
        out
    }

    fn run(tables: &[&[Field]], field: &str, v: Value) -> Result<Value, ApiError> {
        let mut m = base(tables);
        m.insert(field.into(), v);
        let body = serde_json::to_vec(&Value::Object(m)).unwrap();
        parse::<Value>(&body, tables, Flavor::OpenAi)
    }

    /// For every field of every route: null means absent, a valid value passes, a wrong
    /// type and an out-of-range value are 400s naming the field.
    #[test]
    fn every_field_of_every_route_null_wrong_type_range() {
        for (route, tables) in ROUTES {
            for f in tables.iter().flat_map(|t| t.iter()) {
                let ctx = format!("{route} {}", f.name);
                match run(tables, f.name, Value::Null) {
                    Ok(v) if !f.required => assert!(v.get(f.name).is_none(), "{ctx}: null kept"),
                    Ok(_) => panic!("{ctx}: a required field accepted null"),
                    Err(e) => {
                        assert!(f.required, "{ctx}: null refused: {}", e.message);
                        assert_eq!(e.param.as_deref(), Some(f.name), "{ctx}");
                    }
                }
                let ok = run(tables, f.name, good(f.ty));
                assert!(ok.is_ok(), "{ctx}: a valid value refused: {:?}", ok.err());
                if let Some(w) = wrong(f.ty) {
                    let e = run(tables, f.name, w).expect_err(&ctx);
                    assert_eq!(e.status, 400, "{ctx}");
                    assert_eq!(e.param.as_deref(), Some(f.name), "{ctx}: {}", e.message);
                    assert!(e.message.contains(f.name), "{ctx}: {}", e.message);
                    assert_ne!(e.code, Some("invalid_json"), "{ctx}");
                }
                if let Ty::Num(p) = f.ty {
                    for x in outside(p) {
                        let e = run(tables, f.name, x.clone()).expect_err(&format!("{ctx} = {x}"));
                        assert_eq!(e.param.as_deref(), Some(f.name), "{ctx} = {x}");
                        assert!(e.message.contains(p.range), "{ctx}: {}", e.message);
                    }
                }
                if let Ty::Object(inner) = f.ty {
                    for g in inner.iter().flat_map(|t| t.iter()) {
                        let nested = format!("{}.{}", f.name, g.name);
                        let r = run(tables, f.name, serde_json::json!({ g.name: null }));
                        assert!(r.is_ok(), "{route} {nested}: null refused");
                        if let Some(w) = wrong(g.ty) {
                            let e = run(tables, f.name, serde_json::json!({ g.name: w }))
                                .expect_err(&nested);
                            assert_eq!(e.param.as_deref(), Some(nested.as_str()), "{route}");
                        }
                        if let Ty::Num(p) = g.ty {
                            for x in outside(p) {
                                let e = run(tables, f.name, serde_json::json!({ g.name: x }))
                                    .expect_err(&nested);
                                assert_eq!(e.param.as_deref(), Some(nested.as_str()), "{route}");
                            }
                            let ok = run(tables, f.name, serde_json::json!({ g.name: good(g.ty) }));
                            assert!(ok.is_ok(), "{route} {nested}: {:?}", ok.err());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn integral_floats_become_integers_and_seeds_keep_64_bits() {
        let v = run(CHAT_COMPLETIONS, "max_tokens", Value::from(5.0)).unwrap();
        assert_eq!(v["max_tokens"], Value::from(5u64));
        let v = run(CHAT_COMPLETIONS, "seed", Value::from(u64::MAX)).unwrap();
        assert_eq!(v["seed"].as_u64(), Some(u64::MAX));
        let v = run(CHAT_COMPLETIONS, "seed", Value::from(-1)).unwrap();
        assert_eq!(v["seed"].as_i64(), Some(-1));
    }

    #[test]
    fn bad_syntax_is_invalid_json_and_non_objects_are_refused() {
        let e = parse::<Value>(b"{\"model\": ", CHAT_COMPLETIONS, Flavor::OpenAi).unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
        let e = parse::<Value>(b"[1]", CHAT_COMPLETIONS, Flavor::Ollama).unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        assert_eq!(e.body(), serde_json::json!({"error": e.message}));
    }

    #[test]
    fn nulls_inside_messages_are_dropped() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":null,"images":null}]}"#;
        let v: Value = parse(body, CHAT, Flavor::Ollama).unwrap();
        assert_eq!(v["messages"][0], serde_json::json!({"role": "user"}));
    }
}
