//! The real `provider-gateway` binary, started on port 0: health,
//! reflection, Complete, a clean exit on SIGTERM, and start-up errors.

use std::time::Duration;

use provider_gateway_client::{CallOptions, GatewayClient, request};
use tokio::process::Child;
use tokio_stream::StreamExt as _;

use crate::support::binary::command;

/// Starts the binary and reads its start-up log line for the address.
async fn start() -> (Child, String) {
    crate::support::binary::start(command(), Duration::from_secs(30)).await
}

#[tokio::test]
async fn binary_serves_health_reflection_and_complete() {
    let (mut child, addr) = start().await;
    let url = format!("http://{addr}");
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "provider_gateway.v1.ProviderGateway"] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            reply.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("{reply:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"provider_gateway.v1.ProviderGateway".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let mut client = GatewayClient::connect(url).await.unwrap();
    let answer = client
        .complete(request::user("hello binary"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.text(), "hello binary");

    // SIGTERM: a clean exit with status 0.
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

async fn failing_start(config: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("pg-bin-{}-{}", std::process::id(), config.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = command();
    cmd.arg("--config")
        .arg(&path)
        .env("GATEWAY_LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn binary_refuses_an_unknown_key_naming_it() {
    let (code, stderr) = failing_start("[providers.m]\nkind = \"mock\"\nlatency = 5\n", &[]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("providers.m") && stderr.contains("latency"),
        "{stderr}"
    );
}

#[tokio::test]
async fn binary_refuses_a_provider_whose_key_variable_is_unset() {
    let (code, stderr) = failing_start(
        "[providers.a]\nkind = \"anthropic\"\napi_key_env = \"PG_TEST_NEVER_SET\"\n",
        &[],
    )
    .await;
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("PG_TEST_NEVER_SET"), "{stderr}");
}

#[tokio::test]
async fn binary_check_config_never_prints_the_key() {
    let secret = "sk-ant-very-secret-value";
    let mut cmd = command();
    cmd.arg("--check-config").env("ANTHROPIC_API_KEY", secret);
    let out = cmd.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");
}
