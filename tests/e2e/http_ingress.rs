//! The HTTP ingress (OpenAI- and Anthropic-compatible) over raw HTTP:
//! `serve_listeners` on 127.0.0.1:0 with a scripted upstream behind it.
//! What an SDK sees: bodies, SSE events, statuses, the retry-coordination
//! headers, and how many requests reached the upstream.

use std::collections::HashMap;
use std::sync::Arc;

use provider_gateway_server::{Config, Registry, ServerOptions};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::support::{ENV, Reply, Step, Upstream, provider_config, sse_event};

/// The gateway with gRPC and HTTP listeners on 127.0.0.1:0.
struct HttpGateway {
    http: String,
    /// Dropping it starts the shutdown.
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpGateway {
    async fn start(toml: &str) -> Self {
        let env: HashMap<String, String> = ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = Config::from_toml(toml).expect("valid test config");
        let registry = Registry::from_config(&config, &env).expect("providers build");
        let options = ServerOptions::from_config(&config, &env).expect("server options");
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = http.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            provider_gateway_server::serve_listeners(
                grpc,
                Some(http),
                Arc::new(registry),
                options,
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("gateway serves");
        });
        Self {
            http: format!("http://{addr}"),
            stop: Some(stop),
            task,
        }
    }

    /// Starts the gateway's shutdown (drain).
    fn shutdown(&mut self) {
        self.stop.take();
    }

    async fn post(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = http_client(false)
            .post(format!("{}{path}", self.http))
            .json(&body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request.send().await.unwrap()
    }
}

/// A plain HTTP client (the gateway's TLS provider installed first).
fn http_client(h2: bool) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = reqwest::Client::builder();
    let builder = if h2 {
        builder.http2_prior_knowledge()
    } else {
        builder
    };
    builder.build().unwrap()
}

fn openai_upstream_config(upstream: &Upstream, extra: &str) -> String {
    provider_config(
        "openai",
        &format!("{}/v1", upstream.url()),
        &format!("model = \"gpt-test\"\n{extra}"),
    )
}

fn completion(content: &str) -> Reply {
    Reply::json(
        200,
        json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        }),
    )
}

fn unavailable() -> Reply {
    Reply::json(
        503,
        json!({"error": {"message": "busy", "type": "server_error"}}),
    )
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

fn user(text: &str) -> Value {
    json!({"model": "p/gpt-test", "messages": [{"role": "user", "content": text}]})
}

/// The `data:` payloads of an SSE body.
fn data_lines(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn openai_complete_maps_the_request_and_reports_attempts() {
    let upstream = Upstream::start(vec![completion("hello there")]).await;
    let gw = HttpGateway::start(&openai_upstream_config(&upstream, "")).await;
    let body = json!({
        "model": "p/gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "user", "content": [{"type": "text", "text": "and tomorrow?"}]}
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "description": "w",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "auto",
        "max_completion_tokens": 50, "temperature": 0.5, "stop": "END",
        "some_future_field": {"ignored": true}
    });
    let r = gw.post("/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-gateway-attempts"), Some("1"));
    assert_eq!(header(&r, "x-gateway-provider"), Some("p"));
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["content"], "hello there");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["total_tokens"], 9);

    let sent = &upstream.requests()[0].body;
    assert_eq!(sent["model"], "gpt-test");
    assert_eq!(
        sent["max_tokens"]
            .as_u64()
            .or(sent["max_completion_tokens"].as_u64()),
        Some(50)
    );
    assert_eq!(sent["stop"], json!(["END"]));
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(
        messages[0],
        json!({"role": "system", "content": "be brief"})
    );
    assert_eq!(messages[2]["tool_calls"][0]["function"]["name"], "weather");
    assert!(
        messages
            .iter()
            .any(|m| m["role"] == "tool" && m["tool_call_id"] == "call_1")
    );
    assert_eq!(sent["tools"][0]["function"]["name"], "weather");
}

