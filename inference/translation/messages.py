"""Anthropic's Messages API served by an upstream that has only chat completions: the request, the answer, the
stream. Tool results become ``tool`` messages, images become image parts, a system message inside ``messages``
(Claude Code sends them) keeps its place, and the answer's blocks, ids and stop reason are Anthropic's.

What chat completions has no words for is left out, and named for the span (:func:`dropped`): extended thinking,
context management, output effort, cache hints, and server tools (web search, code execution), which are refused
with a 400 instead under ``inference.translation.unsupported_tools: reject``. Documents are refused with a 400.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from ..errors import GatewayError, InvalidRequest
from . import chat
from .chat import Block, ChatResult, Event, new_id, string_field, unsupported_tool

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                 "content_filter": "refusal"}
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
# Request fields that shape what Anthropic's servers do and that chat completions has no words for.
_DROPPED_FIELDS = ("thinking", "context_management", "output_config", "container", "mcp_servers", "service_tier")


def unsupported(what: str, param: str) -> InvalidRequest:
    return chat.unsupported(what, param, "/v1/messages")


# -- the request ---------------------------------------------------------------------------------------------------

def dropped(body: dict[str, Any]) -> list[str]:
    """What a translated request leaves out: the fields above and the server tools (by type)."""
    return [key for key in _DROPPED_FIELDS if body.get(key) is not None] + \
        [str(tool.get("type")) for tool in body.get("tools") or () if isinstance(tool, dict) and not _is_client(tool)]


def chat_request(body: dict[str, Any], reject_unsupported: bool = False) -> dict[str, Any]:
    """The chat completion request that asks what ``body`` (a checked Messages API request) asks; server tools are
    left out (``reject_unsupported``: refused with a 400)."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": system if isinstance(system, str) else
                         _text_of(system, "system")})
    for i, message in enumerate(body["messages"]):
        messages += _turn(message, f"messages[{i}]")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages, "max_tokens": body["max_tokens"]}
    chat.update((key, body[key]) for key in ("temperature", "top_p", "top_k") if body.get(key) is not None)
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    tools = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(body.get("tools") or ())
             if _is_client(tool) or reject_unsupported]
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None:
        chosen = _tool_choice(choice)
        if tools or chosen in ("auto", "none"):  # (a choice among tools that were all left out is none)
            chat["tool_choice"] = chosen
        if tools and choice.get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str):
        chat["user"] = user
    return chat


def _is_client(tool: Any) -> bool:
    """A tool the client runs (a name and an input schema), not one of Anthropic's server tools."""
    return isinstance(tool, dict) and tool.get("type") in (None, "custom") and "input_schema" in tool


def _turn(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: a user turn's tool results come first, as ``tool`` messages (with
    the images a tool returned in a user turn after them: a tool message carries text only)."""
    role, content = message["role"], message["content"]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if role == "system":
        return [{"role": "system", "content": _text_of(content, f"{where}.content")}]
    if role == "assistant":
        return [_assistant(content, where)]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = _kind(block, at)
        if kind == "tool_result":
            text, images = _tool_result(block, at)
            results.append({"role": "tool", "tool_call_id": string_field(block, "tool_use_id", at), "content": text})
            parts += images
        elif kind == "text":
            parts.append({"type": "text", "text": string_field(block, "text", at)})
        elif kind == "image":
            parts.append(_image_part(block, at))
        else:
            raise unsupported(f"A content block of type {kind!r}", at)
    return results + ([{"role": "user", "content": parts}] if parts else [])


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": _image_url(block.get("source"), where)}}


def _assistant(content: list[Any], where: str) -> dict[str, Any]:
    texts, calls = [], []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = _kind(block, at)
        if kind == "text":
            texts.append(string_field(block, "text", at))
        elif kind == "tool_use":
            arguments = block.get("input")
            calls.append({"id": string_field(block, "id", at), "type": "function",
                          "function": {"name": string_field(block, "name", at),
                                       "arguments": json.dumps(arguments if arguments is not None else {})}})
        elif kind not in ("thinking", "redacted_thinking"):  # earlier reasoning: chat completions takes none back
            raise unsupported(f"A content block of type {kind!r}", at)
    # A turn of tool calls alone says "": local servers (llama.cpp's Python server) refuse null content.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_result(block: dict[str, Any], where: str) -> tuple[str, list[dict[str, Any]]]:
    """A tool's result as text, and the images it returned (as image parts)."""
    content = block.get("content")
    images: list[dict[str, Any]] = []
    if isinstance(content, list):
        at = f"{where}.content"
        images = [_image_part(b, f"{at}[{i}]") for i, b in enumerate(content) if _kind(b, f"{at}[{i}]") == "image"]
        content = [b for b in content if b.get("type") != "image"]
    text = content if isinstance(content, str) else "" if content is None else _text_of(content, f"{where}.content")
    text = f"(tool error) {text}" if block.get("is_error") else text  # chat has no error flag: say it in words
    return text, images


def _text_of(blocks: Any, where: str) -> str:
    """The text of a list of text blocks, where chat takes a string (a system prompt, a tool's result)."""
    if not isinstance(blocks, list):
        raise InvalidRequest(f"'{where}' must be a string or a list of text blocks", param=where)
    texts = []
    for i, block in enumerate(blocks):
        if _kind(block, f"{where}[{i}]") != "text":
            raise unsupported(f"A block of type {block.get('type')!r} here", f"{where}[{i}]")
        texts.append(string_field(block, "text", f"{where}[{i}]"))
    return "\n".join(texts)


