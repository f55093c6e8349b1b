"""Several fake LM Studio hosts behind one gateway: their models together, conversations kept on one host,
failover before the first byte and never after it, slots per host."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import globalLogPublisher

from inference.operations import CHAT
from inference.routing.conversation import conversation_key
from inference.routing.rendezvous import rank

from .conftest import call, named_events, scrape, until
from .fakes.lmstudio import FakeLMStudio
from .test_daemon import TWISTD, spawn, stop
from .test_tracing import collector  # noqa: F401 (a fixture)

QWEN = "qwen2.5-7b-instruct"


@pytest.fixture
def hosts():
    fakes = [FakeLMStudio([QWEN]), FakeLMStudio([QWEN]), FakeLMStudio([QWEN, "gemma-3-4b"])]
    for fake in fakes:
        fake.listen()
    yield fakes
    pytest_twisted.blockon(DeferredList([fake.stop() for fake in fakes if fake.port.connected]))


def fleet_env(hosts, **more: str) -> dict[str, str]:
    return {"INFERENCE_INFERENCE_UPSTREAMS": ",".join(fake.url for fake in hosts),
            "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0", **more}


def chats(fake: FakeLMStudio) -> list:
    return [r for r in fake.received if r.path == "/v1/chat/completions"]


def turn(*said: str, model: str = QWEN, **extra) -> dict:
    messages = [{"role": "system", "content": "Be brief."}]
    for i, text in enumerate(said):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": model, "messages": messages, **extra}


@pytest_twisted.ensureDeferred
async def test_the_models_of_every_host_are_served_together(hosts, start_gateway):
    gateway = start_gateway(fleet_env(hosts))
    listed = (await call("GET", gateway.url + "/v1/models")).json()["data"]
    assert sorted(m["id"] for m in listed) == ["gemma-3-4b", QWEN]  # each once
    ports = [fake.port.getHost().port for fake in hosts]
    gemma = next(m for m in listed if m["id"] == "gemma-3-4b")
    assert gemma["hosts"] == [{"name": f"127.0.0.1:{ports[2]}"}]  # (this fake says nothing more of it)
    for _ in range(3):
        assert (await gateway.post_chat(turn("hi", model="gemma"))).status == 200
    assert [len(chats(fake)) for fake in hosts] == [0, 0, 3]  # the only host that serves it


@pytest_twisted.ensureDeferred
async def test_a_conversation_stays_on_one_host_turn_after_turn(hosts, start_gateway):
    gateway = start_gateway(fleet_env(hosts))
    said = ["Plan a trip to Rome"]
    for reply in ("Sure.", "Three days.", "Fine."):
        assert (await gateway.post_chat(turn(*said))).status == 200
        said += [reply, "And then?"]
    assert sorted(len(chats(fake)) for fake in hosts) == [0, 0, 3]


@pytest_twisted.ensureDeferred
async def test_two_gateway_processes_send_a_new_conversation_to_the_same_host(hosts, start_gateway):
    first, second = start_gateway(fleet_env(hosts)), start_gateway(fleet_env(hosts))
    for text in ("Plan a trip to Oslo", "Write a poem", "Count to ten", "Name three rivers"):
        before = [len(chats(fake)) for fake in hosts]
        assert (await first.post_chat(turn(text))).status == 200
        assert (await second.post_chat(turn(text))).status == 200
        grew = [len(chats(fake)) - n for fake, n in zip(hosts, before, strict=True)]
        assert sorted(grew) == [0, 0, 2]  # both processes picked the one host


@pytest.mark.parametrize("mode, status, message", [
    ("error_object", 500, "internal error"),
    ("error_object", 503, "busy"),
    ("error_string", 400, "No models loaded. Please load a model in the developer page or use the `lms load` "
                          "command."),
    ("reset", 0, ""),  # a TCP RST instead of an answer
    ("drop", 0, ""),  # the connection closed without an answer
])
@pytest_twisted.ensureDeferred
async def test_a_host_that_is_down_or_failing_costs_no_request(hosts, start_gateway, mode, status, message):
    gateway = start_gateway(fleet_env(hosts))
    await call("GET", gateway.url + "/v1/models")
    await hosts[0].stop()  # refuses connections
    hosts[1].chat.mode, hosts[1].chat.status, hosts[1].chat.message = mode, status, message
    for i in range(6):
        reply = await gateway.post_chat(turn(f"conversation {i}"))
        assert reply.status == 200
    assert len(chats(hosts[2])) == 6


@pytest_twisted.ensureDeferred
async def test_a_request_the_host_refuses_is_the_clients_answer_not_a_failover(hosts, start_gateway):
    gateway = start_gateway(fleet_env(hosts))
    for fake in hosts:
        fake.chat.mode, fake.chat.status, fake.chat.message = "error_object", 400, "bad tool schema"
    reply = await gateway.post_chat(turn("hi"))
    assert reply.status == 400 and reply.error["message"] == "bad tool schema"
    assert sum(len(chats(fake)) for fake in hosts) == 1


@pytest_twisted.ensureDeferred
async def test_nothing_is_retried_after_the_stream_started(hosts, start_gateway):
    gateway = start_gateway(fleet_env(hosts))
    for fake in hosts:
        fake.chat.stream = "die"  # two words, then the connection is cut
    reply = await gateway.post_chat(turn("one two three", stream=True))
    assert reply.status == 200 and b'"error"' in reply.body
    assert sum(len(chats(fake)) for fake in hosts) == 1


@pytest_twisted.ensureDeferred
async def test_a_full_host_spills_to_the_next_and_a_call_waits_when_all_are_full(hosts, start_gateway):
    two = hosts[:2]
    gateway = start_gateway({**fleet_env(two), "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "10"})
    provider = gateway.site.gateway.provider
    for host in provider.hosts:
        host.view.max_concurrent = 1  # one slot each
    await call("GET", gateway.url + "/v1/models")  # so that the next arrivals are the chats
    for fake in two:
        fake.chat.mode = "hang"
    arrivals = [fake.next_arrival() for fake in two]
    held = [Deferred.fromCoroutine(gateway.post_chat(turn(f"conversation {i}"))) for i in range(2)]
    await DeferredList(arrivals)  # one on each host: the second spilled
    third = Deferred.fromCoroutine(gateway.post_chat(turn("conversation 2")))
    assert [len(chats(fake)) for fake in two] == [1, 1]  # the third waits in the gateway
    arrived = DeferredList([fake.next_arrival() for fake in two], fireOnOneCallback=True)
    two[0].chat.mode = "normal"
    two[0].release()  # host 0 answers and frees its slot: the waiting call goes there
    await arrived
    assert [len(chats(fake)) for fake in two] == [2, 1]
    two[1].release()
    replies = await DeferredList([*held, third])
    assert [reply.status for _, reply in replies] == [200, 200, 200]


@pytest_twisted.ensureDeferred
async def test_metrics_spans_and_access_lines_name_the_host(hosts, start_gateway, collector,  # noqa: F811
                                                            access_events):
    gateway = start_gateway(fleet_env(hosts, INFERENCE_OBSERVABILITY_TRACING_EXPORTER="otlp",
                                      INFERENCE_OBSERVABILITY_TRACING_ENDPOINT=collector.grpc_endpoint))
    await call("GET", gateway.url + "/v1/models")
    by_name = {f"127.0.0.1:{fake.port.getHost().port}": fake for fake in hosts}
    key = conversation_key(CHAT.prefix, QWEN, turn("hi"))
    first_choice, second_choice, _ = [view.name for view in rank(key, [h.view for h in
                                                                          gateway.site.gateway.provider.hosts])]
    by_name[first_choice].chat.mode, by_name[first_choice].chat.status = "error_object", 500
    assert (await gateway.post_chat(turn("hi"))).status == 200  # its first choice failed: the second served
    assert (await gateway.post_chat(turn("hi", "hello", "again"))).status == 200  # the same conversation
    m = await gateway.metrics()
    assert m.value("inference_routing_decisions_total", upstream=second_choice, reason="failover") == 1
    assert m.value("inference_routing_decisions_total", upstream=second_choice, reason="affinity") == 1
    assert m.value("inference_upstream_errors_total", provider="lmstudio", upstream=first_choice,
                   kind="server_error") == 1
    assert {m.value("inference_upstream_in_flight", upstream=name) for name in by_name} == {0.0}
    assert [e["upstream"] for e in access_events if e["route"] == "/v1/chat/completions"] == [second_choice] * 2
    await gateway.site.gateway.telemetry.tracing.flush()
    await collector.wait_for(lambda spans: len(collector.named(f"chat {QWEN}")) >= 2)
    first, second = collector.named(f"chat {QWEN}")
    assert first.attributes["inference.upstream.name"] == second.attributes["inference.upstream.name"] == \
        second_choice
    assert (first.attributes["inference.routing.reason"], second.attributes["inference.routing.reason"]) == (
        "failover", "affinity")
    assert (first.attributes["inference.routing.step"], second.attributes["inference.routing.step"]) == (
        "failover", "affinity")  # the step that decided: no filter left one host; the conversation's did
    assert [dict(e.attributes) for e in first.events if e.name == "failover"] == [
        {"inference.upstream.name": first_choice, "error.type": "server_error"}]


@pytest_twisted.ensureDeferred
async def test_health_reports_each_host_and_is_ready_while_one_serves(hosts, start_gateway):
    gateway = start_gateway(fleet_env(hosts))
    await hosts[0].stop()
    health = await call("GET", gateway.url + "/health")
    assert health.status == 200 and health.json()["status"] == "healthy"
    up = {host["name"]: host["up"] for host in health.json()["upstream"]["hosts"]}
    assert sorted(up.values()) == [False, True, True]
    assert (await call("GET", gateway.url + "/health/ready")).status == 200
    for fake in hosts[1:]:
        await fake.stop()
    assert (await call("GET", gateway.url + "/health")).status == 503
    assert (await call("GET", gateway.url + "/health/ready")).status == 503


def ranked_first(provider, body: dict) -> str:
    """The host a conversation's rendezvous ranking puts first."""
    return rank(conversation_key(CHAT.prefix, body["model"], body), [host.view for host in provider.hosts])[0].name


