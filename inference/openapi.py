"""``GET /openapi.json``: the gateway's routes, request and error schemas, as OpenAPI 3.1.

Built from the running configuration, so it tells the truth about this deployment: whether a key is needed,
where the metrics are, how many messages a request may hold. The parameter ranges are the ones
``schema.py`` enforces; the tests run schemathesis against this document to keep the two in step.
"""

from __future__ import annotations

import json
from typing import Any

from . import __version__
from .config import Config
from .openapi_typed import MESSAGE_ITEM, MESSAGES_PARAMETERS, MESSAGES_SCHEMAS, RESPONSES_PARAMETERS, RESPONSES_SCHEMAS
from .schema import ROLES

JSON_TYPE = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, *schemas: str) -> dict[str, Any]:
    schema = _ref(schemas[0]) if len(schemas) == 1 else {"anyOf": [_ref(name) for name in schemas]}
    return {"description": description, "content": {JSON_TYPE: {"schema": schema}}}


_ERRORS = {
    "400": "Malformed JSON or an invalid parameter (`param` names it); ambiguous model; a model of the wrong kind",
    "401": "Missing or invalid API key",
    "403": "The key's tenant is not an operator",
    "404": "Model not found, not allowed or not loaded; unknown route",
    "405": "Wrong method for the route",
    "408": "The request was not received within server.read_timeout_secs",
    "413": "Body larger than server.max_body_bytes",
    "414": "URL longer than server.max_url_bytes",
    "429": "Queue full, a sheddable call shed, or the tenant's limit reached (see Retry-After)",
    "431": "Headers larger than server.max_header_bytes",
    "500": "The upstream failed or answered something invalid",
    "502": "The upstream cannot be reached (or is known to be down)",
    "503": "The gateway is shutting down",
    "504": "The upstream, or the request as a whole (server.request_timeout_secs), took too long",
}
_CONNECTION_ERRORS = ("400", "405", "408", "414", "431")  # any route: answered before routing, or by the router


