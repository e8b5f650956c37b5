//! The built-in mock provider: zero-config answers and scripted faults.

use provider_gateway_client::{CallOptions, StopReason, StreamEvent, request, v1};
use tonic::Code;

use crate::anthropic::drain;
use crate::support::Gateway;

#[tokio::test]
async fn mock_echoes_and_lists_itself() {
    let gw = Gateway::start("", &[]).await;
    let mut client = gw.client().await;
    let answer = client
        .complete(request::user("echo these words"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.text(), "echo these words");
    assert_eq!(answer.stop_reason(), StopReason::EndTurn);
    assert_eq!(
        answer.response.usage,
        Some(v1::Usage {
            input_tokens: 3,
            output_tokens: 3
        })
    );
    assert_eq!(answer.provider, "mock");

    let (events, status) = drain(
        client
            .stream(request::user("a b c"), &CallOptions::new())
            .await
            .unwrap(),
    )
    .await;
    assert!(status.is_none());
    let texts: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::Text { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(texts, ["a", " b", " c"]);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Stop(_)))
            .count(),
        1
    );

    let list = client.providers().await.unwrap();
    assert_eq!(list.default_provider, "mock");
    assert_eq!(
        list.providers,
        [v1::ProviderInfo {
            name: "mock".into(),
            kind: "mock".into(),
            default_model: "mock-1".into(),
            local_model: None,
            members: vec![],
        }]
    );
}

#[tokio::test]
async fn mock_words_reply_honours_max_tokens() {
    let gw = Gateway::start(
        "[providers.w]\nkind = \"mock\"\nreply = \"words\"\nwords = 10\n",
        &[],
    )
    .await;
    let mut req = request::user("anything");
    req.max_tokens = Some(4);
    let answer = gw
        .client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.text(), "lorem ipsum dolor sit");
    assert_eq!(answer.stop_reason(), StopReason::MaxTokens);
}

#[tokio::test]
async fn mock_scripted_failures_then_success() {
    let gw = Gateway::start(
        "[providers.flaky]\nkind = \"mock\"\nfail_first = 1\nfail_class = \"rate-limited\"\nfail_retry_after_ms = 1500\n[providers.flaky.retry]\nmax_attempts = 1\n",
        &[],
    )
    .await;
    let mut client = gw.client().await;
    let err = client
        .complete(request::user("hi"), &CallOptions::new())
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("scripted mock failure 1 of 1"),
        "{}",
        status.message()
    );
    use tonic_types::StatusExt;
    let delay = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay);
    assert_eq!(delay, Some(std::time::Duration::from_millis(1500)));
    // The second call is past the scripted failures.
    assert_eq!(
        client
            .complete(request::user("hi"), &CallOptions::new())
            .await
            .unwrap()
            .text(),
        "hi"
    );
}

#[tokio::test]
async fn mock_stream_break_is_unavailable_after_the_delivered_chunks() {
    let gw = Gateway::start(
        "[providers.b]\nkind = \"mock\"\nbreak_stream_after = 2\n",
        &[],
    )
    .await;
    let (events, status) = gw.stream_all(request::user("one two three four")).await;
    let status = status.expect("a broken stream never ends OK");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("2 content delta"),
        "{}",
        status.message()
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Text { .. }))
            .count(),
        2
    );
}

#[tokio::test]
async fn mock_calls_a_tool_when_asked() {
    let gw = Gateway::start("", &[]).await;
    let mut req = request::user("look this up");
    req.tools = vec![request::tool("search", "", r#"{"type":"object"}"#)];
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
    let Some(v1::content_block::Block::ToolUse(call)) = &answer.response.content[0].block else {
        panic!()
    };
    assert_eq!(call.name, "search");
    assert_eq!(call.input_json, r#"{"text":"look this up"}"#);
}

#[tokio::test]
async fn stream_reports_attempts_and_provider_in_headers_and_trailers() {
    let gw = Gateway::start("", &[]).await;
    let mut raw = provider_gateway_client::RawClient::connect(gw.url())
        .await
        .unwrap();
    let response = raw
        .stream(request::to_stream(request::user("x y")))
        .await
        .unwrap();
    assert_eq!(response.metadata().get("x-gateway-attempts").unwrap(), "1");
    assert_eq!(
        response.metadata().get("x-gateway-provider").unwrap(),
        "mock"
    );
    let mut body = response.into_inner();
    let mut stops = 0;
    while let Some(event) = body.message().await.expect("the stream ends OK") {
        if matches!(event.event, Some(v1::stream_response::Event::Stop(_))) {
            stops += 1;
        }
    }
    assert_eq!(stops, 1);
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("x-gateway-attempts").unwrap(), "1");
    assert_eq!(trailers.get("x-gateway-provider").unwrap(), "mock");
}