def ejected(health) -> dict[str, bool]:
    return {host["name"]: host["ejected"] for host in health.json()["upstream"]["hosts"]}


def fleet_in_memory(in_memory, hosts: list[FakeLMStudio], **settings: str):
    """A gateway on a fake clock in front of ``hosts``, all in memory: the first host's name, and conversations
    that host ranks first (time moves only when the test says: cool-downs take no time)."""
    urls = {f"http://host{i}.test:1234": fake for i, fake in enumerate(hosts)}
    gateway = in_memory({"INFERENCE_INFERENCE_UPSTREAMS": ",".join(urls), "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0",
                         **settings}, upstreams=urls)
    provider = gateway.gateway.provider
    assert gateway.call("GET", "/v1/models").status == 200
    name = provider.hosts[0].view.name
    mine = [body for body in (turn(f"conversation {i}") for i in range(60)) if ranked_first(provider, body) == name]
    return gateway, provider, name, mine


def timers(gateway) -> list[float]:
    """The timers of the fleet's host health machines (each host's own), in seconds from now."""
    return [when for host in gateway.gateway.provider.hosts if (when := host.health.next_check_in) is not None]


def test_a_failing_host_is_left_out_for_a_growing_cool_down_and_probed_back(hosts, in_memory):
    gateway, provider, name, mine = fleet_in_memory(in_memory, hosts)
    failing, health = hosts[0], provider.hosts[0].health
    failing.chat.mode, failing.chat.status = "error_object", 500
    for body in mine[:6]:
        assert gateway.post_chat(body).status == 200  # every one served by another host
    assert len(chats(failing)) == 3  # three failures in a row eject it: the next three never went there
    assert ejected(gateway.call("GET", "/health"))[name] is True
    assert timers(gateway) == [5.0]  # inference.routing.eject_secs

    gateway.advance(4.9)
    assert health.state == "ejected"
    gateway.advance(0.1)
    assert health.state == "serving"  # its model list answers: back in the fleet
    assert ejected(gateway.call("GET", "/health"))[name] is False
    for body in mine[6:9]:
        assert gateway.post_chat(body).status == 200
    assert len(chats(failing)) == 4  # back on trial: its first failure leaves it out again
    assert timers(gateway) == [10.0]  # for eject_secs x 2

    failing.chat.mode = "normal"
    gateway.advance(10)
    assert health.state == "serving"
    assert gateway.post_chat(mine[9]).status == 200
    assert len(chats(failing)) == 5  # it serves again
    m = gateway.metrics()
    assert m.value("inference_upstream_ejections_total", upstream=name) == 2
    assert m.value("inference_upstream_host_up", upstream=name) == 1


