//! Structured outputs in requests: which field asks for which grammar, and compiling it for
//! the model's vocabulary (a 400 naming the field when it cannot be compiled).
//!
//! - OpenAI chat: `response_format` `{"type": "json_object"}` (any JSON object; llama-server's
//!   `"schema"` member beside it is honoured) or `{"type": "json_schema", "json_schema":
//!   {"name", "schema", "strict"}}`.
//! - llama-server, on `/v1/completions` and `/v1/chat/completions`: `grammar` (GBNF) and
//!   `json_schema` (a schema object).
//! - Ollama: `format`, `"json"` or a schema object.

use std::sync::Arc;

use capy_engine::grammar::{Grammar, GrammarSpec};
use capy_engine::Tokenizer;
use serde_json::Value;

use crate::error::ApiError;
use crate::gen::blocking;

/// A grammar a request asks for, and the field that asked (for error messages).
#[derive(Clone, Debug)]
pub(crate) struct Asked {
    pub spec: GrammarSpec,
    pub param: &'static str,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).param(param)
}

/// The JSON schema a `schema` member holds (an object, or `true` for any JSON).
fn schema_of(v: &Value, param: &str) -> Result<GrammarSpec, ApiError> {
    match v {
        Value::Object(_) | Value::Bool(true) => Ok(GrammarSpec::JsonSchema(v.clone())),
        _ => Err(bad(param, format!("{param} must be a JSON schema object"))),
    }
}

/// What OpenAI's `response_format` asks for (`None` for `text`).
pub(crate) fn response_format(rf: &Value) -> Result<Option<Asked>, ApiError> {
    const P: &str = "response_format";
    let Value::Object(m) = rf else {
        return Err(bad(P, "response_format must be an object with a type"));
    };
    let ty = m.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad(
            "response_format.type",
            "response_format.type must be text, json_object or json_schema",
        )
    })?;
    let spec = match ty {
        "text" => return Ok(None),
        "json_object" => match m.get("schema") {
            Some(s) => schema_of(s, "response_format.schema")?,
            None => GrammarSpec::json_object(),
        },
        "json_schema" => {
            let js = m.get("json_schema").ok_or_else(|| {
                bad(
                    "response_format.json_schema",
                    "response_format of type json_schema needs a json_schema object \
                     ({\"name\": ..., \"schema\": {...}})",
                )
            })?;
            let Value::Object(js) = js else {
                return Err(bad(
                    "response_format.json_schema",
                    "response_format.json_schema must be an object",
                ));
            };
            if let Some(n) = js.get("name") {
                let ok = n.as_str().is_some_and(|n| {
                    !n.is_empty()
                        && n.len() <= 64
                        && n.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                });
                if !ok {
                    return Err(bad(
                        "response_format.json_schema.name",
                        "response_format.json_schema.name must be 1 to 64 letters, digits, \
                         underscores or dashes",
                    ));
                }
            }
            match js.get("schema") {
                Some(s) => schema_of(s, "response_format.json_schema.schema")?,
                None => GrammarSpec::json_object(),
            }
        }
        other => {
            return Err(bad(
                "response_format.type",
                format!(
                    "response_format.type must be text, json_object or json_schema, got {other:?}"
                ),
            ))
        }
    };
    Ok(Some(Asked { spec, param: P }))
}

/// llama-server's `grammar` (GBNF) and `json_schema` fields.
pub(crate) fn llama_fields(
    grammar: Option<&str>,
    json_schema: Option<&Value>,
) -> Result<Option<Asked>, ApiError> {
    match (grammar, json_schema) {
        (Some(_), Some(_)) => Err(bad(
            "grammar",
            "grammar and json_schema cannot be used together",
        )),
        (Some(g), None) if g.trim().is_empty() => Ok(None),
        (Some(g), None) => Ok(Some(Asked {
            spec: GrammarSpec::Gbnf(g.to_string()),
            param: "grammar",
        })),
        (None, Some(s)) => Ok(Some(Asked {
            spec: schema_of(s, "json_schema")?,
            param: "json_schema",
        })),
        (None, None) => Ok(None),
    }
}

/// At most one way of asking for structure per request.
pub(crate) fn one_of(asked: [Option<Asked>; 2]) -> Result<Option<Asked>, ApiError> {
    match asked {
        [Some(a), Some(b)] => Err(bad(
            b.param,
            format!("{} and {} cannot be used together", a.param, b.param),
        )),
        [a, b] => Ok(a.or(b)),
    }
}

/// What Ollama's `format` asks for: `"json"`, a schema object, or `""` (none).
pub(crate) fn ollama_format(format: Option<&Value>) -> Result<Option<Asked>, ApiError> {
    const P: &str = "format";
    let spec = match format {
        None => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => return Ok(None),
        Some(Value::String(s)) if s == "json" => GrammarSpec::json_object(),
        Some(Value::String(s)) => {
            return Err(bad(
                P,
                format!("format must be \"json\" or a JSON schema object, got {s:?}"),
            ))
        }
        Some(v) => schema_of(v, P)?,
    };
    Ok(Some(Asked { spec, param: P }))
}

/// Compiles a grammar for the model's vocabulary on a blocking thread (the first use builds
/// the vocabulary's token trie).
///
/// # Errors
/// A 400 naming the field, with llguidance's reason (the unsupported keyword, the grammar
/// line), when the grammar cannot be compiled.
pub(crate) async fn compile(tok: &Arc<Tokenizer>, asked: Asked) -> Result<Grammar, ApiError> {
    let tok = Arc::clone(tok);
    blocking(move || {
        let grammars = tok.grammars().map_err(|e| {
            bad(
                asked.param,
                format!("this model cannot take a grammar: {e}"),
            )
        })?;
        grammars.compile(&asked.spec).map_err(|e| {
            let what = match asked.spec {
                GrammarSpec::JsonSchema(_) => "JSON schema",
                _ => "grammar",
            };
            bad(
                asked.param,
                format!("{}: the {what} cannot be used: {e}", asked.param),
            )
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn response_formats_map_to_specs() {
        assert!(response_format(&json!({"type": "text"})).unwrap().is_none());
        let a = response_format(&json!({"type": "json_object"}))
            .unwrap()
            .unwrap();
        assert_eq!(a.spec, GrammarSpec::json_object());
        let s = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let a = response_format(
            &json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": true}}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.spec, GrammarSpec::JsonSchema(s));
        for (bad_rf, param) in [
            (json!("json"), "response_format"),
            (json!({"type": "xml"}), "response_format.type"),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a b"}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": 3}}),
                "response_format.json_schema.schema",
            ),
        ] {
            let e = response_format(&bad_rf).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{bad_rf}");
        }
    }

    #[test]
    fn ollama_and_llama_fields() {
        assert!(ollama_format(Some(&json!(""))).unwrap().is_none());
        assert_eq!(
            ollama_format(Some(&json!("json"))).unwrap().unwrap().spec,
            GrammarSpec::json_object()
        );
        assert!(ollama_format(Some(&json!("yaml"))).is_err());
        assert!(ollama_format(Some(&json!([1]))).is_err());
        let g = llama_fields(Some("root ::= \"a\""), None).unwrap().unwrap();
        assert_eq!(g.param, "grammar");
        assert!(llama_fields(Some("root ::= \"a\""), Some(&json!({}))).is_err());
        let both = one_of([
            llama_fields(None, Some(&json!({}))).unwrap(),
            response_format(&json!({"type": "json_object"})).unwrap(),
        ]);
        assert!(both.is_err());
    }
}
