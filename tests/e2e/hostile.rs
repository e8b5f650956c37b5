//! Hostile upstreams and hostile callers (issue 11): whatever an upstream
//! sends or a caller asks for, the gateway answers with a clear status, keeps
//! its memory bounded and its credentials to itself.

use provider_gateway_client::{CallOptions, StopReason, StreamEvent, request};
use serde_json::json;
use tonic::Code;

use crate::support::{ENV, Gateway, KEY, Reply, Step, Upstream, provider_config, sse_event};

async fn complete_err(
    gw: &Gateway,
    req: provider_gateway_client::CompleteRequest,
) -> tonic::Status {
    gw.client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .expect_err("the call fails")
        .status()
        .cloned()
        .expect("a gRPC status")
}

/// The status a stream ends with, whether it fails to open or breaks.
async fn stream_status(
    gw: &Gateway,
    req: provider_gateway_client::CompleteRequest,
) -> tonic::Status {
    match gw.client().await.stream(req, &CallOptions::new()).await {
        Err(e) => e.status().cloned().expect("a gRPC status"),
        Ok(events) => crate::anthropic::drain(events)
            .await
            .1
            .expect("the stream fails"),
    }
}

fn rate_limited(header: &str, value: &str) -> Reply {
    Reply::json(
        429,
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}),
    )
    .header(header, value)
}

// === 1. Retry-After ===

#[tokio::test]
async fn an_absurd_retry_after_is_a_clean_resource_exhausted() {
    for (header, value) in [
        ("retry-after", "1e20"),
        ("retry-after-ms", "1e25"),
        ("retry-after", "18446744073709551616"),
        ("retry-after", "inf"),
    ] {
        let upstream = Upstream::start(vec![rate_limited(header, value)]).await;
        let gw = Gateway::start(
            &provider_config("anthropic", &upstream.url(), "[retry]\nmax_attempts = 3"),
            ENV,
        )
        .await;
        let status = complete_err(&gw, request::user("hi")).await;
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{header}: {value}: {status:?}"
        );
        assert!(
            status
                .message()
                .contains("longer than the gateway may wait"),
            "{}",
            status.message()
        );
        assert_eq!(upstream.request_count(), 1, "{header}: {value}");
    }
}

#[tokio::test]
async fn openai_rate_limit_reset_is_read_when_no_retry_after_is_sent() {
    // A reset of ten minutes is longer than max_retry_after_ms (60 s): the
    // gateway gives up at once instead of retrying into the limit.
    let upstream = Upstream::start(vec![
        Reply::json(
            429,
            json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}),
        )
        .header("x-ratelimit-remaining-requests", "0")
        .header("x-ratelimit-reset-requests", "10m0s")
        .header("x-ratelimit-reset-tokens", "20ms"),
    ])
    .await;
    let gw = Gateway::start(
        &provider_config("openai", &upstream.url(), "[retry]\nmax_attempts = 3"),
        ENV,
    )
    .await;
    let status = complete_err(&gw, request::user("hi")).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("600000 ms"),
        "{}",
        status.message()
    );
    assert_eq!(upstream.request_count(), 1);
}

// === 2. Model names ===

#[tokio::test]
async fn a_path_traversing_databricks_model_is_refused_before_anything_goes_upstream() {
    let upstream = Upstream::start(vec![Reply::json(200, json!({"clusters": []}))]).await;
    let gw = Gateway::start(&provider_config("databricks", &upstream.url(), ""), ENV).await;
    for model in [
        "../../api/2.0/clusters/list#",
        "a/b",
        "x?y=1",
        "with space",
        "%2e%2e",
        "endpoint.v1",
    ] {
        let mut req = request::user("hi");
        req.model = model.into();
        let status = complete_err(&gw, req).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{model}: {status:?}");
        assert!(
            status.message().starts_with("model:"),
            "{model}: {}",
            status.message()
        );
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn a_valid_databricks_model_goes_into_its_own_path_segment() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        json!({"id": "1", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}),
    )])
    .await;
    let gw = Gateway::start(&provider_config("databricks", &upstream.url(), ""), ENV).await;
    let mut req = request::user("hi");
    req.model = "my-endpoint_2".into();
    gw.client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(
        upstream.requests()[0].path,
        "/serving-endpoints/my-endpoint_2/invocations"
    );
}

#[tokio::test]
async fn openai_models_may_name_an_organisation() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        json!({"id": "1", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}),
    )])
    .await;
    let gw = Gateway::start(&provider_config("openai", &upstream.url(), ""), ENV).await;
    let mut req = request::user("hi");
    req.model = "meta-llama/Llama-3.1-8B-Instruct".into();
    gw.client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(
        upstream.requests()[0].body["model"],
        "meta-llama/Llama-3.1-8B-Instruct"
    );
    let mut req = request::user("hi");
    req.model = "../x".into();
    assert_eq!(complete_err(&gw, req).await.code(), Code::InvalidArgument);
}

// === 3. Redirects ===

#[tokio::test]
async fn a_redirect_is_not_followed_and_the_key_stays_home() {
    let elsewhere = Upstream::start(vec![Reply::json(200, json!({}))]).await;
    let location = format!("http://localhost:{}/steal?token=abc", elsewhere.addr.port());
    let upstream = Upstream::start(vec![
        Reply::json(307, json!({})).header("location", &location),
    ])
    .await;
    let gw = Gateway::start(
        &provider_config("anthropic", &upstream.url(), "[retry]\nmax_attempts = 3"),
        ENV,
    )
    .await;
    let status = complete_err(&gw, request::user("hi")).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let message = status.message();
    assert!(
        message.contains("307") && message.contains("`localhost`"),
        "{message}"
    );
    assert!(
        !message.contains("steal") && !message.contains("token"),
        "{message}"
    );
    assert_eq!(upstream.request_count(), 1, "not retried");
    assert_eq!(elsewhere.request_count(), 0, "not followed");
}

