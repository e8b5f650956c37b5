//! Test support: the scripted upstream and the real gateway on 127.0.0.1:0.

pub mod binary;
pub mod tls_upstream;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;

use futures_util::future::BoxFuture;
use provider_gateway_client::GatewayClient;
use provider_gateway_server::retry::Clock;
use provider_gateway_server::{Config, Registry, ServerOptions};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use upstream::{Reply, Step, Upstream, sse_event};

/// The real gateway, served by `serve()` on an ephemeral port.
pub struct Gateway {
    pub addr: SocketAddr,
    /// Dropping it shuts the server down.
    _stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Starts the gateway with `toml` as its config file and `env` as its
    /// environment (never the process's).
    pub async fn start(toml: &str, env: &[(&str, &str)]) -> Self {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = Config::from_toml(toml).expect("valid test config");
        Self::start_config(config, env).await
    }

    /// Starts the gateway as `serve()` would: providers and server options
    /// (auth, TLS, limits) from `config`.
    pub async fn start_config(config: Config, env: HashMap<String, String>) -> Self {
        let registry = Registry::from_config(&config, &env).expect("providers build");
        let options = ServerOptions::from_config(&config, &env).expect("server options");
        Self::start_with(registry, options).await
    }

    /// Starts the gateway with a scripted clock (backoffs are recorded, not
    /// waited) and a fixed jitter seed.
    pub async fn start_scripted(
        toml: &str,
        env: &[(&str, &str)],
        clock: Arc<ScriptedClock>,
    ) -> Self {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = Config::from_toml(toml).expect("valid test config");
        let registry = Registry::from_config(&config, &env)
            .expect("providers build")
            .with_clock(clock)
            .with_jitter_seed(7);
        Self::start_registry(registry).await
    }

    pub async fn start_registry(registry: Registry) -> Self {
        Self::start_with(registry, ServerOptions::default()).await
    }

    pub async fn start_with(registry: Registry, options: ServerOptions) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            provider_gateway_server::serve_with(listener, Arc::new(registry), options, async {
                let _ = stopped.await;
            })
            .await
            .expect("gateway serves");
        });
        Self {
            addr,
            _stop: stop,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> GatewayClient {
        GatewayClient::connect(self.url()).await.expect("connects")
    }

    /// Streams `request` to its end: the events, and the final status when
    /// the stream did not end OK.
    pub async fn stream_all(
        &self,
        request: provider_gateway_client::CompleteRequest,
    ) -> (
        Vec<provider_gateway_client::StreamEvent>,
        Option<tonic::Status>,
    ) {
        let events = self
            .client()
            .await
            .stream(request, &provider_gateway_client::CallOptions::new())
            .await
            .expect("the stream opens");
        crate::anthropic::drain(events).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config with one HTTP provider named `p` of `kind` at `base_url`.
pub fn provider_config(kind: &str, base_url: &str, extra: &str) -> String {
    format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"{kind}\"\nbase_url = \"{base_url}\"\napi_key_env = \"TEST_KEY\"\n{extra}\n"
    )
}

/// The environment holding the test key.
pub const KEY: &str = "sk-test-secret-123";
pub const ENV: &[(&str, &str)] = &[("TEST_KEY", KEY)];

/// A clock whose sleeps return at once and are recorded; its `now` moves
/// forward by each sleep, so deadlines see the waited time.
#[derive(Debug, Default)]
pub struct ScriptedClock {
    offset: Mutex<Duration>,
    sleeps: Mutex<Vec<Duration>>,
    frozen: bool,
}

impl ScriptedClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A clock whose time does not move with sleeps: for many concurrent
    /// callers, whose waits would overlap rather than add up.
    pub fn frozen() -> Arc<Self> {
        Arc::new(Self {
            frozen: true,
            ..Self::default()
        })
    }

    /// Moves time forward (a cooldown passing).
    pub fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }

    /// Every wait the registry asked for, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.sleeps.lock().unwrap().clone()
    }
}

impl Clock for ScriptedClock {
    fn now(&self) -> Instant {
        Instant::now() + *self.offset.lock().unwrap()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        self.sleeps.lock().unwrap().push(duration);
        if !self.frozen {
            *self.offset.lock().unwrap() += duration;
        }
        Box::pin(std::future::ready(()))
    }
}

/// The text deltas of a stream, concatenated.
pub fn text_of(events: &[provider_gateway_client::StreamEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            provider_gateway_client::StreamEvent::Text { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// Polls `f` until it holds, for up to `within` of real time, for what
/// happens outside tokio's clock (the embedded model's own threads, an
/// exporter's span processor).
pub async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
