//! Providers: each translates the gateway's [`ChatRequest`] to one upstream
//! API and the upstream's answers and failures back. A provider makes exactly
//! one upstream call per method call and never retries; the registry owns
//! retry, timeouts and deadlines.

pub mod anthropic;
pub(crate) mod aws;
pub mod azure;
pub mod bedrock;
pub mod databricks;
#[cfg(feature = "embedded")]
pub mod embedded;
pub mod gemini;
pub(crate) mod http;
pub mod mock;
pub mod openai;
pub(crate) mod sse;
pub mod vertex;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use futures_core::Stream;
use futures_util::future::BoxFuture;

use crate::chat::{ChatRequest, ChatResponse, StreamEvent};
use crate::config::{ConfigError, EnvSource, ProviderConfig};
use crate::error::ProviderError;

/// What an upstream said of its rate limits on one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests left, and how long until they are refilled.
    pub requests: Option<(u64, std::time::Duration)>,
    /// Tokens left (the tightest of its token limits), and their reset.
    pub tokens: Option<(u64, std::time::Duration)>,
}

/// Where an attempt's reported rate limits go (its pool member).
pub(crate) type Pacer = Box<dyn Fn(RateLimits) + Send + Sync>;

/// What one attempt's upstream call tells the gate besides its result.
#[derive(Default)]
pub(crate) struct AttemptSignals {
    /// The upstream answered (response headers arrived).
    pub(crate) responded: std::sync::atomic::AtomicBool,
    /// Paces the attempt's pool member as soon as its answer reports its
    /// rate limits.
    pub(crate) pacer: Option<Pacer>,
}

tokio::task_local! {
    static SIGNALS: Arc<AttemptSignals>;
}

/// Tells the running attempt that the upstream has answered (its response
/// headers arrived): an attempt that then runs out of time is a `timeout`,
/// one that never got here a `timeout-silent`. Outside an attempt it does
/// nothing.
pub fn mark_responded() {
    let _ = SIGNALS.try_with(|s| {
        s.responded
            .store(true, std::sync::atomic::Ordering::Relaxed)
    });
}

/// Tells the running attempt the rate limits the upstream reported, which
/// pace a pool's members. Outside an attempt it does nothing.
pub fn report_rate_limits(limits: RateLimits) {
    let _ = SIGNALS.try_with(|s| {
        if let Some(pace) = &s.pacer {
            pace(limits);
        }
    });
}

/// Runs one attempt's upstream call, noting in `signals` what it tells.
pub(crate) async fn watch_responded<F: std::future::Future>(
    signals: Arc<AttemptSignals>,
    call: F,
) -> F::Output {
    SIGNALS.scope(signals, call).await
}

/// The events of one streamed attempt. It ends after [`StreamEvent::Stop`] or
/// after the first error; dropping it drops the upstream request.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ProviderError>> + Send>>;

/// One upstream API behind the gateway.
pub trait Provider: Send + Sync + 'static {
    /// The provider's kind (`anthropic`, `openai`, `databricks`, `mock`).
    fn kind(&self) -> &'static str;

    /// The model used when a request names none.
    fn default_model(&self) -> &str;

    /// The model file, for a model running inside the gateway.
    fn local_model(&self) -> Option<LocalModelInfo> {
        None
    }

    /// Whether requests with tools or tool results may be sent here.
    fn supports_tools(&self) -> bool {
        true
    }

    /// Whether a last assistant message is continued (prefill), which a
    /// resumed stream needs.
    fn supports_prefill(&self) -> bool {
        false
    }

    /// Checks a model name a request asks for before anything goes
    /// upstream; the error says what is wrong with it (without the field
    /// name). By default, the kind's character set
    /// ([`check_model_name`]).
    fn check_model(&self, model: &str) -> Result<(), String> {
        check_model_name(self.kind(), model)
    }

    /// Makes one upstream call for a whole answer.
    fn complete<'a>(
        &'a self,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>>;

    /// Opens one upstream stream. Resolves once the upstream accepted the
    /// request (an HTTP error status is an `Err` here); the events follow.
    fn stream<'a>(
        &'a self,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<EventStream, ProviderError>>;
}

/// The longest model name accepted.
pub const MAX_MODEL_NAME: usize = 256;

