//! Constrained decoding (structured outputs): a grammar per sequence that says which tokens
//! may come next, on [llguidance](https://github.com/guidance-ai/llguidance) (the engine
//! llama.cpp uses for the same job).
//!
//! - [`GrammarSpec`] is what a request asks for: a JSON schema, any JSON object, a Lark
//!   grammar (llguidance's dialect), a GBNF grammar (llama.cpp's format, translated to Lark
//!   here), or a regular expression.
//! - [`Grammars`] holds the token trie built from capy's own tokenizer and llguidance's
//!   parser factory; one per tokenizer, built on first use ([`crate::Tokenizer::grammars`]).
//! - [`Grammar`] is one sequence's parser state: [`Grammar::mask`] gives the allowed tokens
//!   before sampling, [`Grammar::accept`] advances on the chosen token. A finished grammar
//!   allows only end-of-generation tokens.
//!
//! Numbers, and every other run of digits, end after 16 digits in a row (llama.cpp's JSON
//! grammars allow 16 digits per part of a number): past that, tokens that begin with a digit
//! leave the mask unless nothing else may follow. A small model left free to write digits
//! can repeat one until the token limit (`0.52888888...`).
//!
//! JSON whitespace is limited to a space, or a newline and at most 20 spaces or tabs of
//! indentation, between tokens of the JSON (llama.cpp's `json-schema-to-grammar` limits it
//! the same way): a small model left free to emit whitespace can loop on it until the token
//! limit. A schema's own `"x-guidance"` options take precedence.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::tokenizer::{TokenType, Tokenizer};

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// JSON that validates against this JSON schema (`{"type": "object"}` for OpenAI's
    /// `json_object` and Ollama's `"json"`).
    JsonSchema(Value),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
    /// A grammar in llama.cpp's GBNF (its `root` rule is the start).
    Gbnf(String),
    /// Text matching a regular expression (Rust `regex` syntax).
    Regex(String),
}

impl GrammarSpec {
    /// Any JSON object: OpenAI's `{"type": "json_object"}` and Ollama's `format: "json"`.
    pub fn json_object() -> GrammarSpec {
        GrammarSpec::JsonSchema(serde_json::json!({"type": "object"}))
    }

    /// llguidance's form of the grammar.
    ///
    /// # Errors
    /// A GBNF grammar that does not parse (see [`gbnf_to_lark`]), a schema that is not a
    /// JSON object or boolean.
    fn top_level(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            GrammarSpec::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(prepare_schema(schema)?)
            }
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            GrammarSpec::Gbnf(g) => TopLevelGrammar::from_lark(gbnf_to_lark(g)?),
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
        })
    }
}

/// A schema as capy compiles it: objects get no unlisted properties
/// ([`no_unlisted_properties`]) and JSON whitespace is limited (the module's notes).
///
/// # Errors
/// A schema that is neither an object nor `true`.
pub fn prepare_schema(schema: &Value) -> Result<Value, String> {
    let mut schema = closed_schema(schema)?;
    if let Value::Object(m) = &mut schema {
        m.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_pattern": r"\x20|\n[\x20\x09]{0,20}",
            })
        });
    }
    Ok(schema)
}

/// A schema with no unlisted properties ([`no_unlisted_properties`]), for use inside
/// another (no whitespace options: llguidance reads those at the top only).
///
/// # Errors
/// A schema that is neither an object nor `true`.
pub fn closed_schema(schema: &Value) -> Result<Value, String> {
    let mut schema = match schema {
        Value::Object(_) => schema.clone(),
        Value::Bool(true) => serde_json::json!({}),
        other => {
            return Err(format!(
                "a JSON schema must be an object, got {}",
                short(other)
            ))
        }
    };
    no_unlisted_properties(&mut schema);
    Ok(schema)
}

