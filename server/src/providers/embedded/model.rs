//! The model file: checks that it is GGUF, reads its metadata, tokenizer
//! and chat template, and loads its weights with candle (`llama` and
//! `qwen2` architectures, any quantization candle reads).
//!
//! Each session owns one [`Weights`] (its KV cache lives inside). A llama
//! model's copies share their weights (candle tensors are reference
//! counted); candle's qwen2 model cannot be cloned, so each of its sessions
//! loads the file again: memory grows with `max_sessions` for qwen2.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};

use super::template::ChatTemplate;
use super::tokenizer::Tokenizer;
use crate::providers::LocalModelInfo;

/// The context length used when the configuration sets none, below the
/// model's own when that is longer: the KV cache of every session grows to
/// it.
pub const DEFAULT_CONTEXT_LENGTH: u32 = 4096;

/// One session's model: weights plus its own KV cache.
pub(crate) enum Weights {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
}

impl Weights {
    /// Runs `tokens` at positions `pos..`; returns the next token's logits.
    /// Position 0 starts a new sequence (the cache is replaced).
    pub(crate) fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        let logits = match self {
            Self::Llama(m) => m.forward(&input, pos)?,
            Self::Qwen2(m) => m.forward(&input, pos)?,
        };
        logits
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()
    }
}

/// Everything read from the file.
pub(crate) struct LoadedModel {
    pub info: LocalModelInfo,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// One per session.
    pub sessions: Vec<Weights>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Architecture {
    Llama,
    Qwen2,
}

fn open(path: &Path) -> Result<(gguf_file::Content, BufReader<File>), String> {
    let file = File::open(path).map_err(|e| format!("cannot open the model file: {e}"))?;
    let mut reader = BufReader::new(file);
    let mut magic = [0u8; 4];
    reader
        .read_exact(&mut magic)
        .map_err(|_| "not a GGUF file (too short)".to_string())?;
    if &magic != b"GGUF" {
        return Err("not a GGUF file (no GGUF magic at its start)".into());
    }
    use std::io::Seek;
    reader
        .rewind()
        .map_err(|e| format!("cannot read the model file: {e}"))?;
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| format!("not a readable GGUF file: {e}"))?;
    Ok((content, reader))
}

fn load_weights(
    arch: Architecture,
    content: gguf_file::Content,
    reader: &mut BufReader<File>,
) -> Result<Weights, String> {
    let device = Device::Cpu;
    match arch {
        Architecture::Llama => {
            quantized_llama::ModelWeights::from_gguf(content, reader, &device).map(Weights::Llama)
        }
        Architecture::Qwen2 => {
            quantized_qwen2::ModelWeights::from_gguf(content, reader, &device).map(Weights::Qwen2)
        }
    }
    .map_err(|e| format!("cannot load its weights: {e}"))
}

fn md_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    match md.get(key)? {
        Value::U32(v) => Some(*v),
        Value::I32(v) => u32::try_from(*v).ok(),
        Value::U64(v) => u32::try_from(*v).ok(),
        Value::I64(v) => u32::try_from(*v).ok(),
        _ => None,
    }
}

/// Loads the model at `path` for `sessions` sessions. The error says what
/// is wrong with the file; the caller names the path and the key.
pub(crate) fn load(
    path: &Path,
    context_length: Option<u32>,
    sessions: usize,
) -> Result<LoadedModel, String> {
    let (content, mut reader) = open(path)?;
    let md = &content.metadata;
    let arch_name = match md.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err("its metadata has no `general.architecture`".into()),
    };
    let arch = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(format!(
                "architecture `{other}` is not supported (llama, qwen2)"
            ));
        }
    };
    // candle's llama precomputes rotary tables for 4096 positions; qwen2's
    // for the file's own context length.
    let trained = md_u32(md, &format!("{arch_name}.context_length"));
    let supported = match arch {
        Architecture::Llama => trained
            .unwrap_or(4096)
            .min(quantized_llama::MAX_SEQ_LEN as u32),
        Architecture::Qwen2 => trained.unwrap_or(DEFAULT_CONTEXT_LENGTH),
    };
    let context_length = match context_length {
        Some(n) if n > supported => {
            return Err(format!(
                "context_length {n} is more than this model supports ({supported})"
            ));
        }
        Some(n) => n,
        None => supported.min(DEFAULT_CONTEXT_LENGTH),
    };
    let tokenizer =
        Tokenizer::from_gguf(md).map_err(|e| format!("its tokenizer cannot be used: {e}"))?;
    let template_source = match md.get("tokenizer.chat_template") {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    };
    let template = ChatTemplate::new(template_source, tokenizer.bos_text(), tokenizer.eos_text())?;
    let parameter_count: u64 = content
        .tensor_infos
        .values()
        .map(|t| t.shape.elem_count() as u64)
        .sum();
    let info = LocalModelInfo {
        file_name: path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        parameter_count,
        context_length,
    };
    let first = load_weights(arch, content, &mut reader)?;
    let mut weights = Vec::with_capacity(sessions);
    match first {
        Weights::Llama(m) => {
            for _ in 1..sessions {
                weights.push(Weights::Llama(m.clone()));
            }
            weights.push(Weights::Llama(m));
        }
        Weights::Qwen2(m) => {
            weights.push(Weights::Qwen2(m));
            for _ in 1..sessions {
                let (content, mut reader) = open(path)?;
                weights.push(load_weights(arch, content, &mut reader)?);
            }
        }
    }
    Ok(LoadedModel {
        info,
        tokenizer,
        template,
        sessions: weights,
    })
}
