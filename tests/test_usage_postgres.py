"""Several gateways, one usage ledger in a real PostgreSQL (issue 23): a throwaway cluster (Debian package
postgresql; ``.ci/run`` installs it), run as the ``postgres`` user when the tests run as root."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor

from .conftest import ServerProcess, call, free_port
from .test_usage import _as, _calls, _env

pytestmark = pytest.mark.daemon


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        if os.environ.get("INFERENCE_REQUIRE_TOOLS") == "1":
            pytest.fail("PostgreSQL is required (INFERENCE_REQUIRE_TOOLS=1) but not installed (Debian: postgresql)")
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    return found[-1]


def _as_postgres(command: list[str]) -> list[str]:
    """Run as the postgres user when root (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres():
    initdb, server = _bin("initdb"), _bin("postgres")
    folder = tempfile.mkdtemp(prefix="inference-pg-")
    os.chmod(folder, 0o755)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = os.path.join(folder, "data"), free_port()
    subprocess.run(_as_postgres([initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"]), check=True,
                   capture_output=True)
    process = ServerProcess(b"ready to accept connections")
    command = _as_postgres([server, "-D", data, "-p", str(port), "-k", folder, "-c", "listen_addresses=127.0.0.1",
                            "-c", "fsync=off"])
    reactor.spawnProcess(process, command[0], command, env={})
    try:
        pytest_twisted.blockon(process.ready)
        admin = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE ledger")
        admin.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/ledger"
    finally:
        if not process.ended.called:  # (a signal would reach runuser, not the server; clients may still be on)
            subprocess.run(_as_postgres([_bin("pg_ctl"), "stop", "-D", data, "-m", "immediate"]), check=True,
                           capture_output=True)
            pytest_twisted.blockon(process.ended)
        shutil.rmtree(folder, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_two_gateways_write_one_postgres_ledger_and_it_sums_what_both_counted(fake, start_gateway, tmp_path,
                                                                                   postgres):
    gateways = [start_gateway(_env(fake, tmp_path, INFERENCE_INFERENCE_USAGE_STORE=postgres)) for _ in range(2)]
    for gateway in gateways:
        assert await _calls(gateway) == [200, 200, 404, 200, 200, 429]
    for gateway in gateways:
        await gateway.site.gateway.telemetry.ledger.flush()
    reply = await call("GET", gateways[0].url + "/v1/usage?group_by=tenant,day", headers=_as("ops"))
    assert reply.status == 200, reply.body
    rows = {r["tenant"]: r for r in reply.json()["data"]}
    assert {name: row["requests"] for name, row in rows.items()} == {"alice": 6, "bob": 6}
    for name in ("alice", "bob"):
        counted = 0.0
        for gateway in gateways:
            counted += (await gateway.metrics()).value("inference_tenant_tokens_total", tenant=name,
                                                       model="qwen2.5-7b-instruct", type="output") or 0
        assert rows[name]["output_tokens"] == counted > 0
    shown = subprocess.run([sys.executable, "-m", "inference", "usage", "--group-by", "tenant", "--store", postgres],
                           capture_output=True, text=True, check=True).stdout
    assert [line.split()[:2] for line in shown.splitlines()[2:]] == [["alice", "6"], ["bob", "6"]]
