"""Passive health: a host that keeps failing is left out for a while, and for longer each time it fails again.

Every call that reaches a failing host costs its client a failover (a connect attempt, an error page) before
another host answers. A host that refused the connection is out at once (it is not listening); one that answers
5xx or "no model loaded" is out after ``eject_after`` failures in a row (one bad answer may be a single bad
request). The cool-down doubles with each ejection in a row, up to ``max_secs``, and the next call the host
serves resets it. A host out of the fleet is probed when its cool-down ends, and every ``base_secs`` after that
until it answers.
"""

from __future__ import annotations


class Ejection:
    """One host's run of failures and ejections."""

    def __init__(self, eject_after: int, base_secs: float, max_secs: float) -> None:
        self._eject_after = eject_after
        self._base_secs = base_secs
        self._max_secs = max_secs
        self.probe_secs = base_secs  # between probes of a host that is out and does not answer
        self.failures = 0  # in a row, since the host last served a call
        self.ejections = 0  # in a row, since the host last served a call

    def failed(self, unreachable: bool) -> float | None:
        """Count a failure; the cool-down (seconds) when it ejects the host, else None."""
        self.failures += 1
        if not unreachable and self.failures < self._eject_after:
            return None
        return self.eject()

    def eject(self) -> float:
        """Eject the host (again): the cool-down, doubled for each ejection in a row."""
        self.failures = 0
        self.ejections += 1
        return min(self._base_secs * 2.0 ** (self.ejections - 1), self._max_secs)

    def served(self) -> None:
        self.failures = self.ejections = 0
