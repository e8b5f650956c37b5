//! The model file, run by llama.cpp (through the `llama-cpp-2` bindings):
//! checks that it is GGUF, loads it, and reads its vocabulary and chat
//! template. Any architecture llama.cpp runs is accepted (llama, qwen2,
//! gemma, phi, ...); the tokenizer is llama.cpp's own for the file, so its
//! pre-tokenizer (`smollm`, `llama3`, `qwen2`, ...) is the one the model was
//! trained with.
//!
//! Each session is a [`Session`]: one llama.cpp context, with its own KV
//! cache, that lives on one thread for its whole life (llama.cpp contexts
//! must not move between threads). All sessions share the one model in
//! memory.
//!
//! **Prefix cache.** A session keeps the tokens whose keys and values its
//! cache holds. A new prompt that starts with some of them (the next turn
//! of a conversation resends the earlier turns) keeps that part of the cache
//! and prefills only the rest. Memory is bounded because nothing is ever
//! allocated for it: it is each session's own KV cache, allocated once at
//! start-up, `context_length` tokens long (see [`kv_cache_bytes`]).

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{LogOptions, send_logs_to_tracing};

use super::generate::{Job, NextToken, TokenText};
use crate::providers::LocalModelInfo;

/// The context length used when the configuration sets none, below the
/// model's own when that is longer: the KV cache of every session is this
/// long.
pub const DEFAULT_CONTEXT_LENGTH: u32 = 4096;

/// Prompt tokens per forward pass while prefilling.
const PREFILL_BATCH: usize = 512;

/// llama.cpp's process-wide state, started once. Its log goes to
/// `tracing` (target `llama-cpp-2`) rather than straight to stderr.
fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            send_logs_to_tracing(LogOptions::default());
            LlamaBackend::init().map_err(|e| format!("cannot start llama.cpp: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A loaded model file: weights, vocabulary and metadata, shared by every
/// session.
pub(crate) struct Model {
    model: LlamaModel,
    /// What `ListProviders` shows.
    pub info: LocalModelInfo,
    /// The file's chat template, if it has one.
    pub chat_template: Option<String>,
    /// The text of the beginning-of-sequence token ("" when none).
    pub bos_text: String,
    /// The text of the end-of-sequence token ("" when none).
    pub eos_text: String,
    /// Keys and values per token of one session's cache, in bytes.
    kv_bytes_per_token: u64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("info", &self.info).finish()
    }
}

/// Reads the file's header, metadata and tensor table before llama.cpp
/// does: for what llama.cpp would abort the process on rather than refuse
/// (a vocabulary with the same token text twice), and to name what is
/// wrong with a damaged file (a length past its end, a tensor past its
/// end). Every length is checked against the file's size, so a damaged
/// file cannot make it allocate much.
/// llama.cpp's 32-bit seed for a request's 64-bit one: folded, and never
/// `u32::MAX`, which llama.cpp takes as "pick a random seed".
fn dist_seed(seed: u64) -> u32 {
    let folded = (seed ^ (seed >> 32)) as u32;
    if folded == u32::MAX {
        u32::MAX - 1
    } else {
        folded
    }
}

/// The metadata keys (by suffix) llama.cpp reads as model sizes.
const HYPERPARAMETERS: [&str; 5] = [
    ".context_length",
    ".block_count",
    ".embedding_length",
    ".attention.head_count",
    ".attention.head_count_kv",
];

/// The longest key, token or tensor name `check_gguf` reads.
const MAX_NAME_BYTES: u64 = 64 * 1024;

/// A token or name from the file, for an error: at most 80 characters.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text.chars().take(80).collect();
    if text.chars().nth(80).is_some() {
        out.push('…');
    }
    format!("{out:?}")
}

