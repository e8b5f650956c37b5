//! The `embedded` provider: a local GGUF model run inside the gateway by
//! llama.cpp (CPU), behind the same [`Provider`] trait as the HTTP
//! providers.
//!
//! What it owns:
//! - **Sessions.** `max_sessions` generations run at once, each on its own
//!   thread with its own llama.cpp context and KV cache. A request waits
//!   for a free session up to `queue_wait_ms` in a fair (FIFO) queue, then
//!   fails with class `busy`. The provider never loops or sleeps on a busy
//!   model: whether and when to try again is the registry's retry policy
//!   (`busy` is in the default `retry_on`), like any other transient
//!   failure.
//! - **Generation off the runtime.** Each session's thread runs its
//!   forward passes on `threads` threads of llama.cpp's own, so inference
//!   never blocks the async runtime. Text streams through a bounded channel
//!   token by token; when the caller goes away the channel closes and
//!   generation stops before the next token. A caller that stops reading
//!   holds its session at most `reader_timeout_ms`; then the generation
//!   ends and the caller gets `cancelled`.
//! - **The prompt** comes from the file's own chat template
//!   ([`template`]), tokenized by llama.cpp with the file's own vocabulary
//!   and pre-tokenizer.
//! - **A prefix cache.** A free session is chosen by the longest common
//!   prefix of the tokens its KV cache holds with the new prompt, and only
//!   the rest of the prompt is prefilled: the next turn of a conversation
//!   runs only its new tokens. It takes no memory beyond the sessions' own
//!   KV caches (`max_sessions` x `context_length` tokens, logged at start-up);
//!   `prefix_cache = false` turns it off.
//!
//! Tools are not supported: a request that forces a tool call, or carries
//! tool calls or results, is refused as `invalid-request`; tools offered
//! with `auto` are ignored.

mod generate;
mod model;
pub mod template;
pub mod tiny;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, stream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use self::generate::{Counters, Generated, Job, Reader};
use self::model::{Model, Session};
use self::template::{ChatTemplate, Turn};
use super::{EventStream, LocalModelInfo, Provider};
use crate::chat::{ChatRequest, ChatResponse, Content, Role, StreamEvent, ToolChoice};
use crate::config::{ConfigError, EmbeddedConfig};
use crate::error::{ErrorClass, ProviderError};

pub use self::model::DEFAULT_CONTEXT_LENGTH;

/// Tokens generated when neither the request nor the configuration says.
pub const DEFAULT_MAX_TOKENS: u32 = 512;
/// Sampling temperature when neither the request nor the configuration says.
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
/// Nucleus sampling when neither the request nor the configuration says.
pub const DEFAULT_TOP_P: f32 = 0.95;
/// How long a request waits for a free session when the configuration
/// does not say: long enough to absorb a short burst in the fair queue,
/// short enough that a saturated model answers `busy` and the registry's
/// policy decides.
pub const DEFAULT_QUEUE_WAIT_MS: u64 = 5_000;
/// Text pieces a generation may run ahead of its reader.
pub const CHANNEL_CAPACITY: usize = 16;
/// How long a session waits for a caller that has stopped reading, when
/// the configuration does not say: as long as the default silence allowed
/// between two stream events.
pub const DEFAULT_READER_TIMEOUT_MS: u64 = 30_000;

/// What the sessions share: the model, the template and the idle
/// sessions.
struct Engine {
    model: Arc<Model>,
    template: ChatTemplate,
    idle: Arc<Mutex<Vec<Worker>>>,
    context_length: usize,
    counters: Arc<Counters>,
}

/// A session's thread, as the provider holds it while it is idle: where
/// to send its next job, and the tokens its cache holds (which go with the
/// job to the thread, and come back with the handle). Dropping the last
/// handle ends the thread.
struct Worker {
    jobs: std::sync::mpsc::Sender<Work>,
    cached: Vec<u32>,
}

