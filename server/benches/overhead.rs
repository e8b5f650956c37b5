//! The gateway's cost against the floor, printed as figures (issue 12).
//!
//! One process hosts everything, on loopback only, each part on its own
//! tokio runtime with named threads:
//! - `up*`: a minimal OpenAI-shaped upstream (keep-alive HTTP/1.1; JSON
//!   answers, fast SSE streams, slow SSE streams);
//! - `floor*`: the floor, a tonic service with a pass-through `Bytes` codec
//!   that POSTs a fixed body through reqwest and relays the answer's bytes:
//!   no decode, no translation, no telemetry, the least a gRPC -> HTTP
//!   gateway can cost here;
//! - `gw*`: provider-gateway with an `openai` provider, wired as `main.rs`
//!   wires it (the default telemetry: `info` logs, metrics, no exporter);
//! - `load*`: the callers, one HTTP/2 connection per target, sending
//!   pre-encoded requests and not decoding answers (the same work for both
//!   targets).
//!
//! "Server CPU" is the CPU time of the server's own threads, "process CPU"
//! that of the whole bench process (upstream, load and server together):
//! the scheduler's nanosecond count (`se.sum_exec_runtime` in
//! `/proc/self/task/*/sched`) where the kernel shows it, else utime+stime
//! in 100 Hz ticks (`/proc/self/task/*/stat`, `/proc/self/stat`).
//! RSS is the whole process's (`/proc/self/status`).
//!
//! The open-streams figure's slow upstream and callers run in a child
//! process (this binary again, `OVERHEAD_CHILD` set): this process then
//! holds one socket per stream (gateway -> upstream), so 10,000 streams fit
//! in an fd limit of 20,000, and its RSS growth is the gateway's. Every loop is bounded
//! by a request count. Floor and gateway rounds alternate (c=1: their
//! samples pooled; c=8 and c=32: in ABBA order, and each ratio is the
//! median of the rounds' own gateway / floor ratios, so a change of the
//! box's speed between rounds lands on both sides of a ratio alike).
//!
//! `cargo bench -p provider-gateway-server --bench overhead`
//!
//! For callgrind, `OVERHEAD_PROFILE=N` runs only N sequential gateway
//! requests (after a warm-up) and exits: run it with two values of N and
//! divide the difference in instructions by the difference in N
//! (`OVERHEAD_PROFILE_FLOOR=1`: the floor's requests instead).
//! `OVERHEAD_PROFILE_STREAMS=N` does the same with N streams of
//! `STREAM_DELTAS` deltas. `OVERHEAD_OPEN_STREAMS_ONLY=1` prints only the
//! open-streams figure, `OVERHEAD_RELAY_ONLY=1` only the stream-relay figure.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use prost::Message as _;
use provider_gateway_client::{CallOptions, GatewayClient, request};
use provider_gateway_server::{Config, Registry, ServerOptions, serve_listeners, telemetry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::server::TcpIncoming;

const COMPLETE: &str = "/provider_gateway.v1.ProviderGateway/Complete";
const STREAM: &str = "/provider_gateway.v1.ProviderGateway/Stream";

/// Rounds of c=1 samples for each target.
const ROUNDS: usize = 5;
const WARMUP: usize = 300;
const SEQUENTIAL: usize = 2_000;
/// Requests per round at each concurrency.
const CONCURRENT: [(usize, usize); 2] = [(8, 30_000), (32, 50_000)];
/// Rounds of floor and gateway at each concurrency, in ABBA order; the
/// ratios are the median of the rounds' own ratios.
const PAIRED_ROUNDS: usize = 9;
const STREAM_DELTAS: usize = 10_000;
/// Streams of `STREAM_DELTAS` measured (enough ticks of CPU to count).
const STREAM_REPEATS: usize = 15;
/// Open streams held at once, each on its own HTTP/2 stream (100 to a
/// connection), their upstream and callers in the child process.
const OPEN_STREAMS: usize = 10_000;
/// The slow upstream's deltas, one a second.
const SLOW_DELTAS: usize = 4;
/// Paired c=32 rounds run again after the open streams.
const AFTER_STREAMS_ROUNDS: usize = 3;

const BODY: &str = r#"{"id":"c","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello world"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
/// What the floor POSTs: what the gateway sends for `request::user("hello world")`.
const FLOOR_BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello world"}]}"#;
const DELTA: &str =
    r#"data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"x"}}]}"#;
const FINISH: &str =
    r#"data: {"id":"c","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;

// === the upstream ===

fn chunk(data: &str) -> Vec<u8> {
    let event = format!("{data}\n\n");
    format!("{:x}\r\n{event}\r\n", event.len()).into_bytes()
}

/// Answers one request on `socket`: JSON, a fast SSE stream of
/// `STREAM_DELTAS` deltas, or (model `slow`) one delta a second.
async fn answer(socket: &mut tokio::net::TcpStream, request: &[u8]) -> std::io::Result<()> {
    let text = String::from_utf8_lossy(request);
    if !text.contains(r#""stream":true"#) {
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        return socket.write_all(response.as_bytes()).await;
    }
    socket
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        .await?;
    let delta = chunk(DELTA);
    if text.contains(r#""model":"slow""#) {
        for i in 0..SLOW_DELTAS {
            if i > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            socket.write_all(&delta).await?;
        }
    } else {
        // One event per write, as a model's tokens arrive.
        for _ in 0..STREAM_DELTAS {
            socket.write_all(&delta).await?;
        }
    }
    socket.write_all(&chunk(FINISH)).await?;
    socket.write_all(&chunk("data: [DONE]")).await?;
    socket.write_all(b"0\r\n\r\n").await
}

async fn upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            socket.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(1024);
                let mut tmp = [0u8; 2048];
                loop {
                    // Read one request: head, then content-length bytes.
                    let (head_end, length) = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (i + 4, length);
                        }
                        match socket.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    while buf.len() < head_end + length {
                        match socket.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    let request: Vec<u8> = buf.drain(..head_end + length).collect();
                    if answer(&mut socket, &request[head_end..]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

// === the floor ===

/// A codec that passes message bytes through untouched.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

#[derive(Clone)]
struct Floor {
    http: reqwest::Client,
    url: Arc<str>,
}

impl tonic::server::NamedService for Floor {
    const NAME: &'static str = "provider_gateway.v1.ProviderGateway";
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Floor {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let relay = FloorRelay(self.clone());
        Box::pin(async move { Ok(tonic::server::Grpc::new(RawCodec).unary(relay, req).await) })
    }
}

struct FloorRelay(Floor);

impl tonic::server::UnaryService<Bytes> for FloorRelay {
    type Response = Bytes;
    type Future = tonic::codegen::BoxFuture<tonic::Response<Bytes>, Status>;

    fn call(&mut self, _request: tonic::Request<Bytes>) -> Self::Future {
        let floor = self.0.clone();
        Box::pin(async move {
            let response = floor
                .http
                .post(&*floor.url)
                .header("content-type", "application/json")
                .body(FLOOR_BODY)
                .send()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let body = response
                .bytes()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            Ok(tonic::Response::new(body))
        })
    }
}

async fn floor(upstream: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Floor {
        http: reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .unwrap(),
        url: format!("{upstream}/chat/completions").into(),
    };
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

// === the gateway ===

/// The gateway as `main.rs` wires it: registry, telemetry (the global
/// subscriber, `info`, no exporter), metrics.
/// `slow` is the provider of the open-streams figure.
async fn gateway(upstream: &str, slow_upstream: &str) -> String {
    let toml = format!(
        "default_provider = \"o\"\n\
         [limits]\nmax_concurrent_streams = {}\n\
         [providers.o]\nkind = \"openai\"\nbase_url = \"{upstream}\"\napi_key_env = \"BENCH_KEY\"\n\
         [providers.slow]\nkind = \"openai\"\nbase_url = \"{slow_upstream}\"\napi_key_env = \"BENCH_KEY\"\n",
        OPEN_STREAMS + 64
    );
    let env: HashMap<String, String> = [("BENCH_KEY".to_string(), "k".to_string())].into();
    let config = Config::from_toml(&toml).unwrap();
    let telemetry = telemetry::init(&config.telemetry, &env).unwrap();
    let registry = Arc::new(
        Registry::from_config(&config, &env)
            .unwrap()
            .with_metrics(telemetry.metrics()),
    );
    let options = ServerOptions::from_config(&config, &env).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _telemetry = telemetry;
        serve_listeners(listener, None, registry, options, std::future::pending())
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

// === measuring ===

/// CPU time of the threads whose name starts with `prefix`, or of the
/// whole process for `None`: the scheduler's own count in nanoseconds
/// (`se.sum_exec_runtime` of `/proc/self/task/*/sched`) where the kernel
/// has it, else utime+stime in 100 Hz ticks (`/proc/self/task/*/stat`).
fn cpu(prefix: Option<&str>) -> Duration {
    // One source for the whole run: a before and an after in different
    // units would make no figure.
    static PRECISE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *PRECISE.get_or_init(|| precise_cpu(None).is_some()) {
        precise_cpu(prefix).unwrap_or_default()
    } else {
        tick_cpu(prefix)
    }
}

/// The scheduler's count of the threads' CPU time, if `/proc` shows it.
fn precise_cpu(prefix: Option<&str>) -> Option<Duration> {
    fn runtime(sched: &str) -> Option<Duration> {
        let line = sched
            .lines()
            .find(|l| l.starts_with("se.sum_exec_runtime"))?;
        let ms: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
        Some(Duration::from_secs_f64(ms / 1e3))
    }
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        if prefix.is_some_and(|p| !stat[open + 1..close].starts_with(p)) {
            continue;
        }
        // A thread that ends between listing and reading is skipped.
        let Ok(sched) = std::fs::read_to_string(task.path().join("sched")) else {
            continue;
        };
        total += runtime(&sched)?;
    }
    Some(total)
}

/// utime+stime in ticks, as `/proc/self/task/*/stat` (or `/proc/self/stat`)
/// shows them.
fn tick_cpu(prefix: Option<&str>) -> Duration {
    fn ticks(stat: &str) -> Option<(&str, u64)> {
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
        // After the name: state is field 3, utime 14, stime 15.
        let t = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((&stat[open + 1..close], t))
    }
    let total = match prefix {
        None => std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| ticks(&s).map(|(_, t)| t))
            .unwrap_or(0),
        Some(prefix) => std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
            .filter_map(|s| ticks(&s).and_then(|(name, t)| name.starts_with(prefix).then_some(t)))
            .sum(),
    };
    Duration::from_millis(total * 10)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Clone)]
struct Target {
    name: &'static str,
    threads: &'static str,
    channel: tonic::transport::Channel,
}

async fn connect(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap()
}

async fn call(channel: &tonic::transport::Channel, body: &Bytes) {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let response: tonic::Response<Bytes> = grpc
        .unary(
            tonic::Request::new(body.clone()),
            PathAndQuery::from_static(COMPLETE),
            RawCodec,
        )
        .await
        .unwrap();
    assert!(!response.get_ref().is_empty());
}

struct Run {
    rps: f64,
    server_cpu_per_request: Duration,
    process_cpu_per_request: Duration,
}

/// Each target's figures over paired rounds, in round order.
struct Paired {
    rps: HashMap<&'static str, Vec<f64>>,
    /// Server CPU per request, in us.
    server: HashMap<&'static str, Vec<f64>>,
    /// Whole-process CPU per request, in us.
    process: HashMap<&'static str, Vec<f64>>,
}

/// `rounds` rounds of `total` requests at `concurrency` on each target, in
/// ABBA order: the order flips every round, so a drift of the box's speed
/// lands on both targets alike.
async fn paired_rounds(
    [a, b]: [&Target; 2],
    body: &Bytes,
    concurrency: usize,
    total: usize,
    rounds: usize,
) -> Paired {
    let mut paired = Paired {
        rps: HashMap::new(),
        server: HashMap::new(),
        process: HashMap::new(),
    };
    for round in 0..rounds {
        let order = if round % 2 == 0 { [a, b] } else { [b, a] };
        for target in order {
            let run = concurrent(target, body, concurrency, total).await;
            paired.rps.entry(target.name).or_default().push(run.rps);
            paired
                .server
                .entry(target.name)
                .or_default()
                .push(us(run.server_cpu_per_request));
            paired
                .process
                .entry(target.name)
                .or_default()
                .push(us(run.process_cpu_per_request));
        }
    }
    paired
}

/// Each round's gateway figure over the floor's of the same round, then
/// the median of those ratios.
fn paired(map: &HashMap<&'static str, Vec<f64>>) -> f64 {
    median(
        map["gateway"]
            .iter()
            .zip(&map["floor"])
            .map(|(g, f)| g / f)
            .collect(),
    )
}

async fn concurrent(target: &Target, body: &Bytes, concurrency: usize, total: usize) -> Run {
    let per_task = total / concurrency;
    let (server, process) = (cpu(Some(target.threads)), cpu(None));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (channel, body) = (target.channel.clone(), body.clone());
            tokio::spawn(async move {
                for _ in 0..per_task {
                    call(&channel, &body).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let n = (per_task * concurrency) as u32;
    Run {
        rps: f64::from(n) / elapsed.as_secs_f64(),
        server_cpu_per_request: cpu(Some(target.threads)).saturating_sub(server) / n,
        process_cpu_per_request: cpu(None).saturating_sub(process) / n,
    }
}

async fn sequential(target: &Target, body: &Bytes, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        call(&target.channel, body).await;
        samples.push(t.elapsed());
    }
    samples
}

fn at(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One stream of `STREAM_DELTAS` deltas through the gateway: messages
/// received and the gateway threads' CPU.
async fn relay_stream(gateway: &Target, body: &Bytes) -> (usize, Duration) {
    let before = cpu(Some(gateway.threads));
    let mut grpc = tonic::client::Grpc::new(gateway.channel.clone());
    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(body.clone()),
            PathAndQuery::from_static(STREAM),
            RawCodec,
        )
        .await
        .unwrap()
        .into_inner();
    let mut messages = 0;
    while let Some(_m) = stream.message().await.unwrap() {
        messages += 1;
    }
    (messages, cpu(Some(gateway.threads)).saturating_sub(before))
}

/// The stream-relay figure: gateway CPU per delta over `STREAM_REPEATS`
/// streams of `STREAM_DELTAS` deltas on a connection of their own, after
/// one warm-up. With the scheduler's nanosecond counter each stream is
/// measured alone and the figure is the median of the streams' own (their
/// mean and range beside, as the box's neighbours move single streams a
/// lot); with 10 ms ticks, only the mean over all of them can be counted.
async fn relay_figure(gateway_url: &str) -> String {
    let gateway = Target {
        name: "gateway",
        threads: "gw",
        channel: connect(gateway_url).await,
    };
    let mut stream_request = request::to_stream(request::user("hello world"));
    stream_request.model = "deltas".into();
    let stream_body = Bytes::from(stream_request.encode_to_vec());
    relay_stream(&gateway, &stream_body).await;
    let mut messages = 0;
    let mut per_delta = Vec::with_capacity(STREAM_REPEATS);
    for _ in 0..STREAM_REPEATS {
        let (m, t) = relay_stream(&gateway, &stream_body).await;
        messages = m;
        per_delta.push(us(t) / STREAM_DELTAS as f64);
    }
    let mean = per_delta.iter().sum::<f64>() / per_delta.len() as f64;
    per_delta.sort_by(f64::total_cmp);
    let (low, high) = (per_delta[0], per_delta[per_delta.len() - 1]);
    if precise_cpu(None).is_some() {
        format!(
            "{STREAM_DELTAS} text deltas in one stream, {messages} messages out each, gateway CPU {:.2} us per delta (median of {STREAM_REPEATS} streams; mean {mean:.2}, range {low:.2}-{high:.2})",
            median(per_delta.clone())
        )
    } else {
        format!(
            "{STREAM_DELTAS} text deltas in one stream, {messages} messages out each, gateway CPU {mean:.2} us per delta (mean of {STREAM_REPEATS} streams, in 10 ms ticks)"
        )
    }
}

/// `n` streams held open at once against the slow upstream, 100 per
/// HTTP/2 connection; `opened` is called once all have their first
/// message (or after 90 s) with (opened, errors, the time to open them).
/// Returns (opened, errors) once every stream has ended.
async fn open_streams(
    gateway_url: &str,
    body: &Bytes,
    n: usize,
    at_peak: impl FnOnce(usize, usize, Duration),
) -> (usize, usize) {
    let opened = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut channels = Vec::new();
    for _ in 0..n.div_ceil(100) {
        channels.push(connect(gateway_url).await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let channel = channels[i / 100].clone();
            let (body, opened, errors) = (body.clone(), opened.clone(), errors.clone());
            tokio::spawn(async move {
                let mut grpc = tonic::client::Grpc::new(channel);
                let result = async {
                    grpc.ready()
                        .await
                        .map_err(|e| Status::unknown(e.to_string()))?;
                    let mut stream = grpc
                        .server_streaming(
                            tonic::Request::new(body),
                            PathAndQuery::from_static(STREAM),
                            RawCodec,
                        )
                        .await?
                        .into_inner();
                    let mut first = true;
                    while stream.message().await?.is_some() {
                        if std::mem::take(&mut first) {
                            opened.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok::<(), Status>(())
                }
                .await;
                if result.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    while opened.load(Ordering::Relaxed) + errors.load(Ordering::Relaxed) < n
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    at_peak(
        opened.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        started.elapsed(),
    );
    // Each stream lasts about SLOW_DELTAS seconds once open: a stream still
    // running well after that is hung, and counted as an error.
    let ends = Instant::now() + Duration::from_secs(SLOW_DELTAS as u64 + 60);
    let mut hung = 0;
    for t in tasks {
        let left = ends.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, t).await.is_err() {
            hung += 1;
        }
    }
    (
        opened.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed) + hung,
    )
}

/// A Stream request for the slow upstream.
fn slow_body() -> Bytes {
    let mut slow_request = request::to_stream(request::user("hello world"));
    slow_request.provider = "slow".into();
    slow_request.model = "slow".into();
    Bytes::from(slow_request.encode_to_vec())
}

/// The child process: the slow upstream and the callers of the
/// open-streams figure, so that this process's RSS and sockets are the
/// gateway's (and the idle floor's).
struct Child {
    process: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    /// The slow upstream's URL.
    upstream: String,
}

impl Child {
    /// Starts [`child_main`] and reads its upstream's URL.
    fn spawn() -> Self {
        let mut process = std::process::Command::new(std::env::current_exe().unwrap())
            .env("OVERHEAD_CHILD", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(process.stdout.take().unwrap());
        let mut child = Self {
            process,
            out,
            upstream: String::new(),
        };
        child.upstream = child.line();
        child
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.out, &mut line).unwrap();
        line.trim().to_string()
    }

    /// Has the child open `OPEN_STREAMS` streams to the gateway and prints
    /// the figure, with this process's RSS growth while all were open.
    fn open_streams_figure(&mut self, gateway_url: &str) {
        use std::io::Write;
        let base = rss_kib();
        let stdin = self.process.stdin.as_mut().unwrap();
        writeln!(stdin, "{gateway_url}").unwrap();
        stdin.flush().unwrap();
        let at_peak = self.line();
        let peak = rss_kib();
        let done = self.line();
        let field = |line: &str, name: &str| -> u64 {
            line.split_whitespace()
                .skip_while(|w| *w != name)
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let grown = peak.saturating_sub(base);
        println!(
            "open streams: N={OPEN_STREAMS} against a slow upstream (1 delta/s), upstream and callers in a child process: {} opened, {} errors, opened in {:.1} s, gateway process RSS +{:.1} MiB ({:.1} KiB per stream), total {:.1} MiB",
            field(&done, "opened"),
            field(&done, "errors"),
            field(&at_peak, "took_ms") as f64 / 1e3,
            grown as f64 / 1024.0,
            grown as f64 / OPEN_STREAMS as f64,
            peak as f64 / 1024.0
        );
    }

    /// Closing its stdin ends the child.
    fn end(mut self) {
        drop(self.process.stdin.take());
        let _ = self.process.wait();
    }
}

/// The child's part: the slow upstream (its URL on stdout), then, given a
/// gateway URL on stdin, the open streams' callers (a line when all are
/// open, another when all have ended); it ends when stdin closes.
fn child_main() {
    let up = runtime("up");
    let url = up.block_on(upstream());
    println!("{url}");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {
        let gateway = line.trim().to_string();
        line.clear();
        let load = runtime("load");
        let (opened, errors) = load.block_on(open_streams(
            &gateway,
            &slow_body(),
            OPEN_STREAMS,
            |opened, errors, took| {
                println!(
                    "at_peak opened {opened} errors {errors} took_ms {}",
                    took.as_millis()
                );
                let _ = std::io::Write::flush(&mut std::io::stdout());
            },
        ));
        println!("done opened {opened} errors {errors}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
}

fn runtime(name: &'static str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

fn main() {
    if std::env::var_os("OVERHEAD_CHILD").is_some() {
        return child_main();
    }
    // reqwest is built without a crypto provider of its own (see tls.rs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (up_rt, floor_rt, gw_rt, load_rt) = (
        runtime("up"),
        runtime("floor"),
        runtime("gw"),
        runtime("load"),
    );
    let upstream_url = up_rt.block_on(upstream());
    let profiling = std::env::var_os("OVERHEAD_PROFILE").is_some()
        || std::env::var_os("OVERHEAD_PROFILE_STREAMS").is_some();
    let child = (!profiling).then(Child::spawn);
    let slow_url = child
        .as_ref()
        .map_or_else(|| upstream_url.clone(), |c| c.upstream.clone());
    let floor_url = floor_rt.block_on(floor(&upstream_url));
    let gateway_url = gw_rt.block_on(gateway(&upstream_url, &slow_url));

    let open_streams_only = std::env::var_os("OVERHEAD_OPEN_STREAMS_ONLY").is_some();
    let mut child = child;
    let figures = load_rt.block_on(async {
        let unary = Bytes::from(request::user("hello world").encode_to_vec());
        // The typed client once: the gateway answers what the upstream said.
        let mut typed = GatewayClient::connect(gateway_url.clone()).await.unwrap();
        let answer = typed
            .complete(request::user("hello world"), &CallOptions::new())
            .await
            .unwrap();
        assert_eq!(answer.text(), "hello world");

        let floor = Target {
            name: "floor",
            threads: "floor",
            channel: connect(&floor_url).await,
        };
        let gateway = Target {
            name: "gateway",
            threads: "gw",
            channel: connect(&gateway_url).await,
        };

        if let Some(n) = std::env::var("OVERHEAD_PROFILE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            let target = if std::env::var_os("OVERHEAD_PROFILE_FLOOR").is_some() {
                &floor
            } else {
                &gateway
            };
            sequential(target, &unary, 200).await;
            sequential(target, &unary, n).await;
            println!("overhead: profiled {n} sequential {} requests", target.name);
            return None;
        }

        if let Some(n) = std::env::var("OVERHEAD_PROFILE_STREAMS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            let mut stream_request = request::to_stream(request::user("hello world"));
            stream_request.model = "deltas".into();
            let body = Bytes::from(stream_request.encode_to_vec());
            for _ in 0..n {
                relay_stream(&gateway, &body).await;
            }
            println!("overhead: profiled {n} streams of {STREAM_DELTAS} deltas");
            return None;
        }

        // The relay is measured first, on a gateway that has served only
        // its warm-up, like every other figure; and again after the unary
        // rounds, which leave it slower (see the README).
        let relay = if open_streams_only {
            String::new()
        } else {
            relay_figure(&gateway_url).await
        };
        if std::env::var_os("OVERHEAD_RELAY_ONLY").is_some() {
            println!("stream relay: {relay}");
            return None;
        }
        if open_streams_only {
            if let Some(child) = child.as_mut() {
                tokio::task::block_in_place(|| child.open_streams_figure(&gateway_url));
            }
            return None;
        }

        for target in [&floor, &gateway] {
            sequential(target, &unary, WARMUP).await;
        }

        println!(
            "provider-gateway overhead: floor (tonic + reqwest, raw bytes) vs gateway (openai provider, default telemetry), loopback, alternating rounds"
        );
        println!(
            "CPU: server = the server's own threads, process = the whole bench process (upstream + load + server); counted {}",
            if precise_cpu(None).is_some() {
                "in ns by the scheduler (/proc/self/task/*/sched)"
            } else {
                "in 10 ms ticks (/proc/self/task/*/stat)"
            }
        );

        // c=1: every round's samples pooled per target.
        let mut latency: HashMap<&str, Vec<Duration>> = HashMap::new();
        for _ in 0..ROUNDS {
            for target in [&floor, &gateway] {
                let samples = sequential(target, &unary, SEQUENTIAL).await;
                latency.entry(target.name).or_default().extend(samples);
            }
        }
        let mut p50 = HashMap::new();
        for target in [&floor, &gateway] {
            let samples = latency.get_mut(target.name).unwrap();
            samples.sort();
            let (a, b) = (at(samples, 0.50), at(samples, 0.99));
            p50.insert(target.name, a);
            println!(
                "c=1  {:<8} p50 {:>7.3} ms  p99 {:>7.3} ms  ({} requests)",
                target.name,
                ms(a),
                ms(b),
                samples.len()
            );
        }
        let p50_delta = ms(p50["gateway"]) - ms(p50["floor"]);
        println!("c=1  gateway - floor: p50 {p50_delta:+.3} ms");

        let mut rps_ratio_c32 = 0.0;
        let mut cpu_ratio = 0.0;
        for (concurrency, total) in CONCURRENT {
            let Paired {
                rps,
                server,
                process,
            } = paired_rounds([&floor, &gateway], &unary, concurrency, total, PAIRED_ROUNDS).await;
            let m = |map: &HashMap<&str, Vec<f64>>, name: &str| median(map[name].clone());
            for name in ["floor", "gateway"] {
                println!(
                    "c={concurrency:<2} {name:<8} {:>8.0} req/s  server CPU {:>6.1} us/req  process CPU {:>6.1} us/req  ({PAIRED_ROUNDS} rounds of {total} requests)",
                    m(&rps, name),
                    m(&server, name),
                    m(&process, name),
                );
            }
            let (ratio, cpu) = (paired(&rps), paired(&server));
            println!(
                "c={concurrency:<2} gateway / floor (median of the rounds' ratios): RPS {ratio:.2}x  server CPU {cpu:.2}x  process CPU {:.2}x  (ratio of the medians: RPS {:.2}x  server CPU {:.2}x)",
                paired(&process),
                m(&rps, "gateway") / m(&rps, "floor"),
                m(&server, "gateway") / m(&server, "floor"),
            );
            if concurrency == 32 {
                (rps_ratio_c32, cpu_ratio) = (ratio, cpu);
            }
        }

        println!("stream relay: {relay}");
        println!(
            "stream relay after the unary rounds: {}",
            relay_figure(&gateway_url).await
        );

        // The open streams last, then c=32 again: a gateway that has just
        // held 10,000 streams must cost what it cost before (10,000 idle
        // upstream connections once made every call cost up to twice the
        // CPU; see `pool_max_idle`).
        if let Some(child) = child.as_mut() {
            tokio::task::block_in_place(|| child.open_streams_figure(&gateway_url));
            let after =
                paired_rounds([&floor, &gateway], &unary, 32, 50_000, AFTER_STREAMS_ROUNDS).await;
            println!(
                "c=32 after the open streams, gateway / floor ({AFTER_STREAMS_ROUNDS} rounds): RPS {:.2}x  server CPU {:.2}x",
                paired(&after.rps),
                paired(&after.server)
            );
        }

        Some((rps_ratio_c32, cpu_ratio, p50_delta))
    });
    if let Some(child) = child {
        child.end();
    }
    if let Some((rps_ratio_c32, cpu_ratio, p50_delta)) = figures {
        println!(
            "overhead: rps_ratio_c32={rps_ratio_c32:.2} cpu_ratio={cpu_ratio:.2} p50_delta_c1_ms={p50_delta:.3}"
        );
    }
}
