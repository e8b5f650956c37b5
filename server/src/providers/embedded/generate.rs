//! One generation, run on its session's thread: the prompt (past what the
//! session's prefix cache already holds) in batched forward passes, then
//! one token per pass, each sent as soon as it is text. It ends at an
//! end-of-generation token (EndTurn), a stop sequence (StopSequence),
//! `max_tokens` or a full context (MaxTokens), and stops within one token
//! once the receiver is gone (the caller cancelled).
//!
//! A caller that stops reading fills the bounded channel; the session then
//! waits for room at most the job's reader timeout ([`Reader`]). Past it
//! the generation ends, the session is freed for other requests, and the
//! caller, if it ever reads on, gets what was sent and then `Cancelled`,
//! naming the wait: no session is held by a caller that does not read.

use std::sync::atomic::{AtomicU64, Ordering};

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

/// How long a generation waits for a caller that does not read, and where
/// it leaves the reason when it gives up (the channel is full then, so the
/// reason cannot go through it).
#[derive(Debug, Clone)]
pub(crate) struct Reader {
    pub timeout: std::time::Duration,
    pub gave_up: std::sync::Arc<std::sync::OnceLock<ProviderError>>,
}

impl Reader {
    pub(crate) fn new(timeout: std::time::Duration) -> Self {
        Self {
            timeout,
            gave_up: std::sync::Arc::default(),
        }
    }

    /// Sends `item`, waiting while the channel is full for at most
    /// `timeout`. The session's thread is not on the runtime, so it looks
    /// again at growing intervals (at most 5 ms) rather than park on it.
    /// `false`: the caller is gone, or read nothing for `timeout` (the
    /// reason is then left in `gave_up`).
    pub(crate) fn send(&self, tx: &Sender, item: Result<Generated, ProviderError>) -> bool {
        use tokio::sync::mpsc::error::TrySendError;
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_micros(50);
        let mut item = item;
        loop {
            match tx.try_send(item) {
                Ok(()) => return true,
                Err(TrySendError::Closed(_)) => return false,
                Err(TrySendError::Full(back)) => {
                    let waited = started.elapsed();
                    if waited >= self.timeout {
                        let _ = self.gave_up.set(ProviderError::new(
                            ErrorClass::Cancelled,
                            format!(
                                "the caller read nothing for {} ms while the local model's answer waited; its session was freed",
                                self.timeout.as_millis()
                            ),
                        ));
                        return false;
                    }
                    item = back;
                    std::thread::sleep(pause.min(self.timeout.saturating_sub(waited)));
                    pause = (pause * 2).min(std::time::Duration::from_millis(5));
                }
            }
        }
    }
}

/// A model that samples the next token.
pub(crate) trait NextToken {
    /// Prepares for `job` (its sampler, its cache); returns how many of the
    /// prompt's first tokens the cache already holds, always fewer than
    /// the whole prompt.
    fn begin(&mut self, job: &Job) -> Result<usize, String>;
    /// Runs `tokens` after those the cache holds, and samples the next.
    fn next(&mut self, tokens: &[u32]) -> Result<u32, String>;
}

/// What a token is, as text.
pub(crate) trait TokenText {
    /// Whether `id` ends the turn (end of sequence, end of turn).
    fn is_end_of_generation(&self, id: u32) -> bool;
    /// Appends the bytes of `id` (a byte token is one byte of a character).
    fn token_bytes(&self, id: u32, out: &mut Vec<u8>);
    /// Whether the answer's first space is the vocabulary's word marker
    /// rather than text.
    fn strips_leading_space(&self) -> bool;
}

/// What the sessions count, over all requests.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Tokens sampled.
    pub generated: AtomicU64,
    /// Prompt tokens run through the model (those the prefix cache did
    /// not already hold).
    pub prefilled: AtomicU64,
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
    pub reader: Reader,
}

fn model_error(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(
        ErrorClass::ServerError,
        format!("the local model failed: {e}"),
    )
}

