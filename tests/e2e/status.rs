//! Every status-code row of the contract that one attempt can produce, with
//! the message a caller sees (provider, attempts, upstream error, no secret).

use std::time::Duration;

use provider_gateway_client::{CallOptions, request};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{ENV, Gateway, KEY, Reply, Upstream, provider_config};

fn anthropic_error(kind: &str, message: &str) -> serde_json::Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// The contract's rows for one attempt; retries have their own suite.
const SINGLE_ATTEMPT: &str = "[providers.p.retry]\nmax_attempts = 1";

/// Sends one Complete through an anthropic provider whose upstream answers
/// `reply`; returns the status.
async fn status_for(reply: Reply) -> tonic::Status {
    let upstream = Upstream::start(vec![reply]).await;
    let gw = Gateway::start(
        &provider_config("anthropic", &upstream.url(), SINGLE_ATTEMPT),
        ENV,
    )
    .await;
    let err = gw
        .client()
        .await
        .complete(request::user("hi"), &CallOptions::new())
        .await
        .unwrap_err();
    let status = err.status().expect("a gRPC status").clone();
    assert_eq!(upstream.request_count(), 1, "one attempt");
    assert!(
        !status.message().contains(KEY),
        "secret leaked: {}",
        status.message()
    );
    assert!(
        status.message().contains("provider `p`"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("1 attempt"),
        "{}",
        status.message()
    );
    status
}

#[tokio::test]
async fn upstream_rejections_map_to_the_contract() {
    let cases = [
        (400, "invalid_request_error", Code::InvalidArgument),
        (401, "authentication_error", Code::FailedPrecondition),
        (403, "permission_error", Code::FailedPrecondition),
        (404, "not_found_error", Code::FailedPrecondition),
        (413, "request_too_large", Code::InvalidArgument),
        (422, "invalid_request_error", Code::InvalidArgument),
        (500, "api_error", Code::Unavailable),
        (503, "api_error", Code::Unavailable),
        (529, "overloaded_error", Code::Unavailable),
    ];
    for (http, kind, code) in cases {
        let status = status_for(Reply::json(http, anthropic_error(kind, "upstream says no"))).await;
        assert_eq!(status.code(), code, "HTTP {http}: {status:?}");
        assert!(
            status.message().contains(&format!("HTTP {http}")),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("upstream says no"),
            "{}",
            status.message()
        );
        let attempts = status
            .metadata()
            .get("x-gateway-attempts")
            .and_then(|v| v.to_str().ok());
        assert_eq!(attempts, Some("1"));
    }
}

#[tokio::test]
async fn rate_limit_is_resource_exhausted_with_retry_info() {
    let status = status_for(
        Reply::json(429, anthropic_error("rate_limit_error", "slow down"))
            .header("retry-after", "7"),
    )
    .await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    let delay = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay);
    assert_eq!(delay, Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn error_body_that_is_not_json_still_classifies_by_status() {
    let mut reply = Reply::json(502, json!(null));
    reply.body = b"<html>Bad Gateway</html>".to_vec();
    let status = status_for(reply).await;
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("server-error"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = Gateway::start(
        &provider_config(
            "openai",
            &format!("http://127.0.0.1:{port}"),
            SINGLE_ATTEMPT,
        ),
        ENV,
    )
    .await;
    let err = gw
        .client()
        .await
        .complete(request::user("hi"), &CallOptions::new())
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("connection"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains(KEY));
}

#[tokio::test]
async fn caller_deadline_is_deadline_exceeded() {
    let upstream = Upstream::start(vec![
        Reply::json(200, json!({})).delay(Duration::from_secs(5)),
    ])
    .await;
    let gw = Gateway::start(&provider_config("anthropic", &upstream.url(), ""), ENV).await;
    let started = std::time::Instant::now();
    let err = gw
        .client()
        .await
        .complete(
            request::user("hi"),
            &CallOptions::new().deadline(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("provider `p`"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the gateway did not wait for the upstream"
    );
}

#[tokio::test]
async fn per_try_timeout_is_unavailable_with_class_timeout() {
    let upstream = Upstream::start(vec![
        Reply::json(200, json!({})).delay(Duration::from_secs(5)),
    ])
    .await;
    let gw = Gateway::start(
        &provider_config(
            "anthropic",
            &upstream.url(),
            "[providers.p.retry]\nper_try_timeout_ms = 200\nmax_attempts = 1",
        ),
        ENV,
    )
    .await;
    let err = gw
        .client()
        .await
        .complete(request::user("hi"), &CallOptions::new())
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("timeout") && status.message().contains("200 ms"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn unknown_provider_is_not_found() {
    let gw = Gateway::start("", &[]).await;
    let mut req = request::user("hi");
    req.provider = "nope".into();
    let err = gw
        .client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("nope"));
}

#[tokio::test]
async fn an_upstream_echoing_the_key_never_leaks_it() {
    let status = status_for(Reply::json(
        401,
        anthropic_error("authentication_error", &format!("invalid x-api-key: {KEY}")),
    ))
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("invalid x-api-key: [redacted]"),
        "{}",
        status.message()
    );
}
