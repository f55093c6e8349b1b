"""``inference``: the command line beside the daemon (``inference check``, ``inference --version``).

``check`` answers "would the gateway serve, configured like this, here, now?" before anything is started: it
loads the configuration exactly as the daemon does, says where each setting came from, asks the upstream for
its models, resolves the models the configuration names and, with ``--probe``, runs a one-token completion.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any, TextIO

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react

from . import __version__
from .config import ConfigError, load_with_sources, settings, without_password
from .errors import GatewayError
from .operations import CHAT
from .reactor import IGatewayReactor

if TYPE_CHECKING:
    from .api import Gateway

SECRET_KEYS = ("inference.api_key", "server.api_keys")
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


class Report:
    """Lines of ``ok``/``warn``/``FAIL`` and the exit status they add up to."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = False

    def line(self, text: str = "") -> None:
        print(text, file=self.out)

    def ok(self, text: str) -> None:
        self.line(f"ok    {text}")

    def warn(self, text: str) -> None:
        self.line(f"warn  {text}")

    def fail(self, text: str) -> None:
        self.failed = True
        self.line(f"FAIL  {text}")


def describe_settings(report: Report, config: Any, sources: Mapping[str, str], environ: Mapping[str, str]) -> None:
    report.line("settings (key, value, where it came from; each has an INFERENCE_* variable, see the README):")
    for key, value in settings(config):
        source = sources.get(key) or sources.get(key.partition("[")[0]) or "default"  # a host's: its list's
        if key == "inference.api_key" and source == "default" and value and environ.get("OPENAI_API_KEY"):
            source = "from OPENAI_API_KEY"
        secret = key in SECRET_KEYS or key.endswith(".api_key")  # a host's key too
        shown = "<set>" if secret and value else repr(without_password(value))
        report.line(f"  {key:<42} {shown:<24} {source}")


async def run_check(reactor: IGatewayReactor, config_path: str | None, probe: bool, environ: Mapping[str, str],
                    out: TextIO) -> int:
    """Everything ``inference check`` does; returns the exit status."""
    from .service import build_site

    report = Report(out)
    try:
        config, sources = load_with_sources(config_path, environ)
        site = build_site(config, reactor, environ)
    except ConfigError as e:
        report.fail(f"config: {e}")
        return EXIT_CONFIG
    describe_settings(report, config, sources, environ)
    report.line()
    gateway = site.gateway
    try:
        if gateway.keys.enabled:
            guarded = "/v1/* and metrics/health" if config.server.protect_metrics else "/v1/*"
            report.ok(f"{len(gateway.keys)} API key(s) required on {guarded}")
        check_port(report, config.server.host, config.server.port)
        upstream = await gateway.probe_upstream()
        name = f"{gateway.provider.name} at {gateway.provider.base_url}"
        if not upstream["reachable"]:
            report.fail(f"upstream {name} does not answer: {upstream['error']}")
            return EXIT_FAIL
        served = upstream["models"]
        report.ok(f"upstream {name} answers, serving {len(served)} model(s): {', '.join(served) or 'none'}")
        model = await check_models(report, gateway, served)
        if probe and model is not None:
            await probe_completion(report, gateway, model)
    finally:
        await gateway.close()
    return EXIT_FAIL if report.failed else EXIT_OK


def check_port(report: Report, host: str, port: int) -> None:
    """Can the daemon listen where it is told to (something else already there is the usual reason not)?"""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        report.warn(f"cannot listen on {host}:{port} now ({reason}); is a gateway already running there?")
    else:
        report.ok(f"{host}:{port} is free to listen on")


async def check_models(report: Report, gateway: Gateway, served: list[str]) -> str | None:
    """Resolve ``default_model`` and check ``allowed_models``; the model a request naming none would get."""
    inference = gateway.config.inference
    allowed = inference.allowed_models
    if allowed:
        missing = [m for m in allowed if m not in served]
        present = [m for m in allowed if m in served]
        if not present:
            report.fail(f"none of allowed_models ({', '.join(allowed)}) is served by the upstream")
        elif missing:
            report.warn(f"allowed_models not served now: {', '.join(missing)}")
        else:
            report.ok(f"allowed_models all served: {', '.join(allowed)}")
    try:
        model = await gateway.catalog.resolve(None)
    except GatewayError as e:
        report.fail(f"default_model {inference.default_model!r}: {e.message}")
        return None
    if model == inference.default_model:
        report.ok(f"default_model {model!r} is served")
    else:
        report.ok(f"default_model {inference.default_model!r} resolves to {model!r}")
    return model


