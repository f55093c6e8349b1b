"""OpenTelemetry traces, exported over OTLP to a real receiver: names, kinds, parentage, attributes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from .conftest import call, hold_the_slot, queue_behind, raw_connect, raw_post
from .fakes.collector import Collector
from .test_daemon import TWISTD, spawn, stop

MODEL = "qwen2.5-7b-instruct"
SERVER_SPAN = "POST /v1/chat/completions"
CLIENT_SPAN = f"chat {MODEL}"


def chat(text: str = "hello there", **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
def collector() -> Any:
    receiver = Collector()
    receiver.start()
    yield receiver
    pytest_twisted.blockon(receiver.stop())


@pytest.fixture(params=["lean", "sdk"])
def traced(request, fake, start_gateway, collector):
    """A gateway in front of the fake LM Studio, exporting spans over OTLP gRPC to the test collector, its spans
    made lean (the default) or by the OpenTelemetry SDK (``tracing.implementation: sdk``): both must pass."""
    def start(**settings: str):
        env = {"INFERENCE_INFERENCE_BASE_URL": fake.url,
               "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp",
               "INFERENCE_OBSERVABILITY_TRACING_IMPLEMENTATION": request.param,
               "INFERENCE_OBSERVABILITY_TRACING_ENDPOINT": collector.grpc_endpoint}
        env.update({"INFERENCE_" + key.upper(): value for key, value in settings.items()})
        return start_gateway(env)
    return start


async def spans_of(gateway, collector, count: int) -> list:
    """Flush the gateway's spans and wait until ``count`` chat spans (server + client) arrived."""
    await gateway.site.gateway.telemetry.tracing.flush()
    return await collector.wait_for(lambda spans: len(spans) >= count)


def pair(collector: Collector) -> tuple:
    (server,) = collector.named(SERVER_SPAN)
    (client,) = collector.named(CLIENT_SPAN)
    return server, client


@pytest_twisted.ensureDeferred
async def test_a_chat_is_a_server_span_with_a_client_span_child(fake, traced, collector):
    gateway = traced()
    reply = await gateway.post_chat(chat(), headers={"User-Agent": "pytest-agent"})
    assert reply.status == 200
    await spans_of(gateway, collector, 2)
    server, client = pair(collector)
    assert server.kind == "SERVER" and client.kind == "CLIENT"
    assert client.trace_id == server.trace_id and client.parent_span_id == server.span_id
    assert server.parent_span_id == ""  # no traceparent came in: a new trace
    assert server.resource["service.name"] == "inference" and server.resource["service.version"] == "0.1.0"
    port = gateway.port.getHost().port
    assert server.attributes == {
        "http.request.method": "POST", "http.route": "/v1/chat/completions", "url.path": "/v1/chat/completions",
        "url.scheme": "http", "server.address": "127.0.0.1", "server.port": port, "client.address": "127.0.0.1",
        "network.protocol.version": "1.1", "user_agent.original": "pytest-agent", "http.response.status_code": 200}
    assert server.status == "UNSET"
    fake_port = int(fake.url.rsplit(":", 1)[1])
    assert client.attributes == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "lmstudio", "gen_ai.request.model": MODEL,
        "gen_ai.request.stream": False, "gen_ai.request.max_tokens": 100, "gen_ai.request.temperature": 0.7,
        "server.address": "127.0.0.1", "server.port": fake_port,
        "gen_ai.response.id": "chatcmpl-fake123", "gen_ai.response.model": MODEL,
        "gen_ai.response.finish_reasons": ["stop"], "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 3, "inference.usage.source": "upstream"}
    assert client.event("first_token") is None  # a non-streaming answer has no first token to time
    assert server.start <= client.start <= client.end <= server.end


@pytest_twisted.ensureDeferred
async def test_the_upstream_request_carries_the_client_span_as_traceparent(fake, traced, collector):
    gateway = traced()
    await gateway.post_chat(chat())
    await spans_of(gateway, collector, 2)
    _, client = pair(collector)
    sent = [r for r in fake.received if r.path == "/v1/chat/completions"][-1]
    version, trace_id, parent_id, flags = sent.headers["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", client.trace_id, client.span_id)
    assert int(flags, 16) & 1  # sampled


