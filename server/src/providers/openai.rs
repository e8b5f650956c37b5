//! Any OpenAI-compatible chat completions API (OpenAI, vLLM, Ollama,
//! llama.cpp server, ...): `POST {base_url}/chat/completions`, unary and SSE.
//! Databricks Model Serving speaks the same shapes at another path (see
//! [`super::databricks`]).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::http::{self, Classified, JsonStr, One};
use super::sse::{SseEvent, SseTranslator, sse_stream};
use super::{ApiKey, EventStream, Provider};
use crate::chat::{
    ChatRequest, ChatResponse, Content, Role, StopReason, StreamEvent, ToolChoice, Usage,
};
use crate::config::{ConfigError, EnvSource, HttpProviderConfig, PrefillForm};
use crate::error::{ErrorClass, ProviderError};

/// The public endpoint.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// The model used when neither the request nor the config names one.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";

/// Where requests go.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    /// `{base}/chat/completions`, the model in the body.
    ChatCompletions(reqwest::Url),
    /// `{base}/serving-endpoints/{model}/invocations`, no model in the body.
    Invocations(reqwest::Url),
    /// `{base}/openai/deployments/{model}/chat/completions?api-version=V`
    /// (Azure OpenAI), no model in the body.
    AzureDeployment {
        /// The resource endpoint.
        base: reqwest::Url,
        /// The `api-version` query parameter.
        api_version: String,
    },
}

/// How the key is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI, Databricks, an Entra token).
    Bearer,
    /// `api-key: <key>` (an Azure OpenAI resource key).
    ApiKey,
}

/// A provider speaking OpenAI's chat completions shapes.
#[derive(Debug)]
pub struct OpenAiProvider {
    kind: &'static str,
    client: reqwest::Client,
    endpoint: Endpoint,
    api_key: Option<ApiKey>,
    /// The header carrying the key, built once (`None` without a key, or
    /// for a key no header value can hold).
    auth: Option<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    model: String,
    max_tokens: Option<u32>,
    limits: http::ReadLimits,
    /// How the server continues a final assistant message, if it does.
    prefill: Option<PrefillForm>,
}

impl OpenAiProvider {
    /// Builds an `openai` provider. The key comes from `api_key_env`
    /// (`OPENAI_API_KEY` when the base URL is OpenAI's own); a self-hosted
    /// server configured without `api_key_env` is called without a key.
    pub fn new(
        name: &str,
        config: &HttpProviderConfig,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        let base = config.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let key_env = match (&config.api_key_env, config.base_url.is_none()) {
            (Some(var), _) if !var.is_empty() => Some(var.as_str()),
            (None, true) => Some("OPENAI_API_KEY"),
            _ => None,
        };
        let base = http::base_url(name, base)?;
        Self::with_endpoint(
            "openai",
            Endpoint::ChatCompletions(http::endpoint(&base, &["chat", "completions"])),
            name,
            config,
            key_env,
            DEFAULT_MODEL,
            env,
        )
    }

    pub(crate) fn with_endpoint(
        kind: &'static str,
        endpoint: Endpoint,
        name: &str,
        config: &HttpProviderConfig,
        key_env: Option<&str>,
        default_model: &str,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        let api_key = key_env
            .map(|var| ApiKey::from_env(env, var, name))
            .transpose()?;
        Ok(Self {
            kind,
            client: http::client(name, config)?,
            endpoint,
            auth: auth_header(api_key.as_ref(), KeyHeader::Bearer),
            api_key,
            model: config.model.clone().unwrap_or_else(|| default_model.into()),
            max_tokens: config.max_tokens,
            limits: http::ReadLimits::of(config),
            prefill: config.prefill,
        })
    }

    /// Sends the key as `header` instead of a Bearer token.
    pub(crate) fn with_key_header(mut self, header: KeyHeader) -> Self {
        self.auth = auth_header(self.api_key.as_ref(), header);
        self
    }

