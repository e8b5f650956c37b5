//! A pool against a single key when one key is throttled (issue 13).
//!
//! The upstream (Anthropic-shaped, on 127.0.0.1) answers every second
//! request made with key `k0` with a 429 and `retry-after-ms: 20`; the
//! other keys are never throttled. 1,000 sequential Complete calls go
//! through a gateway whose provider is a pool of four keys (`k0`..`k3`),
//! then through one whose provider has the throttled key alone. Printed:
//! the 429s the upstream sent and each call's latency (p50, p99, mean).
//!
//! cargo bench -p provider-gateway-server --bench pools

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use provider_gateway_client::{CallOptions, GatewayClient, request};
use provider_gateway_server::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CALLS: usize = 1_000;
const BODY: &str = r#"{"id":"m","model":"claude","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":1}}"#;
const LIMITED: &str =
    r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;

/// The upstream; returns its URL and the count of 429s it sent.
async fn upstream() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limited = Arc::new(AtomicU64::new(0));
    let k0_calls = Arc::new(AtomicU64::new(0));
    let counter = limited.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            let (limited, k0_calls) = (counter.clone(), k0_calls.clone());
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(8192);
                let mut tmp = [0u8; 8192];
                loop {
                    let (head_end, length, head) = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (i + 4, length, head);
                        }
                        match socket.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    while buf.len() < head_end + length {
                        match socket.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    buf.drain(..head_end + length);
                    let throttled = head.lines().any(|l| l.trim() == "x-api-key: k0")
                        && k0_calls.fetch_add(1, Ordering::Relaxed) % 2 == 1;
                    let response = if throttled {
                        limited.fetch_add(1, Ordering::Relaxed);
                        format!(
                            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after-ms: 20\r\ncontent-length: {}\r\n\r\n{LIMITED}",
                            LIMITED.len()
                        )
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
                            BODY.len()
                        )
                    };
                    if socket.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), limited)
}

async fn gateway(toml: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let env: HashMap<String, String> = (0..4).map(|i| (format!("K{i}"), format!("k{i}"))).collect();
    let config = Config::from_toml(&format!("http_listen = \"\"\n{toml}")).unwrap();
    tokio::spawn(async move {
        provider_gateway_server::serve(listener, config, &env, std::future::pending())
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

/// `CALLS` calls; their latencies, sorted, and how many failed.
async fn run(url: &str) -> (Vec<Duration>, usize) {
    let mut client = loop {
        match GatewayClient::connect(url.to_string()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let options = CallOptions::new();
    let mut took = Vec::with_capacity(CALLS);
    let mut failed = 0;
    for _ in 0..CALLS {
        let started = Instant::now();
        if client
            .complete(request::user("hi"), &options)
            .await
            .is_err()
        {
            failed += 1;
        }
        took.push(started.elapsed());
    }
    took.sort();
    (took, failed)
}

fn row(label: &str, took: &[Duration], failed: usize, limited: u64) {
    let at = |p: f64| took[((took.len() as f64 * p) as usize).min(took.len() - 1)];
    let mean = took.iter().sum::<Duration>() / took.len() as u32;
    println!(
        "{label:<26} 429s seen {limited:>5}  failed {failed:>4}  p50 {:>7.3} ms  p99 {:>7.3} ms  mean {:>7.3} ms",
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e3
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let provider = |keys: &str, base: &str| {
            format!(
                "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\nbase_url = \"{base}\"\napi_key_env = {keys}\n\
                 [providers.p.retry]\nmax_attempts = 4\ninitial_backoff_ms = 1\nmax_backoff_ms = 5\n"
            )
        };
        println!("provider-gateway pools: {CALLS} sequential calls, key k0 answers every second request 429 (retry-after-ms: 20)");
        let (base, limited) = upstream().await;
        let pooled = gateway(provider("[\"K0\", \"K1\", \"K2\", \"K3\"]", &base)).await;
        let (took, failed) = run(&pooled).await;
        let pool_429 = limited.swap(0, Ordering::Relaxed);
        row("pool of 4 keys (p2c)", &took, failed, pool_429);
        let single = gateway(provider("\"K0\"", &base)).await;
        let (took_single, failed_single) = run(&single).await;
        let single_429 = limited.load(Ordering::Relaxed);
        row("the throttled key alone", &took_single, failed_single, single_429);
        let mean = |t: &[Duration]| t.iter().sum::<Duration>().as_secs_f64() / t.len() as f64 * 1e3;
        println!(
            "pools: calls={CALLS} pool_429s={pool_429} single_429s={single_429} mean_ms_pool={:.3} mean_ms_single={:.3} added_ms_single_over_pool={:.3}",
            mean(&took),
            mean(&took_single),
            mean(&took_single) - mean(&took)
        );
    });
}
