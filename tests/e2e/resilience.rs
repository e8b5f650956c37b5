//! Resilience beyond retry: circuit breakers and fallback chains.

use std::time::Duration;

use provider_gateway_client::{CallOptions, request};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{ENV, Gateway, Reply, ScriptedClock, Upstream};

fn unavailable() -> Reply {
    Reply::json(
        503,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "down"}}),
    )
}

pub fn anthropic_ok(text: &str) -> Reply {
    Reply::json(
        200,
        json!({
            "id": "m", "model": "claude", "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}
        }),
    )
}

fn openai_ok(text: &str) -> Reply {
    Reply::json(
        200,
        json!({
            "id": "c", "model": "gpt", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}
        }),
    )
}

async fn call(
    gw: &Gateway,
    options: &CallOptions,
) -> Result<provider_gateway_client::Answer, tonic::Status> {
    gw.client()
        .await
        .complete(request::user("hi"), options)
        .await
        .map_err(|e| e.status().unwrap().clone())
}

#[tokio::test]
async fn an_open_breaker_fails_fast_then_a_probe_closes_it() {
    let mut script = vec![unavailable(), unavailable(), unavailable()];
    script.extend([anthropic_ok("probe"), anthropic_ok("closed")]);
    let upstream = Upstream::start(script).await;
    let clock = ScriptedClock::new();
    let toml = format!(
        "[providers.p]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n\
         [providers.p.retry]\nmax_attempts = 1\n\
         [providers.p.breaker]\nconsecutive_failures = 3\ncooldown_ms = 10000\n",
        upstream.url()
    );
    let gw = Gateway::start_scripted(&toml, ENV, clock.clone()).await;
    // The breaker opens during the third call, for 10 s of the wall clock
    // (the scripted clock moves only when told).
    let mut third_began = std::time::Instant::now();
    for i in 0..3 {
        if i == 2 {
            third_began = std::time::Instant::now();
        }
        assert_eq!(
            call(&gw, &CallOptions::new()).await.unwrap_err().code(),
            Code::Unavailable
        );
    }
    assert_eq!(upstream.request_count(), 3);

    // Open: answered at once, with the time until a probe, and no upstream call.
    for _ in 0..5 {
        let status = call(&gw, &CallOptions::new()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("circuit breaker is open"),
            "{}",
            status.message()
        );
        let delay = status
            .get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay)
            .unwrap();
        // What is left of the cooldown: at most 10 s, at least 10 s less
        // the time since the third call began (a stall included).
        let left = Duration::from_secs(10).saturating_sub(third_began.elapsed());
        assert!(
            delay <= Duration::from_secs(10) && delay + Duration::from_millis(10) >= left,
            "{delay:?}, with {left:?} or more of the cooldown left"
        );
    }
    assert_eq!(upstream.request_count(), 3, "no upstream call while open");
    // With its only provider's breaker open, the gateway reads NOT_SERVING.
    let channel = tonic::transport::Endpoint::from_shared(gw.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = |channel: tonic::transport::Channel| async move {
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let request = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        client.check(request).await.unwrap().into_inner().status
    };
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    // The health watcher looks every 500 ms; wait for it by the clock, not
    // by a count of polls.
    let waiting = std::time::Instant::now();
    let mut status = health(channel.clone()).await;
    while status != not_serving && waiting.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = health(channel.clone()).await;
    }
    assert_eq!(status, not_serving);

    // After the cooldown one probe goes through; its success closes the breaker.
    clock.advance(Duration::from_secs(10));
    assert_eq!(
        call(&gw, &CallOptions::new()).await.unwrap().text(),
        "probe"
    );
    assert_eq!(
        call(&gw, &CallOptions::new()).await.unwrap().text(),
        "closed"
    );
    assert_eq!(upstream.request_count(), 5);
}