_WHEN = {"anyOf": [{"type": "string", "pattern": "^[0-9]{1,5}[dhm]$"},  # (usage.parse_when)
                   {"type": "string", "pattern": "^[0-9]{1,11}([.][0-9]{1,6})?$"},
                   {"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}
_GROUP = "(tenant|key_id|model|host|operation|status|day)"


def _responses(ok: dict[str, Any], *codes: str, auth: bool, error_schema: str = "Error") -> dict[str, Any]:
    wanted = set(codes) | set(_CONNECTION_ERRORS) | ({"401"} if auth else set())
    # Refused before routing (a malformed request, a wrong method), an error is OpenAI-shaped whatever the route;
    # a 400 may be either that or the route's own.
    def shapes(code: str) -> tuple[str, ...]:
        if code not in _CONNECTION_ERRORS or error_schema == "Error":
            return (error_schema,)
        return ("Error", error_schema) if code == "400" else ("Error",)

    return {"200": ok, **{code: _error(_ERRORS[code], *shapes(code)) for code in sorted(wanted)}}


def _number(minimum: float | None = None, maximum: float | None = None, integer: bool = False,
            exclusive_minimum: float | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer" if integer else "number"}
    if integer:  # a checked integer beyond 64 bits is a 400 (no model server reads one)
        minimum = -(2 ** 63) if minimum is None else minimum
        maximum = 2 ** 63 - 1 if maximum is None else maximum
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if exclusive_minimum is not None:
        schema["exclusiveMinimum"] = exclusive_minimum
    return schema


# The parameters schema.py checks, with the same ranges (anything else passes through).
_PARAMETERS: dict[str, Any] = {
    "model": {"type": "string", "pattern": r"\S",
              "description": "Exact id, or a unique case-insensitive part of one; "
                             "omitted: inference.default_model"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object"},
    "temperature": _number(0, 2), "top_p": _number(0, 1),
    "presence_penalty": _number(-2, 2), "frequency_penalty": _number(-2, 2),
    "max_tokens": _number(1, integer=True), "max_completion_tokens": _number(1, integer=True),
    "n": _number(1, integer=True), "seed": _number(integer=True),
    "stop": {"oneOf": [{"type": "string"},
                       {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
    "response_format": {"type": "object", "required": ["type"],
                        "properties": {"type": {"type": "string"}}},
    "tools": {"type": "array"}, "logit_bias": {"type": "object"}, "user": {"type": "string"},
    "logprobs": {"type": "boolean"}, "top_logprobs": _number(0, 20, integer=True),
    "top_k": _number(-1, integer=True), "min_p": _number(0, 1),
    "repeat_penalty": _number(exclusive_minimum=0), "mirostat_mode": {"enum": [0, 1, 2]},
    "mirostat_tau": _number(0), "mirostat_eta": _number(0), "cache_prompt": {"type": "boolean"},
    "ttl": _number(1, integer=True), "draft_model": {"type": "string"},
    "extensions": {"type": "object", "propertyNames": {"minLength": 1},
                   "description": "Keys merged into the upstream body (a key also given at the top level must "
                                  "have the same value there)"},
}


# /v1/messages (schema.MESSAGES_CHECKS).
_MESSAGES_PARAMETERS: dict[str, Any] = {
    "model": _PARAMETERS["model"], "stream": {"type": "boolean"}, "extensions": _PARAMETERS["extensions"],
    "temperature": _number(0, 1), "top_p": _number(0, 1), "top_k": _number(0, integer=True),
    "stop_sequences": {"type": "array"}, "metadata": {"type": "object"},
    "thinking": {"type": "object", "properties": {"budget_tokens": _number(1024, integer=True)}},
    **MESSAGES_PARAMETERS,
}

# /v1/completions: the same, with ``logprobs`` a count and its own few fields (schema.COMPLETION_CHECKS).
_COMPLETION_PARAMETERS: dict[str, Any] = {
    **{name: schema for name, schema in _PARAMETERS.items() if name not in ("logprobs", "top_logprobs", "tools")},
    "suffix": {"type": "string"}, "echo": {"type": "boolean"}, "logprobs": _number(0, 5, integer=True),
    "best_of": _number(1, integer=True),
}
_TOKEN = {"type": "integer", "minimum": 0}
# /v1/responses (schema.RESPONSES_CHECKS).
_RESPONSES_PARAMETERS: dict[str, Any] = {
    **{name: _PARAMETERS[name] for name in ("model", "stream", "temperature", "top_p", "tools", "user", "top_k",
                                            "min_p", "repeat_penalty", "ttl", "draft_model", "extensions")},
    "instructions": {"type": "string"}, "max_output_tokens": _number(1, integer=True), "reasoning": {"type": "object"},
    "previous_response_id": {"type": "string"}, "store": {"type": "boolean"}, "metadata": {"type": "object"},
    "parallel_tool_calls": {"type": "boolean"}, **RESPONSES_PARAMETERS,
}


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter sent as null counts as omitted (the gateway's default, or the upstream's)."""
    return {"anyOf": [schema, {"type": "null"}]}


def _schemas(config: Config) -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}
    content = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
    return {
        "Error": {
            "type": "object", "required": ["error"], "additionalProperties": False,
            "properties": {"error": {
                "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": nullable_string, "code": nullable_string}}}},
        "ChatMessage": {
            "type": "object", "required": ["role"],
            "properties": {"role": {"enum": list(ROLES)}, "content": content, "name": {"type": "string"}},
            "anyOf": [{"required": ["content"], "properties": {"content": content}},
                      {"required": ["tool_calls"],
                       "properties": {"role": {"const": "assistant"},
                                      "tool_calls": {"type": "array", "minItems": 1}}}]},
        "ChatCompletionRequest": {
            "type": "object", "required": ["messages"],
            "description": "Fields not listed are passed to the upstream untouched (LM Studio / llama.cpp "
                           "extensions, tools, future OpenAI fields); `extensions` is merged into the body.",
            "properties": {**{name: _or_null(schema) for name, schema in _PARAMETERS.items()},
                           "messages": {"type": "array", "minItems": 1, "maxItems": config.server.max_messages,
                                        "items": _ref("ChatMessage")}}},
        "ChatCompletion": {
            "type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {
                    "type": "object", "required": ["index", "message"],
                    "properties": {"index": {"type": "integer"}, "finish_reason": nullable_string,
                                   "message": {"type": "object", "required": ["role"],
                                               "properties": {"role": {"type": "string"},
                                                              "content": nullable_string}}}}},
                "usage": {"type": "object", "properties": {
                    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"}}}}},
        "CompletionRequest": {
            "type": "object", "required": ["prompt"],
            "description": "Fields not listed are passed to the upstream untouched; `extensions` is merged in.",
            "properties": {**{name: _or_null(schema) for name, schema in _COMPLETION_PARAMETERS.items()},
                           "prompt": {"oneOf": [
                               {"type": "string"},
                               {"type": "array", "minItems": 1, "items": {"type": "string"}},
                               {"type": "array", "minItems": 1, "items": _TOKEN},
                               {"type": "array", "minItems": 1,
                                "items": {"type": "array", "minItems": 1, "items": _TOKEN}}]}}},
        "EmbeddingsRequest": {
            "type": "object", "required": ["input"],
            "description": "Fields not listed are passed to the upstream untouched; `extensions` is merged in.",
            "properties": {
                "model": _or_null(_PARAMETERS["model"]), "extensions": _or_null(_PARAMETERS["extensions"]),
                "encoding_format": _or_null({"enum": ["float", "base64"]}),
                "dimensions": _or_null({**_number(1, integer=True),
                                        "maximum": config.server.max_embedding_dimensions}),
                "user": _or_null({"type": "string"}),
                "input": {"oneOf": [
                    {"type": "string", "minLength": 1,
                     "maxLength": config.server.max_embedding_size},
                    {"type": "array", "minItems": 1, "maxItems": config.server.max_embedding_inputs,
                     "items": {"type": "string", "minLength": 1}},
                    {"type": "array", "minItems": 1, "maxItems": config.server.max_embedding_size, "items": _TOKEN},
                    {"type": "array", "minItems": 1, "maxItems": config.server.max_embedding_inputs,
                     "items": {"type": "array", "minItems": 1, "items": _TOKEN}}],
                    "description": "At most server.max_embedding_inputs inputs, and server.max_embedding_size "
                                   "characters and token ids in all"}}},
        "EmbeddingList": {
            "type": "object", "required": ["object", "data", "model"],
            "properties": {
                "object": {"const": "list"}, "model": {"type": "string"}, "usage": {"type": "object"},
                "data": {"type": "array", "items": {
                    "type": "object", "required": ["index", "embedding"],
                    "properties": {"index": {"type": "integer"}, "object": {"const": "embedding"},
                                   "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}},
                                                           {"type": "string", "description": "base64 float32"}]}}}}}},
        "AnthropicError": {
            "type": "object", "required": ["type", "error"],
            "properties": {"type": {"const": "error"}, "error": {
                "type": "object", "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}},
        "MessagesRequest": {
            "type": "object", "required": ["messages", "max_tokens"],
            "description": "Anthropic's Messages API; fields not listed are passed to the upstream untouched.",
            "properties": {
                **{name: _or_null(schema) for name, schema in _MESSAGES_PARAMETERS.items()},
                "max_tokens": _number(1, integer=True),
                "messages": {"type": "array", "minItems": 1, "maxItems": config.server.max_messages,
                             "items": MESSAGE_ITEM, "contains": {"anyOf": MESSAGE_ITEM["anyOf"][:2]}}}},
        **MESSAGES_SCHEMAS, **RESPONSES_SCHEMAS,
        "Message": {
            "type": "object", "required": ["id", "type", "role", "content", "model"],
            "properties": {"id": {"type": "string"}, "type": {"const": "message"}, "role": {"const": "assistant"},
                           "content": {"type": "array"}, "model": {"type": "string"},
                           "stop_reason": nullable_string, "usage": {"type": "object"}}},
        "ResponsesRequest": {
            "type": "object", "required": ["input"],
            "description": "OpenAI's Responses API; fields not listed are passed to the upstream untouched.",
            "properties": {**{name: _or_null(schema) for name, schema in _RESPONSES_PARAMETERS.items()},
                           "input": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1,
                                                                    "items": _ref("ResponsesInputItem")}]}}},
        "Response": {
            "type": "object", "required": ["id", "object", "model", "output"],
            "properties": {"id": {"type": "string"}, "object": {"const": "response"}, "model": {"type": "string"},
                           "status": {"type": "string"}, "output": {"type": "array"},
                           "usage": {"type": ["object", "null"]}}},
        "ResponseEvent": {
            "type": "object", "required": ["data"],
            "description": "One server-sent event with its `event:` name (`response.created`, "
                           "`response.output_text.delta`, ..., `response.completed`; `error` if the stream fails "
                           "after it started); no `[DONE]`",
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}}},
        "TextCompletion": {
            "type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {
                    "type": "object", "required": ["index", "text"],
                    "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                   "finish_reason": nullable_string}}},
                "usage": {"type": "object"}}},
        "StreamEvent": {
            "type": "object", "required": ["data"],
            "description": "One server-sent event (`data: ...`): a `chat.completion.chunk`, an `{\"error\": ...}` "
                           "object if the stream fails after it started, and last `[DONE]`",
            "properties": {"data": {"type": "string"}}},
        "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"],
                  "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                                 "created": {"type": "integer"}, "owned_by": {"type": "string"}}},
        "ModelList": {"type": "object", "required": ["object", "data"],
                      "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}},
        "Health": {"type": "object", "required": ["status", "version", "provider", "base_url", "upstream"],
                   "properties": {"status": {"enum": ["healthy", "unhealthy"]}, "version": {"type": "string"},
                                  "provider": {"type": "string"}, "base_url": {"type": "string"},
                                  "http_config": {"type": "object"}, "upstream": {"type": "object"},
                                  "observability": {"type": "object"}}},
        "About": {"type": "object", "required": ["name", "version"],
                  "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                 "routes": {"type": "array", "items": {"type": "string"}}}},
        "UsageSummary": {
            "type": "object", "required": ["object", "from", "to", "group_by", "data", "truncated"],
            "properties": {"object": {"const": "usage"}, "from": {"type": "string"}, "to": {"type": "string"},
                           "group_by": {"type": "array", "items": {"type": "string"}},
                           "data": {"type": "array", "items": {
                               "type": "object", "required": ["requests", "errors", "input_tokens", "output_tokens"],
                               "properties": {name: {"type": "integer", "minimum": 0} for name in
                                              ("requests", "errors", "input_tokens", "output_tokens")}}},
                           "truncated": {"type": "boolean"}}},
        "Probe": {"type": "object", "required": ["status"],
                  "properties": {"status": {"enum": ["ok", "ready", "not ready"]},
                                 "error": nullable_string}},
    }


def openapi_document(config: Config) -> dict[str, Any]:
    """The OpenAPI 3.1 description of a gateway running with ``config``."""
    keys = bool(config.server.api_keys or config.server.api_keys_file)
    operator_auth = keys and config.server.protect_metrics
    secured: list[dict[str, list[str]]] = [{"bearerAuth": []}] if keys else []

    def operation(summary: str, ok: dict[str, Any], *codes: str, auth: bool, tag: str, error_schema: str = "Error",
                  **more: Any) -> dict[str, Any]:
        return {"summary": summary, "tags": [tag], "security": secured if auth else [],
                "responses": _responses(ok, *codes, auth=auth, error_schema=error_schema), **more}

    def json_ok(description: str, schema: str) -> dict[str, Any]:
        return {"description": description, "content": {JSON_TYPE: {"schema": _ref(schema)}}}

    upstream = ("404", "500", "502", "503", "504")
    paths: dict[str, Any] = {
        "/v1/chat/completions": {"post": operation(
            "Chat completion; `stream: true` answers with server-sent events ending in `data: [DONE]`",
            {"description": "The completion (JSON), or its chunks as SSE",
             "content": {JSON_TYPE: {"schema": _ref("ChatCompletion")},
                         "text/event-stream": {"schema": _ref("StreamEvent")}}},
            "413", "429", *upstream, auth=keys, tag="OpenAI", operationId="createChatCompletion",
            requestBody={"required": True, "content": {JSON_TYPE: {"schema": _ref("ChatCompletionRequest")}}})},
        "/v1/completions": {"post": operation(
            "Text completion; `stream: true` answers with server-sent events ending in `data: [DONE]`",
            {"description": "The completion (JSON), or its chunks as SSE",
             "content": {JSON_TYPE: {"schema": _ref("TextCompletion")},
                         "text/event-stream": {"schema": _ref("StreamEvent")}}},
            "413", "429", *upstream, auth=keys, tag="OpenAI", operationId="createCompletion",
            requestBody={"required": True, "content": {JSON_TYPE: {"schema": _ref("CompletionRequest")}}})},
        "/v1/embeddings": {"post": operation(
            "Embeddings of strings or token arrays, as floats or base64 (the upstream's encoding is relayed)",
            json_ok("The embeddings", "EmbeddingList"), "413", "429", *upstream, auth=keys, tag="OpenAI",
            operationId="createEmbedding",
            requestBody={"required": True, "content": {JSON_TYPE: {"schema": _ref("EmbeddingsRequest")}}})},
        "/v1/responses": {"post": operation(
            "OpenAI's Responses API, relayed to an upstream that serves it, else served through its chat "
            "completions; `stream: true` answers with its typed events",
            {"description": "The response (JSON), or its events as SSE",
             "content": {JSON_TYPE: {"schema": _ref("Response")},
                         "text/event-stream": {"schema": _ref("ResponseEvent")}}},
            "413", "429", *upstream, auth=keys, tag="OpenAI", operationId="createResponse",
            requestBody={"required": True, "content": {JSON_TYPE: {"schema": _ref("ResponsesRequest")}}})},
        "/v1/messages": {"post": operation(
            "Anthropic's Messages API, relayed to an upstream that serves it, else served through its chat "
            "completions (errors in Anthropic's shape; "
            "`x-api-key` accepted as the key); `stream: true` answers with its events",
            {"description": "The message (JSON), or its events as SSE",
             "content": {JSON_TYPE: {"schema": _ref("Message")},
                         "text/event-stream": {"schema": _ref("ResponseEvent")}}},
            "413", "429", *upstream, auth=keys, tag="Anthropic", operationId="createMessage",
            error_schema="AnthropicError",
            requestBody={"required": True, "content": {JSON_TYPE: {"schema": _ref("MessagesRequest")}}})},
        "/v1/models": {"get": operation("Models this gateway serves", json_ok("The models", "ModelList"),
                                        "502", "503", "504", "500", auth=keys, tag="OpenAI",
                                        operationId="listModels")},
        "/v1/models/{model}": {"get": operation(
            "One model", json_ok("The model", "Model"), *upstream, auth=keys, tag="OpenAI",
            operationId="retrieveModel",
            parameters=[{"name": "model", "in": "path", "required": True,
                         "schema": {"type": "string", "minLength": 1}}])},
        "/v1/usage": {"get": operation(
            "Calls and tokens from the usage ledger, summed per group (operators' keys; 404 without a ledger)",
            json_ok("The sums", "UsageSummary"), "400", "403", "404", auth=keys, tag="Operations",
            operationId="usage", parameters=[
                {"name": "from", "in": "query", "required": False, "schema": _WHEN,
                 "description": "an age (7d, 24h, 30m), a date, an ISO time or Unix seconds (default 7d)"},
                {"name": "to", "in": "query", "required": False, "schema": _WHEN,
                 "description": "the same (default now); not after from: no rows"},
                {"name": "group_by", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": f"^{_GROUP}(,{_GROUP})*$"},
                 "description": "among tenant, key_id, model, host, operation, status, day (default tenant,model)"}])},
        "/health": {"get": operation(
            "Gateway and upstream status (503 with the same shape when the upstream is unreachable)",
            json_ok("Healthy", "Health"), auth=operator_auth, tag="Operations", operationId="health")},
        "/": {"get": operation("What this server is (clients check that the base URL answers; HEAD too)",
                               json_ok("A short description", "About"), auth=False, tag="Operations",
                               operationId="about")},
        "/health/live": {"get": operation("Liveness: the process answers", json_ok("Alive", "Probe"),
                                          auth=operator_auth, tag="Operations", operationId="live")},
        "/health/ready": {"get": operation("Readiness: the upstream answers and the gateway is not stopping",
                                           json_ok("Ready", "Probe"), auth=operator_auth, tag="Operations",
                                           operationId="ready")},
        "/openapi.json": {"get": operation("This document", {"description": "OpenAPI 3.1",
                                                             "content": {JSON_TYPE: {"schema": {"type": "object"}}}},
                                           auth=False, tag="Operations", operationId="openapi")},
    }
    # 503 from /health and /health/ready says "not healthy / not ready", with the body of the 200.
    paths["/health"]["get"]["responses"]["503"] = json_ok("Unhealthy: the upstream is unreachable", "Health")
    paths["/health/ready"]["get"]["responses"]["503"] = json_ok("Not ready", "Probe")
    metrics = config.observability.metrics
    if metrics.enabled and metrics.port is None:
        paths[metrics.path] = {"get": operation(
            "Prometheus metrics (OpenMetrics with exemplars when the Accept header asks)",
            {"description": "The exposition", "content": {"text/plain": {"schema": {"type": "string"}},
                                                           "application/openmetrics-text": {
                                                               "schema": {"type": "string"}}}},
            auth=operator_auth, tag="Operations", operationId="metrics")}
    for path_item in paths.values():
        for op in path_item.values():
            if not op["security"]:
                del op["security"]
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "inference", "version": __version__,
                 "description": "OpenAI-compatible gateway in front of LM Studio, OpenAI or a built-in mock. "
                                "Every error is `{\"error\": {message, type, param, code}}`."},
        "paths": paths,
        "components": {"schemas": _schemas(config)},
    }
    if keys:
        document["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return document


def openapi_bytes(config: Config) -> bytes:
    return json.dumps(openapi_document(config), separators=(",", ":")).encode("utf-8")
