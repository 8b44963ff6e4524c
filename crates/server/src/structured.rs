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
use capy_engine::tools::{call_grammar, parse_calls, Tool, ToolCall, ToolChoice, ToolFormat};
use capy_engine::Tokenizer;
use serde_json::{json, Value};

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
            let Some(n) = js.get("name") else {
                return Err(bad(
                    "response_format.json_schema.name",
                    "response_format.json_schema needs a name (1 to 64 letters, digits, \
                     underscores or dashes)",
                ));
            };
            {
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

/// What a request's `tools` ask for.
#[derive(Clone, Debug)]
pub(crate) struct ToolsAsked {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

/// A function name as OpenAI takes it: 1 to 64 letters, digits, underscores or dashes.
fn good_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The tools of a request (OpenAI's and Ollama's shape: `{"type": "function", "function":
/// {"name", "description", "parameters"}}`), `tool_choice` and `parallel_tool_calls`.
/// `None` without tools.
///
/// # Errors
/// A 400 naming the field: a tool that is not a function, has no name or a bad one, or
/// parameters that are not a schema object; two tools of one name; a `tool_choice` that is
/// not `none`, `auto`, `required` or a named function of `tools`, or given without tools.
pub(crate) fn tools(
    tools: Option<&[Value]>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolsAsked>, ApiError> {
    let list = tools.unwrap_or_default();
    let mut out: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        let Value::Object(m) = t else {
            return Err(bad(&at(""), format!("{} must be an object", at(""))));
        };
        if let Some(ty) = m.get("type") {
            if ty != "function" {
                return Err(bad(
                    &at(".type"),
                    format!("{} must be \"function\", got {ty}", at(".type")),
                ));
            }
        }
        let Some(Value::Object(f)) = m.get("function") else {
            return Err(bad(
                &at(".function"),
                format!(
                    "{} must be an object with the function's name, description and parameters",
                    at(".function")
                ),
            ));
        };
        let name = match f.get("name") {
            Some(Value::String(n)) if good_name(n) => n.clone(),
            Some(Value::String(n)) => {
                return Err(bad(
                    &at(".function.name"),
                    format!(
                        "{} must be 1 to 64 letters, digits, underscores or dashes, got {n:?}",
                        at(".function.name")
                    ),
                ))
            }
            _ => {
                return Err(bad(
                    &at(".function.name"),
                    format!("a tool needs a name: {} is missing", at(".function.name")),
                ))
            }
        };
        if out.iter().any(|t| t.name == name) {
            return Err(bad(
                &at(".function.name"),
                format!("two tools are named {name:?}"),
            ));
        }
        let parameters = match f.get("parameters") {
            None => json!({"type": "object", "properties": {}}),
            // arguments are an object (OpenAI requires it; calls read them as one)
            Some(p @ Value::Object(m))
                if m.get("type").is_none_or(|t| t == "object")
                    && !m.contains_key("enum")
                    && !m.contains_key("const") =>
            {
                p.clone()
            }
            Some(Value::Object(_)) => {
                return Err(bad(
                    &at(".function.parameters"),
                    format!(
                        "{} must be the schema of an object (\"type\": \"object\"): a call's \
                         arguments are an object",
                        at(".function.parameters")
                    ),
                ))
            }
            Some(_) => {
                return Err(bad(
                    &at(".function.parameters"),
                    format!(
                        "{} must be a JSON schema object",
                        at(".function.parameters")
                    ),
                ))
            }
        };
        let description = match f.get("description") {
            None => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(_) => {
                return Err(bad(
                    &at(".function.description"),
                    format!("{} must be a string", at(".function.description")),
                ))
            }
        };
        out.push(Tool {
            name,
            description,
            parameters,
        });
    }
    const C: &str = "tool_choice";
    let choice = match choice {
        None if out.is_empty() => return Ok(None),
        None => ToolChoice::Auto,
        Some(_) if out.is_empty() => {
            return Err(bad(C, "tool_choice is only allowed when tools are given"))
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    C,
                    format!(
                        "tool_choice must be none, auto, required or {{\"type\": \"function\", \
                         \"function\": {{\"name\": ...}}}}, got {other:?}"
                    ),
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    bad(
                        C,
                        "tool_choice must be none, auto, required or {\"type\": \"function\", \
                         \"function\": {\"name\": ...}}",
                    )
                })?;
            if !out.iter().any(|t| t.name == name) {
                return Err(bad(
                    C,
                    format!("tool_choice names function {name:?}, which is not in tools"),
                ));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    Ok(Some(ToolsAsked {
        tools: out,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

/// The grammar for a request's tool calls on this model (lazy for `auto`), if any.
///
/// # Errors
/// A 400 (`param` `tools`) when a function's parameters cannot be compiled.
pub(crate) async fn tool_grammar(
    tok: &Arc<Tokenizer>,
    format: ToolFormat,
    asked: &ToolsAsked,
) -> Result<Option<Grammar>, ApiError> {
    let (tok, asked) = (Arc::clone(tok), asked.clone());
    blocking(move || {
        let Some((spec, trigger)) =
            call_grammar(format, &asked.tools, &asked.choice, asked.parallel, &tok)
                .map_err(|e| bad("tools", e))?
        else {
            return Ok(None);
        };
        let grammars = tok
            .grammars()
            .map_err(|e| bad("tools", format!("this model cannot take a grammar: {e}")))?;
        let g = match &trigger {
            Some(t) => grammars.compile_lazy(&spec, t),
            None => grammars.compile(&spec),
        };
        g.map(Some).map_err(|e| {
            bad(
                "tools",
                format!("tools: a function's parameters cannot be used: {e}"),
            )
        })
    })
    .await
}

/// The calls in an answer (`tokens` as generated; `text` as shown) and the text before
/// them; no calls: `text` as it is.
pub(crate) fn read_calls(
    tok: &Tokenizer,
    format: ToolFormat,
    asked: &ToolsAsked,
    tokens: &[u32],
    text: &str,
) -> (String, Vec<ToolCall>) {
    if asked.choice == ToolChoice::None {
        return (text.to_string(), Vec::new());
    }
    // rendered with the special tokens' text, which some formats' markers are
    let ids: Vec<u32> = tokens.iter().copied().filter(|&t| !tok.is_eog(t)).collect();
    let raw = tok.decode(&ids, true);
    let (before, calls) = parse_calls(format, &raw, &asked.tools);
    if !calls.is_empty() {
        return (before, calls);
    }
    // a call the token limit cut short: its markup is not the answer's text
    match capy_engine::tools::call_start(format, text) {
        Some(at)
            if asked.choice != ToolChoice::Auto
                || text[at..].starts_with(format.marker())
                || format.marker().starts_with(&text[at..]) =>
        {
            (text[..at].trim_end().to_string(), calls)
        }
        _ => (text.to_string(), calls),
    }
}

/// A streamed choice's text while it may hold tool calls: plain text goes out as it comes,
/// until it is or may become a call ([`capy_engine::tools::call_start`]); from there it is
/// held until the answer ends and its calls are read.
#[derive(Default)]
pub(crate) struct CallStream {
    text: String,
    sent: usize,
    ids: Vec<u32>,
    /// a call started (or the choice must call): nothing more goes out as text
    frozen: bool,
}

impl CallStream {
    /// Takes a token and its text; returns the text to send now.
    pub(crate) fn push(
        &mut self,
        tok: &Tokenizer,
        format: ToolFormat,
        choice: &ToolChoice,
        id: u32,
        text: &str,
    ) -> String {
        self.ids.push(id);
        self.text.push_str(text);
        if *choice != ToolChoice::Auto {
            self.frozen = true;
        }
        // a special token that is the format's marker (Mistral's [TOOL_CALLS])
        if text.is_empty() && !tok.is_eog(id) && !tok.token_bytes(id, true).is_empty() {
            let special = String::from_utf8_lossy(tok.token_bytes(id, true)).into_owned();
            if capy_engine::tools::call_start(format, &special).is_some() {
                self.frozen = true;
            }
        }
        if self.frozen {
            return String::new();
        }
        // (whitespace before a call is not the answer's: it waits for what follows)
        // (once text went out the answer did not open with JSON: only the unsent tail, from
        // where a marker could have begun, is searched, not the whole text at every token)
        let from = if self.sent == 0 {
            0
        } else {
            let mut f = self.sent.saturating_sub(format.marker().len());
            while !self.text.is_char_boundary(f) {
                f -= 1;
            }
            f
        };
        let end = match capy_engine::tools::call_start(format, &self.text[from..]) {
            Some(at)
                if from == 0 || {
                    let rest = &self.text[from + at..];
                    rest.starts_with(format.marker()) || format.marker().starts_with(rest)
                } =>
            {
                from + at
            }
            _ => self.text.len(),
        };
        let end = self.text[..end].trim_end().len();
        if end <= self.sent {
            return String::new();
        }
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }

    /// The end of the answer (`tail`: text the engine held back): the text not sent yet,
    /// and the calls.
    pub(crate) fn finish(
        &mut self,
        tok: &Tokenizer,
        format: ToolFormat,
        asked: &ToolsAsked,
        tail: &str,
    ) -> (String, Vec<ToolCall>) {
        self.text.push_str(tail);
        let (text, calls) = read_calls(tok, format, asked, &self.ids, &self.text);
        let rest = text.get(self.sent..).unwrap_or_default().to_string();
        (rest, calls)
    }
}

/// A chat prompt that ends inside a thinking block the template opened (`<think>`, as
/// reasoning models' templates do): the grammar starts after the model closes it
/// (`</think>`), so the reasoning stays free.
pub(crate) fn after_thinking(tok: &Tokenizer, prompt: &[u32], grammar: &mut Option<Grammar>) {
    let Some(g) = grammar.as_mut() else { return };
    let tail = &prompt[prompt.len().saturating_sub(8)..];
    let text = tok.decode(tail, true);
    if text.trim_end().ends_with("<think>") && g.is_active() {
        g.start_after("</think>");
    }
}

/// A 400 from a grammar that failed during generation names the field it came from.
pub(crate) fn blame(e: ApiError, param: Option<&str>) -> ApiError {
    match param {
        Some(p) if e.status == axum::http::StatusCode::BAD_REQUEST && e.param.is_none() => {
            e.param(p)
        }
        _ => e,
    }
}

/// A history call's arguments as templates print them (an object): a JSON string parsed,
/// text that is not JSON kept as a string, none as `{}`.
pub(crate) fn arguments_object(a: &Value) -> Value {
    match a {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| json!(s)),
        Value::Null => json!({}),
        other => other.clone(),
    }
}

/// A call id as OpenAI's look (`call_` and 24 hex digits).
pub(crate) fn call_id() -> String {
    crate::gen::new_id("call").replace("call-", "call_")
}

#[cfg(test)]
mod tests {
    use super::*;

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
                json!({"type": "json_schema", "json_schema": {"schema": {}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}),
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
