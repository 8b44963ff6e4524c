//! Tokenizer built from the GGUF vocabulary.
//!
//! Two vocabulary kinds, as llama.cpp names them:
//! * `gpt2`: byte-level BPE with merges and a regex pre-tokenizer chosen by
//!   `tokenizer.ggml.pre`;
//! * `llama`: SentencePiece-style merging of scored pieces with `▁` for spaces and byte
//!   fallback ([`crate::spm`]: a pair merges with the score of the piece it forms).
//!
//! The `tokenizers` crate runs the byte-level BPE; pieces are looked up in a compact
//! [`PieceTable`]. Special tokens are split out first with llama.cpp's
//! rule (longest text first; user-defined tokens always, control tokens only when
//! `parse_special`), and decoding goes through a table of each token's bytes so partial
//! UTF-8 sequences can be streamed.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use capy_gguf::{Array, Gguf};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::grammar::Grammars;
use crate::spm::{PieceTable, Spm};
use crate::{Error, Result};

/// llama.cpp token types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> TokenType {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// byte-level BPE (`tokenizer.ggml.model = gpt2`)
    Bpe,
    /// SentencePiece-style (`tokenizer.ggml.model = llama`)
    Spm,
}

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer regexes for a `tokenizer.ggml.pre` value, applied in order.
fn pre_regexes(pre: &str) -> Vec<&'static str> {
    match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            vec![r"\p{N}", GPT2_REGEX]
        }
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" => vec![LLAMA3_REGEX],
        "qwen2" | "deepseek-r1-qwen" | "qwen3" => vec![QWEN2_REGEX],
        _ => vec![GPT2_REGEX],
    }
}

/// GPT-2's byte -> printable char table used by byte-level BPE.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
            c
        };
    }
    table
}

pub struct Tokenizer {
    kind: VocabKind,
    /// byte-level BPE (`gpt2` vocabularies)
    bpe: Option<tokenizers::Tokenizer>,
    /// SentencePiece merging (`llama` vocabularies)
    spm: Option<Spm>,
    pieces: PieceTable,
    n_vocab: usize,
    types: Vec<TokenType>,
    /// bytes each token decodes to (control tokens: their text, used only when rendering),
    /// token i at `bytes[offsets[i]..offsets[i + 1]]`
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    /// the longest token's bytes (at least 1)
    max_token_bytes: usize,
    /// special tokens by decreasing text length
    specials: Vec<(String, u32, TokenType)>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    add_space_prefix: bool,
    /// tokens that end a generation (EOS, EOT and their like)
    eog: Vec<u32>,
    /// the grammar compiler, built on first use (a token trie over the whole vocabulary)
    grammars: OnceLock<Result<Arc<Grammars>, String>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("n_vocab", &self.n_vocab)
            .finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let model = g
            .get_str("tokenizer.ggml.model")?
            .unwrap_or("llama")
            .to_string();
        let tokens: &[String] = match g.get_array("tokenizer.ggml.tokens")? {
            Some(Array::String(v)) => v,
            _ => {
                return Err(Error::Tokenizer(
                    "tokenizer.ggml.tokens missing or not strings".into(),
                ))
            }
        };
        let n = tokens.len();
        let types: Vec<TokenType> = match g.get_array("tokenizer.ggml.token_type")? {
            Some(a) => a
                .to_i64_vec()
                .ok_or_else(|| Error::Tokenizer("token_type is not integers".into()))?
                .into_iter()
                .map(TokenType::from_i64)
                .collect(),
            None => vec![TokenType::Normal; n],
        };
        if types.len() != n {
            return Err(Error::Tokenizer(format!(
                "{} token types for {n} tokens",
                types.len()
            )));
        }
        let id = |k: &str| -> Result<Option<u32>> {
            Ok(g.get_i64(k)?
                .filter(|&v| v >= 0 && (v as usize) < n)
                .map(|v| v as u32))
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let eot = id("tokenizer.ggml.eot_token_id")?;
        let unk = id("tokenizer.ggml.unknown_token_id")?;
        let kind = match model.as_str() {
            "gpt2" => VocabKind::Bpe,
            "llama" => VocabKind::Spm,
            other => {
                return Err(Error::Tokenizer(format!(
                    "unsupported tokenizer model {other:?}"
                )))
            }
        };
        let add_bos = g
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(kind == VocabKind::Spm);
        let add_eos = g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix = g
            .get_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(kind == VocabKind::Spm);

        let pieces = PieceTable::new(tokens);
        let (bpe, spm) = match kind {
            VocabKind::Bpe => {
                // piece -> id (first id wins for duplicated pieces)
                let mut vocab: tokenizers::models::bpe::Vocab = Default::default();
                vocab.reserve(n);
                for (i, t) in tokens.iter().enumerate() {
                    vocab.entry(t.clone()).or_insert(i as u32);
                }
                let merges = match g.get_array("tokenizer.ggml.merges")? {
                    Some(Array::String(v)) => v
                        .iter()
                        .filter_map(|m| {
                            m.split_once(' ')
                                .map(|(a, b)| (a.to_string(), b.to_string()))
                        })
                        .collect::<Vec<_>>(),
                    _ => return Err(Error::Tokenizer("BPE vocabulary without merges".into())),
                };
                let pre = g.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
                let ignore_merges = matches!(pre, "llama3" | "llama-bpe" | "llama-v3");
                let model = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(ignore_merges)
                    .build()
                    .map_err(tk_err)?;
                let mut pres: Vec<PreTokenizerWrapper> = Vec::new();
                for re in pre_regexes(pre) {
                    let split = Split::new(
                        SplitPattern::Regex(re.to_string()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(tk_err)?;
                    pres.push(split.into());
                }
                pres.push(ByteLevel::new(false, false, false).into());
                let mut tk = tokenizers::Tokenizer::new(model);
                tk.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(pres))));
                (Some(tk), None)
            }
            VocabKind::Spm => {
                let scores: Vec<f32> = match g.get_array("tokenizer.ggml.scores")? {
                    Some(Array::F32(v)) if v.len() == n => v.clone(),
                    _ => vec![0.0; n],
                };
                (None, Some(Spm::new(&pieces, scores, unk)))
            }
        };

