//! The resolved retry policy of one provider: built-in defaults, then
//! `[retry]`, then `[providers.X.retry]`.

use std::time::Duration;

use crate::config::{ConfigError, ProviderConfig, RetryConfig, RetryLimitsConfig};
use crate::error::ErrorClass;

/// A provider's retry policy with every value resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// The first backoff's ceiling.
    pub initial_backoff: Duration,
    /// The backoff cap.
    pub max_backoff: Duration,
    /// Growth of the ceiling per retry.
    pub backoff_multiplier: f64,
    /// The limit of one attempt (until first content for a stream).
    pub per_try_timeout: Duration,
    /// A Retry-After longer than this is not waited for.
    pub max_retry_after: Duration,
    /// Longest silence between two stream events.
    pub stream_idle_timeout: Duration,
    /// The longest wait for an attempt's first content (for Complete, its
    /// answer) before the call moves to the next hop; `None` = the per-try
    /// timeout alone.
    pub first_token_timeout: Option<Duration>,
    /// The classes that are retried; only transient classes may appear.
    pub retry_on: Vec<ErrorClass>,
    /// The caller's own `x-retry-on`, which narrows `retry_on` and which
    /// no upstream `x-should-retry: true` overrides; `None` = not set.
    pub request_retry_on: Option<Vec<ErrorClass>>,
    /// Retries may add at most this fraction of the recent request rate...
    pub budget_ratio: f64,
    /// ... plus this many per second.
    pub budget_min_per_second: f64,
    /// Over this sliding window.
    pub budget_window: Duration,
    /// One attempt only when the caller is retrying itself.
    pub single_attempt_when_client_retries: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_millis(8_000),
            backoff_multiplier: 2.0,
            per_try_timeout: Duration::from_millis(60_000),
            max_retry_after: Duration::from_millis(60_000),
            stream_idle_timeout: Duration::from_millis(30_000),
            first_token_timeout: None,
            retry_on: ErrorClass::ALL
                .into_iter()
                .filter(|c| c.is_transient())
                .collect(),
            request_retry_on: None,
            budget_ratio: 0.2,
            budget_min_per_second: 10.0,
            budget_window: Duration::from_secs(10),
            single_attempt_when_client_retries: true,
        }
    }
}

impl RetryPolicy {
    /// Resolves the policy from the registry-wide section and a provider's
    /// own section; `path` names the provider's section in errors.
    pub fn resolve(
        global: &RetryConfig,
        provider: Option<&RetryConfig>,
        path: &str,
    ) -> Result<Self, ConfigError> {
        Self::resolve_over(Self::default(), global, provider, path)
    }

    /// The policy of one provider section: the kind's own defaults (a
    /// Databricks endpoint gets a longer per-try timeout, for long
    /// generations), then `[retry]`, then the section's `retry`.
    pub fn resolve_for(
        name: &str,
        section: &ProviderConfig,
        global: &RetryConfig,
    ) -> Result<Self, ConfigError> {
        let mut base = Self::default();
        if matches!(section, ProviderConfig::Databricks(_)) {
            base.per_try_timeout =
                Duration::from_millis(crate::providers::databricks::DEFAULT_PER_TRY_TIMEOUT_MS);
        }
        Self::resolve_over(
            base,
            global,
            section.retry(),
            &format!("providers.{name}.retry"),
        )
    }

    fn resolve_over(
        mut policy: Self,
        global: &RetryConfig,
        provider: Option<&RetryConfig>,
        path: &str,
    ) -> Result<Self, ConfigError> {
        policy.apply(global, "retry")?;
        if let Some(own) = provider {
            policy.apply(own, path)?;
        }
        Ok(policy)
    }

