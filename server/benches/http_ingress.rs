//! The gateway's own cost per request, printed as figures.
//!
//! Three loops over loopback, each a fixed number of sequential requests
//! after a warm-up: a direct HTTP call to a minimal OpenAI-shaped upstream,
//! the same call through the gateway's `openai` provider (so the difference
//! is the gateway: gRPC in, validation, registry, HTTP out, translation), and
//! Complete against the built-in mock (no upstream at all). Then a
//! concurrent run for throughput. Then the HTTP ingress (OpenAI-compatible
//! `POST /v1/chat/completions` over HTTP/1.1 keep-alive) against the same
//! direct call, in the same run, at concurrency 1 and 32: the added p50 and
//! p99 and the requests per second of each. Run with
//! `cargo bench -p provider-gateway-server --bench http_ingress`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use provider_gateway_client::{CallOptions, GatewayClient, request};
use provider_gateway_server::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WARMUP: usize = 500;
const REQUESTS: usize = 5_000;
const CONCURRENCY: usize = 32;
const CONCURRENT_REQUESTS: usize = 20_000;

const BODY: &str = r#"{"id":"c","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello world"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;

/// A keep-alive HTTP/1.1 server answering every request with `BODY`.
async fn upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(8192);
                let mut tmp = [0u8; 8192];
                loop {
                    // Read one request: head, then content-length bytes.
                    let (head_end, length) = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (i + 4, length);
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
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
                        BODY.len()
                    );
                    if socket.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

