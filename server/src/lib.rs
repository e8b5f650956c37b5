//! provider-gateway's server: one gRPC API (`provider_gateway.v1`) in front of
//! every LLM provider a team uses.
//!
//! Data flows one way: [`service`] (gRPC, validation) -> [`registry`]
//! (policy, the one place that calls providers) -> [`providers`] (HTTP and
//! JSON of each upstream); the HTTP ingress (OpenAI- and Anthropic-compatible)
//! is a second edge over the same registry. [`serve`] runs the whole server
//! on a listener, so tests start the real thing on `127.0.0.1:0`.

pub mod admin;
pub mod admission;
pub mod auth;
mod call_keys;
pub mod chat;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub mod observe;
pub mod providers;
pub mod registry;
pub mod retry;
pub mod service;
pub mod telemetry;
mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use provider_gateway::v1::provider_gateway_server::ProviderGatewayServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

pub use config::{Config, ConfigError, EnvSource, ProcessEnv};
pub use registry::Registry;

/// How often health re-reads whether any provider can serve.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// How long connections get to write the last frames of the calls that
/// finished during a shutdown.
const FLUSH_DELAY: Duration = Duration::from_millis(250);

/// The gRPC service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "provider_gateway.v1.ProviderGateway";

/// An error that stops the server.
#[derive(Debug)]
pub enum ServeError {
    /// The configuration is invalid or a provider could not be built.
    Config(ConfigError),
    /// The transport failed.
    Transport(tonic::transport::Error),
    /// Reflection could not be set up.
    Reflection(String),
    /// A listener could not be bound (the message names the config key).
    Bind(String),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(e) => write!(f, "{e}"),
            Self::Transport(e) => write!(f, "transport error: {e}"),
            Self::Reflection(e) => write!(f, "reflection: {e}"),
            Self::Bind(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServeError {}

impl From<ConfigError> for ServeError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

/// Everything about serving that is not a provider: authentication, TLS,
/// limits and the shutdown grace.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Client authentication; `None` = open.
    pub auth: Option<Arc<auth::Authenticator>>,
    /// TLS for the listener; `None` = plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Request, concurrency and keep-alive limits.
    pub limits: config::LimitsConfig,
    /// How long admitted calls may run after shutdown begins.
    pub shutdown_grace: Duration,
    /// Browser origins CORS allows for gRPC-Web (`*` = any).
    pub grpc_web_origins: Vec<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            auth: None,
            tls: None,
            limits: config::LimitsConfig::default(),
            shutdown_grace: Duration::from_millis(config::DEFAULT_SHUTDOWN_GRACE_MS),
            grpc_web_origins: Vec::new(),
        }
    }
}

impl ServerOptions {
    /// Reads the options from the configuration: key hashes from `env`,
    /// certificates from their files (errors name the path).
    pub fn from_config(config: &Config, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let auth = match &config.auth {
            None => None,
            Some(a) => {
                let operator = retry::RetryLimits::resolve(config.retry.limits.as_ref())?;
                Some(Arc::new(auth::Authenticator::from_config(
                    a, &operator, env,
                )?))
            }
        };
        let tls = match &config.tls {
            None => None,
            Some(t) => {
                let read = |key: &str, path: &str| {
                    std::fs::read(path).map_err(|e| {
                        ConfigError(format!("config key `tls.{key}`: cannot read {path}: {e}"))
                    })
                };
                let identity = tonic::transport::Identity::from_pem(
                    read("cert_path", &t.cert_path)?,
                    read("key_path", &t.key_path)?,
                );
                let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &t.client_ca_path {
                    tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(
                        "client_ca_path",
                        ca,
                    )?));
                }
                Some(tls)
            }
        };
        Ok(Self {
            auth,
            tls,
            limits: config.limits.clone(),
            shutdown_grace: Duration::from_millis(config.shutdown_grace_ms),
            grpc_web_origins: config.grpc_web.cors_allowed_origins.clone(),
        })
    }
}

/// CORS for gRPC-Web: the allowed origins only, any request header (the
/// per-call keys), and the gRPC status and `x-gateway-*` headers readable.
/// `None` when no origin may call: then no response carries CORS headers
/// (nor `vary`), a browser's preflight finds no grant, and the calls of
/// every other client skip the layer's work.
fn grpc_web_cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| ::http::HeaderValue::from_str(o).ok()),
        )
    };
    let expose = [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        service::ATTEMPTS_HEADER,
        service::PROVIDER_HEADER,
    ]
    .map(::http::HeaderName::from_static);
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([::http::Method::POST, ::http::Method::OPTIONS])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(expose)
            .max_age(Duration::from_secs(24 * 3600)),
    )
}

/// Serves the gateway on `listener` until `shutdown` resolves, then drains:
/// the `ProviderGateway` service, `grpc.health.v1` (SERVING once the
/// providers are loaded) and reflection v1. Provider secrets are read
/// through `env`.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    env: &dyn EnvSource,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let registry = Arc::new(Registry::from_config(&config, env)?);
    let options = ServerOptions::from_config(&config, env)?;
    let http = match config.http_listen_addr()? {
        None => None,
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            ServeError::Bind(format!("cannot listen on {addr} (http_listen): {e}"))
        })?),
    };
    serve_listeners(listener, http, registry, options, shutdown).await
}

/// Serves an already built registry with default options (see [`serve`]).
pub async fn serve_registry(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with(listener, registry, ServerOptions::default(), shutdown).await
}

