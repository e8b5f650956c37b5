//! Configuration: built-in defaults, then the TOML file, then `GATEWAY_*`
//! environment variables, merged as TOML values and deserialized once with
//! unknown keys denied, so every error names the key at fault.
//!
//! The environment is read through [`EnvSource`], so tests never mutate the
//! process environment.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use toml::{Table, Value};

use crate::error::ErrorClass;

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:50051";
/// How long open streams may run after SIGTERM before the process exits.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 30_000;
/// Where the admin HTTP server (`/metrics`) listens by default.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9090";
/// Where the OpenAI- and Anthropic-compatible HTTP ingress listens by default.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:8080";
/// The prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "GATEWAY_";

/// Reads environment variables. The process environment in production, a map
/// in tests.
pub trait EnvSource: Send + Sync {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
    /// Every variable, for the `GATEWAY_*` overrides.
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl EnvSource for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// A configuration error; its message names the key or variable at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the gRPC server listens.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where the HTTP ingress (OpenAI / Anthropic compatible) listens;
    /// empty = not at all.
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
    /// The provider used when a request names none.
    #[serde(default)]
    pub default_provider: Option<String>,
    /// Registry-wide retry defaults and the per-request ceilings.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The providers, by name.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// How long open calls may run after SIGTERM/SIGINT before the process
    /// exits.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
    /// Client authentication (off when absent).
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// TLS for the gRPC listener (plaintext when absent).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Request size, concurrency and connection limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// gRPC-Web on the gRPC port: the browser origins allowed by CORS.
    #[serde(default)]
    pub grpc_web: GrpcWebConfig,
    /// Traces, metrics and logs.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `GATEWAY_*` variables skipped as Kubernetes service links (not
    /// configuration), for a debug log once logging is up.
    #[serde(skip)]
    pub skipped_env_vars: Vec<String>,
}

/// `[telemetry]`: the config-file equivalents of the standard `OTEL_*`
/// variables (which win when set), the admin port and the log format.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP collector endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`); none = no
    /// export.
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (`OTEL_EXPORTER_OTLP_PROTOCOL`).
    pub otlp_protocol: Option<String>,
    /// `service.name` (`OTEL_SERVICE_NAME`).
    pub service_name: Option<String>,
    /// The trace sampler (`OTEL_TRACES_SAMPLER`).
    pub sampler: Option<String>,
    /// The sampler's argument (`OTEL_TRACES_SAMPLER_ARG`).
    pub sampler_arg: Option<f64>,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource_attributes: BTreeMap<String, String>,
    /// Where `/metrics` (Prometheus text) is served; empty = not at all.
    pub admin_listen: String,
    /// `text` (default) or `json` logs.
    pub log_format: String,
    /// Spans queued for export before new ones are dropped.
    pub max_queue_size: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: None,
            service_name: None,
            sampler: None,
            sampler_arg: None,
            resource_attributes: BTreeMap::new(),
            admin_listen: DEFAULT_ADMIN_LISTEN.to_string(),
            log_format: "text".into(),
            max_queue_size: 2048,
        }
    }
}

fn default_grace() -> u64 {
    DEFAULT_SHUTDOWN_GRACE_MS
}

/// `[auth]`: callers must send `authorization: Bearer <key>`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// SHA-256 hashes (hex) of the accepted keys.
    #[serde(default)]
    pub keys: Vec<String>,
    /// A variable holding more hashes, comma-separated.
    pub keys_env: Option<String>,
    /// Keys with their own name, allowed providers and retry ceilings.
    #[serde(default)]
    pub clients: Vec<AuthClientConfig>,
}

/// One `[[auth.clients]]` entry.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthClientConfig {
    /// A name for logs.
    pub name: String,
    /// The SHA-256 hash (hex) of the client's key.
    pub key_sha256: String,
    /// The providers this client may call (all when absent).
    pub providers: Option<Vec<String>>,
    /// Ceilings for this client's retry overrides, within `[retry.limits]`.
    pub limits: Option<RetryLimitsConfig>,
}

/// `[tls]`: serve gRPC over TLS, optionally requiring client certificates.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate chain (PEM).
    pub cert_path: String,
    /// The server's private key (PEM).
    pub key_path: String,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca_path: Option<String>,
}

/// `[limits]`: what the gateway accepts before it sheds load.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request message, in bytes.
    pub max_request_bytes: usize,
    /// Complete calls served at once; more are answered RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Streams served at once; more are answered RESOURCE_EXHAUSTED.
    pub max_concurrent_streams: usize,
    /// HTTP/2 keep-alive ping interval on client connections.
    pub http2_keepalive_interval_ms: u64,
    /// How long a keep-alive ping may go unanswered before the connection
    /// is closed.
    pub http2_keepalive_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 4 * 1024 * 1024,
            max_concurrent_requests: 1024,
            max_concurrent_streams: 1024,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 20_000,
        }
    }
}

/// `[grpc_web]`: gRPC-Web is always served on the gRPC port (HTTP/1.1 and
/// HTTP/2); browsers may call it from these origins only.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcWebConfig {
    /// Origins (`https://app.example.com`) CORS allows; `["*"]` = any;
    /// empty = none (non-browser gRPC-Web clients need no CORS).
    pub cors_allowed_origins: Vec<String>,
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}

fn default_http_listen() -> String {
    DEFAULT_HTTP_LISTEN.to_string()
}

/// A `[retry]` or `[providers.X.retry]` section. Unset keys inherit.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included.
    pub max_attempts: Option<u32>,
    /// The first backoff's ceiling.
    pub initial_backoff_ms: Option<u64>,
    /// The backoff cap.
    pub max_backoff_ms: Option<u64>,
    /// Growth of the ceiling per retry.
    pub backoff_multiplier: Option<f64>,
    /// The limit of one attempt (until first content for a stream).
    pub per_try_timeout_ms: Option<u64>,
    /// A Retry-After longer than this is not waited for.
    pub max_retry_after_ms: Option<u64>,
    /// Longest silence between two stream events.
    pub stream_idle_timeout_ms: Option<u64>,
    /// The longest wait for an attempt's first content before the call
    /// moves to the next hop (off when unset).
    pub first_token_timeout_ms: Option<u64>,
    /// The failure classes that are retried.
    pub retry_on: Option<Vec<String>>,
    /// Retries may add at most this fraction of the recent request rate.
    pub budget_ratio: Option<f64>,
    /// ... plus this many retries per second.
    pub budget_min_per_second: Option<f64>,
    /// The budget's sliding window.
    pub budget_window_ms: Option<u64>,
    /// Make a single attempt when the caller says it is retrying itself
    /// (`grpc-previous-rpc-attempts` > 0).
    pub single_attempt_when_client_retries: Option<bool>,
    /// Ceilings for per-request overrides (`[retry.limits]` only).
    pub limits: Option<RetryLimitsConfig>,
}

/// `[retry.limits]`: what a per-request override may not exceed.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryLimitsConfig {
    /// The most attempts a request may ask for.
    pub max_attempts: Option<u32>,
    /// The longest backoff cap a request may ask for.
    pub max_backoff_ms: Option<u64>,
    /// The longest per-try timeout a request may ask for.
    pub per_try_timeout_ms: Option<u64>,
    /// The shortest `x-hedge-after-ms` a request may ask for (default 50).
    pub min_hedge_after_ms: Option<u64>,
    /// Whether `x-hedge-after-ms` may turn hedging on or shorten its delay
    /// (default true); when false it can only turn hedging off.
    pub request_hedging: Option<bool>,
}