// === 4. Bounded reads ===

#[tokio::test]
async fn an_sse_line_over_the_limit_fails_the_stream_cleanly() {
    let big = format!(
        "data: {{\"type\":\"ping\",\"pad\":\"{}\"}}\n\n",
        "x".repeat(64 * 1024)
    );
    let upstream = Upstream::start(vec![Reply::sse_steps(vec![
        Step::Chunk(sse_event(
            "message_start",
            &json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}})
                .to_string(),
        )),
        Step::Chunk(big.into_bytes()),
    ])])
    .await;
    let gw = Gateway::start(
        &provider_config(
            "anthropic",
            &upstream.url(),
            "max_event_bytes = 4096\n[providers.p.retry]\nmax_attempts = 1",
        ),
        ENV,
    )
    .await;
    let status = stream_status(&gw, request::user("hi")).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("stream-interrupted")
            && status.message().contains("max_event_bytes"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_body_over_the_limit_fails_the_attempt_cleanly() {
    let text = "y".repeat(64 * 1024);
    let upstream = Upstream::start(vec![Reply::json(
        200,
        json!({"id": "1", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}),
    )])
    .await;
    let gw = Gateway::start(
        &provider_config(
            "openai",
            &upstream.url(),
            "max_body_bytes = 4096\n[providers.p.retry]\nmax_attempts = 1",
        ),
        ENV,
    )
    .await;
    let status = complete_err(&gw, request::user("hi")).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("server-error") && status.message().contains("max_body_bytes"),
        "{}",
        status.message()
    );
}

// === 6. SSE error events are redacted ===

#[tokio::test]
async fn sse_error_events_echoing_the_key_are_redacted() {
    let anthropic = Upstream::start(vec![Reply::sse(&[
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}})
                .to_string(),
        ),
        (
            "error",
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": format!("bad key {KEY}")}})
                .to_string(),
        ),
    ])])
    .await;
    let openai = Upstream::start(vec![Reply::sse(&[(
        "",
        json!({"error": {"message": format!("bad key {KEY}"), "type": "invalid_request_error"}})
            .to_string(),
    )])])
    .await;
    for (kind, upstream) in [("anthropic", &anthropic), ("openai", &openai)] {
        let gw = Gateway::start(
            &provider_config(
                kind,
                &upstream.url(),
                "[providers.p.retry]\nmax_attempts = 1",
            ),
            ENV,
        )
        .await;
        let status = stream_status(&gw, request::user("hi")).await;
        assert!(
            !status.message().contains(KEY) && status.message().contains("[redacted]"),
            "{kind}: {}",
            status.message()
        );
    }
}

// === 10. Classification ===

#[tokio::test]
async fn anthropic_prompt_too_long_is_context_length() {
    let upstream = Upstream::start(vec![Reply::json(
        400,
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 210000 tokens > 200000 maximum"}}),
    )])
    .await;
    let gw = Gateway::start(&provider_config("anthropic", &upstream.url(), ""), ENV).await;
    let status = complete_err(&gw, request::user("hi")).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("context-length"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn openai_content_policy_violation_is_a_final_invalid_request() {
    let upstream = Upstream::start(vec![Reply::json(
        400,
        json!({"error": {"message": "Your request was rejected by the safety system", "type": "invalid_request_error", "code": "content_policy_violation"}}),
    )
    .header("x-should-retry", "true")])
    .await;
    let gw = Gateway::start(&provider_config("openai", &upstream.url(), ""), ENV).await;
    let status = complete_err(&gw, request::user("hi")).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("invalid-request"),
        "{}",
        status.message()
    );
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn refusals_and_content_filters_are_not_end_turn() {
    let anthropic = |stop: &str| {
        Reply::json(
            200,
            json!({"id": "m", "model": "c", "content": [{"type": "text", "text": "x"}], "stop_reason": stop, "usage": {}}),
        )
    };
    let upstream = Upstream::start(vec![anthropic("refusal"), anthropic("pause_turn")]).await;
    let gw = Gateway::start(&provider_config("anthropic", &upstream.url(), ""), ENV).await;
    for expected in [StopReason::Refusal, StopReason::MaxTokens] {
        let answer = gw
            .client()
            .await
            .complete(request::user("hi"), &CallOptions::new())
            .await
            .unwrap();
        assert_eq!(answer.stop_reason(), expected);
    }

    let upstream = Upstream::start(vec![
        Reply::json(
            200,
            json!({"id": "1", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "content_filter"}]}),
        ),
        Reply::sse(&[
            (
                "",
                json!({"id": "1", "model": "m", "choices": [{"index": 0, "delta": {"content": "x"}}]})
                    .to_string(),
            ),
            (
                "",
                json!({"id": "1", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]})
                    .to_string(),
            ),
            ("", "[DONE]".to_string()),
        ]),
    ])
    .await;
    let gw = Gateway::start(&provider_config("openai", &upstream.url(), ""), ENV).await;
    let answer = gw
        .client()
        .await
        .complete(request::user("hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.stop_reason(), StopReason::ContentFilter);
    let (events, status) = gw.stream_all(request::user("hi")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        events.last(),
        Some(&StreamEvent::Stop(StopReason::ContentFilter))
    );
}
