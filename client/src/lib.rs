//! A typed Rust client for provider-gateway.
//!
//! ```no_run
//! use provider_gateway_client::{CallOptions, GatewayClient, RetryOverrides, StreamEvent, request};
//! use futures_util::StreamExt;
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut client = GatewayClient::connect("http://127.0.0.1:50051").await?;
//!
//! // A whole answer, with a deadline and at most two attempts.
//! let options = CallOptions::new()
//!     .deadline(Duration::from_secs(30))
//!     .retry(RetryOverrides { max_attempts: Some(2), ..Default::default() });
//! let answer = client.complete(request::user("Say hello"), &options).await?;
//! println!("{} ({} attempt(s))", answer.text(), answer.attempts);
//!
//! // A streamed answer, printed as it arrives.
//! let mut events = client.stream(request::user("Tell me a story"), &CallOptions::new()).await?;
//! while let Some(event) = events.next().await {
//!     if let StreamEvent::Text { text, .. } = event? {
//!         print!("{text}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::pin::Pin;
use std::time::Duration;

use futures_core::Stream;
use futures_util::StreamExt;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

pub use provider_gateway::v1;
pub use provider_gateway::v1::{
    CompleteRequest, CompleteResponse, ContentBlock, Message, Role, StopReason, StreamRequest,
    Tool, ToolChoice, Usage,
};
pub use tonic;

/// The generated low-level client, for calls this crate does not wrap.
pub type RawClient = v1::provider_gateway_client::ProviderGatewayClient<Channel>;

/// An error of this client: connecting, or a call's gRPC status.
#[derive(Debug)]
pub enum ClientError {
    /// The address is not a valid endpoint.
    InvalidEndpoint(String),
    /// The connection could not be made.
    Connect(tonic::transport::Error),
    /// The call failed with this status.
    Status(Box<Status>),
    /// An override cannot be sent as metadata.
    InvalidOverride(String),
    /// The TLS settings are unusable (a certificate or key that does not
    /// parse, no trust store).
    InvalidTls(String),
    /// The auth key cannot be sent as metadata (it is not visible ASCII).
    /// The key itself is never part of an error.
    InvalidAuthKey,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidEndpoint(e) => write!(f, "invalid endpoint: {e}"),
            // tonic's own message is only "transport error": the cause
            // (refused, DNS, TLS) is in its sources.
            Self::Connect(e) => write!(f, "cannot connect: {}", error_chain(e)),
            Self::Status(s) => write!(f, "{:?}: {}", s.code(), s.message()),
            Self::InvalidOverride(e) => write!(f, "invalid override: {e}"),
            Self::InvalidTls(e) => write!(f, "invalid TLS settings: {e}"),
            Self::InvalidAuthKey => f.write_str(
                "invalid auth key: it must be visible ASCII to be sent as `authorization` metadata",
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(e) => Some(e),
            Self::Status(s) => Some(s.as_ref()),
            Self::InvalidEndpoint(_)
            | Self::InvalidOverride(_)
            | Self::InvalidTls(_)
            | Self::InvalidAuthKey => None,
        }
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        Self::Status(Box::new(s))
    }
}

impl ClientError {
    /// The gRPC status, when the call reached the gateway.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Status(s) => Some(s),
            Self::InvalidEndpoint(_)
            | Self::Connect(_)
            | Self::InvalidOverride(_)
            | Self::InvalidTls(_)
            | Self::InvalidAuthKey => None,
        }
    }
}

/// Helpers that build requests and messages.
pub mod request {
    use super::*;

    /// A user message holding `text`.
    pub fn user_message(text: impl Into<String>) -> Message {
        message(Role::User, text)
    }

    /// An assistant message holding `text`.
    pub fn assistant_message(text: impl Into<String>) -> Message {
        message(Role::Assistant, text)
    }

    fn message(role: Role, text: impl Into<String>) -> Message {
        Message {
            role: role as i32,
            content: vec![text_block(text)],
        }
    }

    /// A text content block.
    pub fn text_block(text: impl Into<String>) -> ContentBlock {
        ContentBlock {
            block: Some(v1::content_block::Block::Text(text.into())),
        }
    }

    /// A tool-result block answering the tool call `tool_use_id`.
    pub fn tool_result_block(
        tool_use_id: impl Into<String>,
        content: impl Into<String>,
        is_error: bool,
    ) -> ContentBlock {
        ContentBlock {
            block: Some(v1::content_block::Block::ToolResult(v1::ToolResult {
                tool_use_id: tool_use_id.into(),
                content: content.into(),
                is_error,
            })),
        }
    }