    fn apply(&mut self, c: &RetryConfig, path: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| ConfigError(format!("config key `{path}.{key}`: {why}"));
        if let Some(n) = c.max_attempts {
            if n == 0 {
                return Err(bad("max_attempts", "must be at least 1"));
            }
            self.max_attempts = n;
        }
        if let Some(ms) = c.initial_backoff_ms {
            self.initial_backoff = Duration::from_millis(ms);
        }
        if let Some(ms) = c.max_backoff_ms {
            self.max_backoff = Duration::from_millis(ms);
        }
        if self.max_backoff < self.initial_backoff {
            return Err(bad("max_backoff_ms", "must be at least initial_backoff_ms"));
        }
        if let Some(m) = c.backoff_multiplier {
            if !(m.is_finite() && m >= 1.0) {
                return Err(bad("backoff_multiplier", "must be a number >= 1.0"));
            }
            self.backoff_multiplier = m;
        }
        if let Some(ms) = c.per_try_timeout_ms {
            if ms == 0 {
                return Err(bad("per_try_timeout_ms", "must be greater than 0"));
            }
            self.per_try_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = c.max_retry_after_ms {
            self.max_retry_after = Duration::from_millis(ms);
        }
        if let Some(ms) = c.stream_idle_timeout_ms {
            if ms == 0 {
                return Err(bad("stream_idle_timeout_ms", "must be greater than 0"));
            }
            self.stream_idle_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = c.first_token_timeout_ms {
            if ms == 0 {
                return Err(bad("first_token_timeout_ms", "must be greater than 0"));
            }
            self.first_token_timeout = Some(Duration::from_millis(ms));
        }
        if let Some(r) = c.budget_ratio {
            if !(r.is_finite() && r >= 0.0) {
                return Err(bad("budget_ratio", "must be a number >= 0"));
            }
            self.budget_ratio = r;
        }
        if let Some(n) = c.budget_min_per_second {
            if !(n.is_finite() && n >= 0.0) {
                return Err(bad("budget_min_per_second", "must be a number >= 0"));
            }
            self.budget_min_per_second = n;
        }
        if let Some(ms) = c.budget_window_ms {
            if ms < 1_000 {
                return Err(bad("budget_window_ms", "must be at least 1000"));
            }
            self.budget_window = Duration::from_millis(ms);
        }
        if let Some(b) = c.single_attempt_when_client_retries {
            self.single_attempt_when_client_retries = b;
        }
        if let Some(names) = &c.retry_on {
            self.retry_on = parse_classes(names.iter().map(String::as_str))
                .map_err(|why| bad("retry_on", &why))?;
        }
        Ok(())
    }
}

/// Parses a list of retryable class names; `none` alone means no class.
pub(crate) fn parse_classes<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<ErrorClass>, String> {
    let mut classes = Vec::new();
    for name in names {
        let name = name.trim();
        if name == "none" {
            continue;
        }
        let class = ErrorClass::parse(name).ok_or_else(|| format!("unknown class `{name}`"))?;
        if !class.is_transient() {
            return Err(format!("class `{name}` is never retried"));
        }
        if !classes.contains(&class) {
            classes.push(class);
        }
    }
    Ok(classes)
}

/// The operator's ceilings for per-request overrides (`[retry.limits]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryLimits {
    /// The most attempts a request may ask for.
    pub max_attempts: u32,
    /// The longest backoff cap a request may ask for.
    pub max_backoff: Duration,
    /// The longest per-try timeout a request may ask for.
    pub per_try_timeout: Duration,
    /// The shortest hedge delay a request may ask for (`x-hedge-after-ms`).
    pub min_hedge_after: Duration,
    /// Whether a request may turn hedging on or shorten its delay; when
    /// not, `x-hedge-after-ms` can only turn it off.
    pub request_hedging: bool,
}

impl Default for RetryLimits {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            max_backoff: Duration::from_secs(30),
            per_try_timeout: Duration::from_secs(600),
            min_hedge_after: Duration::from_millis(DEFAULT_MIN_HEDGE_AFTER_MS),
            request_hedging: true,
        }
    }
}

/// The default of `[retry.limits] min_hedge_after_ms`.
pub const DEFAULT_MIN_HEDGE_AFTER_MS: u64 = 50;

