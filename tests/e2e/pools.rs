//! Provider pools (issue 13): several keys and endpoints behind one
//! provider name. A 429 cools only its member and the retry goes to
//! another at once; a refused key dies and is never called again; P2C
//! prefers the faster endpoint; `ListProviders` shows the members without
//! a secret, and when a cooling or paced member is ready again.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use provider_gateway_client::{RawClient, v1};
use serde_json::json;

use crate::gate::complete;
use crate::resilience::anthropic_ok;
use crate::support::{Gateway, Reply, Upstream};

const KEY_A: &str = "sk-pool-key-aaaaaaaa";
const KEY_B: &str = "sk-pool-key-bbbbbbbb";
const KEY_C: &str = "sk-pool-key-cccccccc";
const ENV: &[(&str, &str)] = &[("KEY_A", KEY_A), ("KEY_B", KEY_B), ("KEY_C", KEY_C)];

fn keys_seen(upstream: &Upstream) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|r| r.header("x-api-key").unwrap_or_default().to_string())
        .collect()
}

/// A 429 on one key cools only that key: the retry goes to the other key
/// at once, without waiting out the Retry-After.
#[tokio::test]
async fn a_rate_limited_key_is_cooled_and_the_retry_goes_to_the_other_at_once() {
    // A 10 s Retry-After: waiting it out is far past the 5 s bound, and the
    // key still cools when the second call comes, however loaded the box.
    let upstream = Upstream::start(vec![
        Reply::json(
            429,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}),
        )
        .header("retry-after", "10"),
        anthropic_ok("served by the other key"),
        anthropic_ok("still the other key"),
    ])
    .await;
    let toml = format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\nbase_url = \"{}\"\n\
         api_key_env = [\"KEY_A\", \"KEY_B\"]\n",
        upstream.url()
    );
    let gw = Gateway::start(&toml, ENV).await;
    let started = Instant::now();
    let answer = complete(&gw, &[], None).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "it waited");
    assert_eq!(answer.text, "served by the other key");
    assert_eq!(answer.attempts, 2);
    let seen = keys_seen(&upstream);
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0], seen[1], "the retry went to the same key");
    // The cooled key is not used while it cools.
    complete(&gw, &[], None).await.unwrap();
    let seen = keys_seen(&upstream);
    assert_eq!(seen[2], seen[1], "a cooling key was called");
}

/// A refused key dies: the other keeps serving, and the dead key is never
/// called again.
#[tokio::test]
async fn a_refused_key_dies_and_the_other_keeps_serving() {
    let refusing = Upstream::start(vec![Reply::json(
        401,
        json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
    )])
    .await;
    let serving = Upstream::start(vec![anthropic_ok("ok"); 10]).await;
    let toml = format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\n\
         balance = \"ordered\"\n\
         endpoints = [{{ base_url = \"{}\", api_key_env = \"KEY_A\" }}, {{ base_url = \"{}\", api_key_env = \"KEY_B\" }}]\n",
        refusing.url(),
        serving.url()
    );
    // `ordered`: the refusing key is the first choice of every call, so it
    // is surely tried, and dies at its first answer.
    let gw = Gateway::start(&toml, ENV).await;
    for _ in 0..10 {
        let answer = complete(&gw, &[], None).await.unwrap();
        assert_eq!(answer.text, "ok");
    }
    assert_eq!(
        refusing.request_count(),
        1,
        "the dead key was called again (or never)"
    );
    assert_eq!(serving.request_count(), 10);
    let mut raw = RawClient::connect(gw.url()).await.unwrap();
    let listed = raw
        .list_providers(v1::ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner();
    let members = &listed.providers[0].members;
    assert_eq!(members.len(), 2);
    assert_eq!(members[0].key_env, "KEY_A");
    assert_eq!(members[1].key_env, "KEY_B");
    assert_eq!(members[0].state, "dead");
    assert_eq!(members[1].state, "ready");
    let text = format!("{listed:?}");
    assert!(!text.contains(KEY_A) && !text.contains(KEY_B), "{text}");
}

