//! Chat templates: the GGUF's `tokenizer.chat_template` rendered with minijinja, or a
//! built-in format when the file has none (Gemma's turn format for Gemma, ChatML otherwise).

use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
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

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
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
