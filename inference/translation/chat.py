"""What a chat completion says, read as a list of output blocks, from a whole answer or from its stream's chunks.

The Responses API and Anthropic's Messages API both answer with a list of blocks (reasoning, text, tool calls),
while chat completions carries them as fields of one message. Reading chat into blocks once lets each API's
translation be only about its own shapes; the stream reader opens, grows and closes blocks as chunks arrive, so
a translated stream has the event order its API promises.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from ..errors import GatewayError, InvalidRequest

Event = tuple[dict[str, Any], str]  # an event of the translated stream: its JSON object and its ``event:`` name


@dataclass
class Block:
    """One piece of output: ``reasoning``, ``text``, ``refusal`` or ``tool_call`` (whose text is its arguments)."""

    kind: str
    text: str = ""
    call_id: str = ""
    name: str = ""


@dataclass
class Usage:
    input: int
    output: int
    cached: int = 0  # input tokens the upstream read from its prompt cache
    reasoning: int = 0  # output tokens spent on reasoning


@dataclass
class ChatResult:
    """A chat completion's answer as blocks (while a stream is read: what arrived so far)."""

    id: str = ""
    model: str = ""
    created: int = 0
    blocks: list[Block] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    deltas: int = 0  # how many deltas a stream carried (the output's size when the upstream counts no tokens)


def as_object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (upstreams send null or worse where objects belong)."""
    return value if isinstance(value, dict) else {}


def unsupported(what: str, param: str, route: str) -> InvalidRequest:
    """The 400 for what a chat request cannot carry, when the upstream lacks ``route`` itself."""
    return InvalidRequest(f"'{param}': {what} cannot be served by this upstream: it has no {route}, and the gateway "
                          "serves the call through /v1/chat/completions, which has no such thing", param=param)


def unsupported_tool(kind: Any, param: str, route: str) -> InvalidRequest:
    """The 400 for a hosted tool (web search, code execution ...) an upstream without ``route`` cannot run."""
    return unsupported(f"A tool of type {kind!r} (only function tools are; hosted tools are left out unless "
                       "inference.translation.unsupported_tools is reject)", param, route)


def string_field(item: dict[str, Any], key: str, where: str) -> str:
    """``item[key]``, which a request must give as a string (``where`` names ``item`` in the 400)."""
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"'{where}.{key}' must be a string", param=f"{where}.{key}")
    return value


def new_id(prefix: str) -> str:
    """An id for an object the upstream did not name (a response, a message, a tool call)."""
    return f"{prefix}{uuid.uuid4().hex}"


def _text(value: Any) -> str:
    """A content field as text: chat servers send a string, None, or (rarely) a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p["text"] for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _head(data: dict[str, Any], result: ChatResult) -> None:
    result.id = data["id"] if isinstance(data.get("id"), str) else ""
    result.model = data["model"] if isinstance(data.get("model"), str) else ""
    created = data.get("created")
    result.created = created if isinstance(created, int) and not isinstance(created, bool) else 0


