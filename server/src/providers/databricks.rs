//! Databricks Model Serving: `POST {base_url}/serving-endpoints/{model}/invocations`
//! with a Bearer token and OpenAI chat-completions shapes, the endpoint
//! name in the path instead of a `model` field.

use super::openai::{Endpoint, OpenAiProvider};
use crate::config::{ConfigError, EnvSource, HttpProviderConfig};

/// The serving endpoint used when neither the request nor the config names
/// one.
pub const DEFAULT_MODEL: &str = "databricks-claude-sonnet-4";

/// Long generations are common on Model Serving: the default per-try timeout
/// of a databricks provider, unless its `[providers.X.retry]` sets one.
pub const DEFAULT_PER_TRY_TIMEOUT_MS: u64 = 300_000;

/// Builds a databricks provider (the token from `api_key_env`, by default
/// `DATABRICKS_TOKEN`).
pub fn provider(
    name: &str,
    config: &HttpProviderConfig,
    env: &dyn EnvSource,
) -> Result<OpenAiProvider, ConfigError> {
    let base = config.base_url.as_deref().ok_or_else(|| {
        ConfigError(format!(
            "config key `providers.{name}.base_url`: required for a databricks provider"
        ))
    })?;
    let base = super::http::base_url(name, base)?;
    let key_env = config.api_key_env.as_deref().unwrap_or("DATABRICKS_TOKEN");
    OpenAiProvider::with_endpoint(
        "databricks",
        Endpoint::Invocations(base),
        name,
        config,
        Some(key_env),
        DEFAULT_MODEL,
        env,
    )
}