/// Power of two choices sends most calls to the faster endpoint.
///
/// The slow member answers in 1 s, so a fast call stalled on a loaded
/// machine (its sample jumps to the stall) still looks faster than it, up
/// to a stall of about 0.9 s. A longer stall flips the choice until the
/// stalled estimate decays below 1 s again (`10 s * ln(stall / 1 s)`, one
/// slow call a second): a 2 s stall costs about seven slow calls, still
/// within the 10 of 50 allowed. The unmeasured member always wins one
/// draw (its score is the least), so a run makes exactly one slow call
/// (about 1 s) when nothing stalls.
#[tokio::test]
async fn p2c_prefers_the_faster_endpoint() {
    let slow = Upstream::start(vec![
        anthropic_ok("slow").delay(Duration::from_millis(1_000));
        100
    ])
    .await;
    let fast = Upstream::start(vec![anthropic_ok("fast"); 100]).await;
    let toml = format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\napi_key_env = \"KEY_A\"\n\
         endpoints = [{{ base_url = \"{}\" }}, {{ base_url = \"{}\" }}]\n",
        slow.url(),
        fast.url()
    );
    let gw = Gateway::start(&toml, ENV).await;
    let calls = 50;
    for _ in 0..calls {
        complete(&gw, &[], None).await.unwrap();
    }
    let (s, f) = (slow.request_count(), fast.request_count());
    assert_eq!(s + f, calls);
    assert!(f * 100 >= calls * 80, "slow {s}, fast {f}");
}

/// Bad pool keys are refused at start-up, naming the key.
#[tokio::test]
async fn pool_keys_are_checked_naming_the_key() {
    for (extra, key) in [
        ("api_key_env = []", "providers.p.api_key_env"),
        (
            "endpoints = [{ base_url = \"ftp://x\" }]",
            "providers.p.endpoints[0].base_url",
        ),
        (
            "endpoints = [{ base_url = \"http://127.0.0.1:1\", weight = 0 }]",
            "providers.p.endpoints[0].weight",
        ),
        ("balance = \"p2c\"", "providers.p.balance"),
    ] {
        let toml =
            format!("default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\n{extra}\n");
        let err = provider_gateway_server::Config::from_toml(&toml).unwrap_err();
        assert!(err.to_string().contains(key), "{extra}: {err}");
    }
}

/// A member whose answer says its requests are spent is skipped until its
/// reset, with no 429 seen; when every member is spent and the reset is
/// past the gateway's longest wait, the call is answered at once with
/// RetryInfo, without a request bound to fail.
#[tokio::test]
async fn rate_limit_headers_pace_the_members() {
    let spent = |text: &str| {
        anthropic_ok(text)
            .header("anthropic-ratelimit-requests-remaining", "0")
            .header("anthropic-ratelimit-requests-reset", "2099-01-01T00:00:00Z")
    };
    let a = Upstream::start(vec![spent("a, now spent"), anthropic_ok("a again")]).await;
    let b = Upstream::start(vec![
        anthropic_ok("b"),
        anthropic_ok("b"),
        spent("b, now spent"),
        anthropic_ok("b again"),
    ])
    .await;
    let toml = format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\napi_key_env = \"KEY_A\"\n\
         balance = \"ordered\"\n\
         endpoints = [{{ base_url = \"{}\" }}, {{ base_url = \"{}\" }}]\n",
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&toml, ENV).await;
    assert_eq!(complete(&gw, &[], None).await.unwrap().text, "a, now spent");
    for _ in 0..2 {
        assert_eq!(complete(&gw, &[], None).await.unwrap().text, "b");
    }
    assert_eq!(complete(&gw, &[], None).await.unwrap().text, "b, now spent");
    assert_eq!(
        (a.request_count(), b.request_count()),
        (1, 3),
        "a spent member was called"
    );
    let status = complete(&gw, &[], None).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("pool"), "{}", status.message());
    assert_eq!(
        (a.request_count(), b.request_count()),
        (1, 3),
        "a request bound to fail was sent"
    );
    let mut raw = RawClient::connect(gw.url()).await.unwrap();
    let listed = raw
        .list_providers(v1::ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner();
    let states: Vec<&str> = listed.providers[0]
        .members
        .iter()
        .map(|m| m.state.as_str())
        .collect();
    assert_eq!(states, ["paced", "paced"]);
    // A reset in 2099 paces a member for at most 10 minutes.
    let (now, ten_minutes) = (unix_ms_now(), 600_000);
    for m in &listed.providers[0].members {
        assert!(
            (now + ten_minutes - 60_000..=now + ten_minutes).contains(&m.until_unix_ms),
            "paced until {} ({now} now)",
            m.until_unix_ms
        );
    }
}

