"""The Responses API served by an upstream that has only chat completions: the request, the answer, the stream.

The upstream keeps no state here, so a request that points at stored state (``previous_response_id``, a
``conversation``) is refused with a 400 that says to send the whole conversation; so are tools and inputs that
chat completions cannot carry (hosted tools, file ids).
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import InvalidRequest
from . import chat
from .chat import Block, ChatResult, Event, new_id, string_field

# Sampling fields the Responses API shares with chat (and the LM Studio / llama.cpp extensions the gateway checks).
_SHARED = ("temperature", "top_p", "user", "parallel_tool_calls", "top_k", "min_p", "repeat_penalty", "ttl",
           "draft_model", "seed", "presence_penalty", "frequency_penalty", "top_logprobs")
_NEEDS_STATE = {"previous_response_id": "previous_response_id", "conversation": "conversation",
                "background": "background: true"}


def unsupported(what: str, param: str) -> InvalidRequest:
    return chat.unsupported(what, param, "/v1/responses")


# -- the request ---------------------------------------------------------------------------------------------------

def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completion request that asks what ``body`` (a checked Responses API request) asks."""
    for key, what in _NEEDS_STATE.items():
        if body.get(key):
            raise InvalidRequest(f"'{key}' needs an upstream that serves the Responses API and keeps its state; "
                                 f"this one serves only chat completions, so send the whole conversation in "
                                 f"'input' instead of {what}", param=key)
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    given = body["input"]
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    else:
        for i, item in enumerate(given):
            _add_item(messages, item, f"input[{i}]")
        if not messages:
            raise InvalidRequest("'input' holds no message for the model to answer (reasoning items only)",
                                 param="input")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    chat.update((key, body[key]) for key in _SHARED if body.get(key) is not None)
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(body["tools"])]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    response_format = _response_format((body.get("text") or {}).get("format"))
    if response_format is not None:
        chat["response_format"] = response_format
    effort = (body.get("reasoning") or {}).get("effort")
    if isinstance(effort, str):
        chat["reasoning_effort"] = effort
    return chat


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        messages.append(_message(item, where))
    elif kind == "function_call":
        function = {"name": string_field(item, "name", where), "arguments": string_field(item, "arguments", where)}
        call = {"id": string_field(item, "call_id", where), "type": "function", "function": function}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":  # one assistant turn: its text and its calls
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _joined_text(output, f"{where}.output")
        messages.append({"role": "tool", "tool_call_id": string_field(item, "call_id", where), "content": text})
    elif kind == "reasoning":
        return  # a model's earlier reasoning: chat completions takes none back
    else:
        raise unsupported(f"An input item of type {kind!r}", f"{where}.type")


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise InvalidRequest(f"'{where}.role' must be user, assistant, system or developer", param=f"{where}.role")
    content = item.get("content")
    chat_role = "system" if role == "developer" else role  # local chat templates know system, not developer
    if isinstance(content, str):
        return {"role": chat_role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}.content' must be a string or a list of content parts",
                             param=f"{where}.content")
    if chat_role != "user":
        return {"role": chat_role, "content": _joined_text(content, f"{where}.content")}
    return {"role": "user", "content": [_user_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]}


def _user_part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "input_image":
        if not isinstance(part.get("image_url"), str):
            raise unsupported("An image given by 'file_id' (not 'image_url')", where)
        image = {"url": part["image_url"]}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind is None:
        raise InvalidRequest(f"'{where}' must be a content part object with a 'type'", param=where)
    raise unsupported(f"A content part of type {kind!r}", where)


def _joined_text(parts: Any, where: str) -> str:
    """The text of content parts where chat takes a string (an assistant's or a system message, a tool's output)."""
    if not isinstance(parts, list):
        raise InvalidRequest(f"'{where}' must be a string or a list of content parts", param=where)
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise unsupported(f"A content part of type {kind!r} here", f"{where}[{i}]")
    return "".join(texts)


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise unsupported(f"A tool of type {kind!r} (only function tools are)", f"{where}.type")
    function = {"name": string_field(tool, "name", where)}
    function.update((key, tool[key]) for key in ("description", "parameters", "strict") if tool.get(key) is not None)
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise unsupported(f"A tool_choice of {choice!r}", "tool_choice")


def _response_format(given: Any) -> dict[str, Any] | None:
    if given is None:
        return None
    if not isinstance(given, dict) or not isinstance(given.get("type"), str):
        raise InvalidRequest("'text.format' must be an object with a 'type' (text, json_object or json_schema)",
                             param="text.format")
    if given["type"] == "text":
        return None
    if given["type"] == "json_object":
        return {"type": "json_object"}
    if given["type"] == "json_schema":
        schema = {"name": given.get("name") or "response", "schema": given.get("schema") or {}}
        schema.update((key, given[key]) for key in ("strict", "description") if given.get(key) is not None)
        return {"type": "json_schema", "json_schema": schema}
    raise unsupported(f"A text format of type {given['type']!r}", "text.format")


