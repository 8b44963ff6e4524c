//! Tool calling: tools in the prompt, grammars for the model's calls, and the calls read
//! back from its output.
//!
//! - **Prompt**: a template that reads `tools` (Hugging Face's tool-calling templates: Qwen,
//!   Hermes, Llama 3.1+, Mistral) gets them and the history as is (assistant `tool_calls`,
//!   `tool` messages). Other templates get the fallback: a system message that lists the
//!   tools and asks for Hermes-style calls, assistant calls written into their content as
//!   those blocks, and tool results as user turns wrapped in `<tool_response>`.
//! - **Format** ([`ToolFormat`]), recognised from the template: Hermes/Qwen
//!   `<tool_call>{"name", "arguments"}</tool_call>` (also the fallback's), Llama 3
//!   `{"name", "parameters"}`, Mistral `[TOOL_CALLS][{"name", "arguments"}, ...]`.
//! - **Grammar** ([`call_grammar`]): `required` and a named function constrain the output
//!   from its first token to calls whose arguments fit the function's JSON schema; `auto`
//!   leaves the model free until a call starts (its trigger), then constrains the call (a
//!   lazy grammar, as llama.cpp does).
//! - **Parsing** ([`parse_calls`]): the calls in an output, by the format, with a plain
//!   JSON fallback (`{"name": ..., "arguments": ...}` or a list of them).

use serde_json::{json, Value};

use crate::chat::{ChatTemplate, Message};
use crate::grammar::{closed_schema, prepare_schema, GrammarSpec};
use crate::tokenizer::Tokenizer;

/// A function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The arguments' JSON schema (`{"type": "object"}` when none was given).
    pub parameters: Value,
}

impl Tool {
    /// Hugging Face's form, which templates and the fallback prompt print.
    pub fn to_json(&self) -> Value {
        let mut f = json!({"name": self.name, "parameters": self.parameters});
        if let Some(d) = &self.description {
            f["description"] = json!(d);
        }
        json!({"type": "function", "function": f})
    }
}

/// A call the model made.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object.
    pub arguments: Value,
}

/// What the request allows (OpenAI's `tool_choice`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls (the tools stay in the prompt).
    None,
    /// Text or calls, as the model chooses.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Named(String),
}

/// How a model family writes its calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (Hermes, Qwen 2.5/3,
    /// and capy's fallback prompt).
    Hermes,
    /// `{"name": ..., "parameters": {...}}` (Llama 3.1+ with JSON tool calls).
    Llama3,
    /// `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` (Mistral).
    Mistral,
}

impl ToolFormat {
    /// The format a template's model writes; Hermes for templates without tool support
    /// (the fallback prompt asks for it).
    pub fn of(template: &ChatTemplate) -> ToolFormat {
        let src = &template.source;
        if !template.takes_tools() {
            ToolFormat::Hermes
        } else if src.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if src.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if src.contains("<|python_tag|>") || src.contains("\"parameters\"") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        }
    }

    /// The text that opens a call.
    pub fn marker(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Mistral => "[TOOL_CALLS]",
            ToolFormat::Llama3 => "<|python_tag|>",
        }
    }

    /// The key of a call's arguments.
    fn args_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3 => "parameters",
            _ => "arguments",
        }
    }
}

/// Calls after the first when parallel calls are allowed (a small model may otherwise
/// repeat calls until the token limit).
pub const MAX_PARALLEL_CALLS: usize = 4;

/// The fallback's instructions, before the tools' JSON.
const FALLBACK_INTRO: &str = "You can call these functions (tools); each is given as JSON with \
the schema of its arguments:";
const FALLBACK_HOW: &str = "When a function can answer the user's request, reply with a call \
and nothing else: a <tool_call></tool_call> block holding a JSON object with the function's \
\"name\" and its \"arguments\", one block per call, for example:\n\
<tool_call>\n{\"name\": \"function_name\", \"arguments\": {\"argument\": \"value\"}}\n</tool_call>\n\
Function results come back in <tool_response></tool_response> blocks; then answer the user \
normally, without calling a function again.";

