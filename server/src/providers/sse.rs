//! A server-sent events parser and the stream that turns an SSE response body
//! into [`StreamEvent`]s through a provider's translator.

use std::collections::VecDeque;

use futures_util::stream;

use super::EventStream;
use super::http::body_error;
use crate::chat::StreamEvent;
use crate::error::ProviderError;

/// One SSE event: its `event:` name (empty when absent) and its joined
/// `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field.
    pub event: String,
    /// The `data:` lines, joined by `\n`.
    pub data: String,
}

/// An incremental SSE parser: feed it body chunks as they arrive.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    /// Parses `chunk`, appending every completed event to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        for &b in chunk {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.line_done(&String::from_utf8_lossy(&line), out);
            } else {
                self.line.push(b);
            }
        }
    }

    fn line_done(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_data || !self.current.event.is_empty() {
                out.push(std::mem::take(&mut self.current));
            }
            self.has_data = false;
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.current.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

/// Turns a provider's SSE events into [`StreamEvent`]s.
pub trait SseTranslator: Send + 'static {
    /// Handles one SSE event. Pushing an `Err` ends the stream.
    fn on_event(&mut self, event: SseEvent, out: &mut VecDeque<Result<StreamEvent, ProviderError>>);

    /// Called once when the body ends; may push the final events.
    fn on_end(&mut self, out: &mut VecDeque<Result<StreamEvent, ProviderError>>);
}

struct SseState<T> {
    response: reqwest::Response,
    parser: SseParser,
    translator: T,
    pending: VecDeque<Result<StreamEvent, ProviderError>>,
    finished: bool,
}

/// Streams `response`'s SSE body through `translator`. Each delta is yielded
/// as soon as its chunk arrives; the stream ends after the first error or a
/// stop. Dropping the stream drops the response and so the connection.
pub fn sse_stream<T: SseTranslator>(response: reqwest::Response, translator: T) -> EventStream {
    let state = SseState {
        response,
        parser: SseParser::default(),
        translator,
        pending: VecDeque::new(),
        finished: false,
    };
    Box::pin(stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.pending.pop_front() {
                if matches!(item, Err(_) | Ok(StreamEvent::Stop(_))) {
                    st.pending.clear();
                    st.finished = true;
                }
                return Some((item, st));
            }
            if st.finished {
                return None;
            }
            match st.response.chunk().await {
                Ok(Some(bytes)) => {
                    let mut events = Vec::new();
                    st.parser.push(&bytes, &mut events);
                    for event in events {
                        st.translator.on_event(event, &mut st.pending);
                    }
                }
                Ok(None) => {
                    // An event not closed by a blank line still counts.
                    let mut events = Vec::new();
                    st.parser.push(b"\n\n", &mut events);
                    for event in events {
                        st.translator.on_event(event, &mut st.pending);
                    }
                    st.translator.on_end(&mut st.pending);
                    st.finished = true;
                    if st.pending.is_empty() {
                        return None;
                    }
                }
                Err(e) => {
                    st.pending.push_back(Err(body_error(&e)));
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&str]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c.as_bytes(), &mut out);
        }
        out
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