/// A primary anthropic provider at `primary` falling back to an openai one
/// at `backup`.
fn chain_config(primary: &Upstream, backup: &Upstream, primary_extra: &str) -> String {
    format!(
        "default_provider = \"primary\"\n\
         [providers.primary]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\nfallback = [{{ provider = \"backup\", model = \"gpt-backup\" }}]\n\
         [providers.primary.retry]\nmax_attempts = 2\ninitial_backoff_ms = 0\nmax_backoff_ms = 0\n{primary_extra}\n\
         [providers.backup]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n",
        primary.url(),
        backup.url()
    )
}

#[tokio::test]
async fn a_failing_primary_is_served_by_the_fallback() {
    let primary = Upstream::start(vec![unavailable(), unavailable()]).await;
    let backup = Upstream::start(vec![openai_ok("from backup")]).await;
    let gw = Gateway::start_scripted(
        &chain_config(&primary, &backup, ""),
        ENV,
        ScriptedClock::new(),
    )
    .await;
    let answer = call(&gw, &CallOptions::new()).await.unwrap();
    assert_eq!(answer.text(), "from backup");
    assert_eq!(
        (answer.provider.as_str(), answer.response.provider.as_str()),
        ("backup", "backup")
    );
    assert_eq!(
        (answer.attempts, answer.response.attempts),
        (3, 3),
        "attempts across both providers"
    );
    assert_eq!((primary.request_count(), backup.request_count()), (2, 1));
    assert_eq!(
        backup.requests()[0].body["model"],
        "gpt-backup",
        "the hop's own model"
    );
}

#[tokio::test]
async fn an_open_primary_breaker_goes_straight_to_the_fallback() {
    let primary = Upstream::start(vec![unavailable(), unavailable()]).await;
    let backup = Upstream::start(vec![openai_ok("one"), openai_ok("two")]).await;
    let extra = "[providers.primary.breaker]\nconsecutive_failures = 2\ncooldown_ms = 60000";
    let gw = Gateway::start_scripted(
        &chain_config(&primary, &backup, extra),
        ENV,
        ScriptedClock::new(),
    )
    .await;
    assert_eq!(call(&gw, &CallOptions::new()).await.unwrap().text(), "one");
    let answer = call(&gw, &CallOptions::new()).await.unwrap();
    assert_eq!((answer.text().as_str(), answer.attempts), ("two", 1));
    assert_eq!(
        primary.request_count(),
        2,
        "the open primary was not touched"
    );
}

