"""deploy/: the Dockerfile and Compose file cannot be built here (no Docker engine); check what can be read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_twisted
import yaml

from inference.config import load

from .conftest import free_port, run_tool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROOT = DEPLOY.parent


def instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in lines]


def test_the_image_runs_twistd_as_a_non_root_user_with_a_liveness_healthcheck():
    steps = instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    copied = [arg.split()[0] for op, arg in steps if op == "COPY"]
    assert all((ROOT / path).exists() for path in copied if path != "setup.py") and (ROOT / "setup.py").exists()
    users = [arg for op, arg in steps if op == "USER"]
    assert users == ["inference"]
    assert [op for op, _ in steps].index("USER") < [op for op, _ in steps].index("CMD")
    (health,) = [arg for op, arg in steps if op == "HEALTHCHECK"]
    assert "/health/live" in health
    assert dict(steps)["CMD"] == '["twistd", "--nodaemon", "--pidfile=", "inference"]'


def test_compose_builds_that_image_and_stops_gracefully():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    service = compose["services"]["inference"]
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert service["ports"] == ["127.0.0.1:3000:3000"]
    assert all(name.startswith(("INFERENCE_", "OTEL_")) for name in service["environment"])
    config = load(None, service["environment"])  # every INFERENCE_* name and value is one the daemon accepts
    assert config.inference.base_url == "http://host.docker.internal:1234"
    assert int(service["stop_grace_period"].rstrip("s")) > 30


@pytest.mark.parametrize("protect", [False, True])
@pytest_twisted.ensureDeferred
async def test_the_healthcheck_passes_on_a_live_gateway_and_fails_without_one(tmp_path, start_gateway, protect):
    (health,) = [arg for op, arg in instructions() if op == "HEALTHCHECK"]
    command = health.split(" CMD ", 1)[1].replace("python -c", f"{sys.executable} -c", 1)
    env = {"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_SERVER_API_KEYS": "k",
           "INFERENCE_SERVER_PROTECT_METRICS": str(protect).lower()}
    gateway = start_gateway(env)
    port = str(gateway.port.getHost().port)
    assert await run_tool(tmp_path, "/bin/sh", "-c", f"INFERENCE_SERVER_PORT={port} {command}") == (0, "")
    code, _ = await run_tool(tmp_path, "/bin/sh", "-c", f"INFERENCE_SERVER_PORT={free_port()} {command}")
    assert code != 0
