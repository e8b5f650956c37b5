//! A deterministic simulation of the registry under faults.
//!
//! Each scenario builds a real [`Registry`] over scripted in-process
//! providers (no sockets), on a current-thread tokio runtime with paused
//! time, everything drawn from one seed: the providers' policies (their
//! `retry_on`, backoff multiplier and `single_attempt_when_client_retries`
//! included), breakers (and their failure ratio), budgets, fallback
//! chains, resume and hedge settings, pools of up to three members with a
//! drawn balance, whether the registry honours callers' hedging; each upstream
//! call's behaviour (latency, 429 with and without Retry-After, absurd
//! Retry-After values, 5xx, 529, resets, streams cut before or after
//! content, stalls, truncation, error events, keep-alives,
//! `x-should-retry`, a pool member's revoked key answering every call
//! 401); and many concurrent calls with their own overrides (attempts,
//! per-try timeout, `retry_on`, backoff), deadlines and cancellations,
//! after a warm-up and a probe of each provider whose hedge waits for
//! its p95 (11). After each scenario it checks:
//!
//! 1. every breaker permit is released (no probe in flight), and no
//!    breaker refuses a call once `max_cooldown_ms` has passed (none
//!    wedges);
//! 2. the upstream calls a call made equal the attempts it reported, and
//!    stay within `max_attempts` per hop plus `max_resumes`;
//! 3. per provider, the upstream calls after each call's first (retries,
//!    hedges, and every continuation or restart, even a hop's first call
//!    to it) stay within the budget's own formula over its sliding window,
//!    `min_per_second * window + ratio * first attempts`, for the window
//!    ending at every second (from the scenario's start, when it touches
//!    every budget once) in which one was made;
//! 4. no call ends later than its deadline, and no wait starts that would
//!    leave less than a useful attempt before it;
//! 5. every stream that ends OK delivered exactly one stop, last, and text
//!    equal to what its provider produced, with no gap and no double
//!    across a resume; a stream that ends in error delivered a prefix of
//!    it; every continuation's prefill is exactly the delivered text
//!    without trailing whitespace;
//! 6. no task panicked;
//! 7. the faults a breaker counted are at most the upstream faults the
//!    providers produced: no caller's own settings (a 1 ms per-try
//!    timeout, a short deadline, a cancellation) count against the shared
//!    breaker;
//! 8. pools: no request goes to a member while it cools down (after a 429
//!    or an overload, for its Retry-After capped at 30 s, else at least
//!    1 s), while its answer said its requests are spent, or after its
//!    key was refused (dead keys stay dead);
//! 9. pools: a pool with one healthy member serves every call that fits
//!    the deadline. A member is *healthy* when the scenario scripts it
//!    never to fail: every answer whole, its first content within 35 ms
//!    (at most 20 ms of latency, chunks at most 10 ms apart: inside every
//!    limit an operator draws, per-try at least 50 ms, idle at least
//!    20 ms), the whole answer within 150 ms, and never a spent rate
//!    limit, so it is always allowed. Of the pools drawn, 40 % have one.
//!    A call *fits the deadline* when all of these hold:
//!    - it names the pool's provider and its chain has no fallback hop (a
//!      fallback may legitimately take over from the pool: a silent
//!      member fails over to the next hop at once);
//!    - its caller did not cancel it;
//!    - its own limits let the healthy member answer and be reached: a
//!      per-try timeout and a first-token timeout (the call's or the
//!      provider's) of at least 50 ms, and at least as many attempts as
//!      the pool has members (the gate sends a hop's attempts to members
//!      it has not tried while one is allowed, so the healthy one is
//!      reached by then; a caller that retries itself gets one attempt);
//!    - its deadline, if it has one, is at least
//!      `(members - 1) * (per_try + max(max_backoff, max_retry_after) +
//!      300 ms) + 250 ms`: each other member may take a whole attempt (a
//!      stall runs to the per-try timeout; a stream it committed may run
//!      up to 300 ms more, its chunks then an idle timeout, before it
//!      breaks) and then the longest wait the
//!      gate takes (a backoff, or a Retry-After it agrees to wait for),
//!      and the healthy member its whole answer. Nothing else may take
//!      time: the pool never waits for a member (the healthy one is
//!      always allowed) and the breaker never refuses (10).
//!
//!    Such a call must end OK. The only excused failures: (a) the call
//!    ended with an upstream error its policy does not retry (a class
//!    never retried, the upstream's `x-should-retry: false`, a class
//!    outside the operator's `retry_on` or the caller's `x-retry-on`):
//!    the upstream's verdict on the request, which the gateway does not
//!    put to another member. A refused key (401/403, `auth`) is not such
//!    a verdict: it is the member's, whose key is then dead, and the gate
//!    puts the call to another member at once whatever the class's retry
//!    rules say (neither `x-should-retry`, nor the operator's `retry_on`,
//!    nor an `x-retry-on` list without `auth` stops it; the healthy
//!    member is always allowed, so there is one to go to). A refused key
//!    excuses the failure only when the call could not move at that
//!    instant: its caller asked for no retries at all (`x-retry-on:
//!    none`), or the hop's attempts were spent (the refused attempt and
//!    any hedge beside it counted), or the retry budget was spent (as the
//!    provider's log rebuilds it at that instant; a call another call
//!    made at the same instant counts whichever way spends it); (b) the
//!    healthy member was never tried and the retry budget refused a
//!    retry: a limit the operator set, not the pool's doing; (c) a stream
//!    another member committed (it delivered content first, maybe while
//!    the healthy member's hedge still ran) broke after that content:
//!    past its commit point a stream belongs to the resume settings
//!    (`x-stream-resume`, `max_resumes`, the budget), whose continuations
//!    may go to any member that is allowed, and invariant 5 checks what
//!    it delivered. A refused key is no excuse while the healthy
//!    member's attempt of the same call runs beside it in a hedge race:
//!    the race leaves a pool member's refused key to the other attempt
//!    (`race` in `server/src/registry/attempts.rs`; first seen broken
//!    with `SIM_SEED=13166617448295559382`). Neither a deadline, nor the
//!    breaker, nor spent attempts, nor another member's long Retry-After
//!    excuses one;
//! 10. pools: the breaker opens only when all members are unavailable.
//!     Each time a pool's breaker opens (from closed or half-open), every
//!     member is, at that instant, *unavailable*: cooling, paced or dead,
//!     as `ListProviders` lists it, or *failing*: its latest settled
//!     attempt (the one whose fault opened the breaker included) ended in
//!     an upstream fault and it has not served since (see
//!     `server/src/registry/pool.rs`). Independently of the pool's own
//!     account, a pool with a healthy member (9) never opens its breaker:
//!     that member can always serve, as the scenario's script knows.
//! 11. p95 hedges: a provider with `hedge_after_ms = "p95"` hedges a slow
//!     first attempt after the p95 of its recent times to first content,
//!     at least 100 ms, once it has seen 50 (`MIN_P95_SAMPLES`,
//!     `MIN_P95_HEDGE_MS`). So before the scenario's calls each such
//!     provider is warmed up: 50 to 58 calls at once (one provider in ten
//!     gets 49, too few), completions and one in ten a stream (its sample
//!     is taken at its commit point), with no deadline, override or
//!     fallback, each scripted to answer whole, its first
//!     content after a drawn 1 ms or more, below the provider's per-try
//!     and first-token timeouts; the simulation computes their p95 as the
//!     registry does. Then one *probe* per provider, all at once, each
//!     alone on its provider: a call drawn like the scenario's
//!     (overrides, deadline, cancellation, `x-hedge-after-ms`, a caller
//!     that retries) but with no fallback, its first upstream call
//!     scripted to give its first content after a drawn time below the
//!     per-try timeout (mostly after the p95 wait), every later one within
//!     50 ms. Its hedge delay `D` is the operator's limits applied to its
//!     `x-hedge-after-ms` and `max(p95, 100 ms)` (none with too few
//!     samples), and its first attempt's outcome comes at
//!     `O = min(first content, the attempt's limit)` (the deadline, the
//!     first-token or the per-try timeout, as the gate sets it). The probe
//!     must get a hedge, its second upstream call, exactly at `D` (in a
//!     pool, to another member) when `O` is later than `D`, it has at
//!     least two attempts (a caller that retries itself may get one), its
//!     deadline leaves at least a useful attempt (`min(per_try, 50 ms)`)
//!     after `D`, its caller has not cancelled it by `D`, and the retry
//!     budget, rebuilt from the provider's log, allows a retry at `D`:
//!     nothing else can refuse it, the breaker being closed and every
//!     member allowed after a warm-up that only succeeded and reported no
//!     spent limits (checked). Otherwise no upstream call of the probe but
//!     its first comes before `O`: no hedge is sent before its wait, nor
//!     when it is not due. Within 1 ms of a tie (`O`, the deadline's margin
//!     or the cancellation against `D`) only that no upstream call but the
//!     first comes before `min(O, D)` is checked. The clock then moves on
//!     4 s, past every budget and breaker window, before the scenario's
//!     calls. Warm-up and probe calls count in every other invariant (the
//!     budgets, breakers and pools they touched, the attempt logs,
//!     deadlines, streams' text), except 9: their upstream answers are
//!     their scripts', not a healthy member's (they leave it healthy:
//!     never failing, cooling or paced), and they are not the scenario's
//!     calls.
//!
//! A failing scenario names its seed; `SIM_SEED=<seed>` replays it alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{StreamExt, stream};
use provider_gateway_server::Registry;
use provider_gateway_server::chat::{
    ChatRequest, ChatResponse, Content, Message, Role, StopReason, StreamEvent, Usage,
};
use provider_gateway_server::config::{
    Balance, BreakerConfig, FallbackHop, MemberConfig, ResilienceConfig, ResumeMode,
};
use provider_gateway_server::error::{ErrorClass, GatewayError, ProviderError};
use provider_gateway_server::providers::{EventStream, Provider};
use provider_gateway_server::registry::{
    CallOptions, MIN_P95_HEDGE_MS, MIN_P95_SAMPLES, MemberSummary, RegisteredProvider,
};
use provider_gateway_server::retry::{
    BreakerState, Clock, RetryLimits, RetryOverride, RetryPolicy, Transition, is_retryable,
    min_useful_attempt,
};
use tokio::time::Instant;

