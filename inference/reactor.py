"""The reactor the gateway runs on, as one interface: the parts of Twisted's it uses (like synapse's
``ISynapseReactor``), so that every seam that takes a reactor says so and a test can pass a fake one."""

from __future__ import annotations

import sys

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorSocket,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.main import installReactor


class IGatewayReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorThreads, IReactorSocket,
                      IReactorPluggableNameResolver):
    """Start and stop, timers, TCP, threads (span export, signals), adopted sockets (``reuse_port``), DNS."""


def send_buffered(transport: object) -> None:
    """Hand what ``transport`` holds to the kernel now, as the reactor would when it next finds the socket writable
    (a transport that is not a socket's, or has nothing to send, is left alone). If the send fails, the bytes stay
    and the transport's next write reports it."""
    if (isinstance(transport, FileDescriptor) and transport.connected and not transport.disconnecting
            and not transport.producerPaused and transport._tempDataLen):
        transport.doWrite()


def install() -> None:
    """Make :class:`GatewayReactor` the reactor, unless one was chosen already (``twistd --reactor``, a test's)
    or epoll is missing (then Twisted's default is used)."""
    if "twisted.internet.reactor" in sys.modules:
        return
    try:
        from .epoll import GatewayReactor
    except ImportError:  # no epoll here (macOS, the BSDs)
        return
    installReactor(GatewayReactor())
