"""The official `anthropic` SDK against the gateway's /v1/messages."""

import anthropic
import pytest

from conftest import GATEWAY_ATTEMPTS, Reply


def client(gateway):
    # max_retries stays at the SDK's default (2).
    return anthropic.Anthropic(base_url=gateway.http, api_key="caller-key")


def message(content, stop="end_turn"):
    return Reply(200, {
        "id": "msg_up", "type": "message", "role": "assistant", "model": "claude-test",
        "content": content, "stop_reason": stop, "stop_sequence": None,
        "usage": {"input_tokens": 6, "output_tokens": 4},
    })


def ev(name, data):
    return (name, dict(data, type=name))


def start():
    return ev("message_start", {"message": {"id": "msg_up", "type": "message", "role": "assistant",
                                            "model": "claude-test", "content": [],
                                            "usage": {"input_tokens": 6, "output_tokens": 1}}})


def overloaded():
    return Reply(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


def test_non_streaming(gateway, upstream):
    upstream.reset([message([{"type": "text", "text": "Hello from Claude"}])])
    raw = client(gateway).messages.with_raw_response.create(
        model="claude/claude-test", max_tokens=50, system="be brief",
        messages=[{"role": "user", "content": "hi"}])
    m = raw.parse()
    assert m.content[0].text == "Hello from Claude"
    assert m.stop_reason == "end_turn"
    assert m.usage.output_tokens == 4
    assert raw.headers["x-gateway-provider"] == "claude"
    path, body = upstream.requests[0]
    assert path == "/v1/messages" and body["system"] == "be brief"


def test_streaming(gateway, upstream):
    upstream.reset([Reply(events=[
        start(),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Once "}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "upon a time"}}),
        ev("content_block_stop", {"index": 0}),
        ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}),
        ev("message_stop", {}),
    ])])
    with client(gateway).messages.stream(
        model="claude", max_tokens=50, messages=[{"role": "user", "content": "story"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Once upon a time"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5


def test_tool_use(gateway, upstream):
    upstream.reset([message([{"type": "tool_use", "id": "toolu_1", "name": "weather",
                              "input": {"city": "Oslo"}}], "tool_use")])
    tools = [{"name": "weather", "description": "Weather",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    m = client(gateway).messages.create(model="claude/claude-test", max_tokens=50, tools=tools,
                                        messages=[{"role": "user", "content": "weather?"}])
    assert m.stop_reason == "tool_use"
    assert (m.content[0].name, m.content[0].input) == ("weather", {"city": "Oslo"})
    # Streamed tool use, assembled by the SDK.
    upstream.reset([Reply(events=[
        start(),
        ev("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "id": "toolu_2",
                                                                 "name": "weather", "input": {}}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": "\"Rome\"}"}}),
        ev("content_block_stop", {"index": 0}),
        ev("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
        ev("message_stop", {}),
    ])])
    with client(gateway).messages.stream(
        model="claude/claude-test", max_tokens=50, tools=tools,
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
        ],
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == {"city": "Rome"}
    sent = upstream.requests[0][1]["messages"]
    assert sent[2]["content"][0]["tool_use_id"] == "toolu_1"


def test_529_then_200_is_one_sdk_call(gateway, upstream):
    upstream.reset([overloaded(), message([{"type": "text", "text": "recovered"}])])
    raw = client(gateway).messages.with_raw_response.create(
        model="claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().content[0].text == "recovered"
    assert raw.headers["x-gateway-attempts"] == "2"
    assert upstream.count == 2


def test_outage_is_529_and_not_multiplied_by_the_sdk(gateway, upstream):
    upstream.reset([overloaded() for _ in range(GATEWAY_ATTEMPTS * 4)])
    with pytest.raises(anthropic.APIStatusError) as err:
        client(gateway).messages.create(model="claude", max_tokens=10,
                                        messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 529
    assert err.value.body["error"]["type"] == "overloaded_error"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert upstream.count == GATEWAY_ATTEMPTS


def test_a_cut_stream_raises(gateway, upstream):
    upstream.reset([Reply(events=[
        start(),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "The answer is"}}),
    ], cut=True)])
    text = ""
    with pytest.raises(anthropic.APIError):
        with client(gateway).messages.stream(
            model="claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            for t in stream.text_stream:
                text += t
    assert text == "The answer is"
    assert upstream.count == 1
