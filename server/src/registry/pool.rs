//! Provider pools: several endpoint and key pairs (members) behind one
//! provider name, which keeps its single policy, budget and breaker.
//!
//! Each member has its own state: requests in flight, a peak-EWMA of its
//! latency, recent failures, a cooldown and whether its key is dead. The
//! gate picks a member for every attempt it admits:
//!
//! - `p2c` (the default): two members drawn at random by weight among
//!   those allowed now, the one with the lower score wins, where
//!   `score = (ewma_ms + 1) * (in_flight + 1) * (1 + failures)`.
//!   `ewma_ms` jumps to a slower sample at once and decays towards faster
//!   ones (`0.8 * ewma + 0.2 * sample`), and while a member is not
//!   measured it decays towards zero with time (`ewma * e^(-idle / 10 s)`,
//!   as in Finagle's and linkerd's peak-EWMA); `failures` grows by one per
//!   upstream fault and halves on each success.
//! - `weighted`: one member drawn by weight alone.
//! - `ordered`: the first member allowed now.
//!
//! A member is not allowed while it cools down, while it is paced, or
//! once its key is dead. A 429 or an overload cools only that member, for
//! the upstream's Retry-After, else a default that doubles from 1 s up to
//! 30 s (reset by a success). A 401/403 marks the member's key dead until
//! the gateway restarts, with one warning naming the key's variable (never
//! the key). An answer whose rate-limit headers say its requests, or the
//! tokens a request needs, are spent paces the member until their reset.
//! A retry (or a hedge, or a continuation) goes to a member the hop has
//! not tried yet when one is allowed, else to another than the last one
//! when one is allowed: a hop with as many attempts as the pool has
//! members reaches every allowed member.
//!
//! ## When a member can serve (for the breaker)
//!
//! A member is *unavailable* when it is not allowed now (cooling, paced,
//! dead) or when it is *failing*: its latest settled attempt ended in an
//! upstream fault (a 5xx, a timeout under the operator's limit, a broken
//! stream, a 429 or an overload) and it has not served since. The
//! provider's breaker counts a member's fault only when every other member
//! is unavailable (`Pool::others_can_serve`), so the breaker opens only
//! when no member can serve. Failing members count as unable to serve
//! because otherwise a pool whose every member answers 500 would never
//! open its breaker (each fault would be excused by the others, which are
//! allowed but just as broken); a member that keeps serving keeps the
//! breaker closed whatever the others do.
//!
//! Invariants: no attempt goes to a member that is cooling, paced or
//! dead; the breaker opens only when every member is unavailable; a
//! member's in-flight count is an RAII lease, given back however the
//! attempt ends. Under `p2c`, a member whose estimate one slow answer
//! raised is not left unmeasured for good: once its estimate has decayed
//! below the faster member's score (about `10 s * ln(spike_ms)` for a
//! 1 ms rival), it wins a draw again and is measured anew.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Balance, MemberConfig};
use crate::error::{ErrorClass, ProviderError};
use crate::providers::{Pacer, Provider, RateLimits};
use crate::retry::Clock;
use crate::retry::Jitter;

const FIRST_COOLDOWN: Duration = Duration::from_secs(1);
const MAX_COOLDOWN: Duration = Duration::from_secs(30);
/// The time constant of a latency estimate's decay while its member is not
/// measured.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The longest an upstream's reported reset paces a member.
const MAX_PACE: Duration = Duration::from_secs(600);

/// One endpoint and key pair.
pub(crate) struct Member {
    /// Endpoint host and key variable, for telemetry.
    pub(crate) label: String,
    pub(crate) host: String,
    pub(crate) key_env: Option<String>,
    pub(crate) provider: Arc<dyn Provider>,
    weight: u32,
    state: Mutex<MemberState>,
}

#[derive(Debug, Default)]
struct MemberState {
    /// Requests left and when they refill, as the upstream last said.
    requests: Option<(u64, Instant)>,
    /// Tokens left and when they refill.
    tokens: Option<(u64, Instant)>,
    in_flight: u32,
    ewma_ms: f64,
    /// When `ewma_ms` was last measured (it decays from then on).
    ewma_at: Option<Instant>,
    failures: f64,
    cooling_until: Option<Instant>,
    next_cooldown: Duration,
    dead: bool,
    /// Its latest settled attempt was an upstream fault (no success since).
    failing: bool,
}

