//! The retry engine against the scripted upstream: exact attempt counts per
//! class, Retry-After, overrides, deadlines, budgets and streams. Backoffs
//! go through a scripted clock: every wait is recorded exactly and none is
//! slept on the wall clock.

use std::time::Duration;

use futures_util::StreamExt;
use provider_gateway_client::{CallOptions, RetryOverrides, StopReason, StreamEvent, request};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::anthropic::text_stream;
use crate::support::{
    ENV, Gateway, Reply, ScriptedClock, Step, Upstream, provider_config, sse_event,
};

fn ok_message(text: &str) -> Reply {
    Reply::json(
        200,
        json!({
            "id": "msg", "model": "m", "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}
        }),
    )
}

fn error(status: u16, kind: &str) -> Reply {
    Reply::json(
        status,
        json!({"type": "error", "error": {"type": kind, "message": format!("scripted {status}")}}),
    )
}

/// A gateway over an anthropic provider `p` at `upstream`, with a scripted
/// clock. `retry` is the body of `[providers.p.retry]`.
async fn gateway(upstream: &Upstream, retry: &str) -> (Gateway, std::sync::Arc<ScriptedClock>) {
    let clock = ScriptedClock::new();
    let toml = provider_config(
        "anthropic",
        &upstream.url(),
        &format!("[providers.p.retry]\n{retry}\n[retry.limits]\nmax_attempts = 4\n"),
    );
    (
        Gateway::start_scripted(&toml, ENV, clock.clone()).await,
        clock,
    )
}

async fn complete(
    gw: &Gateway,
    options: &CallOptions,
) -> Result<provider_gateway_client::Answer, tonic::Status> {
    gw.client()
        .await
        .complete(request::user("hi"), options)
        .await
        .map_err(|e| e.status().expect("a status").clone())
}

fn attempts_of(status: &tonic::Status) -> u32 {
    status
        .metadata()
        .get("x-gateway-attempts")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("x-gateway-attempts")
}

#[tokio::test]
async fn a_503_then_200_takes_two_attempts_and_one_jittered_wait() {
    let upstream = Upstream::start(vec![error(503, "api_error"), ok_message("recovered")]).await;
    let (gw, clock) = gateway(&upstream, "initial_backoff_ms = 500\nmax_backoff_ms = 8000").await;
    let answer = complete(&gw, &CallOptions::new()).await.unwrap();
    assert_eq!(answer.text(), "recovered");
    assert_eq!((answer.attempts, answer.response.attempts), (2, 2));
    assert_eq!(upstream.request_count(), 2);
    let sleeps = clock.sleeps();
    assert_eq!(sleeps.len(), 1);
    assert!(
        sleeps[0] <= Duration::from_millis(500),
        "first wait within [0, 500 ms]: {sleeps:?}"
    );
}

#[tokio::test]
async fn retry_after_is_honoured_as_the_least_wait() {
    let upstream = Upstream::start(vec![
        error(429, "rate_limit_error").header("retry-after", "2"),
        ok_message("after the wait"),
    ])
    .await;
    let (gw, clock) = gateway(&upstream, "initial_backoff_ms = 100\nmax_backoff_ms = 100").await;
    let answer = complete(&gw, &CallOptions::new()).await.unwrap();
    assert_eq!(answer.attempts, 2);
    assert_eq!(
        clock.sleeps(),
        [Duration::from_secs(2)],
        "the second attempt came no earlier than 2 s later"
    );
}

#[tokio::test]
async fn final_classes_are_never_retried() {
    for (status, kind, code) in [
        (401, "authentication_error", Code::FailedPrecondition),
        (403, "permission_error", Code::FailedPrecondition),
        (400, "invalid_request_error", Code::InvalidArgument),
        (404, "not_found_error", Code::FailedPrecondition),
        (413, "request_too_large", Code::InvalidArgument),
    ] {
        let upstream = Upstream::start(vec![error(status, kind), ok_message("never")]).await;
        let (gw, clock) = gateway(&upstream, "max_attempts = 4").await;
        // Even a request asking for every class cannot make these retry.
        let options = CallOptions::new().retry(RetryOverrides {
            max_attempts: Some(4),
            ..Default::default()
        });
        let err = complete(&gw, &options).await.unwrap_err();
        assert_eq!(err.code(), code, "HTTP {status}");
        assert_eq!(upstream.request_count(), 1, "HTTP {status} was retried");
        assert_eq!(attempts_of(&err), 1);
        assert!(clock.sleeps().is_empty());
    }
}