impl RetryLimits {
    /// The hedge delay of a call: the request's `x-hedge-after-ms` within
    /// these limits, else the provider's own; `None` = no hedge. A request
    /// may always turn hedging off (`0`) or lengthen the delay; it may only
    /// turn hedging on or shorten the delay when `request_hedging` is on,
    /// and never below `min_hedge_after`.
    pub fn hedge_after(
        &self,
        requested: Option<Duration>,
        configured: Option<Duration>,
    ) -> Option<Duration> {
        let configured = configured.filter(|d| !d.is_zero());
        match requested {
            None => configured,
            Some(d) if d.is_zero() => None,
            Some(d) if !self.request_hedging => configured.map(|c| c.max(d)),
            Some(d) => Some(d.max(self.min_hedge_after)),
        }
    }
}

impl RetryLimits {
    /// Resolves `[retry.limits]` over the defaults.
    pub fn resolve(c: Option<&RetryLimitsConfig>) -> Result<Self, ConfigError> {
        let mut limits = Self::default();
        let Some(c) = c else { return Ok(limits) };
        if let Some(n) = c.max_attempts {
            if n == 0 {
                return Err(ConfigError(
                    "config key `retry.limits.max_attempts`: must be at least 1".into(),
                ));
            }
            limits.max_attempts = n;
        }
        if let Some(ms) = c.max_backoff_ms {
            limits.max_backoff = Duration::from_millis(ms);
        }
        if let Some(ms) = c.per_try_timeout_ms {
            if ms == 0 {
                return Err(ConfigError(
                    "config key `retry.limits.per_try_timeout_ms`: must be greater than 0".into(),
                ));
            }
            limits.per_try_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = c.min_hedge_after_ms {
            limits.min_hedge_after = Duration::from_millis(ms);
        }
        if let Some(on) = c.request_hedging {
            limits.request_hedging = on;
        }
        Ok(limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_section_overrides_global() {
        let global = RetryConfig {
            max_attempts: Some(3),
            initial_backoff_ms: Some(100),
            ..Default::default()
        };
        let own = RetryConfig {
            max_attempts: Some(5),
            retry_on: Some(vec!["rate-limited".into(), "busy".into()]),
            ..Default::default()
        };
        let p = RetryPolicy::resolve(&global, Some(&own), "providers.x.retry").unwrap();
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.initial_backoff, Duration::from_millis(100));
        assert_eq!(p.retry_on, [ErrorClass::RateLimited, ErrorClass::Busy]);
    }

    #[test]
    fn a_request_hedge_is_clamped_by_the_operator() {
        let ms = Duration::from_millis;
        let limits = RetryLimits {
            min_hedge_after: ms(100),
            ..RetryLimits::default()
        };
        assert_eq!(limits.hedge_after(Some(ms(1)), None), Some(ms(100)));
        assert_eq!(limits.hedge_after(Some(ms(500)), None), Some(ms(500)));
        assert_eq!(limits.hedge_after(Some(ms(0)), Some(ms(300))), None);
        assert_eq!(limits.hedge_after(None, Some(ms(300))), Some(ms(300)));
        let off = RetryLimits {
            request_hedging: false,
            ..limits
        };
        assert_eq!(off.hedge_after(Some(ms(200)), None), None);
        assert_eq!(off.hedge_after(Some(ms(200)), Some(ms(300))), Some(ms(300)));
        assert_eq!(off.hedge_after(Some(ms(900)), Some(ms(300))), Some(ms(900)));
        assert_eq!(off.hedge_after(Some(ms(0)), Some(ms(300))), None);
    }

    #[test]
    fn never_retried_classes_are_refused() {
        assert!(
            parse_classes(["auth"])
                .unwrap_err()
                .contains("never retried")
        );
        assert!(
            parse_classes(["nope"])
                .unwrap_err()
                .contains("unknown class")
        );
        assert_eq!(parse_classes(["none"]).unwrap(), []);
    }
}
