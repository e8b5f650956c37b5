//! The `embedded` provider (cargo feature `embedded`): a tiny GGUF model,
//! written at test time with random weights, run inside the gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use provider_gateway_client::{CallOptions, StopReason, StreamEvent, request, v1};
use provider_gateway_server::Registry;
use provider_gateway_server::chat::{ChatRequest, Content, Message, Role};
use provider_gateway_server::config::{EmbeddedConfig, RetryConfig};
use provider_gateway_server::providers::Provider;
use provider_gateway_server::providers::embedded::tiny::{TinyArchitecture, TinyModel};
use provider_gateway_server::providers::embedded::{CHANNEL_CAPACITY, EmbeddedProvider};
use provider_gateway_server::registry::RegisteredProvider;
use provider_gateway_server::retry::{RetryLimits, RetryPolicy};
use tonic::Code;

use crate::anthropic::drain;
use crate::support::{Gateway, eventually};

/// A fresh directory for one test's files.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pg-embedded-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes the default tiny model (llama, 2 blocks, 64 wide) for `test`.
fn tiny_model(test: &str) -> PathBuf {
    let path = temp_dir(test).join("tiny-llama.gguf");
    TinyModel::default().write(&path).unwrap();
    path
}

/// One llama.cpp thread per session: tests run side by side on few cores,
/// and llama.cpp's threads spin at a barrier for each other at every
/// token, so two threads in each of several test processes make every
/// token wait on the scheduler (the CI once saw 24 tokens take seconds).
fn config(path: &Path, extra: &str) -> String {
    format!(
        "default_provider = \"local\"\n[providers.local]\nkind = \"embedded\"\nmodel_path = \"{}\"\nthreads = 1\n{extra}\n",
        path.display()
    )
}

fn with_max_tokens(text: &str, n: u32) -> v1::CompleteRequest {
    let mut r = request::user(text);
    r.max_tokens = Some(n);
    r
}

fn texts(events: &[StreamEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::Text { text, .. } => Some(text.clone()),
            _ => None,
        })
        .collect()
}

fn usage(events: &[StreamEvent]) -> Option<v1::Usage> {
    events.iter().find_map(|e| match e {
        StreamEvent::Usage(u) => Some(*u),
        _ => None,
    })
}