def test_a_host_that_refuses_connections_is_left_out_at_once_until_it_listens_again(hosts, in_memory):
    gateway, provider, name, mine = fleet_in_memory(in_memory, hosts)
    health, upstream = provider.hosts[0].health, gateway.upstreams["http://host0.test:1234"]
    upstream.stop()
    for body in mine[:3]:
        assert gateway.post_chat(body).status == 200
    m = gateway.metrics()
    assert m.value("inference_upstream_errors_total", provider="lmstudio", upstream=name, kind="unreachable") == 1
    assert m.value("inference_upstream_host_up", upstream=name) == 0  # the first call found it gone: checked, out
    assert health.state == "down" and timers(gateway) == [1.0]

    for _ in range(3):
        gateway.advance(1)
        assert health.state == "down" and timers(gateway) == [1.0]  # still refused: asked again every second
    upstream.start()
    gateway.advance(1)
    assert health.state == "serving"
    assert gateway.post_chat(mine[3]).status == 200
    assert len(chats(hosts[0])) == 1
    assert m.value("inference_upstream_ejections_total", upstream=name) == 0  # down is not an ejection


def responses_of(fake: FakeLMStudio) -> list:
    return [r for r in fake.received if r.path == "/v1/responses"]


async def respond(gateway, text: str, previous: str | None = None, stream: bool = False):
    body = {"model": QWEN, "input": text, "stream": stream}
    if previous is not None:
        body["previous_response_id"] = previous
    reply = await call("POST", gateway.url + "/v1/responses", body)
    if stream and reply.status == 200:
        created = next(data for name, data in named_events(reply.body) if name == "response.created")
        return reply, created["response"]["id"]
    return reply, reply.json().get("id")


