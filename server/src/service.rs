//! The gRPC service: validates each request, translates it to the gateway's
//! own types once, and hands it to the registry. It holds no retry, HTTP or
//! provider logic.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use provider_gateway::v1 as pb;
use tonic::metadata::{KeyAndValueRef, MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::Instrument;
use tracing::field::Empty;

use crate::admission::{Admission, CallKind, Gate};
use crate::auth::ClientIdentity;
use crate::chat::{
    ChatRequest, ChatResponse, Content, Message, Role, StopReason, StreamEvent, ToolChoice,
    ToolSpec, Usage,
};
use crate::error::{ErrorClass, GatewayError};
use crate::registry::{CallOptions, Registry};
use crate::retry::OVERRIDE_PREFIX;

/// Response metadata: how many upstream attempts were made.
pub const ATTEMPTS_HEADER: &str = "x-gateway-attempts";
/// Response metadata: the provider that served (or failed).
pub const PROVIDER_HEADER: &str = "x-gateway-provider";

/// When a call arrived (set by the server's interceptor, before the body is
/// decoded), so the caller's deadline counts from then.
#[derive(Debug, Clone, Copy)]
pub struct Arrival(pub std::time::Instant);

/// The `ProviderGateway` service.
#[derive(Debug, Clone)]
pub struct GatewayService {
    registry: Arc<Registry>,
    gate: Arc<Gate>,
}

impl GatewayService {
    /// A service over `registry`, admitting calls through `gate`.
    pub fn new(registry: Arc<Registry>, gate: Arc<Gate>) -> Self {
        Self { registry, gate }
    }

    /// Checks that the authenticated client (if any) may use the provider
    /// the request names, and applies its retry ceilings.
    /// Everything before a call reaches the registry: admission (shed
    /// load, refuse while draining), the metadata (deadline, overrides),
    /// the client's permissions, and the request's validation.
    fn accept<T: Into<ChatFields>>(
        &self,
        request: Request<T>,
        kind: CallKind,
    ) -> Result<(Admission, CallOptions, ChatRequest), Status> {
        let admission = self.gate.admit(kind)?;
        let mut options = call_options(&request)?;
        let client = request.extensions().get::<Arc<ClientIdentity>>().cloned();
        let fields: ChatFields = request.into_inner().into();
        options.provider.clone_from(&fields.provider);
        if let Some(client) = client {
            self.authorize(&client, &mut options)?;
        }
        // The model goes upstream (into a URL path, for some kinds): its
        // provider checks it first. An unknown provider is answered later.
        if !fields.model.is_empty()
            && let Ok(entry) = self.registry.get(&options.provider)
        {
            entry
                .provider
                .check_model(&fields.model)
                .map_err(|why| Status::invalid_argument(format!("model: {why}")))?;
        }
        Ok((admission, options, chat_request(fields)?))
    }

    fn authorize(&self, client: &ClientIdentity, options: &mut CallOptions) -> Result<(), Status> {
        if let Some(allowed) = &client.providers {
            let entry = self
                .registry
                .get(&options.provider)
                .map_err(|e| status_of(&e))?;
            if !allowed.contains(&entry.name) {
                return Err(Status::permission_denied(format!(
                    "client `{}` may not use provider `{}`",
                    client.name, entry.name
                )));
            }
        }
        options.limits = client.limits.clone();
        // Fallback hops stay within the providers the client may use.
        options.allowed_providers = client.providers.clone();
        Ok(())
    }
}

type StreamBody = Pin<Box<dyn Stream<Item = Result<pb::StreamResponse, Status>> + Send>>;

/// Events a relay gathers before it hands them to the encoder together.
const RELAY_BATCH: usize = 64;
/// A stream is *hot* when two of its batches that emptied what the
/// upstream had ready begin less than this apart.
const HOT_BATCHES: Duration = Duration::from_millis(1);
/// How long a hot stream waits before it reads on, so that what arrives
/// meanwhile is read and written together (tokio's timer may add up to a
/// millisecond).
const HOT_PAUSE: Duration = Duration::from_millis(1);

/// An event as the registry's stream yields it (`None`: the end).
type Polled = Option<Result<StreamEvent, GatewayError>>;

/// The events a relay holds, in order. The first is kept inline, so a
/// slow stream (one event at a time) allocates nothing for them.
#[derive(Default)]
struct Held {
    first: Option<Polled>,
    rest: std::collections::VecDeque<Polled>,
}

impl Held {
    fn push_back(&mut self, event: Polled) {
        if self.first.is_none() {
            self.first = Some(event);
        } else {
            self.rest.push_back(event);
        }
    }

    fn pop_front(&mut self) -> Option<Polled> {
        let first = self.first.take()?;
        self.first = self.rest.pop_front();
        Some(first)
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }
}

/// A committed stream as the caller reads it: each event as a message,
/// and after the stop, an OK status carrying the attempt report as the
/// trailers. Holds the call's admission until it ends or is dropped.
///
/// Events already read from upstream leave together: after taking an
/// event the relay lets the upstream connection's task run once (it
/// yields), and takes whatever that task has decoded by then. What it
/// holds it hands over as soon as the upstream has nothing more ready,
/// after at most `RELAY_BATCH` events, and at once at an error or the end.
/// The encoder writes what it is handed in one go, so a fast upstream
/// costs one HTTP/2 write per batch, not per delta.
///
/// A stream whose batches come faster than one a millisecond (`HOT_BATCHES`:
/// a burst, or a cached answer replayed) would still cost a wake-up, a
/// read and a write every few deltas. Such a *hot* stream, after a batch
/// that emptied what the upstream had ready, waits `HOT_PAUSE` before it
/// reads on: what arrives meanwhile waits in the socket and is read,
/// decoded and written together. A stream at a model's pace (a token every
/// few milliseconds or slower) is never hot and waits for nothing.
///
/// Invariant: every event reaches the caller once and in order; none waits
/// longer than `HOT_PAUSE` plus the timer's granularity (2 ms in all), and
/// an event that follows at least that long a silence of the upstream is
/// handed over at the instant it is read.
struct Relay {
    events: crate::registry::GatewayStream,
    /// Events taken from `events`, not yet handed over, in order.
    held: Held,
    /// Handing `held` over (set when the upstream has nothing ready, at
    /// `RELAY_BATCH`, at an error or at the end).
    flushing: bool,
    /// The flush under way began because the upstream had nothing ready.
    drained: bool,
    /// When the last such flush began.
    last_drained: Option<tokio::time::Instant>,
    /// A hot stream's wait before it reads on (kept for the next one).
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    paused: bool,
    /// The trailers, due after the stop's message.
    trailers: Option<Status>,
    /// The provider that opened the stream (every message names it).
    provider: String,
    /// The provider serving now (a fallback's, after a restart there).
    serving: String,
    first_attempts: u32,
    /// Attempts so far: continuations and restarts add theirs.
    attempts: u32,
    span: tracing::Span,
    _admission: Admission,
}

impl Relay {
    fn new(
        events: crate::registry::GatewayStream,
        provider: &str,
        attempts: u32,
        span: tracing::Span,
        admission: Admission,
    ) -> Self {
        Self {
            events,
            held: Held::default(),
            flushing: false,
            drained: false,
            last_drained: None,
            pause: None,
            paused: false,
            trailers: None,
            provider: provider.to_string(),
            serving: provider.to_string(),
            first_attempts: attempts,
            attempts,
            span,
            _admission: admission,
        }
    }

    /// The next event to hand over, gathering (see [`Relay`]).
    fn next_event(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Polled> {
        use std::task::Poll;
        loop {
            if self.flushing {
                if let Some(event) = self.held.pop_front() {
                    return Poll::Ready(event);
                }
                self.flushing = false;
                if self.drained {
                    self.after_drained();
                }
            }
            if self.paused {
                if let Some(pause) = &mut self.pause {
                    std::task::ready!(pause.as_mut().poll(cx));
                }
                self.paused = false;
            }
            match self.events.as_mut().poll_next(cx) {
                Poll::Pending if self.held.is_empty() => return Poll::Pending,
                Poll::Pending => (self.flushing, self.drained) = (true, true),
                Poll::Ready(event) => {
                    let last = !matches!(event, Some(Ok(_)));
                    self.held.push_back(event);
                    if last || self.held.len() >= RELAY_BATCH {
                        (self.flushing, self.drained) = (true, false);
                    } else {
                        // Let the upstream's connection task decode what
                        // it has already read: tokio polls us again once
                        // the tasks ready now have run (a first poll of
                        // `yield_now` is always pending).
                        let yielded = std::pin::pin!(tokio::task::yield_now());
                        if std::future::Future::poll(yielded, cx).is_ready() {
                            cx.waker().wake_by_ref();
                        }
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// A batch that emptied what the upstream had ready was handed over:
    /// a hot stream (see [`Relay`]) waits before it reads on.
    fn after_drained(&mut self) {
        let now = tokio::time::Instant::now();
        let hot = self
            .last_drained
            .is_some_and(|then| now.saturating_duration_since(then) < HOT_BATCHES);
        self.last_drained = Some(now);
        if hot {
            let until = now + HOT_PAUSE;
            match &mut self.pause {
                Some(pause) => pause.as_mut().reset(until),
                None => self.pause = Some(Box::pin(tokio::time::sleep_until(until))),
            }
            self.paused = true;
        }
    }
}

impl Stream for Relay {
    type Item = Result<pb::StreamResponse, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Err(trailers)));
        }
        loop {
            let message = match std::task::ready!(this.next_event(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(StreamEvent::KeepAlive)) => continue,
                Some(Ok(event @ StreamEvent::Stop(_))) => {
                    let mut trailers = Status::ok("");
                    report(trailers.metadata_mut(), &this.serving, this.attempts);
                    record_status(&this.span, tonic::Code::Ok, Some(trailers.metadata()));
                    this.trailers = Some(trailers);
                    Ok(stream_response(event, &this.provider, this.first_attempts))
                }
                Some(Ok(event)) => {
                    // A continuation or restart adds attempts, and may
                    // come from the next provider of the chain.
                    if let StreamEvent::Resumed {
                        attempt, provider, ..
                    }
                    | StreamEvent::Restarted { attempt, provider } = &event
                    {
                        this.attempts = *attempt;
                        this.serving.clone_from(provider);
                    }
                    Ok(stream_response(event, &this.provider, this.first_attempts))
                }
                Some(Err(error)) => {
                    let status = status_of(&error);
                    record_status(&this.span, status.code(), Some(status.metadata()));
                    Err(status)
                }
            };
            return Poll::Ready(Some(message));
        }
    }
}

/// The server span of one RPC, a child of the caller's `traceparent`.
/// Without an OpenTelemetry layer ([`crate::telemetry::spans_exported`])
/// only what the log lines show is built: the span and its method.
fn server_span(method: &'static str, metadata: &MetadataMap) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !crate::telemetry::spans_exported() {
        // Nothing exports it: the span is only the log lines' context, and
        // at `info` the few lines a call writes name their provider
        // themselves. It is kept where debugging reads it.
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return tracing::Span::none();
        }
        return tracing::info_span!("rpc", rpc.method = method);
    }
    let otel_name = match method {
        "Complete" => "provider_gateway.v1.ProviderGateway/Complete",
        "Stream" => "provider_gateway.v1.ProviderGateway/Stream",
        "ListProviders" => "provider_gateway.v1.ProviderGateway/ListProviders",
        _ => method,
    };
    let span = tracing::info_span!(
        "rpc",
        otel.name = %otel_name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = crate::SERVICE_NAME,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        gateway.attempts = Empty,
        gateway.provider = Empty,
        trace_id = Empty,
    );
    let _ = span.set_parent(crate::telemetry::extract_parent(metadata));
    let trace_id = {
        use opentelemetry::trace::TraceContextExt;
        span.context().span().span_context().trace_id()
    };
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", trace_id.to_string());
    }
    span
}

