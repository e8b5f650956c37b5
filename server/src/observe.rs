//! The telemetry of one call through the registry: the `chat {model}` span
//! (GenAI semantic conventions), one span per upstream attempt, and the
//! metrics recorded when the call ends. The registry decides; this module
//! only records.

use std::sync::Arc;
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

/// One call's spans, timings and metric attributes.
pub struct CallObservation {
    /// The `chat {model}` span; attempt spans are its children.
    pub chat: Span,
    metrics: Arc<GatewayMetrics>,
    attributes: Vec<KeyValue>,
    started: Instant,
    waited: Duration,
    provider: String,
    overhead_recorded: bool,
}

impl CallObservation {
    /// Opens the `chat {model}` span for a call to `provider` (of `kind`).
    pub fn start(
        metrics: Arc<GatewayMetrics>,
        provider: &str,
        kind: &'static str,
        request: &ChatRequest,
        default_model: &str,
    ) -> Self {
        let model = request.model_or(default_model).to_string();
        let chat = tracing::info_span!(
            "chat",
            otel.name = %format!("chat {model}"),
            otel.kind = "client",
            otel.status_code = Empty,
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = kind,
            gen_ai.request.model = %model,
            gen_ai.request.max_tokens = Empty,
            gen_ai.request.temperature = Empty,
            gen_ai.response.model = Empty,
            gen_ai.response.id = Empty,
            gen_ai.response.finish_reasons = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            error.type = Empty,
            gateway.provider = %provider,
        );
        if let Some(n) = request.max_tokens {
            chat.record("gen_ai.request.max_tokens", i64::from(n));
        }
        if let Some(t) = request.temperature {
            chat.record("gen_ai.request.temperature", f64::from(t));
        }
        let attributes = vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.provider.name", kind),
            KeyValue::new("gen_ai.request.model", model),
        ];
        Self {
            chat,
            metrics,
            attributes,
            started: Instant::now(),
            waited: Duration::ZERO,
            provider: provider.to_string(),
            overhead_recorded: false,
        }
    }

    /// Opens the span of attempt `n` (1-based) under the chat span.
    pub fn attempt_span(&self, n: u32) -> Span {
        let span = tracing::info_span!(
            parent: &self.chat,
            "attempt",
            otel.name = %format!("attempt {n}"),
            otel.kind = "client",
            otel.status_code = Empty,
            gateway.attempt = i64::from(n),
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
                        KeyValue::new("gateway.provider", self.provider.clone()),
                    ],
                );
            }
            Decision::GiveUp(reason) => {
                span.record("gateway.retry.decision", reason.as_str());
                if reason == crate::retry::GiveUp::BudgetExhausted {
                    self.metrics.budget_refusals.add(
                        1,
                        &[KeyValue::new("gateway.provider", self.provider.clone())],
                    );
                }
            }
        }
    }

    /// Records a backoff's real duration (not the request's own work).
    pub fn waited(&mut self, took: Duration) {
        self.waited += took;
    }

    /// Records the time to the first content chunk of a stream.
    pub fn first_chunk(&self) {
        self.metrics
            .time_to_first_chunk
            .record(self.started.elapsed().as_secs_f64(), &self.attributes);
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
        let provider = [KeyValue::new("gateway.provider", self.provider.clone())];
        self.metrics.overhead.record(
            self.started
                .elapsed()
                .saturating_sub(self.waited)
                .as_secs_f64(),
            &provider,
        );
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
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            let mut attrs = self.attributes.clone();
            attrs.push(KeyValue::new("gen_ai.token.type", kind));
            self.metrics.token_usage.record(u64::from(n), &attrs);
        }
        self.finish(None, attempts);
    }

    /// Records a failed call.
    pub fn failed(&mut self, error: &GatewayError) {
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
        self.finish(Some(kind), attempts);
    }

    fn finish(&mut self, error: Option<&'static str>, attempts: u32) {
        self.record_overhead();
        let mut attrs = self.attributes.clone();
        if let Some(kind) = error {
            attrs.push(KeyValue::new("error.type", kind));
        }
        self.metrics
            .operation_duration
            .record(self.started.elapsed().as_secs_f64(), &attrs);
        let provider = [KeyValue::new("gateway.provider", self.provider.clone())];
        self.metrics.attempts.record(u64::from(attempts), &provider);
    }
}