    fn request(&self, req: &ChatRequest, stream: bool) -> reqwest::RequestBuilder {
        let model = req.model_or(&self.model);
        let (url, send_model, include_usage) = match &self.endpoint {
            Endpoint::ChatCompletions(url) => (url.clone(), true, true),
            // The endpoint name is one escaped path segment, whatever it
            // holds (it was also checked at the edge).
            Endpoint::Invocations(base) => (
                http::endpoint(base, &["serving-endpoints", model, "invocations"]),
                false,
                false,
            ),
            Endpoint::AzureDeployment { base, api_version } => {
                let mut url = http::endpoint(
                    base,
                    &["openai", "deployments", model, "chat", "completions"],
                );
                url.query_pairs_mut()
                    .append_pair("api-version", api_version);
                (url, false, true)
            }
        };
        let mut builder = self.client.post(url);
        if let Some((name, value)) = &self.auth {
            builder = builder.header(name.clone(), value.clone());
        }
        let mut body = body(
            req,
            model,
            send_model,
            self.max_tokens,
            stream,
            include_usage,
        );
        let continues = req
            .messages
            .last()
            .is_some_and(|m| m.role == Role::Assistant);
        if continues && self.prefill == Some(PrefillForm::ContinueFinalMessage) {
            body.continue_final_message = Some(true);
            body.add_generation_prompt = Some(false);
        }
        builder.json(&body)
    }
}

/// The header that carries `key` in `form`, marked sensitive.
fn auth_header(
    key: Option<&ApiKey>,
    form: KeyHeader,
) -> Option<(reqwest::header::HeaderName, reqwest::header::HeaderValue)> {
    let key = key?;
    let (name, value) = match form {
        KeyHeader::Bearer => (
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.expose())),
        ),
        KeyHeader::ApiKey => (
            reqwest::header::HeaderName::from_static("api-key"),
            reqwest::header::HeaderValue::from_str(key.expose()),
        ),
    };
    let mut value = value.ok()?;
    value.set_sensitive(true);
    Some((name, value))
}

/// The chat-completions request body, borrowed from the gateway's request
/// and serialized without building a `serde_json::Value`.
#[derive(Serialize)]
struct WireRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    // As f64, the number a `Value` made of the f32 carried.
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    continue_final_message: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    add_generation_prompt: Option<bool>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    /// `null` for an assistant turn that only calls tools.
    content: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall<'a>>,
}

impl<'a> WireMessage<'a> {
    fn text(role: &'static str, content: Cow<'a, str>) -> Self {
        Self {
            role,
            content: Some(content),
            tool_call_id: None,
            tool_calls: Vec::new(),
        }
    }
}

#[derive(Serialize)]
struct WireToolCall<'a> {
    id: &'a str,
    r#type: &'static str,
    function: WireFunctionCall<'a>,
}

#[derive(Serialize)]
struct WireFunctionCall<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct WireTool<'a> {
    r#type: &'static str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a Value,
}

#[derive(Serialize)]
#[serde(untagged)]
enum WireToolChoice<'a> {
    Mode(&'static str),
    Function {
        r#type: &'static str,
        function: WireFunctionName<'a>,
    },
}

#[derive(Serialize)]
struct WireFunctionName<'a> {
    name: &'a str,
}

fn body<'a>(
    req: &'a ChatRequest,
    model: &'a str,
    send_model: bool,
    default_max_tokens: Option<u32>,
    stream: bool,
    include_usage: bool,
) -> WireRequest<'a> {
    let (tools, tool_choice) = if req.tools.is_empty() {
        (Vec::new(), None)
    } else {
        let tools = req
            .tools
            .iter()
            .map(|t| WireTool {
                r#type: "function",
                function: WireFunction {
                    name: &t.name,
                    description: &t.description,
                    parameters: &t.input_schema,
                },
            })
            .collect();
        let choice = match &req.tool_choice {
            ToolChoice::Auto => WireToolChoice::Mode("auto"),
            ToolChoice::Any => WireToolChoice::Mode("required"),
            ToolChoice::None => WireToolChoice::Mode("none"),
            ToolChoice::Tool(name) => WireToolChoice::Function {
                r#type: "function",
                function: WireFunctionName { name },
            },
        };
        (tools, Some(choice))
    };
    WireRequest {
        model: send_model.then_some(model),
        messages: messages(req),
        max_tokens: req.max_tokens.or(default_max_tokens),
        temperature: req.temperature.map(f64::from),
        top_p: req.top_p.map(f64::from),
        stop: &req.stop_sequences,
        tools,
        tool_choice,
        stream,
        stream_options: (stream && include_usage).then_some(StreamOptions {
            include_usage: true,
        }),
        continue_final_message: None,
        add_generation_prompt: None,
    }
}