/// `hedge_after_ms = "p95"`: no hedge until 50 answers were seen; then an
/// attempt slower than the observed p95 (at least 100 ms) is hedged, onto
/// the other member.
#[tokio::test]
async fn p95_hedging_starts_once_the_provider_has_been_observed() {
    // `ordered`: every first attempt goes to `a`, a hedge to `b`. The 1st
    // and the 50th answers are slow (300 ms) and come before 50 answers
    // were seen: neither is hedged, whatever the machine's load (until
    // then a call has no hedge delay at all). Only two samples are slow,
    // so the p95 (the third largest of 50 to 56) stays at 50 ms at most
    // unless stalls slow more, and the delay is the 100 ms floor.
    let slow_before = || anthropic_ok("slow before p95 is known").delay(Duration::from_millis(300));
    let mut script = vec![slow_before()];
    script.extend(vec![anthropic_ok("fast"); 48]);
    script.push(slow_before());
    // Then answers in 50 ms: under the 100 ms floor, which alone (not the
    // p95 of a few ms) keeps them from being hedged.
    script.extend(vec![
        anthropic_ok("fast").delay(Duration::from_millis(50));
        6
    ]);
    // The gateway abandons it for the hedge: never waited out.
    script.push(anthropic_ok("slow").delay(Duration::from_secs(10)));
    let a = Upstream::start(script).await;
    let b = Upstream::start(vec![anthropic_ok("the hedge"); 10]).await;
    let toml = format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\napi_key_env = \"KEY_A\"\n\
         hedge_after_ms = \"p95\"\nbalance = \"ordered\"\n\
         endpoints = [{{ base_url = \"{}\" }}, {{ base_url = \"{}\" }}]\n",
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&toml, ENV).await;
    // Before 50 samples: a slow answer is waited out, not hedged.
    let first = complete(&gw, &[], None).await.unwrap();
    assert_eq!(
        (first.text.as_str(), first.attempts),
        ("slow before p95 is known", 1)
    );
    for _ in 0..48 {
        complete(&gw, &[], None).await.unwrap();
    }
    let fiftieth = complete(&gw, &[], None).await.unwrap();
    assert_eq!(
        (fiftieth.text.as_str(), fiftieth.attempts),
        ("slow before p95 is known", 1),
        "hedged with 49 answers seen"
    );
    assert_eq!(
        (a.request_count(), b.request_count()),
        (50, 0),
        "a call was hedged before 50 answers were seen"
    );
    // Now calls hedge after 100 ms: one of these is hedged only if it
    // stalled past that (a loaded machine), and then it took that long.
    let mut hedged = 0;
    for _ in 0..6 {
        let started = Instant::now();
        let answer = complete(&gw, &[], None).await.unwrap();
        let took = started.elapsed();
        if answer.attempts > 1 {
            assert!(
                took >= Duration::from_millis(100),
                "a 50 ms call was hedged after {took:?}, before the 100 ms floor"
            );
            hedged += 1;
        }
    }
    // A hedge counts once admitted; one dropped at once (its first attempt
    // answered in the same instant, after a stall) may never reach `b`.
    // Without a stall that is exactly (56, 0) requests to (a, b).
    assert_eq!(
        a.request_count(),
        56,
        "every first attempt, and no hedge, goes to a"
    );
    let to_b = b.request_count();
    assert!(
        to_b <= hedged,
        "a fast call was hedged: {to_b} request(s) to b, {hedged} call(s) hedged"
    );
    let started = Instant::now();
    let answer = complete(&gw, &[], None).await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "not hedged: {took:?}");
    assert_eq!((answer.text.as_str(), answer.attempts), ("the hedge", 2));
    let to_b = b.request_count();
    assert!(
        (1..=hedged + 1).contains(&to_b),
        "the hedge went to the other member: {to_b} request(s) to b, {} hedge(s)",
        hedged + 1
    );
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `secs` since the Unix epoch as an RFC 3339 UTC time (days to a civil
/// date as in Howard Hinnant's `civil_from_days`).
fn rfc3339(secs: u64) -> String {
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

/// `ListProviders` tells when a member is ready again: a paced member
/// (its answer said its requests are spent) until its limit's reset, a
/// cooling one (a 429) until its Retry-After ends; a ready member shows 0.
#[tokio::test]
async fn a_paced_or_cooling_member_is_listed_with_when_it_is_ready_again() {
    let before = unix_ms_now();
    // Whole seconds: the reset is sent without a fraction.
    let reset_ms = (before / 1_000 + 120) * 1_000;
    let upstream = Upstream::start(vec![
        anthropic_ok("a, now spent")
            .header("anthropic-ratelimit-requests-remaining", "0")
            .header(
                "anthropic-ratelimit-requests-reset",
                &rfc3339(reset_ms / 1_000),
            ),
        Reply::json(
            429,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}),
        )
        .header("retry-after", "30"),
        anthropic_ok("c"),
    ])
    .await;
    // `ordered`: a, then b (a is paced), then c (b cools).
    let toml = format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\nbase_url = \"{}\"\n\
         api_key_env = [\"KEY_A\", \"KEY_B\", \"KEY_C\"]\nbalance = \"ordered\"\n",
        upstream.url()
    );
    let gw = Gateway::start(&toml, ENV).await;
    assert_eq!(complete(&gw, &[], None).await.unwrap().text, "a, now spent");
    let answer = complete(&gw, &[], None).await.unwrap();
    assert_eq!((answer.text.as_str(), answer.attempts), ("c", 2));
    assert_eq!(keys_seen(&upstream), [KEY_A, KEY_B, KEY_C]);
    let mut raw = RawClient::connect(gw.url()).await.unwrap();
    let listed = raw
        .list_providers(v1::ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner();
    let after = unix_ms_now();
    let members = &listed.providers[0].members;
    let states: Vec<(&str, &str)> = members
        .iter()
        .map(|m| (m.key_env.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [("KEY_A", "paced"), ("KEY_B", "cooling"), ("KEY_C", "ready")]
    );
    let paced_until = members[0].until_unix_ms;
    assert!(
        paced_until.abs_diff(reset_ms) < 2_000,
        "paced until {paced_until}, the reset is {reset_ms}"
    );
    let cooling_until = members[1].until_unix_ms;
    assert!(
        (before + 30_000..=after + 30_000).contains(&cooling_until),
        "cooling until {cooling_until}, want 30 s after {before}..{after}"
    );
    assert_eq!(members[2].until_unix_ms, 0, "a ready member has no until");
}

fn server_error() -> Reply {
    Reply::json(
        500,
        json!({"type": "error", "error": {"type": "api_error", "message": "scripted 500"}}),
    )
}

/// Two endpoints of one provider, with a breaker that opens on the
/// second fault it counts (or the first, `consecutive`).
fn breaker_pool(a: &Upstream, b: &Upstream, consecutive: u32, balance: &str) -> String {
    format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\napi_key_env = \"KEY_A\"\n\
         balance = \"{balance}\"\n\
         endpoints = [{{ base_url = \"{}\" }}, {{ base_url = \"{}\" }}]\n\
         [providers.p.retry]\nmax_attempts = 2\ninitial_backoff_ms = 1\nmax_backoff_ms = 1\n\
         [providers.p.breaker]\nconsecutive_failures = {consecutive}\ncooldown_ms = 60000\n",
        a.url(),
        b.url()
    )
}