/// splitmix64: small, seedable, good enough to draw scenarios.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 99) < percent
    }

    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() as u64 - 1) as usize]
    }
}

/// The outcome of one scenario.
#[derive(Debug, Default)]
pub struct Report {
    pub calls: u64,
    pub upstream_calls: u64,
    /// Providers with a pool, and of them those with a healthy member (9).
    pub pools: u64,
    pub healthy_pools: u64,
    /// Calls that fit the deadline on a pool with a healthy member (9),
    /// and of them those that ended OK.
    pub healthy_calls: u64,
    pub healthy_served: u64,
    /// Times a pool's breaker opened, each checked (10).
    pub pool_openings: u64,
    /// Calls that fit the deadline (9) in which a member refused its key,
    /// of them those served all the same, and those whose failure the
    /// refused key excused (the call could not move to another member).
    pub keys_refused: u64,
    pub keys_refused_served: u64,
    pub keys_refused_excused: u64,
    /// Warm-up calls and probes (11); probes that had to get a hedge at
    /// the wait and got it, of them those whose wait was the p95 itself
    /// (past the 100 ms floor, no `x-hedge-after-ms`); probes that must
    /// not have got one (none due, checked); probes at a tie.
    pub p95_warmups: u64,
    pub p95_probes: u64,
    pub p95_hedged: u64,
    pub p95_hedged_past_floor: u64,
    pub p95_unhedged: u64,
    pub p95_ties: u64,
    /// Streams continued by another provider than the one that broke.
    pub cross_hop_resumes: u64,
    /// Streams continued (any provider) and started over.
    pub resumes: u64,
    pub restarts: u64,
    pub violations: Vec<String>,
}

// === the scripted provider ===

/// What one upstream call does.
#[derive(Debug, Clone)]
enum Script {
    /// Answer fully after `latency`, chunks `gap` apart, with keep-alives.
    Ok {
        latency: Duration,
        gap: Duration,
        pings: bool,
    },
    /// Fail after `latency`.
    Fail {
        latency: Duration,
        error: ProviderError,
    },
    /// Never answer.
    Stall,
    /// Deliver `after` chunks of text, then one of the breaks.
    Break {
        after: usize,
        gap: Duration,
        how: Break,
    },
}

#[derive(Debug, Clone)]
enum Break {
    Cut,
    Stall,
    Truncate,
    Event(ErrorClass),
}

/// One upstream call as the provider saw it.
#[derive(Debug, Clone)]
struct Seen {
    call: u64,
    /// The pool member called (0 for a provider of one).
    member: usize,
    at: Instant,
    /// Made after its call's stream committed: a continuation or a
    /// restart, which draws from the budget even as a hop's first call.
    after_commit: bool,
}

impl Seen {
    /// Whether it deposits into its provider's budget (a hop's first
    /// attempt) rather than draws from it, given the calls `deposited`
    /// before it on the same provider (updated).
    fn deposits(&self, deposited: &mut std::collections::HashSet<u64>) -> bool {
        !self.after_commit && deposited.insert(self.call)
    }
}

#[derive(Debug, Default)]
struct ProviderLog {
    seen: Vec<Seen>,
    /// Upstream faults produced (by the operator's own limits).
    faults: u64,
    /// When the provider's retry budget started counting: the scenario
    /// touches every budget once as it starts, so its one-second slots
    /// are known (3), whatever touches it first later.
    budget_origin: Option<Instant>,
    /// The calls a member refused the key of (a 401 answered): the call,
    /// the member, when.
    refused_keys: Vec<(u64, usize, Instant)>,
    /// The scripts of the warm-up and probe calls (11), by call id.
    scripts: HashMap<u64, Scripted>,
    violations: Vec<String>,
}

/// What every upstream call of a warm-up or probe call does (11): its
/// first one `first`, every later one `later`. Never a fault.
#[derive(Debug, Clone)]
struct Scripted {
    first: Option<Script>,
    later: Script,
}

impl Scripted {
    fn next(&mut self) -> Script {
        self.first.take().unwrap_or_else(|| self.later.clone())
    }
}

/// An answer whose first content comes `first` after the call (its
/// latency and, for a stream, one gap of at most `gap`; no keep-alive).
fn answers_after(first: Duration, gap: Duration) -> Script {
    let gap = gap.min(first);
    Script::Ok {
        latency: first - gap,
        gap,
        pings: false,
    }
}

/// What a pool must know of one member: when the sim made it cool down
/// (a 429 or an overload: for its Retry-After, capped at 30 s, else at
/// least 1 s) or killed its key (a 401). Only for members of a pool.
#[derive(Debug, Default)]
struct Watch {
    pooled: bool,
    dead: bool,
    cooling_until: Option<Instant>,
    /// Its answer said its requests are spent until then.
    paced_until: Option<Instant>,
}

impl Watch {
    fn failed(&mut self, error: &ProviderError) {
        if !self.pooled {
            return;
        }
        match error.class {
            ErrorClass::RateLimited | ErrorClass::Overloaded => {
                let wait = error
                    .retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(30));
                self.cooling_until = Instant::now().checked_add(wait);
            }
            ErrorClass::Auth => self.dead = true,
            _ => {}
        }
    }
}

struct SimProvider {
    /// Pool invariants: no call to a cooling or dead member.
    watch: Arc<Mutex<Watch>>,
    /// Its index in its pool.
    member: usize,
    /// Scripted never to fail nor to report a spent limit (invariant 9).
    healthy: bool,
    rng: Mutex<Rng>,
    /// The operator's limits, to know which behaviours are faults.
    per_try: Duration,
    idle: Duration,
    /// Percent of calls that fail.
    fault_rate: u64,
    /// A pool member whose key was revoked: every answer a 401.
    revoked: bool,
    log: Arc<Mutex<ProviderLog>>,
}

/// The whole answer every provider gives call `call` (so any hop can
/// continue what another delivered): words, with spaces and paragraph
/// breaks, so breaks fall after whitespace too.
fn answer(call: u64) -> Vec<String> {
    let words = 3 + (call % 5) as usize;
    (0..words)
        .map(|i| {
            let sep = match (call + i as u64) % 4 {
                0 => " ",
                1 => "\n\n",
                2 => "",
                _ => "  ",
            };
            format!("w{call}-{i}{sep}")
        })
        .collect()
}

fn call_id(request: &ChatRequest) -> u64 {
    request
        .messages
        .first()
        .and_then(|m| m.content.first())
        .and_then(|c| match c {
            Content::Text(t) => t.strip_prefix("call-")?.parse().ok(),
            _ => None,
        })
        .unwrap_or(u64::MAX)
}

fn prefill(request: &ChatRequest) -> Option<String> {
    let last = request.messages.last()?;
    if last.role != Role::Assistant {
        return None;
    }
    Some(
        last.content
            .iter()
            .map(|c| match c {
                Content::Text(t) => t.as_str(),
                _ => "",
            })
            .collect(),
    )
}

impl SimProvider {
    /// Sometimes an answer says its requests, or its tokens, are spent for
    /// a while (the pool must then leave the member alone until then).
    fn maybe_spent(&self) {
        if self.healthy {
            return;
        }
        let (reset, tokens) = {
            let mut rng = match self.rng.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if !rng.chance(8) {
                return;
            }
            (rng.ms(1, 400), rng.chance(50))
        };
        let spent = Some((0, reset));
        provider_gateway_server::providers::report_rate_limits(
            provider_gateway_server::providers::RateLimits {
                requests: if tokens { None } else { spent },
                tokens: if tokens { spent } else { None },
            },
        );
        if let Ok(mut w) = self.watch.lock()
            && w.pooled
        {
            w.paced_until = Instant::now().checked_add(reset);
        }
    }