/// The gateway's messages in OpenAI's shape: the system prompt first, tool
/// results as `tool` messages, tool calls as an assistant's `tool_calls`.
fn messages(req: &ChatRequest) -> Vec<WireMessage<'_>> {
    let mut out = Vec::with_capacity(req.messages.len() + 1);
    if !req.system.is_empty() {
        out.push(WireMessage::text("system", Cow::Borrowed(&req.system)));
    }
    for m in &req.messages {
        // One text part (the common case) is borrowed; several are joined.
        let mut text: Cow<'_, str> = Cow::Borrowed("");
        let mut calls = Vec::new();
        for c in &m.content {
            match c {
                Content::Text(t) => {
                    if text.is_empty() {
                        text = Cow::Borrowed(t);
                    } else {
                        text.to_mut().push_str(t);
                    }
                }
                Content::ToolUse {
                    id,
                    name,
                    input_json,
                } => calls.push(WireToolCall {
                    id,
                    r#type: "function",
                    function: WireFunctionCall {
                        name,
                        arguments: input_json,
                    },
                }),
                Content::ToolResult {
                    tool_use_id,
                    content,
                    ..
                } => out.push(WireMessage {
                    role: "tool",
                    content: Some(Cow::Borrowed(content)),
                    tool_call_id: Some(tool_use_id),
                    tool_calls: Vec::new(),
                }),
            }
        }
        match m.role {
            Role::User if !text.is_empty() => out.push(WireMessage::text("user", text)),
            Role::User => {}
            Role::Assistant => {
                let content = if !calls.is_empty() && text.is_empty() {
                    None
                } else {
                    Some(text)
                };
                out.push(WireMessage {
                    role: "assistant",
                    content,
                    tool_call_id: None,
                    tool_calls: calls,
                });
            }
        }
    }
    out
}

impl Provider for OpenAiProvider {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn supports_prefill(&self) -> bool {
        self.prefill.is_some()
    }

    fn default_model(&self) -> &str {
        &self.model
    }

    fn complete<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        async move {
            let response =
                http::send(self.request(req, false), classify, self.api_key.as_ref()).await?;
            let body = http::body_bytes(response, self.limits.max_body_bytes).await?;
            parse_body(&body).map_err(|e| http::redact(self.api_key.as_ref(), e))
        }
        .boxed()
    }

    fn stream<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<EventStream, ProviderError>> {
        async move {
            let response =
                http::send(self.request(req, true), classify, self.api_key.as_ref()).await?;
            Ok(sse_stream(
                response,
                Translator::default(),
                self.limits.max_event_bytes,
                self.api_key.clone(),
            ))
        }
        .boxed()
    }
}

/// Reads `{"error": {"message", "type", "code"}}` (code and type are
/// structured fields, not message text).
fn error_fields(error: &Value) -> Classified {
    let code = error["code"].as_str().unwrap_or_default();
    let kind = error["type"].as_str().unwrap_or_default();
    let (class, should_retry) = match (code, kind) {
        ("context_length_exceeded", _) | ("string_above_max_length", _) => {
            (Some(ErrorClass::ContextLength), None)
        }
        // A spent quota is final, though it arrives as a 429.
        ("insufficient_quota", _) | (_, "insufficient_quota") => {
            (Some(ErrorClass::RateLimited), Some(false))
        }
        ("invalid_api_key", _) => (Some(ErrorClass::Auth), None),
        // A moderation block of the prompt: the same request is refused
        // again, whatever a header says.
        ("content_policy_violation", _) | ("content_filter", _) => {
            (Some(ErrorClass::InvalidRequest), Some(false))
        }
        ("model_not_found", _) => (Some(ErrorClass::NotFound), None),
        _ => (None, None),
    };
    let mut message = match &error["message"] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    // Azure names the filtered categories of a blocked prompt.
    let filtered = filtered_categories(&error["innererror"]["content_filter_result"]);
    if !filtered.is_empty() {
        message.push_str(&format!(" (content filter: {})", filtered.join(", ")));
    }
    Classified {
        class,
        message,
        should_retry,
        ..Classified::default()
    }
}

