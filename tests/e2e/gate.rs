//! The attempt gate (issue 10): every upstream request of a call, whether a
//! first attempt, a retry, a hedge, a resume continuation, a fallback hop or
//! a breaker probe, takes the same deadline, breaker permit, budget draw,
//! attempt number and span. One test per defect of issue 10, each against a
//! scripted upstream and the real gateway on 127.0.0.1:0, asserting what a
//! caller sees: status codes, attempt counts, upstream request counts,
//! timings within generous windows, span names and metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use provider_gateway_client::v1::content_delta::Delta;
use provider_gateway_client::v1::stream_response::Event;
use provider_gateway_client::{RawClient, request, v1};
use provider_gateway_server::config::TelemetryConfig;
use provider_gateway_server::telemetry::{Settings, SpanSink, Telemetry};
use provider_gateway_server::{Config, Registry};
use serde_json::json;
use tonic::Code;
use tonic::metadata::MetadataMap;
use tonic_types::StatusExt;

use crate::anthropic::text_stream;
use crate::resilience::anthropic_ok;
use crate::support::{
    ENV, Gateway, Reply, ScriptedClock, Step, Upstream, provider_config, sse_event,
};

// === helpers ===

fn anthropic_error(status: u16, kind: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

fn overloaded() -> Reply {
    anthropic_error(503, "overloaded_error", "scripted 503")
}

fn openai_ok(text: &str) -> Reply {
    Reply::json(
        200,
        json!({
            "id": "c", "model": "gpt", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}
        }),
    )
}

/// An anthropic provider `p` at `upstream`; `extra` goes into its section.
fn anthropic(upstream: &Upstream, extra: &str) -> String {
    provider_config("anthropic", &upstream.url(), extra)
}