impl MemberState {
    /// The latency estimate at `now`: the last one, decayed for the time
    /// since it was measured.
    fn latency_ms(&self, now: Instant) -> f64 {
        self.ewma_at.map_or(self.ewma_ms, |at| {
            let idle = now.saturating_duration_since(at).as_secs_f64();
            self.ewma_ms * (-idle / EWMA_DECAY.as_secs_f64()).exp()
        })
    }
}

/// What `ListProviders` shows of a member.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberSummary {
    /// The endpoint's host.
    pub host: String,
    /// The key's environment variable (never the key).
    pub key_env: String,
    /// `ready`, `cooling` (after a 429 or an overload), `paced` (its
    /// answers said its requests or tokens are spent) or `dead` (its key
    /// was refused).
    pub state: &'static str,
    /// For a cooling or paced member: how long until it may take a
    /// request again (measured on the registry's clock when listed).
    pub ready_in: Option<Duration>,
    /// Its latest settled attempt ended in an upstream fault and it has
    /// not served since (for the breaker it cannot serve; see the module
    /// doc). Not shown by `ListProviders`.
    pub failing: bool,
    /// Its latency estimate.
    pub ewma_latency_ms: f64,
}

/// A provider's members and how one is chosen.
pub(crate) struct Pool {
    members: Vec<Member>,
    balance: Balance,
}

/// Why no member can take an attempt now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// Every live member cools down; the first is ready after this.
    Cooling(Duration),
    /// Every member's key is dead.
    Dead,
}

/// A member taken for one attempt (its in-flight count, given back on
/// drop).
pub(crate) struct MemberLease {
    pool: Arc<Pool>,
    index: usize,
}