def usage_of(usage: Any) -> Usage | None:
    """A chat ``usage`` object's counts (None when the upstream sent none that make sense)."""
    if not isinstance(usage, dict):
        return None
    counts = [usage.get("prompt_tokens"), usage.get("completion_tokens"),
              (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
              (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")]
    prompt, completion, cached, reasoning = (c if isinstance(c, int) and not isinstance(c, bool) and c >= 0 else None
                                             for c in counts)
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion, cached or 0, reasoning or 0)


def _reasoning(message: dict[str, Any]) -> str:
    """Reasoning text: LM Studio says ``reasoning`` (newer) or ``reasoning_content`` (llama.cpp, older)."""
    return _text(message.get("reasoning_content")) or _text(message.get("reasoning"))


def result_of(answer: dict[str, Any]) -> ChatResult:
    """A whole (non-streaming) chat answer as blocks: reasoning first, then text or refusal, then tool calls."""
    result = ChatResult(usage=usage_of(answer.get("usage")))
    _head(answer, result)
    choice = next((c for c in answer.get("choices") or () if isinstance(c, dict)), {})
    message = as_object(choice.get("message"))
    reason = choice.get("finish_reason")
    result.finish_reason = reason if isinstance(reason, str) else None
    for kind, text in (("reasoning", _reasoning(message)), ("text", _text(message.get("content"))),
                       ("refusal", _text(message.get("refusal")))):
        if text:
            result.blocks.append(Block(kind, text))
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            result.blocks.append(Block("tool_call", _text(function.get("arguments")), _call_id(call),
                                       _text(function.get("name"))))
    return result


def _call_id(call: dict[str, Any]) -> str:
    return call["id"] if isinstance(call.get("id"), str) and call["id"] else new_id("call_")


class StreamWriter(Protocol):
    """An API's stream events for the moments of a chat stream (each returns the events to send, in order)."""

    def started(self, result: ChatResult) -> list[Event]: ...

    def opened(self, block: Block, index: int) -> list[Event]: ...

    def grew(self, block: Block, index: int, delta: str) -> list[Event]: ...

    def closed(self, block: Block, index: int) -> list[Event]: ...

    def finished(self, result: ChatResult) -> list[Event]: ...

    def failed(self, error: GatewayError, result: ChatResult) -> list[Event]:
        """The stream failed after its 200: ``error`` in the API's own shape (the one a passthrough stream of
        the API ends with too: :class:`~inference.errors.GatewayError` builds both)."""


class ChatStreamReader:
    """Reads chat completion chunks into blocks and has ``writer`` say each step in its API's events.

    A block stays open while its deltas keep coming and is closed when another kind of output starts (reasoning,
    then text, then each tool call, as models produce them). The stream finishes at ``[DONE]``, or when the
    upstream ends it after a finish reason; usage arrives after the finish reason, so neither finishes it alone.
    """

    def __init__(self, writer: StreamWriter) -> None:
        self.result = ChatResult()
        self._writer = writer
        self._started = False
        self._open: tuple[Any, Block] | None = None  # the key of the open block ("text", ("tool", 0) ...), the block
        self._over = False

    def chunk(self, data: dict[str, Any]) -> list[Event]:
        """One chunk's events (an ``error`` chunk fails the stream before it gets here: see :meth:`broken`)."""
        if self._over:
            return []
        events: list[Event] = []
        if not self._started:
            self._started = True
            _head(data, self.result)
            events += self._writer.started(self.result)
        choice = next((c for c in data.get("choices") or () if isinstance(c, dict) and c.get("index", 0) == 0), None)
        if choice is not None:
            delta = as_object(choice.get("delta"))
            for kind, text in (("reasoning", _reasoning(delta)), ("text", _text(delta.get("content"))),
                               ("refusal", _text(delta.get("refusal")))):
                if text:
                    events += self._grow(kind, partial(Block, kind), text)
            for position, call in enumerate(delta.get("tool_calls") or ()):
                if isinstance(call, dict):
                    events += self._tool_call(call, position)
            if isinstance(choice.get("finish_reason"), str):
                self.result.finish_reason = choice["finish_reason"]
        usage = usage_of(data.get("usage"))
        if usage is not None:
            self.result.usage = usage
        return events

    def _tool_call(self, call: dict[str, Any], position: int) -> list[Event]:
        function = as_object(call.get("function"))
        key = ("tool", call.get("index", position))

        def block() -> Block:
            return Block("tool_call", call_id=_call_id(call), name=_text(function.get("name")))

        events = self._grow(key, block, "")
        arguments = _text(function.get("arguments"))
        return events + (self._grow(key, block, arguments) if arguments else [])

    def _grow(self, key: Any, make: Callable[[], Block], text: str) -> list[Event]:
        """Add ``text`` to the block ``key`` names, opening it (and closing the open one) if it is not open."""
        events: list[Event] = []
        if self._open is None or self._open[0] != key:
            events += self._close()
            block = make()
            self.result.blocks.append(block)
            self._open = (key, block)
            events += self._writer.opened(block, len(self.result.blocks) - 1)
        block = self._open[1]
        if text:
            block.text += text
            self.result.deltas += 1
            events += self._writer.grew(block, len(self.result.blocks) - 1, text)
        return events

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        block, self._open = self._open[1], None
        return self._writer.closed(block, len(self.result.blocks) - 1)

    def done(self) -> list[Event]:
        """``[DONE]``: the answer is complete."""
        if self._over or not self._started:
            return []
        if self.result.finish_reason is None:
            self.result.finish_reason = "stop"
        return self.end()

    def end(self) -> list[Event]:
        """The upstream's stream ended: finish the answer if it was finished (else the relay reports the cut)."""
        if self._over or self.result.finish_reason is None:
            return []
        self._over = True
        return self._close() + self._writer.finished(self.result)

    def broken(self, error: GatewayError) -> list[Event]:
        """The stream failed (the upstream reported an error, sent something that is not a chat chunk, or cut it)."""
        if self._over:
            return []
        self._over = True
        return self._writer.failed(error, self.result)