# -- the answer ----------------------------------------------------------------------------------------------------

class _Ids:
    """The response's id and its items' ids (derived from it: the same in the stream's events and at its end)."""

    def __init__(self) -> None:
        self.response = new_id("resp_")
        self._suffix = self.response.removeprefix("resp_")

    def item(self, block: Block, index: int) -> str:
        prefix = {"reasoning": "rs", "tool_call": "fc"}.get(block.kind, "msg")
        return f"{prefix}_{self._suffix}_{index}"


def _item(block: Block, item_id: str, done: bool = True) -> dict[str, Any]:
    """A block as an output item (not ``done``: as ``response.output_item.added`` shows it, with no content)."""
    status = "completed" if done else "in_progress"
    if block.kind == "tool_call":
        return {"id": item_id, "type": "function_call", "call_id": block.call_id, "name": block.name,
                "arguments": block.text if done else "", "status": status}
    if block.kind == "reasoning":
        return {"id": item_id, "type": "reasoning", "summary": [],
                "content": [_part(block)] if done else [], "status": status}
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [_part(block)] if done else []}


def _part(block: Block, text: str | None = None) -> dict[str, Any]:
    text = block.text if text is None else text
    if block.kind == "refusal":
        return {"type": "refusal", "refusal": text}
    if block.kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _response(result: ChatResult, body: dict[str, Any], ids: _Ids, done: bool) -> dict[str, Any]:
    """The ``response`` object: what the request asked, and (``done``) what the model answered."""
    incomplete = done and result.finish_reason in ("length", "content_filter")
    usage = result.usage
    text = body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}}
    return {
        "id": ids.response, "object": "response", "created_at": result.created or int(time.time()),
        "model": result.model or body["model"],
        "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
        "output": [_item(b, ids.item(b, i)) for i, b in enumerate(result.blocks)] if done else [],
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens" if result.finish_reason == "length"
                               else "content_filter"} if incomplete else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
        "reasoning": body.get("reasoning"), "store": False,
        "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [], "text": text,
        "truncation": "disabled", "user": body.get("user"), "metadata": body.get("metadata") or {},
        "usage": {"input_tokens": usage.input, "input_tokens_details": {"cached_tokens": usage.cached},
                  "output_tokens": usage.output, "output_tokens_details": {"reasoning_tokens": usage.reasoning},
                  "total_tokens": usage.input + usage.output} if done and usage is not None else None,
    }


def answer(result: ChatResult, body: dict[str, Any]) -> dict[str, Any]:
    """The Responses API's answer to ``body`` from a whole chat answer."""
    return _response(result, body, _Ids(), done=True)


# -- the stream ----------------------------------------------------------------------------------------------------

_DELTA = {"text": "response.output_text", "refusal": "response.refusal", "reasoning": "response.reasoning_text",
          "tool_call": "response.function_call_arguments"}


class ResponseEvents:
    """The Responses API's stream events, in OpenAI's order, each numbered (``sequence_number``)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = body
        self._ids = _Ids()
        self._sequence = 0

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event, kind

    def _where(self, block: Block, index: int) -> dict[str, Any]:
        where: dict[str, Any] = {"item_id": self._ids.item(block, index), "output_index": index}
        if block.kind != "tool_call":
            where["content_index"] = 0
        return where

    def started(self, result: ChatResult) -> list[Event]:
        response = _response(result, self._body, self._ids, done=False)
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def opened(self, block: Block, index: int) -> list[Event]:
        events = [self._event("response.output_item.added", output_index=index,
                              item=_item(block, self._ids.item(block, index), done=False))]
        if block.kind != "tool_call":
            events.append(self._event("response.content_part.added", **self._where(block, index),
                                      part=_part(block, "")))
        return events

    def grew(self, block: Block, index: int, delta: str) -> list[Event]:
        extra: dict[str, Any] = {"logprobs": []} if block.kind == "text" else {}
        return [self._event(f"{_DELTA[block.kind]}.delta", **self._where(block, index), delta=delta, **extra)]

    def closed(self, block: Block, index: int) -> list[Event]:
        where = self._where(block, index)
        if block.kind == "tool_call":
            done = [self._event("response.function_call_arguments.done", **where, name=block.name,
                                arguments=block.text)]
        else:
            key = "refusal" if block.kind == "refusal" else "text"
            extra: dict[str, Any] = {"logprobs": []} if block.kind == "text" else {}
            done = [self._event(f"{_DELTA[block.kind]}.done", **where, **{key: block.text}, **extra),
                    self._event("response.content_part.done", **where, part=_part(block))]
        return done + [self._event("response.output_item.done", output_index=index,
                                   item=_item(block, self._ids.item(block, index)))]

    def finished(self, result: ChatResult) -> list[Event]:
        response = _response(result, self._body, self._ids, done=True)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return [self._event(kind, response=response)]

    def failed(self, message: str) -> Event:
        return self._event("error", code="server_error", message=message, param=None)
