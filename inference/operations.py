"""The APIs the gateway serves, one short declaration each; the steps every call takes are written once (api.py).

An :class:`Operation` says how a request body is checked, which kind of model answers it, where it goes upstream,
and how its answer and its stream events are read for metrics, spans and the access line.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from .config import Config
from .errors import GatewayError
from .schema import ParsedRequest, parse_chat_request, parse_completion_request, parse_embeddings_request


@dataclass
class Facts:
    """What an answer says about itself (None where it does not say)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reasons: tuple[str, ...] = ()
    response_id: str | None = None
    response_model: str | None = None
    output: list[Any] | None = None  # the generated text, kept only when the operator captures content
    attributes: dict[str, Any] = field(default_factory=dict)  # span attributes only this operation has


@dataclass
class StreamStats:
    """What one stream measured, for logs, metrics and spans (times are ``perf_counter`` readings): what its events
    said about the answer (``facts``), when the first token came, how many deltas carried output, and how it ended."""

    facts: Facts = field(default_factory=Facts)
    first_token_at: float | None = None
    content_chunks: int = 0
    text: list[str] | None = None  # the generated text, kept only when the operator captures content
    error: GatewayError | None = None
    client_gone: bool = False

    def generated(self, text: Any = None) -> None:
        """A delta that carries generated output (text, reasoning or a tool call) arrived."""
        if self.first_token_at is None:
            self.first_token_at = perf_counter()
        self.content_chunks += 1
        if self.text is not None and isinstance(text, str):
            self.text.append(text)


EventReader = Callable[[dict[str, Any], StreamStats], None]
"""Reads one stream event (a JSON object) into what the stream measured."""


@dataclass(frozen=True)
class Operation:
    """One API: its route (also the upstream path), how it is parsed, and how its answers are read."""

    name: str  # the ``operation`` metric label
    path: str
    gen_ai_name: str  # ``gen_ai.operation.name`` on the CLIENT span
    model_kind: str  # the kind of model that serves it: ``llm`` (text and vision models) or ``embeddings``
    parse: Callable[[bytes, Config], ParsedRequest]
    answer_list: str  # the list every answer holds ("choices", "data"): an answer without it is not one
    input_field: str  # where the body holds its input (recorded in spans only with capture_content)
    read_answer: Callable[[dict[str, Any], bool], Facts]  # (answer, capture content) -> facts
    read_event: EventReader | None  # None: the API does not stream


def count(usage: Any, key: str) -> int | None:
    """A token count from a usage object, when it is a sane one."""
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _choices(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in data.get("choices") or () if isinstance(c, dict)]


def _identity(data: dict[str, Any], facts: Facts) -> Facts:
    response_id, model = data.get("id"), data.get("model")
    facts.response_id = response_id if isinstance(response_id, str) else None
    facts.response_model = model if isinstance(model, str) else None
    return facts


def _finish_reasons(choices: list[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(c["finish_reason"] for c in choices if isinstance(c.get("finish_reason"), str))


# -- chat completions ----------------------------------------------------------------------------------------------

def _chat_answer(data: dict[str, Any], capture: bool) -> Facts:
    choices, usage = _choices(data), data.get("usage")
    return _identity(data, Facts(
        input_tokens=count(usage, "prompt_tokens"), output_tokens=count(usage, "completion_tokens"),
        finish_reasons=_finish_reasons(choices),
        output=[(c.get("message") or {}).get("content") for c in choices] if capture else None))


def _choice_events(output_of: Callable[[dict[str, Any]], tuple[bool, Any]]) -> EventReader:
    """The reader of a stream of ``choices`` chunks; ``output_of(choice)`` says whether the choice carries
    generated output, and its text."""
    def read(chunk: dict[str, Any], stats: StreamStats) -> None:
        if stats.facts.response_id is None:
            _identity(chunk, stats.facts)
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            generated, text = output_of(choice)
            if generated:
                stats.generated(text)
            reason = choice.get("finish_reason")
            if reason and isinstance(reason, str):
                stats.facts.finish_reasons += (reason,)
        _stream_usage(chunk, stats)

    return read


def _chat_delta(choice: dict[str, Any]) -> tuple[bool, Any]:
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning") or delta.get("reasoning_content")
                or delta.get("tool_calls")), delta.get("content")


def _stream_usage(chunk: dict[str, Any], stats: StreamStats) -> None:
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        stats.facts.input_tokens = count(usage, "prompt_tokens")
        stats.facts.output_tokens = count(usage, "completion_tokens")


CHAT = Operation(
    name="chat", path="/v1/chat/completions", gen_ai_name="chat", model_kind="llm",
    parse=lambda raw, config: parse_chat_request(raw, config.inference.defaults, config.server.max_messages),
    answer_list="choices", input_field="messages", read_answer=_chat_answer,
    read_event=_choice_events(_chat_delta))


# -- text completions ----------------------------------------------------------------------------------------------

def _completion_answer(data: dict[str, Any], capture: bool) -> Facts:
    choices, usage = _choices(data), data.get("usage")
    return _identity(data, Facts(
        input_tokens=count(usage, "prompt_tokens"), output_tokens=count(usage, "completion_tokens"),
        finish_reasons=_finish_reasons(choices), output=[c.get("text") for c in choices] if capture else None))


def _completion_text(choice: dict[str, Any]) -> tuple[bool, Any]:
    return bool(choice.get("text")), choice.get("text")


COMPLETIONS = Operation(
    name="text_completion", path="/v1/completions", gen_ai_name="text_completion", model_kind="llm",
    parse=lambda raw, config: parse_completion_request(raw, config.inference.defaults),
    answer_list="choices", input_field="prompt", read_answer=_completion_answer,
    read_event=_choice_events(_completion_text))


# -- embeddings ----------------------------------------------------------------------------------------------------

def _embeddings_answer(data: dict[str, Any], capture: bool) -> Facts:
    facts = _identity(data, Facts(input_tokens=count(data.get("usage"), "prompt_tokens")))
    facts.response_id = None  # an embeddings list has no id of its own
    items = data.get("data") or []
    first = items[0].get("embedding") if items and isinstance(items[0], dict) else None
    if isinstance(first, list) and first and isinstance(first[0], list):
        first = first[0]  # llama.cpp without pooling answers one vector per token
    dimensions = len(first) if isinstance(first, list) else _base64_floats(first)
    if dimensions:
        facts.attributes["gen_ai.embeddings.dimension.count"] = dimensions
    return facts


def _base64_floats(value: Any) -> int | None:
    """How many float32 a base64 embedding holds (the upstream's own encoding is relayed, not decoded)."""
    if not isinstance(value, str):
        return None
    try:
        return len(base64.b64decode(value, validate=True)) // 4
    except ValueError:
        return None


EMBEDDINGS = Operation(
    name="embeddings", path="/v1/embeddings", gen_ai_name="embeddings", model_kind="embeddings",
    parse=lambda raw, config: parse_embeddings_request(raw, config.server.max_embedding_inputs,
                                                       config.server.max_embedding_size),
    answer_list="data", input_field="input", read_answer=_embeddings_answer, read_event=None)