def _image_url(source: Any, where: str) -> str:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("media_type"), str) and isinstance(source.get("data"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise unsupported(f"An image source of type {kind!r}", f"{where}.source")


def _kind(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise InvalidRequest(f"'{where}' must be a content block object with a 'type'", param=where)
    return str(block["type"])


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not _is_client(tool):
        raise unsupported_tool(tool.get("type") if isinstance(tool, dict) else None, where, "/v1/messages")
    function = {"name": string_field(tool, "name", where), "parameters": tool["input_schema"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: dict[str, Any]) -> Any:
    kind = choice.get("type")
    if kind in _TOOL_CHOICES:
        return _TOOL_CHOICES[kind]
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest("'tool_choice' must be {\"type\": auto, any, none} or {\"type\": \"tool\", \"name\": ...}",
                         param="tool_choice")


# -- the answer ----------------------------------------------------------------------------------------------------

def _tool_input(arguments: str) -> Any:
    """A tool call's arguments as the object Anthropic's ``input`` is; arguments that are not a JSON object (a
    small model's slip) are kept as the text they are, not dropped."""
    if not arguments.strip():
        return {}
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def tool_use_id(call_id: str) -> str:
    """A tool call's id in Anthropic's form (``toolu_...``); the client sends it back, and the upstream takes any."""
    return call_id if call_id.startswith("toolu_") else "toolu_" + call_id.removeprefix("call_")


def signature(thinking: str) -> str:
    """A thinking block's signature: clients require one, and send it back with the block; the gateway does not
    check it (earlier thinking is not sent upstream), so it is a digest of the text, not a secret."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _content(block: Block) -> dict[str, Any]:
    if block.kind == "tool_call":
        return {"type": "tool_use", "id": tool_use_id(block.call_id), "name": block.name,
                "input": _tool_input(block.text)}
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": block.text, "signature": signature(block.text)}
    return {"type": "text", "text": block.text}


def _usage(result: ChatResult) -> dict[str, int]:
    """Anthropic counts cached prompt tokens apart from ``input_tokens``; chat counts them in its prompt tokens.
    An upstream that counted nothing (llama.cpp's Python server streams no usage) has its output counted as the
    gateway counts it, one token per delta, and its prompt as 0 (not guessed)."""
    usage = result.usage
    if usage is None:
        return {"input_tokens": 0, "output_tokens": result.deltas}
    counts = {"input_tokens": usage.input - usage.cached, "output_tokens": usage.output}
    if usage.cached:
        counts["cache_read_input_tokens"] = usage.cached
    return counts


def _stop_reason(result: ChatResult) -> str:
    return _STOP_REASONS.get(result.finish_reason or "stop", "end_turn")


def answer(result: ChatResult, body: dict[str, Any]) -> dict[str, Any]:
    """The Messages API's answer to ``body`` from a whole chat answer."""
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": result.model or body["model"],
            "content": [_content(block) for block in result.blocks], "stop_reason": _stop_reason(result),
            "stop_sequence": None, "usage": _usage(result)}


# -- the stream ----------------------------------------------------------------------------------------------------

_DELTAS = {"text": ("text_delta", "text"), "refusal": ("text_delta", "text"),
           "reasoning": ("thinking_delta", "thinking"), "tool_call": ("input_json_delta", "partial_json")}


class MessageEvents:
    """The Messages API's stream events, in Anthropic's order. Chat streams count tokens only at their end, so
    ``message_start`` says 0 and ``message_delta`` carries the counts, the prompt's too (Anthropic's SDK and
    Claude Code take them from there)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = body
        self._id = new_id("msg_")

    def started(self, result: ChatResult) -> list[Event]:
        message: dict[str, Any] = {
            "id": self._id, "type": "message", "role": "assistant", "model": result.model or self._body["model"],
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [({"type": "message_start", "message": message}, "message_start")]

    def opened(self, block: Block, index: int) -> list[Event]:
        if block.kind == "tool_call":
            start: dict[str, Any] = {"type": "tool_use", "id": tool_use_id(block.call_id), "name": block.name,
                                     "input": {}}
        elif block.kind == "reasoning":
            start = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            start = {"type": "text", "text": ""}
        return [({"type": "content_block_start", "index": index, "content_block": start}, "content_block_start")]

    def grew(self, block: Block, index: int, delta: str) -> list[Event]:
        kind, key = _DELTAS[block.kind]
        return [({"type": "content_block_delta", "index": index, "delta": {"type": kind, key: delta}},
                 "content_block_delta")]

    def closed(self, block: Block, index: int) -> list[Event]:
        events: list[Event] = []
        if block.kind == "reasoning":
            events.append(({"type": "content_block_delta", "index": index,
                            "delta": {"type": "signature_delta", "signature": signature(block.text)}},
                           "content_block_delta"))
        return events + [({"type": "content_block_stop", "index": index}, "content_block_stop")]

    def finished(self, result: ChatResult) -> list[Event]:
        delta = {"type": "message_delta", "delta": {"stop_reason": _stop_reason(result), "stop_sequence": None},
                 "usage": _usage(result)}
        return [(delta, "message_delta"), ({"type": "message_stop"}, "message_stop")]

    def failed(self, error: GatewayError, result: ChatResult) -> list[Event]:
        return [(error.anthropic_body(), "error")]
