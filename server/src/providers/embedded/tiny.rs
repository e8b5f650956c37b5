//! Writes tiny GGUF models with random weights: a real file for tests and
//! benchmarks, made at run time, so no model is ever downloaded.
//!
//! The file is a valid model of its architecture (`llama` with a
//! SentencePiece vocabulary, or `qwen2` with a byte-level BPE one and
//! merges) with Q8_0 weights from a fixed seed. Its text is nonsense, but
//! it is deterministic, and shaped so tests can count on it: it never
//! samples a control, unknown or byte token, so it never ends its turn by
//! itself and every token it generates is visible text. (Dimension 0 of the
//! hidden state is a constant that no layer writes to; the output rows of
//! those tokens weigh it with a large negative weight.)

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// The architecture of a tiny model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArchitecture {
    /// `llama`, with a SentencePiece (`llama`) vocabulary.
    Llama,
    /// `qwen2`, with a byte-level BPE (`gpt2`) vocabulary.
    Qwen2,
}

/// The shape of a tiny model. Widths are multiples of 32 (Q8_0 blocks).
///
/// ```no_run
/// use provider_gateway_server::providers::embedded::tiny::TinyModel;
/// TinyModel::default().write(std::path::Path::new("/tmp/tiny.gguf")).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct TinyModel {
    /// The architecture.
    pub architecture: TinyArchitecture,
    /// The weights' seed.
    pub seed: u64,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden width.
    pub embedding: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Feed-forward width.
    pub feed_forward: usize,
    /// The context length written in the file.
    pub context_length: u32,
    /// `tokenizer.chat_template`, if any.
    pub chat_template: Option<String>,
}

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            architecture: TinyArchitecture::Llama,
            seed: 42,
            layers: 2,
            embedding: 64,
            heads: 4,
            kv_heads: 2,
            feed_forward: 128,
            context_length: 2048,
            chat_template: None,
        }
    }
}

const WORDS: [&str; 48] = [
    "the", "a", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "are", "with",
    "as", "be", "at", "one", "have", "this", "from", "by", "hot", "word", "but", "what", "some",
    "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how",
    "said", "an", "each", "she", "which", "do", "their", "time", "if",
];

/// splitmix64: small, seeded, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-scale, scale].
    fn uniform(&mut self, scale: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * scale
    }

    fn matrix(&mut self, rows: usize, cols: usize, scale: f32) -> Vec<f32> {
        (0..rows * cols).map(|_| self.uniform(scale)).collect()
    }
}

/// A vocabulary: token texts, types (llama.cpp's numbering), scores,
/// merges, and which tokens the model must never sample.
struct Vocabulary {
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Vec<f32>,
    merges: Vec<String>,
    bos: u32,
    eos: u32,
    silent: Vec<bool>,
}

fn spm_vocabulary() -> Vocabulary {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let mut pieces: Vec<String> = Vec::new();
    pieces.extend(WORDS.iter().map(|w| format!("▁{w}")));
    pieces.extend(('a'..='z').map(|c| format!("▁{c}")));
    pieces.extend(('a'..='z').map(String::from));
    pieces.extend([".", ",", "!", "?", "ing", "ed", "er", "s"].map(String::from));
    for p in pieces {
        // Every token text once ("▁a" is a word and a letter, "s" a letter
        // and a suffix): llama.cpp refuses a vocabulary with duplicates.
        if !tokens.contains(&p) {
            tokens.push(p);
            types.push(1);
        }
    }
    let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
    let silent = types.iter().map(|t| *t != 1).collect();
    Vocabulary {
        tokens,
        types,
        scores,
        merges: Vec::new(),
        bos: 1,
        eos: 2,
        silent,
    }
}

fn bpe_vocabulary() -> Vocabulary {
    // GPT-2's byte -> printable character map (see the tokenizer).
    let mut byte_char = Vec::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        byte_char.push(if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('?');
            next += 1;
            c
        });
    }
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    let mut silent = vec![true, true, true];
    for (b, c) in byte_char.iter().enumerate() {
        tokens.push(c.to_string());
        types.push(1);
        // Only printable ASCII on its own: other bytes are parts of
        // characters, which would print nothing until completed.
        silent.push(!(0x20..0x7F).contains(&b));
    }
    let space = byte_char[b' ' as usize];
    let mut merges = Vec::new();
    for w in WORDS {
        let word: Vec<char> = std::iter::once(space).chain(w.chars()).collect();
        let mut prefix = word[0].to_string();
        for c in &word[1..] {
            merges.push(format!("{prefix} {c}"));
            prefix.push(*c);
            if !tokens.contains(&prefix) {
                tokens.push(prefix.clone());
                types.push(1);
                silent.push(false);
            }
        }
    }
    let scores = vec![0.0; tokens.len()];
    Vocabulary {
        tokens,
        types,
        scores,
        merges,
        bos: 0,
        eos: 2,
        silent,
    }
}

