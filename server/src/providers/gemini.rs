//! Google's Gemini models: the Gemini API (`kind = "gemini"`,
//! `POST {base_url}/v1beta/models/{model}:generateContent` with
//! `x-goog-api-key`) and Vertex AI (`kind = "vertex"`, the same shapes under
//! `/v1/projects/{project}/locations/{region}/publishers/google/models/`,
//! with an OAuth2 token minted from a service account, see
//! [`super::vertex`]). Streams are `:streamGenerateContent?alt=sse`: each
//! SSE `data:` is a whole `GenerateContentResponse` holding the next parts.
//!
//! The mapping: `contents` with the `user` and `model` roles, the system
//! prompt as `systemInstruction`, tools as `functionDeclarations` with
//! `functionCall` / `functionResponse` parts (a tool result names its
//! function, found by the call's id earlier in the conversation),
//! `generationConfig` (`maxOutputTokens`, `temperature`, `topP`,
//! `stopSequences`), finish reasons onto stop reasons (the safety family
//! onto `CONTENT_FILTER`), `usageMetadata` onto usage. Errors are
//! `google.rpc.Status` bodies: `status` picks the class, a `RetryInfo` in
//! `details` is the Retry-After.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value, json};

use super::http::{self, Classified};
use super::sse::{SseEvent, SseTranslator, sse_stream};
use super::vertex::TokenSource;
use super::{ApiKey, EventStream, Provider};
use crate::chat::{
    ChatRequest, ChatResponse, Content, Role, StopReason, StreamEvent, ToolChoice, Usage,
};
use crate::config::{ConfigError, EnvSource, HttpProviderConfig};
use crate::error::{ErrorClass, ProviderError};

/// The Gemini API's public endpoint.
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";
/// The model used when neither the request nor the config names one.
pub const DEFAULT_MODEL: &str = "gemini-2.5-flash";
/// The variable read for the key when the section names none.
pub const DEFAULT_KEY_ENV: &str = "GEMINI_API_KEY";

/// How a request proves who sends it.
pub(crate) enum GoogleAuth {
    /// `x-goog-api-key` (the Gemini API).
    ApiKey(ApiKey),
    /// `Authorization: Bearer` with a token minted from a service account
    /// (Vertex AI).
    ServiceAccount(Arc<TokenSource>),
}

impl GoogleAuth {
    /// The header to send and the secret in it (to redact from errors).
    async fn header(&self) -> Result<(HeaderName, HeaderValue, ApiKey), ProviderError> {
        let (name, key, value) = match self {
            Self::ApiKey(key) => (
                HeaderName::from_static("x-goog-api-key"),
                key.clone(),
                HeaderValue::from_str(key.expose()),
            ),
            Self::ServiceAccount(source) => {
                let token = source.token().await?;
                let value = HeaderValue::from_str(&format!("Bearer {}", token.expose()));
                (reqwest::header::AUTHORIZATION, token, value)
            }
        };
        let mut value = value.map_err(|_| {
            ProviderError::new(
                ErrorClass::Auth,
                "the credential is not a valid HTTP header value",
            )
        })?;
        value.set_sensitive(true);
        Ok((name, value, key))
    }
}

/// A provider speaking Google's `generateContent` API (Gemini API or
/// Vertex AI).
pub struct GeminiProvider {
    kind: &'static str,
    client: reqwest::Client,
    /// The URL up to and including `models`; `{model}:{method}` follows.
    models: reqwest::Url,
    auth: GoogleAuth,
    model: String,
    max_tokens: Option<u32>,
    limits: http::ReadLimits,
}

