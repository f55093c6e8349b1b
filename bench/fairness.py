"""The fairness benchmark (issue 23): does a flooding tenant delay another tenant's chat?

    .venv/bin/python bench/fairness.py [--out bench/results]

Two fake hosts of 4 slots each (``slow_host.py``: a chat takes 200 ms, an embedding 50 ms) behind one gateway
(``twistd inference``, a fleet, on CPU 0). Tenant A (``sheddable``) sends 400 embedding calls and 200 chat calls at
once; tenant B (``standard``) sends one chat call every 200 ms while A's flood lasts. B's latency is measured:

- ``alone``: B with no flood;
- ``fair``: the gateway with tenants (priority class, then fair shares);
- ``shares``: the same, A ``standard`` too (fair shares alone decide);
- ``fifo``: the same gateway with one plain key file (one tenant: the arrival order, as before tenants).

Target: B's p50 under the flood within 1.5x of B alone, and no B call refused. Writes ``fairness.md`` and
``fairness.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from run import BENCH, process, twistd, wait_for

sys.path.insert(0, str(BENCH.parent))
from inference.tenants import key_hash  # noqa: E402 (the repository's own package, beside the bench)

HOSTS, GATEWAY = (18101, 18102), 18100
KEYS = {"a": "sk-bench-tenant-a", "b": "sk-bench-tenant-b"}
FLOOD_EMBEDDINGS, FLOOD_CHATS, B_EVERY, B_CALLS = 400, 200, 0.2, 25


def post(path: str, body: dict[str, Any], key: str) -> tuple[int, float]:
    request = urllib.request.Request(f"http://127.0.0.1:{GATEWAY}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, time.perf_counter() - started


def chat(key: str) -> tuple[int, float]:
    return post("/v1/chat/completions", {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]},
                key)


def embed(key: str) -> tuple[int, float]:
    return post("/v1/embeddings", {"model": "bench-embed", "input": "a line to embed"}, key)


def run_b(flood: bool) -> dict[str, Any]:
    """B's calls, one every 200 ms (with A's flood at once when ``flood``): B's latencies and statuses."""
    results: list[tuple[int, float]] = []
    a_statuses: list[int] = []
    with ThreadPoolExecutor(max_workers=FLOOD_EMBEDDINGS + FLOOD_CHATS + B_CALLS) as pool:
        if flood:
            floods = [pool.submit(embed, KEYS["a"]) for _ in range(FLOOD_EMBEDDINGS)] + \
                     [pool.submit(chat, KEYS["a"]) for _ in range(FLOOD_CHATS)]
            time.sleep(0.5)  # (A's calls are in: the queue is long when B starts)
        b_calls = []
        for _ in range(B_CALLS):
            b_calls.append(pool.submit(chat, KEYS["b"]))
            time.sleep(B_EVERY)
        results = [call.result() for call in b_calls]
        if flood:
            a_statuses = [call.result()[0] for call in floods]
    latencies = sorted(seconds for _, seconds in results)
    return {"b_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "b_p90_ms": round(latencies[int(len(latencies) * 0.9)] * 1000, 1),
            "b_refused": sum(status != 200 for status, _ in results),
            "a_served": sum(status == 200 for status in a_statuses), "a_refused": sum(s != 200 for s in a_statuses)}


def gateway(stack: ExitStack, keys: Path) -> None:
    env = {"INFERENCE_INFERENCE_UPSTREAMS": ",".join(f"http://127.0.0.1:{port}" for port in HOSTS),
           "INFERENCE_SERVER_PORT": str(GATEWAY), "INFERENCE_SERVER_API_KEYS_FILE": str(keys),
           "INFERENCE_INFERENCE_DEFAULT_MODEL": "bench-model", "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "none",
           "INFERENCE_INFERENCE_HEALTH_CHECK_SECS": "0", "INFERENCE_LOGGING_LEVEL": "warn",
           "INFERENCE_INFERENCE_ROUTING_MAX_WAITING": "4096"}
    config = keys.parent / "fleet.yaml"
    config.write_text("inference:\n  upstreams:\n" + "".join(
        f"    - {{name: h{port}, base_url: 'http://127.0.0.1:{port}', max_concurrent: 4}}\n" for port in HOSTS))
    env.pop("INFERENCE_INFERENCE_UPSTREAMS")
    stack.enter_context(process([twistd(), "-n", "--pidfile=", "inference", "--config", str(config)], "0", env))
    wait_for(f"http://127.0.0.1:{GATEWAY}/health/live")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(BENCH / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="inference-fairness-"))
    tenants = folder / "tenants.yaml"
    tenants.write_text(json.dumps({"tenants": [
        {"name": "a", "keys": [key_hash(KEYS["a"].encode())], "priority": "sheddable"},
        {"name": "b", "keys": [key_hash(KEYS["b"].encode())], "priority": "standard"}]}))
    same_class = folder / "same-class.yaml"
    same_class.write_text(tenants.read_text().replace('"sheddable"', '"standard"'))
    plain = folder / "plain.keys"
    plain.write_text("\n".join(KEYS.values()) + "\n")
    results: dict[str, Any] = {}
    with ExitStack() as hosts:
        for port in HOSTS:
            hosts.enter_context(process([sys.executable, str(BENCH / "slow_host.py"), str(port)], "1"))
        for port in HOSTS:
            wait_for(f"http://127.0.0.1:{port}/v1/models")
        for name, keys in (("fair", tenants), ("shares", same_class), ("fifo", plain)):
            with ExitStack() as stack:
                gateway(stack, keys)
                chat(KEYS["b"])  # (warm: connections, the model list)
                if name == "fair":
                    results["alone"] = run_b(flood=False)
                results[name] = run_b(flood=True)
            print(name, results[name], flush=True)
    alone, fair, fifo = results["alone"]["b_p50_ms"], results["fair"]["b_p50_ms"], results["fifo"]["b_p50_ms"]
    shares = results["shares"]["b_p50_ms"]
    results["target"] = {"b_p50_within_1_5x_of_alone": fair <= 1.5 * alone, "no_b_call_refused":
                         results["fair"]["b_refused"] == 0, "fair_over_alone": round(fair / alone, 2),
                         "shares_over_alone": round(shares / alone, 2), "fifo_over_alone": round(fifo / alone, 2)}
    (out / "fairness.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Fairness: tenant B's chat while tenant A floods (2 hosts x 4 slots)", "",
             "| run | B p50 ms | B p90 ms | B refused | A served | A refused |", "|---|---|---|---|---|---|"]
    for name in ("alone", "fair", "shares", "fifo"):
        r = results[name]
        lines.append(f"| {name} | {r['b_p50_ms']} | {r['b_p90_ms']} | {r['b_refused']} | {r['a_served']} | "
                     f"{r['a_refused']} |")
    lines += ["", f"Target (B p50 within 1.5x of alone, no B call refused): {results['target']}"]
    (out / "fairness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
