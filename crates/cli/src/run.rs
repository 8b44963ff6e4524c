//! `capy run`: chat with a model in the terminal.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use capy_engine::{ContextParams, Engine, GenerateParams, Message, Session};

use crate::common::{default_threads, model_path, SamplingArgs};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Model: built-in name (pulled on first use), stored name or .gguf path.
    pub model: String,
    /// Prompt for a single answer; without it, an interactive chat starts.
    pub prompt: Option<String>,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(short = 'n', long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Context size in tokens.
    #[arg(short = 'c', long, default_value_t = 4096)]
    pub ctx_size: usize,
    #[arg(short = 't', long, default_value_t = default_threads())]
    pub threads: usize,
    /// Print token counts and speeds after each answer.
    #[arg(long)]
    pub verbose: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(a: RunArgs) -> Result<()> {
    let path = model_path(&a.model, true)?;
    let engine = Engine::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let n_ctx = a.ctx_size.min(engine.model.hp.n_ctx_train).max(16);
    let mut session = engine.session(ContextParams {
        n_ctx,
        n_threads: a.threads,
        ..Default::default()
    });
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampler: a.sampling.params(),
        ..Default::default()
    };
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::new("system", s));
    }
    if let Some(prompt) = &a.prompt {
        messages.push(Message::new("user", prompt));
        answer(&engine, &mut session, &messages, &params, a.verbose)?;
        return Ok(());
    }
    let stdin = std::io::stdin();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    if interactive {
        eprintln!(
            "Chatting with {} (type /bye or press Ctrl-D to quit, /clear to start over)",
            a.model
        );
    }
    let mut line = String::new();
    loop {
        if interactive {
            eprint!(">>> ");
            std::io::stderr().flush().ok();
        }
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/bye" | "/exit" | "/quit" => break,
            "/clear" => {
                messages.retain(|m: &Message| m.role == "system");
                session.reset();
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", text));
        let reply = answer(&engine, &mut session, &messages, &params, a.verbose)?;
        messages.push(Message::new("assistant", &reply));
    }
    Ok(())
}

/// Streams one answer to stdout and returns its text.
fn answer(
    engine: &Engine,
    session: &mut Session,
    messages: &[Message],
    params: &GenerateParams,
    verbose: bool,
) -> Result<String> {
    let prompt = engine.chat_tokens(messages)?;
    let mut out = std::io::stdout();
    let r = session.generate(&prompt, params, |_, text| {
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        true
    })?;
    println!();
    if verbose {
        let n_gen = r.tokens.len();
        eprintln!(
            "prompt: {} tokens, {:.1} ms, {:.1} tokens/s | generation: {} tokens, {:.1} ms, {:.1} tokens/s | stop: {:?} | kernels: {}",
            r.prompt_n,
            r.prompt_ms,
            r.prompt_n as f64 / (r.prompt_ms / 1e3).max(1e-9),
            n_gen,
            r.gen_ms,
            n_gen.saturating_sub(1) as f64 / (r.gen_ms / 1e3).max(1e-9),
            r.stop_reason,
            capy_kernels::kernels().name
        );
    }
    Ok(r.text)
}