/// The conversation and `tools` as the template gets them: unchanged for templates that
/// take tools; otherwise the fallback (the module's notes). `tools` empty: the messages as
/// they are, tool calls and results still written as the fallback writes them when the
/// template cannot show them.
pub fn prompt_messages(
    template: &ChatTemplate,
    messages: &[Message],
    tools: &[Tool],
) -> (Vec<Message>, Option<Value>) {
    let listed =
        (!tools.is_empty()).then(|| Value::Array(tools.iter().map(Tool::to_json).collect()));
    if template.takes_tools() {
        return (messages.to_vec(), listed);
    }
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    if let Some(list) = &listed {
        let mut text = String::from(FALLBACK_INTRO);
        for t in list.as_array().into_iter().flatten() {
            text.push('\n');
            text.push_str(&t["function"].to_string());
        }
        text.push_str("\n\n");
        text.push_str(FALLBACK_HOW);
        match messages.first() {
            Some(m) if m.role == "system" => {
                let mut m = m.clone();
                m.content = format!("{}\n\n{text}", m.content);
                out.push(m);
            }
            _ => out.push(Message::new("system", &text)),
        }
    }
    let skip =
        usize::from(listed.is_some() && messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        match m.role.as_str() {
            "assistant" if m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) => {
                let mut text = m.content.clone();
                for c in m.tool_calls.iter().flatten() {
                    let f = &c["function"];
                    let call = json!({"name": f["name"], "arguments": f["arguments"]});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
                }
                out.push(Message::new("assistant", &text));
            }
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                // consecutive results share one user turn (templates that want turns to
                // alternate)
                match out.last_mut() {
                    Some(prev)
                        if prev.role == "user" && prev.content.ends_with("</tool_response>") =>
                    {
                        prev.content.push('\n');
                        prev.content.push_str(&block);
                    }
                    _ => out.push(Message::new("user", &block)),
                }
            }
            _ => out.push(Message {
                tool_calls: None,
                tool_call_id: None,
                name: None,
                ..m.clone()
            }),
        }
    }
    (out, None)
}

/// The JSON schema of one call of one of `tools` (`name` fixed, arguments by the tool's
/// schema), in the format's shape, and the definitions its references need. Each tool's
/// parameters go into the definitions as `<name>.root`, with their own `$defs` beside them
/// as `<name>.<def>` and every `$ref` rewritten to match, so references inside a tool's
/// schema (`#/$defs/...`, `#`, `#/properties/...`) still find their targets once the schema
/// sits inside the call's.
fn call_schema(format: ToolFormat, tools: &[&Tool]) -> Result<(Value, Value), String> {
    let key = format.args_key();
    let mut one = Vec::with_capacity(tools.len());
    let mut defs = serde_json::Map::new();
    for t in tools {
        let mut params = closed_schema(&t.parameters)
            .map_err(|e| format!("the parameters of function {:?}: {e}", t.name))?;
        let prefix = format!("{}.", t.name);
        for k in ["$defs", "definitions"] {
            if let Some(Value::Object(d)) = params.as_object_mut().and_then(|m| m.remove(k)) {
                for (name, mut def) in d {
                    rebase_refs(&mut def, &prefix);
                    defs.insert(format!("{prefix}{name}"), def);
                }
            }
        }
        rebase_refs(&mut params, &prefix);
        defs.insert(format!("{prefix}root"), params);
        one.push(json!({
            "type": "object",
            "properties": {"name": {"const": t.name},
                           key: {"$ref": format!("#/$defs/{prefix}root")}},
            "required": ["name", key],
            "additionalProperties": false,
        }));
    }
    let call = if one.len() == 1 {
        one.remove(0)
    } else {
        json!({"anyOf": one})
    };
    Ok((call, Value::Object(defs)))
}

/// Rewrites a tool schema's local references for its place among the call's definitions
/// (see [`call_schema`]); other references are left for llguidance to refuse.
fn rebase_refs(v: &mut Value, prefix: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => {
                        let rest = r.strip_prefix('#').map(str::to_string);
                        if let Some(rest) = rest {
                            *r = if let Some(d) = rest
                                .strip_prefix("/$defs/")
                                .or_else(|| rest.strip_prefix("/definitions/"))
                            {
                                format!("#/$defs/{prefix}{d}")
                            } else {
                                format!("#/$defs/{prefix}root{rest}")
                            };
                        }
                    }
                    // an enum's or a const's values are data, not schemas
                    ("enum" | "const" | "default" | "examples", _) => {}
                    (_, x) => rebase_refs(x, prefix),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rebase_refs(x, prefix)),
        _ => {}
    }
}

