//! Per-request retry overrides, carried as `x-retry-*` request metadata,
//! parsed once into a typed [`RetryOverride`] and merged over a provider's
//! policy within the operator's [`RetryLimits`].

use std::time::Duration;

use super::policy::parse_classes;
use super::{RetryLimits, RetryPolicy};
use crate::error::ErrorClass;

/// The prefix of every override key.
pub const PREFIX: &str = "x-retry-";

/// What a request asked for; unset fields keep the provider's policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetryOverride {
    /// `x-retry-max-attempts`.
    pub max_attempts: Option<u32>,
    /// `x-retry-initial-backoff-ms`.
    pub initial_backoff: Option<Duration>,
    /// `x-retry-max-backoff-ms`.
    pub max_backoff: Option<Duration>,
    /// `x-retry-backoff-multiplier`.
    pub backoff_multiplier: Option<f64>,
    /// `x-retry-per-try-timeout-ms`.
    pub per_try_timeout: Option<Duration>,
    /// `x-retry-on` (`none` = an empty list).
    pub retry_on: Option<Vec<ErrorClass>>,
}

impl RetryOverride {
    /// Parses the `x-retry-*` pairs of a request. Other keys are ignored;
    /// an unknown `x-retry-` key or a malformed value is an error whose
    /// message names the key.
    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut o = Self::default();
        for (key, value) in pairs {
            if !key.starts_with(PREFIX) {
                continue;
            }
            let value = value.trim();
            let bad = |why: &str| format!("{key}: `{value}` {why}");
            let millis = |min: u64| -> Result<Duration, String> {
                match value.parse::<u64>() {
                    Ok(n) if n >= min => Ok(Duration::from_millis(n)),
                    _ => Err(bad(&format!("is not an integer >= {min}"))),
                }
            };
            match &key[PREFIX.len()..] {
                "max-attempts" => match value.parse::<u32>() {
                    Ok(n) if n >= 1 => o.max_attempts = Some(n),
                    _ => return Err(bad("is not an integer >= 1")),
                },
                "initial-backoff-ms" => o.initial_backoff = Some(millis(0)?),
                "max-backoff-ms" => o.max_backoff = Some(millis(0)?),
                "per-try-timeout-ms" => o.per_try_timeout = Some(millis(1)?),
                "backoff-multiplier" => match value.parse::<f64>() {
                    Ok(m) if m.is_finite() && m >= 1.0 => o.backoff_multiplier = Some(m),
                    _ => return Err(bad("is not a decimal >= 1.0")),
                },
                "on" => {
                    let classes = if value == "none" {
                        Vec::new()
                    } else {
                        parse_classes(value.split(',')).map_err(|why| format!("{key}: {why}"))?
                    };
                    o.retry_on = Some(classes);
                }
                _ => {
                    return Err(format!(
                        "{key}: unknown retry override (known: x-retry-max-attempts, x-retry-initial-backoff-ms, x-retry-max-backoff-ms, x-retry-backoff-multiplier, x-retry-per-try-timeout-ms, x-retry-on)"
                    ));
                }
            }
        }
        if let (Some(initial), Some(max)) = (o.initial_backoff, o.max_backoff)
            && max < initial
        {
            return Err(format!(
                "x-retry-max-backoff-ms: {} is below x-retry-initial-backoff-ms {}",
                max.as_millis(),
                initial.as_millis()
            ));
        }
        Ok(o)
    }

    /// The policy for one request: `policy` with these overrides, each
    /// clamped to the operator's `limits` (a request may lower a limit,
    /// never raise it).
    pub fn apply(&self, policy: &RetryPolicy, limits: &RetryLimits) -> RetryPolicy {
        let mut p = policy.clone();
        if let Some(n) = self.max_attempts {
            p.max_attempts = n.min(limits.max_attempts);
        }
        if let Some(d) = self.max_backoff {
            p.max_backoff = d.min(limits.max_backoff);
        }
        if let Some(d) = self.initial_backoff {
            p.initial_backoff = d.min(limits.max_backoff);
        }
        // A lowered cap also lowers the first backoff.
        p.initial_backoff = p.initial_backoff.min(p.max_backoff);
        if let Some(m) = self.backoff_multiplier {
            p.backoff_multiplier = m;
        }
        if let Some(d) = self.per_try_timeout {
            p.per_try_timeout = d.min(limits.per_try_timeout);
        }
        // `x-retry-on` narrows the operator's `retry_on`, never widens it.
        if let Some(classes) = &self.retry_on {
            p.retry_on.retain(|c| classes.contains(c));
            p.request_retry_on = Some(classes.clone());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<RetryOverride, String> {
        RetryOverride::parse(pairs.iter().copied())
    }

    #[test]
    fn parses_every_key() {
        let o = parse(&[
            ("x-retry-max-attempts", "4"),
            ("x-retry-initial-backoff-ms", "10"),
            ("x-retry-max-backoff-ms", "100"),
            ("x-retry-backoff-multiplier", "1.5"),
            ("x-retry-per-try-timeout-ms", "2000"),
            ("x-retry-on", "rate-limited, overloaded"),
            ("authorization", "ignored"),
        ])
        .unwrap();
        assert_eq!(o.max_attempts, Some(4));
        assert_eq!(o.initial_backoff, Some(Duration::from_millis(10)));
        assert_eq!(o.backoff_multiplier, Some(1.5));
        assert_eq!(
            o.retry_on,
            Some(vec![ErrorClass::RateLimited, ErrorClass::Overloaded])
        );
        assert_eq!(
            parse(&[("x-retry-on", "none")]).unwrap().retry_on,
            Some(vec![])
        );
    }

    #[test]
    fn errors_name_the_key() {
        for (key, value) in [
            ("x-retry-max-attempts", "0"),
            ("x-retry-max-attempts", "three"),
            ("x-retry-backoff-multiplier", "0.5"),
            ("x-retry-per-try-timeout-ms", "0"),
            ("x-retry-on", "teapot"),
            ("x-retry-on", "auth"),
            ("x-retry-maximum", "1"),
        ] {
            let e = parse(&[(key, value)]).unwrap_err();
            assert!(e.starts_with(key), "{e}");
        }
        let e = parse(&[
            ("x-retry-initial-backoff-ms", "50"),
            ("x-retry-max-backoff-ms", "5"),
        ])
        .unwrap_err();
        assert!(e.contains("x-retry-max-backoff-ms"), "{e}");
    }

    #[test]
    fn overrides_are_clamped_to_the_limits() {
        let limits = RetryLimits {
            max_attempts: 4,
            max_backoff: Duration::from_secs(2),
            per_try_timeout: Duration::from_secs(10),
            ..RetryLimits::default()
        };
        let policy = RetryPolicy::default();
        let o = parse(&[
            ("x-retry-max-attempts", "50"),
            ("x-retry-max-backoff-ms", "60000"),
            ("x-retry-per-try-timeout-ms", "999999"),
        ])
        .unwrap();
        let p = o.apply(&policy, &limits);
        assert_eq!(p.max_attempts, 4);
        assert_eq!(p.max_backoff, Duration::from_secs(2));
        assert_eq!(p.per_try_timeout, Duration::from_secs(10));
        let lower = parse(&[("x-retry-max-attempts", "1")])
            .unwrap()
            .apply(&policy, &limits);
        assert_eq!(lower.max_attempts, 1);
        let operator = RetryPolicy {
            retry_on: vec![ErrorClass::RateLimited],
            ..RetryPolicy::default()
        };
        let wider = parse(&[("x-retry-on", "rate-limited,server-error")])
            .unwrap()
            .apply(&operator, &limits);
        assert_eq!(wider.retry_on, [ErrorClass::RateLimited], "never widened");
    }
}