impl std::fmt::Debug for GeminiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeminiProvider")
            .field("kind", &self.kind)
            .field("models", &self.models.as_str())
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl GeminiProvider {
    /// Builds a `gemini` provider; fails naming the variable when its key
    /// (`api_key_env`, by default `GEMINI_API_KEY`) is unset.
    pub fn new(
        name: &str,
        config: &HttpProviderConfig,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        let base = http::base_url(name, config.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL))?;
        let key_env = config.api_key_env.as_deref().unwrap_or(DEFAULT_KEY_ENV);
        let key = ApiKey::from_env(env, key_env, name)?;
        Self::with_models_url(
            "gemini",
            http::endpoint(&base, &["v1beta", "models"]),
            GoogleAuth::ApiKey(key),
            name,
            config,
        )
    }

    pub(crate) fn with_models_url(
        kind: &'static str,
        models: reqwest::Url,
        auth: GoogleAuth,
        name: &str,
        config: &HttpProviderConfig,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            kind,
            client: http::client(name, config)?,
            models,
            auth,
            model: config.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into()),
            max_tokens: config.max_tokens,
            limits: http::ReadLimits::of(config),
        })
    }

    async fn send(
        &self,
        req: &ChatRequest,
        stream: bool,
    ) -> Result<(reqwest::Response, ApiKey), ProviderError> {
        let model = req.model_or(&self.model);
        let method = if stream {
            "streamGenerateContent"
        } else {
            "generateContent"
        };
        // `{model}:{method}` is one escaped path segment (the model name was
        // checked: no `:` or `/` of its own).
        let mut url = http::endpoint(&self.models, &[&format!("{model}:{method}")]);
        if stream {
            url.query_pairs_mut().append_pair("alt", "sse");
        }
        let (header, value, key) = self.auth.header().await?;
        let builder = self
            .client
            .post(url)
            .header(header, value)
            .json(&body(req, self.max_tokens));
        let response = http::send(builder, classify, Some(&key)).await?;
        Ok((response, key))
    }
}

impl Provider for GeminiProvider {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn default_model(&self) -> &str {
        &self.model
    }

    fn complete<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        async move {
            let (response, key) = self.send(req, false).await?;
            let body = http::json_body(response, self.limits.max_body_bytes).await?;
            parse_response(&body).map_err(|e| http::redact(Some(&key), e))
        }
        .boxed()
    }

    fn stream<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<EventStream, ProviderError>> {
        async move {
            let (response, key) = self.send(req, true).await?;
            Ok(sse_stream(
                response,
                Translator::default(),
                self.limits.max_event_bytes,
                Some(key),
            ))
        }
        .boxed()
    }
}

// === the request ===

/// The `generateContent` body of `req`.
pub(crate) fn body(req: &ChatRequest, default_max_tokens: Option<u32>) -> Value {
    let mut obj = Map::new();
    let contents: Vec<Value> = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let parts: Vec<Value> = m.content.iter().map(|c| part(req, i, c)).collect();
            let role = match m.role {
                Role::User => "user",
                Role::Assistant => "model",
            };
            json!({"role": role, "parts": parts})
        })
        .collect();
    obj.insert("contents".into(), Value::Array(contents));
    if !req.system.is_empty() {
        obj.insert(
            "systemInstruction".into(),
            json!({"parts": [{"text": req.system}]}),
        );
    }
    if !req.tools.is_empty() {
        let declarations: Vec<Value> = req
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.input_schema}))
            .collect();
        obj.insert(
            "tools".into(),
            json!([{"functionDeclarations": declarations}]),
        );
        let config = match &req.tool_choice {
            ToolChoice::Auto => json!({"mode": "AUTO"}),
            ToolChoice::Any => json!({"mode": "ANY"}),
            ToolChoice::None => json!({"mode": "NONE"}),
            ToolChoice::Tool(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
        };
        obj.insert(
            "toolConfig".into(),
            json!({"functionCallingConfig": config}),
        );
    }
    let mut generation = Map::new();
    if let Some(n) = req.max_tokens.or(default_max_tokens) {
        generation.insert("maxOutputTokens".into(), json!(n));
    }
    if let Some(t) = req.temperature {
        generation.insert("temperature".into(), json!(t));
    }
    if let Some(p) = req.top_p {
        generation.insert("topP".into(), json!(p));
    }
    if !req.stop_sequences.is_empty() {
        generation.insert("stopSequences".into(), json!(req.stop_sequences));
    }
    if !generation.is_empty() {
        obj.insert("generationConfig".into(), Value::Object(generation));
    }
    Value::Object(obj)
}

