//! The configured key never leaves the gateway: across every HTTP provider
//! kind and every error path (401 echoing the key, an SSE error event
//! echoing it, a redirect whose location carries it, a refused connection, a
//! TLS failure), it appears in no status (message, details, metadata), no
//! log line at any level, no span, no metrics text, no `ListProviders` and
//! no `--check-config` output.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::trace::InMemorySpanExporter;
use provider_gateway_client::{CallOptions, GatewayClient, request};
use provider_gateway_server::config::TelemetryConfig;
use provider_gateway_server::telemetry::{Settings, SpanSink, Telemetry};
use provider_gateway_server::{Config, Registry};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tonic::Code;
use tonic::metadata::KeyAndValueRef;

use crate::support::tls_upstream::{TestCa, TlsUpstream};
use crate::support::{ENV, Gateway, KEY, Reply, Step, Upstream, sse_event};

const KINDS: [&str; 3] = ["anthropic", "openai", "databricks"];

fn assert_clean(what: &str, text: &str) {
    assert!(!text.contains(KEY), "{what} shows the key:\n{text}");
}

fn error_body(kind: &str, message: &str) -> serde_json::Value {
    match kind {
        "anthropic" => {
            json!({"type": "error", "error": {"type": "authentication_error", "message": message}})
        }
        "openai" => {
            json!({"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}})
        }
        _ => json!({"error_code": "PERMISSION_DENIED", "message": message}),
    }
}

fn sse_error(kind: &str) -> Reply {
    let message = format!("the key {KEY} is not valid here");
    let steps = if kind == "anthropic" {
        vec![
            Step::Chunk(sse_event(
                "message_start",
                &json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}})
                    .to_string(),
            )),
            Step::Chunk(sse_event(
                "error",
                &json!({"type": "error", "error": {"type": "overloaded_error", "message": message}})
                    .to_string(),
            )),
        ]
    } else {
        vec![Step::Chunk(sse_event(
            "",
            &json!({"error": {"message": message, "type": "server_error"}}).to_string(),
        ))]
    };
    Reply::sse_steps(steps)
}

/// The upstreams of every (kind, error path) and the config naming them.
struct World {
    _upstreams: Vec<Upstream>,
    _tls: TlsUpstream,
    toml: String,
    providers: Vec<(String, Code)>,
}

async fn world() -> World {
    let untrusted = TestCa::new("secrets");
    let tls = TlsUpstream::start(&untrusted, json!({}));
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut upstreams = Vec::new();
    let mut toml = String::from(
        "default_provider = \"anthropic_401\"\nhttp_listen = \"127.0.0.1:0\"\n[retry]\nmax_attempts = 1\n[telemetry]\nadmin_listen = \"127.0.0.1:0\"\n",
    );
    let mut providers = Vec::new();
    for kind in KINDS {
        let echo = Reply::json(401, error_body(kind, &format!("invalid key: {KEY}")));
        let redirect = Reply::json(307, json!({})).header(
            "location",
            &format!("http://127.0.0.1:9/elsewhere?key={KEY}"),
        );
        let mut paths = vec![];
        for (path, reply, code) in [
            ("401", echo, Code::FailedPrecondition),
            ("sse", sse_error(kind), Code::Unavailable),
            ("redirect", redirect, Code::FailedPrecondition),
        ] {
            // Each provider gets a Complete and a Stream call.
            let upstream = Upstream::start(vec![reply.clone(), reply]).await;
            paths.push((path, upstream.url(), code));
            upstreams.push(upstream);
        }
        paths.push((
            "refused",
            format!("http://127.0.0.1:{closed}"),
            Code::Unavailable,
        ));
        paths.push(("tls", tls.url(), Code::Unavailable));
        for (path, url, code) in paths {
            let name = format!("{kind}_{path}");
            toml.push_str(&format!(
                "[providers.{name}]\nkind = \"{kind}\"\nbase_url = \"{url}\"\napi_key_env = \"TEST_KEY\"\n"
            ));
            providers.push((name, code));
        }
    }
    World {
        _upstreams: upstreams,
        _tls: tls,
        toml,
        providers,
    }
}

fn check_status(what: &str, status: &tonic::Status) {
    assert_clean(&format!("{what}: the status message"), status.message());
    assert_clean(
        &format!("{what}: the status details"),
        &String::from_utf8_lossy(status.details()),
    );
    for entry in status.metadata().iter() {
        let text = match entry {
            KeyAndValueRef::Ascii(k, v) => format!("{k}: {}", v.to_str().unwrap_or_default()),
            KeyAndValueRef::Binary(k, v) => format!(
                "{k}: {}",
                String::from_utf8_lossy(&v.to_bytes().unwrap_or_default())
            ),
        };
        assert_clean(&format!("{what}: the status metadata"), &text);
    }
}

