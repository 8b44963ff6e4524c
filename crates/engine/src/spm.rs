//! SentencePiece-style tokenization over scored pieces (llama.cpp's `llama` vocabulary), and
//! the compact piece table both vocabulary kinds use to look pieces up.
//!
//! The text (spaces already turned into `▁`) starts as one symbol per UTF-8 character; the
//! adjacent pair whose concatenation is the highest-scoring piece is merged (ties: leftmost
//! first) until no pair forms a piece. A final symbol is its piece's id, or, for a single
//! character outside the vocabulary, the byte tokens `<0xXX>` of its UTF-8 bytes.
//!
//! Memory is the point of doing this here rather than with a general BPE: a 262k-piece
//! vocabulary takes a few MB as flat arrays and an open-addressing index, where a merge table
//! derived from the scores (every split of every piece) and string-keyed maps took ~70 MB.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Piece texts in one buffer with an open-addressing index from text to id.
#[derive(Debug, Default)]
pub struct PieceTable {
    /// piece `i` is `text[off[i]..off[i + 1]]`
    text: Vec<u8>,
    off: Vec<u32>,
    /// ids by hash of their text, `u32::MAX` = empty; a power of two at most half full
    index: Vec<u32>,
}

fn hash(s: &[u8]) -> u64 {
    // FNV-1a, then a multiply to spread the low bits used as the slot
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl PieceTable {
    /// The table of `pieces`; a text that occurs twice maps to its first id.
    pub fn new(pieces: &[String]) -> PieceTable {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let mut text = Vec::with_capacity(total);
        let mut off = Vec::with_capacity(pieces.len() + 1);
        off.push(0u32);
        for p in pieces {
            text.extend_from_slice(p.as_bytes());
            off.push(text.len() as u32);
        }
        let size = (pieces.len() * 2).next_power_of_two().max(16);
        let mut t = PieceTable {
            text,
            off,
            index: vec![u32::MAX; size],
        };
        for id in 0..pieces.len() as u32 {
            let mask = t.index.len() - 1;
            let mut slot = (hash(t.bytes(id)) as usize) & mask;
            loop {
                let cur = t.index[slot];
                if cur == u32::MAX {
                    t.index[slot] = id;
                    break;
                }
                if t.bytes(cur) == t.bytes(id) {
                    break;
                }
                slot = (slot + 1) & mask;
            }
        }
        t
    }

    pub fn len(&self) -> usize {
        self.off.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text of piece `id` (empty when out of range).
    pub fn bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.off.get(i), self.off.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.text[a as usize..b as usize],
            _ => &[],
        }
    }

    pub fn get(&self, piece: &[u8]) -> Option<u32> {
        let mask = self.index.len() - 1;
        let mut slot = (hash(piece) as usize) & mask;
        loop {
            let id = *self.index.get(slot)?;
            if id == u32::MAX {
                return None;
            }
            if self.bytes(id) == piece {
                return Some(id);
            }
            slot = (slot + 1) & mask;
        }
    }
}

/// A candidate merge of the neighbouring symbols `left` and `right`, `len` bytes in all.
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Highest score first, then the leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// A run of the text: bytes `start..start + len`; `len == 0` once merged into its left
/// neighbour.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// The SentencePiece encoder: pieces, their scores and the byte-fallback tokens.
#[derive(Debug)]
pub struct Spm {
    scores: Vec<f32>,
    /// `<0xXX>` token of each byte, if the vocabulary has it
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
}

impl Spm {
    pub fn new(pieces: &PieceTable, scores: Vec<f32>, unk: Option<u32>) -> Spm {
        let byte_tokens = std::array::from_fn(|b| pieces.get(format!("<0x{b:02X}>").as_bytes()));
        Spm {
            scores,
            byte_tokens,
            unk,
        }
    }