pub(crate) fn classify(_status: u16, body: &[u8]) -> Classified {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match &value["error"] {
        Value::Object(_) => error_fields(&value["error"]),
        // Some servers (Databricks, llama.cpp) send `{"message": ...}` or a
        // plain string.
        Value::String(s) => Classified {
            message: s.clone(),
            ..Default::default()
        },
        _ => Classified {
            message: value["message"].as_str().unwrap_or_default().to_string(),
            ..Default::default()
        },
    }
}

/// The categories an Azure `content_filter_results` object marks
/// `filtered: true` (`hate`, `violence`, `jailbreak`, ...), in order.
fn filtered_categories(results: &Value) -> Vec<String> {
    let Some(results) = results.as_object() else {
        return Vec::new();
    };
    results
        .iter()
        .filter(|(_, v)| v["filtered"].as_bool() == Some(true))
        .map(|(k, v)| match v["severity"].as_str() {
            Some(severity) => format!("{k} ({severity})"),
            None => k.clone(),
        })
        .collect()
}

/// A choice's stop reason: its `finish_reason`, or `content_filter` when
/// Azure's `content_filter_results` say the output was filtered.
fn choice_stop(choice: &Value, reason: &str) -> StopReason {
    if !filtered_categories(&choice["content_filter_results"]).is_empty() {
        return StopReason::ContentFilter;
    }
    finish_reason(reason)
}

fn finish_reason(s: &str) -> StopReason {
    match s {
        "length" => StopReason::MaxTokens,
        "tool_calls" | "function_call" => StopReason::ToolUse,
        "content_filter" => StopReason::ContentFilter,
        _ => StopReason::EndTurn,
    }
}

/// Usage with every count saturated into a `u32` (a negative, fractional or
/// missing count is 0). `prompt_tokens` already includes cached tokens.
fn usage(v: &Value) -> Usage {
    let n = |k: &str| {
        v[k].as_u64()
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
    };
    Usage {
        input_tokens: n("prompt_tokens"),
        output_tokens: n("completion_tokens"),
    }
}

/// A whole response body: its common shape read by [`typed_response`],
/// anything else through a `Value` by [`parse_response`]. Both read the
/// same answer from the same body.
pub(crate) fn parse_body(body: &[u8]) -> Result<ChatResponse, ProviderError> {
    http::read_answer(body, typed_response, parse_response)
}

/// A response in its common shape, read without building a `Value`: the
/// strings borrow from the body until they are copied into the answer.
/// Unknown fields are skipped. Anything this might read otherwise than the
/// `Value` path (a field of another type, a duplicate key, no choices, no
/// finish reason, Azure's filter results) is `None`, for that path.
#[derive(Deserialize)]
struct TypedResponse<'a> {
    #[serde(borrow, default)]
    id: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    model: Option<JsonStr<'a>>,
    /// Exactly one (any other count is left to the `Value` path), read
    /// without a `Vec`.
    #[serde(borrow)]
    choices: One<TypedChoice<'a>>,
    #[serde(default)]
    usage: Option<TypedUsage>,
}

#[derive(Deserialize)]
struct TypedChoice<'a> {
    #[serde(borrow)]
    message: TypedMessage<'a>,
    #[serde(borrow)]
    finish_reason: JsonStr<'a>,
    #[serde(default)]
    content_filter_results: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct TypedMessage<'a> {
    #[serde(borrow, default)]
    content: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<TypedCall<'a>>>,
}