fn lock(m: &Member) -> std::sync::MutexGuard<'_, MemberState> {
    match m.state.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Pool {
    /// A pool of `members`, each with the provider built for it.
    pub(crate) fn new(members: Vec<(MemberConfig, Arc<dyn Provider>)>, balance: Balance) -> Self {
        Self {
            members: members
                .into_iter()
                .map(|(m, provider)| Member {
                    label: m.label,
                    host: m.host,
                    key_env: m.key_env,
                    provider,
                    weight: m.weight.max(1),
                    state: Mutex::new(MemberState {
                        next_cooldown: FIRST_COOLDOWN,
                        ..MemberState::default()
                    }),
                })
                .collect(),
            balance,
        }
    }

    /// When member `index` may take a request of `tokens` (now: `None`
    /// past the instant; dead: never).
    fn ready_at(&self, index: usize, now: Instant, tokens: u64) -> Option<Option<Instant>> {
        let s = lock(&self.members[index]);
        if s.dead {
            return None;
        }
        let mut at = s.cooling_until.filter(|t| now < *t);
        // Paced: a limit that this request would exhaust waits for its
        // reset, instead of a request that is bound to fail.
        if let Some((0, reset)) = s.requests
            && now < reset
        {
            at = Some(at.map_or(reset, |a| a.max(reset)));
        }
        if let Some((left, reset)) = s.tokens
            && left < tokens.max(1)
            && now < reset
        {
            at = Some(at.map_or(reset, |a| a.max(reset)));
        }
        Some(at)
    }

    fn allowed(&self, index: usize, now: Instant, tokens: u64) -> bool {
        matches!(self.ready_at(index, now, tokens), Some(None))
    }

    /// Whether a member other than `except` may take an attempt now.
    pub(crate) fn others_allowed(&self, except: usize, now: Instant, tokens: u64) -> bool {
        (0..self.members.len()).any(|i| i != except && self.allowed(i, now, tokens))
    }

    /// Whether a member other than `except` can serve now: it is allowed
    /// and not failing (see the module doc). While one can, a fault of
    /// `except` is not the provider's and the breaker does not count it.
    pub(crate) fn others_can_serve(&self, except: usize, now: Instant) -> bool {
        (0..self.members.len())
            .any(|i| i != except && self.allowed(i, now, 0) && !lock(&self.members[i]).failing)
    }

    /// Takes a member for an attempt: one not in `tried` (a bit per member
    /// index, the members the hop already tried) when one is allowed, else
    /// one other than `avoid` (the member of the hop's last attempt) when
    /// one is allowed.
    pub(crate) fn pick(
        self: &Arc<Self>,
        now: Instant,
        (avoid, tried): (Option<usize>, u64),
        jitter: &Jitter,
        tokens: u64,
    ) -> Result<MemberLease, Unavailable> {
        let mut allowed: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.allowed(i, now, tokens))
            .collect();
        if allowed.is_empty() {
            let wait = (0..self.members.len())
                .filter_map(|i| self.ready_at(i, now, tokens).flatten())
                .map(|t| t.saturating_duration_since(now))
                .min();
            return Err(wait.map_or(Unavailable::Dead, Unavailable::Cooling));
        }
        let untried: Vec<usize> = allowed
            .iter()
            .copied()
            .filter(|&i| !was_tried(tried, i))
            .collect();
        if !untried.is_empty() {
            allowed = untried;
        } else if allowed.len() > 1
            && let Some(a) = avoid
        {
            allowed.retain(|&i| i != a);
        }
        let index = match self.balance {
            Balance::Ordered => allowed[0],
            Balance::Weighted => self.draw(&allowed, jitter),
            Balance::P2c if allowed.len() == 1 => allowed[0],
            Balance::P2c => {
                let first = self.draw(&allowed, jitter);
                let rest: Vec<usize> = allowed.iter().copied().filter(|&i| i != first).collect();
                let second = self.draw(&rest, jitter);
                if self.score(second, now) < self.score(first, now) {
                    second
                } else {
                    first
                }
            }
        };
        lock(&self.members[index]).in_flight += 1;
        Ok(MemberLease {
            pool: self.clone(),
            index,
        })
    }

    /// One of `among` at random, by weight.
    fn draw(&self, among: &[usize], jitter: &Jitter) -> usize {
        let total: u64 = among
            .iter()
            .map(|&i| u64::from(self.members[i].weight))
            .sum();
        let mut point = (jitter.next_unit() * total as f64) as u64;
        for &i in among {
            let w = u64::from(self.members[i].weight);
            if point < w {
                return i;
            }
            point -= w;
        }
        among[among.len() - 1]
    }

    fn score(&self, index: usize, now: Instant) -> f64 {
        let s = lock(&self.members[index]);
        (s.latency_ms(now) + 1.0) * f64::from(s.in_flight + 1) * (1.0 + s.failures)
    }

    /// Every member, for `ListProviders`. A member is `paced` when its
    /// requests, or its tokens, are spent (whatever a request's size);
    /// `ready_in` is when it is allowed again (for a member both cooling
    /// and paced, the later of the two).
    pub(crate) fn summaries(&self, now: Instant) -> Vec<MemberSummary> {
        (0..self.members.len())
            .map(|i| {
                let ready_at = self.ready_at(i, now, 0);
                let m = &self.members[i];
                let s = lock(m);
                MemberSummary {
                    host: m.host.clone(),
                    key_env: m.key_env.clone().unwrap_or_default(),
                    state: match ready_at {
                        None => "dead",
                        Some(None) => "ready",
                        Some(Some(_)) if s.cooling_until.is_some_and(|t| now < t) => "cooling",
                        Some(Some(_)) => "paced",
                    },
                    ready_in: ready_at.flatten().map(|t| t.saturating_duration_since(now)),
                    failing: s.failing,
                    ewma_latency_ms: s.latency_ms(now),
                }
            })
            .collect()
    }
}

/// Whether member `index` is in the `tried` set (members past the 64th are
/// never marked: a retry may go to one again).
fn was_tried(tried: u64, index: usize) -> bool {
    index < 64 && tried & (1 << index) != 0
}

