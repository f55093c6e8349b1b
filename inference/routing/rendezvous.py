"""Weighted rendezvous (highest random weight) hashing: every process ranks the hosts for a key alike, with no
shared state, and removing a host moves only the keys it ranked first."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Protocol, TypeVar

_SCALE = 2.0 ** 64


class Weighted(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> float: ...


def score(key: bytes, name: str, weight: float = 1.0) -> float:
    """A host's score for ``key``: ``weight / -ln(u)`` with ``u`` uniform in (0, 1) from a hash of both, so a host
    of weight 2 ranks first for twice the keys of a host of weight 1."""
    digest = hashlib.blake2b(key + b"\0" + name.encode(), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 0.5) / _SCALE
    return weight / -math.log(uniform)


H = TypeVar("H", bound=Weighted)


def rank(key: bytes, hosts: Sequence[H]) -> list[H]:
    """``hosts`` from the one ``key`` belongs to down (ties, which need equal 64-bit hashes, by name)."""
    return sorted(hosts, key=lambda host: (-score(key, host.name, host.weight), host.name))