/// Runs `job` on `model`, sending its text on `tx`; `counters` count
/// every token sampled and every prompt token run. Returns the last item, [`Generated::Finished`] or
/// an error, for the caller to send once it has freed the session (so a
/// caller that saw the end finds the session free); `None` when the
/// receiver went away or stopped reading (see [`Reader`]).
#[must_use]
pub(crate) fn generate(
    model: &mut dyn NextToken,
    tokenizer: &dyn TokenText,
    mut job: Job,
    tx: &Sender,
    counters: &Counters,
) -> Option<Result<Generated, ProviderError>> {
    let mut utf8 = Utf8Stream::default();
    let mut stops = StopMatcher::new(std::mem::take(&mut job.stop_sequences));
    let mut strip_space = tokenizer.strips_leading_space();
    let mut output_tokens = 0u32;
    let mut pos = job.prompt.len();
    let reader = job.reader.clone();
    let send = |text: String| text.is_empty() || reader.send(tx, Ok(Generated::Text(text)));

    if tx.is_closed() {
        return None;
    }
    let mut bytes = Vec::new();
    let mut next = match model.begin(&job).and_then(|cached| {
        let rest = &job.prompt[cached.min(job.prompt.len())..];
        counters
            .prefilled
            .fetch_add(rest.len() as u64, Ordering::Relaxed);
        model.next(rest)
    }) {
        Ok(t) => t,
        Err(e) => return Some(Err(model_error(e))),
    };
    let stop = loop {
        // The caller is gone: stop before spending another forward pass.
        if tx.is_closed() {
            return None;
        }
        if tokenizer.is_end_of_generation(next) {
            break StopReason::EndTurn;
        }
        output_tokens += 1;
        counters.generated.fetch_add(1, Ordering::Relaxed);
        bytes.clear();
        tokenizer.token_bytes(next, &mut bytes);
        let mut text = utf8.push(&bytes);
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
        next = match model.next(&[next]) {
            Ok(t) => t,
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

/// Stop sequences a request may give the embedded provider: each is
/// checked against the text after every token, on the session's thread.
pub(crate) const MAX_STOP_SEQUENCES: usize = 16;
/// The longest stop sequence, in bytes.
pub(crate) const MAX_STOP_BYTES: usize = 256;

/// Refuses stop sequences past [`MAX_STOP_SEQUENCES`] or [`MAX_STOP_BYTES`],
/// naming the field and the sequence.
pub(crate) fn check_stop_sequences(stops: &[String]) -> Result<(), String> {
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(format!(
            "stop_sequences: the embedded provider takes at most {MAX_STOP_SEQUENCES} (got {})",
            stops.len()
        ));
    }
    if let Some((i, stop)) = stops
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > MAX_STOP_BYTES)
    {
        return Err(format!(
            "stop_sequences[{i}]: the embedded provider takes stop sequences of at most {MAX_STOP_BYTES} bytes (got {})",
            stop.len()
        ));
    }
    Ok(())
}

/// Finds stop sequences in streamed text. Text that could be the start of
/// a stop sequence is held back until the next piece decides it.
///
/// What it holds is shorter than the longest stop sequence, so each piece
/// costs at most (held + piece) x sequences x longest comparisons.
#[derive(Debug)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// The longest stop sequence's length, in bytes.
    longest: usize,
    held: String,
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            longest: stops.iter().map(String::len).max().unwrap_or(0),
            stops,
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
        // Hold back the longest end of the text that starts a stop sequence
        // (shorter than the longest one: a whole one was found above).
        let from = self.held.len().saturating_sub(self.longest);
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .skip_while(|&i| i < from)
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

    /// A model that samples the next token of a script.
    struct Scripted {
        script: Vec<u32>,
        calls: usize,
    }

    impl NextToken for Scripted {
        fn begin(&mut self, _job: &Job) -> Result<usize, String> {
            Ok(0)
        }

        fn next(&mut self, _tokens: &[u32]) -> Result<u32, String> {
            let next = self.script.get(self.calls).copied().unwrap_or(0);
            self.calls += 1;
            Ok(next)
        }
    }

    /// tokens: 0 `<s>`, 1 `</s>`, 2 `▁hello`, 3 `▁world`, 4 `<0xC3>`, 5 `<0xA9>`.
    struct Vocab;

    impl TokenText for Vocab {
        fn is_end_of_generation(&self, id: u32) -> bool {
            id == 1
        }

        fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
            match id {
                2 => out.extend_from_slice(b" hello"),
                3 => out.extend_from_slice(b" world"),
                4 => out.push(0xC3),
                5 => out.push(0xA9),
                _ => {}
            }
        }

        fn strips_leading_space(&self) -> bool {
            true
        }
    }

    fn run(script: &[u32], max_tokens: u32, stops: &[&str]) -> Vec<Generated> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let mut model = Scripted {
            script: script.to_vec(),
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
            reader: Reader::new(std::time::Duration::from_secs(5)),
        };
        let last = generate(&mut model, &Vocab, job, &tx, &Counters::default());
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

    /// Over generated texts, pieces and stop sequences, the matcher's
    /// output is what generation would keep: after the first piece whose
    /// text so far holds a stop sequence, that text up to the earliest
    /// such sequence (or all of the text, if none ever appears), whatever
    /// the pieces; and what it holds back stays shorter than the longest
    /// sequence.
    #[test]
    fn the_stop_matcher_cuts_where_the_text_so_far_first_matches() {
        let rng = crate::retry::Jitter::seeded(7);
        let below = |n: usize| (rng.next_unit() * n as f64) as usize;
        let alphabet = ["a", "b", "é", " "];
        let word = |len: usize| (0..len).map(|_| alphabet[below(4)]).collect::<String>();
        for _ in 0..3_000 {
            let stops: Vec<String> = (0..1 + below(4)).map(|_| word(1 + below(5))).collect();
            let pieces: Vec<String> = (0..1 + below(12)).map(|_| word(below(6))).collect();
            let mut so_far = String::new();
            let mut first = None;
            for piece in &pieces {
                so_far.push_str(piece);
                first = stops.iter().filter_map(|s| so_far.find(s.as_str())).min();
                if first.is_some() {
                    break;
                }
            }
            let expected = first.map_or(so_far.as_str(), |at| &so_far[..at]);
            let longest = stops.iter().map(String::len).max().unwrap();
            let mut matcher = StopMatcher::new(stops.clone());
            let (mut out, mut hit) = (String::new(), false);
            for piece in &pieces {
                let (ready, found) = matcher.push(piece);
                out.push_str(&ready);
                if found {
                    hit = true;
                    break;
                }
                assert!(matcher.held.len() < longest, "{stops:?} {pieces:?}");
            }
            if !hit {
                out.push_str(&matcher.flush());
            }
            assert_eq!(hit, first.is_some(), "{stops:?} {pieces:?}");
            assert_eq!(out, expected, "{stops:?} {pieces:?}");
        }
    }

    #[test]
    fn stop_sequences_past_the_bounds_are_refused_naming_the_field() {
        let most = vec!["x".repeat(MAX_STOP_BYTES); MAX_STOP_SEQUENCES];
        assert_eq!(check_stop_sequences(&most), Ok(()));
        let many = vec!["x".to_string(); MAX_STOP_SEQUENCES + 1];
        let why = check_stop_sequences(&many).unwrap_err();
        assert!(why.starts_with("stop_sequences:"), "{why}");
        assert!(why.contains("at most 16 (got 17)"), "{why}");
        let long = vec!["a".into(), "b".into(), "y".repeat(MAX_STOP_BYTES + 1)];
        let why = check_stop_sequences(&long).unwrap_err();
        assert!(why.starts_with("stop_sequences[2]:"), "{why}");
        assert!(why.contains("got 257"), "{why}");
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
            calls: 0,
        };
        let count = Counters::default();
        let job = Job {
            prompt: vec![0],
            max_tokens: 100,
            context_length: 200,
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
            stop_sequences: Vec::new(),
            reader: Reader::new(std::time::Duration::from_secs(5)),
        };
        assert_eq!(generate(&mut model, &Vocab, job, &tx, &count), None);
        assert_eq!(model.calls, 0);
        assert_eq!(count.generated.load(Ordering::Relaxed), 0);
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