/// One generation handed to a session's thread, with the session's permit
/// and handle, both given back when it ends.
struct Work {
    job: Job,
    tx: generate::Sender,
    permit: OwnedSemaphorePermit,
    worker: Worker,
}

/// A session's thread: makes its context, says whether that worked, then
/// runs the jobs it is sent until the provider is gone.
fn run_worker(
    model: &Model,
    threads: usize,
    prefix_cache: bool,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    jobs: std::sync::mpsc::Receiver<Work>,
    idle: std::sync::Weak<Mutex<Vec<Worker>>>,
    counters: &Counters,
) {
    let mut session = match Session::new(model, threads, prefix_cache) {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    drop(ready);
    while let Ok(work) = jobs.recv() {
        let Work {
            job,
            tx,
            permit,
            mut worker,
        } = work;
        // The tokens the cache holds travel with the handle: the thread has
        // them while it generates, the idle list while it waits.
        session.set_cached(std::mem::take(&mut worker.cached));
        let reader = job.reader.clone();
        let last = generate::generate(&mut session, model, job, &tx, counters);
        worker.cached = session.take_cached();
        // A caller that does not read has filled the channel: the end waits
        // for it while the session is still its own, so no other request
        // is handed a thread stuck on this send.
        let last = match last {
            Some(last) if tx.capacity() == 0 => {
                let _ = reader.send(&tx, last);
                None
            }
            last => last,
        };
        // Free the session before the caller can see the end, so that a
        // caller's next request never finds its own session still busy.
        if let Some(idle) = idle.upgrade() {
            idle.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(worker);
        }
        drop(permit);
        // This thread is the channel's only sender and it had room: this
        // send does not wait.
        if let Some(last) = last {
            let _ = tx.blocking_send(last);
        }
    }
}

/// Threads per session when the configuration does not say: the cores
/// shared out among the sessions, at least one each. llama.cpp's threads
/// spin at a barrier for each other at every layer, so sessions that
/// together ask for more threads than there are cores make every token
/// wait on the scheduler.
fn default_threads(max_sessions: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cores / max_sessions.max(1)).max(1)
}

/// A model running inside the gateway.
pub struct EmbeddedProvider {
    model: String,
    info: LocalModelInfo,
    engine: Arc<Engine>,
    sessions: Arc<Semaphore>,
    max_sessions: usize,
    queue_wait: Duration,
    max_tokens: u32,
    temperature: f32,
    top_p: f32,
    seed: Option<u64>,
    reader_timeout: Duration,
    calls: AtomicU64,
    /// Requests refused `busy` (no session freed within `queue_wait`).
    refused_busy: AtomicU64,
}

impl std::fmt::Debug for EmbeddedProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedProvider")
            .field("model", &self.model)
            .field("info", &self.info)
            .field("max_sessions", &self.max_sessions)
            .finish()
    }
}