    /// What upstream call of `call` does now: its script, for a warm-up
    /// or probe call (`true`), else a draw.
    fn script(&self, call: u64, streaming: bool) -> (Script, bool) {
        let scripted = match self.log.lock() {
            Ok(mut log) => log.scripts.get_mut(&call).map(Scripted::next),
            Err(_) => None,
        };
        match scripted {
            Some(script) => (script, true),
            None => (self.draw(streaming), false),
        }
    }

    /// An upstream failure is answered: the pool's watch, and the log of
    /// refused keys.
    fn failed(&self, call: u64, error: &ProviderError) {
        if let Ok(mut w) = self.watch.lock() {
            w.failed(error);
        }
        if error.class == ErrorClass::Auth
            && let Ok(mut log) = self.log.lock()
        {
            log.refused_keys.push((call, self.member, Instant::now()));
        }
    }

    fn draw(&self, streaming: bool) -> Script {
        let mut rng = match self.rng.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if self.healthy {
            // First content within 35 ms, the whole answer within 150 ms.
            return Script::Ok {
                latency: rng.ms(0, HEALTHY_LATENCY_MS),
                gap: rng.ms(0, HEALTHY_GAP_MS),
                pings: rng.chance(30),
            };
        }
        if self.revoked {
            let mut error = ProviderError::new(ErrorClass::Auth, "scripted: revoked key");
            // Whatever the upstream says, a refused key goes elsewhere (9).
            error.should_retry = match rng.range(0, 2) {
                0 => Some(false),
                1 => Some(true),
                _ => None,
            };
            return Script::Fail {
                latency: rng.ms(0, 40),
                error,
            };
        }
        let latency = if rng.chance(85) {
            rng.ms(0, 40)
        } else {
            rng.ms(0, 700)
        };
        if !rng.chance(self.fault_rate) {
            return Script::Ok {
                latency,
                gap: rng.ms(0, 15),
                pings: rng.chance(30),
            };
        }
        match rng.range(0, 9) {
            0 => Script::Stall,
            1..=2 if streaming => Script::Break {
                after: rng.range(0, 4) as usize,
                gap: rng.ms(0, 15),
                how: match rng.range(0, 3) {
                    0 => Break::Cut,
                    1 => Break::Stall,
                    2 => Break::Truncate,
                    _ => Break::Event(rng.pick(&[
                        ErrorClass::Overloaded,
                        ErrorClass::ServerError,
                        ErrorClass::RateLimited,
                        ErrorClass::InvalidRequest,
                    ])),
                },
            },
            _ => {
                let class = rng.pick(&[
                    ErrorClass::RateLimited,
                    ErrorClass::RateLimited,
                    ErrorClass::Overloaded,
                    ErrorClass::ServerError,
                    ErrorClass::Timeout,
                    ErrorClass::Connection,
                    ErrorClass::InvalidRequest,
                    ErrorClass::Auth,
                    ErrorClass::ContextLength,
                ]);
                let mut error = ProviderError::new(class, "scripted");
                error.retry_after = match rng.range(0, 5) {
                    0 => Some(rng.ms(0, 300)),
                    1 => Some(Duration::from_secs(86_400)),
                    2 => Some(Duration::MAX),
                    _ => None,
                };
                error.should_retry = match rng.range(0, 5) {
                    0 => Some(true),
                    1 => Some(false),
                    _ => None,
                };
                Script::Fail { latency, error }
            }
        }
    }

    /// Notes the call; returns its id and the text it must produce (after
    /// the prefill of a continuation).
    fn begin(&self, request: &ChatRequest) -> (u64, String) {
        let call = call_id(request);
        let full: String = answer(call).concat();
        let mut log = match self.log.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        log.seen.push(Seen {
            call,
            member: self.member,
            at: Instant::now(),
            after_commit: CALL
                .try_with(|c| c.committed.load(Ordering::Relaxed))
                .unwrap_or(false),
        });
        if let Ok(w) = self.watch.lock() {
            if w.dead {
                log.violations.push(format!(
                    "call {call}: a pool member whose key was refused was called again"
                ));
            }
            if w.cooling_until.is_some_and(|t| Instant::now() < t) {
                log.violations.push(format!(
                    "call {call}: a pool member was called while it cooled down"
                ));
            }
            if w.paced_until.is_some_and(|t| Instant::now() < t) {
                log.violations.push(format!(
                    "call {call}: a pool member was called while its requests were spent"
                ));
            }
        }
        let rest = match prefill(request) {
            None => full,
            Some(p) => {
                if p != p.trim_end() {
                    log.violations.push(format!(
                        "call {call}: a continuation's prefill ends in whitespace: {p:?}"
                    ));
                }
                match full.strip_prefix(p.as_str()) {
                    Some(rest) => rest.to_string(),
                    None => {
                        log.violations.push(format!(
                            "call {call}: prefill {p:?} is not a prefix of {full:?}"
                        ));
                        String::new()
                    }
                }
            }
        };
        (call, rest)
    }

    fn fault(&self) {
        if let Ok(mut log) = self.log.lock() {
            log.faults += 1;
        }
    }

    fn counts_as_fault(&self, script: &Script) -> bool {
        match script {
            // The first content comes after the latency and a gap and a half.
            Script::Ok { latency, gap, .. } => *latency + *gap * 2 >= self.per_try,
            Script::Fail { latency, error } => {
                *latency >= self.per_try
                    || provider_gateway_server::retry::is_upstream_fault(error.class)
            }
            Script::Stall => true,
            Script::Break { gap, how, .. } => {
                *gap >= self.idle.min(self.per_try)
                    || match how {
                        Break::Cut | Break::Stall | Break::Truncate => true,
                        Break::Event(class) => {
                            provider_gateway_server::retry::is_upstream_fault(*class)
                        }
                    }
            }
        }
    }
}

/// Splits `text` into the chunks a stream delivers (about a word each).
fn chunks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        current.push(c);
        if c == ' ' || c == '\n' {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

impl Provider for SimProvider {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn default_model(&self) -> &str {
        "sim-1"
    }

    fn supports_prefill(&self) -> bool {
        true
    }

    fn complete<'a>(
        &'a self,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        let (call, text) = self.begin(request);
        let (script, scripted) = self.script(call, false);
        if self.counts_as_fault(&script) {
            self.fault();
        }
        Box::pin(async move {
            match script {
                Script::Ok { latency, .. } => {
                    tokio::time::sleep(latency).await;
                    provider_gateway_server::providers::mark_responded();
                    if !scripted {
                        self.maybe_spent();
                    }
                    Ok(ChatResponse {
                        id: "sim".into(),
                        model: "sim-1".into(),
                        content: vec![Content::Text(text)],
                        stop_reason: StopReason::EndTurn,
                        usage: Usage {
                            input_tokens: 3,
                            output_tokens: 5,
                        },
                    })
                }
                Script::Fail { latency, error } => {
                    tokio::time::sleep(latency).await;
                    provider_gateway_server::providers::mark_responded();
                    self.failed(call, &error);
                    Err(error)
                }
                // A route that sends nothing: a timeout here is silent.
                Script::Stall | Script::Break { .. } => std::future::pending().await,
            }
        })
    }

    fn stream<'a>(
        &'a self,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<EventStream, ProviderError>> {
        let (call, text) = self.begin(request);
        let (script, scripted) = self.script(call, true);
        if self.counts_as_fault(&script) {
            self.fault();
        }
        Box::pin(async move {
            let parts = chunks(&text);
            let (latency, gap, pings, cut) = match script {
                Script::Ok {
                    latency,
                    gap,
                    pings,
                } => (latency, gap, pings, None),
                Script::Fail { latency, error } => {
                    tokio::time::sleep(latency).await;
                    self.failed(call, &error);
                    return Err(error);
                }
                Script::Stall => std::future::pending().await,
                Script::Break { after, gap, how } => {
                    (Duration::ZERO, gap, false, Some((after, how)))
                }
            };
            tokio::time::sleep(latency).await;
            // The answer's headers arrive now, with its rate limits.
            provider_gateway_server::providers::mark_responded();
            if !scripted {
                self.maybe_spent();
            }
            let mut events: Vec<(Duration, Option<Result<StreamEvent, ProviderError>>)> = vec![(
                Duration::ZERO,
                Some(Ok(StreamEvent::Start {
                    id: "sim".into(),
                    model: "sim-1".into(),
                })),
            )];
            let deliver = cut
                .as_ref()
                .map_or(parts.len(), |(after, _)| (*after).min(parts.len()));
            for part in parts.iter().take(deliver) {
                if pings {
                    events.push((gap / 2, Some(Ok(StreamEvent::KeepAlive))));
                }
                events.push((
                    gap,
                    Some(Ok(StreamEvent::Text {
                        index: 0,
                        text: part.clone(),
                    })),
                ));
            }
            match cut {
                None => {
                    events.push((
                        gap,
                        Some(Ok(StreamEvent::Usage(Usage {
                            input_tokens: 3,
                            output_tokens: deliver as u32,
                        }))),
                    ));
                    events.push((gap, Some(Ok(StreamEvent::Stop(StopReason::EndTurn)))));
                }
                Some((_, Break::Cut)) => events.push((
                    gap,
                    Some(Err(ProviderError::new(
                        ErrorClass::StreamInterrupted,
                        "scripted cut",
                    ))),
                )),
                Some((_, Break::Event(class))) => {
                    events.push((gap, Some(Err(ProviderError::new(class, "scripted event")))))
                }
                Some((_, Break::Truncate)) => {}
                Some((_, Break::Stall)) => events.push((gap, None)),
            }
            let watch = self.watch.clone();
            let s = stream::unfold(
                (events.into_iter(), watch),
                |(mut events, watch)| async move {
                    let (wait, item) = events.next()?;
                    tokio::time::sleep(wait).await;
                    match item {
                        Some(item) => {
                            if let (Err(error), Ok(mut w)) = (&item, watch.lock()) {
                                w.failed(error);
                            }
                            Some((item, (events, watch)))
                        }
                        None => std::future::pending().await,
                    }
                },
            );
            Ok(Box::pin(s) as EventStream)
        })
    }
}