async fn gateway(toml: String, env: HashMap<String, String>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // gRPC only: serve() would also bind the default http_listen.
    let config = Config::from_toml(&format!("http_listen = \"\"\n{toml}")).unwrap();
    tokio::spawn(async move {
        provider_gateway_server::serve(listener, config, &env, std::future::pending())
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

/// A gateway with its HTTP ingress on 127.0.0.1:0; returns the ingress URL.
async fn gateway_http(toml: String, env: HashMap<String, String>) -> String {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    let config = Config::from_toml(&toml).unwrap();
    let registry =
        std::sync::Arc::new(provider_gateway_server::Registry::from_config(&config, &env).unwrap());
    let options = provider_gateway_server::ServerOptions::from_config(&config, &env).unwrap();
    tokio::spawn(async move {
        provider_gateway_server::serve_listeners(
            grpc,
            Some(http),
            registry,
            options,
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    format!("http://{addr}")
}

/// `concurrency` callers making `total` requests in all through `url`
/// with `body`: every request's latency, and the requests per second.
async fn http_run(
    client: &reqwest::Client,
    url: &str,
    body: &'static str,
    concurrency: usize,
    total: usize,
) -> (Vec<Duration>, f64) {
    let call = move |client: reqwest::Client, url: String| async move {
        let t = Instant::now();
        let r = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.bytes().await.unwrap();
        t.elapsed()
    };
    for _ in 0..WARMUP {
        call(client.clone(), url.to_string()).await;
    }
    let per_task = total / concurrency;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(per_task);
                for _ in 0..per_task {
                    samples.push(call(client.clone(), url.clone()).await);
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(total);
    for t in tasks {
        samples.extend(t.await.unwrap());
    }
    let rps = samples.len() as f64 / started.elapsed().as_secs_f64();
    (samples, rps)
}

fn percentiles(label: &str, mut samples: Vec<Duration>) -> [Duration; 3] {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    let (p50, p90, p99) = (at(0.50), at(0.90), at(0.99));
    println!(
        "{label:<34} p50 {:>8.1} us   p90 {:>8.1} us   p99 {:>8.1} us",
        p50.as_secs_f64() * 1e6,
        p90.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    [p50, p90, p99]
}

async fn time_loop<F, Fut>(mut call: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..WARMUP {
        call().await;
    }
    let mut samples = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let t = Instant::now();
        call().await;
        samples.push(t.elapsed());
    }
    samples
}

fn main() {
    // reqwest is built without a crypto provider of its own (see tls.rs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let upstream = upstream().await;
        let env: HashMap<String, String> = [("BENCH_KEY".to_string(), "k".to_string())].into();
        let via_openai = gateway(
            format!("default_provider = \"o\"\n[providers.o]\nkind = \"openai\"\nbase_url = \"{upstream}\"\napi_key_env = \"BENCH_KEY\"\n"),
            env,
        )
        .await;
        let via_mock = gateway(String::new(), HashMap::new()).await;

        println!("provider-gateway overhead ({REQUESTS} sequential requests after {WARMUP} warm-up, loopback)");
        let http = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
        let url = format!("{upstream}/chat/completions");
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello world"}]}"#;
        let direct = time_loop(|| {
            let request = http.post(&url).header("content-type", "application/json").body(body);
            async move {
                let r = request.send().await.unwrap();
                assert!(r.status().is_success());
                r.bytes().await.unwrap();
            }
        })
        .await;
        let direct = percentiles("direct HTTP to upstream", direct);

        let client = GatewayClient::connect(via_openai).await.unwrap();
        let through = time_loop(|| {
            let mut client = client.clone();
            async move {
                let a = client.complete(request::user("hello world"), &CallOptions::new()).await.unwrap();
                assert_eq!(a.text(), "hello world");
            }
        })
        .await;
        let through = percentiles("gRPC -> gateway -> openai upstream", through);
        println!(
            "{:<34} p50 {:>8.1} us   p90 {:>8.1} us   p99 {:>8.1} us",
            "gateway overhead (difference)",
            (through[0].as_secs_f64() - direct[0].as_secs_f64()) * 1e6,
            (through[1].as_secs_f64() - direct[1].as_secs_f64()) * 1e6,
            (through[2].as_secs_f64() - direct[2].as_secs_f64()) * 1e6,
        );

        let mock = GatewayClient::connect(via_mock).await.unwrap();
        let mocked = time_loop(|| {
            let mut client = mock.clone();
            async move {
                client.complete(request::user("hello world"), &CallOptions::new()).await.unwrap();
            }
        })
        .await;
        percentiles("gRPC -> gateway -> mock", mocked);

        // Throughput: CONCURRENCY callers sharing one HTTP/2 connection.
        let started = Instant::now();
        let per_task = CONCURRENT_REQUESTS / CONCURRENCY;
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        client.complete(request::user("hello world"), &CallOptions::new()).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = started.elapsed();
        println!(
            "throughput via openai provider: {} requests, {CONCURRENCY} concurrent, {:.2} s, {:.0} req/s",
            per_task * CONCURRENCY,
            elapsed.as_secs_f64(),
            (per_task * CONCURRENCY) as f64 / elapsed.as_secs_f64()
        );

        // The HTTP ingress against direct, same upstream, same run.
        let ingress = gateway_http(
            format!("default_provider = \"o\"\n[providers.o]\nkind = \"openai\"\nbase_url = \"{upstream}\"\napi_key_env = \"BENCH_KEY\"\n"),
            [("BENCH_KEY".to_string(), "k".to_string())].into(),
        )
        .await;
        let ingress_url = format!("{ingress}/v1/chat/completions");
        println!();
        println!("HTTP ingress (OpenAI /v1/chat/completions, HTTP/1.1 keep-alive) vs direct");
        for (concurrency, total) in [(1, REQUESTS), (CONCURRENCY, CONCURRENT_REQUESTS)] {
            let pool = reqwest::Client::builder()
                .tcp_nodelay(true)
                .http1_only()
                .pool_max_idle_per_host(concurrency * 2)
                .build()
                .unwrap();
            let (direct, direct_rps) = http_run(&pool, &url, body, concurrency, total).await;
            let (via, via_rps) = http_run(&pool, &ingress_url, body, concurrency, total).await;
            let d = percentiles(&format!("direct, concurrency {concurrency}"), direct);
            let v = percentiles(&format!("HTTP ingress, concurrency {concurrency}"), via);
            println!(
                "added at concurrency {concurrency:<3}           p50 {:>8.1} us   p99 {:>8.1} us   RPS direct {direct_rps:.0}, via ingress {via_rps:.0}",
                (v[0].as_secs_f64() - d[0].as_secs_f64()) * 1e6,
                (v[2].as_secs_f64() - d[2].as_secs_f64()) * 1e6,
            );
        }
    });
}
