"""The operator assets in observability/, checked with Prometheus's own tools and a real Prometheus server.

These need Debian's ``prometheus`` package (``promtool`` and ``prometheus``). Without it they are skipped,
unless ``INFERENCE_REQUIRE_TOOLS=1`` (set by ``.ci/run``) makes a missing tool a failure.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater

from .conftest import call, free_port, raw_connect, raw_post, run_tool, tool
from .fakes.lmstudio import FakeLMStudio

ASSETS = Path(__file__).resolve().parent.parent / "observability"
MODEL = "qwen2.5-7b-instruct"


async def mixed_traffic(fake, gateway) -> None:
    """Requests of every kind: plain, streamed, failing upstream, failing stream, client gone, bad input."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}
    assert (await gateway.post_chat(chat)).status == 200
    assert (await gateway.post_chat({**chat, "stream": True})).status == 200
    fake.chat.mode = "error_string"
    assert (await gateway.post_chat(chat)).status == 500
    fake.chat.mode, fake.chat.stream = "normal", "die"
    assert (await gateway.post_chat({**chat, "stream": True})).status == 200
    fake.chat.stream = "stall"
    closed = fake.next_close()
    client = await raw_connect(gateway.port.getHost().port)
    client.transport.write(raw_post("/v1/chat/completions", json.dumps({**chat, "stream": True}).encode()))
    await client.received(b'" hello"')
    client.transport.loseConnection()
    await closed
    fake.chat.stream = "normal"
    assert (await gateway.post_chat({"messages": []})).status == 400


@pytest_twisted.ensureDeferred
async def test_promtool_accepts_the_real_metrics_output(fake, lmstudio):
    promtool = tool("promtool")
    await mixed_traffic(fake, lmstudio)
    # promtool reads the text format; the OpenMetrics variant is parsed strictly in test_metrics.py.
    reply = await call("GET", lmstudio.url + "/metrics")
    code, output = await run_tool(ASSETS, promtool, "check", "metrics", stdin=reply.body)
    assert code == 0 and output.strip() == "", output  # no errors and no lint warnings


@pytest_twisted.ensureDeferred
async def test_alerting_rules_pass_promtool_and_their_unit_tests():
    promtool = tool("promtool")
    code, output = await run_tool(ASSETS, promtool, "check", "rules", "alerts.yml")
    assert code == 0 and "SUCCESS: 6 rules found" in output, output
    code, output = await run_tool(ASSETS, promtool, "test", "rules", "alerts_test.yml")
    assert code == 0 and "SUCCESS" in output, output
    code, output = await run_tool(ASSETS, promtool, "check", "config", "prometheus.yml")
    assert code == 0 and "is valid prometheus config file syntax" in output, output


def test_the_collector_config_receives_otlp_and_exports_traces():
    config = yaml.safe_load((ASSETS / "otel-collector.yaml").read_text())
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    assert all(name in config["processors"] for name in pipeline["processors"])
    assert all(name in config["exporters"] for name in pipeline["exporters"])


FLEET_METRICS = ("inference_upstream_in_flight", "inference_upstream_waiting", "inference_routing_decisions_total",
                 "inference_upstream_host_up", "inference_upstream_ejections_total")


