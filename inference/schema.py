"""Validate a chat completion request, keep what providers understand, and apply the configured defaults.

Only the fields whose meaning we know are checked; anything else (LM Studio and llama.cpp extensions, tools,
future OpenAI fields) passes through untouched, because a gateway that drops a field silently changes a
generation without telling anyone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .config import DefaultsConfig
from .errors import InvalidJSON, InvalidRequest

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass
class ParsedRequest:
    """A validated request: the model the client asked for (``None``: the default), whether it streams, and the
    body to send upstream."""

    model: str | None
    stream: bool
    body: dict[str, Any]


Check = Callable[[str, Any], Any]  # returns the value to send on (an integer given as 3.0 becomes 3)


def _number(low: float | None = None, high: float | None = None, *, above: bool = False,
            integer: bool = False) -> Check:
    kind = "an integer" if integer else "a number"

    def check(name: str, value: Any) -> Any:
        if integer and isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has one number type: 3.0 is the integer 3 (as JSON Schema says)
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise InvalidRequest(f"'{name}' must be {kind}, got {_show(value)}", param=name)
        if integer and value not in _INT64:
            raise InvalidRequest(f"'{name}' is an integer beyond 64 bits, which no model server reads", param=name)
        if value != value or (low is not None and (value <= low if above else value < low)) or (
                high is not None and value > high):
            if low is not None and high is not None:
                allowed = f"between {low:g} and {high:g}"
            else:
                allowed = f"{'>' if above else '>='} {low:g}"
            raise InvalidRequest(f"'{name}' must be {kind} {allowed}, got {_show(value)}", param=name)
        return value

    return check


def _of_type(kind: type | tuple[type, ...], label: str) -> Check:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise InvalidRequest(f"'{name}' must be {label}, got {_show(value)}", param=name)
        return value

    return check


def _stop(name: str, value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) for s in value):
        return value
    raise InvalidRequest(f"'{name}' must be a string or a list of at most 4 strings", param=name)


def _one_of(*choices: int) -> Check:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in choices:
            allowed = ", ".join(str(c) for c in choices)
            raise InvalidRequest(f"'{name}' must be one of {allowed}, got {_show(value)}", param=name)
        return value

    return check


def _enum(name: str, value: Any, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise InvalidRequest(f"'{name}' must be one of {', '.join(choices)}, got {_show(value)}", param=name)
    return value


def _response_format(name: str, value: Any) -> Any:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidRequest(f"'{name}' must be an object with a 'type' "
                             "(text, json_object or json_schema)", param=name)
    return value


# Checked when present (and not null); every other field is passed through as it is.
CHECKS: dict[str, Check] = {
    "model": _of_type(str, "a string"),
    "stream": _of_type(bool, "true or false"),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "max_tokens": _number(1, integer=True),
    "max_completion_tokens": _number(1, integer=True),
    "n": _number(1, integer=True),
    "seed": _number(integer=True),
    "stop": _stop,
    "stream_options": _of_type(dict, "an object"),
    "response_format": _response_format,
    "tools": _of_type(list, "a list"),
    "logit_bias": _of_type(dict, "an object"),
    "user": _of_type(str, "a string"),
    "logprobs": _of_type(bool, "true or false"),
    "top_logprobs": _number(0, 20, integer=True),
    # LM Studio / llama.cpp extensions with known ranges
    "top_k": _number(-1, integer=True),
    "min_p": _number(0, 1),
    "repeat_penalty": _number(0, above=True),
    "mirostat_mode": _one_of(0, 1, 2),
    "mirostat_tau": _number(0),
    "mirostat_eta": _number(0),
    "cache_prompt": _of_type(bool, "true or false"),
    "ttl": _number(1, integer=True),
    "draft_model": _of_type(str, "a string"),
}

# /v1/embeddings: the encoding is relayed as the upstream sends it, the dimensions passed through.
EMBEDDING_CHECKS: dict[str, Check] = {
    "model": _of_type(str, "a string"),
    "encoding_format": lambda name, value: _enum(name, value, ("float", "base64")),
    "dimensions": _number(1, integer=True),
    "user": _of_type(str, "a string"),
}

# /v1/responses: the parameters the Responses API shares with chat, and its own.
RESPONSES_CHECKS: dict[str, Check] = {
    **{key: CHECKS[key] for key in ("model", "stream", "temperature", "top_p", "tools", "user", "top_k", "min_p",
                                    "repeat_penalty", "ttl", "draft_model")},
    "instructions": _of_type(str, "a string"),
    "max_output_tokens": _number(1, integer=True),
    "reasoning": _of_type(dict, "an object"),
    "previous_response_id": _of_type(str, "a string"),
    "store": _of_type(bool, "true or false"),
    "metadata": _of_type(dict, "an object"),
    "text": _of_type(dict, "an object"),
    "parallel_tool_calls": _of_type(bool, "true or false"),
    "tool_choice": _of_type((str, dict), "a string or an object"),
}

# /v1/messages: Anthropic's parameters (temperature is 0-1 there).
MESSAGES_CHECKS: dict[str, Check] = {
    "model": _of_type(str, "a string"),
    "stream": _of_type(bool, "true or false"),
    "max_tokens": _number(1, integer=True),
    "system": _of_type((str, list), "a string or a list of text blocks"),
    "temperature": _number(0, 1),
    "top_p": _number(0, 1),
    "top_k": _number(0, integer=True),
    "stop_sequences": _of_type(list, "a list of strings"),
    "tools": _of_type(list, "a list"),
    "tool_choice": _of_type(dict, "an object"),
    "metadata": _of_type(dict, "an object"),
    "thinking": _of_type(dict, "an object"),
}

# /v1/completions: the same sampling parameters, its own few, and ``logprobs`` as a count (0-5), not a switch.
COMPLETION_CHECKS: dict[str, Check] = {
    **{key: check for key, check in CHECKS.items() if key not in ("logprobs", "top_logprobs", "tools")},
    "suffix": _of_type(str, "a string"),
    "echo": _of_type(bool, "true or false"),
    "logprobs": _number(0, 5, integer=True),
    "best_of": _number(1, integer=True),
}


_LONG_NUMBER = re.compile(rb"\d{19}")


def _load(raw: bytes) -> Any:
    """The body's JSON: read by orjson (five times faster) when it gives the standard library's answer, else by
    the standard library, which keeps integers beyond 64 bits exact (orjson makes them floats) and words the error
    a client sees. orjson accepts nothing the standard library refuses, so every doubt goes to the latter."""
    if not _LONG_NUMBER.search(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    value = json.loads(raw, parse_constant=_not_json)
    _no_lone_surrogate(value)  # orjson refuses them; the standard library reads them, and no UTF-8 encodes them
    return value


_INT64 = range(-(2 ** 63), 2 ** 63)  # the integers a checked field may hold: no model server reads a larger one


def _no_lone_surrogate(value: Any) -> None:
    """Refuse a lone surrogate (``"\\ud800"``) anywhere in the body: it is not text, and the upstream request could
    not be written (a 500 before this check)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _no_lone_surrogate(key)
            _no_lone_surrogate(item)
    elif isinstance(value, list):
        for item in value:
            _no_lone_surrogate(item)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidJSON("request body is not valid JSON: a string holds a lone surrogate (\\ud800-\\udfff), "
                              "which is not text") from None