// === the clock: checks every wait against the call's deadline ===

#[derive(Debug, Clone)]
struct CallInfo {
    deadline: Option<Instant>,
    min_useful: Duration,
    violations: Arc<Mutex<Vec<String>>>,
    id: u64,
    /// Its stream committed: every later upstream call is a rescue (3).
    committed: Arc<std::sync::atomic::AtomicBool>,
}

tokio::task_local! {
    static CALL: CallInfo;
}

#[derive(Debug)]
struct SimClock;

impl Clock for SimClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let _ = CALL.try_with(|call| {
            if let Some(deadline) = call.deadline
                && Instant::now()
                    .checked_add(duration.saturating_add(call.min_useful))
                    .is_none_or(|end| end > deadline + Duration::from_millis(1))
            {
                push(
                    &call.violations,
                    format!(
                        "call {}: a wait of {duration:?} started with {:?} left",
                        call.id,
                        deadline.saturating_duration_since(Instant::now())
                    ),
                );
            }
        });
        Box::pin(tokio::time::sleep(duration))
    }
}

fn push(violations: &Mutex<Vec<String>>, v: String) {
    if let Ok(mut list) = violations.lock() {
        list.push(v);
    }
}

// === scenario ===

struct SimSetup {
    name: String,
    policy: RetryPolicy,
    resilience: ResilienceConfig,
    log: Arc<Mutex<ProviderLog>>,
    /// Its pool's size (1: no pool).
    members: usize,
    /// The pool's healthy member, when it has one (invariant 9).
    healthy: Option<usize>,
}

/// A healthy member's longest latency and gap between chunks: its first
/// content comes within 35 ms (latency, half a gap to a keep-alive, a
/// gap), below the least per-try timeout drawn (50 ms), and its gaps stay
/// below the least idle timeout drawn (20 ms).
const HEALTHY_LATENCY_MS: u64 = 20;
const HEALTHY_GAP_MS: u64 = 10;
/// The least per-try and first-token timeouts of a call that fits (9).
const HEALTHY_LIMIT: Duration = Duration::from_millis(50);
/// More than a healthy member's whole answer (at most 150 ms).
const HEALTHY_ANSWER: Duration = Duration::from_millis(250);
/// More than a stream another member committed may run before it breaks
/// (four chunks at most 15 ms apart, then at most a 200 ms idle timeout).
const COMMITTED_TAIL: Duration = Duration::from_millis(300);

fn draw_provider(rng: &mut Rng, index: usize, count: usize) -> (SimSetup, Vec<Arc<SimProvider>>) {
    let name = format!("p{index}");
    let initial = rng.ms(0, 50);
    // The operator's retry_on: every transient class, or (one provider in
    // five) only some of them.
    let mut retry_on = RetryPolicy::default().retry_on;
    if rng.chance(20) {
        retry_on.retain(|_| rng.chance(70));
    }
    let policy = RetryPolicy {
        max_attempts: rng.range(1, 4) as u32,
        initial_backoff: initial,
        max_backoff: initial + rng.ms(0, 200),
        backoff_multiplier: rng.pick(&[1.0, 1.5, 2.0, 3.0]),
        retry_on,
        single_attempt_when_client_retries: rng.chance(80),
        per_try_timeout: rng.ms(50, 500),
        max_retry_after: rng.ms(100, 1_000),
        stream_idle_timeout: rng.ms(20, 200),
        first_token_timeout: rng.chance(20).then(|| rng.ms(10, 300)),
        budget_ratio: rng.pick(&[0.0, 0.1, 0.2, 0.5]),
        budget_min_per_second: rng.pick(&[0.0, 1.0, 5.0]),
        budget_window: Duration::from_secs(rng.range(1, 3)),
        ..RetryPolicy::default()
    };
    let breaker = rng.chance(70).then(|| {
        let cooldown = rng.range(10, 200);
        BreakerConfig {
            failure_ratio: rng.pick(&[0.25, 0.5, 0.9]),
            min_requests: rng.range(2, 5) as u32,
            window_ms: rng.range(1, 3) * 1_000,
            consecutive_failures: rng.range(0, 3) as u32,
            cooldown_ms: cooldown,
            max_cooldown_ms: cooldown + rng.range(0, 400),
            half_open_probes: rng.range(1, 2) as u32,
        }
    });
    let fallback = (0..count)
        .filter(|&i| i != index && rng.chance(50))
        .map(|i| FallbackHop::Name(format!("p{i}")))
        .collect();
    let resilience = ResilienceConfig {
        breaker,
        fallback,
        stream_resume: rng.pick(&[ResumeMode::Off, ResumeMode::Continue, ResumeMode::Restart]),
        max_resumes: rng.range(0, 2) as u32,
        hedge_after_ms: rng.chance(25).then(|| rng.range(5, 100)),
        hedge_p95: rng.chance(10),
        context_window: rng.chance(30).then(|| rng.range(1, 4) as u32 * 1_000),
    };
    let log = Arc::new(Mutex::new(ProviderLog::default()));
    // A pool of one to three members (endpoint and key pairs), each with
    // its own faults, all counted in the provider's log.
    let members = if rng.chance(30) { rng.range(2, 3) } else { 1 };
    // Invariant 9: often enough, one member of a pool never fails.
    let healthy = (members > 1 && rng.chance(40)).then(|| rng.range(0, members - 1) as usize);
    let provider = (0..members)
        .map(|m| {
            let mut own = Rng::new(rng.next_u64());
            // Of the other pool members, 15 % have a revoked key (9).
            let revoked = members > 1 && healthy != Some(m as usize) && own.chance(15);
            Arc::new(SimProvider {
                watch: Arc::new(Mutex::new(Watch {
                    pooled: members > 1,
                    ..Watch::default()
                })),
                member: m as usize,
                healthy: healthy == Some(m as usize),
                rng: Mutex::new(own),
                per_try: policy.per_try_timeout,
                idle: policy.stream_idle_timeout,
                fault_rate: rng.pick(&[0, 10, 30, 60, 100]),
                revoked,
                log: log.clone(),
            })
        })
        .collect();
    (
        SimSetup {
            name,
            policy,
            resilience,
            log,
            members: members as usize,
            healthy,
        },
        provider,
    )
}

/// What one simulated call asks for.
#[derive(Debug, Clone)]
struct CallPlan {
    id: u64,
    stream: bool,
    start: Duration,
    provider: String,
    timeout: Option<Duration>,
    overrides: RetryOverride,
    previous_attempts: u32,
    hedge_after: Option<Duration>,
    stream_resume: Option<ResumeMode>,
    fallback: Option<Vec<String>>,
    cancel_after: Option<Duration>,
    first_token_timeout: Option<Duration>,
    cannot_restart: bool,
    phase: Phase,
}

/// Which part of a scenario a call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A p95 provider's warm-up (11).
    Warmup,
    /// A p95 provider's probe, after its warm-up (11).
    Probe,
    /// The scenario's own calls.
    Scenario,
}

/// How one call ran.
#[derive(Debug)]
struct CallRun {
    plan: CallPlan,
    /// `None`: its caller cancelled it.
    outcome: Option<Ended>,
    /// When it entered the registry, and how long it took from then.
    started: Instant,
    took: Duration,
}