#[derive(Deserialize)]
struct TypedCall<'a> {
    #[serde(borrow, default)]
    id: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    function: Option<TypedFunction<'a>>,
}

#[derive(Deserialize)]
struct TypedFunction<'a> {
    #[serde(borrow, default)]
    name: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    arguments: Option<JsonStr<'a>>,
}

/// Counts as `u64`s: a negative or fractional one fails the typed read
/// (the `Value` path reads it as 0).
#[derive(Deserialize)]
struct TypedUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// The common shape of a response (see [`TypedResponse`]), or `None`.
pub(crate) fn typed_response(body: &[u8]) -> Option<ChatResponse> {
    let v: TypedResponse<'_> = serde_json::from_slice(body).ok()?;
    let choice = v.choices.0?;
    if choice.content_filter_results.is_some() {
        return None;
    }
    let message = choice.message;
    let mut content = Vec::new();
    if let Some(text) = message.content.filter(|t| !t.as_str().is_empty()) {
        content.push(Content::Text(text.0.into_owned()));
    }
    for call in message.tool_calls.into_iter().flatten() {
        let function = call.function.unwrap_or(TypedFunction {
            name: None,
            arguments: None,
        });
        content.push(Content::ToolUse {
            id: http::text_or_empty(call.id.as_ref()),
            name: http::text_or_empty(function.name.as_ref()),
            input_json: function
                .arguments
                .map_or_else(|| "{}".to_string(), |a| a.0.into_owned()),
        });
    }
    let usage = v.usage.map_or(Usage::default(), |u| Usage {
        input_tokens: http::saturate_count(u.prompt_tokens),
        output_tokens: http::saturate_count(u.completion_tokens),
    });
    Some(ChatResponse {
        id: http::text_or_empty(v.id.as_ref()),
        model: http::text_or_empty(v.model.as_ref()),
        content,
        stop_reason: finish_reason(choice.finish_reason.as_str()),
        usage,
    })
}

/// A response read through a `Value`: any shape, every field optional
/// where the gateway can do without it.
pub(crate) fn parse_response(v: &Value) -> Result<ChatResponse, ProviderError> {
    let choice = &v["choices"][0];
    let message = &choice["message"];
    if !message.is_object() {
        return Err(ProviderError::new(
            ErrorClass::ServerError,
            "response without choices[0].message",
        ));
    }
    let mut content = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(Content::Text(text.into()));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        content.push(Content::ToolUse {
            id: call["id"].as_str().unwrap_or_default().into(),
            name: call["function"]["name"].as_str().unwrap_or_default().into(),
            input_json: call["function"]["arguments"]
                .as_str()
                .unwrap_or("{}")
                .into(),
        });
    }
    let reason = choice["finish_reason"].as_str().ok_or_else(|| {
        ProviderError::new(ErrorClass::ServerError, "response without finish_reason")
    })?;
    Ok(ChatResponse {
        id: v["id"].as_str().unwrap_or_default().into(),
        model: v["model"].as_str().unwrap_or_default().into(),
        content,
        stop_reason: choice_stop(choice, reason),
        usage: usage(&v["usage"]),
    })
}

/// Follows one chat-completions SSE stream: text gets one block, each tool
/// call (by its upstream `index`) another, numbered in order of appearance.
#[derive(Default)]
pub(crate) struct Translator {
    started: bool,
    text_index: Option<u32>,
    tool_indexes: HashMap<u64, u32>,
    next_index: u32,
    usage: Option<Usage>,
    stop: Option<StopReason>,
    done: bool,
    /// Every chunk through the `Value` path (the fuzz targets compare).
    general_only: bool,
}

type Out = VecDeque<Result<StreamEvent, ProviderError>>;

impl Translator {
    /// Every chunk through the `Value` path, for comparing both paths.
    pub(crate) fn general_only() -> Self {
        Self {
            general_only: true,
            ..Self::default()
        }
    }

