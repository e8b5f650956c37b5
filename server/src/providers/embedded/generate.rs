//! One generation, run on a blocking thread: the prompt in one forward
//! pass, then one token per pass, each sent as soon as it is text. It ends
//! at an end-of-generation token (EndTurn), a stop sequence (StopSequence),
//! `max_tokens` or a full context (MaxTokens), and stops within one token
//! once the receiver is gone (the caller cancelled).

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Device, Tensor};
use candle_transformers::generation::LogitsProcessor;

use super::tokenizer::{Tokenizer, Utf8Stream};
use crate::chat::{StopReason, Usage};
use crate::error::{ErrorClass, ProviderError};

/// What a generation sends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Generated {
    /// Text, in order; one per token unless a character or a possible stop
    /// sequence spans tokens.
    Text(String),
    /// The end: why, and the real token counts.
    Finished { stop: StopReason, usage: Usage },
}

/// The channel a generation sends on. It is bounded: a reader that falls
/// behind pauses generation rather than piling text up in memory.
pub(crate) type Sender = tokio::sync::mpsc::Sender<Result<Generated, ProviderError>>;

/// A model that gives the next token's logits.
pub(crate) trait NextToken {
    /// Runs `tokens` at positions `pos..` (0 starts a new sequence).
    fn logits(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, String>;
}

/// One request's generation parameters.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
    pub context_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub stop_sequences: Vec<String>,
}

fn model_error(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(
        ErrorClass::ServerError,
        format!("the local model failed: {e}"),
    )
}

/// Runs `job` on `model`, sending its text on `tx`; `generated` counts
/// every token sampled. Returns the last item, [`Generated::Finished`] or
/// an error, for the caller to send once it has freed the session (so a
/// caller that saw the end finds the session free); `None` when the
/// receiver went away.
#[must_use]
pub(crate) fn generate(
    model: &mut dyn NextToken,
    tokenizer: &Tokenizer,
    job: Job,
    tx: &Sender,
    generated: &AtomicU64,
) -> Option<Result<Generated, ProviderError>> {
    let temperature = (job.temperature > 1e-7).then_some(job.temperature);
    let top_p = (job.top_p < 1.0).then_some(job.top_p);
    let mut sampler = LogitsProcessor::new(job.seed, temperature, top_p);
    let mut utf8 = Utf8Stream::default();
    let mut stops = StopMatcher::new(job.stop_sequences);
    let mut strip_space = tokenizer.strips_leading_space();
    let mut output_tokens = 0u32;
    let mut pos = job.prompt.len();
    let send =
        |text: String| text.is_empty() || tx.blocking_send(Ok(Generated::Text(text))).is_ok();

    if tx.is_closed() {
        return None;
    }
    let mut logits = match model.logits(&job.prompt, 0) {
        Ok(l) => l,
        Err(e) => return Some(Err(model_error(e))),
    };
    let stop = loop {
        // The caller is gone: stop before spending another forward pass.
        if tx.is_closed() {
            return None;
        }
        let next =
            match Tensor::new(logits.as_slice(), &Device::Cpu).and_then(|t| sampler.sample(&t)) {
                Ok(t) => t,
                Err(e) => return Some(Err(model_error(e))),
            };
        if tokenizer.is_end_of_generation(next) {
            break StopReason::EndTurn;
        }
        output_tokens += 1;
        generated.fetch_add(1, Ordering::Relaxed);
        let mut text = utf8.push(&tokenizer.token_bytes(next));
        if strip_space && !text.is_empty() {
            strip_space = false;
            if let Some(rest) = text.strip_prefix(' ') {
                text = rest.to_string();
            }
        }
        let (ready, hit) = stops.push(&text);
        if !send(ready) {
            return None;
        }
        if hit {
            break StopReason::StopSequence;
        }
        if output_tokens >= job.max_tokens || pos >= job.context_length {
            break StopReason::MaxTokens;
        }
        logits = match model.logits(&[next], pos) {
            Ok(l) => l,
            Err(e) => return Some(Err(model_error(e))),
        };
        pos += 1;
    };
    if stop != StopReason::StopSequence {
        let (ready, hit) = stops.push(&utf8.finish());
        let rest = if hit { String::new() } else { stops.flush() };
        if !send(ready + &rest) {
            return None;
        }
    }
    let usage = Usage {
        input_tokens: u32::try_from(job.prompt.len()).unwrap_or(u32::MAX),
        output_tokens,
    };
    Some(Ok(Generated::Finished { stop, usage }))
}

