//! The provider's pool of upstream keep-alive connections: after a burst,
//! at most `pool_max_idle` of them are kept for the next calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use provider_gateway_client::{CallOptions, request};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::support::Gateway;

const ANSWER: &str = r#"{"id":"c","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"kept"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;

/// An OpenAI-shaped upstream that keeps its connections alive, answers
/// each request after `delay`, and counts the connections it accepted.
async fn keep_alive_upstream(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut read = BufReader::new(read);
                loop {
                    // The head, then a body of its content-length.
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end().to_ascii_lowercase();
                        if line.is_empty() {
                            break;
                        }
                        if let Some(v) = line.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    if read.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ANSWER}",
                        ANSWER.len()
                    );
                    if write.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

/// Two bursts of `n` concurrent calls, a pause between; the connections
/// the upstream accepted in all.
async fn connections_for_two_bursts(pool_max_idle: Option<usize>, n: usize) -> usize {
    let (url, accepted) = keep_alive_upstream(Duration::from_millis(200)).await;
    let extra = pool_max_idle.map_or(String::new(), |m| format!("pool_max_idle = {m}\n"));
    let toml = format!(
        "default_provider = \"o\"\n[providers.o]\nkind = \"openai\"\nbase_url = \"{url}\"\napi_key_env = \"K\"\n{extra}"
    );
    let gw = Gateway::start(&toml, &[("K", "k")]).await;
    for _ in 0..2 {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let gw_url = gw.url();
                tokio::spawn(async move {
                    let mut client = provider_gateway_client::GatewayClient::connect(gw_url)
                        .await
                        .unwrap();
                    client
                        .complete(request::user("hi"), &CallOptions::new())
                        .await
                        .unwrap()
                        .text()
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), "kept");
        }
        // Every connection is back in the pool (or closed) once its
        // answer was read; the pause only lets the closes happen.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    accepted.load(Ordering::SeqCst)
}

#[tokio::test]
async fn a_burst_keeps_at_most_pool_max_idle_connections_for_the_next() {
    // 8 calls at once open 8 connections; 2 are kept, so the next 8 open
    // 6 more.
    assert_eq!(connections_for_two_bursts(Some(2), 8).await, 14);
    // By default (256) all 8 are kept and serve the next burst.
    assert_eq!(connections_for_two_bursts(None, 8).await, 8);
}