fn draw_call(rng: &mut Rng, id: u64, providers: usize) -> CallPlan {
    let mut overrides = RetryOverride::default();
    if rng.chance(25) {
        overrides.max_attempts = Some(rng.range(1, 5) as u32);
    }
    if rng.chance(20) {
        overrides.per_try_timeout = Some(rng.ms(1, 300));
    }
    if rng.chance(15) {
        overrides.retry_on = Some(match rng.range(0, 3) {
            0 => vec![],
            1 => vec![ErrorClass::RateLimited],
            // `timeout` also covers `timeout-silent`.
            2 => vec![ErrorClass::Timeout],
            _ => vec![ErrorClass::StreamInterrupted, ErrorClass::Overloaded],
        });
    }
    if rng.chance(10) {
        overrides.initial_backoff = Some(rng.ms(0, 100));
    }
    if rng.chance(10) {
        overrides.max_backoff = Some(rng.ms(0, 300));
    }
    if rng.chance(10) {
        overrides.backoff_multiplier = Some(rng.pick(&[1.0, 2.5]));
    }
    CallPlan {
        id,
        stream: rng.chance(55),
        start: rng.ms(0, 1_500),
        provider: format!("p{}", rng.range(0, providers as u64 - 1)),
        timeout: rng.chance(60).then(|| rng.ms(1, 3_000)),
        overrides,
        previous_attempts: if rng.chance(10) { 1 } else { 0 },
        hedge_after: rng.chance(15).then(|| rng.ms(0, 100)),
        stream_resume: match rng.range(0, 4) {
            0 => Some(ResumeMode::Continue),
            1 => Some(ResumeMode::Off),
            2 => Some(ResumeMode::Restart),
            _ => None,
        },
        first_token_timeout: rng.chance(10).then(|| rng.ms(1, 200)),
        cannot_restart: rng.chance(20),
        fallback: rng.chance(15).then(|| {
            (0..providers)
                .filter(|_| rng.chance(50))
                .map(|i| format!("p{i}"))
                .collect()
        }),
        cancel_after: rng.chance(15).then(|| rng.ms(0, 800)),
        phase: Phase::Scenario,
    }
}

/// How one call ended, as its caller saw it.
#[derive(Debug)]
enum Ended {
    Completed {
        attempts: u32,
        text: String,
    },
    Streamed {
        attempts: u32,
        /// (continuations, of which by another provider, restarts)
        rescues: (u64, u64, u64),
        text: String,
        stops: usize,
        stop_last: bool,
    },
    StreamFailed {
        text: String,
        error: GatewayError,
    },
    Failed(GatewayError),
}

async fn run_call(registry: Arc<Registry>, plan: CallPlan, request: ChatRequest) -> Ended {
    let options = CallOptions {
        provider: plan.provider.clone(),
        timeout: plan.timeout,
        overrides: plan.overrides.clone(),
        client_previous_attempts: plan.previous_attempts,
        limits: None,
        fallback: plan.fallback.clone(),
        stream_resume: plan.stream_resume,
        hedge_after: plan.hedge_after,
        allowed_providers: None,
        first_token_timeout: plan.first_token_timeout,
        cannot_restart: plan.cannot_restart,
    };
    if !plan.stream {
        return match registry.complete(&request, &options).await {
            Ok(done) => Ended::Completed {
                attempts: done.attempts,
                text: done
                    .response
                    .content
                    .iter()
                    .map(|c| match c {
                        Content::Text(t) => t.as_str(),
                        _ => "",
                    })
                    .collect(),
            },
            Err(e) => Ended::Failed(e),
        };
    }
    let open = match registry.stream(&request, &options).await {
        Ok(open) => open,
        Err(e) => return Ended::Failed(e),
    };
    // From now on an upstream call of this call is a rescue (3).
    let _ = CALL.try_with(|c| c.committed.store(true, Ordering::Relaxed));
    let mut attempts = open.attempt;
    let mut serving = open.provider.clone();
    let mut rescues = (0, 0, 0);
    let mut events = open.events;
    let (mut text, mut stops, mut stop_last) = (String::new(), 0, false);
    while let Some(item) = events.next().await {
        match item {
            Ok(event) => {
                stop_last = matches!(event, StreamEvent::Stop(_));
                match event {
                    StreamEvent::Text { text: t, .. } => text.push_str(&t),
                    StreamEvent::Stop(_) => stops += 1,
                    StreamEvent::Resumed {
                        attempt, provider, ..
                    } => {
                        attempts = attempt;
                        rescues.0 += 1;
                        if provider != serving {
                            rescues.1 += 1;
                            serving = provider;
                        }
                    }
                    // The answer starts over: what came before is void.
                    StreamEvent::Restarted { attempt, provider } => {
                        attempts = attempt;
                        rescues.2 += 1;
                        serving = provider;
                        text.clear();
                    }
                    _ => {}
                }
            }
            Err(error) => {
                return Ended::StreamFailed { text, error };
            }
        }
    }
    Ended::Streamed {
        attempts,
        rescues,
        text,
        stops,
        stop_last,
    }
}

/// Runs scenario `seed`; returns what it saw.
pub fn run_scenario(seed: u64) -> Report {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return Report {
                violations: vec![format!("no runtime: {e}")],
                ..Report::default()
            };
        }
    };
    runtime.block_on(scenario(seed))
}

async fn scenario(seed: u64) -> Report {
    let mut rng = Rng::new(seed);
    let count = rng.range(1, 3) as usize;
    let violations = Arc::new(Mutex::new(Vec::new()));
    let openings = Arc::new(AtomicU64::new(0));
    let mut setups = Vec::new();
    let mut registered = Vec::new();
    for i in 0..count {
        let (setup, members) = draw_provider(&mut rng, i, count);
        let balance = rng.pick(&[Balance::P2c, Balance::Weighted, Balance::Ordered]);
        let pool = members
            .iter()
            .enumerate()
            .map(|(m, provider)| {
                let member = MemberConfig {
                    label: format!("{}-{m}", setup.name),
                    host: format!("{}-{m}", setup.name),
                    key_env: Some(format!("KEY_{m}")),
                    weight: 1 + m as u32,
                    config: provider_gateway_server::config::ProviderConfig::Mock(
                        Default::default(),
                    ),
                };
                (member, provider.clone() as Arc<dyn Provider>)
            })
            .collect();
        let mut entry =
            RegisteredProvider::new(&setup.name, members[0].clone(), setup.policy.clone())
                .with_resilience(setup.resilience.clone())
                .with_members(pool, balance);
        if setup.members > 1 {
            entry = entry.with_breaker_watch(watch_openings(
                &setup,
                violations.clone(),
                openings.clone(),
            ));
        }
        registered.push(entry);
        setups.push(setup);
    }
    let limits = RetryLimits {
        min_hedge_after: Duration::from_millis(5),
        // One registry in five refuses callers' hedging requests.
        request_hedging: rng.chance(80),
        ..RetryLimits::default()
    };
    let registry = Arc::new(
        Registry::from_providers(registered, "p0", limits.clone())
            .with_clock(Arc::new(SimClock))
            .with_jitter_seed(rng.next_u64()),
    );
    // Every budget starts counting now (3): a look takes nothing.
    let now = Instant::now();
    for setup in &setups {
        if let Ok(entry) = registry.get(&setup.name) {
            entry.budget.allows(now);
        }
        if let Ok(mut log) = setup.log.lock() {
            log.budget_origin = Some(now);
        }
    }
    let (mut runs, probes) = warm_up(seed, &registry, &setups, &limits, &violations).await;
    let calls = rng.range(1, 8);
    let plans: Vec<CallPlan> = (0..calls)
        .map(|id| draw_call(&mut rng, id, count))
        .collect();
    let origin = Instant::now();
    let tasks: Vec<_> = plans
        .iter()
        .map(|plan| spawn_call(&registry, plan, origin, &setups, &limits, &violations))
        .collect();
    runs.extend(join(tasks, &violations).await);
    let mut report = Report {
        calls: runs.len() as u64,
        pools: setups.iter().filter(|s| s.members > 1).count() as u64,
        healthy_pools: setups.iter().filter(|s| s.healthy.is_some()).count() as u64,
        pool_openings: openings.load(Ordering::Relaxed),
        p95_warmups: runs
            .iter()
            .filter(|r| r.plan.phase == Phase::Warmup)
            .count() as u64,
        ..Report::default()
    };
    check_p95(&mut report, &setups, &limits, &probes, &runs);
    check(&mut report, &registry, &setups, &limits, &runs).await;
    if let Ok(mut v) = violations.lock() {
        report.violations.append(&mut v);
    }
    for setup in &setups {
        if let Ok(mut log) = setup.log.lock() {
            report.violations.append(&mut log.violations);
        }
    }
    report
}

/// A call started on its own task, which returns how it ended, when it
/// entered the registry and how long it took.
type CallTask = (
    CallPlan,
    tokio::task::JoinHandle<(Option<Ended>, Instant, Duration)>,
);

/// Starts `plan` (at `origin + plan.start`) on its own task.
fn spawn_call(
    registry: &Arc<Registry>,
    plan: &CallPlan,
    origin: Instant,
    setups: &[SimSetup],
    limits: &RetryLimits,
    violations: &Arc<Mutex<Vec<String>>>,
) -> CallTask {
    let min_per_try = setups
        .iter()
        .map(|s| plan.overrides.apply(&s.policy, limits).per_try_timeout)
        .min()
        .unwrap_or(Duration::ZERO);
    let info = CallInfo {
        deadline: plan.timeout.map(|t| origin + plan.start + t),
        min_useful: min_per_try.min(Duration::from_millis(50)),
        violations: violations.clone(),
        id: plan.id,
        committed: Arc::default(),
    };
    let request = ChatRequest {
        messages: vec![Message {
            role: Role::User,
            content: vec![Content::Text(format!("call-{}", plan.id))],
        }],
        max_tokens: Some(50),
        ..ChatRequest::default()
    };
    let (registry, plan_c) = (registry.clone(), plan.clone());
    let task = tokio::spawn(async move {
        tokio::time::sleep(plan_c.start).await;
        let started = Instant::now();
        let run = CALL.scope(info, run_call(registry, plan_c.clone(), request));
        let outcome = match plan_c.cancel_after {
            Some(after) => tokio::time::timeout(after, run).await.ok(),
            None => Some(run.await),
        };
        (outcome, started, started.elapsed())
    });
    (plan.clone(), task)
}

