"""A fake LM Studio host in a process of its own, for faults only a process shows (kill -9, SIGSTOP, restart).

    python -m tests.fakes.host_process NAME PORT

Serves ``GET /v1/models`` and ``POST /v1/chat/completions`` (whole or streamed) for one model, answering after
``latency`` seconds; every answer names the host (``"id": "chatcmpl-NAME-..."``) so a test knows who served it.
``POST /_fault`` with a JSON object changes how it behaves: ``latency`` (seconds before the headers), ``chat``
(``normal``, ``error``: a 500, or ``cut``: a stream cut after its first events, the connection closed) and
``models`` (``normal`` or ``hang``: the model list never answers); ``chat: cut`` closes a whole answer's connection
before its first byte. ``GET /_seen`` lists the last user message of every call it received (a test marks each
call so). Prints ``listening NAME PORT`` once it serves.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IDelayedCall
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

MODEL = "fault-model"
TOKENS = 6
TOKEN_DELAY = 0.01


class Host(Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.fault: dict[str, Any] = {"latency": 0.05, "chat": "normal", "models": "normal"}
        self.ids = itertools.count()
        self.seen: list[str] = []

    def render_GET(self, request: http.Request) -> Any:
        if request.path == b"/_seen":
            return _json(request, 200, self.seen)
        if request.path != b"/v1/models":
            return _json(request, 404, {"error": {"message": "no such route"}})
        if self.fault["models"] == "hang":
            return NOT_DONE_YET  # never answered: the gateway's probe deadline decides
        return _json(request, 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def render_POST(self, request: http.Request) -> Any:
        body = json.loads(request.content.read() or b"{}")
        if request.path == b"/_fault":
            self.fault.update(body)
            return _json(request, 200, self.fault)
        if request.path != b"/v1/chat/completions":
            return _json(request, 404, {"error": {"message": "no such route"}})
        self.seen.append(body["messages"][-1]["content"])
        timer: IDelayedCall = reactor.callLater(self.fault["latency"], self._answer, request, body)
        request.notifyFinish().addErrback(lambda _: timer.active() and timer.cancel())
        return NOT_DONE_YET

    def _answer(self, request: http.Request, body: dict[str, Any]) -> None:
        answer_id = f"chatcmpl-{self.name}-{next(self.ids)}"
        if self.fault["chat"] == "cut" and not body.get("stream"):
            request.channel.transport.loseConnection()  # (no byte of the answer)
        elif self.fault["chat"] == "error":
            request.write(_json(request, 500, {"error": {"message": f"{self.name} failed", "type": "server_error"}}))
            request.finish()
        elif body.get("stream"):
            request.setHeader(b"content-type", b"text/event-stream")
            self._stream(request, answer_id, 0)
        else:
            request.write(_json(request, 200, {
                "id": answer_id, "object": "chat.completion", "created": 1, "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {self.name}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}))
            request.finish()

    def _stream(self, request: http.Request, answer_id: str, sent: int) -> None:
        if request.finished or request._disconnected:
            return
        if sent == 2 and self.fault["chat"] == "cut":
            request.channel.transport.loseConnection()  # (a crashed generation: the events so far, then nothing)
            return
        if sent < TOKENS:
            delta = {"content": f"{self.name} " if sent else self.name}
            request.write(_event({"id": answer_id, "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                                  "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
            reactor.callLater(TOKEN_DELAY, self._stream, request, answer_id, sent + 1)
            return
        request.write(_event({"id": answer_id, "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                              "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        request.write(b"data: [DONE]\n\n")
        request.finish()


def _json(request: http.Request, status: int, payload: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode()


def _event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    site = Site(Host(name))
    site.noisy = False
    listening = reactor.listenTCP(port, site, interface="127.0.0.1")
    print(f"listening {name} {listening.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