#[tokio::test]
async fn openai_stream_ends_with_usage_and_done() {
    let chunk = |v: Value| Step::Chunk(sse_event("", &v.to_string()));
    let upstream = Upstream::start(vec![Reply::sse_steps(vec![
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]})),
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]})),
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})),
        Step::Chunk(b"data: [DONE]\n\n".to_vec()),
    ])])
    .await;
    let gw = HttpGateway::start(&openai_upstream_config(&upstream, "")).await;
    let mut body = user("stream please");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = gw.post("/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), Some("text/event-stream"));
    let lines = data_lines(&r.text().await.unwrap());
    assert_eq!(lines.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("stop")]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn a_stream_cut_after_content_ends_with_an_error_event_and_no_done() {
    let chunk = |v: Value| Step::Chunk(sse_event("", &v.to_string()));
    let upstream = Upstream::start(vec![Reply::sse_steps(vec![
        chunk(json!({"id": "c1", "model": "gpt-test", "choices": [{"index": 0, "delta": {"content": "partial"}}]})),
        Step::Cut,
    ])])
    .await;
    let gw = HttpGateway::start(&openai_upstream_config(&upstream, "")).await;
    let mut body = user("stream please");
    body["stream"] = json!(true);
    let r = gw.post("/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status(), 200);
    let lines = data_lines(&r.text().await.unwrap());
    assert!(!lines.iter().any(|l| l == "[DONE]"), "{lines:?}");
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert!(
        last["error"]["message"].as_str().unwrap().contains("broke"),
        "{last}"
    );
}

#[tokio::test]
async fn an_sdk_that_retries_gets_one_attempt_and_x_should_retry() {
    let upstream = Upstream::start(vec![unavailable(), completion("second")]).await;
    let gw = HttpGateway::start(&openai_upstream_config(
        &upstream,
        "[retry]\nmax_attempts = 3\ninitial_backoff_ms = 1\nmax_backoff_ms = 2",
    ))
    .await;
    let r = gw
        .post(
            "/v1/chat/completions",
            user("hi"),
            &[("x-stainless-retry-count", "1")],
        )
        .await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "x-should-retry"), Some("true"));
    assert_eq!(header(&r, "x-gateway-attempts"), Some("1"));
    assert_eq!(upstream.request_count(), 1);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("provider `p`")
    );
}

#[tokio::test]
async fn an_outage_is_answered_after_the_gateways_attempts_with_x_should_retry_false() {
    let upstream = Upstream::start(vec![unavailable(), unavailable(), unavailable()]).await;
    let gw = HttpGateway::start(&openai_upstream_config(
        &upstream,
        "[retry]\nmax_attempts = 3\ninitial_backoff_ms = 1\nmax_backoff_ms = 2",
    ))
    .await;
    let r = gw.post("/v1/chat/completions", user("hi"), &[]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    assert_eq!(header(&r, "x-gateway-attempts"), Some("3"));
    assert_eq!(upstream.request_count(), 3);
}

#[tokio::test]
async fn a_long_retry_after_is_passed_on() {
    let upstream = Upstream::start(vec![
        Reply::json(429, json!({"error": {"message": "slow down"}})).header("retry-after", "120"),
    ])
    .await;
    let gw = HttpGateway::start(&openai_upstream_config(&upstream, "")).await;
    let r = gw.post("/v1/chat/completions", user("hi"), &[]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), Some("120"));
    assert_eq!(header(&r, "retry-after-ms"), Some("120000"));
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn unsupported_fields_and_bad_headers_are_400_naming_them() {
    let gw = HttpGateway::start("").await;
    for (field, value) in [
        ("n", json!(2)),
        ("logprobs", json!(true)),
        ("audio", json!({"voice": "x"})),
    ] {
        let mut body = user("hi");
        body["model"] = json!("");
        body[field] = value;
        let r = gw.post("/v1/chat/completions", body, &[]).await;
        assert_eq!(r.status(), 400, "{field}");
        assert_eq!(header(&r, "x-should-retry"), Some("false"));
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], field, "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    let r = gw
        .post(
            "/v1/chat/completions",
            user("hi"),
            &[("x-retry-max-attempts", "zero")],
        )
        .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "x-retry-max-attempts", "{e}");
    let r = gw
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            &[],
        )
        .await;
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "messages[0].role", "{e}");
}

