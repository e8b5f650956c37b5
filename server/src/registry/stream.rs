//! A stream after its commit point: relaying, the caller's deadline and
//! the idle timer, the breaker verdict at the end, and resuming a stream
//! that broke inside text.
//!
//! A stream commits on its first content delta (or the stop of an empty
//! answer); before that, failures are retried by the attempt loop. After
//! it, a break ends the stream with an error, never quietly, unless it can
//! be resumed. A resume is a *continuation*: an attempt of its own through
//! the same gate (numbered, budgeted, under the breaker and the call's one
//! deadline), asking the same provider to continue an assistant turn that
//! holds exactly the text delivered so far.
//!
//! Invariants:
//! - The committed stream ends no later than the caller's deadline, fixed
//!   when the call arrived (not when it committed).
//! - The serving attempt's breaker permit is held until the stream ends:
//!   a stop records a success, a break an upstream fault, a deadline or a
//!   caller that went away abandons it.
//! - A resumed stream's text is exactly the providers' text: the prefill
//!   is sent without trailing whitespace (Anthropic refuses it), and the
//!   continuation's leading characters that repeat that whitespace are
//!   dropped, so no character is lost or doubled.
//! - A resume happens only for a break whose class the call's policy
//!   retries, within `max_resumes`, and only after text (not inside a tool
//!   call). A failed continuation is counted, and its own error is the one
//!   the caller sees. A continuation that fails on a pool member's own
//!   fault (its key, its rate limit, its load) goes at once to another
//!   member of the same hop, as a failed attempt would, within
//!   `max_resumes`.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{StreamExt, stream};

use super::OpenStream;
use super::attempts::{Attempt, AttemptGate, AttemptKind, Bound, Hop, HopCount, Outcome};
use crate::chat::{ChatRequest, Content, Message, Role, StreamEvent, Usage};
use crate::config::ResumeMode;
use crate::error::{ErrorClass, GatewayError, ProviderError};
use crate::observe::CallObservation;
use crate::providers::{EventStream, Provider};
use crate::retry;

fn no_stop() -> ProviderError {
    ProviderError::new(
        ErrorClass::StreamInterrupted,
        "the upstream stream ended without a stop reason",
    )
}

fn stalled(idle: Duration) -> ProviderError {
    ProviderError::new(
        ErrorClass::StreamInterrupted,
        format!("the upstream stream stalled for {} ms", idle.as_millis()),
    )
}

/// One stream attempt up to its commit point: opens the stream and reads
/// until the first content delta (or a stop), each event within `idle`. A
/// keep-alive resets the idle timer and is not kept.
pub(crate) async fn open_until_commit(
    provider: &dyn Provider,
    request: &ChatRequest,
    idle: Duration,
) -> Result<(EventStream, VecDeque<StreamEvent>), ProviderError> {
    let mut events = provider.stream(request).await?;
    crate::providers::mark_responded();
    let mut head = VecDeque::new();
    loop {
        match tokio::time::timeout(idle, events.next()).await {
            Ok(Some(Ok(StreamEvent::KeepAlive))) => {}
            Ok(Some(Ok(event))) => {
                let commit = event.is_content() || matches!(event, StreamEvent::Stop(_));
                head.push_back(event);
                if commit {
                    return Ok((events, head));
                }
            }
            Ok(Some(Err(error))) => return Err(error),
            Ok(None) => return Err(no_stop()),
            Err(_) => return Err(stalled(idle)),
        }
    }
}

/// What a committed stream starts from.
pub(crate) struct StreamSetup {
    pub(crate) gate: AttemptGate,
    /// The hop that serves.
    pub(crate) hop: Hop,
    /// The hops after it in the chain, which may rescue a break.
    pub(crate) rest: Vec<Hop>,
    pub(crate) count: HopCount,
    /// The serving attempt (its span and breaker permit).
    pub(crate) attempt: Attempt,
    pub(crate) obs: CallObservation,
    pub(crate) events: EventStream,
    pub(crate) head: VecDeque<StreamEvent>,
    /// How a break after content is rescued.
    pub(crate) resume: ResumeMode,
}

