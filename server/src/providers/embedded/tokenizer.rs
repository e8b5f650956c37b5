//! Text to tokens and back, from the vocabulary the GGUF file carries
//! (`tokenizer.ggml.*`), so a model file is all the provider needs.
//!
//! Two kinds, as llama.cpp names them in `tokenizer.ggml.model`:
//! - `llama`: SentencePiece BPE. Spaces become `▁`, a space is put before the
//!   text (`add_space_prefix`), adjacent pieces merge highest `scores` first,
//!   and a piece missing from the vocabulary falls back to its bytes
//!   (`<0xNN>` tokens).
//! - `gpt2`: byte-level BPE. Text is split by the pre-tokenizer regex of
//!   `tokenizer.ggml.pre` (`qwen2`, `llama3`/`llama-bpe`/`smaug-bpe`, else
//!   GPT-2's), each byte maps to a printable character, and pairs merge in
//!   `tokenizer.ggml.merges` order.
//!
//! Control and user-defined tokens written in the prompt (a chat template's
//! `<|im_start|>`) are matched as themselves before either algorithm runs,
//! as llama.cpp does with special-token parsing on.
//!
//! Limits, compared with llama.cpp: no Unicode normalisation (`qwen2` asks
//! for NFC; text already in NFC, as most is, tokenizes the same), only the
//! three pre-tokenizer regexes above, and no `bert`/`t5`/`rwkv` vocabularies.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

use candle_core::quantized::gguf_file::Value;

/// `tokenizer.ggml.token_type`, as llama.cpp numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// How text is cut into tokens.
enum Kind {
    /// SentencePiece BPE (`llama`).
    Spm { add_space_prefix: bool },
    /// Byte-level BPE (`gpt2`).
    Bpe {
        split: fancy_regex::Regex,
        merges: HashMap<(String, String), usize>,
    },
}

/// Tokens whose text ends a turn in common chat formats; llama.cpp treats
/// them as end of generation too when the vocabulary has them.
const END_OF_TURN_TEXTS: [&str; 9] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
];

/// A GGUF file's tokenizer.
pub(crate) struct Tokenizer {
    kind: Kind,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    index: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    specials: Vec<(String, u32)>,
    /// `<0xNN>` tokens by byte (SentencePiece byte fallback).
    byte_tokens: Vec<Option<u32>>,
    /// Byte-level BPE: printable character -> byte.
    char_to_byte: HashMap<char, u8>,
    /// Byte-level BPE: byte -> printable character.
    byte_to_char: Vec<char>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    end_of_generation: HashSet<u32>,
}

fn meta<'a>(md: &'a HashMap<String, Value>, key: &str) -> Option<&'a Value> {
    md.get(key)
}

fn as_u32(v: &Value) -> Option<u32> {
    match v {
        Value::U8(v) => Some(u32::from(*v)),
        Value::I8(v) => u32::try_from(*v).ok(),
        Value::U16(v) => Some(u32::from(*v)),
        Value::I16(v) => u32::try_from(*v).ok(),
        Value::U32(v) => Some(*v),
        Value::I32(v) => u32::try_from(*v).ok(),
        Value::U64(v) => u32::try_from(*v).ok(),
        Value::I64(v) => u32::try_from(*v).ok(),
        Value::F32(_) | Value::F64(_) | Value::Bool(_) | Value::String(_) | Value::Array(_) => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::U8(v) => Some(i64::from(*v)),
        Value::I8(v) => Some(i64::from(*v)),
        Value::U16(v) => Some(i64::from(*v)),
        Value::I16(v) => Some(i64::from(*v)),
        Value::U32(v) => Some(i64::from(*v)),
        Value::I32(v) => Some(i64::from(*v)),
        Value::U64(v) => i64::try_from(*v).ok(),
        Value::I64(v) => Some(*v),
        Value::F32(_) | Value::F64(_) | Value::Bool(_) | Value::String(_) | Value::Array(_) => None,
    }
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, String> {
    let Some(Value::Array(items)) = meta(md, key) else {
        return Err(format!("the file has no `{key}` array"));
    };
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(format!("`{key}` holds a value that is not a string")),
        })
        .collect()
}

