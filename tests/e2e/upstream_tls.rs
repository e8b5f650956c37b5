//! TLS to upstreams: certificates are always verified; `ca_file` adds a
//! private CA for a self-hosted upstream.

use provider_gateway_client::{CallOptions, request};
use serde_json::json;
use tonic::Code;

use crate::support::tls_upstream::{TestCa, TlsUpstream};
use crate::support::{ENV, Gateway, provider_config};

fn completion() -> serde_json::Value {
    json!({"id": "1", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "over tls"}, "finish_reason": "stop"}]})
}

#[tokio::test]
async fn a_private_ca_upstream_needs_its_ca_file() {
    let ca = TestCa::new("ca-file");
    let upstream = TlsUpstream::start(&ca, completion());

    // Without ca_file: the certificate is not trusted, a clean error.
    let gw = Gateway::start(
        &provider_config(
            "openai",
            &upstream.url(),
            "[providers.p.retry]\nmax_attempts = 1",
        ),
        ENV,
    )
    .await;
    let status = gw
        .client()
        .await
        .complete(request::user("hi"), &CallOptions::new())
        .await
        .unwrap_err()
        .status()
        .cloned()
        .unwrap();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("connection") && status.message().contains("certificate"),
        "{}",
        status.message()
    );
    assert_eq!(upstream.request_count(), 0);

    // With ca_file: served.
    let gw = Gateway::start(
        &provider_config(
            "openai",
            &upstream.url(),
            &format!("ca_file = {:?}", ca.ca_file.display().to_string()),
        ),
        ENV,
    )
    .await;
    let answer = gw
        .client()
        .await
        .complete(request::user("hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.text(), "over tls");
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn an_unreadable_or_empty_ca_file_fails_start_up_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("pg-bad-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    for path in [dir.join("missing.pem"), empty] {
        let config = ca_config(&path);
        let config = provider_gateway_server::Config::from_toml(&config).unwrap();
        let env: std::collections::HashMap<String, String> = ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let e = provider_gateway_server::Registry::from_config(&config, &env).unwrap_err();
        assert!(e.0.contains("providers.p.ca_file"), "{e}");
    }
}

fn ca_config(path: &std::path::Path) -> String {
    provider_config(
        "anthropic",
        "https://127.0.0.1:1",
        &format!("ca_file = {:?}", path.display().to_string()),
    )
}