fn check_gguf(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open the model file: {e}"))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot read the model file: {e}"))?
        .len();
    let mut r = std::io::BufReader::new(file);
    let mut head = [0u8; 8];
    r.read_exact(&mut head)
        .map_err(|_| "not a GGUF file (too short)".to_string())?;
    if &head[..4] != b"GGUF" {
        return Err("not a GGUF file (no GGUF magic at its start)".into());
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        ));
    }
    let mut meta = Meta { r, size, read: 8 };
    let tensors = meta.u64()?;
    let entries = meta.u64()?;
    let mut alignment = 32u64;
    for _ in 0..entries {
        let key = meta.string()?;
        let kind = meta.u32()?;
        if key == "general.alignment" && kind == 4 {
            alignment = u64::from(meta.u32()?).max(1);
            continue;
        }
        // llama.cpp reads these as u32 and hands them out as i32 (its Rust
        // binding panics on a negative one): refused past i32::MAX.
        if kind == 4 && HYPERPARAMETERS.iter().any(|suffix| key.ends_with(suffix)) {
            let value = meta.u32()?;
            if i32::try_from(value).is_err() {
                return Err(format!(
                    "its `{key}` is {value}, more than llama.cpp can use"
                ));
            }
            continue;
        }
        if key == "tokenizer.ggml.tokens" && kind == GGUF_ARRAY {
            let (elem, count) = (meta.u32()?, meta.u64()?);
            if elem != GGUF_STRING {
                return Err("its `tokenizer.ggml.tokens` is not an array of strings".into());
            }
            // As llama.cpp keys them: the bytes, an empty token renamed
            // `[EMPTY_{id}]` (a duplicate there is an abort, not an error).
            let mut seen: std::collections::HashMap<Vec<u8>, u64> =
                std::collections::HashMap::new();
            for id in 0..count {
                let mut text = meta.name_bytes()?;
                if text.is_empty() {
                    text = format!("[EMPTY_{id}]").into_bytes();
                }
                match seen.entry(text) {
                    std::collections::hash_map::Entry::Occupied(e) => {
                        return Err(format!(
                            "its vocabulary has token {} twice (ids {} and {id})",
                            shown(e.key()),
                            e.get()
                        ));
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(id);
                    }
                }
            }
        } else {
            meta.skip_value(kind, 0)?;
        }
    }
    // The tensors: each one's data must lie inside the file (a download
    // cut short fails here, naming the first tensor past its end).
    let mut extents = Vec::new();
    for _ in 0..tensors {
        let name = meta.string()?;
        let dims = meta.u32()?;
        if dims > 8 {
            return Err(format!("tensor `{name}` has {dims} dimensions"));
        }
        let mut elements = 1u64;
        for _ in 0..dims {
            elements = elements.saturating_mul(meta.u64()?);
        }
        let ggml_type = meta.u32()?;
        let offset = meta.u64()?;
        extents.push((name, offset, tensor_bytes(ggml_type, elements)));
    }
    let data_start = meta.read.div_ceil(alignment).saturating_mul(alignment);
    for (name, offset, bytes) in extents {
        let end = data_start
            .saturating_add(offset)
            .saturating_add(bytes.unwrap_or(0));
        if end > size {
            return Err(format!(
                "tensor `{name}` ends at byte {end}, past the file's end ({size} bytes): the file is cut short"
            ));
        }
    }
    Ok(())
}

/// The bytes of `elements` values of ggml type `ggml_type`, for the types
/// whose block size is known here (`None` for the others).
fn tensor_bytes(ggml_type: u32, elements: u64) -> Option<u64> {
    // (block bytes, values per block)
    let (bytes, per) = match ggml_type {
        0 => (4, 1),   // F32
        1 => (2, 1),   // F16
        2 => (18, 32), // Q4_0
        3 => (20, 32), // Q4_1
        6 => (22, 32), // Q5_0
        7 => (24, 32), // Q5_1
        8 => (34, 32), // Q8_0
        10 => (84, 256),
        11 => (110, 256),
        12 => (144, 256), // Q4_K
        13 => (176, 256),
        14 => (210, 256), // Q6_K
        30 => (2, 1),     // BF16
        _ => return None,
    };
    Some(elements.div_ceil(per).saturating_mul(bytes))
}

const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;

/// A reader of GGUF metadata that never trusts a length past the file.
struct Meta {
    r: std::io::BufReader<std::fs::File>,
    size: u64,
    /// Bytes read so far.
    read: u64,
}