@pytest_twisted.ensureDeferred
async def test_an_incoming_traceparent_is_continued(fake, traced, collector):
    gateway = traced()
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    await gateway.post_chat(chat(stream=True), headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    await spans_of(gateway, collector, 2)
    server, client = pair(collector)
    assert server.trace_id == client.trace_id == trace_id
    assert server.parent_span_id == parent
    sent = [r for r in fake.received if r.path == "/v1/chat/completions"][-1]
    assert sent.headers["traceparent"].startswith(f"00-{trace_id}-{client.span_id}-")


async def streamed_spans(gateway: Any, collector: Any, **options: Any) -> tuple[Any, Any, float]:
    """A streamed chat's SERVER and CLIENT spans and its time to first chunk, once the first_token event is
    checked: inside the CLIENT span, at the measured moment."""
    reply = await gateway.post_chat(chat("one two three", stream=True, **options))
    assert reply.status == 200
    await spans_of(gateway, collector, 2)
    server, client = pair(collector)
    first = client.event("first_token")
    assert first is not None and client.start < first.time <= client.end
    ttfc = client.attributes["gen_ai.response.time_to_first_chunk"]
    assert 0 < ttfc <= (client.end - client.start) / 1e9
    assert abs((first.time - client.start) / 1e9 - ttfc) < 1e-3
    return server, client, ttfc


@pytest_twisted.ensureDeferred
async def test_a_stream_has_a_first_token_event_and_time_to_first_chunk(fake, traced, collector):
    server, client, _ = await streamed_spans(traced(), collector, top_p=0.9, stop=["\n\n"], seed=7)
    assert client.attributes["gen_ai.request.stream"] is True
    assert client.attributes["gen_ai.request.top_p"] == 0.9
    assert client.attributes["gen_ai.request.seed"] == 7
    assert client.attributes["gen_ai.request.stop_sequences"] == ["\n\n"]
    assert client.attributes["gen_ai.response.id"] == "chatcmpl-fakestream"
    assert client.attributes["gen_ai.usage.output_tokens"] == 4
    assert client.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert server.attributes["http.response.status_code"] == 200 and server.status == "UNSET"


@pytest_twisted.ensureDeferred
async def test_the_first_token_sits_inside_its_span_when_the_reactor_was_held_as_the_call_began(
        fake, traced, collector, monkeypatch):
    """A busy machine can deschedule the reactor between the call's start (timed by the monotonic clock) and its
    span's start (by the wall clock). Here the call's own clock readings are 50 ms behind the span's and the first
    token's, as after such a pause: the first token is placed from the call's start, read together on both clocks,
    so it still falls inside the span, at the measured time to first chunk."""
    import time

    from inference.telemetry import recorder
    monkeypatch.setattr(recorder, "perf_counter", lambda: time.perf_counter() - 0.05)
    monkeypatch.setattr(recorder, "time_ns", lambda: time.time_ns() - 50_000_000)
    _, _, time_to_first_chunk = await streamed_spans(traced(), collector)
    assert time_to_first_chunk >= 0.05


@pytest_twisted.ensureDeferred
async def test_output_tokens_the_gateway_counted_say_so(fake, traced, collector):
    fake.chat.stream = "no_usage"
    gateway = traced()
    assert (await gateway.post_chat(chat("one two three", stream=True))).status == 200
    await spans_of(gateway, collector, 2)
    _, client = pair(collector)
    assert client.attributes["gen_ai.usage.output_tokens"] == 4
    assert client.attributes["inference.usage.source"] == "counted"
    assert "gen_ai.usage.input_tokens" not in client.attributes


@pytest_twisted.ensureDeferred
async def test_completions_and_embeddings_have_client_spans_named_for_their_operation(fake, traced, collector):
    gateway = traced()
    await call("POST", gateway.url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 7})
    await call("POST", gateway.url + "/v1/embeddings", {"model": MODEL, "input": ["a", "b"]})
    await spans_of(gateway, collector, 4)
    (completion,) = collector.named(f"text_completion {MODEL}")
    assert completion.kind == "CLIENT" and completion.attributes["gen_ai.operation.name"] == "text_completion"
    assert completion.attributes["gen_ai.request.max_tokens"] == 7
    assert completion.attributes["gen_ai.usage.output_tokens"] == 3
    (embedding,) = collector.named(f"embeddings {MODEL}")
    assert embedding.attributes["gen_ai.operation.name"] == "embeddings"
    assert embedding.attributes["gen_ai.embeddings.dimension.count"] == 3
    assert embedding.attributes["gen_ai.usage.input_tokens"] == 4
    assert "gen_ai.usage.output_tokens" not in embedding.attributes and "gen_ai.response.id" not in embedding.attributes
    assert {s.name for s in collector.spans if s.kind == "SERVER"} == {"POST /v1/completions", "POST /v1/embeddings"}


