"""``twistd inference``: command-line options and the service they build."""

from __future__ import annotations

import sys
from typing import NoReturn

from twisted.application import service
from twisted.python import usage

from .config import ConfigError, load
from .logs import DaemonStdout, log_output


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT]"
    longdesc = ("Serve an OpenAI-compatible API in front of LM Studio, OpenAI or the built-in mock. Settings come "
                "from the YAML file, then INFERENCE_* environment variables (see the README).")
    optParameters = [
        ["config", "c", None, "YAML config file."],
        ["listen", "l", None, "Twisted endpoint to listen on, e.g. tcp:3000:interface=127.0.0.1 "
                              "(overrides server.host and server.port)."],
    ]


def makeService(options: Options) -> service.IService:
    from .reactor import install
    install()  # before anything imports Twisted's default reactor
    from .service import make_service
    try:
        config = load(options["config"])
    except ConfigError as e:
        _die(f"inference: config error: {e}")
    listen: str | None = options["listen"]
    if listen is not None:
        _check_endpoint(listen)
    try:
        logs = log_output(getattr(options, "parent", None))  # twistd's own options: --logfile, --nodaemon ...
    except (DaemonStdout, OSError) as e:
        _die(f"inference: {e}")
    try:
        return make_service(config, listen, logs=logs)
    except ConfigError as e:  # settings only checkable with the environment (OTEL_* variables)
        _die(f"inference: config error: {e}")


def _check_endpoint(description: str) -> None:
    from twisted.internet import endpoints, reactor
    try:
        endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        _die(f"inference: --listen {description!r} is not a Twisted endpoint ({e}); "
             "try tcp:3000:interface=127.0.0.1")


def _die(line: str) -> NoReturn:
    print(line, file=sys.stderr)
    raise SystemExit(2)
