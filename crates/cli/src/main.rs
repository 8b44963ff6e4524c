//! The `capy` command: pull, list, show, rm, run, generate, perplexity, bench, quantize,
//! serve, ps, stop, keys, usage.
//!
//! The only crate that uses `anyhow`: library errors get context here and become an exit
//! code and a one-line message.

mod bench;
mod bench_spec;
mod common;
mod generate;
mod keys;
mod perplexity;
mod progress;
mod quantize;
mod remote;
mod run;
mod serve;
mod store_cmds;
mod virtual_chat;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capy",
    version,
    about = "A fast local LLM engine for CPUs",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download a model into the local store (built-in name, hf.co/ORG/REPO/FILE or URL).
    Pull(store_cmds::PullArgs),
    /// List the models in the store.
    #[command(alias = "ls")]
    List,
    /// Show a model's metadata.
    Show(store_cmds::ShowArgs),
    /// Remove a model from the store.
    Rm(store_cmds::RmArgs),
    /// Chat with a model: one answer with a prompt, an interactive chat without.
    Run(run::RunArgs),
    /// Raw completion for scripts and tests (no chat template), optionally as JSON.
    Generate(generate::GenerateArgs),
    /// Perplexity of a text file, llama-perplexity's method.
    Perplexity(perplexity::PerplexityArgs),
    /// Prompt and generation speed, llama-bench's method.
    Bench(bench::BenchArgs),
    /// Write a model with its weights in another type (llama-quantize's types and mixes).
    Quantize(quantize::QuantizeArgs),
    /// OpenAI- and Ollama-compatible server with continuous batching and many models.
    Serve(Box<serve::ServeArgs>),
    /// The models a running server has loaded (server at CAPY_HOST).
    Ps,
    /// Unload a model from a running server now (server at CAPY_HOST).
    Stop(remote::StopArgs),
    /// Create, list, update and revoke the API keys of `capy serve`.
    Keys(keys::KeysArgs),
    /// Requests and tokens used, per day, key or model, from the usage records.
    Usage(keys::UsageArgs),
}

fn main() {
    // llama.cpp's spellings of the cache-type flags (one dash, several letters)
    let cli = Cli::parse_from(std::env::args_os().map(|a| match a.to_str() {
        Some("-ctk") => "--cache-type-k".into(),
        Some("-md") => "--draft-model".into(),
        Some(s) if s.starts_with("-md=") => format!("--draft-model={}", &s[4..]).into(),
        Some("-ctv") => "--cache-type-v".into(),
        Some(s) if s.starts_with("-ctk=") => format!("--cache-type-k={}", &s[5..]).into(),
        Some(s) if s.starts_with("-ctv=") => format!("--cache-type-v={}", &s[5..]).into(),
        _ => a,
    }));
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        default_sigpipe();
    }
    let r = match cli.cmd {
        Cmd::Pull(a) => store_cmds::pull(a),
        Cmd::List => store_cmds::list(),
        Cmd::Show(a) => store_cmds::show(a),
        Cmd::Rm(a) => store_cmds::rm(a),
        Cmd::Run(a) => run::run(a),
        Cmd::Generate(a) => generate::generate(a),
        Cmd::Perplexity(a) => perplexity::perplexity(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Quantize(a) => quantize::quantize(a),
        Cmd::Serve(a) => serve::serve(*a),
        Cmd::Ps => remote::ps(),
        Cmd::Stop(a) => remote::stop(a),
        Cmd::Keys(a) => keys::keys(a),
        Cmd::Usage(a) => keys::usage(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A command whose output goes to a pipe that closes (`capy run ... | head`) ends quietly,
/// as other command-line tools do, instead of panicking in `print!`. (Not for the server:
/// its sockets report a closed peer as an error.)
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default has no memory effects; it runs
    // before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
