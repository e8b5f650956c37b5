//! The telemetry of one call through the registry: a `chat {model}` span
//! per provider hop (GenAI semantic conventions), one span per upstream
//! attempt under it, and the metrics recorded once when the call ends,
//! however many hops it took. The registry decides; this module only
//! records.
//!
//! Metric labels are bounded: `gen_ai.request.model` is a configured model,
//! one of the first [`MAX_EXTRA_MODEL_LABELS`] other models callers named,
//! or `other`, so no caller can create unbounded series. Spans, which are
//! not series, carry the requested model as it was.
//!
//! Cost when nothing is exported: the `chat` and `attempt` spans are
//! `TRACE` spans. The OpenTelemetry layer (present only when spans are
//! exported) takes every level of this crate; the log layer's default
//! filter is `info`. So without an exporter no layer wants them, the
//! macros return a disabled span before evaluating a field, and every
//! `record` on it is a no-op; with one, every span and attribute is there.
//! The metric attributes of a provider and model label are built once
//! ([`HopAttributes`]) and shared by every call.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use tracing::Span;
use tracing::field::Empty;

use crate::chat::{ChatRequest, StopReason, Usage};
use crate::error::{GatewayError, ProviderError};
use crate::retry::Decision;
use crate::telemetry::GatewayMetrics;

/// The name a stop reason has in `gen_ai.response.finish_reasons`.
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::EndTurn => "end_turn",
        StopReason::MaxTokens => "max_tokens",
        StopReason::StopSequence => "stop_sequence",
        StopReason::ToolUse => "tool_use",
        StopReason::Refusal => "refusal",
        StopReason::ContentFilter => "content_filter",
    }
}

/// How many models besides the configured ones get a metric label.
pub const MAX_EXTRA_MODEL_LABELS: usize = 32;

/// The values the `gen_ai.request.model` metric label may take, and the
/// metric attributes built for each provider and label.
#[derive(Debug, Default)]
pub struct ModelLabels {
    configured: HashSet<String>,
    extra: Mutex<HashSet<String>>,
    /// By provider, then by model label: bounded as the labels are.
    attributes: Mutex<HashMap<String, HashMap<String, Arc<HopAttributes>>>>,
}

/// The metric attributes of one provider and model label, built once.
#[derive(Debug)]
pub struct HopAttributes {
    /// `gen_ai.operation.name`, `gen_ai.provider.name`,
    /// `gen_ai.request.model`.
    call: Vec<KeyValue>,
    /// `call` and `gen_ai.token.type="input"`.
    input_tokens: Vec<KeyValue>,
    /// `call` and `gen_ai.token.type="output"`.
    output_tokens: Vec<KeyValue>,
    /// `gateway.provider`.
    provider: [KeyValue; 1],
    /// The instruments bound to these attributes, for the first metrics
    /// they are recorded to.
    bound: std::sync::OnceLock<BoundInstruments>,
}

/// A call's histograms bound to one [`HopAttributes`]: the same series as
/// recording with the attributes, without looking them up per record.
#[derive(Debug)]
struct BoundInstruments {
    /// The metrics they belong to.
    metrics: std::sync::Weak<GatewayMetrics>,
    /// `operation_duration` of a call that succeeded.
    duration: opentelemetry::metrics::BoundHistogram<f64>,
    input_tokens: opentelemetry::metrics::BoundHistogram<u64>,
    output_tokens: opentelemetry::metrics::BoundHistogram<u64>,
    attempts: opentelemetry::metrics::BoundHistogram<u64>,
    overhead: opentelemetry::metrics::BoundHistogram<f64>,
}

impl BoundInstruments {
    fn new(metrics: &Arc<GatewayMetrics>, attributes: &HopAttributes) -> Self {
        Self {
            metrics: Arc::downgrade(metrics),
            duration: metrics.operation_duration.bind(&attributes.call),
            input_tokens: metrics.token_usage.bind(&attributes.input_tokens),
            output_tokens: metrics.token_usage.bind(&attributes.output_tokens),
            attempts: metrics.attempts.bind(&attributes.provider),
            overhead: metrics.overhead.bind(&attributes.provider),
        }
    }
}

