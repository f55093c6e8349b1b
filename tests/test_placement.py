"""LM Studio 0.4 fleets (issue 21): models placed on one host by the gateway rather than loaded by every host a
burst reaches; room made by unloading the least recently used idle model; pinned models; loads recorded."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from inference.routing.picker import HostView
from inference.routing.rendezvous import rank

from .conftest import call
from .fakes.lmstudio import FakeLMStudio
from .test_tracing import collector  # noqa: F401 (a fixture)

QWEN, LLAMA, GEMMA = "qwen3-8b", "llama-3.2-3b-instruct", "gemma-3-4b"


def chat(model: str, text: str = "hi") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def hosts() -> Any:
    """Three LM Studio 0.4 hosts, each with the same models downloaded and none loaded."""
    fakes = [FakeLMStudio([QWEN, LLAMA, GEMMA]).start_empty() for _ in range(3)]
    for fake in fakes:
        fake.parallel = 4
        fake.listen()
    yield fakes
    pytest_twisted.blockon(DeferredList([fake.stop() for fake in fakes]))


def fleet_config(tmp_path, fakes: list[FakeLMStudio], placement: str = "{mode: on_demand}", name: str = "fleet",
                 extra: str = "") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text("inference:\n  upstreams:\n" + "".join(
        f'    - {{name: host{i}, base_url: "{fake.url}"}}\n' for i, fake in enumerate(fakes))
        + f"  placement: {placement}\n" + extra)
    return str(path)


def fleet_in_memory(in_memory, tmp_path, fakes: list[FakeLMStudio], placement: str = "{mode: on_demand}",
                    name: str = "fleet", extra: str = ""):
    """A gateway on a fake clock in front of ``fakes`` (``host0``, ``host1`` ...), all in memory."""
    urls = {f"http://host{i}.test:1234": fake for i, fake in enumerate(fakes)}
    path = tmp_path / f"{name}.yaml"
    path.write_text("inference:\n  upstreams:\n" + "".join(
        f'    - {{name: host{i}, base_url: "{url}"}}\n' for i, url in enumerate(urls))
        + f"  placement: {placement}\n" + extra)
    return in_memory(upstreams=urls, config_path=str(path))


def chats_at(fake: FakeLMStudio) -> list[str]:
    return [r.body["model"] for r in fake.received if r.path == "/v1/chat/completions"]


def holder(fakes: list[FakeLMStudio], model: str) -> list[int]:
    return [i for i, fake in enumerate(fakes) if (fake.instances or {}).get(model)]


@pytest_twisted.ensureDeferred
async def test_a_burst_for_two_unloaded_models_loads_each_once_on_its_own_host(hosts, start_gateway, tmp_path,
                                                                               collector):  # noqa: F811
    views = [HostView(f"host{i}", 4) for i in range(3)]
    gateway = start_gateway({"INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp",
                             "INFERENCE_OBSERVABILITY_TRACING_ENDPOINT": collector.grpc_endpoint},
                            fleet_config(tmp_path, hosts))
    # Both models rank host2 first: the second load goes elsewhere because of the first, under way.
    assert rank(LLAMA.encode(), views)[0].name == rank(GEMMA.encode(), views)[0].name == "host2"
    burst = [Deferred.fromCoroutine(gateway.post_chat(chat(model, f"call {i}")))
             for i in range(6) for model in (LLAMA, GEMMA)]
    assert all(ok and reply.status == 200 for ok, reply in await DeferredList(burst))
    assert sorted(model for fake in hosts for model in fake.loads) == sorted([LLAMA, GEMMA])  # one load each
    assert [fake.jit_loads for fake in hosts] == [[], [], []]  # and no host loaded one on its own
    (llama_host,), (gemma_host,) = holder(hosts, LLAMA), holder(hosts, GEMMA)
    assert llama_host != gemma_host  # the second model went to a host with nothing loaded
    for fake in hosts:
        fake.received.clear()
    for i in range(4):
        assert (await gateway.post_chat(chat(LLAMA, f"later {i}"))).status == 200
        assert (await gateway.post_chat(chat(GEMMA, f"later {i}"))).status == 200
    assert chats_at(hosts[llama_host]) == [LLAMA] * 4 and chats_at(hosts[gemma_host]) == [GEMMA] * 4

    listed = {m["id"]: m for m in (await call("GET", gateway.url + "/v1/models")).json()["data"]}
    assert {h["name"]: h.get("instances") for h in listed[LLAMA]["hosts"]} == {
        f"host{i}": 1 if i == llama_host else 0 for i in range(3)}
    assert listed[LLAMA]["state"] == "loaded" and listed[LLAMA]["capabilities"]["trained_for_tool_use"] is True
    health = {h["name"]: h for h in (await call("GET", gateway.url + "/health")).json()["upstream"]["hosts"]}
    assert health[f"host{llama_host}"]["loaded"] == {
        LLAMA: {"instances": 1, "slots": 4, "context_length": 4096, "in_flight": 0}}
    assert health[f"host{gemma_host}"]["loaded"].keys() == {GEMMA}

    metrics = (await call("GET", gateway.url + "/metrics")).body.decode()
    assert f'inference_model_loads_total{{outcome="loaded",upstream="host{llama_host}"}} 1.0' in metrics
    assert f'inference_model_instances{{model="{LLAMA}",upstream="host{llama_host}"}} 1.0' in metrics
    assert f'inference_model_instances{{model="{QWEN}",upstream="host{llama_host}"}} 0.0' in metrics
    await gateway.site.gateway.telemetry.tracing.flush()
    await collector.wait_for(lambda spans: len([s for s in spans if s.name.startswith("load ")]) == 2)
    (load,) = collector.named(f"load {LLAMA}")
    assert load.attributes["inference.upstream.name"] == f"host{llama_host}"
    assert load.attributes["inference.model.load_time_seconds"] == 1.25  # what LM Studio said it took
    assert load.attributes["inference.model.outcome"] == "loaded"


def test_two_gateways_place_a_model_on_the_same_host_and_a_duplicate_is_unloaded(hosts, in_memory, tmp_path):
    gateways = [fleet_in_memory(in_memory, tmp_path, hosts, name=f"gateway{i}") for i in range(2)]
    gate: Deferred[None] = Deferred()
    for fake in hosts:
        fake.load_gate = gate  # both gateways list the model unloaded, and both ask for it
    replies = [gateway.send("POST", "/v1/chat/completions", chat(QWEN)) for gateway in gateways]
    for gateway in gateways:
        gateway.settle()
    assert sum(len(fake.loads) for fake in hosts) == 2
    (chosen,) = [i for i, fake in enumerate(hosts) if fake.loads]  # the same host, by rendezvous order
    assert hosts[chosen].loads == [QWEN, QWEN]
    gate.callback(None)
    for _ in range(3):  # (each gateway's answers move as the other's unload lands)
        for gateway in gateways:
            gateway.settle()
    assert [gateway.result(reply).status for gateway, reply in zip(gateways, replies, strict=True)] == [200, 200]
    assert [i["id"] for i in hosts[chosen].instances[QWEN]] == [QWEN]  # the second instance was unloaded
    assert hosts[chosen].unloads == [f"{QWEN}:2"] and chats_at(hosts[chosen]) == [QWEN, QWEN]
    assert [fake.jit_loads for fake in hosts] == [[], [], []]

def test_room_is_made_by_unloading_the_least_recently_used_idle_model_never_a_busy_one(in_memory, tmp_path):
    big, other = FakeLMStudio([QWEN, LLAMA, GEMMA]).start_empty(), FakeLMStudio(["elsewhere"]).start_empty()
    gateway = fleet_in_memory(in_memory, tmp_path, [big, other], "{mode: on_demand, max_loaded_per_host: 2}")
    for model in (QWEN, LLAMA, QWEN):  # QWEN used last: LLAMA is the least recently used
        gateway.advance(1)
        assert gateway.post_chat(chat(model)).status == 200
    assert gateway.post_chat(chat(GEMMA)).status == 200
    assert big.unloads == [LLAMA] and big.instances[QWEN] and big.instances[GEMMA] and not big.instances[LLAMA]
    big.chat.mode = "hang"  # a call in flight on GEMMA: QWEN, idle, makes room for LLAMA
    held = gateway.send("POST", "/v1/chat/completions", chat(GEMMA))
    gateway.settle()
    assert len(big.pending) == 1
    big.chat.mode = "normal"
    assert gateway.post_chat(chat(LLAMA)).status == 200
    assert big.unloads == [LLAMA, QWEN] and not big.instances[QWEN] and big.instances[GEMMA]
    big.release()
    assert gateway.result(held).status == 200
    assert gateway.metrics().value("inference_model_loads_total", outcome="unloaded", upstream="host0") == 2

def test_a_pinned_model_is_loaded_at_start_and_again_after_its_host_restarts(hosts, in_memory, tmp_path):
    gateway = fleet_in_memory(in_memory, tmp_path, hosts, f"{{pinned: {{{GEMMA}: [host2]}}}}")
    assert gateway.call("GET", "/v1/models").status == 200  # the first lists
    assert hosts[2].instances.get(GEMMA) and hosts[2].loads == [GEMMA] and not hosts[0].loads and not hosts[1].loads
    upstream = gateway.upstreams["http://host2.test:1234"]
    upstream.stop()  # the host goes away ...
    assert gateway.call("GET", "/health").status == 200
    assert gateway.gateway.provider.hosts[2].health.state == "down"
    hosts[2].instances = {}  # ... and comes back with nothing loaded
    upstream.start()
    gateway.advance(1)  # a host that is down is asked again every second
    assert gateway.gateway.provider.hosts[2].health.state == "serving"
    assert hosts[2].instances.get(GEMMA) and hosts[2].loads == [GEMMA, GEMMA]

@pytest_twisted.ensureDeferred
async def test_placement_off_leaves_loading_to_the_hosts(hosts, start_gateway, tmp_path):
    gateway = start_gateway({}, fleet_config(tmp_path, hosts, "{mode: 'off'}"))
    assert (await gateway.post_chat(chat(QWEN))).status == 200
    assert [fake.loads for fake in hosts] == [[], [], []] and sum(len(fake.jit_loads) for fake in hosts) == 1


@pytest_twisted.ensureDeferred
async def test_a_failed_load_is_tried_on_the_next_host_and_the_last_failure_is_the_calls(start_gateway, tmp_path):
    fakes = [FakeLMStudio([QWEN]).start_empty() for _ in range(2)]
    for fake in fakes:
        fake.load_error = "Failed to load model: insufficient system resources"
        fake.listen()
    try:
        gateway = start_gateway({}, fleet_config(tmp_path, fakes))
        reply = await gateway.post_chat(chat(QWEN))
        assert reply.status == 500 and "could not load" in reply.error["message"]
        assert "insufficient system resources" in reply.error["message"]
        assert [fake.loads for fake in fakes] == [[QWEN], [QWEN]] and not any(chats_at(fake) for fake in fakes)
        metrics = (await call("GET", gateway.url + "/metrics")).body.decode()
        assert 'inference_model_loads_total{outcome="load_failed",upstream="host0"} 1.0' in metrics
        fakes[1].load_error = None  # one host has room again
        assert (await gateway.post_chat(chat(QWEN))).status == 200
        assert holder(fakes, QWEN) == [1] and chats_at(fakes[1]) == [QWEN]
    finally:
        await DeferredList([fake.stop() for fake in fakes])


@pytest_twisted.ensureDeferred
async def test_each_hosts_token_goes_on_its_list_load_and_unload_calls(start_gateway, tmp_path):
    fakes = [FakeLMStudio([QWEN, LLAMA, GEMMA]).start_empty() for _ in range(2)]
    for i, fake in enumerate(fakes):
        fake.require_key = f"token-{i}"
        fake.listen()
    path = tmp_path / "fleet.yaml"
    path.write_text("inference:\n  upstreams:\n" + "".join(
        f'    - {{name: host{i}, base_url: "{fake.url}", api_key: token-{i}}}\n' for i, fake in enumerate(fakes))
        + "  placement: {mode: on_demand, max_loaded_per_host: 1}\n")
    try:
        gateway = start_gateway({}, str(path))
        for model in (QWEN, LLAMA, GEMMA):  # two hosts, one model each at most: the third unloads one
            assert (await gateway.post_chat(chat(model))).status == 200
        for i, fake in enumerate(fakes):
            assert {r.headers.get("authorization") for r in fake.received} == {f"Bearer token-{i}"}
        paths = {r.path for fake in fakes for r in fake.received}
        assert {"/api/v1/models", "/api/v1/models/load", "/api/v1/models/unload"} <= paths
    finally:
        await DeferredList([fake.stop() for fake in fakes])


def test_a_load_that_is_over_at_once_still_answers_the_calls_that_wait_for_it():
    """A host whose list and load answer without waiting (a cache, a fast host): the call is not left waiting."""
    from twisted.internet.testing import MemoryReactorClock

    from inference.config import InferenceConfig, PlacementConfig, UpstreamConfig
    from inference.providers.fleet import Host
    from inference.providers.lmstudio import LMStudioProvider, Loaded
    from inference.providers.placement import Placement

    class AtOnce(LMStudioProvider):
        loaded = False

        async def list_models(self, timeout: float | None = None) -> list[dict]:
            self.native_api = "v1"
            state = "loaded" if self.loaded else "not-loaded"
            return [{"id": QWEN, "state": state, "instances": [{"id": QWEN}] if self.loaded else []}]

        async def load(self, model: str, timeout: float) -> Loaded:
            self.loaded = True
            return Loaded(model, 0.5)

    clock = MemoryReactorClock()
    host = Host(UpstreamConfig(name="h"), AtOnce(clock, InferenceConfig()))
    host.view.models = {}

    def learn(host: Host, models: list[dict]) -> None:
        from inference.providers.fleet import _facts
        host.models, host.view.models = models, {m["id"]: _facts(m) for m in models}

    placement = Placement(PlacementConfig(mode="on_demand"), [host], clock, 60, 2, learn)
    learn(host, [{"id": QWEN, "state": "not-loaded", "instances": []}])
    host.provider.native_api = "v1"
    waiting = Deferred.fromCoroutine(placement.ready(QWEN))
    assert waiting.called and waiting.result is None and host.view.models[QWEN].state == "loaded"


def test_a_call_waiting_for_the_hosts_slot_has_the_model_placed_elsewhere_when_that_host_goes(in_memory, tmp_path):
    fakes = [FakeLMStudio([QWEN]).start_empty() for _ in range(2)]
    urls = {f"http://one{i}.test:1234": fake for i, fake in enumerate(fakes)}
    path = tmp_path / "fleet.yaml"
    path.write_text("inference:\n  http: {max_retries: 0}\n  upstreams:\n" + "".join(
        f'    - {{name: host{i}, base_url: "{url}", max_concurrent: 1}}\n' for i, url in enumerate(urls))
        + "  placement: {mode: on_demand}\n")
    gateway = in_memory(upstreams=urls, config_path=str(path))
    assert gateway.post_chat(chat(QWEN)).status == 200
    (first,) = holder(fakes, QWEN)
    fakes[first].chat.mode = "hang"
    held = gateway.send("POST", "/v1/chat/completions", chat(QWEN, "a long one"))
    waiting = gateway.send("POST", "/v1/chat/completions", chat(QWEN, "next"))
    gateway.settle()
    assert len(fakes[first].pending) == 1 and gateway.gateway.provider.waiting() == 1  # it waits for that slot
    gateway.upstreams[list(urls)[first]].stop()  # the host goes away (the held call is cut with it)
    gateway.result(held)
    assert gateway.result(waiting).status == 200  # the model was loaded on the other host, for it
    other = fakes[1 - first]
    assert other.loads == [QWEN] and other.jit_loads == [] and chats_at(other) == [QWEN]
