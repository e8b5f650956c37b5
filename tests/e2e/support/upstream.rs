//! A scripted upstream HTTP/1.1 server on 127.0.0.1:0 that speaks whatever
//! a test scripts: JSON bodies, SSE streams written event by event, error
//! statuses and headers, delays, a connection cut mid-stream, a stall. It
//! records every request (path, headers, JSON body) and notices when the
//! gateway closes a connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Value,
    /// The body's bytes as sent (a form, an empty body, a signed payload).
    pub raw: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One step of a scripted response.
#[derive(Debug, Clone)]
pub enum Step {
    /// Write these bytes (as one chunk of a chunked body, when streaming).
    Chunk(Vec<u8>),
    /// Wait.
    Sleep(Duration),
    /// Drop the connection now, without ending the body.
    Cut,
    /// Send nothing more, keep the connection open until the peer closes it.
    Stall,
}

/// A scripted response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Delay before the status line.
    pub delay: Duration,
    /// `None` = a fixed body of `body` bytes; `Some` = a chunked body.
    pub steps: Option<Vec<Step>>,
    pub body: Vec<u8>,
}

impl Reply {
    /// A JSON response.
    pub fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            delay: Duration::ZERO,
            steps: None,
            body: body.to_string().into_bytes(),
        }
    }

    /// An SSE response whose events are `(event name, data)`; an empty name
    /// writes a `data:` line only.
    pub fn sse(events: &[(&str, String)]) -> Self {
        Self::sse_steps(
            events
                .iter()
                .map(|(e, d)| Step::Chunk(sse_event(e, d)))
                .collect(),
        )
    }

    /// An SSE response from explicit steps.
    pub fn sse_steps(steps: Vec<Step>) -> Self {
        Self {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            delay: Duration::ZERO,
            steps: Some(steps),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

/// The bytes of one SSE event.
pub fn sse_event(event: &str, data: &str) -> Vec<u8> {
    if event.is_empty() {
        format!("data: {data}\n\n").into_bytes()
    } else {
        format!("event: {event}\ndata: {data}\n\n").into_bytes()
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    requests: Vec<Recorded>,
    closed_by_peer: usize,
}

/// The scripted server. Replies are used in order; with the script empty it
/// answers 500.
#[derive(Clone)]
pub struct Upstream {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    closed: Arc<Notify>,
}

impl Upstream {
    pub async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..Default::default()
        }));
        let closed = Arc::new(Notify::new());
        let upstream = Self {
            addr,
            state,
            closed,
        };
        let server = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let server = server.clone();
                tokio::spawn(async move { server.connection(socket).await });
            }
        });
        upstream
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// How many connections the gateway closed while the upstream held them
    /// open (a stall).
    pub fn closed_by_peer(&self) -> usize {
        self.state.lock().unwrap().closed_by_peer
    }

    /// Waits until the gateway closes a held connection.
    pub async fn wait_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.closed_by_peer() > 0 {
                return;
            }
            notified.await;
        }
    }

    async fn connection(&self, mut socket: TcpStream) {
        let Some(request) = read_request(&mut socket).await else {
            return;
        };
        let reply = {
            let mut st = self.state.lock().unwrap();
            st.requests.push(request);
            st.script.pop_front()
        };
        let reply = reply.unwrap_or_else(|| {
            Reply::json(
                500,
                serde_json::json!({"error": {"message": "script exhausted"}}),
            )
        });
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        let mut head = format!(
            "HTTP/1.1 {} Scripted\r\nconnection: close\r\n",
            reply.status
        );
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let Some(steps) = reply.steps else {
            head.push_str(&format!("content-length: {}\r\n\r\n", reply.body.len()));
            let mut bytes = head.into_bytes();
            bytes.extend_from_slice(&reply.body);
            let _ = socket.write_all(&bytes).await;
            let _ = socket.shutdown().await;
            return;
        };
        head.push_str("transfer-encoding: chunked\r\n\r\n");
        if socket.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for step in steps {
            match step {
                Step::Chunk(bytes) => {
                    let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
                    chunk.extend_from_slice(&bytes);
                    chunk.extend_from_slice(b"\r\n");
                    if socket.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Cut => return,
                Step::Stall => {
                    let mut buf = [0u8; 1024];
                    // Holds until the peer closes (read returns 0 or fails).
                    while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                    self.state.lock().unwrap().closed_by_peer += 1;
                    self.closed.notify_waiters();
                    return;
                }
            }
        }
        let _ = socket.write_all(b"0\r\n\r\n").await;
        let _ = socket.shutdown().await;
    }
}

async fn read_request(socket: &mut TcpStream) -> Option<Recorded> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        let n = socket.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    let raw = body;
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Some(Recorded {
        method,
        path,
        headers,
        body,
        raw,
    })
}