#[tokio::test]
async fn the_mock_serves_bare_models_and_lists_models() {
    let gw = HttpGateway::start("").await;
    // A bare model goes to the default provider (mock); an SDK timeout
    // header that is not a number is ignored.
    let r = gw
        .post(
            "/v1/chat/completions",
            json!({"model": "anything", "messages": [{"role": "user", "content": "hello"}]}),
            &[("x-stainless-timeout", "NOT_GIVEN")],
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-gateway-provider"), Some("mock"));
    let models: Value = http_client(false)
        .get(format!("{}/v1/models", gw.http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert!(
        models["data"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("mock/")
    );
    // h2c with prior knowledge on the same port.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(format!("{}/v1/models", gw.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn keys_are_the_grpc_keys_as_bearer_or_x_api_key() {
    let hash = provider_gateway_server::auth::key_hash_hex("caller-key");
    let gw = HttpGateway::start(&format!("[auth]\nkeys = [\"{hash}\"]\n")).await;
    let r = gw.post("/v1/chat/completions", user("hi"), &[]).await;
    assert_eq!(r.status(), 401);
    let r = gw
        .post(
            "/v1/chat/completions",
            user("hi"),
            &[("authorization", "Bearer wrong")],
        )
        .await;
    assert_eq!(r.status(), 401);
    let e = r.text().await.unwrap();
    assert!(!e.contains("wrong"), "{e}");
    let mut body = user("hi");
    body["model"] = json!("mock");
    let r = gw
        .post(
            "/v1/chat/completions",
            body.clone(),
            &[("authorization", "Bearer caller-key")],
        )
        .await;
    assert_eq!(r.status(), 200);
    body["max_tokens"] = json!(10);
    let r = gw
        .post("/v1/messages", body, &[("x-api-key", "caller-key")])
        .await;
    assert_eq!(r.status(), 200);
    let e: Value = gw
        .post("/v1/messages", user("hi"), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "authentication_error");
}

fn anthropic_config(upstream: &Upstream) -> String {
    provider_config(
        "anthropic",
        &upstream.url(),
        "model = \"claude-test\"\n[retry]\nmax_attempts = 2\ninitial_backoff_ms = 1\nmax_backoff_ms = 2",
    )
}

#[tokio::test]
async fn anthropic_messages_stream_has_anthropics_event_sequence_with_tool_use() {
    let ev = |name: &str, v: Value| Step::Chunk(sse_event(name, &v.to_string()));
    let upstream = Upstream::start(vec![Reply::sse_steps(vec![
        ev("message_start", json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude-test", "usage": {"input_tokens": 9, "output_tokens": 1}}})),
        ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me check."}})),
        ev("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        ev("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}})),
        ev("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}})),
        ev("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Oslo\"}"}})),
        ev("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
        ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}})),
        ev("message_stop", json!({"type": "message_stop"})),
    ])])
    .await;
    let gw = HttpGateway::start(&anthropic_config(&upstream)).await;
    let body = json!({
        "model": "claude-test", "max_tokens": 100, "stream": true,
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "weather in Oslo?"}]}],
        "tools": [{"name": "weather", "description": "w", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto"}
    });
    let r = gw.post("/v1/messages", body, &[]).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let data: Vec<Value> = data_lines(&text)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(data[4]["content_block"]["type"], "tool_use");
    assert_eq!(data[4]["index"], 1);
    assert_eq!(data[8]["delta"]["stop_reason"], "tool_use");
    assert_eq!(data[8]["usage"]["output_tokens"], 12);
    let sent = &upstream.requests()[0].body;
    assert_eq!(sent["system"], "be brief");
    assert_eq!(sent["tools"][0]["name"], "weather");
}

