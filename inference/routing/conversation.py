"""The key of a conversation's prefix: what a host's prompt cache keeps from one turn to the next.

A conversation's later turns repeat its beginning (system prompt or instructions, and the first user turn), so a
hash of the model and that beginning names the conversation on every turn, while two conversations that share
only a system prompt get different keys. Only the beginning is hashed: a long conversation costs no more.

Coding agents name their sessions themselves, and that name is the better key: Codex sends ``prompt_cache_key``
(its session's id) on every Responses call, Claude Code ``metadata.user_id``, a JSON string holding its
``session_id``. A session keeps its key while its context grows and is compacted, when its first turn may change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Prefix:
    """Where an API's requests hold the beginning of their conversation (each ``Operation`` declares its own)."""

    system: str | None = None  # the field of its system prompt or instructions
    turns: str | None = None  # the field of its list of turns (or its input, a string or a list)
    prompt: str | None = None  # a text completion's prompt: its head names it
    cache_key: bool = False  # ``prompt_cache_key`` names the session (Codex)
    metadata_session: bool = False  # ``metadata.user_id`` is a JSON string with the ``session_id`` (Claude Code)


def _leading(prefix: Prefix, body: dict[str, Any]) -> Any:
    if prefix.prompt is not None:
        prompt = body.get(prefix.prompt)
        return prompt[:_PROMPT_HEAD] if isinstance(prompt, (str, list)) else prompt
    given = body.get(prefix.turns) if prefix.turns is not None else None
    return [body.get(prefix.system) if prefix.system is not None else None,
            _leading_turns(given) if isinstance(given, list) else given]


def _session(prefix: Prefix, body: dict[str, Any]) -> tuple[str, str] | None:
    """The session an agent named (where the name came from, the name), if it named one."""
    cache_key = body.get("prompt_cache_key")
    if prefix.cache_key and isinstance(cache_key, str) and cache_key:
        return "prompt_cache_key", cache_key
    user = (body.get("metadata") or {}).get("user_id") if isinstance(body.get("metadata"), dict) else None
    if prefix.metadata_session and isinstance(user, str) and user.startswith("{"):
        try:
            session = json.loads(user).get("session_id")
        except (ValueError, AttributeError):
            return None
        if isinstance(session, str) and session:
            return "session", session
    return None


def conversation(prefix: Prefix | None, model: str, body: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """The key of the conversation ``body`` continues and what it was made from (``prompt_cache_key``, ``session``
    or ``first_turn``); (None, None) for calls no prompt cache helps (``prefix`` None: embeddings)."""
    if prefix is None:
        return None, None
    session = _session(prefix, body)
    if session is not None:
        source, name = session
        return hashlib.blake2b(f"{model}\0{source}\0{name}".encode(), digest_size=16).digest(), source
    leading = _leading(prefix, body)
    if leading is None:
        return None, None
    try:
        text = orjson.dumps(leading, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer beyond 64 bits: the standard library's JSON says it just as well
        text = repr(leading).encode()
    return hashlib.blake2b(model.encode() + b"\0" + text, digest_size=16).digest(), "first_turn"


def conversation_key(prefix: Prefix | None, model: str, body: dict[str, Any]) -> bytes | None:
    """The key of the conversation ``body`` continues (None for calls no prompt cache helps: embeddings)."""
    return conversation(prefix, model, body)[0]
