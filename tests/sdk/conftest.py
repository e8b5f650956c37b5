"""Fixtures for the SDK tests: a scripted upstream on 127.0.0.1:0 speaking the
OpenAI and Anthropic wire formats (JSON and SSE, errors, cuts), and the real
provider-gateway binary in front of it with its HTTP ingress on 127.0.0.1:0.

The upstream counts every request it receives, so a test can assert that an
SDK in front of the gateway never multiplies the gateway's own attempts.
"""

import json
import os
import pathlib
import queue
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = os.environ.get("GATEWAY_BIN", str(ROOT / "target" / "debug" / "provider-gateway"))
UPSTREAM_KEY = "sk-upstream-test"
# How many attempts the gateway makes per call (the SDKs must add none).
GATEWAY_ATTEMPTS = 3


class Reply:
    """One scripted upstream answer."""

    def __init__(self, status=200, body=None, events=None, cut=False, headers=None):
        self.status = status
        self.body = body
        self.events = events  # [(event name or None, data dict or str)]
        self.cut = cut  # drop the connection after the events
        self.headers = headers or {}


class Upstream:
    """The scripted server: replies in order; 500 once the script is empty."""

    def __init__(self):
        self.script = queue.Queue()
        self.requests = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with upstream.lock:
                    upstream.requests.append((self.path, body))
                try:
                    reply = upstream.script.get_nowait()
                except queue.Empty:
                    reply = Reply(500, {"error": {"message": "script exhausted"}})
                upstream.answer(self, reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, handler, reply):
        if reply.events is None:
            data = json.dumps(reply.body).encode()
            handler.send_response(reply.status)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(data)))
            for k, v in reply.headers.items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(data)
            return
        handler.send_response(reply.status)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        for name, data in reply.events:
            text = data if isinstance(data, str) else json.dumps(data)
            chunk = (f"event: {name}\n" if name else "") + f"data: {text}\n\n"
            raw = chunk.encode()
            handler.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            handler.wfile.flush()
        if reply.cut:
            # No terminating chunk: the body ends abnormally.
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()

    def reset(self, replies):
        while not self.script.empty():
            self.script.get_nowait()
        for r in replies:
            self.script.put(r)
        with self.lock:
            self.requests.clear()

    @property
    def count(self):
        with self.lock:
            return len(self.requests)


class Gateway:
    """The real binary; `http` is the ingress base URL, `grpc` the gRPC address."""

    def __init__(self, upstream):
        config = f"""
listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
default_provider = "oai"

[telemetry]
admin_listen = ""

[retry]
max_attempts = {GATEWAY_ATTEMPTS}
initial_backoff_ms = 1
max_backoff_ms = 5

[providers.oai]
kind = "openai"
base_url = "http://127.0.0.1:{upstream.port}/v1"
api_key_env = "UPSTREAM_KEY"
model = "gpt-test"

[providers.claude]
kind = "anthropic"
base_url = "http://127.0.0.1:{upstream.port}"
api_key_env = "UPSTREAM_KEY"
model = "claude-test"
"""
        self.dir = tempfile.TemporaryDirectory()
        path = pathlib.Path(self.dir.name) / "gateway.toml"
        path.write_text(config)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({"UPSTREAM_KEY": UPSTREAM_KEY, "NO_COLOR": "1", "RUST_LOG": "info"})
        self.process = subprocess.Popen(
            [BINARY, "--config", str(path)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.grpc = self.http = None
        self.log = []
        found = threading.Event()

        def read():
            for line in self.process.stderr:
                self.log.append(line)
                if self.grpc is None and " listen=" in line:
                    self.grpc = line.split(" listen=")[1].split()[0]
                if self.http is None and " http=" in line:
                    self.http = "http://" + line.split(" http=")[1].split()[0]
                if self.grpc and self.http:
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(60):
            self.stop()
            raise RuntimeError("the gateway did not start:\n" + "".join(self.log))

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.dir.cleanup()


@pytest.fixture(scope="session")
def _servers():
    upstream = Upstream()
    gateway = Gateway(upstream)
    yield upstream, gateway
    gateway.stop()
    upstream.server.shutdown()


@pytest.fixture
def upstream(_servers):
    up, _ = _servers
    up.reset([])
    return up


@pytest.fixture
def gateway(_servers):
    return _servers[1]


def wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