/// The open stream of a committed attempt.
pub(crate) fn committed(setup: StreamSetup) -> OpenStream {
    let StreamSetup {
        gate,
        hop,
        rest,
        count,
        attempt,
        obs,
        events,
        mut head,
        resume,
    } = setup;
    if !matches!(head.front(), Some(StreamEvent::Start { .. })) {
        head.push_front(StreamEvent::Start {
            id: String::new(),
            model: hop
                .request
                .model_or(hop.entry.provider.default_model())
                .to_string(),
        });
    }
    let provider = hop.entry.name.clone();
    let attempts = gate.attempts();
    let idle = hop.policy.stream_idle_timeout;
    let mut hops = vec![(hop, count)];
    hops.extend(rest.into_iter().map(|h| (h, HopCount::default())));
    let state = Committed {
        idle,
        gate,
        hops,
        serving: 0,
        attempt: Some(attempt),
        obs,
        id: String::new(),
        model: String::new(),
        usage: Usage::default(),
        events,
        head,
        delivered: 0,
        done: false,
        timer: None,
        mode: resume,
        resume: Resume::default(),
    };
    OpenStream {
        provider,
        attempt: attempts,
        // Boxed, so each poll moves a pointer, not the whole state.
        events: Box::pin(stream::unfold(Box::new(state), |mut st| async move {
            if st.done {
                return None;
            }
            let item = st.next().await;
            Some((item, st))
        })),
    }
}

/// What rescuing needs to know of the answer relayed so far.
#[derive(Default)]
struct Resume {
    /// Every text delta relayed since the answer (re)started, in order.
    text: String,
    /// The block the text went to.
    text_index: Option<u32>,
    /// Text deltas relayed (a floor on the tokens generated).
    text_deltas: u32,
    /// A tool call was being relayed: it cannot be continued.
    in_tool: bool,
    /// Usage before the serving continuation or restart.
    usage_before: Usage,
    /// A continuation serves: its block indexes follow the broken block.
    resumed: bool,
    /// Whitespace cut off the prefill that the continuation may repeat.
    skip: String,
}

struct Committed {
    gate: AttemptGate,
    /// The serving hop and the hops after it, with what each has spent.
    hops: Vec<(Hop, HopCount)>,
    serving: usize,
    /// The serving attempt, until its verdict.
    attempt: Option<Attempt>,
    obs: CallObservation,
    id: String,
    model: String,
    usage: Usage,
    events: EventStream,
    head: VecDeque<StreamEvent>,
    delivered: u64,
    done: bool,
    idle: Duration,
    /// The wait for the next event, armed once and moved only when it fires
    /// early: no timer is registered per event.
    timer: Option<WaitTimer>,
    mode: ResumeMode,
    resume: Resume,
}

/// The timer of [`Committed::upstream_next`]: the wait for an event ends at
/// `until`, the caller's deadline when `is_deadline` (else the idle
/// timeout). `sleep` may be armed for sooner; it is then moved to `until`.
struct WaitTimer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    until: tokio::time::Instant,
    is_deadline: bool,
}

/// How waiting for the next upstream event ended.
enum Next {
    Event(StreamEvent),
    Broke(ProviderError),
    Deadline,
}

/// What a rescue attempt sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rescue {
    /// A continuation of the text delivered.
    Continue,
    /// The request again, from the start.
    Restart,
}

impl Committed {
    fn hop(&self) -> &Hop {
        &self.hops[self.serving].0
    }

    /// The next event for the caller, or the error that ends the stream.
    async fn next(&mut self) -> Result<StreamEvent, GatewayError> {
        loop {
            let broke = match self.upstream_next().await {
                Next::Event(StreamEvent::KeepAlive) => continue,
                Next::Event(event) => match self.relay(event) {
                    Some(event) => return Ok(event),
                    None => continue,
                },
                Next::Broke(error) => error,
                Next::Deadline => return Err(self.deadline()),
            };
            let entry = self.hops[self.serving].0.entry.clone();
            if let Some(attempt) = &mut self.attempt {
                self.gate.settle(&entry, attempt, Some(&broke));
            }
            // Boxed: the rescue's future is large and rarely needed, and
            // every open stream would hold room for it otherwise.
            Box::pin(self.rescue(broke)).await?;
        }
    }