/// Records how an RPC ended on its server span (OpenTelemetry attributes:
/// nothing to do when no layer exports them).
fn record_status(span: &tracing::Span, code: tonic::Code, metadata: Option<&MetadataMap>) {
    if !crate::telemetry::spans_exported() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i64);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
    let text = |key: &str| {
        metadata
            .and_then(|m| m.get(key))
            .and_then(|v| v.to_str().ok())
    };
    if let Some(attempts) = text(ATTEMPTS_HEADER).and_then(|v| v.parse::<u32>().ok()) {
        span.record("gateway.attempts", i64::from(attempts));
    }
    if let Some(provider) = text(PROVIDER_HEADER) {
        span.record("gateway.provider", provider);
    }
}

#[tonic::async_trait]
impl pb::provider_gateway_server::ProviderGateway for GatewayService {
    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let span = server_span("Complete", request.metadata());
        // Instrumenting moves the call's future once more: not for nothing.
        let result = if span.is_none() {
            self.complete_call(request).await
        } else {
            self.complete_call(request).instrument(span.clone()).await
        };
        match &result {
            Ok(r) => record_status(&span, tonic::Code::Ok, Some(r.metadata())),
            Err(s) => record_status(&span, s.code(), Some(s.metadata())),
        }
        result
    }

    type StreamStream = StreamBody;

    async fn stream(
        &self,
        request: Request<pb::StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let span = server_span("Stream", request.metadata());
        let result = if span.is_none() {
            self.stream_call(request, span.clone()).await
        } else {
            self.stream_call(request, span.clone())
                .instrument(span.clone())
                .await
        };
        if let Err(s) = &result {
            record_status(&span, s.code(), Some(s.metadata()));
        }
        result
    }

    async fn list_providers(
        &self,
        request: Request<pb::ListProvidersRequest>,
    ) -> Result<Response<pb::ListProvidersResponse>, Status> {
        let span = server_span("ListProviders", request.metadata());
        let _entered = span.enter();
        let result = self.list(request);
        match &result {
            Ok(r) => record_status(&span, tonic::Code::Ok, Some(r.metadata())),
            Err(s) => record_status(&span, s.code(), Some(s.metadata())),
        }
        result
    }
}

