"""The garbage collector and the calls: calls in flight must not set off young collections (the threshold,
``inference.service.tune_gc``), and a call must leave nothing behind for one."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from inference.service import GC_GEN0_THRESHOLD

MODEL = "qwen2.5-7b-instruct"
CLIENTS = 64


def test_64_calls_in_flight_hold_well_under_the_young_collection_threshold(fake, in_memory):
    """The collector's count rises by what calls in flight hold, and a young collection started by them alone walks
    every live call and frees nothing (28 in 8 s at 64 clients with a threshold of 10,000). The count here takes in
    the test's own client and fake host too, so it is more than the gateway holds; half the threshold leaves room
    for what a call holds while it is being handled rather than waiting."""
    gateway = in_memory()
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    assert gateway.post_chat(chat).status == 200  # (what the first call makes once is not counted)
    fake.chat.mode = "hang"
    gc.collect()
    before = len(gc.get_objects())
    waiting = [gateway.send("POST", "/v1/chat/completions", chat) for _ in range(CLIENTS)]
    gateway.settle()
    assert len(fake.pending) == CLIENTS and not any(gateway.answered(call) for call in waiting)
    gc.collect()
    held = len(gc.get_objects()) - before
    assert held < GC_GEN0_THRESHOLD / 2, f"{CLIENTS} calls in flight hold {held} tracked objects"
    fake.release()
    gateway.settle()
    assert [gateway.result(call).status for call in waiting] == [200] * CLIENTS


class ChunkedHost(Protocol):
    """An upstream answering as Node's and llama.cpp's servers do: a model list, and every chat as an SSE stream in
    chunked transfer encoding, each event a chunk, then the last chunk (the fake LM Studio ends its streams in a
    way that leaves Twisted's client no cycle to make)."""

    _buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            head, _, rest = self._buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")), 0)
            if len(rest) < length:
                return
            self._buffer = rest[length:]
            if lines[0].startswith(b"GET"):
                listing = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(listing), listing))
                continue
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
            for delta, finish in (({"role": "assistant", "content": "hi"}, None), ({}, "stop")):
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self._write_event(json.dumps(chunk).encode())
            self._write_event(b"[DONE]")
            self.transport.write(b"0\r\n\r\n")

    def _write_event(self, data: bytes) -> None:
        event = b"data: " + data + b"\n\n"
        self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))


def upstream_exchanges(objects: list[Any], upstream: str) -> list[Any]:
    """The HTTP client parsers among ``objects`` that read ``upstream``'s answers (the gateway's calls to it, not
    the test's calls to the gateway)."""
    from twisted.web._newclient import HTTPClientParser
    host = [upstream.split("//")[1].encode()]
    return [o for o in objects if isinstance(o, HTTPClientParser) and o.request.headers.getRawHeaders(b"host") == host]


@pytest_twisted.ensureDeferred
async def test_a_streamed_call_leaves_nothing_for_the_collector(start_gateway):
    """Twisted's HTTP client left each chunked answer's parser in a cycle with its decoder: every stream's upstream
    exchange waited for a young collection, which at a thousand streams a second stalled every stream for
    milliseconds each second or two. Each exchange now goes as it ends."""
    port = reactor.listenTCP(0, Factory.forProtocol(ChunkedHost), interface="127.0.0.1")
    upstream = f"http://127.0.0.1:{port.getHost().port}"
    try:
        gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": upstream, "INFERENCE_INFERENCE_DEFAULT_MODEL": MODEL})
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True}
        assert (await gateway.post_chat(chat)).status == 200
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            replies = [await gateway.post_chat(chat) for _ in range(10)]
            gc.collect()
            left = upstream_exchanges(gc.garbage, upstream)
            tested = upstream_exchanges(gc.garbage, gateway.url)  # (the test's own client: the cycle is Twisted's)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    finally:
        await port.stopListening()
    assert all(reply.status == 200 and reply.body.endswith(b"data: [DONE]\n\n") for reply in replies)
    assert len(tested) == 10 and left == []
