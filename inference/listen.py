"""Where the daemon listens: a Twisted endpoint string, or the config's host and port, optionally shared.

With ``server.reuse_port`` several gateway processes bind the same port (``SO_REUSEPORT``) and the kernel
spreads new connections across them, which is how one host uses every core (see ``systemd/inference@.service``).
Twisted's endpoint strings have no such option, so that socket is made here and handed to the reactor.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from .config import ServerConfig
from .reactor import IGatewayReactor

BACKLOG = 1024
"""Connections the kernel may hold before the gateway accepts them (Twisted's default of 50 drops a burst)."""


def server_endpoint(reactor: IGatewayReactor, server: ServerConfig, listen: str | None = None) -> IStreamServerEndpoint:
    """The endpoint for ``--listen`` when given, else for ``server.host``/``server.port``."""
    if server.reuse_port and listen is None:
        return ReusePortEndpoint(reactor, server.host, server.port, BACKLOG)
    endpoint: IStreamServerEndpoint = endpoints.serverFromString(
        reactor, listen if listen is not None else describe(server.host, server.port) + f":backlog={BACKLOG}")
    return endpoint


def describe(host: str, port: int) -> str:
    return f"tcp:port={port}:interface={endpoints.quoteStringArgument(host)}"


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """TCP on ``host:port`` with ``SO_REUSEPORT`` (Linux, BSD): other processes may listen on it too."""

    def __init__(self, reactor: IGatewayReactor, host: str, port: int, backlog: int = BACKLOG) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._backlog = backlog

    def listen(self, factory: Any) -> Deferred[Any]:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as e:
            return fail(CannotListenError(self._host, self._port, e))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(self._backlog)
            sock.setblocking(False)
            return succeed(self._reactor.adoptStreamPort(sock.fileno(), family, factory))
        except OSError as e:
            return fail(CannotListenError(self._host, self._port, e))
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor
