//! A pool against a single key when one key is throttled (issue 13).
//!
//! The upstream (Anthropic-shaped, on 127.0.0.1) answers every second
//! request made with key `k0` with a 429 and `retry-after-ms: 20`; the
//! other keys are never throttled. 1,000 Complete calls go through a
//! gateway whose provider is a pool of four keys (`k0`..`k3`), then
//! through one whose provider has the throttled key alone: first one call
//! at a time, then 16 in flight (a fresh pair of gateways for each). One
//! row per run: the 429s the upstream sent, the calls that failed, and
//! the latency of the calls that were served (p50, p99, mean: a failed
//! call is counted, not timed, as the key alone fails fast once its retry
//! budget is spent). Then one `pools:` line per
//! concurrency, `key=value` pairs in this order:
//!
//! `pools: in_flight=N calls=N pool_429s=N single_429s=N pool_failed=N
//! single_failed=N p50_ms_pool=X p99_ms_pool=X p50_ms_single=X
//! p99_ms_single=X added_p50_ms_single_over_pool=X
//! added_p99_ms_single_over_pool=X mean_ms_pool=X mean_ms_single=X
//! added_ms_single_over_pool=X`
//!
//! where `added_*` is the latency the throttled key alone adds over the
//! pool, at that percentile (or mean).
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// `CALLS` calls, `in_flight` at a time; the latencies of those served,
/// sorted, and how many failed.
async fn run(url: &str, in_flight: usize) -> (Vec<Duration>, usize) {
    // The listener is bound before `serve` is spawned: a few tries at
    // most, never forever.
    let mut tries = 0;
    let client = loop {
        match GatewayClient::connect(url.to_string()).await {
            Ok(c) => break c,
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the gateway at {url} never accepted a connection: {e}"),
        }
    };
    let left = Arc::new(AtomicUsize::new(CALLS));
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (mut client, left) = (client.clone(), left.clone());
            tokio::spawn(async move {
                let options = CallOptions::new();
                let (mut took, mut failed) = (Vec::new(), 0);
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let started = Instant::now();
                    match client.complete(request::user("hi"), &options).await {
                        Ok(_) => took.push(started.elapsed()),
                        Err(_) => failed += 1,
                    }
                }
                (took, failed)
            })
        })
        .collect();
    let (mut took, mut failed) = (Vec::with_capacity(CALLS), 0);
    for worker in workers {
        let (t, f) = worker.await.unwrap();
        took.extend(t);
        failed += f;
    }
    took.sort();
    (took, failed)
}

/// One run's figures.
struct Run {
    took: Vec<Duration>,
    failed: usize,
    limited: u64,
}

impl Run {
    /// The latency at `p` (0..1), in milliseconds.
    /// NaN when no call was served.
    fn at(&self, p: f64) -> f64 {
        let t = &self.took;
        match t.len().checked_sub(1) {
            Some(last) => t[((t.len() as f64 * p) as usize).min(last)].as_secs_f64() * 1e3,
            None => f64::NAN,
        }
    }

    /// NaN when no call was served.
    fn mean(&self) -> f64 {
        if self.took.is_empty() {
            return f64::NAN;
        }
        self.took.iter().sum::<Duration>().as_secs_f64() / self.took.len() as f64 * 1e3
    }

    fn row(&self, label: &str, in_flight: usize) {
        println!(
            "{label:<26} in flight {in_flight:>2}  429s seen {:>5}  failed {:>4}  p50 {:>7.3} ms  p99 {:>7.3} ms  mean {:>7.3} ms",
            self.limited,
            self.failed,
            self.at(0.50),
            self.at(0.99),
            self.mean()
        );
    }
}

/// The pool, then the throttled key alone, `in_flight` calls at a time,
/// each on a fresh gateway.
async fn compare(base: &str, limited: &AtomicU64, in_flight: usize) -> (Run, Run) {
    let provider = |keys: &str| {
        format!(
            "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\nbase_url = \"{base}\"\napi_key_env = {keys}\n\
             [providers.p.retry]\nmax_attempts = 4\ninitial_backoff_ms = 1\nmax_backoff_ms = 5\n"
        )
    };
    let mut runs = Vec::new();
    for keys in ["[\"K0\", \"K1\", \"K2\", \"K3\"]", "\"K0\""] {
        let url = gateway(provider(keys)).await;
        limited.store(0, Ordering::Relaxed);
        let (took, failed) = run(&url, in_flight).await;
        runs.push(Run {
            took,
            failed,
            limited: limited.load(Ordering::Relaxed),
        });
    }
    let single = runs.pop().unwrap();
    let pool = runs.pop().unwrap();
    pool.row("pool of 4 keys (p2c)", in_flight);
    single.row("the throttled key alone", in_flight);
    (pool, single)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "provider-gateway pools: {CALLS} calls, 1 then 16 in flight, key k0 answers every second request 429 (retry-after-ms: 20)"
        );
        let (base, limited) = upstream().await;
        let mut lines = Vec::new();
        for in_flight in [1, 16] {
            let (pool, single) = compare(&base, &limited, in_flight).await;
            lines.push(format!(
                "pools: in_flight={in_flight} calls={CALLS} pool_429s={} single_429s={} pool_failed={} single_failed={} \
                 p50_ms_pool={:.3} p99_ms_pool={:.3} p50_ms_single={:.3} p99_ms_single={:.3} \
                 added_p50_ms_single_over_pool={:.3} added_p99_ms_single_over_pool={:.3} \
                 mean_ms_pool={:.3} mean_ms_single={:.3} added_ms_single_over_pool={:.3}",
                pool.limited,
                single.limited,
                pool.failed,
                single.failed,
                pool.at(0.50),
                pool.at(0.99),
                single.at(0.50),
                single.at(0.99),
                single.at(0.50) - pool.at(0.50),
                single.at(0.99) - pool.at(0.99),
                pool.mean(),
                single.mean(),
                single.mean() - pool.mean()
            ));
        }
        for line in lines {
            println!("{line}");
        }
    });
}