    fn finish(&mut self, out: &mut Out) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(stop) = self.stop {
            if let Some(u) = self.usage {
                out.push_back(Ok(StreamEvent::Usage(u)));
            }
            out.push_back(Ok(StreamEvent::Stop(stop)));
        }
        // Without a finish_reason the stream was truncated; the registry
        // reports the missing stop reason.
    }

    fn index(&mut self) -> u32 {
        let i = self.next_index;
        self.next_index = self.next_index.saturating_add(1);
        i
    }
}

/// The common chunk, a text delta and nothing else, read without building a
/// `Value`: strings borrow from the event (and are copied only when they
/// hold escapes), the one choice is read without a `Vec`. Any field that
/// changes what a chunk means (`error`, `usage`, a finish reason, tool
/// calls, filter results, other than one choice) sends the chunk down the
/// `Value` path.
#[derive(Deserialize)]
struct TextChunk<'a> {
    #[serde(borrow, default)]
    id: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    model: Option<JsonStr<'a>>,
    #[serde(borrow)]
    choices: One<TextChoice<'a>>,
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(default)]
    usage: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct TextChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<TextDelta<'a>>,
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
    #[serde(default)]
    content_filter_results: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct TextDelta<'a> {
    #[serde(borrow, default)]
    content: Option<JsonStr<'a>>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
}

impl Translator {
    /// Handles `data` if it is a plain text chunk (see [`TextChunk`]);
    /// `false` leaves it to the general path, untouched.
    fn on_text_chunk(&mut self, data: &str, out: &mut Out) -> bool {
        let Ok(chunk) = serde_json::from_str::<TextChunk<'_>>(data) else {
            return false;
        };
        let Some(choice) = &chunk.choices.0 else {
            return false;
        };
        let delta = choice.delta.as_ref();
        if chunk.error.is_some()
            || chunk.usage.is_some()
            || choice.finish_reason.is_some()
            || choice.content_filter_results.is_some()
            || delta.is_some_and(|d| d.tool_calls.is_some())
        {
            return false;
        }
        if !self.started {
            self.started = true;
            out.push_back(Ok(StreamEvent::Start {
                id: http::text_or_empty(chunk.id.as_ref()),
                model: http::text_or_empty(chunk.model.as_ref()),
            }));
        }
        if let Some(text) = delta
            .and_then(|d| d.content.as_ref())
            .map(JsonStr::as_str)
            .filter(|t| !t.is_empty())
        {
            let index = match self.text_index {
                Some(i) => i,
                None => {
                    let i = self.index();
                    self.text_index = Some(i);
                    i
                }
            };
            out.push_back(Ok(StreamEvent::Text {
                index,
                text: text.into(),
            }));
        }
        true
    }
}

impl SseTranslator for Translator {
    fn on_event(&mut self, event: &SseEvent, out: &mut Out) {
        let data = event.data.trim();
        if data == "[DONE]" {
            return self.finish(out);
        }
        if data.is_empty() {
            return;
        }
        if self.general_only || !self.on_text_chunk(data, out) {
            self.on_chunk(data, out);
        }
    }

    fn on_end(&mut self, out: &mut Out) {
        // Some servers close the body without `[DONE]`; a finish_reason seen
        // before that is still a complete answer.
        self.finish(out);
    }
}