#[tokio::test]
async fn anthropic_overloaded_is_529_in_anthropics_error_shape() {
    let overloaded = || {
        Reply::json(
            529,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        )
    };
    let upstream = Upstream::start(vec![overloaded(), overloaded()]).await;
    let gw = HttpGateway::start(&anthropic_config(&upstream)).await;
    let body = json!({"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let r = gw.post("/v1/messages", body, &[]).await;
    assert_eq!(r.status(), 529);
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    assert_eq!(header(&r, "x-gateway-attempts"), Some("2"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "overloaded_error");
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn anthropic_whole_answer_with_tool_use() {
    let upstream = Upstream::start(vec![Reply::json(200, json!({
        "id": "msg_2", "type": "message", "role": "assistant", "model": "claude-test",
        "content": [{"type": "text", "text": "Checking."}, {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Oslo"}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 4, "output_tokens": 6}
    }))])
    .await;
    let gw = HttpGateway::start(&anthropic_config(&upstream)).await;
    let body = json!({"model": "p", "max_tokens": 10, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "hot"}]}
    ], "tools": [{"name": "weather", "input_schema": {"type": "object"}}]});
    let r = gw.post("/v1/messages", body, &[]).await;
    assert_eq!(r.status(), 200);
    let m: Value = r.json().await.unwrap();
    assert_eq!(m["type"], "message");
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(m["content"][1]["input"], json!({"city": "Oslo"}));
    let sent = &upstream.requests()[0].body;
    assert_eq!(
        sent["messages"][1]["content"][0]["input"],
        json!({"city": "Rome"})
    );
    assert_eq!(sent["messages"][2]["content"][0]["tool_use_id"], "toolu_1");
}

#[tokio::test]
async fn the_request_timeout_header_bounds_the_call() {
    let upstream = Upstream::start(vec![
        completion("late").delay(std::time::Duration::from_secs(5)),
    ])
    .await;
    let gw = HttpGateway::start(&openai_upstream_config(&upstream, "")).await;
    let r = gw
        .post(
            "/v1/chat/completions",
            user("hi"),
            &[("x-request-timeout-ms", "300")],
        )
        .await;
    assert_eq!(r.status(), 504);
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    let r = gw
        .post(
            "/v1/chat/completions",
            user("hi"),
            &[("x-request-timeout-ms", "soon")],
        )
        .await;
    assert_eq!(r.status(), 400);
}

/// A timeout of u64::MAX milliseconds is taken as a day: the call is
/// served, and nothing overflows.
#[tokio::test]
async fn an_absurd_request_timeout_is_capped_not_an_overflow() {
    let upstream = Upstream::start(vec![completion("in time")]).await;
    let gw = HttpGateway::start(&openai_upstream_config(&upstream, "")).await;
    let r = gw
        .post(
            "/v1/chat/completions",
            user("hi"),
            &[("x-request-timeout-ms", "18446744073709551615")],
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "in time");
}

#[tokio::test]
async fn a_draining_gateway_refuses_new_http_calls_with_a_retryable_503() {
    // The mock streams its words slowly: one stream stays open while the
    // gateway drains.
    let mut gw = HttpGateway::start(
        "[providers.mock]\nkind = \"mock\"\nreply = \"words\"\nwords = 20\nchunk_delay_ms = 100\n",
    )
    .await;
    let client = http_client(false);
    let models = format!("{}/v1/models", gw.http);
    let mut body = user("long story");
    body["model"] = json!("mock");
    body["stream"] = json!(true);
    let open = client
        .post(format!("{}/v1/chat/completions", gw.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    // A second connection (the stream holds the first), kept alive.
    assert_eq!(client.get(&models).send().await.unwrap().status(), 200);
    gw.shutdown();
    // The kept-alive connection of the first call is still open: a new call
    // on it is refused, retryably (another replica can serve it).
    let mut refused = None;
    for _ in 0..100 {
        let r = client.get(&models).send().await.unwrap();
        if r.status() != 200 {
            refused = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let refused = refused.expect("the draining gateway refuses new calls");
    assert_eq!(refused.status(), 503);
    assert_eq!(header(&refused, "x-should-retry"), Some("true"));
    // The open stream still ends properly.
    let text = open.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}