impl GatewayService {
    async fn complete_call(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let (admission, options, chat) = self.accept(request, CallKind::Request)?;
        let done = self
            .registry
            .complete_shared(Arc::new(chat), &options)
            .await
            .map_err(|e| status_of(&e))?;
        drop(admission);
        let mut response = Response::new(complete_response(
            &done.provider,
            done.attempts,
            done.response,
        ));
        report(response.metadata_mut(), &done.provider, done.attempts);
        Ok(response)
    }

    async fn stream_call(
        &self,
        request: Request<pb::StreamRequest>,
        span: tracing::Span,
    ) -> Result<Response<StreamBody>, Status> {
        let (admission, options, chat) = self.accept(request, CallKind::Stream)?;
        let open = self
            .registry
            .stream_shared(Arc::new(chat), &options)
            .await
            .map_err(|e| status_of(&e))?;
        let body = Relay::new(open.events, &open.provider, open.attempt, span, admission);
        let mut response = Response::new(Box::pin(body) as StreamBody);
        report(response.metadata_mut(), &open.provider, open.attempt);
        Ok(response)
    }

    /// Lists the providers; admitted like any call, so a draining or
    /// overloaded gateway refuses it too.
    fn list(
        &self,
        _request: Request<pb::ListProvidersRequest>,
    ) -> Result<Response<pb::ListProvidersResponse>, Status> {
        let _admission = self.gate.admit(CallKind::Request)?;
        let wall = std::time::SystemTime::now();
        // A member's wait, as the wall-clock time it ends.
        let until_unix_ms = |ready_in: Option<Duration>| {
            ready_in
                .and_then(|d| wall.checked_add(d))
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        };
        let providers = self
            .registry
            .summaries()
            .into_iter()
            .map(|p| pb::ProviderInfo {
                name: p.name,
                kind: p.kind.to_string(),
                default_model: p.default_model,
                local_model: p.local_model.map(|m| pb::LocalModel {
                    file_name: m.file_name,
                    parameter_count: m.parameter_count,
                    context_length: m.context_length,
                }),
                members: p
                    .members
                    .into_iter()
                    .map(|m| pb::PoolMember {
                        endpoint_host: m.host,
                        key_env: m.key_env,
                        state: m.state.to_string(),
                        ewma_latency_ms: m.ewma_latency_ms,
                        until_unix_ms: until_unix_ms(m.ready_in),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListProvidersResponse {
            providers,
            default_provider: self.registry.default_provider().to_string(),
        }))
    }
}

/// Writes `x-gateway-provider` and `x-gateway-attempts`.
fn report(metadata: &mut MetadataMap, provider: &str, attempts: u32) {
    // The keys are parsed once; a small count is a static value.
    static PROVIDER_KEY: std::sync::LazyLock<tonic::metadata::AsciiMetadataKey> =
        std::sync::LazyLock::new(|| {
            tonic::metadata::AsciiMetadataKey::from_static(PROVIDER_HEADER)
        });
    static ATTEMPTS_KEY: std::sync::LazyLock<tonic::metadata::AsciiMetadataKey> =
        std::sync::LazyLock::new(|| {
            tonic::metadata::AsciiMetadataKey::from_static(ATTEMPTS_HEADER)
        });
    const COUNTS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    if let Ok(v) = MetadataValue::try_from(provider) {
        metadata.insert(PROVIDER_KEY.clone(), v);
    }
    let count = match COUNTS.get(attempts as usize) {
        Some(text) => MetadataValue::from_static(text),
        None => MetadataValue::from(attempts),
    };
    metadata.insert(ATTEMPTS_KEY.clone(), count);
}

/// The gRPC code of a failed call. Exhaustive, so a new variant or class
/// forces a decision.
fn code_of(error: &GatewayError) -> Code {
    match error {
        GatewayError::InvalidArgument(_) => Code::InvalidArgument,
        GatewayError::UnknownProvider(_) => Code::NotFound,
        GatewayError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
        GatewayError::BreakerOpen { .. } => Code::Unavailable,
        GatewayError::RetryAfterTooLong { .. } => Code::ResourceExhausted,
        // A stream that broke after content is UNAVAILABLE whatever the
        // class: what was delivered cannot be taken back.
        GatewayError::Upstream {
            delivered: Some(_), ..
        } => Code::Unavailable,
        GatewayError::Upstream { error, .. } => match error.class {
            ErrorClass::RateLimited => Code::ResourceExhausted,
            ErrorClass::Overloaded
            | ErrorClass::ServerError
            | ErrorClass::Timeout
            | ErrorClass::TimeoutSilent
            | ErrorClass::Connection
            | ErrorClass::StreamInterrupted
            | ErrorClass::Busy => Code::Unavailable,
            ErrorClass::InvalidRequest | ErrorClass::ContextLength => Code::InvalidArgument,
            // The model or endpoint in the operator's configuration is
            // missing, or the operator's credentials were refused: not the
            // caller's fault.
            ErrorClass::NotFound | ErrorClass::Auth => Code::FailedPrecondition,
            ErrorClass::Cancelled => Code::Cancelled,
        },
    }
}

/// The caller-facing status of `error`: its code, its message, RetryInfo
/// where a wait would help, and the provider and attempts in its metadata
/// when an upstream was called.
fn status_of(error: &GatewayError) -> Status {
    let code = code_of(error);
    // No hint is longer than a day: a caller would not wait longer, and
    // an absurd upstream value must not reach the wire as it is.
    let hint = error
        .retry_after()
        .map(|d| d.min(Duration::from_secs(24 * 3600)));
    let mut status = match hint {
        Some(delay) if matches!(code, Code::ResourceExhausted | Code::Unavailable) => {
            Status::with_error_details(
                code,
                error.message(),
                ErrorDetails::with_retry_info(Some(delay)),
            )
        }
        _ => Status::new(code, error.message()),
    };
    match error {
        GatewayError::Upstream {
            provider, attempts, ..
        }
        | GatewayError::RetryAfterTooLong {
            provider, attempts, ..
        }
        | GatewayError::BreakerOpen {
            provider, attempts, ..
        }
        | GatewayError::DeadlineExceeded {
            provider, attempts, ..
        } => {
            report(status.metadata_mut(), provider, *attempts);
        }
        GatewayError::InvalidArgument(_) | GatewayError::UnknownProvider(_) => {}
    }
    status
}

/// Reads what the registry needs from the request metadata: the caller's
/// deadline (`grpc-timeout` from the call's arrival, less the margin), the `x-retry-*`
/// overrides and `grpc-previous-rpc-attempts`. A malformed value is
/// INVALID_ARGUMENT naming its key, before anything goes upstream.
pub(crate) fn call_options<T>(request: &Request<T>) -> Result<CallOptions, Status> {
    let metadata = request.metadata();
    let waited = request
        .extensions()
        .get::<Arrival>()
        .map_or(Duration::ZERO, |a| a.0.elapsed());
    let text = |key: &str| -> Result<Option<&str>, Status> {
        metadata
            .get(key)
            .map(|v| {
                v.to_str()
                    .map_err(|_| Status::invalid_argument(format!("{key}: not ASCII text")))
            })
            .transpose()
    };
    let timeout = text("grpc-timeout")?
        .map(|v| {
            parse_grpc_timeout(v).ok_or_else(|| {
                Status::invalid_argument(format!("grpc-timeout: `{v}` is malformed"))
            })
        })
        .transpose()?
        .map(|t| {
            t.saturating_sub(crate::call_keys::deadline_margin(t))
                .saturating_sub(waited)
        });
    // Every other key is read from the text metadata; a binary value under
    // a key the gateway reads is refused, naming it.
    let mut pairs = Vec::new();
    for entry in metadata.iter() {
        match entry {
            KeyAndValueRef::Ascii(key, value) => {
                let key = key.as_str();
                if !crate::call_keys::is_call_key(key) {
                    continue;
                }
                let value = value
                    .to_str()
                    .map_err(|_| Status::invalid_argument(format!("{key}: not ASCII text")))?;
                pairs.push((key, value));
            }
            KeyAndValueRef::Binary(key, _) if key.as_str().starts_with(OVERRIDE_PREFIX) => {
                return Err(Status::invalid_argument(format!(
                    "{}: unknown retry override",
                    key.as_str()
                )));
            }
            KeyAndValueRef::Binary(..) => {}
        }
    }
    let mut options = crate::call_keys::call_options(&pairs).map_err(Status::invalid_argument)?;
    options.timeout = timeout;
    Ok(options)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The fields Complete and Stream share.
struct ChatFields {
    provider: String,
    model: String,
    system: String,
    messages: Vec<pb::Message>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop_sequences: Vec<String>,
    tools: Vec<pb::Tool>,
    tool_choice: Option<pb::ToolChoice>,
}

/// Complete and Stream requests carry the same fields.
macro_rules! chat_fields_from {
    ($request:ty) => {
        impl From<$request> for ChatFields {
            fn from(r: $request) -> Self {
                Self {
                    provider: r.provider,
                    model: r.model,
                    system: r.system,
                    messages: r.messages,
                    max_tokens: r.max_tokens,
                    temperature: r.temperature,
                    top_p: r.top_p,
                    stop_sequences: r.stop_sequences,
                    tools: r.tools,
                    tool_choice: r.tool_choice,
                }
            }
        }
    };
}
chat_fields_from!(pb::CompleteRequest);
chat_fields_from!(pb::StreamRequest);

fn invalid(msg: String) -> Status {
    Status::invalid_argument(msg)
}

/// Validates a request the HTTP ingress translated into the gRPC shape, by
/// the same rules as a gRPC call: one validation for every edge.
pub(crate) fn validate_request(request: pb::CompleteRequest) -> Result<ChatRequest, Status> {
    chat_request(request.into())
}

/// Validates a request and translates it. Every error names the field.
fn chat_request(f: ChatFields) -> Result<ChatRequest, Status> {
    if f.messages.is_empty() {
        return Err(invalid("messages: at least one message is required".into()));
    }
    let mut messages = Vec::with_capacity(f.messages.len());
    let mut previous: Option<Role> = None;
    for (i, m) in f.messages.into_iter().enumerate() {
        let role = match pb::Role::try_from(m.role) {
            Ok(pb::Role::User) => Role::User,
            Ok(pb::Role::Assistant) => Role::Assistant,
            Ok(pb::Role::Unspecified) | Err(_) => {
                return Err(invalid(format!(
                    "messages[{i}].role: must be ROLE_USER or ROLE_ASSISTANT"
                )));
            }
        };
        match (previous, role) {
            (None, Role::Assistant) => {
                return Err(invalid(
                    "messages[0].role: the conversation must start with a ROLE_USER message".into(),
                ));
            }
            (Some(p), r) if p == r => {
                return Err(invalid(format!(
                    "messages[{i}].role: roles must alternate between ROLE_USER and ROLE_ASSISTANT"
                )));
            }
            _ => {}
        }
        previous = Some(role);
        if m.content.is_empty() {
            return Err(invalid(format!(
                "messages[{i}].content: a message needs at least one content block"
            )));
        }
        let mut content = Vec::with_capacity(m.content.len());
        for (j, block) in m.content.into_iter().enumerate() {
            content.push(content_block(block, role, i, j)?);
        }
        messages.push(Message { role, content });
    }
    if f.max_tokens == Some(0) {
        return Err(invalid("max_tokens: must be at least 1 when set".into()));
    }
    if let Some(t) = f.temperature
        && !(t.is_finite() && (0.0..=2.0).contains(&t))
    {
        return Err(invalid(format!("temperature: {t} is outside 0.0..=2.0")));
    }
    if let Some(p) = f.top_p
        && !(p.is_finite() && (0.0..=1.0).contains(&p))
    {
        return Err(invalid(format!("top_p: {p} is outside 0.0..=1.0")));
    }
    if let Some(i) = f.stop_sequences.iter().position(String::is_empty) {
        return Err(invalid(format!("stop_sequences[{i}]: must not be empty")));
    }
    let mut tools: Vec<ToolSpec> = Vec::with_capacity(f.tools.len());
    for (i, t) in f.tools.into_iter().enumerate() {
        if t.name.is_empty()
            || t.name.len() > 64
            || !t
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(format!(
                "tools[{i}].name: `{}` must be 1 to 64 letters, digits, `_` or `-`",
                t.name
            )));
        }
        if tools.iter().any(|other| other.name == t.name) {
            return Err(invalid(format!(
                "tools[{i}].name: `{}` is defined twice",
                t.name
            )));
        }
        let schema: serde_json::Value = serde_json::from_str(&t.input_schema_json)
            .map_err(|e| invalid(format!("tools[{i}].input_schema_json: not valid JSON: {e}")))?;
        if !schema.is_object() {
            return Err(invalid(format!(
                "tools[{i}].input_schema_json: must be a JSON Schema object"
            )));
        }
        tools.push(ToolSpec {
            name: t.name,
            description: t.description,
            input_schema: schema,
        });
    }
    let tool_choice = match f.tool_choice {
        None => ToolChoice::Auto,
        Some(c) => match pb::tool_choice::Mode::try_from(c.mode) {
            Ok(pb::tool_choice::Mode::Unspecified | pb::tool_choice::Mode::Auto) => {
                ToolChoice::Auto
            }
            Ok(pb::tool_choice::Mode::Any) => ToolChoice::Any,
            Ok(pb::tool_choice::Mode::None) => ToolChoice::None,
            Ok(pb::tool_choice::Mode::Tool) => {
                if !tools.iter().any(|t| t.name == c.name) {
                    return Err(invalid(format!(
                        "tool_choice.name: `{}` is not one of the request's tools",
                        c.name
                    )));
                }
                ToolChoice::Tool(c.name)
            }
            Err(_) => {
                return Err(invalid(format!(
                    "tool_choice.mode: unknown value {}",
                    c.mode
                )));
            }
        },
    };
    if tools.is_empty() && matches!(tool_choice, ToolChoice::Any) {
        return Err(invalid(
            "tool_choice.mode: MODE_ANY needs at least one tool".into(),
        ));
    }
    Ok(ChatRequest {
        model: f.model,
        system: f.system,
        messages,
        max_tokens: f.max_tokens,
        temperature: f.temperature,
        top_p: f.top_p,
        stop_sequences: f.stop_sequences,
        tools,
        tool_choice,
    })
}

/// Where a content block is in a request: `messages[i].content[j]`.
struct BlockAt(usize, usize);

impl std::fmt::Display for BlockAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "messages[{}].content[{}]", self.0, self.1)
    }
}

