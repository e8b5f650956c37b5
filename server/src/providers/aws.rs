//! AWS credentials and SigV4 signing for the bedrock provider.
//!
//! Credentials come from the first source that is configured, checked at
//! start-up in this order (a section's `profile` key picks the profile file
//! alone):
//! 1. `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`);
//! 2. `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` (EKS IRSA): the token
//!    file exchanged at STS (`AssumeRoleWithWebIdentity`);
//! 3. `AWS_CONTAINER_CREDENTIALS_FULL_URI` (EKS Pod Identity, with
//!    `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` or `_TOKEN`) or
//!    `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` (ECS);
//! 4. the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
//!    `~/.aws/credentials`), profile `AWS_PROFILE` or `default`.
//!
//! Temporary credentials (2, 3) are fetched when first needed, cached, and
//! fetched again five minutes before they expire; a failed refresh keeps
//! using the cached ones while they are valid. The STS and container
//! answers are bounded reads. Secrets live in [`ApiKey`]s, the signed
//! headers are marked sensitive, and the signer runs with tracing off (it
//! traces its canonical request, which holds the session token).

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::Value;

use super::ApiKey;
use super::http::{self, Classified};
use crate::config::{ConfigError, EnvSource, HttpProviderConfig};
use crate::error::{ErrorClass, ProviderError};

/// Temporary credentials are fetched again when less than this is left.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// The largest STS or container-endpoint answer read.
const MAX_ANSWER: usize = 64 * 1024;
/// The ECS task-role endpoint a relative URI is resolved against.
const ECS_ENDPOINT: &str = "http://169.254.170.2";

/// One set of credentials.
#[derive(Clone)]
pub(crate) struct Credentials {
    access_key_id: String,
    secret_access_key: ApiKey,
    session_token: Option<ApiKey>,
    expires: Option<SystemTime>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The secrets, to redact from upstream error text.
    pub(crate) fn secrets(&self) -> Vec<ApiKey> {
        let mut out = vec![self.secret_access_key.clone()];
        out.extend(self.session_token.clone());
        out
    }
}

enum Source {
    /// Environment variables or a profile: never refreshed.
    Static(Credentials),
    WebIdentity {
        token_file: PathBuf,
        role_arn: String,
        session_name: String,
        sts_url: Url,
    },
    Container {
        url: Url,
        token: Option<ApiKey>,
        token_file: Option<PathBuf>,
    },
}

impl Source {
    fn label(&self) -> &'static str {
        match self {
            Self::Static(_) => "static credentials",
            Self::WebIdentity { .. } => "web identity (STS AssumeRoleWithWebIdentity)",
            Self::Container { .. } => "the container credential endpoint",
        }
    }
}

