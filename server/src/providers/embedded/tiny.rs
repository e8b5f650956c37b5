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
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

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
        tokens.push(p);
        types.push(1);
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

fn quantized(data: Vec<f32>, rows: usize, cols: usize) -> Result<QTensor, String> {
    let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).map_err(|e| e.to_string())?;
    QTensor::quantize(&t, GgmlDType::Q8_0).map_err(|e| e.to_string())
}

fn plain(data: Vec<f32>) -> Result<QTensor, String> {
    let n = data.len();
    let t = Tensor::from_vec(data, n, &Device::Cpu).map_err(|e| e.to_string())?;
    QTensor::quantize(&t, GgmlDType::F32).map_err(|e| e.to_string())
}

fn strings(items: &[String]) -> Value {
    Value::Array(items.iter().cloned().map(Value::String).collect())
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

        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        // Dimension 0 of every embedding is the constant 1.
        let mut embd = rng.matrix(n_vocab, d, 1.0);
        for row in embd.chunks_mut(d) {
            row[0] = 1.0;
        }
        tensors.push(("token_embd.weight".into(), quantized(embd, n_vocab, d)?));
        tensors.push(("output_norm.weight".into(), plain(vec![1.0; d])?));
        let mut output = rng.matrix(n_vocab, d, 2.0 * scale(d));
        for (row, silent) in output.chunks_mut(d).zip(&vocab.silent) {
            if *silent {
                row.fill(0.0);
                row[0] = -1000.0;
            } else {
                row[0] = 0.0;
            }
        }
        tensors.push(("output.weight".into(), quantized(output, n_vocab, d)?));
        for layer in 0..self.layers {
            let p = format!("blk.{layer}");
            // Writes into the residual stream leave dimension 0 alone.
            let mut attn_output = rng.matrix(d, d, scale(d));
            attn_output[..d].fill(0.0);
            let mut ffn_down = rng.matrix(d, ff, scale(ff));
            ffn_down[..ff].fill(0.0);
            let mut layer_tensors = vec![
                ("attn_norm.weight", plain(vec![1.0; d])?),
                (
                    "attn_q.weight",
                    quantized(rng.matrix(d, d, scale(d)), d, d)?,
                ),
                (
                    "attn_k.weight",
                    quantized(rng.matrix(kv, d, scale(d)), kv, d)?,
                ),
                (
                    "attn_v.weight",
                    quantized(rng.matrix(kv, d, scale(d)), kv, d)?,
                ),
                ("attn_output.weight", quantized(attn_output, d, d)?),
                ("ffn_norm.weight", plain(vec![1.0; d])?),
                (
                    "ffn_gate.weight",
                    quantized(rng.matrix(ff, d, scale(d)), ff, d)?,
                ),
                (
                    "ffn_up.weight",
                    quantized(rng.matrix(ff, d, scale(d)), ff, d)?,
                ),
                ("ffn_down.weight", quantized(ffn_down, d, ff)?),
            ];
            if self.architecture == TinyArchitecture::Qwen2 {
                layer_tensors.push(("attn_q.bias", plain(rng.matrix(1, d, 0.1))?));
                layer_tensors.push(("attn_k.bias", plain(rng.matrix(1, kv, 0.1))?));
                layer_tensors.push(("attn_v.bias", plain(rng.matrix(1, kv, 0.1))?));
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
            metadata.push(("tokenizer.ggml.merges".into(), strings(&vocab.merges)));
            metadata.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
        }
        metadata.push(("tokenizer.ggml.tokens".into(), strings(&vocab.tokens)));
        metadata.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.types.iter().map(|t| Value::I32(*t)).collect()),
        ));
        metadata.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(vocab.scores.iter().map(|s| Value::F32(*s)).collect()),
        ));
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
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut w, &md, &ts).map_err(|e| e.to_string())?;
        use std::io::Write;
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