@pytest_twisted.ensureDeferred
async def test_a_previous_response_id_goes_to_the_host_that_holds_it(hosts, start_gateway):
    gateway = start_gateway(fleet_env(hosts))
    other = start_gateway(fleet_env(hosts))  # another gateway process: it never saw the ids
    for stream in (False, True):
        first, response_id = await respond(gateway, "Plan a trip to Rome", stream=stream)
        assert first.status == 200
        holder = next(fake for fake in hosts if response_id in fake.responses)
        before = [len(responses_of(fake)) for fake in hosts]
        for i in range(5):  # each turn a new input: its own conversation key, and still the holder
            reply, response_id = await respond(gateway, f"And then {i}?", previous=response_id, stream=stream)
            assert reply.status == 200 and response_id in holder.responses
        asked = [len(responses_of(fake)) - n for fake, n in zip(hosts, before, strict=True)]
        assert sorted(asked) == [0, 0, 5]  # no other host was asked
        before = [len(responses_of(fake)) for fake in hosts]
        reply, _ = await respond(other, "And last?", previous=response_id, stream=stream)
        assert reply.status == 200  # the hosts that lack it said so, and the next one was asked
        asked = [len(responses_of(fake)) - n for fake, n in zip(hosts, before, strict=True)]
        assert asked[hosts.index(holder)] == 1 and sum(asked) <= 3

    m = await other.metrics()  # hosts that lack a response did not fail: no error, no failover
    assert [s for s in m.samples if s.name == "inference_upstream_errors_total" and s.value] == []
    assert m.value("inference_routing_decisions_total", upstream=holder.url[7:], reason="failover") is None
    reply, _ = await respond(other, "Hello?", previous="resp_nobody_has")
    assert reply.status == 400 and reply.error["code"] == "previous_response_not_found"
    assert [responses_of(fake)[-1].body["previous_response_id"] for fake in hosts] == ["resp_nobody_has"] * 3


