//! Client authentication: callers send `authorization: Bearer <key>`; the
//! gateway keeps only SHA-256 hashes of the accepted keys and compares in
//! constant time. A key may name its client, restrict it to some providers
//! and lower its retry ceilings. Health and reflection stay open.

use std::sync::Arc;

use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::config::{AuthConfig, ConfigError, EnvSource};
use crate::retry::RetryLimits;

/// Who a request comes from, once authenticated.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientIdentity {
    /// The client's name (`key` for plain `[auth] keys`).
    pub name: String,
    /// The providers it may call; `None` = all.
    pub providers: Option<Vec<String>>,
    /// Its ceilings for retry overrides; `None` = the operator's.
    pub limits: Option<RetryLimits>,
}

/// Checks `authorization` metadata against the configured key hashes.
#[derive(Debug)]
pub struct Authenticator {
    keys: Vec<([u8; 32], Arc<ClientIdentity>)>,
}

fn decode_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The SHA-256 of `key`, as lowercase hex (what `[auth] keys` holds).
pub fn key_hash_hex(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Equal in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    /// Builds the key table; `operator` bounds every client's own limits.
    pub fn from_config(
        auth: &AuthConfig,
        operator: &RetryLimits,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        let plain = Arc::new(ClientIdentity {
            name: "key".into(),
            providers: None,
            limits: None,
        });
        let mut keys = Vec::new();
        let mut hashes: Vec<(String, String)> = auth
            .keys
            .iter()
            .map(|k| ("auth.keys".to_string(), k.clone()))
            .collect();
        if let Some(var) = &auth.keys_env {
            let value = env
                .get(var)
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| {
                    ConfigError(format!(
                        "config key `auth.keys_env`: environment variable {var} is not set"
                    ))
                })?;
            hashes.extend(
                value
                    .split(',')
                    .filter(|h| !h.trim().is_empty())
                    .map(|h| (format!("environment variable {var}"), h.to_string())),
            );
        }
        for (origin, hex) in hashes {
            let hash = decode_hash(&hex).ok_or_else(|| {
                ConfigError(format!(
                    "{origin}: expected SHA-256 hashes as 64 hex digits"
                ))
            })?;
            keys.push((hash, plain.clone()));
        }
        for (i, client) in auth.clients.iter().enumerate() {
            let hash = decode_hash(&client.key_sha256).ok_or_else(|| {
                ConfigError(format!(
                    "config key `auth.clients[{i}].key_sha256`: expected 64 hex digits"
                ))
            })?;
            let limits = match &client.limits {
                None => None,
                Some(own) => {
                    let own = RetryLimits::resolve(Some(own))?;
                    Some(RetryLimits {
                        max_attempts: own.max_attempts.min(operator.max_attempts),
                        max_backoff: own.max_backoff.min(operator.max_backoff),
                        per_try_timeout: own.per_try_timeout.min(operator.per_try_timeout),
                        min_hedge_after: own.min_hedge_after.max(operator.min_hedge_after),
                        request_hedging: own.request_hedging && operator.request_hedging,
                    })
                }
            };
            keys.push((
                hash,
                Arc::new(ClientIdentity {
                    name: client.name.clone(),
                    providers: client.providers.clone(),
                    limits,
                }),
            ));
        }
        if keys.is_empty() {
            return Err(ConfigError(
                "config key `auth`: no key configured (set keys, keys_env or clients)".into(),
            ));
        }
        Ok(Self { keys })
    }

    /// The caller's identity, or UNAUTHENTICATED. Never logs or echoes the
    /// key.
    pub fn check(&self, metadata: &MetadataMap) -> Result<Arc<ClientIdentity>, Status> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <key>`"))?;
        let key = header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Status::unauthenticated("`authorization` must be `Bearer <key>`"))?;
        self.identify(key)
            .ok_or_else(|| Status::unauthenticated("the key is not valid"))
    }

    /// The identity whose key is `key`, however the edge carried it
    /// (`authorization: Bearer`, `x-api-key`). Never logs the key.
    pub fn identify(&self, key: &str) -> Option<Arc<ClientIdentity>> {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut presented = [0u8; 32];
        presented.copy_from_slice(digest.as_ref());
        // Compare against every key so the time does not tell which matched.
        let mut found = None;
        for (hash, identity) in &self.keys {
            if constant_time_eq(hash, &presented) && found.is_none() {
                found = Some(identity.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn keys_match_by_hash_only() {
        let config = AuthConfig {
            keys: vec![key_hash_hex("right")],
            ..Default::default()
        };
        let auth =
            Authenticator::from_config(&config, &RetryLimits::default(), &HashMap::new()).unwrap();
        let mut m = MetadataMap::new();
        assert_eq!(
            auth.check(&m).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        m.insert("authorization", "Bearer wrong".parse().unwrap());
        let e = auth.check(&m).unwrap_err();
        assert!(!e.message().contains("wrong"));
        m.insert("authorization", "Bearer right".parse().unwrap());
        assert_eq!(auth.check(&m).unwrap().name, "key");
        assert_eq!(
            key_hash_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