async def probe_completion(report: Report, gateway: Gateway, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1,
            "temperature": 0}
    started = perf_counter()
    try:
        answer = await gateway.provider.call(CHAT, body)
    except GatewayError as e:
        report.fail(f"test completion with {model!r} failed: {e.message}")
        return
    took = perf_counter() - started
    usage = answer.data.get("usage") or {}
    report.ok(f"test completion with {model!r} answered in {took:.2f}s "
              f"({usage.get('completion_tokens', '?')} token(s))")


def run_keys(tenant: str, path: str | None, config_path: str | None, environ: Mapping[str, str]) -> int:
    """``inference keys add``: the exit status."""
    from .admin import add_key

    try:
        if path is None:
            config, _ = load_with_sources(config_path, environ)
            path = config.server.api_keys_file
        if path is None:
            print("keys add: no key file: give --file, or set server.api_keys_file", file=sys.stderr)
            return EXIT_CONFIG
        add_key(path, tenant, sys.stdout, sys.stderr)
    except ConfigError as e:
        print(f"keys add: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def run_usage(store: str | None, since: str, group_by: str, config_path: str | None,
              environ: Mapping[str, str]) -> int:
    """``inference usage``: the exit status."""
    from .admin import usage_report
    from .usage import parse_group_by, parse_when, resolve_store

    try:
        if store is None:
            config, _ = load_with_sources(config_path, environ)
            store = resolve_store(config.inference.usage, environ)
        if store == "none":
            print("usage: no usage store: give --store, or set inference.usage.store", file=sys.stderr)
            return EXIT_CONFIG
        usage_report(store, parse_when(since, time.time()), parse_group_by(group_by), sys.stdout)
    except (ConfigError, ValueError) as e:
        print(f"usage: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inference", description="OpenAI-compatible gateway: tools beside the "
                                     "daemon (run the daemon itself with `twistd inference`).")
    parser.add_argument("--version", action="version", version=f"inference {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check", help="check the configuration and the upstream; exit 0 when the gateway "
                                "would serve")
    check.add_argument("-c", "--config", help="YAML config file, as given to `twistd inference --config`")
    check.add_argument("--probe", action="store_true", help="also run a one-token completion on the default model")
    keys = commands.add_parser("keys", help="tenants' keys: `inference keys add TENANT` prints a new key once and "
                               "writes its hash to the key file")
    keys.add_argument("action", choices=["add"])
    keys.add_argument("tenant", help="the tenant the key is for (added to the file when new, with no limit)")
    keys.add_argument("-c", "--config", help="YAML config file whose server.api_keys_file is the key file")
    keys.add_argument("-f", "--file", help="the key file (default: server.api_keys_file of the configuration)")
    usage = commands.add_parser("usage", help="calls and tokens per tenant, model, day ... from the usage ledger")
    usage.add_argument("--since", default="7d", help="an age (7d, 24h, 30m), a date or an ISO time (default 7d)")
    usage.add_argument("--group-by", default="tenant,model,day", help="among tenant, key_id, model, host, "
                       "operation, status, day (default tenant,model,day)")
    usage.add_argument("-c", "--config", help="YAML config file whose inference.usage.store is read")
    usage.add_argument("--store", help="the store (sqlite:///path or postgresql://...; default: the configuration's)")
    args = parser.parse_args(argv)
    if args.command == "usage":
        raise SystemExit(run_usage(args.store, args.since, args.group_by, args.config, os.environ))
    if args.command == "keys":
        raise SystemExit(run_keys(args.tenant, args.file, args.config, os.environ))
    if args.command != "check":
        parser.print_help()
        raise SystemExit(EXIT_CONFIG)

    def run(reactor: IGatewayReactor) -> Deferred[None]:
        async def checked() -> None:
            status = await run_check(reactor, args.config, args.probe, os.environ, sys.stdout)
            if status:
                raise SystemExit(status)
        return ensureDeferred(checked())

    react(run)