/// Waits for every call started by [`spawn_call`].
async fn join(tasks: Vec<CallTask>, violations: &Mutex<Vec<String>>) -> Vec<CallRun> {
    let mut runs = Vec::new();
    for (plan, task) in tasks {
        match task.await {
            Ok((outcome, started, took)) => runs.push(CallRun {
                plan,
                outcome,
                started,
                took,
            }),
            Err(e) if e.is_panic() => push(violations, format!("call {}: panicked", plan.id)),
            Err(e) => push(violations, format!("call {}: task failed: {e}", plan.id)),
        }
    }
    runs
}

/// The first call id of a p95 provider's warm-up (11): far from the
/// scenario's own ids; its probe's is `+ WARMUP_CALLS_MAX`.
fn warmup_base(setup: usize) -> u64 {
    1_000_000 + setup as u64 * 1_000
}

/// The most warm-up calls a p95 provider gets (11).
const WARMUP_CALLS_MAX: u64 = MIN_P95_SAMPLES as u64 + 8;

/// One p95 provider's probe (11): what the simulation expects of it.
#[derive(Debug)]
struct Probe {
    /// Its provider's index in the scenario.
    setup: usize,
    id: u64,
    /// The p95 of the warm-up's times to first content (`None`: too few).
    p95: Option<Duration>,
    /// Its hedge delay, as the registry must compute it.
    delay: Option<Duration>,
    /// When its first upstream call gives its first content.
    first_content: Duration,
}

/// The p95 of `samples` as the registry computes it, once there are
/// [`MIN_P95_SAMPLES`] of them.
fn p95_of(samples: &[Duration]) -> Option<Duration> {
    if samples.len() < MIN_P95_SAMPLES {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let at = (sorted.len() * 95).div_ceil(100).saturating_sub(1);
    Some(sorted[at])
}

/// Invariant 11, the run: warms up every p95 provider (all at once),
/// then sends their probes (all at once, one per provider), then moves
/// the clock 4 s on. Returns the calls' runs and the probes.
async fn warm_up(
    seed: u64,
    registry: &Arc<Registry>,
    setups: &[SimSetup],
    limits: &RetryLimits,
    violations: &Arc<Mutex<Vec<String>>>,
) -> (Vec<CallRun>, Vec<Probe>) {
    let p95_providers: Vec<usize> = (0..setups.len())
        .filter(|&i| setups[i].resilience.hedge_p95)
        .collect();
    if p95_providers.is_empty() {
        return (Vec::new(), Vec::new());
    }
    // Its own draws: the scenario's own calls are the same as without.
    let mut rng = Rng::new(seed ^ 0x0095_0095_0095_0095);
    let quiet = |plan: CallPlan| CallPlan {
        start: Duration::ZERO,
        fallback: Some(Vec::new()),
        ..plan
    };
    let mut plans = Vec::new();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); setups.len()];
    for &i in &p95_providers {
        let setup = &setups[i];
        let policy = &setup.policy;
        // Below the per-try and first-token timeouts, 2 ms to spare.
        let limit = policy
            .first_token_timeout
            .map_or(policy.per_try_timeout, |f| f.min(policy.per_try_timeout));
        let cap = (limit.as_millis() as u64).saturating_sub(2).max(1);
        let typical = rng.range(1, cap);
        let n = if rng.chance(10) {
            MIN_P95_SAMPLES as u64 - 1
        } else {
            rng.range(MIN_P95_SAMPLES as u64, WARMUP_CALLS_MAX)
        };
        let mut scripts = HashMap::new();
        for k in 0..n {
            let id = warmup_base(i) + k;
            // From 1 ms: no sample is taken before every warm-up entered.
            let first = Duration::from_millis(if rng.chance(85) {
                rng.range(1, typical)
            } else {
                rng.range(1, cap)
            });
            let stream = rng.chance(10);
            let gap = if stream {
                rng.ms(0, 10)
            } else {
                Duration::ZERO
            };
            let script = answers_after(first, gap);
            scripts.insert(
                id,
                Scripted {
                    first: None,
                    later: script,
                },
            );
            samples[i].push(first);
            plans.push(CallPlan {
                id,
                stream,
                start: Duration::ZERO,
                provider: setup.name.clone(),
                timeout: None,
                overrides: RetryOverride::default(),
                previous_attempts: 0,
                hedge_after: None,
                stream_resume: None,
                fallback: Some(Vec::new()),
                cancel_after: None,
                first_token_timeout: None,
                cannot_restart: false,
                phase: Phase::Warmup,
            });
        }
        if let Ok(mut log) = setup.log.lock() {
            log.scripts.extend(scripts);
        }
    }
    let origin = Instant::now();
    let tasks: Vec<_> = plans
        .iter()
        .map(|plan| spawn_call(registry, plan, origin, setups, limits, violations))
        .collect();
    let mut runs = join(tasks, violations).await;
    for run in &runs {
        if !matches!(
            run.outcome,
            Some(Ended::Completed { attempts: 1, .. } | Ended::Streamed { attempts: 1, .. })
        ) {
            push(
                violations,
                format!(
                    "warm-up call {} on {}: scripted to answer in time, it ended {:?}",
                    run.plan.id, run.plan.provider, run.outcome
                ),
            );
        }
    }
    // The probes.
    let mut probes = Vec::new();
    let mut plans = Vec::new();
    for &i in &p95_providers {
        let setup = &setups[i];
        if let Ok(entry) = registry.get(&setup.name)
            && let Some(breaker) = &entry.breaker
            && breaker.state() != BreakerState::Closed
        {
            push(
                violations,
                format!(
                    "{}: the breaker is {:?} after a warm-up that only succeeded",
                    setup.name,
                    breaker.state()
                ),
            );
        }
        let id = warmup_base(i) + WARMUP_CALLS_MAX;
        let plan = CallPlan {
            provider: setup.name.clone(),
            phase: Phase::Probe,
            ..quiet(draw_call(&mut rng, id, setups.len()))
        };
        let p95 = p95_of(&samples[i]);
        let floor = Duration::from_millis(MIN_P95_HEDGE_MS);
        let delay = limits.hedge_after(plan.hedge_after, p95.map(|p| p.max(floor)));
        // Below the operator's per-try timeout: the probe never makes a
        // member fail (9, 10 stay as they were). Mostly after the wait.
        let per_try = setup.policy.per_try_timeout.as_millis() as u64;
        let top = per_try.saturating_sub(2).max(1);
        let after = delay.map_or(0, |d| d.as_millis() as u64 + 2);
        let first = Duration::from_millis(if after <= top && rng.chance(70) {
            rng.range(after, top)
        } else {
            rng.range(1, top)
        });
        let later = Duration::from_millis(rng.range(1, top.min(50)));
        let mut gap = || {
            if plan.stream {
                rng.ms(0, 10)
            } else {
                Duration::ZERO
            }
        };
        let script = Scripted {
            first: Some(answers_after(first, gap())),
            later: answers_after(later, gap()),
        };
        if let Ok(mut log) = setup.log.lock() {
            log.scripts.insert(id, script);
        }
        probes.push(Probe {
            setup: i,
            id,
            p95,
            delay,
            first_content: first,
        });
        plans.push(plan);
    }
    let origin = Instant::now();
    let tasks: Vec<_> = plans
        .iter()
        .map(|plan| spawn_call(registry, plan, origin, setups, limits, violations))
        .collect();
    runs.extend(join(tasks, violations).await);
    // Past every budget and breaker window (at most 3 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    (runs, probes)
}

/// Whether `policy`'s retry budget, rebuilt from a provider's upstream
/// calls `seen` (each call's first one before its stream committed a
/// deposit, every other one a withdrawal, in one-second slots from the
/// first), allows a retry at `at`. Of the calls made at `at` itself only
/// those `counted` (given whether each deposits) are.
fn budget_allows(
    log: &ProviderLog,
    policy: &RetryPolicy,
    at: Instant,
    counted: impl Fn(&Seen, bool) -> bool,
) -> bool {
    let (seen, window) = (&log.seen, policy.budget_window.as_secs().max(1));
    let (mut requests, mut retries) = (0u64, 0u64);
    if let Some(origin) = log.budget_origin {
        let slot = |t: Instant| t.saturating_duration_since(origin).as_secs();
        let now = slot(at);
        let mut deposited = std::collections::HashSet::new();
        for s in seen {
            let first = s.deposits(&mut deposited);
            if s.at > at || (s.at == at && !counted(s, first)) || slot(s.at) + window <= now {
                continue;
            }
            if first {
                requests += 1;
            } else {
                retries += 1;
            }
        }
    }
    let limit =
        policy.budget_min_per_second * window as f64 + policy.budget_ratio * requests as f64;
    (retries + 1) as f64 <= limit
}

