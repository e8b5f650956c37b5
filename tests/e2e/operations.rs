//! Operating the gateway: graceful shutdown of the real binary,
//! authentication, TLS and mTLS, and load shedding.

use std::time::Duration;

use futures_util::StreamExt;
use provider_gateway_client::{CallOptions, GatewayClient, RawClient, StreamEvent, request, v1};
use provider_gateway_server::auth::key_hash_hex;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::Gateway;

async fn health(channel: tonic::transport::Channel) -> Result<i32, tonic::Status> {
    let mut client = HealthClient::new(channel);
    Ok(client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status)
}

#[tokio::test]
async fn sigterm_drains_an_open_stream_refuses_new_calls_and_exits_zero() {
    let mut cmd = crate::support::binary::command();
    // The mock answers 4 words, the first at once, then one a second: the
    // stream stays open for 3 s after its first word, which the checks
    // below (a health poll, a refused call, a refused connection) must not
    // outlast, even on a loaded machine.
    cmd.env("GATEWAY_PROVIDERS__MOCK__KIND", "mock")
        .env("GATEWAY_PROVIDERS__MOCK__REPLY", "words")
        .env("GATEWAY_PROVIDERS__MOCK__WORDS", "4")
        .env("GATEWAY_PROVIDERS__MOCK__CHUNK_DELAY_MS", "1000");
    let (mut child, addr) = crate::support::binary::start(cmd, Duration::from_secs(30)).await;

    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = GatewayClient::from_channel(channel.clone());
    let mut events = client
        .stream(request::user("go"), &CallOptions::new())
        .await
        .unwrap();
    assert!(matches!(
        events.next().await,
        Some(Ok(StreamEvent::Start { .. }))
    ));
    assert!(matches!(
        events.next().await,
        Some(Ok(StreamEvent::Text { .. }))
    ));
    assert_eq!(
        health(channel.clone()).await.unwrap(),
        ServingStatus::Serving as i32
    );

    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );

    // Health turns NOT_SERVING while the stream is still open.
    let waiting = std::time::Instant::now();
    let mut status = health(channel.clone()).await.unwrap();
    while status != ServingStatus::NotServing as i32 && waiting.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = health(channel.clone()).await.unwrap();
    }
    assert_eq!(status, ServingStatus::NotServing as i32);
    // A new call is refused, on the open connection and on a new one.
    let refused = client
        .complete(request::user("late"), &CallOptions::new())
        .await
        .unwrap_err();
    assert_eq!(
        refused.status().unwrap().code(),
        Code::Unavailable,
        "{refused}"
    );
    assert!(
        refused
            .status()
            .unwrap()
            .message()
            .contains("shutting down")
    );
    assert!(
        GatewayClient::connect(format!("http://{addr}"))
            .await
            .is_err(),
        "the listener is closed"
    );

    // The open stream completes.
    let mut texts = 1;
    let mut stopped = false;
    while let Some(event) = events.next().await {
        match event.expect("the stream completes OK") {
            StreamEvent::Text { .. } => texts += 1,
            StreamEvent::Stop(_) => stopped = true,
            _ => {}
        }
    }
    assert_eq!((texts, stopped), (4, true));
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

fn authed<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

