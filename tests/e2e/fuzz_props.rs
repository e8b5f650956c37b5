//! The property-test twins of the fuzz targets (`fuzz/fuzz_targets/`): the
//! same entry points (`provider_gateway_server::fuzzing`), run for a bounded
//! number of generated cases, plus a replay of each seed corpus
//! (`fuzz/corpus/<target>/`). For any input: no panic, bounded memory, at
//! most one end per stream and it is last, no key in any error, and a clear
//! error (naming the key at fault) for invalid configuration or metadata.

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use provider_gateway_server::chat::{StopReason, StreamEvent};
use provider_gateway_server::fuzzing;
use serde_json::{Value, json};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every seed of `target`'s corpus.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

fn seed<'a>(seeds: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &seeds.iter().find(|(n, _)| n == name).unwrap().1
}

// === Strategies ===

/// Numbers an upstream might send where a count or an index belongs.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..100).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(u64::MAX)),
        Just(json!(u32::MAX)),
        Just(Value::Null),
        "[a-z0-9]{0,6}".prop_map(Value::from),
    ]
}

fn text() -> impl Strategy<Value = Value> {
    prop_oneof![
        "\\PC{0,24}".prop_map(Value::from),
        Just(json!("")),
        number(),
        Just(json!({"nested": [1, 2]})),
    ]
}

fn anthropic_event() -> impl Strategy<Value = (String, Value)> {
    let kinds = prop::sample::select(vec![
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "ping",
        "error",
        "other",
    ]);
    let stops = prop::sample::select(vec![
        "end_turn",
        "max_tokens",
        "stop_sequence",
        "tool_use",
        "refusal",
        "pause_turn",
        "model_context_window_exceeded",
        "weird",
    ]);
    let blocks = prop::sample::select(vec!["text", "tool_use", "thinking", "server_tool_use"]);
    let deltas = prop::sample::select(vec!["text_delta", "input_json_delta", "thinking_delta"]);
    let errors = prop::sample::select(vec![
        "overloaded_error",
        "api_error",
        "invalid_request_error",
        "rate_limit_error",
        "nope",
    ]);
    (
        kinds, stops, blocks, deltas, errors, number(), number(), number(), text(),
    )
        .prop_map(|(kind, stop, block, delta, error, index, n1, n2, t)| {
            let v = match kind {
                "message_start" => {
                    json!({"type": kind, "message": {"id": t, "model": "m", "usage": {"input_tokens": n1, "output_tokens": n2}}})
                }
                "content_block_start" => {
                    json!({"type": kind, "index": index, "content_block": {"type": block, "text": t, "id": "i", "name": "n"}})
                }
                "content_block_delta" => {
                    json!({"type": kind, "index": index, "delta": {"type": delta, "text": t, "partial_json": t}})
                }
                "message_delta" => {
                    json!({"type": kind, "delta": {"stop_reason": stop}, "usage": {"output_tokens": n1, "input_tokens": n2}})
                }
                "error" => {
                    json!({"type": kind, "error": {"type": error, "message": format!("{t} {}", fuzzing::FUZZ_KEY)}})
                }
                _ => json!({"type": kind, "index": index}),
            };
            (kind.to_string(), v)
        })
}

