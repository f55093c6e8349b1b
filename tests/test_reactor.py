"""The reactor ``twistd inference`` runs on (inference/epoll.py): each I/O event goes straight to its connection."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import FileDescriptor

from inference.epoll import GatewayReactor


class Reader(FileDescriptor):
    """One end of a socket pair, recording what it reads; ``broken`` fails the read and the cleanup after it."""

    def __init__(self, reactor: GatewayReactor, sock: socket.socket, broken: bool = False) -> None:
        super().__init__(reactor)
        self.sock, self.broken, self.read, self.lost = sock, broken, b"", False

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        if self.broken:
            raise RuntimeError("a bug while reading")
        self.read += self.sock.recv(100)

    def connectionLost(self, reason: Any) -> None:
        self.lost = True
        if self.broken:
            raise RuntimeError("a bug while cleaning up")


def test_each_event_reaches_its_connection_and_a_failing_one_is_logged_without_stopping_the_others(
        no_logged_failures):
    reactor = GatewayReactor()
    pairs = [socket.socketpair() for _ in range(3)]
    readers = [Reader(reactor, ours, broken=(i == 0)) for i, (ours, _) in enumerate(pairs)]
    try:
        for reader in readers:
            reactor.addReader(reader)
        for _, theirs in pairs:
            theirs.send(b"ping")
        reactor.doPoll(1.0)  # one poll: all three are readable
        assert [r.read for r in readers] == [b"", b"ping", b"ping"]
        assert readers[0].lost and not readers[1].lost
        failures = [str(e["log_failure"].value) for e in no_logged_failures if e.get("log_failure") is not None]
        assert "a bug while cleaning up" in failures  # (and the read's own bug, logged by Twisted)
        no_logged_failures.clear()
        pairs[1][1].send(b"pong")
        reactor.doPoll(1.0)
        assert readers[1].read == b"pingpong" and readers[2].read == b"ping"
    finally:
        for reader in readers[1:]:
            reactor.removeReader(reader)
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
        reactor._poller.close()