impl EmbeddedProvider {
    /// Loads the model file of `[providers.<name>]`. Fails naming the path
    /// when the file is missing, not GGUF, or of an unsupported kind.
    pub fn new(name: &str, c: &EmbeddedConfig) -> Result<Self, ConfigError> {
        let path = Path::new(&c.model_path);
        let fail = |why: String| {
            ConfigError(format!(
                "provider `{name}`: config key `providers.{name}.model_path`: {}: {why}",
                path.display()
            ))
        };
        let max_sessions = c.max_sessions.unwrap_or(1).max(1) as usize;
        let loaded = model::load(path, c.context_length).map_err(fail)?;
        let template = ChatTemplate::new(
            loaded.chat_template.clone(),
            &loaded.bos_text,
            &loaded.eos_text,
        )
        .map_err(fail)?;
        let threads = c.threads.unwrap_or_else(|| default_threads(max_sessions));
        let prefix_cache = c.prefix_cache.unwrap_or(true);
        let model_name = c.model.clone().unwrap_or_else(|| {
            path.file_stem()
                .map_or_else(|| "embedded".into(), |s| s.to_string_lossy().into_owned())
        });
        let info = loaded.info.clone();
        let kv_cache_mib = model::kv_cache_bytes(&loaded) / (1 << 20);
        let vocabulary = loaded.vocab_size();
        let from_file = template.is_from_file();
        let loaded = Arc::new(loaded);
        let idle = Arc::new(Mutex::new(Vec::with_capacity(max_sessions)));
        let counters = Arc::new(Counters::default());
        for i in 0..max_sessions {
            let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (model, weak, count) = (loaded.clone(), Arc::downgrade(&idle), counters.clone());
            std::thread::Builder::new()
                .name(format!("embedded-{i}"))
                .spawn(move || {
                    run_worker(
                        &model,
                        threads,
                        prefix_cache,
                        ready_tx,
                        jobs_rx,
                        weak,
                        &count,
                    );
                })
                .map_err(|e| {
                    ConfigError(format!(
                        "provider `{name}`: cannot start a session thread: {e}"
                    ))
                })?;
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(fail(e)),
                Err(_) => return Err(fail("its session thread ended while starting".into())),
            }
            idle.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(Worker {
                    jobs: jobs_tx,
                    cached: Vec::new(),
                });
        }
        tracing::info!(
            provider = name,
            model = %model_name,
            parameters = info.parameter_count,
            context_length = info.context_length,
            vocabulary,
            chat_template = if from_file { "file" } else { "fallback" },
            max_sessions,
            threads,
            kv_cache_mib_per_session = kv_cache_mib,
            prefix_cache,
            "loaded the embedded model"
        );
        Ok(Self {
            model: model_name,
            engine: Arc::new(Engine {
                model: loaded,
                template,
                idle,
                context_length: info.context_length as usize,
                counters,
            }),
            info,
            sessions: Arc::new(Semaphore::new(max_sessions)),
            max_sessions,
            queue_wait: Duration::from_millis(c.queue_wait_ms.unwrap_or(DEFAULT_QUEUE_WAIT_MS)),
            max_tokens: c.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            reader_timeout: Duration::from_millis(
                c.reader_timeout_ms.unwrap_or(DEFAULT_READER_TIMEOUT_MS),
            ),
            temperature: c.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_p: c.top_p.unwrap_or(DEFAULT_TOP_P),
            seed: c.seed,
            calls: AtomicU64::new(0),
            refused_busy: AtomicU64::new(0),
        })
    }

    /// Tokens generated since start-up, over all requests.
    pub fn generated_tokens(&self) -> u64 {
        self.engine.counters.generated.load(Ordering::Relaxed)
    }

    /// Prompt tokens run through the model since start-up: those the
    /// prefix cache did not already hold.
    pub fn prefilled_tokens(&self) -> u64 {
        self.engine.counters.prefilled.load(Ordering::Relaxed)
    }

    /// Requests refused `busy` since start-up (every session stayed busy
    /// for their whole `queue_wait_ms`).
    pub fn refused_busy(&self) -> u64 {
        self.refused_busy.load(Ordering::Relaxed)
    }

    /// Sessions generating right now.
    pub fn busy_sessions(&self) -> usize {
        self.max_sessions - self.sessions.available_permits()
    }

    /// Builds the generation job for `req`: validates what this provider
    /// cannot do, renders the prompt and checks it fits the context.
    fn job(&self, req: &ChatRequest) -> Result<Job, ProviderError> {
        let invalid = |msg: &str| ProviderError::new(ErrorClass::InvalidRequest, msg);
        if matches!(req.tool_choice, ToolChoice::Any | ToolChoice::Tool(_)) {
            return Err(invalid("the embedded provider cannot call tools"));
        }
        generate::check_stop_sequences(&req.stop_sequences).map_err(|why| invalid(&why))?;
        let mut turns = Vec::with_capacity(req.messages.len() + 1);
        if !req.system.is_empty() {
            turns.push(Turn {
                role: "system",
                content: req.system.clone(),
            });
        }
        for m in &req.messages {
            let mut content = String::new();
            for block in &m.content {
                match block {
                    Content::Text(t) => content.push_str(t),
                    Content::ToolUse { .. } | Content::ToolResult { .. } => {
                        return Err(invalid(
                            "the embedded provider cannot take tool calls or tool results",
                        ));
                    }
                }
            }
            turns.push(Turn {
                role: match m.role {
                    Role::User => "user",
                    Role::Assistant => "assistant",
                },
                content,
            });
        }
        let prompt_text = self
            .engine
            .template
            .render(&turns)
            .map_err(|e| invalid(&e))?;
        let prompt = self.engine.model.encode(&prompt_text);
        let context = self.engine.context_length;
        if prompt.len() >= context {
            return Err(ProviderError::new(
                ErrorClass::ContextLength,
                format!(
                    "the prompt is {} tokens; the model's context is {context}",
                    prompt.len()
                ),
            ));
        }
        let seed = self.seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(self.calls.load(Ordering::Relaxed));
            h.finish()
        });
        Ok(Job {
            prompt,
            max_tokens: req.max_tokens.unwrap_or(self.max_tokens),
            context_length: context,
            temperature: f64::from(req.temperature.unwrap_or(self.temperature)),
            top_p: f64::from(req.top_p.unwrap_or(self.top_p)),
            seed,
            stop_sequences: req.stop_sequences.clone(),
            reader: Reader::new(self.reader_timeout),
        })
    }

    /// Waits for a free session, in arrival order, up to `queue_wait`;
    /// of the free sessions, takes the one whose cache holds the longest
    /// start of `prompt`.
    async fn session(&self, prompt: &[u32]) -> Result<Reserved, ProviderError> {
        let busy = || {
            self.refused_busy.fetch_add(1, Ordering::Relaxed);
            ProviderError::new(
                ErrorClass::Busy,
                format!(
                    "all {} session(s) of the local model are busy (waited {} ms for one)",
                    self.max_sessions,
                    self.queue_wait.as_millis()
                ),
            )
        };
        let permit = match self.sessions.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) if self.queue_wait.is_zero() => return Err(busy()),
            Err(_) => {
                match tokio::time::timeout(self.queue_wait, self.sessions.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) | Err(_) => return Err(busy()),
                }
            }
        };
        let worker = {
            let mut idle = self
                .engine
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let best = idle
                .iter()
                .enumerate()
                .max_by_key(|(_, w)| model::common_prefix(&w.cached, prompt))
                .map(|(i, _)| i);
            best.map(|i| idle.swap_remove(i))
        }
        .ok_or_else(|| {
            ProviderError::new(ErrorClass::ServerError, "no idle session for a free permit")
        })?;
        Ok(Reserved {
            worker: Some(worker),
            engine: self.engine.clone(),
            permit: Some(permit),
        })
    }

    /// Starts `job` on the reserved session's thread; its output arrives
    /// on the returned channel.
    fn start(&self, mut reserved: Reserved, job: Job) -> Answer {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let gave_up = job.reader.gave_up.clone();
        if let (Some(worker), Some(permit)) = (reserved.worker.take(), reserved.permit.take()) {
            let jobs = worker.jobs.clone();
            let work = Work {
                job,
                tx,
                permit,
                worker,
            };
            if let Err(std::sync::mpsc::SendError(work)) = jobs.send(work) {
                // The thread is gone (it cannot be, while its handle lives):
                // the receiver sees the channel close, an error.
                let _ = work.tx.try_send(Err(ended_early()));
            }
        }
        Answer { rx, gave_up }
    }

    fn next_id(&self) -> String {
        format!("embedded-{}", self.calls.fetch_add(1, Ordering::Relaxed))
    }
}

