"""LM Studio's local server: OpenAI's API with a few differences absorbed here."""

from __future__ import annotations

from typing import Any

from ..operations import Operation
from .compatible import OpenAICompatibleProvider

JSON_OBJECT_SCHEMA = {"type": "json_schema", "json_schema": {"name": "json_object", "schema": {"type": "object"}}}


class LMStudioProvider(OpenAICompatibleProvider):
    name = "lmstudio"

    def prepare(self, operation: Operation, body: dict[str, Any]) -> dict[str, Any]:
        # LM Studio rejects {"type": "json_object"}; a schema that only asks for an object means the same.
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_object":
            body = {**body, "response_format": JSON_OBJECT_SCHEMA}
        return body