impl Translator {
    /// Any chunk, read through a `Value`.
    fn on_chunk(&mut self, data: &str, out: &mut Out) {
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => return out.push_back(Err(http::bad_event("a stream chunk", &e))),
        };
        if v["error"].is_object() {
            let c = error_fields(&v["error"]);
            let class = match v["error"]["type"].as_str() {
                Some("server_error") => ErrorClass::ServerError,
                _ => c.class.unwrap_or(ErrorClass::StreamInterrupted),
            };
            return out.push_back(Err(ProviderError::new(
                class,
                format!("error in the upstream stream: {}", c.message),
            )));
        }
        // Azure opens with a chunk holding only `prompt_filter_results`
        // (no choices, empty id): the answer has not begun yet.
        let empty_choices = v["choices"].as_array().is_some_and(Vec::is_empty);
        if !self.started && empty_choices && !v["usage"].is_object() {
            return;
        }
        if !self.started {
            self.started = true;
            out.push_back(Ok(StreamEvent::Start {
                id: v["id"].as_str().unwrap_or_default().into(),
                model: v["model"].as_str().unwrap_or_default().into(),
            }));
        }
        if v["usage"].is_object() {
            self.usage = Some(usage(&v["usage"]));
        }
        let Some(choice) = v["choices"].get(0) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            let index = match self.text_index {
                Some(i) => i,
                None => {
                    let i = self.index();
                    self.text_index = Some(i);
                    i
                }
            };
            out.push_back(Ok(StreamEvent::Text {
                index,
                text: text.into(),
            }));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let upstream = call["index"].as_u64().unwrap_or(0);
            let index = match self.tool_indexes.get(&upstream) {
                Some(&i) => i,
                None => {
                    let i = self.index();
                    self.tool_indexes.insert(upstream, i);
                    out.push_back(Ok(StreamEvent::ToolUseStart {
                        index: i,
                        id: call["id"].as_str().unwrap_or_default().into(),
                        name: call["function"]["name"].as_str().unwrap_or_default().into(),
                    }));
                    i
                }
            };
            if let Some(args) = call["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                out.push_back(Ok(StreamEvent::ToolInputJson {
                    index,
                    json: args.into(),
                }));
            }
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.stop = Some(choice_stop(choice, reason));
        } else if self.stop.is_some()
            && !filtered_categories(&choice["content_filter_results"]).is_empty()
        {
            // Azure may report the output's filter results after the
            // finish reason.
            self.stop = Some(StopReason::ContentFilter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quota_429_is_final() {
        let c = classify(429, br#"{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}"#);
        assert_eq!(c.class, Some(ErrorClass::RateLimited));
        assert_eq!(c.should_retry, Some(false));
    }

    #[test]
    fn text_chunks_read_the_same_on_both_paths() {
        let chunks = [
            r#"{"id":"c1","model":"m","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"lo \u00e9\n"}}]}"#,
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{}}]}"#,
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}"#,
            r#"{"id":"c1","model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
        ];
        let (mut fast, mut general) = (Translator::default(), Translator::default());
        let (mut fast_out, mut general_out) = (Out::new(), Out::new());
        for (i, chunk) in chunks.iter().enumerate() {
            let event = SseEvent {
                event: String::new(),
                data: (*chunk).to_string(),
            };
            fast.on_event(&event, &mut fast_out);
            general.on_chunk(chunk, &mut general_out);
            // The first four take the typed path, the others the general one.
            assert_eq!(
                Translator::default().on_text_chunk(chunk, &mut Out::new()),
                i < 4
            );
        }
        fast.on_end(&mut fast_out);
        general.on_end(&mut general_out);
        assert_eq!(format!("{fast_out:?}"), format!("{general_out:?}"));
        assert_eq!(fast_out.len(), 6, "{fast_out:?}");
    }

    #[test]
    fn tool_results_become_tool_messages() {
        let req = ChatRequest {
            system: "sys".into(),
            messages: vec![
                crate::chat::Message {
                    role: Role::User,
                    content: vec![Content::Text("hi".into())],
                },
                crate::chat::Message {
                    role: Role::Assistant,
                    content: vec![Content::ToolUse {
                        id: "c1".into(),
                        name: "f".into(),
                        input_json: "{}".into(),
                    }],
                },
                crate::chat::Message {
                    role: Role::User,
                    content: vec![Content::ToolResult {
                        tool_use_id: "c1".into(),
                        content: "42".into(),
                        is_error: false,
                    }],
                },
            ],
            ..Default::default()
        };
        let m = serde_json::to_value(messages(&req)).unwrap();
        assert_eq!(m[0]["role"], "system");
        assert_eq!(m[2]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(m[2]["content"], Value::Null);
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "c1", "content": "42"})
        );
    }
}