/// Makes a Complete and a Stream call to every provider of `world`, checking
/// each status; returns the ListProviders answer as text.
async fn call_every_path(world: &World, mut client: GatewayClient) -> String {
    for (name, code) in &world.providers {
        let mut req = request::user("hello");
        req.provider = name.clone();
        let err = client
            .complete(req.clone(), &CallOptions::new())
            .await
            .expect_err(name);
        let status = err.status().expect("a status");
        check_status(&format!("{name} Complete"), status);
        if !name.ends_with("_sse") {
            assert_eq!(status.code(), *code, "{name}: {status:?}");
        }
        let status = match client.stream(req, &CallOptions::new()).await {
            Err(e) => e.status().cloned().expect("a status"),
            Ok(events) => crate::anthropic::drain(events).await.1.expect("fails"),
        };
        check_status(&format!("{name} Stream"), &status);
        assert_eq!(status.code(), *code, "{name} Stream: {status:?}");
    }
    let list = client.providers().await.unwrap();
    format!("{list:?}")
}

/// In-process: statuses, spans (an in-memory exporter), logs, metrics.
#[tokio::test]
async fn the_key_never_leaves_the_gateway_in_process() {
    let world = world().await;
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
    let config = Config::from_toml(&world.toml).unwrap();
    let env: HashMap<String, String> = ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let registry = Registry::from_config(&config, &env)
        .unwrap()
        .with_metrics(telemetry.metrics());
    let gw = Gateway::start_registry(registry).await;
    let list = call_every_path(&world, gw.client().await).await;
    assert_clean("ListProviders", &list);

    // Every call's server span has ended (two per provider).
    let calls = world.providers.len() * 2;
    let mut spans = Vec::new();
    for _ in 0..500 {
        spans = exporter.get_finished_spans().unwrap();
        if spans
            .iter()
            .filter(|s| s.span_kind == SpanKind::Server)
            .count()
            >= calls
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let servers = spans
        .iter()
        .filter(|s| s.span_kind == SpanKind::Server)
        .count();
    assert!(servers >= calls, "{servers} server spans of {calls}");
    for span in &spans {
        assert_clean(&format!("span {}", span.name), &format!("{span:?}"));
    }
    // What is checked is really there: the calls' metrics and log lines.
    let metrics = telemetry.prometheus_text();
    assert!(
        metrics.contains("gen_ai_client_operation_duration"),
        "{metrics}"
    );
    assert_clean("the metrics text", &metrics);
    drop(guard);
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(!logs.trim().is_empty(), "no log lines were captured");
    assert_clean("the logs", &logs);
}

/// The real binary with `RUST_LOG=trace`: its stderr, `/metrics` on the
/// admin port, ListProviders, and `--check-config`.
#[tokio::test]
async fn the_key_never_leaves_the_binary_at_trace_level() {
    let world = world().await;
    let dir = std::env::temp_dir().join(format!("pg-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    std::fs::write(&file, &world.toml).unwrap();
    let command = || {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_provider-gateway"));
        for var in ["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "DATABRICKS_TOKEN"] {
            cmd.env_remove(var);
        }
        cmd.env("NO_COLOR", "1")
            .env("RUST_LOG", "trace")
            .env("TEST_KEY", KEY)
            .env("GATEWAY_CONFIG", &file)
            .env("GATEWAY_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    };

    let check = command().arg("--check-config").output().await.unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{out}");
    assert_clean("--check-config", &out);

    let mut child = command().spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (addrs_tx, addrs_rx) = tokio::sync::oneshot::channel();
    let reader = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let (mut grpc, mut admin, mut tx) = (None, None, Some(addrs_tx));
            while let Ok(Some(line)) = lines.next_line().await {
                let field = |name: &str| {
                    line.split(&format!("{name}="))
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .map(str::to_string)
                };
                if line.contains("provider-gateway serving") {
                    grpc = field("listen");
                }
                if line.contains("serving /metrics") {
                    admin = field("admin");
                }
                if let (Some(g), Some(a)) = (&grpc, &admin)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send((g.clone(), a.clone()));
                }
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    let (grpc, admin) = tokio::time::timeout(Duration::from_secs(30), addrs_rx)
        .await
        .expect("the binary starts")
        .expect("both addresses logged");
    let client = GatewayClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let list = call_every_path(&world, client).await;
    assert_clean("ListProviders", &list);

    let mut socket = tokio::net::TcpStream::connect(&admin).await.unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut metrics = String::new();
    socket.read_to_string(&mut metrics).await.unwrap();
    assert!(metrics.contains("200"), "{metrics}");
    assert_clean("/metrics", &metrics);

    child.kill().await.unwrap();
    reader.await.unwrap();
    let log = log.lock().unwrap().clone();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logs on"
    );
    assert_clean("the binary's stderr", &log);
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