fn token_id(md: &HashMap<String, Value>, key: &str, n_tokens: usize) -> Option<u32> {
    meta(md, key)
        .and_then(as_u32)
        .filter(|&id| (id as usize) < n_tokens)
}

fn flag(md: &HashMap<String, Value>, key: &str) -> Option<bool> {
    match meta(md, key) {
        Some(Value::Bool(b)) => Some(*b),
        _ => None,
    }
}

/// GPT-2's printable stand-ins for bytes: printable Latin-1 stays itself,
/// every other byte maps to a character from U+0100 on.
fn bytes_to_chars() -> Vec<char> {
    let mut map = vec!['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    map
}

const REGEX_GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub(crate) fn from_gguf(md: &HashMap<String, Value>) -> Result<Self, String> {
        let model = match meta(md, "tokenizer.ggml.model") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err("the file has no `tokenizer.ggml.model`".into()),
        };
        let tokens = strings(md, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        if n == 0 {
            return Err("`tokenizer.ggml.tokens` is empty".into());
        }
        let scores: Vec<f32> = match meta(md, "tokenizer.ggml.scores") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::F32(f) => *f,
                    Value::F64(f) => *f as f32,
                    _ => 0.0,
                })
                .collect(),
            _ => vec![0.0; n],
        };
        let mut types: Vec<TokenType> = match meta(md, "tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| TokenType::from_i64(as_i64(v).unwrap_or(1)))
                .collect(),
            _ => vec![TokenType::Normal; n],
        };
        types.resize(n, TokenType::Normal);
        let bos = token_id(md, "tokenizer.ggml.bos_token_id", n);
        let eos = token_id(md, "tokenizer.ggml.eos_token_id", n);
        let unk = token_id(md, "tokenizer.ggml.unknown_token_id", n);
        // Files without token types: the named ids are still special.
        for id in [bos, eos].into_iter().flatten() {
            if types[id as usize] == TokenType::Normal {
                types[id as usize] = TokenType::Control;
            }
        }
        let index: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let kind = match model.as_str() {
            "llama" => Kind::Spm {
                add_space_prefix: flag(md, "tokenizer.ggml.add_space_prefix").unwrap_or(true),
            },
            "gpt2" => {
                let pre = match meta(md, "tokenizer.ggml.pre") {
                    Some(Value::String(s)) => s.as_str(),
                    _ => "default",
                };
                let pattern = match pre {
                    "qwen2" | "deepseek-r1-qwen" => REGEX_QWEN2,
                    "llama3" | "llama-bpe" | "smaug-bpe" | "lfm2" => REGEX_LLAMA3,
                    _ => REGEX_GPT2,
                };
                let split = fancy_regex::Regex::new(pattern)
                    .map_err(|e| format!("pre-tokenizer `{pre}`: {e}"))?;
                let merges = strings(md, "tokenizer.ggml.merges")?
                    .into_iter()
                    .enumerate()
                    .filter_map(|(rank, m)| {
                        m.split_once(' ')
                            .map(|(a, b)| ((a.to_string(), b.to_string()), rank))
                    })
                    .collect();
                Kind::Bpe { split, merges }
            }
            other => {
                return Err(format!(
                    "tokenizer `{other}` is not supported (`llama` or `gpt2`)"
                ));
            }
        };
        let add_bos =
            flag(md, "tokenizer.ggml.add_bos_token").unwrap_or(matches!(kind, Kind::Spm { .. }));
        let mut byte_tokens = vec![None; 256];
        for (i, t) in tokens.iter().enumerate() {
            if let Some(hex) = t.strip_prefix("<0x").and_then(|r| r.strip_suffix('>'))
                && hex.len() == 2
                && let Ok(b) = u8::from_str_radix(hex, 16)
            {
                byte_tokens[b as usize] = Some(i as u32);
                if matches!(kind, Kind::Spm { .. }) && types[i] == TokenType::Normal {
                    types[i] = TokenType::Byte;
                }
            }
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                !t.is_empty()
                    && matches!(
                        types[*i],
                        TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                    )
            })
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let mut end_of_generation: HashSet<u32> = [
            eos,
            token_id(md, "tokenizer.ggml.eot_token_id", n),
            token_id(md, "tokenizer.ggml.eom_token_id", n),
        ]
        .into_iter()
        .flatten()
        .collect();
        for text in END_OF_TURN_TEXTS {
            if let Some(&id) = index.get(text)
                && matches!(
                    types[id as usize],
                    TokenType::Control | TokenType::UserDefined
                )
            {
                end_of_generation.insert(id);
            }
        }
        let byte_to_char = bytes_to_chars();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        Ok(Self {
            kind,
            tokens,
            types,
            scores,
            index,
            specials,
            byte_tokens,
            char_to_byte,
            byte_to_char,
            bos,
            eos,
            unk,
            add_bos,
            end_of_generation,
        })
    }

    /// How many tokens the vocabulary has.
    pub(crate) fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The beginning-of-sequence token's text (for chat templates).
    pub(crate) fn bos_text(&self) -> &str {
        self.bos.map_or("", |id| self.tokens[id as usize].as_str())
    }

    /// The end-of-sequence token's text (for chat templates).
    pub(crate) fn eos_text(&self) -> &str {
        self.eos.map_or("", |id| self.tokens[id as usize].as_str())
    }

    /// Whether `id` ends the model's turn (EOS, EOT and the like).
    pub(crate) fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// Whether decoded text starts with a space the tokenizer itself put
    /// there (SentencePiece's space prefix), which a reader should not see.
    pub(crate) fn strips_leading_space(&self) -> bool {
        matches!(
            self.kind,
            Kind::Spm {
                add_space_prefix: true
            }
        )
    }

    /// Tokenizes a rendered prompt: special tokens written in it are
    /// matched first, BOS is added when the model asks for it and the text
    /// does not already start with it.
    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut after_special = true;
        for (fragment, special) in self.partition(text) {
            match special {
                Some(id) => {
                    out.push(id);
                    after_special = true;
                }
                None => {
                    self.encode_text(fragment, after_special, &mut out);
                    after_special = false;
                }
            }
        }
        if self.add_bos
            && let Some(bos) = self.bos
            && out.first() != Some(&bos)
        {
            out.insert(0, bos);
        }
        out
    }

    /// Splits `text` into plain fragments and special tokens, longest
    /// special text first at each position.
    fn partition<'t>(&self, text: &'t str) -> Vec<(&'t str, Option<u32>)> {
        let mut parts = Vec::new();
        let mut plain_start = 0;
        let mut at = 0;
        while at < text.len() {
            let rest = &text[at..];
            match self
                .specials
                .iter()
                .find(|(s, _)| rest.starts_with(s.as_str()))
            {
                Some((s, id)) => {
                    if plain_start < at {
                        parts.push((&text[plain_start..at], None));
                    }
                    parts.push((&text[at..at + s.len()], Some(*id)));
                    at += s.len();
                    plain_start = at;
                }
                None => {
                    at += rest.chars().next().map_or(1, char::len_utf8);
                }
            }
        }
        if plain_start < text.len() {
            parts.push((&text[plain_start..], None));
        }
        parts
    }

    fn encode_text(&self, text: &str, after_special: bool, out: &mut Vec<u32>) {
        match &self.kind {
            Kind::Spm { add_space_prefix } => {
                let mut s = String::with_capacity(text.len() + 3);
                if *add_space_prefix && after_special {
                    s.push('▁');
                }
                s.push_str(&text.replace(' ', "▁"));
                self.spm(&s, out);
            }
            Kind::Bpe { split, merges } => {
                for word in split.find_iter(text) {
                    let Ok(word) = word else {
                        // The regex gave up (backtracking limit): fall back to
                        // the whole rest as one word, which still round-trips.
                        self.bpe_word(text, merges, out);
                        return;
                    };
                    self.bpe_word(word.as_str(), merges, out);
                }
            }
        }
    }

    /// SentencePiece BPE over one fragment, as llama.cpp's
    /// `llm_tokenizer_spm`: a queue of adjacent pairs whose concatenation is
    /// a token, best score first (leftmost on ties).
    fn spm(&self, text: &str, out: &mut Vec<u32>) {
        #[derive(Clone, Copy)]
        struct Symbol {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        struct Pair {
            score: f32,
            left: usize,
            right: usize,
            len: usize,
        }
        impl PartialEq for Pair {
            fn eq(&self, other: &Self) -> bool {
                self.cmp(other) == Ordering::Equal
            }
        }
        impl Eq for Pair {}
        impl PartialOrd for Pair {
            fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for Pair {
            fn cmp(&self, other: &Self) -> Ordering {
                self.score
                    .total_cmp(&other.score)
                    .then(other.left.cmp(&self.left))
            }
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        let mut queue = BinaryHeap::new();
        let try_pair = |symbols: &[Symbol],
                        queue: &mut BinaryHeap<Pair>,
                        l: Option<usize>,
                        r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            let (a, b) = (symbols[l], symbols[r]);
            let piece = &text[a.start..b.start + b.len];
            if let Some(&id) = self.index.get(piece) {
                queue.push(Pair {
                    score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                    left: l,
                    right: r,
                    len: piece.len(),
                });
            }
        };
        for i in 1..symbols.len() {
            try_pair(&symbols, &mut queue, Some(i - 1), Some(i));
        }
        while let Some(pair) = queue.pop() {
            let (l, r) = (symbols[pair.left], symbols[pair.right]);
            // A side already merged elsewhere: the pair is stale.
            if l.len == 0 || r.len == 0 || l.len + r.len != pair.len {
                continue;
            }
            symbols[pair.left].len += r.len;
            symbols[pair.right].len = 0;
            symbols[pair.left].next = r.next;
            if let Some(next) = r.next {
                symbols[next].prev = Some(pair.left);
            }
            let left = symbols[pair.left];
            try_pair(&symbols, &mut queue, left.prev, Some(pair.left));
            try_pair(&symbols, &mut queue, Some(pair.left), left.next);
        }
        let mut at = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.index.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            at = s.next;
        }
    }

    /// Byte-level BPE over one pre-tokenized word: lowest merge rank first.
    fn bpe_word(&self, word: &str, merges: &HashMap<(String, String), usize>, out: &mut Vec<u32>) {
        let mut parts: Vec<String> = word
            .bytes()
            .map(|b| self.byte_to_char[b as usize].to_string())
            .collect();
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    merges
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|rank| (*rank, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let right = parts.remove(i + 1);
            parts[i].push_str(&right);
        }
        for part in parts {
            match self.index.get(&part) {
                Some(&id) => out.push(id),
                None => {
                    for c in part.chars() {
                        if let Some(&id) = self.index.get(c.to_string().as_str()) {
                            out.push(id);
                        } else if let Some(unk) = self.unk {
                            out.push(unk);
                        }
                    }
                }
            }
        }
    }

    /// The bytes token `id` stands for in generated text: nothing for
    /// control, unknown and unused tokens.
    pub(crate) fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unknown | TokenType::Unused => Vec::new(),
            TokenType::UserDefined => text.as_bytes().to_vec(),
            TokenType::Byte => match self.byte_tokens.iter().position(|t| *t == Some(id)) {
                Some(b) => vec![b as u8],
                None => text.as_bytes().to_vec(),
            },
            TokenType::Normal => match self.kind {
                Kind::Spm { .. } => text.replace('▁', " ").into_bytes(),
                Kind::Bpe { .. } => {
                    let mut bytes = Vec::with_capacity(text.len());
                    for c in text.chars() {
                        match self.char_to_byte.get(&c) {
                            Some(b) => bytes.push(*b),
                            None => {
                                let mut buf = [0u8; 4];
                                bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            }
                        }
                    }
                    bytes
                }
            },
        }
    }
}

