//! The built-in `mock` provider: deterministic answers with no network, for
//! demos, tests and benchmarks. It echoes the last user text (or generates N
//! words), honours `max_tokens` and stop sequences, calls a tool when
//! `tool_choice` asks for one, and can script latency and faults from its
//! config: fail the first K calls with a chosen class, status and
//! Retry-After, or break every stream after N chunks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, stream};

use super::{EventStream, Provider};
use crate::chat::{
    ChatRequest, ChatResponse, Content, Role, StopReason, StreamEvent, ToolChoice, Usage,
};
use crate::config::{ConfigError, MockConfig};
use crate::error::{ErrorClass, ProviderError};

/// The model name reported when none is configured or requested.
pub const DEFAULT_MODEL: &str = "mock-1";

const WORDS: [&str; 16] = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Echo,
    Words(u32),
}

/// The deterministic provider.
#[derive(Debug)]
pub struct MockProvider {
    model: String,
    reply: Reply,
    latency: Duration,
    first_chunk: Duration,
    chunk_delay: Duration,
    fail_first: u64,
    fail_class: ErrorClass,
    fail_status: Option<u16>,
    fail_retry_after: Option<Duration>,
    break_after: Option<u32>,
    calls: AtomicU64,
}

impl MockProvider {
    /// Builds the provider from its section.
    pub fn new(c: &MockConfig) -> Result<Self, ConfigError> {
        let fail_class = match &c.fail_class {
            Some(name) => ErrorClass::parse(name)
                .ok_or_else(|| ConfigError(format!("mock fail_class: unknown class `{name}`")))?,
            None => ErrorClass::Overloaded,
        };
        let ms = |v: Option<u64>| Duration::from_millis(v.unwrap_or(0));
        Ok(Self {
            model: c.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into()),
            reply: match c.reply.as_deref() {
                Some("words") => Reply::Words(c.words.unwrap_or(12)),
                _ => Reply::Echo,
            },
            latency: ms(c.latency_ms),
            first_chunk: ms(c.first_chunk_ms),
            chunk_delay: ms(c.chunk_delay_ms),
            fail_first: u64::from(c.fail_first.unwrap_or(0)),
            fail_class,
            fail_status: c.fail_status,
            fail_retry_after: c.fail_retry_after_ms.map(Duration::from_millis),
            break_after: c.break_stream_after,
            calls: AtomicU64::new(0),
        })
    }

    /// Counts a call; fails it when it is one of the first `fail_first`.
    fn begin(&self) -> Result<u64, ProviderError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        if n < self.fail_first {
            let status = self.fail_status.or(match self.fail_class {
                ErrorClass::RateLimited => Some(429),
                ErrorClass::Overloaded => Some(529),
                ErrorClass::ServerError => Some(500),
                ErrorClass::InvalidRequest => Some(400),
                ErrorClass::Auth => Some(401),
                ErrorClass::NotFound => Some(404),
                ErrorClass::ContextLength => Some(413),
                ErrorClass::Timeout => Some(504),
                ErrorClass::TimeoutSilent => None,
                ErrorClass::Connection
                | ErrorClass::StreamInterrupted
                | ErrorClass::Busy
                | ErrorClass::Cancelled => None,
            });
            return Err(ProviderError {
                class: self.fail_class,
                http_status: status,
                message: format!("scripted mock failure {} of {}", n + 1, self.fail_first),
                retry_after: self.fail_retry_after,
                should_retry: None,
            });
        }
        Ok(n)
    }

    /// The answer for `req`: its text chunks (one word each) or a tool call.
    fn answer(&self, req: &ChatRequest) -> Answer {
        let input_tokens = count_words(req);
        let tool = match &req.tool_choice {
            ToolChoice::Tool(name) => Some(name.clone()),
            ToolChoice::Any => req.tools.first().map(|t| t.name.clone()),
            ToolChoice::Auto | ToolChoice::None => None,
        };
        if let Some(name) = tool {
            let input = serde_json::json!({ "text": last_user_text(req) }).to_string();
            return Answer {
                chunks: Vec::new(),
                tool: Some((name, input)),
                stop: StopReason::ToolUse,
                usage: Usage {
                    input_tokens,
                    output_tokens: 1,
                },
            };
        }
        let words: Vec<String> = match self.reply {
            Reply::Echo => last_user_text(req)
                .split_whitespace()
                .map(String::from)
                .collect(),
            Reply::Words(n) => (0..n as usize)
                .map(|i| WORDS[i % WORDS.len()].to_string())
                .collect(),
        };
        // A last assistant turn is a prefill: the answer continues after the
        // words it already holds.
        let prefilled = match req.messages.last() {
            Some(m) if m.role == Role::Assistant => m
                .content
                .iter()
                .map(|c| match c {
                    Content::Text(t) => t.split_whitespace().count(),
                    Content::ToolUse { .. } | Content::ToolResult { .. } => 0,
                })
                .sum(),
            _ => 0,
        };
        let mut chunks = Vec::new();
        let mut text = String::new();
        let mut stop = StopReason::EndTurn;
        for (i, word) in words.iter().enumerate().skip(prefilled) {
            if req
                .max_tokens
                .is_some_and(|max| (i - prefilled) as u32 >= max)
            {
                stop = StopReason::MaxTokens;
                break;
            }
            let chunk = if i == 0 {
                word.clone()
            } else {
                format!(" {word}")
            };
            text.push_str(&chunk);
            if let Some((cut, _)) = req
                .stop_sequences
                .iter()
                .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
                .min()
            {
                // The answer ends just before the stop sequence, which may
                // start in an earlier chunk.
                chunks.push(chunk);
                let mut excess = text.len() - cut;
                while excess > 0 {
                    let Some(last) = chunks.last_mut() else { break };
                    if last.len() <= excess {
                        excess -= last.len();
                        chunks.pop();
                    } else {
                        last.truncate(last.len() - excess);
                        excess = 0;
                    }
                }
                stop = StopReason::StopSequence;
                break;
            }
            chunks.push(chunk);
        }
        let output_tokens = chunks.len() as u32;
        Answer {
            chunks,
            tool: None,
            stop,
            usage: Usage {
                input_tokens,
                output_tokens,
            },
        }
    }
}

