"""A fake LM Studio host that models llama.cpp's prompt cache, for the fleet benchmark (``bench/fleet.py``).

    python bench/prefix_host.py --port 18091 [--slots 4] [--prefill-ms 0.5] [--decode-ms 2]

The host has ``--slots`` parallel slots, each keeping the tokens of the last prompt it ran (and what it generated).
A request takes the idle slot whose cache shares the longest prefix with its prompt (llama.cpp's choice), else the
least recently used idle one, else waits for a slot. Its first token comes after ``--prefill-ms`` per token not
in that prefix (plus 5 ms); then 16 tokens stream ``--decode-ms`` apart. Words stand for tokens. ``GET /stats``
says how many calls it served and the most it ran at once; ``POST /reset`` empties the caches.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web import server
from twisted.web.resource import Resource

ANSWER = [f"w{i}" for i in range(16)]


@dataclass
class Slot:
    tokens: list[str] = field(default_factory=list)
    used: float = 0.0
    busy: bool = False


def shared_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prompt_tokens(body: dict[str, Any]) -> list[str]:
    """The prompt as a chat template lays it out: each message's role, then its words."""
    tokens: list[str] = []
    for message in body["messages"]:
        tokens.append(f"<{message['role']}>")
        tokens.extend(str(message["content"]).split())
    return tokens


class Host(Resource):
    isLeaf = True

    def __init__(self, slots: int, prefill_ms: float, decode_ms: float) -> None:
        super().__init__()
        self.slots = [Slot() for _ in range(slots)]
        self.prefill, self.decode = prefill_ms / 1000, decode_ms / 1000
        self.waiting: list[Deferred[Slot]] = []
        self.running = self.peak = self.served = 0

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/stats":
            return json.dumps({"served": self.served, "peak": self.peak}).encode()
        return json.dumps({"object": "list", "data": [{"id": "bench-model", "object": "model"}]}).encode()

    def render_POST(self, request: server.Request) -> Any:
        if request.path == b"/reset":
            self.slots = [Slot() for _ in self.slots]
            self.served = self.peak = 0
            return b"{}"
        body = json.loads(request.content.read())
        Deferred.fromCoroutine(self._answer(request, body))
        return server.NOT_DONE_YET

    async def _answer(self, request: server.Request, body: dict[str, Any]) -> None:
        prompt = prompt_tokens(body)
        slot = await self._slot(prompt)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            cached = min(shared_prefix(slot.tokens, prompt), len(prompt) - 1)
            await deferLater(reactor, 0.005 + self.prefill * (len(prompt) - cached), lambda: None)
            request.setHeader(b"content-type", b"text/event-stream")
            for i, word in enumerate(ANSWER):
                if i:
                    await deferLater(reactor, self.decode, lambda: None)
                chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                         "model": body["model"], "choices": [{"index": 0, "delta": {"content": word + " "},
                                                               "finish_reason": None}]}
                request.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            usage = {"prompt_tokens": len(prompt), "completion_tokens": len(ANSWER),
                     "total_tokens": len(prompt) + len(ANSWER)}
            request.write(b"data: " + json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                                                  "created": 0, "model": body["model"], "choices": [{
                                                      "index": 0, "delta": {}, "finish_reason": "stop"}],
                                                  "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
            request.finish()
            slot.tokens = prompt + ["<assistant>", *ANSWER]
            self.served += 1
        finally:
            self.running -= 1
            slot.busy, slot.used = False, reactor.seconds()
            if self.waiting:
                self.waiting.pop(0).callback(None)

    async def _slot(self, prompt: list[str]) -> Slot:
        while True:
            idle = [slot for slot in self.slots if not slot.busy]
            if idle:
                best = max(idle, key=lambda slot: (shared_prefix(slot.tokens, prompt), -slot.used))
                if shared_prefix(best.tokens, prompt) == 0:
                    best = min(idle, key=lambda slot: slot.used)  # none shares a prefix: the least recent
                best.busy = True
                return best
            waiting: Deferred[Slot] = Deferred()
            self.waiting.append(waiting)
            await waiting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--prefill-ms", type=float, default=0.5, help="per prompt token not in the cache")
    parser.add_argument("--decode-ms", type=float, default=2.0, help="per generated token")
    args = parser.parse_args()
    reactor.listenTCP(args.port, server.Site(Host(args.slots, args.prefill_ms, args.decode_ms)),
                      interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
