"""The gateway benchmark: each scenario through the gateway and direct to the upstream, in the same run.

    .venv/bin/python bench/run.py [--seconds 5] [--out bench/results] [--compare off,sdk] [--portkey START_JS]
                                  [--rounds N]

Needs ``node`` (the fake upstream and the stream client), ``wrk`` (Debian package) and ``taskset``. The gateway
(``twistd inference``, metrics on, tracing on at sample ratio 1.0, exporting OTLP over gRPC, the default, to
``trace_sink.py``, info logging to a real file, as journald or ``--logfile`` would take it) gets CPU 0 to itself;
the upstream, the trace sink and the load generators share CPU 1. ``--compare`` runs the non-streaming loads again
through gateways with tracing ``off`` or with the plain OpenTelemetry SDK's spans (``sdk``), in the same run, so
tracing's own cost per request is a difference of two figures taken minutes apart. ``--portkey`` runs them through
Portkey's gateway too (``npm install @portkey-ai/gateway``, then the path of its ``build/start-server.js``), on the
same core. ``--rounds N`` runs those comparisons, the default gateway too, N times alternated, and reports each
figure's median: on a machine whose speed drifts, one run apiece compares two different minutes. Writes
``report.md`` and ``report.json``. Ratios between the two paths, and the gateway's own CPU time
per request and per chunk, are the figures to quote; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
UPSTREAM_PORT, GATEWAY_PORT, SHARED_PORT, SINK_PORT = 18080, 18081, 18082, 14317
GATEWAY_CPU, LOAD_CPU = "0", "1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TARGETS = {  # one gateway process on one core, metrics and tracing on
    "added_p50_ms_c1": ("<=", 1.0), "rps_c64": (">=", 2000), "chunks_per_sec": (">=", 50000),
    "added_ttft_p50_ms_c32_20ms": ("<=", 2.0), "rss_idle_mb": ("<=", 80), "rss_500_streams_mb": ("<=", 150),
}


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"bench: {tool} is not installed (Debian: sudo apt-get install {package})")
    return path


def twistd() -> str:
    path = shutil.which("twistd", path=os.path.dirname(sys.executable))
    if path is None:
        sys.exit("bench: run it with the Python of the virtualenv the gateway is installed in (.venv/bin/python)")
    return path


def wait_for(url: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"bench: {url} did not come up")
        time.sleep(0.1)


@contextmanager
def process(command: list[str], cpu: str, env: dict[str, str] | None = None,
            log: Path | None = None) -> Iterator[subprocess.Popen]:
    """A child pinned to ``cpu``; its stdout goes to ``log`` (a real file: a flush there costs what it costs in
    production) or nowhere."""
    out = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    child = subprocess.Popen(["taskset", "-c", cpu, *command], env={**os.environ, **(env or {})},
                             stdout=out, stderr=subprocess.PIPE)
    try:
        yield child
    finally:
        if log is not None:
            out.close()
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=40)
        except subprocess.TimeoutExpired:
            child.kill()


def gateway_env(port: int, **more: str) -> dict[str, str]:
    return {"INFERENCE_INFERENCE_BASE_URL": f"http://127.0.0.1:{UPSTREAM_PORT}",
            "INFERENCE_INFERENCE_DEFAULT_MODEL": "bench-model", "INFERENCE_SERVER_PORT": str(port),
            # The idle pool is left at its default (as many as calls can be in flight): 64 clients must not be
            # slower than 16 out of the box.
            "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp",
            "INFERENCE_OBSERVABILITY_TRACING_PROTOCOL": "grpc",
            "INFERENCE_OBSERVABILITY_TRACING_ENDPOINT": f"http://127.0.0.1:{SINK_PORT}",
            "INFERENCE_OBSERVABILITY_TRACING_SAMPLE_RATIO": "1.0", "INFERENCE_LOGGING_LEVEL": "info", **more}


class Usage:
    """CPU seconds and memory of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def memory(self, key: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(key)


# -- load generators -----------------------------------------------------------------------------------------------

WRK_SCRIPT = BENCH / "post.lua"
PORTKEY_SCRIPT = BENCH / "post_portkey.lua"
PORTKEY_PORT = 18787


def wrk(url: str, connections: int, seconds: float, script: Path = WRK_SCRIPT) -> dict[str, float]:
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", str(script), url + "/v1/chat/completions"],
                         capture_output=True, text=True, check=True).stdout
    latency = {q: _ms(v, unit) for q, v, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50_ms": latency["50"], "p99_ms": latency["99"], "errors": int(errors.group(1)) if errors else 0}


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def streams(url: str, concurrency: int, seconds: float, tokens: int, delay_ms: int, hold: bool = False) -> dict:
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "node", str(BENCH / "streamclient.js"), url, str(concurrency),
                          str(seconds), str(tokens), str(delay_ms), "1" if hold else "0"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- the run -------------------------------------------------------------------------------------------------------

CONCURRENCY = (1, 16, 64)
VARIANTS = {  # --compare: the same gateway with tracing made another way
    "off": {"INFERENCE_OBSERVABILITY_TRACING_ENABLED": "false"},
    "sdk": {"INFERENCE_OBSERVABILITY_TRACING_IMPLEMENTATION": "sdk"},
}


def load_series(url: str, seconds: float, usage: Usage, script: Path = WRK_SCRIPT) -> list[dict[str, Any]]:
    """Non-streaming at each concurrency: req/s, latency, and the server's CPU per request."""
    wrk(url, 4, 1, script)  # warm-up: connections, caches
    out = []
    for connections in CONCURRENCY:
        before = usage.cpu()
        result = wrk(url, connections, seconds, script)
        result["cpu_ms_per_request"] = 1000 * (usage.cpu() - before) / max(result["requests"], 1)
        out.append({"concurrency": connections, **result})
    return out


def median_series(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each concurrency's figures, each the median of its value over the rounds."""
    out = []
    for at_each in zip(*rounds, strict=True):
        keys = [k for k, v in at_each[0].items() if isinstance(v, (int, float)) and k != "concurrency"]
        out.append({"concurrency": at_each[0]["concurrency"],
                    **{k: statistics.median(r[k] for r in at_each) for k in keys}})
    return out


def measure(seconds: float, compare: list[str], portkey: str | None, logs: Path, rounds: int = 1) -> dict[str, Any]:
    direct = f"http://127.0.0.1:{UPSTREAM_PORT}"
    through = f"http://127.0.0.1:{GATEWAY_PORT}"
    results: dict[str, Any] = {"non_streaming": [], "streaming": [], "memory": {}, "processes": {}, "variants": {}}
    with process(["node", str(BENCH / "upstream.js"), str(UPSTREAM_PORT)], LOAD_CPU), \
            process([sys.executable, str(BENCH / "trace_sink.py"), str(SINK_PORT)], LOAD_CPU):
        wait_for(direct + "/v1/models")
        # With rounds, the default gateway is measured among the others too, alternated with them
        names = (["default"] if rounds > 1 else []) + compare + (["portkey"] if portkey else [])
        taken: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in names}
        for _ in range(rounds):
            for name in names:
                if name == "portkey" and portkey:
                    taken[name].append(portkey_series(portkey, seconds, logs / "portkey.log"))
                else:
                    taken[name].append(variant(seconds, VARIANTS.get(name, {}), logs / f"gateway-{name}.log"))
        results["variants"] = {name: median_series(series) for name, series in taken.items()}
        if rounds > 1:
            results["rounds"] = {"count": rounds, "each": taken}
        with process([twistd(), "-n", "--pidfile=", "inference"], GATEWAY_CPU, gateway_env(GATEWAY_PORT),
                     logs / "gateway.log") as gw:
            wait_for(through + "/health/ready")
            usage = Usage(gw.pid)
            time.sleep(1)
            results["memory"]["idle_mb"] = usage.memory()
            for gateway in load_series(through, seconds, usage):
                results["non_streaming"].append({"concurrency": gateway["concurrency"], "gateway": gateway,
                                                 "direct": wrk(direct, gateway["concurrency"], seconds)})
            for delay in (0, 20):
                for concurrency in (1, 32):
                    before = usage.cpu()
                    gateway = streams(through, concurrency, seconds, 64, delay)
                    gateway["cpu_us_per_chunk"] = 1e6 * (usage.cpu() - before) / max(gateway["chunks"], 1)
                    results["streaming"].append({"tokens": 64, "delay_ms": delay, "concurrency": concurrency,
                                                 "gateway": gateway,
                                                 "direct": streams(direct, concurrency, seconds, 64, delay)})
            results["memory"]["streams_500"] = hold_streams(through, usage)
            results["memory"]["peak_mb"] = usage.memory("VmHWM")
            results["tracing"] = json.load(urllib.request.urlopen(through + "/health"))["observability"]["tracing"]
        results["processes"] = scale(seconds, logs)
    return results


def variant(seconds: float, env: dict[str, str], log: Path) -> list[dict[str, Any]]:
    """The non-streaming series through a gateway configured otherwise (``--compare``)."""
    with process([twistd(), "-n", "--pidfile=", "inference"], GATEWAY_CPU, gateway_env(GATEWAY_PORT, **env),
                 log) as gw:
        wait_for(f"http://127.0.0.1:{GATEWAY_PORT}/health/ready")
        return load_series(f"http://127.0.0.1:{GATEWAY_PORT}", seconds, Usage(gw.pid))


def portkey_series(start_js: str, seconds: float, log: Path) -> list[dict[str, Any]]:
    """The non-streaming series through Portkey's gateway (Node), on the gateway's core, to the same upstream
    (``x-portkey-provider: openai`` with ``x-portkey-custom-host``: bench/post_portkey.lua)."""
    # Started as `npx @portkey-ai/gateway` starts it: its default mode was as fast as NODE_ENV=production or faster
    # in alternating runs here (1,053 against 1,016 req/s at 16 clients).
    with process(["node", start_js, f"--port={PORTKEY_PORT}", "--headless"], GATEWAY_CPU, None, log) as portkey:
        wait_for(f"http://127.0.0.1:{PORTKEY_PORT}/")
        return load_series(f"http://127.0.0.1:{PORTKEY_PORT}", seconds, Usage(portkey.pid), PORTKEY_SCRIPT)


def hold_streams(url: str, usage: Usage) -> dict[str, Any]:
    """Open 500 slow streams (100 tokens, 20 ms apart: 2 s each) and sample the gateway's RSS meanwhile."""
    client = subprocess.Popen(["taskset", "-c", LOAD_CPU, "node", str(BENCH / "streamclient.js"), url, "500", "0",
                               "100", "20", "1"], stdout=subprocess.PIPE, text=True)
    highest = 0.0
    while client.poll() is None:
        highest = max(highest, usage.memory())
        time.sleep(0.05)
    outcome = json.loads(client.stdout.read().strip().splitlines()[-1])
    return {"rss_mb": highest, "completed": outcome["requests"], "errors": outcome["errors"]}


def scale(seconds: float, logs: Path) -> dict[str, Any]:
    """Non-streaming at 64 connections: one process on one core, then two processes (SO_REUSEPORT) on two cores
    (where the load generator and the upstream then compete with them: this machine has two)."""
    url = f"http://127.0.0.1:{SHARED_PORT}"
    shared = {"INFERENCE_SERVER_REUSE_PORT": "true"}
    out: dict[str, Any] = {}
    with process([twistd(), "-n", "--pidfile=", "inference"], "0",
                 gateway_env(SHARED_PORT, **shared, INFERENCE_OBSERVABILITY_METRICS_PORT="18091"), logs / "one.log"):
        wait_for(url + "/health/ready")
        wrk(url, 4, 1)
        out["one"] = wrk(url, 64, seconds)
        with process([twistd(), "-n", "--pidfile=", "inference"], "1",
                     gateway_env(SHARED_PORT, **shared, INFERENCE_OBSERVABILITY_METRICS_PORT="18092"),
                     logs / "two.log"):
            wait_for("http://127.0.0.1:18092/metrics")
            wrk(url, 4, 1)
            out["two"] = wrk(url, 64, seconds)
    out["speedup"] = out["two"]["rps"] / out["one"]["rps"]
    return out


def figures(results: dict[str, Any]) -> dict[str, float]:
    """The numbers the targets are about."""
    c1 = next(r for r in results["non_streaming"] if r["concurrency"] == 1)
    c64 = next(r for r in results["non_streaming"] if r["concurrency"] == 64)
    fast = next(r for r in results["streaming"] if r["delay_ms"] == 0 and r["concurrency"] == 32)
    slow = next(r for r in results["streaming"] if r["delay_ms"] == 20 and r["concurrency"] == 32)
    return {"added_p50_ms_c1": c1["gateway"]["p50_ms"] - c1["direct"]["p50_ms"],
            "rps_c64": c64["gateway"]["rps"], "chunks_per_sec": fast["gateway"]["chunks_per_sec"],
            "added_ttft_p50_ms_c32_20ms": slow["gateway"]["ttft_p50"] - slow["direct"]["ttft_p50"],
            "rss_idle_mb": results["memory"]["idle_mb"],
            "rss_500_streams_mb": results["memory"]["streams_500"]["rss_mb"], **compared(results)}


def compared(results: dict[str, Any]) -> dict[str, float]:
    """Tracing's own CPU per request (against the gateway with tracing off) and the ratio to Portkey's req/s."""
    out: dict[str, float] = {}
    variants = results["variants"]
    ours = {r["concurrency"]: r for r in variants["default"]} if "default" in variants else \
        {r["concurrency"]: r["gateway"] for r in results["non_streaming"]}
    for n in CONCURRENCY:
        if "off" in variants:
            off = next(r for r in variants["off"] if r["concurrency"] == n)
            out[f"tracing_cpu_ms_c{n}"] = ours[n]["cpu_ms_per_request"] - off["cpu_ms_per_request"]
        if "portkey" in variants:
            portkey = next(r for r in variants["portkey"] if r["concurrency"] == n)
            out[f"vs_portkey_c{n}"] = ours[n]["rps"] / portkey["rps"]
    return out


def verdicts(numbers: dict[str, float]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, (sense, target) in TARGETS.items():
        if name not in numbers:  # a comparison not asked for
            continue
        value = numbers[name]
        met = value <= target if sense == "<=" else value >= target
        gap = value - target if sense == "<=" else target - value
        out[name] = {"value": round(value, 3), "target": f"{sense} {target}", "met": met,
                     "gap": None if met else round(gap, 3)}
    return out


def markdown(results: dict[str, Any], checked: dict[str, dict[str, Any]]) -> str:
    lines = [f"# Benchmark ({results['when']}, {results['machine']})", "",
             "One gateway process on CPU 0 (metrics on, tracing on at ratio 1.0 exported over OTLP/gRPC, info "
             "logging to a file); the Node fake upstream, the trace sink and the load generators on CPU 1. Spans "
             f"exported during the run: {results['tracing'].get('export', {}).get('exported_spans', '?')}, failed: "
             f"{results['tracing'].get('export', {}).get('failed_spans', '?')}.", "",
             "## Targets", "", "| figure | value | target | met |", "|---|---|---|---|"]
    for name, v in checked.items():
        lines.append(f"| {name} | {v['value']} | {v['target']} | {'yes' if v['met'] else 'no, by ' + str(v['gap'])} |")
    lines += ["", "## Non-streaming (wrk)", "",
              "| concurrency | gateway req/s | direct req/s | ratio | gateway p50 / p99 ms | direct p50 / p99 ms | "
              "gateway CPU ms/request |", "|---|---|---|---|---|---|---|"]
    for r in results["non_streaming"]:
        g, d = r["gateway"], r["direct"]
        lines.append(f"| {r['concurrency']} | {g['rps']:.0f} | {d['rps']:.0f} | {g['rps'] / d['rps']:.2f} | "
                     f"{g['p50_ms']:.2f} / {g['p99_ms']:.2f} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | "
                     f"{g['cpu_ms_per_request']:.3f} |")
    lines += ["", "## Streaming, 64 tokens", "",
              "| ms/token | concurrency | gateway streams/s | direct streams/s | gateway chunks/s | TTFT p50 / p99 ms "
              "gateway | direct | total p50 ms gateway / direct | gateway CPU µs/chunk |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["streaming"]:
        g, d = r["gateway"], r["direct"]
        lines.append(f"| {r['delay_ms']} | {r['concurrency']} | {g['rps']:.0f} | {d['rps']:.0f} | "
                     f"{g['chunks_per_sec']:.0f} | {g['ttft_p50']:.2f} / {g['ttft_p99']:.2f} | "
                     f"{d['ttft_p50']:.2f} / {d['ttft_p99']:.2f} | {g['total_p50']:.1f} / {d['total_p50']:.1f} | "
                     f"{g['cpu_us_per_chunk']:.1f} |")
    if results["variants"]:
        lines += ["", "## The same non-streaming load through other configurations and Portkey (same core)", "",
                  "| through | concurrency | req/s | p50 / p99 ms | server CPU ms/request |", "|---|---|---|---|---|"]
        if "rounds" in results:
            lines[-2:-2] = [f"Each figure is the median of {results['rounds']['count']} rounds, the configurations "
                            "alternated within each round.", ""]
        else:
            for r in results["non_streaming"]:
                g = r["gateway"]
                lines.append(f"| this gateway | {r['concurrency']} | {g['rps']:.0f} | {g['p50_ms']:.2f} / "
                             f"{g['p99_ms']:.2f} | {g['cpu_ms_per_request']:.3f} |")
        for name, series in results["variants"].items():
            label = {"portkey": "Portkey", "default": "this gateway"}.get(name, f"tracing {name}")
            for g in series:
                lines.append(f"| {label} | {g['concurrency']} | {g['rps']:.0f} | {g['p50_ms']:.2f} / "
                             f"{g['p99_ms']:.2f} | {g['cpu_ms_per_request']:.3f} |")
    memory, scaling = results["memory"], results["processes"]
    lines += ["", "## Memory", "",
              f"- idle: {memory['idle_mb']:.1f} MB RSS; peak over the run: {memory['peak_mb']:.1f} MB",
              f"- 500 concurrent slow streams (100 tokens, 20 ms apart): {memory['streams_500']['rss_mb']:.1f} MB RSS, "
              f"{memory['streams_500']['completed']} completed, {memory['streams_500']['errors']} errors",
              "", "## Processes (non-streaming, 64 connections)", "",
              f"- one process: {scaling['one']['rps']:.0f} req/s; two (SO_REUSEPORT, one per core, sharing the "
              f"cores with the load generator and the upstream): {scaling['two']['rps']:.0f} req/s "
              f"(x{scaling['speedup']:.2f})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each measurement (default 5)")
    parser.add_argument("--out", default=str(BENCH / "results"), help="where report.md and report.json go")
    parser.add_argument("--compare", default="off", help="gateways configured otherwise, run too: off (tracing "
                        "off), sdk (the OpenTelemetry SDK's own spans); comma-separated, or '' for none")
    parser.add_argument("--portkey", help="Portkey's build/start-server.js, to run the same load through it")
    parser.add_argument("--rounds", type=int, default=1, help="with --compare or --portkey: run the comparison this "
                        "many times, the default gateway too, alternated, and report medians (a noisy machine)")
    args = parser.parse_args()
    compare = [name for name in args.compare.split(",") if name]
    for name in compare:
        if name not in VARIANTS:
            sys.exit(f"bench: --compare {name}: expected some of {', '.join(VARIANTS)}")
    for tool, package in (("node", "nodejs"), ("wrk", "wrk"), ("taskset", "util-linux")):
        need(tool, package)
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs two CPUs (one for the gateway, one for the load)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as logs:
        results = measure(args.seconds, compare, args.portkey, Path(logs), max(args.rounds, 1))
    results["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["machine"] = f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    results["figures"] = figures(results)
    checked = verdicts(results["figures"])
    results["targets"] = checked
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown(results, checked)
    (out / "report.md").write_text(report)
    print(report)
    print(f"({results['wall_seconds']} s; {out / 'report.md'}, {out / 'report.json'})")


if __name__ == "__main__":
    main()
