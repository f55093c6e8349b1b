"""An estimate of the prefixes each host's prompt cache holds.

An LM Studio (llama.cpp) host keeps one prompt cache per parallel slot and reuses the longest common prefix of
the next prompt it runs there, so a host of ``max_concurrent`` slots holds about its last ``max_concurrent``
conversations. The gateway remembers, per host, the conversations it sent there most recently, that many.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class PrefixMemory:
    """Which host holds which conversation (by key), least recently used first, ``slots(host)`` per host."""

    def __init__(self, slots: Callable[[str], int]) -> None:
        self._slots = slots
        self._held: dict[str, OrderedDict[bytes, None]] = {}
        self._holder: dict[bytes, str] = {}

    def holder(self, key: bytes) -> str | None:
        """The host the conversation last went to, while that host is estimated to still hold it."""
        return self._holder.get(key)

    def has_room(self, host: str) -> bool:
        """Whether ``host`` has a slot no remembered conversation fills (sending a new one there evicts none)."""
        return len(self._held.get(host, ())) < self._slots(host)

    def remember(self, host: str, key: bytes) -> None:
        """``key``'s conversation was sent to ``host``: it is the host's most recent, and evicts its least recent
        when the host's slots are all taken."""
        previous = self._holder.get(key)
        if previous is not None and previous != host:
            self._held[previous].pop(key, None)
        held = self._held.setdefault(host, OrderedDict())
        held[key] = None
        held.move_to_end(key)
        self._holder[key] = host
        while len(held) > self._slots(host):
            evicted, _ = held.popitem(last=False)
            del self._holder[evicted]

    def forget(self, host: str) -> None:
        """``host`` restarted or left: its cache is gone."""
        for key in self._held.pop(host, {}):
            del self._holder[key]


class ResponseHomes:
    """The host that gave each stored response (the Responses API's ``previous_response_id`` names one, and only
    that host holds it), the most recent ``limit`` of them."""

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._homes: OrderedDict[str, str] = OrderedDict()

    def home(self, response_id: str) -> str | None:
        return self._homes.get(response_id)

    def remember(self, response_id: str, host: str) -> None:
        self._homes[response_id] = host
        self._homes.move_to_end(response_id)
        if len(self._homes) > self._limit:
            self._homes.popitem(last=False)
