"""Teams sharing a gateway (issue 23): tenants from the key file, the models each may use, its limits answered the
way OpenAI's and Anthropic's APIs answer them, the fair order of waiting calls, and what is recorded of whom.

All in memory on a fake clock (tests/memory.py): a minute's window passes with ``advance(60)``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from inference.tenants import key_hash

MODEL, OTHER = "qwen2.5-7b-instruct", "llama-3.2-3b-instruct"
KEYS = {"alice": "sk-alice-secret-1", "bob": "sk-bob-secret-2", "ops": "sk-ops-secret-3"}


def tenant(name: str, **extra: object) -> dict[str, object]:
    return {"name": name, "keys": [key_hash(KEYS[name].encode())], **extra}


def key_file(tmp_path: Path, *tenants: dict[str, object]) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"tenants": list(tenants)}))
    return str(path)


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def chat(model: str = MODEL, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


@pytest.fixture
def tenants_gateway(in_memory, tmp_path):
    def make(*tenants: dict[str, object], **env: str):
        return in_memory({"INFERENCE_SERVER_API_KEYS_FILE": key_file(tmp_path, *tenants), **env})
    return make


# -- who calls, and what it may use ---------------------------------------------------------------------------

def test_a_tenant_sees_and_uses_only_its_models(tenants_gateway):
    gateway = tenants_gateway(tenant("alice", models=["qwen*"]), tenant("bob"))
    listed = gateway.call("GET", "/v1/models", headers=as_("alice")).json()
    assert [m["id"] for m in listed["data"]] == [MODEL]
    assert {m["id"] for m in gateway.call("GET", "/v1/models", headers=as_("bob")).json()["data"]} == {MODEL, OTHER}
    assert gateway.post_chat(chat(), as_("alice")).status == 200
    refused = gateway.post_chat(chat(OTHER), as_("alice"))
    assert refused.status == 404 and refused.error["code"] == "model_not_found"
    assert "does not exist" in refused.error["message"] and OTHER not in refused.error["message"].split(":")[-1]
    assert gateway.call("GET", f"/v1/models/{OTHER}", headers=as_("alice")).status == 404
    assert gateway.post_chat(chat(OTHER), as_("bob")).status == 200
    assert gateway.post_chat(chat(), {"Authorization": "Bearer sk-nobody"}).status == 401


def test_logs_spans_and_metrics_name_the_tenant_and_never_the_key(tenants_gateway, access_events):
    gateway = tenants_gateway(tenant("alice"), tenant("bob"))
    assert gateway.post_chat(chat(), as_("alice")).status == 200
    assert gateway.post_chat(chat(), as_("bob")).status == 200
    assert gateway.post_chat(chat("no-such-model"), as_("bob")).status == 404
    lines = [e for e in access_events if e.get("route") == "/v1/chat/completions"]
    assert [(e["tenant"], e["status"]) for e in lines] == [("alice", 200), ("bob", 200), ("bob", 404)]
    assert lines[0]["key_id"] == "key_" + key_hash(KEYS["alice"].encode())[7:15]
    m = gateway.metrics()
    assert m.value("inference_tenant_requests_total", tenant="alice", model=MODEL, operation="chat",
                   status="200") == 1
    assert m.value("inference_tenant_requests_total", tenant="bob", model="none", operation="chat",
                   status="404") == 1
    assert m.value("inference_tenant_tokens_total", tenant="alice", model=MODEL, type="output") > 0
    everything = json.dumps([{k: str(v) for k, v in e.items()} for e in access_events]) + m.text
    assert not any(key in everything for key in KEYS.values())


def test_a_plain_key_file_is_one_default_tenant_without_limits(in_memory, tmp_path, access_events):
    path = tmp_path / "keys.txt"
    path.write_text("# the team's key\nsk-plain-1\n")
    gateway = in_memory({"INFERENCE_SERVER_API_KEYS_FILE": str(path)})
    reply = gateway.post_chat(chat(), {"Authorization": "Bearer sk-plain-1"})
    assert reply.status == 200 and "x-ratelimit-limit-requests" not in reply.headers
    assert access_events[-1]["tenant"] == "default"


@pytest.mark.parametrize("entry, says", [
    ({"name": "a", "keys": ["sk-plain"]}, "sha256:<64 hex digits>"),
    ({"name": "a", "priority": "urgent"}, "one of critical, standard, sheddable"),
    ({"name": "a", "limits": {"requests_per_hour": 5}}, "unknown limit(s) requests_per_hour"),
    ({"name": "a", "limits": {"tokens_per_minute": 0}}, "limits.tokens_per_minute must be a whole number >= 1"),
    ({"name": "a b"}, "'name' must be letters"),
])
def test_a_wrong_tenant_stops_the_gateway_with_one_line(tmp_path, entry, says):
    from inference.auth import ApiKeys
    from inference.config import ConfigError
    with pytest.raises(ConfigError) as raised:
        ApiKeys([], key_file(tmp_path, entry))
    assert says in str(raised.value) and "\n" not in str(raised.value)


# -- limits ----------------------------------------------------------------------------------------------------

def test_requests_per_minute_are_answered_like_openai(tenants_gateway):
    gateway = tenants_gateway(tenant("alice", limits={"requests_per_minute": 2}), tenant("bob"))
    gateway.advance(15)  # 45 s before the minute's window ends
    first, second = gateway.post_chat(chat(), as_("alice")), gateway.post_chat(chat(), as_("alice"))
    assert (first.status, second.status) == (200, 200)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert [first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]] == \
        ["1", "0"]
    assert first.headers["x-ratelimit-reset-requests"] == "45s"
    refused = gateway.post_chat(chat(), as_("alice"))
    assert refused.status == 429 and refused.error["code"] == "rate_limit_exceeded"
    assert refused.error["type"] == "rate_limit_error" and "requests per minute" in refused.error["message"]
    assert refused.headers["retry-after"] == "45" and refused.headers["retry-after-ms"] == "45000"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0" and "x-should-retry" not in refused.headers
    bob = gateway.post_chat(chat(), as_("bob"))
    assert bob.status == 200 and "x-ratelimit-limit-requests" not in bob.headers  # not limited: no headers
    gateway.advance(45)
    assert gateway.post_chat(chat(), as_("alice")).status == 200  # a new minute


def test_tokens_are_counted_when_a_call_ends_and_a_day_limit_tells_sdks_not_to_retry(tenants_gateway):
    gateway = tenants_gateway(tenant("alice", limits={"tokens_per_minute": 5}),
                              tenant("bob", limits={"tokens_per_day": 5}))
    for who, header in (("alice", "x-ratelimit-remaining-tokens"), ("bob", "x-ratelimit-remaining-tokens")):
        first = gateway.post_chat(chat(), as_(who))
        assert first.status == 200 and first.headers[header] == "5"  # counted when it ends
        used = first.json()["usage"]["total_tokens"]
        assert used >= 5
        refused = gateway.post_chat(chat(), as_(who))
        assert refused.status == 429 and refused.headers[header] == "0"
    assert refused.headers["x-should-retry"] == "false" and int(refused.headers["retry-after"]) > 60
    assert "tokens per day" in refused.error["message"]
    gateway.advance(60)
    assert gateway.post_chat(chat(), as_("alice")).status == 200  # its minute's tokens are reset
    assert gateway.post_chat(chat(), as_("bob")).status == 429  # the day's are not


def test_concurrent_calls_over_the_limit_are_refused_until_one_ends(tenants_gateway, fake):
    gateway = tenants_gateway(tenant("alice", limits={"concurrent": 1}))
    fake.chat.mode = "hang"
    held = gateway.send("POST", "/v1/chat/completions", chat(), as_("alice"))
    gateway.settle()
    refused = gateway.post_chat(chat(), as_("alice"))
    assert refused.status == 429 and refused.headers["retry-after"] == "1"
    assert "calls at once" in refused.error["message"]
    fake.chat.mode = "normal"
    fake.release()
    assert gateway.result(held).status == 200
    assert gateway.post_chat(chat(), as_("alice")).status == 200


def test_messages_get_anthropics_headers_and_error_shape(tenants_gateway):
    gateway = tenants_gateway(tenant("alice", limits={"requests_per_minute": 1, "tokens_per_minute": 1000}))
    body = {"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    key = {"x-api-key": KEYS["alice"], "anthropic-version": "2023-06-01"}
    ok = gateway.call("POST", "/v1/messages", body, key)
    assert ok.status == 200 and ok.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert ok.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert ok.headers["anthropic-ratelimit-requests-reset"] == "1970-01-01T00:01:00Z"
    assert ok.headers["anthropic-ratelimit-tokens-limit"] == "1000" and "x-ratelimit-limit-requests" not in ok.headers
    refused = gateway.call("POST", "/v1/messages", body, key)
    assert refused.status == 429 and refused.json()["type"] == "error"
    assert refused.json()["error"]["type"] == "rate_limit_error" and refused.headers["retry-after"] == "60"


def test_a_429s_status_line_says_too_many_requests(tenants_gateway):
    from .conftest import raw_post
    gateway = tenants_gateway(tenant("alice", limits={"requests_per_minute": 1}))
    assert gateway.post_chat(chat(), as_("alice")).status == 200
    client, send = gateway.raw()
    request = raw_post("/v1/chat/completions", json.dumps(chat()).encode())
    send(request.replace(b"\r\n", b"\r\nAuthorization: Bearer " + KEYS["alice"].encode() + b"\r\n", 1))
    gateway.settle()
    assert client.data.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")  # (Twisted alone: "429 Unknown Status")


def test_a_reload_changes_a_tenants_limits(tenants_gateway, tmp_path):
    gateway = tenants_gateway(tenant("alice", limits={"requests_per_minute": 1}))
    assert gateway.post_chat(chat(), as_("alice")).status == 200
    assert gateway.post_chat(chat(), as_("alice")).status == 429
    key_file(tmp_path, tenant("alice", limits={"requests_per_minute": 5}))
    gateway.gateway.keys.reload()
    assert gateway.post_chat(chat(), as_("alice")).status == 200


# -- fair order ------------------------------------------------------------------------------------------------

def test_a_freed_slot_goes_to_the_tenant_that_waited_least_not_to_the_longest_queue(tenants_gateway, fake):
    gateway = tenants_gateway(tenant("alice"), tenant("bob"), tenant("ops", priority="critical"),
                              INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS="1")
    fake.chat.mode = "hang"
    order: list[str] = []
    calls = [gateway.send("POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": f"a{i}"}]),
                          as_("alice")) for i in range(4)]
    gateway.settle()
    calls.append(gateway.send("POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "b0"}]),
                              as_("bob")))
    calls.append(gateway.send("POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "o0"}]),
                              as_("ops")))
    gateway.settle()
    assert gateway.gateway.admission.queued == 5
    for _ in range(6):
        gateway.settle()
        order.append(json.loads(fake.pending[0].content.getvalue())["messages"][0]["content"])
        fake.release(1)
    gateway.settle()
    assert all(gateway.result(d).status == 200 for d in calls)
    assert order == ["a0", "o0", "b0", "a1", "a2", "a3"]  # the critical tenant first, then bob before alice's rest


def test_a_fleets_wait_for_a_slot_is_fair_too(in_memory, tmp_path):
    from .fakes.lmstudio import FakeLMStudio
    hosts = {f"http://host{i}.test:1234": FakeLMStudio([MODEL]) for i in range(2)}
    config = tmp_path / "fleet.yaml"
    config.write_text("server:\n  api_keys_file: " + key_file(tmp_path, tenant("alice"), tenant("bob")) +
                      "\ninference:\n  upstreams:\n" + "".join(
                          f'    - {{name: h{i}, base_url: "{url}", max_concurrent: 1}}\n'
                          for i, url in enumerate(hosts)))
    gateway = in_memory(upstreams=hosts, config_path=str(config))
    for host in hosts.values():
        host.chat.mode = "hang"
    said = [gateway.send("POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": f"a{i}"}]),
                         as_("alice")) for i in range(4)]
    gateway.settle()
    said.append(gateway.send("POST", "/v1/chat/completions",
                             chat(messages=[{"role": "user", "content": "b0"}]), as_("bob")))
    gateway.settle()
    assert gateway.gateway.provider.waiting() == 3

    def running() -> list[str]:
        return [json.loads(r.content.getvalue())["messages"][0]["content"] for h in hosts.values() for r in h.pending]

    order = sorted(running())  # a0 and a1 hold the two slots
    for _ in range(3):  # one slot frees at a time: who runs next?
        next(h for h in hosts.values() if h.pending).release(1)
        gateway.settle()
        order += [said for said in running() if said not in order]
    for host in hosts.values():
        host.chat.mode = "normal"
        host.release()
    gateway.settle()
    assert all(gateway.result(d).status == 200 for d in said)
    assert order == ["a0", "a1", "b0", "a2", "a3"]  # bob's one call before alice's queue (FIFO: a2, a3, b0)


def test_past_shed_above_sheddable_calls_are_refused_and_a_full_queue_sheds_them_first(tenants_gateway, fake):
    gateway = tenants_gateway(tenant("alice", priority="sheddable"), tenant("bob"),
                              INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS="1", INFERENCE_INFERENCE_MAX_QUEUE="3",
                              INFERENCE_INFERENCE_SHED_ABOVE="2")
    fake.chat.mode = "hang"
    running = gateway.send("POST", "/v1/chat/completions", chat(), as_("bob"))
    waiting = [gateway.send("POST", "/v1/chat/completions", chat(), as_("alice")) for _ in range(2)]
    gateway.settle()
    shed = gateway.post_chat(chat(), as_("alice"))  # a third sheddable call: past shed_above
    assert shed.status == 429 and "sheddable" in shed.error["message"] and shed.headers["retry-after"] == "1"
    bob = [gateway.send("POST", "/v1/chat/completions", chat(), as_("bob")) for _ in range(2)]
    gateway.settle()  # the queue is full (3): bob's second takes the place of alice's last
    assert gateway.answered(waiting[1]) and gateway.result(waiting[1]).status == 429
    assert not gateway.answered(waiting[0])
    fake.chat.mode = "normal"
    fake.release()
    for _ in range(4):
        gateway.settle()
        fake.release()
    assert [gateway.result(d).status for d in (running, waiting[0], *bob)] == [200, 200, 200, 200]


# -- keys add --------------------------------------------------------------------------------------------------

def test_keys_add_prints_a_key_once_and_the_file_holds_only_its_hash(tmp_path, in_memory):
    path = tmp_path / "keys.yaml"
    made = subprocess.run([sys.executable, "-m", "inference", "keys", "add", "research", "--file", str(path)],
                          capture_output=True, text=True, check=True)
    key = made.stdout.strip()
    assert key.startswith("sk-inf-") and len(key) > 40 and key not in path.read_text()
    assert "shown only now" in made.stderr and key_hash(key.encode()) in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    gateway = in_memory({"INFERENCE_SERVER_API_KEYS_FILE": str(path)})
    assert gateway.post_chat(chat(), {"Authorization": f"Bearer {key}"}).status == 200
    plain = tmp_path / "plain.txt"
    plain.write_text("sk-plain\n")
    refused = subprocess.run([sys.executable, "-m", "inference", "keys", "add", "x", "--file", str(plain)],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "plain keys" in refused.stderr and plain.read_text() == "sk-plain\n"