/// What the output must look like for `choice`, and the text after which it starts
/// (`None`: from the first token). `None` overall for `ToolChoice::None` and for `Auto`
/// where the format has no trigger to wait for (Llama 3's calls are bare JSON: the output
/// is read afterwards).
///
/// # Errors
/// An unknown function in `Named`; a function whose parameters are not a schema.
pub fn call_grammar(
    format: ToolFormat,
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
    tok: &Tokenizer,
) -> Result<Option<(GrammarSpec, Option<String>)>, String> {
    let chosen: Vec<&Tool> = match choice {
        ToolChoice::None => return Ok(None),
        ToolChoice::Named(n) => {
            let t = tools.iter().find(|t| &t.name == n).ok_or_else(|| {
                format!("tool_choice names function {n:?}, which is not in tools")
            })?;
            vec![t]
        }
        _ => tools.iter().collect(),
    };
    let lazy = *choice == ToolChoice::Auto;
    let (call, defs) = call_schema(format, &chosen)?;
    // (the definitions and the whitespace options go at the top of each %json, where
    // llguidance reads them)
    let with_defs = |mut v: Value| {
        v["$defs"] = defs.clone();
        v
    };
    let schema = prepare_schema(&with_defs(call.clone()))?.to_string();
    let more = if parallel && !matches!(choice, ToolChoice::Named(_)) {
        MAX_PARALLEL_CALLS - 1
    } else {
        0
    };
    let lark = match format {
        ToolFormat::Hermes => {
            let call = format!("\"\\n\"? %json {schema} \"\\n\"? \"</tool_call>\"");
            let next = if more > 0 {
                format!("(\"\\n\" \"<tool_call>\" {call}){{0,{more}}}")
            } else {
                String::new()
            };
            if lazy {
                format!("start: {call} {next}\n")
            } else {
                format!("start: \"<tool_call>\" {call} {next}\n")
            }
        }
        ToolFormat::Mistral => {
            let list = prepare_schema(&with_defs(
                json!({"type": "array", "items": call, "minItems": 1, "maxItems": more + 1}),
            ))?;
            if lazy {
                format!("start: %json {list}\n")
            } else {
                let marker = match tok.token_id("[TOOL_CALLS]") {
                    Some(id) => format!("<[{id}]>"),
                    None => "\"[TOOL_CALLS]\"".to_string(),
                };
                format!("start: {marker} %json {list}\n")
            }
        }
        ToolFormat::Llama3 => {
            if lazy {
                return Ok(None);
            }
            format!("start: %json {schema}\n")
        }
    };
    let trigger = lazy.then(|| match format {
        ToolFormat::Mistral => "[TOOL_CALLS]".to_string(),
        _ => "<tool_call>".to_string(),
    });
    Ok(Some((GrammarSpec::Lark(lark), trigger)))
}

/// A call object (`{"name", "arguments"|"parameters"}`; arguments may be a JSON string)
/// naming one of `tools`.
fn call_of(v: &Value, tools: &[Tool]) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?;
    if !tools.iter().any(|t| t.name == name) {
        return None;
    }
    let args = v.get("arguments").or_else(|| v.get("parameters"));
    let arguments = match args {
        None => json!({}),
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => return None,
    };
    Some(ToolCall {
        name: name.to_string(),
        arguments,
    })
}

/// Calls in a JSON value: one call object or a list of them.
fn calls_in(v: &Value, tools: &[Tool]) -> Option<Vec<ToolCall>> {
    match v {
        Value::Array(a) if !a.is_empty() => a.iter().map(|c| call_of(c, tools)).collect(),
        Value::Object(_) => call_of(v, tools).map(|c| vec![c]),
        _ => None,
    }
}