@pytest_twisted.ensureDeferred
async def test_a_wait_for_an_upstream_slot_is_a_span_event(fake, traced, collector):
    gateway = traced(inference_max_concurrent_requests="1")
    first = await hold_the_slot(gateway, fake, chat("first"))
    second = await queue_behind(gateway, chat("second"))
    fake.chat.mode = "normal"
    fake.release()
    assert (await first).status == 200 and (await second).status == 200
    await spans_of(gateway, collector, 4)
    servers = sorted(collector.named(SERVER_SPAN), key=lambda span: span.start)
    assert [s.event("queued") is not None for s in servers] == [False, True]
    queued, waited = servers[1].event("queued"), servers[1].attributes["inference.queue.wait_seconds"]
    client = next(s for s in collector.named(CLIENT_SPAN) if s.parent_span_id == servers[1].span_id)
    assert servers[1].start <= queued.time < client.start  # the wait sits before the upstream call
    assert abs((client.start - queued.time) / 1e9 - waited) < 0.005


@pytest_twisted.ensureDeferred
async def test_an_upstream_failure_marks_both_spans_as_errors(fake, traced, collector):
    gateway = traced()
    fake.chat.mode, fake.chat.status = "error_string", 503
    assert (await gateway.post_chat(chat())).status == 500
    await spans_of(gateway, collector, 2)
    server, client = pair(collector)
    assert client.status == "ERROR" and "HTTP 503" in client.status_message
    assert client.attributes["error.type"] == "upstream_error"
    assert server.status == "ERROR" and server.attributes["error.type"] == "upstream_error"
    assert server.attributes["http.response.status_code"] == 500


@pytest_twisted.ensureDeferred
async def test_a_stream_failing_after_the_200_is_an_error_span(fake, traced, collector):
    gateway = traced()
    fake.chat.stream = "die"
    reply = await gateway.post_chat(chat(stream=True))
    assert reply.status == 200
    await spans_of(gateway, collector, 2)
    server, client = pair(collector)
    assert client.status == "ERROR" and client.attributes["error.type"] == "upstream_error"
    assert client.event("first_token") is not None  # two words arrived before the upstream died
    assert server.attributes["http.response.status_code"] == 200
    assert server.status == "ERROR" and server.attributes["error.type"] == "upstream_error"


@pytest_twisted.ensureDeferred
async def test_a_client_error_is_not_a_server_error(fake, traced, collector):
    gateway = traced()
    assert (await gateway.post_chat({"messages": "nope"})).status == 400
    await call("GET", gateway.url + "/v1/models")
    await spans_of(gateway, collector, 2)
    (server,) = collector.named(SERVER_SPAN)
    assert server.status == "UNSET" and server.attributes["http.response.status_code"] == 400
    assert not [s for s in collector.spans if s.kind == "CLIENT"]  # nothing reached the upstream
    assert collector.named("GET /v1/models")


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_ends_both_spans(fake, traced, collector):
    gateway = traced()
    fake.chat.stream = "stall"
    closed = fake.next_close()
    client = await raw_connect(gateway.port.getHost().port)
    client.transport.write(raw_post("/v1/chat/completions", json.dumps(chat(stream=True)).encode()))
    await client.received(b'" hello"')
    client.transport.loseConnection()
    await closed
    await spans_of(gateway, collector, 2)
    server, upstream = pair(collector)
    assert upstream.status == "ERROR" and upstream.attributes["error.type"] == "cancelled"
    assert server.event("client_disconnected") is not None
    assert "http.response.status_code" not in server.attributes


@pytest_twisted.ensureDeferred
async def test_probes_and_scrapes_are_not_traced(fake, traced, collector):
    gateway = traced()
    await call("GET", gateway.url + "/health/live")
    await call("GET", gateway.url + "/health/ready")
    await call("GET", gateway.url + "/metrics")
    await call("GET", gateway.url + "/health")
    await spans_of(gateway, collector, 1)
    assert [s.name for s in collector.spans if s.kind == "SERVER"] == ["GET /health"]


@pytest_twisted.ensureDeferred
async def test_content_is_recorded_only_when_the_operator_opts_in(fake, traced, collector):
    quiet = traced()
    await quiet.post_chat(chat("my secret prompt"))
    await quiet.post_chat(chat("my secret prompt", stream=True))
    await spans_of(quiet, collector, 4)
    assert "secret" not in repr([s.attributes for s in collector.spans])
    collector.spans.clear()

    loud = traced(observability_tracing_capture_content="true")
    await loud.post_chat(chat("tell me"))
    await loud.post_chat(chat("stream me", stream=True))
    await spans_of(loud, collector, 4)
    plain, streamed = collector.named(CLIENT_SPAN)
    assert json.loads(plain.attributes["gen_ai.input.messages"]) == [{"role": "user", "content": "tell me"}]
    assert json.loads(plain.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "content": "echo: tell me"}]
    assert json.loads(streamed.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "content": "echo: stream me"}]