/// Objects whose schema lists `properties` but says nothing of others get none
/// (`"additionalProperties": false`), as llama.cpp's and Ollama's JSON-schema grammars treat
/// them and as OpenAI's strict mode requires: a small model free to add properties keeps
/// adding them. Schemas combined with `allOf` (whose parts list each other's properties) and
/// objects that name `patternProperties` or `unevaluatedProperties` are left as they are.
fn no_unlisted_properties(v: &mut Value) {
    let Value::Object(m) = v else { return };
    if m.contains_key("properties")
        && !m.contains_key("additionalProperties")
        && !m.contains_key("patternProperties")
        && !m.contains_key("unevaluatedProperties")
        && !m.contains_key("allOf")
    {
        m.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (k, x) in m.iter_mut() {
        match (k.as_str(), x) {
            // maps of name -> schema
            ("properties" | "$defs" | "definitions", Value::Object(named)) => {
                named.values_mut().for_each(no_unlisted_properties)
            }
            // lists of schemas
            ("anyOf" | "oneOf" | "prefixItems", Value::Array(list)) => {
                list.iter_mut().for_each(no_unlisted_properties)
            }
            // one schema
            ("items" | "additionalProperties" | "not" | "if" | "then" | "else" | "contains", x) => {
                no_unlisted_properties(x)
            }
            _ => {}
        }
    }
}

/// A value shortened for an error message.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        let mut end = 57;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

/// A tokenizer as llguidance sees it: the token trie (each token's bytes; control and other
/// special tokens behind the trie's special marker, so no text can produce them) and greedy
/// tokenization on it (used only for text a grammar forces; capy samples every token).
struct Env {
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.greedy_tokenize(s)
    }
}

/// The grammar compiler of one tokenizer: its token trie and llguidance's parser factory.
pub struct Grammars {
    factory: ParserFactory,
    n_vocab: usize,
    eog: Arc<[u32]>,
    env: TokEnv,
    /// tokens whose text begins with an ASCII digit, with `0`
    digit_start: Arc<SimpleVob>,
    zero_start: Arc<SimpleVob>,
}

/// The most digits in a row a constrained output may have (where the grammar allows
/// something else).
pub const MAX_DIGIT_RUN: usize = 16;

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("n_vocab", &self.n_vocab)
            .finish()
    }
}

