"""A model server inside the gateway: deterministic answers, no network, so it runs anywhere."""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
import random
import struct
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from .. import jsonio
from ..config import MockConfig
from ..operations import Operation
from ..sse import DONE
from .base import ChatStream, Completion, EventConsumer, Provider
from .mock_messages import message_events, message_object
from .mock_responses import response_events, response_object


def words_of(content: Any) -> list[str]:
    """The words of a message's content, a string or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content.split()
    if isinstance(content, list):
        return [w for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
                for w in part["text"].split()]
    return []


def prompt_words(operation: Operation, body: dict[str, Any]) -> list[str]:
    """What the mock answers to: the last user message of a chat, the (first) prompt of a text completion."""
    if operation.name == "text_completion":
        prompt = body["prompt"]
        first = prompt if isinstance(prompt, str) else prompt[0]
        return first.split() if isinstance(first, str) else [f"<{len(prompt)} tokens>"]
    messages = body["input"] if operation.name == "responses" else body["messages"]  # chat and Anthropic's
    if isinstance(messages, str):
        return messages.split()
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    return words_of(last_user.get("content")) if last_user else []


def reply_words(operation: Operation, body: dict[str, Any]) -> tuple[list[str], str]:
    """The mock's answer: it echoes what it was given, cut to ``max_tokens`` words (one word, one token)."""
    said = prompt_words(operation, body)
    words = ["You", "said:", *said] if said else ["Hello", "from", "the", "mock", "model."]
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens") or len(words)
    return (words[:limit], "length") if len(words) > limit else (words, "stop")


class _Shape:
    """How one operation's answers and stream chunks look (chat: messages and deltas; completions: text)."""

    def __init__(self, prefix: str, kind: str, chunk_kind: str, choice: Any, delta: Any, first: Any) -> None:
        self.prefix, self.kind, self.chunk_kind = prefix, kind, chunk_kind
        self.choice, self.delta, self.first = choice, delta, first


_SHAPES = {
    "chat": _Shape("chatcmpl", "chat.completion", "chat.completion.chunk",
                   lambda text: {"message": {"role": "assistant", "content": text}},
                   lambda text: {"delta": {"content": text} if text else {}},
                   {"delta": {"role": "assistant", "content": ""}}),
    "text_completion": _Shape("cmpl", "text_completion", "text_completion",
                              lambda text: {"text": text, "logprobs": None},
                              lambda text: {"text": text, "logprobs": None}, {"text": "", "logprobs": None}),
}


