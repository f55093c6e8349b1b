"""OpenAI itself: the compatible client (with its key), labelled ``openai``."""

from __future__ import annotations

from .compatible import OpenAICompatibleProvider


class OpenAIProvider(OpenAICompatibleProvider):
    name = "openai"