/// Where a bedrock provider's credentials come from, and the cached ones.
pub(crate) struct CredentialSource {
    source: Source,
    client: reqwest::Client,
    cached: Mutex<Option<Credentials>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl CredentialSource {
    /// Picks the first configured source (see the module docs); start-up
    /// fails naming every source looked for when none is.
    pub(crate) fn from_env(
        name: &str,
        config: &HttpProviderConfig,
        region: &str,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        let var = |k: &str| {
            env.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let source = if let Some(profile) = &config.profile {
            profile_source(name, profile, env)?.ok_or_else(|| {
                ConfigError(format!(
                    "config key `providers.{name}.profile`: profile `{profile}` is not in {}",
                    credentials_file(env).map_or_else(
                        || "the shared credentials file (HOME is not set)".to_string(),
                        |p| p.display().to_string()
                    )
                ))
            })?
        } else if let (Some(id), Some(secret)) =
            (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        {
            Source::Static(Credentials {
                access_key_id: id,
                secret_access_key: ApiKey::new(secret),
                session_token: var("AWS_SESSION_TOKEN").map(ApiKey::new),
                expires: None,
            })
        } else if var("AWS_ACCESS_KEY_ID").is_some() || var("AWS_SECRET_ACCESS_KEY").is_some() {
            return Err(ConfigError(format!(
                "provider `{name}`: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, not one"
            )));
        } else if let Some(token_file) = var("AWS_WEB_IDENTITY_TOKEN_FILE") {
            let role_arn = var("AWS_ROLE_ARN").ok_or_else(|| {
                ConfigError(format!(
                    "provider `{name}`: AWS_WEB_IDENTITY_TOKEN_FILE is set but AWS_ROLE_ARN is not"
                ))
            })?;
            let sts = match &config.sts_url {
                Some(url) => url.clone(),
                None => format!("https://sts.{region}.amazonaws.com/"),
            };
            let sts_url = Url::parse(&sts).map_err(|e| {
                ConfigError(format!(
                    "config key `providers.{name}.sts_url`: `{sts}` is not a URL: {e}"
                ))
            })?;
            Source::WebIdentity {
                token_file: PathBuf::from(token_file),
                role_arn,
                session_name: var("AWS_ROLE_SESSION_NAME")
                    .unwrap_or_else(|| "provider-gateway".to_string()),
                sts_url,
            }
        } else if let Some(url) = var("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
            let parsed = Url::parse(&url).map_err(|e| {
                ConfigError(format!(
                    "provider `{name}`: AWS_CONTAINER_CREDENTIALS_FULL_URI is not a URL: {e}"
                ))
            })?;
            if !container_host_allowed(&parsed) {
                return Err(ConfigError(format!(
                    "provider `{name}`: AWS_CONTAINER_CREDENTIALS_FULL_URI must be https, or http to \
                     a loopback address or the ECS/EKS endpoints (169.254.170.2, 169.254.170.23, \
                     fd00:ec2::23)"
                )));
            }
            Source::Container {
                url: parsed,
                token: var("AWS_CONTAINER_AUTHORIZATION_TOKEN").map(ApiKey::new),
                token_file: var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from),
            }
        } else if let Some(relative) = var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            let url = Url::parse(ECS_ENDPOINT)
                .and_then(|base| base.join(&relative))
                .map_err(|e| {
                    ConfigError(format!(
                        "provider `{name}`: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI is not a path: {e}"
                    ))
                })?;
            Source::Container {
                url,
                token: None,
                token_file: None,
            }
        } else {
            let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".to_string());
            profile_source(name, &profile, env)?.ok_or_else(|| {
                ConfigError(format!(
                    "provider `{name}`: no AWS credentials: set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, or AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN, or \
                     AWS_CONTAINER_CREDENTIALS_FULL_URI, or put profile `{profile}` in the shared \
                     credentials file ({}; key `providers.{name}.profile` picks another)",
                    credentials_file(env).map_or_else(
                        || "HOME is not set".to_string(),
                        |p| p.display().to_string()
                    )
                ))
            })?
        };
        let cached = match &source {
            Source::Static(c) => Some(c.clone()),
            _ => None,
        };
        Ok(Self {
            source,
            client: http::client(name, config)?,
            cached: Mutex::new(cached),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    /// Credentials valid for a request now.
    pub(crate) async fn credentials(&self) -> Result<Credentials, ProviderError> {
        let fresh = |c: &Credentials| match c.expires {
            None => true,
            Some(at) => SystemTime::now() + REFRESH_MARGIN < at,
        };
        if let Some(c) = self.cached(fresh) {
            return Ok(c);
        }
        let _refreshing = self.refreshing.lock().await;
        if let Some(c) = self.cached(fresh) {
            return Ok(c);
        }
        let fetched = match &self.source {
            Source::Static(c) => Ok(c.clone()),
            Source::WebIdentity {
                token_file,
                role_arn,
                session_name,
                sts_url,
            } => {
                self.assume_role(token_file, role_arn, session_name, sts_url)
                    .await
            }
            Source::Container {
                url,
                token,
                token_file,
            } => {
                self.container(url, token.as_ref(), token_file.as_deref())
                    .await
            }
        };
        match fetched {
            Ok(c) => {
                *self.cached.lock().unwrap_or_else(PoisonError::into_inner) = Some(c.clone());
                Ok(c)
            }
            Err(mut e) => {
                if let Some(c) = self.cached(|c| c.expires.is_none_or(|at| SystemTime::now() < at))
                {
                    return Ok(c);
                }
                e.message = format!(
                    "cannot get AWS credentials from {}: {}",
                    self.source.label(),
                    e.message
                );
                Err(e)
            }
        }
    }

    fn cached(&self, usable: impl Fn(&Credentials) -> bool) -> Option<Credentials> {
        let cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        cached.as_ref().filter(|c| usable(c)).cloned()
    }

    async fn assume_role(
        &self,
        token_file: &std::path::Path,
        role_arn: &str,
        session_name: &str,
        sts_url: &Url,
    ) -> Result<Credentials, ProviderError> {
        // The token is rotated by the kubelet: read it at every exchange.
        let token = read_file(token_file).await.map_err(|e| {
            ProviderError::new(
                ErrorClass::Auth,
                format!(
                    "cannot read AWS_WEB_IDENTITY_TOKEN_FILE {}: {e}",
                    token_file.display()
                ),
            )
        })?;
        let token = ApiKey::new(token.trim());
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("Action", "AssumeRoleWithWebIdentity")
            .append_pair("Version", "2011-06-15")
            .append_pair("RoleArn", role_arn)
            .append_pair("RoleSessionName", session_name)
            .append_pair("WebIdentityToken", token.expose())
            .finish();
        let request = self
            .client
            .post(sts_url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form);
        let response = http::send_credential_request(request, classify_sts, Some(&token)).await?;
        let body =
            String::from_utf8_lossy(&http::body_bytes(response, MAX_ANSWER).await?).into_owned();
        let field = |tag: &str| xml_text(&body, tag);
        let missing = || {
            ProviderError::new(
                ErrorClass::ServerError,
                "the STS answer holds no credentials",
            )
        };
        Ok(Credentials {
            access_key_id: field("AccessKeyId").ok_or_else(missing)?,
            secret_access_key: ApiKey::new(field("SecretAccessKey").ok_or_else(missing)?),
            session_token: field("SessionToken").map(ApiKey::new),
            expires: Some(temporary_expiry(field("Expiration").as_deref())),
        })
    }

    async fn container(
        &self,
        url: &Url,
        token: Option<&ApiKey>,
        token_file: Option<&std::path::Path>,
    ) -> Result<Credentials, ProviderError> {
        let token = match token_file {
            Some(path) => Some(ApiKey::new(
                read_file(path)
                    .await
                    .map_err(|e| {
                        ProviderError::new(
                            ErrorClass::Auth,
                            format!(
                                "cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {}: {e}",
                                path.display()
                            ),
                        )
                    })?
                    .trim(),
            )),
            None => token.cloned(),
        };
        let mut request = self.client.get(url.clone());
        if let Some(token) = &token
            && let Ok(mut value) = HeaderValue::from_str(token.expose())
        {
            value.set_sensitive(true);
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response =
            http::send_credential_request(request, classify_container, token.as_ref()).await?;
        let body = http::json_body(response, MAX_ANSWER).await?;
        let field = |k: &str| {
            body[k]
                .as_str()
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let missing = || {
            ProviderError::new(
                ErrorClass::ServerError,
                "the container credential endpoint's answer holds no credentials",
            )
        };
        Ok(Credentials {
            access_key_id: field("AccessKeyId").ok_or_else(missing)?,
            secret_access_key: ApiKey::new(field("SecretAccessKey").ok_or_else(missing)?),
            session_token: field("Token").map(ApiKey::new),
            expires: Some(temporary_expiry(field("Expiration").as_deref())),
        })
    }
}

/// When temporary credentials (STS, a container's) expire: their
/// `Expiration`, or in 15 minutes when it is missing or unreadable, so they
/// are never kept as if they were static; and never later than 12 hours
/// from now (STS's longest session), whatever the answer says.
fn temporary_expiry(expiration: Option<&str>) -> SystemTime {
    let now = SystemTime::now();
    let latest = now + Duration::from_secs(MAX_TEMPORARY_SECS);
    expiration
        .and_then(http::rfc3339)
        .unwrap_or_else(|| now + Duration::from_secs(15 * 60))
        .min(latest)
}

/// The longest life of temporary credentials the gateway believes.
const MAX_TEMPORARY_SECS: u64 = 12 * 3600;

/// Reads a small file (a token) off the runtime's threads.
async fn read_file(path: &std::path::Path) -> std::io::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::read_to_string(path))
        .await
        .map_err(std::io::Error::other)?
}

/// The container endpoint may only be plain HTTP on loopback or the
/// documented link-local addresses: the token would otherwise cross a
/// network in the clear.
fn container_host_allowed(url: &Url) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let host = url.host_str().unwrap_or_default();
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>();
    match (url.scheme(), ip) {
        ("https", _) => true,
        ("http", Ok(ip)) => {
            ip.is_loopback()
                || ip == IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2))
                || ip == IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23))
                || ip == IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23))
        }
        ("http", Err(_)) => host == "localhost",
        _ => false,
    }
}

