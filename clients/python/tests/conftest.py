"""Starts the real provider-gateway binary (mock providers only) on 127.0.0.1:0."""

import os
import pathlib
import subprocess
import tempfile
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
BINARY = os.environ.get("GATEWAY_BIN", str(ROOT / "target" / "debug" / "provider-gateway"))

CONFIG = """
listen = "127.0.0.1:0"
http_listen = ""
default_provider = "mock"

[telemetry]
admin_listen = ""

[retry]
initial_backoff_ms = 1
max_backoff_ms = 5

[providers.mock]
kind = "mock"

[providers.flaky]
kind = "mock"
fail_first = 2
fail_class = "overloaded"

[providers.slow]
kind = "mock"
latency_ms = 3000
"""


@pytest.fixture(scope="session")
def target():
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "gateway.toml"
        path.write_text(CONFIG)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({"NO_COLOR": "1", "RUST_LOG": "info"})
        process = subprocess.Popen([BINARY, "--config", str(path)], env=env, text=True,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        found, address, log = threading.Event(), [], []

        def read():
            for line in process.stderr:
                log.append(line)
                if not address and " listen=" in line:
                    address.append(line.split(" listen=")[1].split()[0])
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        try:
            if not found.wait(60):
                raise RuntimeError("the gateway did not start:\n" + "".join(log))
            yield address[0]
        finally:
            process.terminate()
            process.wait(10)
