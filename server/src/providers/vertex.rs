//! Vertex AI (`kind = "vertex"`): Gemini models at
//! `POST {base_url}/v1/projects/{project}/locations/{region}/publishers/google/models/{model}:generateContent`
//! (translation in [`super::gemini`]), authorized by an OAuth2 access token
//! the gateway mints from a service-account JSON key: a JWT signed with the
//! key (RS256, `ring`), exchanged at the token endpoint (the JWT bearer
//! grant, RFC 7523), cached and minted again five minutes before it
//! expires.
//!
//! The key, the signed JWT and the minted token never reach a log, a span
//! or an error: the token lives in an [`ApiKey`] (its `Debug` redacted, its
//! header marked sensitive) and is redacted from upstream error text.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde_json::{Value, json};

use super::ApiKey;
use super::gemini::{GeminiProvider, GoogleAuth};
use super::http::{self, Classified};
use crate::config::{ConfigError, EnvSource, HttpProviderConfig};
use crate::error::{ErrorClass, ProviderError};

/// Google's OAuth2 token endpoint (the JWT's audience).
pub const DEFAULT_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// The variable naming a key file when the section names no credentials.
pub const DEFAULT_CREDENTIALS_ENV: &str = "GOOGLE_APPLICATION_CREDENTIALS";
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const GRANT_TYPE: &str = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer";
/// A token is minted again when less than this is left of it.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// The lifetime asked for (Google's maximum).
const JWT_LIFETIME_SECS: u64 = 3600;
/// The largest token response read.
const MAX_TOKEN_BODY: usize = 64 * 1024;

/// Builds a `vertex` provider; start-up fails naming the key or variable
/// when the project, region or service-account key is missing or unusable.
pub fn provider(
    name: &str,
    config: &HttpProviderConfig,
    env: &dyn EnvSource,
) -> Result<GeminiProvider, ConfigError> {
    let key = |k: &str| format!("config key `providers.{name}.{k}`");
    let project = config.project.as_deref().ok_or_else(|| {
        ConfigError(format!(
            "{}: required for a vertex provider",
            key("project")
        ))
    })?;
    let region = config
        .region
        .as_deref()
        .ok_or_else(|| ConfigError(format!("{}: required for a vertex provider", key("region"))))?;
    let base = match &config.base_url {
        Some(url) => url.clone(),
        None if region == "global" => "https://aiplatform.googleapis.com".to_string(),
        None => format!("https://{region}-aiplatform.googleapis.com"),
    };
    let base = http::base_url(name, &base)?;
    let models = http::endpoint(
        &base,
        &[
            "v1",
            "projects",
            project,
            "locations",
            region,
            "publishers",
            "google",
            "models",
        ],
    );
    let token_url = config.token_url.as_deref().unwrap_or(DEFAULT_TOKEN_URL);
    let token_url = reqwest::Url::parse(token_url).map_err(|e| {
        ConfigError(format!(
            "{}: `{token_url}` is not a URL: {e}",
            key("token_url")
        ))
    })?;
    let account = ServiceAccount::parse(name, &service_account_json(name, config, env)?)?;
    let source = TokenSource {
        client: http::client(name, config)?,
        token_url,
        account,
        rng: SystemRandom::new(),
        cached: Mutex::new(None),
        minting: tokio::sync::Mutex::new(()),
    };
    GeminiProvider::with_models_url(
        "vertex",
        models,
        GoogleAuth::ServiceAccount(Arc::new(source)),
        name,
        config,
    )
}

/// The key's JSON text: from `credentials_env` (a variable holding it),
/// `credentials_file`, or the file `GOOGLE_APPLICATION_CREDENTIALS` names.
/// Errors name the source, never its content.
fn service_account_json(
    name: &str,
    config: &HttpProviderConfig,
    env: &dyn EnvSource,
) -> Result<String, ConfigError> {
    let read = |path: &str, source: &str| {
        std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "provider `{name}`: {source}: cannot read {path}: {e}"
            ))
        })
    };
    if let Some(var) = &config.credentials_env {
        return env
            .get(var)
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| {
                ConfigError(format!(
                    "provider `{name}`: environment variable {var} (its credentials_env) is not set"
                ))
            });
    }
    if let Some(path) = &config.credentials_file {
        return read(
            path,
            &format!("config key `providers.{name}.credentials_file`"),
        );
    }
    match env
        .get(DEFAULT_CREDENTIALS_ENV)
        .filter(|v| !v.trim().is_empty())
    {
        Some(path) => read(
            path.trim(),
            &format!("the file named by {DEFAULT_CREDENTIALS_ENV}"),
        ),
        None => Err(ConfigError(format!(
            "provider `{name}`: no service-account key: set credentials_file or credentials_env, \
             or the environment variable {DEFAULT_CREDENTIALS_ENV} (not set)"
        ))),
    }
}

/// What the gateway keeps of a service-account key.
struct ServiceAccount {
    client_email: String,
    key_id: Option<String>,
    key: RsaKeyPair,
}

impl ServiceAccount {
    fn parse(name: &str, text: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| {
            ConfigError(format!(
                "provider `{name}`: the service-account key is not usable: {why}"
            ))
        };
        let v: Value = serde_json::from_str(text).map_err(|_| bad("not JSON"))?;
        match v["type"].as_str() {
            Some("service_account") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "its type is `{other}`; only `service_account` keys are supported"
                )));
            }
            None => return Err(bad("no `type`")),
        }
        let client_email = v["client_email"]
            .as_str()
            .filter(|e| !e.is_empty())
            .ok_or_else(|| bad("no `client_email`"))?
            .to_string();
        let pem = v["private_key"]
            .as_str()
            .ok_or_else(|| bad("no `private_key`"))?;
        let der = pkcs8_der(pem).ok_or_else(|| bad("`private_key` is not a PEM PKCS#8 key"))?;
        let key = RsaKeyPair::from_pkcs8(&der)
            .map_err(|_| bad("`private_key` is not an RSA key ring can use (2048 bits or more)"))?;
        Ok(Self {
            client_email,
            key_id: v["private_key_id"].as_str().map(str::to_string),
            key,
        })
    }
}