/// A free session taken for one request, before its job starts; back to
/// the idle sessions on drop (a request that never started), then its
/// permit frees the session.
struct Reserved {
    worker: Option<Worker>,
    engine: Arc<Engine>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            self.engine
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(w);
        }
    }
}

/// A generation's output as its caller reads it.
struct Answer {
    rx: mpsc::Receiver<Result<Generated, ProviderError>>,
    /// Why the generation ended without its last message, if it gave up on
    /// a caller that did not read.
    gave_up: Arc<std::sync::OnceLock<ProviderError>>,
}

impl Answer {
    /// The next message; once the channel has closed without `Finished`,
    /// the error that explains it.
    async fn next(&mut self) -> Result<Generated, ProviderError> {
        match self.rx.recv().await {
            Some(item) => item,
            None => Err(self.gave_up.get().cloned().unwrap_or_else(ended_early)),
        }
    }
}

fn ended_early() -> ProviderError {
    ProviderError::new(
        ErrorClass::ServerError,
        "the local model stopped before finishing its answer",
    )
}

impl Provider for EmbeddedProvider {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn default_model(&self) -> &str {
        &self.model
    }

    fn supports_tools(&self) -> bool {
        false
    }

    fn local_model(&self) -> Option<LocalModelInfo> {
        Some(self.info.clone())
    }