def parse_chat_request(raw: bytes, defaults: DefaultsConfig, max_messages: int = 0) -> ParsedRequest:
    """Parse and validate a ``POST /v1/chat/completions`` body; raise :class:`InvalidRequest` on bad input.

    ``max_messages`` (0: any number) bounds the conversation a single request may carry.
    """
    body = parse_object(raw)
    _check_messages(body.get("messages"), max_messages)
    choice = body.get("tool_choice")
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        tools = [tool.get("function") for tool in body.get("tools") or () if isinstance(tool, dict)]
        _check_offered(function["name"], [tool.get("name") for tool in tools if isinstance(tool, dict)],
                       "tool_choice.function.name")
    return _generation(body, CHECKS, defaults)


def parse_completion_request(raw: bytes, defaults: DefaultsConfig) -> ParsedRequest:
    """Parse and validate a ``POST /v1/completions`` body (a ``prompt`` instead of ``messages``)."""
    body = parse_object(raw)
    body["prompt"] = _check_prompt(body.get("prompt"))
    return _generation(body, COMPLETION_CHECKS, defaults)


def parse_embeddings_request(raw: bytes, max_inputs: int, max_size: int,
                             max_dimensions: int = 8192) -> ParsedRequest:
    """Parse and validate a ``POST /v1/embeddings`` body; ``input`` is bounded in count and in total size, and
    ``dimensions`` too (the answer's size is inputs x dimensions: a billion dimensions once took 14 GB)."""
    body = parse_object(raw)
    body["input"] = _check_input(body.get("input"), max_inputs, max_size)
    model = check_fields(body, EMBEDDING_CHECKS)
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions > max_dimensions:
        raise InvalidRequest(f"'dimensions' is {dimensions}; the gateway accepts at most {max_dimensions} "
                             "(server.max_embedding_dimensions)", param="dimensions")
    return ParsedRequest(model=model, stream=False, body=body)


