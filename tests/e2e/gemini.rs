//! The gemini provider (Google's Gemini API) through the gateway, against a
//! scripted upstream speaking `generateContent`, `streamGenerateContent`
//! SSE and `google.rpc.Status` errors.

use std::time::Duration;

use provider_gateway_client::v1::content_block::Block;
use provider_gateway_client::{CallOptions, StopReason, StreamEvent, request, v1};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{ENV, Gateway, KEY, Reply, ScriptedClock, Step, Upstream, provider_config};

fn data(v: serde_json::Value) -> (&'static str, String) {
    ("", v.to_string())
}

fn config(upstream: &Upstream, extra: &str) -> String {
    provider_config(
        "gemini",
        &upstream.url(),
        &format!("model = \"gemini-test\"\n{extra}"),
    )
}

pub fn google_error(code: u16, status: &str, message: &str, details: serde_json::Value) -> Reply {
    Reply::json(
        code,
        json!({"error": {"code": code, "message": message, "status": status, "details": details}}),
    )
}

#[tokio::test]
async fn gemini_complete_maps_system_tools_generation_config_and_function_calls() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        json!({
            "candidates": [{
                "content": {"role": "model", "parts": [
                    {"text": "thinking...", "thought": true},
                    {"text": "Let me look."},
                    {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}
                ]},
                "finishReason": "STOP", "index": 0
            }],
            "usageMetadata": {"promptTokenCount": 31, "candidatesTokenCount": 7, "thoughtsTokenCount": 5, "totalTokenCount": 43},
            "modelVersion": "gemini-test-001", "responseId": "resp-1"
        }),
    )])
    .await;
    let gw = Gateway::start(&config(&upstream, ""), ENV).await;
    let mut req = request::user("Weather in Oslo?");
    req.system = "Be terse.".into();
    req.max_tokens = Some(128);
    req.temperature = Some(0.5);
    req.top_p = Some(0.9);
    req.stop_sequences = vec!["END".into()];
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
    assert_eq!(answer.response.id, "resp-1");
    assert_eq!(answer.response.model, "gemini-test-001");
    assert_eq!(
        answer.response.usage,
        Some(v1::Usage {
            input_tokens: 31,
            output_tokens: 12
        })
    );
    assert_eq!(
        answer.text(),
        "Let me look.",
        "thought parts are not the answer"
    );
    let Some(Block::ToolUse(call)) = &answer.response.content[1].block else {
        panic!("{:?}", answer.response.content)
    };
    assert_eq!(
        (call.name.as_str(), call.input_json.as_str()),
        ("weather", r#"{"city":"Oslo"}"#)
    );
    assert!(!call.id.is_empty());

    let sent = &upstream.requests()[0];
    assert_eq!(sent.path, "/v1beta/models/gemini-test:generateContent");
    assert_eq!(sent.header("x-goog-api-key"), Some(KEY));
    assert_eq!(sent.header("authorization"), None);
    assert_eq!(
        sent.body["contents"],
        json!([{"role": "user", "parts": [{"text": "Weather in Oslo?"}]}])
    );
    assert_eq!(
        sent.body["systemInstruction"],
        json!({"parts": [{"text": "Be terse."}]})
    );
    assert_eq!(
        sent.body["tools"],
        json!([{"functionDeclarations": [{"name": "weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]}])
    );
    assert_eq!(
        sent.body["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}})
    );
    assert_eq!(
        sent.body["generationConfig"],
        json!({"maxOutputTokens": 128, "temperature": 0.5, "topP": 0.9f32, "stopSequences": ["END"]})
    );
}

#[tokio::test]
async fn gemini_tool_results_go_back_as_function_responses_with_the_model_role() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Sunny."}]}, "finishReason": "STOP"}]}),
    )])
    .await;
    let gw = Gateway::start(&config(&upstream, ""), ENV).await;
    let mut req = request::user("Weather?");
    req.tools = vec![request::tool("weather", "w", r#"{"type":"object"}"#)];
    req.messages.push(v1::Message {
        role: v1::Role::Assistant as i32,
        content: vec![v1::ContentBlock {
            block: Some(Block::ToolUse(v1::ToolUse {
                id: "call_7".into(),
                name: "weather".into(),
                input_json: r#"{"city":"Oslo"}"#.into(),
            })),
        }],
    });
    req.messages.push(v1::Message {
        role: v1::Role::User as i32,
        content: vec![v1::ContentBlock {
            block: Some(Block::ToolResult(v1::ToolResult {
                tool_use_id: "call_7".into(),
                content: r#"{"sky":"clear"}"#.into(),
                is_error: false,
            })),
        }],
    });
    let answer = gw
        .client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(
        (answer.text().as_str(), answer.stop_reason()),
        ("Sunny.", StopReason::EndTurn)
    );
    let sent = &upstream.requests()[0];
    assert_eq!(
        sent.body["contents"][1],
        json!({"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}]})
    );
    assert_eq!(
        sent.body["contents"][2],
        json!({"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"sky": "clear"}}}]})
    );
}

#[tokio::test]
async fn gemini_stream_relays_text_and_calls_and_ends_with_usage_and_stop() {
    let upstream = Upstream::start(vec![Reply::sse(&[
        data(json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Hello"}]}, "index": 0}],
            "usageMetadata": {"promptTokenCount": 4}, "modelVersion": "gemini-test-001", "responseId": "r-s"})),
        data(json!({"candidates": [{"content": {"role": "model", "parts": [{"text": ", world"}]}, "index": 0}],
            "modelVersion": "gemini-test-001", "responseId": "r-s"})),
        data(json!({"candidates": [{"content": {"role": "model", "parts": [{"functionCall": {"name": "save", "args": {"x": 1}}}]},
            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 6, "totalTokenCount": 10},
            "modelVersion": "gemini-test-001", "responseId": "r-s"})),
    ])])
    .await;
    let gw = Gateway::start(&config(&upstream, ""), ENV).await;
    let (events, status) = gw.stream_all(request::user("Hi")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        events,
        [
            StreamEvent::Start {
                id: "r-s".into(),
                provider: "p".into(),
                model: "gemini-test-001".into(),
                attempt: 1
            },
            StreamEvent::Text {
                index: 0,
                text: "Hello".into()
            },
            StreamEvent::Text {
                index: 0,
                text: ", world".into()
            },
            StreamEvent::ToolUseStart {
                index: 1,
                id: "call_1".into(),
                name: "save".into()
            },
            StreamEvent::ToolInputJson {
                index: 1,
                json: r#"{"x":1}"#.into()
            },
            StreamEvent::Usage(v1::Usage {
                input_tokens: 4,
                output_tokens: 6
            }),
            StreamEvent::Stop(StopReason::ToolUse),
        ]
    );
    let sent = &upstream.requests()[0];
    assert_eq!(
        sent.path,
        "/v1beta/models/gemini-test:streamGenerateContent?alt=sse"
    );
    assert_eq!(sent.header("x-goog-api-key"), Some(KEY));
}

#[tokio::test]
async fn gemini_safety_and_blocked_prompts_are_content_filter() {
    let upstream = Upstream::start(vec![
        Reply::sse(&[
            data(json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Once"}]}}], "responseId": "a"})),
            data(json!({"candidates": [{"content": {"role": "model", "parts": []}, "finishReason": "SAFETY",
                "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": true}]}]})),
        ]),
        Reply::json(
            200,
            json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                "usageMetadata": {"promptTokenCount": 9}, "responseId": "b"}),
        ),
        Reply::json(
            200,
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Recited"}]}, "finishReason": "RECITATION"}]}),
        ),
        Reply::json(
            200,
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "cut"}]}, "finishReason": "MAX_TOKENS"}]}),
        ),
    ])
    .await;
    let gw = Gateway::start(&config(&upstream, ""), ENV).await;
    let (events, status) = gw.stream_all(request::user("Hi")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        events.last(),
        Some(&StreamEvent::Stop(StopReason::ContentFilter))
    );
    let mut client = gw.client().await;
    for (expected, text) in [
        (StopReason::ContentFilter, ""),
        (StopReason::ContentFilter, "Recited"),
        (StopReason::MaxTokens, "cut"),
    ] {
        let answer = client
            .complete(request::user("Hi"), &CallOptions::new())
            .await
            .unwrap();
        assert_eq!(
            (answer.stop_reason(), answer.text().as_str()),
            (expected, text)
        );
    }
}