impl Grammars {
    /// Builds the token trie from `tok` (its end-of-generation tokens are the grammar's
    /// end tokens) and the parser factory.
    ///
    /// # Errors
    /// A tokenizer without an end-of-generation token; llguidance's refusal of the trie.
    pub fn new(tok: &Tokenizer) -> Result<Grammars, String> {
        let n = tok.n_vocab();
        let eog = tok.eog_tokens();
        let Some(&first_eog) = eog.first() else {
            return Err("the model has no end-of-generation token to end a grammar with".into());
        };
        // The trie holds one token per byte string: where two tokens spell the same text
        // (SentencePiece's byte-fallback `<0x22>` and the piece `"`), the ordinary piece
        // keeps it, the model's usual choice; the other becomes unreachable by text.
        let mut owner: std::collections::HashMap<&[u8], (u32, bool)> = Default::default();
        for id in 0..n as u32 {
            let bytes = tok.token_bytes(id, true);
            let byte_fallback = tok.token_type(id) == Some(TokenType::Byte);
            match owner.get(bytes) {
                Some(&(_, false)) => {}
                Some(&(_, true)) if byte_fallback => {}
                _ => {
                    owner.insert(bytes, (id, byte_fallback));
                }
            }
        }
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let bytes = tok.token_bytes(id, true);
                let special = tok.is_eog(id)
                    || matches!(
                        tok.token_type(id),
                        Some(TokenType::Control | TokenType::Unknown | TokenType::Unused)
                    )
                    || owner.get(bytes).is_some_and(|&(o, _)| o != id);
                if special || bytes.is_empty() {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    match tok.piece(id) {
                        Some(p) if !p.is_empty() => w.extend_from_slice(p.as_bytes()),
                        _ => w.extend_from_slice(format!("<[{id}]>").as_bytes()),
                    }
                    w
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let info = TokRxInfo {
            tok_bos: tok.bos,
            ..TokRxInfo::new(n as u32, first_eog)
        };
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eog);
        let mut digit_start = trie.alloc_token_set();
        let mut zero_start = trie.alloc_token_set();
        for (id, w) in words.iter().enumerate() {
            if w.first().is_some_and(u8::is_ascii_digit) {
                digit_start.allow_token(id as u32);
            }
            if w.first() == Some(&b'0') {
                zero_start.allow_token(id as u32);
            }
        }
        let env: TokEnv = Arc::new(Env { trie });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars {
            factory,
            n_vocab: n,
            eog: eog.into(),
            env,
            digit_start: Arc::new(digit_start),
            zero_start: Arc::new(zero_start),
        })
    }

    /// A grammar that starts only once the output contains `trigger` (a text, or a special
    /// token's text such as `[TOOL_CALLS]`), right after it: text before the trigger is
    /// free (llama.cpp's "lazy" grammars: a tool call's arguments are constrained once the
    /// call starts).
    ///
    /// # Errors
    /// As [`Grammars::compile`].
    pub fn compile_lazy(&self, spec: &GrammarSpec, trigger: &str) -> Result<Grammar, String> {
        let mut g = self.compile(spec)?;
        g.start_after(trigger);
        Ok(g)
    }

    /// Compiles a grammar for one sequence, in its start state.
    ///
    /// # Errors
    /// What llguidance says of a grammar or schema it cannot compile (it names the
    /// unsupported keyword or the line of the grammar).
    ///
    /// Compiling recurses as deep as the grammar nests (a chain of a thousand rules or
    /// `$ref`s), so it runs on a thread of its own with a [`COMPILE_STACK`] stack, and the
    /// first mask is computed there too: a grammar that accepts nothing (`root ::= root`,
    /// `{"$ref": "#"}`) or that overflows the parser's limits at its first step is refused
    /// here rather than failing the request later. A panic in llguidance is an error too.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Grammar, String> {
        let size = match spec {
            GrammarSpec::JsonSchema(v) => v.to_string().len(),
            GrammarSpec::Lark(t) | GrammarSpec::Gbnf(t) | GrammarSpec::Regex(t) => t.len(),
        };
        if size > MAX_GRAMMAR_BYTES {
            return Err(format!(
                "it is {size} bytes; at most {MAX_GRAMMAR_BYTES} are compiled"
            ));
        }
        let top = spec.top_level()?;
        std::thread::scope(|sc| {
            let worker = std::thread::Builder::new()
                .name("capy-grammar".into())
                .stack_size(COMPILE_STACK)
                .spawn_scoped(sc, || self.compile_here(top))
                .map_err(|e| format!("cannot start the grammar compiler: {e}"))?;
            worker
                .join()
                .unwrap_or_else(|_| Err("the grammar compiler failed on this grammar".into()))
        })
    }

    fn compile_here(&self, top: TopLevelGrammar) -> Result<Grammar, String> {
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| clean_error(&e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(clean_error(&e));
        }
        let g = Grammar {
            matcher,
            eog: Arc::clone(&self.eog),
            env: Arc::clone(&self.env),
            digit_start: Arc::clone(&self.digit_start),
            zero_start: Arc::clone(&self.zero_start),
            digit_run: 0,
            trigger: None,
            next_mask: None,
            dropped: false,
        };
        let mut probe = g.clone();
        match probe.matcher.compute_mask() {
            Ok(m) if !m.is_zero() => {}
            Ok(_) => return Err("the grammar accepts no output".into()),
            Err(e) => {
                let e = e.to_string();
                return Err(if e.contains("NoExtensionBias") {
                    "the grammar accepts no output (a rule or $ref that only refers to itself?)"
                        .into()
                } else {
                    clean_error(&e)
                });
            }
        }
        Ok(g)
    }
}

/// A grammar's failure while generating, for the request (`grammar: ` and the reason).
fn runtime_error(e: &str) -> String {
    if e.contains("NoExtensionBias") {
        "grammar: no output can continue here (a rule or $ref that only refers to itself?)".into()
    } else {
        format!("grammar: {}", clean_error(e))
    }
}