/// The primary's two attempts take 600 ms of the 2.5 s deadline (the gateway
/// answers at 2.25 s, 250 ms before it): the fallback is reached with over
/// 1.5 s to spare, and its answer would come after 10 s.
#[tokio::test]
async fn the_deadline_spans_the_whole_chain() {
    let slow_fail = || unavailable().delay(Duration::from_millis(300));
    let primary = Upstream::start(vec![slow_fail(), slow_fail()]).await;
    let backup = Upstream::start(vec![openai_ok("late").delay(Duration::from_secs(10))]).await;
    let gw = Gateway::start_scripted(
        &chain_config(&primary, &backup, ""),
        ENV,
        ScriptedClock::new(),
    )
    .await;
    let started = std::time::Instant::now();
    let status = call(
        &gw,
        &CallOptions::new().deadline(Duration::from_millis(2_500)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("3 attempt(s)"),
        "{}",
        status.message()
    );
    assert_eq!(
        backup.request_count(),
        1,
        "the chain reached the fallback within the deadline"
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "took {took:?}: the backup's answer was waited for"
    );
}

#[tokio::test]
async fn the_request_chooses_its_fallbacks() {
    let primary = Upstream::start(vec![unavailable(); 4]).await;
    let backup = Upstream::start(vec![]).await;
    let gw = Gateway::start_scripted(
        &chain_config(&primary, &backup, ""),
        ENV,
        ScriptedClock::new(),
    )
    .await;
    let mut raw = provider_gateway_client::RawClient::connect(gw.url())
        .await
        .unwrap();
    let with = |value: &str| {
        let mut req = tonic::Request::new(request::user("hi"));
        req.metadata_mut()
            .insert("x-fallback-providers", value.parse().unwrap());
        req
    };
    let status = raw.complete(with("nope")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("x-fallback-providers") && status.message().contains("nope"));
    assert_eq!(
        primary.request_count(),
        0,
        "rejected before any upstream call"
    );
    let status = raw.complete(with("none")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(backup.request_count(), 0, "`none` disables the chain");
}

mod resume {
    use provider_gateway_client::{StopReason, StreamEvent, request, v1};
    use serde_json::json;
    use tonic::Code;

    use crate::anthropic::text_stream;
    use crate::support::{
        ENV, Gateway, Reply, ScriptedClock, Step, Upstream, provider_config, sse_event,
    };

    #[tokio::test]
    async fn a_stream_cut_inside_text_is_resumed_with_the_delivered_prefill() {
        let mut cut = text_stream(&["The ", "quick ", "brown"], None);
        cut.push(Step::Cut);
        let upstream = Upstream::start(vec![
            Reply::sse_steps(cut),
            Reply::sse_steps(text_stream(&[" fox", " jumps"], Some("end_turn"))),
        ])
        .await;
        let toml = provider_config("anthropic", &upstream.url(), "stream_resume = true");
        let gw = Gateway::start_scripted(&toml, ENV, ScriptedClock::new()).await;
        let (events, status) = gw.stream_all(request::user("Say it")).await;
        assert!(status.is_none(), "{status:?}");
        let text = crate::support::text_of(&events);
        assert_eq!(text, "The quick brown fox jumps", "the full text, once");
        let resumed: Vec<&StreamEvent> = events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Resumed { .. }))
            .collect();
        assert_eq!(
            resumed,
            [&StreamEvent::Resumed {
                attempt: 2,
                provider: "p".into(),
                characters_delivered: 15
            }]
        );
        let at = events
            .iter()
            .position(|e| matches!(e, StreamEvent::Resumed { .. }))
            .unwrap();
        assert!(
            matches!(&events[at - 1], StreamEvent::Text { text, .. } if text == "brown"),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .all(|e| !matches!(e, StreamEvent::Text { index, .. } if *index != 0)),
            "one text block"
        );
        // Usage sums both parts: 9 + 9 input; 1 output reported by the broken
        // part's message_start, 2 by the continuation.
        let last_usage = events.iter().rev().find_map(|e| match e {
            StreamEvent::Usage(u) => Some(*u),
            _ => None,
        });
        assert_eq!(
            last_usage,
            Some(v1::Usage {
                input_tokens: 18,
                output_tokens: 3
            }),
            "{events:?}"
        );
        assert_eq!(events.last(), Some(&StreamEvent::Stop(StopReason::EndTurn)));
        let requests = upstream.requests();
        assert_eq!(requests.len(), 2);
        let messages = requests[1].body["messages"].as_array().unwrap();
        assert_eq!(
            messages.last().unwrap(),
            &json!({"role": "assistant", "content": [{"type": "text", "text": "The quick brown"}]})
        );
        assert_eq!(messages.len(), 2);
    }

    #[tokio::test]
    async fn a_cut_inside_a_tool_call_is_not_resumed() {
        let ev = |name: &str, v: serde_json::Value| Step::Chunk(sse_event(name, &v.to_string()));
        let upstream = Upstream::start(vec![
            Reply::sse_steps(vec![
                ev("message_start", json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}})),
                ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}})),
                ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}})),
                Step::Cut,
            ]),
            Reply::sse_steps(text_stream(&["never"], Some("end_turn"))),
        ])
        .await;
        let toml = provider_config("anthropic", &upstream.url(), "stream_resume = true");
        let gw = Gateway::start_scripted(&toml, ENV, ScriptedClock::new()).await;
        let mut req = request::user("Call f");
        req.tools = vec![request::tool("f", "", r#"{"type":"object"}"#)];
        let (_, status) = gw.stream_all(req).await;
        assert_eq!(status.expect("not OK").code(), Code::Unavailable);
        assert_eq!(upstream.request_count(), 1);
    }

    #[tokio::test]
    async fn a_request_opts_in_and_each_break_is_resumed_up_to_the_limit() {
        // The mock breaks every stream after 2 chunks; resumed twice, the
        // third part finishes.
        let gw = Gateway::start(
            "[providers.m]\nkind = \"mock\"\nbreak_stream_after = 2\n",
            &[],
        )
        .await;
        let mut raw = provider_gateway_client::RawClient::connect(gw.url())
            .await
            .unwrap();
        let mut req = tonic::Request::new(request::to_stream(request::user(
            "one two three four five six",
        )));
        req.metadata_mut()
            .insert("x-stream-resume", "continue".parse().unwrap());
        let mut body = raw.stream(req).await.unwrap().into_inner();
        let mut text = String::new();
        let mut resumes = 0;
        while let Some(event) = body.message().await.expect("the stream ends OK") {
            match event.event {
                Some(v1::stream_response::Event::Delta(d)) => {
                    if let Some(v1::content_delta::Delta::Text(t)) = d.delta {
                        text.push_str(&t);
                    }
                }
                Some(v1::stream_response::Event::Resumed(_)) => resumes += 1,
                _ => {}
            }
        }
        assert_eq!((text.as_str(), resumes), ("one two three four five six", 2));
        // Without the opt-in the same break is an error.
        let (_, status) = gw.stream_all(request::user("one two three")).await;
        assert_eq!(status.unwrap().code(), Code::Unavailable);
    }
}