@pytest_twisted.ensureDeferred
async def test_calls_with_big_prompts_captured_all_reach_the_collector(fake, traced, collector):
    """Eight calls of 600 kB prompts with content capture make more than 4.8 MB of spans: in one request the collector
    (gRPC's default 4 MiB limit) would refuse them all. They arrive in several requests, every span."""
    gateway = traced(observability_tracing_capture_content="true")
    prompt = "word " * 120_000
    for _ in range(8):
        reply = await gateway.post_chat(chat(prompt))
        assert reply.status == 200
    tracing = gateway.site.gateway.telemetry.tracing
    await tracing.flush()
    assert (tracing.status.exported_spans, tracing.status.failed_spans) == (16, 0)
    spans = await collector.wait_for(lambda spans: len(spans) >= 16)
    assert len(spans) == 16 and collector.batches >= 2  # (4.8 MB of prompts alone)
    assert all(len(s.attributes["gen_ai.input.messages"]) > 600_000 for s in collector.named(CLIENT_SPAN))


@pytest.mark.parametrize("implementation", ["lean", "sdk"])
@pytest_twisted.ensureDeferred
async def test_big_prompts_captured_reach_an_http_collector_too(fake, start_gateway, collector, implementation):
    """Over OTLP/HTTP the SDK's exporter sent a batch (64 spans) as one request: past the collector's body limit
    (``max_request_body_size``, here 4 MiB) it was refused whole. Batches are cut by size on this protocol too."""
    collector.max_http_bytes = 4 * 1024 * 1024
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp",
                             "INFERENCE_OBSERVABILITY_TRACING_IMPLEMENTATION": implementation,
                             "INFERENCE_OBSERVABILITY_TRACING_PROTOCOL": "http/protobuf",
                             "INFERENCE_OBSERVABILITY_TRACING_CAPTURE_CONTENT": "true",
                             "INFERENCE_OBSERVABILITY_TRACING_ENDPOINT": collector.http_endpoint})
    prompt = "word " * 120_000
    for _ in range(8):
        assert (await gateway.post_chat(chat(prompt))).status == 200
    tracing = gateway.site.gateway.telemetry.tracing
    await tracing.flush()
    assert (tracing.status.exported_spans, tracing.status.failed_spans) == (16, 0)
    spans = await collector.wait_for(lambda spans: len(spans) >= 16)
    assert len(spans) == 16 and collector.batches >= 2 and collector.refused == 0
    assert all(len(s.attributes["gen_ai.input.messages"]) > 600_000 for s in collector.named(CLIENT_SPAN))


@pytest_twisted.ensureDeferred
async def test_api_keys_never_reach_a_span(fake, traced, collector):
    fake.require_key = "upstream-key-123"
    gateway = traced(server_api_keys="client-key-456", inference_provider="openai",
                     inference_api_key="upstream-key-123")
    fake.models = ["gpt-4o-mini"]
    reply = await gateway.post_chat({**chat(), "model": "gpt-4o-mini"},
                                    headers={"Authorization": "Bearer client-key-456"})
    assert reply.status == 200
    assert (await gateway.post_chat(chat(), headers={"Authorization": "Bearer wrong-key-789"})).status == 401
    await spans_of(gateway, collector, 3)
    everything = repr([(s.attributes, s.events, s.status_message, s.resource) for s in collector.spans])
    for secret in ("client-key-456", "upstream-key-123", "wrong-key-789", "Bearer"):
        assert secret not in everything


@pytest_twisted.ensureDeferred
async def test_spans_go_over_http_protobuf_too(fake, start_gateway, collector):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp",
                             "INFERENCE_OBSERVABILITY_TRACING_PROTOCOL": "http/protobuf",
                             "INFERENCE_OBSERVABILITY_TRACING_ENDPOINT": collector.http_endpoint})
    await gateway.post_chat(chat())
    await spans_of(gateway, collector, 2)
    server, client = pair(collector)
    assert client.parent_span_id == server.span_id