/// The largest grammar or schema compiled, in bytes of its text (a schema's JSON):
/// compiling takes seconds per hundred kilobytes of a wide schema.
pub const MAX_GRAMMAR_BYTES: usize = 256 << 10;

/// The stack of the thread that compiles a grammar (virtual memory: only what the
/// recursion touches is committed).
pub const COMPILE_STACK: usize = 256 << 20;

/// llguidance's message, cut to 500 characters (it may quote the whole grammar).
fn clean_error(e: &str) -> String {
    // (without the parser state llguidance appends)
    let e = e.split("\n<state>").next().unwrap_or(e).trim();
    if e.len() <= 500 {
        return e.to_string();
    }
    let mut end = 500;
    while !e.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} characters more)", &e[..end], e.len() - end)
}

/// One sequence's grammar state.
pub struct Grammar {
    matcher: Matcher,
    eog: Arc<[u32]>,
    env: TokEnv,
    digit_start: Arc<SimpleVob>,
    zero_start: Arc<SimpleVob>,
    /// ASCII digits at the end of the output so far
    digit_run: usize,
    /// a lazy grammar's trigger, until it is seen
    trigger: Option<Trigger>,
    /// the next mask, when [`Grammar::is_finished`] computed it already
    next_mask: Option<SimpleVob>,
    /// the output after the trigger did not fit the grammar: no constraint any more
    dropped: bool,
}

/// What a lazy grammar waits for, and the output bytes seen so far (a trigger may span
/// tokens).
#[derive(Clone, Debug)]
struct Trigger {
    text: Vec<u8>,
    seen: Vec<u8>,
}

impl Clone for Grammar {
    /// A copy in the same state, advancing on its own.
    fn clone(&self) -> Self {
        Grammar {
            matcher: self.matcher.deep_clone(),
            eog: Arc::clone(&self.eog),
            env: Arc::clone(&self.env),
            digit_start: Arc::clone(&self.digit_start),
            zero_start: Arc::clone(&self.zero_start),
            digit_run: self.digit_run,
            trigger: self.trigger.clone(),
            next_mask: self.next_mask.clone(),
            dropped: self.dropped,
        }
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Grammar {
    /// Makes the grammar lazy: it starts after the output contains `trigger`
    /// ([`Grammars::compile_lazy`]). For a grammar in its start state.
    pub fn start_after(&mut self, trigger: &str) {
        self.trigger = Some(Trigger {
            text: trigger.as_bytes().to_vec(),
            seen: Vec::new(),
        });
    }

    /// Whether the grammar constrains the next token (a lazy one only after its trigger).
    pub fn is_active(&self) -> bool {
        self.trigger.is_none() && !self.dropped
    }

    /// The tokens that may come next (one bit per token id). Once the grammar is complete
    /// and nothing more may follow, only end-of-generation tokens. After
    /// [`MAX_DIGIT_RUN`] digits in a row, no token that begins with a digit unless nothing
    /// else is allowed.
    ///
    /// # Errors
    /// The parser's error state (a token it refused was accepted anyway).
    pub fn mask(&mut self) -> Result<SimpleVob, String> {
        match self.next_mask.take() {
            Some(m) => Ok(m),
            None => self.compute(),
        }
    }

    fn compute(&mut self) -> Result<SimpleVob, String> {
        let t = Instant::now();
        let m = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| runtime_error(&e.to_string()));
        MASK_TIMES.observe(t.elapsed().as_secs_f64());
        let mut m = m?;
        if self.digit_run >= MAX_DIGIT_RUN && !m.and_is_zero(&self.digit_start) {
            // no more digits; where only digits may follow (`0.000...` below an exclusive
            // minimum of 0), none that begins with 0, so a nonzero digit ends the number
            for cut_by in [&self.digit_start, &self.zero_start] {
                let mut cut = m.clone();
                cut.sub(cut_by);
                if !cut.is_zero() {
                    m = cut;
                    break;
                }
            }
        }
        Ok(m)
    }

    /// Advances past a chosen token. An end-of-generation token is not fed (it ends the
    /// sequence).
    ///
    /// # Errors
    /// The grammar does not allow the token.
    pub fn accept(&mut self, id: u32) -> Result<(), String> {
        self.next_mask = None;
        if self.dropped || self.matcher.is_stopped() || self.eog.contains(&id) {
            return Ok(());
        }
        if let Some(t) = self.trigger.as_mut() {
            t.seen.extend_from_slice(self.env.tok_trie().token(id));
            let Some(at) = t.seen.windows(t.text.len()).position(|w| w == t.text) else {
                // keep only what a trigger could still start in
                let keep = t.text.len().saturating_sub(1);
                if t.seen.len() > keep {
                    t.seen.drain(..t.seen.len() - keep);
                }
                return Ok(());
            };
            // the grammar starts after the trigger, with the bytes that followed it
            let rest = t.seen[at + t.text.len()..].to_vec();
            self.trigger = None;
            let toks = self.env.tok_trie().greedy_tokenize(&rest);
            if self.matcher.consume_tokens(&toks).is_err() {
                self.dropped = true;
            }
            return Ok(());
        }
        let bytes = self.env.tok_trie().token(id);
        let tail = bytes
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_digit())
            .count();
        self.digit_run = if tail == bytes.len() {
            self.digit_run + tail
        } else {
            tail
        };
        self.matcher
            .consume_token(id)
            .map_err(|e| runtime_error(&e.to_string()))
    }

