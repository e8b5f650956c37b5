//! The per-call keys a caller sends beside a request, as gRPC metadata or
//! as HTTP headers, parsed once into [`CallOptions`]: the `x-retry-*`
//! overrides, `grpc-previous-rpc-attempts`, `x-stream-resume`,
//! `x-hedge-after-ms` and `x-fallback-providers`. The deadline is the
//! edge's own (`grpc-timeout`, or an HTTP timeout header) and is set there.
//! A malformed value is an error naming its key, before anything goes
//! upstream; keys this module does not know are ignored.

use std::time::Duration;

use crate::config::ResumeMode;
use crate::registry::CallOptions;
use crate::retry::{OVERRIDE_PREFIX, RetryOverride};

/// The keys besides `x-retry-*` that [`call_options`] reads.
pub(crate) const KEYS: [&str; 5] = [
    "grpc-previous-rpc-attempts",
    "x-stream-resume",
    "x-hedge-after-ms",
    "x-fallback-providers",
    "x-first-token-timeout-ms",
];

/// Whether the gateway reads `key` (lower case) as a per-call key.
pub(crate) fn is_call_key(key: &str) -> bool {
    key.starts_with(OVERRIDE_PREFIX) || KEYS.contains(&key)
}

/// The call options of a request whose keys (lower case) and text values
/// are `pairs`.
pub(crate) fn call_options<'a>(pairs: &[(&'a str, &'a str)]) -> Result<CallOptions, String> {
    let text = |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.trim());
    let client_previous_attempts = text("grpc-previous-rpc-attempts")
        .map(|v| {
            v.parse::<u32>()
                .map_err(|_| format!("grpc-previous-rpc-attempts: `{v}` is not an integer"))
        })
        .transpose()?
        .unwrap_or(0);
    let overrides = RetryOverride::parse(
        pairs
            .iter()
            .copied()
            .filter(|(k, _)| k.starts_with(OVERRIDE_PREFIX)),
    )?;
    let stream_resume = text("x-stream-resume")
        .map(|v| {
            ResumeMode::parse(v).ok_or_else(|| {
                format!("x-stream-resume: `{v}` is not `continue`, `restart` or `off`")
            })
        })
        .transpose()?;
    let hedge_after = text("x-hedge-after-ms")
        .map(|v| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("x-hedge-after-ms: `{v}` is not an integer >= 0"))
        })
        .transpose()?;
    let first_token_timeout = text("x-first-token-timeout-ms")
        .map(|v| match v.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Duration::from_millis(n)),
            _ => Err(format!(
                "x-first-token-timeout-ms: `{v}` is not an integer > 0"
            )),
        })
        .transpose()?;
    let fallback = text("x-fallback-providers").map(|v| {
        if v == "none" {
            Vec::new()
        } else {
            v.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect()
        }
    });
    Ok(CallOptions {
        overrides,
        client_previous_attempts,
        fallback,
        stream_resume,
        hedge_after,
        first_token_timeout,
        ..CallOptions::default()
    })
}

/// How long before the caller's deadline the gateway answers
/// `DEADLINE_EXCEEDED` itself (over gRPC and over HTTP): a tenth of the timeout, between 10 ms and
/// 250 ms. The answer, with its reason (attempts, last error), then reaches
/// the caller before the transport's own timer cancels the call without one,
/// even on a loaded machine.
pub(crate) fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(250))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_read_and_errors_name_it() {
        let o = call_options(&[
            ("x-retry-max-attempts", "2"),
            ("grpc-previous-rpc-attempts", "1"),
            ("x-stream-resume", "continue"),
            ("x-hedge-after-ms", "250"),
            ("x-fallback-providers", "a, b,"),
            ("authorization", "ignored"),
        ])
        .unwrap();
        assert_eq!(o.overrides.max_attempts, Some(2));
        assert_eq!(o.client_previous_attempts, 1);
        assert_eq!(o.stream_resume, Some(ResumeMode::Continue));
        assert_eq!(o.hedge_after, Some(Duration::from_millis(250)));
        assert_eq!(o.fallback, Some(vec!["a".to_string(), "b".to_string()]));
        for (key, value) in [
            ("x-retry-max-attempts", "zero"),
            ("grpc-previous-rpc-attempts", "-1"),
            ("x-stream-resume", "maybe"),
            ("x-hedge-after-ms", "soon"),
        ] {
            let e = call_options(&[(key, value)]).unwrap_err();
            assert!(e.starts_with(key), "{e}");
        }
        assert_eq!(
            call_options(&[("x-fallback-providers", "none")])
                .unwrap()
                .fallback,
            Some(vec![])
        );
    }
}
