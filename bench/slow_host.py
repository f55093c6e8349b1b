"""A fake host whose calls take time, for the fairness benchmark: a chat completion answers after ``--chat-ms``, an
embedding after ``--embed-ms``; it says how many calls it ran at once, at most (GET /_most).

    python bench/slow_host.py PORT [--chat-ms 200] [--embed-ms 50]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from twisted.internet import reactor
from twisted.web import resource, server

MODELS = {"object": "list", "data": [{"id": "bench-model", "object": "model", "owned_by": "bench"},
                                     {"id": "bench-embed", "object": "model", "owned_by": "bench"}]}


class Host(resource.Resource):
    isLeaf = True

    def __init__(self, chat_secs: float, embed_secs: float) -> None:
        super().__init__()
        self.chat_secs, self.embed_secs = chat_secs, embed_secs
        self.running = self.most = 0

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/_most":
            return json.dumps({"most": self.most}).encode()
        return json.dumps(MODELS).encode()

    def render_POST(self, request: server.Request) -> Any:
        body = json.loads(request.content.read())
        embedding = request.path.endswith(b"/embeddings")
        answer = {"object": "list", "model": body["model"], "data": [{"object": "embedding", "index": 0,
                                                                       "embedding": [0.1, 0.2, 0.3]}],
                  "usage": {"prompt_tokens": 4, "total_tokens": 4}} if embedding else {
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}}
        self.running += 1
        self.most = max(self.most, self.running)

        def answer_now() -> None:
            self.running -= 1
            if not request.finished and not request._disconnected:
                request.setHeader(b"content-type", b"application/json")
                request.write(json.dumps(answer).encode())
                request.finish()

        reactor.callLater(self.embed_secs if embedding else self.chat_secs, answer_now)
        return server.NOT_DONE_YET


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--chat-ms", type=float, default=200)
    parser.add_argument("--embed-ms", type=float, default=50)
    args = parser.parse_args()
    reactor.listenTCP(args.port, server.Site(Host(args.chat_ms / 1000, args.embed_ms / 1000)), interface="127.0.0.1")
    print(f"listening {args.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
