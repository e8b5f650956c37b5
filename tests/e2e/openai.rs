//! The openai and databricks providers (OpenAI chat-completions shapes)
//! through the gateway.

use provider_gateway_client::v1::content_block::Block;
use provider_gateway_client::{CallOptions, StopReason, StreamEvent, request, v1};
use serde_json::json;
use tonic::Code;

use crate::anthropic::drain;
use crate::support::{ENV, Gateway, KEY, Reply, Step, Upstream, provider_config};

fn chunk(v: serde_json::Value) -> (&'static str, String) {
    ("", v.to_string())
}

fn completion(message: serde_json::Value, finish: &str) -> serde_json::Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25}
    })
}

#[tokio::test]
async fn openai_complete_with_tool_calls() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        completion(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}
        ]}), "tool_calls"),
    )])
    .await;
    let gw = Gateway::start(
        &provider_config(
            "openai",
            &format!("{}/v1", upstream.url()),
            "model = \"gpt-test\"",
        ),
        ENV,
    )
    .await;
    let mut req = request::user("Weather?");
    req.system = "sys".into();
    req.max_tokens = Some(64);
    req.tools = vec![request::tool("weather", "w", r#"{"type":"object"}"#)];
    req.tool_choice = Some(v1::ToolChoice {
        mode: v1::tool_choice::Mode::Any as i32,
        name: String::new(),
    });
    let answer = gw
        .client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap();

    assert_eq!(answer.stop_reason(), StopReason::ToolUse);
    assert_eq!(
        answer.response.usage,
        Some(v1::Usage {
            input_tokens: 21,
            output_tokens: 4
        })
    );
    let Some(Block::ToolUse(call)) = &answer.response.content[0].block else {
        panic!("{:?}", answer.response.content)
    };
    assert_eq!(
        (
            call.id.as_str(),
            call.name.as_str(),
            call.input_json.as_str()
        ),
        ("call_1", "weather", "{\"city\":\"Oslo\"}")
    );

    let sent = &upstream.requests()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(sent.body["model"], "gpt-test");
    assert_eq!(sent.body["max_tokens"], 64);
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "system", "content": "sys"}, {"role": "user", "content": "Weather?"}])
    );
    assert_eq!(
        sent.body["tools"][0],
        json!({"type": "function", "function": {"name": "weather", "description": "w", "parameters": {"type": "object"}}})
    );
    assert_eq!(sent.body["tool_choice"], "required");
}

#[tokio::test]
async fn openai_stream_accumulates_tool_calls_by_index_and_reports_usage() {
    let upstream = Upstream::start(vec![Reply::sse(&[
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})),
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [{"index": 0, "delta": {"content": "Let me check."}}]})),
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}]}}]})),
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}}]}}]})),
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}}]})),
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}}]})),
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})),
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 30}})),
        ("", "[DONE]".into()),
    ])])
    .await;
    let gw = Gateway::start(&provider_config("openai", &upstream.url(), ""), ENV).await;
    let (events, status) = gw.stream_all(request::user("Weather and time?")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        events,
        [
            StreamEvent::Start {
                id: "c1".into(),
                provider: "p".into(),
                model: "gpt-test".into(),
                attempt: 1
            },
            StreamEvent::Text {
                index: 0,
                text: "Let me check.".into()
            },
            StreamEvent::ToolUseStart {
                index: 1,
                id: "call_a".into(),
                name: "weather".into()
            },
            StreamEvent::ToolUseStart {
                index: 2,
                id: "call_b".into(),
                name: "time".into()
            },
            StreamEvent::ToolInputJson {
                index: 2,
                json: "{}".into()
            },
            StreamEvent::ToolInputJson {
                index: 1,
                json: "{\"city\":".into()
            },
            StreamEvent::ToolInputJson {
                index: 1,
                json: "\"Oslo\"}".into()
            },
            StreamEvent::Usage(v1::Usage {
                input_tokens: 8,
                output_tokens: 30
            }),
            StreamEvent::Stop(StopReason::ToolUse),
        ]
    );
    let body = &upstream.requests()[0].body;
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn openai_stream_without_finish_reason_is_truncated() {
    let upstream = Upstream::start(vec![Reply::sse(&[
        chunk(json!({"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"content": "Half an ans"}}]})),
        ("", "[DONE]".into()),
    ])])
    .await;
    let gw = Gateway::start(&provider_config("openai", &upstream.url(), ""), ENV).await;
    let (events, status) = gw.stream_all(request::user("Hi")).await;
    let status = status.expect("a truncated stream must not end OK");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("without a stop reason"),
        "{}",
        status.message()
    );
    assert_eq!(
        events[1],
        StreamEvent::Text {
            index: 0,
            text: "Half an ans".into()
        }
    );
}

#[tokio::test]
async fn openai_length_finish_is_max_tokens() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        completion(json!({"role": "assistant", "content": "cut"}), "length"),
    )])
    .await;
    let gw = Gateway::start(&provider_config("openai", &upstream.url(), ""), ENV).await;
    let answer = gw
        .client()
        .await
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(
        (answer.text().as_str(), answer.stop_reason()),
        ("cut", StopReason::MaxTokens)
    );
}

