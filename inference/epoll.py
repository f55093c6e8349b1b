"""The reactor ``twistd inference`` runs on where epoll exists (``reactor.install`` picks it)."""

from __future__ import annotations

import errno

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

_log = Logger()


class GatewayReactor(EPollReactor):
    """Twisted's epoll reactor, handing each I/O event straight to its connection.

    The stock reactor calls every handler through ``twisted.python.log.callWithLogger``, which asks the connection
    for its log prefix and pushes it as the legacy log context around the call: two layers of context and a dict
    for each event, four events a request (3% of a short call's instructions under callgrind). The gateway logs
    through twisted.logger, which never reads that context. An exception escaping a handler is still logged, and
    the events after it in the same poll are still handled.

    ``lone_turn`` is true while the reactor handles the only event of its turn: bytes a handler writes then have
    nothing to go out with, so they may go at once rather than a turn later (``providers.upstream``'s requests).
    """

    lone_turn = False

    def doPoll(self, timeout: float | None) -> None:
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        handle, selectables = self._doReadOrWrite, self._selectables
        self.lone_turn = len(events) == 1
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except Exception:
                _log.failure("while handling an event of {selectable}", selectable=selectable)
        self.lone_turn = False

    doIteration = doPoll
