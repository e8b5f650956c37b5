//! OpenAI Chat Completions: `POST /v1/chat/completions`, whole answers and
//! `stream: true` (SSE `data:` chunks ending `data: [DONE]`, a usage chunk
//! when `stream_options.include_usage` is set). Unknown fields are ignored,
//! as OpenAI's own server ignores them; fields the gateway cannot honour
//! (`n > 1`, `logprobs`, audio) are refused naming the field.
//!
//! A stream that breaks after content ends with an in-band
//! `data: {"error":...}` event and no `[DONE]`: the SDKs raise on it, so no
//! caller reads a truncated answer as complete.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use provider_gateway::v1 as pb;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Body, Dialect, HttpError, Ingress, Served};
use crate::chat::{ChatResponse, Content, StopReason, StreamEvent, Usage};

#[derive(Deserialize)]
struct ChatCompletionRequest {
    #[serde(default)]
    model: String,
    messages: Vec<InMessage>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop: Option<OneOrMany>,
    tools: Option<Vec<InTool>>,
    tool_choice: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    audio: Option<Value>,
    modalities: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    content: Option<Value>,
    tool_calls: Option<Vec<InToolCall>>,
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
struct InToolCall {
    id: String,
    function: InFunctionCall,
}

#[derive(Deserialize)]
struct InFunctionCall {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Deserialize)]
struct InTool {
    #[serde(rename = "type", default = "function_type")]
    kind: String,
    function: InFunction,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Deserialize)]
struct InFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    parameters: Option<Value>,
}

/// The text of a message's `content`: a string, or text parts.
fn text_parts(content: Option<&Value>, at: &str) -> Result<Vec<String>, HttpError> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| match part.get("type").and_then(Value::as_str) {
                Some("text") => part
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        HttpError::invalid(format!("{at}.content[{j}].text: a string is required"))
                    }),
                Some(other) => Err(HttpError::invalid(format!(
                    "{at}.content[{j}].type: `{other}` parts are not supported by this gateway (text only)"
                ))),
                None => Err(HttpError::invalid(format!(
                    "{at}.content[{j}].type: required"
                ))),
            })
            .collect(),
        Some(_) => Err(HttpError::invalid(format!(
            "{at}.content: must be a string or an array of content parts"
        ))),
    }
}

fn text_block(text: String) -> pb::ContentBlock {
    pb::ContentBlock {
        block: Some(pb::content_block::Block::Text(text)),
    }
}