/// One content block as a `Part`. A tool result becomes a
/// `functionResponse` naming the function whose call (found by id, latest
/// first, in the messages before `at`) it answers; its text is the
/// response object when it is a JSON object, else `{"output": text}` (or
/// `{"error": text}` for a failed tool), as Google documents.
fn part(req: &ChatRequest, at: usize, c: &Content) -> Value {
    match c {
        Content::Text(text) => json!({"text": text}),
        Content::ToolUse {
            name, input_json, ..
        } => {
            let args = serde_json::from_str::<Value>(input_json)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            json!({"functionCall": {"name": name, "args": args}})
        }
        Content::ToolResult {
            tool_use_id,
            content,
            is_error,
        } => {
            let name = req.messages[..at]
                .iter()
                .rev()
                .flat_map(|m| m.content.iter())
                .find_map(|c| match c {
                    Content::ToolUse { id, name, .. } if id == tool_use_id => Some(name.as_str()),
                    _ => None,
                })
                .unwrap_or(tool_use_id);
            let response = match serde_json::from_str::<Value>(content) {
                Ok(v @ Value::Object(_)) if !is_error => v,
                _ if *is_error => json!({"error": content}),
                _ => json!({"output": content}),
            };
            json!({"functionResponse": {"name": name, "response": response}})
        }
    }
}

// === the answer ===

/// Usage with every count saturated into a `u32`; thinking tokens count as
/// output (they are billed as such).
fn usage(v: &Value) -> Usage {
    let n = |k: &str| {
        v[k].as_u64()
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
    };
    Usage {
        input_tokens: n("promptTokenCount"),
        output_tokens: n("candidatesTokenCount").saturating_add(n("thoughtsTokenCount")),
    }
}

/// A candidate's `finishReason` as a stop reason. `STOP` with a function
/// call is `TOOL_USE`; the safety family (`SAFETY`, `RECITATION`,
/// `BLOCKLIST`, `PROHIBITED_CONTENT`, `SPII`, the image ones) is
/// `CONTENT_FILTER`; `LANGUAGE` (an unsupported language, declined) is
/// `REFUSAL`; a malformed function call is a server error (another try may
/// produce a valid one); anything else ends the turn.
fn stop_reason(reason: &str, tool_called: bool) -> Result<StopReason, ProviderError> {
    Ok(match reason {
        "MAX_TOKENS" => StopReason::MaxTokens,
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => StopReason::ContentFilter,
        "LANGUAGE" => StopReason::Refusal,
        "MALFORMED_FUNCTION_CALL" | "UNEXPECTED_TOOL_CALL" => {
            return Err(ProviderError::new(
                ErrorClass::ServerError,
                format!("the model ended with {reason}"),
            ));
        }
        _ if tool_called => StopReason::ToolUse,
        _ => StopReason::EndTurn,
    })
}

/// A tool call's id: the upstream's, or one made from its position (the
/// Gemini API often sends none).
fn call_id(call: &Value, position: usize) -> String {
    match call["id"].as_str() {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => format!("call_{position}"),
    }
}

fn call_args(call: &Value) -> String {
    match &call["args"] {
        Value::Null => "{}".to_string(),
        args => args.to_string(),
    }
}

fn is_answer_text(part: &Value) -> Option<&str> {
    // Thought summaries are not the answer.
    if part["thought"].as_bool() == Some(true) {
        return None;
    }
    part["text"].as_str().filter(|t| !t.is_empty())
}

pub(crate) fn parse_response(v: &Value) -> Result<ChatResponse, ProviderError> {
    let id = v["responseId"].as_str().unwrap_or_default().to_string();
    let model = v["modelVersion"].as_str().unwrap_or_default().to_string();
    let Some(candidate) = v["candidates"].get(0) else {
        // A prompt the safety system blocked has feedback and no candidate.
        if v["promptFeedback"]["blockReason"].is_string() {
            return Ok(ChatResponse {
                id,
                model,
                content: Vec::new(),
                stop_reason: StopReason::ContentFilter,
                usage: usage(&v["usageMetadata"]),
            });
        }
        return Err(ProviderError::new(
            ErrorClass::ServerError,
            "response without candidates",
        ));
    };
    let mut content: Vec<Content> = Vec::new();
    for (i, part) in candidate["content"]["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(text) = is_answer_text(part) {
            match content.last_mut() {
                Some(Content::Text(t)) => t.push_str(text),
                _ => content.push(Content::Text(text.into())),
            }
        } else if part["functionCall"].is_object() {
            let call = &part["functionCall"];
            content.push(Content::ToolUse {
                id: call_id(call, i),
                name: call["name"].as_str().unwrap_or_default().into(),
                input_json: call_args(call),
            });
        }
    }
    let reason = candidate["finishReason"].as_str().ok_or_else(|| {
        ProviderError::new(ErrorClass::ServerError, "response without finishReason")
    })?;
    let tool_called = content.iter().any(|c| matches!(c, Content::ToolUse { .. }));
    Ok(ChatResponse {
        id,
        model,
        content,
        stop_reason: stop_reason(reason, tool_called)?,
        usage: usage(&v["usageMetadata"]),
    })
}

