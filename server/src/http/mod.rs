//! The HTTP ingress: OpenAI-compatible `POST /v1/chat/completions` and
//! `GET /v1/models`, Anthropic-compatible `POST /v1/messages`, on one
//! listener (HTTP/1.1 and h2c), over the same registry, admission gate and
//! client keys as the gRPC service.
//!
//! Each request passes the same steps as a gRPC call, in the same order:
//! authentication, admission (shed load, refuse while draining), the
//! per-call keys as headers (`x-retry-*`, `x-fallback-providers`, ...,
//! through [`crate::call_keys`]), the deadline, the client's permissions,
//! and the gRPC service's own validation. The SDKs' retry headers are
//! honoured so an official SDK never multiplies the gateway's attempts:
//! `x-stainless-retry-count` > 0 gets one attempt, and error answers carry
//! `x-should-retry` and `retry-after` (see [`errors`]).

mod anthropic;
mod errors;
mod openai;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::admission::{Admission, CallKind, Gate};
use crate::auth::{Authenticator, ClientIdentity};
use crate::registry::{CallOptions, Registry};
use crate::service::{ATTEMPTS_HEADER, PROVIDER_HEADER};

pub(crate) use errors::{Dialect, ErrorKind, HttpError};

/// A response body: whole, or a stream of SSE events.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The shared state of the HTTP ingress.
pub(crate) struct Ingress {
    pub(crate) registry: Arc<Registry>,
    pub(crate) gate: Arc<Gate>,
    pub(crate) auth: Option<Arc<Authenticator>>,
    pub(crate) max_body: usize,
}