/// The gateway's request (in the gRPC shape, validated by the gRPC rules)
/// and whether to stream / report usage.
fn translate(
    ingress: &Ingress,
    r: ChatCompletionRequest,
) -> Result<(pb::CompleteRequest, super::Target, bool, bool), HttpError> {
    if let Some(n) = r.n
        && n > 1
    {
        return Err(HttpError::invalid(format!(
            "n: {n} choices are not supported by this gateway (n must be 1)"
        )));
    }
    if r.logprobs == Some(true) || r.top_logprobs.is_some_and(|n| n > 0) {
        let field = if r.logprobs == Some(true) {
            "logprobs"
        } else {
            "top_logprobs"
        };
        return Err(HttpError::invalid(format!(
            "{field}: log probabilities are not supported by this gateway"
        )));
    }
    if r.audio.as_ref().is_some_and(|a| !a.is_null()) {
        return Err(HttpError::invalid(
            "audio: audio output is not supported by this gateway",
        ));
    }
    if let Some(m) = &r.modalities
        && m.iter().any(|m| m != "text")
    {
        return Err(HttpError::invalid(
            "modalities: only `text` is supported by this gateway",
        ));
    }
    let target = super::target(&ingress.registry, &r.model);
    let mut system = Vec::new();
    let mut turns = Vec::new();
    for (i, m) in r.messages.into_iter().enumerate() {
        let at = format!("messages[{i}]");
        match m.role.as_str() {
            "system" | "developer" => system.extend(text_parts(m.content.as_ref(), &at)?),
            "user" => {
                let blocks = text_parts(m.content.as_ref(), &at)?
                    .into_iter()
                    .filter(|t| !t.is_empty())
                    .map(text_block)
                    .collect();
                super::push_turn(&mut turns, pb::Role::User, blocks);
            }
            "assistant" => {
                let mut blocks: Vec<pb::ContentBlock> = text_parts(m.content.as_ref(), &at)?
                    .into_iter()
                    .filter(|t| !t.is_empty())
                    .map(text_block)
                    .collect();
                for call in m.tool_calls.unwrap_or_default() {
                    blocks.push(pb::ContentBlock {
                        block: Some(pb::content_block::Block::ToolUse(pb::ToolUse {
                            id: call.id,
                            name: call.function.name,
                            input_json: call.function.arguments,
                        })),
                    });
                }
                super::push_turn(&mut turns, pb::Role::Assistant, blocks);
            }
            "tool" => {
                let tool_use_id = m.tool_call_id.filter(|id| !id.is_empty()).ok_or_else(|| {
                    HttpError::invalid(format!("{at}.tool_call_id: required for a tool message"))
                })?;
                let content = text_parts(m.content.as_ref(), &at)?.concat();
                super::push_turn(
                    &mut turns,
                    pb::Role::User,
                    vec![pb::ContentBlock {
                        block: Some(pb::content_block::Block::ToolResult(pb::ToolResult {
                            tool_use_id,
                            content,
                            is_error: false,
                        })),
                    }],
                );
            }
            other => {
                return Err(HttpError::invalid(format!(
                    "{at}.role: `{other}` is not system, developer, user, assistant or tool"
                )));
            }
        }
    }
    let mut tools = Vec::new();
    for (i, t) in r.tools.unwrap_or_default().into_iter().enumerate() {
        if t.kind != "function" {
            return Err(HttpError::invalid(format!(
                "tools[{i}].type: `{}` tools are not supported (function only)",
                t.kind
            )));
        }
        let schema = t
            .function
            .parameters
            .filter(|p| !p.is_null())
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        tools.push(pb::Tool {
            name: t.function.name,
            description: t.function.description.unwrap_or_default(),
            input_schema_json: schema.to_string(),
        });
    }
    let tool_choice = match r.tool_choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(pb::ToolChoice {
            mode: match s.as_str() {
                "auto" => pb::tool_choice::Mode::Auto,
                "none" => pb::tool_choice::Mode::None,
                "required" => pb::tool_choice::Mode::Any,
                other => {
                    return Err(HttpError::invalid(format!(
                        "tool_choice: `{other}` is not auto, none or required"
                    )));
                }
            } as i32,
            name: String::new(),
        }),
        Some(v) => {
            let name = v
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| HttpError::invalid("tool_choice.function.name: required"))?;
            Some(pb::ToolChoice {
                mode: pb::tool_choice::Mode::Tool as i32,
                name: name.to_string(),
            })
        }
    };
    let stop_sequences = match r.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    let stream = r.stream.unwrap_or(false);
    let include_usage = r
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let request = pb::CompleteRequest {
        provider: target.provider.clone(),
        model: target.model.clone(),
        system: system.join("\n\n"),
        messages: turns,
        max_tokens: r.max_completion_tokens.or(r.max_tokens),
        temperature: r.temperature,
        top_p: r.top_p,
        stop_sequences,
        tools,
        tool_choice,
    };
    Ok((request, target, stream, include_usage))
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    ingress: &Ingress,
    request: Request<Incoming>,
    arrival: Instant,
) -> Result<Response<Body>, HttpError> {
    let (parts, body) = request.into_parts();
    // Authenticate before reading (or judging) the body.
    ingress.authenticate(&parts.headers)?;
    let json = super::read_json(body, ingress.max_body).await?;
    let (pb_request, target, stream, include_usage) = translate(ingress, super::parse(json)?)?;
    let (open, admission, model) = match ingress
        .serve(&parts.headers, pb_request, &target, stream, arrival)
        .await?
    {
        Served::Whole(done) => {
            return Ok(super::json_response(
                StatusCode::OK,
                &completion_body(&done.response),
                &done.provider,
                done.attempts,
            ));
        }
        Served::Stream {
            open,
            admission,
            model,
        } => (open, admission, model),
    };
    let mut chunks = Chunks {
        id: String::new(),
        model,
        created: super::unix_now(),
        include_usage,
        usage: Usage::default(),
        tool_calls: HashMap::new(),
        finished: false,
    };
    let events = open.events.map(move |item| {
        // The stream holds its admission until it ends or is dropped.
        let _held = &admission;
        chunks.render(item)
    });
    Ok(super::sse_response(events, &open.provider, open.attempt))
}

