"""Model servers behind the gateway, chosen by ``inference.provider``."""

from __future__ import annotations

from typing import Any

from ..config import InferenceConfig
from .base import Provider


def make_provider(reactor: Any, config: InferenceConfig) -> Provider:
    """Build the configured provider."""
    if config.provider == "mock":
        from .mock import MockProvider
        return MockProvider(reactor, config.mock)
    if config.provider == "openai":
        from .openai import OpenAIProvider
        return OpenAIProvider(reactor, config)
    from .lmstudio import LMStudioProvider
    return LMStudioProvider(reactor, config)


__all__ = ["Provider", "make_provider"]