def parse_responses_request(raw: bytes) -> ParsedRequest:
    """Parse and validate a ``POST /v1/responses`` body (OpenAI's Responses API; the upstream keeps the state
    ``previous_response_id`` names)."""
    body = parse_object(raw)
    given = body.get("input")
    if given is None:
        raise InvalidRequest("'input' is required", param="input")
    if not (isinstance(given, str) or (isinstance(given, list) and given and all(isinstance(i, dict) for i in given))):
        raise InvalidRequest("'input' must be a string or a non-empty list of input items (objects)", param="input")
    model = check_fields(body, RESPONSES_CHECKS)
    _check_responses_tools(body)
    return ParsedRequest(model=model, stream=bool(body.get("stream")), body=body)


def _responses_functions(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """The Responses API's tools where each is named in an error (``tools[i]``, or ``tools[i].tools[j]`` inside a
    namespace), functions of namespaces included."""
    found: list[tuple[str, Any]] = []
    for i, tool in enumerate(body.get("tools") or ()):
        inner = tool.get("tools") if isinstance(tool, dict) and tool.get("type") == "namespace" else None
        if isinstance(inner, list):
            found += [(f"tools[{i}].tools[{j}]", function) for j, function in enumerate(inner)]
        else:
            found.append((f"tools[{i}]", tool))
    return found


def _check_responses_tools(body: dict[str, Any]) -> None:
    """A function's ``parameters`` must be a JSON Schema object, and a named ``tool_choice`` an offered tool."""
    functions = _responses_functions(body)
    for where, function in functions:
        if isinstance(function, dict) and function.get("type") == "function" and \
                function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise InvalidRequest(f"'{where}.parameters' must be a JSON Schema object", param=f"{where}.parameters")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom") and \
            isinstance(choice.get("name"), str):
        tops = [tool.get("name") for tool in body.get("tools") or () if isinstance(tool, dict)]
        inner = [function.get("name") for where, function in functions if ".tools[" in where
                 and isinstance(function, dict)]
        _check_offered(choice["name"], inner + tops, "tool_choice.name")


def _check_offered(name: str, offered: list[Any], param: str) -> None:
    """A ``tool_choice`` must name a tool the request offers: the model cannot be made to call another."""
    if name not in offered:
        names = ", ".join(repr(n) for n in offered if isinstance(n, str)) or "none"
        raise InvalidRequest(f"'{param}' is {name!r}, a tool that 'tools' does not offer (offered: {names})",
                             param=param)


def parse_messages_request(raw: bytes, max_messages: int = 0) -> ParsedRequest:
    """Parse and validate a ``POST /v1/messages`` body (Anthropic's Messages API: ``max_tokens`` is required).

    A ``system`` message may stand anywhere in ``messages``: Claude Code sends them mid-conversation (the beta
    ``mid-conversation-system``)."""
    body = parse_object(raw)
    messages = _message_list(body.get("messages"), max_messages)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
            raise InvalidRequest(f"'messages[{i}]' must be an object whose role is user, assistant or system",
                                 param=f"messages[{i}]")
        if not isinstance(message.get("content"), (str, list)) or message["content"] == []:
            raise InvalidRequest(f"'messages[{i}].content' must be a string or a non-empty list of content blocks",
                                 param=f"messages[{i}].content")
    if all(message["role"] == "system" for message in messages):
        raise InvalidRequest("'messages' must hold a user or assistant message, not system messages alone",
                             param="messages")
    if body.get("max_tokens") is None:
        raise InvalidRequest("'max_tokens' is required", param="max_tokens")
    model = check_fields(body, MESSAGES_CHECKS)
    _check_anthropic_tools(body)
    return ParsedRequest(model=model, stream=bool(body.get("stream")), body=body)


def _check_anthropic_tools(body: dict[str, Any]) -> None:
    """What Anthropic's API refuses about tools and thinking: an ``input_schema`` that is not an object, a
    ``tool_choice`` whose name is not a string or not an offered tool's, a thinking budget below 1024 tokens."""
    for i, tool in enumerate(body.get("tools") or ()):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"'tools[{i}]' must be an object", param=f"tools[{i}]")
        if "input_schema" in tool and not isinstance(tool["input_schema"], dict):
            raise InvalidRequest(f"'tools[{i}].input_schema' must be a JSON Schema object",
                                 param=f"tools[{i}].input_schema")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool":
        if not isinstance(choice.get("name"), str):
            raise InvalidRequest("'tool_choice.name' must be a string", param="tool_choice.name")
        _check_offered(choice["name"], [tool.get("name") for tool in body.get("tools") or ()], "tool_choice.name")
    thinking = body.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if budget is not None:
        _number(1024, integer=True)("thinking.budget_tokens", budget)