#[tokio::test]
async fn databricks_calls_the_serving_endpoint_with_a_bearer_token() {
    let upstream = Upstream::start(vec![
        Reply::json(200, completion(json!({"role": "assistant", "content": "from dbx"}), "stop")),
        Reply::sse(&[
            chunk(json!({"id": "d1", "model": "dbrx", "choices": [{"index": 0, "delta": {"content": "str"}}]})),
            chunk(json!({"id": "d1", "model": "dbrx", "choices": [{"index": 0, "delta": {"content": "eamed"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})),
            ("", "[DONE]".into()),
        ]),
    ])
    .await;
    let gw = Gateway::start(
        &provider_config("databricks", &upstream.url(), "model = \"my-endpoint\""),
        ENV,
    )
    .await;
    let mut client = gw.client().await;
    let answer = client
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(
        (answer.text().as_str(), answer.stop_reason()),
        ("from dbx", StopReason::EndTurn)
    );

    let mut req = request::user("Stream please");
    req.model = "other-endpoint".into();
    let (events, status) = drain(client.stream(req, &CallOptions::new()).await.unwrap()).await;
    assert!(status.is_none(), "{status:?}");
    let text = crate::support::text_of(&events);
    assert_eq!(text, "streamed");
    assert_eq!(events.last(), Some(&StreamEvent::Stop(StopReason::EndTurn)));
    assert!(events.contains(&StreamEvent::Usage(v1::Usage {
        input_tokens: 3,
        output_tokens: 2
    })));

    let sent = upstream.requests();
    assert_eq!(sent[0].path, "/serving-endpoints/my-endpoint/invocations");
    assert_eq!(
        sent[1].path,
        "/serving-endpoints/other-endpoint/invocations"
    );
    for r in &sent {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
        assert!(
            r.body.get("model").is_none(),
            "databricks takes the endpoint from the path"
        );
    }
}

#[tokio::test]
async fn stream_chunks_arrive_one_by_one_not_buffered() {
    // The second delta is held back 30 s; the first must reach the caller
    // long before that.
    let upstream = Upstream::start(vec![Reply::sse_steps(vec![
        Step::Chunk(crate::support::sse_event("", &json!({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "first"}}]}).to_string())),
        Step::Sleep(std::time::Duration::from_secs(30)),
        Step::Chunk(crate::support::sse_event("", &json!({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": " second"}, "finish_reason": "stop"}]}).to_string())),
    ])])
    .await;
    let gw = Gateway::start(&provider_config("openai", &upstream.url(), ""), ENV).await;
    let mut events = gw
        .client()
        .await
        .stream(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    use futures_util::StreamExt;
    let first_two = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        (events.next().await, events.next().await)
    })
    .await
    .expect("the first delta arrived without waiting for the next");
    assert!(
        matches!(first_two.1, Some(Ok(StreamEvent::Text { ref text, .. })) if text == "first"),
        "{first_two:?}"
    );
}