impl HopAttributes {
    fn new(provider: &str, kind: &'static str, label: &str) -> Self {
        let call = vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.provider.name", kind),
            KeyValue::new("gen_ai.request.model", label.to_string()),
        ];
        let with_type = |kind: &'static str| {
            let mut attrs = call.clone();
            attrs.push(KeyValue::new("gen_ai.token.type", kind));
            attrs
        };
        Self {
            input_tokens: with_type("input"),
            output_tokens: with_type("output"),
            call,
            provider: [KeyValue::new("gateway.provider", provider.to_string())],
            bound: std::sync::OnceLock::new(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl ModelLabels {
    /// Labels for these configured models (and a few more).
    pub fn new(configured: impl IntoIterator<Item = String>) -> Self {
        Self {
            configured: configured.into_iter().collect(),
            ..Self::default()
        }
    }

    /// The label of `model`.
    pub fn label(&self, model: &str) -> String {
        self.label_of(model).to_string()
    }

    fn label_of<'m>(&self, model: &'m str) -> &'m str {
        if self.configured.contains(model) {
            return model;
        }
        let mut extra = lock(&self.extra);
        if extra.contains(model) {
            return model;
        }
        if extra.len() < MAX_EXTRA_MODEL_LABELS {
            extra.insert(model.to_string());
            return model;
        }
        "other"
    }

    /// The metric attributes of a call to `provider` (of `kind`) for
    /// `model`.
    pub fn attributes(
        &self,
        provider: &str,
        kind: &'static str,
        model: &str,
    ) -> Arc<HopAttributes> {
        let label = self.label_of(model);
        let mut all = lock(&self.attributes);
        if let Some(found) = all.get(provider).and_then(|by_label| by_label.get(label)) {
            return found.clone();
        }
        let built = Arc::new(HopAttributes::new(provider, kind, label));
        all.entry(provider.to_string())
            .or_default()
            .insert(label.to_string(), built.clone());
        built
    }
}

/// What the `chat` span of one provider hop names.
#[derive(Clone, Copy)]
pub struct Hop<'a> {
    /// The configured provider name.
    pub provider: &'a str,
    /// Its kind.
    pub kind: &'static str,
    /// The request this hop sends.
    pub request: &'a ChatRequest,
    /// The provider's default model.
    pub default_model: &'a str,
    /// The metric labels of models.
    pub labels: &'a ModelLabels,
}

/// One call's spans, timings and metric attributes.
pub struct CallObservation {
    /// The `chat {model}` span; attempt spans are its children.
    pub chat: Span,
    metrics: Arc<GatewayMetrics>,
    attributes: Arc<HopAttributes>,
    started: Instant,
    waited: Duration,
    overhead_recorded: bool,
}

impl CallObservation {
    /// Opens the `chat {model}` span for a call to `provider` (of `kind`);
    /// `label` is the model's metric label.
    pub fn start(metrics: Arc<GatewayMetrics>, hop: Hop<'_>) -> Self {
        let (chat, attributes) = Self::open_hop(&hop);
        Self {
            chat,
            metrics,
            attributes,
            started: Instant::now(),
            waited: Duration::ZERO,
            overhead_recorded: false,
        }
    }

    /// The call moves on to another provider: its `chat` span ends (with
    /// `error`, the reason) and the next hop's opens; the metrics still
    /// count one call.
    pub fn next_hop(&mut self, error: &GatewayError, hop: Hop<'_>) {
        self.record_error(error);
        let (chat, attributes) = Self::open_hop(&hop);
        self.chat = chat;
        self.attributes = attributes;
    }