class MockProvider(Provider):
    name = "mock"
    base_url = "mock://"

    def __init__(self, reactor: Any, config: MockConfig) -> None:
        self._reactor = reactor
        self._config = config
        self._ids = itertools.count(1)
        self._created = int(time.time())

    async def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        kinds = [(m, "llm") for m in self._config.models] + [(m, "embeddings") for m in self._config.embedding_models]
        return [{"id": m, "object": "model", "created": self._created, "owned_by": "mock", "type": kind,
                 "state": "loaded"} for m, kind in kinds]

    async def call(self, operation: Operation, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> Completion:
        if operation.name == "embeddings":
            return _embeddings(body)
        if operation.name == "messages":
            words, finish_reason = reply_words(operation, body)
            data = message_object(f"msg_mock_{next(self._ids)}", body["model"], words, finish_reason,
                                  _message_tokens(body))
            return Completion(data, jsonio.dumps(data))
        if operation.name == "responses":
            words, finish_reason = reply_words(operation, body)
            data = response_object(f"resp_mock_{next(self._ids)}", body, int(self._reactor.seconds()), words,
                                   finish_reason, len(prompt_words(operation, body)))
            return Completion(data, jsonio.dumps(data))
        shape = _SHAPES[operation.name]
        words, finish_reason = reply_words(operation, body)
        delay = self._config.latency_secs + self._config.token_delay_secs * len(words)
        if delay:
            await deferLater(self._reactor, delay, lambda: None)
        data = {
            "id": f"{shape.prefix}-mock-{next(self._ids)}",
            "object": shape.kind,
            "created": int(self._reactor.seconds()),
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": finish_reason, **shape.choice(" ".join(words))}],
            "usage": _usage(operation, body, words),
        }
        return Completion(data, jsonio.dumps(data))

    async def open_stream(self, operation: Operation, body: dict[str, Any],
                          headers: dict[str, str] | None = None) -> ChatStream:
        words, finish_reason = reply_words(operation, body)
        if operation.name == "messages":
            named = message_events(f"msg_mock_{next(self._ids)}", body["model"], words, finish_reason,
                                   _message_tokens(body))
            return MockEventStream(self._reactor, named, self._config.latency_secs, self._config.token_delay_secs)
        if operation.name == "responses":
            named = response_events(f"resp_mock_{next(self._ids)}", body, int(self._reactor.seconds()), words,
                                    finish_reason, len(prompt_words(operation, body)))
            return MockEventStream(self._reactor, named, self._config.latency_secs, self._config.token_delay_secs)
        shape = _SHAPES[operation.name]
        head = {"id": f"{shape.prefix}-mock-{next(self._ids)}", "object": shape.chunk_kind,
                "created": int(self._reactor.seconds()), "model": body["model"]}

        def chunk(choice: dict[str, Any], finish: str | None = None) -> bytes:
            return jsonio.dumps({**head, "choices": [{"index": 0, **choice, "finish_reason": finish}]})

        events = [chunk(shape.first)]
        events += [chunk(shape.delta(word if i == 0 else " " + word)) for i, word in enumerate(words)]
        events += [chunk(shape.delta(""), finish_reason),
                   jsonio.dumps({**head, "choices": [], "usage": _usage(operation, body, words)}), DONE]
        return MockEventStream(self._reactor, [(event, None) for event in events], self._config.latency_secs,
                               self._config.token_delay_secs)


def _usage(operation: Operation, body: dict[str, Any], words: list[str]) -> dict[str, int]:
    if operation.name == "text_completion":
        prompt_tokens = len(prompt_words(operation, body))
    else:
        prompt_tokens = sum(len(words_of(m.get("content"))) for m in body["messages"])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words)}


def _message_tokens(body: dict[str, Any]) -> int:
    system = body.get("system")
    return sum(len(words_of(m.get("content"))) for m in body["messages"]) + len(words_of(system))


EMBEDDING_DIMENSIONS = 64


def embedding(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A unit vector that depends on the text alone: the same text always gets the same vector."""
    generator = random.Random(hashlib.sha256(text.encode("utf-8")).digest())
    vector = [generator.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _embeddings(body: dict[str, Any]) -> Completion:
    given = body["input"]
    inputs = [given] if isinstance(given, str) or not isinstance(given[0], (str, list)) else given
    dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        vector = embedding(item if isinstance(item, str) else " ".join(map(str, item)), dimensions)
        encoded: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(len(i.split()) if isinstance(i, str) else len(i) for i in inputs)
    answer = {"object": "list", "data": data, "model": body["model"],
              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return Completion(answer, jsonio.dumps(answer))


class MockEventStream(ChatStream):
    """Plays prepared events (payload and ``event:`` name): the first after ``latency``, each content word
    ``token_delay`` after the last."""

    def __init__(self, reactor: Any, events: list[tuple[bytes, bytes | None]], latency: float,
                 token_delay: float) -> None:
        self._reactor = reactor
        self._events = events
        self._next = 0
        self._latency = latency
        self._token_delay = token_delay
        self._paused = False
        self._timer: Any = None
        self._consumer: EventConsumer | None = None
        self.done: Deferred[None] = Deferred(lambda _: self.stopProducing())

    def begin(self, consumer: EventConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._timer = self._reactor.callLater(self._latency, self._play)
        return self.done

    def _play(self) -> None:
        self._timer = None
        consumer = self._consumer
        assert consumer is not None  # begin() set it
        while not self._paused and not self.done.called and self._next < len(self._events):
            consumer.event(*self._events[self._next])
            self._next += 1
            if self._token_delay and 1 < self._next < len(self._events) - 2:  # between content words
                self._timer = self._reactor.callLater(self._token_delay, self._play)
                return
        if self._next == len(self._events) and not self.done.called:
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._timer is None and not self.done.called:
            self._timer = self._reactor.callLater(0, self._play)

    def stopProducing(self) -> None:
        # The client is gone: stop playing. ``done`` is left to the canceller (Klein cancels the handler).
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._next = len(self._events)

    def fail(self, error: Exception) -> None:
        self.stopProducing()
        if not self.done.called:
            self.done.errback(error)
