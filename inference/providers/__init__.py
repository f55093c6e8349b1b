"""Model servers behind the gateway, chosen by ``inference.provider``."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import ConfigError, InferenceConfig
from .base import Provider


def make_provider(reactor: Any, config: InferenceConfig) -> Provider:
    """Build the configured provider."""
    hosts = config.hosts()
    if len(hosts) > 1:
        raise ConfigError(f"inference.upstreams: {len(hosts)} hosts are configured, and routing across several "
                          "hosts is not served yet; configure one (or use inference.base_url)")
    config = dataclasses.replace(config, base_url=hosts[0].base_url, api_key=hosts[0].api_key or config.api_key)
    if config.provider == "mock":
        from .mock import MockProvider
        return MockProvider(reactor, config.mock)
    if config.provider == "openai":
        from .openai import OpenAIProvider
        return OpenAIProvider(reactor, config)
    from .lmstudio import LMStudioProvider
    return LMStudioProvider(reactor, config)


__all__ = ["Provider", "make_provider"]
