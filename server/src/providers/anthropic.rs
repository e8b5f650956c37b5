//! The Anthropic Messages API (`POST {base_url}/v1/messages`), unary and SSE.

use std::collections::{HashMap, VecDeque};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::http::{self, Classified, JsonStr};
use super::sse::{SseEvent, SseTranslator, sse_stream};
use super::{ApiKey, EventStream, Provider};
use crate::chat::{
    ChatRequest, ChatResponse, Content, Role, StopReason, StreamEvent, ToolChoice, Usage,
};
use crate::config::{ConfigError, EnvSource, HttpProviderConfig};
use crate::error::{ErrorClass, ProviderError};

/// The public endpoint.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// The model used when neither the request nor the config names one.
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; this is sent when the request has none.
const DEFAULT_MAX_TOKENS: u32 = 4096;

/// A provider speaking the Anthropic Messages API.
#[derive(Debug)]
pub struct AnthropicProvider {
    client: reqwest::Client,
    url: reqwest::Url,
    api_key: ApiKey,
    /// `x-api-key`'s value, built once and marked sensitive.
    key_value: reqwest::header::HeaderValue,
    model: String,
    max_tokens: u32,
    limits: http::ReadLimits,
}

impl AnthropicProvider {
    /// Builds the provider; fails naming the variable when its key is unset.
    pub fn new(
        name: &str,
        config: &HttpProviderConfig,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        let key_env = config.api_key_env.as_deref().unwrap_or("ANTHROPIC_API_KEY");
        let base = http::base_url(name, config.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL))?;
        let api_key = ApiKey::from_env(env, key_env, name)?;
        let mut key_value = reqwest::header::HeaderValue::from_str(api_key.expose())
            .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static(""));
        key_value.set_sensitive(true);
        Ok(Self {
            client: http::client(name, config)?,
            url: http::endpoint(&base, &["v1", "messages"]),
            api_key,
            key_value,
            model: config.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into()),
            max_tokens: config.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            limits: http::ReadLimits::of(config),
        })
    }

    fn request(&self, req: &ChatRequest, stream: bool) -> reqwest::RequestBuilder {
        self.client
            .post(self.url.clone())
            .header("x-api-key", self.key_value.clone())
            .header("anthropic-version", API_VERSION)
            .json(&self.body(req, stream))
    }

    fn body<'a>(&'a self, req: &'a ChatRequest, stream: bool) -> WireRequest<'a> {
        let (tools, tool_choice) = if req.tools.is_empty() {
            (Vec::new(), None)
        } else {
            let tools = req
                .tools
                .iter()
                .map(|t| WireTool {
                    name: &t.name,
                    description: &t.description,
                    input_schema: &t.input_schema,
                })
                .collect();
            let choice = match &req.tool_choice {
                ToolChoice::Auto => WireToolChoice::Auto,
                ToolChoice::Any => WireToolChoice::Any,
                ToolChoice::Tool(name) => WireToolChoice::Tool { name },
                ToolChoice::None => WireToolChoice::None,
            };
            (tools, Some(choice))
        };
        WireRequest {
            model: req.model_or(&self.model),
            max_tokens: req.max_tokens.unwrap_or(self.max_tokens),
            messages: req
                .messages
                .iter()
                .map(|m| WireMessage {
                    role: match m.role {
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    },
                    content: m.content.iter().map(WireBlock::of).collect(),
                })
                .collect(),
            system: &req.system,
            temperature: req.temperature.map(f64::from),
            top_p: req.top_p.map(f64::from),
            stop_sequences: &req.stop_sequences,
            tools,
            tool_choice,
            stream,
        }
    }
}

/// The Messages API request body, borrowed from the gateway's request and
/// serialized without building a `serde_json::Value`.
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "str::is_empty")]
    system: &'a str,
    // As f64, the number a `Value` made of the f32 carried.
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: Vec<WireBlock<'a>>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        /// The call's arguments as JSON (`{}` when they do not parse).
        input: Value,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: &'a str,
        is_error: bool,
    },
}