#[tokio::test]
async fn gemini_resource_exhausted_waits_its_retry_info_and_invalid_argument_is_final() {
    let upstream = Upstream::start(vec![
        google_error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota.",
            json!([
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generate_content_free_tier_requests"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"}
            ]),
        ),
        Reply::json(
            200,
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]}, "finishReason": "STOP"}]}),
        ),
        google_error(
            400,
            "INVALID_ARGUMENT",
            &format!("Invalid JSON payload received (key {KEY})."),
            json!([]),
        ),
        google_error(
            400,
            "INVALID_ARGUMENT",
            "The input token count (1500000) exceeds the maximum number of tokens allowed (1048576).",
            json!([]),
        ),
        google_error(403, "PERMISSION_DENIED", "Permission denied on resource project x.", json!([])),
    ])
    .await;
    let clock = ScriptedClock::new();
    let gw = Gateway::start_scripted(
        &config(&upstream, "[providers.p.retry]\nmax_attempts = 3"),
        ENV,
        clock.clone(),
    )
    .await;
    let mut client = gw.client().await;
    let answer = client
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!((answer.text().as_str(), answer.attempts), ("ok", 2));
    let waited = clock.sleeps();
    assert_eq!(waited.len(), 1, "{waited:?}");
    assert!(
        waited[0] >= Duration::from_secs(3),
        "RetryInfo is the least wait: {waited:?}"
    );

    for (code, says) in [
        (Code::InvalidArgument, "invalid-request"),
        (Code::InvalidArgument, "context-length"),
        (Code::FailedPrecondition, "auth"),
    ] {
        let err = client
            .complete(request::user("Hi"), &CallOptions::new())
            .await
            .unwrap_err();
        let status = err.status().unwrap();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(says), "{}", status.message());
        assert!(!status.message().contains(KEY), "{}", status.message());
    }
    assert_eq!(upstream.request_count(), 5, "final errors are not retried");
}

