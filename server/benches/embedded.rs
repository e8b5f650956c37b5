//! Tokens per second of the `embedded` provider, printed as figures.
//!
//! Writes the tiny test model (and a wider synthetic one, for scale) with
//! random Q8_0 weights, then times whole answers through the provider
//! (prompt, then one forward pass per token on the provider's threads) and
//! the time to the first token of a stream. Run with
//! `cargo bench -p provider-gateway-server --features embedded --bench embedded`.

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
}
