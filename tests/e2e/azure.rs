//! The azure-openai provider through the gateway: the deployment URL with
//! its api-version, the api-key header or an Entra bearer token, content
//! filter results as CONTENT_FILTER, and Azure's error shapes.

use std::time::Duration;

use provider_gateway_client::{CallOptions, StopReason, StreamEvent, request, v1};
use serde_json::json;
use tonic::Code;

use crate::support::{Gateway, KEY, Reply, ScriptedClock, Upstream};

fn config(upstream: &Upstream, extra: &str) -> String {
    format!(
        "default_provider = \"az\"\n[providers.az]\nkind = \"azure-openai\"\nbase_url = \"{}\"\nmodel = \"gpt4o-prod\"\n{extra}\n",
        upstream.url()
    )
}

const ENV: &[(&str, &str)] = &[("AZ_KEY", KEY)];

fn filters(filtered: bool) -> serde_json::Value {
    json!({
        "hate": {"filtered": false, "severity": "safe"},
        "self_harm": {"filtered": false, "severity": "safe"},
        "sexual": {"filtered": false, "severity": "safe"},
        "violence": {"filtered": filtered, "severity": if filtered { "high" } else { "safe" }},
    })
}

fn chunk(v: serde_json::Value) -> (&'static str, String) {
    ("", v.to_string())
}

#[tokio::test]
async fn azure_complete_calls_the_deployment_with_api_version_and_api_key() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        json!({
            "id": "chatcmpl-az1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": filters(false)}],
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Hello from Azure"},
                "content_filter_results": filters(false)}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        }),
    )])
    .await;
    let gw = Gateway::start(&config(&upstream, "api_key_env = \"AZ_KEY\""), ENV).await;
    let mut req = request::user("Hi");
    req.system = "be brief".into();
    req.max_tokens = Some(50);
    let answer = gw
        .client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.text(), "Hello from Azure");
    assert_eq!(answer.stop_reason(), StopReason::EndTurn);
    assert_eq!(
        answer.response.usage,
        Some(v1::Usage {
            input_tokens: 9,
            output_tokens: 3
        })
    );

    let sent = &upstream.requests()[0];
    assert_eq!(
        sent.path,
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(sent.header("api-key"), Some(KEY));
    assert_eq!(sent.header("authorization"), None);
    assert!(
        sent.body.get("model").is_none(),
        "the deployment is in the path"
    );
    assert_eq!(sent.body["max_tokens"], 50);
    assert_eq!(
        sent.body["messages"][0],
        json!({"role": "system", "content": "be brief"})
    );
}

#[tokio::test]
async fn azure_entra_token_is_a_bearer_and_the_request_model_picks_the_deployment() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        json!({"id": "x", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "ok"}}]}),
    )])
    .await;
    let token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.entra-token";
    let gw = Gateway::start(
        &config(
            &upstream,
            "entra_token_env = \"AZ_TOKEN\"\napi_version = \"2025-01-01-preview\"",
        ),
        &[("AZ_TOKEN", token)],
    )
    .await;
    let mut req = request::user("Hi");
    req.model = "mini-eu".into();
    gw.client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap();
    let sent = &upstream.requests()[0];
    assert_eq!(
        sent.path,
        "/openai/deployments/mini-eu/chat/completions?api-version=2025-01-01-preview"
    );
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {token}").as_str())
    );
    assert_eq!(sent.header("api-key"), None);
}