impl<'a> WireBlock<'a> {
    fn of(c: &'a Content) -> Self {
        match c {
            Content::Text(text) => Self::Text { text },
            Content::ToolUse {
                id,
                name,
                input_json,
            } => Self::ToolUse {
                id,
                name,
                input: serde_json::from_str::<Value>(input_json).unwrap_or_else(|_| json!({})),
            },
            Content::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => Self::ToolResult {
                tool_use_id,
                content,
                is_error: *is_error,
            },
        }
    }
}

#[derive(Serialize)]
struct WireTool<'a> {
    name: &'a str,
    description: &'a str,
    input_schema: &'a Value,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireToolChoice<'a> {
    Auto,
    Any,
    Tool { name: &'a str },
    None,
}

impl Provider for AnthropicProvider {
    fn kind(&self) -> &'static str {
        "anthropic"
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
            let response =
                http::send(self.request(req, false), classify, Some(&self.api_key)).await?;
            let body = http::body_bytes(response, self.limits.max_body_bytes).await?;
            parse_body(&body).map_err(|e| http::redact(Some(&self.api_key), e))
        }
        .boxed()
    }

    fn stream<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<EventStream, ProviderError>> {
        async move {
            let response =
                http::send(self.request(req, true), classify, Some(&self.api_key)).await?;
            Ok(sse_stream(
                response,
                Translator::default(),
                self.limits.max_event_bytes,
                Some(self.api_key.clone()),
            ))
        }
        .boxed()
    }
}

/// The class of an Anthropic error `type`.
fn error_type_class(kind: &str) -> Option<ErrorClass> {
    Some(match kind {
        "invalid_request_error" => ErrorClass::InvalidRequest,
        "authentication_error" | "permission_error" => ErrorClass::Auth,
        "not_found_error" => ErrorClass::NotFound,
        "request_too_large" => ErrorClass::ContextLength,
        "rate_limit_error" => ErrorClass::RateLimited,
        "api_error" => ErrorClass::ServerError,
        "overloaded_error" => ErrorClass::Overloaded,
        "timeout_error" => ErrorClass::Timeout,
        _ => return None,
    })
}

/// The class of an Anthropic error object: its `type`, except that a prompt
/// over the context window comes back as an `invalid_request_error` whose
/// message says "prompt is too long" (Anthropic has no code for it).
fn error_class(error: &Value) -> Option<ErrorClass> {
    let class = error["type"].as_str().and_then(error_type_class)?;
    let message = error["message"].as_str().unwrap_or_default();
    if class == ErrorClass::InvalidRequest
        && message.to_ascii_lowercase().contains("prompt is too long")
    {
        return Some(ErrorClass::ContextLength);
    }
    Some(class)
}

pub(crate) fn classify(_status: u16, body: &[u8]) -> Classified {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = &value["error"];
    Classified {
        class: error_class(error),
        message: error["message"].as_str().unwrap_or_default().to_string(),
        ..Classified::default()
    }
}

/// Anthropic's stop reasons. `pause_turn` (a long server-tool turn paused,
/// to be continued by sending the answer back) is reported as MAX_TOKENS:
/// the turn is cut short and may be continued. Unknown reasons are END_TURN.
fn stop_reason(s: &str) -> StopReason {
    match s {
        "max_tokens" | "model_context_window_exceeded" | "pause_turn" => StopReason::MaxTokens,
        "stop_sequence" => StopReason::StopSequence,
        "tool_use" => StopReason::ToolUse,
        "refusal" => StopReason::Refusal,
        _ => StopReason::EndTurn,
    }
}

/// A token count from the upstream, saturated into a `u32` (a negative,
/// fractional or missing count is 0).
fn tokens(v: &Value) -> Option<u32> {
    v.as_u64().map(|n| http::saturate_count(Some(n)))
}