/// One provider's section, told apart by `kind`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProviderConfig {
    /// The Anthropic Messages API.
    Anthropic(HttpProviderConfig),
    /// Any OpenAI-compatible chat completions API.
    Openai(HttpProviderConfig),
    /// Databricks Model Serving.
    Databricks(HttpProviderConfig),
    /// Azure OpenAI: a deployment's chat completions.
    #[serde(rename = "azure-openai")]
    AzureOpenai(HttpProviderConfig),
    /// The Google Gemini API (generativelanguage).
    Gemini(HttpProviderConfig),
    /// Gemini models on Google Cloud Vertex AI.
    Vertex(HttpProviderConfig),
    /// AWS Bedrock Runtime's Converse API.
    Bedrock(HttpProviderConfig),
    /// The built-in deterministic provider.
    Mock(MockConfig),
    /// A local GGUF model running inside the gateway (cargo feature
    /// `embedded`).
    Embedded(EmbeddedConfig),
}

impl ProviderConfig {
    /// The kind's name, as written in `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Anthropic(_) => "anthropic",
            Self::Openai(_) => "openai",
            Self::Databricks(_) => "databricks",
            Self::AzureOpenai(_) => "azure-openai",
            Self::Gemini(_) => "gemini",
            Self::Vertex(_) => "vertex",
            Self::Bedrock(_) => "bedrock",
            Self::Mock(_) => "mock",
            Self::Embedded(_) => "embedded",
        }
    }

    /// The provider's breaker, fallback, resume and hedging keys.
    pub fn resilience(&self) -> ResilienceConfig {
        let from = |breaker: &Option<BreakerConfig>,
                    fallback: &Vec<FallbackHop>,
                    resume: Option<ResumeMode>,
                    max_resumes: Option<u32>,
                    hedge: Option<HedgeAfter>,
                    context_window: Option<u32>| ResilienceConfig {
            breaker: breaker.clone(),
            fallback: fallback.clone(),
            stream_resume: resume.unwrap_or_default(),
            max_resumes: max_resumes.unwrap_or(2),
            hedge_after_ms: match hedge {
                Some(HedgeAfter::Millis(ms)) => Some(ms),
                Some(HedgeAfter::P95) | None => None,
            },
            hedge_p95: hedge == Some(HedgeAfter::P95),
            context_window,
        };
        #[allow(unreachable_patterns)]
        match self {
            Self::Anthropic(c)
            | Self::Openai(c)
            | Self::Databricks(c)
            | Self::AzureOpenai(c)
            | Self::Gemini(c)
            | Self::Vertex(c)
            | Self::Bedrock(c) => from(
                &c.breaker,
                &c.fallback,
                c.stream_resume,
                c.max_resumes,
                c.hedge_after_ms,
                c.context_window,
            ),
            Self::Mock(c) => from(
                &c.breaker,
                &c.fallback,
                c.stream_resume,
                c.max_resumes,
                c.hedge_after_ms,
                c.context_window,
            ),
            // Kinds without these keys (a local model) have none.
            _ => ResilienceConfig {
                max_resumes: 2,
                ..ResilienceConfig::default()
            },
        }
    }

    /// The provider's own retry section, if any.
    pub fn retry(&self) -> Option<&RetryConfig> {
        match self {
            Self::Anthropic(c)
            | Self::Openai(c)
            | Self::Databricks(c)
            | Self::AzureOpenai(c)
            | Self::Gemini(c)
            | Self::Vertex(c)
            | Self::Bedrock(c) => c.retry.as_ref(),
            Self::Mock(c) => c.retry.as_ref(),
            Self::Embedded(c) => c.retry.as_ref(),
        }
    }

    /// The section of a provider reached over HTTP.
    pub fn http(&self) -> Option<&HttpProviderConfig> {
        match self {
            Self::Anthropic(c)
            | Self::Openai(c)
            | Self::Databricks(c)
            | Self::AzureOpenai(c)
            | Self::Gemini(c)
            | Self::Vertex(c)
            | Self::Bedrock(c) => Some(c),
            Self::Mock(_) | Self::Embedded(_) => None,
        }
    }

    /// The provider's pool: one member per endpoint and key pair (a
    /// provider without `endpoints` or a key list is a pool of one), each
    /// with the section its provider is built from.
    pub fn members(&self) -> Vec<MemberConfig> {
        let wrap = |c: HttpProviderConfig| match self {
            Self::Anthropic(_) => Self::Anthropic(c),
            Self::Openai(_) => Self::Openai(c),
            Self::Databricks(_) => Self::Databricks(c),
            Self::AzureOpenai(_) => Self::AzureOpenai(c),
            Self::Gemini(_) => Self::Gemini(c),
            Self::Vertex(_) => Self::Vertex(c),
            Self::Bedrock(_) => Self::Bedrock(c),
            // Not reached: these kinds have no HTTP section to expand.
            Self::Mock(_) | Self::Embedded(_) => Self::Bedrock(c),
        };
        let Some(http) = self.http() else {
            return vec![MemberConfig {
                label: self.kind().to_string(),
                host: String::new(),
                key_env: None,
                weight: 1,
                config: self.clone(),
            }];
        };
        http.members()
            .into_iter()
            .map(|(base, key_env, weight, config)| {
                let host = reqwest::Url::parse(&base)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_else(|| self.kind().to_string());
                let label = match &key_env {
                    Some(k) => format!("{host}/{k}"),
                    None => host.clone(),
                };
                MemberConfig {
                    label,
                    host,
                    key_env,
                    weight,
                    config: wrap(config),
                }
            })
            .collect()
    }
}

/// `[providers.X.breaker]`: when to stop calling a failing provider.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Open when this share of the calls in the window failed...
    pub failure_ratio: f64,
    /// ... and the window holds at least this many calls.
    pub min_requests: u32,
    /// The sliding window.
    pub window_ms: u64,
    /// Or open after this many failures in a row (0 = never).
    pub consecutive_failures: u32,
    /// How long an open breaker waits before a probe.
    pub cooldown_ms: u64,
    /// The cooldown doubles after each failed probe, up to this (default
    /// 10000, so a recovered provider is probed again within seconds; a
    /// value below `cooldown_ms` means `cooldown_ms`).
    pub max_cooldown_ms: u64,
    /// Probes let through while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_ratio: 0.5,
            min_requests: 10,
            window_ms: 10_000,
            consecutive_failures: 5,
            cooldown_ms: 5_000,
            max_cooldown_ms: 10_000,
            half_open_probes: 1,
        }
    }
}

/// One hop of a fallback chain: a provider name, or a table naming the
/// provider and the model to ask it for.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum FallbackHop {
    /// `"name"`: the provider with its default model.
    Name(String),
    /// `{ provider = "name", model = "m" }`.
    Table(FallbackTable),
}

/// The table form of a [`FallbackHop`].
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FallbackTable {
    /// The provider.
    pub provider: String,
    /// The model to ask it for; its default when absent.
    pub model: Option<String>,
    /// That model's context window in tokens (else the provider's).
    pub context_window: Option<u32>,
}

impl FallbackHop {
    /// The provider's name.
    pub fn provider(&self) -> &str {
        match self {
            Self::Name(n) => n,
            Self::Table(t) => &t.provider,
        }
    }

    /// The model, when the hop names one.
    pub fn model(&self) -> Option<&str> {
        match self {
            Self::Name(_) => None,
            Self::Table(t) => t.model.as_deref(),
        }
    }

    /// The hop's own context window, when it declares one.
    pub fn context_window(&self) -> Option<u32> {
        match self {
            Self::Name(_) => None,
            Self::Table(t) => t.context_window,
        }
    }
}

/// `api_key_env`: one environment variable, or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum KeyEnv {
    /// One variable.
    One(String),
    /// Several: a pool of keys.
    Many(Vec<String>),
}

impl KeyEnv {
    /// The variable names, in order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Self::One(name) => vec![name.as_str()],
            Self::Many(names) => names.iter().map(String::as_str).collect(),
        }
    }

    /// The first variable's name (a provider built for one pool member
    /// has exactly one).
    pub fn as_str(&self) -> &str {
        match self {
            Self::One(name) => name,
            Self::Many(names) => names.first().map_or("", String::as_str),
        }
    }
}

