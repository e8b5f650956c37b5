//! Tokens per second of the `embedded` provider, printed as figures.
//!
//! Writes the tiny test model (and a wider synthetic one, for scale) with
//! random Q8_0 weights, then times whole answers through the provider
//! (prompt, then one forward pass per token on the provider's threads) and
//! the time to the first token of a stream. Run with
//! `cargo bench -p provider-gateway-server --features embedded --bench embedded`.
//!
//! With `PG_SMOLLM2_GGUF` set to SmolLM2-135M-Instruct's file (`bash
//! .ci/fetch-smollm2` prints its path) it also measures the real model the
//! way the issue does: greedy, [`REAL_TOKENS`] tokens, 2 threads,
//! [`REAL_ROUNDS`] rounds (medians): decode tokens/s, the first token of the
//! first call after loading (cold) and of the same prompt again (warm: the
//! prefix cache). Then it runs `llama_cpp_reference.py bench` (beside this
//! file) with `PG_LLAMA_CPP_PYTHON` (default `python3`, which must have
//! llama-cpp-python) on the same file, and its last line is
//! `embedded: decode_ratio=X ttft_ratio=Y` (ours / llama.cpp's decode
//! tokens/s; ours / llama.cpp's cold first-token time).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use provider_gateway_server::chat::{ChatRequest, Content, Message, Role, StreamEvent};
use provider_gateway_server::config::EmbeddedConfig;
use provider_gateway_server::providers::Provider;
use provider_gateway_server::providers::embedded::EmbeddedProvider;
use provider_gateway_server::providers::embedded::tiny::TinyModel;

const TOKENS: u32 = 256;
const RUNS: usize = 5;
/// Tokens per answer on the real model.
const REAL_TOKENS: u32 = 200;
/// Rounds on the real model (each loads the model afresh).
const REAL_ROUNDS: usize = 3;
/// The real model's prompt: the same as PROMPT in llama_cpp_reference.py.
const PROMPT: &str = "Tell me a long story about the sea and the wind.";

