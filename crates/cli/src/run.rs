//! `capy run`: chat with a model in the terminal, as `ollama run` does: line editing and
//! history (rustyline), `"""` for multi-line input, `/set`, `/show`, `/clear`, `/bye`;
//! Ctrl-C stops an answer and returns to the prompt, Ctrl-C or Ctrl-D at an empty prompt
//! exits. Piped input is read line by line with the same commands, without editing.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use capy_engine::grammar::Grammar;
use capy_engine::{
    params, ContextParams, Engine, GenerateParams, Message, SamplingOptions, Session,
};
use rustyline::error::ReadlineError;

use crate::common::{
    capped_threads, configured_model, ctx_size, default_threads, model_sampling, threads,
    GrammarArgs, SamplingArgs, SpecArgs,
};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Model: built-in name (pulled on first use), stored name, .gguf path, a name or alias
    /// from the config file's `[models.NAME]` tables, or a router or ensemble of its
    /// `[virtual.NAME]` tables.
    pub model: String,
    /// Prompt for a single answer; without it, an interactive chat starts.
    pub prompt: Option<String>,
    /// System message [default: the config file's `system` for the model, else none].
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer (-1: until the context is full).
    #[arg(short = 'n', long, default_value_t = 512, allow_negative_numbers = true,
          value_parser = num_predict)]
    pub max_tokens: usize,
    /// Context size in tokens, 16 or more (at most the model's trained context)
    /// [default: the config file's `ctx_size` for the model, else 4096].
    #[arg(short = 'c', long, value_parser = ctx_size)]
    pub ctx_size: Option<usize>,
    /// Threads, at most the machine's cores (by default, all of them).
    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = threads)]
    pub threads: usize,
    /// Element type of the cached keys: f16, q8_0, fp8 (also `-ctk`) [default: the config
    /// file's for this model, else f16].
    #[arg(long = "cache-type-k", value_parser = crate::common::kv_type)]
    pub cache_type_k: Option<capy_model::KvType>,
    /// Element type of the cached values (also `-ctv`) [default: the config file's for this
    /// model, else f16].
    #[arg(long = "cache-type-v", value_parser = crate::common::kv_type)]
    pub cache_type_v: Option<capy_model::KvType>,
    /// TOML file with `[models.NAME]` settings [default: config.toml in CAPY_HOME, if there].
    #[arg(long, env = "CAPY_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Print token counts and speeds after each answer.
    #[arg(long)]
    pub verbose: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub grammar: GrammarArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
}

/// Set by Ctrl-C while an answer streams (the terminal is not in raw mode then); the
/// answer stops at its next token.
pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

/// A chat the line-reading loops drive: a model's own ([`Chat`]) or a virtual model's
/// ([`crate::virtual_chat::VirtualChat`]).
pub(crate) trait Conversation {
    /// What the chat is with, for the greeting.
    fn name(&self) -> &str;
    /// Handles one input: a command or a message. `Ok(false)` means the user asked to quit.
    fn input(&mut self, text: &str) -> Result<bool>;
}

/// One conversation.
struct Chat {
    name: String,
    engine: Engine,
    session: Session,
    messages: Vec<Message>,
    system: Option<String>,
    /// The model's recommended settings, under the flags and `/set`.
    model_options: SamplingOptions,
    options: SamplingOptions,
    max_tokens: usize,
    /// Stop strings (`/set parameter stop ...`).
    stop: Vec<String>,
    /// `--format` / `--grammar`: every answer follows it
    grammar: Option<Grammar>,
    verbose: bool,
}

/// `-n`: Ollama's `num_predict` range; -1 and -2 run until the context is full.
/// The message of `/set system TEXT` (none when TEXT is empty).
pub(crate) fn set_system_text(command: &str) -> Option<String> {
    let s = command
        .splitn(3, char::is_whitespace)
        .nth(2)
        .unwrap_or("")
        .trim();
    (!s.is_empty()).then(|| s.to_string())
}

pub(crate) fn num_predict(s: &str) -> Result<usize, String> {
    params::NUM_PREDICT
        .parse(s)
        .map(|v| usize::try_from(v as i64).unwrap_or(usize::MAX))
}