fn content_block(
    block: pb::ContentBlock,
    role: Role,
    i: usize,
    j: usize,
) -> Result<Content, Status> {
    use pb::content_block::Block;
    // Formatted only into an error.
    let at = BlockAt(i, j);
    match block.block {
        None => Err(invalid(format!(
            "{at}: empty content block (set text, tool_use or tool_result)"
        ))),
        Some(Block::Text(text)) if text.is_empty() => {
            Err(invalid(format!("{at}.text: must not be empty")))
        }
        Some(Block::Text(text)) => Ok(Content::Text(text)),
        Some(Block::ToolUse(t)) => {
            if role != Role::Assistant {
                return Err(invalid(format!(
                    "{at}.tool_use: only assistant messages carry tool calls"
                )));
            }
            if t.id.is_empty() || t.name.is_empty() {
                return Err(invalid(format!("{at}.tool_use: id and name are required")));
            }
            let input_json = if t.input_json.trim().is_empty() {
                "{}".to_string()
            } else {
                t.input_json
            };
            match serde_json::from_str::<serde_json::Value>(&input_json) {
                Ok(v) if v.is_object() => {}
                Ok(_) => {
                    return Err(invalid(format!(
                        "{at}.tool_use.input_json: must be a JSON object"
                    )));
                }
                Err(e) => {
                    return Err(invalid(format!(
                        "{at}.tool_use.input_json: not valid JSON: {e}"
                    )));
                }
            }
            Ok(Content::ToolUse {
                id: t.id,
                name: t.name,
                input_json,
            })
        }
        Some(Block::ToolResult(r)) => {
            if role != Role::User {
                return Err(invalid(format!(
                    "{at}.tool_result: only user messages carry tool results"
                )));
            }
            if r.tool_use_id.is_empty() {
                return Err(invalid(format!("{at}.tool_result.tool_use_id: required")));
            }
            Ok(Content::ToolResult {
                tool_use_id: r.tool_use_id,
                content: r.content,
                is_error: r.is_error,
            })
        }
    }
}