/// Serves `registry` with `options` on the gRPC `listener` only (see
/// [`serve_listeners`]).
pub async fn serve_with(
    listener: TcpListener,
    registry: Arc<Registry>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_listeners(listener, None, registry, options, shutdown).await
}

/// Serves `registry` with `options`: gRPC on `grpc`, and the OpenAI- and
/// Anthropic-compatible HTTP ingress on `http` when given, over the same
/// registry, admission gate and client keys.
///
/// When `shutdown` resolves: health turns NOT_SERVING at once, the listener
/// stops accepting connections, new calls on open connections are answered
/// UNAVAILABLE (health stays readable on them), and admitted calls get up
/// to the grace period to finish before this returns.
pub async fn serve_listeners(
    listener: TcpListener,
    http: Option<TcpListener>,
    registry: Arc<Registry>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(provider_gateway::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    // v1alpha too: grpcurl 1.8 and older tools speak only v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(provider_gateway::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let summaries = registry.summaries();
    let names: Vec<String> = summaries
        .iter()
        .map(|p| format!("{} ({}, model {})", p.name, p.kind, p.default_model))
        .collect();
    tracing::info!(
        listen = %local,
        tls = options.tls.is_some(),
        auth = options.auth.is_some(),
        default_provider = registry.default_provider(),
        providers = %names.join(", "),
        "provider-gateway serving"
    );

    let gate = Arc::new(admission::Gate::new(
        options.limits.max_concurrent_requests,
        options.limits.max_concurrent_streams,
    ));
    let authenticator = options.auth.clone();
    let gateway = tonic::service::interceptor::InterceptedService::new(
        ProviderGatewayServer::new(service::GatewayService::new(registry.clone(), gate.clone()))
            .max_decoding_message_size(options.limits.max_request_bytes),
        move |mut request: tonic::Request<()>| {
            request
                .extensions_mut()
                .insert(service::Arrival(std::time::Instant::now()));
            if let Some(auth) = &authenticator {
                let client = auth.check(request.metadata())?;
                request.extensions_mut().insert(client);
            }
            Ok(request)
        },
    );
    for name in [SERVICE_NAME, ""] {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }

    // Health follows the providers: NOT_SERVING while every provider's
    // breaker is open.
    let watcher = {
        let (registry, health, gate) = (registry.clone(), health_reporter.clone(), gate.clone());
        tokio::spawn(async move {
            let mut serving = true;
            loop {
                tokio::time::sleep(HEALTH_INTERVAL).await;
                if gate.is_draining() {
                    return;
                }
                let now = registry.can_serve();
                if now != serving {
                    serving = now;
                    let status = if now {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    tracing::warn!(serving = now, "provider availability changed");
                    for name in [SERVICE_NAME, ""] {
                        health.set_service_status(name, status).await;
                    }
                }
            }
        })
    };
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let draining = {
        let gate = gate.clone();
        async move {
            shutdown.await;
            gate.start_draining();
            let _ = drain_tx.send(true);
        }
    };
    let http_task = match http {
        None => None,
        Some(http) => {
            let addr = http
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into());
            tracing::info!(
                http = %addr,
                "HTTP ingress serving: OpenAI /v1/chat/completions and /v1/models, Anthropic /v1/messages"
            );
            let ingress = Arc::new(http::Ingress {
                registry: registry.clone(),
                gate: gate.clone(),
                auth: options.auth.clone(),
                max_body: options.limits.max_request_bytes,
            });
            let mut drain_rx = drain_rx;
            Some(tokio::spawn(http::serve_http(http, ingress, async move {
                let _ = drain_rx.wait_for(|d| *d).await;
            })))
        }
    };
    // The incoming connections end when draining starts: the listener
    // closes, while open connections stay up for their calls and health.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .take_until(draining);
    let l = &options.limits;
    let mut builder = tonic::transport::Server::builder()
        // gRPC-Web over HTTP/1.1 beside gRPC over HTTP/2.
        .accept_http1(true)
        .http2_keepalive_interval(Some(Duration::from_millis(l.http2_keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(Duration::from_millis(l.http2_keepalive_timeout_ms)));
    if let Some(tls) = options.tls.clone() {
        builder = builder.tls_config(tls).map_err(ServeError::Transport)?;
    }
    builder
        .layer(tower::util::option_layer(grpc_web_cors(
            &options.grpc_web_origins,
        )))
        .layer(tonic_web::GrpcWebLayer::new())
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(gateway)
        .serve_with_incoming(incoming)
        .await
        .map_err(ServeError::Transport)?;

    watcher.abort();
    if let Some(task) = http_task {
        task.abort();
    }
    // The listener is closed now; open connections still read health.
    for name in [SERVICE_NAME, ""] {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    tracing::info!(
        in_flight = gate.in_flight(),
        "shutting down: listener closed, no new calls; waiting for those in flight"
    );

    let drained_by = tokio::time::Instant::now() + options.shutdown_grace;
    if tokio::time::timeout_at(drained_by, gate.wait_idle())
        .await
        .is_ok()
    {
        // A call is done when its last frame is handed to its connection;
        // give the connections a moment to write it before the process
        // exits and drops them.
        tokio::time::sleep_until(drained_by.min(tokio::time::Instant::now() + FLUSH_DELAY)).await;
    } else {
        tracing::warn!(
            in_flight = gate.in_flight(),
            grace_ms = options.shutdown_grace.as_millis() as u64,
            "shutdown grace elapsed; ending the calls still open"
        );
    }
    Ok(())
}
