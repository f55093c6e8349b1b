"""The key of a conversation's prefix: what a host's prompt cache keeps from one turn to the next.

A conversation's later turns repeat its beginning (system prompt or instructions, and the first user turn), so a
hash of the model and that beginning names the conversation on every turn, while two conversations that share
only a system prompt get different keys. Only the beginning is hashed: a long conversation costs no more.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

_PROMPT_HEAD = 2048  # characters (or token ids) of a text completion's prompt that name it
_LEADING_ROLES = ("system", "developer")


def _leading_turns(turns: list[Any]) -> list[Any]:
    """The turns up to and including the first that is not a system or developer one."""
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and turn.get("role") in _LEADING_ROLES):
            return turns[:i + 1]
    return turns


def _leading(operation: str, body: dict[str, Any]) -> Any:
    if operation in ("chat", "messages"):
        messages = body.get("messages")
        return [body.get("system"), _leading_turns(messages) if isinstance(messages, list) else None]
    if operation == "responses":
        given = body.get("input")
        return [body.get("instructions"), _leading_turns(given) if isinstance(given, list) else given]
    if operation == "text_completion":
        prompt = body.get("prompt")
        return prompt[:_PROMPT_HEAD] if isinstance(prompt, (str, list)) else prompt
    return None


def conversation_key(operation: str, model: str, body: dict[str, Any]) -> bytes | None:
    """The key of the conversation ``body`` continues (None for calls no prompt cache helps: embeddings)."""
    leading = _leading(operation, body)
    if leading is None:
        return None
    try:
        text = orjson.dumps(leading, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer beyond 64 bits: the standard library's JSON says it just as well
        text = repr(leading).encode()
    return hashlib.blake2b(model.encode() + b"\0" + text, digest_size=16).digest()