impl std::ops::Deref for KeyEnv {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// One endpoint of a pool (`endpoints = [{ base_url, weight, api_key_env }]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The endpoint's base URL.
    pub base_url: String,
    /// Its share of the calls, relative to the others (default 1).
    pub weight: Option<u32>,
    /// Its own key variable(s), instead of the provider's.
    pub api_key_env: Option<KeyEnv>,
}

/// How a pool chooses the member for an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// Power of two choices by score (latency, load, failures).
    #[default]
    P2c,
    /// By weight alone.
    Weighted,
    /// The first member that can serve.
    Ordered,
}

/// One member of a provider's pool: an endpoint and key pair, with the
/// section a provider of it is built from.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    /// What the member is called in telemetry and `ListProviders`: the
    /// endpoint's host and the key's variable name (never the key).
    pub label: String,
    /// The endpoint's host.
    pub host: String,
    /// The key's variable name, when it has one.
    pub key_env: Option<String>,
    /// Its weight.
    pub weight: u32,
    /// The section, with this member's single `base_url` and key.
    pub config: ProviderConfig,
}

impl HttpProviderConfig {
    /// The pool's members: each endpoint (default: `base_url` alone) with
    /// each of its keys (the endpoint's own, else the provider's).
    pub fn members(&self) -> Vec<(String, Option<String>, u32, HttpProviderConfig)> {
        let endpoints: Vec<(Option<String>, u32, Option<&KeyEnv>)> = if self.endpoints.is_empty() {
            vec![(self.base_url.clone(), 1, self.api_key_env.as_ref())]
        } else {
            self.endpoints
                .iter()
                .map(|e| {
                    (
                        Some(e.base_url.clone()),
                        e.weight.unwrap_or(1),
                        e.api_key_env.as_ref().or(self.api_key_env.as_ref()),
                    )
                })
                .collect()
        };
        let mut out = Vec::new();
        for (base_url, weight, keys) in endpoints {
            let names: Vec<Option<String>> = match keys {
                None => vec![None],
                Some(k) => k.names().into_iter().map(|n| Some(n.to_string())).collect(),
            };
            for name in names {
                let mut single = self.clone();
                single.endpoints = Vec::new();
                single.base_url.clone_from(&base_url);
                single.api_key_env = name.clone().map(KeyEnv::One);
                out.push((base_url.clone().unwrap_or_default(), name, weight, single));
            }
        }
        out
    }
}

/// How an OpenAI-compatible server is asked to continue a final assistant
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefillForm {
    /// vLLM and servers like it: the request carries
    /// `continue_final_message: true` and `add_generation_prompt: false`.
    ContinueFinalMessage,
    /// The server continues a last assistant message as it is (llama.cpp's
    /// server, and others).
    AssistantLast,
}

/// `hedge_after_ms`: a delay in milliseconds, or `"p95"`: the provider's
/// observed p95 time to first content (at least 100 ms; no hedge until 50
/// answers were seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeAfter {
    /// A fixed delay.
    Millis(u64),
    /// The observed p95.
    P95,
}

impl<'de> Deserialize<'de> for HedgeAfter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(Self::Millis(ms)),
            Raw::Text(t) if t == "p95" => Ok(Self::P95),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "`{t}` is not a number of milliseconds or \"p95\""
            ))),
        }
    }
}

/// How a stream that broke after content is rescued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResumeMode {
    /// It ends with an error.
    #[default]
    Off,
    /// A continuation request carries on from the text delivered.
    Continue,
    /// As `Continue`; when no continuation can be made, the request is
    /// sent again and the caller is told to discard what it received.
    Restart,
}