/// `tried` with member `index` added.
pub(crate) fn mark_tried(tried: u64, index: usize) -> u64 {
    if index < 64 {
        tried | (1 << index)
    } else {
        tried
    }
}

impl MemberLease {
    /// The member's index in its pool.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    fn member(&self) -> &Member {
        &self.pool.members[self.index]
    }

    /// The provider to call.
    pub(crate) fn provider(&self) -> &Arc<dyn Provider> {
        &self.member().provider
    }

    /// The member's label (host and key variable).
    pub(crate) fn label(&self) -> &str {
        &self.member().label
    }

    /// What paces this member when its answer reports its rate limits.
    pub(crate) fn pacer(&self, clock: Arc<dyn Clock>) -> Pacer {
        let (pool, index) = (self.pool.clone(), self.index);
        Box::new(move |limits| pool.pace(index, limits, clock.now()))
    }
}

impl Pool {
    /// Member `index`'s answer reported `limits`: they pace it.
    fn pace(&self, index: usize, limits: RateLimits, now: Instant) {
        let mut s = lock(&self.members[index]);
        let at = |d: Duration| now.checked_add(d.min(MAX_PACE)).unwrap_or(now);
        if let Some((left, reset)) = limits.requests {
            s.requests = Some((left, at(reset)));
        }
        if let Some((left, reset)) = limits.tokens {
            s.tokens = Some((left, at(reset)));
        }
    }
}

impl MemberLease {
    /// What happened to a member on one outcome, for the metrics.
    pub(crate) fn event(outcome: Option<&ProviderError>) -> Option<&'static str> {
        match outcome.map(|e| e.class) {
            None => Some("served"),
            Some(ErrorClass::RateLimited | ErrorClass::Overloaded) => Some("cooled"),
            Some(ErrorClass::Auth) => Some("dead"),
            Some(_) => None,
        }
    }

    /// The attempt succeeded after `took`, at `now`.
    pub(crate) fn succeeded(&self, took: Duration, now: Instant) {
        let mut s = lock(self.member());
        let ms = took.as_secs_f64() * 1_000.0;
        let was = s.latency_ms(now);
        s.ewma_ms = if ms > was { ms } else { 0.8 * was + 0.2 * ms };
        s.ewma_at = Some(now);
        s.failures /= 2.0;
        s.next_cooldown = FIRST_COOLDOWN;
        s.failing = false;
    }

    /// The attempt failed with `error`: a 429 or an overload cools this
    /// member, a refused key kills it, other upstream faults count; every
    /// upstream fault leaves it failing until it serves again.
    pub(crate) fn failed(&self, error: &ProviderError, now: Instant) {
        let member = self.member();
        let mut s = lock(member);
        if crate::retry::is_upstream_fault(error.class) {
            s.failing = true;
        }
        match error.class {
            ErrorClass::RateLimited | ErrorClass::Overloaded => {
                let wait = error
                    .retry_after
                    .unwrap_or(s.next_cooldown)
                    .min(MAX_COOLDOWN);
                s.next_cooldown = s.next_cooldown.saturating_mul(2).min(MAX_COOLDOWN);
                s.cooling_until = Some(now.checked_add(wait).unwrap_or(now));
                s.failures += 1.0;
            }
            ErrorClass::Auth if !s.dead => {
                s.dead = true;
                tracing::warn!(
                    member = %member.label,
                    key_env = member.key_env.as_deref().unwrap_or(""),
                    "the upstream refused this pool member's key; it is not used again until restart"
                );
            }
            class if crate::retry::is_upstream_fault(class) => s.failures += 1.0,
            _ => {}
        }
    }
}

impl Drop for MemberLease {
    fn drop(&mut self) {
        let mut s = lock(self.member());
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MockConfig, ProviderConfig};
    use crate::providers::mock::MockProvider;

    fn pool(n: usize) -> Arc<Pool> {
        let members = (0..n)
            .map(|i| {
                let provider: Arc<dyn Provider> =
                    Arc::new(MockProvider::new(&MockConfig::default()).unwrap());
                let member = MemberConfig {
                    label: format!("m{i}"),
                    host: format!("h{i}"),
                    key_env: None,
                    weight: 1,
                    config: ProviderConfig::Mock(MockConfig::default()),
                };
                (member, provider)
            })
            .collect();
        Arc::new(Pool::new(members, Balance::P2c))
    }