@pytest_twisted.ensureDeferred
async def test_a_host_that_must_load_the_model_first_gets_the_long_deadline(start_gateway, collector):  # noqa: F811
    loading, other = FakeLMStudio([QWEN]), FakeLMStudio(["gemma-3-4b"])
    for fake in (loading, other):
        fake.listen()
        fake.native_types, fake.chat.mode = {}, "hang"
    loading.not_loaded = {QWEN}
    try:
        gateway = start_gateway(fleet_env([loading, other], INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS="0.2",
                                          INFERENCE_INFERENCE_HTTP_LOAD_TIMEOUT_SECS="60",
                                          INFERENCE_OBSERVABILITY_TRACING_EXPORTER="otlp",
                                          INFERENCE_OBSERVABILITY_TRACING_ENDPOINT=collector.grpc_endpoint))
        await call("GET", gateway.url + "/v1/models")
        arrived = loading.next_arrival()
        loads = Deferred.fromCoroutine(gateway.post_chat(turn("hi")))
        await arrived
        answers = await gateway.post_chat(turn("hi", model="gemma-3-4b"))  # sent later, loaded: 0.2 s
        assert answers.status == 504
        assert not loads.called  # still waiting for its model to load
        loading.release()
        assert (await loads).status == 200
        assert (await gateway.post_chat(turn("again"))).status == 504  # loaded now: the usual deadline

        # A stream whose headers come at once and whose first event waits for the load: the same deadline.
        for fake in (loading, other):
            fake.chat.mode, fake.chat.stream = "normal", "late"
        loading.not_loaded = {QWEN}
        await gateway.site.gateway.provider.list_models(timeout=2)  # asked now: LM Studio says not loaded again
        arrived = loading.next_arrival()
        loads = Deferred.fromCoroutine(gateway.post_chat(turn("story", stream=True)))
        await arrived
        cut = await gateway.post_chat(turn("hi", model="gemma-3-4b", stream=True))
        assert b"sent nothing for 0.2s" in cut.body  # the loaded model's stream: silent past timeout_secs
        assert not loads.called
        loading.release()
        streamed = await loads
        assert streamed.status == 200 and b"[DONE]" in streamed.body and b'"error"' not in streamed.body

        await gateway.site.gateway.telemetry.tracing.flush()
        await collector.wait_for(lambda spans: len(collector.named(f"chat {QWEN}")) >= 3)
        first, second, streamed_span = collector.named(f"chat {QWEN}")
        assert [dict(e.attributes) for e in first.events if e.name == "model_load"] == [
            {"inference.load_timeout_secs": 60.0}]
        assert [e for e in second.events if e.name == "model_load"] == []
        assert [e.name for e in streamed_span.events if e.name == "model_load"] == ["model_load"]
    finally:
        await DeferredList([loading.stop(), other.stop()])