impl ResumeMode {
    /// Parses `off`, `continue` or `restart`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "off" => Some(Self::Off),
            "continue" => Some(Self::Continue),
            "restart" => Some(Self::Restart),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for ResumeMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Mode(String),
        }
        match Raw::deserialize(d)? {
            Raw::Flag(true) => Ok(Self::Continue),
            Raw::Flag(false) => Ok(Self::Off),
            Raw::Mode(m) => Self::parse(&m).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{m}` is not true, false, \"off\", \"continue\" or \"restart\""
                ))
            }),
        }
    }
}

/// The resilience keys of one provider section.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResilienceConfig {
    /// The breaker, if configured.
    pub breaker: Option<BreakerConfig>,
    /// The fallback chain.
    pub fallback: Vec<FallbackHop>,
    /// How broken streams are rescued.
    pub stream_resume: ResumeMode,
    /// How many continuations (or restarts) one stream may have.
    pub max_resumes: u32,
    /// The hedge delay.
    pub hedge_after_ms: Option<u64>,
    /// Hedge after the provider's observed p95 time to first content.
    pub hedge_p95: bool,
    /// The default model's context window, when declared.
    pub context_window: Option<u32>,
}

/// The keys of a provider reached over HTTP.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpProviderConfig {
    /// The API's base URL; the kind's public endpoint when unset (required
    /// for databricks).
    pub base_url: Option<String>,
    /// The environment variable holding the API key, or a list of them (a
    /// pool of keys: each key is a member of its own).
    pub api_key_env: Option<KeyEnv>,
    /// Several endpoints for one provider (a pool); default: `base_url`
    /// alone.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// How a pool's member is chosen: `p2c` (default), `weighted` or
    /// `ordered`.
    pub balance: Option<Balance>,
    /// The default model.
    pub model: Option<String>,
    /// `max_tokens` sent when a request sets none.
    pub max_tokens: Option<u32>,
    /// For an OpenAI-compatible server that continues a final assistant
    /// message (a prefill), which resuming a broken stream needs: the form
    /// it takes. Unset: the server is not asked to continue one.
    pub prefill: Option<PrefillForm>,
    /// A PEM bundle of extra trusted root certificates, for a self-hosted
    /// upstream behind a private CA (added to the platform's roots;
    /// certificates are always verified).
    pub ca_file: Option<String>,
    /// The longest SSE line, and the most data one SSE event may carry, in
    /// bytes (default 1 MiB); past it the stream fails as
    /// `stream-interrupted`.
    pub max_event_bytes: Option<usize>,
    /// The largest successful response body, in bytes (default 32 MiB); past
    /// it the attempt fails as `server-error`.
    pub max_body_bytes: Option<usize>,
    /// Connect timeout of the provider's HTTP client.
    pub connect_timeout_ms: Option<u64>,
    /// How long an idle pooled upstream connection is kept.
    pub pool_idle_timeout_ms: Option<u64>,
    /// Idle keep-alive connections kept per upstream host (default 256;
    /// 0 keeps none): after a burst, the connections past it are closed
    /// at once instead of idling for `pool_idle_timeout_ms`.
    pub pool_max_idle: Option<usize>,
    /// The provider's retry policy over `[retry]`.
    pub retry: Option<RetryConfig>,
    /// A circuit breaker for this provider (none when absent).
    pub breaker: Option<BreakerConfig>,
    /// Providers to try, in order, when this one cannot serve.
    #[serde(default)]
    pub fallback: Vec<FallbackHop>,
    /// Rescue a stream that broke after content: `false`/`"off"`,
    /// `true`/`"continue"` (a continuation request), or `"restart"`
    /// (continue when possible, else start the answer over).
    pub stream_resume: Option<ResumeMode>,
    /// The model's context window in tokens: a `context-length` failure
    /// moves the call to the next hop with a larger window.
    pub context_window: Option<u32>,
    /// How many breaks of one stream may be resumed (default 2).
    pub max_resumes: Option<u32>,
    /// Start a second attempt when the first has produced no content after
    /// this long (milliseconds), or after the provider's observed p95 time
    /// to first content (`"p95"`).
    pub hedge_after_ms: Option<HedgeAfter>,
    /// `azure-openai`: the `api-version` query parameter.
    pub api_version: Option<String>,
    /// `azure-openai`: a variable holding a Microsoft Entra bearer token,
    /// sent instead of an `api-key`.
    pub entra_token_env: Option<String>,
    /// `vertex`: the Google Cloud project.
    pub project: Option<String>,
    /// `vertex`: the location (`us-central1`, `global`); `bedrock`: the AWS
    /// region.
    pub region: Option<String>,
    /// `vertex`: a service-account JSON key file.
    pub credentials_file: Option<String>,
    /// `vertex`: a variable holding a service-account JSON key.
    pub credentials_env: Option<String>,
    /// `vertex`: the OAuth2 token endpoint the signed JWT is sent to.
    pub token_url: Option<String>,
    /// `bedrock`: a profile of the shared AWS credentials file.
    pub profile: Option<String>,
    /// `bedrock`: the STS endpoint for web-identity credentials.
    pub sts_url: Option<String>,
}

impl HttpProviderConfig {
    /// The kind-specific keys that are set, by name.
    fn kind_keys(&self) -> Vec<&'static str> {
        [
            ("api_version", self.api_version.is_some()),
            ("entra_token_env", self.entra_token_env.is_some()),
            ("project", self.project.is_some()),
            ("region", self.region.is_some()),
            ("credentials_file", self.credentials_file.is_some()),
            ("credentials_env", self.credentials_env.is_some()),
            ("token_url", self.token_url.is_some()),
            ("profile", self.profile.is_some()),
            ("sts_url", self.sts_url.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

/// The kind-specific keys a kind of HTTP provider accepts.
fn keys_of_kind(kind: &str) -> &'static [&'static str] {
    match kind {
        "azure-openai" => &["api_version", "entra_token_env"],
        "vertex" => &[
            "project",
            "region",
            "credentials_file",
            "credentials_env",
            "token_url",
        ],
        "bedrock" => &["region", "profile", "sts_url"],
        _ => &[],
    }
}

/// The keys of the built-in `mock` provider.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// The default model name it reports.
    pub model: Option<String>,
    /// `echo` (the last user text, the default) or `words` (N generated words).
    pub reply: Option<String>,
    /// How many words `reply = "words"` generates.
    pub words: Option<u32>,
    /// Delay before a Complete answer, or before a stream's start event.
    pub latency_ms: Option<u64>,
    /// Delay between a stream's start and its first content chunk.
    pub first_chunk_ms: Option<u64>,
    /// Delay between two stream chunks.
    pub chunk_delay_ms: Option<u64>,
    /// Fail the first K calls.
    pub fail_first: Option<u32>,
    /// The class of the scripted failures (default `overloaded`).
    pub fail_class: Option<String>,
    /// The HTTP status the scripted failures report (default: by class).
    pub fail_status: Option<u16>,
    /// The Retry-After the scripted failures carry.
    pub fail_retry_after_ms: Option<u64>,
    /// Break every stream after this many content chunks.
    pub break_stream_after: Option<u32>,
    /// The provider's retry policy over `[retry]`.
    pub retry: Option<RetryConfig>,
    /// A circuit breaker for this provider (none when absent).
    pub breaker: Option<BreakerConfig>,
    /// Providers to try, in order, when this one cannot serve.
    #[serde(default)]
    pub fallback: Vec<FallbackHop>,
    /// Rescue a stream that broke after content: `false`/`"off"`,
    /// `true`/`"continue"` (a continuation request), or `"restart"`
    /// (continue when possible, else start the answer over).
    pub stream_resume: Option<ResumeMode>,
    /// The model's context window in tokens: a `context-length` failure
    /// moves the call to the next hop with a larger window.
    pub context_window: Option<u32>,
    /// How many breaks of one stream may be resumed (default 2).
    pub max_resumes: Option<u32>,
    /// Start a second attempt when the first has produced no content after
    /// this long (milliseconds), or after the provider's observed p95 time
    /// to first content (`"p95"`).
    pub hedge_after_ms: Option<HedgeAfter>,
}

/// The keys of the `embedded` provider: a GGUF model file run in-process.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// The GGUF model file.
    pub model_path: String,
    /// The context length to run with (prompt + answer, in tokens; default:
    /// the model's own, at most 4096); more than the model supports fails
    /// start-up.
    pub context_length: Option<u32>,
    /// Threads each session's forward passes run on (llama.cpp's
    /// `n_threads`; default: the machine's cores shared out among
    /// `max_sessions`, at least one each).
    pub threads: Option<usize>,
    /// Generations that run at once (default 1).
    pub max_sessions: Option<u32>,
    /// How long a request waits for a free session, in arrival order,
    /// before it fails as `busy` (default 5000; 0 = fail at once).
    pub queue_wait_ms: Option<u64>,
    /// Tokens generated when a request sets no `max_tokens` (default 512).
    pub max_tokens: Option<u32>,
    /// Sampling temperature when a request sets none (default 0.8; 0 =
    /// greedy).
    pub temperature: Option<f32>,
    /// Nucleus sampling when a request sets none (default 0.95).
    pub top_p: Option<f32>,
    /// Sampling seed: the same request gives the same answer (default: a
    /// new seed per request).
    pub seed: Option<u64>,
    /// Whether a session keeps the KV cache of the prompt it last ran, so
    /// a prompt that starts with the same tokens (the next turn of a
    /// conversation) prefills only the rest (default true). It takes no
    /// memory beyond the sessions' own caches. The logits of a prompt run
    /// in parts are equal to those of a prompt run whole only up to float
    /// rounding, so with sampling (temperature above 0) a `seed` repeats an
    /// answer exactly only with the cache off.
    pub prefix_cache: Option<bool>,
    /// The model name reported (default: the file's stem).
    pub model: Option<String>,
    /// How long a session waits for a caller that has stopped reading (the
    /// answer's channel full) before it ends the generation and frees the
    /// session; the caller then gets `CANCELLED` (default 30000).
    pub reader_timeout_ms: Option<u64>,
    /// The provider's retry policy over `[retry]`.
    pub retry: Option<RetryConfig>,
}

impl Config {
    /// Loads the configuration: built-in defaults, then `file` (if any), then
    /// `GATEWAY_*` variables from `env`. With no file, the `mock` provider is
    /// served, plus each provider whose well-known credentials `env` holds.
    pub fn load(file: Option<&Path>, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let mut root = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err(format!("cannot read config file {}: {e}", path.display())))?;
                text.parse::<Table>()
                    .map_err(|e| err(format!("config file {}: {e}", path.display())))?
            }
            None => zero_config(env),
        };
        let skipped = apply_env_overrides(&mut root, env)?;
        let mut config = Self::from_table(root)?;
        config.skipped_env_vars = skipped;
        Ok(config)
    }

    /// Parses a configuration from TOML text (no environment overrides).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let table = text
            .parse::<Table>()
            .map_err(|e| err(format!("config: {e}")))?;
        Self::from_table(table)
    }

    fn from_table(mut root: Table) -> Result<Self, ConfigError> {
        // A file that configures no provider still serves the mock.
        if !root.contains_key("providers") {
            root.insert("providers".into(), Value::Table(mock_only()));
        }
        let config: Config = serde_path_to_error::deserialize(Value::Table(root)).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                err(format!("config: {}", e.inner()))
            } else {
                err(format!("config key `{path}`: {}", e.inner()))
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|e| {
            err(format!(
                "config key `listen`: `{}` is not a socket address: {e}",
                self.listen
            ))
        })
    }

    /// The HTTP ingress address, parsed; `None` when `http_listen` is empty.
    pub fn http_listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.http_listen.is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = self.http_listen.parse().map_err(|e| {
            err(format!(
                "config key `http_listen`: `{}` is not a socket address: {e}",
                self.http_listen
            ))
        })?;
        // The HTTP ingress speaks plain HTTP: with `[tls]` on the gRPC
        // listener, callers' keys must not cross the network in clear text
        // on the other door. Left at its default it is then off; set to a
        // non-loopback address it is an error.
        if self.tls.is_some() && !addr.ip().is_loopback() {
            if self.http_listen == DEFAULT_HTTP_LISTEN {
                return Ok(None);
            }
            return Err(err(format!(
                "config key `http_listen`: `{addr}` is not loopback, and the HTTP ingress has no TLS while `[tls]` is set: listen on 127.0.0.1 behind a TLS-terminating proxy, or set http_listen = \"\" to turn it off"
            )));
        }
        Ok(Some(addr))
    }

    /// The default provider's name.
    pub fn default_provider_name(&self) -> Result<String, ConfigError> {
        if let Some(name) = &self.default_provider {
            return Ok(name.clone());
        }
        let mut names = self.providers.keys();
        match (names.next(), names.next()) {
            (Some(only), None) => Ok(only.clone()),
            (None, _) => Err(err("config key `providers`: no provider is configured")),
            (Some(_), Some(_)) if self.providers.contains_key("mock") => Ok("mock".into()),
            (Some(_), Some(_)) => Err(err(
                "config key `default_provider`: must be set when several providers are configured",
            )),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.http_listen_addr()?;
        for (i, origin) in self.grpc_web.cors_allowed_origins.iter().enumerate() {
            let ok = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && http::HeaderValue::from_str(origin).is_ok());
            if !ok {
                return Err(err(format!(
                    "config key `grpc_web.cors_allowed_origins[{i}]`: `{origin}` is not an origin \
                     (scheme://host[:port], no path) or `*`"
                )));
            }
        }
        let default = self.default_provider_name()?;
        if !self.providers.contains_key(&default) {
            return Err(err(format!(
                "config key `default_provider`: `{default}` is not a configured provider"
            )));
        }
        crate::retry::RetryPolicy::resolve(&self.retry, None, "retry")?;
        if let Some(auth) = &self.auth {
            let hex = |s: &str| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit());
            if let Some(i) = auth.keys.iter().position(|k| !hex(k)) {
                return Err(err(format!(
                    "config key `auth.keys[{i}]`: expected a SHA-256 hash as 64 hex digits"
                )));
            }
            for (i, c) in auth.clients.iter().enumerate() {
                if !hex(&c.key_sha256) {
                    return Err(err(format!(
                        "config key `auth.clients[{i}].key_sha256`: expected a SHA-256 hash as 64 hex digits"
                    )));
                }
                for p in c.providers.iter().flatten() {
                    if !self.providers.contains_key(p) {
                        return Err(err(format!(
                            "config key `auth.clients[{i}].providers`: `{p}` is not a configured provider"
                        )));
                    }
                }
            }
        }
        let t = &self.telemetry;
        if t.log_format != "text" && t.log_format != "json" {
            return Err(err(format!(
                "config key `telemetry.log_format`: expected `text` or `json`, got `{}`",
                t.log_format
            )));
        }
        if !t.admin_listen.is_empty() && t.admin_listen.parse::<SocketAddr>().is_err() {
            return Err(err(format!(
                "config key `telemetry.admin_listen`: `{}` is not a socket address",
                t.admin_listen
            )));
        }
        let l = &self.limits;
        for (key, value) in [
            ("max_request_bytes", l.max_request_bytes),
            ("max_concurrent_requests", l.max_concurrent_requests),
            ("max_concurrent_streams", l.max_concurrent_streams),
        ] {
            if value == 0 {
                return Err(err(format!(
                    "config key `limits.{key}`: must be greater than 0"
                )));
            }
        }
        crate::retry::RetryLimits::resolve(self.retry.limits.as_ref())?;
        for (name, provider) in &self.providers {
            if provider.retry().is_some_and(|r| r.limits.is_some()) {
                return Err(err(format!(
                    "config key `providers.{name}.retry.limits`: limits are only allowed under [retry]"
                )));
            }
            crate::retry::RetryPolicy::resolve(
                &self.retry,
                provider.retry(),
                &format!("providers.{name}.retry"),
            )?;
            let resilience = provider.resilience();
            for hop in &resilience.fallback {
                if hop.provider() == name || !self.providers.contains_key(hop.provider()) {
                    return Err(err(format!(
                        "config key `providers.{name}.fallback`: `{}` is not another configured provider",
                        hop.provider()
                    )));
                }
            }
            if let Some(b) = &resilience.breaker {
                let bad = |key: &str, why: &str| {
                    err(format!(
                        "config key `providers.{name}.breaker.{key}`: {why}"
                    ))
                };
                if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
                    return Err(bad("failure_ratio", "must be in (0, 1]"));
                }
                if b.window_ms < 1_000 {
                    return Err(bad("window_ms", "must be at least 1000"));
                }
                if b.cooldown_ms == 0 {
                    return Err(bad("cooldown_ms", "must be greater than 0"));
                }
                if b.half_open_probes == 0 {
                    return Err(bad("half_open_probes", "must be at least 1"));
                }
            }
            for (i, hop) in resilience.fallback.iter().enumerate() {
                if let (Some(model), Some(target)) =
                    (hop.model(), self.providers.get(hop.provider()))
                {
                    crate::providers::check_model_name(target.kind(), model).map_err(|why| {
                        err(format!(
                            "config key `providers.{name}.fallback[{i}].model`: {why}"
                        ))
                    })?;
                }
            }
            if let ProviderConfig::Anthropic(c)
            | ProviderConfig::Openai(c)
            | ProviderConfig::Databricks(c)
            | ProviderConfig::AzureOpenai(c)
            | ProviderConfig::Gemini(c)
            | ProviderConfig::Vertex(c)
            | ProviderConfig::Bedrock(c) = provider
            {
                let kind = provider.kind();
                if let Some(key) = c
                    .kind_keys()
                    .into_iter()
                    .find(|k| !keys_of_kind(kind).contains(k))
                {
                    return Err(err(format!(
                        "config key `providers.{name}.{key}`: not a key of kind `{kind}`"
                    )));
                }
                if let Some(model) = &c.model {
                    crate::providers::check_model_name(provider.kind(), model).map_err(|why| {
                        err(format!("config key `providers.{name}.model`: {why}"))
                    })?;
                }
                for (key, value) in [
                    ("max_event_bytes", c.max_event_bytes),
                    ("max_body_bytes", c.max_body_bytes),
                ] {
                    if value == Some(0) {
                        return Err(err(format!(
                            "config key `providers.{name}.{key}`: must be greater than 0"
                        )));
                    }
                }
                if c.ca_file.as_deref().is_some_and(|f| f.trim().is_empty()) {
                    return Err(err(format!(
                        "config key `providers.{name}.ca_file`: must name a PEM file"
                    )));
                }
            }
            if let ProviderConfig::Mock(MockConfig {
                model: Some(model), ..
            }) = provider
            {
                crate::providers::check_model_name("mock", model)
                    .map_err(|why| err(format!("config key `providers.{name}.model`: {why}")))?;
            }
            if let Some(c) = provider.http() {
                check_pool(name, c)?;
            }
            if let ProviderConfig::Anthropic(c) = provider
                && c.prefill.is_some()
            {
                return Err(err(format!(
                    "config key `providers.{name}.prefill`: Anthropic continues an assistant \
                     prefill natively; the key is for openai and databricks providers"
                )));
            }
            if resilience.context_window == Some(0)
                || resilience
                    .fallback
                    .iter()
                    .any(|h| h.context_window() == Some(0))
            {
                return Err(err(format!(
                    "config key `providers.{name}.context_window`: must be greater than 0"
                )));
            }
            match provider {
                ProviderConfig::Anthropic(c) | ProviderConfig::Openai(c) => {
                    check_url(name, c.base_url.as_deref())?;
                }
                ProviderConfig::AzureOpenai(c)
                | ProviderConfig::Gemini(c)
                | ProviderConfig::Vertex(c)
                | ProviderConfig::Bedrock(c) => {
                    check_url(name, c.base_url.as_deref())?;
                    check_cloud_keys(name, provider.kind(), c)?;
                }
                ProviderConfig::Databricks(c) => {
                    if c.base_url.is_none() {
                        return Err(err(format!(
                            "config key `providers.{name}.base_url`: required for a databricks provider (the workspace URL)"
                        )));
                    }
                    check_url(name, c.base_url.as_deref())?;
                }
                ProviderConfig::Embedded(c) => {
                    let key = |k: &str| format!("config key `providers.{name}.{k}`");
                    if c.model_path.trim().is_empty() {
                        return Err(err(format!("{}: must name a GGUF file", key("model_path"))));
                    }
                    for (k, v) in [
                        ("context_length", c.context_length.map(u64::from)),
                        ("threads", c.threads.map(|t| t as u64)),
                        ("max_sessions", c.max_sessions.map(u64::from)),
                        ("max_tokens", c.max_tokens.map(u64::from)),
                    ] {
                        if v == Some(0) {
                            return Err(err(format!("{}: must be greater than 0", key(k))));
                        }
                    }
                    // Each session is a thread with a KV cache of its own
                    // (about 90 MiB for a 135M model at 4096 tokens).
                    for (k, v, most) in [
                        ("max_sessions", c.max_sessions.map(u64::from), 64),
                        ("threads", c.threads.map(|t| t as u64), 256),
                    ] {
                        if v.is_some_and(|v| v > most) {
                            return Err(err(format!("{}: at most {most}", key(k))));
                        }
                    }
                    if c.temperature.is_some_and(|t| !(t >= 0.0 && t.is_finite())) {
                        return Err(err(format!("{}: must be 0 or more", key("temperature"))));
                    }
                    if c.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
                        return Err(err(format!("{}: must be in (0, 1]", key("top_p"))));
                    }
                }
                ProviderConfig::Mock(c) => {
                    if let Some(class) = &c.fail_class {
                        ErrorClass::parse(class).ok_or_else(|| {
                            err(format!(
                                "config key `providers.{name}.fail_class`: unknown class `{class}`"
                            ))
                        })?;
                    }
                    if let Some(reply) = &c.reply
                        && reply != "echo"
                        && reply != "words"
                    {
                        return Err(err(format!(
                            "config key `providers.{name}.reply`: expected `echo` or `words`, got `{reply}`"
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The keys of the cloud kinds (`azure-openai`, `gemini`, `vertex`,
/// `bedrock`) that can be checked without the environment; credentials are
/// checked when the provider is built (which `--check-config` does).
fn check_cloud_keys(name: &str, kind: &str, c: &HttpProviderConfig) -> Result<(), ConfigError> {
    let key = |k: &str| format!("config key `providers.{name}.{k}`");
    let blank = |v: &Option<String>| v.as_deref().is_some_and(|v| v.trim().is_empty());
    let key_envs = c
        .api_key_env
        .iter()
        .chain(c.endpoints.iter().filter_map(|e| e.api_key_env.as_ref()))
        .flat_map(KeyEnv::names)
        .map(str::to_string)
        .collect::<Vec<_>>();
    if let Some(k) = &c.api_key_env
        && k.names().is_empty()
    {
        return Err(err(format!(
            "{}: the list must not be empty",
            key("api_key_env")
        )));
    }
    let key_env = key_envs.iter().find(|n| n.trim().is_empty()).cloned();
    for (k, v) in [
        ("api_key_env", &key_env),
        ("api_version", &c.api_version),
        ("entra_token_env", &c.entra_token_env),
        ("project", &c.project),
        ("region", &c.region),
        ("credentials_file", &c.credentials_file),
        ("credentials_env", &c.credentials_env),
        ("profile", &c.profile),
    ] {
        if blank(v) {
            return Err(err(format!("{}: must not be empty", key(k))));
        }
    }
    // Values that go into a URL's host or path: a conservative set.
    let plain = |v: &str, extra: &[char]| {
        !v.is_empty()
            && v.len() <= 128
            && v.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || extra.contains(&ch))
    };
    if let Some(r) = &c.region
        && !plain(r, &[])
    {
        return Err(err(format!(
            "{}: `{r}` is not a region name (letters, digits and `-`)",
            key("region")
        )));
    }
    if matches!(kind, "vertex" | "bedrock") && c.api_key_env.is_some() {
        return Err(err(format!(
            "{}: not a key of kind `{kind}` (it authenticates with {})",
            key("api_key_env"),
            if kind == "vertex" {
                "a service-account key: credentials_file or credentials_env"
            } else {
                "AWS credentials from the environment, STS, the container endpoint or a profile"
            }
        )));
    }
    match kind {
        "azure-openai" => {
            if c.base_url.is_none() {
                return Err(err(format!(
                    "{}: required for an azure-openai provider (the resource endpoint, https://NAME.openai.azure.com)",
                    key("base_url")
                )));
            }
            if c.model.is_none() {
                return Err(err(format!(
                    "{}: required for an azure-openai provider (the deployment name)",
                    key("model")
                )));
            }
            if c.api_key_env.is_some() && c.entra_token_env.is_some() {
                return Err(err(format!(
                    "{}: set either api_key_env or entra_token_env, not both",
                    key("entra_token_env")
                )));
            }
            if let Some(v) = &c.api_version
                && !plain(v, &['.'])
            {
                return Err(err(format!(
                    "{}: `{v}` is not an api-version (such as 2024-10-21)",
                    key("api_version")
                )));
            }
        }
        "vertex" => {
            match &c.project {
                None => {
                    return Err(err(format!(
                        "{}: required for a vertex provider (the Google Cloud project id)",
                        key("project")
                    )));
                }
                Some(p) if !plain(p, &['.', ':']) => {
                    return Err(err(format!(
                        "{}: `{p}` is not a project id",
                        key("project")
                    )));
                }
                Some(_) => {}
            }
            if c.region.is_none() {
                return Err(err(format!(
                    "{}: required for a vertex provider (a location such as us-central1, or global)",
                    key("region")
                )));
            }
            if c.credentials_file.is_some() && c.credentials_env.is_some() {
                return Err(err(format!(
                    "{}: set either credentials_file or credentials_env, not both",
                    key("credentials_env")
                )));
            }
            check_http_url(&key("token_url"), c.token_url.as_deref())?;
        }
        "bedrock" => {
            check_http_url(&key("sts_url"), c.sts_url.as_deref())?;
        }
        _ => {}
    }
    Ok(())
}

fn check_http_url(key: &str, url: Option<&str>) -> Result<(), ConfigError> {
    let Some(url) = url else { return Ok(()) };
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(()),
        Ok(u) => Err(err(format!(
            "{key}: scheme `{}` is not http or https",
            u.scheme()
        ))),
        Err(e) => Err(err(format!("{key}: `{url}` is not a URL: {e}"))),
    }
}

/// A pool's keys: every key list non-empty with no blank name, every
/// endpoint a URL with a weight above zero.
fn check_pool(name: &str, c: &HttpProviderConfig) -> Result<(), ConfigError> {
    let lists = std::iter::once(("api_key_env".to_string(), c.api_key_env.as_ref())).chain(
        c.endpoints.iter().enumerate().map(|(i, e)| {
            (
                format!("endpoints[{i}].api_key_env"),
                e.api_key_env.as_ref(),
            )
        }),
    );
    for (key, list) in lists {
        let Some(list) = list else { continue };
        let names = list.names();
        if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) {
            return Err(err(format!(
                "config key `providers.{name}.{key}`: needs one or more variable names, none empty"
            )));
        }
    }
    for (i, e) in c.endpoints.iter().enumerate() {
        check_url(name, Some(&e.base_url)).map_err(|e2| {
            err(e2
                .0
                .replace(".base_url`", &format!(".endpoints[{i}].base_url`")))
        })?;
        if e.weight == Some(0) {
            return Err(err(format!(
                "config key `providers.{name}.endpoints[{i}].weight`: must be at least 1"
            )));
        }
    }
    if c.balance.is_some()
        && c.endpoints.is_empty()
        && !matches!(&c.api_key_env, Some(KeyEnv::Many(v)) if v.len() > 1)
    {
        return Err(err(format!(
            "config key `providers.{name}.balance`: the provider has one member; give it \
             `endpoints` or a list of `api_key_env` variables"
        )));
    }
    Ok(())
}

fn check_url(name: &str, url: Option<&str>) -> Result<(), ConfigError> {
    let Some(url) = url else { return Ok(()) };
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(()),
        Ok(u) => Err(err(format!(
            "config key `providers.{name}.base_url`: scheme `{}` is not http or https",
            u.scheme()
        ))),
        Err(e) => Err(err(format!(
            "config key `providers.{name}.base_url`: `{url}` is not a URL: {e}"
        ))),
    }
}

fn mock_only() -> Table {
    let mut mock = Table::new();
    mock.insert("kind".into(), Value::String("mock".into()));
    let mut providers = Table::new();
    providers.insert("mock".into(), Value::Table(mock));
    providers
}

/// The configuration used without a file: the mock, plus every provider whose
/// well-known credentials are set.
fn zero_config(env: &dyn EnvSource) -> Table {
    let mut providers = mock_only();
    let mut add = |name: &str, kind: &str, key_env: &str, base_url: Option<String>| {
        let mut t = Table::new();
        t.insert("kind".into(), Value::String(kind.into()));
        t.insert("api_key_env".into(), Value::String(key_env.into()));
        if let Some(url) = base_url {
            t.insert("base_url".into(), Value::String(url));
        }
        providers.insert(name.into(), Value::Table(t));
    };
    let set = |key: &str| env.get(key).filter(|v| !v.is_empty());
    if set("ANTHROPIC_API_KEY").is_some() {
        add("anthropic", "anthropic", "ANTHROPIC_API_KEY", None);
    }
    if set("OPENAI_API_KEY").is_some() {
        add("openai", "openai", "OPENAI_API_KEY", None);
    }
    if let (Some(host), Some(_)) = (set("DATABRICKS_HOST"), set("DATABRICKS_TOKEN")) {
        let url = if host.starts_with("http://") || host.starts_with("https://") {
            host
        } else {
            format!("https://{host}")
        };
        add("databricks", "databricks", "DATABRICKS_TOKEN", Some(url));
    }
    let mut root = Table::new();
    root.insert("default_provider".into(), Value::String("mock".into()));
    root.insert("providers".into(), Value::Table(providers));
    root
}

/// Applies `GATEWAY_A__B=value` as key `a.b = value`. The value is read as a
/// TOML value when it parses as one (numbers, booleans, arrays), else as a
/// string.
/// Variables of the shapes Kubernetes injects for a Service named
/// `gateway` (or `gateway-*`) are skipped, not read as keys; their names are
/// returned.
fn apply_env_overrides(root: &mut Table, env: &dyn EnvSource) -> Result<Vec<String>, ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .vars()
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != "GATEWAY_CONFIG")
        .collect();
    vars.sort();
    let mut skipped = Vec::new();
    for (var, raw) in vars {
        if is_service_link(&var, &raw) {
            tracing::debug!(variable = %var, "skipped a Kubernetes service-link variable");
            skipped.push(var);
            continue;
        }
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(err(format!(
                "environment variable {var}: empty key segment"
            )));
        }
        let value = format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(Value::String(raw));
        let (last, parents) = path.split_last().ok_or_else(|| err(var.clone()))?;
        let mut table = &mut *root;
        for (depth, segment) in parents.iter().enumerate() {
            let entry = table
                .entry(segment.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            table = entry.as_table_mut().ok_or_else(|| {
                err(format!(
                    "environment variable {var}: `{}` is not a section",
                    parents[..=depth].join(".")
                ))
            })?;
        }
        table.insert(last.clone(), value);
    }
    Ok(skipped)
}

/// Whether `var=value` has exactly the shape of a Kubernetes service link
/// for a Service whose name starts with `gateway` (`GATEWAY_` then an
/// optional `NAME_` of the rest of the Service's name):
/// `{S}SERVICE_HOST=<ip>`, `{S}SERVICE_PORT=<port>`,
/// `{S}SERVICE_PORT_<PORT_NAME>=<port>`, `{S}PORT=<proto>://<ip>:<port>`,
/// `{S}PORT_<port>_<PROTO>=<proto>://<ip>:<port>` and its `_PROTO`, `_PORT`
/// and `_ADDR`. Configuration keys never have these shapes (their levels are
/// joined by `__`, which Kubernetes never writes).
fn is_service_link(var: &str, value: &str) -> bool {
    let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
        return false;
    };
    if rest.contains("__") {
        return false;
    }
    let is_ip = |v: &str| v.parse::<std::net::IpAddr>().is_ok();
    let is_port = |v: &str| !v.is_empty() && v.len() <= 5 && v.parse::<u16>().is_ok();
    let is_proto = |v: &str| matches!(v, "TCP" | "UDP" | "SCTP");
    let is_url = |v: &str| {
        let Some((proto, addr)) = v.split_once("://") else {
            return false;
        };
        matches!(proto, "tcp" | "udp" | "sctp") && addr.parse::<std::net::SocketAddr>().is_ok()
    };
    // The words after the Service's own name; its name may hold `_` too, so
    // each split point is tried.
    let words: Vec<&str> = rest.split('_').collect();
    (0..words.len()).any(|start| {
        if start > 0 && words[..start].iter().any(|w| w.is_empty()) {
            return false;
        }
        match &words[start..] {
            ["SERVICE", "HOST"] => is_ip(value),
            ["SERVICE", "PORT"] => is_port(value),
            ["SERVICE", "PORT", name @ ..] => {
                !name.is_empty() && name.iter().all(|w| !w.is_empty()) && is_port(value)
            }
            ["PORT"] => is_url(value),
            ["PORT", port, proto] => is_port(port) && is_proto(proto) && is_url(value),
            ["PORT", port, proto, "PROTO"] => {
                is_port(port) && is_proto(proto) && value.eq_ignore_ascii_case(proto)
            }
            ["PORT", port, proto, "PORT"] => is_port(port) && is_proto(proto) && value == *port,
            ["PORT", port, proto, "ADDR"] => is_port(port) && is_proto(proto) && is_ip(value),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn with_tls_the_http_ingress_listens_only_on_loopback() {
        let tls = "[tls]\ncert_path = \"c.pem\"\nkey_path = \"k.pem\"\n";
        let with = |listen: &str| {
            Config::from_toml(&format!("http_listen = \"{listen}\"\n{tls}"))
                .and_then(|c| c.http_listen_addr())
        };
        let err = with("0.0.0.0:9000").unwrap_err();
        assert!(
            err.0
                .starts_with("config key `http_listen`: `0.0.0.0:9000` is not loopback"),
            "{err}"
        );
        assert_eq!(
            with("127.0.0.1:8080").unwrap(),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(with("").unwrap(), None);
        // Left at its default, the ingress is simply off under TLS.
        let default = Config::from_toml(tls).unwrap();
        assert_eq!(default.http_listen_addr().unwrap(), None);
        // Without TLS any address is taken, as before.
        let plain = Config::from_toml("http_listen = \"0.0.0.0:8080\"\n").unwrap();
        assert!(plain.http_listen_addr().unwrap().is_some());
    }

    #[test]
    fn embedded_sessions_and_threads_are_bounded() {
        let toml = |extra: &str| {
            format!("[providers.local]\nkind = \"embedded\"\nmodel_path = \"m.gguf\"\n{extra}\n")
        };
        assert!(Config::from_toml(&toml("max_sessions = 64\nthreads = 256")).is_ok());
        let err = Config::from_toml(&toml("max_sessions = 65")).unwrap_err();
        assert_eq!(
            err.0,
            "config key `providers.local.max_sessions`: at most 64"
        );
        let err = Config::from_toml(&toml("threads = 100000")).unwrap_err();
        assert_eq!(err.0, "config key `providers.local.threads`: at most 256");
    }

    #[test]
    fn zero_config_serves_mock() {
        let c = Config::load(None, &env(&[])).unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.providers.keys().collect::<Vec<_>>(), ["mock"]);
        assert_eq!(c.default_provider_name().unwrap(), "mock");
    }

    #[test]
    fn zero_config_registers_providers_from_credentials() {
        let c = Config::load(
            None,
            &env(&[
                ("ANTHROPIC_API_KEY", "sk-a"),
                ("DATABRICKS_HOST", "adb-1.azuredatabricks.net"),
                ("DATABRICKS_TOKEN", "dapi"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.providers.keys().collect::<Vec<_>>(),
            ["anthropic", "databricks", "mock"]
        );
        let ProviderConfig::Databricks(d) = &c.providers["databricks"] else {
            panic!("databricks kind")
        };
        assert_eq!(
            d.base_url.as_deref(),
            Some("https://adb-1.azuredatabricks.net")
        );
        assert_eq!(c.default_provider_name().unwrap(), "mock");
    }

    #[test]
    fn env_overrides_file_values_with_typed_values() {
        let dir = std::env::temp_dir().join(format!("pg-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gw.toml");
        std::fs::write(
            &path,
            r#"
listen = "127.0.0.1:1"
default_provider = "m"
[retry]
max_attempts = 3
[providers.m]
kind = "mock"
model = "from-file"
"#,
        )
        .unwrap();
        let c = Config::load(
            Some(&path),
            &env(&[
                ("GATEWAY_LISTEN", "127.0.0.1:2"),
                ("GATEWAY_RETRY__MAX_ATTEMPTS", "5"),
                ("GATEWAY_PROVIDERS__M__MODEL", "from-env"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:2");
        assert_eq!(c.retry.max_attempts, Some(5));
        let ProviderConfig::Mock(m) = &c.providers["m"] else {
            panic!("mock kind")
        };
        assert_eq!(m.model.as_deref(), Some("from-env"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml("[retry]\nmax_atempts = 3\n").unwrap_err();
        assert!(e.0.contains("retry.max_atempts"), "{e}");
        let e = Config::from_toml("lisen = \"x\"\n").unwrap_err();
        assert!(e.0.contains("lisen"), "{e}");
        let e = Config::from_toml("[providers.a]\nkind = \"mock\"\nfail_frist = 1\n").unwrap_err();
        assert!(
            e.0.contains("providers.a") && e.0.contains("fail_frist"),
            "{e}"
        );
        let e = Config::from_toml("[providers.a]\nkind = \"cohere\"\n").unwrap_err();
        assert!(e.0.contains("providers.a") && e.0.contains("cohere"), "{e}");
        let e =
            Config::from_toml("[providers.a]\nkind = \"gemini\"\nproject = \"p\"\n").unwrap_err();
        assert!(e.0.contains("providers.a.project"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::from_toml("listen = \"nowhere\"\n").unwrap_err();
        assert!(e.0.contains("`listen`"), "{e}");
        let e = Config::from_toml("[retry]\nmax_attempts = \"three\"\n").unwrap_err();
        assert!(e.0.contains("retry.max_attempts"), "{e}");
        let e = Config::from_toml("[retry]\nmax_attempts = 0\n").unwrap_err();
        assert!(e.0.contains("retry.max_attempts"), "{e}");
        let e = Config::from_toml("[retry]\nretry_on = [\"auth\"]\n").unwrap_err();
        assert!(
            e.0.contains("retry.retry_on") && e.0.contains("auth"),
            "{e}"
        );
        let e = Config::from_toml("[providers.d]\nkind = \"databricks\"\n").unwrap_err();
        assert!(e.0.contains("providers.d.base_url"), "{e}");
        let e = Config::from_toml("default_provider = \"x\"\n[providers.a]\nkind = \"mock\"\n")
            .unwrap_err();
        assert!(e.0.contains("default_provider"), "{e}");
        let e = Config::from_toml(
            "[providers.a]\nkind = \"mock\"\n[providers.a.retry]\nmax_backoff_ms = 1\ninitial_backoff_ms = 5\n",
        )
        .unwrap_err();
        assert!(e.0.contains("providers.a.retry.max_backoff_ms"), "{e}");
    }

    #[test]
    fn model_names_are_checked_at_load_naming_the_key() {
        let e = Config::from_toml(
            "[providers.d]\nkind = \"databricks\"\nbase_url = \"https://h\"\nmodel = \"../../api/2.0/clusters/list#\"\n",
        )
        .unwrap_err();
        assert!(e.0.contains("providers.d.model"), "{e}");
        let e = Config::from_toml(
            "default_provider = \"a\"\n[providers.a]\nkind = \"mock\"\nfallback = [{ provider = \"d\", model = \"a/b\" }]\n[providers.d]\nkind = \"databricks\"\nbase_url = \"https://h\"\n",
        )
        .unwrap_err();
        assert!(e.0.contains("providers.a.fallback[0].model"), "{e}");
        let e = Config::load(
            None,
            &env(&[("GATEWAY_PROVIDERS__MOCK__MODEL", "has space")]),
        )
        .unwrap_err();
        assert!(e.0.contains("providers.mock.model"), "{e}");
        Config::from_toml(
            "[providers.o]\nkind = \"openai\"\nmodel = \"meta-llama/Llama-3.1-8B-Instruct\"\n",
        )
        .unwrap();
    }

    #[test]
    fn read_limits_must_be_positive() {
        let e = Config::from_toml("[providers.o]\nkind = \"openai\"\nmax_event_bytes = 0\n")
            .unwrap_err();
        assert!(e.0.contains("providers.o.max_event_bytes"), "{e}");
        let c = Config::from_toml(
            "[providers.o]\nkind = \"openai\"\nmax_event_bytes = 10\nmax_body_bytes = 20\nca_file = \"/x.pem\"\n",
        )
        .unwrap();
        let ProviderConfig::Openai(o) = &c.providers["o"] else {
            panic!("openai kind")
        };
        assert_eq!((o.max_event_bytes, o.max_body_bytes), (Some(10), Some(20)));
    }

    #[test]
    fn kubernetes_service_links_are_skipped() {
        let c = Config::load(
            None,
            &env(&[
                ("GATEWAY_SERVICE_HOST", "10.96.0.12"),
                ("GATEWAY_SERVICE_PORT", "50051"),
                ("GATEWAY_SERVICE_PORT_GRPC", "50051"),
                ("GATEWAY_SERVICE_PORT_ADMIN", "9090"),
                ("GATEWAY_PORT", "tcp://10.96.0.12:50051"),
                ("GATEWAY_PORT_50051_TCP", "tcp://10.96.0.12:50051"),
                ("GATEWAY_PORT_50051_TCP_PROTO", "tcp"),
                ("GATEWAY_PORT_50051_TCP_PORT", "50051"),
                ("GATEWAY_PORT_50051_TCP_ADDR", "10.96.0.12"),
                ("GATEWAY_PORT_9090_TCP", "tcp://10.96.0.12:9090"),
                ("GATEWAY_RETRY__MAX_ATTEMPTS", "4"),
            ]),
        )
        .unwrap();
        assert_eq!(c.retry.max_attempts, Some(4));
        // A genuine key of the same prefix, or a look-alike with another
        // value, is still an error naming it.
        for (var, value, named) in [
            ("GATEWAY_PORT", "50051", "port"),
            ("GATEWAY_SERVICE_HOST", "not an address", "service_host"),
            ("GATEWAY_LISTEN_PORT", "50051", "listen_port"),
        ] {
            let e = Config::load(None, &env(&[(var, value)])).unwrap_err();
            assert!(e.0.contains(named), "{var}={value}: {e}");
        }
    }

    #[test]
    fn env_variable_with_unknown_key_is_rejected() {
        let e = Config::load(None, &env(&[("GATEWAY_RETRY__BOGUS", "1")])).unwrap_err();
        assert!(e.0.contains("retry.bogus"), "{e}");
    }
}