/// Follows one `streamGenerateContent?alt=sse` stream: text gets one block,
/// each function call (which arrives whole) a block of its own.
#[derive(Default)]
pub(crate) struct Translator {
    started: bool,
    text_index: Option<u32>,
    next_index: u32,
    calls: usize,
    usage: Option<Usage>,
    done: bool,
}

type Out = VecDeque<Result<StreamEvent, ProviderError>>;

impl Translator {
    fn index(&mut self) -> u32 {
        let i = self.next_index;
        self.next_index = self.next_index.saturating_add(1);
        i
    }

    fn stop(&mut self, reason: Result<StopReason, ProviderError>, out: &mut Out) {
        self.done = true;
        match reason {
            Ok(reason) => {
                if let Some(u) = self.usage {
                    out.push_back(Ok(StreamEvent::Usage(u)));
                }
                out.push_back(Ok(StreamEvent::Stop(reason)));
            }
            Err(e) => out.push_back(Err(e)),
        }
    }
}

impl SseTranslator for Translator {
    fn on_event(&mut self, event: &SseEvent, out: &mut Out) {
        let data = event.data.trim();
        if self.done || data.is_empty() {
            return;
        }
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => return out.push_back(Err(http::bad_event("a stream chunk", &e))),
        };
        if v["error"].is_object() {
            let c = status_fields(&v["error"]);
            let class = match c.class {
                Some(class) if !class.is_transient() || class == ErrorClass::RateLimited => class,
                _ => ErrorClass::StreamInterrupted,
            };
            let mut e = ProviderError::new(
                class,
                format!("error in the upstream stream: {}", c.message),
            );
            e.retry_after = c.retry_after;
            self.done = true;
            return out.push_back(Err(e));
        }
        if !self.started {
            self.started = true;
            out.push_back(Ok(StreamEvent::Start {
                id: v["responseId"].as_str().unwrap_or_default().into(),
                model: v["modelVersion"].as_str().unwrap_or_default().into(),
            }));
        }
        if v["usageMetadata"].is_object() {
            self.usage = Some(usage(&v["usageMetadata"]));
        }
        let Some(candidate) = v["candidates"].get(0) else {
            if v["promptFeedback"]["blockReason"].is_string() {
                self.stop(Ok(StopReason::ContentFilter), out);
            }
            return;
        };
        for part in candidate["content"]["parts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(text) = is_answer_text(part) {
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
            } else if part["functionCall"].is_object() {
                let call = &part["functionCall"];
                let index = self.index();
                out.push_back(Ok(StreamEvent::ToolUseStart {
                    index,
                    id: call_id(call, usize::try_from(index).unwrap_or(usize::MAX)),
                    name: call["name"].as_str().unwrap_or_default().into(),
                }));
                out.push_back(Ok(StreamEvent::ToolInputJson {
                    index,
                    json: call_args(call),
                }));
                self.calls = self.calls.saturating_add(1);
            }
        }
        if let Some(reason) = candidate["finishReason"].as_str() {
            self.stop(stop_reason(reason, self.calls > 0), out);
        }
    }

    fn on_end(&mut self, _out: &mut Out) {
        // Without a finishReason the stream was truncated; the registry
        // reports the missing stop reason.
    }
}

// === errors ===

/// Reads a `google.rpc.Status` (`{"error": {"code", "message", "status",
/// "details"}}`): the canonical `status` picks the class (a context overflow
/// and an invalid API key are told apart from other invalid arguments), and
/// a `google.rpc.RetryInfo` detail's `retryDelay` is the wait.
pub(crate) fn classify(_status: u16, body: &[u8]) -> Classified {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    // Some Google front ends wrap the status in an array.
    let value = match value {
        Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        other => other,
    };
    match &value["error"] {
        e @ Value::Object(_) => status_fields(e),
        _ => Classified::default(),
    }
}

