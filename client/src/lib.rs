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
use tonic::transport::{Channel, Endpoint};
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
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidEndpoint(e) => write!(f, "invalid endpoint: {e}"),
            Self::Connect(e) => write!(f, "cannot connect: {e}"),
            Self::Status(s) => write!(f, "{:?}: {}", s.code(), s.message()),
            Self::InvalidOverride(e) => write!(f, "invalid override: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

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
            Self::InvalidEndpoint(_) | Self::Connect(_) | Self::InvalidOverride(_) => None,
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
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// The call's deadline (sent as `grpc-timeout`).
    pub deadline: Option<Duration>,
    /// Retry overrides.
    pub retry: RetryOverrides,
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

    fn request<T>(&self, message: T) -> Result<Request<T>, ClientError> {
        let mut request = Request::new(message);
        if let Some(d) = self.deadline {
            request.set_timeout(d);
        }
        self.retry.apply(request.metadata_mut())?;
        Ok(request)
    }
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
            Event::Stop(s) => {
                Self::Stop(StopReason::try_from(s.stop_reason).unwrap_or(StopReason::Unspecified))
            }
        })
    }
}

/// The events of a streamed answer. Dropping it cancels the call.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ClientError>> + Send>>;

/// A connected gateway client. Cloning it is cheap and shares the connection.
#[derive(Debug, Clone)]
pub struct GatewayClient {
    raw: RawClient,
}

impl GatewayClient {
    /// Connects to `address` (for example `http://127.0.0.1:50051`) with a
    /// 5 s connect timeout.
    pub async fn connect(address: impl Into<String>) -> Result<Self, ClientError> {
        let endpoint = Self::endpoint(address)?;
        Self::connect_with(endpoint).await
    }

    /// The endpoint builder `connect` uses: set TLS
    /// (`Endpoint::tls_config`, with a tonic TLS feature), timeouts or
    /// keep-alive on it and pass it to [`GatewayClient::connect_with`].
    pub fn endpoint(address: impl Into<String>) -> Result<Endpoint, ClientError> {
        let endpoint = Endpoint::from_shared(address.into())
            .map_err(|e| ClientError::InvalidEndpoint(e.to_string()))?;
        Ok(endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true))
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
        Ok(Box::pin(events))
    }

    /// The providers the gateway serves.
    pub async fn providers(&mut self) -> Result<v1::ListProvidersResponse, ClientError> {
        Ok(self
            .raw
            .list_providers(v1::ListProvidersRequest {})
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
}
