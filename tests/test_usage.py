"""The usage ledger (issue 23): a row per call in SQLite, written off the reactor thread; ``/v1/usage`` and
``inference usage`` read it; it survives a restart, keeps its days, and a store that cannot be written never fails
a call. Real threads (adbapi) and a real SQLite file."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest_twisted
from twisted.internet.task import Clock

from .conftest import call
from .test_tenants import KEYS, MODEL, key_file, tenant


def _env(fake, tmp_path, **extra: str) -> dict[str, str]:
    keys = key_file(tmp_path, tenant("alice", models=["qwen*"]), tenant("bob", limits={"requests_per_minute": 2}),
                    tenant("ops", operator=True))
    return {"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_API_KEYS_FILE": keys,
            "INFERENCE_INFERENCE_USAGE_STORE": f"sqlite:///{tmp_path}/state/usage.db", **extra}


def _as(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


async def _calls(gateway) -> list[int]:
    # Bob's two requests a minute are counted in fixed minutes: the limits' clock is held in the middle of this one,
    # or a minute that ended between his calls would give him a third (it did, once, on a busy machine).
    held = Clock()
    held.advance(time.time() // 60 * 60 + 30)
    gateway.site.gateway.quota._clock = held
    statuses = []
    for who, body in (("alice", {"model": MODEL}), ("alice", {"model": MODEL, "stream": True}),
                      ("alice", {"model": "llama"}), ("bob", {"model": MODEL}), ("bob", {"model": MODEL}),
                      ("bob", {"model": MODEL})):
        reply = await call("POST", gateway.url + "/v1/chat/completions",
                           {**body, "messages": [{"role": "user", "content": "count me"}]}, headers=_as(who))
        statuses.append(reply.status)
    return statuses


@pytest_twisted.ensureDeferred
async def test_usage_sums_equal_the_metrics_and_only_operators_read_them(fake, start_gateway, tmp_path):
    gateway = start_gateway(_env(fake, tmp_path))
    assert await _calls(gateway) == [200, 200, 404, 200, 200, 429]
    reply = await call("GET", gateway.url + "/v1/usage?group_by=tenant,status&from=1d", headers=_as("ops"))
    assert reply.status == 200, reply.body
    rows = {(r["tenant"], r["status"]): r for r in reply.json()["data"]}
    assert {key: r["requests"] for key, r in rows.items()} == {
        ("alice", 200): 2, ("alice", 404): 1, ("bob", 200): 2, ("bob", 429): 1}
    scrape = await gateway.metrics()
    for (who, status), row in rows.items():
        model = "none" if status == 404 else MODEL
        assert scrape.value("inference_tenant_requests_total", tenant=who, model=model, operation="chat",
                            status=str(status)) == row["requests"]
    for who in ("alice", "bob"):
        for kind in ("input", "output"):
            metric = scrape.value("inference_tenant_tokens_total", tenant=who, model=MODEL, type=kind)
            assert sum(r[f"{kind}_tokens"] for (t, _), r in rows.items() if t == who) == metric > 0
    assert (await call("GET", gateway.url + "/v1/usage", headers=_as("alice"))).status == 403
    assert (await call("GET", gateway.url + "/v1/usage")).status == 401
    bad = await call("GET", gateway.url + "/v1/usage?group_by=tenant,colour", headers=_as("ops"))
    assert bad.status == 400 and bad.json()["error"]["param"] == "group_by"
    bad = await call("GET", gateway.url + "/v1/usage?from=yesterday", headers=_as("ops"))
    assert bad.status == 400 and bad.json()["error"]["param"] == "from"
    rows = sqlite3.connect(tmp_path / "state" / "usage.db").execute("SELECT * FROM inference_usage").fetchall()
    stored = repr(rows)
    assert len(rows) == 6 and "count me" not in stored and not any(key in stored for key in KEYS.values())


@pytest_twisted.ensureDeferred
async def test_the_ledger_survives_a_restart_and_the_command_line_reads_it(fake, start_gateway, tmp_path):
    path = tmp_path / "state" / "usage.db"
    path.parent.mkdir()
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE inference_usage (at DOUBLE PRECISION NOT NULL, tenant TEXT NOT NULL, key_id TEXT, "
                "model TEXT, host TEXT, operation TEXT, status INTEGER, input_tokens INTEGER, output_tokens INTEGER, "
                "ttft_ms DOUBLE PRECISION, duration_ms DOUBLE PRECISION)")
    old.execute("INSERT INTO inference_usage VALUES (?, 'alice', NULL, 'm', 'h', 'chat', 200, 1, 1, NULL, 1)",
                (time.time() - 100 * 86400,))  # older than the 90 days kept
    old.commit()
    old.close()
    first = start_gateway(_env(fake, tmp_path))
    assert await _calls(first) == [200, 200, 404, 200, 200, 429]
    await first.site.gateway.close()  # (its last rows are written as it stops)
    second = start_gateway(_env(fake, tmp_path))
    reply = await call("GET", second.url + "/v1/usage?group_by=tenant&from=1000d", headers=_as("ops"))
    assert {r["tenant"]: r["requests"] for r in reply.json()["data"]} == {"alice": 3, "bob": 3}  # the old row: gone
    shown = subprocess.run([sys.executable, "-m", "inference", "usage", "--since", "1d", "--group-by", "tenant",
                            "--store", f"sqlite:///{path}"], capture_output=True, text=True, check=True).stdout
    lines = shown.splitlines()
    assert lines[1].split() == ["tenant", "requests", "errors", "input_tokens", "output_tokens"]
    assert [line.split()[:3] for line in lines[2:]] == [["alice", "3", "1"], ["bob", "3", "1"]]


@pytest_twisted.ensureDeferred
async def test_a_store_that_cannot_be_written_never_fails_a_call_and_drops_past_its_bound(fake, start_gateway,
                                                                                        tmp_path):
    (tmp_path / "state" / "usage.db").mkdir(parents=True)  # a folder where the database should be
    gateway = start_gateway(_env(fake, tmp_path, INFERENCE_INFERENCE_USAGE_MAX_BUFFERED_ROWS="2"))
    assert await _calls(gateway) == [200, 200, 404, 200, 200, 429]
    await gateway.site.gateway.telemetry.ledger.flush()
    scrape = await gateway.metrics()
    assert scrape.value("inference_usage_rows_dropped_total") == 4  # six rows, two kept for a later write
    assert gateway.site.gateway.telemetry.ledger.buffered == 2