#[tokio::test]
async fn embedded_complete_returns_max_tokens_and_the_same_seed_gives_the_same_text() {
    let path = tiny_model("complete");
    let gw = Gateway::start(&config(&path, "seed = 7"), &[]).await;
    let mut client = gw.client().await;
    let first = client
        .complete(with_max_tokens("tell me a story", 12), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(first.stop_reason(), StopReason::MaxTokens);
    let usage = first.response.usage.unwrap();
    assert_eq!(usage.output_tokens, 12);
    assert!(usage.input_tokens > 4, "{usage:?}");
    assert!(!first.text().is_empty());
    assert_eq!(first.provider, "local");
    assert_eq!(first.response.model, "tiny-llama");

    let again = client
        .complete(with_max_tokens("tell me a story", 12), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(again.text(), first.text(), "same seed, same request");

    // The system prompt is part of the rendered prompt.
    let mut with_system = with_max_tokens("tell me a story", 12);
    with_system.system = "You are terse and never tell stories.".into();
    let answer = client
        .complete(with_system, &CallOptions::new())
        .await
        .unwrap();
    assert!(answer.response.usage.unwrap().input_tokens > usage.input_tokens + 5);

    let other_seed = Gateway::start(&config(&path, "seed = 8"), &[]).await;
    let other = other_seed
        .client()
        .await
        .complete(with_max_tokens("tell me a story", 12), &CallOptions::new())
        .await
        .unwrap();
    assert_ne!(other.text(), first.text(), "another seed, another text");
}

#[tokio::test]
async fn embedded_stream_delivers_tokens_one_by_one() {
    let path = tiny_model("stream");
    // The prefix cache would run the second call's prompt in a different
    // batch shape than the first: the same seed then gives the same text
    // only up to float rounding (as with llama.cpp's own prompt cache).
    let gw = Gateway::start(&config(&path, "seed = 11\nprefix_cache = false"), &[]).await;
    let mut client = gw.client().await;
    let (events, status) = drain(
        client
            .stream(with_max_tokens("stream please", 10), &CallOptions::new())
            .await
            .unwrap(),
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    assert!(matches!(events.first(), Some(StreamEvent::Start { .. })));
    assert_eq!(
        events.last(),
        Some(&StreamEvent::Stop(StopReason::MaxTokens))
    );
    let deltas = texts(&events);
    assert_eq!(deltas.len(), 10, "one text delta per token: {deltas:?}");
    assert!(deltas.iter().all(|d| !d.is_empty()));
    assert_eq!(usage(&events).unwrap().output_tokens, 10);

    // Streamed or whole, the same seed gives the same text.
    let whole = client
        .complete(with_max_tokens("stream please", 10), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(whole.text(), deltas.concat());
}

#[tokio::test]
async fn embedded_stop_sequence_ends_generation() {
    let path = tiny_model("stop");
    let gw = Gateway::start(&config(&path, "seed = 3\ntemperature = 0.0"), &[]).await;
    let mut client = gw.client().await;
    let full = client
        .complete(with_max_tokens("hello", 16), &CallOptions::new())
        .await
        .unwrap()
        .text();
    // Stop at the text of the third generated word.
    let words: Vec<&str> = full.split(' ').filter(|w| !w.is_empty()).collect();
    let stop = words[2].to_string();
    let mut req = with_max_tokens("hello", 16);
    req.stop_sequences = vec![stop.clone()];
    let cut = client.complete(req, &CallOptions::new()).await.unwrap();
    assert_eq!(cut.stop_reason(), StopReason::StopSequence);
    assert_eq!(cut.text(), full[..full.find(&stop).unwrap()]);
    assert!(cut.response.usage.unwrap().output_tokens < 16);
}

#[tokio::test]
async fn embedded_list_providers_shows_the_model_file() {
    let path = tiny_model("list");
    let gw = Gateway::start(
        &config(&path, "context_length = 1024\nmodel = \"tiny\""),
        &[],
    )
    .await;
    let list = gw.client().await.providers().await.unwrap();
    assert_eq!(
        list.providers,
        [v1::ProviderInfo {
            name: "local".into(),
            kind: "embedded".into(),
            default_model: "tiny".into(),
            local_model: Some(v1::LocalModel {
                file_name: "tiny-llama.gguf".into(),
                parameter_count: TinyModel::default().parameter_count(),
                context_length: 1024,
            }),
            members: vec![],
        }]
    );
}

#[tokio::test]
async fn embedded_qwen2_model_with_a_bpe_vocabulary_and_its_own_template() {
    let path = temp_dir("qwen2").join("tiny-qwen2.gguf");
    TinyModel {
        architecture: TinyArchitecture::Qwen2,
        chat_template: Some(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                .into(),
        ),
        ..TinyModel::default()
    }
    .write(&path)
    .unwrap();
    let gw = Gateway::start(&config(&path, "seed = 5\nmax_tokens = 6"), &[]).await;
    let mut client = gw.client().await;
    let answer = client
        .complete(request::user("the word"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.stop_reason(), StopReason::MaxTokens);
    let usage = answer.response.usage.unwrap();
    assert_eq!(usage.output_tokens, 6, "the configured max_tokens");
    // <|im_start|> u s e r \n t h e Ġword <|im_end|> \n <|im_start|>
    // a s s i s t a n t \n: specials are single tokens, and only the tiny
    // vocabulary's space-led words have merges.
    assert_eq!(usage.input_tokens, 23, "{usage:?}");
    let list = client.providers().await.unwrap();
    let local = list.providers[0].local_model.clone().unwrap();
    assert_eq!(local.file_name, "tiny-qwen2.gguf");
    assert_eq!(
        local.parameter_count,
        TinyModel {
            architecture: TinyArchitecture::Qwen2,
            ..TinyModel::default()
        }
        .parameter_count()
    );
}

/// The provider, built directly so the test can hold sessions and read its
/// counters, registered in a gateway under `local`.
async fn gateway_with(path: &Path, c: EmbeddedConfig) -> (Arc<EmbeddedProvider>, Gateway) {
    let c = EmbeddedConfig {
        model_path: path.display().to_string(),
        seed: Some(1),
        // As in `config`: one thread, so side-by-side tests do not starve.
        threads: c.threads.or(Some(1)),
        ..c
    };
    let provider = Arc::new(EmbeddedProvider::new("local", &c).unwrap());
    let policy = RetryPolicy::resolve(&RetryConfig::default(), c.retry.as_ref(), "retry").unwrap();
    let registry = Registry::from_providers(
        vec![RegisteredProvider::new("local", provider.clone(), policy)],
        "local",
        RetryLimits::default(),
    );
    (provider, Gateway::start_registry(registry).await)
}

fn chat(text: &str, max_tokens: u32) -> ChatRequest {
    ChatRequest {
        messages: vec![Message {
            role: Role::User,
            content: vec![Content::Text(text.into())],
        }],
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

/// Reads `events` until `n` text deltas have come; any end before is a
/// failure.
pub(crate) async fn take_text_deltas(
    events: &mut provider_gateway_server::providers::EventStream,
    n: usize,
) {
    let mut deltas = 0;
    while deltas < n {
        match events.next().await {
            Some(Ok(provider_gateway_server::chat::StreamEvent::Text { .. })) => deltas += 1,
            Some(Ok(_)) => {}
            other => panic!("the stream ended early: {other:?}"),
        }
    }
}

#[tokio::test]
async fn embedded_cancelled_stream_stops_generation_and_frees_its_session() {
    let path = tiny_model("cancel");
    let (provider, gw) = gateway_with(
        &path,
        EmbeddedConfig {
            max_sessions: Some(1),
            ..Default::default()
        },
    )
    .await;

    // In-process: a reader that takes 3 deltas and goes away. Generation
    // runs at most the channel's capacity ahead of it, then stops.
    let req = chat("go on forever", 1500);
    let mut events = provider.stream(&req).await.unwrap();
    take_text_deltas(&mut events, 3).await;
    drop(events);
    eventually("the session is free", Duration::from_secs(5), || {
        provider.busy_sessions() == 0
    })
    .await;
    let generated = provider.generated_tokens();
    assert!(
        generated <= (3 + CHANNEL_CAPACITY + 2) as u64,
        "generated {generated} tokens for a reader that took 3"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(provider.generated_tokens(), generated, "generation stopped");

    // Over gRPC: the caller drops the stream; generation stops short of
    // max_tokens and the session serves the next request.
    let before = provider.generated_tokens();
    let mut client = gw.client().await;
    let mut stream = client
        .stream(with_max_tokens("go on forever", 2000), &CallOptions::new())
        .await
        .unwrap();
    let mut got = 0;
    while got < 3 {
        match stream.next().await {
            Some(Ok(StreamEvent::Text { .. })) => got += 1,
            Some(Ok(_)) => {}
            other => panic!("the stream ended early: {other:?}"),
        }
    }
    drop(stream);
    eventually("the session is free", Duration::from_secs(5), || {
        provider.busy_sessions() == 0
    })
    .await;
    let after = provider.generated_tokens();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(provider.generated_tokens(), after, "generation stopped");
    assert!(after - before < 2000, "cancelled before max_tokens");
    let next = client
        .complete(with_max_tokens("next", 4), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(next.response.usage.unwrap().output_tokens, 4);
}

/// A caller that stops reading holds its session at most
/// `reader_timeout_ms`: the session then serves others, and the stalled
/// caller, reading on, gets what was sent and then `cancelled` naming the
/// wait. A caller that reads slowly but keeps reading is never cut.
#[tokio::test]
async fn embedded_caller_that_stops_reading_frees_its_session_after_the_reader_timeout() {
    use provider_gateway_server::chat::StreamEvent as Event;
    use provider_gateway_server::error::ErrorClass;
    let path = tiny_model("stalled-reader");
    let (provider, gw) = gateway_with(
        &path,
        EmbeddedConfig {
            max_sessions: Some(1),
            reader_timeout_ms: Some(300),
            ..Default::default()
        },
    )
    .await;

    // The reader timeout starts when the channel is first full, which is
    // after the stream has started: timed from here, the wait is at least
    // the timeout however the test is scheduled.
    let waited = Instant::now();
    let mut stalled = provider.stream(&chat("go on forever", 1500)).await.unwrap();
    take_text_deltas(&mut stalled, 1).await;
    // Not reading now: the channel fills, and after the reader timeout the
    // session is free again.
    eventually("the session is free", Duration::from_secs(10), || {
        provider.busy_sessions() == 0
    })
    .await;
    assert!(
        waited.elapsed() >= Duration::from_millis(300),
        "freed after {:?}, before the reader timeout",
        waited.elapsed()
    );
    let generated = provider.generated_tokens();
    assert!(
        generated <= (1 + CHANNEL_CAPACITY + 2) as u64,
        "generated {generated} tokens for a reader that took 1"
    );
    let mut client = gw.client().await;
    let next = client
        .complete(with_max_tokens("next", 4), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(next.response.usage.unwrap().output_tokens, 4);

    // The stalled caller reads on: the text that was sent, then the reason.
    let mut texts = 0;
    let error = loop {
        match stalled.next().await {
            Some(Ok(Event::Text { .. })) => texts += 1,
            Some(Ok(other)) => panic!("no end may follow a stall: {other:?}"),
            Some(Err(e)) => break e,
            None => panic!("the stream ended without saying why"),
        }
    };
    assert!(texts <= CHANNEL_CAPACITY + 1, "{texts}");
    assert_eq!(error.class, ErrorClass::Cancelled, "{error:?}");
    assert!(
        error.message.contains("read nothing for 300 ms"),
        "{}",
        error.message
    );
    assert!(stalled.next().await.is_none());

    // A slow reader that keeps reading (a delta every 30 ms, well under
    // the 300 ms timeout, once the channel is full) gets the whole answer.
    let mut slow = provider.stream(&chat("slow", 24)).await.unwrap();
    let mut ended = None;
    while let Some(event) = slow.next().await {
        match event.unwrap() {
            Event::Stop(stop) => ended = Some(stop),
            _ => tokio::time::sleep(Duration::from_millis(30)).await,
        }
    }
    assert!(ended.is_some(), "the slow reader got its stop");
}

#[tokio::test]
async fn embedded_busy_sessions_fail_as_busy_without_retries() {
    let path = tiny_model("busy");
    let (provider, gw) = gateway_with(
        &path,
        EmbeddedConfig {
            max_sessions: Some(1),
            queue_wait_ms: Some(50),
            retry: Some(RetryConfig {
                max_attempts: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    // The first request holds the only session: its reader is slow, so
    // generation waits for it once the channel is full.
    let req = chat("first", CHANNEL_CAPACITY as u32 + 8);
    let mut first = provider.stream(&req).await.unwrap();
    assert!(first.next().await.is_some());
    assert_eq!(provider.busy_sessions(), 1);

    let mut client = gw.client().await;
    let started = Instant::now();
    let err = client
        .complete(with_max_tokens("second", 4), &CallOptions::new())
        .await
        .unwrap_err();
    let waited = started.elapsed();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("busy"), "{}", status.message());
    assert!(
        status.message().contains("1 attempt"),
        "{}",
        status.message()
    );
    assert!(waited >= Duration::from_millis(50), "queued {waited:?}");

    // Once the first has finished, the session serves again.
    let mut stop = None;
    while let Some(event) = first.next().await {
        if let provider_gateway_server::chat::StreamEvent::Stop(s) = event.unwrap() {
            stop = Some(s);
        }
    }
    assert_eq!(
        stop,
        Some(provider_gateway_server::chat::StopReason::MaxTokens)
    );
    // Freed before its end was sent: the next request never races it.
    assert_eq!(provider.busy_sessions(), 0);
    let answer = client
        .complete(with_max_tokens("second", 4), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.attempts, 1);
}

#[tokio::test]
async fn embedded_busy_is_retried_by_the_policy_until_the_session_is_free() {
    let path = tiny_model("busy-retry");
    let (provider, gw) = gateway_with(
        &path,
        EmbeddedConfig {
            max_sessions: Some(1),
            queue_wait_ms: Some(1000),
            // Generous: on a loaded machine the first stream takes a while
            // to drain, and each busy attempt costs its 1 s queue wait, so
            // the second call outlasts the first by some 20 s.
            retry: Some(RetryConfig {
                max_attempts: Some(20),
                initial_backoff_ms: Some(10),
                max_backoff_ms: Some(50),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let req = chat("first", CHANNEL_CAPACITY as u32 + 8);
    let mut first = provider.stream(&req).await.unwrap();
    assert!(first.next().await.is_some());

    let mut client = gw.client().await;
    let second = tokio::spawn(async move {
        client
            .complete(with_max_tokens("second", 4), &CallOptions::new())
            .await
    });
    // Once the second request has been refused busy (each attempt queues
    // 1 s), let the first finish: it was paused on its full channel, so
    // it ends within a few tokens, well inside the second's 20 attempts.
    eventually(
        "the second call is refused busy",
        Duration::from_secs(10),
        || provider.refused_busy() >= 1,
    )
    .await;
    while let Some(event) = first.next().await {
        event.unwrap();
    }
    drop(first);
    let answer = second.await.unwrap().unwrap();
    assert_eq!(answer.stop_reason(), StopReason::MaxTokens);
    assert!(
        (2..=20).contains(&answer.attempts),
        "attempts: {}",
        answer.attempts
    );
}

#[tokio::test]
async fn embedded_start_up_fails_naming_a_missing_or_non_gguf_file() {
    let dir = temp_dir("bad-files");
    let missing = dir.join("nowhere.gguf");
    let err = provider_gateway_server::Config::from_toml(&config(&missing, ""))
        .and_then(|c| Registry::from_config(&c, &std::collections::HashMap::new()))
        .unwrap_err();
    assert!(err.0.contains(&missing.display().to_string()), "{err}");
    assert!(err.0.contains("providers.local.model_path"), "{err}");

    let not_gguf = dir.join("model.bin");
    std::fs::write(&not_gguf, b"this is not a model, just some bytes").unwrap();
    let err = provider_gateway_server::Config::from_toml(&config(&not_gguf, ""))
        .and_then(|c| Registry::from_config(&c, &std::collections::HashMap::new()))
        .unwrap_err();
    assert!(err.0.contains(&not_gguf.display().to_string()), "{err}");
    assert!(err.0.contains("not a GGUF file"), "{err}");

    // The binary refuses to start with the same message.
    let config_file = dir.join("gateway.toml");
    std::fs::write(&config_file, config(&not_gguf, "")).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_provider-gateway"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config_file)
        .env_remove("GATEWAY_CONFIG")
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a GGUF file"), "{stderr}");
    assert!(stderr.contains(&not_gguf.display().to_string()), "{stderr}");
}

#[tokio::test]
async fn embedded_context_too_long_and_tools_are_refused() {
    let path = tiny_model("refusals");
    let gw = Gateway::start(&config(&path, "context_length = 32"), &[]).await;
    let mut client = gw.client().await;
    let long = "word ".repeat(100);
    let err = client
        .complete(request::user(long), &CallOptions::new())
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("context"), "{}", status.message());

    let mut req = request::user("use a tool");
    req.tools = vec![request::tool("search", "", r#"{"type":"object"}"#)];
    req.tool_choice = Some(v1::ToolChoice {
        mode: v1::tool_choice::Mode::Any as i32,
        name: String::new(),
    });
    let status = client
        .complete(req, &CallOptions::new())
        .await
        .unwrap_err()
        .status()
        .cloned()
        .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("tools"), "{}", status.message());

    // Stop sequences are checked after every token: their number and
    // length are bounded, and the refusal names the field.
    let mut req = request::user("hello");
    req.stop_sequences = vec!["stop".into(); 17];
    let status = client
        .complete(req, &CallOptions::new())
        .await
        .unwrap_err()
        .status()
        .cloned()
        .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("stop_sequences: the embedded provider takes at most 16"),
        "{}",
        status.message()
    );
}
