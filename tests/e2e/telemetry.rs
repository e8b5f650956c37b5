//! Telemetry end to end: the spans of a retried request (with an in-memory
//! exporter), trace propagation in and out, a real OTLP/gRPC export, the
//! Prometheus metrics, and no secret anywhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use provider_gateway_client::{CallOptions, request};
use provider_gateway_server::config::TelemetryConfig;
use provider_gateway_server::telemetry::{Settings, SpanSink, Telemetry};
use provider_gateway_server::{Config, Registry};
use serde_json::json;

use crate::support::{ENV, Gateway, KEY, Reply, ScriptedClock, Upstream, provider_config};

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv: &KeyValue| &kv.value)
}

fn int(span: &SpanData, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Value::I64(n) => Some(*n),
        other => panic!("{key} is not an integer: {other:?}"),
    }
}

fn text(span: &SpanData, key: &str) -> Option<String> {
    attr(span, key).map(|v| v.as_str().into_owned())
}

/// Captured log output.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// A gateway whose upstream answers 503, then 429 with Retry-After 1 s,
/// then 200, with spans going to an in-memory exporter.
async fn retried_request(
    traceparent: Option<&str>,
) -> (Vec<SpanData>, Upstream, Arc<Telemetry>, String) {
    let exporter = InMemorySpanExporter::default();
    let telemetry = Arc::new(
        Telemetry::new(
            Settings::resolve(&TelemetryConfig::default(), &HashMap::new()).unwrap(),
            SpanSink::Exporter(Box::new(exporter.clone())),
        )
        .unwrap(),
    );
    let logs = Logs::default();
    let guard =
        tracing::subscriber::set_default(telemetry.subscriber_with_writer(logs.clone(), false));
    let upstream = Upstream::start(vec![
        Reply::json(503, json!({"type": "error", "error": {"type": "api_error", "message": "unavailable"}})),
        Reply::json(429, json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}))
            .header("retry-after", "1"),
        Reply::json(200, json!({
            "id": "msg_ok", "model": "claude-served", "content": [{"type": "text", "text": "fine"}],
            "stop_reason": "end_turn", "usage": {"input_tokens": 11, "output_tokens": 5}
        })),
    ])
    .await;
    let config = Config::from_toml(&provider_config(
        "anthropic",
        &upstream.url(),
        "model = \"claude-test\"",
    ))
    .unwrap();
    let env: HashMap<String, String> = ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let registry = Registry::from_config(&config, &env)
        .unwrap()
        .with_clock(ScriptedClock::new())
        .with_jitter_seed(3)
        .with_metrics(telemetry.metrics());
    let gw = Gateway::start_registry(registry).await;
    let mut raw = provider_gateway_client::RawClient::connect(gw.url())
        .await
        .unwrap();
    let mut req = request::user("hello");
    req.max_tokens = Some(64);
    req.temperature = Some(0.25);
    let mut req = tonic::Request::new(req);
    if let Some(tp) = traceparent {
        req.metadata_mut()
            .insert("traceparent", tp.parse().unwrap());
    }
    let answer = raw.complete(req).await.unwrap().into_inner();
    assert_eq!(answer.attempts, 3);
    // The server span ends just after the response is written.
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = exporter.get_finished_spans().unwrap();
        if spans.iter().any(|s| s.span_kind == SpanKind::Server) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(guard);
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    (spans, upstream, telemetry, logs)
}

