"""OpenAI itself (or any server that wants a Bearer key): the compatible client plus the key."""

from __future__ import annotations

from typing import Any

from ..config import InferenceConfig
from .compatible import OpenAICompatibleProvider


class OpenAIProvider(OpenAICompatibleProvider):
    name = "openai"

    def __init__(self, reactor: Any, config: InferenceConfig, retry_connect: bool = True) -> None:
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        super().__init__(reactor, config, headers, retry_connect)