def parse_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, with the keys of a nested ``extensions`` object merged into it."""
    try:
        body = _load(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidJSON(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidJSON("request body is nested too deeply to be a valid request") from None
    if not isinstance(body, dict):
        raise InvalidJSON("request body must be a JSON object")
    extensions = body.pop("extensions", None)
    if extensions is not None:
        if not isinstance(extensions, dict):
            raise InvalidRequest("'extensions' must be an object", param="extensions")
        for key, value in extensions.items():
            if not key:
                raise InvalidRequest("'extensions' keys must be parameter names, not empty", param="extensions")
            if key in body and body[key] != value:  # the same value twice says the same thing
                raise InvalidRequest(f"'{key}' is given both at the top level and in 'extensions', differently",
                                     param=f"extensions.{key}")
            body[key] = value
    return body


def check_fields(body: dict[str, Any], checks: dict[str, Check]) -> str | None:
    """Check the fields ``checks`` knows (others pass through untouched); the model asked for, if any."""
    for key, value in body.items():
        check = checks.get(key)
        if check is not None and value is not None:
            body[key] = check(key, value)
    model: str | None = body.get("model")
    if model is not None and not model.strip():
        raise InvalidRequest("'model' must not be empty", param="model")
    return model


def _generation(body: dict[str, Any], checks: dict[str, Check], defaults: DefaultsConfig) -> ParsedRequest:
    """Check a request that generates text and add the configured defaults the client left out."""
    model = check_fields(body, checks)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = defaults.max_tokens
    if body.get("temperature") is None:
        body["temperature"] = defaults.temperature
    return ParsedRequest(model=model, stream=bool(body.get("stream")), body=body)


def _not_json(constant: str) -> Any:
    """Python's json module reads NaN and Infinity; JSON (and every upstream) does not."""
    raise ValueError(f"{constant} is not a JSON value")


def _check_prompt(prompt: Any) -> Any:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids (OpenAI's four forms);
    a token id written ``3.0`` is the integer 3, as for every other integer."""
    if prompt is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(_is_token(p) for p in prompt):
            return [int(p) for p in prompt]
        if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in prompt):
            return [[int(t) for t in p] for p in prompt]
    raise InvalidRequest("'prompt' must be a string, a non-empty list of strings, a list of token ids or a list of "
                         "lists of token ids", param="prompt")


def _check_input(value: Any, max_inputs: int, max_size: int) -> Any:
    """An embeddings ``input``: the prompt forms of a completion, no empty text, within the configured bounds."""
    if value is None:
        raise InvalidRequest("'input' is required", param="input")
    try:
        value = _check_prompt(value)
    except InvalidRequest:
        raise InvalidRequest("'input' must be a string, a non-empty list of strings, a list of token ids or a list "
                             "of lists of token ids", param="input") from None
    items = [value] if isinstance(value, str) else value
    if any(item == "" for item in items):
        raise InvalidRequest("'input' must not hold an empty string", param="input")
    nested = isinstance(items[0], list)
    if (nested or isinstance(items[0], str)) and len(items) > max_inputs:
        raise InvalidRequest(f"'input' holds {len(items)} inputs; the gateway accepts at most {max_inputs} per "
                             "request (server.max_embedding_inputs)", param="input")
    size = sum(len(item) for item in items) if (nested or isinstance(items[0], str)) else len(items)
    if size > max_size:
        raise InvalidRequest(f"'input' holds {size} characters and token ids; the gateway accepts at most "
                             f"{max_size} per request (server.max_embedding_size)", param="input")
    return value


def _is_token(value: Any) -> bool:
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return whole and not isinstance(value, bool) and value >= 0


def _message_list(messages: Any, limit: int) -> list[Any]:
    """A conversation: a non-empty list of at most ``limit`` (0: any number) messages, each checked by the caller."""
    if messages is None:
        raise InvalidRequest("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of messages", param="messages")
    if limit and len(messages) > limit:
        raise InvalidRequest(f"'messages' holds {len(messages)} messages; the gateway accepts at most {limit} "
                             "(server.max_messages)", param="messages")
    return messages


def _check_messages(messages: Any, limit: int) -> None:
    for i, message in enumerate(_message_list(messages, limit)):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"'{where}.role' must be one of {', '.join(ROLES)}, got {_show(role)}",
                                 param=f"{where}.role")
        content = message.get("content")
        if content is None:
            if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
                continue
            raise InvalidRequest(f"'{where}.content' is required", param=f"{where}.content")
        if not isinstance(content, (str, list)):
            raise InvalidRequest(f"'{where}.content' must be a string or a list of content parts",
                                 param=f"{where}.content")


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        return "a deeply nested value"
    return text if len(text) <= 40 else text[:37] + "..."
