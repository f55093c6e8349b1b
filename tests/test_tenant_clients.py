"""The openai and anthropic SDKs read a limited tenant's 429s (issue 23): they wait the ``Retry-After`` the gateway
gives, then succeed; and they stop at once when told the wait is longer than they would wait
(``x-should-retry: false``). Real sockets and the real SDKs in a thread, as users run them."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from .conftest import call
from .test_tenants import KEYS, MODEL, key_file, tenant


def _limited(fake: Any, start_gateway: Any, tmp_path: Any, limits: dict[str, int]) -> Any:
    return start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                          "INFERENCE_SERVER_API_KEYS_FILE": key_file(tmp_path, tenant("alice", limits=limits))})


def _answered(access_events: list[dict[str, Any]], status: int) -> Deferred[None]:
    """Fires once an access line with ``status`` is logged (the SDK's first try was answered)."""
    seen: Deferred[None] = Deferred()

    def look() -> None:
        if not seen.called and any(e.get("status") == status for e in access_events):
            seen.callback(None)
        elif not seen.called:
            from twisted.internet import reactor
            reactor.callLater(0.01, look)  # (the SDK's thread: no event to wait on but the log line)

    look()
    from twisted.internet import reactor
    return seen.addTimeout(30, reactor)


def _openai_chat(url: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS["alice"], max_retries=2)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}]).choices[0] \
        .message.content or ""


def _anthropic_message(url: str) -> str:
    client = anthropic.Anthropic(base_url=url, api_key=KEYS["alice"], max_retries=2)
    answer = client.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    return answer.content[0].text  # type: ignore[union-attr]


@pytest.mark.parametrize("client, route", [(_openai_chat, "/v1/chat/completions"),
                                           (_anthropic_message, "/v1/messages")])
@pytest_twisted.ensureDeferred
async def test_the_sdks_wait_the_retry_after_the_gateway_gives_then_succeed(fake, start_gateway, tmp_path,
                                                                           access_events, client, route):
    gateway = _limited(fake, start_gateway, tmp_path, {"concurrent": 1})
    fake.chat.mode = "hang"
    held = Deferred.fromCoroutine(call("POST", gateway.url + "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "first"}]},
        headers={"Authorization": f"Bearer {KEYS['alice']}"}))
    await fake.next_arrival()
    answer = deferToThread(client, gateway.url)
    await _answered(access_events, 429)  # the SDK's first try: the tenant's one call is running
    fake.chat.mode = "normal"
    fake.release()
    first = await held
    assert first.status == 200
    held_id = first.header("x-request-id")
    assert "echo" in await answer
    tries = [e for e in access_events if e["route"] == route and e["request_id"] != held_id]
    assert [e["status"] for e in tries] == [429, 200]
    gap = tries[1]["log_time"] - tries[0]["log_time"]
    assert gap >= 0.95  # Retry-After: 1 (the SDKs' own first backoff is at most 0.5 s)


@pytest.mark.parametrize("client, error, route", [(_openai_chat, openai.RateLimitError, "/v1/chat/completions"),
                                                  (_anthropic_message, anthropic.RateLimitError, "/v1/messages")])
@pytest_twisted.ensureDeferred
async def test_the_sdks_stop_at_once_when_the_wait_is_a_day(fake, start_gateway, tmp_path, access_events, client,
                                                           error, route):
    gateway = _limited(fake, start_gateway, tmp_path, {"tokens_per_day": 5})
    assert "echo" in await deferToThread(client, gateway.url)  # uses the day's tokens
    with pytest.raises(error) as raised:
        await deferToThread(client, gateway.url)
    assert raised.value.status_code == 429
    assert [e["status"] for e in access_events if e["route"] == route] == [200, 429]  # no retry