def holder_of(hosts: list[FakeLMStudio], first_words: str) -> list[int]:
    """Which host (index) received each turn of the conversation that began with ``first_words``."""
    return [i for i, fake in enumerate(hosts) for r in chats(fake) if r.body["messages"][1]["content"] == first_words]


@pytest.mark.daemon
@pytest_twisted.ensureDeferred
async def test_two_gateway_processes_keep_conversations_on_one_host_and_a_killed_host_costs_no_request(
        hosts, tmp_path):
    if TWISTD is None:
        pytest.skip("twistd is not installed next to this Python")
    daemons = [spawn(["--listen", "tcp:0:interface=127.0.0.1"], fleet_env(hosts), str(tmp_path))
               for _ in range(2)]
    try:
        urls = [f"http://127.0.0.1:{await daemon.port()}" for daemon, _ in daemons]
        starts = [f"Plan trip {i}" for i in range(4)]  # four conversations: no host's four slots overflow
        said = {start: [start] for start in starts}
        for turn_number in range(3):  # each turn through the other process
            for start in starts:
                reply = await call("POST", urls[turn_number % 2] + "/v1/chat/completions", turn(*said[start]))
                assert reply.status == 200
                said[start] += ["Sure.", f"And {turn_number}?"]
        homes = {start: set(holder_of(hosts, start)) for start in starts}
        assert all(len(home) == 1 for home in homes.values()), homes  # both processes sent each to one host

        # Every host holds calls; the busiest is killed with its calls in flight (none has streamed a byte).
        for fake in hosts:
            fake.chat.mode = "hang"
        pending = [Deferred.fromCoroutine(call("POST", urls[i % 2] + "/v1/chat/completions", turn(*said[start])))
                   for i, start in enumerate(starts)]
        await until(lambda: sum(len(fake.pending) for fake in hosts) == 4)
        victim = max(hosts, key=lambda fake: len(fake.pending))
        survivors = [fake for fake in hosts if fake is not victim]
        for fake in survivors:
            fake.chat.mode = "normal"
        killed = len(victim.pending)
        await victim.stop()
        for fake in survivors:
            fake.release()
        replies = await DeferredList(pending)
        assert [reply.status for _, reply in replies] == [200] * 4  # the victim's calls were served elsewhere

        moved = [start for start in starts if homes[start] == {hosts.index(victim)}]
        for start in starts:  # one more turn through each process: both agree on each conversation's new host
            for url in urls:
                assert (await call("POST", url + "/v1/chat/completions", turn(*said[start], "Next?"))).status == 200
        for start in moved:
            assert len(set(holder_of(survivors, start)[-3:])) == 1  # the failed-over call and both later turns
        scrapes = [await scrape(url) for url in urls]
        assert sum(s.value("inference_upstream_host_up", upstream=victim.url[7:]) for s in scrapes) == 0
        served = {name: sum(s.value("inference_routing_decisions_total", upstream=name, reason=reason) or 0
                            for s in scrapes for reason in ("affinity", "least_loaded", "failover"))
                  for name in (fake.url[7:] for fake in hosts)}
        assert sum(served.values()) == 4 * 3 + 4 + 4 * 2  # every call is counted for the host that served it
        assert served == {fake.url[7:]: len(chats(fake)) - (killed if fake is victim else 0) for fake in hosts}
    finally:
        for daemon, transport in daemons:
            await stop(daemon, transport)


@pytest_twisted.ensureDeferred
async def test_each_host_may_be_of_its_own_kind(hosts, start_gateway, tmp_path):
    config = tmp_path / "fleet.yaml"
    config.write_text(f"""inference:
  upstreams:
    - {{name: studio, base_url: "{hosts[0].url}"}}
    - {{name: cloud, base_url: "{hosts[1].url}", provider: openai, api_key: sk-cloud}}
""")
    gateway = start_gateway({"INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"}, str(config))
    assert (await call("GET", gateway.url + "/v1/models")).status == 200
    assert [r.path for r in hosts[0].received] == ["/v1/models", "/api/v1/models", "/api/v0/models"]  # its own API
    assert [r.path for r in hosts[1].received] == ["/v1/models"]  # OpenAI has none
    assert hosts[1].received[0].headers["authorization"] == "Bearer sk-cloud"
    for i in range(6):
        assert (await gateway.post_chat(turn(f"conversation {i}"))).status == 200
    assert len(chats(hosts[0])) + len(chats(hosts[1])) == 6


