//! Anthropic Messages: `POST /v1/messages`, whole answers and `stream:
//! true` with Anthropic's own event sequence: `message_start`, then per
//! content block `content_block_start`, `content_block_delta`s
//! (`text_delta`, `input_json_delta`) and `content_block_stop`, then
//! `message_delta` (stop reason, usage) and `message_stop`. A stream that
//! breaks after content ends with an `error` event and no `message_stop`,
//! as Anthropic's own API does.

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
struct MessagesRequest {
    #[serde(default)]
    model: String,
    messages: Vec<InMessage>,
    max_tokens: Option<u32>,
    system: Option<Value>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop_sequences: Option<Vec<String>>,
    tools: Option<Vec<InTool>>,
    tool_choice: Option<InToolChoice>,
    stream: Option<bool>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    content: Value,
}

#[derive(Deserialize)]
struct InTool {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    description: Option<String>,
    input_schema: Option<Value>,
}

#[derive(Deserialize)]
struct InToolChoice {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
}

/// Text of a `system` or `tool_result.content`: a string or text blocks.
fn text_of(value: &Value, at: &str) -> Result<String, HttpError> {
    match value {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => out.push(
                        b.get("text")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    other => {
                        return Err(HttpError::invalid(format!(
                            "{at}[{j}].type: `{}` blocks are not supported here by this gateway (text only)",
                            other.unwrap_or("?")
                        )));
                    }
                }
            }
            Ok(out.join("\n\n"))
        }
        _ => Err(HttpError::invalid(format!(
            "{at}: must be a string or an array of text blocks"
        ))),
    }
}

fn block(b: pb::content_block::Block) -> pb::ContentBlock {
    pb::ContentBlock { block: Some(b) }
}

fn content_blocks(content: &Value, at: &str) -> Result<Vec<pb::ContentBlock>, HttpError> {
    use pb::content_block::Block;
    let blocks = match content {
        Value::String(s) if s.is_empty() => return Ok(Vec::new()),
        Value::String(s) => return Ok(vec![block(Block::Text(s.clone()))]),
        Value::Array(blocks) => blocks,
        _ => {
            return Err(HttpError::invalid(format!(
                "{at}.content: must be a string or an array of content blocks"
            )));
        }
    };
    let mut out = Vec::with_capacity(blocks.len());
    for (j, b) in blocks.iter().enumerate() {
        let here = format!("{at}.content[{j}]");
        let field = |name: &str| {
            b.get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        match b.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = field("text");
                if !text.is_empty() {
                    out.push(block(Block::Text(text)));
                }
            }
            Some("tool_use") => out.push(block(Block::ToolUse(pb::ToolUse {
                id: field("id"),
                name: field("name"),
                input_json: b.get("input").map(Value::to_string).unwrap_or_default(),
            }))),
            Some("tool_result") => out.push(block(Block::ToolResult(pb::ToolResult {
                tool_use_id: field("tool_use_id"),
                content: text_of(
                    b.get("content").unwrap_or(&Value::Null),
                    &format!("{here}.content"),
                )?,
                is_error: b.get("is_error").and_then(Value::as_bool).unwrap_or(false),
            }))),
            // Earlier turns' reasoning: history the gateway's model does not
            // carry; dropping it keeps the conversation valid.
            Some("thinking" | "redacted_thinking") => {}
            Some(other) => {
                return Err(HttpError::invalid(format!(
                    "{here}.type: `{other}` blocks are not supported by this gateway"
                )));
            }
            None => return Err(HttpError::invalid(format!("{here}.type: required"))),
        }
    }
    Ok(out)
}