    fn complete<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        async move {
            let job = self.job(req)?;
            let session = self.session(&job.prompt).await?;
            // A session took the request: the model is answering, so a
            // timeout from here on is a slow answer, not a silent route.
            super::mark_responded();
            let id = self.next_id();
            let mut answer = self.start(session, job);
            let mut text = String::new();
            loop {
                match answer.next().await? {
                    Generated::Text(t) => text.push_str(&t),
                    Generated::Finished { stop, usage } => {
                        return Ok(ChatResponse {
                            id,
                            model: req.model_or(&self.model).to_string(),
                            content: if text.is_empty() {
                                Vec::new()
                            } else {
                                vec![Content::Text(text)]
                            },
                            stop_reason: stop,
                            usage,
                        });
                    }
                }
            }
        }
        .boxed()
    }

    fn stream<'a>(
        &'a self,
        req: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<EventStream, ProviderError>> {
        async move {
            let job = self.job(req)?;
            let session = self.session(&job.prompt).await?;
            // A session took the request: the model is answering, so a
            // timeout from here on is a slow answer, not a silent route.
            super::mark_responded();
            let id = self.next_id();
            let answer = self.start(session, job);
            let start = StreamEvent::Start {
                id,
                model: req.model_or(&self.model).to_string(),
            };
            let generated = stream::unfold(Some(answer), |answer| async move {
                let mut answer = answer?;
                let item = answer.next().await;
                // After the end or an error, nothing more is read.
                let more = matches!(item, Ok(Generated::Text(_)));
                Some((item, more.then_some(answer)))
            })
            .flat_map(|item| {
                let events: Vec<Result<StreamEvent, ProviderError>> = match item {
                    Ok(Generated::Text(text)) => vec![Ok(StreamEvent::Text { index: 0, text })],
                    Ok(Generated::Finished { stop, usage }) => {
                        vec![Ok(StreamEvent::Usage(usage)), Ok(StreamEvent::Stop(stop))]
                    }
                    Err(e) => vec![Err(e)],
                };
                stream::iter(events)
            });
            let events = stream::once(async move { Ok(start) }).chain(generated);
            Ok(Box::pin(events) as EventStream)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::default_threads;

    #[test]
    fn default_threads_share_the_cores_out_among_the_sessions() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(default_threads(1), cores);
        for sessions in 1..=4 * cores {
            let each = default_threads(sessions);
            assert!(each >= 1, "{sessions} sessions: no thread");
            // Never more threads in all than cores, unless there are more
            // sessions than cores (then one each).
            assert!(
                each * sessions <= cores.max(sessions),
                "{sessions} sessions x {each} threads on {cores} cores"
            );
        }
        assert_eq!(default_threads(0), cores, "0 is read as one session");
    }
}