def dashboard_queries(fleet: bool) -> list[tuple[str, str]]:
    """The dashboard's queries: those of the panels about a fleet's hosts, or all the others."""
    dashboard = json.loads((ASSETS / "grafana" / "inference-dashboard.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]
            if any(name in target["expr"] for name in FLEET_METRICS) == fleet]


async def query_each(server: PrometheusServer, queries: list[tuple[str, str]]) -> None:
    """Every query returns data ($__rate_interval as Grafana would set it)."""
    assert queries
    for title, expr in queries:
        promql = expr.replace("$__rate_interval", "1m").replace("$instance", ".+")
        result = await server.until(promql)
        values = [float(series["value"][1]) for series in result]
        assert any(not math.isnan(v) for v in values), (title, promql, result)


class PrometheusServer(ProcessProtocol):
    """A real Prometheus scraping one gateway every 200 ms, with exemplar storage on."""

    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = b""
        self.ended: Deferred[None] = Deferred()
        scrape = yaml.safe_load((ASSETS / "prometheus.yml").read_text())["scrape_configs"][0]
        scrape.update(scrape_interval="200ms", scrape_timeout="200ms", static_configs=[{"targets": [target]}])
        config = directory / "prometheus.yml"
        config.write_text(yaml.safe_dump({"global": {"evaluation_interval": "1s"}, "scrape_configs": [scrape]}))
        self.args = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--enable-feature=exemplar-storage"]

    def start(self, binary: str) -> None:
        self.transport = reactor.spawnProcess(self, binary, self.args, env=os.environ)

    def errReceived(self, data: bytes) -> None:
        self.log += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    async def query(self, promql: str) -> list[dict[str, Any]]:
        reply = await call("GET", f"{self.url}/api/v1/query?query={quote(promql)}")
        payload = reply.json()
        assert payload["status"] == "success", (promql, payload)
        return payload["data"]["result"]

    async def until(self, promql: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll a query until it returns series (Prometheus scrapes on its own schedule)."""
        deadline = reactor.seconds() + timeout
        while True:
            try:
                result = await self.query(promql)
            except Exception:  # not listening yet
                result = []
            if result:
                return result
            assert reactor.seconds() < deadline, f"{promql} returned nothing; prometheus said:\n{self.log.decode()}"
            await deferLater(reactor, 0.1, lambda: None)

    async def stop(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess("TERM")
        await self.ended


@pytest_twisted.ensureDeferred
async def test_a_real_prometheus_scrapes_the_gateway_and_the_dashboard_queries_return_data(fake, lmstudio, tmp_path):
    binary = tool("prometheus")
    server = PrometheusServer(tmp_path, f"127.0.0.1:{lmstudio.port.getHost().port}")
    server.start(binary)
    try:
        await server.until('up{job="inference"} == 1')
        # Two rounds: a series' first sample has no increase to rate() over, so the second round makes one.
        await mixed_traffic(fake, lmstudio)
        await server.until(f'inference_time_to_first_token_seconds_count{{model="{MODEL}"}} == 2')
        await mixed_traffic(fake, lmstudio)
        # The TTFT histogram, as Prometheus stored it: four streams had a first token.
        ttft = await server.until(f'inference_time_to_first_token_seconds_count{{model="{MODEL}"}} == 4')
        assert ttft[0]["metric"]["provider"] == "lmstudio"
        p95 = await server.until("histogram_quantile(0.95, sum by (le) "
                                 "(rate(inference_time_to_first_token_seconds_bucket[1m]))) > 0")
        assert 0 < float(p95[0]["value"][1]) < 1
        # Exemplars arrive with the OpenMetrics scrape and link the histogram to traces.
        reply = await call("GET", f"{server.url}/api/v1/query_exemplars?query="
                                  f"{quote('inference_time_to_first_token_seconds_bucket')}&start=0&end=9999999999")
        exemplars = [e for series in reply.json()["data"] for e in series["exemplars"]]
        assert exemplars and all(len(e["labels"]["trace_id"]) == 32 for e in exemplars)
        await query_each(server, dashboard_queries(fleet=False))  # every panel but the fleet's
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_the_dashboard_shows_which_host_of_a_fleet_served_what(tmp_path, start_gateway):
    binary = tool("prometheus")
    hosts = [FakeLMStudio([MODEL]), FakeLMStudio([MODEL])]
    for fake in hosts:
        fake.listen()
    gateway = start_gateway({"INFERENCE_INFERENCE_UPSTREAMS": ",".join(fake.url for fake in hosts)})
    server = PrometheusServer(tmp_path, f"127.0.0.1:{gateway.port.getHost().port}")
    server.start(binary)
    try:
        await server.until('up{job="inference"} == 1')
        for round_number in range(2):  # a rate() needs two samples of a series
            for i in range(4):
                chat = {"model": MODEL, "messages": [{"role": "user", "content": f"conversation {i}"}]}
                assert (await gateway.post_chat(chat)).status == 200
            await server.until(f"sum(inference_routing_decisions_total) == {4 * (round_number + 1)}")
        await query_each(server, dashboard_queries(fleet=True))
        served = await server.query("sum by (upstream) (inference_routing_decisions_total)")
        assert {series["metric"]["upstream"]: float(series["value"][1]) for series in served} == {
            fake.url[7:]: float(len([r for r in fake.received if r.path == "/v1/chat/completions"]))
            for fake in hosts if any(r.path == "/v1/chat/completions" for r in fake.received)}
    finally:
        await server.stop()
        for fake in hosts:
            await fake.stop()
