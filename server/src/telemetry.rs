//! Telemetry: logs, OpenTelemetry traces and metrics.
//!
//! - Traces go through `tracing` and `tracing-opentelemetry` to an OTLP
//!   collector (gRPC or HTTP) through a batch processor with a bounded
//!   queue, so a collector that is down never slows a request. Nothing
//!   configured means no exporter and no error.
//! - Metrics are OpenTelemetry instruments ([`GatewayMetrics`]), exported
//!   over OTLP when a collector is configured and always readable as
//!   Prometheus text ([`Telemetry::prometheus_text`], served on the admin
//!   port at `/metrics`).
//! - Logs are human-readable, or JSON; a log line inside a request carries
//!   the request's trace id (a field of the server span).
//!
//! Configuration is the standard `OTEL_*` variables, read through
//! [`EnvSource`], over `[telemetry]` in the config file.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{ManualReader, Pipeline, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanExporter,
};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;

use crate::config::{ConfigError, EnvSource, TelemetryConfig};

/// The instrumentation scope of every span and metric.
pub const SCOPE: &str = "provider-gateway";

/// The gateway's metric instruments.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    /// `gen_ai.client.operation.duration` (s).
    pub operation_duration: Histogram<f64>,
    /// `gen_ai.client.token.usage` (tokens, by `gen_ai.token.type`).
    pub token_usage: Histogram<u64>,
    /// `gen_ai.client.operation.time_to_first_chunk` (s, streams).
    pub time_to_first_chunk: Histogram<f64>,
    /// `gateway.request.attempts`: upstream attempts per request.
    pub attempts: Histogram<u64>,
    /// `gateway.retries`: retries by class and provider.
    pub retries: Counter<u64>,
    /// `gateway.retry_budget.refusals`: retries the budget refused.
    pub budget_refusals: Counter<u64>,
    /// `gateway.breaker.transitions`: circuit-breaker state changes.
    pub breaker_transitions: Counter<u64>,
    /// `gateway.pool.member.events`: per pool member (its host and key
    /// variable, a configured and so bounded set), `served`, `cooled`
    /// (429 or overload) and `dead` (its key refused).
    pub pool_member_events: Counter<u64>,
    /// `gateway.overhead` (s): request time not spent waiting on an
    /// upstream or a backoff.
    pub overhead: Histogram<f64>,
}

impl GatewayMetrics {
    /// The instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let seconds = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            20.0, 40.0, 80.0,
        ];
        Self {
            operation_duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_description("Duration of GenAI operations, retries included")
                .with_boundaries(seconds.clone())
                .build(),
            token_usage: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Input and output tokens used")
                .with_boundaries(vec![
                    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
                ])
                .build(),
            time_to_first_chunk: meter
                .f64_histogram("gen_ai.client.operation.time_to_first_chunk")
                .with_unit("s")
                .with_description("Time until the first content chunk of a stream")
                .with_boundaries(seconds.clone())
                .build(),
            attempts: meter
                .u64_histogram("gateway.request.attempts")
                .with_unit("{attempt}")
                .with_description("Upstream attempts made per request")
                .with_boundaries(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0])
                .build(),
            retries: meter
                .u64_counter("gateway.retries")
                .with_description("Retries, by failure class and provider")
                .build(),
            budget_refusals: meter
                .u64_counter("gateway.retry_budget.refusals")
                .with_description("Retries refused because the provider's retry budget was spent")
                .build(),
            breaker_transitions: meter
                .u64_counter("gateway.breaker.transitions")
                .with_description("Circuit-breaker state changes")
                .build(),
            pool_member_events: meter
                .u64_counter("gateway.pool.member.events")
                .with_description("Pool members' answers served, cooldowns and dead keys")
                .build(),
            overhead: meter
                .f64_histogram("gateway.overhead")
                .with_unit("s")
                .with_description("Request time not spent waiting on an upstream or a backoff")
                .with_boundaries(vec![
                    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                    0.01, 0.05,
                ])
                .build(),
        }
    }

    /// Instruments that record nothing (no meter provider).
    pub fn noop() -> Self {
        Self::new(&opentelemetry::global::meter_provider().meter(SCOPE))
    }
}