/// The DER inside a `-----BEGIN PRIVATE KEY-----` PEM block.
fn pkcs8_der(pem: &str) -> Option<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
    const END: &str = "-----END PRIVATE KEY-----";
    let start = pem.find(BEGIN)? + BEGIN.len();
    let end = start + pem[start..].find(END)?;
    let b64: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    STANDARD.decode(b64).ok()
}

/// A minted access token and when to mint the next.
struct Minted {
    token: ApiKey,
    refresh_at: Instant,
    expires_at: Instant,
}

/// Mints and caches the access tokens of one service account. Concurrent
/// callers wait for one mint instead of each making their own.
pub(crate) struct TokenSource {
    client: reqwest::Client,
    token_url: reqwest::Url,
    account: ServiceAccount,
    rng: SystemRandom,
    cached: Mutex<Option<Minted>>,
    minting: tokio::sync::Mutex<()>,
}

impl TokenSource {
    /// A token valid for a request now: the cached one while more than five
    /// minutes are left of it, else a new one (or, when minting fails, the
    /// cached one while it has not expired).
    pub(crate) async fn token(&self) -> Result<ApiKey, ProviderError> {
        if let Some(token) = self.cached(|m| Instant::now() < m.refresh_at) {
            return Ok(token);
        }
        let _minting = self.minting.lock().await;
        if let Some(token) = self.cached(|m| Instant::now() < m.refresh_at) {
            return Ok(token);
        }
        match self.mint().await {
            Ok((token, lifetime)) => {
                let now = Instant::now();
                let expires_at = now + lifetime;
                let refresh_at = expires_at
                    .checked_sub(REFRESH_MARGIN)
                    .unwrap_or(now)
                    .max(now);
                *self.cached.lock().unwrap_or_else(PoisonError::into_inner) = Some(Minted {
                    token: token.clone(),
                    refresh_at,
                    expires_at,
                });
                Ok(token)
            }
            Err(e) => self.cached(|m| Instant::now() < m.expires_at).ok_or(e),
        }
    }

    fn cached(&self, usable: impl Fn(&Minted) -> bool) -> Option<ApiKey> {
        let cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        cached
            .as_ref()
            .filter(|m| usable(m))
            .map(|m| m.token.clone())
    }

    /// The signed JWT asking for a token.
    fn assertion(&self) -> Result<ApiKey, ProviderError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.account.key_id {
            header["kid"] = json!(kid);
        }
        let claims = json!({
            "iss": self.account.client_email,
            "scope": SCOPE,
            "aud": self.token_url.as_str(),
            "iat": now,
            "exp": now.saturating_add(JWT_LIFETIME_SECS),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.account.key.public().modulus_len()];
        self.account
            .key
            .sign(
                &RSA_PKCS1_SHA256,
                &self.rng,
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| {
                ProviderError::new(ErrorClass::Auth, "cannot sign the service-account JWT")
            })?;
        Ok(ApiKey::new(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        )))
    }

    /// One exchange at the token endpoint: the token and its lifetime.
    async fn mint(&self) -> Result<(ApiKey, Duration), ProviderError> {
        let context = |mut e: ProviderError| {
            e.message = format!("cannot mint a Vertex AI access token: {}", e.message);
            e
        };
        let assertion = self.assertion()?;
        let request = self
            .client
            .post(self.token_url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            // The JWT is base64url and dots: nothing to escape.
            .body(format!(
                "grant_type={GRANT_TYPE}&assertion={}",
                assertion.expose()
            ));
        let response =
            http::send_credential_request(request, classify_token_error, Some(&assertion))
                .await
                .map_err(context)?;
        let body = http::json_body(response, MAX_TOKEN_BODY)
            .await
            .map_err(context)?;
        let token = body["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                context(ProviderError::new(
                    ErrorClass::ServerError,
                    "the token endpoint's answer has no access_token",
                ))
            })?;
        let lifetime = Duration::from_secs(
            body["expires_in"]
                .as_u64()
                .unwrap_or(JWT_LIFETIME_SECS)
                .min(JWT_LIFETIME_SECS * 24),
        );
        Ok((ApiKey::new(token), lifetime))
    }
}

/// The token endpoint's `{"error", "error_description"}`: a rejected grant
/// (a revoked or wrong key, a clock far off) is the operator's credentials
/// failing, never retried.
fn classify_token_error(status: u16, body: &[u8]) -> Classified {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let code = v["error"].as_str().unwrap_or_default();
    let description = v["error_description"].as_str().unwrap_or_default();
    let class = match (status, code) {
        (400 | 401 | 403, _)
        | (_, "invalid_grant" | "invalid_client" | "unauthorized_client" | "access_denied") => {
            Some(ErrorClass::Auth)
        }
        _ => None,
    };
    let message = match (code, description) {
        ("", "") => String::new(),
        (code, "") => code.to_string(),
        ("", d) => d.to_string(),
        (code, d) => format!("{code}: {d}"),
    };
    Classified {
        class,
        message,
        ..Classified::default()
    }
}
