"""Gateway API keys: from ``server.api_keys`` and ``server.api_keys_file`` (plain keys, or tenants with hashed
keys: :mod:`inference.tenants`), each naming the tenant a request is made for.

A presented key is hashed and the hash looked up: the gateway holds no key of the file, and the time a lookup
takes says nothing of how close a guess came. ``reload()`` (SIGHUP) reads the file again, so that keys and
tenants change without a restart.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.logger import Logger

from .config import ConfigError
from .errors import AuthenticationFailed
from .tenants import ANONYMOUS, DEFAULT_TENANT, Caller, Tenant, key_hash, key_id, plain_tenant, read_key_file

log = Logger()


class ApiKeys:
    """The keys a client may present as ``Authorization: Bearer <key>``, and whose they are; none: open."""

    def __init__(self, keys: Sequence[str], key_file: str | None = None) -> None:
        self._configured = plain_tenant([key_hash(key.encode("utf-8")) for key in keys]) if keys else None
        self._file = key_file
        self._callers: dict[str, Caller] = {}
        self.tenants: dict[str, Tenant] = {}
        self._load()

    @property
    def enabled(self) -> bool:
        return bool(self._callers)

    def __len__(self) -> int:
        return len(self._callers)

    def _load(self) -> None:
        entries = read_key_file(self._file) if self._file else []
        if self._configured is not None:  # server.api_keys join the file's default tenant, or make it
            default = next((entry for entry in entries if entry[0].name == DEFAULT_TENANT), None)
            if default is None:
                entries = [*entries, self._configured]
            else:
                default[1].extend(self._configured[1])
        callers: dict[str, Caller] = {}
        for tenant, hashes in entries:
            for hashed in hashes:
                if hashed in callers and callers[hashed].tenant.name != tenant.name:
                    raise ConfigError(f"server.api_keys_file: {key_id(hashed)} is a key of both "
                                      f"'{callers[hashed].tenant.name}' and '{tenant.name}'")
                callers[hashed] = Caller(tenant, key_id(hashed))
        self._callers = callers
        self.tenants = {tenant.name: tenant for tenant, _ in entries}

    def reload(self) -> None:
        """Read the key file again; on a problem keep the keys in use and say why (never lock everyone out)."""
        if not self._file:
            return
        try:
            self._load()
        except ConfigError as e:
            log.error("{problem}; keeping the {count} key(s) in use", problem=str(e), count=len(self._callers))
            return
        log.info("API keys reloaded from {path}: {count} key(s) of {tenants} tenant(s)", path=self._file,
                 count=len(self._callers), tenants=len(self.tenants))

    def check(self, authorization: bytes | None) -> Caller:
        """Whose ``authorization`` (``Bearer <key>``) is; :class:`AuthenticationFailed` for no known key."""
        if not self._callers:
            return ANONYMOUS
        scheme, _, token = (authorization or b"").partition(b" ")
        caller = self._callers.get(key_hash(token.strip())) if scheme.lower() == b"bearer" else None
        if caller is None:
            raise AuthenticationFailed("Missing or invalid API key. Send 'Authorization: Bearer <key>' "
                                       "with a key the gateway was given (server.api_keys).",
                                       headers={"WWW-Authenticate": 'Bearer realm="inference"'})
        return caller