/// Checks `model` against the conservative character set of a provider of
/// `kind`: ASCII letters, digits, `-`, `_`, `.` and `:` for most kinds;
/// `openai` also allows `/` (`org/model`, as vLLM serves them; the name goes
/// in the JSON body, not the URL); `databricks` endpoint names, which go
/// into the URL path, only letters, digits, `-` and `_`. Never `..`, at
/// most [`MAX_MODEL_NAME`] bytes. The error quotes the name escaped and
/// shortened.
pub fn check_model_name(kind: &str, model: &str) -> Result<(), String> {
    let (extra, allowed): (&[char], &str) = match kind {
        "databricks" => (
            &['-', '_'],
            "letters, digits, `-` and `_` (a serving endpoint name)",
        ),
        "openai" => (
            &['-', '_', '.', ':', '/'],
            "letters, digits, `-`, `_`, `.`, `:` and `/`",
        ),
        // Names that become (part of) one URL path segment.
        "azure-openai" | "gemini" | "vertex" => {
            (&['-', '_', '.'], "letters, digits, `-`, `_` and `.`")
        }
        // Model ids, inference profile ids and ARNs (escaped as one path
        // segment).
        "bedrock" => (
            &['-', '_', '.', ':', '/'],
            "letters, digits, `-`, `_`, `.`, `:` and `/` (a model id or ARN)",
        ),
        _ => (
            &['-', '_', '.', ':'],
            "letters, digits, `-`, `_`, `.` and `:`",
        ),
    };
    let shown = || {
        let mut s: String = model.chars().take(64).collect();
        if s.len() < model.len() {
            s.push_str("...");
        }
        format!("{s:?}")
    };
    if model.is_empty() {
        return Err("must not be empty".into());
    }
    if model.len() > MAX_MODEL_NAME {
        return Err(format!("{} is longer than {MAX_MODEL_NAME} bytes", shown()));
    }
    if !model
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
    {
        return Err(format!(
            "{} is not a valid {kind} model name: use only {allowed}",
            shown()
        ));
    }
    if model.contains("..")
        || model.starts_with('/')
        || model.ends_with('/')
        || (matches!(kind, "azure-openai" | "gemini" | "vertex" | "bedrock")
            && !model.starts_with(|c: char| c.is_ascii_alphanumeric()))
    {
        return Err(format!(
            "{} is not a valid {kind} model name: no `..`, no leading or trailing `/` \
             (and for a cloud kind, a letter or digit first)",
            shown()
        ));
    }
    Ok(())
}

/// What `ListProviders` shows of a model running inside the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModelInfo {
    /// The model file's name.
    pub file_name: String,
    /// Its parameter count.
    pub parameter_count: u64,
    /// The context length it runs with.
    pub context_length: u32,
}

/// An API key read from the environment. Its `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key, for the one header that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the key replaced by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        if self.0.len() < 8 {
            // Too short to tell apart from ordinary words; keys never are.
            return text.to_string();
        }
        text.replace(&self.0, "[redacted]")
    }

    /// Reads the key from `var`; start-up fails naming the variable when it
    /// is unset or empty.
    pub fn from_env(env: &dyn EnvSource, var: &str, provider: &str) -> Result<Self, ConfigError> {
        match env.get(var) {
            Some(v) if !v.trim().is_empty() => Ok(Self(v.trim().to_string())),
            _ => Err(ConfigError(format!(
                "provider `{provider}`: environment variable {var} (its api_key_env) is not set"
            ))),
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Builds the provider described by one `[providers.X]` section.
pub fn build(
    name: &str,
    config: &ProviderConfig,
    env: &dyn EnvSource,
) -> Result<Arc<dyn Provider>, ConfigError> {
    Ok(match config {
        ProviderConfig::Anthropic(c) => Arc::new(anthropic::AnthropicProvider::new(name, c, env)?),
        ProviderConfig::Openai(c) => Arc::new(openai::OpenAiProvider::new(name, c, env)?),
        ProviderConfig::Databricks(c) => Arc::new(databricks::provider(name, c, env)?),
        ProviderConfig::AzureOpenai(c) => Arc::new(azure::provider(name, c, env)?),
        ProviderConfig::Gemini(c) => Arc::new(gemini::GeminiProvider::new(name, c, env)?),
        ProviderConfig::Vertex(c) => Arc::new(vertex::provider(name, c, env)?),
        ProviderConfig::Bedrock(c) => Arc::new(bedrock::BedrockProvider::new(name, c, env)?),
        ProviderConfig::Mock(c) => Arc::new(mock::MockProvider::new(c)?),
        #[cfg(feature = "embedded")]
        ProviderConfig::Embedded(c) => Arc::new(embedded::EmbeddedProvider::new(name, c)?),
        #[cfg(not(feature = "embedded"))]
        ProviderConfig::Embedded(_) => {
            return Err(ConfigError(format!(
                "provider `{name}`: kind `embedded` needs a gateway binary built with the \
                 `embedded` cargo feature; this one was built without it \
                 (cargo build --features embedded)"
            )));
        }
    })
}
