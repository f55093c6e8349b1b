"""Who may call the gateway: API keys (list, environment, file, reload), protected metrics, CORS."""

from __future__ import annotations

import signal

import pytest
import pytest_twisted

from .conftest import call, free_port
from .test_daemon import spawn, stop

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
FAKE_CHAT = {"model": "qwen2.5-7b-instruct", **CHAT}
OPERATOR_ROUTES = ["/metrics", "/health", "/health/live", "/health/ready"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest_twisted.ensureDeferred
async def test_keys_from_a_file_with_comments_and_from_the_list_both_work(tmp_path, fake, start_gateway):
    keys = tmp_path / "api-keys"
    keys.write_text("# team A\nkey-from-file-1\n\n   key-from-file-2  \n")
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_API_KEYS": "listed",
                             "INFERENCE_SERVER_API_KEYS_FILE": str(keys)})
    for key in ("key-from-file-1", "key-from-file-2", "listed"):
        assert (await gateway.post_chat(FAKE_CHAT, headers=bearer(key))).status == 200, key
    for key in ("# team A", "team", ""):
        reply = await gateway.post_chat(FAKE_CHAT, headers=bearer(key))
        assert reply.status == 401 and reply.error["code"] == "invalid_api_key"
        assert reply.header("WWW-Authenticate") == 'Bearer realm="inference"'


@pytest_twisted.ensureDeferred
async def test_metrics_and_health_are_open_unless_protected(fake, start_gateway):
    env = {"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_API_KEYS": "secret-key"}
    open_gateway = start_gateway(env)
    for path in OPERATOR_ROUTES:
        assert (await call("GET", open_gateway.url + path)).status == 200, path
    assert (await call("GET", open_gateway.url + "/v1/models")).status == 401

    protected = start_gateway({**env, "INFERENCE_SERVER_PROTECT_METRICS": "true"})
    for path in OPERATOR_ROUTES:
        reply = await call("GET", protected.url + path)
        assert reply.status == 401 and reply.error["type"] == "authentication_error", path
        assert (await call("GET", protected.url + path, headers=bearer("secret-key"))).status == 200, path
    assert b"inference_" not in (await call("GET", protected.url + "/metrics")).body