const HELP: &str = "Available commands:
  /set parameter NAME VALUE   set a sampling parameter (temperature, top_k, top_p, min_p,
                              repeat_penalty, repeat_last_n, presence_penalty,
                              frequency_penalty, seed, num_predict)
  /set parameter stop S ...   stop strings (none: clear them)
  /set system TEXT            set the system message (clears the conversation)
  /set verbose | /set quiet   show or hide token counts and speeds
  /show [info|parameters|system|template]
  /clear                      forget the conversation
  /bye                        exit
  /?, /help                   this help
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer; Ctrl-D or Ctrl-C
at an empty prompt exits.";

impl Conversation for Chat {
    fn name(&self) -> &str {
        &self.name
    }

    fn input(&mut self, text: &str) -> Result<bool> {
        self.handle(text)
    }
}

impl Chat {
    /// Handles one input: a command or a message. `Ok(false)` means the user asked to quit.
    fn handle(&mut self, text: &str) -> Result<bool> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(true);
        }
        if !text.starts_with('/') {
            self.ask(text)?;
            return Ok(true);
        }
        let mut words = text.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let rest: Vec<&str> = words.collect();
        match (cmd, rest.as_slice()) {
            ("/bye" | "/exit" | "/quit", _) => return Ok(false),
            ("/clear", _) => {
                self.clear();
                eprintln!("Cleared session context");
            }
            ("/?" | "/help", _) => eprintln!("{HELP}"),
            ("/set", ["parameter", "stop", words @ ..]) => {
                self.stop = words.iter().map(|w| w.to_string()).collect();
                eprintln!("Set parameter 'stop' to '{}'", self.stop.join(", "));
            }
            ("/set", ["parameter", name, value]) => self.set_parameter(name, value),
            ("/set", ["system", ..]) => {
                self.system = set_system_text(text);
                self.clear();
                eprintln!("Set system message.");
            }
            ("/set", ["verbose"]) => self.verbose = true,
            ("/set", ["quiet"]) => self.verbose = false,
            ("/show", what) => self.show(what.first().copied().unwrap_or("")),
            _ => eprintln!("Unknown command '{text}'. Type /? for help"),
        }
        Ok(true)
    }

    fn clear(&mut self) {
        self.messages.clear();
        self.session.reset();
    }

    fn set_parameter(&mut self, name: &str, value: &str) {
        let r = if name == "num_predict" {
            num_predict(value).map(|n| self.max_tokens = n)
        } else {
            self.options.set_text(name, value)
        };
        match r {
            Ok(()) => eprintln!("Set parameter '{name}' to '{value}'"),
            Err(e) => eprintln!("Couldn't set parameter: {e}"),
        }
    }

    fn show(&self, what: &str) {
        let p = self.options.or(&self.model_options).params();
        let hp = &self.engine.model.hp;
        match what {
            "" | "info" => {
                eprintln!("  Model");
                eprintln!("    name                {}", self.name);
                eprintln!("    architecture        {}", hp.arch.name());
                eprintln!(
                    "    parameters          {:.0}M",
                    self.engine.model.gguf.n_params() as f64 / 1e6
                );
                eprintln!("    context length      {}", self.session.n_ctx());
                eprintln!(
                    "    quantization        {}",
                    self.engine.model.gguf.file_type_name()
                );
                if what == "info" {
                    return;
                }
                self.show("parameters");
            }
            "parameters" => {
                eprintln!("  Parameters");
                eprintln!("    temperature         {}", p.temperature);
                eprintln!("    top_k               {}", p.top_k);
                eprintln!("    top_p               {}", p.top_p);
                eprintln!("    min_p               {}", p.min_p);
                eprintln!("    repeat_penalty      {}", p.repeat_penalty);
                eprintln!("    repeat_last_n       {}", p.repeat_last_n as i64);
                eprintln!("    presence_penalty    {}", p.presence_penalty);
                eprintln!("    frequency_penalty   {}", p.frequency_penalty);
                if self.max_tokens == usize::MAX {
                    eprintln!("    num_predict         -1");
                } else {
                    eprintln!("    num_predict         {}", self.max_tokens);
                }
                if !self.stop.is_empty() {
                    eprintln!("    stop                {:?}", self.stop);
                }
                if let Some(s) = p.seed {
                    eprintln!("    seed                {s}");
                }
            }
            "system" => eprintln!(
                "{}",
                self.system
                    .as_deref()
                    .unwrap_or("No system message was specified.")
            ),
            "template" => eprintln!("{}", self.engine.template.source),
            _ => eprintln!("Unknown /show topic '{what}': info, parameters, system or template"),
        }
    }

    /// Streams one answer to stdout; Ctrl-C stops it. The exchange joins the conversation.
    fn ask(&mut self, text: &str) -> Result<()> {
        self.messages.push(Message::new("user", text));
        let mut all = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system {
            all.push(Message::new("system", s));
        }
        all.extend(self.messages.iter().cloned());
        let prompt = self.engine.chat_tokens(&all)?;
        let params = GenerateParams {
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            sampler: self.options.or(&self.model_options).params(),
            grammar: self.grammar.clone(),
            ..Default::default()
        };
        let mut out = std::io::stdout();
        STOP.store(false, Ordering::SeqCst);
        let r = self.session.generate(&prompt, &params, |_, text| {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
            !STOP.load(Ordering::SeqCst)
        })?;
        println!();
        if STOP.swap(false, Ordering::SeqCst) {
            eprintln!("(stopped)");
        }
        if self.verbose {
            let n_gen = r.tokens.len();
            eprintln!(
                "prompt: {} tokens, {:.1} ms, {:.1} tokens/s | generation: {} tokens, {:.1} ms, {:.1} tokens/s | stop: {} | kernels: {}",
                r.prompt_n,
                r.prompt_ms,
                r.prompt_n as f64 / (r.prompt_ms / 1e3).max(1e-9),
                n_gen,
                r.gen_ms,
                n_gen.saturating_sub(1) as f64 / (r.gen_ms / 1e3).max(1e-9),
                format!("{:?}", r.stop_reason).to_lowercase(),
                capy_kernels::kernels().name
            );
            if let Some(spec) = self.session.speculator() {
                eprintln!("{}", spec_line(spec.spec_type().name(), &r.spec));
            }
        }
        self.messages.push(Message::new("assistant", &r.text));
        Ok(())
    }
}