@pytest_twisted.ensureDeferred
async def test_the_standard_otel_variables_choose_the_collector(fake, start_gateway, collector):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp",
                             "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                             "OTEL_EXPORTER_OTLP_ENDPOINT": collector.http_endpoint,
                             "OTEL_SERVICE_NAME": "my-gateway"})
    await gateway.post_chat(chat())
    await spans_of(gateway, collector, 2)
    assert {s.resource["service.name"] for s in collector.spans} == {"my-gateway"}
    tracing = (await call("GET", gateway.url + "/health")).json()["observability"]["tracing"]
    assert tracing["endpoint"] == collector.http_endpoint + "/v1/traces"
    assert tracing["export"]["ok"] is True and tracing["export"]["exported_spans"] == 2


@pytest_twisted.ensureDeferred
async def test_sampling_follows_the_ratio_and_the_callers_decision(fake, traced, collector):
    gateway = traced(observability_tracing_sample_ratio="0")
    await gateway.post_chat(chat())
    sent = [r for r in fake.received if r.path == "/v1/chat/completions"][-1]
    assert not int(sent.headers["traceparent"][-2:], 16) & 1  # not sampled, yet the trace still propagates
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    await gateway.post_chat(chat(), headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"})
    await spans_of(gateway, collector, 2)
    assert {s.trace_id for s in collector.spans} == {trace_id}  # the caller sampled this one


@pytest_twisted.ensureDeferred
async def test_a_collector_that_is_down_costs_one_log_line_and_nothing_else(fake, start_gateway, collector):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        port = int(collector.http_endpoint.rsplit(":", 1)[1])
        await collector.stop_http()  # the collector is down
        gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                                 "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp",
                                 "INFERENCE_OBSERVABILITY_TRACING_PROTOCOL": "http/protobuf",
                                 "OTEL_EXPORTER_OTLP_TIMEOUT": "0.5",
                                 "INFERENCE_OBSERVABILITY_TRACING_ENDPOINT": collector.http_endpoint})
        tracing = gateway.site.gateway.telemetry.tracing
        for _ in range(3):
            assert (await gateway.post_chat(chat())).status == 200
            await tracing.flush()
        health = (await call("GET", gateway.url + "/health")).json()["observability"]["tracing"]["export"]
        assert health["ok"] is False and health["failed_spans"] == 6 and health["last_error"]
        failing = [e for e in events if "is failing" in e.get("log_format", "")]
        assert len(failing) == 1
        metrics = await gateway.metrics()
        assert metrics.value("inference_spans_dropped_total", reason="export_failed") == 6
        assert metrics.value("inference_spans_dropped_total", reason="queue_full") == 0
        assert collector.http_endpoint in failing[0]["destination"]

        collector.listen_http(port)  # the collector is back
        assert (await gateway.post_chat(chat())).status == 200
        await tracing.flush()
        await collector.wait_for(lambda spans: len(spans) >= 2)
        assert [e for e in events if "works again" in e.get("log_format", "")]
        health = (await call("GET", gateway.url + "/health")).json()["observability"]["tracing"]["export"]
        assert health["ok"] is True
    finally:
        globalLogPublisher.removeObserver(events.append)


@pytest.mark.daemon
@pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")
@pytest_twisted.ensureDeferred
async def test_twistd_with_an_otlp_endpoint_exports_complete_traces(tmp_path, fake, collector):
    daemon, transport = spawn(["--listen", "tcp:0:interface=127.0.0.1"],
                              {"INFERENCE_INFERENCE_BASE_URL": fake.url,
                               "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp",
                               "OTEL_EXPORTER_OTLP_ENDPOINT": collector.grpc_endpoint}, str(tmp_path))
    try:
        url = f"http://127.0.0.1:{await daemon.port()}/v1/chat/completions"
        assert (await call("POST", url, chat("stream this", stream=True))).status == 200
        fake.chat.mode = "error_string"
        assert (await call("POST", url, chat("fail this"))).status == 500
    finally:
        assert await stop(daemon, transport)  # stopping flushes the spans not yet exported
    spans = await collector.wait_for(lambda spans: len(spans) >= 4)
    traces = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    assert len(traces) == 2
    for trace in traces.values():
        server, client = sorted(trace, key=lambda s: s.kind != "SERVER")
        assert (server.name, server.kind, client.name, client.kind) == (SERVER_SPAN, "SERVER", CLIENT_SPAN, "CLIENT")
        assert client.parent_span_id == server.span_id
    streamed, failed = sorted(traces.values(), key=lambda t: any(s.status == "ERROR" for s in t))
    assert [s.event("first_token") is not None for s in streamed if s.kind == "CLIENT"] == [True]
    assert {s.status for s in failed} == {"ERROR"}