/// The breaker opens only when no member can serve: while one member
/// serves, the other's faults never open it.
#[tokio::test]
async fn a_serving_member_keeps_the_breaker_closed() {
    let failing = Upstream::start(vec![server_error(); 10]).await;
    let serving = Upstream::start(vec![anthropic_ok("served"); 10]).await;
    // `ordered`: every call tries the failing endpoint first; a breaker
    // that counted one of its faults would open.
    let gw = Gateway::start(&breaker_pool(&failing, &serving, 1, "ordered"), ENV).await;
    for _ in 0..10 {
        let answer = complete(&gw, &[], None).await.unwrap();
        assert_eq!((answer.text.as_str(), answer.attempts), ("served", 2));
    }
    assert_eq!((failing.request_count(), serving.request_count()), (10, 10));
}

/// When every member fails, the pool's breaker opens (a fault counts once
/// every other member is failing too), and calls are then refused at once
/// without an upstream request.
#[tokio::test]
async fn a_pool_whose_every_member_fails_opens_its_breaker() {
    let a = Upstream::start(vec![server_error(); 4]).await;
    let b = Upstream::start(vec![server_error(); 4]).await;
    let gw = Gateway::start(&breaker_pool(&a, &b, 2, "p2c"), ENV).await;
    // The first fault is excused (the other member may serve), the
    // second counts (both are failing), and so does the third: open.
    for _ in 0..2 {
        let status = complete(&gw, &[], None).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    let sent = a.request_count() + b.request_count();
    assert_eq!(
        sent, 3,
        "the breaker should have refused the fourth attempt"
    );
    let status = complete(&gw, &[], None).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("circuit breaker is open"),
        "{}",
        status.message()
    );
    assert_eq!(
        a.request_count() + b.request_count(),
        sent,
        "a request went upstream past an open breaker"
    );
}