fn credentials_file(env: &dyn EnvSource) -> Option<PathBuf> {
    env.get("AWS_SHARED_CREDENTIALS_FILE")
        .filter(|v| !v.trim().is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env.get("HOME")
                .map(|h| PathBuf::from(h).join(".aws").join("credentials"))
        })
}

/// The profile's keys from the shared credentials file, or `None` when the
/// file or the profile is not there.
fn profile_source(
    name: &str,
    profile: &str,
    env: &dyn EnvSource,
) -> Result<Option<Source>, ConfigError> {
    let Some(path) = credentials_file(env) else {
        return Ok(None);
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let mut section: Option<&str> = None;
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(s.trim());
            continue;
        }
        if section == Some(profile)
            && let Some((k, v)) = line.split_once('=')
        {
            keys.push((k.trim(), v.trim()));
        }
    }
    if section.is_none() && keys.is_empty() {
        return Ok(None);
    }
    let get = |k: &str| {
        keys.iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.to_string())
            .filter(|v| !v.is_empty())
    };
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(id), Some(secret)) => Ok(Some(Source::Static(Credentials {
            access_key_id: id,
            secret_access_key: ApiKey::new(secret),
            session_token: get("aws_session_token").map(ApiKey::new),
            expires: None,
        }))),
        _ if keys.is_empty() => Ok(None),
        _ => Err(ConfigError(format!(
            "provider `{name}`: profile `{profile}` in {} has no aws_access_key_id and \
             aws_secret_access_key (only static keys are read from it)",
            path.display()
        ))),
    }
}

