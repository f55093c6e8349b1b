"""``GET /openapi.json`` describes the gateway truthfully: checked by reading it, and by schemathesis fuzzing the
running gateway against it (no 5xx, every status, header and body as documented)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import pytest_twisted

from .conftest import call, run_tool

SCHEMATHESIS = shutil.which("st", path=os.path.dirname(sys.executable))


@pytest_twisted.ensureDeferred
async def test_the_document_follows_the_configuration(start_gateway):
    open_gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock"})
    reply = await call("GET", open_gateway.url + "/openapi.json")
    assert reply.status == 200 and reply.header("Content-Type") == "application/json"
    document = reply.json()
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                                      "/v1/messages", "/v1/models", "/v1/usage",
                                      "/v1/models/{model}",
                                      "/", "/health", "/health/live", "/health/ready", "/openapi.json", "/metrics"}
    assert "securitySchemes" not in document["components"]
    request = document["components"]["schemas"]["ChatCompletionRequest"]
    assert request["properties"]["messages"]["maxItems"] == 1000
    assert request["properties"]["temperature"] == {"anyOf": [{"type": "number", "minimum": 0, "maximum": 2},
                                                              {"type": "null"}]}

    keyed = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_SERVER_API_KEYS": "k",
                           "INFERENCE_SERVER_MAX_MESSAGES": "8", "INFERENCE_OBSERVABILITY_METRICS_PATH": "/prom"})
    document = (await call("GET", keyed.url + "/openapi.json")).json()  # the document itself needs no key
    paths = document["paths"]
    assert paths["/v1/chat/completions"]["post"]["security"] == [{"bearerAuth": []}]
    assert "401" in paths["/v1/models"]["get"]["responses"]
    assert "security" not in paths["/health/live"]["get"] and "/prom" in paths and "/metrics" not in paths
    assert document["components"]["schemas"]["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] == 8


@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is not installed (pip install '.[test]')")
@pytest_twisted.ensureDeferred
async def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path, start_gateway):
    # Keys, protected metrics and a small queue, so 401 and 429 are in play too.
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_SERVER_API_KEYS": "fuzz-key",
                             "INFERENCE_SERVER_PROTECT_METRICS": "true", "INFERENCE_SERVER_MAX_MESSAGES": "20",
                             "INFERENCE_SERVER_MAX_EMBEDDING_INPUTS": "16",
                             "INFERENCE_SERVER_MAX_EMBEDDING_SIZE": "2000",
                             "INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS": "1",
                             "INFERENCE_INFERENCE_MAX_QUEUE": "1",
                             "INFERENCE_INFERENCE_USAGE_STORE": f"sqlite:///{tmp_path}/usage.db"})
    # One worker: with two threads, CPython 3.11.7's parser sometimes fails hypothesis's lambda descriptions with
    # "SystemError: AST constructor recursion depth mismatch" (a schemathesis run error, not a finding).
    common = ("run", gateway.url + "/openapi.json", "--header", "Authorization: Bearer fuzz-key",
              "--max-examples", "60", "--workers", "1", "--seed", "20261124", "--no-color")
    code, output = await run_tool(tmp_path, SCHEMATHESIS, *common, "--checks", "all", "--exclude-path",
                                  "/v1/embeddings", "--exclude-path", "/v1/responses", "--exclude-path",
                                  "/v1/chat/completions", "--exclude-path", "/v1/messages")
    assert code == 0, output
    assert "No issues found" in output
    # A tool_choice must name a tool the call offers (test_hardening.py), which no schema can tie to 'tools': every
    # other check runs on chat completions and messages.
    code, output = await run_tool(tmp_path, SCHEMATHESIS, *common, "--checks", "all", "--include-path",
                                  "/v1/chat/completions", "--include-path", "/v1/messages", "--exclude-checks",
                                  "positive_data_acceptance")
    assert code == 0, output
    assert "No issues found" in output
    # The mock keeps no state, so a valid previous_response_id is a 400 on it (test_translation.py): every other
    # check runs on /v1/responses too.
    code, output = await run_tool(tmp_path, SCHEMATHESIS, *common, "--checks", "all", "--include-path",
                                  "/v1/responses", "--exclude-checks", "positive_data_acceptance")
    assert code == 0, output
    assert "No issues found" in output
    # Schemathesis sends the model names it saw in answers to every route, and a text model asked for embeddings is
    # a 400 (test_models.py) that no schema can express; every other check runs on embeddings too.
    code, output = await run_tool(tmp_path, SCHEMATHESIS, *common, "--checks", "all", "--include-path",
                                  "/v1/embeddings", "--exclude-checks", "positive_data_acceptance")
    assert code == 0, output
    assert "No issues found" in output