fn stop_reason(s: StopReason) -> pb::StopReason {
    match s {
        StopReason::EndTurn => pb::StopReason::EndTurn,
        StopReason::MaxTokens => pb::StopReason::MaxTokens,
        StopReason::StopSequence => pb::StopReason::StopSequence,
        StopReason::ToolUse => pb::StopReason::ToolUse,
        StopReason::Refusal => pb::StopReason::Refusal,
        StopReason::ContentFilter => pb::StopReason::ContentFilter,
    }
}

fn usage(u: Usage) -> pb::Usage {
    pb::Usage {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
    }
}

fn complete_response(provider: &str, attempts: u32, r: ChatResponse) -> pb::CompleteResponse {
    use pb::content_block::Block;
    let content = r
        .content
        .into_iter()
        .map(|c| pb::ContentBlock {
            block: Some(match c {
                Content::Text(t) => Block::Text(t),
                Content::ToolUse {
                    id,
                    name,
                    input_json,
                } => Block::ToolUse(pb::ToolUse {
                    id,
                    name,
                    input_json,
                }),
                Content::ToolResult {
                    tool_use_id,
                    content,
                    is_error,
                } => Block::ToolResult(pb::ToolResult {
                    tool_use_id,
                    content,
                    is_error,
                }),
            }),
        })
        .collect();
    pb::CompleteResponse {
        id: r.id,
        provider: provider.to_string(),
        model: r.model,
        content,
        stop_reason: stop_reason(r.stop_reason) as i32,
        usage: Some(usage(r.usage)),
        attempts,
    }
}

