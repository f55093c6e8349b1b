"""Who calls: the tenants of the key file, each with its keys (stored as SHA-256 hashes), the models it may use,
its priority class, its share and its limits.

The key file is either one key per line (the plain form: every key is the ``default`` tenant's, with no limit)
or YAML with a ``tenants:`` list::

    tenants:
      - name: research
        keys: ["sha256:9f86d0..."]          # `inference keys add research` prints a new key and writes its hash
        models: ["qwen*", "text-embedding-*"]  # globs; omitted: every model
        priority: standard                  # critical, standard or sheddable
        weight: 2                           # its share of the slots against the other tenants of its class
        limits: {concurrent: 4, requests_per_minute: 60, tokens_per_minute: 100000, tokens_per_day: 2000000}
        operator: false                     # may read /v1/usage (and /metrics, /health when they are protected)

A key is never kept, logged or stored: the gateway hashes what a client presents and looks the hash up; logs,
spans, metrics and the usage ledger name the tenant and the key's id (``key_`` and the hash's first 8 digits).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any

import yaml

from .config import ConfigError

PRIORITIES = ("critical", "standard", "sheddable")
"""The priority classes, most urgent first: a freed slot goes to a waiting call of the first class that has one."""

DEFAULT_TENANT = "default"
"""The tenant of the plain keys (``server.api_keys`` and a key file of one key per line)."""

_HASH = re.compile(r"sha256:([0-9a-f]{64})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LIMITS = ("concurrent", "requests_per_minute", "tokens_per_minute", "tokens_per_day")
"""A tenant's limits, in the order they are checked."""


def key_hash(key: bytes) -> str:
    """What the key file stores of ``key``: ``sha256:`` and its digest in hex."""
    return "sha256:" + hashlib.sha256(key).hexdigest()


def key_id(hashed: str) -> str:
    """The name logs and the ledger give a key: it tells keys apart and says nothing of the key itself."""
    return "key_" + hashed.removeprefix("sha256:")[:8]


@dataclass(frozen=True)
class TenantLimits:
    """What a tenant may use; None: no limit. Tokens are input + output, counted when a call ends."""

    concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None

    @cached_property
    def any(self) -> bool:
        """Whether any limit is set (asked on every call: worked out once)."""
        return any(getattr(self, name) is not None for name in LIMITS)


EVERY_MODEL = ("*",)
"""A tenant's models when its entry names none (checked without a glob match, on every call's model lookup)."""


@dataclass(frozen=True)
class Tenant:
    name: str
    models: tuple[str, ...] = EVERY_MODEL
    priority: str = "standard"
    weight: float = 1.0
    limits: TenantLimits = field(default_factory=TenantLimits)
    operator: bool = False

    def allows(self, model: str) -> bool:
        """Whether the tenant may use ``model`` (a model it may not use is, to it, a model that does not exist)."""
        return self.models == EVERY_MODEL or any(fnmatchcase(model, pattern) for pattern in self.models)

    @property
    def rank(self) -> int:
        """Its priority class's place in :data:`PRIORITIES` (0 first)."""
        return PRIORITIES.index(self.priority)


@dataclass(frozen=True)
class Caller:
    """The tenant a request is made for, and which of its keys it came with (None: an open gateway)."""

    tenant: Tenant
    key_id: str | None = None


ANONYMOUS = Caller(Tenant("anonymous", operator=True))
"""Who calls a gateway that asks for no key: one tenant, no limit, the operator."""


def plain_tenant(hashes: list[str]) -> tuple[Tenant, list[str]]:
    """The ``default`` tenant of plain keys: every model, no limit, the operator (its keys are the admin's)."""
    return Tenant(DEFAULT_TENANT, operator=True), hashes


def parse_tenants(data: Any, where: str) -> list[tuple[Tenant, list[str]]]:
    """The tenants (and their key hashes) of a key file's YAML; :class:`ConfigError` naming what is wrong."""
    entries = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'tenants' must be a non-empty list of tenants")
    unknown = set(data) - {"tenants"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (only 'tenants')")
    tenants, names = [], set()
    for number, entry in enumerate(entries, 1):
        tenant, hashes = _tenant(entry, f"{where}: tenant {number}")
        if tenant.name in names:
            raise ConfigError(f"{where}: tenant '{tenant.name}' is listed twice")
        names.add(tenant.name)
        tenants.append((tenant, hashes))
    return tenants


def _tenant(entry: Any, where: str) -> tuple[Tenant, list[str]]:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with name, keys, models, priority, weight, limits, operator")
    unknown = set(entry) - {"name", "keys", "models", "priority", "weight", "limits", "operator"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: 'name' must be letters, digits, '_', '.' or '-' (up to 64), not {name!r}")
    where = f"{where} ({name})"
    keys = entry.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and _HASH.fullmatch(k) for k in keys):
        raise ConfigError(f"{where}: 'keys' must be a list of sha256:<64 hex digits> hashes (never a key itself: "
                          f"`inference keys add {name}` makes a key and writes its hash)")
    models = entry.get("models", ["*"])
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{where}: 'models' must be a non-empty list of model names or globs")
    priority = entry.get("priority", "standard")
    if priority not in PRIORITIES:
        raise ConfigError(f"{where}: 'priority' must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1000:
        raise ConfigError(f"{where}: 'weight' must be a number above 0 and at most 1000, not {weight!r}")
    operator = entry.get("operator", False)
    if not isinstance(operator, bool):
        raise ConfigError(f"{where}: 'operator' must be true or false")
    tenant = Tenant(name, tuple(models), priority, float(weight), _limits(entry.get("limits") or {}, where), operator)
    return tenant, list(keys)


def _limits(data: Any, where: str) -> TenantLimits:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: 'limits' must be a mapping of {', '.join(LIMITS)}")
    unknown = set(data) - set(LIMITS)
    if unknown:
        raise ConfigError(f"{where}: unknown limit(s) {', '.join(sorted(map(str, unknown)))} "
                          f"(known: {', '.join(LIMITS)})")
    for name, value in data.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{where}: limits.{name} must be a whole number >= 1 (or omitted), not {value!r}")
    return TenantLimits(**data)


def read_key_file(path: str) -> list[tuple[Tenant, list[str]]]:
    """The tenants in the key file at ``path``, each with its key hashes: YAML with ``tenants:``, or one plain
    key per line (``#`` comments); :class:`ConfigError` (one line, no key in it) when it cannot be used."""
    where = f"server.api_keys_file: {path}"
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as e:
        raise ConfigError(f"server.api_keys_file: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if re.search(r"^tenants\s*:", text, re.MULTILINE):  # meant as tenants: say where it went wrong
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{where} is not valid YAML{at}") from None
        data = None  # plain keys need not be valid YAML
    if isinstance(data, dict) and "tenants" in data:
        return parse_tenants(data, where)
    return [plain_tenant([key_hash(key.encode("utf-8")) for key in _plain_keys(text.splitlines(), where)])]


def _plain_keys(lines: list[str], where: str) -> list[str]:
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"{where} holds no key (one key per line; # starts a comment; or a tenants: list)")
    for number, key in enumerate(keys, 1):
        if any(c.isspace() for c in key) or not key.isprintable():
            raise ConfigError(f"{where}: key {number} contains spaces or control characters")
    return keys
