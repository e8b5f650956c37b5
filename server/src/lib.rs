//! provider-gateway's server: one gRPC API (`provider_gateway.v1`) in front of
//! every LLM provider a team uses.
//!
//! Data flows one way: [`service`] (gRPC, validation) -> [`registry`]
//! (policy, the one place that calls providers) -> [`providers`] (HTTP and
//! JSON of each upstream). [`serve`] runs the whole server on a listener, so
//! tests start the real thing on `127.0.0.1:0`.

pub mod chat;
pub mod config;
pub mod error;
pub mod providers;
pub mod registry;
pub mod retry;
pub mod service;
mod tls;

use std::future::Future;
use std::sync::Arc;

use provider_gateway::v1::provider_gateway_server::ProviderGatewayServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

pub use config::{Config, ConfigError, EnvSource, ProcessEnv};
pub use registry::Registry;

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
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(e) => write!(f, "{e}"),
            Self::Transport(e) => write!(f, "transport error: {e}"),
            Self::Reflection(e) => write!(f, "reflection: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

impl From<ConfigError> for ServeError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves: the
/// `ProviderGateway` service, `grpc.health.v1` (SERVING once the providers
/// are loaded) and reflection v1. Provider secrets are read through `env`.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    env: &dyn EnvSource,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let registry = Arc::new(Registry::from_config(&config, env)?);
    serve_registry(listener, registry, shutdown).await
}

/// Serves an already built registry (see [`serve`]).
pub async fn serve_registry(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(provider_gateway::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
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
        default_provider = registry.default_provider(),
        providers = %names.join(", "),
        "provider-gateway serving"
    );

    let gateway = ProviderGatewayServer::new(service::GatewayService::new(registry));
    health_reporter
        .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving)
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(gateway)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(ServeError::Transport)
}
