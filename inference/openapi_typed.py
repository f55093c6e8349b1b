"""The OpenAPI schemas of what the Responses API and Anthropic's Messages API carry (input items, content blocks,
tools, tool choices): what the gateway can serve on every upstream, the ones that lack these APIs included
(``translation/``). Only what the gateway checks is constrained, so the document and the checks stay in step."""

from __future__ import annotations

from typing import Any


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _kind(*names: str) -> dict[str, Any]:
    return {"const": names[0]} if len(names) == 1 else {"enum": list(names)}


_STRING = {"type": "string"}


def _text_part(*kinds: str) -> dict[str, Any]:
    return _object(["type", "text"], type=_kind(*kinds), text=_STRING)


def _either(*schemas: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": list(schemas)}


def _string_or_list(item: dict[str, Any], least: int = 0) -> dict[str, Any]:
    return _either(_STRING, {"type": "array", "items": item, "minItems": least})


# -- Anthropic's Messages API --------------------------------------------------------------------------------------

_TEXT_BLOCK = _text_part("text")
_IMAGE_BLOCK = _object(["type", "source"], type=_kind("image"), source=_either(
    _object(["type", "media_type", "data"], type=_kind("base64"), media_type=_STRING, data=_STRING),
    _object(["type", "url"], type=_kind("url"), url=_STRING)))
_TOOL_RESULT = _object(["type", "tool_use_id"], type=_kind("tool_result"), tool_use_id=_STRING,
                       content=_either(_STRING, {"type": "array", "items": _either(_TEXT_BLOCK, _IMAGE_BLOCK)},
                                       {"type": "null"}))
_TOOL_USE = _object(["type", "id", "name"], type=_kind("tool_use"), id=_STRING, name=_STRING)
_THINKING = _object(["type"], type=_kind("thinking", "redacted_thinking"))

MESSAGES_SCHEMAS: dict[str, Any] = {
    "AnthropicUserMessage": _object(["role", "content"], role=_kind("user"),
                                    content=_string_or_list(_either(_TEXT_BLOCK, _IMAGE_BLOCK, _TOOL_RESULT), 1)),
    "AnthropicAssistantMessage": _object(["role", "content"], role=_kind("assistant"),
                                         content=_string_or_list(_either(_TEXT_BLOCK, _TOOL_USE, _THINKING), 1)),
    # Claude Code's notes mid-conversation (beta mid-conversation-system); not every message may be one.
    "AnthropicSystemMessage": _object(["role", "content"], role=_kind("system"),
                                      content=_string_or_list(_TEXT_BLOCK, 1)),
}
MESSAGES_PARAMETERS: dict[str, Any] = {
    "system": _string_or_list(_TEXT_BLOCK),
    "tools": {"type": "array", "items": _either(
        _object(["name", "input_schema"], name=_STRING, type={"enum": ["custom", None]},
                input_schema={"type": "object"}),
        {**_object(["type", "name"], type=_STRING, name=_STRING),
         "description": "a server tool (web search ...): left out where the upstream has no Messages API, or a 400 "
                        "under inference.translation.unsupported_tools: reject"})},
    "tool_choice": _either(_object(["type"], type=_kind("auto", "any", "none")),
                           _object(["type", "name"], type=_kind("tool"), name=_STRING)),
}
MESSAGE_ITEM = _either({"$ref": "#/components/schemas/AnthropicUserMessage"},
                       {"$ref": "#/components/schemas/AnthropicAssistantMessage"},
                       {"$ref": "#/components/schemas/AnthropicSystemMessage"})


# -- the Responses API ---------------------------------------------------------------------------------------------

_TEXT_PARTS = ("input_text", "output_text")
_INPUT_IMAGE = _object(["type", "image_url"], type=_kind("input_image"), image_url=_STRING)
_SAID = _either(_text_part(*_TEXT_PARTS, "text"), _object(["type", "refusal"], type=_kind("refusal"),
                                                          refusal=_STRING))

RESPONSES_SCHEMAS: dict[str, Any] = {
    "ResponsesInputItem": _either(
        _object(["role", "content"], type=_kind("message"), role=_kind("user"),
                content=_string_or_list(_either(_text_part(*_TEXT_PARTS), _INPUT_IMAGE))),
        _object(["role", "content"], type=_kind("message"), role=_kind("assistant", "system", "developer"),
                content=_string_or_list(_SAID)),
        _object(["type", "call_id", "name", "arguments"], type=_kind("function_call"), call_id=_STRING,
                name=_STRING, arguments=_STRING, namespace=_STRING),
        _object(["type", "call_id", "name", "input"], type=_kind("custom_tool_call"), call_id=_STRING,
                name=_STRING, input=_STRING, namespace=_STRING),
        _object(["type", "call_id", "output"], type=_kind("function_call_output", "custom_tool_call_output"),
                call_id=_STRING, output=_string_or_list(_SAID)),
        _object(["type"], type=_kind("reasoning", "web_search_call", "file_search_call", "code_interpreter_call",
                                     "image_generation_call", "mcp_call", "mcp_list_tools", "local_shell_call",
                                     "local_shell_call_output", "compaction"))),
}
_FUNCTION_TOOL = _object(["type", "name"], type=_kind("function", "custom"), name=_STRING,
                         parameters={"type": ["object", "null"]})
RESPONSES_PARAMETERS: dict[str, Any] = {
    "tools": {"type": "array", "items": _either(
        _FUNCTION_TOOL,
        _object(["type", "name", "tools"], type=_kind("namespace"), name=_STRING,
                tools={"type": "array", "items": _FUNCTION_TOOL}),
        {**_object(["type"], type=_STRING),
         "description": "a hosted tool (web_search ...): left out where the upstream has no Responses API, or a 400 "
                        "under inference.translation.unsupported_tools: reject"})},
    "tool_choice": _either(_kind("auto", "none", "required"),
                           _object(["type", "name"], type=_kind("function", "custom"), name=_STRING,
                                   namespace=_STRING),
                           _object(["type"], type=_STRING)),
    "text": {"type": "object", "properties": {"format": _either(
        {"type": "null"}, _object(["type"], type=_kind("text", "json_object", "json_schema")))}},
}