        // bytes of each token for decoding
        let byte_of: HashMap<char, u8> = byte_to_char_table()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut bytes: Vec<u8> = Vec::new();
        let mut offsets: Vec<u32> = Vec::with_capacity(n + 1);
        offsets.push(0);
        let per_token = tokens.iter().zip(&types).map(|(t, ty)| match (kind, ty) {
            (_, TokenType::Control | TokenType::UserDefined | TokenType::Unknown) => {
                t.as_bytes().to_vec()
            }
            (VocabKind::Spm, TokenType::Byte) => {
                parse_byte_token(t).map(|b| vec![b]).unwrap_or_default()
            }
            (VocabKind::Spm, _) => t.replace('\u{2581}', " ").into_bytes(),
            (VocabKind::Bpe, _) => t
                .chars()
                .map(|c| byte_of.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| t.as_bytes().to_vec()),
        });
        for b in per_token {
            bytes.extend_from_slice(&b);
            offsets.push(bytes.len() as u32);
        }
        bytes.shrink_to_fit();

        let mut specials: Vec<(String, u32, TokenType)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, ty))| {
                !t.is_empty()
                    && matches!(
                        ty,
                        TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                    )
            })
            .map(|(i, (t, ty))| (t.clone(), i as u32, *ty))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        // end-of-generation tokens
        let mut eog: Vec<u32> = [eos, eot].into_iter().flatten().collect();
        const EOG_TEXTS: [&str; 8] = [
            "<|im_end|>",
            "<end_of_turn>",
            "<|eot_id|>",
            "<|endoftext|>",
            "<|end|>",
            "<|end_of_text|>",
            "<|eom_id|>",
            "</s>",
        ];
        for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == TokenType::Control
                && EOG_TEXTS.contains(&t.as_str())
                && !eog.contains(&(i as u32))
            {
                eog.push(i as u32);
            }
        }

        Ok(Tokenizer {
            kind,
            bpe,
            spm,
            pieces,
            n_vocab: n,
            types,
            bytes,
            max_token_bytes: offsets
                .windows(2)
                .map(|w| (w[1] - w[0]) as usize)
                .max()
                .unwrap_or(1)
                .max(1),
            offsets,
            specials,
            bos,
            eos,
            add_bos,
            add_eos,
            add_space_prefix,
            eog,
            grammars: OnceLock::new(),
        })
    }

    /// The grammar compiler for this vocabulary (structured outputs), built on the first
    /// call (tens of milliseconds for a 262k vocabulary) and kept.
    ///
    /// # Errors
    /// A vocabulary llguidance cannot take (no end-of-generation token).
    pub fn grammars(&self) -> std::result::Result<Arc<Grammars>, String> {
        self.grammars
            .get_or_init(|| Grammars::new(self).map(Arc::new))
            .clone()
    }

    /// The most bytes of text one token stands for: a text of `n` bytes has at least
    /// `n / max_token_bytes()` tokens, so an over-long prompt can be refused before it is
    /// tokenized.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Does this token end a generation?
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn eog_tokens(&self) -> &[u32] {
        &self.eog
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// The vocabulary entry of a token.
    pub fn piece(&self, id: u32) -> Option<String> {
        ((id as usize) < self.pieces.len())
            .then(|| String::from_utf8_lossy(self.pieces.bytes(id)).into_owned())
    }

    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.pieces.get(piece.as_bytes())
    }

    /// Text to token ids. `add_special` adds BOS/EOS as the model wants; `parse_special`
    /// turns control-token text into the token.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        self.encode_where(text, add_special, parse_special, &[])
    }

    /// A rendered chat prompt to token ids: control-token text becomes the token only outside
    /// `literal` (the byte ranges that came from message content, as
    /// [`crate::ChatTemplate::render_marked`] gives them), so a message cannot forge the
    /// template's markup. Text around the ranges is tokenized as [`Tokenizer::encode`] would,
    /// so a prompt whose messages hold no control text gets the same ids.
    ///
    /// # Errors
    /// As [`Tokenizer::encode`].
    pub fn encode_chat(
        &self,
        text: &str,
        add_special: bool,
        literal: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        self.encode_where(text, add_special, true, literal)
    }

    fn encode_where(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        literal: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        let mut prev_special = true;
        for frag in self.partition(text, parse_special, literal) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(s) => {
                    let owned;
                    let s = if self.kind == VocabKind::Spm && self.add_space_prefix && prev_special
                    {
                        owned = format!(" {s}");
                        owned.as_str()
                    } else {
                        s
                    };
                    match (&self.bpe, &self.spm) {
                        (_, Some(spm)) => {
                            spm.encode(&self.pieces, &s.replace(' ', "\u{2581}"), &mut out)
                        }
                        (Some(bpe), None) => {
                            let enc = bpe.encode_fast(s, false).map_err(tk_err)?;
                            out.extend_from_slice(enc.get_ids());
                        }
                        (None, None) => {}
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            if let Some(e) = self.eos {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Splits text around special tokens, longest token text first (llama.cpp's rule). A
    /// control token's match that overlaps a `literal` byte range stays text.
    fn partition<'a>(
        &self,
        text: &'a str,
        parse_special: bool,
        literal: &[std::ops::Range<usize>],
    ) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        let base = text.as_ptr() as usize;
        for (sp, id, ty) in &self.specials {
            // user-defined tokens (Gemma's runs of spaces) match everywhere, as in llama.cpp;
            // control text only where special parsing is on, and never inside `literal`
            let control = matches!(ty, TokenType::Control | TokenType::Unknown);
            if !parse_special && control {
                continue;
            }
            let allowed = |start: usize, end: usize| {
                !control || !literal.iter().any(|r| r.start < end && start < r.end)
            };
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(sp.as_str())))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(t) => {
                        // offset of t in text: fragments are slices of it
                        let off = t.as_ptr() as usize - base;
                        let (mut start, mut from) = (0, 0);
                        while let Some(rel) = t[from..].find(sp.as_str()) {
                            let at = from + rel;
                            if allowed(off + at, off + at + sp.len()) {
                                if at > start {
                                    next.push(Fragment::Text(&t[start..at]));
                                }
                                next.push(Fragment::Token(*id));
                                start = at + sp.len();
                                from = start;
                            } else {
                                // past this match's first character
                                from = at + t[at..].chars().next().map_or(1, char::len_utf8);
                            }
                        }
                        if start < t.len() {
                            next.push(Fragment::Text(&t[start..]));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes a token stands for. Control tokens give their text only when
    /// `render_special`, otherwise nothing.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> &[u8] {
        match self.types.get(id as usize) {
            None => &[],
            Some(TokenType::Control) if !render_special => &[],
            Some(_) => {
                let i = id as usize;
                &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
            }
        }
    }

    /// Token ids to text (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32], render_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id, render_special));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Assembles streamed token bytes into text, holding back an incomplete UTF-8 tail.
#[derive(Default, Debug)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes and returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) => match e.error_len() {
                // an invalid sequence (not just a cut one): emit it lossily
                Some(_) => {
                    let s = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    return s;
                }
                None => e.valid_up_to(),
            },
        };
        let rest = self.pending.split_off(valid);

        String::from_utf8(std::mem::replace(&mut self.pending, rest)).unwrap_or_default()
    }

    /// Whatever is left, lossily.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char_table();
        let mut seen = std::collections::HashSet::new();
        for c in t {
            assert!(seen.insert(c));
        }
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], '\u{120}');
        assert_eq!(t[b'\n' as usize], '\u{10A}');
    }

    #[test]
    fn utf8_stream_holds_partial_chars() {
        let mut s = Utf8Stream::default();
        let pizza = "🍕".as_bytes();
        assert_eq!(s.push(&pizza[..2]), "");
        assert_eq!(s.push(&pizza[2..]), "🍕");
        assert_eq!(s.push(b"ab"), "ab");
        assert_eq!(s.push(&[0xF0]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xFF>"), Some(255));
        assert_eq!(parse_byte_token("0x0A"), None);
    }
}