@pytest.mark.daemon
@pytest_twisted.ensureDeferred
async def test_sighup_rereads_the_key_file_and_a_broken_file_keeps_the_old_keys(tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("old-key\n")
    daemon, transport = spawn(["--listen", "tcp:0:interface=127.0.0.1"],
                              {"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_SERVER_API_KEYS_FILE": str(keys)},
                              str(tmp_path))
    try:
        url = f"http://127.0.0.1:{await daemon.port()}/v1/chat/completions"
        assert (await call("POST", url, CHAT, headers=bearer("old-key"))).status == 200
        assert (await call("POST", url, CHAT, headers=bearer("new-key"))).status == 401

        async def reload(text: str, logged: bytes) -> None:
            keys.write_text(text)
            said = daemon.said(logged)
            transport.signalProcess(signal.SIGHUP)
            await said

        await reload("new-key\n", b"API keys reloaded from")
        assert (await call("POST", url, CHAT, headers=bearer("new-key"))).status == 200
        assert (await call("POST", url, CHAT, headers=bearer("old-key"))).status == 401

        await reload("# nothing here\n", b"holds no key")
        assert (await call("POST", url, CHAT, headers=bearer("new-key"))).status == 200
    finally:
        assert await stop(daemon, transport)
    assert b"new-key" not in daemon.out + daemon.err and b"old-key" not in daemon.out + daemon.err


@pytest.mark.daemon
@pytest_twisted.ensureDeferred
async def test_an_unreadable_key_file_stops_the_daemon_with_one_line(tmp_path):
    daemon, _ = spawn([], {"INFERENCE_INFERENCE_PROVIDER": "mock",
                           "INFERENCE_SERVER_API_KEYS_FILE": str(tmp_path / "missing")}, str(tmp_path))
    assert await daemon.ended == 2
    lines = daemon.err.decode().strip().splitlines()
    assert lines == [f"inference: config error: server.api_keys_file: cannot read {tmp_path / 'missing'}: "
                     "No such file or directory"], daemon.err


@pytest.mark.daemon
@pytest_twisted.ensureDeferred
async def test_a_separate_metrics_port_is_protected_too(tmp_path):
    metrics_port = free_port()
    daemon, transport = spawn(["--listen", "tcp:0:interface=127.0.0.1"],
                              {"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_SERVER_API_KEYS": "k",
                               "INFERENCE_SERVER_PROTECT_METRICS": "1",
                               "INFERENCE_OBSERVABILITY_METRICS_PORT": str(metrics_port)}, str(tmp_path))
    try:
        await daemon.port()
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert (await call("GET", url)).status == 401
        assert (await call("GET", url, headers=bearer("k"))).status == 200
    finally:
        assert await stop(daemon, transport)


@pytest_twisted.ensureDeferred
async def test_cors_is_off_unless_origins_are_listed(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url})
    reply = await gateway.post_chat(FAKE_CHAT, headers={"Origin": "https://app.example.com"})
    assert reply.status == 200 and reply.header("Access-Control-Allow-Origin") is None
    preflight = await call("OPTIONS", gateway.url + "/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status == 405 and preflight.header("Access-Control-Allow-Origin") is None


PREFLIGHT = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


@pytest_twisted.ensureDeferred
async def test_a_listed_origin_gets_its_preflight_and_its_answers_marked(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_API_KEYS": "k",
                             "INFERENCE_SERVER_CORS_ORIGINS": "https://App.Example.com/,http://localhost:5173"})
    preflight = await call("OPTIONS", gateway.url + "/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status == 204 and preflight.body == b""  # no key needed: browsers never send one here
    assert preflight.header("Access-Control-Allow-Origin") == "https://app.example.com"
    assert preflight.header("Access-Control-Allow-Methods") == "GET, POST, OPTIONS"
    assert preflight.header("Access-Control-Allow-Headers") == "authorization, content-type, x-stainless-os"
    assert preflight.header("Vary") == "Origin" and int(preflight.header("Access-Control-Max-Age")) > 0

    headers = {"Origin": "http://localhost:5173", **bearer("k")}
    reply = await gateway.post_chat({**FAKE_CHAT, "stream": True}, headers=headers)
    assert reply.status == 200 and reply.body.endswith(b"data: [DONE]\n\n")
    assert reply.header("Access-Control-Allow-Origin") == "http://localhost:5173"
    assert "X-Request-ID" in reply.header("Access-Control-Expose-Headers")
    denied = await gateway.post_chat(FAKE_CHAT, headers={"Origin": "http://localhost:5173"})
    assert denied.status == 401 and denied.header("Access-Control-Allow-Origin") == "http://localhost:5173"


@pytest_twisted.ensureDeferred
async def test_an_unlisted_origin_is_told_which_setting_to_change(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_SERVER_CORS_ORIGINS": "https://app.example.com"})
    evil = {**PREFLIGHT, "Origin": "https://evil.example.net"}
    preflight = await call("OPTIONS", gateway.url + "/v1/chat/completions", headers=evil)
    assert preflight.status == 403 and preflight.error["code"] == "origin_not_allowed"
    assert "server.cors_origins" in preflight.error["message"]
    assert preflight.header("Access-Control-Allow-Origin") is None
    reply = await gateway.post_chat(FAKE_CHAT, headers={"Origin": "https://evil.example.net"})
    assert reply.status == 200 and reply.header("Access-Control-Allow-Origin") is None


@pytest_twisted.ensureDeferred
async def test_any_origin_with_a_star(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_CORS_ORIGINS": "*"})
    preflight = await call("OPTIONS", gateway.url + "/v1/models", headers={**PREFLIGHT, "Origin": "null"})
    assert preflight.status == 204 and preflight.header("Access-Control-Allow-Origin") == "*"
