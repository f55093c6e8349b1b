"""``inference check`` (and ``python -m inference check``) run as the installed command, against a fake upstream."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

INFERENCE = shutil.which("inference", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(INFERENCE is None, reason="the inference command is not installed next to Python")


async def check(env: dict[str, str], *args: str, module: bool = False) -> tuple[int, str]:
    command = [sys.executable, "-m", "inference"] if module else [INFERENCE]
    child_env = {"PATH": os.environ.get("PATH", ""), "INFERENCE_SERVER_PORT": "0", **env}
    out, err, code = await getProcessOutputAndValue(command[0], command[1:] + ["check", *args], env=child_env,
                                                    path=os.path.dirname(sys.executable))
    return code, (out + err).decode()


def verdicts(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("ok ", "warn ", "FAIL "))]


@pytest_twisted.ensureDeferred
async def test_check_passes_against_a_working_upstream_and_probes_it(fake):
    code, output = await check({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                                "INFERENCE_INFERENCE_DEFAULT_MODEL": "qwen"}, "--probe")
    assert code == 0, output
    assert f"inference.base_url                         '{fake.url}' from INFERENCE_INFERENCE_BASE_URL" in output
    assert "inference.http.timeout_secs                60.0                     default" in output
    lines = verdicts(output)
    assert any(f"upstream lmstudio at {fake.url} answers, serving 2 model(s)" in line for line in lines)
    assert "ok    default_model 'qwen' resolves to 'qwen2.5-7b-instruct'" in lines
    assert any(line.startswith("ok    test completion with 'qwen2.5-7b-instruct' answered") for line in lines)
    probe = [r for r in fake.received if r.path == "/v1/chat/completions"]
    assert len(probe) == 1 and probe[0].body["max_tokens"] == 1


@pytest_twisted.ensureDeferred
async def test_check_fails_when_the_upstream_is_down(fake):
    url = fake.url
    await fake.stop()
    code, output = await check({"INFERENCE_INFERENCE_BASE_URL": url, "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"})
    fake.listen()
    assert code == 1
    assert f"FAIL  upstream lmstudio at {url} does not answer: could not connect to upstream at {url}: " \
           "connection refused" in verdicts(output)


@pytest_twisted.ensureDeferred
async def test_check_fails_when_the_default_model_is_not_served(fake):
    code, output = await check({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                                "INFERENCE_INFERENCE_DEFAULT_MODEL": "mistral-7b"}, module=True)
    assert code == 1
    (failure,) = [line for line in verdicts(output) if line.startswith("FAIL")]
    assert "default_model 'mistral-7b'" in failure and "qwen2.5-7b-instruct, llama-3.2-3b-instruct" in failure


@pytest_twisted.ensureDeferred
async def test_check_reports_allowed_models_the_upstream_lacks(fake):
    code, output = await check({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                                "INFERENCE_INFERENCE_ALLOWED_MODELS": "qwen2.5-7b-instruct,gone-model"})
    assert code == 0
    assert "warn  allowed_models not served now: gone-model" in verdicts(output)
    code, output = await check({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                                "INFERENCE_INFERENCE_ALLOWED_MODELS": "gone-model"})
    assert code == 1 and "FAIL  none of allowed_models (gone-model) is served by the upstream" in verdicts(output)


@pytest_twisted.ensureDeferred
async def test_check_stops_on_bad_config_with_exit_2_and_hides_secrets(fake, tmp_path):
    code, output = await check({"INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "soon"})
    assert code == 2
    assert verdicts(output) == ["FAIL  config: inference.http.timeout_secs = 'soon' from "
                                "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS: expected a number"]
    config = tmp_path / "gateway.yaml"
    config.write_text(f"server:\n  api_keys: [top-secret-key]\ninference:\n  base_url: {fake.url}\n"
                      "  default_model: llama\n")
    code, output = await check({}, "--config", str(config))
    assert code == 0, output
    assert "top-secret-key" not in output
    assert f"server.api_keys                            <set>                    in {config}" in output
    assert "ok    1 API key(s) required on /v1/*" in verdicts(output)


@pytest_twisted.ensureDeferred
async def test_version():
    out, err, code = await getProcessOutputAndValue(INFERENCE, ["--version"])
    assert code == 0 and out.decode().strip() == "inference 0.1.0"


@pytest_twisted.ensureDeferred
async def test_check_warns_when_the_port_is_taken(fake):
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        code, output = await check({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                                    "INFERENCE_INFERENCE_DEFAULT_MODEL": "qwen",
                                    "INFERENCE_SERVER_PORT": str(taken.getsockname()[1])})
    finally:
        taken.close()
    assert code == 0  # the gateway may be the one holding it
    (warning,) = [line for line in verdicts(output) if line.startswith("warn")]
    assert warning.endswith("(Address already in use); is a gateway already running there?")


@pytest_twisted.ensureDeferred
async def test_check_shows_each_host_of_a_fleet_and_hides_their_keys(fake, tmp_path):
    config = tmp_path / "fleet.yaml"
    config.write_text("inference:\n  upstreams:\n"
                      f"    - {{name: mac, base_url: '{fake.url}', api_key: sk-very-secret}}\n")
    code, output = await check({}, "--config", str(config))
    assert f"inference.upstreams[0].name                'mac'                    in {config}" in output
    assert f"inference.upstreams[0].api_key             <set>                    in {config}" in output
    assert "sk-very-secret" not in output