fn openai_chunk() -> impl Strategy<Value = Value> {
    let finish = prop::sample::select(vec![
        "stop",
        "length",
        "tool_calls",
        "content_filter",
        "function_call",
        "",
    ]);
    (
        finish,
        any::<bool>(),
        number(),
        number(),
        number(),
        text(),
        0u8..6,
    )
        .prop_map(|(finish, with_finish, index, n1, n2, t, shape)| match shape {
            0 => json!({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": t}}]}),
            1 => json!({"choices": [{"delta": {"tool_calls": [{"index": index, "id": "call", "function": {"name": t, "arguments": t}}]}}]}),
            2 => json!({"choices": [{"delta": {}, "finish_reason": if with_finish { json!(finish) } else { Value::Null }}]}),
            3 => json!({"choices": [], "usage": {"prompt_tokens": n1, "completion_tokens": n2}}),
            4 => json!({"error": {"message": format!("{t} {}", fuzzing::FUZZ_KEY), "type": if with_finish { "server_error" } else { "x" }, "code": t}}),
            _ => json!({"choices": t}),
        })
}

/// SSE bytes around `events`, with a random chunking seed, line endings,
/// comments and a `[DONE]` now and then.
fn sse_body(events: Vec<(String, String)>, seed: u8, crlf: bool, done: bool) -> Vec<u8> {
    let nl = if crlf { "\r\n" } else { "\n" };
    let mut out = vec![seed];
    for (name, data) in events {
        if !name.is_empty() {
            out.extend_from_slice(format!("event: {name}{nl}").as_bytes());
        }
        out.extend_from_slice(format!("data: {data}{nl}{nl}").as_bytes());
        out.extend_from_slice(format!(": ping{nl}{nl}").as_bytes());
    }
    if done {
        out.extend_from_slice(format!("data: [DONE]{nl}{nl}").as_bytes());
    }
    out
}

fn check_stream(items: &[Result<StreamEvent, provider_gateway_server::error::ProviderError>]) {
    for item in items {
        if let Err(e) = item {
            assert!(!e.message.contains(fuzzing::FUZZ_KEY), "{}", e.message);
        }
    }
}

// === SSE decoder ===

#[test]
fn sse_seeds_decode() {
    for (name, data) in corpus("sse") {
        let result = fuzzing::sse(&data, 512);
        assert_eq!(
            result.is_err(),
            name == "oversized_line",
            "{name}: {result:?}"
        );
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sse_any_bytes(data in prop::collection::vec(any::<u8>(), 0..4096), max in 1usize..600) {
        let _ = fuzzing::sse(&data, max);
    }

    #[test]
    fn sse_structured_lines(
        lines in prop::collection::vec(
            (prop::sample::select(vec!["data", "event", "id", "retry", "", ":", "dat"]), "[ -~]{0,200}", prop::sample::select(vec!["\n", "\r\n", "", "\n\n"])),
            0..40,
        ),
        seed in any::<u8>(),
        max in 1usize..300,
    ) {
        let mut data = vec![seed];
        for (field, value, end) in lines {
            data.extend_from_slice(format!("{field}: {value}{end}").as_bytes());
        }
        match fuzzing::sse(&data, max) {
            Ok(events) => for e in events {
                prop_assert!(e.data.len() <= max);
            },
            Err(message) => prop_assert!(message.contains("max_event_bytes")),
        }
    }
}

// === Stream translators ===

#[test]
fn anthropic_stream_seeds_translate() {
    let seeds = corpus("anthropic_stream");
    for (_, data) in &seeds {
        check_stream(&fuzzing::anthropic_stream(data));
    }
    let last = |name: &str| fuzzing::anthropic_stream(seed(&seeds, name)).pop();
    assert!(matches!(
        last("text_with_ping"),
        Some(Ok(StreamEvent::Stop(StopReason::EndTurn)))
    ));
    assert!(matches!(
        last("thinking_and_tool_use"),
        Some(Ok(StreamEvent::Stop(StopReason::ToolUse)))
    ));
    assert!(matches!(
        last("refusal"),
        Some(Ok(StreamEvent::Stop(StopReason::Refusal)))
    ));
    assert!(matches!(
        last("pause_turn"),
        Some(Ok(StreamEvent::Stop(StopReason::MaxTokens)))
    ));
    assert!(matches!(last("overloaded_error_after_start"), Some(Err(_))));
}

#[test]
fn openai_and_databricks_stream_seeds_translate() {
    for target in ["openai_stream", "databricks_stream"] {
        for (_, data) in corpus(target) {
            check_stream(&fuzzing::openai_stream(&data));
        }
    }
    let seeds = corpus("openai_stream");
    let last = |name: &str| fuzzing::openai_stream(seed(&seeds, name)).pop();
    assert!(matches!(
        last("text_usage_done"),
        Some(Ok(StreamEvent::Stop(StopReason::EndTurn)))
    ));
    assert!(matches!(
        last("tool_calls_done"),
        Some(Ok(StreamEvent::Stop(StopReason::ToolUse)))
    ));
    assert!(matches!(
        last("content_filter"),
        Some(Ok(StreamEvent::Stop(StopReason::ContentFilter)))
    ));
    let seeds = corpus("databricks_stream");
    assert!(matches!(
        fuzzing::openai_stream(seed(&seeds, "text_usage_done")).pop(),
        Some(Ok(StreamEvent::Stop(StopReason::EndTurn)))
    ));
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn anthropic_stream_any_events(
        events in prop::collection::vec(anthropic_event(), 0..24),
        seed in any::<u8>(),
        crlf in any::<bool>(),
    ) {
        let events = events.into_iter().map(|(n, v)| (n, v.to_string())).collect();
        fuzzing::anthropic_stream(&sse_body(events, seed, crlf, false));
    }

    #[test]
    fn openai_stream_any_chunks(
        chunks in prop::collection::vec(openai_chunk(), 0..24),
        seed in any::<u8>(),
        done in any::<bool>(),
    ) {
        let events = chunks.into_iter().map(|v| (String::new(), v.to_string())).collect();
        fuzzing::openai_stream(&sse_body(events, seed, false, done));
    }

    #[test]
    fn streams_any_bytes(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        fuzzing::anthropic_stream(&data);
        fuzzing::openai_stream(&data);
    }
}

// === Whole responses and error bodies ===

#[test]
fn response_seeds_parse() {
    for (name, data) in corpus("anthropic_response") {
        let (status, body) = fuzzing::split_status(&data);
        assert!((100..600).contains(&status), "{name}");
        fuzzing::anthropic_response(status, body);
    }
    for target in ["openai_response", "databricks_response"] {
        for (_, data) in corpus(target) {
            let (status, body) = fuzzing::split_status(&data);
            fuzzing::openai_response(status, body);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn responses_any_json(
        status in 100u16..600,
        n1 in number(),
        n2 in number(),
        t in text(),
        stop in prop::sample::select(vec!["end_turn", "refusal", "stop", "content_filter", "length"]),
        kind in prop::sample::select(vec!["invalid_request_error", "overloaded_error", "authentication_error", "x"]),
        code in prop::sample::select(vec!["context_length_exceeded", "content_policy_violation", "insufficient_quota", "invalid_api_key", ""]),
    ) {
        let bodies = [
            json!({"id": t, "model": "m", "content": [{"type": "text", "text": t}, {"type": "tool_use", "id": t, "name": t, "input": t}], "stop_reason": stop, "usage": {"input_tokens": n1, "output_tokens": n2}}),
            json!({"choices": [{"message": {"content": t, "tool_calls": [{"id": t, "function": {"name": t, "arguments": t}}]}, "finish_reason": stop}], "usage": {"prompt_tokens": n1, "completion_tokens": n2}}),
            json!({"type": "error", "error": {"type": kind, "message": format!("{t} {}", fuzzing::FUZZ_KEY)}}),
            json!({"error": {"message": format!("{} {t}", fuzzing::FUZZ_KEY), "type": kind, "code": code}}),
            json!({"error": t, "message": t}),
        ];
        for body in bodies {
            let bytes = body.to_string().into_bytes();
            fuzzing::anthropic_response(status, &bytes);
            fuzzing::openai_response(status, &bytes);
        }
    }

    #[test]
    fn responses_any_bytes(status in 100u16..600, data in prop::collection::vec(any::<u8>(), 0..1024)) {
        fuzzing::anthropic_response(status, &data);
        fuzzing::openai_response(status, &data);
    }
}

// === Upstream headers ===

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f64>().prop_map(|f| f.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i128>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "1e20",
            "1e25",
            "inf",
            "-inf",
            "NaN",
            "-0",
            "1e308",
            "1.7976931348623157e309",
            "true",
            "false"
        ])
        .prop_map(str::to_string),
        "([0-9]{0,20}(\\.[0-9]{0,6})?(h|m|s|ms|us|ns|µs|x|)){0,5}",
        "(Mon|Tue|Wed), [0-9]{1,2} (Jan|Oct|Dec) [0-9]{1,5} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
        "[ -~]{0,40}",
    ]
}

#[test]
fn header_seeds_parse() {
    for (_, data) in corpus("retry_headers") {
        let (status, rest) = fuzzing::split_status(&data);
        fuzzing::retry_hints(status, &fuzzing::header_lines(rest, ':'));
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn retry_headers_any_values(
        headers in prop::collection::vec(
            (prop::sample::select(vec!["retry-after", "retry-after-ms", "x-should-retry", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"]), header_value()),
            0..8,
        ),
        status in prop::sample::select(vec![429u16, 503, 500, 200]),
    ) {
        let headers: Vec<(String, String)> = headers.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        fuzzing::retry_hints(status, &headers);
        for (_, value) in &headers {
            fuzzing::go_duration(value);
        }
    }
}

// === Request metadata ===

#[test]
fn metadata_seeds_parse() {
    for (name, data) in corpus("metadata") {
        let pairs = fuzzing::header_lines(&data, ':');
        let result = fuzzing::metadata(&pairs);
        assert_eq!(result.is_err(), name == "bad", "{name}: {result:?}");
        let _ = fuzzing::retry_overrides(&pairs);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn metadata_any_values(
        pairs in prop::collection::vec(
            (
                prop_oneof![
                    prop::sample::select(vec![
                        "x-retry-max-attempts", "x-retry-initial-backoff-ms", "x-retry-max-backoff-ms",
                        "x-retry-backoff-multiplier", "x-retry-per-try-timeout-ms", "x-retry-on",
                        "grpc-timeout", "grpc-previous-rpc-attempts", "x-fallback-providers",
                        "x-stream-resume", "x-hedge-after-ms",
                    ]).prop_map(str::to_string),
                    "x-retry-[a-z-]{0,12}",
                ],
                prop_oneof![
                    header_value(),
                    "(rate-limited|overloaded|auth|none|server-error|bogus)(,(rate-limited|timeout|x))*",
                    "[0-9]{1,9}[HMSmun]",
                ],
            ),
            0..8,
        ),
    ) {
        // An error is INVALID_ARGUMENT naming a key (checked inside).
        let _ = fuzzing::metadata(&pairs);
        if let Err(message) = fuzzing::retry_overrides(&pairs) {
            prop_assert!(message.contains("x-retry-"), "{}", message);
        }
    }
}

// === Configuration ===

fn config_error_is_clear(message: &str) -> bool {
    message.starts_with("config") || message.starts_with("environment variable")
}

#[test]
fn config_seeds_load() {
    for (name, data) in corpus("config_toml") {
        let text = String::from_utf8(data).unwrap();
        let result = fuzzing::config_toml(&text);
        assert!(result.is_ok(), "{name}: {result:?}");
    }
    for (name, data) in corpus("config_env") {
        let result = fuzzing::config_env(&fuzzing::header_lines(&data, '='));
        assert!(result.is_ok(), "{name}: {result:?}");
    }
}

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| if f.is_finite() {
            format!("{f:?}")
        } else {
            "nan".into()
        }),
        any::<bool>().prop_map(|b| b.to_string()),
        "\"[ -!#-\\[\\]-~]{0,24}\"",
        Just("[\"rate-limited\", \"auth\"]".to_string()),
        Just("{ provider = \"m\", model = \"a/b\" }".to_string()),
        Just("\"0.0.0.0:50051\"".to_string()),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_toml_any_keys(
        sections in prop::collection::vec(
            (
                prop::sample::select(vec!["", "retry", "retry.limits", "limits", "telemetry", "auth", "providers.m", "providers.a", "providers.d", "providers.m.retry", "providers.m.breaker", "tls"]),
                prop::collection::vec(
                    (
                        prop::sample::select(vec![
                            "kind", "model", "base_url", "max_attempts", "initial_backoff_ms", "max_backoff_ms",
                            "backoff_multiplier", "retry_on", "max_event_bytes", "max_body_bytes", "ca_file",
                            "fallback", "listen", "default_provider", "failure_ratio", "window_ms", "api_key_env",
                            "log_format", "admin_listen", "max_request_bytes", "reply", "fail_class", "bogus",
                        ]),
                        toml_value(),
                    ),
                    0..6,
                ),
            ),
            0..6,
        ),
    ) {
        let mut text = String::new();
        for (section, keys) in sections {
            if !section.is_empty() {
                text.push_str(&format!("[{section}]\n"));
            }
            for (key, value) in keys {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
        if let Err(message) = fuzzing::config_toml(&text) {
            prop_assert!(config_error_is_clear(&message), "{}", message);
        }
    }

    #[test]
    fn config_toml_any_text(text in "\\PC{0,400}") {
        if let Err(message) = fuzzing::config_toml(&text) {
            prop_assert!(config_error_is_clear(&message), "{}", message);
        }
    }

    #[test]
    fn config_env_any_vars(
        vars in prop::collection::vec(
            (
                prop_oneof![
                    "GATEWAY_(LISTEN|RETRY__MAX_ATTEMPTS|PROVIDERS__MOCK__MODEL|SERVICE_HOST|SERVICE_PORT|SERVICE_PORT_GRPC|PORT|PORT_50051_TCP|PORT_50051_TCP_(PROTO|PORT|ADDR)|X_SERVICE_HOST|[A-Z_]{0,20})",
                    prop::sample::select(vec!["ANTHROPIC_API_KEY", "DATABRICKS_HOST", "DATABRICKS_TOKEN", "OPENAI_API_KEY"]).prop_map(str::to_string),
                ],
                prop_oneof![
                    header_value(),
                    Just("tcp://10.0.0.1:50051".to_string()),
                    Just("10.0.0.1".to_string()),
                    Just("tcp".to_string()),
                ],
            ),
            0..8,
        ),
    ) {
        if let Err(message) = fuzzing::config_env(&vars) {
            prop_assert!(config_error_is_clear(&message), "{}", message);
        }
    }
}

// === Model names ===

#[test]
fn model_name_seeds_check() {
    for (name, data) in corpus("model_name") {
        let model = String::from_utf8(data).unwrap();
        let result = fuzzing::model_name("databricks", &model);
        // Only the plain endpoint-like name is a Databricks endpoint name.
        assert_eq!(result.is_ok(), name == "claude", "{name}: {result:?}");
        let result = fuzzing::model_name("openai", &model);
        assert_eq!(result.is_ok(), name != "traversal", "{name}: {result:?}");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn model_names_any_text(model in "\\PC{0,300}", ascii in "[ -~]{0,40}") {
        for kind in ["anthropic", "openai", "databricks", "mock"] {
            let _ = fuzzing::model_name(kind, &model);
            let _ = fuzzing::model_name(kind, &ascii);
        }
    }
}