/// Serves the ingress on `listener` until `draining` resolves; then the
/// listener closes, and calls on open connections are refused by the gate.
pub(crate) async fn serve_http(
    listener: TcpListener,
    ingress: Arc<Ingress>,
    draining: impl Future<Output = ()> + Send,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that never finishes its request headers is dropped after
    // 30 s instead of holding its connection forever.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    tokio::pin!(draining);
    loop {
        let socket = tokio::select! {
            () = &mut draining => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!("HTTP ingress: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let ingress = ingress.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let ingress = ingress.clone();
                async move { Ok::<_, Infallible>(ingress.handle(request).await) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

impl Ingress {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let arrival = Instant::now();
        let path = request.uri().path();
        let dialect = if path.starts_with("/v1/messages") {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        };
        let route = match (request.method(), path) {
            (&Method::POST, "/v1/chat/completions") => Route::ChatCompletions,
            (&Method::POST, "/v1/messages") => Route::Messages,
            (&Method::GET, "/v1/models") => Route::Models,
            (_, "/v1/chat/completions" | "/v1/messages" | "/v1/models") => {
                return self.error(
                    dialect,
                    &HttpError::new(ErrorKind::MethodNotAllowed, "method not allowed"),
                );
            }
            _ => {
                return self.error(
                    dialect,
                    &HttpError::new(
                        ErrorKind::NotFound,
                        format!("no route for {} {path}", request.method()),
                    ),
                );
            }
        };
        // The OpenTelemetry attributes only when a layer exports them;
        // without one, the span (log lines' context) only for debug logs,
        // as the gRPC server span.
        let span = if crate::telemetry::spans_exported() {
            tracing::info_span!(
                "http",
                otel.name = %format!("{} {}", request.method(), path),
                otel.kind = "server",
                http.request.method = %request.method(),
                http.route = path,
            )
        } else if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::info_span!(
                "http",
                http.request.method = %request.method(),
                http.route = path,
            )
        } else {
            tracing::Span::none()
        };
        let call = async {
            match route {
                Route::ChatCompletions => openai::chat_completions(&self, request, arrival).await,
                Route::Messages => anthropic::messages(&self, request, arrival).await,
                Route::Models => self.models(request, dialect),
            }
        };
        // Instrumenting moves the call's future once more: not for nothing.
        let result = if span.is_none() {
            call.await
        } else {
            call.instrument(span).await
        };
        result.unwrap_or_else(|e| self.error(dialect, &e))
    }

    /// `GET /v1/models`: every provider as `provider/model`, in OpenAI's
    /// list shape, or Anthropic's when the caller sends `anthropic-version`.
    fn models(
        &self,
        request: Request<Incoming>,
        dialect: Dialect,
    ) -> Result<Response<Body>, HttpError> {
        self.authenticate(request.headers())?;
        let _admission = admit(&self.gate, CallKind::Request)?;
        let anthropic =
            dialect == Dialect::Anthropic || request.headers().contains_key("anthropic-version");
        let ids: Vec<(String, String)> = self
            .registry
            .summaries()
            .into_iter()
            .map(|p| (format!("{}/{}", p.name, p.default_model), p.name))
            .collect();
        let body = if anthropic {
            let data: Vec<_> = ids
                .iter()
                .map(|(id, _)| {
                    serde_json::json!({
                        "type": "model", "id": id, "display_name": id,
                        "created_at": "1970-01-01T00:00:00Z",
                    })
                })
                .collect();
            serde_json::json!({
                "data": data, "has_more": false,
                "first_id": ids.first().map(|(id, _)| id),
                "last_id": ids.last().map(|(id, _)| id),
            })
        } else {
            let data: Vec<_> = ids
                .iter()
                .map(|(id, owner)| {
                    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
                })
                .collect();
            serde_json::json!({"object": "list", "data": data})
        };
        Ok(json_response(
            StatusCode::OK,
            &body,
            self.registry.default_provider(),
            0,
        ))
    }

    /// The caller's identity, when the gateway has keys: `authorization:
    /// Bearer <key>` (OpenAI SDK) or `x-api-key: <key>` (Anthropic SDK).
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Arc<ClientIdentity>>, HttpError> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        let key = bearer
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                HttpError::new(
                    ErrorKind::Authentication,
                    "missing `authorization: Bearer <key>` or `x-api-key: <key>`",
                )
            })?;
        auth.identify(key)
            .map(Some)
            .ok_or_else(|| HttpError::new(ErrorKind::Authentication, "the key is not valid"))
    }

    /// Everything before a call reaches the registry, as for gRPC:
    /// authentication, admission, per-call keys and deadline, and the
    /// client's permissions for the provider `target` resolved to.
    pub(crate) fn accept(
        &self,
        headers: &HeaderMap,
        kind: CallKind,
        arrival: Instant,
        target: &Target,
    ) -> Result<Accepted, HttpError> {
        let client = self.authenticate(headers)?;
        let admission = admit(&self.gate, kind)?;
        let mut options = call_options(headers, arrival)?;
        options.provider.clone_from(&target.provider);
        if let Some(client) = client {
            if let Some(allowed) = &client.providers {
                let entry = self
                    .registry
                    .get(&options.provider)
                    .map_err(|e| HttpError::from_gateway(&e, false, false))?;
                if !allowed.contains(&entry.name) {
                    return Err(HttpError::new(
                        ErrorKind::Permission,
                        format!(
                            "client `{}` may not use provider `{}`",
                            client.name, entry.name
                        ),
                    ));
                }
            }
            options.limits = client.limits.clone();
            options.allowed_providers = client.providers.clone();
        }
        if !target.model.is_empty()
            && let Ok(entry) = self.registry.get(&options.provider)
        {
            entry
                .provider
                .check_model(&target.model)
                .map_err(|why| HttpError::invalid(format!("model: {why}")))?;
        }
        let deadline = options.timeout.and_then(|t| Instant::now().checked_add(t));
        Ok(Accepted {
            admission,
            deferred: options.client_previous_attempts > 0,
            options,
            deadline,
        })
    }

    /// An error answer in `dialect`, with the gateway's headers.
    pub(crate) fn error(&self, dialect: Dialect, error: &HttpError) -> Response<Body> {
        let provider = error
            .provider
            .as_deref()
            .unwrap_or(self.registry.default_provider());
        let mut response = json_response(
            error.status(dialect),
            &error.body(dialect),
            provider,
            error.attempts,
        );
        let headers = response.headers_mut();
        headers.insert(
            HeaderName::from_static("x-should-retry"),
            HeaderValue::from_static(if error.should_retry { "true" } else { "false" }),
        );
        if let Some(wait) = error.retry_after {
            headers.insert(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
            );
            // Whole seconds, rounded up: never shorter than the real wait.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

enum Route {
    ChatCompletions,
    Messages,
    Models,
}

/// An admitted call, ready for the registry.
/// What the registry made of one ingress call.
pub(crate) enum Served {
    /// A whole answer.
    Whole(crate::registry::Completion),
    /// A committed stream, which holds its admission until it ends.
    Stream {
        open: crate::registry::OpenStream,
        admission: Admission,
        /// The model the request asked for (empty: the provider's).
        model: String,
    },
}

impl Ingress {
    /// One call through the registry, the same for both dialects: admit
    /// (errors before any upstream call name the provider the model
    /// chose), validate, then a whole answer or a committed stream.
    pub(crate) async fn serve(
        &self,
        headers: &HeaderMap,
        pb_request: provider_gateway::v1::CompleteRequest,
        target: &Target,
        stream: bool,
        arrival: Instant,
    ) -> Result<Served, HttpError> {
        let kind = if stream {
            CallKind::Stream
        } else {
            CallKind::Request
        };
        let named = |e: HttpError| e.for_provider(&target.provider);
        let accepted = self.accept(headers, kind, arrival, target).map_err(named)?;
        let chat =
            crate::service::validate_request(pb_request).map_err(|s| named(invalid_status(&s)))?;
        let failed = |e: crate::error::GatewayError| {
            HttpError::from_gateway(&e, accepted.deferred, accepted.time_left())
        };
        if !stream {
            let done = self
                .registry
                .complete_shared(Arc::new(chat), &accepted.options)
                .await
                .map_err(failed)?;
            return Ok(Served::Whole(done));
        }
        let model = chat.model_or("").to_string();
        let open = self
            .registry
            .stream_shared(Arc::new(chat), &accepted.options)
            .await
            .map_err(failed)?;
        Ok(Served::Stream {
            open,
            admission: accepted.admission,
            model,
        })
    }
}

pub(crate) struct Accepted {
    pub(crate) admission: Admission,
    pub(crate) options: CallOptions,
    /// The gateway makes one attempt: the caller's SDK is retrying.
    pub(crate) deferred: bool,
    pub(crate) deadline: Option<Instant>,
}

impl Accepted {
    /// Whether the caller's deadline leaves time for another try.
    pub(crate) fn time_left(&self) -> bool {
        self.deadline
            .is_none_or(|d| d.saturating_duration_since(Instant::now()) > Duration::from_millis(50))
    }
}

/// The provider and model a request's `model` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) provider: String,
    pub(crate) model: String,
}

/// The `model` rule: `provider/model` when the part before the first `/`
/// is a configured provider; a configured provider's bare name (its default
/// model); else a model of the default provider (empty = its default).
pub(crate) fn target(registry: &Registry, model: &str) -> Target {
    let configured = |name: &str| !name.is_empty() && registry.get(name).is_ok();
    if let Some((provider, rest)) = model.split_once('/')
        && configured(provider)
    {
        return Target {
            provider: provider.to_string(),
            model: rest.to_string(),
        };
    }
    if configured(model) {
        return Target {
            provider: model.to_string(),
            model: String::new(),
        };
    }
    Target {
        provider: String::new(),
        model: model.to_string(),
    }
}

fn admit(gate: &Arc<Gate>, kind: CallKind) -> Result<Admission, HttpError> {
    gate.admit(kind).map_err(|status| {
        let mut e = if status.code() == tonic::Code::Unavailable {
            HttpError::new(ErrorKind::Unavailable, status.message())
        } else {
            HttpError::new(ErrorKind::Overloaded, status.message())
        };
        // Nothing went upstream: another try (or another replica) may serve.
        e.should_retry = true;
        e.retry_after = Some(Duration::from_secs(1));
        e
    })
}

/// The call options from the headers: the per-call keys exactly as gRPC
/// reads them from metadata, the deadline, and the SDK's retry count.
fn call_options(headers: &HeaderMap, arrival: Instant) -> Result<CallOptions, HttpError> {
    let mut pairs = Vec::new();
    for (name, value) in headers {
        let key = name.as_str();
        if !crate::call_keys::is_call_key(key) {
            continue;
        }
        let value = value
            .to_str()
            .map_err(|_| HttpError::invalid(format!("{key}: not ASCII text")))?;
        pairs.push((key, value));
    }
    let mut options = crate::call_keys::call_options(&pairs).map_err(HttpError::invalid)?;
    // An SDK's stream cannot be told to discard what it got.
    options.cannot_restart = true;
    let text = |key: &str| -> Result<Option<&str>, HttpError> {
        headers
            .get(key)
            .map(|v| {
                v.to_str()
                    .map(str::trim)
                    .map_err(|_| HttpError::invalid(format!("{key}: not ASCII text")))
            })
            .transpose()
    };
    // The SDKs' own timeout headers: what they send is not the caller's to
    // fix (the Anthropic SDK sends `NOT_GIVEN` on some calls), so a value
    // that is not a number of seconds is ignored rather than refused.
    let seconds = |key: &str| -> Option<Duration> {
        let v = headers
            .get(key)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()?;
        (v.is_finite() && v > 0.0).then(|| Duration::from_secs_f64(v.min(86_400.0)))
    };
    let timeout = match text("x-request-timeout-ms")? {
        Some(v) => match v.parse::<u64>() {
            // Capped at a day, as the SDKs' own timeouts are.
            Ok(ms) if ms > 0 => Some(Duration::from_millis(ms.min(86_400_000))),
            _ => {
                return Err(HttpError::invalid(format!(
                    "x-request-timeout-ms: `{v}` is not an integer > 0"
                )));
            }
        },
        None => match (
            seconds("x-stainless-read-timeout"),
            seconds("x-stainless-timeout"),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    };
    options.timeout = timeout.map(|t| {
        t.saturating_sub(crate::call_keys::deadline_margin(t))
            .saturating_sub(arrival.elapsed())
    });
    if let Some(v) = text("x-stainless-retry-count")? {
        let n = v.parse::<u32>().map_err(|_| {
            HttpError::invalid(format!(
                "x-stainless-retry-count: `{v}` is not an integer >= 0"
            ))
        })?;
        options.client_previous_attempts = options.client_previous_attempts.max(n);
    }
    Ok(options)
}

/// Reads a JSON request body of at most `limit` bytes.
pub(crate) async fn read_json(
    body: Incoming,
    limit: usize,
) -> Result<serde_json::Value, HttpError> {
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                HttpError::new(
                    ErrorKind::TooLarge,
                    format!("body: larger than the gateway's limit of {limit} bytes"),
                )
            } else {
                HttpError::invalid(format!("body: could not be read: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| HttpError::invalid(format!("body: not valid JSON: {e}")))
}

/// Reads a typed value from a JSON body; errors name the field's path.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, HttpError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            HttpError::invalid(format!("body: {}", e.inner()))
        } else {
            HttpError::invalid(format!("{path}: {}", e.inner()))
        }
    })
}

/// Writes `x-gateway-provider` and `x-gateway-attempts`.
pub(crate) fn report(headers: &mut HeaderMap, provider: &str, attempts: u32) {
    if let Ok(v) = HeaderValue::from_str(provider) {
        headers.insert(HeaderName::from_static(PROVIDER_HEADER), v);
    }
    headers.insert(
        HeaderName::from_static(ATTEMPTS_HEADER),
        HeaderValue::from(attempts),
    );
}

/// A JSON answer with the gateway's headers.
pub(crate) fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
    provider: &str,
    attempts: u32,
) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    report(response.headers_mut(), provider, attempts);
    response
}

