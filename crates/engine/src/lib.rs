//! capy's engine: tokenizer, chat templates, samplers and generation over the model.
//!
//! No HTTP here and no terminal handling: the CLI and (later) the server drive
//! [`Session::generate`] and receive tokens through a callback as they are made.

pub mod batch;
pub mod chat;
pub mod generate;
pub mod grammar;
pub mod params;
pub mod sampler;
pub mod speculative;
pub mod spm;
pub mod tokenizer;
pub mod tools;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use batch::{BatchEngine, BatchParams, Event, FnSink, Request, Sink, Stats, Summary};
pub use capy_model::{Batch, Context, ContextParams, KvCache, KvType, Model};
pub use chat::{ChatTemplate, Message};
pub use generate::{
    GenerateParams, GenerateResult, PromptLogprob, Session, StopReason, TextStream, TokenOut,
};
pub use sampler::{Sampler, SamplerParams, SamplingOptions};
pub use speculative::{SpecParams, SpecStats, SpecType, Speculator};
pub use tokenizer::Tokenizer;

/// The kernel level this process runs (`avx2`, `avx512+vnni`, `neon+dotprod`, ...: the
/// best the CPU has, or `CAPY_ISA`'s).
pub fn kernels_name() -> &'static str {
    capy_kernels::kernels().name
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] capy_model::Error),
    #[error(transparent)]
    Gguf(#[from] capy_gguf::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt of {n_prompt} tokens does not fit the context of {n_ctx}")]
    PromptTooLong { n_prompt: usize, n_ctx: usize },
    #[error("empty prompt")]
    EmptyPrompt,
    #[error("token id {token} out of range (vocabulary of {n_vocab})")]
    BadToken { token: u32, n_vocab: usize },
    #[error("too many requests waiting (queue of {max}); try again shortly")]
    QueueFull { max: usize },
    #[error("{n} choices in one request, but the queue holds at most {max}: ask for fewer (n x prompts)")]
    TooManyChoices { n: usize, max: usize },
    /// A draft model that cannot propose for its target (another vocabulary, or it does
    /// not load).
    #[error("{0}")]
    DraftMismatch(String),
    #[error("the engine has stopped")]
    Stopped,
    /// A grammar failed during generation (a compiled grammar is not expected to).
    #[error("{0}")]
    Grammar(String),
    #[error("{0}")]
    Failed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Gives the heap pages freed after building the tokenizer (its merge list is large and
/// short-lived) back to the OS, so they do not stay in the resident set next to the weights.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it touches no live
    // allocation and is thread-safe in glibc.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A loaded model with its tokenizer and chat template.
pub struct Engine {
    pub path: PathBuf,
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    /// The model file's recommended sampling (`general.sampling.*`), if it has any.
    pub sampling: SamplingOptions,
}

impl Engine {
    pub fn load(path: impl AsRef<Path>) -> Result<Engine> {
        let path = path.as_ref();
        let model = Arc::new(Model::load(path)?);
        let tokenizer = Tokenizer::from_gguf(&model.gguf)?;
        release_freed_memory();
        if tokenizer.n_vocab() != model.hp.n_vocab {
            return Err(Error::Tokenizer(format!(
                "vocabulary of {} tokens for a model with {} rows of embeddings",
                tokenizer.n_vocab(),
                model.hp.n_vocab
            )));
        }
        let piece = |id: Option<u32>| id.and_then(|i| tokenizer.piece(i)).unwrap_or_default();
        let template = ChatTemplate::new(
            model.gguf.get_str("tokenizer.chat_template")?,
            model.hp.arch.name(),
            &piece(tokenizer.bos),
            &piece(tokenizer.eos),
        );
        let sampling = SamplingOptions::from_gguf(&model.gguf);
        Ok(Engine {
            path: path.to_path_buf(),
            sampling,
            model,
            tokenizer: Arc::new(tokenizer),
            template,
        })
    }

    /// A speculator for sessions of this (target) model: n-gram lookup, or a draft model
    /// (`draft`, loaded by the caller) in a context of its own with the target context's
    /// length, batch and threads (`ctx`).
    ///
    /// # Errors
    /// [`SpecType::Draft`] without a draft, or a draft whose vocabulary differs
    /// ([`speculative::check_vocab`]).
    pub fn speculator(
        &self,
        ty: SpecType,
        draft: Option<&Engine>,
        params: SpecParams,
        ctx: &ContextParams,
    ) -> Result<Speculator> {
        let proposer = match ty {
            SpecType::Ngram => speculative::Proposer::Ngram,
            SpecType::Draft => {
                let d = draft.ok_or_else(|| {
                    Error::Failed("draft speculation needs a draft model (--draft-model)".into())
                })?;
                speculative::check_vocab(&self.tokenizer, &d.tokenizer)?;
                let dctx = ContextParams {
                    n_ctx: ctx.n_ctx.min(d.model.hp.n_ctx_train.max(1)),
                    n_seq: 1,
                    kv_blocks: None,
                    n_outputs: 1,
                    type_k: Default::default(),
                    type_v: Default::default(),
                    ..ctx.clone()
                };
                speculative::Proposer::Draft(Box::new(speculative::DraftModel::new(Context::new(
                    Arc::clone(&d.model),
                    dctx,
                ))))
            }
        };
        Ok(Speculator::new(params, proposer))
    }

    /// A single-sequence session with its own context.
    pub fn session(&self, params: ContextParams) -> Session {
        Session::new(
            Context::new(Arc::clone(&self.model), params),
            Arc::clone(&self.tokenizer),
        )
    }

    /// Renders a conversation and tokenizes it: the template's markup becomes control
    /// tokens, message content is text even where it spells a control token (no forged
    /// turns); BOS is added only if the template did not already put it there.
    ///
    /// # Errors
    /// A template that fails to render, or the tokenizer's errors.
    pub fn chat_tokens(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.chat_tokens_tools(messages, &[])
    }

    /// [`Engine::chat_tokens`] with tools the model may call: given to templates that take
    /// them, else described in a system message ([`tools::prompt_messages`]).
    ///
    /// # Errors
    /// As [`Engine::chat_tokens`].
    pub fn chat_tokens_tools(
        &self,
        messages: &[Message],
        tools: &[tools::Tool],
    ) -> Result<Vec<u32>> {
        let (messages, listed) = tools::prompt_messages(&self.template, messages, tools);
        let (text, literal) =
            self.template
                .render_marked_tools(&messages, listed.as_ref(), true)?;
        let starts_with_bos =
            !self.template.bos_token.is_empty() && text.starts_with(&self.template.bos_token);
        self.tokenizer
            .encode_chat(&text, !starts_with_bos, &literal)
    }

    /// The tokens of a follow-up turn, to append to an earlier conversation's tokens (Ollama's
    /// `context`): as [`Engine::chat_tokens`], without a BOS.
    ///
    /// # Errors
    /// As [`Engine::chat_tokens`].
    pub fn chat_turn_tokens(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let (messages, _) = tools::prompt_messages(&self.template, messages, &[]);
        let (text, literal) = self.template.render_marked(&messages, true)?;
        let bos = self.template.bos_token.as_str();
        let skip = if !bos.is_empty() && text.starts_with(bos) {
            bos.len()
        } else {
            0
        };
        let shifted: Vec<_> = literal
            .iter()
            .map(|r| r.start.saturating_sub(skip)..r.end.saturating_sub(skip))
            .collect();
        self.tokenizer.encode_chat(&text[skip..], false, &shifted)
    }
}
