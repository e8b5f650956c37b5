"""The wrapper: requests, call options, results and stream events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from provider_gateway.v1 import provider_gateway_pb2 as pb
from provider_gateway.v1 import provider_gateway_pb2_grpc as pb_grpc

ATTEMPTS_KEY = "x-gateway-attempts"
PROVIDER_KEY = "x-gateway-provider"

Prompt = Union[str, Sequence[pb.Message]]


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Completion:
    """A whole answer, with how the gateway obtained it."""

    id: str
    provider: str
    model: str
    text: str
    stop_reason: str  # e.g. "END_TURN", "MAX_TOKENS", "TOOL_USE"
    usage: Usage
    attempts: int  # x-gateway-attempts: every upstream request the call made
    tool_calls: List[Tuple[str, str, str]] = field(default_factory=list)  # (id, name, input_json)
    raw: Optional[pb.CompleteResponse] = None


@dataclass(frozen=True)
class Start:
    id: str
    provider: str
    model: str
    attempt: int


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ToolUseStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolInputJson:
    index: int
    json: str


@dataclass(frozen=True)
class Stop:
    stop_reason: str


@dataclass(frozen=True)
class Resumed:
    attempt: int
    provider: str
    characters_delivered: int


Event = Union[Start, TextDelta, ToolUseStart, ToolInputJson, Usage, Stop, Resumed]


class GatewayError(Exception):
    """A failed call: the gRPC code and message, and the gateway's report."""

    def __init__(self, error: grpc.RpcError):
        self.code: grpc.StatusCode = error.code()
        self.details: str = error.details() or ""
        metadata = _metadata(error.trailing_metadata())
        self.attempts: Optional[int] = _int(metadata.get(ATTEMPTS_KEY))
        self.provider: Optional[str] = metadata.get(PROVIDER_KEY)
        super().__init__(f"{self.code.name}: {self.details}")


def _metadata(pairs) -> Mapping[str, str]:
    return {k: v for k, v in (pairs or ()) if isinstance(v, str)}


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _stop_name(value: int) -> str:
    return pb.StopReason.Name(value).removeprefix("STOP_REASON_")


class StreamResult:
    """An iterator of a stream's events; `attempts` and `provider` are read from
    the trailers once the stream has ended (and from its headers before)."""

    def __init__(self, call):
        self._call = call
        self.attempts: Optional[int] = None
        self.provider: Optional[str] = None

    def __iter__(self) -> Iterator[Event]:
        try:
            for response in self._call:
                event = _event(response)
                if event is not None:
                    yield event
        except grpc.RpcError as e:
            raise GatewayError(e) from None
        trailers = _metadata(self._call.trailing_metadata())
        self.attempts = _int(trailers.get(ATTEMPTS_KEY))
        self.provider = trailers.get(PROVIDER_KEY)

    def text(self) -> str:
        """Reads the stream to its end and returns the text."""
        return "".join(e.text for e in self if isinstance(e, TextDelta))

    def cancel(self) -> None:
        self._call.cancel()


def _event(r: pb.StreamResponse) -> Optional[Event]:
    kind = r.WhichOneof("event")
    if kind == "start":
        return Start(r.start.id, r.start.provider, r.start.model, r.start.attempt)
    if kind == "delta":
        d = r.delta
        which = d.WhichOneof("delta")
        if which == "text":
            return TextDelta(d.index, d.text)
        if which == "tool_use_start":
            return ToolUseStart(d.index, d.tool_use_start.id, d.tool_use_start.name)
        if which == "tool_input_json":
            return ToolInputJson(d.index, d.tool_input_json)
        return None
    if kind == "usage":
        return Usage(r.usage.input_tokens, r.usage.output_tokens)
    if kind == "stop":
        return Stop(_stop_name(r.stop.stop_reason))
    if kind == "resumed":
        return Resumed(r.resumed.attempt, r.resumed.provider, r.resumed.characters_delivered)
    return None


def _messages(prompt: Prompt) -> List[pb.Message]:
    if isinstance(prompt, str):
        return [pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=prompt)])]
    return list(prompt)


