"""What the gateway needs from a model server, whatever it is."""

from __future__ import annotations

import abc
from typing import Any


class Provider(abc.ABC):
    """A model server: lists models and answers chat completions.

    Bodies are OpenAI-shaped dicts in and out; a provider absorbs its server's quirks so that nothing above
    it needs to know which server answered. Streaming joins this interface as ``open_stream`` (issue 3) and
    shares ``prepare``, so a body is shaped the same way whether it is streamed or not.
    """

    name: str = "provider"
    base_url: str = ""

    @abc.abstractmethod
    async def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """The models the server serves now, as OpenAI model objects (each with an ``id``)."""

    @abc.abstractmethod
    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streaming chat completion; raise a :class:`~inference.errors.GatewayError` on failure."""

    def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        """Shape a validated request body for this server (hook for quirks); the default sends it as is."""
        return body

    async def close(self) -> None:
        """Release connections and timers at shutdown."""