/// Turns a stream of token bytes into text without splitting a UTF-8
/// character: an incomplete sequence at the end waits for the next token.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds `bytes`; returns the text that is complete so far.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    text.push_str(s);
                    self.pending.clear();
                    return text;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    text.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // Incomplete at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return text;
                        }
                        Some(bad) => {
                            text.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// The rest, at the end of generation.
    pub(crate) fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: Vec<(&str, Value)>) -> HashMap<String, Value> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    fn strs(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    fn spm() -> Tokenizer {
        let mut tokens = vec!["<unk>", "<s>", "</s>"];
        let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        tokens.extend(bytes.iter().map(String::as_str));
        tokens.extend([
            "▁", "h", "e", "l", "o", "▁h", "▁he", "ll", "▁hell", "▁hello", "▁w",
        ]);
        let n = tokens.len();
        let mut types = vec![Value::I32(1); n];
        types[0] = Value::I32(2);
        types[1] = Value::I32(3);
        types[2] = Value::I32(3);
        for t in types.iter_mut().skip(3).take(256) {
            *t = Value::I32(6);
        }
        let scores = (0..n).map(|i| Value::F32(-(i as f32))).collect();
        Tokenizer::from_gguf(&md(vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
            ("tokenizer.ggml.scores", Value::Array(scores)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ]))
        .unwrap()
    }

    fn text_of(t: &Tokenizer, ids: &[u32]) -> String {
        let mut s = Utf8Stream::default();
        let mut out: String = ids.iter().map(|id| s.push(&t.token_bytes(*id))).collect();
        out.push_str(&s.finish());
        out
    }

    #[test]
    fn spm_merges_by_score_and_falls_back_to_bytes() {
        let t = spm();
        let ids = t.encode("hello é");
        let pieces: Vec<&str> = ids
            .iter()
            .map(|id| t.tokens[*id as usize].as_str())
            .collect();
        // BOS, the merged word, the space, then é as its two UTF-8 bytes.
        assert_eq!(pieces, ["<s>", "▁hello", "▁", "<0xC3>", "<0xA9>"]);
        assert_eq!(text_of(&t, &ids), " hello é");
    }

    #[test]
    fn special_tokens_in_text_are_matched_and_bos_not_doubled() {
        let t = spm();
        let ids = t.encode("<s>hello</s>");
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.iter().filter(|id| **id == 1).count(), 1);
        assert_eq!(ids.last(), Some(&2));
        assert!(t.is_end_of_generation(2));
        assert_eq!(text_of(&t, &ids), " hello");
    }

    fn bpe() -> Tokenizer {
        // Byte-level pieces: "Ġ" is the space.
        let tokens = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "h",
            "i",
            "Ġ",
            "t",
            "e",
            "r",
            "hi",
            "Ġt",
            "Ġth",
            "Ġthe",
            "re",
            "Ġthere",
            "Ã",
            "©",
        ];
        let mut types = vec![Value::I32(1); tokens.len()];
        for t in types.iter_mut().take(3) {
            *t = Value::I32(3);
        }
        Tokenizer::from_gguf(&md(vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("qwen2".into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            (
                "tokenizer.ggml.merges",
                strs(&["h i", "Ġ t", "Ġt h", "r e", "Ġth e", "Ġthe re"]),
            ),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ]))
        .unwrap()
    }

    #[test]
    fn bpe_splits_words_merges_by_rank_and_decodes_bytes() {
        let t = bpe();
        let ids = t.encode("<|im_start|>hi there é<|im_end|>");
        let pieces: Vec<&str> = ids
            .iter()
            .map(|id| t.tokens[*id as usize].as_str())
            .collect();
        assert_eq!(
            pieces,
            ["<|im_start|>", "hi", "Ġthere", "Ġ", "Ã", "©", "<|im_end|>"]
        );
        // Control tokens print nothing; bytes come back as UTF-8.
        assert_eq!(text_of(&t, &ids), "hi there é");
        assert!(t.is_end_of_generation(0));
        assert!(t.is_end_of_generation(2), "<|im_end|> ends a turn");
    }

    #[test]
    fn utf8_stream_holds_back_split_characters() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(b"a\xC3"), "a");
        assert_eq!(s.push(b"\xA9b"), "éb");
        assert_eq!(s.push(b"\xFFc"), "\u{FFFD}c");
        assert_eq!(s.push(b"\xE2\x96"), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }
}