/// Where the calls start in an output in `format`, if the text so far is or may become a
/// call there (for streaming: text from here on is held back). `None` while the output is
/// plain text.
pub fn call_start(format: ToolFormat, text: &str) -> Option<usize> {
    let marker = format.marker();
    if let Some(at) = text.find(marker) {
        return Some(at);
    }
    // a bare JSON call (Llama 3, the plain fallback) starts the output
    let lead = text.len() - text.trim_start().len();
    if text[lead..].starts_with('{') || text[lead..].starts_with('[') {
        return Some(lead);
    }
    // the marker's beginning at the end of the text
    (1..marker.len())
        .rev()
        .find(|&n| text.ends_with(&marker[..n]))
        .map(|n| text.len() - n)
}

/// Reads the calls in a model's output (rendered with its special tokens' text): the text
/// before them and the calls. An output with no call that parses, or naming no known
/// tool, is all text.
pub fn parse_calls(format: ToolFormat, text: &str, tools: &[Tool]) -> (String, Vec<ToolCall>) {
    let none = || (text.to_string(), Vec::new());
    let found = match format {
        ToolFormat::Hermes => {
            let Some(first) = text.find("<tool_call>") else {
                return plain_json(text, tools).unwrap_or_else(none);
            };
            let mut calls = Vec::new();
            let blocks: Vec<&str> = text[first..].split("<tool_call>").skip(1).collect();
            for (k, block) in blocks.iter().enumerate() {
                let body = block.split("</tool_call>").next().unwrap_or("");
                // the first JSON value of the block (a closing tag cut short may follow)
                let first = serde_json::Deserializer::from_str(body.trim())
                    .into_iter::<Value>()
                    .next()
                    .and_then(Result::ok);
                match first.and_then(|v| calls_in(&v, tools)) {
                    Some(c) => calls.extend(c),
                    // a last call cut by the token limit after complete ones
                    None if k + 1 == blocks.len()
                        && !calls.is_empty()
                        && !block.contains("</tool_call>") => {}
                    None => return none(),
                }
            }
            // a stray closing tag before the first call is markup, not text
            let before = text[..first].trim_end();
            let before = before
                .strip_suffix("</tool_call>")
                .unwrap_or(before)
                .trim_end();
            (before.to_string(), calls)
        }
        ToolFormat::Mistral => {
            let Some(at) = text.find("[TOOL_CALLS]") else {
                return plain_json(text, tools).unwrap_or_else(none);
            };
            let body = text[at + "[TOOL_CALLS]".len()..].trim();
            match serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| calls_in(&v, tools))
            {
                Some(c) => (text[..at].trim_end().to_string(), c),
                None => return none(),
            }
        }
        ToolFormat::Llama3 => {
            let body = text.trim().trim_start_matches("<|python_tag|>").trim();
            // several calls may be separated by ";"
            let mut calls = Vec::new();
            for part in body.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                match serde_json::from_str::<Value>(part)
                    .ok()
                    .and_then(|v| calls_in(&v, tools))
                {
                    Some(c) => calls.extend(c),
                    None => return plain_json(text, tools).unwrap_or_else(none),
                }
            }
            (String::new(), calls)
        }
    };
    if found.1.is_empty() {
        return none();
    }
    // the same call twice in one answer (a small model repeating itself) is made once
    let (text, mut calls) = found;
    let mut seen = Vec::with_capacity(calls.len());
    calls.retain(|c| {
        let fresh = !seen.contains(c);
        if fresh {
            seen.push(c.clone());
        }
        fresh
    });
    (text, calls)
}

