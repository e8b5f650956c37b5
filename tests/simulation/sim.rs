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
//! `x-should-retry`); and many concurrent calls with their own overrides
//! (attempts, per-try timeout, `retry_on`, backoff), deadlines and
//! cancellations. After each scenario it checks:
//!
//! 1. every breaker permit is released (no probe in flight), and no
//!    breaker refuses a call once `max_cooldown_ms` has passed (none
//!    wedges);
//! 2. the upstream calls a call made equal the attempts it reported, and
//!    stay within `max_attempts` per hop plus `max_resumes`;
//! 3. per provider, the upstream calls after each call's first (retries,
//!    hedges, continuations) stay within the budget's own formula over its
//!    sliding window, `min_per_second * window + ratio * first attempts`,
//!    for the window ending at every second in which one was made;
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
//!    put to another member; (b) the healthy member was never tried and
//!    the retry budget refused a retry: a limit the operator set, not the
//!    pool's doing; (c) a stream another member committed (it delivered
//!    content first, maybe while the healthy member's hedge still ran)
//!    broke after that content: past its commit point a stream belongs
//!    to the resume settings (`x-stream-resume`, `max_resumes`, the
//!    budget), whose continuations may go to any member that is allowed,
//!    and invariant 5 checks what it delivered. Neither a deadline, nor
//!    the breaker, nor spent attempts, nor another member's long
//!    Retry-After excuses one;
//! 10. pools: the breaker opens only when all members are unavailable.
//!     Each time a pool's breaker opens (from closed or half-open), every
//!     member is, at that instant, *unavailable*: cooling, paced or dead,
//!     as `ListProviders` lists it, or *failing*: its latest settled
//!     attempt (the one whose fault opened the breaker included) ended in
//!     an upstream fault and it has not served since (see
//!     `server/src/registry/pool.rs`). Independently of the pool's own
//!     account, a pool with a healthy member (9) never opens its breaker:
//!     that member can always serve, as the scenario's script knows.
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
use provider_gateway_server::registry::{CallOptions, MemberSummary, RegisteredProvider};
use provider_gateway_server::retry::{
    BreakerState, Clock, RetryLimits, RetryOverride, RetryPolicy, Transition, is_retryable,
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
}

#[derive(Debug, Default)]
struct ProviderLog {
    seen: Vec<Seen>,
    /// Upstream faults produced (by the operator's own limits).
    faults: u64,
    violations: Vec<String>,
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
        let (_, text) = self.begin(request);
        let script = self.draw(false);
        if self.counts_as_fault(&script) {
            self.fault();
        }
        Box::pin(async move {
            match script {
                Script::Ok { latency, .. } => {
                    tokio::time::sleep(latency).await;
                    provider_gateway_server::providers::mark_responded();
                    self.maybe_spent();
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
                    if let Ok(mut w) = self.watch.lock() {
                        w.failed(&error);
                    }
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
        let (_, text) = self.begin(request);
        let script = self.draw(true);
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
                    if let Ok(mut w) = self.watch.lock() {
                        w.failed(&error);
                    }
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
            self.maybe_spent();
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
            Arc::new(SimProvider {
                watch: Arc::new(Mutex::new(Watch {
                    pooled: members > 1,
                    ..Watch::default()
                })),
                member: m as usize,
                healthy: healthy == Some(m as usize),
                rng: Mutex::new(Rng::new(rng.next_u64())),
                per_try: policy.per_try_timeout,
                idle: policy.stream_idle_timeout,
                fault_rate: rng.pick(&[0, 10, 30, 60, 100]),
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
    let calls = rng.range(1, 8);
    let plans: Vec<CallPlan> = (0..calls)
        .map(|id| draw_call(&mut rng, id, count))
        .collect();
    let origin = Instant::now();
    let mut tasks = Vec::new();
    for plan in &plans {
        let min_per_try = setups
            .iter()
            .map(|s| plan.overrides.apply(&s.policy, &limits).per_try_timeout)
            .min()
            .unwrap_or(Duration::ZERO);
        let info = CallInfo {
            deadline: plan.timeout.map(|t| origin + plan.start + t),
            min_useful: min_per_try.min(Duration::from_millis(50)),
            violations: violations.clone(),
            id: plan.id,
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
        let ended_at = Arc::new(AtomicU64::new(u64::MAX));
        let ended = ended_at.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(plan_c.start).await;
            let started = Instant::now();
            let run = CALL.scope(info, run_call(registry, plan_c.clone(), request));
            let outcome = match plan_c.cancel_after {
                Some(after) => tokio::time::timeout(after, run).await.ok(),
                None => Some(run.await),
            };
            ended.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            outcome
        });
        tasks.push((plan.clone(), task, ended_at));
    }
    let mut ended: Vec<(CallPlan, Option<Ended>, u64)> = Vec::new();
    for (plan, task, ended_at) in tasks {
        match task.await {
            Ok(outcome) => ended.push((plan, outcome, ended_at.load(Ordering::Relaxed))),
            Err(e) if e.is_panic() => push(&violations, format!("call {}: panicked", plan.id)),
            Err(e) => push(&violations, format!("call {}: task failed: {e}", plan.id)),
        }
    }
    let mut report = Report {
        calls,
        pools: setups.iter().filter(|s| s.members > 1).count() as u64,
        healthy_pools: setups.iter().filter(|s| s.healthy.is_some()).count() as u64,
        pool_openings: openings.load(Ordering::Relaxed),
        ..Report::default()
    };
    check(&mut report, &registry, &setups, &limits, &ended).await;
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
    ended: &[(CallPlan, Option<Ended>, u64)],
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
        if let Some(origin) = log.seen.first().map(|s| s.at) {
            let mut firsts: BTreeMap<u64, u64> = BTreeMap::new();
            let mut extras: BTreeMap<u64, u64> = BTreeMap::new();
            let mut seen_calls = std::collections::HashSet::new();
            for s in &log.seen {
                let slot = s.at.saturating_duration_since(origin).as_secs();
                if seen_calls.insert(s.call) {
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
    for (plan, outcome, took_us) in ended {
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
            && Duration::from_micros(*took_us) > timeout + Duration::from_millis(1)
        {
            v.push(format!(
                "call {}: ended after {:?}, its deadline was {timeout:?}",
                plan.id,
                Duration::from_micros(*took_us)
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
    // 9: a pool with a healthy member serves every call that fits.
    for (plan, outcome, _) in ended {
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
        let (error, committed) = match outcome {
            Ended::Completed { .. } | Ended::Streamed { .. } => {
                report.healthy_served += 1;
                continue;
            }
            Ended::StreamFailed { error, .. } => (error, true),
            Ended::Failed(error) => (error, false),
        };
        let tried_healthy = match setup.log.lock() {
            Ok(log) => log
                .seen
                .iter()
                .any(|s| s.call == plan.id && s.member == healthy),
            Err(_) => true,
        };
        let (not_retried, budget, committed) = match error {
            GatewayError::Upstream {
                error,
                budget_exhausted,
                delivered,
                ..
            } => (
                !is_retryable(&policy, error),
                *budget_exhausted,
                committed || delivered.is_some(),
            ),
            _ => (false, false, committed),
        };
        if not_retried || (budget && !tried_healthy) || committed {
            continue;
        }
        v.push(format!(
            "call {}: {} has a healthy member ({healthy}, {}tried) and the call fits the deadline, yet it failed: {outcome:?}",
            plan.id,
            setup.name,
            if tried_healthy { "" } else { "never " }
        ));
    }
    report.violations.append(&mut v);
}