fn usage(v: &Value) -> Usage {
    Usage {
        input_tokens: tokens(&v["input_tokens"]).unwrap_or(0),
        output_tokens: tokens(&v["output_tokens"]).unwrap_or(0),
    }
}

/// A whole response body: its common shape read by [`typed_response`],
/// anything else through a `Value` by [`parse_response`]. Both read the
/// same answer from the same body.
pub(crate) fn parse_body(body: &[u8]) -> Result<ChatResponse, ProviderError> {
    http::read_answer(body, typed_response, parse_response)
}

/// A response in its common shape, read without building a `Value` (but
/// a tool call's `input`, which is re-serialized as the `Value` path does):
/// strings borrow from the body until they are copied into the answer.
/// Unknown fields are skipped. Anything this might read otherwise than the
/// `Value` path (a field of another type, a duplicate key, no content, no
/// stop reason) is `None`, for that path.
#[derive(Deserialize)]
struct TypedResponse<'a> {
    #[serde(borrow, default)]
    id: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    model: Option<JsonStr<'a>>,
    #[serde(borrow)]
    content: Vec<TypedBlock<'a>>,
    #[serde(borrow)]
    stop_reason: JsonStr<'a>,
    #[serde(default)]
    usage: Option<TypedUsage>,
}

#[derive(Deserialize)]
struct TypedBlock<'a> {
    #[serde(borrow, rename = "type")]
    kind: JsonStr<'a>,
    #[serde(borrow, default)]
    text: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    id: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    name: Option<JsonStr<'a>>,
    #[serde(default)]
    input: Option<Value>,
}

/// Counts as `u64`s: a negative or fractional one fails the typed read
/// (the `Value` path reads it as 0).
#[derive(Deserialize)]
struct TypedUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

/// The common shape of a response (see [`TypedResponse`]), or `None`.
pub(crate) fn typed_response(body: &[u8]) -> Option<ChatResponse> {
    let v: TypedResponse<'_> = serde_json::from_slice(body).ok()?;
    let content = v
        .content
        .into_iter()
        .filter_map(|b| match b.kind.as_str() {
            "text" => Some(Content::Text(http::text_or_empty(b.text.as_ref()))),
            "tool_use" => Some(Content::ToolUse {
                id: http::text_or_empty(b.id.as_ref()),
                name: http::text_or_empty(b.name.as_ref()),
                input_json: b.input.unwrap_or(Value::Null).to_string(),
            }),
            _ => None,
        })
        .collect();
    let usage = v.usage.map_or(Usage::default(), |u| Usage {
        input_tokens: http::saturate_count(u.input_tokens),
        output_tokens: http::saturate_count(u.output_tokens),
    });
    Some(ChatResponse {
        id: http::text_or_empty(v.id.as_ref()),
        model: http::text_or_empty(v.model.as_ref()),
        content,
        stop_reason: stop_reason(v.stop_reason.as_str()),
        usage,
    })
}

/// A response read through a `Value`: any shape, every field optional
/// where the gateway can do without it.
pub(crate) fn parse_response(v: &Value) -> Result<ChatResponse, ProviderError> {
    let blocks = v["content"]
        .as_array()
        .ok_or_else(|| ProviderError::new(ErrorClass::ServerError, "response without content"))?;
    let content = blocks
        .iter()
        .filter_map(|b| match b["type"].as_str() {
            Some("text") => Some(Content::Text(b["text"].as_str().unwrap_or_default().into())),
            Some("tool_use") => Some(Content::ToolUse {
                id: b["id"].as_str().unwrap_or_default().into(),
                name: b["name"].as_str().unwrap_or_default().into(),
                input_json: b["input"].to_string(),
            }),
            _ => None,
        })
        .collect();
    let stop = v["stop_reason"].as_str().ok_or_else(|| {
        ProviderError::new(ErrorClass::ServerError, "response without stop_reason")
    })?;
    Ok(ChatResponse {
        id: v["id"].as_str().unwrap_or_default().into(),
        model: v["model"].as_str().unwrap_or_default().into(),
        content,
        stop_reason: stop_reason(stop),
        usage: usage(&v["usage"]),
    })
}