/// The plain JSON fallback: the whole output is a call or a list of calls.
fn plain_json(text: &str, tools: &[Tool]) -> Option<(String, Vec<ToolCall>)> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    calls_in(&v, tools).map(|c| (String::new(), c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Tool> {
        vec![
            Tool {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"]}),
            },
            Tool {
                name: "add".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {
                    "a": {"type": "integer"}, "b": {"type": "integer"}}}),
            },
        ]
    }

    #[test]
    fn calls_are_read_in_each_format_and_as_plain_json() {
        let t = tools();
        let weather = ToolCall {
            name: "get_weather".into(),
            arguments: json!({"city": "Paris"}),
        };
        let add = ToolCall {
            name: "add".into(),
            arguments: json!({"a": 1, "b": 2}),
        };
        let hermes = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1, \\\"b\\\": 2}\"}\n</tool_call>";
        assert_eq!(
            parse_calls(ToolFormat::Hermes, hermes, &t),
            (
                "Let me check.".to_string(),
                vec![weather.clone(), add.clone()]
            )
        );
        let mistral = "[TOOL_CALLS][{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}]";
        assert_eq!(
            parse_calls(ToolFormat::Mistral, mistral, &t),
            (String::new(), vec![add.clone()])
        );
        let llama =
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        assert_eq!(
            parse_calls(ToolFormat::Llama3, llama, &t),
            (String::new(), vec![weather.clone()])
        );
        let plain = " [{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}] ";
        assert_eq!(
            parse_calls(ToolFormat::Hermes, plain, &t),
            (String::new(), vec![add])
        );
        // a repeated call is made once; a last call cut short after complete ones is dropped
        let one = "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}</tool_call>";
        let twice = format!("{one}\n{one}\n<tool_call>{{\"name\": \"get_w");
        assert_eq!(parse_calls(ToolFormat::Hermes, &twice, &t).1.len(), 1);
        // unknown functions, broken JSON and plain answers are text
        for text in [
            "<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"add\", \"arguments\": {</tool_call>",
            "It is sunny.",
            "{\"answer\": 42}",
        ] {
            assert_eq!(
                parse_calls(ToolFormat::Hermes, text, &t).1,
                vec![],
                "{text}"
            );
        }
    }

    #[test]
    fn call_start_holds_back_what_may_become_a_call() {
        assert_eq!(call_start(ToolFormat::Hermes, "Sure, "), None);
        assert_eq!(call_start(ToolFormat::Hermes, "Sure <tool"), Some(5));
        assert_eq!(call_start(ToolFormat::Hermes, "Sure <tool_call>{"), Some(5));
        assert_eq!(call_start(ToolFormat::Hermes, "  {\"name\""), Some(2));
        assert_eq!(call_start(ToolFormat::Mistral, "[TOOL_CALLS][{"), Some(0));
        assert_eq!(call_start(ToolFormat::Hermes, "a < b"), None);
    }

    #[test]
    fn fallback_prompt_lists_tools_and_writes_history_as_blocks() {
        let tpl = ChatTemplate::new(None, "llama", "", "");
        assert!(!tpl.takes_tools());
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(vec![json!({"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": {"a": 1, "b": 2}}})]);
        let mut result = Message::new("tool", "3");
        result.tool_call_id = Some("call_1".into());
        let msgs = vec![
            Message::new("user", "What is 1 + 2?"),
            call,
            result.clone(),
            result,
        ];
        let (out, listed) = prompt_messages(&tpl, &msgs, &tools());
        assert!(listed.is_none());
        assert_eq!(out[0].role, "system");
        assert!(out[0].content.contains("\"name\":\"get_weather\""));
        assert!(out[0].content.contains("<tool_call>"));
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2}}\n</tool_call>"
        );
        assert_eq!(out.len(), 4, "the two results share a turn: {out:?}");
        assert_eq!(
            out[3].content,
            "<tool_response>\n3\n</tool_response>\n<tool_response>\n3\n</tool_response>"
        );
        assert!(out.iter().all(|m| m.tool_calls.is_none()));
        // a template with tool support gets them as they are
        let qwen = ChatTemplate::new(
            Some("{%- if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}<tool_call>{{ m.content }}{% endfor %}"),
            "qwen2",
            "",
            "",
        );
        let (out, listed) = prompt_messages(&qwen, &msgs, &tools());
        assert_eq!(out, msgs);
        assert_eq!(listed.unwrap().as_array().unwrap().len(), 2);
        assert_eq!(ToolFormat::of(&qwen), ToolFormat::Hermes);
        let text = qwen
            .render_tools(&msgs[..1], Some(&json!([tools()[0].to_json()])), true)
            .unwrap();
        assert!(text.starts_with("[{\"function\":"), "{text}");
    }
}
