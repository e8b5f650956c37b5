//! What one caller may not do to everyone else (issue 11, items 8, 9 and
//! 11): hedge below the operator's floor, hedge at all when the operator
//! turned per-request hedging off, create unbounded metric series with
//! made-up model names, or list the providers of a draining gateway.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::trace::InMemorySpanExporter;
use provider_gateway::v1::provider_gateway_server::ProviderGateway;
use provider_gateway_client::{RawClient, request, v1};
use provider_gateway_server::admission::Gate;
use provider_gateway_server::config::TelemetryConfig;
use provider_gateway_server::service::GatewayService;
use provider_gateway_server::telemetry::{Settings, SpanSink, Telemetry};
use provider_gateway_server::{Config, Registry};
use tonic::Code;

use crate::resilience::anthropic_ok;
use crate::support::{ENV, Gateway, Upstream, provider_config};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One Complete with `x-hedge-after-ms: <hedge>` against an upstream whose
/// first answer takes `first`; returns the upstream requests it made.
async fn hedged_requests(limits: &str, hedge: &str, first: Duration) -> usize {
    let upstream = Upstream::start(vec![
        anthropic_ok("slow").delay(first),
        anthropic_ok("hedge"),
    ])
    .await;
    let toml = format!(
        "{}\n[retry.limits]\n{limits}\n",
        provider_config("anthropic", &upstream.url(), "")
    );
    let gw = Gateway::start(&toml, ENV).await;
    let mut raw = RawClient::connect(gw.url()).await.unwrap();
    let mut req = tonic::Request::new(request::user("hi"));
    req.metadata_mut()
        .insert("x-hedge-after-ms", hedge.parse().unwrap());
    raw.complete(req).await.unwrap();
    upstream.request_count()
}

/// Issue 11, item 8: `x-hedge-after-ms` is clamped to the operator's
/// floor, so no caller can hedge every request and drain the budget.
///
/// Each side has seconds to spare on a loaded machine: the hedge at 50 ms
/// beats an answer that takes 1 s (the hedge answers at once, so the call
/// does not wait for it), and an answer in 250 ms beats a floor of 5 s.
#[tokio::test]
async fn a_request_cannot_hedge_below_the_operators_floor() {
    assert_eq!(
        hedged_requests("", "20", ms(1_000)).await,
        2,
        "with the default floor of 50 ms a 20 ms hedge is sent"
    );
    assert_eq!(
        hedged_requests("min_hedge_after_ms = 5000", "20", ms(250)).await,
        1,
        "a 20 ms hedge waits for the 5000 ms floor, by which time the answer came"
    );
}

/// Issue 11, item 8: with `request_hedging = false` a request cannot turn
/// hedging on.
#[tokio::test]
async fn an_operator_can_turn_per_request_hedging_off() {
    assert_eq!(
        hedged_requests("request_hedging = false", "60", ms(250)).await,
        1
    );
}

/// Issue 11, item 9: the model label of the metrics is bounded whatever
/// model names callers send.
#[tokio::test]
async fn made_up_model_names_do_not_create_unbounded_metric_series() {
    let telemetry = Arc::new(
        Telemetry::new(
            Settings::resolve(&TelemetryConfig::default(), &HashMap::new()).unwrap(),
            SpanSink::None,
        )
        .unwrap(),
    );
    let config =
        Config::from_toml("[providers.m]\nkind = \"mock\"\nmodel = \"mock-main\"\n").unwrap();
    let registry = Registry::from_config(&config, &HashMap::new())
        .unwrap()
        .with_metrics(telemetry.metrics());
    let gw = Gateway::start_registry(registry).await;
    let mut raw = RawClient::connect(gw.url()).await.unwrap();
    for i in 0..60 {
        let mut req = request::user("x");
        req.model = format!("made-up-{i}");
        raw.complete(req).await.unwrap();
    }
    raw.complete(request::user("x")).await.unwrap();
    let text = telemetry.prometheus_text();
    let models: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("gen_ai_client_operation_duration_seconds_count"))
        .filter_map(|l| l.split("gen_ai_request_model=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(models.contains("mock-main"), "{models:?}");
    assert!(models.contains("other"), "{models:?}");
    assert!(
        models.len() <= 32 + 2,
        "{} model labels: {models:?}",
        models.len()
    );
}

/// Issue 11, item 11: `ListProviders` is admitted like any call (refused
/// while the gateway drains) and has a server span of its own.
#[tokio::test]
async fn list_providers_is_admitted_and_traced() {
    let exporter = InMemorySpanExporter::default();
    let telemetry = Arc::new(
        Telemetry::new(
            Settings::resolve(&TelemetryConfig::default(), &HashMap::new()).unwrap(),
            SpanSink::Exporter(Box::new(exporter.clone())),
        )
        .unwrap(),
    );
    let guard = tracing::subscriber::set_default(
        telemetry.subscriber_with_writer(std::io::sink as fn() -> std::io::Sink, false),
    );
    let registry = Registry::from_config(&Config::from_toml("").unwrap(), &HashMap::new()).unwrap();
    let gate = Arc::new(Gate::new(8, 8));
    let service = GatewayService::new(Arc::new(registry), gate.clone());
    let listed = service
        .list_providers(tonic::Request::new(v1::ListProvidersRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.default_provider, "mock");
    gate.start_draining();
    let refused = service
        .list_providers(tonic::Request::new(v1::ListProvidersRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    drop(guard);
    // Spans are exported in batches: wait for both.
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = exporter.get_finished_spans().unwrap();
        if spans
            .iter()
            .filter(|s| s.span_kind == SpanKind::Server)
            .count()
            >= 2
        {
            break;
        }
        tokio::time::sleep(ms(10)).await;
    }
    let names: Vec<&str> = spans
        .iter()
        .filter(|s| s.span_kind == SpanKind::Server)
        .map(|s| s.name.as_ref())
        .collect();
    assert_eq!(
        names,
        [
            "provider_gateway.v1.ProviderGateway/ListProviders",
            "provider_gateway.v1.ProviderGateway/ListProviders"
        ],
        "{spans:?}"
    );
}
