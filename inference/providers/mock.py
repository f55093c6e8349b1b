"""A model server inside the gateway: deterministic answers, no network, so it runs anywhere."""

from __future__ import annotations

import itertools
import time
from typing import Any, Optional

from twisted.internet.task import deferLater

from ..config import MockConfig
from .base import Provider


def words_of(content: Any) -> list[str]:
    """The words of a message's content, a string or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content.split()
    if isinstance(content, list):
        return [w for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
                for w in part["text"].split()]
    return []


def reply_words(body: dict[str, Any]) -> tuple[list[str], str]:
    """The mock's answer: it echoes the last user message, cut to ``max_tokens`` words (one word, one token)."""
    last_user = next((m for m in reversed(body["messages"]) if m.get("role") == "user"), None)
    said = words_of(last_user.get("content")) if last_user else []
    words = ["You", "said:", *said] if said else ["Hello", "from", "the", "mock", "model."]
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or len(words)
    return (words[:limit], "length") if len(words) > limit else (words, "stop")


class MockProvider(Provider):
    name = "mock"
    base_url = "mock://"

    def __init__(self, reactor: Any, config: MockConfig) -> None:
        self._reactor = reactor
        self._config = config
        self._ids = itertools.count(1)
        self._created = int(time.time())

    async def list_models(self, timeout: Optional[float] = None) -> list[dict[str, Any]]:
        return [{"id": m, "object": "model", "created": self._created, "owned_by": "mock"}
                for m in self._config.models]

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        words, finish_reason = reply_words(body)
        delay = self._config.latency_secs + self._config.token_delay_secs * len(words)
        if delay:
            await deferLater(self._reactor, delay, lambda: None)
        prompt_tokens = sum(len(words_of(m.get("content"))) for m in body["messages"])
        return {
            "id": f"chatcmpl-mock-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(self._reactor.seconds()),
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": " ".join(words)}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                      "total_tokens": prompt_tokens + len(words)},
        }
