//! AWS Bedrock Runtime's Converse API (`kind = "bedrock"`):
//! `POST {base_url}/model/{modelId}/converse`, and `/converse-stream`,
//! whose answer is the AWS event-stream binary framing (each frame's
//! prelude and message CRCs checked by `aws-smithy-eventstream`). Requests
//! are SigV4-signed (service `bedrock`) with credentials from
//! [`super::aws`].
//!
//! The mapping: `messages` (text, `toolUse`, `toolResult` blocks), `system`,
//! `inferenceConfig` (`maxTokens`, `temperature`, `topP`, `stopSequences`),
//! `toolConfig` (`toolSpec`s and `toolChoice`), `stopReason` and `usage`.
//! Errors by `x-amzn-errortype`: `ThrottlingException` rate-limited,
//! `ServiceUnavailableException` overloaded, `ModelTimeoutException`
//! timeout, `ValidationException` invalid-request (context-length when its
//! message says the input is too long), `AccessDeniedException` auth. An
//! exception frame inside a stream is stream-interrupted, except a
//! `validationException`, which is final.

use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream;
use reqwest::header::HeaderMap;
use serde_json::{Map, Value, json};

use super::aws::{self, CredentialSource};
use super::http::{self, Classified};
use super::{ApiKey, EventStream, Provider};
use crate::chat::{
    ChatRequest, ChatResponse, Content, Role, StopReason, StreamEvent, ToolChoice, Usage,
};
use crate::config::{ConfigError, EnvSource, HttpProviderConfig};
use crate::error::{ErrorClass, ProviderError};

/// The model used when neither the request nor the config names one.
pub const DEFAULT_MODEL: &str = "amazon.nova-lite-v1:0";
const SERVICE: &str = "bedrock";
/// The smallest event-stream frame: prelude (12) and message CRC (4).
const MIN_FRAME: usize = 16;

/// A provider speaking Bedrock's Converse API.
pub struct BedrockProvider {
    client: reqwest::Client,
    base: reqwest::Url,
    region: String,
    credentials: CredentialSource,
    model: String,
    max_tokens: Option<u32>,
    limits: http::ReadLimits,
}