    /// Token ids of `text` (spaces already written as `▁`), appended to `out`.
    pub fn encode(&self, pieces: &PieceTable, text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let try_add = |queue: &mut BinaryHeap<Bigram>, syms: &[Symbol], left: usize| {
            let Some(right) = syms[left].next else { return };
            let (a, b) = (syms[left], syms[right]);
            let len = a.len + b.len;
            if let Some(id) = pieces.get(&bytes[a.start..a.start + len]) {
                let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
                queue.push(Bigram {
                    score,
                    left,
                    right,
                    len,
                });
            }
        };
        for i in 0..syms.len().saturating_sub(1) {
            try_add(&mut queue, &syms, i);
        }
        while let Some(bg) = queue.pop() {
            let (left, right) = (bg.left, bg.right);
            // stale: one side has changed since this pair was queued
            if syms[left].len == 0
                || syms[right].len == 0
                || syms[left].len + syms[right].len != bg.len
            {
                continue;
            }
            syms[left].len = bg.len;
            syms[right].len = 0;
            syms[left].next = syms[right].next;
            if let Some(n) = syms[right].next {
                syms[n].prev = Some(left);
            }
            if let Some(p) = syms[left].prev {
                try_add(&mut queue, &syms, p);
            }
            try_add(&mut queue, &syms, left);
        }
        let mut at = if syms.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let s = syms[i];
            let piece = &bytes[s.start..s.start + s.len];
            match pieces.get(piece) {
                Some(id) => out.push(id),
                None => {
                    for &b in piece {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            at = s.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32)]) -> (PieceTable, Spm) {
        let mut all: Vec<String> = pieces.iter().map(|p| p.0.to_string()).collect();
        let mut scores: Vec<f32> = pieces.iter().map(|p| p.1).collect();
        for b in 0..256 {
            all.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
        }
        let t = PieceTable::new(&all);
        let spm = Spm::new(&t, scores, None);
        (t, spm)
    }

    fn encode(t: &PieceTable, spm: &Spm, s: &str) -> Vec<String> {
        let mut ids = Vec::new();
        spm.encode(t, s, &mut ids);
        ids.iter()
            .map(|&i| String::from_utf8_lossy(t.bytes(i)).into_owned())
            .collect()
    }

    #[test]
    fn piece_table_finds_every_piece_and_nothing_else() {
        let pieces: Vec<String> = (0..5000)
            .map(|i| format!("p{i}"))
            .chain(["p7".into()])
            .collect();
        let t = PieceTable::new(&pieces);
        for (i, p) in pieces.iter().enumerate().take(5000) {
            assert_eq!(t.get(p.as_bytes()), Some(i as u32));
        }
        assert_eq!(t.get(b"p7"), Some(7), "a duplicate maps to its first id");
        assert_eq!(t.get(b"q1"), None);
        assert_eq!(t.get(b""), None);
        assert_eq!(t.bytes(99_999), b"");
    }

    #[test]
    fn highest_score_merges_first_and_ties_go_left() {
        let base = [("a", 0.0), ("b", 0.0), ("c", 0.0), ("ab", 1.0), ("bc", 2.0)];
        // bc (2.0) beats ab (1.0), and a + bc is no piece
        let (t, spm) = vocab(&base);
        assert_eq!(encode(&t, &spm, "abc"), ["a", "bc"]);
        // with abc a piece, a + bc merges next
        let (t, spm) = vocab(&[base.as_slice(), &[("abc", 0.5)]].concat());
        assert_eq!(encode(&t, &spm, "abc"), ["abc"]);
        // with only ab and abc: ab first, then ab + c
        let (t, spm) = vocab(&[
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("ab", 1.0),
            ("abc", 0.5),
        ]);
        assert_eq!(encode(&t, &spm, "abcc"), ["abc", "c"]);
        let (t, spm) = vocab(&[("a", 0.0), ("aa", 1.0)]);
        // equal scores: the leftmost pair merges first
        assert_eq!(encode(&t, &spm, "aaa"), ["aa", "a"]);
        assert_eq!(encode(&t, &spm, "aaaa"), ["aa", "aa"]);
    }

    #[test]
    fn merges_chain_and_unknown_characters_fall_back_to_bytes() {
        let (t, spm) = vocab(&[
            ("\u{2581}", 0.0),
            ("h", 0.0),
            ("i", 0.0),
            ("hi", 1.0),
            ("\u{2581}hi", 2.0),
        ]);
        assert_eq!(encode(&t, &spm, "\u{2581}hi"), ["\u{2581}hi"]);
        assert_eq!(
            encode(&t, &spm, "hé"),
            ["h", "<0xC3>", "<0xA9>"],
            "é is outside the vocabulary"
        );
        assert!(encode(&t, &spm, "").is_empty());
    }
}
