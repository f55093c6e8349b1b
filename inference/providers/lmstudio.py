"""LM Studio's local server: OpenAI's API with a few differences absorbed here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.web.iweb import IAgent

from .. import jsonio
from ..config import InferenceConfig
from ..errors import GatewayError
from ..operations import Operation
from ..reactor import IGatewayReactor
from .compatible import OpenAICompatibleProvider, json_answer

NATIVE_FIELDS = ("type", "state", "max_context_length", "loaded_context_length")
JSON_OBJECT_SCHEMA = {"type": "json_schema", "json_schema": {"name": "json_object", "schema": {"type": "object"}}}


@dataclass(frozen=True)
class Loaded:
    """What LM Studio says of an instance it loaded."""

    instance_id: str | None
    seconds: float | None  # its load_time_seconds


class LMStudioProvider(OpenAICompatibleProvider):
    name = "lmstudio"
    native_api: str | None = None  # which native API the host answers: "v1" (0.4), "v0" (0.3), "none"; None: unknown

    def __init__(self, reactor: IGatewayReactor, config: InferenceConfig, retry_connect: bool = True,
                 agent: IAgent | None = None) -> None:
        super().__init__(reactor, config, retry_connect, agent)
        self.contexts: dict[str, int] = {}  # the context each loaded model has, from the last list

    async def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """The OpenAI list, with what LM Studio's native API adds about each model when it has one: ``type``
        (llm, vlm, embeddings), ``state`` (loaded or not), ``max_context_length``, ``loaded_context_length``, and
        from 0.4's API its loaded ``instances`` (id, context length, parallel slots) and ``capabilities``."""
        listed = await super().list_models(timeout)
        native = await self._native_models(timeout)  # one after the other, on the same pooled connection
        models = [{**model, **native.get(model["id"], {})} for model in listed]
        self.states = {model["id"]: model.get("state") for model in models}
        self.contexts = {model["id"]: model["loaded_context_length"] for model in models
                         if _count(model.get("loaded_context_length"))}
        return models

    async def _native_models(self, timeout: float | None) -> dict[str, dict[str, Any]]:
        """The native API's models by id: ``/api/v1/models`` (LM Studio 0.4), else ``/api/v0/models`` (0.3), else
        nothing (llama.cpp and other servers). Which one the host answers is remembered, and asked again when it
        stops answering it (the host was upgraded, or replaced)."""
        for api in (self.native_api,) if self.native_api else ("v1", "v0"):
            if api == "none":
                return {}
            try:
                answer = await self.client.request("GET", f"/api/{api}/models", timeout=timeout)
                data = jsonio.loads(answer.body) if answer.status == 200 else None
            except GatewayError:
                return {}  # (unreachable or late: the OpenAI list still stands, and the API is not forgotten)
            except ValueError:
                data = None
            models = (_from_v1 if api == "v1" else _from_v0)(data)
            if models is not None:
                self.native_api = api
                return models
            if self.native_api is not None:  # it no longer answers what it did: find out again next time
                self.native_api = None
                return {}
        self.native_api = "none"
        return {}

    async def load(self, model: str, timeout: float) -> Loaded:
        """Load an instance of ``model`` (LM Studio 0.4's ``POST /api/v1/models/load``, which answers once it is
        loaded; a model loaded already gets one more instance)."""
        data = await self._native_post("/api/v1/models/load", {"model": model}, timeout)
        instance = data.get("model_instance_id") or data.get("instance_id")  # (the docs' name; an older one)
        seconds = data.get("load_time_seconds")
        return Loaded(instance if isinstance(instance, str) else None,
                      float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None)

    async def unload(self, instance_id: str, timeout: float) -> None:
        """Unload one loaded instance (``POST /api/v1/models/unload``)."""
        await self._native_post("/api/v1/models/unload", {"instance_id": instance_id}, timeout)

    async def _native_post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        return json_answer(await self.client.request("POST", path, jsonio.dumps(body), timeout=timeout))

    def prepare(self, operation: Operation, body: dict[str, Any]) -> dict[str, Any]:
        # LM Studio rejects {"type": "json_object"}; a schema that only asks for an object means the same.
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_object":
            body = {**body, "response_format": JSON_OBJECT_SCHEMA}
        # No output limit above this host's context (in a fleet, the gateway's cap is the largest host's).
        context = self.contexts.get(body["model"]) if isinstance(body.get("model"), str) else None
        if context is not None and any(isinstance(body.get(key), int) and body[key] > context
                                       for key in operation.output_limits):
            body = dict(body)
            operation.limit_output(body, context)
        return body


def _from_v0(data: Any) -> dict[str, dict[str, Any]] | None:
    """``GET /api/v0/models``: ``data[]`` with ``id``, ``type``, ``state`` and context lengths."""
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return None
    return {m["id"]: {key: m[key] for key in NATIVE_FIELDS if key in m}
            for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)}


def _from_v1(data: Any) -> dict[str, dict[str, Any]] | None:
    """``GET /api/v1/models``: ``models[]`` with ``key``, ``type`` (llm, embedding), ``max_context_length``,
    ``capabilities`` and ``loaded_instances[]`` (``id``, ``config.context_length``, ``config.parallel``), in the
    fields v0 gives (so the rest of the gateway reads either), plus ``instances`` and ``capabilities``."""
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return None
    native: dict[str, dict[str, Any]] = {}
    for m in models:
        if not isinstance(m, dict) or not isinstance(m.get("key"), str):
            continue
        capabilities = _object(m.get("capabilities"))
        kind = "embeddings" if m.get("type") == "embedding" else "vlm" if capabilities.get("vision") else "llm"
        instances = [_instance(i) for i in m.get("loaded_instances") or () if isinstance(i, dict)]
        entry: dict[str, Any] = {"type": kind, "state": "loaded" if instances else "not-loaded",
                                 "instances": instances, "capabilities": capabilities}
        if _count(m.get("max_context_length")):
            entry["max_context_length"] = m["max_context_length"]
        if instances and instances[0].get("context_length"):
            entry["loaded_context_length"] = instances[0]["context_length"]
        native[m["key"]] = entry
    return native


def _instance(instance: dict[str, Any]) -> dict[str, Any]:
    config = _object(instance.get("config"))
    return {"id": instance.get("id"), **{key: config[key] for key in ("context_length", "parallel")
                                          if _count(config.get(key))}}


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