fn request(max_tokens: u32) -> ChatRequest {
    ChatRequest {
        system: "You are a helpful assistant.".into(),
        messages: vec![Message {
            role: Role::User,
            content: vec![Content::Text(
                "Tell me a long story about the sea and the wind.".into(),
            )],
        }],
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

async fn measure(label: &str, model: TinyModel) {
    let dir = std::env::temp_dir().join(format!("pg-embedded-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{label}.gguf"));
    model.write(&path).unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    let provider = EmbeddedProvider::new(
        label,
        &EmbeddedConfig {
            model_path: path.display().to_string(),
            seed: Some(1),
            ..Default::default()
        },
    )
    .unwrap();

    // Warm-up: first touches of the weights and the thread pool.
    provider.complete(&request(16)).await.unwrap();

    let mut tokens = 0u64;
    let started = Instant::now();
    for _ in 0..RUNS {
        let answer = provider.complete(&request(TOKENS)).await.unwrap();
        tokens += u64::from(answer.usage.output_tokens);
    }
    let elapsed = started.elapsed();

    let mut first = Duration::ZERO;
    for _ in 0..RUNS {
        let t = Instant::now();
        let mut events = provider.stream(&request(TOKENS)).await.unwrap();
        while let Some(event) = events.next().await {
            if let Ok(StreamEvent::Text { .. }) = event {
                first += t.elapsed();
                break;
            }
        }
    }
    println!(
        "{label:>6}: {:>6.1} M parameters, {:>5.1} MiB file: {:>7.0} tokens/s \
         ({tokens} tokens in {:.2} s, {TOKENS} per answer), first token after {:.1} ms",
        model.parameter_count() as f64 / 1e6,
        size as f64 / (1024.0 * 1024.0),
        tokens as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        first.as_secs_f64() * 1000.0 / RUNS as f64,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// One streamed answer: (time to the first token, decode tokens/s after
/// it, tokens).
async fn one_call(provider: &EmbeddedProvider, req: &ChatRequest) -> (Duration, f64, u32) {
    let start = Instant::now();
    let mut events = provider.stream(req).await.unwrap();
    let mut first = None;
    let mut tokens = 0;
    while let Some(event) = events.next().await {
        match event.unwrap() {
            StreamEvent::Text { .. } if first.is_none() => first = Some(Instant::now()),
            StreamEvent::Usage(u) => tokens = u.output_tokens,
            _ => {}
        }
    }
    let end = Instant::now();
    let first = first.expect("a token");
    let rate = f64::from(tokens.saturating_sub(1)) / (end - first).as_secs_f64();
    (first - start, rate, tokens)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The real model against llama.cpp on the same file, side by side.
async fn real_model(path: &str) {
    let req = ChatRequest {
        messages: vec![Message {
            role: Role::User,
            content: vec![Content::Text(PROMPT.into())],
        }],
        max_tokens: Some(REAL_TOKENS),
        temperature: Some(0.0),
        ..Default::default()
    };
    let (mut rates, mut colds, mut warms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REAL_ROUNDS {
        let provider = EmbeddedProvider::new(
            "smollm2",
            &EmbeddedConfig {
                model_path: path.into(),
                threads: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        let (cold, rate, tokens) = one_call(&provider, &req).await;
        colds.push(cold.as_secs_f64() * 1000.0);
        rates.push(rate);
        let (warm, rate, _) = one_call(&provider, &req).await;
        warms.push(warm.as_secs_f64() * 1000.0);
        rates.push(rate);
        println!(
            "smollm2 (ours): {tokens} tokens, decode {rate:.1} tokens/s, first token cold {:.1} ms, warm {:.1} ms",
            cold.as_secs_f64() * 1000.0,
            warm.as_secs_f64() * 1000.0
        );
    }
    let (rate, cold, warm) = (median(rates), median(colds), median(warms));
    println!(
        "smollm2 (ours, median): decode {rate:.1} tokens/s, first token cold {cold:.1} ms, warm {warm:.1} ms"
    );

    let python = std::env::var("PG_LLAMA_CPP_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/llama_cpp_reference.py"
    );
    let out = std::process::Command::new(&python)
        .args([script, "bench", path, "--threads", "2"])
        .args(["--tokens", &REAL_TOKENS.to_string()])
        .args(["--rounds", &REAL_ROUNDS.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output();
    let reference = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            println!(
                "llama.cpp reference failed ({}): install llama-cpp-python==0.3.36 for {python} or set PG_LLAMA_CPP_PYTHON",
                o.status
            );
            return;
        }
        Err(e) => {
            println!("cannot run {python}: {e}");
            return;
        }
    };
    let field = |name: &str| -> f64 {
        let line = reference.lines().last().unwrap_or("");
        let at = line
            .find(&format!("\"{name}\": "))
            .expect("a field of the reference");
        let rest = &line[at + name.len() + 4..];
        rest.split([',', '}'])
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (theirs_rate, theirs_cold, theirs_warm) = (
        field("decode_tokens_per_s"),
        field("ttft_cold_ms"),
        field("ttft_warm_ms"),
    );
    println!(
        "smollm2 (llama.cpp, median): decode {theirs_rate:.1} tokens/s, first token cold {theirs_cold:.1} ms, warm {theirs_warm:.1} ms"
    );
    println!(
        "embedded: decode_ratio={:.2} ttft_ratio={:.2}",
        rate / theirs_rate,
        cold / theirs_cold
    );
}

#[tokio::main]
async fn main() {
    println!(
        "embedded provider, {} CPU thread(s), one session",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    measure("tiny", TinyModel::default()).await;
    measure(
        "wide",
        TinyModel {
            layers: 8,
            embedding: 512,
            heads: 8,
            kv_heads: 8,
            feed_forward: 1536,
            ..TinyModel::default()
        },
    )
    .await;
    match std::env::var("PG_SMOLLM2_GGUF") {
        Ok(path) => real_model(&path).await,
        Err(_) => println!(
            "smollm2: skipped (set PG_SMOLLM2_GGUF=$(bash .ci/fetch-smollm2) to measure the real model)"
        ),
    }
}