fn finish_reason(s: StopReason) -> &'static str {
    match s {
        StopReason::EndTurn | StopReason::StopSequence => "stop",
        StopReason::MaxTokens => "length",
        StopReason::ToolUse => "tool_calls",
        StopReason::Refusal | StopReason::ContentFilter => "content_filter",
    }
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens.saturating_add(u.output_tokens),
    })
}

fn completion_body(r: &ChatResponse) -> Value {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for c in &r.content {
        match c {
            Content::Text(t) => text.push_str(t),
            Content::ToolUse {
                id,
                name,
                input_json,
            } => tool_calls.push(json!({
                "id": id, "type": "function",
                "function": {"name": name, "arguments": input_json},
            })),
            Content::ToolResult { .. } => {}
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { Value::String(text) },
        "refusal": null,
    });
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    json!({
        "id": r.id,
        "object": "chat.completion",
        "created": super::unix_now(),
        "model": r.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(r.stop_reason),
        }],
        "usage": usage_json(r.usage),
    })
}

/// Renders the gateway's stream events as chat completion chunks.
struct Chunks {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    usage: Usage,
    /// Content block index -> OpenAI tool call index.
    tool_calls: HashMap<u32, usize>,
    finished: bool,
}

impl Chunks {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    }

    fn render(&mut self, item: Result<StreamEvent, crate::error::GatewayError>) -> Bytes {
        if self.finished {
            return Bytes::new();
        }
        match item {
            Ok(StreamEvent::Start { id, model }) => {
                self.id = id;
                if !model.is_empty() {
                    self.model = model;
                }
                self.chunk(json!({"role": "assistant", "content": ""}), None)
            }
            Ok(StreamEvent::Text { text, .. }) => self.chunk(json!({"content": text}), None),
            Ok(StreamEvent::ToolUseStart { index, id, name }) => {
                let n = self.tool_calls.len();
                let call = *self.tool_calls.entry(index).or_insert(n);
                self.chunk(
                    json!({"tool_calls": [{
                        "index": call, "id": id, "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }]}),
                    None,
                )
            }
            Ok(StreamEvent::ToolInputJson { index, json }) => {
                let n = self.tool_calls.len();
                let call = *self.tool_calls.entry(index).or_insert(n);
                self.chunk(
                    json!({"tool_calls": [{"index": call, "function": {"arguments": json}}]}),
                    None,
                )
            }
            Ok(StreamEvent::Usage(u)) => {
                self.usage = u;
                Bytes::new()
            }
            Ok(StreamEvent::Stop(reason)) => {
                self.finished = true;
                let mut out = self.chunk(json!({}), Some(finish_reason(reason))).to_vec();
                if self.include_usage {
                    let chunk = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_json(self.usage),
                    });
                    out.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            // An SSE comment: keeps proxies from timing the connection out.
            Ok(StreamEvent::KeepAlive) => Bytes::from_static(b": ping\n\n"),
            Ok(StreamEvent::Resumed { .. }) => Bytes::new(),
            // This wire format cannot take back what was sent: a restart
            // ends the stream with an error, as the break would have.
            Ok(StreamEvent::Restarted { .. }) => {
                self.finished = true;
                let e = HttpError::from_gateway(&super::restart_error(), false, false);
                Bytes::from(format!("data: {}\n\n", e.body(Dialect::OpenAi)))
            }
            Err(error) => {
                // In band: the status line is long gone. No `[DONE]` follows.
                self.finished = true;
                let e = HttpError::from_gateway(&error, false, false);
                Bytes::from(format!("data: {}\n\n", e.body(Dialect::OpenAi)))
            }
        }
    }
}