/// Follows one Anthropic SSE stream. Upstream block indexes are renumbered
/// so the blocks the gateway relays (text, tool use) count from 0 without
/// gaps left by thinking blocks.
#[derive(Default)]
pub(crate) struct Translator {
    blocks: HashMap<u64, u32>,
    next_index: u32,
    usage: Usage,
    stop: Option<StopReason>,
    /// Every event through the `Value` path (the fuzz targets compare).
    general_only: bool,
}

type Out = VecDeque<Result<StreamEvent, ProviderError>>;

/// The common event, a `content_block_delta`, read without building a
/// `Value`: strings borrow from the event. Anything this might read
/// otherwise than the `Value` path (another type, a field of another type,
/// a duplicate key) sends the event down that path.
#[derive(Deserialize)]
struct TypedDeltaEvent<'a> {
    #[serde(borrow, rename = "type")]
    kind: JsonStr<'a>,
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    delta: Option<TypedDelta<'a>>,
}

#[derive(Deserialize)]
struct TypedDelta<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    text: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    partial_json: Option<JsonStr<'a>>,
}

impl Translator {
    /// Every event through the `Value` path, for comparing both paths.
    pub(crate) fn general_only() -> Self {
        Self {
            general_only: true,
            ..Self::default()
        }
    }

    /// Handles `data` if it is a `content_block_delta` (see
    /// [`TypedDeltaEvent`]); `false` leaves it to the general path.
    fn on_typed_delta(&mut self, data: &str, out: &mut Out) -> bool {
        let Ok(v) = serde_json::from_str::<TypedDeltaEvent<'_>>(data) else {
            return false;
        };
        if v.kind.as_str() != "content_block_delta" {
            return false;
        }
        let Some(&index) = self.blocks.get(&v.index.unwrap_or(0)) else {
            return true;
        };
        let Some(delta) = v.delta else {
            return true;
        };
        match delta.kind.as_ref().map(JsonStr::as_str) {
            Some("text_delta") => {
                if let Some(text) = delta.text.filter(|t| !t.as_str().is_empty()) {
                    out.push_back(Ok(StreamEvent::Text {
                        index,
                        text: text.0.into_owned(),
                    }));
                }
            }
            Some("input_json_delta") => {
                if let Some(json) = delta.partial_json.filter(|j| !j.as_str().is_empty()) {
                    out.push_back(Ok(StreamEvent::ToolInputJson {
                        index,
                        json: json.0.into_owned(),
                    }));
                }
            }
            _ => {}
        }
        true
    }
}