/// Finds stop sequences in streamed text. Text that could be the start of
/// a stop sequence is held back until the next piece decides it.
#[derive(Debug)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds `text`; returns the text safe to send and whether a stop
    /// sequence was found (the text before it is returned, the rest
    /// dropped).
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let before = self.held[..at].to_string();
            self.held.clear();
            return (before, true);
        }
        // Hold back the longest end of the text that starts a stop sequence.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let ready = self.held[..keep].to_string();
        self.held.drain(..keep);
        (ready, false)
    }

    /// What is still held back, at the end of generation.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value;
    use std::collections::HashMap;

    /// A model that always puts its mass on the next token of a script.
    struct Scripted {
        script: Vec<u32>,
        vocab: usize,
        calls: usize,
    }

    impl NextToken for Scripted {
        fn logits(&mut self, _tokens: &[u32], _pos: usize) -> Result<Vec<f32>, String> {
            let mut l = vec![0.0; self.vocab];
            let next = self.script.get(self.calls).copied().unwrap_or(0);
            l[next as usize] = 100.0;
            self.calls += 1;
            Ok(l)
        }
    }

    /// tokens: 0 `<s>`, 1 `</s>`, 2 `▁hello`, 3 `▁world`, 4 `<0xC3>`, 5 `<0xA9>`.
    fn tokenizer() -> Tokenizer {
        let tokens = ["<s>", "</s>", "▁hello", "▁world", "<0xC3>", "<0xA9>"];
        let md: HashMap<String, Value> = [
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(
                    tokens
                        .iter()
                        .map(|t| Value::String(t.to_string()))
                        .collect(),
                ),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array([3, 3, 1, 1, 6, 6].into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(0)),
            ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Tokenizer::from_gguf(&md).unwrap()
    }

    fn run(script: &[u32], max_tokens: u32, stops: &[&str]) -> Vec<Generated> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let mut model = Scripted {
            script: script.to_vec(),
            vocab: 6,
            calls: 0,
        };
        let job = Job {
            prompt: vec![0, 2],
            max_tokens,
            context_length: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
            stop_sequences: stops.iter().map(|s| s.to_string()).collect(),
        };
        let last = generate(&mut model, &tokenizer(), job, &tx, &AtomicU64::new(0));
        tx.blocking_send(last.unwrap()).unwrap();
        drop(tx);
        let mut out = Vec::new();
        while let Ok(item) = rx.try_recv() {
            out.push(item.unwrap());
        }
        out
    }

    fn finished(stop: StopReason, output_tokens: u32) -> Generated {
        Generated::Finished {
            stop,
            usage: Usage {
                input_tokens: 2,
                output_tokens,
            },
        }
    }

    fn text(s: &str) -> Generated {
        Generated::Text(s.into())
    }

    #[test]
    fn eos_ends_the_turn_and_the_first_space_is_dropped() {
        assert_eq!(
            run(&[2, 3, 1], 10, &[]),
            [
                text("hello"),
                text(" world"),
                finished(StopReason::EndTurn, 2)
            ]
        );
    }

    #[test]
    fn max_tokens_counts_tokens_and_characters_wait_for_their_bytes() {
        assert_eq!(
            run(&[2, 4, 5, 3], 3, &[]),
            [text("hello"), text("é"), finished(StopReason::MaxTokens, 3)]
        );
    }

    #[test]
    fn stop_sequences_across_tokens_cut_the_text() {
        // " wor" could start the stop sequence "world" only after " ".
        assert_eq!(
            run(&[2, 3, 2, 1], 10, &["o wo"]),
            [text("hell"), finished(StopReason::StopSequence, 2)]
        );
        // A held-back prefix that does not complete is released.
        assert_eq!(
            run(&[2, 3, 1], 10, &["o!"]),
            [
                text("hell"),
                text("o world"),
                finished(StopReason::EndTurn, 2)
            ]
        );
    }

    #[test]
    fn a_dropped_receiver_stops_generation() {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        drop(rx);
        let mut model = Scripted {
            script: vec![2; 100],
            vocab: 6,
            calls: 0,
        };
        let count = AtomicU64::new(0);
        let job = Job {
            prompt: vec![0],
            max_tokens: 100,
            context_length: 200,
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
            stop_sequences: Vec::new(),
        };
        assert_eq!(generate(&mut model, &tokenizer(), job, &tx, &count), None);
        assert_eq!(model.calls, 0);
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn stop_matcher_holds_only_possible_prefixes() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("X"), ("ENX".to_string(), false));
        assert_eq!(m.push("xxEND yy"), ("xx".to_string(), true));
    }
}
