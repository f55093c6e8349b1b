"""LM Studio's local server: OpenAI's API with a few differences absorbed here."""

from __future__ import annotations

from typing import Any

from .. import jsonio
from ..errors import GatewayError
from ..operations import Operation
from .compatible import OpenAICompatibleProvider

NATIVE_FIELDS = ("type", "state", "max_context_length", "loaded_context_length")
JSON_OBJECT_SCHEMA = {"type": "json_schema", "json_schema": {"name": "json_object", "schema": {"type": "object"}}}


class LMStudioProvider(OpenAICompatibleProvider):
    name = "lmstudio"

    async def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """The OpenAI list, with what LM Studio's native API adds about each model when it has one: ``type``
        (llm, vlm, embeddings), ``state`` (loaded or not) and ``max_context_length``."""
        listed = await super().list_models(timeout)
        native = await self._native_models(timeout)  # one after the other, on the same pooled connection
        models = [{**model, **native.get(model["id"], {})} for model in listed]
        self.states = {model["id"]: model.get("state") for model in models}
        return models

    async def _native_models(self, timeout: float | None) -> dict[str, dict[str, Any]]:
        """``GET /api/v0/models`` by id; nothing when the upstream has no such API (older LM Studio, llama.cpp)."""
        try:
            answer = await self.client.request("GET", "/api/v0/models", timeout=timeout)
            data = jsonio.loads(answer.body) if answer.status == 200 else None
        except (GatewayError, ValueError):
            return {}
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            return {}
        return {m["id"]: {key: m[key] for key in NATIVE_FIELDS if key in m}
                for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)}

    def prepare(self, operation: Operation, body: dict[str, Any]) -> dict[str, Any]:
        # LM Studio rejects {"type": "json_object"}; a schema that only asks for an object means the same.
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_object":
            body = {**body, "response_format": JSON_OBJECT_SCHEMA}
        return body