impl Meta {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        use std::io::Read;
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| "its metadata is cut short".to_string())?;
        self.read += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }

    fn len(&mut self) -> Result<u64, String> {
        let n = self.u64()?;
        if n > self.size {
            return Err(format!(
                "its metadata gives a length of {n}, more than the file's {} bytes",
                self.size
            ));
        }
        // Past what is left: nothing is read (nor allocated) for it.
        if n > self.size.saturating_sub(self.read) {
            return Err("its metadata is cut short".into());
        }
        Ok(n)
    }

    /// A key, token or tensor name (string values are skipped, not read):
    /// at most [`MAX_NAME_BYTES`], so a hostile length costs no memory.
    fn string(&mut self) -> Result<String, String> {
        self.name_bytes()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    fn name_bytes(&mut self) -> Result<Vec<u8>, String> {
        use std::io::Read;
        let n = self.len()?;
        if n > MAX_NAME_BYTES {
            return Err(format!(
                "its metadata has a name or token of {n} bytes (at most {MAX_NAME_BYTES})"
            ));
        }
        let mut b = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        (&mut self.r)
            .take(n)
            .read_to_end(&mut b)
            .map_err(|_| "its metadata is cut short".to_string())?;
        if b.len() as u64 != n {
            return Err("its metadata is cut short".into());
        }
        self.read += n;
        Ok(b)
    }

    fn skip(&mut self, n: u64) -> Result<(), String> {
        use std::io::Read;
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())
            .map_err(|_| "its metadata is cut short".to_string())?;
        if copied != n {
            return Err("its metadata is cut short".into());
        }
        self.read += n;
        Ok(())
    }

    fn skip_value(&mut self, kind: u32, depth: u32) -> Result<(), String> {
        if depth > 4 {
            return Err("its metadata nests arrays more than 4 deep".into());
        }
        match kind {
            // u8, i8, bool
            0 | 1 | 7 => self.skip(1),
            // u16, i16
            2 | 3 => self.skip(2),
            // u32, i32, f32
            4..=6 => self.skip(4),
            // u64, i64, f64
            10..=12 => self.skip(8),
            GGUF_STRING => {
                let n = self.len()?;
                self.skip(n)
            }
            GGUF_ARRAY => {
                let (elem, count) = (self.u32()?, self.len()?);
                match elem {
                    GGUF_STRING | GGUF_ARRAY => {
                        for _ in 0..count {
                            self.skip_value(elem, depth + 1)?;
                        }
                        Ok(())
                    }
                    0 | 1 | 7 => self.skip(count),
                    2 | 3 => self.skip(count.saturating_mul(2)),
                    4..=6 => self.skip(count.saturating_mul(4)),
                    10..=12 => self.skip(count.saturating_mul(8)),
                    other => Err(format!("its metadata has an array of unknown type {other}")),
                }
            }
            other => Err(format!("its metadata has a value of unknown type {other}")),
        }
    }
}

fn token_text(model: &LlamaModel, token: LlamaToken) -> String {
    if token.0 < 0 {
        return String::new();
    }
    model
        .vocab()
        .text(token)
        .map_or_else(String::new, |t| t.to_string_lossy().into_owned())
}

/// Loads the model at `path`. The error says what is wrong with the file;
/// the caller names the path and the key.
pub(crate) fn load(path: &Path, context_length: Option<u32>) -> Result<Model, String> {
    check_gguf(path)?;
    let backend = backend()?;
    let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .map_err(|e| format!("llama.cpp cannot load it ({e})"))?;
    let trained = model.n_ctx_train();
    let supported = if trained == 0 {
        DEFAULT_CONTEXT_LENGTH
    } else {
        trained
    };
    let context_length = match context_length {
        Some(n) if n > supported => {
            return Err(format!(
                "context_length {n} is more than this model supports ({supported})"
            ));
        }
        Some(0) => return Err("context_length must be at least 1".into()),
        Some(n) => n,
        None => supported.min(DEFAULT_CONTEXT_LENGTH),
    };
    let chat_template = model
        .meta_val_str("tokenizer.chat_template")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let vocab = model.vocab();
    let bos_text = token_text(&model, vocab.bos());
    let eos_text = token_text(&model, vocab.eos());
    let layers = u64::from(model.n_layer());
    let heads = u64::from(model.n_head().max(1));
    let kv_heads = u64::from(model.n_head_kv());
    let width = u64::try_from(model.n_embd()).unwrap_or(0);
    // K and V, f16, for every layer: width / heads * kv_heads values each.
    let kv_bytes_per_token = (width / heads)
        .saturating_mul(kv_heads)
        .saturating_mul(layers)
        .saturating_mul(4);
    let info = LocalModelInfo {
        file_name: path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        parameter_count: model.n_params(),
        context_length,
    };
    Ok(Model {
        model,
        info,
        chat_template,
        bos_text,
        eos_text,
        kv_bytes_per_token,
    })
}