def test_a_conversation_leaves_its_host_only_when_that_host_is_busier_than_the_bound(hosts, in_memory):
    two = hosts[:2]
    gateway, provider, name, mine = fleet_in_memory(in_memory, two)  # inference.routing.load_bound: 2
    home, other = two
    conversation, others = mine[0], mine[1:4]
    assert gateway.post_chat(conversation).status == 200
    home.chat.mode = "hang"
    held = [gateway.send("POST", "/v1/chat/completions", body) for body in others[:2]]
    gateway.settle()
    assert len(home.pending) == 2  # two calls in flight at its host, none at the other: within the bound
    home.chat.mode = "normal"
    next_turn = turn(conversation["messages"][1]["content"], "Sure.", "And then?")
    assert gateway.post_chat(next_turn).status == 200
    assert len(chats(home)) == 4 and len(chats(other)) == 0  # it stayed
    home.chat.mode = "hang"
    held.append(gateway.send("POST", "/v1/chat/completions", others[2]))
    gateway.settle()
    assert len(home.pending) == 3  # three in flight there, none here: beyond the bound
    last_turn = turn(conversation["messages"][1]["content"], "Sure.", "And then?", "Fine.", "More?")
    assert gateway.post_chat(last_turn).status == 200
    assert chats(other)[-1].body["messages"][-1]["content"] == "More?"  # it moved to the idle host
    home.release()
    assert [gateway.result(d).status for d in held] == [200, 200, 200]
    assert gateway.metrics().value("inference_routing_decisions_total", upstream=provider.hosts[1].view.name,
                                   reason="least_loaded") == 1