/// The limit the gate gives a call's first attempt (see `admit`): the
/// deadline, the first-token or the per-try timeout.
fn first_attempt_limit(timeout: Option<Duration>, policy: &RetryPolicy) -> Duration {
    let per_try = policy.per_try_timeout;
    match (timeout, policy.first_token_timeout) {
        (Some(r), f) if r <= per_try && f.is_none_or(|f| r <= f) => r,
        (_, Some(f)) if f < per_try => f,
        _ => per_try,
    }
}

/// Whether a condition of a hedge holds, fails, or is within 1 ms of a
/// tie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Yes,
    No,
    Tie,
}

/// `a` against `b`: later by more than 1 ms, earlier by more, or a tie.
fn later_than(a: Duration, b: Duration) -> Due {
    let ms = Duration::from_millis(1);
    if a > b + ms {
        Due::Yes
    } else if a + ms < b {
        Due::No
    } else {
        Due::Tie
    }
}

/// Invariant 11, the check: each probe got its hedge at the wait when one
/// was due, and none before the wait or when none was due.
fn check_p95(
    report: &mut Report,
    setups: &[SimSetup],
    limits: &RetryLimits,
    probes: &[Probe],
    runs: &[CallRun],
) {
    for probe in probes {
        let setup = &setups[probe.setup];
        let Some(run) = runs.iter().find(|r| r.plan.id == probe.id) else {
            continue;
        };
        let plan = &run.plan;
        let policy = call_policy(plan, setup, limits);
        let log = match setup.log.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mine: Vec<&Seen> = log.seen.iter().filter(|s| s.call == probe.id).collect();
        let Some(primary) = mine.first() else {
            continue;
        };
        report.p95_probes += 1;
        let t0 = run.started;
        let o = probe
            .first_content
            .min(first_attempt_limit(plan.timeout, &policy));
        let extra = mine
            .get(1)
            .map(|s| (s.at.saturating_duration_since(t0), s.member));
        let name = &setup.name;
        let what = format!(
            "probe {} on {name} (p95 {:?}, hedge delay {:?}, first attempt's outcome at {o:?}, second upstream call at {:?}, {} attempts, deadline {:?}, cancelled after {:?})",
            probe.id,
            probe.p95,
            probe.delay,
            extra.map(|e| e.0),
            policy.max_attempts,
            plan.timeout,
            plan.cancel_after
        );
        if primary.at != t0 {
            report.violations.push(format!(
                "{what}: its first upstream call came {:?} after it entered",
                primary.at.saturating_duration_since(t0)
            ));
        }
        let Some(d) = probe.delay else {
            report.p95_unhedged += 1;
            if let Some((e, _)) = extra
                && later_than(o, e) == Due::Yes
            {
                report.violations.push(format!(
                    "{what}: a second upstream call before the first attempt's outcome, with no hedge delay"
                ));
            }
            continue;
        };
        let useful = min_useful_attempt(&policy);
        let conditions = [
            later_than(o, d),
            if policy.max_attempts >= 2 {
                Due::Yes
            } else {
                Due::No
            },
            plan.timeout.map_or(Due::Yes, |r| {
                later_than(r + Duration::from_millis(1), d + useful)
            }),
            plan.cancel_after.map_or(Due::Yes, |c| later_than(c, d)),
            // Alone on its provider: the only call made at `D` is the hedge.
            if budget_allows(&log, &setup.policy, t0 + d, |_, _| false) {
                Due::Yes
            } else {
                Due::No
            },
        ];
        let due = if conditions.contains(&Due::No) {
            Due::No
        } else if conditions.contains(&Due::Tie) {
            Due::Tie
        } else {
            Due::Yes
        };
        match due {
            Due::Yes => {
                report.p95_hedged += 1;
                if plan.hedge_after.is_none()
                    && probe
                        .p95
                        .is_some_and(|p| p > Duration::from_millis(MIN_P95_HEDGE_MS))
                {
                    report.p95_hedged_past_floor += 1;
                }
                match extra {
                    Some((e, member)) if e == d => {
                        if setup.members > 1 && member == primary.member {
                            report.violations.push(format!(
                                "{what}: the hedge went to the first attempt's member {member}, though every other was allowed"
                            ));
                        }
                    }
                    _ => report
                        .violations
                        .push(format!("{what}: a hedge was due at {d:?} ({conditions:?})")),
                }
            }
            Due::No => {
                report.p95_unhedged += 1;
                if let Some((e, _)) = extra
                    && later_than(o, e) == Due::Yes
                {
                    report.violations.push(format!(
                        "{what}: a second upstream call before the first attempt's outcome, though no hedge was due ({conditions:?})"
                    ));
                }
            }
            Due::Tie => {
                report.p95_ties += 1;
                if let Some((e, _)) = extra
                    && later_than(o.min(d), e) == Due::Yes
                {
                    report.violations.push(format!(
                        "{what}: a second upstream call before the wait ({conditions:?})"
                    ));
                }
            }
        }
    }
}

/// Invariant 10: what a pool's breaker watch checks each time it opens.
fn watch_openings(
    setup: &SimSetup,
    violations: Arc<Mutex<Vec<String>>>,
    openings: Arc<AtomicU64>,
) -> provider_gateway_server::registry::BreakerWatch {
    let (name, healthy, size) = (setup.name.clone(), setup.healthy, setup.members);
    Arc::new(move |t: Transition, members: &[MemberSummary]| {
        if t.to != BreakerState::Open {
            return;
        }
        openings.fetch_add(1, Ordering::Relaxed);
        let from = t.from.as_str();
        if let Some(h) = healthy {
            push(
                &violations,
                format!(
                    "{name}: the breaker opened ({from} -> open) though member {h} is healthy: {members:?}"
                ),
            );
        }
        if members.len() != size {
            push(
                &violations,
                format!(
                    "{name}: the breaker watch saw {} members, the pool has {size}",
                    members.len()
                ),
            );
        }
        let serving: Vec<&str> = members
            .iter()
            .filter(|m| m.state == "ready" && !m.failing)
            .map(|m| m.host.as_str())
            .collect();
        if !serving.is_empty() {
            push(
                &violations,
                format!(
                    "{name}: the breaker opened ({from} -> open) while {serving:?} could serve: {members:?}"
                ),
            );
        }
    })
}

/// The policy the registry gives `plan` on `setup`'s provider.
fn call_policy(plan: &CallPlan, setup: &SimSetup, limits: &RetryLimits) -> RetryPolicy {
    let mut policy = plan.overrides.apply(&setup.policy, limits);
    if let Some(t) = plan.first_token_timeout {
        policy.first_token_timeout = Some(t.min(limits.per_try_timeout));
    }
    if plan.previous_attempts > 0 && policy.single_attempt_when_client_retries {
        policy.max_attempts = 1;
    }
    policy
}

/// Invariant 9: whether a call on `setup`'s pool, which has a healthy
/// member, fits the deadline (see the module doc); its policy if so.
fn fits_the_deadline(
    plan: &CallPlan,
    setup: &SimSetup,
    limits: &RetryLimits,
) -> Option<RetryPolicy> {
    let has_fallback = match &plan.fallback {
        Some(names) => names.iter().any(|n| *n != plan.provider),
        None => !setup.resilience.fallback.is_empty(),
    };
    let policy = call_policy(plan, setup, limits);
    let others = setup.members.saturating_sub(1) as u32;
    let per_other =
        policy.per_try_timeout + policy.max_backoff.max(policy.max_retry_after) + COMMITTED_TAIL;
    let least_deadline = per_other * others + HEALTHY_ANSWER;
    let fits = plan.provider == setup.name
        && !has_fallback
        && policy.max_attempts as usize >= setup.members
        && policy.per_try_timeout >= HEALTHY_LIMIT
        && policy
            .first_token_timeout
            .is_none_or(|t| t >= HEALTHY_LIMIT)
        && plan.timeout.is_none_or(|t| t >= least_deadline);
    fits.then_some(policy)
}