/// The memory one session's KV cache takes: `context_length` tokens times
/// 2 (K and V) times 2 bytes (f16) times layers times the key/value width.
pub(crate) fn kv_cache_bytes(model: &Model) -> u64 {
    model
        .kv_bytes_per_token
        .saturating_mul(u64::from(model.info.context_length))
}

impl Model {
    /// The number of tokens in the vocabulary.
    pub(crate) fn vocab_size(&self) -> usize {
        usize::try_from(self.model.vocab().n_tokens()).unwrap_or(0)
    }

    /// Tokenizes a rendered prompt. Special tokens written in it
    /// (`<|im_start|>`, `<s>`, ...) are those tokens; a beginning-of-
    /// sequence token is added when the vocabulary asks for one and the
    /// template did not write it.
    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let vocab = self.model.vocab();
        let add_bos = vocab.should_add_bos()
            && (self.bos_text.is_empty() || !text.starts_with(&self.bos_text));
        vocab
            .tokenize(text.as_bytes(), add_bos, true)
            .into_iter()
            .filter_map(|t| u32::try_from(t.0).ok())
            .collect()
    }
}

fn token(id: u32) -> LlamaToken {
    LlamaToken(i32::try_from(id).unwrap_or(i32::MAX))
}

impl TokenText for Model {
    fn is_end_of_generation(&self, id: u32) -> bool {
        self.model.vocab().is_eog(token(id))
    }

    fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        self.model
            .vocab()
            .token_to_piece_into(token(id), out, false, None);
    }

    fn strips_leading_space(&self) -> bool {
        // SentencePiece vocabularies write a word's space before it
        // ("▁Hello"); the first word of an answer has none.
        matches!(
            self.model.vocab().vocab_type(),
            llama_cpp_2::vocab::VocabType::SPM
        )
    }
}

/// One session: a llama.cpp context over the shared model, with its KV
/// cache and the tokens that cache holds. It stays on the thread that made
/// it.
pub(crate) struct Session<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// The tokens whose keys and values the cache holds, in order.
    cached: Vec<u32>,
    sampler: LlamaSampler,
    prefix_cache: bool,
    vocab_size: usize,
}

impl<'m> Session<'m> {
    /// A new context of `model.info.context_length` tokens running its
    /// forward passes on `threads` threads.
    pub(crate) fn new(
        model: &'m Model,
        threads: usize,
        prefix_cache: bool,
    ) -> Result<Self, String> {
        let backend = backend()?;
        let threads = i32::try_from(threads.max(1)).unwrap_or(i32::MAX);
        let n_ctx = model.info.context_length;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(PREFILL_BATCH as u32)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx = model
            .model
            .new_context(backend, params)
            .map_err(|e| format!("llama.cpp cannot make a context of {n_ctx} tokens: {e}"))?;
        Ok(Self {
            ctx,
            batch: LlamaBatch::new(PREFILL_BATCH, 1),
            cached: Vec::new(),
            sampler: LlamaSampler::greedy(),
            prefix_cache,
            vocab_size: model.vocab_size(),
        })
    }

    /// Gives the session back the tokens its cache holds (they were with
    /// its handle while it was idle).
    pub(crate) fn set_cached(&mut self, tokens: Vec<u32>) {
        self.cached = tokens;
    }

    /// Takes the tokens the cache holds, for the session's handle.
    pub(crate) fn take_cached(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.cached)
    }
}

/// How many leading tokens `a` and `b` share.
pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl NextToken for Session<'_> {
    fn begin(&mut self, job: &Job) -> Result<usize, String> {
        // At least the prompt's last token is run again: its logits give
        // the first answer token.
        let keep = if self.prefix_cache {
            common_prefix(&self.cached, &job.prompt).min(job.prompt.len().saturating_sub(1))
        } else {
            0
        };
        if keep < self.cached.len() {
            let from = u32::try_from(keep).map_err(|e| e.to_string())?;
            let removed = self
                .ctx
                .clear_kv_cache_seq(Some(0), Some(from), None)
                .map_err(|e| e.to_string())?;
            if !removed {
                self.ctx.clear_kv_cache();
                self.cached.clear();
            } else {
                self.cached.truncate(keep);
            }
        }
        let keep = self.cached.len();
        self.sampler = if job.temperature <= 1e-7 {
            LlamaSampler::greedy()
        } else {
            let mut chain = Vec::with_capacity(3);
            if job.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(job.top_p as f32, 1));
            }
            chain.push(LlamaSampler::temp(job.temperature as f32));
            chain.push(LlamaSampler::dist(dist_seed(job.seed)));
            LlamaSampler::chain_simple(chain)
        };
        Ok(keep)
    }

    fn next(&mut self, tokens: &[u32]) -> Result<u32, String> {
        let next = self.run(tokens);
        if next.is_err() {
            // A failed pass leaves the cache in an unknown state.
            self.ctx.clear_kv_cache();
            self.cached.clear();
        }
        next
    }
}

