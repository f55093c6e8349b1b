"""The real coding agents, unmodified, against the gateway on the mock: Claude Code (default tools, and plan
mode) and Codex CLI (a custom provider on the Responses API) each complete a turn that calls a tool and uses its
result. The mock calls the tool the prompt names, with the words after the name as its text arguments.

The CLIs come from npm at pinned versions, installed once into ~/.cache/inference-tests; they run in a scratch
directory, with no tool that writes or runs commands (Claude Code) or a read-only sandbox (Codex). Without npm
these tests are skipped, and under INFERENCE_REQUIRE_TOOLS=1 (CI) they fail instead.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from .conftest import run_tool, tool

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.197"  # the last release that runs on Node 18 and 20
CODEX = "@openai/codex@0.171.0"
CACHE = Path.home() / ".cache" / "inference-tests" / "agents-2.1.197-0.171.0"
QUIET = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
         "NO_COLOR": "1"}


@pytest.fixture(scope="session")
def agents() -> Path:
    """The installed CLIs (npm, once per machine)."""
    npm = tool("npm", "npm")
    if not (CACHE / "node_modules" / "@openai" / "codex").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([npm, "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--silent",
                               CLAUDE_CODE, CODEX], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    return CACHE / "node_modules"


@pytest.fixture
def mock_gateway(start_gateway):
    return start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_SERVER_API_KEYS": "gw-test-key"})



async def claude(agents: Path, gateway, tmp_path: Path, *args: str) -> str:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    code, output = await run_tool(tmp_path, tool("node", "nodejs"),
                                  str(agents / "@anthropic-ai" / "claude-code" / "cli-wrapper.cjs"), "-p", *args,
                                  "--model", "mock-model", env={
                                      "HOME": str(home), "ANTHROPIC_BASE_URL": gateway.url,
                                      "ANTHROPIC_API_KEY": "gw-test-key", **QUIET})
    assert code == 0, output
    return output


@pytest.mark.parametrize("mode", [["--disallowedTools", "Bash Edit Write NotebookEdit"],
                                  ["--permission-mode", "plan"]], ids=["default-tools", "plan-mode"])
@pytest_twisted.ensureDeferred
async def test_claude_code_reads_a_file_through_the_gateway(agents, mock_gateway, tmp_path, mode):
    note = tmp_path / "note.txt"
    note.write_text("the secret word is marmalade\n")
    output = await claude(agents, mock_gateway, tmp_path, f"Read {note}", *mode)
    # The mock called Read with the path; Claude Code ran it and sent its result; the mock said it back.
    assert "The tool said:" in output and "marmalade" in output
    m = await mock_gateway.metrics()
    assert m.total("inference_request_duration_seconds_count", operation="messages", outcome="success") >= 2


def codex_home(tmp_path: Path, gateway) -> Path:
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(f'''model = "mock-model"
model_provider = "gateway"
approval_policy = "never"
sandbox_mode = "read-only"

[model_providers.gateway]
name = "inference gateway"
base_url = "{gateway.url}/v1"
wire_api = "responses"
env_key = "GATEWAY_API_KEY"
''')
    return home


@pytest.mark.parametrize("prompt, said", [
    ("get_goal", '"goal":null'),  # a function tool
    ("multi_agent_v1__close_agent nobody", "nobody"),  # a function in a namespace, called back by its namespace
])
@pytest_twisted.ensureDeferred
async def test_codex_calls_a_tool_through_the_gateway(agents, mock_gateway, tmp_path, prompt, said):
    code, output = await run_tool(tmp_path, tool("node", "nodejs"), str(agents / "@openai" / "codex" / "bin" /
                                                                        "codex.js"),
                                  "exec", "--skip-git-repo-check", prompt, env={
                                      "CODEX_HOME": str(codex_home(tmp_path, mock_gateway)),
                                      "GATEWAY_API_KEY": "gw-test-key", "HOME": str(tmp_path), **QUIET})
    assert code == 0, output
    answer = output.rsplit("The tool said:", 1)
    assert len(answer) == 2 and said in answer[1], output
    m = await mock_gateway.metrics()
    assert m.total("inference_request_duration_seconds_count", operation="responses", outcome="success") >= 2


def test_the_pinned_versions_are_the_ones_installed(agents):
    for package, version in (("@anthropic-ai/claude-code", "2.1.197"), ("@openai/codex", "0.171.0")):
        manifest = (agents / package / "package.json").read_text()
        assert f'"version": "{version}"' in manifest, package
    assert os.access(agents / "@openai" / "codex" / "bin" / "codex.js", os.R_OK)
