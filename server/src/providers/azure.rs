//! Azure OpenAI: `POST {base_url}/openai/deployments/{deployment}/chat/completions?api-version=V`
//! with OpenAI's chat-completions shapes (see [`super::openai`]), the
//! deployment in the path instead of a `model` field, and an `api-key`
//! header or a Microsoft Entra bearer token.
//!
//! Azure adds content-filter results to the answers: a choice whose
//! `content_filter_results` mark a category `filtered` (or whose
//! `finish_reason` is `content_filter`) stops with `CONTENT_FILTER`; a
//! prompt the filter blocks is a final 400 `content_filter` error naming the
//! filtered categories.

use super::openai::{Endpoint, KeyHeader, OpenAiProvider};
use crate::config::{ConfigError, EnvSource, HttpProviderConfig};

/// The `api-version` sent when the section sets none (the latest GA
/// version of the data-plane inference API).
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

/// The variable read for the resource key when the section names neither
/// `api_key_env` nor `entra_token_env`.
pub const DEFAULT_KEY_ENV: &str = "AZURE_OPENAI_API_KEY";

/// Builds an `azure-openai` provider: the key from `api_key_env` (sent as
/// `api-key`), or an Entra access token from `entra_token_env` (sent as a
/// Bearer token). `model` is the default deployment; a request's model names
/// another deployment of the same resource.
pub fn provider(
    name: &str,
    config: &HttpProviderConfig,
    env: &dyn EnvSource,
) -> Result<OpenAiProvider, ConfigError> {
    let base = config.base_url.as_deref().ok_or_else(|| {
        ConfigError(format!(
            "config key `providers.{name}.base_url`: required for an azure-openai provider"
        ))
    })?;
    let deployment = config.model.as_deref().ok_or_else(|| {
        ConfigError(format!(
            "config key `providers.{name}.model`: required for an azure-openai provider (the deployment name)"
        ))
    })?;
    let base = super::http::base_url(name, base)?;
    let (key_env, header) = match (&config.entra_token_env, &config.api_key_env) {
        (Some(var), _) => (var.as_str(), KeyHeader::Bearer),
        (None, Some(var)) => (var.as_str(), KeyHeader::ApiKey),
        (None, None) => (DEFAULT_KEY_ENV, KeyHeader::ApiKey),
    };
    let api_version = config
        .api_version
        .clone()
        .unwrap_or_else(|| DEFAULT_API_VERSION.into());
    let provider = OpenAiProvider::with_endpoint(
        "azure-openai",
        Endpoint::AzureDeployment { base, api_version },
        name,
        config,
        Some(key_env),
        deployment,
        env,
    )
    .map_err(|e| {
        // Say which credential source was looked for.
        if header == KeyHeader::Bearer {
            ConfigError(e.0.replace("its api_key_env", "its entra_token_env"))
        } else {
            e
        }
    })?;
    Ok(provider.with_key_header(header))
}
