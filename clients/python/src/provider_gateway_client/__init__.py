"""A typed Python client for provider-gateway.

`GatewayClient` wraps the generated stubs (`provider_gateway.v1`): the deadline
and the retry overrides are keyword arguments, a stream is an iterator of
typed events, and the gateway's `x-gateway-attempts` / `x-gateway-provider`
metadata is on every result and error.
"""

from .client import (
    Completion,
    GatewayClient,
    GatewayError,
    Resumed,
    Start,
    Stop,
    StreamResult,
    TextDelta,
    ToolInputJson,
    ToolUseStart,
    Usage,
)

__all__ = [
    "Completion",
    "GatewayClient",
    "GatewayError",
    "Resumed",
    "Start",
    "Stop",
    "StreamResult",
    "TextDelta",
    "ToolInputJson",
    "ToolUseStart",
    "Usage",
]
