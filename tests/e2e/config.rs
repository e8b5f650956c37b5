//! Configuration as a user meets it: zero-config, a file with environment
//! overrides, and rejected keys.

use std::collections::HashMap;

use provider_gateway_client::{CallOptions, request, v1};
use provider_gateway_server::Config;
use serde_json::json;

use crate::support::{Gateway, KEY, Reply, Upstream};

fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pg-e2e-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn zero_config_serves_mock_and_registers_keyed_providers() {
    let vars = env(&[("ANTHROPIC_API_KEY", KEY), ("OPENAI_API_KEY", KEY)]);
    let config = Config::load(None, &vars).unwrap();
    let gw = Gateway::start_config(config, vars).await;
    let list = gw.client().await.providers().await.unwrap();
    assert_eq!(list.default_provider, "mock");
    assert_eq!(
        list.providers,
        [
            v1::ProviderInfo {
                name: "anthropic".into(),
                kind: "anthropic".into(),
                default_model: "claude-sonnet-4-5".into(),
                local_model: None,
                members: vec![],
            },
            v1::ProviderInfo {
                name: "mock".into(),
                kind: "mock".into(),
                default_model: "mock-1".into(),
                local_model: None,
                members: vec![],
            },
            v1::ProviderInfo {
                name: "openai".into(),
                kind: "openai".into(),
                default_model: "gpt-4o-mini".into(),
                local_model: None,
                members: vec![],
            },
        ]
    );
    assert!(
        !format!("{list:?}").contains(KEY),
        "ListProviders never shows a secret"
    );
}

#[tokio::test]
async fn file_with_env_overrides() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        json!({"id": "x", "model": "m", "content": [{"type": "text", "text": "from upstream"}], "stop_reason": "end_turn", "usage": {}}),
    )])
    .await;
    let path = temp_file(
        "override",
        "default_provider = \"up\"\n[providers.up]\nkind = \"anthropic\"\nbase_url = \"http://127.0.0.1:9\"\napi_key_env = \"UP_KEY\"\nmodel = \"file-model\"\n",
    );
    let vars = env(&[
        ("UP_KEY", KEY),
        ("GATEWAY_PROVIDERS__UP__BASE_URL", &upstream.url()),
        ("GATEWAY_PROVIDERS__UP__MODEL", "env-model"),
    ]);
    let config = Config::load(Some(&path), &vars).unwrap();
    let gw = Gateway::start_config(config, vars).await;
    let answer = gw
        .client()
        .await
        .complete(request::user("hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.text(), "from upstream");
    assert_eq!(upstream.requests()[0].body["model"], "env-model");
}

#[tokio::test]
async fn unknown_keys_and_missing_secrets_fail_with_their_names() {
    let path = temp_file("unknown", "[retry]\nmax_attemps = 4\n");
    let err = Config::load(Some(&path), &env(&[])).unwrap_err();
    assert!(err.to_string().contains("retry.max_attemps"), "{err}");

    let config = Config::from_toml(
        "[providers.a]\nkind = \"anthropic\"\napi_key_env = \"NOT_SET_ANYWHERE\"\n",
    )
    .unwrap();
    let err = provider_gateway_server::Registry::from_config(&config, &env(&[])).unwrap_err();
    assert!(err.to_string().contains("NOT_SET_ANYWHERE"), "{err}");
}