#[tokio::test]
async fn a_retried_request_has_one_server_one_chat_and_three_attempt_spans() {
    let (spans, _upstream, telemetry, logs) = retried_request(None).await;
    let server: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_kind == SpanKind::Server)
        .collect();
    let chat: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name.starts_with("chat "))
        .collect();
    let mut attempts: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name.starts_with("attempt "))
        .collect();
    attempts.sort_by_key(|s| int(s, "gateway.attempt"));
    assert_eq!(
        (server.len(), chat.len(), attempts.len()),
        (1, 1, 3),
        "{:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let (server, chat) = (server[0], chat[0]);

    assert_eq!(server.name, "provider_gateway.v1.ProviderGateway/Complete");
    assert_eq!(text(server, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        text(server, "rpc.service").as_deref(),
        Some("provider_gateway.v1.ProviderGateway")
    );
    assert_eq!(text(server, "rpc.method").as_deref(), Some("Complete"));
    assert_eq!(int(server, "rpc.grpc.status_code"), Some(0));
    assert_eq!(int(server, "gateway.attempts"), Some(3));
    assert_eq!(text(server, "gateway.provider").as_deref(), Some("p"));

    assert_eq!(chat.name, "chat claude-test");
    assert_eq!(chat.span_kind, SpanKind::Client);
    assert_eq!(chat.parent_span_id, server.span_context.span_id());
    assert_eq!(text(chat, "gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(
        text(chat, "gen_ai.provider.name").as_deref(),
        Some("anthropic")
    );
    assert_eq!(
        text(chat, "gen_ai.request.model").as_deref(),
        Some("claude-test")
    );
    assert_eq!(int(chat, "gen_ai.request.max_tokens"), Some(64));
    assert_eq!(
        attr(chat, "gen_ai.request.temperature"),
        Some(&Value::F64(0.25))
    );
    assert_eq!(
        text(chat, "gen_ai.response.model").as_deref(),
        Some("claude-served")
    );
    assert_eq!(text(chat, "gen_ai.response.id").as_deref(), Some("msg_ok"));
    assert_eq!(
        text(chat, "gen_ai.response.finish_reasons").as_deref(),
        Some("end_turn")
    );
    assert_eq!(int(chat, "gen_ai.usage.input_tokens"), Some(11));
    assert_eq!(int(chat, "gen_ai.usage.output_tokens"), Some(5));
    assert_eq!(attr(chat, "error.type"), None);

    let expected = [
        (Some(503), Some("server-error"), Some("retry"), None, None),
        (
            Some(429),
            Some("rate-limited"),
            Some("retry"),
            Some(1),
            Some(1000),
        ),
        (Some(200), None, None, Some(2), None),
    ];
    for (span, (status, class, decision, resend, retry_after)) in attempts.iter().zip(expected) {
        assert_eq!(span.span_kind, SpanKind::Client);
        assert_eq!(
            span.parent_span_id,
            chat.span_context.span_id(),
            "attempt spans are children of chat"
        );
        assert_eq!(span.span_context.trace_id(), server.span_context.trace_id());
        assert_eq!(int(span, "http.response.status_code"), status);
        assert_eq!(text(span, "gateway.retry.class").as_deref(), class);
        assert_eq!(text(span, "error.type").as_deref(), class);
        assert_eq!(text(span, "gateway.retry.decision").as_deref(), decision);
        assert_eq!(int(span, "http.request.resend_count"), resend);
        assert_eq!(int(span, "gateway.retry.retry_after_ms"), retry_after);
        assert_eq!(text(span, "server.address").as_deref(), Some("127.0.0.1"));
    }
    // The wait chosen after attempt 2 honours the Retry-After.
    assert!(int(attempts[1], "gateway.retry.backoff_ms").unwrap() >= 1000);
    assert!(int(attempts[0], "gateway.retry.backoff_ms").is_some());
    // Backoff lies between attempt spans.
    assert!(attempts[0].end_time <= attempts[1].start_time);
    assert!(attempts[1].end_time <= attempts[2].start_time);

    // Never a secret, never the prompt, in spans or logs.
    for span in &spans {
        for kv in &span.attributes {
            let v = kv.value.as_str();
            assert!(!v.contains(KEY), "{} carries the key", kv.key);
            assert!(!v.contains("hello"), "{} carries the prompt", kv.key);
        }
    }
    assert!(!logs.contains(KEY), "a log line carries the key:\n{logs}");

    // The retry counters and GenAI metrics.
    let metrics = telemetry.prometheus_text();
    assert!(
        metrics.contains(
            "gateway_retries_total{gateway_provider=\"p\",gateway_retry_class=\"server-error\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "gateway_retries_total{gateway_provider=\"p\",gateway_retry_class=\"rate-limited\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("gen_ai_client_operation_duration_seconds_count{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gen_ai_token_type=\"output\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("gateway_request_attempts_sum{gateway_provider=\"p\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gateway_overhead_seconds_count{gateway_provider=\"p\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_caller_traceparent_parents_the_server_span_and_reaches_the_upstream() {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let (spans, upstream, _, _) = retried_request(Some(&format!("00-{trace}-{parent}-01"))).await;
    let server = spans
        .iter()
        .find(|s| s.span_kind == SpanKind::Server)
        .unwrap();
    assert_eq!(
        server.span_context.trace_id(),
        TraceId::from_hex(trace).unwrap()
    );
    assert_eq!(server.parent_span_id, SpanId::from_hex(parent).unwrap());
    let mut attempt_ids: Vec<(i64, SpanId)> = spans
        .iter()
        .filter(|s| s.name.starts_with("attempt "))
        .map(|s| (int(s, "gateway.attempt").unwrap(), s.span_context.span_id()))
        .collect();
    attempt_ids.sort_by_key(|(n, _)| *n);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    for (request, (_, attempt_span)) in requests.iter().zip(attempt_ids) {
        let tp = request
            .header("traceparent")
            .expect("each attempt carries a traceparent");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts[1], trace, "{tp}");
        assert_eq!(
            parts[2],
            attempt_span.to_string(),
            "the attempt span is the upstream's parent"
        );
    }
}

mod otlp {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    #[derive(Clone, Default)]
    pub struct Receiver(pub Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.0.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    pub async fn start() -> (String, Receiver) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        (format!("http://{addr}"), receiver)
    }
}

/// Counts the RPC server spans (`rpc`) that have closed. Layered over the
/// gateway's subscriber, it hears of a close after the layers beneath it,
/// so by then the OpenTelemetry layer has ended the span and handed it to
/// its processor: a flush after that exports it.
#[derive(Clone, Default)]
struct ServerSpansClosed {
    open: Arc<Mutex<Vec<tracing::span::Id>>>,
    closed: Arc<std::sync::atomic::AtomicUsize>,
}

impl ServerSpansClosed {
    fn count(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ServerSpansClosed {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() == "rpc" {
            self.open.lock().unwrap().push(id.clone());
        }
    }

    fn on_close(&self, id: tracing::span::Id, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut open = self.open.lock().unwrap();
        if let Some(at) = open.iter().position(|o| *o == id) {
            open.swap_remove(at);
            self.closed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

// The OTLP exporter runs on the SDK's own thread and needs a multi-thread
// runtime; the subscriber is process-wide (nextest runs each test in its
// own process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_to_a_real_otlp_receiver() {
    use tracing_subscriber::layer::SubscriberExt;
    let (endpoint, receiver) = otlp::start().await;
    let env: HashMap<String, String> = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), endpoint),
        (
            "OTEL_SERVICE_NAME".to_string(),
            "gateway-under-test".to_string(),
        ),
    ]
    .into();
    let telemetry = Arc::new(
        Telemetry::new(
            Settings::resolve(&TelemetryConfig::default(), &env).unwrap(),
            SpanSink::Otlp,
        )
        .unwrap(),
    );
    let server_spans = ServerSpansClosed::default();
    tracing::subscriber::set_global_default(telemetry.subscriber().with(server_spans.clone()))
        .unwrap();
    let config = Config::from_toml("").unwrap();
    let registry = Registry::from_config(&config, &HashMap::new())
        .unwrap()
        .with_metrics(telemetry.metrics());
    let gw = Gateway::start_registry(registry).await;
    let answer = gw
        .client()
        .await
        .complete(request::user("exported"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.text(), "exported");
    // The flush exports what has ended: wait until the server span has
    // (it ends as the call returns, around when its answer is sent).
    crate::support::eventually("the server span ends", Duration::from_secs(10), || {
        server_spans.count() > 0
    })
    .await;
    let t = telemetry.clone();
    tokio::task::spawn_blocking(move || t.shutdown())
        .await
        .unwrap();

    let exports = receiver.0.lock().unwrap().clone();
    let names: Vec<String> = exports
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| s.name.clone())
        .collect();
    assert!(
        names.contains(&"provider_gateway.v1.ProviderGateway/Complete".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"chat mock-1".to_string()), "{names:?}");
    assert!(names.contains(&"attempt 1".to_string()), "{names:?}");
    let service_name = exports[0].resource_spans[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.clone())
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    assert!(
        service_name.contains("gateway-under-test"),
        "{service_name}"
    );
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let telemetry = Arc::new(
        Telemetry::new(
            Settings::resolve(&TelemetryConfig::default(), &HashMap::new()).unwrap(),
            SpanSink::None,
        )
        .unwrap(),
    );
    let config = Config::from_toml("[providers.flaky]\nkind = \"mock\"\nfail_first = 1\n").unwrap();
    let registry = Registry::from_config(&config, &HashMap::new())
        .unwrap()
        .with_clock(ScriptedClock::new())
        .with_metrics(telemetry.metrics());
    let gw = Gateway::start_registry(registry).await;
    gw.client()
        .await
        .complete(request::user("x"), &CallOptions::new())
        .await
        .unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = admin.local_addr().unwrap();
    tokio::spawn(provider_gateway_server::admin::serve_admin(
        admin, telemetry,
    ));
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    socket.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains(
            "gateway_retries_total{gateway_provider=\"flaky\",gateway_retry_class=\"overloaded\"} 1"
        ),
        "{body}"
    );
}