#[tokio::test]
async fn gemini_rate_limit_longer_than_allowed_is_resource_exhausted_with_its_retry_info() {
    let upstream = Upstream::start(vec![google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for metric generate_content_free_tier_requests, limit: 0",
        json!([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "90s"}]),
    )])
    .await;
    let gw = Gateway::start(
        &config(&upstream, "[providers.p.retry]\nmax_retry_after_ms = 60000"),
        ENV,
    )
    .await;
    let err = gw
        .client()
        .await
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status
            .get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay),
        Some(Duration::from_secs(90))
    );
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn gemini_error_event_after_content_ends_the_stream_unavailable() {
    let upstream = Upstream::start(vec![Reply::sse_steps(vec![
        Step::Chunk(crate::support::sse_event(
            "",
            &json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "partial"}]}}], "responseId": "x"}).to_string(),
        )),
        Step::Chunk(crate::support::sse_event(
            "",
            &json!({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}).to_string(),
        )),
    ])])
    .await;
    let gw = Gateway::start(&config(&upstream, ""), ENV).await;
    let (events, status) = gw.stream_all(request::user("Hi")).await;
    let status = status.expect("never OK");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("overloaded"),
        "{}",
        status.message()
    );
    assert!(events.contains(&StreamEvent::Text {
        index: 0,
        text: "partial".into()
    }));
}

#[tokio::test]
async fn an_anthropic_primary_falls_back_to_gemini_for_a_stream_with_the_hops_model() {
    let anthropic = Upstream::start(vec![Reply::json(
        529,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )])
    .await;
    let gemini = Upstream::start(vec![Reply::sse(&[data(json!({
        "candidates": [{"content": {"role": "model", "parts": [{"text": "from gemini"}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 2}, "responseId": "g1"}))])])
    .await;
    let toml = format!(
        "default_provider = \"a\"\n\
         [providers.a]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"A_KEY\"\n\
         fallback = [{{ provider = \"g\", model = \"gemini-2.5-pro\" }}]\n\
         [providers.a.retry]\nmax_attempts = 1\n\
         [providers.g]\nkind = \"gemini\"\nbase_url = \"{}\"\napi_key_env = \"G_KEY\"\n",
        anthropic.url(),
        gemini.url()
    );
    let gw = Gateway::start(&toml, &[("A_KEY", "sk-ant-test-key-123"), ("G_KEY", KEY)]).await;
    let (events, status) = gw.stream_all(request::user("Hi")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(crate::support::text_of(&events), "from gemini");
    assert!(
        matches!(&events[0], StreamEvent::Start { provider, attempt: 2, .. } if provider == "g"),
        "{events:?}"
    );
    assert_eq!(
        gemini.requests()[0].path,
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
    );
}