@pytest_twisted.ensureDeferred
async def test_a_tenants_call_names_the_tenant_and_its_key_id_never_the_key(fake, traced, collector, tmp_path):
    from inference.tenants import key_hash

    from .test_tenants import KEYS, key_file, tenant
    gateway = traced(server_api_keys_file=key_file(tmp_path, tenant("alice")))
    reply = await gateway.post_chat(chat(), headers={"Authorization": f"Bearer {KEYS['alice']}"})
    assert reply.status == 200
    await spans_of(gateway, collector, 2)
    server, client = pair(collector)
    assert server.attributes["inference.tenant"] == "alice"
    assert server.attributes["inference.key_id"] == "key_" + key_hash(KEYS["alice"].encode())[7:15]
    assert KEYS["alice"] not in repr(server.attributes) + repr(client.attributes)


class Sent:
    """A sender that keeps what it was given (lean spans, as the SDK's readable spans)."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.size = lambda span: 0  # spans are not weighed

    def prepare(self, span: Any) -> Any:
        return span.readable()

    def send(self, batch: list[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult
        self.batches.append(batch)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def test_a_full_export_queue_drops_spans_with_one_warning_and_no_log_record_per_span(caplog):
    """The SDK's batch processor logged a warning per dropped span (each a record its filter then threw away)."""
    import logging

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    from opentelemetry.trace import SpanKind

    from inference.telemetry.export import ExportQueue, ExportStatus
    from inference.telemetry.spans import make_tracer

    reports: list[tuple[str, str]] = []
    dropped: list[tuple[str, int]] = []
    sent, status = Sent(), ExportStatus()
    queue = ExportQueue(sent, "collector", batch_size=100, status=status,
                        report=lambda level, text, **fields: reports.append((level, text)),
                        dropped=lambda reason, count: dropped.append((reason, count)), max_queue=4, delay=3600)
    tracer = make_tracer("lean", Resource.create({}), TraceIdRatioBased(1.0), RandomIdGenerator(), queue)
    caplog.set_level(logging.DEBUG)
    try:
        for n in range(10):  # no export yet (the batch is not full, the delay is an hour): 4 fit, 6 are dropped
            tracer.start_span(f"span {n}", SpanKind.SERVER, {}, None).end()
        assert dropped == [("queue_full", 1)] * 6 and status.dropped_spans == 6
        assert [level for level, _ in reports] == ["warn"] and "cannot keep up" in reports[0][1]
        assert caplog.records == []  # not one Python log record for the drops
        queue.force_flush()
        assert [[span.name for span in batch] for batch in sent.batches] == [[f"span {n}" for n in range(4)]]
        assert reports[1][0] == "info" and "caught up" in reports[1][1]
        tracer.start_span("after", SpanKind.SERVER, {}, None).end()  # room again, no new warning
        assert len(reports) == 2 and len(dropped) == 6
    finally:
        queue.shutdown()
    assert [span.name for span in sent.batches[-1]] == ["after"]  # what was queued went out at shutdown


class HeldSent(Sent):
    """A sender whose first batch waits until the test lets it go, and which says when each batch arrived."""

    def __init__(self) -> None:
        import threading
        super().__init__()
        self.sending, self.go, self.arrived = threading.Event(), threading.Event(), threading.Semaphore(0)

    def send(self, batch: list[Any]) -> Any:
        if not self.batches:
            self.sending.set()
            assert self.go.wait(10)
        result = super().send(batch)
        self.arrived.release()
        return result