    /// Member `index` of a two-member pool serves in `ms` at `now`.
    fn serve_on(pool: &Arc<Pool>, index: usize, ms: u64, now: Instant, jitter: &Jitter) {
        let lease = pool.pick(now, (None, 1 << (1 - index)), jitter, 0).unwrap();
        assert_eq!(lease.index, index);
        lease.succeeded(Duration::from_millis(ms), now);
    }

    /// The module's p2c invariant, over generated scenarios: a member that
    /// one slow answer raised wins a draw again within `10 s * ln(spike)`
    /// (plus a call's spacing) of sequential calls, and a member that stays
    /// slow keeps losing most of them.
    #[test]
    fn a_member_raised_by_one_slow_answer_is_measured_again() {
        for seed in 0..300u64 {
            let jitter = Jitter::seeded(seed);
            let draws = Jitter::seeded(seed ^ 0x9e37_79b9);
            let draw = |lo: u64, hi: u64| lo + (draws.next_unit() * (hi - lo) as f64) as u64;
            let fast_ms = draw(1, 20);
            let spike_ms = fast_ms * draw(5, 2000);
            let spacing = Duration::from_millis(draw(10, 2000));
            let stays_slow = seed % 2 == 0;
            let pool = pool(2);
            let start = Instant::now();
            serve_on(&pool, 0, fast_ms, start, &jitter);
            serve_on(&pool, 1, spike_ms, start, &jitter);
            // The spike decays below the fast member's estimate (itself
            // decayed by at most a spacing of 2 s, a factor e^-0.2) after
            // `10 s * (ln ratio + 0.2)`; the next call then takes it.
            let ratio = spike_ms as f64 / fast_ms as f64;
            let bound = EWMA_DECAY.mul_f64(ratio.ln() + 0.5) + spacing;
            // A slow answer raises it to the spike again: it waits at least
            // `10 s * ln ratio` between two of its picks.
            let cycle = EWMA_DECAY.mul_f64(ratio.ln());
            let (mut now, mut first_return, mut slow_picks, calls) = (start, None, 0, 400);
            for _ in 0..calls {
                now += spacing;
                let lease = pool.pick(now, (None, 0), &jitter, 0).unwrap();
                let ms = if lease.index == 1 {
                    slow_picks += 1;
                    first_return.get_or_insert(now);
                    if stays_slow { spike_ms } else { fast_ms }
                } else {
                    fast_ms
                };
                lease.succeeded(Duration::from_millis(ms), now);
            }
            let total = spacing * calls;
            if total > bound {
                let back = first_return.unwrap_or_else(|| {
                    panic!(
                        "seed {seed}: member 1 never measured again in {total:?} (bound {bound:?})"
                    )
                });
                assert!(
                    back - start <= bound,
                    "seed {seed}: measured again after {:?}, bound {bound:?}",
                    back - start
                );
            }
            if stays_slow {
                // At most one pick per decay of its estimate, plus one.
                let most = (total.as_secs_f64() / cycle.as_secs_f64()).ceil() as u32 + 1;
                assert!(
                    slow_picks <= most,
                    "seed {seed}: a member {ratio:.0}x slower took {slow_picks} of {calls} calls (at most {most})"
                );
            }
        }
    }

    #[test]
    fn the_listed_latency_is_the_decayed_estimate() {
        let jitter = Jitter::seeded(1);
        let pool = pool(2);
        let start = Instant::now();
        serve_on(&pool, 1, 100, start, &jitter);
        let at = |t: Duration| pool.summaries(start + t)[1].ewma_latency_ms;
        assert!((at(Duration::ZERO) - 100.0).abs() < 1e-9);
        let later = at(EWMA_DECAY);
        assert!(
            (later - 100.0 / std::f64::consts::E).abs() < 1e-6,
            "{later}"
        );
    }
}
