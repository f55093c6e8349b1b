"""Prometheus metrics at /metrics: values after known requests, labels, exemplars, load gauges."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from .conftest import call, hold_the_slot, queue_behind, raw_connect, raw_post

MODEL = "qwen2.5-7b-instruct"
CHAT = "/v1/chat/completions"
LABELS = {"operation": "chat", "provider": "lmstudio", "model": MODEL}
LOAD_METRICS = ("inference_requests_in_flight", "inference_queue_length")


def chat(text: str = "hello there", **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


@pytest_twisted.ensureDeferred
async def test_a_non_streaming_chat_is_counted_timed_and_its_tokens_equal_the_usage(fake, lmstudio):
    reply = await lmstudio.post_chat(chat())
    usage = reply.json()["usage"]
    m = await lmstudio.metrics()
    assert m.value("inference_http_requests_total", method="POST", route=CHAT, code="200") == 1
    assert m.value("inference_http_request_duration_seconds_count", method="POST", route=CHAT, code="200") == 1
    labels = LABELS
    assert m.value("inference_request_duration_seconds_count", **labels, stream="false", outcome="success") == 1
    assert m.value("inference_tokens_total", **labels, type="input") == usage["prompt_tokens"]
    assert m.value("inference_tokens_total", **labels, type="output") == usage["completion_tokens"]
    assert m.value("inference_time_to_first_token_seconds_count", **labels) is None  # not invented
    assert m.value("inference_time_per_output_token_seconds_count", **labels) == 1
    assert m.value("inference_output_tokens_per_second_count", **labels) == 1
    overhead = m.value("inference_gateway_overhead_seconds_sum", route=CHAT)
    # The gateway's own time is part of the request's, without the upstream's: less than the whole, whatever the
    # machine's load (against the upstream call's time alone it is not: a busy machine can pause after the answer).
    duration = m.value("inference_http_request_duration_seconds_sum", method="POST", route=CHAT, code="200")
    assert m.value("inference_gateway_overhead_seconds_count", route=CHAT) == 1
    assert 0 < overhead < duration
    assert m.value("inference_requests_in_flight", provider="lmstudio") == 0
    assert m.value("inference_upstream_up", provider="lmstudio") == 1
    assert m.value("inference_build_info", version="0.1.0") == 1


@pytest_twisted.ensureDeferred
async def test_a_stream_observes_time_to_first_token_and_counts_its_usage(fake, lmstudio):
    reply = await lmstudio.post_chat(chat("one two three four", stream=True))
    usage = json.loads(reply.body.split(b"data: ")[-2])["usage"]
    m = await lmstudio.metrics()
    labels = LABELS
    assert m.value("inference_request_duration_seconds_count", **labels, stream="true", outcome="success") == 1
    assert m.value("inference_time_to_first_token_seconds_count", **labels) == 1
    ttft = m.value("inference_time_to_first_token_seconds_sum", **labels)
    duration = m.value("inference_request_duration_seconds_sum", **labels, stream="true", outcome="success")
    assert 0 < ttft <= duration
    assert m.value("inference_tokens_total", **labels, type="input") == usage["prompt_tokens"] == 12
    assert m.value("inference_tokens_total", **labels, type="output") == usage["completion_tokens"] == 5
    assert m.value("inference_time_per_output_token_seconds_count", **labels) == 1
    assert m.value("inference_output_tokens_per_second_count", **labels) == 1
    assert m.value("inference_http_requests_total", method="POST", route=CHAT, code="200") == 1


@pytest_twisted.ensureDeferred
async def test_a_stream_without_usage_counts_its_content_deltas_as_output_tokens(fake, lmstudio, access_events):
    fake.chat.stream = "no_usage"  # llama.cpp's Python server, older LM Studio
    reply = await lmstudio.post_chat(chat("one two three four", stream=True))
    assert b'"usage"' not in reply.body
    m = await lmstudio.metrics()
    labels = LABELS
    assert m.value("inference_tokens_total", **labels, type="output") == 5  # "echo:", "one", ... "four"
    assert m.value("inference_tokens_total", **labels, type="input") is None  # a prompt count is never invented
    assert m.value("inference_output_tokens_per_second_count", **labels) == 1
    line = access_events[0]  # the chat's (the scrape has its own)
    assert (line["input_tokens"], line["output_tokens"]) == (None, 5)
    assert line["access_text"].endswith(" tokens=-/5")


@pytest_twisted.ensureDeferred
async def test_tokens_a_stream_generated_before_its_client_left_are_counted(fake, lmstudio):
    fake.chat.stream = "stall"  # two words, then silence
    closed = fake.next_close()
    client = await raw_connect(lmstudio.port.getHost().port)
    client.transport.write(raw_post(CHAT, json.dumps(chat(stream=True)).encode()))
    await client.received(b'" hello"')
    client.transport.loseConnection()
    await closed
    m = await lmstudio.metrics()
    assert m.value("inference_tokens_total", **LABELS, type="output") == 2


@pytest_twisted.ensureDeferred
async def test_the_mock_is_measured_the_same_way(start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock",
                             "INFERENCE_INFERENCE_MOCK_TOKEN_DELAY_SECS": "0.01"})
    await gateway.post_chat({"messages": [{"role": "user", "content": "a b c d"}], "stream": True})
    m = await gateway.metrics()
    labels = {"operation": "chat", "provider": "mock", "model": "mock-model"}
    assert m.value("inference_tokens_total", **labels, type="output") == 6  # "You said: a b c d"
    tpot = m.value("inference_time_per_output_token_seconds_sum", **labels)
    assert 0.005 < tpot < 0.5  # five gaps of 10 ms between six words


@pytest.mark.parametrize("setup, code, kind", [
    (lambda fake: setattr(fake.chat, "mode", "error_string") or setattr(fake.chat, "status", 500), "500",
     "server_error"),
    (lambda fake: setattr(fake.chat, "mode", "error_in_200"), "500", "server_error"),
    (lambda fake: setattr(fake.chat, "mode", "error_object") or setattr(fake.chat, "status", 400), "400",
     "rejected"),
    (lambda fake: setattr(fake.chat, "mode", "invalid_json"), "500", "bad_response"),
    (lambda fake: setattr(fake.chat, "mode", "drop"), "500", "interrupted"),
])
@pytest_twisted.ensureDeferred
async def test_upstream_errors_are_counted_by_kind(fake, lmstudio, setup, code, kind):
    setup(fake)
    reply = await lmstudio.post_chat(chat())
    assert str(reply.status) == code
    m = await lmstudio.metrics()
    assert m.total("inference_upstream_errors_total", provider="lmstudio", kind=kind) == 1
    assert m.total("inference_upstream_errors_total") == 1
    assert m.value("inference_http_requests_total", method="POST", route=CHAT, code=code) == 1
    assert m.value("inference_request_duration_seconds_count", **LABELS, stream="false",
                   outcome="error") == 1


@pytest.mark.parametrize("stream_mode, kind", [("die", "interrupted"), ("garbage", "bad_response"),
                                               ("error_event", "server_error")])
@pytest_twisted.ensureDeferred
async def test_a_stream_that_fails_after_the_200_counts_as_an_error(fake, lmstudio, stream_mode, kind):
    fake.chat.stream = stream_mode
    reply = await lmstudio.post_chat(chat(stream=True))
    assert reply.status == 200 and b'"error"' in reply.body
    m = await lmstudio.metrics()
    assert m.total("inference_upstream_errors_total", provider="lmstudio", kind=kind) == 1
    assert m.value("inference_request_duration_seconds_count", **LABELS, stream="true",
                   outcome="error") == 1
    assert m.value("inference_time_to_first_token_seconds_count", **LABELS) == 1


@pytest_twisted.ensureDeferred
async def test_a_timeout_is_counted(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "0.3"})
    await gateway.post_chat(chat())
    fake.chat.mode = "hang"
    assert (await gateway.post_chat(chat())).status == 504
    m = await gateway.metrics()
    assert m.total("inference_upstream_errors_total", provider="lmstudio", kind="timeout") == 1
    assert m.value("inference_upstream_up", provider="lmstudio") == 1  # slow is not down


@pytest_twisted.ensureDeferred
async def test_an_unreachable_upstream_is_counted_and_marked_down(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"})
    await gateway.post_chat(chat())
    await fake.stop()
    assert (await gateway.post_chat(chat())).status == 502
    m = await gateway.metrics()
    assert m.total("inference_upstream_errors_total", provider="lmstudio", kind="unreachable") == 1
    assert m.value("inference_upstream_up", provider="lmstudio") == 0
    fake.listen()  # for the fixture's teardown


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_stream_is_counted_and_in_flight_returns_to_zero(fake, lmstudio):
    fake.chat.stream = "stall"
    closed = fake.next_close()
    client = await raw_connect(lmstudio.port.getHost().port)
    client.transport.write(raw_post(CHAT, json.dumps(chat(stream=True)).encode()))
    await client.received(b'" hello"')
    during = await lmstudio.metrics()
    assert during.value("inference_requests_in_flight", provider="lmstudio") == 1
    client.transport.loseConnection()
    await closed
    m = await lmstudio.metrics()
    assert m.value("inference_client_disconnects_total", provider="lmstudio") == 1
    assert m.value("inference_requests_in_flight", provider="lmstudio") == 0
    assert m.value("inference_http_requests_total", method="POST", route=CHAT, code="499") == 1
    assert m.value("inference_request_duration_seconds_count", **LABELS, stream="true",
                   outcome="disconnected") == 1
    assert m.total("inference_upstream_errors_total") == 0  # the upstream did nothing wrong


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_a_non_streaming_call_is_counted(fake, lmstudio):
    await lmstudio.post_chat(chat())
    fake.chat.mode = "hang"
    arrived, closed = fake.next_arrival(), fake.next_close()
    client = await raw_connect(lmstudio.port.getHost().port)
    client.transport.write(raw_post(CHAT, json.dumps(chat()).encode()))
    await arrived
    client.transport.loseConnection()
    await closed
    m = await lmstudio.metrics()
    assert m.value("inference_client_disconnects_total", provider="lmstudio") == 1
    assert m.value("inference_requests_in_flight", provider="lmstudio") == 0


@pytest_twisted.ensureDeferred
async def test_queue_length_and_in_flight_follow_the_admission_control(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS": "1"})
    await gateway.post_chat(chat())
    first = await hold_the_slot(gateway, fake, chat())
    second = await queue_behind(gateway, chat())
    m = await gateway.metrics()
    assert m.value("inference_requests_in_flight", provider="lmstudio") == 1
    assert m.value("inference_queue_length", provider="lmstudio") == 1
    fake.chat.mode = "normal"
    fake.release()
    assert (await first).status == 200 and (await second).status == 200
    m = await gateway.metrics()
    assert [m.value(name, provider="lmstudio") for name in LOAD_METRICS] == [0, 0]
    # Every call's wait is observed: three found a free slot (0 s), the second of the pair waited for the first.
    assert m.value("inference_queue_wait_seconds_count", provider="lmstudio") == 3
    assert m.value("inference_queue_wait_seconds_bucket", provider="lmstudio", le="0.001") == 2
    assert m.value("inference_queue_wait_seconds_sum", provider="lmstudio") > 0


@pytest_twisted.ensureDeferred
async def test_labels_stay_bounded_whatever_clients_send(fake, lmstudio):
    await lmstudio.post_chat(chat(model="QWEN2.5-7B-INSTRUCT"))  # resolved case-insensitively
    await lmstudio.post_chat(chat(model="no-such-model-1"))
    await lmstudio.post_chat(chat(model="no-such-model-2"))
    await call("GET", lmstudio.url + "/some/random/path")
    await call("BREW", lmstudio.url + "/v1/models")
    await call("GET", lmstudio.url + "/v1/models/" + MODEL)
    m = await lmstudio.metrics()
    assert m.label_values("inference_request_duration_seconds_count", "model") == {MODEL}
    assert m.label_values("inference_http_requests_total", "route") == {
        CHAT, "other", "/v1/models", "/v1/models/{model}"}
    assert m.label_values("inference_http_requests_total", "method") == {"POST", "GET", "_OTHER"}
    assert m.value("inference_http_requests_total", method="POST", route=CHAT, code="404") == 2


@pytest_twisted.ensureDeferred
async def test_openmetrics_on_request_with_trace_id_exemplars(fake, lmstudio):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    await lmstudio.post_chat(chat(stream=True), headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    plain = await lmstudio.metrics()
    assert plain.content_type.startswith("text/plain; version=0.0.4")
    assert "trace_id" not in plain.text
    om = await lmstudio.metrics(accept="application/openmetrics-text; version=1.0.0")
    assert om.content_type.startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    ttft = [s for s in om.samples if s.name == "inference_time_to_first_token_seconds_bucket" and s.exemplar]
    assert ttft and all(s.exemplar.labels == {"trace_id": trace_id} for s in ttft)
    duration = [s for s in om.samples if s.name == "inference_request_duration_seconds_bucket" and s.exemplar]
    assert duration and duration[0].exemplar.labels == {"trace_id": trace_id}


@pytest_twisted.ensureDeferred
async def test_no_exemplars_when_tracing_is_off(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_OBSERVABILITY_TRACING_ENABLED": "false"})
    await gateway.post_chat(chat(stream=True))
    om = await gateway.metrics(accept="application/openmetrics-text; version=1.0.0")
    assert om.value("inference_time_to_first_token_seconds_count", **LABELS) == 1
    assert not [s for s in om.samples if s.exemplar]


@pytest_twisted.ensureDeferred
async def test_the_metrics_path_is_configurable_and_metrics_can_be_turned_off(fake, start_gateway):
    moved = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                           "INFERENCE_OBSERVABILITY_METRICS_PATH": "/internal/prometheus"})
    await moved.post_chat(chat())
    assert (await call("GET", moved.url + "/metrics")).status == 404
    reply = await call("GET", moved.url + "/internal/prometheus")
    assert reply.status == 200 and b"inference_http_requests_total" in reply.body
    assert (await call("POST", moved.url + "/internal/prometheus")).error["code"] == "method_not_allowed"
    off = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                         "INFERENCE_OBSERVABILITY_METRICS_ENABLED": "false"})
    assert (await call("GET", off.url + "/metrics")).status == 404
    health = (await call("GET", off.url + "/health")).json()
    assert health["observability"]["metrics"] == {"enabled": False, "path": None}


@pytest_twisted.ensureDeferred
async def test_upstream_up_follows_the_health_probe(fake, start_gateway):
    lmstudio = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                              "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"})
    assert (await call("GET", lmstudio.url + "/health")).status == 200
    assert (await lmstudio.metrics()).value("inference_upstream_up", provider="lmstudio") == 1
    await fake.stop()
    assert (await call("GET", lmstudio.url + "/health/ready")).status == 503
    assert (await lmstudio.metrics()).value("inference_upstream_up", provider="lmstudio") == 0
    fake.listen()


@pytest_twisted.ensureDeferred
async def test_health_reports_metrics_and_tracing(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp",
                             "INFERENCE_OBSERVABILITY_TRACING_PROTOCOL": "http/protobuf",
                             "INFERENCE_OBSERVABILITY_TRACING_ENDPOINT": "http://user:secret@collector.example:4318"})
    health = (await call("GET", gateway.url + "/health")).json()
    observability = health["observability"]
    assert observability["metrics"] == {"enabled": True, "path": "/metrics"}
    tracing = observability["tracing"]
    assert tracing["enabled"] is True and tracing["exporter"] == "otlp" and tracing["protocol"] == "http/protobuf"
    assert tracing["endpoint"] == "http://collector.example:4318/v1/traces"  # credentials never shown
    assert tracing["export"]["ok"] is None  # nothing sent yet


def test_the_gateways_histogram_observations_expose_as_prometheus_clients_own(monkeypatch):
    # (Observed finds the bucket by bisection and skips validating the gateway's own exemplar)
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.openmetrics.exposition import generate_latest

    from inference.telemetry import metrics as metrics_module
    from inference.telemetry.metrics import DURATION_BUCKETS, Observed, TraceExemplar

    monkeypatch.setattr(metrics_module.time, "time", lambda: 1700000000.0)  # the exemplars' timestamps
    monkeypatch.setattr("prometheus_client.metrics.time.time", lambda: 1700000000.0)
    trace = TraceExemplar(trace_id="0af7651916cd43dd8448eb211c80319c")  # stored as it is
    plain = {"trace_id": "1af7651916cd43dd8448eb211c80319c"}  # validated first (and 1.0, refused below, counts)
    amounts = [(0.0, trace), (0.01, trace), (0.010001, None), (0.5, {"other": "x"}), (299.9, trace),
               (300.0, None), (1e9, trace), (float("inf"), None), (2.0, plain), (-3.0, trace),
               (float("nan"), trace)]
    exposed = []
    for fast in (False, True):
        registry = CollectorRegistry()
        child = Histogram("h_seconds", "h", ["a"], buckets=DURATION_BUCKETS, registry=registry).labels("x")
        if fast:
            child = Observed.of(child)
            assert isinstance(child, Observed)
        for amount, exemplar in amounts:
            child.observe(amount, exemplar)
        with pytest.raises(ValueError):
            child.observe(1.0, {"trace_id": "x" * 200})  # too long: refused as prometheus_client refuses it
        exposed.append(generate_latest(registry).decode())
    assert exposed[0] == exposed[1]
    assert 'h_seconds_bucket{a="x",le="0.01"} 3.0 # {trace_id="0af7651916cd43dd8448eb211c80319c"} -3.0' in exposed[1]
    assert 'h_seconds_bucket{a="x",le="0.02"} 4.0\n' in exposed[1]  # 0.010001: the next bucket, no exemplar
    assert 'h_seconds_bucket{a="x",le="2.56"} 7.0 # {trace_id="1af7651916cd43dd8448eb211c80319c"} 2.0' in exposed[1]
