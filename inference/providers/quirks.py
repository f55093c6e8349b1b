"""What local model servers refuse, found out from their answers and absorbed: each quirk is remembered per
upstream and model (or route) for a while (``models_cache_secs``), then tried again, in case the server or its
model changed.

- **A missing route**: an upstream without the Responses or Messages API is served through chat completions.

- **Tool-call turns with null content**: llama.cpp's Python server refuses ``"content": null`` (and a missing
  content) on an assistant turn that only calls tools; ``""`` means the same to every server, so it is always sent.
- **A system turn after the first**: many chat templates (Qwen, Mistral, Gemma) raise on a system message that is
  not the first one. Claude Code sends them mid-conversation; such a turn is folded into its neighbouring user turn
  in a marked block.
- **Streamed tool calls**: llama.cpp's Python server cannot stream a tool call the model chose itself
  (``tool_choice: auto``); it answers an empty 200 stream. Such a call is asked again without streaming and its
  answer streamed to the client.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ..errors import GatewayError

MISSING_ROUTE = "missing route"
LATE_SYSTEM = "late system turn"
STREAMED_TOOLS = "streamed tool call"

_LATE_SYSTEM_WORDS = re.compile(r"system (message|role|prompt)s?\b.*\b(beginning|first|start|not supported|only)|"
                                r"roles must alternate", re.IGNORECASE | re.DOTALL)
_STREAMED_TOOLS_WORDS = re.compile(r"stream.*tool|tool.*stream", re.IGNORECASE | re.DOTALL)


class Quirks:
    """The quirks an upstream showed, each for a model or a route (``key``), remembered for ``recheck_secs``."""

    def __init__(self, clock: IReactorTime, recheck_secs: float) -> None:
        self._clock = clock
        self._recheck_secs = recheck_secs
        self._until: dict[tuple[str, str], float] = {}  # (quirk, key) -> when to try without it again

    def has(self, quirk: str, key: str) -> bool:
        until = self._until.get((quirk, key))
        return until is not None and self._clock.seconds() < until

    def note(self, quirk: str, key: str) -> None:
        self._until[(quirk, key)] = self._clock.seconds() + self._recheck_secs


def refuses_late_system(error: GatewayError) -> bool:
    """Whether an upstream error is a chat template refusing a system turn that is not the first."""
    return error.status in (400, 422, 500) and bool(_LATE_SYSTEM_WORDS.search(error.message))


def refuses_streamed_tools(error: GatewayError) -> bool:
    """Whether an upstream error says it cannot stream a tool call."""
    return bool(_STREAMED_TOOLS_WORDS.search(error.message))


def has_late_system(messages: list[Any]) -> bool:
    """Whether a system (or developer) turn follows another kind of turn."""
    seen_other = False
    for message in messages:
        system = isinstance(message, dict) and message.get("role") in ("system", "developer")
        if system and seen_other:
            return True
        seen_other = seen_other or not system
    return False


def with_tool_call_content(messages: list[Any]) -> list[Any]:
    """The messages with ``"content": ""`` on every assistant turn that calls tools and says nothing."""
    if not any(_calls_without_content(m) for m in messages):
        return messages
    return [{**m, "content": ""} if _calls_without_content(m) else m for m in messages]


def _calls_without_content(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") == "assistant" and message.get("content") is None \
        and bool(message.get("tool_calls") or message.get("function_call"))


def fold_late_system(messages: list[Any]) -> list[Any]:
    """The messages with each system turn after the first other turn folded into a user turn, in a marked block:
    into the next turn when it is the user's, else into the previous when that is the user's, else as a user turn
    of its own (after an assistant or tool turn)."""
    folded: list[Any] = []
    pending: list[str] = []  # system texts waiting for the next user turn
    seen_other = False
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer") and seen_other:
            pending.append(_marked(message.get("content")))
            continue
        if pending and role == "user":
            message = _with_text(message, "\n\n".join(pending), before=True)
            pending = []
        elif pending:
            folded += _place(folded, pending)
            pending = []
        seen_other = seen_other or role not in ("system", "developer")
        folded.append(message)
    if pending:
        folded += _place(folded, pending)
    return folded


def _place(folded: list[Any], texts: list[str]) -> list[Any]:
    """Put system texts with no user turn after them: onto the last turn if it is the user's, else as a new one."""
    text = "\n\n".join(texts)
    if folded and isinstance(folded[-1], dict) and folded[-1].get("role") == "user":
        folded[-1] = _with_text(folded[-1], text, before=False)
        return []
    return [{"role": "user", "content": text}]


def _marked(content: Any) -> str:
    if isinstance(content, list):
        content = "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return f"<system>\n{content if isinstance(content, str) else ''}\n</system>"


def _with_text(message: dict[str, Any], text: str, before: bool) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        part = {"type": "text", "text": text}
        return {**message, "content": [part, *content] if before else [*content, part]}
    content = content if isinstance(content, str) else ""
    return {**message, "content": f"{text}\n\n{content}" if before else f"{content}\n\n{text}"}