mod hedging {
    use std::time::{Duration, Instant};

    use provider_gateway_client::{StreamEvent, request};

    use crate::anthropic::text_stream;
    use crate::resilience::anthropic_ok;
    use crate::support::{ENV, Gateway, Reply, ScriptedClock, Step, Upstream, provider_config};

    #[tokio::test]
    async fn a_slow_stream_is_hedged_and_the_slow_request_cancelled() {
        let mut slow = text_stream(&[], None);
        slow.truncate(1); // message_start, then silence
        slow.push(Step::Stall);
        let upstream = Upstream::start(vec![
            Reply::sse_steps(slow),
            Reply::sse_steps(text_stream(&["fast"], Some("end_turn"))),
        ])
        .await;
        let toml = provider_config("anthropic", &upstream.url(), "hedge_after_ms = 200");
        let gw = Gateway::start_scripted(&toml, ENV, ScriptedClock::new()).await;
        let started = Instant::now();
        let (events, status) = gw.stream_all(request::user("hi")).await;
        let elapsed = started.elapsed();
        assert!(status.is_none(), "{status:?}");
        assert!(
            matches!(events[0], StreamEvent::Start { attempt: 2, .. }),
            "the hedge served: {events:?}"
        );
        assert!(events.contains(&StreamEvent::Text {
            index: 0,
            text: "fast".into()
        }));
        // About the hedge delay plus the fast answer; without the hedge the
        // stall would last until the 30 s idle timeout.
        assert!(
            elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(5),
            "{elapsed:?}"
        );
        tokio::time::timeout(Duration::from_secs(5), upstream.wait_closed())
            .await
            .expect("the slow upstream request was cancelled");
    }

    #[tokio::test]
    async fn a_request_can_ask_for_a_hedge() {
        let upstream = Upstream::start(vec![
            anthropic_ok("slow").delay(Duration::from_secs(30)),
            anthropic_ok("fast"),
        ])
        .await;
        let gw = Gateway::start_scripted(
            &provider_config("anthropic", &upstream.url(), ""),
            ENV,
            ScriptedClock::new(),
        )
        .await;
        let mut raw = provider_gateway_client::RawClient::connect(gw.url())
            .await
            .unwrap();
        let mut req = tonic::Request::new(request::user("hi"));
        req.metadata_mut()
            .insert("x-hedge-after-ms", "100".parse().unwrap());
        let started = Instant::now();
        let answer = raw.complete(req).await.unwrap().into_inner();
        assert_eq!(answer.attempts, 2);
        assert!(started.elapsed() < Duration::from_secs(5));
        let text = match &answer.content[0].block {
            Some(provider_gateway_client::v1::content_block::Block::Text(t)) => t.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(text, "fast");
    }
}