fn translate(
    ingress: &Ingress,
    r: MessagesRequest,
) -> Result<(pb::CompleteRequest, super::Target, bool), HttpError> {
    let target = super::target(&ingress.registry, &r.model);
    let system = text_of(r.system.as_ref().unwrap_or(&Value::Null), "system")?;
    let mut turns = Vec::new();
    for (i, m) in r.messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = match m.role.as_str() {
            "user" => pb::Role::User,
            "assistant" => pb::Role::Assistant,
            other => {
                return Err(HttpError::invalid(format!(
                    "{at}.role: `{other}` is not user or assistant"
                )));
            }
        };
        super::push_turn(&mut turns, role, content_blocks(&m.content, &at)?);
    }
    let mut tools = Vec::new();
    for (i, t) in r.tools.unwrap_or_default().into_iter().enumerate() {
        if let Some(kind) = t.kind.as_deref()
            && kind != "custom"
        {
            return Err(HttpError::invalid(format!(
                "tools[{i}].type: `{kind}` (a server tool) is not supported by this gateway"
            )));
        }
        tools.push(pb::Tool {
            name: t.name,
            description: t.description.unwrap_or_default(),
            input_schema_json: t
                .input_schema
                .unwrap_or_else(|| json!({"type": "object"}))
                .to_string(),
        });
    }
    let tool_choice = match r.tool_choice {
        None => None,
        Some(c) => {
            let mode = match c.kind.as_str() {
                "auto" => pb::tool_choice::Mode::Auto,
                "any" => pb::tool_choice::Mode::Any,
                "none" => pb::tool_choice::Mode::None,
                "tool" => pb::tool_choice::Mode::Tool,
                other => {
                    return Err(HttpError::invalid(format!(
                        "tool_choice.type: `{other}` is not auto, any, tool or none"
                    )));
                }
            };
            Some(pb::ToolChoice {
                mode: mode as i32,
                name: c.name.unwrap_or_default(),
            })
        }
    };
    let request = pb::CompleteRequest {
        provider: target.provider.clone(),
        model: target.model.clone(),
        system,
        messages: turns,
        max_tokens: r.max_tokens,
        temperature: r.temperature,
        top_p: r.top_p,
        stop_sequences: r.stop_sequences.unwrap_or_default(),
        tools,
        tool_choice,
    };
    Ok((request, target, r.stream.unwrap_or(false)))
}