#[tokio::test]
async fn authentication_and_per_client_providers() {
    let toml = format!(
        "default_provider = \"mock\"\n\
         [providers.mock]\nkind = \"mock\"\n[providers.other]\nkind = \"mock\"\n\
         [auth]\nkeys = [\"{}\"]\n\
         [[auth.clients]]\nname = \"limited\"\nkey_sha256 = \"{}\"\nproviders = [\"mock\"]\n",
        key_hash_hex("right-key"),
        key_hash_hex("limited-key"),
    );
    let gw = Gateway::start(&toml, &[]).await;
    let mut raw = RawClient::connect(gw.url()).await.unwrap();
    let call = |key: Option<&'static str>, provider: &'static str| {
        let mut raw = raw.clone();
        async move {
            let mut req = request::user("hi");
            req.provider = provider.into();
            raw.complete(authed(req, key)).await
        }
    };
    for key in [None, Some("wrong-key")] {
        let status = call(key, "").await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{key:?}");
        assert!(!status.message().contains("wrong-key"));
    }
    assert_eq!(
        call(Some("right-key"), "other")
            .await
            .unwrap()
            .into_inner()
            .content
            .len(),
        1
    );
    assert!(call(Some("limited-key"), "mock").await.is_ok());
    let denied = call(Some("limited-key"), "other").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("limited") && denied.message().contains("other"));
    // Health and reflection stay open.
    let channel = Endpoint::from_shared(gw.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        health(channel).await.unwrap(),
        ServingStatus::Serving as i32
    );
    let list = raw
        .list_providers(authed(v1::ListProvidersRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(list.code(), Code::Unauthenticated);
}

struct Pki {
    dir: std::path::PathBuf,
    ca: String,
    client_cert: String,
    client_key: String,
}

/// A CA, a server certificate for `localhost` and a client certificate,
/// generated for the test.
fn pki(name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("pg-tls-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca: ca.pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

async fn tls_client(gw: &Gateway, pki: &Pki, identity: bool) -> Result<GatewayClient, String> {
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(&pki.ca));
    if identity {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    let endpoint = Endpoint::from_shared(format!("https://{}", gw.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    GatewayClient::connect_with(endpoint)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn tls_round_trip() {
    let pki = pki("tls");
    let toml = format!(
        "[tls]\ncert_path = \"{0}/server.pem\"\nkey_path = \"{0}/server.key\"\n",
        pki.dir.display()
    );
    let gw = Gateway::start(&toml, &[]).await;
    let mut client = tls_client(&gw, &pki, false).await.unwrap();
    assert_eq!(
        client
            .complete(request::user("over tls"), &CallOptions::new())
            .await
            .unwrap()
            .text(),
        "over tls"
    );
    // Plaintext against the TLS port fails.
    let plain = GatewayClient::connect(gw.url()).await;
    if let Ok(mut plain) = plain {
        assert!(
            plain
                .complete(request::user("x"), &CallOptions::new())
                .await
                .is_err()
        );
    }
}

#[tokio::test]
async fn mtls_requires_a_client_certificate() {
    let pki = pki("mtls");
    let toml = format!(
        "[tls]\ncert_path = \"{0}/server.pem\"\nkey_path = \"{0}/server.key\"\nclient_ca_path = \"{0}/ca.pem\"\n",
        pki.dir.display()
    );
    let gw = Gateway::start(&toml, &[]).await;
    let mut client = tls_client(&gw, &pki, true).await.unwrap();
    assert_eq!(
        client
            .complete(request::user("mutual"), &CallOptions::new())
            .await
            .unwrap()
            .text(),
        "mutual"
    );
    let anonymous = match tls_client(&gw, &pki, false).await {
        Err(_) => true,
        Ok(mut c) => c
            .complete(request::user("x"), &CallOptions::new())
            .await
            .is_err(),
    };
    assert!(anonymous, "a client without a certificate was served");
}

#[tokio::test]
async fn a_missing_certificate_fails_start_up_naming_the_path() {
    let config = provider_gateway_server::Config::from_toml(
        "[tls]\ncert_path = \"/nonexistent/cert.pem\"\nkey_path = \"/nonexistent/key.pem\"\n",
    )
    .unwrap();
    let err = provider_gateway_server::ServerOptions::from_config(
        &config,
        &std::collections::HashMap::new(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("tls.cert_path")
            && err.to_string().contains("/nonexistent/cert.pem"),
        "{err}"
    );
}

#[tokio::test]
async fn requests_over_the_limit_are_shed_at_once() {
    let gw = Gateway::start(
        "[providers.slow]\nkind = \"mock\"\nlatency_ms = 1500\n[limits]\nmax_concurrent_requests = 2\n",
        &[],
    )
    .await;
    let client = gw.client().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..6 {
        let mut client = client.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            // Stagger the first two so they hold the slots.
            if i >= 2 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let result = client
                .complete(request::user("hi"), &CallOptions::new())
                .await;
            tx.send(result.map(|_| ()).map_err(|e| e.status().unwrap().code()))
                .unwrap();
        });
    }
    drop(tx);
    let mut order = Vec::new();
    while let Some(result) = rx.recv().await {
        order.push(result);
    }
    assert_eq!(order.len(), 6);
    // The four shed calls are answered before either admitted one finishes.
    assert_eq!(&order[..4], &[Err(Code::ResourceExhausted); 4], "{order:?}");
    assert_eq!(&order[4..], &[Ok(()), Ok(())], "{order:?}");
}

#[tokio::test]
async fn a_client_limited_to_some_providers_never_falls_back_outside_them() {
    let toml = format!(
        "default_provider = \"down\"\n\
         [providers.down]\nkind = \"mock\"\nfail_first = 1000\nfallback = [\"other\"]\n\
         [providers.down.retry]\nmax_attempts = 1\n\
         [providers.other]\nkind = \"mock\"\n\
         [auth]\nkeys = [\"{}\"]\n\
         [[auth.clients]]\nname = \"limited\"\nkey_sha256 = \"{}\"\nproviders = [\"down\"]\n",
        key_hash_hex("open-key"),
        key_hash_hex("limited-key"),
    );
    let gw = Gateway::start(&toml, &[]).await;
    let mut raw = RawClient::connect(gw.url()).await.unwrap();
    let served = raw
        .complete(authed(request::user("hi"), Some("open-key")))
        .await
        .unwrap();
    assert_eq!(
        served.into_inner().provider,
        "other",
        "the chain serves an unrestricted client"
    );
    let status = raw
        .complete(authed(request::user("hi"), Some("limited-key")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("provider `down`"),
        "{}",
        status.message()
    );
}