async fn check(
    report: &mut Report,
    registry: &Registry,
    setups: &[SimSetup],
    limits: &RetryLimits,
    runs: &[CallRun],
) {
    let mut v = Vec::new();
    // Upstream calls per call, and per provider with their times.
    let mut per_call: HashMap<u64, u32> = HashMap::new();
    for setup in setups {
        let log = match setup.log.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        report.upstream_calls += log.seen.len() as u64;
        for seen in &log.seen {
            *per_call.entry(seen.call).or_default() += 1;
        }
        // 3: the budget's formula over its window.
        let policy = &setup.policy;
        let window = policy.budget_window.as_secs().max(1);
        if let Some(origin) = log.budget_origin {
            let mut firsts: BTreeMap<u64, u64> = BTreeMap::new();
            let mut extras: BTreeMap<u64, u64> = BTreeMap::new();
            let mut deposited = std::collections::HashSet::new();
            for s in &log.seen {
                let slot = s.at.saturating_duration_since(origin).as_secs();
                if s.deposits(&mut deposited) {
                    *firsts.entry(slot).or_default() += 1;
                } else {
                    *extras.entry(slot).or_default() += 1;
                }
            }
            let last = extras
                .keys()
                .chain(firsts.keys())
                .max()
                .copied()
                .unwrap_or(0);
            for slot in 0..=last {
                let lo = slot.saturating_sub(window - 1);
                let sum = |m: &BTreeMap<u64, u64>| m.range(lo..=slot).map(|(_, n)| n).sum::<u64>();
                let (requests, retries) = (sum(&firsts), sum(&extras));
                let limit = policy.budget_min_per_second * window as f64
                    + policy.budget_ratio * requests as f64;
                // The budget holds its formula whenever it grants a retry:
                // for the window ending at each second that made one (later
                // windows may lose the requests that allowed it).
                if extras.contains_key(&slot) && retries as f64 > limit + 1e-9 {
                    v.push(format!(
                        "{}: {retries} retries in the window ending at second {slot}, budget {limit} ({requests} requests)",
                        setup.name
                    ));
                }
            }
        }
        // 7: breaker faults within the provider's own faults.
        if let Ok(entry) = registry.get(&setup.name)
            && let Some(breaker) = &entry.breaker
            && breaker.faults_counted() > log.faults
        {
            v.push(format!(
                "{}: the breaker counted {} faults, the upstream produced {}",
                setup.name,
                breaker.faults_counted(),
                log.faults
            ));
        }
    }
    // 1: permits released, no wedge.
    let max_cooldown = setups
        .iter()
        .filter_map(|s| s.resilience.breaker.as_ref().map(|b| b.max_cooldown_ms))
        .max()
        .unwrap_or(0);
    for setup in setups {
        if let Ok(entry) = registry.get(&setup.name)
            && let Some(breaker) = &entry.breaker
            && breaker.probes_in_flight() > 0
        {
            v.push(format!(
                "{}: {} probe(s) still in flight after every call ended",
                setup.name,
                breaker.probes_in_flight()
            ));
        }
    }
    tokio::time::advance(Duration::from_millis(max_cooldown + 1)).await;
    for setup in setups {
        if let Ok(entry) = registry.get(&setup.name)
            && let Some(breaker) = &entry.breaker
            && !breaker.admits_probe(Instant::now())
        {
            v.push(format!(
                "{}: the breaker still refuses calls {} ms after the last call ({:?})",
                setup.name,
                max_cooldown + 1,
                breaker.state()
            ));
        }
    }
    // 2, 4, 5 per call.
    // Continuations may come from every hop after the serving one.
    let max_resumes: u32 = setups.iter().map(|s| s.resilience.max_resumes).sum();
    for run in runs {
        let (plan, outcome) = (&run.plan, &run.outcome);
        let made = per_call.get(&plan.id).copied().unwrap_or(0);
        let bound: u32 = setups
            .iter()
            .map(|s| {
                let mut p = plan.overrides.apply(&s.policy, limits);
                if plan.previous_attempts > 0 && p.single_attempt_when_client_retries {
                    p.max_attempts = 1;
                }
                p.max_attempts
            })
            .sum::<u32>()
            + max_resumes;
        if made > bound {
            v.push(format!(
                "call {}: {made} upstream calls, more than {bound} allowed",
                plan.id
            ));
        }
        if let Some(timeout) = plan.timeout
            && outcome.is_some()
            && run.took > timeout + Duration::from_millis(1)
        {
            v.push(format!(
                "call {}: ended after {:?}, its deadline was {timeout:?}",
                plan.id, run.took
            ));
        }
        let Some(outcome) = outcome else { continue };
        let reported = match outcome {
            Ended::Completed { attempts, .. } | Ended::Streamed { attempts, .. } => *attempts,
            // What the caller sees in the status's metadata.
            Ended::StreamFailed { error, .. } | Ended::Failed(error) => error.attempts(),
        };
        if reported != made {
            v.push(format!(
                "call {}: reported {reported} attempts, made {made} upstream calls ({outcome:?})",
                plan.id
            ));
        }
        match outcome {
            Ended::Completed { text, .. } => {
                let want = answer(plan.id).concat();
                if *text != want {
                    v.push(format!("call {}: answer {text:?}, want {want:?}", plan.id));
                }
            }
            Ended::Streamed {
                text,
                rescues,
                stops,
                stop_last,
                ..
            } => {
                report.resumes += rescues.0;
                report.cross_hop_resumes += rescues.1;
                report.restarts += rescues.2;
                let want = answer(plan.id).concat();
                if *text != want || *stops != 1 || !stop_last {
                    v.push(format!(
                        "call {}: stream ended OK with {stops} stop(s) (last: {stop_last}) and text {text:?}, want {want:?}",
                        plan.id
                    ));
                }
            }
            Ended::StreamFailed { text, .. } => {
                let want = answer(plan.id).concat();
                if !want.starts_with(text.as_str()) {
                    v.push(format!(
                        "call {}: a broken stream delivered {text:?}, not a prefix of {want:?}",
                        plan.id
                    ));
                }
            }
            Ended::Failed(_) => {}
        }
    }
    // 9: a pool with a healthy member serves every call that fits (of
    // the scenario's own: 11's scripts decide the warm-up and probes).
    for run in runs.iter().filter(|r| r.plan.phase == Phase::Scenario) {
        let (plan, outcome) = (&run.plan, &run.outcome);
        let Some(setup) = setups.iter().find(|s| s.name == plan.provider) else {
            continue;
        };
        // A call its caller cancelled has no outcome.
        let (Some(healthy), Some(outcome)) = (setup.healthy, outcome) else {
            continue;
        };
        let Some(policy) = fits_the_deadline(plan, setup, limits) else {
            continue;
        };
        report.healthy_calls += 1;
        let log = match setup.log.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let key_refused = log.refused_keys.iter().any(|r| r.0 == plan.id);
        report.keys_refused += u64::from(key_refused);
        let (error, committed) = match outcome {
            Ended::Completed { .. } | Ended::Streamed { .. } => {
                report.healthy_served += 1;
                report.keys_refused_served += u64::from(key_refused);
                continue;
            }
            Ended::StreamFailed { error, .. } => (error, true),
            Ended::Failed(error) => (error, false),
        };
        let tried_healthy = log
            .seen
            .iter()
            .any(|s| s.call == plan.id && s.member == healthy);
        // A member refused its key while the healthy member's attempt
        // (begun before) still ran (only a hedge race runs two at once):
        // the healthy attempt decides, so the refusal excuses nothing.
        let race_refusal = !policy.request_retry_on.as_ref().is_some_and(Vec::is_empty)
            && log.refused_keys.iter().any(|&(call, _, refused_at)| {
                call == plan.id
                    && log
                        .seen
                        .iter()
                        .any(|s| s.call == plan.id && s.member == healthy && s.at < refused_at)
            });
        let (not_retried, budget, committed, refused) = match error {
            GatewayError::Upstream {
                error,
                budget_exhausted,
                delivered,
                ..
            } => (
                if error.class == ErrorClass::Auth {
                    key_stays(&log, &policy, &setup.policy, plan.id, run)
                } else {
                    !is_retryable(&policy, error)
                },
                *budget_exhausted,
                committed || delivered.is_some(),
                error.class == ErrorClass::Auth,
            ),
            _ => (false, false, committed, false),
        };
        drop(log);
        if committed || (budget && !tried_healthy) {
            continue;
        }
        if not_retried && !race_refusal {
            // A refused key that could not move (and nothing else) excused it.
            report.keys_refused_excused += u64::from(refused);
            continue;
        }
        v.push(format!(
            "call {}: {} has a healthy member ({healthy}, {}tried) and the call fits the deadline, yet it failed{}: {outcome:?}",
            plan.id,
            setup.name,
            if tried_healthy { "" } else { "never " },
            if race_refusal {
                " (another member refused its key while the healthy member's attempt ran beside it in a hedge race)"
            } else {
                ""
            }
        ));
    }
    report.violations.append(&mut v);
}

/// Invariant 9: whether a call that ended on a refused key (at its end)
/// could not have moved to another member then, as the gate decides (see
/// `another_member_serves`): its caller asked for no retries, its hop's
/// attempts were spent, or the budget (of `operator`'s policy) was spent,
/// counting the calls other calls made at that instant whichever way
/// spends it.
fn key_stays(
    log: &ProviderLog,
    policy: &RetryPolicy,
    operator: &RetryPolicy,
    call: u64,
    run: &CallRun,
) -> bool {
    let at = run.started + run.took;
    let caller_wants_none = policy.request_retry_on.as_ref().is_some_and(Vec::is_empty);
    let tries = log
        .seen
        .iter()
        .filter(|s| s.call == call && s.at <= at)
        .count() as u64;
    caller_wants_none
        || tries >= u64::from(policy.max_attempts)
        // At `at`, other calls' retries count, their first calls do not.
        || !budget_allows(log, operator, at, |s, first| s.call == call || !first)
}
