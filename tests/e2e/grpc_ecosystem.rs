//! The gRPC ecosystem around the API: reflection v1alpha beside v1 (for
//! grpcurl 1.8 and older tools).

use tokio_stream::StreamExt as _;

use crate::support::Gateway;

#[tokio::test]
async fn reflection_v1alpha_lists_the_services() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let gw = Gateway::start("", &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(gw.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("provider_gateway.v1.ProviderGateway".into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("{reply:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in [
        "provider_gateway.v1.ProviderGateway",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.contains(&name.to_string()), "{name} in {names:?}");
    }
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else {
        panic!("{reply:?}")
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

/// One gRPC-Web frame: flag byte, big-endian length, payload.
fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The text of the `CompleteResponse` in the first of `frames`.
fn first_text(frames: &[(u8, Vec<u8>)]) -> String {
    use prost::Message as _;
    let answer = provider_gateway::v1::CompleteResponse::decode(frames[0].1.as_slice()).unwrap();
    let Some(provider_gateway::v1::content_block::Block::Text(text)) = &answer.content[0].block
    else {
        panic!("{answer:?}")
    };
    text.clone()
}

/// The frames of a gRPC-Web body.
fn frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    out
}

#[tokio::test]
async fn grpc_web_complete_over_http1_with_cors() {
    use prost::Message as _;
    let gw = Gateway::start(
        "[grpc_web]\ncors_allowed_origins = [\"https://app.example.com\"]\n",
        &[],
    )
    .await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    let url = format!("{}/provider_gateway.v1.ProviderGateway/Complete", gw.url());

    // A browser's preflight from an allowed origin, then from another one.
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,x-grpc-web,x-retry-max-attempts",
            )
            .send()
    };
    let ok = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        ok.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://app.example.com")
    );
    let other = preflight("https://evil.example.com").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let request = provider_gateway_client::request::user("hello web");
    let body = frame(0, &request.encode_to_vec());
    let r = http
        .post(&url)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", "https://app.example.com")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    let expose = r
        .headers()
        .get("access-control-expose-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(expose.contains("x-gateway-attempts"), "{expose}");
    assert_eq!(
        r.headers()
            .get("x-gateway-attempts")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let frames = frames(&r.bytes().await.unwrap());
    assert_eq!(frames[0].0, 0);
    assert_eq!(first_text(&frames), "hello web");
    let (flag, trailers) = frames.last().unwrap();
    assert_eq!(*flag, 0x80);
    let trailers = String::from_utf8_lossy(trailers).to_ascii_lowercase();
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
}

/// With no `cors_allowed_origins` (the default), gRPC-Web still answers
/// (same-origin pages, edge proxies, tools), but no origin is granted
/// anything and no answer carries CORS headers or `vary`.
#[tokio::test]
async fn without_allowed_origins_grpc_web_answers_and_no_answer_carries_cors_headers() {
    use prost::Message as _;
    let gw = Gateway::start("", &[]).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    let url = format!("{}/provider_gateway.v1.ProviderGateway/Complete", gw.url());
    let cors_headers = |headers: &reqwest::header::HeaderMap| -> Vec<String> {
        headers
            .keys()
            .map(|k| k.as_str().to_string())
            .filter(|k| k.starts_with("access-control-") || k == "vary")
            .collect()
    };

    let preflight = http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-grpc-web")
        .send()
        .await
        .unwrap();
    assert_eq!(cors_headers(preflight.headers()), Vec::<String>::new());

    let request = provider_gateway_client::request::user("hello web");
    let r = http
        .post(&url)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", "https://app.example.com")
        .body(frame(0, &request.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cors_headers(r.headers()), Vec::<String>::new());
    assert_eq!(
        r.headers()
            .get("x-gateway-attempts")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let web = frames(&r.bytes().await.unwrap());
    assert_eq!(first_text(&web), "hello web");

    // Plain gRPC over HTTP/2 answers without them too.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let request = provider_gateway_client::request::user("hello grpc");
    let r = h2
        .post(&url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("origin", "https://app.example.com")
        .body(frame(0, &request.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(cors_headers(r.headers()), Vec::<String>::new());
    let grpc = frames(&r.bytes().await.unwrap());
    assert_eq!(first_text(&grpc), "hello grpc");
}