/// The text of the first `<tag>...</tag>` (STS answers are small, flat
/// XML), with the five predefined entities decoded.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    let text = xml[start..end]
        .trim()
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    (!text.is_empty()).then_some(text)
}

/// An STS error (`<Error><Code>InvalidIdentityToken</Code><Message>`): a
/// rejected token or role is the operator's credentials failing.
fn classify_sts(status: u16, body: &[u8]) -> Classified {
    let text = String::from_utf8_lossy(body);
    let code = xml_text(&text, "Code").unwrap_or_default();
    let message = xml_text(&text, "Message").unwrap_or_default();
    let class = match (status, code.as_str()) {
        (_, "Throttling") => Some(ErrorClass::RateLimited),
        (400 | 401 | 403, _) => Some(ErrorClass::Auth),
        _ => None,
    };
    Classified {
        class,
        message: format!("STS {code}: {message}"),
        ..Classified::default()
    }
}

fn classify_container(status: u16, body: &[u8]) -> Classified {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    Classified {
        class: matches!(status, 400 | 401 | 403).then_some(ErrorClass::Auth),
        message: v["message"]
            .as_str()
            .or(v["Message"].as_str())
            .unwrap_or_default()
            .to_string(),
        ..Classified::default()
    }
}

/// The SigV4 headers (`authorization`, `x-amz-date`, and
/// `x-amz-security-token` with temporary credentials) for a POST of `body`
/// with `content-type: application/json` to `url`, for `service` in
/// `region`, at `now`. Every returned value is marked sensitive.
pub(crate) fn sign(
    credentials: &Credentials,
    service: &str,
    region: &str,
    url: &Url,
    body: &[u8],
    now: SystemTime,
) -> Result<Vec<(HeaderName, HeaderValue)>, ProviderError> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let failed = |what: &str| {
        ProviderError::new(
            ErrorClass::Auth,
            format!("cannot sign the request with SigV4: {what}"),
        )
    };
    let identity: aws_smithy_runtime_api::client::identity::Identity =
        aws_credential_types::Credentials::new(
            credentials.access_key_id.clone(),
            credentials.secret_access_key.expose().to_string(),
            credentials
                .session_token
                .as_ref()
                .map(|t| t.expose().to_string()),
            credentials.expires,
            "provider-gateway",
        )
        .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|_| failed("incomplete parameters"))?
        .into();
    let headers = [("content-type", "application/json")];
    // The signer traces its canonical request (which holds the session
    // token) and its parameters: it runs with no subscriber at all.
    let signed = tracing::dispatcher::with_default(&tracing::Dispatch::none(), || {
        let request = SignableRequest::new(
            "POST",
            url.as_str(),
            headers.into_iter(),
            SignableBody::Bytes(body),
        )
        .map_err(|_| failed("the URL cannot be signed"))?;
        sign(request, &params).map_err(|_| failed("signing failed"))
    })?;
    let (instructions, _signature) = signed.into_parts();
    instructions
        .headers()
        .map(|(name, value)| {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| failed("a header"))?;
            let mut value = HeaderValue::from_str(value).map_err(|_| failed("a header"))?;
            value.set_sensitive(true);
            Ok((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_answers_and_times_parse() {
        let xml = "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
            <AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>s/e+c=</SecretAccessKey>\
            <SessionToken>tok&amp;en</SessionToken><Expiration>2030-01-02T03:04:05Z</Expiration>\
            </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>";
        assert_eq!(xml_text(xml, "SessionToken").as_deref(), Some("tok&en"));
        assert_eq!(xml_text(xml, "Nope"), None);
        let at = http::rfc3339("2030-01-02T03:04:05Z").unwrap();
        assert_eq!(
            at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_893_553_445
        );
        assert!(http::rfc3339("soon").is_none());
        // Temporary credentials without a readable expiry are not kept as
        // static ones.
        let soon = temporary_expiry(Some("soon"));
        assert!(
            soon > SystemTime::now() && soon < SystemTime::now() + Duration::from_secs(16 * 60)
        );
        // An expiry in year 9999 is not believed: refreshed within 12 h.
        let far = temporary_expiry(Some("9999-12-31T23:59:59Z"));
        assert!(far <= SystemTime::now() + Duration::from_secs(MAX_TEMPORARY_SECS));
        assert!(far > SystemTime::now() + Duration::from_secs(MAX_TEMPORARY_SECS - 60));
    }

    #[test]
    fn container_endpoints_are_loopback_link_local_or_https() {
        for (url, ok) in [
            ("http://127.0.0.1:9/creds", true),
            ("http://169.254.170.23/v1/credentials", true),
            ("http://[fd00:ec2::23]/v1/credentials", true),
            ("https://creds.example/", true),
            ("http://10.0.0.1/creds", false),
            ("http://example.com/creds", false),
        ] {
            assert_eq!(
                container_host_allowed(&Url::parse(url).unwrap()),
                ok,
                "{url}"
            );
        }
    }
}