pub fn run(a: RunArgs) -> Result<()> {
    if let Some((cfg, v)) = crate::common::virtual_model(&a.model, a.config.as_deref())? {
        let mut chat = crate::virtual_chat::VirtualChat::start(&a, cfg, v)?;
        if let Some(prompt) = &a.prompt {
            return chat.ask(prompt);
        }
        return if std::io::stdin().is_terminal() {
            interactive(&mut chat)
        } else {
            piped(&mut chat)
        };
    }
    let (path, settings) = configured_model(&a.model, a.config.as_deref(), true)?;
    let engine = Engine::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let settings = settings.as_ref();
    let n_ctx = a
        .ctx_size
        .or(settings.and_then(|s| s.ctx_size))
        .unwrap_or(4096)
        .min(engine.model.hp.n_ctx_train)
        .max(16);
    let mut session = engine.session(ContextParams {
        n_ctx,
        n_threads: capped_threads(a.threads),
        n_outputs: a.spec.n_outputs(),
        type_k: a
            .cache_type_k
            .or(settings.and_then(|s| s.cache_type_k))
            .unwrap_or_default(),
        type_v: a
            .cache_type_v
            .or(settings.and_then(|s| s.cache_type_v))
            .unwrap_or_default(),
        ..Default::default()
    });
    let spec = a.spec.speculator(&engine, &session.ctx.params)?;
    session.set_speculator(spec);
    let mut chat = Chat {
        name: settings.map_or_else(|| a.model.clone(), |s| s.name.clone()),
        model_options: model_sampling(&a.model, settings, &engine),
        engine,
        session,
        messages: Vec::new(),
        system: a
            .system
            .clone()
            .or_else(|| settings.and_then(|s| s.system.clone())),
        options: a.sampling.options(),
        max_tokens: a.max_tokens,
        stop: Vec::new(),
        grammar: None,
        verbose: a.verbose,
    };
    chat.grammar = a.grammar.grammar(&chat.engine.tokenizer)?;
    if let Some(prompt) = &a.prompt {
        return chat.ask(prompt);
    }
    if std::io::stdin().is_terminal() {
        interactive(&mut chat)
    } else {
        piped(&mut chat)
    }
}