/// A hop's retries go to members it has not tried yet: with three
/// endpoints of which two fail, the third serves the third attempt (it
/// does not bounce between the two failing ones).
#[tokio::test]
async fn retries_go_to_members_not_yet_tried() {
    let a = Upstream::start(vec![server_error(); 2]).await;
    let b = Upstream::start(vec![server_error(); 2]).await;
    let c = Upstream::start(vec![anthropic_ok("c serves")]).await;
    let toml = format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\napi_key_env = \"KEY_A\"\n\
         balance = \"ordered\"\n\
         endpoints = [{{ base_url = \"{}\" }}, {{ base_url = \"{}\" }}, {{ base_url = \"{}\" }}]\n\
         [providers.p.retry]\nmax_attempts = 3\ninitial_backoff_ms = 1\nmax_backoff_ms = 1\n",
        a.url(),
        b.url(),
        c.url()
    );
    let gw = Gateway::start(&toml, ENV).await;
    let answer = complete(&gw, &[], None).await.unwrap();
    assert_eq!((answer.text.as_str(), answer.attempts), ("c serves", 3));
    assert_eq!(
        (a.request_count(), b.request_count(), c.request_count()),
        (1, 1, 1)
    );
}

/// A member's long Retry-After (here on a 500) is its own: the retry goes
/// to another member after the usual backoff, instead of the hop giving
/// up on a wait it may not make.
#[tokio::test]
async fn a_members_long_retry_after_does_not_stop_the_pool() {
    let a = Upstream::start(vec![server_error().header("retry-after", "86400")]).await;
    let b = Upstream::start(vec![anthropic_ok("b serves")]).await;
    let toml = format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\napi_key_env = \"KEY_A\"\n\
         balance = \"ordered\"\n\
         endpoints = [{{ base_url = \"{}\" }}, {{ base_url = \"{}\" }}]\n\
         [providers.p.retry]\nmax_attempts = 2\ninitial_backoff_ms = 1\nmax_backoff_ms = 1\n",
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&toml, ENV).await;
    let started = Instant::now();
    let answer = complete(&gw, &[], None).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "it waited");
    assert_eq!((answer.text.as_str(), answer.attempts), ("b serves", 2));
}