struct Answer {
    chunks: Vec<String>,
    tool: Option<(String, String)>,
    stop: StopReason,
    usage: Usage,
}

fn last_user_text(req: &ChatRequest) -> String {
    req.messages
        .iter()
        .rev()
        .filter(|m| m.role == Role::User)
        .flat_map(|m| m.content.iter())
        .find_map(|c| match c {
            Content::Text(t) => Some(t.clone()),
            Content::ToolResult { content, .. } => Some(content.clone()),
            Content::ToolUse { .. } => None,
        })
        .unwrap_or_default()
}

fn count_words(req: &ChatRequest) -> u32 {
    let system = req.system.split_whitespace().count();
    let messages: usize = req
        .messages
        .iter()
        .flat_map(|m| m.content.iter())
        .map(|c| match c {
            Content::Text(t) => t.split_whitespace().count(),
            Content::ToolUse { input_json, .. } => input_json.split_whitespace().count(),
            Content::ToolResult { content, .. } => content.split_whitespace().count(),
        })
        .sum();
    (system + messages) as u32
}

impl Provider for MockProvider {
    fn kind(&self) -> &'static str {
        "mock"
    }

    fn default_model(&self) -> &str {
        &self.model
    }

    fn supports_prefill(&self) -> bool {
        true
    }

    fn complete<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        async move {
            let n = self.begin()?;
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            let answer = self.answer(req);
            let mut content = Vec::new();
            if !answer.chunks.is_empty() {
                content.push(Content::Text(answer.chunks.concat()));
            }
            if let Some((name, input_json)) = answer.tool {
                content.push(Content::ToolUse {
                    id: format!("mock-tool-{n}"),
                    name,
                    input_json,
                });
            }
            Ok(ChatResponse {
                id: format!("mock-{n}"),
                model: req.model_or(&self.model).to_string(),
                content,
                stop_reason: answer.stop,
                usage: answer.usage,
            })
        }
        .boxed()
    }

    fn stream<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<EventStream, ProviderError>> {
        async move {
            let n = self.begin()?;
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            let answer = self.answer(req);
            let mut steps: Vec<(Duration, Result<StreamEvent, ProviderError>)> = vec![(
                Duration::ZERO,
                Ok(StreamEvent::Start {
                    id: format!("mock-{n}"),
                    model: req.model_or(&self.model).to_string(),
                }),
            )];
            let mut content = Vec::new();
            for text in answer.chunks {
                content.push(StreamEvent::Text { index: 0, text });
            }
            if let Some((name, input_json)) = answer.tool {
                content.push(StreamEvent::ToolUseStart {
                    index: 0,
                    id: format!("mock-tool-{n}"),
                    name,
                });
                content.push(StreamEvent::ToolInputJson {
                    index: 0,
                    json: input_json,
                });
            }
            let mut broke = false;
            for (i, event) in content.into_iter().enumerate() {
                if self.break_after.is_some_and(|k| i as u32 >= k) {
                    broke = true;
                    break;
                }
                let delay = if i == 0 {
                    self.first_chunk
                } else {
                    self.chunk_delay
                };
                steps.push((delay, Ok(event)));
            }
            if broke {
                let k = self.break_after.unwrap_or(0);
                steps.push((
                    self.chunk_delay,
                    Err(ProviderError::new(
                        ErrorClass::StreamInterrupted,
                        format!("scripted mock stream break after {k} chunk(s)"),
                    )),
                ));
            } else {
                steps.push((Duration::ZERO, Ok(StreamEvent::Usage(answer.usage))));
                steps.push((Duration::ZERO, Ok(StreamEvent::Stop(answer.stop))));
            }
            let events = stream::iter(steps).then(|(delay, event)| async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                event
            });
            Ok(Box::pin(events) as EventStream)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Message;

    fn req(text: &str) -> ChatRequest {
        ChatRequest {
            messages: vec![Message {
                role: Role::User,
                content: vec![Content::Text(text.into())],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn echo_honours_max_tokens_and_stop_sequences() {
        let mock = MockProvider::new(&MockConfig::default()).unwrap();
        let a = mock.answer(&req("one two three four"));
        assert_eq!(a.chunks.concat(), "one two three four");
        assert_eq!(a.stop, StopReason::EndTurn);
        let mut r = req("one two three four");
        r.max_tokens = Some(2);
        let a = mock.answer(&r);
        assert_eq!(
            (a.chunks.concat().as_str(), a.stop),
            ("one two", StopReason::MaxTokens)
        );
        let mut r = req("one two three four");
        r.stop_sequences = vec!["e t".into()];
        let a = mock.answer(&r);
        assert_eq!(
            (a.chunks.concat().as_str(), a.stop),
            ("on", StopReason::StopSequence)
        );
        let mut r = req("one two three four");
        r.stop_sequences = vec!["thr".into()];
        let a = mock.answer(&r);
        assert_eq!(
            (a.chunks.concat().as_str(), a.stop),
            ("one two ", StopReason::StopSequence)
        );
    }
}