impl Session<'_> {
    fn run(&mut self, tokens: &[u32]) -> Result<u32, String> {
        if tokens.is_empty() {
            return Err("nothing to run".into());
        }
        let chunks = tokens.chunks(PREFILL_BATCH);
        let last_chunk = chunks.len() - 1;
        for (c, chunk) in chunks.enumerate() {
            self.batch.clear();
            for (i, &t) in chunk.iter().enumerate() {
                let pos = i32::try_from(self.cached.len() + i).map_err(|e| e.to_string())?;
                let logits = c == last_chunk && i + 1 == chunk.len();
                self.batch
                    .add(token(t), pos, &[0], logits)
                    .map_err(|e| e.to_string())?;
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| format!("llama.cpp could not run the model: {e}"))?;
            self.cached.extend_from_slice(chunk);
        }
        let next = self.sampler.sample(&self.ctx, self.batch.n_tokens() - 1);
        u32::try_from(next.0)
            .ok()
            .filter(|&t| (t as usize) < self.vocab_size)
            .ok_or_else(|| format!("llama.cpp sampled token {} outside the vocabulary", next.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file of no tensors and one metadata entry: `key`, then
    /// `value` (its type tag and bytes).
    fn gguf_with_entry(key: &str, value: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes()); // tensors
        b.extend(1u64.to_le_bytes()); // entries
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        b.extend(value);
        b
    }

    fn gguf_with_tokens(tokens: &[&str]) -> Vec<u8> {
        let mut value = GGUF_ARRAY.to_le_bytes().to_vec();
        value.extend(GGUF_STRING.to_le_bytes());
        value.extend((tokens.len() as u64).to_le_bytes());
        for t in tokens {
            value.extend((t.len() as u64).to_le_bytes());
            value.extend(t.as_bytes());
        }
        gguf_with_entry("tokenizer.ggml.tokens", &value)
    }

    fn check_bytes(name: &str, bytes: &[u8]) -> Result<(), String> {
        let path = std::env::temp_dir().join(format!("pg-gguf-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let r = check_gguf(&path);
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn a_vocabulary_with_a_token_twice_is_refused_naming_it() {
        assert_eq!(
            check_bytes("unique", &gguf_with_tokens(&["a", "b", "c"])),
            Ok(())
        );
        let err = check_bytes("twice", &gguf_with_tokens(&["a", "b", "a"])).unwrap_err();
        assert_eq!(err, "its vocabulary has token \"a\" twice (ids 0 and 2)");
    }

    #[test]
    fn tokens_are_keyed_as_llama_cpp_keys_them_and_names_are_bounded() {
        // Empty tokens are renamed by their id: two of them are fine, one
        // that meets a literal `[EMPTY_0]` is a duplicate.
        assert_eq!(
            check_bytes("empties", &gguf_with_tokens(&["", "", "a"])),
            Ok(())
        );
        let err = check_bytes("empty-clash", &gguf_with_tokens(&["", "[EMPTY_0]"])).unwrap_err();
        assert_eq!(
            err,
            "its vocabulary has token \"[EMPTY_0]\" twice (ids 0 and 1)"
        );
        // A token longer than any name is refused, not read.
        let long = "x".repeat(70_000);
        let err = check_bytes("long-token", &gguf_with_tokens(&[&long])).unwrap_err();
        assert!(err.contains("at most 65536"), "{err}");
    }

    #[test]
    fn a_fixed_seed_never_becomes_llama_cpps_random_seed() {
        assert_eq!(dist_seed(7), 7);
        assert_eq!(dist_seed(u64::from(u32::MAX)), u32::MAX - 1);
        assert_ne!(dist_seed(0xFFFF_FFFF_0000_0000), u32::MAX);
        assert_eq!(dist_seed(1 << 32), 1);
    }

    #[test]
    fn a_model_size_past_i32_is_refused_naming_its_key() {
        let mut value = 4u32.to_le_bytes().to_vec(); // u32
        value.extend(3_000_000_000u32.to_le_bytes());
        let mut b = gguf_with_entry("llama.context_length", &value);
        let err = check_bytes("huge-context", &b).unwrap_err();
        assert_eq!(
            err,
            "its `llama.context_length` is 3000000000, more than llama.cpp can use"
        );
        let at = b.len() - 4;
        b[at..].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(check_bytes("context", &b), Ok(()));
    }

    #[test]
    fn damaged_files_are_refused_without_allocating_their_lengths() {
        // A string length of 2^60: refused before any allocation.
        let mut b = gguf_with_tokens(&["a"]);
        let at = b.len() - 1 - 8;
        b[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let err = check_bytes("huge", &b).unwrap_err();
        assert!(err.contains("more than the file's"), "{err}");
        // Cut inside the metadata.
        let b = gguf_with_tokens(&["abc", "def"]);
        let err = check_bytes("cut", &b[..b.len() - 2]).unwrap_err();
        assert_eq!(err, "its metadata is cut short");
        // A model cut inside its tensor data names the first tensor past
        // the end.
        let path = std::env::temp_dir().join(format!("pg-gguf-{}-tiny", std::process::id()));
        super::super::tiny::TinyModel::default()
            .write(&path)
            .unwrap();
        assert_eq!(check_gguf(&path), Ok(()));
        let whole = std::fs::read(&path).unwrap();
        let err = check_bytes("tiny-cut", &whole[..whole.len() / 2]).unwrap_err();
        assert!(
            err.starts_with("tensor `") && err.contains("the file is cut short"),
            "{err}"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn common_prefix_counts_the_shared_start() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[5], &[1]), 0);
    }

    /// SmolLM2's tokens for sentences with digits, spaces and punctuation,
    /// as llama.cpp gives them (llama-cpp-python 0.3.36 on the same file,
    /// `Llama.tokenize(text, add_bos=False, special=False)`; printed by
    /// `server/benches/llama_cpp_reference.py tokens <file>`). The `smollm`
    /// pre-tokenizer splits every digit on its own and keeps a space before
    /// a digit as its own token.
    const REFERENCE: &[(&str, &[u32])] = &[
        (
            "Hello world! 123 4567 numbers, and  spaces.",
            &[
                19556, 905, 17, 216, 33, 34, 35, 216, 36, 37, 38, 39, 2966, 28, 284, 216, 5600, 30,
            ],
        ),
        (
            "The year 2024 had 366 days; \u{3c0}\u{2248}3.14159!",
            &[
                504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 43, 25143, 40533, 226,
                35, 30, 33, 36, 33, 37, 41, 17,
            ],
        ),
        (
            "  leading spaces\ttabs\nnewlines",
            &[216, 2899, 5600, 197, 100, 7366, 198, 2241, 5110],
        ),
        (
            "Don't split contractions: we'll, they're, I'm.",
            &[
                8084, 982, 7074, 28342, 42, 392, 3060, 28, 502, 2316, 28, 339, 5248, 30,
            ],
        ),
        (
            "Numbers 1234567890 and 12,345.67 $99",
            &[
                39006, 216, 33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 284, 216, 33, 34, 28, 35, 36,
                37, 30, 38, 39, 1885, 41, 41,
            ],
        ),
        (
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
            &[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198],
        ),
    ];

    #[test]
    fn smollm2_tokens_match_llama_cpp() {
        let Some(path) = std::env::var_os("PG_SMOLLM2_GGUF") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set PG_SMOLLM2_GGUF (bash .ci/fetch-smollm2 prints the path)"
            );
            eprintln!("skipped: PG_SMOLLM2_GGUF is not set");
            return;
        };
        let model = load(Path::new(&path), None).unwrap();
        assert_eq!(model.vocab_size(), 49152);
        for (text, ids) in REFERENCE {
            assert_eq!(model.encode(text), *ids, "{text:?}");
        }
        // Special tokens decode to nothing (they are not text), words to
        // their bytes.
        let mut out = Vec::new();
        model.token_bytes(7042, &mut out);
        assert_eq!(out, b" Paris");
        assert!(model.is_end_of_generation(2));
        assert!(!model.strips_leading_space());
    }
}
