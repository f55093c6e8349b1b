"""Tenants' limits shared through a real Redis (issue 23): two gateway processes admit no more than the limit between
them, and a Redis that goes away leaves the gateway serving under per-process limits, saying so, until it is back.

A throwaway ``redis-server`` (Debian package redis-server; ``.ci/run`` installs it) on a free port."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from .conftest import ServerProcess, call, free_port, tool
from .test_daemon import TWISTD, spawn, stop
from .test_tenants import KEYS, MODEL, key_file, tenant

pytestmark = pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")

ALICE = {"Authorization": f"Bearer {KEYS['alice']}"}


class RedisServer:
    """``redis-server`` on ``port``, without persistence, started (and started again) and killed by the test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process = ServerProcess(b"Ready to accept connections")

    def start(self) -> Deferred[None]:
        self.process = ServerProcess(b"Ready to accept connections")
        reactor.spawnProcess(self.process, tool("redis-server", "redis-server"), [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            env={})
        return self.process.ready

    def kill(self) -> Deferred[None]:
        if not self.process.ended.called:
            self.process.transport.signalProcess("KILL")
        return self.process.ended


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(free_port())
    pytest_twisted.blockon(server.start())
    yield server
    pytest_twisted.blockon(server.kill())


async def _in_one_minute() -> None:
    """Start where the rest of the minute holds the test's calls (the limit's window is the UTC minute)."""
    left = 60 - time.time() % 60
    if left < 20:
        await deferLater(reactor, left + 0.1, lambda: None)


@pytest_twisted.ensureDeferred
async def test_two_gateway_processes_share_one_tenants_limit_exactly(fake, redis, tmp_path):
    keys = key_file(tmp_path, tenant("alice", limits={"requests_per_minute": 5}))
    env = {"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_API_KEYS_FILE": keys,
           "INFERENCE_INFERENCE_LIMITS_STORE": f"redis://127.0.0.1:{redis.port}/0",
           "INFERENCE_INFERENCE_LIMITS_EXPECTED_PROCESSES": "2"}
    daemons = [spawn(["--listen", "tcp:0:interface=127.0.0.1"], env, str(tmp_path)) for _ in range(2)]
    try:
        urls = [f"http://127.0.0.1:{await daemon.port()}" for daemon, _ in daemons]
        await _in_one_minute()
        statuses = []
        for n in range(8):
            reply = await call("POST", urls[n % 2] + "/v1/chat/completions", {
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, headers=ALICE)
            statuses.append((reply.status, reply.header("x-ratelimit-remaining-requests")))
        assert [s for s, _ in statuses] == [200] * 5 + [429] * 3  # 5 across both, not 5 each (nor 2.5 each)
        assert [r for _, r in statuses[:5]] == ["4", "3", "2", "1", "0"]
    finally:
        for daemon, transport in daemons:
            await stop(daemon, transport)


@pytest_twisted.ensureDeferred
async def test_when_redis_goes_away_calls_keep_flowing_under_per_process_limits(fake, redis, start_gateway,
                                                                               tmp_path, access_events):
    keys = key_file(tmp_path, tenant("alice", limits={"requests_per_minute": 100, "concurrent": 10}))
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_API_KEYS_FILE": keys,
                             "INFERENCE_INFERENCE_LIMITS_STORE": f"redis://127.0.0.1:{redis.port}/0",
                             "INFERENCE_INFERENCE_LIMITS_EXPECTED_PROCESSES": "4"})
    await _in_one_minute()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    first = await call("POST", gateway.url + "/v1/chat/completions", body, headers=ALICE)
    assert first.status == 200 and first.header("x-ratelimit-remaining-requests") == "99"
    assert (await gateway.metrics()).value("inference_limits_store_up", store="redis") == 1
    await redis.kill()
    statuses = [(await call("POST", gateway.url + "/v1/chat/completions", body, headers=ALICE)).status
                for _ in range(27)]
    assert statuses == [200] * 25 + [429] * 2  # 100 / 4 processes, counted here alone
    assert (await gateway.metrics()).value("inference_limits_store_up", store="redis") == 0
    await redis.start()
    store = gateway.site.gateway.quota.store
    for _ in range(100):  # it looks again every 2 s (PROBE_SECS); nothing to wait on from outside but its state
        if store.up:
            break
        await deferLater(reactor, 0.1, lambda: None)
    assert (await gateway.metrics()).value("inference_limits_store_up", store="redis") == 1
    again = await call("POST", gateway.url + "/v1/chat/completions", body, headers=ALICE)
    assert again.status == 200 and again.header("x-ratelimit-remaining-requests") == "99"  # a new Redis: counted anew
