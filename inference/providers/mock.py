"""A model server inside the gateway: deterministic answers, no network, so it runs anywhere."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import random
import struct
import time
from typing import Any

from twisted.internet.task import deferLater

from .. import jsonio
from ..config import MockConfig
from ..errors import InvalidRequest
from ..operations import CHAT, Operation
from ..reactor import IGatewayReactor
from ..sse import DONE
from ..tenants import ANONYMOUS, Caller
from ..translation.chat import as_object
from .base import ChatStream, Completion, Provider
from .replay import PreparedStream
from .translated import call_translated, open_translated


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
    if operation.input_field == "prompt":  # a text completion
        prompt = body["prompt"]
        first = prompt if isinstance(prompt, str) else prompt[0]
        return first.split() if isinstance(first, str) else [f"<{len(prompt)} tokens>"]
    last_user = next((m for m in reversed(body["messages"]) if m.get("role") == "user"), None)
    return words_of(last_user.get("content")) if last_user else []


def _last_turn(body: dict[str, Any]) -> dict[str, Any]:
    """The conversation's last turn that is not a system one (agents add system notes after tool results)."""
    return next((m for m in reversed(body["messages"]) if m.get("role") not in ("system", "developer")), {})


def reply_words(operation: Operation, body: dict[str, Any]) -> tuple[list[str], str]:
    """The mock's answer: it echoes what it was given (a tool's result, after a tool call), cut to ``max_tokens``
    words (one word, one token)."""
    last = _last_turn(body) if operation.input_field == "messages" else {}
    if last.get("role") == "tool":
        words = ["The", "tool", "said:", *words_of(last.get("content"))]
    else:
        said = prompt_words(operation, body)
        words = ["You", "said:", *said] if said else ["Hello", "from", "the", "mock", "model."]
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or len(words)
    return (words[:limit], "length") if len(words) > limit else (words, "stop")


