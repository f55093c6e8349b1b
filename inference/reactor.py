"""The reactor the gateway runs on, as one interface: the parts of Twisted's it uses (like synapse's
``ISynapseReactor``), so that every seam that takes a reactor says so and a test can pass a fake one."""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorSocket,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)


class IGatewayReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorThreads, IReactorSocket,
                      IReactorPluggableNameResolver):
    """Start and stop, timers, TCP, threads (span export, signals), adopted sockets (``reuse_port``), DNS."""