fn status_fields(error: &Value) -> Classified {
    let message = error["message"].as_str().unwrap_or_default().to_string();
    let details: &[Value] = error["details"].as_array().map_or(&[], Vec::as_slice);
    let detail = |suffix: &str| {
        details.iter().find(|d| {
            d["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with(&format!("google.rpc.{suffix}")))
        })
    };
    let retry_after = detail("RetryInfo")
        .and_then(|d| d["retryDelay"].as_str())
        .and_then(proto_duration);
    let reason = detail("ErrorInfo").and_then(|d| d["reason"].as_str());
    let lower = message.to_ascii_lowercase();
    let too_long = (lower.contains("token count") && lower.contains("exceed"))
        || lower.contains("exceeds the maximum number of tokens")
        || lower.contains("context is too long");
    let class = match error["status"].as_str().unwrap_or_default() {
        "RESOURCE_EXHAUSTED" => Some(ErrorClass::RateLimited),
        "UNAVAILABLE" => Some(ErrorClass::Overloaded),
        "INTERNAL" | "UNKNOWN" | "ABORTED" | "DATA_LOSS" => Some(ErrorClass::ServerError),
        "DEADLINE_EXCEEDED" => Some(ErrorClass::Timeout),
        "UNAUTHENTICATED" | "PERMISSION_DENIED" => Some(ErrorClass::Auth),
        "NOT_FOUND" => Some(ErrorClass::NotFound),
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => {
            Some(if matches!(reason, Some("API_KEY_INVALID")) {
                ErrorClass::Auth
            } else if too_long {
                ErrorClass::ContextLength
            } else {
                ErrorClass::InvalidRequest
            })
        }
        _ => None,
    };
    Classified {
        class,
        message,
        should_retry: None,
        retry_after,
    }
}

/// A `google.protobuf.Duration` in its JSON form (`"3s"`, `"1.5s"`,
/// `"0.250s"`), saturated like every upstream wait.
fn proto_duration(text: &str) -> Option<Duration> {
    http::decimal_seconds(text.trim().strip_suffix('s')?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_info_is_the_wait_and_status_the_class() {
        let c = classify(
            429,
            br#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure"},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"3.5s"}]}}"#,
        );
        assert_eq!(c.class, Some(ErrorClass::RateLimited));
        assert_eq!(c.retry_after, Some(Duration::from_millis(3500)));
        let c = classify(
            400,
            br#"[{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}]"#,
        );
        assert_eq!(c.class, Some(ErrorClass::Auth));
        let c = classify(
            400,
            br#"{"error":{"code":400,"message":"The input token count (2000000) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}"#,
        );
        assert_eq!(c.class, Some(ErrorClass::ContextLength));
        assert_eq!(proto_duration("1e30s"), Some(http::MAX_RETRY_AFTER));
        assert_eq!(proto_duration("-1s"), None);
        assert_eq!(proto_duration("3"), None);
    }

    #[test]
    fn tool_results_name_their_function() {
        let req = ChatRequest {
            messages: vec![
                crate::chat::Message {
                    role: Role::Assistant,
                    content: vec![Content::ToolUse {
                        id: "call_0".into(),
                        name: "weather".into(),
                        input_json: "{\"city\":\"Oslo\"}".into(),
                    }],
                },
                crate::chat::Message {
                    role: Role::User,
                    content: vec![Content::ToolResult {
                        tool_use_id: "call_0".into(),
                        content: "sunny".into(),
                        is_error: false,
                    }],
                },
            ],
            ..Default::default()
        };
        let b = body(&req, None);
        assert_eq!(
            b["contents"][0]["parts"][0],
            json!({"functionCall": {"name": "weather", "args": {"city": "Oslo"}}})
        );
        assert_eq!(
            b["contents"][1]["parts"][0],
            json!({"functionResponse": {"name": "weather", "response": {"output": "sunny"}}})
        );
        assert!(b.get("generationConfig").is_none());
    }
}