def tool_call(body: dict[str, Any]) -> tuple[str, str] | None:
    """The tool the mock calls, and its arguments, when the request offers tools and the conversation is not
    waiting on a tool's result: the one ``tool_choice`` names, else the last one the user's message names (its
    text arguments are then the words after the name: "Read /etc/hostname" reads that file), else the first.
    Every required argument is filled: text with the user's words, numbers with their count."""
    tools = [t["function"] for t in body.get("tools") or () if isinstance(t, dict) and isinstance(t.get("function"),
                                                                                             dict)]
    choice = body.get("tool_choice")
    if not tools or choice == "none" or _last_turn(body).get("role") == "tool":
        return None
    said = prompt_words(CHAT, body)
    names = {t.get("name"): t for t in tools}
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    mentioned = next((i for i in range(len(said) - 1, -1, -1) if said[i] in names), None)
    if named is None and mentioned is not None:
        named, said = said[mentioned], said[mentioned + 1:]
    tool = names.get(named, tools[0])
    schema = as_object(tool.get("parameters"))
    properties = as_object(schema.get("properties"))
    samples: dict[Any, Any] = {"string": " ".join(said), "integer": len(said), "number": len(said),
                               "boolean": True, "array": [], "object": {}}
    required = [name for name in schema.get("required") or () if name in properties] or list(properties)[:1]
    arguments = {name: samples.get(as_object(properties[name]).get("type"), " ".join(said)) for name in required}
    return str(tool.get("name")), json.dumps(arguments)


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

    def __init__(self, reactor: IGatewayReactor, config: MockConfig) -> None:
        self._reactor = reactor
        self._config = config
        self._ids = itertools.count(1)
        self._created = int(time.time())

    async def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        kinds = [(m, "llm") for m in self._config.models] + [(m, "embeddings") for m in self._config.embedding_models]
        return [{"id": m, "object": "model", "created": self._created, "owned_by": "mock", "type": kind,
                 "state": "loaded"} for m, kind in kinds]

    async def call(self, operation: Operation, body: dict[str, Any], headers: dict[str, str] | None = None,
                   caller: Caller = ANONYMOUS) -> Completion:
        if operation.model_kind == "embeddings":
            return _embeddings(body)
        if operation.translation is not None:  # the mock serves the Responses and Messages APIs as chat
            return await call_translated(self, operation, body, headers)
        shape = _SHAPES[operation.name]
        words, finish_reason = reply_words(operation, body)
        call = tool_call(body) if operation.input_field == "messages" else None
        delay = self._config.latency_secs + self._config.token_delay_secs * len(words)
        if delay:
            await deferLater(self._reactor, delay, lambda: None)
        choice = {"index": 0, "finish_reason": finish_reason, **shape.choice(" ".join(words))}
        if call is not None:
            calls = [{"id": f"call_mock_{next(self._ids)}", "type": "function",
                      "function": {"name": call[0], "arguments": call[1]}}]
            choice = {"index": 0, "finish_reason": "tool_calls",
                      "message": {"role": "assistant", "content": None, "tool_calls": calls}}
            words = _argument_pieces(call[1])
        data = {
            "id": f"{shape.prefix}-mock-{next(self._ids)}",
            "object": shape.kind,
            "created": int(self._reactor.seconds()),
            "model": body["model"],
            "choices": [choice],
            "usage": _usage(operation, body, words),
        }
        return Completion(data, jsonio.dumps(data))

    async def open_stream(self, operation: Operation, body: dict[str, Any], headers: dict[str, str] | None = None,
                          caller: Caller = ANONYMOUS) -> ChatStream:
        if operation.translation is not None:
            return await open_translated(self, operation, body, headers)
        words, finish_reason = reply_words(operation, body)
        shape = _SHAPES[operation.name]
        head = {"id": f"{shape.prefix}-mock-{next(self._ids)}", "object": shape.chunk_kind,
                "created": int(self._reactor.seconds()), "model": body["model"]}

        def chunk(choice: dict[str, Any], finish: str | None = None) -> bytes:
            return jsonio.dumps({**head, "choices": [{"index": 0, **choice, "finish_reason": finish}]})

        call = tool_call(body) if operation.input_field == "messages" else None
        if call is None:
            deltas = [shape.delta(word if i == 0 else " " + word) for i, word in enumerate(words)]
        else:  # a tool call streams as OpenAI's do: its id and name first, then its arguments in pieces
            words, finish_reason = _argument_pieces(call[1]), "tool_calls"
            opening = {"index": 0, "id": f"call_mock_{next(self._ids)}", "type": "function",
                       "function": {"name": call[0], "arguments": ""}}
            deltas = [{"delta": {"tool_calls": [opening]}}]
            deltas += [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}} for piece in words]
        events = [chunk(shape.first)] + [chunk(delta) for delta in deltas]
        events += [chunk(shape.delta(""), finish_reason),
                   jsonio.dumps({**head, "choices": [], "usage": _usage(operation, body, words)}), DONE]
        return PreparedStream(self._reactor, [(event, None) for event in events], self._config.latency_secs,
                               self._config.token_delay_secs)


def _argument_pieces(arguments: str) -> list[str]:
    """A tool call's arguments cut in pieces of about eight characters (the deltas a model would stream)."""
    return [arguments[i:i + 8] for i in range(0, len(arguments), 8)]


def _usage(operation: Operation, body: dict[str, Any], words: list[str]) -> dict[str, int]:
    if operation.input_field == "prompt":
        prompt_tokens = len(prompt_words(operation, body))
    else:
        prompt_tokens = sum(len(words_of(m.get("content"))) for m in body["messages"])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words)}


EMBEDDING_DIMENSIONS = 64


def embedding(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A unit vector that depends on the text alone: the same text always gets the same vector."""
    generator = random.Random(hashlib.sha256(text.encode("utf-8")).digest())
    vector = [generator.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


MAX_EMBEDDING_NUMBERS = 262_144
"""The most numbers (inputs x dimensions) one mock embeddings answer holds: each is computed in the reactor's
thread, and 256 Ki of them take about a tenth of a second."""


def _embeddings(body: dict[str, Any]) -> Completion:
    given = body["input"]
    inputs = [given] if isinstance(given, str) or not isinstance(given[0], (str, list)) else given
    dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS
    if len(inputs) * dimensions > MAX_EMBEDDING_NUMBERS:
        raise InvalidRequest(f"{len(inputs)} inputs of {dimensions} dimensions are {len(inputs) * dimensions} "
                             f"numbers; the mock answers at most {MAX_EMBEDDING_NUMBERS} per request",
                             param="dimensions")
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
