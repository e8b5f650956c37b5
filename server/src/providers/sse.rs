//! A server-sent events parser and the stream that turns an SSE response body
//! into [`StreamEvent`]s through a provider's translator.
//!
//! Memory stays bounded whatever the upstream sends: a line longer than the
//! limit, or an event whose data would exceed it, fails the stream before
//! it is buffered.

use std::collections::VecDeque;

use super::ApiKey;
use super::EventStream;
use super::http::body_error;
use crate::chat::StreamEvent;
use crate::error::{ErrorClass, ProviderError};

/// One SSE event: its `event:` name (empty when absent) and its joined
/// `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field.
    pub event: String,
    /// The `data:` lines, joined by `\n`.
    pub data: String,
}

/// An SSE line or event longer than the parser's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong {
    /// The limit, in bytes.
    pub limit: usize,
}

impl TooLong {
    /// The attempt's error: an upstream protocol error that broke the stream.
    pub(crate) fn to_error(self) -> ProviderError {
        ProviderError::new(
            ErrorClass::StreamInterrupted,
            format!(
                "the upstream sent an SSE line or event larger than {} bytes (the provider's max_event_bytes)",
                self.limit
            ),
        )
    }
}

/// An incremental SSE parser: feed it body chunks as they arrive. A line
/// longer than `max_bytes`, or an event with more data than that, is an
/// error, found before the line is buffered, so the buffer never holds more
/// than `max_bytes`.
#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    current: SseEvent,
    has_data: bool,
    max_bytes: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(super::http::DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseParser {
    /// A parser that accepts lines and events up to `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            current: SseEvent::default(),
            has_data: false,
            max_bytes,
        }
    }

    /// The bytes held for the line being read (its buffer's capacity).
    pub fn buffered_capacity(&self) -> usize {
        self.line.capacity() + self.current.data.capacity() + self.current.event.capacity()
    }

    /// Parses `chunk`, appending every completed event to `out`. After an
    /// error the parser should not be fed again.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), TooLong> {
        self.push_each(chunk, |event| out.push(event.clone()))
    }

    /// Parses `chunk`, handing every completed event to `each` as it
    /// completes. The event's buffers are the parser's own, reused for the
    /// next event: nothing is allocated per event.
    pub(crate) fn push_each(
        &mut self,
        chunk: &[u8],
        mut each: impl FnMut(&SseEvent),
    ) -> Result<(), TooLong> {
        let mut rest = chunk;
        while !rest.is_empty() {
            let newline = memchr::memchr(b'\n', rest);
            let piece = &rest[..newline.unwrap_or(rest.len())];
            if piece.len() > self.max_bytes.saturating_sub(self.line.len()) {
                self.line = Vec::new();
                return Err(TooLong {
                    limit: self.max_bytes,
                });
            }
            if let Some(at) = newline
                && self.line.is_empty()
            {
                // A whole line inside the chunk is read where it is.
                rest = &rest[at + 1..];
                self.bytes_done(piece, &mut each)?;
                continue;
            }
            // Amortized growth, capped at the limit: the buffer never holds
            // more than `max_bytes`.
            let needed = self.line.len() + piece.len();
            if needed > self.line.capacity() {
                let target = needed
                    .max(self.line.capacity().saturating_mul(2))
                    .min(self.max_bytes);
                self.line.reserve_exact(target - self.line.len());
            }
            self.line.extend_from_slice(piece);
            let Some(at) = newline else { break };
            rest = &rest[at + 1..];
            let mut line = std::mem::take(&mut self.line);
            let result = self.bytes_done(&line, &mut each);
            // Keep the allocation for the next line.
            line.clear();
            self.line = line;
            result?;
        }
        Ok(())
    }

    /// One line's bytes, without its `\n` (a trailing `\r` is dropped here).
    fn bytes_done(&mut self, line: &[u8], each: &mut impl FnMut(&SseEvent)) -> Result<(), TooLong> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // Valid UTF-8 (the norm) is checked on the fast path.
        match std::str::from_utf8(line) {
            Ok(text) => self.line_done(text, each),
            Err(_) => self.line_done(&String::from_utf8_lossy(line), each),
        }
    }

    /// Ends the body: an event not closed by a blank line still counts.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), TooLong> {
        self.push(b"\n\n", out)
    }

    /// [`Self::finish`], handing the last event to `each`.
    pub(crate) fn finish_each(&mut self, each: impl FnMut(&SseEvent)) -> Result<(), TooLong> {
        self.push_each(b"\n\n", each)
    }

    fn line_done(&mut self, line: &str, each: &mut impl FnMut(&SseEvent)) -> Result<(), TooLong> {
        if line.is_empty() {
            if self.has_data || !self.current.event.is_empty() {
                each(&self.current);
                // The buffers stay for the next event.
                self.current.event.clear();
                self.current.data.clear();
            }
            self.has_data = false;
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => {
                self.current.event.clear();
                self.current.event.push_str(value);
            }
            "data" => {
                let joined = self
                    .current
                    .data
                    .len()
                    .saturating_add(value.len())
                    .saturating_add(usize::from(self.has_data));
                if joined > self.max_bytes {
                    self.current = SseEvent::default();
                    return Err(TooLong {
                        limit: self.max_bytes,
                    });
                }
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Turns a provider's SSE events into [`StreamEvent`]s.
pub trait SseTranslator: Send + 'static {
    /// Handles one SSE event. Pushing an `Err` ends the stream.
    fn on_event(
        &mut self,
        event: &SseEvent,
        out: &mut VecDeque<Result<StreamEvent, ProviderError>>,
    );

    /// Called once when the body ends; may push the final events.
    fn on_end(&mut self, out: &mut VecDeque<Result<StreamEvent, ProviderError>>);
}

/// Feeds `chunk` through `parser` and every event it completes through
/// `translator` (the body's end for `None`), with `key` redacted from every
/// error it reports. A line or event over the limit ends with its error.
fn translate<T: SseTranslator>(
    parser: &mut SseParser,
    translator: &mut T,
    chunk: Option<&[u8]>,
    key: Option<&ApiKey>,
    out: &mut VecDeque<Result<StreamEvent, ProviderError>>,
) -> Result<(), TooLong> {
    let each = |event: &SseEvent| translator.on_event(event, out);
    let parsed = match chunk {
        Some(chunk) => parser.push_each(chunk, each),
        None => parser.finish_each(each),
    };
    redact_errors(key, out);
    parsed
}

fn redact_errors(key: Option<&ApiKey>, out: &mut VecDeque<Result<StreamEvent, ProviderError>>) {
    if let Some(key) = key {
        for item in out.iter_mut() {
            if let Err(e) = item {
                e.message = key.redact(&e.message);
            }
        }
    }
}

/// Runs `body` (chunks as they arrive) through a parser and `translator`
/// without a network: what [`sse_stream`] does, for tests and fuzzing.
pub fn translate_body<'a, T: SseTranslator>(
    body: impl IntoIterator<Item = &'a [u8]>,
    mut translator: T,
    max_event_bytes: usize,
    key: Option<&ApiKey>,
) -> Vec<Result<StreamEvent, ProviderError>> {
    let mut parser = SseParser::new(max_event_bytes);
    let mut pending = VecDeque::new();
    let mut done = Vec::new();
    let take = |pending: &mut VecDeque<_>, done: &mut Vec<_>| {
        while let Some(item) = pending.pop_front() {
            let last = matches!(item, Err(_) | Ok(StreamEvent::Stop(_)));
            done.push(item);
            if last {
                pending.clear();
                return true;
            }
        }
        false
    };
    for chunk in body {
        let parsed = translate(&mut parser, &mut translator, Some(chunk), key, &mut pending);
        if let Err(e) = parsed {
            pending.push_back(Err(e.to_error()));
        }
        if take(&mut pending, &mut done) {
            return done;
        }
    }
    let parsed = translate(&mut parser, &mut translator, None, key, &mut pending);
    if let Err(e) = parsed {
        pending.push_back(Err(e.to_error()));
    } else {
        translator.on_end(&mut pending);
        redact_errors(key, &mut pending);
    }
    take(&mut pending, &mut done);
    done
}

struct SseState<T> {
    response: super::http::BodyStream,
    parser: SseParser,
    translator: T,
    key: Option<ApiKey>,
    pending: VecDeque<Result<StreamEvent, ProviderError>>,
    finished: bool,
}

/// Streams `response`'s SSE body through `translator`, failing the stream on
/// a line or event larger than `max_event_bytes`. Each delta is yielded as
/// soon as its chunk arrives; the stream ends after the first error or a
/// stop; `key` is redacted from every error. Dropping the stream drops the
/// response and so the connection.
pub(crate) fn sse_stream<T: SseTranslator + Unpin>(
    response: reqwest::Response,
    translator: T,
    max_event_bytes: usize,
    key: Option<ApiKey>,
) -> EventStream {
    Box::pin(SseState {
        response: super::http::BodyStream::new(response),
        parser: SseParser::new(max_event_bytes),
        translator,
        key,
        pending: VecDeque::new(),
        finished: false,
    })
}

/// A stream written by hand rather than through `unfold`: no future is
/// built per event, and the state lives in the stream's one box.
impl<T: SseTranslator + Unpin> futures_core::Stream for SseState<T> {
    type Item = Result<StreamEvent, ProviderError>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let st = self.get_mut();
        loop {
            if let Some(item) = st.pending.pop_front() {
                if matches!(item, Err(_) | Ok(StreamEvent::Stop(_))) {
                    st.pending.clear();
                    st.finished = true;
                }
                return Poll::Ready(Some(item));
            }
            if st.finished {
                return Poll::Ready(None);
            }
            match std::task::ready!(st.response.poll_chunk(cx)) {
                Ok(Some(bytes)) => {
                    let parsed = translate(
                        &mut st.parser,
                        &mut st.translator,
                        Some(&bytes),
                        st.key.as_ref(),
                        &mut st.pending,
                    );
                    if let Err(e) = parsed {
                        st.pending.push_back(Err(e.to_error()));
                    }
                }
                Ok(None) => {
                    let parsed = translate(
                        &mut st.parser,
                        &mut st.translator,
                        None,
                        st.key.as_ref(),
                        &mut st.pending,
                    );
                    match parsed {
                        Err(e) => st.pending.push_back(Err(e.to_error())),
                        Ok(()) => {
                            st.translator.on_end(&mut st.pending);
                            redact_errors(st.key.as_ref(), &mut st.pending);
                        }
                    }
                    st.finished = true;
                    if st.pending.is_empty() {
                        return Poll::Ready(None);
                    }
                }
                Err(e) => {
                    st.pending.push_back(Err(body_error(&e)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&str]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c.as_bytes(), &mut out).unwrap();
        }
        out
    }

    #[test]
    fn a_line_over_the_limit_fails_without_being_buffered() {
        let mut p = SseParser::new(1024);
        let mut out = Vec::new();
        p.push(b"data: ", &mut out).unwrap();
        // Megabytes in small chunks, never a newline: the buffer stops at
        // the limit.
        let chunk = [b'x'; 100];
        let mut failed = false;
        for _ in 0..50_000 {
            assert!(
                p.buffered_capacity() <= 1024 * 2,
                "{}",
                p.buffered_capacity()
            );
            if p.push(&chunk, &mut out).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
        assert!(p.buffered_capacity() <= 1024 * 2);
        // One huge chunk fails as well, before it is copied.
        let mut p = SseParser::new(1024);
        assert_eq!(
            p.push(&vec![b'y'; 10 << 20], &mut out),
            Err(TooLong { limit: 1024 })
        );
        assert!(p.buffered_capacity() <= 1024 * 2);
        assert!(out.is_empty());
    }

    #[test]
    fn an_event_of_many_short_lines_over_the_limit_fails() {
        let mut p = SseParser::new(64);
        let mut out = Vec::new();
        let mut result = Ok(());
        for _ in 0..100 {
            result = p.push(b"data: 0123456789\n", &mut out);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(TooLong { limit: 64 }));
        assert!(p.buffered_capacity() <= 64 * 3);
        assert!(out.is_empty());
    }

    #[test]
    fn lines_up_to_the_limit_pass() {
        let mut p = SseParser::new(16);
        let mut out = Vec::new();
        p.push(b"data: 0123456789\n\n", &mut out).unwrap();
        assert_eq!(out[0].data, "0123456789");
    }

    #[test]
    fn events_split_across_chunks() {
        let out = parse(&[
            "event: a\nda",
            "ta: {\"x\":1}\n",
            "\nevent: b\r\ndata: 2\r\n\r\n",
        ]);
        assert_eq!(
            out,
            [
                SseEvent {
                    event: "a".into(),
                    data: "{\"x\":1}".into()
                },
                SseEvent {
                    event: "b".into(),
                    data: "2".into()
                },
            ]
        );
    }

    #[test]
    fn comments_and_multiline_data() {
        let out = parse(&[": ping\n\ndata: one\ndata: two\n\n"]);
        assert_eq!(
            out,
            [SseEvent {
                event: String::new(),
                data: "one\ntwo".into()
            }]
        );
    }
}
