"""The Responses API served by an upstream that has only chat completions: the request, the answer, the stream.

The upstream keeps no state here, so a request that points at stored state (``previous_response_id``, a
``conversation``) is refused with a 400 that says to send the whole conversation; so are inputs that chat
completions cannot carry (file ids). Tools in a ``namespace`` are function tools under a name: they go upstream as
``namespace__name`` and come back as the API's calls with their ``namespace``. Hosted tools (``web_search``,
``file_search`` ...) that a chat upstream cannot run are dropped (the span names them), or refused with a 400 when
the operator says ``inference.translation.unsupported_tools: reject``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..errors import GatewayError, InvalidRequest
from . import chat
from .chat import Block, ChatResult, Event, new_id, string_field, unsupported_tool

NAMESPACE_JOIN = "__"  # a namespaced function's name upstream: ``{namespace}__{name}``

# Sampling fields the Responses API shares with chat (and the LM Studio / llama.cpp extensions the gateway checks).
_SHARED = ("temperature", "top_p", "user", "parallel_tool_calls", "top_k", "min_p", "repeat_penalty", "ttl",
           "draft_model", "seed", "presence_penalty", "frequency_penalty", "top_logprobs")
_NEEDS_STATE = {"previous_response_id": "previous_response_id", "conversation": "conversation",
                "background": "background: true"}


def unsupported(what: str, param: str) -> InvalidRequest:
    return chat.unsupported(what, param, "/v1/responses")


# -- the request ---------------------------------------------------------------------------------------------------

def chat_request(body: dict[str, Any], reject_unsupported: bool = False) -> dict[str, Any]:
    """The chat completion request that asks what ``body`` (a checked Responses API request) asks; hosted tools are
    left out (``reject_unsupported``: refused with a 400)."""
    for key, what in _NEEDS_STATE.items():
        if body.get(key):
            raise InvalidRequest(f"'{key}' needs an upstream that serves the Responses API and keeps its state; "
                                 f"this one serves only chat completions, so send the whole conversation in "
                                 f"'input' instead of {what}", param=key)
    chat: dict[str, Any] = {"model": body["model"], "messages": _messages(body)}
    chat.update((key, body[key]) for key in _SHARED if body.get(key) is not None)
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    chat.update(_chat_tools(body, reject_unsupported))
    response_format = _response_format((body.get("text") or {}).get("format"))
    if response_format is not None:
        chat["response_format"] = response_format
    effort = (body.get("reasoning") or {}).get("effort")
    if isinstance(effort, str):
        chat["reasoning_effort"] = effort
    return chat


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of the instructions and the input (a string, or a list of items)."""
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    given = body["input"]
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
        return messages
    for i, item in enumerate(given):
        _add_item(messages, item, f"input[{i}]")
    if not messages:
        raise InvalidRequest("'input' holds no message for the model to answer (reasoning items only)",
                             param="input")
    return messages