    fn open_hop(hop: &Hop<'_>) -> (Span, Arc<HopAttributes>) {
        let (kind, request) = (hop.kind, hop.request);
        let model = request.model_or(hop.default_model);
        let provider = hop.provider;
        // TRACE: see the module docs. The fields are evaluated only when a
        // layer takes the span.
        let chat = tracing::trace_span!(
            "chat",
            otel.name = %format_args!("chat {model}"),
            otel.kind = "client",
            otel.status_code = Empty,
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = kind,
            gen_ai.request.model = model,
            gen_ai.request.max_tokens = Empty,
            gen_ai.request.temperature = Empty,
            gen_ai.response.model = Empty,
            gen_ai.response.id = Empty,
            gen_ai.response.finish_reasons = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            error.type = Empty,
            gateway.provider = provider,
        );
        if !chat.is_disabled() {
            if let Some(n) = request.max_tokens {
                chat.record("gen_ai.request.max_tokens", i64::from(n));
            }
            if let Some(t) = request.temperature {
                chat.record("gen_ai.request.temperature", f64::from(t));
            }
        }
        (chat, hop.labels.attributes(provider, kind, model))
    }

    /// Opens the span of attempt `n` (1-based) under the chat span.
    pub fn attempt_span(&self, n: u32) -> Span {
        let span = tracing::trace_span!(
            parent: &self.chat,
            "attempt",
            otel.name = %format_args!("attempt {n}"),
            otel.kind = "client",
            otel.status_code = Empty,
            gateway.attempt = i64::from(n),
            gateway.member = Empty,
            http.request.resend_count = Empty,
            http.response.status_code = Empty,
            server.address = Empty,
            error.type = Empty,
            gateway.retry.class = Empty,
            gateway.retry.decision = Empty,
            gateway.retry.backoff_ms = Empty,
            gateway.retry.retry_after_ms = Empty,
        );
        if n > 1 {
            span.record("http.request.resend_count", i64::from(n - 1));
        }
        span
    }

    /// Records a finished attempt: how long the upstream took, and for a
    /// failure its class and what the registry decided.
    pub fn attempt_done(
        &mut self,
        span: &Span,
        took: Duration,
        failure: Option<(&ProviderError, Decision)>,
    ) {
        self.waited += took;
        let Some((error, decision)) = failure else {
            return;
        };
        span.record("otel.status_code", "ERROR");
        span.record("error.type", error.class.as_str());
        span.record("gateway.retry.class", error.class.as_str());
        if let Some(status) = error.http_status {
            span.record("http.response.status_code", i64::from(status));
        }
        if let Some(after) = error.retry_after {
            span.record("gateway.retry.retry_after_ms", after.as_millis() as i64);
        }
        match decision {
            Decision::Retry { wait } => {
                span.record("gateway.retry.decision", "retry");
                span.record("gateway.retry.backoff_ms", wait.as_millis() as i64);
                self.metrics.retries.add(
                    1,
                    &[
                        KeyValue::new("gateway.retry.class", error.class.as_str()),
                        self.attributes.provider[0].clone(),
                    ],
                );
            }
            Decision::GiveUp(reason) => {
                span.record("gateway.retry.decision", reason.as_str());
                if reason == crate::retry::GiveUp::BudgetExhausted {
                    self.metrics
                        .budget_refusals
                        .add(1, &self.attributes.provider);
                }
            }
        }
    }

    /// Counts a hedge or continuation the retry budget refused.
    pub fn budget_refused(&self) {
        self.metrics
            .budget_refusals
            .add(1, &self.attributes.provider);
    }

    /// Records a backoff's real duration (not the request's own work).
    pub fn waited(&mut self, took: Duration) {
        self.waited += took;
    }

    /// Records the time to the first content chunk of a stream.
    pub fn first_chunk(&self) {
        self.metrics
            .time_to_first_chunk
            .record(self.started.elapsed().as_secs_f64(), &self.attributes.call);
    }

    /// A stream committed: its gateway overhead is known now (the rest of
    /// the stream is the upstream's time).
    pub fn committed(&mut self) {
        self.record_overhead();
    }

