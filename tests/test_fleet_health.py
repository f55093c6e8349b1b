"""A fleet under faults, over sockets: one bad host slows no other, is left out in time and comes back (issue 20,
defects 2, 3, 7 and 8). The health rules themselves are driven on a Clock in test_health.py."""

from __future__ import annotations

import pytest_twisted

from inference.providers import fleet as fleet_module

from .conftest import call
from .fakes.lmstudio import FakeLMStudio
from .test_fleet import QWEN, chats, fleet_env, fleet_in_memory, hosts, ranked_first, turn  # noqa: F401 (a fixture)


def conversations_for(provider, index: int, count: int) -> list[dict]:
    """Conversations the ``index``-th host ranks first."""
    name = provider.hosts[index].view.name
    bodies = (turn(f"conversation {i}") for i in range(200))
    return [body for body in bodies if ranked_first(provider, body) == name][:count]


@pytest_twisted.ensureDeferred
async def test_a_host_whose_model_list_hangs_slows_no_call(hosts, start_gateway):  # noqa: F811
    gateway = start_gateway(fleet_env(hosts, INFERENCE_INFERENCE_MODELS_CACHE_SECS="0",
                                      INFERENCE_INFERENCE_ROUTING_PROBE_TIMEOUT_SECS="60"))
    provider = gateway.site.gateway.provider
    assert (await call("GET", gateway.url + "/v1/models")).status == 200
    frozen = hosts[2]
    frozen.listing.mode = "hang"  # its model list never answers (a SIGSTOPped process accepts, then says nothing)
    for i in range(6):  # each call refreshes the lists (models_cache_secs 0): none waits for the frozen host's
        assert (await gateway.post_chat(turn(f"call {i}"))).status == 200
    listed = await call("GET", gateway.url + "/v1/models")
    assert listed.status == 200 and {m["id"] for m in listed.json()["data"]} == {QWEN, "gemma-3-4b"}
    asked = [r for r in frozen.received if r.path == "/v1/models"]
    assert len(asked) == 2 and len(frozen.pending) == 1  # one probe at a time, still unanswered
    assert provider.hosts[2].health.state == "serving"  # no answer yet is not a failure


def test_a_host_that_accepts_calls_but_never_answers_is_left_out(hosts, in_memory):  # noqa: F811
    gateway, provider, name, mine = fleet_in_memory(in_memory, hosts, INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS="0.3")
    stuck = hosts[0]
    stuck.chat.mode = "hang"
    statuses = []
    for body in conversations_for(provider, 0, 6):
        reply = gateway.send("POST", "/v1/chat/completions", body)
        gateway.advance(0.3)
        statuses.append(gateway.result(reply).status)
    assert statuses == [504, 504, 504, 200, 200, 200]  # sent there: not re-run elsewhere
    assert len(chats(stuck)) == 3
    ready = gateway.call("GET", "/health/ready")
    assert ready.json()["hosts"][name] == "ejected"
    assert gateway.metrics().value("inference_upstream_ejections_total", upstream=name) == 1

def test_a_stream_cut_by_a_crashed_host_has_it_checked_at_once(hosts, in_memory):  # noqa: F811
    gateway, provider, name, mine = fleet_in_memory(in_memory, hosts)  # (no periodic check: only the cut tells)
    crashing = hosts[0]
    crashing.chat.stream = "stall"  # a few events, then it holds the stream
    streaming = gateway.send("POST", "/v1/chat/completions", {**mine[0], "stream": True})
    gateway.settle()
    assert crashing.pending  # its first events are sent
    gateway.upstreams["http://host0.test:1234"].stop()  # the process dies mid-answer
    reply = gateway.result(streaming)
    assert reply.status == 200 and b"error" in reply.body  # the stream had begun: it ends with an error
    assert provider.hosts[0].health.state == "down"
    assert gateway.call("GET", "/health/ready").json()["hosts"][name] == "down"

def test_a_freed_slot_wakes_one_waiting_call_and_calls_past_max_waiting_are_told_to_retry(in_memory, tmp_path,
                                                                                         monkeypatch):
    fakes = [FakeLMStudio([QWEN]), FakeLMStudio([QWEN])]  # two one-slot hosts that hold every call
    for fake in fakes:
        fake.chat.mode = "hang"
    urls = {f"http://slot{i}.test:1234": fake for i, fake in enumerate(fakes)}
    config = tmp_path / "fleet.yaml"
    config.write_text("inference:\n  routing: {max_waiting: 20}\n  upstreams:\n" + "".join(
        f'    - {{base_url: "{url}", max_concurrent: 1}}\n' for url in urls))
    gateway = in_memory({"INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"}, upstreams=urls, config_path=str(config))
    provider = gateway.gateway.provider
    assert gateway.call("GET", "/v1/models").status == 200
    calls = [gateway.send("POST", "/v1/chat/completions", turn(f"call {i}")) for i in range(22)]
    gateway.settle()
    assert provider.waiting() == 20 and all(fake.pending for fake in fakes)
    refused = gateway.post_chat(turn("one too many"))
    assert refused.status == 429 and refused.headers["retry-after"] == "1"
    assert refused.error["code"] == "overloaded" and "inference.routing.max_waiting" in refused.error["message"]

    picks: list[str] = []
    real_pick = fleet_module.pick
    monkeypatch.setattr(fleet_module, "pick", lambda *a: picks.append("pick") or real_pick(*a))
    fakes[0].release()  # one slot frees: one waiting call looks again, not twenty
    gateway.settle()
    assert provider.waiting() == 19 and len(fakes[0].pending) == 1 and len(picks) == 1
    assert [gateway.result(d).status for d in calls if gateway.answered(d)] == [200]
    for fake in fakes:  # hang no more: every call is answered, in turn
        fake.chat.mode = "normal"
        fake.release()
    assert all(gateway.result(d).status == 200 for d in calls)


def test_a_host_back_from_an_ejection_gets_one_call_at_a_time_until_it_answers(hosts, in_memory):  # noqa: F811
    gateway, provider, name, mine = fleet_in_memory(in_memory, hosts)
    host, health = hosts[0], provider.hosts[0].health
    host.chat.mode, host.chat.status = "error_object", 500
    for body in mine[:3]:
        assert gateway.post_chat(body).status == 200  # served elsewhere; three failures eject it
    assert health.state == "ejected"
    host.chat.mode = "hang"  # its model list answers; its calls take their time
    gateway.advance(5)
    assert health.state == "serving" and health.on_trial
    replies = [gateway.send("POST", "/v1/chat/completions", body) for body in mine[3:7]]
    gateway.settle()
    assert sum(gateway.answered(d) for d in replies) == 3  # the rest went elsewhere, at once
    assert len(host.pending) == 1  # its one trial call waits there
    host.chat.mode = "normal"
    host.release()
    assert [gateway.result(d).status for d in replies] == [200] * 4
    assert not health.on_trial  # proven: all its slots again
    host.chat.mode = "hang"
    more = [gateway.send("POST", "/v1/chat/completions", body) for body in mine[7:10]]
    gateway.settle()
    assert len(host.pending) == 3
    host.chat.mode = "normal"
    host.release()
    assert [gateway.result(d).status for d in more] == [200] * 3