    /// Whether the output is complete and nothing may follow but the end (`root ::= "ab"`
    /// after `ab`): the sequence ends there, as if the model had ended it.
    ///
    /// # Errors
    /// As [`Grammar::mask`] (the next mask is computed here, and kept for it).
    pub fn is_finished(&mut self) -> Result<bool, String> {
        if !self.is_active() {
            return Ok(false);
        }
        if self.matcher.is_stopped() {
            return Ok(true);
        }
        let m = match self.next_mask.take() {
            Some(m) => m,
            None => self.compute()?,
        };
        let ends = self.eog.iter().filter(|&&t| m.is_allowed(t)).count();
        let finished = ends > 0 && ends == m.num_set();
        self.next_mask = Some(m);
        Ok(finished)
    }

    /// Whether the output so far is complete (end-of-generation is allowed).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

/// Upper bounds (seconds) of [`MASK_TIMES`]'s buckets.
pub const MASK_BUCKETS: [f64; 10] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
];

/// How long computing token masks took, over the whole process (every model, every
/// sequence): counts per bucket of [`MASK_BUCKETS`] (and one past the last), their sum and
/// count. The server exports it as `capy_grammar_mask_seconds`.
pub struct MaskTimes {
    buckets: [AtomicU64; MASK_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// The process's mask times.
pub static MASK_TIMES: MaskTimes = MaskTimes {
    buckets: [const { AtomicU64::new(0) }; MASK_BUCKETS.len() + 1],
    sum_ns: AtomicU64::new(0),
};

impl MaskTimes {
    fn observe(&self, secs: f64) {
        let i = MASK_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(MASK_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
    }

    /// Counts per bucket (the last: slower than every bound) and the total seconds.
    pub fn snapshot(&self) -> ([u64; MASK_BUCKETS.len() + 1], f64) {
        let mut c = [0; MASK_BUCKETS.len() + 1];
        for (c, b) in c.iter_mut().zip(&self.buckets) {
            *c = b.load(Ordering::Relaxed);
        }
        (c, self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

/// Sets the logits of tokens the mask does not allow to `-inf`; `row` is `[n_vocab]`.
pub fn apply_mask(mask: &SimpleVob, row: &mut [f32]) {
    // 32 tokens per word of the mask: whole words allowed or refused at once
    let words = mask.as_slice();
    for (wi, chunk) in row.chunks_mut(32).enumerate() {
        let w = words.get(wi).copied().unwrap_or(0);
        if w == u32::MAX {
            continue;
        }
        if w == 0 {
            chunk.fill(f32::NEG_INFINITY);
            continue;
        }
        for (b, x) in chunk.iter_mut().enumerate() {
            if w & (1 << b) == 0 {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Translates a GBNF grammar (llama.cpp's `grammars/README.md`) into llguidance's Lark:
/// `name ::= body` rules (a rule's body may run over several lines), `"literals"` with
/// GBNF's escapes, `[character classes]` (negated with `^`), `.` for any character, grouping,
/// `|`, `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}` and `#` comments. `root` is the start rule.
///
/// # Errors
/// Unbalanced quotes or brackets, a stray character, no `root` rule, an undefined rule.
pub fn gbnf_to_lark(src: &str) -> Result<String, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    // rule name, body in Lark
    let mut rules: Vec<(String, String)> = Vec::new();
    let mut used: Vec<String> = Vec::new();
    let line_of = |pos: usize| chars[..pos].iter().filter(|&&c| c == '\n').count() + 1;
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let lark_name = |n: &str| format!("g-{}", n.to_ascii_lowercase().replace('_', "-"));
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if is_name(c) {
            let start = i;
            while i < chars.len() && is_name(chars[i]) {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            // a definition when `::=` follows
            let mut j = i;
            while j < chars.len() && (chars[j] == ' ' || chars[j] == '\t') {
                j += 1;
            }
            if chars[j..].starts_with(&[':', ':', '=']) {
                if rules.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
                    return Err(format!(
                        "GBNF line {}: rule {name:?} is defined twice",
                        line_of(start)
                    ));
                }
                rules.push((name, String::new()));
                i = j + 3;
                continue;
            }
            let body = current(&mut rules, line_of(start))?;
            body.push(' ');
            body.push_str(&lark_name(&name));
            used.push(name);
        } else if c == '"' {
            let line = line_of(i);
            i += 1;
            let mut lit = String::new();
            loop {
                let Some(&c) = chars.get(i) else {
                    return Err(format!("GBNF line {line}: unterminated string"));
                };
                i += 1;
                match c {
                    '"' => break,
                    '\\' => {
                        let (ch, n) = gbnf_escape(&chars[i..])
                            .ok_or_else(|| format!("GBNF line {line}: bad escape in a string"))?;
                        lit.push(ch);
                        i += n;
                    }
                    c => lit.push(c),
                }
            }
            let body = current(&mut rules, line)?;
            body.push(' ');
            if lit.is_empty() {
                body.push_str("\"\"");
            } else {
                body.push_str(&serde_json::to_string(&lit).unwrap_or_default());
            }
        } else if c == '[' {
            let line = line_of(i);
            let start = i;
            i += 1;
            let mut class = String::from("[");
            loop {
                let Some(&c) = chars.get(i) else {
                    return Err(format!("GBNF line {line}: unterminated character class"));
                };
                i += 1;
                match c {
                    ']' if i - 1 > start + 1
                        && !(i - 2 == start + 1 && chars[start + 1] == '^') =>
                    {
                        class.push(']');
                        break;
                    }
                    '\\' => {
                        let (ch, n) = gbnf_escape(&chars[i..]).ok_or_else(|| {
                            format!("GBNF line {line}: bad escape in a character class")
                        })?;
                        i += n;
                        push_class_char(&mut class, ch);
                    }
                    c => push_class_char(&mut class, c),
                }
            }
            let body = current(&mut rules, line)?;
            body.push_str(" /");
            body.push_str(&class);
            body.push('/');
        } else if c == '.' {
            let body = current(&mut rules, line_of(i))?;
            body.push_str(" /(?s:.)/");
            i += 1;
        } else if "()|*+?".contains(c) {
            let body = current(&mut rules, line_of(i))?;
            body.push(' ');
            body.push(c);
            i += 1;
        } else if c == '{' {
            let line = line_of(i);
            let end = chars[i..]
                .iter()
                .position(|&c| c == '}')
                .ok_or_else(|| format!("GBNF line {line}: unterminated {{m,n}}"))?;
            let inner: String = chars[i + 1..i + end].iter().collect();
            let inner: String = inner.chars().filter(|c| !c.is_whitespace()).collect();
            if inner.is_empty() || !inner.chars().all(|c| c.is_ascii_digit() || c == ',') {
                return Err(format!("GBNF line {line}: bad repetition {{{inner}}}"));
            }
            let body = current(&mut rules, line)?;
            body.push_str(&format!("{{{inner}}}"));
            i += end + 1;
        } else {
            return Err(format!(
                "GBNF line {}: unexpected character {c:?}",
                line_of(i)
            ));
        }
    }
    if !rules.iter().any(|(n, _)| n == "root") {
        return Err("the GBNF grammar has no root rule".into());
    }
    for u in &used {
        if !rules.iter().any(|(n, _)| n == u) {
            return Err(format!(
                "the GBNF grammar uses rule {u:?} but does not define it"
            ));
        }
    }
    let mut out = format!("start: {}\n", lark_name("root"));
    for (name, body) in &rules {
        let body = body.trim();
        if body.is_empty() {
            return Err(format!("GBNF rule {name:?} is empty"));
        }
        out.push_str(&format!("{}: {body}\n", lark_name(name)));
    }
    Ok(out)
}

/// The body of the rule being defined.
fn current(rules: &mut [(String, String)], line: usize) -> Result<&mut String, String> {
    rules
        .last_mut()
        .map(|(_, b)| b)
        .ok_or_else(|| format!("GBNF line {line}: text before the first rule (name ::= ...)"))
}

/// A GBNF escape after its backslash: the character and how many characters it took.
fn gbnf_escape(s: &[char]) -> Option<(char, usize)> {
    let hex = |n: usize| -> Option<(char, usize)> {
        let h: String = s.get(1..1 + n)?.iter().collect();
        let v = u32::from_str_radix(&h, 16).ok()?;
        Some((char::from_u32(v)?, 1 + n))
    };
    match s.first()? {
        'n' => Some(('\n', 1)),
        't' => Some(('\t', 1)),
        'r' => Some(('\r', 1)),
        'x' => hex(2),
        'u' => hex(4),
        'U' => hex(8),
        &c @ ('\\' | '"' | '[' | ']' | '-' | '^' | '/') => Some((c, 1)),
        _ => None,
    }
}

/// A character inside a regex class, escaped where the class or Lark's `/.../` needs it.
fn push_class_char(class: &mut String, c: char) {
    match c {
        '\\' | ']' | '[' | '/' => {
            class.push('\\');
            class.push(c);
        }
        '\n' => class.push_str("\\n"),
        '\t' => class.push_str("\\t"),
        '\r' => class.push_str("\\r"),
        c if (c as u32) < 0x20 => class.push_str(&format!("\\x{{{:x}}}", c as u32)),
        c => class.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gbnf_translates_rules_literals_classes_and_repeats() {
        let g = r#"
# a list of answers
root ::= "answer: " item ("," item){0,3} "\n"
item ::= [a-z0-9_-]+ | "\"q\"" | [^\]x]
  | . ?
"#;
        let lark = gbnf_to_lark(g).unwrap();
        assert!(lark.starts_with("start: g-root\n"), "{lark}");
        assert!(
            lark.contains(r#"g-root: "answer: " g-item ( "," g-item ){0,3} "\n""#),
            "{lark}"
        );
        assert!(
            lark.contains(r#"g-item: /[a-z0-9_-]/ + | "\"q\"" | /[^\]x]/ | /(?s:.)/ ?"#),
            "{lark}"
        );
    }

    #[test]
    fn gbnf_errors_name_the_problem() {
        for (g, want) in [
            ("item ::= \"x\"", "no root rule"),
            ("root ::= other", "does not define"),
            ("root ::= \"x", "unterminated string"),
            ("root ::= [a-z", "unterminated character class"),
            ("\"x\" root ::= \"y\"", "before the first rule"),
            ("root ::= \"a\" ; ", "unexpected character"),
            ("root ::= \"a\"\nroot ::= \"b\"", "defined twice"),
            ("root ::= \"a\"{x}", "bad repetition"),
        ] {
            let e = gbnf_to_lark(g).unwrap_err();
            assert!(e.contains(want), "{g:?}: {e}");
        }
    }
}