/// `POST /v1/messages`.
pub(crate) async fn messages(
    ingress: &Ingress,
    request: Request<Incoming>,
    arrival: Instant,
) -> Result<Response<Body>, HttpError> {
    let (parts, body) = request.into_parts();
    ingress.authenticate(&parts.headers)?;
    let json = super::read_json(body, ingress.max_body).await?;
    let (pb_request, target, stream) = translate(ingress, super::parse(json)?)?;
    let (open, admission, model) = match ingress
        .serve(&parts.headers, pb_request, &target, stream, arrival)
        .await?
    {
        Served::Whole(done) => {
            return Ok(super::json_response(
                StatusCode::OK,
                &message_body(&done.response),
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
    let mut events = Events {
        model,
        usage: Usage::default(),
        blocks: HashMap::new(),
        open: None,
        next: 0,
        finished: false,
    };
    let body = open.events.map(move |item| {
        let _held = &admission;
        events.render(item)
    });
    Ok(super::sse_response(body, &open.provider, open.attempt))
}

fn stop_reason(s: StopReason) -> &'static str {
    match s {
        StopReason::EndTurn => "end_turn",
        StopReason::MaxTokens => "max_tokens",
        StopReason::StopSequence => "stop_sequence",
        StopReason::ToolUse => "tool_use",
        StopReason::Refusal | StopReason::ContentFilter => "refusal",
    }
}

fn message_body(r: &ChatResponse) -> Value {
    let content: Vec<Value> = r
        .content
        .iter()
        .filter_map(|c| match c {
            Content::Text(t) => Some(json!({"type": "text", "text": t})),
            Content::ToolUse {
                id,
                name,
                input_json,
            } => Some(json!({
                "type": "tool_use", "id": id, "name": name,
                "input": serde_json::from_str::<Value>(input_json).unwrap_or_else(|_| json!({})),
            })),
            Content::ToolResult { .. } => None,
        })
        .collect();
    json!({
        "id": r.id,
        "type": "message",
        "role": "assistant",
        "model": r.model,
        "content": content,
        "stop_reason": stop_reason(r.stop_reason),
        "stop_sequence": null,
        "usage": {"input_tokens": r.usage.input_tokens, "output_tokens": r.usage.output_tokens},
    })
}

/// Renders the gateway's stream events as Anthropic's SSE events.
struct Events {
    model: String,
    usage: Usage,
    /// The gateway's block index -> the caller's (0, 1, 2, ... in order).
    blocks: HashMap<u32, u32>,
    /// The caller's index of the open content block.
    open: Option<u32>,
    /// The caller's index of the next block to open.
    next: u32,
    finished: bool,
}

fn event(out: &mut Vec<u8>, name: &str, data: &Value) {
    out.extend_from_slice(format!("event: {name}\ndata: {data}\n\n").as_bytes());
}

impl Events {
    /// Opens the caller's block for the gateway's `index` when it is not
    /// open yet (closing the previous one), with `start` as its
    /// `content_block`. Returns the caller's index.
    fn enter(&mut self, out: &mut Vec<u8>, index: u32, start: impl FnOnce() -> Value) -> u32 {
        let ours = match self.blocks.get(&index) {
            Some(ours) => *ours,
            None => {
                let ours = self.next;
                self.next = self.next.saturating_add(1);
                self.blocks.insert(index, ours);
                ours
            }
        };
        if self.open != Some(ours) {
            self.close(out);
            event(
                out,
                "content_block_start",
                &json!({"type": "content_block_start", "index": ours, "content_block": start()}),
            );
            self.open = Some(ours);
        }
        ours
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some(i) = self.open.take() {
            event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": i}),
            );
        }
    }

    fn render(&mut self, item: Result<StreamEvent, crate::error::GatewayError>) -> Bytes {
        if self.finished {
            return Bytes::new();
        }
        let mut out = Vec::new();
        match item {
            Ok(StreamEvent::Start { id, model }) => {
                if !model.is_empty() {
                    self.model = model;
                }
                event(
                    &mut out,
                    "message_start",
                    &json!({"type": "message_start", "message": {
                        "id": id, "type": "message", "role": "assistant", "model": self.model,
                        "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": self.usage.input_tokens, "output_tokens": 0},
                    }}),
                );
            }
            Ok(StreamEvent::Text { index, text }) => {
                let i = self.enter(&mut out, index, || json!({"type": "text", "text": ""}));
                event(
                    &mut out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": i,
                            "delta": {"type": "text_delta", "text": text}}),
                );
            }
            Ok(StreamEvent::ToolUseStart { index, id, name }) => {
                // A tool call always opens its own block.
                self.blocks.remove(&index);
                self.enter(
                    &mut out,
                    index,
                    || json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                );
            }
            Ok(StreamEvent::ToolInputJson { index, json }) => {
                let i = self.enter(
                    &mut out,
                    index,
                    || json!({"type": "tool_use", "id": "", "name": "", "input": {}}),
                );
                event(
                    &mut out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": json}}),
                );
            }
            Ok(StreamEvent::Usage(u)) => self.usage = u,
            Ok(StreamEvent::Stop(reason)) => {
                self.finished = true;
                self.close(&mut out);
                event(
                    &mut out,
                    "message_delta",
                    &json!({"type": "message_delta",
                            "delta": {"stop_reason": stop_reason(reason), "stop_sequence": null},
                            "usage": {"input_tokens": self.usage.input_tokens,
                                      "output_tokens": self.usage.output_tokens}}),
                );
                event(&mut out, "message_stop", &json!({"type": "message_stop"}));
            }
            Ok(StreamEvent::KeepAlive) => {
                event(&mut out, "ping", &json!({"type": "ping"}));
            }
            Ok(StreamEvent::Resumed { .. }) => {}
            // This wire format cannot take back what was sent: a restart
            // ends the stream with an error, as the break would have.
            Ok(StreamEvent::Restarted { .. }) => {
                self.finished = true;
                let e = HttpError::from_gateway(&super::restart_error(), false, false);
                event(&mut out, "error", &e.body(Dialect::Anthropic));
            }
            Err(error) => {
                self.finished = true;
                let e = HttpError::from_gateway(&error, false, false);
                event(&mut out, "error", &e.body(Dialect::Anthropic));
            }
        }
        Bytes::from(out)
    }
}