class GatewayClient:
    """A client over one channel. `api_key` is sent as `authorization: Bearer`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: Optional[str] = None,
        channel: Optional[grpc.Channel] = None,
    ):
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = pb_grpc.ProviderGatewayStub(self._channel)
        self._auth = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _metadata(
        self,
        max_attempts: Optional[int],
        initial_backoff_ms: Optional[int],
        max_backoff_ms: Optional[int],
        backoff_multiplier: Optional[float],
        per_try_timeout_ms: Optional[int],
        retry_on: Optional[Sequence[str]],
        fallback_providers: Optional[Sequence[str]],
        stream_resume: Optional[bool],
        hedge_after_ms: Optional[int],
    ) -> List[Tuple[str, str]]:
        md = list(self._auth)
        for key, value in (
            ("x-retry-max-attempts", max_attempts),
            ("x-retry-initial-backoff-ms", initial_backoff_ms),
            ("x-retry-max-backoff-ms", max_backoff_ms),
            ("x-retry-backoff-multiplier", backoff_multiplier),
            ("x-retry-per-try-timeout-ms", per_try_timeout_ms),
            ("x-hedge-after-ms", hedge_after_ms),
        ):
            if value is not None:
                md.append((key, str(value)))
        if retry_on is not None:
            md.append(("x-retry-on", ",".join(retry_on) if retry_on else "none"))
        if fallback_providers is not None:
            md.append(("x-fallback-providers", ",".join(fallback_providers) or "none"))
        if stream_resume is not None:
            md.append(("x-stream-resume", "continue" if stream_resume else "off"))
        return md

    def _request(self, cls, prompt, provider, model, system, max_tokens, temperature, top_p,
                 stop_sequences, tools):
        return cls(
            provider=provider, model=model, system=system, messages=_messages(prompt),
            max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            stop_sequences=list(stop_sequences or ()), tools=list(tools or ()),
        )

    def complete(
        self,
        prompt: Prompt,
        *,
        provider: str = "",
        model: str = "",
        system: str = "",
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        stop_sequences: Optional[Sequence[str]] = None,
        tools: Optional[Sequence[pb.Tool]] = None,
        timeout: Optional[float] = None,
        max_attempts: Optional[int] = None,
        initial_backoff_ms: Optional[int] = None,
        max_backoff_ms: Optional[int] = None,
        backoff_multiplier: Optional[float] = None,
        per_try_timeout_ms: Optional[int] = None,
        retry_on: Optional[Sequence[str]] = None,
        fallback_providers: Optional[Sequence[str]] = None,
        stream_resume: Optional[bool] = None,
        hedge_after_ms: Optional[int] = None,
    ) -> Completion:
        """One whole answer. Raises `GatewayError`."""
        request = self._request(pb.CompleteRequest, prompt, provider, model, system, max_tokens,
                                temperature, top_p, stop_sequences, tools)
        metadata = self._metadata(max_attempts, initial_backoff_ms, max_backoff_ms,
                                  backoff_multiplier, per_try_timeout_ms, retry_on,
                                  fallback_providers, stream_resume, hedge_after_ms)
        try:
            response, call = self._stub.Complete.with_call(request, timeout=timeout,
                                                            metadata=metadata)
        except grpc.RpcError as e:
            raise GatewayError(e) from None
        headers = _metadata(call.initial_metadata())
        text = "".join(b.text for b in response.content if b.WhichOneof("block") == "text")
        tool_calls = [(b.tool_use.id, b.tool_use.name, b.tool_use.input_json)
                      for b in response.content if b.WhichOneof("block") == "tool_use"]
        return Completion(
            id=response.id,
            provider=headers.get(PROVIDER_KEY, response.provider),
            model=response.model,
            text=text,
            stop_reason=_stop_name(response.stop_reason),
            usage=Usage(response.usage.input_tokens, response.usage.output_tokens),
            attempts=_int(headers.get(ATTEMPTS_KEY)) or response.attempts,
            tool_calls=tool_calls,
            raw=response,
        )

    def stream(
        self,
        prompt: Prompt,
        *,
        provider: str = "",
        model: str = "",
        system: str = "",
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        stop_sequences: Optional[Sequence[str]] = None,
        tools: Optional[Sequence[pb.Tool]] = None,
        timeout: Optional[float] = None,
        max_attempts: Optional[int] = None,
        initial_backoff_ms: Optional[int] = None,
        max_backoff_ms: Optional[int] = None,
        backoff_multiplier: Optional[float] = None,
        per_try_timeout_ms: Optional[int] = None,
        retry_on: Optional[Sequence[str]] = None,
        fallback_providers: Optional[Sequence[str]] = None,
        stream_resume: Optional[bool] = None,
        hedge_after_ms: Optional[int] = None,
    ) -> StreamResult:
        """A streamed answer: iterate the result for its events. Errors (also a
        stream that broke after content) raise `GatewayError` from the iteration."""
        request = self._request(pb.StreamRequest, prompt, provider, model, system, max_tokens,
                                temperature, top_p, stop_sequences, tools)
        metadata = self._metadata(max_attempts, initial_backoff_ms, max_backoff_ms,
                                  backoff_multiplier, per_try_timeout_ms, retry_on,
                                  fallback_providers, stream_resume, hedge_after_ms)
        return StreamResult(self._stub.Stream(request, timeout=timeout, metadata=metadata))

    def list_providers(self, *, timeout: Optional[float] = None) -> pb.ListProvidersResponse:
        try:
            return self._stub.ListProviders(pb.ListProvidersRequest(), timeout=timeout,
                                            metadata=list(self._auth))
        except grpc.RpcError as e:
            raise GatewayError(e) from None
