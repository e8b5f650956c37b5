#!/usr/bin/env python3
"""Example Python client for provider-gateway.

Usage: python3 example.py [--target 127.0.0.1:50051] [--provider NAME] [prompt words...]

Lists the providers, asks for one whole answer (Complete) and then for a
streamed one (Stream). Against the built-in `mock` provider, which echoes the
last user message word by word, it also checks the answers and prints
"python example: OK". Any gRPC error ends the program with a non-zero status.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "generated"))

import grpc  # noqa: E402

from provider_gateway.v1 import provider_gateway_pb2 as pb  # noqa: E402
from provider_gateway.v1 import provider_gateway_pb2_grpc as pb_grpc  # noqa: E402

DEFAULT_PROMPT = "hello from python"
TIMEOUT_SECONDS = 10


class CheckFailed(Exception):
    """The mock provider answered something other than the echo."""


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def messages_for(prompt):
    return [pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=prompt)])]


def list_providers(stub):
    resp = stub.ListProviders(pb.ListProvidersRequest(), timeout=TIMEOUT_SECONDS)
    print(f"providers (default: {resp.default_provider or '-'}):")
    for p in resp.providers:
        print(f"  {p.name}  kind={p.kind}  default_model={p.default_model or '-'}")
    return resp


def complete(stub, provider, prompt):
    request = pb.CompleteRequest(provider=provider, messages=messages_for(prompt))
    resp, call = stub.Complete.with_call(
        request,
        timeout=TIMEOUT_SECONDS,
        metadata=(("x-retry-max-attempts", "2"),),
    )
    headers = dict(call.initial_metadata() or ())
    text = "".join(b.text for b in resp.content if b.WhichOneof("block") == "text")
    print("complete:")
    print(f"  provider={resp.provider} model={resp.model} id={resp.id}")
    print(f"  text: {text!r}")
    print(f"  stop_reason: {pb.StopReason.Name(resp.stop_reason)}")
    print(f"  usage: input_tokens={resp.usage.input_tokens} output_tokens={resp.usage.output_tokens}")
    print(f"  attempts: {resp.attempts}")
    print(f"  x-gateway-attempts: {headers.get('x-gateway-attempts', '-')}")
    print(f"  x-gateway-provider: {headers.get('x-gateway-provider', '-')}")
    return text, resp.stop_reason


def stream(stub, provider, prompt):
    request = pb.StreamRequest(provider=provider, messages=messages_for(prompt))
    print("stream: ", end="", flush=True)
    pieces = []
    stops = []
    for event in stub.Stream(request, timeout=TIMEOUT_SECONDS):
        kind = event.WhichOneof("event")
        if kind == "delta" and event.delta.WhichOneof("delta") == "text":
            pieces.append(event.delta.text)
            print(event.delta.text, end="", flush=True)
        elif kind == "stop":
            stops.append(event.stop.stop_reason)
    print()
    for reason in stops:
        print(f"  stop_reason: {pb.StopReason.Name(reason)}")
    return "".join(pieces), stops


def main():
    parser = argparse.ArgumentParser(description="provider-gateway Python example client")
    parser.add_argument("--target", default="127.0.0.1:50051", help="gateway address (host:port)")
    parser.add_argument("--provider", default="", help="provider name; empty = gateway default")
    parser.add_argument("prompt", nargs="*", help=f'prompt words (default: "{DEFAULT_PROMPT}")')
    args = parser.parse_args()
    prompt = " ".join(args.prompt) if args.prompt else DEFAULT_PROMPT

    try:
        with grpc.insecure_channel(args.target) as channel:
            stub = pb_grpc.ProviderGatewayStub(channel)
            providers = list_providers(stub)
            chosen = args.provider or providers.default_provider
            kinds = {p.name: p.kind for p in providers.providers}
            is_mock = kinds.get(chosen) == "mock"

            text, stop_reason = complete(stub, args.provider, prompt)
            streamed, stops = stream(stub, args.provider, prompt)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1

    if is_mock:
        # The mock echoes the prompt's words joined by single spaces.
        expected = " ".join(prompt.split())
        try:
            check(text == expected, f"Complete text {text!r} != {expected!r}")
            check(
                stop_reason == pb.STOP_REASON_END_TURN,
                f"Complete stop reason {pb.StopReason.Name(stop_reason)} != STOP_REASON_END_TURN",
            )
            check(streamed == expected, f"streamed text {streamed!r} != {expected!r}")
            check(len(stops) == 1, f"expected exactly one stop event, got {len(stops)}")
        except CheckFailed as e:
            print(f"error: mock check failed: {e}", file=sys.stderr)
            return 1
    else:
        print(f"(provider {chosen!r} is not the mock; answers not checked)")

    print("python example: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
