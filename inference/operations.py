"""The APIs the gateway serves, one short declaration each; the steps every call takes are written once (api.py).

An :class:`Operation` says how a request body is checked, which kind of model answers it, where it goes upstream,
and how its answer and its stream events are read for metrics, spans and the access line.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from .config import Config
from .errors import GatewayError, UpstreamError, from_upstream
from .routing.conversation import Prefix
from .schema import (
    ParsedRequest,
    parse_chat_request,
    parse_completion_request,
    parse_embeddings_request,
    parse_messages_request,
    parse_responses_request,
)
from .sse import DONE_EVENT, encode, error_event
from .translation import MESSAGES_VIA_CHAT, RESPONSES_VIA_CHAT, Translation


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
    opening: dict[str, Any] | None = None  # a typed-event stream's opening object (the Responses API's response)
    sequence: int = -1  # the last ``sequence_number`` a typed-event stream gave

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
class StreamFormat:
    """How an API's event stream reports a failure, and how the gateway ends one: OpenAI's chat and completion
    streams end with ``data: [DONE]`` and carry ``{"error": ...}`` events; typed-event APIs have their own."""

    failure: Callable[[dict[str, Any], bytes], GatewayError | None]  # (event, its bytes) -> the failure it reports
    error_event: Callable[[GatewayError, StreamStats], bytes]  # written when the stream fails after its 200
    closing: bytes  # written last, after the upstream's events (and the error event, if any)


def _error_field(chunk: dict[str, Any], payload: bytes) -> GatewayError | None:
    return from_upstream(500, payload, chunk) if chunk.get("error") is not None else None


OPENAI_STREAM = StreamFormat(failure=_error_field, error_event=lambda error, stats: error_event(error),
                             closing=DONE_EVENT)


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
    stream_format: StreamFormat = OPENAI_STREAM
    asks_usage: bool = True  # streams ask for ``stream_options.include_usage`` (chat and completions only)
    span_attributes: tuple[tuple[str, str], ...] = ()  # constant attributes of its CLIENT span
    error_style: str = "openai"  # the shape of its error answers: ``openai`` or ``anthropic``
    forward_headers: tuple[bytes, ...] = ()  # client headers passed on upstream (``anthropic-version``)
    translation: Translation | None = None  # how it is served through chat completions by upstreams that lack it
    output_limits: tuple[str, ...] = ()  # the fields that ask for at most so many output tokens
    fills_output_limit: bool = False  # a call that asks no limit gets the cap (agents write long answers)
    prefix: Prefix | None = None  # where its conversation begins (prefix-cache routing); None: no conversation
    continues_responses: bool = False  # answers carry an id a later call continues (``previous_response_id``)

    def limit_output(self, body: dict[str, Any], cap: int) -> None:
        """Lower every output limit ``body`` asks above ``cap`` to it, and fill the cap in where this API does."""
        asked = False
        for key in self.output_limits:
            value = body.get(key)
            if value is not None:
                asked = True
                if value > cap:
                    body[key] = cap
        if not asked and self.fills_output_limit:
            body[self.output_limits[0]] = cap


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
        if "usage" in chunk:  # the last chunk only: no call for the others
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
    read_event=_choice_events(_chat_delta), output_limits=("max_tokens", "max_completion_tokens"),
    prefix=Prefix(system="system", turns="messages", cache_key=True))


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
    read_event=_choice_events(_completion_text), output_limits=("max_tokens",), prefix=Prefix(prompt="prompt"))


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
                                                       config.server.max_embedding_size,
                                                       config.server.max_embedding_dimensions),
    answer_list="data", input_field="input", read_answer=_embeddings_answer, read_event=None)


# -- the Responses API ---------------------------------------------------------------------------------------------

def _typed_facts(data: dict[str, Any]) -> Facts:
    """The id, model and token counts of a Responses API or Messages API answer (both count input and output)."""
    usage = data.get("usage")
    return _identity(data, Facts(input_tokens=count(usage, "input_tokens"),
                                 output_tokens=count(usage, "output_tokens")))


def _responses_answer(data: dict[str, Any], capture: bool) -> Facts:
    facts = _typed_facts(data)
    facts.input_tokens = facts.input_tokens or None  # no prompt is 0 tokens long: 0 is an upstream that counted none
    if isinstance(data.get("status"), str):
        facts.finish_reasons = (data["status"],)
    if capture:
        facts.output = [part.get("text") for item in data.get("output") or () if isinstance(item, dict)
                        for part in item.get("content") or () if isinstance(part, dict)
                        and part.get("type") == "output_text"]
    return facts


_OUTPUT_DELTAS = ("response.output_text.delta", "response.refusal.delta", "response.reasoning_text.delta",
                  "response.reasoning_summary_text.delta", "response.function_call_arguments.delta")
_ENDINGS = ("response.completed", "response.incomplete")


def _responses_event(event: dict[str, Any], stats: StreamStats) -> None:
    kind = event.get("type")
    sequence = event.get("sequence_number")
    if isinstance(sequence, int) and not isinstance(sequence, bool):
        stats.sequence = sequence
    if kind in _OUTPUT_DELTAS:
        stats.generated(event.get("delta") if kind == "response.output_text.delta" else None)
    elif kind == "response.created" and isinstance(event.get("response"), dict):
        _identity(event["response"], stats.facts)
        stats.opening = event["response"]
    elif kind in _ENDINGS and isinstance(event.get("response"), dict):
        answer = _responses_answer(event["response"], False)
        stats.facts.input_tokens, stats.facts.output_tokens = answer.input_tokens, answer.output_tokens
        stats.facts.finish_reasons = answer.finish_reasons or (str(kind).rpartition(".")[2],)
        stats.facts.response_id = answer.response_id or stats.facts.response_id
        stats.facts.response_model = answer.response_model or stats.facts.response_model


def _responses_failure(event: dict[str, Any], payload: bytes) -> GatewayError | None:
    kind = event.get("type")
    if kind == "error":
        return UpstreamError(f"upstream stream failed: {event.get('message') or 'error event'}", kind="server_error")
    if kind == "response.failed":
        error = (event.get("response") or {}).get("error") or {}
        message = error.get("message") if isinstance(error, dict) else None
        return UpstreamError(f"upstream response failed: {message or 'no reason given'}", kind="server_error")
    return None


def _responses_error_event(error: GatewayError, stats: StreamStats) -> bytes:
    """The spec's ending of a failed Responses stream (it has no ``[DONE]``): an ``error`` event numbered after the
    last event, then ``response.failed`` for the response the stream opened, so that clients end it as failed."""
    sequence = stats.sequence + 1
    events = encode(json.dumps({"type": "error", "sequence_number": sequence, **error.responses_error()}).encode(),
                    b"error")
    if stats.opening is not None:
        failed = {**stats.opening, "status": "failed", "error": error.response_failure()}
        events += encode(json.dumps({"type": "response.failed", "sequence_number": sequence + 1,
                                     "response": failed}).encode(), b"response.failed")
    return events


RESPONSES = Operation(
    name="responses", path="/v1/responses", gen_ai_name="chat", model_kind="llm",
    parse=lambda raw, config: parse_responses_request(raw),
    answer_list="output", input_field="input", read_answer=_responses_answer, read_event=_responses_event,
    stream_format=StreamFormat(failure=_responses_failure, error_event=_responses_error_event, closing=b""),
    asks_usage=False, span_attributes=(("inference.api", "responses"),), translation=RESPONSES_VIA_CHAT,
    output_limits=("max_output_tokens",), fills_output_limit=True,
    prefix=Prefix(system="instructions", turns="input", cache_key=True), continues_responses=True)


# -- Anthropic's Messages API --------------------------------------------------------------------------------------

def _anthropic_input(usage: Any) -> int | None:
    """The prompt's size: Anthropic counts the tokens read from or written to its cache apart from
    ``input_tokens``. No prompt is 0 tokens long: 0 is what a stream starts with when the count comes later, or
    never (a translated stream from an upstream that counts nothing), so it is no count."""
    counted = count(usage, "input_tokens")
    if counted is None:
        return None
    total = counted + (count(usage, "cache_read_input_tokens") or 0) + (count(usage, "cache_creation_input_tokens")
                                                                        or 0)
    return total or None


def _messages_answer(data: dict[str, Any], capture: bool) -> Facts:
    facts = _typed_facts(data)
    facts.input_tokens = _anthropic_input(data.get("usage"))
    if isinstance(data.get("stop_reason"), str):
        facts.finish_reasons = (data["stop_reason"],)
    if capture:
        facts.output = [block.get("text") for block in data.get("content") or ()
                        if isinstance(block, dict) and block.get("type") == "text"]
    return facts


_BLOCK_DELTAS = {"text_delta": "text", "thinking_delta": None, "input_json_delta": None}


def _messages_event(event: dict[str, Any], stats: StreamStats) -> None:
    kind = event.get("type")
    if kind == "content_block_delta":
        delta = event.get("delta") or {}
        if delta.get("type") in _BLOCK_DELTAS:
            key = _BLOCK_DELTAS[delta["type"]]
            stats.generated(delta.get(key) if key else None)
    elif kind == "message_start" and isinstance(event.get("message"), dict):
        message = event["message"]
        _identity(message, stats.facts)
        stats.facts.input_tokens = _anthropic_input(message.get("usage"))
    elif kind == "message_delta":  # its counts are totals so far, and may restate the prompt's
        reason = (event.get("delta") or {}).get("stop_reason")
        if isinstance(reason, str):
            stats.facts.finish_reasons = (reason,)
        usage = event.get("usage")
        output, prompt = count(usage, "output_tokens"), _anthropic_input(usage)
        if output is not None:
            stats.facts.output_tokens = output
        if prompt is not None:
            stats.facts.input_tokens = prompt


def _messages_failure(event: dict[str, Any], payload: bytes) -> GatewayError | None:
    if event.get("type") != "error":
        return None
    error = event.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return UpstreamError(f"upstream stream failed: {message or 'error event'}", kind="server_error")


def _messages_error_event(error: GatewayError, stats: StreamStats) -> bytes:
    """The Messages API's ``error`` event (its streams end with ``message_stop``, or with this)."""
    return encode(json.dumps(error.anthropic_body()).encode(), b"error")


MESSAGES = Operation(
    name="messages", path="/v1/messages", gen_ai_name="chat", model_kind="llm",
    parse=lambda raw, config: parse_messages_request(raw, config.server.max_messages),
    answer_list="content", input_field="messages", read_answer=_messages_answer, read_event=_messages_event,
    stream_format=StreamFormat(failure=_messages_failure, error_event=_messages_error_event, closing=b""),
    asks_usage=False, span_attributes=(("inference.api", "messages"),), error_style="anthropic",
    forward_headers=(b"anthropic-version", b"anthropic-beta"), translation=MESSAGES_VIA_CHAT,
    output_limits=("max_tokens",), prefix=Prefix(system="system", turns="messages", metadata_session=True))