/// A manual metric reader shared between the meter provider and `/metrics`.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: opentelemetry_sdk::metrics::InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// Where finished spans go.
pub enum SpanSink {
    /// Nowhere (no exporter configured).
    None,
    /// The OTLP exporter from the configuration.
    Otlp,
    /// A given exporter (tests pass an in-memory one), each span exported
    /// as it ends.
    Exporter(Box<dyn SpanExporterBox>),
}

/// The resolved telemetry settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// OTLP endpoint; `None` = no export.
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`.
    pub protocol: String,
    /// `service.name`.
    pub service_name: String,
    /// The sampler.
    pub sampler: String,
    /// The sampler's argument.
    pub sampler_arg: Option<f64>,
    /// Resource attributes.
    pub resource_attributes: Vec<(String, String)>,
    /// JSON logs.
    pub json_logs: bool,
    /// The span export queue's bound.
    pub max_queue_size: usize,
}

impl Settings {
    /// `[telemetry]` with the `OTEL_*` variables of `env` over it.
    pub fn resolve(config: &TelemetryConfig, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let var = |k: &str| env.get(k).filter(|v| !v.trim().is_empty());
        let protocol = var("OTEL_EXPORTER_OTLP_PROTOCOL")
            .or_else(|| config.otlp_protocol.clone())
            .unwrap_or_else(|| "grpc".into());
        if protocol != "grpc" && protocol != "http/protobuf" {
            return Err(ConfigError(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL (or telemetry.otlp_protocol): `{protocol}` is not `grpc` or `http/protobuf`"
            )));
        }
        let sampler = var("OTEL_TRACES_SAMPLER")
            .or_else(|| config.sampler.clone())
            .unwrap_or_else(|| "parentbased_always_on".into());
        let sampler_arg = match var("OTEL_TRACES_SAMPLER_ARG") {
            Some(v) => Some(v.trim().parse::<f64>().map_err(|_| {
                ConfigError(format!("OTEL_TRACES_SAMPLER_ARG: `{v}` is not a number"))
            })?),
            None => config.sampler_arg,
        };
        let mut resource_attributes: Vec<(String, String)> = config
            .resource_attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(attrs) = var("OTEL_RESOURCE_ATTRIBUTES") {
            for pair in attrs.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    ConfigError(format!(
                        "OTEL_RESOURCE_ATTRIBUTES: `{pair}` is not key=value"
                    ))
                })?;
                resource_attributes.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let settings = Self {
            endpoint: var("OTEL_EXPORTER_OTLP_ENDPOINT").or_else(|| config.otlp_endpoint.clone()),
            protocol,
            service_name: var("OTEL_SERVICE_NAME")
                .or_else(|| config.service_name.clone())
                .unwrap_or_else(|| "provider-gateway".into()),
            sampler,
            sampler_arg,
            resource_attributes,
            json_logs: config.log_format == "json",
            max_queue_size: config.max_queue_size.max(1),
        };
        settings.sampler()?;
        Ok(settings)
    }

    fn sampler(&self) -> Result<Sampler, ConfigError> {
        let ratio = self.sampler_arg.unwrap_or(1.0);
        Ok(match self.sampler.as_str() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio),
            "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
            }
            other => {
                return Err(ConfigError(format!(
                    "OTEL_TRACES_SAMPLER (or telemetry.sampler): unknown sampler `{other}`"
                )));
            }
        })
    }

    fn resource(&self) -> Resource {
        Resource::builder_empty()
            .with_service_name(self.service_name.clone())
            .with_attributes(
                self.resource_attributes
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .build()
    }
}

/// The process's telemetry pipelines.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: SdkMeterProvider,
    reader: SharedReader,
    metrics: Arc<GatewayMetrics>,
    settings: Settings,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("settings", &self.settings)
            .finish()
    }
}

fn otlp_error(e: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("OTLP exporter: {e}"))
}

impl Telemetry {
    /// Builds the pipelines. With `SpanSink::Otlp` and no endpoint, spans
    /// are not exported; metrics are always readable at `/metrics`. Must run
    /// inside a tokio runtime (the gRPC exporter needs one).
    pub fn new(settings: Settings, sink: SpanSink) -> Result<Self, ConfigError> {
        crate::tls::install_crypto_provider();
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let resource = settings.resource();
        let tracer_builder = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_sampler(settings.sampler()?);
        let batch = |exporter: Box<dyn SpanExporterBox>| {
            exporter.into_processor(
                BatchConfigBuilder::default()
                    .with_max_queue_size(settings.max_queue_size)
                    .build(),
            )
        };
        let tracer_provider = match (sink, &settings.endpoint) {
            (SpanSink::None, _) | (SpanSink::Otlp, None) => None,
            (SpanSink::Exporter(exporter), _) => Some(exporter.into_simple(tracer_builder).build()),
            (SpanSink::Otlp, Some(endpoint)) => {
                let exporter: Box<dyn SpanExporterBox> = if settings.protocol == "grpc" {
                    Box::new(
                        opentelemetry_otlp::SpanExporter::builder()
                            .with_tonic()
                            .with_endpoint(endpoint.clone())
                            .with_timeout(Duration::from_secs(5))
                            .build()
                            .map_err(otlp_error)?,
                    )
                } else {
                    Box::new(
                        opentelemetry_otlp::SpanExporter::builder()
                            .with_http()
                            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                            .with_timeout(Duration::from_secs(5))
                            .build()
                            .map_err(otlp_error)?,
                    )
                };
                Some(tracer_builder.with_span_processor(batch(exporter)).build())
            }
        };

        let reader = SharedReader(Arc::new(
            ManualReader::builder()
                .with_temporality(Temporality::Cumulative)
                .build(),
        ));
        let mut meter_builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader.clone());
        if let Some(endpoint) = &settings.endpoint {
            let exporter = if settings.protocol == "grpc" {
                opentelemetry_otlp::MetricExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(otlp_error)?
            } else {
                opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_endpoint(format!("{}/v1/metrics", endpoint.trim_end_matches('/')))
                    .with_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(otlp_error)?
            };
            meter_builder = meter_builder.with_periodic_exporter(exporter);
        }
        let meter_provider = meter_builder.build();
        let metrics = Arc::new(GatewayMetrics::new(&meter_provider.meter(SCOPE)));
        Ok(Self {
            tracer_provider,
            meter_provider,
            reader,
            metrics,
            settings,
        })
    }

    /// The metric instruments.
    pub fn metrics(&self) -> Arc<GatewayMetrics> {
        self.metrics.clone()
    }

    /// The `tracing` subscriber: an env filter (`RUST_LOG`, default `info`),
    /// text or JSON logs on stderr, and the OpenTelemetry layer.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        self.subscriber_with_writer(std::io::stderr, ansi)
    }

    /// The subscriber, with logs written to `writer` (tests capture them).
    pub fn subscriber_with_writer<W>(
        &self,
        writer: W,
        ansi: bool,
    ) -> impl tracing::Subscriber + Send + Sync + 'static
    where
        W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Clone + Send + Sync + 'static,
    {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let (text, json) = if self.settings.json_logs {
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(writer.clone());
            (None, Some(layer))
        } else {
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(writer);
            (Some(layer), None)
        };
        // Only spans (never log events) go to OpenTelemetry; they carry
        // their own attributes.
        let otel = self.tracer_provider.as_ref().map(|p| {
            SPANS_EXPORTED.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer(SCOPE))
                .with_location(false)
                .with_threads(false)
                .with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target("provider_gateway_server", tracing::Level::TRACE),
                )
        });
        tracing_subscriber::registry()
            .with(otel)
            .with(text.with_filter(filter.clone()))
            .with(json.with_filter(filter))
    }

    /// The metrics as Prometheus text (exposition format 0.0.4).
    pub fn prometheus_text(&self) -> String {
        let mut rm = ResourceMetrics::default();
        if self.reader.collect(&mut rm).is_err() {
            return String::new();
        }
        render_prometheus(&rm)
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(&self) {
        if let Some(p) = &self.tracer_provider {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
        let _ = self.meter_provider.shutdown();
    }
}

/// A span exporter, type-erased so every kind shares one path.
pub trait SpanExporterBox: Send {
    /// Behind a batch processor with a bounded queue.
    fn into_processor(
        self: Box<Self>,
        config: opentelemetry_sdk::trace::BatchConfig,
    ) -> BatchSpanProcessor;
    /// Behind a simple processor (export as each span ends).
    fn into_simple(
        self: Box<Self>,
        builder: opentelemetry_sdk::trace::TracerProviderBuilder,
    ) -> opentelemetry_sdk::trace::TracerProviderBuilder;
}

impl<E: SpanExporter + 'static> SpanExporterBox for E {
    fn into_processor(
        self: Box<Self>,
        config: opentelemetry_sdk::trace::BatchConfig,
    ) -> BatchSpanProcessor {
        BatchSpanProcessor::builder(*self)
            .with_batch_config(config)
            .build()
    }
    fn into_simple(
        self: Box<Self>,
        builder: opentelemetry_sdk::trace::TracerProviderBuilder,
    ) -> opentelemetry_sdk::trace::TracerProviderBuilder {
        builder.with_simple_exporter(*self)
    }
}

fn prometheus_name(name: &str, unit: &str) -> String {
    let mut n: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if unit == "s" && !n.ends_with("_seconds") {
        n.push_str("_seconds");
    }
    n
}

fn labels<'a>(attrs: impl Iterator<Item = &'a KeyValue>, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = attrs
        .map(|kv| {
            let key: String = kv
                .key
                .as_str()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let value = kv
                .value
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{key}=\"{value}\"")
        })
        .collect();
    // Attribute sets have no order; sort for a stable exposition.
    parts.sort();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn render_prometheus(rm: &ResourceMetrics) -> String {
    let mut out = String::new();
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            let name = prometheus_name(metric.name(), metric.unit());
            let help = metric.description();
            match metric.data() {
                AggregatedMetrics::F64(d) => render_any(&mut out, &name, help, d),
                AggregatedMetrics::U64(d) => render_any(&mut out, &name, help, d),
                AggregatedMetrics::I64(d) => render_any(&mut out, &name, help, d),
            }
        }
    }
    out
}

fn render_any<T: Copy + std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    data: &MetricData<T>,
) {
    match data {
        MetricData::Sum(sum) => {
            let kind = if sum.is_monotonic() {
                "counter"
            } else {
                "gauge"
            };
            let name = if sum.is_monotonic() {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for p in sum.data_points() {
                let _ = writeln!(out, "{name}{} {}", labels(p.attributes(), None), p.value());
            }
        }
        MetricData::Gauge(gauge) => {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for p in gauge.data_points() {
                let _ = writeln!(out, "{name}{} {}", labels(p.attributes(), None), p.value());
            }
        }
        MetricData::Histogram(hist) => {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for p in hist.data_points() {
                let mut cumulative = 0u64;
                let bounds: Vec<f64> = p.bounds().collect();
                for (i, count) in p.bucket_counts().enumerate() {
                    cumulative += count;
                    let le = bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {cumulative}",
                        labels(p.attributes(), Some(("le", le)))
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_sum{} {}",
                    labels(p.attributes(), None),
                    p.sum()
                );
                let _ = writeln!(
                    out,
                    "{name}_count{} {}",
                    labels(p.attributes(), None),
                    p.count()
                );
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

/// Reads W3C trace context from gRPC metadata.
pub struct MetadataExtractor<'a>(pub &'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The parent context a request's metadata carries (empty when none).
pub fn extract_parent(metadata: &tonic::metadata::MetadataMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)))
}

/// Set once a subscriber with the OpenTelemetry layer has been built in
/// this process (and never unset).
static SPANS_EXPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans may be exported: `false` only when no subscriber of this
/// process has the OpenTelemetry layer. Then a span's OpenTelemetry
/// attributes (`otel.*`, the trace context, what is recorded at its end)
/// reach no one, and the request path skips them; the log lines keep the
/// span and the fields they show.
pub(crate) fn spans_exported() -> bool {
    SPANS_EXPORTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Writes W3C trace context into HTTP headers.
pub struct HeaderInjector<'a>(pub &'a mut reqwest::header::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The `traceparent` (and `tracestate`) of the current span, as headers
/// for an upstream request.
pub fn trace_headers() -> reqwest::header::HeaderMap {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut headers = reqwest::header::HeaderMap::new();
    if !spans_exported() {
        // No OpenTelemetry layer: no span has a context to send.
        return headers;
    }
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(&mut headers))
    });
    headers
}

/// Installs the process-wide subscriber and returns the pipelines; main
/// calls this once.
pub fn init(config: &TelemetryConfig, env: &dyn EnvSource) -> Result<Telemetry, ConfigError> {
    let telemetry = Telemetry::new(Settings::resolve(config, env)?, SpanSink::Otlp)?;
    tracing::subscriber::set_global_default(telemetry.subscriber())
        .map_err(|e| ConfigError(format!("cannot install the log subscriber: {e}")))?;
    Ok(telemetry)
}
