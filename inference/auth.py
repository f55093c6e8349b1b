"""Gateway API keys: from ``server.api_keys`` and ``server.api_keys_file``, checked in constant time.

The file holds one key per line (blank lines and ``#`` comments are ignored) so that keys can live outside the
config, readable by the service alone, and be rotated without a restart: ``reload()`` (SIGHUP) reads it again.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from twisted.logger import Logger

from .config import ConfigError
from .errors import AuthenticationFailed

log = Logger()


def read_key_file(path: str) -> list[str]:
    """The keys in ``path``; :class:`ConfigError` (one line, no key in it) when it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as e:
        raise ConfigError(f"server.api_keys_file: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"server.api_keys_file: {path} is not UTF-8 text") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"server.api_keys_file: {path} holds no key (one key per line; # starts a comment)")
    for number, key in enumerate(keys, 1):
        if any(c.isspace() for c in key) or not key.isprintable():
            raise ConfigError(f"server.api_keys_file: key {number} in {path} contains spaces or control "
                              "characters")
    return keys


class ApiKeys:
    """The keys a client may present as ``Authorization: Bearer <key>``; none configured means open."""

    def __init__(self, keys: Sequence[str], key_file: str | None = None) -> None:
        self._configured = [key.encode("utf-8") for key in keys]
        self._file = key_file
        self._keys = self._configured + self._from_file()

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def _from_file(self) -> list[bytes]:
        return [key.encode("utf-8") for key in read_key_file(self._file)] if self._file else []

    def reload(self) -> None:
        """Read the key file again; on a problem keep the keys in use and say why (never lock everyone out)."""
        if not self._file:
            return
        try:
            self._keys = self._configured + self._from_file()
        except ConfigError as e:
            log.error("{problem}; keeping the {count} key(s) in use", problem=str(e), count=len(self._keys))
            return
        log.info("API keys reloaded from {path}: {count} key(s)", path=self._file, count=len(self._keys))

    def check(self, authorization: bytes | None) -> None:
        """Raise :class:`AuthenticationFailed` unless ``authorization`` is ``Bearer <a known key>``."""
        if not self._keys:
            return
        scheme, _, token = (authorization or b"").partition(b" ")
        token = token.strip()
        # Compare with every key, always, so the time taken says nothing about which key came close.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        if scheme.lower() != b"bearer" or not matched:
            raise AuthenticationFailed("Missing or invalid API key. Send 'Authorization: Bearer <key>' "
                                       "with a key the gateway was given (server.api_keys).",
                                       headers={"WWW-Authenticate": 'Bearer realm="inference"'})