/// The wire form of a relayed event (a keep-alive is never relayed; it
/// becomes an empty response, which callers skip).
fn stream_response(event: StreamEvent, provider: &str, attempt: u32) -> pb::StreamResponse {
    use pb::content_delta::Delta;
    use pb::stream_response::Event;
    let delta = |index, delta| {
        Event::Delta(pb::ContentDelta {
            index,
            delta: Some(delta),
        })
    };
    let event = match event {
        StreamEvent::Start { id, model } => Event::Start(pb::StreamStart {
            id,
            provider: provider.to_string(),
            model,
            attempt,
        }),
        StreamEvent::Text { index, text } => delta(index, Delta::Text(text)),
        StreamEvent::ToolUseStart { index, id, name } => {
            delta(index, Delta::ToolUseStart(pb::ToolUseStart { id, name }))
        }
        StreamEvent::ToolInputJson { index, json } => delta(index, Delta::ToolInputJson(json)),
        StreamEvent::Usage(u) => Event::Usage(usage(u)),
        StreamEvent::Resumed {
            attempt,
            provider,
            characters_delivered,
        } => Event::Resumed(pb::StreamResumed {
            attempt,
            provider,
            characters_delivered,
        }),
        StreamEvent::Stop(s) => Event::Stop(pb::StreamStop {
            stop_reason: stop_reason(s) as i32,
        }),
        StreamEvent::Restarted { attempt, provider } => {
            Event::Restarted(pb::StreamRestarted { attempt, provider })
        }
        StreamEvent::KeepAlive => return pb::StreamResponse { event: None },
    };
    pb::StreamResponse { event: Some(event) }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::error::ProviderError;

    #[test]
    fn the_report_names_the_provider_and_counts_every_attempt() {
        for attempts in [0, 1, 9, 10, 11, 255, u32::MAX] {
            let mut metadata = MetadataMap::new();
            report(&mut metadata, "openai-eu", attempts);
            let text = |key| metadata.get(key).and_then(|v| v.to_str().ok());
            assert_eq!(text(PROVIDER_HEADER), Some("openai-eu"));
            assert_eq!(text(ATTEMPTS_HEADER), Some(attempts.to_string().as_str()));
            // Inserting again replaces, never appends.
            report(&mut metadata, "other", 2);
            assert_eq!(metadata.len(), 2);
        }
    }

    /// What a relay scenario's caller saw: each message's text (`Err`: a
    /// status), when it came, and the longest run of messages handed over
    /// without a pause.
    struct Seen {
        texts: Vec<(Result<String, Code>, tokio::time::Instant)>,
        longest_run: usize,
    }

    /// Reads `relay` to its end as tonic's encoder does: message after
    /// message while they are ready.
    async fn read_relay(mut relay: Relay) -> Seen {
        use std::task::Poll;
        let (mut texts, mut run, mut longest_run) = (Vec::new(), 0, 0);
        std::future::poll_fn(|cx| {
            loop {
                match Pin::new(&mut relay).poll_next(cx) {
                    Poll::Pending => {
                        run = 0;
                        return Poll::Pending;
                    }
                    Poll::Ready(None) => return Poll::Ready(()),
                    Poll::Ready(Some(message)) => {
                        run += 1;
                        longest_run = longest_run.max(run);
                        let text = message.map_err(|s| s.code()).map(|m| match m.event {
                            Some(pb::stream_response::Event::Delta(pb::ContentDelta {
                                delta: Some(pb::content_delta::Delta::Text(text)),
                                ..
                            })) => text,
                            Some(pb::stream_response::Event::Stop(_)) => "<stop>".into(),
                            other => format!("{other:?}"),
                        });
                        texts.push((text, tokio::time::Instant::now()));
                    }
                }
            }
        })
        .await;
        Seen { texts, longest_run }
    }

    fn relay_over(
        rx: tokio::sync::mpsc::UnboundedReceiver<Result<StreamEvent, GatewayError>>,
    ) -> Relay {
        let mut rx = rx;
        let events = Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let gate = Arc::new(Gate::new(10, 10));
        let admission = gate.admit(CallKind::Stream).unwrap();
        Relay::new(events, "p", 1, tracing::Span::none(), admission)
    }

    /// The relay's invariant (see [`Relay`]) over generated schedules of
    /// bursts and silences (paused time, seeded): every event reaches the
    /// caller once and in order, none later than 2 ms after the upstream
    /// produced it, and those after a silence of 2 ms or more at once;
    /// keep-alives are dropped, the stop is followed by the OK trailers,
    /// an error ends the stream, and no run of messages is longer than
    /// `RELAY_BATCH`. Hot streams (bursts a scheduler turn apart) and
    /// immediate ones both occur.
    #[test]
    fn the_relay_hands_over_every_event_in_order_within_its_bound() {
        let longest_wait = HOT_PAUSE + Duration::from_millis(1);
        let (mut waited, mut immediate) = (0, 0);
        for seed in 0..300u64 {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let (w, i) = runtime.block_on(async move {
                let rng = crate::retry::Jitter::seeded(seed);
                let below = move |n: usize| (rng.next_unit() * n as f64) as usize;
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let bursts = 1 + below(8);
                let ending = below(3);
                // (what the caller must see, when it was produced, whether
                // a silence of at least `longest_wait` came before).
                let producer = tokio::spawn(async move {
                    let mut sent = Vec::new();
                    let mut n = 0;
                    let mut quiet = true;
                    for burst in 0..bursts {
                        for _ in 0..1 + below(100) {
                            if below(8) == 0 {
                                tx.send(Ok(StreamEvent::KeepAlive)).unwrap();
                            }
                            let text = format!("t{n}");
                            n += 1;
                            tx.send(Ok(StreamEvent::Text {
                                index: 0,
                                text: text.clone(),
                            }))
                            .unwrap();
                            sent.push((Ok(text), tokio::time::Instant::now(), quiet));
                        }
                        if burst + 1 < bursts {
                            let silence = match below(3) {
                                0 => Duration::ZERO,
                                1 => Duration::from_millis(1),
                                _ => Duration::from_millis(2 + below(500) as u64),
                            };
                            if silence.is_zero() {
                                // Scheduler turns, time standing still: the
                                // relay empties the burst first.
                                for _ in 0..300 {
                                    tokio::task::yield_now().await;
                                }
                            } else {
                                tokio::time::sleep(silence).await;
                            }
                            quiet = silence >= longest_wait;
                        }
                    }
                    let now = tokio::time::Instant::now();
                    match ending {
                        0 => {
                            tx.send(Ok(StreamEvent::Stop(StopReason::EndTurn))).unwrap();
                            sent.push((Ok("<stop>".into()), now, quiet));
                            sent.push((Err(Code::Ok), now, quiet));
                        }
                        1 => {
                            let error = ProviderError::new(ErrorClass::StreamInterrupted, "cut");
                            tx.send(Err(GatewayError::Upstream {
                                provider: "p".into(),
                                attempts: 1,
                                error,
                                delivered: None,
                                budget_exhausted: false,
                            }))
                            .unwrap();
                            sent.push((Err(Code::Unavailable), now, quiet));
                        }
                        _ => {}
                    }
                    sent
                });
                let seen = read_relay(relay_over(rx)).await;
                let sent = producer.await.unwrap();
                assert_eq!(
                    seen.texts.iter().map(|(t, _)| t).collect::<Vec<_>>(),
                    sent.iter().map(|(t, ..)| t).collect::<Vec<_>>(),
                    "seed {seed}"
                );
                let (mut waited, mut immediate) = (0, 0);
                for ((text, at), (_, produced, quiet)) in seen.texts.iter().zip(&sent) {
                    let wait = at.duration_since(*produced);
                    assert!(
                        wait <= longest_wait,
                        "seed {seed}: {text:?} waited {wait:?}"
                    );
                    if *quiet {
                        assert_eq!(
                            wait,
                            Duration::ZERO,
                            "seed {seed}: {text:?} after a silence"
                        );
                        immediate += 1;
                    } else if !wait.is_zero() {
                        waited += 1;
                    }
                }
                assert!(
                    seen.longest_run <= RELAY_BATCH + 2,
                    "seed {seed}: a run of {}",
                    seen.longest_run
                );
                (waited, immediate)
            });
            (waited, immediate) = (waited + w, immediate + i);
        }
        // Both kinds of event occur: some waited in a hot stream's pause,
        // many were checked to leave at once.
        assert!(waited > 0 && immediate > 1000, "{waited} {immediate}");
    }

    /// Events already waiting leave together, `RELAY_BATCH` at a time: the
    /// encoder can write them in one go.
    #[tokio::test]
    async fn waiting_events_are_handed_over_together() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..100 {
            tx.send(Ok(StreamEvent::Text {
                index: 0,
                text: format!("t{n}"),
            }))
            .unwrap();
        }
        drop(tx);
        let seen = read_relay(relay_over(rx)).await;
        assert_eq!(seen.texts.len(), 100);
        assert_eq!(seen.longest_run, RELAY_BATCH);
    }

    #[test]
    fn rate_limit_status_carries_retry_info() {
        let mut error = ProviderError::new(ErrorClass::RateLimited, "slow down").with_status(429);
        error.retry_after = Some(Duration::from_secs(3));
        let status = status_of(&GatewayError::Upstream {
            provider: "p".into(),
            attempts: 1,
            error,
            delivered: None,
            budget_exhausted: false,
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("provider `p`"),
            "{}",
            status.message()
        );
        let details = status.get_error_details();
        let info = details.retry_info().cloned();
        assert_eq!(
            info.and_then(|i| i.retry_delay),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            status
                .metadata()
                .get(ATTEMPTS_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
    }

    #[test]
    fn a_stream_broken_after_content_is_unavailable_whatever_the_class() {
        for class in [ErrorClass::RateLimited, ErrorClass::InvalidRequest] {
            let status = status_of(&GatewayError::Upstream {
                provider: "p".into(),
                attempts: 1,
                error: ProviderError::new(class, "x"),
                delivered: Some(3),
                budget_exhausted: false,
            });
            assert_eq!(status.code(), Code::Unavailable, "{class}");
            assert!(status.message().contains("3 content delta"));
        }
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }
}