#[tokio::test]
async fn azure_stream_skips_the_prompt_filter_chunk_and_reports_a_filtered_answer() {
    let upstream = Upstream::start(vec![Reply::sse(&[
        // Azure's first chunk: prompt filter results only, empty id and model.
        chunk(json!({"id": "", "object": "", "created": 0, "model": "", "choices": [],
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": filters(false)}]})),
        chunk(json!({"id": "chatcmpl-s", "model": "gpt-4o", "choices": [{"index": 0,
            "delta": {"role": "assistant", "content": ""}, "content_filter_results": {}}]})),
        chunk(json!({"id": "chatcmpl-s", "model": "gpt-4o", "choices": [{"index": 0,
            "delta": {"content": "Once upon"}, "content_filter_results": filters(false)}]})),
        chunk(json!({"id": "chatcmpl-s", "model": "gpt-4o", "choices": [{"index": 0,
            "delta": {}, "finish_reason": "content_filter", "content_filter_results": filters(true)}]})),
        chunk(json!({"id": "chatcmpl-s", "model": "gpt-4o", "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2}})),
        ("", "[DONE]".into()),
    ])])
    .await;
    let gw = Gateway::start(&config(&upstream, "api_key_env = \"AZ_KEY\""), ENV).await;
    let (events, status) = gw.stream_all(request::user("A story")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        events,
        [
            StreamEvent::Start {
                id: "chatcmpl-s".into(),
                provider: "az".into(),
                model: "gpt-4o".into(),
                attempt: 1
            },
            StreamEvent::Text {
                index: 0,
                text: "Once upon".into()
            },
            StreamEvent::Usage(v1::Usage {
                input_tokens: 5,
                output_tokens: 2
            }),
            StreamEvent::Stop(StopReason::ContentFilter),
        ]
    );
    let sent = &upstream.requests()[0];
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["stream_options"], json!({"include_usage": true}));
    assert_eq!(sent.header("api-key"), Some(KEY));
}

#[tokio::test]
async fn azure_filtered_choice_is_content_filter_in_complete() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        json!({"id": "x", "model": "m", "choices": [{"index": 0, "finish_reason": "content_filter",
            "message": {"role": "assistant", "content": null}, "content_filter_results": filters(true)}]}),
    )])
    .await;
    let gw = Gateway::start(&config(&upstream, "api_key_env = \"AZ_KEY\""), ENV).await;
    let answer = gw
        .client()
        .await
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.stop_reason(), StopReason::ContentFilter);
}

#[tokio::test]
async fn azure_429_is_retried_after_its_retry_after_and_a_blocked_prompt_is_final() {
    let limited = Reply::json(
        429,
        json!({"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation have exceeded token rate limit. Please retry after 2 seconds."}}),
    )
    .header("retry-after", "2");
    let ok = Reply::json(
        200,
        json!({"id": "x", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "after the wait"}}]}),
    );
    let blocked = Reply::json(
        400,
        json!({"error": {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
            "type": null, "param": "prompt", "code": "content_filter", "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                "hate": {"filtered": false, "severity": "safe"},
                "violence": {"filtered": true, "severity": "medium"}}}}}),
    );
    let upstream = Upstream::start(vec![limited, ok, blocked]).await;
    let clock = ScriptedClock::new();
    let gw = Gateway::start_scripted(
        &config(
            &upstream,
            "api_key_env = \"AZ_KEY\"\n[providers.az.retry]\nmax_attempts = 3",
        ),
        ENV,
        clock.clone(),
    )
    .await;
    let mut client = gw.client().await;
    let answer = client
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.text(), "after the wait");
    assert_eq!(answer.attempts, 2);
    let waited = clock.sleeps();
    assert_eq!(waited.len(), 1, "{waited:?}");
    assert!(waited[0] >= Duration::from_secs(2), "{waited:?}");

    let err = client
        .complete(request::user("Something blocked"), &CallOptions::new())
        .await
        .unwrap_err();
    let err = err.status().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("content filter: violence (medium)"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains(KEY));
    assert_eq!(
        upstream.request_count(),
        3,
        "a blocked prompt is not retried"
    );
}

#[tokio::test]
async fn azure_without_its_credential_fails_naming_the_variable() {
    let config = provider_gateway_server::Config::from_toml(
        "default_provider = \"az\"\n[providers.az]\nkind = \"azure-openai\"\nbase_url = \"https://r.openai.azure.com\"\nmodel = \"d\"\nentra_token_env = \"AZ_TOKEN\"\n",
    )
    .unwrap();
    let env = std::collections::HashMap::new();
    let Err(e) = provider_gateway_server::Registry::from_config(&config, &env) else {
        panic!("built without a token")
    };
    assert!(
        e.0.contains("AZ_TOKEN") && e.0.contains("entra_token_env"),
        "{e}"
    );
    for (toml, key) in [
        ("base_url = \"https://r\"\n", "providers.az.model"),
        ("model = \"d\"\n", "providers.az.base_url"),
        (
            "base_url = \"https://r\"\nmodel = \"d\"\napi_key_env = \"A\"\nentra_token_env = \"B\"\n",
            "providers.az.entra_token_env",
        ),
        (
            "base_url = \"https://r\"\nmodel = \"d\"\napi_version = \"2024/../x\"\n",
            "providers.az.api_version",
        ),
        (
            "base_url = \"https://r\"\nmodel = \"a:b\"\n",
            "providers.az.model",
        ),
    ] {
        let e = provider_gateway_server::Config::from_toml(&format!(
            "default_provider = \"az\"\n[providers.az]\nkind = \"azure-openai\"\n{toml}"
        ))
        .unwrap_err();
        assert!(e.0.contains(key), "{key}: {e}");
    }
}