    /// A tool the model may call; `input_schema_json` is a JSON Schema object.
    pub fn tool(
        name: impl Into<String>,
        description: impl Into<String>,
        input_schema_json: impl Into<String>,
    ) -> Tool {
        Tool {
            name: name.into(),
            description: description.into(),
            input_schema_json: input_schema_json.into(),
        }
    }

    /// A one-message request to the default provider and model.
    pub fn user(text: impl Into<String>) -> CompleteRequest {
        CompleteRequest {
            messages: vec![user_message(text)],
            ..Default::default()
        }
    }

    /// The streaming form of a request.
    pub fn to_stream(r: CompleteRequest) -> StreamRequest {
        StreamRequest {
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

/// Per-request retry overrides; each set field becomes its `x-retry-*`
/// metadata key. The gateway clamps them to the operator's limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetryOverrides {
    /// `x-retry-max-attempts`: attempts in all (1 = no retry).
    pub max_attempts: Option<u32>,
    /// `x-retry-initial-backoff-ms`.
    pub initial_backoff: Option<Duration>,
    /// `x-retry-max-backoff-ms`.
    pub max_backoff: Option<Duration>,
    /// `x-retry-backoff-multiplier`.
    pub backoff_multiplier: Option<f64>,
    /// `x-retry-per-try-timeout-ms`.
    pub per_try_timeout: Option<Duration>,
    /// `x-retry-on`: the classes to retry; an empty list sends `none`.
    pub retry_on: Option<Vec<String>>,
}

impl RetryOverrides {
    /// Writes the overrides into `metadata`.
    pub fn apply(&self, metadata: &mut MetadataMap) -> Result<(), ClientError> {
        let mut put = |key: &'static str, value: String| -> Result<(), ClientError> {
            let v = MetadataValue::try_from(value.as_str())
                .map_err(|_| ClientError::InvalidOverride(format!("{key}: `{value}`")))?;
            metadata.insert(key, v);
            Ok(())
        };
        let ms = |d: Duration| d.as_millis().to_string();
        if let Some(n) = self.max_attempts {
            put("x-retry-max-attempts", n.to_string())?;
        }
        if let Some(d) = self.initial_backoff {
            put("x-retry-initial-backoff-ms", ms(d))?;
        }
        if let Some(d) = self.max_backoff {
            put("x-retry-max-backoff-ms", ms(d))?;
        }
        if let Some(m) = self.backoff_multiplier {
            put("x-retry-backoff-multiplier", m.to_string())?;
        }
        if let Some(d) = self.per_try_timeout {
            put("x-retry-per-try-timeout-ms", ms(d))?;
        }
        if let Some(classes) = &self.retry_on {
            let value = if classes.is_empty() {
                "none".to_string()
            } else {
                classes.join(",")
            };
            put("x-retry-on", value)?;
        }
        Ok(())
    }
}

/// Options of one call.
#[derive(Clone, Default)]
pub struct CallOptions {
    /// The call's deadline (sent as `grpc-timeout`).
    pub deadline: Option<Duration>,
    /// Retry overrides.
    pub retry: RetryOverrides,
    /// The caller's key for a gateway that authenticates its callers, sent
    /// as `authorization: Bearer <key>` (see [`CallOptions::auth_key`]).
    pub auth_key: Option<String>,
}

// By hand, so that the auth key never reaches a log line.
impl std::fmt::Debug for CallOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallOptions")
            .field("deadline", &self.deadline)
            .field("retry", &self.retry)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl CallOptions {
    /// No deadline, no overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the deadline.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets the retry overrides.
    pub fn retry(mut self, retry: RetryOverrides) -> Self {
        self.retry = retry;
        self
    }

    /// Authenticates the call with `key`: the request carries
    /// `authorization: Bearer <key>`, marked sensitive so tonic never logs
    /// it.
    ///
    /// ```
    /// use provider_gateway_client::CallOptions;
    /// use provider_gateway_client::tonic::metadata::MetadataMap;
    ///
    /// let options = CallOptions::new().auth_key("pgw-secret");
    /// let mut metadata = MetadataMap::new();
    /// options.apply(&mut metadata).unwrap();
    /// assert_eq!(metadata.get("authorization").unwrap(), "Bearer pgw-secret");
    /// assert!(!format!("{options:?}").contains("pgw-secret"));
    /// ```
    pub fn auth_key(mut self, key: impl Into<String>) -> Self {
        self.auth_key = Some(key.into());
        self
    }

    /// Writes the call's metadata (the retry overrides and the auth key)
    /// into `metadata`; for calls made through [`GatewayClient::raw`].
    pub fn apply(&self, metadata: &mut MetadataMap) -> Result<(), ClientError> {
        self.retry.apply(metadata)?;
        if let Some(key) = &self.auth_key {
            let mut value = MetadataValue::try_from(format!("Bearer {key}"))
                .map_err(|_| ClientError::InvalidAuthKey)?;
            value.set_sensitive(true);
            metadata.insert("authorization", value);
        }
        Ok(())
    }

    /// `message` as a request carrying these options.
    pub fn request<T>(&self, message: T) -> Result<Request<T>, ClientError> {
        let mut request = Request::new(message);
        if let Some(d) = self.deadline {
            request.set_timeout(d);
        }
        self.apply(request.metadata_mut())?;
        Ok(request)
    }
}

/// TLS settings of a connection to the gateway, for
/// [`GatewayClient::tls_endpoint`]. The default verifies the gateway's
/// certificate against the system's trust store and sends no client
/// certificate.
///
/// ```no_run
/// use provider_gateway_client::{GatewayClient, TlsOptions};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let tls = TlsOptions::new()
///     .ca_certificate(std::fs::read("ca.pem")?)
///     .client_identity(std::fs::read("client.pem")?, std::fs::read("client.key")?)
///     .domain("gateway.internal");
/// let endpoint = GatewayClient::tls_endpoint("https://10.0.0.7:50051", &tls)?;
/// let client = GatewayClient::connect_with(endpoint).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// PEM certificate(s) of the CA that signed the gateway's certificate;
    /// `None` trusts the system's trust store instead.
    pub ca_certificate_pem: Option<Vec<u8>>,
    /// The client's PEM certificate chain and PEM private key, for mutual
    /// TLS.
    pub client_identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the gateway's certificate must carry; `None` = the
    /// address's host.
    pub domain: Option<String>,
}

