"""The systemd units in systemd/: valid for systemd-analyze, hardened, and running what the README installs."""

from __future__ import annotations

import os
import shutil
import sys
from configparser import ConfigParser
from pathlib import Path

import pytest
import pytest_twisted

from .conftest import run_tool, tool

UNITS = Path(__file__).resolve().parent.parent / "systemd"
INSTALLED_TWISTD = "/opt/inference/bin/twistd"
SANDBOX = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
           "DynamicUser": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX"}


def service_section(name: str) -> dict[str, str]:
    parser = ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read(UNITS / name)
    return dict(parser["Service"])


@pytest_twisted.ensureDeferred
async def test_the_units_pass_systemd_analyze_verify(tmp_path):
    analyze = tool("systemd-analyze", package="systemd")
    twistd = shutil.which("twistd", path=os.path.dirname(sys.executable))
    assert twistd is not None
    for unit in UNITS.iterdir():  # verify also checks that ExecStart exists: point it at this install
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_TWISTD, twistd))
    code, output = await run_tool(tmp_path, analyze, "verify", "inference.service", "inference@.service",
                                  "inference@1.service", "inference.target")
    assert code == 0 and output.strip() == "", output  # unknown keys and bad values are only warnings


@pytest.mark.parametrize("name", ["inference.service", "inference@.service"])
def test_the_services_are_sandboxed_and_drain_on_stop(name):
    service = service_section(name)
    assert {key: service.get(key) for key in SANDBOX} == SANDBOX
    assert service["ExecStart"].startswith(f"{INSTALLED_TWISTD} --nodaemon --pidfile= inference ")
    assert service["KillSignal"] == "SIGTERM" and float(service["TimeoutStopSec"]) > 30  # > shutdown timeout
    assert service["EnvironmentFile"] == "-/etc/inference/inference.env"
    assert service["Restart"] == "on-failure"


def test_the_template_shares_the_port_and_gives_each_process_a_metrics_port():
    lines = (UNITS / "inference@.service").read_text().splitlines()
    assert "Environment=INFERENCE_SERVER_REUSE_PORT=true" in lines
    assert "Environment=INFERENCE_OBSERVABILITY_METRICS_PORT=910%i" in lines