impl std::fmt::Debug for BedrockProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BedrockProvider")
            .field("base", &self.base.as_str())
            .field("region", &self.region)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl BedrockProvider {
    /// Builds a bedrock provider: the region from `region`, else
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`; the endpoint from `base_url`,
    /// else the region's public one; credentials as [`super::aws`] says.
    /// Start-up fails naming what is missing.
    pub fn new(
        name: &str,
        config: &HttpProviderConfig,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        let from_env = |k: &str| {
            env.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let region = config
            .region
            .clone()
            .or_else(|| from_env("AWS_REGION"))
            .or_else(|| from_env("AWS_DEFAULT_REGION"))
            .ok_or_else(|| {
                ConfigError(format!(
                    "config key `providers.{name}.region`: required for a bedrock provider \
                     (or set AWS_REGION)"
                ))
            })?;
        if !region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ConfigError(format!(
                "provider `{name}`: `{region}` is not an AWS region name"
            )));
        }
        let base = match &config.base_url {
            Some(url) => url.clone(),
            None => format!("https://bedrock-runtime.{region}.amazonaws.com"),
        };
        let base = http::base_url(name, &base)?;
        let credentials = CredentialSource::from_env(name, config, &region, env)?;
        Ok(Self {
            client: http::client(name, config)?,
            base,
            region,
            credentials,
            model: config.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into()),
            max_tokens: config.max_tokens,
            limits: http::ReadLimits::of(config),
        })
    }

    async fn send(
        &self,
        req: &ChatRequest,
        stream: bool,
    ) -> Result<(reqwest::Response, Vec<ApiKey>, String), ProviderError> {
        let model = req.model_or(&self.model);
        let action = if stream {
            "converse-stream"
        } else {
            "converse"
        };
        // The model id (or ARN) is one escaped path segment.
        let url = http::endpoint(&self.base, &["model", model, action]);
        let body = serde_json::to_vec(&body(req, self.max_tokens))
            .map_err(|e| ProviderError::new(ErrorClass::InvalidRequest, e.to_string()))?;
        let credentials = self.credentials.credentials().await?;
        let secrets = credentials.secrets();
        let signed = aws::sign(
            &credentials,
            SERVICE,
            &self.region,
            &url,
            &body,
            SystemTime::now(),
        )?;
        let mut builder = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in signed {
            builder = builder.header(name, value);
        }
        let response = http::send_with(builder.body(body), &classify, None)
            .await
            .map_err(|e| redact_all(&secrets, e))?;
        let request_id = response
            .headers()
            .get("x-amzn-requestid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok((response, secrets, request_id))
    }
}

fn redact_all(secrets: &[ApiKey], mut e: ProviderError) -> ProviderError {
    for s in secrets {
        e.message = s.redact(&e.message);
    }
    e
}

impl Provider for BedrockProvider {
    fn kind(&self) -> &'static str {
        "bedrock"
    }

    fn default_model(&self) -> &str {
        &self.model
    }

    fn complete<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        async move {
            let (response, secrets, id) = self.send(req, false).await?;
            let body = http::json_body(response, self.limits.max_body_bytes).await?;
            parse_response(&body, id, req.model_or(&self.model))
                .map_err(|e| redact_all(&secrets, e))
        }
        .boxed()
    }

    fn stream<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<EventStream, ProviderError>> {
        async move {
            let (response, secrets, id) = self.send(req, true).await?;
            Ok(event_stream(
                response,
                Translator::new(id, req.model_or(&self.model).to_string()),
                self.limits.max_event_bytes,
                secrets,
            ))
        }
        .boxed()
    }
}

// === the request ===

/// The Converse body of `req`.
pub(crate) fn body(req: &ChatRequest, default_max_tokens: Option<u32>) -> Value {
    let mut obj = Map::new();
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|m| {
            json!({
                "role": match m.role { Role::User => "user", Role::Assistant => "assistant" },
                "content": m.content.iter().map(block).collect::<Vec<_>>(),
            })
        })
        .collect();
    obj.insert("messages".into(), Value::Array(messages));
    if !req.system.is_empty() {
        obj.insert("system".into(), json!([{"text": req.system}]));
    }
    let mut inference = Map::new();
    if let Some(n) = req.max_tokens.or(default_max_tokens) {
        inference.insert("maxTokens".into(), json!(n));
    }
    if let Some(t) = req.temperature {
        inference.insert("temperature".into(), json!(t));
    }
    if let Some(p) = req.top_p {
        inference.insert("topP".into(), json!(p));
    }
    if !req.stop_sequences.is_empty() {
        inference.insert("stopSequences".into(), json!(req.stop_sequences));
    }
    if !inference.is_empty() {
        obj.insert("inferenceConfig".into(), Value::Object(inference));
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                json!({"toolSpec": {"name": t.name, "description": t.description,
                    "inputSchema": {"json": t.input_schema}}})
            })
            .collect();
        let mut config = json!({"tools": tools});
        // Converse has no "none": the tools stay declared (a conversation
        // with tool blocks needs them) and the model decides.
        match &req.tool_choice {
            ToolChoice::Auto | ToolChoice::None => {}
            ToolChoice::Any => config["toolChoice"] = json!({"any": {}}),
            ToolChoice::Tool(name) => config["toolChoice"] = json!({"tool": {"name": name}}),
        }
        obj.insert("toolConfig".into(), config);
    }
    Value::Object(obj)
}

fn block(c: &Content) -> Value {
    match c {
        Content::Text(text) => json!({"text": text}),
        Content::ToolUse {
            id,
            name,
            input_json,
        } => json!({"toolUse": {
            "toolUseId": id, "name": name,
            "input": serde_json::from_str::<Value>(input_json).unwrap_or_else(|_| json!({})),
        }}),
        Content::ToolResult {
            tool_use_id,
            content,
            is_error,
        } => {
            let item = match serde_json::from_str::<Value>(content) {
                Ok(v @ Value::Object(_)) => json!({"json": v}),
                _ => json!({"text": content}),
            };
            json!({"toolResult": {
                "toolUseId": tool_use_id, "content": [item],
                "status": if *is_error { "error" } else { "success" },
            }})
        }
    }
}

// === the answer ===

fn usage(v: &Value) -> Usage {
    let n = |k: &str| {
        v[k].as_u64()
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
    };
    Usage {
        input_tokens: n("inputTokens"),
        output_tokens: n("outputTokens"),
    }
}

/// Converse's stop reasons: a guardrail or content filter is
/// `CONTENT_FILTER`; a full context window ends like `max_tokens`.
fn stop_reason(s: &str) -> StopReason {
    match s {
        "tool_use" => StopReason::ToolUse,
        "max_tokens" | "model_context_window_exceeded" => StopReason::MaxTokens,
        "stop_sequence" => StopReason::StopSequence,
        "guardrail_intervened" | "content_filtered" => StopReason::ContentFilter,
        _ => StopReason::EndTurn,
    }
}

pub(crate) fn parse_response(
    v: &Value,
    id: String,
    model: &str,
) -> Result<ChatResponse, ProviderError> {
    let message = &v["output"]["message"];
    let Some(blocks) = message["content"].as_array() else {
        return Err(ProviderError::new(
            ErrorClass::ServerError,
            "response without output.message.content",
        ));
    };
    let mut content = Vec::new();
    for b in blocks {
        if let Some(text) = b["text"].as_str() {
            if !text.is_empty() {
                content.push(Content::Text(text.into()));
            }
        } else if b["toolUse"].is_object() {
            let t = &b["toolUse"];
            content.push(Content::ToolUse {
                id: t["toolUseId"].as_str().unwrap_or_default().into(),
                name: t["name"].as_str().unwrap_or_default().into(),
                input_json: match &t["input"] {
                    Value::Null => "{}".into(),
                    input => input.to_string(),
                },
            });
        }
    }
    let reason = v["stopReason"].as_str().ok_or_else(|| {
        ProviderError::new(ErrorClass::ServerError, "response without stopReason")
    })?;
    Ok(ChatResponse {
        id,
        model: model.to_string(),
        content,
        stop_reason: stop_reason(reason),
        usage: usage(&v["usage"]),
    })
}

type Out = VecDeque<Result<StreamEvent, ProviderError>>;

/// Follows one ConverseStream: `messageStart`, `contentBlockStart` (tool
/// calls), `contentBlockDelta` (text or tool input), `contentBlockStop`,
/// `messageStop` (the stop reason), then `metadata` (usage), after which
/// the stop is relayed.
pub(crate) struct Translator {
    id: String,
    model: String,
    started: bool,
    indexes: HashMap<u64, u32>,
    next_index: u32,
    stop: Option<StopReason>,
    usage: Option<Usage>,
    done: bool,
}

impl Translator {
    /// A translator for the answer `id` of `model` (ConverseStream names
    /// neither).
    pub(crate) fn new(id: String, model: String) -> Self {
        Self {
            id,
            model,
            started: false,
            indexes: HashMap::new(),
            next_index: 0,
            stop: None,
            usage: None,
            done: false,
        }
    }

    fn start(&mut self, out: &mut Out) {
        if !self.started {
            self.started = true;
            out.push_back(Ok(StreamEvent::Start {
                id: self.id.clone(),
                model: self.model.clone(),
            }));
        }
    }

    fn index(&mut self, upstream: u64) -> (u32, bool) {
        if let Some(&i) = self.indexes.get(&upstream) {
            return (i, false);
        }
        let i = self.next_index;
        self.next_index = self.next_index.saturating_add(1);
        self.indexes.insert(upstream, i);
        (i, true)
    }

    fn finish(&mut self, out: &mut Out) {
        if self.done {
            return;
        }
        if let Some(stop) = self.stop {
            self.done = true;
            if let Some(u) = self.usage {
                out.push_back(Ok(StreamEvent::Usage(u)));
            }
            out.push_back(Ok(StreamEvent::Stop(stop)));
        }
    }

    /// Handles one decoded frame.
    pub(crate) fn on_message(
        &mut self,
        message: &aws_smithy_types::event_stream::Message,
        out: &mut Out,
    ) {
        if self.done {
            return;
        }
        let header = |name: &str| {
            message
                .headers()
                .iter()
                .find(|h| h.name().as_str() == name)
                .and_then(|h| h.value().as_string().ok())
                .map(|s| s.as_str().to_string())
                .unwrap_or_default()
        };
        let parsed = serde_json::from_slice::<Value>(message.payload());
        let message_type = header(":message-type");
        // An event frame whose payload does not decode breaks the stream
        // (never skipped silently); an error frame's text is a best effort.
        if message_type == "event"
            && let Err(e) = &parsed
        {
            self.done = true;
            return out.push_back(Err(http::bad_event("an event-stream frame", e)));
        }
        let payload = parsed.unwrap_or(Value::Null);
        match message_type.as_str() {
            "event" => {}
            "exception" => {
                let kind = header(":exception-type");
                let text = payload["message"]
                    .as_str()
                    .or(payload["Message"].as_str())
                    .unwrap_or_default();
                let class = if kind.eq_ignore_ascii_case("validationException") {
                    validation_class(text)
                } else {
                    ErrorClass::StreamInterrupted
                };
                self.done = true;
                return out.push_back(Err(ProviderError::new(
                    class,
                    format!("{kind} in the upstream stream: {text}"),
                )));
            }
            other => {
                self.done = true;
                let code = header(":error-code");
                let text = header(":error-message");
                return out.push_back(Err(ProviderError::new(
                    ErrorClass::StreamInterrupted,
                    format!("upstream stream {other} frame {code}: {text}"),
                )));
            }
        }
        let event_type = header(":event-type");
        match event_type.as_str() {
            "messageStart" => self.start(out),
            "contentBlockStart" => {
                self.start(out);
                let tool = &payload["start"]["toolUse"];
                if tool.is_object() {
                    let (index, _) = self.index(payload["contentBlockIndex"].as_u64().unwrap_or(0));
                    out.push_back(Ok(StreamEvent::ToolUseStart {
                        index,
                        id: tool["toolUseId"].as_str().unwrap_or_default().into(),
                        name: tool["name"].as_str().unwrap_or_default().into(),
                    }));
                }
            }
            "contentBlockDelta" => {
                self.start(out);
                let delta = &payload["delta"];
                let upstream = payload["contentBlockIndex"].as_u64().unwrap_or(0);
                if let Some(text) = delta["text"].as_str().filter(|t| !t.is_empty()) {
                    let (index, _) = self.index(upstream);
                    out.push_back(Ok(StreamEvent::Text {
                        index,
                        text: text.into(),
                    }));
                } else if let Some(input) =
                    delta["toolUse"]["input"].as_str().filter(|t| !t.is_empty())
                {
                    let (index, _) = self.index(upstream);
                    out.push_back(Ok(StreamEvent::ToolInputJson {
                        index,
                        json: input.into(),
                    }));
                }
            }
            "messageStop" => {
                self.stop = Some(stop_reason(
                    payload["stopReason"].as_str().unwrap_or_default(),
                ));
            }
            "metadata" => {
                if payload["usage"].is_object() {
                    self.usage = Some(usage(&payload["usage"]));
                }
                self.finish(out);
            }
            // contentBlockStop, and events added later.
            _ => {}
        }
    }

    /// The body ended: a stop seen without its metadata still counts.
    pub(crate) fn on_end(&mut self, out: &mut Out) {
        self.finish(out);
    }
}

/// Splits frames out of `buffer`, at most `max_frame` bytes each, decoding
/// each (CRCs checked) into `translator`. A frame longer than the limit or
/// with a bad CRC fails the stream.
pub(crate) fn drain_frames(
    buffer: &mut BytesMut,
    max_frame: usize,
    translator: &mut Translator,
    out: &mut Out,
) -> Result<(), ProviderError> {
    loop {
        if buffer.len() < 4 {
            return Ok(());
        }
        let total = usize::try_from(u32::from_be_bytes([
            buffer[0], buffer[1], buffer[2], buffer[3],
        ]))
        .unwrap_or(usize::MAX);
        if total < MIN_FRAME || total > max_frame.saturating_add(MIN_FRAME) {
            return Err(ProviderError::new(
                ErrorClass::StreamInterrupted,
                format!(
                    "the upstream sent an event-stream frame of {total} bytes (the provider's \
                     max_event_bytes is {max_frame})"
                ),
            ));
        }
        if buffer.len() < total {
            return Ok(());
        }
        let mut frame = buffer.split_to(total).freeze();
        let message =
            aws_smithy_eventstream::frame::read_message_from(&mut frame).map_err(|e| {
                ProviderError::new(
                    ErrorClass::StreamInterrupted,
                    format!("the upstream sent a malformed event-stream frame: {e}"),
                )
            })?;
        if frame.has_remaining() {
            return Err(ProviderError::new(
                ErrorClass::StreamInterrupted,
                "the upstream sent an event-stream frame longer than its header says",
            ));
        }
        translator.on_message(&message, out);
    }
}

struct FrameState {
    response: super::http::BodyStream,
    buffer: BytesMut,
    translator: Translator,
    secrets: Vec<ApiKey>,
    pending: Out,
    finished: bool,
    max_frame: usize,
}

/// Streams `response`'s event-stream body through `translator`; ends after
/// the first error or the stop, with `secrets` redacted from errors.
fn event_stream(
    response: reqwest::Response,
    translator: Translator,
    max_frame: usize,
    secrets: Vec<ApiKey>,
) -> EventStream {
    let state = FrameState {
        response: super::http::BodyStream::new(response),
        buffer: BytesMut::new(),
        translator,
        secrets,
        pending: VecDeque::new(),
        finished: false,
        max_frame,
    };
    Box::pin(stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.pending.pop_front() {
                let item = item.map_err(|e| redact_all(&st.secrets, e));
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
                    st.buffer.extend_from_slice(&bytes);
                    if let Err(e) = drain_frames(
                        &mut st.buffer,
                        st.max_frame,
                        &mut st.translator,
                        &mut st.pending,
                    ) {
                        st.pending.push_back(Err(e));
                    }
                }
                Ok(None) => {
                    st.finished = true;
                    if st.buffer.is_empty() {
                        st.translator.on_end(&mut st.pending);
                    } else {
                        st.pending.push_back(Err(ProviderError::new(
                            ErrorClass::StreamInterrupted,
                            "the upstream stream ended inside an event-stream frame",
                        )));
                    }
                    if st.pending.is_empty() {
                        return None;
                    }
                }
                Err(e) => st.pending.push_back(Err(http::body_error(&e))),
            }
        }
    }))
}

// === errors ===

fn validation_class(message: &str) -> ErrorClass {
    let lower = message.to_ascii_lowercase();
    if lower.contains("too long")
        || lower.contains("too many input tokens")
        || lower.contains("context length")
        || lower.contains("context window")
        || lower.contains("maximum context")
    {
        ErrorClass::ContextLength
    } else {
        ErrorClass::InvalidRequest
    }
}

/// The error type from `x-amzn-errortype` (`ThrottlingException:http://...`),
/// else the body's `__type` (`...#ThrottlingException`) or `code`; the
/// message from the body's `message` (or `Message`).
pub(crate) fn classify(_status: u16, headers: &HeaderMap, body: &[u8]) -> Classified {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = v["message"]
        .as_str()
        .or(v["Message"].as_str())
        .unwrap_or_default()
        .to_string();
    let kind = headers
        .get("x-amzn-errortype")
        .and_then(|h| h.to_str().ok())
        .map(|t| t.split(':').next().unwrap_or_default().to_string())
        .or_else(|| {
            v["__type"]
                .as_str()
                .map(|t| t.rsplit('#').next().unwrap_or(t).to_string())
        })
        .or_else(|| v["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    let (class, should_retry) = match kind.as_str() {
        "ThrottlingException" => (Some(ErrorClass::RateLimited), None),
        // A quota the account has spent: the same request fails again.
        "ServiceQuotaExceededException" => (Some(ErrorClass::RateLimited), Some(false)),
        "ServiceUnavailableException" | "ModelNotReadyException" => {
            (Some(ErrorClass::Overloaded), None)
        }
        "ModelTimeoutException" => (Some(ErrorClass::Timeout), None),
        "ValidationException" => (Some(validation_class(&message)), None),
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException" => (Some(ErrorClass::Auth), None),
        "ResourceNotFoundException" => (Some(ErrorClass::NotFound), None),
        "InternalServerException" | "ModelErrorException" => (Some(ErrorClass::ServerError), None),
        "ModelStreamErrorException" => (Some(ErrorClass::StreamInterrupted), None),
        _ => (None, None),
    };
    let message = if kind.is_empty() {
        message
    } else {
        format!("{kind}: {message}")
    };
    Classified {
        class,
        message,
        should_retry,
        ..Classified::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};

    fn frame(event: &str, payload: Value) -> Vec<u8> {
        let message = Message::new(payload.to_string().into_bytes())
            .add_header(Header::new(
                ":message-type",
                HeaderValue::String("event".into()),
            ))
            .add_header(Header::new(
                ":event-type",
                HeaderValue::String(event.to_string().into()),
            ))
            .add_header(Header::new(
                ":content-type",
                HeaderValue::String("application/json".into()),
            ));
        let mut out = Vec::new();
        aws_smithy_eventstream::frame::write_message_to(&message, &mut out).unwrap();
        out
    }

    #[test]
    fn frames_split_anywhere_decode_and_a_bad_crc_fails() {
        let mut bytes = frame("messageStart", json!({"role": "assistant"}));
        bytes.extend(frame(
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": {"text": "hi"}}),
        ));
        bytes.extend(frame("messageStop", json!({"stopReason": "end_turn"})));
        bytes.extend(frame(
            "metadata",
            json!({"usage": {"inputTokens": 3, "outputTokens": 1}}),
        ));
        for split in 1..bytes.len() {
            let mut t = Translator::new("id".into(), "m".into());
            let mut out = VecDeque::new();
            let mut buffer = BytesMut::new();
            for part in [&bytes[..split], &bytes[split..]] {
                buffer.extend_from_slice(part);
                drain_frames(&mut buffer, 1 << 20, &mut t, &mut out).unwrap();
            }
            assert_eq!(out.len(), 4, "split at {split}");
            assert!(matches!(
                out.back(),
                Some(Ok(StreamEvent::Stop(StopReason::EndTurn)))
            ));
        }
        let mut bad = frame("messageStart", json!({}));
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let mut t = Translator::new("id".into(), "m".into());
        let e = drain_frames(
            &mut BytesMut::from(&bad[..]),
            1 << 20,
            &mut t,
            &mut VecDeque::new(),
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::StreamInterrupted);
        let big = frame(
            "contentBlockDelta",
            json!({"delta": {"text": "x".repeat(200)}}),
        );
        let e = drain_frames(
            &mut BytesMut::from(&big[..]),
            64,
            &mut t,
            &mut VecDeque::new(),
        )
        .unwrap_err();
        assert!(e.message.contains("max_event_bytes"), "{e}");
    }

    #[test]
    fn an_event_frame_whose_payload_does_not_decode_breaks_the_stream() {
        let message = Message::new(b"{not json".to_vec())
            .add_header(Header::new(
                ":message-type",
                HeaderValue::String("event".into()),
            ))
            .add_header(Header::new(
                ":event-type",
                HeaderValue::String("contentBlockDelta".into()),
            ));
        let mut bytes = Vec::new();
        aws_smithy_eventstream::frame::write_message_to(&message, &mut bytes).unwrap();
        bytes.extend(frame("messageStop", json!({"stopReason": "end_turn"})));
        let mut t = Translator::new("id".into(), "m".into());
        let mut out = VecDeque::new();
        drain_frames(&mut BytesMut::from(&bytes[..]), 1 << 20, &mut t, &mut out).unwrap();
        // Not skipped: the stream ends in an error, with no Stop after it.
        assert_eq!(out.len(), 1, "{out:?}");
        let Some(Err(e)) = out.pop_front() else {
            panic!("an error")
        };
        assert_eq!(e.class, ErrorClass::StreamInterrupted);
        assert!(e.message.contains("event-stream frame"), "{e}");
    }

    #[test]
    fn error_types_classify() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-amzn-errortype",
            "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/"
                .parse()
                .unwrap(),
        );
        let c = classify(
            400,
            &h,
            br#"{"message":"Input is too long for requested model."}"#,
        );
        assert_eq!(c.class, Some(ErrorClass::ContextLength));
        let c = classify(
            400,
            &HeaderMap::new(),
            br#"{"__type":"com.amazon#ThrottlingException","message":"slow"}"#,
        );
        assert_eq!(c.class, Some(ErrorClass::RateLimited));
        assert_eq!(c.message, "ThrottlingException: slow");
    }
}