@pytest_twisted.ensureDeferred
async def test_a_host_that_refuses_connections_is_passed_over_without_retrying_it(hosts, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_UPSTREAMS": ",".join(fake.url for fake in hosts)})  # 2 retries
    provider = gateway.site.gateway.provider
    await call("GET", gateway.url + "/v1/models")
    name = provider.hosts[0].view.name
    await hosts[0].stop()
    retries: list[dict] = []

    def observe(event: dict) -> None:
        if "failed before the request was sent" in (event.get("log_format") or ""):
            retries.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        body = next(body for body in (turn(f"conversation {i}") for i in range(60))
                    if ranked_first(provider, body) == name)
        assert (await gateway.post_chat(body)).status == 200
    finally:
        globalLogPublisher.removeObserver(observe)
    assert retries == []  # the next host was the retry
    assert sum(len(chats(fake)) for fake in hosts[1:]) == 1


def test_a_host_that_cuts_a_call_is_checked_at_once_and_left_out_when_it_is_gone(hosts, in_memory):
    gateway, provider, name, mine = fleet_in_memory(in_memory, hosts)
    crashing = hosts[0]
    crashing.chat.mode = "hang"
    reply = gateway.send("POST", "/v1/chat/completions", mine[0])
    gateway.settle()
    assert len(crashing.pending) == 1
    gateway.upstreams["http://host0.test:1234"].stop()  # the process dies with the call in flight
    assert gateway.result(reply).status == 200  # served by another host
    assert provider.hosts[0].health.state == "down"  # one cut call, then its model list refused
    health = gateway.call("GET", "/health")
    assert ejected(health)[name] is False  # down is not ejected: it is asked every second
    ready = gateway.call("GET", "/health/ready")
    assert ready.status == 200 and list(ready.json()["hosts"].values()) == ["down", "serving", "serving"]
    for fake in hosts[1:]:
        fake.chat.mode, fake.chat.status = "error_object", 500
    for i in range(12):  # every call fails on both: a shared cause
        gateway.post_chat(turn(f"failing {i}"))
    ready = gateway.call("GET", "/health/ready")  # max_ejection_percent (50) of three hosts: one
    assert ready.status == 200 and sorted(ready.json()["hosts"].values()) == ["down", "ejected", "serving"]

# -- coding agents -------------------------------------------------------------------------------------------------

def responses_calls(fake: FakeLMStudio) -> list:
    return [r for r in fake.received if r.path == "/v1/responses"]


@pytest_twisted.ensureDeferred
async def test_an_agents_session_stays_on_one_host_while_its_context_changes(hosts, start_gateway,
                                                                             collector):  # noqa: F811
    gateway = start_gateway(fleet_env(hosts, INFERENCE_OBSERVABILITY_TRACING_EXPORTER="otlp",
                                      INFERENCE_OBSERVABILITY_TRACING_ENDPOINT=collector.grpc_endpoint))
    for session in ("session-a", "session-b", "session-c"):
        for turn_number in range(3):  # Codex compacts: the first turn itself changes, the session does not
            reply = await call("POST", gateway.url + "/v1/responses", {
                "model": QWEN, "prompt_cache_key": session, "input": f"summary {turn_number} of {session}"})
            assert reply.status == 200
    served = [len(responses_calls(fake)) for fake in hosts]
    assert sum(served) == 9 and all(n % 3 == 0 for n in served)  # each session's three turns on one host
    claude = json.dumps({"device_id": "d", "account_uuid": "", "session_id": "claude-1"})
    for text in ("first", "second, after compaction"):
        assert (await call("POST", gateway.url + "/v1/messages", {
            "model": QWEN, "max_tokens": 10, "metadata": {"user_id": claude},
            "messages": [{"role": "user", "content": text}]})).status == 200
    homes = [fake for fake in hosts if any(r.path == "/v1/messages" for r in fake.received)]
    assert len(homes) == 1
    await gateway.site.gateway.telemetry.tracing.flush()
    spans = await collector.wait_for(lambda spans: len([s for s in spans if s.kind == "CLIENT"]) >= 11)
    sources = [s.attributes.get("inference.routing.key_source") for s in spans if s.kind == "CLIENT"]
    assert sources.count("prompt_cache_key") == 9 and sources.count("session") == 2


def test_a_busy_one_slot_host_is_not_called_down(in_memory):
    fakes = [FakeLMStudio([QWEN]).like_llama_cpp_python(), FakeLMStudio([QWEN]).like_llama_cpp_python()]
    for fake in fakes:
        fake.chat.mode = "hang"  # whichever host the call goes to holds it: a long generation
    gateway, provider, name, mine = fleet_in_memory(in_memory, fakes,
                                                    INFERENCE_INFERENCE_HTTP_CONNECT_TIMEOUT_SECS="0.2")
    running = gateway.send("POST", "/v1/chat/completions", turn("a long answer"))
    gateway.settle()
    busy = next(fake for fake in fakes if fake.pending)

    def probed(path: str) -> Any:  # /health* ask every host's model list, within routing.probe_timeout_secs
        reply = gateway.send("GET", path)
        gateway.advance(2)
        return gateway.result(reply).json()

    def hosts_up() -> list[bool]:
        return [host["up"] for host in probed("/health")["upstream"]["hosts"]]

    assert hosts_up() == [True, True]  # the busy host's list timed out: busy, not down
    assert sorted(probed("/health/ready")["hosts"].values()) == ["serving", "serving"]
    busy.release()
    assert gateway.result(running).status == 200
    busy.generating_elsewhere = True  # its list times out with no call of ours in flight: down
    assert sorted(hosts_up()) == [False, True]
    busy.generating_elsewhere = False
    busy.release()
    gateway.settle()

