"""Streaming: SSE relay, flow control, cancellation, usage and clean failure mid-stream."""

from __future__ import annotations

import json

import openai
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from .conftest import call, raw_connect, raw_post, sse_payloads, until

MODEL = "qwen2.5-7b-instruct"


def stream_body(text: str = "hello there", **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": True, **extra}


def text_of(payloads: list[bytes]) -> str:
    chunks = [json.loads(p) for p in payloads if p != b"[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest_twisted.ensureDeferred
async def test_stream_relays_events_with_exact_framing_and_headers(fake, lmstudio):
    reply = await lmstudio.post_chat(stream_body())
    assert reply.status == 200
    assert reply.header("content-type") == "text/event-stream"
    assert reply.header("cache-control") == "no-cache"
    assert reply.header("x-accel-buffering") == "no"
    assert reply.header("content-length") is None
    payloads = sse_payloads(reply.body)
    assert payloads[-1] == b"[DONE]"
    assert text_of(payloads) == "echo: hello there"
    usage = json.loads(payloads[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert all("reasoning" in json.loads(p)["choices"][0]["delta"] for p in payloads[1:4])  # extra fields kept
    sent = fake.received[-1].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


@pytest_twisted.ensureDeferred
async def test_upstream_bytes_are_relayed_untouched(fake, lmstudio):
    fake.chat.stream = "comments"  # CRLF line ends and comment lines: parsed, and each payload passed on as is
    reply = await lmstudio.post_chat(stream_body())
    payloads = sse_payloads(reply.body)
    assert text_of(payloads) == "echo: hello there"
    assert payloads[1].startswith(b'{"id": "chatcmpl-fakestream"')  # the upstream's own bytes (its spacing)


@pytest_twisted.ensureDeferred
async def test_event_names_are_relayed_with_their_events(fake, lmstudio):
    fake.chat.stream = "named"
    body = (await lmstudio.post_chat(stream_body())).body
    events = body[:-2].split(b"\n\n")
    assert all(e.startswith(b"event: completion\ndata: {") for e in events[:-1]) and events[-1] == b"data: [DONE]"
    assert text_of([e.split(b"data: ", 1)[1] for e in events]) == "echo: hello there"


@pytest_twisted.ensureDeferred
async def test_openai_sdk_streams_text_and_usage(fake, lmstudio):
    client = openai.OpenAI(base_url=lmstudio.url + "/v1", api_key="x", max_retries=0)

    def consume():
        stream = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "a b c"}],
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

    text, usage = await deferToThread(consume)
    assert text == "echo: a b c"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, 4, 16)


@pytest_twisted.ensureDeferred
async def test_mock_streams_word_by_word_with_its_token_delay(start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock",
                             "INFERENCE_INFERENCE_MOCK_TOKEN_DELAY_SECS": "0.05"})
    client = await raw_connect(gateway.port.getHost().port)
    client.transport.write(raw_post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "one two three"}], "stream": True}).encode()))
    arrivals = []
    for word in (b'"You"', b'" said:"', b'" one"', b'" two"', b'" three"'):
        await client.received(word)
        arrivals.append(reactor.seconds())
    await client.received(b"data: [DONE]")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(gap >= 0.04 for gap in gaps), gaps  # each word arrives as it is made, not all at the end
    assert b'"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}' in client.data
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_upstream_without_usage_still_streams_and_ends(fake, lmstudio):
    fake.chat.stream = "no_usage"
    payloads = sse_payloads((await lmstudio.post_chat(stream_body())).body)
    assert text_of(payloads) == "echo: hello there" and payloads[-1] == b"[DONE]"
    assert b"error" not in b"".join(payloads)


@pytest_twisted.ensureDeferred
async def test_upstream_without_done_but_finished_is_complete(fake, lmstudio):
    fake.chat.stream = "no_done"
    payloads = sse_payloads((await lmstudio.post_chat(stream_body())).body)
    assert payloads[-1] == b"[DONE]" and b"error" not in b"".join(payloads)


@pytest.mark.parametrize("mode, message", [
    ("die", "connection was lost mid-stream"),
    ("garbage", "not JSON"),
    ("error_event", "model crashed"),
])
@pytest_twisted.ensureDeferred
async def test_failure_mid_stream_ends_with_an_error_event_then_done(fake, lmstudio, mode, message):
    fake.chat.stream = mode
    reply = await lmstudio.post_chat(stream_body())
    assert reply.status == 200
    payloads = sse_payloads(reply.body)
    assert payloads[-1] == b"[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert message in error["message"] and error["type"] == "api_error" and error["code"] == "upstream_error"
    assert b"Processing Failed" not in reply.body
    fake.chat.stream = "normal"
    assert text_of(sse_payloads((await lmstudio.post_chat(stream_body())).body)) == "echo: hello there"
    await fake.connections.wait_open(1)  # the broken upstream connection was not kept in the pool


@pytest_twisted.ensureDeferred
async def test_an_empty_stream_is_asked_again_whole_and_says_the_upstreams_reason(fake, lmstudio):
    fake.chat.stream = "empty"  # what LM Studio and llama.cpp send when the prompt does not fit the context
    reply = await lmstudio.post_chat(stream_body())
    assert reply.status == 200
    payloads = sse_payloads(reply.body)
    assert payloads[-1] == b"[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert "context length of only 4096 tokens" in error["message"]  # the upstream's reason, asked without streaming
    assert [r.body.get("stream") for r in fake.received if r.path == "/v1/chat/completions"] == [True, None]


