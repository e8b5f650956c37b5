//! The anthropic provider through the gateway: Complete and Stream, text and
//! tool use, and what the upstream received.

use futures_util::StreamExt;
use provider_gateway_client::v1::content_block::Block;
use provider_gateway_client::{CallOptions, StopReason, StreamEvent, request, v1};
use serde_json::json;
use tonic::Code;

use crate::support::{ENV, Gateway, KEY, Reply, Step, Upstream, provider_config, sse_event};

fn message_json(content: serde_json::Value, stop: &str) -> serde_json::Value {
    json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
        "content": content, "stop_reason": stop,
        "usage": {"input_tokens": 12, "output_tokens": 7}
    })
}

pub fn text_stream(texts: &[&str], stop: Option<&str>) -> Vec<Step> {
    let mut steps = vec![
        Step::Chunk(sse_event("message_start", &json!({"type": "message_start", "message": {"id": "msg_s", "model": "claude-test", "usage": {"input_tokens": 9, "output_tokens": 1}}}).to_string())),
        Step::Chunk(sse_event("content_block_start", &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}).to_string())),
        Step::Chunk(sse_event("ping", &json!({"type": "ping"}).to_string())),
    ];
    for t in texts {
        steps.push(Step::Chunk(sse_event("content_block_delta", &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}).to_string())));
    }
    steps.push(Step::Chunk(sse_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}).to_string(),
    )));
    if let Some(stop) = stop {
        steps.push(Step::Chunk(sse_event("message_delta", &json!({"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": texts.len()}}).to_string())));
        steps.push(Step::Chunk(sse_event(
            "message_stop",
            &json!({"type": "message_stop"}).to_string(),
        )));
    }
    steps
}

async fn gateway(upstream: &Upstream) -> Gateway {
    Gateway::start(
        &provider_config("anthropic", &upstream.url(), "model = \"claude-test\""),
        ENV,
    )
    .await
}

#[tokio::test]
async fn complete_returns_text_and_sends_the_messages_api_request() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        message_json(json!([{"type": "text", "text": "Hi there"}]), "end_turn"),
    )])
    .await;
    let gw = gateway(&upstream).await;
    let mut req = request::user("Hello");
    req.system = "Be brief".into();
    req.max_tokens = Some(50);
    req.temperature = Some(0.5);
    req.stop_sequences = vec!["END".into()];
    let answer = gw
        .client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap();

    assert_eq!(answer.text(), "Hi there");
    assert_eq!(answer.stop_reason(), StopReason::EndTurn);
    assert_eq!(
        answer.response.usage,
        Some(v1::Usage {
            input_tokens: 12,
            output_tokens: 7
        })
    );
    assert_eq!((answer.response.attempts, answer.attempts), (1, 1));
    assert_eq!(
        (answer.response.provider.as_str(), answer.provider.as_str()),
        ("p", "p")
    );
    assert_eq!(answer.response.id, "msg_1");
    assert_eq!(answer.response.model, "claude-test");

    let sent = &upstream.requests()[0];
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/messages")
    );
    assert_eq!(sent.header("x-api-key"), Some(KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.body["model"], "claude-test");
    assert_eq!(sent.body["max_tokens"], 50);
    assert_eq!(sent.body["system"], "Be brief");
    assert_eq!(sent.body["temperature"], 0.5);
    assert_eq!(sent.body["stop_sequences"], json!(["END"]));
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    );
    assert!(sent.body.get("stream").is_none());
}