// By hand, so that the private key never reaches a log line.
impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field(
                "ca_certificate_pem",
                &self.ca_certificate_pem.as_ref().map(Vec::len),
            )
            .field(
                "client_identity_pem",
                &self.client_identity_pem.as_ref().map(|_| "<redacted>"),
            )
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsOptions {
    /// The system's trust store, no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CA certificate(s) in `pem` (instead of the system's store).
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_certificate_pem = Some(pem.into());
        self
    }

    /// Presents `certificate_pem` with `key_pem` to the gateway (mutual TLS).
    pub fn client_identity(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_identity_pem = Some((certificate_pem.into(), key_pem.into()));
        self
    }

    /// Expects the gateway's certificate to carry `domain`, whatever host
    /// the address names.
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    fn client_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_certificate_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some((certificate, key)) = &self.client_identity_pem {
            config = config.identity(Identity::from_pem(certificate, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// `e` and its causes, joined by `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        // Some errors repeat their cause in their own message.
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// A whole answer with what the gateway reported about it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The answer.
    pub response: CompleteResponse,
    /// Upstream attempts made (`x-gateway-attempts`).
    pub attempts: u32,
    /// The provider that served (`x-gateway-provider`).
    pub provider: String,
}

impl Answer {
    /// The answer's text blocks, concatenated.
    pub fn text(&self) -> String {
        self.response
            .content
            .iter()
            .filter_map(|b| match &b.block {
                Some(v1::content_block::Block::Text(t)) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Why the model stopped.
    pub fn stop_reason(&self) -> StopReason {
        StopReason::try_from(self.response.stop_reason).unwrap_or(StopReason::Unspecified)
    }
}

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The answer has begun.
    Start {
        /// The provider's id of the answer.
        id: String,
        /// The provider that serves it.
        provider: String,
        /// The model.
        model: String,
        /// The upstream attempt that serves it.
        attempt: u32,
    },
    /// Text appended to block `index`.
    Text {
        /// The block.
        index: u32,
        /// The text.
        text: String,
    },
    /// A tool call begins in block `index`.
    ToolUseStart {
        /// The block.
        index: u32,
        /// The call's id.
        id: String,
        /// The tool's name.
        name: String,
    },
    /// A fragment of the tool call's input JSON.
    ToolInputJson {
        /// The block.
        index: u32,
        /// The fragment.
        json: String,
    },
    /// Token counts.
    Usage(Usage),
    /// The answer is complete.
    Stop(StopReason),
    /// The upstream stream broke inside text and the gateway resumed it;
    /// the text deltas that follow continue the text delivered so far.
    Resumed {
        /// The attempt serving the continuation.
        attempt: u32,
        /// The provider serving it.
        provider: String,
        /// Characters of text delivered before the break.
        characters_delivered: u64,
    },
    /// The stream broke and could not be continued, and the call asked for
    /// restarts (`x-stream-resume: restart`): discard everything received
    /// so far; the complete new answer follows.
    Restarted {
        /// The attempt serving the new answer.
        attempt: u32,
        /// The provider serving it.
        provider: String,
    },
}

impl StreamEvent {
    fn from_pb(r: v1::StreamResponse) -> Option<Self> {
        use v1::content_delta::Delta;
        use v1::stream_response::Event;
        Some(match r.event? {
            Event::Start(s) => Self::Start {
                id: s.id,
                provider: s.provider,
                model: s.model,
                attempt: s.attempt,
            },
            Event::Delta(d) => match d.delta? {
                Delta::Text(text) => Self::Text {
                    index: d.index,
                    text,
                },
                Delta::ToolUseStart(t) => Self::ToolUseStart {
                    index: d.index,
                    id: t.id,
                    name: t.name,
                },
                Delta::ToolInputJson(json) => Self::ToolInputJson {
                    index: d.index,
                    json,
                },
            },
            Event::Usage(u) => Self::Usage(u),
            Event::Resumed(r) => Self::Resumed {
                attempt: r.attempt,
                provider: r.provider,
                characters_delivered: r.characters_delivered,
            },
            Event::Restarted(r) => Self::Restarted {
                attempt: r.attempt,
                provider: r.provider,
            },
            Event::Stop(s) => {
                Self::Stop(StopReason::try_from(s.stop_reason).unwrap_or(StopReason::Unspecified))
            }
        })
    }
}

/// The events of a streamed answer. Dropping it cancels the call.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ClientError>> + Send>>;

/// `events`, ended with a `DEADLINE_EXCEEDED` error once `deadline` (from
/// now) has passed: `grpc-timeout` bounds the server's work, this bounds
/// the caller's wait for the body, whatever the server does.
fn within_deadline(events: EventStream, deadline: Duration) -> EventStream {
    let timer = Box::pin(tokio::time::sleep(deadline));
    Box::pin(futures_util::stream::unfold(
        Some((events, timer)),
        move |state| async move {
            let (mut events, mut timer) = state?;
            tokio::select! {
                item = events.next() => item.map(|item| (item, Some((events, timer)))),
                () = &mut timer => Some((
                    Err(ClientError::from(Status::deadline_exceeded(format!(
                        "the stream outlasted its deadline of {} ms",
                        deadline.as_millis()
                    )))),
                    None,
                )),
            }
        },
    ))
}

/// A connected gateway client. Cloning it is cheap and shares the connection.
#[derive(Debug, Clone)]
pub struct GatewayClient {
    raw: RawClient,
}

impl GatewayClient {
    /// Connects to `address` (for example `http://127.0.0.1:50051`) with a
    /// 5 s connect timeout. An `https://` address is served over TLS,
    /// verified against the system's trust store (for a private CA or mutual
    /// TLS, see [`GatewayClient::tls_endpoint`]).
    pub async fn connect(address: impl Into<String>) -> Result<Self, ClientError> {
        let address = address.into();
        let endpoint = if address.starts_with("https://") {
            Self::tls_endpoint(address, &TlsOptions::new())?
        } else {
            Self::endpoint(address)?
        };
        Self::connect_with(endpoint).await
    }

    /// The endpoint builder `connect` uses for a plaintext address: set
    /// timeouts or keep-alive on it and pass it to
    /// [`GatewayClient::connect_with`]. For TLS, start from
    /// [`GatewayClient::tls_endpoint`] instead.
    pub fn endpoint(address: impl Into<String>) -> Result<Endpoint, ClientError> {
        let endpoint = Endpoint::from_shared(address.into())
            .map_err(|e| ClientError::InvalidEndpoint(e.to_string()))?;
        Ok(endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true))
    }

    /// The endpoint builder for an `https://` address served over TLS with
    /// `tls`; pass it to [`GatewayClient::connect_with`]. TLS is only spoken
    /// to `https://` addresses, so any other scheme is refused here rather
    /// than silently connecting in plain text.
    pub fn tls_endpoint(
        address: impl Into<String>,
        tls: &TlsOptions,
    ) -> Result<Endpoint, ClientError> {
        let address = address.into();
        if !address.starts_with("https://") {
            return Err(ClientError::InvalidTls(format!(
                "TLS needs an https:// address, not `{address}`"
            )));
        }
        Self::endpoint(address)?
            .tls_config(tls.client_config())
            .map_err(|e| ClientError::InvalidTls(error_chain(&e)))
    }

    /// Connects through a configured endpoint.
    pub async fn connect_with(endpoint: Endpoint) -> Result<Self, ClientError> {
        let channel = endpoint.connect().await.map_err(ClientError::Connect)?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            raw: RawClient::new(channel),
        }
    }

    /// The generated client, for anything this wrapper does not cover.
    pub fn raw(&mut self) -> &mut RawClient {
        &mut self.raw
    }

    /// Gets a whole answer.
    pub async fn complete(
        &mut self,
        request: CompleteRequest,
        options: &CallOptions,
    ) -> Result<Answer, ClientError> {
        let response = self.raw.complete(options.request(request)?).await?;
        let header = |key: &str| {
            response
                .metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let attempts = header("x-gateway-attempts")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let provider = header("x-gateway-provider").unwrap_or_default();
        Ok(Answer {
            response: response.into_inner(),
            attempts,
            provider,
        })
    }

    /// Streams an answer; the events arrive as the model produces them.
    pub async fn stream(
        &mut self,
        request: CompleteRequest,
        options: &CallOptions,
    ) -> Result<EventStream, ClientError> {
        let response = self
            .raw
            .stream(options.request(request::to_stream(request))?)
            .await?;
        let events = response.into_inner().filter_map(|item| async move {
            match item {
                Ok(r) => StreamEvent::from_pb(r).map(Ok),
                Err(status) => Some(Err(ClientError::from(status))),
            }
        });
        Ok(match options.deadline {
            Some(deadline) => within_deadline(Box::pin(events), deadline),
            None => Box::pin(events),
        })
    }

    /// The providers the gateway serves.
    pub async fn providers(&mut self) -> Result<v1::ListProvidersResponse, ClientError> {
        self.providers_with(&CallOptions::new()).await
    }

    /// The providers the gateway serves, asked with `options` (a deadline,
    /// an auth key).
    pub async fn providers_with(
        &mut self,
        options: &CallOptions,
    ) -> Result<v1::ListProvidersResponse, ClientError> {
        Ok(self
            .raw
            .list_providers(options.request(v1::ListProvidersRequest {})?)
            .await?
            .into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_become_metadata() {
        let mut m = MetadataMap::new();
        RetryOverrides {
            max_attempts: Some(2),
            max_backoff: Some(Duration::from_millis(1500)),
            retry_on: Some(vec![]),
            ..Default::default()
        }
        .apply(&mut m)
        .unwrap();
        assert_eq!(m.get("x-retry-max-attempts").unwrap(), "2");
        assert_eq!(m.get("x-retry-max-backoff-ms").unwrap(), "1500");
        assert_eq!(m.get("x-retry-on").unwrap(), "none");
        assert!(m.get("x-retry-initial-backoff-ms").is_none());
    }

    #[test]
    fn auth_key_is_bearer_metadata_and_never_printed() {
        let options = CallOptions::new().auth_key("k-123");
        let request = options.request(()).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer k-123"
        );
        assert!(!format!("{options:?}").contains("k-123"));
        let bad = CallOptions::new().auth_key("line\nbreak");
        assert!(matches!(bad.request(()), Err(ClientError::InvalidAuthKey)));
    }

    #[test]
    fn tls_needs_an_https_address() {
        let err =
            GatewayClient::tls_endpoint("http://127.0.0.1:1", &TlsOptions::new()).unwrap_err();
        assert!(matches!(err, ClientError::InvalidTls(_)), "{err}");
        let tls = TlsOptions::new()
            .client_identity("cert", "secret-key")
            .domain("gw");
        assert!(!format!("{tls:?}").contains("secret-key"));
    }
}
