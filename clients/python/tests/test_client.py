"""The typed wrapper against a started gateway."""

import grpc
import pytest

from provider_gateway_client import (
    GatewayClient, GatewayError, Start, Stop, TextDelta, Usage,
)


@pytest.fixture
def client(target):
    with GatewayClient(target) as c:
        yield c


def test_complete_reports_text_stop_and_attempts(client):
    answer = client.complete("hello from the package", timeout=10)
    assert answer.text == "hello from the package"
    assert answer.stop_reason == "END_TURN"
    assert answer.attempts == 1
    assert answer.provider == "mock"


def test_retries_show_in_attempts(client):
    # `flaky` fails its first two calls (overloaded); the gateway retries.
    answer = client.complete("again", provider="flaky", max_attempts=3, timeout=10)
    assert answer.text == "again"
    assert answer.attempts == 3


def test_stream_yields_typed_events_and_trailers(client):
    # The mock streams the prompt back word by word.
    stream = client.stream("one two three four five", timeout=10)
    events = list(stream)
    assert isinstance(events[0], Start) and events[0].provider == "mock"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "one two three four five"
    assert isinstance(events[-1], Stop) and events[-1].stop_reason == "END_TURN"
    assert any(isinstance(e, Usage) for e in events)
    assert stream.attempts == 1 and stream.provider == "mock"


def test_a_bad_override_is_invalid_argument_naming_the_key(client):
    with pytest.raises(GatewayError) as err:
        client.complete("hi", retry_on=["bogus"], timeout=10)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-retry-on" in err.value.details


def test_the_deadline_is_the_timeout(client):
    with pytest.raises(GatewayError) as err:
        client.complete("hi", provider="slow", timeout=0.5)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_list_providers(client):
    names = {p.name for p in client.list_providers(timeout=10).providers}
    assert {"mock", "flaky", "slow"} <= names