impl SseTranslator for Translator {
    fn on_event(&mut self, event: &SseEvent, out: &mut Out) {
        if !self.general_only && self.on_typed_delta(&event.data, out) {
            return;
        }
        let v: Value = match serde_json::from_str(&event.data) {
            Ok(v) => v,
            Err(_) if event.event == "ping" => return out.push_back(Ok(StreamEvent::KeepAlive)),
            Err(e) => return out.push_back(Err(http::bad_event("a stream event", &e))),
        };
        let kind = v["type"].as_str().unwrap_or(event.event.as_str());
        let upstream_index = v["index"].as_u64().unwrap_or(0);
        match kind {
            "message_start" => {
                let m = &v["message"];
                self.usage = usage(&m["usage"]);
                out.push_back(Ok(StreamEvent::Start {
                    id: m["id"].as_str().unwrap_or_default().into(),
                    model: m["model"].as_str().unwrap_or_default().into(),
                }));
                // The prompt's size is known now; a stream that breaks later
                // still reports it (and a resumed one sums it).
                out.push_back(Ok(StreamEvent::Usage(self.usage)));
            }
            "content_block_start" => {
                let block = &v["content_block"];
                let block_type = block["type"].as_str().unwrap_or_default();
                if block_type != "text" && block_type != "tool_use" {
                    return;
                }
                let index = self.next_index;
                self.next_index = self.next_index.saturating_add(1);
                self.blocks.insert(upstream_index, index);
                if block_type == "tool_use" {
                    out.push_back(Ok(StreamEvent::ToolUseStart {
                        index,
                        id: block["id"].as_str().unwrap_or_default().into(),
                        name: block["name"].as_str().unwrap_or_default().into(),
                    }));
                } else if let Some(text) = block["text"].as_str().filter(|t| !t.is_empty()) {
                    out.push_back(Ok(StreamEvent::Text {
                        index,
                        text: text.into(),
                    }));
                }
            }
            "content_block_delta" => {
                let Some(&index) = self.blocks.get(&upstream_index) else {
                    return;
                };
                let delta = &v["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => {
                        let text = delta["text"].as_str().unwrap_or_default();
                        if !text.is_empty() {
                            out.push_back(Ok(StreamEvent::Text {
                                index,
                                text: text.into(),
                            }));
                        }
                    }
                    Some("input_json_delta") => {
                        let json = delta["partial_json"].as_str().unwrap_or_default();
                        if !json.is_empty() {
                            out.push_back(Ok(StreamEvent::ToolInputJson {
                                index,
                                json: json.into(),
                            }));
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(s) = v["delta"]["stop_reason"].as_str() {
                    self.stop = Some(stop_reason(s));
                }
                if let Some(n) = tokens(&v["usage"]["output_tokens"]) {
                    self.usage.output_tokens = n;
                }
                if let Some(n) = tokens(&v["usage"]["input_tokens"]).filter(|n| *n > 0) {
                    self.usage.input_tokens = n;
                }
            }
            "ping" => out.push_back(Ok(StreamEvent::KeepAlive)),
            "message_stop" => {
                out.push_back(Ok(StreamEvent::Usage(self.usage)));
                match self.stop {
                    Some(stop) => out.push_back(Ok(StreamEvent::Stop(stop))),
                    None => out.push_back(Err(ProviderError::new(
                        ErrorClass::StreamInterrupted,
                        "the upstream stream stopped without a stop reason",
                    ))),
                }
            }
            "error" => {
                let e = &v["error"];
                let class = error_class(e).unwrap_or(ErrorClass::ServerError);
                let message = e["message"].as_str().unwrap_or("error event").to_string();
                out.push_back(Err(ProviderError::new(
                    class,
                    format!("error event in the upstream stream: {message}"),
                )));
            }
            _ => {}
        }
    }

    fn on_end(&mut self, _out: &mut Out) {
        // Without `message_stop` the stream was truncated; the registry
        // reports the missing stop reason.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_classify_by_type() {
        let c = classify(
            400,
            br#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#,
        );
        assert_eq!(c.class, Some(ErrorClass::Overloaded));
        assert_eq!(c.message, "busy");
        assert_eq!(classify(500, b"not json").class, None);
    }

    #[test]
    fn prompt_too_long_is_context_length() {
        let c = classify(
            400,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 212345 tokens > 200000 maximum"}}"#,
        );
        assert_eq!(c.class, Some(ErrorClass::ContextLength));
        let c = classify(
            400,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: required"}}"#,
        );
        assert_eq!(c.class, Some(ErrorClass::InvalidRequest));
    }

    #[test]
    fn upstream_token_counts_saturate() {
        let u = usage(&json!({"input_tokens": 1u64 << 40, "output_tokens": -3}));
        assert_eq!((u.input_tokens, u.output_tokens), (u32::MAX, 0));
        let u = usage(&json!({"input_tokens": 1e300, "output_tokens": u64::MAX}));
        assert_eq!((u.input_tokens, u.output_tokens), (0, u32::MAX));
    }
}