/// Reads piped input: a message per line, `"""` blocks, commands.
fn piped(chat: &mut dyn Conversation) -> Result<()> {
    // bytes that are not UTF-8 become U+FFFD rather than ending the session
    let mut lines = std::io::stdin().lock().split(b'\n').map(|r| {
        r.map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\r')
                .to_string()
        })
    });
    while let Some(line) = lines.next() {
        let line = line?;
        let text = match line.trim_start().strip_prefix("\"\"\"") {
            Some(first) => {
                let mut buf = vec![first.to_string()];
                for l in lines.by_ref() {
                    let l = l?;
                    let end = l.trim_end().strip_suffix("\"\"\"").map(str::to_string);
                    let done = end.is_some();
                    buf.push(end.unwrap_or(l));
                    if done {
                        break;
                    }
                }
                buf.join("\n")
            }
            None => line,
        };
        if !chat.input(&text)? {
            break;
        }
    }
    Ok(())
}

/// Ctrl-C at the prompt: exit on an empty line, else clear the line (as a shell does).
struct CtrlC;

impl rustyline::ConditionalEventHandler for CtrlC {
    fn handle(
        &self,
        _: &rustyline::Event,
        _: rustyline::RepeatCount,
        _: bool,
        ctx: &rustyline::EventContext,
    ) -> Option<rustyline::Cmd> {
        if ctx.line().is_empty() {
            Some(rustyline::Cmd::Interrupt)
        } else {
            Some(rustyline::Cmd::Kill(rustyline::Movement::WholeBuffer))
        }
    }
}

fn interactive(chat: &mut dyn Conversation) -> Result<()> {
    let mut ed = rustyline::DefaultEditor::new().context("starting the line editor")?;
    // after the editor (which must not take SIGINT): while an answer streams the terminal is
    // in its normal mode and Ctrl-C is a signal; at the prompt it is a key (CtrlC below)
    ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    ed.bind_sequence(
        rustyline::KeyEvent::ctrl('C'),
        rustyline::EventHandler::Conditional(Box::new(CtrlC)),
    );
    let history = capy_store::Store::open_default().root.join("history");
    let _ = ed.load_history(&history);
    eprintln!(
        "Chatting with {} (/? for help, /bye or Ctrl-D to quit; \"\"\" for several lines)",
        chat.name()
    );
    loop {
        let line = match ed.readline(">>> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let text = match line.trim_start().strip_prefix("\"\"\"") {
            Some(first) => {
                let mut buf = vec![first.to_string()];
                loop {
                    match ed.readline("... ") {
                        Ok(l) => {
                            let end = l.trim_end().strip_suffix("\"\"\"").map(str::to_string);
                            let done = end.is_some();
                            buf.push(end.unwrap_or(l));
                            if done {
                                break;
                            }
                        }
                        Err(ReadlineError::Interrupted) => {
                            buf.clear();
                            break;
                        }
                        Err(ReadlineError::Eof) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                buf.join("\n")
            }
            None => line,
        };
        if text.trim().is_empty() {
            continue;
        }
        let _ = ed.add_history_entry(text.as_str());
        if let Some(dir) = history.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = ed.save_history(&history);
        if !chat.input(&text)? {
            break;
        }
    }
    Ok(())
}

/// `--verbose`'s line on speculative decoding: proposed and kept tokens, the acceptance
/// rate, and kept tokens per verification step.
pub fn spec_line(kind: &str, s: &capy_engine::SpecStats) -> String {
    format!(
        "speculative ({kind}): {} proposed, {} accepted ({:.1}%), {:.2} accepted per step over {} steps",
        s.drafted,
        s.accepted,
        100.0 * s.acceptance_rate(),
        s.mean_accepted(),
        s.steps
    )
}