def watched_wake() -> tuple[Any, Any]:
    """An event class for the export thread's wake-up that also says each time the thread starts waiting on it
    (back at its loop's first line), and that event."""
    import threading
    waiting = threading.Event()

    class Wake(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waiting.set()
            return super().wait(timeout)

    return Wake, waiting


def test_spans_that_end_while_a_batch_is_sent_wait_for_the_next_whole_batch():
    """Spans keep ending while a batch is on its way; the thread used to send them at once, as a batch of their own:
    exports of a few dozen spans, 54 a second at one client where 5 of 512 carry the same spans, each a gRPC call
    and wake-ups of gRPC's threads on the reactor's core. They now go out at the head of the next whole batch (or
    when the delay passes, on a flush, at shutdown)."""
    from unittest import mock

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    from opentelemetry.trace import SpanKind

    from inference.telemetry import export
    from inference.telemetry.export import ExportQueue, ExportStatus
    from inference.telemetry.spans import make_tracer

    sent, status = HeldSent(), ExportStatus()
    wake, waiting = watched_wake()
    with mock.patch.object(export.threading, "Event", wake):  # (the queue's own wake-up only)
        queue = ExportQueue(sent, "collector", batch_size=4, status=status, report=lambda *a, **k: None,
                            dropped=lambda reason, count: None, delay=3600)
    tracer = make_tracer("lean", Resource.create({}), TraceIdRatioBased(1.0), RandomIdGenerator(), queue)

    def end(*numbers: int) -> None:
        for n in numbers:
            tracer.start_span(f"span {n}", SpanKind.SERVER, {}, None).end()

    try:
        end(0, 1, 2, 3)  # a whole batch wakes the thread
        assert sent.sending.wait(10)
        end(4, 5)  # ... and two more end while it is being sent
        waiting.clear()
        sent.go.set()
        assert waiting.wait(10)  # the thread is back in its wait (having sent them first, had it drained the queue)
        end(6, 7)  # the next whole batch
        assert sent.arrived.acquire(timeout=10) and sent.arrived.acquire(timeout=10)
        assert [[span.name for span in batch] for batch in sent.batches] == [
            [f"span {n}" for n in range(4)], [f"span {n}" for n in range(4, 8)]]
        end(8)
    finally:
        queue.shutdown()
    assert [span.name for span in sent.batches[-1]] == ["span 8"]  # the rest went out at shutdown
    assert status.exported_spans == 9


def test_the_sdks_spans_are_weighed_for_the_queues_bound_too():
    """With ``implementation: sdk`` or an exporter other than OTLP/gRPC, the queue holds the SDK's spans, not bytes:
    they are weighed by their strings (whole prompts with capture_content), so the queue's bytes stay bounded."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    from opentelemetry.trace import SpanKind

    from inference.telemetry.export import ExportQueue, ExportStatus, SpanSender
    from inference.telemetry.spans import make_tracer

    class Kept(SpanExporter):
        def __init__(self) -> None:
            self.batches: list[list[str]] = []

        def export(self, spans: Any) -> SpanExportResult:
            self.batches.append([span.name for span in spans])
            return SpanExportResult.SUCCESS

    kept, status = Kept(), ExportStatus()
    queue = ExportQueue(SpanSender(kept), "collector", batch_size=64, status=status, report=lambda *a, **k: None,
                        dropped=lambda reason, count: None, delay=3600, max_queue_bytes=5 * 512 * 1024)
    tracer = make_tracer("sdk", Resource.create({}), TraceIdRatioBased(1.0), RandomIdGenerator(), queue)
    prompt = "word " * 200_000  # a megabyte
    try:
        for n in range(4):  # two fit in 2.5 MiB with their events; the others are dropped
            span = tracer.start_span(f"{n}", SpanKind.CLIENT, {"gen_ai.input.messages": prompt}, None)
            span.add_event("first_token", {"note": "x" * 1000})
            span.end()
        span = tracer.start_span("small", SpanKind.CLIENT, {"gen_ai.request.model": "m"}, None)
        span.end()  # a small one still fits
        assert status.dropped_spans == 2
        queue.force_flush()
        assert kept.batches == [["0", "1", "small"]]
    finally:
        queue.shutdown()


class SentBytes:
    """An encoded-span sender that keeps each export's items (what EncodedSender joins into one request)."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.size = len

    def prepare(self, span: Any) -> bytes:
        return span.name.encode() * span.attributes["size"]

    def send(self, batch: list[bytes]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult
        self.batches.append(batch)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def test_an_export_stays_under_the_collectors_message_limit():
    """Spans that carry prompts and answers (capture_content) are big: 512 of them in one gRPC message would pass
    the 4 MiB a collector takes by default, and the whole batch would be refused. Exports are cut by size too; a
    span bigger than the limit goes alone, and the order is kept."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    from opentelemetry.trace import SpanKind

    from inference.telemetry.export import MAX_EXPORT_BYTES, ExportQueue, ExportStatus
    from inference.telemetry.spans import make_tracer

    assert MAX_EXPORT_BYTES <= 4 * 1024 * 1024 - 16 * 1024  # room for the request's resource and scope
    sent, status = SentBytes(), ExportStatus()
    queue = ExportQueue(sent, "collector", batch_size=512, status=status, report=lambda *a, **k: None,
                        dropped=lambda reason, count: None, delay=3600)
    tracer = make_tracer("lean", Resource.create({}), TraceIdRatioBased(1.0), RandomIdGenerator(), queue)
    megabyte = 1024 * 1024
    sizes = [1500 * 1024] * 5 + [5 * megabyte] + [10] * 3  # 1.5 MB each, one of 5 MB, three small ones
    try:
        for n, size in enumerate(sizes):
            tracer.start_span(f"{n}", SpanKind.SERVER, {"size": size}, None).end()
        queue.force_flush()
    finally:
        queue.shutdown()
    assert [[item[:1].decode() for item in batch] for batch in sent.batches] == [
        ["0", "1"], ["2", "3"], ["4"], ["5"], ["6", "7", "8"]]
    assert all(sum(map(len, batch)) <= MAX_EXPORT_BYTES for batch in sent.batches if len(batch) > 1)
    assert status.exported_spans == len(sizes)


def test_the_export_queue_holds_a_bounded_number_of_bytes_whatever_the_count():
    """Spans that carry whole prompts are big: 2,048 of them could hold gigabytes while a collector is slow. Past
    the queue's bytes, a span is dropped as when it is full by count; once exported, there is room again."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    from opentelemetry.trace import SpanKind

    from inference.telemetry.export import MAX_QUEUE_BYTES, ExportQueue, ExportStatus
    from inference.telemetry.spans import make_tracer

    assert MAX_QUEUE_BYTES <= 64 * 1024 * 1024
    dropped: list[tuple[str, int]] = []
    sent, status = SentBytes(), ExportStatus()
    queue = ExportQueue(sent, "collector", batch_size=512, status=status, report=lambda *a, **k: None,
                        dropped=lambda reason, count: dropped.append((reason, count)), delay=3600,
                        max_queue_bytes=1000)
    tracer = make_tracer("lean", Resource.create({}), TraceIdRatioBased(1.0), RandomIdGenerator(), queue)
    try:
        for n in range(4):  # 400 bytes each: two fit in 1,000
            tracer.start_span(f"{n}", SpanKind.SERVER, {"size": 400}, None).end()
        assert dropped == [("queue_full", 1)] * 2 and status.dropped_spans == 2
        queue.force_flush()
        assert [[item[:1] for item in batch] for batch in sent.batches] == [[b"0", b"1"]]
        for n in range(4, 6):  # room again for two
            tracer.start_span(f"{n}", SpanKind.SERVER, {"size": 400}, None).end()
        assert len(dropped) == 2
    finally:
        queue.shutdown()
    assert [item[:1] for item in sent.batches[-1]] == [b"4", b"5"]


@pytest.mark.parametrize("variable", ["OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_SCHEDULE_DELAY",
                                      "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"])
def test_the_batch_settings_take_whole_numbers_and_say_which_one_is_wrong(variable):
    from twisted.internet.task import Clock

    from inference.config import ConfigError, TracingConfig
    from inference.telemetry.tracing import Tracing

    with pytest.raises(ConfigError, match=f"{variable} = 'soon': expected a whole number >= 1"):
        Tracing(TracingConfig(), {variable: "soon"}, Clock())  # type: ignore[arg-type]
    tracing = Tracing(TracingConfig(), {variable: "7"}, Clock())  # type: ignore[arg-type]
    assert tracing.queue is not None
    tracing.queue.shutdown()


@pytest.mark.parametrize("implementation", ["lean", "sdk"])
@pytest_twisted.ensureDeferred
async def test_the_console_exporter_prints_both_spans(fake, start_gateway, capsys, implementation):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "console",
                             "INFERENCE_OBSERVABILITY_TRACING_IMPLEMENTATION": implementation})
    assert (await gateway.post_chat(chat())).status == 200
    await gateway.site.gateway.telemetry.tracing.flush()
    printed = capsys.readouterr().out
    spans = [json.loads(text + "}") for text in printed.split("\n}\n") if text.strip().startswith("{")]
    assert sorted(span["name"] for span in spans) == [SERVER_SPAN, CLIENT_SPAN]
    (client,) = [span for span in spans if span["name"] == CLIENT_SPAN]
    assert client["attributes"]["gen_ai.usage.output_tokens"] == 3 and client["kind"] == "SpanKind.CLIENT"


def test_span_starts_kept_for_made_up_models_stay_bounded(in_memory, fake):
    """What CLIENT spans start with is kept per model: models a client makes up must not pile up in memory."""
    from inference.operations import CHAT

    gateway = in_memory({"INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "none"})
    telemetry = gateway.gateway.telemetry
    first = telemetry.client_start(CHAT, "qwen", False)
    assert telemetry.client_start(CHAT, "qwen", False) is first  # made once
    for n in range(2_000):
        telemetry.client_start(CHAT, f"made-up-{n}", False)
    assert len(telemetry._client_starts) <= 256
    huge = "m" * 100_000
    assert telemetry.client_start(CHAT, huge, False) is not telemetry.client_start(CHAT, huge, False)  # never kept
    assert huge not in {model for _, model, _ in telemetry._client_starts}
