"""The official `openai` SDK against the gateway's /v1/chat/completions."""

import json

import openai
import pytest

from conftest import GATEWAY_ATTEMPTS, Reply


def client(gateway, **kw):
    # max_retries stays at the SDK's default (2): the gateway's headers must
    # keep it from adding attempts.
    return openai.OpenAI(base_url=gateway.http + "/v1", api_key="caller-key", **kw)


def completion(content=None, tool_calls=None, finish="stop"):
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return Reply(200, {
        "id": "chatcmpl-up", "object": "chat.completion", "model": "gpt-test",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    })


def chunk(delta, finish=None):
    return (None, {"id": "chatcmpl-up", "object": "chat.completion.chunk", "model": "gpt-test",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def unavailable():
    return Reply(503, {"error": {"message": "overloaded", "type": "server_error"}})


def test_non_streaming(gateway, upstream):
    upstream.reset([completion("Hello from upstream")])
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="oai/gpt-test",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=20,
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == "Hello from upstream"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.total_tokens == 8
    assert raw.headers["x-gateway-attempts"] == "1"
    assert raw.headers["x-gateway-provider"] == "oai"
    path, body = upstream.requests[0]
    assert path == "/v1/chat/completions"
    assert body["messages"][0] == {"role": "system", "content": "be brief"}


def test_streaming_with_usage(gateway, upstream):
    upstream.reset([Reply(events=[
        chunk({"role": "assistant", "content": "Once "}),
        chunk({"content": "upon a time"}),
        chunk({}, "stop"),
        (None, {"id": "chatcmpl-up", "model": "gpt-test", "choices": [],
                "usage": {"prompt_tokens": 4, "completion_tokens": 4}}),
        (None, "[DONE]"),
    ])])
    stream = client(gateway).chat.completions.create(
        model="oai", messages=[{"role": "user", "content": "story"}],
        stream=True, stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for c in stream:
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
        if c.usage:
            usage = c.usage
    assert text == "Once upon a time"
    assert finish == "stop"
    assert usage.completion_tokens == 4


def test_tool_calls(gateway, upstream):
    upstream.reset([completion(None, [{"id": "call_1", "type": "function", "function": {
        "name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}], "tool_calls")])
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    answer = client(gateway).chat.completions.create(
        model="oai/gpt-test", tools=tools, tool_choice="required",
        messages=[{"role": "user", "content": "weather in Oslo?"}],
    )
    call = answer.choices[0].message.tool_calls[0]
    assert answer.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    # The tool result goes back as the next turn.
    upstream.reset([completion("Sunny.")])
    answer = client(gateway).chat.completions.create(model="oai/gpt-test", tools=tools, messages=[
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20C"},
    ])
    assert answer.choices[0].message.content == "Sunny."
    sent = upstream.requests[0][1]["messages"]
    assert sent[-1]["role"] == "tool" and sent[-1]["tool_call_id"] == "call_1"


def test_streaming_tool_calls(gateway, upstream):
    upstream.reset([Reply(events=[
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                                    "function": {"name": "weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Rome\"}"}}]}),
        chunk({}, "tool_calls"),
        (None, "[DONE]"),
    ])])
    stream = client(gateway).chat.completions.create(
        model="oai/gpt-test", stream=True, messages=[{"role": "user", "content": "weather?"}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    )
    name, args, finish = "", "", None
    for c in stream:
        for tc in c.choices[0].delta.tool_calls or [] if c.choices else []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        if c.choices and c.choices[0].finish_reason:
            finish = c.choices[0].finish_reason
    assert (name, json.loads(args), finish) == ("weather", {"city": "Rome"}, "tool_calls")


def test_models(gateway, upstream):
    ids = [m.id for m in client(gateway).models.list()]
    assert "oai/gpt-test" in ids and "claude/claude-test" in ids


def test_503_then_200_is_one_sdk_call(gateway, upstream):
    upstream.reset([unavailable(), completion("recovered")])
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="oai/gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == "recovered"
    assert raw.headers["x-gateway-attempts"] == "2"
    assert upstream.count == 2


def test_outage_is_not_multiplied_by_the_sdk(gateway, upstream):
    # More failures scripted than the gateway's attempts: a retrying SDK
    # would reach them.
    upstream.reset([unavailable() for _ in range(GATEWAY_ATTEMPTS * 4)])
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway).chat.completions.create(
            model="oai/gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503
    assert err.value.response.headers["x-should-retry"] == "false"
    assert upstream.count == GATEWAY_ATTEMPTS


def test_a_cut_stream_raises(gateway, upstream):
    upstream.reset([Reply(events=[chunk({"role": "assistant", "content": "The answer is"})], cut=True)])
    stream = client(gateway).chat.completions.create(
        model="oai/gpt-test", stream=True, messages=[{"role": "user", "content": "hi"}])
    text = ""
    with pytest.raises(openai.APIError):
        for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
    assert text == "The answer is"
    assert upstream.count == 1


def test_unsupported_n_is_a_400_naming_the_field(gateway, upstream):
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).chat.completions.create(
            model="oai/gpt-test", n=2, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "n"
    assert upstream.count == 0