/// An SSE answer whose events come from `events`, with the gateway's
/// headers.
pub(crate) fn sse_response(
    events: impl futures_core::Stream<Item = Bytes> + Send + 'static,
    provider: &str,
    attempts: u32,
) -> Response<Body> {
    use futures_util::StreamExt;
    let frames = events
        .filter(|b| std::future::ready(!b.is_empty()))
        .map(|b| Ok::<_, Infallible>(hyper::body::Frame::data(b)));
    let mut response = Response::new(BodyExt::boxed_unsync(http_body_util::StreamBody::new(
        frames,
    )));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    report(headers, provider, attempts);
    response
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The gRPC-shaped validation error as an HTTP 400 naming the field.
pub(crate) fn invalid_status(status: &tonic::Status) -> HttpError {
    HttpError::invalid(status.message().to_string())
}

/// Appends `blocks` as a turn of `role`, merged into the previous turn
/// when it has the same role: both APIs accept consecutive turns of one
/// role (and OpenAI's `tool` messages become user turns), the gateway's
/// model alternates.
pub(crate) fn push_turn(
    turns: &mut Vec<provider_gateway::v1::Message>,
    role: provider_gateway::v1::Role,
    blocks: Vec<provider_gateway::v1::ContentBlock>,
) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some(last) if last.role == role as i32 => last.content.extend(blocks),
        _ => turns.push(provider_gateway::v1::Message {
            role: role as i32,
            content: blocks,
        }),
    }
}

/// What an HTTP stream says when the registry restarted it
/// (`x-stream-resume: restart`): the OpenAI and Anthropic stream formats
/// have no way to take back what was sent, so the break stands.
pub(crate) fn restart_error() -> crate::error::GatewayError {
    crate::error::GatewayError::Upstream {
        provider: String::new(),
        attempts: 0,
        error: crate::error::ProviderError::new(
            crate::error::ErrorClass::StreamInterrupted,
            "the stream broke after content; it could only be started over, which this API \
             cannot express (use x-stream-resume: continue, or retry the request)",
        ),
        delivered: Some(0),
        budget_exhausted: false,
    }
}