/// A request carrying `metadata` and, when given, a `grpc-timeout`.
pub fn with<T>(
    message: T,
    metadata: &[(&'static str, &str)],
    deadline: Option<Duration>,
) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    for (key, value) in metadata {
        req.metadata_mut().insert(*key, value.parse().unwrap());
    }
    if let Some(d) = deadline {
        req.set_timeout(d);
    }
    req
}

pub fn attempts_in(metadata: &MetadataMap) -> Option<u32> {
    metadata
        .get("x-gateway-attempts")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn attempts_of(status: &tonic::Status) -> u32 {
    attempts_in(status.metadata()).expect("x-gateway-attempts in the error metadata")
}

/// A whole answer as the caller sees it.
#[derive(Debug)]
pub struct Answer {
    pub text: String,
    /// `x-gateway-attempts`.
    pub attempts: u32,
    /// `x-gateway-provider`.
    pub provider: String,
}

pub async fn complete(
    gw: &Gateway,
    metadata: &[(&'static str, &str)],
    deadline: Option<Duration>,
) -> Result<Answer, tonic::Status> {
    let mut raw = RawClient::connect(gw.url()).await.unwrap();
    let response = raw
        .complete(with(request::user("hi"), metadata, deadline))
        .await?;
    let attempts = attempts_in(response.metadata()).expect("x-gateway-attempts");
    let provider = response
        .metadata()
        .get("x-gateway-provider")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = response
        .into_inner()
        .content
        .iter()
        .filter_map(|c| match &c.block {
            Some(v1::content_block::Block::Text(t)) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    Ok(Answer {
        text,
        attempts,
        provider,
    })
}

/// A stream as the caller sees it: its events, its text, and how it ended.
#[derive(Debug, Default)]
pub struct Streamed {
    pub events: Vec<Event>,
    pub text: String,
    /// The final status when it did not end OK.
    pub status: Option<tonic::Status>,
    /// The trailers when it ended OK.
    pub trailers: Option<MetadataMap>,
}

impl Streamed {
    fn start_attempt(&self) -> Option<u32> {
        self.events.iter().find_map(|e| match e {
            Event::Start(s) => Some(s.attempt),
            _ => None,
        })
    }

    fn resumed_attempts(&self) -> Vec<u32> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Resumed(r) => Some(r.attempt),
                _ => None,
            })
            .collect()
    }
}

pub async fn stream_with(
    gw: &Gateway,
    message: v1::StreamRequest,
    metadata: &[(&'static str, &str)],
    deadline: Option<Duration>,
) -> Streamed {
    let mut raw = RawClient::connect(gw.url()).await.unwrap();
    let mut out = Streamed::default();
    let mut body = match raw.stream(with(message, metadata, deadline)).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            out.status = Some(status);
            return out;
        }
    };
    loop {
        match body.message().await {
            Ok(Some(response)) => {
                if let Some(event) = response.event {
                    if let Event::Delta(v1::ContentDelta {
                        delta: Some(Delta::Text(t)),
                        ..
                    }) = &event
                    {
                        out.text.push_str(t);
                    }
                    out.events.push(event);
                }
            }
            Ok(None) => {
                out.trailers = body.trailers().await.ok().flatten();
                return out;
            }
            Err(status) => {
                out.status = Some(status);
                return out;
            }
        }
    }
}

async fn stream(gw: &Gateway, metadata: &[(&'static str, &str)]) -> Streamed {
    stream_with(gw, request::to_stream(request::user("hi")), metadata, None).await
}

/// A stream that delivers `texts` and then loses its connection.
fn cut_after(texts: &[&str]) -> Reply {
    let mut steps = text_stream(texts, None);
    steps.push(Step::Cut);
    Reply::sse_steps(steps)
}

fn ev(name: &str, v: serde_json::Value) -> Step {
    Step::Chunk(sse_event(name, &v.to_string()))
}

/// Spans to an in-memory exporter and metrics to a Prometheus registry,
/// for as long as it lives (the subscriber is this thread's default; the
/// test runtime is single-threaded, so the gateway's tasks use it too).
struct Observed {
    exporter: InMemorySpanExporter,
    telemetry: Arc<Telemetry>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Observed {
    fn new() -> Self {
        let exporter = InMemorySpanExporter::default();
        let telemetry = Arc::new(
            Telemetry::new(
                Settings::resolve(&TelemetryConfig::default(), &HashMap::new()).unwrap(),
                SpanSink::Exporter(Box::new(exporter.clone())),
            )
            .unwrap(),
        );
        let guard = tracing::subscriber::set_default(
            telemetry.subscriber_with_writer(std::io::sink, false),
        );
        Self {
            exporter,
            telemetry,
            _guard: guard,
        }
    }

    async fn gateway(&self, toml: &str) -> Gateway {
        let config = Config::from_toml(toml).unwrap();
        let env: HashMap<String, String> = ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let registry = Registry::from_config(&config, &env)
            .unwrap()
            .with_metrics(self.telemetry.metrics());
        Gateway::start_registry(registry).await
    }

    /// The finished spans, once the server span of the call has ended.
    async fn spans(&self) -> Vec<SpanData> {
        for _ in 0..200 {
            let spans = self.exporter.get_finished_spans().unwrap();
            if spans.iter().any(|s| s.span_kind == SpanKind::Server) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Attempt spans dropped with a cancelled hedge end a moment later.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.exporter.get_finished_spans().unwrap()
    }

    async fn attempt_span_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .spans()
            .await
            .iter()
            .filter(|s| s.name.starts_with("attempt"))
            .map(|s| s.name.to_string())
            .collect();
        names.sort();
        names
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// === 1. a breaker never wedges ===

fn probing_breaker(upstream: &Upstream) -> String {
    anthropic(
        upstream,
        "[providers.p.retry]\nmax_attempts = 1\n\
         [providers.p.breaker]\nconsecutive_failures = 1\ncooldown_ms = 100\nhalf_open_probes = 1\n",
    )
}

/// Calls until one succeeds, for up to `within`; the last outcome.
async fn until_ok(gw: &Gateway, within: Duration) -> Result<Answer, tonic::Status> {
    let started = Instant::now();
    loop {
        let outcome = complete(gw, &[], Some(Duration::from_secs(2))).await;
        if outcome.is_ok() || started.elapsed() > within {
            return outcome;
        }
        tokio::time::sleep(ms(100)).await;
    }
}

/// Issue 10, defect 1: a half-open probe that dies by the caller's deadline
/// gives its probe slot back; the breaker does not stay open for good.
#[tokio::test]
async fn a_probe_that_runs_out_of_deadline_does_not_wedge_the_breaker() {
    let mut script = vec![
        overloaded(),
        anthropic_ok("too late").delay(Duration::from_secs(5)),
    ];
    script.extend((0..10).map(|_| anthropic_ok("healthy")));
    let upstream = Upstream::start(script).await;
    let gw = Gateway::start(&probing_breaker(&upstream), ENV).await;
    assert_eq!(
        complete(&gw, &[], None).await.unwrap_err().code(),
        Code::Unavailable
    );
    tokio::time::sleep(ms(250)).await;

    // The probe: the caller gives up after 1 s (the gateway at 900 ms, its
    // margin off), the upstream answers after 5 s.
    let probe = complete(&gw, &[], Some(ms(1_000))).await.unwrap_err();
    assert_eq!(
        upstream.request_count(),
        2,
        "the probe reached the upstream"
    );
    assert!(
        matches!(probe.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{probe:?}"
    );

    tokio::time::sleep(ms(250)).await;
    let answer = until_ok(&gw, Duration::from_millis(1500)).await.expect(
        "the provider is healthy again: calls must succeed, not meet an open breaker forever",
    );
    assert_eq!(answer.text, "healthy");
}

/// Issue 10, defect 1: a half-open probe whose caller cancels the call
/// gives its probe slot back; the breaker does not stay open for good.
#[tokio::test]
async fn a_probe_cancelled_by_its_caller_does_not_wedge_the_breaker() {
    let mut script = vec![
        overloaded(),
        anthropic_ok("never read").delay(Duration::from_secs(5)),
    ];
    script.extend((0..10).map(|_| anthropic_ok("healthy")));
    let upstream = Upstream::start(script).await;
    let gw = Gateway::start(&probing_breaker(&upstream), ENV).await;
    assert_eq!(
        complete(&gw, &[], None).await.unwrap_err().code(),
        Code::Unavailable
    );
    tokio::time::sleep(ms(250)).await;

    let url = gw.url();
    let probe = tokio::spawn(async move {
        let mut raw = RawClient::connect(url).await.unwrap();
        let _ = raw.complete(tonic::Request::new(request::user("hi"))).await;
    });
    let waiting = Instant::now();
    while upstream.request_count() < 2 {
        assert!(
            waiting.elapsed() < Duration::from_secs(2),
            "the probe never reached the upstream"
        );
        tokio::time::sleep(ms(10)).await;
    }
    // The caller goes away mid-flight.
    probe.abort();
    let _ = probe.await;

    tokio::time::sleep(ms(250)).await;
    let answer = until_ok(&gw, Duration::from_millis(1500)).await.expect(
        "the provider is healthy again: calls must succeed, not meet an open breaker forever",
    );
    assert_eq!(answer.text, "healthy");
}

// === 2. a caller's own settings never open the shared breaker ===

/// Issue 10, defect 2: calls that time out only because of their own
/// `x-retry-per-try-timeout-ms: 1` do not open the breaker other callers use.
#[tokio::test]
async fn a_callers_tiny_per_try_timeout_does_not_open_the_breaker_for_others() {
    let upstream = Upstream::start(vec![anthropic_ok("served").delay(ms(50)); 20]).await;
    let toml = anthropic(
        &upstream,
        "[providers.p.retry]\nmax_attempts = 1\n\
         [providers.p.breaker]\nconsecutive_failures = 3\ncooldown_ms = 60000\n",
    );
    let gw = Gateway::start(&toml, ENV).await;
    for _ in 0..6 {
        let impatient = complete(
            &gw,
            &[
                ("x-retry-per-try-timeout-ms", "1"),
                ("x-retry-max-attempts", "1"),
            ],
            None,
        )
        .await;
        assert!(
            impatient.is_err(),
            "1 ms is too short for this upstream: {impatient:?}"
        );
    }
    let answer = complete(&gw, &[], None)
        .await
        .expect("another caller is not refused by a breaker the impatient caller opened");
    assert_eq!((answer.text.as_str(), answer.attempts), ("served", 1));
}

// === 3. a committed stream's deadline counts from the call's arrival ===

/// Issue 10, defect 3: a stream that needed a retry (and a 1.5 s wait)
/// before its first delta still ends by the caller's deadline of 3 s,
/// counted from the call's arrival, not from the commit.
///
/// The gateway answers 250 ms before a deadline (its margin): at 2.75 s
/// from the arrival. A deadline counted from the commit ends no earlier
/// than the wait plus that, 4.25 s; the bound of 3.9 s lies between, with
/// over a second to spare. The retry is granted while 1.55 s (the wait and
/// a useful attempt) remain: the first 503 may come 1.2 s late.
#[tokio::test]
async fn a_stream_retried_before_its_first_delta_ends_by_the_callers_deadline() {
    let mut steps = text_stream(&["tick 0"], None);
    steps.pop(); // no content_block_stop: the text goes on (for 6 s, past
    // where a deadline counted from the commit would end it)
    for i in 1..31 {
        steps.push(Step::Sleep(ms(200)));
        steps.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": format!(" tick {i}")}}),
        ));
    }
    let upstream = Upstream::start(vec![
        overloaded().header("retry-after-ms", "1500"),
        Reply::sse_steps(steps),
    ])
    .await;
    let gw = Gateway::start(&anthropic(&upstream, ""), ENV).await;
    let started = Instant::now();
    let streamed = tokio::time::timeout(
        Duration::from_secs(10),
        stream_with(
            &gw,
            request::to_stream(request::user("hi")),
            &[
                ("x-retry-initial-backoff-ms", "0"),
                ("x-retry-max-backoff-ms", "0"),
            ],
            Some(Duration::from_secs(3)),
        ),
    )
    .await
    .expect("the stream ends");
    let elapsed = started.elapsed();
    assert_eq!(upstream.request_count(), 2, "one retry before the commit");
    assert!(streamed.text.starts_with("tick 0"), "{streamed:?}");
    let status = streamed
        .status
        .expect("a stream cut by its deadline does not end OK");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed <= ms(3_900),
        "the stream ran {elapsed:?}, past the caller's 3 s deadline (plus 900 ms margin): \
         counted from the commit, it would end after 4.25 s"
    );
}

/// A stand-in gateway whose streams never end: a start, then a text delta
/// every 100 ms. It ignores `grpc-timeout`, so only the client can end them.
mod endless {
    use std::pin::Pin;
    use std::time::Duration;

    use provider_gateway_client::v1;
    use provider_gateway_client::v1::provider_gateway_server::{
        ProviderGateway, ProviderGatewayServer,
    };
    use tonic::{Request, Response, Status};

    struct Endless;

    type Events =
        Pin<Box<dyn futures_util::Stream<Item = Result<v1::StreamResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl ProviderGateway for Endless {
        async fn complete(
            &self,
            _: Request<v1::CompleteRequest>,
        ) -> Result<Response<v1::CompleteResponse>, Status> {
            Err(Status::unimplemented("streams only"))
        }

        type StreamStream = Events;

        async fn stream(&self, _: Request<v1::StreamRequest>) -> Result<Response<Events>, Status> {
            let events = futures_util::stream::unfold(0u32, |n| async move {
                let event = if n == 0 {
                    v1::stream_response::Event::Start(v1::StreamStart::default())
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    v1::stream_response::Event::Delta(v1::ContentDelta {
                        index: 0,
                        delta: Some(v1::content_delta::Delta::Text(format!("tick {n} "))),
                    })
                };
                let response = v1::StreamResponse { event: Some(event) };
                Some((Ok(response), n + 1))
            });
            Ok(Response::new(Box::pin(events)))
        }

        async fn list_providers(
            &self,
            _: Request<v1::ListProvidersRequest>,
        ) -> Result<Response<v1::ListProvidersResponse>, Status> {
            Err(Status::unimplemented("streams only"))
        }
    }

    /// Serves it on 127.0.0.1:0; its URL.
    pub async fn start() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ProviderGatewayServer::new(Endless))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }
}

/// Issue 10, defect 3: the project's Rust client bounds a stream by the
/// call's deadline too, even when the server never ends it.
#[tokio::test]
async fn the_rust_client_ends_a_stream_at_its_deadline() {
    use futures_util::StreamExt;
    let url = endless::start().await;
    let mut client = provider_gateway_client::GatewayClient::connect(url)
        .await
        .unwrap();
    let started = Instant::now();
    let mut events = client
        .stream(
            request::user("hi"),
            &provider_gateway_client::CallOptions::new().deadline(ms(500)),
        )
        .await
        .unwrap();
    let last = tokio::time::timeout(Duration::from_secs(5), async {
        let mut last = None;
        while let Some(item) = events.next().await {
            let failed = item.is_err();
            last = Some(item);
            if failed {
                break;
            }
        }
        last
    })
    .await
    .expect("the client ends a stream whose deadline has passed");
    let elapsed = started.elapsed();
    // The server never ends it: a stream that ended at all was ended by
    // the client; 1.5 s of slack for a loaded machine.
    assert!(
        elapsed <= ms(2_000),
        "the stream ran {elapsed:?} past its 500 ms deadline"
    );
    let error = last
        .expect("events")
        .expect_err("a stream cut by its deadline is an error");
    if let Some(status) = error.status() {
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
}

// === 4. hedging respects the attempt limit ===

fn hedged(upstream: &Upstream, extra: &str) -> String {
    anthropic(upstream, &format!("hedge_after_ms = 100\n{extra}"))
}

/// Issue 10, defect 4: `x-retry-max-attempts: 1` means no hedge either.
#[tokio::test]
async fn one_attempt_allowed_means_no_hedge() {
    let upstream = Upstream::start(vec![
        anthropic_ok("slow").delay(ms(600)),
        anthropic_ok("hedge"),
    ])
    .await;
    let gw = Gateway::start(&hedged(&upstream, ""), ENV).await;
    let answer = complete(&gw, &[("x-retry-max-attempts", "1")], None)
        .await
        .unwrap();
    assert_eq!(
        upstream.request_count(),
        1,
        "a hedge was sent despite x-retry-max-attempts: 1"
    );
    assert_eq!((answer.text.as_str(), answer.attempts), ("slow", 1));
}

/// Issue 10, defect 4: a caller that retries itself
/// (`grpc-previous-rpc-attempts: 1`) gets one upstream request, no hedge.
#[tokio::test]
async fn a_caller_retrying_itself_gets_no_hedge() {
    let upstream = Upstream::start(vec![
        anthropic_ok("slow").delay(ms(600)),
        anthropic_ok("hedge"),
    ])
    .await;
    let gw = Gateway::start(&hedged(&upstream, ""), ENV).await;
    let answer = complete(&gw, &[("grpc-previous-rpc-attempts", "1")], None)
        .await
        .unwrap();
    assert_eq!(
        upstream.request_count(),
        1,
        "a hedge was sent for a caller retrying itself"
    );
    assert_eq!((answer.text.as_str(), answer.attempts), ("slow", 1));
}

/// Issue 10, defect 4: a hedged pair that both time out are two attempts:
/// with `max_attempts = 2` nothing follows them, and `x-gateway-attempts`
/// says 2, the number of upstream requests made.
#[tokio::test]
async fn a_hedged_pair_that_times_out_counts_as_two_attempts() {
    let upstream =
        Upstream::start(vec![anthropic_ok("late").delay(Duration::from_secs(5)); 6]).await;
    let toml = hedged(
        &upstream,
        "[providers.p.retry]\nmax_attempts = 2\nper_try_timeout_ms = 300\ninitial_backoff_ms = 0\nmax_backoff_ms = 0\n",
    );
    let gw = Gateway::start(&toml, ENV).await;
    let status = complete(&gw, &[], None).await.unwrap_err();
    let made = upstream.request_count();
    assert_eq!(
        (attempts_of(&status), made),
        (2, 2),
        "x-gateway-attempts vs upstream requests: {status:?}"
    );
}

/// Issue 10, defect 4: each upstream request of a hedged call has its own
/// attempt span; never two spans named "attempt 2".
#[tokio::test]
async fn the_attempt_spans_of_a_hedged_call_have_distinct_names() {
    let observed = Observed::new();
    let upstream =
        Upstream::start(vec![anthropic_ok("late").delay(Duration::from_secs(5)); 6]).await;
    let toml = hedged(
        &upstream,
        "[providers.p.retry]\nmax_attempts = 3\nper_try_timeout_ms = 300\ninitial_backoff_ms = 0\nmax_backoff_ms = 0\n",
    );
    let gw = observed.gateway(&toml).await;
    let status = complete(&gw, &[], None).await.unwrap_err();
    let names = observed.attempt_span_names().await;
    assert_eq!(
        names,
        ["attempt 1", "attempt 2", "attempt 3"],
        "one span per upstream request, numbered once each"
    );
    assert_eq!((attempts_of(&status), upstream.request_count()), (3, 3));
}

// === 5. mid-stream resume goes through the gate ===

fn resumable(upstream: &Upstream) -> String {
    anthropic(upstream, "stream_resume = true")
}

/// A stream cut after two text deltas, with a continuation ready, asked
/// with `metadata`: the caller may not retry, so no continuation is sent
/// and the broken stream ends UNAVAILABLE after one upstream request.
async fn assert_not_resumed(metadata: (&'static str, &'static str)) {
    let upstream = Upstream::start(vec![
        cut_after(&["The ", "quick "]),
        Reply::sse_steps(text_stream(&["brown"], Some("end_turn"))),
    ])
    .await;
    let gw = Gateway::start(&resumable(&upstream), ENV).await;
    let streamed = stream(&gw, &[metadata]).await;
    assert_eq!(
        upstream.request_count(),
        1,
        "{metadata:?}: a continuation was sent"
    );
    let status = streamed
        .status
        .unwrap_or_else(|| panic!("{metadata:?}: the broken stream ended OK"));
    assert_eq!(status.code(), Code::Unavailable, "{metadata:?}: {status:?}");
    assert_eq!(streamed.text, "The quick ", "{metadata:?}");
}

/// Issue 10, defect 5: `x-retry-max-attempts: 1` means no resume either.
#[tokio::test]
async fn a_stream_allowed_one_attempt_is_not_resumed() {
    assert_not_resumed(("x-retry-max-attempts", "1")).await;
}

/// Issue 10, defect 5: `x-retry-on: none` means no resume either.
#[tokio::test]
async fn a_stream_that_retries_no_class_is_not_resumed() {
    assert_not_resumed(("x-retry-on", "none")).await;
}

/// Issue 10, defect 5: a caller retrying itself
/// (`grpc-previous-rpc-attempts: 1`) gets no resume.
#[tokio::test]
async fn a_stream_of_a_caller_retrying_itself_is_not_resumed() {
    assert_not_resumed(("grpc-previous-rpc-attempts", "1")).await;
}

/// Issue 10, defect 5: a break that is not transient (an
/// `invalid_request_error` event after content) is not resumed.
#[tokio::test]
async fn a_non_transient_break_is_not_resumed() {
    let mut steps = text_stream(&["The ", "quick "], None);
    steps.push(ev(
        "error",
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad turn"}}),
    ));
    let upstream = Upstream::start(vec![
        Reply::sse_steps(steps),
        Reply::sse_steps(text_stream(&["brown"], Some("end_turn"))),
    ])
    .await;
    let gw = Gateway::start(&resumable(&upstream), ENV).await;
    let streamed = stream(&gw, &[]).await;
    assert_eq!(
        upstream.request_count(),
        1,
        "a non-transient break was resumed"
    );
    let status = streamed.status.expect("the broken stream does not end OK");
    assert!(status.message().contains("bad turn"), "{status:?}");
}

/// Issue 10, defect 5: after a resume, the trailers count the continuation
/// (`x-gateway-attempts: 2`), in agreement with the start (attempt 1) and
/// resumed (attempt 2) events.
#[tokio::test]
async fn a_resumed_stream_reports_the_continuation_in_its_trailers() {
    let upstream = Upstream::start(vec![
        cut_after(&["The ", "quick "]),
        Reply::sse_steps(text_stream(&["brown"], Some("end_turn"))),
    ])
    .await;
    let gw = Gateway::start(&resumable(&upstream), ENV).await;
    let streamed = stream(&gw, &[]).await;
    assert!(streamed.status.is_none(), "{:?}", streamed.status);
    assert_eq!(streamed.text, "The quick brown");
    assert_eq!(streamed.start_attempt(), Some(1));
    assert_eq!(streamed.resumed_attempts(), [2]);
    let trailers = streamed.trailers.expect("trailers");
    assert_eq!(attempts_in(&trailers), Some(2), "{trailers:?}");
    assert_eq!(upstream.request_count(), 2);
}

/// Issue 10, defect 5: a continuation that fails (a 400) is an attempt
/// (`x-gateway-attempts: 2`), and its own error reaches the caller.
#[tokio::test]
async fn a_failed_continuation_is_counted_and_its_error_reported() {
    let upstream = Upstream::start(vec![
        cut_after(&["The ", "quick "]),
        anthropic_error(
            400,
            "invalid_request_error",
            "continuation refused: zebra-42",
        ),
    ])
    .await;
    let gw = Gateway::start(&resumable(&upstream), ENV).await;
    let streamed = stream(&gw, &[]).await;
    assert_eq!(upstream.request_count(), 2, "the continuation was sent");
    let status = streamed.status.expect("the stream does not end OK");
    assert_eq!(attempts_of(&status), 2, "{status:?}");
    assert!(
        status.message().contains("zebra-42"),
        "the continuation's own error is lost: {}",
        status.message()
    );
}

/// Issue 10, defect 5: the continuation asks for fewer tokens than the
/// original request, since part of the answer was already delivered.
#[tokio::test]
async fn a_continuation_asks_for_fewer_tokens() {
    let upstream = Upstream::start(vec![
        cut_after(&["The ", "quick ", "brown"]),
        Reply::sse_steps(text_stream(&[" fox"], Some("end_turn"))),
    ])
    .await;
    let gw = Gateway::start(&resumable(&upstream), ENV).await;
    let mut req = request::user("hi");
    req.max_tokens = Some(100);
    let streamed = stream_with(&gw, request::to_stream(req), &[], None).await;
    assert!(streamed.status.is_none(), "{:?}", streamed.status);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].body["max_tokens"], 100);
    let rest = requests[1].body["max_tokens"].as_u64().expect("max_tokens");
    assert!(
        (1..100).contains(&rest),
        "the continuation asked for {rest} tokens, not fewer than the original 100"
    );
}

// === 6. a resume after text ending in whitespace ===

/// Runs a resume whose delivered text is "Hello world. " (trailing space)
/// and whose continuation says `continuation`; returns the caller's text
/// and the continuation request's prefill.
async fn resume_after_trailing_space(continuation: &str) -> (String, serde_json::Value) {
    let upstream = Upstream::start(vec![
        cut_after(&["Hello", " world. "]),
        Reply::sse_steps(text_stream(&[continuation], Some("end_turn"))),
    ])
    .await;
    let gw = Gateway::start(&resumable(&upstream), ENV).await;
    let streamed = stream(&gw, &[]).await;
    assert!(streamed.status.is_none(), "{:?}", streamed.status);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    let prefill = requests[1].body["messages"]
        .as_array()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    (streamed.text, prefill)
}

/// Issue 10, defect 6: the prefill is sent without its trailing whitespace
/// (Anthropic rejects it otherwise), and the continuation's leading space,
/// which repeats the trimmed one, is not doubled.
#[tokio::test]
async fn a_resume_after_a_trailing_space_neither_loses_nor_doubles_it() {
    let (text, prefill) = resume_after_trailing_space(" Next part.").await;
    assert_eq!(
        prefill,
        json!({"role": "assistant", "content": [{"type": "text", "text": "Hello world."}]}),
        "the final assistant turn may not end in whitespace"
    );
    assert_eq!(text, "Hello world. Next part.");
}

/// Issue 10, defect 6: a continuation that starts without whitespace still
/// follows the delivered trailing space exactly once.
#[tokio::test]
async fn a_resume_after_a_trailing_space_keeps_it_when_the_continuation_has_none() {
    let (text, prefill) = resume_after_trailing_space("Next part.").await;
    assert_eq!(
        prefill,
        json!({"role": "assistant", "content": [{"type": "text", "text": "Hello world."}]}),
        "the final assistant turn may not end in whitespace"
    );
    assert_eq!(text, "Hello world. Next part.");
}

// === 7. a backoff that cannot fit the deadline ===

/// Backoffs of up to an hour: a full-jitter draw fits a 2 s deadline with
/// a chance of 1 in 1800 (and the scripted clock's seed is fixed).
const HOUR_BACKOFF: &str = "[providers.primary.retry]\nmax_attempts = 3\ninitial_backoff_ms = 3600000\nmax_backoff_ms = 3600000\n";

fn primary_with_backup(primary: &Upstream, backup: &Upstream) -> String {
    format!(
        "default_provider = \"primary\"\n\
         [providers.primary]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\nfallback = [\"backup\"]\n\
         {HOUR_BACKOFF}\
         [providers.backup]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n",
        primary.url(),
        backup.url()
    )
}

fn primary_alone(primary: &Upstream) -> String {
    format!(
        "default_provider = \"primary\"\n\
         [providers.primary]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n\
         {HOUR_BACKOFF}",
        primary.url()
    )
}

/// Issue 10, defect 7: when the backoff cannot fit the deadline and a
/// fallback remains, the fallback serves the call.
#[tokio::test]
async fn a_backoff_that_cannot_fit_the_deadline_takes_the_fallback() {
    let primary = Upstream::start(vec![overloaded(), anthropic_ok("never")]).await;
    let backup = Upstream::start(vec![openai_ok("from backup")]).await;
    let gw = Gateway::start_scripted(
        &primary_with_backup(&primary, &backup),
        ENV,
        ScriptedClock::new(),
    )
    .await;
    let answer = complete(&gw, &[], Some(Duration::from_secs(2)))
        .await
        .expect("the fallback serves the call");
    assert_eq!(
        (answer.text.as_str(), answer.provider.as_str()),
        ("from backup", "backup")
    );
    assert_eq!((primary.request_count(), backup.request_count()), (1, 1));
}

/// Issue 10, defect 7: when the backoff cannot fit the deadline and no hop
/// remains, the call ends at once with the upstream's class (UNAVAILABLE
/// for a 503), not DEADLINE_EXCEEDED while time remains.
#[tokio::test]
async fn a_backoff_that_cannot_fit_without_a_fallback_answers_with_the_upstream_class() {
    let primary = Upstream::start(vec![overloaded(), anthropic_ok("never")]).await;
    let gw = Gateway::start_scripted(&primary_alone(&primary), ENV, ScriptedClock::new()).await;
    let started = Instant::now();
    let status = complete(&gw, &[], Some(Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered while time remained"
    );
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(primary.request_count(), 1);
}

/// Issue 10, defect 7: a 429 whose wait cannot fit the deadline, with no
/// hop left, is RESOURCE_EXHAUSTED with RetryInfo, not DEADLINE_EXCEEDED.
#[tokio::test]
async fn a_rate_limit_whose_wait_cannot_fit_answers_resource_exhausted_with_retry_info() {
    let primary = Upstream::start(vec![
        anthropic_error(429, "rate_limit_error", "slow down"),
        anthropic_ok("never"),
    ])
    .await;
    let gw = Gateway::start_scripted(&primary_alone(&primary), ENV, ScriptedClock::new()).await;
    let status = complete(&gw, &[], Some(Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.get_error_details().retry_info().is_some(),
        "RetryInfo tells the caller to wait: {status:?}"
    );
    assert_eq!(primary.request_count(), 1);
}

// === 8. the breaker's cooldown is capped ===

/// Issue 10, defect 8: a `retry-after: 86400` opens the breaker for at most
/// `max_cooldown_ms`, not for a day.
#[tokio::test]
async fn a_day_long_retry_after_opens_the_breaker_no_longer_than_max_cooldown() {
    let mut script = vec![
        anthropic_error(429, "rate_limit_error", "come back tomorrow")
            .header("retry-after", "86400"),
    ];
    script.extend((0..5).map(|_| anthropic_ok("healthy")));
    let upstream = Upstream::start(script).await;
    let toml = anthropic(
        &upstream,
        "[providers.p.retry]\nmax_attempts = 1\n\
         [providers.p.breaker]\nconsecutive_failures = 1\ncooldown_ms = 50\nmax_cooldown_ms = 200\n",
    );
    let gw = Gateway::start(&toml, ENV).await;
    assert_eq!(
        complete(&gw, &[], None).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    tokio::time::sleep(ms(400)).await;
    let answer = complete(&gw, &[], None)
        .await
        .expect("the breaker's cooldown is capped at max_cooldown_ms = 200");
    assert_eq!(answer.text, "healthy");
}

// === 9. smaller defects ===

/// Issue 10, defect 9: streams that always break after their first delta
/// are upstream faults for the breaker; it opens, and the next call is
/// refused at once without an upstream request.
#[tokio::test]
async fn streams_that_break_after_content_open_the_breaker() {
    let upstream = Upstream::start(vec![
        cut_after(&["one"]),
        cut_after(&["one"]),
        Reply::sse_steps(text_stream(&["whole"], Some("end_turn"))),
    ])
    .await;
    let toml = anthropic(
        &upstream,
        "[providers.p.breaker]\nconsecutive_failures = 2\ncooldown_ms = 60000\n",
    );
    let gw = Gateway::start(&toml, ENV).await;
    for _ in 0..2 {
        let streamed = stream(&gw, &[]).await;
        assert_eq!(streamed.status.map(|s| s.code()), Some(Code::Unavailable));
    }
    let started = Instant::now();
    let refused = stream(&gw, &[]).await;
    let status = refused.status.expect("refused by the open breaker");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("circuit breaker"),
        "{}",
        status.message()
    );
    assert_eq!(
        upstream.request_count(),
        2,
        "no upstream request while open"
    );
    // The breaker cools for 60 s: refused at once, not after a wait.
    assert!(started.elapsed() < ms(2_000), "refused fast");
}

/// Issue 10, defect 9: the upstream's `x-should-retry: true` does not
/// override the caller's `x-retry-on: none`.
#[tokio::test]
async fn x_should_retry_true_does_not_override_the_callers_retry_on_none() {
    let upstream = Upstream::start(vec![
        overloaded().header("x-should-retry", "true"),
        anthropic_ok("retried"),
    ])
    .await;
    let toml = anthropic(
        &upstream,
        "[providers.p.retry]\ninitial_backoff_ms = 0\nmax_backoff_ms = 0\n",
    );
    let gw = Gateway::start(&toml, ENV).await;
    let status = complete(&gw, &[("x-retry-on", "none")], None)
        .await
        .unwrap_err();
    assert_eq!(
        upstream.request_count(),
        1,
        "retried against the caller's x-retry-on: none"
    );
    assert_eq!(
        (status.code(), attempts_of(&status)),
        (Code::Unavailable, 1)
    );
}

/// Issue 10, defect 9: `x-retry-on` narrows the operator's `retry_on`,
/// never widens it.
#[tokio::test]
async fn x_retry_on_cannot_widen_the_operators_retry_on() {
    let upstream = Upstream::start(vec![
        anthropic_error(500, "api_error", "scripted 500"),
        anthropic_ok("retried"),
    ])
    .await;
    let toml = anthropic(
        &upstream,
        "[providers.p.retry]\nretry_on = [\"rate-limited\"]\ninitial_backoff_ms = 0\nmax_backoff_ms = 0\n",
    );
    let gw = Gateway::start(&toml, ENV).await;
    let status = complete(&gw, &[("x-retry-on", "server-error")], None)
        .await
        .unwrap_err();
    assert_eq!(
        upstream.request_count(),
        1,
        "the caller widened the operator's retry_on"
    );
    assert_eq!(attempts_of(&status), 1);
}

/// Issue 10, defect 9: Anthropic `ping` events are liveness: a stream that
/// only pings for longer than `stream_idle_timeout_ms`, then goes on, ends
/// OK with all its text.
///
/// Pings every 100 ms for 2.5 s against an idle timeout of 1.5 s: a stall
/// of up to 1.4 s still sees a ping in time, and the pings alone outlast
/// the timeout by a second (timers never fire early: without the pings as
/// liveness the stream surely stalls).
#[tokio::test]
async fn anthropic_pings_keep_a_stream_alive() {
    let mut steps = text_stream(&["Hello"], None);
    steps.pop(); // the block goes on after the pings
    for _ in 0..25 {
        steps.push(Step::Sleep(ms(100)));
        steps.push(ev("ping", json!({"type": "ping"})));
    }
    let rest = text_stream(&[" world"], Some("end_turn"));
    steps.extend(rest.into_iter().skip(3)); // the delta, block stop, message delta and stop
    let upstream = Upstream::start(vec![Reply::sse_steps(steps)]).await;
    let toml = anthropic(
        &upstream,
        "[providers.p.retry]\nstream_idle_timeout_ms = 1500\n",
    );
    let gw = Gateway::start(&toml, ENV).await;
    let streamed = stream(&gw, &[]).await;
    assert!(
        streamed.status.is_none(),
        "pings count as liveness: {:?}",
        streamed.status
    );
    assert_eq!(streamed.text, "Hello world");
    assert_eq!(streamed.start_attempt(), Some(1));
    assert_eq!(upstream.request_count(), 1);
}

/// Issue 10, defect 9: a hedge-eligible call answered before the hedge
/// delay has one attempt span, no phantom "attempt 2".
#[tokio::test]
async fn a_call_answered_before_the_hedge_delay_has_one_attempt_span() {
    let observed = Observed::new();
    let upstream = Upstream::start(vec![anthropic_ok("quick")]).await;
    let gw = observed.gateway(&hedged(&upstream, "")).await;
    let answer = complete(&gw, &[], None).await.unwrap();
    assert_eq!((answer.text.as_str(), answer.attempts), ("quick", 1));
    assert_eq!(observed.attempt_span_names().await, ["attempt 1"]);
}

/// Issue 10, defect 9: a call served by its fallback is one operation in
/// the metrics, not one per hop.
#[tokio::test]
async fn a_call_served_by_a_fallback_is_one_operation_in_the_metrics() {
    let observed = Observed::new();
    let primary = Upstream::start(vec![overloaded()]).await;
    let backup = Upstream::start(vec![openai_ok("from backup")]).await;
    let toml = format!(
        "default_provider = \"primary\"\n\
         [providers.primary]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\nfallback = [\"backup\"]\n\
         [providers.primary.retry]\nmax_attempts = 1\n\
         [providers.backup]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n",
        primary.url(),
        backup.url()
    );
    let gw = observed.gateway(&toml).await;
    let answer = complete(&gw, &[], None).await.unwrap();
    assert_eq!(answer.provider, "backup");
    let metrics = observed.telemetry.prometheus_text();
    let operations: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("gen_ai_client_operation_duration_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(operations, 1, "one call, one operation:\n{metrics}");
}

/// Issue 10, defect 9: a hedged Complete whose first attempt fails for good
/// (401) answers at once, without waiting for the stalled hedge.
///
/// The hedge goes at 100 ms, the 401 comes at 1 s (a stall of up to 900 ms
/// keeps that order), the hedge would answer at 10 s: waiting for it is
/// far past the 5 s bound.
#[tokio::test]
async fn a_final_failure_of_a_hedged_call_answers_without_waiting_for_the_hedge() {
    let upstream = Upstream::start(vec![
        anthropic_error(401, "authentication_error", "bad key").delay(ms(1_000)),
        anthropic_ok("stalled hedge").delay(Duration::from_secs(10)),
    ])
    .await;
    let gw = Gateway::start(&hedged(&upstream, ""), ENV).await;
    let started = Instant::now();
    let outcome = complete(&gw, &[], None).await;
    let elapsed = started.elapsed();
    assert_eq!(upstream.request_count(), 2, "the hedge was sent");
    let status = outcome.expect_err("a 401 is final");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        elapsed < ms(5_000),
        "waited {elapsed:?} for the stalled hedge"
    );
}

// === review: a caller's own per-try timeout is not a silent route ===

/// A caller's `x-retry-per-try-timeout-ms` that runs out before the
/// upstream's headers says nothing about the route: the call retries the
/// primary within its attempts, as the caller asked, before the fallback
/// serves it (it used to fail over after the first attempt).
///
/// The caller's 1 s per-try timeout bounds the backup's attempt too: the
/// backup may be stalled for up to that long and still serve in one.
#[tokio::test]
async fn a_callers_own_per_try_timeout_retries_before_failing_over() {
    let primary =
        Upstream::start(vec![anthropic_ok("late").delay(Duration::from_secs(10)); 3]).await;
    let backup = Upstream::start(vec![anthropic_ok("from backup")]).await;
    let toml = format!(
        "default_provider = \"primary\"\n\
         [providers.primary]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\nfallback = [\"backup\"]\n\
         [providers.primary.retry]\nmax_attempts = 3\ninitial_backoff_ms = 1\nmax_backoff_ms = 1\n\
         [providers.backup]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n",
        primary.url(),
        backup.url()
    );
    let gw = Gateway::start(&toml, ENV).await;
    let answer = complete(
        &gw,
        &[
            ("x-retry-per-try-timeout-ms", "1000"),
            ("x-retry-max-attempts", "2"),
        ],
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (answer.text.as_str(), answer.provider.as_str()),
        ("from backup", "backup")
    );
    assert_eq!(primary.request_count(), 2, "both of the caller's attempts");
    assert_eq!(answer.attempts, 3);
}