/// GGUF's magic number, the first four bytes of the file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// The GGUF version in the header. Little-endian files are laid out the
/// same in versions 2 and 3 (3 only added big-endian files); 2 is what
/// the writer this replaced wrote, so files stay byte for byte what they were.
const GGUF_VERSION: u32 = 2;

/// Where tensor data starts and how each tensor in it is padded: GGUF's
/// default, as the file writes no `general.alignment`.
const ALIGNMENT: usize = 32;

// GGUF metadata value types.
const GGUF_TYPE_U32: u32 = 4;
const GGUF_TYPE_I32: u32 = 5;
const GGUF_TYPE_F32: u32 = 6;
const GGUF_TYPE_BOOL: u32 = 7;
const GGUF_TYPE_STRING: u32 = 8;
const GGUF_TYPE_ARRAY: u32 = 9;

// ggml tensor types.
const GGML_TYPE_F32: u32 = 0;
const GGML_TYPE_Q8_0: u32 = 8;

/// Weights per Q8_0 block (a block is an f16 scale and 32 `i8`s).
const Q8_0_BLOCK: usize = 32;

/// A metadata value: the scalar types the file uses, and arrays of them.
enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    String(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

impl Value {
    /// Appends the value's type and the value.
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Self::U32(v) => {
                put_u32(out, GGUF_TYPE_U32);
                put_u32(out, *v);
            }
            Self::F32(v) => {
                put_u32(out, GGUF_TYPE_F32);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Self::Bool(v) => {
                put_u32(out, GGUF_TYPE_BOOL);
                out.push(u8::from(*v));
            }
            Self::String(v) => {
                put_u32(out, GGUF_TYPE_STRING);
                put_string(out, v);
            }
            Self::Strings(vs) => {
                put_array_header(out, GGUF_TYPE_STRING, vs.len());
                for v in vs {
                    put_string(out, v);
                }
            }
            Self::I32s(vs) => {
                put_array_header(out, GGUF_TYPE_I32, vs.len());
                for v in vs {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Self::F32s(vs) => {
                put_array_header(out, GGUF_TYPE_F32, vs.len());
                for v in vs {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u64).to_le_bytes());
}

/// A string: its length in bytes as a u64, then its UTF-8 bytes.
fn put_string(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_array_header(out: &mut Vec<u8>, element_type: u32, len: usize) {
    put_u32(out, GGUF_TYPE_ARRAY);
    put_u32(out, element_type);
    put_u64(out, len);
}

/// The zero bytes that take `len` up to a multiple of [`ALIGNMENT`].
fn padding(len: usize) -> &'static [u8] {
    const ZEROS: [u8; ALIGNMENT] = [0; ALIGNMENT];
    &ZEROS[..len.next_multiple_of(ALIGNMENT) - len]
}

/// A tensor as the file stores it.
struct GgufTensor {
    /// Dimensions, outermost first (rows, then columns).
    shape: Vec<usize>,
    /// The ggml type of `data`.
    ggml_type: u32,
    /// The encoded elements.
    data: Vec<u8>,
}

/// A `rows` × `cols` matrix (row-major), quantized to Q8_0.
fn quantized(data: Vec<f32>, rows: usize, cols: usize) -> GgufTensor {
    debug_assert_eq!(data.len(), rows * cols);
    GgufTensor {
        shape: vec![rows, cols],
        ggml_type: GGML_TYPE_Q8_0,
        data: quantize_q8_0(&data),
    }
}

/// A vector, stored as F32.
fn plain(data: Vec<f32>) -> GgufTensor {
    GgufTensor {
        shape: vec![data.len()],
        ggml_type: GGML_TYPE_F32,
        data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Q8_0-quantizes `xs` (a multiple of 32 long) as ggml's reference
/// `quantize_row_q8_0` does: per block of 32, the scale
/// `d = max |x| / 127` (as f16), then each `x * (1 / d)` rounded half away
/// from zero (all zeros when `d` is 0).
pub(crate) fn quantize_q8_0(xs: &[f32]) -> Vec<u8> {
    debug_assert!(xs.len().is_multiple_of(Q8_0_BLOCK));
    let mut out = Vec::with_capacity(xs.len() / Q8_0_BLOCK * (2 + Q8_0_BLOCK));
    for block in xs.chunks_exact(Q8_0_BLOCK) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        out.extend(
            block
                .iter()
                .map(|x| ((x * id).round() as i8).cast_unsigned()),
        );
    }
    out
}

/// The bits of the IEEE 754 half nearest to `value` (ties to even), as the
/// `half` crate converts: overflow gives infinity, NaNs stay NaNs.
pub(crate) fn f32_to_f16(value: f32) -> u16 {
    let x = value.to_bits();
    let sign = x & 0x8000_0000;
    let exp = x & 0x7F80_0000;
    let man = x & 0x007F_FFFF;
    let half_sign = sign >> 16;

    // Infinity or NaN (keeping a NaN quiet and its top mantissa bits).
    if exp == 0x7F80_0000 {
        let nan_bit = if man == 0 { 0 } else { 0x0200 };
        return (half_sign | 0x7C00 | nan_bit | (man >> 13)) as u16;
    }

    let half_exp = ((exp >> 23) as i32) - 127 + 15;
    if half_exp >= 0x1F {
        // Too large: infinity.
        return (half_sign | 0x7C00) as u16;
    }
    if half_exp <= 0 {
        // A subnormal half, or zero.
        if 14 - half_exp > 24 {
            return half_sign as u16;
        }
        let man = man | 0x0080_0000;
        let mut half_man = man >> (14 - half_exp);
        let round_bit = 1 << (13 - half_exp);
        if (man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0 {
            half_man += 1;
        }
        return (half_sign | half_man) as u16;
    }

    // A normal half. Rounding up may carry into the exponent, up to
    // infinity, which is right.
    let half = half_sign | ((half_exp as u32) << 10) | (man >> 13);
    let round_bit = 0x0000_1000;
    if (man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0 {
        (half + 1) as u16
    } else {
        half as u16
    }
}

/// Writes a GGUF file: the header, metadata and tensor infos, then the
/// tensor data from the next multiple of [`ALIGNMENT`], each tensor padded
/// with zeros to a multiple of it (the last one too).
fn write_gguf(
    w: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[(String, GgufTensor)],
) -> std::io::Result<()> {
    let mut header = Vec::new();
    header.extend_from_slice(GGUF_MAGIC);
    put_u32(&mut header, GGUF_VERSION);
    put_u64(&mut header, tensors.len());
    put_u64(&mut header, metadata.len());
    for (key, value) in metadata {
        put_string(&mut header, key);
        value.put(&mut header);
    }
    let mut offset = 0;
    for (name, tensor) in tensors {
        put_string(&mut header, name);
        put_u32(&mut header, tensor.shape.len() as u32);
        // GGUF lists dimensions innermost first.
        for &dim in tensor.shape.iter().rev() {
            put_u64(&mut header, dim);
        }
        put_u32(&mut header, tensor.ggml_type);
        // Relative to the start of the tensor data.
        put_u64(&mut header, offset);
        offset += tensor.data.len().next_multiple_of(ALIGNMENT);
    }
    let pad = padding(header.len());
    header.extend_from_slice(pad);
    w.write_all(&header)?;
    for (_, tensor) in tensors {
        w.write_all(&tensor.data)?;
        w.write_all(padding(tensor.data.len()))?;
    }
    Ok(())
}

impl TinyModel {
    /// Writes the model to `path`.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let d = self.embedding;
        let head_dim = d / self.heads;
        let kv = head_dim * self.kv_heads;
        let ff = self.feed_forward;
        if !d.is_multiple_of(32)
            || !ff.is_multiple_of(32)
            || !d.is_multiple_of(self.heads)
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            return Err("widths must be multiples of 32 and heads must divide them".into());
        }
        let vocab = match self.architecture {
            TinyArchitecture::Llama => spm_vocabulary(),
            TinyArchitecture::Qwen2 => bpe_vocabulary(),
        };
        let n_vocab = vocab.tokens.len();
        let mut rng = Rng(self.seed);
        let scale = |fan_in: usize| (3.0 / fan_in as f32).sqrt();

        let mut tensors: Vec<(String, GgufTensor)> = Vec::new();
        // Dimension 0 of every embedding is the constant 1.
        let mut embd = rng.matrix(n_vocab, d, 1.0);
        for row in embd.chunks_mut(d) {
            row[0] = 1.0;
        }
        tensors.push(("token_embd.weight".into(), quantized(embd, n_vocab, d)));
        tensors.push(("output_norm.weight".into(), plain(vec![1.0; d])));
        let mut output = rng.matrix(n_vocab, d, 2.0 * scale(d));
        for (row, silent) in output.chunks_mut(d).zip(&vocab.silent) {
            if *silent {
                row.fill(0.0);
                row[0] = -1000.0;
            } else {
                row[0] = 0.0;
            }
        }
        tensors.push(("output.weight".into(), quantized(output, n_vocab, d)));
        for layer in 0..self.layers {
            let p = format!("blk.{layer}");
            // Writes into the residual stream leave dimension 0 alone.
            let mut attn_output = rng.matrix(d, d, scale(d));
            attn_output[..d].fill(0.0);
            let mut ffn_down = rng.matrix(d, ff, scale(ff));
            ffn_down[..ff].fill(0.0);
            let mut layer_tensors = vec![
                ("attn_norm.weight", plain(vec![1.0; d])),
                ("attn_q.weight", quantized(rng.matrix(d, d, scale(d)), d, d)),
                (
                    "attn_k.weight",
                    quantized(rng.matrix(kv, d, scale(d)), kv, d),
                ),
                (
                    "attn_v.weight",
                    quantized(rng.matrix(kv, d, scale(d)), kv, d),
                ),
                ("attn_output.weight", quantized(attn_output, d, d)),
                ("ffn_norm.weight", plain(vec![1.0; d])),
                (
                    "ffn_gate.weight",
                    quantized(rng.matrix(ff, d, scale(d)), ff, d),
                ),
                (
                    "ffn_up.weight",
                    quantized(rng.matrix(ff, d, scale(d)), ff, d),
                ),
                ("ffn_down.weight", quantized(ffn_down, d, ff)),
            ];
            if self.architecture == TinyArchitecture::Qwen2 {
                layer_tensors.push(("attn_q.bias", plain(rng.matrix(1, d, 0.1))));
                layer_tensors.push(("attn_k.bias", plain(rng.matrix(1, kv, 0.1))));
                layer_tensors.push(("attn_v.bias", plain(rng.matrix(1, kv, 0.1))));
            }
            for (name, t) in layer_tensors {
                tensors.push((format!("{p}.{name}"), t));
            }
        }

        let arch = match self.architecture {
            TinyArchitecture::Llama => "llama",
            TinyArchitecture::Qwen2 => "qwen2",
        };
        let key = |k: &str| format!("{arch}.{k}");
        let mut metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            ("general.name".into(), Value::String(format!("tiny-{arch}"))),
            (key("context_length"), Value::U32(self.context_length)),
            (key("embedding_length"), Value::U32(d as u32)),
            (key("block_count"), Value::U32(self.layers as u32)),
            (key("feed_forward_length"), Value::U32(ff as u32)),
            (key("attention.head_count"), Value::U32(self.heads as u32)),
            (
                key("attention.head_count_kv"),
                Value::U32(self.kv_heads as u32),
            ),
            (key("rope.dimension_count"), Value::U32(head_dim as u32)),
            (key("rope.freq_base"), Value::F32(10_000.0)),
            (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ];
        let model = match self.architecture {
            TinyArchitecture::Llama => "llama",
            TinyArchitecture::Qwen2 => "gpt2",
        };
        metadata.push(("tokenizer.ggml.model".into(), Value::String(model.into())));
        if self.architecture == TinyArchitecture::Qwen2 {
            metadata.push(("tokenizer.ggml.pre".into(), Value::String("qwen2".into())));
            metadata.push(("tokenizer.ggml.merges".into(), Value::Strings(vocab.merges)));
            metadata.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
        }
        metadata.push(("tokenizer.ggml.tokens".into(), Value::Strings(vocab.tokens)));
        metadata.push(("tokenizer.ggml.token_type".into(), Value::I32s(vocab.types)));
        metadata.push(("tokenizer.ggml.scores".into(), Value::F32s(vocab.scores)));
        metadata.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(vocab.bos)));
        metadata.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(vocab.eos)));
        if let Some(template) = &self.chat_template {
            metadata.push((
                "tokenizer.chat_template".into(),
                Value::String(template.clone()),
            ));
        }

        let file =
            File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let mut w = BufWriter::new(file);
        write_gguf(&mut w, &metadata, &tensors).map_err(|e| e.to_string())?;
        w.flush().map_err(|e| e.to_string())
    }

    /// The number of parameters the file holds (the sum of its tensors'
    /// element counts), as `ListProviders` reports it.
    pub fn parameter_count(&self) -> u64 {
        let vocab = match self.architecture {
            TinyArchitecture::Llama => spm_vocabulary(),
            TinyArchitecture::Qwen2 => bpe_vocabulary(),
        }
        .tokens
        .len();
        let d = self.embedding;
        let kv = d / self.heads * self.kv_heads;
        let ff = self.feed_forward;
        let mut per_layer = 2 * d + d * d + 2 * kv * d + d * d + 3 * ff * d;
        if self.architecture == TinyArchitecture::Qwen2 {
            per_layer += d + 2 * kv;
        }
        (2 * vocab * d + d + self.layers * per_layer) as u64
    }
}