    fn record_overhead(&mut self) {
        if self.overhead_recorded {
            return;
        }
        self.overhead_recorded = true;
        let overhead = self
            .started
            .elapsed()
            .saturating_sub(self.waited)
            .as_secs_f64();
        match self.bound() {
            Some(bound) => bound.overhead.record(overhead),
            None => self
                .metrics
                .overhead
                .record(overhead, &self.attributes.provider),
        }
    }

    /// The instruments bound to this hop's attributes, when they are bound
    /// to this call's metrics (the first metrics a hop records to).
    fn bound(&self) -> Option<&BoundInstruments> {
        let bound = self
            .attributes
            .bound
            .get_or_init(|| BoundInstruments::new(&self.metrics, &self.attributes));
        std::ptr::eq(bound.metrics.as_ptr(), Arc::as_ptr(&self.metrics)).then_some(bound)
    }

    /// Records a successful answer on the chat span and in the metrics.
    pub fn succeeded(
        &mut self,
        model: &str,
        id: &str,
        stop: StopReason,
        usage: Usage,
        attempts: u32,
    ) {
        if !self.chat.is_disabled() {
            if !model.is_empty() {
                self.chat.record("gen_ai.response.model", model);
            }
            if !id.is_empty() {
                self.chat.record("gen_ai.response.id", id);
            }
            self.chat
                .record("gen_ai.response.finish_reasons", finish_reason(stop));
            self.chat
                .record("gen_ai.usage.input_tokens", i64::from(usage.input_tokens));
            self.chat
                .record("gen_ai.usage.output_tokens", i64::from(usage.output_tokens));
        }
        if let Some(bound) = self.bound() {
            bound.input_tokens.record(u64::from(usage.input_tokens));
            bound.output_tokens.record(u64::from(usage.output_tokens));
        } else {
            let tokens = &self.metrics.token_usage;
            tokens.record(u64::from(usage.input_tokens), &self.attributes.input_tokens);
            tokens.record(
                u64::from(usage.output_tokens),
                &self.attributes.output_tokens,
            );
        }
        self.finish(None, attempts);
    }

    /// Records a failed call.
    pub fn failed(&mut self, error: &GatewayError) {
        let (kind, attempts) = self.record_error(error);
        self.finish(Some(kind), attempts);
    }

    fn record_error(&self, error: &GatewayError) -> (&'static str, u32) {
        let (kind, attempts) = match error {
            GatewayError::Upstream {
                error, attempts, ..
            }
            | GatewayError::RetryAfterTooLong {
                error, attempts, ..
            } => (error.class.as_str(), *attempts),
            GatewayError::DeadlineExceeded { attempts, .. } => ("deadline_exceeded", *attempts),
            GatewayError::BreakerOpen { attempts, .. } => ("breaker_open", *attempts),
            GatewayError::InvalidArgument(_) | GatewayError::UnknownProvider(_) => {
                ("invalid_request", 0)
            }
        };
        self.chat.record("otel.status_code", "ERROR");
        self.chat.record("error.type", kind);
        (kind, attempts)
    }

    fn finish(&mut self, error: Option<&'static str>, attempts: u32) {
        self.record_overhead();
        let took = self.started.elapsed().as_secs_f64();
        let bound = self.bound();
        match (error, bound) {
            (None, Some(bound)) => bound.duration.record(took),
            (None, None) => self
                .metrics
                .operation_duration
                .record(took, &self.attributes.call),
            (Some(kind), _) => {
                let mut attrs = self.attributes.call.clone();
                attrs.push(KeyValue::new("error.type", kind));
                self.metrics.operation_duration.record(took, &attrs);
            }
        }
        match bound {
            Some(bound) => bound.attempts.record(u64::from(attempts)),
            None => self
                .metrics
                .attempts
                .record(u64::from(attempts), &self.attributes.provider),
        }
    }
}