#[tokio::test]
async fn x_should_retry_false_stops_a_503() {
    let upstream = Upstream::start(vec![
        error(503, "api_error").header("x-should-retry", "false"),
        ok_message("never"),
    ])
    .await;
    let (gw, _) = gateway(&upstream, "max_attempts = 4").await;
    let err = complete(&gw, &CallOptions::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn x_should_retry_true_retries_a_class_the_policy_skips() {
    let upstream = Upstream::start(vec![
        error(500, "api_error").header("x-should-retry", "true"),
        ok_message("ok"),
    ])
    .await;
    let (gw, _) = gateway(&upstream, "retry_on = [\"rate-limited\"]").await;
    assert_eq!(
        complete(&gw, &CallOptions::new()).await.unwrap().attempts,
        2
    );
}

#[tokio::test]
async fn overloaded_529s_spend_every_attempt_with_growing_waits() {
    let upstream = Upstream::start(vec![error(529, "overloaded_error"); 4]).await;
    let (gw, clock) = gateway(&upstream, "max_attempts = 4\ninitial_backoff_ms = 100\nmax_backoff_ms = 250\nbackoff_multiplier = 2.0").await;
    let err = complete(&gw, &CallOptions::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(upstream.request_count(), 4);
    assert_eq!(attempts_of(&err), 4);
    assert!(
        err.message().contains("4 attempt(s)") && err.message().contains("overloaded"),
        "{}",
        err.message()
    );
    let sleeps = clock.sleeps();
    assert_eq!(sleeps.len(), 3);
    for (wait, cap) in sleeps.iter().zip([100, 200, 250]) {
        assert!(
            *wait <= Duration::from_millis(cap),
            "{sleeps:?} over the windows 100, 200, 250 ms"
        );
    }
}

#[tokio::test]
async fn connection_refused_is_retried() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let clock = ScriptedClock::new();
    let toml = provider_config(
        "openai",
        &format!("http://127.0.0.1:{port}"),
        "[providers.p.retry]\nmax_attempts = 3",
    );
    let gw = Gateway::start_scripted(&toml, ENV, clock.clone()).await;
    let err = complete(&gw, &CallOptions::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(attempts_of(&err), 3);
    assert!(err.message().contains("connection"), "{}", err.message());
    assert_eq!(clock.sleeps().len(), 2);
}

/// The 1 s per-try timeout bounds the retry too, which may be stalled that
/// long and still answer in time.
#[tokio::test]
async fn a_per_try_timeout_is_retried() {
    let upstream = Upstream::start(vec![
        ok_message("too late").delay(Duration::from_secs(30)),
        ok_message("in time"),
    ])
    .await;
    let (gw, _) = gateway(&upstream, "per_try_timeout_ms = 1000").await;
    let answer = complete(&gw, &CallOptions::new()).await.unwrap();
    assert_eq!((answer.text().as_str(), answer.attempts), ("in time", 2));
}

#[tokio::test]
async fn overrides_are_honoured_clamped_and_reported() {
    let upstream = Upstream::start(vec![error(503, "api_error"); 10]).await;
    let (gw, _) = gateway(&upstream, "max_attempts = 3").await;
    let two = CallOptions::new().retry(RetryOverrides {
        max_attempts: Some(2),
        ..Default::default()
    });
    assert_eq!(attempts_of(&complete(&gw, &two).await.unwrap_err()), 2);
    // [retry.limits] max_attempts = 4: asking for 9 gets 4.
    let nine = CallOptions::new().retry(RetryOverrides {
        max_attempts: Some(9),
        ..Default::default()
    });
    assert_eq!(attempts_of(&complete(&gw, &nine).await.unwrap_err()), 4);
    let none = CallOptions::new().retry(RetryOverrides {
        retry_on: Some(vec![]),
        ..Default::default()
    });
    assert_eq!(attempts_of(&complete(&gw, &none).await.unwrap_err()), 1);
    assert_eq!(upstream.request_count(), 2 + 4 + 1);
}

#[tokio::test]
async fn malformed_overrides_are_rejected_before_any_upstream_call() {
    let upstream = Upstream::start(vec![]).await;
    let (gw, _) = gateway(&upstream, "").await;
    let mut raw = provider_gateway_client::RawClient::connect(gw.url())
        .await
        .unwrap();
    for (key, value) in [
        ("x-retry-max-attempts", "0"),
        ("x-retry-max-attempts", "lots"),
        ("x-retry-backoff-multiplier", "0.1"),
        ("x-retry-on", "overloaded,teapot"),
        ("x-retry-on", "auth"),
        ("x-retry-per-try-timeout-ms", "-5"),
        ("x-retry-jitter", "full"),
    ] {
        let mut req = tonic::Request::new(request::user("hi"));
        req.metadata_mut().insert(key, value.parse().unwrap());
        let status = raw.complete(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{key}: {value}");
        assert!(
            status.message().contains(key),
            "`{}` does not name {key}",
            status.message()
        );
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn a_retry_after_beyond_the_deadline_answers_at_once_with_retry_info() {
    let upstream = Upstream::start(vec![
        error(429, "rate_limit_error").header("retry-after", "5"),
        ok_message("never"),
    ])
    .await;
    let (gw, clock) = gateway(&upstream, "").await;
    let err = complete(&gw, &CallOptions::new().deadline(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay),
        Some(Duration::from_secs(5))
    );
    assert_eq!(upstream.request_count(), 1);
    assert!(clock.sleeps().is_empty(), "no wait was started");
}

#[tokio::test]
async fn a_retry_after_beyond_max_retry_after_answers_at_once() {
    let upstream = Upstream::start(vec![
        error(529, "overloaded_error").header("retry-after-ms", "90000"),
    ])
    .await;
    let (gw, _) = gateway(&upstream, "max_retry_after_ms = 60000").await;
    let err = complete(&gw, &CallOptions::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay),
        Some(Duration::from_secs(90))
    );
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn a_deadline_shorter_than_the_backoff_answers_the_upstream_failure_without_a_useless_attempt()
 {
    let upstream = Upstream::start(vec![error(503, "api_error"), ok_message("never")]).await;
    // Backoff ceiling 60 s and a 1 s deadline: with the fixed seed the jittered
    // wait is far beyond the deadline, so no second attempt may start.
    let (gw, clock) = gateway(
        &upstream,
        "initial_backoff_ms = 60000\nmax_backoff_ms = 60000",
    )
    .await;
    let err = complete(&gw, &CallOptions::new().deadline(Duration::from_secs(1)))
        .await
        .unwrap_err();
    // Time remains, so the answer is the upstream's own failure, with the
    // wait that did not fit as its retry hint, not a deadline status.
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("1 attempt(s)") && err.message().contains("HTTP 503"),
        "{}",
        err.message()
    );
    assert!(
        err.get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay)
            .is_some_and(|d| d > Duration::from_secs(1)),
        "{err:?}"
    );
    assert_eq!(upstream.request_count(), 1);
    assert!(clock.sleeps().is_empty());
}

#[tokio::test]
async fn the_caller_retrying_itself_gets_a_single_attempt() {
    let upstream = Upstream::start(vec![error(503, "api_error"); 3]).await;
    let (gw, _) = gateway(&upstream, "max_attempts = 3").await;
    let mut raw = provider_gateway_client::RawClient::connect(gw.url())
        .await
        .unwrap();
    let mut req = tonic::Request::new(request::user("hi"));
    req.metadata_mut()
        .insert("grpc-previous-rpc-attempts", "1".parse().unwrap());
    let status = raw.complete(req).await.unwrap_err();
    assert_eq!(attempts_of(&status), 1);
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn an_outage_costs_at_most_the_budget() {
    // 200 concurrent requests against a provider that always fails, each
    // allowed 5 attempts: the budget (20 % of requests + 1/s over 10 s)
    // caps the attempts near 200 * 1.2 + 10, not 200 * 5.
    let clock = ScriptedClock::frozen();
    let toml = "[providers.down]\nkind = \"mock\"\nfail_first = 1000000\nfail_class = \"overloaded\"\n\
                [providers.down.retry]\nmax_attempts = 5\nbudget_ratio = 0.2\nbudget_min_per_second = 1\nbudget_window_ms = 10000\n";
    let gw = Gateway::start_scripted(toml, &[], clock).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let mut client = gw.client().await;
        tasks.push(tokio::spawn(async move {
            client
                .complete(request::user("hi"), &CallOptions::new())
                .await
                .map(|_| ())
                .map_err(|e| e.status().unwrap().clone())
        }));
    }
    let mut attempts = 0;
    let mut refused = 0;
    for task in tasks {
        let status = task.await.unwrap().expect_err("the provider is down");
        assert_eq!(status.code(), Code::Unavailable);
        attempts += attempts_of(&status);
        refused += usize::from(status.message().contains("retry budget is spent"));
    }
    eprintln!(
        "outage: 200 requests x max 5 attempts -> {attempts} upstream attempts, {refused} budget refusals"
    );
    assert!(attempts <= 200 + 40 + 10, "{attempts} attempts");
    assert!(
        attempts >= 200 + 40,
        "the budget's share was not used: {attempts}"
    );
    assert!(refused > 0);
}

#[tokio::test]
async fn an_error_event_before_content_is_retried_into_one_clean_stream() {
    let ev = |name: &str, v: serde_json::Value| Step::Chunk(sse_event(name, &v.to_string()));
    let upstream = Upstream::start(vec![
        Reply::sse_steps(vec![
            ev("message_start", json!({"type": "message_start", "message": {"id": "m1", "model": "c", "usage": {}}})),
            ev("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
        ]),
        Reply::sse_steps(text_stream(&["clean", " answer"], Some("end_turn"))),
    ])
    .await;
    let (gw, clock) = gateway(&upstream, "").await;
    let (events, status) = gw.stream_all(request::user("hi")).await;
    assert!(status.is_none(), "{status:?}");
    assert!(
        matches!(&events[0], StreamEvent::Start { attempt: 2, id, .. } if id == "msg_s"),
        "{events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Start { .. }))
            .count(),
        1
    );
    let text = crate::support::text_of(&events);
    assert_eq!(text, "clean answer");
    assert_eq!(events.last(), Some(&StreamEvent::Stop(StopReason::EndTurn)));
    assert_eq!(clock.sleeps().len(), 1);
}

#[tokio::test]
async fn a_stall_before_content_is_retried_and_after_content_is_an_error() {
    let mut stall_early = text_stream(&[], None);
    stall_early.truncate(1); // message_start only
    stall_early.push(Step::Stall);
    let mut stall_late = text_stream(&["partial"], None);
    stall_late.push(Step::Stall);
    let upstream = Upstream::start(vec![
        Reply::sse_steps(stall_early),
        Reply::sse_steps(stall_late),
    ])
    .await;
    let (gw, _) = gateway(&upstream, "stream_idle_timeout_ms = 200").await;
    let (events, status) = gw.stream_all(request::user("hi")).await;
    assert!(
        matches!(events[0], StreamEvent::Start { attempt: 2, .. }),
        "{events:?}"
    );
    assert_eq!(
        events[2],
        StreamEvent::Text {
            index: 0,
            text: "partial".into()
        }
    );
    let status = status.expect("a stall after content never ends OK");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("stalled for 200 ms")
            && status.message().contains("1 content delta"),
        "{}",
        status.message()
    );
    assert_eq!(
        upstream.request_count(),
        2,
        "no retry after the commit point"
    );
}

#[tokio::test]
async fn a_stream_cut_after_content_is_not_retried() {
    let mut cut = text_stream(&["one"], None);
    cut.push(Step::Cut);
    let upstream = Upstream::start(vec![
        Reply::sse_steps(cut),
        Reply::sse_steps(text_stream(&["never"], Some("end_turn"))),
    ])
    .await;
    let (gw, _) = gateway(&upstream, "").await;
    let mut events = gw
        .client()
        .await
        .stream(request::user("hi"), &CallOptions::new())
        .await
        .unwrap();
    let mut last = None;
    while let Some(item) = events.next().await {
        last = Some(item);
    }
    let status = last.unwrap().unwrap_err();
    assert_eq!(status.status().unwrap().code(), Code::Unavailable);
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn stream_http_errors_before_content_are_retried() {
    let upstream = Upstream::start(vec![
        error(529, "overloaded_error"),
        Reply::sse_steps(text_stream(&["ok"], Some("end_turn"))),
    ])
    .await;
    let (gw, _) = gateway(&upstream, "").await;
    let response = provider_gateway_client::RawClient::connect(gw.url())
        .await
        .unwrap()
        .stream(request::to_stream(request::user("hi")))
        .await
        .unwrap();
    assert_eq!(response.metadata().get("x-gateway-attempts").unwrap(), "2");
    let mut body = response.into_inner();
    while body.message().await.unwrap().is_some() {}
    assert_eq!(
        body.trailers()
            .await
            .unwrap()
            .unwrap()
            .get("x-gateway-attempts")
            .unwrap(),
        "2"
    );
}