/// A caller who asks for no retries (`x-retry-on: none`) gets none, not
/// even a refused key's retry on another key; the key still dies.
#[tokio::test]
async fn x_retry_on_none_keeps_a_refused_key_from_being_retried_on_another() {
    let refusing = Upstream::start(vec![Reply::json(
        401,
        json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
    )])
    .await;
    let serving = Upstream::start(vec![anthropic_ok("ok"); 2]).await;
    let toml = format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\nbalance = \"ordered\"\n\
         endpoints = [{{ base_url = \"{}\", api_key_env = \"KEY_A\" }}, {{ base_url = \"{}\", api_key_env = \"KEY_B\" }}]\n",
        refusing.url(),
        serving.url()
    );
    let gw = Gateway::start(&toml, ENV).await;
    let status = complete(&gw, &[("x-retry-on", "none")], None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert_eq!((refusing.request_count(), serving.request_count()), (1, 0));
    // The next call goes to the other key at once.
    let answer = complete(&gw, &[], None).await.unwrap();
    assert_eq!((answer.text.as_str(), answer.attempts), ("ok", 1));
    assert_eq!(refusing.request_count(), 1);
}

/// A stream that broke after content is continued, and a refused key in
/// the pool is that key's verdict, not the stream's: the continuation
/// goes on to another member of the same provider, which finishes the
/// answer.
#[tokio::test]
async fn a_continuation_refused_by_a_key_goes_to_another_member() {
    use crate::anthropic::text_stream;
    use crate::gate::stream_with;
    use crate::support::Step;
    use provider_gateway_client::request;
    use provider_gateway_client::v1::stream_response::Event;

    let texts = ["one ", "two ", "three "];
    let mut cut = text_stream(&texts, None);
    cut.push(Step::Cut);
    let serving = Upstream::start(vec![
        Reply::sse_steps(cut),
        Reply::sse_steps(text_stream(&["four."], Some("end_turn"))),
    ])
    .await;
    let refusing = Upstream::start(vec![Reply::json(
        401,
        json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
    )])
    .await;
    let toml = format!(
        "default_provider = \"p\"\n[providers.p]\nkind = \"anthropic\"\n\
         balance = \"ordered\"\nstream_resume = true\n\
         endpoints = [{{ base_url = \"{}\", api_key_env = \"KEY_A\" }}, {{ base_url = \"{}\", api_key_env = \"KEY_B\" }}]\n",
        serving.url(),
        refusing.url()
    );
    let gw = Gateway::start(&toml, ENV).await;
    let got = stream_with(&gw, request::to_stream(request::user("hi")), &[], None).await;
    assert!(got.status.is_none(), "{:?}", got.status);
    assert_eq!(got.text, "one two three four.");
    let resumed: Vec<_> = got
        .events
        .iter()
        .filter(|e| matches!(e, Event::Resumed(_)))
        .collect();
    assert_eq!(resumed.len(), 1, "{:?}", got.events);
    // The first attempt and the continuation on KEY_A, the refused
    // continuation on KEY_B between them.
    assert_eq!(keys_seen(&serving), [KEY_A, KEY_A]);
    assert_eq!(keys_seen(&refusing), [KEY_B]);
    let attempts = got
        .trailers
        .as_ref()
        .and_then(|t| t.get("x-gateway-attempts"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_eq!(attempts.as_deref(), Some("3"));
}