#[tokio::test]
async fn tool_use_round_trip() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        message_json(json!([{"type": "text", "text": "Checking"}, {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Oslo"}}]), "tool_use"),
    )])
    .await;
    let gw = gateway(&upstream).await;
    let mut req = request::user("Weather in Paris?");
    req.messages.push(v1::Message {
        role: v1::Role::Assistant as i32,
        content: vec![v1::ContentBlock {
            block: Some(Block::ToolUse(v1::ToolUse {
                id: "toolu_1".into(),
                name: "weather".into(),
                input_json: r#"{"city":"Paris"}"#.into(),
            })),
        }],
    });
    req.messages.push(v1::Message {
        role: v1::Role::User as i32,
        content: vec![
            request::tool_result_block("toolu_1", "18C", false),
            request::text_block("And Oslo?"),
        ],
    });
    req.tools = vec![request::tool(
        "weather",
        "Current weather",
        r#"{"type":"object","properties":{"city":{"type":"string"}}}"#,
    )];
    req.tool_choice = Some(v1::ToolChoice {
        mode: v1::tool_choice::Mode::Tool as i32,
        name: "weather".into(),
    });
    let answer = gw
        .client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap();

    assert_eq!(answer.stop_reason(), StopReason::ToolUse);
    let Some(Block::ToolUse(call)) = &answer.response.content[1].block else {
        panic!("tool use block expected: {:?}", answer.response.content)
    };
    assert_eq!(
        (call.id.as_str(), call.name.as_str()),
        ("toolu_2", "weather")
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&call.input_json).unwrap(),
        json!({"city": "Oslo"})
    );

    let body = &upstream.requests()[0].body;
    assert_eq!(
        body["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(
        body["tool_choice"],
        json!({"type": "tool", "name": "weather"})
    );
    assert_eq!(
        body["messages"][1]["content"][0],
        json!({"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}})
    );
    assert_eq!(
        body["messages"][2]["content"][0],
        json!({"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C", "is_error": false})
    );
    assert_eq!(
        body["messages"][2]["content"][1],
        json!({"type": "text", "text": "And Oslo?"})
    );
}

#[tokio::test]
async fn stream_relays_text_deltas_usage_and_stop() {
    let upstream = Upstream::start(vec![Reply::sse_steps(text_stream(
        &["Hel", "lo", "!"],
        Some("end_turn"),
    ))])
    .await;
    let gw = gateway(&upstream).await;
    let events: Vec<StreamEvent> = gw
        .client()
        .await
        .stream(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(
        events,
        [
            StreamEvent::Start {
                id: "msg_s".into(),
                provider: "p".into(),
                model: "claude-test".into(),
                attempt: 1
            },
            // The prompt's usage, known from message_start.
            StreamEvent::Usage(v1::Usage {
                input_tokens: 9,
                output_tokens: 1
            }),
            StreamEvent::Text {
                index: 0,
                text: "Hel".into()
            },
            StreamEvent::Text {
                index: 0,
                text: "lo".into()
            },
            StreamEvent::Text {
                index: 0,
                text: "!".into()
            },
            StreamEvent::Usage(v1::Usage {
                input_tokens: 9,
                output_tokens: 3
            }),
            StreamEvent::Stop(StopReason::EndTurn),
        ]
    );
    assert_eq!(upstream.requests()[0].body["stream"], true);
}

#[tokio::test]
async fn streamed_tool_use_arrives_as_start_and_json_fragments() {
    let ev = |name: &str, v: serde_json::Value| Step::Chunk(sse_event(name, &v.to_string()));
    let upstream = Upstream::start(vec![Reply::sse_steps(vec![
        ev("message_start", json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {"input_tokens": 5}}})),
        // A thinking block is not relayed and does not take an index.
        ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}})),
        ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}})),
        ev("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {}}})),
        ev("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}})),
        ev("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Oslo\"}"}})),
        ev("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
        ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 11}})),
        ev("message_stop", json!({"type": "message_stop"})),
    ])])
    .await;
    let gw = gateway(&upstream).await;
    let mut req = request::user("Weather?");
    req.tools = vec![request::tool("weather", "", r#"{"type":"object"}"#)];
    let events: Vec<StreamEvent> = gw
        .client()
        .await
        .stream(req, &CallOptions::new())
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(
        events[1..],
        [
            StreamEvent::Usage(v1::Usage {
                input_tokens: 5,
                output_tokens: 0
            }),
            StreamEvent::ToolUseStart {
                index: 0,
                id: "toolu_9".into(),
                name: "weather".into()
            },
            StreamEvent::ToolInputJson {
                index: 0,
                json: "{\"city\": ".into()
            },
            StreamEvent::ToolInputJson {
                index: 0,
                json: "\"Oslo\"}".into()
            },
            StreamEvent::Usage(v1::Usage {
                input_tokens: 5,
                output_tokens: 11
            }),
            StreamEvent::Stop(StopReason::ToolUse),
        ]
    );
}

/// Collects a stream until its end; returns the events and the final status
/// (None when it ended OK).
pub async fn drain(
    mut events: provider_gateway_client::EventStream,
) -> (Vec<StreamEvent>, Option<tonic::Status>) {
    let mut got = Vec::new();
    while let Some(item) = events.next().await {
        match item {
            Ok(e) => got.push(e),
            Err(e) => return (got, e.status().cloned()),
        }
    }
    (got, None)
}

#[tokio::test]
async fn error_event_before_content_fails_a_single_attempt_with_its_class() {
    let ev = |name: &str, v: serde_json::Value| Step::Chunk(sse_event(name, &v.to_string()));
    let upstream = Upstream::start(vec![Reply::sse_steps(vec![
        ev("message_start", json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}})),
        ev("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
    ])])
    .await;
    let gw = Gateway::start(
        &provider_config(
            "anthropic",
            &upstream.url(),
            "[providers.p.retry]\nmax_attempts = 1",
        ),
        ENV,
    )
    .await;
    let err = gw
        .client()
        .await
        .stream(request::user("Hi"), &CallOptions::new())
        .await
        .err()
        .expect("stream fails");
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("overloaded") && status.message().contains("Overloaded"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn error_event_after_content_ends_unavailable_not_ok() {
    let mut steps = text_stream(&["par", "tial"], None);
    steps.push(Step::Chunk(sse_event(
        "error",
        &json!({"type": "error", "error": {"type": "api_error", "message": "boom"}}).to_string(),
    )));
    let upstream = Upstream::start(vec![Reply::sse_steps(steps)]).await;
    let gw = gateway(&upstream).await;
    let (events, status) = gw.stream_all(request::user("Hi")).await;
    let status = status.expect("the stream must not end OK");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("2 content delta"),
        "{}",
        status.message()
    );
    assert!(!events.iter().any(|e| matches!(e, StreamEvent::Stop(_))));
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Text { .. }))
            .count(),
        2
    );
}

#[tokio::test]
async fn connection_cut_mid_stream_ends_unavailable() {
    let mut steps = text_stream(&["one", " two"], None);
    steps.push(Step::Cut);
    let upstream = Upstream::start(vec![Reply::sse_steps(steps)]).await;
    let gw = gateway(&upstream).await;
    let (events, status) = gw.stream_all(request::user("Hi")).await;
    let status = status.expect("a cut stream must not end OK");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("stream-interrupted"),
        "{}",
        status.message()
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Text { .. }))
            .count(),
        2,
        "two deltas were relayed: {events:?}"
    );
}

#[tokio::test]
async fn stream_ending_without_stop_reason_is_an_error() {
    // The body ends cleanly, but no message_delta / message_stop came.
    let upstream = Upstream::start(vec![Reply::sse_steps(text_stream(&["a", "b"], None))]).await;
    let gw = gateway(&upstream).await;
    let (_, status) = gw.stream_all(request::user("Hi")).await;
    let status = status.expect("no stop reason must not end OK");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("without a stop reason"),
        "{}",
        status.message()
    );
}