    /// The next upstream event, within the idle timeout and the caller's
    /// deadline. An event already waiting is taken without reading the
    /// clock; the wait (and its timer) starts only when there is none.
    async fn upstream_next(&mut self) -> Next {
        use std::task::Poll;
        if let Some(event) = self.head.pop_front() {
            return Next::Event(event);
        }
        let mut waiting = false;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(item) = self.events.poll_next_unpin(cx) {
                return Poll::Ready(match item {
                    Some(Ok(event)) => Next::Event(event),
                    Some(Err(error)) => Next::Broke(error),
                    None => Next::Broke(no_stop()),
                });
            }
            if !waiting {
                waiting = true;
                self.arm_wait();
            }
            let Some(timer) = self.timer.as_mut() else {
                return Poll::Pending;
            };
            loop {
                std::task::ready!(timer.sleep.as_mut().poll(cx));
                if tokio::time::Instant::now() >= timer.until {
                    return Poll::Ready(if timer.is_deadline {
                        Next::Deadline
                    } else {
                        Next::Broke(stalled(self.idle))
                    });
                }
                timer.sleep.as_mut().reset(timer.until);
            }
        })
        .await
    }

    /// Sets the wait for the next event to end after the idle timeout, or
    /// at the caller's deadline if that comes first.
    fn arm_wait(&mut self) {
        let remaining = self.gate.remaining();
        let wait = remaining.map_or(self.idle, |r| r.min(self.idle));
        // An idle timeout of years must not overflow the clock.
        let now = tokio::time::Instant::now();
        let until = now
            .checked_add(wait)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400));
        let is_deadline = remaining.is_some_and(|r| r <= self.idle);
        match &mut self.timer {
            Some(timer) => {
                timer.until = until;
                timer.is_deadline = is_deadline;
                // Armed for later (the idle timeout of another hop may be
                // shorter): move it now. Armed for sooner: it is moved
                // when it fires.
                if until < timer.sleep.deadline() {
                    timer.sleep.as_mut().reset(until);
                }
            }
            None => {
                self.timer = Some(WaitTimer {
                    sleep: Box::pin(tokio::time::sleep_until(until)),
                    until,
                    is_deadline,
                });
            }
        }
    }

    /// The caller's deadline ended the stream: no verdict for the breaker.
    fn deadline(&mut self) -> GatewayError {
        self.done = true;
        if let Some(mut attempt) = self.attempt.take() {
            AttemptGate::abandon(&mut attempt);
        }
        let error = GatewayError::DeadlineExceeded {
            provider: self.hop().entry.name.clone(),
            attempts: self.gate.attempts(),
            last_error: None,
        };
        self.obs.failed(&error);
        error
    }

    /// Bookkeeping for one event on its way to the caller; `None` when
    /// nothing is left of it to relay.
    fn relay(&mut self, event: StreamEvent) -> Option<StreamEvent> {
        let r = &mut self.resume;
        let event = match event {
            StreamEvent::Text { index, mut text } if r.resumed => {
                if !r.skip.is_empty() {
                    let same = common_prefix(&text, &r.skip);
                    if same == text.len() {
                        r.skip.drain(..same);
                        return None;
                    }
                    text.drain(..same);
                    r.skip.clear();
                }
                StreamEvent::Text {
                    index: remap(r, index),
                    text,
                }
            }
            StreamEvent::ToolUseStart { index, id, name } if r.resumed => {
                r.skip.clear();
                StreamEvent::ToolUseStart {
                    index: remap(r, index),
                    id,
                    name,
                }
            }
            StreamEvent::ToolInputJson { index, json } if r.resumed => StreamEvent::ToolInputJson {
                index: remap(r, index),
                json,
            },
            other => other,
        };
        match &event {
            StreamEvent::Start { id, model } => {
                self.id.clone_from(id);
                self.model.clone_from(model);
            }
            StreamEvent::Usage(u) => {
                let before = self.resume.usage_before;
                self.usage = Usage {
                    input_tokens: before.input_tokens.saturating_add(u.input_tokens),
                    output_tokens: before.output_tokens.saturating_add(u.output_tokens),
                };
                return Some(StreamEvent::Usage(self.usage));
            }
            StreamEvent::Stop(stop) => {
                self.done = true;
                let entry = self.hop().entry.clone();
                if let Some(mut attempt) = self.attempt.take() {
                    self.gate.settle(&entry, &mut attempt, None);
                }
                let attempts = self.gate.attempts();
                let (model, id, usage) = (self.model.clone(), self.id.clone(), self.usage);
                self.obs.succeeded(&model, &id, *stop, usage, attempts);
            }
            StreamEvent::Text { index, text } => {
                self.delivered += 1;
                let r = &mut self.resume;
                r.text.push_str(text);
                r.text_index = Some(*index);
                r.text_deltas = r.text_deltas.saturating_add(1);
            }
            StreamEvent::ToolUseStart { .. } | StreamEvent::ToolInputJson { .. } => {
                self.delivered += 1;
                self.resume.in_tool = true;
            }
            StreamEvent::Resumed { .. }
            | StreamEvent::Restarted { .. }
            | StreamEvent::KeepAlive => {}
        }
        Some(event)
    }

    /// Rescues a stream that broke after content, when the call allows it
    /// and the break is one its policy retries: a continuation from the
    /// serving provider, else from each later hop that accepts one (a
    /// provider whose breaker is open, or that just failed a continuation,
    /// is passed over); in restart mode, when no continuation can be made,
    /// the request again from the start. Every one is an attempt through
    /// the gate. The error returned is the last one: a failed
    /// continuation's own, or the break.
    async fn rescue(&mut self, broke: ProviderError) -> Result<(), GatewayError> {
        if self.mode == ResumeMode::Off || !retry::is_retryable(&self.hop().policy, &broke) {
            return Err(self.broken(broke));
        }
        let mut error = broke;
        let continuable = !self.resume.in_tool && !self.resume.text.trim_end().is_empty();
        let mut kinds = Vec::new();
        if continuable {
            kinds.push(Rescue::Continue);
        }
        if self.mode == ResumeMode::Restart {
            kinds.push(Rescue::Restart);
        }
        for kind in kinds {
            for at in self.serving..self.hops.len() {
                if kind == Rescue::Continue && !self.hops[at].0.entry.provider.supports_prefill() {
                    continue;
                }
                // A pool member's own fault (its key, its rate limit) goes
                // to another member of the same hop.
                loop {
                    match self.try_rescue(at, kind, &error).await {
                        Ok(()) => return Ok(()),
                        Err(Some((failure, again))) => {
                            error = failure;
                            if again && !self.done {
                                continue;
                            }
                        }
                        Err(None) => {}
                    }
                    break;
                }
                if self.done {
                    // The deadline ended it.
                    return Err(GatewayError::DeadlineExceeded {
                        provider: self.hop().entry.name.clone(),
                        attempts: self.gate.attempts(),
                        last_error: Some(error),
                    });
                }
            }
        }
        Err(self.broken(error))
    }

    /// One rescue attempt on hop `at`: `Ok` once it delivered content (the
    /// stream carries on with it); `Err(Some((e, again)))` when it failed
    /// with `e`, `again` when the failure was a pool member's own and
    /// another member takes the next rescue of this hop at once;
    /// `Err(None)` when the gate did not admit it.
    async fn try_rescue(
        &mut self,
        at: usize,
        kind: Rescue,
        broke: &ProviderError,
    ) -> Result<(), Option<(ProviderError, bool)>> {
        let (request, skip) = match kind {
            Rescue::Continue => self.continuation(at),
            Rescue::Restart => ((*self.hops[at].0.request).clone(), String::new()),
        };
        let (hop, count) = &mut self.hops[at];
        let mut attempt = self
            .gate
            .admit(hop, count, AttemptKind::Continuation, &self.obs)
            .map_err(|_| None)?;
        let entry = hop.entry.clone();
        let idle = hop.policy.stream_idle_timeout;
        tracing::info!(
            parent: &attempt.span,
            provider = %entry.name,
            attempt = attempt.number,
            "{} a stream that broke after content: {broke}",
            match kind {
                Rescue::Continue => "continuing",
                Rescue::Restart => "restarting",
            }
        );
        let provider = attempt.provider(&self.hops[at].0).clone();
        let outcome = attempt
            .run(open_until_commit(provider.as_ref(), &request, idle))
            .await;
        let took = attempt.took();
        let failure = match outcome {
            Outcome::Done((events, head)) => {
                self.gate.commit(&entry, &mut attempt);
                self.obs.attempt_done(&attempt.span, took, None);
                self.carry_on(at, kind, attempt, events, head, skip);
                return Ok(());
            }
            Outcome::Failed(failure) => {
                self.gate.settle(&entry, &mut attempt, Some(&failure));
                failure
            }
            Outcome::TimedOut if attempt.bound == Bound::Deadline => {
                AttemptGate::abandon(&mut attempt);
                self.deadline();
                return Err(None);
            }
            Outcome::TimedOut => self.gate.timed_out(&entry, &mut attempt),
        };
        let mut failure = failure;
        failure.message = format!(
            "{}; it was the {} of a stream that broke after content ({broke})",
            failure.message,
            match kind {
                Rescue::Continue => "continuation",
                Rescue::Restart => "restart",
            }
        );
        let (hop, count) = &self.hops[at];
        let again =
            self.gate
                .another_member_serves(hop, count, &failure, AttemptKind::Continuation);
        let decision = if again {
            retry::Decision::Retry {
                wait: Duration::ZERO,
            }
        } else {
            retry::Decision::GiveUp(retry::GiveUp::NotRetryable)
        };
        self.obs
            .attempt_done(&attempt.span, took, Some((&failure, decision)));
        Err(Some((failure, again)))
    }

    /// The continuation request for hop `at`: its conversation plus an
    /// assistant turn holding the text delivered (after a prefill the
    /// request already had), without trailing whitespace, and `max_tokens`
    /// less what was generated. Also returns the whitespace cut off.
    fn continuation(&self, at: usize) -> (ChatRequest, String) {
        let mut request = (*self.hops[at].0.request).clone();
        let delivered = self.resume.text.as_str();
        let text = match request.messages.last_mut() {
            Some(last) if last.role == Role::Assistant => match last.content.last_mut() {
                Some(Content::Text(t)) => {
                    t.push_str(delivered);
                    t
                }
                _ => {
                    last.content.push(Content::Text(delivered.to_string()));
                    match last.content.last_mut() {
                        Some(Content::Text(t)) => t,
                        _ => return (request, String::new()),
                    }
                }
            },
            _ => {
                request.messages.push(Message {
                    role: Role::Assistant,
                    content: vec![Content::Text(delivered.to_string())],
                });
                match request
                    .messages
                    .last_mut()
                    .and_then(|m| m.content.last_mut())
                {
                    Some(Content::Text(t)) => t,
                    _ => return (request, String::new()),
                }
            }
        };
        let kept = text.trim_end().len();
        let skip = text.split_off(kept);
        let generated = self.usage.output_tokens.max(self.resume.text_deltas);
        request.max_tokens = request
            .max_tokens
            .map(|max| max.saturating_sub(generated).max(1));
        (request, skip)
    }

    /// Carries on with a rescue attempt on hop `at` that delivered content.
    fn carry_on(
        &mut self,
        at: usize,
        kind: Rescue,
        attempt: Attempt,
        events: EventStream,
        head: VecDeque<StreamEvent>,
        skip: String,
    ) {
        let number = attempt.number;
        let provider = self.hops[at].0.entry.name.clone();
        let usage = self.usage;
        let r = &mut self.resume;
        let marker = match kind {
            Rescue::Continue => {
                let characters_delivered = r.text.chars().count() as u64;
                r.resumed = true;
                r.skip = skip;
                StreamEvent::Resumed {
                    attempt: number,
                    provider,
                    characters_delivered,
                }
            }
            Rescue::Restart => {
                // The new answer stands alone: block indexes from 0.
                *r = Resume::default();
                StreamEvent::Restarted {
                    attempt: number,
                    provider,
                }
            }
        };
        self.resume.usage_before = usage;
        self.serving = at;
        self.idle = self.hops[at].0.policy.stream_idle_timeout;
        self.attempt = Some(attempt);
        self.events = events;
        self.head = head
            .into_iter()
            .filter(|e| !matches!(e, StreamEvent::Start { .. }))
            .collect();
        self.head.push_front(marker);
    }

    fn broken(&mut self, error: ProviderError) -> GatewayError {
        self.done = true;
        self.attempt.take();
        let error = GatewayError::Upstream {
            provider: self.hop().entry.name.clone(),
            attempts: self.gate.attempts(),
            error,
            delivered: Some(self.delivered),
            budget_exhausted: false,
        };
        self.obs.failed(&error);
        error
    }
}

impl Drop for Committed {
    fn drop(&mut self) {
        if !self.done {
            // The caller went away before the end: the serving attempt's
            // permit is abandoned with it.
            self.obs.failed(&GatewayError::Upstream {
                provider: self.hop().entry.name.clone(),
                attempts: self.gate.attempts(),
                error: ProviderError::new(ErrorClass::Cancelled, "the caller cancelled the stream"),
                delivered: Some(self.delivered),
                budget_exhausted: false,
            });
        }
    }
}

/// A continuation's block index, moved to follow the broken block.
fn remap(r: &Resume, index: u32) -> u32 {
    r.text_index.unwrap_or(0).saturating_add(index)
}

/// The length in bytes of the longest common prefix of `a` and `b`, on a
/// character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or_else(|| a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefixes_stop_at_the_first_difference() {
        assert_eq!(common_prefix(" Next", " "), 1);
        assert_eq!(common_prefix("Next", " "), 0);
        assert_eq!(common_prefix("\n", "\n\n"), 1);
        assert_eq!(common_prefix("\n\nA", "\n\n"), 2);
        assert_eq!(common_prefix("", " "), 0);
    }
}