@pytest_twisted.ensureDeferred
async def test_stalled_stream_times_out_with_an_error_event(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "0.3"})
    fake.chat.stream = "stall"
    closed = fake.next_close()
    reply = await gateway.post_chat(stream_body())
    payloads = sse_payloads(reply.body)
    assert text_of(payloads[:-2]) == "echo: hello"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "upstream_timeout" and "0.3s" in error["message"]
    await closed  # the stalled upstream request was aborted


@pytest.mark.parametrize("setup, status, code", [
    (lambda fake: None, 404, "model_not_found"),
    (lambda fake: setattr(fake.chat, "mode", "error_string"), 500, "upstream_error"),
    (lambda fake: setattr(fake.chat, "mode", "error_in_200"), 500, "upstream_error"),
])
@pytest_twisted.ensureDeferred
async def test_errors_before_the_first_byte_are_plain_http_errors(fake, lmstudio, setup, status, code):
    setup(fake)
    body = stream_body(model="gpt-4o") if status == 404 else stream_body()
    reply = await lmstudio.post_chat(body)
    assert reply.status == status
    assert reply.header("content-type") == "application/json"
    assert reply.error["code"] == code


@pytest_twisted.ensureDeferred
async def test_stream_headers_timeout_is_504(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "0.3"})
    await gateway.post_chat(stream_body())
    fake.chat.mode = "hang"
    reply = await gateway.post_chat(stream_body())
    assert reply.status == 504 and reply.error["code"] == "upstream_timeout"


@pytest_twisted.ensureDeferred
async def test_client_disconnect_mid_stream_closes_the_upstream(fake, lmstudio):
    fake.chat.stream = "stall"
    closed = fake.next_close()
    client = await raw_connect(lmstudio.port.getHost().port)
    client.transport.write(raw_post("/v1/chat/completions", json.dumps(stream_body()).encode()))
    await client.received(b'" hello"')  # the stream is flowing
    started = reactor.seconds()
    client.transport.loseConnection()
    await closed
    assert reactor.seconds() - started < 1
    fake.chat.stream = "normal"
    assert (await lmstudio.post_chat(stream_body())).status == 200


@pytest_twisted.ensureDeferred
async def test_client_disconnect_stops_the_mock_stream(start_gateway, no_logged_failures):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock",
                             "INFERENCE_INFERENCE_MOCK_TOKEN_DELAY_SECS": "0.05"})
    client = await raw_connect(gateway.port.getHost().port)
    client.transport.write(raw_post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "one two three four five six"}], "stream": True}).encode()))
    await client.received(b'"You"')
    client.transport.loseConnection()
    await client.lost
    await until(lambda: not [c for c in reactor.getDelayedCalls() if "_play" in repr(c.func)])
    assert (await call("GET", gateway.url + "/health/live")).status == 200


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_upstream_and_memory_stays_flat(fake, lmstudio):
    total = 64 * 1024 * 1024
    fake.chat.stream, fake.chat.flood_bytes = "flood", total
    client = await raw_connect(lmstudio.port.getHost().port)
    client.transport.pauseProducing()  # this client reads nothing
    rss_before = rss_kib()
    arrived = fake.next_arrival()
    client.transport.write(raw_post("/v1/chat/completions", json.dumps(stream_body()).encode()))
    await arrived
    await until_flood(fake)
    # Socket buffers fill one after the other (client, gateway, upstream), so the upstream pauses and
    # resumes a few times before it stays paused; then nothing more is pulled from it.
    written = -1
    for _ in range(20):
        await fake.flood.next_pause()
        if fake.flood.written == written:
            break
        written = fake.flood.written
        await deferLater(reactor, 0.2, lambda: None)
    await deferLater(reactor, 0.5, lambda: None)
    assert fake.flood.paused and fake.flood.written == written, (written, fake.flood.written)
    assert written < total / 4, written  # held back by socket buffers, not by our memory
    assert rss_kib() - rss_before < 24 * 1024
    print(f"upstream paused after {written / 2**20:.1f} MiB of {total / 2**20:.0f} MiB offered; "
          f"test process RSS +{(rss_kib() - rss_before) / 1024:.1f} MiB")
    client.transport.resumeProducing()  # the client reads again: everything arrives, in order
    await client.received(b"data: [DONE]")
    assert client.data.count(b'"xxxx') == total // len(fake.flood._chunk) + (total % len(fake.flood._chunk) > 0)
    client.transport.loseConnection()


async def until_flood(fake):
    while getattr(fake, "flood", None) is None:
        await deferLater(reactor, 0.005, lambda: None)


@pytest_twisted.ensureDeferred
async def test_many_concurrent_streams_all_complete(fake, lmstudio):
    texts = [f"client number {i}" for i in range(200)]
    replies = await gatherResults([Deferred.fromCoroutine(lmstudio.post_chat(stream_body(t))) for t in texts])
    assert [text_of(sse_payloads(r.body)) for r in replies] == [f"echo: {t}" for t in texts]


@pytest_twisted.ensureDeferred
async def test_mock_stream_through_the_sdk(start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock"})
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)

    def consume():
        chunks = list(client.chat.completions.create(model="mock-model", stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

    text, usage = await deferToThread(consume)
    assert text == "You said: hi" and usage.completion_tokens == 3
    health = await call("GET", gateway.url + "/health/live")
    assert health.status == 200
