//! Chat templates: the GGUF's `tokenizer.chat_template` rendered with minijinja, or a
//! built-in format when the file has none (Gemma's turn format for Gemma, ChatML otherwise).

use std::ops::Range;

use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One chat message as templates see it (Hugging Face's shape): `role`, `content`, and for
/// tool calling an assistant's `tool_calls` (`[{"id", "type": "function", "function":
/// {"name", "arguments": {...}}}]`, arguments as an object, which templates print with
/// `tojson`) and a tool result's `tool_call_id` and `name`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

const CHATML: &str = "{%- for message in messages -%}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}";

/// Gemma's turns: no system role (a system message is prepended to the first user turn),
/// the assistant is called "model".
const GEMMA: &str = "{{ bos_token }}{%- if messages and messages[0].role == 'system' -%}{%- set first = messages[0].content + '\n\n' -%}{%- set rest = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set rest = messages -%}{%- endif -%}{%- for m in rest -%}{%- set role = 'model' if m.role == 'assistant' else m.role -%}{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m.content + '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

#[derive(Clone, Debug)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// The template came from the model file (not a built-in fallback).
    pub from_model: bool,
}

impl ChatTemplate {
    /// The model's template, or the built-in one for its architecture.
    pub fn new(
        model_template: Option<&str>,
        arch: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> ChatTemplate {
        let (source, from_model) = match model_template {
            Some(t) if !t.trim().is_empty() => (t.to_string(), true),
            _ if arch.starts_with("gemma") => (GEMMA.to_string(), false),
            _ => (CHATML.to_string(), false),
        };
        ChatTemplate {
            source,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            from_model,
        }
    }

    /// Renders a conversation and says which bytes of the result came from message content,
    /// so that only the template's own markup may become control tokens
    /// ([`crate::Tokenizer::encode_chat`]): a message that contains `<|im_end|>` must not end
    /// its turn.
    ///
    /// How: each content is rendered as a marker padded with an em space on both sides, and
    /// the marker is then replaced by the content. A template that trims content strips the
    /// padding with it, which tells how much of the content to trim. Returns the text (equal
    /// to [`ChatTemplate::render`]'s for templates that print content as is or trimmed) and
    /// the content byte ranges, in order.
    ///
    /// # Errors
    /// As [`ChatTemplate::render`].
    pub fn render_marked(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>)> {
        self.render_marked_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render_marked`] with `tools` (Hugging Face's list of
    /// `{"type": "function", "function": {...}}`) given to the template.
    ///
    /// # Errors
    /// As [`ChatTemplate::render`].
    pub fn render_marked_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>)> {
        const PAD: char = '\u{2003}';
        let marker = |i: usize| format!("\u{F8F0}capy{i}\u{F8F1}");
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message {
                content: format!("{PAD}{}{PAD}", marker(i)),
                ..m.clone()
            })
            .collect();
        let rendered = self.render_tools(&marked, tools, add_generation_prompt)?;
        let mut out = String::with_capacity(rendered.len());
        let mut spans = Vec::new();
        let mut rest = rendered.as_str();
        // markers are found in order of appearance, whichever message they belong to
        while let Some(at) = rest.find('\u{F8F0}') {
            let tail = &rest[at + '\u{F8F0}'.len_utf8()..];
            let parsed = tail.strip_prefix("capy").and_then(|t| {
                let end = t.find('\u{F8F1}')?;
                let i: usize = t[..end].parse().ok()?;
                Some((i, &t[end + '\u{F8F1}'.len_utf8()..]))
            });
            let Some((i, after)) = parsed.filter(|(i, _)| *i < messages.len()) else {
                out.push_str(&rest[..at + '\u{F8F0}'.len_utf8()]);
                rest = tail;
                continue;
            };
            let before = &rest[..at];
            let (before, lead) = match before.strip_suffix(PAD) {
                Some(b) => (b, true),
                None => (before, false),
            };
            let (after, trail) = match after.strip_prefix(PAD) {
                Some(a) => (a, true),
                None => (after, false),
            };
            let content = messages[i].content.as_str();
            let content = match (lead, trail) {
                (true, true) => content,
                (false, true) => content.trim_start(),
                (true, false) => content.trim_end(),
                (false, false) => content.trim(),
            };
            out.push_str(before);
            spans.push(out.len()..out.len() + content.len());
            out.push_str(content);
            rest = after;
        }
        out.push_str(rest);
        Ok((out, spans))
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template reads a `tools` variable (Hugging Face's tool-calling
    /// templates do); others get tools through a system message ([`crate::tools`]).
    pub fn takes_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// Renders a conversation, with `tools` for templates that take them.
    ///
    /// # Errors
    /// A template that does not compile or raises an exception.
    pub fn render_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            tools => tools,
        })
        .map_err(|e| Error::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<Message> {
        vec![
            Message::new("system", "You are a helpful assistant."),
            Message::new("user", "What is the capital of France?"),
        ]
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None, "llama", "<s>", "</s>");
        assert_eq!(
            t.render(&msgs(), true).unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn gemma_fallback_folds_system_into_first_turn() {
        let t = ChatTemplate::new(None, "gemma3", "<bos>", "<eos>");
        assert_eq!(
            t.render(&msgs(), true).unwrap(),
            "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn template_errors_are_errors() {
        let t = ChatTemplate::new(Some("{{ raise_exception('no') }}"), "llama", "", "");
        assert!(matches!(t.render(&msgs(), true), Err(Error::Template(_))));
        let t = ChatTemplate::new(Some("{% for %}"), "llama", "", "");
        assert!(t.render(&msgs(), true).is_err());
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            Some("{{ messages[0].content.strip().upper() }}"),
            "llama",
            "",
            "",
        );
        assert_eq!(
            t.render(&[Message::new("user", "  hi ")], false).unwrap(),
            "HI"
        );
    }
}