def _chat_tools(body: dict[str, Any], reject_unsupported: bool) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` as chat asks them (a choice among tools that were all left out is none)."""
    tools = [function for i, tool in enumerate(body.get("tools") or ())
             for function in _tools(tool, f"tools[{i}]", reject_unsupported)]
    asked: dict[str, Any] = {"tools": tools} if tools else {}
    if body.get("tool_choice") is not None:
        chosen = _tool_choice(body["tool_choice"])
        if tools or chosen in ("none", "auto"):
            asked["tool_choice"] = chosen
    return asked


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        messages.append(_message(item, where))
    elif kind in ("function_call", "custom_tool_call"):
        name = _flat_name(item.get("namespace"), string_field(item, "name", where))
        arguments = string_field(item, "arguments", where) if kind == "function_call" else \
            json.dumps({"input": string_field(item, "input", where)})
        call = {"id": string_field(item, "call_id", where), "type": "function",
                "function": {"name": name, "arguments": arguments}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":  # one assistant turn: its text and its calls
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        text = output if isinstance(output, str) else _joined_text(output, f"{where}.output")
        messages.append({"role": "tool", "tool_call_id": string_field(item, "call_id", where), "content": text})
    elif kind in _HOSTED_CALLS or kind == "reasoning":
        return  # a model's earlier reasoning, a hosted tool's earlier call: chat completions takes none back
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


# Output items of hosted tools, which a client may send back in its history (the model cannot have made them here).
_HOSTED_CALLS = ("web_search_call", "file_search_call", "code_interpreter_call", "computer_call",
                 "computer_call_output", "image_generation_call", "mcp_list_tools", "mcp_call", "tool_search_call",
                 "tool_search_output", "local_shell_call", "local_shell_call_output", "shell_call",
                 "shell_call_output", "apply_patch_call", "apply_patch_call_output", "compaction")
# A custom (free-form) tool takes one string: upstream it is a function whose one argument is that string.
_CUSTOM_PARAMETERS = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}


def _flat_name(namespace: Any, name: str) -> str:
    return f"{namespace}{NAMESPACE_JOIN}{name}" if isinstance(namespace, str) and namespace else name


def _tools(tool: Any, where: str, reject_unsupported: bool, namespace: str | None = None) -> list[dict[str, Any]]:
    """A tool as the chat functions that carry it: a function is one, a namespace one per function inside, a
    hosted tool none (or a 400)."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind == "namespace" and namespace is None:
        name = string_field(tool, "name", where)
        inner = tool.get("tools")
        if not isinstance(inner, list):
            raise InvalidRequest(f"'{where}.tools' must be a list of tools", param=f"{where}.tools")
        return [function for i, t in enumerate(inner)
                for function in _tools(t, f"{where}.tools[{i}]", reject_unsupported, name)]
    if kind in ("function", "custom"):
        function: dict[str, Any] = {"name": _flat_name(namespace, string_field(tool, "name", where))}
        function.update((key, tool[key]) for key in ("description", "parameters", "strict")
                        if tool.get(key) is not None)
        if kind == "custom":
            function["parameters"] = _CUSTOM_PARAMETERS
            function.pop("strict", None)
        return [{"type": "function", "function": function}]
    if reject_unsupported or not isinstance(kind, str):
        raise unsupported_tool(kind, f"{where}.type", "/v1/responses")
    return []


def dropped(body: dict[str, Any]) -> list[str]:
    """The hosted tools a translated request leaves out (for the span and the debug log)."""
    return [str(tool["type"]) for tool in body.get("tools") or ()
            if isinstance(tool, dict) and tool.get("type") not in ("function", "custom", "namespace")]


class ToolNames:
    """The request's tools by their chat name: which are in a namespace, which are custom (free-form) tools."""

    def __init__(self, body: dict[str, Any]) -> None:
        self._tools: dict[str, tuple[str | None, str, bool]] = {}  # chat name -> (namespace, name, custom)
        for tool in body.get("tools") or ():
            if not isinstance(tool, dict):
                continue
            if tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
                for inner in tool["tools"]:
                    self._add(tool.get("name"), inner)
            else:
                self._add(None, tool)

    def _add(self, namespace: Any, tool: Any) -> None:
        if isinstance(tool, dict) and isinstance(tool.get("name"), str):
            ns = namespace if isinstance(namespace, str) and namespace else None
            self._tools[_flat_name(ns, tool["name"])] = (ns, tool["name"], tool.get("type") == "custom")

    def call_item(self, block: Block, item_id: str, done: bool, status: str) -> dict[str, Any]:
        """A tool call block as the output item the client's tool is called by (a custom tool's call has no
        status)."""
        namespace, name, custom = self._tools.get(block.name, (None, block.name, False))
        if custom:
            item = {"id": item_id, "type": "custom_tool_call", "call_id": block.call_id, "name": name,
                    "input": custom_input(block.text) if done else ""}
        else:
            item = {"id": item_id, "type": "function_call", "call_id": block.call_id, "name": name,
                    "arguments": block.text if done else "", "status": status}
        if namespace is not None:
            item["namespace"] = namespace
        return item

    def is_custom(self, block: Block) -> bool:
        return self._tools.get(block.name, (None, "", False))[2]


def custom_input(arguments: str) -> str:
    """A custom tool's input from the arguments of the function that carried it (as they are, if not that)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value["input"] if isinstance(value, dict) and isinstance(value.get("input"), str) else arguments


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom") and isinstance(choice.get("name"),
                                                                                                str):
        return {"type": "function", "function": {"name": _flat_name(choice.get("namespace"), choice["name"])}}
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        mode = choice.get("mode")
        return mode if mode in ("auto", "required") else "auto"
    if isinstance(choice, dict):  # a hosted tool's choice (web_search ...): the model chooses among what is left
        return "auto"
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


def _item(block: Block, item_id: str, tools: ToolNames, done: bool = True, cut: bool = False) -> dict[str, Any]:
    """A block as an output item (not ``done``: as ``response.output_item.added`` shows it, with no content;
    ``cut``: the item the output limit or a failure ended)."""
    status = "incomplete" if cut else "completed" if done else "in_progress"
    if block.kind == "tool_call":
        return tools.call_item(block, item_id, done, status)
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


def _usage(result: ChatResult) -> dict[str, Any]:
    """The answer's token counts; an upstream that counts none (llama.cpp's Python server streams no usage) has
    its output counted as the gateway counts it, one token per delta, and its prompt as 0 (not guessed)."""
    usage = result.usage
    prompt, output, cached, reasoning = (usage.input, usage.output, usage.cached, usage.reasoning) if usage else \
        (0, result.deltas, 0, 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + output}


def _response(result: ChatResult, body: dict[str, Any], ids: _Ids, tools: ToolNames, status: str,
              error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``response`` object: what the request asked and, once it is no longer ``in_progress``, what the model
    answered (``completed``, ``incomplete`` at the output limit, or ``failed`` with ``error``)."""
    done = status != "in_progress"
    last = len(result.blocks) - 1
    text = body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}}
    return {
        "id": ids.response, "object": "response", "created_at": result.created or int(time.time()),
        "model": result.model or body["model"], "status": status,
        "output": [_item(b, ids.item(b, i), tools, cut=status != "completed" and i == last)
                   for i, b in enumerate(result.blocks)] if done else [],
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens" if result.finish_reason == "length"
                               else "content_filter"} if status == "incomplete" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
        "reasoning": body.get("reasoning"), "prompt_cache_key": body.get("prompt_cache_key"),
        "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [], "text": text,
        "truncation": "disabled", "user": body.get("user"), "metadata": body.get("metadata") or {},
        "usage": _usage(result) if done else None,
    }


def _status(result: ChatResult) -> str:
    return "incomplete" if result.finish_reason in ("length", "content_filter") else "completed"


def answer(result: ChatResult, body: dict[str, Any]) -> dict[str, Any]:
    """The Responses API's answer to ``body`` from a whole chat answer."""
    return _response(result, body, _Ids(), ToolNames(body), _status(result))


# -- the stream ----------------------------------------------------------------------------------------------------

_DELTA = {"text": "response.output_text", "refusal": "response.refusal", "reasoning": "response.reasoning_text",
          "tool_call": "response.function_call_arguments"}


class ResponseEvents:
    """The Responses API's stream events, in OpenAI's order, each numbered (``sequence_number``)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = body
        self._ids = _Ids()
        self._tools = ToolNames(body)
        self._sequence = 0
        self._open: tuple[Block, int] | None = None  # the block being written, to close if the stream fails

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
        response = _response(result, self._body, self._ids, self._tools, "in_progress")
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def opened(self, block: Block, index: int) -> list[Event]:
        self._open = (block, index)
        events = [self._event("response.output_item.added", output_index=index,
                              item=_item(block, self._ids.item(block, index), self._tools, done=False))]
        if block.kind != "tool_call":
            events.append(self._event("response.content_part.added", **self._where(block, index),
                                      part=_part(block, "")))
        return events

    def grew(self, block: Block, index: int, delta: str) -> list[Event]:
        if block.kind == "tool_call" and self._tools.is_custom(block):
            return []  # a custom tool's input is its arguments' one string: said whole when the call is done
        extra: dict[str, Any] = {"logprobs": []} if block.kind == "text" else {}
        return [self._event(f"{_DELTA[block.kind]}.delta", **self._where(block, index), delta=delta, **extra)]

    def closed(self, block: Block, index: int, cut: bool = False) -> list[Event]:
        self._open = None
        where = self._where(block, index)
        item = _item(block, self._ids.item(block, index), self._tools, cut=cut)
        if block.kind == "tool_call" and self._tools.is_custom(block):
            done = [self._event("response.custom_tool_call_input.delta", **where, delta=item["input"]),
                    self._event("response.custom_tool_call_input.done", **where, input=item["input"])]
        elif block.kind == "tool_call":
            done = [self._event("response.function_call_arguments.done", **where, arguments=block.text)]
        else:
            key = "refusal" if block.kind == "refusal" else "text"
            extra: dict[str, Any] = {"logprobs": []} if block.kind == "text" else {}
            done = [self._event(f"{_DELTA[block.kind]}.done", **where, **{key: block.text}, **extra),
                    self._event("response.content_part.done", **where, part=_part(block))]
        return done + [self._event("response.output_item.done", output_index=index, item=item)]

    def finished(self, result: ChatResult) -> list[Event]:
        status = _status(result)
        response = _response(result, self._body, self._ids, self._tools, status)
        return [self._event(f"response.{status}", response=response)]

    def failed(self, error: GatewayError, result: ChatResult) -> list[Event]:
        """The spec's ending of a failed stream: an ``error`` event, the open item closed as cut short, and
        ``response.failed`` with what was generated, so that a client's accumulator keeps it."""
        events = [self._event("error", **error.responses_error())]
        if self._open is not None:
            events += self.closed(*self._open, cut=True)
        if result.id or result.blocks or self._sequence > 1:  # the response was created: it failed
            events.append(self._event("response.failed",
                                      response=_response(result, self._body, self._ids, self._tools, "failed",
                                                         error.response_failure())))
        return events
