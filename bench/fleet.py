"""The fleet benchmark: time to first token of multi-turn conversations over hosts with a prompt cache per slot.

    .venv/bin/python bench/fleet.py [--hosts 2] [--conversations 8] [--turns 8] [--out bench/results]

Starts ``--hosts`` fake LM Studio hosts (``prefix_host.py``: 4 slots each, each slot caching its last prompt, the
first token after 0.5 ms per uncached prompt token) and the gateway in front of them (``twistd inference`` with
``INFERENCE_INFERENCE_UPSTREAMS``). ``--conversations`` conversations run at once, each ``--turns`` turns in a row
(a ~1,000-word document in its first turn, a short question in each later one, ``--think-ms`` on average between
an answer and the next question), under three placements:

- ``affinity``: through the gateway (its routing: prefix-aware, load-bounded);
- ``least_busy``: straight to the host with the fewest calls of this benchmark in flight (ties at random);
- ``round_robin``: straight to the hosts in turn.

Reports TTFT p50/p99 of first and later turns, the calls each host served and the most it ran at once, and checks
the target: later-turn TTFT p50 under affinity at most a fifth of round-robin's, no host above its 4 slots.
Writes ``fleet.md`` and ``fleet.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from run import BENCH, process, twistd, wait_for

HOST_PORT, GATEWAY_PORT, SLOTS = 18091, 18090, 4
SYSTEM = "You are a careful assistant. Answer from the document the user gave you, briefly and exactly."


def document(n: int) -> str:
    rng = random.Random(n)
    return " ".join(f"d{n}_{rng.randrange(10_000)}" for _ in range(1000))


def ttft(url: str, messages: list[dict[str, str]]) -> tuple[float, str]:
    """Seconds to the first content chunk of a streamed chat completion, and the whole answer's text."""
    body = json.dumps({"model": "bench-model", "messages": messages, "stream": True}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    started, first, text = time.perf_counter(), None, []
    with urllib.request.urlopen(request, timeout=120) as answer:
        for line in answer:
            if not line.startswith(b"data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                content = choice["delta"].get("content")
                if content:
                    first = first if first is not None else time.perf_counter() - started
                    text.append(content)
    assert first is not None, "no content"
    return first, "".join(text)


class Placement:
    """Where each call goes: one URL (the gateway), or the hosts by a rule of the client's."""

    def __init__(self, urls: list[str], rule: str) -> None:
        self.urls, self.rule = urls, rule
        self.in_flight = dict.fromkeys(urls, 0)
        self._turns = itertools.cycle(urls)
        self._lock = threading.Lock()

    def take(self) -> str:
        with self._lock:
            if self.rule == "round_robin":
                url = next(self._turns)
            else:
                least = min(self.in_flight.values())
                url = random.choice([u for u, n in self.in_flight.items() if n == least])
            self.in_flight[url] += 1
            return url

    def give_back(self, url: str) -> None:
        with self._lock:
            self.in_flight[url] -= 1


Send = Callable[[list[dict[str, str]]], tuple[float, str]]


def conversation(n: int, turns: int, think: float, send: Send, out: list[tuple[int, float]],
                 start: threading.Barrier) -> None:
    """One user: a document and a question, then a question after each answer, reading it for ~``think`` s."""
    rng = random.Random(n)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Document {n}: {document(n)}\n\nWhat is it about?"}]
    start.wait()
    for turn in range(turns):
        seconds, text = send(messages)
        out.append((turn, seconds))
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"And point {turn}?"}]
        time.sleep(rng.uniform(0, 2 * think))


def run(placement: str, gateway: str, hosts: list[str], conversations: int, turns: int,
        think: float) -> dict[str, Any]:
    for host in hosts:
        urllib.request.urlopen(urllib.request.Request(host + "/reset", b"{}"), timeout=5).read()
    if placement == "affinity":
        def send(messages: list[dict[str, str]]) -> tuple[float, str]:
            return ttft(gateway, messages)
    else:
        rule = Placement(hosts, placement)

        def send(messages: list[dict[str, str]]) -> tuple[float, str]:
            url = rule.take()
            try:
                return ttft(url, messages)
            finally:
                rule.give_back(url)
    results: list[tuple[int, float]] = []
    start = threading.Barrier(conversations)
    threads = [threading.Thread(target=conversation, args=(n, turns, think, send, results, start))
               for n in range(conversations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = [s for turn, s in results if turn == 0]
    later = [s for turn, s in results if turn > 0]
    stats = [json.loads(urllib.request.urlopen(host + "/stats", timeout=5).read()) for host in hosts]
    return {"first_p50_ms": ms(percentile(first, 50)), "first_p99_ms": ms(percentile(first, 99)),
            "later_p50_ms": ms(percentile(later, 50)), "later_p99_ms": ms(percentile(later, 99)),
            "served": [s["served"] for s in stats], "peak": [s["peak"] for s in stats], "calls": len(results)}


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Fleet benchmark ({results['when']})", "",
             f"{results['hosts']} hosts of {SLOTS} slots, {results['conversations']} conversations of "
             f"{results['turns']} turns at once, {results['think_ms']:g} ms between turns on average; TTFT in ms.",
             "",
             "| placement | first turn p50 / p99 | later turns p50 / p99 | calls per host | most at once per host |",
             "|---|---|---|---|---|"]
    for name, r in results["placements"].items():
        lines.append(f"| {name} | {r['first_p50_ms']} / {r['first_p99_ms']} | {r['later_p50_ms']} / "
                     f"{r['later_p99_ms']} | {r['served']} | {r['peak']} |")
    target = results["target"]
    lines += ["", f"Target: affinity's later-turn p50 at most 1/5 of round-robin's "
              f"({target['ratio']:.3f}: {'met' if target['met'] else 'MISSED'}); no host above {SLOTS} at once "
              f"({'met' if target['within_slots'] else 'MISSED'})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--think-ms", type=float, default=200, help="mean pause between an answer and the next turn")
    parser.add_argument("--out", default=str(BENCH / "results"))
    args = parser.parse_args()
    hosts = [f"http://127.0.0.1:{HOST_PORT + i}" for i in range(args.hosts)]
    env = {"INFERENCE_INFERENCE_UPSTREAMS": ",".join(hosts), "INFERENCE_SERVER_PORT": str(GATEWAY_PORT),
           "INFERENCE_INFERENCE_DEFAULT_MODEL": "bench-model", "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "none"}
    gateway = f"http://127.0.0.1:{GATEWAY_PORT}"
    with ExitStack() as running:  # the hosts share CPU 1 with this client; the gateway has CPU 0
        for i in range(args.hosts):
            running.enter_context(process([sys.executable, str(BENCH / "prefix_host.py"), "--port",
                                           str(HOST_PORT + i), "--slots", str(SLOTS)], "1"))
        for host in hosts:
            wait_for(host + "/stats")
        running.enter_context(process([twistd(), "-n", "--pidfile=", "inference"], "0", env))
        wait_for(gateway + "/health/ready")
        placements = {name: run(name, gateway, hosts, args.conversations, args.turns, args.think_ms / 1000)
                      for name in ("affinity", "least_busy", "round_robin")}
    ratio = placements["affinity"]["later_p50_ms"] / placements["round_robin"]["later_p50_ms"]
    results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "hosts": args.hosts,
               "conversations": args.conversations, "turns": args.turns, "think_ms": args.think_ms,
               "placements": placements,
               "target": {"ratio": ratio, "met": ratio <= 0.2,
                          "within_slots": all(p <= SLOTS for p in placements["affinity"]["peak"])}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown(results)
    (out / "fleet.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
